//! Analyses on the tiny model (identities, finite differences) and on the demo model against
//! the Hugging Face goldens.

use std::ops::ControlFlow;

use candle_core::{DType, Device, Tensor, D};
use rand::{Rng as _, SeedableRng as _};
use tunelens::analysis::attribution::{attribute, AttributionConfig};
use tunelens::model::lora::LoraAdapter;
use tunelens::model::tiny::{tiny_config, tiny_model_with, tiny_options};
use tunelens::model::transformer::{ForwardOptions, Input};
use tunelens::model::{load, LoadOptions, ModelSpec, NoHook};

use crate::common::{demo_model_path, golden, tiny_f64};

fn go(_: f32) -> ControlFlow<()> {
    ControlFlow::Continue(())
}

#[test]
fn raw_attribution_matches_finite_differences() -> anyhow::Result<()> {
    let m = tiny_f64(21);
    let prompt = "summarize the text in one sentence";
    let response = "the cat sat on the mat";
    let result = attribute(
        &m.model,
        &m.tokenizer,
        prompt,
        response,
        None,
        &AttributionConfig::default(),
        &mut go,
    )?;
    let (n_in, n_out) = (result.input_ids.len(), result.output_ids.len());
    assert_eq!((n_in, n_out), (6, 6));
    let mut ids = vec![1u32];
    ids.extend(&result.input_ids);
    ids.extend(&result.output_ids);
    let id_tensor = Tensor::new(ids.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
    let x0: Vec<f64> = m.model.embed(&id_tensor)?.flatten_all()?.to_vec1()?;
    let d = 16;
    let prob = |x: &[f64], j: usize| -> anyhow::Result<f64> {
        let x = Tensor::from_vec(x.to_vec(), (1, ids.len(), d), &Device::Cpu)?;
        let logits = m.model.run(
            Input::Embeds(&x),
            &ForwardOptions::default(),
            None,
            &mut NoHook,
        )?;
        let p = candle_nn::ops::softmax(&logits.squeeze(0)?.get(n_in + j)?, D::Minus1)?;
        Ok(p.get(result.output_ids[j] as usize)?.to_scalar::<f64>()?)
    };
    let eps = 1e-5;
    let scale = result.raw.data.iter().fold(0f32, |a, &v| a.max(v.abs()));
    assert!(scale > 1e-4, "a non-trivial matrix");
    for j in [0usize, 3, 5] {
        for i in 0..n_in {
            let mut numeric = 0.0;
            for c in 0..d {
                let idx = (1 + i) * d + c;
                let mut plus = x0.clone();
                plus[idx] += eps;
                let mut minus = x0.clone();
                minus[idx] -= eps;
                numeric += x0[idx] * (prob(&plus, j)? - prob(&minus, j)?) / (2.0 * eps);
            }
            let analytic = f64::from(result.raw.get(i, j));
            assert!(
                (numeric - analytic).abs() < 1e-6 * f64::from(scale).max(1.0),
                "A_raw[{i},{j}]: numeric {numeric:e}, analytic {analytic:e}"
            );
        }
    }
    Ok(())
}

/// A random adapter for a `(out, in)` layer, so LoRA changes the function.
fn random_adapter(rng: &mut rand::rngs::StdRng, out: usize, inp: usize) -> LoraAdapter {
    let mut values =
        |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-0.3..0.3)).collect() };
    LoraAdapter {
        a: Tensor::from_vec(values(2 * inp), (2, inp), &Device::Cpu).unwrap(),
        b: Tensor::from_vec(values(out * 2), (out, 2), &Device::Cpu).unwrap(),
        scale: 0.7,
        dropout: None,
    }
}

