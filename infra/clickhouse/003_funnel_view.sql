-- The campaign funnel, aggregated at query time (a plain view: nothing runs on the insert path).
-- uniqExactIf counts distinct messages, so duplicate outcome rows that have not merged yet
-- are not counted twice, and FINAL is not needed.
-- The terminal codes are those of schemas.models.TERMINAL_CODES (a test checks they agree).
CREATE OR REPLACE VIEW campaign_funnel AS
SELECT
    campaign_id,
    uniqExactIf(message_id, code IN ('sent', 'failed', 'capped', 'render_failed', 'no_address',
                                     'deduplicated', 'opted_out', 'expired')) AS targeted,
    uniqExactIf(message_id, code = 'sent') AS sent,
    uniqExactIf(message_id, code = 'delivered') AS delivered,
    uniqExactIf(message_id, code = 'undelivered') AS undelivered,
    uniqExactIf(message_id, code = 'clicked') AS clicked,
    uniqExactIf(message_id, code = 'converted') AS converted,
    uniqExactIf(message_id, code = 'failed') AS failed,
    uniqExactIf(message_id, code IN ('capped', 'render_failed', 'no_address', 'deduplicated',
                                     'opted_out', 'expired')) AS suppressed,
    if(sent = 0, 0., delivered / sent) AS delivery_rate,
    if(delivered = 0, 0., clicked / delivered) AS ctr,
    if(delivered = 0, 0., converted / delivered) AS cvr,
    min(occurred_at) AS first_at,
    max(occurred_at) AS last_at
FROM outcomes
GROUP BY campaign_id;
