//! Writes a Llama-2-7B-shaped checkpoint with seeded random weights, for measuring memory and
//! speed at the papers' scale where no real 7B checkpoint is reachable (`scripts/make-synthetic`).
//!
//! Output, under `--out DIR` (default `models/synthetic-7b`):
//! - `llama2-7b-bf16/`: a Hugging Face folder (`config.json` with Llama-2-7B's real sizes: 32
//!   layers, hidden 4096, MLP 11008, 32 heads, 32,000 tokens; one bf16 `model.safetensors`
//!   written a tensor at a time; `tokenizer.json`, `tokenizer_config.json`);
//! - `llama2-7b-Q4_K.gguf`: the same weights quantised to Q4_K (norms f32), q/k rows permuted
//!   as llama.cpp's converter writes them, with llama.cpp's metadata keys.
//!
//! The tokenizer is the demo model's byte-level BPE cut to its first 32,000 tokens (merges
//! whose parts or result fall outside are dropped), so text tokenizes as in a real model.
//! Weights: approximately normal (sum of four uniforms) with std 0.02, norms 1 ± 0.05.
//!
//!   cargo run --release --example make_synthetic -- [--out DIR] [--layers N]

use std::borrow::Cow;
use std::collections::HashSet;
use std::fs::File;
use std::io::{BufWriter, Write as _};
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{Device, Tensor};
use rayon::prelude::*;
use serde_json::json;
use tunelens::model::lora::SplitMix64;
use tunelens::model::tokenizer::{GgufVocab, Tokenizer};

const VOCAB: usize = 32_000;
const HIDDEN: usize = 4096;
const FFN: usize = 11_008;
const HEADS: usize = 32;
const CONTEXT: usize = 4096;

/// One tensor of the checkpoint.
struct Spec {
    hf: String,
    gguf: String,
    shape: Vec<usize>,
    /// Norm gain (1 ± 0.05) rather than a weight matrix (std 0.02).
    norm: bool,
    /// q/k rows to permute for GGUF, with this many heads.
    permute_heads: Option<usize>,
}

fn specs(layers: usize) -> Vec<Spec> {
    let matrix = |hf: String, gguf: String, shape: [usize; 2], permute: bool| Spec {
        hf,
        gguf,
        shape: shape.to_vec(),
        norm: false,
        permute_heads: permute.then_some(HEADS),
    };
    let norm = |hf: String, gguf: String| Spec {
        hf,
        gguf,
        shape: vec![HIDDEN],
        norm: true,
        permute_heads: None,
    };
    let mut all = vec![matrix(
        "model.embed_tokens.weight".into(),
        "token_embd.weight".into(),
        [VOCAB, HIDDEN],
        false,
    )];
    for i in 0..layers {
        let (p, b) = (format!("model.layers.{i}"), format!("blk.{i}"));
        all.push(norm(
            format!("{p}.input_layernorm.weight"),
            format!("{b}.attn_norm.weight"),
        ));
        for (hf, gguf, permute) in [
            ("q_proj", "attn_q", true),
            ("k_proj", "attn_k", true),
            ("v_proj", "attn_v", false),
            ("o_proj", "attn_output", false),
        ] {
            all.push(matrix(
                format!("{p}.self_attn.{hf}.weight"),
                format!("{b}.{gguf}.weight"),
                [HIDDEN, HIDDEN],
                permute,
            ));
        }
        all.push(norm(
            format!("{p}.post_attention_layernorm.weight"),
            format!("{b}.ffn_norm.weight"),
        ));
        for (hf, gguf, shape) in [
            ("gate_proj", "ffn_gate", [FFN, HIDDEN]),
            ("up_proj", "ffn_up", [FFN, HIDDEN]),
            ("down_proj", "ffn_down", [HIDDEN, FFN]),
        ] {
            all.push(matrix(
                format!("{p}.mlp.{hf}.weight"),
                format!("{b}.{gguf}.weight"),
                shape,
                false,
            ));
        }
    }
    all.push(norm(
        "model.norm.weight".into(),
        "output_norm.weight".into(),
    ));
    all.push(matrix(
        "lm_head.weight".into(),
        "output.weight".into(),
        [VOCAB, HIDDEN],
        false,
    ));
    all
}

/// Seeded values of tensor `index`, rounded to bf16 (the bf16 file and the GGUF hold the same
/// model).
fn values(spec: &Spec, index: usize) -> Vec<half::bf16> {
    let n: usize = spec.shape.iter().product();
    let mut out = vec![half::bf16::ZERO; n];
    out.par_chunks_mut(1 << 16)
        .enumerate()
        .for_each(|(chunk, part)| {
            let mut rng = SplitMix64(((index as u64) << 32) ^ chunk as u64 ^ 0x7B_5EED);
            for v in part.iter_mut() {
                let bits = rng.next_u64();
                // Sum of four uniforms on [0, 1): mean 2, variance 1/3.
                let s: f32 = (0..4)
                    .map(|k| f32::from(((bits >> (16 * k)) & 0xFFFF) as u16) / 65536.0)
                    .sum();
                let z = (s - 2.0) * 3f32.sqrt();
                let x = if spec.norm { 1.0 + 0.05 * z } else { 0.02 * z };
                *v = half::bf16::from_f32(x);
            }
        });
    out
}

