//! The command line (SPEC §10): dev tiny-checkpoint / tiny-lora, generate, bench, exit codes.

use std::path::Path;
use std::process::{Command, Output};

fn sd_host(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sd-host"))
        .args(args)
        .current_dir(cwd)
        .env("SDHOST_LOG", "error")
        .output()
        .expect("run sd-host")
}

fn ok(out: &Output) {
    assert!(
        out.status.success(),
        "status {:?}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn dims(p: &Path) -> (u32, u32) {
    let img = image::open(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    (img.width(), img.height())
}

#[test]
fn every_family_generates_a_png_from_a_tiny_checkpoint() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    for fam in ["sd1", "sd2", "sdxl"] {
        let ck = format!("{fam}.safetensors");
        ok(&sd_host(
            &[
                "dev",
                "tiny-checkpoint",
                "--family",
                fam,
                "--seed",
                "3",
                "-o",
                &ck,
            ],
            d,
        ));
        let out = format!("{fam}.png");
        ok(&sd_host(
            &[
                "generate",
                "--model",
                &ck,
                "--prompt",
                "a (red:1.2) cat",
                "--width",
                "64",
                "--height",
                "48",
                "--steps",
                "2",
                "--seed",
                "5",
                "--scheduler",
                "Euler a",
                "-o",
                &out,
            ],
            d,
        ));
        assert_eq!(dims(&d.join(&out)), (64, 48), "{fam}");
    }
}

#[test]
fn generate_is_deterministic_and_numbers_several_outputs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    ok(&sd_host(
        &[
            "dev",
            "tiny-checkpoint",
            "--family",
            "sd1",
            "-o",
            "m.safetensors",
        ],
        d,
    ));
    let run = |out: &str, seed: &str, n: &str| {
        ok(&sd_host(
            &[
                "generate",
                "--model",
                "m.safetensors",
                "--prompt",
                "a cat",
                "--width",
                "64",
                "--height",
                "64",
                "--steps",
                "2",
                "--seed",
                seed,
                "--num-images",
                n,
                "-o",
                out,
            ],
            d,
        ))
    };
    run("a.png", "9", "1");
    run("b.png", "9", "1");
    run("c.png", "10", "1");
    let read = |p: &str| std::fs::read(d.join(p)).expect("read");
    assert_eq!(read("a.png"), read("b.png"), "same seed → same bytes");
    assert_ne!(read("a.png"), read("c.png"));
    run("many.png", "9", "2");
    assert!(d.join("many-1.png").exists() && d.join("many-2.png").exists());
    assert!(!d.join("many.png").exists());
    // Image 0 of a batch is the single image of the same seed.
    let px = |p: &str| image::open(d.join(p)).expect("open").to_rgb8().into_raw();
    assert_eq!(px("many-1.png"), px("a.png"));
    assert_eq!(px("many-2.png"), px("c.png"), "image 1 uses seed + 1");
}

#[test]
fn img2img_inpaint_and_lora_run_from_the_cli() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    ok(&sd_host(
        &[
            "dev",
            "tiny-checkpoint",
            "--family",
            "sd1",
            "--inpaint",
            "-o",
            "inp.safetensors",
        ],
        d,
    ));
    ok(&sd_host(
        &[
            "dev",
            "tiny-checkpoint",
            "--family",
            "sd1",
            "-o",
            "m.safetensors",
        ],
        d,
    ));
    ok(&sd_host(
        &[
            "dev",
            "tiny-lora",
            "--checkpoint",
            "m.safetensors",
            "--kind",
            "loha",
            "-o",
            "l.safetensors",
        ],
        d,
    ));
    image::RgbImage::from_pixel(64, 64, image::Rgb([200, 30, 30]))
        .save(d.join("src.png"))
        .expect("save");
    let mut mask = image::GrayImage::new(64, 64);
    for y in 16..48 {
        for x in 16..48 {
            mask.put_pixel(x, y, image::Luma([255]));
        }
    }
    mask.save(d.join("mask.png")).expect("save");
    let base = ["--prompt", "a cat", "--steps", "2", "--seed", "1"];
    let with = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = vec!["generate".into()];
        v.extend(base.iter().map(|s| s.to_string()));
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let args = with(&[
        "--model",
        "m.safetensors",
        "--init-image",
        "src.png",
        "--strength",
        "0.5",
        "-o",
        "i2i.png",
    ]);
    ok(&sd_host(
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        d,
    ));
    assert_eq!(dims(&d.join("i2i.png")), (64, 64));
    let args = with(&[
        "--model",
        "inp.safetensors",
        "--init-image",
        "src.png",
        "--mask",
        "mask.png",
        "-o",
        "inp.png",
    ]);
    ok(&sd_host(
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        d,
    ));
    let args = with(&[
        "--model",
        "m.safetensors",
        "--width",
        "64",
        "--height",
        "64",
        "-o",
        "plain.png",
    ]);
    ok(&sd_host(
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        d,
    ));
    let args = with(&[
        "--model",
        "m.safetensors",
        "--width",
        "64",
        "--height",
        "64",
        "--lora",
        "l.safetensors:1.0",
        "-o",
        "lora.png",
    ]);
    ok(&sd_host(
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        d,
    ));
    let args = with(&[
        "--model",
        "m.safetensors",
        "--width",
        "64",
        "--height",
        "64",
        "--lora",
        "l.safetensors:0",
        "-o",
        "lora0.png",
    ]);
    ok(&sd_host(
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        d,
    ));
    let px = |p: &str| image::open(d.join(p)).expect("open").to_rgb8().into_raw();
    assert_ne!(
        px("lora.png"),
        px("plain.png"),
        "a LoRA at weight 1 changes the image"
    );
    assert_eq!(px("lora0.png"), px("plain.png"), "weight 0 is no LoRA");

    // A standalone VAE decodes instead of the checkpoint's and is named in the infotext.
    sd_engine::tiny::write_tiny_vae(sd_engine::Family::Sd1, 8, &d.join("v.safetensors"))
        .expect("vae");
    let args = with(&[
        "--model",
        "m.safetensors",
        "--width",
        "64",
        "--height",
        "64",
        "--vae",
        "v.safetensors",
        "-o",
        "vae.png",
    ]);
    ok(&sd_host(
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        d,
    ));
    assert_ne!(px("vae.png"), px("plain.png"), "the other VAE decoded");
    let png = std::fs::read(d.join("vae.png")).expect("read");
    let text = String::from_utf8_lossy(&png);
    assert!(
        text.contains("VAE: v.safetensors"),
        "infotext names the VAE"
    );
}

