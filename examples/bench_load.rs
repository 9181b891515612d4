//! Peak resident memory while loading a safetensors checkpoint, against the memory the loaded
//! model keeps. The demo model is written as a bf16 Hugging Face folder (at `--folder DIR` when
//! given and absent; an existing DIR is used as it is), then loaded in a fresh child process per case:
//!
//! - `read`: tunelens's loader (a tensor at a time, positioned reads), to f32, to bf16 tensors,
//!   and kept as stored (`--weights stored`: packed bf16 matrices, f32 compute);
//! - `mmap`: the earlier loader for comparison (the files memory-mapped whole, each tensor
//!   converted from the mapping, the mapping kept until the model is built).
//!
//! For each: RSS before the load (the binary), peak RSS (VmHWM) and RSS after it, and the
//! ratio of the load's peak to what it leaves resident, both less the baseline. JSON to stdout.
//!
//!   cargo run --release --example bench_load -- [--folder DIR]

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context as _;
use candle_core::{DType, Device, Tensor};
use serde_json::json;
use tunelens::model::{load, LoadOptions, ModelSpec, WeightStorage};

fn status_kb(field: &str) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let line = status
        .lines()
        .find(|l| l.starts_with(field))
        .with_context(|| format!("{field} in /proc/self/status"))?;
    Ok(line
        .split_whitespace()
        .nth(1)
        .context("value")?
        .parse::<f64>()?)
}

/// The child: load `folder` as `case`, print the memory figures while the weights are held.
fn measure(folder: &Path, case: &str) -> anyhow::Result<()> {
    let before = status_kb("VmRSS:")?;
    let start = std::time::Instant::now();
    let report = |weights_bytes: usize| -> anyhow::Result<()> {
        let secs = start.elapsed().as_secs_f64();
        let peak = status_kb("VmHWM:")?;
        let after = status_kb("VmRSS:")?;
        let mb = |kb: f64| kb / 1024.0;
        println!(
            "{}",
            json!({
                "case": case,
                "load_s": secs,
                "weights_mb": weights_bytes as f64 / f64::from(1 << 20),
                "rss_before_mb": mb(before),
                "peak_rss_mb": mb(peak),
                "rss_after_mb": mb(after),
                "peak_over_resident": (peak - before) / (after - before),
            })
        );
        Ok(())
    };
    match case {
        "read-f32" | "read-bf16" | "read-stored" => {
            let (dtype, weights) = match case {
                "read-f32" => (DType::F32, WeightStorage::F32),
                "read-bf16" => (DType::BF16, WeightStorage::F32),
                _ => (DType::F32, WeightStorage::Stored),
            };
            let m = load(
                &ModelSpec::parse(&folder.display().to_string()),
                &LoadOptions {
                    device: Device::Cpu,
                    dtype,
                    weights,
                },
            )?;
            report(m.model.resident_bytes())
        }
        "mmap-f32" => {
            // SAFETY: a read-only mapping of a file this process just wrote and nobody edits.
            #[allow(unsafe_code)]
            let files = unsafe {
                candle_core::safetensors::MmapedSafetensors::new(folder.join("model.safetensors"))?
            };
            let names: Vec<String> = files.tensors().into_iter().map(|(n, _)| n).collect();
            let mut kept: Vec<Tensor> = Vec::new();
            for n in names {
                kept.push(files.load(&n, &Device::Cpu)?.to_dtype(DType::F32)?);
            }
            // The earlier loader built the model while the mapping lived.
            drop(files);
            report(kept.iter().map(|t| t.elem_count() * 4).sum())
        }
        other => anyhow::bail!("unknown case {other}"),
    }
}

fn main() -> anyhow::Result<()> {
    tunelens::model::configure_cpu_threads();
    let mut args = std::env::args().skip(1);
    let mut folder: Option<PathBuf> = None;
    let mut child: Option<String> = None;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--folder" => folder = Some(args.next().context("--folder DIR")?.into()),
            "--measure" => child = Some(args.next().context("--measure CASE")?),
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    if let (Some(case), Some(folder)) = (&child, &folder) {
        return measure(folder, case);
    }
    let tmp = tempfile::tempdir()?;
    let folder = match folder {
        Some(f) if f.exists() => f,
        wanted => {
            let demo = load(
                &ModelSpec::parse("models/SmolLM2-135M-Instruct.Q4_1.gguf"),
                &LoadOptions {
                    device: Device::Cpu,
                    dtype: DType::BF16,
                    ..LoadOptions::default()
                },
            )?;
            let dir = wanted.unwrap_or_else(|| tmp.path().join("demo-bf16"));
            tunelens::model::save::save_hf_folder(&demo, &dir)?;
            dir
        }
    };
    let exe = std::env::current_exe()?;
    let mut cases = Vec::new();
    for case in ["read-f32", "read-bf16", "read-stored", "mmap-f32"] {
        let out = Command::new(&exe)
            .args(["--folder", &folder.display().to_string(), "--measure", case])
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "{case}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        cases.push(serde_json::from_slice::<serde_json::Value>(&out.stdout)?);
    }
    let file_mb =
        std::fs::metadata(folder.join("model.safetensors"))?.len() as f64 / f64::from(1 << 20);
    println!(
        "{}",
        json!({ "folder": folder.display().to_string(), "file_mb": file_mb, "cases": cases })
    );
    Ok(())
}
