//! Model library, Civitai downloads (against a local fake Civitai) and pipeline endpoints.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path as AxPath, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use common::TestServer;
use serde_json::{json, Value};
use sha2::Digest;

// ---------------------------------------------------------------- fake Civitai

#[derive(Clone)]
struct FakeVersion {
    id: u64,
    model_id: u64,
    model_name: String,
    civ_type: &'static str,
    base_model: &'static str,
    trained_words: Vec<String>,
    /// Name in the API's files[] (the download's Content-Disposition name differs on purpose).
    api_name: String,
    disposition_name: String,
    format: &'static str,
    bytes: Vec<u8>,
    /// SHA-256 the API lists (normally that of `bytes`), uppercase like Civitai.
    listed_sha: String,
    needs_auth: bool,
    html: bool,
}

#[derive(Debug, Clone)]
struct StorageReq {
    auth: Option<String>,
    range: Option<String>,
    if_range: Option<String>,
}

#[derive(Default)]
struct Fake {
    versions: HashMap<u64, FakeVersion>,
    /// Authorization header of each `/api/download/models/{id}` request.
    download_auth: Vec<Option<String>>,
    storage: Vec<StorageReq>,
    storage_addr: String,
    /// The next N storage responses send `cut_at` bytes then drop the connection.
    cut_next: usize,
    /// The next N storage responses send `cut_at` bytes then hang.
    stall_next: usize,
    cut_at: usize,
    /// The next N ranged storage requests are answered 200 with the whole file (Range ignored).
    ignore_range_next: usize,
    /// When set, storage responses send their first chunk, then wait for this gate.
    gate: Option<Arc<tokio::sync::Semaphore>>,
    /// When set, the rest of a storage response (after the first chunk) goes out in chunks of
    /// this many bytes, one per interval: a slow download.
    trickle: Option<(usize, Duration)>,
}

type Shared = Arc<Mutex<Fake>>;

struct FakeCivitai {
    base_url: String,
    state: Shared,
}

impl FakeCivitai {
    fn lock(&self) -> std::sync::MutexGuard<'_, Fake> {
        self.state.lock().expect("fake lock")
    }
    fn add(&self, v: FakeVersion) {
        self.lock().versions.insert(v.id, v);
    }
    fn downloads(&self) -> usize {
        self.lock().download_auth.len()
    }
    fn storage(&self) -> Vec<StorageReq> {
        self.lock().storage.clone()
    }
}

fn version_json(v: &FakeVersion, base: &str) -> Value {
    let sha = v.listed_sha.to_uppercase();
    json!({
        "id": v.id, "modelId": v.model_id, "name": format!("v{}", v.id),
        "baseModel": v.base_model, "baseModelType": "Standard",
        "air": format!("urn:air:sd1:{}:civitai:{}@{}", v.civ_type.to_lowercase(), v.model_id, v.id),
        "status": "Published", "trainedWords": v.trained_words,
        "model": {"name": v.model_name, "type": v.civ_type, "nsfw": false, "poi": false},
        "files": [{
            "id": v.id * 10, "name": v.api_name, "type": "Model",
            "sizeKB": v.bytes.len() as f64 / 1024.0,
            "metadata": {"format": v.format, "size": "pruned", "fp": "fp16"},
            "pickleScanResult": "Success", "virusScanResult": "Success",
            "hashes": {"AutoV2": &sha[..10], "SHA256": sha, "CRC32": "DEADBEEF"},
            "downloadUrl": format!("{base}/api/download/models/{}", v.id),
            "primary": true,
        }],
        "images": [],
        "downloadUrl": format!("{base}/api/download/models/{}", v.id),
    })
}

async fn api_version(
    State((st, base)): State<(Shared, String)>,
    AxPath(id): AxPath<u64>,
) -> Response {
    let v = st.lock().expect("lock").versions.get(&id).cloned();
    match v {
        Some(v) => Json(version_json(&v, &base)).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            Json(json!({"error": "No model version"})),
        )
            .into_response(),
    }
}

async fn api_model(
    State((st, base)): State<(Shared, String)>,
    AxPath(id): AxPath<u64>,
) -> Response {
    let mut vs: Vec<FakeVersion> = st
        .lock()
        .expect("lock")
        .versions
        .values()
        .filter(|v| v.model_id == id)
        .cloned()
        .collect();
    if vs.is_empty() {
        return StatusCode::NOT_FOUND.into_response();
    }
    vs.sort_by_key(|v| std::cmp::Reverse(v.id)); // newest first, as Civitai lists them
    let first = vs[0].clone();
    Json(json!({
        "id": id, "name": first.model_name, "type": first.civ_type,
        "modelVersions": vs.iter().map(|v| {
            let mut j = version_json(v, &base);
            j.as_object_mut().expect("object").remove("model");
            j
        }).collect::<Vec<_>>(),
    }))
    .into_response()
}

async fn api_by_hash(
    State((st, base)): State<(Shared, String)>,
    AxPath(hash): AxPath<String>,
) -> Response {
    let v = st
        .lock()
        .expect("lock")
        .versions
        .values()
        .find(|v| v.listed_sha.eq_ignore_ascii_case(&hash))
        .cloned();
    match v {
        Some(v) => Json(version_json(&v, &base)).into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn api_download(
    State((st, _)): State<(Shared, String)>,
    AxPath(id): AxPath<u64>,
    headers: HeaderMap,
) -> Response {
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let mut g = st.lock().expect("lock");
    g.download_auth.push(auth.clone());
    let Some(v) = g.versions.get(&id).cloned() else {
        return StatusCode::NOT_FOUND.into_response();
    };
    if v.needs_auth && auth.is_none() {
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({"error": "Unauthorized", "message": "The creator of this asset requires you to be logged in to download it"})),
        )
            .into_response();
    }
    if v.html {
        return (
            [("content-type", "text/html; charset=utf-8")],
            "<!DOCTYPE html><html><body>Please log in</body></html>",
        )
            .into_response();
    }
    // Civitai answers with a presigned URL on another host.
    let loc = format!("http://{}/file/{id}?X-Amz-Signature=abc", g.storage_addr);
    (StatusCode::TEMPORARY_REDIRECT, [("location", loc)]).into_response()
}