/// llama.cpp's q/k permutation: stored row `h·hd + 2i + j` is Hugging Face row
/// `h·hd + j·hd/2 + i`.
fn permute_rows(w: &[f32], rows: usize, cols: usize, heads: usize) -> Vec<f32> {
    let hd = rows / heads;
    let mut out = vec![0f32; w.len()];
    for h in 0..heads {
        for i in 0..hd / 2 {
            for j in 0..2 {
                let (dst, src) = (h * hd + 2 * i + j, h * hd + j * hd / 2 + i);
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

/// Q4_K blocks of `w` (rows × cols), rows quantised in parallel.
fn quantize_q4k(w: &[f32], rows: usize, cols: usize) -> anyhow::Result<QTensor> {
    let chunk_rows = 64;
    let parts: Vec<Vec<u8>> = w
        .par_chunks(chunk_rows * cols)
        .map(|part| -> anyhow::Result<Vec<u8>> {
            let t = Tensor::from_slice(part, (part.len() / cols, cols), &Device::Cpu)?;
            Ok(QTensor::quantize(&t, GgmlDType::Q4K)?.data()?.into_owned())
        })
        .collect::<anyhow::Result<_>>()?;
    let bytes: Vec<u8> = parts.concat();
    let storage = QStorage::from_data(Cow::Owned(bytes), &Device::Cpu, GgmlDType::Q4K)?;
    Ok(QTensor::new(storage, (rows, cols))?)
}

/// The demo model's vocabulary cut to `VOCAB` tokens.
fn vocab(demo: &Path) -> anyhow::Result<(GgufVocab, Option<String>)> {
    let mut reader = std::io::BufReader::new(
        File::open(demo)
            .with_context(|| format!("{}: run scripts/fetch-models first", demo.display()))?,
    );
    let content = gguf_file::Content::read(&mut reader)?;
    let strings = |key: &str| -> anyhow::Result<Vec<String>> {
        match content.metadata.get(key) {
            Some(Value::Array(items)) => Ok(items
                .iter()
                .filter_map(|v| v.to_string().ok().cloned())
                .collect()),
            _ => anyhow::bail!("{key} missing in {}", demo.display()),
        }
    };
    let tokens: Vec<String> = strings("tokenizer.ggml.tokens")?
        .into_iter()
        .take(VOCAB)
        .collect();
    let kept: HashSet<&str> = tokens.iter().map(String::as_str).collect();
    let merges: Vec<String> = strings("tokenizer.ggml.merges")?
        .into_iter()
        .filter(|m| {
            m.split_once(' ').is_some_and(|(a, b)| {
                kept.contains(a) && kept.contains(b) && kept.contains(format!("{a}{b}").as_str())
            })
        })
        .collect();
    let token_types = match content.metadata.get("tokenizer.ggml.token_type") {
        Some(Value::Array(items)) => items
            .iter()
            .take(VOCAB)
            .map(|v| v.to_i32().map_or(1, i64::from))
            .collect(),
        _ => Vec::new(),
    };
    let id = |key: &str| content.metadata.get(key).and_then(|v| v.to_u32().ok());
    let template = content
        .metadata
        .get("tokenizer.chat_template")
        .and_then(|v| v.to_string().ok().cloned());
    Ok((
        GgufVocab {
            architecture: "llama".into(),
            model: "gpt2".into(),
            pre: content
                .metadata
                .get("tokenizer.ggml.pre")
                .and_then(|v| v.to_string().ok().cloned()),
            tokens,
            token_types,
            merges,
            bos_token_id: id("tokenizer.ggml.bos_token_id"),
            eos_token_id: id("tokenizer.ggml.eos_token_id"),
            add_bos_token: false,
        },
        template,
    ))
}

fn main() -> anyhow::Result<()> {
    tunelens::model::configure_cpu_threads();
    let mut args = std::env::args().skip(1);
    let mut out = PathBuf::from("models/synthetic-7b");
    let mut layers = 32usize;
    let demo = PathBuf::from("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--out" => out = args.next().context("--out DIR")?.into(),
            "--layers" => layers = args.next().context("--layers N")?.parse()?,
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    let folder = out.join("llama2-7b-bf16");
    let gguf_path = out.join("llama2-7b-Q4_K.gguf");
    std::fs::create_dir_all(&folder)?;
    let (vocab, template) = vocab(&demo)?;
    let tokenizer = Tokenizer::from_gguf_vocab(&vocab, &demo)?;
    tokenizer
        .inner()
        .save(folder.join("tokenizer.json"), false)
        .map_err(|err| anyhow::anyhow!("tokenizer.json: {err}"))?;
    let token = |id: Option<u32>| id.and_then(|i| vocab.tokens.get(i as usize).cloned());
    std::fs::write(
        folder.join("tokenizer_config.json"),
        serde_json::to_string_pretty(&json!({
            "bos_token": token(vocab.bos_token_id),
            "eos_token": token(vocab.eos_token_id),
            "chat_template": template,
        }))?,
    )?;
    std::fs::write(
        folder.join("config.json"),
        serde_json::to_string_pretty(&json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": VOCAB,
            "hidden_size": HIDDEN,
            "intermediate_size": FFN,
            "num_hidden_layers": layers,
            "num_attention_heads": HEADS,
            "num_key_value_heads": HEADS,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "max_position_embeddings": CONTEXT,
            "tie_word_embeddings": false,
            "hidden_act": "silu",
            "bos_token_id": vocab.bos_token_id,
            "eos_token_id": vocab.eos_token_id,
            "torch_dtype": "bfloat16",
        }))?,
    )?;

    // safetensors: the header (offsets known from the shapes), then each tensor's bytes.
    let specs = specs(layers);
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for s in &specs {
        let bytes = 2 * s.shape.iter().product::<usize>();
        header.insert(
            s.hf.clone(),
            json!({"dtype": "BF16", "shape": s.shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut text = serde_json::to_string(&header)?;
    while text.len() % 8 != 0 {
        text.push(' ');
    }
    let mut file =
        BufWriter::with_capacity(1 << 22, File::create(folder.join("model.safetensors"))?);
    file.write_all(&(text.len() as u64).to_le_bytes())?;
    file.write_all(text.as_bytes())?;
    let mut quantized: Vec<(String, QTensor)> = Vec::with_capacity(specs.len());
    let started = std::time::Instant::now();
    for (index, s) in specs.iter().enumerate() {
        let v = values(s, index);
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect();
        file.write_all(&bytes)?;
        drop(bytes);
        let f: Vec<f32> = v.iter().map(|x| x.to_f32()).collect();
        drop(v);
        let q = if s.norm {
            QTensor::quantize(
                &Tensor::from_slice(&f, s.shape.as_slice(), &Device::Cpu)?,
                GgmlDType::F32,
            )?
        } else {
            let (rows, cols) = (s.shape[0], s.shape[1]);
            let f = match s.permute_heads {
                Some(heads) => permute_rows(&f, rows, cols, heads),
                None => f,
            };
            quantize_q4k(&f, rows, cols)?
        };
        quantized.push((s.gguf.clone(), q));
        eprint!(
            "\r{}/{} tensors, {:.0} s",
            index + 1,
            specs.len(),
            started.elapsed().as_secs_f64()
        );
    }
    file.flush()?;
    drop(file);
    eprintln!();

    let u32v = |v: usize| Value::U32(u32::try_from(v).unwrap_or(u32::MAX));
    let mut meta: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String("llama".into())),
        (
            "general.name".into(),
            Value::String("synthetic llama-2-7b".into()),
        ),
        ("llama.context_length".into(), u32v(CONTEXT)),
        ("llama.embedding_length".into(), u32v(HIDDEN)),
        ("llama.block_count".into(), u32v(layers)),
        ("llama.feed_forward_length".into(), u32v(FFN)),
        ("llama.attention.head_count".into(), u32v(HEADS)),
        ("llama.attention.head_count_kv".into(), u32v(HEADS)),
        ("llama.rope.dimension_count".into(), u32v(HIDDEN / HEADS)),
        ("llama.rope.freq_base".into(), Value::F32(10_000.0)),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            Value::F32(1e-5),
        ),
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(vocab.tokens.iter().cloned().map(Value::String).collect()),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(
                vocab
                    .token_types
                    .iter()
                    .map(|&t| Value::I32(i32::try_from(t).unwrap_or(1)))
                    .collect(),
            ),
        ),
        (
            "tokenizer.ggml.merges".into(),
            Value::Array(vocab.merges.iter().cloned().map(Value::String).collect()),
        ),
    ];
    if let Some(pre) = &vocab.pre {
        meta.push(("tokenizer.ggml.pre".into(), Value::String(pre.clone())));
    }
    for (key, id) in [
        ("tokenizer.ggml.bos_token_id", vocab.bos_token_id),
        ("tokenizer.ggml.eos_token_id", vocab.eos_token_id),
    ] {
        if let Some(id) = id {
            meta.push((key.into(), Value::U32(id)));
        }
    }
    if let Some(t) = &template {
        meta.push(("tokenizer.chat_template".into(), Value::String(t.clone())));
    }
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> =
        quantized.iter().map(|(n, q)| (n.as_str(), q)).collect();
    let mut gguf = BufWriter::with_capacity(1 << 22, File::create(&gguf_path)?);
    gguf_file::write(&mut gguf, &meta_refs, &tensor_refs)?;
    gguf.flush()?;
    println!(
        "{}",
        json!({
            "folder": folder,
            "gguf": gguf_path,
            "layers": layers,
            "seconds": started.elapsed().as_secs_f64(),
        })
    );
    Ok(())
}
