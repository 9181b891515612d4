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
use tunelens::model::transformer::Transformer;
use tunelens::model::{load, LoadOptions, ModelSpec};
use tunelens::train::dataset::Example;
use tunelens::train::guidance::Guidance;
use tunelens::train::lora_trainer::{TrainSettings, Trainer};
use tunelens::train::settings::GuidanceSettings;

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
    let mut guided = false;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--guided" => guided = true,
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
    if guided {
        return guided_ratio(&loaded.model, settings, &examples, reps, &dev, choice);
    }
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

/// Seconds per step of each trainer (median, and every timed step), the trainers taking one
/// step each in turn after the warm-up, so that a machine whose speed drifts during the run
/// slows all of them alike.
fn time_interleaved(
    trainers: &mut [&mut Trainer],
    reps: usize,
    dev: &candle_core::Device,
) -> anyhow::Result<Vec<(f64, Vec<f64>)>> {
    let mut times = vec![Vec::new(); trainers.len()];
    for i in 0..WARMUP + reps {
        for (trainer, times) in trainers.iter_mut().zip(&mut times) {
            let started = Instant::now();
            trainer.step()?;
            dev.synchronize()?;
            if i >= WARMUP {
                times.push(started.elapsed().as_secs_f64());
            }
        }
    }
    Ok(times.into_iter().map(|t| (median(t.clone()), t)).collect())
}

/// `--guided`: an IV-guided step (METHODS.md §5.2, the code version's settings, a seeded vector
/// of norm 5 at layer 9 and ten heads) against a plain step on the same batch, whose loss
/// covers the second half of each sequence (so `t_b` is position 63).
fn guided_ratio(
    model: &Transformer,
    settings: TrainSettings,
    examples: &[Example],
    reps: usize,
    dev: &candle_core::Device,
    choice: DeviceChoice,
) -> anyhow::Result<()> {
    let examples: Vec<Example> = examples
        .iter()
        .map(|e| Example {
            is_label: (0..e.ids.len()).map(|t| t >= e.ids.len() / 2).collect(),
            ..e.clone()
        })
        .collect();
    let cfg = model.config().clone();
    let seq_len = examples.first().map_or(0, |e| e.ids.len());
    let mut plain = Trainer::new(model.clone(), settings.clone(), examples.clone(), vec![], 0)?;
    let d = cfg.hidden_size;
    #[allow(clippy::cast_precision_loss)]
    let raw: Vec<f32> = (0..d)
        .map(|i| ((i * 37 + 11) % 101) as f32 / 50.0 - 1.0)
        .collect();
    let norm = raw.iter().map(|v| v * v).sum::<f32>().sqrt();
    let vector: Vec<f32> = raw.iter().map(|v| v * 5.0 / norm).collect();
    let heads: Vec<(usize, usize)> = (0..10)
        .map(|i| {
            (
                cfg.num_hidden_layers / 2 + i % 5,
                (i * 7) % cfg.num_attention_heads,
            )
        })
        .collect();
    let g = GuidanceSettings::code(PathBuf::from("synthetic"));
    // First epoch: every reference pass runs (the cache is off).
    let guidance = Guidance::new(g.clone(), &vector, heads.clone(), model)?;
    guidance.set_cache_budget(0);
    let mut first = Trainer::new(model.clone(), settings.clone(), examples.clone(), vec![], 0)?;
    first.set_guidance(guidance);
    // Later epochs: each example's reference comes from the cache.
    let mut later = Trainer::new(model.clone(), settings.clone(), examples.clone(), vec![], 0)?;
    later.set_guidance(Guidance::new(g.clone(), &vector, heads.clone(), model)?);
    // First epoch with the thresholds at 0, so that every term has a gradient (with the code
    // version's thresholds the KL and head terms of a fresh adapter are below them, and only
    // the label rows and t_b have a gradient at the logits).
    let on = GuidanceSettings {
        kl_threshold: 0.0,
        mse_threshold: 0.0,
        ..g
    };
    let all_on = Guidance::new(on, &vector, heads, model)?;
    all_on.set_cache_budget(0);
    let mut terms_on = Trainer::new(model.clone(), settings, examples, vec![], 0)?;
    terms_on.set_guidance(all_on);
    let timed = time_interleaved(
        &mut [&mut plain, &mut first, &mut later, &mut terms_on],
        reps,
        dev,
    )?;
    let [(plain_s, plain_all), (guided_s, guided_all), (cached_s, cached_all), (on_s, on_all)] =
        <[(f64, Vec<f64>); 4]>::try_from(timed)
            .map_err(|_| anyhow::anyhow!("four trainers were timed"))?;
    let report = json!({
        "tool": "tunelens",
        "device": format!("{choice:?}").to_lowercase(),
        "threads": candle_core::utils::get_num_threads(),
        "batch": [BATCH, seq_len],
        "reps": reps,
        "plain_seconds_per_step": plain_s,
        "guided_seconds_per_step": guided_s,
        "ratio": guided_s / plain_s,
        "guided_cached_seconds_per_step": cached_s,
        "ratio_cached": cached_s / plain_s,
        "guided_terms_on_seconds_per_step": on_s,
        "ratio_terms_on": on_s / plain_s,
        "guided_terms_on_all_s": on_all,
        "plain_all_s": plain_all,
        "guided_all_s": guided_all,
        "guided_cached_all_s": cached_all,
        "description": "the four trainers take one step each in turn; IV-guided step (code version: reference pass with the IV at layer 9, head-reference pass, ce + kl1 + kl2 + pr, thresholds 0.1/0.01) vs a plain LoRA step on the same batch; labels on the second half of each 128-token sequence. ratio: every reference pass runs (an example's first epoch); ratio_cached: the reference passes come from the per-run cache (later epochs); ratio_terms_on: first epoch with both thresholds at 0, so every term has a gradient at every row",
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
