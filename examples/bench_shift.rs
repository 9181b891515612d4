//! Benchmark of the token distribution shift (METHODS.md §6) on the demo model, beside
//! AlignTDS's per-token loop:
//!
//! - teacher-forced: what [`shift_response`] costs for the responses of
//!   `bench/shift_prompts.json` (one forward per model per response, §6.5, the top 30 of every
//!   position, the metrics), the demo model on both sides: the aligned context is the
//!   chat-template prompt, the base context the URIAL template of the prompt;
//! - per-token loop: [`response_tops_loop`] over the same contexts and responses, one full
//!   forward per response token without a KV cache, as AlignTDS's `logit_analysis.py` runs it
//!   (the figure of our own implementation of the loop; `bench/shift_torch.py` times the loop in
//!   PyTorch on the ids this writes).
//!
//! Median of `--reps` runs after one warm-up (default 5). The loop runs for minutes (1662
//! forwards of 20-160 tokens, about 4 minutes on 2 cores): `--loop-reps` runs (default 1)
//! after a warm-up on the first response, kept whatever else ran, with the cores other
//! processes used during each. JSON to stdout (phases on stderr); `--ids-out FILE` writes every
//! response's context and response ids with our teacher-forced top 30 (ids and logits) per
//! position, which `bench/shift_torch.py` reads so that both sides run on identical token ids
//! and compares its loop's lists against.
//!
//!   cargo run --release --example bench_shift -- [--model PATH] [--prompts FILE] [--reps N]
//!       [--loop-reps N] [--ids-out FILE]

use std::path::PathBuf;

use anyhow::Context as _;
use serde_json::json;
use tunelens::analysis::shift::{
    response_tops_loop, shift_response, ResponseShift, ShiftConfig, ShiftSide, TopEntry, K_SAVE,
    URIAL_TEMPLATE,
};
use tunelens::model::{load, LoadOptions, ModelSpec};
use tunelens::worker::runner::render_prompt;

mod bench_util;
use bench_util::median;

/// One benchmark item: the prompt's two contexts and the response text.
struct Item {
    prompt: String,
    response: String,
    /// The chat-template rendering of the prompt (the aligned model's context).
    aligned_context: Vec<u32>,
    /// The URIAL template of the prompt, with special tokens (the base model's context).
    base_context: Vec<u32>,
}

/// FNV-1a (64 bit) over every id list, each as its length then its ids (u32, little endian);
/// `bench/shift_torch.py` computes the same over the lists it reads.
fn ids_hash<'a>(lists: impl IntoIterator<Item = &'a [u32]>) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |v: u32| {
        for b in v.to_le_bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    };
    for list in lists {
        eat(list.len() as u32);
        for &v in list {
            eat(v);
        }
    }
    format!("{h:016x}")
}

/// The id lists of a run in the order [`ids_hash`] reads them.
fn run_lists(shifts: &[ResponseShift]) -> impl Iterator<Item = &[u32]> {
    shifts.iter().flat_map(|s| {
        [
            s.aligned_context.as_slice(),
            s.aligned_ids.as_slice(),
            s.base_context.as_slice(),
            s.base_ids.as_slice(),
        ]
    })
}

/// Largest |difference| of the top-1 logits and the fraction of positions whose top-`K_SAVE` id
/// lists are equal, between two runs over the same positions.
fn compare_tops(a: &[Vec<TopEntry>], b: &[Vec<TopEntry>]) -> (f64, usize, usize) {
    let mut max_diff = 0f64;
    let mut equal = 0;
    for (x, y) in a.iter().zip(b) {
        max_diff = max_diff.max(f64::from((x[0].logit - y[0].logit).abs()));
        if x.iter().map(|e| e.id).eq(y.iter().map(|e| e.id)) {
            equal += 1;
        }
    }
    (max_diff, equal, a.len().min(b.len()))
}

