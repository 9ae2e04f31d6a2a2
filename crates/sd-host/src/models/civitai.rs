//! Civitai's public REST API: turning a version id, model id, page/download URL or AIR into one
//! file to download (its SHA-256 is our tracking id), plus the metadata we keep in `source`.

use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};

use crate::config::Config;
use crate::net::UrlPolicyError;

#[derive(Debug, thiserror::Error)]
pub enum CivitaiError {
    /// Bad input (unparseable URL/AIR, unknown file id): 422.
    #[error("{0}")]
    Invalid(String),
    /// Pickle formats and model types we cannot run: 422.
    #[error("{0}")]
    Unsupported(String),
    #[error("{0}")]
    NotFound(String),
    /// Download or metadata target refused by the network policy: 422.
    #[error("{0}")]
    Policy(#[from] UrlPolicyError),
    /// Civitai answered something unusable, or could not be reached: 503.
    #[error("{0}")]
    Upstream(String),
}

/// What the caller asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CivitaiRef {
    Version(u64),
    Model(u64),
}

/// Hosts whose page and download URLs we understand (besides the configured `civitai.base_url`).
const CIVITAI_HOSTS: &[&str] = &["civitai.com", "www.civitai.com", "civitai.green"];

fn parse_id(s: &str, what: &str) -> Result<u64, CivitaiError> {
    s.parse::<u64>().ok().filter(|n| *n > 0).ok_or_else(|| {
        CivitaiError::Invalid(format!("{what} must be a positive integer, got {s:?}"))
    })
}

/// `https://civitai.com/models/4201[/slug][?modelVersionId=130072]`,
/// `https://civitai.com/api/download/models/130072`, `.../api/v1/model-versions/130072`,
/// `.../model-versions/130072`.
pub fn parse_url(raw: &str, base_url: &str) -> Result<CivitaiRef, CivitaiError> {
    let u = url::Url::parse(raw.trim())
        .map_err(|e| CivitaiError::Invalid(format!("invalid URL: {e}")))?;
    let host = u.host_str().unwrap_or_default().to_ascii_lowercase();
    let base_host = url::Url::parse(base_url)
        .ok()
        .and_then(|b| b.host_str().map(|h| h.to_ascii_lowercase()));
    if !CIVITAI_HOSTS.contains(&host.as_str()) && base_host.as_deref() != Some(host.as_str()) {
        return Err(CivitaiError::Invalid(format!(
            "not a Civitai URL (host {host:?}); give a civitai.com model page, version page or download URL"
        )));
    }
    let segs: Vec<&str> = u
        .path_segments()
        .map(|s| s.filter(|x| !x.is_empty()).collect())
        .unwrap_or_default();
    let version_q = u
        .query_pairs()
        .find(|(k, _)| k == "modelVersionId")
        .map(|(_, v)| v.to_string());
    match segs.as_slice() {
        ["api", "download", "models", id, ..] => Ok(CivitaiRef::Version(parse_id(id, "version id")?)),
        ["api", "v1", "model-versions", id, ..] | ["model-versions", id, ..] => {
            Ok(CivitaiRef::Version(parse_id(id, "version id")?))
        }
        ["api", "v1", "models", id, ..] => Ok(CivitaiRef::Model(parse_id(id, "model id")?)),
        ["models", id, ..] => match version_q {
            Some(v) => Ok(CivitaiRef::Version(parse_id(&v, "modelVersionId")?)),
            None => Ok(CivitaiRef::Model(parse_id(id, "model id")?)),
        },
        _ => Err(CivitaiError::Invalid(
            "unrecognised Civitai URL; expected /models/{id}, /models/{id}?modelVersionId={id} or /api/download/models/{id}".into(),
        )),
    }
}

