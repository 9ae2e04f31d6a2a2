//! Resumable, verified downloads into `models.dir/<type>/`.
//!
//! Bytes go to `<file>.part`; an interrupted transfer continues with `Range` + `If-Range`; the file is
//! fsynced, checked against Civitai's SHA-256 and only then renamed into place. Redirects are followed
//! by hand so every hop passes the network policy, and the token only goes to the Civitai origin.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;

use crate::config::Config;
use crate::db::{DynRepo, ModelRecord};
use crate::events::EventHub;
use crate::metrics::Metrics;
use crate::models::civitai::is_civitai_origin;

/// Event topic of one model's download.
pub fn topic(sha256: &str) -> String {
    format!("model:{sha256}")
}

/// Progress events at most this often (~4/s).
const PROGRESS_EVERY: Duration = Duration::from_millis(250);
/// Attempts in a row that make no progress before the download is marked failed.
/// Restarts from byte 0 one download may take.
const MAX_RESTARTS: u32 = 3;
const MAX_STALLED_ATTEMPTS: u32 = 6;
const MAX_REDIRECTS: usize = 10;

/// Everything a download needs; built from `AppState` by the server or by hand by the CLI.
#[derive(Clone)]
pub struct Ctx {
    pub config: Arc<Config>,
    pub repo: DynRepo,
    pub events: EventHub,
    pub metrics: Arc<Metrics>,
    pub downloads: Downloads,
}

impl From<&crate::state::AppState> for Ctx {
    fn from(s: &crate::state::AppState) -> Self {
        Ctx {
            config: s.config.clone(),
            repo: s.repo.clone(),
            events: s.events.clone(),
            metrics: s.metrics.clone(),
            downloads: s.downloads.clone(),
        }
    }
}

struct Running {
    generation: u64,
    events: EventHub,
    abort: tokio::task::AbortHandle,
    progress: Option<Value>,
}

/// The downloads running in this process: at most one per sha256.
#[derive(Clone, Default)]
pub struct Downloads {
    inner: Arc<Mutex<(u64, HashMap<String, Running>)>>,
    scan: Arc<tokio::sync::Mutex<()>>,
}