async fn storage_file(
    State(st): State<Shared>,
    AxPath(id): AxPath<u64>,
    headers: HeaderMap,
) -> Response {
    let h = |n: &str| {
        headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let (v, cut, stall, cut_at, gate, ignore_range, trickle) = {
        let mut g = st.lock().expect("lock");
        g.storage.push(StorageReq {
            auth: h("authorization"),
            range: h("range"),
            if_range: h("if-range"),
        });
        let Some(v) = g.versions.get(&id).cloned() else {
            return StatusCode::NOT_FOUND.into_response();
        };
        let cut = g.cut_next > 0;
        let stall = !cut && g.stall_next > 0;
        if cut {
            g.cut_next -= 1;
        } else if stall {
            g.stall_next -= 1;
        }
        let ignore_range = h("range").is_some() && g.ignore_range_next > 0;
        if ignore_range {
            g.ignore_range_next -= 1;
        }
        (
            v,
            cut,
            stall,
            g.cut_at,
            g.gate.clone(),
            ignore_range,
            g.trickle,
        )
    };
    let etag = format!("\"etag-{id}\"");
    let len = v.bytes.len();
    let mut start = 0usize;
    if let Some(r) = h("range").filter(|_| !ignore_range) {
        let if_range_ok = h("if-range").is_none_or(|x| x == etag);
        if if_range_ok {
            start = r
                .trim_start_matches("bytes=")
                .split('-')
                .next()
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            if start >= len {
                return (
                    StatusCode::RANGE_NOT_SATISFIABLE,
                    [("content-range", format!("bytes */{len}"))],
                )
                    .into_response();
            }
        }
    }
    let body_bytes = bytes::Bytes::copy_from_slice(&v.bytes[start..]);
    let first_len = if cut || stall {
        cut_at.saturating_sub(start).min(body_bytes.len())
    } else {
        (body_bytes.len() / 4).max(1)
    };
    let first = body_bytes.slice(..first_len);
    let rest = body_bytes.slice(first_len..);
    let stream = async_stream(first, rest, cut, stall, gate, trickle);
    let mut resp = Response::new(Body::from_stream(stream));
    let hm = resp.headers_mut();
    hm.insert(
        "content-type",
        "application/octet-stream".parse().expect("hv"),
    );
    hm.insert(
        "content-disposition",
        format!("attachment; filename=\"{}\"", v.disposition_name)
            .parse()
            .expect("hv"),
    );
    hm.insert("etag", etag.parse().expect("hv"));
    hm.insert("accept-ranges", "bytes".parse().expect("hv"));
    hm.insert(
        "content-length",
        (len - start).to_string().parse().expect("hv"),
    );
    if start > 0 {
        *resp.status_mut() = StatusCode::PARTIAL_CONTENT;
        resp.headers_mut().insert(
            "content-range",
            format!("bytes {start}-{}/{len}", len - 1)
                .parse()
                .expect("hv"),
        );
    }
    resp
}

fn async_stream(
    first: bytes::Bytes,
    rest: bytes::Bytes,
    cut: bool,
    stall: bool,
    gate: Option<Arc<tokio::sync::Semaphore>>,
    trickle: Option<(usize, Duration)>,
) -> impl futures::Stream<Item = Result<bytes::Bytes, std::io::Error>> + Send {
    // State: (step, offset into `rest` while trickling).
    futures::stream::unfold((0u8, 0usize), move |(step, off)| {
        let (first, rest, gate) = (first.clone(), rest.clone(), gate.clone());
        async move {
            match step {
                0 => Some((Ok(first), (1, 0))),
                1 if cut => {
                    // Let the server flush the first chunk before the connection drops.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    let cut = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "cut");
                    Some((Err(cut), (2, 0)))
                }
                1 if stall => {
                    futures::future::pending::<()>().await;
                    None
                }
                1 | 3 => {
                    if step == 1 {
                        if let Some(g) = gate {
                            let _ = g.acquire().await.map(|p| p.forget());
                        }
                    }
                    match trickle {
                        None => Some((Ok(rest), (2, 0))),
                        Some(_) if off >= rest.len() => None,
                        Some((size, every)) => {
                            tokio::time::sleep(every).await;
                            let end = (off + size.max(1)).min(rest.len());
                            Some((Ok(rest.slice(off..end)), (3, end)))
                        }
                    }
                }
                _ => None,
            }
        }
    })
}

async fn start_fake() -> FakeCivitai {
    let api_l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let storage_l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}", api_l.local_addr().expect("addr"));
    let state: Shared = Arc::new(Mutex::new(Fake {
        storage_addr: storage_l.local_addr().expect("addr").to_string(),
        cut_at: 300_000,
        ..Default::default()
    }));
    let api = Router::new()
        .route("/api/v1/model-versions/by-hash/{hash}", get(api_by_hash))
        .route("/api/v1/model-versions/{id}", get(api_version))
        .route("/api/v1/models/{id}", get(api_model))
        .route("/api/download/models/{id}", get(api_download))
        .with_state((state.clone(), base.clone()));
    let storage = Router::new()
        .route("/file/{id}", get(storage_file))
        .with_state(state.clone());
    tokio::spawn(async move { axum::serve(api_l, api).await });
    tokio::spawn(async move { axum::serve(storage_l, storage).await });
    FakeCivitai {
        base_url: base,
        state,
    }
}

/// A valid safetensors file (one F32 tensor) of about `floats * 4` bytes.
fn fake_safetensors(seed: u32, floats: usize) -> Vec<u8> {
    let header = format!(
        r#"{{"__metadata__":{{"seed":"{seed}"}},"w":{{"dtype":"F32","shape":[{floats}],"data_offsets":[0,{}]}}}}"#,
        floats * 4
    );
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    for i in 0..floats as u32 {
        out.extend_from_slice(&(i.wrapping_mul(2654435761) ^ seed).to_le_bytes());
    }
    out
}

fn sha_hex(b: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(b))
}

fn lora_version(id: u64, model_id: u64, seed: u32) -> FakeVersion {
    let bytes = fake_safetensors(seed, 256 * 1024);
    FakeVersion {
        id,
        model_id,
        model_name: format!("Detail Tweaker {model_id}"),
        civ_type: "LORA",
        base_model: "SD 1.5",
        trained_words: vec!["detailed".into(), "sharp focus".into()],
        api_name: format!("api_name_{id}.safetensors"),
        disposition_name: format!("detail_tweaker_{id}.safetensors"),
        format: "SafeTensor",
        listed_sha: sha_hex(&bytes).to_uppercase(),
        bytes,
        needs_auth: false,
        html: false,
    }
}

// ---------------------------------------------------------------- helpers

async fn start_with_fake(fake: &FakeCivitai) -> TestServer {
    let base = fake.base_url.clone();
    TestServer::start_with(move |c| c.civitai.base_url = base).await
}

async fn model(ts: &TestServer, sha: &str) -> (u16, Value) {
    ts.get_json(&format!("/api/v1/models/{sha}")).await
}

