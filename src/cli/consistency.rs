//! `tunelens consistency` (METHODS.md §7–§9): representation consistency of paraphrases,
//! prediction consistency of factual probes, accuracy spread across instructions, and the
//! attribute/extraction rates, for one model or A beside B.

use std::fmt::Write as _;
use std::path::PathBuf;

use clap::Args;

use crate::analysis::consistency::Pooling;
use crate::analysis::prediction::PredictionMode;
use crate::cli::{Cli, ModelArg};
use crate::error::Error;
use crate::worker::consistency::{self, ConsistencyOutput, ConsistencySettings, Measures};
use crate::worker::{Job, JobOutput};

/// `tunelens consistency`.
#[derive(Debug, Args)]
pub struct ConsistencyArgs {
    #[command(flatten)]
    model: ModelArg,
    /// A second model (slot B), compared with the first.
    #[arg(long = "model-b")]
    model_b: Option<String>,
    /// Measures to run, comma-separated: repr (§7), pred (§8), spread (§8.4), recall (§9).
    #[arg(long, default_value = "repr,pred,spread,recall", value_delimiter = ',')]
    measure: Vec<String>,
    /// Paraphrase pairs, TSV or JSONL with sentence1, sentence2, label (default: the shipped set).
    #[arg(long)]
    pairs: Option<PathBuf>,
    /// Factual probes JSON (default: the shipped set; format in sample_prompts/README-consistency.md).
    #[arg(long)]
    facts: Option<PathBuf>,
    /// Subject descriptions JSON, subject -> text (default: the shipped set).
    #[arg(long)]
    subjects: Option<PathBuf>,
    /// Pooling of the token states: mean (non-special tokens) or last.
    #[arg(long, default_value = "mean")]
    pooling: String,
    /// Greedy generation of up to N tokens instead of scoring the relation's objects (§8.2 a).
    #[arg(long)]
    generate: Option<usize>,
    /// Facts per relation under each paraphrased instruction (§8.4).
    #[arg(long, default_value_t = 5)]
    spread_facts: usize,
    /// Apply the final norm before the logit lens of the extraction rate.
    #[arg(long)]
    extraction_final_norm: bool,
    /// Sentences per forward batch.
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// Write what the GUI's Export writes into this folder: the figure (SVG, PNG), every
    /// measure as CSV and a JSON of everything, named `<stem>...`.
    #[arg(long)]
    out: Option<PathBuf>,
    /// File stem of the `--out` files.
    #[arg(long, requires = "out")]
    stem: Option<String>,
    /// The layer the figure's histograms show.
    #[arg(long, default_value_t = 0)]
    layer: usize,
}

fn settings(args: &ConsistencyArgs) -> anyhow::Result<ConsistencySettings> {
    let mut measures = Measures {
        representations: false,
        predictions: false,
        spread: false,
        recall: false,
    };
    for m in &args.measure {
        match m.trim() {
            "repr" => measures.representations = true,
            "pred" => measures.predictions = true,
            "spread" => measures.spread = true,
            "recall" => measures.recall = true,
            other => {
                return Err(Error::invalid(
                    "--measure",
                    format!("`{other}` (expected repr, pred, spread, recall)"),
                )
                .into())
            }
        }
    }
    let pooling = match args.pooling.as_str() {
        "mean" => Pooling::Mean,
        "last" => Pooling::Last,
        other => {
            return Err(
                Error::invalid("--pooling", format!("`{other}` (expected mean or last)")).into(),
            )
        }
    };
    let mut s =
        ConsistencySettings {
            pairs: args.pairs.clone(),
            facts: args.facts.clone(),
            subjects: args.subjects.clone(),
            measures,
            pooling,
            mode: args.generate.map_or(PredictionMode::Candidates, |n| {
                PredictionMode::Generative { max_new_tokens: n }
            }),
            spread_facts: args.spread_facts,
            batch_size: args.batch_size,
            ..ConsistencySettings::default()
        };
    s.recall.extraction_final_norm = args.extraction_final_norm;
    Ok(s)
}

