//! LoRA fine-tuning on a frozen base model (Hu et al., 2021; defaults of METHODS.md §5.3).
//!
//! The base weights are plain tensors: their products go through the frozen-linear ops of
//! [`crate::model::lora`], whose backward computes only the input gradient, so a step never
//! computes a gradient for a frozen weight. Only the adapters' `A` and `B` are `Var`s.
//!
//! The loss is a sum of named [`LossTerm`]s ([`crate::train::loss`]), each reported on its own
//! curve. Settings live in [`crate::train::settings`], batching in [`crate::train::batch`], the
//! optimizer in [`crate::train::optim`]; this file is the trainer with its two gradient paths.
//!
//! Determinism: the order of examples, the dropout masks and the adapter initialisation are
//! pure functions of the seed and the step, so a run resumed from a checkpoint continues
//! exactly as the uninterrupted run would have.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Tensor, Var, D};

use crate::error::{Error, Result};
use crate::model::adapter::module_mut;
use crate::model::hooks::NoHook;
use crate::model::lora::{LoraAdapter, LoraDropout, DROPOUT_OFF};
use crate::model::transformer::{ForwardOptions, Input, LogitsAt, Transformer};
use crate::model::vjp::LoraGrads;
use crate::train::dataset::{shuffle, Example, SplitMix64};
use crate::train::guidance::{Guidance, GUIDED_TERMS};

mod guided;
use crate::train::optim::adamw_update;

pub use crate::train::batch::{make_batch, Batch};
pub use crate::train::loss::{cross_entropy, CrossEntropy, LossContext, LossTerm};
pub use crate::train::optim::Moments;
pub use crate::train::results::{EvalReport, StepReport};
pub use crate::train::settings::{LoraSettings, Schedule, TrainSettings, TARGETABLE};

/// One adapter's trainable tensors.
#[derive(Clone, Debug)]
pub struct AdapterParam {
    /// Layer index.
    pub layer: usize,
    /// Module name (`q_proj`, ...).
    pub module: String,
    /// `A`, `(r, in)`.
    pub a: Var,
    /// `B`, `(out, r)`.
    pub b: Var,
}

impl AdapterParam {
    /// PEFT's tensor name prefix for this adapter.
    pub fn peft_prefix(&self) -> String {
        let block = if self.module.ends_with("_proj")
            && matches!(self.module.as_str(), "gate_proj" | "up_proj" | "down_proj")
        {
            "mlp"
        } else {
            "self_attn"
        };
        format!(
            "base_model.model.model.layers.{}.{block}.{}",
            self.layer, self.module
        )
    }
}

/// Loss terms and gradients of one optimizer step, before the update.
#[derive(Clone, Debug)]
pub struct Gradients {
    /// Each loss term averaged over the micro-batches.
    pub terms: Vec<(String, f64)>,
    /// `(dA, dB)` per adapter, parallel to [`Trainer::params`].
    pub grads: Vec<(Tensor, Tensor)>,
    /// Tokens processed (no padding).
    pub tokens: usize,
    /// Values with their own curves that are not loss terms ([`StepReport::metrics`]).
    pub metrics: Vec<(String, f64)>,
}

/// Why a step failed.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    /// The loss or the gradient was NaN or infinite; parameters were not updated.
    #[error("the loss became {what} at step {step}; parameters were left as they were after step {last_good}")]
    NonFinite {
        /// `NaN` or `infinite`.
        what: &'static str,
        /// The failing step (1-based).
        step: usize,
        /// The last completed step.
        last_good: usize,
    },
    /// Any other failure.
    #[error(transparent)]
    Other(#[from] Error),
}

impl From<candle_core::Error> for StepError {
    fn from(err: candle_core::Error) -> Self {
        Self::Other(err.into())
    }
}

