//! Instruction vector view (METHODS.md §4): task picker and trial settings; the AIE heatmap
//! (layers × heads) of A beside B with the vector's heads outlined and the heads both share
//! marked; the top-head table; zero-shot accuracy by edit layer with and without the vector;
//! `‖IV‖` and the `U·IV` tokens; "Save IV…" and "Export…".

use std::path::PathBuf;

use eframe::egui::{self, Align2, Color32, FontId, Pos2, Rect, Sense, Stroke, Vec2};
use serde::{Deserialize, Serialize};

use crate::analysis::iv::{HeadId, IvConfig, IvRun, TaskIv};
use crate::analysis::results::{IvOutput, IvSettings, SlotIv, TaskSource};
use crate::export;
use crate::ui::actions::Action;
use crate::ui::dialogs::DialogKind;
use crate::ui::registry::{AnalysisView, Exporter, RunCx, ViewCx};
use crate::ui::state::AppState;
use crate::ui::theme;
use crate::ui::widgets::plot::{line_plot_ui, Dash, Series};
use crate::ui::widgets::{run_row, sets_and_files_ui, RunRow};
use crate::worker::iv::SHIPPED_TASKS;
use crate::worker::{Job, JobOutput};

/// The procedure as the view offers it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Variant {
    /// METHODS.md §4.2.
    #[default]
    Todd,
    /// METHODS.md §4.3.
    FvForgetting,
}

/// The view's persisted settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct IvUi {
    /// Shipped tasks ticked.
    pub shipped: Vec<String>,
    /// Task files opened.
    pub task_files: Vec<PathBuf>,
    /// The procedure.
    pub variant: Variant,
    /// `N_mean`.
    pub n_mean: usize,
    /// `N_ie`.
    pub n_ie: usize,
    /// Demonstrations per prompt.
    pub shots: usize,
    /// Seed of the trials.
    pub seed: u64,
    /// Test queries evaluated at most.
    pub n_test: usize,
    /// Use the universal Llama-2-7b heads instead of searching.
    pub universal_llama_heads: bool,
    /// The task shown.
    pub task: usize,
}

impl Default for IvUi {
    fn default() -> Self {
        Self {
            shipped: vec!["antonym".to_owned()],
            task_files: Vec::new(),
            variant: Variant::Todd,
            n_mean: 100,
            n_ie: 25,
            shots: 10,
            seed: 42,
            n_test: 100,
            universal_llama_heads: false,
            task: 0,
        }
    }
}

impl IvUi {
    /// The settings of a run.
    pub fn settings(&self) -> IvSettings {
        let mut config = match self.variant {
            Variant::Todd => IvConfig::todd(),
            Variant::FvForgetting => IvConfig::fvforgetting(),
        };
        config.n_mean = self.n_mean.max(1);
        config.n_ie = self.n_ie.max(1);
        if self.variant == Variant::Todd {
            config.shots = self.shots;
            config.mean_shots = self.shots;
            config.eval_shots = self.shots;
        }
        config.seed = self.seed;
        config.n_test = Some(self.n_test.max(1));
        if self.universal_llama_heads {
            config.heads = Some(crate::analysis::iv::LLAMA2_7B_UNIVERSAL_HEADS.to_vec());
        }
        let mut tasks: Vec<TaskSource> = SHIPPED_TASKS
            .iter()
            .filter(|(n, _)| self.shipped.iter().any(|s| s == n))
            .map(|(n, _)| TaskSource::Shipped((*n).to_owned()))
            .collect();
        tasks.extend(self.task_files.iter().cloned().map(TaskSource::File));
        IvSettings { tasks, config }
    }
}

/// The Instruction vector view: settings in [`AppState::iv`], the last run here.
#[derive(Default)]
pub struct IvView {
    /// The last run.
    pub result: Option<Box<IvOutput>>,
    /// The model whose vector "Save IV…" writes.
    save_model: usize,
    /// The task shown (whose vector "Save IV…" writes).
    save_task: usize,
}

