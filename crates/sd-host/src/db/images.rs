//! Image records and their attributes. A row is only written after its blob is durable.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::sqlite::SqliteRepo;
use super::DbResult;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct ImageRecord {
    pub hash: String,
    /// png | jpeg | webp
    pub format: String,
    pub width: i64,
    pub height: i64,
    pub bytes: i64,
    pub created_at: i64,
    pub task_id: Option<String>,
    /// Checkpoint sha256.
    pub model: Option<String>,
    pub prompt: Option<String>,
    pub negative_prompt: Option<String>,
    pub seed: Option<i64>,
    pub steps: Option<i64>,
    pub guidance_scale: Option<f64>,
    pub scheduler: Option<String>,
    /// Full generation parameters.
    #[schema(value_type = Object)]
    pub params: Option<serde_json::Value>,
}

#[async_trait]
pub trait ImageRepo: Send + Sync {
    /// Insert the row and its attributes in one transaction; an existing hash keeps its row
    /// (identical bytes are one image) but gains the attributes.
    async fn insert_image(
        &self,
        img: &ImageRecord,
        attributes: &serde_json::Map<String, serde_json::Value>,
    ) -> DbResult<()>;
    async fn get_image(&self, hash: &str) -> DbResult<Option<ImageRecord>>;
}

type Row = (
    String,
    String,
    i64,
    i64,
    i64,
    i64,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<i64>,
    Option<i64>,
    Option<f64>,
    Option<String>,
    Option<String>,
);

pub(crate) const IMAGE_COLS: &str = "hash, format, width, height, bytes, created_at, task_id, model, prompt, negative_prompt, seed, steps, guidance_scale, scheduler, params";

pub(crate) fn image_from_row(r: Row) -> ImageRecord {
    ImageRecord {
        hash: r.0,
        format: r.1,
        width: r.2,
        height: r.3,
        bytes: r.4,
        created_at: r.5,
        task_id: r.6,
        model: r.7,
        prompt: r.8,
        negative_prompt: r.9,
        seed: r.10,
        steps: r.11,
        guidance_scale: r.12,
        scheduler: r.13,
        params: r.14.and_then(|s| serde_json::from_str(&s).ok()),
    }
}

/// Attribute values are stored as text: strings as-is, everything else as its JSON.
pub fn attr_text(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[async_trait]
impl ImageRepo for SqliteRepo {
    async fn insert_image(
        &self,
        img: &ImageRecord,
        attributes: &serde_json::Map<String, serde_json::Value>,
    ) -> DbResult<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(&format!(
            "INSERT INTO images ({IMAGE_COLS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT (hash) DO NOTHING"
        ))
        .bind(&img.hash)
        .bind(&img.format)
        .bind(img.width)
        .bind(img.height)
        .bind(img.bytes)
        .bind(img.created_at)
        .bind(&img.task_id)
        .bind(&img.model)
        .bind(&img.prompt)
        .bind(&img.negative_prompt)
        .bind(img.seed)
        .bind(img.steps)
        .bind(img.guidance_scale)
        .bind(&img.scheduler)
        .bind(img.params.as_ref().map(|p| p.to_string()))
        .execute(&mut *tx)
        .await?;
        for (k, v) in attributes {
            if v.is_null() {
                continue;
            }
            sqlx::query(
                "INSERT INTO image_attributes (hash, key, value) VALUES (?,?,?) \
                 ON CONFLICT (hash, key) DO UPDATE SET value = excluded.value",
            )
            .bind(&img.hash)
            .bind(k)
            .bind(attr_text(v))
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn get_image(&self, hash: &str) -> DbResult<Option<ImageRecord>> {
        let row: Option<Row> =
            sqlx::query_as(&format!("SELECT {IMAGE_COLS} FROM images WHERE hash = ?"))
                .bind(hash)
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.map(image_from_row))
    }
}