/// Polls until the model reaches `want` (or a terminal status), returning the record.
async fn wait_status(ts: &TestServer, sha: &str, want: &str) -> Value {
    for _ in 0..600 {
        let (code, m) = model(ts, sha).await;
        if code == 200 && (m["status"] == want || m["status"] == "failed" || m["status"] == "ready")
        {
            assert_eq!(m["status"], want, "model {sha}: {m}");
            return m;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("model {sha} never reached {want}");
}

/// Reads an SSE body to its end: (event, data) pairs.
async fn sse_events(resp: reqwest::Response) -> Vec<(String, Value)> {
    let text = tokio::time::timeout(Duration::from_secs(60), resp.text())
        .await
        .expect("SSE stream ends")
        .expect("body");
    let mut out = Vec::new();
    for block in text.split("\n\n") {
        let mut ev = None;
        let mut data = String::new();
        for line in block.lines() {
            if let Some(e) = line.strip_prefix("event:") {
                ev = Some(e.trim().to_string());
            } else if let Some(d) = line.strip_prefix("data:") {
                data.push_str(d.trim());
            }
        }
        if let Some(e) = ev {
            out.push((e, serde_json::from_str(&data).unwrap_or(Value::Null)));
        }
    }
    out
}

fn models_dir(ts: &TestServer) -> PathBuf {
    ts.dir.path().join("data").join("models")
}

fn write_tiny_ckpt(path: &Path, seed: u64) {
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    sd_engine::tiny::write_tiny_checkpoint(sd_engine::Family::Sd1, false, seed, path)
        .expect("tiny checkpoint");
}

async fn post(ts: &TestServer, path: &str, body: Value) -> (u16, Value) {
    ts.post_json(path, &body).await
}

async fn delete(ts: &TestServer, path: &str) -> (u16, Value) {
    let r = ts
        .client
        .delete(ts.url(path))
        .send()
        .await
        .expect("request");
    let code = r.status().as_u16();
    (code, r.json().await.unwrap_or(Value::Null))
}

/// A library with one tiny SD1 checkpoint and one LoRA for it, registered by a scan.
async fn library_server() -> (TestServer, String, String) {
    let ts = TestServer::start().await;
    let dir = models_dir(&ts);
    let ckpt = dir.join("checkpoints").join("tiny_sd1.safetensors");
    write_tiny_ckpt(&ckpt, 1);
    let lora = dir.join("loras").join("tiny_lora.safetensors");
    std::fs::create_dir_all(lora.parent().expect("parent")).expect("mkdir");
    sd_engine::tiny::write_tiny_lora(&ckpt, sd_engine::lora::LoraKind::Lora, 2, &lora)
        .expect("tiny lora");
    let (code, report) = post(&ts, "/api/v1/models/scan", json!({})).await;
    assert_eq!(code, 200, "{report}");
    let ck_sha = sd_host::models::library::hash_file(&ckpt).expect("hash");
    let lora_sha = sd_host::models::library::hash_file(&lora).expect("hash");
    (ts, ck_sha, lora_sha)
}

// ---------------------------------------------------------------- library

#[tokio::test]
async fn scan_hashes_new_files_once_and_library_filters() {
    let ts = TestServer::start().await;
    let dir = models_dir(&ts);
    let ckpt = dir.join("checkpoints").join("tiny_sd1.safetensors");
    write_tiny_ckpt(&ckpt, 1);
    let lora = dir.join("loras").join("tiny_lora.safetensors");
    std::fs::create_dir_all(lora.parent().expect("parent")).expect("mkdir");
    sd_engine::tiny::write_tiny_lora(&ckpt, sd_engine::lora::LoraKind::Lora, 2, &lora)
        .expect("tiny lora");
    std::fs::write(dir.join("ignored.ckpt"), b"pickle").expect("write");

    // Progress of the scan is streamed while it hashes.
    let mut watch = ts
        .client
        .get(ts.url("/api/v1/models/scan/events"))
        .send()
        .await
        .expect("scan sse");
    assert_eq!(watch.status(), 200);
    let (code, report) = post(&ts, "/api/v1/models/scan", json!({})).await;
    assert_eq!(code, 200);
    assert_eq!(report["hashed"], 2, "{report}");
    let mut seen = String::new();
    while !(seen.contains("tiny_sd1.safetensors") && seen.contains("tiny_lora.safetensors")) {
        match tokio::time::timeout(Duration::from_secs(10), watch.chunk()).await {
            Ok(Ok(Some(c))) => seen.push_str(&String::from_utf8_lossy(&c)),
            other => panic!("scan progress stream ended early: {other:?}; got {seen}"),
        }
    }
    assert!(seen.contains("event: progress"), "{seen}");
    assert_eq!(report["found"], 2);
    let ck_sha = sha_hex(&std::fs::read(&ckpt).expect("read"));
    let lora_sha = sha_hex(&std::fs::read(&lora).expect("read"));

    // Nothing changed: nothing is hashed again.
    let (_, again) = post(&ts, "/api/v1/models/scan", json!({})).await;
    assert_eq!(again["hashed"], 0, "{again}");
    assert_eq!(again["found"], 2);

    let (code, m) = model(&ts, &ck_sha).await;
    assert_eq!(code, 200);
    assert_eq!(m["type"], "checkpoint");
    assert_eq!(m["family"], "sd1");
    assert_eq!(m["status"], "ready");
    assert_eq!(m["short_hash"], &ck_sha[..10]);
    assert!(m.get("path").is_none(), "server paths are not exposed");
    let (_, l) = model(&ts, &lora_sha).await;
    assert_eq!(l["type"], "lora");

    let (_, all) = ts.get_json("/api/v1/models").await;
    assert_eq!(all["models"].as_array().expect("list").len(), 2);
    let (_, loras) = ts.get_json("/api/v1/models?type=lora").await;
    let loras = loras["models"].as_array().expect("list").clone();
    assert_eq!(loras.len(), 1);
    assert_eq!(loras[0]["sha256"], lora_sha.as_str());
    let (_, q) = ts.get_json("/api/v1/models?q=TINY_SD1").await;
    assert_eq!(q["models"][0]["sha256"], ck_sha.as_str());
    let (_, fam) = ts.get_json("/api/v1/models?family=sdxl").await;
    assert!(fam["models"].as_array().expect("list").is_empty());
    let (code, _) = ts.get_json("/api/v1/models?type=hypernetwork").await;
    assert_eq!(code, 422);

    // A changed file is hashed again and gets its new identity.
    write_tiny_ckpt(&ckpt, 9);
    let (_, third) = post(&ts, "/api/v1/models/scan", json!({})).await;
    assert_eq!(third["hashed"], 1, "{third}");
    let new_sha = sha_hex(&std::fs::read(&ckpt).expect("read"));
    assert_eq!(model(&ts, &new_sha).await.0, 200);
    // The old identity no longer has a file: never offered for tasks again.
    assert_eq!(third["missing"], json!([ck_sha]), "{third}");
    assert_eq!(model(&ts, &ck_sha).await.1["status"], "failed");
    std::fs::remove_file(&lora).expect("rm");
    let (_, fourth) = post(&ts, "/api/v1/models/scan", json!({})).await;
    assert_eq!(fourth["missing"], json!([lora_sha]), "{fourth}");
    assert_eq!(model(&ts, &lora_sha).await.1["status"], "failed");
    assert_eq!(model(&ts, &new_sha).await.1["status"], "ready");

    assert_eq!(model(&ts, &"0".repeat(64)).await.0, 404);
    let (_, doc) = ts.get_json("/openapi.json").await;
    for p in [
        "/api/v1/models",
        "/api/v1/models/{sha256}",
        "/api/v1/models/scan",
        "/api/v1/models/add-from-civitai",
        "/api/v1/models/add-from-civitai/{sha256}",
        "/api/v1/pipeline/status",
        "/api/v1/pipeline/load-checkpoint/{sha256}",
        "/api/v1/pipeline/load-loras",
    ] {
        assert!(doc["paths"].get(p).is_some(), "{p} documented");
    }
    assert_eq!(model(&ts, &"A".repeat(64)).await.0, 422);
}

#[tokio::test]
async fn pipeline_load_checkpoint_and_loras_change_status() {
    let (ts, ck, lora) = library_server().await;
    let (code, st) = ts.get_json("/api/v1/pipeline/status").await;
    assert_eq!(code, 200);
    assert!(st["checkpoint"].is_null(), "{st}");
    assert_eq!(st["device"], "cpu");
    assert!(st["memory"]["rss_bytes"].as_u64().expect("rss") > 0);
    assert_eq!(st["queue"]["pending"], 0);

    // LoRAs need a checkpoint first.
    let (code, _) = post(
        &ts,
        "/api/v1/pipeline/load-loras",
        json!({"loras": [{"sha256": lora, "weight": 0.8}]}),
    )
    .await;
    assert_eq!(code, 409);

    let (code, st) = post(
        &ts,
        &format!("/api/v1/pipeline/load-checkpoint/{ck}"),
        json!({}),
    )
    .await;
    assert_eq!(code, 200, "{st}");
    let (_, st) = ts.get_json("/api/v1/pipeline/status").await;
    assert_eq!(st["checkpoint"]["sha256"], ck.as_str());
    assert_eq!(st["checkpoint"]["family"], "sd1");
    let (_, health) = ts.get_json("/health").await;
    assert_eq!(health["model_loaded"], true);
    // Loading it again is a no-op.
    let loads = ts
        .server
        .state
        .engine
        .loads
        .load(std::sync::atomic::Ordering::Relaxed);
    let (code, _) = post(
        &ts,
        &format!("/api/v1/pipeline/load-checkpoint/{ck}"),
        json!({}),
    )
    .await;
    assert_eq!(code, 200);
    assert_eq!(
        ts.server
            .state
            .engine
            .loads
            .load(std::sync::atomic::Ordering::Relaxed),
        loads
    );

    let (code, st) = post(
        &ts,
        "/api/v1/pipeline/load-loras",
        json!({"loras": [{"sha256": lora, "weight": 0.8}]}),
    )
    .await;
    assert_eq!(code, 200, "{st}");
    assert_eq!(st["loras"][0]["sha256"], lora.as_str());
    assert!((st["loras"][0]["weight"].as_f64().expect("w") - 0.8).abs() < 1e-6);
    // Append of the same LoRA updates its weight rather than stacking it.
    let (_, st) = post(
        &ts,
        "/api/v1/pipeline/load-loras",
        json!({"loras": [{"sha256": lora, "weight": 0.5}], "mode": "append"}),
    )
    .await;
    assert_eq!(st["loras"].as_array().expect("loras").len(), 1);
    assert!((st["loras"][0]["weight"].as_f64().expect("w") - 0.5).abs() < 1e-6);
    let (_, st) = post(&ts, "/api/v1/pipeline/load-loras", json!({"loras": []})).await;
    assert!(st["loras"].as_array().expect("loras").is_empty());

    // Wrong kinds and unknown models.
    let (code, _) = post(
        &ts,
        &format!("/api/v1/pipeline/load-checkpoint/{lora}"),
        json!({}),
    )
    .await;
    assert_eq!(code, 422);
    let (code, _) = post(
        &ts,
        &format!("/api/v1/pipeline/load-checkpoint/{}", "1".repeat(64)),
        json!({}),
    )
    .await;
    assert_eq!(code, 404);
    let (code, _) = post(
        &ts,
        "/api/v1/pipeline/load-loras",
        json!({"loras": [{"sha256": ck}], "mode": "replace"}),
    )
    .await;
    assert_eq!(code, 422);
    let (code, _) = post(
        &ts,
        "/api/v1/pipeline/load-loras",
        json!({"loras": [], "mode": "sideways"}),
    )
    .await;
    assert_eq!(code, 422);
}

#[tokio::test]
async fn delete_refuses_with_pending_tasks_unless_forced() {
    let (ts, ck, lora) = library_server().await;
    let (code, _) = post(
        &ts,
        &format!("/api/v1/pipeline/load-checkpoint/{ck}"),
        json!({}),
    )
    .await;
    assert_eq!(code, 200);
    // An unused model goes at once.
    let (code, body) = delete(&ts, &format!("/api/v1/models/{lora}")).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(model(&ts, &lora).await.0, 404);
    assert!(!models_dir(&ts).join("loras/tiny_lora.safetensors").exists());

    let (code, _) = post(&ts, "/api/v1/queue/pause", json!({})).await;
    assert_eq!(code, 200);
    let (code, task) = post(
        &ts,
        "/api/v1/tasks",
        json!({"prompt": "a cat", "model": ck, "width": 64, "height": 64, "num_inference_steps": 1}),
    )
    .await;
    assert_eq!(code, 202, "{task}");
    let task_id = task["task_id"].as_str().expect("task id").to_string();

    let (code, body) = delete(&ts, &format!("/api/v1/models/{ck}")).await;
    assert_eq!(code, 409, "{body}");
    assert_eq!(model(&ts, &ck).await.0, 200, "nothing deleted on 409");

    let (code, body) = delete(&ts, &format!("/api/v1/models/{ck}?force=true")).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["failed_tasks"][0], task_id.as_str());
    let (_, t) = ts.get_json(&format!("/api/v1/tasks/{task_id}")).await;
    assert_eq!(t["status"], "failed", "{t}");
    assert!(t.to_string().contains("was deleted"), "{t}");
    assert_eq!(model(&ts, &ck).await.0, 404);
    assert!(!models_dir(&ts)
        .join("checkpoints/tiny_sd1.safetensors")
        .exists());
    // It was resident: it is unloaded.
    let (_, st) = ts.get_json("/api/v1/pipeline/status").await;
    assert!(st["checkpoint"].is_null(), "{st}");
    assert_eq!(delete(&ts, &format!("/api/v1/models/{ck}")).await.0, 404);
}

// ---------------------------------------------------------------- Civitai

#[tokio::test]
async fn add_from_civitai_every_input_form() {
    let fake = start_fake().await;
    let old = lora_version(130071, 4201, 1);
    let latest = lora_version(130072, 4201, 2);
    fake.add(old.clone());
    fake.add(latest.clone());
    let other = lora_version(555, 77, 3);
    fake.add(other.clone());
    let ts = start_with_fake(&fake).await;
    let base = fake.base_url.clone();

    // Version id: 202, lowercase sha of Civitai's uppercase SHA256, tracking URL.
    let (code, r) = post(
        &ts,
        "/api/v1/models/add-from-civitai",
        json!({"model_version_id": 130071}),
    )
    .await;
    assert_eq!(code, 202, "{r}");
    let old_sha = old.listed_sha.to_lowercase();
    assert_eq!(r["sha256"], old_sha.as_str());
    assert!(r["tracking_url"]
        .as_str()
        .expect("url")
        .ends_with(&format!("/api/v1/models/add-from-civitai/{old_sha}")));
    let m = wait_status(&ts, &old_sha, "ready").await;
    assert_eq!(m["type"], "lora");
    assert_eq!(m["family"], "sd1");
    assert_eq!(
        m["filename"], "detail_tweaker_130071.safetensors",
        "Content-Disposition name"
    );
    assert_eq!(m["size_bytes"], old.bytes.len());
    let c = &m["source"]["civitai"];
    assert_eq!(c["model_id"], 4201);
    assert_eq!(c["version_id"], 130071);
    assert_eq!(c["base_model"], "SD 1.5");
    assert_eq!(c["type"], "LORA");
    assert_eq!(c["trained_words"], json!(["detailed", "sharp focus"]));
    assert_eq!(c["air"], "urn:air:sd1:lora:civitai:4201@130071");
    let on_disk = models_dir(&ts)
        .join("lora")
        .join("detail_tweaker_130071.safetensors");
    assert_eq!(std::fs::read(&on_disk).expect("installed"), old.bytes);

    // Model id → its latest version.
    let (code, r) = post(
        &ts,
        "/api/v1/models/add-from-civitai",
        json!({"model_id": 4201}),
    )
    .await;
    assert_eq!(code, 202, "{r}");
    let new_sha = latest.listed_sha.to_lowercase();
    assert_eq!(r["sha256"], new_sha.as_str());
    wait_status(&ts, &new_sha, "ready").await;

    // Every other form of the same versions answers 200 with the same sha256.
    for (body, sha) in [
        (
            json!({"url": format!("{base}/models/4201/detail-tweaker?modelVersionId=130071")}),
            &old_sha,
        ),
        (json!({"url": format!("{base}/models/4201")}), &new_sha),
        (
            json!({"url": format!("https://civitai.com/api/download/models/130072")}),
            &new_sha,
        ),
        (
            json!({"air": "urn:air:sd1:lora:civitai:4201@130071"}),
            &old_sha,
        ),
        (json!({"air": "urn:air:sd1:lora:civitai:4201"}), &new_sha),
        (
            json!({"model_version_id": 130072, "file_id": 1300720}),
            &new_sha,
        ),
    ] {
        let (code, r) = post(&ts, "/api/v1/models/add-from-civitai", body.clone()).await;
        assert_eq!(code, 200, "{body} → {r}");
        assert_eq!(r["sha256"], sha.as_str(), "{body}");
        assert_eq!(r["status"], "ready");
    }
    // A fresh version by page URL starts a download.
    let (code, r) = post(
        &ts,
        "/api/v1/models/add-from-civitai",
        json!({"url": "https://civitai.com/models/77/x?modelVersionId=555"}),
    )
    .await;
    assert_eq!(code, 202, "{r}");
    wait_status(&ts, &other.listed_sha.to_lowercase(), "ready").await;
    assert_eq!(fake.downloads(), 3, "one download per version");

    // Bad references.
    for bad in [
        json!({}),
        json!({"model_id": 1, "model_version_id": 2}),
        json!({"url": "https://example.com/models/4201"}),
        json!({"air": "urn:air:sd1:lora:huggingface:1@2"}),
        json!({"model_version_id": 130072, "file_id": 99}),
        json!({"model_version_id": "abc"}),
    ] {
        let (code, r) = post(&ts, "/api/v1/models/add-from-civitai", bad.clone()).await;
        assert_eq!(code, 422, "{bad} → {r}");
    }
    let (code, _) = post(
        &ts,
        "/api/v1/models/add-from-civitai",
        json!({"model_version_id": 999999}),
    )
    .await;
    assert_eq!(code, 404);
}

#[tokio::test]
async fn sse_progress_events_in_order_then_ready_once() {
    let fake = start_fake().await;
    let v = lora_version(10, 1, 5);
    fake.add(v.clone());
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    fake.lock().gate = Some(gate.clone());
    let ts = start_with_fake(&fake).await;
    let (code, r) = post(
        &ts,
        "/api/v1/models/add-from-civitai",
        json!({"model_version_id": 10}),
    )
    .await;
    assert_eq!(code, 202, "{r}");
    let sha = r["sha256"].as_str().expect("sha").to_string();
    // The stream is subscribed once the response head arrives; only then let the bytes flow.
    let resp = ts
        .client
        .get(r["tracking_url"].as_str().expect("url"))
        .send()
        .await
        .expect("sse");
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .expect("ct")
        .starts_with("text/event-stream"));
    gate.add_permits(100);
    let events = sse_events(resp).await;
    let names: Vec<&str> = events.iter().map(|(e, _)| e.as_str()).collect();
    assert!(names.len() >= 3, "{names:?}");
    let n = names.len();
    assert_eq!(names[n - 1], "ready", "{names:?}");
    assert_eq!(names[n - 2], "verifying", "{names:?}");
    assert!(names[..n - 2].iter().all(|e| *e == "progress"), "{names:?}");
    let progress: Vec<&Value> = events
        .iter()
        .filter(|(e, _)| e == "progress")
        .map(|(_, d)| d)
        .collect();
    let mut last = 0;
    for p in &progress {
        let d = p["downloaded_bytes"].as_u64().expect("downloaded");
        assert!(d >= last, "progress never goes back");
        last = d;
        assert_eq!(p["total_bytes"], v.bytes.len());
        assert!(p.get("bytes_per_s").is_some() && p.get("eta_s").is_some());
    }
    assert_eq!(
        last,
        v.bytes.len() as u64,
        "last progress is the whole file"
    );
    assert_eq!(events[n - 1].1["sha256"], sha.as_str());

    // A ready model: one `ready` and the stream closes (both routes).
    for path in [
        format!("/api/v1/models/{sha}"),
        format!("/api/v1/models/add-from-civitai/{sha}"),
    ] {
        let resp = ts
            .client
            .get(ts.url(&path))
            .header("accept", "text/event-stream")
            .send()
            .await
            .expect("sse");
        let evs = sse_events(resp).await;
        assert_eq!(evs.len(), 1, "{path}: {evs:?}");
        assert_eq!(evs[0].0, "ready");
    }
}

