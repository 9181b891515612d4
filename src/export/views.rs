//! Figures and data files of the Concepts, Heads, Consistency and Fine-tune views: each export writes
//! `<stem>.svg`, `<stem>.png`, its tables (CSV, and the reference code's TSV) and `<stem>.json`
//! into one folder. The GUI's "Export…" and the CLI's `--out` call these same functions.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::analysis::results::{ConceptsOutput, ConsistencyOutput, HeadsOutput};
use crate::analysis::types::Matrix;
use crate::export::data::csv_field;
use crate::export::figure::{
    BarChart, Figure, Heatmap, HistSeries, Histogram, LinePlot, LineSeries,
};
use crate::export::{tables, write_bytes, write_figure};
use crate::train::results::TrainOutput;

/// Writes `<stem>.svg`, `<stem>.png`, each table as `<stem><suffix>` (the suffix carries the
/// extension) and `<stem>.json`.
fn write_all(
    dir: &Path,
    stem: &str,
    fig: &Figure,
    tables: &[(String, String)],
    json: &str,
) -> crate::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)
        .map_err(|e| crate::Error::bad_file(dir, format!("cannot create: {e}")))?;
    let mut written = Vec::new();
    for ext in ["svg", "png"] {
        let path = dir.join(format!("{stem}.{ext}"));
        write_figure(fig, &path)?;
        written.push(path);
    }
    for (suffix, text) in tables {
        let path = dir.join(format!("{stem}{suffix}"));
        write_bytes(&path, text.as_bytes())?;
        written.push(path);
    }
    let path = dir.join(format!("{stem}.json"));
    write_bytes(&path, json.as_bytes())?;
    written.push(path);
    Ok(written)
}

/// The variance spectrum (first 50 ranks) of `layer` for every model.
pub fn concepts_figure(out: &ConceptsOutput, layer: usize) -> Figure {
    let series = out
        .results
        .iter()
        .filter_map(|r| {
            let l = r.concepts.layers.iter().find(|l| l.layer == layer)?;
            Some(LineSeries {
                name: format!("{:?}: {}", r.slot, r.model),
                points: l
                    .ratios
                    .iter()
                    .take(50)
                    .enumerate()
                    .map(|(i, &v)| ((i + 1) as f32, (v * 100.0) as f32))
                    .collect(),
            })
        })
        .collect();
    Figure::Line(LinePlot {
        title: format!("FFN layer {layer}: explained variance"),
        x_label: "principal component".to_owned(),
        y_label: "variance (%)".to_owned(),
        series,
    })
}

/// Writes the Concepts export of `layer` (table of every layer's components).
pub fn write_concepts(
    dir: &Path,
    stem: &str,
    out: &ConceptsOutput,
    layer: usize,
) -> crate::Result<Vec<PathBuf>> {
    let mut csv =
        String::from("model,layer,rank,variance_ratio,top_words,best_match_in_A,abs_cos,jaccard\n");
    for (i, r) in out.results.iter().enumerate() {
        for l in &r.concepts.layers {
            let al = (i == 1)
                .then(|| {
                    out.alignment
                        .as_ref()
                        .and_then(|a| a.iter().find(|x| x.layer == l.layer))
                })
                .flatten();
            for (k, c) in l.components.iter().enumerate() {
                let words = r.concepts.component_words(c).join("|||");
                let (best, cos, jac) =
                    al.map_or((String::new(), String::new(), String::new()), |a| {
                        (
                            a.best_match
                                .get(k)
                                .map(ToString::to_string)
                                .unwrap_or_default(),
                            a.alignment
                                .get(k)
                                .map(|v| format!("{v:.6}"))
                                .unwrap_or_default(),
                            a.jaccard
                                .get(k)
                                .map(|v| format!("{v:.4}"))
                                .unwrap_or_default(),
                        )
                    });
                let _ = writeln!(
                    csv,
                    "{},{},{},{},{},{best},{cos},{jac}",
                    csv_field(&r.model),
                    l.layer,
                    c.rank,
                    c.ratio,
                    csv_field(&words)
                );
            }
        }
    }
    let mut tables = vec![(".csv".to_owned(), csv)];
    for r in &out.results {
        let size = tables::size_label(r.parameters);
        let rows: String = r
            .concepts
            .layers
            .iter()
            .map(|l| tables::concepts_rows(&r.model, &size, l, &r.concepts.words))
            .collect();
        tables.push((
            format!("_{:?}_{}.tsv", r.slot, tables::file_part(&r.model)),
            format!("{}\n{rows}", tables::CONCEPTS_HEADER),
        ));
    }
    if let Some(alignment) = &out.alignment {
        tables.push((
            "_alignment.tsv".to_owned(),
            tables::alignment_tsv(alignment),
        ));
    }
    let json = tables::concepts_json(out)?;
    write_all(dir, stem, &concepts_figure(out, layer), &tables, &json)
}

