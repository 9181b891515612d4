//! PEFT LoRA adapters on disk (`adapter_config.json` + `adapter_model.safetensors`, tensor names
//! `base_model.model.model.layers.{i}.{self_attn|mlp}.{module}.lora_{A|B}.weight`), attached to
//! a loaded [`Transformer`].

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::Device;
use serde::Deserialize;

use crate::error::{json_message, Error, Result};
use crate::model::config::Architecture;
use crate::model::info::AdapterInfo;
use crate::model::load::first_line;
use crate::model::lora::{Linear, LoraAdapter};
use crate::model::transformer::Transformer;

/// The `adapter_config.json` fields tunelens reads.
#[derive(Clone, Debug, Deserialize)]
struct PeftConfig {
    r: usize,
    lora_alpha: f64,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    fan_in_fan_out: bool,
    #[serde(default)]
    use_dora: bool,
}

/// The modules a LoRA adapter can adapt, by their PEFT names.
pub const LORA_MODULES: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// The linear layer of `model` that a PEFT module path names.
pub fn module_mut<'a>(
    model: &'a mut Transformer,
    layer_idx: usize,
    module: &str,
) -> Option<&'a mut Linear> {
    let layer = model.layers.get_mut(layer_idx)?;
    Some(match module {
        "q_proj" => &mut layer.self_attn.q_proj,
        "k_proj" => &mut layer.self_attn.k_proj,
        "v_proj" => &mut layer.self_attn.v_proj,
        "o_proj" => &mut layer.self_attn.o_proj,
        "gate_proj" => &mut layer.mlp.gate_proj,
        "up_proj" => &mut layer.mlp.up_proj,
        "down_proj" => &mut layer.mlp.down_proj,
        _ => return None,
    })
}

/// The parts of a module that the model's architecture fuses on disk, as
/// `(module, first row, rows)`; `None` for a module that is not fused.
fn fused_parts(model: &Transformer, module: &str) -> Option<Vec<(String, usize, usize)>> {
    let cfg = model.config();
    if cfg.architecture != Architecture::Phi3 {
        return None;
    }
    let q = cfg.num_attention_heads * cfg.head_dim;
    let kv = cfg.num_key_value_heads * cfg.head_dim;
    let ff = cfg.intermediate_size;
    let parts = match module {
        "qkv_proj" => vec![("q_proj", 0, q), ("k_proj", q, kv), ("v_proj", q + kv, kv)],
        "gate_up_proj" => vec![("gate_proj", 0, ff), ("up_proj", ff, ff)],
        _ => return None,
    };
    Some(
        parts
            .into_iter()
            .map(|(m, at, len)| (m.to_owned(), at, len))
            .collect(),
    )
}

/// Parses `...layers.{i}.{self_attn|mlp}.{module}.lora_{A|B}[.default].weight`.
fn parse_key(key: &str) -> Option<(usize, String, char)> {
    let rest = &key[key.find("layers.")? + "layers.".len()..];
    let mut parts = rest.split('.');
    let layer_idx = parts.next()?.parse().ok()?;
    let _block = parts.next()?;
    let module = parts.next()?.to_owned();
    let which = match parts.next()? {
        "lora_A" => 'A',
        "lora_B" => 'B',
        _ => return None,
    };
    Some((layer_idx, module, which))
}

/// The tensors of a PEFT adapter folder: its config's rank and alpha, its weights file, and
/// `A`/`B` per `(layer, module)` (`None` where the file lacks one of the two).
#[allow(clippy::type_complexity)]
struct PeftFiles {
    cfg: PeftConfig,
    weights_path: std::path::PathBuf,
    pairs: BTreeMap<(usize, String), (Option<candle_core::Tensor>, Option<candle_core::Tensor>)>,
}

fn read_peft_files(dir: &Path) -> Result<PeftFiles> {
    if !dir.exists() {
        return Err(Error::NotFound {
            path: dir.to_path_buf(),
        });
    }
    let config_path = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&config_path).map_err(|err| {
        Error::bad_file(
            &config_path,
            format!("cannot read PEFT adapter config ({err})"),
        )
    })?;
    let cfg: PeftConfig = serde_json::from_str(&text).map_err(|err| {
        Error::bad_file(
            &config_path,
            format!("adapter_config.json: {}", json_message(&err)),
        )
    })?;
    if cfg.fan_in_fan_out || cfg.use_dora {
        return Err(Error::bad_file(
            &config_path,
            "fan_in_fan_out and DoRA adapters are not supported",
        ));
    }
    let weights_path = dir.join("adapter_model.safetensors");
    if !weights_path.exists() {
        return Err(Error::bad_file(
            &weights_path,
            "missing adapter weights (only adapter_model.safetensors is supported)",
        ));
    }
    let tensors = candle_core::safetensors::load(&weights_path, &Device::Cpu).map_err(|err| {
        Error::bad_file(
            &weights_path,
            format!("corrupt or truncated safetensors ({})", first_line(&err)),
        )
    })?;
    let mut pairs: BTreeMap<
        (usize, String),
        (Option<candle_core::Tensor>, Option<candle_core::Tensor>),
    > = BTreeMap::new();
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    for name in names {
        let Some((layer_idx, module, which)) = parse_key(name) else {
            return Err(Error::bad_file(
                &weights_path,
                format!("unexpected tensor `{name}`"),
            ));
        };
        let entry = pairs.entry((layer_idx, module)).or_default();
        let tensor = tensors[name].clone();
        if which == 'A' {
            entry.0 = Some(tensor);
        } else {
            entry.1 = Some(tensor);
        }
    }
    Ok(PeftFiles {
        cfg,
        weights_path,
        pairs,
    })
}

