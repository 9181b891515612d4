//! The model worker thread: owns the loaded models, runs [`Job`]s one at a time, and reports
//! [`Event`]s over channels. A failing or panicking job becomes [`Event::Failed`] and the worker
//! keeps serving. Dropping the [`WorkerHandle`] closes the job channel and the thread exits.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError};

use crate::worker::job::{Event, Job, JobId};
use crate::worker::runner::{run_job, WorkerCtx};

/// Progress events are sent at most this often (tokens and results are never dropped).
const PROGRESS_INTERVAL: Duration = Duration::from_millis(100);

/// The front end's side of the worker.
pub struct WorkerHandle {
    job_tx: Sender<(JobId, Job)>,
    event_rx: Receiver<Event>,
    cancel: Arc<AtomicBool>,
    next_job_id: JobId,
}

/// The job queue is full; try again after the running job ends.
#[derive(Debug)]
pub struct Busy;

impl WorkerHandle {
    /// Queues a job without blocking.
    pub fn submit(&mut self, job: Job) -> Result<JobId, Busy> {
        let job_id = self.next_job_id;
        match self.job_tx.try_send((job_id, job)) {
            Ok(()) => {
                self.next_job_id += 1;
                Ok(job_id)
            }
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => Err(Busy),
        }
    }

    /// Asks the running job to stop at its next check.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Relaxed);
    }

    /// Events received so far, without blocking.
    pub fn events(&self) -> impl Iterator<Item = Event> + '_ {
        self.event_rx.try_iter()
    }

    /// Waits up to `timeout` for the next event (tests and scripts).
    pub fn recv_timeout(&self, timeout: Duration) -> Option<Event> {
        self.event_rx.recv_timeout(timeout).ok()
    }
}

/// Runs one job: [`run_job`] in the app; tests substitute their own.
pub type JobRunner = dyn FnMut(
        &mut WorkerCtx,
        JobId,
        Job,
        &mut dyn FnMut(Event),
    ) -> crate::error::Result<crate::worker::JobOutput>
    + Send;

/// Starts the worker thread; `wake_ui` is called after each event is sent (e.g. to request a
/// repaint).
pub fn spawn(wake_ui: impl Fn() + Send + 'static) -> std::io::Result<WorkerHandle> {
    spawn_with(wake_ui, Box::new(run_job))
}

/// Starts the worker thread with a custom job runner.
pub fn spawn_with(
    wake_ui: impl Fn() + Send + 'static,
    mut runner: Box<JobRunner>,
) -> std::io::Result<WorkerHandle> {
    let (job_tx, job_rx) = crossbeam_channel::bounded(16);
    let (event_tx, event_rx) = crossbeam_channel::bounded(256);
    let cancel = Arc::new(AtomicBool::new(false));
    std::thread::Builder::new()
        .name("model_worker".to_owned())
        .spawn({
            let cancel = cancel.clone();
            move || run(&job_rx, &event_tx, &cancel, &wake_ui, runner.as_mut())
        })?;
    Ok(WorkerHandle {
        job_tx,
        event_rx,
        cancel,
        next_job_id: 1,
    })
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_owned())
}

fn run(
    job_rx: &Receiver<(JobId, Job)>,
    event_tx: &Sender<Event>,
    cancel: &Arc<AtomicBool>,
    wake_ui: &dyn Fn(),
    runner: &mut JobRunner,
) {
    let mut ctx = WorkerCtx {
        cancel: cancel.clone(),
        ..WorkerCtx::default()
    };
    while let Ok((job_id, job)) = job_rx.recv() {
        cancel.store(false, Ordering::Relaxed);
        let mut last_progress: Option<Instant> = None;
        let mut emit = |event: Event| {
            if matches!(event, Event::Progress { .. }) {
                if last_progress.is_some_and(|t| t.elapsed() < PROGRESS_INTERVAL) {
                    return;
                }
                last_progress = Some(Instant::now());
            }
            if event_tx.send(event).is_ok() {
                wake_ui();
            }
        };
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
            runner(&mut ctx, job_id, job, &mut emit)
        }));
        let event = match result {
            Ok(Ok(output)) => Event::Finished { job_id, output },
            Ok(Err(crate::Error::Cancelled)) => Event::Cancelled { job_id },
            // With its chain (`{err:#}`), so a wrapped cause is not lost.
            Ok(Err(err)) => Event::Failed {
                job_id,
                error: format!("{err:#}"),
            },
            Err(payload) => {
                let message = panic_message(payload.as_ref());
                log::error!("job {job_id} panicked: {message}");
                Event::Failed {
                    job_id,
                    error: format!("internal error (the job crashed and was stopped): {message}"),
                }
            }
        };
        if event_tx.send(event).is_err() {
            break;
        }
        wake_ui();
    }
    log::debug!("model worker exits: the job channel closed");
}