/// Kept pairs per layer × head of every model, side by side, and the change-rate bars.
pub fn heads_figure(out: &HeadsOutput) -> Figure {
    let mut panels: Vec<Figure> = out
        .results
        .iter()
        .map(|r| {
            let layers = r.pairs.layers.len();
            let mut values = Matrix::zeros(layers, r.pairs.heads);
            for (li, l) in r.pairs.layers.iter().enumerate() {
                for d in &l.dims {
                    if d.head < r.pairs.heads {
                        let v = values.get(li, d.head) + d.pairs.len() as f32;
                        values.set(li, d.head, v);
                    }
                }
            }
            Figure::Heatmap(Heatmap {
                title: format!("{:?}: {}", r.slot, r.model),
                row_labels: (0..layers).map(|l| l.to_string()).collect(),
                col_labels: (0..r.pairs.heads).map(|h| h.to_string()).collect(),
                values,
                value_label: "kept word pairs".to_owned(),
                x_label: "head".to_owned(),
                y_label: "layer".to_owned(),
                ..Heatmap::default()
            })
        })
        .collect();
    let mut rows = vec![Figure::Row(std::mem::take(&mut panels))];
    if let Some(change) = &out.change {
        let mut labels = Vec::new();
        let mut values = Vec::new();
        let mut highlighted = Vec::new();
        for g in change {
            labels.push(format!("L{}-{} instr.", g.first_layer, g.last_layer));
            values.push(g.instruction.mean as f32);
            highlighted.push(true);
            labels.push(format!("L{}-{} general", g.first_layer, g.last_layer));
            values.push(g.general.mean as f32);
            highlighted.push(false);
        }
        rows.push(Figure::Bar(BarChart {
            title: "Change rate, B relative to A (METHODS.md §3.5)".to_owned(),
            labels,
            values,
            highlighted,
            highlight_label: "instruction verbs".to_owned(),
            x_label: "layer group".to_owned(),
            y_label: "mean change rate".to_owned(),
        }));
    }
    Figure::Column(rows)
}

/// Writes the Heads export: figure, the pairs of `layer`, the change rates, JSON of everything.
pub fn write_heads(
    dir: &Path,
    stem: &str,
    out: &HeadsOutput,
    layer: usize,
) -> crate::Result<Vec<PathBuf>> {
    let mut pairs = String::from("model,layer,head,dim,rank,energy,pairs\n");
    for r in &out.results {
        if let Some(l) = r.pairs.layers.iter().find(|l| l.layer == layer) {
            for d in &l.dims {
                let text: Vec<String> = d.pairs.iter().map(|p| r.pairs.pair_text(p)).collect();
                let _ = writeln!(
                    pairs,
                    "{},{},{},{},{},{},{}",
                    csv_field(&r.model),
                    l.layer,
                    d.head,
                    d.dim,
                    d.rank,
                    d.energy,
                    csv_field(&text.join("|||"))
                );
            }
        }
    }
    let mut tables = vec![("_pairs.csv".to_owned(), pairs)];
    for r in &out.results {
        let size = tables::size_label(r.parameters);
        let rows: String = r
            .pairs
            .layers
            .iter()
            .map(|l| tables::heads_rows(&r.model, &size, l, &r.pairs.words))
            .collect();
        tables.push((
            format!("_{:?}_{}.tsv", r.slot, tables::file_part(&r.model)),
            format!("{}\n{rows}", tables::HEADS_HEADER),
        ));
    }
    if let Some(change) = &out.change {
        let mut csv = String::from("group,first_layer,last_layer,instruction_n,instruction_mean,instruction_std,general_n,general_mean,general_std,welch_t,welch_df,p,note\n");
        for g in change {
            let (t, df, p) = g.welch.map_or((f64::NAN, f64::NAN, f64::NAN), |w| {
                (w.t, w.df, w.p_two_sided)
            });
            let _ = writeln!(
                csv,
                "{},{},{},{},{},{},{},{},{},{t},{df},{p},{}",
                g.group,
                g.first_layer,
                g.last_layer,
                g.instruction.n,
                g.instruction.mean,
                g.instruction.std,
                g.general.n,
                g.general.mean,
                g.general.std,
                csv_field(&g.note().unwrap_or_default())
            );
        }
        tables.push(("_change_rate.csv".to_owned(), csv));
        tables.push((
            "_change_rate.tsv".to_owned(),
            tables::change_rate_tsv(change),
        ));
    }
    let json = tables::heads_json(out)?;
    write_all(dir, stem, &heads_figure(out), &tables, &json)
}

