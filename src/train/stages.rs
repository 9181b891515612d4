//! Continual training in stages (METHODS.md §5.3 "continual"): a plan is a list of stages, each
//! a data file with its own settings (and instruction vector); before each new stage the
//! previous stages' adapters are merged into the weights and a fresh LoRA starts. Every stage
//! writes its run folder (checkpoints in PEFT's format, `adapter/`, curves) under the plan's
//! output folder, plus `combined-adapter/`: one PEFT adapter equal to the base with every stage
//! so far merged, which loads on the plain base anywhere ("Load as B", `--model BASE+DIR`,
//! `PeftModel.from_pretrained`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::adapter::read_peft_adapter;
use crate::train::checkpoint::DataSettings;
use crate::train::settings::TrainSettings;

/// One stage of a plan.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Stage {
    /// A short name (the run folder's suffix).
    pub name: String,
    /// The data file and its preparation.
    pub data: DataSettings,
    /// Trainer settings, including this stage's guidance (its IV file).
    pub settings: TrainSettings,
}

/// A continual-training plan, as the GUI saves and opens it and `tunelens train --stages`
/// reads it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StagePlan {
    /// The stages, in order.
    pub stages: Vec<Stage>,
}

impl StagePlan {
    /// Checks every stage's settings; the error names the stage.
    pub fn validate(&self) -> Result<()> {
        if self.stages.is_empty() {
            return Err(Error::invalid("stages", "the plan has no stage"));
        }
        for (i, stage) in self.stages.iter().enumerate() {
            stage.settings.validate().map_err(|e| {
                Error::invalid(format!("stage {} ({})", i + 1, stage.name), e.to_string())
            })?;
        }
        Ok(())
    }

    /// The run folder of stage `i` under `out`.
    pub fn stage_dir(&self, out: &Path, i: usize) -> PathBuf {
        let name = self
            .stages
            .get(i)
            .map(|s| crate::export::slug(&s.name))
            .unwrap_or_default();
        out.join(format!("stage-{:02}-{name}", i + 1))
    }
}

/// Reads a plan (JSON); errors name the file.
pub fn read_plan(path: &Path) -> Result<StagePlan> {
    if !path.exists() {
        return Err(Error::NotFound {
            path: path.to_path_buf(),
        });
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::bad_file(path, e))?;
    let plan: StagePlan = serde_json::from_str(&text)
        .map_err(|e| Error::bad_file(path, format!("not a stage plan: {e}")))?;
    plan.validate().map_err(|e| Error::bad_file(path, e))?;
    Ok(plan)
}

/// Writes a plan as pretty JSON.
pub fn write_plan(path: &Path, plan: &StagePlan) -> Result<()> {
    crate::cache::write_atomic(path, serde_json::to_string_pretty(plan)?.as_bytes())
}

/// Writes into `out` one PEFT adapter equal to the stages' adapters `dirs` merged in order:
/// per module the stages' `A`s stacked and their scaled `B`s side by side (rank `Σ r_k`,
/// `lora_alpha` = rank, so the scale is 1); a module a stage did not adapt gets a zero block.
pub fn write_combined_adapter(dirs: &[PathBuf], out: &Path, base_model: &str) -> Result<()> {
    let stages = dirs
        .iter()
        .map(|d| read_peft_adapter(d))
        .collect::<Result<Vec<_>>>()?;
    // (layer, module) -> (in, out) and each stage's (A, B · scale).
    let mut shapes: BTreeMap<(usize, String), (usize, usize)> = BTreeMap::new();
    let ranks: Vec<usize> = stages
        .iter()
        .map(|s| s.first().map_or(0, |(_, _, a, _, _)| a.dims()[0]))
        .collect();
    for stage in &stages {
        for (layer, module, a, b, _) in stage {
            shapes.insert((*layer, module.clone()), (a.dims()[1], b.dims()[0]));
            if a.dims()[0] != b.dims()[1] {
                return Err(Error::invalid("adapter", "A and B ranks differ"));
            }
        }
    }
    let total: usize = ranks.iter().sum();
    let mut tensors = std::collections::HashMap::new();
    let mut targets: Vec<String> = Vec::new();
    for ((layer, module), (in_dim, out_dim)) in &shapes {
        let mut a_blocks = Vec::new();
        let mut b_blocks = Vec::new();
        for (stage, &rank) in stages.iter().zip(&ranks) {
            if let Some((_, _, a, b, scale)) =
                stage.iter().find(|(l, m, ..)| l == layer && m == module)
            {
                a_blocks.push(a.clone());
                b_blocks.push((b * *scale)?);
            } else {
                a_blocks.push(Tensor::zeros((rank, *in_dim), DType::F32, &Device::Cpu)?);
                b_blocks.push(Tensor::zeros((*out_dim, rank), DType::F32, &Device::Cpu)?);
            }
        }
        let block = if matches!(module.as_str(), "gate_proj" | "up_proj" | "down_proj") {
            "mlp"
        } else {
            "self_attn"
        };
        let prefix = format!("base_model.model.model.layers.{layer}.{block}.{module}");
        tensors.insert(
            format!("{prefix}.lora_A.weight"),
            Tensor::cat(&a_blocks, 0)?,
        );
        tensors.insert(
            format!("{prefix}.lora_B.weight"),
            Tensor::cat(&b_blocks, 1)?,
        );
        if !targets.contains(module) {
            targets.push(module.clone());
        }
    }
    targets.sort();
    std::fs::create_dir_all(out)
        .map_err(|e| Error::bad_file(out, format!("cannot create: {e}")))?;
    let config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": total,
        "lora_alpha": total,
        "lora_dropout": 0.0,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "use_rslora": false,
        "use_dora": false,
    });
    crate::export::write_bytes(
        &out.join("adapter_config.json"),
        serde_json::to_string_pretty(&config)?.as_bytes(),
    )?;
    let weights = out.join("adapter_model.safetensors");
    candle_core::safetensors::save(&tensors, &weights)
        .map_err(|e| Error::bad_file(&weights, format!("cannot write: {e}")))?;
    Ok(())
}
