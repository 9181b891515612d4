//! The desktop app driven headless with egui_kittest: open models through the dialog's code
//! path, type a prompt, generate, stop, fail to load, swap.

use std::time::{Duration, Instant};

use egui_kittest::kittest::{NodeT as _, Queryable as _};
use egui_kittest::Harness;
use tunelens::model::generate::StopReason;
use tunelens::model::tiny::{tiny_config, write_tiny_hf_folder};
use tunelens::ui::actions::Action;
use tunelens::ui::panels::attribution::{AttributionResults, AttributionView};
use tunelens::ui::panels::consistency::ConsistencyView;
use tunelens::ui::panels::finetune::{FinetuneView, TrainingView};
use tunelens::ui::panels::iv::IvView;
use tunelens::ui::panels::knowledge::KnowledgeView;
use tunelens::ui::panels::shift::ShiftView;
use tunelens::ui::panels::weights::{ConceptsView, HeadsView};
use tunelens::ui::TunelensApp;
use tunelens::worker::Slot;

use crate::common::{demo_model_path, tiny_words};

/// The Attribution view's last results.
fn attribution(app: &TunelensApp) -> Option<&AttributionResults> {
    app.view::<AttributionView>()?.results.as_ref()
}

/// The Fine-tune view's run.
fn training(app: &TunelensApp) -> &TrainingView {
    &app.view::<FinetuneView>()
        .expect("the Fine-tune view")
        .training
}

fn harness() -> Harness<'static, TunelensApp> {
    Harness::builder()
        .with_size(eframe::egui::vec2(1280.0, 820.0))
        .build_eframe(|cc| {
            TunelensApp::new(cc, tunelens::ui::StartOptions::default()).expect("app starts")
        })
}

/// Steps frames (the worker runs on its own thread) until `cond` holds.
fn step_until(
    harness: &mut Harness<'_, TunelensApp>,
    what: &str,
    cond: impl Fn(&TunelensApp) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !cond(harness.state()) {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        harness.step();
        std::thread::sleep(Duration::from_millis(5));
    }
    harness.step();
    harness.step();
}

/// Four labelled paraphrase pairs and two facts of one relation in the tiny vocabulary.
fn small_consistency_files(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let pairs = dir.join("pairs.tsv");
    std::fs::write(
        &pairs,
        "the cat sat on the mat\ta cat sat on the mat\t1\nthe dog is big\tthe big dog\t1\n\
         the sea is warm\tthe sea is cold\t0\nread a book\twrite a poem\t0\n",
    )
    .expect("pairs");
    let facts = dir.join("facts.json");
    std::fs::write(
        &facts,
        r#"{"instructions": ["answer", "say it"], "relations": [{"relation": "capital",
            "templates": ["the capital of [X] is", "[X] capital city is"],
            "facts": [{"subject": "france", "object": "paris"}, {"subject": "the house", "object": "city"}]}]}"#,
    )
    .expect("facts");
    (pairs, facts)
}

fn tiny_folder(seed: u64, tied: bool) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut cfg = tiny_config();
    cfg.tie_word_embeddings = tied;
    write_tiny_hf_folder(dir.path(), &cfg, seed).expect("tiny folder");
    dir
}

#[test]
fn open_type_generate_and_stop_on_the_demo_model() {
    let mut harness = harness();
    harness.state_mut().open_path(Slot::A, &demo_model_path());
    step_until(&mut harness, "the demo model to load", |app| {
        app.slots[0].info.is_some()
    });
    // The source row of slot A, and the recent list.
    assert_eq!(
        harness
            .get_all_by_label_contains("SmolLM2-135M-Instruct.Q4_1.gguf")
            .count(),
        2
    );
    // To the Prompt view, type a prompt, generate.
    harness.get_by_label("Prompt").click();
    harness.run();
    harness.state_mut().state.prompt.clear();
    harness.state_mut().state.gen.max_new_tokens = 300;
    let editor =
        harness.get_by_role_and_label(eframe::egui::accesskit::Role::MultilineTextInput, "Prompt");
    editor.focus();
    editor.type_text("Write a long story about a lighthouse keeper.");
    harness.run();
    assert_eq!(
        harness.state().state.prompt,
        "Write a long story about a lighthouse keeper."
    );
    harness.get_by_label("Generate").click();
    step_until(&mut harness, "tokens to stream", |app| {
        app.responses[0].tokens >= 3
    });
    assert!(harness.state().is_generating());
    harness.get_by_label("Stop").click();
    step_until(&mut harness, "the generation to stop", |app| {
        !app.is_generating()
    });
    let response = &harness.state().responses[0];
    assert_eq!(response.stop_reason, Some(StopReason::Cancelled));
    assert!(response.tokens < 300, "{} tokens", response.tokens);
    assert!(!response.text.is_empty());
    harness.get_by_label_contains("stopped");
}

#[test]
fn a_failing_load_shows_an_error_and_the_app_keeps_working() {
    let dir = tempfile::tempdir().expect("temp dir");
    let corrupt = dir.path().join("corrupt.gguf");
    std::fs::write(&corrupt, b"definitely not gguf").expect("write");
    let mut harness = harness();
    harness.state_mut().open_path(Slot::A, &corrupt);
    step_until(&mut harness, "the load to fail", |app| {
        app.last_error.is_some()
    });
    let error = harness.state().last_error.clone().unwrap_or_default();
    assert!(
        error.contains("corrupt.gguf") && error.contains("failed"),
        "{error}"
    );
    harness.get_by_label_contains("corrupt.gguf");
    assert!(!harness.state().slots[0].loading);
    // Still working: a good model loads, and its success clears the error.
    let good = tiny_folder(1, false);
    harness.state_mut().open_path(Slot::A, good.path());
    step_until(&mut harness, "the good model", |app| {
        app.slots[0].info.is_some()
    });
    assert!(harness.state().last_error.is_none(), "a success clears it");
    // An error can also be dismissed by hand.
    harness.state_mut().open_path(Slot::B, &corrupt);
    step_until(&mut harness, "the second failure", |app| {
        app.last_error.is_some()
    });
    harness.get_by_label("×").click();
    harness.run();
    assert!(harness.state().last_error.is_none());
}

/// Feedback (issue: feedback on every action): Generate says why it is disabled with an empty
/// prompt, and a job waiting behind another says so instead of showing a 0% bar.
#[test]
fn generate_needs_a_prompt_and_queued_jobs_say_what_they_wait_for() {
    let a = tiny_folder(61, false);
    let mut harness = harness();
    harness.state_mut().open_path(Slot::A, a.path());
    step_until(&mut harness, "the model", |app| app.slots[0].info.is_some());
    harness
        .state_mut()
        .push_action(Action::Show(tunelens::ui::state::View::Prompt));
    harness.state_mut().state.prompt = "   ".to_owned();
    harness.run_steps(2);
    assert!(
        harness
            .get_by_label("Generate")
            .accesskit_node()
            .is_disabled(),
        "Generate is disabled with an empty prompt"
    );
    harness.state_mut().state.prompt = "write a poem".to_owned();
    harness.run_steps(2);
    assert!(!harness
        .get_by_label("Generate")
        .accesskit_node()
        .is_disabled());
    // Two jobs at once: the second waits behind the first and says so.
    harness.state_mut().state.gen.max_new_tokens = 40;
    harness.state_mut().push_action(Action::Generate);
    harness.state_mut().push_action(Action::Run("concepts"));
    harness.step();
    let queued: Vec<Option<String>> = harness
        .state()
        .pending
        .values()
        .map(|p| p.queued_behind.clone())
        .collect();
    assert_eq!(queued.len(), 2, "{queued:?}");
    assert_eq!(queued[0], None, "the first job runs");
    assert_eq!(queued[1].as_deref(), Some("Generating"), "{queued:?}");
    step_until(&mut harness, "both jobs", |app| app.pending.is_empty());
}

