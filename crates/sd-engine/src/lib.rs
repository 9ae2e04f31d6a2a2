//! SD-Host's inference engine: single-file Stable Diffusion checkpoints in, RGB images out.
//!
//! Synchronous and self-contained: no HTTP, no async runtime. The host runs one [`Backend`]
//! on a dedicated OS thread and talks to it through a channel.

pub mod api;
pub mod error;

// Checkpoint files, family detection and tiny test checkpoints.
pub mod checkpoint;
pub mod detect;
pub mod safetensors_file;
pub mod tiny;

// Networks: CLIP text encoders, UNet, VAE.
pub mod models;

// LoRA / LoCon / LoHA / LoKr adapters.
pub mod lora;

// Prompt parsing, tokenization and conditioning.
pub mod text;

// Noise schedules and samplers.
pub mod sched;

// PyTorch-identical CPU random numbers.
pub mod rng;

// The sampling loop that ties it together, and latent previews.
pub mod pipeline;
pub mod preview;

// Benchmark harness (`sd-host bench`).
pub mod bench;

pub use api::*;
pub use error::{EngineError, Result};