/// Runs `tunelens consistency`.
pub(super) fn run(cli: &Cli, args: &ConsistencyArgs) -> anyhow::Result<()> {
    let settings = settings(args)?;
    // Bad data files fail before any model is loaded.
    consistency::ConsistencyData::load(&settings)?;
    let output =
        super::run_with_progress(cli, &args.model.model, args.model_b.as_deref(), |slots| {
            Job::Consistency { slots, settings }
        })?;
    let JobOutput::Consistency(output) = output else {
        anyhow::bail!("the consistency job returned another result");
    };
    super::print_report(cli, output.as_ref(), text_report)?;
    if let Some(dir) = &args.out {
        // The GUI's Export writer: figure, every measure as CSV, JSON of everything.
        let stem = args.stem.as_deref().unwrap_or("consistency");
        for path in crate::export::views::write_consistency(dir, stem, &output, args.layer)? {
            eprintln!("wrote {}", path.display());
        }
    }
    Ok(())
}

fn fmt(x: f64) -> String {
    if x.is_nan() {
        "nan".to_owned()
    } else {
        format!("{x:.4}")
    }
}

/// The readable report: RD by layer, relation table, spread, rates by layer.
pub fn text_report(out: &ConsistencyOutput) -> String {
    let mut s = String::new();
    let names: Vec<&str> = out.results.iter().map(|r| r.model.as_str()).collect();
    if out.results.iter().any(|r| r.representations.is_some()) {
        let _ = writeln!(s, "# representation consistency (METHODS.md §7): mean cosine distance of paraphrase (P) and non-paraphrase (N) pairs, RD = (N - P) / N");
        let _ = write!(s, "layer");
        for n in &names {
            let _ = write!(s, "\t{n} P\t{n} N\t{n} RD");
        }
        if out.rd_difference.is_some() {
            let _ = write!(s, "\tRD B-A");
        }
        let _ = writeln!(s);
        let layers = out
            .results
            .iter()
            .filter_map(|r| r.representations.as_ref())
            .map(|r| r.layers.len())
            .max()
            .unwrap_or(0);
        for l in 0..layers {
            let _ = write!(s, "{l}");
            for r in &out.results {
                if let Some(layer) = r.representations.as_ref().and_then(|x| x.layers.get(l)) {
                    let _ = write!(
                        s,
                        "\t{}\t{}\t{}",
                        fmt(layer.mean_para),
                        fmt(layer.mean_non),
                        fmt(layer.rd)
                    );
                }
            }
            if let Some(d) = out.rd_difference.as_ref().and_then(|d| d.get(l)) {
                let _ = write!(s, "\t{}", fmt(*d));
            }
            let _ = writeln!(s);
        }
    }
    for r in &out.results {
        if let Some(p) = &r.predictions {
            let _ = writeln!(
                s,
                "\n# prediction consistency (METHODS.md §8), {}, mode {:?}",
                r.model, p.mode
            );
            let _ = writeln!(s, "relation\tconsistency\taccuracy\tacc-consistency");
            for rel in &p.relations {
                let _ = writeln!(
                    s,
                    "{}\t{}\t{}\t{}",
                    rel.relation,
                    fmt(rel.metrics.consistency),
                    fmt(rel.metrics.accuracy),
                    fmt(rel.metrics.acc_consistency)
                );
            }
            let _ = writeln!(
                s,
                "macro average\t{} ± {}\t{} ± {}\t{} ± {}",
                fmt(p.macro_avg.consistency),
                fmt(p.macro_std.consistency),
                fmt(p.macro_avg.accuracy),
                fmt(p.macro_std.accuracy),
                fmt(p.macro_avg.acc_consistency),
                fmt(p.macro_std.acc_consistency)
            );
        }
        if let Some(sp) = &r.spread {
            let _ = writeln!(
                s,
                "\n# accuracy across {} paraphrased instructions (METHODS.md §8.4), {}",
                sp.accuracies.len(),
                r.model
            );
            let _ = writeln!(
                s,
                "mean {} std {} min {} max {} range {}",
                fmt(sp.summary.mean),
                fmt(sp.summary.std),
                fmt(sp.min),
                fmt(sp.max),
                fmt(sp.range)
            );
        }
        if let Some(rc) = &r.recall {
            let _ = writeln!(
                s,
                "\n# attribute and extraction rates (METHODS.md §9), {}: {} known-fact prompts, {} with descriptions",
                r.model, rc.probes, rc.attribute_probes
            );
            let _ = writeln!(s, "layer\tattribute %\tER attn %\tER mlp %\tER out %");
            for l in 0..rc.attribute_rate.len() {
                let _ = writeln!(
                    s,
                    "{l}\t{:.1}\t{:.1}\t{:.1}\t{:.1}",
                    rc.attribute_rate[l],
                    rc.extraction_attn[l],
                    rc.extraction_mlp[l],
                    rc.extraction_out[l]
                );
            }
        }
    }
    s
}
