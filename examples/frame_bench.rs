//! UI frame times while the demo model generates: drives the real app headless (egui_kittest)
//! and times each frame on the UI thread (event ingestion, layout, drawing). Model work runs on
//! the worker thread, so frames must stay far below 16 ms. Prints JSON; run through `scripts/bench`.

use std::time::{Duration, Instant};

use egui_kittest::Harness;
use tunelens::ui::actions::Action;
use tunelens::ui::state::View;
use tunelens::ui::TunelensApp;
use tunelens::worker::Slot;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn main() -> anyhow::Result<()> {
    tunelens::model::configure_cpu_threads();
    let model = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "models/SmolLM2-135M-Instruct.Q4_1.gguf".to_owned());
    let mut harness = Harness::builder()
        .with_size(eframe::egui::vec2(1280.0, 820.0))
        .build_eframe(|cc| {
            TunelensApp::new(cc, tunelens::ui::StartOptions::default()).expect("app starts")
        });
    harness
        .state_mut()
        .open_path(Slot::A, std::path::Path::new(&model));
    let deadline = Instant::now() + Duration::from_secs(60);
    while harness.state().slots[0].info.is_none() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "model did not load: {:?}",
            harness.state().last_error
        );
        harness.step();
        std::thread::sleep(Duration::from_millis(10));
    }
    harness.state_mut().push_action(Action::Show(View::Prompt));
    harness.state_mut().state.gen.max_new_tokens = 96;
    "Write a short story about a lighthouse keeper."
        .clone_into(&mut harness.state_mut().state.prompt);
    harness.state_mut().push_action(Action::Generate);
    let mut frames = Vec::new();
    let started = Instant::now();
    // Frames at ~60 Hz while tokens stream in.
    while harness.state().is_generating() {
        let t = Instant::now();
        harness.step();
        frames.push(t.elapsed().as_secs_f64() * 1e3);
        std::thread::sleep(Duration::from_millis(16));
    }
    let tokens = harness.state().responses[0].tokens;
    let mut sorted = frames.clone();
    sorted.sort_by(f64::total_cmp);
    let report = serde_json::json!({
        "frames": frames.len(),
        "tokens": tokens,
        "generation_s": started.elapsed().as_secs_f64(),
        "frame_ms_p50": percentile(&sorted, 50.0),
        "frame_ms_p99": percentile(&sorted, 99.0),
        "frame_ms_max": sorted.last().copied(),
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
