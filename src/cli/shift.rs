//! `tunelens shift` (METHODS.md §6, §10b): the token distribution shift of one or more tuned
//! models against one base, and `tunelens lens`: the logit lens of one or two models at one
//! position.

use std::fmt::Write as _;
use std::path::PathBuf;

use clap::Args;

use crate::analysis::lens::{LensOutput, LensRequest};
use crate::analysis::shift::{Category, ShiftConfig, ShiftRun, METRICS, RELATIVE_BINS};
use crate::cli::{pct, Cli, ModelArg};
use crate::worker::job::{Job, JobOutput};
use crate::worker::runner::{run_job, WorkerCtx};
use crate::worker::shift::{load_records, template_text, BaseTemplate, ShiftData, ShiftSettings};

/// `tunelens shift`.
#[derive(Debug, Args)]
pub struct ShiftArgs {
    /// The base model (slot A).
    #[command(flatten)]
    model: ModelArg,
    /// A tuned model (slot B); repeat to compare several fine-tunes of the base (§10b).
    #[arg(long = "model-b", required = true)]
    models_b: Vec<String>,
    /// Prompts the tuned model answers greedily: a shipped set (writing, coding, math,
    /// extraction, classification, open_qa), a text file (prompts separated by `---` lines, or
    /// one per line) or JSONL with a `prompt` field.
    #[arg(long, required_unless_present = "data", conflicts_with = "data")]
    prompts: Option<String>,
    /// Responses in AlignTDS / URIAL JSON: `[{id, pure_input, input, output: [o]}]` (e.g.
    /// AlignTDS's `data/Llama-2-7b-chat-hf.json`).
    #[arg(long)]
    data: Option<PathBuf>,
    /// `k` of the top-rank classes and the list metrics (1-30).
    #[arg(long, default_value_t = 10)]
    k: usize,
    /// The base model's context: urial (§6.2's `# Query: ... # Answer:`), raw, or a template
    /// file with `{input}`.
    #[arg(long = "base-template", default_value = "urial")]
    base_template: String,
    /// New tokens of the tuned model's responses to --prompts.
    #[arg(long = "max-new-tokens", default_value_t = 96)]
    max_new_tokens: usize,
    /// At most this many prompts or records.
    #[arg(long = "max-items")]
    max_items: Option<usize>,
    /// Write the figure (SVG, PNG), the tables (CSV), the coloured responses (HTML) and the
    /// JSON into this folder, as the GUI's Export does.
    #[arg(long)]
    out: Option<PathBuf>,
    /// File stem of the --out files.
    #[arg(long, requires = "out")]
    stem: Option<String>,
}

/// `tunelens lens`.
#[derive(Debug, Args)]
pub struct LensArgs {
    #[command(flatten)]
    model: ModelArg,
    /// A second model (slot B): its token at the position is the one tracked in both.
    #[arg(long = "model-b")]
    model_b: Option<String>,
    /// The prompt.
    #[arg(long)]
    prompt: String,
    /// Render the prompt with each model's chat template.
    #[arg(long)]
    chat: bool,
    /// The token position to read (0-based; default: the last token, i.e. the next-token
    /// prediction).
    #[arg(long)]
    position: Option<usize>,
    /// Write the figure (SVG, PNG), the CSV and the JSON into this folder.
    #[arg(long)]
    out: Option<PathBuf>,
    /// File stem of the --out files.
    #[arg(long, requires = "out", default_value = "lens")]
    stem: String,
}

fn settings(args: &ShiftArgs) -> anyhow::Result<ShiftSettings> {
    let data = match (&args.prompts, &args.data) {
        (_, Some(path)) => ShiftData::AlignTds(path.clone()),
        (Some(p), None) => {
            if crate::samples::builtin().iter().any(|s| s.name == p) {
                ShiftData::Shipped(p.clone())
            } else {
                ShiftData::Prompts(PathBuf::from(p))
            }
        }
        (None, None) => anyhow::bail!("give --prompts or --data"),
    };
    let settings = ShiftSettings {
        data,
        base_template: BaseTemplate::parse(&args.base_template),
        config: ShiftConfig {
            k: args.k,
            ..ShiftConfig::default()
        },
        max_new_tokens: args.max_new_tokens,
        max_items: args.max_items,
    };
    settings.config.validate()?;
    Ok(settings)
}

