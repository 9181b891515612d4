//! Writes one IV-guided step of the demo model for the PyTorch reference check
//! (`scripts/check-guided`, `bench/guided_torch.py`): the examples, the vector and its heads,
//! the adapter before the step (PEFT folder), and tunelens's loss terms and adapter gradients.
//!
//! `cargo run --release --example guided_reference -- IV.safetensors OUT_DIR`

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::Context as _;
use candle_core::{Device, Tensor};
use tunelens::model::{load, LoadOptions, ModelSpec};
use tunelens::train::checkpoint::write_peft_adapter;
use tunelens::train::dataset::{self, PromptTemplate, Renderer, SplitOptions};
use tunelens::train::guidance::{last_prompt_position, Guidance};
use tunelens::train::lora_trainer::{TrainSettings, Trainer};
use tunelens::train::settings::GuidanceSettings;

fn main() -> anyhow::Result<()> {
    tunelens::model::configure_cpu_threads();
    let mut args = std::env::args().skip(1);
    let iv_path = PathBuf::from(args.next().context("IV.safetensors")?);
    let out = PathBuf::from(args.next().context("OUT_DIR")?);
    std::fs::create_dir_all(&out)?;
    let loaded = load(
        &ModelSpec::parse("models/SmolLM2-135M-Instruct.Q4_1.gguf"),
        &LoadOptions::default(),
    )?;
    let parsed = dataset::read_jsonl(std::path::Path::new(
        "sample_prompts/forgetting/train-present-past.jsonl",
    ))?;
    let renderer = Renderer {
        tokenizer: &loaded.tokenizer,
        chat_template: loaded.chat_template.as_ref(),
        template: PromptTemplate::Definition,
        max_len: 512,
    };
    let data = dataset::build(
        std::path::Path::new("train-present-past.jsonl"),
        &parsed,
        &renderer,
        SplitOptions {
            validation_fraction: 0.0,
            seed: 1,
        },
    )?;
    let examples: Vec<_> = data.train.into_iter().take(4).collect();
    let mut settings = TrainSettings {
        steps: 1,
        batch_size: 4,
        eval_every: 0,
        save_every: 0,
        ..TrainSettings::default()
    };
    settings.lora.dropout = 0.0;
    let saved = tunelens::ivfile::load(&iv_path)?;
    let g = GuidanceSettings {
        kl_threshold: 0.0,
        mse_threshold: 0.0,
        ..GuidanceSettings::code(iv_path.clone())
    };
    let mut trainer = Trainer::new(loaded.model.clone(), settings, examples.clone(), vec![], 0)?;
    // A non-zero B, so the adapted model differs from the reference and every gradient is
    // non-trivial.
    for (i, p) in trainer.params().iter().enumerate() {
        let shape = p.b.dims().to_vec();
        let n: usize = shape.iter().product();
        #[allow(clippy::cast_precision_loss)]
        let values: Vec<f32> = (0..n)
            .map(|j| (((i * 17 + j * 5) % 11) as f32 - 5.0) * 0.004)
            .collect();
        p.b.set(&Tensor::from_vec(values, shape, &Device::Cpu)?)?;
    }
    trainer.set_guidance(Guidance::new(
        g.clone(),
        &saved.vector,
        saved.meta.head_list.clone(),
        &loaded.model,
    )?);
    std::fs::create_dir_all(out.join("adapter"))?;
    write_peft_adapter(&out.join("adapter"), &trainer, "demo")?;
    let grads = trainer.gradients().map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for (p, (ga, gb)) in trainer.params().iter().zip(&grads.grads) {
        let prefix = p.peft_prefix();
        tensors.insert(format!("{prefix}.lora_A.weight"), ga.clone());
        tensors.insert(format!("{prefix}.lora_B.weight"), gb.clone());
    }
    candle_core::safetensors::save(&tensors, out.join("grads.safetensors"))?;
    let record = serde_json::json!({
        "examples": examples.iter().map(|e| serde_json::json!({
            "ids": e.ids,
            "labels": e.is_label,
            "t_b": last_prompt_position(e),
        })).collect::<Vec<_>>(),
        "iv": saved.vector,
        "heads": saved.meta.head_list,
        "layer": g.layer,
        "tau": g.tau,
        "alpha1": g.kl_alpha1,
        "alpha2": g.kl_alpha2,
        "alpha_pr": g.pr_alpha,
        "terms": grads.terms,
        "metrics": grads.metrics,
    });
    std::fs::write(out.join("step.json"), serde_json::to_string(&record)?)?;
    Ok(())
}
