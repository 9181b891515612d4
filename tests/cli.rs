//! The command line on the tiny model written to disk: outputs, and one-line errors for bad input.

use tunelens::model::tiny::{tiny_config, write_tiny_hf_folder};

use crate::common::{assert_one_line_error, demo_model_path, run_cli, tiny_words};

fn tiny_folder(seed: u64) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    write_tiny_hf_folder(dir.path(), &tiny_config(), seed).expect("tiny folder written");
    let path = dir.path().display().to_string();
    (dir, path)
}

/// Rewrites the folder's `config.json` through `edit`.
fn edit_config(dir: &tempfile::TempDir, edit: impl FnOnce(String) -> String) {
    let config = dir.path().join("config.json");
    let text = std::fs::read_to_string(&config).expect("config");
    std::fs::write(&config, edit(text)).expect("write");
}

#[test]
fn info_tokenize_forward_generate_print_json() -> anyhow::Result<()> {
    let (_dir, path) = tiny_folder(1);
    let info = run_cli(&["info", "--model", &path, "--json"]);
    assert_eq!(info.code, 0, "{}", info.stderr);
    let info: serde_json::Value = serde_json::from_str(&info.stdout)?;
    assert_eq!(info["architecture"], "llama");
    assert_eq!(info["num_layers"], 3);

    let tok = run_cli(&[
        "tokenize",
        "--model",
        &path,
        "--text",
        "the cat sat",
        "--json",
    ]);
    assert_eq!(tok.code, 0, "{}", tok.stderr);
    let tok: serde_json::Value = serde_json::from_str(&tok.stdout)?;
    assert_eq!(tok["ids"], serde_json::json!([5, 7, 9]));
    assert_eq!(tok["tokens"], serde_json::json!(["the", "cat", "sat"]));

    let fwd = run_cli(&[
        "forward",
        "--model",
        &path,
        "--text",
        "the cat sat",
        "--top-k",
        "3",
        "--json",
    ]);
    assert_eq!(fwd.code, 0, "{}", fwd.stderr);
    let fwd: serde_json::Value = serde_json::from_str(&fwd.stdout)?;
    assert_eq!(fwd["logits_last"].as_array().map(Vec::len), Some(64));
    let top = fwd["top_k"].as_array().expect("top_k");
    assert_eq!(top.len(), 3);
    assert_eq!(top[0].as_array().map(Vec::len), Some(3));

    let gen = run_cli(&[
        "generate",
        "--model",
        &path,
        "--prompt",
        "write a poem",
        "--chat",
        "--max-new-tokens",
        "5",
        "--json",
    ]);
    assert_eq!(gen.code, 0, "{}", gen.stderr);
    let gen: serde_json::Value = serde_json::from_str(&gen.stdout)?;
    assert_eq!(
        gen["rendered_prompt"],
        "<|user|> write a poem <|assistant|>"
    );
    assert!(gen["new_ids"]
        .as_array()
        .is_some_and(|ids| !ids.is_empty() && ids.len() <= 5));
    Ok(())
}

#[test]
fn text_output_is_readable() {
    let (_dir, path) = tiny_folder(2);
    let info = run_cli(&["info", "--model", &path]);
    assert_eq!(info.code, 0, "{}", info.stderr);
    assert!(
        info.stdout.contains("architecture  llama"),
        "{}",
        info.stdout
    );
    let tok = run_cli(&["tokenize", "--model", &path, "--text", "the dog"]);
    assert_eq!(tok.stdout, "5\tthe\n8\tdog\n");
}

#[test]
fn missing_path_is_one_line() {
    let run = run_cli(&["info", "--model", "/nonexistent/model.gguf"]);
    assert_one_line_error(&run, "/nonexistent/model.gguf");
}

#[test]
fn missing_config_field_names_the_field_and_file() {
    let (dir, path) = tiny_folder(3);
    edit_config(&dir, |text| {
        let mut value: serde_json::Value = serde_json::from_str(&text).expect("json");
        value
            .as_object_mut()
            .expect("object")
            .remove("num_attention_heads");
        value.to_string()
    });
    let run = run_cli(&["info", "--model", &path]);
    assert_one_line_error(&run, "num_attention_heads");
    assert!(run.stderr.contains("config.json"), "{}", run.stderr);
}

#[test]
fn unsupported_architecture_is_named() {
    let (dir, path) = tiny_folder(4);
    edit_config(&dir, |text| {
        text.replace("LlamaForCausalLM", "BertForMaskedLM")
            .replace("\"llama\"", "\"bert\"")
    });
    assert_one_line_error(&run_cli(&["info", "--model", &path]), "BertForMaskedLM");
}

#[test]
fn missing_tokenizer_is_named() {
    let (dir, path) = tiny_folder(5);
    std::fs::remove_file(dir.path().join("tokenizer.json")).expect("remove");
    assert_one_line_error(&run_cli(&["info", "--model", &path]), "tokenizer.json");
}

