//! Reusable widgets over plain data.

pub mod heatmap;
pub mod status;
