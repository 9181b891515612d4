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
