//! [`run_job`]: executes one [`Job`] against the loaded models. Shared by the GUI worker thread
//! and the CLI, so both run exactly the same code.

use std::fmt::Write as _;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use candle_core::{DType, Tensor};

use crate::analysis::attribution::{self, AttributionConfig};
use crate::error::{Error, Result};
use crate::model::generate::{GenerateConfig, Generator};
use crate::model::{
    self, Edit, EditOp, Editor, HookPoint, LoadOptions, LoadedModel, NoHook, Positions,
};
use crate::worker::consistency;
use crate::worker::job::{
    Event, ForwardOutput, GenerateOutput, Job, JobId, JobOutput, LayerResult, Slot,
    SlotAttribution, SteerRequest, TokenizeOutput,
};
use crate::worker::train::{self, TrainUpdate};
use crate::worker::weights;

/// State owned by whoever runs jobs: the loaded models and the cancel flag.
#[derive(Debug, Default)]
pub struct WorkerCtx {
    /// Slot A.
    pub a: Option<LoadedModel>,
    /// Slot B.
    pub b: Option<LoadedModel>,
    /// Set by the front end to cancel the running job.
    pub cancel: Arc<AtomicBool>,
    /// The base model's answers of the last knowledge-consistency run, reused by the next run
    /// with the same base weights and settings (several fine-tunes against one base, §10b).
    pub knowledge_base: Option<crate::worker::knowledge::BaseAnswers>,
}

impl WorkerCtx {
    /// The models of `slots`, in order, each with its slot; fails on an empty slot.
    pub fn models(&self, slots: &[Slot]) -> Result<Vec<(Slot, &LoadedModel)>> {
        slots
            .iter()
            .map(|&slot| Ok((slot, self.model(slot)?)))
            .collect()
    }

    /// The model in `slot`, or a plain error when it is empty.
    pub fn model(&self, slot: Slot) -> Result<&LoadedModel> {
        let loaded = match slot {
            Slot::A => self.a.as_ref(),
            Slot::B => self.b.as_ref(),
        };
        loaded.ok_or_else(|| {
            Error::invalid("model slot", format!("slot {slot:?} has no model loaded"))
        })
    }
}