/// The batched hand-written backward against candle's autograd, one backward per token, on
/// tiny models with grouped-query attention, biases, tied embeddings, LoRA adapters and several
/// batch sizes (one batch, uneven batches, one token per batch).
#[test]
fn batched_backward_matches_autograd() -> anyhow::Result<()> {
    let mut cfg = tiny_config();
    cfg.qkv_bias = true;
    for (variant, tied) in [(0u64, false), (1, true)] {
        cfg.tie_word_embeddings = tied;
        let mut m = tiny_model_with(&cfg, 30 + variant, &tiny_options(DType::F32))?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(7 + variant);
        for layer in &mut m.model.layers {
            layer
                .self_attn
                .q_proj
                .attach(random_adapter(&mut rng, 16, 16))?;
            layer
                .self_attn
                .v_proj
                .attach(random_adapter(&mut rng, 8, 16))?;
            layer
                .mlp
                .down_proj
                .attach(random_adapter(&mut rng, 16, 32))?;
        }
        let prompt = "write a short poem about the sea and the sky";
        let response = "the sea is blue and the sky is wide";
        let reference = attribute(
            &m.model,
            &m.tokenizer,
            prompt,
            response,
            None,
            &AttributionConfig {
                autograd: true,
                ..AttributionConfig::default()
            },
            &mut go,
        )?;
        let scale = reference.raw.data.iter().fold(0f32, |a, &v| a.max(v.abs()));
        assert!(scale > 1e-4, "a non-trivial matrix");
        for use_lora in [true, false] {
            for batch_size in [16, 3, 1] {
                let cfg = AttributionConfig {
                    batch_size,
                    use_lora,
                    ..AttributionConfig::default()
                };
                let expected = if use_lora {
                    reference.clone()
                } else {
                    let cfg = AttributionConfig {
                        autograd: true,
                        ..cfg.clone()
                    };
                    attribute(
                        &m.model,
                        &m.tokenizer,
                        prompt,
                        response,
                        None,
                        &cfg,
                        &mut go,
                    )?
                };
                let ours = attribute(
                    &m.model,
                    &m.tokenizer,
                    prompt,
                    response,
                    None,
                    &cfg,
                    &mut go,
                )?;
                let worst = ours
                    .raw
                    .data
                    .iter()
                    .zip(&expected.raw.data)
                    .fold(0f32, |a, (x, y)| a.max((x - y).abs()));
                assert!(
                    worst < 1e-5 * scale.max(1.0),
                    "tied {tied}, lora {use_lora}, batch {batch_size}: off by {worst:e} (scale {scale:e})"
                );
                assert_eq!(ours.quantized, expected.quantized);
            }
        }
    }
    Ok(())
}

#[test]
fn attribution_matches_the_transformers_golden() -> anyhow::Result<()> {
    let case = &golden("attribute.json")["attribute"][0];
    let spec = ModelSpec::parse(&demo_model_path().display().to_string());
    let demo = load(&spec, &LoadOptions::default())?;
    let prompt = case["prompt"].as_str().unwrap_or_default();
    let response = case["response"].as_str().unwrap_or_default();
    let ours = attribute(
        &demo.model,
        &demo.tokenizer,
        prompt,
        response,
        None,
        &AttributionConfig::default(),
        &mut go,
    )?;
    let ids = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    assert_eq!(ours.input_ids, ids(&case["input_ids"]));
    assert_eq!(ours.output_ids, ids(&case["output_ids"]));
    let matrix = |v: &serde_json::Value| -> Vec<Vec<f64>> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|r| {
                r.as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap())
                    .collect()
            })
            .collect()
    };
    let raw = matrix(&case["raw"]);
    let quantized = matrix(&case["quantized"]);
    let largest = raw.iter().flatten().fold(0f64, |a, v| a.max(v.abs()));
    let mut worst: f64 = 0.0;
    let mut boundary_exceptions = 0;
    for (i, row) in raw.iter().enumerate() {
        for (j, &theirs) in row.iter().enumerate() {
            worst = worst.max((f64::from(ours.raw.get(i, j)) - theirs).abs() / largest);
            if f64::from(ours.quantized.get(i, j)) != quantized[i][j] {
                // Allowed only where the reference sits within 1e-4 of a level boundary.
                let col_max = raw.iter().map(|r| r[j].max(0.0)).fold(0.0, f64::max);
                let level = 10.0 * theirs.max(0.0) / (col_max + 1e-7);
                assert!(
                    (level - level.round()).abs() < 1e-4 * 10.0,
                    "Q[{i},{j}] differs away from a boundary"
                );
                boundary_exceptions += 1;
            }
        }
    }
    assert!(
        worst < 1e-3,
        "raw matrix differs by {worst:e} of its largest entry"
    );
    if boundary_exceptions == 0 {
        let density: Vec<f64> = case["density"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        for (a, b) in ours.density.iter().zip(&density) {
            assert!((f64::from(*a) - b).abs() < 1e-5, "density {a} vs {b}");
        }
    }
    Ok(())
}

