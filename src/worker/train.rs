//! LoRA fine-tuning as the worker and the CLI run it: the data set read and split, a trainer
//! built on a copy of a slot's model (the slot itself is never modified), the loop run with
//! checkpoints, and a resumed run rebuilt from its last checkpoint.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::adapter::{attach_peft_adapter, merge_adapters};
use crate::model::LoadedModel;
use crate::train::checkpoint::{find_checkpoint, read_state, restore, DataSettings, TrainerState};
use crate::train::dataset::{self, Dataset, Renderer, SplitOptions};
use crate::train::guidance::Guidance;
use crate::train::lora_trainer::{EvalReport, StepReport, TrainSettings, Trainer};
use crate::train::run::{new_state, run, TrainEvent};
use crate::train::stages::{write_combined_adapter, write_plan, StagePlan};

pub use crate::train::results::{DataPreview, DataSummary, PreviewRow, TrainEstimate, TrainOutput};

/// The shipped instruction set (written for this project; `sample_prompts/instructions.jsonl`),
/// used when a request names no data file.
pub const DEFAULT_DATA: &str = include_str!("../../sample_prompts/instructions.jsonl");

/// The shipped set as a file (written once into the cache folder): training records data by
/// path, so a resumed run finds the same file.
pub fn default_data_path() -> Result<PathBuf> {
    let path = crate::cache::cache_dir()
        .ok_or_else(|| {
            Error::invalid(
                "cache folder",
                "set HOME, XDG_CACHE_HOME or TUNELENS_CACHE_DIR to use the shipped data set",
            )
        })?
        .join("instructions.jsonl");
    let current = std::fs::read_to_string(&path).ok();
    if current.as_deref() != Some(DEFAULT_DATA) {
        crate::cache::write_atomic(&path, DEFAULT_DATA.as_bytes())?;
    }
    Ok(path)
}

/// `(year, month, day, hour, minute)` in UTC of a Unix time (days-from-civil inverted, after
/// Howard Hinnant's date algorithms).
fn utc_civil(secs: u64) -> (i64, u32, u32, u32, u32) {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (
        year,
        month,
        day,
        (rem / 3600) as u32,
        ((rem % 3600) / 60) as u32,
    )
}

/// A model or data name in a run folder's name: [`crate::export::slug`], at most 40 characters.
fn run_name_part(name: &str) -> String {
    crate::export::slug(name).chars().take(40).collect()
}

/// A new, unique run folder under `$XDG_DATA_HOME/tunelens/runs` (or
/// `~/.local/share/tunelens/runs`), named by the date, the model and the data set:
/// `2026-11-30_1305_SmolLM2-135M-Instruct_instructions`.
pub fn new_run_dir(model: &str, data: &str) -> PathBuf {
    let base = std::env::var_os("XDG_DATA_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("."))
        .join("tunelens")
        .join("runs");
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (y, mo, d, h, mi) = utc_civil(secs);
    let name = [
        format!("{y:04}-{mo:02}-{d:02}_{h:02}{mi:02}"),
        run_name_part(model),
        run_name_part(data),
    ]
    .into_iter()
    .filter(|p| !p.is_empty())
    .collect::<Vec<_>>()
    .join("_");
    let mut dir = base.join(&name);
    let mut n = 2;
    while dir.exists() {
        dir = base.join(format!("{name}-{n}"));
        n += 1;
    }
    dir
}

/// The request's data settings with an empty path replaced by the shipped set.
fn resolve_data(data: &DataSettings) -> Result<DataSettings> {
    let mut data = data.clone();
    if data.path.as_os_str().is_empty() {
        data.path = default_data_path()?;
    }
    Ok(data)
}

/// Everything a training run needs besides the model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainRequest {
    /// Data file and preparation.
    pub data: DataSettings,
    /// Trainer settings.
    pub settings: TrainSettings,
    /// Output folder (checkpoints, `adapter/`, `curves.csv`); `None` keeps everything in memory.
    pub out: Option<PathBuf>,
    /// Resume from this run folder or checkpoint (its settings and data win over the ones
    /// above, except a larger step count).
    pub resume: Option<PathBuf>,
}

