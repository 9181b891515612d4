//! The consistency measures (METHODS.md §7–§9) as the worker and the CLI run them: data files
//! read (the shipped sets by default), each measure run per model, A and B compared.

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::analysis::consistency::{self, LabeledPair};
use crate::analysis::prediction::{self, FactSet, PredictionResult};
use crate::analysis::recall::{self, RecallProbe};
pub use crate::analysis::results::{
    ConsistencyOutput, ConsistencySettings, Measures, Slot, SlotConsistency,
};
use crate::error::{Error, Result};
use crate::model::LoadedModel;

/// The shipped paraphrase pairs (written for this project; `sample_prompts/`).
pub const DEFAULT_PAIRS: &str = include_str!("../../sample_prompts/paraphrases.tsv");
/// The shipped factual probes.
pub const DEFAULT_FACTS: &str = include_str!("../../sample_prompts/facts.json");
/// The shipped subject descriptions (the "wiki" texts of §9.2).
pub const DEFAULT_SUBJECTS: &str = include_str!("../../sample_prompts/subjects.json");

/// The data of a run, read once.
#[derive(Clone, Debug)]
pub struct ConsistencyData {
    /// Labelled pairs.
    pub pairs: Vec<LabeledPair>,
    /// Factual probes.
    pub facts: FactSet,
    /// Subject descriptions.
    pub subjects: BTreeMap<String, String>,
}

fn read(path: &Path) -> Result<String> {
    if !path.exists() {
        return Err(Error::NotFound {
            path: path.to_path_buf(),
        });
    }
    let bytes = std::fs::read(path).map_err(|e| Error::bad_file(path, e))?;
    String::from_utf8(bytes).map_err(|_| Error::bad_file(path, "not UTF-8 text"))
}

impl ConsistencyData {
    /// Reads the files of `settings` (or the shipped sets); errors name the file and line.
    pub fn load(settings: &ConsistencySettings) -> Result<Self> {
        let (text, name) = match &settings.pairs {
            Some(p) => (read(p)?, p.clone()),
            None => (
                DEFAULT_PAIRS.to_owned(),
                PathBuf::from("sample_prompts/paraphrases.tsv"),
            ),
        };
        let pairs = consistency::parse_pairs(&text).map_err(|(line, msg)| {
            if line == 0 {
                Error::bad_file(&name, format!("pairs: {msg}"))
            } else {
                Error::bad_file(&name, format!("pairs line {line}: {msg}"))
            }
        })?;
        let (text, name) = match &settings.facts {
            Some(p) => (read(p)?, p.clone()),
            None => (
                DEFAULT_FACTS.to_owned(),
                PathBuf::from("sample_prompts/facts.json"),
            ),
        };
        let facts: FactSet = serde_json::from_str(&text).map_err(|e| {
            Error::bad_file(&name, format!("facts: {}", crate::error::json_message(&e)))
        })?;
        facts
            .validate()
            .map_err(|e| Error::bad_file(&name, format!("facts: {e}")))?;
        let (text, name) = match &settings.subjects {
            Some(p) => (read(p)?, p.clone()),
            None => (
                DEFAULT_SUBJECTS.to_owned(),
                PathBuf::from("sample_prompts/subjects.json"),
            ),
        };
        let subjects: BTreeMap<String, String> = serde_json::from_str(&text).map_err(|e| {
            Error::bad_file(
                &name,
                format!("subject descriptions: {}", crate::error::json_message(&e)),
            )
        })?;
        Ok(Self {
            pairs,
            facts,
            subjects,
        })
    }
}

/// The §9 probes of the facts a prediction result got right (known facts), with descriptions.
pub fn known_probes(
    facts: &FactSet,
    predictions: &PredictionResult,
    subjects: &BTreeMap<String, String>,
) -> Vec<RecallProbe> {
    let mut probes = Vec::new();
    for (rel, result) in facts.relations.iter().zip(&predictions.relations) {
        for (fact, fr) in rel.facts.iter().zip(&result.facts) {
            for answer in fr.answers.iter().filter(|a| a.correct) {
                let Some(template) = rel.templates.get(answer.template) else {
                    continue;
                };
                let Some(start) = template.find("[X]") else {
                    continue;
                };
                probes.push(RecallProbe {
                    relation: rel.relation.clone(),
                    query: prediction::query(template, &fact.subject),
                    subject: (start, start + fact.subject.len()),
                    wiki: subjects.get(&fact.subject).cloned(),
                });
            }
        }
    }
    probes
}

