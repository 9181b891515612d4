//! The messages between the front ends and the model worker, and the plain-data results.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::analysis::ffn_concepts::{ConceptsConfig, LayerConcepts};
use crate::analysis::head_pairs::{HeadsConfig, LayerHeads};
use crate::train::checkpoint::DataSettings;
use crate::train::forgetting::ForgettingReport;
use crate::train::stages::StagePlan;
use crate::wordfiles::WordSource;
use crate::worker::consistency::{ConsistencyOutput, ConsistencySettings};
use crate::worker::forgetting::ForgettingRequest;
use crate::worker::iv::{IvOutput, IvSettings};
use crate::worker::knowledge::{KnowledgeRun, KnowledgeSettings};
use crate::worker::shift::{LensOutput, LensRequest, ShiftRun, ShiftSettings};
use crate::worker::train::StagesOutput;
use crate::worker::train::{DataPreview, TrainEstimate, TrainOutput, TrainRequest, TrainUpdate};
use crate::worker::weights::{CachePolicy, ConceptsOutput, HeadsOutput};

use crate::analysis::attribution::Instructions;
pub use crate::analysis::results::{Slot, SlotAttribution};
use crate::model::generate::{GenerateConfig, GeneratedToken, Generation};
use crate::model::{DeviceChoice, ModelInfo, ModelSpec, WeightDtype, WeightStorage};

/// Work for the model worker.
#[derive(Clone, Debug)]
pub enum Job {
    /// Load a checkpoint into a slot.
    LoadModel {
        /// Target slot.
        slot: Slot,
        /// What to load.
        spec: ModelSpec,
        /// Where.
        device: DeviceChoice,
        /// Weight dtype: `f32`, `f16` or `bf16`.
        dtype: WeightDtype,
        /// Weights expanded at load or kept as stored.
        weights: WeightStorage,
    },
    /// Gradient attribution of a response to its prompt (METHODS.md §1).
    Attribute {
        /// Model slots, each attributed in turn (A and B side by side).
        slots: Vec<Slot>,
        /// The prompt.
        prompt: String,
        /// The response, pinned for every slot; `None` lets each model explain its own greedy
        /// response.
        response: Option<String>,
        /// Apply the chat template to the prompt (the method itself uses the raw prompt).
        chat: bool,
        /// Instruction words of the prompt, for the mask and the score.
        instructions: Instructions,
        /// New tokens when the response is generated.
        max_new_tokens: usize,
    },
    /// FFN PCA concepts (METHODS.md §2) of each slot's model, B aligned to A.
    Concepts {
        /// Model slots (A, then B).
        slots: Vec<Slot>,
        /// The word list.
        words: WordSource,
        /// Settings.
        config: ConceptsConfig,
        /// Where results are cached.
        cache: CachePolicy,
        /// Send each finished layer as an [`Event::Layer`] (the CLI's streaming rows).
        stream: bool,
    },
    /// Attention-head word pairs (METHODS.md §3) of each slot's model, with the §3.5 change
    /// rates from A to B.
    Heads {
        /// Model slots (A, then B).
        slots: Vec<Slot>,
        /// The word list.
        words: WordSource,
        /// A GloVe-format word-vector table; `None` uses each model's input embeddings.
        vectors: Option<PathBuf>,
        /// Settings.
        config: HeadsConfig,
        /// Layers per group of the change-rate analysis.
        group_size: usize,
        /// Where results are cached.
        cache: CachePolicy,
        /// Send each finished layer as an [`Event::Layer`].
        stream: bool,
    },
    /// Consistency measures (METHODS.md §7–§9) of each slot's model.
    Consistency {
        /// Model slots (A, then B).
        slots: Vec<Slot>,
        /// Data files, measures and settings.
        settings: ConsistencySettings,
    },
    /// Instruction vectors by causal mediation (METHODS.md §4) of each slot's model.
    InstructionVectors {
        /// Model slots (A, then B).
        slots: Vec<Slot>,
        /// Tasks and procedure.
        settings: IvSettings,
    },
    /// Knowledge consistency (METHODS.md §10a): the base model in slot A and the tuned model in
    /// slot B asked the same multiple-choice questions.
    Knowledge {
        /// Question files and settings.
        settings: KnowledgeSettings,
    },
    /// Token distribution shift (METHODS.md §6): the tuned model in slot B against the base
    /// model in slot A over a set of responses.
    Shift {
        /// Data and settings.
        settings: Box<ShiftSettings>,
    },
    /// The logit lens of each listed slot's model at one position, tracking B's token.
    Lens {
        /// Model slots (A, then B).
        slots: Vec<Slot>,
        /// What to read.
        request: Box<LensRequest>,
    },
    /// Write one task's vector of one model of a finished run (`.safetensors` and `.json`).
    SaveIv {
        /// The run.
        output: Box<IvOutput>,
        /// Index of the model in `output.results`.
        model: usize,
        /// Index of the task.
        task: usize,
        /// Where (the `.safetensors` path; the `.json` goes beside it).
        path: PathBuf,
    },
    /// LoRA fine-tuning of a slot's model (the slot keeps the plain base; the adapter is
    /// written to the output folder).
    Train {
        /// The base model's slot.
        slot: Slot,
        /// Data, settings, output folder, resume point.
        request: Box<TrainRequest>,
    },
    /// Continual training: the stages of a plan in order (METHODS.md §5.3), each on the
    /// slot's model with the earlier stages merged; resumes a stopped plan in `out`.
    TrainStages {
        /// The base model's slot.
        slot: Slot,
        /// The stages.
        plan: Box<StagePlan>,
        /// The plan's output folder.
        out: PathBuf,
    },
    /// A few measured training steps to estimate a run's time and memory.
    EstimateTraining {
        /// The base model's slot.
        slot: Slot,
        /// The run to estimate.
        request: Box<TrainRequest>,
    },
    /// The forgetting evaluation (METHODS.md §5.5) of a slot's model and of stages built on it.
    Forgetting {
        /// The base model's slot.
        slot: Slot,
        /// Sets and stages.
        request: Box<ForgettingRequest>,
    },
    /// Render and count a training data file.
    PreviewData {
        /// The slot whose tokenizer and template are used.
        slot: Slot,
        /// The file and its preparation.
        data: DataSettings,
    },
    /// Load `spec` (a base with an adapter), merge the adapter into the weights and write the
    /// result as a Hugging Face folder (no slot changes).
    SaveMerged {
        /// What to merge, e.g. `BASE+ADAPTER`.
        spec: ModelSpec,
        /// The folder to write.
        out: PathBuf,
    },
    /// Empty a slot.
    Unload {
        /// The slot.
        slot: Slot,
    },
    /// Exchange the models of slots A and B.
    SwapSlots,
    /// Tokenize text (with the tokenizer's own special-token handling).
    Tokenize {
        /// Model slot.
        slot: Slot,
        /// The text.
        text: String,
    },
    /// One forward pass over text; logits at every position.
    Forward {
        /// Model slot.
        slot: Slot,
        /// The text.
        text: String,
        /// How many top logits to report per position.
        top_k: usize,
    },
    /// Generate a response with each listed slot's model, token by token in lockstep, so the
    /// responses stream side by side.
    Generate {
        /// Model slots, in order.
        slots: Vec<Slot>,
        /// The user's prompt.
        prompt: String,
        /// Wrap the prompt in the model's chat template.
        chat: bool,
        /// Generation settings.
        cfg: GenerateConfig,
        /// Add a saved instruction vector while generating.
        steer: Option<SteerRequest>,
        /// Live token shift (METHODS.md §6) with this `k`: while B generates, A (the base)
        /// scores each of B's tokens with one cached decode step over the URIAL context, and
        /// each score streams as an [`Event::TokenShift`]. Needs both slots.
        live_shift: Option<usize>,
    },
}

