//! What the app remembers between runs (eframe persistence): recent models, the prompt, the
//! generation settings, the selected view.

use serde::{Deserialize, Serialize};

use crate::model::generate::{GenerateConfig, Sampling};
use crate::model::DeviceChoice;
use crate::ui::dialogs::DialogKind;

/// Most recent model paths kept.
pub const MAX_RECENT: usize = 10;

/// The selected view: one of the two fixed views, or an analysis view by its registry id
/// ([`crate::ui::registry`]). Persisted as one string ("models", "prompt" or the id), so a
/// view added or removed later never makes the saved state unreadable.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub enum View {
    /// Slots A and B.
    #[default]
    Models,
    /// Prompt editor and side-by-side responses.
    Prompt,
    /// An analysis view, by id.
    Analysis(String),
}

impl View {
    /// The analysis view with this id.
    pub fn analysis(id: &str) -> Self {
        Self::Analysis(id.to_owned())
    }
}

impl From<String> for View {
    fn from(s: String) -> Self {
        // Earlier versions saved the variant names ("Concepts", "Finetune").
        match s.to_lowercase().as_str() {
            "models" => Self::Models,
            "prompt" => Self::Prompt,
            id => Self::Analysis(id.to_owned()),
        }
    }
}

impl From<View> for String {
    fn from(v: View) -> Self {
        match v {
            View::Models => "models".to_owned(),
            View::Prompt => "prompt".to_owned(),
            View::Analysis(id) => id,
        }
    }
}

/// Generation settings as the form edits them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GenSettings {
    /// Upper bound on new tokens.
    pub max_new_tokens: usize,
    /// Sample instead of greedy decoding.
    pub sample: bool,
    /// Sampling temperature.
    pub temperature: f64,
    /// Nucleus threshold.
    pub top_p: f64,
    /// Sampling seed.
    pub seed: u64,
}

impl Default for GenSettings {
    fn default() -> Self {
        Self {
            max_new_tokens: 128,
            sample: false,
            temperature: 0.7,
            top_p: 0.9,
            seed: 0,
        }
    }
}

impl GenSettings {
    /// The generation config these settings describe.
    pub fn to_config(&self) -> GenerateConfig {
        GenerateConfig {
            max_new_tokens: self.max_new_tokens,
            sampling: if self.sample {
                Sampling::Sample {
                    temperature: self.temperature,
                    top_p: self.top_p,
                    seed: self.seed,
                }
            } else {
                Sampling::Greedy
            },
            ..GenerateConfig::default()
        }
    }
}

/// Which instruction words the attribution marks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum InstructionSource {
    /// Sentences with an instruction verb.
    #[default]
    Auto,
    /// The spans typed by the user (one per line).
    Typed,
    /// None (no score).
    Off,
}

/// Attribution view settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AttributionSettings {
    /// Explain one response for both models instead of each model's own.
    pub pin_response: bool,
    /// The pinned response.
    pub response: String,
    /// Where instruction words come from.
    pub instructions: InstructionSource,
    /// Typed instruction spans, one per line.
    pub spans: String,
    /// Show words (sub-tokens summed) instead of tokens.
    pub word_level: bool,
    /// Leave the chat template's tokens out of the heatmap and the density.
    pub hide_template: bool,
    /// New tokens when a response is generated.
    pub max_new_tokens: usize,
}

impl Default for AttributionSettings {
    fn default() -> Self {
        Self {
            pin_response: false,
            response: String::new(),
            instructions: InstructionSource::Auto,
            spans: String::new(),
            word_level: true,
            hide_template: true,
            max_new_tokens: 48,
        }
    }
}

/// Persisted UI state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AppState {
    /// Recently loaded model specs, newest first.
    pub recent: Vec<String>,
    /// The prompt being edited.
    pub prompt: String,
    /// Apply the chat template.
    pub chat: bool,
    /// Generation settings.
    pub gen: GenSettings,
    /// The selected view.
    pub view: View,
    /// Where models are loaded.
    pub device: DeviceChoice,
    /// Weights in memory: expanded to f32, or kept as stored (applies to the next load).
    pub weight_storage: crate::model::WeightStorage,
    /// Attribution view settings.
    pub attribution: AttributionSettings,
    /// Concepts and Heads view settings.
    pub weights: WeightSettings,
    /// Consistency view settings.
    pub consistency: ConsistencyUi,
    /// Fine-tune view settings.
    pub finetune: crate::ui::panels::finetune::FinetuneUi,
    /// Instruction vector view settings.
    pub iv: crate::ui::panels::iv::IvUi,
    /// Token shift view settings.
    pub shift: crate::ui::panels::shift::ShiftUi,
    /// Knowledge view settings.
    pub knowledge: crate::ui::panels::knowledge::KnowledgeUi,
    /// Steering of the Prompt view's generation with a saved instruction vector.
    pub steer: SteerUi,
}

