//! Images end to end (issue 7): content-addressed store, A1111 metadata, HTTP API, share links, gallery.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::TestServer;
use futures::StreamExt;
use sd_host::db::images::{ImageQuery, ImageRecord};
use sd_host::images::store::{store_generated, GeneratedImage};
use serde_json::{json, Map, Value};

const MODEL: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

/// A small deterministic RGB picture; `seed` changes the pixels (so the bytes and hash).
fn rgb(w: u32, h: u32, seed: u8) -> sd_engine::RgbImage {
    let mut data = Vec::with_capacity((w * h * 3) as usize);
    for y in 0..h {
        for x in 0..w {
            data.extend_from_slice(&[(x * 4) as u8 ^ seed, (y * 4) as u8, seed.wrapping_mul(37)]);
        }
    }
    sd_engine::RgbImage {
        width: w,
        height: h,
        data,
    }
}

fn params(seed: i64, strength: Option<f64>) -> Value {
    json!({
        "prompt": "a cat, on a mat",
        "negative_prompt": "blurry",
        "model": MODEL,
        "model_name": "tiny-sd1",
        "family": "sd1",
        "width": 64, "height": 48,
        "num_images": 1,
        "num_inference_steps": 20,
        "guidance_scale": 7.0,
        "strength": strength,
        "scheduler": "DPM++ 2M",
        "schedule_type": "karras",
        "seed": seed,
        "output_format": "png",
        "loras": [],
        "clip_skip": 1,
        "metadata": {}
    })
}

fn image(format: &str, seed: u8, attrs: Value) -> GeneratedImage {
    GeneratedImage {
        rgb: rgb(64, 48, seed),
        format: format.into(),
        task_id: None,
        model: Some(MODEL.into()),
        prompt: "a cat, on a mat".into(),
        negative_prompt: "blurry".into(),
        seed: 1234 + seed as i64,
        steps: 20,
        guidance_scale: 7.0,
        scheduler: "DPM++ 2M".into(),
        params: params(1234 + seed as i64, None),
        attributes: attrs.as_object().cloned().unwrap_or_default(),
    }
}

async fn store(s: &TestServer, img: GeneratedImage) -> ImageRecord {
    store_generated(&s.server.state, img)
        .await
        .expect("image stored")
}

fn blob_path(s: &TestServer, hash: &str) -> PathBuf {
    s.server
        .state
        .config
        .images_dir()
        .join(&hash[..2])
        .join(hash)
}

fn expected_infotext(seed: i64, denoise: Option<&str>) -> String {
    format!(
        "a cat, on a mat\nNegative prompt: blurry\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Karras, \
         CFG scale: 7, Seed: {seed}, Size: 64x48, Model hash: 0123456789, Model: tiny-sd1, {}RNG: CPU, \
         Version: sd-host v{}",
        denoise
            .map(|d| format!("Denoising strength: {d}, "))
            .unwrap_or_default(),
        env!("CARGO_PKG_VERSION")
    )
}

#[tokio::test]
async fn each_format_round_trips_with_metadata() {
    let s = TestServer::start().await;
    for (i, (format, ctype)) in [
        ("png", "image/png"),
        ("jpg", "image/jpeg"),
        ("jpeg", "image/jpeg"),
        ("webp", "image/webp"),
    ]
    .into_iter()
    .enumerate()
    {
        let rec = store(&s, image(format, i as u8 + 1, json!({}))).await;
        let r = s.get(&format!("/api/v1/images/{}", rec.hash)).await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["content-type"], ctype);
        let bytes = r.bytes().await.expect("body");
        assert_eq!(sd_host::storage::sha256_hex(&bytes), rec.hash);
        let decoded = image::load_from_memory(&bytes).expect("decodes");
        assert_eq!((decoded.width(), decoded.height()), (64, 48));
        if format != "jpg" && format != "jpeg" {
            // Lossless formats give the pixels back exactly.
            assert_eq!(decoded.to_rgb8().into_raw(), rgb(64, 48, i as u8 + 1).data);
        }
        let info = sd_host::images::read_png_parameters(&bytes).expect("infotext in the file");
        assert_eq!(
            info,
            expected_infotext(1234 + i as i64 + 1, None),
            "{format}"
        );
        if format == "png" {
            let full =
                sd_host::images::metadata::read_sdhost_params(&bytes).expect("sd-host chunk");
            assert_eq!(full["seed"], 1235);
            assert_eq!(full["model_name"], "tiny-sd1");
        }
        let (st, meta) = s
            .get_json(&format!("/api/v1/images/{}/metadata", rec.hash))
            .await;
        assert_eq!(st, 200);
        assert_eq!(
            meta["format"],
            sd_host::images::store::normalise_format(format)
        );
        assert_eq!(meta["width"], 64);
        assert_eq!(meta["bytes"], bytes.len());
        assert_eq!(meta["seed"], 1234 + i as i64 + 1);
        assert_eq!(meta["model"], MODEL);
        assert_eq!(meta["prompt"], "a cat, on a mat");
        assert_eq!(meta["negative_prompt"], "blurry");
        assert_eq!(meta["steps"], 20);
        assert_eq!(meta["guidance_scale"], 7.0);
        assert_eq!(meta["scheduler"], "DPM++ 2M");
    }
}

