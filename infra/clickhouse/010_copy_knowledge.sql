-- The copy knowledge base: the copy itself, live rankings of it by CTR and CVR with confidence, and
-- the knowledge job's output (jobs/knowledge.py). Nothing here runs on the insert path of outcomes.

-- Confidence is the Wilson score lower bound at 95 % (z = 1.96): closed-form, so the views, the
-- Spark job and Python compute the very same number; it ranks 9 clicks of 10 sends below 900 of
-- 1,000, and shrinks to the observed rate as sends grow. A Beta posterior quantile would say much
-- the same but has no closed form in ClickHouse SQL. Exposures are messages sent, as in variant_funnel.
CREATE FUNCTION IF NOT EXISTS loopcast_wilson_lower AS (k, n) ->
    if(n = 0, 0.,
       ((k / n) + 1.9208 / n - 1.96 * sqrt((k / n) * (1 - k / n) / n + 0.9604 / (n * n))) / (1 + 3.8416 / n));

-- One row per copy a campaign sends (a template version behind a campaign's variant; variant '' for a
-- campaign with one template; campaign '' for a template no campaign uses yet). Filled by the knowledge
-- job from the config topic and by the copy generator when it writes copy; a reload collapses on the key.
CREATE TABLE IF NOT EXISTS copy_library
(
    template_id String,
    version     UInt32,
    campaign_id String,
    variant     String,
    -- The campaign's channel, its format (sms-cn, push, email …) and trigger event: what the copy was for.
    channel        LowCardinality(String),
    channel_format LowCardinality(String),
    trigger_event  LowCardinality(String),
    title       Nullable(String),
    body        String,
    long_text   Nullable(String),
    cta         Nullable(String),
    -- The literal copy only (fields like ${name} and <#if> tags taken out): what keywords come from.
    text        String,
    source      LowCardinality(String),
    seen_at     DateTime64(3, 'UTC')
)
ENGINE = ReplacingMergeTree(seen_at)
ORDER BY (template_id, version, campaign_id, variant);

-- Live: each campaign variant's copy (the latest version seen) with its sends, clicks, conversions,
-- rates and lower bounds, per channel. A message's variant comes from whichever of its rows carries one.
CREATE OR REPLACE VIEW copy_performance AS
SELECT
    m.campaign_id AS campaign_id,
    m.variant AS variant,
    m.channel AS channel,
    c.latest.1 AS template_id,
    c.latest.2 AS version,
    c.latest.3 AS body,
    c.latest.4 AS source,
    countIf(has(m.codes, 'sent')) AS sends,
    countIf(has(m.codes, 'sent') AND has(m.codes, 'clicked')) AS clicks,
    countIf(has(m.codes, 'sent') AND has(m.codes, 'converted')) AS conversions,
    if(sends = 0, 0., clicks / sends) AS ctr,
    if(sends = 0, 0., conversions / sends) AS cvr,
    loopcast_wilson_lower(clicks, sends) AS ctr_lower,
    loopcast_wilson_lower(conversions, sends) AS cvr_lower
FROM
(
    SELECT campaign_id, message_id, ifNull(anyIf(variant, variant IS NOT NULL), '') AS variant,
           any(channel) AS channel, groupUniqArray(code) AS codes
    FROM outcomes
    GROUP BY campaign_id, message_id
) AS m
LEFT JOIN
(
    SELECT campaign_id, variant, argMax(tuple(template_id, version, body, source), (seen_at, version)) AS latest
    FROM copy_library
    WHERE campaign_id != ''
    GROUP BY campaign_id, variant
) AS c ON m.campaign_id = c.campaign_id AND m.variant = c.variant
GROUP BY campaign_id, variant, channel, template_id, version, body, source
HAVING sends > 0;

-- Live: templates ranked across campaigns, per channel ('' = every channel together).
CREATE OR REPLACE VIEW copy_template_ranking AS
SELECT
    template_id,
    channel,  -- '' in the (template_id) grouping set: ClickHouse fills a rolled-up column with its default
    any(body) AS body,
    any(source) AS source,
    sum(p.sends) AS sends,
    sum(p.clicks) AS clicks,
    sum(p.conversions) AS conversions,
    if(sends = 0, 0., clicks / sends) AS ctr,
    if(sends = 0, 0., conversions / sends) AS cvr,
    loopcast_wilson_lower(clicks, sends) AS ctr_lower,
    loopcast_wilson_lower(conversions, sends) AS cvr_lower
FROM copy_performance AS p
WHERE template_id != ''
GROUP BY GROUPING SETS ((template_id, channel), (template_id));

-- The knowledge job's output: templates, keywords and phrases with their numbers, at every scope
-- (campaign_id '' = all campaigns, channel '' = all channels). Each run replaces every row.
CREATE TABLE IF NOT EXISTS copy_knowledge
(
    kind        LowCardinality(String),
    item        String,
    campaign_id String,
    channel     LowCardinality(String),
    templates   UInt32,
    sends       UInt64,
    clicks      UInt64,
    conversions UInt64,
    ctr         Float64,
    cvr         Float64,
    ctr_lower   Float64,
    cvr_lower   Float64,
    updated_at  DateTime64(3, 'UTC')
)
ENGINE = ReplacingMergeTree(updated_at)
ORDER BY (kind, campaign_id, channel, item);
