//! The model library: files in `models.dir` identified by SHA-256, and Civitai downloads.

pub mod civitai;
pub mod cli;
pub mod download;
pub mod library;

use serde_json::json;

use crate::db::ModelRecord;
use civitai::{CivitaiError, CivitaiRef};
use download::Ctx;

/// What `add-from-civitai` was asked for: exactly one reference, plus an optional file.
#[derive(Debug, Clone, Default, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AddFromCivitai {
    pub model_version_id: Option<u64>,
    /// Takes the model's latest version.
    pub model_id: Option<u64>,
    /// civitai.com model page, version page (`?modelVersionId=`) or download URL.
    pub url: Option<String>,
    /// e.g. `urn:air:sd1:checkpoint:civitai:4201@130072`
    pub air: Option<String>,
    /// A specific file of the version (default: the primary SafeTensor file).
    pub file_id: Option<u64>,
}

impl AddFromCivitai {
    pub fn reference(&self, base_url: &str) -> Result<CivitaiRef, CivitaiError> {
        let given = [
            self.model_version_id.is_some(),
            self.model_id.is_some(),
            self.url.is_some(),
            self.air.is_some(),
        ]
        .iter()
        .filter(|b| **b)
        .count();
        if given != 1 {
            return Err(CivitaiError::Invalid(
                "give exactly one of model_version_id, model_id, url, air".into(),
            ));
        }
        if let Some(v) = self.model_version_id {
            return Ok(CivitaiRef::Version(v));
        }
        if let Some(m) = self.model_id {
            return Ok(CivitaiRef::Model(m));
        }
        if let Some(u) = &self.url {
            return civitai::parse_url(u, base_url);
        }
        civitai::parse_air(self.air.as_deref().unwrap_or_default())
    }
}

/// Result of an add: the record and whether it was already complete (200) or is downloading (202).
pub struct Added {
    pub record: ModelRecord,
    pub already_ready: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum AddError {
    #[error(transparent)]
    Civitai(#[from] CivitaiError),
    #[error(transparent)]
    Db(#[from] crate::db::DbError),
    /// The library has no such model: 404.
    #[error("{0}")]
    NotInLibrary(String),
    /// The model is still downloading (it came from Civitai with its metadata): 409.
    #[error("{0}")]
    Busy(String),
}

/// Asks Civitai (`/api/v1/model-versions/by-hash/{sha256}`) which version a file already in the
/// library belongs to, and keeps the same metadata an add from Civitai keeps (model and version
/// id, names, type, baseModel, trainedWords, AIR) in the record's `source`. The record's name
/// stays (prompts refer to it by it); a type or family the file's header left `unknown` is taken
/// from Civitai (a LoRA's family from its baseModel), as for a download.
pub async fn civitai_lookup(ctx: &Ctx, sha256: &str) -> Result<ModelRecord, AddError> {
    let busy = |m: &ModelRecord| {
        matches!(m.status.as_str(), "downloading" | "verifying").then(|| {
            AddError::Busy(format!(
                "model {sha256} is still downloading from Civitai; its metadata is already known"
            ))
        })
    };
    let not_found = || AddError::NotInLibrary(format!("model {sha256} not found"));
    let rec = ctx.repo.get_model(sha256).await?.ok_or_else(not_found)?;
    if let Some(e) = busy(&rec) {
        return Err(e);
    }
    let version = match civitai::fetch_version_by_hash(&ctx.config, sha256).await {
        Err(CivitaiError::NotFound(_)) => {
            return Err(CivitaiError::NotFound(format!(
                "Civitai knows no file with SHA-256 {sha256}"
            ))
            .into())
        }
        r => r?,
    };
    // A scan rewrites records it read before hashing: do not let it drop the metadata.
    let _g = ctx.downloads.scan_lock().lock().await;
    let mut rec = ctx.repo.get_model(sha256).await?.ok_or_else(not_found)?;
    if let Some(e) = busy(&rec) {
        return Err(e);
    }
    let mut source = rec
        .source
        .take()
        .filter(|s| s.is_object())
        .unwrap_or_else(|| json!({}));
    source["civitai"] =
        civitai::source_for_hash(&version, sha256, &rec.model_type)["civitai"].take();
    rec.source = Some(source);
    let civ_type = version.model.as_ref().and_then(|m| m.model_type.as_deref());
    if let Some(t) = civ_type.and_then(civitai::map_type) {
        if rec.model_type == "unknown" {
            rec.model_type = t.into();
        }
    }
    let family = civitai::map_family(version.base_model.as_deref().unwrap_or_default());
    if rec.family == "unknown" {
        rec.family = family.into();
    }
    ctx.repo.upsert_model(&rec).await?;
    Ok(ctx.repo.get_model(sha256).await?.unwrap_or(rec))
}

/// Looks the version up, then creates (or reuses) the record and makes sure one download runs.
pub async fn add_from_civitai(ctx: &Ctx, req: &AddFromCivitai) -> Result<Added, AddError> {
    let r = req.reference(&ctx.config.civitai.base_url)?;
    let version = civitai::lookup(&ctx.config, r).await?;
    let res = civitai::resolve_version(&version, req.file_id, &ctx.config.civitai.base_url)?;
    let filename = download::sanitize_name(&res.file.name)
        .filter(|n| n.to_ascii_lowercase().ends_with(".safetensors"))
        .unwrap_or_else(|| format!("{}.safetensors", &res.sha256[..10]));
    let dir = ctx.config.models_dir().join(res.model_type);
    let mut fresh = ModelRecord::new(
        &res.sha256,
        &filename,
        res.model_type,
        res.family,
        "downloading",
    );
    if let Some(n) = res.source.pointer("/civitai/name").and_then(|v| v.as_str()) {
        fresh.name = n.to_string();
    }
    fresh.path = Some(dir.join(&filename).to_string_lossy().to_string());
    fresh.size_bytes = res
        .file
        .size_kb
        .map(|k| (k * 1024.0).round() as i64)
        .unwrap_or(0);
    fresh.source = Some(res.source.clone());
    fresh.download = Some(json!({"url": res.download_url}));
    if !ctx.repo.insert_model_if_absent(&fresh).await? {
        let mut existing = ctx
            .repo
            .get_model(&res.sha256)
            .await?
            .ok_or(crate::db::DbError::NotFound)?;
        match existing.status.as_str() {
            "ready" => {
                // A file we already had (e.g. scanned) gains its Civitai metadata.
                if existing.source.is_none() {
                    existing.source = Some(res.source);
                    ctx.repo.upsert_model(&existing).await?;
                }
                return Ok(Added {
                    record: existing,
                    already_ready: true,
                });
            }
            "failed" => {
                // Retry: keep any `.part` bytes (resumable) but refresh what Civitai told us.
                existing.status = "downloading".into();
                existing.error = None;
                existing.source = Some(res.source);
                let mut dl = existing.download.clone().unwrap_or_else(|| json!({}));
                dl["url"] = json!(res.download_url);
                existing.download = Some(dl);
                if existing.path.is_none() {
                    existing.path = fresh.path;
                }
                ctx.repo.upsert_model(&existing).await?;
            }
            _ => {}
        }
        ctx.downloads.start(ctx, &res.sha256);
        return Ok(Added {
            record: ctx.repo.get_model(&res.sha256).await?.unwrap_or(existing),
            already_ready: false,
        });
    }
    ctx.downloads.start(ctx, &res.sha256);
    Ok(Added {
        record: fresh,
        already_ready: false,
    })
}
