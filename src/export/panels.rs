//! Layout and drawing of bar charts, histograms and line plots, and the pieces every panel
//! shares (titles, axis descriptions, categorical labels), in the paper style of
//! [`super::canvas`]: white background, thin left and bottom axes, no grid, outward ticks,
//! DejaVu Sans at 7.5–9.5 pt, titles wrapped to the panel width.
//!
//! Every function here accepts any data, including none: empty or non-finite data gives an
//! empty panel that says "no data", never a panic. Depends only on `canvas` and the figure types.

use plotters::prelude::DrawingBackend;
use plotters::style::text_anchor::{HPos, VPos};
use plotters::style::Color as _;

use super::canvas::{
    draw_legend, fit, label_stride, legend_height, line_h, map, measure, nice_bounds, sane_range,
    series_color, tick_label, ticks, wrap, Canvas, Drawn, Key, Label, LegendEntry, Rect, AXIS,
    AXIS_W, HIGHLIGHT, LABEL_PT, MUTED, NEUTRAL, PAD, TICK_LEN, TICK_PT, TITLE_PT,
};
use super::figure::{BarChart, Histogram, LinePlot};

/// Width of one panel: a single journal column (3.4 in).
pub(crate) const PANEL_W: f64 = 245.0;
/// Preferred plot-area height of bar charts, histograms and line plots.
const PLOT_H: f64 = 112.0;
/// Ticks aimed for on a numeric axis.
pub const TICKS: usize = 5;

/// Finite `(min, max)` of `values`, or `None`.
pub(crate) fn finite_range(values: impl IntoIterator<Item = f64>) -> Option<(f64, f64)> {
    values
        .into_iter()
        .filter(|v| v.is_finite())
        .fold(None, |acc, v| match acc {
            None => Some((v, v)),
            Some((lo, hi)) => Some((f64::min(lo, v), f64::max(hi, v))),
        })
}

pub(crate) fn max_width(labels: &[String], size_pt: f64) -> f64 {
    labels
        .iter()
        .map(|l| measure(l, size_pt))
        .fold(0.0, f64::max)
}

/// Title lines and the height they take (with padding above and below).
pub(crate) fn title_block(title: &str, width: f64) -> (Vec<String>, f64) {
    let lines = wrap(title, TITLE_PT, width - 2.0 * PAD, 2);
    let h = if lines.is_empty() {
        PAD
    } else {
        PAD + lines.len() as f64 * line_h(TITLE_PT) + 3.0
    };
    (lines, h)
}

/// Draws title lines centred over the plot, kept inside the panel.
pub(crate) fn draw_title<DB: DrawingBackend>(
    c: &Canvas<'_, DB>,
    lines: &[String],
    r: Rect,
    plot: Rect,
) -> Drawn {
    for (i, line) in lines.iter().enumerate() {
        let half = measure(line, TITLE_PT) / 2.0;
        let lo = r.x0 + PAD + half;
        let hi = r.x1 - PAD - half;
        let cx = if lo <= hi {
            plot.cx().clamp(lo, hi)
        } else {
            r.cx()
        };
        let y = r.y0 + PAD + i as f64 * line_h(TITLE_PT);
        c.text(
            &Label::new(line, TITLE_PT, HPos::Center, VPos::Top),
            (cx, y),
        )?;
    }
    Ok(())
}

/// The x-axis description below the plot (its top at `x_y`) and the y-axis description,
/// turned, at the panel's left edge; each shortened with '…' to the length it has.
pub(crate) fn draw_axis_labels<DB: DrawingBackend>(
    c: &Canvas<'_, DB>,
    (x_label, y_label): (&str, &str),
    r: Rect,
    plot: Rect,
    x_y: f64,
) -> Drawn {
    if !x_label.trim().is_empty() {
        let text = fit(x_label, LABEL_PT, r.w() - 2.0 * PAD);
        let half = measure(&text, LABEL_PT) / 2.0;
        let (lo, hi) = (r.x0 + PAD + half, r.x1 - PAD - half);
        let cx = if lo <= hi {
            plot.cx().clamp(lo, hi)
        } else {
            r.cx()
        };
        c.text(
            &Label::new(&text, LABEL_PT, HPos::Center, VPos::Top),
            (cx, x_y),
        )?;
    }
    if !y_label.trim().is_empty() {
        let text = fit(y_label, LABEL_PT, plot.h().max(20.0));
        let l = Label::new(&text, LABEL_PT, HPos::Center, VPos::Center).turned();
        c.text(&l, (r.x0 + PAD + line_h(LABEL_PT) / 2.0, plot.cy()))?;
    }
    Ok(())
}

