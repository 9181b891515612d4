//! Reusable widgets over plain data.

pub mod heatmap;
pub mod plot;
pub mod status;
