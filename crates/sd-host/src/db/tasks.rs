//! Task rows: the persistent queue. A task is committed here before the API acknowledges it.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::sqlite::SqliteRepo;
use super::{now_ms, DbResult};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum TaskStatus {
    Pending,
    Processing,
    Completed,
    Failed,
    Cancelled,
}

impl TaskStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            TaskStatus::Pending => "pending",
            TaskStatus::Processing => "processing",
            TaskStatus::Completed => "completed",
            TaskStatus::Failed => "failed",
            TaskStatus::Cancelled => "cancelled",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pending" => TaskStatus::Pending,
            "processing" => TaskStatus::Processing,
            "completed" => TaskStatus::Completed,
            "failed" => TaskStatus::Failed,
            "cancelled" => TaskStatus::Cancelled,
            _ => return None,
        })
    }
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            TaskStatus::Completed | TaskStatus::Failed | TaskStatus::Cancelled
        )
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct TaskRecord {
    pub id: String,
    /// Submission order (FIFO within a priority); `to: front` gives a task a lower one.
    pub seq: i64,
    pub status: TaskStatus,
    pub priority: i64,
    pub model_sha256: Option<String>,
    /// Canonical LoRA set (`sha:weight,...`), for smart scheduling.
    pub lora_key: String,
    /// The validated, resolved request (seed included).
    pub params: serde_json::Value,
    pub callback_url: Option<String>,
    /// How many times the task was started (crash recovery re-queues once).
    pub attempts: i64,
    pub error_message: Option<String>,
    /// Hashes of the stored images, in order.
    pub images: Vec<String>,
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub updated_at: i64,
    pub finished_at: Option<i64>,
}

#[async_trait]
pub trait TaskRepo: Send + Sync {
    /// Inserts a pending task, giving it the next `seq`; returns the stored record.
    async fn insert_task(&self, t: &TaskRecord) -> DbResult<TaskRecord>;
    async fn get_task(&self, id: &str) -> DbResult<Option<TaskRecord>>;
    /// Newest first; returns the page and the total count.
    async fn list_tasks(
        &self,
        status: Option<TaskStatus>,
        offset: i64,
        limit: i64,
    ) -> DbResult<(Vec<TaskRecord>, i64)>;
    /// Pending tasks in queue order: priority desc, then seq asc.
    async fn list_pending(&self) -> DbResult<Vec<TaskRecord>>;
    /// pending → processing (attempts + 1). False if it was no longer pending.
    async fn mark_processing(&self, id: &str) -> DbResult<bool>;
    /// pending|processing → a terminal status. False if the task had already finished.
    async fn finish_task(
        &self,
        id: &str,
        status: TaskStatus,
        images: &[String],
        error: Option<&str>,
    ) -> DbResult<bool>;
    /// Sets the priority of pending tasks; returns how many changed.
    async fn set_priority(&self, ids: &[String], priority: i64) -> DbResult<u64>;
    /// Moves pending tasks ahead of every other pending task, keeping their given order.
    async fn move_to_front(&self, ids: &[String]) -> DbResult<u64>;
    /// At start: processing tasks go back to pending once; a second interruption fails them.
    /// Returns (requeued, failed).
    async fn recover_interrupted(&self, max_attempts: i64) -> DbResult<(u64, u64)>;
    /// Pending or processing tasks that use this model.
    async fn active_tasks_for_model(&self, sha256: &str) -> DbResult<Vec<String>>;
    /// Finished tasks whose result callback is still owed (oldest first).
    async fn callbacks_due(&self) -> DbResult<Vec<String>>;
    /// The callback was delivered, or its retries ran out.
    async fn callback_settled(&self, id: &str) -> DbResult<()>;
}

type Row = (
    String,
    i64,
    String,
    i64,
    Option<String>,
    String,
    String,
    Option<String>,
    i64,
    Option<String>,
    String,
    i64,
    Option<i64>,
    i64,
    Option<i64>,
);

const COLS: &str = "id, seq, status, priority, model_sha256, lora_key, params, callback_url, attempts, error_message, images, created_at, started_at, updated_at, finished_at";

