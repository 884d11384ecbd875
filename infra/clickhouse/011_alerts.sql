-- Alerts (topic loopcast.alerts): what an operator must look at, e.g. a drop in delivery rate.
-- One row per alert; a redelivered record collapses on its alert_id (ReplacingMergeTree).
CREATE TABLE IF NOT EXISTS alerts
(
    alert_id    String,
    kind        LowCardinality(String),
    severity    LowCardinality(String),
    subject     String,
    message     String,
    value       Nullable(Float64),
    occurred_at DateTime64(3, 'UTC'),
    inserted_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(inserted_at)
ORDER BY (kind, alert_id);
