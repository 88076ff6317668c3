//! control-api: the control plane around the hot path (tenants, users, API keys, meters, plans,
//! subscriptions, invoices) and the operator CLI.
//!
//! [`routes`] is the endpoint table (router, access rules and OpenAPI document from one list);
//! [`http`] the server, settings and error shape; [`auth`] authentication and authorization
//! against [`rbac`]'s permission matrix; [`identity`] users, sessions, tokens and 2FA;
//! [`apikeys`] keys over HTTP (on [`keys`]); [`audit`] the audit log; [`idempotency`]
//! `Idempotency-Key`; [`page`] cursor pagination; [`crypto`] the server key; [`tenants`]
//! cross-tenant administration; [`subscriptions`] the subscription lifecycle; [`catalog`] plans, customers, subscriptions, tax rates and
//! invoices; [`meters`] the OpenMeter meters resource; [`query`] the meter query; [`usage`] the
//! event accounting; [`business`] the business metrics on `/metrics`; [`credit_notes`],
//! [`payments`] (on [`provider`]'s trait, the sandbox and [`stripe`]) and [`reconcile`] the
//! money after an invoice; [`notify`] (templates, fan-out, thresholds), [`delivery`] (webhooks,
//! SMTP, inbox), [`channels`] and [`inbox`] the notifications; [`workers`] the background loops.

pub mod apikeys;
pub mod audit;
pub mod auth;
pub mod business;
pub mod catalog;
pub mod channels;
pub mod credit_notes;
pub mod crypto;
pub mod db;
pub mod delivery;
pub mod http;
pub mod idempotency;
pub mod identity;
pub mod inbox;
pub mod keys;
pub mod meters;
pub mod notify;
pub mod page;
pub mod payments;
pub mod provider;
pub mod query;
pub mod rbac;
pub mod reconcile;
pub mod routes;
pub mod stripe;
pub mod subscriptions;
pub mod tenants;
pub mod usage;
pub mod workers;