/// The tiny model (seed 3) with non-zero seeded adapters on q_proj, k_proj and down_proj of
/// every layer: the "base + adapter" a researcher loads into slot B.
fn tiny_with_qk_down_adapters() -> tunelens::model::LoadedModel {
    let mut loaded = crate::common::tiny(3);
    let mut rng = rand::rngs::StdRng::seed_from_u64(17);
    for layer in &mut loaded.model.layers {
        layer
            .self_attn
            .q_proj
            .attach(random_adapter(&mut rng, 16, 16))
            .expect("q adapter fits");
        layer
            .self_attn
            .k_proj
            .attach(random_adapter(&mut rng, 8, 16))
            .expect("k adapter fits");
        layer
            .mlp
            .down_proj
            .attach(random_adapter(&mut rng, 16, 32))
            .expect("down adapter fits");
    }
    loaded
}

fn tiny_word_list() -> tunelens::analysis::words::WordList {
    let dir = tempfile::tempdir().expect("temp dir");
    tunelens::wordfiles::load_word_list(&crate::common::tiny_words(dir.path()))
        .expect("tiny word list")
}

/// Concepts and head pairs of one model, computed directly (no cache).
fn weight_results(
    loaded: &tunelens::model::LoadedModel,
    words: &tunelens::analysis::words::WordList,
) -> anyhow::Result<(
    tunelens::analysis::ffn_concepts::Concepts,
    tunelens::analysis::head_pairs::HeadPairs,
)> {
    use tunelens::analysis::{ffn_concepts, head_pairs};
    let ccfg = ffn_concepts::ConceptsConfig {
        top_k: 5,
        max_rank: 16,
    };
    let concepts = ffn_concepts::ffn_concepts(
        &loaded.model,
        &loaded.tokenizer,
        words,
        &ccfg,
        &mut |_, _| ControlFlow::Continue(()),
    )?;
    let hcfg = head_pairs::HeadsConfig {
        top_k: 6,
        threshold_words: 20,
        z: 0.0,
    };
    let space = head_pairs::model_semantic_space(&loaded.model, &loaded.tokenizer, words, &hcfg)?;
    let pairs = head_pairs::head_pairs(
        &loaded.model,
        &loaded.tokenizer,
        words,
        &space,
        &hcfg,
        &mut |_, _| ControlFlow::Continue(()),
    )?;
    Ok((concepts, pairs))
}

/// Largest difference of the variance ratios and word scores of two concept results, and
/// whether every component names the same top words.
fn concepts_diff(
    a: &tunelens::analysis::ffn_concepts::Concepts,
    b: &tunelens::analysis::ffn_concepts::Concepts,
) -> (f64, bool) {
    let mut max = 0f64;
    let mut same_words = true;
    for (la, lb) in a.layers.iter().zip(&b.layers) {
        for (x, y) in la.ratios.iter().zip(&lb.ratios) {
            max = max.max((x - y).abs());
        }
        for (ca, cb) in la.components.iter().zip(&lb.components) {
            let wa: Vec<u32> = ca.words.iter().map(|w| w.word).collect();
            let wb: Vec<u32> = cb.words.iter().map(|w| w.word).collect();
            same_words &= wa == wb;
            for (x, y) in ca.words.iter().zip(&cb.words) {
                max = max.max(f64::from((x.score - y.score).abs()));
            }
        }
    }
    (max, same_words)
}

/// Largest difference of the dimension energies of two head-pair results, and whether every
/// dimension keeps the same word pairs.
fn heads_diff(
    a: &tunelens::analysis::head_pairs::HeadPairs,
    b: &tunelens::analysis::head_pairs::HeadPairs,
) -> (f64, bool) {
    let mut max = 0f64;
    let mut same_pairs = true;
    for (la, lb) in a.layers.iter().zip(&b.layers) {
        for (da, db) in la.dims.iter().zip(&lb.dims) {
            max = max.max(f64::from((da.energy - db.energy).abs()));
            let pa: Vec<(u32, u32)> = da.pairs.iter().map(|p| (p.key, p.query)).collect();
            let pb: Vec<(u32, u32)> = db.pairs.iter().map(|p| (p.key, p.query)).collect();
            same_pairs &= da.head == db.head && da.dim == db.dim && pa == pb;
        }
    }
    (max, same_pairs)
}

