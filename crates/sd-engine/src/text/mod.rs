//! Prompt text → conditioning.
pub mod conditioning;
pub mod embedding;
pub mod prompt;
pub mod tokenizer;
