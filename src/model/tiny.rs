//! Tiny random LLaMA models built from a seeded RNG (METHODS.md Appendix A), for tests, examples
//! and demos that must not download anything. `Device::Cpu.set_seed` is unsupported, so weights
//! come from a Rust `StdRng`: the same seed gives the same model on every machine.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use rand::{Rng as _, SeedableRng as _};

use crate::error::{Error, Result};
use crate::model::config::{Activation, Architecture, LayerType, ModelConfig, RopeScaling};
use crate::model::load::NormNames;
use crate::model::load::{build_transformer, LoadOptions, LoadedModel, TensorMap};
use crate::model::tokenizer::Tokenizer;
use crate::model::ModelInfo;

/// Words of the tiny vocabulary after the special tokens (ids 5..64).
const WORDS: [&str; 59] = [
    "the",
    "a",
    "cat",
    "dog",
    "sat",
    "on",
    "mat",
    "write",
    "poem",
    "about",
    "sea",
    "summarize",
    "text",
    "in",
    "one",
    "sentence",
    "translate",
    "to",
    "french",
    "list",
    "three",
    "tips",
    "for",
    "study",
    "is",
    "was",
    "warm",
    "cold",
    "red",
    "blue",
    "green",
    "big",
    "small",
    "and",
    "or",
    "not",
    "it",
    "this",
    "that",
    "with",
    "answer",
    "question",
    "what",
    "why",
    "how",
    "paris",
    "france",
    "capital",
    "of",
    "city",
    "river",
    "tree",
    "house",
    "run",
    "jump",
    "read",
    "book",
    ".",
    ",",
];

/// The special tokens of the tiny vocabulary (ids 0..5).
const SPECIAL: [&str; 5] = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>"];

/// An in-context task in the tiny vocabulary, as the function-vectors JSON format (a list of
/// `{"input", "output"}`): each of the first 40 words maps to the word seven places on.
pub fn tiny_icl_task_json() -> String {
    let words = &WORDS[..40];
    let pairs: Vec<serde_json::Value> = (0..words.len())
        .map(|i| serde_json::json!({"input": words[i], "output": words[(i + 7) % words.len()]}))
        .collect();
    serde_json::Value::Array(pairs).to_string()
}

/// The tiny chat template (user turns, then the assistant marker).
pub const TINY_CHAT_TEMPLATE: &str = "{% for message in messages %}<|{{ message['role'] }}|> {{ message['content'] }} {% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}";

/// Hyper-parameters of the tiny test model: `V = 64, d = 16, h = 4, h_kv = 2, d_ff = 32, L = 3`.
pub fn tiny_config() -> ModelConfig {
    ModelConfig {
        architecture: Architecture::Llama,
        vocab_size: 64,
        hidden_size: 16,
        intermediate_size: 32,
        num_hidden_layers: 3,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 4,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        rope_scaling: RopeScaling::None,
        max_position_embeddings: 64,
        tie_word_embeddings: false,
        qkv_bias: false,
        o_bias: false,
        mlp_bias: false,
        sliding_window: None,
        bos_token_id: Some(1),
        eos_token_ids: vec![2],
        hidden_act: Activation::Silu,
        scale_embeddings: false,
        query_pre_attn_scalar: None,
        layer_types: Vec::new(),
        rope_local_theta: None,
        attn_logit_softcapping: None,
        final_logit_softcapping: None,
    }
}

/// [`tiny_config`] as another family: Gemma 3 (GeGLU, `√d` embedding scale, `(1 + w)` norms
/// around both sub-layers, per-head q/k norms, layers sliding (window 3, local RoPE base 100) /
/// full (base 10,000) / sliding, `query_pre_attn_scalar` 8), Gemma 2 (the same without q/k
/// norms and local base, with attention and final soft-caps 1 and 2) or OLMo-2 (norms on the
/// sub-layer outputs only, q/k norms over the whole projections); LLaMA otherwise.
pub fn tiny_family_config(arch: Architecture) -> ModelConfig {
    let mut cfg = tiny_config();
    cfg.architecture = arch;
    if arch.is_gemma() {
        cfg.hidden_act = Activation::GeluTanh;
        cfg.scale_embeddings = true;
        cfg.query_pre_attn_scalar = Some(8.0);
        cfg.sliding_window = Some(3);
        cfg.layer_types = vec![LayerType::Sliding, LayerType::Full, LayerType::Sliding];
        cfg.tie_word_embeddings = true;
    }
    if arch == Architecture::Gemma3 {
        cfg.rope_local_theta = Some(100.0);
    }
    if arch == Architecture::Gemma2 {
        cfg.attn_logit_softcapping = Some(1.0);
        cfg.final_logit_softcapping = Some(2.0);
    }
    cfg
}

