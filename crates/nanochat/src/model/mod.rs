//! The model: nanochat v0's GPT on candle (`gpt`, with the table of its parameters that everything
//! else derives from, whose rows `params` defines), its key/value cache for generation
//! (`kv_cache`), the differentiable building blocks it is made of (`ops`), fused CPU kernels that
//! replace some of them (`fused`, chosen per model by a [`Kernels`] value) and the native
//! inference path (`decode`).

pub mod decode;
pub mod fused;
pub mod gpt;
pub mod kv_cache;
pub mod ops;
pub mod params;

pub use fused::Kernels;
pub use gpt::{named_vars, GPTConfig, Reduction, GPT};
pub use kv_cache::KvCache;
pub use params::{BlockParam, Init, OptimGroup, Param, ParamSpec};
