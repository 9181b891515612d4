//! Knowledge consistency before and after instruction fine-tuning (METHODS.md §10a; Ren et al.,
//! "Learning or Self-aligning?", code: `renmengjie7/Self-Aligning`, `eval/my_benchmark_eval.py`
//! and `eval/analyse/metric.py`): multiple-choice questions put to a base model (5-shot, no chat
//! template) and a tuned model (0-shot, its chat template or the Vicuna template); per question
//! the softmax over the choice letters' logits of each, the Pearson correlation of their dense
//! ranks (ρ), KL(p_base ‖ p_tuned) and the cosine; means per subject, per file and overall; and
//! across tuned variants the Spearman partial correlation of 100·ρ and the tuned accuracy given
//! the base accuracy (`eval/analyse/partial_correlation.py`).
//!
//! Reads question files' text (MMLU's CSV layout, JSON lines) but opens no file: the worker
//! reads them. No channels, threads, GUI code or printing.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::ops::ControlFlow;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::analysis::icl::Mt19937;
use crate::analysis::stats;
use crate::error::{Error, Result};
use crate::model::{
    ChatTemplate, ForwardOptions, Input, LoadedModel, LogitsAt, NoHook, Tokenizer, Transformer,
};

/// Ren et al.'s `vicuna_template`; `{}` is the question prompt.
pub const VICUNA_TEMPLATE: &str = "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers to the user's questions. USER: {} ASSISTANT: ";

/// The prompt the tuned model gets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum TunedTemplate {
    /// The question, 0-shot, in the tuned model's own chat template (one user turn and the
    /// generation prompt).
    #[default]
    Chat,
    /// The question, 0-shot, in the Vicuna template (the reference's `--vicuna 1`).
    Vicuna,
    /// The base model's prompt (header and shots, no template): with the same model in both
    /// slots, ρ = 1 and KL = 0 (the identity check of §10a).
    Base,
}

impl TunedTemplate {
    /// Every template, in the order the front ends list them.
    pub const ALL: [Self; 3] = [Self::Chat, Self::Vicuna, Self::Base];

    /// The name the CLI takes and the files record.
    pub fn name(self) -> &'static str {
        match self {
            Self::Chat => "chat",
            Self::Vicuna => "vicuna",
            Self::Base => "base",
        }
    }

    /// The template named `name` (`chat`, `vicuna` or `base`).
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.name() == name)
    }
}

/// Settings of §10a.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct KnowledgeConfig {
    /// Dev examples in the base model's prompt (5).
    pub shots: usize,
    /// The tuned model's prompt.
    pub tuned_template: TunedTemplate,
    /// Put the header line ("The following are multiple choice questions about …") before the
    /// tuned model's question too (the reference's `--hint 1` with 0 shots).
    pub hint: bool,
    /// Questions read at most per file (the first ones); `None` = all.
    pub max_questions: Option<usize>,
    /// Seed of the shuffle of the dev examples (42, as the reference's `random.seed(42)`).
    pub seed: u32,
    /// Choice labels; empty = `A`, `B`, `C`, … (the reference's). Other labels serve tokenizers
    /// that give the letters no tokens of their own.
    pub labels: Vec<String>,
    /// Prompts per forward pass (right-padded).
    pub batch_size: usize,
}

impl Default for KnowledgeConfig {
    fn default() -> Self {
        Self {
            shots: 5,
            tuned_template: TunedTemplate::Chat,
            hint: false,
            max_questions: None,
            seed: 42,
            labels: Vec::new(),
            batch_size: 8,
        }
    }
}

impl KnowledgeConfig {
    /// The choice labels: the configured ones, or `A` … `Z`.
    pub fn choice_labels(&self) -> Vec<String> {
        if self.labels.is_empty() {
            ('A'..='Z').map(String::from).collect()
        } else {
            self.labels.clone()
        }
    }
}

/// One multiple-choice question.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Question {
    /// Its subject (`high_school_biology`), from the record or the file name.
    pub subject: String,
    /// The question text.
    pub question: String,
    /// The choices, in label order.
    pub choices: Vec<String>,
    /// Index of the right choice.
    pub answer: usize,
    /// The file it came from (its name).
    pub file: String,
    /// Its record number in the file, from 1.
    pub record: usize,
}

/// A subject from a question file's name: the stem without a trailing `_test`, `_dev` or
/// `_val` (`high_school_biology_test.csv` → `high_school_biology`).
pub fn subject_from_file_name(name: &str) -> String {
    let stem = Path::new(name)
        .file_stem()
        .map_or_else(|| name.to_owned(), |s| s.to_string_lossy().into_owned());
    for suffix in ["_test", "_dev", "_val"] {
        if let Some(s) = stem.strip_suffix(suffix) {
            if !s.is_empty() {
                return s.to_owned();
            }
        }
    }
    stem
}

/// One CSV record: its fields and the line it starts on (from 1).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CsvRecord {
    /// The line of its first character.
    pub line: usize,
    /// The fields, unquoted.
    pub fields: Vec<String>,
}