/// A LoRA fine-tuning run in memory.
pub struct Trainer {
    model: Transformer,
    settings: TrainSettings,
    params: Vec<AdapterParam>,
    moments: Vec<(Moments, Moments)>,
    train: Vec<Example>,
    validation: Vec<Example>,
    pad_id: u32,
    step: usize,
    terms: Vec<Box<dyn LossTerm>>,
    dropout_seed: Arc<AtomicU64>,
    autograd: bool,
    guidance: Option<Guidance>,
}

/// Mixes values into a seed.
fn mix(seed: u64, values: &[u64]) -> u64 {
    let mut rng = SplitMix64(seed);
    let mut out = rng.next_u64();
    for &v in values {
        rng.0 ^= v.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        out ^= rng.next_u64().rotate_left(17);
    }
    out
}

fn module_index(module: &str) -> u64 {
    TARGETABLE
        .iter()
        .position(|m| *m == module)
        .map_or(99, |i| i as u64)
}

impl Trainer {
    /// Attaches fresh adapters (PEFT's initialisation: `A` Kaiming-uniform with bound
    /// `1/sqrt(in)`, `B = 0`, so the adapted model starts equal to the base) and prepares AdamW.
    pub fn new(
        mut model: Transformer,
        settings: TrainSettings,
        train: Vec<Example>,
        validation: Vec<Example>,
        pad_id: u32,
    ) -> Result<Self> {
        settings.validate()?;
        if train.is_empty() {
            return Err(Error::invalid("training data", "no training example"));
        }
        if model.config().architecture == crate::model::Architecture::Phi3 {
            // Phi-3's PEFT modules are the fused `qkv_proj` and `gate_up_proj`: adapters trained
            // on their parts could not be saved under names PEFT loads into Phi-3.
            if let Some(fused) = settings.lora.targets.iter().find(|t| {
                matches!(
                    t.as_str(),
                    "q_proj" | "k_proj" | "v_proj" | "gate_proj" | "up_proj"
                )
            }) {
                return Err(Error::invalid(
                    "target modules",
                    format!(
                        "Phi-3 fuses `{fused}` into qkv_proj or gate_up_proj; training LoRA on the fused modules is not supported yet (o_proj and down_proj are)"
                    ),
                ));
            }
        }
        let device = model.device().clone();
        let dtype = model.dtype();
        let dropout_seed = Arc::new(AtomicU64::new(DROPOUT_OFF));
        let rank = settings.lora.rank;
        #[allow(clippy::cast_precision_loss)]
        let scale = settings.lora.alpha / rank as f64;
        let mut params = Vec::new();
        for layer in 0..model.layers.len() {
            for module in &settings.lora.targets {
                let Some(linear) = module_mut(&mut model, layer, module) else {
                    return Err(Error::invalid(
                        "target modules",
                        format!("layer {layer} has no `{module}`"),
                    ));
                };
                let (out_dim, in_dim) = (linear.out_features(), linear.in_features());
                let mut rng = SplitMix64(mix(
                    settings.seed,
                    &[layer as u64, module_index(module), 0xA],
                ));
                #[allow(clippy::cast_precision_loss)]
                let bound = 1.0 / (in_dim as f32).sqrt();
                let a_values: Vec<f32> = (0..rank * in_dim)
                    .map(|_| (rng.next_f32() * 2.0 - 1.0) * bound)
                    .collect();
                let a = Var::from_tensor(
                    &Tensor::from_vec(a_values, (rank, in_dim), &device)?.to_dtype(dtype)?,
                )?;
                let b = Var::from_tensor(&Tensor::zeros((out_dim, rank), dtype, &device)?)?;
                let id = (layer as u64) << 8 | module_index(module);
                linear.attach(LoraAdapter {
                    a: a.as_tensor().clone(),
                    b: b.as_tensor().clone(),
                    scale,
                    dropout: (settings.lora.dropout > 0.0).then(|| LoraDropout {
                        p: settings.lora.dropout,
                        id,
                        seed: dropout_seed.clone(),
                    }),
                })?;
                params.push(AdapterParam {
                    layer,
                    module: module.clone(),
                    a,
                    b,
                });
            }
        }
        let moments = params
            .iter()
            .map(|p| -> Result<(Moments, Moments)> {
                let zeros = |t: &Tensor| -> Result<Moments> {
                    Ok(Moments {
                        m: t.zeros_like()?,
                        v: t.zeros_like()?,
                    })
                };
                Ok((zeros(p.a.as_tensor())?, zeros(p.b.as_tensor())?))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            model,
            settings,
            params,
            moments,
            train,
            validation,
            pad_id,
            step: 0,
            terms: vec![Box::new(CrossEntropy)],
            dropout_seed,
            autograd: false,
            guidance: None,
        })
    }

