//! Token distribution shift (METHODS.md §6) and the logit lens as the worker and the CLI run
//! them: the response data read (a prompt set B answers greedily, or AlignTDS / URIAL JSON),
//! each model's context built, the analysis run on A = base and B = tuned, and the lens of both
//! models at one position.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::analysis::lens;
pub use crate::analysis::lens::{LensOutput, LensRequest};
use crate::analysis::shift::{self, ResponseShift, ShiftSide};
pub use crate::analysis::shift::{
    BaseTemplate, ShiftData, ShiftItem, ShiftRecord, ShiftRun, ShiftSettings, ShiftTimings,
};
use crate::error::{Error, Result};
use crate::model::generate::{GenerateConfig, Generator};
use crate::model::{LoadedModel, NoHook};
use crate::worker::job::Slot;
use crate::worker::runner::render_prompt;

/// The text of a base template, `{input}` where the prompt goes.
pub fn template_text(template: &BaseTemplate) -> Result<String> {
    match template {
        BaseTemplate::Urial => Ok(shift::URIAL_TEMPLATE.to_owned()),
        BaseTemplate::Raw => Ok("{input}".to_owned()),
        BaseTemplate::File(path) => {
            let text = std::fs::read_to_string(path).map_err(|err| Error::BadFile {
                path: path.clone(),
                message: format!("cannot read the base template ({err})"),
            })?;
            if !text.contains("{input}") {
                return Err(Error::BadFile {
                    path: path.clone(),
                    message: "the base template has no `{input}` placeholder".to_owned(),
                });
            }
            Ok(text)
        }
    }
}

/// Reads AlignTDS / URIAL JSON; a bad record names its index.
pub fn parse_aligntds(text: &str, path: &Path) -> Result<Vec<ShiftRecord>> {
    let value: serde_json::Value = serde_json::from_str(text).map_err(|err| Error::BadFile {
        path: path.to_owned(),
        message: format!("not JSON ({err})"),
    })?;
    let Some(items) = value.as_array() else {
        return Err(Error::BadFile {
            path: path.to_owned(),
            message: "expected a JSON list of {id, pure_input, input, output} records".to_owned(),
        });
    };
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let bad = |message: &str| Error::BadFile {
                path: path.to_owned(),
                message: format!("record {i}: {message}"),
            };
            let text_field = |key: &str| item.get(key).and_then(|v| v.as_str()).map(str::to_owned);
            let prompt = text_field("pure_input")
                .or_else(|| text_field("instruction"))
                .ok_or_else(|| bad("no `pure_input` text"))?;
            let output = match item.get("output") {
                Some(serde_json::Value::String(s)) => s.clone(),
                Some(serde_json::Value::Array(list)) => list
                    .first()
                    .and_then(|v| v.as_str())
                    .ok_or_else(|| bad("`output` is an empty list or holds no text"))?
                    .to_owned(),
                _ => return Err(bad("no `output` (a text or a list of texts)")),
            };
            if output.trim().is_empty() {
                return Err(bad("the `output` text is empty"));
            }
            let id = match item.get("id") {
                Some(serde_json::Value::String(s)) => s.clone(),
                Some(v @ serde_json::Value::Number(_)) => v.to_string(),
                _ => i.to_string(),
            };
            Ok(ShiftRecord {
                id,
                prompt,
                input: text_field("input").filter(|s| !s.is_empty()),
                output: Some(output),
            })
        })
        .collect()
}

/// Reads a prompt file: JSONL records with `prompt`, `instruction` or `pure_input`; or text
/// with prompts separated by `---` lines (the `sample_prompts/` format), or one per line.
pub fn parse_prompts(text: &str, path: &Path) -> Result<Vec<ShiftRecord>> {
    let is_jsonl = path.extension().is_some_and(|e| e == "jsonl");
    let prompts: Vec<String> = if is_jsonl {
        text.lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(n, line)| {
                let bad = |message: String| Error::BadFile {
                    path: path.to_owned(),
                    message: format!("line {}: {message}", n + 1),
                };
                let v: serde_json::Value =
                    serde_json::from_str(line).map_err(|err| bad(format!("not JSON ({err})")))?;
                ["prompt", "instruction", "pure_input"]
                    .iter()
                    .find_map(|k| v.get(*k).and_then(|s| s.as_str()))
                    .map(str::to_owned)
                    .ok_or_else(|| bad("no `prompt`, `instruction` or `pure_input` text".into()))
            })
            .collect::<Result<_>>()?
    } else if text.lines().any(|l| l.trim() == "---") {
        crate::samples::parse(text).1
    } else {
        text.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(str::to_owned)
            .collect()
    };
    if prompts.is_empty() {
        return Err(Error::BadFile {
            path: path.to_owned(),
            message: "no prompts in the file".to_owned(),
        });
    }
    Ok(records_of(prompts))
}

