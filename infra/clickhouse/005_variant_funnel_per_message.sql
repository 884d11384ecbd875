-- Receipts, clicks and conversions arrive without the variant (only the send path knows it), so
-- the variant funnel takes each message's variant from whichever of its rows carries one.
CREATE OR REPLACE VIEW variant_funnel AS
SELECT
    campaign_id,
    variant,
    countIf(hasAny(codes, ['sent', 'failed', 'capped', 'render_failed', 'no_address',
                           'deduplicated', 'opted_out', 'expired'])) AS targeted,
    countIf(has(codes, 'sent')) AS sent,
    countIf(has(codes, 'delivered')) AS delivered,
    countIf(has(codes, 'clicked')) AS clicked,
    countIf(has(codes, 'converted')) AS converted,
    if(sent = 0, 0., clicked / sent) AS ctr,
    if(sent = 0, 0., converted / sent) AS cvr
FROM
(
    SELECT campaign_id, message_id, anyIf(variant, variant IS NOT NULL) AS variant, groupUniqArray(code) AS codes
    FROM outcomes
    GROUP BY campaign_id, message_id
)
WHERE variant IS NOT NULL
GROUP BY campaign_id, variant;