pub(crate) fn no_data<DB: DrawingBackend>(c: &Canvas<'_, DB>, plot: Rect) -> Drawn {
    let label = Label::new("no data", TICK_PT, HPos::Center, VPos::Center).colored(MUTED);
    c.text(&label, (plot.cx(), plot.cy()))
}

/// Categorical labels along the x axis: which are shown and how.
pub(crate) struct CategoryLabels {
    labels: Vec<String>,
    /// Show every `stride`-th label.
    stride: usize,
    /// Turned to read bottom to top.
    turned: bool,
    /// Height the labels take below the axis (ticks included).
    pub height: f64,
}

impl CategoryLabels {
    pub(crate) fn new(raw: &[String], n: usize, pitch: f64) -> Self {
        let labels: Vec<String> = (0..n)
            .map(|i| tick_label(raw.get(i).map_or("", String::as_str)))
            .collect();
        let widest = max_width(&labels, TICK_PT);
        if widest <= pitch - 2.0 {
            return Self {
                labels,
                stride: 1,
                turned: false,
                height: line_h(TICK_PT),
            };
        }
        let stride = label_stride(pitch, TICK_PT * 1.25);
        let shown: Vec<String> = labels.iter().step_by(stride.max(1)).cloned().collect();
        let ticks = if stride > 1 { TICK_LEN } else { 0.0 };
        let height = ticks + max_width(&shown, TICK_PT);
        Self {
            labels,
            stride,
            turned: true,
            height,
        }
    }

    /// Draws the labels below `plot` (`y` = top of the label block), one per `pitch`.
    pub(crate) fn draw_x<DB: DrawingBackend>(
        &self,
        c: &Canvas<'_, DB>,
        plot: Rect,
        y: f64,
    ) -> Drawn {
        let n = self.labels.len();
        if n == 0 || self.stride == usize::MAX {
            return Ok(());
        }
        let pitch = plot.w() / n as f64;
        let mut y = y;
        if self.stride > 1 {
            for i in (0..n).step_by(self.stride) {
                let x = plot.x0 + (i as f64 + 0.5) * pitch;
                c.line(
                    &[(x, plot.y1), (x, plot.y1 + TICK_LEN)],
                    AXIS.to_rgba(),
                    AXIS_W,
                )?;
            }
            y += TICK_LEN;
        }
        for (i, label) in self.labels.iter().enumerate().step_by(self.stride) {
            let x = plot.x0 + (i as f64 + 0.5) * pitch;
            let l = if self.turned {
                Label::new(label, TICK_PT, HPos::Right, VPos::Center).turned()
            } else {
                Label::new(label, TICK_PT, HPos::Center, VPos::Top)
            };
            c.text(&l, (x, y))?;
        }
        Ok(())
    }
}

/// How the x axis of a bar chart, histogram or line plot is labelled.
enum XAxis {
    Numeric {
        range: (f64, f64),
        ticks: Vec<(f64, String)>,
    },
    Categories(CategoryLabels),
}

/// Everything about a cartesian panel that does not depend on its height.
struct Frame {
    left: f64,
    right: f64,
    top: f64,
    bottom: f64,
    title: Vec<String>,
    legend_h: f64,
    y_range: (f64, f64),
    y_ticks: Vec<(f64, String)>,
    x: XAxis,
}

/// What a cartesian panel shows, for its layout.
struct FrameSpec<'a> {
    title: &'a str,
    x_label: &'a str,
    y_label: &'a str,
    legend: &'a [LegendEntry],
    y_range: (f64, f64),
    /// `Err(labels, count)` for categories, `Ok(range)` for a numeric axis.
    x: Result<(f64, f64), (&'a [String], usize)>,
    /// Whether the numeric x values are whole numbers (stages, layers): ticks between them are
    /// dropped.
    integer_x: bool,
}

