//! Instruction data for LoRA fine-tuning: JSONL in the common formats, rendered with the model's
//! chat template or the "Definition/Input/Output" template of METHODS.md §5.1, tokenised with
//! labels on the response tokens only.
//!
//! Formats, detected per line:
//! - Alpaca: `{"instruction", "input"?, "output"}`;
//! - chat: `{"messages": [{"role", "content"}, ...]}` (every assistant turn is a response);
//! - prompt/completion: `{"prompt", "completion"}`.
//!
//! Malformed lines are reported with their line numbers and skipped; loading fails only when
//! nothing usable is left.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::chat::{ChatMessage, ChatTemplate};
pub use crate::model::lora::SplitMix64;
use crate::model::tokenizer::Tokenizer;

/// One training example as read from the file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Record {
    /// Alpaca: an instruction, an optional input and the expected output.
    Alpaca {
        /// The task description.
        instruction: String,
        /// The task input (may be empty).
        input: String,
        /// The response.
        output: String,
    },
    /// A conversation; every assistant turn is trained on.
    Chat {
        /// The turns.
        messages: Vec<ChatMessage>,
    },
    /// Plain text prompt and completion.
    Completion {
        /// The prompt.
        prompt: String,
        /// The completion.
        completion: String,
    },
}

impl Record {
    /// The format's name.
    pub fn format(&self) -> &'static str {
        match self {
            Self::Alpaca { .. } => "alpaca",
            Self::Chat { .. } => "chat",
            Self::Completion { .. } => "prompt/completion",
        }
    }
}

/// A line that could not be used, with the reason.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LineIssue {
    /// 1-based line number in the file.
    pub line: usize,
    /// What is wrong, in one line.
    pub reason: String,
}

impl fmt::Display for LineIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.reason)
    }
}

/// The records of a file plus the lines that were skipped.
#[derive(Clone, Debug, Default)]
pub struct Parsed {
    /// Usable records with their line numbers.
    pub records: Vec<(usize, Record)>,
    /// Skipped lines.
    pub issues: Vec<LineIssue>,
}

fn string_field(
    obj: &serde_json::Map<String, serde_json::Value>,
    key: &str,
) -> std::result::Result<Option<String>, String> {
    match obj.get(key) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(format!("field `{key}` must be a string")),
    }
}

fn parse_record(line: &str) -> std::result::Result<Record, String> {
    let value: serde_json::Value =
        serde_json::from_str(line).map_err(|err| format!("not JSON ({err})"))?;
    let serde_json::Value::Object(obj) = value else {
        return Err("expected a JSON object".to_owned());
    };
    if let Some(messages) = obj.get("messages") {
        let serde_json::Value::Array(items) = messages else {
            return Err("field `messages` must be an array".to_owned());
        };
        let mut out = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let role = item.get("role").and_then(serde_json::Value::as_str);
            let content = item.get("content").and_then(serde_json::Value::as_str);
            let (Some(role), Some(content)) = (role, content) else {
                return Err(format!(
                    "messages[{i}] needs string fields `role` and `content`"
                ));
            };
            if !matches!(role, "system" | "user" | "assistant") {
                return Err(format!("messages[{i}]: unknown role `{role}`"));
            }
            out.push(ChatMessage {
                role: role.to_owned(),
                content: content.to_owned(),
            });
        }
        if !out.iter().any(|m| m.role == "assistant") {
            return Err("`messages` has no assistant turn to train on".to_owned());
        }
        return Ok(Record::Chat { messages: out });
    }
    if obj.contains_key("instruction") {
        let instruction = string_field(&obj, "instruction")?.unwrap_or_default();
        let input = string_field(&obj, "input")?.unwrap_or_default();
        let Some(output) = string_field(&obj, "output")? else {
            return Err("Alpaca line without field `output`".to_owned());
        };
        if instruction.trim().is_empty() {
            return Err("field `instruction` is empty".to_owned());
        }
        if output.trim().is_empty() {
            return Err("field `output` is empty".to_owned());
        }
        return Ok(Record::Alpaca {
            instruction,
            input,
            output,
        });
    }
    if obj.contains_key("prompt") || obj.contains_key("completion") {
        let prompt = string_field(&obj, "prompt")?.unwrap_or_default();
        let Some(completion) = string_field(&obj, "completion")? else {
            return Err("line without field `completion`".to_owned());
        };
        if completion.trim().is_empty() {
            return Err("field `completion` is empty".to_owned());
        }
        return Ok(Record::Completion { prompt, completion });
    }
    Err(
        "unknown format: expected `instruction`/`output`, `messages`, or `prompt`/`completion`"
            .to_owned(),
    )
}

