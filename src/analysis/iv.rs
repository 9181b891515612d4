//! Instruction (function) vectors by causal mediation over attention heads (METHODS.md §4;
//! Todd et al. 2024, and the FvForgetting variants of §4.3 as options).
//!
//! The procedure per task: split the task (sklearn's split, [`crate::analysis::icl`]); keep the
//! valid queries the model answers top-1 with clean demonstrations (the filter set); average each
//! head's last-token output `z` (HOOK A) over clean prompts; patch one head at a time at the last
//! token of label-shuffled prompts and measure the change in `p(y*)` (the indirect effect);
//! take the 10 heads of largest average effect and sum their `o_proj`-projected mean outputs
//! into the vector. Then add it at the output of each layer of zero-shot prompts and measure
//! top-1 accuracy.
//!
//! Speed comes from the structure of the patch, not a faster loop: a change at the last
//! position of layer `l` changes nothing before layer `l` and nothing at earlier positions. So a
//! prompt runs once (its earlier positions into a KV cache, its last position with the residual
//! stream of every layer recorded), and each layer's patches re-run only the last position from
//! layer `l` up, the `h` heads of the layer as one batch of `h` rows. The edit-layer sweep of
//! the evaluation does the same from layer `ℓ + 1`. [`indirect_effects_full`] is Todd's loop
//! (one full forward per patched head), kept as the reference the tests compare with.

use std::ops::ControlFlow;

use candle_core::{DType, Device, Tensor};
use rand::seq::SliceRandom as _;
use rand::SeedableRng as _;
use serde::{Deserialize, Serialize};

use crate::analysis::icl::{self, IclPair, PromptIds, SplitConfig, Template};
use crate::error::{Error, Result};
use crate::model::hooks::{Edit, EditOp, Editor, Hook, HookPoint, Positions, Recorder};
use crate::model::{ForwardOptions, Input, KvCache, LogitsAt, Tokenizer, Transformer};

/// How a head's mean output is put in at its site.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum PatchOp {
    /// `z[T-1, k] := ā` (Todd).
    #[default]
    Replace,
    /// `z[T-1, k] += ā` (FvForgetting).
    Add,
}

/// What ranks the heads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum RankBy {
    /// Mean change of `p(y*)` (Todd).
    #[default]
    Prob,
    /// Minus the mean change of the whole target's NLL (FvForgetting, gen mode).
    Nll,
}

/// Which valid queries the trials draw from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum FilterMode {
    /// Queries whose `y*` is the top-1 prediction with clean demonstrations (Todd).
    #[default]
    Top1,
    /// FvForgetting's gen mode: of the 100 lowest-NLL valid queries those whose `y*` ranks
    /// below 10, filled up to 50 from the lowest-NLL ones.
    LowNll,
}

/// A layer and head, 0-based.
pub type HeadId = (usize, usize);

/// The universal Llama-2-7b heads hard-coded in both reference repositories (METHODS.md §4.2).
pub const LLAMA2_7B_UNIVERSAL_HEADS: [HeadId; 10] = [
    (14, 1),
    (11, 2),
    (9, 25),
    (12, 15),
    (12, 28),
    (13, 7),
    (11, 18),
    (12, 18),
    (16, 10),
    (14, 16),
];

/// Settings of a run (METHODS.md §4.2 defaults; [`IvConfig::fvforgetting`] for §4.3).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct IvConfig {
    /// The train / valid / test split.
    pub split: SplitConfig,
    /// Prompt layout.
    pub template: Template,
    /// Demonstrations per prompt of the filter set and the indirect effects (10).
    pub shots: usize,
    /// Demonstrations per prompt of the mean activations (Todd 10, FvForgetting 0).
    pub mean_shots: usize,
    /// Trials of the mean activations (`N_mean`, 100).
    pub n_mean: usize,
    /// Trials of the indirect effects (`N_ie`, 25).
    pub n_ie: usize,
    /// Shuffle the demonstrations' labels in the indirect-effect prompts (Todd yes).
    pub shuffle_labels: bool,
    /// Replace or add.
    pub patch: PatchOp,
    /// What ranks the heads.
    pub rank_by: RankBy,
    /// How the query pool is filtered.
    pub filter: FilterMode,
    /// Heads in the vector (10).
    pub n_top: usize,
    /// Use these heads instead of searching (e.g. [`LLAMA2_7B_UNIVERSAL_HEADS`]); no indirect
    /// effects are computed.
    pub heads: Option<Vec<HeadId>>,
    /// Seed of the trials' sampling.
    pub seed: u64,
    /// Layers of the zero-shot sweep; `None` = every layer.
    pub edit_layers: Option<Vec<usize>>,
    /// At most this many test queries are evaluated; `None` = all.
    pub n_test: Option<usize>,
    /// Demonstrations of the reference few-shot accuracy (10).
    pub eval_shots: usize,
    /// Evaluate at all (zero-shot sweep and few-shot reference).
    pub evaluate: bool,
    /// Tokens of the vocabulary read-out.
    pub vocab_top: usize,
    /// Keep every trial's prompt ids and effects (for the reference check against PyTorch).
    pub record_trials: bool,
}

impl Default for IvConfig {
    fn default() -> Self {
        Self {
            split: SplitConfig::default(),
            template: Template::Qa,
            shots: 10,
            mean_shots: 10,
            n_mean: 100,
            n_ie: 25,
            shuffle_labels: true,
            patch: PatchOp::Replace,
            rank_by: RankBy::Prob,
            filter: FilterMode::Top1,
            n_top: 10,
            heads: None,
            seed: 42,
            edit_layers: None,
            n_test: None,
            eval_shots: 10,
            evaluate: true,
            vocab_top: 10,
            record_trials: false,
        }
    }
}

impl IvConfig {
    /// Todd et al.'s procedure (the default).
    pub fn todd() -> Self {
        Self::default()
    }

    /// The FvForgetting code's procedure (METHODS.md §4.3): 70/15/15 split with seed 43,
    /// zero-shot mean activations, zero-shot unshuffled patch prompts, additive patch, heads
    /// ranked by the target's NLL, the gen-mode query filter, and their sweep layers.
    pub fn fvforgetting() -> Self {
        Self {
            split: SplitConfig {
                held_out: 0.3,
                valid: 0.5,
                seed: 43,
            },
            mean_shots: 0,
            shots: 0,
            shuffle_labels: false,
            patch: PatchOp::Add,
            rank_by: RankBy::Nll,
            filter: FilterMode::LowNll,
            edit_layers: Some(vec![0, 3, 6, 8, 10, 12, 15, 18, 21, 24]),
            ..Self::default()
        }
    }
}

/// One head's score.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct HeadScore {
    /// Layer.
    pub layer: usize,
    /// Head.
    pub head: usize,
    /// Its ranking score (mean `Δp(y*)`, or `−ΔNLL`); NaN for a given head list.
    pub score: f32,
}

/// Zero-shot top-1 accuracy with the vector added at one layer.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LayerAccuracy {
    /// The edit layer `ℓ` (the vector is added to `h^(ℓ+1)`).
    pub layer: usize,
    /// Accuracy with the vector.
    pub accuracy: f64,
}

/// The evaluation of a vector on the test split (METHODS.md §4.2 step 5).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct IvEvaluation {
    /// Test queries evaluated.
    pub n: usize,
    /// Zero-shot accuracy without the vector.
    pub zero_shot: f64,
    /// Accuracy with `few_shot_shots` clean demonstrations, for reference.
    pub few_shot: f64,
    /// Demonstrations of the few-shot reference.
    pub few_shot_shots: usize,
    /// Zero-shot accuracy with the vector, per edit layer.
    pub layers: Vec<LayerAccuracy>,
    /// The edit layer of best accuracy (the lowest on ties).
    pub best_layer: usize,
    /// Its accuracy.
    pub best_accuracy: f64,
}

