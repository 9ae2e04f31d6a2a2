//! Dev helper for `tools/fixtures/make_lora_fixtures.py` and manual tests.
//!
//! `tiny_lora write CHECKPOINT lora|loha|lokr SEED OUT.safetensors` writes a small random LoRA
//! in kohya naming for the checkpoint's layers ([`sd_engine::tiny::write_tiny_lora`]).

use std::path::PathBuf;

use sd_engine::lora::LoraKind;

fn main() -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [cmd, ckpt, kind, seed, out] if cmd == "write" => {
            let kind = LoraKind::parse(kind).ok_or_else(|| format!("unknown kind {kind:?}"))?;
            let seed: u64 = seed.parse().map_err(|e| format!("seed: {e}"))?;
            sd_engine::tiny::write_tiny_lora(&PathBuf::from(ckpt), kind, seed, &PathBuf::from(out))
                .map_err(|e| e.to_string())
        }
        _ => Err("usage: tiny_lora write CHECKPOINT lora|loha|lokr SEED OUT.safetensors".into()),
    }
}
