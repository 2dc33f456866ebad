-- Logs move to S3, gzip-compressed: a result keeps the object's key. `log` stays for what is
-- not in S3: a short note of Quarry's own (a reused result), or the whole log when S3 could not
-- take it.
ALTER TABLE results ADD COLUMN log_key text;
ALTER TABLE results ALTER COLUMN log DROP NOT NULL;
