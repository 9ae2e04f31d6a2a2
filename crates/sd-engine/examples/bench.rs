//! Stand-in for `sd-host bench` until the host CLI exposes it: same flags, same JSON.
//!
//! ```text
//! cargo run --release -p sd-engine --example bench -- [--family sd1|sd2|sdxl] [--size full|tiny]
//!     [--res 256] [--steps N] [--iters N] [--checkpoint FILE] [--no-vae-warmup] [--json]
//! ```
//! Progress lines go to stderr; the report (a table, or one JSON line with `--json`) to stdout.
//! Threads follow `RAYON_NUM_THREADS` (default: all cores).

use std::path::PathBuf;

use sd_engine::bench::{run, BenchOptions, BenchSize};
use sd_engine::Family;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn parse_family(s: &str) -> Res<Family> {
    Ok(match s.to_ascii_lowercase().as_str() {
        "sd1" | "sd15" | "sd1.5" => Family::Sd1,
        "sd2" | "sd21" => Family::Sd2,
        "sdxl" => Family::Sdxl,
        other => return Err(format!("unknown family {other:?} (sd1, sd2, sdxl)").into()),
    })
}

fn main() -> Res<()> {
    let mut opts = BenchOptions::default();
    let mut json = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--family" => opts.family = parse_family(&value()?)?,
            "--size" => opts.size = BenchSize::parse(&value()?)?,
            "--res" => opts.res = value()?.parse()?,
            "--steps" => opts.steps = value()?.parse()?,
            "--iters" => opts.unet_iters = value()?.parse()?,
            "--checkpoint" => opts.checkpoint = Some(PathBuf::from(value()?)),
            "--no-vae-warmup" => opts.vae_warmup = false,
            "--json" => json = true,
            "-h" | "--help" => {
                println!(
                    "bench [--family sd1|sd2|sdxl] [--size full|tiny] [--res 256] [--steps 20] \
                     [--iters 3] [--checkpoint FILE] [--no-vae-warmup] [--json]"
                );
                return Ok(());
            }
            other => return Err(format!("unknown argument {other:?}").into()),
        }
    }
    let report = run(&opts, &mut |line| eprintln!("[bench] {line}"))?;
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report.table());
    }
    Ok(())
}
