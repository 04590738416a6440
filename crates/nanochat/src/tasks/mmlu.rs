//! MMLU (Massive Multitask Language Understanding): four-choice questions over 57 subjects, as
//! multiple-choice conversations in the original's format.
//!
//! Online the rows come from the original's source, `cais/mmlu` on Hugging Face, config `all`
//! (parquet: `question`, `subject`, `choices`, `answer` index), splits `auxiliary_train` (~100K
//! questions drawn from ARC, MC_TEST, OBQA and RACE, the original's midtraining data), `dev`,
//! `validation` and `test`. From a mirror they come from `eval/mmlu/{dev,validation,test}.jsonl`,
//! the same fields one object per line; the mirror has no `auxiliary_train`, so midtraining uses dev
//! and validation there.

use anyhow::{bail, Result};
use serde::Deserialize;

use super::{check_index, render_mc, Answer, DataRoot, EvalType, Example, Task};
use crate::conversation::{Conversation, Message, Role};
use crate::data::sources;

const LETTERS: [&str; 4] = ["A", "B", "C", "D"];

#[derive(Deserialize)]
struct Row {
    question: String,
    choices: Vec<String>,
    answer: usize,
}

pub struct Mmlu {
    name: String,
    rows: Vec<Row>,
    letters: Vec<String>,
}

impl Mmlu {
    /// Loads `split`: `auxiliary_train` (not in a mirror), `dev`, `validation` or `test`.
    pub fn load(root: &DataRoot, split: &str) -> Result<Mmlu> {
        if !matches!(split, "auxiliary_train" | "dev" | "validation" | "test") {
            bail!("MMLU split {split:?} does not exist: use \"auxiliary_train\", \"dev\", \"validation\" or \"test\"");
        }
        let name = format!("MMLU-{split}");
        let mirror = format!("eval/mmlu/{split}.jsonl");
        let (path, rows) = root.rows::<Row, Row>(&mirror, &[sources::mmlu(split)], &name)?;
        for (i, row) in rows.iter().enumerate() {
            if row.choices.len() != LETTERS.len() || row.answer >= LETTERS.len() {
                bail!("{path} row {}: MMLU rows need 4 choices and an answer index 0-3", i + 1);
            }
        }
        Ok(Mmlu { name, rows, letters: LETTERS.map(String::from).to_vec() })
    }
}

impl Task for Mmlu {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn len(&self) -> usize {
        self.rows.len()
    }

    fn get(&self, index: usize) -> Result<Example> {
        check_index(&self.name, index, self.rows.len())?;
        let row = &self.rows[index];
        let correct = self.letters[row.answer].clone();
        let messages = vec![
            Message::new(Role::User, render_mc(&row.question, &self.letters, &row.choices)),
            Message::new(Role::Assistant, correct.clone()),
        ];
        Ok(Example {
            conversation: Conversation { messages },
            answer: Answer::Choice { letters: self.letters.clone(), correct },
        })
    }

    fn eval_type(&self) -> Option<EvalType> {
        Some(EvalType::Categorical)
    }
}