#[tokio::test]
async fn repeated_add_starts_one_download_and_ready_returns_200() {
    let fake = start_fake().await;
    let v = lora_version(20, 2, 6);
    fake.add(v.clone());
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    fake.lock().gate = Some(gate.clone());
    let ts = start_with_fake(&fake).await;
    let body = json!({"model_version_id": 20});
    let (c1, r1) = post(&ts, "/api/v1/models/add-from-civitai", body.clone()).await;
    let (c2, r2) = post(&ts, "/api/v1/models/add-from-civitai", body.clone()).await;
    assert_eq!((c1, c2), (202, 202), "{r1} {r2}");
    assert_eq!(r1["sha256"], r2["sha256"]);
    let sha = r1["sha256"].as_str().expect("sha").to_string();
    let (_, m) = model(&ts, &sha).await;
    assert_eq!(m["status"], "downloading");
    gate.add_permits(100);
    wait_status(&ts, &sha, "ready").await;
    let (c3, r3) = post(&ts, "/api/v1/models/add-from-civitai", body).await;
    assert_eq!(c3, 200);
    assert_eq!(r3["status"], "ready");
    assert_eq!(r3["sha256"], sha.as_str());
    assert_eq!(fake.downloads(), 1, "exactly one download");
    assert_eq!(fake.storage().len(), 1);
}

