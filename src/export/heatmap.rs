//! Layout and drawing of heatmap panels: coloured cells with row and column labels (thinned
//! when crowded, turned when wide) and a colour bar with ticks and a caption. Sequential values
//! use viridis; signed values a blue–white–red map symmetric about zero; NaN cells are grey.
//! Depends only on `canvas`, `panels` and the figure types.

use plotters::prelude::DrawingBackend;
use plotters::style::text_anchor::{HPos, VPos};
use plotters::style::{Color as _, RGBColor};

use super::canvas::{
    diverging, fit, label_stride, line_h, map, measure, sane_range, tick_label, ticks, viridis,
    Canvas, Drawn, Label, Rect, AXIS, AXIS_W, LABEL_PT, NAN_GREY, PAD, TICK_LEN, TICK_PT,
};
use super::figure::{ColorScale, Heatmap};
use super::panels::{
    draw_axis_labels, draw_title, finite_range, max_width, no_data, title_block, CategoryLabels,
    PANEL_W, TICKS,
};

/// Gap between the heatmap and its colour bar, and the colour bar's width.
const CB_GAP: f64 = 6.0;
const CB_W: f64 = 7.0;

/// Everything about a heatmap panel that does not depend on its height.
struct HeatFrame {
    left: f64,
    right: f64,
    top: f64,
    bottom: f64,
    title: Vec<String>,
    rows: Vec<String>,
    cols: CategoryLabels,
    range: (f64, f64),
    /// Widest colour-bar tick label.
    cb_tick_w: f64,
}

fn heat_range(h: &Heatmap) -> (f64, f64) {
    let n = h.values.rows * h.values.cols;
    let values = h.values.data.iter().take(n).map(|&v| f64::from(v));
    match h.scale {
        ColorScale::Sequential => match finite_range(values) {
            // All zero: show zeros at the bottom of the scale.
            Some((lo, hi)) if lo == 0.0 && hi == 0.0 => (0.0, 1.0),
            Some((lo, hi)) => sane_range(lo, hi),
            None => (0.0, 1.0),
        },
        ColorScale::Diverging => {
            let m = finite_range(values).map_or(1.0, |(lo, hi)| lo.abs().max(hi.abs()));
            if m > 0.0 && m.is_finite() {
                (-m, m)
            } else {
                (-1.0, 1.0)
            }
        }
    }
}

fn heat_frame(h: &Heatmap, width: f64) -> HeatFrame {
    let (n_rows, n_cols) = (h.values.rows, h.values.cols);
    let range = heat_range(h);
    let cb_tick_w = ticks(range.0, range.1, TICKS)
        .iter()
        .map(|(_, s)| measure(s, TICK_PT))
        .fold(0.0, f64::max);
    let caption = if h.value_label.trim().is_empty() {
        0.0
    } else {
        4.0 + line_h(LABEL_PT)
    };
    let right = CB_GAP + CB_W + TICK_LEN + 2.0 + cb_tick_w + caption + PAD;
    let rows: Vec<String> = (0..n_rows)
        .map(|i| tick_label(h.row_labels.get(i).map_or("", String::as_str)))
        .collect();
    let y_desc = if h.y_label.trim().is_empty() {
        0.0
    } else {
        line_h(LABEL_PT) + 2.0
    };
    let left = PAD + y_desc + max_width(&rows, TICK_PT) + 3.0 + TICK_LEN;
    let plot_w = (width - left - right).max(10.0);
    let cols = CategoryLabels::new(&h.col_labels, n_cols, plot_w / n_cols.max(1) as f64);
    let (title, top) = title_block(&h.title, width);
    let x_desc = if h.x_label.trim().is_empty() {
        0.0
    } else {
        3.0 + line_h(LABEL_PT)
    };
    HeatFrame {
        left,
        right,
        top,
        bottom: 3.0 + cols.height + x_desc + PAD,
        title,
        rows,
        cols,
        range,
        cb_tick_w,
    }
}

pub(crate) fn heatmap_size(h: &Heatmap) -> (f64, f64) {
    let f = heat_frame(h, PANEL_W);
    let plot_w = (PANEL_W - f.left - f.right).max(10.0);
    let cell = (plot_w / h.values.cols.max(1) as f64).clamp(9.0, 12.0);
    let plot_h = (h.values.rows as f64 * cell).clamp(48.0, 300.0);
    (PANEL_W, f.top + plot_h + f.bottom)
}

