//! Consistency view (METHODS.md §7–§9): per-layer histograms of paraphrase and non-paraphrase
//! distances, the relative difference by layer for A and B, the relation table of prediction
//! consistency, the accuracy spread across paraphrased instructions, and the attribute and
//! extraction rates by layer.

use eframe::egui;

use crate::analysis::consistency::Pooling;
use crate::analysis::results::{ConsistencyOutput, ConsistencySettings, Measures};
use crate::export;
use crate::ui::actions::{Action, PendingJob};
use crate::ui::dialogs::DialogKind;
use crate::ui::registry::{AnalysisView, Exporter, RunCx, ViewCx};
use crate::ui::state::{AppState, ConsistencyUi};
use crate::ui::theme;
use crate::ui::widgets::plot::{box_plot_ui, histogram_ui, line_plot_ui, Dash, Series};
use crate::ui::widgets::{file_row, run_row, RunRow};
use crate::worker::{Job, JobOutput};

/// The Consistency view (METHODS.md §7–§9): settings in [`AppState::consistency`], the last
/// result here.
#[derive(Default)]
pub struct ConsistencyView {
    /// The last run.
    pub result: Option<Box<ConsistencyOutput>>,
}

impl AnalysisView for ConsistencyView {
    fn id(&self) -> &'static str {
        "consistency"
    }

    fn label(&self) -> &'static str {
        "Consistency"
    }

    fn job(&mut self, cx: &RunCx<'_>) -> Result<(Job, String), String> {
        let c = &cx.state.consistency;
        let settings = ConsistencySettings {
            pairs: c.pairs_file.clone(),
            facts: c.facts_file.clone(),
            pooling: if c.last_token {
                Pooling::Last
            } else {
                Pooling::Mean
            },
            measures: Measures {
                representations: c.representations,
                predictions: c.predictions,
                spread: c.spread,
                recall: c.recall,
            },
            ..ConsistencySettings::default()
        };
        let m = settings.measures;
        if !(m.representations || m.predictions || m.spread || m.recall) {
            return Err("Choose at least one consistency measure".to_owned());
        }
        let job = Job::Consistency {
            slots: cx.loaded()?,
            settings,
        };
        Ok((job, "Running consistency measures".to_owned()))
    }

    fn on_event(&mut self, event: &crate::worker::Event) {
        // Each measure's section appears as soon as it finishes.
        if let crate::worker::Event::Partial {
            output: JobOutput::Consistency(out),
            ..
        } = event
        {
            self.result = Some(out.clone());
        }
    }

    fn take(&mut self, output: JobOutput, _state: &mut AppState) -> Result<(), JobOutput> {
        match output {
            JobOutput::Consistency(out) => {
                self.result = Some(out);
                Ok(())
            }
            other => Err(other),
        }
    }

    fn ui(&mut self, ui: &mut egui::Ui, cx: &mut ViewCx<'_>) {
        let any_loaded = cx.any_loaded();
        consistency_ui(
            ui,
            &mut cx.state.consistency,
            any_loaded,
            self.result.as_deref(),
            cx.running,
            cx.note,
            cx.actions,
        );
    }

    fn export_stem(&self, _state: &AppState) -> Option<String> {
        let out = self.result.as_ref()?;
        Some(export::comparison_stem(
            "consistency",
            out.results.iter().map(|r| r.model.as_str()),
            "",
        ))
    }

    fn exporter(&self, state: &AppState) -> Option<Exporter> {
        let out = self.result.clone()?;
        let layer = state.consistency.layer;
        Some(Box::new(move |dir: &std::path::Path, stem: &str| {
            export::views::write_consistency(dir, stem, &out, layer)
        }))
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// Draws the Consistency view.
fn consistency_ui(
    ui: &mut egui::Ui,
    settings: &mut ConsistencyUi,
    any_loaded: bool,
    results: Option<&ConsistencyOutput>,
    running: Option<&PendingJob>,
    note: Option<&str>,
    actions: &mut Vec<Action>,
) {
    ui.heading("Consistency");
    ui.label(egui::RichText::new("Do paraphrases sit closer than non-paraphrases, and do factual answers agree across rewordings? (Fierro et al. 2024, METHODS.md §7–§9)").color(theme::MUTED));
    file_row(
        ui,
        "Paraphrase pairs",
        settings.pairs_file.as_deref(),
        "shipped set (sample_prompts/paraphrases.tsv)",
        DialogKind::PairsFile,
        actions,
    );
    file_row(
        ui,
        "Factual probes",
        settings.facts_file.as_deref(),
        "shipped set (sample_prompts/facts.json)",
        DialogKind::FactsFile,
        actions,
    );
    ui.horizontal_wrapped(|ui| {
        ui.label("Measures");
        ui.checkbox(&mut settings.representations, "Representations (§7)");
        ui.checkbox(&mut settings.predictions, "Predictions (§8)");
        ui.checkbox(
            &mut settings.spread,
            "Accuracy across instructions (§8.4, slower)",
        );
        ui.checkbox(&mut settings.recall, "Attribute and extraction rates (§9)")
            .on_hover_text("Runs the §8 predictions too: they pick the facts a model knows");
    });
    ui.horizontal(|ui| {
        ui.label("Pooling");
        ui.selectable_value(&mut settings.last_token, false, "Mean of tokens");
        ui.selectable_value(&mut settings.last_token, true, "Last token");
    });
    let any_measure =
        settings.representations || settings.predictions || settings.spread || settings.recall;
    run_row(
        ui,
        RunRow {
            label: "Run consistency",
            can_run: any_loaded && any_measure,
            has_results: results.is_some(),
            running,
            note,
            hover: "Run the chosen measures on every loaded model",
            run: Action::Run("consistency"),
        },
        actions,
    );
    ui.add_space(theme::SECTION_GAP);
    let Some(out) = results else {
        ui.label(
            egui::RichText::new("Results appear here: one column per loaded model")
                .color(theme::MUTED),
        );
        return;
    };
    egui::ScrollArea::vertical()
        .id_salt("consistency_results")
        .auto_shrink([false, false])
        .show(ui, |ui| {
            let layers = out
                .results
                .iter()
                .filter_map(|r| r.representations.as_ref())
                .map(|r| r.layers.len())
                .max()
                .unwrap_or(0);
            if layers > 0 {
                settings.layer = settings.layer.min(layers - 1);
                ui.horizontal(|ui| {
                    let l = ui.label("Layer");
                    ui.add(egui::Slider::new(&mut settings.layer, 0..=layers - 1))
                        .labelled_by(l.id);
                });
                let layer = settings.layer;
                ui.columns(out.results.len().max(1), |columns| {
                    for (column, r) in columns.iter_mut().zip(&out.results) {
                        column.label(
                            egui::RichText::new(format!("{:?} · {}", r.slot, r.model))
                                .strong()
                                .color(theme::slot_color(r.slot)),
                        );
                        let Some(l) = r.representations.as_ref().and_then(|x| x.layers.get(layer))
                        else {
                            continue;
                        };
                        column.label(format!(
                            "P {:.4} · N {:.4} · RD {:.3}",
                            l.mean_para, l.mean_non, l.rd
                        ));
                        histogram_ui(
                            column,
                            &format!("Distance histogram {:?}", r.slot),
                            &[
                                ("paraphrase", theme::CATEGORY_1, &l.para),
                                ("non-paraphrase", theme::CATEGORY_2, &l.non),
                            ],
                            50,
                            "cosine distance",
                        );
                    }
                });
                let series: Vec<Series> = out
                    .results
                    .iter()
                    .filter_map(|r| {
                        let rep = r.representations.as_ref()?;
                        Some(Series {
                            name: format!("{:?}: {}", r.slot, r.model),
                            color: theme::slot_color(r.slot),
                            points: rep.layers.iter().map(|l| (l.layer as f64, l.rd)).collect(),
                            dash: Dash::Solid,
                        })
                    })
                    .collect();
                line_plot_ui(
                    ui,
                    "Relative difference by layer",
                    &series,
                    "layer",
                    "RD = (N - P) / N",
                    false,
                );
            }
            let preds: Vec<_> = out
                .results
                .iter()
                .filter_map(|r| r.predictions.as_ref().map(|p| (r, p)))
                .collect();
            if let Some((_, first)) = preds.first() {
                ui.add_space(theme::SECTION_GAP);
                ui.label(
                    egui::RichText::new(format!("Prediction consistency (§8), {:?}", first.mode))
                        .strong(),
                );
                egui::Grid::new("relations").striped(true).show(ui, |ui| {
                    ui.label(egui::RichText::new("relation").strong());
                    for (r, _) in &preds {
                        ui.label(
                            egui::RichText::new(format!(
                                "{:?} consistency / accuracy / acc-cons.",
                                r.slot
                            ))
                            .strong(),
                        );
                    }
                    ui.end_row();
                    for (k, rel) in first.relations.iter().enumerate() {
                        ui.label(&rel.relation);
                        for (_, p) in &preds {
                            if let Some(x) = p.relations.get(k) {
                                ui.label(format!(
                                    "{:.3} / {:.3} / {:.3}",
                                    x.metrics.consistency,
                                    x.metrics.accuracy,
                                    x.metrics.acc_consistency
                                ));
                            }
                        }
                        ui.end_row();
                    }
                    ui.label(egui::RichText::new("macro average").strong());
                    for (_, p) in &preds {
                        ui.label(
                            egui::RichText::new(format!(
                                "{:.3} / {:.3} / {:.3}",
                                p.macro_avg.consistency,
                                p.macro_avg.accuracy,
                                p.macro_avg.acc_consistency
                            ))
                            .strong(),
                        );
                    }
                    ui.end_row();
                });
            }
            let spreads: Vec<_> = out
                .results
                .iter()
                .filter_map(|r| r.spread.as_ref().map(|s| (r, s)))
                .collect();
            if !spreads.is_empty() {
                ui.add_space(theme::SECTION_GAP);
                ui.label(
                    egui::RichText::new("Accuracy across paraphrased instructions (§8.4)").strong(),
                );
                for (r, s) in &spreads {
                    ui.label(format!(
                        "{:?}: mean {:.3} ± {:.3}, min {:.3}, max {:.3}, range {:.3}",
                        r.slot, s.summary.mean, s.summary.std, s.min, s.max, s.range
                    ));
                }
                let groups: Vec<(String, egui::Color32, Vec<f64>)> = spreads
                    .iter()
                    .map(|(r, s)| {
                        (
                            format!("{:?}", r.slot),
                            theme::slot_color(r.slot),
                            s.accuracies.iter().map(|a| a.1).collect(),
                        )
                    })
                    .collect();
                box_plot_ui(
                    ui,
                    "Accuracy across instructions",
                    &groups,
                    "accuracy per instruction",
                );
            }
            let recalls: Vec<_> = out
                .results
                .iter()
                .filter_map(|r| r.recall.as_ref().map(|x| (r, x)))
                .collect();
            if !recalls.is_empty() {
                ui.add_space(theme::SECTION_GAP);
                ui.label(
                    egui::RichText::new(
                        "Attribute rate at the subject and extraction rates at the last token (§9)",
                    )
                    .strong(),
                );
                let mut series = Vec::new();
                for (r, x) in &recalls {
                    let pts = |v: &[f64]| {
                        v.iter()
                            .enumerate()
                            .map(|(l, &y)| (l as f64, y))
                            .collect::<Vec<_>>()
                    };
                    let c = theme::slot_color(r.slot);
                    series.push(Series {
                        name: format!("{:?} attribute rate", r.slot),
                        color: c,
                        points: pts(&x.attribute_rate),
                        dash: Dash::Solid,
                    });
                    series.push(Series {
                        name: format!("{:?} ER attention", r.slot),
                        color: c,
                        points: pts(&x.extraction_attn),
                        dash: Dash::Dashed,
                    });
                    series.push(Series {
                        name: format!("{:?} ER MLP", r.slot),
                        color: c,
                        points: pts(&x.extraction_mlp),
                        dash: Dash::Dotted,
                    });
                    ui.label(format!(
                        "{:?}: {} known-fact prompts, {} with descriptions",
                        r.slot, x.probes, x.attribute_probes
                    ));
                }
                line_plot_ui(
                    ui,
                    "Attribute and extraction rates",
                    &series,
                    "layer",
                    "%",
                    false,
                );
            }
        });
}
