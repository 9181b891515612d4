//! `tunelens concepts` (METHODS.md §2) and `tunelens heads` (§3): TSV rows in the reference
//! code's format streamed to stdout layer by layer as they are computed, progress on stderr,
//! with `--model-b` the A-vs-B comparisons, and with `--out` the files the GUI's Export writes
//! (the same writer). Both run through the worker's job path.

use std::cell::RefCell;
use std::io::{IsTerminal as _, Write};
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::atomic::Ordering;

use clap::Args;

use crate::analysis::ffn_concepts::ConceptsConfig;
use crate::analysis::head_pairs::HeadsConfig;
use crate::cli::{Cli, ModelArg};
use crate::export::tables;
use crate::wordfiles::WordSource;
use crate::worker::runner::{run_job, WorkerCtx};
use crate::worker::weights::CachePolicy;
use crate::worker::{Event, Job, JobOutput, LayerResult, Slot};

/// Options shared by `concepts` and `heads`.
#[derive(Debug, Args)]
pub struct WeightArgs {
    #[command(flatten)]
    model: ModelArg,
    /// A second model (slot B, e.g. the tuned one): compared against the first.
    #[arg(long = "model-b")]
    model_b: Option<String>,
    /// A `word<TAB>freq` word list (e.g. the paper's SingleShareGPT_Vocab.tsv); default: the
    /// built-in English list.
    #[arg(long)]
    words: Option<PathBuf>,
    /// Write what the GUI's Export writes into this folder instead of printing the TSV: the
    /// figure (SVG, PNG), the TSV of each model, the comparison, CSV tables and a JSON of
    /// everything, named `<stem>...`.
    #[arg(long)]
    out: Option<PathBuf>,
    /// File stem of the `--out` files.
    #[arg(long, requires = "out")]
    stem: Option<String>,
    /// The layer the figure (and the heads pair table) shows.
    #[arg(long, default_value_t = 0)]
    layer: usize,
    /// Neither read nor write the result cache.
    #[arg(long)]
    no_cache: bool,
}

/// `tunelens concepts`.
#[derive(Debug, Args)]
pub struct ConceptsArgs {
    #[command(flatten)]
    common: WeightArgs,
    /// Words per component.
    #[arg(long, default_value_t = 50)]
    top_k: usize,
    /// Components described per layer.
    #[arg(long, default_value_t = 300)]
    ranks: usize,
}

/// `tunelens heads`.
#[derive(Debug, Args)]
pub struct HeadsArgs {
    #[command(flatten)]
    common: WeightArgs,
    /// A word-vector table in GloVe text format (`word v1 v2 ...`) for the semantic filter;
    /// without it the model's own input embeddings are used (a labelled deviation).
    #[arg(long)]
    vectors: Option<PathBuf>,
    /// Words per dimension and side.
    #[arg(long, default_value_t = 100)]
    top_k: usize,
    /// Most frequent words the semantic thresholds compare against.
    #[arg(long, default_value_t = 3000)]
    threshold_words: usize,
    /// Layers per group in the change-rate analysis.
    #[arg(long, default_value_t = 8)]
    group_size: usize,
}

/// `[=====>    ] 40% message` on stderr, redrawn in place on a terminal.
pub(super) fn progress_line(frac: f32, message: &str) -> ControlFlow<()> {
    const WIDTH: usize = 30;
    let filled = ((frac.clamp(0.0, 1.0) * WIDTH as f32) as usize).min(WIDTH);
    let line = format!(
        "[{}{}] {:3.0}% {message}",
        "=".repeat(filled),
        " ".repeat(WIDTH - filled),
        frac * 100.0
    );
    let mut err = std::io::stderr();
    if err.is_terminal() {
        let _ = writeln!(err, "\r{line}\x1b[K");
    } else {
        let _ = writeln!(err, "{line}");
    }
    let _ = err.flush();
    ControlFlow::Continue(())
}

fn policy(common: &WeightArgs) -> CachePolicy {
    if common.no_cache {
        CachePolicy::Off
    } else {
        CachePolicy::User
    }
}

/// Runs a streaming weight-space job through the worker's job path: progress to stderr, each
/// finished layer's TSV rows to stdout (when `print` is on). A failed write to stdout (a closed
/// pipe) cancels the job and is the error returned.
fn run_streaming(
    cli: &Cli,
    common: &WeightArgs,
    header: &str,
    make_job: impl FnOnce(Vec<Slot>) -> Job,
    rows: &dyn Fn(&str, &str, &LayerResult) -> String,
) -> anyhow::Result<JobOutput> {
    let mut ctx = WorkerCtx::default();
    let slots = super::load_models(
        cli,
        &mut ctx,
        &common.model.model,
        common.model_b.as_deref(),
    )?;
    let models = ctx.models(&slots)?;
    let names: Vec<String> = models.iter().map(|(_, m)| m.info.display_name()).collect();
    let sizes: Vec<String> = models
        .iter()
        .map(|(_, m)| tables::size_label(m.info.parameters))
        .collect();
    let print = !cli.json && common.out.is_none();
    let stdout = RefCell::new(std::io::stdout().lock());
    let write_err: RefCell<Option<std::io::Error>> = RefCell::new(None);
    let cancel = ctx.cancel.clone();
    let job = make_job(slots);
    if print {
        writeln!(stdout.borrow_mut(), "{header}")?;
    }
    let result = run_job(&mut ctx, 1, job, &mut |event| match event {
        Event::Progress { frac, message, .. } => {
            let _ = progress_line(frac, &message);
        }
        Event::Layer { model, layer, .. } if print => {
            let (Some(name), Some(size)) = (names.get(model), sizes.get(model)) else {
                return;
            };
            let text = rows(name, size, &layer);
            let mut out = stdout.borrow_mut();
            if let Err(err) = out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
                write_err.borrow_mut().get_or_insert(err);
                cancel.store(true, Ordering::Relaxed);
            }
        }
        // Nothing else streams from these jobs; a layer is not printed with --json/--out.
        Event::Layer { .. }
        | Event::Partial { .. }
        | Event::Token { .. }
        | Event::TokenShift { .. }
        | Event::Train { .. }
        | Event::Finished { .. }
        | Event::Cancelled { .. }
        | Event::Failed { .. } => {}
    });
    eprintln!();
    if let Some(err) = write_err.into_inner() {
        return Err(anyhow::anyhow!("cannot write to standard output: {err}"));
    }
    Ok(result?)
}

