//! ARC-Easy and ARC-Challenge (AI2 Reasoning Challenge): grade-school science questions with
//! three to five choices, as multiple-choice conversations in the original's format.
//!
//! Online the original loads `allenai/ai2_arc` from Hugging Face; here the rows come from
//! `eval/arc/ARC-{Easy,Challenge}-{split}.jsonl` under a [`DataRoot`], one
//! `{"id", "question", "choices", "letters", "answer"}` object per line. Only the validation and
//! test splits are in the mirror: use validation for training-side data, test for evaluation.

use anyhow::{bail, Result};
use serde::Deserialize;

use super::{check_index, read_jsonl, render_mc, Answer, DataRoot, EvalType, Example, Task};
use crate::conversation::{Conversation, Message, Role};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArcSubset {
    Easy,
    Challenge,
}

#[derive(Deserialize)]
struct Row {
    question: String,
    choices: Vec<String>,
    letters: Vec<String>,
    answer: String,
}

pub struct ArcTask {
    name: String,
    rows: Vec<Row>,
}

impl ArcTask {
    /// Loads `split` (`validation` or `test`) of `subset`.
    pub fn load(root: &DataRoot, subset: ArcSubset, split: &str) -> Result<ArcTask> {
        if !matches!(split, "validation" | "test") {
            bail!("ARC split {split:?} is not available: use \"validation\" (training side) or \"test\"");
        }
        let subset = match subset {
            ArcSubset::Easy => "Easy",
            ArcSubset::Challenge => "Challenge",
        };
        let name = format!("ARC-{subset}-{split}");
        let path = root.file(&format!("eval/arc/{name}.jsonl"), "the Hugging Face dataset allenai/ai2_arc")?;
        let rows: Vec<Row> = read_jsonl(&path)?;
        for (i, row) in rows.iter().enumerate() {
            if row.letters.len() != row.choices.len() || !row.letters.contains(&row.answer) {
                bail!(
                    "{} row {}: the answer must be one of the letters and there must be one letter per choice",
                    path.display(),
                    i + 1
                );
            }
        }
        Ok(ArcTask { name, rows })
    }
}

impl Task for ArcTask {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn len(&self) -> usize {
        self.rows.len()
    }

    fn get(&self, index: usize) -> Result<Example> {
        check_index(&self.name, index, self.rows.len())?;
        let row = &self.rows[index];
        let messages = vec![
            Message::new(Role::User, render_mc(&row.question, &row.letters, &row.choices)),
            Message::new(Role::Assistant, row.answer.clone()),
        ];
        Ok(Example {
            conversation: Conversation { messages },
            answer: Answer::Choice { letters: row.letters.clone(), correct: row.answer.clone() },
        })
    }

    fn eval_type(&self) -> Option<EvalType> {
        Some(EvalType::Categorical)
    }
}
