//! The gradients of an IV-guided step (METHODS.md §5.2): the hand-written path and candle's
//! autograd as its reference. Each example's reference passes run on their own (and are cached
//! for the run, [`crate::train::guidance`]); the trainable pass of a micro-batch is one
//! right-padded forward (causal attention keeps padding out of every real position), the
//! thresholds are applied to the batch's sums, and the hand-written backward is one pass.

use std::sync::atomic::Ordering;

use candle_core::{DType, Tensor};

use super::{mix, Gradients, StepError, Trainer};
use crate::error::{Error, Result};
use crate::model::hooks::{Chain, HookPoint, Recorder};
use crate::model::lora::DROPOUT_OFF;
use crate::model::transformer::{ForwardOptions, Input, LogitsAt};
use crate::model::vjp::LoraGrads;
use crate::train::batch::{make_batch, Batch};
use crate::train::dataset::Example;
use crate::train::guidance::{
    batch_terms, kd_rows_autograd, kl_values, last_prompt_position, logit_grads, loss_dtype,
    BatchTerms, Guidance, Reference, RowLoss,
};
use crate::train::loss::cross_entropy;

/// A micro-batch's examples with labels, their references and the padded batch.
struct Prepared {
    /// `t_b` per batch row.
    t_b: Vec<usize>,
    /// Tokens per batch row.
    lens: Vec<usize>,
    /// `(t − 1, label_t)` per batch row, rows local to the example.
    labels: Vec<Vec<(usize, u32)>>,
    refs: Vec<Reference>,
    batch: Batch,
}