impl Downloads {
    /// Held by a library scan, so two scans never hash and upsert the same files at once.
    pub fn scan_lock(&self) -> &tokio::sync::Mutex<()> {
        &self.scan
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (u64, HashMap<String, Running>)> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn is_running(&self, sha256: &str) -> bool {
        self.lock().1.contains_key(sha256)
    }

    /// The newest `progress` payload of a running download.
    pub fn progress(&self, sha256: &str) -> Option<Value> {
        self.lock().1.get(sha256).and_then(|r| r.progress.clone())
    }

    fn set_progress(&self, sha256: &str, p: Value) {
        if let Some(r) = self.lock().1.get_mut(sha256) {
            r.progress = Some(p);
        }
    }

    /// Starts the download of a `downloading` record unless one is already running; true if started.
    pub fn start(&self, ctx: &Ctx, sha256: &str) -> bool {
        let mut g = self.lock();
        if g.1.contains_key(sha256) {
            return false;
        }
        g.0 += 1;
        let generation = g.0;
        let (ctx2, sha) = (ctx.clone(), sha256.to_string());
        let me = self.clone();
        // The task waits for the map entry below before doing anything (it takes the same lock).
        let task = tokio::spawn(async move {
            let _cleanup = Cleanup {
                downloads: me,
                sha: sha.clone(),
                generation,
            };
            run(&ctx2, &sha).await;
        });
        g.1.insert(
            sha256.to_string(),
            Running {
                generation,
                events: ctx.events.clone(),
                abort: task.abort_handle(),
                progress: None,
            },
        );
        ctx.metrics
            .downloads_started
            .fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Stops a running download (its `.part` file stays for a later resume).
    pub fn cancel(&self, sha256: &str) {
        if let Some(r) = self.lock().1.remove(sha256) {
            r.abort.abort();
        }
    }

    /// Stops every download; records stay `downloading` and resume at the next start.
    /// Progress streams end with an `interrupted` event so a graceful stop does not wait on them.
    pub fn shutdown(&self) {
        for (sha, r) in self.lock().1.drain() {
            r.abort.abort();
            r.events.publish(
                &topic(&sha),
                "interrupted",
                json!({"sha256": sha, "detail": "server stopping; the download resumes at the next start"}),
                false,
            );
        }
    }
}

/// Removes the map entry when the task ends, is aborted or panics.
struct Cleanup {
    downloads: Downloads,
    sha: String,
    generation: u64,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let mut g = self.downloads.lock();
        if g.1
            .get(&self.sha)
            .is_some_and(|r| r.generation == self.generation)
        {
            g.1.remove(&self.sha);
        }
    }
}

/// Restarts every download a stop or crash interrupted (records still `downloading`/`verifying`).
pub async fn resume_all(ctx: &Ctx) -> crate::db::DbResult<usize> {
    let mut n = 0;
    for status in ["downloading", "verifying"] {
        let recs = ctx
            .repo
            .list_models(&crate::db::ModelFilter {
                status: Some(status.into()),
                ..Default::default()
            })
            .await?;
        for r in recs {
            if status == "verifying" {
                ctx.repo
                    .set_model_status(&r.sha256, "downloading", None)
                    .await?;
            }
            if ctx.downloads.start(ctx, &r.sha256) {
                n += 1;
            }
        }
    }
    Ok(n)
}

#[derive(Debug, thiserror::Error)]
enum DlError {
    /// No point retrying: the reason is shown to the user.
    #[error("{0}")]
    Fatal(String),
    /// Network trouble: try again (with `Range`).
    #[error("{0}")]
    Retry(String),
}

impl From<crate::db::DbError> for DlError {
    fn from(e: crate::db::DbError) -> Self {
        DlError::Fatal(e.to_string())
    }
}

impl From<crate::net::UrlPolicyError> for DlError {
    fn from(e: crate::net::UrlPolicyError) -> Self {
        DlError::Fatal(format!("download refused: {e}"))
    }
}

async fn run(ctx: &Ctx, sha: &str) {
    match download(ctx, sha).await {
        Ok(rec) => {
            ctx.metrics
                .downloads_completed
                .fetch_add(1, Ordering::Relaxed);
            tracing::info!(sha256 = %sha, file = %rec.filename, "model download complete");
            let body = serde_json::to_value(&rec).unwrap_or_else(|_| json!({"sha256": sha}));
            ctx.events.publish(&topic(sha), "ready", body, true);
        }
        Err(e) => {
            let detail = e.to_string();
            ctx.metrics.downloads_failed.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(sha256 = %sha, reason = %detail, "model download failed");
            if let Err(db) = ctx
                .repo
                .set_model_status(sha, "failed", Some(&detail))
                .await
            {
                tracing::error!(sha256 = %sha, error = %db, "recording download failure");
            }
            ctx.events.publish(
                &topic(sha),
                "failed",
                json!({"sha256": sha, "detail": detail}),
                true,
            );
        }
    }
}

pub fn part_path(final_path: &Path) -> PathBuf {
    let mut s = final_path.as_os_str().to_owned();
    s.push(".part");
    PathBuf::from(s)
}

/// A file name from `Content-Disposition` (`filename*=UTF-8''…` preferred), reduced to a safe basename.
pub fn content_disposition_name(v: &str) -> Option<String> {
    let mut plain = None;
    let mut ext = None;
    for part in v.split(';').map(str::trim) {
        let Some((k, val)) = part.split_once('=') else {
            continue;
        };
        let val = val.trim().trim_matches('"');
        match k.trim().to_ascii_lowercase().as_str() {
            "filename*" => {
                let enc = val.split_once("''").map(|(_, x)| x).unwrap_or(val);
                ext = url::form_urlencoded::parse(format!("x={enc}").as_bytes())
                    .next()
                    .map(|(_, d)| d.to_string());
            }
            "filename" => plain = Some(val.to_string()),
            _ => {}
        }
    }
    ext.or(plain).and_then(|n| sanitize_name(&n))
}

/// Basename only, no separators, no leading dots, no control characters.
pub fn sanitize_name(name: &str) -> Option<String> {
    let base = name.rsplit(['/', '\\']).next().unwrap_or("");
    let clean: String = base
        .chars()
        .filter(|c| !c.is_control())
        .collect::<String>()
        .trim()
        .trim_start_matches('.')
        .to_string();
    (!clean.is_empty() && clean.len() <= 200).then_some(clean)
}

/// A client for one hop: addresses checked and pinned, no redirects, no whole-body timeout
/// (a multi-GB file takes long) but connect and read timeouts so a dead peer is noticed.
async fn hop_client(
    url: &reqwest::Url,
    policy: &crate::config::NetworkConfig,
) -> Result<reqwest::Client, DlError> {
    let addrs = crate::net::resolve_checked(url, policy).await?;
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(30))
        .read_timeout(Duration::from_secs(60))
        .resolve_to_addrs(url.host_str().unwrap_or_default(), &addrs)
        .build()
        .map_err(|e| DlError::Fatal(e.to_string()))
}