#[test]
fn corrupt_and_truncated_safetensors_are_named() {
    let (dir, path) = tiny_folder(6);
    let weights = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&weights).expect("weights");
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).expect("truncate");
    assert_one_line_error(&run_cli(&["info", "--model", &path]), "model.safetensors");
    std::fs::write(&weights, b"this is not a safetensors file").expect("garbage");
    assert_one_line_error(&run_cli(&["info", "--model", &path]), "model.safetensors");
}

#[test]
fn mismatched_checkpoint_names_the_tensor() {
    let (dir, path) = tiny_folder(7);
    edit_config(&dir, |text| {
        text.replace("\"intermediate_size\":32", "\"intermediate_size\":48")
    });
    let run = run_cli(&["info", "--model", &path]);
    assert_one_line_error(&run, "mlp.gate_proj.weight");
    assert!(run.stderr.contains("mismatched"), "{}", run.stderr);
}

#[test]
fn empty_prompt_and_too_long_prompt_are_rejected() {
    let (_dir, path) = tiny_folder(8);
    assert_one_line_error(
        &run_cli(&["forward", "--model", &path, "--text", ""]),
        "empty",
    );
    assert_one_line_error(
        &run_cli(&["generate", "--model", &path, "--prompt", "   "]),
        "empty",
    );
    // The tiny model's context is 64 tokens.
    let long = vec!["cat"; 80].join(" ");
    assert_one_line_error(
        &run_cli(&["forward", "--model", &path, "--text", &long]),
        "context of 64",
    );
    assert_one_line_error(
        &run_cli(&["generate", "--model", &path, "--prompt", &long]),
        "context of 64",
    );
}

#[test]
fn corrupt_and_truncated_gguf_are_named() {
    let dir = tempfile::tempdir().expect("temp dir");
    let garbage = dir.path().join("garbage.gguf");
    std::fs::write(&garbage, b"GGUF but not really").expect("write");
    assert_one_line_error(
        &run_cli(&["info", "--model", &garbage.display().to_string()]),
        "garbage.gguf",
    );
    // A truncated copy of the demo model: header intact, tensor data cut short.
    let demo = std::fs::read(demo_model_path()).expect("demo model");
    let truncated = dir.path().join("truncated.gguf");
    std::fs::write(&truncated, &demo[..demo.len() / 3]).expect("write");
    let run = run_cli(&["info", "--model", &truncated.display().to_string()]);
    assert_one_line_error(&run, "truncated.gguf");
    assert!(run.stderr.contains("truncated"), "{}", run.stderr);
}

#[test]
fn cuda_without_the_feature_is_a_clear_error() {
    if cfg!(feature = "cuda") {
        return;
    }
    let (_dir, path) = tiny_folder(9);
    assert_one_line_error(
        &run_cli(&["info", "--model", &path, "--device", "cuda"]),
        "--features cuda",
    );
}

