-- Images (issue 7): attribute queries are answered from one index in display order. Each attribute row
-- carries its image's created_at, so `attr.K=V` newest-first is an index range scan (no sort, no lookup of
-- every match), and further filters are point lookups on the primary key.
ALTER TABLE image_attributes ADD COLUMN created_at BIGINT;
UPDATE image_attributes SET created_at = (SELECT i.created_at FROM images i WHERE i.hash = image_attributes.hash);
CREATE INDEX image_attributes_kv_created ON image_attributes (key, value, created_at, hash);
-- Superseded: a prefix of the index above.
DROP INDEX image_attributes_kv;
