//! LoRA fine-tuning on the tiny model: the identities of issue 7's acceptance list.

use std::ops::ControlFlow;

use candle_core::{Tensor, Var};
use tunelens::model::adapter::attach_peft_adapter;
use tunelens::model::load::LoadedModel;
use tunelens::train::checkpoint::{
    find_checkpoint, read_state, restore, write_peft_adapter, DataSettings,
};
use tunelens::train::dataset::{self, Example, PromptTemplate, Renderer, SplitOptions};
use tunelens::train::guidance::Guidance;
use tunelens::train::lora_trainer::{
    Gradients, LossContext, LossTerm, StepError, TrainSettings, Trainer, TARGETABLE,
};
use tunelens::train::run::{new_state, run, TrainEvent};
use tunelens::train::settings::{GuidanceSettings, Progressive};

use crate::common::{ids_tensor, max_abs_diff, tiny, tiny_f64};

const DATA: &str = concat!(
    "{\"instruction\": \"translate cat to french\", \"output\": \"the cat sat on the mat .\"}\n",
    "{\"instruction\": \"what is the capital of france\", \"output\": \"paris\"}\n",
    "{\"prompt\": \"write a poem about the sea\", \"completion\": \"the sea is blue and cold .\"}\n",
    "{\"messages\": [{\"role\": \"user\", \"content\": \"list three tips for study\"}, {\"role\": \"assistant\", \"content\": \"read a book , run , jump\"}]}\n",
    "{\"instruction\": \"summarize this text in one sentence\", \"input\": \"the dog was big\", \"output\": \"a big dog .\"}\n",
    "{\"instruction\": \"answer the question\", \"input\": \"why is the tree green\", \"output\": \"it is not red .\"}\n",
);

fn examples(lm: &LoadedModel) -> Vec<Example> {
    let parsed = dataset::parse_jsonl(DATA);
    assert!(parsed.issues.is_empty(), "{:?}", parsed.issues);
    let renderer = Renderer {
        tokenizer: &lm.tokenizer,
        chat_template: lm.chat_template.as_ref(),
        template: PromptTemplate::Chat,
        max_len: 64,
    };
    let data = dataset::build(
        std::path::Path::new("tiny.jsonl"),
        &parsed,
        &renderer,
        SplitOptions {
            validation_fraction: 0.0,
            seed: 1,
        },
    )
    .unwrap();
    data.train
}

fn settings(steps: usize) -> TrainSettings {
    let mut s = TrainSettings {
        steps,
        learning_rate: 1e-2,
        batch_size: 3,
        eval_every: 0,
        save_every: 0,
        ..TrainSettings::default()
    };
    s.lora.dropout = 0.0;
    s
}

fn params_of(trainer: &Trainer) -> Vec<Vec<f32>> {
    trainer
        .params()
        .iter()
        .flat_map(|p| [p.a.as_tensor().clone(), p.b.as_tensor().clone()])
        .map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
        .collect()
}

#[test]
fn labels_cover_only_the_response() {
    let lm = tiny(3);
    let data = examples(&lm);
    let first = &data[0];
    let labelled: Vec<u32> = first
        .ids
        .iter()
        .zip(&first.is_label)
        .filter(|(_, &l)| l)
        .map(|(&id, _)| id)
        .collect();
    let text = lm.tokenizer.decode(&labelled, false).unwrap();
    assert_eq!(text, "the cat sat on the mat .");
    // Prompt tokens are not labels.
    assert!(!first.is_label[0]);
    // The chat record trains on its assistant turn only.
    let chat = &data[3];
    let labelled: Vec<u32> = chat
        .ids
        .iter()
        .zip(&chat.is_label)
        .filter(|(_, &l)| l)
        .map(|(&id, _)| id)
        .collect();
    assert_eq!(
        lm.tokenizer.decode(&labelled, false).unwrap(),
        "read a book , run , jump"
    );
}

