//! Writing a loaded model as a Hugging Face folder (`config.json`, `model.safetensors`,
//! `tokenizer.json`, `tokenizer_config.json`), e.g. a base model with its LoRA adapters merged
//! in. The folder is written under a temporary name and renamed into place.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::model::config::{Activation, Architecture, LayerType, ModelConfig, RopeScaling};
use crate::model::load::{LoadedModel, NormNames};
use crate::model::lora::Linear;
use crate::model::transformer::{RmsNorm, Transformer};

/// `config.json` for `cfg` (the fields tunelens and transformers read).
pub fn hf_config_json(cfg: &ModelConfig, dtype: DType) -> serde_json::Value {
    let (arch, model_type) = match cfg.architecture {
        Architecture::Llama => ("LlamaForCausalLM", "llama"),
        Architecture::Mistral => ("MistralForCausalLM", "mistral"),
        Architecture::Qwen2 => ("Qwen2ForCausalLM", "qwen2"),
        Architecture::Phi3 => ("Phi3ForCausalLM", "phi3"),
        Architecture::Qwen3 => ("Qwen3ForCausalLM", "qwen3"),
        Architecture::Gemma3 => ("Gemma3ForCausalLM", "gemma3_text"),
        Architecture::Gemma2 => ("Gemma2ForCausalLM", "gemma2"),
        Architecture::Olmo2 => ("Olmo2ForCausalLM", "olmo2"),
    };
    let rope_scaling: serde_json::Value = match cfg.rope_scaling {
        RopeScaling::None => serde_json::Value::Null,
        RopeScaling::Linear { factor } => {
            serde_json::json!({"rope_type": "linear", "factor": factor})
        }
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => serde_json::json!({
            "rope_type": "llama3",
            "factor": factor,
            "low_freq_factor": low_freq_factor,
            "high_freq_factor": high_freq_factor,
            "original_max_position_embeddings": original_max_position_embeddings,
        }),
    };
    let mut value = serde_json::json!({
        "architectures": [arch],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": match cfg.hidden_act {
            Activation::Silu => "silu",
            Activation::GeluTanh => "gelu_pytorch_tanh",
        },
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": rope_scaling.clone(),
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_ids,
        "torch_dtype": match dtype {
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
            _ => "float32",
        },
    });
    if let Some(obj) = value.as_object_mut() {
        match cfg.architecture {
            Architecture::Qwen2 => {
                obj.insert(
                    "use_sliding_window".into(),
                    cfg.sliding_window.is_some().into(),
                );
                obj.insert("sliding_window".into(), cfg.sliding_window.into());
            }
            Architecture::Mistral | Architecture::Phi3 => {
                obj.insert("sliding_window".into(), cfg.sliding_window.into());
            }
            Architecture::Llama | Architecture::Qwen3 | Architecture::Olmo2 => {
                obj.insert("attention_bias".into(), (cfg.qkv_bias || cfg.o_bias).into());
                obj.insert("mlp_bias".into(), cfg.mlp_bias.into());
            }
            Architecture::Gemma3 | Architecture::Gemma2 => {
                obj.insert("hidden_activation".into(), "gelu_pytorch_tanh".into());
                obj.insert(
                    "attn_logit_softcapping".into(),
                    cfg.attn_logit_softcapping.into(),
                );
                obj.insert(
                    "final_logit_softcapping".into(),
                    cfg.final_logit_softcapping.into(),
                );
                obj.insert("sliding_window".into(), cfg.sliding_window.into());
                obj.insert(
                    "query_pre_attn_scalar".into(),
                    cfg.query_pre_attn_scalar.into(),
                );
                let types: Vec<&str> = cfg
                    .layer_types
                    .iter()
                    .map(|t| match t {
                        LayerType::Full => "full_attention",
                        LayerType::Sliding => "sliding_attention",
                    })
                    .collect();
                obj.insert("layer_types".into(), types.into());
                if cfg.architecture == Architecture::Gemma2 {
                    return value;
                }
                // transformers 5's form: one RoPE per layer type.
                let mut full =
                    serde_json::json!({"rope_theta": cfg.rope_theta, "rope_type": "default"});
                if let (Some(full), serde_json::Value::Object(scaling)) =
                    (full.as_object_mut(), rope_scaling.clone())
                {
                    full.extend(scaling);
                }
                obj.insert(
                    "rope_parameters".into(),
                    serde_json::json!({
                        "full_attention": full,
                        "sliding_attention": {
                            "rope_theta": cfg.rope_local_theta.unwrap_or(10_000.0),
                            "rope_type": "default",
                        },
                    }),
                );
                obj.remove("rope_theta");
                obj.remove("rope_scaling");
            }
        }
    }
    value
}

