//! Seed-004 dialect under `/api` (issue 8): jobs, job SSE, gallery aliases and the `/api/info` schema.

mod common;

use std::time::Duration;

use common::TestServer;
use futures::StreamExt;
use serde_json::{json, Value};

fn data_dir(family: sd_engine::Family, with_lora: bool) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let models = dir.path().join("data/models");
    std::fs::create_dir_all(&models).expect("models dir");
    let ckpt = models.join("tiny.safetensors");
    sd_engine::tiny::write_tiny_checkpoint(family, false, 1, &ckpt).expect("tiny checkpoint");
    if with_lora {
        sd_engine::tiny::write_tiny_lora(
            &ckpt,
            sd_engine::lora::LoraKind::Lora,
            3,
            &models.join("tinylora.safetensors"),
        )
        .expect("tiny lora");
    }
    dir
}

async fn server() -> TestServer {
    TestServer::start_in(data_dir(sd_engine::Family::Sd1, true), |_| {}).await
}

fn job(extra: Value) -> Value {
    let mut b = json!({"prompt": "a blue bird", "width": 64, "height": 64, "num_inference_steps": 2, "seed": 3});
    if let (Some(o), Some(e)) = (b.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            o.insert(k.clone(), v.clone());
        }
    }
    b
}

/// Reads SSE events one at a time: `(event name, JSON data)`; keep-alive comments are skipped.
struct Sse {
    stream: futures::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    buf: String,
}

impl Sse {
    async fn open(s: &TestServer, path: &str) -> Sse {
        let resp = s.get(path).await;
        assert_eq!(resp.status(), 200, "{path}");
        assert!(resp.headers()["content-type"]
            .to_str()
            .unwrap_or("")
            .starts_with("text/event-stream"));
        Sse {
            stream: resp.bytes_stream().boxed(),
            buf: String::new(),
        }
    }

    async fn next(&mut self) -> Option<(String, Value)> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        loop {
            while let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let (mut ev, mut data) = (String::new(), String::new());
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        ev = v.trim().to_string();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim_start());
                    }
                }
                if !data.is_empty() {
                    return Some((ev, serde_json::from_str(&data).unwrap_or(Value::Null)));
                }
            }
            match tokio::time::timeout_at(deadline, self.stream.next()).await {
                Ok(Some(Ok(chunk))) => self.buf.push_str(&String::from_utf8_lossy(&chunk)),
                _ => return None,
            }
        }
    }
}