    /// Adds a loss term after the cross-entropy.
    pub fn add_term(&mut self, term: Box<dyn LossTerm>) {
        self.terms.push(term);
    }

    /// Names of the loss terms, in order.
    pub fn term_names(&self) -> Vec<String> {
        if self.guidance.is_some() {
            return std::iter::once("ce")
                .chain(GUIDED_TERMS)
                .map(str::to_owned)
                .collect();
        }
        self.terms.iter().map(|t| t.name().to_owned()).collect()
    }

    /// Guides the run with an instruction vector (METHODS.md §5.2/§5.4): the loss becomes
    /// `ce + kl1 + kl2 + pr`, each computed by [`crate::train::guidance`].
    pub fn set_guidance(&mut self, guidance: Guidance) {
        self.guidance = Some(guidance);
    }

    /// The guidance, when the run has one.
    pub fn guidance(&self) -> Option<&Guidance> {
        self.guidance.as_ref()
    }

    /// The settings.
    pub fn settings(&self) -> &TrainSettings {
        &self.settings
    }

    /// Optimizer steps completed.
    pub fn step_count(&self) -> usize {
        self.step
    }

    /// Whether every planned step is done.
    pub fn is_finished(&self) -> bool {
        self.step >= self.settings.steps
    }

    /// The model with its adapters attached (sharing the trained tensors).
    pub fn model(&self) -> &Transformer {
        &self.model
    }

    /// Consumes the trainer, returning the adapted model.
    pub fn into_model(self) -> Transformer {
        self.model
    }

    /// The trainable tensors.
    pub fn params(&self) -> &[AdapterParam] {
        &self.params
    }

    /// AdamW moments, parallel to [`Trainer::params`].
    pub fn moments(&self) -> &[(Moments, Moments)] {
        &self.moments
    }

    /// Number of training examples.
    pub fn train_len(&self) -> usize {
        self.train.len()
    }

    /// Number of validation examples.
    pub fn validation_len(&self) -> usize {
        self.validation.len()
    }

    /// Restores parameters, moments and the step count (used when resuming).
    pub fn restore(
        &mut self,
        values: &[(Tensor, Tensor)],
        moments: Vec<(Moments, Moments)>,
        step: usize,
    ) -> Result<()> {
        if values.len() != self.params.len() || moments.len() != self.params.len() {
            return Err(Error::invalid(
                "checkpoint",
                format!(
                    "{} adapters saved, the settings make {}",
                    values.len(),
                    self.params.len()
                ),
            ));
        }
        for (param, (a, b)) in self.params.iter().zip(values) {
            if a.dims() != param.a.dims() || b.dims() != param.b.dims() {
                return Err(Error::invalid(
                    "checkpoint",
                    format!(
                        "layer {} {}: saved shapes {:?}/{:?} do not fit {:?}/{:?}",
                        param.layer,
                        param.module,
                        a.dims(),
                        b.dims(),
                        param.a.dims(),
                        param.b.dims()
                    ),
                ));
            }
            param
                .a
                .set(&a.to_dtype(param.a.dtype())?.to_device(param.a.device())?)?;
            param
                .b
                .set(&b.to_dtype(param.b.dtype())?.to_device(param.b.device())?)?;
        }
        self.moments = moments;
        self.step = step;
        Ok(())
    }

