//! The headless command line. Each subcommand builds [`Job`]s and runs them with
//! [`run_job`], exactly as the GUI's worker does, then prints JSON (`--json`) or text.

use std::io::Write as _;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};

use crate::model::generate::{GenerateConfig, Sampling};
use crate::model::{DeviceChoice, ModelSpec, WeightDtype, WeightStorage};
use crate::worker::job::{Job, JobOutput, Slot};
use crate::worker::runner::{run_job, WorkerCtx};

mod attribute;
mod consistency;
mod forgetting;
mod iv;
mod knowledge;
mod shift;
mod train;
mod weights;

pub use consistency::ConsistencyArgs;
pub use iv::IvArgs;
pub use knowledge::KnowledgeArgs;
pub use shift::{LensArgs, ShiftArgs};
pub use train::TrainArgs;
pub use weights::{ConceptsArgs, HeadsArgs};

/// Compare a base and an instruction-tuned language model.
#[derive(Debug, Parser)]
#[command(name = "tunelens", version, about)]
pub struct Cli {
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    /// Compute device: cpu or cuda.
    #[arg(long, global = true, default_value = "cpu")]
    pub device: DeviceChoice,
    /// Weight dtype: f32 (default; what the analyses are specified in), f16 or bf16.
    #[arg(long, global = true, default_value = "f32")]
    pub dtype: WeightDtype,
    /// Weights in memory: f32 (default; expanded at load) or stored (f16/bf16 and GGUF's
    /// quantised blocks kept as they are and expanded a tile at a time; CPU only). The GUI
    /// keeps its saved choice unless this is given.
    #[arg(long, global = true)]
    pub weights: Option<WeightStorage>,
    /// Preload slot A when opening the GUI (a HF folder, a .gguf file, or BASE+ADAPTER).
    #[arg(long)]
    pub model: Option<String>,
    /// Preload slot B when opening the GUI.
    #[arg(long = "model-b")]
    pub model_b: Option<String>,
    /// The subcommand; none opens the GUI.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// `--model PATH`.
#[derive(Debug, Args)]
pub struct ModelArg {
    /// A Hugging Face folder, a .gguf file, or BASE_PATH+ADAPTER_PATH.
    #[arg(long)]
    pub model: String,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Architecture, sizes, dtype, device and load time of a model.
    Info {
        #[command(flatten)]
        model: ModelArg,
    },
    /// Token ids and strings of a text.
    Tokenize {
        #[command(flatten)]
        model: ModelArg,
        /// The text.
        #[arg(long)]
        text: String,
    },
    /// Logits of one forward pass: the full last-position vector and the top k per position.
    Forward {
        #[command(flatten)]
        model: ModelArg,
        /// The text.
        #[arg(long)]
        text: String,
        /// Logits reported per position.
        #[arg(long, default_value_t = 5)]
        top_k: usize,
    },
    /// Gradient x input attribution of a response to its prompt (METHODS.md §1): the raw and
    /// quantised matrices, importance density and, with --instruction, the instruction score.
    Attribute(AttributeArgs),
    /// PCA concepts of the feed-forward layers (METHODS.md §2): per layer, the principal
    /// directions of the down_proj value vectors and their top words. TSV rows stream to stdout;
    /// with --model-b, B's components are aligned to A's (§2.3, an extension).
    Concepts(ConceptsArgs),
    /// Word pairs of the attention heads' QK circuits (METHODS.md §3). TSV rows stream to
    /// stdout; with --model-b, the instruction-verb change rate from A to B (§3.5).
    Heads(HeadsArgs),
    /// Consistency (METHODS.md §7-§9): paraphrase representation distances and their relative
    /// difference per layer, prediction consistency of factual probes, accuracy spread across
    /// paraphrased instructions, attribute and extraction rates by layer.
    Consistency(ConsistencyArgs),
    /// LoRA fine-tuning (METHODS.md §5.3 defaults): checkpoints in PEFT's format, the final
    /// adapter in OUT/adapter, curves in OUT/curves.csv; --resume continues a stopped run.
    Train(TrainArgs),
    /// Merge a PEFT LoRA adapter into its base model and write a Hugging Face folder
    /// (config.json, model.safetensors, tokenizer files).
    Merge {
        /// BASE_PATH+ADAPTER_PATH.
        #[arg(long)]
        model: String,
        /// The folder to write.
        #[arg(long)]
        out: std::path::PathBuf,
    },
    /// Generate a response (greedy unless --temperature is given).
    Generate {
        #[command(flatten)]
        model: ModelArg,
        /// The prompt.
        #[arg(long)]
        prompt: String,
        /// Wrap the prompt in the model's chat template.
        #[arg(long)]
        chat: bool,
        /// Upper bound on new tokens.
        #[arg(long, default_value_t = 128)]
        max_new_tokens: usize,
        /// Sample with this temperature instead of greedy decoding.
        #[arg(long)]
        temperature: Option<f64>,
        /// Nucleus sampling threshold (with --temperature).
        #[arg(long, default_value_t = 1.0)]
        top_p: f64,
        /// Random seed (with --temperature).
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Stop when this string appears (repeatable).
        #[arg(long = "stop")]
        stop: Vec<String>,
        /// Steer with a saved instruction vector (`tunelens iv --out`): added to the output of
        /// --iv-layer at the last prompt token.
        #[arg(long)]
        iv: Option<std::path::PathBuf>,
        /// The layer the vector is added after (default: the best layer of its own sweep).
        #[arg(long = "iv-layer", requires = "iv")]
        iv_layer: Option<usize>,
        /// Multiplies the vector.
        #[arg(long = "iv-scale", requires = "iv", default_value_t = 1.0)]
        iv_scale: f32,
        /// Add the vector at every generated token too.
        #[arg(long = "iv-every-token", requires = "iv")]
        iv_every_token: bool,
    },
    /// Instruction vectors (METHODS.md §4): the heads whose mean outputs carry an in-context
    /// task (causal mediation), their summed vector, and zero-shot accuracy with it added at
    /// each layer; with --model-b, A's and B's heads side by side.
    Iv(IvArgs),
    /// Knowledge consistency (METHODS.md §10a): multiple-choice questions put to a base model
    /// (5-shot) and each tuned model (0-shot, chat or Vicuna template); per question the rank
    /// correlation and KL of their answer distributions, accuracies, and across 3 or more tuned
    /// models the partial correlation of consistency and tuned accuracy given base accuracy.
    Knowledge(KnowledgeArgs),
    /// Token distribution shift (METHODS.md §6, §10b): for the tuned models' responses, where
    /// the base model would have picked the same token (unshifted), nearly (marginal) or not
    /// (shifted); ratios, the most shifted tokens, where in a response shifts sit, metrics by
    /// position. Repeat --model-b for several fine-tunes of one base.
    Shift(ShiftArgs),
    /// The logit lens of one or two models at one position: the rank and probability of B's
    /// next token when each layer's residual stream is read through the final norm and the
    /// unembedding.
    Lens(LensArgs),
    /// The forgetting evaluation (METHODS.md §5.5): general, in-context and task scores
    /// (ROUGE-L F1 of greedy answers) and P_know / P_inst of a base model and of each stage
    /// built on it (--adapter per stage).
    Forgetting(forgetting::ForgettingArgs),
}

/// `tunelens attribute`.
#[derive(Debug, Args)]
pub struct AttributeArgs {
    #[command(flatten)]
    model: ModelArg,
    /// A second model (slot B), attributed beside the first for a side-by-side figure.
    #[arg(long = "model-b")]
    model_b: Option<String>,
    /// The prompt.
    #[arg(long, required_unless_present = "prompts", conflicts_with = "prompts")]
    prompt: Option<String>,
    /// Batch mode: a JSONL file, one prompt per line, either a JSON string or an object
    /// `{"prompt": .., "response"?: .., "instructions"?: [..], "id"?: ..}`; one JSON result per
    /// line goes to stdout, progress to stderr.
    #[arg(long)]
    prompts: Option<std::path::PathBuf>,
    /// The response to explain, pinned for both models; without it each model explains its own
    /// greedy response.
    #[arg(long)]
    response: Option<String>,
    /// Wrap the prompt in the chat template (the method uses the raw prompt).
    #[arg(long)]
    chat: bool,
    /// An instruction span of the prompt (repeatable); replaces the automatic instruction
    /// sentences (those with an instruction verb, METHODS.md §3.5).
    #[arg(long = "instruction")]
    instructions: Vec<String>,
    /// No instruction words at all (no mask, no score).
    #[arg(long, conflicts_with = "instructions")]
    no_instructions: bool,
    /// New tokens when the response is generated.
    #[arg(long, default_value_t = 200)]
    max_new_tokens: usize,
    /// Write the figure (SVG, PNG) and the data (CSV, JSON) into this folder.
    #[arg(long)]
    out: Option<std::path::PathBuf>,
    /// Word level: sum each word's sub-tokens (output, figures and data).
    #[arg(long)]
    words: bool,
}

/// Loads `--model` into slot A and, when given, `--model-b` into slot B; returns the slots
/// filled, in order.
pub(crate) fn load_models(
    cli: &Cli,
    ctx: &mut WorkerCtx,
    model: &str,
    model_b: Option<&str>,
) -> anyhow::Result<Vec<Slot>> {
    let mut specs = vec![(Slot::A, model)];
    if let Some(b) = model_b {
        specs.push((Slot::B, b));
    }
    for (slot, spec) in &specs {
        let spec = ModelSpec::parse(spec);
        run_job(
            ctx,
            0,
            Job::LoadModel {
                slot: *slot,
                spec: spec.clone(),
                device: cli.device,
                dtype: cli.dtype,
                weights: cli.weights.unwrap_or_default(),
            },
            &mut |_| {},
        )
        .with_context(|| format!("cannot load model {spec}"))?;
    }
    Ok(specs.into_iter().map(|(slot, _)| slot).collect())
}

/// Loads `base` into slot A, then each of `tuned` into slot B in turn, and runs `job()` on
/// each pair with a progress bar on stderr (§10b: several fine-tunes of one base); returns the
/// outputs in `tuned`'s order.
pub(crate) fn run_per_tuned(
    cli: &Cli,
    base: &str,
    tuned: &[String],
    job: impl Fn() -> Job,
) -> anyhow::Result<Vec<JobOutput>> {
    let mut ctx = WorkerCtx::default();
    load_models(cli, &mut ctx, base, None)?;
    let mut outputs = Vec::with_capacity(tuned.len());
    for (i, spec) in tuned.iter().enumerate() {
        let spec_b = ModelSpec::parse(spec);
        run_job(
            &mut ctx,
            0,
            Job::LoadModel {
                slot: Slot::B,
                spec: spec_b.clone(),
                device: cli.device,
                dtype: cli.dtype,
                weights: cli.weights.unwrap_or_default(),
            },
            &mut |_| {},
        )
        .with_context(|| format!("cannot load model {spec_b}"))?;
        let output = run_job(&mut ctx, i as u64 + 1, job(), &mut |event| {
            if let crate::worker::Event::Progress { frac, message, .. } = event {
                let _ = weights::progress_line(frac, &format!("{spec}: {message}"));
            }
        })?;
        eprintln!();
        outputs.push(output);
    }
    Ok(outputs)
}

/// A fraction as a percentage with one decimal, "n/a" for NaN (an empty group).
pub(crate) fn pct(x: f64) -> String {
    if x.is_nan() {
        "n/a".to_owned()
    } else {
        format!("{:.1}%", 100.0 * x)
    }
}

/// Loads `--model` (and `--model-b`), runs the job `job(slots)` builds with a progress bar on
/// stderr, and returns its output.
pub(crate) fn run_with_progress(
    cli: &Cli,
    model: &str,
    model_b: Option<&str>,
    job: impl FnOnce(Vec<Slot>) -> Job,
) -> anyhow::Result<JobOutput> {
    let mut ctx = WorkerCtx::default();
    let slots = load_models(cli, &mut ctx, model, model_b)?;
    let output = run_job(&mut ctx, 1, job(slots), &mut |event| {
        if let crate::worker::Event::Progress { frac, message, .. } = event {
            let _ = weights::progress_line(frac, &message);
        }
    })?;
    eprintln!();
    Ok(output)
}

/// Prints a result as JSON (`--json`) or as its text report.
pub(crate) fn print_report<T: serde::Serialize>(
    cli: &Cli,
    output: &T,
    text: impl FnOnce(&T) -> String,
) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    if cli.json {
        writeln!(out, "{}", serde_json::to_string(output)?)?;
    } else {
        write!(out, "{}", text(output))?;
    }
    Ok(())
}

