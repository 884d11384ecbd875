-- Input a stage could not process (topic loopcast.dlq), kept whole with the reason.
-- One row per original record: a redelivered dead letter collapses on (topic, partition, offset).
-- key and original hold the raw Kafka bytes (a ClickHouse String is a byte string).
CREATE TABLE IF NOT EXISTS dead_letters
(
    stage       LowCardinality(String),
    topic       LowCardinality(String),
    `partition` Int32,
    `offset`    Int64,
    reason      String,
    error_type  LowCardinality(String),
    key         Nullable(String),
    original    String,
    occurred_at DateTime64(3, 'UTC'),
    inserted_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(inserted_at)
ORDER BY (topic, `partition`, `offset`);
