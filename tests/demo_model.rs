//! The demo model (SmolLM2-135M-Instruct, Q4_1 GGUF) against the Hugging Face transformers
//! goldens in `tests/golden/` (copied from `shared/golden/`, produced with transformers 5.23.0).

use std::ops::ControlFlow;
use std::sync::OnceLock;

use candle_core::Tensor;

use tunelens::model::generate::{generate, GenerateConfig};
use tunelens::model::{load, LoadOptions, LoadedModel, ModelSpec, NoHook};
use tunelens::worker::runner::{forward_text, render_prompt};

use crate::common::{demo_model_path, golden, u32s};

fn demo() -> &'static LoadedModel {
    static MODEL: OnceLock<LoadedModel> = OnceLock::new();
    MODEL.get_or_init(|| {
        let spec = ModelSpec::parse(&demo_model_path().display().to_string());
        load(&spec, &LoadOptions::default()).expect("demo model loads")
    })
}

#[test]
fn tokenizer_ids_and_strings_match_transformers() {
    let m = demo();
    for case in golden("tokenize.json")["tokenize"]
        .as_array()
        .expect("cases")
    {
        let text = case["text"].as_str().expect("text");
        let ids = m.tokenizer.encode(text, true).expect("encodes");
        assert_eq!(ids, u32s(&case["ids"]), "ids of {text:?}");
        let tokens: Vec<String> = case["tokens"]
            .as_array()
            .expect("tokens")
            .iter()
            .map(|t| t.as_str().unwrap_or_default().to_owned())
            .collect();
        assert_eq!(m.tokenizer.tokens(&ids), tokens, "tokens of {text:?}");
    }
}

#[test]
fn forward_matches_transformers() {
    let m = demo();
    for case in golden("forward.json")["forward"].as_array().expect("cases") {
        let text = case["text"].as_str().expect("text");
        let out = forward_text(m, text, 5).expect("forward");
        assert_eq!(out.ids, u32s(&case["ids"]));
        let golden_top = case["top_k"].as_array().expect("top_k");
        assert_eq!(out.top_k.len(), golden_top.len());
        for (pos, (ours, theirs)) in out.top_k.iter().zip(golden_top).enumerate() {
            let theirs_top1 = theirs[0][0].as_u64().expect("id") as u32;
            assert_eq!(
                ours[0].0, theirs_top1,
                "top-1 at position {pos} of {text:?}"
            );
        }
        let golden_last: Vec<f64> = case["logits_last"]
            .as_array()
            .expect("logits")
            .iter()
            .map(|v| v.as_f64().expect("f"))
            .collect();
        assert_eq!(out.logits_last.len(), golden_last.len());
        let worst = out
            .logits_last
            .iter()
            .zip(&golden_last)
            .map(|(a, b)| (f64::from(*a) - b).abs())
            .fold(0.0, f64::max);
        assert!(
            worst < 1e-2,
            "last-position logits differ by {worst} for {text:?}"
        );
    }
}

#[test]
fn chat_template_and_greedy_generation_match_transformers() {
    let m = demo();
    for case in golden("generate.json")["generate"]
        .as_array()
        .expect("cases")
    {
        let prompt = case["prompt"].as_str().expect("prompt");
        let (rendered, ids) = render_prompt(m, prompt, true).expect("renders");
        assert_eq!(
            rendered,
            case["rendered_prompt"].as_str().expect("rendered")
        );
        assert_eq!(ids, u32s(&case["prompt_ids"]));
        let cfg = GenerateConfig {
            max_new_tokens: case["max_new_tokens"].as_u64().expect("n") as usize,
            ..GenerateConfig::default()
        };
        let out = generate(&m.model, &m.tokenizer, &ids, &cfg, &mut NoHook, &mut |_| {
            ControlFlow::Continue(())
        })
        .expect("generates");
        assert_eq!(out.new_ids, u32s(&case["new_ids"]));
        assert_eq!(out.text, case["new_text"].as_str().expect("text"));
    }
}

#[test]
fn demo_model_info() {
    let info = &demo().info;
    assert_eq!(info.architecture, "llama");
    assert_eq!(info.num_layers, 30);
    assert_eq!(
        (info.num_heads, info.num_kv_heads, info.hidden_size),
        (9, 3, 576)
    );
    assert!(info.tied_embeddings);
    assert!(info.has_chat_template);
    assert!(info.source_dtype.contains("Q4_1"));
}

