//! `tunelens iv` (METHODS.md §4): instruction vectors by causal mediation over attention heads,
//! for one model or A beside B, with the saved vectors and the figure written by `--out`.

use std::fmt::Write as _;
use std::path::PathBuf;

use clap::Args;

use crate::analysis::icl::Template;
use crate::analysis::iv::{self, IvConfig, PatchOp, RankBy};
use crate::cli::{Cli, ModelArg};
use crate::error::Error;
use crate::worker::iv::{IvOutput, IvSettings, TaskSource, SHIPPED_TASKS};
use crate::worker::{Job, JobOutput};

/// `tunelens iv`.
#[derive(Debug, Args)]
pub struct IvArgs {
    #[command(flatten)]
    model: ModelArg,
    /// A second model (slot B), run the same way.
    #[arg(long = "model-b")]
    model_b: Option<String>,
    /// A task: a JSON list of {"input", "output"} (Todd et al.'s format), or the name of a
    /// shipped task (antonym, capitalize, country-capital, english-french, person-occupation,
    /// present-past, singular-plural). Repeat for a universal vector over several tasks.
    #[arg(long = "task", required = true)]
    tasks: Vec<String>,
    /// The procedure: todd (METHODS.md §4.2) or fvforgetting (§4.3).
    #[arg(long, default_value = "todd")]
    variant: String,
    /// Trials of the mean head outputs (N_mean).
    #[arg(long = "n-mean")]
    n_mean: Option<usize>,
    /// Trials of the indirect effects (N_ie).
    #[arg(long = "n-ie")]
    n_ie: Option<usize>,
    /// Demonstrations per prompt of the filter and the indirect effects.
    #[arg(long)]
    shots: Option<usize>,
    /// Seed of the trials.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Heads in the vector.
    #[arg(long = "n-top")]
    n_top: Option<usize>,
    /// Use these heads (LAYER:HEAD,…, or llama2-7b-universal) instead of searching.
    #[arg(long)]
    heads: Option<String>,
    /// Patch: replace (Todd) or add (FvForgetting).
    #[arg(long)]
    patch: Option<String>,
    /// Rank heads by prob (Δp of the first answer token) or nll (ΔNLL of the whole answer).
    #[arg(long)]
    rank: Option<String>,
    /// Prompt template: qa ("Q: x\nA: y") or raw (FvForgetting's N template).
    #[arg(long)]
    template: Option<String>,
    /// Edit layers of the zero-shot sweep, comma-separated (default: every layer).
    #[arg(long = "edit-layers", value_delimiter = ',')]
    edit_layers: Vec<usize>,
    /// Evaluate at most N test queries (default: the whole test split).
    #[arg(long = "n-test")]
    n_test: Option<usize>,
    /// Skip the zero-shot evaluation.
    #[arg(long = "no-eval")]
    no_eval: bool,
    /// Keep every trial's prompt ids and effects in the JSON (the reference check reads them).
    #[arg(long = "record-trials")]
    record_trials: bool,
    /// Write what the GUI's Export writes into this folder: the figure (SVG, PNG), the tables
    /// (CSV), the JSON and every vector (`<stem>_<slot>_<task>.iv.safetensors` and `.iv.json`).
    #[arg(long)]
    out: Option<PathBuf>,
    /// File stem of the `--out` figure and tables.
    #[arg(long, requires = "out")]
    stem: Option<String>,
}

fn task_source(text: &str) -> TaskSource {
    let path = PathBuf::from(text);
    if !path.exists() && SHIPPED_TASKS.iter().any(|(n, _)| *n == text) {
        TaskSource::Shipped(text.to_owned())
    } else {
        TaskSource::File(path)
    }
}

/// The settings the flags describe.
pub fn settings(args: &IvArgs) -> anyhow::Result<IvSettings> {
    let mut config = match args.variant.as_str() {
        "todd" => IvConfig::todd(),
        "fvforgetting" => IvConfig::fvforgetting(),
        other => {
            return Err(Error::invalid(
                "--variant",
                format!("`{other}` (expected todd or fvforgetting)"),
            )
            .into())
        }
    };
    if let Some(n) = args.n_mean {
        config.n_mean = n;
    }
    if let Some(n) = args.n_ie {
        config.n_ie = n;
    }
    if let Some(n) = args.shots {
        config.shots = n;
        if args.variant == "todd" {
            config.mean_shots = n;
            config.eval_shots = n;
        }
    }
    if let Some(n) = args.n_top {
        config.n_top = n;
    }
    config.seed = args.seed;
    if let Some(h) = &args.heads {
        config.heads = Some(iv::parse_heads(h).map_err(|e| Error::invalid("--heads", e))?);
    }
    if let Some(p) = &args.patch {
        config.patch = match p.as_str() {
            "replace" => PatchOp::Replace,
            "add" => PatchOp::Add,
            other => {
                return Err(Error::invalid(
                    "--patch",
                    format!("`{other}` (expected replace or add)"),
                )
                .into())
            }
        };
    }
    if let Some(r) = &args.rank {
        config.rank_by = match r.as_str() {
            "prob" => RankBy::Prob,
            "nll" => RankBy::Nll,
            other => {
                return Err(
                    Error::invalid("--rank", format!("`{other}` (expected prob or nll)")).into(),
                )
            }
        };
    }
    if let Some(t) = &args.template {
        config.template = match t.as_str() {
            "qa" => Template::Qa,
            "raw" => Template::Raw,
            other => {
                return Err(
                    Error::invalid("--template", format!("`{other}` (expected qa or raw)")).into(),
                )
            }
        };
    }
    if !args.edit_layers.is_empty() {
        config.edit_layers = Some(args.edit_layers.clone());
    }
    config.n_test = args.n_test;
    config.evaluate = !args.no_eval;
    config.record_trials = args.record_trials;
    Ok(IvSettings {
        tasks: args.tasks.iter().map(|t| task_source(t)).collect(),
        config,
    })
}