fn frame(spec: &FrameSpec<'_>, width: f64) -> Frame {
    let y_ticks = ticks(spec.y_range.0, spec.y_range.1, TICKS);
    let y_tick_labels: Vec<String> = y_ticks.iter().map(|(_, s)| s.clone()).collect();
    let y_desc = if spec.y_label.trim().is_empty() {
        0.0
    } else {
        line_h(LABEL_PT) + 2.0
    };
    let left = PAD + y_desc + max_width(&y_tick_labels, TICK_PT) + 2.0 + TICK_LEN;
    let right = PAD + 6.0;
    let plot_w = (width - left - right).max(10.0);
    let (title, title_h) = title_block(spec.title, width);
    let legend_h = legend_height(spec.legend, plot_w);
    let top = title_h + legend_h + if legend_h > 0.0 { 3.0 } else { 0.0 };
    let (x, x_block) = match spec.x {
        Ok(range) => {
            let range = sane_range(range.0, range.1);
            let mut t = ticks(range.0, range.1, TICKS);
            if spec.integer_x {
                let whole: Vec<(f64, String)> = t
                    .iter()
                    .filter(|(v, _)| (v - v.round()).abs() < 1e-9)
                    .map(|(v, _)| (*v, format!("{v:.0}")))
                    .collect();
                if whole.len() >= 2 {
                    t = whole;
                }
            }
            (
                XAxis::Numeric { range, ticks: t },
                TICK_LEN + 2.0 + line_h(TICK_PT),
            )
        }
        Err((labels, n)) => {
            let cats = CategoryLabels::new(labels, n, plot_w / n.max(1) as f64);
            let h = 2.0 + cats.height;
            (XAxis::Categories(cats), h)
        }
    };
    let x_desc = if spec.x_label.trim().is_empty() {
        0.0
    } else {
        3.0 + line_h(LABEL_PT)
    };
    Frame {
        left,
        right,
        top,
        bottom: x_block + x_desc + PAD,
        title,
        legend_h,
        y_range: spec.y_range,
        y_ticks,
        x,
    }
}

impl Frame {
    fn size(&self) -> (f64, f64) {
        (PANEL_W, self.top + PLOT_H + self.bottom)
    }

    fn plot(&self, r: Rect) -> Rect {
        let x0 = r.x0 + self.left;
        let y0 = r.y0 + self.top;
        Rect::new(
            x0,
            y0,
            (r.x1 - self.right).max(x0 + 1.0),
            (r.y1 - self.bottom).max(y0 + 1.0),
        )
    }

    fn y_of(&self, plot: Rect, v: f64) -> f64 {
        map(v, self.y_range, (plot.y1, plot.y0))
    }

    fn x_of(&self, plot: Rect, v: f64) -> f64 {
        match &self.x {
            XAxis::Numeric { range, .. } => map(v, *range, (plot.x0, plot.x1)),
            XAxis::Categories(_) => v,
        }
    }

    /// Title, legend, axes, ticks and axis descriptions.
    fn draw<DB: DrawingBackend>(&self, c: &Canvas<'_, DB>, spec: &FrameSpec<'_>, r: Rect) -> Drawn {
        let plot = self.plot(r);
        let axis = AXIS.to_rgba();
        draw_title(c, &self.title, r, plot)?;
        if self.legend_h > 0.0 {
            draw_legend(
                c,
                spec.legend,
                (plot.x0, plot.y0 - self.legend_h - 3.0),
                plot.w(),
            )?;
        }
        c.line(
            &[(plot.x0, plot.y0), (plot.x0, plot.y1), (plot.x1, plot.y1)],
            axis,
            AXIS_W,
        )?;
        for (v, s) in &self.y_ticks {
            let y = self.y_of(plot, *v);
            c.line(&[(plot.x0 - TICK_LEN, y), (plot.x0, y)], axis, AXIS_W)?;
            let l = Label::new(s, TICK_PT, HPos::Right, VPos::Center);
            c.text(&l, (plot.x0 - TICK_LEN - 2.0, y))?;
        }
        let mut below = plot.y1;
        match &self.x {
            XAxis::Numeric { ticks, .. } => {
                for (v, s) in ticks {
                    let x = self.x_of(plot, *v);
                    c.line(&[(x, plot.y1), (x, plot.y1 + TICK_LEN)], axis, AXIS_W)?;
                    let l = Label::new(s, TICK_PT, HPos::Center, VPos::Top);
                    c.text(&l, (x, plot.y1 + TICK_LEN + 2.0))?;
                }
                below += TICK_LEN + 2.0 + line_h(TICK_PT);
            }
            XAxis::Categories(cats) => {
                cats.draw_x(c, plot, plot.y1 + 2.0)?;
                below += 2.0 + cats.height;
            }
        }
        draw_axis_labels(c, (spec.x_label, spec.y_label), r, plot, below + 3.0)
    }
}

// ---------------------------------------------------------------------------------------------
// Bar chart

