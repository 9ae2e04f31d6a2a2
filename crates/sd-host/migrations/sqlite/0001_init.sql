-- SD-Host metadata schema. Portable SQL (SQLite now, PostgreSQL later): TEXT, BIGINT, DOUBLE PRECISION;
-- timestamps are BIGINT milliseconds since the Unix epoch; JSON kept in TEXT columns.

CREATE TABLE models (
    sha256        TEXT PRIMARY KEY,
    short_hash    TEXT NOT NULL,
    name          TEXT NOT NULL,
    filename      TEXT NOT NULL,
    path          TEXT,
    model_type    TEXT NOT NULL,
    family        TEXT NOT NULL,
    size_bytes    BIGINT NOT NULL DEFAULT 0,
    mtime_ms      BIGINT,
    status        TEXT NOT NULL,
    source        TEXT,
    error         TEXT,
    created_at    BIGINT NOT NULL,
    updated_at    BIGINT NOT NULL
);
CREATE INDEX models_type_family ON models (model_type, family);
CREATE INDEX models_path ON models (path);

CREATE TABLE tasks (
    id             TEXT PRIMARY KEY,
    seq            BIGINT NOT NULL,
    status         TEXT NOT NULL,
    priority       BIGINT NOT NULL DEFAULT 0,
    model_sha256   TEXT,
    lora_key       TEXT NOT NULL DEFAULT '',
    params         TEXT NOT NULL,
    callback_url   TEXT,
    attempts       BIGINT NOT NULL DEFAULT 0,
    error_message  TEXT,
    images         TEXT NOT NULL DEFAULT '[]',
    created_at     BIGINT NOT NULL,
    started_at     BIGINT,
    updated_at     BIGINT NOT NULL,
    finished_at    BIGINT
);
CREATE UNIQUE INDEX tasks_seq ON tasks (seq);
CREATE INDEX tasks_status_order ON tasks (status, priority, seq);
CREATE INDEX tasks_created ON tasks (created_at);

CREATE TABLE images (
    hash            TEXT PRIMARY KEY,
    format          TEXT NOT NULL,
    width           BIGINT NOT NULL,
    height          BIGINT NOT NULL,
    bytes           BIGINT NOT NULL,
    created_at      BIGINT NOT NULL,
    task_id         TEXT,
    model           TEXT,
    prompt          TEXT,
    negative_prompt TEXT,
    seed            BIGINT,
    steps           BIGINT,
    guidance_scale  DOUBLE PRECISION,
    scheduler       TEXT,
    params          TEXT
);
CREATE INDEX images_created ON images (created_at, hash);
CREATE INDEX images_task ON images (task_id);
CREATE INDEX images_model ON images (model, created_at);

CREATE TABLE image_attributes (
    hash   TEXT NOT NULL REFERENCES images (hash) ON DELETE CASCADE,
    key    TEXT NOT NULL,
    value  TEXT NOT NULL,
    PRIMARY KEY (hash, key)
);
CREATE INDEX image_attributes_kv ON image_attributes (key, value, hash);

CREATE TABLE settings (
    key    TEXT PRIMARY KEY,
    value  TEXT NOT NULL
);