fn records_of(prompts: Vec<String>) -> Vec<ShiftRecord> {
    prompts
        .into_iter()
        .enumerate()
        .map(|(i, prompt)| ShiftRecord {
            id: i.to_string(),
            prompt,
            input: None,
            output: None,
        })
        .collect()
}

/// The records of `data`.
pub fn load_records(data: &ShiftData) -> Result<Vec<ShiftRecord>> {
    let read = |path: &PathBuf| -> Result<String> {
        if !path.exists() {
            return Err(Error::NotFound { path: path.clone() });
        }
        std::fs::read_to_string(path).map_err(|err| Error::BadFile {
            path: path.clone(),
            message: format!("cannot read ({err})"),
        })
    };
    match data {
        ShiftData::Shipped(name) => {
            let sets = crate::samples::builtin();
            let Some(set) = sets.iter().find(|s| s.name == name) else {
                let names: Vec<&str> = sets.iter().map(|s| s.name).collect();
                return Err(Error::invalid(
                    "prompt set",
                    format!("no shipped set `{name}` (shipped: {})", names.join(", ")),
                ));
            };
            Ok(records_of(set.prompts.clone()))
        }
        ShiftData::Prompts(path) => parse_prompts(&read(path)?, path),
        ShiftData::AlignTds(path) => parse_aligntds(&read(path)?, path),
    }
}

fn greedy(loaded: &LoadedModel, ids: &[u32], max_new_tokens: usize) -> Result<String> {
    let cfg = GenerateConfig {
        max_new_tokens,
        ..GenerateConfig::default()
    };
    let mut generator = Generator::new(&loaded.model, &loaded.tokenizer, ids, &cfg, &mut NoHook)?;
    while generator.step(&mut NoHook)?.is_some() {}
    Ok(generator.finish()?.text)
}

/// §6 on `base` (A) and `tuned` (B) over the settings' records. Progress gets the fraction
/// done and a message; when it breaks, the records analysed so far are returned with
/// `cancelled` set.
pub fn run_shift(
    base: &LoadedModel,
    tuned: &LoadedModel,
    settings: &ShiftSettings,
    progress: &mut dyn FnMut(f32, String) -> ControlFlow<()>,
) -> Result<ShiftRun> {
    settings.config.validate()?;
    let template = template_text(&settings.base_template)?;
    let mut records = load_records(&settings.data)?;
    if let Some(max) = settings.max_items {
        records.truncate(max.max(1));
    }
    let n = records.len().max(1) as f32;
    let mut items = Vec::with_capacity(records.len());
    let mut cancelled = false;
    let (mut generate_secs, mut shift_secs) = (0.0, 0.0);
    for (i, record) in records.into_iter().enumerate() {
        if progress(
            i as f32 / n,
            format!("response {} of {}", i + 1, n as usize),
        )
        .is_break()
        {
            cancelled = true;
            break;
        }
        let context_err = |err: Error| -> Error {
            Error::invalid("record", format!("record {} (id {}): {err}", i, record.id))
        };
        // The aligned context: the record's own templated input (tokenized with special
        // tokens, keeping AlignTDS's double BOS), or B's chat template.
        let aligned_context = if let Some(input) = &record.input {
            tuned.tokenizer.encode(input, true).map_err(context_err)?
        } else {
            let chat = tuned.chat_template.is_some();
            render_prompt(tuned, &record.prompt, chat)
                .map_err(context_err)?
                .1
        };
        let response = if let Some(o) = &record.output {
            o.clone()
        } else {
            let t0 = Instant::now();
            let text =
                greedy(tuned, &aligned_context, settings.max_new_tokens).map_err(context_err)?;
            generate_secs += t0.elapsed().as_secs_f64();
            text
        };
        if response.trim().is_empty() {
            continue;
        }
        let base_text = template.replace("{input}", &record.prompt);
        let base_context = base
            .tokenizer
            .encode(&base_text, true)
            .map_err(context_err)?;
        let t0 = Instant::now();
        let shift = shift::shift_response(
            ShiftSide {
                model: &tuned.model,
                tokenizer: &tuned.tokenizer,
                context: &aligned_context,
            },
            ShiftSide {
                model: &base.model,
                tokenizer: &base.tokenizer,
                context: &base_context,
            },
            &response,
            &settings.config,
        )
        .map_err(context_err)?;
        shift_secs += t0.elapsed().as_secs_f64();
        items.push(ShiftItem {
            id: record.id,
            prompt: record.prompt,
            shift,
        });
    }
    let shifts: Vec<ResponseShift> = items.iter().map(|i| i.shift.clone()).collect();
    Ok(ShiftRun {
        base_model: base.info.display_name(),
        tuned_model: tuned.info.display_name(),
        settings: settings.clone(),
        summary: shift::summarize(&shifts),
        items,
        cancelled,
        timings: ShiftTimings {
            generate_s: generate_secs,
            shift_s: shift_secs,
        },
    })
}

