//! The model core: configs, loaders, tokenizers, chat templates, the hookable transformer, LoRA
//! layers and generation. Knows nothing of the UI, channels or the CLI.

pub mod adapter;
pub mod blas;
pub mod chat;
pub mod config;
pub mod device;
pub mod fused;
pub mod generate;
pub mod gguf;
pub mod hooks;
pub mod info;
pub mod load;
pub mod lora;
pub mod packed;
pub mod save;
pub mod tensor_file;
pub mod tiny;
pub mod tokenizer;
pub mod transformer;
pub mod vexp;
pub mod vjp;
pub mod weight;

pub use chat::{ChatMessage, ChatTemplate};
pub use config::{Architecture, ModelConfig};
pub use device::{configure_cpu_threads, device, DeviceChoice, WeightDtype};
pub use hooks::{Edit, EditOp, Editor, Hook, HookPoint, NoHook, Positions, Recorder};
pub use info::{AdapterInfo, ModelInfo};
pub use load::{load, load_with_progress, LoadOptions, LoadedModel, ModelSpec};
pub use tokenizer::Tokenizer;
pub use transformer::{ForwardOptions, Input, KvCache, LogitsAt, Transformer};
pub use weight::{Weight, WeightStorage};
