//! Text tables and JSON of the weight-space analyses in the reference code's formats: the TSV
//! rows `tunelens concepts`/`heads` stream to stdout, and the same rows, the comparisons and a
//! JSON of everything as the export writes them. One format, used by both.

use std::fmt::Write as _;

use crate::analysis::change_rate::GroupChange;
use crate::analysis::ffn_concepts::{LayerAlignment, LayerConcepts};
use crate::analysis::head_pairs::LayerHeads;
use crate::analysis::results::{ConceptsOutput, HeadsOutput};

/// The header of the concepts TSV.
pub const CONCEPTS_HEADER: &str = "Model\tSize\tLayer\tModule\tHead\tRank\tScore\tTopK";

/// The header of the heads TSV.
pub const HEADS_HEADER: &str = "Model\tSize\tLayer\tModule\tHead\tDim\tRank\tScore\tTopK";

/// `135M`, `7B`: the `Size` column.
pub fn size_label(parameters: usize) -> String {
    let p = parameters as f64;
    if p >= 1e9 {
        let b = format!("{:.1}", p / 1e9);
        format!("{}B", b.trim_end_matches(".0"))
    } else {
        format!("{:.0}M", p / 1e6)
    }
}

/// Tab and newline would break a TSV row; the reference output never has them in words.
pub fn tsv_field(text: &str) -> String {
    text.replace(['\t', '\n', '\r'], " ")
}

/// A model name as part of a file name: ASCII letters, digits, `-` and `.`; the rest `_`.
pub fn file_part(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The concepts TSV rows of one layer of one model.
pub fn concepts_rows(model: &str, size: &str, layer: &LayerConcepts, words: &[String]) -> String {
    let mut rows = String::new();
    for c in &layer.components {
        let top: Vec<&str> = c
            .words
            .iter()
            .map(|w| words.get(w.word as usize).map_or("?", String::as_str))
            .collect();
        let _ = writeln!(
            rows,
            "{}\t{size}\t{}\tFFN\t0\t{}\t{:.4}\t{}",
            tsv_field(model),
            layer.layer,
            c.rank,
            c.ratio,
            tsv_field(&top.join("|||"))
        );
    }
    rows
}

/// The heads TSV rows of one layer of one model.
pub fn heads_rows(model: &str, size: &str, layer: &LayerHeads, words: &[String]) -> String {
    let word = |i: u32| words.get(i as usize).map_or("?", String::as_str);
    let mut rows = String::new();
    for d in &layer.dims {
        let pairs: Vec<String> = d
            .pairs
            .iter()
            .map(|p| format!("{}={}", word(p.key), word(p.query)))
            .collect();
        let _ = writeln!(
            rows,
            "{}\t{size}\t{}\tQK\t{}\t{}\t{}\t{:.4}\t{}",
            tsv_field(model),
            layer.layer,
            d.head,
            d.dim,
            d.rank,
            d.energy,
            tsv_field(&pairs.join("|||"))
        );
    }
    rows
}

/// The §2.3 alignment of B to A, one row per B component.
pub fn alignment_tsv(alignment: &[LayerAlignment]) -> String {
    let mut text = String::from("Layer\tRankB\tBestRankA\tAbsCos\tJaccard\n");
    for l in alignment {
        for (r, ((best, cos), jac)) in l
            .best_match
            .iter()
            .zip(&l.alignment)
            .zip(&l.jaccard)
            .enumerate()
        {
            let _ = writeln!(text, "{}\t{}\t{best}\t{cos:.6}\t{jac:.4}", l.layer, r + 1);
        }
    }
    text
}

/// The §3.5 change rates, one row per layer group, with the reason a group has no test.
pub fn change_rate_tsv(change: &[GroupChange]) -> String {
    let mut text = String::from("Group\tLayers\tInstructionN\tInstructionMean\tInstructionStd\tGeneralN\tGeneralMean\tGeneralStd\tWelchT\tWelchDf\tP\tNote\n");
    for g in change {
        let (t, df, p) = g
            .welch
            .as_ref()
            .map_or((f64::NAN, f64::NAN, f64::NAN), |w| {
                (w.t, w.df, w.p_two_sided)
            });
        let _ = writeln!(
            text,
            "{}\t{}-{}\t{}\t{:.4}\t{:.4}\t{}\t{:.4}\t{:.4}\t{t:.4}\t{df:.1}\t{p:.4}\t{}",
            g.group,
            g.first_layer,
            g.last_layer,
            g.instruction.n,
            g.instruction.mean,
            g.instruction.std,
            g.general.n,
            g.general.mean,
            g.general.std,
            tsv_field(&g.note().unwrap_or_default())
        );
    }
    text
}

/// Everything of a concepts run as JSON, words as text.
pub fn concepts_json(output: &ConceptsOutput) -> crate::Result<String> {
    let value = serde_json::json!({
        "words": output.words,
        "models": output.results.iter().map(|r| serde_json::json!({
            "slot": r.slot,
            "model": r.model,
            "parameters": r.parameters,
            "cached": r.cached,
            "seconds": r.secs,
            "layers": r.concepts.layers.iter().map(|l| serde_json::json!({
                "layer": l.layer,
                "variance_ratios": l.ratios,
                "components": l.components.iter().map(|c| serde_json::json!({
                    "rank": c.rank,
                    "ratio": c.ratio,
                    "words": r.concepts.component_words(c),
                    "scores": c.words.iter().map(|w| w.score).collect::<Vec<_>>(),
                })).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "alignment_note": "§2.3 deterministic comparison of B (tuned) against A (base): an extension, not in the original method",
        "alignment": output.alignment,
    });
    Ok(serde_json::to_string(&value)?)
}

/// Everything of a heads run as JSON, pairs as text.
pub fn heads_json(output: &HeadsOutput) -> crate::Result<String> {
    let value = serde_json::json!({
        "words": output.words,
        "group_size": output.group_size,
        "models": output.results.iter().map(|r| serde_json::json!({
            "slot": r.slot,
            "model": r.model,
            "parameters": r.parameters,
            "cached": r.cached,
            "seconds": r.secs,
            "semantic_vectors": r.pairs.source.label(),
            "layers": r.pairs.layers.iter().map(|l| serde_json::json!({
                "layer": l.layer,
                "dims": l.dims.iter().map(|d| serde_json::json!({
                    "head": d.head,
                    "dim": d.dim,
                    "rank": d.rank,
                    "energy": d.energy,
                    "pairs": d.pairs.iter().map(|p| r.pairs.pair_text(p)).collect::<Vec<_>>(),
                    "similarities": d.pairs.iter().map(|p| p.sim).collect::<Vec<_>>(),
                })).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "change_rate": output.change,
    });
    Ok(serde_json::to_string(&value)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_like_the_papers() {
        assert_eq!(size_label(134_515_008), "135M");
        assert_eq!(size_label(7_000_000_000), "7B");
        assert_eq!(size_label(1_700_000_000), "1.7B");
    }
}
