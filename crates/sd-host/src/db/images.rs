//! Image records and their attributes. A row is only written after its blob is durable.

use std::collections::HashSet;

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
    /// Attributes of several images at once (every hash asked for is a key).
    async fn attributes_of(
        &self,
        hashes: &[String],
    ) -> DbResult<std::collections::HashMap<String, serde_json::Map<String, serde_json::Value>>>;
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

/// A bind value of a built query.
#[derive(Debug, Clone)]
enum Bind {
    Text(String),
    Int(i64),
}

/// Conditions on the `images` row (alias `i`) other than attributes, with their binds.
fn image_conditions(q: &ImageQuery, sql: &mut String, binds: &mut Vec<Bind>) {
    if let Some(m) = &q.model {
        if m.len() == 64 {
            sql.push_str(" AND i.model = ?");
            binds.push(Bind::Text(m.clone()));
        } else {
            sql.push_str(" AND i.model LIKE ? ESCAPE '\\'");
            binds.push(Bind::Text(format!("{}%", like_escape(m))));
        }
    }
    if let Some(t) = &q.task_id {
        sql.push_str(" AND i.task_id = ?");
        binds.push(Bind::Text(t.clone()));
    }
    if let Some(text) = &q.q {
        sql.push_str(" AND LOWER(i.prompt) LIKE ? ESCAPE '\\'");
        binds.push(Bind::Text(format!(
            "%{}%",
            like_escape(&text.to_lowercase())
        )));
    }
}

fn has_image_conditions(q: &ImageQuery) -> bool {
    q.model.is_some() || q.task_id.is_some() || q.q.is_some()
}