/// The `--model` string of a loaded model (for `adapter_config.json` and "Load as B").
pub fn base_spec(loaded: &LoadedModel) -> String {
    loaded.info.source.clone()
}

fn summary(data: &Dataset) -> DataSummary {
    DataSummary {
        path: data.path.clone(),
        train: data.train.len(),
        validation: data.validation.len(),
        issues: data.issues.clone(),
        truncated: data.truncated,
        train_label_tokens: data.train.iter().map(dataset::Example::label_count).sum(),
        train_tokens: data.train.iter().map(|e| e.ids.len()).sum(),
    }
}

/// The renderer of `loaded` for `data` (the length capped at the model's context).
fn renderer<'a>(loaded: &'a LoadedModel, data: &DataSettings) -> Renderer<'a> {
    Renderer {
        tokenizer: &loaded.tokenizer,
        chat_template: loaded.chat_template.as_ref(),
        template: data.template,
        max_len: data
            .max_len
            .min(loaded.model.config().max_position_embeddings),
    }
}

/// Tokenises and splits already parsed records.
fn build_dataset(
    loaded: &LoadedModel,
    data: &DataSettings,
    parsed: &dataset::Parsed,
    seed: u64,
) -> Result<Dataset> {
    if data.max_len < 2 {
        return Err(Error::invalid("max length", "must be at least 2 tokens"));
    }
    dataset::build(
        &data.path,
        parsed,
        &renderer(loaded, data),
        SplitOptions {
            validation_fraction: data.validation_fraction,
            seed,
        },
    )
}

/// Reads, renders, tokenises and splits the data file.
pub fn prepare(loaded: &LoadedModel, data: &DataSettings, seed: u64) -> Result<Dataset> {
    let data = &resolve_data(data)?;
    let parsed = dataset::read_jsonl(&data.path)?;
    build_dataset(loaded, data, &parsed, seed)
}

/// The summary and the first `n` examples as rendered text (the file is read once).
pub fn preview(loaded: &LoadedModel, data: &DataSettings, n: usize) -> Result<DataPreview> {
    let data = &resolve_data(data)?;
    let parsed = dataset::read_jsonl(&data.path)?;
    let renderer = renderer(loaded, data);
    let mut rows = Vec::new();
    for (line, record) in parsed.records.iter().take(n) {
        let Ok(pieces) = renderer.pieces(record) else {
            continue;
        };
        let (mut prompt, mut response) = (String::new(), String::new());
        for (text, label) in pieces {
            if label {
                response.push_str(&text);
            } else if response.is_empty() {
                prompt.push_str(&text);
            } else {
                response.push_str(&text);
            }
        }
        let (tokens, label_tokens) = renderer
            .encode(*line, record)
            .map_or((0, 0), |e| (e.ids.len(), e.label_count()));
        rows.push(PreviewRow {
            line: *line,
            format: record.format().to_owned(),
            prompt,
            response,
            tokens,
            label_tokens,
        });
    }
    let data_set = build_dataset(loaded, data, &parsed, 0)?;
    Ok(DataPreview {
        summary: summary(&data_set),
        rows,
    })
}

fn check_base(loaded: &LoadedModel) -> Result<()> {
    if let Some(adapter) = &loaded.info.adapter {
        return Err(Error::invalid(
            "base model",
            format!(
                "it already carries the LoRA adapter {}; load the plain base model to train",
                adapter.path
            ),
        ));
    }
    Ok(())
}

fn pad_id(loaded: &LoadedModel) -> u32 {
    loaded.tokenizer.eos.as_ref().map_or(0, |(_, id)| *id)
}