    /// The examples of micro-batch `k` (global index over the run): epoch `k / per_epoch`
    /// walks a permutation seeded by the run's seed and the epoch.
    fn micro_batch(&self, k: usize) -> Vec<&Example> {
        let n = self.train.len();
        let bs = self.settings.batch_size.min(n);
        let per_epoch = n.div_ceil(bs);
        let epoch = k / per_epoch;
        let within = k % per_epoch;
        let mut order: Vec<usize> = (0..n).collect();
        shuffle(&mut order, mix(self.settings.seed, &[epoch as u64, 0xE]));
        let start = within * bs;
        order[start..(start + bs).min(n)]
            .iter()
            .map(|&i| &self.train[i])
            .collect()
    }

    fn forward_terms(&mut self, batch: &Batch, differentiable: bool) -> Result<Vec<Tensor>> {
        let opts = ForwardOptions {
            differentiable,
            logits: LogitsAt::None,
            use_lora: true,
        };
        let hidden = self
            .model
            .run(Input::Ids(&batch.ids), &opts, None, &mut NoHook)?;
        let (b_sz, seq_len, d) = hidden.dims3()?;
        let rows = hidden
            .reshape((b_sz * seq_len, d))?
            .index_select(&batch.positions, 0)?;
        let logits = self.model.lm_logits(&rows, &opts)?;
        let ctx = LossContext {
            model: &self.model,
            batch,
            hidden: &hidden,
            logits: &logits,
        };
        let mut values = Vec::with_capacity(self.terms.len());
        for term in &mut self.terms {
            values.push(term.compute(&ctx)?);
        }
        Ok(values)
    }

    /// Forces candle's autograd (the reference) instead of the hand-written backward.
    pub fn set_autograd(&mut self, autograd: bool) {
        self.autograd = autograd;
    }

    /// Whether steps use the hand-written backward: only the cross-entropy term is present
    /// (other terms need the autograd graph) and autograd was not forced.
    pub fn uses_fast_backward(&self) -> bool {
        !self.autograd && (self.terms.len() == 1 || self.guidance.is_some())
    }

    /// The loss terms (averaged over micro-batches) and the gradients of the total loss for
    /// the next optimizer step, without updating anything.
    pub fn gradients(&mut self) -> std::result::Result<Gradients, StepError> {
        if self.guidance.is_some() {
            return self.guided_gradients();
        }
        if self.uses_fast_backward() {
            return self.fast_gradients();
        }
        let accum = self.settings.grad_accum;
        let mut grads: Vec<Option<(Tensor, Tensor)>> = vec![None; self.params.len()];
        let mut term_sums = vec![0f64; self.terms.len()];
        let mut tokens = 0;
        for micro in 0..accum {
            let k = self.step * accum + micro;
            let examples = self.micro_batch(k);
            let batch = make_batch(&examples, self.pad_id, self.model.device())?;
            tokens += batch.tokens;
            self.dropout_seed.store(
                mix(self.settings.seed, &[k as u64, 0xD]) & !1,
                Ordering::Relaxed,
            );
            let values = self.forward_terms(&batch, true);
            self.dropout_seed.store(DROPOUT_OFF, Ordering::Relaxed);
            let values = values?;
            let mut total: Option<Tensor> = None;
            for (sum, value) in term_sums.iter_mut().zip(&values) {
                let v = value.to_dtype(DType::F64)?.to_scalar::<f64>()?;
                if !v.is_finite() {
                    return Err(StepError::NonFinite {
                        what: if v.is_nan() { "NaN" } else { "infinite" },
                        step: self.step + 1,
                        last_good: self.step,
                    });
                }
                *sum += v;
                total = Some(match total {
                    None => value.clone(),
                    Some(t) => (t + value)?,
                });
            }
            let Some(total) = total else {
                return Err(Error::invalid("loss", "no loss term").into());
            };
            #[allow(clippy::cast_precision_loss)]
            let store = (total / accum as f64)?.backward()?;
            self.add_store_grads(&store, &mut grads)?;
        }
        #[allow(clippy::cast_precision_loss)]
        let terms: Vec<(String, f64)> = self
            .terms
            .iter()
            .zip(term_sums)
            .map(|(term, sum)| (term.name().to_owned(), sum / accum as f64))
            .collect();
        Ok(Gradients {
            terms,
            grads: grads.into_iter().flatten().collect(),
            tokens,
            metrics: Vec::new(),
        })
    }