#[test]
fn attribute_prints_matrices_density_and_score() -> anyhow::Result<()> {
    let (_dir, path) = tiny_folder(10);
    let run = run_cli(&[
        "attribute",
        "--model",
        &path,
        "--prompt",
        "summarize the text in one sentence",
        "--response",
        "the cat sat on the mat",
        "--instruction",
        "summarize the text",
        "--json",
    ]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let out: serde_json::Value = serde_json::from_str(&run.stdout)?;
    let n_in = out["input_ids"].as_array().map_or(0, Vec::len);
    let n_out = out["output_ids"].as_array().map_or(0, Vec::len);
    assert_eq!((n_in, n_out), (6, 6));
    assert_eq!(out["raw"].as_array().map(Vec::len), Some(n_in));
    assert_eq!(out["quantized"][0].as_array().map(Vec::len), Some(n_out));
    assert_eq!(out["density"].as_array().map(Vec::len), Some(n_in));
    assert_eq!(
        out["instruction_mask"],
        serde_json::json!([true, true, true, false, false, false])
    );
    assert!(out["instruction_score"]
        .as_f64()
        .is_some_and(|s| (0.0..=3.0).contains(&s)));
    // Without a response, the model's own greedy response is explained.
    let run = run_cli(&[
        "attribute",
        "--model",
        &path,
        "--prompt",
        "write a poem",
        "--max-new-tokens",
        "4",
        "--json",
    ]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let out: serde_json::Value = serde_json::from_str(&run.stdout)?;
    // "write" is an instruction verb (METHODS.md §3.5): its sentence is marked automatically.
    assert_eq!(
        out["instruction_mask"],
        serde_json::json!([true, true, true])
    );
    assert!(out["instruction_score"].as_f64().is_some());
    assert!(out["response"].as_str().is_some_and(|r| !r.is_empty()));
    let run = run_cli(&[
        "attribute",
        "--model",
        &path,
        "--prompt",
        "write a poem",
        "--response",
        "the sea",
        "--no-instructions",
        "--json",
    ]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let out: serde_json::Value = serde_json::from_str(&run.stdout)?;
    assert!(out["instruction_score"].is_null() && out["instruction_mask"].is_null());
    Ok(())
}

#[test]
fn attribute_two_models_side_by_side_writes_figures_and_data() -> anyhow::Result<()> {
    let (_a, path_a) = tiny_folder(12);
    let (_b, path_b) = tiny_folder(13);
    let out_dir = tempfile::tempdir()?;
    let run = run_cli(&[
        "attribute",
        "--model",
        &path_a,
        "--model-b",
        &path_b,
        "--prompt",
        "summarize the text in one sentence",
        "--max-new-tokens",
        "5",
        "--out",
        &out_dir.path().display().to_string(),
        "--json",
    ]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let out: serde_json::Value = serde_json::from_str(&run.stdout)?;
    let results = out.as_array().expect("one result per model");
    assert_eq!(results.len(), 2);
    assert_eq!(
        (results[0]["slot"].as_str(), results[1]["slot"].as_str()),
        (Some("A"), Some("B"))
    );
    // Each model explains its own greedy response; different seeds give different weights.
    assert_ne!(results[0]["raw"], results[1]["raw"]);
    let mut names: Vec<String> = std::fs::read_dir(out_dir.path())?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_, _>>()?;
    names.sort();
    assert_eq!(names.len(), 5, "{names:?}");
    for ext in [".svg", ".png", ".csv", "_density.csv", ".json"] {
        let name = names
            .iter()
            .find(|n| n.ends_with(ext))
            .expect("file written");
        assert!(name.starts_with("attribution_"), "{name}");
        assert!(
            std::fs::metadata(out_dir.path().join(name))?.len() > 100,
            "{name}"
        );
    }
    Ok(())
}

#[test]
fn attribute_batch_writes_one_line_per_prompt_and_names_bad_lines() -> anyhow::Result<()> {
    let (dir, path) = tiny_folder(14);
    let prompts = dir.path().join("prompts.jsonl");
    std::fs::write(
        &prompts,
        concat!(
            "{\"prompt\": \"write a poem\", \"response\": \"the sea\", \"id\": \"p1\"}\n",
            "\n",
            "\"summarize the text\"\n",
            "{\"prompt\": \"tell me\", \"colour\": 3}\n",
            "not json\n",
        ),
    )?;
    let run = run_cli(&[
        "attribute",
        "--model",
        &path,
        "--prompts",
        &prompts.display().to_string(),
        "--max-new-tokens",
        "3",
    ]);
    assert_eq!(run.code, 2, "{}", run.stderr);
    let lines: Vec<serde_json::Value> = run
        .stdout
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    assert_eq!(lines.len(), 4, "{}", run.stdout);
    assert_eq!(lines[0]["id"], "p1");
    assert_eq!(lines[0]["line"], 1);
    assert!(lines[0]["instruction_score"][0].as_f64().is_some());
    assert_eq!(lines[1]["line"], 3);
    assert!(lines[1]["results"][0]["response"].as_str().is_some());
    assert!(lines[2]["error"]
        .as_str()
        .is_some_and(|e| e.contains("colour")));
    assert_eq!(lines[3]["line"], 5);
    assert!(
        run.stderr.contains("prompts.jsonl:5: not JSON"),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("4/4 prompts"), "{}", run.stderr);
    assert!(
        run.stderr.contains("2 of 4 prompts failed"),
        "{}",
        run.stderr
    );
    Ok(())
}

#[test]
fn attribute_rejects_a_span_not_in_the_prompt() {
    let (_dir, path) = tiny_folder(11);
    let run = run_cli(&[
        "attribute",
        "--model",
        &path,
        "--prompt",
        "write a poem",
        "--response",
        "the sea",
        "--instruction",
        "translate",
    ]);
    assert_one_line_error(&run, "\"translate\"");
}

/// The tiny vocabulary's words as a `word<TAB>freq` list.
fn tiny_word_list(dir: &std::path::Path) -> String {
    tiny_words(dir).display().to_string()
}

#[test]
fn concepts_stream_tsv_and_compare_two_models() -> anyhow::Result<()> {
    let (dir_a, a) = tiny_folder(1);
    let (_dir_b, b) = tiny_folder(2);
    let words = tiny_word_list(dir_a.path());
    let cache = tempfile::tempdir()?;
    let out = tempfile::tempdir()?;
    let run = |extra: &[&str]| {
        let mut args = vec!["concepts", "--model", &a, "--words", &words, "--top-k", "5"];
        args.extend_from_slice(extra);
        let mut cmd = crate::common::tunelens();
        cmd.args(&args).env("TUNELENS_CACHE_DIR", cache.path());
        cmd.output().expect("runs")
    };
    let single = run(&[]);
    assert!(
        single.status.success(),
        "{}",
        String::from_utf8_lossy(&single.stderr)
    );
    let stdout = String::from_utf8(single.stdout)?;
    let mut lines = stdout.lines();
    assert_eq!(
        lines.next(),
        Some("Model\tSize\tLayer\tModule\tHead\tRank\tScore\tTopK")
    );
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split('\t').collect()).collect();
    // 3 layers × d = 16 components.
    assert_eq!(rows.len(), 3 * 16);
    assert!(rows
        .iter()
        .all(|r| r.len() == 8 && r[3] == "FFN" && r[4] == "0"));
    assert_eq!(rows[0][7].split("|||").count(), 5);
    let ratio_sum: f64 = rows
        .iter()
        .filter(|r| r[2] == "0")
        .map(|r| r[6].parse::<f64>().unwrap())
        .sum();
    assert!((ratio_sum - 1.0).abs() < 1e-3, "{ratio_sum}");
    // Second run: from the cache, same rows.
    let again = run(&[]);
    assert!(String::from_utf8_lossy(&again.stderr).contains("(cached)"));
    assert_eq!(String::from_utf8(again.stdout)?, stdout);

    let pair = run(&["--model-b", &b, "--out", &out.path().display().to_string()]);
    assert!(
        pair.status.success(),
        "{}",
        String::from_utf8_lossy(&pair.stderr)
    );
    let names: Vec<String> = std::fs::read_dir(out.path())?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_, _>>()?;
    assert_eq!(
        names
            .iter()
            .filter(|n| n.starts_with("concepts_") && n.to_lowercase().ends_with(".tsv"))
            .count(),
        3,
        "{names:?}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("concepts.json"))?)?;
    assert_eq!(json["models"].as_array().map(Vec::len), Some(2));
    assert_eq!(json["alignment"].as_array().map(Vec::len), Some(3));
    assert!(json["alignment_note"]
        .as_str()
        .unwrap_or("")
        .contains("extension"));
    Ok(())
}

#[test]
fn heads_stream_tsv_and_change_rates() -> anyhow::Result<()> {
    let (dir_a, a) = tiny_folder(1);
    let (_dir_b, b) = tiny_folder(2);
    let words = tiny_word_list(dir_a.path());
    let mut cmd = crate::common::tunelens();
    cmd.args([
        "heads",
        "--model",
        &a,
        "--model-b",
        &b,
        "--words",
        &words,
        "--top-k",
        "6",
        "--threshold-words",
        "20",
        "--group-size",
        "2",
        "--no-cache",
    ]);
    let run = cmd.output()?;
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let stdout = String::from_utf8(run.stdout)?;
    let rows: Vec<Vec<&str>> = stdout
        .lines()
        .skip(1)
        .map(|l| l.split('\t').collect())
        .collect();
    // 2 models × 3 layers × 4 heads × head_dim 4.
    assert_eq!(rows.len(), 2 * 3 * 4 * 4);
    assert!(rows.iter().all(|r| r.len() == 9 && r[3] == "QK"));
    let stderr = String::from_utf8(run.stderr)?;
    assert!(stderr.contains("own input embeddings"), "{stderr}");
    assert!(stderr.contains("InstructionMean"), "{stderr}");

    let mut cmd = crate::common::tunelens();
    cmd.args([
        "heads",
        "--model",
        &a,
        "--words",
        &words,
        "--top-k",
        "6",
        "--no-cache",
        "--json",
    ]);
    let json_run = cmd.output()?;
    assert!(json_run.status.success());
    let json: serde_json::Value = serde_json::from_slice(&json_run.stdout)?;
    assert_eq!(
        json["models"][0]["layers"].as_array().map(Vec::len),
        Some(3)
    );
    Ok(())
}

#[test]
fn weight_views_name_bad_word_files() -> anyhow::Result<()> {
    let (dir, a) = tiny_folder(1);
    let bad = dir.path().join("bad.tsv");
    std::fs::write(&bad, "cat\t1\ndog\tmany\n")?;
    let run = run_cli(&[
        "concepts",
        "--model",
        &a,
        "--words",
        &bad.display().to_string(),
        "--no-cache",
    ]);
    assert_one_line_error(&run, "bad.tsv");
    assert!(run.stderr.contains("line 2"), "{}", run.stderr);
    let words = tiny_word_list(dir.path());
    let vectors = dir.path().join("vectors.txt");
    std::fs::write(&vectors, "cat 0.1 0.2\ndog 0.3 oops\n")?;
    let run = run_cli(&[
        "heads",
        "--model",
        &a,
        "--words",
        &words,
        "--vectors",
        &vectors.display().to_string(),
        "--no-cache",
    ]);
    assert_one_line_error(&run, "vectors.txt");
    let run = run_cli(&[
        "heads",
        "--model",
        &a,
        "--words",
        "/no/such/words.tsv",
        "--no-cache",
    ]);
    assert_one_line_error(&run, "words.tsv");
    Ok(())
}

#[test]
fn consistency_runs_every_measure_on_small_files() -> anyhow::Result<()> {
    let (dir, a) = tiny_folder(1);
    let (_dir_b, b) = tiny_folder(2);
    let pairs = dir.path().join("pairs.tsv");
    std::fs::write(
        &pairs,
        "sentence1\tsentence2\tlabel\nthe cat sat on the mat\ta cat sat on the mat\t1\n\
         the dog is big\tthe dog is not small\t1\nthe sea is warm\tthe sea is cold\t0\n\
         read a book\twrite a poem\t0\n",
    )?;
    let facts = dir.path().join("facts.json");
    std::fs::write(
        &facts,
        serde_json::json!({
            "instructions": ["answer in one word", "say the answer"],
            "relations": [{
                "relation": "capital",
                "templates": ["the capital of [X] is", "[X] has the capital city", "what is the capital of [X] ? it is"],
                "facts": [
                    {"subject": "france", "object": "paris", "aliases": []},
                    {"subject": "the house", "object": "city", "aliases": []}
                ]
            }]
        })
        .to_string(),
    )?;
    let subjects = dir.path().join("subjects.json");
    std::fs::write(
        &subjects,
        r#"{"france": "france is a big country and paris is its capital city"}"#,
    )?;
    let out = tempfile::tempdir()?;
    let mut cmd = crate::common::tunelens();
    cmd.args([
        "consistency",
        "--model",
        &a,
        "--model-b",
        &b,
        "--pairs",
        &pairs.display().to_string(),
        "--facts",
        &facts.display().to_string(),
        "--subjects",
        &subjects.display().to_string(),
        "--out",
        &out.path().display().to_string(),
    ]);
    let run = cmd.output()?;
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let text = String::from_utf8(run.stdout)?;
    assert!(text.contains("RD B-A"), "{text}");
    assert!(text.contains("macro average"), "{text}");
    assert!(text.contains("paraphrased instructions"), "{text}");
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        out.path().join("consistency.json"),
    )?)?;
    let results = json["results"].as_array().expect("results");
    assert_eq!(results.len(), 2);
    assert_eq!(
        results[0]["representations"]["layers"]
            .as_array()
            .map(Vec::len),
        Some(3)
    );
    assert_eq!(json["rd_difference"].as_array().map(Vec::len), Some(3));
    assert_eq!(
        results[0]["predictions"]["relations"][0]["facts"]
            .as_array()
            .map(Vec::len),
        Some(2)
    );
    assert_eq!(
        results[0]["spread"]["accuracies"].as_array().map(Vec::len),
        Some(2)
    );
    for name in [
        "consistency_by_layer.csv",
        "consistency_distances.csv",
        "consistency_relations.csv",
        "consistency_recall.csv",
    ] {
        assert!(
            std::fs::metadata(out.path().join(name))?.len() > 20,
            "{name}"
        );
    }

    // Bad data files are named with their line, before any model work.
    std::fs::write(&pairs, "a\tb\t1\nc\td\tyes\n")?;
    let run = run_cli(&[
        "consistency",
        "--model",
        &a,
        "--pairs",
        &pairs.display().to_string(),
    ]);
    assert_one_line_error(&run, "pairs.tsv");
    assert!(run.stderr.contains("line 2"), "{}", run.stderr);
    std::fs::write(
        &facts,
        r#"{"relations": [{"relation": "r", "templates": ["[X] is [Y]"], "facts": []}]}"#,
    )?;
    let run = run_cli(&[
        "consistency",
        "--model",
        &a,
        "--facts",
        &facts.display().to_string(),
    ]);
    assert_one_line_error(&run, "facts.json");
    Ok(())
}

pub fn tiny_instructions(dir: &std::path::Path) -> String {
    let path = dir.join("train.jsonl");
    let mut text = String::new();
    for (q, r) in [
        ("translate cat to french", "the cat sat on the mat ."),
        ("what is the capital of france", "paris"),
        ("write a poem about the sea", "the sea is blue and cold ."),
    ] {
        for _ in 0..3 {
            text.push_str(&serde_json::json!({"instruction": q, "output": r}).to_string());
            text.push('\n');
        }
    }
    text.push_str("{\"instruction\": \"no answer\"}\n");
    std::fs::write(&path, text).expect("data");
    path.display().to_string()
}

#[test]
fn train_writes_checkpoints_curves_and_resumes() -> anyhow::Result<()> {
    let (dir, model) = tiny_folder(31);
    let data = tiny_instructions(dir.path());
    let out = dir.path().join("run");
    let out_s = out.display().to_string();
    let args = [
        "train",
        "--model",
        &model,
        "--data",
        &data,
        "--out",
        &out_s,
        "--steps",
        "4",
        "--save-every",
        "2",
        "--eval-every",
        "2",
        "--lr",
        "1e-3",
    ];
    let run = run_cli(&args);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(
        run.stderr
            .contains("line 10: Alpaca line without field `output` (skipped)"),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("step 4/4"), "{}", run.stderr);
    assert!(run.stdout.contains("trained 4 steps"), "{}", run.stdout);
    for name in [
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "checkpoint-000002/optimizer.safetensors",
        "checkpoint-000004/trainer_state.json",
        "curves.csv",
        "curves.svg",
        "curves.png",
    ] {
        assert!(out.join(name).exists(), "{name}");
    }
    let curves = std::fs::read_to_string(out.join("curves.csv"))?;
    assert!(
        curves.starts_with(
            "step,loss,loss_ce,learning_rate,grad_norm,tokens_per_s,seconds,validation_loss"
        ),
        "{curves}"
    );
    assert_eq!(curves.lines().count(), 5);
    // The adapter loads on top of the base with the BASE+ADAPTER form.
    let spec = format!("{model}+{}", out.join("adapter").display());
    let info = run_cli(&["info", "--model", &spec, "--json"]);
    assert_eq!(info.code, 0, "{}", info.stderr);
    assert!(info.stdout.contains("\"rank\": 8"), "{}", info.stdout);

    // Merged into the base weights: a plain folder with the same logits as base + adapter.
    let merged = dir.path().join("merged").display().to_string();
    let run = run_cli(&["merge", "--model", &spec, "--out", &merged]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(
        run.stdout.contains("merged 6 adapted layers"),
        "{}",
        run.stdout
    );
    let text = "the cat sat on the mat";
    let with_adapter = run_cli(&["forward", "--model", &spec, "--text", text, "--json"]);
    let from_merged = run_cli(&["forward", "--model", &merged, "--text", text, "--json"]);
    let logits = |out: &str| -> Vec<f64> {
        let v: serde_json::Value = serde_json::from_str(out.trim()).expect("json");
        serde_json::from_value(v["logits_last"].clone()).expect("logits")
    };
    let (a, b) = (logits(&with_adapter.stdout), logits(&from_merged.stdout));
    assert_eq!(a.len(), b.len());
    let diff = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max);
    assert!(diff < 1e-4, "merged logits differ by {diff}");
    assert_one_line_error(
        &run_cli(&["merge", "--model", &model, "--out", &merged]),
        "names no adapter",
    );

    // Resume with more steps: continues at step 4 and writes the rest of the curves.
    let resumed = run_cli(&[
        "train", "--model", &model, "--resume", &out_s, "--steps", "6", "--json",
    ]);
    assert_eq!(resumed.code, 0, "{}", resumed.stderr);
    assert!(
        resumed.stderr.contains("resuming at step 4 of 6"),
        "{}",
        resumed.stderr
    );
    let value: serde_json::Value = serde_json::from_str(resumed.stdout.trim())?;
    assert_eq!(value["state"]["step"], 6);
    assert_eq!(value["state"]["history"].as_array().map(Vec::len), Some(6));
    assert!(out.join("checkpoint-000006").exists());
    Ok(())
}

#[test]
fn train_names_bad_data_and_settings() -> anyhow::Result<()> {
    let (dir, model) = tiny_folder(32);
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "not json\n{\"text\": 1}\n")?;
    let bad_s = bad.display().to_string();
    let run = run_cli(&["train", "--model", &model, "--data", &bad_s, "--steps", "1"]);
    assert_one_line_error(&run, "bad.jsonl");
    assert!(
        run.stderr
            .contains("no usable training example (line 1: not JSON"),
        "{}",
        run.stderr
    );
    let missing = dir.path().join("missing.jsonl").display().to_string();
    assert_one_line_error(
        &run_cli(&["train", "--model", &model, "--data", &missing]),
        "missing.jsonl",
    );
    let data = tiny_instructions(dir.path());
    assert_one_line_error(
        &run_cli(&[
            "train",
            "--model",
            &model,
            "--data",
            &data,
            "--targets",
            "q_proj,qkv",
        ]),
        "qkv",
    );
    assert_one_line_error(
        &run_cli(&[
            "train",
            "--model",
            &model,
            "--resume",
            &dir.path().display().to_string(),
        ]),
        "no checkpoint to resume from",
    );
    Ok(())
}

/// A PEFT adapter folder for the tiny model with seeded non-zero `A` and `B` on q_proj, k_proj
/// and down_proj of every layer.
fn tiny_qk_down_adapter(dir: &std::path::Path) -> anyhow::Result<()> {
    use candle_core::{Device, Tensor};
    std::fs::create_dir_all(dir)?;
    std::fs::write(
        dir.join("adapter_config.json"),
        r#"{"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "k_proj", "down_proj"]}"#,
    )?;
    let mut tensors = std::collections::HashMap::new();
    let mut k = 0u32;
    let mut values = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| {
                k += 1;
                (f64::from(k) * 0.618).sin() as f32 * 0.4
            })
            .collect()
    };
    for l in 0..3 {
        for (part, module, out, inp) in [
            ("self_attn", "q_proj", 16, 16),
            ("self_attn", "k_proj", 8, 16),
            ("mlp", "down_proj", 16, 32),
        ] {
            let p = format!("base_model.model.model.layers.{l}.{part}.{module}");
            tensors.insert(
                format!("{p}.lora_A.weight"),
                Tensor::from_vec(values(2 * inp), (2, inp), &Device::Cpu)?,
            );
            tensors.insert(
                format!("{p}.lora_B.weight"),
                Tensor::from_vec(values(out * 2), (out, 2), &Device::Cpu)?,
            );
        }
    }
    candle_core::safetensors::save(&tensors, dir.join("adapter_model.safetensors"))?;
    Ok(())
}

