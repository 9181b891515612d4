//! Speed of one LoRA training step on the demo model, mirroring the Python peer's phase d
//! (`shared/bench/peers/bench_peer.py`, `phase_lora`): r = 8, alpha = 16, dropout 0, q_proj and
//! v_proj, AdamW lr 1e-4; a step is forward + causal-LM loss on every token + backward +
//! optimizer update; the batch is 4 cyclic shifts of the 128-token "long" prompt.
//! Prints one JSON object to stdout. Run through `scripts/bench`, or alone:
//! `cargo run --release --example bench_train -- [--device cuda] [--reps N]`.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context as _;
use serde_json::{json, Value};
use tunelens::model::device::{device, DeviceChoice};
use tunelens::model::{load, LoadOptions, ModelSpec};
use tunelens::train::dataset::Example;
use tunelens::train::lora_trainer::{TrainSettings, Trainer};

const WARMUP: usize = 2;
const BATCH: usize = 4;

mod bench_util;
use bench_util::{median, peak_rss_mb};

fn main() -> anyhow::Result<()> {
    tunelens::model::configure_cpu_threads();
    let mut args = std::env::args().skip(1);
    let mut model_path = PathBuf::from("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let mut prompts_path = PathBuf::from("bench/prompts.json");
    let mut reps = 5usize;
    let mut choice = DeviceChoice::Cpu;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--model" => model_path = args.next().context("--model PATH")?.into(),
            "--prompts" => prompts_path = args.next().context("--prompts FILE")?.into(),
            "--reps" => reps = args.next().context("--reps N")?.parse()?,
            "--device" => choice = args.next().context("--device cpu|cuda")?.parse()?,
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    let prompts: Value = serde_json::from_str(&std::fs::read_to_string(&prompts_path)?)?;
    let ids: Vec<u32> = serde_json::from_value(prompts["long"]["ids"].clone())?;
    let dev = device(choice)?;
    let loaded = load(
        &ModelSpec::parse(&model_path.display().to_string()),
        &LoadOptions {
            device: dev.clone(),
            ..LoadOptions::default()
        },
    )?;
    let n = ids.len();
    let examples: Vec<Example> = (0..BATCH)
        .map(|i| {
            let shift = i * n / BATCH;
            let mut rolled = ids[shift..].to_vec();
            rolled.extend_from_slice(&ids[..shift]);
            Example {
                line: i + 1,
                is_label: vec![true; rolled.len()],
                ids: rolled,
                truncated: false,
            }
        })
        .collect();
    let mut settings = TrainSettings {
        steps: WARMUP + reps,
        batch_size: BATCH,
        max_grad_norm: 0.0,
        eval_every: 0,
        save_every: 0,
        ..TrainSettings::default()
    };
    settings.lora.dropout = 0.0;
    let mut trainer = Trainer::new(loaded.model, settings, examples, vec![], 0)?;
    let trainable: usize = trainer
        .params()
        .iter()
        .map(|p| p.a.elem_count() + p.b.elem_count())
        .sum();
    let mut times = Vec::new();
    let mut losses = Vec::new();
    for i in 0..WARMUP + reps {
        let started = Instant::now();
        let report = trainer.step()?;
        // Wait for the device so GPU timings include the work.
        dev.synchronize()?;
        let secs = started.elapsed().as_secs_f64();
        losses.push(report.loss);
        if i >= WARMUP {
            times.push(secs);
        }
    }
    let med = median(times.clone());
    let report = json!({
        "tool": "tunelens",
        "device": format!("{choice:?}").to_lowercase(),
        "threads": candle_core::utils::get_num_threads(),
        "batch": [BATCH, n],
        "trainable_params": trainable,
        "warmup": WARMUP,
        "reps": reps,
        "seconds_per_step": med,
        "steps_per_s": 1.0 / med,
        "all_s": times,
        "losses": losses,
        "peak_rss_mb": peak_rss_mb(),
        "description": "LoRA r=8, alpha=16, dropout=0, q_proj+v_proj; AdamW lr=1e-4; step = forward + causal-LM loss on every token + backward + update; batch = 4 cyclic shifts of the 128-token long prompt",
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