#[tokio::test]
async fn generate_job_status_sse_and_gallery_aliases() {
    let s = server().await;
    let mut gallery = Sse::open(&s, "/api/sse/gallery").await;

    let (st, r) = s
        .post_json("/api/generate", &job(json!({"num_images": 2})))
        .await;
    assert_eq!(st, 200, "{r}");
    let id = r["job_id"].as_str().expect("job_id").to_string();
    assert!(r["queue_position"].as_u64().is_some());

    let mut events = Sse::open(&s, &format!("/api/sse/{id}")).await;
    let mut seen = vec![];
    while let Some((name, data)) = events.next().await {
        assert_eq!(
            name, "message",
            "unnamed events reach EventSource.onmessage"
        );
        assert_eq!(data["job_id"], id.as_str());
        for key in ["status", "step", "total_steps", "preview", "queue_position"] {
            assert!(data.get(key).is_some(), "{key} in {data}");
        }
        seen.push(data);
    }
    let statuses: Vec<&str> = seen.iter().filter_map(|d| d["status"].as_str()).collect();
    assert_eq!(statuses.last(), Some(&"completed"), "{statuses:?}");
    let progress = seen
        .iter()
        .find(|d| d["status"] == "processing" && d["step"].as_u64().unwrap_or(0) > 0)
        .expect("a progress update");
    assert_eq!(progress["total_steps"], 2);
    assert!(progress["preview"]
        .as_str()
        .is_some_and(|p| p.starts_with("data:image/jpeg;base64,")));

    let (st, j) = s.get_json(&format!("/api/jobs/{id}")).await;
    assert_eq!(st, 200);
    assert_eq!(j["job_id"], id.as_str());
    assert_eq!(j["status"], "completed");
    assert_eq!(j["params"]["seed"], 3);
    let urls = j["image_urls"].as_array().expect("image_urls").clone();
    assert_eq!(urls.len(), 2);

    // A finished job's stream replays its end and closes.
    let mut again = Sse::open(&s, &format!("/api/sse/{id}")).await;
    let mut last = None;
    while let Some((_, d)) = again.next().await {
        last = Some(d);
    }
    assert_eq!(last.expect("an event")["status"], "completed");

    // Gallery: both new images were announced with dialect file names.
    let mut announced = vec![];
    while announced.len() < 2 {
        let (_, d) = gallery.next().await.expect("gallery event");
        announced.push(d["filename"].as_str().expect("filename").to_string());
        assert!(d["thumb_url"]
            .as_str()
            .is_some_and(|u| u.starts_with("/api/thumbs/")));
    }

    let (st, list) = s.get_json("/api/images?page=1&per_page=1").await;
    assert_eq!(st, 200, "{list}");
    assert_eq!(list["total"], 2);
    assert_eq!(list["images"].as_array().map(Vec::len), Some(1));
    let first = &list["images"][0];
    let name = first["filename"].as_str().expect("filename").to_string();
    assert!(
        name.ends_with(".png") && announced.contains(&name),
        "{name}"
    );
    assert_eq!(first["url"], format!("/api/images/{name}"));
    assert!(urls.contains(&first["url"]));

    let img = s.get(&format!("/api/images/{name}")).await;
    assert_eq!(img.status(), 200);
    assert_eq!(img.headers()["content-type"], "image/png");
    let bytes = img.bytes().await.expect("bytes");
    let native = s
        .get(&format!(
            "/api/v1/images/{}",
            first["hash"].as_str().unwrap_or("")
        ))
        .await
        .bytes()
        .await
        .expect("bytes");
    assert_eq!(bytes, native, "same bytes as the native route");
    let thumb = s.get(&format!("/api/thumbs/{name}?size=32")).await;
    assert_eq!(thumb.status(), 200);
    assert!(thumb.headers()["content-type"]
        .to_str()
        .unwrap_or("")
        .starts_with("image/"));
    assert_eq!(
        s.get(&format!("/api/images/{}.png", "0".repeat(64)))
            .await
            .status(),
        404
    );
    assert_eq!(
        s.get("/api/images/..%2F..%2Fetc%2Fpasswd").await.status(),
        422
    );
    assert_eq!(s.get("/api/thumbs/nothex.png").await.status(), 422);
    let (st, _) = s.get_json("/api/images?per_page=0").await;
    assert_eq!(st, 422);
    let (st, _) = s
        .get_json("/api/jobs/00000000-0000-4000-8000-000000000000")
        .await;
    assert_eq!(st, 404);
    let (st, _) = s.get_json("/api/jobs/not-a-uuid").await;
    assert_eq!(st, 422);
    let (st, _) = s
        .post_json("/api/generate", &job(json!({"width": 13})))
        .await;
    assert_eq!(st, 422);
}

#[tokio::test]
async fn a_waiting_job_reports_its_queue_position() {
    let s = server().await;
    s.server.state.queue.pause(&s.server.state);
    let (_, a) = s.post_json("/api/generate", &job(json!({}))).await;
    let (_, b) = s.post_json("/api/generate", &job(json!({}))).await;
    let (a, b) = (
        a["job_id"].as_str().expect("id").to_string(),
        b["job_id"].as_str().expect("id").to_string(),
    );
    let mut events = Sse::open(&s, &format!("/api/sse/{b}")).await;
    let (_, first) = events.next().await.expect("first event");
    assert_eq!(first["status"], "pending");
    assert_eq!(first["queue_position"], 2);
    let r = s
        .client
        .delete(s.url(&format!("/api/v1/tasks/{a}")))
        .send()
        .await
        .expect("cancel");
    assert_eq!(r.status(), 200);
    let (_, moved) = events.next().await.expect("position update");
    assert_eq!(moved["status"], "pending");
    assert_eq!(moved["queue_position"], 1);
    s.server.state.queue.resume(&s.server.state);
    let mut last = None;
    while let Some((_, d)) = events.next().await {
        last = Some(d);
    }
    assert_eq!(last.expect("events")["status"], "completed");
}

