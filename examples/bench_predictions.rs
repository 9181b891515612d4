//! Benchmark of the consistency view's prediction queries (METHODS.md §8, §8.4) on the demo
//! model, as the default GUI run asks them: every template of every shipped fact scored against
//! its relation's objects (§8), and the first 5 facts of each relation under each paraphrased
//! instruction (§8.4). Each part runs with the batched scoring and with the per-query reference
//! (one forward pair per query), and the two must give the same predictions.
//!
//! Median of `--reps` runs (no warm-up: one run is minutes long). JSON to stdout.
//!
//!   cargo run --release --example bench_predictions -- [--model PATH] [--reps N]

use std::ops::ControlFlow;
use std::path::PathBuf;

use anyhow::Context as _;
use serde_json::json;
use tunelens::analysis::prediction::{
    prediction_consistency_with, FactSet, PredictionMode, PredictionResult, Scoring,
};
use tunelens::model::{load, LoadOptions, ModelSpec};

mod bench_util;
use bench_util::median;

fn predictions(r: &PredictionResult) -> Vec<&str> {
    r.relations
        .iter()
        .flat_map(|rel| &rel.facts)
        .flat_map(|f| &f.answers)
        .map(|a| a.prediction.as_str())
        .collect()
}

fn main() -> anyhow::Result<()> {
    tunelens::model::configure_cpu_threads();
    let mut args = std::env::args().skip(1);
    let mut model_path = PathBuf::from("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let mut reps = 1usize;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--model" => model_path = args.next().context("--model PATH")?.into(),
            "--reps" => reps = args.next().context("--reps N")?.parse()?,
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    let m = load(
        &ModelSpec::parse(&model_path.display().to_string()),
        &LoadOptions::default(),
    )?;
    let facts: FactSet = serde_json::from_str(tunelens::worker::consistency::DEFAULT_FACTS)?;
    let mut subset = facts.clone();
    for r in &mut subset.relations {
        r.facts.truncate(5);
    }
    // One §8 run, then the §8.4 runs (one per instruction), with `scoring`.
    let run = |scoring: Scoring| -> anyhow::Result<(f64, f64, Vec<PredictionResult>)> {
        let go = &mut |_: f32| ControlFlow::Continue(());
        let start = std::time::Instant::now();
        let mut results = vec![prediction_consistency_with(
            &m.model,
            &m.tokenizer,
            &facts,
            PredictionMode::Candidates,
            None,
            scoring,
            go,
        )?];
        let pred_s = start.elapsed().as_secs_f64();
        let start = std::time::Instant::now();
        for ins in &facts.instructions {
            results.push(prediction_consistency_with(
                &m.model,
                &m.tokenizer,
                &subset,
                PredictionMode::Candidates,
                Some(ins),
                scoring,
                go,
            )?);
        }
        Ok((pred_s, start.elapsed().as_secs_f64(), results))
    };
    let (mut pred, mut spread, mut pred_ref, mut spread_ref) = (vec![], vec![], vec![], vec![]);
    let mut same = true;
    let mut queries = 0;
    for _ in 0..reps.max(1) {
        let (p, s, batched) = run(Scoring::Batched)?;
        let (pr, sr, reference) = run(Scoring::PerQuery)?;
        pred.push(p);
        spread.push(s);
        pred_ref.push(pr);
        spread_ref.push(sr);
        for (a, b) in batched.iter().zip(&reference) {
            same &= predictions(a) == predictions(b) && a.macro_avg == b.macro_avg;
        }
        queries = batched.iter().map(|r| predictions(r).len()).sum::<usize>();
    }
    anyhow::ensure!(same, "batched and per-query predictions differ");
    let (p, s, pr, sr) = (
        median(pred),
        median(spread),
        median(pred_ref),
        median(spread_ref),
    );
    let report = json!({
        "model": model_path.display().to_string(),
        "threads": candle_core::utils::get_num_threads(),
        "reps": reps,
        "queries": queries,
        "same_predictions": same,
        "predictions_s": { "batched": p, "per_query": pr, "speedup": pr / p },
        "instruction_spread_s": { "batched": s, "per_query": sr, "speedup": sr / s },
        "both_s": { "batched": p + s, "per_query": pr + sr, "speedup": (pr + sr) / (p + s) },
    });
    println!("{report}");
    Ok(())
}
