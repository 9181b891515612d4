//! Model hyper-parameters: the Hugging Face `config.json` schema (field names as in the file) and
//! the normalised [`ModelConfig`] that the transformer runs on. GGUF metadata is mapped onto the
//! same normalised type in `gguf.rs`.

use std::path::Path;

use serde::Deserialize;

use crate::error::{json_message, Error, Result};

/// The decoder families tunelens runs. They share one forward; they differ in biases and defaults.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    /// LLaMA 1/2/3, SmolLM, TinyLlama, Vicuna, ...
    Llama,
    /// Mistral (LLaMA layout plus an optional sliding attention window).
    Mistral,
    /// Qwen2 / Qwen2.5 (biases on q, k and v).
    Qwen2,
    /// Phi-3 (LLaMA layout with `qkv_proj` and `gate_up_proj` fused on disk; split at load,
    /// so every hook, backward pass and analysis reads it as LLaMA).
    Phi3,
    /// Qwen3 (LLaMA layout plus an RMSNorm over each head's query and key, before RoPE).
    Qwen3,
    /// Gemma 3 text models (`gemma3_text`): embeddings scaled by `√d`, `(1 + w)` RMSNorm gains
    /// (stored as the effective gain `1 + w` once loaded), norms before and after attention and
    /// the MLP, GeGLU with tanh-GELU, per-head q/k norms, sliding-window layers with their own
    /// RoPE base between full-attention layers, attention scaled by `query_pre_attn_scalar`.
    Gemma3,
    /// Gemma 2: Gemma 3's layout without q/k norms, one RoPE base, sliding and full layers
    /// alternating, and soft-capped attention scores and final logits (`cap · tanh(x / cap)`).
    Gemma2,
    /// OLMo-2: no norm before the sub-layers, an RMSNorm on each sub-layer's output before it is
    /// added to the residual stream, and an RMSNorm over the whole query and key projections.
    Olmo2,
}

/// The gated MLP's activation: `act(gate) ⊙ up`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Activation {
    /// SwiGLU (`silu`).
    Silu,
    /// GeGLU with the tanh approximation of GELU (`gelu_pytorch_tanh`, Gemma).
    GeluTanh,
}

/// Attention kind of one layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum LayerType {
    /// Attends to every earlier position.
    Full,
    /// Attends to the last `sliding_window` positions (Gemma 3's local layers).
    Sliding,
}

impl Architecture {
    /// The lower-case name used in `config.json`'s `model_type` and in GGUF metadata.
    pub fn name(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Mistral => "mistral",
            Self::Qwen2 => "qwen2",
            Self::Phi3 => "phi3",
            Self::Qwen3 => "qwen3",
            Self::Gemma3 => "gemma3",
            Self::Gemma2 => "gemma2",
            Self::Olmo2 => "olmo2",
        }
    }

    /// Whether the queries and keys are RMS-normalised before RoPE: per head (gain over
    /// `head_dim`: Qwen3, Gemma 3) or over the whole projection (OLMo-2). The gain's length says
    /// which.
    pub fn has_qk_norm(self) -> bool {
        matches!(self, Self::Qwen3 | Self::Gemma3 | Self::Olmo2)
    }

    /// Whether a norm sits before attention and before the MLP (every family but OLMo-2).
    pub fn has_pre_norms(self) -> bool {
        self != Self::Olmo2
    }

    /// Whether each sub-layer's output is RMS-normalised before it joins the residual stream
    /// (Gemma 3, OLMo-2).
    pub fn has_post_norms(self) -> bool {
        matches!(self, Self::Gemma3 | Self::Gemma2 | Self::Olmo2)
    }

    /// Gemma 2 and 3: `√d` embedding scale, `(1 + w)` norms, GeGLU, `query_pre_attn_scalar`,
    /// per-layer attention kinds.
    pub fn is_gemma(self) -> bool {
        matches!(self, Self::Gemma3 | Self::Gemma2)
    }

    /// What the checkpoint's norm weights store below the gain: Gemma's RMSNorm multiplies by
    /// `1 + w`, so its files hold `gain − 1` (1.0); GGUF files hold the gain itself.
    pub fn norm_weight_offset(self) -> f64 {
        if self.is_gemma() {
            1.0
        } else {
            0.0
        }
    }

    /// Recognises an `architectures[0]` class name or a `model_type` / GGUF architecture string.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "LlamaForCausalLM" | "llama" => Some(Self::Llama),
            "MistralForCausalLM" | "mistral" => Some(Self::Mistral),
            "Qwen2ForCausalLM" | "qwen2" => Some(Self::Qwen2),
            "Phi3ForCausalLM" | "phi3" => Some(Self::Phi3),
            "Qwen3ForCausalLM" | "qwen3" => Some(Self::Qwen3),
            "Gemma3ForCausalLM" | "gemma3_text" | "gemma3" => Some(Self::Gemma3),
            "Gemma2ForCausalLM" | "gemma2" => Some(Self::Gemma2),
            "Olmo2ForCausalLM" | "olmo2" => Some(Self::Olmo2),
            _ => None,
        }
    }
}

