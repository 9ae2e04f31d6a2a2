//! The image library: encoding with A1111-compatible metadata, the content-addressed store, thumbnails,
//! share links and the orphan sweep.

pub mod infotext;
pub mod metadata;
pub mod share;
pub mod store;
pub mod thumbs;

pub use infotext::{infotext, parse_infotext};
pub use metadata::read_png_parameters;
