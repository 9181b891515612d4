//! CSV and JSON writers for analysis results (the data beside each exported figure).
//!
//! CSV is long format, one value per line, with a header; fields are quoted per RFC 4180 when
//! they hold a comma, quote, line break or leading/trailing white space (tokens often start
//! with a space). Lines end in `\n`. Numbers are written in Rust's shortest round-trip form;
//! NaN as `NaN`. Depends only on `analysis::types`.

use std::fmt::Write as _;

use serde::Serialize;

use crate::analysis::types::{Attribution, Matrix};

/// Quotes `s` as one CSV field when it needs it (RFC 4180: comma, double quote, CR or LF;
/// also leading or trailing white space, which some readers trim). Quotes inside are doubled.
pub fn csv_field(s: &str) -> String {
    let needs_quotes = s.contains([',', '"', '\n', '\r'])
        || s.starts_with(char::is_whitespace)
        || s.ends_with(char::is_whitespace);
    if needs_quotes {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}

/// A CSV number: shortest round-trip form, `NaN`/`inf`/`-inf` for non-finite values.
pub(crate) fn csv_number(v: f32) -> String {
    if v.is_nan() {
        "NaN".to_owned()
    } else {
        v.to_string()
    }
}

fn cell(m: &Matrix, row: usize, col: usize) -> Option<f32> {
    if row >= m.rows || col >= m.cols {
        return None;
    }
    m.data.get(row * m.cols + col).copied()
}

fn token(tokens: &[String], i: usize) -> &str {
    tokens.get(i).map_or("", String::as_str)
}

/// Appends the rows of `a` in long format, each prefixed by `model` when given.
pub(crate) fn push_attribution_rows(out: &mut String, a: &Attribution, model: Option<&str>) {
    let prefix = model
        .map(|m| format!("{},", csv_field(m)))
        .unwrap_or_default();
    let n_in = a.raw.rows.max(a.quantized.rows);
    let n_out = a.raw.cols.max(a.quantized.cols);
    for i in 0..n_in {
        let input_token = csv_field(token(&a.input_tokens, i));
        for j in 0..n_out {
            let num = |m: &Matrix| cell(m, i, j).map(csv_number).unwrap_or_default();
            let _ = writeln!(
                out,
                "{prefix}{i},{input_token},{j},{},{},{}",
                csv_field(token(&a.output_tokens, j)),
                num(&a.raw),
                num(&a.quantized)
            );
        }
    }
}

/// Header of [`attribution_csv`].
pub(crate) const ATTRIBUTION_HEADER: &str =
    "input_index,input_token,output_index,output_token,raw,quantized";

/// Header of [`density_csv`].
pub(crate) const DENSITY_HEADER: &str = "input_index,input_token,density,instruction";

/// Appends the density rows of `a`, each prefixed by `model` when given.
pub(crate) fn push_density_rows(out: &mut String, a: &Attribution, model: Option<&str>) {
    let prefix = model
        .map(|m| format!("{},", csv_field(m)))
        .unwrap_or_default();
    let n = a.density.len().max(a.input_tokens.len());
    for i in 0..n {
        let density = a.density.get(i).map(|&v| csv_number(v)).unwrap_or_default();
        let instruction = match a.instruction_mask.as_ref().and_then(|m| m.get(i)) {
            Some(true) => "1",
            Some(false) => "0",
            None => "",
        };
        let _ = writeln!(
            out,
            "{prefix}{i},{},{density},{instruction}",
            csv_field(token(&a.input_tokens, i))
        );
    }
}

/// The attribution matrices in long format: one line per (input token, output token) with
/// header `input_index,input_token,output_index,output_token,raw,quantized`.
pub fn attribution_csv(a: &Attribution) -> String {
    let mut out = format!("{ATTRIBUTION_HEADER}\n");
    push_attribution_rows(&mut out, a, None);
    out
}

/// Importance density per prompt token, header `input_index,input_token,density,instruction`;
/// `instruction` is 1 or 0 for instruction words, empty when no mask was given.
pub fn density_csv(a: &Attribution) -> String {
    let mut out = format!("{DENSITY_HEADER}\n");
    push_density_rows(&mut out, a, None);
    out
}

/// The attribution as pretty-printed JSON (the struct's own field names; NaN becomes `null`).
pub fn attribution_json(a: &Attribution) -> crate::Result<String> {
    Ok(serde_json::to_string_pretty(a)?)
}

/// One labelled attribution, as written in multi-model JSON exports.
#[derive(Serialize)]
pub(crate) struct Labelled<'a> {
    /// Which model (e.g. "A: SmolLM2").
    pub label: &'a str,
    /// Its attribution.
    pub attribution: &'a Attribution,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Attribution {
        let mut raw = Matrix::zeros(2, 1);
        raw.set(0, 0, 0.5);
        raw.set(1, 0, f32::NAN);
        let mut quantized = Matrix::zeros(2, 1);
        quantized.set(0, 0, 3.0);
        Attribution {
            input_ids: vec![1, 2],
            input_tokens: vec![" a,b".to_owned(), "say \"hi\"\n".to_owned()],
            output_ids: vec![3],
            output_tokens: vec!["ok".to_owned()],
            raw,
            quantized,
            density: vec![1.0, 0.25],
            instruction_mask: Some(vec![false, true]),
            instruction_score: Some(0.2),
            input_words: Vec::new(),
            output_words: Vec::new(),
        }
    }

    #[test]
    fn csv_quoting() {
        assert_eq!(csv_field("plain"), "plain");
        assert_eq!(csv_field(""), "");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_field("line\nbreak"), "\"line\nbreak\"");
        assert_eq!(csv_field("cr\r"), "\"cr\r\"");
        assert_eq!(csv_field(" give"), "\" give\"");
    }

    #[test]
    fn attribution_tables() {
        let a = sample();
        assert_eq!(
            attribution_csv(&a),
            "input_index,input_token,output_index,output_token,raw,quantized\n\
             0,\" a,b\",0,ok,0.5,3\n\
             1,\"say \"\"hi\"\"\n\",0,ok,NaN,0\n"
        );
        assert_eq!(
            density_csv(&a),
            "input_index,input_token,density,instruction\n0,\" a,b\",1,0\n1,\"say \"\"hi\"\"\n\",0.25,1\n"
        );
        let no_mask = Attribution {
            instruction_mask: None,
            ..a.clone()
        };
        assert!(density_csv(&no_mask).ends_with("0.25,\n"));
        let json = attribution_json(&a).unwrap();
        let back: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert!((back["instruction_score"].as_f64().unwrap() - 0.2).abs() < 1e-6);
        assert!(back["raw"]["data"][1].is_null());
    }

    #[test]
    fn mismatched_shapes_do_not_panic() {
        let mut a = sample();
        a.raw = Matrix {
            rows: 3,
            cols: 2,
            data: vec![1.0],
        };
        a.input_tokens.clear();
        a.density.clear();
        let csv = attribution_csv(&a);
        assert_eq!(csv.lines().count(), 1 + 6);
        assert!(csv.contains("\n2,,1,,,\n"));
        assert_eq!(density_csv(&a).lines().count(), 1);
    }
}