#[tokio::test]
async fn infotext_is_exact_for_txt2img_and_img2img_and_parses_back() {
    let s = TestServer::start().await;
    let txt = store(&s, image("png", 1, json!({}))).await;
    let mut i2i = image("png", 2, json!({}));
    i2i.params = params(99, Some(0.75));
    i2i.params["negative_prompt"] = json!("");
    i2i.params["loras"] = json!([{"sha256": "ab".repeat(32), "name": "detail", "weight": 0.8}]);
    let i2i = store(&s, i2i).await;

    let bytes = s.server.state.blobs.get(&txt.hash).await.expect("blob");
    let info = sd_host::images::read_png_parameters(&bytes).expect("parameters");
    assert_eq!(info, expected_infotext(1235, None));

    let bytes = s.server.state.blobs.get(&i2i.hash).await.expect("blob");
    let info = sd_host::images::read_png_parameters(&bytes).expect("parameters");
    assert_eq!(
        info,
        format!(
            "a cat, on a mat\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 99, \
             Size: 64x48, Model hash: 0123456789, Model: tiny-sd1, Denoising strength: 0.75, RNG: CPU, \
             Lora hashes: \"detail: abababababab\", Version: sd-host v{}",
            env!("CARGO_PKG_VERSION")
        )
    );
    let parsed = sd_host::images::parse_infotext(&info);
    assert_eq!(parsed["prompt"], "a cat, on a mat");
    assert_eq!(parsed["negative_prompt"], "");
    assert_eq!(parsed["Seed"], "99");
    assert_eq!(parsed["Denoising strength"], "0.75");
    assert_eq!(parsed["Lora hashes"], "detail: abababababab");
}

/// The Python that has `sd_parsers` (scripts/test.sh provides it; see the issue for local set-up).
fn test_python() -> PathBuf {
    let p = std::env::var_os("SDHOST_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp/sd-host-test-venv/bin/python"));
    assert!(
        p.exists(),
        "no Python with sd-parsers at {}: run scripts/test.sh, or create it with \
         `python3 -m venv /var/tmp/sd-host-test-venv && /var/tmp/sd-host-test-venv/bin/pip install -r tools/test-requirements.txt` \
         (or set SDHOST_TEST_PYTHON)",
        p.display()
    );
    p
}

