//! Tasks end to end (issue 5): real server on port 0, tiny checkpoints, the real engine.

mod common;

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::TestServer;
use futures::StreamExt;
use serde_json::{json, Value};

/// A data dir with tiny sd1 checkpoints under `models/` (registered by the start-up scan).
fn data_dir_with_models(seeds: &[u64]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let models = dir.path().join("data/models");
    std::fs::create_dir_all(&models).expect("models dir");
    for s in seeds {
        sd_engine::tiny::write_tiny_checkpoint(
            sd_engine::Family::Sd1,
            false,
            *s,
            &models.join(format!("tiny{s}.safetensors")),
        )
        .expect("tiny checkpoint");
    }
    dir
}

async fn server_with_models(
    seeds: &[u64],
    tweak: impl FnOnce(&mut sd_host::config::Config),
) -> TestServer {
    TestServer::start_in(data_dir_with_models(seeds), tweak).await
}

async fn checkpoints(s: &TestServer) -> Vec<String> {
    let mut v: Vec<(String, String)> = s
        .server
        .state
        .repo
        .list_models(&Default::default())
        .await
        .expect("models")
        .into_iter()
        .map(|m| (m.filename, m.sha256))
        .collect();
    v.sort();
    v.into_iter().map(|(_, sha)| sha).collect()
}

fn body(extra: Value) -> Value {
    let mut b = json!({"prompt": "a red (cat:1.2)", "width": 64, "height": 64, "num_inference_steps": 2, "seed": 7});
    if let (Some(o), Some(e)) = (b.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            o.insert(k.clone(), v.clone());
        }
    }
    b
}

async fn submit(s: &TestServer, extra: Value) -> String {
    let (status, r) = s.post_json("/api/v1/tasks", &body(extra)).await;
    assert_eq!(status, 202, "{r}");
    assert_eq!(r["status"], "pending");
    r["task_id"].as_str().expect("task_id").to_string()
}

async fn task(s: &TestServer, id: &str) -> Value {
    let (status, t) = s.get_json(&format!("/api/v1/tasks/{id}")).await;
    assert_eq!(status, 200);
    t
}

async fn wait_status(s: &TestServer, id: &str, want: &[&str]) -> Value {
    for _ in 0..600 {
        let t = task(s, id).await;
        if want.contains(&t["status"].as_str().unwrap_or("")) {
            return t;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("task {id} never reached {want:?}: {}", task(s, id).await);
}

/// Parsed SSE events (`id`, `event`, JSON `data`) of a stream, read until it ends or `stop` says so.
async fn sse(
    client: &reqwest::Client,
    url: &str,
    last_id: Option<u64>,
    mut stop: impl FnMut(&str, &Value) -> bool,
) -> Vec<(Option<u64>, String, Value)> {
    let mut req = client.get(url);
    if let Some(l) = last_id {
        req = req.header("Last-Event-ID", l.to_string());
    }
    let resp = req.send().await.expect("sse request");
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap_or("")
        .starts_with("text/event-stream"));
    let mut stream = resp.bytes_stream();
    let (mut buf, mut out) = (String::new(), vec![]);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while let Ok(Some(chunk)) = tokio::time::timeout_at(deadline, stream.next()).await {
        buf.push_str(&String::from_utf8_lossy(&chunk.expect("chunk")));
        while let Some(end) = buf.find("\n\n") {
            let block: String = buf.drain(..end + 2).collect();
            let (mut id, mut ev, mut data) = (None, String::new(), String::new());
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("id:") {
                    id = v.trim().parse().ok();
                } else if let Some(v) = line.strip_prefix("event:") {
                    ev = v.trim().to_string();
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push_str(v.trim_start());
                }
            }
            if ev.is_empty() {
                continue; // keep-alive comment
            }
            let data = serde_json::from_str(&data).unwrap_or(Value::Null);
            let done = stop(&ev, &data);
            out.push((id, ev, data));
            if done {
                return out;
            }
        }
    }
    out
}

fn terminal(ev: &str, _: &Value) -> bool {
    matches!(ev, "completed" | "failed" | "cancelled")
}

