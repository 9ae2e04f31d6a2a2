//! Scanning `models.dir`: hash new files, detect type and family from the safetensors header, store records.

use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::db::{DynRepo, ModelRecord};

/// Streaming SHA-256 of a file (lowercase hex).
pub fn hash_file(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
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

/// Registers every `.safetensors` under `dir` that is not known yet (by path + size + mtime).
/// Returns the records of the files found.
pub async fn scan(repo: &DynRepo, dir: &Path) -> anyhow::Result<Vec<ModelRecord>> {
    let mut files = Vec::new();
    safetensors_files(dir, &mut files);
    files.sort();
    let known = repo.list_models(&Default::default()).await?;
    let mut out = Vec::new();
    for path in files {
        let meta = std::fs::metadata(&path)?;
        let size = meta.len() as i64;
        let mtime = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_millis() as i64);
        let path_s = path.to_string_lossy().to_string();
        if let Some(k) = known.iter().find(|k| {
            k.path.as_deref() == Some(&path_s) && k.size_bytes == size && k.mtime_ms == mtime
        }) {
            out.push(k.clone());
            continue;
        }
        let p2 = path.clone();
        let (sha, (ty, fam)) =
            tokio::task::spawn_blocking(move || hash_file(&p2).map(|h| (h, classify(&p2))))
                .await??;
        let filename = path
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        let mut rec = match repo.get_model(&sha).await? {
            Some(existing) => existing,
            None => ModelRecord::new(&sha, &filename, &ty, &fam, "ready"),
        };
        rec.path = Some(path_s);
        rec.size_bytes = size;
        rec.mtime_ms = mtime;
        rec.status = "ready".into();
        repo.upsert_model(&rec).await?;
        out.push(rec);
    }
    Ok(out)
}