fn put_linear(tensors: &mut HashMap<String, Tensor>, name: &str, linear: &Linear) -> Result<()> {
    if linear.lora.is_some() {
        return Err(Error::invalid(
            "model",
            format!("{name} still carries a LoRA adapter; merge it first"),
        ));
    }
    tensors.insert(format!("{name}.weight"), cpu(&linear.weight.for_saving()?)?);
    if let Some(bias) = &linear.bias {
        tensors.insert(format!("{name}.bias"), cpu(bias)?);
    }
    Ok(())
}

fn cpu(t: &Tensor) -> Result<Tensor> {
    Ok(t.to_device(&Device::Cpu)?.contiguous()?)
}

/// The model's weights by Hugging Face name.
pub fn hf_tensors(model: &Transformer) -> Result<HashMap<String, Tensor>> {
    let arch = model.config().architecture;
    let offset = arch.norm_weight_offset();
    // Gemma's files hold `gain − 1` (see `build_transformer`).
    let stored_gain = |norm: &RmsNorm| -> Result<Tensor> {
        let w = cpu(&norm.weight)?;
        Ok(if offset == 0.0 { w } else { (w - offset)? })
    };
    let mut tensors = HashMap::new();
    tensors.insert(
        "model.embed_tokens.weight".to_owned(),
        cpu(&model.embed_tokens.for_saving()?)?,
    );
    for (i, layer) in model.layers.iter().enumerate() {
        let p = format!("model.layers.{i}");
        let names = NormNames::of(arch);
        for (name, norm) in [
            (names.pre_attn, &layer.input_layernorm),
            (names.pre_mlp, &layer.post_attention_layernorm),
            (names.attn_out, &layer.attn_out_norm),
            (names.mlp_out, &layer.mlp_out_norm),
        ] {
            if let (Some(name), Some(norm)) = (name, norm) {
                tensors.insert(format!("{p}.{name}.weight"), stored_gain(norm)?);
            }
        }
        let a = &layer.self_attn;
        for (name, norm) in [("q_norm", &a.q_norm), ("k_norm", &a.k_norm)] {
            if let Some(norm) = norm {
                tensors.insert(format!("{p}.self_attn.{name}.weight"), stored_gain(norm)?);
            }
        }
        for (name, linear) in [
            ("q_proj", &a.q_proj),
            ("k_proj", &a.k_proj),
            ("v_proj", &a.v_proj),
            ("o_proj", &a.o_proj),
        ] {
            put_linear(&mut tensors, &format!("{p}.self_attn.{name}"), linear)?;
        }
        let m = &layer.mlp;
        for (name, linear) in [
            ("gate_proj", &m.gate_proj),
            ("up_proj", &m.up_proj),
            ("down_proj", &m.down_proj),
        ] {
            put_linear(&mut tensors, &format!("{p}.mlp.{name}"), linear)?;
        }
    }
    if model.config().architecture == Architecture::Phi3 {
        // Phi-3's own names: the parts fused again, in the order the loader split them.
        for i in 0..model.layers.len() {
            let p = format!("model.layers.{i}");
            for (fused, parts) in [
                (
                    "self_attn.qkv_proj",
                    ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"].as_slice(),
                ),
                (
                    "mlp.gate_up_proj",
                    ["mlp.gate_proj", "mlp.up_proj"].as_slice(),
                ),
            ] {
                let taken = parts
                    .iter()
                    .map(|part| {
                        tensors
                            .remove(&format!("{p}.{part}.weight"))
                            .ok_or_else(|| {
                                Error::invalid("model", format!("{p}.{part} is missing"))
                            })
                    })
                    .collect::<Result<Vec<_>>>()?;
                tensors.insert(format!("{p}.{fused}.weight"), Tensor::cat(&taken, 0)?);
            }
        }
    }
    tensors.insert("model.norm.weight".to_owned(), stored_gain(&model.norm)?);
    if !model.config().tie_word_embeddings {
        put_linear(&mut tensors, "lm_head", &model.lm_head)?;
    }
    Ok(tensors)
}

