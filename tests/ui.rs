//! The desktop app driven headless with egui_kittest: open models through the dialog's code
//! path, type a prompt, generate, stop, fail to load, swap.

use std::time::{Duration, Instant};

use egui_kittest::kittest::Queryable as _;
use egui_kittest::Harness;
use tunelens::model::generate::StopReason;
use tunelens::model::tiny::{tiny_config, write_tiny_hf_folder};
use tunelens::ui::app::Action;
use tunelens::ui::TunelensApp;
use tunelens::worker::Slot;

use crate::common::demo_model_path;

fn harness() -> Harness<'static, TunelensApp> {
    Harness::builder()
        .with_size(eframe::egui::vec2(1280.0, 820.0))
        .build_eframe(|cc| TunelensApp::new(cc, None, None).expect("app starts"))
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
    // Still working: a good model loads, and the error can be dismissed.
    let good = tiny_folder(1, false);
    harness.state_mut().open_path(Slot::A, good.path());
    step_until(&mut harness, "the good model", |app| {
        app.slots[0].info.is_some()
    });
    harness.get_by_label("×").click();
    harness.run();
    assert!(harness.state().last_error.is_none());
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