/// Label rows and targets of an example.
fn label_rows(example: &Example) -> Vec<(usize, u32)> {
    (1..example.ids.len())
        .filter(|&t| example.is_label[t])
        .map(|t| (t - 1, example.ids[t]))
        .collect()
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

impl Trainer {
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
                self.guided_micro_autograd(&guidance, &examples, k, scale, &mut auto_grads)
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

    /// The references, labels and padded batch of a micro-batch (examples without labels are
    /// left out).
    fn prepare(&self, guidance: &Guidance, examples: &[Example]) -> Result<Prepared> {
        let device = self.model.device().clone();
        let kept: Vec<(&Example, usize)> = examples
            .iter()
            .filter_map(|e| last_prompt_position(e).map(|t| (e, t)))
            .collect();
        if kept.is_empty() {
            return Err(Error::invalid("batch", "no example with a label"));
        }
        let inputs: Vec<(Vec<u32>, usize)> =
            kept.iter().map(|(e, t_b)| (e.ids.clone(), *t_b)).collect();
        let refs = guidance.references(&self.model, &inputs)?;
        let rows: Vec<&Example> = kept.iter().map(|(e, _)| *e).collect();
        Ok(Prepared {
            t_b: kept.iter().map(|(_, t)| *t).collect(),
            lens: rows.iter().map(|e| e.ids.len()).collect(),
            labels: rows.iter().map(|e| label_rows(e)).collect(),
            batch: make_batch(&rows, self.pad_id, &device)?,
            refs,
        })
    }

    /// The logits at every row of a batch's final hidden states `(b, T, d)`, `(b·T, V)` in the
    /// loss dtype, and the mean cross-entropy over its label rows (on the graph when `opts`
    /// is differentiable).
    fn logits_and_ce(
        &self,
        hidden: &Tensor,
        opts: &ForwardOptions,
        batch: &Batch,
    ) -> Result<(Tensor, Tensor)> {
        let (b_sz, t_len, d) = hidden.dims3()?;
        let logits = self
            .model
            .lm_logits(&hidden.reshape((b_sz * t_len, d))?, opts)?
            .to_dtype(loss_dtype(self.model.dtype()))?;
        let ce = cross_entropy(&logits.index_select(&batch.positions, 0)?, &batch.targets)?;
        Ok((logits, ce))
    }

    fn set_batch_seed(&self, k: usize) {
        self.dropout_seed.store(
            mix(self.settings.seed, &[k as u64, 0xD]) & !1,
            Ordering::Relaxed,
        );
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
        let (head_dim, n_heads) = (cfg.head_dim, cfg.num_attention_heads);
        let tau = guidance.settings.tau;
        let opts = ForwardOptions {
            differentiable: false,
            logits: LogitsAt::None,
            use_lora: true,
        };
        let heads = guidance.preserved_heads().to_vec();
        let prep = self.prepare(guidance, examples)?;
        let mut hook = guidance.trainable_hook(&prep.t_b, scale)?;
        self.set_batch_seed(k);
        let taped = self
            .model
            .run_taped_hooked(Input::Ids(&prep.batch.ids), true, hook.as_mut());
        self.dropout_seed.store(DROPOUT_OFF, Ordering::Relaxed);
        let (hidden, tape) = taped?;
        let (b_sz, t_len, d) = hidden.dims3()?;
        let logits = self
            .model
            .lm_logits(&hidden.reshape((b_sz * t_len, d))?, &opts)?
            .to_dtype(wd)?;
        let (mut kl1_sum, mut kl2_sum) = (0f64, 0f64);
        let mut sq_sums = vec![0f64; heads.len()];
        let mut kls = Vec::with_capacity(b_sz);
        let mut z_diff: Vec<Vec<Tensor>> = Vec::with_capacity(b_sz);
        for b in 0..b_sz {
            let (t_b, len) = (prep.t_b[b], prep.lens[b]);
            let rows = logits.narrow(0, b * t_len, len)?;
            let kl = kl_values(&rows, &prep.refs[b].logits, tau)?;
            kl1_sum += kl.kl[t_b];
            kl2_sum += kl.kl.iter().sum::<f64>();
            kls.push(kl);
            let mut diffs = Vec::with_capacity(heads.len());
            for (i, &(l, h)) in heads.iter().enumerate() {
                let z = tape
                    .layers
                    .get(l)
                    .and_then(|lt| lt.z.as_ref())
                    .ok_or_else(|| Error::invalid("tape", "no head outputs recorded"))?;
                let cur = z
                    .get(b)?
                    .get(t_b)?
                    .narrow(0, h * head_dim, head_dim)?
                    .to_dtype(wd)?;
                let diff = (cur - &prep.refs[b].z[i])?;
                sq_sums[i] += scalar(&diff.sqr()?.sum_all()?)?;
                diffs.push(diff);
            }
            z_diff.push(diffs);
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
        // The gradient at the logits: KL rows (c2 everywhere, plus c1 at t_b) and CE rows per
        // example. Only the rows where it can be non-zero go through the head's backward (the
        // label rows and t_b when kl2 is below its threshold); the others, and padding, get
        // zero.
        let mut blocks = Vec::with_capacity(b_sz);
        let mut active: Vec<u32> = Vec::new();
        let mut ce_sum = 0f64;
        for (b, kl) in kls.iter().enumerate() {
            let (t_b, len) = (prep.t_b[b], prep.lens[b]);
            let mut weights = vec![terms.c2 / accum; len];
            weights[t_b] += terms.c1 / accum;
            let loss = RowLoss {
                kl_weight: &weights,
                labels: &prep.labels[b],
                ce_norm: norm,
            };
            let rows = loss.active_rows();
            let out = logit_grads(
                &logits.narrow(0, b * t_len, len)?,
                &prep.refs[b].logits,
                tau,
                kl,
                &loss,
                &rows,
            )?;
            ce_sum += out.ce_sum;
            blocks.push(out.grad);
            #[allow(clippy::cast_possible_truncation)]
            active.extend(rows.iter().map(|&t| (b * t_len + t) as u32));
        }
        let n_active = active.len();
        let every_row = n_active == b_sz * t_len;
        let active = Tensor::from_vec(active, n_active, &device)?;
        let mut d_logits = Tensor::cat(&blocks, 0)?;
        if self.model.config().final_logit_softcapping.is_some() {
            // The cap's derivative reads the capped logits of the same rows.
            let active_logits = if every_row {
                logits.clone()
            } else {
                logits.index_select(&active, 0)?
            };
            d_logits = self.model.logit_softcap_vjp(&active_logits, &d_logits)?;
        }
        let d_active = self
            .model
            .lm_head
            .weight
            .input_grad(&d_logits.to_dtype(self.model.dtype())?)?;
        let d_rows = if every_row {
            d_active
        } else {
            Tensor::zeros((b_sz * t_len, d), d_active.dtype(), &device)?
                .index_add(&active, &d_active, 0)?
        }
        .reshape((b_sz, t_len, d))?;
        // The head term enters at the o_proj input of each listed head's layer.
        let width = n_heads * head_dim;
        let mut by_layer: std::collections::BTreeMap<usize, Vec<f64>> =
            std::collections::BTreeMap::new();
        for (i, &(l, h)) in heads.iter().enumerate() {
            let c = terms.c_pr[i] / accum;
            if c == 0.0 {
                continue;
            }
            let grid = by_layer
                .entry(l)
                .or_insert_with(|| vec![0f64; b_sz * t_len * width]);
            for (b, diffs) in z_diff.iter().enumerate() {
                let diff = diffs[i].to_dtype(DType::F64)?.to_vec1::<f64>()?;
                let at = (b * t_len + prep.t_b[b]) * width + h * head_dim;
                for (slot, v) in grid[at..at + head_dim].iter_mut().zip(diff) {
                    *slot += v * c;
                }
            }
        }
        let mut z_cots = Vec::with_capacity(by_layer.len());
        for (l, grid) in by_layer {
            z_cots.push((
                l,
                Tensor::from_vec(grid, (b_sz, t_len, width), &device)?
                    .to_dtype(self.model.dtype())?,
            ));
        }
        self.set_batch_seed(k);
        let result = self
            .model
            .input_vjp_with(&tape, &d_rows, Some(sink), &z_cots);
        self.dropout_seed.store(DROPOUT_OFF, Ordering::Relaxed);
        result?;
        let label_rows: usize = prep.labels.iter().map(Vec::len).sum();
        #[allow(clippy::cast_precision_loss)]
        let ce_mean = ce_sum / label_rows.max(1) as f64;
        Ok((ce_mean, terms))
    }

    /// One micro-batch through candle's autograd (the reference): the same batched forward on
    /// the graph; adds the gradients of `total / accum` to `grads`.
    #[allow(clippy::too_many_lines)]
    fn guided_micro_autograd(
        &self,
        guidance: &Guidance,
        examples: &[Example],
        k: usize,
        scale: Option<f64>,
        grads: &mut [Option<(Tensor, Tensor)>],
    ) -> Result<(f64, BatchTerms)> {
        let wd = loss_dtype(self.model.dtype());
        let cfg = self.model.config();
        let head_dim = cfg.head_dim;
        let tau = guidance.settings.tau;
        let opts = ForwardOptions {
            differentiable: true,
            logits: LogitsAt::None,
            use_lora: true,
        };
        let heads = guidance.preserved_heads().to_vec();
        let prep = self.prepare(guidance, examples)?;
        let mut hook = guidance.trainable_hook(&prep.t_b, scale)?;
        let mut recorder = Recorder::new(heads.iter().map(|&(l, _)| HookPoint::HeadOut(l)));
        self.set_batch_seed(k);
        let hidden = {
            let mut chain = Chain(vec![hook.as_mut(), &mut recorder]);
            self.model
                .run(Input::Ids(&prep.batch.ids), &opts, None, &mut chain)
        };
        self.dropout_seed.store(DROPOUT_OFF, Ordering::Relaxed);
        let hidden = hidden?;
        let (b_sz, t_len, _) = hidden.dims3()?;
        let (logits, ce) = self.logits_and_ce(&hidden, &opts, &prep.batch)?;
        let ce_mean = scalar(&ce)?;
        let mut kl1_terms = Vec::new();
        let mut kl2_terms = Vec::new();
        let mut sq_terms: Vec<Vec<Tensor>> = vec![Vec::new(); heads.len()];
        let (mut kl1_sum, mut kl2_sum) = (0f64, 0f64);
        let mut sq_sums = vec![0f64; heads.len()];
        for b in 0..b_sz {
            let (t_b, len) = (prep.t_b[b], prep.lens[b]);
            let kl = kd_rows_autograd(
                &logits.narrow(0, b * t_len, len)?,
                &prep.refs[b].logits,
                tau,
            )?;
            let kl1 = kl.get(t_b)?;
            let kl2 = kl.sum_all()?;
            kl1_sum += scalar(&kl1)?;
            kl2_sum += scalar(&kl2)?;
            kl1_terms.push(kl1);
            kl2_terms.push(kl2);
            for (i, &(l, h)) in heads.iter().enumerate() {
                let cur = recorder
                    .get(HookPoint::HeadOut(l))?
                    .get(b)?
                    .get(t_b)?
                    .get(h)?
                    .to_dtype(wd)?;
                let sq = (cur - &prep.refs[b].z[i])?.sqr()?.sum_all()?;
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
        let mut total = ce;
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
        self.add_store_grads(&store, grads)?;
        Ok((ce_mean, terms))
    }
}