/// Issue: the weight views read `W`, not `W + scale·B A`, so base vs base + adapter showed no
/// difference. Adapters on q/k/down must change the concepts and head pairs, exactly as
/// merging them into the weights does.
#[test]
fn weight_analyses_read_adapted_weights_like_the_merged_model() -> anyhow::Result<()> {
    let words = tiny_word_list();
    let base = crate::common::tiny(3);
    let adapted = tiny_with_qk_down_adapters();
    let mut merged = adapted.clone();
    let n = tunelens::model::save::merge_adapters(&mut merged.model)?;
    assert_eq!(n, 9, "3 layers × q, k, down");

    let (c_base, h_base) = weight_results(&base, &words)?;
    let (c_adapted, h_adapted) = weight_results(&adapted, &words)?;
    let (c_merged, h_merged) = weight_results(&merged, &words)?;

    let (d, _) = concepts_diff(&c_base, &c_adapted);
    assert!(
        d > 1e-3,
        "the adapter on down_proj changes the concepts ({d})"
    );
    let (d, same) = concepts_diff(&c_adapted, &c_merged);
    assert!(d < 1e-5, "adapted vs merged concepts differ by {d}");
    assert!(same, "adapted and merged concepts name the same words");

    let (d, _) = heads_diff(&h_base, &h_adapted);
    assert!(
        d > 1e-3,
        "the adapters on q/k change the head energies ({d})"
    );
    let (d, same) = heads_diff(&h_adapted, &h_merged);
    assert!(d < 1e-5, "adapted vs merged head energies differ by {d}");
    assert!(same, "adapted and merged heads keep the same pairs");
    Ok(())
}

/// The result cache keys cover the adapter: base + adapter never reads the base's entry, and an
/// adapter with other values never reads another adapter's.
#[test]
fn weight_cache_keys_include_the_adapter() -> anyhow::Result<()> {
    use tunelens::analysis::ffn_concepts::ConceptsConfig;
    use tunelens::analysis::head_pairs::HeadsConfig;
    use tunelens::worker::weights::{concepts_cached, heads_cached, CachePolicy, Semantic};
    let words = tiny_word_list();
    let cache = tempfile::tempdir()?;
    let policy = CachePolicy::Dir(cache.path().to_path_buf());
    let ccfg = ConceptsConfig {
        top_k: 5,
        max_rank: 16,
    };
    let hcfg = HeadsConfig {
        top_k: 6,
        threshold_words: 20,
        z: 0.0,
    };
    let concepts = |m: &tunelens::model::LoadedModel| {
        concepts_cached(m, &words, &ccfg, &policy, &mut |_, _| {
            ControlFlow::Continue(())
        })
    };
    let heads = |m: &tunelens::model::LoadedModel| {
        heads_cached(
            m,
            &words,
            &Semantic::ModelEmbeddings,
            &hcfg,
            &policy,
            &mut |_, _| ControlFlow::Continue(()),
        )
    };
    let base = crate::common::tiny(3);
    let adapted = tiny_with_qk_down_adapters();
    let (c_base, hit) = concepts(&base)?;
    assert!(!hit);
    let (h_base, hit) = heads(&base)?;
    assert!(!hit);
    let (c_adapted, hit) = concepts(&adapted)?;
    assert!(!hit, "base + adapter must not hit the base's concepts");
    let (h_adapted, hit) = heads(&adapted)?;
    assert!(!hit, "base + adapter must not hit the base's head pairs");
    assert!(concepts_diff(&c_base, &c_adapted).0 > 1e-3);
    assert!(heads_diff(&h_base, &h_adapted).0 > 1e-3);
    // Same adapter again: a hit with the same result.
    let (again, hit) = concepts(&adapted)?;
    assert!(hit);
    let (d, same) = concepts_diff(&again, &c_adapted);
    assert!(d < 1e-12 && same, "cached concepts differ by {d}");
    // Another adapter (B scaled) on the same base: a miss.
    let mut other = adapted.clone();
    if let Some(lora) = other.model.layers[2].mlp.down_proj.lora.as_mut() {
        lora.b = (&lora.b * 2.0)?;
    }
    assert!(
        !concepts(&other)?.1,
        "a different adapter is a different entry"
    );
    Ok(())
}

/// A tiny in-context task in the tiny vocabulary, written to `dir`.
fn tiny_task_file(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("shift7.json");
    std::fs::write(&path, tunelens::model::tiny::tiny_icl_task_json()).unwrap();
    path
}

fn tiny_iv_settings(task: std::path::PathBuf) -> tunelens::worker::iv::IvSettings {
    let mut config = tunelens::analysis::iv::IvConfig::todd();
    config.shots = 3;
    config.mean_shots = 3;
    config.eval_shots = 3;
    config.n_mean = 6;
    config.n_ie = 3;
    config.n_test = Some(5);
    config.record_trials = true;
    tunelens::worker::iv::IvSettings {
        tasks: vec![tunelens::worker::iv::TaskSource::File(task)],
        config,
    }
}