#[tokio::test]
async fn interrupted_download_resumes_with_range() {
    let fake = start_fake().await;
    let v = lora_version(30, 3, 7);
    fake.add(v.clone());
    {
        let mut g = fake.lock();
        g.cut_next = 1;
        g.cut_at = 300_000;
    }
    let ts = start_with_fake(&fake).await;
    let (code, r) = post(
        &ts,
        "/api/v1/models/add-from-civitai",
        json!({"model_version_id": 30}),
    )
    .await;
    assert_eq!(code, 202, "{r}");
    let sha = r["sha256"].as_str().expect("sha").to_string();
    wait_status(&ts, &sha, "ready").await;
    let reqs = fake.storage();
    assert!(reqs.len() >= 2, "{reqs:?}");
    assert_eq!(reqs[0].range, None);
    assert_eq!(reqs[1].range.as_deref(), Some("bytes=300000-"), "{reqs:?}");
    assert_eq!(reqs[1].if_range.as_deref(), Some("\"etag-30\""));
    let file = models_dir(&ts).join("lora").join(&v.disposition_name);
    assert_eq!(sha_hex(&std::fs::read(file).expect("installed")), sha);
}

#[tokio::test]
async fn download_resumes_after_server_restart() {
    let fake = start_fake().await;
    let v = lora_version(40, 4, 8);
    fake.add(v.clone());
    {
        let mut g = fake.lock();
        g.stall_next = 1;
        g.cut_at = 200_000;
    }
    let ts = start_with_fake(&fake).await;
    let (code, r) = post(
        &ts,
        "/api/v1/models/add-from-civitai",
        json!({"model_version_id": 40}),
    )
    .await;
    assert_eq!(code, 202, "{r}");
    let sha = r["sha256"].as_str().expect("sha").to_string();
    let part = models_dir(&ts)
        .join("lora")
        .join(format!("{}.part", v.disposition_name));
    let mut have = 0;
    for _ in 0..600 {
        have = std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
        if have >= 200_000 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(have, 200_000, "first bytes written to .part");
    let (_, m) = model(&ts, &sha).await;
    assert_eq!(m["status"], "downloading");

    // A progress stream open at shutdown ends (with `interrupted`) instead of holding the stop.
    let watcher = ts
        .client
        .get(ts.url(&format!("/api/v1/models/add-from-civitai/{sha}")))
        .send()
        .await
        .expect("sse");
    let TestServer { server, dir, .. } = ts;
    server.stop().await.expect("stop");
    let evs = sse_events(watcher).await;
    assert_eq!(
        evs.last().map(|e| e.0.as_str()),
        Some("interrupted"),
        "{evs:?}"
    );
    let base = fake.base_url.clone();
    let ts = TestServer::start_in(dir, move |c| c.civitai.base_url = base).await;
    wait_status(&ts, &sha, "ready").await;
    let reqs = fake.storage();
    assert_eq!(reqs.len(), 2, "{reqs:?}");
    assert_eq!(reqs[1].range.as_deref(), Some("bytes=200000-"));
    assert!(!part.exists());
    let file = models_dir(&ts).join("lora").join(&v.disposition_name);
    assert_eq!(std::fs::read(file).expect("installed"), v.bytes);
}

/// What a restart finds in `.part` decides the 416 path: a part as long as the file is verified
/// as it is (no second body), a part longer than the file is thrown away and fetched from zero.
#[tokio::test]
async fn range_not_satisfiable_verifies_a_complete_part_or_restarts_from_zero() {
    let fake = start_fake().await;
    let (complete, too_long) = (lora_version(41, 4, 81), lora_version(42, 4, 82));
    fake.add(complete.clone());
    fake.add(too_long.clone());
    {
        let mut g = fake.lock();
        g.stall_next = 2;
        g.cut_at = 100_000;
    }
    let ts = start_with_fake(&fake).await;
    let mut shas = vec![];
    for id in [41, 42] {
        let (code, r) = post(
            &ts,
            "/api/v1/models/add-from-civitai",
            json!({"model_version_id": id}),
        )
        .await;
        assert_eq!(code, 202, "{r}");
        shas.push(r["sha256"].as_str().expect("sha").to_string());
    }
    let part = |v: &FakeVersion| {
        models_dir(&ts)
            .join("lora")
            .join(format!("{}.part", v.disposition_name))
    };
    let (p_complete, p_long) = (part(&complete), part(&too_long));
    for p in [&p_complete, &p_long] {
        for _ in 0..600 {
            if std::fs::metadata(p).map(|m| m.len()).unwrap_or(0) >= 100_000 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let TestServer { server, dir, .. } = ts;
    server.stop().await.expect("stop");
    // While stopped: one part got all its bytes, the other more bytes than the file has.
    std::fs::write(&p_complete, &complete.bytes).expect("complete part");
    let mut long = too_long.bytes.clone();
    long.extend_from_slice(b"stale bytes from another file");
    std::fs::write(&p_long, &long).expect("long part");
    let before = fake.storage().len();

    let base = fake.base_url.clone();
    let ts = TestServer::start_in(dir, move |c| c.civitai.base_url = base).await;
    for sha in &shas {
        wait_status(&ts, sha, "ready").await;
    }
    let reqs = fake.storage()[before..].to_vec();
    let ranged = |n: usize| Some(format!("bytes={n}-"));
    assert_eq!(
        reqs.iter()
            .filter(|r| r.range == ranged(complete.bytes.len()))
            .count(),
        1,
        "{reqs:?}"
    );
    assert_eq!(
        reqs.iter()
            .filter(|r| r.range == ranged(long.len()))
            .count(),
        1,
        "{reqs:?}"
    );
    // Only the too-long part needed its body again, from zero.
    assert_eq!(
        reqs.iter().filter(|r| r.range.is_none()).count(),
        1,
        "{reqs:?}"
    );
    assert_eq!(reqs.len(), 3, "{reqs:?}");
    for v in [&complete, &too_long] {
        let file = models_dir(&ts).join("lora").join(&v.disposition_name);
        assert_eq!(std::fs::read(file).expect("installed"), v.bytes);
    }
    assert!(!p_complete.exists() && !p_long.exists());
}

#[tokio::test]
async fn hash_mismatch_fails_and_removes_partial_file() {
    let fake = start_fake().await;
    let mut v = lora_version(50, 5, 9);
    v.listed_sha = "AB".repeat(32);
    fake.add(v.clone());
    let ts = start_with_fake(&fake).await;
    let (code, r) = post(
        &ts,
        "/api/v1/models/add-from-civitai",
        json!({"model_version_id": 50}),
    )
    .await;
    assert_eq!(code, 202, "{r}");
    let sha = "ab".repeat(32);
    assert_eq!(r["sha256"], sha.as_str());
    let m = wait_status(&ts, &sha, "failed").await;
    assert!(
        m["error"].as_str().expect("error").contains("mismatch"),
        "{m}"
    );
    let lora_dir = models_dir(&ts).join("lora");
    let leftovers: Vec<_> = std::fs::read_dir(&lora_dir)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let resp = ts
        .client
        .get(ts.url(&format!("/api/v1/models/add-from-civitai/{sha}")))
        .send()
        .await
        .expect("sse");
    let evs = sse_events(resp).await;
    assert_eq!(evs.len(), 1);
    assert_eq!(evs[0].0, "failed");
    assert!(evs[0].1["detail"]
        .as_str()
        .expect("detail")
        .contains("mismatch"));
}

#[tokio::test]
async fn token_goes_to_civitai_only_never_to_storage_or_config() {
    let fake = start_fake().await;
    let mut v = lora_version(60, 6, 10);
    v.needs_auth = true;
    fake.add(v.clone());
    let base = fake.base_url.clone();
    let ts = TestServer::start_with(move |c| {
        c.civitai.base_url = base;
        c.civitai.token = Some(sd_host::config::Secret("sekrit-token-123".into()));
    })
    .await;
    let (code, r) = post(
        &ts,
        "/api/v1/models/add-from-civitai",
        json!({"model_version_id": 60}),
    )
    .await;
    assert_eq!(code, 202, "{r}");
    wait_status(&ts, r["sha256"].as_str().expect("sha"), "ready").await;
    let auth = fake.lock().download_auth.clone();
    assert_eq!(auth, vec![Some("Bearer sekrit-token-123".to_string())]);
    let storage = fake.storage();
    assert!(!storage.is_empty());
    assert!(storage.iter().all(|s| s.auth.is_none()), "{storage:?}");
    let cfg = ts.get("/api/v1/config").await.text().await.expect("text");
    assert!(!cfg.contains("sekrit-token-123"));
}

#[tokio::test]
async fn login_required_or_html_page_fails_with_reason() {
    let fake = start_fake().await;
    let mut locked = lora_version(70, 7, 11);
    locked.needs_auth = true;
    fake.add(locked.clone());
    let mut html = lora_version(71, 7, 12);
    html.html = true;
    fake.add(html.clone());
    let ts = start_with_fake(&fake).await;
    for (id, v, needle) in [(70, &locked, "civitai.token"), (71, &html, "HTML")] {
        let (code, r) = post(
            &ts,
            "/api/v1/models/add-from-civitai",
            json!({"model_version_id": id}),
        )
        .await;
        assert_eq!(code, 202, "{r}");
        let m = wait_status(&ts, &v.listed_sha.to_lowercase(), "failed").await;
        assert!(m["error"].as_str().expect("error").contains(needle), "{m}");
    }
}

#[tokio::test]
async fn pickle_formats_refused_with_422() {
    let fake = start_fake().await;
    let mut v = lora_version(80, 8, 13);
    v.api_name = "model.ckpt".into();
    v.format = "PickleTensor";
    fake.add(v.clone());
    let ts = start_with_fake(&fake).await;
    let (code, r) = post(
        &ts,
        "/api/v1/models/add-from-civitai",
        json!({"model_version_id": 80}),
    )
    .await;
    assert_eq!(code, 422, "{r}");
    assert!(
        r["detail"].as_str().expect("detail").contains("pickle"),
        "{r}"
    );
    let (code, r) = post(
        &ts,
        "/api/v1/models/add-from-civitai",
        json!({"model_version_id": 80, "file_id": 800}),
    )
    .await;
    assert_eq!(code, 422, "{r}");
    assert_eq!(model(&ts, &v.listed_sha.to_lowercase()).await.0, 404);
    assert_eq!(fake.downloads(), 0);
}

#[tokio::test]
async fn private_targets_refused_unless_allowed() {
    let fake = start_fake().await;
    fake.add(lora_version(90, 9, 14));
    let base = fake.base_url.clone();
    let ts = TestServer::start_with(move |c| {
        c.civitai.base_url = base;
        c.network.allow_private_targets = false;
    })
    .await;
    let (code, r) = post(
        &ts,
        "/api/v1/models/add-from-civitai",
        json!({"model_version_id": 90}),
    )
    .await;
    assert_eq!(code, 422, "{r}");
    assert!(
        r["detail"].as_str().expect("detail").contains("private"),
        "{r}"
    );
    assert_eq!(fake.downloads(), 0);
}

/// An allowed (listed) Civitai host cannot bounce the download to another internal address: the
/// policy is checked again at every redirect hop, and the storage host is never contacted.
#[tokio::test]
async fn redirect_to_an_unlisted_private_address_is_refused_mid_chain() {
    let fake = start_fake().await;
    fake.add(lora_version(91, 9, 16));
    let base = fake.base_url.clone();
    let api_host = base.trim_start_matches("http://").to_string();
    let ts = TestServer::start_with(move |c| {
        c.civitai.base_url = base;
        c.network.allow_private_targets = false;
        c.network.allowed_private_hosts = vec![api_host];
    })
    .await;
    let (code, r) = post(
        &ts,
        "/api/v1/models/add-from-civitai",
        json!({"model_version_id": 91}),
    )
    .await;
    assert_eq!(code, 202, "the listed API host is reachable: {r}");
    let sha = r["sha256"].as_str().expect("sha").to_string();
    let m = wait_status(&ts, &sha, "failed").await;
    let err = m["error"].as_str().unwrap_or_default();
    assert!(err.contains("private"), "{m}");
    assert_eq!(fake.downloads(), 1, "the Civitai hop was made");
    assert!(
        fake.storage().is_empty(),
        "the redirect target was never contacted"
    );
}

/// Hashing throughput against `sha256sum` on the same (page-cached) file. Ignored by default; run
/// with `cargo test -p sd-host --test models -- --ignored --nocapture hash_speed`.
#[test]
#[ignore]
fn hash_speed_vs_sha256sum() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("big.bin");
    let mib: usize = std::env::var("HASH_BENCH_MIB")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1024);
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&path).expect("create");
        let block: Vec<u8> = (0..1 << 20)
            .map(|i: u32| (i.wrapping_mul(31) >> 3) as u8)
            .collect();
        for i in 0..mib {
            let mut b = block.clone();
            b[0] = i as u8;
            f.write_all(&b).expect("write");
        }
    }
    let ours = || {
        let t = std::time::Instant::now();
        let h = sd_host::models::library::hash_file(&path).expect("hash");
        (t.elapsed().as_secs_f64(), h)
    };
    let theirs = || {
        let t = std::time::Instant::now();
        let out = std::process::Command::new("sha256sum")
            .arg(&path)
            .output()
            .expect("sha256sum runs");
        let h = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_string();
        (t.elapsed().as_secs_f64(), h)
    };
    let _ = (ours(), theirs()); // warm the page cache
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        let (ta, ha) = ours();
        let (tb, hb) = theirs();
        assert_eq!(ha, hb, "same digest as sha256sum");
        a.push(ta);
        b.push(tb);
    }
    a.sort_by(f64::total_cmp);
    b.sort_by(f64::total_cmp);
    let (ma, mb) = (a[2], b[2]);
    let size = mib as f64;
    println!(
        "HASH_BENCH size_mib={mib} ours_s={ma:.3} ours_mib_s={:.0} sha256sum_s={mb:.3} sha256sum_mib_s={:.0} ratio={:.3}",
        size / ma,
        size / mb,
        mb / ma
    );
}