/// The `config.json` text of [`tiny_config`].
pub fn tiny_config_json(cfg: &ModelConfig) -> String {
    serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_bias": cfg.qkv_bias || cfg.o_bias,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_ids.first(),
        "torch_dtype": "float32",
    })
    .to_string()
}

fn randn(rng: &mut rand::rngs::StdRng, n: usize, std: f64) -> Vec<f32> {
    // Box-Muller; `rand_distr` is not worth a dependency for this.
    (0..n)
        .map(|_| {
            let u1: f64 = rng.random::<f64>().max(1e-12);
            let u2: f64 = rng.random::<f64>();
            ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos() * std) as f32
        })
        .collect()
}

/// Random weights for `cfg`, by Hugging Face name, from `seed`.
pub fn tiny_weights(cfg: &ModelConfig, seed: u64) -> Result<BTreeMap<String, Tensor>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let dev = Device::Cpu;
    let d = cfg.hidden_size;
    let q = cfg.num_attention_heads * cfg.head_dim;
    let kv = cfg.num_key_value_heads * cfg.head_dim;
    let ff = cfg.intermediate_size;
    // Gains near 1, stored as the family's files store them (Gemma: `gain − 1`).
    let gain_mean = (1.0 - cfg.architecture.norm_weight_offset()) as f32;
    let mut tensors = BTreeMap::new();
    let mut put = |name: String, shape: &[usize], std: f64, mean: f32| -> Result<()> {
        let n = shape.iter().product();
        let values: Vec<f32> = randn(&mut rng, n, std)
            .into_iter()
            .map(|v| v + mean)
            .collect();
        tensors.insert(name, Tensor::from_vec(values, shape, &dev)?);
        Ok(())
    };
    put(
        "model.embed_tokens.weight".into(),
        &[cfg.vocab_size, d],
        1.0,
        0.0,
    )?;
    for i in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{i}");
        let names = NormNames::of(cfg.architecture);
        for name in [names.pre_attn, names.pre_mlp, names.attn_out, names.mlp_out]
            .into_iter()
            .flatten()
        {
            put(format!("{p}.{name}.weight"), &[d], 0.1, gain_mean)?;
        }
        if cfg.architecture.has_qk_norm() {
            let whole = cfg.architecture == Architecture::Olmo2;
            let (q_len, k_len) = if whole {
                (q, kv)
            } else {
                (cfg.head_dim, cfg.head_dim)
            };
            put(
                format!("{p}.self_attn.q_norm.weight"),
                &[q_len],
                0.2,
                gain_mean,
            )?;
            put(
                format!("{p}.self_attn.k_norm.weight"),
                &[k_len],
                0.2,
                gain_mean,
            )?;
        }
        let s = 1.0 / (d as f64).sqrt();
        put(
            format!("{p}.self_attn.q_proj.weight"),
            &[q, d],
            s * 2.0,
            0.0,
        )?;
        put(
            format!("{p}.self_attn.k_proj.weight"),
            &[kv, d],
            s * 2.0,
            0.0,
        )?;
        put(format!("{p}.self_attn.v_proj.weight"), &[kv, d], s, 0.0)?;
        put(format!("{p}.self_attn.o_proj.weight"), &[d, q], s, 0.0)?;
        if cfg.qkv_bias {
            put(format!("{p}.self_attn.q_proj.bias"), &[q], 0.1, 0.0)?;
            put(format!("{p}.self_attn.k_proj.bias"), &[kv], 0.1, 0.0)?;
            put(format!("{p}.self_attn.v_proj.bias"), &[kv], 0.1, 0.0)?;
        }
        if cfg.o_bias {
            put(format!("{p}.self_attn.o_proj.bias"), &[d], 0.1, 0.0)?;
        }
        put(format!("{p}.mlp.gate_proj.weight"), &[ff, d], s, 0.0)?;
        put(format!("{p}.mlp.up_proj.weight"), &[ff, d], s, 0.0)?;
        put(
            format!("{p}.mlp.down_proj.weight"),
            &[d, ff],
            1.0 / (ff as f64).sqrt(),
            0.0,
        )?;
    }
    put("model.norm.weight".into(), &[d], 0.1, gain_mean)?;
    if !cfg.tie_word_embeddings {
        put(
            "lm_head.weight".into(),
            &[cfg.vocab_size, d],
            1.0 / (d as f64).sqrt() * 3.0,
            0.0,
        )?;
    }
    if cfg.architecture == Architecture::Phi3 {
        fuse_phi3(&mut tensors, cfg.num_hidden_layers)?;
    }
    Ok(tensors)
}