#[test]
fn fresh_adapters_leave_the_model_unchanged() {
    let lm = tiny(3);
    let ids = ids_tensor(&[1, 7, 8, 9, 10, 11]);
    let base = lm.model.forward(&ids).unwrap();
    let trainer = Trainer::new(lm.model.clone(), settings(1), examples(&lm), vec![], 0).unwrap();
    let adapted = trainer.model().forward(&ids).unwrap();
    assert_eq!(max_abs_diff(&base, &adapted), 0.0);
    // 3 layers × (q_proj, v_proj).
    assert_eq!(trainer.params().len(), 6);
}

#[test]
fn steps_change_only_adapter_parameters() {
    let lm = tiny(3);
    let mut trainer =
        Trainer::new(lm.model.clone(), settings(1), examples(&lm), vec![], 0).unwrap();
    let before = params_of(&trainer);
    let report = trainer.step().unwrap();
    assert!(report.loss.is_finite() && report.grad_norm > 0.0);
    let after = params_of(&trainer);
    // With B = 0 the first gradient reaches only B (dA = s (g B)ᵀ x = 0), as in PEFT.
    for (i, (b, a)) in before.iter().zip(&after).enumerate() {
        if i % 2 == 0 {
            assert_eq!(b, a, "A stays put on the first step");
        } else {
            assert_ne!(b, a, "every B moves on the first step");
        }
    }
    trainer.step().unwrap();
    for (b, a) in before.iter().zip(&params_of(&trainer)) {
        assert_ne!(b, a, "every A and B has moved after two steps");
    }
    let model = trainer.model();
    for (layer, orig) in model.layers.iter().zip(&lm.model.layers) {
        for (w, w0) in [
            (
                &layer.self_attn.q_proj.weight,
                &orig.self_attn.q_proj.weight,
            ),
            (
                &layer.self_attn.k_proj.weight,
                &orig.self_attn.k_proj.weight,
            ),
            (&layer.mlp.down_proj.weight, &orig.mlp.down_proj.weight),
        ] {
            assert_eq!(max_abs_diff(&w.dense().unwrap(), &w0.dense().unwrap()), 0.0);
        }
        assert!(layer.self_attn.k_proj.lora.is_none());
    }
    assert_eq!(
        max_abs_diff(
            &model.embed_tokens.dense().unwrap(),
            &lm.model.embed_tokens.dense().unwrap()
        ),
        0.0
    );
}

/// LoRA training (the hand-written backward through every frozen product, `lm_head`
/// included) on weights kept as stored equals training on their f32 expansion: the same
/// adapter gradients at the start (dB, which flows back through every later layer) and the
/// same losses over three steps, for a quantised and a bf16 model. (The adapters themselves are
/// not compared: Adam's first steps move each entry by about ±lr whatever the gradient's size,
/// so gradients at rounding level differ in sign between two summation orders.)
#[test]
fn training_on_weights_kept_as_stored_matches_the_expanded_copy() {
    let mut cfg = tunelens::model::tiny::tiny_config();
    cfg.hidden_size = 256;
    cfg.intermediate_size = 512;
    cfg.num_hidden_layers = 2;
    cfg.head_dim = 64;
    for kind in [
        candle_core::quantized::GgmlDType::Q4K,
        candle_core::quantized::GgmlDType::BF16,
    ] {
        let (stored, dense) = tunelens::model::tiny::tiny_packed_pair(&cfg, 9, kind).unwrap();
        let mut s = settings(3);
        s.lora.targets = all_targets();
        let mut runs = Vec::new();
        for lm in [&stored, &dense] {
            let mut trainer =
                Trainer::new(lm.model.clone(), s.clone(), examples(lm), vec![], 0).unwrap();
            let grads: Vec<f32> = trainer
                .gradients()
                .unwrap()
                .grads
                .iter()
                .flat_map(|(_, db)| db.flatten_all().unwrap().to_vec1::<f32>().unwrap())
                .collect();
            let losses: Vec<f64> = (0..3).map(|_| trainer.step().unwrap().loss).collect();
            runs.push((losses, grads));
        }
        let (a, b) = (&runs[0], &runs[1]);
        for (x, y) in a.0.iter().zip(&b.0) {
            assert!(
                (x - y).abs() < 1e-4 * y.abs().max(1.0),
                "{kind:?}: loss {x} vs {y}"
            );
        }
        let largest = b.1.iter().fold(0f32, |m, v| m.max(v.abs()));
        let worst =
            a.1.iter()
                .zip(&b.1)
                .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(largest > 0.0);
        assert!(
            worst <= 1e-4 * largest,
            "{kind:?}: gradients differ by {worst:e}"
        );
    }
}