#[test]
fn concepts_and_head_pairs_cover_every_layer() {
    use tunelens::analysis::{ffn_concepts, head_pairs};
    let m = demo();
    // A shorter list keeps this debug-build test quick; the benchmark runs the full lists.
    let words = tunelens::wordfiles::WordSource::Builtin
        .load()
        .expect("built-in list")
        .truncated(4000);
    let cfg = ffn_concepts::ConceptsConfig {
        top_k: 10,
        max_rank: 20,
    };
    let concepts = ffn_concepts::ffn_concepts(&m.model, &m.tokenizer, &words, &cfg, &mut |_, _| {
        ControlFlow::Continue(())
    })
    .expect("concepts");
    assert_eq!(concepts.layers.len(), 30);
    for layer in &concepts.layers {
        assert_eq!(layer.ratios.len(), 576);
        assert!((layer.ratios.iter().sum::<f64>() - 1.0).abs() < 1e-9);
        assert_eq!(layer.components.len(), 20);
        assert!(layer.components.iter().all(|c| c.words.len() == 10));
    }
    let hcfg = head_pairs::HeadsConfig {
        top_k: 30,
        ..head_pairs::HeadsConfig::default()
    };
    let space =
        head_pairs::model_semantic_space(&m.model, &m.tokenizer, &words, &hcfg).expect("space");
    let pairs = head_pairs::head_pairs(
        &m.model,
        &m.tokenizer,
        &words,
        &space,
        &hcfg,
        &mut |_, _| ControlFlow::Continue(()),
    )
    .expect("head pairs");
    assert_eq!(pairs.layers.len(), 30);
    assert!(pairs.layers.iter().all(|l| l.dims.len() == 9 * 64));
    let total: usize = pairs
        .layers
        .iter()
        .flat_map(|l| &l.dims)
        .map(|d| d.pairs.len())
        .sum();
    assert!(total > 0, "some pairs survive the filters");
}

#[test]
fn consistency_measures_run_on_the_demo_model() {
    use tunelens::analysis::consistency::{self, Pooling};
    use tunelens::analysis::prediction::{self, FactSet, PredictionMode};
    use tunelens::worker::consistency::{DEFAULT_FACTS, DEFAULT_PAIRS};
    let m = demo();
    let pairs = consistency::parse_pairs(DEFAULT_PAIRS).expect("shipped pairs");
    let pairs: Vec<_> = pairs.into_iter().take(24).collect();
    let (sentences, _) = consistency::unique_sentences(&pairs);
    let go = |_: f32| ControlFlow::Continue(());
    let one = consistency::representations(
        &m.model,
        &m.tokenizer,
        &sentences,
        Pooling::Mean,
        1,
        &mut go.clone(),
    )
    .expect("unbatched");
    let many = consistency::representations(
        &m.model,
        &m.tokenizer,
        &sentences,
        Pooling::Mean,
        16,
        &mut go.clone(),
    )
    .expect("batched");
    let max = one
        .data
        .iter()
        .zip(&many.data)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    let scale = one.data.iter().map(|v| v.abs()).fold(0f32, f32::max);
    assert!(
        max <= 1e-5 * scale.max(1.0),
        "batched vs unbatched: {max} (scale {scale})"
    );

    let mut facts: FactSet = serde_json::from_str(DEFAULT_FACTS).expect("shipped facts");
    facts.relations.truncate(2);
    for r in &mut facts.relations {
        r.facts.truncate(4);
    }
    let result = prediction::prediction_consistency(
        &m.model,
        &m.tokenizer,
        &facts,
        PredictionMode::Candidates,
        None,
        &mut go.clone(),
    )
    .expect("predictions");
    assert_eq!(result.relations.len(), 2);
    assert!((0.0..=1.0).contains(&result.macro_avg.consistency));
    assert!(
        result.macro_avg.accuracy > 0.0,
        "the demo model knows some capitals: {result:?}"
    );
    // Batched scoring (the default) answers as the per-query reference does, with and without
    // an instruction before the queries (§8.4; its tokens are the batches' shared prefix).
    let reference = prediction::prediction_consistency_with(
        &m.model,
        &m.tokenizer,
        &facts,
        PredictionMode::Candidates,
        None,
        prediction::Scoring::PerQuery,
        &mut go.clone(),
    )
    .expect("per-query predictions");
    assert_eq!(result, reference);
    let mut all: FactSet = serde_json::from_str(DEFAULT_FACTS).expect("shipped facts");
    for r in &mut all.relations {
        r.facts.truncate(1);
    }
    let ins = all.instructions[0].clone();
    let [batched, per_query] =
        [prediction::Scoring::Batched, prediction::Scoring::PerQuery].map(|scoring| {
            prediction::prediction_consistency_with(
                &m.model,
                &m.tokenizer,
                &all,
                PredictionMode::Candidates,
                Some(&ins),
                scoring,
                &mut go.clone(),
            )
            .expect("instructed predictions")
        });
    assert_eq!(batched, per_query);
}