/// One trial, kept for the reference check.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrialRecord {
    /// Prompt ids.
    pub ids: Vec<u32>,
    /// Target ids in context (`target[0]` = `y*`).
    pub target: Vec<u32>,
    /// `p(y*)` of the unpatched prompt.
    pub p: f32,
    /// Indirect effects `Δp(y*)`, `L × h` row-major (empty for mean-activation trials).
    pub ie: Vec<f32>,
}

/// Sizes of a task's sets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskSizes {
    /// Examples in the file.
    pub items: usize,
    /// Train (demonstrations).
    pub train: usize,
    /// Valid (query pool).
    pub valid: usize,
    /// Test (evaluation).
    pub test: usize,
    /// Valid queries kept by the filter.
    pub filter: usize,
}

/// The result for one task and one model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskIv {
    /// Task name.
    pub task: String,
    /// Set sizes.
    pub sizes: TaskSizes,
    /// Things a reader of the numbers should know (fallbacks, skipped items).
    pub notes: Vec<String>,
    /// Top-1 accuracy of the clean prompts on the valid queries (the filter's pass rate).
    pub clean_accuracy: f64,
    /// Mean `p(y*)` of the clean mean-activation prompts.
    pub mean_p_clean: f64,
    /// Mean `p(y*)` of the corrupted (indirect-effect) prompts.
    pub mean_p_corrupted: f64,
    /// The average indirect effect `Δp(y*)`, `L × h` row-major; empty for a given head list.
    pub aie: Vec<f32>,
    /// The average `ΔNLL` of the whole target, `L × h`; empty unless ranked by NLL.
    pub aie_nll: Vec<f32>,
    /// The heads of the vector, best first.
    pub top: Vec<HeadScore>,
    /// The vector, `(d,)`.
    pub iv: Vec<f32>,
    /// `‖IV‖₂`.
    pub iv_norm: f32,
    /// Mean last-token head outputs `Ā`, `L × h × d_h` row-major.
    pub means: Vec<f32>,
    /// Zero-shot evaluation, when run.
    pub evaluation: Option<IvEvaluation>,
    /// Top tokens of `softmax(U · norm(IV))` (Todd's `fv_to_vocab`), with probabilities.
    pub vocab: Vec<(String, f32)>,
    /// Mean-activation trials, when recorded.
    pub mean_trials: Vec<TrialRecord>,
    /// Indirect-effect trials, when recorded.
    pub ie_trials: Vec<TrialRecord>,
    /// Seconds per phase.
    pub timings: IvTimings,
}

/// Wall-clock seconds of each phase of one task (the benchmark reads `ie_secs`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct IvTimings {
    /// The query filter.
    pub filter_secs: f64,
    /// The mean head outputs.
    pub means_secs: f64,
    /// The indirect effects (the whole AIE grid).
    pub ie_secs: f64,
    /// The zero-shot sweep and the few-shot reference.
    pub eval_secs: f64,
}

/// The result for one model over one or more tasks.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct IvRun {
    /// Layers `L`.
    pub layers: usize,
    /// Query heads `h`.
    pub heads: usize,
    /// Head dimension `d_h`.
    pub head_dim: usize,
    /// Hidden size `d`.
    pub hidden: usize,
    /// One result per task, in the order given.
    pub tasks: Vec<TaskIv>,
    /// With several tasks: the AIE averaged over them, `L × h` (Todd's universal heads).
    pub universal_aie: Vec<f32>,
    /// With several tasks: the top heads of `universal_aie`, which every task's vector uses.
    pub universal_top: Vec<HeadScore>,
}

/// A task to run: its name and examples.
#[derive(Clone, Debug, PartialEq)]
pub struct IclTask {
    /// Name (the file stem).
    pub name: String,
    /// The examples.
    pub items: Vec<IclPair>,
}

/// Bytes the batched patches may spend on copies of a prompt's keys and values (a 135M model
/// runs all heads of a layer as one batch; a 7B model in groups of about ten).
const CACHE_BUDGET: usize = 1 << 30;

/// Progress callback: fraction of this model's run and a message; `Break` cancels.
pub type Progress<'a> = dyn FnMut(f32, String) -> ControlFlow<()> + 'a;

fn opts(logits: LogitsAt) -> ForwardOptions {
    ForwardOptions {
        differentiable: false,
        logits,
        use_lora: true,
    }
}

fn ids_tensor(ids: &[u32], device: &Device) -> Result<Tensor> {
    Ok(Tensor::new(ids, device)?.unsqueeze(0)?)
}

/// `softmax(row)` in f32 (max-shifted, as torch computes it).
pub fn softmax(row: &[f32]) -> Vec<f32> {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = row.iter().map(|&x| (x - max).exp()).collect();
    let sum: f32 = exps.iter().sum();
    exps.into_iter().map(|e| e / sum).collect()
}

fn log_prob(row: &[f32], id: u32) -> f64 {
    let max = f64::from(row.iter().copied().fold(f32::NEG_INFINITY, f32::max));
    let sum: f64 = row.iter().map(|&x| (f64::from(x) - max).exp()).sum();
    f64::from(row[id as usize]) - max - sum.ln()
}

/// How many entries of `row` are larger than `row[id]` (the rank of `id`, 0 = top-1).
pub fn rank_of(row: &[f32], id: u32) -> usize {
    let v = row[id as usize];
    row.iter().filter(|&&x| x > v).count()
}

/// A prompt run once: the KV cache of all but its last `s` positions (the suffix), the
/// residual stream of every layer at the suffix, its head outputs, and its logits.
struct SuffixRun {
    /// Cache of the prefix (batch 1).
    cache: KvCache,
    /// `h^(l)` at the suffix, `(1, s, d)`, for `l = 0..=L` (the last is the final layer's output).
    resid: Vec<Tensor>,
    /// Head outputs of every layer at the suffix, `(1, s, h, d_h)`, when recorded.
    heads: Vec<Tensor>,
    /// Logits at the suffix, `s × V`.
    logits: Vec<Vec<f32>>,
}

/// Runs `ids` as a prefix (cached) and a suffix of `s` tokens (recorded).
fn run_suffix(model: &Transformer, ids: &[u32], s: usize, record_heads: bool) -> Result<SuffixRun> {
    let n_layers = model.layers.len();
    if ids.is_empty() {
        return Err(Error::EmptyPrompt);
    }
    let s = s.clamp(1, ids.len());
    let split = ids.len() - s;
    let device = model.device();
    let mut cache = KvCache::new();
    if split > 0 {
        model.run(
            Input::Ids(&ids_tensor(&ids[..split], device)?),
            &opts(LogitsAt::None),
            Some(&mut cache),
            &mut crate::model::NoHook,
        )?;
    }
    let mut points: Vec<HookPoint> = (0..n_layers).map(HookPoint::ResidPre).collect();
    if n_layers > 0 {
        points.push(HookPoint::ResidPost(n_layers - 1));
    }
    if record_heads {
        points.extend((0..n_layers).map(HookPoint::HeadOut));
    }
    let mut recorder = Recorder::new(points);
    let mut suffix_cache = cache.clone();
    let logits = model.run(
        Input::Ids(&ids_tensor(&ids[split..], device)?),
        &opts(LogitsAt::All),
        Some(&mut suffix_cache),
        &mut recorder,
    )?;
    let mut resid = Vec::with_capacity(n_layers + 1);
    for l in 0..n_layers {
        resid.push(recorder.get(HookPoint::ResidPre(l))?.clone());
    }
    if n_layers > 0 {
        resid.push(recorder.get(HookPoint::ResidPost(n_layers - 1))?.clone());
    }
    let heads = if record_heads {
        (0..n_layers)
            .map(|l| Ok(recorder.get(HookPoint::HeadOut(l))?.clone()))
            .collect::<Result<Vec<_>>>()?
    } else {
        Vec::new()
    };
    let logits: Vec<Vec<f32>> = logits.squeeze(0)?.to_dtype(DType::F32)?.to_vec2()?;
    Ok(SuffixRun {
        cache,
        resid,
        heads,
        logits,
    })
}

