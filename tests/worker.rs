//! The worker thread: jobs run off the caller's thread, tokens stream, cancel stops a job,
//! failures become events and the worker keeps serving.

use std::time::Duration;

use tunelens::model::generate::GenerateConfig;
use tunelens::model::tiny::{tiny_config, write_tiny_hf_folder};
use tunelens::model::{DeviceChoice, ModelSpec};
use tunelens::worker::runner::run_job;
use tunelens::worker::{spawn, spawn_with, Event, Job, JobId, JobOutput, Slot, WorkerHandle};

const WAIT: Duration = Duration::from_secs(5);

fn load_job(path: &str, slot: Slot) -> Job {
    Job::LoadModel {
        slot,
        spec: ModelSpec::parse(path),
        device: DeviceChoice::Cpu,
        dtype: tunelens::model::WeightDtype::F32,
        weights: tunelens::model::WeightStorage::F32,
    }
}

/// Collects events until the job finishes or fails.
fn wait_for(worker: &WorkerHandle, job_id: JobId) -> (Vec<Event>, Result<JobOutput, String>) {
    let mut seen = Vec::new();
    while let Some(event) = worker.recv_timeout(WAIT) {
        match &event {
            Event::Finished { job_id: id, output } if *id == job_id => {
                return (seen, Ok(output.clone()))
            }
            Event::Failed { job_id: id, error } if *id == job_id => {
                return (seen, Err(error.clone()))
            }
            Event::Cancelled { job_id: id } if *id == job_id => {
                return (seen, Err("cancelled".to_owned()))
            }
            _ => seen.push(event),
        }
    }
    panic!("job {job_id} did not end within {WAIT:?}");
}

#[test]
fn load_then_generate_streams_tokens_for_both_slots() {
    let dir = tempfile::tempdir().expect("temp dir");
    write_tiny_hf_folder(dir.path(), &tiny_config(), 1).expect("tiny folder");
    let path = dir.path().display().to_string();
    let mut worker = spawn(|| {}).expect("worker starts");
    for slot in [Slot::A, Slot::B] {
        let job_id = worker.submit(load_job(&path, slot)).expect("queued");
        let (_, result) = wait_for(&worker, job_id);
        assert!(matches!(result, Ok(JobOutput::Loaded { .. })), "{result:?}");
    }
    let job_id = worker
        .submit(Job::Generate {
            slots: vec![Slot::A, Slot::B],
            prompt: "write a poem".to_owned(),
            chat: true,
            cfg: GenerateConfig {
                max_new_tokens: 6,
                stop_at_eos: false,
                ..GenerateConfig::default()
            },
            steer: None,
            live_shift: Some(10),
        })
        .expect("queued");
    let (events, result) = wait_for(&worker, job_id);
    // Live shift: one class per B token, in order.
    let shifts: Vec<usize> = events
        .iter()
        .filter_map(|e| match e {
            Event::TokenShift { index, .. } => Some(*index),
            _ => None,
        })
        .collect();
    assert_eq!(shifts, (0..6).collect::<Vec<_>>());
    let tokens_a = events
        .iter()
        .filter(|e| matches!(e, Event::Token { slot: Slot::A, .. }))
        .count();
    let tokens_b = events
        .iter()
        .filter(|e| matches!(e, Event::Token { slot: Slot::B, .. }))
        .count();
    assert_eq!((tokens_a, tokens_b), (6, 6));
    // Lockstep: A and B alternate.
    let order: Vec<Slot> = events
        .iter()
        .filter_map(|e| match e {
            Event::Token { slot, .. } => Some(*slot),
            _ => None,
        })
        .collect();
    assert_eq!(&order[..4], &[Slot::A, Slot::B, Slot::A, Slot::B]);
    assert!(events.iter().any(|e| matches!(e, Event::Progress { .. })));
    let Ok(JobOutput::Generated(outputs)) = result else {
        panic!("unexpected {result:?}");
    };
    assert_eq!(outputs.len(), 2);
    // Same weights in both slots: same greedy response.
    assert_eq!(outputs[0].new_ids, outputs[1].new_ids);
}