fn from_row(r: Row) -> DbResult<TaskRecord> {
    Ok(TaskRecord {
        id: r.0,
        seq: r.1,
        status: TaskStatus::parse(&r.2)
            .ok_or_else(|| super::DbError::Corrupt(format!("task status {:?}", r.2)))?,
        priority: r.3,
        model_sha256: r.4,
        lora_key: r.5,
        params: serde_json::from_str(&r.6)
            .map_err(|e| super::DbError::Corrupt(format!("task params: {e}")))?,
        callback_url: r.7,
        attempts: r.8,
        error_message: r.9,
        images: serde_json::from_str(&r.10).unwrap_or_default(),
        created_at: r.11,
        started_at: r.12,
        updated_at: r.13,
        finished_at: r.14,
    })
}

fn rows(rows: Vec<Row>) -> DbResult<Vec<TaskRecord>> {
    rows.into_iter().map(from_row).collect()
}

#[async_trait]
impl TaskRepo for SqliteRepo {
    async fn insert_task(&self, t: &TaskRecord) -> DbResult<TaskRecord> {
        // One statement: the next seq is computed under the write lock, so concurrent submissions
        // never read the same MAX(seq) (a read-then-write transaction would fail with BUSY).
        let seq: i64 = sqlx::query_scalar(&format!(
            "INSERT INTO tasks ({COLS}) SELECT ?, COALESCE(MAX(seq), 0) + 1, ?,?,?,?,?,?,?,?,?,?,?,?,? FROM tasks RETURNING seq"
        ))
        .bind(&t.id)
        .bind(t.status.as_str())
        .bind(t.priority)
        .bind(&t.model_sha256)
        .bind(&t.lora_key)
        .bind(t.params.to_string())
        .bind(&t.callback_url)
        .bind(t.attempts)
        .bind(&t.error_message)
        .bind(serde_json::to_string(&t.images).unwrap_or_else(|_| "[]".into()))
        .bind(t.created_at)
        .bind(t.started_at)
        .bind(t.updated_at)
        .bind(t.finished_at)
        .fetch_one(&self.pool)
        .await?;
        let mut rec = t.clone();
        rec.seq = seq;
        Ok(rec)
    }

