//! The AUTOMATIC1111-compatible API `/sdapi/v1` (issue 8): every route over HTTP against a real server
//! with tiny checkpoints, plus the real `webuiapi` client from PyPI.

mod common;

use std::time::Duration;

use base64::Engine as _;
use common::TestServer;
use serde_json::{json, Value};

const KEY: &str = "a1111-test-key-0123456789";

/// A data dir with tiny sd1 checkpoints `tiny1`, `tiny2` and a LoRA `tinylora` under `models/`.
fn data_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let models = dir.path().join("data/models");
    std::fs::create_dir_all(&models).expect("models dir");
    for s in [1u64, 2] {
        sd_engine::tiny::write_tiny_checkpoint(
            sd_engine::Family::Sd1,
            false,
            s,
            &models.join(format!("tiny{s}.safetensors")),
        )
        .expect("tiny checkpoint");
    }
    sd_engine::tiny::write_tiny_lora(
        &models.join("tiny1.safetensors"),
        sd_engine::lora::LoraKind::Lora,
        3,
        &models.join("tinylora.safetensors"),
    )
    .expect("tiny lora");
    dir
}

async fn server() -> TestServer {
    TestServer::start_in(data_dir(), |_| {}).await
}

async fn model(s: &TestServer, filename: &str) -> sd_host::db::ModelRecord {
    s.server
        .state
        .repo
        .list_models(&Default::default())
        .await
        .expect("models")
        .into_iter()
        .find(|m| m.filename == filename)
        .unwrap_or_else(|| panic!("{filename} registered"))
}

fn png(w: u32, h: u32, rgb: [u8; 3]) -> Vec<u8> {
    let img = image::RgbImage::from_pixel(w, h, image::Rgb(rgb));
    let mut out = Vec::new();
    image::DynamicImage::ImageRgb8(img)
        .write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        .expect("encode");
    out
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn decode_image(b: &Value) -> image::DynamicImage {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b.as_str().expect("base64 string"))
        .expect("valid base64");
    assert!(bytes.starts_with(b"\x89PNG"), "A1111 images are PNG");
    image::load_from_memory(&bytes).expect("decodes")
}

fn info(r: &Value) -> Value {
    serde_json::from_str(r["info"].as_str().expect("info is a JSON string")).expect("info parses")
}

fn t2i(extra: Value) -> Value {
    let mut b = json!({"prompt": "a red cat", "width": 64, "height": 64, "steps": 2, "seed": 42});
    if let (Some(o), Some(e)) = (b.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            o.insert(k.clone(), v.clone());
        }
    }
    b
}

#[tokio::test]
async fn listing_routes_have_a1111_shapes() {
    let s = server().await;
    let tiny1 = model(&s, "tiny1.safetensors").await;

    let (st, models) = s.get_json("/sdapi/v1/sd-models").await;
    assert_eq!(st, 200);
    let m = models
        .as_array()
        .expect("list")
        .iter()
        .find(|m| m["sha256"] == tiny1.sha256.as_str())
        .expect("tiny1 listed");
    assert_eq!(
        m["title"],
        format!("tiny1.safetensors [{}]", &tiny1.sha256[..10])
    );
    assert_eq!(m["model_name"], "tiny1");
    assert_eq!(m["hash"], &tiny1.sha256[..10]);
    assert_eq!(m["filename"], "tiny1.safetensors");
    assert_eq!(
        models.as_array().map(Vec::len),
        Some(2),
        "LoRAs are not checkpoints"
    );

    let (_, samplers) = s.get_json("/sdapi/v1/samplers").await;
    let names: Vec<&str> = samplers
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|x| x["name"].as_str())
        .collect();
    for want in ["Euler a", "Euler", "DPM++ 2M", "DDIM", "UniPC"] {
        assert!(names.contains(&want), "{want} in {names:?}");
    }
    let dpm = samplers
        .as_array()
        .and_then(|a| a.iter().find(|x| x["name"] == "DPM++ 2M"))
        .expect("DPM++ 2M");
    assert_eq!(dpm["options"]["scheduler"], "karras");
    assert!(dpm["aliases"].as_array().is_some());

    let (_, scheds) = s.get_json("/sdapi/v1/schedulers").await;
    let names: Vec<&str> = scheds
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|x| x["name"].as_str())
        .collect();
    assert!(names.contains(&"automatic") && names.contains(&"karras"));

    let (_, loras) = s.get_json("/sdapi/v1/loras").await;
    assert_eq!(loras[0]["name"], "tinylora", "{loras}");
    assert_eq!(loras.as_array().map(Vec::len), Some(1));

    let (st, emb) = s.get_json("/sdapi/v1/embeddings").await;
    assert_eq!(st, 200);
    assert!(emb["loaded"].is_object() && emb["skipped"].is_object());

    let (st, vae) = s.get_json("/sdapi/v1/sd-vae").await;
    assert_eq!((st, vae), (200, json!([])));

    let (_, mem) = s.get_json("/sdapi/v1/memory").await;
    assert!(mem["ram"]["total"].as_u64().unwrap_or(0) > 0, "{mem}");
    assert!(mem["cuda"].is_object());

    for path in [
        "upscalers",
        "latent-upscale-modes",
        "hypernetworks",
        "face-restorers",
        "realesrgan-models",
        "prompt-styles",
        "script-info",
        "extensions",
    ] {
        let (st, v) = s.get_json(&format!("/sdapi/v1/{path}")).await;
        assert_eq!((st, v), (200, json!([])), "{path}");
    }
    let (_, scripts) = s.get_json("/sdapi/v1/scripts").await;
    assert_eq!(scripts, json!({"txt2img": [], "img2img": []}));

    let (st, opts) = s.get_json("/sdapi/v1/options").await;
    assert_eq!(st, 200);
    assert!(
        opts["sd_model_checkpoint"].is_null(),
        "two checkpoints and none selected: {opts}"
    );
    assert_eq!(opts["samples_format"], "png");
    let (st, v) = s.post_json("/sdapi/v1/txt2img", &t2i(json!({}))).await;
    assert_eq!(st, 422, "no checkpoint selected among two: {v}");
    assert!(v.to_string().contains("/sdapi/v1/options"), "{v}");
}

