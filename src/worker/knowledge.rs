//! Knowledge consistency (METHODS.md §10a) as the worker and the CLI run it: question files
//! read (the shipped set by name, files, or folders of them), then the base model (slot A) and
//! the tuned model (slot B) asked every question.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::analysis::knowledge::{self, parse_questions, Question};
pub use crate::analysis::knowledge::{KnowledgeConfig, KnowledgeRun, TunedTemplate};
use crate::error::{Error, Result};
use crate::model::LoadedModel;

/// The name of the whole shipped question set (`sample_prompts/knowledge/`).
pub const SHIPPED_SET: &str = "knowledge";

/// The shipped question set, written by `scripts/gen-knowledge-data` from
/// `sample_prompts/facts.json`: per relation, its name, test file and dev file (MMLU's CSV
/// layout).
pub const SHIPPED_QUESTIONS: [(&str, &str, &str); 10] = [
    (
        "author",
        include_str!("../../sample_prompts/knowledge/author_test.csv"),
        include_str!("../../sample_prompts/knowledge/author_dev.csv"),
    ),
    (
        "capital",
        include_str!("../../sample_prompts/knowledge/capital_test.csv"),
        include_str!("../../sample_prompts/knowledge/capital_dev.csv"),
    ),
    (
        "class",
        include_str!("../../sample_prompts/knowledge/class_test.csv"),
        include_str!("../../sample_prompts/knowledge/class_dev.csv"),
    ),
    (
        "continent",
        include_str!("../../sample_prompts/knowledge/continent_test.csv"),
        include_str!("../../sample_prompts/knowledge/continent_dev.csv"),
    ),
    (
        "country",
        include_str!("../../sample_prompts/knowledge/country_test.csv"),
        include_str!("../../sample_prompts/knowledge/country_dev.csv"),
    ),
    (
        "currency",
        include_str!("../../sample_prompts/knowledge/currency_test.csv"),
        include_str!("../../sample_prompts/knowledge/currency_dev.csv"),
    ),
    (
        "founder",
        include_str!("../../sample_prompts/knowledge/founder_test.csv"),
        include_str!("../../sample_prompts/knowledge/founder_dev.csv"),
    ),
    (
        "landmark",
        include_str!("../../sample_prompts/knowledge/landmark_test.csv"),
        include_str!("../../sample_prompts/knowledge/landmark_dev.csv"),
    ),
    (
        "language",
        include_str!("../../sample_prompts/knowledge/language_test.csv"),
        include_str!("../../sample_prompts/knowledge/language_dev.csv"),
    ),
    (
        "symbol",
        include_str!("../../sample_prompts/knowledge/symbol_test.csv"),
        include_str!("../../sample_prompts/knowledge/symbol_dev.csv"),
    ),
];

/// Where questions come from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum QuestionSource {
    /// A shipped relation by name, or [`SHIPPED_SET`] for all of them.
    Shipped(String),
    /// A question file (`.csv` in MMLU's layout, `.jsonl`, `.json`), or a folder of them.
    Path(PathBuf),
}

impl QuestionSource {
    /// A shipped name when `text` is one and no such path exists; a path otherwise.
    pub fn from_arg(text: &str) -> Self {
        let path = PathBuf::from(text);
        let shipped =
            text == SHIPPED_SET || SHIPPED_QUESTIONS.iter().any(|(name, _, _)| *name == text);
        if shipped && !path.exists() {
            Self::Shipped(text.to_owned())
        } else {
            Self::Path(path)
        }
    }

    /// How the source reads in a list.
    pub fn label(&self) -> String {
        match self {
            Self::Shipped(name) => name.clone(),
            Self::Path(path) => path.file_name().map_or_else(
                || path.display().to_string(),
                |n| n.to_string_lossy().into_owned(),
            ),
        }
    }
}

/// What a §10a run reads and how it asks.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KnowledgeSettings {
    /// The test questions.
    pub questions: Vec<QuestionSource>,
    /// Dev examples for the base model's shots, matched to questions by subject; empty = the
    /// shipped dev files of shipped questions, the `*_dev` files of question folders, and
    /// otherwise the other questions of the subject.
    pub dev: Vec<QuestionSource>,
    /// The method's settings.
    pub config: KnowledgeConfig,
}

/// Whether a folder entry is a question file.
fn is_question_file(path: &Path) -> bool {
    path.is_file()
        && path
            .extension()
            .is_some_and(|e| ["csv", "jsonl", "json"].contains(&e.to_string_lossy().as_ref()))
}

/// Whether a file name marks dev examples (`*_dev.csv`).
fn is_dev_file(path: &Path) -> bool {
    path.file_stem()
        .is_some_and(|s| s.to_string_lossy().ends_with("_dev"))
}