/// How rotary position embeddings are rescaled for long contexts.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub enum RopeScaling {
    /// Plain RoPE.
    None,
    /// Positions divided by `factor` (HF `"linear"`).
    Linear {
        /// Position divisor.
        factor: f64,
    },
    /// LLaMA-3.1 frequency-dependent scaling (HF `"llama3"`).
    Llama3 {
        /// Overall scaling factor.
        factor: f64,
        /// Wavelengths longer than `original / low_freq_factor` are fully scaled.
        low_freq_factor: f64,
        /// Wavelengths shorter than `original / high_freq_factor` are unscaled.
        high_freq_factor: f64,
        /// Context length the model was pre-trained with.
        original_max_position_embeddings: f64,
    },
}

/// Normalised hyper-parameters of a LLaMA-family decoder.
#[allow(clippy::struct_excessive_bools)] // independent switches, as in config.json
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct ModelConfig {
    /// Decoder family.
    pub architecture: Architecture,
    /// `V`.
    pub vocab_size: usize,
    /// `d`.
    pub hidden_size: usize,
    /// `d_ff`.
    pub intermediate_size: usize,
    /// `L`.
    pub num_hidden_layers: usize,
    /// `h`.
    pub num_attention_heads: usize,
    /// `h_kv` (grouped-query attention when smaller than `h`).
    pub num_key_value_heads: usize,
    /// `d_h`.
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// RoPE rescaling.
    pub rope_scaling: RopeScaling,
    /// Longest sequence the model supports.
    pub max_position_embeddings: usize,
    /// Whether `lm_head` shares the input embedding matrix.
    pub tie_word_embeddings: bool,
    /// Biases on q, k, v (Qwen2, or LLaMA with `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on `o_proj` (LLaMA with `attention_bias`).
    pub o_bias: bool,
    /// Biases on the MLP projections.
    pub mlp_bias: bool,
    /// Mistral-style sliding attention window.
    pub sliding_window: Option<usize>,
    /// Beginning-of-sequence token id, when the checkpoint names one.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence token ids (generation stops on any of them).
    pub eos_token_ids: Vec<u32>,
    /// The gated MLP's activation.
    pub hidden_act: Activation,
    /// Gemma: the input embeddings are multiplied by `√d` (rounded to the weights' dtype).
    pub scale_embeddings: bool,
    /// Attention logits are scaled by `query_pre_attn_scalar^(-1/2)` (Gemma) instead of
    /// `head_dim^(-1/2)`.
    pub query_pre_attn_scalar: Option<f64>,
    /// Attention kind per layer (Gemma 3); empty when every layer uses `sliding_window` as
    /// Mistral does.
    pub layer_types: Vec<LayerType>,
    /// Gemma 3: the RoPE base of the sliding layers (`rope_local_base_freq`, no rescaling); the
    /// full layers use `rope_theta` and `rope_scaling`.
    pub rope_local_theta: Option<f64>,
    /// Gemma 2: attention scores become `cap · tanh(s / cap)` before the mask and softmax.
    pub attn_logit_softcapping: Option<f64>,
    /// Gemma 2: the final logits become `cap · tanh(l / cap)`.
    pub final_logit_softcapping: Option<f64>,
}