#[test]
fn two_loads_then_swap_and_generate_both_side_by_side() {
    let a = tiny_folder(1, false);
    let b = tiny_folder(2, true);
    let mut harness = harness();
    harness.state_mut().open_path(Slot::A, a.path());
    harness.state_mut().open_path(Slot::B, b.path());
    step_until(&mut harness, "both models", |app| {
        app.slots.iter().all(|s| s.info.is_some())
    });
    let params =
        |app: &TunelensApp, i: usize| app.slots[i].info.as_ref().map(|info| info.parameters);
    let (pa, pb) = (params(harness.state(), 0), params(harness.state(), 1));
    assert_ne!(pa, pb, "untied and tied models differ in size");
    harness.get_by_label("Swap A and B").click();
    step_until(&mut harness, "the swap", |app| params(app, 0) == pb);
    assert_eq!(params(harness.state(), 1), pa);
    // Both recent entries are remembered, newest first.
    assert_eq!(harness.state().state.recent.len(), 2);
    // Generate with the keyboard shortcut from the Prompt view.
    harness
        .state_mut()
        .push_action(Action::Show(tunelens::ui::state::View::Prompt));
    harness.state_mut().state.prompt = "write a poem about the sea".to_owned();
    harness.state_mut().state.gen.max_new_tokens = 8;
    harness.run();
    harness.key_press_modifiers(eframe::egui::Modifiers::COMMAND, eframe::egui::Key::Enter);
    step_until(&mut harness, "both responses", |app| {
        !app.is_generating() && app.responses.iter().all(|r| r.stop_reason.is_some())
    });
    for response in &harness.state().responses {
        assert!(response.tokens > 0);
    }
}

/// A file dropped on the window, as the windowing integration would hand it to egui.
#[derive(Debug)]
struct Dropped(std::path::PathBuf);

impl eframe::egui::DroppedFile for Dropped {
    fn path(&self) -> &std::path::Path {
        &self.0
    }

    fn bytes(&self) -> Result<Vec<u8>, String> {
        std::fs::read(&self.0).map_err(|err| err.to_string())
    }
}

fn drop_on_window(harness: &mut Harness<'_, TunelensApp>, path: &std::path::Path) {
    harness
        .input_mut()
        .dropped_files
        .push(std::sync::Arc::new(Dropped(path.to_path_buf())));
    harness.step();
}

#[test]
fn dropped_models_fill_empty_slots_and_adapters_stack_on_top() {
    let a = tiny_folder(4, false);
    let b = tiny_folder(5, true);
    let mut harness = harness();
    drop_on_window(&mut harness, a.path());
    step_until(&mut harness, "the dropped model in A", |app| {
        app.slots[0].info.is_some()
    });
    drop_on_window(&mut harness, b.path());
    step_until(&mut harness, "the dropped model in B", |app| {
        app.slots[1].info.is_some()
    });
    assert!(harness.state().slots[1]
        .info
        .as_ref()
        .is_some_and(|i| i.tied_embeddings));
    // A PEFT adapter folder goes onto slot B's model.
    let adapter = tempfile::tempdir().expect("temp dir");
    std::fs::write(
        adapter.path().join("adapter_config.json"),
        r#"{"r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}"#,
    )
    .expect("config");
    let mut tensors = std::collections::HashMap::new();
    for layer in 0..3 {
        let p = format!("base_model.model.model.layers.{layer}.self_attn.q_proj");
        let dev = candle_core::Device::Cpu;
        tensors.insert(
            format!("{p}.lora_A.weight"),
            candle_core::Tensor::ones((2, 16), candle_core::DType::F32, &dev).expect("A"),
        );
        tensors.insert(
            format!("{p}.lora_B.weight"),
            candle_core::Tensor::zeros((16, 2), candle_core::DType::F32, &dev).expect("B"),
        );
    }
    candle_core::safetensors::save(&tensors, adapter.path().join("adapter_model.safetensors"))
        .expect("save");
    drop_on_window(&mut harness, adapter.path());
    step_until(&mut harness, "the adapter on B", |app| {
        app.slots[1]
            .info
            .as_ref()
            .is_some_and(|i| i.adapter.is_some())
    });
    let info = harness.state().slots[1].info.clone().expect("B loaded");
    assert!(
        info.tied_embeddings,
        "the adapter was applied on B's own base model"
    );
    harness.get_by_label_contains("r 2 alpha 4 on q_proj");
}

#[test]
fn attribution_view_shows_heatmaps_scores_and_exports() {
    let a = tiny_folder(6, false);
    let b = tiny_folder(7, true);
    let mut harness = harness();
    harness.state_mut().open_path(Slot::A, a.path());
    harness.state_mut().open_path(Slot::B, b.path());
    step_until(&mut harness, "both models", |app| {
        app.slots.iter().all(|s| s.info.is_some())
    });
    harness.get_by_label("Attribution").click();
    harness.run();
    harness.state_mut().state.prompt = "write a poem about the sea. keep it short".to_owned();
    harness.state_mut().state.chat = false;
    harness.state_mut().state.attribution.max_new_tokens = 6;
    harness.run();
    harness.get_by_label("Attribute").click();
    step_until(&mut harness, "both attributions", |app| {
        attribution(app).is_some()
    });
    let results = &attribution(harness.state()).expect("results").results;
    assert_eq!(results.len(), 2);
    // Each model explains its own response; "write" marks its sentence automatically.
    for r in results {
        assert!(!r.attribution.output_ids.is_empty());
        assert!(r.attribution.instruction_score.is_some());
    }
    for slot in ["A", "B"] {
        harness.get_by_label(&format!("Attribution heatmap {slot}"));
        harness.get_by_label(&format!("Importance density {slot}"));
        harness.get_by_label_contains(&format!("Instruction score {slot}: "));
    }
    // Clicking a density bar flips that word's mark and the score follows.
    let before = results[0].attribution.instruction_mask.clone();
    harness.get_by_label("Importance density A").scroll_to_me();
    harness.run();
    harness.get_by_label("Importance density A").click();
    harness.run();
    let after = &attribution(harness.state()).expect("results").results[0];
    assert_ne!(after.attribution.instruction_mask, before);
    // Token level is one click away.
    harness.get_by_label("Tokens").click();
    harness.run();
    assert!(!harness.state().state.attribution.word_level);
    // Export (the save dialog cannot be clicked; this is its code path).
    let out = tempfile::tempdir().expect("temp dir");
    harness
        .state_mut()
        .export_to(&out.path().join("figure.svg"));
    step_until(&mut harness, "the export", |app| {
        app.export_note
            .as_deref()
            .is_some_and(|n| n.starts_with("Exported"))
    });
    for name in [
        "figure.svg",
        "figure.png",
        "figure.csv",
        "figure_density.csv",
        "figure.json",
    ] {
        let len = std::fs::metadata(out.path().join(name)).map_or(0, |m| m.len());
        assert!(len > 100, "{name}: {len} bytes");
    }
    let svg = std::fs::read_to_string(out.path().join("figure.svg")).expect("svg");
    assert!(svg.contains("<svg") && !svg.contains("<text"));
    harness.get_by_label_contains("Exported 5 files");
}