/// Phi-3's files fuse q, k, v into `qkv_proj` and gate, up into `gate_up_proj` (rows stacked).
fn fuse_phi3(tensors: &mut BTreeMap<String, Tensor>, layers: usize) -> Result<()> {
    for i in 0..layers {
        for (fused, parts) in [
            (
                "self_attn.qkv_proj",
                &["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"][..],
            ),
            ("mlp.gate_up_proj", &["mlp.gate_proj", "mlp.up_proj"][..]),
        ] {
            let rows = parts
                .iter()
                .map(|part| {
                    tensors
                        .remove(&format!("model.layers.{i}.{part}.weight"))
                        .ok_or_else(|| Error::invalid("tiny model", format!("no {part}")))
                })
                .collect::<Result<Vec<_>>>()?;
            tensors.insert(
                format!("model.layers.{i}.{fused}.weight"),
                Tensor::cat(&rows, 0)?,
            );
        }
    }
    Ok(())
}

/// The tiny word-level tokenizer (64 entries, whitespace pre-tokenizer).
pub fn tiny_tokenizer() -> Result<tokenizers::Tokenizer> {
    let mut vocab: HashMap<String, u32> = HashMap::new();
    for (i, t) in SPECIAL.iter().chain(WORDS.iter()).enumerate() {
        vocab.insert((*t).to_owned(), i as u32);
    }
    let model = tokenizers::models::wordlevel::WordLevel::builder()
        .vocab(vocab.into_iter().collect())
        .unk_token("<unk>".to_owned())
        .build()
        .map_err(|err| Error::Tokenizer(err.to_string()))?;
    let mut tokenizer = tokenizers::Tokenizer::new(model);
    tokenizer.with_pre_tokenizer(Some(tokenizers::pre_tokenizers::whitespace::Whitespace));
    let special: Vec<tokenizers::AddedToken> = SPECIAL
        .iter()
        .map(|t| tokenizers::AddedToken::from((*t).to_owned(), true))
        .collect();
    tokenizer.add_special_tokens(&special);
    Ok(tokenizer)
}

/// A tiny model in memory, f32 on the CPU unless `opts` says otherwise.
pub fn tiny_model(seed: u64, opts: &LoadOptions) -> Result<LoadedModel> {
    tiny_model_with(&tiny_config(), seed, opts)
}

/// A tiny model with a custom config (e.g. tied embeddings or biases).
pub fn tiny_model_with(cfg: &ModelConfig, seed: u64, opts: &LoadOptions) -> Result<LoadedModel> {
    let source = TensorMap {
        tensors: tiny_weights(cfg, seed)?,
        packed: BTreeMap::new(),
        path: format!("tiny-model-seed-{seed}").into(),
    };
    tiny_from(cfg, seed, source, opts)
}

