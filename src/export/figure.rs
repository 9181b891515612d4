//! Figure descriptions (plain data) and their rendering to SVG and PNG through plotters.
//!
//! A [`Figure`] is a heatmap, bar chart, histogram or line plot, or panels of them side by side
//! ([`Figure::Row`]) or stacked ([`Figure::Column`]). Each panel has a preferred size in points
//! at print size (one panel is a single column, 3.4 in wide); rendering lays panels out at
//! that size, draws them on any plotters [`DrawingBackend`], and scales to SVG user units or
//! 300 dpi PNG pixels. Depends only on `analysis::types`, `plotters` and this module's helpers.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use plotters::prelude::{BitMapBackend, DrawingBackend, IntoDrawingArea as _, SVGBackend};
use plotters::style::WHITE;

use super::canvas::{Canvas, Drawn, Rect, TextMode};
use super::{font, heatmap, panels, svg_text};
use crate::analysis::types::Matrix;

/// How heatmap values map to colours.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ColorScale {
    /// Viridis from the smallest value (or 0, if no value is negative) to the largest.
    #[default]
    Sequential,
    /// Blue–white–red, symmetric about zero, for signed values.
    Diverging,
}

/// A matrix of values drawn as coloured cells, with a colour bar.
#[derive(Clone, Debug, PartialEq)]
pub struct Heatmap {
    /// Title above the panel.
    pub title: String,
    /// One label per row (top to bottom); missing labels are blank.
    pub row_labels: Vec<String>,
    /// One label per column (left to right); missing labels are blank.
    pub col_labels: Vec<String>,
    /// The values, `rows x cols`; NaN cells are drawn grey.
    pub values: Matrix,
    /// Caption of the colour bar (what the colours measure).
    pub value_label: String,
    /// Colour map.
    pub scale: ColorScale,
    /// Description of the x axis (columns).
    pub x_label: String,
    /// Description of the y axis (rows).
    pub y_label: String,
}

impl Default for Heatmap {
    fn default() -> Self {
        Self {
            title: String::new(),
            row_labels: Vec::new(),
            col_labels: Vec::new(),
            values: Matrix::zeros(0, 0),
            value_label: String::new(),
            scale: ColorScale::default(),
            x_label: String::new(),
            y_label: String::new(),
        }
    }
}

/// One bar per label, some of them highlighted.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BarChart {
    /// Title above the panel.
    pub title: String,
    /// One label per bar.
    pub labels: Vec<String>,
    /// Bar heights; NaN bars are left out.
    pub values: Vec<f32>,
    /// Which bars to draw in the highlight colour: as long as `values`, or empty for none.
    pub highlighted: Vec<bool>,
    /// Legend text for the highlight colour; empty for no legend.
    pub highlight_label: String,
    /// Description of the x axis.
    pub x_label: String,
    /// Description of the y axis.
    pub y_label: String,
}

/// One set of samples in a [`Histogram`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HistSeries {
    /// Legend name.
    pub name: String,
    /// Raw samples; non-finite ones are ignored.
    pub values: Vec<f32>,
}

/// Overlaid, semi-transparent histograms sharing one set of bins.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Histogram {
    /// Title above the panel.
    pub title: String,
    /// Description of the x axis.
    pub x_label: String,
    /// Description of the y axis (usually "count").
    pub y_label: String,
    /// Number of bins; 0 picks one from the sample count.
    pub bins: usize,
    /// The series; a legend is shown when there are several.
    pub series: Vec<HistSeries>,
}

/// One curve in a [`LinePlot`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LineSeries {
    /// Legend name.
    pub name: String,
    /// `(x, y)` points in drawing order; a non-finite point breaks the line.
    pub points: Vec<(f32, f32)>,
}

/// Curves on shared linear axes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LinePlot {
    /// Title above the panel.
    pub title: String,
    /// Description of the x axis.
    pub x_label: String,
    /// Description of the y axis.
    pub y_label: String,
    /// The curves; a legend is shown when there are several.
    pub series: Vec<LineSeries>,
}

