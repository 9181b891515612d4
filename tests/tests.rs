//! The one integration-test binary (STYLE.md §1): tiny-model tests, loader and bad-input tests,
//! CLI tests, and the demo-model tests against the Hugging Face goldens.

// Exact float equality is intended where the tests assert bit-identical results.
#![allow(clippy::unwrap_used, clippy::float_cmp)]

mod analysis;
mod cli;
mod common;
mod demo_model;
mod families;
mod gemma3;
mod model_core;
mod peft;
mod stored;
mod train;
mod ui;
mod worker;