/// Sends the GET, following redirects by hand (policy check per hop; token only to Civitai).
async fn request(
    config: &Config,
    url: &str,
    have: u64,
    validator: Option<&str>,
) -> Result<reqwest::Response, DlError> {
    let policy = &config.network;
    let mut u = crate::net::check_url_syntax(url, policy)?;
    for _ in 0..MAX_REDIRECTS {
        let client = hop_client(&u, policy).await?;
        let mut req = client.get(u.clone());
        if let Some(t) = &config.civitai.token {
            if is_civitai_origin(&u, &config.civitai.base_url) {
                req = req.bearer_auth(t.expose());
            }
        }
        if have > 0 {
            req = req.header(reqwest::header::RANGE, format!("bytes={have}-"));
            if let Some(v) = validator {
                req = req.header(reqwest::header::IF_RANGE, v);
            }
        }
        let resp = req
            .send()
            .await
            .map_err(|e| DlError::Retry(format!("request failed: {}", e.without_url())))?;
        if resp.status().is_redirection() {
            let loc = resp
                .headers()
                .get(reqwest::header::LOCATION)
                .and_then(|l| l.to_str().ok())
                .ok_or_else(|| DlError::Fatal("redirect without Location".into()))?;
            let next = u
                .join(loc)
                .map_err(|e| DlError::Fatal(format!("bad redirect: {e}")))?;
            u = crate::net::check_url_syntax(next.as_str(), policy)?;
            continue;
        }
        return Ok(resp);
    }
    Err(DlError::Fatal("too many redirects".into()))
}

fn header(resp: &reqwest::Response, name: reqwest::header::HeaderName) -> Option<&str> {
    resp.headers().get(name).and_then(|v| v.to_str().ok())
}

/// `bytes START-END/TOTAL` or `bytes */TOTAL` → (start, total).
fn content_range(v: &str) -> (Option<u64>, Option<u64>) {
    let v = v.trim().trim_start_matches("bytes").trim();
    let (range, total) = v.split_once('/').unwrap_or((v, "*"));
    let start = range.split_once('-').and_then(|(s, _)| s.parse().ok());
    (start, total.parse().ok())
}

struct Meter {
    started: Instant,
    base: u64,
    last_emit: Option<Instant>,
}

impl Meter {
    fn payload(&self, done: u64, total: Option<u64>) -> Value {
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        let rate = (done.saturating_sub(self.base)) as f64 / secs;
        let eta = match total {
            Some(t) if rate > 0.0 => json!(((t.saturating_sub(done)) as f64 / rate).round()),
            _ => Value::Null,
        };
        json!({"downloaded_bytes": done, "total_bytes": total, "bytes_per_s": rate.round(), "eta_s": eta})
    }
}

