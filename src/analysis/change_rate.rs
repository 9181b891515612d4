//! The "instruction verb" change rate of METHODS.md §3.5: do instruction verbs appear in more
//! heads' knowledge after tuning than general verbs do? Per layer group, the mean and std of each
//! word's change rate over instruction verbs and over general verbs, with a Welch t-test.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use crate::analysis::head_pairs::{HeadPairs, LayerHeads};
use crate::analysis::stats::{self, Summary, WelchTest};
use crate::error::{Error, Result};

/// The instruction verbs of §3.5 step 5: the union of the two lists, in first-seen order.
pub const INSTRUCTION_VERBS: &[&str] = &[
    "translate",
    "explain",
    "summarize",
    "retrieve",
    "revise",
    "generate",
    "describe",
    "classify",
    "create",
    "evaluate",
    "correct",
    "develop",
    "identify",
    "analyze",
    "compose",
    "demonstrate",
    "interpret",
    "design",
    "solve",
    "follow",
    "clarify",
    "say",
    "help",
    "act",
    "recommend",
    "estimate",
    "edit",
    "format",
    "repeat",
    "write",
    "give",
    "find",
    "make",
    "have",
    "tell",
    "output",
    "predict",
    "detect",
];

/// The general verbs of §3.5 step 6, generated once by `scripts/gen-wordlists` from WordNet 3.0
/// and wordfreq (one per line, `#` comments).
pub const GENERAL_VERBS_FILE: &str = include_str!("../../assets/wordlists/general_verbs.txt");

/// The shipped general verbs.
pub fn general_verbs() -> Vec<String> {
    parse_verb_list(GENERAL_VERBS_FILE)
}

/// One verb per line; blank lines and `#` comments skipped; lower-cased.
pub fn parse_verb_list(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_lowercase)
        .collect()
}

/// Head knowledge (§3.5 steps 1–3): per head, the word counts `c(w, head)` over the normalised
/// pairs (lower-cased, sorted) that occur in more than one of the head's dimensions.
pub fn head_word_counts(layer: &LayerHeads, words: &[String]) -> Vec<HashMap<String, usize>> {
    let word = |i: u32| {
        words
            .get(i as usize)
            .map_or_else(String::new, |w| w.to_lowercase())
    };
    let mut per_head: Vec<BTreeMap<(String, String), usize>> = vec![BTreeMap::new(); layer.heads];
    for dim in &layer.dims {
        let Some(pairs) = per_head.get_mut(dim.head) else {
            continue;
        };
        for p in &dim.pairs {
            let (a, b) = (word(p.key), word(p.query));
            let key = if a <= b { (a, b) } else { (b, a) };
            *pairs.entry(key).or_insert(0) += 1;
        }
    }
    per_head
        .into_iter()
        .map(|pairs| {
            let mut counts: HashMap<String, usize> = HashMap::new();
            for ((a, b), _) in pairs.into_iter().filter(|(_, n)| *n > 1) {
                *counts.entry(a).or_insert(0) += 1;
                *counts.entry(b).or_insert(0) += 1;
            }
            counts
        })
        .collect()
}

/// A word's change rate in one layer group.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WordRate {
    /// The verb.
    pub word: String,
    /// Fraction of the heads where its count changed in which it grew.
    pub rate: f64,
    /// Heads where its count changed.
    pub heads: usize,
}

/// §3.5 step 8 for one layer group.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GroupChange {
    /// Group index (`layer / group_size`).
    pub group: usize,
    /// First layer of the group.
    pub first_layer: usize,
    /// Last layer of the group.
    pub last_layer: usize,
    /// Rates of instruction verbs.
    pub instruction: Summary,
    /// Rates of general verbs.
    pub general: Summary,
    /// Welch t-test, instruction vs general (`None` with fewer than 2 words on a side).
    pub welch: Option<WelchTest>,
    /// Each instruction verb's rate.
    pub instruction_rates: Vec<WordRate>,
    /// Each general verb's rate.
    pub general_rates: Vec<WordRate>,
}

