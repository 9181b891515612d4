//! In-context-learning task data for the instruction-vector analysis (METHODS.md §4.1): the
//! task format (a JSON list of `{"input", "output"}`, Todd et al.'s function-vector files),
//! sklearn's `train_test_split` reproduced exactly (numpy's legacy MT19937 permutation), the
//! prompt templates, and the first answer token `y*` in context.

use rand::seq::SliceRandom as _;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::Tokenizer;

/// One example of a task.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IclPair {
    /// The input (a word, a sentence, an NI "Definition … Input …" text).
    pub input: String,
    /// The expected output.
    pub output: String,
}

/// Parses a task file's text: a JSON list of objects with string `input` and `output` (numbers
/// are taken as their text). Errors name the item index (0-based) or the JSON line.
pub fn parse_task(text: &str) -> std::result::Result<Vec<IclPair>, String> {
    let value: serde_json::Value = serde_json::from_str(text).map_err(|e| {
        format!(
            "{} (line {}, column {})",
            crate::error::json_message(&e),
            e.line(),
            e.column()
        )
    })?;
    let serde_json::Value::Array(items) = value else {
        return Err("expected a JSON list of {\"input\", \"output\"} objects".to_owned());
    };
    if items.is_empty() {
        return Err("the task has no examples".to_owned());
    }
    let field =
        |item: &serde_json::Value, i: usize, name: &str| -> std::result::Result<String, String> {
            match item.get(name) {
                Some(serde_json::Value::String(s)) => Ok(s.clone()),
                Some(serde_json::Value::Number(n)) => Ok(n.to_string()),
                Some(serde_json::Value::Bool(b)) => Ok(b.to_string()),
                Some(_) => Err(format!("item {i}: `{name}` is not a string")),
                None if item.is_object() => Err(format!("item {i}: missing field `{name}`")),
                None => Err(format!("item {i}: not an object")),
            }
        };
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            Ok(IclPair {
                input: field(item, i, "input")?,
                output: field(item, i, "output")?,
            })
        })
        .collect()
}

/// numpy's legacy `RandomState` generator (MT19937 with `init_genrand` seeding), enough of it to
/// reproduce `RandomState(seed).permutation(n)` and so sklearn's `train_test_split`.
#[derive(Clone, Debug)]
pub struct Mt19937 {
    state: Box<[u32; 624]>,
    index: usize,
}

impl Mt19937 {
    /// Seeded as `numpy.random.RandomState(seed)` (an integer seed below 2³²).
    pub fn new(seed: u32) -> Self {
        let mut state = Box::new([0u32; 624]);
        state[0] = seed;
        for i in 1..624 {
            let prev = state[i - 1];
            state[i] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(i as u32);
        }
        Self { state, index: 624 }
    }

    fn twist(&mut self) {
        for i in 0..624 {
            let y = (self.state[i] & 0x8000_0000) | (self.state[(i + 1) % 624] & 0x7fff_ffff);
            let mut v = self.state[(i + 397) % 624] ^ (y >> 1);
            if y & 1 != 0 {
                v ^= 0x9908_b0df;
            }
            self.state[i] = v;
        }
        self.index = 0;
    }

    /// The next 32-bit output.
    pub fn next_u32(&mut self) -> u32 {
        if self.index >= 624 {
            self.twist();
        }
        let mut y = self.state[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^= y >> 18;
        y
    }

    /// A uniform integer in `0..=max` by masked rejection (numpy's legacy `random_interval`).
    fn interval(&mut self, max: u32) -> u32 {
        if max == 0 {
            return 0;
        }
        let mut mask = max;
        mask |= mask >> 1;
        mask |= mask >> 2;
        mask |= mask >> 4;
        mask |= mask >> 8;
        mask |= mask >> 16;
        loop {
            let value = self.next_u32() & mask;
            if value <= max {
                return value;
            }
        }
    }

    /// Seeded as Python's `random.seed(seed)` for an integer seed below 2³²
    /// (`init_by_array([seed])`), so [`Mt19937::python_shuffle`] draws what `random.shuffle`
    /// draws.
    pub fn python_seeded(seed: u32) -> Self {
        const N: usize = 624;
        let mut mt = Self::new(19_650_218);
        let s = &mut mt.state;
        let (mut i, mut j) = (1usize, 0usize);
        for _ in 0..N {
            let prev = s[i - 1];
            s[i] = (s[i] ^ (prev ^ (prev >> 30)).wrapping_mul(1_664_525))
                .wrapping_add(seed)
                .wrapping_add(j as u32);
            i += 1;
            // One key word: j stays 0.
            j = 0;
            if i >= N {
                s[0] = s[N - 1];
                i = 1;
            }
        }
        for _ in 0..N - 1 {
            let prev = s[i - 1];
            s[i] =
                (s[i] ^ (prev ^ (prev >> 30)).wrapping_mul(1_566_083_941)).wrapping_sub(i as u32);
            i += 1;
            if i >= N {
                s[0] = s[N - 1];
                i = 1;
            }
        }
        s[0] = 0x8000_0000;
        mt.index = N;
        mt
    }

    /// Python's `random.shuffle(list(range(n)))`: from the back, `j = randbelow(i + 1)` by
    /// rejection of `getrandbits(k)` draws (`k` the bit length of `i + 1`).
    pub fn python_shuffle(&mut self, n: usize) -> Vec<usize> {
        let mut values: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            let bound = (i + 1) as u32;
            let bits = 32 - bound.leading_zeros();
            let j = loop {
                let r = self.next_u32() >> (32 - bits);
                if r < bound {
                    break r;
                }
            };
            values.swap(i, j as usize);
        }
        values
    }

