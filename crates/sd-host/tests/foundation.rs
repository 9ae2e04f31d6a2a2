//! Foundation: health, auth, config redaction, OpenAPI/docs, error shapes (issue 2).

mod common;

use common::TestServer;
use serde_json::json;

/// Every route the API serves (a snapshot: adding a route means adding it here).
const EXPECTED_PATHS: &[&str] = &[
    "/",
    "/api/generate",
    "/api/health",
    "/api/images",
    "/api/images/{filename}",
    "/api/info",
    "/api/jobs/{job_id}",
    "/api/sse/gallery",
    "/api/sse/{job_id}",
    "/api/thumbs/{filename}",
    "/api/v1/config",
    "/api/v1/generate",
    "/api/v1/health",
    "/api/v1/images",
    "/api/v1/images/events",
    "/api/v1/images/export",
    "/api/v1/images/{hash}",
    "/api/v1/images/{hash}/metadata",
    "/api/v1/images/{hash}/share",
    "/api/v1/images/{hash}/thumbnail",
    "/api/v1/models",
    "/api/v1/models/add-from-civitai",
    "/api/v1/models/add-from-civitai/{sha256}",
    "/api/v1/models/scan",
    "/api/v1/models/scan/events",
    "/api/v1/models/{sha256}",
    "/api/v1/models/{sha256}/civitai-lookup",
    "/api/v1/pipeline/load-checkpoint/{sha256}",
    "/api/v1/pipeline/load-loras",
    "/api/v1/pipeline/status",
    "/api/v1/queue/clear",
    "/api/v1/queue/pause",
    "/api/v1/queue/resume",
    "/api/v1/storage/stats",
    "/api/v1/tasks",
    "/api/v1/tasks/priority",
    "/api/v1/tasks/queue",
    "/api/v1/tasks/{task_id}",
    "/api/v1/tasks/{task_id}/events",
    "/api/v1/version",
    "/health",
    "/metrics",
    "/sdapi/v1/cmd-flags",
    "/sdapi/v1/create/embedding",
    "/sdapi/v1/create/hypernetwork",
    "/sdapi/v1/embeddings",
    "/sdapi/v1/extensions",
    "/sdapi/v1/extra-batch-images",
    "/sdapi/v1/extra-single-image",
    "/sdapi/v1/face-restorers",
    "/sdapi/v1/hypernetworks",
    "/sdapi/v1/img2img",
    "/sdapi/v1/interrogate",
    "/sdapi/v1/interrupt",
    "/sdapi/v1/latent-upscale-modes",
    "/sdapi/v1/loras",
    "/sdapi/v1/memory",
    "/sdapi/v1/options",
    "/sdapi/v1/png-info",
    "/sdapi/v1/progress",
    "/sdapi/v1/prompt-styles",
    "/sdapi/v1/realesrgan-models",
    "/sdapi/v1/refresh-checkpoints",
    "/sdapi/v1/refresh-embeddings",
    "/sdapi/v1/refresh-loras",
    "/sdapi/v1/refresh-vae",
    "/sdapi/v1/reload-checkpoint",
    "/sdapi/v1/samplers",
    "/sdapi/v1/schedulers",
    "/sdapi/v1/script-info",
    "/sdapi/v1/scripts",
    "/sdapi/v1/sd-models",
    "/sdapi/v1/sd-vae",
    "/sdapi/v1/server-kill",
    "/sdapi/v1/server-restart",
    "/sdapi/v1/server-stop",
    "/sdapi/v1/skip",
    "/sdapi/v1/train/embedding",
    "/sdapi/v1/train/hypernetwork",
    "/sdapi/v1/txt2img",
    "/sdapi/v1/unload-checkpoint",
    "/sdapi/v1/upscalers",
];

const KEY: &str = "test-key-0123456789";