/// At HOOK A of `layer`, for batch row `r`, puts head `first + r`'s mean `ā_{layer,first+r}` at
/// position 0 of the call (replacing or adding): single-head patches of a layer as one batch.
/// Rows past the last head are left unpatched (padding of a last, partial group).
struct DiagonalPatch {
    layer: usize,
    /// `(1, 1, h, d_h)`.
    means: Tensor,
    /// `(rows, s, h, 1)`: 1 at `[r, 0, first + r]`.
    mask: Tensor,
    op: PatchOp,
}

impl DiagonalPatch {
    fn new(
        layer: usize,
        means: &Tensor,
        s: usize,
        op: PatchOp,
        first: usize,
        rows: usize,
    ) -> Result<Self> {
        let (_, _, h, _) = means.dims4()?;
        let mut m = vec![0f32; rows * s * h];
        for r in 0..rows {
            if first + r < h {
                m[r * s * h + first + r] = 1.0;
            }
        }
        let mask = Tensor::from_vec(m, (rows, s, h, 1), means.device())?;
        Ok(Self {
            layer,
            means: means.clone(),
            mask,
            op,
        })
    }
}

impl Hook for DiagonalPatch {
    fn on(&mut self, point: HookPoint, xs: &Tensor) -> Result<Option<Tensor>> {
        if point != HookPoint::HeadOut(self.layer) {
            return Ok(None);
        }
        let dtype = xs.dtype();
        let mask = self.mask.to_dtype(dtype)?;
        let means = self.means.to_dtype(dtype)?;
        let placed = mask.broadcast_mul(&means)?;
        let out = match self.op {
            PatchOp::Add => xs.broadcast_add(&placed)?,
            PatchOp::Replace => {
                let keep = mask.affine(-1.0, 1.0)?;
                xs.broadcast_mul(&keep)?.broadcast_add(&placed)?
            }
        };
        Ok(Some(out))
    }

    fn wants(&self, point: HookPoint) -> bool {
        point == HookPoint::HeadOut(self.layer)
    }
}

/// Mean head outputs in a tensor `(L, h, d_h)`.
fn means_tensor(means: &[f32], l: usize, h: usize, dh: usize, device: &Device) -> Result<Tensor> {
    Ok(Tensor::from_slice(means, (l, h, dh), device)?)
}

/// The effects of one prompt: `Δp(y*)` and (with `nll`) `ΔNLL(target)` for every head, `L × h`,
/// by the fast last-position re-runs. Returns `(p_unpatched, Δp, ΔNLL)`.
pub fn indirect_effects(
    model: &Transformer,
    prompt: &PromptIds,
    means: &[f32],
    op: PatchOp,
    nll: bool,
) -> Result<(f32, Vec<f32>, Vec<f32>)> {
    effects_within(model, prompt, means, op, nll, CACHE_BUDGET)
}

/// [`indirect_effects`] with the heads of a layer grouped so their cache copies fit `budget`.
fn effects_within(
    model: &Transformer,
    prompt: &PromptIds,
    means: &[f32],
    op: PatchOp,
    nll: bool,
    budget: usize,
) -> Result<(f32, Vec<f32>, Vec<f32>)> {
    let cfg = model.config();
    let (n_layers, h, dh) = (model.layers.len(), cfg.num_attention_heads, cfg.head_dim);
    let y = *prompt
        .target
        .first()
        .ok_or_else(|| Error::invalid("target", "no target token"))?;
    // With the NLL the suffix is the last prompt token and the target tokens but its last.
    let (ids, s) = if nll {
        with_target(prompt)
    } else {
        (prompt.ids.clone(), 1)
    };
    let run = run_suffix(model, &ids, s, false)?;
    let p0 = softmax(&run.logits[0])[y as usize];
    let nll0 = if nll {
        target_nll(&prompt.target, &run.logits)
    } else {
        0.0
    };
    let device = model.device();
    let all_means = means_tensor(means, n_layers, h, dh, device)?;
    // The heads of a layer run as one batch, its rows sharing the prompt's cached keys and
    // values (copied per row); a large model's heads go in groups so those copies stay within
    // CACHE_BUDGET bytes.
    let row_bytes = 2
        * n_layers
        * cfg.num_key_value_heads
        * (ids.len() - s)
        * cfg.head_dim
        * model.dtype().size_in_bytes();
    let rows = (budget / row_bytes.max(1)).clamp(1, h);
    let batch_cache = run.cache.repeat_batch(rows)?;
    let mut dp = vec![0f32; n_layers * h];
    let mut dnll = if nll {
        vec![0f32; n_layers * h]
    } else {
        Vec::new()
    };
    for l in 0..n_layers {
        let xs = run.resid[l]
            .broadcast_as((rows, s, cfg.hidden_size))?
            .contiguous()?;
        let layer_means = all_means.get(l)?.unsqueeze(0)?.unsqueeze(0)?;
        for first in (0..h).step_by(rows) {
            let mut patch = DiagonalPatch::new(l, &layer_means, s, op, first, rows)?;
            let mut cache = batch_cache.clone();
            let logits = model.run(
                Input::Resid { layer: l, xs: &xs },
                &opts(if nll { LogitsAt::All } else { LogitsAt::Last }),
                Some(&mut cache),
                &mut patch,
            )?;
            // (rows, s', V)
            let logits = logits.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
            for k in first..(first + rows).min(h) {
                let out: Vec<Vec<f32>> = logits.get(k - first)?.to_vec2()?;
                dp[l * h + k] = softmax(&out[0])[y as usize] - p0;
                if nll {
                    dnll[l * h + k] = (target_nll(&prompt.target, &out) - nll0) as f32;
                }
            }
        }
    }
    Ok((p0, dp, dnll))
}

/// Todd's loop, for reference: one full forward of the whole prompt per patched head (the patch
/// at HOOK A of the last prompt position). Returns `(p_unpatched, Δp)`.
pub fn indirect_effects_full(
    model: &Transformer,
    prompt: &PromptIds,
    means: &[f32],
    op: PatchOp,
) -> Result<(f32, Vec<f32>)> {
    let cfg = model.config();
    let (n_layers, h, dh) = (model.layers.len(), cfg.num_attention_heads, cfg.head_dim);
    let y = prompt.target[0] as usize;
    let input = ids_tensor(&prompt.ids, model.device())?;
    let last = |logits: Tensor| -> Result<f32> {
        let row: Vec<f32> = logits
            .squeeze(0)?
            .squeeze(0)?
            .to_dtype(DType::F32)?
            .to_vec1()?;
        Ok(softmax(&row)[y])
    };
    let p0 = last(model.run(
        Input::Ids(&input),
        &opts(LogitsAt::Last),
        None,
        &mut crate::model::NoHook,
    )?)?;
    let mut dp = vec![0f32; n_layers * h];
    for l in 0..n_layers {
        for k in 0..h {
            let start = (l * h + k) * dh;
            let value = Tensor::from_slice(&means[start..start + dh], dh, model.device())?;
            let mut editor = Editor::new(vec![Edit {
                point: HookPoint::HeadOut(l),
                positions: Positions::List(vec![prompt.ids.len() as isize - 1]),
                heads: Some(vec![k]),
                op: match op {
                    PatchOp::Replace => EditOp::Replace(value),
                    PatchOp::Add => EditOp::Add(value),
                },
            }]);
            let p =
                last(model.run(Input::Ids(&input), &opts(LogitsAt::Last), None, &mut editor)?)?;
            dp[l * h + k] = p - p0;
        }
    }
    Ok((p0, dp))
}