    /// `RandomState.permutation(n)`: a Fisher–Yates shuffle of `0..n` from the back.
    pub fn permutation(&mut self, n: usize) -> Vec<usize> {
        let mut values: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            let j = self.interval(i as u32) as usize;
            values.swap(i, j);
        }
        values
    }
}

/// sklearn's `train_test_split(items, test_size, random_state=seed)` (shuffled): returns
/// `(train, test)` in the order sklearn returns their rows.
pub fn train_test_split<T: Clone>(items: &[T], test_size: f64, seed: u32) -> (Vec<T>, Vec<T>) {
    let n = items.len();
    // sklearn: n_test = ceil(test_size * n), n_train = n - n_test (in f64, as Python computes it).
    let n_test = ((test_size * n as f64).ceil() as usize).min(n);
    let perm = Mt19937::new(seed).permutation(n);
    let test = perm[..n_test].iter().map(|&i| items[i].clone()).collect();
    let train = perm[n_test..].iter().map(|&i| items[i].clone()).collect();
    (train, test)
}

/// How a task is split into train (demonstrations), valid (queries for the head search) and test
/// (evaluation) sets.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct SplitConfig {
    /// Fraction of all items held out from train (Todd 0.3).
    pub held_out: f64,
    /// Fraction of the held-out items that become valid; the rest is test (Todd 0.3,
    /// FvForgetting 0.5).
    pub valid: f64,
    /// `random_state` of both splits (Todd 42, FvForgetting 43).
    pub seed: u32,
}

impl Default for SplitConfig {
    fn default() -> Self {
        Self {
            held_out: 0.3,
            valid: 0.3,
            seed: 42,
        }
    }
}

/// A task split into its three sets.
#[derive(Clone, Debug, PartialEq)]
pub struct TaskSplit {
    /// Demonstrations.
    pub train: Vec<IclPair>,
    /// Queries of the filter set and the head search.
    pub valid: Vec<IclPair>,
    /// Evaluation queries.
    pub test: Vec<IclPair>,
}

/// `split_icl_dataset`: `train, rest = split(all, held_out)`, then `test, valid = split(rest, valid)`.
pub fn split_task(items: &[IclPair], cfg: &SplitConfig) -> TaskSplit {
    let (train, rest) = train_test_split(items, cfg.held_out, cfg.seed);
    let (test, valid) = train_test_split(&rest, cfg.valid, cfg.seed);
    TaskSplit { train, valid, test }
}

/// The prompt layout of demonstrations and the query.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Template {
    /// Todd's default: `"Q: x\nA: y\n\n"` per demonstration, the query `"Q: x\nA:"`, target `" y"`.
    #[default]
    Qa,
    /// FvForgetting's `N` prefixes and separators: the raw input, then `" y\n\n"`; the query is the
    /// raw input, the target `" y"` (no space before inputs).
    Raw,
}

impl Template {
    fn parts(self) -> (&'static str, &'static str, &'static str, &'static str, bool) {
        // (input prefix, input separator, output prefix, output separator, space before inputs)
        match self {
            Self::Qa => ("Q:", "\n", "A:", "\n\n", true),
            Self::Raw => ("", "", "", "\n\n", false),
        }
    }

    /// The prompt of `demos` followed by the query, and the target string (`" " + output`).
    pub fn prompt(self, demos: &[IclPair], query: &IclPair) -> (String, String) {
        let (in_prefix, in_sep, out_prefix, out_sep, space_in) = self.parts();
        let space = if space_in { " " } else { "" };
        let mut text = String::new();
        for d in demos {
            text.push_str(in_prefix);
            text.push_str(space);
            text.push_str(&d.input);
            text.push_str(in_sep);
            text.push_str(out_prefix);
            text.push(' ');
            text.push_str(&d.output);
            text.push_str(out_sep);
        }
        text.push_str(in_prefix);
        text.push_str(space);
        text.push_str(&query.input);
        text.push_str(in_sep);
        text.push_str(out_prefix);
        (text, format!(" {}", query.output))
    }
}