#[tokio::test]
async fn full_200_answer_to_a_range_request_restarts_from_zero() {
    let fake = start_fake().await;
    let v = lora_version(100, 10, 15);
    fake.add(v.clone());
    {
        let mut g = fake.lock();
        g.cut_next = 1;
        g.cut_at = 250_000;
        g.ignore_range_next = 1;
    }
    let ts = start_with_fake(&fake).await;
    let (code, r) = post(
        &ts,
        "/api/v1/models/add-from-civitai",
        json!({"model_version_id": 100}),
    )
    .await;
    assert_eq!(code, 202, "{r}");
    let sha = r["sha256"].as_str().expect("sha").to_string();
    wait_status(&ts, &sha, "ready").await;
    let reqs = fake.storage();
    assert_eq!(reqs[1].range.as_deref(), Some("bytes=250000-"), "{reqs:?}");
    // The 200 body was written from offset 0, not appended: the file verifies.
    let file = models_dir(&ts).join("lora").join(&v.disposition_name);
    assert_eq!(std::fs::read(file).expect("installed"), v.bytes);
}

/// `sd-host models ARGS` on `data`, against the fake Civitai, off the async workers.
fn models_cli(
    fake: &FakeCivitai,
    data: &Path,
    args: Vec<String>,
) -> tokio::task::JoinHandle<std::process::Output> {
    let (base, data) = (fake.base_url.clone(), data.to_path_buf());
    tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_sd-host"))
            .arg("models")
            .arg("--data-dir")
            .arg(&data)
            .args(&args)
            .env("SDHOST__CIVITAI__BASE_URL", base)
            .env("SDHOST__NETWORK__ALLOW_PRIVATE_TARGETS", "true")
            .env_remove("SDHOST_CONFIG")
            .output()
            .expect("sd-host runs")
    })
}

