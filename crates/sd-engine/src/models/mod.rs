//! Networks.
pub mod attention;
pub mod clip;
pub mod ops;
pub mod unet;
pub mod vae;