#[test]
fn loss_falls_on_a_memorisable_set_within_50_steps() {
    let lm = tiny(3);
    let mut s = settings(50);
    s.batch_size = 6;
    s.lora.dropout = 0.1;
    let mut trainer = Trainer::new(lm.model.clone(), s, examples(&lm), vec![], 0).unwrap();
    let initial = trainer.train_loss().unwrap();
    while !trainer.is_finished() {
        trainer.step().unwrap();
    }
    let last = trainer.train_loss().unwrap();
    assert!(
        last < 0.25 * initial,
        "training loss {initial:.3} -> {last:.3}"
    );
}

#[test]
fn lora_gradients_match_finite_differences() {
    let lm = tiny_f64(5);
    let mut s = settings(1);
    s.batch_size = 6;
    let mut trainer = Trainer::new(lm.model.clone(), s, examples(&lm), vec![], 0).unwrap();
    // Give B non-zero values so gradients reach A too.
    for (i, p) in trainer.params().iter().enumerate() {
        let shape = p.b.dims().to_vec();
        let n: usize = shape.iter().product();
        #[allow(clippy::cast_precision_loss)]
        let values: Vec<f64> = (0..n)
            .map(|j| (((i * 31 + j * 7) % 13) as f64 - 6.0) * 0.05)
            .collect();
        p.b.set(&Tensor::from_vec(values, shape, p.b.device()).unwrap())
            .unwrap();
    }
    let grads = trainer.gradients().unwrap().grads;
    let data = examples(&lm);
    let eps = 1e-6;
    for (pi, which, idx) in [
        (0usize, 'a', 3usize),
        (1, 'b', 5),
        (4, 'a', 17),
        (5, 'b', 0),
    ] {
        let param = &trainer.params()[pi];
        let var: &Var = if which == 'a' { &param.a } else { &param.b };
        let orig = var
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let shape = var.dims().to_vec();
        let eval = |delta: f64| {
            let mut v = orig.clone();
            v[idx] += delta;
            var.set(&Tensor::from_vec(v, shape.clone(), var.device()).unwrap())
                .unwrap();
            trainer.loss_on(&data).unwrap()
        };
        let numeric = (eval(eps) - eval(-eps)) / (2.0 * eps);
        eval(0.0);
        let g = if which == 'a' {
            &grads[pi].0
        } else {
            &grads[pi].1
        };
        let analytic = g.flatten_all().unwrap().to_vec1::<f64>().unwrap()[idx];
        assert!(
            (numeric - analytic).abs() < 1e-6 * (1.0 + numeric.abs()),
            "param {pi}{which}[{idx}]: numeric {numeric} vs analytic {analytic}"
        );
    }
}