/// Runs `tunelens iv`.
pub(super) fn run(cli: &Cli, args: &IvArgs) -> anyhow::Result<()> {
    let settings = settings(args)?;
    // Bad task files fail before any model is loaded.
    crate::worker::iv::load_tasks(&settings)?;
    let output =
        super::run_with_progress(cli, &args.model.model, args.model_b.as_deref(), |slots| {
            Job::InstructionVectors { slots, settings }
        })?;
    let JobOutput::InstructionVectors(output) = output else {
        anyhow::bail!("the instruction-vector job returned another result");
    };
    super::print_report(cli, output.as_ref(), text_report)?;
    if let Some(dir) = &args.out {
        let stem = args.stem.as_deref().unwrap_or("iv");
        for path in crate::export::iv::write_iv(dir, stem, &output, 0)? {
            eprintln!("wrote {}", path.display());
        }
    }
    Ok(())
}

fn pct(x: f64) -> String {
    if x.is_nan() {
        "n/a".to_owned()
    } else {
        format!("{:.1}%", 100.0 * x)
    }
}

/// The readable report: per model and task, the sets, the top heads, the vector and its sweep.
pub fn text_report(out: &IvOutput) -> String {
    let mut s = String::new();
    for r in &out.results {
        let _ = writeln!(
            s,
            "# instruction vectors (METHODS.md §4), {:?}: {} ({} layers × {} heads)",
            r.slot, r.model, r.run.layers, r.run.heads
        );
        for t in &r.run.tasks {
            let z = &t.sizes;
            let _ = writeln!(
                s,
                "\n## {}: {} examples, train {}, valid {} ({} kept by the filter), test {}",
                t.task, z.items, z.train, z.valid, z.filter, z.test
            );
            for note in &t.notes {
                let _ = writeln!(s, "note: {note}");
            }
            let _ = writeln!(
                s,
                "clean top-1 on valid {}, mean p(y*) clean {:.4}, corrupted {:.4}",
                pct(t.clean_accuracy),
                t.mean_p_clean,
                t.mean_p_corrupted
            );
            let _ = writeln!(s, "rank\tlayer\thead\tscore");
            for (i, h) in t.top.iter().enumerate() {
                let _ = writeln!(s, "{}\t{}\t{}\t{:.5}", i + 1, h.layer, h.head, h.score);
            }
            let _ = writeln!(s, "|IV| = {:.4}", t.iv_norm);
            let vocab: Vec<String> = t
                .vocab
                .iter()
                .map(|(tok, p)| format!("{tok:?} {p:.3}"))
                .collect();
            let _ = writeln!(s, "U·IV top tokens: {}", vocab.join(", "));
            if let Some(e) = &t.evaluation {
                let _ = writeln!(
                    s,
                    "zero-shot top-1 on {} test queries: {} without the IV, {} with it at layer {} (best); {}-shot {}",
                    e.n,
                    pct(e.zero_shot),
                    pct(e.best_accuracy),
                    e.best_layer,
                    e.few_shot_shots,
                    pct(e.few_shot)
                );
                let layers: Vec<String> = e
                    .layers
                    .iter()
                    .map(|l| format!("{}:{}", l.layer, pct(l.accuracy)))
                    .collect();
                let _ = writeln!(s, "with the IV by layer: {}", layers.join(" "));
            }
        }
        if !r.run.universal_top.is_empty() {
            let heads: Vec<String> = r
                .run
                .universal_top
                .iter()
                .map(|h| format!("{}:{}", h.layer, h.head))
                .collect();
            let _ = writeln!(s, "\nuniversal heads: {}", heads.join(" "));
        }
        let _ = writeln!(s);
    }
    if let [a, b] = out.results.as_slice() {
        for ((ta, shared), tb) in a.run.tasks.iter().zip(&out.shared).zip(&b.run.tasks) {
            let heads: Vec<String> = shared.iter().map(|(l, h)| format!("{l}:{h}")).collect();
            let _ = writeln!(
                s,
                "{}: A and B share {} of their {} / {} top heads: {}",
                ta.task,
                shared.len(),
                ta.top.len(),
                tb.top.len(),
                heads.join(" ")
            );
        }
    }
    s
}
