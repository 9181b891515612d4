//! Every view of the app, rendered (wgpu on Mesa's software Vulkan) after a run on tiny seeded
//! models and compared with `tests/snapshots/<view>.png`, so a change that alters what a person
//! sees fails here. `UPDATE_SNAPSHOTS=1 scripts/test` rewrites the images; look at them before
//! committing.
//!
//! What varies from run to run is kept out of the pictures: the models live at fixed paths, the
//! result cache is a fresh folder (nothing shows "cached"), and the Fine-tune view is taken
//! after its data preview, before the timed curves. Only the Prompt view's tokens/s figures
//! vary, so that view alone may differ in a few hundred pixels; the others must match exactly.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use egui_kittest::kittest::Queryable as _;
use egui_kittest::{Harness, SnapshotOptions};
use tunelens::model::tiny::{tiny_config, write_tiny_hf_folder};
use tunelens::ui::actions::Action;
use tunelens::ui::state::View;
use tunelens::ui::TunelensApp;
use tunelens::worker::Slot;

/// Pixels that may differ in the Prompt view: the two tokens/s figures (about 170 pixels
/// measured); every other view must match exactly.
const PROMPT_TIMING_PIXELS: usize = 400;

fn harness() -> Harness<'static, TunelensApp> {
    Harness::builder()
        .with_size(eframe::egui::vec2(1280.0, 820.0))
        .wgpu()
        .build_eframe(|cc| {
            TunelensApp::new(cc, tunelens::ui::StartOptions::default()).expect("app starts")
        })
}

fn step_until(
    harness: &mut Harness<'_, TunelensApp>,
    what: &str,
    cond: impl Fn(&TunelensApp) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !cond(harness.state()) {
        assert!(
            harness.state().last_error.is_none(),
            "{what}: {:?}",
            harness.state().last_error
        );
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        harness.step();
        std::thread::sleep(Duration::from_millis(5));
    }
    harness.step();
    harness.step();
}

/// A tiny model at a fixed path (the Models view shows it).
fn tiny_model(name: &str, seed: u64, tied: bool) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tunelens-snapshot-{name}"));
    let mut cfg = tiny_config();
    cfg.tie_word_embeddings = tied;
    write_tiny_hf_folder(&dir, &cfg, seed).expect("tiny folder");
    dir
}

/// Words of the tiny vocabulary, as a `word<TAB>freq` list.
fn tiny_words(dir: &std::path::Path) -> PathBuf {
    let words = [
        "the",
        "cat",
        "dog",
        "sat",
        "mat",
        "write",
        "poem",
        "sea",
        "summarize",
        "text",
        "translate",
        "french",
        "list",
        "three",
        "red",
        "blue",
        "answer",
        "question",
        "paris",
        "france",
        "capital",
        "city",
        "river",
        "tree",
        "house",
        "run",
        "read",
        "book",
    ];
    let mut text = String::new();
    for (i, w) in words.iter().enumerate() {
        let _ = writeln!(text, "{w}\t{}", 100 - i);
    }
    let path = dir.join("words.tsv");
    std::fs::write(&path, text).expect("word list");
    path
}

/// A tiny in-context task for the Instruction vector view, written to `dir`.
fn iv_task(dir: &std::path::Path) -> PathBuf {
    let task = dir.join("shift7.json");
    std::fs::write(&task, tunelens::model::tiny::tiny_icl_task_json()).expect("task");
    task
}

fn snapshot(harness: &mut Harness<'_, TunelensApp>, name: &str) {
    let allowed = if name == "prompt" {
        PROMPT_TIMING_PIXELS
    } else {
        0
    };
    harness.run_steps(4);
    harness.snapshot_options(name, &SnapshotOptions::new().max_failed_pixels(allowed));
}

fn show(harness: &mut Harness<'_, TunelensApp>, view: View) {
    harness.state_mut().push_action(Action::Show(view));
    harness.run_steps(2);
}

/// Runs the main button of analysis view `id` and waits for its result.
fn run_view(harness: &mut Harness<'_, TunelensApp>, id: &str, button: &str) {
    show(harness, View::analysis(id));
    harness.get_by_label(button).click();
    step_until(harness, id, |app| {
        app.analyses
            .iter()
            .find(|a| a.id() == id)
            .and_then(|a| a.export_stem(&app.state))
            .is_some()
            && app.pending.is_empty()
    });
}

