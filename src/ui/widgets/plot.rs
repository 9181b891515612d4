//! Small painted plots over plain data: line plots, overlaid histograms, a clickable count grid
//! and grouped bars with whiskers. Each is one allocated rect with an accessible name and a
//! hover read-out; no plotting dependency.

use std::fmt::Write as _;

use eframe::egui::{self, Align2, Color32, FontId, Pos2, Rect, Sense, Stroke, Vec2};

use crate::analysis::types::Matrix;
use crate::ui::theme;

const FONT: f32 = 11.0;
const MARGIN_LEFT: f32 = 44.0;
const MARGIN_BOTTOM: f32 = 22.0;

/// One curve.
pub struct Series {
    /// Legend name.
    pub name: String,
    /// Colour.
    pub color: Color32,
    /// `(x, y)` points; non-finite points are skipped.
    pub points: Vec<(f64, f64)>,
}

fn frame(ui: &mut egui::Ui, name: &str, height: f32) -> (egui::Response, egui::Painter, Rect) {
    let size = Vec2::new(ui.available_width().clamp(200.0, 900.0), height);
    let (rect, _) = ui.allocate_exact_size(size, Sense::hover());
    let response = ui.interact(rect, ui.scope_id().with(name), Sense::click());
    let label = name.to_owned();
    response
        .widget_info(move || egui::WidgetInfo::labeled(egui::Role::Figure, true, label.clone()));
    let painter = ui.painter_at(rect);
    let plot = Rect::from_min_max(
        rect.min + Vec2::new(MARGIN_LEFT, 6.0),
        rect.max - Vec2::new(8.0, MARGIN_BOTTOM),
    );
    painter.rect_stroke(
        plot,
        0.0,
        Stroke::new(1.0, theme::MUTED),
        egui::StrokeKind::Inside,
    );
    (response, painter, plot)
}

fn axis_text(
    painter: &egui::Painter,
    plot: Rect,
    x: (f64, f64),
    y: (f64, f64),
    x_label: &str,
    y_label: &str,
    log_y: bool,
) {
    let font = FontId::proportional(FONT);
    let fmt_x = |v: f64| {
        if v.abs() >= 100.0 || v == 0.0 || v.fract() == 0.0 {
            format!("{v:.0}")
        } else {
            format!("{v:.3}")
        }
    };
    let fmt = |v: f64| {
        if log_y {
            format!("{:.0e}", 10f64.powf(v))
        } else if v.abs() >= 100.0 || v == 0.0 {
            format!("{v:.0}")
        } else {
            format!("{v:.3}")
        }
    };
    painter.text(
        Pos2::new(plot.left() - 3.0, plot.top()),
        Align2::RIGHT_TOP,
        fmt(y.1),
        font.clone(),
        theme::MUTED,
    );
    painter.text(
        Pos2::new(plot.left() - 3.0, plot.bottom()),
        Align2::RIGHT_BOTTOM,
        fmt(y.0),
        font.clone(),
        theme::MUTED,
    );
    painter.text(
        Pos2::new(plot.left(), plot.bottom() + 2.0),
        Align2::LEFT_TOP,
        fmt_x(x.0),
        font.clone(),
        theme::MUTED,
    );
    painter.text(
        Pos2::new(plot.right(), plot.bottom() + 2.0),
        Align2::RIGHT_TOP,
        fmt_x(x.1),
        font.clone(),
        theme::MUTED,
    );
    painter.text(
        Pos2::new(plot.center().x, plot.bottom() + 2.0),
        Align2::CENTER_TOP,
        x_label,
        font.clone(),
        theme::MUTED,
    );
    painter.text(
        Pos2::new(plot.left() + 4.0, plot.top() + 2.0),
        Align2::LEFT_TOP,
        y_label,
        font,
        theme::MUTED,
    );
}