/// Runs `tunelens shift`: the base into slot A, each tuned model into slot B in turn.
pub(super) fn run(cli: &Cli, args: &ShiftArgs) -> anyhow::Result<()> {
    let settings = settings(args)?;
    // Bad data or a bad template fails before any model is loaded.
    load_records(&settings.data)?;
    template_text(&settings.base_template)?;
    let job = || Job::Shift {
        settings: Box::new(settings.clone()),
    };
    let runs = super::run_per_tuned(cli, &args.model.model, &args.models_b, job)?
        .into_iter()
        .map(|output| match output {
            JobOutput::Shift(run) => Ok(*run),
            _ => Err(anyhow::anyhow!("the shift job returned another result")),
        })
        .collect::<anyhow::Result<Vec<ShiftRun>>>()?;
    super::print_report(cli, &runs, |runs| text_report(runs))?;
    if let Some(dir) = &args.out {
        let stem = args.stem.as_deref().unwrap_or("shift");
        for path in crate::export::shift::write_shift(dir, stem, &runs)? {
            eprintln!("wrote {}", path.display());
        }
    }
    Ok(())
}

/// Runs `tunelens lens`.
pub(super) fn run_lens(cli: &Cli, args: &LensArgs) -> anyhow::Result<()> {
    let mut ctx = WorkerCtx::default();
    let slots = super::load_models(cli, &mut ctx, &args.model.model, args.model_b.as_deref())?;
    let job = Job::Lens {
        slots,
        request: Box::new(LensRequest::Prompt {
            prompt: args.prompt.clone(),
            chat: args.chat,
            position: args.position,
        }),
    };
    let JobOutput::Lens(lens) = run_job(&mut ctx, 1, job, &mut |_| {})? else {
        anyhow::bail!("the lens job returned another result");
    };
    super::print_report(cli, lens.as_ref(), lens_report)?;
    if let Some(dir) = &args.out {
        for path in crate::export::shift::write_lens(dir, &args.stem, &lens)? {
            eprintln!("wrote {}", path.display());
        }
    }
    Ok(())
}

/// The readable report: per tuned model the ratios, where shifts sit, the metric means at the
/// first positions and the most shifted tokens.
pub fn text_report(runs: &[ShiftRun]) -> String {
    let mut s = String::new();
    for run in runs {
        let sum = &run.summary;
        let _ = writeln!(
            s,
            "# token distribution shift (METHODS.md §6): {} ({} responses, {} positions, k = {}){}",
            run.title(),
            run.items.len(),
            sum.positions,
            run.settings.config.k,
            if run.cancelled { ", stopped early" } else { "" }
        );
        let _ = writeln!(
            s,
            "unshifted {}  marginal {}  shifted {}",
            pct(sum.ratios[0]),
            pct(sum.ratios[1]),
            pct(sum.ratios[2])
        );
        let bins: Vec<String> = sum
            .shifted_by_relative_position()
            .iter()
            .map(|&v| pct(v))
            .collect();
        let _ = writeln!(
            s,
            "shifted ratio by relative position (tenths of the response, {RELATIVE_BINS} bins): {}",
            bins.join(" ")
        );
        let _ = writeln!(s, "t\tn\t{}\tshifted", METRICS.join("\t"));
        for p in sum.by_position.iter().take(10) {
            let means: Vec<String> = p.means.iter().map(|v| format!("{v:.4}")).collect();
            let _ = writeln!(
                s,
                "{}\t{}\t{}\t{}",
                p.t,
                p.n,
                means.join("\t"),
                pct(p.shifted)
            );
        }
        let _ = writeln!(s, "most shifted tokens (shifted / occurrences):");
        for t in sum.top_shifted.iter().take(15) {
            let _ = writeln!(
                s,
                "  {:?}\t{} / {}\t{}",
                t.token,
                t.shifted,
                t.occurrences,
                pct(t.ratio)
            );
        }
        let _ = writeln!(
            s,
            "time: generation {:.1} s, shift passes {:.2} s",
            run.timings.generate_s, run.timings.shift_s
        );
        if let Some(first) = run.items.first() {
            let marked: String = first
                .shift
                .pieces
                .iter()
                .zip(&first.shift.positions)
                .map(|(piece, m)| match m.category {
                    Category::Unshifted => piece.clone(),
                    Category::Marginal => format!("[{piece}]"),
                    Category::Shifted => format!("[[{piece}]]"),
                })
                .collect();
            let _ = writeln!(
                s,
                "first response ([marginal], [[shifted]]): {}",
                marked.replace('\n', " ")
            );
        }
        s.push('\n');
    }
    s
}

/// The lens as text: per layer the tracked token's rank and probability in each model.
pub fn lens_report(lens: &LensOutput) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# logit lens: rank and probability of {:?} by layer",
        lens.target_text()
    );
    for (slot, model, curve) in &lens.curves {
        let _ = writeln!(
            s,
            "{slot:?} {model}: position {} (token {:?})",
            curve.position, curve.token_at
        );
        let _ = writeln!(s, "layer\trank\tprob\ttop token\ttop prob");
        for p in &curve.points {
            let _ = writeln!(
                s,
                "{}\t{}\t{:.4}\t{:?}\t{:.4}",
                p.layer, p.rank, p.prob, p.top_token, p.top_prob
            );
        }
    }
    s
}