/// METHODS.md §4 on the demo model: the shipped country-capital task splits as sklearn splits it
/// (the first train, valid and test items computed with numpy's RandomState(42)), the model
/// answers some valid queries top-1 with 10 demonstrations, the vector is built from 10 heads,
/// and the fast last-position effects equal full patched forwards of the recorded trial.
#[test]
fn instruction_vector_on_the_demo_model() {
    use tunelens::analysis::icl::{split_task, SplitConfig};
    use tunelens::analysis::iv::{run_tasks, softmax, IclTask, IvConfig};
    use tunelens::model::{Edit, EditOp, Editor, HookPoint, Positions};
    let m = demo();
    let task = tunelens::worker::iv::load_task(&tunelens::worker::iv::TaskSource::Shipped(
        "country-capital".into(),
    ))
    .expect("shipped task");
    let split = split_task(&task.items, &SplitConfig::default());
    assert_eq!(
        (split.train.len(), split.valid.len(), split.test.len()),
        (105, 14, 31)
    );
    assert_eq!(
        (
            split.train[0].input.as_str(),
            split.valid[0].input.as_str(),
            split.test[0].input.as_str()
        ),
        ("Israel", "Central African Republic", "Guinea")
    );
    let cfg = IvConfig {
        n_mean: 4,
        n_ie: 1,
        evaluate: false,
        record_trials: true,
        ..IvConfig::todd()
    };
    let tasks = [IclTask {
        name: task.name.clone(),
        items: task.items.clone(),
    }];
    let run = run_tasks(&m.model, &m.tokenizer, &tasks, &cfg, &mut |_, _| {
        ControlFlow::Continue(())
    })
    .expect("iv run");
    let t = &run.tasks[0];
    assert!(
        t.clean_accuracy > 0.0,
        "some capitals are known with 10 shots"
    );
    assert!(t.sizes.filter > 0);
    assert_eq!(t.top.len(), 10);
    assert_eq!(t.iv.len(), 576);
    assert!(t.iv_norm.is_finite() && t.iv_norm > 0.0);
    let trial = &t.ie_trials[0];
    let (h, dh) = (run.heads, run.head_dim);
    let ids = Tensor::new(trial.ids.as_slice(), &candle_core::Device::Cpu)
        .and_then(|x| x.unsqueeze(0))
        .expect("ids");
    let p_of = |editor: &mut Editor| -> f32 {
        let logits = m
            .model
            .forward_hooked(&ids, editor)
            .expect("forward")
            .squeeze(0)
            .and_then(|x| x.get(trial.ids.len() - 1))
            .and_then(|x| x.to_vec1::<f32>())
            .expect("logits");
        softmax(&logits)[trial.target[0] as usize]
    };
    let p0 = p_of(&mut Editor::new(Vec::new()));
    assert!((p0 - trial.p).abs() < 1e-5, "{p0} vs {}", trial.p);
    let best = t.top[0];
    for (l, k) in [(best.layer, best.head), (0, 0), (29, 8)] {
        let start = (l * h + k) * dh;
        let value = Tensor::from_slice(&t.means[start..start + dh], dh, &candle_core::Device::Cpu)
            .expect("mean");
        let mut editor = Editor::new(vec![Edit {
            point: HookPoint::HeadOut(l),
            positions: Positions::List(vec![trial.ids.len() as isize - 1]),
            heads: Some(vec![k]),
            op: EditOp::Replace(value),
        }]);
        let full = p_of(&mut editor) - p0;
        let fast = trial.ie[l * h + k];
        assert!(
            (full - fast).abs() < 1e-5,
            "head {l}:{k}: full {full} vs fast {fast}"
        );
    }
}

