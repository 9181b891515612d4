//! The sample prompt sets in `sample_prompts/` (embedded at build time): one file per category,
//! a `# description` first line, prompts separated by lines holding only `---`.

/// One category of sample prompts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SampleSet {
    /// Category name (the file name without extension, e.g. `open_qa`).
    pub name: &'static str,
    /// One-line description from the file's first line.
    pub description: String,
    /// The prompts, in file order.
    pub prompts: Vec<String>,
}

const FILES: [(&str, &str); 6] = [
    ("writing", include_str!("../sample_prompts/writing.txt")),
    ("coding", include_str!("../sample_prompts/coding.txt")),
    ("math", include_str!("../sample_prompts/math.txt")),
    (
        "extraction",
        include_str!("../sample_prompts/extraction.txt"),
    ),
    (
        "classification",
        include_str!("../sample_prompts/classification.txt"),
    ),
    ("open_qa", include_str!("../sample_prompts/open_qa.txt")),
];

/// Parses one prompt file: returns the description and the prompts.
pub fn parse(text: &str) -> (String, Vec<String>) {
    let mut lines = text.lines().peekable();
    let mut description = String::new();
    if let Some(first) = lines.peek() {
        if let Some(rest) = first.strip_prefix('#') {
            rest.trim().clone_into(&mut description);
            lines.next();
        }
    }
    let mut prompts = Vec::new();
    let mut current: Vec<&str> = Vec::new();
    for line in lines {
        if line.trim() == "---" {
            push_prompt(&mut prompts, &current);
            current.clear();
        } else {
            current.push(line);
        }
    }
    push_prompt(&mut prompts, &current);
    (description, prompts)
}

fn push_prompt(prompts: &mut Vec<String>, lines: &[&str]) {
    let prompt = lines.join("\n").trim().to_owned();
    if !prompt.is_empty() {
        prompts.push(prompt);
    }
}

/// The built-in sample sets, in a fixed order.
pub fn builtin() -> Vec<SampleSet> {
    FILES
        .iter()
        .map(|(name, text)| {
            let (description, prompts) = parse(text);
            SampleSet {
                name,
                description,
                prompts,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_multiline_prompts() {
        let (description, prompts) =
            parse("# Things\nfirst\n---\nsecond line one\nline two\n---\n\n");
        assert_eq!(description, "Things");
        assert_eq!(
            prompts,
            vec!["first".to_owned(), "second line one\nline two".to_owned()]
        );
    }

    #[test]
    fn builtin_sets_cover_the_categories() {
        let sets = builtin();
        assert_eq!(sets.len(), 6);
        let total: usize = sets.iter().map(|s| s.prompts.len()).sum();
        assert!(total >= 30, "{total} prompts");
        for set in &sets {
            assert!(set.prompts.len() >= 5, "{}", set.name);
            assert!(!set.description.is_empty(), "{}", set.name);
        }
    }
}
