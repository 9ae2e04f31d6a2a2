//! Sampler parity with diffusers, from fixtures written by
//! `tools/fixtures/make_sched_fixtures.py` (see its header to regenerate).
//!
//! Each case replays diffusers' loop with the same fake model and closed-form "noise" and
//! compares timesteps, sigmas, `init_noise_sigma`, `order`, the img2img start latent and the
//! latents after the first, middle and last steps within 1e-4 relative / 1e-5 absolute.

use std::path::PathBuf;

use candle_core::{Device, Tensor};
use sd_engine::sched::{create, Prediction, SchedulerConfig, TimestepSpacing};
use serde_json::Value;

const SHAPE: [usize; 4] = [1, 4, 4, 4];
const NUMEL: usize = 64;

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sched")
}

fn init_latent() -> Vec<f32> {
    (0..NUMEL)
        .map(|j| (0.73 * j as f64 + 0.31).cos() as f32)
        .collect()
}

fn fake_noise(k: usize) -> Vec<f32> {
    (0..NUMEL)
        .map(|j| (1.2 * (0.37 * (j + 1) as f64 + 1.91 * (k + 1) as f64).sin()) as f32)
        .collect()
}

fn tensor(v: Vec<f32>) -> Tensor {
    Tensor::from_vec(v, SHAPE.to_vec(), &Device::Cpu).expect("tensor")
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().unwrap_or(f64::NAN))
        .collect()
}

fn close(a: f64, b: f64, rel: f64, abs: f64) -> bool {
    (a.is_nan() && b.is_nan()) || (a - b).abs() <= abs + rel * b.abs()
}

/// Returns a description of the worst element if any is out of tolerance.
fn compare(what: &str, got: &[f64], want: &[f64], rel: f64, abs: f64) -> Option<String> {
    if got.len() != want.len() {
        return Some(format!(
            "{what}: length {} != {} (got {got:?}, want {want:?})",
            got.len(),
            want.len()
        ));
    }
    let mut worst: Option<(usize, f64)> = None;
    for (i, (&a, &b)) in got.iter().zip(want).enumerate() {
        if !close(a, b, rel, abs) {
            let err = (a - b).abs() / (abs + rel * b.abs());
            if worst.is_none_or(|(_, e)| err > e) {
                worst = Some((i, err));
            }
        }
    }
    worst.map(|(i, e)| {
        format!(
            "{what}[{i}]: got {} want {} ({e:.1}x tolerance)",
            got[i], want[i]
        )
    })
}

fn values(t: &Tensor) -> Vec<f64> {
    t.flatten_all()
        .and_then(|t| t.to_vec1::<f32>())
        .expect("to_vec")
        .into_iter()
        .map(f64::from)
        .collect()
}

