//! The gradients of an IV-guided step (METHODS.md §5.2): the hand-written path and candle's
//! autograd as its reference. Both run each example of a micro-batch on its own (no padding):
//! first every example's reference passes and trainable pass, then the batch-level thresholds,
//! then each example's backward.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use candle_core::{DType, Tensor, D};

use super::{mix, Gradients, StepError, Trainer};
use crate::error::{Error, Result};
use crate::model::hooks::{Chain, HookPoint, Recorder};
use crate::model::lora::DROPOUT_OFF;
use crate::model::transformer::{ForwardOptions, Input, LogitsAt};
use crate::model::vjp::{LoraGrads, Tape};
use crate::train::dataset::Example;
use crate::train::guidance::{
    batch_terms, kd_rows_autograd, kl_values, last_prompt_position, logit_grads, loss_dtype,
    BatchTerms, Guidance, KlRows,
};

/// One example after its forward passes, waiting for the batch's thresholds.
struct Pending {
    /// Index in the micro-batch (for its dropout seed).
    j: usize,
    tape: Tape,
    t_b: usize,
    seq_len: usize,
    /// `(t − 1, label_t)` for each label `t`.
    labels: Vec<(usize, u32)>,
    /// Trainable and reference logits at every row, `(T, V)`.
    logits: Tensor,
    ref_logits: Tensor,
    /// Per-row KL and statistics.
    kl: KlRows,
    /// `z_cur − z_ref` per head, `(d_h,)`.
    z_diff: Vec<Tensor>,
}

