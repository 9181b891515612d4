//! Reading the word files of the weight-space analyses: word lists (`word<TAB>freq`, the shipped
//! default or the user's own, e.g. the paper's `SingleShareGPT_Vocab.tsv`) and word-vector tables
//! in GloVe's text format (`word v1 v2 ...`).

use std::collections::HashMap;
use std::io::BufRead;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::analysis::head_pairs::SemanticSource;
use crate::analysis::words::{Rows, WordList};
use crate::error::{Error, Result};

/// The shipped default word list: the 30,000 most frequent English words of wordfreq (see
/// `assets/wordlists/README.md`; the paper's list is GPL data and is not shipped).
pub const DEFAULT_WORD_LIST: &str = include_str!("../assets/wordlists/english_words.tsv");

/// Which word list an analysis uses.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum WordSource {
    /// The shipped list.
    #[default]
    Builtin,
    /// A `word<TAB>freq` file.
    File(PathBuf),
}

impl WordSource {
    /// Short label for tables and figures.
    pub fn label(&self) -> String {
        match self {
            Self::Builtin => "built-in English word list".to_owned(),
            Self::File(path) => path.file_name().map_or_else(
                || path.display().to_string(),
                |n| n.to_string_lossy().into_owned(),
            ),
        }
    }

    /// Loads the list.
    pub fn load(&self) -> Result<WordList> {
        match self {
            Self::Builtin => WordList::parse(DEFAULT_WORD_LIST).map_err(|(line, msg)| {
                Error::invalid("built-in word list", format!("line {line}: {msg}"))
            }),
            Self::File(path) => load_word_list(path),
        }
    }
}

/// Reads a `word<TAB>freq` file; errors name the file and line.
pub fn load_word_list(path: &Path) -> Result<WordList> {
    let text = read_text(path)?;
    WordList::parse(&text).map_err(|(line, msg)| {
        if line == 0 {
            Error::bad_file(path, format!("word list: {msg}"))
        } else {
            Error::bad_file(path, format!("word list line {line}: {msg}"))
        }
    })
}

fn read_text(path: &Path) -> Result<String> {
    if !path.exists() {
        return Err(Error::NotFound {
            path: path.to_path_buf(),
        });
    }
    let bytes = std::fs::read(path).map_err(|err| Error::bad_file(path, err))?;
    String::from_utf8(bytes).map_err(|_| Error::bad_file(path, "not UTF-8 text"))
}

/// Reads the vectors of `words` from a GloVe-format table (`word v1 ... vD` per line; a
/// word2vec header line `N D` is skipped; words may contain spaces, the last `D` fields are the
/// vector). Words missing from the table get the zero vector (§3.1). `cancelled` is polled
/// every 64k lines: an 840B-word table has 2.2M lines.
pub fn load_word_vectors(
    path: &Path,
    words: &WordList,
    cancelled: &dyn Fn() -> bool,
) -> Result<(Rows, SemanticSource)> {
    if !path.exists() {
        return Err(Error::NotFound {
            path: path.to_path_buf(),
        });
    }
    let file = std::fs::File::open(path).map_err(|err| Error::bad_file(path, err))?;
    let reader = std::io::BufReader::with_capacity(1 << 20, file);
    let index: HashMap<&str, usize> = words
        .words
        .iter()
        .enumerate()
        .map(|(i, w)| (w.as_str(), i))
        .collect();
    let mut dim = 0usize;
    let mut data: Vec<f32> = Vec::new();
    let mut found = vec![false; words.len()];
    for (n, line) in reader.lines().enumerate() {
        if n % 65_536 == 0 && cancelled() {
            return Err(Error::Cancelled);
        }
        let line = line.map_err(|err| Error::bad_file(path, format!("line {}: {err}", n + 1)))?;
        let line = line.trim_end();
        if line.is_empty() {
            continue;
        }
        if dim == 0 {
            let fields: Vec<&str> = line.split(' ').collect();
            let is_header = fields.len() == 2 && fields.iter().all(|f| f.parse::<u64>().is_ok());
            if is_header {
                continue;
            }
            dim = fields.len().saturating_sub(1);
            if dim == 0 {
                return Err(Error::bad_file(
                    path,
                    format!("word vectors line {}: no values", n + 1),
                ));
            }
            data = vec![0f32; words.len() * dim];
        }
        // The word is everything before the last `dim` fields.
        let mut cut = line.len();
        for _ in 0..dim {
            match line[..cut].rfind(' ') {
                Some(at) => cut = at,
                None => {
                    return Err(Error::bad_file(
                        path,
                        format!("word vectors line {}: expected {dim} values", n + 1),
                    ))
                }
            }
        }
        let word = &line[..cut];
        let Some(&i) = index.get(word) else {
            continue;
        };
        if found[i] {
            continue; // first occurrence wins
        }
        let row = &mut data[i * dim..(i + 1) * dim];
        for (slot, field) in row.iter_mut().zip(line[cut + 1..].split(' ')) {
            *slot = field.parse().map_err(|_| {
                Error::bad_file(
                    path,
                    format!("word vectors line {}: `{field}` is not a number", n + 1),
                )
            })?;
        }
        found[i] = true;
    }
    if dim == 0 {
        return Err(Error::bad_file(path, "word vectors: the file is empty"));
    }
    let n_found = found.iter().filter(|&&f| f).count();
    if n_found == 0 {
        return Err(Error::bad_file(
            path,
            "word vectors: none of the list's words are in the table",
        ));
    }
    let name = path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    Ok((
        Rows {
            n: words.len(),
            dim,
            data,
        },
        SemanticSource::WordVectors {
            name,
            dim,
            found: n_found,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_list_loads() -> Result<()> {
        let list = WordSource::Builtin.load()?;
        assert!(list.len() > 20_000, "{}", list.len());
        assert!(list.words.iter().take(20).any(|w| w == "the"));
        Ok(())
    }

    #[test]
    fn bad_word_list_names_file_and_line() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("words.tsv");
        std::fs::write(&path, "a\t1\nb\tnope\n")?;
        let err = load_word_list(&path).expect_err("bad").to_string();
        assert!(err.contains("line 2") && err.contains("words.tsv"), "{err}");
        let missing = load_word_list(&dir.path().join("none.tsv")).expect_err("missing");
        assert!(matches!(missing, Error::NotFound { .. }));
        Ok(())
    }

    #[test]
    fn glove_table_reads_listed_words() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("vec.txt");
        std::fs::write(&path, "3 2\ncat 1 0\n. . . 5 5\ndog 0.5 0.25\ncat 9 9\n")?;
        let words = WordList::parse("dog\t1\ncat\t1\nbird\t1\n. . .\t1\n")
            .map_err(|(_, m)| Error::invalid("w", m))?;
        let (rows, source) = load_word_vectors(&path, &words, &|| false)?;
        assert_eq!(rows.dim, 2);
        assert_eq!(rows.data, vec![0.5, 0.25, 1.0, 0.0, 0.0, 0.0, 5.0, 5.0]);
        assert!(matches!(
            source,
            SemanticSource::WordVectors { found: 3, .. }
        ));
        std::fs::write(&path, "cat 1 x\n")?;
        let err = load_word_vectors(&path, &words, &|| false)
            .expect_err("bad")
            .to_string();
        assert!(err.contains("line 1") && err.contains("vec.txt"), "{err}");
        std::fs::write(&path, "")?;
        assert!(load_word_vectors(&path, &words, &|| false).is_err());
        Ok(())
    }
}