#[tokio::test]
async fn unsupported_actions_answer_501_with_a_reason() {
    let s = server().await;
    for path in [
        "train/embedding",
        "train/hypernetwork",
        "create/embedding",
        "create/hypernetwork",
        "server-kill",
        "server-restart",
        "server-stop",
        "extra-single-image",
        "interrogate",
    ] {
        let (st, v) = s.post_json(&format!("/sdapi/v1/{path}"), &json!({})).await;
        assert_eq!(st, 501, "{path}");
        assert!(
            v["detail"]
                .as_str()
                .is_some_and(|d| d.contains("SD-Host") || d.contains("sd-host")),
            "{path}: {v}"
        );
    }
    // The server is still up after server-kill.
    assert_eq!(s.get("/health").await.status(), 200);
}

#[tokio::test]
async fn api_keys_apply_and_cmd_flags_reveal_no_secret() {
    let s = TestServer::start_in(data_dir(), |c| {
        c.api.keys = vec![sd_host::config::Secret(KEY.into())];
    })
    .await;
    assert_eq!(s.get("/sdapi/v1/sd-models").await.status(), 401);
    let r = s
        .client
        .get(s.url("/sdapi/v1/cmd-flags"))
        .header("X-API-Key", KEY)
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 200);
    let text = r.text().await.expect("body");
    assert!(!text.contains(KEY), "cmd-flags leaks the key: {text}");
    let flags: Value = serde_json::from_str(&text).expect("json");
    assert_eq!(flags["api"], true);
    let r = s
        .client
        .get(s.url("/sdapi/v1/samplers"))
        .bearer_auth(KEY)
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn root_answers_status_json_or_html() {
    let s = server().await;
    let r = s
        .client
        .get(s.url("/"))
        .header("Accept", "application/json")
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["name"], "sd-host");
    assert_eq!(v["busy"], false);
    assert_eq!(v["queue"]["pending"], 0);
    let r = s
        .client
        .get(s.url("/"))
        .header("Accept", "text/html")
        .send()
        .await
        .expect("request");
    assert!(r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|c| c.starts_with("text/html")));
}

