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
