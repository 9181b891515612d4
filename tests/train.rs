//! LoRA fine-tuning on the tiny model: the identities of issue 7's acceptance list.

use std::ops::ControlFlow;

use candle_core::{Tensor, Var};
use tunelens::model::adapter::attach_peft_adapter;
use tunelens::model::load::LoadedModel;
use tunelens::train::checkpoint::{
    find_checkpoint, read_state, restore, write_peft_adapter, DataSettings,
};
use tunelens::train::dataset::{self, Example, PromptTemplate, Renderer, SplitOptions};
use tunelens::train::lora_trainer::{LossContext, LossTerm, StepError, TrainSettings, Trainer};
use tunelens::train::run::{new_state, run, TrainEvent};

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
            assert_eq!(max_abs_diff(w, w0), 0.0);
        }
        assert!(layer.self_attn.k_proj.lora.is_none());
    }
    assert_eq!(
        max_abs_diff(&model.embed_tokens, &lm.model.embed_tokens),
        0.0
    );
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
    s.lora.targets = [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ]
    .map(str::to_owned)
    .to_vec();
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