/// Runs the lens on each model of `models` (A, then B).
pub fn run_lens(models: &[(Slot, &LoadedModel)], request: &LensRequest) -> Result<LensOutput> {
    if models.is_empty() {
        return Err(Error::invalid("model slot", "load a model first"));
    }
    let ids_of = |slot: Slot, loaded: &LoadedModel| -> Result<(Vec<u32>, usize)> {
        match request {
            LensRequest::Prompt {
                prompt,
                chat,
                position,
            } => {
                let ids = render_prompt(loaded, prompt, *chat)?.1;
                if ids.is_empty() {
                    return Err(Error::EmptyPrompt);
                }
                let pos = position.unwrap_or(ids.len() - 1);
                Ok((ids, pos))
            }
            LensRequest::Ids { a, b, .. } => {
                let ids = if slot == Slot::A {
                    a.clone()
                } else {
                    b.clone()
                };
                if ids.is_empty() {
                    return Err(Error::EmptyPrompt);
                }
                let pos = ids.len() - 1;
                Ok((ids, pos))
            }
        }
    };
    // The target: B's token (given, or B's own top token), else the only model's own.
    let chooser = models
        .iter()
        .find(|(s, _)| *s == Slot::B)
        .or_else(|| models.first())
        .copied();
    let target = match (request, chooser) {
        (LensRequest::Ids { target, .. }, Some((_, loaded))) => {
            let vocab = loaded.tokenizer.vocab_size();
            if *target as usize >= vocab {
                return Err(Error::invalid(
                    "target token",
                    format!("{target} is outside the vocabulary of {vocab}"),
                ));
            }
            loaded.tokenizer.tokens(&[*target]).concat()
        }
        (LensRequest::Prompt { .. }, Some((slot, loaded))) => {
            let (ids, pos) = ids_of(slot, loaded)?;
            lens::logit_lens(&loaded.model, &loaded.tokenizer, &ids, pos, None)?.target
        }
        (_, None) => return Err(Error::invalid("model slot", "load a model first")),
    };
    let mut curves = Vec::with_capacity(models.len());
    for &(slot, loaded) in models {
        let (ids, pos) = ids_of(slot, loaded)?;
        let id = loaded.tokenizer.token_to_id(&target).ok_or_else(|| {
            Error::invalid(
                "target token",
                format!(
                    "`{target}` is not in the vocabulary of slot {slot:?}'s model; the lens \
                     needs a token both models know"
                ),
            )
        })?;
        let curve = lens::logit_lens(&loaded.model, &loaded.tokenizer, &ids, pos, Some(id))?;
        curves.push((slot, loaded.info.display_name(), curve));
    }
    Ok(LensOutput { target, curves })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligntds_records_are_read_and_bad_ones_named() -> Result<()> {
        let path = Path::new("Llama-2-7b-chat-hf.json");
        let text = r#"[{"id": 3, "pure_input": "Hi", "input": "<s>[INST] Hi [/INST]", "output": ["Hello!"]},
                       {"id": "b", "pure_input": "Q", "output": "A"}]"#;
        let r = parse_aligntds(text, path)?;
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].id, "3");
        assert_eq!(r[0].input.as_deref(), Some("<s>[INST] Hi [/INST]"));
        assert_eq!(r[0].output.as_deref(), Some("Hello!"));
        assert_eq!(r[1].input, None);
        let err = parse_aligntds(r#"[{"pure_input": "x", "output": []}]"#, path)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains("record 0") && err.contains("Llama-2-7b-chat-hf.json"),
            "{err}"
        );
        let err = parse_aligntds(
            r#"[{"pure_input": "x", "output": ["a"]}, {"output": ["b"]}]"#,
            path,
        )
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(
            err.contains("record 1") && err.contains("pure_input"),
            "{err}"
        );
        assert!(parse_aligntds("{}", path).is_err());
        Ok(())
    }

    #[test]
    fn prompt_files_in_three_layouts() -> Result<()> {
        let lines = parse_prompts("# a set\nfirst\n\nsecond\n", Path::new("p.txt"))?;
        assert_eq!(lines.len(), 2);
        let blocks = parse_prompts("# d\nline one\nline two\n---\nnext", Path::new("p.txt"))?;
        assert_eq!(blocks.len(), 2);
        assert_eq!(blocks[0].prompt, "line one\nline two");
        let jsonl = parse_prompts(
            "{\"prompt\": \"a\"}\n{\"instruction\": \"b\"}\n",
            Path::new("p.jsonl"),
        )?;
        assert_eq!(jsonl[1].prompt, "b");
        let err = parse_prompts("{\"prompt\": \"a\"}\n{\"x\": 1}\n", Path::new("p.jsonl"))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("line 2"), "{err}");
        assert!(parse_prompts("\n", Path::new("p.txt")).is_err());
        Ok(())
    }

    #[test]
    fn a_stopped_run_keeps_the_responses_so_far() -> Result<()> {
        use crate::model::tiny::{tiny_model, tiny_options};
        let a = tiny_model(7, &tiny_options(candle_core::DType::F32))?;
        let dir = tempfile::tempdir()?;
        let data = dir.path().join("r.json");
        std::fs::write(
            &data,
            r#"[{"pure_input": "the cat", "input": "the cat", "output": ["sat on the mat"]},
                {"pure_input": "the dog", "input": "the dog", "output": ["ran to the sea"]},
                {"pure_input": "the sea", "input": "the sea", "output": ["is warm"]}]"#,
        )?;
        let settings = ShiftSettings {
            data: ShiftData::AlignTds(data),
            base_template: BaseTemplate::Raw,
            ..ShiftSettings::default()
        };
        let mut calls = 0;
        let run = run_shift(&a, &a, &settings, &mut |_, _| {
            calls += 1;
            if calls > 2 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })?;
        assert!(run.cancelled);
        assert_eq!(run.items.len(), 2);
        assert_eq!(
            run.summary.positions,
            run.items
                .iter()
                .map(|i| i.shift.positions.len())
                .sum::<usize>()
        );
        let full = run_shift(&a, &a, &settings, &mut |_, _| ControlFlow::Continue(()))?;
        assert!(!full.cancelled);
        assert_eq!(full.items.len(), 3);
        // The records' inputs are the raw prompts, as the raw base template: both sides see
        // the same context.
        assert_eq!(full.summary.counts[0], full.summary.positions);
        Ok(())
    }

    #[test]
    fn base_templates() -> Result<()> {
        assert!(template_text(&BaseTemplate::Urial)?.contains("# Query:"));
        assert_eq!(BaseTemplate::parse("raw"), BaseTemplate::Raw);
        let dir = tempfile::tempdir()?;
        let bad = dir.path().join("t.txt");
        std::fs::write(&bad, "no placeholder")?;
        assert!(template_text(&BaseTemplate::File(bad)).is_err());
        Ok(())
    }
}