/// The TSV rows of a `concepts`/`heads` run without the model name column, split per model in
/// the order the models were given.
fn rows_by_model(stdout: &str) -> Vec<Vec<Vec<String>>> {
    let mut models: Vec<(String, Vec<Vec<String>>)> = Vec::new();
    for line in stdout.lines().skip(1) {
        let mut cols: Vec<String> = line.split('\t').map(str::to_owned).collect();
        let name = cols.remove(0);
        match models.iter_mut().find(|(n, _)| *n == name) {
            Some((_, rows)) => rows.push(cols),
            None => models.push((name, vec![cols])),
        }
    }
    models.into_iter().map(|(_, rows)| rows).collect()
}

/// Base vs base + adapter, the researcher's case: B's head pairs and concepts differ from A's
/// where the adapter touches q/k/down, and equal those of the merged model (`tunelens merge`).
#[test]
fn weight_views_compare_base_with_base_plus_adapter() -> anyhow::Result<()> {
    let (dir, a) = tiny_folder(1);
    let adapter = dir.path().join("adapter");
    tiny_qk_down_adapter(&adapter)?;
    let spec = format!("{a}+{}", adapter.display());
    let merged = dir.path().join("merged").display().to_string();
    let run = run_cli(&["merge", "--model", &spec, "--out", &merged]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let words = tiny_word_list(dir.path());
    for (view, extra) in [
        ("heads", ["--threshold-words", "20"]),
        ("concepts", ["--top-k", "5"]),
    ] {
        let mut args = vec![view, "--model", &a, "--model-b", &spec, "--words", &words];
        args.extend_from_slice(&extra);
        args.push("--no-cache");
        let pair = run_cli(&args);
        assert_eq!(pair.code, 0, "{view}: {}", pair.stderr);
        let models = rows_by_model(&pair.stdout);
        assert_eq!(models.len(), 2, "{view}: two models in the table");
        assert_ne!(models[0], models[1], "{view}: B must differ from A");
        let single = run_cli(&[
            view,
            "--model",
            &merged,
            "--words",
            &words,
            extra[0],
            extra[1],
            "--no-cache",
        ]);
        assert_eq!(single.code, 0, "{view}: {}", single.stderr);
        let from_merged = rows_by_model(&single.stdout);
        assert_eq!(from_merged.len(), 1);
        // Same rows to the printed precision (scores with 4 decimals; allow the last digit).
        assert_eq!(from_merged[0].len(), models[1].len());
        let score = if view == "heads" { 6 } else { 5 };
        for (m, b) in from_merged[0].iter().zip(&models[1]) {
            let (x, y): (f64, f64) = (m[score].parse()?, b[score].parse()?);
            assert!((x - y).abs() <= 1.5e-4, "{view}: {m:?} vs {b:?}");
            assert_eq!(m[..score], b[..score], "{view}");
            assert_eq!(m[score + 1..], b[score + 1..], "{view}");
        }
    }
    Ok(())
}

/// Three questions in MMLU's CSV layout in the tiny vocabulary (one with a quoted comma).
fn tiny_questions(dir: &std::path::Path) -> String {
    let path = dir.join("animals_test.csv");
    std::fs::write(
        &path,
        "the cat sat on the,mat,sea,tree,A\n\"the dog, the cat\",big,small,warm,B\nthe sea is,blue,red,cold,A\n",
    )
    .expect("questions");
    path.display().to_string()
}

#[test]
fn knowledge_of_a_model_against_itself_is_fully_consistent_and_writes_files() -> anyhow::Result<()>
{
    let (_a, path_a) = tiny_folder(81);
    let (_b, path_b) = tiny_folder(82);
    let data = tempfile::tempdir()?;
    let questions = tiny_questions(data.path());
    let out = data.path().join("out");
    let out_arg = out.display().to_string();
    // The tiny vocabulary has no letters: label the choices with words; one shot fits its
    // 64-token context.
    let common = [
        "--questions",
        &questions,
        "--shots",
        "1",
        "--labels",
        "red,blue,green",
        "--tuned-template",
        "base",
    ];
    let mut args = vec!["knowledge", "--model", &path_a, "--model-b", &path_a];
    args.extend(["--model-b", &path_b, "--model-b", &path_b]);
    args.extend(common);
    args.extend(["--out", &out_arg, "--json"]);
    let run = run_cli(&args);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let runs: serde_json::Value = serde_json::from_str(&run.stdout)?;
    let runs = runs.as_array().expect("runs");
    assert_eq!(runs.len(), 3);
    let same = &runs[0]["overall"];
    assert_eq!(same["questions"], 3);
    assert!((same["rho"].as_f64().unwrap() - 1.0).abs() < 1e-9, "{same}");
    assert!(same["kl"].as_f64().unwrap().abs() < 1e-9, "{same}");
    assert_eq!(same["base_accuracy"], same["tuned_accuracy"]);
    assert!(runs[1]["overall"]["kl"].as_f64().unwrap() > 0.0);
    for name in [
        "knowledge.svg",
        "knowledge.png",
        "knowledge_questions.csv",
        "knowledge_subjects.csv",
        "knowledge.json",
    ] {
        assert!(out.join(name).exists(), "{name} missing");
    }
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("knowledge.json"))?)?;
    assert_eq!(json["partial_correlation"]["runs"], 3);
    let rows = std::fs::read_to_string(out.join("knowledge_questions.csv"))?;
    assert_eq!(rows.lines().count(), 1 + 9);
    assert!(rows.contains("\"the dog, the cat\""), "{rows}");

    // The text report, and one-line errors for a bad record and for letters without tokens.
    let mut args = vec!["knowledge", "--model", &path_a, "--model-b", &path_b];
    args.extend(common);
    let text = run_cli(&args);
    assert_eq!(text.code, 0, "{}", text.stderr);
    assert!(text.stdout.contains("mean rho"), "{}", text.stdout);
    assert!(text.stdout.contains("animals"), "{}", text.stdout);
    let bad = data.path().join("bad_test.csv");
    std::fs::write(&bad, "q,a,b,A\nq,a,b,Z\n")?;
    let bad_arg = bad.display().to_string();
    let run = run_cli(&[
        "knowledge",
        "--model",
        &path_a,
        "--model-b",
        &path_b,
        "--questions",
        &bad_arg,
    ]);
    assert_one_line_error(&run, "record 2 (line 2)");
    let run = run_cli(&[
        "knowledge",
        "--model",
        &path_a,
        "--model-b",
        &path_b,
        "--questions",
        &questions,
        "--shots",
        "1",
    ]);
    assert_one_line_error(&run, "same token");
    Ok(())
}