#[tokio::test]
async fn task_streams_progress_and_completes_with_a_stored_image() {
    let s = server_with_models(&[1], |_| {}).await;
    s.server.state.queue.pause(&s.server.state);
    let id = submit(&s, json!({})).await;
    let url = s.url(&format!("/api/v1/tasks/{id}/events"));
    let client = s.client.clone();
    let reader = tokio::spawn(async move { sse(&client, &url, None, terminal).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    s.server.state.queue.resume(&s.server.state);
    let events = reader.await.expect("reader");
    let names: Vec<&str> = events.iter().map(|e| e.1.as_str()).collect();
    assert_eq!(names.first(), Some(&"queued"), "{names:?}");
    assert_eq!(events[0].2["position"], 1);
    assert_eq!(names.last(), Some(&"completed"), "{names:?}");
    let progress: Vec<_> = events.iter().filter(|e| e.1 == "progress").collect();
    assert!(!progress.is_empty(), "{names:?}");
    let last = progress.last().expect("progress");
    assert_eq!(last.2["total_steps"], 2);
    assert_eq!(last.2["step"], 2);
    assert!(last.2["preview"]
        .as_str()
        .unwrap_or("")
        .starts_with("data:image/jpeg;base64,"));
    let ids: Vec<u64> = events.iter().filter_map(|e| e.0).collect();
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "event ids increase: {ids:?}"
    );

    let t = task(&s, &id).await;
    assert_eq!(t["status"], "completed");
    assert_eq!(t["params"]["seed"], 7);
    assert_eq!(t["params"]["scheduler"], "DPM++ 2M");
    assert_eq!(
        t["params"]["schedule_type"], "normal",
        "what ran, not \"automatic\""
    );
    let url = t["result_url"].as_str().expect("result_url");
    let hash = t["images"][0]["hash"].as_str().expect("hash");
    assert!(url.ends_with(&format!("/api/v1/images/{hash}")));
    let bytes = s.server.state.blobs.get(hash).await.expect("blob stored");
    let img = image::load_from_memory(&bytes).expect("decodes");
    assert_eq!((img.width(), img.height()), (64, 64));
    let rec = s
        .server
        .state
        .repo
        .get_image(hash)
        .await
        .expect("db")
        .expect("row");
    assert_eq!(rec.task_id.as_deref(), Some(id.as_str()));

    // A finished task replays its terminal event; Last-Event-ID skips what the client has.
    let again = sse(
        &s.client,
        &s.url(&format!("/api/v1/tasks/{id}/events")),
        None,
        terminal,
    )
    .await;
    assert_eq!(again.last().map(|e| e.1.as_str()), Some("completed"));
    let last_id = events.last().and_then(|e| e.0).expect("id");
    let resumed = sse(
        &s.client,
        &s.url(&format!("/api/v1/tasks/{id}/events")),
        Some(last_id - 1),
        terminal,
    )
    .await;
    assert_eq!(resumed.len(), 1);
    assert_eq!(resumed[0].1, "completed");
}

#[tokio::test]
async fn several_images_use_consecutive_seeds_and_generate_alias_works() {
    let s = server_with_models(&[1], |_| {}).await;
    let (status, r) = s
        .post_json(
            "/api/v1/generate",
            &body(json!({"num_images": 3, "seed": 100})),
        )
        .await;
    assert_eq!(status, 202, "{r}");
    let id = r["task_id"].as_str().expect("id").to_string();
    let t = wait_status(&s, &id, &["completed", "failed"]).await;
    assert_eq!(t["status"], "completed", "{t}");
    let urls = t["result_urls"].as_array().expect("result_urls");
    assert_eq!(urls.len(), 3);
    assert!(t["result_url"].is_null());
    let mut hashes = vec![];
    for (i, im) in t["images"].as_array().expect("images").iter().enumerate() {
        let h = im["hash"].as_str().expect("hash");
        let rec = s
            .server
            .state
            .repo
            .get_image(h)
            .await
            .expect("db")
            .expect("row");
        assert_eq!(rec.seed, Some(100 + i as i64));
        hashes.push(h.to_string());
    }
    hashes.dedup();
    assert_eq!(hashes.len(), 3, "three distinct images");
    // Same seed again → bit-identical first image (deterministic engine).
    let id2 = submit(&s, json!({"seed": 100})).await;
    let t2 = wait_status(&s, &id2, &["completed", "failed"]).await;
    // Pixels, not file hashes: the embedded parameters differ (num_images).
    let px = |h: &Value| {
        let h = h.as_str().expect("hash").to_string();
        let st = s.server.state.clone();
        async move {
            let b = st.blobs.get(&h).await.expect("blob");
            image::load_from_memory(&b)
                .expect("png")
                .to_rgb8()
                .into_raw()
        }
    };
    assert_eq!(
        px(&t2["images"][0]["hash"]).await,
        px(&t["images"][0]["hash"]).await
    );
}

#[tokio::test]
async fn priority_then_fifo_order_and_move_to_front() {
    let s = server_with_models(&[1], |_| {}).await;
    let st = &s.server.state;
    let (status, _) = s.post_json("/api/v1/queue/pause", &json!({})).await;
    assert_eq!(status, 200);
    let a = submit(&s, json!({"priority": 0})).await;
    let b = submit(&s, json!({"priority": 5})).await;
    let c = submit(&s, json!({"priority": 0})).await;
    let d = submit(&s, json!({"priority": 5})).await;
    let e = submit(&s, json!({"priority": 0})).await;
    assert_eq!(task(&s, &a).await["queue_position"], 3);
    assert_eq!(task(&s, &b).await["queue_position"], 1);
    // The list shows the same positions.
    let (_, list) = s.get_json("/api/v1/tasks?status=pending").await;
    let pos_of = |id: &str| {
        list["tasks"]
            .as_array()
            .and_then(|v| v.iter().find(|t| t["task_id"] == id))
            .map(|t| t["queue_position"].clone())
    };
    assert_eq!(pos_of(&b), Some(json!(1)), "{list}");
    assert_eq!(pos_of(&a), Some(json!(3)), "{list}");
    let (status, r) = s
        .client
        .put(s.url("/api/v1/tasks/priority"))
        .json(&json!({"task_ids": [e], "to": "front"}))
        .send()
        .await
        .map(|r| (r.status().as_u16(), r))
        .expect("put");
    assert_eq!(status, 200, "{:?}", r.text().await);
    let (status, _) = s
        .client
        .put(s.url("/api/v1/tasks/priority"))
        .json(&json!({"task_ids": [c], "priority": 1}))
        .send()
        .await
        .map(|r| (r.status().as_u16(), r))
        .expect("put");
    assert_eq!(status, 200);
    // Paused: nothing ran.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(task(&s, &a).await["status"], "pending");
    s.post_json("/api/v1/queue/resume", &json!({})).await;
    let mut started = vec![];
    for id in [&a, &b, &c, &d, &e] {
        let t = wait_status(&s, id, &["completed", "failed"]).await;
        assert_eq!(t["status"], "completed");
        started.push((
            st.repo
                .get_task(id)
                .await
                .expect("db")
                .expect("row")
                .started_at,
            id.clone(),
        ));
    }
    started.sort();
    let order: Vec<&String> = started.iter().map(|(_, id)| id).collect();
    assert_eq!(order, [&e, &b, &d, &c, &a]);
}

#[tokio::test]
async fn batch_cancel_stops_running_and_pending_tasks() {
    let s = server_with_models(&[1], |_| {}).await;
    let running = submit(
        &s,
        json!({"num_inference_steps": 150, "width": 128, "height": 128, "num_images": 10}),
    )
    .await;
    let p1 = submit(&s, json!({})).await;
    let p2 = submit(&s, json!({})).await;
    wait_status(&s, &running, &["processing"]).await;
    // Let it take a few steps so cancellation happens mid-run.
    let url = s.url(&format!("/api/v1/tasks/{running}/events"));
    sse(&s.client, &url, None, |e, _| e == "progress").await;
    let r = s
        .client
        .delete(s.url("/api/v1/tasks"))
        .json(&json!({"task_ids": [running, p1, p2, "00000000-0000-4000-8000-000000000000"]}))
        .send()
        .await
        .expect("delete");
    assert_eq!(r.status(), 200);
    let r: Value = r.json().await.expect("json");
    assert_eq!(r["cancelled"].as_array().map(|a| a.len()), Some(3), "{r}");
    assert_eq!(
        r["not_found"],
        json!(["00000000-0000-4000-8000-000000000000"])
    );
    let t = wait_status(&s, &running, &["cancelled", "completed", "failed"]).await;
    assert_eq!(t["status"], "cancelled", "{t}");
    assert!(t["images"].as_array().is_some_and(|a| a.is_empty()));
    for p in [&p1, &p2] {
        assert_eq!(task(&s, p).await["status"], "cancelled");
    }
    // Cancelling a finished task is a conflict; a bad id never reaches the database.
    let r = s
        .client
        .delete(s.url(&format!("/api/v1/tasks/{p1}")))
        .send()
        .await
        .expect("del");
    assert_eq!(r.status(), 409);
    let r = s
        .client
        .delete(s.url("/api/v1/tasks/..%2F..%2Fetc"))
        .send()
        .await
        .expect("del");
    assert_eq!(r.status(), 422);
    // The queue goes on after cancellations.
    let after = submit(&s, json!({})).await;
    assert_eq!(
        wait_status(&s, &after, &["completed", "failed"]).await["status"],
        "completed"
    );
}

async fn run_mixed_workload(smart: bool) -> (u64, Vec<String>) {
    let s = server_with_models(&[1, 2], |c| c.queue.smart_scheduling = smart).await;
    let m = checkpoints(&s).await;
    s.post_json("/api/v1/queue/pause", &json!({})).await;
    let mut ids = vec![];
    for model in [&m[0], &m[1], &m[0], &m[1], &m[0]] {
        ids.push(submit(&s, json!({"model": model})).await);
    }
    s.post_json("/api/v1/queue/resume", &json!({})).await;
    let mut statuses = vec![];
    for id in &ids {
        statuses.push(wait_status(&s, id, &["completed", "failed"]).await["status"].to_string());
    }
    (
        s.server.state.engine.loads.load(Ordering::Relaxed),
        statuses,
    )
}

#[tokio::test]
async fn smart_scheduling_loads_fewer_checkpoints_than_fifo_and_starves_nothing() {
    let (smart_loads, smart_status) = run_mixed_workload(true).await;
    let (fifo_loads, fifo_status) = run_mixed_workload(false).await;
    assert!(
        smart_status.iter().all(|s| s == "\"completed\""),
        "{smart_status:?}"
    );
    assert!(
        fifo_status.iter().all(|s| s == "\"completed\""),
        "{fifo_status:?}"
    );
    assert_eq!(smart_loads, 2);
    assert_eq!(fifo_loads, 5);
}

#[tokio::test]
async fn max_reorder_wait_bounds_how_long_a_task_is_passed_over() {
    // With a zero bound every waiting task is overdue: pure FIFO even with smart scheduling on.
    let s = server_with_models(&[1, 2], |c| c.queue.max_reorder_wait = Duration::ZERO).await;
    let m = checkpoints(&s).await;
    s.post_json("/api/v1/queue/pause", &json!({})).await;
    let mut ids = vec![];
    for model in [&m[0], &m[1], &m[0]] {
        ids.push(submit(&s, json!({"model": model})).await);
    }
    s.post_json("/api/v1/queue/resume", &json!({})).await;
    for id in &ids {
        wait_status(&s, id, &["completed"]).await;
    }
    assert_eq!(s.server.state.engine.loads.load(Ordering::Relaxed), 3);
}

#[tokio::test]
async fn invalid_requests_are_rejected_and_nothing_is_queued() {
    let s = server_with_models(&[1], |c| c.network.allow_private_targets = false).await;
    let lora_less = "f".repeat(64);
    let png_8k = {
        // A header that claims 9000×9000: refused from the header, before decoding.
        let mut out = Vec::new();
        image::DynamicImage::new_rgb8(8, 8)
            .write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
            .expect("png");
        out[16..20].copy_from_slice(&9000u32.to_be_bytes());
        out[20..24].copy_from_slice(&9000u32.to_be_bytes());
        use base64::Engine as _;
        format!(
            "data:image/png;base64,{}",
            base64::engine::general_purpose::STANDARD.encode(out)
        )
    };
    let cases: Vec<(Value, u16)> = vec![
        (json!({"width": 100}), 422),
        (json!({"width": 4096, "height": 4096}), 422),
        (json!({"num_images": 0}), 422),
        (json!({"num_images": 11}), 422),
        (json!({"num_inference_steps": 151}), 422),
        (json!({"guidance_scale": "high"}), 422),
        (json!({"strength": 1.5}), 422),
        (json!({"scheduler": "Nope"}), 422),
        (json!({"schedule_type": "weird"}), 422),
        (json!({"scheduler": "DDIM", "schedule_type": "karras"}), 422),
        (json!({"output_format": "gif"}), 422),
        (json!({"model": lora_less}), 422),
        (json!({"model": "../../etc/passwd"}), 422),
        (json!({"prompt": "x".repeat(10_001)}), 422),
        (json!({"init_image": "data:image/png;base64,@@@"}), 422),
        (json!({"init_image": png_8k}), 422),
        (json!({"init_image": "data:image/png;base64,aGVsbG8="}), 422),
        (json!({"mask": "data:image/png;base64,aGVsbG8="}), 422),
        (json!({"callback_url": "http://127.0.0.1:9/cb"}), 422),
        (json!({"callback_url": "http://169.254.169.254/"}), 422),
        (json!({"callback_url": "file:///etc/passwd"}), 422),
        (
            json!({"loras": [{"sha256": lora_less, "weight": 1.0}]}),
            422,
        ),
        (json!({"prompt": "a <lora:missing:1> cat"}), 422),
        (json!({"seed": -5}), 422),
    ];
    for (extra, want) in cases {
        let (status, r) = s.post_json("/api/v1/tasks", &body(extra.clone())).await;
        assert_eq!(status, want, "{extra} → {r}");
        assert!(r["detail"].is_array() || r["detail"].is_string(), "{r}");
    }
    let (status, r) = s.post_json("/api/v1/tasks", &json!({"width": 64})).await;
    assert_eq!(status, 422, "missing prompt: {r}");
    assert_eq!(r["detail"][0]["type"], "missing");
    let r = s
        .client
        .post(s.url("/api/v1/tasks"))
        .header("content-type", "text/plain")
        .body(r#"{"prompt":"x"}"#)
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 415);
    let (_, list) = s.get_json("/api/v1/tasks").await;
    assert_eq!(list["total"], 0, "nothing was queued: {list}");
    assert!(
        std::fs::read_dir(s.server.state.inputs_dir())
            .map(|d| d.count())
            .unwrap_or(0)
            == 0
    );
}

fn png_data_url(w: u32, h: u32, rgb: [u8; 3]) -> String {
    let img = image::RgbImage::from_pixel(w, h, image::Rgb(rgb));
    let mut out = Vec::new();
    image::DynamicImage::ImageRgb8(img)
        .write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        .expect("png");
    use base64::Engine as _;
    format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(out)
    )
}

