//! GGUF checkpoints (llama.cpp format): hyper-parameters from metadata, weights dequantized to
//! the target dtype (quantized matmul is 10-20x slower than f32 on CPU and drops gradients), a
//! byte-level BPE tokenizer from the vocabulary, and the chat template from metadata.
//!
//! llama.cpp's converter permutes the q/k rows of LLaMA weights for its interleaved RoPE; they
//! are permuted back here so the model runs Hugging Face's rotate-half RoPE, and hooks and
//! gradients see exactly the tensors transformers would.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{Device, Tensor};

use crate::error::{Error, Result};
use crate::model::config::{
    gemma3_layer_types, Activation, Architecture, ModelConfig, RopeScaling,
};
use crate::model::info::ModelInfo;
use crate::model::load::{
    build_transformer, first_line, report, LoadOptions, LoadedModel, Progress, TensorMap,
};
use crate::model::packed::{PackedKind, PackedMatrix};
use crate::model::tokenizer::{GgufVocab, Tokenizer};
use crate::model::weight::WeightStorage;

/// Loads a `.gguf` file.
pub fn load_gguf(path: &Path, opts: &LoadOptions, progress: Progress<'_>) -> Result<LoadedModel> {
    let file =
        File::open(path).map_err(|err| Error::bad_file(path, format!("cannot open ({err})")))?;
    let file_len = file.metadata()?.len();
    let mut reader = BufReader::new(file);
    let content = Content::read(&mut reader).map_err(|err| {
        Error::bad_file(
            path,
            format!("not a valid GGUF file ({})", first_line(&err)),
        )
    })?;
    check_complete(&content, file_len, path)?;
    let meta = Meta {
        values: &content.metadata,
        path,
    };
    let arch_name = meta.string("general.architecture")?;
    let Some(architecture) = Architecture::parse(&arch_name) else {
        return Err(Error::UnsupportedArchitecture {
            arch: arch_name,
            path: path.to_path_buf(),
        });
    };
    // llama.cpp writes OLMo-3 under OLMo-2's name, with sliding-window layers.
    let olmo_window = format!("{arch_name}.attention.sliding_window");
    if architecture == Architecture::Olmo2 && content.metadata.contains_key(&olmo_window) {
        return Err(Error::bad_file(
            path,
            format!("{olmo_window}: OLMo-3's sliding-window layers are not supported"),
        ));
    }
    let vocab = read_vocab(&meta)?;
    let cfg = config_from_meta(&meta, &arch_name, architecture, &content, &vocab)?;
    let mut source_dtypes: Vec<String> = content
        .tensor_infos
        .values()
        .map(|info| format!("{:?}", info.ggml_dtype))
        .collect();
    source_dtypes.sort();
    source_dtypes.dedup();

    // Dequantize tensor by tensor, renaming to Hugging Face names (sorted for determinism).
    let names: BTreeSet<&String> = content.tensor_infos.keys().collect();
    let mut tensors = BTreeMap::new();
    let mut packed = BTreeMap::new();
    let total = names.len().max(1);
    for (done, name) in names.into_iter().enumerate() {
        // Dequantization is most of a GGUF load: 90% of the bar.
        report(progress, 0.9 * done as f32 / total as f32)?;
        let Some(hf_name) = hf_name(name, architecture) else {
            if name.as_str() == "rope_freqs.weight" {
                return Err(Error::bad_file(
                    path,
                    "GGUF rope_freqs (LLaMA-3.1 rope scaling) is not supported; load the Hugging Face folder instead",
                ));
            }
            log::debug!("ignoring GGUF tensor {name}");
            continue;
        };
        let qtensor = content
            .tensor(&mut reader, name, &Device::Cpu)
            .map_err(|err| {
                Error::bad_file(path, format!("tensor `{name}`: {}", first_line(&err)))
            })?;
        if opts.weights == WeightStorage::Stored && is_matrix(&hf_name) {
            if let Some(kind) = PackedKind::from_ggml(qtensor.dtype()) {
                let (rows, cols) = qtensor.shape().dims2().map_err(|err| {
                    Error::bad_file(path, format!("tensor `{name}`: {}", first_line(&err)))
                })?;
                let bytes = qtensor
                    .data()
                    .map_err(|err| {
                        Error::bad_file(path, format!("tensor `{name}`: {}", first_line(&err)))
                    })?
                    .into_owned();
                drop(qtensor);
                let mut matrix = PackedMatrix::new(kind, rows, cols, bytes)
                    .map_err(|err| Error::bad_file(path, format!("tensor `{name}`: {err}")))?;
                if let Some(heads) = permuted_heads(&hf_name, architecture, &cfg) {
                    matrix = matrix.permute_rows(&unpermute_order(rows, heads))?;
                }
                packed.insert(hf_name, matrix);
                continue;
            }
        }
        let mut tensor = qtensor.dequantize(&Device::Cpu).map_err(|err| {
            Error::bad_file(path, format!("tensor `{name}`: {}", first_line(&err)))
        })?;
        // llama.cpp stores Gemma's norm gains with the 1 added; the loader adds it, so take it
        // off as transformers' GGUF loader does.
        if architecture.norm_weight_offset() != 0.0 && hf_name.ends_with("norm.weight") {
            tensor = (tensor - architecture.norm_weight_offset())?;
        }
        if architecture == Architecture::Llama || architecture == Architecture::Mistral {
            if hf_name.ends_with("q_proj.weight") || hf_name.ends_with("q_proj.bias") {
                tensor = unpermute(&tensor, cfg.num_attention_heads)?;
            } else if hf_name.ends_with("k_proj.weight") || hf_name.ends_with("k_proj.bias") {
                tensor = unpermute(&tensor, cfg.num_key_value_heads)?;
            }
        }
        tensors.insert(hf_name, tensor);
    }
    let mut source = TensorMap {
        tensors,
        packed,
        path: path.to_path_buf(),
    };
    let model = build_transformer(cfg, &mut source, opts, &mut |frac| {
        progress(0.9 + 0.1 * frac)
    })?;
    let tokenizer = Tokenizer::from_gguf_vocab(&vocab, path)?;
    let chat_template = meta
        .optional_string("tokenizer.chat_template")
        .map(|source| tokenizer.chat_template(source));
    let info = ModelInfo::describe(
        &model,
        "gguf",
        &source_dtypes.join("+"),
        chat_template.is_some(),
    );
    Ok(LoadedModel {
        model,
        tokenizer,
        chat_template,
        info,
    })
}

