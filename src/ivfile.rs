//! Saved instruction vectors: `NAME.safetensors` (the vector, the head list, the mean head
//! outputs) beside `NAME.json` (task, model, weight fingerprint, layer sweep, settings). The
//! IV-guided fine-tuning and the steering of generation read them back; a vector made for a
//! different model (hidden size, or fingerprint) is refused or flagged.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::analysis::iv::{HeadId, IvConfig, IvEvaluation, TaskIv};
use crate::error::{Error, Result};

/// The JSON side of a saved vector.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct IvMeta {
    /// Format tag.
    pub format: String,
    /// The task (or tasks, joined with `+`).
    pub task: String,
    /// The model's display name.
    pub model: String,
    /// The weight fingerprint of the model.
    pub fingerprint: String,
    /// Hidden size `d`.
    pub hidden: usize,
    /// Layers `L`.
    pub layers: usize,
    /// Heads `h`.
    pub heads: usize,
    /// Head dimension.
    pub head_dim: usize,
    /// The heads summed into the vector, `(layer, head)`.
    pub head_list: Vec<HeadId>,
    /// `‖IV‖₂`.
    pub norm: f32,
    /// The zero-shot sweep, when it was run.
    pub evaluation: Option<IvEvaluation>,
    /// The settings of the run.
    pub settings: IvConfig,
}

/// A vector read back from disk.
#[derive(Clone, Debug, PartialEq)]
pub struct SavedIv {
    /// The vector, `(d,)`.
    pub vector: Vec<f32>,
    /// The mean head outputs, `L × h × d_h`.
    pub means: Vec<f32>,
    /// Its description.
    pub meta: IvMeta,
}

const FORMAT: &str = "tunelens-iv-1";

/// The `.json` beside a `.safetensors` path.
pub fn meta_path(path: &Path) -> PathBuf {
    path.with_extension("json")
}

/// The `.safetensors` path of a chosen name (an extension the user typed is replaced).
pub fn vector_path(path: &Path) -> PathBuf {
    path.with_extension("safetensors")
}

/// Writes `task`'s vector of a model as `path` (`.safetensors`) and its `.json`; returns both.
#[allow(clippy::too_many_arguments)]
pub fn save(
    path: &Path,
    task: &TaskIv,
    model: &str,
    fingerprint: &str,
    run: &crate::analysis::iv::IvRun,
    settings: &IvConfig,
) -> Result<Vec<PathBuf>> {
    let path = vector_path(path);
    if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::bad_file(dir, format!("cannot create: {e}")))?;
    }
    let cpu = Device::Cpu;
    let heads: Vec<u32> = task
        .top
        .iter()
        .flat_map(|s| [s.layer as u32, s.head as u32])
        .collect();
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    tensors.insert(
        "iv".to_owned(),
        Tensor::from_slice(&task.iv, (1, task.iv.len()), &cpu)?,
    );
    tensors.insert(
        "heads".to_owned(),
        Tensor::from_vec(heads, (task.top.len(), 2), &cpu)?,
    );
    tensors.insert(
        "mean_activations".to_owned(),
        Tensor::from_slice(&task.means, (run.layers, run.heads, run.head_dim), &cpu)?,
    );
    let meta = IvMeta {
        format: FORMAT.to_owned(),
        task: task.task.clone(),
        model: model.to_owned(),
        fingerprint: fingerprint.to_owned(),
        hidden: run.hidden,
        layers: run.layers,
        heads: run.heads,
        head_dim: run.head_dim,
        head_list: task.top.iter().map(|s| (s.layer, s.head)).collect(),
        norm: task.iv_norm,
        evaluation: task.evaluation.clone(),
        settings: settings.clone(),
    };
    // Written next to the target, then renamed: a full disk leaves no half file behind.
    let tmp = path.with_extension("safetensors.part");
    candle_core::safetensors::save(&tensors, &tmp).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::bad_file(&path, format!("cannot write: {e}"))
    })?;
    std::fs::rename(&tmp, &path)
        .map_err(|e| Error::bad_file(&path, format!("cannot write: {e}")))?;
    let json_path = meta_path(&path);
    crate::export::write_bytes(&json_path, serde_json::to_string_pretty(&meta)?.as_bytes())?;
    Ok(vec![path, json_path])
}

/// Reads a saved vector (`.safetensors` and its `.json`).
pub fn load(path: &Path) -> Result<SavedIv> {
    let path = vector_path(path);
    if !path.exists() {
        return Err(Error::NotFound { path });
    }
    let json_path = meta_path(&path);
    if !json_path.exists() {
        return Err(Error::bad_file(
            &path,
            format!(
                "its description {} is missing",
                json_path.file_name().unwrap_or_default().to_string_lossy()
            ),
        ));
    }
    let text = std::fs::read_to_string(&json_path).map_err(|e| Error::bad_file(&json_path, e))?;
    let meta: IvMeta = serde_json::from_str(&text)
        .map_err(|e| Error::bad_file(&json_path, format!("not a vector description: {e}")))?;
    let tensors = candle_core::safetensors::load(&path, &Device::Cpu)
        .map_err(|e| Error::bad_file(&path, format!("not a safetensors file: {e}")))?;
    let get = |name: &str| -> Result<Vec<f32>> {
        let t = tensors
            .get(name)
            .ok_or_else(|| Error::bad_file(&path, format!("no tensor `{name}`")))?;
        Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
    };
    let vector = get("iv")?;
    if vector.len() != meta.hidden {
        return Err(Error::bad_file(
            &path,
            format!(
                "the vector has {} values, its description says {}",
                vector.len(),
                meta.hidden
            ),
        ));
    }
    if vector.iter().any(|v| !v.is_finite()) {
        return Err(Error::bad_file(
            &path,
            "the vector holds NaN or infinite values",
        ));
    }
    let means = get("mean_activations").unwrap_or_default();
    Ok(SavedIv {
        vector,
        means,
        meta,
    })
}

/// Checks a saved vector against a model: a different hidden size is an error (the vector
/// cannot be added); a different fingerprint is a warning (returned), since a fine-tune of the
/// same base is a legitimate target.
pub fn check_model(
    saved: &SavedIv,
    hidden: usize,
    layers: usize,
    fingerprint: &str,
    model: &str,
) -> Result<Option<String>> {
    if saved.meta.hidden != hidden {
        return Err(Error::invalid(
            "instruction vector",
            format!(
                "made for hidden size {} ({}), this model has {hidden} ({model})",
                saved.meta.hidden, saved.meta.model
            ),
        ));
    }
    if saved.meta.layers != layers {
        return Err(Error::invalid(
            "instruction vector",
            format!(
                "made for {} layers ({}), this model has {layers} ({model})",
                saved.meta.layers, saved.meta.model
            ),
        ));
    }
    Ok((saved.meta.fingerprint != fingerprint).then(|| {
        format!(
            "the vector was made with {} ({}), not with these weights",
            saved.meta.model, saved.meta.task
        )
    }))
}
