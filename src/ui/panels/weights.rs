//! The weight-space views: Concepts (METHODS.md §2, FFN PCA components as words, A beside B with
//! B aligned to A) and Heads (§3, word pairs per head dimension; §3.5 change rates).

use std::fmt::Write as _;

use eframe::egui;

use crate::analysis::ffn_concepts::ConceptsConfig;
use crate::analysis::head_pairs::HeadsConfig;
use crate::analysis::results::{ConceptsOutput, HeadsOutput, SlotHeads};
use crate::analysis::types::Matrix;
use crate::export;
use crate::ui::actions::{Action, PendingJob};
use crate::ui::dialogs::DialogKind;
use crate::ui::registry::{AnalysisView, Exporter, RunCx, ViewCx};
use crate::ui::state::{AppState, WeightSettings};
use crate::ui::theme;
use crate::ui::widgets::plot::{count_grid_ui, grouped_bars_ui, line_plot_ui, Series};
use crate::ui::widgets::{file_row, run_row, RunRow};
use crate::wordfiles::WordSource;
use crate::worker::weights::CachePolicy;
use crate::worker::{Job, JobOutput};

/// The word list the weight views use.
fn word_source(w: &WeightSettings) -> WordSource {
    w.words_file
        .clone()
        .map_or(WordSource::Builtin, WordSource::File)
}

/// The Concepts view (METHODS.md §2): settings in [`AppState::weights`], the last result here.
#[derive(Default)]
pub struct ConceptsView {
    /// The last run.
    pub result: Option<Box<ConceptsOutput>>,
}