#[test]
fn saved_adapter_reloads_with_identical_logits() {
    let lm = tiny(3);
    let mut trainer =
        Trainer::new(lm.model.clone(), settings(5), examples(&lm), vec![], 0).unwrap();
    for _ in 0..5 {
        trainer.step().unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    write_peft_adapter(dir.path(), &trainer, "tiny").unwrap();
    let mut fresh = lm.model.clone();
    let info = attach_peft_adapter(&mut fresh, dir.path()).unwrap();
    assert_eq!(info.rank, 8);
    assert_eq!(info.target_modules, vec!["q_proj", "v_proj"]);
    let ids = ids_tensor(&[1, 3, 12, 13, 14, 4, 7]);
    let a = trainer.model().forward(&ids).unwrap();
    let b = fresh.forward(&ids).unwrap();
    assert_eq!(max_abs_diff(&a, &b), 0.0);
    assert!(max_abs_diff(&a, &lm.model.forward(&ids).unwrap()) > 1e-4);
}

#[test]
fn resumed_run_equals_the_uninterrupted_one() {
    let lm = tiny(3);
    let mut s = settings(8);
    s.lora.dropout = 0.1;
    s.batch_size = 2;
    s.grad_accum = 2;
    s.save_every = 3;
    let data = examples(&lm);

    let full_dir = tempfile::tempdir().unwrap();
    let mut full = Trainer::new(lm.model.clone(), s.clone(), data.clone(), vec![], 0).unwrap();
    let mut state = new_state(&full, DataSettings::default(), "tiny");
    run(&mut full, &mut state, Some(full_dir.path()), &mut |_| {
        ControlFlow::Continue(())
    })
    .unwrap();
    assert!(full_dir
        .path()
        .join("adapter/adapter_model.safetensors")
        .exists());
    assert!(full_dir.path().join("curves.csv").exists());

    let dir = tempfile::tempdir().unwrap();
    let mut first = Trainer::new(lm.model.clone(), s.clone(), data.clone(), vec![], 0).unwrap();
    let mut state = new_state(&first, DataSettings::default(), "tiny");
    let outcome = run(
        &mut first,
        &mut state,
        Some(dir.path()),
        &mut |event| match event {
            TrainEvent::Step(r) if r.step == 5 => ControlFlow::Break(()),
            _ => ControlFlow::Continue(()),
        },
    )
    .unwrap();
    assert!(outcome.cancelled);
    let ckpt = find_checkpoint(dir.path()).unwrap();
    assert!(ckpt.ends_with("checkpoint-000005"), "{}", ckpt.display());
    let mut state = read_state(&ckpt).unwrap();
    assert_eq!(state.history.len(), 5);
    let mut resumed =
        Trainer::new(lm.model.clone(), state.settings.clone(), data, vec![], 0).unwrap();
    restore(&ckpt, &mut resumed, &state).unwrap();
    run(&mut resumed, &mut state, Some(dir.path()), &mut |_| {
        ControlFlow::Continue(())
    })
    .unwrap();
    assert_eq!(params_of(&full), params_of(&resumed));
    let curves = std::fs::read_to_string(dir.path().join("curves.csv")).unwrap();
    assert_eq!(curves.lines().count(), 1 + 8);
}

struct NanTerm;

impl LossTerm for NanTerm {
    fn name(&self) -> &'static str {
        "broken"
    }

    fn compute(&mut self, ctx: &LossContext<'_>) -> tunelens::Result<Tensor> {
        Ok((ctx.logits.sum_all()? * f64::NAN)?)
    }
}

#[test]
fn nan_loss_stops_without_touching_parameters() {
    let lm = tiny(3);
    let mut trainer =
        Trainer::new(lm.model.clone(), settings(3), examples(&lm), vec![], 0).unwrap();
    trainer.step().unwrap();
    let before = params_of(&trainer);
    trainer.add_term(Box::new(NanTerm));
    assert_eq!(trainer.term_names(), vec!["ce", "broken"]);
    match trainer.step() {
        Err(StepError::NonFinite {
            what,
            step,
            last_good,
        }) => {
            assert_eq!((what, step, last_good), ("NaN", 2, 1));
        }
        other => panic!("expected a NaN error, got {other:?}"),
    }
    assert_eq!(params_of(&trainer), before);
    assert_eq!(trainer.step_count(), 1);
}