#[tokio::test]
async fn sd_parsers_reads_our_files_as_automatic1111_images() {
    let python = test_python();
    let s = TestServer::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut files = vec![];
    for (i, format) in ["png", "jpeg", "webp"].into_iter().enumerate() {
        let mut img = image(format, 10 + i as u8, json!({}));
        if i == 1 {
            img.params = params(4242, Some(0.5));
        }
        let rec = store(&s, img).await;
        let bytes = s.server.state.blobs.get(&rec.hash).await.expect("blob");
        let path = dir.path().join(format!("{}.{format}", rec.hash));
        std::fs::write(&path, &bytes).expect("write");
        files.push(path);
    }
    let script = r#"
import json, sys
from sd_parsers import ParserManager
from PIL import Image
pm = ParserManager()
out = []
# sd-parsers caches EXIF by id(image); keeping every image alive stops CPython from reusing an id
# (a freed JPEG's id given to the next WebP returned the JPEG's metadata).
keep = []
for path in sys.argv[1:]:
    im = Image.open(path)
    keep.append(im)
    info = pm.parse(im)
    if info is None:
        out.append(None)
        continue
    s = info.samplers[0]
    out.append({
        "generator": info.generator.name,
        "prompt": info.full_prompt,
        "negative": info.full_negative_prompt,
        "sampler": s.name,
        "params": {k: str(v) for k, v in s.parameters.items()},
        "model_name": s.model.name if s.model else None,
        "model_hash": s.model.hash if s.model else None,
        "metadata": {k: str(v) for k, v in info.metadata.items()},
    })
print(json.dumps(out))
"#;
    let out = std::process::Command::new(&python)
        .arg("-c")
        .arg(script)
        .args(&files)
        .output()
        .expect("python runs");
    assert!(
        out.status.success(),
        "sd-parsers failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let parsed: Vec<Value> = serde_json::from_slice(&out.stdout).expect("json from python");
    assert_eq!(parsed.len(), 3);
    for (i, p) in parsed.iter().enumerate() {
        assert_eq!(p["generator"], "AUTOMATIC1111", "file {i}: {p}");
        assert_eq!(p["prompt"], "a cat, on a mat", "file {i}: {p}");
        assert_eq!(p["negative"], "blurry", "file {i}: {p}");
        assert_eq!(p["sampler"], "DPM++ 2M", "file {i}: {p}");
        assert_eq!(p["params"]["scheduler"], "Karras", "file {i}: {p}");
        assert_eq!(p["params"]["cfg_scale"], "7", "file {i}: {p}");
        assert_eq!(p["params"]["steps"], "20", "file {i}: {p}");
        assert_eq!(p["model_name"], "tiny-sd1", "file {i}: {p}");
        assert_eq!(p["model_hash"], "0123456789", "file {i}: {p}");
    }
    assert_eq!(parsed[0]["params"]["seed"], "1244");
    assert_eq!(parsed[1]["params"]["seed"], "4242");
    assert_eq!(parsed[1]["metadata"]["Denoising strength"], "0.5");
    assert_eq!(parsed[2]["params"]["seed"], "1246");
}

#[tokio::test]
async fn identical_bytes_are_stored_once() {
    let s = TestServer::start().await;
    let a = store(&s, image("png", 3, json!({"run": "a"}))).await;
    let b = store(&s, image("png", 3, json!({"extra": 1}))).await;
    assert_eq!(a.hash, b.hash);
    let shard = blob_path(&s, &a.hash)
        .parent()
        .expect("shard")
        .to_path_buf();
    let files: Vec<_> = std::fs::read_dir(&shard)
        .expect("shard dir")
        .flatten()
        .collect();
    assert_eq!(files.len(), 1, "one blob for identical bytes");
    let (_, list) = s.get_json("/api/v1/images").await;
    assert_eq!(list["total"], 1);
    // The second store of the same bytes adds its attributes to the one image.
    assert_eq!(
        list["images"][0]["attributes"],
        json!({"run": "a", "extra": 1})
    );
}

#[tokio::test]
async fn etag_304_cache_headers_and_ranges() {
    let s = TestServer::start().await;
    let rec = store(&s, image("png", 4, json!({}))).await;
    let url = s.url(&format!("/api/v1/images/{}", rec.hash));
    let full = s.client.get(&url).send().await.expect("get");
    assert_eq!(full.status(), 200);
    let etag = full.headers()["etag"].to_str().expect("etag").to_string();
    assert_eq!(etag, format!("\"{}\"", rec.hash));
    assert!(full.headers()["cache-control"]
        .to_str()
        .unwrap_or("")
        .contains("immutable"));
    assert_eq!(full.headers()["x-content-type-options"], "nosniff");
    assert_eq!(full.headers()["accept-ranges"], "bytes");
    let all = full.bytes().await.expect("bytes");

    let r = s
        .client
        .get(&url)
        .header("If-None-Match", &etag)
        .send()
        .await
        .expect("conditional get");
    assert_eq!(r.status(), 304);
    assert_eq!(r.headers()["etag"], etag.as_str());
    assert!(r.bytes().await.expect("body").is_empty());
    let r = s
        .client
        .get(&url)
        .header("If-None-Match", "\"something-else\"")
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 200);

    let r = s
        .client
        .get(&url)
        .header("Range", "bytes=0-7")
        .send()
        .await
        .expect("range");
    assert_eq!(r.status(), 206);
    assert_eq!(
        r.headers()["content-range"],
        format!("bytes 0-7/{}", all.len()).as_str()
    );
    assert_eq!(&r.bytes().await.expect("body")[..], &all[..8]);
    let r = s
        .client
        .get(&url)
        .header("Range", "bytes=-10")
        .send()
        .await
        .expect("suffix range");
    assert_eq!(r.status(), 206);
    assert_eq!(&r.bytes().await.expect("body")[..], &all[all.len() - 10..]);
    let r = s
        .client
        .get(&url)
        .header("Range", format!("bytes={}-", all.len()))
        .send()
        .await
        .expect("bad range");
    assert_eq!(r.status(), 416);
    assert_eq!(
        r.headers()["content-range"],
        format!("bytes */{}", all.len()).as_str()
    );
}

