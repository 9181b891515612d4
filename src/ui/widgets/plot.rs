//! Small painted plots over plain data: line plots, overlaid histograms, a clickable count grid
//! and grouped bars with whiskers. Each is one allocated rect with an accessible name and a
//! hover read-out; no plotting dependency.

use std::fmt::Write as _;

use eframe::egui::{self, Align2, Color32, FontId, Pos2, Rect, Sense, Stroke, Vec2};

use crate::analysis::types::Matrix;
use crate::ui::theme;

const FONT: f32 = 11.0;
const MARGIN_LEFT: f32 = 50.0;
const MARGIN_BOTTOM: f32 = 32.0;
const LEGEND_ROW: f32 = 15.0;

/// How a curve is stroked: A and B keep their colours, and the kinds of one model's curves
/// differ by dash.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Dash {
    /// A solid line.
    #[default]
    Solid,
    /// Long dashes.
    Dashed,
    /// Dots.
    Dotted,
}

/// One curve.
#[derive(Clone, Debug, Default)]
pub struct Series {
    /// Legend name.
    pub name: String,
    /// Colour.
    pub color: Color32,
    /// `(x, y)` points; non-finite points are skipped.
    pub points: Vec<(f64, f64)>,
    /// Stroke pattern.
    pub dash: Dash,
}

/// A legend entry: a stroke of a line style, or a filled swatch.
struct Key<'a> {
    name: &'a str,
    color: Color32,
    /// `None` for a filled swatch.
    dash: Option<Dash>,
}

/// Strokes `points` with `dash`.
fn stroke_line(painter: &egui::Painter, points: Vec<Pos2>, stroke: Stroke, dash: Dash) {
    match dash {
        Dash::Solid => {
            painter.add(egui::Shape::line(points, stroke));
        }
        Dash::Dashed => {
            painter.extend(egui::Shape::dashed_line(&points, stroke, 7.0, 4.0));
        }
        Dash::Dotted => {
            painter.extend(egui::Shape::dashed_line(&points, stroke, 2.0, 3.0));
        }
    }
}

