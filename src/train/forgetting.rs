//! The forgetting evaluation of IV-guided training (METHODS.md §5.5 code version, with the
//! knowledge and instruction probabilities of §5.4): greedy generation on evaluation sets,
//! answer post-processing, ROUGE-L F1 against the references (the maximum over references,
//! as `rouge-score`'s `rougeL`), set means, and the general / in-context / task scores of a
//! model; forgetting is the base's score minus a stage's.
//!
//! Deviation: FvForgetting calls `generate(top_p=0.9, temperature=0.1)` without `do_sample`,
//! so it depends on the checkpoint's generation config; we generate greedily (as METHODS.md
//! says to) and say so in the report.

use std::ops::ControlFlow;
use std::path::Path;

use candle_core::{Tensor, D};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::generate::{generate, GenerateConfig, Sampling};
use crate::model::hooks::NoHook;
use crate::model::tokenizer::Tokenizer;
use crate::model::transformer::{ForwardOptions, Input, LogitsAt, Transformer};
use crate::train::dataset::definition_source;

/// Which score a set counts towards.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SetKind {
    /// General ability (zero-shot prompts).
    General,
    /// In-context ability (prompts with demonstrations).
    Icl,
    /// The trained task (plasticity).
    Task,
}

impl SetKind {
    /// Name in tables.
    pub fn name(self) -> &'static str {
        match self {
            Self::General => "general",
            Self::Icl => "icl",
            Self::Task => "task",
        }
    }
}

/// How a generated answer is cleaned before scoring.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PostProcess {
    /// The text as generated.
    None,
    /// The first non-empty line, trimmed.
    FirstLine,
    /// The first option letter among these (e.g. `ABCD`), as FvForgetting does for
    /// multiple-choice sets.
    OptionLetter(String),
}

/// One evaluation item.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalItem {
    /// The prompt (raw text), or the task input when `instruction` is set.
    pub input: String,
    /// The references (at least one).
    pub outputs: Vec<String>,
    /// A task definition: the prompt becomes METHODS.md §5.1's source and `P_inst` is measured.
    pub instruction: Option<String>,
}

/// An evaluation set.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalSet {
    /// Name (the file stem unless the file names it).
    pub name: String,
    /// Which score it counts towards.
    pub kind: SetKind,
    /// Tokens generated per item.
    pub max_new_tokens: usize,
    /// Answer post-processing.
    pub post: PostProcess,
    /// The items.
    pub items: Vec<EvalItem>,
}

fn item_of(value: &serde_json::Value, index: usize) -> std::result::Result<EvalItem, String> {
    let obj = value
        .as_object()
        .ok_or_else(|| format!("item {index}: expected an object with `input` and `output`"))?;
    let input = obj
        .get("input")
        .and_then(serde_json::Value::as_str)
        .ok_or_else(|| format!("item {index}: field `input` must be a string"))?
        .to_owned();
    let outputs = match obj.get("output") {
        Some(serde_json::Value::String(s)) => vec![s.clone()],
        Some(serde_json::Value::Array(list)) => list
            .iter()
            .map(|v| v.as_str().map(str::to_owned))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| format!("item {index}: `output` must be a string or strings"))?,
        _ => return Err(format!("item {index}: field `output` is missing")),
    };
    if outputs.is_empty() || outputs.iter().all(|o| o.trim().is_empty()) {
        return Err(format!("item {index}: `output` is empty"));
    }
    let instruction = match obj.get("instruction") {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        Some(_) => return Err(format!("item {index}: `instruction` must be a string")),
    };
    Ok(EvalItem {
        input,
        outputs,
        instruction,
    })
}