/// METHODS.md §4 end to end on base vs base + adapter, through the worker's job path: both
/// runs complete, B's effects differ from A's, a run is reproducible from its seed, the fast
/// effects equal Todd's full patched forwards on the recorded trials, a saved vector loads back
/// and flags another model, and steering with it changes generation.
#[test]
fn instruction_vectors_of_base_and_base_plus_adapter() -> anyhow::Result<()> {
    use tunelens::analysis::icl::PromptIds;
    use tunelens::analysis::iv::{indirect_effects_full, PatchOp};
    use tunelens::worker::{run_job, Job, JobOutput, Slot, SteerRequest, WorkerCtx};

    let dir = tempfile::tempdir()?;
    let task = tiny_task_file(dir.path());
    let mut ctx = WorkerCtx {
        a: Some(crate::common::tiny(3)),
        b: Some(tiny_with_qk_down_adapters()),
        ..WorkerCtx::default()
    };
    let job = || Job::InstructionVectors {
        slots: vec![Slot::A, Slot::B],
        settings: tiny_iv_settings(task.clone()),
    };
    let JobOutput::InstructionVectors(out) = run_job(&mut ctx, 1, job(), &mut |_| {})? else {
        panic!("not an IV output");
    };
    assert_eq!(out.results.len(), 2);
    let (a, b) = (&out.results[0].run.tasks[0], &out.results[1].run.tasks[0]);
    assert_eq!(a.aie.len(), 3 * 4);
    assert_eq!(a.top.len(), 10);
    assert_eq!(a.iv.len(), 16);
    assert!(a.iv_norm > 0.0 && a.iv_norm.is_finite());
    assert_eq!(out.shared.len(), 1);
    let diff = a
        .aie
        .iter()
        .zip(&b.aie)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(diff > 1e-5, "the adapter must change the effects ({diff})");
    assert_ne!(out.results[0].fingerprint, out.results[1].fingerprint);
    let e = a.evaluation.as_ref().expect("evaluated");
    assert_eq!(e.layers.len(), 3);
    assert!(e.n > 0);
    // Reproducible from the seed.
    let JobOutput::InstructionVectors(again) = run_job(&mut ctx, 2, job(), &mut |_| {})? else {
        panic!("not an IV output");
    };
    assert_eq!(again.results[1].run.tasks[0].aie, b.aie);
    // The fast last-position effects equal Todd's loop on B's recorded trials.
    let b_model = &ctx.b.as_ref().unwrap().model;
    assert_eq!(b.ie_trials.len(), 3);
    for trial in &b.ie_trials {
        let prompt = PromptIds {
            ids: trial.ids.clone(),
            target: trial.target.clone(),
        };
        let (p, full) = indirect_effects_full(b_model, &prompt, &b.means, PatchOp::Replace)?;
        assert!((p - trial.p).abs() < 1e-6);
        for (x, y) in full.iter().zip(&trial.ie) {
            assert!((x - y).abs() < 1e-5, "full {x} vs fast {y}");
        }
    }
    // Save B's vector, load it back, check it against both models.
    let path = dir.path().join("vectors").join("iv.safetensors");
    let JobOutput::SavedIv(files) = run_job(
        &mut ctx,
        3,
        Job::SaveIv {
            output: out.clone(),
            model: 1,
            task: 0,
            path: path.clone(),
        },
        &mut |_| {},
    )?
    else {
        panic!("not saved");
    };
    assert_eq!(files.len(), 2);
    assert!(dir.path().join("vectors").join("iv.json").exists());
    let saved = tunelens::ivfile::load(&path)?;
    assert_eq!(saved.vector, b.iv);
    assert_eq!(saved.means.len(), 3 * 4 * 4);
    assert_eq!(saved.meta.head_list.len(), 10);
    let fp_b = &out.results[1].fingerprint;
    assert_eq!(
        tunelens::ivfile::check_model(&saved, 16, 3, fp_b, "B")?,
        None
    );
    let warning = tunelens::ivfile::check_model(&saved, 16, 3, &out.results[0].fingerprint, "A")?;
    assert!(warning.is_some_and(|w| w.contains("not with these weights")));
    let err = tunelens::ivfile::check_model(&saved, 32, 3, fp_b, "other").unwrap_err();
    assert!(err.to_string().contains("hidden size 16"), "{err}");
    // Steering changes what B generates.
    let generate = |steer: Option<SteerRequest>| Job::Generate {
        slots: vec![Slot::B],
        prompt: "the cat".to_owned(),
        chat: false,
        cfg: tunelens::model::generate::GenerateConfig {
            max_new_tokens: 6,
            stop_at_eos: false,
            ..Default::default()
        },
        steer,
        live_shift: None,
    };
    let JobOutput::Generated(plain) = run_job(&mut ctx, 4, generate(None), &mut |_| {})? else {
        panic!("not generated");
    };
    let request = SteerRequest {
        path: path.clone(),
        layer: Some(0),
        scale: 200.0,
        every_token: true,
    };
    let JobOutput::Generated(steered) = run_job(&mut ctx, 5, generate(Some(request)), &mut |_| {})?
    else {
        panic!("not generated");
    };
    assert!(steered[0]
        .steering
        .as_deref()
        .is_some_and(|n| n.contains("layer 0")));
    assert_ne!(plain[0].new_ids, steered[0].new_ids);
    Ok(())
}

