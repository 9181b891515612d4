//! `tunelens train`: LoRA fine-tuning with a progress bar on stderr, checkpoints in PEFT's
//! format, `--resume`, and the curves as CSV.

use std::io::Write as _;
use std::path::PathBuf;

use clap::Args;

use crate::cli::{Cli, ModelArg};
use crate::error::Error;
use crate::train::checkpoint::DataSettings;
use crate::train::dataset::PromptTemplate;
use crate::train::lora_trainer::{Schedule, TrainSettings};
use crate::train::settings::{GuidanceSettings, Progressive};
use crate::train::stages::{read_plan, StagePlan};
use crate::worker::runner::{run_job, WorkerCtx};
use crate::worker::train::{TrainRequest, TrainUpdate};
use crate::worker::{Event, Job, JobOutput, Slot};

/// `tunelens train`.
#[derive(Debug, Args)]
pub struct TrainArgs {
    #[command(flatten)]
    model: ModelArg,
    /// Instruction data, JSONL: Alpaca (instruction, input, output), chat (messages) or
    /// prompt/completion lines.
    #[arg(long, required_unless_present_any = ["resume", "stages"])]
    data: Option<PathBuf>,
    /// Continual training (METHODS.md §5.3): a stage plan (JSON: {"stages": [{"name", "data",
    /// "settings"}]}, as the Fine-tune view saves it); each stage trains a fresh LoRA on the
    /// model with the earlier stages merged. Rerun with the same --out (or --resume the
    /// folder) to continue a stopped plan.
    #[arg(long, conflicts_with = "data")]
    stages: Option<PathBuf>,
    /// Output folder (default: `tunelens-runs/run-<unix time>`).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Continue a stopped run from its folder (or one checkpoint folder); its settings and
    /// data are reused, except a larger --steps.
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Optimizer steps.
    #[arg(long, default_value_t = 200, conflicts_with = "epochs")]
    steps: usize,
    /// Passes over the training split instead of --steps.
    #[arg(long)]
    epochs: Option<f64>,
    /// Examples per micro-batch.
    #[arg(long, default_value_t = 4)]
    batch_size: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    /// Peak learning rate (AdamW).
    #[arg(long, default_value_t = 1e-4)]
    lr: f64,
    /// Schedule after warm-up: constant, linear or cosine.
    #[arg(long, default_value = "constant")]
    schedule: String,
    /// Linear warm-up steps.
    #[arg(long, default_value_t = 0)]
    warmup: usize,
    /// LoRA rank.
    #[arg(long, default_value_t = 8)]
    rank: usize,
    /// LoRA alpha (scale alpha / rank).
    #[arg(long, default_value_t = 16.0)]
    alpha: f64,
    /// LoRA dropout.
    #[arg(long, default_value_t = 0.1)]
    dropout: f32,
    /// Target modules, comma-separated.
    #[arg(long, default_value = "q_proj,v_proj", value_delimiter = ',')]
    targets: Vec<String>,
    /// Global gradient-norm clip (0 disables).
    #[arg(long, default_value_t = 1.0)]
    max_grad_norm: f64,
    /// AdamW weight decay.
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    /// Prompt template: chat (the model's own) or definition (METHODS.md §5.1).
    #[arg(long, default_value = "chat")]
    template: String,
    /// Longest example in tokens (longer ones are cut and counted).
    #[arg(long, default_value_t = 512)]
    max_len: usize,
    /// Fraction of examples held out for validation.
    #[arg(long, default_value_t = 0.1)]
    val_fraction: f64,
    /// Validation every N steps (0: at the end only).
    #[arg(long, default_value_t = 20)]
    eval_every: usize,
    /// Checkpoint every N steps (0: at the end only).
    #[arg(long, default_value_t = 50)]
    save_every: usize,
    /// Seed of initialisation, data order and dropout.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// IV-guided training (METHODS.md §5.2): a saved instruction vector (`tunelens iv
    /// --save`); its head list is the head-preservation list.
    #[arg(long)]
    iv: Option<PathBuf>,
    /// Guidance version: code (FvForgetting's released code) or paper (the paper's
    /// description, reconstructed: progressive IV and λ·KL with λ = 0.05). Sets the defaults
    /// of the options below.
    #[arg(long, default_value = "code", requires = "iv")]
    guidance: String,
    /// The layer whose o_proj output gets the IV at the last prompt token.
    #[arg(long, requires = "iv")]
    iv_layer: Option<usize>,
    /// α1: weight of kl1 (last-prompt-token rows).
    #[arg(long, requires = "iv")]
    kl_alpha1: Option<f64>,
    /// α2: weight of kl2 (all rows).
    #[arg(long, requires = "iv")]
    kl_alpha2: Option<f64>,
    /// α_pr: weight of each head's preservation MSE.
    #[arg(long, requires = "iv")]
    pr_alpha: Option<f64>,
    /// Temperature of both KL terms.
    #[arg(long, requires = "iv")]
    tau: Option<f64>,
    /// A KL term counts only above this value.
    #[arg(long, requires = "iv")]
    kl_threshold: Option<f64>,
    /// A head's MSE counts only above this value.
    #[arg(long, requires = "iv")]
    mse_threshold: Option<f64>,
    /// Add the IV to the trainable pass with a scale going 1 → 0: linear, cosine, step:F
    /// (1 until fraction F of the run, then 0), or none.
    #[arg(long, requires = "iv")]
    progressive: Option<String>,
}