/// Fails early, with a clear message, when the file ends before its last tensor.
fn check_complete(content: &Content, file_len: u64, path: &Path) -> Result<()> {
    let mut needed = content.tensor_data_offset;
    let sorted: BTreeMap<&String, _> = content.tensor_infos.iter().collect();
    for (name, info) in sorted {
        let elems = info.shape.elem_count();
        let block = info.ggml_dtype.block_size();
        let bytes = (elems / block.max(1)) * info.ggml_dtype.type_size();
        let end = content.tensor_data_offset + info.offset + bytes as u64;
        if end > file_len {
            return Err(Error::bad_file(
                path,
                format!("truncated GGUF file: tensor `{name}` needs {end} bytes, the file has {file_len}"),
            ));
        }
        needed = needed.max(end);
    }
    log::debug!("GGUF tensor data ends at byte {needed} of {file_len}");
    Ok(())
}

/// Whether a Hugging Face tensor name is a weight matrix (kept as stored on request).
fn is_matrix(hf_name: &str) -> bool {
    hf_name.ends_with(".weight") && !hf_name.ends_with("norm.weight")
}

/// LLaMA-style GGUF files permute q/k rows per head; the head count to undo it with, for the
/// tensors that need it.
fn permuted_heads(hf_name: &str, arch: Architecture, cfg: &ModelConfig) -> Option<usize> {
    if arch != Architecture::Llama && arch != Architecture::Mistral {
        return None;
    }
    if hf_name.ends_with("q_proj.weight") {
        Some(cfg.num_attention_heads)
    } else if hf_name.ends_with("k_proj.weight") {
        Some(cfg.num_key_value_heads)
    } else {
        None
    }
}