/// Bad task files give one line naming the file and the item.
#[test]
fn bad_task_files_are_named() -> anyhow::Result<()> {
    use tunelens::worker::iv::{load_task, load_tasks, TaskSource};
    let dir = tempfile::tempdir()?;
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let cases = [
        (write("obj.json", "{\"input\": 1}"), "JSON list"),
        (write("empty.json", "[]"), "no examples"),
        (
            write(
                "missing.json",
                r#"[{"input":"a","output":"b"},{"input":"c"}]"#,
            ),
            "item 1: missing field `output`",
        ),
        (write("broken.json", "[{\"input\": "), "(line 1, column"),
    ];
    for (path, expected) in cases {
        let err = load_task(&TaskSource::File(path.clone()))
            .unwrap_err()
            .to_string();
        assert!(err.contains(expected), "{err}");
        assert!(err.contains(&path.display().to_string()), "{err}");
        assert!(!err.contains('\n'));
    }
    // Too few examples for the shots.
    let small = write(
        "small.json",
        r#"[{"input":"a","output":"b"},{"input":"c","output":"d"}]"#,
    );
    let settings = tunelens::worker::iv::IvSettings {
        tasks: vec![TaskSource::File(small)],
        config: tunelens::analysis::iv::IvConfig::todd(),
    };
    let err = load_tasks(&settings).unwrap_err().to_string();
    assert!(err.contains("fewer than the 10 shots"), "{err}");
    let err = load_task(&TaskSource::Shipped("nope".into()))
        .unwrap_err()
        .to_string();
    assert!(err.contains("antonym"), "{err}");
    Ok(())
}

