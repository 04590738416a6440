//! Evaluation of base models: the CORE metric over the DCLM bundle (`bundle` reads it, `core`
//! scores it) and bits per byte over a token stream (`loss`).

pub mod bundle;
pub mod chat;
pub mod core;
pub mod loss;

pub use self::core::{evaluate_core, CoreResults, LanguageModel, TaskResult};
pub use bundle::{Bundle, Item, TaskSpec, TaskType};
pub use loss::{bits_per_byte, evaluate_bpb, BpbTotals};
