//! Attribution view (METHODS.md §1): for the shared prompt, each loaded model's gradient × input
//! heatmap (prompt words × response words), its importance density with instruction words
//! highlighted (click a bar to mark or unmark one) and its instruction score, A beside B.

use eframe::egui;

use crate::analysis::attribution::{
    by_words, set_instruction_mask, AttributionConfig, Instructions,
};
use crate::analysis::results::SlotAttribution;
use crate::analysis::types::{display_token, Attribution};
use crate::export;
use crate::ui::actions::{Action, PendingJob};
use crate::ui::app::SlotView;
use crate::ui::registry::{AnalysisView, Exporter, RunCx, ViewCx};
use crate::ui::state::{AppState, AttributionSettings, InstructionSource};
use crate::ui::theme;
use crate::ui::widgets::heatmap::{bars_ui, heatmap_ui, BarsData, HeatmapData};
use crate::ui::widgets::job_progress;
use crate::worker::{Job, JobOutput};

/// The attributions of the last run, with display caches.
#[derive(Clone, Debug)]
pub struct AttributionResults {
    /// The prompt they explain.
    pub prompt: String,
    /// Token-level results, one per model, with the user's instruction marks.
    pub results: Vec<SlotAttribution>,
    words: Vec<Attribution>,
}

impl AttributionResults {
    /// Wraps finished results.
    pub fn new(prompt: String, results: Vec<SlotAttribution>) -> Self {
        let words = results
            .iter()
            .map(|r| by_words(&r.attribution, &AttributionConfig::default()))
            .collect();
        Self {
            prompt,
            results,
            words,
        }
    }

    /// Result `index` at word or token level.
    pub fn shown(&self, index: usize, word_level: bool) -> &Attribution {
        if word_level {
            &self.words[index]
        } else {
            &self.results[index].attribution
        }
    }

    /// The rows of `shown(index, word_level)` to draw: all of them, or without the chat
    /// template's tokens (a word is hidden when all its tokens are).
    pub fn visible_rows(&self, index: usize, settings: &AttributionSettings) -> Vec<usize> {
        let (word_level, hide_template) = (settings.word_level, settings.hide_template);
        let Some(r) = self.results.get(index) else {
            return Vec::new();
        };
        let shown = self.shown(index, word_level);
        let n = shown.input_tokens.len();
        let template = |t: usize| r.template_mask.get(t).copied().unwrap_or(false);
        if !hide_template || !r.template_mask.iter().any(|&m| m) {
            return (0..n).collect();
        }
        if word_level {
            shown
                .input_words
                .iter()
                .enumerate()
                .filter(|(_, w)| !(w.start..w.end).all(template))
                .map(|(i, _)| i)
                .take(n)
                .collect()
        } else {
            (0..n).filter(|&t| !template(t)).collect()
        }
    }

    /// Flips the instruction mark of shown row `row` (a whole word at word level) and updates
    /// the score.
    pub fn toggle(&mut self, index: usize, row: usize, word_level: bool) {
        let Some(result) = self.results.get_mut(index) else {
            return;
        };
        let a = &mut result.attribution;
        let tokens = if word_level {
            match self.words[index].input_words.get(row) {
                Some(word) => word.start..word.end,
                None => return,
            }
        } else {
            row..row + 1
        };
        let mut mask = a
            .instruction_mask
            .clone()
            .unwrap_or_else(|| vec![false; a.input_ids.len()]);
        let Some(current) = mask.get(tokens.clone()) else {
            return;
        };
        let marked = !current.iter().any(|&m| m);
        mask[tokens].iter_mut().for_each(|m| *m = marked);
        set_instruction_mask(a, Some(mask));
        self.words[index] = by_words(a, &AttributionConfig::default());
    }
}

/// The Attribution view: its settings live in [`AppState::attribution`], its last result here.
#[derive(Default)]
pub struct AttributionView {
    /// The last run.
    pub results: Option<AttributionResults>,
}

