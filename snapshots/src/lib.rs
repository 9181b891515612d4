//! Nothing here: the crate exists for its test, `tests/views.rs`, which renders every view of
//! the app after a run on tiny models and compares it with the PNGs in `tests/snapshots/`.