/// The `--out` files through the export writer; prints their paths.
fn write_out(
    common: &WeightArgs,
    default_stem: &str,
    write: impl FnOnce(&std::path::Path, &str) -> crate::Result<Vec<PathBuf>>,
) -> anyhow::Result<()> {
    if let Some(dir) = &common.out {
        let stem = common.stem.as_deref().unwrap_or(default_stem);
        for path in write(dir, stem)? {
            eprintln!("wrote {}", path.display());
        }
    }
    Ok(())
}

/// Runs `tunelens concepts`.
pub(super) fn run_concepts(cli: &Cli, args: &ConceptsArgs) -> anyhow::Result<()> {
    let common = &args.common;
    let words = word_source(common);
    // The word list is read up front: a bad file fails before any model is loaded, and the
    // rows print words.
    let list = words.load()?.words;
    let output = run_streaming(
        cli,
        common,
        tables::CONCEPTS_HEADER,
        |slots| Job::Concepts {
            slots,
            words,
            config: ConceptsConfig {
                top_k: args.top_k,
                max_rank: args.ranks,
            },
            cache: policy(common),
            stream: true,
        },
        &|name, size, layer| match layer {
            LayerResult::Concepts(l) => tables::concepts_rows(name, size, l, &list),
            LayerResult::Heads(_) => String::new(),
        },
    )?;
    let JobOutput::Concepts(output) = output else {
        anyhow::bail!("the concepts job returned another result");
    };
    for r in &output.results {
        eprintln!(
            "{}: {} layers in {:.1} s{}",
            r.model,
            r.concepts.layers.len(),
            r.secs,
            if r.cached { " (cached)" } else { "" }
        );
    }
    if let Some(alignment) = &output.alignment {
        print_alignment_summary(alignment);
    }
    if cli.json {
        writeln!(
            std::io::stdout().lock(),
            "{}",
            tables::concepts_json(&output)?
        )?;
    }
    write_out(common, "concepts", |dir, stem| {
        crate::export::views::write_concepts(dir, stem, &output, common.layer)
    })
}

fn word_source(common: &WeightArgs) -> WordSource {
    common
        .words
        .clone()
        .map_or(WordSource::Builtin, WordSource::File)
}

fn print_alignment_summary(alignment: &[crate::analysis::ffn_concepts::LayerAlignment]) {
    eprintln!("B vs A (§2.3 extension, not in the original): per layer, mean over the first 10 B components");
    eprintln!("layer\tmean |cos| best A match\tmean Jaccard of top words");
    for l in alignment {
        let n = l.alignment.len().clamp(1, 10);
        let mean = |v: &[f64]| v.iter().take(n).sum::<f64>() / n as f64;
        eprintln!(
            "{}\t{:.4}\t{:.4}",
            l.layer,
            mean(&l.alignment),
            mean(&l.jaccard)
        );
    }
}

/// Runs `tunelens heads`.
pub(super) fn run_heads(cli: &Cli, args: &HeadsArgs) -> anyhow::Result<()> {
    let common = &args.common;
    let words = word_source(common);
    let list = words.load()?.words;
    if let Some(path) = &args.vectors {
        if !path.exists() {
            return Err(crate::Error::NotFound { path: path.clone() }.into());
        }
    }
    let output = run_streaming(
        cli,
        common,
        tables::HEADS_HEADER,
        |slots| Job::Heads {
            slots,
            words,
            vectors: args.vectors.clone(),
            config: HeadsConfig {
                top_k: args.top_k,
                threshold_words: args.threshold_words,
                ..HeadsConfig::default()
            },
            group_size: args.group_size,
            cache: policy(common),
            stream: true,
        },
        &|name, size, layer| match layer {
            LayerResult::Heads(l) => tables::heads_rows(name, size, l, &list),
            LayerResult::Concepts(_) => String::new(),
        },
    )?;
    let JobOutput::Heads(output) = output else {
        anyhow::bail!("the heads job returned another result");
    };
    for r in &output.results {
        eprintln!(
            "{}: {} layers in {:.1} s{}; {}",
            r.model,
            r.pairs.layers.len(),
            r.secs,
            if r.cached { " (cached)" } else { "" },
            r.pairs.source.label()
        );
    }
    if let Some(change) = &output.change {
        eprint!(
            "change rate of instruction vs general verbs, B relative to A (METHODS.md §3.5):\n{}",
            tables::change_rate_tsv(change)
        );
    }
    if cli.json {
        writeln!(std::io::stdout().lock(), "{}", tables::heads_json(&output)?)?;
    }
    write_out(common, "heads", |dir, stem| {
        crate::export::views::write_heads(dir, stem, &output, common.layer)
    })
}