#[tokio::test]
async fn options_select_load_unload_and_reload_checkpoints() {
    let s = server().await;
    let (tiny1, tiny2) = (
        model(&s, "tiny1.safetensors").await,
        model(&s, "tiny2.safetensors").await,
    );
    let engine = || s.server.state.engine.state().checkpoint.map(|c| c.sha256);

    let (st, v) = s
        .post_json(
            "/sdapi/v1/options",
            &json!({"sd_model_checkpoint": "nope.safetensors [0123456789]"}),
        )
        .await;
    assert_eq!(st, 422, "{v}");
    assert_eq!(engine(), None, "nothing loaded by a failed switch");

    // By title (what webuiapi sends), by name, by short hash.
    let title2 = format!("tiny2.safetensors [{}]", tiny2.short_hash);
    let (st, _) = s
        .post_json("/sdapi/v1/options", &json!({"sd_model_checkpoint": title2}))
        .await;
    assert_eq!(st, 200);
    assert_eq!(engine(), Some(tiny2.sha256.clone()));
    let (_, o) = s.get_json("/sdapi/v1/options").await;
    assert_eq!(o["sd_model_checkpoint"], title2);
    assert_eq!(o["sd_checkpoint_hash"], tiny2.sha256.as_str());

    let (st, _) = s
        .post_json("/sdapi/v1/options", &json!({"sd_model_checkpoint": "tiny1", "CLIP_stop_at_last_layers": 2, "my_ui_setting": "x"}))
        .await;
    assert_eq!(st, 200);
    assert_eq!(engine(), Some(tiny1.sha256.clone()));
    let (_, o) = s.get_json("/sdapi/v1/options").await;
    assert_eq!(o["CLIP_stop_at_last_layers"], 2);
    assert_eq!(o["my_ui_setting"], "x");
    let (st, _) = s
        .post_json(
            "/sdapi/v1/options",
            &json!({"sd_model_checkpoint": tiny2.short_hash}),
        )
        .await;
    assert_eq!(st, 200);
    assert_eq!(engine(), Some(tiny2.sha256.clone()));

    let (st, v) = s
        .post_json(
            "/sdapi/v1/options",
            &json!({"CLIP_stop_at_last_layers": 99}),
        )
        .await;
    assert_eq!(st, 422, "{v}");

    let (st, _) = s.post_json("/sdapi/v1/unload-checkpoint", &json!({})).await;
    assert_eq!(st, 200);
    assert_eq!(engine(), None);
    let (st, _) = s.post_json("/sdapi/v1/reload-checkpoint", &json!({})).await;
    assert_eq!(st, 200);
    assert_eq!(engine(), Some(tiny2.sha256.clone()));

    // A file dropped into the models folder appears after refresh-checkpoints.
    sd_engine::tiny::write_tiny_checkpoint(
        sd_engine::Family::Sd1,
        false,
        9,
        &s.dir.path().join("data/models/tiny9.safetensors"),
    )
    .expect("tiny checkpoint");
    let (st, _) = s
        .post_json("/sdapi/v1/refresh-checkpoints", &json!({}))
        .await;
    assert_eq!(st, 200);
    let (_, models) = s.get_json("/sdapi/v1/sd-models").await;
    assert!(
        models
            .as_array()
            .is_some_and(|a| a.iter().any(|m| m["model_name"] == "tiny9")),
        "{models}"
    );

    // Likewise LoRAs and embeddings after their refresh routes; refresh-vae answers like A1111.
    let models_dir = s.dir.path().join("data/models");
    sd_engine::tiny::write_tiny_lora(
        &models_dir.join("tiny1.safetensors"),
        sd_engine::lora::LoraKind::Loha,
        4,
        &models_dir.join("newloha.safetensors"),
    )
    .expect("tiny loha");
    write_embedding(&models_dir.join("new_style.safetensors"));
    let (_, loras) = s.get_json("/sdapi/v1/loras").await;
    assert!(!loras.to_string().contains("newloha"), "not before refresh");
    let (st, _) = s.post_json("/sdapi/v1/refresh-loras", &json!({})).await;
    assert_eq!(st, 200);
    let (_, loras) = s.get_json("/sdapi/v1/loras").await;
    assert!(
        loras
            .as_array()
            .is_some_and(|a| a.iter().any(|l| l["name"] == "newloha")),
        "{loras}"
    );
    let (st, _) = s
        .post_json("/sdapi/v1/refresh-embeddings", &json!({}))
        .await;
    assert_eq!(st, 200);
    let (_, emb) = s.get_json("/sdapi/v1/embeddings").await;
    assert!(emb["loaded"]["new_style"].is_object(), "{emb}");
    let (st, _) = s.post_json("/sdapi/v1/refresh-vae", &json!({})).await;
    assert_eq!(st, 200);
    let (st, vae) = s.get_json("/sdapi/v1/sd-vae").await;
    assert_eq!(st, 200);
    assert!(vae.is_array(), "{vae}");
}