/// Parses a set: a bare JSON list of `{"input", "output"}` (FvForgetting's and the
/// function-vector files' format; `kind` from a name starting with `icl`/`task`, 16 new tokens,
/// first line) or an object `{"name", "kind", "max_new_tokens", "post", "items"}`.
pub fn parse_set(stem: &str, text: &str) -> std::result::Result<EvalSet, String> {
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("not JSON ({e})"))?;
    let guess = if stem.starts_with("icl") {
        SetKind::Icl
    } else if stem.starts_with("task") {
        SetKind::Task
    } else {
        SetKind::General
    };
    let (list, name, kind, max_new, post) = match &value {
        serde_json::Value::Array(list) => {
            (list, stem.to_owned(), guess, 16, PostProcess::FirstLine)
        }
        serde_json::Value::Object(obj) => {
            let list = obj
                .get("items")
                .and_then(serde_json::Value::as_array)
                .ok_or("field `items` must be a list")?;
            let name = obj
                .get("name")
                .and_then(serde_json::Value::as_str)
                .unwrap_or(stem)
                .to_owned();
            let kind = match obj.get("kind").and_then(serde_json::Value::as_str) {
                None => guess,
                Some("general") => SetKind::General,
                Some("icl") => SetKind::Icl,
                Some("task") => SetKind::Task,
                Some(other) => return Err(format!("unknown kind `{other}` (general, icl, task)")),
            };
            let max_new = match obj.get("max_new_tokens") {
                None => 16,
                Some(v) => v
                    .as_u64()
                    .and_then(|n| usize::try_from(n).ok())
                    .filter(|n| (1..=512).contains(n))
                    .ok_or("field `max_new_tokens` must be 1..512")?,
            };
            let post = match obj.get("post").and_then(serde_json::Value::as_str) {
                None | Some("first_line") => PostProcess::FirstLine,
                Some("none") => PostProcess::None,
                Some(letters) if letters.starts_with("letters:") => {
                    PostProcess::OptionLetter(letters["letters:".len()..].to_owned())
                }
                Some(other) => {
                    return Err(format!(
                        "unknown post `{other}` (first_line, none, letters:ABCD)"
                    ))
                }
            };
            (list, name, kind, max_new, post)
        }
        _ => return Err("expected a list of items or an object with `items`".to_owned()),
    };
    let items = list
        .iter()
        .enumerate()
        .map(|(i, v)| item_of(v, i))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    if items.is_empty() {
        return Err("the set has no items".to_owned());
    }
    Ok(EvalSet {
        name,
        kind,
        max_new_tokens: max_new,
        post,
        items,
    })
}

/// Reads a set file; errors name the file and the item.
pub fn read_set(path: &Path) -> Result<EvalSet> {
    if !path.exists() {
        return Err(Error::NotFound {
            path: path.to_path_buf(),
        });
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::bad_file(path, e))?;
    let stem = path
        .file_stem()
        .map_or_else(|| "set".to_owned(), |s| s.to_string_lossy().into_owned());
    parse_set(&stem, &text).map_err(|e| Error::bad_file(path, e))
}

/// `rouge-score`'s default tokenizer: lower case, every run of characters outside `a-z0-9`
/// is a separator (no stemming, as `RougeScorer(['rougeL'])`).
pub fn rouge_tokens(text: &str) -> Vec<String> {
    text.to_lowercase()
        .split(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit()))
        .filter(|t| !t.is_empty())
        .map(str::to_owned)
        .collect()
}

fn lcs(a: &[String], b: &[String]) -> usize {
    let mut prev = vec![0usize; b.len() + 1];
    let mut cur = vec![0usize; b.len() + 1];
    for x in a {
        for (j, y) in b.iter().enumerate() {
            cur[j + 1] = if x == y {
                prev[j] + 1
            } else {
                cur[j].max(prev[j + 1])
            };
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

/// ROUGE-L F1 of a prediction against one reference (`rouge_scorer` semantics: 0 when either
/// side has no token).
#[allow(clippy::cast_precision_loss)]
pub fn rouge_l(prediction: &str, reference: &str) -> f64 {
    let p = rouge_tokens(prediction);
    let r = rouge_tokens(reference);
    if p.is_empty() || r.is_empty() {
        return 0.0;
    }
    let l = lcs(&r, &p) as f64;
    let precision = l / p.len() as f64;
    let recall = l / r.len() as f64;
    if precision + recall == 0.0 {
        0.0
    } else {
        2.0 * precision * recall / (precision + recall)
    }
}

/// The best ROUGE-L F1 over the references.
pub fn best_rouge_l(prediction: &str, references: &[String]) -> f64 {
    references
        .iter()
        .map(|r| rouge_l(prediction, r))
        .fold(0.0, f64::max)
}

/// Cleans a generated answer.
pub fn post_process(text: &str, post: &PostProcess) -> String {
    match post {
        PostProcess::None => text.trim().to_owned(),
        PostProcess::FirstLine => text
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .unwrap_or("")
            .to_owned(),
        PostProcess::OptionLetter(letters) => {
            // A standalone letter first ("B", "(B)", "B."), else the first such capital.
            let words = text.split(|c: char| !c.is_ascii_alphanumeric());
            for w in words {
                if w.len() == 1 && letters.contains(w) {
                    return w.to_owned();
                }
            }
            text.chars()
                .find(|c| letters.contains(*c))
                .map(String::from)
                .unwrap_or_default()
        }
    }
}

/// One scored item (kept for the table's examples).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ItemScore {
    /// The generated answer after post-processing.
    pub answer: String,
    /// ROUGE-L F1.
    pub rouge_l: f64,
    /// `P_know`, the length-normalised probability of the first reference given the bare input.
    pub p_know: f64,
    /// `P_inst`, given the instruction and the input (items with an instruction).
    pub p_inst: Option<f64>,
}

/// A set's scores for one model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SetScore {
    /// The set.
    pub name: String,
    /// Its kind.
    pub kind: SetKind,
    /// Mean ROUGE-L F1.
    pub score: f64,
    /// Mean `P_know`.
    pub p_know: f64,
    /// Mean `P_inst` (sets with instructions).
    pub p_inst: Option<f64>,
    /// Items scored.
    pub items: usize,
    /// Every item's score, in order.
    pub per_item: Vec<ItemScore>,
}

/// One model's (base or stage) evaluation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelScores {
    /// `base`, or the stage's name.
    pub label: String,
    /// Per set.
    pub sets: Vec<SetScore>,
    /// Mean of the general sets' scores.
    pub general: Option<f64>,
    /// Mean of the in-context sets' scores.
    pub icl: Option<f64>,
    /// Mean of the task sets' scores.
    pub task: Option<f64>,
    /// Mean `P_know` over all sets.
    pub p_know: f64,
    /// Mean `P_inst` over the sets that have it.
    pub p_inst: Option<f64>,
}

