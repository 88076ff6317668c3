//! control-api: the control plane around the hot path (tenants, users, API keys, meters, plans,
//! subscriptions, invoices, payments, notifications) and the operator CLI.
//!
//! [`catalog`] plans, customers, subscriptions, tax rates and invoices (read);
//! [`http`] holds the server, the error shape and authentication; [`meters`] the OpenMeter meters
//! resource; [`query`] the meter query; [`usage`] the event accounting; [`keys`] tenants and API keys.

pub mod catalog;
pub mod db;
pub mod http;
pub mod keys;
pub mod meters;
pub mod query;
pub mod usage;
