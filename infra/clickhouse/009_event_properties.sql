-- Event properties in user_events (JSON text), so the tags job can replay tag rules that test
-- properties ("membership_purchased with price_type = full") from the warehouse's history.
ALTER TABLE user_events ADD COLUMN IF NOT EXISTS properties String DEFAULT '{}';
