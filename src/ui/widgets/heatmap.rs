//! A heatmap of a matrix over plain data (rows × columns with labels), a colour-scale legend and
//! a hover read-out of both labels and the value; and a bar chart whose bars can be clicked
//! (used to mark instruction words). Painted directly, so hundreds of cells stay cheap.

use std::f32::consts::FRAC_PI_2;
use std::fmt::Write as _;

use eframe::egui::{self, Align2, FontId, Pos2, Rect, Sense, Stroke, Vec2};

use crate::analysis::types::Matrix;
use crate::ui::theme;

const FONT_SIZE: f32 = 11.0;
const LEGEND_WIDTH: f32 = 46.0;
const MAX_LABEL_CHARS: usize = 14;

/// What a heatmap shows.
pub struct HeatmapData<'a> {
    /// Accessible name (e.g. "Attribution heatmap A").
    pub name: &'a str,
    /// Row labels (prompt words).
    pub rows: &'a [String],
    /// Column labels (response words).
    pub cols: &'a [String],
    /// The coloured values, `rows × cols`.
    pub values: &'a Matrix,
    /// Value at the top of the colour scale (the bottom is 0).
    pub max_value: f32,
    /// A second value shown on hover (the raw attribution), same shape.
    pub detail: Option<&'a Matrix>,
    /// Caption of the colour scale.
    pub legend: &'a str,
}

fn short(label: &str) -> String {
    let label = label.replace('\n', "\\n");
    if label.chars().count() > MAX_LABEL_CHARS {
        let mut cut: String = label.chars().take(MAX_LABEL_CHARS - 1).collect();
        cut.push('…');
        cut
    } else {
        label
    }
}

/// Width of the widest label as drawn (shortened) in `font`.
fn widest_label(ui: &egui::Ui, labels: &[String], font: &FontId) -> f32 {
    let color = ui.visuals().text_color();
    labels
        .iter()
        .map(|label| ui.fonts_mut(|f| f.layout_no_wrap(short(label), font.clone(), color).size().x))
        .fold(0.0f32, f32::max)
}

/// A label reading upwards, centred on `x`, its end at `top` (below an axis).
fn upward_label(
    painter: &egui::Painter,
    x: f32,
    top: f32,
    text: String,
    font: FontId,
    color: egui::Color32,
) {
    let galley = painter.layout_no_wrap(text, font, color);
    let pos = Pos2::new(x - galley.size().y / 2.0, top + galley.size().x);
    painter.add(egui::epaint::TextShape::new(pos, galley, color).with_angle(-FRAC_PI_2));
}

