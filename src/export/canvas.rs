//! The paper style shared by every exported figure, and a small drawing surface in points.
//!
//! All layout is in points (1/72 in) at the figure's print size; [`Canvas`] scales to backend
//! units (SVG user units or PNG pixels) when it draws. Text goes through [`super::font`] so that
//! SVG and PNG place it identically. Depends only on `plotters` and the font module.

use plotters::coord::Shift;
use plotters::prelude::{Circle, DrawingArea, DrawingBackend, PathElement, Rectangle};
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::{
    Color as _, FontDesc, FontFamily, FontStyle, FontTransform, RGBAColor, RGBColor, ShapeStyle,
    TextStyle,
};

use super::font::{self, Turn};

/// Title size, pt.
pub(crate) const TITLE_PT: f64 = 9.5;
/// Axis-description and colour-bar caption size, pt.
pub(crate) const LABEL_PT: f64 = 8.5;
/// Tick-label and legend size, pt.
pub(crate) const TICK_PT: f64 = 7.5;
/// Outer padding of a panel, pt.
pub(crate) const PAD: f64 = 5.0;
/// Tick length, pt.
pub(crate) const TICK_LEN: f64 = 2.5;
/// Axis line width, pt.
pub(crate) const AXIS_W: f64 = 0.6;
/// Longest categorical tick label, in characters (longer ones end in '…').
pub(crate) const MAX_LABEL_CHARS: usize = 16;

/// Text colour.
pub(crate) const INK: RGBColor = RGBColor(26, 26, 26);
/// Axis and frame colour.
pub(crate) const AXIS: RGBColor = RGBColor(64, 64, 64);
/// Muted text ("no data").
pub(crate) const MUTED: RGBColor = RGBColor(140, 140, 140);
/// Cells whose value is NaN or missing.
pub(crate) const NAN_GREY: RGBColor = RGBColor(204, 204, 204);
/// Bars that are not highlighted.
pub(crate) const NEUTRAL: RGBColor = RGBColor(128, 141, 158);
/// Highlighted bars (Okabe–Ito vermillion).
pub(crate) const HIGHLIGHT: RGBColor = RGBColor(213, 94, 0);
/// Series colours (Okabe–Ito, colour-blind safe), in order of use.
pub(crate) const SERIES: [RGBColor; 7] = [
    RGBColor(0, 114, 178),
    RGBColor(230, 159, 0),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
    RGBColor(86, 180, 233),
    RGBColor(213, 94, 0),
    RGBColor(0, 0, 0),
];

/// Colour of series `i`.
pub(crate) fn series_color(i: usize) -> RGBColor {
    SERIES[i % SERIES.len()]
}

/// Viridis for `t` in `0..=1` (perceptually uniform; plotters' table).
pub(crate) fn viridis(t: f64) -> RGBColor {
    use plotters::style::colors::colormaps::{ColorMap as _, ViridisRGB};
    ViridisRGB.get_color(t.clamp(0.0, 1.0) as f32)
}

/// ColorBrewer RdBu, blue for negative, near-white at zero, red for positive.
const DIVERGING: [(u8, u8, u8); 11] = [
    (5, 48, 97),
    (33, 102, 172),
    (67, 147, 195),
    (146, 197, 222),
    (209, 229, 240),
    (247, 247, 247),
    (253, 219, 199),
    (244, 165, 130),
    (214, 96, 77),
    (178, 24, 43),
    (103, 0, 31),
];

/// The diverging map for `t` in `0..=1` (0.5 is zero).
pub(crate) fn diverging(t: f64) -> RGBColor {
    let x = t.clamp(0.0, 1.0) * (DIVERGING.len() - 1) as f64;
    let i = (x.floor() as usize).min(DIVERGING.len() - 2);
    let f = x - i as f64;
    let (a, b) = (DIVERGING[i], DIVERGING[i + 1]);
    let mix = |p: u8, q: u8| (f64::from(p) + (f64::from(q) - f64::from(p)) * f).round() as u8;
    RGBColor(mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2))
}

/// A rectangle in points: left, top, right, bottom.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Rect {
    pub x0: f64,
    pub y0: f64,
    pub x1: f64,
    pub y1: f64,
}