/// A tokenized prompt and its target tokens in context.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PromptIds {
    /// The prompt's ids (the tokenizer's BOS included when it adds one).
    pub ids: Vec<u32>,
    /// `tokens(prompt + target)[len(tokens(prompt)):]`; `target[0]` is `y*`.
    pub target: Vec<u32>,
}

/// Tokenizes a prompt and its target as METHODS.md §0.2 says: the answer tokens are those that
/// `prompt + target` adds to `prompt`. Fails when the target adds no token, or the prompt's
/// tokens are not a prefix of the joint tokens (the first token would straddle the join).
pub fn encode_prompt(tokenizer: &Tokenizer, prompt: &str, target: &str) -> Result<PromptIds> {
    let ids = tokenizer.encode(prompt, true)?;
    let joint = tokenizer.encode(&format!("{prompt}{target}"), true)?;
    if joint.len() <= ids.len() {
        return Err(Error::invalid(
            "target",
            format!("`{}` adds no token to its prompt", target.trim()),
        ));
    }
    // Todd's get_answer_id slices without checking the prefix; a merge across the join would
    // give a wrong y*, so say so instead.
    if joint[..ids.len()] != ids[..] {
        return Err(Error::invalid(
            "target",
            format!("`{}` merges with the end of its prompt", target.trim()),
        ));
    }
    Ok(PromptIds {
        target: joint[ids.len()..].to_vec(),
        ids,
    })
}

/// Picks `k` distinct indices of `0..n` (without replacement) with `rng`.
pub fn sample_indices(rng: &mut rand::rngs::StdRng, n: usize, k: usize) -> Vec<usize> {
    let mut all: Vec<usize> = (0..n).collect();
    let (picked, _) = all.partial_shuffle(rng, k.min(n));
    picked.to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numpy_permutation_matches() {
        // numpy.random.RandomState(42).permutation(10).
        assert_eq!(
            Mt19937::new(42).permutation(10),
            vec![8, 1, 5, 0, 7, 2, 9, 4, 3, 6]
        );
        // RandomState(42).permutation(197)[:8] and RandomState(43).permutation(2398)[:8].
        assert_eq!(
            Mt19937::new(42).permutation(197)[..8],
            [140, 113, 16, 75, 155, 186, 69, 55]
        );
        assert_eq!(
            Mt19937::new(43).permutation(2398)[..8],
            [806, 125, 716, 678, 1247, 2031, 1488, 1193]
        );
        // The first output of MT19937 seeded with 5489 (the reference implementation's default).
        assert_eq!(Mt19937::new(5489).next_u32(), 3_499_211_612);
    }

    #[test]
    fn split_sizes_follow_sklearn() {
        let items: Vec<IclPair> = (0..100)
            .map(|i| IclPair {
                input: i.to_string(),
                output: i.to_string(),
            })
            .collect();
        let split = split_task(&items, &SplitConfig::default());
        // 30 held out (ceil 0.3·100); of them ceil(0.3·30) = 9 valid, 21 test.
        assert_eq!(
            (split.train.len(), split.test.len(), split.valid.len()),
            (70, 21, 9)
        );
        let mut all: Vec<String> = split
            .train
            .iter()
            .chain(&split.test)
            .chain(&split.valid)
            .map(|p| p.input.clone())
            .collect();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 100);
    }

    #[test]
    fn task_errors_name_the_item() {
        assert!(parse_task("{}").unwrap_err().contains("JSON list"));
        assert!(parse_task("[]").unwrap_err().contains("no examples"));
        let err = parse_task(r#"[{"input":"a","output":"b"},{"input":"c"}]"#).unwrap_err();
        assert_eq!(err, "item 1: missing field `output`");
        let ok = parse_task(r#"[{"input":"a","output":3}]"#).unwrap();
        assert_eq!(ok[0].output, "3");
    }

    #[test]
    fn templates_render_as_todd() {
        let demos = [IclPair {
            input: "hot".into(),
            output: "cold".into(),
        }];
        let query = IclPair {
            input: "up".into(),
            output: "down".into(),
        };
        let (p, t) = Template::Qa.prompt(&demos, &query);
        assert_eq!(p, "Q: hot\nA: cold\n\nQ: up\nA:");
        assert_eq!(t, " down");
        let (p, _) = Template::Raw.prompt(&demos, &query);
        assert_eq!(p, "hot cold\n\nup");
        let (p, _) = Template::Qa.prompt(&[], &query);
        assert_eq!(p, "Q: up\nA:");
    }
}
