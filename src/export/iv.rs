//! Figure and data files of the Instruction vector view (METHODS.md §4): the AIE heatmaps of A
//! and B side by side and the zero-shot accuracy by edit layer, the AIE grid, the top heads,
//! the sweep and the vocabulary read-out as CSV, and the JSON of the run. The GUI's "Export…"
//! and `tunelens iv --out` call [`write_iv`].

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::analysis::results::IvOutput;
use crate::analysis::types::Matrix;
use crate::export::data::csv_field;
use crate::export::figure::{ColorScale, Figure, Heatmap, LinePlot, LineSeries};
use crate::export::{write_bytes, write_figure};

/// The AIE heatmap of every model for task `task`, and the accuracy by edit layer.
pub fn iv_figure(out: &IvOutput, task: usize) -> Figure {
    let mut maps = Vec::new();
    let mut lines = Vec::new();
    for r in &out.results {
        let Some(t) = r.run.tasks.get(task) else {
            continue;
        };
        let name = format!("{:?}: {}", r.slot, r.model);
        let grid = if t.aie.is_empty() {
            &r.run.universal_aie
        } else {
            &t.aie
        };
        if grid.len() == r.run.layers * r.run.heads && !grid.is_empty() {
            maps.push(Figure::Heatmap(Heatmap {
                title: format!("{name}, {}", t.task),
                row_labels: (0..r.run.layers).map(|l| l.to_string()).collect(),
                col_labels: (0..r.run.heads).map(|h| h.to_string()).collect(),
                values: Matrix {
                    rows: r.run.layers,
                    cols: r.run.heads,
                    data: grid.clone(),
                },
                value_label: "average indirect effect (Δp)".to_owned(),
                scale: ColorScale::Diverging,
                x_label: "head".to_owned(),
                y_label: "layer".to_owned(),
            }));
        }
        if let Some(e) = &t.evaluation {
            lines.push(LineSeries {
                name: format!("{:?} with IV", r.slot),
                points: e
                    .layers
                    .iter()
                    .map(|l| (l.layer as f32, (100.0 * l.accuracy) as f32))
                    .collect(),
            });
            let (first, last) = (
                e.layers.first().map_or(0, |l| l.layer),
                e.layers.last().map_or(0, |l| l.layer),
            );
            lines.push(LineSeries {
                name: format!("{:?} without", r.slot),
                points: vec![
                    (first as f32, (100.0 * e.zero_shot) as f32),
                    (last as f32, (100.0 * e.zero_shot) as f32),
                ],
            });
        }
    }
    let mut rows = Vec::new();
    if !maps.is_empty() {
        rows.push(Figure::Row(maps));
    }
    if !lines.is_empty() {
        rows.push(Figure::Line(LinePlot {
            title: "Zero-shot top-1 accuracy with the vector added after each layer".to_owned(),
            x_label: "edit layer".to_owned(),
            y_label: "accuracy (%)".to_owned(),
            series: lines,
        }));
    }
    Figure::Column(rows)
}

/// Writes `<stem>.svg`, `<stem>.png` (task `task`), `<stem>_aie.csv`, `<stem>_top_heads.csv`,
/// `<stem>_layers.csv`, `<stem>_vocab.csv` (every task), `<stem>.json`, and every vector as
/// `<stem>_<slot>_<task>.iv.safetensors` with its `.iv.json` (what steering and IV-guided
/// fine-tuning read).
pub fn write_iv(
    dir: &Path,
    stem: &str,
    out: &IvOutput,
    task: usize,
) -> crate::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)
        .map_err(|e| crate::Error::bad_file(dir, format!("cannot create: {e}")))?;
    let mut written = Vec::new();
    let fig = iv_figure(out, task);
    for ext in ["svg", "png"] {
        let path = dir.join(format!("{stem}.{ext}"));
        write_figure(&fig, &path)?;
        written.push(path);
    }
    let mut aie = String::from("model,task,layer,head,aie,aie_nll,in_vector\n");
    let mut top = String::from("model,task,rank,layer,head,score,in_both\n");
    let mut layers = String::from("model,task,edit_layer,accuracy_with_iv,zero_shot,few_shot,n\n");
    let mut vocab = String::from("model,task,rank,token,probability\n");
    for r in &out.results {
        let model = csv_field(&r.model);
        for (ti, t) in r.run.tasks.iter().enumerate() {
            let name = csv_field(&t.task);
            let h = r.run.heads;
            for (i, v) in t.aie.iter().enumerate() {
                let (l, k) = (i / h, i % h);
                let nll = t
                    .aie_nll
                    .get(i)
                    .map_or(String::new(), std::string::ToString::to_string);
                let inv = t.top.iter().any(|s| s.layer == l && s.head == k);
                let _ = writeln!(aie, "{model},{name},{l},{k},{v},{nll},{inv}");
            }
            let shared = out.shared.get(ti);
            for (i, s) in t.top.iter().enumerate() {
                let both = shared.map_or(String::new(), |sh| {
                    sh.contains(&(s.layer, s.head)).to_string()
                });
                let _ = writeln!(
                    top,
                    "{model},{name},{},{},{},{},{both}",
                    i + 1,
                    s.layer,
                    s.head,
                    s.score
                );
            }
            if let Some(e) = &t.evaluation {
                for l in &e.layers {
                    let _ = writeln!(
                        layers,
                        "{model},{name},{},{},{},{},{}",
                        l.layer, l.accuracy, e.zero_shot, e.few_shot, e.n
                    );
                }
            }
            for (i, (tok, p)) in t.vocab.iter().enumerate() {
                let _ = writeln!(vocab, "{model},{name},{},{},{p}", i + 1, csv_field(tok));
            }
        }
    }
    for (suffix, text) in [
        ("_aie.csv", aie),
        ("_top_heads.csv", top),
        ("_layers.csv", layers),
        ("_vocab.csv", vocab),
    ] {
        let path = dir.join(format!("{stem}{suffix}"));
        write_bytes(&path, text.as_bytes())?;
        written.push(path);
    }
    let path = dir.join(format!("{stem}.json"));
    write_bytes(&path, serde_json::to_string(out)?.as_bytes())?;
    written.push(path);
    for r in &out.results {
        for t in &r.run.tasks {
            let name = format!(
                "{stem}_{:?}_{}.iv.safetensors",
                r.slot,
                crate::export::slug(&t.task)
            );
            written.extend(crate::ivfile::save(
                &dir.join(name),
                t,
                &r.model,
                &r.fingerprint,
                &r.run,
                &out.settings.config,
            )?);
        }
    }
    Ok(written)
}