#[test]
fn hand_written_backward_matches_autograd() {
    let lm = tiny(4);
    let mut s = settings(1);
    s.lora.targets = all_targets();
    s.batch_size = 4;
    s.grad_accum = 2;
    let mut trainer = Trainer::new(lm.model.clone(), s, examples(&lm), vec![], 0).unwrap();
    for (i, p) in trainer.params().iter().enumerate() {
        let shape = p.b.dims().to_vec();
        let n: usize = shape.iter().product();
        #[allow(clippy::cast_precision_loss)]
        let values: Vec<f32> = (0..n)
            .map(|j| (((i * 17 + j * 5) % 11) as f32 - 5.0) * 0.03)
            .collect();
        p.b.set(&Tensor::from_vec(values, shape, p.b.device()).unwrap())
            .unwrap();
    }
    assert!(trainer.uses_fast_backward());
    let fast = trainer.gradients().unwrap();
    trainer.set_autograd(true);
    assert!(!trainer.uses_fast_backward());
    let reference = trainer.gradients().unwrap();
    assert!((fast.terms[0].1 - reference.terms[0].1).abs() < 1e-5);
    assert_eq!(fast.tokens, reference.tokens);
    for ((fa, fb), (ra, rb)) in fast.grads.iter().zip(&reference.grads) {
        for (f, r) in [(fa, ra), (fb, rb)] {
            let scale = 1.0 + max_abs_diff(r, &r.zeros_like().unwrap());
            assert!(
                max_abs_diff(f, r) < 1e-5 * scale,
                "{} vs {}",
                max_abs_diff(f, r),
                scale
            );
        }
    }
}

#[test]
fn steps_keep_no_autograd_graph_alive() {
    // The adapters are `Var`s: any op on them records a graph. Gradients and AdamW moments
    // must be plain values, or each step's moments would hold every earlier step's
    // activations (a leak of ~80 MB per step on the demo model, found in a 200-step run).
    let lm = tiny(3);
    let mut s = settings(3);
    s.lora.dropout = 0.1;
    for autograd in [false, true] {
        let mut trainer =
            Trainer::new(lm.model.clone(), s.clone(), examples(&lm), vec![], 0).unwrap();
        trainer.set_autograd(autograd);
        for _ in 0..3 {
            trainer.step().unwrap();
        }
        for (ma, mb) in trainer.moments() {
            for m in [&ma.m, &ma.v, &mb.m, &mb.v] {
                assert!(
                    !m.track_op(),
                    "a moment records an autograd graph (autograd {autograd})"
                );
            }
        }
    }
}

/// A guidance for the tiny model: a seeded vector of norm `norm` at layer 1, four heads.
fn tiny_guidance(lm: &LoadedModel, settings: GuidanceSettings, norm: f32) -> Guidance {
    let d = lm.model.config().hidden_size;
    #[allow(clippy::cast_precision_loss)]
    let raw: Vec<f32> = (0..d).map(|i| ((i * 7 + 3) % 11) as f32 - 5.0).collect();
    let len = raw.iter().map(|v| v * v).sum::<f32>().sqrt();
    let vector: Vec<f32> = raw.iter().map(|v| v * norm / len).collect();
    Guidance::new(
        settings,
        &vector,
        vec![(0, 1), (1, 2), (2, 0), (1, 3)],
        &lm.model,
    )
    .unwrap()
}

fn guided_settings() -> GuidanceSettings {
    GuidanceSettings {
        layer: 1,
        ..GuidanceSettings::code("tiny-iv.safetensors".into())
    }
}

/// Gives every adapter a non-zero `B`, so the adapted model differs from the reference.
fn perturb_adapters(trainer: &Trainer) {
    for (i, p) in trainer.params().iter().enumerate() {
        let shape = p.b.dims().to_vec();
        let n: usize = shape.iter().product();
        #[allow(clippy::cast_precision_loss)]
        let values: Vec<f32> = (0..n)
            .map(|j| (((i * 17 + j * 5) % 11) as f32 - 5.0) * 0.2)
            .collect();
        let value = Tensor::from_vec(values, shape, p.b.device()).unwrap();
        p.b.set(&value.to_dtype(p.b.dtype()).unwrap()).unwrap();
    }
}

fn assert_grads_close(fast: &Gradients, reference: &Gradients, rel: f64) {
    for ((fa, fb), (ra, rb)) in fast.grads.iter().zip(&reference.grads) {
        for (f, r) in [(fa, ra), (fb, rb)] {
            let scale = max_abs_diff(r, &r.zeros_like().unwrap()).max(1e-12);
            assert!(
                max_abs_diff(f, r) <= rel * scale + 1e-9,
                "{} vs scale {}",
                max_abs_diff(f, r),
                scale
            );
        }
    }
}

