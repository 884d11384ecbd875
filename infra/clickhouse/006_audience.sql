-- Audience tables for segments (connectors.segment_sql): one row per user in user_attributes (the
-- universe a segment selects from), their tags, their recent events and package memberships.
-- Spark reads tables with the same names and columns (TIMESTAMP for DateTime64, session zone UTC).
CREATE TABLE IF NOT EXISTS user_attributes
(
    user_id String,
    age Nullable(Int64),
    city Nullable(String),
    country Nullable(String),
    vip_level Nullable(Int64),
    gender Nullable(String),
    membership_expires_at Nullable(DateTime64(3, 'UTC')),
    last_login_at Nullable(DateTime64(3, 'UTC')),
    signup_at Nullable(DateTime64(3, 'UTC')),
    timezone Nullable(String),
    lifetime_value Nullable(Float64)
)
ENGINE = ReplacingMergeTree
ORDER BY user_id;

CREATE TABLE IF NOT EXISTS user_tags
(
    user_id String,
    tag String
)
ENGINE = ReplacingMergeTree
ORDER BY (user_id, tag);

CREATE TABLE IF NOT EXISTS user_events
(
    user_id String,
    event_type LowCardinality(String),
    occurred_at DateTime64(3, 'UTC')
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(occurred_at)
ORDER BY (event_type, user_id, occurred_at);

CREATE TABLE IF NOT EXISTS package_members
(
    package_id String,
    user_id String
)
ENGINE = ReplacingMergeTree
ORDER BY (package_id, user_id);
