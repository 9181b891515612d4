//! Checkpoints: the adapter in PEFT's format (`adapter_config.json` +
//! `adapter_model.safetensors`, PEFT's tensor names) plus `optimizer.safetensors` (AdamW
//! moments) and `trainer_state.json` (step, settings, curves), so a run resumes exactly.
//!
//! A checkpoint folder is written under a temporary name and renamed into place, so a crash or
//! a full disk never leaves a half-written checkpoint where a complete one is expected.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::train::dataset::PromptTemplate;
use crate::train::lora_trainer::{EvalReport, Moments, StepReport, TrainSettings, Trainer};

/// How the training examples were prepared (a resumed run rebuilds them identically).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DataSettings {
    /// The JSONL file.
    pub path: PathBuf,
    /// Template the records were rendered with.
    pub template: PromptTemplate,
    /// Longest example in tokens.
    pub max_len: usize,
    /// Fraction held out for validation.
    pub validation_fraction: f64,
}

impl Default for DataSettings {
    fn default() -> Self {
        Self {
            path: PathBuf::new(),
            template: PromptTemplate::Chat,
            max_len: 512,
            validation_fraction: 0.1,
        }
    }
}

/// `trainer_state.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps completed.
    pub step: usize,
    /// The run's settings.
    pub settings: TrainSettings,
    /// Where the examples came from and how they were prepared.
    pub data: DataSettings,
    /// Training / validation example counts (a resumed run must see the same split).
    pub train_examples: usize,
    /// Validation examples.
    pub validation_examples: usize,
    /// Every step so far.
    pub history: Vec<StepReport>,
    /// Every validation so far.
    pub evals: Vec<EvalReport>,
    /// The base model as given.
    pub base_model: String,
}

/// The folder name of the checkpoint after `step` steps.
pub fn checkpoint_name(step: usize) -> String {
    format!("checkpoint-{step:06}")
}

fn write_err(path: &Path, err: impl std::fmt::Display) -> Error {
    Error::bad_file(path, format!("cannot write checkpoint ({err})"))
}

/// Writes `adapter_config.json` and `adapter_model.safetensors` for the trainer's adapters.
pub fn write_peft_adapter(dir: &Path, trainer: &Trainer, base_model: &str) -> Result<()> {
    let settings = trainer.settings();
    let config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": settings.lora.rank,
        "lora_alpha": settings.lora.alpha,
        "lora_dropout": settings.lora.dropout,
        "target_modules": settings.lora.targets,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "use_rslora": false,
        "use_dora": false,
        "modules_to_save": null,
        "layers_to_transform": null,
        "layers_pattern": null,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": null,
    });
    let config_path = dir.join("adapter_config.json");
    std::fs::write(&config_path, serde_json::to_string_pretty(&config)?)
        .map_err(|err| write_err(&config_path, err))?;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for param in trainer.params() {
        let prefix = param.peft_prefix();
        tensors.insert(
            format!("{prefix}.lora_A.weight"),
            param.a.as_tensor().to_device(&Device::Cpu)?,
        );
        tensors.insert(
            format!("{prefix}.lora_B.weight"),
            param.b.as_tensor().to_device(&Device::Cpu)?,
        );
    }
    let weights_path = dir.join("adapter_model.safetensors");
    candle_core::safetensors::save(&tensors, &weights_path)
        .map_err(|err| write_err(&weights_path, err))?;
    Ok(())
}

/// Writes a complete checkpoint into `dir` (replacing it atomically).
pub fn save_checkpoint(dir: &Path, trainer: &Trainer, state: &TrainerState) -> Result<()> {
    let parent = dir.parent().unwrap_or_else(|| Path::new("."));
    std::fs::create_dir_all(parent).map_err(|err| write_err(parent, err))?;
    let name = dir.file_name().map_or_else(
        || "checkpoint".to_owned(),
        |n| n.to_string_lossy().into_owned(),
    );
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|err| write_err(&tmp, err))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|err| write_err(&tmp, err))?;
    let result = (|| -> Result<()> {
        write_peft_adapter(&tmp, trainer, &state.base_model)?;
        let mut moments: HashMap<String, Tensor> = HashMap::new();
        for (param, (ma, mb)) in trainer.params().iter().zip(trainer.moments()) {
            let prefix = param.peft_prefix();
            for (which, m) in [("lora_A", ma), ("lora_B", mb)] {
                moments.insert(
                    format!("{prefix}.{which}.exp_avg"),
                    m.m.to_device(&Device::Cpu)?,
                );
                moments.insert(
                    format!("{prefix}.{which}.exp_avg_sq"),
                    m.v.to_device(&Device::Cpu)?,
                );
            }
        }
        let opt_path = tmp.join("optimizer.safetensors");
        candle_core::safetensors::save(&moments, &opt_path)
            .map_err(|err| write_err(&opt_path, err))?;
        let state_path = tmp.join("trainer_state.json");
        std::fs::write(&state_path, serde_json::to_string_pretty(state)?)
            .map_err(|err| write_err(&state_path, err))?;
        Ok(())
    })();
    if let Err(err) = result {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(err);
    }
    if dir.exists() {
        let old = parent.join(format!(".{name}.old-{}", std::process::id()));
        std::fs::rename(dir, &old).map_err(|err| write_err(dir, err))?;
        std::fs::rename(&tmp, dir).map_err(|err| write_err(dir, err))?;
        let _ = std::fs::remove_dir_all(&old);
    } else {
        std::fs::rename(&tmp, dir).map_err(|err| write_err(dir, err))?;
    }
    Ok(())
}

