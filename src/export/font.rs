//! The embedded figure font (DejaVu Sans) and the one text layout every export uses.
//!
//! SVG text becomes glyph outlines ([`svg_path_data`]) and PNG text is rasterised here
//! ([`rasterize`]) rather than by plotters, so both formats place every glyph the same way:
//! advance widths plus the font's kerning, anchored as SVG anchors text (`text-anchor`, and the
//! `dy` offsets plotters' SVG backend writes). Nothing here reads a font from the system.
//! Depends only on `ab_glyph` and `plotters`' anchor types.

use std::sync::OnceLock;

use ab_glyph::{Font as _, FontRef, GlyphId, OutlineCurve, PxScale};
use plotters::style::text_anchor::{HPos, VPos};

/// DejaVu Sans, embedded so that exports never depend on the fonts installed.
pub(crate) const FONT_BYTES: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");

/// The parsed embedded font, or an error if the embedded bytes are not a font.
pub(crate) fn font() -> crate::Result<&'static FontRef<'static>> {
    static FONT: OnceLock<Option<FontRef<'static>>> = OnceLock::new();
    FONT.get_or_init(|| FontRef::try_from_slice(FONT_BYTES).ok())
        .as_ref()
        .ok_or_else(|| crate::Error::invalid("font", "the embedded figure font could not be read"))
}

/// Registers the embedded font with plotters as "sans-serif" (once per process), so that any
/// plotters code that measures text uses the same font.
pub(crate) fn register_with_plotters() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        // Cannot fail for the embedded font; if it did, our own layout would still work.
        let _ = plotters::style::register_font(
            "sans-serif",
            plotters::style::FontStyle::Normal,
            FONT_BYTES,
        );
    });
}

/// Font units per em.
fn units_per_em(font: &FontRef<'_>) -> f64 {
    font.units_per_em().map_or(2048.0, f64::from)
}

/// x-height as a fraction of the em (for SVG's `ex` unit), from the outline of `x`.
fn x_height_ratio(font: &FontRef<'_>) -> f64 {
    // ab_glyph's unscaled bounds have min.y and max.y swapped (min.y is the top), so take the
    // larger of the two.
    font.outline(font.glyph_id('x')).map_or(0.5, |o| {
        f64::from(o.bounds.min.y.max(o.bounds.max.y)) / units_per_em(font)
    })
}

/// Glyphs with their pen positions, in font units.
struct Shaped {
    /// `(glyph, pen x)` per character.
    glyphs: Vec<(GlyphId, f64)>,
    /// Total advance width.
    advance: f64,
}

/// Lays `text` out on one line: advances plus pairwise kerning. Characters the font lacks map
/// to its `.notdef` glyph.
fn shape(font: &FontRef<'_>, text: &str) -> Shaped {
    let mut glyphs = Vec::with_capacity(text.len());
    let mut pen = 0.0;
    let mut prev: Option<GlyphId> = None;
    for c in text.chars() {
        let id = font.glyph_id(c);
        if let Some(prev) = prev {
            pen += f64::from(font.kern_unscaled(prev, id));
        }
        glyphs.push((id, pen));
        pen += f64::from(font.h_advance_unscaled(id));
        prev = Some(id);
    }
    Shaped {
        glyphs,
        advance: pen,
    }
}

/// Width of `text` set at `em` (any unit; the result is in the same unit).
pub(crate) fn text_width(text: &str, em: f64) -> f64 {
    let Ok(font) = font() else {
        return 0.6 * em * text.chars().count() as f64;
    };
    shape(font, text).advance * em / units_per_em(font)
}

/// Offset from the anchor to the start of the text for a horizontal anchor.
fn start_offset(h_pos: HPos, width: f64) -> f64 {
    match h_pos {
        HPos::Left => 0.0,
        HPos::Center => -width / 2.0,
        HPos::Right => -width,
    }
}

/// A vertical offset as SVG writes it: a number of `em`s or `ex`s.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Dy {
    /// Multiples of the font size.
    Em(f64),
    /// Multiples of the x-height.
    Ex(f64),
    /// Plain user units.
    Units(f64),
}

impl Dy {
    /// The `dy` plotters' SVG backend writes for each vertical anchor.
    pub(crate) fn for_vpos(v_pos: VPos) -> Self {
        match v_pos {
            VPos::Top => Self::Em(0.76),
            VPos::Center => Self::Ex(0.5),
            VPos::Bottom => Self::Ex(-0.5),
        }
    }

    /// The offset from the anchor to the baseline at font size `em`.
    pub(crate) fn resolve(self, em: f64) -> f64 {
        match self {
            Self::Em(k) => k * em,
            Self::Ex(k) => k * em * font().map_or(0.5, x_height_ratio),
            Self::Units(u) => u,
        }
    }
}

/// Writes a number for SVG path data: two decimals, trailing zeros dropped.
fn push_num(out: &mut String, v: f64) {
    let v = if v.is_finite() { v } else { 0.0 };
    let mut s = format!("{v:.2}");
    if s.contains('.') {
        while s.ends_with('0') {
            s.pop();
        }
        if s.ends_with('.') {
            s.pop();
        }
    }
    out.push_str(if s == "-0" { "0" } else { &s });
}