async fn keyed() -> TestServer {
    TestServer::start_with(|c| {
        c.api.keys = vec![sd_host::config::Secret(KEY.into())];
        c.civitai.token = Some(sd_host::config::Secret("civitai-secret-token".into()));
    })
    .await
}

#[tokio::test]
async fn health_needs_no_key_on_all_three_paths() {
    let s = keyed().await;
    for p in ["/health", "/api/health", "/api/v1/health"] {
        let (status, body) = s.get_json(p).await;
        assert_eq!(status, 200, "{p}");
        assert_eq!(body, json!({"status": "ok", "model_loaded": false}), "{p}");
    }
}

#[tokio::test]
async fn api_key_required_and_accepted_in_header_or_bearer() {
    let s = keyed().await;
    let (status, body) = s.get_json("/api/v1/version").await;
    assert_eq!(status, 401);
    assert!(body["detail"].is_string());
    let wrong = s
        .client
        .get(s.url("/api/v1/version"))
        .header("X-API-Key", "nope")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    let wrong_bearer = s
        .client
        .get(s.url("/api/v1/version"))
        .bearer_auth(format!("{KEY}x"))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong_bearer.status(), 401);
    let ok = s
        .client
        .get(s.url("/api/v1/version"))
        .header("X-API-Key", KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let v: serde_json::Value = ok.json().await.unwrap();
    assert_eq!(v["name"], "sd-host");
    assert_eq!(v["api_version"], "v1");
    let bearer = s
        .client
        .get(s.url("/api/v1/version"))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(bearer.status(), 200);
    // A1111 `--api-auth` clients send HTTP Basic: any user name, the key as the password.
    for (user, pass, want) in [
        ("webui", Some(KEY.to_string()), 200),
        ("", Some(KEY.to_string()), 200),
        ("webui", Some(format!("{KEY}x")), 401),
        (KEY, None, 401),
    ] {
        let r = s
            .client
            .get(s.url("/sdapi/v1/samplers"))
            .basic_auth(user, pass)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), want, "basic {user:?}");
    }
    let garbled = s
        .client
        .get(s.url("/api/v1/version"))
        .header("authorization", "Basic !!!")
        .send()
        .await
        .unwrap();
    assert_eq!(garbled.status(), 401);
    // metrics and docs are behind the key too
    assert_eq!(s.get("/metrics").await.status(), 401);
}

#[tokio::test]
async fn custom_key_header_is_honoured() {
    let s = TestServer::start_with(|c| {
        c.api.keys = vec![sd_host::config::Secret(KEY.into())];
        c.api.key_header = "X-Token".into();
    })
    .await;
    let r = s
        .client
        .get(s.url("/api/v1/config"))
        .header("X-Token", KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = s
        .client
        .get(s.url("/api/v1/config"))
        .header("X-API-Key", KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}

#[tokio::test]
async fn config_hides_secrets() {
    let s = keyed().await;
    let r = s
        .client
        .get(s.url("/api/v1/config"))
        .header("X-API-Key", KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    assert!(!text.contains(KEY), "api key leaked: {text}");
    assert!(!text.contains("civitai-secret-token"), "token leaked");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["api"]["key_header"], "X-API-Key");
    assert_eq!(v["limits"]["max_steps"], 150);
}

#[tokio::test]
async fn refuses_public_bind_without_keys() {
    let mut cfg = sd_host::config::Config::default();
    cfg.server.host = "0.0.0.0".into();
    assert!(sd_host::server::check_exposure(&cfg, false).is_err());
    assert!(sd_host::server::check_exposure(&cfg, true).is_ok());
    cfg.api.keys = vec![sd_host::config::Secret("k".into())];
    assert!(sd_host::server::check_exposure(&cfg, false).is_ok());
}

#[tokio::test]
async fn openapi_lists_routes_and_docs_are_offline() {
    let s = TestServer::start().await;
    let (status, doc) = s.get_json("/openapi.json").await;
    assert_eq!(status, 200);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));
    let paths = doc["paths"].as_object().unwrap();
    for p in EXPECTED_PATHS {
        assert!(paths.contains_key(*p), "openapi.json lacks {p}");
    }
    let extra: Vec<_> = paths
        .keys()
        .filter(|k| !EXPECTED_PATHS.contains(&k.as_str()))
        .collect();
    assert!(
        extra.is_empty(),
        "routes missing from EXPECTED_PATHS: {extra:?}"
    );
    for page in ["/docs", "/redoc"] {
        let r = s.get(page).await;
        assert_eq!(r.status(), 200);
        let html = r.text().await.unwrap();
        assert!(
            !html.contains("http://") && !html.contains("https://") && !html.contains("//cdn"),
            "{page} references an external URL: {html}"
        );
        // every script and stylesheet it loads is served by us
        for src in html
            .split(['"', '\''])
            .filter(|t| t.starts_with("/docs/assets/") || t.starts_with("/redoc/assets/"))
        {
            let a = s.get(src).await;
            assert_eq!(a.status(), 200, "{src}");
            assert!(a.bytes().await.unwrap().len() > 1000, "{src} is too small");
        }
    }
}