/// Histograms of `layer` per model, RD by layer, and the rates by layer.
pub fn consistency_figure(out: &ConsistencyOutput, layer: usize) -> Figure {
    let mut hists = Vec::new();
    let mut rd = Vec::new();
    let mut rates = Vec::new();
    for r in &out.results {
        let name = format!("{:?}: {}", r.slot, r.model);
        if let Some(rep) = &r.representations {
            if let Some(l) = rep.layers.get(layer) {
                hists.push(Figure::Histogram(Histogram {
                    title: format!("{name}, layer {layer}"),
                    x_label: "cosine distance".to_owned(),
                    y_label: "pairs".to_owned(),
                    bins: 50,
                    series: vec![
                        HistSeries {
                            name: "paraphrase".to_owned(),
                            values: l.para.clone(),
                        },
                        HistSeries {
                            name: "non-paraphrase".to_owned(),
                            values: l.non.clone(),
                        },
                    ],
                }));
            }
            rd.push(LineSeries {
                name: name.clone(),
                points: rep
                    .layers
                    .iter()
                    .map(|l| (l.layer as f32, l.rd as f32))
                    .collect(),
            });
        }
        if let Some(rc) = &r.recall {
            let pts = |v: &[f64]| {
                v.iter()
                    .enumerate()
                    .map(|(l, &x)| (l as f32, x as f32))
                    .collect()
            };
            rates.push(LineSeries {
                name: format!("{name}: attribute rate"),
                points: pts(&rc.attribute_rate),
            });
            rates.push(LineSeries {
                name: format!("{name}: ER attention"),
                points: pts(&rc.extraction_attn),
            });
        }
    }
    let mut rows = Vec::new();
    if !hists.is_empty() {
        rows.push(Figure::Row(hists));
    }
    let spread: Vec<Figure> = out
        .results
        .iter()
        .filter_map(|r| {
            let s = r.spread.as_ref()?;
            Some(Figure::Bar(BarChart {
                title: format!("{:?}: accuracy per instruction (METHODS.md §8.4)", r.slot),
                labels: (1..=s.accuracies.len())
                    .map(|k| format!("instruction {k}"))
                    .collect(),
                values: s.accuracies.iter().map(|a| a.1 as f32).collect(),
                x_label: "paraphrased instruction".to_owned(),
                y_label: "accuracy".to_owned(),
                ..BarChart::default()
            }))
        })
        .collect();
    let mut lines = Vec::new();
    if !rd.is_empty() {
        lines.push(Figure::Line(LinePlot {
            title: "Relative difference by layer (METHODS.md §7)".to_owned(),
            x_label: "layer".to_owned(),
            y_label: "RD".to_owned(),
            series: rd,
        }));
    }
    if !rates.is_empty() {
        lines.push(Figure::Line(LinePlot {
            title: "Attribute and extraction rates (METHODS.md §9)".to_owned(),
            x_label: "layer".to_owned(),
            y_label: "%".to_owned(),
            series: rates,
        }));
    }
    if !lines.is_empty() {
        rows.push(Figure::Row(lines));
    }
    if !spread.is_empty() {
        rows.push(Figure::Row(spread));
    }
    Figure::Column(rows)
}