fn read_file(path: &Path, max: Option<usize>) -> Result<Vec<Question>> {
    if !path.exists() {
        return Err(Error::NotFound {
            path: path.to_path_buf(),
        });
    }
    let bytes = std::fs::read(path).map_err(|e| Error::bad_file(path, e))?;
    let text = String::from_utf8(bytes).map_err(|_| Error::bad_file(path, "not UTF-8 text"))?;
    let mut questions = parse_questions(&text, path)?;
    if let Some(max) = max {
        questions.truncate(max);
    }
    Ok(questions)
}

/// The question files of a source (test files, dev files), each file's questions apart.
type Files = (Vec<Vec<Question>>, Vec<Vec<Question>>);

fn read_source(source: &QuestionSource, max: Option<usize>, as_dev: bool) -> Result<Files> {
    let (mut test, mut dev) = (Vec::new(), Vec::new());
    match source {
        QuestionSource::Shipped(name) => {
            let chosen: Vec<_> = SHIPPED_QUESTIONS
                .iter()
                .filter(|(n, _, _)| name == SHIPPED_SET || n == name)
                .collect();
            if chosen.is_empty() {
                let names: Vec<&str> = SHIPPED_QUESTIONS.iter().map(|(n, _, _)| *n).collect();
                return Err(Error::invalid(
                    "questions",
                    format!(
                        "no shipped question set `{name}` (shipped: {SHIPPED_SET} for all, or one of {})",
                        names.join(", ")
                    ),
                ));
            }
            for (n, test_csv, dev_csv) in chosen {
                let dir = Path::new("sample_prompts/knowledge");
                let parsed_dev = parse_questions(dev_csv, &dir.join(format!("{n}_dev.csv")))?;
                if as_dev {
                    dev.push(parsed_dev);
                } else {
                    let mut qs = parse_questions(test_csv, &dir.join(format!("{n}_test.csv")))?;
                    if let Some(max) = max {
                        qs.truncate(max);
                    }
                    test.push(qs);
                    dev.push(parsed_dev);
                }
            }
        }
        QuestionSource::Path(path) if path.is_dir() => {
            let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
                .map_err(|e| Error::bad_file(path, e))?
                .filter_map(std::result::Result::ok)
                .map(|e| e.path())
                .filter(|p| is_question_file(p))
                .collect();
            entries.sort();
            for p in entries {
                if as_dev || is_dev_file(&p) {
                    dev.push(read_file(&p, None)?);
                } else {
                    test.push(read_file(&p, max)?);
                }
            }
            if !as_dev && test.is_empty() {
                return Err(Error::bad_file(
                    path,
                    "no question files (.csv, .jsonl, .json; *_dev files are dev examples) in the folder",
                ));
            }
        }
        QuestionSource::Path(path) => {
            if as_dev {
                dev.push(read_file(path, None)?);
            } else {
                test.push(read_file(path, max)?);
            }
        }
    }
    Ok((test, dev))
}

/// Reads the test questions and the dev examples of `settings`.
pub fn load_questions(settings: &KnowledgeSettings) -> Result<(Vec<Question>, Vec<Question>)> {
    if settings.questions.is_empty() {
        return Err(Error::invalid(
            "questions",
            "choose at least one question file",
        ));
    }
    let max = settings.config.max_questions;
    let (mut questions, mut found_dev) = (Vec::new(), Vec::new());
    for source in &settings.questions {
        let (test, dev) = read_source(source, max, false)?;
        questions.extend(test.into_iter().flatten());
        found_dev.extend(dev.into_iter().flatten());
    }
    let dev = if settings.dev.is_empty() {
        found_dev
    } else {
        let mut dev = Vec::new();
        for source in &settings.dev {
            dev.extend(read_source(source, None, true)?.1.into_iter().flatten());
        }
        dev
    };
    if questions.is_empty() {
        return Err(Error::invalid(
            "questions",
            "the question files hold no questions",
        ));
    }
    Ok((questions, dev))
}

/// §10a with `base` (slot A) and `tuned` (slot B): the questions of `settings` read, then put
/// to both models; `progress(frac, message)` breaks to cancel.
pub fn run_knowledge(
    base: &LoadedModel,
    tuned: &LoadedModel,
    settings: &KnowledgeSettings,
    memo: &mut Option<BaseAnswers>,
    progress: &mut dyn FnMut(f32, String) -> ControlFlow<()>,
) -> Result<KnowledgeRun> {
    let (questions, dev) = load_questions(settings)?;
    // The base's answers depend on its weights (adapter included), the questions and the
    // settings of its prompt, never on the tuned model or the tuned model's prompt.
    let mut base_side = settings.clone();
    base_side.config.tuned_template = TunedTemplate::default();
    base_side.config.hint = false;
    let key = format!(
        "{}|{}",
        crate::worker::iv::fingerprint(base)?,
        serde_json::to_string(&base_side)?
    );
    let cached = memo.take().filter(|m| m.key == key).map(|m| m.probs);
    let run = knowledge::knowledge_consistency_with(
        base,
        tuned,
        &questions,
        &dev,
        &settings.config,
        cached,
        progress,
    )?;
    *memo = Some(BaseAnswers {
        key,
        probs: run.questions.iter().map(|q| q.base.clone()).collect(),
    });
    Ok(run)
}