/// Parses JSONL text; blank lines are ignored.
pub fn parse_jsonl(text: &str) -> Parsed {
    let mut parsed = Parsed::default();
    for (idx, line) in text.lines().enumerate() {
        let line_no = idx + 1;
        let trimmed = line.trim();
        if trimmed.is_empty() {
            continue;
        }
        match parse_record(trimmed) {
            Ok(record) => parsed.records.push((line_no, record)),
            Err(reason) => parsed.issues.push(LineIssue {
                line: line_no,
                reason,
            }),
        }
    }
    parsed
}

/// Reads a JSONL file. Fails when the file cannot be read or holds no usable line.
pub fn read_jsonl(path: &Path) -> Result<Parsed> {
    if !path.exists() {
        return Err(Error::NotFound {
            path: path.to_path_buf(),
        });
    }
    let text = std::fs::read_to_string(path)
        .map_err(|err| Error::bad_file(path, format!("cannot read the dataset ({err})")))?;
    let parsed = parse_jsonl(&text);
    if parsed.records.is_empty() {
        let why = parsed
            .issues
            .first()
            .map_or_else(|| "the file is empty".to_owned(), ToString::to_string);
        return Err(Error::bad_file(
            path,
            format!("no usable training example ({why})"),
        ));
    }
    Ok(parsed)
}

/// How records become text.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum PromptTemplate {
    /// The model's own chat template (a user turn, then the assistant's reply).
    #[default]
    Chat,
    /// METHODS.md §5.1: `BOS Definition: … Now complete the following example - Input: … Output:`
    /// followed by the response and EOS. Chat records are rejected with this template.
    Definition,
}

impl PromptTemplate {
    /// Name for settings files and the CLI.
    pub fn name(self) -> &'static str {
        match self {
            Self::Chat => "chat",
            Self::Definition => "definition",
        }
    }

    /// Parses [`PromptTemplate::name`].
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "chat" => Some(Self::Chat),
            "definition" => Some(Self::Definition),
            _ => None,
        }
    }
}

/// Adds a final "." unless the text already ends in punctuation (§5.1).
fn with_period(text: &str) -> String {
    let trimmed = text.trim_end();
    match trimmed.chars().last() {
        Some(c) if c.is_ascii_punctuation() => trimmed.to_owned(),
        Some(_) => format!("{trimmed}."),
        None => String::new(),
    }
}

/// One tokenised example: `ids` with a per-token flag saying whether it is trained on (the
/// label of position `t` is `ids[t]`, predicted from positions `< t`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Example {
    /// Line in the source file.
    pub line: usize,
    /// Token ids.
    pub ids: Vec<u32>,
    /// `true` where the token is part of a response.
    pub is_label: Vec<bool>,
    /// Whether the example was cut at the maximum length.
    pub truncated: bool,
}

impl Example {
    /// Number of tokens trained on.
    pub fn label_count(&self) -> usize {
        // The first token is never predicted.
        self.is_label.iter().skip(1).filter(|&&l| l).count()
    }
}

/// Everything needed to render and tokenise records.
pub struct Renderer<'a> {
    /// The model's tokenizer.
    pub tokenizer: &'a Tokenizer,
    /// The model's chat template (needed for [`PromptTemplate::Chat`]).
    pub chat_template: Option<&'a ChatTemplate>,
    /// Which template.
    pub template: PromptTemplate,
    /// Longest example in tokens; longer ones are cut at the end.
    pub max_len: usize,
}

/// Text pieces; `true` marks response text.
type Pieces = Vec<(String, bool)>;

/// The source text of METHODS.md §5.1 without the BOS: `Definition: … Now complete the
/// following example -\nInput: …\nOutput:` (a final period added where punctuation is missing).
pub fn definition_source(definition: &str, input: &str) -> String {
    format!(
        "Definition: {}\n\nNow complete the following example -\nInput: {}\nOutput:",
        with_period(definition),
        with_period(input)
    )
}

