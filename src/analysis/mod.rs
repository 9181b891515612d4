//! The analyses of METHODS.md, one pure function per method, returning plain serialisable data
//! (`types`). No file I/O, channels, threads, GUI code or printing here.

pub mod attribution;
pub mod change_rate;
pub mod consistency;
pub mod ffn_concepts;
pub mod head_pairs;
pub mod icl;
pub mod iv;
pub mod knowledge;
pub mod lens;
pub mod prediction;
pub mod recall;
pub mod results;
pub mod shift;
pub mod stats;
pub mod types;
pub mod words;
