//! Fuzzing perfplus's decoders: everything a peer (or an operator's kernel file) sends that perfplus
//! parses before it trusts it.
//!
//! - [`targets`]: one `fn(&[u8])` per decoder. Each must never panic, whatever the bytes, and checks
//!   what it decoded: a decoded value encodes again and decodes to the same value, and values made
//!   from the bytes by [`generate`] decode to exactly what was encoded.
//! - [`mutate`] and [`runner`]: a small coverage-less mutation fuzzer over a seed corpus that runs on
//!   stable Rust (`perfplus-fuzz run TARGET`), bounded by executions or time; it keeps the mutants
//!   that decode as further seeds, catches panics and, with [`alloc::Counting`] as the global
//!   allocator, flags any execution that allocated more than [`alloc::LIMIT`].
//! - [`seeds`]: the seed corpus, from real encodings (`perfplus-fuzz seeds DIR` writes it;
//!   `fuzz/corpus/` holds the committed copy).
//!
//! `fuzz/libfuzzer/` runs the same targets under cargo-fuzz (libFuzzer, coverage-guided; nightly).

pub mod alloc;
pub mod generate;
pub mod mutate;
pub mod runner;
pub mod seeds;
pub mod targets;

pub use targets::{Target, TARGETS};
