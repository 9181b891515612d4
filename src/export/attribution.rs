//! Export of gradient attributions (METHODS.md §1): the heatmap + density figure, and the
//! figure, CSV and JSON files written together by the Attribution view and `tunelens attribute
//! --out`. Depends only on `analysis::types` and the rest of this module.

use std::path::{Path, PathBuf};

use super::data::{
    push_attribution_rows, push_density_rows, Labelled, ATTRIBUTION_HEADER, DENSITY_HEADER,
};
use super::figure::{BarChart, ColorScale, Figure, Heatmap};
use super::{attribution_json, render_png, render_svg, write_bytes};
use crate::analysis::types::{display_token, Attribution};

/// The figure for one attribution: a heatmap of the quantised attribution (rows = prompt
/// tokens, columns = response tokens) above a bar chart of the importance density, with
/// instruction words highlighted and the instruction score in its title when present.
/// `label` names the model in both titles, e.g. "A: SmolLM2".
pub fn attribution_figures(a: &Attribution, label: &str) -> Figure {
    let label = label.trim();
    let titled = |what: &str| {
        if label.is_empty() {
            what.to_owned()
        } else {
            format!("{label} — {what}")
        }
    };
    let levels = a
        .quantized
        .data
        .iter()
        .copied()
        .filter(|v| v.is_finite())
        .fold(0.0f32, f32::max);
    let value_label = if levels > 0.0 {
        format!("attribution level (0–{levels})")
    } else {
        "attribution level".to_owned()
    };
    let shown = |tokens: &[String]| -> Vec<String> {
        tokens
            .iter()
            .map(|t| display_token(t).trim().to_owned())
            .collect()
    };
    let heatmap = Heatmap {
        title: titled("attribution"),
        row_labels: shown(&a.input_tokens),
        col_labels: shown(&a.output_tokens),
        values: a.quantized.clone(),
        value_label,
        scale: ColorScale::Sequential,
        x_label: "response token".to_owned(),
        y_label: "prompt token".to_owned(),
    };
    let density_title = match a.instruction_score {
        Some(s) if s.is_finite() => {
            titled(&format!("importance density (instruction score {s:.2})"))
        }
        _ => titled("importance density"),
    };
    let highlighted = a.instruction_mask.clone().unwrap_or_default();
    let bars = BarChart {
        title: density_title,
        labels: shown(&a.input_tokens),
        values: a.density.clone(),
        highlight_label: if highlighted.iter().any(|&h| h) {
            "instruction word".to_owned()
        } else {
            String::new()
        },
        highlighted,
        x_label: "prompt token".to_owned(),
        y_label: "density".to_owned(),
    };
    Figure::Column(vec![Figure::Heatmap(heatmap), Figure::Bar(bars)])
}

/// Writes `<stem>.svg`, `<stem>.png` (the figure; several attributions side by side),
/// `<stem>.csv` (long format), `<stem>_density.csv` and `<stem>.json` into `dir`, creating it
/// if needed, and returns the paths in that order. With several attributions the CSV files get
/// a leading `model` column and the JSON is an array of `{label, attribution}`.
pub fn write_attribution(
    dir: &Path,
    stem: &str,
    items: &[(String, &Attribution)],
) -> crate::Result<Vec<PathBuf>> {
    if items.is_empty() {
        return Err(crate::Error::invalid(
            "attribution export",
            "no attribution to export",
        ));
    }
    if stem.trim().is_empty() || stem.contains(['/', '\\']) || stem == "." || stem == ".." {
        return Err(crate::Error::invalid(
            "file name",
            format!("`{stem}` is not a plain file name"),
        ));
    }
    std::fs::create_dir_all(dir)
        .map_err(|e| crate::Error::bad_file(dir, format!("cannot create folder: {e}")))?;
    let several = items.len() > 1;
    let figure = match items {
        [(label, a)] => attribution_figures(a, label),
        _ => Figure::Row(
            items
                .iter()
                .map(|(label, a)| attribution_figures(a, label))
                .collect(),
        ),
    };

    let mut table = String::new();
    let mut density = String::new();
    if several {
        table.push_str("model,");
        density.push_str("model,");
    }
    table.push_str(ATTRIBUTION_HEADER);
    table.push('\n');
    density.push_str(DENSITY_HEADER);
    density.push('\n');
    for (label, a) in items {
        let model = several.then_some(label.as_str());
        push_attribution_rows(&mut table, a, model);
        push_density_rows(&mut density, a, model);
    }
    let json = if let [(_, a)] = items {
        attribution_json(a)?
    } else {
        let labelled: Vec<Labelled<'_>> = items
            .iter()
            .map(|(label, a)| Labelled {
                label,
                attribution: a,
            })
            .collect();
        serde_json::to_string_pretty(&labelled)?
    };

    let path = |suffix: &str| dir.join(format!("{stem}{suffix}"));
    let files: [(PathBuf, Vec<u8>); 5] = [
        (path(".svg"), render_svg(&figure)?.into_bytes()),
        (path(".png"), render_png(&figure)?),
        (path(".csv"), table.into_bytes()),
        (path("_density.csv"), density.into_bytes()),
        (path(".json"), json.into_bytes()),
    ];
    let mut written = Vec::with_capacity(files.len());
    for (path, bytes) in files {
        write_bytes(&path, &bytes)?;
        written.push(path);
    }
    Ok(written)
}
