//! Word lists and word vectors shared by the weight-space analyses (METHODS.md §2.1, §2.2.4,
//! §3.1, §3.2): the `word<TAB>freq` list `W_list` with its case-variant merging, averaged
//! sub-token embeddings, and unit-normalised rows.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::{Tokenizer, Weight};

/// An ordered word list (most frequent first), after case-variant merging.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct WordList {
    /// The words, in file order of their first-seen form.
    pub words: Vec<String>,
    /// Summed frequency of each word and its merged case variants.
    pub freqs: Vec<f64>,
}

impl WordList {
    /// Parses `word<TAB>freq` lines (as `load_wiki_words` of the reference code, `minfreq = 0`):
    /// a word whose lower-case, UPPER-case or Capitalised form was already seen is merged into
    /// that first-seen form and its frequency added. Blank lines are skipped; a line without a
    /// tab counts with frequency 0. Errors name the 1-based line.
    pub fn parse(text: &str) -> std::result::Result<Self, (usize, String)> {
        let mut list = Self::default();
        let mut index: HashMap<String, usize> = HashMap::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim_end_matches('\r');
            if line.trim().is_empty() {
                continue;
            }
            let (word, freq) = match line.split_once('\t') {
                Some((word, freq)) => {
                    let freq: f64 = freq.trim().parse().map_err(|_| {
                        (
                            n + 1,
                            format!("frequency `{}` is not a number", freq.trim()),
                        )
                    })?;
                    (word, freq)
                }
                None => (line, 0.0),
            };
            if word.is_empty() {
                return Err((n + 1, "empty word".to_owned()));
            }
            let variants = [word.to_lowercase(), word.to_uppercase(), capitalize(word)];
            let seen = std::iter::once(word)
                .chain(variants.iter().map(String::as_str))
                .find_map(|v| index.get(v).copied());
            if let Some(i) = seen {
                list.freqs[i] += freq;
            } else {
                index.insert(word.to_owned(), list.words.len());
                list.words.push(word.to_owned());
                list.freqs.push(freq);
            }
        }
        if list.words.is_empty() {
            return Err((0, "no words".to_owned()));
        }
        Ok(list)
    }

    /// Number of words.
    pub fn len(&self) -> usize {
        self.words.len()
    }

    /// Whether the list is empty.
    pub fn is_empty(&self) -> bool {
        self.words.is_empty()
    }

    /// The first `n` words (all when `n` is larger).
    #[must_use]
    pub fn truncated(&self, n: usize) -> Self {
        let n = n.min(self.len());
        Self {
            words: self.words[..n].to_vec(),
            freqs: self.freqs[..n].to_vec(),
        }
    }
}

/// Python's `str.capitalize`: first character upper-case, the rest lower-case.
fn capitalize(word: &str) -> String {
    let mut chars = word.chars();
    match chars.next() {
        Some(first) => first
            .to_uppercase()
            .chain(chars.flat_map(char::to_lowercase))
            .collect(),
        None => String::new(),
    }
}

/// The token ids of each word, as §2.2.4 tokenizes it: `tokenize(" " + w)` without special
/// tokens, dropping a bare leading `▁` piece (SentencePiece vocabularies).
pub fn word_token_ids(tokenizer: &Tokenizer, words: &[String]) -> Result<Vec<Vec<u32>>> {
    let bare = tokenizer.token_to_id("▁");
    words
        .iter()
        .map(|w| {
            let mut ids = tokenizer.encode(&format!(" {w}"), false)?;
            if ids.len() > 1 && bare.is_some() && ids.first().copied() == bare {
                ids.remove(0);
            }
            Ok(ids)
        })
        .collect()
}

/// Row-major `(n, dim)` `f32` values.
#[derive(Clone, Debug, PartialEq)]
pub struct Rows {
    /// Number of rows.
    pub n: usize,
    /// Row length.
    pub dim: usize,
    /// `n * dim` values.
    pub data: Vec<f32>,
}