impl Renderer<'_> {
    /// Renders a record as text pieces, response pieces marked.
    pub fn pieces(&self, record: &Record) -> std::result::Result<Pieces, String> {
        match self.template {
            PromptTemplate::Chat => self.chat_pieces(record),
            PromptTemplate::Definition => self.definition_pieces(record),
        }
    }

    fn chat_pieces(&self, record: &Record) -> std::result::Result<Pieces, String> {
        let Some(template) = self.chat_template else {
            return Err(
                "the model has no chat template; use the \"definition\" template".to_owned(),
            );
        };
        let messages = match record {
            Record::Alpaca {
                instruction,
                input,
                output,
            } => {
                let user = if input.trim().is_empty() {
                    instruction.clone()
                } else {
                    format!("{instruction}\n\n{input}")
                };
                vec![
                    ChatMessage::user(user),
                    ChatMessage {
                        role: "assistant".to_owned(),
                        content: output.clone(),
                    },
                ]
            }
            Record::Completion { prompt, completion } => vec![
                ChatMessage::user(prompt.clone()),
                ChatMessage {
                    role: "assistant".to_owned(),
                    content: completion.clone(),
                },
            ],
            Record::Chat { messages } => messages.clone(),
        };
        // Each assistant turn spans from the end of the conversation rendered up to it with the
        // generation prompt, to the end of the conversation rendered through it.
        let mut pieces: Pieces = Vec::new();
        let mut done = 0;
        let full = template
            .render(&messages, false)
            .map_err(|err| err.to_string())?;
        for (i, message) in messages.iter().enumerate() {
            if message.role != "assistant" {
                continue;
            }
            let before = template
                .render(&messages[..i], true)
                .map_err(|err| err.to_string())?;
            let through = template
                .render(&messages[..=i], false)
                .map_err(|err| err.to_string())?;
            if !full.starts_with(&through) || !through.starts_with(&before) || before.len() < done {
                return Err(
                    "the chat template does not render conversations incrementally".to_owned(),
                );
            }
            pieces.push((before[done..].to_owned(), false));
            pieces.push((through[before.len()..].to_owned(), true));
            done = through.len();
        }
        if done < full.len() {
            pieces.push((full[done..].to_owned(), false));
        }
        Ok(pieces)
    }

    fn definition_pieces(&self, record: &Record) -> std::result::Result<Pieces, String> {
        let (definition, input, output) = match record {
            Record::Alpaca {
                instruction,
                input,
                output,
            } => (instruction.as_str(), input.as_str(), output.as_str()),
            Record::Completion { prompt, completion } => ("", prompt.as_str(), completion.as_str()),
            Record::Chat { .. } => {
                return Err("chat records need the chat template".to_owned());
            }
        };
        let bos = self
            .tokenizer
            .bos
            .as_ref()
            .map(|(text, _)| text.clone())
            .unwrap_or_default();
        let eos = self
            .tokenizer
            .eos
            .as_ref()
            .map(|(text, _)| text.clone())
            .unwrap_or_default();
        let source = format!("{bos}{}", definition_source(definition, input));
        // §5.1 tokenises the target on its own, which with SentencePiece vocabularies starts it
        // with a word boundary; with byte-level BPE the same boundary is a leading space.
        let target = format!(" {}{eos}", output.trim_start());
        Ok(vec![(source, false), (target, true)])
    }

    /// Renders and tokenises a record.
    pub fn encode(&self, line: usize, record: &Record) -> std::result::Result<Example, String> {
        let pieces = self.pieces(record)?;
        let text: String = pieces.iter().map(|(t, _)| t.as_str()).collect();
        let mut spans = Vec::new();
        let mut at = 0;
        for (piece, label) in &pieces {
            if *label {
                spans.push((at, at + piece.len()));
            }
            at += piece.len();
        }
        let (mut ids, offsets) = self
            .tokenizer
            .encode_with_offsets(&text, false)
            .map_err(|err| err.to_string())?;
        let mut is_label: Vec<bool> = offsets
            .iter()
            .map(|&(start, end)| {
                spans
                    .iter()
                    .any(|&(s, e)| start < e && end.max(start + 1) > s)
            })
            .collect();
        let truncated = ids.len() > self.max_len;
        if truncated {
            ids.truncate(self.max_len);
            is_label.truncate(self.max_len);
        }
        let example = Example {
            line,
            ids,
            is_label,
            truncated,
        };
        if example.label_count() == 0 {
            return Err(if truncated {
                format!(
                    "no response token left after cutting to {} tokens",
                    self.max_len
                )
            } else {
                "the response is empty after tokenisation".to_owned()
            });
        }
        Ok(example)
    }
}

/// A tokenised data set split into training and validation examples.
#[derive(Clone, Debug, Default)]
pub struct Dataset {
    /// The file it came from.
    pub path: PathBuf,
    /// Training examples.
    pub train: Vec<Example>,
    /// Validation examples.
    pub validation: Vec<Example>,
    /// Lines skipped (unparsable or unusable), with reasons.
    pub issues: Vec<LineIssue>,
    /// Examples cut at the maximum length (still used).
    pub truncated: usize,
}

/// Splitting settings.
#[derive(Clone, Copy, Debug)]
pub struct SplitOptions {
    /// Fraction of examples held out for validation (0 disables validation).
    pub validation_fraction: f64,
    /// Seed of the split's shuffle.
    pub seed: u64,
}