#[tokio::test]
async fn thumbnails_are_scaled_cached_and_validated() {
    let s = TestServer::start().await;
    let rec = store(&s, image("png", 5, json!({}))).await;
    let r = s
        .get(&format!("/api/v1/images/{}/thumbnail?size=32", rec.hash))
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "image/jpeg");
    let first = r.bytes().await.expect("thumb");
    let t = image::load_from_memory(&first).expect("jpeg");
    assert_eq!((t.width(), t.height()), (32, 24));
    let cached = s
        .server
        .state
        .config
        .data_dir
        .join("thumbnails")
        .join(&rec.hash[..2])
        .join(format!("{}-32.jpg", rec.hash));
    assert!(cached.exists(), "thumbnail cached on disk");
    // A second request is served from the cache file: overwrite it and see the new bytes come back.
    std::fs::write(&cached, b"cached").expect("overwrite cache");
    let again = s
        .get(&format!("/api/v1/images/{}/thumbnail?size=32", rec.hash))
        .await;
    assert_eq!(&again.bytes().await.expect("body")[..], b"cached");
    // Default size never upscales a small image.
    let r = s
        .get(&format!("/api/v1/images/{}/thumbnail", rec.hash))
        .await;
    let t = image::load_from_memory(&r.bytes().await.expect("body")).expect("jpeg");
    assert_eq!((t.width(), t.height()), (64, 48));
    let (st, _) = s
        .get_json(&format!("/api/v1/images/{}/thumbnail?size=5000", rec.hash))
        .await;
    assert_eq!(st, 422);
    let (st, _) = s
        .get_json(&format!("/api/v1/images/{}/thumbnail", "f".repeat(64)))
        .await;
    assert_eq!(st, 404);
}

#[tokio::test]
async fn attributes_merge_delete_and_query_with_several_filters() {
    let s = TestServer::start().await;
    let repo = &s.server.state.repo;
    // A few thousand rows straight into the repository (the query is what is under test here).
    let base = 1_700_000_000_000i64;
    for i in 0..3000i64 {
        let rec = ImageRecord {
            hash: format!("{:064x}", i + 1),
            format: "png".into(),
            width: 64,
            height: 64,
            bytes: 100,
            created_at: base + i,
            task_id: Some(format!("task-{}", i % 10)),
            model: Some(if i % 2 == 0 {
                MODEL.into()
            } else {
                "f".repeat(64)
            }),
            prompt: Some(if i % 3 == 0 { "A Red Fox" } else { "a cat" }.into()),
            negative_prompt: None,
            seed: Some(i),
            steps: Some(20),
            guidance_scale: Some(7.0),
            scheduler: Some("Euler".into()),
            params: None,
        };
        let mut attrs = Map::new();
        attrs.insert("project".into(), json!(format!("p{}", i % 3)));
        attrs.insert("rating".into(), json!(i % 5));
        attrs.insert("keep".into(), json!(i % 7 == 0));
        repo.insert_image(&rec, &attrs).await.expect("insert");
    }
    // project=p1 AND rating=4 AND keep=true: i%3==1, i%5==4, i%7==0 → i ≡ 49 (mod 105).
    let (st, r) = s
        .get_json("/api/v1/images?attr.project=p1&attr.rating=4&attr.keep=true&per_page=200")
        .await;
    assert_eq!(st, 200, "{r}");
    let want: Vec<i64> = (0..3000).filter(|i| i % 105 == 49).rev().collect();
    assert_eq!(r["total"], want.len());
    let seeds: Vec<i64> = r["images"]
        .as_array()
        .expect("images")
        .iter()
        .map(|m| m["seed"].as_i64().expect("seed"))
        .collect();
    assert_eq!(seeds, want, "all matches, newest first");
    assert_eq!(r["images"][0]["attributes"]["rating"], 4);
    assert_eq!(r["images"][0]["attributes"]["keep"], true);

    // Other filters and paging.
    let (_, r) = s
        .get_json(&format!(
            "/api/v1/images?model={}&task_id=task-4&q=red+FOX&per_page=5&page=2",
            &MODEL[..10]
        ))
        .await;
    // i even, i%10==4, i%3==0 → i ≡ 24 (mod 30): 100 matches.
    assert_eq!(r["total"], 100);
    assert_eq!(r["images"].as_array().map(Vec::len), Some(5));
    assert_eq!(r["images"][0]["seed"], 2994 - 30 * 5);
    let (_, r) = s
        .get_json(&format!(
            "/api/v1/images?after={}&before={}",
            base + 10,
            base + 20
        ))
        .await;
    assert_eq!(r["total"], 9);
    // Attribute + image-row filters + time bound: i%3==1, i even, i<1000 → i ≡ 4 (mod 6).
    let (_, r) = s
        .get_json(&format!(
            "/api/v1/images?attr.project=p1&model={}&before={}&per_page=1",
            &MODEL[..10],
            base + 1000
        ))
        .await;
    assert_eq!(r["total"], 166);
    assert_eq!(r["images"][0]["seed"], 994);
    let (_, r) = s
        .get_json("/api/v1/images?attr.project=nope&attr.rating=1")
        .await;
    assert_eq!(r["total"], 0);
    let (_, r) = s
        .get_json("/api/v1/images?after=2023-11-14T22:13:20.100Z&per_page=1")
        .await;
    assert_eq!(r["total"], 2899);
    for bad in [
        "/api/v1/images?per_page=0",
        "/api/v1/images?page=0",
        "/api/v1/images?before=yesterday",
        "/api/v1/images?model=../x",
    ] {
        let (st, _) = s.get_json(bad).await;
        assert_eq!(st, 422, "{bad}");
    }

    // Merge attributes: set, change, remove with null.
    // Row i = 50 (hash i + 1): project p2, rating 0, keep false.
    let h = format!("{:064x}", 51);
    let (st, m) = s
        .post_json(
            &format!("/api/v1/images/{h}/metadata"),
            &json!({"project": "p9", "rating": null, "note": {"a": [1, 2]}}),
        )
        .await;
    assert_eq!(st, 200, "{m}");
    assert_eq!(
        m["attributes"],
        json!({"project": "p9", "keep": false, "note": {"a": [1, 2]}})
    );
    let (_, m) = s.get_json(&format!("/api/v1/images/{h}/metadata")).await;
    assert_eq!(m["attributes"]["project"], "p9");
    assert!(m["attributes"].get("rating").is_none());
    let (_, r) = s.get_json("/api/v1/images?attr.project=p9").await;
    assert_eq!(r["total"], 1);
    assert_eq!(r["images"][0]["hash"], h);
    let (st, _) = s
        .post_json(
            &format!("/api/v1/images/{}/metadata", "e".repeat(64)),
            &json!({"a": 1}),
        )
        .await;
    assert_eq!(st, 404);
    let (st, _) = s
        .post_json(&format!("/api/v1/images/{h}/metadata"), &json!([1, 2]))
        .await;
    assert_eq!(st, 422);
}

