//! The image library: share links now; store/metadata/query logic lands here with the images issue.

pub mod share;
pub mod store;