impl Rows {
    /// Row `i`.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.dim..(i + 1) * self.dim]
    }

    /// Scales every row to unit length; zero rows stay zero (as `torch.nn.functional.normalize`).
    #[must_use]
    pub fn normalized(mut self) -> Self {
        if self.dim == 0 {
            return self;
        }
        for row in self.data.chunks_exact_mut(self.dim) {
            let norm = row
                .iter()
                .map(|&v| f64::from(v) * f64::from(v))
                .sum::<f64>()
                .sqrt();
            if norm > 1e-12 {
                let inv = (1.0 / norm) as f32;
                for v in row.iter_mut() {
                    *v *= inv;
                }
            }
        }
        self
    }

    /// As a CPU tensor `(n, dim)`.
    pub fn to_tensor(&self) -> Result<Tensor> {
        Ok(Tensor::from_slice(
            &self.data,
            (self.n, self.dim),
            &Device::Cpu,
        )?)
    }
}

/// Averages rows of `matrix` (`(V, d)`, e.g. `E_in` or `lm_head`) over each word's token ids
/// (§2.2.4 and §3.2). A word without tokens gets the zero vector; an id outside the matrix is an
/// error.
pub fn mean_token_rows(matrix: &Weight, ids: &[Vec<u32>]) -> Result<Rows> {
    let (vocab, dim) = matrix.dims2()?;
    let flat: Vec<u32> = ids.iter().flatten().copied().collect();
    if let Some(&bad) = flat.iter().find(|&&id| id as usize >= vocab) {
        return Err(Error::invalid(
            "word tokens",
            format!("token id {bad} is outside the {vocab}-row embedding matrix"),
        ));
    }
    let mut data = vec![0f32; ids.len() * dim];
    if flat.is_empty() {
        return Ok(Rows {
            n: ids.len(),
            dim,
            data,
        });
    }
    let index = Tensor::from_slice(&flat, flat.len(), &matrix.device())?;
    let picked = matrix
        .index_rows(&index)?
        .to_dtype(DType::F32)?
        .to_device(&Device::Cpu)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let mut at = 0;
    for (out, word_ids) in data.chunks_exact_mut(dim).zip(ids) {
        if word_ids.is_empty() {
            continue;
        }
        let mut acc = vec![0f64; dim];
        for _ in word_ids {
            for (a, &v) in acc.iter_mut().zip(&picked[at * dim..(at + 1) * dim]) {
                *a += f64::from(v);
            }
            at += 1;
        }
        let inv = 1.0 / word_ids.len() as f64;
        for (o, a) in out.iter_mut().zip(acc) {
            *o = (a * inv) as f32;
        }
    }
    Ok(Rows {
        n: ids.len(),
        dim,
        data,
    })
}

/// Indices of the `k` largest values of `score(i)` for `i < n`, largest first; ties keep the
/// lower index first. NaN scores sort last.
pub fn top_k_indices(n: usize, k: usize, score: impl Fn(usize) -> f32) -> Vec<u32> {
    let k = k.min(n);
    if k == 0 {
        return Vec::new();
    }
    let key = |i: u32| {
        let s = score(i as usize);
        if s.is_nan() {
            f32::NEG_INFINITY
        } else {
            s
        }
    };
    let order = |a: &u32, b: &u32| key(*b).total_cmp(&key(*a)).then(a.cmp(b));
    let mut idx: Vec<u32> = match prefilter(n, k, &key) {
        Some(candidates) => candidates,
        None => (0..n as u32).collect(),
    };
    if k < idx.len() {
        idx.select_nth_unstable_by(k - 1, order);
        idx.truncate(k);
    }
    idx.sort_unstable_by(order);
    idx
}