/// The `n` heads of largest score, best first (ties: the lower flat index `l·h + k` first).
pub fn top_heads(scores: &[f32], heads: usize, n: usize) -> Vec<HeadScore> {
    let mut order: Vec<usize> = (0..scores.len()).filter(|&i| !scores[i].is_nan()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    order
        .into_iter()
        .take(n)
        .map(|i| HeadScore {
            layer: i / heads,
            head: i % heads,
            score: scores[i],
        })
        .collect()
}

/// `IV = Σ_{(l,k)} W_O^(l)[:, k·d_h:(k+1)·d_h] · ā_{l,k}` with the effective `o_proj` weights
/// (an attached LoRA adapter included; no bias, as LLaMA's `o_proj` has none).
///
/// Gemma 2/3 and OLMo-2 normalise `o_proj`'s output `o` before it joins the residual stream,
/// where the IV is added: `N(o) = g ⊙ o / rms(o)`. With `rms(o)` held at the layer's value for
/// the mean head outputs of *all* its heads, `N` is linear in the heads, and each listed head
/// contributes its share `g ⊙ W_O^(l,k) ā_{l,k} / rms(o)` of what the layer writes. That share
/// is what is summed there (a deviation from the LLaMA formula, which it equals without the norm;
/// normalising the listed heads' sum alone would blow a few heads up to a whole layer's size).
pub fn instruction_vector(
    model: &Transformer,
    means: &[f32],
    heads: &[HeadId],
) -> Result<Vec<f32>> {
    let cfg = model.config();
    let (h, dh, d) = (cfg.num_attention_heads, cfg.head_dim, cfg.hidden_size);
    if means.len() != model.layers.len() * h * dh {
        return Err(Error::invalid(
            "mean head outputs",
            format!(
                "{} values; the model has {} layers of {h} heads of {dh}",
                means.len(),
                model.layers.len()
            ),
        ));
    }
    let mut per_layer: std::collections::BTreeMap<usize, Vec<f32>> =
        std::collections::BTreeMap::new();
    for &(l, k) in heads {
        let layer = model.layers.get(l).ok_or_else(|| {
            Error::invalid(
                "head",
                format!(
                    "layer {l} out of range (the model has {})",
                    model.layers.len()
                ),
            )
        })?;
        if k >= h {
            return Err(Error::invalid(
                "head",
                format!("head {k} out of range (the model has {h})"),
            ));
        }
        let w = layer
            .self_attn
            .o_proj
            .effective_weight()?
            .to_dtype(DType::F32)?
            .to_device(&Device::Cpu)?
            .narrow(1, k * dh, dh)?;
        let start = (l * h + k) * dh;
        let a = Tensor::from_slice(&means[start..start + dh], (dh, 1), &Device::Cpu)?;
        let out: Vec<f32> = w.matmul(&a)?.flatten_all()?.to_vec1()?;
        let sum = per_layer.entry(l).or_insert_with(|| vec![0f32; d]);
        for (x, y) in sum.iter_mut().zip(out) {
            *x += y;
        }
    }
    let mut iv = vec![0f32; d];
    for (l, sum) in per_layer {
        let written = match &model.layers[l].attn_out_norm {
            None => sum,
            Some(norm) => {
                // o for the mean outputs of every head of the layer, and its RMS.
                let all = &means[l * h * dh..(l + 1) * h * dh];
                let z = Tensor::from_slice(all, (h * dh, 1), &Device::Cpu)?;
                let w_o = model.layers[l]
                    .self_attn
                    .o_proj
                    .effective_weight()?
                    .to_dtype(DType::F32)?
                    .to_device(&Device::Cpu)?;
                let o: Vec<f32> = w_o.matmul(&z)?.flatten_all()?.to_vec1()?;
                let mean_sq = o.iter().map(|v| v * v).sum::<f32>() / d as f32;
                let inv_rms = 1.0 / (mean_sq + norm.eps as f32).sqrt();
                let gain: Vec<f32> = norm.weight.to_dtype(DType::F32)?.to_vec1()?;
                sum.iter()
                    .zip(&gain)
                    .map(|(v, g)| v * inv_rms * g)
                    .collect()
            }
        };
        for (x, y) in iv.iter_mut().zip(written) {
            *x += y;
        }
    }
    Ok(iv)
}

/// Todd's `fv_to_vocab`: the `n` most likely tokens of `softmax(U · (RMSNorm(IV) ⊙ g))`.
pub fn vector_vocab(
    model: &Transformer,
    tokenizer: &Tokenizer,
    iv: &[f32],
    n: usize,
) -> Result<Vec<(String, f32)>> {
    let xs = Tensor::from_slice(iv, (1, 1, iv.len()), model.device())?;
    let logits = model.run(
        Input::Resid {
            layer: model.layers.len(),
            xs: &xs,
        },
        &opts(LogitsAt::Last),
        None,
        &mut crate::model::NoHook,
    )?;
    let row: Vec<f32> = logits.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
    let probs = softmax(&row);
    let mut order: Vec<usize> = (0..probs.len()).collect();
    order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
    order
        .into_iter()
        .take(n)
        .map(|i| Ok((tokenizer.decode(&[i as u32], false)?, probs[i])))
        .collect()
}

/// Top-1 correctness of the zero-shot prompt without the vector and with it added at the
/// output of each of `layers` (HOOK D, last prompt token), by re-running from layer `ℓ + 1`.
pub fn zero_shot_sweep(
    model: &Transformer,
    prompt: &PromptIds,
    iv: &Tensor,
    layers: &[usize],
) -> Result<(bool, Vec<bool>)> {
    let y = prompt.target[0];
    let run = run_suffix(model, &prompt.ids, 1, false)?;
    let plain = rank_of(&run.logits[0], y) == 0;
    let mut hits = Vec::with_capacity(layers.len());
    for &l in layers {
        // h^(l+1) = output of layer l.
        let xs = run.resid[l + 1].broadcast_add(iv)?;
        let mut cache = run.cache.clone();
        let logits = model.run(
            Input::Resid {
                layer: l + 1,
                xs: &xs,
            },
            &opts(LogitsAt::Last),
            Some(&mut cache),
            &mut crate::model::NoHook,
        )?;
        let row: Vec<f32> = logits.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
        hits.push(rank_of(&row, y) == 0);
    }
    Ok((plain, hits))
}

/// Everything a task needs once its split and the query filter are known.
struct Prepared<'t> {
    split: icl::TaskSplit,
    filter: Vec<usize>,
    clean_accuracy: f64,
    notes: Vec<String>,
    task: &'t IclTask,
}

/// The prompt followed by its target but the last token, and the suffix length that covers
/// the last prompt token and those target tokens: teacher forcing of the whole target.
fn with_target(prompt: &PromptIds) -> (Vec<u32>, usize) {
    let mut ids = prompt.ids.clone();
    ids.extend_from_slice(&prompt.target[..prompt.target.len().saturating_sub(1)]);
    (ids, prompt.target.len().max(1))
}

/// `−Σ log p(target_j)` over the suffix rows of [`with_target`].
fn target_nll(target: &[u32], rows: &[Vec<f32>]) -> f64 {
    target
        .iter()
        .zip(rows)
        .map(|(&t, row)| -log_prob(row, t))
        .sum()
}

