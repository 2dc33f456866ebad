-- Since when a consumer has had a free slot and found the queue empty (NULL while it has work
-- for every slot). A consumer whose job waits for its own busy slot hands that job back when
-- another consumer of the fleet is idle, so that the end of a run is not one job waiting
-- behind a long one while a slot elsewhere has nothing to do.
ALTER TABLE consumers ADD COLUMN idle_since timestamptz;