fn all_targets() -> Vec<String> {
    TARGETABLE.iter().map(|s| (*s).to_owned()).collect()
}

#[test]
fn fresh_adapters_and_a_zero_vector_add_nothing() {
    // METHODS.md §5.6: B = 0 and IV = 0 give logits == logits_ref, so kl1 = kl2 = 0, the
    // thresholded terms are 0, and the gradient is the cross-entropy's alone.
    let lm = tiny(5);
    let mut s = settings(1);
    s.batch_size = 4;
    s.lora.targets = all_targets();
    let mut plain = Trainer::new(lm.model.clone(), s.clone(), examples(&lm), vec![], 0).unwrap();
    let mut guided = Trainer::new(lm.model.clone(), s, examples(&lm), vec![], 0).unwrap();
    guided.set_guidance(tiny_guidance(&lm, guided_settings(), 0.0));
    assert_eq!(guided.term_names(), ["ce", "kl1", "kl2", "pr"]);
    let reference = plain.gradients().unwrap();
    let with_iv = guided.gradients().unwrap();
    let raw: std::collections::HashMap<_, _> = with_iv.metrics.iter().cloned().collect();
    assert!(raw["kl1_raw"].abs() < 1e-6, "{raw:?}");
    assert!(raw["kl2_raw"].abs() < 1e-5, "{raw:?}");
    assert!(raw["mse_raw"].abs() < 1e-10, "{raw:?}");
    for (name, value) in &with_iv.terms[1..] {
        assert_eq!(*value, 0.0, "{name}");
    }
    assert!((with_iv.terms[0].1 - reference.terms[0].1).abs() < 1e-6);
    assert_grads_close(&with_iv, &reference, 1e-5);
}

#[test]
fn terms_below_their_thresholds_contribute_nothing() {
    let lm = tiny(5);
    let mut s = settings(1);
    s.batch_size = 4;
    let mut plain = Trainer::new(lm.model.clone(), s.clone(), examples(&lm), vec![], 0).unwrap();
    let mut guided = Trainer::new(lm.model.clone(), s, examples(&lm), vec![], 0).unwrap();
    perturb_adapters(&plain);
    perturb_adapters(&guided);
    let g = GuidanceSettings {
        kl_threshold: 1e9,
        mse_threshold: 1e9,
        ..guided_settings()
    };
    guided.set_guidance(tiny_guidance(&lm, g, 3.0));
    let reference = plain.gradients().unwrap();
    let with_iv = guided.gradients().unwrap();
    let raw: std::collections::HashMap<_, _> = with_iv.metrics.iter().cloned().collect();
    assert!(
        raw["kl2_raw"] > 1e-3,
        "the terms are not trivially zero: {raw:?}"
    );
    assert!(raw["mse_raw"] > 1e-6, "{raw:?}");
    for (name, value) in &with_iv.terms[1..] {
        assert_eq!(*value, 0.0, "{name}");
    }
    assert_grads_close(&with_iv, &reference, 1e-5);
}