fn main() -> anyhow::Result<()> {
    tunelens::model::configure_cpu_threads();
    let mut args = std::env::args().skip(1);
    let mut model_path = PathBuf::from("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let mut prompts_path = PathBuf::from("bench/shift_prompts.json");
    let mut reps = 5usize;
    let mut loop_reps = None;
    let mut ids_out = None;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--model" => model_path = args.next().context("--model PATH")?.into(),
            "--prompts" => prompts_path = args.next().context("--prompts FILE")?.into(),
            "--reps" => reps = args.next().context("--reps N")?.parse()?,
            "--loop-reps" => loop_reps = Some(args.next().context("--loop-reps N")?.parse()?),
            "--ids-out" => ids_out = Some(PathBuf::from(args.next().context("--ids-out FILE")?)),
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    let reps = reps.max(1);
    let loop_reps: usize = loop_reps.unwrap_or(1).max(1);
    let started = std::time::Instant::now();
    let say = |what: &str| eprintln!("  [{:6.1} s] {what}", started.elapsed().as_secs_f64());
    let loaded = load(
        &ModelSpec::parse(&model_path.display().to_string()),
        &LoadOptions::default(),
    )?;
    let (model, tokenizer) = (&loaded.model, &loaded.tokenizer);

    let doc: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&prompts_path)
            .with_context(|| format!("reading {}", prompts_path.display()))?,
    )?;
    let mut items = Vec::new();
    for entry in doc["items"]
        .as_array()
        .context("`items` in the prompts file")?
    {
        let prompt = entry["prompt"]
            .as_str()
            .context("item `prompt`")?
            .to_owned();
        let response = entry["response"]
            .as_str()
            .context("item `response`")?
            .to_owned();
        let (_, aligned_context) = render_prompt(&loaded, &prompt, true)?;
        let base_context = tokenizer.encode(&URIAL_TEMPLATE.replace("{input}", &prompt), true)?;
        items.push(Item {
            prompt,
            response,
            aligned_context,
            base_context,
        });
    }
    anyhow::ensure!(!items.is_empty(), "no items in {}", prompts_path.display());

    // (a) What the shift analysis costs: shift_response, the demo model as aligned and base.
    let cfg = ShiftConfig {
        k: 10,
        keep: K_SAVE,
    };
    let tf_run = || -> anyhow::Result<Vec<ResponseShift>> {
        items
            .iter()
            .map(|it| {
                let side = |context| ShiftSide {
                    model,
                    tokenizer,
                    context,
                };
                Ok(shift_response(
                    side(&it.aligned_context),
                    side(&it.base_context),
                    &it.response,
                    &cfg,
                )?)
            })
            .collect()
    };
    say("teacher-forced passes (shift_response)...");
    let mut shifts = Vec::new();
    let tf = bench_util::timed(1, reps, || {
        shifts = tf_run()?;
        Ok(())
    })?;

    // (b) AlignTDS's loop, both sides, on the ids the teacher-forced pass used.
    let loop_run = |s: &ResponseShift| -> anyhow::Result<[Vec<Vec<TopEntry>>; 2]> {
        Ok([
            response_tops_loop(model, tokenizer, &s.aligned_context, &s.aligned_ids, K_SAVE)?,
            response_tops_loop(model, tokenizer, &s.base_context, &s.base_ids, K_SAVE)?,
        ])
    };
    say("per-token loop (response_tops_loop), minutes...");
    // A run takes minutes: the warm-up is the first response's aligned side, and the runs are
    // kept whatever else ran (the contention is reported beside them).
    response_tops_loop(
        model,
        tokenizer,
        &shifts[0].aligned_context,
        &shifts[0].aligned_ids,
        K_SAVE,
    )?;
    let mut loops = Vec::new();
    let (lp, lp_other) = bench_util::timed_once_each(loop_reps, || {
        loops = shifts.iter().map(loop_run).collect::<anyhow::Result<_>>()?;
        Ok(())
    })?;

    say("done");
    // Our loop against our teacher-forced pass (the tests check this too).
    let (mut max_diff, mut equal, mut positions) = (0f64, 0, 0);
    for (s, [a, b]) in shifts.iter().zip(&loops) {
        for (tf_tops, loop_tops) in [(&s.aligned_top, a), (&s.base_top, b)] {
            let (d, e, n) = compare_tops(tf_tops, loop_tops);
            max_diff = max_diff.max(d);
            equal += e;
            positions += n;
        }
    }

    let hash = ids_hash(run_lists(&shifts));
    let response_tokens: Vec<usize> = shifts.iter().map(|s| s.aligned_ids.len()).collect();
    let base_tokens: Vec<usize> = shifts.iter().map(|s| s.base_ids.len()).collect();
    let total_positions: usize = response_tokens.iter().chain(&base_tokens).sum();
    if let Some(path) = &ids_out {
        let tops = |tops: &[Vec<TopEntry>]| {
            let ids: Vec<Vec<u32>> = tops
                .iter()
                .map(|l| l.iter().map(|e| e.id).collect())
                .collect();
            let logits: Vec<Vec<f32>> = tops
                .iter()
                .map(|l| l.iter().map(|e| e.logit).collect())
                .collect();
            (ids, logits)
        };
        let out: Vec<_> = items
            .iter()
            .zip(&shifts)
            .map(|(it, s)| {
                let (a_ids, a_logits) = tops(&s.aligned_top);
                let (b_ids, b_logits) = tops(&s.base_top);
                json!({
                    "prompt": it.prompt,
                    "aligned_context": s.aligned_context, "aligned_ids": s.aligned_ids,
                    "base_context": s.base_context, "base_ids": s.base_ids,
                    "aligned_top_ids": a_ids, "aligned_top_logits": a_logits,
                    "base_top_ids": b_ids, "base_top_logits": b_logits,
                })
            })
            .collect();
        let file = json!({
            "what": "token-shift benchmark ids (examples/bench_shift.rs): per response the two contexts, the response ids of each side, and tunelens's teacher-forced top 30 (ids, logits) per position",
            "model": model_path.display().to_string(),
            "k_save": K_SAVE,
            "ids_fnv1a64": hash,
            "items": out,
        });
        std::fs::write(path, file.to_string())
            .with_context(|| format!("writing {}", path.display()))?;
    }

    let report = json!({
        "model": model_path.display().to_string(),
        "threads": candle_core::utils::get_num_threads(),
        "responses": shifts.len(),
        "response_tokens": response_tokens,
        "base_response_tokens": base_tokens,
        "aligned_context_tokens": shifts.iter().map(|s| s.aligned_context.len()).collect::<Vec<_>>(),
        "base_context_tokens": shifts.iter().map(|s| s.base_context.len()).collect::<Vec<_>>(),
        "positions": total_positions,
        "ids_fnv1a64": hash,
        "teacher_forced": {
            "median_s": median(tf.clone()), "all_s": tf, "reps": reps,
            "what": "shift_response per response (aligned and base teacher-forced passes, top 30 per position, metrics), the demo model on both sides",
        },
        "token_loop": {
            "median_s": median(lp.clone()), "all_s": lp, "reps": loop_reps,
            "other_processes_cores": lp_other,
            "what": "response_tops_loop on both sides: one full forward per response token, no KV cache (AlignTDS)",
        },
        "loop_over_teacher_forced": median(lp) / median(tf),
        "loop_vs_teacher_forced": {
            "positions": positions,
            "top30_ids_equal_fraction": equal as f64 / positions.max(1) as f64,
            "max_abs_top1_logit_diff": max_diff,
        },
    });
    println!("{report}");
    Ok(())
}