/// `bos_token_id` / `eos_token_id` are an integer or a list of integers in `config.json`.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(u32),
    Many(Vec<u32>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<u32> {
        match self {
            Self::One(id) => vec![id],
            Self::Many(ids) => ids,
        }
    }
}

/// The fields of a Hugging Face `config.json` that tunelens reads; names match the file exactly.
#[derive(Clone, Debug, Deserialize)]
struct HfConfig {
    architectures: Option<Vec<String>>,
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    hidden_act: Option<String>,
    /// Gemma's name for `hidden_act`.
    hidden_activation: Option<String>,
    query_pre_attn_scalar: Option<f64>,
    layer_types: Option<Vec<String>>,
    sliding_window_pattern: Option<usize>,
    #[serde(rename = "_sliding_window_pattern")]
    sliding_window_pattern_private: Option<usize>,
    rope_local_base_freq: Option<f64>,
    attn_logit_softcapping: Option<f64>,
    final_logit_softcapping: Option<f64>,
    use_bidirectional_attention: Option<bool>,
    max_position_embeddings: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<serde_json::Value>,
    /// transformers 5 writes RoPE here (`rope_theta`, `rope_type` and the scaling fields).
    rope_parameters: Option<serde_json::Value>,
    partial_rotary_factor: Option<f64>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
    bos_token_id: Option<OneOrMany>,
    eos_token_id: Option<OneOrMany>,
}

