//! The report of a migration: assembled from what the engine measured, rendered for a human. Its
//! data types travel on the wire and live in `perfplus_protocol::report`.
pub mod assemble;
pub mod render;

pub use perfplus_protocol::report::*;