/// The Prompt view's steering settings (a saved instruction vector added while generating).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SteerUi {
    /// Steer at all.
    pub enabled: bool,
    /// The saved vector (`.safetensors`).
    pub path: Option<std::path::PathBuf>,
    /// The edit layer; `None` = the vector's best layer.
    pub layer: Option<usize>,
    /// Multiplies the vector.
    pub scale: f32,
    /// Add it at every generated token too.
    pub every_token: bool,
}

impl SteerUi {
    /// The steering request of a generation, when steering is on and a vector is chosen.
    pub fn request(&self) -> Option<crate::worker::SteerRequest> {
        let path = self.path.clone().filter(|_| self.enabled)?;
        Some(crate::worker::SteerRequest {
            path,
            layer: self.layer,
            scale: if self.scale == 0.0 { 1.0 } else { self.scale },
            every_token: self.every_token,
        })
    }
}

/// Settings of the Concepts and Heads views.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct WeightSettings {
    /// A `word<TAB>freq` list; `None` = the built-in list.
    pub words_file: Option<std::path::PathBuf>,
    /// A GloVe-format table; `None` = the model's own input embeddings.
    pub vectors_file: Option<std::path::PathBuf>,
    /// Words per component.
    pub concepts_top_k: usize,
    /// Components per layer.
    pub concepts_ranks: usize,
    /// Words per head dimension and side.
    pub heads_top_k: usize,
    /// Layers per change-rate group.
    pub group_size: usize,
    /// Layer shown.
    pub layer: usize,
    /// Selected head: (result index, layer, head).
    pub head: Option<(usize, usize, usize)>,
    /// Filter of the pair table.
    pub search: String,
}

impl Default for WeightSettings {
    fn default() -> Self {
        Self {
            words_file: None,
            vectors_file: None,
            concepts_top_k: 50,
            concepts_ranks: 300,
            heads_top_k: 100,
            group_size: 8,
            layer: 0,
            head: None,
            search: String::new(),
        }
    }
}

/// Settings of the Consistency view (its check boxes are bools, as in `Measures`).
#[allow(clippy::struct_excessive_bools)]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ConsistencyUi {
    /// Paraphrase pairs file; `None` = shipped.
    pub pairs_file: Option<std::path::PathBuf>,
    /// Factual probes file; `None` = shipped.
    pub facts_file: Option<std::path::PathBuf>,
    /// Pool the last token instead of the mean.
    pub last_token: bool,
    /// Run §7 (paraphrase representations).
    pub representations: bool,
    /// Run §8 (factual predictions).
    pub predictions: bool,
    /// Run §8.4 (slow: every instruction re-runs a subset).
    pub spread: bool,
    /// Run §9 (attribute and extraction rates; needs the §8 predictions, run with it).
    pub recall: bool,
    /// Layer of the histograms.
    pub layer: usize,
}