pub(crate) fn draw_heatmap<DB: DrawingBackend>(c: &Canvas<'_, DB>, h: &Heatmap, r: Rect) -> Drawn {
    let f = heat_frame(h, r.w());
    let x0 = r.x0 + f.left;
    let y0 = r.y0 + f.top;
    let plot = Rect::new(
        x0,
        y0,
        (r.x1 - f.right).max(x0 + 1.0),
        (r.y1 - f.bottom).max(y0 + 1.0),
    );
    let (n_rows, n_cols) = (h.values.rows, h.values.cols);
    let color_of = |v: f32| -> RGBColor {
        let v = f64::from(v);
        if !v.is_finite() {
            return NAN_GREY;
        }
        let t = map(v, f.range, (0.0, 1.0));
        match h.scale {
            ColorScale::Sequential => viridis(t),
            ColorScale::Diverging => diverging(t),
        }
    };
    draw_title(c, &f.title, r, plot)?;
    if n_rows == 0 || n_cols == 0 {
        no_data(c, plot)?;
    } else {
        let (cw, ch) = (plot.w() / n_cols as f64, plot.h() / n_rows as f64);
        for i in 0..n_rows {
            for j in 0..n_cols {
                let v = h
                    .values
                    .data
                    .get(i * n_cols + j)
                    .copied()
                    .unwrap_or(f32::NAN);
                let x = plot.x0 + j as f64 * cw;
                let y = plot.y0 + i as f64 * ch;
                c.fill_rect(Rect::new(x, y, x + cw, y + ch), color_of(v).to_rgba())?;
            }
        }
        // Row labels, every `stride`-th when rows are too close for all.
        let stride = label_stride(ch, TICK_PT * 1.15);
        if stride != usize::MAX {
            for (i, label) in f.rows.iter().enumerate().step_by(stride) {
                let y = plot.y0 + (i as f64 + 0.5) * ch;
                let mut x = plot.x0 - 3.0;
                if stride > 1 {
                    c.line(
                        &[(plot.x0 - TICK_LEN, y), (plot.x0, y)],
                        AXIS.to_rgba(),
                        AXIS_W,
                    )?;
                    x -= TICK_LEN;
                }
                c.text(
                    &Label::new(label, TICK_PT, HPos::Right, VPos::Center),
                    (x, y),
                )?;
            }
        }
        f.cols.draw_x(c, plot, plot.y1 + 3.0)?;
    }
    c.frame(plot, AXIS.to_rgba(), 0.5)?;
    let below = plot.y1 + 3.0 + f.cols.height + 3.0;
    draw_axis_labels(c, (&h.x_label, &h.y_label), r, plot, below)?;
    draw_color_bar(c, h, &f, plot)
}

fn draw_color_bar<DB: DrawingBackend>(
    c: &Canvas<'_, DB>,
    h: &Heatmap,
    f: &HeatFrame,
    plot: Rect,
) -> Drawn {
    let bar = Rect::new(plot.x1 + CB_GAP, plot.y0, plot.x1 + CB_GAP + CB_W, plot.y1);
    let steps = (bar.h().ceil() as usize).clamp(2, 512);
    for k in 0..steps {
        let t = 1.0 - (k as f64 + 0.5) / steps as f64;
        let color = match h.scale {
            ColorScale::Sequential => viridis(t),
            ColorScale::Diverging => diverging(t),
        };
        let ya = bar.y0 + bar.h() * k as f64 / steps as f64;
        let yb = bar.y0 + bar.h() * (k + 1) as f64 / steps as f64;
        c.fill_rect(Rect::new(bar.x0, ya, bar.x1, yb), color.to_rgba())?;
    }
    c.frame(bar, AXIS.to_rgba(), 0.5)?;
    // Fewer ticks on a short bar; their labels are never wider than those measured for layout.
    let target = ((bar.h() / 28.0).floor() as usize).clamp(2, TICKS);
    for (v, s) in &ticks(f.range.0, f.range.1, target) {
        let y = map(*v, f.range, (bar.y1, bar.y0));
        c.line(
            &[(bar.x1, y), (bar.x1 + TICK_LEN, y)],
            AXIS.to_rgba(),
            AXIS_W,
        )?;
        let l = Label::new(s, TICK_PT, HPos::Left, VPos::Center);
        c.text(&l, (bar.x1 + TICK_LEN + 2.0, y))?;
    }
    if !h.value_label.trim().is_empty() {
        let x = bar.x1 + TICK_LEN + 2.0 + f.cb_tick_w + 4.0 + line_h(LABEL_PT) / 2.0;
        let caption = fit(&h.value_label, LABEL_PT, bar.h().max(20.0));
        let l = Label::new(&caption, LABEL_PT, HPos::Center, VPos::Center).turned();
        c.text(&l, (x, bar.cy()))?;
    }
    Ok(())
}