/// Runs a subcommand, printing to stdout. Every subcommand runs through the worker's job path
/// ([`run_job`]), as the GUI's jobs do.
pub fn run(cli: &Cli, command: &Command) -> anyhow::Result<()> {
    let mut ctx = WorkerCtx::default();
    match command {
        Command::Attribute(args) => attribute::run(cli, &mut ctx, args),
        Command::Concepts(args) => weights::run_concepts(cli, args),
        Command::Heads(args) => weights::run_heads(cli, args),
        Command::Consistency(args) => consistency::run(cli, args),
        Command::Iv(args) => iv::run(cli, args),
        Command::Knowledge(args) => knowledge::run(cli, args),
        Command::Forgetting(args) => forgetting::run(cli, args),
        Command::Shift(args) => shift::run(cli, args),
        Command::Lens(args) => shift::run_lens(cli, args),
        Command::Train(args) => train::run(cli, args),
        Command::Merge { model, out } => {
            let spec = ModelSpec::parse(model);
            if spec.adapter.is_none() {
                return Err(crate::Error::invalid(
                    "--model",
                    format!("`{model}` names no adapter (expected BASE_PATH+ADAPTER_PATH)"),
                )
                .into());
            }
            let output = run_job(
                &mut ctx,
                0,
                Job::SaveMerged {
                    spec,
                    out: out.clone(),
                },
                &mut |_| {},
            )?;
            print_output(&output, cli.json)
        }
        Command::Info { model } => {
            load_models(cli, &mut ctx, &model.model, None)?;
            let loaded = JobOutput::Loaded {
                slot: Slot::A,
                info: Box::new(ctx.model(Slot::A)?.info.clone()),
            };
            print_output(&loaded, cli.json)
        }
        Command::Tokenize { model, text } => single(
            cli,
            &mut ctx,
            &model.model,
            Job::Tokenize {
                slot: Slot::A,
                text: text.clone(),
            },
        ),
        Command::Forward { model, text, top_k } => single(
            cli,
            &mut ctx,
            &model.model,
            Job::Forward {
                slot: Slot::A,
                text: text.clone(),
                top_k: *top_k,
            },
        ),
        Command::Generate {
            model,
            prompt,
            chat,
            max_new_tokens,
            temperature,
            top_p,
            seed,
            stop,
            iv,
            iv_layer,
            iv_scale,
            iv_every_token,
        } => {
            let sampling = match temperature {
                None => Sampling::Greedy,
                Some(t) => Sampling::Sample {
                    temperature: *t,
                    top_p: *top_p,
                    seed: *seed,
                },
            };
            let job = Job::Generate {
                slots: vec![Slot::A],
                prompt: prompt.clone(),
                chat: *chat,
                cfg: GenerateConfig {
                    max_new_tokens: *max_new_tokens,
                    sampling,
                    stop_strings: stop.clone(),
                    ..GenerateConfig::default()
                },
                steer: iv.as_ref().map(|path| crate::worker::SteerRequest {
                    path: path.clone(),
                    layer: *iv_layer,
                    scale: *iv_scale,
                    every_token: *iv_every_token,
                }),
                live_shift: None,
            };
            single(cli, &mut ctx, &model.model, job)
        }
    }
}

