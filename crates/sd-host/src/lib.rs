//! SD-Host: HTTP API, queue, model library and image store around the `sd-engine` crate.

pub mod api;
pub mod cli;
pub mod config;
pub mod db;
pub mod error;
pub mod events;
pub mod generate;
pub mod images;
pub mod metrics;
pub mod models;
pub mod net;
pub mod queue;
pub mod server;
pub mod state;
pub mod storage;
pub mod util;