/// The plot's rect with the y-axis title and the legend in a band above the data (wrapped to
/// as many rows as they need), and room for tick labels and the x-axis title below.
fn frame(
    ui: &mut egui::Ui,
    name: &str,
    height: f32,
    y_label: &str,
    keys: &[Key<'_>],
) -> (egui::Response, egui::Painter, Rect) {
    let width = ui.available_width().clamp(200.0, 900.0);
    let font = FontId::proportional(FONT);
    let measure = |text: &str| {
        ui.painter()
            .layout_no_wrap(text.to_owned(), font.clone(), theme::MUTED)
            .size()
            .x
    };
    // Lay the band out once to know its height, then draw it at the same places.
    let mut placed: Vec<(f32, usize)> = Vec::with_capacity(keys.len());
    let (mut x, mut row) = (MARGIN_LEFT + measure(y_label) + 18.0, 0usize);
    for key in keys {
        let w = 22.0 + measure(key.name) + 14.0;
        if x + w > width && x > MARGIN_LEFT {
            row += 1;
            x = MARGIN_LEFT;
        }
        placed.push((x, row));
        x += w;
    }
    let band = LEGEND_ROW * (row + 1) as f32 + 4.0;
    let size = Vec2::new(width, height + band);
    let (rect, _) = ui.allocate_exact_size(size, Sense::hover());
    let response = ui.interact(rect, ui.scope_id().with(name), Sense::click());
    let label = name.to_owned();
    response
        .widget_info(move || egui::WidgetInfo::labeled(egui::Role::Figure, true, label.clone()));
    let painter = ui.painter_at(rect);
    painter.text(
        Pos2::new(rect.left() + MARGIN_LEFT, rect.top() + LEGEND_ROW / 2.0),
        Align2::LEFT_CENTER,
        y_label,
        font.clone(),
        theme::MUTED,
    );
    for (key, (x, row)) in keys.iter().zip(placed) {
        let y = rect.top() + LEGEND_ROW * (row as f32 + 0.5);
        let x = rect.left() + x;
        match key.dash {
            Some(dash) => stroke_line(
                &painter,
                vec![Pos2::new(x, y), Pos2::new(x + 18.0, y)],
                Stroke::new(2.5, key.color),
                dash,
            ),
            None => {
                painter.rect_filled(
                    Rect::from_min_size(Pos2::new(x + 4.0, y - 5.0), Vec2::splat(10.0)),
                    1.0,
                    key.color,
                );
            }
        }
        painter.text(
            Pos2::new(x + 22.0, y),
            Align2::LEFT_CENTER,
            key.name,
            font.clone(),
            theme::MUTED,
        );
    }
    let plot = Rect::from_min_max(
        rect.min + Vec2::new(MARGIN_LEFT, band),
        rect.max - Vec2::new(10.0, MARGIN_BOTTOM),
    );
    painter.rect_stroke(
        plot,
        0.0,
        Stroke::new(1.0, theme::MUTED),
        egui::StrokeKind::Inside,
    );
    (response, painter, plot)
}

/// A tick label as the app shows it (the exports' true minus sign as a hyphen).
fn tick_text(label: &str) -> String {
    label.replace('\u{2212}', "-")
}

/// Ticks of a log10 axis over `lo..=hi` (exponents), labelled as plain numbers.
fn log_ticks(lo: f64, hi: f64) -> Vec<(f64, String)> {
    let (a, b) = (lo.ceil() as i32, hi.floor() as i32);
    let step = ((b - a) / 5).max(1);
    (a..=b)
        .step_by(step as usize)
        .map(|e| {
            let text = if (-4..=5).contains(&e) {
                format!("{:.*}", (-e).max(0) as usize, 10f64.powi(e))
            } else {
                format!("1e{e}")
            };
            (f64::from(e), text)
        })
        .collect()
}

/// Grid lines and tick labels at round steps (the exports' ticks), and the x-axis title.
/// `x = None` leaves the x axis to the caller (categories).
fn axes(
    painter: &egui::Painter,
    plot: Rect,
    x: Option<(f64, f64)>,
    y: (f64, f64),
    x_label: &str,
    log_y: bool,
) {
    let font = FontId::proportional(FONT);
    let grid = Stroke::new(1.0, theme::MUTED.gamma_multiply(0.25));
    let y_ticks = if log_y {
        log_ticks(y.0, y.1)
    } else {
        crate::export::ticks(y.0, y.1, crate::export::AXIS_TICKS)
    };
    for (v, label) in y_ticks {
        if v < y.0 - 1e-12 || v > y.1 + 1e-12 {
            continue;
        }
        let py = plot.bottom() - ((v - y.0) / (y.1 - y.0)) as f32 * plot.height();
        painter.line_segment(
            [Pos2::new(plot.left(), py), Pos2::new(plot.right(), py)],
            grid,
        );
        painter.text(
            Pos2::new(plot.left() - 4.0, py),
            Align2::RIGHT_CENTER,
            tick_text(&label),
            font.clone(),
            theme::MUTED,
        );
    }
    if let Some((x0, x1)) = x {
        for (v, label) in crate::export::ticks(x0, x1, crate::export::AXIS_TICKS) {
            if v < x0 - 1e-12 || v > x1 + 1e-12 {
                continue;
            }
            let px = plot.left() + ((v - x0) / (x1 - x0)) as f32 * plot.width();
            painter.line_segment(
                [Pos2::new(px, plot.top()), Pos2::new(px, plot.bottom())],
                grid,
            );
            painter.text(
                Pos2::new(px, plot.bottom() + 2.0),
                Align2::CENTER_TOP,
                tick_text(&label),
                font.clone(),
                theme::MUTED,
            );
        }
    }
    painter.text(
        Pos2::new(plot.center().x, plot.bottom() + 17.0),
        Align2::CENTER_TOP,
        x_label,
        font,
        theme::MUTED,
    );
}

/// A plain number for a hover read-out.
fn plain(v: f64) -> String {
    if v == 0.0 || !v.is_finite() {
        return format!("{v}");
    }
    let digits = (4 - v.abs().log10().floor() as i32).clamp(0, 8) as usize;
    let text = format!("{v:.digits$}");
    if text.contains('.') {
        text.trim_end_matches('0').trim_end_matches('.').to_owned()
    } else {
        text
    }
}

/// A line plot; `log_y` plots log10 of positive values. Curves that coincide are named under
/// the plot (the later one would hide the earlier).
pub fn line_plot_ui(
    ui: &mut egui::Ui,
    name: &str,
    series: &[Series],
    x_label: &str,
    y_label: &str,
    log_y: bool,
) -> egui::Response {
    let keys: Vec<Key<'_>> = series
        .iter()
        .map(|s| Key {
            name: &s.name,
            color: s.color,
            dash: Some(s.dash),
        })
        .collect();
    let (response, painter, plot) = frame(ui, name, 190.0, y_label, &keys);
    let ty = |y: f64| {
        if log_y {
            if y > 0.0 {
                y.log10()
            } else {
                f64::NAN
            }
        } else {
            y
        }
    };
    let pts: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|s| s.points.iter().map(|&(x, y)| (x, ty(y))))
        .filter(|p| p.0.is_finite() && p.1.is_finite())
        .collect();
    if pts.is_empty() {
        return response;
    }
    let (mut x0, mut x1, mut y0, mut y1) = (
        f64::INFINITY,
        f64::NEG_INFINITY,
        f64::INFINITY,
        f64::NEG_INFINITY,
    );
    for &(x, y) in &pts {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    let (y0, y1) = if log_y {
        (y0.floor(), y1.ceil().max(y0.floor() + 1.0))
    } else {
        crate::export::nice_bounds(y0, y1, crate::export::AXIS_TICKS)
    };
    axes(&painter, plot, Some((x0, x1)), (y0, y1), x_label, log_y);
    let to_screen = |x: f64, y: f64| {
        Pos2::new(
            plot.left() + ((x - x0) / (x1 - x0)) as f32 * plot.width(),
            plot.bottom() - ((y - y0) / (y1 - y0)) as f32 * plot.height(),
        )
    };
    for s in series {
        let line: Vec<Pos2> = s
            .points
            .iter()
            .map(|&(x, y)| (x, ty(y)))
            .filter(|p| p.0.is_finite() && p.1.is_finite())
            .map(|(x, y)| to_screen(x, y))
            .collect();
        stroke_line(&painter, line, Stroke::new(1.8, s.color), s.dash);
    }
    // Within half a pixel's worth of the axis, one curve would hide the other.
    let tolerance = 0.5 * (y1 - y0) / f64::from(plot.height().max(1.0));
    let same = coinciding(series, &ty, tolerance);
    if !same.is_empty() {
        ui.label(
            egui::RichText::new(format!(
                "{}: the curves coincide (within half a pixel), one drawn over the other",
                same.join("; ")
            ))
            .small()
            .color(theme::MUTED),
        );
    }
    if let Some(pos) = response.hover_pos() {
        let x = x0 + f64::from((pos.x - plot.left()) / plot.width()) * (x1 - x0);
        let mut text = format!("{x_label} {}", plain(x));
        for s in series {
            if let Some(&(px, py)) = s
                .points
                .iter()
                .filter(|p| p.0.is_finite() && p.1.is_finite())
                .min_by(|a, b| (a.0 - x).abs().total_cmp(&(b.0 - x).abs()))
            {
                let _ = write!(text, "\n{}: {} at {}", s.name, plain(py), plain(px));
            }
        }
        return response.on_hover_text_at_pointer(text);
    }
    response
}

/// Pairs of series whose points agree within `tolerance` on the plotted scale (`ty` maps a
/// value to it), as "X = Y".
fn coinciding(series: &[Series], ty: &dyn Fn(f64) -> f64, tolerance: f64) -> Vec<String> {
    let mut out = Vec::new();
    for (i, a) in series.iter().enumerate() {
        for b in &series[i + 1..] {
            let same = !a.points.is_empty()
                && a.points.len() == b.points.len()
                && a.points.iter().zip(&b.points).all(|(p, q)| {
                    let (yp, yq) = (ty(p.1), ty(q.1));
                    (p.0 - q.0).abs() <= 1e-12 * p.0.abs().max(1.0)
                        && ((yp - yq).abs() <= tolerance || (yp.is_nan() && yq.is_nan()))
                });
            if same {
                out.push(format!("{} = {}", a.name, b.name));
            }
        }
    }
    out
}

/// Overlaid histograms on shared bins; hovering a bin reads out its range and counts.
pub fn histogram_ui(
    ui: &mut egui::Ui,
    name: &str,
    series: &[(&str, Color32, &[f32])],
    bins: usize,
    x_label: &str,
) -> egui::Response {
    let keys: Vec<Key<'_>> = series
        .iter()
        .map(|s| Key {
            name: s.0,
            color: s.1.gamma_multiply(0.55),
            dash: None,
        })
        .collect();
    let (response, painter, plot) = frame(ui, name, 170.0, "pairs", &keys);
    let all = series
        .iter()
        .flat_map(|s| s.2.iter().copied())
        .filter(|v| v.is_finite());
    let (lo, hi) = all.fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), v| {
        (a.min(v), b.max(v))
    });
    if !lo.is_finite() {
        return response;
    }
    let hi = if hi > lo { hi } else { lo + 1e-6 };
    let bins = bins.max(1);
    let counts: Vec<Vec<usize>> = series
        .iter()
        .map(|s| {
            let mut c = vec![0usize; bins];
            for &v in s.2.iter().filter(|v| v.is_finite()) {
                let b = (((v - lo) / (hi - lo)) * bins as f32) as usize;
                c[b.min(bins - 1)] += 1;
            }
            c
        })
        .collect();
    let max = counts.iter().flatten().copied().max().unwrap_or(1).max(1);
    let (_, top) = crate::export::nice_bounds(0.0, max as f64, crate::export::AXIS_TICKS);
    axes(
        &painter,
        plot,
        Some((f64::from(lo), f64::from(hi))),
        (0.0, top),
        x_label,
        false,
    );
    let w = plot.width() / bins as f32;
    for (s, c) in series.iter().zip(&counts) {
        for (b, &n) in c.iter().enumerate() {
            let h = (n as f64 / top) as f32 * plot.height();
            let r = Rect::from_min_max(
                Pos2::new(plot.left() + b as f32 * w, plot.bottom() - h),
                Pos2::new(plot.left() + (b + 1) as f32 * w, plot.bottom()),
            );
            painter.rect_filled(r, 0.0, s.1.gamma_multiply(0.55));
        }
    }
    if let Some(pos) = response.hover_pos() {
        if plot.contains(pos) {
            let b = (((pos.x - plot.left()) / w) as usize).min(bins - 1);
            let width = (hi - lo) / bins as f32;
            let from = lo + b as f32 * width;
            let mut text = format!(
                "{x_label} {} to {}",
                plain(f64::from(from)),
                plain(f64::from(from + width))
            );
            for (s, c) in series.iter().zip(&counts) {
                let _ = write!(text, "\n{}: {}", s.0, c[b]);
            }
            return response.on_hover_text_at_pointer(text);
        }
    }
    response
}