/// A rotation by `degrees` (clockwise on screen, as SVG's `rotate(a, cx, cy)`) about a centre.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Rotation {
    /// Angle in degrees.
    pub degrees: f64,
    /// Centre of rotation.
    pub center: (f64, f64),
}

impl Rotation {
    fn apply(self, (x, y): (f64, f64)) -> (f64, f64) {
        let rad = self.degrees.to_radians();
        // Exact quarter turns: no 1e-16 noise in the written coordinates.
        let snap = |v: f64| {
            if (v - v.round()).abs() < 1e-12 {
                v.round()
            } else {
                v
            }
        };
        let (sin, cos) = (snap(rad.sin()), snap(rad.cos()));
        let (dx, dy) = (x - self.center.0, y - self.center.1);
        (
            self.center.0 + dx * cos - dy * sin,
            self.center.1 + dx * sin + dy * cos,
        )
    }
}

/// SVG path data (`d`) of `text` set at font size `em` with its anchor at `(x, y)`:
/// `h_pos` as `text-anchor`, `dy` from the anchor to the baseline, then turned by `rotation`.
/// The rotation is applied to the coordinates (some renderers mishandle `rotate(a, cx, cy)`).
/// Outlines are filled with the non-zero rule (SVG's default). Returns an empty string for text
/// with no visible glyphs.
pub(crate) fn svg_path_data(
    text: &str,
    em: f64,
    (x, y): (f64, f64),
    (h_pos, dy): (HPos, Dy),
    rotation: Option<Rotation>,
) -> String {
    let Ok(font) = font() else {
        return String::new();
    };
    let shaped = shape(font, text);
    let k = em / units_per_em(font);
    let x0 = x + start_offset(h_pos, shaped.advance * k);
    let baseline = y + dy.resolve(em);
    let mut d = String::new();
    for (id, pen) in shaped.glyphs {
        let Some(outline) = font.outline(id) else {
            continue;
        };
        let tx = |p: ab_glyph::Point| {
            let q = (
                x0 + (pen + f64::from(p.x)) * k,
                baseline - f64::from(p.y) * k,
            );
            rotation.map_or(q, |r| r.apply(q))
        };
        let mut last: Option<ab_glyph::Point> = None;
        for curve in &outline.curves {
            let (start, end) = match *curve {
                OutlineCurve::Line(a, b)
                | OutlineCurve::Quad(a, _, b)
                | OutlineCurve::Cubic(a, _, _, b) => (a, b),
            };
            if last != Some(start) {
                if last.is_some() {
                    d.push('Z');
                }
                d.push('M');
                push_point(&mut d, tx(start));
            }
            match *curve {
                OutlineCurve::Line(_, b) => {
                    d.push('L');
                    push_point(&mut d, tx(b));
                }
                OutlineCurve::Quad(_, c, b) => {
                    d.push('Q');
                    push_point(&mut d, tx(c));
                    d.push(' ');
                    push_point(&mut d, tx(b));
                }
                OutlineCurve::Cubic(_, c1, c2, b) => {
                    d.push('C');
                    push_point(&mut d, tx(c1));
                    d.push(' ');
                    push_point(&mut d, tx(c2));
                    d.push(' ');
                    push_point(&mut d, tx(b));
                }
            }
            last = Some(end);
        }
        if last.is_some() {
            d.push('Z');
        }
    }
    d
}

fn push_point(out: &mut String, (x, y): (f64, f64)) {
    push_num(out, x);
    out.push(',');
    push_num(out, y);
}

/// Quarter turns clockwise, as plotters' `FontTransform` rotates text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Turn {
    /// Upright.
    None,
    /// 270° clockwise (reads bottom to top, as y-axis labels do).
    Cw270,
}

