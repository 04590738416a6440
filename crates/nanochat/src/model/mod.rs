//! The model: nanochat v0's GPT on candle (`gpt`), its key/value cache for generation
//! (`kv_cache`), the differentiable building blocks it is made of (`ops`) and fused CPU kernels
//! that replace some of them (`fused`).

pub mod decode;
pub mod fused;
pub mod gpt;
pub mod kv_cache;
pub mod ops;

pub use gpt::{named_vars, GPTConfig, Reduction, RotaryTables, GPT};
pub use kv_cache::KvCache;
