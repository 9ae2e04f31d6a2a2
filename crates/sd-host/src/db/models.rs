//! Model library records: every file identified by the SHA-256 of its bytes.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::sqlite::SqliteRepo;
use super::{now_ms, DbResult};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct ModelRecord {
    pub sha256: String,
    /// A1111's short hash: the first 10 hex characters.
    pub short_hash: String,
    pub name: String,
    pub filename: String,
    /// Absolute path of the file on disk (not exposed to clients).
    #[serde(skip_serializing)]
    pub path: Option<String>,
    /// checkpoint | lora | lycoris | vae | embedding | unknown
    #[serde(rename = "type")]
    pub model_type: String,
    /// sd1 | sd2 | sdxl | flux | chroma | zimage | unknown
    pub family: String,
    pub size_bytes: i64,
    #[serde(skip_serializing)]
    pub mtime_ms: Option<i64>,
    /// ready | downloading | verifying | failed
    pub status: String,
    /// `{"civitai": {model_id, version_id, air, base_model, trained_words, ...}}`
    #[schema(value_type = Object)]
    pub source: Option<serde_json::Value>,
    pub error: Option<String>,
    /// Download resume state (`{url, validator, ...}`); internal, never sent to clients.
    #[serde(skip)]
    pub download: Option<serde_json::Value>,
    pub created_at: i64,
    pub updated_at: i64,
}