/// The guidance of a run's settings, its vector read from disk and checked against the model
/// (a vector of another hidden size or depth is an error; one made with other weights, e.g.
/// the base of the model being tuned, is logged).
pub fn load_guidance(loaded: &LoadedModel, settings: &TrainSettings) -> Result<Option<Guidance>> {
    let Some(g) = &settings.guidance else {
        return Ok(None);
    };
    let saved = crate::ivfile::load(&g.iv_path)?;
    let cfg = loaded.model.config();
    if let Some(warning) = crate::ivfile::check_model(
        &saved,
        cfg.hidden_size,
        cfg.num_hidden_layers,
        &crate::worker::iv::fingerprint(loaded)?,
        &loaded.info.display_name(),
    )? {
        log::info!("{}: {warning}", g.iv_path.display());
    }
    Guidance::new(
        g.clone(),
        &saved.vector,
        saved.meta.head_list.clone(),
        &loaded.model,
    )
    .map(Some)
}

/// Builds the trainer for a request: fresh adapters, or the state of the checkpoint to resume.
fn build(
    loaded: &LoadedModel,
    request: &TrainRequest,
) -> Result<(Trainer, TrainerState, Dataset, Option<PathBuf>)> {
    check_base(loaded)?;
    let base = base_spec(loaded);
    if let Some(resume) = &request.resume {
        let ckpt = find_checkpoint(resume)?;
        let mut state = read_state(&ckpt)?;
        if request.settings.steps > state.settings.steps {
            state.settings.steps = request.settings.steps;
        }
        let data = prepare(loaded, &state.data, state.settings.seed)?;
        if data.train.len() != state.train_examples
            || data.validation.len() != state.validation_examples
        {
            return Err(Error::bad_file(
                &state.data.path,
                format!(
                    "the data changed since the checkpoint ({} + {} examples now, {} + {} then)",
                    data.train.len(),
                    data.validation.len(),
                    state.train_examples,
                    state.validation_examples
                ),
            ));
        }
        let mut trainer = Trainer::new(
            loaded.model.clone(),
            state.settings.clone(),
            data.train.clone(),
            data.validation.clone(),
            pad_id(loaded),
        )?;
        if let Some(g) = load_guidance(loaded, &state.settings)? {
            trainer.set_guidance(g);
        }
        restore(&ckpt, &mut trainer, &state)?;
        // A resumed run keeps writing into the folder it came from.
        let out = request.out.clone().or_else(|| {
            if resume.join("trainer_state.json").exists() {
                ckpt.parent().map(Path::to_path_buf)
            } else {
                Some(resume.clone())
            }
        });
        return Ok((trainer, state, data, out));
    }
    let data_settings = resolve_data(&request.data)?;
    let data = prepare(loaded, &data_settings, request.settings.seed)?;
    let mut trainer = Trainer::new(
        loaded.model.clone(),
        request.settings.clone(),
        data.train.clone(),
        data.validation.clone(),
        pad_id(loaded),
    )?;
    if let Some(g) = load_guidance(loaded, &request.settings)? {
        trainer.set_guidance(g);
    }
    let state = new_state(&trainer, data_settings, &base);
    Ok((trainer, state, data, request.out.clone()))
}

/// What the run reports while it goes.
#[derive(Clone, Debug)]
pub enum TrainProgress<'a> {
    /// Ready to run: the steps already done (non-zero when resuming) and the total.
    Started {
        /// Steps done.
        done: usize,
        /// Steps in the run.
        total: usize,
        /// Loss term names.
        terms: Vec<String>,
    },
    /// A loop event.
    Event(TrainEvent<'a>),
}