fn legend(painter: &egui::Painter, plot: Rect, items: &[(&str, Color32)]) {
    let font = FontId::proportional(FONT);
    for (i, (name, color)) in items.iter().enumerate() {
        let y = plot.top() + 16.0 + 14.0 * i as f32;
        painter.line_segment(
            [
                Pos2::new(plot.right() - 270.0, y),
                Pos2::new(plot.right() - 254.0, y),
            ],
            Stroke::new(2.5, *color),
        );
        painter.text(
            Pos2::new(plot.right() - 250.0, y),
            Align2::LEFT_CENTER,
            *name,
            font.clone(),
            theme::MUTED,
        );
    }
}

/// A line plot; `log_y` plots log10 of positive values.
pub fn line_plot_ui(
    ui: &mut egui::Ui,
    name: &str,
    series: &[Series],
    x_label: &str,
    y_label: &str,
    log_y: bool,
) -> egui::Response {
    let (response, painter, plot) = frame(ui, name, 190.0);
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
    if y1 <= y0 {
        y1 = y0 + 1.0;
    }
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
        painter.add(egui::Shape::line(line, Stroke::new(1.8, s.color)));
    }
    axis_text(&painter, plot, (x0, x1), (y0, y1), x_label, y_label, log_y);
    let items: Vec<(&str, Color32)> = series.iter().map(|s| (s.name.as_str(), s.color)).collect();
    legend(&painter, plot, &items);
    if let Some(pos) = response.hover_pos() {
        let x = x0 + f64::from((pos.x - plot.left()) / plot.width()) * (x1 - x0);
        let mut text = format!("{x_label} {x:.1}");
        for s in series {
            if let Some(&(px, py)) = s
                .points
                .iter()
                .min_by(|a, b| (a.0 - x).abs().total_cmp(&(b.0 - x).abs()))
            {
                let _ = write!(text, "\n{}: {py:.4} at {px}", s.name);
            }
        }
        return response.on_hover_text_at_pointer(text);
    }
    response
}

/// Overlaid histograms on shared bins.
pub fn histogram_ui(
    ui: &mut egui::Ui,
    name: &str,
    series: &[(&str, Color32, &[f32])],
    bins: usize,
    x_label: &str,
) -> egui::Response {
    let (response, painter, plot) = frame(ui, name, 170.0);
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
    let w = plot.width() / bins as f32;
    for (s, c) in series.iter().zip(&counts) {
        for (b, &n) in c.iter().enumerate() {
            let h = n as f32 / max as f32 * plot.height();
            let r = Rect::from_min_max(
                Pos2::new(plot.left() + b as f32 * w, plot.bottom() - h),
                Pos2::new(plot.left() + (b + 1) as f32 * w, plot.bottom()),
            );
            painter.rect_filled(r, 0.0, s.1.gamma_multiply(0.55));
        }
    }
    axis_text(
        &painter,
        plot,
        (f64::from(lo), f64::from(hi)),
        (0.0, max as f64),
        x_label,
        "pairs",
        false,
    );
    let items: Vec<(&str, Color32)> = series.iter().map(|s| (s.0, s.1)).collect();
    legend(&painter, plot, &items);
    response
}

