//! The instruction-vector analysis (METHODS.md §4) as the worker and the CLI run it: task files
//! read (the shipped tasks by name), each model run, A's and B's heads compared, and the weight
//! fingerprint a saved vector carries.

use std::ops::ControlFlow;
use std::path::Path;

use candle_core::Tensor;

use crate::analysis::icl;
use crate::analysis::iv::{self, IclTask};
pub use crate::analysis::results::{IvOutput, IvSettings, Slot, SlotIv, TaskSource};
use crate::cache::KeyBuilder;
use crate::error::{Error, Result};
use crate::model::lora::Linear;
use crate::model::{LoadedModel, Weight};

/// The tasks shipped in `sample_prompts/icl/` (subsets of Todd et al.'s files, MIT licence; see
/// the README there), by name.
pub const SHIPPED_TASKS: [(&str, &str); 7] = [
    (
        "antonym",
        include_str!("../../sample_prompts/icl/antonym.json"),
    ),
    (
        "capitalize",
        include_str!("../../sample_prompts/icl/capitalize.json"),
    ),
    (
        "country-capital",
        include_str!("../../sample_prompts/icl/country-capital.json"),
    ),
    (
        "english-french",
        include_str!("../../sample_prompts/icl/english-french.json"),
    ),
    (
        "person-occupation",
        include_str!("../../sample_prompts/icl/person-occupation.json"),
    ),
    (
        "present-past",
        include_str!("../../sample_prompts/icl/present-past.json"),
    ),
    (
        "singular-plural",
        include_str!("../../sample_prompts/icl/singular-plural.json"),
    ),
];

/// Reads one task; errors name the file and the item or line.
pub fn load_task(source: &TaskSource) -> Result<IclTask> {
    let (text, path) = match source {
        TaskSource::Shipped(name) => {
            let Some((_, text)) = SHIPPED_TASKS.iter().find(|(n, _)| n == name) else {
                let names: Vec<&str> = SHIPPED_TASKS.iter().map(|(n, _)| *n).collect();
                return Err(Error::invalid(
                    "task",
                    format!("no shipped task `{name}` (shipped: {})", names.join(", ")),
                ));
            };
            (
                (*text).to_owned(),
                Path::new("sample_prompts/icl").join(format!("{name}.json")),
            )
        }
        TaskSource::File(path) => {
            if !path.exists() {
                return Err(Error::NotFound { path: path.clone() });
            }
            let bytes = std::fs::read(path).map_err(|e| Error::bad_file(path, e))?;
            let text =
                String::from_utf8(bytes).map_err(|_| Error::bad_file(path, "not UTF-8 text"))?;
            (text, path.clone())
        }
    };
    let items = icl::parse_task(&text).map_err(|msg| {
        // serde's own message carries the line; ours names the item.
        Error::bad_file(&path, format!("task: {msg}"))
    })?;
    Ok(IclTask {
        name: source.name(),
        items,
    })
}

/// Reads every task of `settings`, and checks each has enough examples for the shots.
pub fn load_tasks(settings: &IvSettings) -> Result<Vec<IclTask>> {
    if settings.tasks.is_empty() {
        return Err(Error::invalid("task", "choose at least one task"));
    }
    let cfg = &settings.config;
    let shots = cfg
        .shots
        .max(cfg.mean_shots)
        .max(if cfg.evaluate { cfg.eval_shots } else { 0 });
    settings
        .tasks
        .iter()
        .map(|source| {
            let task = load_task(source)?;
            let train = icl::split_task(&task.items, &cfg.split).train.len();
            if train < shots.max(1) {
                let what = match source {
                    TaskSource::File(p) => p.display().to_string(),
                    TaskSource::Shipped(n) => n.clone(),
                };
                return Err(Error::invalid(
                    "task",
                    format!(
                        "{what}: {} examples leave {train} for demonstrations, fewer than the {shots} shots",
                        task.items.len()
                    ),
                ));
            }
            Ok(task)
        })
        .collect()
}

fn hash_rows(key: &mut KeyBuilder, t: &Tensor) -> Result<()> {
    let rows = t.dim(0)?.min(2);
    key.tensor(&t.narrow(0, 0, rows)?)?;
    Ok(())
}

/// The first two rows of a weight, dense or kept as stored (the same values either way).
fn hash_weight_rows(key: &mut KeyBuilder, w: &Weight) -> Result<()> {
    let rows = w.rows().min(2);
    key.weight(&w.narrow_rows(0, rows)?)?;
    Ok(())
}

fn hash_linear(key: &mut KeyBuilder, linear: &Linear) -> Result<()> {
    hash_weight_rows(key, &linear.weight)?;
    if let Some(lora) = &linear.lora {
        key.text("adapter").bytes(&lora.scale.to_le_bytes());
        hash_rows(key, &lora.a)?;
        hash_rows(key, &lora.b)?;
    }
    Ok(())
}

/// A fingerprint of a model's weights (two rows of every matrix, and every adapter): equal for
/// the same checkpoint and adapter, different for another model or another fine-tune.
pub fn fingerprint(loaded: &LoadedModel) -> Result<String> {
    let model = &loaded.model;
    let mut key = KeyBuilder::default();
    key.text(&format!("{:?}", model.config()));
    hash_weight_rows(&mut key, &model.embed_tokens)?;
    for layer in &model.layers {
        for linear in layer.linears() {
            hash_linear(&mut key, linear)?;
        }
    }
    hash_linear(&mut key, &model.lm_head)?;
    Ok(key.finish())
}

/// Runs the analysis on every model (A, then B), and compares their heads.
pub fn run_iv(
    models: &[(Slot, &LoadedModel)],
    settings: &IvSettings,
    progress: &mut dyn FnMut(f32, String) -> ControlFlow<()>,
) -> Result<IvOutput> {
    let tasks = load_tasks(settings)?;
    let n = models.len().max(1) as f32;
    let mut results = Vec::with_capacity(models.len());
    for (i, &(slot, loaded)) in models.iter().enumerate() {
        let run = iv::run_tasks(
            &loaded.model,
            &loaded.tokenizer,
            &tasks,
            &settings.config,
            &mut |f, message| progress((i as f32 + f) / n, format!("{slot:?}: {message}")),
        )?;
        results.push(SlotIv {
            slot,
            model: loaded.info.display_name(),
            fingerprint: fingerprint(loaded)?,
            run,
        });
    }
    let shared = match results.as_slice() {
        [a, b] => a
            .run
            .tasks
            .iter()
            .zip(&b.run.tasks)
            .map(|(x, y)| iv::shared_heads(&x.top, &y.top))
            .collect(),
        _ => Vec::new(),
    };
    Ok(IvOutput {
        settings: settings.clone(),
        results,
        shared,
    })
}