/// Loads `model` into slot A, runs one job on it and prints its output; a generation's text
/// streams to stdout as it comes (without `--json`).
fn single(cli: &Cli, ctx: &mut WorkerCtx, model: &str, job: Job) -> anyhow::Result<()> {
    load_models(cli, ctx, model, None)?;
    let stream_text = !cli.json && matches!(job, Job::Generate { .. });
    let mut stdout = std::io::stdout();
    let output = run_job(ctx, 1, job, &mut |event| {
        if stream_text {
            if let crate::worker::Event::Token { token, .. } = event {
                // Streaming is best effort: a closed pipe must not abort the job.
                let _ = write!(stdout, "{}", token.text_delta);
                let _ = stdout.flush();
            }
        }
    })?;
    print_output(&output, cli.json)
}

fn print_output(output: &JobOutput, json: bool) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    if json {
        let value = match output {
            JobOutput::Loaded { info, .. } => serde_json::to_string_pretty(info)?,
            JobOutput::Tokens(t) => serde_json::to_string(t)?,
            JobOutput::Forward(f) => serde_json::to_string(f)?,
            JobOutput::Generated(g) => match g.as_slice() {
                [one] => serde_json::to_string_pretty(one)?,
                many => serde_json::to_string_pretty(many)?,
            },
            JobOutput::Attributed(results) => {
                let values: Vec<_> = results.iter().map(attribute::result_json).collect();
                serde_json::to_string(&values)?
            }
            JobOutput::SavedMerged { out, merged } => {
                serde_json::json!({"out": out, "merged_layers": merged}).to_string()
            }
            JobOutput::SavedIv(paths) => serde_json::to_string(paths)?,
            JobOutput::InstructionVectors(o) => serde_json::to_string(o)?,
            JobOutput::Knowledge(run) => serde_json::to_string(run)?,
            JobOutput::Shift(run) => serde_json::to_string(run)?,
            JobOutput::Lens(lens) => serde_json::to_string(lens)?,
            JobOutput::Forgetting(r) => serde_json::to_string(r)?,
            JobOutput::Concepts(_)
            | JobOutput::Heads(_)
            | JobOutput::Consistency(_)
            | JobOutput::Trained(_)
            | JobOutput::StagesTrained(_)
            | JobOutput::TrainEstimated(_)
            | JobOutput::DataPreview(_)
            | JobOutput::Unloaded { .. }
            | JobOutput::Swapped { .. } => String::new(),
        };
        writeln!(out, "{value}")?;
        return Ok(());
    }
    match output {
        JobOutput::Loaded { info, .. } => {
            writeln!(out, "source        {}", info.source)?;
            writeln!(out, "format        {} ({})", info.format, info.source_dtype)?;
            writeln!(out, "architecture  {}", info.architecture)?;
            writeln!(
                out,
                "layers        {} (hidden {}, mlp {}, heads {}/{} kv, head dim {})",
                info.num_layers,
                info.hidden_size,
                info.intermediate_size,
                info.num_heads,
                info.num_kv_heads,
                info.head_dim
            )?;
            writeln!(out, "vocabulary    {}", info.vocab_size)?;
            writeln!(out, "context       {}", info.context_length)?;
            writeln!(out, "parameters    {:.1}M", info.parameters as f64 / 1e6)?;
            writeln!(
                out,
                "weights       {} on {}, {:.0} MiB",
                info.dtype,
                info.device,
                info.weight_bytes as f64 / 1_048_576.0
            )?;
            writeln!(
                out,
                "chat template {}",
                if info.has_chat_template { "yes" } else { "no" }
            )?;
            if let Some(adapter) = &info.adapter {
                writeln!(
                    out,
                    "adapter       {} (r {}, alpha {}, {})",
                    adapter.path,
                    adapter.rank,
                    adapter.alpha,
                    adapter.target_modules.join(",")
                )?;
            }
            writeln!(out, "load time     {:.2} s", info.load_secs)?;
        }
        JobOutput::Tokens(t) => {
            for (id, token) in t.ids.iter().zip(&t.tokens) {
                writeln!(out, "{id}\t{token}")?;
            }
        }
        JobOutput::Forward(f) => {
            for (pos, (token, top)) in f.tokens.iter().zip(&f.top_k).enumerate() {
                let tops: Vec<String> = top
                    .iter()
                    .map(|(id, logit)| format!("{id}:{logit:.3}"))
                    .collect();
                writeln!(out, "{pos}\t{token}\t{}", tops.join(" "))?;
            }
        }
        JobOutput::SavedMerged { out: dir, merged } => {
            writeln!(
                out,
                "merged {merged} adapted layers; wrote {} (load it with --model {})",
                dir.display(),
                dir.display()
            )?;
        }
        JobOutput::Attributed(results) => {
            for result in results {
                attribute::print_text(&mut out, result)?;
            }
        }
        JobOutput::InstructionVectors(o) => write!(out, "{}", iv::text_report(o))?,
        JobOutput::Knowledge(run) => {
            write!(
                out,
                "{}",
                knowledge::text_report(std::slice::from_ref(run.as_ref()))
            )?;
        }
        JobOutput::Forgetting(r) => write!(out, "{}", forgetting::text_report(r))?,
        JobOutput::Shift(run) => write!(
            out,
            "{}",
            shift::text_report(std::slice::from_ref(run.as_ref()))
        )?,
        JobOutput::Lens(lens) => write!(out, "{}", shift::lens_report(lens))?,
        JobOutput::SavedIv(paths) => {
            for p in paths {
                writeln!(out, "wrote {}", p.display())?;
            }
        }
        JobOutput::Concepts(_)
        | JobOutput::Heads(_)
        | JobOutput::Consistency(_)
        | JobOutput::Trained(_)
        | JobOutput::StagesTrained(_)
        | JobOutput::TrainEstimated(_)
        | JobOutput::DataPreview(_)
        | JobOutput::Unloaded { .. }
        | JobOutput::Swapped { .. } => {}
        JobOutput::Generated(outputs) => {
            // The text was streamed already; finish the line and summarise.
            writeln!(out)?;
            let Some(g) = outputs.first() else {
                return Ok(());
            };
            if let Some(note) = &g.steering {
                eprintln!("[{note}]");
            }
            let decode_tps = if g.decode_secs > 0.0 {
                (g.new_ids.len().saturating_sub(1)) as f64 / g.decode_secs
            } else {
                0.0
            };
            eprintln!(
                "[{} prompt tokens, {} new, stop: {:?}, prefill {:.2} s, decode {:.1} tok/s]",
                g.prompt_ids.len(),
                g.new_ids.len(),
                g.stop_reason,
                g.prefill_secs,
                decode_tps
            );
        }
    }
    Ok(())
}