/// Reads CSV text (RFC 4180, as Python's `csv` and pandas read it): comma-separated fields; a
/// field that starts with `"` runs to the next lone `"`, with `""` for a quote and commas and
/// line breaks kept; records end at `\n` or `\r\n`; blank lines are skipped. The error names
/// the line of a quoted field that never closes.
pub fn parse_csv(text: &str) -> std::result::Result<Vec<CsvRecord>, String> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut records = Vec::new();
    let mut fields: Vec<String> = Vec::new();
    let mut field = String::new();
    let (mut in_quotes, mut field_start, mut any_quote) = (false, true, false);
    let (mut line, mut record_line) = (1usize, 1usize);
    let mut chars = text.chars().peekable();
    let mut end_record = |fields: &mut Vec<String>, any_quote: bool, record_line: usize| {
        let blank = !any_quote && fields.len() == 1 && fields[0].is_empty();
        if !blank {
            records.push(CsvRecord {
                line: record_line,
                fields: std::mem::take(fields),
            });
        }
        fields.clear();
    };
    while let Some(c) = chars.next() {
        if in_quotes {
            if c == '"' {
                if chars.peek() == Some(&'"') {
                    chars.next();
                    field.push('"');
                } else {
                    in_quotes = false;
                }
            } else {
                if c == '\n' {
                    line += 1;
                }
                field.push(c);
            }
            continue;
        }
        match c {
            '"' if field_start => {
                in_quotes = true;
                any_quote = true;
                field_start = false;
            }
            ',' => {
                fields.push(std::mem::take(&mut field));
                field_start = true;
            }
            '\r' if chars.peek() == Some(&'\n') => {}
            '\n' => {
                fields.push(std::mem::take(&mut field));
                end_record(&mut fields, any_quote, record_line);
                line += 1;
                record_line = line;
                field_start = true;
                any_quote = false;
            }
            _ => {
                field.push(c);
                field_start = false;
            }
        }
    }
    if in_quotes {
        return Err(format!(
            "a quoted field opened in the record on line {record_line} is never closed"
        ));
    }
    if !fields.is_empty() || !field.is_empty() || any_quote {
        fields.push(field);
        end_record(&mut fields, any_quote, record_line);
    }
    Ok(records)
}

/// The index of an answer letter (`A` → 0), if it is a single letter.
fn letter_index(text: &str) -> Option<usize> {
    let mut chars = text.trim().chars();
    let c = chars.next()?.to_ascii_uppercase();
    (chars.next().is_none() && c.is_ascii_uppercase()).then(|| (c as u8 - b'A') as usize)
}

/// Questions in MMLU's CSV layout: no header; per record the question, the choices (every field
/// between the question and the last, at least 2) and the answer letter. The subject comes
/// from the file name. Errors name the file and the record.
pub fn parse_mmlu_csv(text: &str, path: &Path) -> Result<Vec<Question>> {
    let name = file_name(path);
    let subject = subject_from_file_name(&name);
    let records = parse_csv(text).map_err(|e| Error::bad_file(path, e))?;
    records
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            let at = format!("record {} (line {})", i + 1, r.line);
            let n = r.fields.len();
            if n < 4 {
                return Err(Error::bad_file(
                    path,
                    format!("{at}: {n} fields; expected a question, at least 2 choices and the answer letter"),
                ));
            }
            let choices = r.fields[1..n - 1].to_vec();
            let answer = letter_index(&r.fields[n - 1])
                .filter(|&a| a < choices.len())
                .ok_or_else(|| {
                    Error::bad_file(
                        path,
                        format!(
                            "{at}: the answer `{}` is not a letter of the {} choices",
                            r.fields[n - 1],
                            choices.len()
                        ),
                    )
                })?;
            Ok(Question {
                subject: subject.clone(),
                question: r.fields[0].clone(),
                choices,
                answer,
                file: name.clone(),
                record: i + 1,
            })
        })
        .collect()
}

/// A JSON value as choice text: a string, or a number written out.
fn choice_text(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// One JSON question object (`{"question", "choices", "answer", "subject"?}`).
fn json_question(
    v: &serde_json::Value,
    subject: &str,
    file: &str,
    record: usize,
) -> std::result::Result<Question, String> {
    let question = v
        .get("question")
        .and_then(serde_json::Value::as_str)
        .ok_or("no `question` string")?;
    let choices: Vec<String> = v
        .get("choices")
        .and_then(serde_json::Value::as_array)
        .ok_or("no `choices` list")?
        .iter()
        .map(choice_text)
        .collect::<Option<_>>()
        .ok_or("`choices` holds something other than text")?;
    if choices.len() < 2 {
        return Err(format!("{} choices; at least 2 are needed", choices.len()));
    }
    let answer = match v.get("answer") {
        Some(serde_json::Value::String(s)) => letter_index(s),
        Some(serde_json::Value::Number(n)) => n.as_u64().map(|a| a as usize),
        _ => None,
    }
    .filter(|&a| a < choices.len())
    .ok_or_else(|| {
        format!(
            "`answer` must be a letter or a 0-based index of the {} choices",
            choices.len()
        )
    })?;
    let subject = match v.get("subject") {
        Some(serde_json::Value::String(s)) if !s.trim().is_empty() => s.trim().to_owned(),
        _ => subject.to_owned(),
    };
    Ok(Question {
        subject,
        question: question.to_owned(),
        choices,
        answer,
        file: file.to_owned(),
        record,
    })
}

/// Questions as JSON lines, one `{"question", "choices": [..], "answer": "B" or 1 (0-based),
/// "subject"?}` per line (or a JSON list of them); the subject defaults to the file name's.
/// Errors name the file and the line.
pub fn parse_jsonl(text: &str, path: &Path) -> Result<Vec<Question>> {
    let name = file_name(path);
    let subject = subject_from_file_name(&name);
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    if text.trim_start().starts_with('[') {
        let items: Vec<serde_json::Value> = serde_json::from_str(text).map_err(|e| {
            Error::bad_file(
                path,
                format!("not a JSON list: {}", crate::error::json_message(&e)),
            )
        })?;
        return items
            .iter()
            .enumerate()
            .map(|(i, v)| {
                json_question(v, &subject, &name, i + 1)
                    .map_err(|e| Error::bad_file(path, format!("item {}: {e}", i + 1)))
            })
            .collect();
    }
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = format!("line {}", i + 1);
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| {
            Error::bad_file(path, format!("{at}: {}", crate::error::json_message(&e)))
        })?;
        let q = json_question(&v, &subject, &name, out.len() + 1)
            .map_err(|e| Error::bad_file(path, format!("{at}: {e}")))?;
        out.push(q);
    }
    Ok(out)
}