/// Runs the chosen measures on each model. `progress` gets (fraction, message); breaking it
/// cancels. `section` gets the results so far each time a measure of a model finishes, so a
/// view can show each section as it comes.
pub fn run_consistency(
    models: &[(Slot, &LoadedModel)],
    settings: &ConsistencySettings,
    progress: &mut dyn FnMut(f32, String) -> ControlFlow<()>,
    section: &mut dyn FnMut(ConsistencyOutput),
) -> Result<ConsistencyOutput> {
    let data = ConsistencyData::load(settings)?;
    let m = settings.measures;
    // Rough shares of the work, for one progress bar.
    let steps: Vec<(&str, f32)> = [
        (m.representations, "paraphrase representations", 1.0),
        (m.predictions || m.recall, "factual predictions", 2.0),
        (m.spread, "instruction paraphrases", 2.0),
        (m.recall, "attribute and extraction rates", 0.5),
    ]
    .into_iter()
    .filter(|s| s.0)
    .map(|s| (s.1, s.2))
    .collect();
    let total: f32 = steps.iter().map(|s| s.1).sum::<f32>().max(1e-6) * models.len().max(1) as f32;
    let mut done = 0f32;
    let mut results: Vec<SlotConsistency> = Vec::with_capacity(models.len());
    let so_far = |results: &[SlotConsistency], current: &SlotConsistency| ConsistencyOutput {
        settings: settings.clone(),
        results: results.iter().chain([current]).cloned().collect(),
        rd_difference: None,
    };
    for &(slot, loaded) in models {
        let start = Instant::now();
        let name = loaded.info.display_name();
        let mut step = |label: &str, share: f32, done: f32, frac: f32| {
            progress((done + share * frac) / total, format!("{name}: {label}"))
        };
        let (model, tok) = (&loaded.model, &loaded.tokenizer);
        let mut out = SlotConsistency {
            slot,
            model: name.clone(),
            representations: None,
            predictions: None,
            spread: None,
            recall: None,
            secs: 0.0,
        };
        if m.representations {
            let share = 1.0;
            out.representations = Some(consistency::representation_consistency(
                model,
                tok,
                &data.pairs,
                settings.pooling,
                settings.batch_size,
                &mut |f| step("paraphrase representations", share, done, f),
            )?);
            done += share;
            section(so_far(&results, &out));
        }
        if m.predictions || m.recall {
            let share = 2.0;
            out.predictions = Some(prediction::prediction_consistency(
                model,
                tok,
                &data.facts,
                settings.mode,
                None,
                &mut |f| step("factual predictions", share, done, f),
            )?);
            done += share;
            section(so_far(&results, &out));
        }
        if m.spread && !data.facts.instructions.is_empty() {
            let share = 2.0;
            let mut subset = data.facts.clone();
            for r in &mut subset.relations {
                r.facts.truncate(settings.spread_facts.max(1));
            }
            let n = data.facts.instructions.len() as f32;
            let mut accuracies = Vec::new();
            for (k, ins) in data.facts.instructions.iter().enumerate() {
                let r = prediction::prediction_consistency(
                    model,
                    tok,
                    &subset,
                    settings.mode,
                    Some(ins),
                    &mut |f| step("instruction paraphrases", share, done, (k as f32 + f) / n),
                )?;
                accuracies.push((ins.clone(), r.macro_avg.accuracy));
            }
            out.spread = Some(prediction::instruction_spread(accuracies));
            done += share;
            section(so_far(&results, &out));
        }
        if m.recall {
            let share = 0.5;
            if let Some(pred) = &out.predictions {
                let probes = known_probes(&data.facts, pred, &data.subjects);
                out.recall = Some(recall::factual_recall(
                    model,
                    tok,
                    &probes,
                    &settings.recall,
                    settings.batch_size,
                    &mut |f| step("attribute and extraction rates", share, done, f),
                )?);
            }
            done += share;
            section(so_far(&results, &out));
        }
        if !m.predictions {
            out.predictions = None;
        }
        out.secs = start.elapsed().as_secs_f64();
        results.push(out);
    }
    let rd_difference = match results.as_slice() {
        [a, b] => match (&a.representations, &b.representations) {
            (Some(ra), Some(rb)) => Some(
                ra.layers
                    .iter()
                    .zip(&rb.layers)
                    .map(|(x, y)| y.rd - x.rd)
                    .collect(),
            ),
            _ => None,
        },
        _ => None,
    };
    Ok(ConsistencyOutput {
        settings: settings.clone(),
        results,
        rd_difference,
    })
}