/// Runs (or resumes) a training run. `on_progress` returning `Break` stops it after the
/// current step, with a checkpoint to resume from.
pub fn run_training(
    loaded: &LoadedModel,
    request: &TrainRequest,
    on_progress: &mut dyn FnMut(TrainProgress<'_>) -> ControlFlow<()>,
) -> Result<TrainOutput> {
    let started = Instant::now();
    let (mut trainer, mut state, data, out) = build(loaded, request)?;
    let _ = on_progress(TrainProgress::Started {
        done: trainer.step_count(),
        total: trainer.settings().steps,
        terms: trainer.term_names(),
    });
    let outcome = run(&mut trainer, &mut state, out.as_deref(), &mut |event| {
        on_progress(TrainProgress::Event(event))
    })?;
    let output = TrainOutput {
        base_model: state.base_model.clone(),
        data: summary(&data),
        state,
        out,
        adapter_dir: outcome.adapter_dir,
        last_checkpoint: outcome.last_checkpoint,
        cancelled: outcome.cancelled,
        seconds: started.elapsed().as_secs_f64(),
    };
    if let Some(dir) = &output.out {
        // The curves figure beside curves.csv, from the GUI and the CLI alike (a stopped run's
        // too); the adapter is safe already, so a failed figure is only a warning.
        if let Err(err) = crate::export::views::write_run_figure(dir, &output) {
            log::warn!(
                "cannot write the curves figure into {}: {err}",
                dir.display()
            );
        }
    }
    Ok(output)
}

/// The result of a continual run: each stage's run (finished, or the one that stopped).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StagesOutput {
    /// The plan's output folder.
    pub out: PathBuf,
    /// Stage names, in order.
    pub names: Vec<String>,
    /// The runs done in this invocation, as `(stage index, run)`; stages found finished on
    /// disk are skipped and not listed.
    pub runs: Vec<(usize, TrainOutput)>,
    /// Each finished stage's own adapter (relative to the model with the earlier stages
    /// merged), by stage.
    pub adapters: Vec<PathBuf>,
    /// Each finished stage's combined adapter (base + stages 1..=k merged), by stage.
    pub combined: Vec<PathBuf>,
    /// Whether the run was stopped before the last stage finished.
    pub cancelled: bool,
}

/// Progress of a continual run: the stage, and its run's own progress.
#[derive(Clone, Debug)]
pub struct StageProgress<'a> {
    /// 0-based stage index.
    pub stage: usize,
    /// Stages in the plan.
    pub stages: usize,
    /// The stage's run progress.
    pub progress: TrainProgress<'a>,
}

