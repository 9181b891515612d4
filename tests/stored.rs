//! Weights kept as stored (`--weights stored`): tile-wise products on every stored kind against
//! the dense products of the same values, on whole tiny models; the demo model (Q4_1) kept as
//! stored against the transformers goldens and the f32 path.

use std::ops::ControlFlow;

use candle_core::quantized::GgmlDType;
use candle_core::{Tensor, Var, D};
use tunelens::analysis::attribution::{attribute, AttributionConfig};
use tunelens::model::generate::{generate, GenerateConfig};
use tunelens::model::tiny::{tiny_config, tiny_packed_pair};
use tunelens::model::transformer::{ForwardOptions, Input};
use tunelens::model::{
    load, LoadOptions, LoadedModel, ModelConfig, ModelSpec, NoHook, Weight, WeightStorage,
};
use tunelens::worker::runner::{forward_text, render_prompt};

use crate::common::{
    assert_one_line_error, demo_model_path, golden, ids_tensor, max_abs_diff, run_cli, u32s,
};

const KINDS: [GgmlDType; 10] = [
    GgmlDType::F16,
    GgmlDType::BF16,
    GgmlDType::Q4_0,
    GgmlDType::Q4_1,
    GgmlDType::Q5_0,
    GgmlDType::Q5_1,
    GgmlDType::Q8_0,
    GgmlDType::Q4K,
    GgmlDType::Q5K,
    GgmlDType::Q6K,
];

/// The tiny model widened so every matrix row is whole 256-weight K-quant blocks.
fn wide_config() -> ModelConfig {
    ModelConfig {
        hidden_size: 256,
        intermediate_size: 512,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 64,
        ..tiny_config()
    }
}

const IDS: [u32; 9] = [1, 5, 9, 17, 33, 4, 12, 60, 7];

fn go(_: f32) -> ControlFlow<()> {
    ControlFlow::Continue(())
}

/// Σ log p(next token) over the sequence from input embeddings, and its gradient with respect
/// to them (candle's autograd through the packed products' backward).
fn loss_and_embed_grad(m: &LoadedModel) -> anyhow::Result<(f64, Tensor)> {
    let ids = ids_tensor(&IDS);
    let embeds = Var::from_tensor(&m.model.embed(&ids)?)?;
    let opts = ForwardOptions {
        differentiable: true,
        ..ForwardOptions::default()
    };
    let logits = m
        .model
        .run(Input::Embeds(embeds.as_tensor()), &opts, None, &mut NoHook)?;
    let logp = candle_nn::ops::log_softmax(&logits.squeeze(0)?, D::Minus1)?;
    let next = Tensor::new(&IDS[1..], &candle_core::Device::Cpu)?;
    let picked = logp
        .narrow(0, 0, IDS.len() - 1)?
        .gather(&next.unsqueeze(1)?, 1)?
        .sum_all()?;
    let grads = picked.backward()?;
    let grad = grads
        .get(&embeds)
        .ok_or_else(|| anyhow::anyhow!("no gradient at the embeddings"))?
        .clone();
    Ok((f64::from(picked.to_scalar::<f32>()?), grad))
}

fn scale(t: &Tensor) -> f64 {
    max_abs_diff(t, &t.zeros_like().unwrap()).max(1.0)
}

#[test]
fn tiny_models_kept_as_stored_match_their_expanded_copies_for_every_kind() -> anyhow::Result<()> {
    let cfg = wide_config();
    for kind in KINDS {
        let (stored, dense) = tiny_packed_pair(&cfg, 5, kind)?;
        assert!(
            stored.info.dtype.starts_with("as stored"),
            "{kind:?}: {}",
            stored.info.dtype
        );
        assert!(
            matches!(
                stored.model.layers[1].mlp.down_proj.weight,
                Weight::Packed(_)
            ),
            "{kind:?}"
        );
        assert!(
            stored.info.weight_bytes < dense.info.weight_bytes,
            "{kind:?}"
        );
        // Forward, every position.
        let ids = ids_tensor(&IDS);
        let (ls, ld) = (stored.model.forward(&ids)?, dense.model.forward(&ids)?);
        let diff = max_abs_diff(&ls, &ld);
        assert!(
            diff < 1e-4 * scale(&ld),
            "{kind:?}: logits differ by {diff:e}"
        );
        // Input gradient through autograd (the packed products' backward).
        let ((vs, gs), (vd, gd)) = (loss_and_embed_grad(&stored)?, loss_and_embed_grad(&dense)?);
        assert!(
            (vs - vd).abs() < 1e-4 * vd.abs().max(1.0),
            "{kind:?}: {vs} vs {vd}"
        );
        let diff = max_abs_diff(&gs, &gd);
        assert!(
            diff < 1e-4 * scale(&gd),
            "{kind:?}: input gradients differ by {diff:e}"
        );
        assert!(scale(&gd) > 0.0);
        // The hand-written backward (attribution): every row of the raw matrix.
        let cfg_a = AttributionConfig::default();
        let run = |m: &LoadedModel| {
            attribute(
                &m.model,
                &m.tokenizer,
                "a b c",
                "d e",
                None,
                &cfg_a,
                &mut go,
            )
        };
        let (a_s, a_d) = (run(&stored)?, run(&dense)?);
        assert_eq!(a_s.output_ids, a_d.output_ids);
        let largest = a_d.raw.data.iter().fold(0f32, |m, v| m.max(v.abs()));
        let worst = a_s
            .raw
            .data
            .iter()
            .zip(&a_d.raw.data)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(largest > 0.0, "{kind:?}");
        assert!(
            worst <= 1e-4 * largest,
            "{kind:?}: attribution differs by {worst:e}"
        );
    }
    Ok(())
}