fn check_schema_structure(schema: &Value) {
    assert_eq!(
        schema["$schema"],
        "https://json-schema.org/draft/2020-12/schema"
    );
    assert_eq!(schema["type"], "object");
    assert_eq!(schema["required"], json!(["prompt"]));
    let props = schema["properties"].as_object().expect("properties");
    for key in [
        "prompt",
        "negative_prompt",
        "width",
        "height",
        "seed",
        "num_inference_steps",
        "guidance_scale",
        "scheduler",
        "loras",
    ] {
        assert!(
            props[key]["type"].is_string() || props[key]["type"].is_array(),
            "{key}"
        );
    }
    let samplers = props["scheduler"]["enum"].as_array().expect("sampler enum");
    assert!(samplers.contains(&json!("Euler a")) && samplers.contains(&json!("DPM++ 2M")));
    assert_eq!(props["width"]["maximum"], 2048);
    assert_eq!(props["width"]["multipleOf"], 8);
    assert_eq!(props["num_images"]["maximum"], 10);
    assert_eq!(props["num_inference_steps"]["maximum"], 150);
}

#[tokio::test]
async fn info_is_a_json_schema_for_the_current_model() {
    let s = server().await;
    let lora = s
        .server
        .state
        .repo
        .list_models(&Default::default())
        .await
        .expect("models")
        .into_iter()
        .find(|m| m.name == "tinylora")
        .expect("lora registered");
    let (st, schema) = s.get_json("/api/info").await;
    assert_eq!(st, 200);
    check_schema_structure(&schema);
    assert_eq!(schema["x-family"], "sd1");
    assert_eq!(schema["properties"]["width"]["default"], 512);
    let ids = &schema["properties"]["loras"]["items"]["properties"]["id"]["oneOf"];
    assert_eq!(ids[0]["const"], lora.sha256.as_str());
    assert_eq!(ids[0]["title"], "tinylora");
    assert_eq!(schema["x-loras"][0]["id"], lora.sha256.as_str());
    assert!(schema["x-loras"][0]["trigger_words"].is_array());

    // A body valid under the schema is accepted by POST /api/generate.
    let body = job(json!({"loras": [{"id": lora.sha256, "weight": 0.7}], "scheduler": "Euler a"}));
    let (st, r) = s.post_json("/api/generate", &body).await;
    assert_eq!(st, 200, "{r}");

    validate_with_python(&schema, &body, &lora.sha256).await;

    // SDXL: family defaults change; the sd1 LoRA no longer fits.
    let x = TestServer::start_in(data_dir(sd_engine::Family::Sdxl, false), |_| {}).await;
    let (_, schema) = x.get_json("/api/info").await;
    check_schema_structure(&schema);
    assert_eq!(schema["x-family"], "sdxl");
    assert_eq!(schema["properties"]["width"]["default"], 1024);
    assert_eq!(schema["properties"]["loras"]["maxItems"], 0);
    assert_eq!(schema["x-loras"], json!([]));
}

/// Checks the schema against the draft 2020-12 meta-schema and validates good and bad bodies with the
/// Python `jsonschema` package of the test venv (skipped without one, like the webuiapi test).
async fn validate_with_python(schema: &Value, good: &Value, lora: &str) {
    let python = match std::env::var("SDHOST_TEST_PYTHON") {
        Ok(p) => std::path::PathBuf::from(p),
        Err(_) => {
            let d = std::path::PathBuf::from("/var/tmp/sd-host-test-venv/bin/python");
            if !d.exists() {
                eprintln!("SKIPPED jsonschema validation: no SDHOST_TEST_PYTHON");
                return;
            }
            d
        }
    };
    let bad = [
        json!({"width": 64}),
        job(json!({"width": 13})),
        job(json!({"scheduler": "Bogus"})),
        job(json!({"num_images": 11})),
        job(json!({"loras": [{"id": "0".repeat(64)}]})),
        job(json!({"seed": "x"})),
    ];
    let good_too =
        job(json!({"loras": [{"id": lora, "weight": -1, "trigger_weight": 0.5}], "seed": null}));
    let input = json!({"schema": schema, "good": [good, good_too], "bad": bad});
    let script = r#"
import json, sys
import jsonschema
data = json.load(sys.stdin)
v = jsonschema.Draft202012Validator
v.check_schema(data["schema"])
val = v(data["schema"], format_checker=v.FORMAT_CHECKER)
for g in data["good"]:
    val.validate(g)
for i, b in enumerate(data["bad"]):
    if val.is_valid(b):
        sys.exit(f"bad body {i} passed: {b}")
print("SCHEMA OK")
"#;
    let out = tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut child = std::process::Command::new(python)
            .arg("-c")
            .arg(script)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(input.to_string().as_bytes())?;
        }
        child.wait_with_output()
    })
    .await
    .expect("joined")
    .expect("python runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("SCHEMA OK"),
        "jsonschema validation failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