/// Rasterises `text` at font size `em` (pixels) anchored at `anchor` (pixels, fractional allowed),
/// with plotters' anchor semantics, rotated about the anchor by `turn`. Calls `put(x, y,
/// coverage)` once per covered pixel with the summed coverage, clamped to 1.
pub(crate) fn rasterize(
    text: &str,
    em: f64,
    anchor: (f64, f64),
    (h_pos, v_pos): (HPos, VPos),
    turn: Turn,
    mut put: impl FnMut(i32, i32, f32),
) {
    let Ok(font) = font() else {
        return;
    };
    let shaped = shape(font, text);
    let upem = units_per_em(font);
    let k = em / upem;
    // Integer origin; the fractional part of the anchor moves the glyphs (sub-pixel placement).
    let (bx, by) = (anchor.0.floor(), anchor.1.floor());
    let (fx, fy) = (anchor.0 - bx, anchor.1 - by);
    // The fractional offset in the text's own (unrotated) frame.
    let (ox, oy) = match turn {
        Turn::None => (fx, fy),
        Turn::Cw270 => (-fy, fx),
    };
    let x0 = ox + start_offset(h_pos, shaped.advance * k);
    let baseline = oy + Dy::for_vpos(v_pos).resolve(em);
    let scale = PxScale::from((em * f64::from(font.height_unscaled()) / upem) as f32);
    let (bx, by) = (bx as i32, by as i32);
    let mut pixels: Vec<(i32, i32, f32)> = Vec::new();
    for (id, pen) in shaped.glyphs {
        let glyph = id.with_scale_and_position(
            scale,
            ab_glyph::point((x0 + pen * k) as f32, baseline as f32),
        );
        let Some(outlined) = font.outline_glyph(glyph) else {
            continue;
        };
        let bounds = outlined.px_bounds();
        let (min_x, min_y) = (bounds.min.x as i32, bounds.min.y as i32);
        outlined.draw(|gx, gy, coverage| {
            if coverage <= 0.0 {
                return;
            }
            let (tx, ty) = (min_x + gx as i32, min_y + gy as i32);
            // Map the text-frame pixel cell to the backend pixel cell it turns into.
            let (px, py) = match turn {
                Turn::None => (tx, ty),
                Turn::Cw270 => (ty, -tx - 1),
            };
            pixels.push((bx + px, by + py, coverage));
        });
    }
    // Neighbouring glyphs' anti-aliased edges can share a pixel: add their coverage.
    pixels.sort_by_key(|&(x, y, _)| (y, x));
    let mut iter = pixels.into_iter().peekable();
    while let Some((x, y, mut coverage)) = iter.next() {
        while let Some(&(nx, ny, c)) = iter.peek() {
            if (nx, ny) != (x, y) {
                break;
            }
            coverage += c;
            iter.next();
        }
        put(x, y, coverage.min(1.0));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn font_has_the_symbols_figures_use() {
        let font = font().unwrap();
        for c in ['…', '−', '↵', '␣', '⇥', '·', 'é', 'Ġ'] {
            assert_ne!(font.glyph_id(c).0, 0, "missing glyph for {c:?}");
        }
    }

    #[test]
    fn outlines_are_y_up_and_widths_scale() {
        let font = font().unwrap();
        let t = font.outline(font.glyph_id('T')).unwrap();
        // Curves are y-up: the bar of the T is at the top.
        let top = t.curves.iter().map(|c| match *c {
            OutlineCurve::Line(a, _)
            | OutlineCurve::Quad(a, _, _)
            | OutlineCurve::Cubic(a, _, _, _) => a.y,
        });
        assert!(top.fold(0.0, f32::max) > 1000.0);
        let ratio = x_height_ratio(font);
        assert!(ratio > 0.45 && ratio < 0.6, "{ratio}");
        let w10 = text_width("Hello", 10.0);
        let w20 = text_width("Hello", 20.0);
        assert!(w10 > 20.0 && (w20 - 2.0 * w10).abs() < 1e-9);
        assert!(text_width("", 10.0).abs() < 1e-12);
    }

    #[test]
    fn path_data_for_text_and_blank() {
        let top = (HPos::Center, Dy::for_vpos(VPos::Top));
        let d = svg_path_data("Ab", 10.0, (5.0, 5.0), top, None);
        assert!(d.starts_with('M') && d.ends_with('Z'));
        assert!(svg_path_data("   ", 10.0, (0.0, 0.0), (HPos::Left, Dy::Em(0.0)), None).is_empty());
        // Unknown characters use .notdef and never panic.
        let _ = svg_path_data(
            "\u{10FFFF}\u{0}",
            10.0,
            (0.0, 0.0),
            (HPos::Right, Dy::Ex(0.5)),
            None,
        );
        // A quarter turn about the anchor maps (x, y) to (y, -x) around it, exactly.
        let turn = Rotation {
            degrees: 270.0,
            center: (5.0, 5.0),
        };
        assert_eq!(turn.apply((7.0, 5.0)), (5.0, 3.0));
        let turned = svg_path_data("Ab", 10.0, (5.0, 5.0), top, Some(turn));
        assert_eq!(turned.matches('M').count(), d.matches('M').count());
        assert_ne!(turned, d);
    }

    #[test]
    fn raster_rotates_about_the_anchor() {
        let mut upright = Vec::new();
        rasterize(
            "Wg",
            20.0,
            (50.0, 50.0),
            (HPos::Left, VPos::Top),
            Turn::None,
            |x, y, _| {
                upright.push((x, y));
            },
        );
        assert!(upright.iter().all(|&(x, y)| x >= 49 && y >= 49));
        let mut turned = Vec::new();
        rasterize(
            "Wg",
            20.0,
            (50.0, 50.0),
            (HPos::Left, VPos::Top),
            Turn::Cw270,
            |x, y, _| {
                turned.push((x, y));
            },
        );
        // Turned 270°, the text runs upwards from the anchor and its baseline lies to the right.
        assert!(turned.iter().all(|&(x, y)| x >= 49 && y <= 51));
        assert_eq!(upright.len(), turned.len());
    }
}
