-- Every state change of every message (topic loopcast.outcomes).
-- Kafka delivers at least once, so the same outcome may arrive twice: ReplacingMergeTree collapses
-- rows with the same (campaign_id, message_id, code), keeping the latest inserted_at. Merges are
-- eventual: readers count with uniqExact(message_id) or read with FINAL.
CREATE TABLE IF NOT EXISTS outcomes
(
    message_id          String,
    campaign_id         LowCardinality(String),
    user_id             String,
    channel             LowCardinality(String),
    code                LowCardinality(String),
    stage               LowCardinality(String),
    reason              Nullable(String),
    provider            Nullable(String),
    provider_message_id Nullable(String),
    triggered_at        DateTime64(3, 'UTC'),
    occurred_at         DateTime64(3, 'UTC'),
    inserted_at         DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(inserted_at)
ORDER BY (campaign_id, message_id, code);