/// A grid of counts (rows × columns) in the viridis scale; returns the clicked cell.
pub fn count_grid_ui(
    ui: &mut egui::Ui,
    name: &str,
    values: &Matrix,
    row_name: &str,
    col_name: &str,
    selected: Option<(usize, usize)>,
) -> (egui::Response, Option<(usize, usize)>) {
    let (rows, cols) = (values.rows, values.cols);
    let cell = Vec2::new(
        ((ui.available_width() - 40.0) / cols.max(1) as f32).clamp(8.0, 28.0),
        9.0,
    );
    let size = Vec2::new(40.0 + cell.x * cols as f32, cell.y * rows as f32 + 4.0);
    let (rect, _) = ui.allocate_exact_size(size, Sense::hover());
    let response = ui.interact(rect, ui.scope_id().with(name), Sense::click());
    let label = name.to_owned();
    response
        .widget_info(move || egui::WidgetInfo::labeled(egui::Role::Figure, true, label.clone()));
    let painter = ui.painter_at(rect);
    let origin = rect.min + Vec2::new(40.0, 0.0);
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
                FontId::proportional(9.0),
                theme::MUTED,
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
    let at = |p: Pos2| {
        let v = p - origin;
        let (i, j) = ((v.y / cell.y).floor(), (v.x / cell.x).floor());
        (v.x >= 0.0 && v.y >= 0.0 && (i as usize) < rows && (j as usize) < cols)
            .then_some((i as usize, j as usize))
    };
    let clicked = if response.clicked() {
        response.interact_pointer_pos().and_then(at)
    } else {
        None
    };
    if let Some((i, j)) = response.hover_pos().and_then(at) {
        let text = format!("{row_name} {i}, {col_name} {j}: {} pairs", values.get(i, j));
        return (response.on_hover_text_at_pointer(text), clicked);
    }
    (response, clicked)
}

/// One series of grouped bars: name, colour, `(mean, ± whisker)` per group.
pub type BarSeries<'a> = (&'a str, Color32, Vec<(f64, f64)>);

/// Grouped bars: per group, one bar per series with a ± whisker.
pub fn grouped_bars_ui(
    ui: &mut egui::Ui,
    name: &str,
    groups: &[String],
    series: &[BarSeries<'_>],
    y_label: &str,
) -> egui::Response {
    let (response, painter, plot) = frame(ui, name, 170.0);
    let max = series
        .iter()
        .flat_map(|s| {
            s.2.iter()
                .map(|(m, e)| m + if e.is_finite() { *e } else { 0.0 })
        })
        .filter(|v| v.is_finite())
        .fold(0f64, f64::max)
        .max(1e-9);
    let gw = plot.width() / groups.len().max(1) as f32;
    let bw = gw * 0.8 / series.len().max(1) as f32;
    let y = |v: f64| plot.bottom() - (v / max) as f32 * plot.height();
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
    painter.text(
        Pos2::new(plot.left() - 3.0, plot.top()),
        Align2::RIGHT_TOP,
        format!("{max:.2}"),
        FontId::proportional(FONT),
        theme::MUTED,
    );
    painter.text(
        Pos2::new(plot.left() + 4.0, plot.top() + 2.0),
        Align2::LEFT_TOP,
        y_label,
        FontId::proportional(FONT),
        theme::MUTED,
    );
    let items: Vec<(&str, Color32)> = series.iter().map(|s| (s.0, s.1)).collect();
    legend(&painter, plot, &items);
    response
}

/// Box plots: per group, the minimum, quartiles, median and maximum of its values (linear
/// interpolation between order statistics, as numpy's default percentile).
pub fn box_plot_ui(
    ui: &mut egui::Ui,
    name: &str,
    groups: &[(String, Color32, Vec<f64>)],
    y_label: &str,
) -> egui::Response {
    let (response, painter, plot) = frame(ui, name, 170.0);
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
    let pad = ((hi - lo) * 0.1).max(1e-3);
    let (lo, hi) = (lo - pad, hi + pad);
    let y = |v: f64| plot.bottom() - ((v - lo) / (hi - lo)) as f32 * plot.height();
    let gw = plot.width() / groups.len().max(1) as f32;
    for (g, (label, color, values)) in groups.iter().enumerate() {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            continue;
        }
        v.sort_by(f64::total_cmp);
        let q = |p: f64| {
            let at = p * (v.len() - 1) as f64;
            let (i, frac) = (at.floor() as usize, at.fract());
            v[i] + (v[(i + 1).min(v.len() - 1)] - v[i]) * frac
        };
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
    axis_text(&painter, plot, (0.0, 0.0), (lo, hi), "", y_label, false);
    response
}
