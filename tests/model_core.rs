//! Tiny-model tests of the model core: loaders round trip, hook identities, KV cache, gradients.

use std::ops::ControlFlow;

use candle_core::{DType, Device, Tensor, Var, D};
use tunelens::model::generate::{generate, GenerateConfig};
use tunelens::model::hooks::{Edit, EditOp, Editor, HookPoint, NoHook, Positions, Recorder};
use tunelens::model::lora::LoraAdapter;
use tunelens::model::tiny::{self, tiny_config, write_tiny_hf_folder};
use tunelens::model::transformer::{ForwardOptions, Input, LogitsAt};
use tunelens::model::{load, LoadOptions, ModelSpec};

use crate::common::{ids_tensor, max_abs_diff, tiny, tiny_f64};

const IDS: [u32; 7] = [1, 7, 9, 12, 30, 44, 8];

#[test]
fn hf_folder_round_trip_gives_identical_logits() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    write_tiny_hf_folder(dir.path(), &tiny_config(), 11)?;
    let loaded = load(
        &ModelSpec::parse(&dir.path().display().to_string()),
        &LoadOptions::default(),
    )?;
    let memory = tiny(11);
    let ids = ids_tensor(&IDS);
    let a = loaded.model.forward(&ids)?;
    let b = memory.model.forward(&ids)?;
    assert_eq!(max_abs_diff(&a, &b), 0.0);
    // The tokenizer and chat template came along.
    assert_eq!(loaded.tokenizer.encode("the cat sat", true)?, vec![5, 7, 9]);
    let template = loaded
        .chat_template
        .expect("chat template from tokenizer_config.json");
    assert_eq!(template.render_user("hi")?, "<|user|> hi <|assistant|>");
    assert_eq!(loaded.info.architecture, "llama");
    assert_eq!(loaded.info.num_kv_heads, 2);
    Ok(())
}

#[test]
fn tied_embeddings_and_biases_load() -> anyhow::Result<()> {
    let mut cfg = tiny_config();
    cfg.tie_word_embeddings = true;
    // LLaMA's `attention_bias` puts biases on q, k, v and o.
    cfg.qkv_bias = true;
    cfg.o_bias = true;
    let dir = tempfile::tempdir()?;
    write_tiny_hf_folder(dir.path(), &cfg, 3)?;
    let loaded = load(
        &ModelSpec::parse(&dir.path().display().to_string()),
        &LoadOptions::default(),
    )?;
    assert!(loaded.model.config().qkv_bias);
    assert!(loaded.model.layers[0].self_attn.q_proj.bias.is_some());
    assert!(loaded.model.layers[0].self_attn.o_proj.bias.is_some());
    // Tied: lm_head is the embedding matrix.
    assert_eq!(
        max_abs_diff(
            &loaded.model.lm_head.weight.dense()?,
            &loaded.model.embed_tokens.dense()?
        ),
        0.0
    );
    let logits = loaded.model.forward(&ids_tensor(&IDS))?;
    assert_eq!(logits.dims(), &[1, IDS.len(), 64]);
    Ok(())
}

#[test]
fn forward_with_no_hook_equals_plain_forward() -> anyhow::Result<()> {
    let m = tiny(1);
    let ids = ids_tensor(&IDS);
    let plain = m.model.forward(&ids)?;
    let hooked = m.model.forward_hooked(&ids, &mut NoHook)?;
    let mut recorder = Recorder::all();
    let recorded = m.model.forward_hooked(&ids, &mut recorder)?;
    assert_eq!(max_abs_diff(&plain, &hooked), 0.0);
    assert_eq!(max_abs_diff(&plain, &recorded), 0.0);
    // Every layer's points were seen.
    assert!(recorder.acts.contains_key(&HookPoint::AttnPattern(2)));
    assert_eq!(
        recorder.get(HookPoint::HeadOut(0))?.dims(),
        &[1, IDS.len(), 4, 4]
    );
    assert_eq!(
        recorder.get(HookPoint::AttnPattern(1))?.dims(),
        &[1, 4, IDS.len(), IDS.len()]
    );
    Ok(())
}

