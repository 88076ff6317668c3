//! Rater: prices stored usage with billing-core and writes rated lines and invoices (issue #7).
