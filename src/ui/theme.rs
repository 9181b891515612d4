//! Colours and spacing: the only place the UI defines them (clippy's `disallowed-methods` keeps
//! `Color32::from_rgb` out of every other file).
#![allow(clippy::disallowed_methods)]

use eframe::egui::{self, Color32};

/// The named loss terms of a training run (Okabe-Ito: green, purple, yellow, sky blue), distinct
/// from the slot colours.
pub const LOSS_TERMS: [Color32; 4] = [
    Color32::from_rgb(0, 158, 115),
    Color32::from_rgb(204, 121, 167),
    Color32::from_rgb(240, 228, 66),
    Color32::from_rgb(86, 180, 233),
];

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

/// Bars of ordinary prompt words.
pub const BAR: Color32 = Color32::from_rgb(128, 142, 160);
/// Bars and labels of instruction words.
pub const INSTRUCTION: Color32 = Color32::from_rgb(213, 94, 0);
/// First colour of a two-way comparison within one model (paraphrase pairs): Okabe–Ito bluish
/// green, never A's blue or B's orange.
pub const CATEGORY_1: Color32 = Color32::from_rgb(0, 158, 115);
/// Second colour of a two-way comparison within one model (non-paraphrase pairs): Okabe–Ito
/// reddish purple.
pub const CATEGORY_2: Color32 = Color32::from_rgb(204, 121, 167);
/// Outline of the hovered heatmap cell.
pub const HOVER_OUTLINE: Color32 = Color32::from_rgb(255, 255, 255);
/// Background of marginal tokens in the Token shift view (Okabe-Ito yellow; dark text).
pub const SHIFT_MARGINAL: Color32 = Color32::from_rgb(0xF0, 0xE4, 0x42);
/// Background of shifted tokens (Okabe-Ito vermillion; white text). The two classes differ in
/// lightness as well as hue, so they stay apart under every colour-vision deficiency.
pub const SHIFT_SHIFTED: Color32 = Color32::from_rgb(0xD5, 0x5E, 0x00);
/// Curves of successive runs of one view (Okabe-Ito).
pub const RUNS: [Color32; 6] = [
    Color32::from_rgb(0, 114, 178),
    Color32::from_rgb(230, 159, 0),
    Color32::from_rgb(0, 158, 115),
    Color32::from_rgb(204, 121, 167),
    Color32::from_rgb(86, 180, 233),
    Color32::from_rgb(213, 94, 0),
];
/// Row-label width of heatmaps.
pub const HEATMAP_LABEL_WIDTH: f32 = 96.0;

/// Viridis, sampled at 9 points (matplotlib's map; perceptually uniform, colour-blind safe).
const VIRIDIS: [(u8, u8, u8); 9] = [
    (68, 1, 84),
    (71, 44, 122),
    (59, 81, 139),
    (44, 113, 142),
    (33, 144, 141),
    (39, 173, 129),
    (92, 200, 99),
    (170, 220, 50),
    (253, 231, 37),
];

/// The heatmap colour of `t` in `0..=1` (viridis; NaN is grey).
pub fn level_color(t: f32) -> Color32 {
    if t.is_nan() {
        return MUTED;
    }
    let x = t.clamp(0.0, 1.0) * (VIRIDIS.len() - 1) as f32;
    let i = (x.floor() as usize).min(VIRIDIS.len() - 2);
    let f = x - i as f32;
    let (a, b) = (VIRIDIS[i], VIRIDIS[i + 1]);
    let mix = |p: u8, q: u8| (f32::from(p) + (f32::from(q) - f32::from(p)) * f).round() as u8;
    Color32::from_rgb(mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2))
}

/// The colour of a signed value `t` in `-1..=1` on a blue–white–red scale (the export's
/// diverging heatmaps use the same end points); NaN is grey.
pub fn diverging_color(t: f32) -> Color32 {
    if t.is_nan() {
        return MUTED;
    }
    let t = t.clamp(-1.0, 1.0);
    let mix =
        |p: u8, q: u8, f: f32| (f32::from(p) + (f32::from(q) - f32::from(p)) * f).round() as u8;
    if t >= 0.0 {
        Color32::from_rgb(mix(247, 178, t), mix(247, 24, t), mix(247, 43, t))
    } else {
        Color32::from_rgb(mix(247, 33, -t), mix(247, 102, -t), mix(247, 172, -t))
    }
}

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