#[test]
fn cancel_stops_a_generation_and_the_worker_keeps_serving() {
    let dir = tempfile::tempdir().expect("temp dir");
    write_tiny_hf_folder(dir.path(), &tiny_config(), 2).expect("tiny folder");
    let path = dir.path().display().to_string();
    // The wake-up callback runs on the worker after each event; slowing it makes sure the cancel
    // arrives while tokens are still being generated.
    let mut worker =
        spawn(|| std::thread::sleep(Duration::from_millis(20))).expect("worker starts");
    let job_id = worker.submit(load_job(&path, Slot::A)).expect("queued");
    assert!(wait_for(&worker, job_id).1.is_ok());
    let job_id = worker
        .submit(Job::Generate {
            slots: vec![Slot::A],
            prompt: "the cat".to_owned(),
            chat: false,
            cfg: GenerateConfig {
                max_new_tokens: 60,
                stop_at_eos: false,
                ..GenerateConfig::default()
            },
            steer: None,
            live_shift: None,
        })
        .expect("queued");
    // Cancel after the first token arrives.
    loop {
        match worker.recv_timeout(WAIT) {
            Some(Event::Token { .. }) => break,
            Some(_) => {}
            None => panic!("no token within {WAIT:?}"),
        }
    }
    worker.cancel();
    let (_, result) = wait_for(&worker, job_id);
    let Ok(JobOutput::Generated(outputs)) = result else {
        panic!("unexpected {result:?}");
    };
    assert_eq!(
        outputs[0].stop_reason,
        tunelens::model::generate::StopReason::Cancelled
    );
    assert!(outputs[0].new_ids.len() < 60);
    // Still serving.
    let job_id = worker
        .submit(Job::Tokenize {
            slot: Slot::A,
            text: "the dog".to_owned(),
        })
        .expect("queued");
    assert!(matches!(
        wait_for(&worker, job_id).1,
        Ok(JobOutput::Tokens(_))
    ));
}

#[test]
fn failures_are_events_in_plain_words() {
    let mut worker = spawn(|| {}).expect("worker starts");
    let job_id = worker
        .submit(load_job("/no/such/model", Slot::A))
        .expect("queued");
    let (_, result) = wait_for(&worker, job_id);
    let error = result.expect_err("load fails");
    assert!(error.contains("/no/such/model"), "{error}");
    let job_id = worker
        .submit(Job::Tokenize {
            slot: Slot::B,
            text: "x".to_owned(),
        })
        .expect("queued");
    let error = wait_for(&worker, job_id).1.expect_err("empty slot");
    assert!(error.contains("slot B has no model"), "{error}");
}

#[test]
fn a_panicking_job_is_contained_and_the_worker_keeps_serving() {
    // A runner that panics on one kind of job and runs the rest normally.
    let mut worker = spawn_with(
        || {},
        Box::new(|ctx, job_id, job, emit| match job {
            Job::Tokenize { ref text, .. } if text == "boom" => panic!("simulated crash in a job"),
            job => run_job(ctx, job_id, job, emit),
        }),
    )
    .expect("worker starts");
    let job_id = worker
        .submit(Job::Tokenize {
            slot: Slot::A,
            text: "boom".to_owned(),
        })
        .expect("queued");
    let error = wait_for(&worker, job_id)
        .1
        .expect_err("the panic becomes a failure");
    assert!(
        error.contains("internal error") && error.contains("simulated crash"),
        "{error}"
    );
    let dir = tempfile::tempdir().expect("temp dir");
    write_tiny_hf_folder(dir.path(), &tiny_config(), 3).expect("tiny folder");
    let job_id = worker
        .submit(load_job(&dir.path().display().to_string(), Slot::A))
        .expect("queued");
    assert!(matches!(
        wait_for(&worker, job_id).1,
        Ok(JobOutput::Loaded { .. })
    ));
}

#[test]
fn a_load_reports_progress_and_can_be_cancelled() {
    let demo = crate::common::demo_model_path().display().to_string();
    let mut worker = spawn(|| {}).expect("worker starts");
    // A full load: progress rises to near 1 before the result.
    let job_id = worker.submit(load_job(&demo, Slot::A)).expect("queued");
    let (events, result) = wait_for(&worker, job_id);
    assert!(matches!(result, Ok(JobOutput::Loaded { .. })), "{result:?}");
    let fracs: Vec<f32> = events
        .iter()
        .filter_map(|e| match e {
            Event::Progress { frac, .. } => Some(*frac),
            _ => None,
        })
        .collect();
    assert!(!fracs.is_empty());
    assert!(fracs.windows(2).all(|w| w[0] <= w[1]), "{fracs:?}");
    // A cancelled load into B: the job ends as cancelled and B stays empty.
    let job_id = worker.submit(load_job(&demo, Slot::B)).expect("queued");
    match worker.recv_timeout(WAIT) {
        Some(Event::Progress { .. }) => {}
        other => panic!("expected progress first, got {other:?}"),
    }
    worker.cancel();
    let error = wait_for(&worker, job_id).1.expect_err("cancelled");
    assert_eq!(error, "cancelled");
    let job_id = worker
        .submit(Job::Tokenize {
            slot: Slot::B,
            text: "x".to_owned(),
        })
        .expect("queued");
    assert!(wait_for(&worker, job_id)
        .1
        .is_err_and(|e| e.contains("slot B has no model")));
}
