//! Evaluation: the CORE metric of base models over the DCLM bundle (`bundle` reads it, `core`
//! scores it), bits per byte over a token stream (`loss`, the one implementation that training's
//! validation uses too), and the chat evaluations (`chat`).

pub mod bundle;
pub mod chat;
pub mod core;
pub mod loss;

pub use self::core::{evaluate_core, CoreResults, LanguageModel, TaskResult};
pub use bundle::{Bundle, Item, TaskSpec, TaskType};
pub use loss::{bits_per_byte, evaluate_bpb, evaluate_bpb_on, BpbTotals};