#[tokio::test]
async fn batch_delete_removes_rows_blobs_and_thumbnails() {
    let s = TestServer::start().await;
    let a = store(&s, image("png", 6, json!({}))).await;
    let b = store(&s, image("webp", 7, json!({}))).await;
    let r = s
        .get(&format!("/api/v1/images/{}/thumbnail?size=16", a.hash))
        .await;
    assert_eq!(r.status(), 200);
    let missing = "d".repeat(64);
    // One bad id rejects the whole request before anything is deleted.
    let r = s
        .client
        .delete(s.url("/api/v1/images"))
        .json(&json!({"hashes": [a.hash, "../etc/passwd"]}))
        .send()
        .await
        .expect("delete");
    assert_eq!(r.status(), 422);
    assert!(blob_path(&s, &a.hash).exists());

    let r = s
        .client
        .delete(s.url("/api/v1/images"))
        .json(&json!({"hashes": [a.hash, missing, a.hash]}))
        .send()
        .await
        .expect("delete");
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.expect("json");
    assert_eq!(body, json!({"deleted": [a.hash], "not_found": [missing]}));
    assert!(!blob_path(&s, &a.hash).exists(), "blob removed");
    assert!(!s
        .server
        .state
        .config
        .data_dir
        .join("thumbnails")
        .join(&a.hash[..2])
        .join(format!("{}-16.jpg", a.hash))
        .exists());
    let (st, _) = s.get_json(&format!("/api/v1/images/{}", a.hash)).await;
    assert_eq!(st, 404);
    let (st, _) = s.get_json(&format!("/api/v1/images/{}", b.hash)).await;
    assert_eq!(st, 200, "other images untouched");
}

