//! Jobs and their execution. The GUI will run [`runner::run_job`] on a worker thread; the CLI
//! and the tests call it directly. Results are plain data (no tensors).

pub mod consistency;
pub mod forgetting;
pub mod handle;
pub mod iv;
pub mod job;
pub mod knowledge;
pub mod runner;
pub mod shift;
pub mod train;
pub mod weights;

pub use handle::{spawn, spawn_with, Busy, JobRunner, WorkerHandle};
pub use job::{Event, Job, JobId, JobOutput, LayerResult, Slot, SteerRequest};
pub use runner::{run_job, WorkerCtx};