#[test]
fn residual_stream_decomposes_into_attention_and_mlp() -> anyhow::Result<()> {
    let m = tiny(2);
    let mut rec = Recorder::all();
    m.model.forward_hooked(&ids_tensor(&IDS), &mut rec)?;
    for l in 0..3 {
        let sum = ((rec.get(HookPoint::ResidPre(l))? + rec.get(HookPoint::AttnOut(l))?)?
            + rec.get(HookPoint::MlpOut(l))?)?;
        assert!(
            max_abs_diff(&sum, rec.get(HookPoint::ResidPost(l))?) < 1e-5,
            "layer {l}"
        );
        if l > 0 {
            assert_eq!(
                max_abs_diff(
                    rec.get(HookPoint::ResidPre(l))?,
                    rec.get(HookPoint::ResidPost(l - 1))?
                ),
                0.0
            );
        }
    }
    // Attention rows are distributions and causal.
    let pattern = rec.get(HookPoint::AttnPattern(0))?.squeeze(0)?;
    let row_sums = pattern.sum(D::Minus1)?.flatten_all()?.to_vec1::<f32>()?;
    assert!(row_sums.iter().all(|s| (s - 1.0).abs() < 1e-5));
    let first_row: Vec<f32> = pattern.get(0)?.get(0)?.to_vec1()?;
    assert!(first_row[1..].iter().all(|&p| p == 0.0));
    Ok(())
}

#[test]
fn replacing_a_head_output_with_itself_changes_nothing() -> anyhow::Result<()> {
    let m = tiny(3);
    let ids = ids_tensor(&IDS);
    let mut rec = Recorder::new([HookPoint::HeadOut(1)]);
    let clean = m.model.forward_hooked(&ids, &mut rec)?;
    let head_out = rec.get(HookPoint::HeadOut(1))?.clone();
    // Replace head 2 at positions 3 and the last with its own value.
    let own = head_out
        .narrow(2, 2, 1)?
        .contiguous()?
        .index_select(&Tensor::new(&[3u32, 6], &Device::Cpu)?, 1)?;
    let mut editor = Editor::new(vec![Edit {
        point: HookPoint::HeadOut(1),
        positions: Positions::List(vec![3, -1]),
        heads: Some(vec![2]),
        op: EditOp::Replace(own),
    }]);
    let patched = m.model.forward_hooked(&ids, &mut editor)?;
    assert!(max_abs_diff(&clean, &patched) < 1e-6);
    // A different value does change the output, only from position 3 on.
    let mut editor = Editor::new(vec![Edit {
        point: HookPoint::HeadOut(1),
        positions: Positions::List(vec![3]),
        heads: Some(vec![2]),
        op: EditOp::Replace(Tensor::ones(4, DType::F32, &Device::Cpu)?),
    }]);
    let changed = m.model.forward_hooked(&ids, &mut editor)?;
    assert!(max_abs_diff(&clean.narrow(1, 0, 3)?, &changed.narrow(1, 0, 3)?) < 1e-6);
    assert!(max_abs_diff(&clean.narrow(1, 3, 4)?, &changed.narrow(1, 3, 4)?) > 1e-3);
    Ok(())
}

#[test]
fn adding_at_a_residual_position_matches_manual_addition() -> anyhow::Result<()> {
    let m = tiny(4);
    let ids = ids_tensor(&IDS);
    let direction = Tensor::from_vec(
        (0..16).map(|i| i as f32 * 0.1).collect::<Vec<_>>(),
        16,
        &Device::Cpu,
    )?;
    let mut add = Editor::new(vec![Edit {
        point: HookPoint::ResidPost(0),
        positions: Positions::List(vec![-1]),
        heads: None,
        op: EditOp::Add(direction.clone()),
    }]);
    let mut rec = Recorder::new([HookPoint::ResidPost(0)]);
    m.model.forward_hooked(&ids, &mut rec)?;
    let mut expected = rec.get(HookPoint::ResidPost(0))?.clone();
    let last = (expected.narrow(1, 6, 1)? + direction.reshape((1, 1, 16))?)?;
    expected = Tensor::cat(&[&expected.narrow(1, 0, 6)?, &last], 1)?;
    let mut rec_after = Recorder::new([HookPoint::ResidPost(0)]);
    let mut chain = tunelens::model::hooks::Chain(vec![&mut add, &mut rec_after]);
    m.model.forward_hooked(&ids, &mut chain)?;
    assert!(max_abs_diff(rec_after.get(HookPoint::ResidPost(0))?, &expected) < 1e-6);
    Ok(())
}