/// Questions from a file's text, by its extension: `.jsonl` / `.json` as JSON, anything else
/// as MMLU's CSV.
pub fn parse_questions(text: &str, path: &Path) -> Result<Vec<Question>> {
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    if ext == "jsonl" || ext == "json" {
        parse_jsonl(text, path)
    } else {
        parse_mmlu_csv(text, path)
    }
}

fn file_name(path: &Path) -> String {
    path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}

/// The reference's `format_subject`: every `_`-separated word preceded by a space, so the
/// header reads "about  high school biology" with two spaces, as the reference's does.
pub fn format_subject(subject: &str) -> String {
    subject.split('_').fold(String::new(), |mut s, w| {
        let _ = write!(s, " {w}");
        s
    })
}

/// The header line of a prompt about `subject`.
pub fn header(subject: &str) -> String {
    format!(
        "The following are multiple choice questions about {}. Please choose the correct answer. \n\n",
        format_subject(subject)
    )
}

/// The reference's `format_example`: the question, `"\n{L}. {choice}"` per choice,
/// `"\nAnswer:"`, and with the answer `"{L}. {text}\n\n"` (no space after the colon).
pub fn format_example(q: &Question, labels: &[String], include_answer: bool) -> String {
    let mut s = q.question.clone();
    for (label, choice) in labels.iter().zip(&q.choices) {
        let _ = write!(s, "\n{label}. {choice}");
    }
    s.push_str("\nAnswer:");
    if include_answer {
        if let (Some(label), Some(choice)) = (labels.get(q.answer), q.choices.get(q.answer)) {
            let _ = write!(s, "{label}. {choice}\n\n");
        }
    }
    s
}

/// The base model's prompt: the header, the shots with their answers, the question.
pub fn base_prompt(q: &Question, shots: &[&Question], labels: &[String]) -> String {
    let mut s = header(&q.subject);
    for shot in shots {
        s.push_str(&format_example(shot, labels, true));
    }
    s.push_str(&format_example(q, labels, false));
    s
}

/// The tuned model's prompt: 0-shot (the header only with `hint`), in the chosen template.
pub fn tuned_prompt(
    q: &Question,
    shots: &[&Question],
    labels: &[String],
    cfg: &KnowledgeConfig,
    chat: Option<&ChatTemplate>,
) -> Result<String> {
    let plain = if cfg.hint {
        header(&q.subject) + &format_example(q, labels, false)
    } else {
        format_example(q, labels, false)
    };
    match cfg.tuned_template {
        TunedTemplate::Base => Ok(base_prompt(q, shots, labels)),
        TunedTemplate::Vicuna => Ok(VICUNA_TEMPLATE.replacen("{}", &plain, 1)),
        TunedTemplate::Chat => {
            let Some(template) = chat else {
                return Err(Error::invalid(
                    "tuned template",
                    "the tuned model has no chat template; use the Vicuna template instead",
                ));
            };
            template.render_user(&plain)
        }
    }
}

/// The dev examples (shots) of every question, and notes on subjects with too few.
///
/// Per subject, as the reference does per subject file: the dev questions of that subject, put
/// in the order Python's `random.seed(seed); random.shuffle(indexes)` gives (tunelens
/// reproduces Python's Mersenne Twister seeding and `shuffle`, so the same dev file gives the
/// same shots), and the first `shots` of them for every question. Without dev questions of the
/// subject, the other questions of the subject serve, shuffled the same way, skipping the
/// question itself.
pub fn plan_shots<'a>(
    questions: &'a [Question],
    dev: &'a [Question],
    shots: usize,
    seed: u32,
) -> (Vec<Vec<&'a Question>>, Vec<String>) {
    let mut by_subject: BTreeMap<&str, (Vec<&Question>, Vec<usize>)> = BTreeMap::new();
    for d in dev {
        by_subject.entry(&d.subject).or_default().0.push(d);
    }
    for (i, q) in questions.iter().enumerate() {
        by_subject.entry(&q.subject).or_default().1.push(i);
    }
    let mut plan = vec![Vec::new(); questions.len()];
    let mut notes = Vec::new();
    for (subject, (dev_pool, members)) in &by_subject {
        if members.is_empty() || shots == 0 {
            continue;
        }
        if dev_pool.is_empty() {
            let order = Mt19937::python_seeded(seed).python_shuffle(members.len());
            for &qi in members {
                plan[qi] = order
                    .iter()
                    .map(|&k| members[k])
                    .filter(|&other| other != qi)
                    .take(shots)
                    .map(|other| &questions[other])
                    .collect();
            }
            if members.len() <= shots {
                notes.push(format!(
                    "{subject}: no dev examples; {} other question(s) of the subject for {shots} shots",
                    members.len() - 1
                ));
            }
        } else {
            let order = Mt19937::python_seeded(seed).python_shuffle(dev_pool.len());
            let chosen: Vec<&Question> = order.iter().take(shots).map(|&k| dev_pool[k]).collect();
            if chosen.len() < shots {
                notes.push(format!(
                    "{subject}: {} dev example(s) for {shots} shots",
                    chosen.len()
                ));
            }
            for &qi in members {
                plan[qi].clone_from(&chosen);
            }
        }
    }
    (plan, notes)
}