/// The tiny model with every weight matrix quantised to `kind` (any GGUF type candle can
/// quantise to, f16 and bf16 included; `cfg`'s matrix widths must be whole blocks), twice: kept
/// as stored, and expanded to f32 at load (the same values, dense). The pair tests the
/// tile-wise products against the dense ones on whole models.
pub fn tiny_packed_pair(
    cfg: &ModelConfig,
    seed: u64,
    kind: candle_core::quantized::GgmlDType,
) -> Result<(LoadedModel, LoadedModel)> {
    let Some(packed_kind) = crate::model::packed::PackedKind::from_ggml(kind) else {
        return Err(Error::invalid(
            "tiny model",
            format!("{kind:?} is not kept as stored"),
        ));
    };
    let mut dense = BTreeMap::new();
    let mut packed = BTreeMap::new();
    for (name, t) in tiny_weights(cfg, seed)? {
        if t.rank() != 2 {
            dense.insert(name, t);
            continue;
        }
        let (rows, cols) = t.dims2()?;
        let q = candle_core::quantized::QTensor::quantize(&t, kind)?;
        dense.insert(name.clone(), q.dequantize(&Device::Cpu)?);
        let bytes = q.data()?.into_owned();
        packed.insert(
            name,
            crate::model::packed::PackedMatrix::new(packed_kind, rows, cols, bytes)?,
        );
    }
    let stored_opts = LoadOptions {
        weights: crate::model::WeightStorage::Stored,
        ..LoadOptions::default()
    };
    let stored = tiny_from(
        cfg,
        seed,
        TensorMap {
            tensors: dense
                .iter()
                .filter(|(name, _)| !packed.contains_key(*name))
                .map(|(n, t)| (n.clone(), t.clone()))
                .collect(),
            packed,
            path: format!("tiny-model-seed-{seed}-{kind:?}").into(),
        },
        &stored_opts,
    )?;
    let expanded = tiny_from(
        cfg,
        seed,
        TensorMap {
            tensors: dense,
            packed: BTreeMap::new(),
            path: format!("tiny-model-seed-{seed}-{kind:?}-f32").into(),
        },
        &LoadOptions::default(),
    )?;
    Ok((stored, expanded))
}

fn tiny_from(
    cfg: &ModelConfig,
    seed: u64,
    mut source: TensorMap,
    opts: &LoadOptions,
) -> Result<LoadedModel> {
    let model = build_transformer(cfg.clone(), &mut source, opts, &mut |_| {
        std::ops::ControlFlow::Continue(())
    })?;
    let tokenizer = Tokenizer::new(
        tiny_tokenizer()?,
        Some(("<s>".to_owned(), 1)),
        Some(("</s>".to_owned(), 2)),
        &cfg.eos_token_ids,
    );
    let chat_template = Some(tokenizer.chat_template(TINY_CHAT_TEMPLATE.to_owned()));
    let mut info = ModelInfo::describe(&model, "memory", "f32", true);
    info.source = format!("tiny-model-seed-{seed}");
    Ok(LoadedModel {
        model,
        tokenizer,
        chat_template,
        info,
    })
}

/// Writes the tiny model as a Hugging Face folder: `config.json`, `model.safetensors`,
/// `tokenizer.json`, `tokenizer_config.json` (with the chat template).
pub fn write_tiny_hf_folder(dir: &Path, cfg: &ModelConfig, seed: u64) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("config.json"), tiny_config_json(cfg))?;
    let tensors: HashMap<String, Tensor> = tiny_weights(cfg, seed)?.into_iter().collect();
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors"))?;
    tiny_tokenizer()?
        .save(dir.join("tokenizer.json"), false)
        .map_err(|err| Error::Tokenizer(err.to_string()))?;
    let tokenizer_config = serde_json::json!({
        "bos_token": "<s>",
        "eos_token": "</s>",
        "chat_template": TINY_CHAT_TEMPLATE,
    });
    std::fs::write(
        dir.join("tokenizer_config.json"),
        tokenizer_config.to_string(),
    )?;
    Ok(())
}

/// The tiny model's weights converted to `dtype` (for f64 finite-difference checks).
pub fn tiny_options(dtype: DType) -> LoadOptions {
    LoadOptions {
        device: Device::Cpu,
        dtype,
        weights: crate::model::WeightStorage::F32,
    }
}
