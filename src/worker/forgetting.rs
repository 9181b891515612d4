//! The forgetting evaluation as the worker and the CLI run it (METHODS.md §5.5): the shipped or
//! chosen evaluation sets, the base model and each stage's model (the stages' adapters merged in
//! order, as continual training built them), scored by [`crate::train::forgetting`].

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::adapter::{attach_peft_adapter, merge_adapters};
use crate::model::LoadedModel;
use crate::train::forgetting::{evaluate, parse_set, read_set, EvalSet, ForgettingReport};

/// The shipped evaluation sets (`sample_prompts/forgetting/`, built by
/// `scripts/gen-forgetting-data` from the shipped tasks and instructions).
pub const SHIPPED_SETS: [(&str, &str); 4] = [
    (
        "general",
        include_str!("../../sample_prompts/forgetting/general.json"),
    ),
    (
        "icl",
        include_str!("../../sample_prompts/forgetting/icl.json"),
    ),
    (
        "task-present-past",
        include_str!("../../sample_prompts/forgetting/task-present-past.json"),
    ),
    (
        "task-singular-plural",
        include_str!("../../sample_prompts/forgetting/task-singular-plural.json"),
    ),
];

/// What to evaluate.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ForgettingRequest {
    /// Set files; empty means the shipped sets.
    pub sets: Vec<PathBuf>,
    /// The stages after the base, in order: a label and the stage's adapter folder. Stage `k`
    /// is evaluated as the base with adapters `1..=k` merged.
    pub stages: Vec<(String, PathBuf)>,
    /// At most this many items per set (0: all).
    pub max_items: usize,
}

/// The sets of a request (the shipped ones when it names none).
pub fn load_sets(request: &ForgettingRequest) -> Result<Vec<EvalSet>> {
    let mut sets = if request.sets.is_empty() {
        SHIPPED_SETS
            .iter()
            .map(|(name, text)| parse_set(name, text).map_err(|e| Error::invalid("shipped set", e)))
            .collect::<Result<Vec<_>>>()?
    } else {
        request
            .sets
            .iter()
            .map(|p| read_set(p))
            .collect::<Result<Vec<_>>>()?
    };
    if request.max_items > 0 {
        for set in &mut sets {
            set.items.truncate(request.max_items);
        }
    }
    Ok(sets)
}

/// Scores the slot's model and each stage. `on_progress(frac, message)` may cancel.
pub fn run_forgetting(
    loaded: &LoadedModel,
    request: &ForgettingRequest,
    on_progress: &mut dyn FnMut(f32, String) -> std::ops::ControlFlow<()>,
) -> Result<ForgettingReport> {
    let sets = load_sets(request)?;
    let variants = request.stages.len() + 1;
    let mut model = loaded.model.clone();
    let mut report = ForgettingReport {
        models: Vec::with_capacity(variants),
        decoding: "greedy (FvForgetting samples with top_p 0.9, temperature 0.1)".to_owned(),
    };
    for v in 0..variants {
        let label = if v == 0 {
            "base".to_owned()
        } else {
            let (label, dir) = &request.stages[v - 1];
            attach_peft_adapter(&mut model, dir)?;
            merge_adapters(&mut model)?;
            label.clone()
        };
        #[allow(clippy::cast_precision_loss)]
        let scores = evaluate(
            &model,
            &loaded.tokenizer,
            &label,
            &sets,
            &mut |done, total| {
                let frac = (v as f32 + done as f32 / total.max(1) as f32) / variants as f32;
                on_progress(frac, format!("{label}: item {done} of {total}"))
            },
        )?;
        report.models.push(scores);
    }
    Ok(report)
}
