//! Loading checkpoints: a Hugging Face folder (`config.json` + safetensors, single or sharded, +
//! `tokenizer.json`), a `.gguf` file, or either of them plus a PEFT LoRA adapter
//! (`BASE+ADAPTER`). Every loader ends in [`build_transformer`], so all formats give the same
//! model type, and every failure names the file (and tensor or field) at fault.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::model::chat::ChatTemplate;
use crate::model::config::{Architecture, ModelConfig};
use crate::model::info::ModelInfo;
use crate::model::lora::Linear;
use crate::model::packed::{PackedKind, PackedMatrix};
use crate::model::tensor_file::TensorFiles;
use crate::model::tokenizer::Tokenizer;
use crate::model::transformer::{Attention, DecoderLayer, Mlp, RmsNorm, Transformer};
use crate::model::weight::{Weight, WeightStorage};
use crate::model::{adapter, gguf};

/// A loaded checkpoint: the model, its tokenizer, its chat template and a summary for display.
#[derive(Clone, Debug)]
pub struct LoadedModel {
    /// The network.
    pub model: Transformer,
    /// Its tokenizer.
    pub tokenizer: Tokenizer,
    /// Its chat template, when the checkpoint ships one.
    pub chat_template: Option<ChatTemplate>,
    /// Plain-data summary (architecture, sizes, dtype, device, load time, memory).
    pub info: ModelInfo,
}

/// How to load.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Where the weights go.
    pub device: Device,
    /// Weight dtype; f32 is what every analysis is specified in.
    pub dtype: DType,
    /// How weight matrices are held: expanded to `dtype`, or kept as stored.
    pub weights: WeightStorage,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            dtype: DType::F32,
            weights: WeightStorage::F32,
        }
    }
}

/// What a `--model` argument names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelSpec {
    /// A Hugging Face folder or a `.gguf` file.
    pub base: PathBuf,
    /// An optional PEFT adapter folder applied on top.
    pub adapter: Option<PathBuf>,
}

impl ModelSpec {
    /// Parses `PATH` or `BASE_PATH+ADAPTER_PATH`. A path that itself contains `+` and exists is
    /// taken whole.
    pub fn parse(spec: &str) -> Self {
        if !Path::new(spec).exists() {
            if let Some((base, adapter)) = spec.rsplit_once('+') {
                return Self {
                    base: PathBuf::from(base),
                    adapter: Some(PathBuf::from(adapter)),
                };
            }
        }
        Self {
            base: PathBuf::from(spec),
            adapter: None,
        }
    }
}

impl std::fmt::Display for ModelSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.adapter {
            None => write!(f, "{}", self.base.display()),
            Some(a) => write!(f, "{}+{}", self.base.display(), a.display()),
        }
    }
}

/// Reports the fraction of a load done (0..=1); return `ControlFlow::Break` to cancel it.
pub type Progress<'a> = &'a mut dyn FnMut(f32) -> ControlFlow<()>;

/// Tells `progress` how far the load is, turning a cancel request into [`Error::Cancelled`].
pub(crate) fn report(progress: Progress<'_>, frac: f32) -> Result<()> {
    match progress(frac.clamp(0.0, 1.0)) {
        ControlFlow::Continue(()) => Ok(()),
        ControlFlow::Break(()) => Err(Error::Cancelled),
    }
}

/// Loads a model from a spec.
pub fn load(spec: &ModelSpec, opts: &LoadOptions) -> Result<LoadedModel> {
    load_with_progress(spec, opts, &mut |_| ControlFlow::Continue(()))
}

/// Loads a model from a spec, reporting progress (and stopping when `progress` says so).
pub fn load_with_progress(
    spec: &ModelSpec,
    opts: &LoadOptions,
    progress: Progress<'_>,
) -> Result<LoadedModel> {
    let started = Instant::now();
    let base = &spec.base;
    if opts.weights == WeightStorage::Stored && (!opts.device.is_cpu() || opts.dtype != DType::F32)
    {
        return Err(Error::invalid(
            "weights",
            "weights kept as stored need the CPU and dtype f32 (products expand them to f32)",
        ));
    }
    if !base.exists() {
        return Err(Error::NotFound { path: base.clone() });
    }
    let mut loaded = if base.is_dir() {
        load_hf_folder(base, opts, progress)?
    } else if base
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
    {
        gguf::load_gguf(base, opts, progress)?
    } else if base.file_name().is_some_and(|n| n == "config.json") {
        let folder = base.parent().unwrap_or(Path::new("."));
        load_hf_folder(folder, opts, progress)?
    } else {
        return Err(Error::bad_file(
            base,
            "not a model: expected a Hugging Face folder (config.json + safetensors) or a .gguf file",
        ));
    };
    if let Some(adapter_dir) = &spec.adapter {
        let summary = adapter::attach_peft_adapter(&mut loaded.model, adapter_dir)?;
        loaded.info.adapter = Some(summary);
    }
    loaded.info.source = spec.to_string();
    loaded.info.load_secs = started.elapsed().as_secs_f64();
    Ok(loaded)
}