/// For a small `k` of a large `n`: the indices whose key is at least a threshold taken from an
/// even sample of the keys, when at least `k` of them pass (so they hold the top `k`: the
/// `k`-th largest key is at least the threshold, and ties at it all pass); `None` otherwise.
fn prefilter(n: usize, k: usize, key: &impl Fn(u32) -> f32) -> Option<Vec<u32>> {
    const SAMPLE: usize = 1024;
    if n < 8 * SAMPLE || k * 16 > n {
        return None;
    }
    let step = n / SAMPLE;
    let mut sample: Vec<f32> = (0..n).step_by(step).map(|i| key(i as u32)).collect();
    // About twice the share of `k` in the sample, so the threshold usually lets ~2k through.
    let rank = (2 * k * sample.len()).div_ceil(n) + 4;
    if rank >= sample.len() {
        return None;
    }
    let (_, &mut threshold, _) = sample.select_nth_unstable_by(rank, |a, b| b.total_cmp(a));
    let passed: Vec<u32> = (0..n as u32).filter(|&i| key(i) >= threshold).collect();
    (passed.len() >= k).then_some(passed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn case_variants_merge_into_first_seen_form() {
        let list = WordList::parse("the\t0.5\nThe\t0.25\nTHE\t0.125\nParis\t0.1\nparis\t0.1\n")
            .expect("parses");
        // "paris".capitalize() == "Paris" was seen first, so "paris" merges into it.
        assert_eq!(list.words, vec!["the", "Paris"]);
        assert!((list.freqs[0] - 0.875).abs() < 1e-12);
        assert!((list.freqs[1] - 0.2).abs() < 1e-12);
    }

    #[test]
    fn mixed_case_word_seen_first_does_not_absorb_lower_case() {
        // "iPhone" first: "iphone"'s variants are iphone/IPHONE/Iphone, none of which was seen.
        let list = WordList::parse("iPhone\t1\niphone\t1\n").expect("parses");
        assert_eq!(list.words, vec!["iPhone", "iphone"]);
    }

    #[test]
    fn bad_frequency_names_the_line() {
        let err = WordList::parse("a\t1\n\nb\tx\n").expect_err("bad line");
        assert_eq!(err.0, 3);
        assert!(WordList::parse("\n\n").is_err());
    }

    #[test]
    fn top_k_of_a_large_vector_equals_a_full_sort() {
        use rand::{Rng as _, SeedableRng as _};
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        // Rounded values (many ties), a NaN, and a sorted run (a sample that misleads).
        let mut v: Vec<f32> = (0..50_000)
            .map(|_| (rng.random::<f32>() * 300.0).round())
            .collect();
        v[17] = f32::NAN;
        for (i, x) in v[40_000..].iter_mut().enumerate() {
            *x = 1000.0 + i as f32;
        }
        for k in [1, 5, 500, 3000] {
            let mut all: Vec<u32> = (0..v.len() as u32).collect();
            let key = |i: u32| {
                if v[i as usize].is_nan() {
                    f32::NEG_INFINITY
                } else {
                    v[i as usize]
                }
            };
            all.sort_by(|a, b| key(*b).total_cmp(&key(*a)).then(a.cmp(b)));
            all.truncate(k);
            assert_eq!(top_k_indices(v.len(), k, |i| v[i]), all, "k = {k}");
        }
        let flat = vec![1f32; 20_000];
        assert_eq!(top_k_indices(flat.len(), 3, |i| flat[i]), vec![0, 1, 2]);
    }

    #[test]
    fn top_k_orders_by_value_then_index() {
        let v = [0.5f32, 2.0, f32::NAN, 2.0, -1.0];
        assert_eq!(top_k_indices(v.len(), 3, |i| v[i]), vec![1, 3, 0]);
        assert_eq!(top_k_indices(v.len(), 9, |i| v[i]).len(), 5);
        assert!(top_k_indices(0, 3, |_| 0.0).is_empty());
    }

    #[test]
    fn normalized_keeps_zero_rows() {
        let rows = Rows {
            n: 2,
            dim: 2,
            data: vec![3.0, 4.0, 0.0, 0.0],
        }
        .normalized();
        assert_eq!(rows.data, vec![0.6, 0.8, 0.0, 0.0]);
    }

    #[test]
    fn mean_rows_average_sub_tokens() -> Result<()> {
        let m = Tensor::from_slice(&[1f32, 0.0, 0.0, 1.0, 2.0, 2.0], (3, 2), &Device::Cpu)?;
        let m = Weight::Dense(m);
        let rows = mean_token_rows(&m, &[vec![0, 1], vec![], vec![2]])?;
        assert_eq!(rows.data, vec![0.5, 0.5, 0.0, 0.0, 2.0, 2.0]);
        assert!(mean_token_rows(&m, &[vec![3]]).is_err());
        Ok(())
    }
}