#[test]
fn kv_cache_generation_equals_no_cache_greedy() -> anyhow::Result<()> {
    let m = tiny(5);
    let prompt = [1u32, 12, 13, 30];
    let cfg = GenerateConfig {
        max_new_tokens: 12,
        stop_at_eos: false,
        ..GenerateConfig::default()
    };
    let out = generate(
        &m.model,
        &m.tokenizer,
        &prompt,
        &cfg,
        &mut NoHook,
        &mut |_| ControlFlow::Continue(()),
    )?;
    let mut ids = prompt.to_vec();
    for _ in 0..12 {
        let logits = m.model.forward(&ids_tensor(&ids))?.squeeze(0)?;
        let last: Vec<f32> = logits.get(ids.len() - 1)?.to_vec1()?;
        ids.push(tunelens::model::generate::argmax(&last));
    }
    assert_eq!(out.new_ids, ids[prompt.len()..].to_vec());
    assert_eq!(out.new_ids.len(), 12);
    Ok(())
}

#[test]
fn generation_streams_and_cancels() -> anyhow::Result<()> {
    let m = tiny(5);
    let cfg = GenerateConfig {
        max_new_tokens: 20,
        stop_at_eos: false,
        ..GenerateConfig::default()
    };
    let mut seen = Vec::new();
    let out = generate(
        &m.model,
        &m.tokenizer,
        &[1, 12],
        &cfg,
        &mut NoHook,
        &mut |t| {
            seen.push(t.token_id);
            if seen.len() == 4 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        },
    )?;
    assert_eq!(
        out.stop_reason,
        tunelens::model::generate::StopReason::Cancelled
    );
    assert_eq!(out.new_ids, seen);
    assert_eq!(seen.len(), 4);
    Ok(())
}

#[test]
fn cached_forward_matches_full_forward_with_hooks_at_absolute_positions() -> anyhow::Result<()> {
    let m = tiny(6);
    let opts = ForwardOptions::default();
    let delta = Tensor::ones(16, DType::F32, &Device::Cpu)?;
    let edit = || {
        Editor::new(vec![Edit {
            point: HookPoint::ResidPre(1),
            positions: Positions::List(vec![5]),
            heads: None,
            op: EditOp::Add(delta.clone()),
        }])
    };
    let full = m
        .model
        .run(Input::Ids(&ids_tensor(&IDS)), &opts, None, &mut edit())?;
    let mut cache = tunelens::model::KvCache::new();
    let mut hook = edit();
    let first = m.model.run(
        Input::Ids(&ids_tensor(&IDS[..4])),
        &opts,
        Some(&mut cache),
        &mut hook,
    )?;
    let second = m.model.run(
        Input::Ids(&ids_tensor(&IDS[4..])),
        &opts,
        Some(&mut cache),
        &mut hook,
    )?;
    let stitched = Tensor::cat(&[&first, &second], 1)?;
    assert!(max_abs_diff(&full, &stitched) < 1e-5);
    Ok(())
}

#[test]
fn differentiable_path_equals_fast_path() -> anyhow::Result<()> {
    let m = tiny(7);
    let ids = ids_tensor(&IDS);
    let fast = m.model.forward(&ids)?;
    let slow_opts = ForwardOptions {
        differentiable: true,
        ..ForwardOptions::default()
    };
    let slow = m
        .model
        .run(Input::Ids(&ids), &slow_opts, None, &mut NoHook)?;
    assert!(
        max_abs_diff(&fast, &slow) < 1e-5,
        "{}",
        max_abs_diff(&fast, &slow)
    );
    let embeds = m.model.embed(&ids)?;
    let from_embeds = m.model.run(
        Input::Embeds(&embeds),
        &ForwardOptions::default(),
        None,
        &mut NoHook,
    )?;
    assert_eq!(max_abs_diff(&fast, &from_embeds), 0.0);
    let last = m.model.run(
        Input::Ids(&ids),
        &ForwardOptions {
            logits: LogitsAt::Last,
            ..ForwardOptions::default()
        },
        None,
        &mut NoHook,
    )?;
    assert!(max_abs_diff(&last, &fast.narrow(1, IDS.len() - 1, 1)?) < 1e-6);
    Ok(())
}