/// The row order [`unpermute`] applies: output row `h·hd + j·hd/2 + i` is stored row
/// `h·hd + 2i + j`.
fn unpermute_order(rows: usize, n_head: usize) -> Vec<usize> {
    let head_dim = rows / n_head.max(1);
    let half = head_dim / 2;
    let mut order = Vec::with_capacity(rows);
    for h in 0..n_head {
        for j in 0..2 {
            for i in 0..half {
                order.push(h * head_dim + 2 * i + j);
            }
        }
    }
    order
}

/// Inverts llama.cpp's `permute(w, n_head)`: rows `(head, pair, half)` back to `(head, half, pair)`.
fn unpermute(w: &Tensor, n_head: usize) -> Result<Tensor> {
    let dims = w.dims().to_vec();
    let rows = dims[0];
    let rest: usize = dims[1..].iter().product();
    let head_dim = rows / n_head;
    let out = w
        .reshape((n_head, head_dim / 2, 2, rest))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)?;
    Ok(out)
}

/// GGUF tensor name → Hugging Face name, for a file of architecture `arch`.
fn hf_name(gguf: &str, arch: Architecture) -> Option<String> {
    match gguf {
        "token_embd.weight" => return Some("model.embed_tokens.weight".to_owned()),
        "output_norm.weight" => return Some("model.norm.weight".to_owned()),
        "output.weight" => return Some("lm_head.weight".to_owned()),
        _ => {}
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, kind) = rest.rsplit_once('.')?;
    let hf_module = match module {
        "attn_norm" => "input_layernorm",
        // Gemma calls the pre-MLP norm `pre_feedforward_layernorm` and uses
        // `post_attention_layernorm` for the norm on the attention output.
        "ffn_norm" if arch.is_gemma() => "pre_feedforward_layernorm",
        "ffn_norm" | "post_attention_norm" => "post_attention_layernorm",
        "post_ffw_norm" => "post_feedforward_layernorm",
        "attn_q_norm" => "self_attn.q_norm",
        "attn_k_norm" => "self_attn.k_norm",
        "attn_q" => "self_attn.q_proj",
        // Phi-3 keeps q, k, v fused, and gate with up in `ffn_up` (2 · d_ff rows).
        "attn_qkv" => "self_attn.qkv_proj",
        "ffn_up" if arch == Architecture::Phi3 => "mlp.gate_up_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf_module}.{kind}"))
}

struct Meta<'a> {
    values: &'a HashMap<String, Value>,
    path: &'a Path,
}

impl Meta<'_> {
    fn get(&self, key: &str) -> Result<&Value> {
        self.values
            .get(key)
            .ok_or_else(|| Error::bad_field(self.path, key))
    }

    fn string(&self, key: &str) -> Result<String> {
        match self.get(key)? {
            Value::String(s) => Ok(s.clone()),
            _ => Err(Error::bad_field(self.path, key)),
        }
    }

    fn optional_string(&self, key: &str) -> Option<String> {
        match self.values.get(key)? {
            Value::String(s) => Some(s.clone()),
            _ => None,
        }
    }

    fn number(&self, key: &str) -> Result<f64> {
        as_f64(self.get(key)?).ok_or_else(|| Error::bad_field(self.path, key))
    }

    fn optional_number(&self, key: &str) -> Result<Option<f64>> {
        match self.values.get(key) {
            None => Ok(None),
            Some(v) => as_f64(v)
                .map(Some)
                .ok_or_else(|| Error::bad_field(self.path, key)),
        }
    }

    fn count(&self, key: &str) -> Result<usize> {
        let v = self.number(key)?;
        if v < 0.0 || v.fract() != 0.0 {
            return Err(Error::bad_field(self.path, key));
        }
        Ok(v as usize)
    }

    fn strings(&self, key: &str) -> Result<Vec<String>> {
        let Value::Array(items) = self.get(key)? else {
            return Err(Error::bad_field(self.path, key));
        };
        items
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.clone()),
                _ => Err(Error::bad_field(self.path, key)),
            })
            .collect()
    }
}

