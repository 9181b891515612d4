//! The Gemma-3 270M base model (Q4_K_M GGUF, fetched by `scripts/fetch-models --gemma3`) against
//! transformers' own GGUF reader (`scripts/gen-gemma3-goldens`, `tests/golden/gemma3-270m.json`):
//! the tokenizer rebuilt from the file's metadata, the forward (embedding scale, `(1 + w)` norms,
//! post-norms, GeGLU, per-head q/k norms, sliding and full layers with their own RoPE bases),
//! greedy generation and the §1 attribution matrix.

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::OnceLock;

use tunelens::analysis::attribution::{attribute, AttributionConfig};
use tunelens::model::generate::{generate, GenerateConfig};
use tunelens::model::{load, LoadOptions, LoadedModel, ModelSpec, NoHook};

use crate::common::{golden, u32s};

fn gemma3_path() -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/gemma-3-270m-q4_k_m.gguf");
    assert!(
        path.exists(),
        "Gemma-3 270M missing: run scripts/fetch-models --gemma3 ({})",
        path.display()
    );
    path
}

fn gemma3() -> &'static LoadedModel {
    static MODEL: OnceLock<LoadedModel> = OnceLock::new();
    MODEL.get_or_init(|| {
        let spec = ModelSpec::parse(&gemma3_path().display().to_string());
        load(&spec, &LoadOptions::default()).expect("Gemma-3 270M loads")
    })
}

fn reference() -> &'static serde_json::Value {
    static GOLDEN: OnceLock<serde_json::Value> = OnceLock::new();
    GOLDEN.get_or_init(|| golden("gemma3-270m.json"))
}

#[test]
fn gemma3_config_from_gguf_metadata() {
    let cfg = gemma3().model.config();
    assert_eq!(cfg.architecture.name(), "gemma3");
    assert_eq!(
        (cfg.num_hidden_layers, cfg.hidden_size, cfg.head_dim),
        (18, 640, 256)
    );
    assert_eq!(cfg.sliding_window, Some(512));
    assert!(cfg.scale_embeddings);
    // Every sixth layer attends to everything and rotates with the global base.
    assert_eq!(cfg.window(5), None);
    assert_eq!(cfg.window(4), Some(512));
    assert!(cfg.local_rope(0) && !cfg.local_rope(11));
}

/// Ids identical to transformers' tokenizer built from the same metadata, with and without the
/// BOS, on texts with runs of spaces, newlines, tabs, digits, accents, CJK, emoji, markup and
/// special tokens written in the text.
#[test]
fn gemma3_tokenizer_matches_transformers() {
    let tok = &gemma3().tokenizer;
    for case in reference()["tokenize"].as_array().expect("cases") {
        let text = case["text"].as_str().expect("text");
        assert_eq!(
            tok.encode(text, true).unwrap(),
            u32s(&case["ids"]),
            "{text:?}"
        );
        assert_eq!(
            tok.encode(text, false).unwrap(),
            u32s(&case["ids_no_special"]),
            "{text:?}"
        );
    }
}

/// Top-1 identical at every position; the last position's logits, at its 64 largest ids and
/// every 1021st id, within 1e-3 (the issue asks 1e-2; measured 3.4e-5); 24 greedy tokens
/// identical.
#[test]
fn gemma3_forward_and_greedy_generation_match_transformers() {
    let m = gemma3();
    for case in reference()["forward"].as_array().expect("cases") {
        let prompt = case["prompt"].as_str().expect("prompt");
        let ids = m.tokenizer.encode(prompt, true).unwrap();
        assert_eq!(ids, u32s(&case["ids"]), "{prompt:?}");
        let logits = m
            .model
            .forward(&crate::common::ids_tensor(&ids))
            .unwrap()
            .squeeze(0)
            .unwrap();
        let top1: Vec<u32> = logits.argmax(1).unwrap().to_vec1().unwrap();
        assert_eq!(top1, u32s(&case["top1"]), "{prompt:?}");
        let last: Vec<f32> = logits.get(ids.len() - 1).unwrap().to_vec1().unwrap();
        let at = u32s(&case["last_logits_at"]);
        let theirs = case["last_logits"].as_array().expect("logits");
        let worst = at
            .iter()
            .zip(theirs)
            .map(|(&i, t)| (f64::from(last[i as usize]) - t.as_f64().unwrap()).abs())
            .fold(0.0, f64::max);
        assert!(worst < 1e-3, "{prompt:?}: last logits differ by {worst:e}");
        let cfg = GenerateConfig {
            max_new_tokens: 24,
            ..GenerateConfig::default()
        };
        let out = generate(&m.model, &m.tokenizer, &ids, &cfg, &mut NoHook, &mut |_| {
            ControlFlow::Continue(())
        })
        .unwrap();
        assert_eq!(out.new_ids, u32s(&case["greedy"]), "{prompt:?}");
    }
}