#[tokio::test]
async fn traversal_and_malformed_ids_never_touch_storage() {
    let s = TestServer::start().await;
    let rec = store(&s, image("png", 8, json!({}))).await;
    // A secret outside the store and links to it planted inside the store.
    let secret = s.dir.path().join("secret.txt");
    std::fs::write(&secret, b"top secret").expect("secret");
    let planted = "c".repeat(64);
    let shard = blob_path(&s, &planted)
        .parent()
        .expect("shard")
        .to_path_buf();
    std::fs::create_dir_all(&shard).expect("shard");
    std::os::unix::fs::symlink(&secret, blob_path(&s, &planted)).expect("symlink");
    // A row pointing at the planted link (as if the database were tampered with) still gets nothing.
    let mut fake = rec.clone();
    fake.hash = planted.clone();
    s.server
        .state
        .repo
        .insert_image(&fake, &Map::new())
        .await
        .expect("row");
    let r = s.get(&format!("/api/v1/images/{planted}")).await;
    assert_eq!(r.status(), 404);
    assert!(!r.text().await.unwrap_or_default().contains("top secret"));
    let r = s.get(&format!("/api/v1/images/{planted}/thumbnail")).await;
    assert_eq!(r.status(), 404);

    let upper = rec.hash.to_uppercase();
    for path in [
        "/api/v1/images/..%2F..%2Fsecret.txt".to_string(),
        "/api/v1/images/%2e%2e%2f%2e%2e%2fsecret.txt".to_string(),
        "/api/v1/images/%2Fetc%2Fpasswd".to_string(),
        "/api/v1/images/..%252F..%252Fsecret.txt".to_string(),
        format!("/api/v1/images/{upper}"),
        format!("/api/v1/images/{}", &rec.hash[..63]),
        format!("/api/v1/images/{}0", rec.hash),
        format!("/api/v1/images/{}%00", rec.hash),
        format!("/api/v1/images/{}/metadata", &rec.hash[1..]),
        "/api/v1/images/..%2F..%2Fsecret.txt/thumbnail".to_string(),
    ] {
        let r = s.get(&path).await;
        let st = r.status().as_u16();
        let body = r.text().await.unwrap_or_default();
        assert!(st == 422 || st == 404 || st == 400, "{path}: {st}");
        assert!(!body.contains("top secret"), "{path}");
    }
    // Plain `../` segments are normalised by the client or rejected; either way no file comes back.
    let r = s.get("/api/v1/images/../../secret.txt").await;
    assert_ne!(r.status(), 200);
    let (st, body) = s
        .get_json(&format!("/api/v1/images/{upper}/metadata"))
        .await;
    assert_eq!(st, 422);
    assert!(body["detail"][0]["msg"]
        .as_str()
        .unwrap_or("")
        .contains("64 lowercase hex"));
}

#[tokio::test]
async fn share_links_work_without_key_and_reject_tampering_and_expiry() {
    const KEY: &str = "images-test-key";
    let s = TestServer::start_with(|c| {
        c.api.keys = vec![sd_host::config::Secret(KEY.into())];
    })
    .await;
    let rec = store(&s, image("png", 9, json!({}))).await;
    let url = s.url(&format!("/api/v1/images/{}", rec.hash));
    assert_eq!(s.client.get(&url).send().await.expect("get").status(), 401);

    let r = s
        .client
        .post(s.url(&format!("/api/v1/images/{}/share", rec.hash)))
        .header("X-API-Key", KEY)
        .json(&json!({"expires_in": 600}))
        .send()
        .await
        .expect("share");
    assert_eq!(r.status(), 200);
    let share: Value = r.json().await.expect("json");
    let link = share["url"].as_str().expect("url").to_string();
    assert!(share["expires_at"].as_str().is_some());
    let r = s.client.get(&link).send().await.expect("shared get");
    assert_eq!(r.status(), 200);
    assert_eq!(
        sd_host::storage::sha256_hex(&r.bytes().await.expect("bytes")),
        rec.hash
    );
    let thumb = share["thumbnail_url"].as_str().expect("thumbnail url");
    assert_eq!(s.client.get(thumb).send().await.expect("get").status(), 200);

    // Tampered: another token, another expiry, or the token moved to another image.
    let (base, query) = link.split_once('?').expect("query");
    let token = query.split("token=").nth(1).expect("token");
    let mut flipped = token.to_string();
    let last = if flipped.ends_with('0') { "1" } else { "0" };
    flipped.replace_range(flipped.len() - 1.., last);
    let other = store(&s, image("png", 10, json!({}))).await;
    for bad in [
        format!("{base}?{}", query.replace(token, &flipped)),
        format!("{base}?{}", query.replace("expires=", "expires=9")),
        format!(
            "{}?{query}",
            s.url(&format!("/api/v1/images/{}", other.hash))
        ),
        format!("{base}?token={token}"),
    ] {
        let r = s.client.get(&bad).send().await.expect("get");
        assert_eq!(r.status(), 403, "{bad}");
    }
    // Expired: a correctly signed link whose time has passed.
    let past = chrono::Utc::now().timestamp() - 10;
    let sig = s.server.state.share.sign(&rec.hash, past);
    let r = s
        .client
        .get(format!("{url}?expires={past}&token={sig}"))
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 403);
    let body: Value = r.json().await.expect("json");
    assert!(body["detail"].as_str().unwrap_or("").contains("expired"));
    // A share link opens nothing but the image: not its metadata.
    let r = s
        .client
        .get(format!("{base}/metadata?{query}"))
        .send()
        .await
        .expect("get");
    assert!(matches!(r.status().as_u16(), 401 | 403), "{}", r.status());
}