#[tokio::test]
async fn metrics_are_prometheus_text() {
    let s = TestServer::start().await;
    s.get("/api/v1/version").await;
    let r = s.get("/metrics").await;
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    let text = r.text().await.unwrap();
    assert!(text.contains("# TYPE sdhost_queue_depth gauge"));
    assert!(text.contains("sdhost_http_requests_total{class=\"2xx\"}"));
}

#[tokio::test]
async fn error_shapes_404_413_415_422() {
    let s = TestServer::start_with(|c| c.limits.max_body_bytes = 1024).await;
    let (status, body) = s.get_json("/no/such/route").await;
    assert_eq!(status, 404);
    assert_eq!(body, json!({"detail": "Not Found"}));

    // 415: text/plain and form bodies on a state-changing route
    for ct in [
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
    ] {
        let r = s
            .client
            .post(s.url("/api/v1/tasks"))
            .header("content-type", ct)
            .body("prompt=x")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 415, "{ct}");
        let v: serde_json::Value = r.json().await.unwrap();
        assert!(v["detail"].is_string());
    }
    // 413: body over limits.max_body_bytes
    let big = json!({"prompt": "x".repeat(4096)});
    let (status, body) = s.post_json("/api/v1/tasks", &big).await;
    assert_eq!(status, 413);
    assert!(body["detail"].is_string());
    // 422: malformed JSON and wrong types carry loc/msg/type
    let r = s
        .client
        .post(s.url("/api/v1/tasks"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["detail"][0]["loc"][0], "body");
    assert!(v["detail"][0]["msg"].is_string());
    assert!(v["detail"][0]["type"].is_string());
    let (status, body) = s.post_json("/api/v1/tasks", &json!({"prompt": 5})).await;
    assert_eq!(status, 422);
    assert_eq!(body["detail"][0]["loc"], json!(["body", "prompt"]));
    let (status, body) = s.post_json("/api/v1/tasks", &json!({})).await;
    assert_eq!(status, 422);
    assert_eq!(body["detail"][0]["type"], "missing");
}

#[tokio::test]
async fn cors_closed_by_default_open_when_configured() {
    let s = TestServer::start().await;
    let r = s
        .client
        .get(s.url("/api/v1/version"))
        .header("Origin", "https://evil.example")
        .send()
        .await
        .unwrap();
    assert!(r.headers().get("access-control-allow-origin").is_none());
    let s =
        TestServer::start_with(|c| c.server.cors_origins = vec!["https://ok.example".into()]).await;
    let r = s
        .client
        .get(s.url("/api/v1/version"))
        .header("Origin", "https://ok.example")
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "https://ok.example"
    );
    let r = s
        .client
        .get(s.url("/api/v1/version"))
        .header("Origin", "https://evil.example")
        .send()
        .await
        .unwrap();
    assert!(r.headers().get("access-control-allow-origin").is_none());
}