    /// [`Trainer::gradients`] through one taped fast forward per micro-batch (right-padded:
    /// causal attention keeps padding out of every real position, and padding rows get no
    /// cotangent) and the hand-written backward of [`Transformer::input_vjp_lora`], which
    /// carries the whole batch through each weight product at once; the cross-entropy's
    /// gradient at the logits is taken in closed form, `(softmax − onehot) / n`. The dropout
    /// masks are those of the autograd path (one seed per micro-batch, the batch's shape).
    fn fast_gradients(&mut self) -> std::result::Result<Gradients, StepError> {
        let accum = self.settings.grad_accum;
        let device = self.model.device().clone();
        let opts = ForwardOptions {
            differentiable: false,
            logits: LogitsAt::None,
            use_lora: true,
        };
        let mut sink = LoraGrads::default();
        let mut ce_total = 0f64;
        let mut tokens = 0;
        for micro in 0..accum {
            let k = self.step * accum + micro;
            let examples = self.micro_batch(k);
            let batch = make_batch(&examples, self.pad_id, &device)?;
            tokens += batch.tokens;
            let n = batch.label_tokens;
            #[allow(clippy::cast_precision_loss)]
            let norm = 1.0 / (n * accum) as f64;
            self.dropout_seed.store(
                mix(self.settings.seed, &[k as u64, 0xD]) & !1,
                Ordering::Relaxed,
            );
            let result = (|| -> Result<f64> {
                let (hidden, tape) = self.model.run_taped(Input::Ids(&batch.ids), true)?;
                let (b_sz, t_len, d) = hidden.dims3()?;
                let rows = hidden
                    .reshape((b_sz * t_len, d))?
                    .index_select(&batch.positions, 0)?;
                let logits = self.model.lm_logits(&rows, &opts)?.to_dtype(DType::F32)?;
                let log_probs = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
                let targets = batch.targets.unsqueeze(1)?;
                let ce = log_probs
                    .gather(&targets, 1)?
                    .sum_all()?
                    .neg()?
                    .to_dtype(DType::F64)?
                    .to_scalar::<f64>()?;
                // d(Σ CE · norm)/d logits = (softmax − onehot) · norm.
                let ones = Tensor::ones((n, 1), DType::F32, &device)?;
                let onehot = log_probs.zeros_like()?.scatter_add(&targets, &ones, 1)?;
                let d_logits = self
                    .model
                    .logit_softcap_vjp(&logits, &((log_probs.exp()? - onehot)? * norm)?)?
                    .to_dtype(self.model.dtype())?;
                let d_rows = self.model.lm_head.weight.input_grad(&d_logits)?;
                // Every position of the batch (the dropout masks are regenerated for the
                // forward's shape).
                let cot = Tensor::zeros((b_sz * t_len, d), self.model.dtype(), &device)?
                    .index_add(&batch.positions, &d_rows, 0)?
                    .reshape((b_sz, t_len, d))?;
                self.model.input_vjp_lora(&tape, &cot, Some(&mut sink))?;
                Ok(ce)
            })();
            self.dropout_seed.store(DROPOUT_OFF, Ordering::Relaxed);
            #[allow(clippy::cast_precision_loss)]
            let mean = result? / n as f64;
            if !mean.is_finite() {
                return Err(self.non_finite(mean));
            }
            ce_total += mean;
        }
        #[allow(clippy::cast_precision_loss)]
        Ok(Gradients {
            terms: vec![("ce".to_owned(), ce_total / accum as f64)],
            grads: self.collect_grads(sink)?,
            tokens,
            metrics: Vec::new(),
        })
    }

