//! Prompt view: the prompt editor with the sample picker, chat-template toggle and generation
//! settings; Generate / Stop; A's and B's responses streaming side by side.

use std::fmt::Write as _;

use eframe::egui;

use crate::model::generate::StopReason;
use crate::samples::SampleSet;
use crate::ui::actions::Action;
use crate::ui::app::{slot_index, ResponseView, SlotView};
use crate::ui::state::AppState;
use crate::ui::theme;
use crate::worker::Slot;

/// Draws the Prompt view.
#[allow(clippy::too_many_arguments)]
pub fn prompt_ui(
    ui: &mut egui::Ui,
    state: &mut AppState,
    samples: &[SampleSet],
    slots: &[SlotView; 2],
    responses: &[ResponseView; 2],
    generating: bool,
    actions: &mut Vec<Action>,
) {
    ui.heading("Prompt");
    ui.horizontal(|ui| {
        ui.label("Examples");
        for set in samples {
            egui::ComboBox::from_id_salt(("samples", set.name))
                .selected_text(set.name.replace('_', " "))
                .width(110.0)
                .show_ui(ui, |ui| {
                    for prompt in &set.prompts {
                        let first_line = prompt.lines().next().unwrap_or_default();
                        let mut short: String = first_line.chars().take(70).collect();
                        // An item that stands for a longer prompt says so.
                        if short.len() < prompt.trim_end().len() {
                            short.push('…');
                        }
                        if ui
                            .selectable_label(false, short)
                            .on_hover_text(prompt)
                            .clicked()
                        {
                            state.prompt.clone_from(prompt);
                        }
                    }
                })
                .response
                .on_hover_text(&set.description);
        }
    });
    let label = ui.label("Prompt");
    ui.add(
        egui::TextEdit::multiline(&mut state.prompt)
            .desired_rows(4)
            .desired_width(f32::INFINITY)
            .hint_text("Type an instruction, or pick one from Examples"),
    )
    .labelled_by(label.id);
    ui.horizontal_wrapped(|ui| {
        ui.checkbox(&mut state.chat, "Chat template")
            .on_hover_text("Wrap the prompt in each model's own chat template");
        ui.separator();
        let label = ui.label("Max new tokens");
        ui.add(egui::DragValue::new(&mut state.gen.max_new_tokens).range(1..=4096))
            .labelled_by(label.id);
        ui.separator();
        ui.radio_value(&mut state.gen.sample, false, "Greedy");
        ui.radio_value(&mut state.gen.sample, true, "Sample");
        ui.add_enabled_ui(state.gen.sample, |ui| {
            let label = ui.label("Temperature");
            ui.add(
                egui::DragValue::new(&mut state.gen.temperature)
                    .range(0.05..=5.0)
                    .speed(0.01),
            )
            .labelled_by(label.id);
            let label = ui.label("Top-p");
            ui.add(
                egui::DragValue::new(&mut state.gen.top_p)
                    .range(0.01..=1.0)
                    .speed(0.01),
            )
            .labelled_by(label.id);
            let label = ui.label("Seed");
            ui.add(egui::DragValue::new(&mut state.gen.seed))
                .labelled_by(label.id);
        });
    });
    steer_ui(ui, state, slots, actions);
    ui.horizontal(|ui| {
        let any_loaded = slots.iter().any(|s| s.info.is_some());
        let has_prompt = !state.prompt.trim().is_empty();
        let why_not = if !any_loaded {
            "Load a model into slot A or B first"
        } else if !has_prompt {
            "Type a prompt first"
        } else {
            "Wait for the running generation"
        };
        if ui
            .add_enabled(
                any_loaded && has_prompt && !generating,
                egui::Button::new("Generate"),
            )
            .on_hover_text("Generate with every loaded model (Ctrl+Enter)")
            .on_disabled_hover_text(why_not)
            .clicked()
        {
            actions.push(Action::Generate);
        }
        if ui
            .add_enabled(generating, egui::Button::new("Stop"))
            .on_hover_text("Stop generating (Esc)")
            .clicked()
        {
            actions.push(Action::Stop);
        }
        ui.separator();
        let both = slots.iter().all(|s| s.info.is_some());
        ui.add_enabled(
            both,
            egui::Checkbox::new(&mut state.shift.live, "Live token shift"),
        )
        .on_hover_text(
            "While B generates, A (the base) scores each new token with one cached step over the URIAL context: marginal tokens yellow, shifted vermillion (METHODS.md §6; k from the Token shift view)",
        )
        .on_disabled_hover_text("Load the base into A and the tuned model into B");
    });
    ui.add_space(theme::SECTION_GAP);
    ui.columns(2, |columns| {
        for (column, slot) in columns.iter_mut().zip([Slot::A, Slot::B]) {
            response_ui(
                column,
                slot,
                &slots[slot_index(slot)],
                &responses[slot_index(slot)],
                generating,
            );
        }
    });
}

