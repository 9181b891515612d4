//! Figure and tables of the forgetting evaluation (METHODS.md §5.5): general, in-context and
//! task scores and `P_know` / `P_inst` by stage (base first). The Fine-tune view's "Export…"
//! and `tunelens forgetting --out` call [`write_forgetting`].

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::export::data::csv_field;
use crate::export::figure::{Figure, LinePlot, LineSeries};
use crate::export::{write_bytes, write_figure};
use crate::train::forgetting::ForgettingReport;

fn opt(v: Option<f64>) -> String {
    v.map_or(String::new(), |x| x.to_string())
}

/// Scores by stage (left) and probabilities by stage (right).
pub fn forgetting_figure(report: &ForgettingReport) -> Figure {
    #[allow(clippy::cast_precision_loss, clippy::cast_possible_truncation)]
    let series = |name: &str, get: &dyn Fn(usize) -> Option<f64>| LineSeries {
        name: name.to_owned(),
        points: (0..report.models.len())
            .filter_map(|i| get(i).map(|v| (i as f32, (100.0 * v) as f32)))
            .collect(),
    };
    let m = &report.models;
    let scores = vec![
        series("general", &|i| m[i].general),
        series("in-context", &|i| m[i].icl),
        series("task", &|i| m[i].task),
    ];
    let probs = vec![
        series("P_know", &|i| Some(m[i].p_know)),
        series("P_inst", &|i| m[i].p_inst),
    ];
    let keep = |s: Vec<LineSeries>| s.into_iter().filter(|l| !l.points.is_empty()).collect();
    Figure::Row(vec![
        Figure::Line(LinePlot {
            title: "ROUGE-L F1 by stage (0 = base)".to_owned(),
            x_label: "stage".to_owned(),
            y_label: "score (%)".to_owned(),
            series: keep(scores),
        }),
        Figure::Line(LinePlot {
            title: "Length-normalised probability".to_owned(),
            x_label: "stage".to_owned(),
            y_label: "probability (%)".to_owned(),
            series: keep(probs),
        }),
    ])
}

/// The per-stage summary with forgetting (base − stage).
pub fn summary_csv(report: &ForgettingReport) -> String {
    let mut out = String::from(
        "stage,model,general,icl,task,p_know,p_inst,forgetting_general,forgetting_icl,forgetting_task\n",
    );
    let base = report.models.first();
    for (i, m) in report.models.iter().enumerate() {
        let f = base.map_or([None; 3], |b| m.forgetting(b));
        let _ = writeln!(
            out,
            "{i},{},{},{},{},{},{},{},{},{}",
            csv_field(&m.label),
            opt(m.general),
            opt(m.icl),
            opt(m.task),
            m.p_know,
            opt(m.p_inst),
            opt(f[0]),
            opt(f[1]),
            opt(f[2])
        );
    }
    out
}

/// Writes `<stem>.svg`, `<stem>.png`, `<stem>.csv` (the summary), `<stem>_sets.csv` (every set
/// of every stage) and `<stem>.json`.
pub fn write_forgetting(
    dir: &Path,
    stem: &str,
    report: &ForgettingReport,
) -> crate::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)
        .map_err(|e| crate::Error::bad_file(dir, format!("cannot create: {e}")))?;
    let mut written = Vec::new();
    let fig = forgetting_figure(report);
    for ext in ["svg", "png"] {
        let path = dir.join(format!("{stem}.{ext}"));
        write_figure(&fig, &path)?;
        written.push(path);
    }
    let mut sets = String::from("stage,model,set,kind,items,rouge_l,p_know,p_inst\n");
    for (i, m) in report.models.iter().enumerate() {
        for s in &m.sets {
            let _ = writeln!(
                sets,
                "{i},{},{},{},{},{},{},{}",
                csv_field(&m.label),
                csv_field(&s.name),
                s.kind.name(),
                s.items,
                s.score,
                s.p_know,
                opt(s.p_inst)
            );
        }
    }
    for (name, text) in [
        (format!("{stem}.csv"), summary_csv(report)),
        (format!("{stem}_sets.csv"), sets),
        (
            format!("{stem}.json"),
            serde_json::to_string_pretty(report)?,
        ),
    ] {
        let path = dir.join(name);
        write_bytes(&path, text.as_bytes())?;
        written.push(path);
    }
    Ok(written)
}