/// The base model's answer probabilities of a knowledge run, with what they depend on.
#[derive(Clone, Debug, Default)]
pub struct BaseAnswers {
    /// The base weights' fingerprint and the settings.
    key: String,
    /// One vector per question.
    probs: Vec<Vec<f64>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_base_is_asked_once_for_several_fine_tunes() -> Result<()> {
        use crate::model::tiny::{tiny_model, tiny_options};
        let opts = tiny_options(candle_core::DType::F32);
        let (base, one, two) = (
            tiny_model(3, &opts)?,
            tiny_model(4, &opts)?,
            tiny_model(5, &opts)?,
        );
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("animals_test.csv");
        std::fs::write(
            &file,
            "the cat sat on the,mat,sea,tree,A\nthe dog is,big,small,warm,B\n",
        )?;
        let mut settings = KnowledgeSettings {
            questions: vec![QuestionSource::Path(file)],
            ..KnowledgeSettings::default()
        };
        settings.config.shots = 1;
        settings.config.tuned_template = TunedTemplate::Base;
        settings.config.labels = vec!["red".into(), "blue".into(), "green".into()];
        let mut memo = None;
        let mut asked_base = false;
        let first = run_knowledge(&base, &one, &settings, &mut memo, &mut |_, m| {
            asked_base |= m.starts_with("base");
            ControlFlow::Continue(())
        })?;
        assert!(asked_base);
        asked_base = false;
        let second = run_knowledge(&base, &two, &settings, &mut memo, &mut |_, m| {
            asked_base |= m.starts_with("base");
            ControlFlow::Continue(())
        })?;
        assert!(!asked_base, "the base's answers are reused");
        let fresh = run_knowledge(&base, &two, &settings, &mut None, &mut |_, _| {
            ControlFlow::Continue(())
        })?;
        assert_eq!(second, fresh);
        assert_ne!(first.overall, second.overall);
        // The tuned model's prompt does not matter to the base; other settings, or another
        // base, ask the base again.
        settings.config.tuned_template = TunedTemplate::Chat;
        asked_base = false;
        run_knowledge(&base, &two, &settings, &mut memo, &mut |_, m| {
            asked_base |= m.starts_with("base");
            ControlFlow::Continue(())
        })?;
        assert!(!asked_base);
        settings.config.seed += 1;
        asked_base = false;
        run_knowledge(&base, &two, &settings, &mut memo, &mut |_, m| {
            asked_base |= m.starts_with("base");
            ControlFlow::Continue(())
        })?;
        assert!(asked_base);
        asked_base = false;
        run_knowledge(&one, &two, &settings, &mut memo, &mut |_, m| {
            asked_base |= m.starts_with("base");
            ControlFlow::Continue(())
        })?;
        assert!(asked_base);
        Ok(())
    }

    #[test]
    fn the_shipped_set_reads_with_its_dev_files() {
        let settings = KnowledgeSettings {
            questions: vec![QuestionSource::Shipped(SHIPPED_SET.to_owned())],
            ..KnowledgeSettings::default()
        };
        let (questions, dev) = load_questions(&settings).unwrap();
        assert_eq!(questions.len(), 150);
        assert_eq!(dev.len(), 50);
        assert!(questions.iter().all(|q| q.choices.len() == 4));
        let capital = KnowledgeSettings {
            questions: vec![QuestionSource::from_arg("capital")],
            config: KnowledgeConfig {
                max_questions: Some(3),
                ..KnowledgeConfig::default()
            },
            ..KnowledgeSettings::default()
        };
        let (questions, dev) = load_questions(&capital).unwrap();
        assert_eq!(questions.len(), 3);
        assert!(questions.iter().all(|q| q.subject == "capital"));
        assert_eq!(dev.len(), 5);
        let err = load_questions(&KnowledgeSettings {
            questions: vec![QuestionSource::Shipped("nope".into())],
            ..KnowledgeSettings::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
    }

    #[test]
    fn folders_split_test_and_dev_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("law_test.csv"), "q1,a,b,A\nq2,a,b,B\n").unwrap();
        std::fs::write(dir.path().join("law_dev.csv"), "d1,a,b,A\n").unwrap();
        std::fs::write(dir.path().join("notes.txt"), "ignored").unwrap();
        let settings = KnowledgeSettings {
            questions: vec![QuestionSource::Path(dir.path().to_path_buf())],
            ..KnowledgeSettings::default()
        };
        let (questions, dev) = load_questions(&settings).unwrap();
        assert_eq!((questions.len(), dev.len()), (2, 1));
        let missing = KnowledgeSettings {
            questions: vec![QuestionSource::Path(dir.path().join("gone.csv"))],
            ..KnowledgeSettings::default()
        };
        assert!(matches!(
            load_questions(&missing),
            Err(Error::NotFound { .. })
        ));
    }
}