/// A figure to export: one panel, or panels laid out in one paper style.
#[derive(Clone, Debug, PartialEq)]
pub enum Figure {
    /// A heatmap with a colour bar.
    Heatmap(Heatmap),
    /// A bar chart.
    Bar(BarChart),
    /// Overlaid histograms.
    Histogram(Histogram),
    /// Line plot.
    Line(LinePlot),
    /// Panels laid out left to right (e.g. model A | model B).
    Row(Vec<Figure>),
    /// Panels laid out top to bottom.
    Column(Vec<Figure>),
}

impl Figure {
    /// Preferred size in points (1/72 in) at print size.
    pub fn size_pt(&self) -> (f64, f64) {
        match self {
            Self::Heatmap(h) => heatmap::heatmap_size(h),
            Self::Bar(b) => panels::bar_size(b),
            Self::Histogram(h) => panels::histogram_size(h),
            Self::Line(l) => panels::line_size(l),
            Self::Row(children) => children.iter().fold((0.0, 0.0), |(w, h), c| {
                let (cw, ch) = c.size_pt();
                (w + cw, f64::max(h, ch))
            }),
            Self::Column(children) => children.iter().fold((0.0, 0.0), |(w, h), c| {
                let (cw, ch) = c.size_pt();
                (f64::max(w, cw), h + ch)
            }),
        }
    }
}

/// SVG user units per point.
const SVG_UNITS_PER_PT: f64 = 4.0;
/// PNG resolution.
const PNG_DPI: f64 = 300.0;
/// Largest PNG, in pixels; bigger figures are rendered at a lower resolution.
const PNG_MAX_PIXELS: f64 = 36e6;

/// Whole-figure size in points, never degenerate.
fn figure_size(fig: &Figure) -> (f64, f64) {
    let (w, h) = fig.size_pt();
    let ok = |v: f64| {
        if v.is_finite() {
            v.clamp(20.0, 20_000.0)
        } else {
            20.0
        }
    };
    (ok(w), ok(h))
}

/// Draws `fig` into `r`.
fn draw<DB: DrawingBackend>(c: &Canvas<'_, DB>, fig: &Figure, r: Rect) -> Drawn {
    match fig {
        Figure::Heatmap(h) => heatmap::draw_heatmap(c, h, r),
        Figure::Bar(b) => panels::draw_bar(c, b, r),
        Figure::Histogram(h) => panels::draw_histogram(c, h, r),
        Figure::Line(l) => panels::draw_line(c, l, r),
        Figure::Row(children) => {
            let total: f64 = children.iter().map(|f| f.size_pt().0).sum();
            let mut x = r.x0;
            for child in children {
                let w = if total > 0.0 {
                    child.size_pt().0 / total * r.w()
                } else {
                    0.0
                };
                draw(c, child, Rect::new(x, r.y0, x + w, r.y1))?;
                x += w;
            }
            Ok(())
        }
        Figure::Column(children) => {
            let total: f64 = children.iter().map(|f| f.size_pt().1).sum();
            let mut y = r.y0;
            for child in children {
                let h = if total > 0.0 {
                    child.size_pt().1 / total * r.h()
                } else {
                    0.0
                };
                draw(c, child, Rect::new(r.x0, y, r.x1, y + h))?;
                y += h;
            }
            Ok(())
        }
    }
}

fn drawing_error(e: impl std::fmt::Display) -> crate::Error {
    crate::Error::Io(std::io::Error::other(format!(
        "drawing the figure failed: {e}"
    )))
}

