//! [`ModelInfo`]: a plain-data summary of a loaded model, for the UI, the CLI and exports.
//! Holds no tensors.

use serde::{Deserialize, Serialize};

use crate::model::transformer::Transformer;

/// What the Models panel and `tunelens info` show about a loaded checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    /// The `--model` spec it was loaded from.
    pub source: String,
    /// Checkpoint format: `safetensors` or `gguf`.
    pub format: String,
    /// Decoder family (`llama`, `mistral`, `qwen2`).
    pub architecture: String,
    /// Decoder layers.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads.
    pub num_kv_heads: usize,
    /// Hidden size.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Head dimension.
    pub head_dim: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Context length.
    pub context_length: usize,
    /// Base parameters (adapters excluded).
    pub parameters: usize,
    /// Whether `lm_head` is tied to the input embeddings.
    pub tied_embeddings: bool,
    /// Dtype of the weights as stored in the file (e.g. `Q4_1`, `bf16`).
    pub source_dtype: String,
    /// How the weights are held now: a dtype (`f32`), or `as stored (Q4_1, Q8_0, f32)` with
    /// the kinds present.
    pub dtype: String,
    /// Device the weights are on.
    pub device: String,
    /// Bytes held by the base weights (shared storage counted once).
    pub weight_bytes: usize,
    /// Seconds the load took.
    pub load_secs: f64,
    /// Whether a chat template is available.
    pub has_chat_template: bool,
    /// The LoRA adapter applied on top, if any.
    pub adapter: Option<AdapterInfo>,
}

/// A PEFT adapter attached to the model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdapterInfo {
    /// Adapter folder.
    pub path: String,
    /// Rank `r`.
    pub rank: usize,
    /// `lora_alpha`.
    pub alpha: f64,
    /// Adapted module names (e.g. `q_proj`, `v_proj`).
    pub target_modules: Vec<String>,
    /// Layers × modules that received an adapter.
    pub adapted_layers: usize,
    /// Distinct layers with at least one adapted module.
    #[serde(default)]
    pub layers: usize,
    /// Adapter parameters.
    pub parameters: usize,
}

impl ModelInfo {
    /// A short name for titles and file names: the last path component of the source (its
    /// file stem for files), `+ adapter` when an adapter is attached. An adapter folder with a
    /// generic name (a training run's `adapter`, `combined-adapter` or `checkpoint-N`) keeps
    /// its run folder's name in front (`run-a/adapter`), so two runs' adapters tell apart.
    pub fn display_name(&self) -> String {
        let name = |spec: &str| -> String {
            let trimmed = spec.trim_end_matches(['/', '\\']);
            let mut parts = trimmed.rsplit(['/', '\\']);
            let last = parts.next().unwrap_or(trimmed);
            let generic =
                last == "adapter" || last == "combined-adapter" || last.starts_with("checkpoint-");
            match parts.next() {
                Some(parent) if generic && !parent.is_empty() => format!("{parent}/{last}"),
                _ => last.strip_suffix(".gguf").unwrap_or(last).to_owned(),
            }
        };
        match self.source.split_once('+') {
            Some((base, adapter)) => format!("{}+{}", name(base), name(adapter)),
            None => name(&self.source),
        }
    }

    /// Summarises `model`.
    pub fn describe(
        model: &Transformer,
        format: &str,
        source_dtype: &str,
        has_chat_template: bool,
    ) -> Self {
        let cfg = model.config();
        let parameters = cfg.parameter_count();
        let device = match model.device() {
            candle_core::Device::Cpu => "cpu".to_owned(),
            candle_core::Device::Cuda(_) => "cuda".to_owned(),
            candle_core::Device::Metal(_) => "metal".to_owned(),
        };
        Self {
            source: String::new(),
            format: format.to_owned(),
            architecture: cfg.architecture.name().to_owned(),
            num_layers: cfg.num_hidden_layers,
            num_heads: cfg.num_attention_heads,
            num_kv_heads: cfg.num_key_value_heads,
            hidden_size: cfg.hidden_size,
            intermediate_size: cfg.intermediate_size,
            head_dim: cfg.head_dim,
            vocab_size: cfg.vocab_size,
            context_length: cfg.max_position_embeddings,
            parameters,
            tied_embeddings: cfg.tie_word_embeddings,
            source_dtype: source_dtype.to_owned(),
            dtype: model.weights_label(),
            device,
            weight_bytes: model.resident_bytes(),
            load_secs: 0.0,
            has_chat_template,
            adapter: None,
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn display_names_are_short() {
        let tiny = crate::model::tiny::tiny_model(
            1,
            &crate::model::tiny::tiny_options(candle_core::DType::F32),
        )
        .expect("tiny model");
        let mut info = tiny.info;
        info.source = "models/SmolLM2-135M-Instruct.Q4_1.gguf".to_owned();
        assert_eq!(info.display_name(), "SmolLM2-135M-Instruct.Q4_1");
        info.source = "/ckpt/llama-7b/+/ckpt/vicuna-lora".to_owned();
        assert_eq!(info.display_name(), "llama-7b+vicuna-lora");
        info.source = "models/base.gguf+/tmp/run-a/adapter".to_owned();
        assert_eq!(info.display_name(), "base+run-a/adapter");
    }
}