impl GroupChange {
    /// Why a side of the group has no rate or the group no t-test, in words for the table and
    /// the view; `None` when both sides have enough verbs for the test.
    pub fn note(&self) -> Option<String> {
        let layers = format!("layers {}-{}", self.first_layer, self.last_layer);
        let (ni, ng) = (self.instruction.n, self.general.n);
        if ni == 0 && ng == 0 {
            return Some(format!(
                "no listed verb's pair count differs between A and B in any head of {layers}: \
                 their head pairs are the same there (same weights, or an adapter that does not \
                 touch q_proj/k_proj)"
            ));
        }
        let side = |n: usize, what: &str| match n {
            0 => Some(format!("no {what} verb's count changed in {layers}")),
            1 => Some(format!("only one {what} verb's count changed in {layers}")),
            _ => None,
        };
        let parts: Vec<String> = [side(ni, "instruction"), side(ng, "general")]
            .into_iter()
            .flatten()
            .collect();
        if !parts.is_empty() {
            return Some(format!(
                "{}; the Welch test needs two on each side",
                parts.join(", ")
            ));
        }
        self.welch
            .is_none()
            .then(|| format!("every rate in {layers} is equal, so the t-test is undefined"))
    }
}

/// Head knowledge of a whole model: per layer, per head, the word counts of
/// [`head_word_counts`]. Built layer by layer while head pairs stream, so the pairs themselves
/// need not be kept.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Knowledge {
    /// `layers[l][h]`: word → number of kept pairs of head `h` containing it.
    pub layers: Vec<Vec<HashMap<String, usize>>>,
}

impl Knowledge {
    /// Adds the next layer.
    pub fn push_layer(&mut self, layer: &LayerHeads, words: &[String]) {
        self.layers.push(head_word_counts(layer, words));
    }

    /// The knowledge of a collected result.
    pub fn of(pairs: &HeadPairs) -> Self {
        let mut k = Self::default();
        for layer in &pairs.layers {
            k.push_layer(layer, &pairs.words);
        }
        k
    }
}