/// Runs one job; streamed tokens and progress go to `emit`.
pub fn run_job(
    ctx: &mut WorkerCtx,
    job_id: JobId,
    job: Job,
    emit: &mut dyn FnMut(Event),
) -> Result<JobOutput> {
    match job {
        Job::LoadModel {
            slot,
            spec,
            device,
            dtype,
            weights,
        } => {
            emit(Event::Progress {
                job_id,
                frac: 0.0,
                message: format!("loading {spec}"),
            });
            let opts = LoadOptions {
                device: model::device(device)?,
                dtype: dtype.dtype(),
                weights,
            };
            let cancel = ctx.cancel.clone();
            let loaded = model::load_with_progress(&spec, &opts, &mut |frac| {
                emit(Event::Progress {
                    job_id,
                    frac,
                    message: String::new(),
                });
                if cancel.load(Ordering::Relaxed) {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            })?;
            let info = Box::new(loaded.info.clone());
            match slot {
                Slot::A => ctx.a = Some(loaded),
                Slot::B => ctx.b = Some(loaded),
            }
            Ok(JobOutput::Loaded { slot, info })
        }
        Job::Tokenize { slot, text } => {
            let loaded = ctx.model(slot)?;
            let ids = loaded.tokenizer.encode(&text, true)?;
            if ids.is_empty() {
                return Err(Error::EmptyPrompt);
            }
            let tokens = loaded.tokenizer.tokens(&ids);
            Ok(JobOutput::Tokens(TokenizeOutput { ids, tokens }))
        }
        Job::Forward { slot, text, top_k } => {
            let loaded = ctx.model(slot)?;
            Ok(JobOutput::Forward(forward_text(loaded, &text, top_k)?))
        }
        Job::Attribute {
            slots,
            prompt,
            response,
            chat,
            instructions,
            max_new_tokens,
        } => {
            let cancel = ctx.cancel.clone();
            let n_slots = slots.len().max(1) as f32;
            let mut results = Vec::with_capacity(slots.len());
            for (n, &slot) in slots.iter().enumerate() {
                let loaded = ctx.model(slot)?;
                let (rendered, ids) = render_prompt(loaded, &prompt, chat)?;
                let response = if let Some(response) = &response {
                    response.clone()
                } else {
                    emit(Event::Progress {
                        job_id,
                        frac: n as f32 / n_slots,
                        message: format!("generating {slot:?}'s response"),
                    });
                    greedy_response(loaded, &ids, max_new_tokens, &cancel)?
                };
                let prompt_ids =
                    attribution::split_tokens(&loaded.tokenizer, &rendered, &response)?.0;
                let mask = attribution::resolve_instructions(
                    &loaded.tokenizer,
                    &prompt,
                    &prompt_ids,
                    &instructions,
                )?;
                let message = format!("attributing {slot:?}");
                let result = attribution::attribute(
                    &loaded.model,
                    &loaded.tokenizer,
                    &rendered,
                    &response,
                    mask.as_deref(),
                    &AttributionConfig::default(),
                    &mut |frac| {
                        emit(Event::Progress {
                            job_id,
                            frac: (n as f32 + frac) / n_slots,
                            message: message.clone(),
                        });
                        if cancel.load(Ordering::Relaxed) {
                            ControlFlow::Break(())
                        } else {
                            ControlFlow::Continue(())
                        }
                    },
                )?;
                let template_mask = if chat {
                    let trimmed = rendered.trim();
                    let (ids, offsets) = loaded.tokenizer.encode_with_offsets(trimmed, false)?;
                    if ids == prompt_ids {
                        crate::analysis::results::template_mask(&offsets, trimmed, &prompt)
                    } else {
                        vec![false; prompt_ids.len()]
                    }
                } else {
                    vec![false; prompt_ids.len()]
                };
                results.push(SlotAttribution {
                    template_mask,
                    slot,
                    model: loaded.info.display_name(),
                    response,
                    attribution: result,
                });
            }
            Ok(JobOutput::Attributed(results))
        }
        Job::Concepts {
            slots,
            words,
            config,
            cache,
            stream,
        } => {
            let models = ctx.models(&slots)?;
            let report = LayerReporter::new(emit, job_id, &ctx.cancel, stream);
            let output = weights::run_concepts(
                &models,
                &words,
                &config,
                &cache,
                &mut |frac, message| report.progress(frac, message),
                &mut |model, layer| {
                    report.layer(model, || LayerResult::Concepts(Box::new(layer.clone())));
                    Ok(())
                },
            )?;
            Ok(JobOutput::Concepts(Box::new(output)))
        }
        Job::Heads {
            slots,
            words,
            vectors,
            config,
            group_size,
            cache,
            stream,
        } => {
            let models = ctx.models(&slots)?;
            let report = LayerReporter::new(emit, job_id, &ctx.cancel, stream);
            let output = weights::run_heads(
                &models,
                &words,
                vectors.as_deref(),
                &config,
                group_size,
                &cache,
                &mut |frac, message| report.progress(frac, message),
                &mut |model, layer| {
                    report.layer(model, || LayerResult::Heads(Box::new(layer.clone())));
                    Ok(())
                },
            )?;
            Ok(JobOutput::Heads(Box::new(output)))
        }
        Job::Consistency { slots, settings } => {
            let cancel = ctx.cancel.clone();
            let models = ctx.models(&slots)?;
            let emit = std::cell::RefCell::new(emit);
            let output = consistency::run_consistency(
                &models,
                &settings,
                &mut |frac, message| {
                    progress_or_cancel(*emit.borrow_mut(), job_id, &cancel, frac, message)
                },
                &mut |partial| {
                    (*emit.borrow_mut())(Event::Partial {
                        job_id,
                        output: JobOutput::Consistency(Box::new(partial)),
                    });
                },
            )?;
            Ok(JobOutput::Consistency(Box::new(output)))
        }
        Job::Forgetting { slot, request } => {
            let cancel = ctx.cancel.clone();
            let loaded = ctx.model(slot)?;
            let report = crate::worker::forgetting::run_forgetting(
                loaded,
                &request,
                &mut |frac, message| progress_or_cancel(emit, job_id, &cancel, frac, message),
            )?;
            Ok(JobOutput::Forgetting(Box::new(report)))
        }
        Job::InstructionVectors { slots, settings } => {
            let cancel = ctx.cancel.clone();
            let models = ctx.models(&slots)?;
            let output = crate::worker::iv::run_iv(&models, &settings, &mut |frac, message| {
                progress_or_cancel(emit, job_id, &cancel, frac, message)
            })?;
            Ok(JobOutput::InstructionVectors(Box::new(output)))
        }
        Job::Knowledge { settings } => {
            let cancel = ctx.cancel.clone();
            let mut memo = ctx.knowledge_base.take();
            let (base, tuned) = (ctx.model(Slot::A)?, ctx.model(Slot::B)?);
            let run = crate::worker::knowledge::run_knowledge(
                base,
                tuned,
                &settings,
                &mut memo,
                &mut |frac, message| progress_or_cancel(emit, job_id, &cancel, frac, message),
            );
            ctx.knowledge_base = memo;
            Ok(JobOutput::Knowledge(Box::new(run?)))
        }
        Job::Shift { settings } => {
            let cancel = ctx.cancel.clone();
            let (base, tuned) = (ctx.model(Slot::A)?, ctx.model(Slot::B)?);
            let run =
                crate::worker::shift::run_shift(base, tuned, &settings, &mut |frac, message| {
                    progress_or_cancel(emit, job_id, &cancel, frac, message)
                })?;
            Ok(JobOutput::Shift(Box::new(run)))
        }
        Job::Lens { slots, request } => {
            let models = ctx.models(&slots)?;
            let output = crate::worker::shift::run_lens(&models, &request)?;
            Ok(JobOutput::Lens(Box::new(output)))
        }
        Job::SaveIv {
            output,
            model,
            task,
            path,
        } => {
            let Some(result) = output.results.get(model) else {
                return Err(Error::invalid(
                    "model",
                    format!("no model {model} in the run"),
                ));
            };
            let Some(task_iv) = result.run.tasks.get(task) else {
                return Err(Error::invalid("task", format!("no task {task} in the run")));
            };
            let paths = crate::ivfile::save(
                &path,
                task_iv,
                &result.model,
                &result.fingerprint,
                &result.run,
                &output.settings.config,
            )?;
            Ok(JobOutput::SavedIv(paths))
        }
        Job::Train { slot, request } => {
            let cancel = ctx.cancel.clone();
            let loaded = ctx.model(slot)?;
            let output = train::run_training(loaded, &request, &mut |progress| {
                emit(Event::Train {
                    job_id,
                    update: TrainUpdate::from_progress(&progress),
                });
                if cancel.load(Ordering::Relaxed) {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            })?;
            Ok(JobOutput::Trained(Box::new(output)))
        }
        Job::TrainStages { slot, plan, out } => {
            let cancel = ctx.cancel.clone();
            let loaded = ctx.model(slot)?;
            let mut last_stage = usize::MAX;
            let output = train::run_stages(loaded, &plan, &out, &mut |p| {
                if p.stage != last_stage {
                    last_stage = p.stage;
                    emit(Event::Train {
                        job_id,
                        update: TrainUpdate::Stage {
                            index: p.stage,
                            total: p.stages,
                            name: plan
                                .stages
                                .get(p.stage)
                                .map(|s| s.name.clone())
                                .unwrap_or_default(),
                        },
                    });
                }
                emit(Event::Train {
                    job_id,
                    update: TrainUpdate::from_progress(&p.progress),
                });
                if cancel.load(Ordering::Relaxed) {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            })?;
            Ok(JobOutput::StagesTrained(Box::new(output)))
        }
        Job::EstimateTraining { slot, request } => {
            let cancel = ctx.cancel.clone();
            let loaded = ctx.model(slot)?;
            let steps = 3;
            let estimate = train::estimate(loaded, &request, steps, &mut |i| {
                progress_or_cancel(
                    emit,
                    job_id,
                    &cancel,
                    (i + 1) as f32 / (steps + 1) as f32,
                    "measuring training steps".to_owned(),
                )
            })?;
            Ok(JobOutput::TrainEstimated(estimate))
        }
        Job::PreviewData { slot, data } => {
            let loaded = ctx.model(slot)?;
            Ok(JobOutput::DataPreview(Box::new(train::preview(
                loaded, &data, 20,
            )?)))
        }
        Job::SaveMerged { spec, out } => {
            emit(Event::Progress {
                job_id,
                frac: 0.0,
                message: format!("merging {spec}"),
            });
            let merged = model::save::save_merged(&spec, &LoadOptions::default(), &out)?;
            Ok(JobOutput::SavedMerged { out, merged })
        }
        Job::Unload { slot } => {
            match slot {
                Slot::A => ctx.a = None,
                Slot::B => ctx.b = None,
            }
            Ok(JobOutput::Unloaded { slot })
        }
        Job::SwapSlots => {
            std::mem::swap(&mut ctx.a, &mut ctx.b);
            let info = |m: &Option<LoadedModel>| m.as_ref().map(|m| Box::new(m.info.clone()));
            Ok(JobOutput::Swapped {
                a: info(&ctx.a),
                b: info(&ctx.b),
            })
        }
        Job::Generate {
            slots,
            prompt,
            chat,
            cfg,
            steer,
            live_shift,
        } => generate_lockstep(
            ctx,
            job_id,
            &slots,
            &prompt,
            chat,
            &cfg,
            steer.as_ref(),
            live_shift,
            emit,
        ),
    }
}

/// Reports progress; a pending cancel request breaks.
/// Progress (with cancellation) and the finished layers of a weight-space job, both reported
/// through the one `emit` (so the two callbacks can share it).
struct LayerReporter<'a> {
    emit: std::cell::RefCell<&'a mut dyn FnMut(Event)>,
    job_id: JobId,
    cancel: &'a AtomicBool,
    stream: bool,
}

impl<'a> LayerReporter<'a> {
    fn new(
        emit: &'a mut dyn FnMut(Event),
        job_id: JobId,
        cancel: &'a AtomicBool,
        stream: bool,
    ) -> Self {
        Self {
            emit: std::cell::RefCell::new(emit),
            job_id,
            cancel,
            stream,
        }
    }

    fn progress(&self, frac: f32, message: String) -> ControlFlow<()> {
        progress_or_cancel(
            *self.emit.borrow_mut(),
            self.job_id,
            self.cancel,
            frac,
            message,
        )
    }

    /// Sends the layer when the job streams (the clone is made only then).
    fn layer(&self, model: usize, layer: impl FnOnce() -> LayerResult) {
        if self.stream {
            (*self.emit.borrow_mut())(Event::Layer {
                job_id: self.job_id,
                model,
                layer: layer(),
            });
        }
    }
}

fn progress_or_cancel(
    emit: &mut dyn FnMut(Event),
    job_id: JobId,
    cancel: &AtomicBool,
    frac: f32,
    message: String,
) -> ControlFlow<()> {
    emit(Event::Progress {
        job_id,
        frac,
        message,
    });
    if cancel.load(Ordering::Relaxed) {
        ControlFlow::Break(())
    } else {
        ControlFlow::Continue(())
    }
}

/// The hooks of a steered generation: the vector at the last prompt token (prefill), and at
/// every new token when asked; with a description of what was done.
struct Steering {
    prefill: Editor,
    step: Editor,
    note: String,
}

fn steering(
    loaded: &LoadedModel,
    request: &SteerRequest,
    saved: &crate::ivfile::SavedIv,
) -> Result<Steering> {
    let cfg = loaded.model.config();
    let warning = crate::ivfile::check_model(
        saved,
        cfg.hidden_size,
        loaded.model.layers.len(),
        &crate::worker::iv::fingerprint(loaded)?,
        &loaded.info.display_name(),
    )?;
    let layer = match request.layer {
        Some(l) => l,
        None => saved
            .meta
            .evaluation
            .as_ref()
            .map_or(loaded.model.layers.len() / 3, |e| e.best_layer),
    };
    if layer >= loaded.model.layers.len() {
        return Err(Error::invalid(
            "steering layer",
            format!(
                "{layer} is outside the model's {} layers",
                loaded.model.layers.len()
            ),
        ));
    }
    if !request.scale.is_finite() {
        return Err(Error::invalid("steering scale", "must be a finite number"));
    }
    let vector: Vec<f32> = saved.vector.iter().map(|v| v * request.scale).collect();
    let value = Tensor::from_vec(vector, cfg.hidden_size, loaded.model.device())?;
    let edit = |positions| Edit {
        point: HookPoint::ResidPost(layer),
        positions,
        heads: None,
        op: EditOp::Add(value.clone()),
    };
    let step = if request.every_token {
        vec![edit(Positions::All)]
    } else {
        Vec::new()
    };
    let mut note = format!(
        "steered with the {} vector of {} at layer {layer} × {}{}",
        saved.meta.task,
        saved.meta.model,
        request.scale,
        if request.every_token {
            ", every token"
        } else {
            ", last prompt token"
        }
    );
    if let Some(w) = warning {
        let _ = write!(note, " (warning: {w})");
    }
    Ok(Steering {
        prefill: Editor::new(vec![edit(Positions::List(vec![-1]))]),
        step: Editor::new(step),
        note,
    })
}

/// Runs one generator per slot, one token each in turn, until all are done or the job is
/// cancelled (partial responses are returned, marked cancelled).
#[allow(clippy::too_many_arguments)]
fn generate_lockstep(
    ctx: &WorkerCtx,
    job_id: JobId,
    slots: &[Slot],
    prompt: &str,
    chat: bool,
    cfg: &GenerateConfig,
    steer: Option<&SteerRequest>,
    live_shift: Option<usize>,
    emit: &mut dyn FnMut(Event),
) -> Result<JobOutput> {
    if prompt.trim().is_empty() {
        return Err(Error::EmptyPrompt);
    }
    if slots.is_empty() {
        return Err(Error::invalid(
            "model slot",
            "no model slot to generate with",
        ));
    }
    // The saved vector is read once and checked against each model.
    let saved = steer
        .map(|s| Ok::<_, Error>((s, crate::ivfile::load(&s.path)?)))
        .transpose()?;
    let mut runs = Vec::with_capacity(slots.len());
    for &slot in slots {
        let loaded = ctx.model(slot)?;
        let (rendered, ids) = render_prompt(loaded, prompt, chat)?;
        let mut steering = saved
            .as_ref()
            .map(|(request, iv)| steering(loaded, request, iv))
            .transpose()?;
        let generator = match steering.as_mut() {
            Some(s) => Generator::new(&loaded.model, &loaded.tokenizer, &ids, cfg, &mut s.prefill)?,
            None => Generator::new(&loaded.model, &loaded.tokenizer, &ids, cfg, &mut NoHook)?,
        };
        runs.push((slot, rendered, generator, steering));
    }
    // Live shift: A follows B's response over the URIAL context of the prompt.
    let mut live = match live_shift {
        Some(k) if slots.contains(&Slot::A) && slots.contains(&Slot::B) => {
            let base = ctx.model(Slot::A)?;
            let text = crate::analysis::shift::URIAL_TEMPLATE.replace("{input}", prompt);
            let context = base.tokenizer.encode(&text, true)?;
            Some(crate::analysis::shift::LiveScorer::new(
                &base.model,
                &base.tokenizer,
                &context,
                k,
            )?)
        }
        _ => None,
    };
    let b_tokenizer = ctx.model(Slot::B).ok().map(|b| &b.tokenizer);
    let total = (cfg.max_new_tokens * runs.len()).max(1);
    let mut produced = 0usize;
    loop {
        let mut progressed = false;
        for (slot, _, generator, steering) in &mut runs {
            if ctx.cancel.load(Ordering::Relaxed) {
                generator.cancel();
                continue;
            }
            let token = match steering.as_mut() {
                Some(s) => generator.step(&mut s.step)?,
                None => generator.step(&mut NoHook)?,
            };
            if let Some(token) = token {
                progressed = true;
                produced += 1;
                let index = token.index;
                let token_id = token.token_id;
                emit(Event::Token {
                    job_id,
                    slot: *slot,
                    token,
                });
                if let (Slot::B, Some(scorer), Some(tokenizer)) =
                    (*slot, live.as_mut(), b_tokenizer)
                {
                    match scorer.score(generator.last_logits(), tokenizer, token_id) {
                        Ok(m) => emit(Event::TokenShift {
                            job_id,
                            index,
                            tr: m.tr,
                            category: m.category,
                        }),
                        // A full context ends the live scores, not the generation.
                        Err(err) => {
                            log::warn!("live token shift stopped: {err}");
                            live = None;
                        }
                    }
                }
            }
        }
        emit(Event::Progress {
            job_id,
            frac: (produced as f32 / total as f32).min(1.0),
            message: format!("generating ({produced} tokens)"),
        });
        if !progressed {
            break;
        }
    }
    let mut outputs = Vec::with_capacity(runs.len());
    for (slot, rendered, generator, steering) in runs {
        let mut output =
            GenerateOutput::new(slot, prompt.to_owned(), chat, rendered, generator.finish()?);
        output.steering = steering.map(|s| s.note);
        outputs.push(output);
    }
    Ok(JobOutput::Generated(outputs))
}

/// The model's own greedy response to `prompt_ids` (§1.1: no sampling, EOS ends it).
fn greedy_response(
    loaded: &LoadedModel,
    prompt_ids: &[u32],
    max_new_tokens: usize,
    cancel: &AtomicBool,
) -> Result<String> {
    let cfg = GenerateConfig {
        max_new_tokens,
        ..GenerateConfig::default()
    };
    let mut generator = Generator::new(
        &loaded.model,
        &loaded.tokenizer,
        prompt_ids,
        &cfg,
        &mut NoHook,
    )?;
    while generator.step(&mut NoHook)?.is_some() {
        if cancel.load(Ordering::Relaxed) {
            return Err(Error::Cancelled);
        }
    }
    Ok(generator.finish()?.text)
}

/// The text fed to the model and its ids: the chat template applied (special tokens parsed, no
/// extra BOS, as `apply_chat_template` does), or the raw prompt tokenized as `tokenizer(text)`.
pub fn render_prompt(loaded: &LoadedModel, prompt: &str, chat: bool) -> Result<(String, Vec<u32>)> {
    if chat {
        let Some(template) = &loaded.chat_template else {
            return Err(Error::invalid(
                "chat",
                "this model has no chat template; generate without it (drop --chat, or untick Chat template)",
            ));
        };
        let rendered = template.render_user(prompt)?;
        let ids = loaded.tokenizer.encode(&rendered, false)?;
        Ok((rendered, ids))
    } else {
        let ids = loaded.tokenizer.encode(prompt, true)?;
        Ok((prompt.to_owned(), ids))
    }
}

/// Logits at every position of `text`, with the top `k` per position.
pub fn forward_text(loaded: &LoadedModel, text: &str, top_k: usize) -> Result<ForwardOutput> {
    let ids = loaded.tokenizer.encode(text, true)?;
    if ids.is_empty() {
        return Err(Error::EmptyPrompt);
    }
    let input = Tensor::new(ids.as_slice(), loaded.model.device())?.unsqueeze(0)?;
    let logits = loaded
        .model
        .forward(&input)?
        .squeeze(0)?
        .to_dtype(DType::F32)?;
    let rows: Vec<Vec<f32>> = logits.to_vec2()?;
    let top_k = rows.iter().map(|row| top_k_of(row, top_k)).collect();
    let logits_last = rows.last().cloned().unwrap_or_default();
    Ok(ForwardOutput {
        tokens: loaded.tokenizer.tokens(&ids),
        ids,
        logits_last,
        top_k,
    })
}

/// The `k` largest entries as `(index, value)`, largest first (lower index first on ties).
pub fn top_k_of(values: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut indexed: Vec<(u32, f32)> = values
        .iter()
        .enumerate()
        .map(|(i, &v)| (i as u32, v))
        .collect();
    let k = k.min(indexed.len());
    if k == 0 {
        return Vec::new();
    }
    indexed.select_nth_unstable_by(k - 1, |a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    indexed.truncate(k);
    indexed.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    indexed
}