/// The checkpoint to resume from: `path` itself when it holds `trainer_state.json`, else the
/// `checkpoint-*` folder in it with the most steps.
pub fn find_checkpoint(path: &Path) -> Result<PathBuf> {
    if !path.exists() {
        return Err(Error::NotFound {
            path: path.to_path_buf(),
        });
    }
    if path.join("trainer_state.json").exists() {
        return Ok(path.to_path_buf());
    }
    let entries = std::fs::read_dir(path)
        .map_err(|err| Error::bad_file(path, format!("cannot list the run folder ({err})")))?;
    let mut best: Option<(usize, PathBuf)> = None;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(step) = name
            .strip_prefix("checkpoint-")
            .and_then(|s| s.parse::<usize>().ok())
        else {
            continue;
        };
        if !entry.path().join("trainer_state.json").exists() {
            continue;
        }
        if best.as_ref().is_none_or(|(s, _)| step > *s) {
            best = Some((step, entry.path()));
        }
    }
    best.map(|(_, p)| p).ok_or_else(|| {
        Error::bad_file(
            path,
            "no checkpoint to resume from (expected checkpoint-*/trainer_state.json)",
        )
    })
}

/// Reads `trainer_state.json` of a checkpoint.
pub fn read_state(dir: &Path) -> Result<TrainerState> {
    let path = dir.join("trainer_state.json");
    let text = std::fs::read_to_string(&path)
        .map_err(|err| Error::bad_file(&path, format!("cannot read trainer state ({err})")))?;
    serde_json::from_str(&text).map_err(|err| {
        Error::bad_file(
            &path,
            format!("trainer_state.json: {}", crate::error::json_message(&err)),
        )
    })
}

fn load_tensors(path: &Path) -> Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load(path, &Device::Cpu).map_err(|err| {
        Error::bad_file(
            path,
            format!(
                "corrupt or truncated safetensors ({})",
                err.to_string().lines().next().unwrap_or_default()
            ),
        )
    })
}

/// Loads adapter values and AdamW moments from `dir` into `trainer`.
pub fn restore(dir: &Path, trainer: &mut Trainer, state: &TrainerState) -> Result<()> {
    let weights_path = dir.join("adapter_model.safetensors");
    let opt_path = dir.join("optimizer.safetensors");
    let weights = load_tensors(&weights_path)?;
    let opt = load_tensors(&opt_path)?;
    let mut values = Vec::new();
    let mut moments = Vec::new();
    for param in trainer.params() {
        let prefix = param.peft_prefix();
        let get = |map: &HashMap<String, Tensor>, path: &Path, key: String| -> Result<Tensor> {
            map.get(&key)
                .cloned()
                .ok_or_else(|| Error::bad_file(path, format!("missing tensor `{key}`")))
        };
        let a = get(&weights, &weights_path, format!("{prefix}.lora_A.weight"))?;
        let b = get(&weights, &weights_path, format!("{prefix}.lora_B.weight"))?;
        let device = param.a.device().clone();
        let dtype = param.a.dtype();
        let moment = |which: &str| -> Result<Moments> {
            Ok(Moments {
                m: get(&opt, &opt_path, format!("{prefix}.{which}.exp_avg"))?
                    .to_dtype(dtype)?
                    .to_device(&device)?,
                v: get(&opt, &opt_path, format!("{prefix}.{which}.exp_avg_sq"))?
                    .to_dtype(dtype)?
                    .to_device(&device)?,
            })
        };
        moments.push((moment("lora_A")?, moment("lora_B")?));
        values.push((a, b));
    }
    trainer.restore(&values, moments, state.step)
}