#[tokio::test]
async fn embedded_default_creates_data_dir() {
    let s = TestServer::start().await;
    let data = s.dir.path().join("data");
    assert!(data.join("sd-host.db").exists());
    assert!(data.join("models").is_dir());
    assert!(data.join("images").is_dir());
}

#[tokio::test]
async fn cross_site_requests_and_foreign_host_names_are_refused() {
    let s = TestServer::start().await; // keyless, loopback
    let post = |origin: Option<&str>, fetch_site: Option<&str>| {
        let mut r = s.client.post(s.url("/api/v1/queue/pause"));
        if let Some(o) = origin {
            r = r.header("Origin", o);
        }
        if let Some(f) = fetch_site {
            r = r.header("Sec-Fetch-Site", f);
        }
        r.send()
    };
    // A cross-site page can send a body-less POST without a preflight: refused.
    assert_eq!(
        post(Some("https://evil.example"), None)
            .await
            .unwrap()
            .status(),
        403
    );
    assert_eq!(post(None, Some("cross-site")).await.unwrap().status(), 403);
    assert_eq!(post(Some("null"), None).await.unwrap().status(), 403);
    let same = format!("http://{}", s.server.addr);
    assert_eq!(
        post(Some(&same), Some("same-origin"))
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        post(None, None).await.unwrap().status(),
        200,
        "non-browser clients"
    );
    // DNS rebinding: a foreign name pointing at 127.0.0.1 gets nothing from a keyless server.
    let r = s
        .client
        .get(s.url("/api/v1/version"))
        .header("Host", "rebind.evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);

    let listed =
        TestServer::start_with(|c| c.server.cors_origins = vec!["https://app.example".into()])
            .await;
    let r = listed
        .client
        .post(listed.url("/api/v1/queue/resume"))
        .header("Origin", "https://app.example")
        .header("Sec-Fetch-Site", "cross-site")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "a configured origin may call");
}

#[tokio::test]
async fn graceful_stop_does_not_wait_for_open_event_streams() {
    let s = TestServer::start().await;
    let mut queue = s
        .client
        .get(s.url("/api/v1/tasks/queue"))
        .send()
        .await
        .unwrap();
    assert_eq!(queue.status(), 200);
    let first = queue.chunk().await.unwrap();
    assert!(first.is_some(), "initial snapshot");
    let stopped = tokio::time::timeout(std::time::Duration::from_secs(10), s.server.stop()).await;
    assert!(
        matches!(stopped, Ok(Ok(()))),
        "stop returned while a client was still connected"
    );
}

/// The browser UI at `/` is served without a key (it asks for one and sends it on every call); the
/// status JSON at the same path, and everything the page calls, still need the key.
#[tokio::test]
async fn web_ui_page_is_public_and_self_contained_but_its_data_is_not() {
    let s = keyed().await;
    let page = s
        .client
        .get(s.url("/"))
        .header("Accept", "text/html,application/xhtml+xml")
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    let html = page.text().await.unwrap();
    assert!(
        html.contains("<title>SD-Host</title>") && html.contains("\"Bearer \" + keyInput.value")
    );
    assert!(!html.contains("http://") && !html.contains("https://"));
    let json = s
        .client
        .get(s.url("/"))
        .header("Accept", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(json.status(), 401);
    for path in [
        "/api/v1/models?type=checkpoint",
        "/sdapi/v1/samplers",
        "/api/v1/images",
    ] {
        assert_eq!(s.get(path).await.status(), 401, "{path}");
        let ok = s
            .client
            .get(s.url(path))
            .header("X-API-Key", KEY)
            .send()
            .await
            .unwrap();
        assert_eq!(ok.status(), 200, "{path}");
    }
    let post = s.client.post(s.url("/")).send().await.unwrap();
    assert_ne!(post.status(), 200, "only GET / is public");
}
