//! Image records and their attributes. A row is only written after its blob is durable.

use std::collections::HashSet;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use sqlx::Row as _;

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
    /// The image's attributes with their JSON types.
    async fn get_image_attributes(
        &self,
        hash: &str,
    ) -> DbResult<serde_json::Map<String, serde_json::Value>>;
    /// Merges `patch` into the attributes in one transaction (`null` removes a key); `None` if no such image.
    async fn merge_image_attributes(
        &self,
        hash: &str,
        patch: &serde_json::Map<String, serde_json::Value>,
    ) -> DbResult<Option<serde_json::Map<String, serde_json::Value>>>;
    /// One page of matching images, newest first, and the number of matches.
    async fn query_images(&self, q: &ImageQuery) -> DbResult<(Vec<ImageRecord>, i64)>;
    /// Removes the rows (and their attributes) of `hashes`; returns those that existed.
    async fn delete_images(&self, hashes: &[String]) -> DbResult<Vec<String>>;
    /// Which of `hashes` have a row (for the orphan sweep).
    async fn existing_images(&self, hashes: &[String]) -> DbResult<HashSet<String>>;
    /// (count, total bytes) per format.
    async fn image_stats(&self) -> DbResult<Vec<(String, i64, i64)>>;
}

/// Filters of `GET /images`. Every filter is AND-ed.
#[derive(Debug, Clone, Default)]
pub struct ImageQuery {
    /// `attr.KEY=VALUE` pairs; values compared as [`attr_text`].
    pub attrs: Vec<(String, String)>,
    /// Full checkpoint sha256, or a hex prefix (A1111's short hash).
    pub model: Option<String>,
    pub task_id: Option<String>,
    /// Case-insensitive substring of the prompt.
    pub q: Option<String>,
    /// Milliseconds since the epoch, exclusive.
    pub before: Option<i64>,
    pub after: Option<i64>,
    pub limit: i64,
    pub offset: i64,
}