impl ModelConfig {
    /// Parses a Hugging Face `config.json`; `path` is only used in error messages.
    pub fn from_hf_json(text: &str, path: &Path) -> Result<Self> {
        // A multimodal wrapper (Gemma 3 4B+, ...) nests the decoder under `text_config`: name
        // the class rather than a missing field.
        if let Ok(value) = serde_json::from_str::<serde_json::Value>(text) {
            let first = value
                .get("architectures")
                .and_then(|a| a.get(0))
                .and_then(serde_json::Value::as_str);
            if let Some(name) = first.filter(|_| value.get("text_config").is_some()) {
                return Err(Error::UnsupportedArchitecture {
                    arch: format!("{name} (a multimodal model; open its text-only checkpoint)"),
                    path: path.to_path_buf(),
                });
            }
        }
        // serde names the missing field ("missing field `hidden_size`").
        let raw: HfConfig = serde_json::from_str(text)
            .map_err(|err| Error::bad_file(path, format!("config.json: {}", json_message(&err))))?;
        let arch_name = raw
            .architectures
            .as_ref()
            .and_then(|a| a.first().cloned())
            .or_else(|| raw.model_type.clone())
            .ok_or_else(|| Error::bad_field(path, "architectures"))?;
        let architecture = Architecture::parse(&arch_name)
            .or_else(|| raw.model_type.as_deref().and_then(Architecture::parse))
            .ok_or_else(|| Error::UnsupportedArchitecture {
                arch: arch_name.clone(),
                path: path.to_path_buf(),
            })?;
        let act_field = if raw.hidden_activation.is_some() {
            "hidden_activation"
        } else {
            "hidden_act"
        };
        let hidden_act = match raw
            .hidden_activation
            .as_deref()
            .or(raw.hidden_act.as_deref())
        {
            None if architecture.is_gemma() => Activation::GeluTanh,
            None | Some("silu" | "swish") => Activation::Silu,
            Some("gelu_pytorch_tanh") => Activation::GeluTanh,
            Some(other) => {
                return Err(Error::bad_file(
                    path,
                    format!(
                    "config.json: {act_field} `{other}` is not supported (silu, gelu_pytorch_tanh)"
                ),
                ))
            }
        };
        for (field, value) in [
            ("attn_logit_softcapping", raw.attn_logit_softcapping),
            ("final_logit_softcapping", raw.final_logit_softcapping),
        ] {
            if value.is_some() && architecture != Architecture::Gemma2 {
                return Err(Error::bad_file(
                    path,
                    format!(
                        "config.json: {field} is only supported for gemma2, not {}",
                        architecture.name()
                    ),
                ));
            }
            if value.is_some_and(|cap| cap <= 0.0 || !cap.is_finite()) {
                return Err(Error::bad_field(path, field));
            }
        }
        if raw.use_bidirectional_attention == Some(true) {
            return Err(Error::bad_file(
                path,
                "config.json: use_bidirectional_attention is not supported (causal decoders only)",
            ));
        }
        let gemma = architecture.is_gemma();
        // Gemma 3 in transformers 5: one RoPE per layer type; the sliding layers' base is the
        // local one, the full layers' carries any rescaling.
        let per_type = raw
            .rope_parameters
            .as_ref()
            .filter(|p| architecture == Architecture::Gemma3 && p.get("full_attention").is_some());
        let mut rope_local_theta = (architecture == Architecture::Gemma3)
            .then(|| raw.rope_local_base_freq.unwrap_or(10_000.0));
        let (rope_theta, rope_scaling) = match raw.rope_parameters.as_ref().filter(|v| !v.is_null())
        {
            Some(params) if per_type.is_some() => {
                let theta_of = |kind: &str| -> Result<f64> {
                    params
                        .get(kind)
                        .and_then(|p| p.get("rope_theta"))
                        .and_then(serde_json::Value::as_f64)
                        .ok_or_else(|| {
                            Error::bad_field(path, format!("rope_parameters.{kind}.rope_theta"))
                        })
                };
                if let Some(local) = params.get("sliding_attention") {
                    if parse_rope_scaling(Some(local), path, "rope_parameters.sliding_attention")?
                        != RopeScaling::None
                    {
                        return Err(Error::bad_file(
                            path,
                            "config.json: rope_parameters.sliding_attention: rescaled RoPE on the sliding layers is not supported",
                        ));
                    }
                    rope_local_theta = Some(theta_of("sliding_attention")?);
                }
                (
                    theta_of("full_attention")?,
                    parse_rope_scaling(
                        params.get("full_attention"),
                        path,
                        "rope_parameters.full_attention",
                    )?,
                )
            }
            Some(params) => {
                if params.get("rope_theta").is_none() && params.get("rope_type").is_none() {
                    return Err(Error::bad_file(
                        path,
                        "config.json: rope_parameters per layer type are only read for gemma3",
                    ));
                }
                let theta = match params.get("rope_theta") {
                    None => raw.rope_theta.unwrap_or(10_000.0),
                    Some(v) => v
                        .as_f64()
                        .ok_or_else(|| Error::bad_field(path, "rope_parameters.rope_theta"))?,
                };
                (
                    theta,
                    parse_rope_scaling(Some(params), path, "rope_parameters")?,
                )
            }
            None => (
                raw.rope_theta.unwrap_or(10_000.0),
                parse_rope_scaling(raw.rope_scaling.as_ref(), path, "rope_scaling")?,
            ),
        };
        let partial = raw
            .rope_parameters
            .as_ref()
            .and_then(|p| p.get("partial_rotary_factor"))
            .and_then(serde_json::Value::as_f64)
            .or(raw.partial_rotary_factor);
        if partial.is_some_and(|f| (f - 1.0).abs() > 1e-12) {
            return Err(Error::bad_file(
                path,
                format!(
                    "config.json: partial_rotary_factor {} is not supported (RoPE on every dimension only)",
                    partial.unwrap_or(1.0)
                ),
            ));
        }
        let qkv_bias = architecture == Architecture::Qwen2 || raw.attention_bias.unwrap_or(false);
        let sliding_window = match architecture {
            Architecture::Mistral
            | Architecture::Phi3
            | Architecture::Gemma3
            | Architecture::Gemma2 => raw.sliding_window,
            Architecture::Qwen2 if raw.use_sliding_window == Some(true) => raw.sliding_window,
            Architecture::Qwen3 if raw.use_sliding_window == Some(true) => {
                // transformers slides only in the layers from `max_window_layers` on.
                return Err(Error::bad_file(
                    path,
                    "config.json: use_sliding_window is not supported for qwen3",
                ));
            }
            _ => None,
        };
        let layer_types = if gemma {
            gemma_layer_types(&raw, architecture, path)?
        } else {
            Vec::new()
        };
        if layer_types.contains(&LayerType::Sliding) && sliding_window.is_none() {
            return Err(Error::bad_field(path, "sliding_window"));
        }
        let cfg = Self {
            architecture,
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: raw.num_attention_heads,
            num_key_value_heads: raw.num_key_value_heads.unwrap_or(raw.num_attention_heads),
            head_dim: raw
                .head_dim
                .unwrap_or(raw.hidden_size / raw.num_attention_heads.max(1)),
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(2048),
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            qkv_bias,
            o_bias: architecture != Architecture::Qwen2 && raw.attention_bias.unwrap_or(false),
            mlp_bias: raw.mlp_bias.unwrap_or(false),
            sliding_window,
            bos_token_id: raw.bos_token_id.and_then(|b| b.into_vec().first().copied()),
            eos_token_ids: raw
                .eos_token_id
                .map(OneOrMany::into_vec)
                .unwrap_or_default(),
            hidden_act,
            scale_embeddings: gemma,
            query_pre_attn_scalar: gemma.then(|| raw.query_pre_attn_scalar.unwrap_or(256.0)),
            layer_types,
            rope_local_theta,
            attn_logit_softcapping: raw.attn_logit_softcapping,
            final_logit_softcapping: raw.final_logit_softcapping,
        };
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// Checks the head arithmetic; `path` names the source in the error.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (field, value) in positive {
            if value == 0 {
                return Err(Error::bad_field(path, field));
            }
        }
        if self.num_attention_heads % self.num_key_value_heads != 0 {
            return Err(Error::bad_file(
                path,
                format!(
                    "num_attention_heads ({}) is not a multiple of num_key_value_heads ({})",
                    self.num_attention_heads, self.num_key_value_heads
                ),
            ));
        }
        if !self.layer_types.is_empty() && self.layer_types.len() != self.num_hidden_layers {
            return Err(Error::bad_field(path, "layer_types"));
        }
        if self.head_dim % 2 != 0 {
            return Err(Error::bad_file(path, "head_dim must be even for RoPE"));
        }
        Ok(())
    }

    /// The attention window of layer `layer` (`None`: every earlier position).
    pub fn window(&self, layer: usize) -> Option<usize> {
        match self.layer_types.get(layer) {
            Some(LayerType::Full) => None,
            Some(LayerType::Sliding) | None => self.sliding_window,
        }
    }

    /// Whether layer `layer` rotates with the local RoPE base (Gemma 3's sliding layers).
    pub fn local_rope(&self, layer: usize) -> bool {
        self.rope_local_theta.is_some() && self.layer_types.get(layer) == Some(&LayerType::Sliding)
    }

    /// The factor on `q·k` before the softmax.
    pub fn attn_scale(&self) -> f64 {
        1.0 / self
            .query_pre_attn_scalar
            .unwrap_or(self.head_dim as f64)
            .sqrt()
    }

    /// Number of parameters of the base model (adapters excluded).
    pub fn parameter_count(&self) -> usize {
        let d = self.hidden_size;
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        let arch = self.architecture;
        let norms = usize::from(arch.has_pre_norms()) + usize::from(arch.has_post_norms());
        let mut per_layer =
            d * q + 2 * d * kv + q * d + 3 * d * self.intermediate_size + 2 * norms * d;
        if arch.has_qk_norm() {
            per_layer += if arch == Architecture::Olmo2 {
                q + kv
            } else {
                2 * self.head_dim
            };
        }
        if self.qkv_bias {
            per_layer += q + 2 * kv;
        }
        if self.o_bias {
            per_layer += d;
        }
        if self.mlp_bias {
            per_layer += 2 * self.intermediate_size + d;
        }
        let embed = self.vocab_size * d;
        let head = if self.tie_word_embeddings { 0 } else { embed };
        embed + head + d + per_layer * self.num_hidden_layers
    }
}

