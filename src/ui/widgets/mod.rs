//! Reusable widgets over plain data.

pub mod status;
