//! Shared helpers: the tiny model, temp folders, the demo model path, the CLI binary.

use std::path::PathBuf;
use std::process::Command;

use candle_core::{DType, Tensor};
use tunelens::model::load::LoadedModel;
use tunelens::model::tiny;

/// The tiny seeded model (f32 unless asked).
pub fn tiny(seed: u64) -> LoadedModel {
    tiny::tiny_model(seed, &tiny::tiny_options(DType::F32)).expect("tiny model builds")
}

/// The tiny model in f64, for finite-difference checks.
pub fn tiny_f64(seed: u64) -> LoadedModel {
    tiny::tiny_model(seed, &tiny::tiny_options(DType::F64)).expect("tiny model builds")
}

/// `(1, T)` id tensor.
pub fn ids_tensor(ids: &[u32]) -> Tensor {
    Tensor::new(ids, &candle_core::Device::Cpu)
        .and_then(|t| t.unsqueeze(0))
        .expect("id tensor")
}

/// Largest absolute difference of two tensors of the same shape.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    let diff = (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap()).unwrap();
    diff.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// The demo model; tests that need it fail with instructions when it is absent.
pub fn demo_model_path() -> PathBuf {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        path.exists(),
        "demo model missing: run scripts/fetch-models ({})",
        path.display()
    );
    path
}

/// A golden JSON file from `tests/golden/`.
pub fn golden(name: &str) -> serde_json::Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    let text = std::fs::read_to_string(&path).expect("golden file readable");
    serde_json::from_str(&text).expect("golden file is JSON")
}

/// The `tunelens` binary.
pub fn tunelens() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tunelens"));
    cmd.env("RUST_LOG", "warn");
    cmd
}

/// Output of a CLI run.
pub struct CliRun {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Runs the CLI with `args`.
pub fn run_cli(args: &[&str]) -> CliRun {
    let out = tunelens().args(args).output().expect("tunelens runs");
    CliRun {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Asserts a CLI run failed with exactly one line naming `needle`.
pub fn assert_one_line_error(run: &CliRun, needle: &str) {
    assert_ne!(run.code, 0, "expected failure, stdout: {}", run.stdout);
    assert_eq!(run.code, 2, "stderr: {}", run.stderr);
    let lines: Vec<&str> = run
        .stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert_eq!(lines.len(), 1, "expected one line, got: {:?}", run.stderr);
    assert!(lines[0].starts_with("error: "), "{}", lines[0]);
    assert!(
        lines[0].contains(needle),
        "`{}` does not name `{needle}`",
        lines[0]
    );
    assert!(!run.stderr.contains("panicked"), "{}", run.stderr);
}

/// A `word<TAB>freq` list of tiny-vocabulary words written into `dir` (for the weight views).
pub fn tiny_words(dir: &std::path::Path) -> std::path::PathBuf {
    let words = [
        "the",
        "cat",
        "dog",
        "sat",
        "mat",
        "write",
        "poem",
        "sea",
        "summarize",
        "text",
        "translate",
        "french",
        "list",
        "three",
        "study",
        "warm",
        "cold",
        "red",
        "blue",
        "green",
        "big",
        "small",
        "answer",
        "question",
        "paris",
        "france",
        "capital",
        "city",
        "river",
        "tree",
        "house",
        "run",
        "jump",
        "read",
        "book",
    ];
    let mut text = String::new();
    for (i, w) in words.iter().enumerate() {
        text.push_str(w);
        text.push('\t');
        text.push_str(&(100 - i).to_string());
        text.push('\n');
    }
    let path = dir.join("words.tsv");
    std::fs::write(&path, text).expect("word list");
    path
}

/// A JSON array of token ids.
pub fn u32s(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}