    async fn get_task(&self, id: &str) -> DbResult<Option<TaskRecord>> {
        let row: Option<Row> = sqlx::query_as(&format!("SELECT {COLS} FROM tasks WHERE id = ?"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(from_row).transpose()
    }

    async fn list_tasks(
        &self,
        status: Option<TaskStatus>,
        offset: i64,
        limit: i64,
    ) -> DbResult<(Vec<TaskRecord>, i64)> {
        let st = status.map(|s| s.as_str());
        let page: Vec<Row> = sqlx::query_as(&format!(
            "SELECT {COLS} FROM tasks WHERE (? IS NULL OR status = ?) ORDER BY created_at DESC, seq DESC LIMIT ? OFFSET ?"
        ))
        .bind(st)
        .bind(st)
        .bind(limit)
        .bind(offset)
        .fetch_all(&self.pool)
        .await?;
        let total: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM tasks WHERE (? IS NULL OR status = ?)")
                .bind(st)
                .bind(st)
                .fetch_one(&self.pool)
                .await?;
        Ok((rows(page)?, total))
    }

    async fn list_pending(&self) -> DbResult<Vec<TaskRecord>> {
        let r: Vec<Row> = sqlx::query_as(&format!(
            "SELECT {COLS} FROM tasks WHERE status = 'pending' ORDER BY priority DESC, seq ASC"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows(r)
    }

    async fn mark_processing(&self, id: &str) -> DbResult<bool> {
        let now = now_ms();
        let r = sqlx::query(
            "UPDATE tasks SET status = 'processing', attempts = attempts + 1, started_at = ?, updated_at = ? \
             WHERE id = ? AND status = 'pending'",
        )
        .bind(now)
        .bind(now)
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    async fn finish_task(
        &self,
        id: &str,
        status: TaskStatus,
        images: &[String],
        error: Option<&str>,
    ) -> DbResult<bool> {
        let now = now_ms();
        let r = sqlx::query(
            "UPDATE tasks SET status = ?, images = ?, error_message = ?, updated_at = ?, finished_at = ?, \
               callback_due = CASE WHEN callback_url IS NULL THEN 0 ELSE 1 END \
             WHERE id = ? AND status IN ('pending', 'processing')",
        )
        .bind(status.as_str())
        .bind(serde_json::to_string(images).unwrap_or_else(|_| "[]".into()))
        .bind(error)
        .bind(now)
        .bind(now)
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    async fn set_priority(&self, ids: &[String], priority: i64) -> DbResult<u64> {
        let mut tx = self.pool.begin().await?;
        let mut n = 0;
        for id in ids {
            n += sqlx::query(
                "UPDATE tasks SET priority = ?, updated_at = ? WHERE id = ? AND status = 'pending'",
            )
            .bind(priority)
            .bind(now_ms())
            .bind(id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        }
        tx.commit().await?;
        Ok(n)
    }

    async fn move_to_front(&self, ids: &[String]) -> DbResult<u64> {
        let mut tx = self.pool.begin().await?;
        let mut n = 0;
        // Last id first, so the first id ends up with the smallest seq. Each UPDATE reads the
        // current front inside its own write, so there is no read-then-write upgrade to fail.
        for id in ids.iter().rev() {
            n += sqlx::query(
                "UPDATE tasks SET \
                   priority = MAX(priority, COALESCE((SELECT MAX(priority) FROM tasks WHERE status = 'pending'), 0)), \
                   seq = (SELECT MIN(seq) FROM tasks) - 1, updated_at = ? \
                 WHERE id = ? AND status = 'pending'",
            )
            .bind(now_ms())
            .bind(id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        }
        tx.commit().await?;
        Ok(n)
    }

    async fn recover_interrupted(&self, max_attempts: i64) -> DbResult<(u64, u64)> {
        let mut tx = self.pool.begin().await?;
        let now = now_ms();
        let failed = sqlx::query(
            "UPDATE tasks SET status = 'failed', error_message = 'interrupted twice while processing (server stopped or crashed)', \
             updated_at = ?, finished_at = ?, callback_due = CASE WHEN callback_url IS NULL THEN 0 ELSE 1 END \
             WHERE status = 'processing' AND attempts >= ?",
        )
        .bind(now)
        .bind(now)
        .bind(max_attempts)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        let requeued = sqlx::query(
            "UPDATE tasks SET status = 'pending', updated_at = ? WHERE status = 'processing'",
        )
        .bind(now)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        tx.commit().await?;
        Ok((requeued, failed))
    }

    async fn active_tasks_for_model(&self, sha256: &str) -> DbResult<Vec<String>> {
        Ok(sqlx::query_scalar(
            "SELECT id FROM tasks WHERE status IN ('pending', 'processing') AND (model_sha256 = ? OR lora_key LIKE ?)",
        )
        .bind(sha256)
        .bind(format!("%{sha256}%"))
        .fetch_all(&self.pool)
        .await?)
    }

    async fn callbacks_due(&self) -> DbResult<Vec<String>> {
        Ok(sqlx::query_scalar(
            "SELECT id FROM tasks WHERE callback_due = 1 ORDER BY finished_at, seq",
        )
        .fetch_all(&self.pool)
        .await?)
    }

    async fn callback_settled(&self, id: &str) -> DbResult<()> {
        sqlx::query("UPDATE tasks SET callback_due = 0 WHERE id = ?")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(id: &str, priority: i64) -> TaskRecord {
        let now = now_ms();
        TaskRecord {
            id: id.into(),
            seq: 0,
            status: TaskStatus::Pending,
            priority,
            model_sha256: Some("m".into()),
            lora_key: String::new(),
            params: serde_json::json!({"prompt": id}),
            callback_url: None,
            attempts: 0,
            error_message: None,
            images: vec![],
            created_at: now,
            started_at: None,
            updated_at: now,
            finished_at: None,
        }
    }

    async fn repo() -> (tempfile::TempDir, SqliteRepo) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("t.db").display());
        let r = SqliteRepo::connect(&url).await.unwrap();
        (dir, r)
    }

    fn ids(v: &[TaskRecord]) -> Vec<&str> {
        v.iter().map(|t| t.id.as_str()).collect()
    }

    #[tokio::test]
    async fn pending_order_priority_then_fifo_and_front() {
        let (_d, r) = repo().await;
        for (id, p) in [("a", 0), ("b", 5), ("c", 0), ("d", 5)] {
            r.insert_task(&task(id, p)).await.unwrap();
        }
        assert_eq!(ids(&r.list_pending().await.unwrap()), ["b", "d", "a", "c"]);
        r.move_to_front(&["c".into(), "a".into()]).await.unwrap();
        assert_eq!(ids(&r.list_pending().await.unwrap()), ["c", "a", "b", "d"]);
        r.set_priority(&["d".into()], 9).await.unwrap();
        assert_eq!(ids(&r.list_pending().await.unwrap())[0], "d");
    }

    #[tokio::test]
    async fn concurrent_inserts_all_succeed_with_distinct_seqs() {
        let (_d, r) = repo().await;
        let r = std::sync::Arc::new(r);
        let mut joins = vec![];
        for i in 0..32 {
            let r = r.clone();
            joins.push(tokio::spawn(async move {
                r.insert_task(&task(&format!("t{i}"), 0)).await
            }));
        }
        let mut seqs = vec![];
        for j in joins {
            seqs.push(j.await.unwrap().unwrap().seq);
        }
        seqs.sort();
        seqs.dedup();
        assert_eq!(seqs.len(), 32);
        assert_eq!(r.list_pending().await.unwrap().len(), 32);
    }

    #[tokio::test]
    async fn lifecycle_and_recovery() {
        let (_d, r) = repo().await;
        r.insert_task(&task("a", 0)).await.unwrap();
        r.insert_task(&task("b", 0)).await.unwrap();
        assert!(r.mark_processing("a").await.unwrap());
        assert!(!r.mark_processing("a").await.unwrap());
        // first interruption: back to pending
        assert_eq!(r.recover_interrupted(2).await.unwrap(), (1, 0));
        assert!(r.mark_processing("a").await.unwrap());
        // second: failed with a reason
        assert_eq!(r.recover_interrupted(2).await.unwrap(), (0, 1));
        let a = r.get_task("a").await.unwrap().unwrap();
        assert_eq!(a.status, TaskStatus::Failed);
        assert!(a.error_message.unwrap().contains("interrupted"));
        assert!(r
            .finish_task("b", TaskStatus::Completed, &["h".into()], None)
            .await
            .unwrap());
        assert!(!r
            .finish_task("b", TaskStatus::Cancelled, &[], None)
            .await
            .unwrap());
        let b = r.get_task("b").await.unwrap().unwrap();
        assert_eq!(b.images, vec!["h".to_string()]);
        let (page, total) = r
            .list_tasks(Some(TaskStatus::Completed), 0, 10)
            .await
            .unwrap();
        assert_eq!((page.len(), total), (1, 1));
    }

    #[tokio::test]
    async fn a_callback_is_owed_from_the_terminal_update_until_settled() {
        let (_d, r) = repo().await;
        let mut with_cb = task("cb", 0);
        with_cb.callback_url = Some("http://example.com/hook".into());
        r.insert_task(&with_cb).await.unwrap();
        r.insert_task(&task("plain", 0)).await.unwrap();
        r.insert_task(&task("crashed", 0)).await.unwrap();
        let mut crashed_cb = task("crashed_cb", 0);
        crashed_cb.callback_url = Some("http://example.com/hook".into());
        r.insert_task(&crashed_cb).await.unwrap();
        assert!(
            r.callbacks_due().await.unwrap().is_empty(),
            "nothing finished yet"
        );
        r.finish_task("cb", TaskStatus::Completed, &[], None)
            .await
            .unwrap();
        r.finish_task("plain", TaskStatus::Completed, &[], None)
            .await
            .unwrap();
        // A task failed by crash recovery owes its callback too.
        for id in ["crashed", "crashed_cb"] {
            r.mark_processing(id).await.unwrap();
        }
        r.recover_interrupted(1).await.unwrap();
        assert_eq!(r.callbacks_due().await.unwrap(), ["cb", "crashed_cb"]);
        r.callback_settled("cb").await.unwrap();
        assert_eq!(r.callbacks_due().await.unwrap(), ["crashed_cb"]);
    }
}