fn emit(ctx: &Ctx, sha: &str, meter: &mut Meter, done: u64, total: Option<u64>, force: bool) {
    let now = Instant::now();
    if !force && meter.last_emit.is_some_and(|t| now - t < PROGRESS_EVERY) {
        return;
    }
    meter.last_emit = Some(now);
    let p = meter.payload(done, total);
    ctx.downloads.set_progress(sha, p.clone());
    ctx.events.publish(&topic(sha), "progress", p, false);
}

/// Downloads, verifies and installs the file of record `sha`; returns the ready record.
async fn download(ctx: &Ctx, sha: &str) -> Result<ModelRecord, DlError> {
    let mut rec = ctx
        .repo
        .get_model(sha)
        .await?
        .ok_or_else(|| DlError::Fatal("model record vanished".into()))?;
    let url = rec
        .download
        .as_ref()
        .and_then(|d| d.get("url"))
        .and_then(|u| u.as_str())
        .map(str::to_string)
        .ok_or_else(|| DlError::Fatal("no download URL recorded".into()))?;
    let mut final_path = PathBuf::from(
        rec.path
            .clone()
            .ok_or_else(|| DlError::Fatal("no target path recorded".into()))?,
    );
    let dir = final_path
        .parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| DlError::Fatal("bad target path".into()))?;
    tokio::fs::create_dir_all(&dir)
        .await
        .map_err(|e| DlError::Fatal(format!("creating {}: {e}", dir.display())))?;
    let mut stalled = 0u32;
    let mut restarts = 0u32;
    let mut meter = Meter {
        started: Instant::now(),
        base: u64::MAX,
        last_emit: None,
    };
    loop {
        let part = part_path(&final_path);
        let have = tokio::fs::metadata(&part)
            .await
            .map(|m| m.len())
            .unwrap_or(0);
        meter.base = meter.base.min(have);
        let validator = rec
            .download
            .as_ref()
            .and_then(|d| d.get("validator"))
            .and_then(|v| v.as_str())
            .map(str::to_string);
        match attempt(
            ctx,
            sha,
            &mut rec,
            &url,
            &mut final_path,
            have,
            validator,
            &mut meter,
        )
        .await
        {
            Ok(true) => break,
            Ok(false) => {
                // A restart from zero (200 for a Range, 416): fine once or twice, not forever.
                stalled = 0;
                restarts += 1;
                if restarts > MAX_RESTARTS {
                    return Err(DlError::Fatal(format!(
                        "the server made the download restart from zero {restarts} times"
                    )));
                }
            }
            Err(DlError::Retry(why)) => {
                let now_have = tokio::fs::metadata(part_path(&final_path))
                    .await
                    .map(|m| m.len())
                    .unwrap_or(0);
                if now_have > have {
                    stalled = 0;
                } else {
                    stalled += 1;
                }
                if stalled >= MAX_STALLED_ATTEMPTS {
                    return Err(DlError::Fatal(format!("download kept failing: {why}")));
                }
                tracing::info!(sha256 = %sha, reason = %why, "download interrupted; resuming");
                tokio::time::sleep(Duration::from_millis(100 << stalled.min(5))).await;
            }
            Err(fatal) => return Err(fatal),
        }
    }
    verify_and_install(ctx, sha, rec, final_path).await
}

