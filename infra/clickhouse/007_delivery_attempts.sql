-- Every attempt at a provider, kept one row each. The outcomes table collapses rows of the same
-- (campaign, message, code), so a message retried three times would show one `retrying` row
-- there; this table is filled from every insert into outcomes before any merge.
ALTER TABLE outcomes ADD COLUMN IF NOT EXISTS attempt Nullable(UInt16);
ALTER TABLE outcomes ADD COLUMN IF NOT EXISTS fallback_of Nullable(String);

CREATE TABLE IF NOT EXISTS delivery_attempts
(
    message_id          String,
    campaign_id         LowCardinality(String),
    user_id             String,
    channel             LowCardinality(String),
    attempt             UInt16,
    code                LowCardinality(String),
    provider            Nullable(String),
    provider_message_id Nullable(String),
    reason              Nullable(String),
    fallback_of         Nullable(String),
    occurred_at         DateTime64(3, 'UTC')
)
ENGINE = MergeTree
ORDER BY (campaign_id, message_id, attempt, occurred_at);

CREATE MATERIALIZED VIEW IF NOT EXISTS delivery_attempts_feed TO delivery_attempts AS
SELECT message_id, campaign_id, user_id, channel, ifNull(attempt, 1) AS attempt, code, provider,
       provider_message_id, reason, fallback_of, occurred_at
FROM outcomes
WHERE stage = 'dispatch' AND code IN ('sent', 'failed', 'retrying');