#[test]
fn guided_hand_written_gradients_match_autograd_term_by_term() {
    // In f64, so the comparison measures the backward, not f32 rounding.
    let lm = tiny_f64(6);
    let zero = GuidanceSettings {
        kl_alpha1: 0.0,
        kl_alpha2: 0.0,
        pr_alpha: 0.0,
        kl_threshold: 0.0,
        mse_threshold: 0.0,
        ..guided_settings()
    };
    let cases = [
        (
            "kl1",
            GuidanceSettings {
                kl_alpha1: 20.0,
                ..zero.clone()
            },
        ),
        (
            "kl2",
            GuidanceSettings {
                kl_alpha2: 0.5,
                ..zero.clone()
            },
        ),
        (
            "pr",
            GuidanceSettings {
                pr_alpha: 1.0,
                ..zero.clone()
            },
        ),
        (
            "progressive",
            GuidanceSettings {
                kl_alpha2: 0.05,
                progressive: Some(Progressive::Linear),
                ..zero.clone()
            },
        ),
        (
            "all",
            GuidanceSettings {
                kl_alpha1: 1.0,
                kl_alpha2: 0.1,
                pr_alpha: 1.0,
                ..zero
            },
        ),
    ];
    for (name, g) in cases {
        let mut s = settings(4);
        s.batch_size = 3;
        s.grad_accum = 2;
        s.lora.targets = all_targets();
        s.lora.dropout = 0.1;
        let mut trainer = Trainer::new(lm.model.clone(), s, examples(&lm), vec![], 0).unwrap();
        perturb_adapters(&trainer);
        trainer.set_guidance(tiny_guidance(&lm, g, 2.0));
        if name == "progressive" {
            // A step in the middle of the run, where the scale is 0.5.
            trainer.step().unwrap();
            trainer.step().unwrap();
        }
        assert!(trainer.uses_fast_backward());
        let fast = trainer.gradients().unwrap();
        trainer.set_autograd(true);
        let reference = trainer.gradients().unwrap();
        for ((n, f), (_, r)) in fast.terms.iter().zip(&reference.terms) {
            assert!(
                (f - r).abs() <= 1e-5 * r.abs().max(1e-3),
                "{name}: term {n} {f} vs {r}"
            );
        }
        let active: Vec<&(String, f64)> = fast.terms.iter().filter(|(_, v)| *v > 0.0).collect();
        assert!(active.len() >= 2, "{name}: {:?}", fast.terms);
        if name == "progressive" {
            assert!(fast
                .metrics
                .iter()
                .any(|(n, v)| n == "iv_scale" && (*v - 0.5).abs() < 1e-12));
        }
        assert_grads_close(&fast, &reference, 1e-9);
    }
}

#[test]
fn guided_steps_change_only_the_adapters() {
    let lm = tiny(7);
    let mut s = settings(3);
    s.lora.targets = all_targets();
    let before = lm.model.layers[1].self_attn.o_proj.weight.clone();
    let mut trainer = Trainer::new(lm.model.clone(), s, examples(&lm), vec![], 0).unwrap();
    let g = GuidanceSettings {
        kl_threshold: 0.0,
        mse_threshold: 0.0,
        ..guided_settings()
    };
    trainer.set_guidance(tiny_guidance(&lm, g, 2.0));
    let start = params_of(&trainer);
    for _ in 0..3 {
        let report = trainer.step().unwrap();
        assert_eq!(report.terms.len(), 4);
        assert!(
            report.terms.iter().skip(1).any(|(_, v)| *v > 0.0),
            "{report:?}"
        );
    }
    assert_ne!(params_of(&trainer), start);
    let after = &trainer.model().layers[1].self_attn.o_proj.weight;
    assert_eq!(
        max_abs_diff(&before.dense().unwrap(), &after.dense().unwrap()),
        0.0
    );
}

/// The hand-written guided gradients of one batch of `batch` examples against autograd, with
/// `kl1` on and `kl2` on then off (thresholds 0): every row has a gradient with kl2 on; with
/// it off only the label rows and t_b do, and only those go through the head's backward.
/// Terms within `term_tol` and gradients within `grad_tol`, relative.
fn guided_fast_equals_autograd_with_and_without_kl2(
    lm: &LoadedModel,
    batch: usize,
    term_tol: f64,
    grad_tol: f64,
) {
    for kl_alpha2 in [0.1, 0.0] {
        let mut s = settings(1);
        s.batch_size = batch;
        s.lora.targets = all_targets();
        let mut trainer = Trainer::new(lm.model.clone(), s, examples(lm), vec![], 0).unwrap();
        perturb_adapters(&trainer);
        let g = GuidanceSettings {
            kl_alpha1: 1.0,
            kl_alpha2,
            kl_threshold: 0.0,
            mse_threshold: 0.0,
            ..guided_settings()
        };
        trainer.set_guidance(tiny_guidance(lm, g, 2.0));
        let fast = trainer.gradients().unwrap();
        trainer.set_autograd(true);
        let reference = trainer.gradients().unwrap();
        for ((n, f), (_, r)) in fast.terms.iter().zip(&reference.terms) {
            assert!(
                (f - r).abs() <= term_tol * r.abs().max(1e-3),
                "{n} {f} vs {r}"
            );
        }
        assert!(fast.terms[1].1 > 0.0, "{:?}", fast.terms);
        assert_eq!(fast.terms[2].1 > 0.0, kl_alpha2 > 0.0, "{:?}", fast.terms);
        assert_grads_close(&fast, &reference, grad_tol);
    }
}

