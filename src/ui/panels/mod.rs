//! One module per view. A panel draws from plain data and pushes [`crate::ui::app::Action`]s.

pub mod attribution;
pub mod models;
pub mod prompt;
