//! Two 7B models resident together (`scripts/bench --large`): the synthetic Llama-2-7B of
//! `scripts/make-synthetic`, loaded as A and B with weights kept as stored, each case in a
//! fresh child process so its peak RSS is its own.
//!
//! Cases: `q4k-pair` (the Q4_K GGUF as A and again as B) and `bf16+q4k` (the bf16 folder as A,
//! the Q4_K GGUF as B). Two bf16 copies (2 × 13.5 GB) cannot be resident under 20 GiB, so that
//! pair is not attempted. Per case: load time and resident memory of each model, the peak RSS
//! of the process, then on A: a 128-token forward, 16 generated tokens, the attribution of a
//! 32-token prompt with an 8-token response, and one LoRA step (batch 1 × 128, r 8 on q_proj
//! and v_proj); on B the same 128-token forward, and how often A's and B's next-token argmax
//! agree. JSON to stdout, one object per case.
//!
//!   cargo run --release --example bench_large -- [--dir models/synthetic-7b] [--case NAME]

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::Context as _;
use candle_core::{Tensor, D};
use serde_json::{json, Value};
use tunelens::analysis::attribution::{attribute, AttributionConfig};
use tunelens::model::generate::{generate, GenerateConfig};
use tunelens::model::{load, LoadOptions, LoadedModel, ModelSpec, NoHook, WeightStorage};
use tunelens::train::dataset::Example;
use tunelens::train::lora_trainer::{TrainSettings, Trainer};

mod bench_util;
use bench_util::peak_rss_mb;

const TEXT: &str = "Instruction tuning changes how a language model reads a request. Researchers compare a base model with its tuned version to see which words of the prompt the answer depends on, which attention heads link instruction verbs to their objects, and which concepts the feed-forward layers encode. ";

fn rss_mb() -> anyhow::Result<f64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .context("VmRSS")?;
    Ok(line
        .split_whitespace()
        .nth(1)
        .context("value")?
        .parse::<f64>()?
        / 1024.0)
}

fn load_stored(path: &Path) -> anyhow::Result<(LoadedModel, f64)> {
    let started = Instant::now();
    let opts = LoadOptions {
        weights: WeightStorage::Stored,
        ..LoadOptions::default()
    };
    let m = load(&ModelSpec::parse(&path.display().to_string()), &opts)
        .with_context(|| format!("loading {}", path.display()))?;
    Ok((m, started.elapsed().as_secs_f64()))
}

fn pearson(a: &[f64], b: &[f64]) -> f64 {
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (ma, mb) = (mean(a), mean(b));
    let cov: f64 = a.iter().zip(b).map(|(x, y)| (x - ma) * (y - mb)).sum();
    let var = |v: &[f64], m: f64| v.iter().map(|x| (x - m) * (x - m)).sum::<f64>();
    cov / (var(a, ma) * var(b, mb)).sqrt()
}