impl AnalysisView for IvView {
    fn id(&self) -> &'static str {
        "iv"
    }

    fn label(&self) -> &'static str {
        "Instruction vector"
    }

    fn job(&mut self, cx: &RunCx<'_>) -> Result<(Job, String), String> {
        let settings = cx.state.iv.settings();
        if settings.tasks.is_empty() {
            return Err("Choose at least one task".to_owned());
        }
        let job = Job::InstructionVectors {
            slots: cx.loaded()?,
            settings,
        };
        Ok((job, "Finding instruction-vector heads".to_owned()))
    }

    fn take(&mut self, output: JobOutput, state: &mut AppState) -> Result<(), JobOutput> {
        match output {
            JobOutput::InstructionVectors(out) => {
                state.iv.task = 0;
                self.save_model = 0;
                self.result = Some(out);
                Ok(())
            }
            other => Err(other),
        }
    }

    fn ui(&mut self, ui: &mut egui::Ui, cx: &mut ViewCx<'_>) {
        settings_ui(ui, cx, self.result.is_some());
        ui.add_space(theme::SECTION_GAP);
        let Some(out) = self.result.as_deref() else {
            ui.label(
                egui::RichText::new(
                    "Results appear here: the heads that carry the task in A and in B, and what their vector does to zero-shot prompts",
                )
                .color(theme::MUTED),
            );
            return;
        };
        let state = &mut cx.state.iv;
        let n_tasks = out.results.first().map_or(0, |r| r.run.tasks.len());
        state.task = state.task.min(n_tasks.saturating_sub(1));
        self.save_task = state.task;
        egui::ScrollArea::vertical()
            .id_salt("iv_results")
            .auto_shrink([false, false])
            .show(ui, |ui| {
                results_ui(ui, out, state, &mut self.save_model, cx.actions);
            });
    }

    fn export_stem(&self, state: &AppState) -> Option<String> {
        let out = self.result.as_ref()?;
        let task = out
            .results
            .first()
            .and_then(|r| r.run.tasks.get(state.iv.task))
            .map_or(String::new(), |t| t.task.clone());
        Some(export::comparison_stem(
            "iv",
            out.results.iter().map(|r| r.model.as_str()),
            &task,
        ))
    }

    fn exporter(&self, state: &AppState) -> Option<Exporter> {
        let out = self.result.clone()?;
        let task = state.iv.task;
        Some(Box::new(move |dir: &std::path::Path, stem: &str| {
            export::iv::write_iv(dir, stem, &out, task)
        }))
    }

    fn picked(&mut self, kind: DialogKind, path: PathBuf) -> Option<(Job, String)> {
        if kind != DialogKind::IvSave {
            return None;
        }
        let out = self.result.clone()?;
        Some((
            Job::SaveIv {
                output: out,
                model: self.save_model,
                task: self.save_task,
                path,
            },
            "Saving the instruction vector".to_owned(),
        ))
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

fn settings_ui(ui: &mut egui::Ui, cx: &mut ViewCx<'_>, has_results: bool) {
    ui.heading("Instruction vector");
    ui.label(
        egui::RichText::new(
            "Which attention heads carry an in-context task, and does their summed output make a zero-shot prompt do the task? (Todd et al. 2024; METHODS.md §4)",
        )
        .color(theme::MUTED),
    );
    let any_loaded = cx.any_loaded();
    let s = &mut cx.state.iv;
    let names: Vec<&str> = SHIPPED_TASKS.iter().map(|(n, _)| *n).collect();
    sets_and_files_ui(
        ui,
        "Tasks",
        &names,
        &mut s.shipped,
        &s.task_files,
        (
            "Open task…",
            "A JSON list of {\"input\", \"output\"} pairs (the function-vectors format)",
        ),
        DialogKind::TaskFile,
        cx.actions,
    );
    ui.horizontal_wrapped(|ui| {
        ui.label("Procedure");
        ui.selectable_value(&mut s.variant, Variant::Todd, "Todd et al. (§4.2)")
            .on_hover_text("10-shot prompts, shuffled-label corruption, replace the head output, rank by Δp(first answer token)");
        ui.selectable_value(&mut s.variant, Variant::FvForgetting, "FvForgetting code (§4.3)")
            .on_hover_text("Zero-shot mean outputs, additive patch, rank by ΔNLL of the answer, their sweep layers");
        ui.separator();
        let label = ui.label("N mean");
        ui.add(egui::DragValue::new(&mut s.n_mean).range(1..=1000))
            .labelled_by(label.id);
        let label = ui.label("N IE");
        ui.add(egui::DragValue::new(&mut s.n_ie).range(1..=500))
            .labelled_by(label.id);
        ui.add_enabled_ui(s.variant == Variant::Todd, |ui| {
            let label = ui.label("Shots");
            ui.add(egui::DragValue::new(&mut s.shots).range(0..=40))
                .labelled_by(label.id);
        });
        let label = ui.label("Test queries");
        ui.add(egui::DragValue::new(&mut s.n_test).range(1..=10_000))
            .labelled_by(label.id);
        let label = ui.label("Seed");
        ui.add(egui::DragValue::new(&mut s.seed))
            .labelled_by(label.id);
        ui.checkbox(&mut s.universal_llama_heads, "Llama-2-7b universal heads")
            .on_hover_text("Skip the search and use the 10 heads hard-coded in both reference repositories (a Llama-2-7b model only)");
    });
    let has_task = !s.shipped.is_empty() || !s.task_files.is_empty();
    run_row(
        ui,
        RunRow {
            label: "Find heads",
            can_run: any_loaded && has_task,
            has_results,
            running: cx.running,
            note: cx.note,
            hover:
                "Causal mediation over every head of every loaded model, then the zero-shot sweep",
            run: Action::Run("iv"),
        },
        cx.actions,
    );
}

fn results_ui(
    ui: &mut egui::Ui,
    out: &IvOutput,
    state: &mut IvUi,
    save_model: &mut usize,
    actions: &mut Vec<Action>,
) {
    let Some(first) = out.results.first() else {
        return;
    };
    if first.run.tasks.len() > 1 {
        ui.horizontal_wrapped(|ui| {
            ui.label("Task");
            for (i, t) in first.run.tasks.iter().enumerate() {
                ui.selectable_value(&mut state.task, i, &t.task);
            }
        });
    }
    let task = state.task;
    let shared: &[HeadId] = out.shared.get(task).map_or(&[], |v| v.as_slice());
    if let [a, b] = out.results.as_slice() {
        if let (Some(ta), Some(tb)) = (a.run.tasks.get(task), b.run.tasks.get(task)) {
            let heads: Vec<String> = shared.iter().map(|(l, h)| format!("L{l}.H{h}")).collect();
            ui.label(
                egui::RichText::new(format!(
                    "A and B share {} of their {} / {} heads{}{}",
                    shared.len(),
                    ta.top.len(),
                    tb.top.len(),
                    if heads.is_empty() { "" } else { ": " },
                    heads.join(", ")
                ))
                .strong(),
            );
        }
    }
    ui.columns(out.results.len().max(1), |columns| {
        for (column, r) in columns.iter_mut().zip(&out.results) {
            if let Some(t) = r.run.tasks.get(task) {
                model_column(column, r, &r.run, t, shared);
            }
        }
    });
    ui.add_space(theme::SECTION_GAP);
    let mut series = Vec::new();
    for r in &out.results {
        let Some(e) = r.run.tasks.get(task).and_then(|t| t.evaluation.as_ref()) else {
            continue;
        };
        let color = theme::slot_color(r.slot);
        series.push(Series {
            name: format!("{:?} with the IV", r.slot),
            color,
            points: e
                .layers
                .iter()
                .map(|l| (l.layer as f64, 100.0 * l.accuracy))
                .collect(),
            dash: Dash::Solid,
        });
        let (lo, hi) = (
            e.layers.first().map_or(0, |l| l.layer) as f64,
            e.layers.last().map_or(0, |l| l.layer) as f64,
        );
        series.push(Series {
            name: format!("{:?} without", r.slot),
            color,
            points: vec![(lo, 100.0 * e.zero_shot), (hi, 100.0 * e.zero_shot)],
            dash: Dash::Dashed,
        });
    }
    if !series.is_empty() {
        line_plot_ui(
            ui,
            "Zero-shot accuracy by edit layer",
            &series,
            "edit layer (vector added to the layer's output, last prompt token)",
            "top-1 accuracy (%)",
            false,
        );
    }
    ui.add_space(theme::SECTION_GAP);
    ui.horizontal(|ui| {
        if out.results.len() > 1 {
            ui.label("Save the vector of");
            for (i, r) in out.results.iter().enumerate() {
                ui.selectable_value(save_model, i, format!("{:?}", r.slot));
            }
        }
        let name = out
            .results
            .get(*save_model)
            .and_then(|r| r.run.tasks.get(task).map(|t| (r, t))).map_or_else(|| "iv.safetensors".to_owned(), |(r, t)| {
                format!(
                    "iv_{}_{}.safetensors",
                    export::slug(&r.model),
                    export::slug(&t.task)
                )
            });
        if ui
            .button("Save IV…")
            .on_hover_text("Write the vector, its heads and mean head outputs (.safetensors) and its description (.json), for steering and IV-guided fine-tuning")
            .clicked()
        {
            actions.push(Action::SaveDialog(DialogKind::IvSave, name));
        }
    });
}

/// One model's column: summary, the AIE grid, the top heads, the vector's read-out.
fn model_column(ui: &mut egui::Ui, r: &SlotIv, run: &IvRun, t: &TaskIv, shared: &[HeadId]) {
    ui.label(
        egui::RichText::new(format!("{:?} · {}", r.slot, r.model))
            .strong()
            .color(theme::slot_color(r.slot)),
    );
    let z = &t.sizes;
    ui.label(format!(
        "{}: train {}, valid {} ({} kept), test {}; clean top-1 {:.0}%, p(y*) clean {:.3}, corrupted {:.3}",
        t.task,
        z.train,
        z.valid,
        z.filter,
        z.test,
        100.0 * t.clean_accuracy,
        t.mean_p_clean,
        t.mean_p_corrupted
    ));
    for note in &t.notes {
        ui.label(egui::RichText::new(note).color(theme::INSTRUCTION));
    }
    let grid = if t.aie.is_empty() {
        &run.universal_aie
    } else {
        &t.aie
    };
    if grid.len() == run.layers * run.heads && !grid.is_empty() {
        aie_grid_ui(
            ui,
            &format!("AIE {:?}", r.slot),
            grid,
            run.layers,
            run.heads,
            t,
            shared,
        );
    }
    egui::Grid::new(("top_heads", r.slot as usize))
        .striped(true)
        .show(ui, |ui| {
            for h in ["#", "layer", "head", "AIE", "in both"] {
                ui.label(egui::RichText::new(h).strong());
            }
            ui.end_row();
            for (i, s) in t.top.iter().enumerate() {
                ui.label((i + 1).to_string());
                ui.label(s.layer.to_string());
                ui.label(s.head.to_string());
                ui.label(if s.score.is_nan() {
                    "given".to_owned()
                } else {
                    format!("{:.4}", s.score)
                });
                ui.label(if shared.contains(&(s.layer, s.head)) {
                    "yes"
                } else {
                    ""
                });
                ui.end_row();
            }
        });
    ui.label(format!("|IV| = {:.3}", t.iv_norm));
    let tokens: Vec<String> = t
        .vocab
        .iter()
        .map(|(tok, p)| format!("{} ({p:.2})", tok.replace('\n', "↩")))
        .collect();
    ui.label(format!("U·IV: {}", tokens.join(", ")));
    if let Some(e) = &t.evaluation {
        ui.label(
            egui::RichText::new(format!(
                "zero-shot {:.0}%, with the IV {:.0}% at layer {} · {}-shot {:.0}% ({} test queries)",
                100.0 * e.zero_shot,
                100.0 * e.best_accuracy,
                e.best_layer,
                e.few_shot_shots,
                100.0 * e.few_shot,
                e.n
            ))
            .strong(),
        );
    }
}

/// The AIE grid (layers down, heads across): the vector's heads outlined, the heads both
/// models use marked with a dot; hover reads out the cell.
fn aie_grid_ui(
    ui: &mut egui::Ui,
    name: &str,
    values: &[f32],
    rows: usize,
    cols: usize,
    t: &TaskIv,
    shared: &[HeadId],
) {
    let label_w = 34.0;
    let cell = Vec2::new(
        ((ui.available_width() - label_w - 8.0) / cols.max(1) as f32).clamp(8.0, 30.0),
        ((220.0 / rows.max(1) as f32).clamp(4.0, 14.0)).floor(),
    );
    let size = Vec2::new(label_w + cell.x * cols as f32, cell.y * rows as f32 + 16.0);
    let (rect, _) = ui.allocate_exact_size(size, Sense::hover());
    let response = ui.interact(rect, ui.scope_id().with(name), Sense::hover());
    let label = name.to_owned();
    response
        .widget_info(move || egui::WidgetInfo::labeled(egui::Role::Figure, true, label.clone()));
    let painter = ui.painter_at(rect);
    let origin = rect.min + Vec2::new(label_w, 0.0);
    let max = values.iter().fold(0f32, |m, v| m.max(v.abs()));
    let cell_rect = |i: usize, j: usize| {
        Rect::from_min_size(
            origin + Vec2::new(j as f32 * cell.x, i as f32 * cell.y),
            cell,
        )
    };
    for i in 0..rows {
        for j in 0..cols {
            painter.rect_filled(
                cell_rect(i, j),
                0.0,
                theme::diverging_color(values[i * cols + j] / max.max(1e-12)),
            );
        }
        if i % 5 == 0 {
            painter.text(
                Pos2::new(origin.x - 3.0, origin.y + (i as f32 + 0.5) * cell.y),
                Align2::RIGHT_CENTER,
                format!("L{i}"),
                FontId::proportional(9.0),
                theme::MUTED,
            );
        }
    }
    for j in (0..cols).step_by(if cols > 16 { 4 } else { 1 }) {
        painter.text(
            Pos2::new(
                origin.x + (j as f32 + 0.5) * cell.x,
                origin.y + rows as f32 * cell.y + 2.0,
            ),
            Align2::CENTER_TOP,
            format!("{j}"),
            FontId::proportional(9.0),
            theme::MUTED,
        );
    }
    for s in &t.top {
        if s.layer < rows && s.head < cols {
            let r = cell_rect(s.layer, s.head);
            painter.rect_stroke(
                r,
                0.0,
                Stroke::new(1.5, Color32::BLACK),
                egui::StrokeKind::Inside,
            );
            if shared.contains(&(s.layer, s.head)) {
                painter.circle_filled(r.center(), (cell.y * 0.25).max(1.5), Color32::BLACK);
            }
        }
    }
    let at = |p: Pos2| crate::ui::widgets::plot::grid_cell_at(origin, cell, (rows, cols), p);
    if let Some((i, j)) = response.hover_pos().and_then(at) {
        let rank = t
            .top
            .iter()
            .position(|s| s.layer == i && s.head == j)
            .map_or(String::new(), |k| format!(", vector head #{}", k + 1));
        let both = if shared.contains(&(i, j)) {
            ", in both vectors"
        } else {
            ""
        };
        response.on_hover_text_at_pointer(format!(
            "layer {i}, head {j}: AIE {:+.5}{rank}{both}",
            values[i * cols + j]
        ));
    }
    ui.label(
        egui::RichText::new(format!(
            "AIE (Δp of the first answer token): blue < 0 < red, |max| {max:.4}; outlined: the vector's heads, dot: in both"
        ))
        .small()
        .color(theme::MUTED),
    );
}
