//! Models view: slots A and B side by side, with open / adapter / unload buttons, a summary of
//! each loaded model, swap, and the recent list.

use eframe::egui;

use crate::model::{ModelInfo, WeightStorage};
use crate::ui::actions::Action;
use crate::ui::app::{slot_index, SlotView};
use crate::ui::dialogs::DialogKind;
use crate::ui::theme;
use crate::ui::widgets::shorten_middle;
use crate::worker::Slot;

/// Draws the Models view.
pub fn models_ui(
    ui: &mut egui::Ui,
    slots: &[SlotView; 2],
    recent: &[String],
    storage: &mut WeightStorage,
    actions: &mut Vec<Action>,
) {
    ui.heading("Models");
    ui.label(
        egui::RichText::new("Open a Hugging Face folder or a .gguf file in each slot (or drop one on the window); every view compares A with B")
            .color(theme::MUTED),
    );
    ui.horizontal(|ui| {
        ui.label("Weights in memory:");
        let hover = "f32: every weight expanded at load (the reference). As stored: f16/bf16 and GGUF's quantised weights stay as in the file and are expanded a tile at a time inside each product, for large models (CPU only). Applies to the next load.";
        ui.radio_value(storage, WeightStorage::F32, "f32")
            .on_hover_text(hover);
        ui.radio_value(storage, WeightStorage::Stored, "as stored")
            .on_hover_text(hover);
    });
    ui.add_space(theme::SECTION_GAP);
    ui.columns(2, |columns| {
        for (column, slot) in columns.iter_mut().zip([Slot::A, Slot::B]) {
            slot_ui(column, slot, &slots[slot_index(slot)], actions);
        }
    });
    ui.add_space(theme::SECTION_GAP);
    let both = slots.iter().any(|s| s.info.is_some());
    if ui
        .add_enabled(both, egui::Button::new("Swap A and B"))
        .on_hover_text("Exchange the models of the two slots")
        .clicked()
    {
        actions.push(Action::Swap);
    }
    ui.add_space(theme::SECTION_GAP);
    ui.strong("Recent");
    if recent.is_empty() {
        ui.label(egui::RichText::new("Models you open appear here").color(theme::MUTED));
    }
    for spec in recent {
        ui.horizontal(|ui| {
            for slot in [Slot::A, Slot::B] {
                if ui
                    .small_button(format!("Load in {slot:?}"))
                    .on_hover_text(format!("Load into slot {slot:?}"))
                    .clicked()
                {
                    actions.push(Action::OpenSpec {
                        slot,
                        spec: spec.clone(),
                    });
                }
            }
            ui.label(spec);
        });
    }
}

fn slot_ui(ui: &mut egui::Ui, slot: Slot, view: &SlotView, actions: &mut Vec<Action>) {
    egui::Frame::group(ui.style()).show(ui, |ui| {
        ui.set_min_width(ui.available_width());
        ui.horizontal(|ui| {
            ui.label(
                egui::RichText::new(format!("Slot {slot:?}"))
                    .strong()
                    .color(theme::slot_color(slot)),
            );
            if view.loading {
                ui.spinner();
                ui.label("loading…");
            }
        });
        ui.horizontal_wrapped(|ui| {
            if ui.button("Open folder…").clicked() {
                actions.push(Action::Dialog {
                    slot,
                    kind: DialogKind::ModelFolder,
                });
            }
            if ui.button("Open GGUF…").clicked() {
                actions.push(Action::Dialog {
                    slot,
                    kind: DialogKind::GgufFile,
                });
            }
            let loaded = view.info.is_some();
            if ui
                .add_enabled(loaded, egui::Button::new("Add LoRA adapter…"))
                .on_hover_text("Apply a PEFT adapter folder on top of this slot's model")
                .clicked()
            {
                actions.push(Action::Dialog {
                    slot,
                    kind: DialogKind::AdapterFolder,
                });
            }
            if ui
                .add_enabled(loaded, egui::Button::new("Unload"))
                .clicked()
            {
                actions.push(Action::Unload(slot));
            }
        });
        ui.separator();
        match &view.info {
            None => {
                ui.label(egui::RichText::new("Empty").color(theme::MUTED));
            }
            Some(info) => info_grid(ui, slot, info),
        }
    });
}

fn info_grid(ui: &mut egui::Ui, slot: Slot, info: &ModelInfo) {
    egui::Grid::new(("model_info", slot_index(slot)))
        .num_columns(2)
        .striped(true)
        .show(ui, |ui| {
            // A long path keeps its start and its end; hover shows all of it.
            ui.label(egui::RichText::new("Source").color(theme::MUTED));
            ui.label(shorten_middle(&info.source, 64))
                .on_hover_text(&info.source);
            ui.end_row();
            let mut row = |name: &str, value: String| {
                ui.label(egui::RichText::new(name).color(theme::MUTED));
                ui.label(value);
                ui.end_row();
            };
            row("Architecture", info.architecture.clone());
            row(
                "Layers",
                format!(
                    "{} (hidden {}, MLP {})",
                    info.num_layers, info.hidden_size, info.intermediate_size
                ),
            );
            row(
                "Heads",
                format!(
                    "{} query, {} key/value, dim {}",
                    info.num_heads, info.num_kv_heads, info.head_dim
                ),
            );
            row(
                "Parameters",
                format!("{:.1} M", info.parameters as f64 / 1e6),
            );
            row("Vocabulary", info.vocab_size.to_string());
            row("Context", format!("{} tokens", info.context_length));
            row(
                "Weights",
                format!(
                    "{} (file: {}, {})",
                    info.dtype, info.source_dtype, info.format
                ),
            );
            row("Device", info.device.clone());
            row(
                "Resident",
                format!("{} of weights", bytes_label(info.weight_bytes)),
            );
            row("Load time", format!("{:.2} s", info.load_secs));
            row(
                "Chat template",
                if info.has_chat_template { "yes" } else { "no" }.to_owned(),
            );
            if let Some(adapter) = &info.adapter {
                row(
                    "LoRA adapter",
                    format!(
                        "r {} alpha {} on {} in {} layers ({} adapted modules)",
                        adapter.rank,
                        adapter.alpha,
                        adapter.target_modules.join(", "),
                        adapter.layers,
                        adapter.adapted_layers
                    ),
                );
            }
        });
}

/// Bytes as KiB, MiB or GiB, whichever reads best.
fn bytes_label(bytes: usize) -> String {
    let b = bytes as f64;
    if b >= 1024.0 * 1_048_576.0 {
        format!("{:.1} GiB", b / (1024.0 * 1_048_576.0))
    } else if b >= 1_048_576.0 {
        format!("{:.0} MiB", b / 1_048_576.0)
    } else {
        format!("{:.0} KiB", b / 1024.0)
    }
}