/// Steering of a generation with a saved instruction vector (METHODS.md §4.2 step 5): the
/// vector times `scale` is added to the output of layer `layer` at the last prompt token, and
/// with `every_token` at every generated token too.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SteerRequest {
    /// The saved vector (`.safetensors`, with its `.json` beside it).
    pub path: PathBuf,
    /// The edit layer; `None` = the best layer of the vector's own sweep.
    pub layer: Option<usize>,
    /// Multiplies the vector.
    pub scale: f32,
    /// Add it at every generated token as well.
    pub every_token: bool,
}

/// One layer of a weight-space analysis, streamed as it finishes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum LayerResult {
    /// §2 components of one layer.
    Concepts(Box<LayerConcepts>),
    /// §3 word pairs of one layer.
    Heads(Box<LayerHeads>),
}

/// The result of a finished job.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum JobOutput {
    /// A model was loaded.
    Loaded {
        /// Which slot.
        slot: Slot,
        /// Its summary.
        info: Box<ModelInfo>,
    },
    /// Token ids and strings.
    Tokens(TokenizeOutput),
    /// Logits.
    Forward(ForwardOutput),
    /// One attribution per requested slot, in request order.
    Attributed(Vec<SlotAttribution>),
    /// FFN concepts.
    Concepts(Box<ConceptsOutput>),
    /// Head word pairs.
    Heads(Box<HeadsOutput>),
    /// Consistency measures.
    Consistency(Box<ConsistencyOutput>),
    /// Instruction vectors.
    InstructionVectors(Box<IvOutput>),
    /// Knowledge consistency of A (base) and B (tuned).
    Knowledge(Box<KnowledgeRun>),
    /// Token distribution shift of B against A.
    Shift(Box<ShiftRun>),
    /// Logit lens curves.
    Lens(Box<LensOutput>),
    /// A vector was saved: the files written.
    SavedIv(Vec<PathBuf>),
    /// A training run ended (finished, or stopped with a checkpoint).
    Trained(Box<TrainOutput>),
    /// Measured time and memory of a training run.
    TrainEstimated(TrainEstimate),
    /// Scores of the base and each stage.
    Forgetting(Box<ForgettingReport>),
    /// A continual run ended.
    StagesTrained(Box<StagesOutput>),
    /// A rendered training data file.
    DataPreview(Box<DataPreview>),
    /// A merged model was written.
    SavedMerged {
        /// The folder.
        out: PathBuf,
        /// Adapted layers merged.
        merged: usize,
    },
    /// A slot was emptied.
    Unloaded {
        /// Which slot.
        slot: Slot,
    },
    /// Slots A and B were exchanged; their new contents.
    Swapped {
        /// Slot A now.
        a: Option<Box<ModelInfo>>,
        /// Slot B now.
        b: Option<Box<ModelInfo>>,
    },
    /// One response per requested slot, in the order requested.
    Generated(Vec<GenerateOutput>),
}