impl Rect {
    pub(crate) fn new(x0: f64, y0: f64, x1: f64, y1: f64) -> Self {
        Self { x0, y0, x1, y1 }
    }
    pub(crate) fn w(&self) -> f64 {
        self.x1 - self.x0
    }
    pub(crate) fn h(&self) -> f64 {
        self.y1 - self.y0
    }
    pub(crate) fn cx(&self) -> f64 {
        f64::midpoint(self.x0, self.x1)
    }
    pub(crate) fn cy(&self) -> f64 {
        f64::midpoint(self.y0, self.y1)
    }
}

/// How text reaches the backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TextMode {
    /// As plotters `<text>` elements, turned into outlines afterwards by `svg_text`.
    SvgElements,
    /// Rasterised here, pixel by pixel.
    Pixels,
}

/// Result of drawing: errors are the backend's, as text.
pub(crate) type Drawn = Result<(), String>;

/// One label to draw.
#[derive(Clone, Copy)]
pub(crate) struct Label<'t> {
    pub text: &'t str,
    pub size_pt: f64,
    pub h: HPos,
    pub v: VPos,
    /// Reads bottom to top (y-axis descriptions, crowded x tick labels).
    pub upright: bool,
    pub color: RGBColor,
}

impl<'t> Label<'t> {
    /// Ink-coloured, unrotated text.
    pub(crate) fn new(text: &'t str, size_pt: f64, h: HPos, v: VPos) -> Self {
        Self {
            text,
            size_pt,
            h,
            v,
            upright: true,
            color: INK,
        }
    }
    /// The same label turned to read bottom to top.
    pub(crate) fn turned(self) -> Self {
        Self {
            upright: false,
            ..self
        }
    }
    /// The same label in another colour.
    pub(crate) fn colored(self, color: RGBColor) -> Self {
        Self { color, ..self }
    }
}

/// A drawing area measured in points.
pub(crate) struct Canvas<'a, DB: DrawingBackend> {
    area: &'a DrawingArea<DB, Shift>,
    /// Backend units per point.
    scale: f64,
    mode: TextMode,
}

impl<'a, DB: DrawingBackend> Canvas<'a, DB> {
    pub(crate) fn new(area: &'a DrawingArea<DB, Shift>, scale: f64, mode: TextMode) -> Self {
        Self { area, scale, mode }
    }

    fn u(&self, v: f64) -> i32 {
        (v * self.scale).round() as i32
    }

    fn width_units(&self, width_pt: f64) -> u32 {
        (width_pt * self.scale).round().max(1.0) as u32
    }

    /// A filled rectangle.
    pub(crate) fn fill_rect(&self, r: Rect, color: RGBAColor) -> Drawn {
        let (x0, y0, x1, y1) = (self.u(r.x0), self.u(r.y0), self.u(r.x1), self.u(r.y1));
        if x1 <= x0 || y1 <= y0 {
            return Ok(());
        }
        let style = ShapeStyle {
            color,
            filled: true,
            stroke_width: 0,
        };
        self.area
            .draw(&Rectangle::new([(x0, y0), (x1, y1)], style))
            .map_err(|e| e.to_string())
    }

    /// An open polyline.
    pub(crate) fn line(&self, points: &[(f64, f64)], color: RGBAColor, width_pt: f64) -> Drawn {
        if points.len() < 2 {
            return Ok(());
        }
        let pts: Vec<(i32, i32)> = points
            .iter()
            .map(|&(x, y)| (self.u(x), self.u(y)))
            .collect();
        let style = ShapeStyle {
            color,
            filled: false,
            stroke_width: self.width_units(width_pt),
        };
        self.area
            .draw(&PathElement::new(pts, style))
            .map_err(|e| e.to_string())
    }

    /// A rectangle outline.
    pub(crate) fn frame(&self, r: Rect, color: RGBAColor, width_pt: f64) -> Drawn {
        let pts = [
            (r.x0, r.y0),
            (r.x1, r.y0),
            (r.x1, r.y1),
            (r.x0, r.y1),
            (r.x0, r.y0),
        ];
        self.line(&pts, color, width_pt)
    }

    /// A filled dot.
    pub(crate) fn dot(&self, (x, y): (f64, f64), radius_pt: f64, color: RGBAColor) -> Drawn {
        let style = ShapeStyle {
            color,
            filled: true,
            stroke_width: 1,
        };
        self.area
            .draw(&Circle::new(
                (self.u(x), self.u(y)),
                self.width_units(radius_pt),
                style,
            ))
            .map_err(|e| e.to_string())
    }