/// A place to take named tensors from, by Hugging Face name.
pub trait TensorSource {
    /// Removes and returns the tensor `name`, or `None` when the checkpoint lacks it.
    fn take(&mut self, name: &str) -> Result<Option<Tensor>>;
    /// Removes and returns the matrix `name` kept as stored, when the source holds it packed
    /// (GGUF's quantised tensors); `None` sends the loader to [`TensorSource::take`].
    fn take_packed(&mut self, _name: &str) -> Result<Option<PackedMatrix>> {
        Ok(None)
    }
    /// The file or folder, for error messages.
    fn path(&self) -> &Path;
}

/// Tensors already in memory (GGUF after dequantization, tests).
pub struct TensorMap {
    /// Tensors by Hugging Face name.
    pub tensors: BTreeMap<String, Tensor>,
    /// Matrices kept as stored, by Hugging Face name (GGUF with `--weights stored`).
    pub packed: BTreeMap<String, PackedMatrix>,
    /// Where they came from.
    pub path: PathBuf,
}

impl TensorSource for TensorMap {
    fn take(&mut self, name: &str) -> Result<Option<Tensor>> {
        Ok(self.tensors.remove(name))
    }

    fn take_packed(&mut self, name: &str) -> Result<Option<PackedMatrix>> {
        Ok(self.packed.remove(name))
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

/// Safetensors files (one, or the shards of an index), read a tensor at a time.
struct SafetensorsSource {
    files: TensorFiles,
    path: PathBuf,
}

impl TensorSource for SafetensorsSource {
    fn take(&mut self, name: &str) -> Result<Option<Tensor>> {
        self.files.read(name)
    }

    /// f16/bf16 matrices straight from the file's bytes (no tensor in between).
    fn take_packed(&mut self, name: &str) -> Result<Option<PackedMatrix>> {
        let kind = match self.files.describe(name) {
            Some((DType::F16, &[_, _])) => PackedKind::F16,
            Some((DType::BF16, &[_, _])) => PackedKind::Bf16,
            _ => return Ok(None),
        };
        let Some((_, &[rows, cols])) = self.files.describe(name) else {
            return Ok(None);
        };
        let Some(bytes) = self.files.read_bytes(name)? else {
            return Ok(None);
        };
        PackedMatrix::new(kind, rows, cols, bytes)
            .map(Some)
            .map_err(|err| Error::bad_file(&self.path, format!("tensor `{name}`: {err}")))
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

/// The first line of an error's message (candle errors can carry backtraces).
pub(crate) fn first_line(err: &dyn std::fmt::Display) -> String {
    err.to_string()
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned()
}

fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|err| match err.kind() {
        std::io::ErrorKind::NotFound => Error::NotFound {
            path: path.to_path_buf(),
        },
        _ => Error::bad_file(path, format!("cannot read ({err})")),
    })
}

/// Loads a Hugging Face model folder.
pub fn load_hf_folder(
    folder: &Path,
    opts: &LoadOptions,
    progress: Progress<'_>,
) -> Result<LoadedModel> {
    let config_path = folder.join("config.json");
    let cfg = ModelConfig::from_hf_json(&read_text(&config_path)?, &config_path)?;
    let index_path = folder.join("model.safetensors.index.json");
    let shard_paths = if index_path.exists() {
        let index: serde_json::Value = serde_json::from_str(&read_text(&index_path)?)
            .map_err(|err| Error::bad_file(&index_path, format!("invalid JSON ({err})")))?;
        let map = index
            .get("weight_map")
            .and_then(serde_json::Value::as_object)
            .ok_or_else(|| Error::bad_field(&index_path, "weight_map"))?;
        let files: BTreeSet<&str> = map.values().filter_map(serde_json::Value::as_str).collect();
        files.into_iter().map(|f| folder.join(f)).collect()
    } else {
        vec![folder.join("model.safetensors")]
    };
    let mut source = SafetensorsSource {
        files: TensorFiles::open(&shard_paths)?,
        path: folder.to_path_buf(),
    };
    let source_dtype = source
        .files
        .first_dtype()
        .map(|dtype| format!("{dtype:?}").to_lowercase());
    let model = build_transformer(cfg.clone(), &mut source, opts, progress)?;
    let tokenizer_path = folder.join("tokenizer.json");
    if !tokenizer_path.exists() {
        return Err(Error::bad_file(
            &tokenizer_path,
            "missing tokenizer: the folder has no tokenizer.json",
        ));
    }
    let tokenizer_config_path = folder.join("tokenizer_config.json");
    let tokenizer_config: Option<serde_json::Value> = if tokenizer_config_path.exists() {
        Some(
            serde_json::from_str(&read_text(&tokenizer_config_path)?).map_err(|err| {
                Error::bad_file(&tokenizer_config_path, format!("invalid JSON ({err})"))
            })?,
        )
    } else {
        None
    };
    let tokenizer = Tokenizer::from_hf_files(&tokenizer_path, tokenizer_config.as_ref(), &cfg)?;
    let chat_file = folder.join("chat_template.jinja");
    let template_source = if chat_file.exists() {
        Some(read_text(&chat_file)?)
    } else {
        tokenizer_config
            .as_ref()
            .and_then(chat_template_from_config)
    };
    let chat_template = template_source.map(|source| tokenizer.chat_template(source));
    let info = ModelInfo::describe(
        &model,
        "safetensors",
        source_dtype.as_deref().unwrap_or("unknown"),
        chat_template.is_some(),
    );
    Ok(LoadedModel {
        model,
        tokenizer,
        chat_template,
        info,
    })
}

/// `chat_template` in `tokenizer_config.json` is a string or a list of `{name, template}`.
fn chat_template_from_config(config: &serde_json::Value) -> Option<String> {
    match config.get("chat_template")? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Array(items) => items
            .iter()
            .find(|item| item.get("name").and_then(|n| n.as_str()) == Some("default"))
            .or_else(|| items.first())
            .and_then(|item| item.get("template"))
            .and_then(|t| t.as_str())
            .map(str::to_owned),
        _ => None,
    }
}

/// Takes a required tensor, checks its shape against the config, and moves it to the target
/// dtype and device.
fn required(
    src: &mut dyn TensorSource,
    name: &str,
    shape: &[usize],
    opts: &LoadOptions,
) -> Result<Tensor> {
    let Some(tensor) = src.take(name)? else {
        return Err(Error::bad_file(
            src.path(),
            format!("missing tensor `{name}`"),
        ));
    };
    convert(src, name, &tensor, shape, opts)
}

/// Takes a required weight matrix: kept as stored when `opts` asks for it and the source holds
/// it in f16, bf16 or a quantised format, else as [`required`] gives it.
fn matrix(
    src: &mut dyn TensorSource,
    name: &str,
    shape: [usize; 2],
    opts: &LoadOptions,
) -> Result<Weight> {
    if opts.weights == WeightStorage::F32 {
        return required(src, name, &shape, opts).map(Weight::Dense);
    }
    if let Some(packed) = src.take_packed(name)? {
        if packed.dims() != (shape[0], shape[1]) {
            return Err(Error::bad_file(
                src.path(),
                format!(
                    "tensor `{name}` has shape {:?} but the config implies {shape:?} (mismatched checkpoint)",
                    packed.dims()
                ),
            ));
        }
        return Ok(Weight::Packed(packed));
    }
    let Some(tensor) = src.take(name)? else {
        return Err(Error::bad_file(
            src.path(),
            format!("missing tensor `{name}`"),
        ));
    };
    let kind = match tensor.dtype() {
        DType::F16 => PackedKind::F16,
        DType::BF16 => PackedKind::Bf16,
        _ => return convert(src, name, &tensor, &shape, opts).map(Weight::Dense),
    };
    if tensor.dims() != shape {
        return convert(src, name, &tensor, &shape, opts).map(Weight::Dense);
    }
    let bits: Vec<u16> = match kind {
        PackedKind::F16 => tensor
            .flatten_all()?
            .to_vec1::<half::f16>()?
            .into_iter()
            .map(half::f16::to_bits)
            .collect(),
        _ => tensor
            .flatten_all()?
            .to_vec1::<half::bf16>()?
            .into_iter()
            .map(half::bf16::to_bits)
            .collect(),
    };
    drop(tensor);
    let bytes = bits.iter().flat_map(|b| b.to_le_bytes()).collect();
    drop(bits);
    Ok(Weight::Packed(PackedMatrix::new(
        kind, shape[0], shape[1], bytes,
    )?))
}

fn optional(
    src: &mut dyn TensorSource,
    name: &str,
    shape: &[usize],
    opts: &LoadOptions,
) -> Result<Option<Tensor>> {
    match src.take(name)? {
        None => Ok(None),
        Some(t) => convert(src, name, &t, shape, opts).map(Some),
    }
}

fn convert(
    src: &mut dyn TensorSource,
    name: &str,
    tensor: &Tensor,
    shape: &[usize],
    opts: &LoadOptions,
) -> Result<Tensor> {
    if tensor.dims() != shape {
        return Err(Error::bad_file(
            src.path(),
            format!(
                "tensor `{name}` has shape {:?} but the config implies {:?} (mismatched checkpoint)",
                tensor.dims(),
                shape
            ),
        ));
    }
    Ok(tensor.to_dtype(opts.dtype)?.to_device(&opts.device)?)
}

/// The Hugging Face names of a layer's norms, by role (`None`: the family has no such norm).
pub(crate) struct NormNames {
    /// Before attention.
    pub pre_attn: Option<&'static str>,
    /// Before the MLP.
    pub pre_mlp: Option<&'static str>,
    /// On the attention output, before the residual add.
    pub attn_out: Option<&'static str>,
    /// On the MLP output, before the residual add.
    pub mlp_out: Option<&'static str>,
}

impl NormNames {
    /// LLaMA calls its pre-MLP norm `post_attention_layernorm`; Gemma and OLMo-2 use that name
    /// for the norm on the attention output.
    pub(crate) fn of(arch: Architecture) -> Self {
        match arch {
            Architecture::Gemma3 | Architecture::Gemma2 => Self {
                pre_attn: Some("input_layernorm"),
                pre_mlp: Some("pre_feedforward_layernorm"),
                attn_out: Some("post_attention_layernorm"),
                mlp_out: Some("post_feedforward_layernorm"),
            },
            Architecture::Olmo2 => Self {
                pre_attn: None,
                pre_mlp: None,
                attn_out: Some("post_attention_layernorm"),
                mlp_out: Some("post_feedforward_layernorm"),
            },
            _ => Self {
                pre_attn: Some("input_layernorm"),
                pre_mlp: Some("post_attention_layernorm"),
                attn_out: None,
                mlp_out: None,
            },
        }
    }
}

/// Builds the network from Hugging Face-named tensors, checking every shape against `cfg`.
pub fn build_transformer(
    cfg: ModelConfig,
    src: &mut dyn TensorSource,
    opts: &LoadOptions,
    progress: Progress<'_>,
) -> Result<Transformer> {
    let d = cfg.hidden_size;
    let q_dim = cfg.num_attention_heads * cfg.head_dim;
    let kv_dim = cfg.num_key_value_heads * cfg.head_dim;
    let ff = cfg.intermediate_size;
    let eps = cfg.rms_norm_eps;
    let embed_tokens = matrix(src, "model.embed_tokens.weight", [cfg.vocab_size, d], opts)?;
    // Gemma's files hold `gain − 1`; the model keeps the gain itself, so every norm (and every
    // analysis that folds a gain) reads it as LLaMA's.
    let offset = cfg.architecture.norm_weight_offset();
    let norm_at = |src: &mut dyn TensorSource, name: &str, len: usize| -> Result<RmsNorm> {
        let weight = required(src, name, &[len], opts)?;
        let weight = if offset == 0.0 {
            weight
        } else {
            (weight + offset)?
        };
        Ok(RmsNorm { weight, eps })
    };
    let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
    for i in 0..cfg.num_hidden_layers {
        report(progress, i as f32 / cfg.num_hidden_layers as f32)?;
        let p = format!("model.layers.{i}");
        // Qwen3 and Gemma 3 normalise each head (gain over head_dim); OLMo-2 the whole
        // projection (gain over heads · head_dim).
        let per_head = cfg.architecture != Architecture::Olmo2;
        let head_norm = |src: &mut dyn TensorSource, name: &str, heads: usize| {
            if !cfg.architecture.has_qk_norm() {
                return Ok(None);
            }
            let len = if per_head {
                cfg.head_dim
            } else {
                heads * cfg.head_dim
            };
            norm_at(src, &format!("{p}.self_attn.{name}.weight"), len).map(Some)
        };
        let q_norm = head_norm(&mut *src, "q_norm", cfg.num_attention_heads)?;
        let k_norm = head_norm(&mut *src, "k_norm", cfg.num_key_value_heads)?;
        let mut linear = |name: &str, out: usize, inp: usize, bias: bool| -> Result<Linear> {
            let weight = matrix(src, &format!("{p}.{name}.weight"), [out, inp], opts)?;
            let bias = if bias {
                Some(required(src, &format!("{p}.{name}.bias"), &[out], opts)?)
            } else {
                optional(src, &format!("{p}.{name}.bias"), &[out], opts)?
            };
            Ok(Linear::new(weight, bias))
        };
        let (self_attn, mlp) = if cfg.architecture == Architecture::Phi3 {
            // Phi-3 stores `qkv_proj` (q, then k, then v rows) and `gate_up_proj` (gate, then
            // up rows) fused; the parts are row ranges of one tensor (no copy).
            let qkv = linear("self_attn.qkv_proj", q_dim + 2 * kv_dim, d, false)?.weight;
            let gate_up = linear("mlp.gate_up_proj", 2 * ff, d, false)?.weight;
            let part = |t: &Weight, at: usize, len: usize| -> Result<Linear> {
                Ok(Linear::new(t.narrow_rows(at, len)?, None))
            };
            (
                Attention {
                    q_proj: part(&qkv, 0, q_dim)?,
                    k_proj: part(&qkv, q_dim, kv_dim)?,
                    v_proj: part(&qkv, q_dim + kv_dim, kv_dim)?,
                    o_proj: linear("self_attn.o_proj", d, q_dim, false)?,
                    q_norm: None,
                    k_norm: None,
                },
                Mlp {
                    gate_proj: part(&gate_up, 0, ff)?,
                    up_proj: part(&gate_up, ff, ff)?,
                    down_proj: linear("mlp.down_proj", d, ff, false)?,
                },
            )
        } else {
            (
                Attention {
                    q_proj: linear("self_attn.q_proj", q_dim, d, cfg.qkv_bias)?,
                    k_proj: linear("self_attn.k_proj", kv_dim, d, cfg.qkv_bias)?,
                    v_proj: linear("self_attn.v_proj", kv_dim, d, cfg.qkv_bias)?,
                    o_proj: linear("self_attn.o_proj", d, q_dim, cfg.o_bias)?,
                    q_norm,
                    k_norm,
                },
                Mlp {
                    gate_proj: linear("mlp.gate_proj", ff, d, cfg.mlp_bias)?,
                    up_proj: linear("mlp.up_proj", ff, d, cfg.mlp_bias)?,
                    down_proj: linear("mlp.down_proj", d, ff, cfg.mlp_bias)?,
                },
            )
        };
        let names = NormNames::of(cfg.architecture);
        let mut layer_norm = |name: Option<&str>| -> Result<Option<RmsNorm>> {
            name.map(|n| norm_at(&mut *src, &format!("{p}.{n}.weight"), d))
                .transpose()
        };
        layers.push(DecoderLayer {
            input_layernorm: layer_norm(names.pre_attn)?,
            self_attn,
            post_attention_layernorm: layer_norm(names.pre_mlp)?,
            mlp,
            attn_out_norm: layer_norm(names.attn_out)?,
            mlp_out_norm: layer_norm(names.mlp_out)?,
        });
    }
    let norm = norm_at(src, "model.norm.weight", d)?;
    let lm_head_weight = if cfg.tie_word_embeddings {
        embed_tokens.clone()
    } else {
        matrix(src, "lm_head.weight", [cfg.vocab_size, d], opts)?
    };
    Transformer::new(
        cfg,
        embed_tokens,
        layers,
        norm,
        Linear::new(lm_head_weight, None),
    )
}