/// The token id of each label: the last id of the label tokenized alone, without special
/// tokens (`tokenizer(letter).input_ids[-1]` with `add_bos_token=False`). Fails when two labels
/// share an id (the tokenizer has no token of their own for them).
pub fn label_ids(tokenizer: &Tokenizer, labels: &[String]) -> Result<Vec<u32>> {
    let mut ids = Vec::with_capacity(labels.len());
    for (i, label) in labels.iter().enumerate() {
        let Some(&id) = tokenizer.encode(label, false)?.last() else {
            return Err(Error::invalid(
                "labels",
                format!("the label `{label}` has no tokens"),
            ));
        };
        if let Some(j) = ids.iter().position(|&x| x == id) {
            return Err(Error::invalid(
                "labels",
                format!(
                    "the labels `{}` and `{label}` end in the same token ({id}) for this tokenizer; choose other labels",
                    labels[j]
                ),
            ));
        }
        ids.push(id);
        debug_assert_eq!(ids.len(), i + 1);
    }
    Ok(ids)
}

/// `softmax(logits)` in f64.
pub fn softmax(logits: &[f64]) -> Vec<f64> {
    let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let exps: Vec<f64> = logits.iter().map(|l| (l - max).exp()).collect();
    let sum: f64 = exps.iter().sum();
    exps.iter().map(|e| e / sum).collect()
}

/// The reference's `replace_with_order`: dense ranks in descending order (1 = the largest,
/// equal values share a rank).
// Ties are exact equality, as the reference's `set` of the values.
#[allow(clippy::float_cmp)]
pub fn dense_ranks_desc(p: &[f64]) -> Vec<f64> {
    let mut distinct: Vec<f64> = p.to_vec();
    distinct.sort_by(|a, b| b.total_cmp(a));
    distinct.dedup();
    p.iter()
        .map(|v| {
            distinct
                .iter()
                .position(|d| d == v)
                .map_or(f64::NAN, |r| (r + 1) as f64)
        })
        .collect()
}

/// ρ of §10a: Pearson's correlation of the dense ranks of `p` and `q`, with NaN (a constant
/// rank vector) counted as 0, as the reference's `calculate_pearson_correlation`.
pub fn rank_correlation(p: &[f64], q: &[f64]) -> f64 {
    let r = stats::pearson(&dense_ranks_desc(p), &dense_ranks_desc(q));
    if r.is_nan() {
        0.0
    } else {
        r
    }
}

/// `KL(p ‖ q) = Σ p ln(p/q)` after normalising both to sum 1, as `scipy.stats.entropy(p, q)`:
/// terms with `p = 0` are 0, a `q = 0` under `p > 0` gives infinity.
pub fn kl_divergence(p: &[f64], q: &[f64]) -> f64 {
    let (sp, sq): (f64, f64) = (p.iter().sum(), q.iter().sum());
    p.iter()
        .zip(q)
        .map(|(&a, &b)| {
            let (a, b) = (a / sp, b / sq);
            if a == 0.0 {
                0.0
            } else if b == 0.0 {
                f64::INFINITY
            } else {
                a * (a / b).ln()
            }
        })
        .sum()
}

/// The cosine of the angle between `p` and `q`.
pub fn cosine(p: &[f64], q: &[f64]) -> f64 {
    let dot: f64 = p.iter().zip(q).map(|(a, b)| a * b).sum();
    let np: f64 = p.iter().map(|a| a * a).sum::<f64>().sqrt();
    let nq: f64 = q.iter().map(|a| a * a).sum::<f64>().sqrt();
    dot / (np * nq)
}

/// The first index of the largest value (`np.argmax`).
pub fn argmax(p: &[f64]) -> usize {
    let mut best = 0;
    for (i, v) in p.iter().enumerate() {
        if *v > p[best] {
            best = i;
        }
    }
    best
}

/// Per prompt, the softmax over the logits of the first `n_choices[i]` of `label_ids` at the
/// prompt's last position. Prompts run in right-padded batches of `batch_size`, shortest first
/// (a padded row's last real position sees none of its padding); `done(k)` is told how many
/// prompts have run and stops the work when it breaks.
pub fn choice_probabilities(
    model: &Transformer,
    prompts: &[Vec<u32>],
    n_choices: &[usize],
    label_ids: &[u32],
    batch_size: usize,
    pad_id: u32,
    done: &mut dyn FnMut(usize) -> ControlFlow<()>,
) -> Result<Vec<Vec<f64>>> {
    let mut order: Vec<usize> = (0..prompts.len()).collect();
    order.sort_by_key(|&i| prompts[i].len());
    let opts = ForwardOptions {
        differentiable: false,
        logits: LogitsAt::None,
        use_lora: true,
    };
    let mut out = vec![Vec::new(); prompts.len()];
    let mut finished = 0;
    for batch in order.chunks(batch_size.max(1)) {
        let width = batch.iter().map(|&i| prompts[i].len()).max().unwrap_or(1);
        let mut ids = Vec::with_capacity(batch.len() * width);
        let mut last_rows = Vec::with_capacity(batch.len());
        for (row, &i) in batch.iter().enumerate() {
            let p = &prompts[i];
            if p.is_empty() {
                return Err(Error::EmptyPrompt);
            }
            ids.extend_from_slice(p);
            ids.extend(std::iter::repeat_n(pad_id, width - p.len()));
            last_rows.push((row * width + p.len() - 1) as u32);
        }
        let input = Tensor::from_vec(ids, (batch.len(), width), model.device())?;
        let hidden = model.run(Input::Ids(&input), &opts, None, &mut NoHook)?; // (b, T, d)
        let d = hidden.dim(2)?;
        let rows = Tensor::from_vec(last_rows, batch.len(), model.device())?;
        let last = hidden
            .reshape((batch.len() * width, d))?
            .index_select(&rows, 0)?; // (b, d)
        let logits = model
            .lm_logits(&last, &opts)?
            .to_dtype(DType::F32)?
            .to_device(&Device::Cpu)?
            .to_vec2::<f32>()?; // (b, V)
        for (row, &i) in batch.iter().enumerate() {
            let picked: Vec<f64> = label_ids[..n_choices[i]]
                .iter()
                .map(|&id| f64::from(logits[row][id as usize]))
                .collect();
            out[i] = softmax(&picked);
        }
        finished += batch.len();
        if done(finished).is_break() {
            return Err(Error::Cancelled);
        }
    }
    Ok(out)
}

