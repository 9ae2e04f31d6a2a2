//! Uploaded img2img sources and masks, kept under `<data_dir>/inputs/<sha256>` while a task may still
//! run (a task re-queued after a crash needs them again), and removed once no active task uses them.

use std::collections::HashSet;
use std::time::{Duration, SystemTime};

use crate::db::{DbResult, TaskStatus};
use crate::state::AppState;

/// Stores an upload atomically under its SHA-256; identical uploads share one file.
pub fn store(state: &AppState, bytes: &[u8]) -> std::io::Result<String> {
    let sha = crate::storage::sha256_hex(bytes);
    crate::util::write_file_atomic(&state.inputs_dir().join(&sha), bytes)?;
    Ok(sha)
}

/// Input files named by pending or processing tasks.
async fn in_use(state: &AppState) -> DbResult<HashSet<String>> {
    let mut active = state.repo.list_pending().await?;
    active.extend(
        state
            .repo
            .list_tasks(Some(TaskStatus::Processing), 0, 1000)
            .await?
            .0,
    );
    Ok(active
        .iter()
        .flat_map(|t| ["init_image", "mask"].map(|k| t.params.get(k).and_then(|v| v.as_str())))
        .flatten()
        .map(str::to_string)
        .collect())
}

/// Deletes input files (and temp files left by a crash) that no active task uses and that are
/// older than `min_age` (a submission writes its input just before its task row). Returns how many.
pub async fn sweep_unused(state: &AppState, min_age: Duration) -> DbResult<usize> {
    let dir = state.inputs_dir();
    let keep = in_use(state).await?;
    let removed = tokio::task::spawn_blocking(move || {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return 0; // no uploads yet
        };
        let now = SystemTime::now();
        let mut removed = 0;
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            let old_enough = e
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| now.duration_since(t).unwrap_or_default() >= min_age);
            if keep.contains(&name) || !old_enough || !e.file_type().is_ok_and(|t| t.is_file()) {
                continue;
            }
            match std::fs::remove_file(e.path()) {
                Ok(()) => removed += 1,
                Err(err) => {
                    tracing::warn!(file = %name, error = %err, "sweep: removing input failed")
                }
            }
        }
        removed
    })
    .await
    .unwrap_or(0);
    if removed > 0 {
        tracing::info!(removed, "sweep removed task inputs no active task uses");
    }
    Ok(removed)
}
