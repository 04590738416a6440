//! MMLU (Massive Multitask Language Understanding): four-choice questions over 57 subjects, as
//! multiple-choice conversations in the original's format.
//!
//! Online the original loads `cais/mmlu` from Hugging Face (and its `auxiliary_train` subset for
//! midtraining); here the rows come from `eval/mmlu/{dev,validation,test}.jsonl` under a
//! [`DataRoot`], one `{"subject", "question", "choices": [4], "answer": index}` object per line.
//! `auxiliary_train` is not in the mirror: dev and validation stand in for it on the training side.

use anyhow::{bail, Result};
use serde::Deserialize;

use super::{check_index, read_jsonl, render_mc, Answer, DataRoot, EvalType, Example, Task};
use crate::conversation::{Conversation, Message, Role};

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
    /// Loads `split`: `dev`, `validation` or `test`.
    pub fn load(root: &DataRoot, split: &str) -> Result<Mmlu> {
        if !matches!(split, "dev" | "validation" | "test") {
            bail!("MMLU split {split:?} is not available: use \"dev\", \"validation\" or \"test\"");
        }
        let path = root.file(&format!("eval/mmlu/{split}.jsonl"), "the Hugging Face dataset cais/mmlu (subset all)")?;
        let rows: Vec<Row> = read_jsonl(&path)?;
        for (i, row) in rows.iter().enumerate() {
            if row.choices.len() != LETTERS.len() || row.answer >= LETTERS.len() {
                bail!("{} row {}: MMLU rows need 4 choices and an answer index 0-3", path.display(), i + 1);
            }
        }
        Ok(Mmlu { name: format!("MMLU-{split}"), rows, letters: LETTERS.map(String::from).to_vec() })
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
