//! control-api: the control plane around the hot path (tenants, users, API keys, meters, plans,
//! subscriptions, invoices, payments, notifications) and the operator CLI.

pub mod db;
pub mod keys;