    /// Adds the adapter gradients of an autograd backward to `grads` (per [`Trainer::params`];
    /// zeros for an adapter the loss does not reach). Detached: moments must hold no graph.
    fn add_store_grads(
        &self,
        store: &candle_core::backprop::GradStore,
        grads: &mut [Option<(Tensor, Tensor)>],
    ) -> Result<()> {
        for (slot, param) in grads.iter_mut().zip(&self.params) {
            let get = |v: &Var| -> Result<Tensor> {
                Ok(store
                    .get(v.as_tensor())
                    .cloned()
                    .map_or_else(|| v.as_tensor().zeros_like(), Ok)?
                    .detach())
            };
            let (ga, gb) = (get(&param.a)?, get(&param.b)?);
            *slot = Some(match slot.take() {
                None => (ga, gb),
                Some((a, b)) => ((a + ga)?, (b + gb)?),
            });
        }
        Ok(())
    }

    /// The hand-written backward's adapter gradients in [`Trainer::params`] order (zeros for an
    /// adapter the loss does not reach).
    fn collect_grads(&self, mut sink: LoraGrads) -> Result<Vec<(Tensor, Tensor)>> {
        let mut grads = Vec::with_capacity(self.params.len());
        for param in &self.params {
            let module = TARGETABLE
                .iter()
                .find(|m| **m == param.module)
                .copied()
                .unwrap_or("");
            let (da, db) = match sink.grads.remove(&(param.layer, module)) {
                Some(pair) => pair,
                None => (
                    param.a.as_tensor().zeros_like()?,
                    param.b.as_tensor().zeros_like()?,
                ),
            };
            grads.push((da, db));
        }
        Ok(grads)
    }

    fn non_finite(&self, value: f64) -> StepError {
        StepError::NonFinite {
            what: if value.is_nan() { "NaN" } else { "infinite" },
            step: self.step + 1,
            last_good: self.step,
        }
    }

    /// One optimizer step: `grad_accum` micro-batches, clipping, AdamW. On a non-finite loss or
    /// gradient nothing is updated.
    pub fn step(&mut self) -> std::result::Result<StepReport, StepError> {
        let started = Instant::now();
        let Gradients {
            terms,
            grads,
            tokens,
            metrics,
        } = self.gradients()?;
        let mut sq = 0f64;
        for (ga, gb) in &grads {
            for g in [ga, gb] {
                sq += f64::from(
                    g.to_dtype(DType::F32)?
                        .sqr()?
                        .sum_all()?
                        .to_scalar::<f32>()?,
                );
            }
        }
        let grad_norm = sq.sqrt();
        if !grad_norm.is_finite() {
            return Err(StepError::NonFinite {
                what: if grad_norm.is_nan() {
                    "NaN"
                } else {
                    "infinite"
                },
                step: self.step + 1,
                last_good: self.step,
            });
        }
        let clip = if self.settings.max_grad_norm > 0.0 {
            (self.settings.max_grad_norm / (grad_norm + 1e-6)).min(1.0)
        } else {
            1.0
        };
        let lr = self.settings.learning_rate_at(self.step);
        let t = i32::try_from(self.step + 1).unwrap_or(i32::MAX);
        let wd = self.settings.weight_decay;
        for ((param, (ga, gb)), (ma, mb)) in
            self.params.iter().zip(&grads).zip(self.moments.iter_mut())
        {
            for (var, g, moments) in [(&param.a, ga, ma), (&param.b, gb, mb)] {
                let g = g.detach();
                let g = if clip < 1.0 { (g * clip)? } else { g };
                adamw_update(var, &g, moments, lr, wd, t)?;
            }
        }
        self.step += 1;
        let seconds = started.elapsed().as_secs_f64();
        #[allow(clippy::cast_precision_loss)]
        Ok(StepReport {
            step: self.step,
            loss: terms.iter().map(|(_, v)| v).sum(),
            terms,
            learning_rate: lr,
            grad_norm,
            tokens_per_s: tokens as f64 / seconds.max(1e-9),
            seconds,
            metrics,
        })
    }