impl AnalysisView for ConceptsView {
    fn id(&self) -> &'static str {
        "concepts"
    }

    fn label(&self) -> &'static str {
        "Concepts"
    }

    fn job(&mut self, cx: &RunCx<'_>) -> Result<(Job, String), String> {
        let w = &cx.state.weights;
        let job = Job::Concepts {
            slots: cx.loaded()?,
            words: word_source(w),
            config: ConceptsConfig {
                top_k: w.concepts_top_k,
                max_rank: w.concepts_ranks,
            },
            cache: CachePolicy::User,
            stream: false,
        };
        Ok((job, "Computing FFN concepts".to_owned()))
    }

    fn take(&mut self, output: JobOutput, _state: &mut AppState) -> Result<(), JobOutput> {
        match output {
            JobOutput::Concepts(out) => {
                self.result = Some(out);
                Ok(())
            }
            other => Err(other),
        }
    }

    fn ui(&mut self, ui: &mut egui::Ui, cx: &mut ViewCx<'_>) {
        let any_loaded = cx.any_loaded();
        concepts_ui(
            ui,
            &mut cx.state.weights,
            any_loaded,
            self.result.as_deref(),
            cx.running,
            cx.note,
            cx.actions,
        );
    }

    fn export_stem(&self, state: &AppState) -> Option<String> {
        let out = self.result.as_ref()?;
        Some(export::comparison_stem(
            "concepts",
            out.results.iter().map(|r| r.model.as_str()),
            &format!("layer {}", state.weights.layer),
        ))
    }

    fn exporter(&self, state: &AppState) -> Option<Exporter> {
        let out = self.result.clone()?;
        let layer = state.weights.layer;
        Some(Box::new(move |dir: &std::path::Path, stem: &str| {
            export::views::write_concepts(dir, stem, &out, layer)
        }))
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// The Heads view (METHODS.md §3): settings in [`AppState::weights`], the last result here.
#[derive(Default)]
pub struct HeadsView {
    /// The last run.
    pub result: Option<Box<HeadsOutput>>,
}

impl AnalysisView for HeadsView {
    fn id(&self) -> &'static str {
        "heads"
    }

    fn label(&self) -> &'static str {
        "Heads"
    }

    fn job(&mut self, cx: &RunCx<'_>) -> Result<(Job, String), String> {
        let w = &cx.state.weights;
        let job = Job::Heads {
            slots: cx.loaded()?,
            words: word_source(w),
            vectors: w.vectors_file.clone(),
            config: HeadsConfig {
                top_k: w.heads_top_k,
                ..HeadsConfig::default()
            },
            group_size: w.group_size,
            cache: CachePolicy::User,
            stream: false,
        };
        Ok((job, "Computing head word pairs".to_owned()))
    }

    fn take(&mut self, output: JobOutput, state: &mut AppState) -> Result<(), JobOutput> {
        match output {
            JobOutput::Heads(out) => {
                self.result = Some(out);
                state.weights.head = None;
                Ok(())
            }
            other => Err(other),
        }
    }

    fn ui(&mut self, ui: &mut egui::Ui, cx: &mut ViewCx<'_>) {
        let any_loaded = cx.any_loaded();
        heads_ui(
            ui,
            &mut cx.state.weights,
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
            "heads",
            out.results.iter().map(|r| r.model.as_str()),
            "",
        ))
    }

    fn exporter(&self, state: &AppState) -> Option<Exporter> {
        let out = self.result.clone()?;
        let layer = state.weights.layer;
        Some(Box::new(move |dir: &std::path::Path, stem: &str| {
            export::views::write_heads(dir, stem, &out, layer)
        }))
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

const ROW_HEIGHT: f32 = 18.0;

const CACHED_HOVER: &str = "Run on every loaded model (cached results show at once)";

fn layer_slider(ui: &mut egui::Ui, layer: &mut usize, layers: usize) {
    if layers == 0 {
        return;
    }
    *layer = (*layer).min(layers - 1);
    ui.horizontal(|ui| {
        let label = ui.label("Layer");
        ui.add(egui::Slider::new(layer, 0..=layers - 1))
            .labelled_by(label.id);
    });
}

/// Draws the Concepts view.
fn concepts_ui(
    ui: &mut egui::Ui,
    settings: &mut WeightSettings,
    any_loaded: bool,
    results: Option<&ConceptsOutput>,
    running: Option<&PendingJob>,
    note: Option<&str>,
    actions: &mut Vec<Action>,
) {
    ui.heading("Concepts");
    ui.label(egui::RichText::new("Principal components of each FFN layer's value vectors (down_proj), described by the words whose lm_head vectors align with them (Wu et al. 2023, METHODS.md §2)").color(theme::MUTED));
    file_row(
        ui,
        "Word list",
        settings.words_file.as_deref(),
        "built-in English words",
        DialogKind::WordList,
        actions,
    );
    ui.horizontal(|ui| {
        let l = ui.label("Words per component");
        ui.add(egui::DragValue::new(&mut settings.concepts_top_k).range(1..=200))
            .labelled_by(l.id);
        let l = ui.label("Components");
        ui.add(egui::DragValue::new(&mut settings.concepts_ranks).range(1..=4096))
            .labelled_by(l.id);
    });
    run_row(
        ui,
        RunRow {
            label: "Compute concepts",
            can_run: any_loaded,
            has_results: results.is_some(),
            running,
            note,
            hover: CACHED_HOVER,
            run: Action::Run("concepts"),
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
    let layers = out
        .results
        .iter()
        .map(|r| r.concepts.layers.len())
        .max()
        .unwrap_or(0);
    layer_slider(ui, &mut settings.layer, layers);
    let layer = settings.layer;
    let series: Vec<Series> = out
        .results
        .iter()
        .filter_map(|r| {
            let l = r.concepts.layers.get(layer)?;
            Some(Series {
                name: format!("{:?}: {}", r.slot, r.model),
                color: theme::slot_color(r.slot),
                points: l
                    .ratios
                    .iter()
                    .take(50)
                    .enumerate()
                    .map(|(i, &v)| ((i + 1) as f64, v * 100.0))
                    .collect(),
                dash: crate::ui::widgets::plot::Dash::Solid,
            })
        })
        .collect();
    line_plot_ui(
        ui,
        &format!("Variance spectrum, layer {layer}"),
        &series,
        "component",
        "variance % (log)",
        true,
    );
    ui.label(egui::RichText::new(format!("Words from: {}", out.words)).color(theme::MUTED));
    ui.columns(out.results.len().max(1), |columns| {
        for (index, (column, r)) in columns.iter_mut().zip(&out.results).enumerate() {
            column.label(
                egui::RichText::new(format!(
                    "{:?} · {}{}",
                    r.slot,
                    r.model,
                    if r.cached { " (cached)" } else { "" }
                ))
                .strong()
                .color(theme::slot_color(r.slot)),
            );
            let Some(l) = r.concepts.layers.get(layer) else {
                continue;
            };
            let alignment = (index == 1)
                .then(|| out.alignment.as_ref().and_then(|a| a.get(layer)))
                .flatten();
            if alignment.is_some() {
                column.label(
                    egui::RichText::new(
                        "[A#s c Jj] after each component: its best-matching A component s, their |cosine| c and the Jaccard overlap j of their top words (§2.3 extension, not in the original method)",
                    )
                    .color(theme::MUTED),
                );
            }
            egui::ScrollArea::vertical()
                .id_salt(("concepts", index))
                .max_height(420.0)
                .show_rows(column, ROW_HEIGHT, l.components.len(), |ui, range| {
                    for k in range {
                        let c = &l.components[k];
                        let words = r.concepts.component_words(c);
                        let mut text = format!(
                            "#{} {:.2}%  {}",
                            c.rank,
                            c.ratio * 100.0,
                            words.iter().take(8).copied().collect::<Vec<_>>().join(", ")
                        );
                        if let Some(a) = alignment {
                            if let (Some(best), Some(cos), Some(jac)) =
                                (a.best_match.get(k), a.alignment.get(k), a.jaccard.get(k))
                            {
                                let _ = write!(text, "   [A#{best} {cos:.2} J{jac:.2}]");
                            }
                        }
                        ui.add(egui::Label::new(text).truncate())
                            .on_hover_text(words.join(", "));
                    }
                });
        }
    });
}

/// `mean ± std`, or "-" for no words (no head changed for any of them).
fn mean_std(s: &crate::analysis::stats::Summary) -> String {
    match (s.n, s.std.is_finite()) {
        (0, _) => "-".to_owned(),
        (_, false) => format!("{:.3}", s.mean),
        _ => format!("{:.3} ± {:.3}", s.mean, s.std),
    }
}

/// Kept pairs per (layer, head) of one result.
/// The `(layer, head)` cells with a word pair containing `needle` (lower case); none for an
/// empty needle.
fn heads_with_word(r: &SlotHeads, needle: &str) -> Vec<(usize, usize)> {
    if needle.is_empty() {
        return Vec::new();
    }
    let mut out = Vec::new();
    for (li, l) in r.pairs.layers.iter().enumerate() {
        for d in &l.dims {
            let hit = d
                .pairs
                .iter()
                .any(|p| r.pairs.pair_text(p).to_lowercase().contains(needle));
            if hit && !out.contains(&(li, d.head)) {
                out.push((li, d.head));
            }
        }
    }
    out
}

fn pair_counts(r: &SlotHeads) -> Matrix {
    let mut m = Matrix::zeros(r.pairs.layers.len(), r.pairs.heads);
    for (li, l) in r.pairs.layers.iter().enumerate() {
        for d in &l.dims {
            if d.head < r.pairs.heads {
                m.set(li, d.head, m.get(li, d.head) + d.pairs.len() as f32);
            }
        }
    }
    m
}

/// Draws the Heads view.
fn heads_ui(
    ui: &mut egui::Ui,
    settings: &mut WeightSettings,
    any_loaded: bool,
    results: Option<&HeadsOutput>,
    running: Option<&PendingJob>,
    note: Option<&str>,
    actions: &mut Vec<Action>,
) {
    ui.heading("Heads");
    ui.label(egui::RichText::new("Word pairs of each attention head's QK circuit, per dimension (Wu et al. 2023, METHODS.md §3); with A and B, the instruction-verb change rate (§3.5)").color(theme::MUTED));
    file_row(
        ui,
        "Word list",
        settings.words_file.as_deref(),
        "built-in English words",
        DialogKind::WordList,
        actions,
    );
    file_row(
        ui,
        "Word vectors",
        settings.vectors_file.as_deref(),
        "none: the model's own input embeddings (deviation from §3.1)",
        DialogKind::WordVectors,
        actions,
    );
    ui.horizontal(|ui| {
        let l = ui.label("Words per dimension");
        ui.add(egui::DragValue::new(&mut settings.heads_top_k).range(1..=1000))
            .labelled_by(l.id);
        let l = ui.label("Layers per group");
        ui.add(egui::DragValue::new(&mut settings.group_size).range(1..=64))
            .labelled_by(l.id);
    });
    run_row(
        ui,
        RunRow {
            label: "Compute head pairs",
            can_run: any_loaded,
            has_results: results.is_some(),
            running,
            note,
            hover: CACHED_HOVER,
            run: Action::Run("heads"),
        },
        actions,
    );
    ui.add_space(theme::SECTION_GAP);
    let Some(out) = results else {
        ui.label(
            egui::RichText::new("Results appear here: one grid per loaded model; click a head")
                .color(theme::MUTED),
        );
        return;
    };
    egui::ScrollArea::vertical().id_salt("heads_results").auto_shrink([false, false]).show(ui, |ui| {
        if let Some(first) = out.results.first() {
            ui.label(egui::RichText::new(first.pairs.source.label()).color(theme::MUTED));
        }
        ui.horizontal(|ui| {
            let l = ui.label("Find word");
            ui.add(egui::TextEdit::singleline(&mut settings.search).desired_width(160.0)).labelled_by(l.id)
                .on_hover_text("Outlines the heads whose word pairs contain it, and filters the selected head's table");
        });
        let needle = settings.search.trim().to_lowercase();
        ui.columns(out.results.len().max(1), |columns| {
            for (index, (column, r)) in columns.iter_mut().zip(&out.results).enumerate() {
                column.label(egui::RichText::new(format!("{:?} · {}{}", r.slot, r.model, if r.cached { " (cached)" } else { "" })).strong().color(theme::slot_color(r.slot)));
                let selected = settings.head.filter(|h| h.0 == index).map(|h| (h.1, h.2));
                let matches = heads_with_word(r, &needle);
                if !needle.is_empty() {
                    column.label(egui::RichText::new(format!("{} heads have a pair with '{}'", matches.len(), settings.search.trim())).color(theme::MUTED));
                }
                let (_, clicked) = count_grid_ui(column, &format!("Head pair counts {:?}", r.slot), &pair_counts(r), ("layer", "head"), selected, &matches);
                if let Some((layer, head)) = clicked {
                    settings.head = Some((index, layer, head));
                }
            }
        });
        if let Some((index, layer, head)) = settings.head {
            if let Some(r) = out.results.get(index) {
                ui.add_space(theme::SECTION_GAP);
                ui.label(egui::RichText::new(format!("{:?} · layer {layer}, head {head}", r.slot)).strong());
                let rows: Vec<String> = r
                    .pairs
                    .layers
                    .get(layer)
                    .map(|l| {
                        l.head(head)
                            .map(|d| {
                                let pairs: Vec<String> = d.pairs.iter().map(|p| r.pairs.pair_text(p)).collect();
                                format!("rank {} · dim {} · energy {:.2} · {}", d.rank, d.dim, d.energy, if pairs.is_empty() { "no pairs".to_owned() } else { pairs.join(", ") })
                            })
                            .filter(|t| needle.is_empty() || t.to_lowercase().contains(&needle))
                            .collect()
                    })
                    .unwrap_or_default();
                egui::ScrollArea::vertical().id_salt("pair_table").max_height(300.0).show_rows(ui, ROW_HEIGHT, rows.len(), |ui, range| {
                    for row in &rows[range] {
                        ui.add(egui::Label::new(row.as_str()).truncate());
                    }
                });
            }
        }
        if let Some(change) = &out.change {
            ui.add_space(theme::SECTION_GAP);
            ui.label(egui::RichText::new("Change rate of instruction verbs vs general verbs, B relative to A (METHODS.md §3.5)").strong());
            egui::Grid::new("change_rate").striped(true).show(ui, |ui| {
                for h in ["layers", "instruction n", "mean ± std", "general n", "mean ± std", "Welch t", "df", "p"] {
                    ui.label(egui::RichText::new(h).strong());
                }
                ui.end_row();
                for g in change {
                    ui.label(format!("{}-{}", g.first_layer, g.last_layer));
                    ui.label(g.instruction.n.to_string());
                    ui.label(mean_std(&g.instruction));
                    ui.label(g.general.n.to_string());
                    ui.label(mean_std(&g.general));
                    if let Some(w) = &g.welch {
                        ui.label(format!("{:.2}", w.t));
                        ui.label(format!("{:.1}", w.df));
                        ui.label(format!("{:.3}", w.p_two_sided));
                    } else {
                        ui.label("-");
                        ui.label("-");
                        ui.label("-");
                    }
                    ui.end_row();
                }
            });
            // Empty groups and missing tests say why, instead of a row of dashes.
            for g in change {
                if let Some(note) = g.note() {
                    ui.label(egui::RichText::new(note).weak());
                }
            }
            let groups: Vec<String> = change.iter().map(|g| format!("L{}-{}", g.first_layer, g.last_layer)).collect();
            let series = vec![
                ("instruction verbs", theme::INSTRUCTION, change.iter().map(|g| (g.instruction.mean, g.instruction.std)).collect()),
                ("general verbs", theme::BAR, change.iter().map(|g| (g.general.mean, g.general.std)).collect()),
            ];
            grouped_bars_ui(ui, "Change rate by layer group", &groups, &series, "mean change rate");
        }
    });
}