    /// Text anchored at `(x, y)` as `label.h` / `label.v` say (SVG's anchoring).
    pub(crate) fn text(&self, label: &Label<'_>, (x, y): (f64, f64)) -> Drawn {
        let clean = clean_text(label.text);
        if clean.trim().is_empty() {
            return Ok(());
        }
        let em = label.size_pt * self.scale;
        match self.mode {
            TextMode::SvgElements => {
                // plotters writes `font-size` as size / 1.24; undo that so the SVG says `em`.
                let desc = FontDesc::new(FontFamily::SansSerif, em * 1.24, FontStyle::Normal);
                let mut style = TextStyle::from(desc)
                    .pos(Pos::new(label.h, label.v))
                    .color(&label.color);
                if !label.upright {
                    style = style.transform(FontTransform::Rotate270);
                }
                self.area
                    .draw_text(&clean, &style, (self.u(x), self.u(y)))
                    .map_err(|e| e.to_string())
            }
            TextMode::Pixels => {
                let turn = if label.upright {
                    Turn::None
                } else {
                    Turn::Cw270
                };
                let mut result = Ok(());
                font::rasterize(
                    &clean,
                    em,
                    (x * self.scale, y * self.scale),
                    (label.h, label.v),
                    turn,
                    |px, py, coverage| {
                        if result.is_ok() {
                            let color = label.color.mix(f64::from(coverage));
                            result = self
                                .area
                                .draw_pixel((px, py), &color)
                                .map_err(|e| e.to_string());
                        }
                    },
                );
                result
            }
        }
    }
}

/// Width of `text` at `size_pt`, in points.
pub(crate) fn measure(text: &str, size_pt: f64) -> f64 {
    font::text_width(&clean_text(text), size_pt)
}

/// Makes text drawable: control characters become visible marks or disappear.
pub(crate) fn clean_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\n' => out.push('↵'),
            '\t' => out.push('⇥'),
            '\r' => {}
            c if c.is_control() => out.push('\u{FFFD}'),
            c => out.push(c),
        }
    }
    out
}

/// A categorical tick label: cleaned, trimmed, `␣` for blank, at most [`MAX_LABEL_CHARS`].
pub(crate) fn tick_label(text: &str) -> String {
    let clean = clean_text(text);
    let trimmed = clean.trim();
    if trimmed.is_empty() {
        return "␣".to_owned();
    }
    truncate(trimmed, MAX_LABEL_CHARS)
}

/// `text` cut to `max_chars` characters, the last being '…' when cut.
pub(crate) fn truncate(text: &str, max_chars: usize) -> String {
    if text.chars().count() <= max_chars {
        return text.to_owned();
    }
    let mut out: String = text.chars().take(max_chars.saturating_sub(1)).collect();
    out.push('…');
    out
}

/// Wraps `text` into at most `max_lines` lines no wider than `width` at `size_pt`; the last line
/// ends in '…' when the text does not fit.
pub(crate) fn wrap(text: &str, size_pt: f64, width: f64, max_lines: usize) -> Vec<String> {
    let clean = clean_text(text);
    let mut lines: Vec<String> = Vec::new();
    let mut current = String::new();
    let mut words = clean.split_whitespace().peekable();
    while let Some(word) = words.next() {
        let candidate = if current.is_empty() {
            word.to_owned()
        } else {
            format!("{current} {word}")
        };
        if current.is_empty() || measure(&candidate, size_pt) <= width {
            current = candidate;
            continue;
        }
        if lines.len() + 1 == max_lines {
            // Last line: everything left, cut to fit below.
            current = candidate;
            for w in words.by_ref() {
                current.push(' ');
                current.push_str(w);
            }
            break;
        }
        lines.push(std::mem::replace(&mut current, word.to_owned()));
    }
    if !current.is_empty() {
        lines.push(current);
    }
    for line in &mut lines {
        if measure(line, size_pt) > width {
            *line = fit(line, size_pt, width);
        }
    }
    lines
}

/// `text` shortened with '…' until it fits `width`.
pub(crate) fn fit(text: &str, size_pt: f64, width: f64) -> String {
    if measure(text, size_pt) <= width {
        return text.to_owned();
    }
    let mut n = text.chars().count();
    while n > 1 {
        let candidate = truncate(text, n);
        if measure(&candidate, size_pt) <= width {
            return candidate;
        }
        n -= 1;
    }
    "…".to_owned()
}

