//! Scanning `models.dir`: hash new files, detect type and family from the safetensors header, store records.

use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::db::{DynRepo, ModelRecord};

/// Read size for hashing: large enough that syscalls are noise next to SHA-NI throughput.
const HASH_BUF: usize = 4 << 20;

/// Streaming SHA-256 of a file (lowercase hex).
pub fn hash_file(path: &Path) -> std::io::Result<String> {
    hash_file_with(path, &mut |_| {})
}

/// Streaming SHA-256 of a file; `progress` gets the bytes hashed so far after every block.
/// sha2 picks its SHA-NI / AVX2 backend at run time, so no extra feature is needed.
pub fn hash_file_with(path: &Path, progress: &mut dyn FnMut(u64)) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; HASH_BUF];
    let mut done = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        done += n as u64;
        progress(done);
    }
    Ok(hex::encode(h.finalize()))
}

/// (type, family) of a safetensors file from its header alone.
pub fn classify(path: &Path) -> (String, String) {
    use sd_engine::detect::{detect, ModelKind};
    let Ok(header) = sd_engine::safetensors_file::read_header(path) else {
        return ("unknown".into(), "unknown".into());
    };
    match detect(&header) {
        ModelKind::Checkpoint(info) => ("checkpoint".into(), info.family.as_str().into()),
        ModelKind::Lora { family } => (
            "lora".into(),
            family
                .map(|f| f.as_str().to_string())
                .unwrap_or_else(|| "unknown".into()),
        ),
        ModelKind::Vae => ("vae".into(), "unknown".into()),
        ModelKind::Embedding => ("embedding".into(), "unknown".into()),
        ModelKind::Unknown => ("unknown".into(), "unknown".into()),
    }
}

fn safetensors_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        let Ok(ft) = e.file_type() else { continue };
        if ft.is_dir() {
            safetensors_files(&p, out);
        } else if ft.is_file() && p.extension().is_some_and(|x| x == "safetensors") {
            out.push(p);
        }
    }
}

/// Hashing progress of one file during a scan.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ScanProgress {
    pub file: String,
    /// 1-based index among the files that need hashing.
    pub index: usize,
    pub files: usize,
    pub hashed_bytes: u64,
    pub total_bytes: u64,
}

#[derive(Debug, Clone, Default, serde::Serialize, utoipa::ToSchema)]
pub struct ScanReport {
    /// Every model file found under `models.dir`.
    pub found: usize,
    /// Files hashed this time (new or changed since the last scan).
    pub hashed: usize,
    /// sha256 of the files hashed this time.
    pub new: Vec<String>,
    /// sha256 of ready models whose file has disappeared (now marked failed).
    pub missing: Vec<String>,
}

fn mtime_ms(meta: &std::fs::Metadata) -> Option<i64> {
    meta.modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_millis() as i64)
}

/// Registers every `.safetensors` under `dir` that is not known yet (by path + size + mtime).
/// Returns the records of the files found.
pub async fn scan(repo: &DynRepo, dir: &Path) -> anyhow::Result<Vec<ModelRecord>> {
    // Hashing a multi-GB checkpoint takes seconds: say which file the start-up is busy with.
    let log = |p: ScanProgress| {
        if p.hashed_bytes == p.total_bytes {
            tracing::info!(file = %p.file, index = p.index, files = p.files, bytes = p.total_bytes, "hashed model file");
        }
    };
    Ok(scan_with(repo, dir, log).await?.0)
}

/// [`scan`] with hashing progress (at most a few calls per second per file is up to the caller).
pub async fn scan_with(
    repo: &DynRepo,
    dir: &Path,
    progress: impl Fn(ScanProgress) + Send + Sync + Clone + 'static,
) -> anyhow::Result<(Vec<ModelRecord>, ScanReport)> {
    let mut files = Vec::new();
    safetensors_files(dir, &mut files);
    files.sort();
    let known = repo.list_models(&Default::default()).await?;
    let mut out = Vec::new();
    let mut todo = Vec::new();
    for path in files {
        let meta = std::fs::metadata(&path)?;
        let size = meta.len() as i64;
        let mtime = mtime_ms(&meta);
        let path_s = path.to_string_lossy().to_string();
        if let Some(k) = known.iter().find(|k| {
            k.path.as_deref() == Some(&path_s)
                && k.size_bytes == size
                && k.mtime_ms == mtime
                && k.status == "ready"
        }) {
            out.push(k.clone());
        } else {
            todo.push((path, size, mtime, path_s));
        }
    }
    let mut report = ScanReport {
        found: out.len() + todo.len(),
        ..Default::default()
    };
    let files_n = todo.len();
    for (i, (path, size, mtime, path_s)) in todo.into_iter().enumerate() {
        let p2 = path.clone();
        let cb = progress.clone();
        let (sha, (ty, fam)) = tokio::task::spawn_blocking(move || {
            let file = p2.to_string_lossy().to_string();
            let mut report = |done: u64| {
                cb(ScanProgress {
                    file: file.clone(),
                    index: i + 1,
                    files: files_n,
                    hashed_bytes: done,
                    total_bytes: size as u64,
                })
            };
            hash_file_with(&p2, &mut report).map(|h| (h, classify(&p2)))
        })
        .await??;
        let filename = path
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        let mut rec = match repo.get_model(&sha).await? {
            // Keep Civitai metadata and the detected type of a record we already had.
            Some(existing) => existing,
            None => ModelRecord::new(&sha, &filename, &ty, &fam, "ready"),
        };
        rec.path = Some(path_s);
        rec.filename = filename;
        rec.size_bytes = size;
        rec.mtime_ms = mtime;
        rec.status = "ready".into();
        rec.error = None;
        rec.download = None;
        repo.upsert_model(&rec).await?;
        report.hashed += 1;
        report.new.push(sha);
        out.push(rec);
    }
    // A ready record whose file is gone (deleted or moved by hand) must not be offered for tasks.
    for mut k in known {
        // Also gone: its path now holds other bytes (a file overwritten in place).
        let gone = k.status == "ready"
            && k.path.as_deref().is_some_and(|p| {
                Path::new(p).starts_with(dir)
                    && (!Path::new(p).exists()
                        || out
                            .iter()
                            .any(|o| o.path.as_deref() == Some(p) && o.sha256 != k.sha256))
            });
        if gone && !out.iter().any(|o| o.sha256 == k.sha256) {
            k.status = "failed".into();
            k.error = Some(
                "the file is missing from models.dir or was replaced (rescan after restoring it)"
                    .into(),
            );
            repo.upsert_model(&k).await?;
            report.missing.push(k.sha256);
        }
    }
    Ok((out, report))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_matches_known_vector_and_reports_progress() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("abc");
        std::fs::write(&p, b"abc").expect("write");
        let mut seen = Vec::new();
        let h = hash_file_with(&p, &mut |d| seen.push(d)).expect("hash");
        assert_eq!(
            h,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(seen, vec![3]);
    }
}