/// The steering row: a saved instruction vector added at a layer while generating (METHODS.md
/// §4.2 step 5), so a zero-shot prompt shows what the vector does in A and in B.
fn steer_ui(
    ui: &mut egui::Ui,
    state: &mut AppState,
    slots: &[SlotView; 2],
    actions: &mut Vec<Action>,
) {
    let layers = slots
        .iter()
        .filter_map(|s| s.info.as_ref().map(|i| i.num_layers))
        .min()
        .unwrap_or(0);
    let steer = &mut state.steer;
    ui.horizontal_wrapped(|ui| {
        ui.add_enabled(
            steer.path.is_some(),
            egui::Checkbox::new(&mut steer.enabled, "Steer with an instruction vector"),
        )
        .on_hover_text("Add the vector to the output of a layer at the last prompt token (Instruction vector view: Save IV…)")
        .on_disabled_hover_text("Load a saved vector first");
        let name = steer.path.as_ref().map_or_else(
            || "no vector".to_owned(),
            |p| crate::ui::widgets::shorten_middle(&p.file_name().unwrap_or_default().to_string_lossy(), 40),
        );
        ui.label(egui::RichText::new(name).color(theme::MUTED))
            .on_hover_text(steer.path.as_ref().map_or_else(String::new, |p| p.display().to_string()));
        if ui.button("Load IV…").clicked() {
            actions.push(Action::PickFile(crate::ui::dialogs::DialogKind::IvFile));
        }
        if steer.path.is_some() {
            ui.separator();
            let mut best = steer.layer.is_none();
            ui.checkbox(&mut best, "Its best layer")
                .on_hover_text("The layer of best zero-shot accuracy in the vector's own sweep");
            if best {
                steer.layer = None;
            } else {
                let mut layer = steer.layer.unwrap_or(layers / 3);
                let label = ui.label("Layer");
                ui.add(egui::DragValue::new(&mut layer).range(0..=layers.saturating_sub(1)))
                    .labelled_by(label.id);
                steer.layer = Some(layer);
            }
            if steer.scale == 0.0 {
                steer.scale = 1.0;
            }
            let label = ui.label("Scale");
            ui.add(egui::DragValue::new(&mut steer.scale).range(-20.0..=20.0).speed(0.05))
                .labelled_by(label.id);
            ui.checkbox(&mut steer.every_token, "Every generated token");
        }
    });
}

fn response_ui(
    ui: &mut egui::Ui,
    slot: Slot,
    view: &SlotView,
    response: &ResponseView,
    generating: bool,
) {
    egui::Frame::group(ui.style()).show(ui, |ui| {
        ui.set_min_width(ui.available_width());
        // Fill the rest of the window: responses can be long.
        ui.set_min_height((ui.available_height() - 12.0).max(120.0));
        let Some(info) = &view.info else {
            ui.label(
                egui::RichText::new(format!("{slot:?} · empty"))
                    .strong()
                    .color(theme::slot_color(slot)),
            );
            ui.label(
                egui::RichText::new(format!(
                    "Load a model into slot {slot:?} (Models view) to compare it here"
                ))
                .color(theme::MUTED),
            );
            return;
        };
        ui.label(
            egui::RichText::new(format!("{slot:?} · {}", info.display_name()))
                .strong()
                .color(theme::slot_color(slot)),
        );
        let mut footer = format!("{} tokens", response.tokens);
        if let Some(reason) = response.stop_reason {
            let reason = match reason {
                StopReason::Eos => "end of sequence",
                StopReason::StopString => "stop string",
                StopReason::MaxTokens => "max tokens",
                StopReason::ContextFull => "context full",
                StopReason::Cancelled => "stopped",
            };
            let _ = write!(footer, " · {reason}");
        }
        if let Some(tps) = response.tokens_per_sec {
            let _ = write!(footer, " · {tps:.1} tokens/s");
        }
        ui.label(egui::RichText::new(footer).color(theme::MUTED));
        if let Some(note) = &response.steering {
            ui.label(egui::RichText::new(note).color(theme::INSTRUCTION));
        }
        ui.separator();
        egui::ScrollArea::vertical()
            .id_salt(("response", slot_index(slot)))
            .auto_shrink([false, false])
            .stick_to_bottom(true)
            .show(ui, |ui| {
                if response.text.is_empty() {
                    let hint = if generating {
                        "…"
                    } else {
                        "The response appears here"
                    };
                    ui.label(egui::RichText::new(hint).color(theme::MUTED));
                } else if response.shifts.iter().any(Option::is_some) {
                    shifted_text_ui(ui, response);
                } else {
                    ui.label(&response.text);
                }
            });
    });
}

/// A response whose tokens carry live shift classes: each token on its class's background.
fn shifted_text_ui(ui: &mut egui::Ui, response: &ResponseView) {
    use crate::analysis::shift::Category;
    ui.horizontal_wrapped(|ui| {
        ui.spacing_mut().item_spacing.x = 0.0;
        for (i, piece) in response.pieces.iter().enumerate() {
            for (n, line) in piece.split('\n').enumerate() {
                if n > 0 {
                    ui.end_row();
                }
                if line.is_empty() {
                    continue;
                }
                let text = egui::RichText::new(line);
                let text = match response.shifts.get(i).copied().flatten() {
                    Some(Category::Marginal) => text
                        .background_color(theme::SHIFT_MARGINAL)
                        .color(egui::Color32::BLACK),
                    Some(Category::Shifted) => text
                        .background_color(theme::SHIFT_SHIFTED)
                        .color(egui::Color32::WHITE),
                    _ => text,
                };
                ui.label(text);
            }
        }
    });
}