/// `urn:air:{ecosystem}:{type}:civitai:{model_id}[@{version_id}][.{format}]`.
pub fn parse_air(air: &str) -> Result<CivitaiRef, CivitaiError> {
    let bad = || {
        CivitaiError::Invalid(format!(
            "invalid AIR {air:?}; expected urn:air:sd1:checkpoint:civitai:4201@130072"
        ))
    };
    let parts: Vec<&str> = air.trim().split(':').collect();
    let [urn, air_kw, _eco, _ty, source, id] = parts.as_slice() else {
        return Err(bad());
    };
    if !urn.eq_ignore_ascii_case("urn") || !air_kw.eq_ignore_ascii_case("air") {
        return Err(bad());
    }
    if !source.eq_ignore_ascii_case("civitai") {
        return Err(CivitaiError::Invalid(format!(
            "AIR source {source:?} is not civitai"
        )));
    }
    // A trailing `.format` (e.g. `.safetensors`) names the file format, not part of the id.
    let id = id.split('.').next().unwrap_or(id);
    match id.split_once('@') {
        Some((_, v)) => Ok(CivitaiRef::Version(parse_id(v, "AIR version id")?)),
        None => Ok(CivitaiRef::Model(parse_id(id, "AIR model id")?)),
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FileMeta {
    pub format: Option<String>,
    pub size: Option<String>,
    pub fp: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CivitaiFile {
    pub id: Option<u64>,
    pub name: String,
    #[serde(rename = "type")]
    pub file_type: Option<String>,
    #[serde(rename = "sizeKB")]
    pub size_kb: Option<f64>,
    pub metadata: Option<FileMeta>,
    #[serde(default)]
    pub hashes: std::collections::HashMap<String, String>,
    #[serde(default)]
    pub primary: bool,
}

impl CivitaiFile {
    fn format(&self) -> &str {
        self.metadata
            .as_ref()
            .and_then(|m| m.format.as_deref())
            .unwrap_or("")
    }

    pub fn is_pickle(&self) -> bool {
        let n = self.name.to_ascii_lowercase();
        self.format().eq_ignore_ascii_case("PickleTensor")
            || [".ckpt", ".pt", ".bin", ".pth", ".pkl"]
                .iter()
                .any(|e| n.ends_with(e))
    }

    pub fn is_safetensors(&self) -> bool {
        !self.is_pickle()
            && (self.format().eq_ignore_ascii_case("SafeTensor")
                || self.name.to_ascii_lowercase().ends_with(".safetensors"))
    }

    fn is_model(&self) -> bool {
        self.file_type
            .as_deref()
            .is_none_or(|t| t.eq_ignore_ascii_case("Model"))
    }

    /// Civitai's SHA-256, lowercased; None unless it is 64 hex digits.
    pub fn sha256(&self) -> Option<String> {
        self.hashes
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("SHA256"))
            .map(|(_, v)| v.trim().to_ascii_lowercase())
            .filter(|v| crate::api::extract::is_sha256_hex(v))
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct VersionModel {
    pub name: Option<String>,
    #[serde(rename = "type")]
    pub model_type: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CivitaiVersion {
    pub id: u64,
    pub model_id: Option<u64>,
    pub name: Option<String>,
    pub base_model: Option<String>,
    pub air: Option<String>,
    #[serde(default)]
    pub trained_words: Vec<String>,
    pub model: Option<VersionModel>,
    #[serde(default)]
    pub files: Vec<CivitaiFile>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct CivitaiModel {
    id: u64,
    #[serde(default)]
    model_versions: Vec<ModelVersionStub>,
}

#[derive(Debug, Clone, Deserialize)]
struct ModelVersionStub {
    id: u64,
}

/// Our model type for Civitai's `model.type`; None for types the engine cannot use.
pub fn map_type(civitai_type: &str) -> Option<&'static str> {
    match civitai_type.to_ascii_lowercase().as_str() {
        "checkpoint" => Some("checkpoint"),
        "lora" => Some("lora"),
        "locon" | "lycoris" | "dora" | "loha" | "lokr" => Some("lycoris"),
        "textualinversion" => Some("embedding"),
        "vae" => Some("vae"),
        _ => None,
    }
}

/// Our family for Civitai's `baseModel` ("SD 1.5", "SDXL 1.0", "Pony", "Flux.1 D", ...).
pub fn map_family(base_model: &str) -> &'static str {
    let b = base_model.to_ascii_lowercase();
    if b.starts_with("sd 1") {
        "sd1"
    } else if b.starts_with("sd 2") {
        "sd2"
    } else if b.starts_with("sdxl")
        || ["pony", "illustrious", "noobai"]
            .iter()
            .any(|p| b.starts_with(p))
    {
        "sdxl"
    } else if b.starts_with("flux") {
        "flux"
    } else if b.starts_with("chroma") {
        "chroma"
    } else if b.contains("zimage") || b.contains("z-image") {
        "zimage"
    } else {
        "unknown"
    }
}

/// One resolved file: everything needed to create the record and start the download.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub sha256: String,
    pub version_id: u64,
    pub model_id: Option<u64>,
    pub file: CivitaiFile,
    pub model_type: &'static str,
    pub family: &'static str,
    pub download_url: String,
    /// `{"civitai": {...}}` for the record's `source`.
    pub source: Value,
}

/// Picks the requested file, else the primary SafeTensor model file, else any SafeTensor model file.
pub fn pick_file(v: &CivitaiVersion, file_id: Option<u64>) -> Result<CivitaiFile, CivitaiError> {
    let refuse = |f: &CivitaiFile| {
        CivitaiError::Unsupported(format!(
            "{} is a pickle format file; only .safetensors files are accepted",
            f.name
        ))
    };
    if let Some(id) = file_id {
        let f = v.files.iter().find(|f| f.id == Some(id)).ok_or_else(|| {
            CivitaiError::Invalid(format!("file {id} is not part of model version {}", v.id))
        })?;
        if !f.is_safetensors() {
            return Err(refuse(f));
        }
        return Ok(f.clone());
    }
    let models: Vec<&CivitaiFile> = v.files.iter().filter(|f| f.is_model()).collect();
    if let Some(f) = models
        .iter()
        .find(|f| f.primary && f.is_safetensors())
        .or_else(|| models.iter().find(|f| f.is_safetensors()))
    {
        return Ok((*f).clone());
    }
    match models.first().copied().or(v.files.first()) {
        Some(f) => Err(refuse(f)),
        None => Err(CivitaiError::NotFound(format!(
            "model version {} has no files",
            v.id
        ))),
    }
}

/// Builds the download plan for a version (pure: no network).
pub fn resolve_version(
    v: &CivitaiVersion,
    file_id: Option<u64>,
    base_url: &str,
) -> Result<Resolved, CivitaiError> {
    let civ_type = v
        .model
        .as_ref()
        .and_then(|m| m.model_type.clone())
        .unwrap_or_default();
    let model_type = map_type(&civ_type).ok_or_else(|| {
        CivitaiError::Unsupported(format!(
            "Civitai model type {civ_type:?} is not supported (checkpoint, LoRA, LoCon, TextualInversion, VAE are)"
        ))
    })?;
    let file = pick_file(v, file_id)?;
    let sha256 = file.sha256().ok_or_else(|| {
        CivitaiError::Upstream(format!("Civitai lists no SHA-256 for file {}", file.name))
    })?;
    let base_model = v.base_model.clone().unwrap_or_default();
    let family = map_family(&base_model);
    let mut download_url = format!(
        "{}/api/download/models/{}",
        base_url.trim_end_matches('/'),
        v.id
    );
    if !file.primary {
        // Civitai selects a non-primary file of a version by type/format/size/fp.
        let mut q = url::form_urlencoded::Serializer::new(String::new());
        if let Some(t) = &file.file_type {
            q.append_pair("type", t);
        }
        if let Some(m) = &file.metadata {
            for (k, v) in [("format", &m.format), ("size", &m.size), ("fp", &m.fp)] {
                if let Some(v) = v {
                    q.append_pair(k, v);
                }
            }
        }
        download_url = format!("{download_url}?{}", q.finish());
    }
    let source = source_json(v, file.id, model_type);
    Ok(Resolved {
        sha256,
        version_id: v.id,
        model_id: v.model_id,
        file,
        model_type,
        family,
        download_url,
        source,
    })
}

/// `{"civitai": {...}}`: what we keep of a version (model id, version id, file id, names, type,
/// baseModel, trainedWords, AIR). `model_type` is ours (for an AIR Civitai did not send).
fn source_json(v: &CivitaiVersion, file_id: Option<u64>, model_type: &str) -> Value {
    let civ_type = v
        .model
        .as_ref()
        .and_then(|m| m.model_type.clone())
        .unwrap_or_default();
    let family = map_family(v.base_model.as_deref().unwrap_or_default());
    let air = v.air.clone().or_else(|| {
        v.model_id.map(|mid| {
            let eco = match family {
                "flux" => "flux1",
                "unknown" => "sd1",
                f => f,
            };
            format!("urn:air:{eco}:{model_type}:civitai:{mid}@{}", v.id)
        })
    });
    json!({"civitai": {
        "model_id": v.model_id,
        "version_id": v.id,
        "file_id": file_id,
        "name": v.model.as_ref().and_then(|m| m.name.clone()),
        "version_name": v.name,
        "type": civ_type,
        "base_model": v.base_model,
        "trained_words": v.trained_words,
        "air": air,
    }})
}

/// The `source` for a file we already have, from the version Civitai found by its SHA-256: the
/// same metadata an add from Civitai keeps, with the id of the file that has this hash.
pub fn source_for_hash(v: &CivitaiVersion, sha256: &str, current_type: &str) -> Value {
    let file_id = v
        .files
        .iter()
        .find(|f| f.sha256().as_deref() == Some(sha256))
        .and_then(|f| f.id);
    let civ_type = v.model.as_ref().and_then(|m| m.model_type.as_deref());
    let model_type = civ_type.and_then(map_type).unwrap_or(current_type);
    source_json(v, file_id, model_type)
}

/// Whether `u` is on the configured Civitai origin (the only place the token may go).
pub fn is_civitai_origin(u: &url::Url, base_url: &str) -> bool {
    let Ok(b) = url::Url::parse(base_url) else {
        return false;
    };
    u.scheme() == b.scheme()
        && u.host_str().map(str::to_ascii_lowercase) == b.host_str().map(str::to_ascii_lowercase)
        && u.port_or_known_default() == b.port_or_known_default()
}

/// GET a Civitai API path (JSON), with the token, no redirects, public targets only.
async fn get_json(config: &Config, path: &str) -> Result<Value, CivitaiError> {
    let policy = &config.network;
    let url = format!("{}{path}", config.civitai.base_url.trim_end_matches('/'));
    let u = crate::net::check_url_syntax(&url, policy)?;
    let client = crate::net::pinned_client(&u, policy, Duration::from_secs(30)).await?;
    let mut req = client.get(u.clone()).header("accept", "application/json");
    if let Some(t) = &config.civitai.token {
        req = req.bearer_auth(t.expose());
    }
    let resp = req.send().await.map_err(|e| {
        CivitaiError::Upstream(format!("Civitai API unreachable: {}", e.without_url()))
    })?;
    let status = resp.status();
    if status == reqwest::StatusCode::NOT_FOUND {
        return Err(CivitaiError::NotFound(format!("Civitai has no {path}")));
    }
    if status == reqwest::StatusCode::UNAUTHORIZED || status == reqwest::StatusCode::FORBIDDEN {
        return Err(CivitaiError::Upstream(format!(
            "Civitai refused {path} ({status}); check civitai.token"
        )));
    }
    if !status.is_success() {
        return Err(CivitaiError::Upstream(format!(
            "Civitai answered {status} for {path}"
        )));
    }
    resp.json::<Value>().await.map_err(|e| {
        CivitaiError::Upstream(format!("Civitai sent invalid JSON: {}", e.without_url()))
    })
}

fn parse<T: serde::de::DeserializeOwned>(v: Value, what: &str) -> Result<T, CivitaiError> {
    serde_json::from_value(v)
        .map_err(|e| CivitaiError::Upstream(format!("unexpected Civitai {what} JSON: {e}")))
}

pub async fn fetch_version(config: &Config, id: u64) -> Result<CivitaiVersion, CivitaiError> {
    let mut v: CivitaiVersion = parse(
        get_json(config, &format!("/api/v1/model-versions/{id}")).await?,
        "model version",
    )?;
    v.id = id;
    Ok(v)
}

/// The latest version of a model (Civitai lists versions newest first).
pub async fn fetch_latest_version(
    config: &Config,
    model_id: u64,
) -> Result<CivitaiVersion, CivitaiError> {
    let m: CivitaiModel = parse(
        get_json(config, &format!("/api/v1/models/{model_id}")).await?,
        "model",
    )?;
    let latest = m
        .model_versions
        .first()
        .ok_or_else(|| CivitaiError::NotFound(format!("Civitai model {} has no versions", m.id)))?;
    let mut v = fetch_version(config, latest.id).await?;
    v.model_id.get_or_insert(m.id);
    Ok(v)
}

/// The version that holds a file with this hash (SHA-256, AutoV2, ...).
pub async fn fetch_version_by_hash(
    config: &Config,
    hash: &str,
) -> Result<CivitaiVersion, CivitaiError> {
    if !hash.bytes().all(|b| b.is_ascii_hexdigit()) || hash.is_empty() || hash.len() > 64 {
        return Err(CivitaiError::Invalid("hash must be hex".into()));
    }
    parse(
        get_json(config, &format!("/api/v1/model-versions/by-hash/{hash}")).await?,
        "model version",
    )
}

pub async fn lookup(config: &Config, r: CivitaiRef) -> Result<CivitaiVersion, CivitaiError> {
    match r {
        CivitaiRef::Version(id) => fetch_version(config, id).await,
        CivitaiRef::Model(id) => fetch_latest_version(config, id).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "https://civitai.com";

    #[test]
    fn urls_and_airs() {
        use CivitaiRef::*;
        for (u, want) in [
            ("https://civitai.com/models/4201", Model(4201)),
            (
                "https://civitai.com/models/4201/realistic-vision",
                Model(4201),
            ),
            (
                "https://civitai.com/models/4201/rv?modelVersionId=130072",
                Version(130072),
            ),
            (
                "https://civitai.com/api/download/models/130072",
                Version(130072),
            ),
            (
                "https://civitai.com/api/download/models/130072?type=Model&format=SafeTensor",
                Version(130072),
            ),
            ("https://civitai.green/model-versions/7", Version(7)),
        ] {
            assert_eq!(parse_url(u, BASE).expect(u), want, "{u}");
        }
        assert!(parse_url("https://evil.example/models/1", BASE).is_err());
        assert!(parse_url("https://civitai.com/images/1", BASE).is_err());
        assert!(parse_url("https://civitai.com/models/abc", BASE).is_err());
        assert_eq!(
            parse_url("http://127.0.0.1:9/models/5", "http://127.0.0.1:9").expect("base host"),
            Model(5)
        );
        assert_eq!(
            parse_air("urn:air:sd1:checkpoint:civitai:4201@130072").expect("air"),
            Version(130072)
        );
        assert_eq!(
            parse_air("urn:air:sdxl:lora:civitai:10@20.safetensors").expect("air"),
            Version(20)
        );
        assert_eq!(
            parse_air("urn:air:sd1:lora:civitai:4201").expect("air"),
            Model(4201)
        );
        assert!(parse_air("urn:air:sd1:lora:huggingface:4201").is_err());
        assert!(parse_air("4201@130072").is_err());
    }

    #[test]
    fn picks_primary_safetensor_and_refuses_pickle() {
        let v: CivitaiVersion = serde_json::from_value(json!({
            "id": 9, "modelId": 1, "baseModel": "SD 1.5", "trainedWords": ["tok"],
            "model": {"name": "M", "type": "LORA"},
            "files": [
                {"id": 1, "name": "a.ckpt", "type": "Model", "primary": true,
                 "metadata": {"format": "PickleTensor"}, "hashes": {"SHA256": "AA".repeat(32)}},
                {"id": 2, "name": "a.safetensors", "type": "Model", "primary": false,
                 "metadata": {"format": "SafeTensor", "fp": "fp16"}, "hashes": {"SHA256": "BB".repeat(32)}},
            ]
        }))
        .expect("json");
        let r = resolve_version(&v, None, BASE).expect("resolves");
        assert_eq!(r.sha256, "bb".repeat(32));
        assert_eq!(r.model_type, "lora");
        assert_eq!(r.family, "sd1");
        assert!(r.download_url.contains("format=SafeTensor"));
        assert_eq!(r.source["civitai"]["trained_words"][0], "tok");
        assert_eq!(r.source["civitai"]["file_id"], 2);
        // Found by hash: the metadata names the file with that hash, even a pickle one.
        let by_hash = source_for_hash(&v, &"aa".repeat(32), "unknown");
        assert_eq!(by_hash["civitai"]["file_id"], 1);
        assert_eq!(by_hash["civitai"]["air"], "urn:air:sd1:lora:civitai:1@9");
        assert_eq!(by_hash["civitai"]["base_model"], "SD 1.5");
        assert!(matches!(
            resolve_version(&v, Some(1), BASE),
            Err(CivitaiError::Unsupported(_))
        ));
        assert!(matches!(
            resolve_version(&v, Some(77), BASE),
            Err(CivitaiError::Invalid(_))
        ));
    }

    #[test]
    fn token_origin() {
        let b = "https://civitai.com";
        assert!(is_civitai_origin(
            &url::Url::parse("https://civitai.com/api/x").expect("u"),
            b
        ));
        assert!(!is_civitai_origin(
            &url::Url::parse("https://b2.storage.example/x").expect("u"),
            b
        ));
        assert!(!is_civitai_origin(
            &url::Url::parse("http://civitai.com/x").expect("u"),
            b
        ));
        assert!(!is_civitai_origin(
            &url::Url::parse("https://civitai.com:8443/x").expect("u"),
            b
        ));
    }
}
