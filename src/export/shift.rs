//! Figure, tables and coloured responses of the token distribution shift (METHODS.md §6,
//! §10b), and the logit lens figure. The Token shift view's "Export…" and `tunelens shift
//! --out` / `tunelens lens --out` call [`write_shift`] and [`write_lens`].

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::analysis::lens::LensOutput;
use crate::analysis::shift::{Category, ShiftRun, METRICS, RELATIVE_BINS};
use crate::export::data::csv_field;
use crate::export::figure::{BarChart, Figure, LinePlot, LineSeries};
use crate::export::{write_bytes, write_figure};

/// Background colours of the three classes in the HTML view (Okabe-Ito yellow and
/// vermillion: told apart by lightness as well as hue, so they survive colour blindness).
pub const MARGINAL_HTML: &str = "#F0E442";
/// Shifted positions.
pub const SHIFTED_HTML: &str = "#D55E00";

#[allow(clippy::cast_precision_loss, clippy::cast_possible_truncation)]
fn f(x: f64) -> f32 {
    x as f32
}

/// Ratios by class and run; shifted ratio by relative position; TP and shifted fraction by
/// position.
pub fn shift_figure(runs: &[ShiftRun]) -> Figure {
    let many = runs.len() > 1;
    let name = |i: usize, run: &ShiftRun| {
        if many {
            format!("{} {}", i + 1, run.tuned_model)
        } else {
            run.tuned_model.clone()
        }
    };
    let mut labels = Vec::new();
    let mut values = Vec::new();
    let mut highlighted = Vec::new();
    for (i, run) in runs.iter().enumerate() {
        for (c, label) in ["unshifted", "marginal", "shifted"].iter().enumerate() {
            labels.push(if many {
                format!("{label} {}", i + 1)
            } else {
                (*label).to_owned()
            });
            values.push(f(100.0 * run.summary.ratios[c]));
            highlighted.push(c == 2);
        }
    }
    let relative = runs
        .iter()
        .enumerate()
        .map(|(i, run)| LineSeries {
            name: name(i, run),
            points: run
                .summary
                .shifted_by_relative_position()
                .iter()
                .enumerate()
                .map(|(b, &v)| (f((b as f64 + 0.5) / RELATIVE_BINS as f64), f(100.0 * v)))
                .collect(),
        })
        .collect();
    let by_position = |metric: &dyn Fn(&crate::analysis::shift::PositionMeans) -> f64| {
        runs.iter()
            .enumerate()
            .map(|(i, run)| LineSeries {
                name: name(i, run),
                points: run
                    .summary
                    .by_position
                    .iter()
                    .map(|p| (p.t as f32, f(metric(p))))
                    .collect(),
            })
            .collect()
    };
    Figure::Column(vec![
        Figure::Row(vec![
            Figure::Bar(BarChart {
                title: "Positions by class".to_owned(),
                labels,
                values,
                highlighted,
                highlight_label: "shifted".to_owned(),
                x_label: String::new(),
                y_label: "positions (%)".to_owned(),
            }),
            Figure::Line(LinePlot {
                title: "Shifted ratio by relative position".to_owned(),
                x_label: "t / response length".to_owned(),
                y_label: "shifted (%)".to_owned(),
                series: relative,
            }),
        ]),
        Figure::Row(vec![
            Figure::Line(LinePlot {
                title: "Shifted fraction by position".to_owned(),
                x_label: "response position t".to_owned(),
                y_label: "shifted (%)".to_owned(),
                series: by_position(&|p| 100.0 * p.shifted),
            }),
            Figure::Line(LinePlot {
                title: "Base probability of the aligned top token (TP)".to_owned(),
                x_label: "response position t".to_owned(),
                y_label: "mean TP".to_owned(),
                series: by_position(&|p| p.means[4]),
            }),
        ]),
    ])
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Every response as coloured tokens (the view of AlignTDS's `generate_html.py`), each
/// token's tooltip holding both models' top lists.
pub fn shift_html(runs: &[ShiftRun]) -> String {
    let mut out = String::from(
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>Token distribution shift</title>\n<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}span.t{white-space:pre-wrap}.marginal{background:",
    );
    let _ = writeln!(
        out,
        "{MARGINAL_HTML}}}.shifted{{background:{SHIFTED_HTML};color:white}}pre{{white-space:pre-wrap}}</style></head><body>"
    );
    for run in runs {
        let s = &run.summary;
        let _ = writeln!(
            out,
            "<h1>{}</h1>\n<p>{} responses, {} positions, k = {}: unshifted {:.1}%, <span class=\"marginal\">marginal {:.1}%</span>, <span class=\"shifted\">shifted {:.1}%</span></p>",
            html_escape(&run.title()),
            run.items.len(),
            s.positions,
            run.settings.config.k,
            100.0 * s.ratios[0],
            100.0 * s.ratios[1],
            100.0 * s.ratios[2]
        );
        for item in &run.items {
            let _ = writeln!(
                out,
                "<h3>{}</h3><pre>{}</pre><p>",
                html_escape(&item.id),
                html_escape(&item.prompt)
            );
            for (t, piece) in item.shift.pieces.iter().enumerate() {
                let class = item
                    .shift
                    .positions
                    .get(t)
                    .map_or("", |m| match m.category {
                        Category::Unshifted => "",
                        Category::Marginal => "marginal",
                        Category::Shifted => "shifted",
                    });
                let list = |l: Option<&Vec<crate::analysis::shift::TopEntry>>| -> String {
                    l.map(|l| {
                        l.iter()
                            .map(|e| format!("{:?} {:.3}", e.text, e.prob))
                            .collect::<Vec<_>>()
                            .join(", ")
                    })
                    .unwrap_or_default()
                };
                let tip = format!(
                    "t={t} TR={} | tuned: {} | base: {}",
                    item.shift.positions.get(t).map_or(0, |m| m.tr),
                    list(item.shift.aligned_top.get(t)),
                    list(item.shift.base_top.get(t))
                );
                let _ = write!(
                    out,
                    "<span class=\"t {class}\" title=\"{}\">{}</span>",
                    html_escape(&tip),
                    html_escape(piece)
                );
            }
            out.push_str("</p>\n");
        }
    }
    out.push_str("</body></html>\n");
    out
}

/// Writes `<stem>.svg`, `<stem>.png`, `<stem>_ratios.csv`, `<stem>_positions.csv` (every
/// position of every response), `<stem>_tokens.csv` (most shifted tokens),
/// `<stem>_by_position.csv`, `<stem>_relative.csv`, `<stem>.html` and `<stem>.json`.
pub fn write_shift(dir: &Path, stem: &str, runs: &[ShiftRun]) -> crate::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)
        .map_err(|e| crate::Error::bad_file(dir, format!("cannot create: {e}")))?;
    let mut written = Vec::new();
    let fig = shift_figure(runs);
    for ext in ["svg", "png"] {
        let path = dir.join(format!("{stem}.{ext}"));
        write_figure(&fig, &path)?;
        written.push(path);
    }
    let mut ratios = String::from(
        "run,base,tuned,k,responses,positions,unshifted,marginal,shifted,unshifted_ratio,marginal_ratio,shifted_ratio\n",
    );
    let metric_cols = METRICS.join(",");
    let mut positions = format!("run,item,id,t,token,category,{metric_cols},tuned_top,base_top\n");
    let mut tokens = String::from("run,token,shifted,occurrences,ratio\n");
    let mut by_position = format!("run,t,n,{metric_cols},shifted,marginal\n");
    let mut relative = String::from("run,from,to,unshifted,marginal,shifted\n");
    for (r, run) in runs.iter().enumerate() {
        let s = &run.summary;
        let _ = writeln!(
            ratios,
            "{r},{},{},{},{},{},{},{},{},{},{},{}",
            csv_field(&run.base_model),
            csv_field(&run.tuned_model),
            run.settings.config.k,
            run.items.len(),
            s.positions,
            s.counts[0],
            s.counts[1],
            s.counts[2],
            s.ratios[0],
            s.ratios[1],
            s.ratios[2]
        );
        for (i, item) in run.items.iter().enumerate() {
            for (t, m) in item.shift.positions.iter().enumerate() {
                let values: Vec<String> = m.values().iter().map(ToString::to_string).collect();
                let top = |l: Option<&Vec<crate::analysis::shift::TopEntry>>| {
                    l.and_then(|l| l.first())
                        .map_or(String::new(), |e| csv_field(&e.text))
                };
                let _ = writeln!(
                    positions,
                    "{r},{i},{},{t},{},{},{},{},{}",
                    csv_field(&item.id),
                    csv_field(item.shift.pieces.get(t).map_or("", String::as_str)),
                    m.category.name(),
                    values.join(","),
                    top(item.shift.aligned_top.get(t)),
                    top(item.shift.base_top.get(t))
                );
            }
        }
        for t in &s.top_shifted {
            let _ = writeln!(
                tokens,
                "{r},{},{},{},{}",
                csv_field(&t.token),
                t.shifted,
                t.occurrences,
                t.ratio
            );
        }
        for p in &s.by_position {
            let means: Vec<String> = p.means.iter().map(ToString::to_string).collect();
            let _ = writeln!(
                by_position,
                "{r},{},{},{},{},{}",
                p.t,
                p.n,
                means.join(","),
                p.shifted,
                p.marginal
            );
        }
        for (b, c) in s.relative_bins.iter().enumerate() {
            let _ = writeln!(
                relative,
                "{r},{},{},{},{},{}",
                b as f64 / RELATIVE_BINS as f64,
                (b + 1) as f64 / RELATIVE_BINS as f64,
                c[0],
                c[1],
                c[2]
            );
        }
    }
    for (name, text) in [
        (format!("{stem}_ratios.csv"), ratios),
        (format!("{stem}_positions.csv"), positions),
        (format!("{stem}_tokens.csv"), tokens),
        (format!("{stem}_by_position.csv"), by_position),
        (format!("{stem}_relative.csv"), relative),
        (format!("{stem}.html"), shift_html(runs)),
        (format!("{stem}.json"), serde_json::to_string(runs)?),
    ] {
        let path = dir.join(name);
        write_bytes(&path, text.as_bytes())?;
        written.push(path);
    }
    Ok(written)
}