fn as_f64(value: &Value) -> Option<f64> {
    Some(match value {
        Value::U8(v) => f64::from(*v),
        Value::I8(v) => f64::from(*v),
        Value::U16(v) => f64::from(*v),
        Value::I16(v) => f64::from(*v),
        Value::U32(v) => f64::from(*v),
        Value::I32(v) => f64::from(*v),
        Value::U64(v) => *v as f64,
        Value::I64(v) => *v as f64,
        Value::F32(v) => f64::from(*v),
        Value::F64(v) => *v,
        Value::Bool(v) => f64::from(u8::from(*v)),
        Value::String(_) | Value::Array(_) => return None,
    })
}

fn read_vocab(meta: &Meta<'_>) -> Result<GgufVocab> {
    let token_types = match meta.values.get("tokenizer.ggml.token_type") {
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| as_f64(v).unwrap_or(1.0) as i64)
            .collect(),
        _ => Vec::new(),
    };
    let id =
        |key: &str| -> Result<Option<u32>> { Ok(meta.optional_number(key)?.map(|v| v as u32)) };
    Ok(GgufVocab {
        architecture: meta.string("general.architecture")?,
        model: meta.string("tokenizer.ggml.model")?,
        pre: meta.optional_string("tokenizer.ggml.pre"),
        tokens: meta.strings("tokenizer.ggml.tokens")?,
        token_types,
        merges: if meta.values.contains_key("tokenizer.ggml.merges") {
            meta.strings("tokenizer.ggml.merges")?
        } else {
            Vec::new()
        },
        bos_token_id: id("tokenizer.ggml.bos_token_id")?,
        eos_token_id: id("tokenizer.ggml.eos_token_id")?,
        add_bos_token: matches!(
            meta.values.get("tokenizer.ggml.add_bos_token"),
            Some(Value::Bool(true))
        ),
    })
}