/// Draws a trial: a query of the filter set and `shots` train demonstrations (labels shuffled
/// when asked). A draw whose answer cannot be tokenized apart from its prompt is redrawn, up to
/// ten times.
fn draw_trial(
    tokenizer: &Tokenizer,
    cfg: &IvConfig,
    prep: &Prepared<'_>,
    shots: usize,
    shuffle: bool,
    rng: &mut rand::rngs::StdRng,
) -> Result<PromptIds> {
    for _ in 0..10 {
        let q = prep.filter[icl::sample_indices(rng, prep.filter.len(), 1)[0]];
        match make_prompt(
            tokenizer,
            cfg,
            &prep.split.train,
            &prep.split.valid[q],
            shots,
            shuffle,
            rng,
        ) {
            Ok(p) => return Ok(p),
            // An answer that cannot be told apart from its prompt: draw again.
            Err(Error::InvalidArgument { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    Err(Error::invalid(
        "task",
        format!("`{}`: too few prompts could be tokenized", prep.task.name),
    ))
}

/// Builds a prompt of `shots` demonstrations from train (labels shuffled when asked) for `query`.
fn make_prompt(
    tokenizer: &Tokenizer,
    cfg: &IvConfig,
    train: &[IclPair],
    query: &IclPair,
    shots: usize,
    shuffle: bool,
    rng: &mut rand::rngs::StdRng,
) -> Result<PromptIds> {
    let mut demos: Vec<IclPair> = icl::sample_indices(rng, train.len(), shots)
        .into_iter()
        .map(|i| train[i].clone())
        .collect();
    if shuffle {
        let mut outputs: Vec<String> = demos.iter().map(|d| d.output.clone()).collect();
        outputs.shuffle(rng);
        for (d, o) in demos.iter_mut().zip(outputs) {
            d.output = o;
        }
    }
    let (text, target) = cfg.template.prompt(&demos, query);
    icl::encode_prompt(tokenizer, &text, &target)
}

fn check_cancel(progress: &mut Progress<'_>, frac: f32, message: impl Into<String>) -> Result<()> {
    match progress(frac, message.into()) {
        ControlFlow::Continue(()) => Ok(()),
        ControlFlow::Break(()) => Err(Error::Cancelled),
    }
}

fn prepare<'t>(
    model: &Transformer,
    tokenizer: &Tokenizer,
    task: &'t IclTask,
    cfg: &IvConfig,
    rng: &mut rand::rngs::StdRng,
    progress: &mut Progress<'_>,
) -> Result<Prepared<'t>> {
    let split = icl::split_task(&task.items, &cfg.split);
    let needed = cfg
        .shots
        .max(cfg.mean_shots)
        .max(if cfg.evaluate { cfg.eval_shots } else { 0 });
    if split.train.len() < needed.max(1) {
        return Err(Error::invalid(
            "task",
            format!(
                "`{}` has {} examples, {} for demonstrations; {} shots need more",
                task.name,
                task.items.len(),
                split.train.len(),
                needed
            ),
        ));
    }
    if split.valid.is_empty() {
        return Err(Error::invalid(
            "task",
            format!(
                "`{}` has too few examples for a valid split ({})",
                task.name,
                task.items.len()
            ),
        ));
    }
    let mut notes = Vec::new();
    let mut skipped = 0usize;
    let n = split.valid.len();
    // (index, rank of y*, target NLL)
    let mut scored: Vec<(usize, usize, f64)> = Vec::with_capacity(n);
    for (i, query) in split.valid.iter().enumerate() {
        check_cancel(
            progress,
            0.0,
            format!("{}: filtering queries {}/{}", task.name, i + 1, n),
        )?;
        let shots = match cfg.filter {
            FilterMode::Top1 => cfg.shots,
            FilterMode::LowNll => cfg.mean_shots,
        };
        let prompt = match make_prompt(tokenizer, cfg, &split.train, query, shots, false, rng) {
            Ok(p) => p,
            Err(Error::InvalidArgument { .. }) => {
                skipped += 1;
                continue;
            }
            Err(e) => return Err(e),
        };
        let (ids, s) = with_target(&prompt);
        let run = run_suffix(model, &ids, s, false)?;
        let rank = rank_of(&run.logits[0], prompt.target[0]);
        scored.push((i, rank, target_nll(&prompt.target, &run.logits)));
    }
    if skipped > 0 {
        notes.push(format!(
            "{skipped} valid queries skipped: their answer adds no token or merges with the prompt"
        ));
    }
    let clean_accuracy =
        scored.iter().filter(|s| s.1 == 0).count() as f64 / scored.len().max(1) as f64;
    let mut filter: Vec<usize> = match cfg.filter {
        FilterMode::Top1 => scored.iter().filter(|s| s.1 == 0).map(|s| s.0).collect(),
        FilterMode::LowNll => {
            let mut by_nll = scored.clone();
            by_nll.sort_by(|a, b| a.2.total_cmp(&b.2).then(a.0.cmp(&b.0)));
            let mut kept: Vec<usize> = by_nll
                .iter()
                .take(100)
                .filter(|s| s.1 < 10)
                .map(|s| s.0)
                .collect();
            if kept.len() < 50 {
                for s in by_nll.iter().take(50) {
                    if !kept.contains(&s.0) {
                        kept.push(s.0);
                    }
                }
            }
            kept
        }
    };
    if filter.is_empty() {
        notes.push(format!(
            "no valid query is answered top-1 with {} demonstrations; the trials draw from all {} valid queries",
            cfg.shots,
            scored.len()
        ));
        filter = scored.iter().map(|s| s.0).collect();
    }
    if filter.is_empty() {
        return Err(Error::invalid(
            "task",
            format!(
                "`{}`: no valid query can be tokenized with its answer",
                task.name
            ),
        ));
    }
    Ok(Prepared {
        split,
        filter,
        clean_accuracy,
        notes,
        task,
    })
}

/// Mean last-token head outputs over `n_mean` clean prompts, `L × h × d_h` (f32 sums).
fn mean_activations(
    model: &Transformer,
    tokenizer: &Tokenizer,
    prep: &Prepared<'_>,
    cfg: &IvConfig,
    rng: &mut rand::rngs::StdRng,
    progress: &mut Progress<'_>,
    records: &mut Vec<TrialRecord>,
) -> Result<(Vec<f32>, f64)> {
    let c = model.config();
    let (n_layers, h, dh) = (model.layers.len(), c.num_attention_heads, c.head_dim);
    let mut sums = vec![0f64; n_layers * h * dh];
    let mut p_sum = 0f64;
    for done in 0..cfg.n_mean {
        check_cancel(
            progress,
            done as f32 / cfg.n_mean.max(1) as f32,
            format!(
                "{}: mean head outputs {}/{}",
                prep.task.name,
                done + 1,
                cfg.n_mean
            ),
        )?;
        let prompt = draw_trial(tokenizer, cfg, prep, cfg.mean_shots, false, rng)?;
        let run = run_suffix(model, &prompt.ids, 1, true)?;
        for (l, z) in run.heads.iter().enumerate() {
            let z: Vec<f32> = z.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
            for (i, v) in z.iter().enumerate() {
                sums[l * h * dh + i] += f64::from(*v);
            }
        }
        let p = softmax(&run.logits[0])[prompt.target[0] as usize];
        p_sum += f64::from(p);
        if cfg.record_trials {
            records.push(TrialRecord {
                ids: prompt.ids.clone(),
                target: prompt.target.clone(),
                p,
                ie: Vec::new(),
            });
        }
    }
    let n = cfg.n_mean.max(1) as f64;
    Ok((
        sums.into_iter().map(|s| (s / n) as f32).collect(),
        p_sum / n,
    ))
}

/// Runs the procedure for one model over `tasks`, reporting progress (0..1) and checking for
/// cancellation between prompts.
pub fn run_tasks(
    model: &Transformer,
    tokenizer: &Tokenizer,
    tasks: &[IclTask],
    cfg: &IvConfig,
    progress: &mut Progress<'_>,
) -> Result<IvRun> {
    let c = model.config();
    let (n_layers, h, dh, d) = (
        model.layers.len(),
        c.num_attention_heads,
        c.head_dim,
        c.hidden_size,
    );
    if tasks.is_empty() {
        return Err(Error::invalid("task", "no task given"));
    }
    if let Some(heads) = &cfg.heads {
        if heads.is_empty() {
            return Err(Error::invalid("heads", "the head list is empty"));
        }
        if let Some(&(l, k)) = heads.iter().find(|&&(l, k)| l >= n_layers || k >= h) {
            return Err(Error::invalid(
                "heads",
                format!("{l}:{k} is outside the model's {n_layers} layers × {h} heads"),
            ));
        }
    }
    let edit_layers: Vec<usize> = match &cfg.edit_layers {
        None => (0..n_layers).collect(),
        Some(list) => {
            if let Some(&bad) = list.iter().find(|&&l| l >= n_layers) {
                return Err(Error::invalid(
                    "edit layer",
                    format!("{bad} is outside the model's {n_layers} layers"),
                ));
            }
            list.clone()
        }
    };
    let n_tasks = tasks.len() as f32;
    // Phase weights of one task's progress: filter, means, effects, evaluation.
    let mut results: Vec<TaskIv> = Vec::with_capacity(tasks.len());
    let mut prepared = Vec::with_capacity(tasks.len());
    for (t, task) in tasks.iter().enumerate() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(cfg.seed.wrapping_add(t as u64));
        let base = t as f32 / n_tasks;
        let span = 1.0 / n_tasks;
        let phase = |from: f32, to: f32| {
            move |f: f32| base + span * (from + (to - from) * f.clamp(0.0, 1.0))
        };
        let mut timings = IvTimings::default();
        let clock = std::time::Instant::now();
        let p_filter = phase(0.0, 0.1);
        let prep = prepare(model, tokenizer, task, cfg, &mut rng, &mut |f, m| {
            progress(p_filter(f), m)
        })?;
        timings.filter_secs = clock.elapsed().as_secs_f64();
        let clock = std::time::Instant::now();
        let p_means = phase(0.1, 0.3);
        let mut mean_trials = Vec::new();
        let (means, mean_p_clean) = mean_activations(
            model,
            tokenizer,
            &prep,
            cfg,
            &mut rng,
            &mut |f, m| progress(p_means(f), m),
            &mut mean_trials,
        )?;
        timings.means_secs = clock.elapsed().as_secs_f64();
        let clock = std::time::Instant::now();
        let p_ie = phase(0.3, 0.8);
        let mut aie = Vec::new();
        let mut aie_nll = Vec::new();
        let mut ie_trials = Vec::new();
        let mut mean_p_corrupted = f64::NAN;
        if cfg.heads.is_none() {
            let nll = cfg.rank_by == RankBy::Nll;
            let mut sum_dp = vec![0f64; n_layers * h];
            let mut sum_nll = vec![0f64; n_layers * h];
            let mut p_sum = 0f64;
            for done in 0..cfg.n_ie {
                check_cancel(
                    &mut |f, m| progress(p_ie(f), m),
                    done as f32 / cfg.n_ie.max(1) as f32,
                    format!(
                        "{}: indirect effects, trial {}/{}",
                        task.name,
                        done + 1,
                        cfg.n_ie
                    ),
                )?;
                let prompt = draw_trial(
                    tokenizer,
                    cfg,
                    &prep,
                    cfg.shots,
                    cfg.shuffle_labels,
                    &mut rng,
                )?;
                let (p0, dp, dnll) = indirect_effects(model, &prompt, &means, cfg.patch, nll)?;
                p_sum += f64::from(p0);
                for (s, v) in sum_dp.iter_mut().zip(&dp) {
                    *s += f64::from(*v);
                }
                for (s, v) in sum_nll.iter_mut().zip(&dnll) {
                    *s += f64::from(*v);
                }
                if cfg.record_trials {
                    ie_trials.push(TrialRecord {
                        ids: prompt.ids.clone(),
                        target: prompt.target.clone(),
                        p: p0,
                        ie: dp,
                    });
                }
            }
            let n = cfg.n_ie.max(1) as f64;
            aie = sum_dp.iter().map(|s| (s / n) as f32).collect();
            if nll {
                aie_nll = sum_nll.iter().map(|s| (s / n) as f32).collect();
            }
            mean_p_corrupted = p_sum / n;
        }
        timings.ie_secs = clock.elapsed().as_secs_f64();
        let top = match &cfg.heads {
            Some(list) => list
                .iter()
                .map(|&(layer, head)| HeadScore {
                    layer,
                    head,
                    score: f32::NAN,
                })
                .collect(),
            None => ranked(&aie, &aie_nll, cfg.rank_by, h, cfg.n_top),
        };
        let mut notes = prep.notes.clone();
        if cfg.heads.is_some() {
            notes.push("heads given, not searched: no indirect effects".to_owned());
        }
        results.push(TaskIv {
            task: task.name.clone(),
            sizes: TaskSizes {
                items: task.items.len(),
                train: prep.split.train.len(),
                valid: prep.split.valid.len(),
                test: prep.split.test.len(),
                filter: prep.filter.len(),
            },
            notes,
            clean_accuracy: prep.clean_accuracy,
            mean_p_clean,
            mean_p_corrupted,
            aie,
            aie_nll,
            top,
            iv: Vec::new(),
            iv_norm: 0.0,
            means,
            evaluation: None,
            vocab: Vec::new(),
            mean_trials,
            ie_trials,
            timings,
        });
        prepared.push((prep, rng));
    }
    // Universal heads: the AIE averaged over the tasks (Todd's compute_universal_function_vector).
    let (universal_aie, universal_top) = if tasks.len() > 1 && cfg.heads.is_none() {
        let nll = cfg.rank_by == RankBy::Nll;
        let mut avg = vec![0f32; n_layers * h];
        let mut avg_nll = vec![0f32; if nll { n_layers * h } else { 0 }];
        for r in &results {
            for (a, v) in avg.iter_mut().zip(&r.aie) {
                *a += v / n_tasks;
            }
            for (a, v) in avg_nll.iter_mut().zip(&r.aie_nll) {
                *a += v / n_tasks;
            }
        }
        let top = ranked(&avg, &avg_nll, cfg.rank_by, h, cfg.n_top);
        (avg, top)
    } else {
        (Vec::new(), Vec::new())
    };
    for (t, (result, (prep, mut rng))) in results.iter_mut().zip(prepared).enumerate() {
        if !universal_top.is_empty() {
            result.top.clone_from(&universal_top);
            result.notes.push(format!(
                "the vector uses the universal heads of the {} tasks",
                tasks.len()
            ));
        }
        let heads_used: Vec<HeadId> = result.top.iter().map(|s| (s.layer, s.head)).collect();
        result.iv = instruction_vector(model, &result.means, &heads_used)?;
        result.iv_norm = result.iv.iter().map(|x| x * x).sum::<f32>().sqrt();
        result.vocab = vector_vocab(model, tokenizer, &result.iv, cfg.vocab_top)?;
        let base = t as f32 / n_tasks + 0.8 / n_tasks;
        if cfg.evaluate {
            let clock = std::time::Instant::now();
            result.evaluation = Some(evaluate(
                model,
                tokenizer,
                &prep,
                cfg,
                &result.iv,
                &edit_layers,
                &mut rng,
                &mut |f, m| progress(base + 0.2 / n_tasks * f, m),
            )?);
            result.timings.eval_secs = clock.elapsed().as_secs_f64();
        }
    }
    let _ = progress(1.0, "done".to_owned());
    Ok(IvRun {
        layers: n_layers,
        heads: h,
        head_dim: dh,
        hidden: d,
        tasks: results,
        universal_aie,
        universal_top,
    })
}

fn ranked(aie: &[f32], aie_nll: &[f32], rank_by: RankBy, h: usize, n: usize) -> Vec<HeadScore> {
    match rank_by {
        RankBy::Prob => top_heads(aie, h, n),
        RankBy::Nll => {
            let neg: Vec<f32> = aie_nll.iter().map(|v| -v).collect();
            top_heads(&neg, h, n)
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn evaluate(
    model: &Transformer,
    tokenizer: &Tokenizer,
    prep: &Prepared<'_>,
    cfg: &IvConfig,
    iv: &[f32],
    layers: &[usize],
    rng: &mut rand::rngs::StdRng,
    progress: &mut Progress<'_>,
) -> Result<IvEvaluation> {
    let iv_t = Tensor::from_slice(iv, iv.len(), model.device())?.to_dtype(model.dtype())?;
    let test: Vec<&IclPair> = prep
        .split
        .test
        .iter()
        .take(cfg.n_test.unwrap_or(usize::MAX))
        .collect();
    let mut n = 0usize;
    let mut zero = 0usize;
    let mut few = 0usize;
    let mut with = vec![0usize; layers.len()];
    for (i, query) in test.iter().enumerate() {
        check_cancel(
            progress,
            i as f32 / test.len().max(1) as f32,
            format!("{}: evaluating {}/{}", prep.task.name, i + 1, test.len()),
        )?;
        let (text, target) = cfg.template.prompt(&[], query);
        let Ok(prompt) = icl::encode_prompt(tokenizer, &text, &target) else {
            continue;
        };
        let (plain, hits) = zero_shot_sweep(model, &prompt, &iv_t, layers)?;
        n += 1;
        zero += usize::from(plain);
        for (w, hit) in with.iter_mut().zip(hits) {
            *w += usize::from(hit);
        }
        let shots = make_prompt(
            tokenizer,
            cfg,
            &prep.split.train,
            query,
            cfg.eval_shots,
            false,
            rng,
        )?;
        let run = run_suffix(model, &shots.ids, 1, false)?;
        few += usize::from(rank_of(&run.logits[0], shots.target[0]) == 0);
    }
    let frac = |k: usize| k as f64 / n.max(1) as f64;
    let accs: Vec<LayerAccuracy> = layers
        .iter()
        .zip(&with)
        .map(|(&layer, &k)| LayerAccuracy {
            layer,
            accuracy: frac(k),
        })
        .collect();
    let best = accs
        .iter()
        .copied()
        .fold(None, |best: Option<LayerAccuracy>, a| match best {
            Some(b) if b.accuracy >= a.accuracy => Some(b),
            _ => Some(a),
        })
        .unwrap_or(LayerAccuracy {
            layer: 0,
            accuracy: f64::NAN,
        });
    Ok(IvEvaluation {
        n,
        zero_shot: frac(zero),
        few_shot: frac(few),
        few_shot_shots: cfg.eval_shots,
        layers: accs,
        best_layer: best.layer,
        best_accuracy: best.accuracy,
    })
}

/// The heads both runs put in their vectors (in A's order).
pub fn shared_heads(a: &[HeadScore], b: &[HeadScore]) -> Vec<HeadId> {
    a.iter()
        .filter(|x| b.iter().any(|y| y.layer == x.layer && y.head == x.head))
        .map(|x| (x.layer, x.head))
        .collect()
}

/// Parses a head list `L:H,L:H,…` (or the word `llama2-7b-universal`).
pub fn parse_heads(text: &str) -> std::result::Result<Vec<HeadId>, String> {
    let text = text.trim();
    if text.eq_ignore_ascii_case("llama2-7b-universal") {
        return Ok(LLAMA2_7B_UNIVERSAL_HEADS.to_vec());
    }
    text.split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|item| {
            let (l, h) = item
                .trim()
                .split_once(':')
                .ok_or_else(|| format!("`{}` is not LAYER:HEAD", item.trim()))?;
            let l = l
                .trim()
                .parse::<usize>()
                .map_err(|_| format!("`{}`: bad layer", item.trim()))?;
            let h = h
                .trim()
                .parse::<usize>()
                .map_err(|_| format!("`{}`: bad head", item.trim()))?;
            Ok((l, h))
        })
        .collect::<std::result::Result<Vec<_>, String>>()
        .and_then(|v| {
            if v.is_empty() {
                Err("no head given".to_owned())
            } else {
                Ok(v)
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tiny::{tiny_model, tiny_options};

    fn tiny() -> crate::model::LoadedModel {
        tiny_model(7, &tiny_options(DType::F32)).unwrap()
    }

    fn prompt(ids: &[u32], target: &[u32]) -> PromptIds {
        PromptIds {
            ids: ids.to_vec(),
            target: target.to_vec(),
        }
    }

    /// A prompt's last-token head outputs, `L × h × d_h`.
    fn last_head_outputs(model: &Transformer, ids: &[u32]) -> Vec<f32> {
        let run = run_suffix(model, ids, 1, true).unwrap();
        run.heads
            .iter()
            .flat_map(|z| z.flatten_all().unwrap().to_vec1::<f32>().unwrap())
            .collect()
    }

    /// Mean outputs from a few prompts of the tiny model.
    fn some_means(model: &Transformer) -> Vec<f32> {
        last_head_outputs(model, &[1, 7, 9, 11, 5, 20])
            .into_iter()
            .map(|v| v * 8.0 + 0.5)
            .collect()
    }

    #[test]
    fn fast_patch_equals_full_patched_forward() -> anyhow::Result<()> {
        let m = tiny();
        let means = some_means(&m.model);
        let p = prompt(&[1, 8, 12, 30, 14, 9, 22, 40, 17], &[33]);
        for op in [PatchOp::Replace, PatchOp::Add] {
            let (p_fast, fast, _) = indirect_effects(&m.model, &p, &means, op, false)?;
            let (p_full, full) = indirect_effects_full(&m.model, &p, &means, op)?;
            assert!((p_fast - p_full).abs() < 1e-6);
            let worst = fast
                .iter()
                .zip(&full)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(worst < 1e-5, "{op:?}: fast and full differ by {worst}");
            assert!(
                full.iter().any(|v| v.abs() > 1e-4),
                "the patches must change something"
            );
        }
        Ok(())
    }

    #[test]
    fn grouped_heads_give_the_same_effects() -> anyhow::Result<()> {
        // Groups of 1 and of 3 heads (the last group padded) equal one batch of all 4.
        let m = tiny();
        let means = some_means(&m.model);
        let p = prompt(&[1, 8, 12, 30, 14, 9, 22], &[33, 21]);
        let cfg = m.model.config();
        let row = 2 * 3 * cfg.num_key_value_heads * (p.ids.len() - 1) * cfg.head_dim * 4;
        let (_, all, _) = indirect_effects(&m.model, &p, &means, PatchOp::Replace, false)?;
        for budget in [1, 3 * row] {
            let (_, grouped, _) =
                effects_within(&m.model, &p, &means, PatchOp::Replace, false, budget)?;
            for (a, b) in all.iter().zip(&grouped) {
                assert!((a - b).abs() < 1e-6, "budget {budget}: {a} vs {b}");
            }
        }
        Ok(())
    }

    #[test]
    fn null_patch_has_zero_effect() -> anyhow::Result<()> {
        let m = tiny();
        let p = prompt(&[1, 8, 12, 30, 14, 9], &[33]);
        // The prompt's own last-token head outputs as the "means".
        let own = last_head_outputs(&m.model, &p.ids);
        let (_, ie, _) = indirect_effects(&m.model, &p, &own, PatchOp::Replace, false)?;
        let worst = ie.iter().fold(0f32, |w, v| w.max(v.abs()));
        assert!(worst < 1e-6, "null patch IE {worst}");
        let (_, ie) = indirect_effects_full(&m.model, &p, &own, PatchOp::Replace)?;
        assert!(ie.iter().all(|v| v.abs() < 1e-6));
        Ok(())
    }

    #[test]
    fn decomposition_and_single_head_vector() -> anyhow::Result<()> {
        let m = tiny();
        let c = m.model.config().clone();
        let (h, dh) = (c.num_attention_heads, c.head_dim);
        let means = some_means(&m.model);
        // Σ_k W_O[:, slice_k] z_k = o_proj(z) for layer 1's mean z.
        let layer = 1;
        let heads: Vec<HeadId> = (0..h).map(|k| (layer, k)).collect();
        let iv = instruction_vector(&m.model, &means, &heads)?;
        let z = Tensor::from_slice(
            &means[layer * h * dh..(layer + 1) * h * dh],
            (1, h * dh),
            &Device::Cpu,
        )?;
        let o = m.model.layers[layer].self_attn.o_proj.forward(
            &z,
            crate::model::lora::LinearMode {
                differentiable: false,
                use_lora: true,
            },
        )?;
        let o: Vec<f32> = o.flatten_all()?.to_vec1()?;
        for (a, b) in iv.iter().zip(&o) {
            assert!((a - b).abs() < 1e-5);
        }
        // Single head: o_proj of a z that is zero except head 2.
        let mut zero = vec![0f32; h * dh];
        let start = (layer * h + 2) * dh;
        zero[2 * dh..3 * dh].copy_from_slice(&means[start..start + dh]);
        let z = Tensor::from_slice(&zero, (1, h * dh), &Device::Cpu)?;
        let o: Vec<f32> = m.model.layers[layer]
            .self_attn
            .o_proj
            .forward(
                &z,
                crate::model::lora::LinearMode {
                    differentiable: false,
                    use_lora: true,
                },
            )?
            .flatten_all()?
            .to_vec1()?;
        let single = instruction_vector(&m.model, &means, &[(layer, 2)])?;
        for (a, b) in single.iter().zip(&o) {
            assert!((a - b).abs() < 1e-6);
        }
        Ok(())
    }

    /// With a norm on the attention output (Gemma): all heads of a layer give exactly what the
    /// layer writes for the mean head outputs, `N(o_proj(z̄))`, and single heads add up to it.
    #[test]
    fn post_norm_vector_is_each_heads_share_of_the_layer_output() -> anyhow::Result<()> {
        use crate::model::config::Architecture;
        use crate::model::tiny::{tiny_family_config, tiny_model_with, tiny_options};
        let m = tiny_model_with(
            &tiny_family_config(Architecture::Gemma3),
            3,
            &tiny_options(DType::F32),
        )?;
        let c = m.model.config().clone();
        let (h, dh) = (c.num_attention_heads, c.head_dim);
        let means = some_means(&m.model);
        let layer = 1;
        let heads: Vec<HeadId> = (0..h).map(|k| (layer, k)).collect();
        let all = instruction_vector(&m.model, &means, &heads)?;
        let z = Tensor::from_slice(
            &means[layer * h * dh..(layer + 1) * h * dh],
            (1, h * dh),
            &Device::Cpu,
        )?;
        let l = &m.model.layers[layer];
        let o = l.self_attn.o_proj.forward(
            &z,
            crate::model::lora::LinearMode {
                differentiable: false,
                use_lora: true,
            },
        )?;
        let norm = l.attn_out_norm.as_ref().expect("Gemma has the post-norm");
        let inv_rms = (o.sqr()?.mean_keepdim(candle_core::D::Minus1)? + norm.eps)?
            .sqrt()?
            .recip()?;
        let written: Vec<f32> = o
            .broadcast_mul(&inv_rms)?
            .broadcast_mul(&norm.weight)?
            .flatten_all()?
            .to_vec1()?;
        let mut summed = vec![0f32; all.len()];
        for k in 0..h {
            for (s, v) in
                summed
                    .iter_mut()
                    .zip(instruction_vector(&m.model, &means, &[(layer, k)])?)
            {
                *s += v;
            }
        }
        for ((a, b), s) in all.iter().zip(&written).zip(&summed) {
            assert!((a - b).abs() < 1e-4 * b.abs().max(1.0), "{a} vs {b}");
            assert!((a - s).abs() < 1e-4 * s.abs().max(1.0), "{a} vs {s}");
        }
        Ok(())
    }

    #[test]
    fn zero_vector_leaves_logits_unchanged_and_sweep_matches_full_edit() -> anyhow::Result<()> {
        let m = tiny();
        let d = m.model.config().hidden_size;
        let p = prompt(&[1, 8, 12, 30, 14], &[33]);
        let zero = Tensor::zeros(d, DType::F32, &Device::Cpu)?;
        let layers: Vec<usize> = (0..m.model.layers.len()).collect();
        let (plain, hits) = zero_shot_sweep(&m.model, &p, &zero, &layers)?;
        assert!(hits.iter().all(|&h| h == plain));
        // With a real vector the partial re-run equals a full forward with the edit at HOOK D.
        let iv: Vec<f32> = (0..d).map(|i| ((i as f32) * 0.7).sin() * 3.0).collect();
        let iv_t = Tensor::from_slice(&iv, d, &Device::Cpu)?;
        for l in 0..m.model.layers.len() {
            let run = run_suffix(&m.model, &p.ids, 1, false)?;
            let xs = run.resid[l + 1].broadcast_add(&iv_t)?;
            let mut cache = run.cache.clone();
            let fast: Vec<f32> = m
                .model
                .run(
                    Input::Resid {
                        layer: l + 1,
                        xs: &xs,
                    },
                    &opts(LogitsAt::Last),
                    Some(&mut cache),
                    &mut crate::model::NoHook,
                )?
                .flatten_all()?
                .to_vec1()?;
            let mut editor = Editor::new(vec![Edit {
                point: HookPoint::ResidPost(l),
                positions: Positions::List(vec![-1]),
                heads: None,
                op: EditOp::Add(iv_t.clone()),
            }]);
            let input = ids_tensor(&p.ids, &Device::Cpu)?;
            let full: Vec<f32> = m
                .model
                .run(Input::Ids(&input), &opts(LogitsAt::Last), None, &mut editor)?
                .flatten_all()?
                .to_vec1()?;
            let worst = fast
                .iter()
                .zip(&full)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(worst < 1e-4, "layer {l}: {worst}");
        }
        Ok(())
    }

    #[test]
    fn ranking_uses_flat_index_order() {
        // L = 2, h = 3: the flat index is l·h + k.
        let scores = [0.1, 0.5, -0.2, 0.5, 0.9, f32::NAN];
        let top = top_heads(&scores, 3, 3);
        let ids: Vec<HeadId> = top.iter().map(|s| (s.layer, s.head)).collect();
        assert_eq!(ids, vec![(1, 1), (0, 1), (1, 0)]);
    }

    #[test]
    fn nll_effects_match_between_suffix_lengths() -> anyhow::Result<()> {
        // Δp from the NLL path (suffix of several tokens) equals the one-token path.
        let m = tiny();
        let means = some_means(&m.model);
        let p = prompt(&[1, 8, 12, 30, 14, 9], &[33, 21, 40]);
        let (p1, dp1, _) = indirect_effects(&m.model, &p, &means, PatchOp::Add, false)?;
        let (p2, dp2, dnll) = indirect_effects(&m.model, &p, &means, PatchOp::Add, true)?;
        assert!((p1 - p2).abs() < 1e-5);
        for (a, b) in dp1.iter().zip(&dp2) {
            assert!((a - b).abs() < 1e-5);
        }
        assert!(dnll.iter().any(|v| v.abs() > 1e-4));
        Ok(())
    }

    #[test]
    fn heads_parse() {
        assert_eq!(parse_heads("1:2, 3:0").unwrap(), vec![(1, 2), (3, 0)]);
        assert_eq!(parse_heads("llama2-7b-universal").unwrap().len(), 10);
        assert!(parse_heads("1-2").unwrap_err().contains("LAYER:HEAD"));
        assert!(parse_heads("").is_err());
    }
}