impl Default for ConsistencyUi {
    fn default() -> Self {
        Self {
            pairs_file: None,
            facts_file: None,
            last_token: false,
            representations: true,
            predictions: true,
            spread: true,
            recall: true,
            layer: 0,
        }
    }
}
impl AppState {
    /// Sets the data file (or folder) a view setting of `kind` names; `None` goes back to the
    /// default. Kinds that are not a view setting (models, exports) change nothing.
    pub fn set_file(&mut self, kind: DialogKind, path: Option<std::path::PathBuf>) {
        match kind {
            DialogKind::WordList => self.weights.words_file = path,
            DialogKind::WordVectors => self.weights.vectors_file = path,
            DialogKind::PairsFile => self.consistency.pairs_file = path,
            DialogKind::FactsFile => self.consistency.facts_file = path,
            DialogKind::TrainData => self.finetune.data_file = path,
            DialogKind::TrainOutput => self.finetune.out_dir = path,
            DialogKind::TaskFile => match path {
                Some(p) => {
                    if !self.iv.task_files.contains(&p) {
                        self.iv.task_files.push(p);
                    }
                }
                None => self.iv.task_files.clear(),
            },
            DialogKind::IvFile => {
                self.steer.enabled = path.is_some();
                self.steer.path = path;
                self.steer.layer = None;
            }
            DialogKind::GuidanceIv => {
                if let Some(p) = path {
                    self.finetune.guidance.iv_path = p;
                }
            }
            DialogKind::ShiftData => self.shift.data_file = path,
            DialogKind::ShiftTemplate => self.shift.template_file = path,
            DialogKind::QuestionFile => match path {
                Some(p) => {
                    if !self.knowledge.files.contains(&p) {
                        self.knowledge.files.push(p);
                    }
                }
                None => self.knowledge.files.clear(),
            },
            DialogKind::EvalSet => match path {
                Some(p) => {
                    if !self.finetune.eval_sets.contains(&p) {
                        self.finetune.eval_sets.push(p);
                    }
                }
                None => self.finetune.eval_sets.clear(),
            },
            DialogKind::StagePlanOpen => {
                if let Some(p) = path {
                    match crate::train::stages::read_plan(&p) {
                        Ok(plan) => {
                            self.finetune.stages = plan.stages;
                            self.finetune.plan_note = Some(format!("Opened {}", p.display()));
                        }
                        Err(err) => self.finetune.plan_note = Some(err.to_string()),
                    }
                }
            }
            DialogKind::StagePlanSave => {
                if let Some(p) = path {
                    let plan = crate::train::stages::StagePlan {
                        stages: self.finetune.stages.clone(),
                    };
                    self.finetune.plan_note =
                        Some(match crate::train::stages::write_plan(&p, &plan) {
                            Ok(()) => format!("Saved {}", p.display()),
                            Err(err) => err.to_string(),
                        });
                }
            }
            DialogKind::IvSave
            | DialogKind::MergedOutput
            | DialogKind::ModelFolder
            | DialogKind::GgufFile
            | DialogKind::AdapterFolder
            | DialogKind::ExportFile => {}
        }
    }
}

impl Default for AppState {
    fn default() -> Self {
        Self {
            recent: Vec::new(),
            prompt: "Give me three tips for staying focused while studying.".to_owned(),
            chat: true,
            gen: GenSettings::default(),
            view: View::default(),
            device: DeviceChoice::Cpu,
            weight_storage: crate::model::WeightStorage::F32,
            attribution: AttributionSettings::default(),
            weights: WeightSettings::default(),
            consistency: ConsistencyUi::default(),
            finetune: crate::ui::panels::finetune::FinetuneUi::default(),
            iv: crate::ui::panels::iv::IvUi::default(),
            shift: crate::ui::panels::shift::ShiftUi::default(),
            knowledge: crate::ui::panels::knowledge::KnowledgeUi::default(),
            steer: SteerUi::default(),
        }
    }
}

impl AppState {
    /// Moves `spec` to the front of the recent list.
    pub fn remember(&mut self, spec: &str) {
        self.recent.retain(|r| r != spec);
        self.recent.insert(0, spec.to_owned());
        self.recent.truncate(MAX_RECENT);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_and_tolerates_missing_fields() {
        let mut state = AppState::default();
        state.remember("a.gguf");
        state.remember("b");
        state.remember("a.gguf");
        assert_eq!(state.recent, vec!["a.gguf".to_owned(), "b".to_owned()]);
        state.gen.sample = true;
        state.view = View::Prompt;
        let text = serde_json::to_string(&state).unwrap();
        assert_eq!(serde_json::from_str::<AppState>(&text).unwrap(), state);
        // State saved by an older version (fewer fields) still loads.
        let old: AppState = serde_json::from_str(r#"{"prompt": "hi"}"#).unwrap();
        assert_eq!(old.prompt, "hi");
        assert_eq!(old.gen, GenSettings::default());
    }

    #[test]
    fn recent_list_is_bounded() {
        let mut state = AppState::default();
        for i in 0..25 {
            state.remember(&format!("model-{i}"));
        }
        assert_eq!(state.recent.len(), MAX_RECENT);
        assert_eq!(state.recent[0], "model-24");
    }
}