/// Gemma's attention kind per layer: `layer_types` when the file lists them, else Gemma 2's
/// alternation (even layers sliding) or Gemma 3's every `sliding_window_pattern`-th layer full
/// (transformers' rules).
fn gemma_layer_types(raw: &HfConfig, arch: Architecture, path: &Path) -> Result<Vec<LayerType>> {
    if let Some(types) = &raw.layer_types {
        if types.len() != raw.num_hidden_layers {
            return Err(Error::bad_file(
                path,
                format!(
                    "config.json: layer_types lists {} layers, num_hidden_layers is {}",
                    types.len(),
                    raw.num_hidden_layers
                ),
            ));
        }
        return types
            .iter()
            .enumerate()
            .map(|(i, t)| match t.as_str() {
                "full_attention" => Ok(LayerType::Full),
                "sliding_attention" => Ok(LayerType::Sliding),
                other => Err(Error::bad_file(
                    path,
                    format!("config.json: layer_types[{i}] `{other}` is not supported (full_attention, sliding_attention)"),
                )),
            })
            .collect();
    }
    let pattern = raw
        .sliding_window_pattern
        .or(raw.sliding_window_pattern_private)
        .unwrap_or(if arch == Architecture::Gemma2 { 2 } else { 6 })
        .max(1);
    Ok(gemma3_layer_types(raw.num_hidden_layers, pattern))
}

