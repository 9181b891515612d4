//! The weight-space analyses (METHODS.md §2, §3) as the worker and the CLI run them: word files
//! read, results looked up in or written to the cache, A and B compared.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::analysis::change_rate::{self, Knowledge, INSTRUCTION_VERBS};
use crate::analysis::ffn_concepts::{self, Concepts, ConceptsConfig, LayerConcepts};
use crate::analysis::head_pairs::{self, HeadPairs, HeadsConfig, LayerHeads, SemanticSpace};
pub use crate::analysis::results::{ConceptsOutput, HeadsOutput, Slot, SlotConcepts, SlotHeads};
use crate::analysis::words::{self, WordList};
use crate::cache::{self, KeyBuilder};
use crate::error::{Error, Result};
use crate::model::LoadedModel;
use crate::wordfiles::{self, WordSource};

/// Bumped whenever a cached format or an algorithm changes.
const CACHE_VERSION: &str = "v2"; // v2: keys cover adapters (v1 gave base + adapter the base's entry)

/// Where cache entries go, if anywhere.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CachePolicy {
    /// The user cache folder ([`cache::cache_dir`]).
    User,
    /// A given folder.
    Dir(PathBuf),
    /// No cache.
    Off,
}

impl CachePolicy {
    fn dir(&self) -> Option<PathBuf> {
        match self {
            Self::User => cache::cache_dir(),
            Self::Dir(dir) => Some(dir.clone()),
            Self::Off => None,
        }
    }
}

fn words_key(key: &mut KeyBuilder, words: &WordList, token_ids: &[Vec<u32>]) {
    key.bytes(&(words.len() as u64).to_le_bytes());
    for (w, ids) in words.words.iter().zip(token_ids) {
        key.text(w);
        for id in ids {
            key.bytes(&id.to_le_bytes());
        }
    }
}

/// §2 for one model, from the cache when its weights, word list and settings are unchanged.
pub fn concepts_cached(
    loaded: &LoadedModel,
    words: &WordList,
    cfg: &ConceptsConfig,
    policy: &CachePolicy,
    progress: &mut dyn FnMut(f32, &LayerConcepts) -> ControlFlow<()>,
) -> Result<(Concepts, bool)> {
    let dir = policy.dir();
    let key = match &dir {
        Some(_) => {
            let ids = words::word_token_ids(&loaded.tokenizer, &words.words)?;
            let mut key = KeyBuilder::default();
            key.text("concepts")
                .text(CACHE_VERSION)
                .text(&format!("{cfg:?}"));
            words_key(&mut key, words, &ids);
            key.linear(&loaded.model.lm_head)?;
            for layer in &loaded.model.layers {
                key.linear(&layer.mlp.down_proj)?;
            }
            Some(key.finish())
        }
        None => None,
    };
    if let (Some(dir), Some(key)) = (&dir, &key) {
        if let Some(hit) = read_concepts(dir, key) {
            let n = hit.layers.len().max(1);
            for (i, layer) in hit.layers.iter().enumerate() {
                if progress((i + 1) as f32 / n as f32, layer).is_break() {
                    return Err(Error::Cancelled);
                }
            }
            return Ok((hit, true));
        }
    }
    let result =
        ffn_concepts::ffn_concepts(&loaded.model, &loaded.tokenizer, words, cfg, progress)?;
    if let (Some(dir), Some(key)) = (&dir, &key) {
        if let Err(err) = write_concepts(dir, key, &result) {
            log::warn!("could not cache the concepts: {err}");
        }
    }
    Ok((result, false))
}

fn read_concepts(dir: &Path, key: &str) -> Option<Concepts> {
    let mut concepts: Concepts =
        cache::read_json(&cache::entry_path(dir, "concepts", key, "json"))?;
    let vectors = cache::read_f32s(&cache::entry_path(dir, "concepts", key, "f32"))?;
    let mut at = 0;
    for layer in &mut concepts.layers {
        let n = layer.components.len() * concepts.dim;
        layer.vectors = vectors.get(at..at + n)?.to_vec();
        at += n;
    }
    (at == vectors.len()).then_some(concepts)
}

fn write_concepts(dir: &Path, key: &str, concepts: &Concepts) -> Result<()> {
    let vectors: Vec<f32> = concepts
        .layers
        .iter()
        .flat_map(|l| l.vectors.iter().copied())
        .collect();
    cache::write_f32s(&cache::entry_path(dir, "concepts", key, "f32"), &vectors)?;
    cache::write_json(&cache::entry_path(dir, "concepts", key, "json"), concepts)
}

