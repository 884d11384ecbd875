-- Results of the batch jobs (jobs/segments.py, jobs/tags.py) loaded back into ClickHouse.
-- segment_membership: a rerun DELETEs a segment's rows, then inserts them again, so the
-- ReplacingMergeTree key only guards against a load interrupted and repeated.
CREATE TABLE IF NOT EXISTS segment_membership
(
    segment_id String,
    user_id String,
    built_at DateTime64(3, 'UTC')
)
ENGINE = ReplacingMergeTree
ORDER BY (segment_id, user_id);

-- Every change of a user's tags: rows from rules (source = the rule id, replayed from the event
-- history) and rows from the tags job's loads (source = 'job:tags').
CREATE TABLE IF NOT EXISTS user_tag_changes
(
    user_id String,
    tag String,
    change LowCardinality(String),
    source LowCardinality(String),
    occurred_at DateTime64(3, 'UTC')
)
ENGINE = MergeTree
ORDER BY (user_id, occurred_at);
