//! One module per view. A panel draws from plain data and pushes [`crate::ui::app::Action`]s.

pub mod attribution;
pub mod consistency;
pub mod finetune;
pub mod models;
pub mod prompt;
pub mod weights;
