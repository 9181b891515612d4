//! Publication-quality export: figures as SVG and PNG, and their data as CSV and JSON.
//!
//! Every figure uses one paper style (DejaVu Sans, embedded; thin axes; no grid; viridis or a
//! blue–white–red map with a colour bar; Okabe–Ito series colours) at print size: one panel is
//! a single journal column, 3.4 in wide. SVGs carry their text as glyph outlines, so they need
//! no font anywhere; PNGs are 300 dpi. Figures are plain data ([`Figure`]) built from
//! `analysis::types`; [`attribution_figures`] and [`write_attribution`] do this for attribution.
//!
//! This module depends only on `analysis::types` and `error` (plus `plotters`, `ab_glyph`,
//! `serde_json`): never on the model, the worker or the UI.

mod attribution;
mod canvas;
mod data;
mod figure;
mod font;
pub mod forgetting;
mod heatmap;
pub mod iv;
pub mod knowledge;
mod panels;
pub mod shift;
mod svg_text;
pub mod tables;
pub mod views;

use std::path::Path;

pub use attribution::{attribution_figures, write_attribution};
/// The numeric axes of every figure, in the app and in exports: bounds widened to round steps,
/// and the ticks with their labels (`AXIS_TICKS` aimed for).
pub use canvas::{nice_bounds, ticks};
pub use data::{attribution_csv, attribution_json, csv_field, density_csv};
pub use figure::{
    render_png, render_svg, BarChart, ColorScale, Figure, Heatmap, HistSeries, Histogram, LinePlot,
    LineSeries,
};
pub use panels::TICKS as AXIS_TICKS;

/// Writes `fig` to `path` as SVG or PNG, chosen by the extension (`.svg` / `.png`, any case).
pub fn write_figure(fig: &Figure, path: &Path) -> crate::Result<()> {
    let extension = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    match extension.as_deref() {
        Some("svg") => write_bytes(path, render_svg(fig)?.as_bytes()),
        Some("png") => write_bytes(path, &render_png(fig)?),
        _ => Err(crate::Error::invalid(
            "figure file",
            format!("the name must end in .svg or .png: {}", path.display()),
        )),
    }
}

/// Writes `bytes` to `path`; the error names the path.
pub(crate) fn write_bytes(path: &Path, bytes: &[u8]) -> crate::Result<()> {
    std::fs::write(path, bytes)
        .map_err(|e| crate::Error::bad_file(path, format!("cannot write: {e}")))
}

/// Words of the prompt used in file names.
const STEM_PROMPT_WORDS: usize = 4;
/// Longest file stem, in characters.
const STEM_MAX_CHARS: usize = 80;

/// The stem of an export comparing `models` (in slot order): [`default_file_stem`] of the
/// names joined by `_vs_`. The GUI's Export and the CLI name their files with it.
pub fn comparison_stem<'a>(
    view: &str,
    models: impl IntoIterator<Item = &'a str>,
    context: &str,
) -> String {
    let joined = models.into_iter().collect::<Vec<_>>().join("_vs_");
    default_file_stem(view, &joined, context)
}

/// A file name stem for an export, e.g.
/// `attribution_SmolLM2-135M-Instruct_give-three-tips-for` for view "attribution", model
/// "models/SmolLM2-135M-Instruct" and prompt "Give three tips for staying healthy.".
/// `model` may be a path (its file stem is used); the prompt contributes its first words,
/// lower-cased. Only `[A-Za-z0-9_-]`, at most 80 characters, never empty.
pub fn default_file_stem(view: &str, model: &str, prompt: &str) -> String {
    let model = model.trim().trim_end_matches(['/', '\\']);
    let last = model.rsplit(['/', '\\']).next().unwrap_or(model);
    let model_name = Path::new(last)
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or(last);
    let prompt_words: Vec<String> = prompt
        .split_whitespace()
        .map(|w| {
            w.chars()
                .filter(char::is_ascii_alphanumeric)
                .collect::<String>()
                .to_ascii_lowercase()
        })
        .filter(|w| !w.is_empty())
        .take(STEM_PROMPT_WORDS)
        .collect();
    let parts = [slug(view), slug(model_name), prompt_words.join("-")];
    let mut stem = parts
        .iter()
        .filter(|p| !p.is_empty())
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join("_");
    stem.truncate(STEM_MAX_CHARS);
    let stem = stem.trim_end_matches(['-', '_']);
    if stem.is_empty() {
        "export".to_owned()
    } else {
        stem.to_owned()
    }
}