/// The `(row, column)` of a grid of `cell`-sized cells from `origin` under `p`, if any.
pub fn grid_cell_at(
    origin: Pos2,
    cell: Vec2,
    (rows, cols): (usize, usize),
    p: Pos2,
) -> Option<(usize, usize)> {
    let v = p - origin;
    let (i, j) = ((v.y / cell.y).floor(), (v.x / cell.x).floor());
    (v.x >= 0.0 && v.y >= 0.0 && (i as usize) < rows && (j as usize) < cols)
        .then_some((i as usize, j as usize))
}

/// A grid of counts (rows × columns) in the viridis scale, with row labels at the left, column
/// labels below, a colour scale, and `highlighted` cells outlined (e.g. the heads whose pairs
/// contain a searched word); returns the clicked cell.
pub fn count_grid_ui(
    ui: &mut egui::Ui,
    name: &str,
    values: &Matrix,
    (row_name, col_name): (&str, &str),
    selected: Option<(usize, usize)>,
    highlighted: &[(usize, usize)],
) -> (egui::Response, Option<(usize, usize)>) {
    let (rows, cols) = (values.rows, values.cols);
    let label_w = 52.0;
    let scale_h = 30.0;
    let cell = Vec2::new(
        ((ui.available_width() - label_w) / cols.max(1) as f32).clamp(8.0, 28.0),
        9.0,
    );
    let grid_h = cell.y * rows as f32;
    let size = Vec2::new(label_w + cell.x * cols as f32, grid_h + 14.0 + scale_h);
    let (rect, _) = ui.allocate_exact_size(size, Sense::hover());
    let origin = rect.min + Vec2::new(label_w, 0.0);
    // The cells answer clicks and hovers; the labels and the scale around them do not.
    let cells = Rect::from_min_size(origin, Vec2::new(cell.x * cols as f32, grid_h));
    let response = ui.interact(cells, ui.scope_id().with(name), Sense::click());
    let label = name.to_owned();
    response
        .widget_info(move || egui::WidgetInfo::labeled(egui::Role::Figure, true, label.clone()));
    let painter = ui.painter_at(rect);
    let font = FontId::proportional(9.0);
    let max = values.data.iter().copied().fold(0f32, f32::max).max(1.0);
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
                theme::level_color(values.get(i, j) / max),
            );
        }
        if i % 5 == 0 {
            painter.text(
                Pos2::new(origin.x - 4.0, origin.y + (i as f32 + 0.5) * cell.y),
                Align2::RIGHT_CENTER,
                format!("{row_name} {i}"),
                font.clone(),
                theme::MUTED,
            );
        }
    }
    let stride = if cell.x >= 14.0 { 1 } else { 4 };
    for j in (0..cols).step_by(stride) {
        painter.text(
            Pos2::new(
                origin.x + (j as f32 + 0.5) * cell.x,
                origin.y + grid_h + 1.0,
            ),
            Align2::CENTER_TOP,
            j.to_string(),
            font.clone(),
            theme::MUTED,
        );
    }
    painter.text(
        Pos2::new(origin.x - 4.0, origin.y + grid_h + 1.0),
        Align2::RIGHT_TOP,
        col_name,
        font.clone(),
        theme::MUTED,
    );
    for &(i, j) in highlighted {
        if i < rows && j < cols {
            painter.rect_stroke(
                cell_rect(i, j),
                0.0,
                Stroke::new(1.5, theme::INSTRUCTION),
                egui::StrokeKind::Inside,
            );
        }
    }
    if let Some((i, j)) = selected {
        if i < rows && j < cols {
            painter.rect_stroke(
                cell_rect(i, j),
                0.0,
                Stroke::new(2.0, theme::HOVER_OUTLINE),
                egui::StrokeKind::Inside,
            );
        }
    }
    // The colour scale: 0 to the largest count.
    let bar = Rect::from_min_size(
        Pos2::new(origin.x, origin.y + grid_h + 16.0),
        Vec2::new((cell.x * cols as f32).min(160.0), 7.0),
    );
    let steps = 32;
    for k in 0..steps {
        let r = Rect::from_min_size(
            Pos2::new(
                bar.left() + bar.width() * k as f32 / steps as f32,
                bar.top(),
            ),
            Vec2::new(bar.width() / steps as f32 + 0.5, bar.height()),
        );
        painter.rect_filled(r, 0.0, theme::level_color(k as f32 / (steps - 1) as f32));
    }
    painter.text(
        Pos2::new(bar.left() - 4.0, bar.center().y),
        Align2::RIGHT_CENTER,
        "0",
        font.clone(),
        theme::MUTED,
    );
    painter.text(
        Pos2::new(bar.right() + 4.0, bar.center().y),
        Align2::LEFT_CENTER,
        format!("{max:.0} pairs"),
        font,
        theme::MUTED,
    );
    let at = |p: Pos2| grid_cell_at(origin, cell, (rows, cols), p);
    let clicked = if response.clicked() {
        response.interact_pointer_pos().and_then(at)
    } else {
        None
    };
    if let Some((i, j)) = response.hover_pos().and_then(at) {
        let found = if highlighted.contains(&(i, j)) {
            " (matches the search)"
        } else {
            ""
        };
        let text = format!(
            "{row_name} {i}, {col_name} {j}: {} pairs{found}",
            values.get(i, j)
        );
        return (response.on_hover_text_at_pointer(text), clicked);
    }
    (response, clicked)
}