/// Draws the heatmap; hover shows the row, column and value.
pub fn heatmap_ui(ui: &mut egui::Ui, data: &HeatmapData<'_>) -> egui::Response {
    let (n_rows, n_cols) = (data.values.rows, data.values.cols);
    let font = FontId::proportional(FONT_SIZE);
    let text_color = ui.visuals().text_color();
    let col_label_len = widest_label(ui, data.cols, &font);
    let grid_width = (ui.available_width() - theme::HEATMAP_LABEL_WIDTH - LEGEND_WIDTH).max(40.0);
    let cell_w = (grid_width / n_cols.max(1) as f32).clamp(6.0, 30.0);
    let cell_h = if n_rows > 48 { 9.0 } else { 15.0 };
    let size = Vec2::new(
        theme::HEATMAP_LABEL_WIDTH + cell_w * n_cols as f32 + LEGEND_WIDTH,
        cell_h * n_rows.max(1) as f32 + col_label_len + 8.0,
    );
    // The response of `allocate_exact_size` can be wider than the rect in justified layouts;
    // interact with exactly the drawn rect so hover, clicks and the accessible bounds match it.
    let (rect, _) = ui.allocate_exact_size(size, Sense::hover());
    let response = ui.interact(rect, ui.scope_id().with(data.name), Sense::hover());
    let name = data.name.to_owned();
    response.widget_info(move || egui::WidgetInfo::labeled(egui::Role::Figure, true, name.clone()));
    let painter = ui.painter_at(rect);
    let origin = rect.min + Vec2::new(theme::HEATMAP_LABEL_WIDTH, 0.0);
    let cell = |i: usize, j: usize| {
        Rect::from_min_size(
            origin + Vec2::new(j as f32 * cell_w, i as f32 * cell_h),
            Vec2::new(cell_w, cell_h),
        )
    };
    let scale = if data.max_value > 0.0 {
        data.max_value
    } else {
        1.0
    };
    for i in 0..n_rows {
        for j in 0..n_cols {
            let value = data.values.get(i, j);
            painter.rect_filled(cell(i, j), 0.0, theme::level_color(value / scale));
        }
    }
    // Row labels on the left, only as many as fit.
    let row_step = ((FONT_SIZE + 1.0) / cell_h).ceil().max(1.0) as usize;
    for (i, label) in data.rows.iter().enumerate().step_by(row_step) {
        let y = origin.y + (i as f32 + 0.5) * cell_h;
        painter.text(
            Pos2::new(origin.x - 4.0, y),
            Align2::RIGHT_CENTER,
            short(label),
            font.clone(),
            text_color,
        );
    }
    // Column labels below, reading upwards.
    let col_step = ((FONT_SIZE + 1.0) / cell_w).ceil().max(1.0) as usize;
    let bottom = origin.y + n_rows as f32 * cell_h + 4.0;
    for (j, label) in data.cols.iter().enumerate().step_by(col_step) {
        let x = origin.x + (j as f32 + 0.5) * cell_w;
        upward_label(&painter, x, bottom, short(label), font.clone(), text_color);
    }
    // Colour scale: a vertical gradient with its end values and caption.
    let bar = Rect::from_min_size(
        Pos2::new(origin.x + n_cols as f32 * cell_w + 10.0, origin.y),
        Vec2::new(10.0, (n_rows as f32 * cell_h).max(40.0)),
    );
    let steps = 24;
    for s in 0..steps {
        let t0 = s as f32 / steps as f32;
        let band = Rect::from_min_max(
            Pos2::new(
                bar.left(),
                bar.bottom() - bar.height() * (t0 + 1.0 / steps as f32),
            ),
            Pos2::new(bar.right(), bar.bottom() - bar.height() * t0),
        );
        painter.rect_filled(band, 0.0, theme::level_color(t0 + 0.5 / steps as f32));
    }
    painter.text(
        Pos2::new(bar.right() + 3.0, bar.top()),
        Align2::LEFT_TOP,
        format!("{}", data.max_value),
        font.clone(),
        text_color,
    );
    painter.text(
        Pos2::new(bar.right() + 3.0, bar.bottom()),
        Align2::LEFT_BOTTOM,
        "0",
        font.clone(),
        text_color,
    );
    let caption = painter.layout_no_wrap(data.legend.to_owned(), font, theme::MUTED);
    let caption_pos = Pos2::new(bar.right() + 4.0, bar.center().y + caption.size().x / 2.0);
    painter.add(
        egui::epaint::TextShape::new(caption_pos, caption, theme::MUTED).with_angle(-FRAC_PI_2),
    );

    let hovered = response.hover_pos().and_then(|p| {
        let v = p - origin;
        let (i, j) = ((v.y / cell_h).floor(), (v.x / cell_w).floor());
        (v.x >= 0.0 && v.y >= 0.0 && (i as usize) < n_rows && (j as usize) < n_cols)
            .then_some((i as usize, j as usize))
    });
    if let Some((i, j)) = hovered {
        painter.rect_stroke(
            cell(i, j),
            0.0,
            Stroke::new(1.5, theme::HOVER_OUTLINE),
            egui::StrokeKind::Inside,
        );
        let row = data.rows.get(i).map_or("", String::as_str);
        let col = data.cols.get(j).map_or("", String::as_str);
        let mut text = format!(
            "prompt: {row:?}\nresponse: {col:?}\nlevel {}",
            data.values.get(i, j)
        );
        if let Some(detail) = data.detail {
            let _ = write!(text, "\nraw {:.4e}", detail.get(i, j));
        }
        return response.on_hover_text_at_pointer(text);
    }
    response
}