#[tokio::test]
async fn cli_add_civitai_list_and_delete() {
    let fake = start_fake().await;
    let v = lora_version(110, 11, 16);
    fake.add(v.clone());
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let run = |args: Vec<String>| models_cli(&fake, &data, args);
    let sha = v.listed_sha.to_lowercase();
    let out = run(vec![
        "add-civitai".into(),
        format!("https://civitai.com/models/11?modelVersionId=110"),
    ])
    .await
    .expect("join");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains(&sha));
    let file = data.join("models").join("lora").join(&v.disposition_name);
    assert_eq!(std::fs::read(&file).expect("installed"), v.bytes);
    let out = run(vec!["list".into()]).await.expect("join");
    let listed = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        listed.contains(&sha) && listed.contains("ready"),
        "{listed}"
    );
    let out = run(vec!["delete".into(), sha.clone()]).await.expect("join");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!file.exists());
    let out = run(vec!["delete".into(), sha.clone()]).await.expect("join");
    assert_eq!(out.status.code(), Some(1), "deleting twice fails");
}

/// On a terminal, `sd-host models add-civitai` draws a progress bar (bytes, rate, eta); piped, it
/// prints only the result. The terminal is a pty from util-linux `script`.
#[tokio::test]
async fn cli_add_civitai_draws_a_progress_bar_on_a_terminal() {
    // `script` may be missing, or unable to open a pty in a container: then there is no terminal.
    let pty_works = std::process::Command::new("script")
        .args(["-qec", "true", "/dev/null"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !pty_works {
        eprintln!("SKIPPED: no working `script` (util-linux) to provide a terminal");
        return;
    }
    let fake = start_fake().await;
    let v = lora_version(130, 13, 18);
    fake.add(v.clone());
    fake.lock().trickle = Some((16 * 1024, Duration::from_millis(20)));
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let line = format!(
        "{} models --data-dir {} add-civitai 130",
        env!("CARGO_BIN_EXE_sd-host"),
        data.display()
    );
    let base = fake.base_url.clone();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("script")
            .args(["-qec", &line, "/dev/null"])
            .env("SDHOST__CIVITAI__BASE_URL", base)
            .env("SDHOST__NETWORK__ALLOW_PRIVATE_TARGETS", "true")
            .env_remove("SDHOST_CONFIG")
            .output()
            .expect("script runs")
    })
    .await
    .expect("join");
    let tty = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{tty}");
    assert!(tty.contains(&v.listed_sha.to_lowercase()), "{tty}");
    assert!(
        tty.contains("] ") && tty.contains("eta"),
        "a progress bar: {tty:?}"
    );
    assert!(
        tty.contains("=>") || tty.contains("=="),
        "the bar fills: {tty:?}"
    );
    let file = data.join("models").join("lora").join(&v.disposition_name);
    assert_eq!(std::fs::read(&file).expect("installed"), v.bytes);
}

/// Progress goes out at most ~4 times a second however many chunks arrive: a download trickled
/// in hundreds of small chunks over a couple of seconds yields only a handful of `progress` events.
#[tokio::test]
async fn download_progress_is_capped_at_about_four_events_per_second() {
    let fake = start_fake().await;
    let v = lora_version(120, 12, 17);
    fake.add(v.clone());
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let chunk = 4096;
    {
        let mut g = fake.lock();
        g.gate = Some(gate.clone());
        g.trickle = Some((chunk, Duration::from_millis(8)));
    }
    let ts = start_with_fake(&fake).await;
    let started = std::time::Instant::now();
    let (code, r) = post(
        &ts,
        "/api/v1/models/add-from-civitai",
        json!({"model_version_id": 120}),
    )
    .await;
    assert_eq!(code, 202, "{r}");
    let resp = ts
        .client
        .get(r["tracking_url"].as_str().expect("url"))
        .send()
        .await
        .expect("sse");
    assert_eq!(resp.status(), 200);
    gate.add_permits(100);
    let events = sse_events(resp).await;
    let elapsed = started.elapsed().as_secs_f64();
    let names: Vec<&str> = events.iter().map(|(e, _)| e.as_str()).collect();
    assert_eq!(names.last(), Some(&"ready"), "{names:?}");
    let progress = names.iter().filter(|e| **e == "progress").count();
    // 3/4 of the file arrives in ~190 chunks of 4 KiB, 8 ms apart: unthrottled, that would be
    // one event per chunk. Allowed: 4/s over the whole time, plus the forced events at the start
    // and end of the transfer and the current state replayed to a new stream.
    let chunks = (v.bytes.len() * 3 / 4).div_ceil(chunk);
    let bound = (elapsed * 4.0).ceil() as usize + 4;
    assert!(
        progress <= bound,
        "{progress} progress events in {elapsed:.2}s (bound {bound}; {chunks} chunks): {names:?}"
    );
    assert!(progress >= 1, "{names:?}");
}

/// A LoRA for a tiny SD1 checkpoint under `models.dir/loras/`, with a fake Civitai version that
/// lists exactly its bytes (and so answers `by-hash` for it).
fn lora_file_with_version(dir: &Path, id: u64, model_id: u64) -> (PathBuf, FakeVersion) {
    let ckpt = dir.join("checkpoints").join("tiny_sd1.safetensors");
    write_tiny_ckpt(&ckpt, 1);
    let lora = dir.join("loras").join("tiny_lora.safetensors");
    std::fs::create_dir_all(lora.parent().expect("parent")).expect("mkdir");
    sd_engine::tiny::write_tiny_lora(&ckpt, sd_engine::lora::LoraKind::Lora, 2, &lora)
        .expect("tiny lora");
    let bytes = std::fs::read(&lora).expect("read");
    let mut v = lora_version(id, model_id, 0);
    v.listed_sha = sha_hex(&bytes).to_uppercase();
    v.bytes = bytes;
    (lora, v)
}

