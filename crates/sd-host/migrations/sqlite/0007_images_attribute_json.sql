-- Images (issue 7): keep each attribute's JSON so non-string values read back with their type, while
-- `value` (text) stays what `attr.KEY=VALUE` filters match through the (key, value, hash) index.
ALTER TABLE image_attributes ADD COLUMN json TEXT;