/// `%`, `_` and the escape char itself are literal in a substring search.
fn like_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    for c in s.chars() {
        if matches!(c, '%' | '_' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The WHERE clause of a query and its bind values, in order.
fn where_clause(q: &ImageQuery) -> (String, Vec<String>) {
    let mut sql = String::from(" WHERE 1=1");
    let mut binds = Vec::new();
    for (k, v) in &q.attrs {
        // Each filter is an index range on image_attributes (key, value, hash).
        sql.push_str(
            " AND hash IN (SELECT hash FROM image_attributes WHERE key = ? AND value = ?)",
        );
        binds.push(k.clone());
        binds.push(v.clone());
    }
    if let Some(m) = &q.model {
        if m.len() == 64 {
            sql.push_str(" AND model = ?");
            binds.push(m.clone());
        } else {
            sql.push_str(" AND model LIKE ? ESCAPE '\\'");
            binds.push(format!("{}%", like_escape(m)));
        }
    }
    if let Some(t) = &q.task_id {
        sql.push_str(" AND task_id = ?");
        binds.push(t.clone());
    }
    if let Some(text) = &q.q {
        sql.push_str(" AND LOWER(prompt) LIKE ? ESCAPE '\\'");
        binds.push(format!("%{}%", like_escape(&text.to_lowercase())));
    }
    (sql, binds)
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
                "INSERT INTO image_attributes (hash, key, value, json) VALUES (?,?,?,?) \
                 ON CONFLICT (hash, key) DO UPDATE SET value = excluded.value, json = excluded.json",
            )
            .bind(&img.hash)
            .bind(k)
            .bind(attr_text(v))
            .bind(v.to_string())
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

    async fn get_image_attributes(
        &self,
        hash: &str,
    ) -> DbResult<serde_json::Map<String, serde_json::Value>> {
        let rows: Vec<(String, String, Option<String>)> = sqlx::query_as(
            "SELECT key, value, json FROM image_attributes WHERE hash = ? ORDER BY key",
        )
        .bind(hash)
        .fetch_all(&self.pool)
        .await?;
        Ok(attrs_from_rows(rows))
    }

    async fn merge_image_attributes(
        &self,
        hash: &str,
        patch: &serde_json::Map<String, serde_json::Value>,
    ) -> DbResult<Option<serde_json::Map<String, serde_json::Value>>> {
        let mut tx = self.pool.begin().await?;
        let exists: Option<(String,)> = sqlx::query_as("SELECT hash FROM images WHERE hash = ?")
            .bind(hash)
            .fetch_optional(&mut *tx)
            .await?;
        if exists.is_none() {
            return Ok(None);
        }
        for (k, v) in patch {
            if v.is_null() {
                sqlx::query("DELETE FROM image_attributes WHERE hash = ? AND key = ?")
                    .bind(hash)
                    .bind(k)
                    .execute(&mut *tx)
                    .await?;
            } else {
                sqlx::query(
                    "INSERT INTO image_attributes (hash, key, value, json) VALUES (?,?,?,?) \
                     ON CONFLICT (hash, key) DO UPDATE SET value = excluded.value, json = excluded.json",
                )
                .bind(hash)
                .bind(k)
                .bind(attr_text(v))
                .bind(v.to_string())
                .execute(&mut *tx)
                .await?;
            }
        }
        let rows: Vec<(String, String, Option<String>)> = sqlx::query_as(
            "SELECT key, value, json FROM image_attributes WHERE hash = ? ORDER BY key",
        )
        .bind(hash)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Some(attrs_from_rows(rows)))
    }

    async fn query_images(&self, q: &ImageQuery) -> DbResult<(Vec<ImageRecord>, i64)> {
        let (mut wh, binds) = where_clause(q);
        let mut time_binds = Vec::new();
        if let Some(b) = q.before {
            wh.push_str(" AND created_at < ?");
            time_binds.push(b);
        }
        if let Some(a) = q.after {
            wh.push_str(" AND created_at > ?");
            time_binds.push(a);
        }
        let list_sql = format!(
            "SELECT {IMAGE_COLS} FROM images{wh} ORDER BY created_at DESC, hash DESC LIMIT ? OFFSET ?"
        );
        let mut list = sqlx::query_as::<_, Row>(&list_sql);
        for b in &binds {
            list = list.bind(b);
        }
        for t in &time_binds {
            list = list.bind(t);
        }
        let rows = list
            .bind(q.limit)
            .bind(q.offset)
            .fetch_all(&self.pool)
            .await?;
        let count_sql = format!("SELECT COUNT(*) FROM images{wh}");
        let mut count = sqlx::query(&count_sql);
        for b in &binds {
            count = count.bind(b);
        }
        for t in &time_binds {
            count = count.bind(t);
        }
        let total: i64 = count.fetch_one(&self.pool).await?.try_get(0)?;
        Ok((rows.into_iter().map(image_from_row).collect(), total))
    }

    async fn delete_images(&self, hashes: &[String]) -> DbResult<Vec<String>> {
        let mut tx = self.pool.begin().await?;
        let mut deleted = Vec::new();
        for h in hashes {
            // Attributes first: the foreign key cascade is not relied on (SQLite enforces it only when enabled).
            sqlx::query("DELETE FROM image_attributes WHERE hash = ?")
                .bind(h)
                .execute(&mut *tx)
                .await?;
            let r = sqlx::query("DELETE FROM images WHERE hash = ?")
                .bind(h)
                .execute(&mut *tx)
                .await?;
            if r.rows_affected() > 0 {
                deleted.push(h.clone());
            }
        }
        tx.commit().await?;
        Ok(deleted)
    }

    async fn existing_images(&self, hashes: &[String]) -> DbResult<HashSet<String>> {
        let mut found = HashSet::new();
        for chunk in hashes.chunks(500) {
            let marks = vec!["?"; chunk.len()].join(",");
            let sql = format!("SELECT hash FROM images WHERE hash IN ({marks})");
            let mut query = sqlx::query_as::<_, (String,)>(&sql);
            for h in chunk {
                query = query.bind(h);
            }
            found.extend(query.fetch_all(&self.pool).await?.into_iter().map(|r| r.0));
        }
        Ok(found)
    }

    async fn image_stats(&self) -> DbResult<Vec<(String, i64, i64)>> {
        let rows: Vec<(String, i64, Option<i64>)> = sqlx::query_as(
            "SELECT format, COUNT(*), SUM(bytes) FROM images GROUP BY format ORDER BY format",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(f, n, b)| (f, n, b.unwrap_or(0)))
            .collect())
    }
}

/// Attribute rows → JSON values (rows written before the `json` column read back as strings).
fn attrs_from_rows(
    rows: Vec<(String, String, Option<String>)>,
) -> serde_json::Map<String, serde_json::Value> {
    rows.into_iter()
        .map(|(k, text, json)| {
            let v = json
                .and_then(|j| serde_json::from_str(&j).ok())
                .unwrap_or(serde_json::Value::String(text));
            (k, v)
        })
        .collect()
}
