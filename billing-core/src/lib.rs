//! billing-core: exact money, prices, tiers, taxes and invoices; a pure library (issue #7).