fn bar_spec(b: &BarChart) -> (FrameSpec<'_>, Vec<LegendEntry>) {
    let range = finite_range(b.values.iter().map(|&v| f64::from(v)));
    let (lo, hi) = range.map_or((0.0, 1.0), |(lo, hi)| (lo.min(0.0), hi.max(0.0)));
    let any_highlight = b.highlighted.iter().take(b.values.len()).any(|&h| h);
    let legend = if any_highlight && !b.highlight_label.trim().is_empty() {
        vec![LegendEntry {
            name: b.highlight_label.clone(),
            color: HIGHLIGHT,
            key: Key::Solid,
        }]
    } else {
        Vec::new()
    };
    let spec = FrameSpec {
        title: &b.title,
        x_label: &b.x_label,
        y_label: &b.y_label,
        legend: &[],
        y_range: nice_bounds(lo, hi, TICKS),
        x: Err((&b.labels, b.values.len())),
        integer_x: false,
    };
    (spec, legend)
}

pub(crate) fn bar_size(b: &BarChart) -> (f64, f64) {
    let (spec, legend) = bar_spec(b);
    let spec = FrameSpec {
        legend: &legend,
        ..spec
    };
    frame(&spec, PANEL_W).size()
}

pub(crate) fn draw_bar<DB: DrawingBackend>(c: &Canvas<'_, DB>, b: &BarChart, r: Rect) -> Drawn {
    let (spec, legend) = bar_spec(b);
    let spec = FrameSpec {
        legend: &legend,
        ..spec
    };
    let f = frame(&spec, r.w());
    let plot = f.plot(r);
    let n = b.values.len();
    let pitch = plot.w() / n.max(1) as f64;
    let zero = f.y_of(plot, 0.0);
    let mut drawn = 0;
    for (i, &v) in b.values.iter().enumerate() {
        let v = f64::from(v);
        if !v.is_finite() {
            continue;
        }
        let color = if b.highlighted.get(i).copied().unwrap_or(false) {
            HIGHLIGHT
        } else {
            NEUTRAL
        };
        let (x0, x1) = (
            plot.x0 + (i as f64 + 0.14) * pitch,
            plot.x0 + (i as f64 + 0.86) * pitch,
        );
        let y = f.y_of(plot, v);
        c.fill_rect(Rect::new(x0, y.min(zero), x1, y.max(zero)), color.to_rgba())?;
        drawn += 1;
    }
    if f.y_range.0 < 0.0 {
        c.line(&[(plot.x0, zero), (plot.x1, zero)], AXIS.mix(0.6), 0.4)?;
    }
    if drawn == 0 {
        no_data(c, plot)?;
    }
    f.draw(c, &spec, r)
}

// ---------------------------------------------------------------------------------------------
// Histogram

/// Shared bins: `(lo, hi)` of the data, and per series its counts.
struct Binned {
    range: (f64, f64),
    counts: Vec<Vec<u32>>,
    max_count: u32,
}

fn bin(h: &Histogram) -> Option<Binned> {
    let all = h
        .series
        .iter()
        .flat_map(|s| s.values.iter().map(|&v| f64::from(v)));
    let (lo, hi) = finite_range(all)?;
    let (lo, hi) = if hi > lo {
        (lo, hi)
    } else {
        sane_range(lo, lo)
    };
    let largest = h.series.iter().map(|s| s.values.len()).max().unwrap_or(0);
    let bins = if h.bins == 0 {
        ((largest as f64).sqrt().ceil() as usize).clamp(5, 50)
    } else {
        h.bins.min(2000)
    };
    let width = (hi - lo) / bins as f64;
    let counts: Vec<Vec<u32>> = h
        .series
        .iter()
        .map(|s| {
            let mut counts = vec![0u32; bins];
            for &v in &s.values {
                let v = f64::from(v);
                if v.is_finite() {
                    let i = (((v - lo) / width).floor().max(0.0) as usize).min(bins - 1);
                    counts[i] += 1;
                }
            }
            counts
        })
        .collect();
    let max_count = counts.iter().flatten().copied().max().unwrap_or(0);
    Some(Binned {
        range: (lo, hi),
        counts,
        max_count,
    })
}

/// Where a panel's colours start in the palette: blue and orange stand for models A and B, so
/// overlaid histograms (categories within one model: paraphrase / non-paraphrase) start at
/// the third colour.
fn palette_offset(key: Key) -> usize {
    match key {
        Key::Swatch => 2,
        Key::Solid | Key::Stroke => 0,
    }
}

fn legend_for(names: impl Iterator<Item = String>, key: Key) -> Vec<LegendEntry> {
    let entries: Vec<LegendEntry> = names
        .enumerate()
        .map(|(i, name)| LegendEntry {
            name: if name.trim().is_empty() {
                format!("series {}", i + 1)
            } else {
                name
            },
            color: series_color(i + palette_offset(key)),
            key,
        })
        .collect();
    if entries.len() > 1 {
        entries
    } else {
        Vec::new()
    }
}