#[test]
fn every_view_after_a_run() {
    let cache = tempfile::tempdir().expect("temp dir");
    std::env::set_var("TUNELENS_CACHE_DIR", cache.path());
    let a = tiny_model("a", 41, false);
    let b = tiny_model("b", 42, true);
    // Fixed paths: views show file names and labels made from them.
    let data_dir = std::env::temp_dir().join("tunelens-snapshot-data");
    std::fs::create_dir_all(&data_dir).expect("data folder");
    let mut harness = harness();
    harness.state_mut().open_path(Slot::A, &a);
    harness.state_mut().open_path(Slot::B, &b);
    step_until(&mut harness, "both models", |app| {
        app.slots.iter().all(|s| s.info.is_some()) && app.pending.is_empty()
    });
    snapshot(&mut harness, "models");

    {
        let app = harness.state_mut();
        app.state.prompt = "write a poem about the sea. keep it short".to_owned();
        app.state.chat = false;
        app.state.gen.max_new_tokens = 8;
        app.state.attribution.max_new_tokens = 6;
        app.state.weights.words_file = Some(tiny_words(data_dir.as_path()));
        app.state.weights.layer = 1;
    }
    show(&mut harness, View::Prompt);
    harness.state_mut().push_action(Action::Generate);
    step_until(&mut harness, "generation", |app| {
        app.pending.is_empty() && app.responses.iter().all(|r| r.stop_reason.is_some())
    });
    snapshot(&mut harness, "prompt");

    run_view(&mut harness, "attribution", "Attribute");
    snapshot(&mut harness, "attribution");
    run_view(&mut harness, "concepts", "Compute concepts");
    snapshot(&mut harness, "concepts");
    run_view(&mut harness, "heads", "Compute head pairs");
    harness.get_by_label("Head pair counts A").click();
    snapshot(&mut harness, "heads");

    let pairs = data_dir.as_path().join("pairs.tsv");
    std::fs::write(
        &pairs,
        "the cat sat on the mat\ta cat sat on the mat\t1\nthe dog is big\tthe big dog\t1\n\
         the sea is warm\tthe sea is cold\t0\nread a book\twrite a poem\t0\n",
    )
    .expect("pairs");
    let facts = data_dir.as_path().join("facts.json");
    std::fs::write(
        &facts,
        r#"{"instructions": ["answer", "say it"], "relations": [{"relation": "capital",
            "templates": ["the capital of [X] is", "[X] capital city is"],
            "facts": [{"subject": "france", "object": "paris"}, {"subject": "the house", "object": "city"}]}]}"#,
    )
    .expect("facts");
    harness.state_mut().state.consistency.pairs_file = Some(pairs);
    harness.state_mut().state.consistency.facts_file = Some(facts);
    run_view(&mut harness, "consistency", "Run consistency");
    snapshot(&mut harness, "consistency");

    let task = iv_task(data_dir.as_path());
    {
        let iv = &mut harness.state_mut().state.iv;
        iv.shipped.clear();
        iv.task_files = vec![task];
        iv.n_mean = 6;
        iv.n_ie = 3;
        iv.shots = 3;
        iv.n_test = 5;
    }
    run_view(&mut harness, "iv", "Find heads");
    snapshot(&mut harness, "iv");

    shift_and_knowledge(&mut harness, data_dir.as_path());

    let train = data_dir.as_path().join("train.jsonl");
    let mut lines = String::new();
    for (q, r) in [
        ("translate cat to french", "the cat sat on the mat ."),
        ("what is the capital of france", "paris"),
        ("write a poem about the sea", "the sea is blue ."),
    ] {
        let _ = writeln!(lines, "{{\"instruction\": \"{q}\", \"output\": \"{r}\"}}");
    }
    std::fs::write(&train, lines).expect("training data");
    harness.state_mut().state.finetune.data_file = Some(train);
    show(&mut harness, View::analysis("finetune"));
    harness.get_by_label("Preview data").click();
    step_until(&mut harness, "the data preview", |app| {
        app.view::<tunelens::ui::panels::finetune::FinetuneView>()
            .is_some_and(|v| v.training.preview.is_some())
            && app.pending.is_empty()
    });
    snapshot(&mut harness, "finetune");
}

/// The Token shift view on two fixed responses (raw base template) and the Knowledge view on
/// three questions.
fn shift_and_knowledge(harness: &mut Harness<'_, TunelensApp>, data_dir: &std::path::Path) {
    let responses = data_dir.join("responses.json");
    std::fs::write(
        &responses,
        r#"[{"id": "r1", "pure_input": "the cat sat on", "output": ["the mat and the dog ran to the sea"]},
            {"id": "r2", "pure_input": "the sea is", "output": ["warm and the sky is blue"]}]"#,
    )
    .expect("responses");
    harness.state_mut().state.shift.data_file = Some(responses);
    harness.state_mut().state.shift.template = tunelens::ui::panels::shift::TemplateChoice::Raw;
    run_view(harness, "shift", "Measure shift");
    snapshot(harness, "shift");

    let questions = data_dir.join("animals_test.csv");
    std::fs::write(
        &questions,
        "the cat sat on the,mat,sea,tree,A\nthe dog is,big,small,warm,B\nthe sea is,blue,red,cold,A\n",
    )
    .expect("questions");
    {
        let k = &mut harness.state_mut().state.knowledge;
        k.shipped.clear();
        k.files = vec![questions];
        k.shots = 1;
        "red,blue,green".clone_into(&mut k.labels);
    }
    run_view(harness, "knowledge", "Compare knowledge");
    snapshot(harness, "knowledge");
}
