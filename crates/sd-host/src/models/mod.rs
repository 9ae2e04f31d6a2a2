//! The model library: files in `models.dir` identified by SHA-256, and Civitai downloads.

pub mod cli;
pub mod library;