    /// Mean cross-entropy per label token over `examples`, adapters on, no dropout, no graph.
    pub fn loss_on(&self, examples: &[Example]) -> Result<f64> {
        let mut total = 0f64;
        let mut count = 0usize;
        let bs = self.settings.batch_size.max(1);
        let opts = ForwardOptions {
            differentiable: false,
            logits: LogitsAt::None,
            use_lora: true,
        };
        for chunk in examples.chunks(bs) {
            let refs: Vec<&Example> = chunk.iter().collect();
            let batch = make_batch(&refs, self.pad_id, self.model.device())?;
            let hidden = self
                .model
                .run(Input::Ids(&batch.ids), &opts, None, &mut NoHook)?;
            let (b_sz, seq_len, d) = hidden.dims3()?;
            let rows = hidden
                .reshape((b_sz * seq_len, d))?
                .index_select(&batch.positions, 0)?;
            let logits = self.model.lm_logits(&rows, &opts)?;
            let mean = cross_entropy(&logits, &batch.targets)?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?;
            #[allow(clippy::cast_precision_loss)]
            {
                total += mean * batch.label_tokens as f64;
            }
            count += batch.label_tokens;
        }
        #[allow(clippy::cast_precision_loss)]
        Ok(if count == 0 {
            f64::NAN
        } else {
            total / count as f64
        })
    }

    /// Validation loss after the current step (`None` without validation data).
    pub fn evaluate(&self) -> Result<Option<EvalReport>> {
        if self.validation.is_empty() {
            return Ok(None);
        }
        Ok(Some(EvalReport {
            step: self.step,
            loss: self.loss_on(&self.validation)?,
        }))
    }

    /// Training loss over all training examples (for tests and the summary).
    pub fn train_loss(&self) -> Result<f64> {
        self.loss_on(&self.train)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    #[test]
    fn schedules_follow_hugging_face() {
        let mut s = TrainSettings {
            steps: 10,
            warmup_steps: 2,
            learning_rate: 1.0,
            ..TrainSettings::default()
        };
        assert!((s.learning_rate_at(0) - 0.0).abs() < 1e-12);
        assert!((s.learning_rate_at(1) - 0.5).abs() < 1e-12);
        assert!((s.learning_rate_at(5) - 1.0).abs() < 1e-12);
        s.schedule = Schedule::Linear;
        assert!((s.learning_rate_at(2) - 1.0).abs() < 1e-12);
        assert!((s.learning_rate_at(6) - 0.5).abs() < 1e-12);
        assert!(s.learning_rate_at(10).abs() < 1e-12);
        s.schedule = Schedule::Cosine;
        assert!((s.learning_rate_at(6) - 0.5).abs() < 1e-12);
        assert!(
            (s.learning_rate_at(4) - 0.5 * (1.0 + (std::f64::consts::PI / 4.0).cos())).abs()
                < 1e-12
        );
    }

    #[test]
    fn settings_are_validated_by_name() {
        let mut s = TrainSettings::default();
        s.lora.targets = vec!["qproj".to_owned()];
        let err = s.validate().unwrap_err().to_string();
        assert!(err.contains("qproj"), "{err}");
        let s = TrainSettings {
            batch_size: 0,
            ..TrainSettings::default()
        };
        assert!(s.validate().unwrap_err().to_string().contains("batch size"));
    }

    #[test]
    fn cross_entropy_matches_a_hand_computation() -> anyhow::Result<()> {
        let logits = Tensor::new(&[[2f32, 0.0, -1.0], [0.0, 0.0, 0.0]], &Device::Cpu)?;
        let targets = Tensor::new(&[0u32, 2], &Device::Cpu)?;
        let ce = cross_entropy(&logits, &targets)?.to_scalar::<f32>()?;
        let lse = (2f64.exp() + 1.0 + (-1f64).exp()).ln();
        let expected = f64::midpoint(lse - 2.0, 3f64.ln());
        assert!((f64::from(ce) - expected).abs() < 1e-6);
        Ok(())
    }
}
