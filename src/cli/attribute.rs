//! `tunelens attribute`: one prompt or a JSONL batch of prompts, one model or two side by side;
//! text or JSON on stdout, figures and data files with `--out`, batch progress on stderr.

use std::io::{IsTerminal as _, Write};
use std::path::{Path, PathBuf};

use anyhow::Context as _;

use super::{AttributeArgs, Cli};
use crate::analysis::attribution::{by_words, AttributionConfig, Instructions};
use crate::analysis::types::Matrix;
use crate::export;
use crate::worker::job::{Job, JobOutput, SlotAttribution};
use crate::worker::runner::{run_job, WorkerCtx};

/// One prompt of a batch file.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Sample {
    prompt: String,
    #[serde(default)]
    response: Option<String>,
    #[serde(default)]
    instructions: Option<Vec<String>>,
    #[serde(default)]
    id: Option<serde_json::Value>,
}

pub(super) fn run(cli: &Cli, ctx: &mut WorkerCtx, args: &AttributeArgs) -> anyhow::Result<()> {
    let slots = super::load_models(cli, ctx, &args.model.model, args.model_b.as_deref())?;
    let instructions = if args.no_instructions {
        Instructions::Spans(Vec::new())
    } else if args.instructions.is_empty() {
        Instructions::Auto
    } else {
        Instructions::Spans(args.instructions.clone())
    };
    let job = |prompt: &str, response: Option<String>, instructions: Instructions| Job::Attribute {
        slots: slots.clone(),
        prompt: prompt.to_owned(),
        response,
        chat: args.chat,
        instructions,
        max_new_tokens: args.max_new_tokens,
    };
    let Some(file) = &args.prompts else {
        let prompt = args.prompt.clone().unwrap_or_default();
        let results = attributed(
            run_job(
                ctx,
                1,
                job(&prompt, args.response.clone(), instructions),
                &mut |_| {},
            )?,
            args.words,
        )?;
        if let Some(dir) = &args.out {
            for path in write_files(dir, &prompt, &results, None)? {
                eprintln!("wrote {}", path.display());
            }
        }
        let mut out = std::io::stdout().lock();
        if cli.json {
            let value = match results.as_slice() {
                [one] => result_json(one),
                many => serde_json::Value::Array(many.iter().map(result_json).collect()),
            };
            writeln!(out, "{value}")?;
        } else {
            for result in &results {
                print_text(&mut out, result)?;
            }
        }
        return Ok(());
    };

    let text = std::fs::read_to_string(file)
        .with_context(|| format!("cannot read prompts file {}", file.display()))?;
    let lines: Vec<(usize, &str)> = text
        .lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(n, line)| (n + 1, line))
        .collect();
    let mut failures = 0usize;
    let mut out = std::io::stdout().lock();
    for (done, &(line_no, line)) in lines.iter().enumerate() {
        progress_bar(done, lines.len());
        let outcome = parse_sample(line).and_then(|sample| {
            let instructions = match &sample.instructions {
                Some(spans) => Instructions::Spans(spans.clone()),
                None => instructions.clone(),
            };
            let response = sample.response.clone().or_else(|| args.response.clone());
            let results = attributed(
                run_job(
                    ctx,
                    1,
                    job(&sample.prompt, response, instructions),
                    &mut |_| {},
                )?,
                args.words,
            )?;
            if let Some(dir) = &args.out {
                write_files(dir, &sample.prompt, &results, Some(line_no))?;
            }
            Ok((sample, results))
        });
        let value = match outcome {
            Ok((sample, results)) => serde_json::json!({
                "line": line_no,
                "id": sample.id,
                "prompt": sample.prompt,
                "instruction_score": results.iter()
                    .map(|r| r.attribution.instruction_score)
                    .collect::<Vec<_>>(),
                "results": results.iter().map(result_json).collect::<Vec<_>>(),
            }),
            Err(err) => {
                failures += 1;
                let message = format!("{err:#}");
                eprintln!("\r{}:{line_no}: {message}", file.display());
                serde_json::json!({"line": line_no, "error": message})
            }
        };
        writeln!(out, "{value}")?;
        out.flush()?;
    }
    progress_bar(lines.len(), lines.len());
    eprintln!();
    if failures > 0 {
        anyhow::bail!(
            "{failures} of {} prompts failed (see the lines with \"error\"): {}",
            lines.len(),
            file.display()
        );
    }
    Ok(())
}