#[test]
fn exit_codes_follow_the_spec() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let usage = sd_host(&["generate", "--prompt", "x"], d);
    assert_eq!(
        usage.status.code(),
        Some(2),
        "missing --model is a usage error"
    );
    let missing = sd_host(
        &[
            "generate",
            "--model",
            "nope.safetensors",
            "--prompt",
            "x",
            "-o",
            "o.png",
        ],
        d,
    );
    assert_eq!(missing.status.code(), Some(1));
    let err = String::from_utf8_lossy(&missing.stderr);
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(err.contains("nope.safetensors"));
    std::fs::write(d.join("evil.ckpt"), b"\x80\x02}q\x00.").expect("write");
    let pickle = sd_host(
        &[
            "generate",
            "--model",
            "evil.ckpt",
            "--prompt",
            "x",
            "-o",
            "o.png",
        ],
        d,
    );
    assert_eq!(pickle.status.code(), Some(1));
    assert!(!d.join("o.png").exists());
}

#[test]
fn bench_reports_json_on_tiny_weights() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = sd_host(
        &[
            "bench", "--family", "sd1", "--size", "tiny", "--res", "64", "--steps", "2", "--iters",
            "1", "--json",
        ],
        dir.path(),
    );
    ok(&out);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["res"], 64);
    assert!(v["unet_step_s_median"].as_f64().is_some_and(|t| t > 0.0));
    assert!(v["vae_decode_s"].as_f64().is_some_and(|t| t > 0.0));
    assert!(v["peak_rss_bytes"].as_u64().is_some_and(|b| b > 0));
}

/// `sd-host serve` with no data-dir flag creates `./data` in its working directory, answers HTTP,
/// and on SIGTERM or SIGINT exits 0 promptly even with an event stream open.
#[test]
fn serve_uses_the_embedded_default_and_stops_cleanly_on_signals() {
    use std::io::{BufRead, Read, Write};
    for signal in ["-TERM", "-INT"] {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut child = Command::new(env!("CARGO_BIN_EXE_sd-host"))
            .args(["serve", "--port", "0"])
            .current_dir(dir.path())
            .env("SDHOST_LOG", "error")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn sd-host");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("read");
        let addr = line
            .trim()
            .rsplit("http://")
            .next()
            .expect("address")
            .to_string();
        assert!(
            addr.starts_with("127.0.0.1:"),
            "loopback by default: {line}"
        );
        let data = dir.path().join("data");
        assert!(data.join("sd-host.db").is_file() && data.join("models").is_dir());

        let mut health = std::net::TcpStream::connect(&addr).expect("connect");
        health
            .write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            .expect("write");
        let mut reply = String::new();
        health.read_to_string(&mut reply).expect("read");
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
        assert!(reply.contains(r#""status":"ok""#), "{reply}");

        // A browser tab watching the queue must not hold the stop.
        let mut sse = std::net::TcpStream::connect(&addr).expect("connect");
        sse.write_all(b"GET /api/v1/tasks/queue HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            .expect("write");
        let mut first = [0u8; 64];
        let n = sse.read(&mut first).expect("stream starts");
        assert!(String::from_utf8_lossy(&first[..n]).starts_with("HTTP/1.1 200"));

        let status = Command::new("kill")
            .args([signal, &child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let code = loop {
            if let Some(s) = child.try_wait().expect("wait") {
                break s;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "sd-host did not stop after {signal}"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        };
        assert!(code.success(), "{signal}: {code:?}");
    }
}
