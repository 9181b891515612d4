//! Plain-data results shared by the UI, export and tests.

use serde::{Deserialize, Serialize};

/// A dense row-major matrix of `f32`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Matrix {
    /// Rows.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
    /// `rows * cols` values, row-major.
    pub data: Vec<f32>,
}

impl Matrix {
    /// A matrix of zeros.
    pub fn zeros(rows: usize, cols: usize) -> Self {
        Self {
            rows,
            cols,
            data: vec![0.0; rows * cols],
        }
    }

    /// Value at `(row, col)`.
    pub fn get(&self, row: usize, col: usize) -> f32 {
        self.data[row * self.cols + col]
    }

    /// Sets `(row, col)`.
    pub fn set(&mut self, row: usize, col: usize, value: f32) {
        self.data[row * self.cols + col] = value;
    }

    /// Row `row` as a slice.
    pub fn row(&self, row: usize) -> &[f32] {
        &self.data[row * self.cols..(row + 1) * self.cols]
    }
}

/// Gradient attribution of one (prompt, response) pair (METHODS.md §1).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Attribution {
    /// Prompt token ids (`tp`, no BOS).
    pub input_ids: Vec<u32>,
    /// Prompt token strings.
    pub input_tokens: Vec<String>,
    /// Response token ids (`ts[n_in..]`).
    pub output_ids: Vec<u32>,
    /// Response token strings.
    pub output_tokens: Vec<String>,
    /// `A_raw`, gradient × input summed over the hidden dimension, `(n_in, n_out)`.
    pub raw: Matrix,
    /// `Q`, per-output normalised and quantised to `0..=L`, `(n_in, n_out)`.
    pub quantized: Matrix,
    /// `D̂`, importance density per prompt token, normalised to max 1.
    pub density: Vec<f32>,
    /// Instruction-word mask over the prompt tokens, when one was given.
    pub instruction_mask: Option<Vec<bool>>,
    /// Instruction score `s`, when a mask was given.
    pub instruction_score: Option<f32>,
    /// Prompt words: decoded text and the prompt tokens each covers.
    #[serde(default)]
    pub input_words: Vec<WordSpan>,
    /// Response words.
    #[serde(default)]
    pub output_words: Vec<WordSpan>,
}

/// A word made of tokens `start..end`, with its decoded text.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WordSpan {
    /// Decoded text, trimmed.
    pub text: String,
    /// First token.
    pub start: usize,
    /// One past the last token.
    pub end: usize,
}

/// The byte GPT-2's byte-level BPE spells as `c` (`bytes_to_unicode`): bytes in `!..=~`,
/// `¡..=¬` and `®..=ÿ` stand for themselves; the other 68 (`0..=32`, `127..=160`, `173`), in
/// order, are written as `U+0100 + n`.
fn byte_level_byte(c: char) -> Option<u8> {
    let code = u32::from(c);
    let byte = match code {
        33..=126 | 161..=172 | 174..=255 => code,
        256..=288 => code - 256,
        289..=322 => code - 289 + 127,
        323 => 173,
        _ => return None,
    };
    u8::try_from(byte).ok()
}

/// A vocabulary string as a reader should see it: byte-level BPE (`Ġthe`, `Ċ`, `Ã©`) decoded to
/// its text, SentencePiece's `▁` shown as a space, `<0x0A>` as a newline. Strings that are
/// neither (special tokens) are returned as they are.
pub fn display_token(token: &str) -> String {
    if token == "<0x0A>" {
        return "\n".to_owned();
    }
    if token.contains('▁') {
        return token.replace('▁', " ");
    }
    if token.starts_with('<') && token.ends_with('>') {
        return token.to_owned();
    }
    let bytes: Option<Vec<u8>> = token.chars().map(byte_level_byte).collect();
    match bytes.map(String::from_utf8) {
        Some(Ok(text)) => text,
        _ => token.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_display_as_text() {
        assert_eq!(display_token("Ġthe"), " the");
        assert_eq!(display_token("Ċ"), "\n");
        assert_eq!(display_token("ĠcafÃ©"), " café");
        assert_eq!(display_token("▁the"), " the");
        assert_eq!(display_token("<0x0A>"), "\n");
        assert_eq!(display_token("<|im_start|>"), "<|im_start|>");
        assert_eq!(display_token("plain"), "plain");
        // Not valid byte-level UTF-8: left alone.
        assert_eq!(display_token("Ã"), "Ã");
    }
}