/// Tokenises `parsed` and splits it deterministically. Fails when no example survives.
pub fn build(
    path: &Path,
    parsed: &Parsed,
    renderer: &Renderer<'_>,
    split: SplitOptions,
) -> Result<Dataset> {
    let mut issues = parsed.issues.clone();
    let mut examples = Vec::with_capacity(parsed.records.len());
    for (line, record) in &parsed.records {
        match renderer.encode(*line, record) {
            Ok(example) => examples.push(example),
            Err(reason) => issues.push(LineIssue {
                line: *line,
                reason,
            }),
        }
    }
    issues.sort_by_key(|issue| issue.line);
    if examples.is_empty() {
        let why = issues
            .first()
            .map_or_else(|| "the file is empty".to_owned(), ToString::to_string);
        return Err(Error::bad_file(
            path,
            format!("no usable training example ({why})"),
        ));
    }
    let truncated = examples.iter().filter(|e| e.truncated).count();
    let fraction = split.validation_fraction.clamp(0.0, 0.9);
    let mut order: Vec<usize> = (0..examples.len()).collect();
    shuffle(&mut order, split.seed ^ 0x5EED_5A17);
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let n_val = if fraction > 0.0 && examples.len() > 1 {
        ((examples.len() as f64 * fraction).round() as usize).clamp(1, examples.len() - 1)
    } else {
        0
    };
    let mut val_idx: Vec<usize> = order[..n_val].to_vec();
    val_idx.sort_unstable();
    let mut train = Vec::with_capacity(examples.len() - n_val);
    let mut validation = Vec::with_capacity(n_val);
    for (i, example) in examples.into_iter().enumerate() {
        if val_idx.binary_search(&i).is_ok() {
            validation.push(example);
        } else {
            train.push(example);
        }
    }
    Ok(Dataset {
        path: path.to_path_buf(),
        train,
        validation,
        issues,
        truncated,
    })
}

/// Fisher–Yates shuffle with [`SplitMix64`].
pub fn shuffle<T>(items: &mut [T], seed: u64) {
    let mut rng = SplitMix64(seed);
    for i in (1..items.len()).rev() {
        let j = rng.below(i + 1);
        items.swap(i, j);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_formats_and_reports_bad_lines() {
        let text = concat!(
            "{\"instruction\": \"Add\", \"input\": \"1 2\", \"output\": \"3\"}\n",
            "\n",
            "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": \"hello\"}]}\n",
            "{\"prompt\": \"2+2=\", \"completion\": \"4\"}\n",
            "not json\n",
            "{\"instruction\": \"x\"}\n",
            "{\"messages\": [{\"role\": \"user\", \"content\": \"only me\"}]}\n",
            "[1, 2]\n",
            "{\"text\": \"what\"}\n",
            "{\"messages\": [{\"role\": \"bot\", \"content\": \"x\"}]}\n",
        );
        let parsed = parse_jsonl(text);
        let formats: Vec<_> = parsed
            .records
            .iter()
            .map(|(line, r)| (*line, r.format()))
            .collect();
        assert_eq!(
            formats,
            vec![(1, "alpaca"), (3, "chat"), (4, "prompt/completion")]
        );
        let lines: Vec<usize> = parsed.issues.iter().map(|i| i.line).collect();
        assert_eq!(lines, vec![5, 6, 7, 8, 9, 10]);
        assert!(parsed.issues[0].reason.starts_with("not JSON"));
        assert!(parsed.issues[1].reason.contains("output"));
        assert!(parsed.issues[2].reason.contains("no assistant turn"));
        assert!(parsed.issues[4].reason.contains("unknown format"));
        assert!(parsed.issues[5].reason.contains("unknown role"));
        assert_eq!(
            parsed.issues[0].to_string().split(':').next(),
            Some("line 5")
        );
    }

    #[test]
    fn period_rule_matches_the_collator() {
        assert_eq!(with_period("Translate"), "Translate.");
        assert_eq!(with_period("Why?"), "Why?");
        assert_eq!(with_period("ends. "), "ends.");
        assert_eq!(with_period(""), "");
    }

    #[test]
    fn shuffle_is_a_deterministic_permutation() {
        let mut a: Vec<usize> = (0..50).collect();
        let mut b = a.clone();
        shuffle(&mut a, 7);
        shuffle(&mut b, 7);
        assert_eq!(a, b);
        let mut sorted = a.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..50).collect::<Vec<_>>());
        assert_ne!(a, (0..50).collect::<Vec<_>>());
    }
}