/// One series of grouped bars: name, colour, `(mean, ± whisker)` per group.
pub type BarSeries<'a> = (&'a str, Color32, Vec<(f64, f64)>);

/// Grouped bars: per group, one bar per series with a ± whisker; hovering a group reads out
/// its values.
pub fn grouped_bars_ui(
    ui: &mut egui::Ui,
    name: &str,
    groups: &[String],
    series: &[BarSeries<'_>],
    y_label: &str,
) -> egui::Response {
    let keys: Vec<Key<'_>> = series
        .iter()
        .map(|s| Key {
            name: s.0,
            color: s.1,
            dash: None,
        })
        .collect();
    let (response, painter, plot) = frame(ui, name, 170.0, y_label, &keys);
    let max = series
        .iter()
        .flat_map(|s| {
            s.2.iter()
                .map(|(m, e)| m + if e.is_finite() { *e } else { 0.0 })
        })
        .filter(|v| v.is_finite())
        .fold(0f64, f64::max)
        .max(1e-9);
    let (_, top) = crate::export::nice_bounds(0.0, max, crate::export::AXIS_TICKS);
    axes(&painter, plot, None, (0.0, top), "", false);
    let gw = plot.width() / groups.len().max(1) as f32;
    let bw = gw * 0.8 / series.len().max(1) as f32;
    let y = |v: f64| plot.bottom() - (v / top) as f32 * plot.height();
    for (g, label) in groups.iter().enumerate() {
        for (k, s) in series.iter().enumerate() {
            let Some(&(mean, err)) = s.2.get(g) else {
                continue;
            };
            if !mean.is_finite() {
                continue;
            }
            let x = plot.left() + g as f32 * gw + gw * 0.1 + k as f32 * bw;
            painter.rect_filled(
                Rect::from_min_max(
                    Pos2::new(x, y(mean)),
                    Pos2::new(x + bw * 0.9, plot.bottom()),
                ),
                0.0,
                s.1,
            );
            if err.is_finite() {
                let cx = x + bw * 0.45;
                painter.line_segment(
                    [
                        Pos2::new(cx, y(mean - err).min(plot.bottom())),
                        Pos2::new(cx, y(mean + err)),
                    ],
                    Stroke::new(1.0, theme::MUTED),
                );
            }
        }
        painter.text(
            Pos2::new(plot.left() + (g as f32 + 0.5) * gw, plot.bottom() + 2.0),
            Align2::CENTER_TOP,
            label,
            FontId::proportional(FONT),
            theme::MUTED,
        );
    }
    if let Some(pos) = response.hover_pos() {
        if plot.contains(pos) {
            let g = (((pos.x - plot.left()) / gw) as usize).min(groups.len().saturating_sub(1));
            if let Some(label) = groups.get(g) {
                let mut text = label.clone();
                for s in series {
                    if let Some(&(m, e)) = s.2.get(g) {
                        let _ = write!(text, "\n{}: {} ± {}", s.0, plain(m), plain(e));
                    }
                }
                return response.on_hover_text_at_pointer(text);
            }
        }
    }
    response
}

/// Box plots: per group, the minimum, quartiles, median and maximum of its values (linear
/// interpolation between order statistics, as numpy's default percentile); hovering a box
/// reads them out.
pub fn box_plot_ui(
    ui: &mut egui::Ui,
    name: &str,
    groups: &[(String, Color32, Vec<f64>)],
    y_label: &str,
) -> egui::Response {
    let (response, painter, plot) = frame(ui, name, 170.0, y_label, &[]);
    let finite: Vec<f64> = groups
        .iter()
        .flat_map(|g| g.2.iter().copied())
        .filter(|v| v.is_finite())
        .collect();
    let (lo, hi) = finite
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| {
            (a.min(v), b.max(v))
        });
    if !lo.is_finite() {
        return response;
    }
    let (lo, hi) = crate::export::nice_bounds(lo, hi, crate::export::AXIS_TICKS);
    axes(&painter, plot, None, (lo, hi), "", false);
    let y = |v: f64| plot.bottom() - ((v - lo) / (hi - lo)) as f32 * plot.height();
    let gw = plot.width() / groups.len().max(1) as f32;
    let mut summaries = Vec::with_capacity(groups.len());
    for (g, (label, color, values)) in groups.iter().enumerate() {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            summaries.push(None);
            continue;
        }
        v.sort_by(f64::total_cmp);
        let q = |p: f64| {
            let at = p * (v.len() - 1) as f64;
            let (i, frac) = (at.floor() as usize, at.fract());
            v[i] + (v[(i + 1).min(v.len() - 1)] - v[i]) * frac
        };
        summaries.push(Some([q(0.0), q(0.25), q(0.5), q(0.75), q(1.0)]));
        let cx = plot.left() + (g as f32 + 0.5) * gw;
        let half = gw * 0.2;
        let stroke = Stroke::new(1.5, *color);
        painter.line_segment([Pos2::new(cx, y(q(0.0))), Pos2::new(cx, y(q(1.0)))], stroke);
        painter.rect_filled(
            Rect::from_min_max(
                Pos2::new(cx - half, y(q(0.75))),
                Pos2::new(cx + half, y(q(0.25))),
            ),
            0.0,
            color.gamma_multiply(0.5),
        );
        painter.line_segment(
            [
                Pos2::new(cx - half, y(q(0.5))),
                Pos2::new(cx + half, y(q(0.5))),
            ],
            Stroke::new(2.0, theme::HOVER_OUTLINE),
        );
        for p in [0.0, 1.0] {
            painter.line_segment(
                [
                    Pos2::new(cx - half / 2.0, y(q(p))),
                    Pos2::new(cx + half / 2.0, y(q(p))),
                ],
                stroke,
            );
        }
        painter.text(
            Pos2::new(cx, plot.bottom() + 2.0),
            Align2::CENTER_TOP,
            label,
            FontId::proportional(FONT),
            theme::MUTED,
        );
    }
    if let Some(pos) = response.hover_pos() {
        if plot.contains(pos) {
            let g = (((pos.x - plot.left()) / gw) as usize).min(groups.len().saturating_sub(1));
            if let (Some((label, _, _)), Some(Some(q))) = (groups.get(g), summaries.get(g)) {
                let text = format!(
                    "{label}: min {}, quartiles {} / {} / {}, max {}",
                    plain(q[0]),
                    plain(q[1]),
                    plain(q[2]),
                    plain(q[3]),
                    plain(q[4])
                );
                return response.on_hover_text_at_pointer(text);
            }
        }
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(name: &str, points: &[(f64, f64)]) -> Series {
        Series {
            name: name.to_owned(),
            points: points.to_vec(),
            ..Series::default()
        }
    }

    #[test]
    fn coinciding_curves_are_named() {
        let a = series("A", &[(0.0, 1.0), (1.0, 2.0)]);
        let b = series("B", &[(0.0, 1.0), (1.0, 2.0 + 1e-12)]);
        let c = series("C", &[(0.0, 1.0), (1.0, 2.5)]);
        let same = |y: f64| y;
        assert_eq!(
            coinciding(&[a, b, c], &same, 1e-9),
            vec!["A = B".to_owned()]
        );
    }

    #[test]
    fn log_ticks_are_plain_numbers() {
        let t: Vec<String> = log_ticks(-3.0, 1.0).into_iter().map(|t| t.1).collect();
        assert_eq!(t, vec!["0.001", "0.01", "0.1", "1", "10"]);
        assert_eq!(plain(0.000_123_4), "0.0001234");
        assert_eq!(tick_text("\u{2212}0.5"), "-0.5");
    }
}