#[tokio::test]
async fn txt2img_returns_pngs_info_and_runs_as_a_queued_task() {
    let s = server().await;
    let tiny2 = model(&s, "tiny2.safetensors").await;
    let title2 = format!("tiny2.safetensors [{}]", tiny2.short_hash);
    let body = t2i(json!({
        "batch_size": 2, "n_iter": 1, "sampler_name": "DPM++ 2M Karras", "cfg_scale": 5,
        "negative_prompt": "blurry", "subseed": -1, "subseed_strength": 0, "restore_faces": false,
        "tiling": false, "override_settings": {"sd_model_checkpoint": title2},
        "override_settings_restore_afterwards": true, "save_images": false, "styles": [],
        "enable_hr": false, "hr_upscaler": "Latent", "script_name": null, "alwayson_scripts": {},
    }));
    let (st, r) = s.post_json("/sdapi/v1/txt2img", &body).await;
    assert_eq!(st, 200, "{r}");
    let images = r["images"].as_array().expect("images");
    assert_eq!(images.len(), 2);
    for i in images {
        let img = decode_image(i);
        assert_eq!((img.width(), img.height()), (64, 64));
    }
    let inf = info(&r);
    assert_eq!(inf["seed"], 42);
    assert_eq!(inf["all_seeds"], json!([42, 43]));
    assert_eq!(inf["prompt"], "a red cat");
    assert_eq!(inf["all_prompts"], json!(["a red cat", "a red cat"]));
    assert_eq!(inf["negative_prompt"], "blurry");
    assert_eq!(inf["sampler_name"], "DPM++ 2M");
    assert_eq!(inf["steps"], 2);
    assert_eq!(inf["cfg_scale"], 5.0);
    assert_eq!(
        (inf["width"].clone(), inf["height"].clone()),
        (json!(64), json!(64))
    );
    assert_eq!(inf["sd_model_name"], "tiny2");
    assert_eq!(inf["sd_model_hash"], tiny2.short_hash.as_str());
    assert_eq!(inf["batch_size"], 2);
    assert!(inf["subseed"].as_u64().is_some());
    assert!(inf["job_timestamp"].as_str().is_some_and(|t| t.len() == 14));
    let texts = inf["infotexts"].as_array().expect("infotexts");
    assert_eq!(texts.len(), 2);
    assert!(
        texts[0].as_str().is_some_and(|t| t.contains("Seed: 42")),
        "{texts:?}"
    );
    assert!(texts[1].as_str().is_some_and(|t| t.contains("Seed: 43")));
    assert!(texts[0]
        .as_str()
        .is_some_and(|t| t.contains("Schedule type: Karras")));
    assert_eq!(r["parameters"]["prompt"], "a red cat");
    assert_eq!(r["parameters"]["batch_size"], 2);

    // It went through the native queue.
    let (_, tasks) = s.get_json("/api/v1/tasks").await;
    assert_eq!(tasks["total"], 1);
    assert_eq!(tasks["tasks"][0]["status"], "completed");
    assert_eq!(tasks["tasks"][0]["params"]["model"], tiny2.sha256.as_str());
    assert_eq!(tasks["tasks"][0]["params"]["schedule_type"], "karras");

    // Same seed, same image; send_images=false returns none.
    let (_, again) = s
        .post_json("/sdapi/v1/txt2img", &t2i(json!({"batch_size": 2, "sampler_name": "DPM++ 2M Karras", "cfg_scale": 5, "negative_prompt": "blurry", "override_settings": {"sd_model_checkpoint": title2}})))
        .await;
    assert_eq!(again["images"][0], r["images"][0]);
    let (st, none) = s
        .post_json("/sdapi/v1/txt2img", &t2i(json!({"send_images": false})))
        .await;
    assert_eq!(st, 200);
    assert_eq!(none["images"], json!([]));
    assert_eq!(info(&none)["all_seeds"], json!([42]));
}

#[tokio::test]
async fn txt2img_defaults_lora_tags_and_bad_input() {
    let s = server().await;
    let tiny1 = model(&s, "tiny1.safetensors").await;
    s.post_json(
        "/sdapi/v1/options",
        &json!({"sd_model_checkpoint": "tiny1"}),
    )
    .await;

    // Nulls everywhere (as some clients send) take A1111's defaults: Euler, random seed.
    let (st, r) = s
        .post_json(
            "/sdapi/v1/txt2img",
            &json!({"prompt": "x <lora:tinylora:0.5>", "width": 64, "height": 64, "steps": 2,
                    "seed": null, "sampler_name": null, "sampler_index": null, "scheduler": null,
                    "batch_size": null, "n_iter": 2, "cfg_scale": null}),
        )
        .await;
    assert_eq!(st, 200, "{r}");
    let inf = info(&r);
    assert_eq!(inf["sampler_name"], "Euler");
    assert_eq!(inf["cfg_scale"], 7.0);
    assert_eq!(inf["sd_model_hash"], tiny1.short_hash.as_str());
    assert_eq!(
        r["images"].as_array().map(Vec::len),
        Some(2),
        "batch_size × n_iter"
    );
    let seed = inf["seed"].as_u64().expect("random seed resolved");
    assert_eq!(inf["all_seeds"], json!([seed, seed + 1]));
    let (_, tasks) = s.get_json("/api/v1/tasks").await;
    assert_eq!(tasks["tasks"][0]["params"]["loras"][0]["name"], "tinylora");
    assert_eq!(tasks["tasks"][0]["params"]["loras"][0]["weight"], 0.5);
    // sampler_index is the fallback for sampler_name; odd sizes round down like A1111.
    let (st, r) = s
        .post_json(
            "/sdapi/v1/txt2img",
            &t2i(json!({"sampler_index": "Euler a", "width": 70})),
        )
        .await;
    assert_eq!(st, 200, "{r}");
    assert_eq!(info(&r)["sampler_name"], "Euler a");
    assert_eq!(decode_image(&r["images"][0]).width(), 64);

    for (extra, field) in [
        (json!({"sampler_name": "Bogus"}), "sampler_name"),
        (json!({"scheduler": "zigzag"}), "scheduler"),
        (json!({"batch_size": 5, "n_iter": 3}), "batch_size"),
        (json!({"enable_hr": true}), "enable_hr"),
        (json!({"script_name": "X/Y/Z plot"}), "script_name"),
        (
            json!({"alwayson_scripts": {"ControlNet": {"args": []}}}),
            "alwayson_scripts",
        ),
        (
            json!({"override_settings": {"sd_model_checkpoint": "missing"}}),
            "override_settings.sd_model_checkpoint",
        ),
        (json!({"steps": 0}), "num_inference_steps"),
        (json!({"prompt": "<lora:nosuchlora:1>"}), "prompt"),
    ] {
        let (st, v) = s.post_json("/sdapi/v1/txt2img", &t2i(extra.clone())).await;
        assert_eq!(st, 422, "{extra}: {v}");
        assert!(v.to_string().contains(field), "{extra}: {v}");
    }
    let (st, v) = s
        .post_json("/sdapi/v1/txt2img", &t2i(json!({"sampler_name": "Bogus"})))
        .await;
    assert_eq!(st, 422);
    assert!(
        v.to_string().contains("Euler a"),
        "lists valid samplers: {v}"
    );
    let (st, _) = s
        .post_json("/sdapi/v1/txt2img", &t2i(json!({"steps": "many"})))
        .await;
    assert_eq!(st, 422);
    let (_, tasks) = s.get_json("/api/v1/tasks").await;
    assert_eq!(tasks["total"], 2, "rejected requests queue nothing");
}