/// The demo model kept as stored (Q4_1 blocks with a Q8_0 embedding table, as the file holds
/// them) and expanded to f32, each loaded once for the tests below.
fn demo_as(weights: WeightStorage) -> &'static LoadedModel {
    static STORED: std::sync::OnceLock<LoadedModel> = std::sync::OnceLock::new();
    static F32: std::sync::OnceLock<LoadedModel> = std::sync::OnceLock::new();
    let cell = match weights {
        WeightStorage::Stored => &STORED,
        WeightStorage::F32 => &F32,
    };
    cell.get_or_init(|| {
        let spec = ModelSpec::parse(&demo_model_path().display().to_string());
        let opts = LoadOptions {
            weights,
            ..LoadOptions::default()
        };
        load(&spec, &opts).expect("demo model loads")
    })
}

#[test]
fn demo_model_kept_as_stored_matches_transformers_and_the_f32_path() {
    let (stored, reference) = (demo_as(WeightStorage::Stored), demo_as(WeightStorage::F32));
    assert!(
        stored.info.dtype.starts_with("as stored"),
        "{}",
        stored.info.dtype
    );
    // The file's blocks are held as they are: about a fifth of the f32 expansion.
    assert!(
        stored.info.weight_bytes * 4 < reference.info.weight_bytes,
        "{} vs {}",
        stored.info.weight_bytes,
        reference.info.weight_bytes
    );
    for case in golden("forward.json")["forward"].as_array().expect("cases") {
        let text = case["text"].as_str().expect("text");
        let ours = forward_text(stored, text, 5).expect("forward");
        let f32_path = forward_text(reference, text, 5).expect("forward");
        let golden_top = case["top_k"].as_array().expect("top_k");
        for (pos, (a, theirs)) in ours.top_k.iter().zip(golden_top).enumerate() {
            let theirs_top1 = theirs[0][0].as_u64().expect("id") as u32;
            assert_eq!(a[0].0, theirs_top1, "top-1 at position {pos} of {text:?}");
        }
        for (a, b) in ours.top_k.iter().zip(&f32_path.top_k) {
            assert_eq!(a[0].0, b[0].0);
        }
        let worst_golden = ours
            .logits_last
            .iter()
            .zip(case["logits_last"].as_array().expect("logits"))
            .map(|(a, b)| (f64::from(*a) - b.as_f64().expect("f")).abs())
            .fold(0.0, f64::max);
        // The issue asks 5e-2; measured 4.8e-5 (the f32 path: 4.8e-5 too).
        assert!(worst_golden < 1e-2, "{worst_golden} for {text:?}");
        let worst_f32 = ours
            .logits_last
            .iter()
            .zip(&f32_path.logits_last)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        // Same weights, other summation blocking: float rounding only.
        assert!(
            worst_f32 < 1e-3,
            "{worst_f32} against the f32 path for {text:?}"
        );
    }
}

