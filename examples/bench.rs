//! Speed benchmark of the model core on the demo model, mirroring the Python peer's methodology
//! (`shared/bench/peers/bench_peer.py`): the same prompt ids, warm-up runs, then the median of
//! timed repetitions. Prints one JSON object to stdout. Run through `scripts/bench`.
//!
//! Figures: load time; (a) forward latency with logits at every position for 16/64/128-token
//! prompts; (b) greedy generation of 32 tokens with EOS suppressed, prefill and decode separately;
//! peak RSS.

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context as _;
use candle_core::Tensor;
use serde_json::{json, Value};
use tunelens::analysis::attribution::{attribute, AttributionConfig};
use tunelens::model::generate::{generate, GenerateConfig};
use tunelens::model::{load, LoadOptions, ModelSpec, NoHook};

const FORWARD_WARMUP: usize = 3;
const GENERATE_WARMUP: usize = 2;
const NEW_TOKENS: usize = 32;

mod bench_util;
use bench_util::{median, peak_rss_mb, timed};

fn main() -> anyhow::Result<()> {
    tunelens::model::configure_cpu_threads();
    let mut args = std::env::args().skip(1);
    let mut model_path = PathBuf::from("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let mut prompts_path = PathBuf::from("bench/prompts.json");
    let mut reps = 5usize;
    let mut attribution_only = false;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--model" => model_path = args.next().context("--model PATH")?.into(),
            "--prompts" => prompts_path = args.next().context("--prompts FILE")?.into(),
            "--reps" => reps = args.next().context("--reps N")?.parse()?,
            // Only the attribution phase (for quick checks while tuning it).
            "--attribution-only" => attribution_only = true,
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    let prompts: Value = serde_json::from_str(&std::fs::read_to_string(&prompts_path)?)?;
    let threads = candle_core::utils::get_num_threads();

    let started = Instant::now();
    let loaded = load(
        &ModelSpec::parse(&model_path.display().to_string()),
        &LoadOptions::default(),
    )?;
    let load_secs = started.elapsed().as_secs_f64();
    let model = &loaded.model;

    let mut forward = serde_json::Map::new();
    let mut generation = serde_json::Map::new();
    let phases: &[&str] = if attribution_only {
        &[]
    } else {
        &["short", "medium", "long"]
    };
    for &name in phases {
        let ids: Vec<u32> = serde_json::from_value(prompts[name]["ids"].clone())?;
        let input = Tensor::new(ids.as_slice(), model.device())?.unsqueeze(0)?;
        let times = timed(FORWARD_WARMUP, reps, || {
            model.forward(&input)?;
            Ok(())
        })?;
        let med = median(times.clone());
        forward.insert(
            name.to_owned(),
            json!({"tokens": ids.len(), "median_s": med, "median_ms": med * 1e3, "all_s": times,
                   "tokens_per_s": ids.len() as f64 / med}),
        );

        let cfg = GenerateConfig {
            max_new_tokens: NEW_TOKENS,
            min_new_tokens: NEW_TOKENS,
            ..GenerateConfig::default()
        };
        let run = || {
            generate(
                model,
                &loaded.tokenizer,
                &ids,
                &cfg,
                &mut NoHook,
                &mut |_| ControlFlow::Continue(()),
            )
        };
        for _ in 0..GENERATE_WARMUP {
            run()?;
        }
        let (mut totals, mut prefills, mut decodes) = (Vec::new(), Vec::new(), Vec::new());
        let mut last = None;
        for _ in 0..reps {
            let started = Instant::now();
            let g = run()?;
            totals.push(started.elapsed().as_secs_f64());
            prefills.push(g.prefill_secs);
            decodes.push(g.decode_secs);
            last = Some(g);
        }
        let last = last.context("at least one repetition")?;
        let new_tokens = last.new_ids.len();
        let med = median(totals.clone());
        let decode_med = median(decodes);
        generation.insert(
            name.to_owned(),
            json!({"prompt_tokens": ids.len(), "new_tokens": new_tokens, "median_s": med, "all_s": totals,
                   "tokens_per_s": new_tokens as f64 / med,
                   "prefill_median_s": median(prefills), "decode_median_s": decode_med,
                   "decode_tokens_per_s": (new_tokens - 1) as f64 / decode_med,
                   "text": last.text}),
        );
    }
    // (c) attribution: the 64-token prompt and the peer's 16-token response; one forward and one
    // backward per response token (METHODS.md §1), as the peer's fastest PyTorch variant.
    let medium: String = serde_json::from_value(prompts["medium"]["text"].clone())?;
    let response: String = serde_json::from_value(prompts["attribution_response"]["text"].clone())?;
    let attribution_cfg = AttributionConfig::default();
    let run_attribution = || -> anyhow::Result<(usize, usize)> {
        let a = attribute(
            model,
            &loaded.tokenizer,
            &medium,
            &response,
            None,
            &attribution_cfg,
            &mut |_| ControlFlow::Continue(()),
        )?;
        Ok((a.input_ids.len(), a.output_ids.len()))
    };
    run_attribution()?;
    let mut attribution_times = Vec::new();
    let mut shape = (0, 0);
    for _ in 0..reps.min(3) {
        let started = Instant::now();
        shape = run_attribution()?;
        attribution_times.push(started.elapsed().as_secs_f64());
    }
    let attribution = json!({"prompt_tokens": shape.0, "response_tokens": shape.1,
                             "median_s": median(attribution_times.clone()), "all_s": attribution_times});

    let report = json!({
        "tool": "tunelens",
        "version": env!("CARGO_PKG_VERSION"),
        "threads": threads,
        "candle_barrier_pool_spin_limit": std::env::var("CANDLE_BARRIER_POOL_SPIN_LIMIT").ok(),
        "reps": reps,
        "model_file": model_path.display().to_string(),
        "load_s": load_secs,
        "a_forward_latency": forward,
        "b_generation": generation,
        "c_attribution": attribution,
        "peak_rss_mb": peak_rss_mb(),
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