/// The semantic vectors of §3: a GloVe-format table when given (shared by both models),
/// else each model's own input embeddings (the labelled deviation).
#[derive(Clone, Debug)]
pub enum Semantic {
    /// Loaded from a table.
    Table(SemanticSpace, PathBuf),
    /// Per model.
    ModelEmbeddings,
}

impl Semantic {
    /// Loads a table, or chooses the fallback.
    pub fn load(
        path: Option<&Path>,
        words: &WordList,
        cfg: &HeadsConfig,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<Self> {
        match path {
            Some(path) => {
                let (rows, source) = wordfiles::load_word_vectors(path, words, cancelled)?;
                Ok(Self::Table(
                    head_pairs::semantic_space(rows, cfg, source)?,
                    path.to_path_buf(),
                ))
            }
            None => Ok(Self::ModelEmbeddings),
        }
    }
}

/// §3 for one model, from the cache when unchanged. Each computed layer goes to `sink` as it
/// finishes (for streaming writers); a cache hit sends every layer at once.
pub fn heads_cached(
    loaded: &LoadedModel,
    words: &WordList,
    semantic: &Semantic,
    cfg: &HeadsConfig,
    policy: &CachePolicy,
    sink: &mut dyn FnMut(f32, &LayerHeads) -> ControlFlow<()>,
) -> Result<(HeadPairs, bool)> {
    let dir = policy.dir();
    let key = match &dir {
        Some(_) => {
            let ids = words::word_token_ids(&loaded.tokenizer, &words.words)?;
            let mut key = KeyBuilder::default();
            key.text("heads")
                .text(CACHE_VERSION)
                .text(&format!("{cfg:?}"));
            words_key(&mut key, words, &ids);
            match semantic {
                Semantic::Table(space, path) => {
                    let meta = std::fs::metadata(path).ok();
                    let stamp = meta
                        .as_ref()
                        .and_then(|m| m.modified().ok())
                        .map(|t| format!("{t:?}"));
                    key.text(&path.display().to_string()).text(&format!(
                        "{:?}{stamp:?}{:?}",
                        meta.map(|m| m.len()),
                        space.source
                    ));
                }
                Semantic::ModelEmbeddings => {
                    key.text("model embeddings");
                }
            }
            key.weight(&loaded.model.embed_tokens)?;
            for layer in &loaded.model.layers {
                if let Some(norm) = &layer.input_layernorm {
                    key.tensor(&norm.weight)?;
                }
                key.linear(&layer.self_attn.q_proj)?;
                key.linear(&layer.self_attn.k_proj)?;
                for norm in [&layer.self_attn.q_norm, &layer.self_attn.k_norm]
                    .into_iter()
                    .flatten()
                {
                    key.tensor(&norm.weight)?;
                }
            }
            Some(key.finish())
        }
        None => None,
    };
    if let (Some(dir), Some(key)) = (&dir, &key) {
        if let Some(hit) =
            cache::read_json::<HeadPairs>(&cache::entry_path(dir, "heads", key, "json"))
        {
            let n = hit.layers.len().max(1);
            for (i, layer) in hit.layers.iter().enumerate() {
                if sink((i + 1) as f32 / n as f32, layer).is_break() {
                    return Err(Error::Cancelled);
                }
            }
            return Ok((hit, true));
        }
    }
    let own;
    let space = match semantic {
        Semantic::Table(space, _) => space,
        Semantic::ModelEmbeddings => {
            own = head_pairs::model_semantic_space(&loaded.model, &loaded.tokenizer, words, cfg)?;
            &own
        }
    };
    let result = head_pairs::head_pairs(&loaded.model, &loaded.tokenizer, words, space, cfg, sink)?;
    if let (Some(dir), Some(key)) = (&dir, &key) {
        if let Err(err) = cache::write_json(&cache::entry_path(dir, "heads", key, "json"), &result)
        {
            log::warn!("could not cache the head pairs: {err}");
        }
    }
    Ok((result, false))
}

/// Runs `compute` with a per-layer callback that first hands the layer to `sink` (a failing
/// sink stops the computation, and its error, not the resulting cancellation, is returned) and
/// then reports progress.
fn with_sink<L, T>(
    sink: &mut dyn FnMut(&L) -> Result<()>,
    progress: &mut dyn FnMut(f32, &L) -> ControlFlow<()>,
    compute: impl FnOnce(&mut dyn FnMut(f32, &L) -> ControlFlow<()>) -> Result<T>,
) -> Result<T> {
    let mut sink_err = None;
    let outcome = compute(&mut |frac, layer| {
        if let Err(err) = sink(layer) {
            sink_err = Some(err);
            return ControlFlow::Break(());
        }
        progress(frac, layer)
    });
    match (outcome, sink_err) {
        (Err(Error::Cancelled), Some(err)) => Err(err),
        (outcome, _) => outcome,
    }
}

/// Runs §2 on each model and aligns B to A.
/// `sink` sees every layer of every model as it finishes (slot index, layer).
pub fn run_concepts(
    models: &[(Slot, &LoadedModel)],
    source: &WordSource,
    cfg: &ConceptsConfig,
    policy: &CachePolicy,
    progress: &mut dyn FnMut(f32, String) -> ControlFlow<()>,
    sink: &mut dyn FnMut(usize, &LayerConcepts) -> Result<()>,
) -> Result<ConceptsOutput> {
    let words = source.load()?;
    let n = models.len().max(1) as f32;
    let mut results = Vec::with_capacity(models.len());
    for (i, &(slot, loaded)) in models.iter().enumerate() {
        let start = Instant::now();
        let name = loaded.info.display_name();
        // Before the first layer: the word vectors (and the cache lookup).
        if progress(i as f32 / n, format!("concepts of {name}: word vectors")).is_break() {
            return Err(Error::Cancelled);
        }
        let (concepts, cached) = with_sink(
            &mut |layer| sink(i, layer),
            &mut |frac, layer: &LayerConcepts| {
                progress(
                    (i as f32 + frac) / n,
                    format!("concepts of {name}: layer {}", layer.layer),
                )
            },
            |on_layer| concepts_cached(loaded, &words, cfg, policy, on_layer),
        )?;
        results.push(SlotConcepts {
            slot,
            model: name,
            parameters: loaded.info.parameters,
            concepts,
            cached,
            secs: start.elapsed().as_secs_f64(),
        });
    }
    let alignment = match results.as_slice() {
        [base, tuned] => Some(ffn_concepts::align(&base.concepts, &tuned.concepts)?),
        _ => None,
    };
    Ok(ConceptsOutput {
        words: source.label(),
        results,
        alignment,
    })
}

/// Runs §3 on each model and, with two, the §3.5 change rates from the first to the second.
/// `sink` sees every layer of every model as it finishes (slot index, layer).
#[allow(clippy::too_many_arguments)]
pub fn run_heads(
    models: &[(Slot, &LoadedModel)],
    source: &WordSource,
    vectors: Option<&Path>,
    cfg: &HeadsConfig,
    group_size: usize,
    policy: &CachePolicy,
    progress: &mut dyn FnMut(f32, String) -> ControlFlow<()>,
    sink: &mut dyn FnMut(usize, &LayerHeads) -> Result<()>,
) -> Result<HeadsOutput> {
    if group_size == 0 {
        return Err(Error::invalid("layer group size", "must be at least 1"));
    }
    let words = source.load()?;
    let semantic = Semantic::load(vectors, &words, cfg, &|| false)?;
    let n = models.len().max(1) as f32;
    let mut results = Vec::with_capacity(models.len());
    for (i, &(slot, loaded)) in models.iter().enumerate() {
        let start = Instant::now();
        let name = loaded.info.display_name();
        // Before the first layer: the semantic vectors and their thresholds (the longest
        // quiet phase on a large vocabulary) and the cache lookup.
        if progress(
            i as f32 / n,
            format!("head pairs of {name}: semantic thresholds"),
        )
        .is_break()
        {
            return Err(Error::Cancelled);
        }
        let (pairs, cached) = with_sink(
            &mut |layer| sink(i, layer),
            &mut |frac, layer: &LayerHeads| {
                progress(
                    (i as f32 + frac) / n,
                    format!("head pairs of {name}: layer {}", layer.layer),
                )
            },
            |on_layer| heads_cached(loaded, &words, &semantic, cfg, policy, on_layer),
        )?;
        results.push(SlotHeads {
            slot,
            model: name,
            parameters: loaded.info.parameters,
            pairs,
            cached,
            secs: start.elapsed().as_secs_f64(),
        });
    }
    let change = match results.as_slice() {
        [base, tuned] => {
            let instruction: Vec<String> =
                INSTRUCTION_VERBS.iter().map(|v| (*v).to_owned()).collect();
            Some(change_rate::change_rates(
                &Knowledge::of(&base.pairs),
                &Knowledge::of(&tuned.pairs),
                &instruction,
                &change_rate::general_verbs(),
                group_size,
            )?)
        }
        _ => None,
    };
    Ok(HeadsOutput {
        words: source.label(),
        results,
        change,
        group_size,
    })
}