#[tokio::test]
async fn storage_stats_export_zip_and_orphan_sweep() {
    let s = TestServer::start().await;
    let a = store(&s, image("png", 11, json!({"k": "v"}))).await;
    let b = store(&s, image("jpeg", 12, json!({}))).await;
    let (st, stats) = s.get_json("/api/v1/storage/stats").await;
    assert_eq!(st, 200);
    assert_eq!(stats["images"], 2);
    assert_eq!(stats["bytes"], a.bytes + b.bytes);
    assert_eq!(stats["by_format"]["jpeg"]["images"], 1);

    let missing = "9".repeat(64);
    let r = s
        .client
        .post(s.url("/api/v1/images/export"))
        .json(&json!({"hashes": [a.hash, b.hash, missing]}))
        .send()
        .await
        .expect("export");
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/zip");
    let zip_bytes = r.bytes().await.expect("zip");
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(zip_bytes.to_vec())).expect("zip");
    let mut names: Vec<String> = zip.file_names().map(str::to_string).collect();
    names.sort();
    let mut want = vec![
        format!("{}.png", a.hash),
        format!("{}.json", a.hash),
        format!("{}.jpg", b.hash),
        format!("{}.json", b.hash),
        "manifest.json".to_string(),
    ];
    want.sort();
    assert_eq!(names, want);
    let mut png = Vec::new();
    std::io::Read::read_to_end(
        &mut zip.by_name(&format!("{}.png", a.hash)).expect("png entry"),
        &mut png,
    )
    .expect("read");
    assert_eq!(sd_host::storage::sha256_hex(&png), a.hash);
    let meta: Value =
        serde_json::from_reader(zip.by_name(&format!("{}.json", a.hash)).expect("json"))
            .expect("metadata json");
    assert_eq!(meta["attributes"]["k"], "v");
    let manifest: Value =
        serde_json::from_reader(zip.by_name("manifest.json").expect("manifest")).expect("json");
    assert_eq!(manifest["not_found"], json!([missing]));

    // A blob without a row (crash between the two writes) is swept; images with rows stay.
    let orphan = s
        .server
        .state
        .blobs
        .put(bytes::Bytes::from_static(b"orphan bytes"))
        .await
        .expect("put");
    assert!(blob_path(&s, &orphan).exists());
    let removed = sd_host::images::store::sweep_orphans(&s.server.state, Duration::ZERO)
        .await
        .expect("sweep");
    assert_eq!(removed, 1);
    assert!(!blob_path(&s, &orphan).exists());
    assert!(blob_path(&s, &a.hash).exists());
    assert!(blob_path(&s, &b.hash).exists());
}

/// A data dir with one tiny sd1 checkpoint (registered by the start-up scan).
fn data_dir_with_tiny_model() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let models = dir.path().join("data/models");
    std::fs::create_dir_all(&models).expect("models dir");
    sd_engine::tiny::write_tiny_checkpoint(
        sd_engine::Family::Sd1,
        false,
        1,
        &models.join("tiny.safetensors"),
    )
    .expect("tiny checkpoint");
    dir
}

#[tokio::test]
async fn gallery_stream_receives_an_image_stored_by_a_task() {
    let s = TestServer::start_in(data_dir_with_tiny_model(), |_| {}).await;
    let resp = s
        .client
        .get(s.url("/api/v1/images/events"))
        .send()
        .await
        .expect("sse");
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap_or("")
        .starts_with("text/event-stream"));
    let (st, r) = s
        .post_json(
            "/api/v1/tasks",
            &json!({"prompt": "a cat", "width": 64, "height": 64, "num_inference_steps": 2,
                    "metadata": {"album": "gallery-test"}}),
        )
        .await;
    assert_eq!(st, 202, "{r}");
    let task_id = r["task_id"].as_str().expect("task id").to_string();

    let mut stream = resp.bytes_stream();
    let mut buf = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let event = loop {
        let chunk = tokio::time::timeout_at(deadline, stream.next())
            .await
            .expect("gallery event before the deadline")
            .expect("stream open")
            .expect("chunk");
        buf.push_str(&String::from_utf8_lossy(&chunk));
        let mut found = None;
        while let Some(end) = buf.find("\n\n") {
            let block: String = buf.drain(..end + 2).collect();
            if block.lines().any(|l| l.trim() == "event: image") {
                let data: String = block
                    .lines()
                    .filter_map(|l| l.strip_prefix("data:"))
                    .map(str::trim_start)
                    .collect();
                found = Some(serde_json::from_str::<Value>(&data).expect("event json"));
            }
        }
        if let Some(ev) = found {
            break ev;
        }
    };
    assert_eq!(event["task_id"], task_id);
    let hash = event["hash"].as_str().expect("hash");
    assert_eq!(
        event["url"],
        s.url(&format!("/api/v1/images/{hash}")).as_str()
    );
    assert_eq!(
        event["thumbnail_url"],
        s.url(&format!("/api/v1/images/{hash}/thumbnail")).as_str()
    );
    let r = s.get(&format!("/api/v1/images/{hash}")).await;
    assert_eq!(r.status(), 200);
    let bytes = r.bytes().await.expect("bytes");
    let info = sd_host::images::read_png_parameters(&bytes).expect("infotext");
    let parsed = sd_host::images::parse_infotext(&info);
    assert_eq!(parsed["prompt"], "a cat");
    assert_eq!(parsed["Steps"], "2");
    assert_eq!(parsed["Size"], "64x64");
    let (_, r) = s
        .get_json(&format!(
            "/api/v1/images?task_id={task_id}&attr.album=gallery-test"
        ))
        .await;
    assert_eq!(r["total"], 1);
}