/// METHODS.md §5.3 and §5.5 through the job path on the tiny model: a vector found and saved
/// as a researcher would, a two-stage plan (plain, then IV-guided) trained, each stage's
/// combined adapter equal to merging the stages in order, a finished plan found finished on
/// rerun, and the forgetting evaluation of the base and both stages.
#[test]
fn continual_stages_with_guidance_and_forgetting() -> anyhow::Result<()> {
    use tunelens::model::adapter::{attach_peft_adapter, merge_adapters};
    use tunelens::train::checkpoint::DataSettings;
    use tunelens::train::dataset::PromptTemplate;
    use tunelens::train::settings::{GuidanceSettings, TrainSettings};
    use tunelens::train::stages::{read_plan, write_plan, Stage, StagePlan};
    use tunelens::worker::forgetting::ForgettingRequest;
    use tunelens::worker::{run_job, Job, JobOutput, Slot, WorkerCtx};

    let dir = tempfile::tempdir()?;
    let task = tiny_task_file(dir.path());
    let mut ctx = WorkerCtx {
        a: Some(crate::common::tiny(3)),
        ..WorkerCtx::default()
    };
    let JobOutput::InstructionVectors(out) = run_job(
        &mut ctx,
        1,
        Job::InstructionVectors {
            slots: vec![Slot::A],
            settings: tiny_iv_settings(task.clone()),
        },
        &mut |_| {},
    )?
    else {
        panic!("not an IV output");
    };
    let iv = dir.path().join("shift7.iv.safetensors");
    run_job(
        &mut ctx,
        2,
        Job::SaveIv {
            output: out,
            model: 0,
            task: 0,
            path: iv.clone(),
        },
        &mut |_| {},
    )?;
    // Training data: the task's pairs with a definition (the §5.1 template).
    let pairs: Vec<serde_json::Value> =
        serde_json::from_str(&tunelens::model::tiny::tiny_icl_task_json())?;
    let data = dir.path().join("train.jsonl");
    let lines: Vec<String> = pairs
        .iter()
        .map(|p| {
            serde_json::json!({"instruction": "shift the word", "input": p["input"], "output": p["output"]})
                .to_string()
        })
        .collect();
    std::fs::write(&data, lines.join("\n"))?;
    let mut settings = TrainSettings {
        steps: 2,
        batch_size: 2,
        learning_rate: 1e-2,
        eval_every: 0,
        save_every: 1,
        ..TrainSettings::default()
    };
    settings.lora.dropout = 0.0;
    let stage = |name: &str, guidance: Option<GuidanceSettings>| Stage {
        name: name.to_owned(),
        data: DataSettings {
            path: data.clone(),
            template: PromptTemplate::Definition,
            max_len: 64,
            validation_fraction: 0.0,
        },
        settings: TrainSettings {
            guidance,
            ..settings.clone()
        },
    };
    let guided = GuidanceSettings {
        layer: 1,
        kl_threshold: 0.0,
        mse_threshold: 0.0,
        ..GuidanceSettings::code(iv.clone())
    };
    let plan = StagePlan {
        stages: vec![stage("first", None), stage("second", Some(guided))],
    };
    // The plan file round-trips.
    let plan_path = dir.path().join("plan.json");
    write_plan(&plan_path, &plan)?;
    assert_eq!(read_plan(&plan_path)?, plan);
    let out_dir = dir.path().join("run");
    let job = || Job::TrainStages {
        slot: Slot::A,
        plan: Box::new(plan.clone()),
        out: out_dir.clone(),
    };
    let mut stages_seen = Vec::new();
    let JobOutput::StagesTrained(first) = run_job(&mut ctx, 3, job(), &mut |e| {
        if let tunelens::worker::Event::Train {
            update: tunelens::worker::train::TrainUpdate::Stage { index, .. },
            ..
        } = e
        {
            stages_seen.push(index);
        }
    })?
    else {
        panic!("not a stages output");
    };
    assert_eq!(stages_seen, [0, 1]);
    assert_eq!(first.runs.len(), 2);
    assert!(!first.cancelled);
    assert_eq!(first.runs[0].1.state.history[0].terms.len(), 1);
    let guided_terms: Vec<&str> = first.runs[1].1.state.history[0]
        .terms
        .iter()
        .map(|(n, _)| n.as_str())
        .collect();
    assert_eq!(guided_terms, ["ce", "kl1", "kl2", "pr"]);
    assert!(first.runs[1]
        .1
        .state
        .history
        .iter()
        .all(|r| r.terms[2].1 > 0.0));
    // Stage 2's combined adapter equals the base with both stages merged in order.
    let base = ctx.a.as_ref().unwrap().model.clone();
    let mut merged = base.clone();
    for adapter in &first.adapters {
        attach_peft_adapter(&mut merged, adapter)?;
        merge_adapters(&mut merged)?;
    }
    let mut combined = base.clone();
    attach_peft_adapter(&mut combined, &first.combined[1])?;
    let ids = crate::common::ids_tensor(&[1, 5, 9, 13, 17, 21]);
    let (m, c) = (merged.forward(&ids)?, combined.forward(&ids)?);
    assert!(crate::common::max_abs_diff(&m, &c) < 1e-4);
    assert!(crate::common::max_abs_diff(&m, &base.forward(&ids)?) > 1e-4);
    // A finished plan is found finished.
    let JobOutput::StagesTrained(again) = run_job(&mut ctx, 4, job(), &mut |_| {})? else {
        panic!("not a stages output");
    };
    assert!(again.runs.is_empty());
    assert_eq!(again.combined, first.combined);
    // Forgetting: base and both stages on an evaluation set in FvForgetting's format.
    let set = dir.path().join("task_shift.json");
    let items: Vec<serde_json::Value> = pairs
        .iter()
        .take(6)
        .map(|p| serde_json::json!({"input": p["input"], "output": p["output"]}))
        .collect();
    std::fs::write(&set, serde_json::to_string(&items)?)?;
    let stages: Vec<(String, std::path::PathBuf)> = first
        .adapters
        .iter()
        .enumerate()
        .map(|(i, a)| (format!("stage {}", i + 1), a.clone()))
        .collect();
    let JobOutput::Forgetting(report) = run_job(
        &mut ctx,
        5,
        Job::Forgetting {
            slot: Slot::A,
            request: Box::new(ForgettingRequest {
                sets: vec![set],
                stages,
                max_items: 0,
            }),
        },
        &mut |_| {},
    )?
    else {
        panic!("not a forgetting report");
    };
    assert_eq!(report.models.len(), 3);
    assert_eq!(report.models[0].label, "base");
    let base_scores = &report.models[0];
    assert!(base_scores.task.is_some() && base_scores.general.is_none());
    assert_eq!(base_scores.forgetting(base_scores), [None, None, Some(0.0)]);
    for m in &report.models {
        assert_eq!(m.sets[0].items, 6);
        assert!((0.0..=1.0).contains(&m.sets[0].score));
        assert!(m.p_know > 0.0 && m.p_know <= 1.0);
    }
    // The stages changed the model: some probability moved.
    assert!((report.models[2].p_know - base_scores.p_know).abs() > 1e-6);
    // A bad set names its item before any model work.
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, r#"[{"input": "a", "output": "b"}, {"input": 1}]"#)?;
    let err = tunelens::worker::forgetting::load_sets(&ForgettingRequest {
        sets: vec![bad],
        ..ForgettingRequest::default()
    })
    .unwrap_err()
    .to_string();
    assert!(err.contains("bad.json") && err.contains("item 1"), "{err}");
    Ok(())
}