/// img2img inputs live under data/inputs while a task may still run, then the sweep removes them.
#[tokio::test]
async fn img2img_inputs_are_kept_for_active_tasks_and_swept_after() {
    let s = server_with_models(&[1], |_| {}).await;
    let inputs = s.server.state.inputs_dir();
    let files = || -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&inputs)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().to_string())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    };
    let done = submit(
        &s,
        json!({"init_image": png_data_url(64, 64, [200, 30, 30]), "strength": 0.6}),
    )
    .await;
    let t = wait_status(&s, &done, &["completed", "failed"]).await;
    assert_eq!(t["status"], "completed", "{t}");
    assert_eq!(t["params"]["strength"], 0.6, "{t}");
    let done_input = t["params"]["init_image"]
        .as_str()
        .expect("input")
        .to_string();
    s.post_json("/api/v1/queue/pause", &json!({})).await;
    let waiting = submit(
        &s,
        json!({"init_image": png_data_url(64, 64, [30, 30, 200]),
               "mask": png_data_url(64, 64, [255, 255, 255])}),
    )
    .await;
    let p = task(&s, &waiting).await["params"].clone();
    let keep = [&p["init_image"], &p["mask"]].map(|v| v.as_str().expect("stored").to_string());
    assert_eq!(files().len(), 3, "{:?}", files());

    let removed = sd_host::queue::inputs::sweep_unused(&s.server.state, Duration::ZERO)
        .await
        .expect("sweep");
    assert_eq!(removed, 1);
    let mut want = keep.to_vec();
    want.sort();
    assert_eq!(files(), want, "only the finished task's input went");
    assert!(!files().contains(&done_input));
    // The waiting task still runs from its kept inputs.
    s.post_json("/api/v1/queue/resume", &json!({})).await;
    let t = wait_status(&s, &waiting, &["completed", "failed"]).await;
    assert_eq!(t["status"], "completed", "{t}");
    sd_host::queue::inputs::sweep_unused(&s.server.state, Duration::ZERO)
        .await
        .expect("sweep");
    assert!(files().is_empty(), "{:?}", files());
}