/// Line height for text of `size_pt`.
pub(crate) fn line_h(size_pt: f64) -> f64 {
    size_pt * 1.25
}

/// A step of 1, 2 or 5 × 10^k giving about `target` intervals over `span`.
pub(crate) fn nice_step(span: f64, target: usize) -> f64 {
    let raw = span / target.max(1) as f64;
    if !raw.is_finite() || raw <= 0.0 {
        return 1.0;
    }
    let mag = 10f64.powf(raw.log10().floor());
    let f = raw / mag;
    let m = if f < 1.5 {
        1.0
    } else if f < 3.0 {
        2.0
    } else if f < 7.0 {
        5.0
    } else {
        10.0
    };
    m * mag
}

/// An axis range widened, if needed, to a non-empty finite interval.
pub(crate) fn sane_range(lo: f64, hi: f64) -> (f64, f64) {
    if !lo.is_finite() || !hi.is_finite() || lo > hi {
        return (0.0, 1.0);
    }
    if hi - lo < f64::EPSILON * hi.abs().max(lo.abs()).max(1e-30) * 16.0 {
        let pad = if lo == 0.0 { 1.0 } else { lo.abs() * 0.1 };
        return (lo - pad, hi + pad);
    }
    (lo, hi)
}

/// `(lo, hi)` widened outwards to multiples of a nice step.
pub fn nice_bounds(lo: f64, hi: f64, target: usize) -> (f64, f64) {
    let (lo, hi) = sane_range(lo, hi);
    let step = nice_step(hi - lo, target);
    let (a, b) = ((lo / step).floor() * step, (hi / step).ceil() * step);
    if a.is_finite() && b.is_finite() && b > a {
        (a, b)
    } else {
        (lo, hi)
    }
}

/// Tick values in `lo..=hi` and their labels.
pub fn ticks(lo: f64, hi: f64, target: usize) -> Vec<(f64, String)> {
    let (lo, hi) = sane_range(lo, hi);
    let step = nice_step(hi - lo, target);
    let first = (lo / step - 1e-9).ceil();
    let decimals = (-step.log10().floor()).clamp(0.0, 6.0) as usize;
    let big = hi.abs().max(lo.abs()) >= 1e6;
    let mut out = Vec::new();
    for i in 0..64 {
        let v = (first + f64::from(i)) * step;
        if v > hi + step * 1e-9 {
            break;
        }
        let v = if v.abs() < step * 1e-9 { 0.0 } else { v };
        out.push((v, format_number(v, decimals, big)));
    }
    out
}

/// A tick number with a true minus sign.
fn format_number(v: f64, decimals: usize, scientific: bool) -> String {
    let s = if scientific {
        format!("{v:.1e}")
    } else {
        format!("{v:.decimals$}")
    };
    match s.strip_prefix('-') {
        Some(rest) => format!("−{rest}"),
        None => s,
    }
}

/// Maps `v` from `lo..hi` to `a..b`.
pub(crate) fn map(v: f64, (lo, hi): (f64, f64), (a, b): (f64, f64)) -> f64 {
    if hi - lo == 0.0 {
        return f64::midpoint(a, b);
    }
    a + (v - lo) / (hi - lo) * (b - a)
}

/// Stride between shown labels so that neighbours are at least `need` apart at `pitch` each.
pub(crate) fn label_stride(pitch: f64, need: f64) -> usize {
    if pitch <= 0.0 || !pitch.is_finite() {
        return usize::MAX;
    }
    ((need / pitch).ceil() as usize).max(1)
}

/// How a legend entry's key is drawn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Key {
    /// An opaque square (bars).
    Solid,
    /// A translucent square with an outline (overlaid histograms).
    Swatch,
    /// A short line (line plots).
    Stroke,
}

/// One legend entry.
pub(crate) struct LegendEntry {
    pub name: String,
    pub color: RGBColor,
    pub key: Key,
}

const KEY_W: f64 = 9.0;
const KEY_GAP: f64 = 3.0;
const ENTRY_GAP: f64 = 9.0;