#[tokio::test]
async fn civitai_lookup_by_hash_gives_a_scanned_model_its_metadata() {
    let fake = start_fake().await;
    let ts = start_with_fake(&fake).await;
    let dir = models_dir(&ts);
    let (lora, v) = lora_file_with_version(&dir, 130, 13);
    fake.add(v.clone());
    let (code, report) = post(&ts, "/api/v1/models/scan", json!({})).await;
    assert_eq!(code, 200, "{report}");
    let sha = sha_hex(&std::fs::read(&lora).expect("read"));
    let ck_sha =
        sha_hex(&std::fs::read(dir.join("checkpoints/tiny_sd1.safetensors")).expect("read"));
    let (_, before) = model(&ts, &sha).await;
    assert_eq!(
        before["family"], "unknown",
        "a LoRA header does not tell: {before}"
    );
    assert!(
        before["source"].is_null(),
        "a scanned file has no Civitai metadata: {before}"
    );
    let trained = |loras: &Value| {
        loras
            .as_array()
            .expect("loras")
            .iter()
            .find(|l| l["metadata"]["sha256"] == sha.as_str())
            .map(|l| l["metadata"]["trained_words"].clone())
    };
    let (_, loras) = ts.get_json("/sdapi/v1/loras").await;
    assert_eq!(trained(&loras), Some(json!([])), "{loras}");

    let url = format!("/api/v1/models/{sha}/civitai-lookup");
    let (code, m) = post(&ts, &url, json!({})).await;
    assert_eq!(code, 200, "{m}");
    assert_eq!(m["sha256"], sha.as_str());
    let c = &m["source"]["civitai"];
    assert_eq!(c["model_id"], 13, "{m}");
    assert_eq!(c["version_id"], 130);
    assert_eq!(c["file_id"], 1300, "the file with this hash");
    assert_eq!(c["name"], "Detail Tweaker 13");
    assert_eq!(c["version_name"], "v130");
    assert_eq!(c["type"], "LORA");
    assert_eq!(c["base_model"], "SD 1.5");
    assert_eq!(c["trained_words"], json!(["detailed", "sharp focus"]));
    assert_eq!(c["air"], "urn:air:sd1:lora:civitai:13@130");
    // The library's own name is kept (prompts name it so); the family comes from baseModel.
    assert_eq!(m["name"], "tiny_lora");
    assert_eq!(m["type"], "lora");
    assert_eq!(m["family"], "sd1");
    assert_eq!(m["status"], "ready");
    // Stored, not just returned; the trained words now reach the LoRA listings.
    assert_eq!(model(&ts, &sha).await.1["source"], m["source"]);
    let (_, loras) = ts.get_json("/sdapi/v1/loras").await;
    assert_eq!(
        trained(&loras),
        Some(json!(["detailed", "sharp focus"])),
        "{loras}"
    );
    // A rescan keeps the metadata; nothing was downloaded.
    let (_, again) = post(&ts, "/api/v1/models/scan", json!({})).await;
    assert_eq!(again["hashed"], 0, "{again}");
    assert_eq!(model(&ts, &sha).await.1["source"], m["source"]);
    assert_eq!(fake.downloads(), 0);
    assert!(fake.storage().is_empty());

    // Civitai does not know the checkpoint: 404 that says so, and the record is unchanged.
    let (code, e) = post(
        &ts,
        &format!("/api/v1/models/{ck_sha}/civitai-lookup"),
        json!({}),
    )
    .await;
    assert_eq!(code, 404, "{e}");
    let detail = e["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains("Civitai") && detail.contains(&ck_sha),
        "{e}"
    );
    assert!(model(&ts, &ck_sha).await.1["source"].is_null());
    // Not in the library at all: 404 before asking Civitai; a malformed hash: 422.
    let (code, e) = post(
        &ts,
        &format!("/api/v1/models/{}/civitai-lookup", "0".repeat(64)),
        json!({}),
    )
    .await;
    assert_eq!(code, 404, "{e}");
    assert!(
        e["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("not found"),
        "{e}"
    );
    let (code, _) = post(
        &ts,
        &format!("/api/v1/models/{}/civitai-lookup", "A".repeat(64)),
        json!({}),
    )
    .await;
    assert_eq!(code, 422);
    let (_, doc) = ts.get_json("/openapi.json").await;
    assert!(doc["paths"]
        .get("/api/v1/models/{sha256}/civitai-lookup")
        .is_some());

    // A model still downloading came from Civitai with its metadata: 409, the download goes on.
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    fake.lock().gate = Some(gate.clone());
    fake.add(lora_version(131, 13, 18));
    let (code, r) = post(
        &ts,
        "/api/v1/models/add-from-civitai",
        json!({"model_version_id": 131}),
    )
    .await;
    assert_eq!(code, 202, "{r}");
    let dl = r["sha256"].as_str().expect("sha").to_string();
    let (code, e) = post(
        &ts,
        &format!("/api/v1/models/{dl}/civitai-lookup"),
        json!({}),
    )
    .await;
    assert_eq!(code, 409, "{e}");
    gate.add_permits(100);
    wait_status(&ts, &dl, "ready").await;
}

#[tokio::test]
async fn civitai_lookup_respects_the_network_policy() {
    let fake = start_fake().await;
    let base = fake.base_url.clone();
    let ts = TestServer::start_with(move |c| {
        c.civitai.base_url = base;
        c.network.allow_private_targets = false;
    })
    .await;
    let (lora, v) = lora_file_with_version(&models_dir(&ts), 140, 14);
    fake.add(v);
    let (code, report) = post(&ts, "/api/v1/models/scan", json!({})).await;
    assert_eq!(code, 200, "{report}");
    let sha = sha_hex(&std::fs::read(&lora).expect("read"));
    let (code, e) = post(
        &ts,
        &format!("/api/v1/models/{sha}/civitai-lookup"),
        json!({}),
    )
    .await;
    assert_eq!(code, 422, "{e}");
    assert!(
        e["detail"].as_str().unwrap_or_default().contains("private"),
        "{e}"
    );
    assert!(model(&ts, &sha).await.1["source"].is_null());
}

/// `sd-host models scan` registers what is in models.dir (hashing only new files), `list` shows
/// it, and `lookup` fetches its Civitai metadata by SHA-256 into the same database the server uses.
#[tokio::test]
async fn cli_scan_list_and_civitai_lookup() {
    let fake = start_fake().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let (lora, v) = lora_file_with_version(&data.join("models"), 150, 15);
    fake.add(v);
    let run = |args: Vec<String>| models_cli(&fake, &data, args);
    let text = |o: &std::process::Output| {
        assert!(
            o.status.success(),
            "status {:?}\nstdout: {}\nstderr: {}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).to_string()
    };
    let ck = data.join("models/checkpoints/tiny_sd1.safetensors");
    let ck_sha = sha_hex(&std::fs::read(&ck).expect("read"));
    let sha = sha_hex(&std::fs::read(&lora).expect("read"));

    let out = text(&run(vec!["scan".into()]).await.expect("join"));
    assert!(out.contains("2 models (2 hashed)"), "{out}");
    let listed = text(&run(vec!["list".into()]).await.expect("join"));
    let line = |sha: &str| {
        listed
            .lines()
            .find(|l| l.starts_with(sha))
            .unwrap_or_else(|| panic!("{sha} listed: {listed}"))
            .split_whitespace()
            .collect::<Vec<_>>()
    };
    assert_eq!(
        line(&ck_sha),
        [
            ck_sha.as_str(),
            "checkpoint",
            "sd1",
            "ready",
            "tiny_sd1.safetensors"
        ]
    );
    assert_eq!(
        line(&sha),
        [
            sha.as_str(),
            "lora",
            "unknown",
            "ready",
            "tiny_lora.safetensors"
        ]
    );
    let out = text(&run(vec!["scan".into()]).await.expect("join"));
    assert!(
        out.contains("2 models (0 hashed)"),
        "known files are not hashed again: {out}"
    );

    let out = text(&run(vec!["lookup".into(), sha.clone()]).await.expect("join"));
    assert!(
        out.contains("urn:air:sd1:lora:civitai:15@150")
            && out.contains("trained words: detailed, sharp focus"),
        "{out}"
    );
    let out = run(vec!["lookup".into(), ck_sha.clone()])
        .await
        .expect("join");
    assert_eq!(out.status.code(), Some(1), "Civitai does not know it");
    assert!(String::from_utf8_lossy(&out.stderr).contains("Civitai"));

    // The server on the same data dir sees what the CLI stored.
    let base = fake.base_url.clone();
    let ts = TestServer::start_in(dir, move |c| c.civitai.base_url = base).await;
    let (code, m) = model(&ts, &sha).await;
    assert_eq!(code, 200, "{m}");
    assert_eq!(m["source"]["civitai"]["version_id"], 150);
    assert_eq!(m["family"], "sd1", "from Civitai's baseModel");
    assert_eq!(
        m["source"]["civitai"]["trained_words"],
        json!(["detailed", "sharp focus"])
    );
    assert_eq!(fake.downloads(), 0);
}