/// Runs a plan (or resumes it: finished stages are recognised by their `adapter/`, a stopped
/// stage resumes from its last checkpoint). Before each stage, the earlier stages' adapters are
/// merged into a copy of the slot's model (METHODS.md §5.3); each stage trains a fresh LoRA.
pub fn run_stages(
    loaded: &LoadedModel,
    plan: &StagePlan,
    out: &Path,
    on_progress: &mut dyn FnMut(StageProgress<'_>) -> ControlFlow<()>,
) -> Result<StagesOutput> {
    check_base(loaded)?;
    plan.validate()?;
    std::fs::create_dir_all(out)
        .map_err(|e| Error::bad_file(out, format!("cannot create the output folder ({e})")))?;
    write_plan(&out.join("stages.json"), plan)?;
    let mut current = loaded.clone();
    let mut output = StagesOutput {
        out: out.to_path_buf(),
        names: plan.stages.iter().map(|s| s.name.clone()).collect(),
        runs: Vec::new(),
        adapters: Vec::new(),
        combined: Vec::new(),
        cancelled: false,
    };
    let mut adapters = Vec::new();
    for (i, stage) in plan.stages.iter().enumerate() {
        let dir = plan.stage_dir(out, i);
        let adapter = dir.join("adapter");
        if !adapter.join("adapter_model.safetensors").exists() {
            let resume = dir.exists() && find_checkpoint(&dir).is_ok();
            let request = TrainRequest {
                data: stage.data.clone(),
                settings: stage.settings.clone(),
                out: Some(dir.clone()),
                resume: resume.then(|| dir.clone()),
            };
            let run = run_training(&current, &request, &mut |progress| {
                on_progress(StageProgress {
                    stage: i,
                    stages: plan.stages.len(),
                    progress,
                })
            })
            .map_err(|e| {
                Error::invalid(format!("stage {} ({})", i + 1, stage.name), e.to_string())
            })?;
            let cancelled = run.cancelled;
            output.runs.push((i, run));
            if cancelled {
                output.cancelled = true;
                return Ok(output);
            }
        }
        adapters.push(adapter.clone());
        let combined = dir.join("combined-adapter");
        write_combined_adapter(&adapters, &combined, &base_spec(loaded))?;
        output.combined.push(combined);
        output.adapters.push(adapter.clone());
        attach_peft_adapter(&mut current.model, &adapter)?;
        merge_adapters(&mut current.model)?;
    }
    Ok(output)
}

fn rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// Measures a few steps of the request on a throwaway trainer (nothing is written) and
/// extrapolates the run's time and memory.
pub fn estimate(
    loaded: &LoadedModel,
    request: &TrainRequest,
    measured_steps: usize,
    on_step: &mut dyn FnMut(usize) -> ControlFlow<()>,
) -> Result<TrainEstimate> {
    let mut request = request.clone();
    request.out = None;
    request.resume = None;
    let steps = measured_steps.max(1);
    let total_steps = request.settings.steps;
    request.settings.steps = steps + 1;
    let before = rss_mb().unwrap_or(0.0);
    let (mut trainer, _, _, _) = build(loaded, &request)?;
    let trainable = trainer
        .params()
        .iter()
        .map(|p| p.a.elem_count() + p.b.elem_count())
        .sum();
    let mut times = Vec::new();
    for i in 0..=steps {
        let report = trainer.step().map_err(|err| match err {
            crate::train::lora_trainer::StepError::Other(err) => err,
            other @ crate::train::lora_trainer::StepError::NonFinite { .. } => {
                Error::invalid("training loss", other.to_string())
            }
        })?;
        if i > 0 {
            times.push(report.seconds);
        }
        if on_step(i).is_break() {
            return Err(Error::Cancelled);
        }
    }
    times.sort_by(f64::total_cmp);
    let seconds_per_step = times[times.len() / 2];
    #[allow(clippy::cast_precision_loss)]
    let total_s = seconds_per_step * total_steps as f64;
    Ok(TrainEstimate {
        seconds_per_step,
        measured_steps: steps,
        total_s,
        extra_memory_mb: (rss_mb().unwrap_or(before) - before).max(0.0),
        trainable_params: trainable,
    })
}

/// Compact forms of loop events for channels (owned, serialisable).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum TrainUpdate {
    /// A stage of a continual run starts (its run's own updates follow).
    Stage {
        /// 0-based index.
        index: usize,
        /// Stages in the plan.
        total: usize,
        /// Its name.
        name: String,
    },
    /// The run started (resumed runs start at `done > 0`).
    Started {
        /// Steps done.
        done: usize,
        /// Steps in the run.
        total: usize,
        /// Loss term names.
        terms: Vec<String>,
    },
    /// A step finished.
    Step(StepReport),
    /// A validation finished.
    Eval(EvalReport),
    /// A checkpoint was written.
    Saved {
        /// After this many steps.
        step: usize,
        /// Where.
        dir: PathBuf,
    },
}

impl TrainUpdate {
    /// The owned form of a progress report.
    pub fn from_progress(progress: &TrainProgress<'_>) -> Self {
        match progress {
            TrainProgress::Started { done, total, terms } => Self::Started {
                done: *done,
                total: *total,
                terms: terms.clone(),
            },
            TrainProgress::Event(TrainEvent::Step(r)) => Self::Step((*r).clone()),
            TrainProgress::Event(TrainEvent::Eval(e)) => Self::Eval((*e).clone()),
            TrainProgress::Event(TrainEvent::Saved { step, dir }) => Self::Saved {
                step: *step,
                dir: dir.to_path_buf(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{run_name_part, utc_civil};

    #[test]
    fn run_folder_names_read_as_dates() {
        assert_eq!(utc_civil(0), (1970, 1, 1, 0, 0));
        // 2026-11-30 13:05 UTC.
        assert_eq!(utc_civil(1_796_043_900), (2026, 11, 30, 13, 5));
        assert_eq!(utc_civil(951_782_400), (2000, 2, 29, 0, 0));
        assert_eq!(
            run_name_part("SmolLM2 135M + lora/adapter"),
            "SmolLM2-135M-lora-adapter"
        );
    }
}
