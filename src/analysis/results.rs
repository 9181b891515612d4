//! The plain-data results of the analyses as the views show them and the exporters write them:
//! one model's result tagged with its slot, and the A/B comparison of two. Serialisable, with no
//! channels, threads or files; the worker fills them, `export/` and `ui/` read them.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::analysis::change_rate::GroupChange;
use crate::analysis::consistency::{ConsistencyResult, Pooling};
use crate::analysis::ffn_concepts::{Concepts, LayerAlignment};
use crate::analysis::head_pairs::HeadPairs;
use crate::analysis::prediction::{InstructionSpread, PredictionMode, PredictionResult};
use crate::analysis::recall::{RecallConfig, RecallResult};
use crate::analysis::types::Attribution;

/// Which model slot a job uses: A (e.g. base) or B (e.g. tuned).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Slot {
    /// Slot A.
    A,
    /// Slot B.
    B,
}

/// The attribution of one model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SlotAttribution {
    /// Which slot.
    pub slot: Slot,
    /// The model's display name.
    pub model: String,
    /// The (given or generated) response.
    pub response: String,
    /// The result at token level.
    pub attribution: Attribution,
    /// Per prompt token, whether it comes from the chat template rather than the user's prompt
    /// (all `false` without a template); the view can hide those rows.
    #[serde(default)]
    pub template_mask: Vec<bool>,
}

/// Marks the tokens of `rendered` (a chat-template rendering of `prompt`) that lie outside the
/// user's prompt, from each token's byte span; all `false` when the prompt is not found.
pub fn template_mask(offsets: &[(usize, usize)], rendered: &str, prompt: &str) -> Vec<bool> {
    let prompt = prompt.trim();
    let Some(start) = rendered.find(prompt).filter(|_| !prompt.is_empty()) else {
        return vec![false; offsets.len()];
    };
    let end = start + prompt.len();
    offsets
        .iter()
        .map(|&(a, b)| b <= start || a >= end || a == b)
        .collect()
}

/// The concepts of one model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SlotConcepts {
    /// Which slot.
    pub slot: Slot,
    /// The model's display name.
    pub model: String,
    /// Parameter count, for the `Size` column.
    pub parameters: usize,
    /// The result.
    pub concepts: Concepts,
    /// Whether it came from the cache.
    pub cached: bool,
    /// Seconds to compute or load it.
    pub secs: f64,
}

/// `Job::Concepts` output.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConceptsOutput {
    /// The word list used.
    pub words: String,
    /// Per slot, in request order.
    pub results: Vec<SlotConcepts>,
    /// With two results: the second (tuned) aligned to the first (base), per layer — the §2.3
    /// deterministic comparison, an extension not in the original method.
    pub alignment: Option<Vec<LayerAlignment>>,
}

/// The head pairs of one model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SlotHeads {
    /// Which slot.
    pub slot: Slot,
    /// The model's display name.
    pub model: String,
    /// Parameter count, for the `Size` column.
    pub parameters: usize,
    /// The result.
    pub pairs: HeadPairs,
    /// Whether it came from the cache.
    pub cached: bool,
    /// Seconds to compute or load it.
    pub secs: f64,
}

/// `Job::Heads` output.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HeadsOutput {
    /// The word list used.
    pub words: String,
    /// Per slot, in request order.
    pub results: Vec<SlotHeads>,
    /// With two results: the §3.5 change rates from the first (base) to the second (tuned).
    pub change: Option<Vec<GroupChange>>,
    /// Layers per group for `change`.
    pub group_size: usize,
}

/// Which measures to run (a set of check boxes in the view).
#[allow(clippy::struct_excessive_bools)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Measures {
    /// §7 representation consistency.
    pub representations: bool,
    /// §8 prediction consistency.
    pub predictions: bool,
    /// §8.4 accuracy spread across instructions.
    pub spread: bool,
    /// §9 attribute and extraction rates (needs the §8 predictions to pick the known facts).
    pub recall: bool,
}

impl Measures {
    /// Everything.
    pub const ALL: Self = Self {
        representations: true,
        predictions: true,
        spread: true,
        recall: true,
    };
}

