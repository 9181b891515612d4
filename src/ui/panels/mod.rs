//! One module per view. A panel draws from plain data and pushes [`crate::ui::actions::Action`]s; an analysis view also implements
//! [`crate::ui::registry::AnalysisView`].

pub mod attribution;
pub mod consistency;
pub mod finetune;
pub mod iv;
pub mod knowledge;
pub mod models;
pub mod prompt;
pub mod shift;
pub mod weights;
