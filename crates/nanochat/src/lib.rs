//! nanochat in Rust: the library behind the `nanochat` binary.
//!
//! One module per concept, named after it, in pipeline order: the tokenizer and the conversation
//! format, pretraining data, the model and its optimizers, training stages, the inference engine,
//! evaluation, serving and the report; and models in and out of other tools (`interop`).

pub mod bench;
pub mod calculator;
pub mod chat_cli;
pub mod checkpoint;
pub mod common;
pub mod conversation;
pub mod data;
pub mod dist;
pub mod engine;
pub mod eval;
pub mod execution;
pub mod interop;
pub mod model;
pub mod optim;
pub mod report;
pub mod serve;
pub mod speedrun;
pub mod tasks;
pub mod tok;
pub mod tokenizer;
pub mod train;