#[test]
fn shift_and_lens_from_the_command_line() {
    let (dir, a) = tiny_folder(95);
    let (_dir_b, b) = tiny_folder(96);
    // Prompts B answers (a file with `---` separators), against the same model and another.
    let prompts = dir.path().join("prompts.txt");
    std::fs::write(&prompts, "# two prompts\nthe cat sat on\n---\nthe sea is\n").expect("prompts");
    let p = prompts.display().to_string();
    let run = run_cli(&[
        "--json",
        "shift",
        "--model",
        &a,
        "--model-b",
        &a,
        "--model-b",
        &b,
        "--prompts",
        &p,
        "--max-new-tokens",
        "6",
        "--base-template",
        "raw",
    ]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let runs: serde_json::Value = serde_json::from_str(&run.stdout).expect("json");
    let runs = runs.as_array().expect("one run per --model-b");
    assert_eq!(runs.len(), 2);
    for r in runs {
        let ratios = r["summary"]["ratios"].as_array().expect("ratios");
        let sum: f64 = ratios.iter().map(|v| v.as_f64().expect("ratio")).sum();
        assert!((sum - 1.0).abs() < 1e-9);
        assert_eq!(r["items"].as_array().expect("items").len(), 2);
    }
    // A bad AlignTDS record names its index; a bad k names k.
    let bad = dir.path().join("bad.json");
    std::fs::write(
        &bad,
        r#"[{"pure_input": "the cat", "output": ["sat"]}, {"pure_input": "x"}]"#,
    )
    .expect("bad");
    let bad = bad.display().to_string();
    let run = run_cli(&["shift", "--model", &a, "--model-b", &b, "--data", &bad]);
    assert_one_line_error(&run, "record 1");
    let run = run_cli(&[
        "shift",
        "--model",
        &a,
        "--model-b",
        &b,
        "--prompts",
        &p,
        "--k",
        "40",
    ]);
    assert_one_line_error(&run, "k");
    // The lens: one curve per model, B's token tracked in both.
    let run = run_cli(&[
        "--json",
        "lens",
        "--model",
        &a,
        "--model-b",
        &b,
        "--prompt",
        "the cat sat on",
        "--position",
        "2",
    ]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let lens: serde_json::Value = serde_json::from_str(&run.stdout).expect("json");
    let curves = lens["curves"].as_array().expect("curves");
    assert_eq!(curves.len(), 2);
    assert_eq!(curves[0][2]["position"], 2);
    assert_eq!(curves[0][2]["target"], curves[1][2]["target"]);
    let run = run_cli(&[
        "lens",
        "--model",
        &a,
        "--prompt",
        "the cat",
        "--position",
        "99",
    ]);
    assert_one_line_error(&run, "position");
}