#[tokio::test]
async fn img2img_and_inpainting() {
    let s = server().await;
    s.post_json(
        "/sdapi/v1/options",
        &json!({"sd_model_checkpoint": "tiny1"}),
    )
    .await;
    let src = format!("data:image/png;base64,{}", b64(&png(96, 64, [200, 30, 30])));
    let (st, r) = s
        .post_json(
            "/sdapi/v1/img2img",
            &t2i(
                json!({"init_images": [src], "denoising_strength": 0.5, "resize_mode": 1,
                        "sampler_name": "Euler a", "include_init_images": false}),
            ),
        )
        .await;
    assert_eq!(st, 200, "{r}");
    let img = decode_image(&r["images"][0]);
    assert_eq!((img.width(), img.height()), (64, 64));
    let inf = info(&r);
    assert_eq!(inf["denoising_strength"], 0.5);
    assert!(
        r["parameters"]["init_images"].is_null(),
        "sources are not echoed"
    );

    // Inpainting with a bare-base64 source and mask, inverted and blurred.
    let mut mask = image::GrayImage::new(64, 64);
    for (x, _, p) in mask.enumerate_pixels_mut() {
        p.0 = [if x < 32 { 255 } else { 0 }];
    }
    let mut mask_png = Vec::new();
    image::DynamicImage::ImageLuma8(mask)
        .write_to(
            &mut std::io::Cursor::new(&mut mask_png),
            image::ImageFormat::Png,
        )
        .expect("encode");
    let (st, r) = s
        .post_json(
            "/sdapi/v1/img2img",
            &t2i(
                json!({"init_images": [b64(&png(64, 64, [10, 200, 10]))], "mask": b64(&mask_png),
                        "inpainting_mask_invert": 1, "mask_blur": 2, "inpainting_fill": 1,
                        "inpaint_full_res": false, "denoising_strength": 0.9}),
            ),
        )
        .await;
    assert_eq!(st, 200, "{r}");
    assert_eq!(info(&r)["is_using_inpainting_conditioning"], true);
    assert_eq!(r["images"].as_array().map(Vec::len), Some(1));

    for (body, field) in [
        (t2i(json!({"init_images": []})), "init_images"),
        (t2i(json!({"init_images": ["!!!not base64"]})), "init_image"),
        (t2i(json!({"init_images": [b64(b"hello")]})), "init_image"),
        (
            t2i(json!({"init_images": [b64(&png(64, 64, [0, 0, 0]))], "denoising_strength": 2})),
            "denoising_strength",
        ),
        // Refused before any resize to the requested size (no multi-GB allocation).
        (
            t2i(
                json!({"init_images": [b64(&png(64, 64, [0, 0, 0]))], "resize_mode": 1,
                       "width": 60000, "height": 60000, "mask": b64(&png(64, 64, [255, 255, 255]))}),
            ),
            "width",
        ),
    ] {
        let (st, v) = s.post_json("/sdapi/v1/img2img", &body).await;
        assert_eq!(st, 422, "{v}");
        assert!(v.to_string().contains(field), "{field}: {v}");
    }
}