fn bind_all<'q, O>(
    mut query: sqlx::query::QueryAs<'q, sqlx::Sqlite, O, sqlx::sqlite::SqliteArguments<'q>>,
    binds: &'q [Bind],
) -> sqlx::query::QueryAs<'q, sqlx::Sqlite, O, sqlx::sqlite::SqliteArguments<'q>> {
    for b in binds {
        query = match b {
            Bind::Text(t) => query.bind(t),
            Bind::Int(i) => query.bind(*i),
        };
    }
    query
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
                "INSERT INTO image_attributes (hash, key, value, json, created_at) \
                 VALUES (?,?,?,?,(SELECT created_at FROM images WHERE hash = ?)) \
                 ON CONFLICT (hash, key) DO UPDATE SET value = excluded.value, json = excluded.json",
            )
            .bind(&img.hash)
            .bind(k)
            .bind(attr_text(v))
            .bind(v.to_string())
            .bind(&img.hash)
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
                    "INSERT INTO image_attributes (hash, key, value, json, created_at) \
                     VALUES (?,?,?,?,(SELECT created_at FROM images WHERE hash = ?)) \
                     ON CONFLICT (hash, key) DO UPDATE SET value = excluded.value, json = excluded.json",
                )
                .bind(hash)
                .bind(k)
                .bind(attr_text(v))
                .bind(v.to_string())
                .bind(hash)
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
        let mut binds: Vec<Bind> = Vec::new();
        // (FROM + WHERE, the column that orders the matches, the matched hash column)
        let (from_where, order_col, hash_col) = if q.attrs.is_empty() {
            let mut sql = String::from(" FROM images i WHERE 1=1");
            image_conditions(q, &mut sql, &mut binds);
            if let Some(b) = q.before {
                sql.push_str(" AND i.created_at < ?");
                binds.push(Bind::Int(b));
            }
            if let Some(a) = q.after {
                sql.push_str(" AND i.created_at > ?");
                binds.push(Bind::Int(a));
            }
            (sql, "i.created_at", "i.hash")
        } else {
            // Drive from the rarest attribute: its (key, value, created_at) index range is already in
            // display order; the other attributes are primary-key probes per candidate.
            let mut counted = Vec::with_capacity(q.attrs.len());
            for (k, v) in &q.attrs {
                let (n,): (i64,) = sqlx::query_as(
                    "SELECT COUNT(*) FROM image_attributes WHERE key = ? AND value = ?",
                )
                .bind(k)
                .bind(v)
                .fetch_one(&self.pool)
                .await?;
                if n == 0 {
                    return Ok((Vec::new(), 0));
                }
                counted.push((n, k, v));
            }
            counted.sort_by_key(|(n, _, _)| *n);
            let mut sql = String::from(" FROM image_attributes a");
            if has_image_conditions(q) {
                sql.push_str(" JOIN images i ON i.hash = a.hash");
            }
            sql.push_str(" WHERE a.key = ? AND a.value = ?");
            binds.push(Bind::Text(counted[0].1.clone()));
            binds.push(Bind::Text(counted[0].2.clone()));
            for (_, k, v) in &counted[1..] {
                sql.push_str(
                    " AND EXISTS (SELECT 1 FROM image_attributes b \
                     WHERE b.hash = a.hash AND b.key = ? AND b.value = ?)",
                );
                binds.push(Bind::Text((*k).clone()));
                binds.push(Bind::Text((*v).clone()));
            }
            image_conditions(q, &mut sql, &mut binds);
            if let Some(b) = q.before {
                sql.push_str(" AND a.created_at < ?");
                binds.push(Bind::Int(b));
            }
            if let Some(a) = q.after {
                sql.push_str(" AND a.created_at > ?");
                binds.push(Bind::Int(a));
            }
            (sql, "a.created_at", "a.hash")
        };
        // Page of hashes first (index order), then only those rows are read in full.
        let page_sql = format!(
            "SELECT {hash_col}{from_where} ORDER BY {order_col} DESC, {hash_col} DESC LIMIT ? OFFSET ?"
        );
        let mut page_binds = binds.clone();
        page_binds.push(Bind::Int(q.limit));
        page_binds.push(Bind::Int(q.offset));
        let hashes: Vec<(String,)> = bind_all(sqlx::query_as(&page_sql), &page_binds)
            .fetch_all(&self.pool)
            .await?;
        let mut rows = Vec::with_capacity(hashes.len());
        if !hashes.is_empty() {
            let marks = vec!["?"; hashes.len()].join(",");
            let sql = format!(
                "SELECT {IMAGE_COLS} FROM images WHERE hash IN ({marks}) ORDER BY created_at DESC, hash DESC"
            );
            let mut query = sqlx::query_as::<_, Row>(&sql);
            for (h,) in &hashes {
                query = query.bind(h);
            }
            rows = query.fetch_all(&self.pool).await?;
        }
        let count_sql = format!("SELECT COUNT(*){from_where}");
        let (total,): (i64,) = bind_all(sqlx::query_as(&count_sql), &binds)
            .fetch_one(&self.pool)
            .await?;
        Ok((rows.into_iter().map(image_from_row).collect(), total))
    }

    async fn attributes_of(
        &self,
        hashes: &[String],
    ) -> DbResult<std::collections::HashMap<String, serde_json::Map<String, serde_json::Value>>>
    {
        let mut grouped: std::collections::HashMap<String, Vec<(String, String, Option<String>)>> =
            hashes.iter().map(|h| (h.clone(), Vec::new())).collect();
        for chunk in hashes.chunks(500) {
            let marks = vec!["?"; chunk.len()].join(",");
            let sql = format!(
                "SELECT hash, key, value, json FROM image_attributes WHERE hash IN ({marks}) ORDER BY hash, key"
            );
            let mut query = sqlx::query_as::<_, (String, String, String, Option<String>)>(&sql);
            for h in chunk {
                query = query.bind(h);
            }
            for (h, k, v, j) in query.fetch_all(&self.pool).await? {
                grouped.entry(h).or_default().push((k, v, j));
            }
        }
        Ok(grouped
            .into_iter()
            .map(|(h, rows)| (h, attrs_from_rows(rows)))
            .collect())
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