/// Every `pattern`-th layer full, the others sliding (Gemma 3's 5 local : 1 global).
pub fn gemma3_layer_types(layers: usize, pattern: usize) -> Vec<LayerType> {
    (0..layers)
        .map(|i| {
            if (i + 1) % pattern.max(1) == 0 {
                LayerType::Full
            } else {
                LayerType::Sliding
            }
        })
        .collect()
}

/// The scaling of a `rope_scaling` (or transformers 5 `rope_parameters`) object; `field` names it
/// in errors.
fn parse_rope_scaling(
    value: Option<&serde_json::Value>,
    path: &Path,
    field: &str,
) -> Result<RopeScaling> {
    let Some(value) = value else {
        return Ok(RopeScaling::None);
    };
    if value.is_null() {
        return Ok(RopeScaling::None);
    }
    let kind = value
        .get("rope_type")
        .or_else(|| value.get("type"))
        .and_then(serde_json::Value::as_str)
        .ok_or_else(|| Error::bad_field(path, format!("{field}.rope_type")))?;
    let num = |key: &str| -> Result<f64> {
        value
            .get(key)
            .and_then(serde_json::Value::as_f64)
            .ok_or_else(|| Error::bad_field(path, format!("{field}.{key}")))
    };
    match kind {
        "default" => Ok(RopeScaling::None),
        "linear" => Ok(RopeScaling::Linear {
            factor: num("factor")?,
        }),
        "llama3" => Ok(RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")?,
        }),
        other => Err(Error::bad_file(
            path,
            format!("{field}: RoPE type `{other}` is not supported (default, linear, llama3)"),
        )),
    }
}

/// RoPE inverse frequencies `θ^{-2i/d_h}` after rescaling, one per rotated pair.
pub fn rope_inv_freq(cfg: &ModelConfig) -> Vec<f32> {
    inv_freq_with(cfg.rope_theta, &cfg.rope_scaling, cfg.head_dim)
}

/// The inverse frequencies of the sliding layers' local RoPE base (Gemma 3), unscaled.
pub fn rope_inv_freq_local(cfg: &ModelConfig) -> Option<Vec<f32>> {
    cfg.rope_local_theta
        .map(|theta| inv_freq_with(theta, &RopeScaling::None, cfg.head_dim))
}