/// One question's result.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct QuestionResult {
    /// Its subject.
    pub subject: String,
    /// Its file.
    pub file: String,
    /// Its record number in the file.
    pub record: usize,
    /// The question text.
    pub question: String,
    /// Index of the right choice.
    pub answer: usize,
    /// The base model's probabilities of the choices.
    pub base: Vec<f64>,
    /// The tuned model's.
    pub tuned: Vec<f64>,
    /// The base model's prediction (argmax).
    pub base_prediction: usize,
    /// The tuned model's prediction.
    pub tuned_prediction: usize,
    /// ρ: Pearson's correlation of the two dense rank vectors (NaN → 0).
    pub rho: f64,
    /// KL(p_base ‖ p_tuned).
    pub kl: f64,
    /// Cosine of the two probability vectors.
    pub cosine: f64,
}

/// Means over a group of questions (a subject, a file, or all).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GroupSummary {
    /// The subject or file name; `all` for every question.
    pub name: String,
    /// Questions in the group.
    pub questions: usize,
    /// Mean ρ.
    pub rho: f64,
    /// Mean KL(p_base ‖ p_tuned).
    pub kl: f64,
    /// Mean cosine.
    pub cosine: f64,
    /// Fraction the base model answers right.
    pub base_accuracy: f64,
    /// Fraction the tuned model answers right.
    pub tuned_accuracy: f64,
}

impl GroupSummary {
    /// The means over `results`.
    pub fn of<'a>(name: &str, results: impl IntoIterator<Item = &'a QuestionResult>) -> Self {
        let (mut n, mut rho, mut kl, mut cos, mut base, mut tuned) = (0usize, 0.0, 0.0, 0.0, 0, 0);
        for r in results {
            n += 1;
            rho += r.rho;
            kl += r.kl;
            cos += r.cosine;
            base += usize::from(r.base_prediction == r.answer);
            tuned += usize::from(r.tuned_prediction == r.answer);
        }
        let mean = |s: f64| if n == 0 { f64::NAN } else { s / n as f64 };
        Self {
            name: name.to_owned(),
            questions: n,
            rho: mean(rho),
            kl: mean(kl),
            cosine: mean(cos),
            base_accuracy: mean(base as f64),
            tuned_accuracy: mean(tuned as f64),
        }
    }
}

/// §10a for one base and one tuned model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KnowledgeRun {
    /// The base model's display name.
    pub base_model: String,
    /// The tuned model's display name.
    pub tuned_model: String,
    /// Settings.
    pub config: KnowledgeConfig,
    /// The question files, in the order read.
    pub files: Vec<String>,
    /// Per question, in file order.
    pub questions: Vec<QuestionResult>,
    /// Per subject, sorted by name.
    pub subjects: Vec<GroupSummary>,
    /// Per file, in the order read.
    pub per_file: Vec<GroupSummary>,
    /// Over every question.
    pub overall: GroupSummary,
    /// The first question's base prompt, as fed (to check the format).
    pub example_base_prompt: String,
    /// The first question's tuned prompt, as fed.
    pub example_tuned_prompt: String,
    /// What the run could not do as asked (too few dev examples, say).
    pub notes: Vec<String>,
}

/// The Spearman partial correlation across tuned variants of one base (§10a): X = 100 · mean ρ,
/// Y = the tuned accuracy, Z = the base accuracy, one value per run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PartialCorrelation {
    /// Runs (tuned variants) entered.
    pub runs: usize,
    /// 100 · mean ρ per run.
    pub x: Vec<f64>,
    /// Tuned accuracy per run.
    pub y: Vec<f64>,
    /// Base accuracy per run.
    pub z: Vec<f64>,
    /// The partial correlation, when defined.
    pub rho: Option<f64>,
    /// Its two-sided p-value (scipy's `spearmanr` on the residuals).
    pub p_value: Option<f64>,
    /// Why it is not defined, when it is not.
    pub note: Option<String>,
}

/// The partial correlation of X and Y given Z across `runs`; `None` values with a reason when
/// there are fewer than 3 runs or the residuals are constant.
pub fn partial_correlation(runs: &[KnowledgeRun]) -> PartialCorrelation {
    let x: Vec<f64> = runs.iter().map(|r| 100.0 * r.overall.rho).collect();
    let y: Vec<f64> = runs.iter().map(|r| r.overall.tuned_accuracy).collect();
    let z: Vec<f64> = runs.iter().map(|r| r.overall.base_accuracy).collect();
    let (rho, p_value, note) = if runs.len() < 3 {
        (
            None,
            None,
            Some(format!(
                "needs at least 3 tuned variants of one base, has {}",
                runs.len()
            )),
        )
    } else {
        match stats::spearman_partial(&x, &y, &z) {
            Some((r, p)) => (Some(r), Some(p), None),
            None => (
                None,
                None,
                Some("undefined: a residual vector is constant".to_owned()),
            ),
        }
    };
    PartialCorrelation {
        runs: runs.len(),
        x,
        y,
        z,
        rho,
        p_value,
        note,
    }
}

/// §10a: every question put to `base` (5-shot) and `tuned` (0-shot in its template), in
/// right-padded batches; `progress(frac, message)` breaks to cancel.
pub fn knowledge_consistency(
    base: &LoadedModel,
    tuned: &LoadedModel,
    questions: &[Question],
    dev: &[Question],
    cfg: &KnowledgeConfig,
    progress: &mut dyn FnMut(f32, String) -> ControlFlow<()>,
) -> Result<KnowledgeRun> {
    knowledge_consistency_with(base, tuned, questions, dev, cfg, None, progress)
}

