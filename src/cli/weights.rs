//! `tunelens concepts` (METHODS.md §2) and `tunelens heads` (§3): TSV rows in the reference
//! code's format streamed to stdout (or `--out` files) layer by layer as they are computed,
//! progress on stderr, and with `--model-b` the A-vs-B comparisons.

use std::fmt::Write as _;
use std::fs::File;
use std::io::{BufWriter, IsTerminal as _, Write};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use clap::Args;

use crate::analysis::ffn_concepts::{ConceptsConfig, LayerConcepts};
use crate::analysis::head_pairs::{HeadsConfig, LayerHeads};
use crate::cli::{Cli, ModelArg};
use crate::error::Error;
use crate::wordfiles::WordSource;
use crate::worker::runner::WorkerCtx;
use crate::worker::weights::{self, CachePolicy, ConceptsOutput, HeadsOutput};

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
    /// Write the TSV of each model, the comparison and a JSON of everything into this folder
    /// instead of printing the TSV.
    #[arg(long)]
    out: Option<PathBuf>,
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

/// `135M`, `7B`: the `Size` column.
fn size_label(parameters: usize) -> String {
    let p = parameters as f64;
    if p >= 1e9 {
        let b = format!("{:.1}", p / 1e9);
        format!("{}B", b.trim_end_matches(".0"))
    } else {
        format!("{:.0}M", p / 1e6)
    }
}

/// Tab and newline would break a TSV row; the reference output never has them in words.
fn tsv_field(text: &str) -> String {
    text.replace(['\t', '\n', '\r'], " ")
}

/// Where rows go: stdout, or one file per model under `--out`.
struct Sinks {
    files: Vec<(PathBuf, BufWriter<File>)>,
    stdout: Option<std::io::StdoutLock<'static>>,
}

impl Sinks {
    fn new(out: Option<&Path>, kind: &str, names: &[String], header: &str) -> anyhow::Result<Self> {
        let mut sinks = Self {
            files: Vec::new(),
            stdout: None,
        };
        if let Some(dir) = out {
            std::fs::create_dir_all(dir).map_err(|err| Error::bad_file(dir, err))?;
            for (i, name) in names.iter().enumerate() {
                let slot = if i == 0 { "A" } else { "B" };
                let safe: String = name
                    .chars()
                    .map(|c| {
                        if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                            c
                        } else {
                            '_'
                        }
                    })
                    .collect();
                let path = dir.join(format!("{kind}_{slot}_{safe}.tsv"));
                let file = File::create(&path).map_err(|err| Error::bad_file(&path, err))?;
                let mut w = BufWriter::new(file);
                writeln!(w, "{header}").map_err(|err| Error::bad_file(&path, err))?;
                sinks.files.push((path, w));
            }
        } else {
            let mut stdout = std::io::stdout().lock();
            writeln!(stdout, "{header}")?;
            sinks.stdout = Some(stdout);
        }
        Ok(sinks)
    }

    fn write(&mut self, model: usize, rows: &str) -> crate::Result<()> {
        if let Some(out) = &mut self.stdout {
            out.write_all(rows.as_bytes())?;
            return Ok(out.flush()?);
        }
        let (path, w) = self
            .files
            .get_mut(model)
            .ok_or_else(|| Error::invalid("model", "no output file"))?;
        w.write_all(rows.as_bytes())
            .map_err(|err| Error::bad_file(path, err))
    }

    fn finish(self) -> anyhow::Result<Vec<PathBuf>> {
        let mut paths = Vec::new();
        for (path, mut w) in self.files {
            w.flush().map_err(|err| Error::bad_file(&path, err))?;
            paths.push(path);
        }
        Ok(paths)
    }
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