/// Lays entries out in rows no wider than `width`; returns each entry's row and x offset.
fn legend_layout(entries: &[LegendEntry], width: f64) -> Vec<(usize, f64)> {
    let mut out = Vec::with_capacity(entries.len());
    let (mut row, mut x) = (0, 0.0);
    for e in entries {
        let w = KEY_W + KEY_GAP + measure(&e.name, TICK_PT);
        if x > 0.0 && x + w > width {
            row += 1;
            x = 0.0;
        }
        out.push((row, x));
        x += w + ENTRY_GAP;
    }
    out
}

/// Height of the legend for `entries` within `width` (0 when empty).
pub(crate) fn legend_height(entries: &[LegendEntry], width: f64) -> f64 {
    legend_layout(entries, width)
        .last()
        .map_or(0.0, |&(row, _)| (row + 1) as f64 * line_h(TICK_PT) + 2.0)
}

/// Draws a legend in rows starting at `(x, y)` (top left), within `width`.
pub(crate) fn draw_legend<DB: DrawingBackend>(
    c: &Canvas<'_, DB>,
    entries: &[LegendEntry],
    (x, y): (f64, f64),
    width: f64,
) -> Drawn {
    for (e, (row, dx)) in entries.iter().zip(legend_layout(entries, width)) {
        let cy = y + (row as f64 + 0.5) * line_h(TICK_PT);
        let kx = x + dx;
        match e.key {
            Key::Solid => {
                let r = Rect::new(kx + 1.5, cy - 3.0, kx + KEY_W - 1.5, cy + 3.0);
                c.fill_rect(r, e.color.to_rgba())?;
            }
            Key::Swatch => {
                let r = Rect::new(kx + 1.5, cy - 3.0, kx + KEY_W - 1.5, cy + 3.0);
                c.fill_rect(r, e.color.mix(0.55))?;
                c.frame(r, e.color.to_rgba(), 0.5)?;
            }
            Key::Stroke => c.line(&[(kx, cy), (kx + KEY_W, cy)], e.color.to_rgba(), 1.2)?,
        }
        let label = Label::new(&e.name, TICK_PT, HPos::Left, VPos::Center);
        c.text(&label, (kx + KEY_W + KEY_GAP, cy))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_nice() {
        let t: Vec<String> = ticks(0.0, 1.0, 5).into_iter().map(|(_, s)| s).collect();
        assert_eq!(t, ["0.0", "0.2", "0.4", "0.6", "0.8", "1.0"]);
        let t: Vec<String> = ticks(-3.0, 3.0, 5).into_iter().map(|(_, s)| s).collect();
        assert_eq!(t, ["−3", "−2", "−1", "0", "1", "2", "3"]);
        assert_eq!(nice_bounds(0.03, 0.97, 5), (0.0, 1.0));
        assert_eq!(sane_range(2.0, 2.0), (1.8, 2.2));
        assert_eq!(sane_range(f64::NAN, 1.0), (0.0, 1.0));
        assert!(!ticks(5.0, 5.0, 5).is_empty());
        assert!(ticks(0.0, 1e30, 5).len() < 64);
    }

    #[test]
    fn labels_are_cleaned_and_cut() {
        assert_eq!(tick_label(" give"), "give");
        assert_eq!(tick_label(" \n"), "↵");
        assert_eq!(tick_label("   "), "␣");
        assert_eq!(tick_label("abcdefghijklmnopqrstuvwxyz"), "abcdefghijklmno…");
        assert_eq!(tick_label("a\u{1}b"), "a\u{FFFD}b");
    }

    #[test]
    fn wrapping_fits_width() {
        let lines = wrap(
            "Importance density of every prompt token for model A",
            10.0,
            120.0,
            2,
        );
        assert_eq!(lines.len(), 2);
        assert!(lines.iter().all(|l| measure(l, 10.0) <= 120.0));
        assert!(lines[1].ends_with('…'));
        assert_eq!(wrap("short", 10.0, 120.0, 2), ["short"]);
        assert!(wrap("", 10.0, 120.0, 2).is_empty());
        assert_eq!(fit("v", 10.0, 50.0), "v");
        assert_eq!(fit("a long caption", 10.0, 30.0).chars().last(), Some('…'));
    }

    #[test]
    fn colour_maps_span_their_ends() {
        assert_eq!(diverging(0.5), RGBColor(247, 247, 247));
        assert_eq!(diverging(0.0), RGBColor(5, 48, 97));
        assert_eq!(diverging(1.0), RGBColor(103, 0, 31));
        assert_eq!(viridis(0.0), RGBColor(68, 1, 84));
    }
}