fn timed<T>(f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<(T, f64)> {
    let started = Instant::now();
    let out = f()?;
    Ok((out, started.elapsed().as_secs_f64()))
}

fn measure(dir: &Path, case: &str) -> anyhow::Result<Value> {
    let gguf = dir.join("llama2-7b-Q4_K.gguf");
    let folder = dir.join("llama2-7b-bf16");
    let (path_a, path_b) = match case {
        "q4k-pair" => (gguf.clone(), gguf),
        "bf16+q4k" => (folder, gguf),
        other => anyhow::bail!("unknown case {other}"),
    };
    let before = rss_mb()?;
    let (a, load_a) = load_stored(&path_a)?;
    let (b, load_b) = load_stored(&path_b)?;
    let after_load = rss_mb()?;
    let peak_load = peak_rss_mb().unwrap_or(f64::NAN);

    let text = TEXT.repeat(4);
    let ids = a.tokenizer.encode(&text, true)?;
    anyhow::ensure!(ids.len() >= 136, "the text gives only {} tokens", ids.len());
    let ids128 = Tensor::new(&ids[..128], a.model.device())?.unsqueeze(0)?;
    let (logits_a, forward_a) = timed(|| Ok(a.model.forward(&ids128)?))?;
    let (logits_b, forward_b) = timed(|| Ok(b.model.forward(&ids128)?))?;
    let top_a = logits_a
        .argmax(D::Minus1)?
        .flatten_all()?
        .to_vec1::<u32>()?;
    let top_b = logits_b
        .argmax(D::Minus1)?
        .flatten_all()?
        .to_vec1::<u32>()?;
    let agree = top_a.iter().zip(&top_b).filter(|(x, y)| x == y).count();
    // Random weights give nearly flat next-token distributions, so argmax flips under Q4_K's
    // rounding; the correlation of the logits says whether A and B are the same model.
    let flat = |t: &Tensor| -> anyhow::Result<Vec<f64>> {
        Ok(t.to_dtype(candle_core::DType::F64)?
            .flatten_all()?
            .to_vec1::<f64>()?)
    };
    let correlation = pearson(&flat(&logits_a)?, &flat(&logits_b)?);
    // The same for layer 0's q_proj, whose rows GGUF stores permuted: a wrong un-permutation
    // would show here as a correlation near 0.
    let q = |m: &LoadedModel| flat(&m.model.layers[0].self_attn.q_proj.weight.dense()?);
    let q_correlation = pearson(&q(&a)?, &q(&b)?);

    let cfg = GenerateConfig {
        max_new_tokens: 16,
        ..GenerateConfig::default()
    };
    let (generated, generate_s) = timed(|| {
        Ok(generate(
            &a.model,
            &a.tokenizer,
            &ids[..16],
            &cfg,
            &mut NoHook,
            &mut |_| ControlFlow::Continue(()),
        )?)
    })?;

    let prompt = a.tokenizer.decode(&ids[1..33], false)?;
    let response = a.tokenizer.decode(&ids[33..41], false)?;
    let (attributed, attribution_s) = timed(|| {
        Ok(attribute(
            &a.model,
            &a.tokenizer,
            &prompt,
            &response,
            None,
            &AttributionConfig::default(),
            &mut |_| ControlFlow::Continue(()),
        )?)
    })?;

    let mut settings = TrainSettings {
        steps: 2,
        batch_size: 1,
        max_grad_norm: 0.0,
        eval_every: 0,
        save_every: 0,
        ..TrainSettings::default()
    };
    settings.lora.dropout = 0.0;
    let example = Example {
        line: 1,
        ids: ids[..128].to_vec(),
        is_label: vec![true; 128],
        truncated: false,
    };
    let mut trainer = Trainer::new(a.model.clone(), settings, vec![example], vec![], 0)?;
    let mut lora_steps = Vec::new();
    let mut losses = Vec::new();
    for _ in 0..2 {
        let (report, secs) = timed(|| Ok(trainer.step()?))?;
        lora_steps.push(secs);
        losses.push(report.loss);
    }
    drop(trainer);

    Ok(json!({
        "case": case,
        "a": {"path": path_a, "weights": a.info.dtype, "resident_mb": a.info.weight_bytes as f64 / 1_048_576.0, "load_s": load_a},
        "b": {"path": path_b, "weights": b.info.dtype, "resident_mb": b.info.weight_bytes as f64 / 1_048_576.0, "load_s": load_b},
        "parameters_each": a.info.parameters,
        "rss_before_mb": before,
        "rss_after_load_mb": after_load,
        "peak_rss_after_load_mb": peak_load,
        "forward_128_s": {"a": forward_a, "b": forward_b},
        "argmax_agreement_a_b": agree as f64 / top_a.len() as f64,
        "logit_correlation_a_b": correlation,
        "q_proj_0_correlation_a_b": q_correlation,
        "generate_16_s": generate_s,
        "generated_tokens": generated.new_ids.len(),
        "attribution_s": attribution_s,
        "attribution_shape": [attributed.input_ids.len(), attributed.output_ids.len()],
        "lora_step_1x128_s": lora_steps,
        "lora_losses": losses,
        "peak_rss_mb": peak_rss_mb(),
    }))
}

fn main() -> anyhow::Result<()> {
    tunelens::model::configure_cpu_threads();
    let mut args = std::env::args().skip(1);
    let mut dir = PathBuf::from("models/synthetic-7b");
    let mut child: Option<String> = None;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--dir" => dir = args.next().context("--dir DIR")?.into(),
            "--case" => child = Some(args.next().context("--case NAME")?),
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    if let Some(case) = child {
        println!("{}", measure(&dir, &case)?);
        return Ok(());
    }
    let exe = std::env::current_exe()?;
    let mut cases = Vec::new();
    for case in ["q4k-pair", "bf16+q4k"] {
        eprintln!("bench_large: {case}...");
        let out = Command::new(&exe)
            .args(["--dir", &dir.display().to_string(), "--case", case])
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "{case}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        cases.push(serde_json::from_slice::<Value>(&out.stdout)?);
    }
    println!(
        "{}",
        serde_json::to_string_pretty(&json!({
            "threads": candle_core::utils::get_num_threads(),
            "cases": cases,
        }))?
    );
    Ok(())
}