/// One adapted layer of a PEFT adapter: `(layer, module, A (r, in), B (out, r), scale)`.
pub type AdapterTensors = (usize, String, candle_core::Tensor, candle_core::Tensor, f64);

/// Reads a PEFT adapter folder without attaching it (f32 on the CPU), e.g. to combine the
/// adapters of continual stages.
pub fn read_peft_adapter(dir: &Path) -> Result<Vec<AdapterTensors>> {
    let files = read_peft_files(dir)?;
    let mut out = Vec::with_capacity(files.pairs.len());
    for ((layer, module), (a, b)) in files.pairs {
        let (Some(a), Some(b)) = (a, b) else {
            return Err(Error::bad_file(
                &files.weights_path,
                format!("layer {layer} {module}: lora_A and lora_B must both be present"),
            ));
        };
        let rank = a.dims().first().copied().unwrap_or(files.cfg.r);
        #[allow(clippy::cast_precision_loss)]
        let scale = if files.cfg.use_rslora {
            files.cfg.lora_alpha / (rank as f64).sqrt()
        } else {
            files.cfg.lora_alpha / rank as f64
        };
        out.push((
            layer,
            module,
            a.to_dtype(candle_core::DType::F32)?,
            b.to_dtype(candle_core::DType::F32)?,
            scale,
        ));
    }
    Ok(out)
}

/// Loads the adapter in `dir` and attaches it to `model`.
pub fn attach_peft_adapter(model: &mut Transformer, dir: &Path) -> Result<AdapterInfo> {
    let PeftFiles {
        cfg,
        weights_path,
        pairs,
    } = read_peft_files(dir)?;
    let device = model.device().clone();
    let dtype = model.dtype();
    let mut targets: Vec<String> = Vec::new();
    let mut parameters = 0;
    let adapted = pairs.len();
    let layer_set: std::collections::BTreeSet<usize> = pairs.keys().map(|(l, _)| *l).collect();
    for ((layer_idx, module), (a, b)) in pairs {
        let (Some(a), Some(b)) = (a, b) else {
            return Err(Error::bad_file(
                &weights_path,
                format!("layer {layer_idx} {module}: lora_A and lora_B must both be present"),
            ));
        };
        let rank = a.dims().first().copied().unwrap_or(cfg.r);
        let scale = if cfg.use_rslora {
            cfg.lora_alpha / (rank as f64).sqrt()
        } else {
            cfg.lora_alpha / rank as f64
        };
        parameters += a.elem_count() + b.elem_count();
        // A fused module (Phi-3's `qkv_proj`, `gate_up_proj`) is split as the loader split its
        // weight: every part keeps `A`, and takes its rows of `B` (`ΔW = B A` row by row).
        let parts = fused_parts(model, &module).unwrap_or_else(|| vec![(module.clone(), 0, 0)]);
        let rows: usize = parts.iter().map(|p| p.2).sum();
        if rows > 0 && b.dims().first() != Some(&rows) {
            return Err(Error::bad_file(
                &weights_path,
                format!(
                    "layer {layer_idx} {module}: lora_B has shape {:?}, the fused module has {rows} rows",
                    b.dims()
                ),
            ));
        }
        for (part, at, len) in parts {
            let b = if len == 0 {
                b.clone()
            } else {
                b.narrow(0, at, len)?.contiguous()?
            };
            let Some(linear) = module_mut(model, layer_idx, &part) else {
                return Err(Error::bad_file(
                    &weights_path,
                    format!(
                        "the adapter targets layer {layer_idx} {module}, which the model does not have"
                    ),
                ));
            };
            linear
                .attach(LoraAdapter {
                    a: a.to_dtype(dtype)?.to_device(&device)?,
                    b: b.to_dtype(dtype)?.to_device(&device)?,
                    scale,
                    dropout: None,
                })
                .map_err(|err| {
                    Error::bad_file(&weights_path, format!("layer {layer_idx} {module}: {err}"))
                })?;
        }
        if !targets.contains(&module) {
            targets.push(module);
        }
    }
    targets.sort();
    Ok(AdapterInfo {
        path: dir.display().to_string(),
        rank: cfg.r,
        alpha: cfg.lora_alpha,
        target_modules: targets,
        adapted_layers: adapted,
        layers: layer_set.len(),
        parameters,
    })
}

/// Folds every attached adapter into its layer's weight (`W ← W + scale · B A`, in f32, then
/// the model's dtype) and removes it: the continual-learning step of METHODS.md §5.3 before a
/// new stage's fresh adapter. Returns how many layers changed.
pub fn merge_adapters(model: &mut Transformer) -> Result<usize> {
    let mut merged = 0;
    for layer in 0..model.layers.len() {
        for module in LORA_MODULES {
            let Some(linear) = module_mut(model, layer, module) else {
                continue;
            };
            if linear.lora.is_none() {
                continue;
            }
            linear.weight = linear.weight.replaced_by(&linear.effective_weight()?)?;
            linear.lora = None;
            merged += 1;
        }
    }
    Ok(merged)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_peft_keys() {
        assert_eq!(
            parse_key("base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight"),
            Some((3, "q_proj".to_owned(), 'A'))
        );
        assert_eq!(
            parse_key("base_model.model.model.layers.0.mlp.down_proj.lora_B.default.weight"),
            Some((0, "down_proj".to_owned(), 'B'))
        );
        assert_eq!(parse_key("base_model.model.lm_head.weight"), None);
    }
}