/// What a bar chart shows.
pub struct BarsData<'a> {
    /// Accessible name.
    pub name: &'a str,
    /// One label per bar.
    pub labels: &'a [String],
    /// Bar heights, `0..=1`.
    pub values: &'a [f32],
    /// Bars drawn in the highlight colour.
    pub highlighted: &'a [bool],
}

/// Draws a bar chart; returns the response and the bar clicked this frame, if any.
pub fn bars_ui(ui: &mut egui::Ui, data: &BarsData<'_>) -> (egui::Response, Option<usize>) {
    let n = data.values.len();
    let font = FontId::proportional(FONT_SIZE);
    let text_color = ui.visuals().text_color();
    let label_len = widest_label(ui, data.labels, &font);
    let axis_w = 30.0;
    let bar_w = ((ui.available_width() - axis_w) / n.max(1) as f32).clamp(4.0, 30.0);
    let plot_h = 110.0;
    let size = Vec2::new(axis_w + bar_w * n as f32, plot_h + label_len + 10.0);
    let (rect, _) = ui.allocate_exact_size(size, Sense::hover());
    let response = ui.interact(rect, ui.scope_id().with(data.name), Sense::click());
    let name = data.name.to_owned();
    response.widget_info(move || egui::WidgetInfo::labeled(egui::Role::Figure, true, name.clone()));
    let painter = ui.painter_at(rect);
    let origin = Pos2::new(rect.left() + axis_w, rect.top() + plot_h);
    painter.line_segment(
        [origin, Pos2::new(origin.x + bar_w * n as f32, origin.y)],
        Stroke::new(1.0, theme::MUTED),
    );
    for (value, label) in [(1.0, "1"), (0.5, "0.5"), (0.0, "0")] {
        painter.text(
            Pos2::new(origin.x - 4.0, origin.y - plot_h * value + 1.0),
            Align2::RIGHT_CENTER,
            label,
            font.clone(),
            theme::MUTED,
        );
    }
    let step = ((FONT_SIZE + 1.0) / bar_w).ceil().max(1.0) as usize;
    for (i, &value) in data.values.iter().enumerate() {
        let marked = data.highlighted.get(i).copied().unwrap_or(false);
        let color = if marked {
            theme::INSTRUCTION
        } else {
            theme::BAR
        };
        let h = plot_h * value.clamp(0.0, 1.0);
        let bar = Rect::from_min_max(
            Pos2::new(origin.x + i as f32 * bar_w + 1.0, origin.y - h),
            Pos2::new(origin.x + (i + 1) as f32 * bar_w - 1.0, origin.y),
        );
        painter.rect_filled(bar, 0.0, color);
        if i % step == 0 {
            let label = data.labels.get(i).map_or(String::new(), |l| short(l));
            let label_color = if marked {
                theme::INSTRUCTION
            } else {
                text_color
            };
            let x = origin.x + (i as f32 + 0.5) * bar_w;
            upward_label(
                &painter,
                x,
                origin.y + 4.0,
                label,
                font.clone(),
                label_color,
            );
        }
    }
    let bar_at = |p: Pos2| -> Option<usize> {
        let i = ((p.x - origin.x) / bar_w).floor();
        (i >= 0.0 && (i as usize) < n).then_some(i as usize)
    };
    let clicked = if response.clicked() {
        response.interact_pointer_pos().and_then(bar_at)
    } else {
        None
    };
    let response = match response.hover_pos().and_then(bar_at) {
        Some(i) => {
            let label = data.labels.get(i).map_or("", String::as_str);
            let value = data.values.get(i).copied().unwrap_or(0.0);
            response.on_hover_text_at_pointer(format!(
                "{label:?}: density {value:.3}\nclick to mark or unmark as an instruction word"
            ))
        }
        None => response,
    };
    (response, clicked)
}