/// A `word<TAB>freq` list of the tiny vocabulary's words.

#[test]
fn concepts_heads_and_consistency_views_compute_show_and_export() {
    let a = tiny_folder(11, false);
    let b = tiny_folder(12, true);
    let cache = tempfile::tempdir().expect("temp dir");
    // The worker caches weight-space results in the user cache folder; keep this test's apart.
    std::env::set_var("TUNELENS_CACHE_DIR", cache.path());
    let mut harness = harness();
    harness.state_mut().open_path(Slot::A, a.path());
    harness.state_mut().open_path(Slot::B, b.path());
    step_until(&mut harness, "both models", |app| {
        app.slots.iter().all(|s| s.info.is_some())
    });
    let words = tiny_words(a.path());

    // Concepts: compute, pick a layer, see both tables and the alignment column.
    harness.get_by_label("Concepts").click();
    harness.run();
    harness.state_mut().state.weights.words_file = Some(words.clone());
    harness.get_by_label("Compute concepts").click();
    step_until(&mut harness, "concepts", |app| {
        app.view::<ConceptsView>()
            .is_some_and(|v| v.result.is_some())
    });
    harness.state_mut().state.weights.layer = 2;
    harness.run();
    harness.get_by_label("Variance spectrum, layer 2");
    assert!(
        harness.query_all_by_label_contains("#1 ").count() >= 2,
        "rank-1 rows of A and B"
    );
    harness.get_by_label_contains("§2.3 extension");

    // Heads: compute, click a head in A's grid, see its pair table and the change rates.
    harness.get_by_label("Heads").click();
    harness.run();
    harness.get_by_label("Compute head pairs").click();
    step_until(&mut harness, "head pairs", |app| {
        app.view::<HeadsView>().is_some_and(|v| v.result.is_some())
    });
    harness.get_by_label("Head pair counts A").scroll_to_me();
    harness.run();
    harness.get_by_label("Head pair counts A").click();
    harness.run();
    assert!(
        harness.state().state.weights.head.is_some(),
        "a head is selected"
    );
    assert!(harness.query_all_by_label_contains("rank 1 · dim").count() >= 1);
    harness.get_by_label("instruction n");
    harness.get_by_label("Change rate by layer group");
    let out = tempfile::tempdir().expect("temp dir");
    harness.state_mut().export_to(&out.path().join("heads.svg"));
    step_until(&mut harness, "the heads export", |app| {
        app.export_note
            .as_deref()
            .is_some_and(|n| n.starts_with("Exported"))
    });
    for name in [
        "heads.svg",
        "heads.png",
        "heads_pairs.csv",
        "heads_change_rate.csv",
        "heads.json",
    ] {
        let len = std::fs::metadata(out.path().join(name)).map_or(0, |m| m.len());
        assert!(len > 50, "{name}: {len} bytes");
    }

    // Consistency on small files: histograms per model, RD by layer, relation table.
    let (pairs, facts) = small_consistency_files(a.path());
    harness.get_by_label("Consistency").click();
    harness.run();
    harness.state_mut().state.consistency.pairs_file = Some(pairs);
    harness.state_mut().state.consistency.facts_file = Some(facts);
    harness.get_by_label("Run consistency").click();
    step_until(&mut harness, "consistency", |app| {
        app.pending.is_empty()
            && app
                .view::<ConsistencyView>()
                .is_some_and(|v| v.result.is_some())
    });
    harness.get_by_label("Distance histogram A");
    harness.get_by_label("Distance histogram B");
    harness.get_by_label("Relative difference by layer");
    harness.get_by_label("macro average");
    harness.get_by_label("Accuracy across instructions");
}

#[test]
fn finetune_view_previews_estimates_trains_cancels_resumes_and_loads_as_b() {
    let a = tiny_folder(21, false);
    let run_dir = tempfile::tempdir().expect("temp dir");
    let data = a.path().join("train.jsonl");
    let mut lines = String::new();
    for (q, r) in [
        ("translate cat to french", "the cat sat on the mat ."),
        ("what is the capital of france", "paris"),
        ("write a poem about the sea", "the sea is blue and cold ."),
        ("list three tips for study", "read a book , run , jump"),
    ] {
        for _ in 0..3 {
            lines.push_str(&serde_json::json!({"instruction": q, "output": r}).to_string());
            lines.push('\n');
        }
    }
    lines.push_str("{\"instruction\": \"no output here\"}\n");
    std::fs::write(&data, lines).expect("data");

    let mut harness = harness();
    harness.state_mut().open_path(Slot::A, a.path());
    step_until(&mut harness, "the model", |app| app.slots[0].info.is_some());
    harness.get_by_label("Fine-tune").click();
    harness.run();
    {
        let f = &mut harness.state_mut().state.finetune;
        f.data_file = Some(data.clone());
        f.out_dir = Some(run_dir.path().to_path_buf());
        f.settings.steps = 300;
        f.settings.eval_every = 50;
        f.settings.save_every = 0;
        f.settings.learning_rate = 1e-3;
    }
    harness.run();

    harness.get_by_label("Preview data").click();
    step_until(&mut harness, "the preview", |app| {
        training(app).preview.is_some()
    });
    harness.get_by_label_contains("1 lines skipped");
    harness.get_by_label_contains("line 1 · alpaca");

    harness.get_by_label("Estimate").click();
    step_until(&mut harness, "the estimate", |app| {
        training(app).estimate.is_some()
    });
    harness.get_by_label_contains("Estimate:");

    // Launch, stop after a few steps: a checkpoint is written and Resume is offered.
    harness.get_by_label("Launch").click();
    step_until(&mut harness, "a few steps", |app| {
        training(app).steps.len() >= 3
    });
    // The status bar has a Cancel too; the view's is the first.
    harness
        .query_all_by_label("Cancel")
        .next()
        .expect("a Cancel button")
        .click();
    step_until(&mut harness, "the stop", |app| {
        training(app).result.is_some()
    });
    let stopped = training(harness.state()).result.clone().expect("result");
    assert!(stopped.cancelled, "the run was stopped");
    assert!(stopped.state.step < 300);
    harness.get_by_label_contains("Resume continues");
    harness.get_by_label("Resume").click();
    step_until(&mut harness, "the resumed run", |app| {
        training(app).result.as_ref().is_some_and(|r| !r.cancelled)
    });
    let done = training(harness.state()).result.clone().expect("result");
    assert_eq!(done.state.step, 300);
    assert_eq!(done.state.history.len(), 300, "curves cover the whole run");
    let first = done.state.history[0].loss;
    let last = done.state.history[299].loss;
    assert!(last < first, "loss falls: {first} -> {last}");
    harness.get_by_label_contains("Finished 300 steps");
    harness.get_by_label("Loss");
    harness.get_by_label("Tokens per second");
    harness.get_by_label("Gradient norm (before clipping)");

    // The tuned model goes into slot B with its adapter.
    harness.get_by_label("Load as B").scroll_to_me();
    harness.run();
    harness.get_by_label("Load as B").click();
    step_until(&mut harness, "slot B", |app| {
        assert!(app.last_error.is_none(), "{:?}", app.last_error);
        app.slots[1]
            .info
            .as_ref()
            .is_some_and(|i| i.adapter.is_some())
    });
    // "Load as B" confirms once slot B holds the tuned model.
    harness.run_steps(2);
    harness.get_by_label_contains("Loaded in slot B");

    let out = tempfile::tempdir().expect("temp dir");
    harness
        .state_mut()
        .export_to(&out.path().join("training.svg"));
    step_until(&mut harness, "the export", |app| {
        app.export_note
            .as_deref()
            .is_some_and(|n| n.starts_with("Exported"))
    });
    for name in [
        "training.svg",
        "training.png",
        "training_curves.csv",
        "training.json",
    ] {
        let len = std::fs::metadata(out.path().join(name)).map_or(0, |m| m.len());
        assert!(len > 50, "{name}: {len} bytes");
    }
    assert!(run_dir
        .path()
        .join("adapter/adapter_model.safetensors")
        .exists());
    // The GUI's run folder has the curves figure, as the CLI's does.
    for name in ["curves.csv", "curves.svg", "curves.png"] {
        assert!(run_dir.path().join(name).exists(), "{name}");
    }
}