/// Polls `progress` until a task is sampling; returns that response.
async fn wait_sampling(s: &TestServer) -> Value {
    for _ in 0..2000 {
        let (_, p) = s.get_json("/sdapi/v1/progress").await;
        if p["state"]["sampling_step"].as_u64().unwrap_or(0) > 0 {
            return p;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no task started sampling");
}

fn long_job() -> Value {
    t2i(json!({"steps": 150, "width": 128, "height": 128, "batch_size": 10}))
}

#[tokio::test]
async fn progress_and_interrupt() {
    let s = server().await;
    s.post_json(
        "/sdapi/v1/options",
        &json!({"sd_model_checkpoint": "tiny1"}),
    )
    .await;
    let (_, idle) = s.get_json("/sdapi/v1/progress").await;
    assert_eq!(idle["progress"], 0.0);
    assert_eq!(idle["state"]["job_count"], 0);

    let (client, url) = (s.client.clone(), s.url("/sdapi/v1/txt2img"));
    let call = tokio::spawn(async move {
        let r = client
            .post(url)
            .json(&long_job())
            .send()
            .await
            .expect("request");
        (r.status().as_u16(), r.json::<Value>().await.expect("json"))
    });
    let p = wait_sampling(&s).await;
    let frac = p["progress"].as_f64().expect("progress");
    assert!(frac > 0.0 && frac < 1.0, "{p}");
    assert!(p["eta_relative"].as_f64().is_some_and(|e| e >= 0.0));
    assert_eq!(p["state"]["job_count"], 1);
    assert_eq!(p["state"]["sampling_steps"], 150);
    assert!(p["state"]["job"]
        .as_str()
        .is_some_and(|j| j.starts_with("task(")));
    assert!(p["textinfo"].is_string());
    // Previews arrive as base64 images (every step by default).
    let mut preview = None;
    for _ in 0..500 {
        let (_, p) = s.get_json("/sdapi/v1/progress").await;
        if let Some(c) = p["current_image"].as_str() {
            preview = Some(c.to_string());
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let preview = preview.expect("a preview");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(preview)
        .expect("base64");
    image::load_from_memory(&bytes).expect("preview decodes");
    let (_, p) = s
        .get_json("/sdapi/v1/progress?skip_current_image=true")
        .await;
    assert!(p["current_image"].is_null());

    let (st, v) = s.post_json("/sdapi/v1/interrupt", &json!({})).await;
    assert_eq!((st, v), (200, json!({})));
    let (st, r) = call.await.expect("joined");
    assert_eq!(st, 200, "{r}");
    // As in A1111: the image in progress comes back as it stood, and no other was started.
    let images = r["images"].as_array().expect("images");
    assert_eq!(images.len(), 1, "the first of 10 images, cut short");
    assert_eq!(decode_image(&images[0]).width(), 128);
    assert_eq!(info(&r)["interrupted"], true);
    let (_, tasks) = s.get_json("/api/v1/tasks").await;
    assert_eq!(tasks["tasks"][0]["status"], "completed");
    assert_eq!(
        tasks["tasks"][0]["images"].as_array().map(Vec::len),
        Some(1)
    );
    let (_, p) = s.get_json("/sdapi/v1/progress").await;
    assert_eq!(p["state"]["job_count"], 0);

    // skip cuts only the image in progress short; the batch goes on and the call returns both.
    let job = t2i(json!({"steps": 150, "width": 64, "height": 64, "batch_size": 2, "seed": 11}));
    let (client, url, body) = (s.client.clone(), s.url("/sdapi/v1/txt2img"), job.clone());
    let call = tokio::spawn(async move {
        let r = client.post(url).json(&body).send().await.expect("request");
        (r.status().as_u16(), r.json::<Value>().await.expect("json"))
    });
    let p = wait_sampling(&s).await;
    assert_eq!(p["state"]["job_no"], 0, "{p}");
    let (st, v) = s.post_json("/sdapi/v1/skip", &json!({})).await;
    assert_eq!((st, v), (200, json!({})));
    let (st, skipped) = call.await.expect("joined");
    assert_eq!(st, 200, "{skipped}");
    assert_eq!(info(&skipped)["interrupted"], false, "{skipped}");
    let (_, tasks) = s.get_json("/api/v1/tasks").await;
    assert_eq!(tasks["tasks"][0]["status"], "completed");
    let (st, full) = s.post_json("/sdapi/v1/txt2img", &job).await;
    assert_eq!(st, 200, "{full}");
    let (a, b) = (&skipped["images"], &full["images"]);
    assert_eq!(a.as_array().map(Vec::len), Some(2), "both images returned");
    assert_ne!(a[0], b[0], "the first image stopped early");
    assert_eq!(a[1], b[1], "the second image ran in full, unchanged");
}

#[tokio::test]
async fn a_client_that_disconnects_cancels_its_task() {
    let s = server().await;
    s.post_json(
        "/sdapi/v1/options",
        &json!({"sd_model_checkpoint": "tiny1"}),
    )
    .await;
    let (client, url) = (s.client.clone(), s.url("/sdapi/v1/txt2img"));
    let call = tokio::spawn(async move { client.post(url).json(&long_job()).send().await });
    wait_sampling(&s).await;
    call.abort();
    let _ = call.await;
    let mut status = String::new();
    for _ in 0..2000 {
        let (_, tasks) = s.get_json("/api/v1/tasks").await;
        status = tasks["tasks"][0]["status"]
            .as_str()
            .unwrap_or("")
            .to_string();
        if status != "processing" && status != "pending" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(status, "cancelled");
}

#[tokio::test]
async fn png_info_reads_our_and_a1111_pngs() {
    let s = server().await;
    s.post_json(
        "/sdapi/v1/options",
        &json!({"sd_model_checkpoint": "tiny1"}),
    )
    .await;
    let (_, r) = s
        .post_json("/sdapi/v1/txt2img", &t2i(json!({"seed": 5})))
        .await;
    let ours = r["images"][0].as_str().expect("image").to_string();
    let (st, v) = s
        .post_json(
            "/sdapi/v1/png-info",
            &json!({"image": format!("data:image/png;base64,{ours}")}),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    assert!(
        v["info"]
            .as_str()
            .is_some_and(|i| i.starts_with("a red cat")),
        "{v}"
    );
    assert_eq!(v["parameters"]["Seed"], "5");
    assert_eq!(v["parameters"]["prompt"], "a red cat");
    assert_eq!(v["parameters"]["Size-1"], "64");
    assert!(v["items"].is_object());

    // A PNG written the way A1111 writes it (a `parameters` tEXt chunk).
    let text = "masterpiece, 1girl\nNegative prompt: lowres\nSteps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 123456, Size: 512x768, Model hash: 0123456789, Model: anything, Version: v1.10.1";
    let mut bytes = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut bytes, 8, 8);
        enc.set_color(png::ColorType::Rgb);
        enc.add_text_chunk("parameters".into(), text.into())
            .expect("chunk");
        let mut w = enc.write_header().expect("header");
        w.write_image_data(&[0u8; 8 * 8 * 3]).expect("data");
    }
    let (st, v) = s
        .post_json("/sdapi/v1/png-info", &json!({"image": b64(&bytes)}))
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["info"], text);
    assert_eq!(v["parameters"]["negative_prompt"], "lowres");
    assert_eq!(v["parameters"]["CFG scale"], "6.5");
    assert_eq!(v["parameters"]["Size-2"], "768");
    assert_eq!(v["parameters"]["Model hash"], "0123456789");

    // No metadata: empty, not an error; garbage: 422.
    let (st, v) = s
        .post_json(
            "/sdapi/v1/png-info",
            &json!({"image": b64(&png(8, 8, [1, 2, 3]))}),
        )
        .await;
    assert_eq!((st, v["info"].clone()), (200, json!("")));
    let (st, _) = s
        .post_json("/sdapi/v1/png-info", &json!({"image": "%%%"}))
        .await;
    assert_eq!(st, 422);
}

/// The Python interpreter of the test venv (scripts/test.sh sets SDHOST_TEST_PYTHON).
fn test_python() -> Option<std::path::PathBuf> {
    if let Ok(p) = std::env::var("SDHOST_TEST_PYTHON") {
        return Some(p.into());
    }
    let default = std::path::PathBuf::from("/var/tmp/sd-host-test-venv/bin/python");
    default.exists().then_some(default)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webuiapi_client_works_against_the_server() {
    let Some(python) = test_python() else {
        eprintln!("SKIPPED: no SDHOST_TEST_PYTHON (run scripts/test.sh to build the test venv)");
        return;
    };
    // Behind an API key, which the client sends as A1111's `--api-auth` HTTP Basic password.
    const KEY: &str = "webui-client-key";
    let s = TestServer::start_in(data_dir(), |c| {
        c.api.keys = vec![sd_host::config::Secret(KEY.into())]
    })
    .await;
    let base = s.url("/sdapi/v1");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/a1111_client.py");
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(&python)
            .arg(script)
            .arg(&base)
            .arg(KEY)
            .output()
    })
    .await
    .expect("joined")
    .expect("python runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "a1111_client.py failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(stdout.contains("ALL OK"), "{stdout}");
}

/// An A1111-layout textual-inversion file (`emb_params`, two vectors of the tiny SD1 CLIP width).
fn write_embedding(path: &std::path::Path) {
    let (n, width) = (2usize, 64usize);
    let header = format!(
        r#"{{"emb_params":{{"dtype":"F32","shape":[{n},{width}],"data_offsets":[0,{}]}}}}"#,
        n * width * 4
    );
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    for i in 0..n * width {
        out.extend_from_slice(&((i as f32 * 0.37).sin() * 3.0).to_le_bytes());
    }
    std::fs::write(path, out).expect("embedding");
}

/// An embedding in the library is used when its file name appears in the prompt, as in A1111;
/// deleting it from the library changes the same request's image back.
#[tokio::test]
async fn library_embeddings_work_by_name_in_prompts() {
    let dir = data_dir();
    write_embedding(&dir.path().join("data/models/shiny_style.safetensors"));
    let s = TestServer::start_in(dir, |_| {}).await;
    let emb = model(&s, "shiny_style.safetensors").await;
    assert_eq!(emb.model_type, "embedding");
    s.post_json(
        "/sdapi/v1/options",
        &json!({"sd_model_checkpoint": "tiny1"}),
    )
    .await;
    let (_, listed) = s.get_json("/sdapi/v1/embeddings").await;
    assert!(listed["loaded"]["shiny_style"].is_object(), "{listed}");
    let req = t2i(json!({"prompt": "a red cat, shiny_style"}));
    let (st, with) = s.post_json("/sdapi/v1/txt2img", &req).await;
    assert_eq!(st, 200, "{with}");
    let (st, again) = s.post_json("/sdapi/v1/txt2img", &req).await;
    assert_eq!(st, 200);
    assert_eq!(
        with["images"], again["images"],
        "deterministic with the embedding"
    );
    let del = s
        .client
        .delete(s.url(&format!("/api/v1/models/{}", emb.sha256)))
        .send()
        .await
        .expect("delete");
    assert_eq!(del.status(), 200);
    let (st, without) = s.post_json("/sdapi/v1/txt2img", &req).await;
    assert_eq!(st, 200);
    assert!(
        with["images"] != without["images"],
        "the embedding's vectors, not the plain words, conditioned the first images"
    );
}

/// A VAE file in the library decodes instead of the checkpoint's own when `sd_vae` names it (per
/// request or as the stored option) or a native task gives its sha256; "Automatic" goes back to
/// the checkpoint's own VAE exactly. The infotext records it as A1111 does.
#[tokio::test]
async fn sd_vae_selects_a_library_vae_and_automatic_restores_the_own_one() {
    let dir = data_dir();
    sd_engine::tiny::write_tiny_vae(
        sd_engine::Family::Sd1,
        21,
        &dir.path().join("data/models/tiny_vae.safetensors"),
    )
    .expect("vae");
    let s = TestServer::start_in(dir, |_| {}).await;
    let vae = model(&s, "tiny_vae.safetensors").await;
    assert_eq!(vae.model_type, "vae");
    let (_, list) = s.get_json("/sdapi/v1/sd-vae").await;
    assert_eq!(list[0]["filename"], "tiny_vae.safetensors", "{list}");
    s.post_json(
        "/sdapi/v1/options",
        &json!({"sd_model_checkpoint": "tiny1"}),
    )
    .await;
    let txt2img = |extra: Value| async {
        let (st, r) = s.post_json("/sdapi/v1/txt2img", &t2i(extra)).await;
        assert_eq!(st, 200, "{r}");
        r
    };
    let own = txt2img(json!({})).await;
    let with = txt2img(json!({"override_settings": {"sd_vae": "tiny_vae.safetensors"}})).await;
    assert!(
        with["images"][0] != own["images"][0],
        "the library VAE decoded"
    );
    let i = info(&with);
    assert_eq!(i["sd_vae_name"], "tiny_vae.safetensors");
    assert_eq!(i["sd_vae_hash"], &vae.sha256[..10]);
    let infotext = i["infotexts"][0].as_str().expect("infotext");
    assert!(
        infotext.contains(&format!(
            "VAE hash: {}, VAE: tiny_vae.safetensors",
            &vae.sha256[..10]
        )),
        "{infotext}"
    );
    let back = txt2img(json!({"override_settings": {"sd_vae": "Automatic"}})).await;
    assert_eq!(back["images"], own["images"], "own VAE again, bit for bit");
    assert!(info(&back)["sd_vae_name"].is_null());

    // As a stored option, and through the native API by sha256.
    s.post_json("/sdapi/v1/options", &json!({"sd_vae": "tiny_vae"}))
        .await;
    let (_, o) = s.get_json("/sdapi/v1/options").await;
    assert_eq!(o["sd_vae"], "tiny_vae");
    let opt = txt2img(json!({})).await;
    assert_eq!(opt["images"], with["images"]);
    s.post_json("/sdapi/v1/options", &json!({"sd_vae": "Automatic"}))
        .await;
    let (st, r) = s
        .post_json(
            "/api/v1/tasks",
            &json!({"prompt": "a red cat", "width": 64, "height": 64, "num_inference_steps": 2,
                    "vae": vae.sha256}),
        )
        .await;
    assert_eq!(st, 202, "{r}");
    let ckpt = model(&s, "tiny1.safetensors").await;
    let (st, r) = s
        .post_json(
            "/api/v1/tasks",
            &json!({"prompt": "x", "width": 64, "height": 64, "vae": ckpt.sha256}),
        )
        .await;
    assert_eq!(st, 422, "a checkpoint is not a VAE: {r}");
    let (st, r) = s
        .post_json(
            "/sdapi/v1/txt2img",
            &t2i(json!({"override_settings": {"sd_vae": "missing.safetensors"}})),
        )
        .await;
    assert_eq!(st, 422, "{r}");
}
