-- A voided draft has no number (numbers are given at issue only); a voided issued invoice keeps
-- its number, so numbering stays gapless.
ALTER TABLE invoices DROP CONSTRAINT invoices_check;
ALTER TABLE invoices ADD CONSTRAINT invoices_number_by_status CHECK (
    (status = 'draft' AND number IS NULL)
    OR (status IN ('issued', 'paid') AND number IS NOT NULL)
    OR status = 'void'
);