fn inv_freq_with(theta: f64, scaling: &RopeScaling, head_dim: usize) -> Vec<f32> {
    let half = head_dim / 2;
    (0..half)
        .map(|i| {
            let base = 1.0 / theta.powf(2.0 * i as f64 / head_dim as f64);
            let scaled = match *scaling {
                RopeScaling::None => base,
                RopeScaling::Linear { factor } => base / factor,
                RopeScaling::Llama3 {
                    factor,
                    low_freq_factor,
                    high_freq_factor,
                    original_max_position_embeddings: original,
                } => {
                    // Same piecewise rule as transformers' `_compute_llama3_parameters`.
                    let low_freq_wavelen = original / low_freq_factor;
                    let high_freq_wavelen = original / high_freq_factor;
                    let wavelen = 2.0 * std::f64::consts::PI / base;
                    if wavelen < high_freq_wavelen {
                        base
                    } else if wavelen > low_freq_wavelen {
                        base / factor
                    } else {
                        let smooth = (original / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * base / factor + smooth * base
                    }
                }
            };
            scaled as f32
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMOLLM_LIKE: &str = r#"{
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 64,
        "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_act": "silu",
        "max_position_embeddings": 128, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": true, "bos_token_id": 1, "eos_token_id": [2, 3]
    }"#;

    #[test]
    fn parses_llama_config() {
        let cfg = ModelConfig::from_hf_json(SMOLLM_LIKE, Path::new("config.json")).unwrap();
        assert_eq!(cfg.architecture, Architecture::Llama);
        assert_eq!(cfg.head_dim, 4);
        assert_eq!(cfg.num_key_value_heads, 2);
        assert_eq!(cfg.eos_token_ids, vec![2, 3]);
        assert_eq!(cfg.bos_token_id, Some(1));
        assert!(cfg.tie_word_embeddings);
        assert!(!cfg.qkv_bias);
    }

    #[test]
    fn missing_field_names_field_and_file() {
        let text = SMOLLM_LIKE.replace("\"hidden_size\": 16,", "");
        let err = ModelConfig::from_hf_json(&text, Path::new("/m/config.json")).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("hidden_size") && msg.contains("/m/config.json"),
            "{msg}"
        );
    }

    #[test]
    fn unsupported_architecture_is_named() {
        let text = SMOLLM_LIKE
            .replace("LlamaForCausalLM", "GPT2LMHeadModel")
            .replace("\"llama\"", "\"gpt2\"");
        let err = ModelConfig::from_hf_json(&text, Path::new("config.json")).unwrap_err();
        assert!(err.to_string().contains("GPT2LMHeadModel"), "{err}");
    }

    #[test]
    fn llama3_scaling_keeps_high_and_scales_low_frequencies() {
        let mut cfg = ModelConfig::from_hf_json(SMOLLM_LIKE, Path::new("c")).unwrap();
        cfg.head_dim = 128;
        cfg.rope_theta = 500_000.0;
        let plain = rope_inv_freq(&cfg);
        cfg.rope_scaling = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192.0,
        };
        let scaled = rope_inv_freq(&cfg);
        assert!((scaled[0] - plain[0]).abs() < 1e-12);
        assert!((scaled[63] - plain[63] / 8.0).abs() < 1e-12);
    }

    #[test]
    fn transformers_5_rope_parameters_are_read_and_unknown_options_named() {
        let base = r#""architectures": ["LlamaForCausalLM"], "vocab_size": 64, "hidden_size": 16,
            "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4"#;
        let parse = |extra: &str| {
            ModelConfig::from_hf_json(&format!("{{{base}, {extra}}}"), Path::new("config.json"))
        };
        let cfg = parse(r#""rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"}"#)
            .expect("parses");
        assert!((cfg.rope_theta - 500_000.0).abs() < 1e-9);
        assert_eq!(cfg.rope_scaling, RopeScaling::None);
        let cfg = parse(
            r#""rope_parameters": {"rope_theta": 1e4, "rope_type": "linear", "factor": 2.0}"#,
        )
        .expect("parses");
        assert_eq!(cfg.rope_scaling, RopeScaling::Linear { factor: 2.0 });
        for (extra, needle) in [
            (
                r#""rope_parameters": {"rope_theta": 1e4, "rope_type": "longrope"}"#,
                "rope_parameters: RoPE type `longrope`",
            ),
            (
                r#""rope_scaling": {"rope_type": "yarn", "factor": 4.0}"#,
                "rope_scaling: RoPE type `yarn`",
            ),
            (
                r#""rope_parameters": {"rope_theta": 1e4, "rope_type": "default", "partial_rotary_factor": 0.75}"#,
                "partial_rotary_factor",
            ),
            (
                r#""rope_parameters": {"full_attention": {"rope_theta": 1e6}}"#,
                "per layer type",
            ),
        ] {
            let err = parse(extra).expect_err(extra).to_string();
            assert!(err.contains(needle), "{err}");
            assert!(err.contains("config.json"), "{err}");
        }
    }

    #[test]
    fn gemma3_configs_of_both_transformers_generations() {
        let base = r#""architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text",
            "vocab_size": 64, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 7,
            "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 8,
            "sliding_window": 5, "hidden_activation": "gelu_pytorch_tanh""#;
        let parse = |extra: &str| {
            ModelConfig::from_hf_json(&format!("{{{base}{extra}}}"), Path::new("config.json"))
        };
        // transformers 4: rope_theta + rope_local_base_freq, layer types from the pattern.
        let old = parse(r#", "rope_theta": 1e6, "rope_local_base_freq": 1e4, "sliding_window_pattern": 6, "query_pre_attn_scalar": 8"#)
            .expect("parses");
        assert_eq!(old.hidden_act, Activation::GeluTanh);
        assert!(old.scale_embeddings);
        assert_eq!(old.layer_types[5], LayerType::Full);
        assert_eq!(old.window(5), None);
        assert_eq!((old.window(4), old.window(6)), (Some(5), Some(5)));
        assert!(old.local_rope(0) && !old.local_rope(5));
        assert!((old.attn_scale() - 1.0 / 8f64.sqrt()).abs() < 1e-12);
        // transformers 5: one RoPE per layer type, layer types listed.
        let new = parse(
            r#", "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
            "rope_parameters": {"full_attention": {"rope_theta": 1e6, "rope_type": "linear", "factor": 8.0},
                                "sliding_attention": {"rope_theta": 1e4, "rope_type": "default"}}"#,
        )
        .expect("parses");
        assert_eq!(new.window(1), None);
        assert_eq!(new.rope_scaling, RopeScaling::Linear { factor: 8.0 });
        assert_eq!(new.rope_local_theta, Some(1e4));
        assert!((new.rope_theta - 1e6).abs() < 1e-6);
        // Gemma 2's soft-capping, unknown layer types and activations are named.
        for (extra, needle) in [
            (
                r#", "final_logit_softcapping": 30.0"#,
                "final_logit_softcapping",
            ),
            (
                r#", "attn_logit_softcapping": 50.0"#,
                "attn_logit_softcapping",
            ),
            (
                r#", "layer_types": ["chunked_attention", "full_attention", "full_attention", "full_attention", "full_attention", "full_attention", "full_attention"]"#,
                "layer_types[0] `chunked_attention`",
            ),
            (
                r#", "layer_types": ["full_attention"]"#,
                "layer_types lists 1 layers",
            ),
        ] {
            let err = parse(extra).expect_err(extra).to_string();
            assert!(err.contains(needle), "{err}");
        }
        let err = ModelConfig::from_hf_json(
            &SMOLLM_LIKE.replace(r#""hidden_act": "silu""#, r#""hidden_act": "relu2""#),
            Path::new("config.json"),
        )
        .expect_err("relu2")
        .to_string();
        assert!(err.contains("hidden_act `relu2`"), "{err}");
        let err = ModelConfig::from_hf_json(
            &SMOLLM_LIKE
                .replace("LlamaForCausalLM", "GPTNeoXForCausalLM")
                .replace(r#""model_type": "llama""#, r#""model_type": "gpt_neox""#),
            Path::new("config.json"),
        )
        .expect_err("gpt_neox")
        .to_string();
        assert!(
            err.contains("`GPTNeoXForCausalLM`") && err.contains("gemma2, gemma3, olmo2"),
            "{err}"
        );
        let err = ModelConfig::from_hf_json(
            r#"{"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
                "text_config": {"hidden_size": 2560}}"#,
            Path::new("config.json"),
        )
        .expect_err("multimodal")
        .to_string();
        assert!(
            err.contains("Gemma3ForConditionalGeneration (a multimodal"),
            "{err}"
        );
    }
}
