//! Benchmark of the weight-space analyses (METHODS.md §2 and §3) on the demo model, without the
//! cache: the full FFN-concepts run and the full head-pairs run, each timed once (they take
//! seconds to a minute, so run-to-run noise is small beside them). JSON to stdout.
//!
//!   cargo run --release --example bench_weights -- [--model PATH] [--words FILE] [--reps N]

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context as _;
use serde_json::json;
use tunelens::analysis::ffn_concepts::{self, ConceptsConfig};
use tunelens::analysis::head_pairs::{self, HeadsConfig};
use tunelens::model::{load, LoadOptions, ModelSpec};
use tunelens::wordfiles::WordSource;

fn main() -> anyhow::Result<()> {
    tunelens::model::configure_cpu_threads();
    let mut args = std::env::args().skip(1);
    let mut model_path = PathBuf::from("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let mut words = WordSource::Builtin;
    let mut reps = 1usize;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--model" => model_path = args.next().context("--model PATH")?.into(),
            "--words" => words = WordSource::File(args.next().context("--words FILE")?.into()),
            "--reps" => reps = args.next().context("--reps N")?.parse()?,
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    let loaded = load(
        &ModelSpec::parse(&model_path.display().to_string()),
        &LoadOptions::default(),
    )?;
    let list = words.load()?;

    let mut concepts_s = Vec::new();
    let mut heads_s = Vec::new();
    let mut semantic_s = Vec::new();
    let mut pairs_total = 0usize;
    for _ in 0..reps.max(1) {
        let started = Instant::now();
        let concepts = ffn_concepts::ffn_concepts(
            &loaded.model,
            &loaded.tokenizer,
            &list,
            &ConceptsConfig::default(),
            &mut |_, _| ControlFlow::Continue(()),
        )?;
        concepts_s.push(started.elapsed().as_secs_f64());
        anyhow::ensure!(
            concepts.layers.len() == loaded.model.layers.len(),
            "all layers"
        );

        let cfg = HeadsConfig::default();
        let started = Instant::now();
        let space =
            head_pairs::model_semantic_space(&loaded.model, &loaded.tokenizer, &list, &cfg)?;
        semantic_s.push(started.elapsed().as_secs_f64());
        let pairs = head_pairs::head_pairs(
            &loaded.model,
            &loaded.tokenizer,
            &list,
            &space,
            &cfg,
            &mut |_, _| ControlFlow::Continue(()),
        )?;
        heads_s.push(started.elapsed().as_secs_f64());
        pairs_total = pairs
            .layers
            .iter()
            .flat_map(|l| &l.dims)
            .map(|d| d.pairs.len())
            .sum();
    }
    let min = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
    let cfg = loaded.model.config();
    let report = json!({
        "model": model_path.display().to_string(),
        "words": words.label(),
        "n_words": list.len(),
        "threads": candle_core::utils::get_num_threads(),
        "layers": cfg.num_hidden_layers,
        "concepts": {"best_s": min(&concepts_s), "all_s": concepts_s, "goal_s": 30.0,
                      "ranks": ConceptsConfig::default().max_rank, "top_k": ConceptsConfig::default().top_k},
        "heads": {"best_s": min(&heads_s), "all_s": heads_s, "goal_s": 60.0,
                   "semantic_space_s": semantic_s, "dims": cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim,
                   "pairs": pairs_total, "semantic_vectors": "model input embeddings"},
    });
    println!("{report}");
    Ok(())
}