fn config_from_meta(
    meta: &Meta<'_>,
    arch: &str,
    architecture: Architecture,
    content: &Content,
    vocab: &GgufVocab,
) -> Result<ModelConfig> {
    let key = |k: &str| format!("{arch}.{k}");
    let hidden_size = meta.count(&key("embedding_length"))?;
    let num_attention_heads = meta.count(&key("attention.head_count"))?;
    let num_key_value_heads = match meta.optional_number(&key("attention.head_count_kv"))? {
        Some(v) => v as usize,
        None => num_attention_heads,
    };
    let head_dim = match meta.optional_number(&key("attention.key_length"))? {
        Some(v) => v as usize,
        None => hidden_size / num_attention_heads.max(1),
    };
    let vocab_size = content
        .tensor_infos
        .get("token_embd.weight")
        .and_then(|info| info.shape.dims().first().copied())
        .unwrap_or(vocab.tokens.len());
    let rope_scaling = match meta.optional_string(&key("rope.scaling.type")).as_deref() {
        None | Some("none") => RopeScaling::None,
        Some("linear") => RopeScaling::Linear {
            factor: meta.number(&key("rope.scaling.factor"))?,
        },
        Some(other) => {
            return Err(Error::bad_file(
                meta.path,
                format!("GGUF rope scaling `{other}` is not supported (none, linear)"),
            ))
        }
    };
    let gemma = architecture.is_gemma();
    let gemma3 = architecture == Architecture::Gemma3;
    let num_hidden_layers = meta.count(&key("block_count"))?;
    let cfg = ModelConfig {
        architecture,
        vocab_size,
        hidden_size,
        intermediate_size: meta.count(&key("feed_forward_length"))?,
        num_hidden_layers,
        num_attention_heads,
        num_key_value_heads,
        head_dim,
        rms_norm_eps: meta
            .optional_number(&key("attention.layer_norm_rms_epsilon"))?
            .unwrap_or(1e-5),
        rope_theta: meta
            .optional_number(&key("rope.freq_base"))?
            .unwrap_or(10_000.0),
        rope_scaling,
        max_position_embeddings: meta.count(&key("context_length"))?,
        tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
        qkv_bias: content.tensor_infos.contains_key("blk.0.attn_q.bias"),
        o_bias: content.tensor_infos.contains_key("blk.0.attn_output.bias"),
        mlp_bias: content.tensor_infos.contains_key("blk.0.ffn_up.bias"),
        sliding_window: match architecture {
            Architecture::Gemma3 | Architecture::Gemma2 => {
                Some(meta.count(&key("attention.sliding_window"))?)
            }
            Architecture::Phi3 => meta
                .optional_number(&key("attention.sliding_window"))?
                .map(|w| w as usize)
                .filter(|&w| w > 0),
            _ => None,
        },
        bos_token_id: vocab.bos_token_id,
        eos_token_ids: vocab.eos_token_id.into_iter().collect(),
        hidden_act: if gemma {
            Activation::GeluTanh
        } else {
            Activation::Silu
        },
        scale_embeddings: gemma,
        // llama.cpp scales Gemma's attention logits by key_length^(-1/2), except in the 27B
        // models (62 layers for Gemma 3, 46 for Gemma 2), whose query_pre_attn_scalar is d / h.
        query_pre_attn_scalar: gemma.then(|| {
            let is_27b = matches!(
                (architecture, num_hidden_layers),
                (Architecture::Gemma3, 62) | (Architecture::Gemma2, 46)
            );
            if is_27b {
                (hidden_size / num_attention_heads.max(1)) as f64
            } else {
                head_dim as f64
            }
        }),
        // llama.cpp and transformers both take the patterns as fixed: Gemma 3 5 sliding to 1
        // full, Gemma 2 alternating (even layers sliding).
        layer_types: match architecture {
            Architecture::Gemma3 => gemma3_layer_types(num_hidden_layers, 6),
            Architecture::Gemma2 => gemma3_layer_types(num_hidden_layers, 2),
            _ => Vec::new(),
        },
        rope_local_theta: gemma3.then_some(10_000.0),
        attn_logit_softcapping: meta.optional_number(&key("attn_logit_softcapping"))?,
        final_logit_softcapping: meta.optional_number(&key("final_logit_softcapping"))?,
    };
    cfg.validate(meta.path)?;
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_names() {
        let llama = Architecture::Llama;
        let gemma = Architecture::Gemma3;
        for (arch, gguf, hf) in [
            (
                llama,
                "blk.12.attn_q.weight",
                "model.layers.12.self_attn.q_proj.weight",
            ),
            (
                llama,
                "blk.0.ffn_down.weight",
                "model.layers.0.mlp.down_proj.weight",
            ),
            (llama, "output.weight", "lm_head.weight"),
            (
                llama,
                "blk.1.ffn_norm.weight",
                "model.layers.1.post_attention_layernorm.weight",
            ),
            (
                gemma,
                "blk.1.ffn_norm.weight",
                "model.layers.1.pre_feedforward_layernorm.weight",
            ),
            (
                gemma,
                "blk.1.post_attention_norm.weight",
                "model.layers.1.post_attention_layernorm.weight",
            ),
            (
                gemma,
                "blk.1.post_ffw_norm.weight",
                "model.layers.1.post_feedforward_layernorm.weight",
            ),
            (
                gemma,
                "blk.1.attn_k_norm.weight",
                "model.layers.1.self_attn.k_norm.weight",
            ),
        ] {
            assert_eq!(hf_name(gguf, arch).as_deref(), Some(hf), "{gguf}");
        }
        assert_eq!(hf_name("blk.x.attn_q.weight", llama), None);
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permute() -> anyhow::Result<()> {
        // llama.cpp: reshape(n_head, 2, hd/2, in).swapaxes(1, 2).reshape(rows, in)
        let (n_head, head_dim, inp) = (2, 4, 3);
        let hf = Tensor::arange(0f32, (n_head * head_dim * inp) as f32, &Device::Cpu)?
            .reshape((n_head * head_dim, inp))?;
        let permuted = hf
            .reshape((n_head, 2, head_dim / 2, inp))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((n_head * head_dim, inp))?;
        let back = unpermute(&permuted, n_head)?;
        assert_eq!(back.to_vec2::<f32>()?, hf.to_vec2::<f32>()?);
        // The row order used on packed matrices is the same permutation.
        let order = unpermute_order(n_head * head_dim, n_head);
        let rows = permuted.to_vec2::<f32>()?;
        let reordered: Vec<Vec<f32>> = order.iter().map(|&r| rows[r].clone()).collect();
        assert_eq!(reordered, hf.to_vec2::<f32>()?);
        Ok(())
    }
}