impl ModelRecord {
    pub fn new(sha256: &str, filename: &str, model_type: &str, family: &str, status: &str) -> Self {
        let now = now_ms();
        let name = std::path::Path::new(filename)
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or(filename)
            .to_string();
        Self {
            sha256: sha256.to_string(),
            short_hash: sha256.chars().take(10).collect(),
            name,
            filename: filename.to_string(),
            path: None,
            model_type: model_type.to_string(),
            family: family.to_string(),
            size_bytes: 0,
            mtime_ms: None,
            status: status.to_string(),
            source: None,
            error: None,
            download: None,
            created_at: now,
            updated_at: now,
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct ModelFilter {
    pub model_type: Option<String>,
    pub family: Option<String>,
    /// Substring of name or filename (case-insensitive).
    pub q: Option<String>,
    /// ready | downloading | verifying | failed
    pub status: Option<String>,
}

#[async_trait]
pub trait ModelRepo: Send + Sync {
    /// Insert or replace the whole record (keyed by sha256).
    async fn upsert_model(&self, m: &ModelRecord) -> DbResult<()>;
    async fn get_model(&self, sha256: &str) -> DbResult<Option<ModelRecord>>;
    async fn list_models(&self, f: &ModelFilter) -> DbResult<Vec<ModelRecord>>;
    async fn delete_model(&self, sha256: &str) -> DbResult<bool>;
    /// Inserts `m` unless a record with its sha256 exists; true if inserted (race-free claim).
    async fn insert_model_if_absent(&self, m: &ModelRecord) -> DbResult<bool>;
    /// Sets status and error only (progress updates must not clobber other fields).
    async fn set_model_status(
        &self,
        sha256: &str,
        status: &str,
        error: Option<&str>,
    ) -> DbResult<bool>;
}

type Row = (
    String,
    String,
    String,
    String,
    Option<String>,
    String,
    String,
    i64,
    Option<i64>,
    String,
    Option<String>,
    Option<String>,
    Option<String>,
    i64,
    i64,
);

const COLS: &str = "sha256, short_hash, name, filename, path, model_type, family, size_bytes, mtime_ms, status, source, error, download, created_at, updated_at";

fn from_row(r: Row) -> ModelRecord {
    ModelRecord {
        sha256: r.0,
        short_hash: r.1,
        name: r.2,
        filename: r.3,
        path: r.4,
        model_type: r.5,
        family: r.6,
        size_bytes: r.7,
        mtime_ms: r.8,
        status: r.9,
        source: r.10.and_then(|s| serde_json::from_str(&s).ok()),
        error: r.11,
        download: r.12.and_then(|s| serde_json::from_str(&s).ok()),
        created_at: r.13,
        updated_at: r.14,
    }
}

type Query<'q> = sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments<'q>>;

/// Binds every column of `COLS` in order.
fn bind_all<'q>(q: Query<'q>, m: &'q ModelRecord) -> Query<'q> {
    q.bind(&m.sha256)
        .bind(&m.short_hash)
        .bind(&m.name)
        .bind(&m.filename)
        .bind(&m.path)
        .bind(&m.model_type)
        .bind(&m.family)
        .bind(m.size_bytes)
        .bind(m.mtime_ms)
        .bind(&m.status)
        .bind(m.source.as_ref().map(|v| v.to_string()))
        .bind(&m.error)
        .bind(m.download.as_ref().map(|v| v.to_string()))
        .bind(m.created_at)
        .bind(now_ms())
}

#[async_trait]
impl ModelRepo for SqliteRepo {
    async fn upsert_model(&self, m: &ModelRecord) -> DbResult<()> {
        bind_all(
            sqlx::query(&format!(
                "INSERT INTO models ({COLS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?) \
             ON CONFLICT (sha256) DO UPDATE SET short_hash=excluded.short_hash, name=excluded.name, \
             filename=excluded.filename, path=excluded.path, model_type=excluded.model_type, \
             family=excluded.family, size_bytes=excluded.size_bytes, mtime_ms=excluded.mtime_ms, \
             status=excluded.status, source=excluded.source, error=excluded.error, \
             download=excluded.download, updated_at=excluded.updated_at"
            )),
            m,
        )
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn insert_model_if_absent(&self, m: &ModelRecord) -> DbResult<bool> {
        let r = bind_all(
            sqlx::query(&format!(
                "INSERT INTO models ({COLS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?) \
                 ON CONFLICT (sha256) DO NOTHING"
            )),
            m,
        )
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() > 0)
    }

    async fn set_model_status(
        &self,
        sha256: &str,
        status: &str,
        error: Option<&str>,
    ) -> DbResult<bool> {
        let r =
            sqlx::query("UPDATE models SET status = ?, error = ?, updated_at = ? WHERE sha256 = ?")
                .bind(status)
                .bind(error)
                .bind(now_ms())
                .bind(sha256)
                .execute(&self.pool)
                .await?;
        Ok(r.rows_affected() > 0)
    }

    async fn get_model(&self, sha256: &str) -> DbResult<Option<ModelRecord>> {
        let row: Option<Row> =
            sqlx::query_as(&format!("SELECT {COLS} FROM models WHERE sha256 = ?"))
                .bind(sha256)
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.map(from_row))
    }

    async fn list_models(&self, f: &ModelFilter) -> DbResult<Vec<ModelRecord>> {
        let like = f.q.as_ref().map(|q| format!("%{}%", q.to_lowercase()));
        let rows: Vec<Row> = sqlx::query_as(&format!(
            "SELECT {COLS} FROM models WHERE (? IS NULL OR model_type = ?) AND (? IS NULL OR family = ?) \
             AND (? IS NULL OR lower(name) LIKE ? OR lower(filename) LIKE ?) AND (? IS NULL OR status = ?) ORDER BY created_at DESC, sha256"
        ))
        .bind(&f.model_type)
        .bind(&f.model_type)
        .bind(&f.family)
        .bind(&f.family)
        .bind(&like)
        .bind(&like)
        .bind(&like)
        .bind(&f.status)
        .bind(&f.status)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(from_row).collect())
    }

    async fn delete_model(&self, sha256: &str) -> DbResult<bool> {
        let r = sqlx::query("DELETE FROM models WHERE sha256 = ?")
            .bind(sha256)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn upsert_get_list_delete() {
        let dir = tempfile::tempdir().unwrap();
        let repo = SqliteRepo::connect(&format!("sqlite://{}", dir.path().join("m.db").display()))
            .await
            .unwrap();
        let sha = "ab".repeat(32);
        let mut m = ModelRecord::new(
            &sha,
            "Dream Shaper.safetensors",
            "checkpoint",
            "sd1",
            "ready",
        );
        m.source = Some(serde_json::json!({"civitai": {"version_id": 5}}));
        repo.upsert_model(&m).await.unwrap();
        let got = repo.get_model(&sha).await.unwrap().unwrap();
        assert_eq!(got.short_hash, "abababababa"[..10].to_string());
        assert_eq!(got.name, "Dream Shaper");
        assert_eq!(got.source, m.source);
        let f = ModelFilter {
            q: Some("dream".into()),
            ..Default::default()
        };
        assert_eq!(repo.list_models(&f).await.unwrap().len(), 1);
        let f = ModelFilter {
            model_type: Some("lora".into()),
            ..Default::default()
        };
        assert!(repo.list_models(&f).await.unwrap().is_empty());
        assert!(repo.delete_model(&sha).await.unwrap());
        assert!(repo.get_model(&sha).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn claim_once_status_and_download_state() {
        let dir = tempfile::tempdir().expect("tempdir");
        let repo = SqliteRepo::connect(&format!("sqlite://{}", dir.path().join("m.db").display()))
            .await
            .expect("connect");
        let sha = "cd".repeat(32);
        let mut m = ModelRecord::new(&sha, "x.safetensors", "lora", "sd1", "downloading");
        m.download = Some(serde_json::json!({"url": "https://civitai.com/api/download/models/1"}));
        assert!(repo.insert_model_if_absent(&m).await.expect("insert"));
        m.name = "other".into();
        assert!(
            !repo.insert_model_if_absent(&m).await.expect("insert"),
            "second claim loses"
        );
        let got = repo.get_model(&sha).await.expect("get").expect("row");
        assert_eq!(got.name, "x", "the first record stays");
        assert_eq!(got.download, m.download);
        assert!(repo
            .set_model_status(&sha, "failed", Some("boom"))
            .await
            .expect("status"));
        let f = ModelFilter {
            status: Some("failed".into()),
            ..Default::default()
        };
        let failed = repo.list_models(&f).await.expect("list");
        assert_eq!(failed.len(), 1);
        assert_eq!(failed[0].error.as_deref(), Some("boom"));
        assert!(!repo
            .set_model_status(&"ee".repeat(32), "failed", None)
            .await
            .expect("status"));
    }
}