/// Renders `fig` as a standalone SVG document whose text is glyph outlines (no font needed).
/// Its `width`/`height` are in points, so it prints at the intended size.
pub fn render_svg(fig: &Figure) -> crate::Result<String> {
    font::register_with_plotters();
    let (w_pt, h_pt) = figure_size(fig);
    let (w, h) = (
        (w_pt * SVG_UNITS_PER_PT).ceil() as u32,
        (h_pt * SVG_UNITS_PER_PT).ceil() as u32,
    );
    let mut raw = String::new();
    {
        let root = SVGBackend::with_string(&mut raw, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(drawing_error)?;
        let canvas = Canvas::new(&root, SVG_UNITS_PER_PT, TextMode::SvgElements);
        draw(&canvas, fig, Rect::new(0.0, 0.0, w_pt, h_pt)).map_err(drawing_error)?;
        root.present().map_err(drawing_error)?;
    }
    let svg = svg_text::text_to_paths(&raw)?;
    // State the print size: user units are 1/4 pt.
    let plotters_size = format!("<svg width=\"{w}\" height=\"{h}\"");
    let print_size = format!(
        "<svg width=\"{}pt\" height=\"{}pt\"",
        f64::from(w) / SVG_UNITS_PER_PT,
        f64::from(h) / SVG_UNITS_PER_PT
    );
    Ok(match svg.strip_prefix(&plotters_size) {
        Some(rest) => format!("{print_size}{rest}"),
        None => svg,
    })
}

/// Renders `fig` as PNG bytes at 300 dpi (lower for very large figures), with the resolution
/// recorded in the file so that it places at the intended size.
pub fn render_png(fig: &Figure) -> crate::Result<Vec<u8>> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    font::register_with_plotters();
    let (w_pt, h_pt) = figure_size(fig);
    let px_per_pt = (PNG_DPI / 72.0).min((PNG_MAX_PIXELS / (w_pt * h_pt)).sqrt());
    let (w, h) = (
        (w_pt * px_per_pt).ceil() as u32,
        (h_pt * px_per_pt).ceil() as u32,
    );
    // plotters encodes PNG only when saving to a file: render to a private temporary file.
    let tmp = std::env::temp_dir().join(format!(
        "tunelens-figure-{}-{}.png",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let rendered = render_png_file(fig, &tmp, (w, h), px_per_pt, (w_pt, h_pt));
    let bytes = rendered.and_then(|()| {
        std::fs::read(&tmp).map_err(|e| crate::Error::bad_file(&tmp, format!("cannot read: {e}")))
    });
    let _ = std::fs::remove_file(&tmp);
    let dots_per_metre = (px_per_pt * 72.0 / 0.0254).round() as u32;
    Ok(with_resolution(bytes?, dots_per_metre))
}

fn render_png_file(
    fig: &Figure,
    path: &Path,
    size: (u32, u32),
    px_per_pt: f64,
    (w_pt, h_pt): (f64, f64),
) -> crate::Result<()> {
    let root = BitMapBackend::new(path, size).into_drawing_area();
    root.fill(&WHITE).map_err(drawing_error)?;
    let canvas = Canvas::new(&root, px_per_pt, TextMode::Pixels);
    draw(&canvas, fig, Rect::new(0.0, 0.0, w_pt, h_pt)).map_err(drawing_error)?;
    root.present()
        .map_err(|e| crate::Error::bad_file(path, format!("cannot write: {e}")))
}

/// Inserts a `pHYs` chunk (pixels per metre) after the PNG header chunk.
fn with_resolution(png: Vec<u8>, dots_per_metre: u32) -> Vec<u8> {
    const IHDR_END: usize = 8 + 4 + 4 + 13 + 4;
    if png.len() < IHDR_END || png.get(12..16) != Some(b"IHDR".as_slice()) {
        return png;
    }
    let mut chunk = Vec::with_capacity(21);
    chunk.extend_from_slice(&9u32.to_be_bytes());
    let body_start = chunk.len();
    chunk.extend_from_slice(b"pHYs");
    chunk.extend_from_slice(&dots_per_metre.to_be_bytes());
    chunk.extend_from_slice(&dots_per_metre.to_be_bytes());
    chunk.push(1); // unit: metre
    let crc = crc32(&chunk[body_start..]);
    chunk.extend_from_slice(&crc.to_be_bytes());
    let mut out = Vec::with_capacity(png.len() + chunk.len());
    out.extend_from_slice(&png[..IHDR_END]);
    out.extend_from_slice(&chunk);
    out.extend_from_slice(&png[IHDR_END..]);
    out
}

/// CRC-32 (ISO 3309), as PNG chunks use.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc_matches_reference() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        // IEND's CRC, as every PNG ends with it.
        assert_eq!(crc32(b"IEND"), 0xAE42_6082);
    }

    #[test]
    fn resolution_chunk_follows_the_header() {
        let mut png = vec![0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A, 0, 0, 0, 13];
        png.extend_from_slice(b"IHDR");
        png.extend_from_slice(&[0; 17]);
        let out = with_resolution(png.clone(), 11_811);
        assert_eq!(out.len(), png.len() + 21);
        assert_eq!(&out[37..41], b"pHYs");
        assert_eq!(with_resolution(vec![1, 2, 3], 1), vec![1, 2, 3]);
    }
}