/// Writes the Consistency export: the figure of `layer`, every measure as CSV (layer means,
/// every pair's distance, relations, accuracy per instruction, attribute and extraction rates)
/// and JSON of everything.
pub fn write_consistency(
    dir: &Path,
    stem: &str,
    out: &ConsistencyOutput,
    layer: usize,
) -> crate::Result<Vec<PathBuf>> {
    let mut by_layer = String::from("model,layer,mean_para,mean_non,rd\n");
    let mut distances = String::from("model,layer,pair_type,distance\n");
    let mut relations = String::from("model,relation,consistency,accuracy,acc_consistency\n");
    let mut instructions = String::from("model,instruction,accuracy\n");
    let mut recall = String::from("model,layer,attribute_rate,er_attn,er_mlp,er_out\n");
    for r in &out.results {
        let m = csv_field(&r.model);
        if let Some(rep) = &r.representations {
            for l in &rep.layers {
                let _ = writeln!(
                    by_layer,
                    "{m},{},{},{},{}",
                    l.layer, l.mean_para, l.mean_non, l.rd
                );
                for d in &l.para {
                    let _ = writeln!(distances, "{m},{},para,{d}", l.layer);
                }
                for d in &l.non {
                    let _ = writeln!(distances, "{m},{},non,{d}", l.layer);
                }
            }
        }
        if let Some(p) = &r.predictions {
            for x in &p.relations {
                let _ = writeln!(
                    relations,
                    "{m},{},{},{},{}",
                    csv_field(&x.relation),
                    x.metrics.consistency,
                    x.metrics.accuracy,
                    x.metrics.acc_consistency
                );
            }
        }
        if let Some(sp) = &r.spread {
            for (ins, acc) in &sp.accuracies {
                let _ = writeln!(instructions, "{m},{},{acc}", csv_field(ins));
            }
        }
        if let Some(rc) = &r.recall {
            for l in 0..rc.attribute_rate.len() {
                let _ = writeln!(
                    recall,
                    "{m},{l},{},{},{},{}",
                    rc.attribute_rate[l],
                    rc.extraction_attn[l],
                    rc.extraction_mlp[l],
                    rc.extraction_out[l]
                );
            }
        }
    }
    let json = serde_json::to_string(out)?;
    let tables = [
        ("_by_layer.csv", by_layer),
        ("_distances.csv", distances),
        ("_relations.csv", relations),
        ("_instructions.csv", instructions),
        ("_recall.csv", recall),
    ]
    .map(|(suffix, text)| (suffix.to_owned(), text));
    write_all(dir, stem, &consistency_figure(out, layer), &tables, &json)
}

/// The training curves: loss (each term and validation) and learning rate by step.
pub fn training_figure(out: &TrainOutput) -> Figure {
    let history = &out.state.history;
    #[allow(clippy::cast_precision_loss)]
    let step = |s: usize| s as f32;
    let mut loss = vec![LineSeries {
        name: "training loss".to_owned(),
        points: history
            .iter()
            .map(|r| (step(r.step), r.loss as f32))
            .collect(),
    }];
    let terms = history.first().map_or(0, |r| r.terms.len());
    if terms > 1 {
        for i in 0..terms {
            loss.push(LineSeries {
                name: history[0].terms[i].0.clone(),
                points: history
                    .iter()
                    .map(|r| {
                        (
                            step(r.step),
                            r.terms.get(i).map_or(f32::NAN, |t| t.1 as f32),
                        )
                    })
                    .collect(),
            });
        }
    }
    if !out.state.evals.is_empty() {
        loss.push(LineSeries {
            name: "validation loss".to_owned(),
            points: out
                .state
                .evals
                .iter()
                .map(|e| (step(e.step), e.loss as f32))
                .collect(),
        });
    }
    Figure::Row(vec![
        Figure::Line(LinePlot {
            title: "LoRA fine-tuning loss".to_owned(),
            x_label: "step".to_owned(),
            y_label: "cross-entropy per token".to_owned(),
            series: loss,
        }),
        Figure::Line(LinePlot {
            title: "Learning rate".to_owned(),
            x_label: "step".to_owned(),
            y_label: "learning rate".to_owned(),
            series: vec![LineSeries {
                name: "learning rate".to_owned(),
                points: history
                    .iter()
                    .map(|r| (step(r.step), r.learning_rate as f32))
                    .collect(),
            }],
        }),
    ])
}

/// Writes the curves figure of a run into its run folder (`curves.svg`, `curves.png`, beside the
/// `curves.csv` the training loop keeps): the figure of the Fine-tune export.
pub fn write_run_figure(dir: &Path, out: &TrainOutput) -> crate::Result<Vec<PathBuf>> {
    let fig = training_figure(out);
    let mut written = Vec::new();
    for ext in ["svg", "png"] {
        let path = dir.join(format!("curves.{ext}"));
        write_figure(&fig, &path)?;
        written.push(path);
    }
    Ok(written)
}

/// Writes the Fine-tune export: the curves figure, the curves table (`<stem>_curves.csv`, the
/// format of a run folder's `curves.csv`) and the run as JSON.
pub fn write_training(dir: &Path, stem: &str, out: &TrainOutput) -> crate::Result<Vec<PathBuf>> {
    let json = serde_json::to_string_pretty(out)?;
    write_all(
        dir,
        stem,
        &training_figure(out),
        &[(
            "_curves.csv".to_owned(),
            crate::train::run::curves_csv(&out.state),
        )],
        &json,
    )
}
