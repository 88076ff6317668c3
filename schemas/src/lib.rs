//! Contracts shared by every service of the metering pipeline.
//!
//! - [`proto`]: protobuf types generated at build time from `proto/` (Kafka record payload and
//!   the service contracts `usage.v1`, `billing.v1`, `subscription.v1`, `payment.v1`).
//! - [`json`]: the JSON Schemas of the CloudEvents usage event and of a meter definition.
//! - [`migrate`]: the versioned SQL migrations and the one function that applies them.
//! - [`kafka`]: names shared by the producer (ingest) and the consumer (aggregator).

pub mod apikey;
pub mod invoices;
pub mod meter;
pub mod migrate;
#[cfg(feature = "testing")]
pub mod testing;

/// Generated protobuf types.
pub mod proto {
    /// `usage.v1`: the Kafka record payload and the usage service contract.
    pub mod usage {
        #[allow(missing_docs, clippy::all)]
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/usage.v1.rs"));
        }
    }
    /// `billing.v1`: invoices and rating.
    pub mod billing {
        #[allow(missing_docs, clippy::all)]
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/billing.v1.rs"));
        }
    }
    /// `subscription.v1`: plans and subscriptions.
    pub mod subscription {
        #[allow(missing_docs, clippy::all)]
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/subscription.v1.rs"));
        }
    }
    /// `payment.v1`: payments and refunds.
    pub mod payment {
        #[allow(missing_docs, clippy::all)]
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/payment.v1.rs"));
        }
    }
}

/// JSON Schemas, embedded so services can serve or check them without file access.
pub mod json {
    /// JSON Schema (2020-12) of one CloudEvents 1.0 usage event.
    pub const USAGE_EVENT_SCHEMA: &str = include_str!("../json/usage-event.schema.json");
    /// JSON Schema (2020-12) of a meter definition in OpenMeter's v1 shape.
    pub const METER_SCHEMA: &str = include_str!("../json/meter.schema.json");
}

/// Names shared by the Kafka producer and consumers.
pub mod kafka {
    /// Default topic of usage event records.
    pub const USAGE_TOPIC: &str = "usage-events";
    /// Kafka header naming the payload's schema; readers refuse values they do not know.
    pub const CONTENT_TYPE_HEADER: &str = "content-type";
    /// Value of [`CONTENT_TYPE_HEADER`] for a `usage.v1.EventBatch` payload.
    pub const EVENT_BATCH_V1: &str = "application/x-protobuf; schema=usage.v1.EventBatch";

    /// The record key of an event: tenant and subject, so that all events of a subject (and so
    /// all duplicates of an event) land on the same partition.
    pub fn record_key(tenant_id: &str, subject: &str) -> Vec<u8> {
        let mut key = Vec::with_capacity(tenant_id.len() + 1 + subject.len());
        key.extend_from_slice(tenant_id.as_bytes());
        key.push(0);
        key.extend_from_slice(subject.as_bytes());
        key
    }
}

/// `url` with any password replaced by `***`, for messages and logs.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_string();
    };
    let rest = &url[scheme_end..];
    let Some(at) = rest.find('@') else {
        return url.to_string();
    };
    match rest[..at].find(':') {
        Some(colon) => format!(
            "{}{}:***{}",
            &url[..scheme_end],
            &rest[..colon],
            &rest[at..]
        ),
        None => url.to_string(),
    }
}
