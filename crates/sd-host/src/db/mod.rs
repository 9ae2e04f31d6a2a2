//! Metadata repository. Handlers see only the traits here; `sqlite` is the embedded implementation and a
//! PostgreSQL one is a second `impl`, chosen by the database URL's scheme.

use std::sync::Arc;

use async_trait::async_trait;

pub mod images;
pub mod models;
pub mod sqlite;
pub mod tasks;

pub use images::{ImageRecord, ImageRepo};
pub use models::{ModelFilter, ModelRecord, ModelRepo};
pub use tasks::{TaskRecord, TaskRepo, TaskStatus};

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("not found")]
    NotFound,
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("unsupported database url {0:?} (supported: sqlite://PATH)")]
    UnsupportedUrl(String),
    #[error("database error: {0}")]
    Sqlx(#[from] sqlx::Error),
    #[error("migration error: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("corrupt row: {0}")]
    Corrupt(String),
}

pub type DbResult<T> = Result<T, DbError>;

/// Small key/value settings (A1111 options and the like).
#[async_trait]
pub trait SettingsRepo: Send + Sync {
    async fn ping(&self) -> DbResult<()>;
    async fn get_setting(&self, key: &str) -> DbResult<Option<String>>;
    async fn set_setting(&self, key: &str, value: &str) -> DbResult<()>;
}

/// Everything the host stores, composed of one small trait per resource.
pub trait Repo: SettingsRepo + ModelRepo + ImageRepo + TaskRepo {}
impl<T: SettingsRepo + ModelRepo + ImageRepo + TaskRepo> Repo for T {}

pub type DynRepo = Arc<dyn Repo>;

/// Opens the repository named by `url` and applies migrations.
pub async fn connect(url: &str) -> DbResult<DynRepo> {
    if url.starts_with("sqlite:") {
        Ok(Arc::new(sqlite::SqliteRepo::connect(url).await?))
    } else {
        Err(DbError::UnsupportedUrl(
            url.split('@').next_back().unwrap_or("").to_string(),
        ))
    }
}

pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}
