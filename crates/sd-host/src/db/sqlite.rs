//! The embedded SQLite implementation (WAL, synchronous=FULL so an acknowledged write survives a crash).

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::SqlitePool;

use super::{DbResult, SettingsRepo};

pub struct SqliteRepo {
    pub(crate) pool: SqlitePool,
}

impl SqliteRepo {
    pub async fn connect(url: &str) -> DbResult<Self> {
        let opts = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .connect_with(opts)
            .await?;
        sqlx::migrate!("./migrations/sqlite").run(&pool).await?;
        Ok(Self { pool })
    }
}

#[async_trait]
impl SettingsRepo for SqliteRepo {
    async fn ping(&self) -> DbResult<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn get_setting(&self, key: &str) -> DbResult<Option<String>> {
        Ok(
            sqlx::query_scalar("SELECT value FROM settings WHERE key = ?")
                .bind(key)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    async fn set_setting(&self, key: &str, value: &str) -> DbResult<()> {
        sqlx::query(
            "INSERT INTO settings (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        )
        .bind(key)
        .bind(value)
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn settings_round_trip_and_persist() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("t.db").display());
        let repo = SqliteRepo::connect(&url).await.unwrap();
        repo.ping().await.unwrap();
        assert_eq!(repo.get_setting("a").await.unwrap(), None);
        repo.set_setting("a", "1").await.unwrap();
        repo.set_setting("a", "2").await.unwrap();
        drop(repo);
        let again = SqliteRepo::connect(&url).await.unwrap();
        assert_eq!(again.get_setting("a").await.unwrap().as_deref(), Some("2"));
    }
}