/// The guidance settings of the IV options (`None` without `--iv`).
fn guidance(args: &TrainArgs) -> anyhow::Result<Option<GuidanceSettings>> {
    let Some(path) = &args.iv else {
        return Ok(None);
    };
    let mut g = match args.guidance.as_str() {
        "code" => GuidanceSettings::code(path.clone()),
        "paper" => GuidanceSettings::paper(path.clone()),
        other => {
            return Err(
                Error::invalid("--guidance", format!("`{other}` (expected code or paper)")).into(),
            )
        }
    };
    let set = |slot: &mut f64, value: Option<f64>| {
        if let Some(v) = value {
            *slot = v;
        }
    };
    set(&mut g.kl_alpha1, args.kl_alpha1);
    set(&mut g.kl_alpha2, args.kl_alpha2);
    set(&mut g.pr_alpha, args.pr_alpha);
    set(&mut g.tau, args.tau);
    set(&mut g.kl_threshold, args.kl_threshold);
    set(&mut g.mse_threshold, args.mse_threshold);
    if let Some(layer) = args.iv_layer {
        g.layer = layer;
    }
    if let Some(p) = &args.progressive {
        g.progressive = if p == "none" {
            None
        } else {
            Some(Progressive::parse(p).ok_or_else(|| {
                Error::invalid(
                    "--progressive",
                    format!("`{p}` (expected linear, cosine, step:F with F in [0, 1], or none)"),
                )
            })?)
        };
    }
    Ok(Some(g))
}

fn request(args: &TrainArgs) -> anyhow::Result<TrainRequest> {
    let template = PromptTemplate::parse(&args.template).ok_or_else(|| {
        Error::invalid(
            "--template",
            format!("`{}` (expected chat or definition)", args.template),
        )
    })?;
    let schedule = Schedule::parse(&args.schedule).ok_or_else(|| {
        Error::invalid(
            "--schedule",
            format!("`{}` (expected constant, linear or cosine)", args.schedule),
        )
    })?;
    let mut settings = TrainSettings {
        learning_rate: args.lr,
        schedule,
        warmup_steps: args.warmup,
        steps: args.steps,
        batch_size: args.batch_size,
        grad_accum: args.grad_accum,
        max_grad_norm: args.max_grad_norm,
        weight_decay: args.weight_decay,
        eval_every: args.eval_every,
        save_every: args.save_every,
        seed: args.seed,
        ..TrainSettings::default()
    };
    settings.lora.rank = args.rank;
    settings.lora.alpha = args.alpha;
    settings.lora.dropout = args.dropout;
    settings.lora.targets = args.targets.iter().map(|t| t.trim().to_owned()).collect();
    settings.guidance = guidance(args)?;
    settings.validate()?;
    let out = args.out.clone().or_else(|| {
        if args.resume.is_some() {
            return None;
        }
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        Some(PathBuf::from(format!("tunelens-runs/run-{stamp}")))
    });
    Ok(TrainRequest {
        data: DataSettings {
            path: args.data.clone().unwrap_or_default(),
            template,
            max_len: args.max_len,
            validation_fraction: args.val_fraction,
        },
        settings,
        out,
        resume: args.resume.clone(),
    })
}