#[test]
fn knowledge_consistency_on_the_demo_model_with_the_shipped_questions() {
    use tunelens::worker::knowledge::{
        run_knowledge, KnowledgeConfig, KnowledgeSettings, QuestionSource, TunedTemplate,
        SHIPPED_SET,
    };
    let m = demo();
    let settings = |tuned_template| KnowledgeSettings {
        questions: vec![QuestionSource::Shipped(SHIPPED_SET.to_owned())],
        dev: Vec::new(),
        config: KnowledgeConfig {
            tuned_template,
            max_questions: Some(1),
            ..KnowledgeConfig::default()
        },
    };
    let go = |t| {
        run_knowledge(m, m, &settings(t), &mut None, &mut |_, _| {
            ControlFlow::Continue(())
        })
    };
    // The model against itself under the same prompt: rho = 1, KL = 0.
    let same = go(TunedTemplate::Base).expect("runs");
    assert_eq!(same.overall.questions, 10);
    assert_eq!(same.subjects.len(), 10);
    for q in &same.questions {
        assert_eq!(q.base.len(), 4);
        assert!((q.rho - 1.0).abs() < 1e-9, "{q:?}");
        assert!(q.kl.abs() < 1e-9, "{q:?}");
    }
    assert!(same
        .example_base_prompt
        .contains("multiple choice questions about  author. Please choose the correct answer."));
    // Its own chat template, 0-shot: finite values, probabilities that sum to 1.
    let chat = go(TunedTemplate::Chat).expect("runs");
    for q in &chat.questions {
        assert!((q.tuned.iter().sum::<f64>() - 1.0).abs() < 1e-9);
        assert!(
            q.rho.is_finite() && q.kl.is_finite() && q.cosine.is_finite(),
            "{q:?}"
        );
    }
    assert!(chat.example_tuned_prompt.contains("<|im_start|>user"));
    assert!(chat.overall.kl > 0.0);
}

/// METHODS.md §6 on the demo model, on transformers' own greedy responses: the teacher-forced
/// pass equals AlignTDS's per-token loop, the aligned top-1 is the greedy response token at
/// every position (so TR's `LA[0]` is the response token), and the model against itself in
/// the same context never shifts.
#[test]
fn token_shift_on_the_demo_model_against_transformers_greedy_responses() {
    use tunelens::analysis::shift::{
        response_tops, response_tops_loop, shift_response, ShiftConfig, ShiftSide, K_SAVE,
    };
    let m = demo();
    for case in golden("generate.json")["generate"]
        .as_array()
        .expect("cases")
    {
        let prompt = case["prompt"].as_str().expect("prompt");
        let (_, context) = render_prompt(m, prompt, true).expect("renders");
        let new_ids = u32s(&case["new_ids"]);
        let fast = response_tops(&m.model, &m.tokenizer, &context, &new_ids, K_SAVE).expect("tf");
        let slow =
            response_tops_loop(&m.model, &m.tokenizer, &context, &new_ids, K_SAVE).expect("loop");
        for (t, (f, s)) in fast.iter().zip(&slow).enumerate() {
            assert_eq!(f[0].id, new_ids[t], "greedy token at {t}");
            assert_eq!(f[0].id, s[0].id);
            for (a, b) in f.iter().zip(s) {
                assert!(
                    (a.logit - b.logit).abs() < 1e-3,
                    "position {t}: {} vs {}",
                    a.logit,
                    b.logit
                );
            }
        }
        let side = ShiftSide {
            model: &m.model,
            tokenizer: &m.tokenizer,
            context: &context,
        };
        let text = case["new_text"].as_str().expect("text");
        let r = shift_response(side, side, text, &ShiftConfig::default()).expect("shift");
        assert!(r.positions.iter().all(|p| p.tr == 0 && p.kl == 0.0));
    }
}

/// The logit lens's last layer is the model's own read-out: its top token at every position
/// is transformers' top-1, and the probabilities at the last position are the softmax of
/// transformers' logits.
#[test]
fn logit_lens_last_layer_matches_transformers() {
    use tunelens::analysis::lens::logit_lens;
    let m = demo();
    for case in golden("forward.json")["forward"].as_array().expect("cases") {
        let ids = u32s(&case["ids"]);
        let golden_top = case["top_k"].as_array().expect("top_k");
        for (pos, theirs) in golden_top.iter().enumerate() {
            let curve = logit_lens(&m.model, &m.tokenizer, &ids, pos, None).expect("lens");
            let last = curve.points.last().expect("layers");
            assert_eq!(
                u64::from(curve.target_id),
                theirs[0][0].as_u64().expect("id")
            );
            assert_eq!(last.rank, 1);
            assert_eq!(curve.points.len(), m.model.layers.len());
        }
        let logits: Vec<f64> = case["logits_last"]
            .as_array()
            .expect("logits")
            .iter()
            .map(|v| v.as_f64().expect("f"))
            .collect();
        let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = logits.iter().map(|v| (v - max).exp()).sum();
        let top = golden_top.last().expect("positions")[0][0]
            .as_u64()
            .expect("id") as usize;
        let p = (logits[top] - max).exp() / sum;
        let curve = logit_lens(&m.model, &m.tokenizer, &ids, ids.len() - 1, None).expect("lens");
        let ours = f64::from(curve.points.last().expect("layers").prob);
        assert!((ours - p).abs() < 2e-3, "{ours} vs {p}");
    }
}
