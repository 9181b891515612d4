//! tunelens: compare a base and an instruction-tuned language model.
//!
//! Layers (dependencies point one way): `ui`, `cli` → `worker` → `analysis`, `train` → `model`.
//! `model` knows nothing of the UI, channels or the CLI.

pub mod analysis;
pub mod cache;
pub mod cli;
pub mod error;
pub mod export;
pub mod ivfile;
pub mod model;
pub mod samples;
pub mod train;
pub mod ui;
pub mod wordfiles;
pub mod worker;

pub use error::{Error, Result};
