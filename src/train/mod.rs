//! Fine-tuning: instruction datasets, the LoRA trainer, checkpoints and the training loop.
//! Knows nothing of the UI, channels or the CLI.

pub mod batch;
pub mod checkpoint;
pub mod dataset;
pub mod forgetting;
pub mod guidance;
pub mod lora_trainer;
pub mod loss;
pub mod optim;
pub mod results;
pub mod run;
pub mod settings;
pub mod stages;