fn histogram_spec<'a>(
    h: &'a Histogram,
    binned: Option<&Binned>,
    legend: &'a [LegendEntry],
) -> FrameSpec<'a> {
    let (x, max_count) = binned.map_or(((0.0, 1.0), 1), |b| {
        (nice_bounds(b.range.0, b.range.1, TICKS), b.max_count.max(1))
    });
    FrameSpec {
        title: &h.title,
        x_label: &h.x_label,
        y_label: &h.y_label,
        legend,
        y_range: nice_bounds(0.0, f64::from(max_count), TICKS),
        x: Ok(x),
        integer_x: false,
    }
}

pub(crate) fn histogram_size(h: &Histogram) -> (f64, f64) {
    let binned = bin(h);
    let legend = legend_for(h.series.iter().map(|s| s.name.clone()), Key::Swatch);
    frame(&histogram_spec(h, binned.as_ref(), &legend), PANEL_W).size()
}

pub(crate) fn draw_histogram<DB: DrawingBackend>(
    c: &Canvas<'_, DB>,
    h: &Histogram,
    r: Rect,
) -> Drawn {
    let binned = bin(h);
    let legend = legend_for(h.series.iter().map(|s| s.name.clone()), Key::Swatch);
    let spec = histogram_spec(h, binned.as_ref(), &legend);
    let f = frame(&spec, r.w());
    let plot = f.plot(r);
    match &binned {
        Some(b) if b.max_count > 0 => {
            let base = f.y_of(plot, 0.0);
            for (s, counts) in b.counts.iter().enumerate() {
                let color = series_color(s + palette_offset(Key::Swatch));
                let n = counts.len().max(1) as f64;
                let edge =
                    |i: usize| f.x_of(plot, b.range.0 + (b.range.1 - b.range.0) * i as f64 / n);
                let mut outline = vec![(edge(0), base)];
                for (i, &count) in counts.iter().enumerate() {
                    let y = f.y_of(plot, f64::from(count));
                    if count > 0 {
                        c.fill_rect(Rect::new(edge(i), y, edge(i + 1), base), color.mix(0.45))?;
                    }
                    outline.push((edge(i), y));
                    outline.push((edge(i + 1), y));
                }
                outline.push((edge(counts.len()), base));
                c.line(&outline, color.to_rgba(), 0.8)?;
            }
        }
        _ => no_data(c, plot)?,
    }
    f.draw(c, &spec, r)
}

// ---------------------------------------------------------------------------------------------
// Line plot

fn line_spec<'a>(l: &'a LinePlot, legend: &'a [LegendEntry]) -> FrameSpec<'a> {
    let points = || {
        l.series
            .iter()
            .flat_map(|s| s.points.iter())
            .filter(|(x, y)| x.is_finite() && y.is_finite())
    };
    let x = finite_range(points().map(|&(x, _)| f64::from(x))).unwrap_or((0.0, 1.0));
    let (ylo, yhi) = finite_range(points().map(|&(_, y)| f64::from(y))).unwrap_or((0.0, 1.0));
    FrameSpec {
        title: &l.title,
        x_label: &l.x_label,
        y_label: &l.y_label,
        legend,
        y_range: nice_bounds(ylo, yhi, TICKS),
        x: Ok(x),
        integer_x: points().all(|&(x, _)| x.fract() == 0.0),
    }
}

pub(crate) fn line_size(l: &LinePlot) -> (f64, f64) {
    let legend = legend_for(l.series.iter().map(|s| s.name.clone()), Key::Stroke);
    frame(&line_spec(l, &legend), PANEL_W).size()
}

pub(crate) fn draw_line<DB: DrawingBackend>(c: &Canvas<'_, DB>, l: &LinePlot, r: Rect) -> Drawn {
    let legend = legend_for(l.series.iter().map(|s| s.name.clone()), Key::Stroke);
    let spec = line_spec(l, &legend);
    let f = frame(&spec, r.w());
    let plot = f.plot(r);
    let mut drawn = 0;
    for (s, series) in l.series.iter().enumerate() {
        let color = series_color(s).to_rgba();
        for segment in series
            .points
            .split(|(x, y)| !(x.is_finite() && y.is_finite()))
        {
            let pts: Vec<(f64, f64)> = segment
                .iter()
                .map(|&(x, y)| (f.x_of(plot, f64::from(x)), f.y_of(plot, f64::from(y))))
                .collect();
            match pts.as_slice() {
                [] => {}
                [p] => c.dot(*p, 1.2, color)?,
                _ => c.line(&pts, color, 1.1)?,
            }
            drawn += pts.len();
        }
    }
    if drawn == 0 {
        no_data(c, plot)?;
    }
    f.draw(c, &spec, r)
}