fn run_case(case: &Value) -> Vec<String> {
    let sampler = case["sampler"].as_str().expect("sampler");
    let schedule = case["schedule"].as_str().expect("schedule");
    let steps = case["steps"].as_u64().expect("steps") as usize;
    let mut cfg = SchedulerConfig::sd15();
    cfg.prediction = match case["prediction"].as_str() {
        Some("v_prediction") => Prediction::VPrediction,
        _ => Prediction::Epsilon,
    };
    cfg.timestep_spacing = match case["timestep_spacing"].as_str() {
        Some("leading") => Some(TimestepSpacing::Leading),
        Some("trailing") => Some(TimestepSpacing::Trailing),
        Some("linspace") => Some(TimestepSpacing::Linspace),
        _ => None,
    };
    let label = format!(
        "{sampler} / {schedule} / {} / spacing {} / {steps} steps / begin {}",
        case["prediction"], case["timestep_spacing"], case["begin"]
    );
    let mut errs = Vec::new();
    let mut s = match create(sampler, Some(schedule), &cfg, steps) {
        Ok(s) => s,
        Err(e) => return vec![format!("{label}: create failed: {e}")],
    };
    let mut check = |what: &str, got: &[f64], want: &[f64], rel: f64, abs: f64| {
        if let Some(e) = compare(what, got, want, rel, abs) {
            errs.push(format!("{label}: {e}"));
        }
    };
    // Timesteps are model inputs in 0..1000; fractional ones (Karras, DPM2 midpoints) are
    // float32 in diffusers.
    check(
        "timesteps",
        s.timesteps(),
        &floats(&case["timesteps"]),
        1e-6,
        1e-3,
    );
    if case["sigmas"].is_array() {
        match s.sigmas() {
            Some(sig) => check("sigmas", sig, &floats(&case["sigmas"]), 1e-4, 1e-5),
            None => check("sigmas", &[], &floats(&case["sigmas"]), 1e-4, 1e-5),
        }
    }
    let init = case["init_noise_sigma"].as_f64().expect("init_noise_sigma");
    check(
        "init_noise_sigma",
        &[s.init_noise_sigma()],
        &[init],
        1e-5,
        1e-6,
    );
    let order = case["order"].as_u64().expect("order") as f64;
    check("order", &[s.order() as f64], &[order], 0.0, 0.0);

    let begin = case["begin"].as_u64().expect("begin") as usize;
    let mut x = if case["start"].is_array() {
        let original = (tensor(init_latent()) * 0.5).expect("scale");
        let noise0 = tensor(fake_noise(999));
        match s.add_noise(&original, &noise0, begin) {
            Ok(x) => {
                check("start", &values(&x), &floats(&case["start"]), 1e-4, 1e-5);
                x
            }
            Err(e) => return vec![format!("{label}: add_noise failed: {e}")],
        }
    } else {
        (tensor(init_latent()) * s.init_noise_sigma()).expect("scale")
    };
    let n = s.timesteps().len();
    let mid = begin + (n - begin) / 2;
    let mut draws = 0usize;
    for i in begin..n {
        let t = s.timesteps()[i];
        let step = s.scale_model_input(&x, i).and_then(|x_in| {
            let out = x_in.affine(0.1, 0.05 * (t / 100.0).cos())?;
            let mut noise = |shape: &[usize]| -> sd_engine::Result<Tensor> {
                assert_eq!(shape, SHAPE);
                let v = fake_noise(draws);
                draws += 1;
                Ok(tensor(v))
            };
            s.step(&out, i, &x, &mut noise)
        });
        x = match step {
            Ok(x) => x,
            Err(e) => {
                errs.push(format!("{label}: step {i} failed: {e}"));
                return errs;
            }
        };
        let key = if i == begin {
            Some("first")
        } else if i == mid {
            Some("mid")
        } else {
            None
        };
        for k in key.into_iter().chain((i == n - 1).then_some("final")) {
            let want = floats(&case[k]);
            if let Some(e) = compare(k, &values(&x), &want, 1e-4, 1e-5) {
                errs.push(format!("{label}: {e}"));
            }
        }
    }
    let want_draws = case["noise_draws"].as_u64().expect("noise_draws") as usize;
    if draws != want_draws {
        errs.push(format!(
            "{label}: {draws} noise draws, diffusers made {want_draws}"
        ));
    }
    errs
}

#[test]
fn samplers_match_diffusers() {
    let mut files: Vec<PathBuf> = std::fs::read_dir(fixture_dir())
        .expect("fixture dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 12,
        "expected a fixture per sampler, found {files:?}"
    );
    let mut errors = Vec::new();
    let mut cases = 0;
    for f in &files {
        let doc: Value =
            serde_json::from_slice(&std::fs::read(f).expect("read fixture")).expect("json");
        for case in doc["cases"].as_array().expect("cases") {
            cases += 1;
            errors.extend(run_case(case));
        }
    }
    assert!(cases > 100, "only {cases} cases");
    assert!(
        errors.is_empty(),
        "{} mismatches in {cases} cases:\n{}",
        errors.len(),
        errors.join("\n")
    );
}