/// The change rates of `instruction` and `general` verbs from `base` to `tuned`, per group of
/// `group_size` layers (8 in the paper).
pub fn change_rates(
    base: &Knowledge,
    tuned: &Knowledge,
    instruction: &[String],
    general: &[String],
    group_size: usize,
) -> Result<Vec<GroupChange>> {
    if group_size == 0 {
        return Err(Error::invalid("layer group size", "must be at least 1"));
    }
    let heads = |k: &Knowledge| k.layers.first().map_or(0, Vec::len);
    if base.layers.len() != tuned.layers.len() || heads(base) != heads(tuned) {
        return Err(Error::invalid(
            "change rate",
            format!(
                "the models differ in shape ({} vs {} layers, {} vs {} heads)",
                base.layers.len(),
                tuned.layers.len(),
                heads(base),
                heads(tuned)
            ),
        ));
    }
    // Per group, per word: (grew, changed) over the group's heads.
    let mut groups: BTreeMap<usize, HashMap<&str, (usize, usize)>> = BTreeMap::new();
    let all_words: Vec<&str> = instruction
        .iter()
        .chain(general)
        .map(String::as_str)
        .collect();
    for (layer, (cb, ct)) in base.layers.iter().zip(&tuned.layers).enumerate() {
        let tally = groups.entry(layer / group_size).or_default();
        for (hb, ht) in cb.iter().zip(ct) {
            for &w in &all_words {
                let b = hb.get(w).copied().unwrap_or(0);
                let t = ht.get(w).copied().unwrap_or(0);
                if b != t {
                    let entry = tally.entry(w).or_insert((0, 0));
                    entry.1 += 1;
                    if t > b {
                        entry.0 += 1;
                    }
                }
            }
        }
    }
    let n_layers = base.layers.len();
    Ok(groups
        .into_iter()
        .map(|(group, tally)| {
            let rates = |list: &[String]| -> Vec<WordRate> {
                let mut seen = std::collections::HashSet::new();
                list.iter()
                    .filter(|w| seen.insert(w.as_str()))
                    .filter_map(|w| {
                        let &(grew, changed) = tally.get(w.as_str())?;
                        Some(WordRate {
                            word: w.clone(),
                            rate: grew as f64 / changed as f64,
                            heads: changed,
                        })
                    })
                    .collect()
            };
            let instruction_rates = rates(instruction);
            let general_rates = rates(general);
            let values = |r: &[WordRate]| r.iter().map(|w| w.rate).collect::<Vec<_>>();
            let (vi, vg) = (values(&instruction_rates), values(&general_rates));
            GroupChange {
                group,
                first_layer: group * group_size,
                last_layer: ((group + 1) * group_size).min(n_layers) - 1,
                instruction: stats::summarize(&vi),
                general: stats::summarize(&vg),
                welch: stats::welch_t_test(&vi, &vg),
                instruction_rates,
                general_rates,
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analysis::head_pairs::{DimPairs, HeadsConfig, SemanticSource, WordPair};

    fn words() -> Vec<String> {
        ["Write", "poem", "translate", "french", "run", "walk"]
            .map(String::from)
            .to_vec()
    }

    fn dim(head: usize, pairs: &[(u32, u32)]) -> DimPairs {
        DimPairs {
            head,
            dim: 0,
            rank: 1,
            energy: 1.0,
            pairs: pairs
                .iter()
                .map(|&(key, query)| WordPair {
                    key,
                    query,
                    sim: 0.9,
                })
                .collect(),
        }
    }

    fn result(layers: Vec<LayerHeads>) -> HeadPairs {
        HeadPairs {
            words: words(),
            heads: 2,
            head_dim: 2,
            config: HeadsConfig::default(),
            source: SemanticSource::ModelEmbeddings,
            layers,
        }
    }

    #[test]
    fn counts_need_two_dimensions_and_ignore_pair_order() {
        let layer = LayerHeads {
            layer: 0,
            heads: 2,
            dims: vec![
                dim(0, &[(0, 1), (2, 3)]),
                dim(0, &[(1, 0)]),
                dim(1, &[(4, 5)]),
            ],
        };
        let counts = head_word_counts(&layer, &words());
        // "poem=write" and "write=poem" are one pair seen twice; "translate=french" once.
        assert_eq!(counts[0].get("write"), Some(&1));
        assert_eq!(counts[0].get("poem"), Some(&1));
        assert_eq!(counts[0].get("translate"), None);
        assert!(counts[1].is_empty());
        // Swapping every pair's order changes nothing.
        let swapped = LayerHeads {
            dims: layer
                .dims
                .iter()
                .map(|d| DimPairs {
                    pairs: d
                        .pairs
                        .iter()
                        .map(|p| WordPair {
                            key: p.query,
                            query: p.key,
                            sim: p.sim,
                        })
                        .collect(),
                    ..d.clone()
                })
                .collect(),
            ..layer.clone()
        };
        assert_eq!(head_word_counts(&swapped, &words()), counts);
    }

    #[test]
    fn rates_count_heads_that_grew() -> Result<()> {
        let base = result(vec![LayerHeads {
            layer: 0,
            heads: 2,
            dims: vec![],
        }]);
        let tuned = result(vec![LayerHeads {
            layer: 0,
            heads: 2,
            dims: vec![
                dim(0, &[(0, 1)]),
                dim(0, &[(0, 1)]),
                dim(1, &[(4, 5)]),
                dim(1, &[(4, 5)]),
            ],
        }]);
        let instruction = vec!["write".to_owned(), "translate".to_owned()];
        let general = vec!["run".to_owned(), "walk".to_owned()];
        let (base, tuned) = (Knowledge::of(&base), Knowledge::of(&tuned));
        let groups = change_rates(&base, &tuned, &instruction, &general, 8)?;
        assert_eq!(groups.len(), 1);
        let g = &groups[0];
        // "write" grew in head 0; "translate" never changed, so it is dropped.
        assert_eq!(g.instruction_rates.len(), 1);
        assert!((g.instruction_rates[0].rate - 1.0).abs() < 1e-12);
        assert_eq!(g.general_rates.len(), 2);
        // Reversed, every rate is 0.
        let back = change_rates(&tuned, &base, &instruction, &general, 8)?;
        assert!(back[0].general_rates.iter().all(|r| r.rate == 0.0));
        // Identical models: nothing changed anywhere.
        let same = change_rates(&tuned, &tuned, &instruction, &general, 8)?;
        assert!(same[0].instruction_rates.is_empty() && same[0].general_rates.is_empty());
        // ... and the group says why it is empty instead of showing bare NaNs.
        let note = same[0].note().expect("an empty group has a note");
        assert!(note.contains("same"), "{note}");
        // One instruction verb changed: too few for the test, and the note says so.
        let one = g.note().expect("one instruction verb");
        assert!(one.contains("only one instruction verb"), "{one}");
        assert!(change_rates(&base, &tuned, &instruction, &general, 0).is_err());
        Ok(())
    }

    #[test]
    fn shipped_lists_are_disjoint() {
        let general = general_verbs();
        assert_eq!(general.len(), 3000);
        assert!(INSTRUCTION_VERBS
            .iter()
            .all(|v| !general.iter().any(|g| g == v)));
        let unique: std::collections::HashSet<_> = INSTRUCTION_VERBS.iter().collect();
        assert_eq!(unique.len(), INSTRUCTION_VERBS.len());
    }
}