fn attributed(output: JobOutput, words: bool) -> anyhow::Result<Vec<SlotAttribution>> {
    let JobOutput::Attributed(mut results) = output else {
        anyhow::bail!("unexpected job output {output:?}");
    };
    if words {
        for r in &mut results {
            r.attribution = by_words(&r.attribution, &AttributionConfig::default());
        }
    }
    Ok(results)
}

/// A batch line: a JSON object (see [`Sample`]) or a bare JSON string.
fn parse_sample(line: &str) -> anyhow::Result<Sample> {
    let value: serde_json::Value = serde_json::from_str(line)
        .map_err(|err| anyhow::anyhow!("not JSON: {}", crate::error::json_message(&err)))?;
    if let serde_json::Value::String(prompt) = value {
        return Ok(Sample {
            prompt,
            response: None,
            instructions: None,
            id: None,
        });
    }
    serde_json::from_value(value)
        .map_err(|err| anyhow::anyhow!("bad sample: {}", crate::error::json_message(&err)))
}

/// `[=====>     ] 12/40` on stderr, redrawn in place on a terminal.
fn progress_bar(done: usize, total: usize) {
    const WIDTH: usize = 30;
    let filled = (done * WIDTH).checked_div(total).unwrap_or(WIDTH);
    let bar = format!(
        "[{}{}] {done}/{total} prompts",
        "=".repeat(filled),
        " ".repeat(WIDTH - filled)
    );
    let mut err = std::io::stderr();
    if err.is_terminal() {
        let _ = write!(err, "\r{bar}");
    } else {
        let _ = writeln!(err, "{bar}");
    }
    let _ = err.flush();
}

/// Figures and data of one prompt's attributions into `dir`.
fn write_files(
    dir: &Path,
    prompt: &str,
    results: &[SlotAttribution],
    line_no: Option<usize>,
) -> anyhow::Result<Vec<PathBuf>> {
    let mut stem = export::comparison_stem(
        "attribution",
        results.iter().map(|r| r.model.as_str()),
        prompt,
    );
    if let Some(n) = line_no {
        stem = format!("{stem}_line{n}");
    }
    let items: Vec<(String, &crate::analysis::types::Attribution)> = results
        .iter()
        .map(|r| (format!("{:?}: {}", r.slot, r.model), &r.attribution))
        .collect();
    Ok(export::write_attribution(dir, &stem, &items)?)
}

/// The JSON form of one model's attribution: matrices as nested arrays, rows = prompt tokens.
pub(super) fn result_json(r: &SlotAttribution) -> serde_json::Value {
    let rows = |m: &Matrix| -> Vec<Vec<f32>> { (0..m.rows).map(|i| m.row(i).to_vec()).collect() };
    let a = &r.attribution;
    serde_json::json!({
        "slot": r.slot,
        "model": r.model,
        "response": r.response,
        "input_ids": a.input_ids,
        "input_tokens": a.input_tokens,
        "output_ids": a.output_ids,
        "output_tokens": a.output_tokens,
        "raw": rows(&a.raw),
        "quantized": rows(&a.quantized),
        "density": a.density,
        "instruction_mask": a.instruction_mask,
        "instruction_score": a.instruction_score,
        "input_words": a.input_words,
        "output_words": a.output_words,
    })
}

/// The readable form: the response, then density per prompt token with instruction marks.
pub(super) fn print_text(out: &mut dyn Write, r: &SlotAttribution) -> anyhow::Result<()> {
    let a = &r.attribution;
    writeln!(out, "model {:?}: {}", r.slot, r.model)?;
    writeln!(out, "response: {}", r.response)?;
    writeln!(out, "token\tdensity\tinstruction")?;
    for (i, token) in a.input_tokens.iter().enumerate() {
        let marked = a
            .instruction_mask
            .as_ref()
            .and_then(|m| m.get(i).copied())
            .unwrap_or(false);
        let density = a.density.get(i).copied().unwrap_or(0.0);
        writeln!(
            out,
            "{token}\t{density:.4}\t{}",
            if marked { "*" } else { "" }
        )?;
    }
    if let Some(score) = a.instruction_score {
        writeln!(out, "instruction score: {score:.4}")?;
    }
    Ok(())
}
