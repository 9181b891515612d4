//! Figure and data files of knowledge consistency (METHODS.md §10a): the histogram of ρ per
//! question and the scatter of the base and the tuned model's probability of the right answer,
//! one colour per tuned model; per-question and per-subject tables (CSV); the runs and, across
//! tuned variants of one base, the Spearman partial correlation (JSON). The Knowledge view's
//! "Export…" and `tunelens knowledge --out` call [`write_knowledge`].

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::analysis::knowledge::{partial_correlation, GroupSummary, KnowledgeRun};
use crate::export::data::csv_field;
use crate::export::figure::{Figure, HistSeries, Histogram, LinePlot, LineSeries};
use crate::export::{write_bytes, write_figure};

/// How a run is named in legends and tables: its tuned model.
fn run_name(run: &KnowledgeRun) -> String {
    run.tuned_model.clone()
}

/// The ρ histogram (left) and the base-vs-tuned probability of the right answer (right).
pub fn knowledge_figure(runs: &[KnowledgeRun]) -> Figure {
    let hist = Histogram {
        title: "Rank correlation per question".to_owned(),
        x_label: "rho (Pearson of the choice ranks)".to_owned(),
        y_label: "questions".to_owned(),
        bins: 20,
        series: runs
            .iter()
            .map(|r| HistSeries {
                name: run_name(r),
                values: r.questions.iter().map(|q| q.rho as f32).collect(),
            })
            .collect(),
    };
    // A scatter: each point its own segment (a lone point is drawn as a dot).
    let mut series: Vec<LineSeries> = runs
        .iter()
        .map(|r| LineSeries {
            name: run_name(r),
            points: r
                .questions
                .iter()
                .flat_map(|q| {
                    let p = |v: &[f64]| v.get(q.answer).copied().unwrap_or(f64::NAN) as f32;
                    [(p(&q.base), p(&q.tuned)), (f32::NAN, f32::NAN)]
                })
                .collect(),
        })
        .collect();
    series.push(LineSeries {
        name: "equal".to_owned(),
        points: vec![(0.0, 0.0), (1.0, 1.0)],
    });
    Figure::Row(vec![
        Figure::Histogram(hist),
        Figure::Line(LinePlot {
            title: "Probability of the right answer".to_owned(),
            x_label: "base model".to_owned(),
            y_label: "tuned model".to_owned(),
            series,
        }),
    ])
}

fn label(run: &KnowledgeRun, index: usize) -> String {
    run.config
        .choice_labels()
        .get(index)
        .cloned()
        .unwrap_or_else(|| index.to_string())
}

fn joined(values: &[f64]) -> String {
    values
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(" ")
}

/// One row per question of every run.
pub fn questions_csv(runs: &[KnowledgeRun]) -> String {
    let mut out = String::from(
        "base_model,tuned_model,subject,file,record,question,answer,base_prediction,tuned_prediction,p_base_answer,p_tuned_answer,rho,kl,cosine,p_base,p_tuned\n",
    );
    for run in runs {
        let (base, tuned) = (csv_field(&run.base_model), csv_field(&run.tuned_model));
        for q in &run.questions {
            let at = |v: &[f64]| v.get(q.answer).map_or(String::new(), ToString::to_string);
            let _ = writeln!(
                out,
                "{base},{tuned},{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
                csv_field(&q.subject),
                csv_field(&q.file),
                q.record,
                csv_field(&q.question),
                label(run, q.answer),
                label(run, q.base_prediction),
                label(run, q.tuned_prediction),
                at(&q.base),
                at(&q.tuned),
                q.rho,
                q.kl,
                q.cosine,
                joined(&q.base),
                joined(&q.tuned)
            );
        }
    }
    out
}

/// Means per subject, per file and overall, of every run.
pub fn subjects_csv(runs: &[KnowledgeRun]) -> String {
    let mut out = String::from(
        "base_model,tuned_model,group,name,questions,rho,kl,cosine,base_accuracy,tuned_accuracy\n",
    );
    for run in runs {
        let (base, tuned) = (csv_field(&run.base_model), csv_field(&run.tuned_model));
        let groups = run
            .subjects
            .iter()
            .map(|g| ("subject", g))
            .chain(run.per_file.iter().map(|g| ("file", g)))
            .chain(std::iter::once(("all", &run.overall)));
        for (group, g) in groups {
            let GroupSummary {
                name,
                questions,
                rho,
                kl,
                cosine,
                base_accuracy,
                tuned_accuracy,
            } = g;
            let _ = writeln!(
                out,
                "{base},{tuned},{group},{},{questions},{rho},{kl},{cosine},{base_accuracy},{tuned_accuracy}",
                csv_field(name)
            );
        }
    }
    out
}

/// Writes `<stem>.svg`, `<stem>.png`, `<stem>_questions.csv`, `<stem>_subjects.csv` and
/// `<stem>.json` (the runs and the partial correlation across them, defined from 3 runs).
pub fn write_knowledge(
    dir: &Path,
    stem: &str,
    runs: &[KnowledgeRun],
) -> crate::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)
        .map_err(|e| crate::Error::bad_file(dir, format!("cannot create: {e}")))?;
    let mut written = Vec::new();
    let fig = knowledge_figure(runs);
    for ext in ["svg", "png"] {
        let path = dir.join(format!("{stem}.{ext}"));
        write_figure(&fig, &path)?;
        written.push(path);
    }
    let json = serde_json::json!({
        "method": "METHODS.md §10a knowledge consistency (Ren et al.)",
        "runs": runs,
        "partial_correlation": partial_correlation(runs),
    });
    for (name, text) in [
        (format!("{stem}_questions.csv"), questions_csv(runs)),
        (format!("{stem}_subjects.csv"), subjects_csv(runs)),
        (format!("{stem}.json"), serde_json::to_string_pretty(&json)?),
    ] {
        let path = dir.join(name);
        write_bytes(&path, text.as_bytes())?;
        written.push(path);
    }
    Ok(written)
}