/// Drops the fields that time a run or say where it came from (`seconds`, `secs`, `cached`),
/// recursively, so two runs of the same analysis compare equal.
fn without_timing(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Object(map) => {
            for key in ["seconds", "secs", "cached", "timings"] {
                map.remove(key);
            }
            map.values_mut().for_each(without_timing);
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(without_timing),
        _ => {}
    }
}

/// Asserts two export folders hold the same file names and the same data: tables byte for
/// byte, JSON up to run timing.
fn assert_same_files(gui: &std::path::Path, cli: &std::path::Path, what: &str) {
    let names = |dir: &std::path::Path| {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .expect("export folder")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    let (a, b) = (names(gui), names(cli));
    assert_eq!(a, b, "{what}: the GUI and the CLI write different files");
    assert!(a.len() >= 4, "{what}: {a:?}");
    for name in &a {
        let (x, y) = (
            std::fs::read(gui.join(name)).expect("gui file"),
            std::fs::read(cli.join(name)).expect("cli file"),
        );
        let ext = std::path::Path::new(name)
            .extension()
            .map(|e| e.to_string_lossy().into_owned())
            .unwrap_or_default();
        if ext == "json" {
            let mut x: serde_json::Value = serde_json::from_slice(&x).expect("json");
            let mut y: serde_json::Value = serde_json::from_slice(&y).expect("json");
            without_timing(&mut x);
            without_timing(&mut y);
            assert_eq!(x, y, "{what}: {name} differs");
        } else if ext == "csv" || ext == "tsv" {
            assert_eq!(
                String::from_utf8_lossy(&x),
                String::from_utf8_lossy(&y),
                "{what}: {name} differs"
            );
        } else {
            assert!(!x.is_empty() && !y.is_empty(), "{what}: {name} is empty");
        }
    }
}

/// GUI "Export…" and CLI `--out` go through one writer per analysis: for attribution, concepts,
/// heads and consistency, the same settings give the same file names and the same data.
#[test]
fn gui_export_and_cli_out_write_the_same_files() {
    let a = tiny_folder(31, false);
    let b = tiny_folder(32, true);
    let cache = tempfile::tempdir().expect("temp dir");
    std::env::set_var("TUNELENS_CACHE_DIR", cache.path());
    let (path_a, path_b) = (
        a.path().display().to_string(),
        b.path().display().to_string(),
    );
    let words = tiny_words(a.path());
    let words_arg = words.display().to_string();
    let mut harness = harness();
    harness.state_mut().open_path(Slot::A, a.path());
    harness.state_mut().open_path(Slot::B, b.path());
    step_until(&mut harness, "both models", |app| {
        app.slots.iter().all(|s| s.info.is_some())
    });
    harness.state_mut().state.weights.words_file = Some(words.clone());
    let prompt = "write a poem about the sea. keep it short";
    harness.state_mut().state.prompt = prompt.to_owned();
    harness.state_mut().state.chat = false;
    harness.state_mut().state.attribution.max_new_tokens = 6;
    let (pairs, facts) = small_consistency_files(a.path());
    harness.state_mut().state.consistency.pairs_file = Some(pairs.clone());
    harness.state_mut().state.consistency.facts_file = Some(facts.clone());

    let (pairs_arg, facts_arg) = (pairs.display().to_string(), facts.display().to_string());
    let task = tiny_task(a.path());
    small_iv_settings(harness.state_mut(), task.clone());
    let task_arg = task.display().to_string();
    let cases: [(&str, &str, Vec<&str>); 5] = [
        (
            "attribution",
            "Attribute",
            vec![
                "attribute",
                "--prompt",
                prompt,
                "--max-new-tokens",
                "6",
                "--words",
            ],
        ),
        (
            "concepts",
            "Compute concepts",
            vec!["concepts", "--words", &words_arg, "--no-cache"],
        ),
        (
            "heads",
            "Compute head pairs",
            vec!["heads", "--words", &words_arg, "--no-cache"],
        ),
        (
            "consistency",
            "Run consistency",
            vec!["consistency", "--pairs", &pairs_arg, "--facts", &facts_arg],
        ),
        (
            "iv",
            "Find heads",
            vec![
                "iv", "--task", &task_arg, "--n-mean", "6", "--n-ie", "3", "--shots", "3",
                "--n-test", "5",
            ],
        ),
    ];
    for (id, button, cli_args) in cases {
        harness
            .state_mut()
            .push_action(Action::Show(tunelens::ui::state::View::analysis(id)));
        harness.run();
        harness.state_mut().export_note = None;
        harness.get_by_label(button).click();
        step_until(&mut harness, id, |app| {
            assert!(app.last_error.is_none(), "{:?}", app.last_error);
            // The job has ended (a consistency run shows its sections before it ends).
            app.pending.is_empty()
                && app
                    .analyses
                    .iter()
                    .find(|a| a.id() == id)
                    .and_then(|a| a.export_stem(&app.state))
                    .is_some()
        });
        let gui = tempfile::tempdir().expect("temp dir");
        let stem = format!("{id}-export");
        harness
            .state_mut()
            .export_to(&gui.path().join(format!("{stem}.svg")));
        step_until(&mut harness, "the export", |app| {
            assert!(app.last_error.is_none(), "{:?}", app.last_error);
            app.export_note
                .as_deref()
                .is_some_and(|n| n.starts_with("Exported"))
        });
        let cli = tempfile::tempdir().expect("temp dir");
        let out = cli.path().display().to_string();
        let mut args = cli_args.clone();
        args.extend(["--model", &path_a, "--model-b", &path_b, "--out", &out]);
        if id != "attribution" {
            args.extend(["--stem", &stem]);
        }
        let run = crate::common::run_cli(&args);
        assert_eq!(run.code, 0, "{id}: {}", run.stderr);
        if id == "attribution" {
            // The CLI names attribution files by the models and the prompt, as the GUI's
            // default name does: rename the GUI's to compare.
            let cli_stem = std::fs::read_dir(cli.path())
                .expect("cli files")
                .filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .find_map(|n| n.strip_suffix(".json").map(str::to_owned))
                .expect("the CLI's JSON");
            for entry in std::fs::read_dir(gui.path()).expect("gui files") {
                let name = entry
                    .expect("entry")
                    .file_name()
                    .to_string_lossy()
                    .into_owned();
                let renamed = name.replacen(&stem, &cli_stem, 1);
                std::fs::rename(gui.path().join(&name), gui.path().join(renamed)).expect("rename");
            }
        }
        assert_same_files(gui.path(), cli.path(), id);
    }
}

/// Without a working system dialog (no xdg desktop portal) the app draws its own: here forced
/// with `TUNELENS_FILE_DIALOG=builtin`, "Open folder…" shows it, a typed folder is entered, and
/// "Choose folder" loads the model into the slot.
#[test]
fn builtin_file_dialog_opens_a_model_folder() {
    std::env::set_var("TUNELENS_FILE_DIALOG", "builtin");
    let a = tiny_folder(51, false);
    let mut harness = harness();
    harness
        .query_all_by_label("Open folder…")
        .next()
        .expect("slot A's Open folder…")
        .click();
    harness.run_steps(3);
    assert!(
        harness.state().browser.is_some(),
        "the built-in dialog is open"
    );
    harness.get_by_label("Open a Hugging Face model folder");
    harness.get_by_label("Go to").click();
    harness.run_steps(2);
    harness
        .get_by_label("Go to")
        .type_text(&a.path().display().to_string());
    harness.key_press(eframe::egui::Key::Enter);
    harness.run_steps(3);
    let dir = harness.state().browser.as_ref().map(|b| b.2.dir.clone());
    assert_eq!(dir.as_deref(), Some(a.path()), "the typed folder is shown");
    harness.get_by_label("config.json");
    harness.get_by_label("Choose folder").click();
    step_until(&mut harness, "the model from the built-in dialog", |app| {
        app.slots[0].info.is_some()
    });
    assert!(harness.state().browser.is_none(), "the dialog closed");
    assert!(harness.state().last_error.is_none());
}

/// Consistency runs a researcher can plan: a check box per measure, and only the chosen ones
/// run; with none chosen the button is disabled.
#[test]
fn consistency_runs_only_the_measures_checked() {
    let a = tiny_folder(71, false);
    let mut harness = harness();
    harness.state_mut().open_path(Slot::A, a.path());
    step_until(&mut harness, "the model", |app| app.slots[0].info.is_some());
    let pairs = a.path().join("pairs.tsv");
    std::fs::write(
        &pairs,
        "the cat sat on the mat\ta cat sat on the mat\t1\nthe sea is warm\tthe sea is cold\t0\n",
    )
    .expect("pairs");
    harness
        .state_mut()
        .push_action(Action::Show(tunelens::ui::state::View::analysis(
            "consistency",
        )));
    harness.state_mut().state.consistency.pairs_file = Some(pairs);
    harness.run_steps(2);
    for measure in [
        "Predictions (§8)",
        "Accuracy across instructions (§8.4, slower)",
        "Attribute and extraction rates (§9)",
    ] {
        harness.get_by_label(measure).click();
        harness.run_steps(1);
    }
    let c = &harness.state().state.consistency;
    assert!(c.representations && !c.predictions && !c.spread && !c.recall);
    harness.get_by_label("Run consistency").click();
    step_until(&mut harness, "consistency", |app| {
        app.pending.is_empty()
            && app
                .view::<ConsistencyView>()
                .is_some_and(|v| v.result.is_some())
    });
    let result = &harness
        .state()
        .view::<ConsistencyView>()
        .and_then(|v| v.result.as_ref())
        .expect("result")
        .results[0];
    assert!(result.representations.is_some(), "§7 ran");
    assert!(
        result.predictions.is_none() && result.spread.is_none() && result.recall.is_none(),
        "the unchecked measures did not run"
    );
    harness.get_by_label("Representations (§7)").click();
    harness.run_steps(2);
    assert!(
        harness
            .get_by_label("Run consistency")
            .accesskit_node()
            .is_disabled(),
        "no measure, no run"
    );
}

/// A tiny in-context task in the tiny vocabulary, written to `dir`.
fn tiny_task(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("shift7.json");
    std::fs::write(&path, tunelens::model::tiny::tiny_icl_task_json()).expect("task");
    path
}

fn small_iv_settings(app: &mut TunelensApp, task: std::path::PathBuf) {
    let s = &mut app.state.iv;
    s.shipped.clear();
    s.task_files = vec![task];
    s.n_mean = 6;
    s.n_ie = 3;
    s.shots = 3;
    s.n_test = 5;
}

/// The Instruction vector view on A and B: find the heads, see both AIE grids, the shared
/// heads, the accuracy plot; save B's vector; steer the Prompt view's generation with it.
#[test]
fn instruction_vector_view_finds_heads_saves_and_steers() {
    let a = tiny_folder(61, false);
    let b = tiny_folder(62, false);
    let mut harness = harness();
    harness.state_mut().open_path(Slot::A, a.path());
    harness.state_mut().open_path(Slot::B, b.path());
    step_until(&mut harness, "both models", |app| {
        app.slots.iter().all(|s| s.info.is_some())
    });
    harness.get_by_label("Instruction vector").click();
    harness.run();
    let task = tiny_task(a.path());
    small_iv_settings(harness.state_mut(), task);
    harness.run();
    harness.get_by_label("shift7.json");
    harness.get_by_label("Find heads").click();
    step_until(&mut harness, "instruction vectors", |app| {
        assert!(app.last_error.is_none(), "{:?}", app.last_error);
        app.view::<IvView>().is_some_and(|v| v.result.is_some())
    });
    harness.get_by_label("AIE A");
    harness.get_by_label("AIE B");
    harness.get_by_label_contains("A and B share");
    harness.get_by_label("Zero-shot accuracy by edit layer");
    assert!(harness.query_all_by_label_contains("|IV|").count() == 2);
    // Save B's vector (the dialog's answer given directly), then steer with it.
    harness.get_by_label("B").scroll_to_me();
    harness.run();
    harness.get_by_label("B").click();
    harness.run();
    let out = tempfile::tempdir().expect("temp dir");
    let path = out.path().join("iv_b.safetensors");
    harness.state_mut().picked(
        Slot::A,
        tunelens::ui::dialogs::DialogKind::IvSave,
        path.clone(),
    );
    step_until(&mut harness, "the saved vector", |app| {
        assert!(app.last_error.is_none(), "{:?}", app.last_error);
        app.export_note
            .as_deref()
            .is_some_and(|n| n.starts_with("Saved the vector"))
    });
    assert!(out.path().join("iv_b.json").exists());
    let saved = tunelens::ivfile::load(&path).expect("loads");
    let result = harness
        .state()
        .view::<IvView>()
        .and_then(|v| v.result.clone())
        .expect("result");
    assert_eq!(saved.vector, result.results[1].run.tasks[0].iv);

    harness
        .state_mut()
        .picked(Slot::A, tunelens::ui::dialogs::DialogKind::IvFile, path);
    harness.get_by_label("Prompt").click();
    harness.run();
    harness.get_by_label("iv_b.safetensors");
    {
        let app = harness.state_mut();
        app.state.prompt = "the cat".to_owned();
        app.state.chat = false;
        app.state.gen.max_new_tokens = 4;
        app.state.steer.scale = 50.0;
    }
    harness.run();
    harness.get_by_label("Generate").click();
    step_until(&mut harness, "steered responses", |app| {
        !app.is_generating() && app.responses.iter().all(|r| r.stop_reason.is_some())
    });
    assert!(
        harness.state().last_error.is_none(),
        "{:?}",
        harness.state().last_error
    );
    assert!(
        harness
            .query_all_by_label_contains("steered with the shift7 vector")
            .count()
            == 2
    );
}

/// Consistency sections arrive one by one: a partial result after each measure of each model,
/// growing, before the final output.
#[test]
fn consistency_sections_arrive_as_they_finish() {
    use tunelens::worker::consistency::{ConsistencySettings, Measures};
    use tunelens::worker::{run_job, Event, Job, JobOutput, WorkerCtx};
    let dir = tempfile::tempdir().expect("temp dir");
    let (pairs, facts) = small_consistency_files(dir.path());
    let mut ctx = WorkerCtx {
        a: Some(crate::common::tiny(71)),
        b: Some(crate::common::tiny(72)),
        ..WorkerCtx::default()
    };
    let settings = ConsistencySettings {
        pairs: Some(pairs),
        facts: Some(facts),
        measures: Measures {
            representations: true,
            predictions: true,
            spread: false,
            recall: false,
        },
        ..ConsistencySettings::default()
    };
    let mut partial: Vec<(usize, bool, bool)> = Vec::new();
    let out = run_job(
        &mut ctx,
        1,
        Job::Consistency {
            slots: vec![Slot::A, Slot::B],
            settings,
        },
        &mut |event| {
            if let Event::Partial {
                output: JobOutput::Consistency(o),
                ..
            } = event
            {
                let last = o.results.last().expect("a model");
                partial.push((
                    o.results.len(),
                    last.representations.is_some(),
                    last.predictions.is_some(),
                ));
            }
        },
    )
    .expect("consistency runs");
    assert!(matches!(out, JobOutput::Consistency(_)));
    assert_eq!(
        partial,
        vec![
            (1, true, false),
            (1, true, true),
            (2, true, false),
            (2, true, true)
        ]
    );
}

/// The Fine-tune view's §5 panel as a person uses it: choose IV-guided training and a saved
/// vector, build a two-stage plan (plain, then guided), run it, evaluate forgetting on a set,
/// read the table, export curves and table.
#[test]
fn finetune_view_runs_guided_stages_and_evaluates_forgetting() {
    use tunelens::ui::dialogs::DialogKind;
    use tunelens::worker::{run_job, Job, JobOutput, WorkerCtx};

    let a = tiny_folder(21, false);
    let work = tempfile::tempdir().expect("temp dir");
    // A saved vector of the tiny architecture, as the Instruction vector view writes it.
    let task = work.path().join("shift7.json");
    std::fs::write(&task, tunelens::model::tiny::tiny_icl_task_json()).expect("task");
    let mut config = tunelens::analysis::iv::IvConfig::todd();
    (config.shots, config.mean_shots, config.n_mean, config.n_ie) = (3, 3, 6, 3);
    config.evaluate = false;
    let mut ctx = WorkerCtx {
        a: Some(crate::common::tiny(3)),
        ..WorkerCtx::default()
    };
    let settings = tunelens::worker::iv::IvSettings {
        tasks: vec![tunelens::worker::iv::TaskSource::File(task)],
        config,
    };
    let Ok(JobOutput::InstructionVectors(out)) = run_job(
        &mut ctx,
        1,
        Job::InstructionVectors {
            slots: vec![Slot::A],
            settings,
        },
        &mut |_| {},
    ) else {
        panic!("the vector");
    };
    let iv = work.path().join("shift7.iv.safetensors");
    run_job(
        &mut ctx,
        2,
        Job::SaveIv {
            output: out,
            model: 0,
            task: 0,
            path: iv.clone(),
        },
        &mut |_| {},
    )
    .expect("saved");
    let data = work.path().join("train.jsonl");
    let mut lines = String::new();
    for (q, r) in [
        ("translate cat to french", "the cat sat on the mat ."),
        ("what is the capital of france", "paris"),
        ("write a poem about the sea", "the sea is blue and cold ."),
    ] {
        lines.push_str(&serde_json::json!({"instruction": q, "output": r}).to_string());
        lines.push('\n');
    }
    std::fs::write(&data, lines).expect("data");
    let set = work.path().join("general_tiny.json");
    std::fs::write(
        &set,
        r#"[{"input": "the cat sat on the", "output": "mat"}, {"input": "the capital of france is", "output": "paris"}]"#,
    )
    .expect("set");

    let mut harness = harness();
    harness.state_mut().open_path(Slot::A, a.path());
    step_until(&mut harness, "the model", |app| app.slots[0].info.is_some());
    harness.get_by_label("Fine-tune").click();
    harness.run();
    {
        let f = &mut harness.state_mut().state.finetune;
        f.data_file = Some(data.clone());
        f.out_dir = Some(work.path().join("stages"));
        f.settings.steps = 3;
        f.settings.batch_size = 2;
        f.settings.eval_every = 0;
        f.settings.save_every = 0;
    }
    harness.run();
    // Stage 1: plain LoRA.
    harness.get_by_label("Continual stages (0)").click();
    harness.run();
    harness
        .get_by_label("Add stage from the settings above")
        .click();
    harness.run();
    // Stage 2: IV-guided (code), with the saved vector.
    harness.get_by_label("IV-guided (code)").scroll_to_me();
    harness.run();
    harness.get_by_label("IV-guided (code)").click();
    harness.run();
    harness
        .state_mut()
        .picked(Slot::A, DialogKind::GuidanceIv, iv.clone());
    harness.state_mut().state.finetune.guidance.layer = 1;
    harness.run();
    harness.get_by_label_contains("shift7, made with");
    harness
        .get_by_label("Add stage from the settings above")
        .click();
    harness.run();
    let stages = &harness.state().state.finetune.stages;
    assert_eq!(stages.len(), 2);
    assert!(stages[0].settings.guidance.is_none());
    assert_eq!(
        stages[1]
            .settings
            .guidance
            .as_ref()
            .map(|g| g.iv_path.clone()),
        Some(iv.clone())
    );
    harness.get_by_label("Run stages").scroll_to_me();
    harness.run();
    harness.get_by_label("Run stages").click();
    step_until(&mut harness, "the stages", |app| {
        assert!(app.last_error.is_none(), "{:?}", app.last_error);
        app.view::<FinetuneView>()
            .and_then(|v| v.stages_result.as_ref())
            .is_some()
    });
    let out = harness
        .state()
        .view::<FinetuneView>()
        .and_then(|v| v.stages_result.clone())
        .expect("stages");
    assert_eq!(out.combined.len(), 2);
    assert_eq!(training(harness.state()).terms, ["ce", "kl1", "kl2", "pr"]);
    harness.get_by_label_contains("after stage 2");
    harness.get_by_label("Raw guidance terms");

    harness
        .state_mut()
        .picked(Slot::A, DialogKind::EvalSet, set);
    harness.run();
    harness.get_by_label("Evaluate forgetting").scroll_to_me();
    harness.run();
    harness.get_by_label("Evaluate forgetting").click();
    step_until(&mut harness, "the evaluation", |app| {
        assert!(app.last_error.is_none(), "{:?}", app.last_error);
        app.view::<FinetuneView>()
            .and_then(|v| v.forgetting.as_ref())
            .is_some()
    });
    let report = harness
        .state()
        .view::<FinetuneView>()
        .and_then(|v| v.forgetting.clone())
        .expect("report");
    assert_eq!(report.models.len(), 3);
    assert_eq!(report.models[1].label, "1 train");
    harness.get_by_label("Δ general");
    harness.get_by_label("base");
    harness.get_by_label("Score (%)");
    harness.get_by_label("Answer probability (%)");

    let export = tempfile::tempdir().expect("temp dir");
    harness
        .state_mut()
        .export_to(&export.path().join("training.svg"));
    step_until(&mut harness, "the export", |app| {
        app.export_note
            .as_deref()
            .is_some_and(|n| n.starts_with("Exported"))
    });
    for name in [
        "training.svg",
        "training_curves.csv",
        "training_forgetting.svg",
        "training_forgetting.png",
        "training_forgetting.csv",
        "training_forgetting_sets.csv",
        "training_forgetting.json",
    ] {
        let len = std::fs::metadata(export.path().join(name)).map_or(0, |m| m.len());
        assert!(len > 50, "{name}: {len} bytes");
    }
}

/// The Knowledge view: the base model against itself (rho = 1), then against another tuned
/// model (a second run kept beside the first); the tables and the partial-correlation line;
/// its export equals `tunelens knowledge --out` with the same models and settings.
#[test]
fn knowledge_view_keeps_runs_and_exports_what_the_cli_writes() {
    let a = tiny_folder(91, false);
    let b = tiny_folder(92, false);
    let questions = a.path().join("animals_test.csv");
    std::fs::write(
        &questions,
        "the cat sat on the,mat,sea,tree,A\nthe dog is,big,small,warm,B\nthe sea is,blue,red,cold,A\n",
    )
    .expect("questions");
    let mut harness = harness();
    harness.state_mut().open_path(Slot::A, a.path());
    harness.state_mut().open_path(Slot::B, a.path());
    step_until(&mut harness, "both models", |app| {
        app.slots.iter().all(|s| s.info.is_some())
    });
    harness.get_by_label("Knowledge").click();
    harness.run();
    harness.get_by_label("capital");
    {
        let s = &mut harness.state_mut().state.knowledge;
        s.shipped.clear();
        s.shots = 1;
        s.labels = "red,blue,green".to_owned();
        s.template = tunelens::analysis::knowledge::TunedTemplate::Base;
    }
    harness.state_mut().picked(
        Slot::A,
        tunelens::ui::dialogs::DialogKind::QuestionFile,
        questions.clone(),
    );
    harness.run();
    harness.get_by_label("animals_test.csv");
    harness.get_by_label("Compare knowledge").click();
    step_until(&mut harness, "the first run", |app| {
        assert!(app.last_error.is_none(), "{:?}", app.last_error);
        app.view::<KnowledgeView>()
            .is_some_and(|v| v.runs.len() == 1)
    });
    let first = harness.state().view::<KnowledgeView>().expect("view").runs[0].clone();
    assert!((first.overall.rho - 1.0).abs() < 1e-9);
    assert!(first.overall.kl.abs() < 1e-9);
    harness.get_by_label_contains("Partial correlation: needs at least 3");
    harness.get_by_label("Tuned acc");
    // Another tuned model in B, run again: both runs are kept.
    harness.state_mut().open_path(Slot::B, b.path());
    step_until(&mut harness, "model B", |app| {
        app.slots[1]
            .info
            .as_ref()
            .is_some_and(|i| i.source.contains(&b.path().display().to_string()))
    });
    harness.get_by_label("Compare knowledge").click();
    step_until(&mut harness, "the second run", |app| {
        assert!(app.last_error.is_none(), "{:?}", app.last_error);
        app.view::<KnowledgeView>()
            .is_some_and(|v| v.runs.len() == 2)
    });
    assert!(
        harness.state().view::<KnowledgeView>().expect("view").runs[1]
            .overall
            .kl
            > 0.0
    );

    let gui = tempfile::tempdir().expect("temp dir");
    harness
        .state_mut()
        .export_to(&gui.path().join("knowledge-export.svg"));
    step_until(&mut harness, "the export", |app| {
        assert!(app.last_error.is_none(), "{:?}", app.last_error);
        app.export_note
            .as_deref()
            .is_some_and(|n| n.starts_with("Exported"))
    });
    let cli = tempfile::tempdir().expect("temp dir");
    let (path_a, path_b) = (
        a.path().display().to_string(),
        b.path().display().to_string(),
    );
    let (q, out) = (
        questions.display().to_string(),
        cli.path().display().to_string(),
    );
    let run = crate::common::run_cli(&[
        "knowledge",
        "--model",
        &path_a,
        "--model-b",
        &path_a,
        "--model-b",
        &path_b,
        "--questions",
        &q,
        "--shots",
        "1",
        "--labels",
        "red,blue,green",
        "--tuned-template",
        "base",
        "--out",
        &out,
        "--stem",
        "knowledge-export",
    ]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    for name in [
        "knowledge-export_questions.csv",
        "knowledge-export_subjects.csv",
    ] {
        let x = std::fs::read_to_string(gui.path().join(name)).expect("gui file");
        let y = std::fs::read_to_string(cli.path().join(name)).expect("cli file");
        assert_eq!(x, y, "{name} differs");
    }
    for ext in ["svg", "png", "json"] {
        assert!(gui.path().join(format!("knowledge-export.{ext}")).exists());
        assert!(cli.path().join(format!("knowledge-export.{ext}")).exists());
    }
    // Clear runs empties the view.
    harness.get_by_label("Clear runs").click();
    harness.run();
    assert!(harness
        .state()
        .view::<KnowledgeView>()
        .is_some_and(|v| v.runs.is_empty()));
}

#[test]
fn token_shift_view_colours_tokens_keeps_runs_lenses_explains_and_exports() {
    let a = tiny_folder(93, false);
    let b = tiny_folder(94, false);
    // AlignTDS records whose templated input is the raw prompt: with the raw base template,
    // the same model on both sides sees the same context, so nothing can shift.
    let data = a.path().join("responses.json");
    std::fs::write(
        &data,
        r#"[{"id": "r1", "pure_input": "the cat sat on", "input": "the cat sat on", "output": ["the mat and the dog ran"]},
            {"id": "r2", "pure_input": "the sea is", "input": "the sea is", "output": ["warm and the sky is blue"]}]"#,
    )
    .expect("data");
    let mut harness = harness();
    harness.state_mut().open_path(Slot::A, a.path());
    harness.state_mut().open_path(Slot::B, a.path());
    step_until(&mut harness, "both models", |app| {
        app.slots.iter().all(|s| s.info.is_some())
    });
    // Live mode: B's tokens get their class as they stream in the Prompt view.
    harness.get_by_label("Prompt").click();
    harness.run();
    harness.get_by_label("Live token shift").click();
    harness.state_mut().state.prompt = "the cat sat on".to_owned();
    harness.state_mut().state.chat = false;
    harness.state_mut().state.gen.max_new_tokens = 5;
    harness.run();
    harness.get_by_label("Generate").click();
    step_until(&mut harness, "the live generation", |app| {
        assert!(app.last_error.is_none(), "{:?}", app.last_error);
        !app.is_generating() && app.responses[1].tokens > 0
    });
    {
        let b = &harness.state().responses[1];
        assert_eq!(b.shifts.len(), b.tokens);
        assert!(b.shifts.iter().all(Option::is_some));
        assert!(harness.state().responses[0].shifts.is_empty());
    }
    harness.get_by_label("Token shift").click();
    harness.run();
    harness.state_mut().picked(
        Slot::A,
        tunelens::ui::dialogs::DialogKind::ShiftData,
        data.clone(),
    );
    harness.run();
    harness.get_by_label("responses.json");
    harness.get_by_label("Raw prompt").click();
    harness.run();
    harness.get_by_label("Measure shift").click();
    step_until(&mut harness, "the first run", |app| {
        assert!(app.last_error.is_none(), "{:?}", app.last_error);
        app.view::<ShiftView>().is_some_and(|v| v.runs.len() == 1)
    });
    {
        let view = harness.state().view::<ShiftView>().expect("view");
        let s = &view.runs[0].summary;
        assert!(s.positions > 0);
        assert_eq!(s.counts, [s.positions, 0, 0], "the same model never shifts");
    }
    // Another model in B: a second run, kept beside the first.
    harness.state_mut().open_path(Slot::B, b.path());
    step_until(&mut harness, "model B", |app| {
        app.slots[1]
            .info
            .as_ref()
            .is_some_and(|i| i.source.contains(&b.path().display().to_string()))
    });
    harness.get_by_label("Measure shift").click();
    step_until(&mut harness, "the second run", |app| {
        assert!(app.last_error.is_none(), "{:?}", app.last_error);
        app.view::<ShiftView>().is_some_and(|v| v.runs.len() == 2)
    });
    let second = harness.state().view::<ShiftView>().expect("view").runs[1].clone();
    assert!(second.summary.counts[0] < second.summary.positions);
    harness.get_by_label("Most shifted tokens of run 2");
    // Click a token: both top-10 tables, then the lens of both models there.
    let piece = second.items[0].shift.pieces[1].clone();
    harness.get_by_label(&piece).scroll_to_me();
    harness.run();
    harness.get_by_label(&piece).click();
    harness.run();
    harness.get_by_label("B (tuned) top 10");
    harness.get_by_label("Lens at this token").scroll_to_me();
    harness.run();
    harness.get_by_label("Lens at this token").click();
    step_until(&mut harness, "the lens", |app| {
        assert!(app.last_error.is_none(), "{:?}", app.last_error);
        app.view::<ShiftView>().is_some_and(|v| v.lens.is_some())
    });
    {
        let view = harness.state().view::<ShiftView>().expect("view");
        let (_, lens) = view.lens.as_ref().expect("lens");
        assert_eq!(lens.curves.len(), 2);
        // B's token is B's response token at that position.
        assert_eq!(
            lens.curves[1].2.target_id,
            second.items[0].shift.aligned_ids[1]
        );
    }
    // Export: what `tunelens shift --out` writes for the same runs.
    let gui = tempfile::tempdir().expect("temp dir");
    harness
        .state_mut()
        .export_to(&gui.path().join("shift-export.svg"));
    step_until(&mut harness, "the export", |app| {
        assert!(app.last_error.is_none(), "{:?}", app.last_error);
        app.export_note
            .as_deref()
            .is_some_and(|n| n.starts_with("Exported"))
    });
    for name in [
        "shift-export.html",
        "shift-export_lens.csv",
        "shift-export.png",
    ] {
        assert!(gui.path().join(name).exists(), "{name}");
    }
    let cli = tempfile::tempdir().expect("temp dir");
    let (path_a, path_b) = (
        a.path().display().to_string(),
        b.path().display().to_string(),
    );
    let (d, out) = (data.display().to_string(), cli.path().display().to_string());
    let run = crate::common::run_cli(&[
        "shift",
        "--model",
        &path_a,
        "--model-b",
        &path_a,
        "--model-b",
        &path_b,
        "--data",
        &d,
        "--base-template",
        "raw",
        "--max-items",
        "20",
        "--out",
        &out,
        "--stem",
        "shift-export",
    ]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    for name in [
        "shift-export_ratios.csv",
        "shift-export_positions.csv",
        "shift-export_tokens.csv",
        "shift-export_by_position.csv",
        "shift-export_relative.csv",
    ] {
        let x = std::fs::read_to_string(gui.path().join(name)).expect("gui file");
        let y = std::fs::read_to_string(cli.path().join(name)).expect("cli file");
        assert_eq!(x, y, "{name} differs");
    }
    // Explain this token: the Attribution view, on the response up to the token.
    harness.get_by_label("Explain this token").scroll_to_me();
    harness.run();
    harness.get_by_label("Explain this token").click();
    // The click starts an attribution job, which keeps frames coming until it ends: step,
    // not run (run fails when the job outlasts its step budget on a slow machine).
    harness.step();
    assert_eq!(
        harness.state().state.attribution.response,
        second.items[0].shift.pieces[..=1].concat()
    );
    assert!(harness.state().state.attribution.pin_response);
    step_until(&mut harness, "the attribution", |app| {
        app.last_error.is_some() || attribution(app).is_some()
    });
    // Clear runs empties the view.
    harness.state_mut().state.view = tunelens::ui::state::View::analysis("shift");
    harness.run();
    harness.get_by_label("Clear runs").scroll_to_me();
    harness.run();
    harness.get_by_label("Clear runs").click();
    harness.run();
    assert!(harness
        .state()
        .view::<ShiftView>()
        .is_some_and(|v| v.runs.is_empty()));
}

/// A base checkpoint without a chat template (the tiny Gemma 3 written by transformers) in A and
/// B: the Chat-template box goes off, the Knowledge view asks the tuned model in the Vicuna
/// template and the Fine-tune view trains on the §5.1 template, so no first run fails on it.
#[test]
fn a_model_without_a_chat_template_switches_the_chat_options_off() {
    let folder = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/families/gemma3");
    let mut harness = harness();
    harness.state_mut().state.chat = true;
    harness.state_mut().open_path(Slot::A, &folder);
    step_until(&mut harness, "slot A", |app| app.slots[0].info.is_some());
    harness.state_mut().open_path(Slot::B, &folder);
    step_until(&mut harness, "slot B", |app| app.slots[1].info.is_some());
    assert!(!harness.state().state.chat);
    for view in ["knowledge", "finetune"] {
        harness.state_mut().state.view = tunelens::ui::state::View::analysis(view);
        harness.run();
    }
    let state = &harness.state().state;
    assert_eq!(
        state.knowledge.template,
        tunelens::analysis::knowledge::TunedTemplate::Vicuna
    );
    assert_eq!(
        state.finetune.template,
        tunelens::train::dataset::PromptTemplate::Definition
    );
}

/// Issue: 7B pairs in memory. "Weights in memory: as stored" in the Models view applies to the
/// next load; the slot then says how its weights are held and how much memory they take.
#[test]
fn models_view_keeps_weights_as_stored_and_shows_resident_memory() {
    let mut harness = harness();
    harness.state_mut().state.view = tunelens::ui::state::View::Models;
    harness.run();
    harness.get_by_label("Weights in memory:");
    harness.get_by_label("as stored").click();
    harness.run();
    assert_eq!(
        harness.state().state.weight_storage,
        tunelens::model::WeightStorage::Stored
    );
    harness.state_mut().open_path(Slot::A, &demo_model_path());
    step_until(&mut harness, "the demo model", |app| {
        app.slots[0].info.is_some()
    });
    let info = harness.state().slots[0].info.clone().expect("loaded");
    assert_eq!(info.dtype, "as stored (Q4_1, Q8_0)");
    assert!(info.weight_bytes < 100 << 20, "{}", info.weight_bytes);
    harness.get_by_label_contains("as stored (Q4_1, Q8_0)");
    harness.get_by_label("Resident");
    harness.get_by_label_contains("MiB of weights");
}