/// Settings of a consistency run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConsistencySettings {
    /// Paraphrase pairs file (TSV or JSONL); `None` = the shipped set.
    pub pairs: Option<PathBuf>,
    /// Factual probes (JSON); `None` = the shipped set.
    pub facts: Option<PathBuf>,
    /// Subject descriptions (JSON object subject → text); `None` = the shipped set.
    pub subjects: Option<PathBuf>,
    /// Measures to run.
    pub measures: Measures,
    /// §7 pooling.
    pub pooling: Pooling,
    /// §8 prediction mode.
    pub mode: PredictionMode,
    /// Facts per relation used for the §8.4 spread (each instruction re-runs them).
    pub spread_facts: usize,
    /// §9 settings.
    pub recall: RecallConfig,
    /// Sentences per forward batch.
    pub batch_size: usize,
}

impl Default for ConsistencySettings {
    fn default() -> Self {
        Self {
            pairs: None,
            facts: None,
            subjects: None,
            measures: Measures::ALL,
            pooling: Pooling::Mean,
            mode: PredictionMode::Candidates,
            spread_facts: 5,
            recall: RecallConfig::default(),
            batch_size: 16,
        }
    }
}

/// One model's results.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SlotConsistency {
    /// Which slot.
    pub slot: Slot,
    /// Display name.
    pub model: String,
    /// §7.
    pub representations: Option<ConsistencyResult>,
    /// §8.
    pub predictions: Option<PredictionResult>,
    /// §8.4.
    pub spread: Option<InstructionSpread>,
    /// §9 (over the facts this model knows).
    pub recall: Option<RecallResult>,
    /// Seconds.
    pub secs: f64,
}

/// `Job::Consistency` output.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConsistencyOutput {
    /// Settings used.
    pub settings: ConsistencySettings,
    /// Per slot.
    pub results: Vec<SlotConsistency>,
    /// With two models: `RD_B − RD_A` per layer.
    pub rd_difference: Option<Vec<f64>>,
}

/// Where an in-context task comes from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TaskSource {
    /// A task shipped in `sample_prompts/icl/`, by name.
    Shipped(String),
    /// A JSON file of `{"input", "output"}` pairs.
    File(PathBuf),
}

impl TaskSource {
    /// The task's name: the shipped name, or the file stem.
    pub fn name(&self) -> String {
        match self {
            Self::Shipped(name) => name.clone(),
            Self::File(path) => path.file_stem().map_or_else(
                || path.display().to_string(),
                |s| s.to_string_lossy().into_owned(),
            ),
        }
    }
}

/// Settings of an instruction-vector run (METHODS.md §4).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct IvSettings {
    /// The tasks; with several, the heads are the universal ones of their averaged AIE.
    pub tasks: Vec<TaskSource>,
    /// The procedure.
    pub config: crate::analysis::iv::IvConfig,
}

/// The instruction vectors of one model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SlotIv {
    /// Which slot.
    pub slot: Slot,
    /// The model's display name.
    pub model: String,
    /// A fingerprint of the weights the vector depends on (checked when a saved vector is loaded).
    pub fingerprint: String,
    /// The result.
    pub run: crate::analysis::iv::IvRun,
}

/// An instruction-vector run of A (and B).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct IvOutput {
    /// What was run.
    pub settings: IvSettings,
    /// One result per model, in slot order.
    pub results: Vec<SlotIv>,
    /// With two models: per task, the heads in both vectors (in A's order).
    pub shared: Vec<Vec<crate::analysis::iv::HeadId>>,
}

#[cfg(test)]
mod tests {
    use super::template_mask;

    #[test]
    fn template_tokens_are_those_outside_the_prompt() {
        // "<s>sys\nhi there\nassistant": the prompt "hi there" spans bytes 8..16.
        let rendered = "<s>sys\n\nhi there\nassistant";
        let offsets = [
            (0, 3),
            (3, 6),
            (6, 8),
            (8, 10),
            (10, 16),
            (16, 17),
            (17, 26),
        ];
        assert_eq!(
            template_mask(&offsets, rendered, " hi there "),
            vec![true, true, true, false, false, true, true]
        );
        // Not found: nothing is marked.
        assert_eq!(template_mask(&offsets, rendered, "absent"), vec![false; 7]);
    }
}