/// METHODS.md §1 on Gemma 3: the same input and output tokens, and the raw gradient x input
/// matrix within 1e-3 of its largest entry.
#[test]
fn gemma3_attribution_matches_transformers() {
    let m = gemma3();
    let case = &reference()["attribute"];
    let ours = attribute(
        &m.model,
        &m.tokenizer,
        case["prompt"].as_str().expect("prompt"),
        case["response"].as_str().expect("response"),
        None,
        &AttributionConfig::default(),
        &mut |_| ControlFlow::Continue(()),
    )
    .unwrap();
    assert_eq!(ours.input_ids, u32s(&case["input_ids"]));
    assert_eq!(ours.output_ids, u32s(&case["output_ids"]));
    let raw = case["raw"].as_array().expect("rows");
    let largest = raw
        .iter()
        .flat_map(|r| r.as_array().expect("row"))
        .fold(0f64, |a, v| a.max(v.as_f64().unwrap().abs()));
    let mut worst: f64 = 0.0;
    for (i, row) in raw.iter().enumerate() {
        for (j, v) in row.as_array().expect("row").iter().enumerate() {
            let diff = (f64::from(ours.raw.get(i, j)) - v.as_f64().unwrap()).abs();
            worst = worst.max(diff / largest);
        }
    }
    assert!(largest > 0.0);
    assert!(
        worst < 1e-3,
        "raw matrix differs by {worst:e} of its largest entry"
    );
}

/// `info`, `forward`, `generate` and `attribute` from the CLI on the GGUF.
#[test]
fn gemma3_from_the_cli() {
    let model = gemma3_path().display().to_string();
    for args in [
        vec!["info", "--model", &model],
        vec![
            "forward",
            "--model",
            &model,
            "--text",
            "The capital of France is",
        ],
        vec![
            "generate",
            "--model",
            &model,
            "--prompt",
            "The capital of France is",
            "--max-new-tokens",
            "4",
        ],
        vec![
            "attribute",
            "--model",
            &model,
            "--prompt",
            "Name a colour.",
            "--response",
            "Blue.",
        ],
    ] {
        let run = crate::common::run_cli(&args);
        assert_eq!(run.code, 0, "{args:?}: {}", run.stderr);
        assert!(!run.stdout.trim().is_empty(), "{args:?}");
    }
}

/// Gemma's vocabulary splits `" 1"` into a bare `▁` and `1`: the word grouping of the
/// attribution view joins the marker to the word after it instead of showing a word of its own.
#[test]
fn gemma3_words_join_a_bare_space_marker_to_the_next_word() {
    let tok = &gemma3().tokenizer;
    let ids = tok.encode("Tips: 1. Rest well", false).unwrap();
    assert!(
        tok.tokens(&ids).iter().any(|t| t == "\u{2581}"),
        "a bare marker in {ids:?}"
    );
    let words = tunelens::analysis::attribution::words(tok, &ids).unwrap();
    let texts: Vec<&str> = words.iter().map(|w| w.text.as_str()).collect();
    assert!(!texts.contains(&"\u{2581}"), "{texts:?}");
    assert!(texts.contains(&"1"), "{texts:?}");
}