/// `s` with every run of characters outside `[A-Za-z0-9_-]` replaced by one '-', trimmed.
/// `s` as a file-name part: `[A-Za-z0-9_-]`, other runs of characters as one `-`.
pub fn slug(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
            out.push(c);
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    out.trim_matches(['-', '_']).to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analysis::types::{Attribution, Matrix};

    fn attribution(n_in: usize, n_out: usize) -> Attribution {
        let mut raw = Matrix::zeros(n_in, n_out);
        let mut quantized = Matrix::zeros(n_in, n_out);
        for i in 0..n_in {
            for j in 0..n_out {
                let v = ((i * 7 + j * 3) % 11) as f32 / 10.0;
                raw.set(i, j, v - 0.3);
                quantized.set(i, j, (v * 10.0).round());
            }
        }
        let words = [
            "Give", " three", " tips", " for", " staying", " healthy", ".", "\n",
        ];
        let tokens = |n: usize, offset: usize| -> Vec<String> {
            (0..n)
                .map(|i| words[(i + offset) % words.len()].to_owned())
                .collect()
        };
        Attribution {
            input_ids: (0..n_in as u32).collect(),
            input_tokens: tokens(n_in, 0),
            output_ids: (0..n_out as u32).collect(),
            output_tokens: tokens(n_out, 3),
            raw,
            quantized,
            density: (0..n_in).map(|i| ((i % 5) as f32 + 1.0) / 5.0).collect(),
            instruction_mask: Some((0..n_in).map(|i| i % 4 == 0).collect()),
            instruction_score: Some(0.37),
            input_words: Vec::new(),
            output_words: Vec::new(),
        }
    }

    fn all_kinds() -> Vec<Figure> {
        let mut values = Matrix::zeros(3, 4);
        values.set(1, 2, -2.0);
        values.set(2, 3, 1.5);
        let heatmap = Heatmap {
            title: "Heads".to_owned(),
            row_labels: vec!["a".into(), "b".into(), "c".into()],
            col_labels: vec!["w".into(), "x".into(), "y".into(), "z".into()],
            values,
            value_label: "effect".to_owned(),
            scale: ColorScale::Diverging,
            x_label: "head".to_owned(),
            y_label: "layer".to_owned(),
        };
        let bar = BarChart {
            title: "Bars".to_owned(),
            labels: vec!["one".into(), "two".into(), "three".into()],
            values: vec![1.0, -0.5, 2.0],
            highlighted: vec![false, true, false],
            highlight_label: "flagged".to_owned(),
            x_label: "word".to_owned(),
            y_label: "value".to_owned(),
        };
        let histogram = Histogram {
            title: "Distances".to_owned(),
            x_label: "cosine distance".to_owned(),
            y_label: "count".to_owned(),
            bins: 10,
            series: vec![
                HistSeries {
                    name: "paraphrase".to_owned(),
                    values: (0..200)
                        .map(|i| (i as f32 * 0.37).sin().abs() * 0.5)
                        .collect(),
                },
                HistSeries {
                    name: "other".to_owned(),
                    values: (0..200)
                        .map(|i| 0.3 + (i as f32 * 0.11).cos().abs() * 0.6)
                        .collect(),
                },
            ],
        };
        let line = LinePlot {
            title: "Loss".to_owned(),
            x_label: "step".to_owned(),
            y_label: "loss".to_owned(),
            series: vec![
                LineSeries {
                    name: "train".to_owned(),
                    points: (0..50)
                        .map(|i| (i as f32, 3.0 / (1.0 + i as f32 * 0.1)))
                        .collect(),
                },
                LineSeries {
                    name: "eval".to_owned(),
                    points: (0..10)
                        .map(|i| (i as f32 * 5.0, 3.2 / (1.0 + i as f32 * 0.5)))
                        .collect(),
                },
            ],
        };
        vec![
            Figure::Heatmap(heatmap.clone()),
            Figure::Bar(bar.clone()),
            Figure::Histogram(histogram),
            Figure::Line(line),
            Figure::Row(vec![Figure::Heatmap(heatmap), Figure::Bar(bar)]),
            attribution_figures(&attribution(5, 3), "A: tiny"),
        ]
    }

    fn assert_svg(svg: &str) {
        assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(80)]);
        assert_eq!(svg.matches("<svg").count(), 1);
        assert_eq!(svg.matches("</svg>").count(), 1);
        assert!(!svg.contains("<text"));
        assert!(svg.contains("<path"));
    }

    #[test]
    fn every_kind_renders_svg_without_text_elements() {
        for fig in all_kinds() {
            let svg = render_svg(&fig).unwrap();
            assert_svg(&svg);
            assert!(svg.contains("pt\" height=\""), "print size missing");
        }
    }

    #[test]
    fn every_kind_renders_png() {
        for fig in all_kinds() {
            let png = render_png(&fig).unwrap();
            assert!(png.starts_with(&[0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A]));
            assert!(png.len() > 1024);
            assert_eq!(&png[37..41], b"pHYs");
        }
    }

    #[test]
    fn markup_in_labels_is_escaped() {
        let nasty = "<&>\"' </svg><text>";
        let fig = Figure::Column(vec![
            Figure::Heatmap(Heatmap {
                title: nasty.to_owned(),
                row_labels: vec![nasty.to_owned()],
                col_labels: vec![nasty.to_owned()],
                values: Matrix::zeros(1, 1),
                value_label: nasty.to_owned(),
                scale: ColorScale::Sequential,
                x_label: nasty.to_owned(),
                y_label: nasty.to_owned(),
            }),
            Figure::Bar(BarChart {
                title: nasty.to_owned(),
                labels: vec![nasty.to_owned(), "\n\t\u{0}".to_owned()],
                values: vec![1.0, 2.0],
                highlighted: vec![true],
                highlight_label: nasty.to_owned(),
                x_label: nasty.to_owned(),
                y_label: nasty.to_owned(),
            }),
        ]);
        let svg = render_svg(&fig).unwrap();
        assert_svg(&svg);
        assert!(svg.contains("aria-label=\"&lt;&amp;&gt;&quot;&apos; &lt;/svg&gt;&lt;text&gt;\""));
        render_png(&fig).unwrap();
    }

    #[test]
    fn empty_and_degenerate_data_render() {
        let nan = Matrix {
            rows: 2,
            cols: 2,
            data: vec![f32::NAN; 4],
        };
        let short = Matrix {
            rows: 3,
            cols: 3,
            data: vec![1.0],
        };
        let mut figures = vec![
            Figure::Heatmap(Heatmap::default()),
            Figure::Heatmap(Heatmap {
                values: Matrix::zeros(1, 1),
                ..Heatmap::default()
            }),
            Figure::Heatmap(Heatmap {
                values: nan,
                scale: ColorScale::Diverging,
                ..Heatmap::default()
            }),
            Figure::Heatmap(Heatmap {
                values: short,
                ..Heatmap::default()
            }),
            Figure::Bar(BarChart::default()),
            Figure::Bar(BarChart {
                values: vec![0.0, f32::NAN, f32::INFINITY],
                highlighted: vec![true; 7],
                ..BarChart::default()
            }),
            Figure::Histogram(Histogram::default()),
            Figure::Histogram(Histogram {
                series: vec![HistSeries {
                    name: String::new(),
                    values: vec![2.0; 5],
                }],
                ..Histogram::default()
            }),
            Figure::Line(LinePlot::default()),
            Figure::Line(LinePlot {
                series: vec![
                    LineSeries::default(),
                    LineSeries {
                        name: "x".into(),
                        points: vec![(0.0, f32::NAN), (1.0, 1.0), (f32::NAN, 0.0), (2.0, 2.0)],
                    },
                ],
                ..LinePlot::default()
            }),
            Figure::Row(Vec::new()),
            Figure::Column(vec![Figure::Row(Vec::new())]),
        ];
        let many = Matrix::zeros(120, 150);
        figures.push(Figure::Heatmap(Heatmap {
            row_labels: (0..120).map(|i| format!("row label number {i}")).collect(),
            col_labels: (0..150).map(|i| format!("c{i}")).collect(),
            values: many,
            ..Heatmap::default()
        }));
        for fig in &figures {
            let svg = render_svg(fig).unwrap();
            assert!(svg.starts_with("<svg") && !svg.contains("<text"));
            render_png(fig).unwrap();
        }
    }

    #[test]
    fn file_stems() {
        assert_eq!(
            default_file_stem(
                "attribution",
                "/models/SmolLM2-135M-Instruct/",
                "Give three tips for staying healthy."
            ),
            "attribution_SmolLM2-135M-Instruct_give-three-tips-for"
        );
        assert_eq!(
            default_file_stem("attribution", "m/SmolLM2.Q4_1.gguf", "  Don't panic!  "),
            "attribution_SmolLM2-Q4_1_dont-panic"
        );
        assert_eq!(default_file_stem("", "", ""), "export");
        assert_eq!(default_file_stem("heads", "", "¿¡ !!"), "heads");
        let long = default_file_stem(&"v".repeat(50), &"m".repeat(50), &"word ".repeat(9));
        assert!(long.len() <= 80 && !long.ends_with(['-', '_']));
        assert!(long
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'));
    }

    #[test]
    fn writes_attribution_files() {
        let dir = tempfile::tempdir().unwrap();
        let a = attribution(4, 3);
        let out = dir.path().join("nested/out");
        let paths = write_attribution(&out, "attr", &[("A: tiny".to_owned(), &a)]).unwrap();
        let names: Vec<String> = paths
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            [
                "attr.svg",
                "attr.png",
                "attr.csv",
                "attr_density.csv",
                "attr.json"
            ]
        );
        for p in &paths {
            assert!(std::fs::metadata(p).unwrap().len() > 0, "{}", p.display());
        }
        // Records start with a digit; a token's line break continues a quoted field.
        let records = |csv: &str, prefix: &str| {
            csv.lines()
                .filter(|l| {
                    l.strip_prefix(prefix)
                        .is_some_and(|r| r.starts_with(|c: char| c.is_ascii_digit()))
                })
                .count()
        };
        let csv = std::fs::read_to_string(&paths[2]).unwrap();
        assert_eq!(records(&csv, ""), 12);

        let b = attribution(3, 5);
        let both = [("A".to_owned(), &a), ("B, tuned".to_owned(), &b)];
        let paths = write_attribution(dir.path(), "both", &both).unwrap();
        let csv = std::fs::read_to_string(&paths[2]).unwrap();
        assert!(csv.starts_with("model,input_index,"));
        assert_eq!(
            (records(&csv, "A,"), records(&csv, "\"B, tuned\",")),
            (12, 15)
        );
        assert!(csv.contains("\n\"B, tuned\",2,"));
        let density = std::fs::read_to_string(&paths[3]).unwrap();
        assert!(density.starts_with("model,input_index,input_token,density,instruction\n"));
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&paths[4]).unwrap()).unwrap();
        assert_eq!(json[1]["label"], "B, tuned");
        assert_eq!(
            json[1]["attribution"]["output_ids"]
                .as_array()
                .unwrap()
                .len(),
            5
        );

        assert!(write_attribution(dir.path(), "x", &[]).is_err());
        assert!(write_attribution(dir.path(), "../x", &both).is_err());
    }

    #[test]
    fn write_errors_name_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("plain_file");
        std::fs::write(&file, b"x").unwrap();
        let fig = attribution_figures(&attribution(2, 2), "A");
        for name in ["fig.svg", "fig.png"] {
            let target = file.join(name);
            let err = write_figure(&fig, &target).unwrap_err().to_string();
            assert!(err.contains(&target.display().to_string()), "{err}");
        }
        let a = attribution(2, 2);
        let under_file = file.join("sub");
        let err = write_attribution(&under_file, "s", &[("A".to_owned(), &a)])
            .unwrap_err()
            .to_string();
        assert!(err.contains(&under_file.display().to_string()), "{err}");
        let err = write_figure(&fig, &dir.path().join("fig.pdf"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("fig.pdf"), "{err}");
        write_figure(&fig, &dir.path().join("fig.SVG")).unwrap();
    }
}
