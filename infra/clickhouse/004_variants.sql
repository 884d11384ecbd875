-- A/B tests: the variant a message carried, the funnel per variant, and every decision taken.
ALTER TABLE outcomes ADD COLUMN IF NOT EXISTS variant Nullable(String);

CREATE OR REPLACE VIEW variant_funnel AS
SELECT
    campaign_id,
    variant,
    uniqExactIf(message_id, code IN ('sent', 'failed', 'capped', 'render_failed', 'no_address',
                                     'deduplicated', 'opted_out', 'expired')) AS targeted,
    uniqExactIf(message_id, code = 'sent') AS sent,
    uniqExactIf(message_id, code = 'delivered') AS delivered,
    uniqExactIf(message_id, code = 'clicked') AS clicked,
    uniqExactIf(message_id, code = 'converted') AS converted,
    if(sent = 0, 0., clicked / sent) AS ctr,
    if(sent = 0, 0., converted / sent) AS cvr
FROM outcomes
WHERE variant IS NOT NULL
GROUP BY campaign_id, variant;

CREATE TABLE IF NOT EXISTS ab_decisions
(
    campaign_id LowCardinality(String),
    decided_at DateTime64(3, 'UTC'),
    status LowCardinality(String),
    winner Nullable(String),
    metric LowCardinality(String),
    samples UInt64,
    probabilities String,
    reason String
)
ENGINE = MergeTree
ORDER BY (campaign_id, decided_at);