/// One request. Ok(true): the part file is complete; Ok(false): restart requested (200/416).
#[allow(clippy::too_many_arguments)]
async fn attempt(
    ctx: &Ctx,
    sha: &str,
    rec: &mut ModelRecord,
    url: &str,
    final_path: &mut PathBuf,
    have: u64,
    validator: Option<String>,
    meter: &mut Meter,
) -> Result<bool, DlError> {
    let resp = request(&ctx.config, url, have, validator.as_deref()).await?;
    let status = resp.status();
    let part = part_path(final_path);
    match status.as_u16() {
        200 | 206 => {}
        416 => {
            let total =
                header(&resp, reqwest::header::CONTENT_RANGE).and_then(|v| content_range(v).1);
            if total == Some(have) && have > 0 {
                return Ok(true); // already complete: just verify
            }
            let _ = tokio::fs::remove_file(&part).await;
            return Ok(false);
        }
        401 | 403 => {
            return Err(DlError::Fatal(if ctx.config.civitai.token.is_some() {
                format!("Civitai refused the download ({status}): the configured civitai.token has no access to this version")
            } else {
                format!("this model version requires a Civitai login ({status}); set civitai.token in the config")
            }))
        }
        404 | 410 => return Err(DlError::Fatal(format!("download not found ({status})"))),
        s if (500..600).contains(&s) || s == 408 || s == 429 => {
            return Err(DlError::Retry(format!("server answered {status}")))
        }
        _ => return Err(DlError::Fatal(format!("unexpected answer {status}"))),
    }
    let ctype = header(&resp, reqwest::header::CONTENT_TYPE)
        .unwrap_or("")
        .to_ascii_lowercase();
    if ctype.starts_with("text/html") {
        return Err(DlError::Fatal(
            "got an HTML page instead of the file (the version may need a Civitai login: set civitai.token)".into(),
        ));
    }
    let (offset, total) = if status == reqwest::StatusCode::PARTIAL_CONTENT {
        let (start, total) = header(&resp, reqwest::header::CONTENT_RANGE)
            .map(content_range)
            .unwrap_or((None, None));
        if start != Some(have) {
            // A range we did not ask for: start over rather than splice wrong bytes.
            let _ = tokio::fs::remove_file(&part).await;
            return Ok(false);
        }
        let total = total.or_else(|| resp.content_length().map(|l| l + have));
        (have, total)
    } else {
        // 200 to a ranged request means the server ignored Range (or If-Range failed): from zero.
        (0, resp.content_length())
    };
    if offset == 0 {
        if let Some(name) =
            header(&resp, reqwest::header::CONTENT_DISPOSITION).and_then(content_disposition_name)
        {
            if !name.to_ascii_lowercase().ends_with(".safetensors") {
                return Err(DlError::Fatal(format!(
                    "refusing {name}: only .safetensors files are accepted (pickle formats are unsafe)"
                )));
            }
            if Some(name.as_str()) != final_path.file_name().and_then(|n| n.to_str()) {
                if let Some(dir) = final_path.parent() {
                    *final_path = dir.join(&name);
                }
                rec.filename = name;
                rec.path = Some(final_path.to_string_lossy().to_string());
            }
        }
    }
    let part = part_path(final_path);
    // Strong ETag or Last-Modified, so a changed file is never spliced onto old bytes.
    let new_validator = header(&resp, reqwest::header::ETAG)
        .filter(|e| !e.starts_with("W/"))
        .or_else(|| header(&resp, reqwest::header::LAST_MODIFIED))
        .map(str::to_string);
    let mut dl = rec.download.clone().unwrap_or_else(|| json!({}));
    dl["validator"] = new_validator.map(Value::String).unwrap_or(Value::Null);
    if let Some(t) = total {
        rec.size_bytes = t as i64;
    }
    if rec.download.as_ref() != Some(&dl) || offset == 0 {
        rec.download = Some(dl);
        rec.status = "downloading".into();
        rec.error = None;
        ctx.repo.upsert_model(rec).await?;
    }
    let mut file = tokio::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(offset > 0)
        .truncate(offset == 0)
        .open(&part)
        .await
        .map_err(|e| DlError::Fatal(format!("opening {}: {e}", part.display())))?;
    let mut done = offset;
    emit(ctx, sha, meter, done, total, true);
    let mut stream = resp.bytes_stream();
    let mut failure = None;
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(bytes) => {
                file.write_all(&bytes)
                    .await
                    .map_err(|e| DlError::Fatal(format!("writing {}: {e}", part.display())))?;
                done += bytes.len() as u64;
                ctx.metrics
                    .download_bytes
                    .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                emit(ctx, sha, meter, done, total, false);
            }
            Err(e) => {
                failure = Some(format!("connection lost: {}", e.without_url()));
                break;
            }
        }
    }
    // Make what we have durable, so a resume after a crash starts from real bytes.
    file.flush()
        .await
        .map_err(|e| DlError::Fatal(e.to_string()))?;
    file.sync_all()
        .await
        .map_err(|e| DlError::Fatal(e.to_string()))?;
    drop(file);
    emit(ctx, sha, meter, done, total, true);
    if let Some(f) = failure {
        return Err(DlError::Retry(f));
    }
    match total {
        Some(t) if done < t => Err(DlError::Retry(format!(
            "connection closed after {done} of {t} bytes"
        ))),
        Some(t) if done > t => {
            let _ = tokio::fs::remove_file(&part).await;
            Err(DlError::Retry(
                "server sent more bytes than announced".into(),
            ))
        }
        _ => Ok(true),
    }
}