#[test]
fn demo_model_kept_as_stored_generates_and_attributes_as_transformers() -> anyhow::Result<()> {
    let m = demo_as(WeightStorage::Stored);
    for case in golden("generate.json")["generate"]
        .as_array()
        .expect("cases")
    {
        let (_, ids) = render_prompt(m, case["prompt"].as_str().expect("prompt"), true)?;
        let cfg = GenerateConfig {
            max_new_tokens: case["max_new_tokens"].as_u64().expect("n") as usize,
            ..GenerateConfig::default()
        };
        let out = generate(&m.model, &m.tokenizer, &ids, &cfg, &mut NoHook, &mut |_| {
            ControlFlow::Continue(())
        })?;
        assert_eq!(out.new_ids, u32s(&case["new_ids"]));
    }
    let case = &golden("attribute.json")["attribute"][0];
    let ours = attribute(
        &m.model,
        &m.tokenizer,
        case["prompt"].as_str().unwrap_or_default(),
        case["response"].as_str().unwrap_or_default(),
        None,
        &AttributionConfig::default(),
        &mut go,
    )?;
    let raw: Vec<Vec<f64>> = serde_json::from_value(case["raw"].clone())?;
    let largest = raw.iter().flatten().fold(0f64, |a, v| a.max(v.abs()));
    let mut worst: f64 = 0.0;
    for (i, row) in raw.iter().enumerate() {
        for (j, &theirs) in row.iter().enumerate() {
            worst = worst.max((f64::from(ours.raw.get(i, j)) - theirs).abs() / largest);
        }
    }
    assert!(
        worst < 1e-3,
        "raw attribution differs by {worst:e} of its largest entry"
    );
    Ok(())
}

#[test]
fn the_cli_keeps_weights_as_stored_and_refuses_them_in_bf16() {
    let demo = demo_model_path().display().to_string();
    let run = run_cli(&["info", "--weights", "stored", "--model", &demo]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(run.stdout.contains("as stored (Q4_1"), "{}", run.stdout);
    let run = run_cli(&[
        "info",
        "--weights",
        "stored",
        "--dtype",
        "bf16",
        "--model",
        &demo,
    ]);
    assert_one_line_error(&run, "weights");
    let run = run_cli(&["info", "--weights", "packed", "--model", &demo]);
    assert_ne!(run.code, 0);
    assert!(run.stderr.contains("f32 or stored"), "{}", run.stderr);
}

/// A bf16 Hugging Face folder kept as stored reads its matrices straight from the file's bytes
/// and runs as its f32 expansion does; merging an adapter keeps them packed.
#[test]
fn a_bf16_folder_kept_as_stored_runs_as_its_f32_expansion() -> anyhow::Result<()> {
    let bf16 = tunelens::model::tiny::tiny_model(
        4,
        &tunelens::model::tiny::tiny_options(candle_core::DType::BF16),
    )?;
    let dir = tempfile::tempdir()?;
    tunelens::model::save::save_hf_folder(&bf16, dir.path())?;
    let spec = ModelSpec::parse(&dir.path().display().to_string());
    let stored = load(
        &spec,
        &LoadOptions {
            weights: WeightStorage::Stored,
            ..LoadOptions::default()
        },
    )?;
    let expanded = load(&spec, &LoadOptions::default())?;
    assert_eq!(stored.info.dtype, "as stored (bf16)");
    assert!(stored.info.weight_bytes * 3 < expanded.info.weight_bytes * 2);
    let ids = ids_tensor(&IDS);
    let diff = max_abs_diff(&stored.model.forward(&ids)?, &expanded.model.forward(&ids)?);
    assert!(diff < 1e-5, "{diff:e}");
    // Merging an adapter into a packed bf16 matrix packs the merged weight again.
    let mut model = stored.model.clone();
    let linear = &mut model.layers[0].self_attn.q_proj;
    let (out, inp) = (linear.out_features(), linear.in_features());
    linear.attach(tunelens::model::lora::LoraAdapter {
        a: Tensor::ones((2, inp), candle_core::DType::F32, &candle_core::Device::Cpu)?,
        b: (Tensor::ones((out, 2), candle_core::DType::F32, &candle_core::Device::Cpu)? * 0.01)?,
        scale: 1.0,
        dropout: None,
    })?;
    let merged_f32 = model.layers[0].self_attn.q_proj.effective_weight()?;
    assert_eq!(tunelens::model::adapter::merge_adapters(&mut model)?, 1);
    let merged = &model.layers[0].self_attn.q_proj.weight;
    assert!(matches!(merged, Weight::Packed(_)));
    // W + B A rounded once to bf16, as a dense bf16 model's merge rounds it.
    let rounded = merged_f32
        .to_dtype(candle_core::DType::BF16)?
        .to_dtype(candle_core::DType::F32)?;
    assert_eq!(max_abs_diff(&merged.dense()?, &rounded), 0.0);
    Ok(())
}