/// `tunelens tokenize` output.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TokenizeOutput {
    /// Token ids.
    pub ids: Vec<u32>,
    /// Vocabulary strings of the ids.
    pub tokens: Vec<String>,
}

/// `tunelens forward` output.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ForwardOutput {
    /// Token ids.
    pub ids: Vec<u32>,
    /// Vocabulary strings of the ids.
    pub tokens: Vec<String>,
    /// The full logit vector at the last position.
    pub logits_last: Vec<f32>,
    /// Per position, the `k` largest logits as `[id, logit]`, largest first.
    pub top_k: Vec<Vec<(u32, f32)>>,
}

/// `tunelens generate` output.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GenerateOutput {
    /// The slot whose model generated this.
    pub slot: Slot,
    /// The user's prompt.
    pub prompt: String,
    /// Whether the chat template was applied.
    pub chat: bool,
    /// The text actually fed to the model.
    pub rendered_prompt: String,
    /// Ids of the rendered prompt.
    pub prompt_ids: Vec<u32>,
    /// Generated ids.
    pub new_ids: Vec<u32>,
    /// Generated text.
    pub new_text: String,
    /// Why generation stopped.
    pub stop_reason: crate::model::generate::StopReason,
    /// Seconds for the prompt forward.
    pub prefill_secs: f64,
    /// Seconds for the one-token steps.
    pub decode_secs: f64,
    /// How the generation was steered (vector, layer, scale, and any warning), if it was.
    pub steering: Option<String>,
}

impl GenerateOutput {
    /// Assembles the output from a generation.
    pub fn new(
        slot: Slot,
        prompt: String,
        chat: bool,
        rendered_prompt: String,
        generation: Generation,
    ) -> Self {
        Self {
            slot,
            prompt,
            chat,
            rendered_prompt,
            prompt_ids: generation.prompt_ids,
            new_ids: generation.new_ids,
            new_text: generation.text,
            stop_reason: generation.stop_reason,
            prefill_secs: generation.prefill_secs,
            decode_secs: generation.decode_secs,
            steering: None,
        }
    }
}

/// Identifies a submitted job in events.
pub type JobId = u64;

/// What the worker reports while and after running a job.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Event {
    /// Fraction done, 0..=1, with a short description.
    Progress {
        /// The job.
        job_id: JobId,
        /// Fraction done.
        frac: f32,
        /// What is happening.
        message: String,
    },
    /// A generated token, streamed as it arrives.
    Token {
        /// The job.
        job_id: JobId,
        /// The slot generating.
        slot: Slot,
        /// The token.
        token: GeneratedToken,
    },
    /// The shift class of one of B's streamed tokens (live token shift).
    TokenShift {
        /// The job.
        job_id: JobId,
        /// Index of the token among B's new tokens.
        index: usize,
        /// Its top rank under A.
        tr: usize,
        /// Its class.
        category: crate::analysis::shift::Category,
    },
    /// Training progress: steps, validations, checkpoints.
    Train {
        /// The job.
        job_id: JobId,
        /// What happened.
        update: TrainUpdate,
    },
    /// The job finished.
    Finished {
        /// The job.
        job_id: JobId,
        /// Its result.
        output: JobOutput,
    },
    /// The results so far of a job whose sections finish one by one (the consistency
    /// measures): shown at once, replaced by the final output.
    Partial {
        /// The job.
        job_id: JobId,
        /// The results so far.
        output: JobOutput,
    },
    /// One finished layer of a streaming weight-space job.
    Layer {
        /// The job.
        job_id: JobId,
        /// Index of the model in the job's slots.
        model: usize,
        /// The layer's result.
        layer: LayerResult,
    },
    /// The job was cancelled by the user (not an error).
    Cancelled {
        /// The job.
        job_id: JobId,
    },
    /// The job failed; `error` is one line in plain words.
    Failed {
        /// The job.
        job_id: JobId,
        /// The reason.
        error: String,
    },
}

impl Event {
    /// The job the event is about.
    pub fn job_id(&self) -> JobId {
        match self {
            Self::Progress { job_id, .. }
            | Self::Token { job_id, .. }
            | Self::TokenShift { job_id, .. }
            | Self::Train { job_id, .. }
            | Self::Layer { job_id, .. }
            | Self::Partial { job_id, .. }
            | Self::Finished { job_id, .. }
            | Self::Cancelled { job_id }
            | Self::Failed { job_id, .. } => *job_id,
        }
    }
}