/// A training update on stderr: a progress line per step, a line per validation, checkpoint
/// and stage.
fn print_update(update: TrainUpdate, total: &mut usize) {
    match update {
        TrainUpdate::Stage { index, total, name } => {
            eprintln!("stage {} of {total}: {name}", index + 1);
        }
        TrainUpdate::Started { done, total: t, .. } => {
            *total = t;
            if done > 0 {
                eprintln!("resuming at step {done} of {t}");
            }
        }
        TrainUpdate::Step(r) => {
            #[allow(clippy::cast_precision_loss)]
            let frac = r.step as f32 / (*total).max(1) as f32;
            let _ = super::weights::progress_line(
                frac,
                &format!(
                    "step {}/{total} loss {:.4}{} lr {:.2e} |g| {:.3} {:.2} s/step {:.0} tok/s",
                    r.step,
                    r.loss,
                    term_summary(&r.terms),
                    r.learning_rate,
                    r.grad_norm,
                    r.seconds,
                    r.tokens_per_s
                ),
            );
        }
        TrainUpdate::Eval(e) => {
            eprintln!("step {}: validation loss {:.4}", e.step, e.loss);
        }
        TrainUpdate::Saved { step, dir } => {
            eprintln!("step {step}: checkpoint {}", dir.display());
        }
    }
}

/// Runs a training job, its updates on stderr.
fn run_training_job(ctx: &mut WorkerCtx, job: Job, total: &mut usize) -> anyhow::Result<JobOutput> {
    Ok(run_job(ctx, 2, job, &mut |event| {
        if let Event::Train { update, .. } = event {
            print_update(update, total);
        }
    })?)
}

