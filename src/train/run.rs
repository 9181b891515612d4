//! The training loop around [`Trainer`]: steps, validation, checkpoints, the final adapter and
//! the curves file, reporting each event to a callback that can stop the run.
//!
//! Output folder:
//! - `checkpoint-NNNNNN/`: PEFT adapter + `optimizer.safetensors` + `trainer_state.json`;
//! - `adapter/`: the final adapter in PEFT's format (load it with "Add LoRA adapter…",
//!   `--model BASE+OUT/adapter`, or `PeftModel.from_pretrained`);
//! - `curves.csv`: one row per step (every loss term, learning rate, gradient norm, tokens/s,
//!   and the validation loss on the steps where it was measured).

use std::fmt::Write as _;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use crate::cache::write_atomic;
use crate::error::{Error, Result};
use crate::train::checkpoint::{
    checkpoint_name, save_checkpoint, write_peft_adapter, DataSettings, TrainerState,
};
use crate::train::lora_trainer::{EvalReport, StepError, StepReport, Trainer};

/// What the loop reports.
#[derive(Clone, Debug)]
pub enum TrainEvent<'a> {
    /// An optimizer step finished.
    Step(&'a StepReport),
    /// A validation finished.
    Eval(&'a EvalReport),
    /// A checkpoint was written.
    Saved {
        /// After this many steps.
        step: usize,
        /// Where.
        dir: &'a Path,
    },
}

/// How a run ended.
#[derive(Clone, Debug)]
pub struct RunOutcome {
    /// Whether the callback stopped it before the last step.
    pub cancelled: bool,
    /// The final adapter folder (when an output folder was given and the run finished).
    pub adapter_dir: Option<PathBuf>,
    /// The last checkpoint written.
    pub last_checkpoint: Option<PathBuf>,
}

/// The new state of a run (no steps yet).
pub fn new_state(trainer: &Trainer, data: DataSettings, base_model: &str) -> TrainerState {
    TrainerState {
        step: 0,
        settings: trainer.settings().clone(),
        data,
        train_examples: trainer.train_len(),
        validation_examples: trainer.validation_len(),
        history: Vec::new(),
        evals: Vec::new(),
        base_model: base_model.to_owned(),
    }
}

/// `curves.csv` for a state.
pub fn curves_csv(state: &TrainerState) -> String {
    let term_names: Vec<String> = state
        .history
        .first()
        .map(|r| r.terms.iter().map(|(n, _)| n.clone()).collect())
        .unwrap_or_default();
    let metric_names: Vec<String> = state
        .history
        .first()
        .map(|r| r.metrics.iter().map(|(n, _)| n.clone()).collect())
        .unwrap_or_default();
    let mut out = String::from("step,loss");
    for name in &term_names {
        let _ = write!(out, ",loss_{name}");
    }
    for name in &metric_names {
        let _ = write!(out, ",{name}");
    }
    out.push_str(",learning_rate,grad_norm,tokens_per_s,seconds,validation_loss\n");
    for report in &state.history {
        let _ = write!(out, "{},{}", report.step, report.loss);
        for (_, value) in &report.terms {
            let _ = write!(out, ",{value}");
        }
        for name in &metric_names {
            let value = report
                .metrics
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.to_string())
                .unwrap_or_default();
            let _ = write!(out, ",{value}");
        }
        let val = state
            .evals
            .iter()
            .find(|e| e.step == report.step)
            .map(|e| e.loss.to_string())
            .unwrap_or_default();
        let _ = writeln!(
            out,
            ",{},{},{},{},{val}",
            report.learning_rate, report.grad_norm, report.tokens_per_s, report.seconds
        );
    }
    out
}

fn checkpoint(
    trainer: &Trainer,
    state: &mut TrainerState,
    out: &Path,
    last: &mut Option<PathBuf>,
    on_event: &mut dyn FnMut(TrainEvent<'_>) -> ControlFlow<()>,
) -> Result<()> {
    state.step = trainer.step_count();
    let dir = out.join(checkpoint_name(state.step));
    save_checkpoint(&dir, trainer, state)?;
    write_atomic(&out.join("curves.csv"), curves_csv(state).as_bytes())?;
    let _ = on_event(TrainEvent::Saved {
        step: state.step,
        dir: &dir,
    });
    *last = Some(dir);
    Ok(())
}

/// Runs `trainer` to its last step. With `out`, checkpoints go there every `save_every` steps,
/// when the callback stops the run, and at the end (plus `adapter/` and `curves.csv`). A NaN or
/// infinite loss stops the run with an error naming the last good checkpoint.
pub fn run(
    trainer: &mut Trainer,
    state: &mut TrainerState,
    out: Option<&Path>,
    on_event: &mut dyn FnMut(TrainEvent<'_>) -> ControlFlow<()>,
) -> Result<RunOutcome> {
    let mut last_checkpoint = None;
    if let Some(out) = out {
        std::fs::create_dir_all(out).map_err(|err| {
            Error::bad_file(out, format!("cannot create the output folder ({err})"))
        })?;
    }
    let settings = trainer.settings().clone();
    while !trainer.is_finished() {
        let report = match trainer.step() {
            Ok(report) => report,
            Err(StepError::NonFinite {
                what,
                step,
                last_good,
            }) => {
                let kept = last_checkpoint.as_ref().map_or_else(
                    || "no checkpoint was written yet".to_owned(),
                    |p: &PathBuf| format!("the last good checkpoint is {}", p.display()),
                );
                return Err(Error::invalid(
                    "training loss",
                    format!("became {what} at step {step} (after {last_good} good steps); {kept}"),
                ));
            }
            Err(StepError::Other(err)) => return Err(err),
        };
        state.history.push(report);
        let step = trainer.step_count();
        state.step = step;
        let stop = state
            .history
            .last()
            .is_some_and(|r| on_event(TrainEvent::Step(r)).is_break());
        let finished = trainer.is_finished();
        if (settings.eval_every > 0 && step % settings.eval_every == 0) || finished {
            if let Some(eval) = trainer.evaluate()? {
                state.evals.push(eval);
                if let Some(e) = state.evals.last() {
                    let _ = on_event(TrainEvent::Eval(e));
                }
            }
        }
        let periodic = settings.save_every > 0 && step % settings.save_every == 0;
        if let Some(out) = out {
            if periodic || finished || stop {
                checkpoint(trainer, state, out, &mut last_checkpoint, on_event)?;
            }
        }
        if stop && !finished {
            return Ok(RunOutcome {
                cancelled: true,
                adapter_dir: None,
                last_checkpoint,
            });
        }
    }
    let mut adapter_dir = None;
    if let Some(out) = out {
        if last_checkpoint.is_none() {
            checkpoint(trainer, state, out, &mut last_checkpoint, on_event)?;
        }
        let dir = out.join("adapter");
        let tmp = out.join(format!(".adapter.tmp-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp)
            .map_err(|err| Error::bad_file(&tmp, format!("cannot write the adapter ({err})")))?;
        write_peft_adapter(&tmp, trainer, &state.base_model)?;
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(|err| {
                Error::bad_file(&dir, format!("cannot replace the adapter ({err})"))
            })?;
        }
        std::fs::rename(&tmp, &dir)
            .map_err(|err| Error::bad_file(&dir, format!("cannot write the adapter ({err})")))?;
        adapter_dir = Some(dir);
    }
    Ok(RunOutcome {
        cancelled: false,
        adapter_dir,
        last_checkpoint,
    })
}