#[allow(clippy::cast_precision_loss)]
fn mean(values: impl Iterator<Item = f64>) -> Option<f64> {
    let (sum, n) = values.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    (n > 0).then(|| sum / n as f64)
}

impl ModelScores {
    /// Aggregates set scores.
    pub fn new(label: String, sets: Vec<SetScore>) -> Self {
        let by = |kind: SetKind| mean(sets.iter().filter(|s| s.kind == kind).map(|s| s.score));
        Self {
            general: by(SetKind::General),
            icl: by(SetKind::Icl),
            task: by(SetKind::Task),
            p_know: mean(sets.iter().map(|s| s.p_know)).unwrap_or(0.0),
            p_inst: mean(sets.iter().filter_map(|s| s.p_inst)),
            label,
            sets,
        }
    }

    /// `(general, icl, task)` forgetting relative to `base`: base score − this score.
    pub fn forgetting(&self, base: &Self) -> [Option<f64>; 3] {
        let diff = |b: Option<f64>, s: Option<f64>| Some(b? - s?);
        [
            diff(base.general, self.general),
            diff(base.icl, self.icl),
            diff(base.task, self.task),
        ]
    }
}

/// The whole evaluation: the base and each stage.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ForgettingReport {
    /// Base first, then each stage in order.
    pub models: Vec<ModelScores>,
    /// How answers were generated (stated in exports).
    pub decoding: String,
}

/// Length-normalised probability `exp(mean_t log p(y_t | prompt, y_<t))` of `target` after
/// `prompt`, one forward.
pub fn sequence_probability(model: &Transformer, prompt: &[u32], target: &[u32]) -> Result<f64> {
    if prompt.is_empty() || target.is_empty() {
        return Err(Error::invalid("probability", "empty prompt or target"));
    }
    let mut ids = prompt.to_vec();
    ids.extend_from_slice(&target[..target.len() - 1]);
    let input = Tensor::new(ids.as_slice(), model.device())?.unsqueeze(0)?;
    let opts = ForwardOptions {
        differentiable: false,
        logits: LogitsAt::From(prompt.len() - 1),
        use_lora: true,
    };
    let logits = model.run(Input::Ids(&input), &opts, None, &mut NoHook)?;
    let log_probs = candle_nn::ops::log_softmax(
        &logits.squeeze(0)?.to_dtype(candle_core::DType::F32)?,
        D::Minus1,
    )?;
    let targets = Tensor::new(target, model.device())?.unsqueeze(1)?;
    let picked = log_probs
        .gather(&targets, 1)?
        .to_dtype(candle_core::DType::F64)?;
    let mean_log = picked.mean_all()?.to_scalar::<f64>()?;
    Ok(mean_log.exp())
}

/// The ids of an item's generation prompt, and of its bare input (for `P_know`).
fn prompts(tokenizer: &Tokenizer, item: &EvalItem) -> Result<(Vec<u32>, Vec<u32>)> {
    let bare = tokenizer.encode(&item.input, true)?;
    let prompt = match &item.instruction {
        Some(def) => {
            let bos = tokenizer
                .bos
                .as_ref()
                .map(|(text, _)| text.clone())
                .unwrap_or_default();
            tokenizer.encode(
                &format!("{bos}{}", definition_source(def, &item.input)),
                false,
            )?
        }
        None => bare.clone(),
    };
    Ok((prompt, bare))
}