/// §9 on the demo model: the screened extraction check gives the full projection's rates, and
/// the attribute rate of a batched run (subject states shared between templates that open with
/// the subject) is the mean of the probes' rates run one by one.
#[test]
fn recall_screening_and_shared_subject_states_keep_the_results() -> anyhow::Result<()> {
    use std::collections::BTreeMap;
    use tunelens::analysis::prediction::{query, FactSet};
    use tunelens::analysis::recall::{
        factual_recall_with, ExtractionCheck, RecallConfig, RecallProbe,
    };
    use tunelens::worker::consistency::{DEFAULT_FACTS, DEFAULT_SUBJECTS};
    let m = load(
        &ModelSpec::parse(&demo_model_path().display().to_string()),
        &LoadOptions::default(),
    )?;
    let facts: FactSet = serde_json::from_str(DEFAULT_FACTS)?;
    let subjects: BTreeMap<String, String> = serde_json::from_str(DEFAULT_SUBJECTS)?;
    let mut probes = Vec::new();
    for rel in &facts.relations {
        for fact in rel.facts.iter().take(2) {
            for template in &rel.templates {
                let start = template.find("[X]").expect("template has [X]");
                probes.push(RecallProbe {
                    relation: rel.relation.clone(),
                    query: query(template, &fact.subject),
                    subject: (start, start + fact.subject.len()),
                    wiki: subjects.get(&fact.subject).cloned(),
                });
            }
        }
    }
    assert_eq!(probes.len(), 100);
    let run = |probes: &[RecallProbe], cfg: &RecallConfig, check| {
        factual_recall_with(&m.model, &m.tokenizer, probes, cfg, 8, check, &mut go)
    };
    let cfg = RecallConfig::default();
    let screened = run(&probes, &cfg, ExtractionCheck::Screened)?;
    assert_eq!(screened, run(&probes, &cfg, ExtractionCheck::Full)?);
    assert_eq!(screened.attribute_probes, 100);
    // With the final norm the last layer's output always extracts the answer and early layers
    // rarely do: the screen has both kinds of rows to decide.
    let normed = RecallConfig {
        extraction_final_norm: true,
        ..RecallConfig::default()
    };
    let with_norm = run(&probes, &normed, ExtractionCheck::Screened)?;
    assert_eq!(with_norm, run(&probes, &normed, ExtractionCheck::Full)?);
    let out = &with_norm.extraction_out;
    assert!(
        (out[out.len() - 1] - 100.0).abs() < 1e-9 && out[0] < 50.0,
        "{out:?}"
    );
    // The first two relations (capital, currency: templates that open with the subject share
    // its states) batched, against one probe at a time.
    // With the final norm before the lens, so the rates are not all zero.
    let few = &probes[..20];
    let cfg = RecallConfig {
        attribute_final_norm: true,
        ..RecallConfig::default()
    };
    let batched = run(few, &cfg, ExtractionCheck::Screened)?;
    assert!(
        batched.attribute_rate.iter().any(|&r| r > 0.0),
        "{:?}",
        batched.attribute_rate
    );
    let mut sum = vec![0f64; batched.attribute_rate.len()];
    for p in few {
        let one = run(std::slice::from_ref(p), &cfg, ExtractionCheck::Full)?;
        assert_eq!(one.attribute_probes, 1);
        for (s, r) in sum.iter_mut().zip(&one.attribute_rate) {
            *s += r;
        }
    }
    for (s, r) in sum.iter().zip(&batched.attribute_rate) {
        assert!((s / 20.0 - r).abs() < 1e-9, "{s} vs {r}");
    }
    Ok(())
}