/// Runs `tunelens concepts`.
pub(super) fn run_concepts(cli: &Cli, args: &ConceptsArgs) -> anyhow::Result<()> {
    let mut ctx = WorkerCtx::default();
    let slots = super::load_models(
        cli,
        &mut ctx,
        &args.common.model.model,
        args.common.model_b.as_deref(),
    )?;
    let models = slots
        .iter()
        .map(|&slot| Ok((slot, ctx.model(slot)?)))
        .collect::<crate::Result<Vec<_>>>()?;
    let names: Vec<String> = models.iter().map(|(_, m)| m.info.display_name()).collect();
    let sizes: Vec<String> = models
        .iter()
        .map(|(_, m)| size_label(m.info.parameters))
        .collect();
    let source = args
        .common
        .words
        .clone()
        .map_or(WordSource::Builtin, WordSource::File);
    let cfg = ConceptsConfig {
        top_k: args.top_k,
        max_rank: args.ranks,
    };
    // The word list is needed to print words; it is loaded once more inside (cheap).
    let words = source.load()?.words;
    let mut sinks = (!cli.json)
        .then(|| {
            Sinks::new(
                args.common.out.as_deref(),
                "concepts",
                &names,
                "Model\tSize\tLayer\tModule\tHead\tRank\tScore\tTopK",
            )
        })
        .transpose()?;
    let output = weights::run_concepts(
        &models,
        &source,
        &cfg,
        &policy(&args.common),
        &mut |frac, message| progress_line(frac, &message),
        &mut |model, layer: &LayerConcepts| {
            let Some(sinks) = sinks.as_mut() else {
                return Ok(());
            };
            let mut rows = String::new();
            for c in &layer.components {
                let top: Vec<&str> = c
                    .words
                    .iter()
                    .map(|w| words.get(w.word as usize).map_or("?", String::as_str))
                    .collect();
                let _ = writeln!(
                    rows,
                    "{}\t{}\t{}\tFFN\t0\t{}\t{:.4}\t{}",
                    tsv_field(&names[model]),
                    sizes[model],
                    layer.layer,
                    c.rank,
                    c.ratio,
                    tsv_field(&top.join("|||"))
                );
            }
            sinks.write(model, &rows)
        },
    )?;
    eprintln!();
    for r in &output.results {
        eprintln!(
            "{}: {} layers in {:.1} s{}",
            r.model,
            r.concepts.layers.len(),
            r.secs,
            if r.cached { " (cached)" } else { "" }
        );
    }
    let mut written = match sinks {
        Some(sinks) => sinks.finish()?,
        None => Vec::new(),
    };
    if let Some(alignment) = &output.alignment {
        print_alignment_summary(alignment);
    }
    if cli.json {
        writeln!(std::io::stdout().lock(), "{}", concepts_json(&output)?)?;
    }
    if let Some(dir) = &args.common.out {
        written.extend(write_concepts_extras(dir, &output)?);
    }
    for path in written {
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

fn concepts_json(output: &ConceptsOutput) -> anyhow::Result<String> {
    let value = serde_json::json!({
        "words": output.words,
        "models": output.results.iter().map(|r| serde_json::json!({
            "slot": r.slot,
            "model": r.model,
            "parameters": r.parameters,
            "cached": r.cached,
            "seconds": r.secs,
            "layers": r.concepts.layers.iter().map(|l| serde_json::json!({
                "layer": l.layer,
                "variance_ratios": l.ratios,
                "components": l.components.iter().map(|c| serde_json::json!({
                    "rank": c.rank,
                    "ratio": c.ratio,
                    "words": r.concepts.component_words(c),
                    "scores": c.words.iter().map(|w| w.score).collect::<Vec<_>>(),
                })).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "alignment_note": "§2.3 deterministic comparison of B (tuned) against A (base): an extension, not in the original method",
        "alignment": output.alignment,
    });
    Ok(serde_json::to_string(&value)?)
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

fn write_concepts_extras(dir: &Path, output: &ConceptsOutput) -> anyhow::Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    let json = dir.join("concepts.json");
    std::fs::write(&json, concepts_json(output)?).map_err(|err| Error::bad_file(&json, err))?;
    written.push(json);
    if let Some(alignment) = &output.alignment {
        let path = dir.join("concepts_alignment.tsv");
        let mut text = String::from("Layer\tRankB\tBestRankA\tAbsCos\tJaccard\n");
        for l in alignment {
            for (r, ((best, cos), jac)) in l
                .best_match
                .iter()
                .zip(&l.alignment)
                .zip(&l.jaccard)
                .enumerate()
            {
                let _ = writeln!(text, "{}\t{}\t{best}\t{cos:.6}\t{jac:.4}", l.layer, r + 1);
            }
        }
        std::fs::write(&path, text).map_err(|err| Error::bad_file(&path, err))?;
        written.push(path);
    }
    Ok(written)
}

/// Runs `tunelens heads`.
pub(super) fn run_heads(cli: &Cli, args: &HeadsArgs) -> anyhow::Result<()> {
    let mut ctx = WorkerCtx::default();
    let slots = super::load_models(
        cli,
        &mut ctx,
        &args.common.model.model,
        args.common.model_b.as_deref(),
    )?;
    let models = slots
        .iter()
        .map(|&slot| Ok((slot, ctx.model(slot)?)))
        .collect::<crate::Result<Vec<_>>>()?;
    let names: Vec<String> = models.iter().map(|(_, m)| m.info.display_name()).collect();
    let sizes: Vec<String> = models
        .iter()
        .map(|(_, m)| size_label(m.info.parameters))
        .collect();
    let source = args
        .common
        .words
        .clone()
        .map_or(WordSource::Builtin, WordSource::File);
    let cfg = HeadsConfig {
        top_k: args.top_k,
        threshold_words: args.threshold_words,
        ..HeadsConfig::default()
    };
    let words = source.load()?.words;
    let mut sinks = (!cli.json)
        .then(|| {
            Sinks::new(
                args.common.out.as_deref(),
                "heads",
                &names,
                "Model\tSize\tLayer\tModule\tHead\tDim\tRank\tScore\tTopK",
            )
        })
        .transpose()?;
    let output = weights::run_heads(
        &models,
        &source,
        args.vectors.as_deref(),
        &cfg,
        args.group_size,
        &policy(&args.common),
        &mut |frac, message| progress_line(frac, &message),
        &mut |model, layer: &LayerHeads| {
            let Some(sinks) = sinks.as_mut() else {
                return Ok(());
            };
            let word = |i: u32| words.get(i as usize).map_or("?", String::as_str);
            let mut rows = String::new();
            for d in &layer.dims {
                let pairs: Vec<String> = d
                    .pairs
                    .iter()
                    .map(|p| format!("{}={}", word(p.key), word(p.query)))
                    .collect();
                let _ = writeln!(
                    rows,
                    "{}\t{}\t{}\tQK\t{}\t{}\t{}\t{:.4}\t{}",
                    tsv_field(&names[model]),
                    sizes[model],
                    layer.layer,
                    d.head,
                    d.dim,
                    d.rank,
                    d.energy,
                    tsv_field(&pairs.join("|||"))
                );
            }
            sinks.write(model, &rows)
        },
    )?;
    eprintln!();
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
    let mut written = match sinks {
        Some(sinks) => sinks.finish()?,
        None => Vec::new(),
    };
    if let Some(change) = &output.change {
        let text = change_rate_tsv(change);
        eprint!("change rate of instruction vs general verbs, B relative to A (METHODS.md §3.5):\n{text}");
        if let Some(dir) = &args.common.out {
            let path = dir.join("heads_change_rate.tsv");
            std::fs::write(&path, &text).map_err(|err| Error::bad_file(&path, err))?;
            written.push(path);
        }
    }
    if cli.json {
        writeln!(std::io::stdout().lock(), "{}", heads_json(&output)?)?;
    }
    if let Some(dir) = &args.common.out {
        let path = dir.join("heads.json");
        std::fs::write(&path, heads_json(&output)?).map_err(|err| Error::bad_file(&path, err))?;
        written.push(path);
    }
    for path in written {
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

/// One row per layer group.
pub fn change_rate_tsv(change: &[crate::analysis::change_rate::GroupChange]) -> String {
    let mut text = String::from("Group\tLayers\tInstructionN\tInstructionMean\tInstructionStd\tGeneralN\tGeneralMean\tGeneralStd\tWelchT\tWelchDf\tP\tNote\n");
    for g in change {
        let (t, df, p) = g
            .welch
            .as_ref()
            .map_or((f64::NAN, f64::NAN, f64::NAN), |w| {
                (w.t, w.df, w.p_two_sided)
            });
        let _ = writeln!(
            text,
            "{}\t{}-{}\t{}\t{:.4}\t{:.4}\t{}\t{:.4}\t{:.4}\t{t:.4}\t{df:.1}\t{p:.4}\t{}",
            g.group,
            g.first_layer,
            g.last_layer,
            g.instruction.n,
            g.instruction.mean,
            g.instruction.std,
            g.general.n,
            g.general.mean,
            g.general.std,
            g.note().unwrap_or_default()
        );
    }
    text
}

fn heads_json(output: &HeadsOutput) -> anyhow::Result<String> {
    let value = serde_json::json!({
        "words": output.words,
        "group_size": output.group_size,
        "models": output.results.iter().map(|r| serde_json::json!({
            "slot": r.slot,
            "model": r.model,
            "parameters": r.parameters,
            "cached": r.cached,
            "seconds": r.secs,
            "semantic_vectors": r.pairs.source.label(),
            "layers": r.pairs.layers.iter().map(|l| serde_json::json!({
                "layer": l.layer,
                "dims": l.dims.iter().map(|d| serde_json::json!({
                    "head": d.head,
                    "dim": d.dim,
                    "rank": d.rank,
                    "energy": d.energy,
                    "pairs": d.pairs.iter().map(|p| r.pairs.pair_text(p)).collect::<Vec<_>>(),
                    "similarities": d.pairs.iter().map(|p| p.sim).collect::<Vec<_>>(),
                })).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "change_rate": output.change,
    });
    Ok(serde_json::to_string(&value)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_like_the_papers() {
        assert_eq!(size_label(134_515_008), "135M");
        assert_eq!(size_label(7_000_000_000), "7B");
        assert_eq!(size_label(1_700_000_000), "1.7B");
    }
}
