-- Where the producer is in the registry listing, saved after every published page, so an
-- interrupted producer continues from there instead of paging from the start again.
ALTER TABLE runs ADD COLUMN paging_position jsonb;
