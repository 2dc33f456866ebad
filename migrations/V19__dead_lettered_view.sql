-- The `dead-lettered` events that still stand: no `requeued` event for the same job came after
-- them. One definition of "dead-lettered and not requeued since", which the live figures, the
-- dead letters listed, requeueing and `verify` all read (PostgreSQL inlines the view).
CREATE VIEW dead_lettered AS
SELECT e.id, e.job_id, e.run_id, e.at, e.detail
FROM job_events e
WHERE e.kind = 'dead-lettered'
  AND NOT EXISTS (SELECT 1 FROM job_events q
                  WHERE q.job_id = e.job_id AND q.kind = 'requeued' AND q.id > e.id);