fn write_err(path: &Path, err: impl std::fmt::Display) -> Error {
    Error::bad_file(path, format!("cannot write the model ({err})"))
}

/// Writes `loaded` (no adapters attached) as a Hugging Face folder at `dir`, replacing it.
pub fn save_hf_folder(loaded: &LoadedModel, dir: &Path) -> Result<()> {
    let tensors = hf_tensors(&loaded.model)?;
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or_else(|| Path::new("."));
    std::fs::create_dir_all(parent).map_err(|err| write_err(parent, err))?;
    let name = dir
        .file_name()
        .map_or_else(|| "model".to_owned(), |n| n.to_string_lossy().into_owned());
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|err| write_err(&tmp, err))?;
    let result = (|| -> Result<()> {
        let config = hf_config_json(loaded.model.config(), loaded.model.dtype());
        let path = tmp.join("config.json");
        std::fs::write(&path, serde_json::to_string_pretty(&config)?)
            .map_err(|err| write_err(&path, err))?;
        let path = tmp.join("model.safetensors");
        candle_core::safetensors::save(&tensors, &path).map_err(|err| write_err(&path, err))?;
        let path = tmp.join("tokenizer.json");
        loaded
            .tokenizer
            .inner()
            .save(&path, false)
            .map_err(|err| write_err(&path, err))?;
        let mut tok_cfg = serde_json::Map::new();
        if let Some((text, _)) = &loaded.tokenizer.bos {
            tok_cfg.insert("bos_token".into(), text.clone().into());
        }
        if let Some((text, _)) = &loaded.tokenizer.eos {
            tok_cfg.insert("eos_token".into(), text.clone().into());
        }
        if let Some(template) = &loaded.chat_template {
            tok_cfg.insert("chat_template".into(), template.source.clone().into());
        }
        let path = tmp.join("tokenizer_config.json");
        std::fs::write(&path, serde_json::to_string_pretty(&tok_cfg)?)
            .map_err(|err| write_err(&path, err))?;
        Ok(())
    })();
    if let Err(err) = result {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(err);
    }
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(|err| write_err(dir, err))?;
    }
    std::fs::rename(&tmp, dir).map_err(|err| write_err(dir, err))
}

/// Folds every attached adapter into its base weight (`W += scale · B A`) and removes it;
/// returns how many were merged.
pub fn merge_adapters(model: &mut Transformer) -> Result<usize> {
    let mut merged = 0;
    for layer in &mut model.layers {
        let linears = [
            &mut layer.self_attn.q_proj,
            &mut layer.self_attn.k_proj,
            &mut layer.self_attn.v_proj,
            &mut layer.self_attn.o_proj,
            &mut layer.mlp.gate_proj,
            &mut layer.mlp.up_proj,
            &mut layer.mlp.down_proj,
        ];
        for linear in linears {
            if linear.lora.is_some() {
                linear.weight = linear.weight.replaced_by(&linear.effective_weight()?)?;
                linear.lora = None;
                merged += 1;
            }
        }
    }
    Ok(merged)
}

/// Loads `spec` (typically `BASE+ADAPTER`), merges its adapters and writes the result as a
/// Hugging Face folder; returns the number of merged layers.
pub fn save_merged(
    spec: &crate::model::load::ModelSpec,
    opts: &crate::model::load::LoadOptions,
    dir: &Path,
) -> Result<usize> {
    let mut loaded = crate::model::load::load(spec, opts)?;
    let merged = merge_adapters(&mut loaded.model)?;
    save_hf_folder(&loaded, dir)?;
    Ok(merged)
}
