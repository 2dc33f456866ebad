-- A run can be cancelled: consumers then record its remaining jobs as skipped instead of running
-- them, and the producer refuses to publish more of it.
ALTER TABLE runs ADD COLUMN cancelled_at timestamptz;