/// Label rows and targets of an example.
fn label_rows(example: &Example) -> (Vec<u32>, Vec<u32>) {
    (1..example.ids.len())
        .filter(|&t| example.is_label[t])
        .map(|t| {
            #[allow(clippy::cast_possible_truncation)]
            ((t - 1) as u32, example.ids[t])
        })
        .unzip()
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

impl Trainer {
    fn set_seed(&self, k: usize, j: usize) {
        self.dropout_seed.store(
            mix(self.settings.seed, &[k as u64, j as u64, 0xD]) & !1,
            Ordering::Relaxed,
        );
    }

    /// [`Trainer::gradients`] of a guided run.
    pub(super) fn guided_gradients(&mut self) -> std::result::Result<Gradients, StepError> {
        let Some(guidance) = self.guidance.clone() else {
            return Err(Error::invalid("guidance", "the run has no instruction vector").into());
        };
        let accum = self.settings.grad_accum;
        let scale = guidance.trainable_scale(self.step, self.settings.steps);
        let mut sink = LoraGrads::default();
        let mut auto_grads: Vec<Option<(Tensor, Tensor)>> = vec![None; self.params.len()];
        let mut sums = [0f64; 4];
        let mut raw = [0f64; 3];
        let mut tokens = 0;
        for micro in 0..accum {
            let k = self.step * accum + micro;
            let examples: Vec<Example> = self.micro_batch(k).into_iter().cloned().collect();
            let n_labels: usize = examples.iter().map(Example::label_count).sum();
            if n_labels == 0 {
                return Err(Error::invalid("batch", "no label tokens").into());
            }
            tokens += examples.iter().map(|e| e.ids.len()).sum::<usize>();
            let result = if self.autograd {
                self.guided_micro_autograd(
                    &guidance,
                    &examples,
                    k,
                    n_labels,
                    scale,
                    &mut auto_grads,
                )
            } else {
                self.guided_micro_fast(&guidance, &examples, k, n_labels, scale, &mut sink)
            };
            self.dropout_seed.store(DROPOUT_OFF, Ordering::Relaxed);
            let (ce, terms) = result?;
            for value in [ce, terms.kl1, terms.kl2, terms.pr] {
                if !value.is_finite() {
                    return Err(self.non_finite(value));
                }
            }
            for (sum, value) in sums.iter_mut().zip([ce, terms.kl1, terms.kl2, terms.pr]) {
                *sum += value;
            }
            for (sum, value) in raw
                .iter_mut()
                .zip([terms.kl1_raw, terms.kl2_raw, terms.mse_raw])
            {
                *sum += value;
            }
        }
        #[allow(clippy::cast_precision_loss)]
        let per = |v: f64| v / accum as f64;
        let terms = ["ce", "kl1", "kl2", "pr"]
            .iter()
            .zip(sums)
            .map(|(name, v)| ((*name).to_owned(), per(v)))
            .collect();
        let mut metrics: Vec<(String, f64)> = ["kl1_raw", "kl2_raw", "mse_raw"]
            .iter()
            .zip(raw)
            .map(|(name, v)| ((*name).to_owned(), per(v)))
            .collect();
        if let Some(s) = scale {
            metrics.push(("iv_scale".to_owned(), s));
        }
        let grads = if self.autograd {
            auto_grads
                .into_iter()
                .zip(&self.params)
                .map(|(g, p)| match g {
                    Some(pair) => Ok(pair),
                    None => Ok((p.a.as_tensor().zeros_like()?, p.b.as_tensor().zeros_like()?)),
                })
                .collect::<Result<Vec<_>>>()?
        } else {
            self.collect_grads(sink)?
        };
        Ok(Gradients {
            terms,
            grads,
            tokens,
            metrics,
        })
    }

    /// One micro-batch through the hand-written backward; returns its mean CE and its terms.
    #[allow(clippy::too_many_lines)]
    fn guided_micro_fast(
        &self,
        guidance: &Guidance,
        examples: &[Example],
        k: usize,
        n_labels: usize,
        scale: Option<f64>,
        sink: &mut LoraGrads,
    ) -> Result<(f64, BatchTerms)> {
        let device = self.model.device().clone();
        let wd = loss_dtype(self.model.dtype());
        let cfg = self.model.config();
        let head_dim = cfg.head_dim;
        let tau = guidance.settings.tau;
        let opts = ForwardOptions {
            differentiable: false,
            logits: LogitsAt::None,
            use_lora: true,
        };
        let heads = if guidance.preserves_heads() {
            guidance.heads().to_vec()
        } else {
            Vec::new()
        };
        let mut pending = Vec::with_capacity(examples.len());
        let (mut ce_sum, mut kl1_sum, mut kl2_sum) = (0f64, 0f64, 0f64);
        let mut sq_sums = vec![0f64; heads.len()];
        for (j, example) in examples.iter().enumerate() {
            let Some(t_b) = last_prompt_position(example) else {
                continue;
            };
            let (positions, targets) = label_rows(example);
            let n = positions.len();
            let ids = Tensor::new(example.ids.as_slice(), &device)?.unsqueeze(0)?;
            let reference = guidance.reference(&self.model, &ids, t_b)?;
            self.set_seed(k, j);
            let mut hook = guidance.trainable_hook(t_b, scale)?;
            let (hidden, tape) =
                self.model
                    .run_taped_hooked(Input::Ids(&ids), true, hook.as_mut())?;
            self.dropout_seed.store(DROPOUT_OFF, Ordering::Relaxed);
            let logits = self
                .model
                .lm_logits(&hidden.squeeze(0)?, &opts)?
                .to_dtype(wd)?;
            let labels: Vec<(usize, u32)> = positions
                .iter()
                .zip(&targets)
                .map(|(&t, &y)| (t as usize, y))
                .collect();
            let rows = Tensor::from_vec(positions, n, &device)?;
            let targets = Tensor::from_vec(targets, (n, 1), &device)?;
            let log_probs =
                candle_nn::ops::log_softmax(&logits.index_select(&rows, 0)?, D::Minus1)?;
            ce_sum -= scalar(&log_probs.gather(&targets, 1)?.sum_all()?)?;
            let kl = kl_values(&logits, &reference.logits, tau)?;
            kl1_sum += kl.kl[t_b];
            kl2_sum += kl.kl.iter().sum::<f64>();
            let mut z_diff = Vec::with_capacity(heads.len());
            for (i, &(l, h)) in heads.iter().enumerate() {
                let z = tape
                    .layers
                    .get(l)
                    .and_then(|lt| lt.z.as_ref())
                    .ok_or_else(|| Error::invalid("tape", "no head outputs recorded"))?;
                let cur = z
                    .get(0)?
                    .get(t_b)?
                    .narrow(0, h * head_dim, head_dim)?
                    .to_dtype(wd)?;
                let diff = (cur - &reference.z[i])?;
                sq_sums[i] += scalar(&diff.sqr()?.sum_all()?)?;
                z_diff.push(diff);
            }
            pending.push(Pending {
                j,
                seq_len: example.ids.len(),
                tape,
                t_b,
                labels,
                logits,
                ref_logits: reference.logits,
                kl,
                z_diff,
            });
        }
        let terms = batch_terms(
            &guidance.settings,
            examples.len(),
            kl1_sum,
            kl2_sum,
            &sq_sums,
            head_dim,
        );
        #[allow(clippy::cast_precision_loss)]
        let accum = self.settings.grad_accum as f64;
        #[allow(clippy::cast_precision_loss)]
        let norm = 1.0 / (n_labels as f64 * accum);
        let n_heads = cfg.num_attention_heads;
        for part in pending {
            let t_len = part.seq_len;
            // KL rows: c2 everywhere, plus c1 at t_b; CE rows: (softmax − onehot) · norm.
            let mut weights = vec![terms.c2 / accum; t_len];
            weights[part.t_b] += terms.c1 / accum;
            let d_logits = logit_grads(
                &part.logits,
                &part.ref_logits,
                tau,
                &part.kl,
                &weights,
                &part.labels,
                norm,
            )?;
            let d_rows = d_logits
                .to_dtype(self.model.dtype())?
                .matmul(&self.model.lm_head.weight)?
                .unsqueeze(0)?;
            let mut by_layer: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
            for (i, &(l, h)) in heads.iter().enumerate() {
                let c = terms.c_pr[i] / accum;
                if c == 0.0 {
                    continue;
                }
                let row = by_layer
                    .entry(l)
                    .or_insert_with(|| vec![0f64; n_heads * head_dim]);
                let diff = part.z_diff[i].to_dtype(DType::F64)?.to_vec1::<f64>()?;
                for (slot, d) in row[h * head_dim..(h + 1) * head_dim].iter_mut().zip(diff) {
                    *slot += d * c;
                }
            }
            let mut z_cots = Vec::with_capacity(by_layer.len());
            for (l, row) in by_layer {
                let row = Tensor::from_vec(row, (1, 1, n_heads * head_dim), &device)?
                    .to_dtype(self.model.dtype())?;
                let full =
                    Tensor::zeros((1, t_len, n_heads * head_dim), self.model.dtype(), &device)?
                        .slice_assign(
                            &[0..1, part.t_b..part.t_b + 1, 0..n_heads * head_dim],
                            &row,
                        )?;
                z_cots.push((l, full));
            }
            self.set_seed(k, part.j);
            let result = self
                .model
                .input_vjp_with(&part.tape, &d_rows, Some(sink), &z_cots);
            self.dropout_seed.store(DROPOUT_OFF, Ordering::Relaxed);
            result?;
        }
        #[allow(clippy::cast_precision_loss)]
        Ok((ce_sum / n_labels as f64, terms))
    }

    /// One micro-batch through candle's autograd (the reference); adds the gradients of
    /// `total / accum` to `grads`.
    fn guided_micro_autograd(
        &self,
        guidance: &Guidance,
        examples: &[Example],
        k: usize,
        n_labels: usize,
        scale: Option<f64>,
        grads: &mut [Option<(Tensor, Tensor)>],
    ) -> Result<(f64, BatchTerms)> {
        let device = self.model.device().clone();
        let wd = loss_dtype(self.model.dtype());
        let cfg = self.model.config();
        let head_dim = cfg.head_dim;
        let tau = guidance.settings.tau;
        let opts = ForwardOptions {
            differentiable: true,
            logits: LogitsAt::None,
            use_lora: true,
        };
        let heads = if guidance.preserves_heads() {
            guidance.heads().to_vec()
        } else {
            Vec::new()
        };
        let mut ce_terms = Vec::new();
        let mut kl1_terms = Vec::new();
        let mut kl2_terms = Vec::new();
        let mut sq_terms: Vec<Vec<Tensor>> = vec![Vec::new(); heads.len()];
        let (mut ce_sum, mut kl1_sum, mut kl2_sum) = (0f64, 0f64, 0f64);
        let mut sq_sums = vec![0f64; heads.len()];
        for (j, example) in examples.iter().enumerate() {
            let Some(t_b) = last_prompt_position(example) else {
                continue;
            };
            let (positions, targets) = label_rows(example);
            let n = positions.len();
            let ids = Tensor::new(example.ids.as_slice(), &device)?.unsqueeze(0)?;
            let reference = guidance.reference(&self.model, &ids, t_b)?;
            let mut editor = guidance.edit(t_b, scale.unwrap_or(0.0))?;
            if scale.is_none() {
                editor.edits.clear();
            }
            let mut recorder = Recorder::new(heads.iter().map(|&(l, _)| HookPoint::HeadOut(l)));
            self.set_seed(k, j);
            let hidden = {
                let mut chain = Chain(vec![&mut editor, &mut recorder]);
                self.model.run(Input::Ids(&ids), &opts, None, &mut chain)
            };
            self.dropout_seed.store(DROPOUT_OFF, Ordering::Relaxed);
            let logits = self
                .model
                .lm_logits(&hidden?.squeeze(0)?, &opts)?
                .to_dtype(wd)?;
            let positions = Tensor::from_vec(positions, n, &device)?;
            let targets = Tensor::from_vec(targets, (n, 1), &device)?;
            let log_probs =
                candle_nn::ops::log_softmax(&logits.index_select(&positions, 0)?, D::Minus1)?;
            let ce = log_probs.gather(&targets, 1)?.sum_all()?.neg()?;
            ce_sum += scalar(&ce)?;
            ce_terms.push(ce);
            let kl = kd_rows_autograd(&logits, &reference.logits, tau)?;
            let kl1 = kl.get(t_b)?;
            let kl2 = kl.sum_all()?;
            kl1_sum += scalar(&kl1)?;
            kl2_sum += scalar(&kl2)?;
            kl1_terms.push(kl1);
            kl2_terms.push(kl2);
            for (i, &(l, h)) in heads.iter().enumerate() {
                let cur = recorder
                    .get(HookPoint::HeadOut(l))?
                    .get(0)?
                    .get(t_b)?
                    .get(h)?
                    .to_dtype(wd)?;
                let sq = (cur - &reference.z[i])?.sqr()?.sum_all()?;
                sq_sums[i] += scalar(&sq)?;
                sq_terms[i].push(sq);
            }
        }
        let terms = batch_terms(
            &guidance.settings,
            examples.len(),
            kl1_sum,
            kl2_sum,
            &sq_sums,
            head_dim,
        );
        let sum = |ts: &[Tensor]| -> Result<Tensor> {
            let mut iter = ts.iter();
            let first = iter
                .next()
                .cloned()
                .ok_or_else(|| Error::invalid("batch", "no example with a label"))?;
            iter.try_fold(first, |acc, t| Ok((acc + t)?))
        };
        #[allow(clippy::cast_precision_loss)]
        let mut total = (sum(&ce_terms)? / n_labels as f64)?;
        if terms.c1 > 0.0 {
            total = (total + (sum(&kl1_terms)? * terms.c1)?)?;
        }
        if terms.c2 > 0.0 {
            total = (total + (sum(&kl2_terms)? * terms.c2)?)?;
        }
        for (i, sq) in sq_terms.iter().enumerate() {
            if terms.c_pr[i] > 0.0 {
                total = (total + (sum(sq)? * (terms.c_pr[i] / 2.0))?)?;
            }
        }
        #[allow(clippy::cast_precision_loss)]
        let store = (total / self.settings.grad_accum as f64)?.backward()?;
        for (slot, param) in grads.iter_mut().zip(&self.params) {
            let ga = store
                .get(param.a.as_tensor())
                .cloned()
                .map_or_else(|| param.a.as_tensor().zeros_like(), Ok)?
                .detach();
            let gb = store
                .get(param.b.as_tensor())
                .cloned()
                .map_or_else(|| param.b.as_tensor().zeros_like(), Ok)?
                .detach();
            *slot = Some(match slot.take() {
                None => (ga, gb),
                Some((a, b)) => ((a + ga)?, (b + gb)?),
            });
        }
        #[allow(clippy::cast_precision_loss)]
        Ok((ce_sum / n_labels as f64, terms))
    }
}