/// Scores `model` on `sets`; `on_item(done, total)` may stop the run.
pub fn evaluate(
    model: &Transformer,
    tokenizer: &Tokenizer,
    label: &str,
    sets: &[EvalSet],
    on_item: &mut dyn FnMut(usize, usize) -> ControlFlow<()>,
) -> Result<ModelScores> {
    let total: usize = sets.iter().map(|s| s.items.len()).sum();
    let mut done = 0;
    let mut out = Vec::with_capacity(sets.len());
    for set in sets {
        let mut per_item = Vec::with_capacity(set.items.len());
        for (i, item) in set.items.iter().enumerate() {
            let (prompt, bare) = prompts(tokenizer, item)?;
            let cfg = GenerateConfig {
                max_new_tokens: set.max_new_tokens,
                sampling: Sampling::Greedy,
                ..GenerateConfig::default()
            };
            let generation = generate(model, tokenizer, &prompt, &cfg, &mut NoHook, &mut |_| {
                ControlFlow::Continue(())
            })
            .map_err(|e| Error::invalid(format!("{} item {i}", set.name), e.to_string()))?;
            let answer = post_process(&generation.text, &set.post);
            // The reference as a continuation: a leading space, as FvForgetting's targets.
            let target = tokenizer.encode(&format!(" {}", item.outputs[0].trim_start()), false)?;
            let p_know = sequence_probability(model, &bare, &target)?;
            let p_inst = match item.instruction {
                Some(_) => Some(sequence_probability(model, &prompt, &target)?),
                None => None,
            };
            per_item.push(ItemScore {
                rouge_l: best_rouge_l(&answer, &item.outputs),
                answer,
                p_know,
                p_inst,
            });
            done += 1;
            if on_item(done, total).is_break() {
                return Err(Error::Cancelled);
            }
        }
        out.push(SetScore {
            name: set.name.clone(),
            kind: set.kind,
            score: mean(per_item.iter().map(|s| s.rouge_l)).unwrap_or(0.0),
            p_know: mean(per_item.iter().map(|s| s.p_know)).unwrap_or(0.0),
            p_inst: mean(per_item.iter().filter_map(|s| s.p_inst)),
            items: per_item.len(),
            per_item,
        });
    }
    Ok(ModelScores::new(label.to_owned(), out))
}

#[cfg(test)]
#[allow(clippy::float_cmp)]
mod tests {
    use super::*;

    #[test]
    fn rouge_l_follows_rouge_score() {
        // Hand values: LCS("the cat sat", "the cat is on the mat") = 2 ("the cat").
        let f = rouge_l("The cat sat.", "the cat is on the mat");
        let (p, r) = (2.0 / 3.0, 2.0 / 6.0);
        assert!((f - 2.0 * p * r / (p + r)).abs() < 1e-12);
        assert_eq!(rouge_l("", "x"), 0.0);
        assert_eq!(rouge_l("Paris!", "paris"), 1.0);
        assert_eq!(
            rouge_tokens("Don't STOP-me now 2x"),
            ["don", "t", "stop", "me", "now", "2x"]
        );
        assert_eq!(
            best_rouge_l("walked", &["walk".into(), "walked".into()]),
            1.0
        );
    }

    #[test]
    fn answers_are_post_processed() {
        assert_eq!(
            post_process("\n  walked\nQ: run", &PostProcess::FirstLine),
            "walked"
        );
        let letters = PostProcess::OptionLetter("ABCD".into());
        assert_eq!(post_process(" The answer is (C).", &letters), "C");
        assert_eq!(post_process("I think A", &letters), "A");
        assert_eq!(post_process("none", &letters), "");
    }

    #[test]
    fn sets_parse_in_both_formats_and_name_bad_items() {
        let bare = r#"[{"input": "a", "output": "b"}, {"input": "c", "output": ["d", "e"]}]"#;
        let set = parse_set("icl_antonym", bare).unwrap();
        assert_eq!(set.kind, SetKind::Icl);
        assert_eq!(set.items[1].outputs, ["d", "e"]);
        let wrapped = r#"{"name": "t", "kind": "task", "max_new_tokens": 6, "post": "letters:ABCD",
            "items": [{"input": "x", "output": "y", "instruction": "do"}]}"#;
        let set = parse_set("whatever", wrapped).unwrap();
        assert_eq!(set.post, PostProcess::OptionLetter("ABCD".into()));
        assert_eq!(set.max_new_tokens, 6);
        let err = parse_set("s", r#"[{"input": "a", "output": "b"}, {"input": 3}]"#).unwrap_err();
        assert!(err.contains("item 1"), "{err}");
        assert!(parse_set("s", "[]").unwrap_err().contains("no items"));
        assert!(parse_set("s", r#"{"items": [], "kind": "x"}"#)
            .unwrap_err()
            .contains("kind"));
    }
}
