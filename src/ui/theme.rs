//! Colours and spacing: the only place the UI defines them.

use eframe::egui::{self, Color32};

/// Slot A's accent (a blue).
pub const SLOT_A: Color32 = Color32::from_rgb(66, 133, 214);
/// Slot B's accent (an orange).
pub const SLOT_B: Color32 = Color32::from_rgb(230, 126, 34);
/// Error text.
pub const ERROR: Color32 = Color32::from_rgb(220, 70, 60);
/// Secondary text.
pub const MUTED: Color32 = Color32::from_gray(140);
/// Width of the navigation column.
pub const NAV_WIDTH: f32 = 150.0;
/// Space between sections.
pub const SECTION_GAP: f32 = 12.0;

/// The accent colour of a slot.
pub fn slot_color(slot: crate::worker::Slot) -> Color32 {
    match slot {
        crate::worker::Slot::A => SLOT_A,
        crate::worker::Slot::B => SLOT_B,
    }
}

/// Applies the app's style to a context.
pub fn apply(ctx: &egui::Context) {
    ctx.all_styles_mut(|style| {
        style.spacing.item_spacing = egui::vec2(8.0, 6.0);
        style.spacing.button_padding = egui::vec2(8.0, 4.0);
    });
}
