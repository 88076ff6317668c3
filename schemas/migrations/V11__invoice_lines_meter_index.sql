-- Every reader of invoice_lines finds lines through their invoice (the primary key's
-- invoice_id prefix): the rater's billed-quantity and reconcile queries, the invoice API,
-- credit notes. The (tenant_id, meter_id, period_start) index served none of them and cost
-- the rater's bulk COPY of 600 k lines (100 k invoices) one more index insertion per line.
DROP INDEX IF EXISTS invoice_lines_meter;
