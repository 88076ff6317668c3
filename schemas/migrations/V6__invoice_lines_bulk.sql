-- Invoice lines are written in bulk by the rater (binary COPY, 600 k lines for 100 k invoices),
-- in the same transaction as their invoice; invoices are never deleted (they are voided). The
-- per-row foreign-key check cost nearly half of that write, so it goes, as on the usage tables.
ALTER TABLE invoice_lines DROP CONSTRAINT invoice_lines_invoice_id_fkey;

-- A usage or correction line's price is its plan version's price for the meter (versions never
-- change); it is stored on the line only when it is not (the recurring fee).
COMMENT ON COLUMN invoice_lines.price IS
    'NULL for usage and correction lines: the price is plan_prices of the invoice''s subscription version and the line''s meter';