#[test]
fn guided_fused_f32_kernels_match_autograd() {
    // f32 on the CPU takes the fused loss kernels; autograd stays candle's ops.
    guided_fast_equals_autograd_with_and_without_kl2(&tiny(6), 4, 1e-4, 1e-4);
}

#[test]
fn guided_gradients_match_autograd_through_a_logit_cap() {
    // Gemma 2 caps its logits: the head's backward takes the cap's derivative at the rows
    // with a gradient. In f64; Gemma's hand-written backward agrees with autograd to ~1.5e-7
    // here (the issue's bound is 1e-5), with or without the row selection.
    use tunelens::model::tiny::{tiny_family_config, tiny_model_with, tiny_options};
    use tunelens::model::Architecture;
    let lm = tiny_model_with(
        &tiny_family_config(Architecture::Gemma2),
        6,
        &tiny_options(candle_core::DType::F64),
    )
    .unwrap();
    assert!(lm.model.config().final_logit_softcapping.is_some());
    guided_fast_equals_autograd_with_and_without_kl2(&lm, 3, 1e-7, 1e-6);
}

#[test]
fn rouge_l_equals_rouge_score_on_fixed_pairs() {
    // tests/golden/rouge_l.json: Google's rouge-score (scripts/gen-rouge-golden).
    let golden = crate::common::golden("rouge_l.json");
    let pairs = golden["pairs"].as_array().expect("pairs");
    assert!(pairs.len() >= 20);
    for pair in pairs {
        let (p, r) = (
            pair["prediction"].as_str().unwrap(),
            pair["reference"].as_str().unwrap(),
        );
        let want = pair["rougeL_f1"].as_f64().unwrap();
        let got = tunelens::train::forgetting::rouge_l(p, r);
        assert!((got - want).abs() < 1e-9, "{p:?} vs {r:?}: {got} != {want}");
    }
}

#[test]
fn batched_backward_matches_autograd_with_dropout() {
    // The hand-written path runs each micro-batch as one right-padded taped forward and one
    // backward, with the autograd path's dropout masks: the two agree with dropout on.
    let lm = tiny(8);
    let mut s = settings(1);
    s.lora.targets = all_targets();
    s.lora.dropout = 0.1;
    s.batch_size = 3;
    s.grad_accum = 2;
    let mut trainer = Trainer::new(lm.model.clone(), s, examples(&lm), vec![], 0).unwrap();
    perturb_adapters(&trainer);
    let fast = trainer.gradients().unwrap();
    trainer.set_autograd(true);
    let reference = trainer.gradients().unwrap();
    assert!((fast.terms[0].1 - reference.terms[0].1).abs() < 1e-5);
    assert_grads_close(&fast, &reference, 1e-4);
    // Dropout really is on: without it the gradients differ.
    let mut no_dropout = settings(1);
    no_dropout.lora.targets = all_targets();
    no_dropout.batch_size = 3;
    no_dropout.grad_accum = 2;
    let mut plain = Trainer::new(lm.model.clone(), no_dropout, examples(&lm), vec![], 0).unwrap();
    perturb_adapters(&plain);
    let other = plain.gradients().unwrap();
    assert!((other.terms[0].1 - fast.terms[0].1).abs() > 1e-6);
}
