//! The single-machine pipeline: TransE embedding, SimSkip refinement with a held-out gate, and
//! the downstream tasks on input and refined tables side by side.

pub mod embed;
pub mod evaluate;
pub mod gate;
pub mod refine;
pub mod search;

pub use embed::{train_transe, EmbedOutcome};
pub use evaluate::{evaluate_table, EvalContext};
pub use refine::{refine_table, RefineOutcome};