/// Rank (log10) and probability of the tracked token by layer, one curve per model.
pub fn lens_figure(lens: &LensOutput) -> Figure {
    let series = |get: &dyn Fn(&crate::analysis::lens::LensPoint) -> f32| {
        lens.curves
            .iter()
            .map(|(slot, model, curve)| LineSeries {
                name: format!("{slot:?} {model}"),
                points: curve
                    .points
                    .iter()
                    .map(|p| (p.layer as f32, get(p)))
                    .collect(),
            })
            .collect()
    };
    #[allow(clippy::cast_precision_loss)]
    let log_rank = |p: &crate::analysis::lens::LensPoint| (p.rank as f32).log10();
    Figure::Row(vec![
        Figure::Line(LinePlot {
            title: format!("Rank of {:?} by layer", lens.target_text()),
            x_label: "layer".to_owned(),
            y_label: "log10 rank (0 = top)".to_owned(),
            series: series(&log_rank),
        }),
        Figure::Line(LinePlot {
            title: format!("Probability of {:?} by layer", lens.target_text()),
            x_label: "layer".to_owned(),
            y_label: "probability".to_owned(),
            series: series(&|p| p.prob),
        }),
    ])
}

/// Writes `<stem>.svg`, `<stem>.png`, `<stem>.csv` and `<stem>.json` of a logit lens.
pub fn write_lens(dir: &Path, stem: &str, lens: &LensOutput) -> crate::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)
        .map_err(|e| crate::Error::bad_file(dir, format!("cannot create: {e}")))?;
    let mut written = Vec::new();
    let fig = lens_figure(lens);
    for ext in ["svg", "png"] {
        let path = dir.join(format!("{stem}.{ext}"));
        write_figure(&fig, &path)?;
        written.push(path);
    }
    let mut csv = String::from("slot,model,position,target,layer,rank,prob,top_token,top_prob\n");
    for (slot, model, curve) in &lens.curves {
        for p in &curve.points {
            let _ = writeln!(
                csv,
                "{slot:?},{},{},{},{},{},{},{},{}",
                csv_field(model),
                curve.position,
                csv_field(&curve.target_text),
                p.layer,
                p.rank,
                p.prob,
                csv_field(&p.top_token),
                p.top_prob
            );
        }
    }
    for (name, text) in [
        (format!("{stem}.csv"), csv),
        (format!("{stem}.json"), serde_json::to_string_pretty(lens)?),
    ] {
        let path = dir.join(name);
        write_bytes(&path, text.as_bytes())?;
        written.push(path);
    }
    Ok(written)
}