#[tokio::test]
async fn callback_is_retried_after_500_and_delivered() {
    use axum::routing::post;
    let hits: Arc<Mutex<Vec<Value>>> = Arc::default();
    let h2 = hits.clone();
    let app = axum::Router::new().route(
        "/cb",
        post(move |axum::Json(v): axum::Json<Value>| {
            let hits = h2.clone();
            async move {
                let mut h = hits.lock().expect("lock");
                h.push(v);
                if h.len() == 1 {
                    axum::http::StatusCode::INTERNAL_SERVER_ERROR
                } else {
                    axum::http::StatusCode::OK
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let cb = format!("http://{}/cb", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });

    let s = server_with_models(&[1], |c| c.network.allow_private_targets = true).await;
    let id = submit(&s, json!({"callback_url": cb})).await;
    wait_status(&s, &id, &["completed"]).await;
    for _ in 0..100 {
        if hits.lock().expect("lock").len() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let hits = hits.lock().expect("lock").clone();
    assert_eq!(hits.len(), 2, "one 500, then one success: {hits:?}");
    assert_eq!(hits[1]["task_id"], id.as_str());
    assert_eq!(hits[1]["status"], "completed");
    assert!(hits[1]["image_url"]
        .as_str()
        .unwrap_or("")
        .contains("/api/v1/images/"));
}

/// `sd-host serve` as a real process on `data` (so a test can SIGKILL it); returns it and its URL.
fn spawn_server_process(data: &Path, env: &[(&str, &str)]) -> (std::process::Child, String) {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_sd-host"))
        .args(["serve", "--port", "0", "--data-dir"])
        .arg(data)
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn sd-host");
    let mut line = String::new();
    {
        use std::io::BufRead;
        let out = child.stdout.take().expect("stdout");
        std::io::BufReader::new(out)
            .read_line(&mut line)
            .expect("read");
    }
    let base = line.trim().rsplit(' ').next().expect("url").to_string();
    assert!(base.starts_with("http://127.0.0.1:"), "{line}");
    (child, base)
}

/// Submits `body(extra)` to the server process at `base`; returns the task id.
async fn post_task(client: &reqwest::Client, base: &str, extra: Value) -> String {
    let r: Value = client
        .post(format!("{base}/api/v1/tasks"))
        .json(&body(extra))
        .send()
        .await
        .expect("post")
        .json()
        .await
        .expect("json");
    r["task_id"].as_str().expect("id").to_string()
}

#[test]
fn restart_requeues_a_task_interrupted_mid_run() {
    let dir = data_dir_with_models(&[1]);
    let data = dir.path().join("data");
    // First server: a real process, killed (SIGKILL) while the task runs.
    let (mut child, base) = spawn_server_process(&data, &[]);
    let rt = tokio::runtime::Runtime::new().expect("rt");
    let client = reqwest::Client::new();
    let id = rt.block_on(async {
        let id = post_task(
            &client,
            &base,
            json!({"num_inference_steps": 150, "width": 128, "height": 128, "num_images": 10}),
        )
        .await;
        for _ in 0..600 {
            let t: Value = client
                .get(format!("{base}/api/v1/tasks/{id}"))
                .send()
                .await
                .expect("get")
                .json()
                .await
                .expect("json");
            if t["status"] == "processing" {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        id
    });
    child.kill().expect("kill");
    let _ = child.wait();

    rt.block_on(async {
        let s = TestServer::start_in(dir, |_| {}).await;
        let t = task(&s, &id).await;
        assert!(
            t["status"] == "pending" || t["status"] == "processing",
            "re-queued after the crash: {t}"
        );
        let rec = s
            .server
            .state
            .repo
            .get_task(&id)
            .await
            .expect("db")
            .expect("row");
        assert!(rec.attempts >= 1);
        // Cancel the long task; the point is that it came back, not that it finishes.
        s.client
            .delete(s.url(&format!("/api/v1/tasks/{id}")))
            .send()
            .await
            .expect("del");
        let t = wait_status(&s, &id, &["cancelled", "completed", "failed"]).await;
        assert_eq!(t["status"], "cancelled");
        let _ = Path::new(&data);
    });
}

#[test]
fn a_callback_cut_short_by_a_crash_is_sent_at_the_next_start() {
    let rt = tokio::runtime::Runtime::new().expect("rt");
    // The receiver answers 500 until `up` is set, recording every attempt.
    let hits = Arc::new(Mutex::new(Vec::<Value>::new()));
    let up = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (h2, up2) = (hits.clone(), up.clone());
    let app = axum::Router::new().route(
        "/cb",
        axum::routing::post(move |axum::Json(v): axum::Json<Value>| {
            let (hits, up) = (h2.clone(), up2.clone());
            async move {
                hits.lock().expect("lock").push(v);
                if up.load(Ordering::SeqCst) {
                    axum::http::StatusCode::OK
                } else {
                    axum::http::StatusCode::INTERNAL_SERVER_ERROR
                }
            }
        }),
    );
    let cb = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let cb = format!("http://{}/cb", listener.local_addr().expect("addr"));
        tokio::spawn(async move { axum::serve(listener, app).await });
        cb
    });
    let dir = data_dir_with_models(&[1]);
    let (mut child, base) = spawn_server_process(
        &dir.path().join("data"),
        &[
            ("SDHOST__NETWORK__ALLOW_PRIVATE_TARGETS", "true"),
            ("SDHOST__QUEUE__CALLBACK_RETRIES", "50"),
        ],
    );
    let id = rt.block_on(async {
        let id = post_task(&reqwest::Client::new(), &base, json!({"callback_url": cb})).await;
        // The task finished and its callback failed once: the server is now between retries.
        for _ in 0..1200 {
            if !hits.lock().expect("lock").is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        id
    });
    child.kill().expect("kill");
    let _ = child.wait();
    {
        let first = hits.lock().expect("lock");
        assert!(
            !first.is_empty(),
            "the first server never tried the callback"
        );
        assert_eq!(first[0]["task_id"], id.as_str());
    }
    up.store(true, Ordering::SeqCst);
    hits.lock().expect("lock").clear();

    rt.block_on(async {
        let s = TestServer::start_in(dir, |c| c.network.allow_private_targets = true).await;
        let got = callbacks_settled(&s, &hits, 1).await;
        assert_eq!(got.len(), 1, "sent again once after the restart: {got:?}");
        assert_eq!(got[0]["task_id"], id.as_str());
        assert_eq!(got[0]["status"], "completed");
        assert!(no_callbacks_owed(&s).await);
    });
}

#[tokio::test]
async fn queue_stream_sends_snapshots() {
    let s = server_with_models(&[1], |_| {}).await;
    s.post_json("/api/v1/queue/pause", &json!({})).await;
    let url = s.url("/api/v1/tasks/queue");
    let client = s.client.clone();
    // Ends at the first snapshot that lists a pending task (the one the submission causes);
    // snapshots from the pause or start-up may still arrive before it, in any order.
    let reader = tokio::spawn(async move {
        sse(&client, &url, None, |_, d| {
            d["pending"].as_array().is_some_and(|p| !p.is_empty())
        })
        .await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let id = submit(&s, json!({})).await;
    let events = reader.await.expect("reader");
    assert!(events.iter().all(|e| e.1 == "snapshot"));
    assert_eq!(events[0].2["paused"], true);
    let last = &events.last().expect("event").2;
    assert_eq!(last["pending"][0]["task_id"], id.as_str(), "{last}");
    assert_eq!(last["pending"][0]["position"], 1);
}

#[tokio::test]
async fn engine_failure_fails_the_task_and_the_queue_goes_on() {
    let s = server_with_models(&[1, 2], |_| {}).await;
    let m = checkpoints(&s).await;
    let broken = s
        .server
        .state
        .repo
        .get_model(&m[0])
        .await
        .expect("db")
        .expect("row");
    // The file goes bad after it was registered (disk corruption, partial copy).
    std::fs::write(
        broken.path.as_deref().expect("path"),
        b"not a safetensors file",
    )
    .expect("write");
    s.post_json("/api/v1/queue/pause", &json!({})).await;
    let bad = submit(&s, json!({"model": m[0]})).await;
    let good = submit(&s, json!({"model": m[1]})).await;
    s.post_json("/api/v1/queue/resume", &json!({})).await;
    let t = wait_status(&s, &bad, &["failed", "completed"]).await;
    assert_eq!(t["status"], "failed");
    assert!(
        t["error_message"]
            .as_str()
            .unwrap_or("")
            .contains("loading checkpoint"),
        "{t}"
    );
    assert_eq!(
        wait_status(&s, &good, &["failed", "completed"]).await["status"],
        "completed"
    );
}

#[tokio::test]
async fn loras_from_the_request_and_from_prompt_tags_are_applied_exactly() {
    let dir = data_dir_with_models(&[1]);
    let models = dir.path().join("data/models");
    sd_engine::tiny::write_tiny_lora(
        &models.join("tiny1.safetensors"),
        sd_engine::lora::LoraKind::Lora,
        3,
        &models.join("grain.safetensors"),
    )
    .expect("tiny lora");
    // A LoRA for another family must be refused at submit.
    sd_engine::tiny::write_tiny_checkpoint(
        sd_engine::Family::Sdxl,
        false,
        1,
        &dir.path().join("xl.safetensors"),
    )
    .expect("xl");
    sd_engine::tiny::write_tiny_lora(
        &dir.path().join("xl.safetensors"),
        sd_engine::lora::LoraKind::Lokr,
        3,
        &models.join("xl_lora.safetensors"),
    )
    .expect("xl lora");
    let s = TestServer::start_in(dir, |_| {}).await;
    let all = s
        .server
        .state
        .repo
        .list_models(&Default::default())
        .await
        .expect("models");
    let lora = all
        .iter()
        .find(|m| m.filename == "grain.safetensors")
        .expect("lora registered");
    // Tiny widths do not name a family (real ones do: 768/1024/2048 context); the engine checks at apply.
    assert_eq!(lora.model_type, "lora");
    let xl = all
        .iter()
        .find(|m| m.filename == "xl_lora.safetensors")
        .expect("xl lora");
    let ckpt = all
        .iter()
        .find(|m| m.filename == "tiny1.safetensors")
        .expect("ckpt");

    let run = |extra: Value| {
        let s = &s;
        async move {
            let id = submit(s, extra).await;
            let t = wait_status(s, &id, &["completed", "failed"]).await;
            assert_eq!(t["status"], "completed", "{t}");
            let hash = t["images"][0]["hash"].as_str().expect("hash").to_string();
            // Pixels, not file hashes: the metadata inside the file names the LoRAs.
            let bytes = s.server.state.blobs.get(&hash).await.expect("blob");
            image::load_from_memory(&bytes)
                .expect("png")
                .to_rgb8()
                .into_raw()
        }
    };
    let plain = run(json!({})).await;
    let with_api = run(json!({"loras": [{"sha256": lora.sha256, "weight": 1.0}]})).await;
    let with_tag = run(json!({"prompt": "a red (cat:1.2) <lora:grain:1>"})).await;
    let back = run(json!({})).await;
    let zero = run(json!({"loras": [{"id": lora.sha256, "weight": 0.0}]})).await;
    assert_ne!(plain, with_api, "a LoRA at weight 1 changes the image");
    assert_eq!(
        back, plain,
        "removing the LoRA restores the checkpoint bit for bit"
    );
    assert_eq!(zero, plain, "weight 0 is no LoRA");
    // The tag is removed from the engine prompt; the stored prompt keeps it (as A1111's infotext does).
    let (_, list) = s
        .get_json("/api/v1/tasks?status=completed&per_page=10")
        .await;
    let tagged = list["tasks"]
        .as_array()
        .expect("tasks")
        .iter()
        .find(|t| {
            t["params"]["prompt"]
                .as_str()
                .unwrap_or("")
                .contains("<lora:grain:1>")
        })
        .expect("tagged task");
    assert_eq!(tagged["params"]["loras"][0]["sha256"], lora.sha256.as_str());
    assert_ne!(with_tag, plain);
    let (status, r) = s
        .post_json(
            "/api/v1/tasks",
            &body(json!({"model": ckpt.sha256, "loras": [{"sha256": xl.sha256}]})),
        )
        .await;
    assert_eq!(status, 422, "{r}");
    assert!(r.to_string().contains("sdxl"), "{r}");
}

#[tokio::test]
async fn pause_lets_the_running_task_finish_and_holds_the_rest() {
    let s = server_with_models(&[1], |_| {}).await;
    let running = submit(
        &s,
        json!({"num_inference_steps": 20, "width": 96, "height": 96}),
    )
    .await;
    let waiting = submit(&s, json!({})).await;
    wait_status(&s, &running, &["processing"]).await;
    let (status, _) = s.post_json("/api/v1/queue/pause", &json!({})).await;
    assert_eq!(status, 200);
    let t = wait_status(&s, &running, &["completed", "failed", "cancelled"]).await;
    assert_eq!(
        t["status"], "completed",
        "pause does not stop the running task"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(task(&s, &waiting).await["status"], "pending");
    s.post_json("/api/v1/queue/resume", &json!({})).await;
    assert_eq!(
        wait_status(&s, &waiting, &["completed", "failed"]).await["status"],
        "completed"
    );
}

/// Host overhead per task: from sending `POST /api/v1/tasks` to the queue stream announcing the
/// task running (API → validation → database commit → dispatcher → engine start), an upper bound
/// since it includes the SSE delivery. A measurement, not a test:
/// `cargo test -p sd-host --test tasks bench_host_overhead -- --ignored --nocapture`.
#[tokio::test]
#[ignore = "timing benchmark; prints figures for bench/RESULTS.md"]
async fn bench_host_overhead_per_task() {
    let s = server_with_models(&[1], |_| {}).await;
    // Warm up: the first task loads the checkpoint.
    let id = submit(&s, json!({"num_inference_steps": 1})).await;
    wait_status(&s, &id, &["completed"]).await;
    let resp = s
        .client
        .get(s.url("/api/v1/tasks/queue"))
        .send()
        .await
        .expect("sse");
    let mut stream = resp.bytes_stream();
    let mut buf = String::new();
    let mut times = vec![];
    for _ in 0..30 {
        let t0 = std::time::Instant::now();
        let id = submit(&s, json!({"num_inference_steps": 1})).await;
        'seen: loop {
            while let Some(end) = buf.find("\n\n") {
                let block: String = buf.drain(..end + 2).collect();
                let data = block.lines().find_map(|l| l.strip_prefix("data:"));
                let snap: Value = data
                    .and_then(|d| serde_json::from_str(d.trim()).ok())
                    .unwrap_or(Value::Null);
                if snap["running"]["task_id"] == id.as_str() {
                    times.push(t0.elapsed().as_secs_f64() * 1000.0);
                    break 'seen;
                }
            }
            let chunk = stream.next().await.expect("open").expect("chunk");
            buf.push_str(&String::from_utf8_lossy(&chunk));
        }
        wait_status(&s, &id, &["completed"]).await;
        buf.clear();
    }
    times.sort_by(f64::total_cmp);
    println!(
        "host overhead per task (ms): median {:.2}, p90 {:.2}, min {:.2}, max {:.2} over {} tasks",
        times[times.len() / 2],
        times[times.len() * 9 / 10],
        times[0],
        times[times.len() - 1],
        times.len()
    );
}

/// Every event of a task's stream, read until the server ends it; panics if it does not end.
async fn task_events_to_end(s: &TestServer, id: &str) -> Vec<(Option<u64>, String, Value)> {
    let t0 = std::time::Instant::now();
    let events = sse(
        &s.client,
        &s.url(&format!("/api/v1/tasks/{id}/events")),
        None,
        |_, _| false,
    )
    .await;
    assert!(
        t0.elapsed() < Duration::from_secs(55),
        "the stream did not end after its terminal event: {events:?}"
    );
    events
}

/// Breaks the registered file of checkpoint `sha` (its loading then fails the task).
async fn break_checkpoint(s: &TestServer, sha: &str) {
    let m = s
        .server
        .state
        .repo
        .get_model(sha)
        .await
        .expect("db")
        .expect("row");
    std::fs::write(m.path.as_deref().expect("path"), b"not a safetensors file").expect("write");
}

#[tokio::test]
async fn queue_clear_cancels_pending_tasks_and_leaves_the_running_one() {
    let s = server_with_models(&[1], |_| {}).await;
    let running = submit(
        &s,
        json!({"num_inference_steps": 150, "width": 128, "height": 128, "num_images": 10}),
    )
    .await;
    wait_status(&s, &running, &["processing"]).await;
    s.post_json("/api/v1/queue/pause", &json!({})).await;
    let mut pending = vec![];
    for _ in 0..3 {
        pending.push(submit(&s, json!({})).await);
    }
    let (status, r) = s.post_json("/api/v1/queue/clear", &json!({})).await;
    assert_eq!(status, 200, "{r}");
    let mut cancelled: Vec<String> = r["cancelled"]
        .as_array()
        .expect("cancelled list")
        .iter()
        .map(|v| v.as_str().expect("id").to_string())
        .collect();
    cancelled.sort();
    let mut want = pending.clone();
    want.sort();
    assert_eq!(cancelled, want, "exactly the pending tasks: {r}");
    for id in &pending {
        let t = task(&s, id).await;
        assert_eq!(t["status"], "cancelled", "{t}");
        assert!(t["queue_position"].is_null(), "{t}");
    }
    // The running task is left alone (a cancel would stop it within a step), and still reports
    // its progress.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t = task(&s, &running).await;
    assert_eq!(
        t["status"], "processing",
        "clear touched the running task: {t}"
    );
    assert_eq!(t["progress"]["total_steps"], 150, "{t}");
    let (_, list) = s.get_json("/api/v1/tasks?status=pending").await;
    assert_eq!(list["total"], 0, "{list}");
    let snap = sse(&s.client, &s.url("/api/v1/tasks/queue"), None, |_, _| true).await;
    let snap = &snap.first().expect("a snapshot").2;
    assert_eq!(snap["pending"], json!([]), "{snap}");
    assert_eq!(snap["running"]["task_id"], running.as_str(), "{snap}");
    assert_eq!(snap["paused"], true, "{snap}");
    // Nothing left to clear.
    let (status, r) = s.post_json("/api/v1/queue/clear", &json!({})).await;
    assert_eq!((status, r), (200, json!({"cancelled": []})));
    assert_eq!(task(&s, &running).await["status"], "processing");
    s.client
        .delete(s.url(&format!("/api/v1/tasks/{running}")))
        .send()
        .await
        .expect("delete");
    let t = wait_status(&s, &running, &["cancelled", "completed", "failed"]).await;
    assert_eq!(t["status"], "cancelled", "{t}");
}

#[tokio::test]
async fn a_cancelled_task_stream_ends_with_cancelled_live_and_replayed() {
    let s = server_with_models(&[1], |_| {}).await;
    let id = submit(
        &s,
        json!({"num_inference_steps": 150, "width": 128, "height": 128, "num_images": 10}),
    )
    .await;
    let reader = {
        let (client, url) = (
            s.client.clone(),
            s.url(&format!("/api/v1/tasks/{id}/events")),
        );
        tokio::spawn(async move {
            let t0 = std::time::Instant::now();
            let ev = sse(&client, &url, None, |_, _| false).await;
            (ev, t0.elapsed())
        })
    };
    // Cancel mid-run, once it has taken a step.
    for _ in 0..600 {
        if task(&s, &id).await["progress"]["step"]
            .as_u64()
            .is_some_and(|n| n >= 1)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = s
        .client
        .delete(s.url(&format!("/api/v1/tasks/{id}")))
        .send()
        .await
        .expect("delete");
    assert_eq!(r.status(), 200);
    let (live, took) = reader.await.expect("reader");
    assert!(
        took < Duration::from_secs(55),
        "stream never ended: {live:?}"
    );
    let names: Vec<&str> = live.iter().map(|e| e.1.as_str()).collect();
    assert!(names.contains(&"started"), "{names:?}");
    assert!(names.contains(&"progress"), "{names:?}");
    assert_eq!(names.last(), Some(&"cancelled"), "{names:?}");
    assert_eq!(live.last().expect("event").2["task_id"], id.as_str());
    assert_eq!(task(&s, &id).await["status"], "cancelled");

    // Connecting after it finished replays the terminal event, then ends.
    let again = task_events_to_end(&s, &id).await;
    assert_eq!(
        again.last().map(|e| e.1.as_str()),
        Some("cancelled"),
        "{again:?}"
    );
    assert_eq!(again.last().expect("event").2["task_id"], id.as_str());

    // A pending task cancelled while a reader waits: queued, then cancelled.
    s.post_json("/api/v1/queue/pause", &json!({})).await;
    let p = submit(&s, json!({})).await;
    let reader = {
        let (client, url) = (
            s.client.clone(),
            s.url(&format!("/api/v1/tasks/{p}/events")),
        );
        tokio::spawn(async move { sse(&client, &url, None, |_, _| false).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    s.client
        .delete(s.url(&format!("/api/v1/tasks/{p}")))
        .send()
        .await
        .expect("delete");
    let ev = reader.await.expect("reader");
    let names: Vec<&str> = ev.iter().map(|e| e.1.as_str()).collect();
    assert_eq!(names, ["queued", "cancelled"], "{ev:?}");
}

#[tokio::test]
async fn a_failed_task_stream_ends_with_failed_and_its_detail() {
    let s = server_with_models(&[1], |_| {}).await;
    let m = checkpoints(&s).await;
    break_checkpoint(&s, &m[0]).await;
    s.post_json("/api/v1/queue/pause", &json!({})).await;
    let id = submit(&s, json!({"model": m[0]})).await;
    let reader = {
        let (client, url) = (
            s.client.clone(),
            s.url(&format!("/api/v1/tasks/{id}/events")),
        );
        tokio::spawn(async move { sse(&client, &url, None, |_, _| false).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    s.post_json("/api/v1/queue/resume", &json!({})).await;
    let live = tokio::time::timeout(Duration::from_secs(55), reader)
        .await
        .expect("the stream ended")
        .expect("reader");
    let names: Vec<&str> = live.iter().map(|e| e.1.as_str()).collect();
    assert_eq!(names.first(), Some(&"queued"), "{names:?}");
    assert_eq!(names.last(), Some(&"failed"), "{names:?}");
    let data = &live.last().expect("event").2;
    assert_eq!(data["task_id"], id.as_str());
    let detail = data["detail"].as_str().expect("detail string");
    assert!(detail.contains("loading checkpoint"), "{data}");
    let t = task(&s, &id).await;
    assert_eq!(t["status"], "failed");
    assert_eq!(t["error_message"], detail);

    let again = task_events_to_end(&s, &id).await;
    let last = again.last().expect("replayed");
    assert_eq!(last.1, "failed", "{again:?}");
    assert_eq!(last.2["detail"], detail);
}

/// A local callback receiver at `/cb`: records each POSTed body and answers `status` (with a
/// `Location` header when given).
async fn callback_receiver(
    status: u16,
    location: Option<String>,
) -> (String, Arc<Mutex<Vec<Value>>>) {
    use axum::routing::post;
    let hits: Arc<Mutex<Vec<Value>>> = Arc::default();
    let h2 = hits.clone();
    let app = axum::Router::new().route(
        "/cb",
        post(move |axum::Json(v): axum::Json<Value>| {
            let (hits, location) = (h2.clone(), location.clone());
            async move {
                hits.lock().expect("lock").push(v);
                let mut r = axum::response::Response::builder().status(status);
                if let Some(l) = location {
                    r = r.header("location", l);
                }
                r.body(axum::body::Body::empty()).expect("response")
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let cb = format!("http://{}/cb", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    (cb, hits)
}

async fn no_callbacks_owed(s: &TestServer) -> bool {
    s.server
        .state
        .repo
        .callbacks_due()
        .await
        .expect("db")
        .is_empty()
}

/// Waits until `hits` holds at least `n` bodies and no callback is owed any more.
async fn callbacks_settled(s: &TestServer, hits: &Arc<Mutex<Vec<Value>>>, n: usize) -> Vec<Value> {
    for _ in 0..300 {
        let got = hits.lock().expect("lock").len();
        if got >= n && no_callbacks_owed(s).await {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let got = hits.lock().expect("lock").clone();
    got
}

#[tokio::test]
async fn callbacks_carry_failure_cancellation_and_several_image_urls() {
    let (cb, hits) = callback_receiver(200, None).await;
    let s = server_with_models(&[1, 2], |c| c.network.allow_private_targets = true).await;
    let m = checkpoints(&s).await;
    break_checkpoint(&s, &m[0]).await;
    s.post_json("/api/v1/queue/pause", &json!({})).await;
    let bad = submit(&s, json!({"model": m[0], "callback_url": cb})).await;
    let pair = submit(
        &s,
        json!({"model": m[1], "num_images": 2, "callback_url": cb}),
    )
    .await;
    let gone = submit(&s, json!({"model": m[1], "callback_url": cb})).await;
    s.client
        .delete(s.url(&format!("/api/v1/tasks/{gone}")))
        .send()
        .await
        .expect("delete");
    s.post_json("/api/v1/queue/resume", &json!({})).await;
    assert_eq!(
        wait_status(&s, &bad, &["failed", "completed"]).await["status"],
        "failed"
    );
    let t_pair = wait_status(&s, &pair, &["failed", "completed"]).await;
    assert_eq!(t_pair["status"], "completed", "{t_pair}");
    let got = callbacks_settled(&s, &hits, 3).await;
    assert_eq!(got.len(), 3, "one callback per task: {got:?}");
    let of = |id: &str| {
        got.iter()
            .find(|v| v["task_id"] == id)
            .unwrap_or_else(|| panic!("no callback for {id}: {got:?}"))
            .clone()
    };

    let f = of(&bad);
    assert_eq!(f["status"], "failed", "{f}");
    assert!(
        f["error_message"]
            .as_str()
            .unwrap_or("")
            .contains("loading checkpoint"),
        "{f}"
    );
    assert!(
        f.get("image_url").is_none() && f.get("image_urls").is_none(),
        "{f}"
    );

    let p = of(&pair);
    assert_eq!(p["status"], "completed", "{p}");
    assert!(p["error_message"].is_null(), "{p}");
    assert!(
        p.get("image_url").is_none(),
        "two images go in image_urls: {p}"
    );
    let urls = p["image_urls"].as_array().expect("image_urls");
    assert_eq!(urls.len(), 2, "{p}");
    assert_eq!(&p["image_urls"], &t_pair["result_urls"]);
    for (u, im) in urls
        .iter()
        .zip(t_pair["images"].as_array().expect("images"))
    {
        let hash = im["hash"].as_str().expect("hash");
        assert!(
            u.as_str()
                .unwrap_or("")
                .ends_with(&format!("/api/v1/images/{hash}")),
            "{u}"
        );
    }

    let c = of(&gone);
    assert_eq!(c["status"], "cancelled", "{c}");
    assert!(
        c.get("image_url").is_none() && c.get("image_urls").is_none(),
        "{c}"
    );
}

#[tokio::test]
async fn a_callback_redirect_is_not_followed() {
    let (target, followed) = callback_receiver(200, None).await;
    let (cb, hits) = callback_receiver(307, Some(target)).await;
    let s = server_with_models(&[1], |c| c.network.allow_private_targets = true).await;
    let id = submit(&s, json!({"callback_url": cb})).await;
    assert_eq!(
        wait_status(&s, &id, &["completed", "failed"]).await["status"],
        "completed"
    );
    let got = callbacks_settled(&s, &hits, 1).await;
    // Give a followed redirect (or a retry) time to show.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let got_after = hits.lock().expect("lock").clone();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got_after.len(), 1, "a 307 is not retried: {got_after:?}");
    assert_eq!(got[0]["task_id"], id.as_str());
    assert!(
        followed.lock().expect("lock").is_empty(),
        "the redirect was followed"
    );
    assert!(no_callbacks_owed(&s).await);
}

#[tokio::test]
async fn task_list_pages_newest_first_and_filters_by_status() {
    let s = server_with_models(&[1], |_| {}).await;
    s.post_json("/api/v1/queue/pause", &json!({})).await;
    let mut ids = vec![];
    for i in 0..5 {
        let (status, r) = s.post_json("/api/v1/tasks", &body(json!({}))).await;
        assert_eq!(status, 202, "{r}");
        assert!(
            r["message"].as_str().is_some_and(|m| !m.trim().is_empty()),
            "{r}"
        );
        assert_eq!(r["queue_position"], i + 1, "{r}");
        ids.push(r["task_id"].as_str().expect("id").to_string());
    }
    let newest_first: Vec<String> = ids.iter().rev().cloned().collect();
    let mut seen = vec![];
    for (page, want_len) in [(1, 2), (2, 2), (3, 1), (4, 0)] {
        let (status, r) = s
            .get_json(&format!("/api/v1/tasks?page={page}&per_page=2"))
            .await;
        assert_eq!(status, 200, "{r}");
        assert_eq!(r["total"], 5, "{r}");
        assert_eq!(r["page"], page, "{r}");
        assert_eq!(r["per_page"], 2, "{r}");
        let tasks = r["tasks"].as_array().expect("tasks");
        assert_eq!(tasks.len(), want_len, "page {page}: {r}");
        seen.extend(
            tasks
                .iter()
                .map(|t| t["task_id"].as_str().expect("id").to_string()),
        );
    }
    assert_eq!(seen, newest_first, "pages cover every task, newest first");
    // Defaults and bounds.
    let (_, r) = s.get_json("/api/v1/tasks").await;
    assert_eq!(
        (r["page"].clone(), r["per_page"].clone()),
        (json!(1), json!(20))
    );
    assert_eq!(r["tasks"].as_array().map(|t| t.len()), Some(5));
    let (_, r) = s.get_json("/api/v1/tasks?page=0&per_page=100000").await;
    assert_eq!(
        (r["page"].clone(), r["per_page"].clone()),
        (json!(1), json!(200))
    );

    // Status filter.
    for id in &ids[..2] {
        let r = s
            .client
            .delete(s.url(&format!("/api/v1/tasks/{id}")))
            .send()
            .await
            .expect("delete");
        assert_eq!(r.status(), 200);
    }
    let (_, r) = s.get_json("/api/v1/tasks?status=cancelled").await;
    assert_eq!(r["total"], 2, "{r}");
    let got: Vec<&str> = r["tasks"]
        .as_array()
        .expect("tasks")
        .iter()
        .map(|t| t["task_id"].as_str().expect("id"))
        .collect();
    assert_eq!(got, [ids[1].as_str(), ids[0].as_str()]);
    let (_, r) = s
        .get_json("/api/v1/tasks?status=pending&page=2&per_page=2")
        .await;
    assert_eq!(r["total"], 3, "{r}");
    let got: Vec<&Value> = r["tasks"].as_array().expect("tasks").iter().collect();
    assert_eq!(got.len(), 1, "{r}");
    assert_eq!(got[0]["task_id"], ids[2].as_str());
    assert_eq!(got[0]["status"], "pending");
    assert_eq!(got[0]["queue_position"], 1, "{r}");
    let (status, r) = s.get_json("/api/v1/tasks?status=done").await;
    assert_eq!(status, 422, "{r}");
    // A page far past the end is empty, not an overflow.
    let (status, r) = s
        .get_json(&format!("/api/v1/tasks?page={}&per_page=200", i64::MAX))
        .await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["tasks"], json!([]), "{r}");
    assert_eq!(r["total"], 5, "{r}");

    // A task's timestamps and progress: null while pending, full once completed.
    let t = task(&s, &ids[4]).await;
    for k in ["created_at", "updated_at"] {
        let v = t[k].as_str().unwrap_or_else(|| panic!("{k}: {t}"));
        chrono::DateTime::parse_from_rfc3339(v).unwrap_or_else(|e| panic!("{k} {v}: {e}"));
    }
    assert!(t.get("progress").is_some_and(|p| p.is_null()), "{t}");
    assert!(
        t["started_at"].is_null() && t["finished_at"].is_null(),
        "{t}"
    );
    s.post_json("/api/v1/queue/resume", &json!({})).await;
    let t = wait_status(&s, &ids[4], &["completed", "failed"]).await;
    assert_eq!(t["status"], "completed", "{t}");
    assert_eq!(t["progress"]["step"], 2, "{t}");
    assert_eq!(t["progress"]["total_steps"], 2, "{t}");
    let created = chrono::DateTime::parse_from_rfc3339(t["created_at"].as_str().expect("created"))
        .expect("created_at");
    let updated = chrono::DateTime::parse_from_rfc3339(t["updated_at"].as_str().expect("updated"))
        .expect("updated_at");
    assert!(updated >= created, "{t}");
    assert!(t["finished_at"].is_string(), "{t}");
}

#[tokio::test]
async fn max_pixels_caps_the_area_even_within_max_width_and_height() {
    let s = server_with_models(&[1], |c| c.limits.max_pixels = 64 * 64).await;
    s.post_json("/api/v1/queue/pause", &json!({})).await;
    for extra in [
        json!({"width": 64, "height": 72}),
        json!({"width": 72, "height": 64}),
        // The family default size (512×512 for sd1) is over the cap too.
        json!({"width": null, "height": null}),
    ] {
        let (status, r) = s.post_json("/api/v1/tasks", &body(extra.clone())).await;
        assert_eq!(status, 422, "{extra} → {r}");
        assert!(r.to_string().contains("4096"), "{extra} → {r}");
    }
    let (_, list) = s.get_json("/api/v1/tasks").await;
    assert_eq!(list["total"], 0, "nothing queued: {list}");
    // Exactly at the limit, in either shape.
    let a = submit(&s, json!({"width": 64, "height": 64})).await;
    let b = submit(&s, json!({"width": 8, "height": 512})).await;
    let (_, list) = s.get_json("/api/v1/tasks").await;
    assert_eq!(list["total"], 2, "{list}");
    assert_eq!(task(&s, &a).await["params"]["width"], 64);
    assert_eq!(task(&s, &b).await["params"]["height"], 512);
}

#[tokio::test]
async fn output_format_of_a_task_sets_the_stored_image_type() {
    let s = server_with_models(&[1], |_| {}).await;
    for (asked, stored, ctype, want) in [
        ("jpeg", "jpeg", "image/jpeg", image::ImageFormat::Jpeg),
        ("JPG", "jpeg", "image/jpeg", image::ImageFormat::Jpeg),
        ("webp", "webp", "image/webp", image::ImageFormat::WebP),
    ] {
        let id = submit(&s, json!({"output_format": asked})).await;
        let t = wait_status(&s, &id, &["completed", "failed"]).await;
        assert_eq!(t["status"], "completed", "{t}");
        assert_eq!(t["params"]["output_format"], stored, "{t}");
        let hash = t["images"][0]["hash"].as_str().expect("hash");
        let r = s.get(&format!("/api/v1/images/{hash}")).await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["content-type"], ctype, "{asked}");
        let bytes = r.bytes().await.expect("body");
        assert_eq!(
            image::guess_format(&bytes).expect("known format"),
            want,
            "{asked}"
        );
        let img = image::load_from_memory_with_format(&bytes, want).expect("decodes");
        assert_eq!((img.width(), img.height()), (64, 64));
        let rec = s
            .server
            .state
            .repo
            .get_image(hash)
            .await
            .expect("db")
            .expect("row");
        assert_eq!(rec.format, stored);
    }
}

/// Idle event streams get keep-alive comments at `server.sse_keepalive`, so proxies keep them open.
#[tokio::test]
async fn idle_streams_get_keep_alive_comments() {
    let s = server_with_models(&[1], |c| {
        c.server.sse_keepalive = Duration::from_millis(150)
    })
    .await;
    let resp = s
        .client
        .get(s.url("/api/v1/tasks/queue"))
        .send()
        .await
        .expect("sse");
    let mut stream = resp.bytes_stream();
    let mut text = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while text.matches(": keep-alive").count() < 3 {
        match tokio::time::timeout_at(deadline, stream.next()).await {
            Ok(Some(chunk)) => text.push_str(&String::from_utf8_lossy(&chunk.expect("chunk"))),
            _ => break,
        }
    }
    assert!(text.starts_with("event: snapshot"), "{text}");
    assert!(text.matches(": keep-alive").count() >= 3, "{text}");
}

/// The real engine, except that a prompt containing `PANIC` makes `generate` panic.
struct PanicsOnRequest(sd_engine::pipeline::CpuEngine);

impl sd_engine::Backend for PanicsOnRequest {
    fn load_checkpoint(&mut self, path: &Path) -> sd_engine::Result<sd_engine::CheckpointInfo> {
        self.0.load_checkpoint(path)
    }
    fn unload(&mut self) {
        self.0.unload()
    }
    fn loaded(&self) -> Option<&sd_engine::CheckpointInfo> {
        self.0.loaded()
    }
    fn generate(
        &mut self,
        params: &sd_engine::GenerateParams,
        progress: &mut dyn FnMut(&sd_engine::Progress) -> sd_engine::Control,
    ) -> sd_engine::Result<Vec<sd_engine::RgbImage>> {
        assert!(!params.prompt.contains("PANIC"), "injected engine panic");
        self.0.generate(params, progress)
    }
    fn set_loras(
        &mut self,
        loras: &[sd_engine::LoraSpec],
    ) -> sd_engine::Result<sd_engine::LoraReport> {
        self.0.set_loras(loras)
    }
    fn set_embeddings(
        &mut self,
        embeddings: &[sd_engine::EmbeddingSpec],
    ) -> sd_engine::Result<sd_engine::EmbeddingReport> {
        self.0.set_embeddings(embeddings)
    }
}

/// A panic inside the engine fails that task with a message; the engine thread survives and the
/// next task runs (on a freshly loaded model).
#[tokio::test]
async fn an_engine_panic_fails_the_task_and_the_queue_goes_on() {
    let s = TestServer::start_in_with_engine(
        data_dir_with_models(&[1]),
        |_| {},
        || Box::new(PanicsOnRequest(sd_engine::pipeline::CpuEngine::new())),
    )
    .await;
    s.post_json("/api/v1/queue/pause", &json!({})).await;
    let bad = submit(&s, json!({"prompt": "PANIC please"})).await;
    let good = submit(&s, json!({})).await;
    s.post_json("/api/v1/queue/resume", &json!({})).await;
    let t = wait_status(&s, &bad, &["failed", "completed"]).await;
    assert_eq!(t["status"], "failed", "{t}");
    let msg = t["error_message"].as_str().unwrap_or_default();
    assert!(msg.contains("injected engine panic"), "{t}");
    let t = wait_status(&s, &good, &["failed", "completed"]).await;
    assert_eq!(t["status"], "completed", "{t}");
    let loads = s.server.state.engine.loads.load(Ordering::SeqCst);
    assert_eq!(
        loads, 2,
        "the model was dropped after the panic and loaded again"
    );
}

/// Force-deleting the model of a running task fails it once: one `failed` event and one callback,
/// not a second pair when the interrupted run winds down.
#[tokio::test]
async fn force_deleting_a_running_tasks_model_sends_one_callback() {
    let (cb, hits) = callback_receiver(200, None).await;
    let s = server_with_models(&[1], |_| {}).await;
    let m = checkpoints(&s).await;
    let id = submit(
        &s,
        json!({"model": m[0], "callback_url": cb, "num_inference_steps": 150,
               "width": 128, "height": 128, "num_images": 10}),
    )
    .await;
    wait_status(&s, &id, &["processing"]).await;
    let del = s
        .client
        .delete(s.url(&format!("/api/v1/models/{}?force=true", m[0])))
        .send()
        .await
        .expect("delete");
    assert_eq!(del.status(), 200);
    let t = wait_status(&s, &id, &["failed", "completed", "cancelled"]).await;
    assert_eq!(t["status"], "failed", "{t}");
    // The engine stops the run at its next step; give that path time to (not) speak.
    for _ in 0..200 {
        if s.server.state.queue.running().is_none() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let got = callbacks_settled(&s, &hits, 1).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    let after = hits.lock().expect("lock").clone();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(after.len(), 1, "exactly one callback: {after:?}");
    assert_eq!(after[0]["status"], "failed");
    let events = sse(
        &s.client,
        &s.url(&format!("/api/v1/tasks/{id}/events")),
        None,
        terminal,
    )
    .await;
    let terminals: Vec<&str> = events
        .iter()
        .map(|e| e.1.as_str())
        .filter(|e| terminal(e, &Value::Null))
        .collect();
    assert_eq!(terminals, ["failed"], "{events:?}");
}
