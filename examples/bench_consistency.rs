//! Benchmark of the consistency measures' forward passes (METHODS.md §7) on the demo model:
//!
//! - the Python peer's phase e like for like: the last-token hidden state of every layer for its
//!   100 fixed sentences (10 subjects × 10 predicates), one sentence per forward, and batched;
//! - the 200-pair paraphrase histogram run (first 200 pairs of the shipped set, mean pooling,
//!   batched).
//!
//! Median of `--reps` runs after one warm-up. JSON to stdout.
//!
//!   cargo run --release --example bench_consistency -- [--model PATH] [--reps N]

use std::ops::ControlFlow;
use std::path::PathBuf;

use anyhow::Context as _;
use serde_json::json;
use tunelens::analysis::consistency::{self, Pooling};
use tunelens::model::{load, LoadOptions, ModelSpec};

/// The peer's sentences (shared/bench/peers/bench_peer.py, `SENTENCES`).
fn peer_sentences() -> Vec<String> {
    let subjects = [
        "The old fisherman",
        "A small child",
        "My neighbour",
        "The tired teacher",
        "A young doctor",
        "The quiet librarian",
        "Our new manager",
        "The village baker",
        "A curious student",
        "The famous painter",
    ];
    let predicates = [
        "walked slowly along the beach.",
        "read a book in the garden.",
        "cooked dinner for the whole family.",
        "opened the window in the morning.",
        "wrote a letter to an old friend.",
        "planted tomatoes behind the house.",
        "fixed the broken bicycle.",
        "watched the rain from the porch.",
        "sang a song at the summer festival.",
        "painted the fence bright blue.",
    ];
    subjects
        .iter()
        .flat_map(|s| predicates.iter().map(move |p| format!("{s} {p}")))
        .collect()
}

mod bench_util;
use bench_util::median;

/// One warm-up run, then `reps` timed runs.
fn timed(reps: usize, f: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<Vec<f64>> {
    bench_util::timed(1, reps.max(1), f)
}

fn main() -> anyhow::Result<()> {
    tunelens::model::configure_cpu_threads();
    let mut args = std::env::args().skip(1);
    let mut model_path = PathBuf::from("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let mut reps = 5usize;
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
    let go = |_: f32| ControlFlow::Continue(());
    let sentences = peer_sentences();
    let run = |batch: usize| {
        timed(reps, || {
            consistency::representations(
                &m.model,
                &m.tokenizer,
                &sentences,
                Pooling::Last,
                batch,
                &mut go.clone(),
            )?;
            Ok(())
        })
    };
    let one = run(1)?;
    let batched = run(16)?;

    let pairs = consistency::parse_pairs(tunelens::worker::consistency::DEFAULT_PAIRS)
        .map_err(|(line, msg)| anyhow::anyhow!("shipped pairs line {line}: {msg}"))?;
    let pairs: Vec<_> = pairs.into_iter().take(200).collect();
    let (unique, _) = consistency::unique_sentences(&pairs);
    let mut result = None;
    let hist = timed(reps, || {
        result = Some(consistency::representation_consistency(
            &m.model,
            &m.tokenizer,
            &pairs,
            Pooling::Mean,
            16,
            &mut go.clone(),
        )?);
        Ok(())
    })?;
    let result = result.context("ran")?;
    let last = result.layers.last().context("layers")?;
    let report = json!({
        "model": model_path.display().to_string(),
        "threads": candle_core::utils::get_num_threads(),
        "peer_sentences": {
            "sentences": sentences.len(),
            "batch1_median_s": median(one.clone()), "batch1_all_s": one,
            "batch16_median_s": median(batched.clone()), "batch16_all_s": batched,
            "what": "last-token state of every layer output (30 layers; the peer also keeps the embeddings)",
        },
        "histogram_200_pairs": {
            "pairs": pairs.len(), "sentences": unique.len(), "counts": result.counts,
            "median_s": median(hist.clone()), "all_s": hist,
            "last_layer_rd": last.rd, "last_layer_mean_para": last.mean_para, "last_layer_mean_non": last.mean_non,
        },
    });
    println!("{report}");
    Ok(())
}