/// `tunelens train --stages PLAN.json` (or `--resume` of a plan's folder).
fn run_stages(cli: &Cli, args: &TrainArgs, plan: StagePlan, out: PathBuf) -> anyhow::Result<()> {
    let mut ctx = WorkerCtx::default();
    super::load_models(cli, &mut ctx, &args.model.model, None)?;
    eprintln!(
        "{} stages into {}: {}",
        plan.stages.len(),
        out.display(),
        plan.stages
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let mut total = 0;
    let job = Job::TrainStages {
        slot: Slot::A,
        plan: Box::new(plan),
        out,
    };
    let output = run_training_job(&mut ctx, job, &mut total)?;
    let JobOutput::StagesTrained(output) = output else {
        anyhow::bail!("the continual training job returned another result");
    };
    let mut stdout = std::io::stdout().lock();
    if cli.json {
        writeln!(stdout, "{}", serde_json::to_string(&output)?)?;
        return Ok(());
    }
    for (i, run) in &output.runs {
        writeln!(
            stdout,
            "stage {} ({}): {} steps in {:.1} s{}",
            i + 1,
            output.names.get(*i).map_or("", String::as_str),
            run.state.step,
            run.seconds,
            if run.cancelled { ", stopped" } else { "" }
        )?;
    }
    for (i, dir) in output.combined.iter().enumerate() {
        writeln!(stdout, "after stage {}: {}", i + 1, dir.display())?;
    }
    if output.cancelled {
        writeln!(
            stdout,
            "stopped; continue with: tunelens train --model {} --resume {}",
            args.model.model,
            output.out.display()
        )?;
    } else {
        let stages: Vec<String> = (0..output.names.len())
            .map(|i| {
                format!(
                    "--adapter {}",
                    output
                        .out
                        .join(format!(
                            "stage-{:02}-{}/adapter",
                            i + 1,
                            crate::export::slug(&output.names[i])
                        ))
                        .display()
                )
            })
            .collect();
        writeln!(
            stdout,
            "forgetting: tunelens forgetting --model {} {}",
            args.model.model,
            stages.join(" ")
        )?;
    }
    Ok(())
}

/// ` (ce 1.23 kl1 0.40 ...)` when the loss has more than one term.
fn term_summary(terms: &[(String, f64)]) -> String {
    if terms.len() < 2 {
        return String::new();
    }
    let parts: Vec<String> = terms.iter().map(|(n, v)| format!("{n} {v:.3}")).collect();
    format!(" ({})", parts.join(" "))
}

pub(super) fn run(cli: &Cli, args: &TrainArgs) -> anyhow::Result<()> {
    if let Some(path) = &args.stages {
        let plan = read_plan(path)?;
        let out = args.out.clone().unwrap_or_else(|| {
            let stamp = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            PathBuf::from(format!("tunelens-runs/stages-{stamp}"))
        });
        return run_stages(cli, args, plan, out);
    }
    if let Some(dir) = args
        .resume
        .as_ref()
        .filter(|d| d.join("stages.json").exists())
    {
        let plan = read_plan(&dir.join("stages.json"))?;
        return run_stages(cli, args, plan, dir.clone());
    }
    let mut request = request(args)?;
    let mut ctx = WorkerCtx::default();
    super::load_models(cli, &mut ctx, &args.model.model, None)?;
    if request.resume.is_none() {
        // Bad data fails before the run starts, with the skipped lines listed.
        let preview = run_job(
            &mut ctx,
            1,
            Job::PreviewData {
                slot: Slot::A,
                data: request.data.clone(),
            },
            &mut |_| {},
        )?;
        let JobOutput::DataPreview(preview) = preview else {
            anyhow::bail!("the data preview returned another result");
        };
        let data = &preview.summary;
        for issue in &data.issues {
            eprintln!("{}:{issue} (skipped)", request.data.path.display());
        }
        if data.truncated > 0 {
            eprintln!(
                "warning: {} examples were cut to {} tokens",
                data.truncated, request.data.max_len
            );
        }
        if let Some(epochs) = args.epochs {
            let per_step = request.settings.batch_size * request.settings.grad_accum;
            #[allow(
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss,
                clippy::cast_precision_loss
            )]
            let steps = ((data.train as f64 * epochs) / per_step as f64).ceil() as usize;
            request.settings.steps = steps.max(1);
        }
        eprintln!(
            "{} training / {} validation examples from {}; {} steps of {} x {}",
            data.train,
            data.validation,
            data.path.display(),
            request.settings.steps,
            request.settings.batch_size,
            request.settings.grad_accum
        );
    }
    let mut total = request.settings.steps;
    let job = Job::Train {
        slot: Slot::A,
        request: Box::new(request),
    };
    let output = run_training_job(&mut ctx, job, &mut total)?;
    let JobOutput::Trained(output) = output else {
        anyhow::bail!("the training job returned another result");
    };
    let mut stdout = std::io::stdout().lock();
    if cli.json {
        writeln!(stdout, "{}", serde_json::to_string(&output)?)?;
        return Ok(());
    }
    let last = output.state.history.last();
    writeln!(
        stdout,
        "trained {} steps in {:.1} s ({} train / {} validation examples)",
        output.state.step, output.seconds, output.data.train, output.data.validation
    )?;
    if let Some(r) = last {
        writeln!(stdout, "last training loss {:.4}", r.loss)?;
    }
    if let Some(e) = output.state.evals.last() {
        writeln!(stdout, "validation loss {:.4} (step {})", e.loss, e.step)?;
    }
    if let Some(dir) = &output.adapter_dir {
        writeln!(stdout, "adapter {}", dir.display())?;
        writeln!(
            stdout,
            "compare: tunelens --model {} --model-b {}+{}",
            output.base_model,
            output.base_model,
            dir.display()
        )?;
    }
    if let Some(out) = &output.out {
        writeln!(
            stdout,
            "curves {} (figure: curves.svg, curves.png)",
            out.join("curves.csv").display()
        )?;
    }
    Ok(())
}