/// [`knowledge_consistency`] reusing the base model's answer probabilities of an earlier run
/// (`base_probs`, one vector per question, as [`QuestionResult::base`] holds them) when they
/// fit the questions: the base's answers do not depend on the tuned model, so a run of several
/// fine-tunes against one base asks the base once.
pub fn knowledge_consistency_with(
    base: &LoadedModel,
    tuned: &LoadedModel,
    questions: &[Question],
    dev: &[Question],
    cfg: &KnowledgeConfig,
    base_probs: Option<Vec<Vec<f64>>>,
    progress: &mut dyn FnMut(f32, String) -> ControlFlow<()>,
) -> Result<KnowledgeRun> {
    if questions.is_empty() {
        return Err(Error::invalid("questions", "no questions to ask"));
    }
    let labels = cfg.choice_labels();
    let most = questions.iter().map(|q| q.choices.len()).max().unwrap_or(0);
    if let Some(q) = questions.iter().find(|q| q.choices.len() > labels.len()) {
        return Err(Error::invalid(
            "labels",
            format!(
                "{} record {} has {} choices but there are {} labels",
                q.file,
                q.record,
                q.choices.len(),
                labels.len()
            ),
        ));
    }
    let labels = &labels[..most];
    let (shots, notes) = plan_shots(questions, dev, cfg.shots, cfg.seed);
    let mut base_text = Vec::with_capacity(questions.len());
    let mut tuned_text = Vec::with_capacity(questions.len());
    for (q, s) in questions.iter().zip(&shots) {
        base_text.push(base_prompt(q, s, labels));
        tuned_text.push(tuned_prompt(
            q,
            s,
            labels,
            cfg,
            tuned.chat_template.as_ref(),
        )?);
    }
    let n_choices: Vec<usize> = questions.iter().map(|q| q.choices.len()).collect();
    let n = questions.len();
    let mut probs = Vec::with_capacity(2);
    let cached =
        base_probs.filter(|p| p.len() == n && p.iter().zip(&n_choices).all(|(v, &c)| v.len() == c));
    let reuse = cached.is_some();
    probs.extend(cached);
    for (k, (loaded, texts, name)) in [(base, &base_text, "base"), (tuned, &tuned_text, "tuned")]
        .into_iter()
        .enumerate()
    {
        if k == 0 && reuse {
            continue;
        }
        let ids = label_ids(&loaded.tokenizer, labels)?;
        let prompts: Vec<Vec<u32>> = texts
            .iter()
            .map(|t| loaded.tokenizer.encode(t, false))
            .collect::<Result<_>>()?;
        let pad = loaded.tokenizer.eos.as_ref().map_or(0, |(_, id)| *id);
        probs.push(choice_probabilities(
            &loaded.model,
            &prompts,
            &n_choices,
            &ids,
            cfg.batch_size,
            pad,
            &mut |finished| {
                progress(
                    f32::midpoint(k as f32, finished as f32 / n as f32),
                    format!("{name} model: {finished} of {n} questions"),
                )
            },
        )?);
    }
    let tuned_probs = probs.pop().unwrap_or_default();
    let base_probs = probs.pop().unwrap_or_default();
    let results: Vec<QuestionResult> = questions
        .iter()
        .zip(base_probs.into_iter().zip(tuned_probs))
        .map(|(q, (b, t))| QuestionResult {
            subject: q.subject.clone(),
            file: q.file.clone(),
            record: q.record,
            question: q.question.clone(),
            answer: q.answer,
            base_prediction: argmax(&b),
            tuned_prediction: argmax(&t),
            rho: rank_correlation(&b, &t),
            kl: kl_divergence(&b, &t),
            cosine: cosine(&b, &t),
            base: b,
            tuned: t,
        })
        .collect();
    let mut subjects: BTreeMap<&str, Vec<&QuestionResult>> = BTreeMap::new();
    let mut files: Vec<String> = Vec::new();
    for r in &results {
        subjects.entry(&r.subject).or_default().push(r);
        if !files.contains(&r.file) {
            files.push(r.file.clone());
        }
    }
    let per_file = files
        .iter()
        .map(|f| GroupSummary::of(f, results.iter().filter(|r| &r.file == f)))
        .collect();
    Ok(KnowledgeRun {
        base_model: base.info.display_name(),
        tuned_model: tuned.info.display_name(),
        config: cfg.clone(),
        subjects: subjects
            .iter()
            .map(|(s, rs)| GroupSummary::of(s, rs.iter().copied()))
            .collect(),
        per_file,
        overall: GroupSummary::of("all", &results),
        files,
        example_base_prompt: base_text.first().cloned().unwrap_or_default(),
        example_tuned_prompt: tuned_text.first().cloned().unwrap_or_default(),
        questions: results,
        notes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tiny::{tiny_model, tiny_options};

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol
    }

    #[test]
    #[allow(clippy::float_cmp)]
    fn the_methods_example_gives_its_rho_and_kl() {
        let p_base = [0.1, 0.6, 0.2, 0.1];
        let p_tuned = [0.2, 0.5, 0.25, 0.05];
        assert_eq!(dense_ranks_desc(&p_base), vec![3.0, 1.0, 2.0, 3.0]);
        assert_eq!(dense_ranks_desc(&p_tuned), vec![3.0, 1.0, 2.0, 4.0]);
        assert!(close(rank_correlation(&p_base, &p_tuned), 0.9439, 5e-5));
        assert!(close(kl_divergence(&p_base, &p_tuned), 0.06476, 5e-6));
        assert!(close(kl_divergence(&p_base, &p_base), 0.0, 1e-15));
        assert!(close(cosine(&p_base, &p_base), 1.0, 1e-12));
        // A constant rank vector: NaN counts as 0.
        assert_eq!(rank_correlation(&[0.25; 4], &p_tuned), 0.0);
        assert_eq!(argmax(&[0.2, 0.4, 0.4]), 1);
    }

    #[test]
    fn python_seeded_shuffle_matches_random_shuffle() {
        // Python 3.11: random.seed(42); idx = list(range(n)); random.shuffle(idx).
        let cases: [(usize, &[usize]); 3] = [
            (5, &[3, 1, 2, 4, 0]),
            (10, &[7, 3, 2, 8, 5, 6, 9, 4, 0, 1]),
            (
                20,
                &[
                    19, 5, 14, 4, 9, 13, 15, 18, 6, 12, 17, 10, 1, 11, 2, 16, 7, 8, 0, 3,
                ],
            ),
        ];
        for (n, expected) in cases {
            assert_eq!(Mt19937::python_seeded(42).python_shuffle(n), expected);
        }
    }

    #[test]
    fn csv_reader_handles_quotes_commas_newlines_and_blank_lines() {
        let text =
            "\u{feff}plain,\"with, comma\",\"say \"\"hi\"\"\",\"two\nlines\"\r\n\n\"\",x\nlast,row";
        let records = parse_csv(text).unwrap();
        assert_eq!(records.len(), 3);
        assert_eq!(
            records[0].fields,
            vec!["plain", "with, comma", "say \"hi\"", "two\nlines"]
        );
        assert_eq!(records[0].line, 1);
        assert_eq!(records[1].fields, vec!["", "x"]);
        assert_eq!(records[1].line, 4);
        assert_eq!(records[2].fields, vec!["last", "row"]);
        let err = parse_csv("a,b\n\"open,c\n").unwrap_err();
        assert!(err.contains("line 2"), "{err}");
    }

    #[test]
    fn mmlu_csv_and_jsonl_questions_and_their_errors() {
        let path = Path::new("data/high_school_biology_test.csv");
        let qs = parse_mmlu_csv("What is 1+1?,1,2,3,4,B\n\"Pick, one\",yes,no,a\n", path).unwrap();
        assert_eq!(qs.len(), 2);
        assert_eq!(qs[0].subject, "high_school_biology");
        assert_eq!(qs[0].choices, vec!["1", "2", "3", "4"]);
        assert_eq!(qs[0].answer, 1);
        assert_eq!(qs[1].question, "Pick, one");
        assert_eq!(qs[1].choices.len(), 2);
        assert_eq!(qs[1].answer, 0);
        let err = parse_mmlu_csv("q,a,b,C\nq,a,B\n", path)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("record 1 (line 1)") && err.contains("high_school_biology_test.csv"),
            "{err}"
        );
        let err = parse_mmlu_csv("q,a,b,B\nq,a\n", path)
            .unwrap_err()
            .to_string();
        assert!(err.contains("record 2 (line 2)"), "{err}");
        assert_eq!(subject_from_file_name("anatomy_dev.csv"), "anatomy");
        assert_eq!(subject_from_file_name("anatomy_val.csv"), "anatomy");
        assert_eq!(subject_from_file_name("law.jsonl"), "law");

        let jpath = Path::new("sets/history.jsonl");
        let qs = parse_jsonl(
            "{\"question\": \"q1\", \"choices\": [\"a\", \"b\", \"c\"], \"answer\": \"C\"}\n\n{\"question\": \"q2\", \"choices\": [\"a\", 2], \"answer\": 1, \"subject\": \"math\"}\n",
            jpath,
        )
        .unwrap();
        assert_eq!((qs[0].subject.as_str(), qs[0].answer), ("history", 2));
        assert_eq!(
            (qs[1].subject.as_str(), qs[1].answer, qs[1].record),
            ("math", 1, 2)
        );
        assert_eq!(qs[1].choices, vec!["a", "2"]);
        let err = parse_jsonl(
            "{\"question\": \"q\", \"choices\": [\"a\", \"b\"], \"answer\": 2}\n",
            jpath,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("line 1") && err.contains("history.jsonl"),
            "{err}"
        );
        let err = parse_jsonl("\n{oops\n", jpath).unwrap_err().to_string();
        assert!(err.contains("line 2"), "{err}");
    }

    fn question(subject: &str, text: &str, record: usize) -> Question {
        Question {
            subject: subject.to_owned(),
            question: text.to_owned(),
            choices: vec!["red".into(), "blue".into(), "green".into()],
            answer: 1,
            file: format!("{subject}_test.csv"),
            record,
        }
    }

    #[test]
    fn prompts_follow_the_reference_format() {
        let labels = KnowledgeConfig::default().choice_labels();
        let q = question("world_history", "Which colour?", 1);
        let dev = question("world_history", "Sky?", 1);
        let base = base_prompt(&q, &[&dev], &labels[..3]);
        assert_eq!(
            base,
            "The following are multiple choice questions about  world history. Please choose the correct answer. \n\n\
             Sky?\nA. red\nB. blue\nC. green\nAnswer:B. blue\n\n\
             Which colour?\nA. red\nB. blue\nC. green\nAnswer:"
        );
        let cfg = KnowledgeConfig {
            tuned_template: TunedTemplate::Vicuna,
            ..KnowledgeConfig::default()
        };
        let tuned = tuned_prompt(&q, &[&dev], &labels[..3], &cfg, None).unwrap();
        assert_eq!(
            tuned,
            "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers to the user's questions. USER: Which colour?\nA. red\nB. blue\nC. green\nAnswer: ASSISTANT: "
        );
        let hint = KnowledgeConfig { hint: true, ..cfg };
        assert!(tuned_prompt(&q, &[], &labels[..3], &hint, None)
            .unwrap()
            .contains("USER: The following are multiple choice questions about  world history."));
        let chat = KnowledgeConfig::default();
        assert!(tuned_prompt(&q, &[], &labels[..3], &chat, None).is_err());
    }

    #[test]
    fn shots_come_from_dev_or_from_the_other_questions() {
        let questions: Vec<Question> = (1..=4)
            .map(|i| question("s", &format!("q{i}"), i))
            .collect();
        let (plan, notes) = plan_shots(&questions, &[], 5, 42);
        for (i, shots) in plan.iter().enumerate() {
            assert_eq!(shots.len(), 3);
            assert!(shots.iter().all(|s| s.record != i + 1));
        }
        assert_eq!(notes.len(), 1);
        let dev: Vec<Question> = (1..=5)
            .map(|i| question("s", &format!("d{i}"), i))
            .collect();
        let (plan, notes) = plan_shots(&questions, &dev, 2, 42);
        assert!(notes.is_empty());
        // Python: random.seed(42); shuffle(range(5)) = [3, 1, 2, 4, 0]: d4, d2 first.
        for shots in &plan {
            let texts: Vec<&str> = shots.iter().map(|s| s.question.as_str()).collect();
            assert_eq!(texts, vec!["d4", "d2"]);
        }
    }

    #[test]
    #[allow(clippy::float_cmp)]
    fn identical_models_give_rho_1_and_kl_0_and_batches_agree() -> Result<()> {
        let m = tiny_model(5, &tiny_options(DType::F32))?;
        // The tiny word-level vocabulary has no letters: label with words.
        let cfg = KnowledgeConfig {
            tuned_template: TunedTemplate::Base,
            labels: ["red", "blue", "green"].map(String::from).to_vec(),
            // The tiny model's context is 64 tokens: one shot.
            shots: 1,
            batch_size: 3,
            ..KnowledgeConfig::default()
        };
        let questions: Vec<Question> = [
            "the cat sat on the",
            "what is the capital of france",
            "the sea is",
            "a big dog",
        ]
        .iter()
        .enumerate()
        .map(|(i, t)| question("s", t, i + 1))
        .collect();
        let run = knowledge_consistency(&m, &m, &questions, &[], &cfg, &mut |_, _| {
            ControlFlow::Continue(())
        })?;
        assert_eq!(run.questions.len(), 4);
        for r in &run.questions {
            assert!((r.base.iter().sum::<f64>() - 1.0).abs() < 1e-9);
            assert_eq!(r.base, r.tuned);
            assert!(close(r.rho, 1.0, 1e-12), "{r:?}");
            assert!(close(r.kl, 0.0, 1e-12));
        }
        assert!(close(run.overall.rho, 1.0, 1e-12));
        assert_eq!(run.overall.base_accuracy, run.overall.tuned_accuracy);
        assert_eq!(run.subjects.len(), 1);
        // One prompt per pass gives the same probabilities as the padded batches.
        let one = knowledge_consistency(
            &m,
            &m,
            &questions,
            &[],
            &KnowledgeConfig {
                batch_size: 1,
                ..cfg.clone()
            },
            &mut |_, _| ControlFlow::Continue(()),
        )?;
        for (a, b) in one.questions.iter().zip(&run.questions) {
            for (x, y) in a.base.iter().zip(&b.base) {
                assert!(close(*x, *y, 1e-5), "{x} vs {y}");
            }
        }
        // Another model differs; the letters of the tiny vocabulary are one unknown token.
        let other = tiny_model(6, &tiny_options(DType::F32))?;
        let run = knowledge_consistency(&m, &other, &questions, &[], &cfg, &mut |_, _| {
            ControlFlow::Continue(())
        })?;
        assert!(run.overall.kl > 0.0);
        let letters = KnowledgeConfig {
            labels: Vec::new(),
            ..cfg
        };
        let err = knowledge_consistency(&m, &m, &questions, &[], &letters, &mut |_, _| {
            ControlFlow::Continue(())
        })
        .unwrap_err();
        assert!(err.to_string().contains("same token"), "{err}");
        Ok(())
    }

    #[test]
    fn partial_correlation_needs_three_runs() {
        let run = |rho: f64, base: f64, tuned: f64| KnowledgeRun {
            base_model: "b".into(),
            tuned_model: "t".into(),
            config: KnowledgeConfig::default(),
            files: Vec::new(),
            questions: Vec::new(),
            subjects: Vec::new(),
            per_file: Vec::new(),
            overall: GroupSummary {
                name: "all".into(),
                questions: 1,
                rho,
                kl: 0.0,
                cosine: 1.0,
                base_accuracy: base,
                tuned_accuracy: tuned,
            },
            example_base_prompt: String::new(),
            example_tuned_prompt: String::new(),
            notes: Vec::new(),
        };
        let two = partial_correlation(&[run(0.9, 0.3, 0.5), run(0.8, 0.3, 0.6)]);
        assert!(two.rho.is_none() && two.note.is_some());
        // The §10a procedure on X = [90, 80, 85, 70], Y = [.5, .6, .4, .45],
        // Z = [.3, .2, .25, .22]: scipy gives 0.6, p = 0.4 (see stats::tests).
        let three = partial_correlation(&[
            run(0.90, 0.3, 0.5),
            run(0.80, 0.2, 0.6),
            run(0.85, 0.25, 0.4),
            run(0.70, 0.22, 0.45),
        ]);
        assert!(close(three.rho.unwrap_or(f64::NAN), 0.6, 1e-9));
        assert!(close(three.p_value.unwrap_or(f64::NAN), 0.4, 1e-7));
        assert_eq!(three.x.len(), 4);
    }
}
