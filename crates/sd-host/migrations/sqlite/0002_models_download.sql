-- Resume state of a Civitai download (URL, If-Range validator), kept apart from the public `source`.
ALTER TABLE models ADD COLUMN download TEXT;
CREATE INDEX models_status ON models (status);