/// `p(target | prefix)` at `pos` for embeddings `x`, in f64.
fn prob_at(
    m: &tunelens::model::LoadedModel,
    x: &Tensor,
    pos: usize,
    target: u32,
) -> anyhow::Result<Tensor> {
    let opts = ForwardOptions {
        differentiable: true,
        ..ForwardOptions::default()
    };
    let logits = m.model.run(Input::Embeds(x), &opts, None, &mut NoHook)?;
    let probs = candle_nn::ops::softmax(&logits.squeeze(0)?.get(pos)?, D::Minus1)?;
    Ok(probs.get(target as usize)?)
}

#[test]
fn input_embedding_gradient_matches_finite_differences() -> anyhow::Result<()> {
    let m = tiny_f64(8);
    let ids = ids_tensor(&IDS);
    let x0 = m.model.embed(&ids)?;
    let var = Var::from_tensor(&x0)?;
    let (pos, target) = (5usize, 17u32);
    let objective = prob_at(&m, var.as_tensor(), pos, target)?;
    let grads = objective.backward()?;
    let grad = grads
        .get(&var)
        .expect("gradient reaches the input embeddings");
    let grad: Vec<Vec<f64>> = grad.squeeze(0)?.to_vec2()?;
    let base: Vec<f64> = x0.flatten_all()?.to_vec1()?;
    let eps = 1e-5;
    let mut checked = 0;
    let mut worst: f64 = 0.0;
    for t in [0usize, 2, 5, 6] {
        for c in [0usize, 3, 7, 15] {
            let idx = t * 16 + c;
            let mut plus = base.clone();
            plus[idx] += eps;
            let mut minus = base.clone();
            minus[idx] -= eps;
            let f = |v: Vec<f64>| -> anyhow::Result<f64> {
                let x = Tensor::from_vec(v, x0.dims(), &Device::Cpu)?;
                Ok(prob_at(&m, &x, pos, target)?.to_scalar::<f64>()?)
            };
            let numeric = (f(plus)? - f(minus)?) / (2.0 * eps);
            let analytic = grad[t][c];
            worst = worst.max((numeric - analytic).abs());
            if t > pos {
                // Causality: later tokens cannot influence position `pos`.
                assert_eq!(analytic, 0.0);
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 16);
    assert!(worst < 1e-8, "max |numeric - analytic| = {worst:e}");
    // The gradient is not trivially zero at the attended positions.
    assert!(grad[0].iter().chain(&grad[5]).any(|g| g.abs() > 1e-6));
    Ok(())
}

#[test]
fn lora_with_zero_b_equals_base_and_can_be_disabled() -> anyhow::Result<()> {
    let mut m = tiny(9);
    let ids = ids_tensor(&IDS);
    let base = m.model.forward(&ids)?;
    let layer = &mut m.model.layers[1].self_attn.q_proj;
    let a = Tensor::ones((2, 16), DType::F32, &Device::Cpu)?;
    layer.attach(LoraAdapter {
        a: a.clone(),
        b: Tensor::zeros((16, 2), DType::F32, &Device::Cpu)?,
        scale: 8.0,
        dropout: None,
    })?;
    assert_eq!(max_abs_diff(&base, &m.model.forward(&ids)?), 0.0);
    m.model.layers[1].self_attn.q_proj.lora.as_mut().unwrap().b =
        Tensor::ones((16, 2), DType::F32, &Device::Cpu)?;
    let adapted = m.model.forward(&ids)?;
    assert!(max_abs_diff(&base, &adapted) > 1e-3);
    let off = ForwardOptions {
        use_lora: false,
        ..ForwardOptions::default()
    };
    let disabled = m.model.run(Input::Ids(&ids), &off, None, &mut NoHook)?;
    assert_eq!(max_abs_diff(&base, &disabled), 0.0);
    Ok(())
}

#[test]
fn peft_adapter_folder_loads_as_base_plus_adapter() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let base_dir = dir.path().join("base");
    let adapter_dir = dir.path().join("adapter");
    write_tiny_hf_folder(&base_dir, &tiny_config(), 10)?;
    std::fs::create_dir_all(&adapter_dir)?;
    std::fs::write(
        adapter_dir.join("adapter_config.json"),
        r#"{"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]}"#,
    )?;
    let mut tensors = std::collections::HashMap::new();
    for l in 0..3 {
        for (module, out) in [("q_proj", 16), ("v_proj", 8)] {
            let p = format!("base_model.model.model.layers.{l}.self_attn.{module}");
            tensors.insert(
                format!("{p}.lora_A.weight"),
                (Tensor::ones((2, 16), DType::F32, &Device::Cpu)? * 0.1)?,
            );
            tensors.insert(
                format!("{p}.lora_B.weight"),
                (Tensor::ones((out, 2), DType::F32, &Device::Cpu)? * 0.1)?,
            );
        }
    }
    candle_core::safetensors::save(&tensors, adapter_dir.join("adapter_model.safetensors"))?;
    let spec = ModelSpec::parse(&format!("{}+{}", base_dir.display(), adapter_dir.display()));
    let loaded = load(&spec, &LoadOptions::default())?;
    let info = loaded.info.adapter.clone().expect("adapter summary");
    assert_eq!(info.rank, 2);
    assert_eq!(info.adapted_layers, 6);
    assert_eq!(
        info.target_modules,
        vec!["q_proj".to_owned(), "v_proj".to_owned()]
    );
    let lora = loaded.model.layers[0]
        .self_attn
        .q_proj
        .lora
        .as_ref()
        .expect("attached");
    assert!((lora.scale - 2.0).abs() < 1e-12);
    let base = tiny(10);
    let ids = ids_tensor(&IDS);
    assert!(max_abs_diff(&base.model.forward(&ids)?, &loaded.model.forward(&ids)?) > 1e-4);
    let off = ForwardOptions {
        use_lora: false,
        ..ForwardOptions::default()
    };
    let disabled = loaded
        .model
        .run(Input::Ids(&ids), &off, None, &mut NoHook)?;
    assert_eq!(max_abs_diff(&base.model.forward(&ids)?, &disabled), 0.0);
    Ok(())
}

#[test]
fn gradients_flow_to_lora_adapters_but_not_frozen_weights() -> anyhow::Result<()> {
    let mut m = tiny(12);
    let a = Var::from_tensor(&(Tensor::ones((2, 16), DType::F32, &Device::Cpu)? * 0.1)?)?;
    let b = Var::from_tensor(&(Tensor::ones((8, 2), DType::F32, &Device::Cpu)? * 0.1)?)?;
    m.model.layers[2].self_attn.v_proj.attach(LoraAdapter {
        a: a.as_tensor().clone(),
        b: b.as_tensor().clone(),
        scale: 1.0,
        dropout: None,
    })?;
    let opts = ForwardOptions {
        differentiable: true,
        ..ForwardOptions::default()
    };
    let logits = m
        .model
        .run(Input::Ids(&ids_tensor(&IDS)), &opts, None, &mut NoHook)?;
    let loss =
        candle_nn::loss::cross_entropy(&logits.squeeze(0)?, &Tensor::new(&IDS, &Device::Cpu)?)?;
    let grads = loss.backward()?;
    assert!(grads.get(&a).is_some() && grads.get(&b).is_some());
    assert!(grads
        .get(&m.model.layers[2].self_attn.v_proj.weight.dense()?)
        .is_none());
    assert!(grads
        .get(&m.model.layers[0].mlp.down_proj.weight.dense()?)
        .is_none());
    Ok(())
}

#[test]
fn tiny_models_are_reproducible_from_the_seed() -> anyhow::Result<()> {
    let a = tiny::tiny_weights(&tiny_config(), 42)?;
    let b = tiny::tiny_weights(&tiny_config(), 42)?;
    let c = tiny::tiny_weights(&tiny_config(), 43)?;
    let name = "model.layers.1.mlp.up_proj.weight";
    assert_eq!(max_abs_diff(&a[name], &b[name]), 0.0);
    assert!(max_abs_diff(&a[name], &c[name]) > 0.0);
    Ok(())
}