async fn verify_and_install(
    ctx: &Ctx,
    sha: &str,
    mut rec: ModelRecord,
    final_path: PathBuf,
) -> Result<ModelRecord, DlError> {
    let part = part_path(&final_path);
    ctx.repo.set_model_status(sha, "verifying", None).await?;
    ctx.events
        .publish(&topic(sha), "verifying", json!({"sha256": sha}), false);
    let p2 = part.clone();
    let got = tokio::task::spawn_blocking(move || super::library::hash_file(&p2))
        .await
        .map_err(|e| DlError::Fatal(e.to_string()))?
        .map_err(|e| DlError::Fatal(format!("hashing {}: {e}", part.display())))?;
    if got != sha {
        let _ = tokio::fs::remove_file(&part).await;
        return Err(DlError::Fatal(format!(
            "SHA-256 mismatch: Civitai lists {sha}, the downloaded file is {got}; partial file removed"
        )));
    }
    // Never replace a different file that happens to have the same name.
    let mut target = final_path.clone();
    if tokio::fs::try_exists(&target).await.unwrap_or(false) {
        let stem = target
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("model")
            .to_string();
        target = target.with_file_name(format!("{stem}-{}.safetensors", &sha[..10]));
    }
    tokio::fs::rename(&part, &target)
        .await
        .map_err(|e| DlError::Fatal(format!("installing {}: {e}", target.display())))?;
    if let Some(dir) = target.parent() {
        // fsync the directory so the rename itself survives a crash.
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    let t2 = target.clone();
    let (ty, fam) = tokio::task::spawn_blocking(move || super::library::classify(&t2))
        .await
        .unwrap_or_else(|_| ("unknown".into(), "unknown".into()));
    // Civitai's type is more precise (LoCon vs LoRA); the header is more reliable for family.
    if rec.model_type == "unknown" {
        rec.model_type = ty;
    }
    if fam != "unknown" {
        rec.family = fam;
    }
    let meta = std::fs::metadata(&target).map_err(|e| DlError::Fatal(e.to_string()))?;
    rec.size_bytes = meta.len() as i64;
    rec.mtime_ms = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_millis() as i64);
    rec.filename = target
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    rec.path = Some(target.to_string_lossy().to_string());
    rec.status = "ready".into();
    rec.error = None;
    rec.download = None;
    ctx.repo.upsert_model(&rec).await?;
    Ok(rec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disposition_names_are_basenames() {
        assert_eq!(
            content_disposition_name("attachment; filename=\"dream.safetensors\"").as_deref(),
            Some("dream.safetensors")
        );
        assert_eq!(
            content_disposition_name(
                "attachment; filename=\"x\"; filename*=UTF-8''caf%C3%A9%20v1.safetensors"
            )
            .as_deref(),
            Some("café v1.safetensors")
        );
        assert_eq!(
            content_disposition_name("attachment; filename=\"../../etc/passwd\"").as_deref(),
            Some("passwd")
        );
        assert_eq!(
            content_disposition_name("attachment; filename=\"..\""),
            None
        );
        assert_eq!(content_disposition_name("inline"), None);
    }

    #[test]
    fn content_range_forms() {
        assert_eq!(content_range("bytes 100-199/1000"), (Some(100), Some(1000)));
        assert_eq!(content_range("bytes */1000"), (None, Some(1000)));
        assert_eq!(content_range("bytes 5-9/*"), (Some(5), None));
    }
}