impl AnalysisView for AttributionView {
    fn id(&self) -> &'static str {
        "attribution"
    }

    fn label(&self) -> &'static str {
        "Attribution"
    }

    fn job(&mut self, cx: &RunCx<'_>) -> Result<(Job, String), String> {
        let slots = cx.loaded_with_prompt()?;
        let settings = &cx.state.attribution;
        if settings.pin_response && settings.response.trim().is_empty() {
            return Err("The pinned response is empty".to_owned());
        }
        let instructions = match settings.instructions {
            InstructionSource::Auto => Instructions::Auto,
            InstructionSource::Off => Instructions::Spans(Vec::new()),
            InstructionSource::Typed => Instructions::Spans(
                settings
                    .spans
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .map(str::to_owned)
                    .collect(),
            ),
        };
        let job = Job::Attribute {
            slots,
            prompt: cx.state.prompt.clone(),
            response: settings
                .pin_response
                .then(|| settings.response.trim().to_owned()),
            chat: cx.state.chat,
            instructions,
            max_new_tokens: settings.max_new_tokens,
        };
        Ok((job, "Attributing".to_owned()))
    }

    fn take(&mut self, output: JobOutput, state: &mut AppState) -> Result<(), JobOutput> {
        match output {
            JobOutput::Attributed(results) => {
                self.results = Some(AttributionResults::new(state.prompt.clone(), results));
                Ok(())
            }
            other => Err(other),
        }
    }

    fn ui(&mut self, ui: &mut egui::Ui, cx: &mut ViewCx<'_>) {
        let toggles = attribution_ui(
            ui,
            cx.state,
            cx.slots,
            self.results.as_ref(),
            cx.running,
            cx.note,
            cx.actions,
        );
        let word_level = cx.state.attribution.word_level;
        if let Some(results) = &mut self.results {
            for (index, row) in toggles {
                results.toggle(index, row, word_level);
            }
        }
    }

    fn export_stem(&self, _state: &AppState) -> Option<String> {
        let results = self.results.as_ref()?;
        Some(export::comparison_stem(
            "attribution",
            results.results.iter().map(|r| r.model.as_str()),
            &results.prompt,
        ))
    }

    fn exporter(&self, state: &AppState) -> Option<Exporter> {
        let results = self.results.as_ref()?;
        let word_level = state.attribution.word_level;
        // As shown: word or token level, with the user's instruction marks.
        let items: Vec<(String, Attribution)> = results
            .results
            .iter()
            .enumerate()
            .map(|(i, r)| {
                (
                    format!("{:?}: {}", r.slot, r.model),
                    results.shown(i, word_level).clone(),
                )
            })
            .collect();
        Some(Box::new(move |dir: &std::path::Path, stem: &str| {
            let refs: Vec<(String, &Attribution)> =
                items.iter().map(|(l, a)| (l.clone(), a)).collect();
            export::write_attribution(dir, stem, &refs)
        }))
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// Draws the Attribution view; returns the density bars clicked (result index, shown row).
fn attribution_ui(
    ui: &mut egui::Ui,
    state: &mut AppState,
    slots: &[SlotView; 2],
    results: Option<&AttributionResults>,
    running: Option<&PendingJob>,
    export_note: Option<&str>,
    actions: &mut Vec<Action>,
) -> Vec<(usize, usize)> {
    let mut toggles = Vec::new();
    ui.heading("Attribution");
    ui.label(
        egui::RichText::new(
            "Gradient × input of each response token's probability on the prompt tokens \
             (Wu et al. 2023): which prompt words the response depends on",
        )
        .color(theme::MUTED),
    );
    let label = ui.label("Prompt");
    ui.add(
        egui::TextEdit::multiline(&mut state.prompt)
            .desired_rows(2)
            .desired_width(f32::INFINITY),
    )
    .labelled_by(label.id);
    let settings = &mut state.attribution;
    ui.horizontal_wrapped(|ui| {
        ui.checkbox(&mut state.chat, "Chat template");
        ui.separator();
        ui.label("Response");
        ui.radio_value(&mut settings.pin_response, false, "Each model's own");
        ui.radio_value(&mut settings.pin_response, true, "Pinned for both");
        ui.add_enabled_ui(!settings.pin_response, |ui| {
            let label = ui.label("Max new tokens");
            ui.add(egui::DragValue::new(&mut settings.max_new_tokens).range(1..=1024))
                .labelled_by(label.id);
        });
    });
    if settings.pin_response {
        let label = ui.label("Pinned response");
        ui.add(
            egui::TextEdit::multiline(&mut settings.response)
                .desired_rows(2)
                .desired_width(f32::INFINITY)
                .hint_text("The response both models are explained on"),
        )
        .labelled_by(label.id);
    }
    ui.horizontal_wrapped(|ui| {
        ui.label("Instruction words");
        ui.radio_value(
            &mut settings.instructions,
            InstructionSource::Auto,
            "Sentences with an instruction verb",
        )
        .on_hover_text("METHODS.md §3.5's verb lists, each extended to its sentence");
        ui.radio_value(
            &mut settings.instructions,
            InstructionSource::Typed,
            "Typed",
        );
        ui.radio_value(&mut settings.instructions, InstructionSource::Off, "None");
    });
    if settings.instructions == InstructionSource::Typed {
        let label = ui.label("Instruction spans (one per line)");
        ui.add(
            egui::TextEdit::multiline(&mut settings.spans)
                .desired_rows(2)
                .desired_width(f32::INFINITY),
        )
        .labelled_by(label.id);
    }
    ui.horizontal(|ui| {
        let any_loaded = slots.iter().any(|s| s.info.is_some());
        if ui
            .add_enabled(
                any_loaded && running.is_none(),
                egui::Button::new("Attribute"),
            )
            .on_hover_text("Attribute with every loaded model")
            .on_disabled_hover_text("Load a model first, or wait for the running job")
            .clicked()
        {
            actions.push(Action::Run("attribution"));
        }
        if let Some(job) = running {
            job_progress(ui, job, actions);
        }
        ui.separator();
        ui.selectable_value(&mut settings.word_level, true, "Words");
        ui.selectable_value(&mut settings.word_level, false, "Tokens");
        ui.checkbox(&mut settings.hide_template, "Hide chat-template tokens")
            .on_hover_text("Show only the rows of your prompt (the template's system prompt and markers are left out of the heatmap and the density)");
        ui.separator();
        if ui
            .add_enabled(results.is_some(), egui::Button::new("Export…"))
            .on_hover_text("Save the figure (SVG, PNG) and the data (CSV, JSON)")
            .clicked()
        {
            actions.push(Action::ExportDialog);
        }
        if let Some(note) = export_note {
            ui.label(egui::RichText::new(note).color(theme::MUTED));
        }
    });
    ui.add_space(theme::SECTION_GAP);
    let Some(results) = results else {
        ui.label(
            egui::RichText::new("Results appear here: one column per loaded model")
                .color(theme::MUTED),
        );
        return toggles;
    };
    let word_level = settings.word_level;
    egui::ScrollArea::vertical()
        .id_salt("attribution_results")
        .auto_shrink([false, false])
        .show(ui, |ui| {
            let n = results.results.len().max(1);
            ui.columns(n, |columns| {
                for (index, column) in columns.iter_mut().enumerate() {
                    let Some(result) = results.results.get(index) else {
                        continue;
                    };
                    let all = results.shown(index, word_level);
                    let visible = results.visible_rows(index, settings);
                    let filtered;
                    let shown = if visible.len() == all.input_tokens.len() {
                        all
                    } else {
                        filtered = select_rows(all, &visible);
                        &filtered
                    };
                    let slot = result.slot;
                    column.label(
                        egui::RichText::new(format!("{slot:?} · {}", result.model))
                            .strong()
                            .color(theme::slot_color(slot)),
                    );
                    let mut clicked = Vec::new();
                    result_ui(
                        column,
                        (index, n),
                        &format!("{slot:?}"),
                        &result.response,
                        shown,
                        word_level,
                        &mut clicked,
                    );
                    // Rows clicked in the shown (maybe filtered) chart, as rows of the result.
                    toggles.extend(
                        clicked
                            .into_iter()
                            .filter_map(|(i, row)| visible.get(row).map(|&r| (i, r))),
                    );
                }
            });
        });
    toggles
}

/// `a` with only input rows `rows` (tokens or words), for drawing.
fn select_rows(a: &Attribution, rows: &[usize]) -> Attribution {
    let pick = |m: &crate::analysis::types::Matrix| {
        if m.rows != a.input_tokens.len() {
            return m.clone();
        }
        crate::analysis::types::Matrix {
            rows: rows.len(),
            cols: m.cols,
            data: rows.iter().flat_map(|&r| m.row(r).to_vec()).collect(),
        }
    };
    let take = |v: &[String]| rows.iter().filter_map(|&r| v.get(r).cloned()).collect();
    Attribution {
        input_ids: rows
            .iter()
            .filter_map(|&r| a.input_ids.get(r).copied())
            .collect(),
        input_tokens: take(&a.input_tokens),
        raw: pick(&a.raw),
        quantized: pick(&a.quantized),
        density: rows
            .iter()
            .filter_map(|&r| a.density.get(r).copied())
            .collect(),
        instruction_mask: a
            .instruction_mask
            .as_ref()
            .map(|m| rows.iter().filter_map(|&r| m.get(r).copied()).collect()),
        ..a.clone()
    }
}

fn result_ui(
    ui: &mut egui::Ui,
    (index, columns): (usize, usize),
    slot: &str,
    response: &str,
    a: &Attribution,
    word_level: bool,
    toggles: &mut Vec<(usize, usize)>,
) {
    // Words are decoded text already; tokens are vocabulary strings (`Ġthe`).
    // A newline shows as ↩ in a one-line label (words keep the byte-level `Ċ` of their
    // tokens, tokens decode to "\n"). Not ⏎: egui's bundled fonts have no glyph for it.
    let readable = |tokens: &[String]| -> Vec<String> {
        tokens
            .iter()
            .map(|t| {
                let text = if word_level {
                    t.clone()
                } else {
                    display_token(t)
                };
                text.replace(['\n', 'Ċ'], "↩")
            })
            .collect()
    };
    let (rows, cols) = (readable(&a.input_tokens), readable(&a.output_tokens));
    let score = a
        .instruction_score
        .map_or_else(|| "no instruction words".to_owned(), |s| format!("{s:.3}"));
    ui.label(egui::RichText::new(format!("Instruction score {slot}: {score}")).strong())
        .on_hover_text("Σ density over instruction words / log2(2 + their count) (§1 step 11)");
    egui::CollapsingHeader::new(format!("Response ({} tokens)", a.output_ids.len()))
        .id_salt(("response", index))
        .show(ui, |ui| {
            ui.label(response);
        });
    let max_value = a
        .quantized
        .data
        .iter()
        .copied()
        .fold(0.0f32, f32::max)
        .max(1.0);
    let unit = if word_level { "words" } else { "tokens" };
    ui.label(
        egui::RichText::new(format!(
            "Rows: prompt {unit} (input); columns: response {unit} (output); colour: attribution level 0-10"
        ))
        .small()
        .color(theme::MUTED),
    );
    let heat = heatmap_ui(
        ui,
        &HeatmapData {
            name: &format!("Attribution heatmap {slot}"),
            rows: &rows,
            cols: &cols,
            values: &a.quantized,
            max_value,
            detail: Some(&a.raw),
            legend: "level",
        },
    );
    // Line the density charts of A and B up: pad to the tallest heatmap of the last frame.
    let id = |i: usize| egui::Id::unique(("attribution_heatmap_height", i));
    let own = heat.rect.height();
    ui.data_mut(|d| d.insert_temp(id(index), own));
    let tallest = (0..columns)
        .filter_map(|i| ui.data(|d| d.get_temp::<f32>(id(i))))
        .fold(own, f32::max);
    ui.add_space(theme::SECTION_GAP + (tallest - own).max(0.0));
    ui.label("Importance density (click a bar to mark an instruction word)");
    let marks = a
        .instruction_mask
        .clone()
        .unwrap_or_else(|| vec![false; a.density.len()]);
    let (_, clicked) = bars_ui(
        ui,
        &BarsData {
            name: &format!("Importance density {slot}"),
            labels: &rows,
            values: &a.density,
            highlighted: &marks,
        },
    );
    if let Some(row) = clicked {
        toggles.push((index, row));
    }
}
