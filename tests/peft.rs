//! Adapters interchange with Python's PEFT on the demo model, both directions. Needs the peer
//! venv (`bash ../shared/bench/peers/setup_peer.sh .peer-venv models`); skipped with a printed
//! reason otherwise (CI does not install PyTorch).

use std::path::Path;
use std::process::Command;

use candle_core::Tensor;
use tunelens::model::adapter::attach_peft_adapter;
use tunelens::model::{load, LoadOptions, ModelSpec};
use tunelens::train::checkpoint::write_peft_adapter;
use tunelens::train::lora_trainer::{TrainSettings, Trainer};

use crate::common::demo_model_path;

fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f64 {
    a.iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(x, y)| f64::from((x - y).abs()))
        .fold(0.0, f64::max)
}

fn delta(a: &[Vec<f32>], base: &[Vec<f32>]) -> Vec<Vec<f32>> {
    a.iter()
        .zip(base)
        .map(|(r, b)| r.iter().zip(b).map(|(x, y)| x - y).collect())
        .collect()
}

#[test]
fn adapters_round_trip_with_python_peft() -> anyhow::Result<()> {
    let python = Path::new(".peer-venv/bin/python");
    if !python.exists() {
        eprintln!("skipped: no peer venv at .peer-venv (bash ../shared/bench/peers/setup_peer.sh .peer-venv models)");
        return Ok(());
    }
    let gguf = demo_model_path();
    let loaded = load(
        &ModelSpec::parse(&gguf.display().to_string()),
        &LoadOptions::default(),
    )?;
    let ids: Vec<u32> = vec![1, 504, 3575, 282, 4649, 314, 7042, 30, 378, 2644];
    let input = Tensor::new(ids.as_slice(), &candle_core::Device::Cpu)?.unsqueeze(0)?;
    let ours_base = loaded.model.forward(&input)?.squeeze(0)?.to_vec2::<f32>()?;

    // tunelens -> PEFT: fresh adapters with B set to non-zero values.
    let mut settings = TrainSettings::default();
    settings.lora.targets = ["q_proj", "k_proj", "v_proj", "up_proj"]
        .map(str::to_owned)
        .to_vec();
    let example = tunelens::train::dataset::Example {
        line: 1,
        ids: ids.clone(),
        is_label: vec![true; ids.len()],
        truncated: false,
    };
    let trainer = Trainer::new(loaded.model.clone(), settings, vec![example], vec![], 0)?;
    for (i, p) in trainer.params().iter().enumerate() {
        let shape = p.b.dims().to_vec();
        let n: usize = shape.iter().product();
        #[allow(clippy::cast_precision_loss)]
        let values: Vec<f32> = (0..n)
            .map(|j| ((((i * 131 + j * 17) % 29) as f32) - 14.0) * 0.002)
            .collect();
        p.b.set(&Tensor::from_vec(values, shape, p.b.device())?)?;
    }
    let ours_adapted = trainer
        .model()
        .forward(&input)?
        .squeeze(0)?
        .to_vec2::<f32>()?;
    let dir = tempfile::tempdir()?;
    let ours_dir = dir.path().join("ours");
    std::fs::create_dir_all(&ours_dir)?;
    write_peft_adapter(&ours_dir, &trainer, &gguf.display().to_string())?;
    let theirs_dir = dir.path().join("theirs");
    let out = dir.path().join("peft.json");
    let ids_arg: Vec<String> = ids.iter().map(ToString::to_string).collect();
    let status = Command::new(python)
        .args(["tests/peft/compat.py", "--gguf"])
        .arg(&gguf)
        .arg("--ours")
        .arg(&ours_dir)
        .arg("--theirs")
        .arg(&theirs_dir)
        .args(["--ids", &ids_arg.join(","), "--out"])
        .arg(&out)
        .env("HF_HUB_OFFLINE", "1")
        .env("TRANSFORMERS_OFFLINE", "1")
        .status()?;
    assert!(status.success(), "the PEFT script failed");
    let peft: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out)?)?;
    let rows =
        |key: &str| -> Vec<Vec<f32>> { serde_json::from_value(peft[key].clone()).expect(key) };
    let (peft_base, peft_ours, peft_theirs) =
        (rows("base"), rows("ours_in_peft"), rows("theirs_in_peft"));

    // PEFT -> tunelens.
    let mut fresh = loaded.model.clone();
    let info = attach_peft_adapter(&mut fresh, &theirs_dir)?;
    assert_eq!(info.rank, 4);
    let ours_theirs = fresh.forward(&input)?.squeeze(0)?.to_vec2::<f32>()?;

    let base_diff = max_diff(&ours_base, &peft_base);
    let a = max_diff(&ours_adapted, &peft_ours);
    let b = max_diff(&ours_theirs, &peft_theirs);
    let da = max_diff(
        &delta(&ours_adapted, &ours_base),
        &delta(&peft_ours, &peft_base),
    );
    let db = max_diff(
        &delta(&ours_theirs, &ours_base),
        &delta(&peft_theirs, &peft_base),
    );
    let effect = max_diff(&ours_adapted, &ours_base).min(max_diff(&ours_theirs, &ours_base));
    eprintln!(
        "PEFT compatibility: base logits differ by {base_diff:.2e}; tunelens adapter in PEFT {a:.2e} \
         (adapter effect {da:.2e}); PEFT adapter in tunelens {b:.2e} (adapter effect {db:.2e}); \
         the adapters move logits by at least {effect:.2e}"
    );
    assert!(effect > 1e-2, "the adapters must change the logits");
    // Each effect is a difference of two logit vectors, each ~base_diff (6e-5 here) away from
    // PyTorch's by summation order alone, so the effects may differ by about twice that.
    let effect_tol = 2.0 * base_diff.max(5e-5) + 1e-5;
    assert!(
        da < effect_tol && db < effect_tol,
        "adapter effects differ: {da:.2e}, {db:.2e} (tolerance {effect_tol:.2e})"
    );
    assert!(a < base_diff + 1e-4 && b < base_diff + 1e-4);
    Ok(())
}