/// Benchmark (run with `--ignored --nocapture`): attribute query over 100,000 images. Prints timings for
/// bench/RESULTS.md; asserts only correctness.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn bench_attribute_query_over_100k_images() {
    let s = TestServer::start().await;
    let repo = s.server.state.repo.clone();
    let n = 100_000i64;
    let started = std::time::Instant::now();
    let mut handles = Vec::new();
    for part in 0..8i64 {
        let repo = repo.clone();
        handles.push(tokio::spawn(async move {
            for i in (part..n).step_by(8) {
                let rec = ImageRecord {
                    hash: format!("{:064x}", i + 1),
                    format: "png".into(),
                    width: 512,
                    height: 512,
                    bytes: 400_000,
                    created_at: 1_700_000_000_000 + i,
                    task_id: Some(format!("{:08}", i / 4)),
                    model: Some(MODEL.into()),
                    prompt: Some(format!("prompt number {i}")),
                    negative_prompt: None,
                    seed: Some(i),
                    steps: Some(20),
                    guidance_scale: Some(7.0),
                    scheduler: Some("Euler".into()),
                    params: None,
                };
                let mut attrs = Map::new();
                attrs.insert("project".into(), json!(format!("p{}", i % 50)));
                attrs.insert("rating".into(), json!(i % 5));
                attrs.insert("user".into(), json!(format!("u{}", i % 20)));
                repo.insert_image(&rec, &attrs).await.expect("insert");
            }
        }));
    }
    for h in handles {
        h.await.expect("insert task");
    }
    println!("inserted {n} images in {:?}", started.elapsed());
    let queries = [
        "/api/v1/images?attr.project=p7&attr.rating=2&per_page=50",
        "/api/v1/images?attr.project=p7&attr.rating=2&attr.user=u7&per_page=50",
        "/api/v1/images?attr.user=u3&per_page=50",
        "/api/v1/images?per_page=50",
    ];
    for q in queries {
        // Warm once, then time several runs through the real HTTP API.
        let (st, _) = s.get_json(q).await;
        assert_eq!(st, 200);
        let runs = 10;
        let t = std::time::Instant::now();
        let mut total = Value::Null;
        for _ in 0..runs {
            let (_, r) = s.get_json(q).await;
            total = r["total"].clone();
        }
        println!(
            "BENCH {q}: {:?} per request (total matches {total})",
            t.elapsed() / runs
        );
    }
    let mut direct = ImageQuery {
        limit: 50,
        ..Default::default()
    };
    direct.attrs = vec![
        ("project".into(), "p7".into()),
        ("rating".into(), "2".into()),
    ];
    let t = std::time::Instant::now();
    let (rows, total) = repo.query_images(&direct).await.expect("query");
    println!(
        "BENCH repository query (2 attrs): {:?}, {} rows of {total}",
        t.elapsed(),
        rows.len()
    );
    assert_eq!(total, 2000);
}

/// A blob left without a row by a crash (written, row never committed) is removed by the sweep
/// that runs at start, with no call from anyone.
#[tokio::test]
async fn start_up_sweep_removes_blobs_without_rows() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bytes = b"bytes of an image whose row was never written";
    let hash = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(bytes));
    let orphan = dir.path().join("data/images").join(&hash[..2]).join(&hash);
    std::fs::create_dir_all(orphan.parent().expect("shard")).expect("mkdir");
    std::fs::write(&orphan, bytes).expect("plant");
    let s = TestServer::start_in(dir, |_| {}).await;
    assert_eq!(blob_path(&s, &hash), orphan);
    for _ in 0..200 {
        if !orphan.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(!orphan.exists(), "the start-up sweep removed the orphan");
    assert_eq!(s.get(&format!("/api/v1/images/{hash}")).await.status(), 404);
}
