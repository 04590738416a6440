//! ARC-Easy and ARC-Challenge (AI2 Reasoning Challenge): grade-school science questions with
//! three to five choices, as multiple-choice conversations in the original's format.
//!
//! Online the rows come from the original's source, `allenai/ai2_arc` on Hugging Face (parquet:
//! `id`, `question`, `choices {text, label}`, `answerKey`), splits train, validation and test. From
//! a mirror they come from `eval/arc/ARC-{Easy,Challenge}-{split}.jsonl`, one `{"id", "question",
//! "choices", "letters", "answer"}` object per line; the mirror has only the validation and test
//! splits, so training-side data uses validation there and test stays for evaluation.

use anyhow::{bail, Result};
use serde::Deserialize;

use super::{check_index, render_mc, Answer, DataRoot, EvalType, Example, Task};
use crate::conversation::{Conversation, Message, Role};
use crate::data::sources;

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

/// A row as the Hugging Face dataset has it.
#[derive(Deserialize)]
struct HubRow {
    question: String,
    choices: HubChoices,
    #[serde(rename = "answerKey")]
    answer_key: String,
}

#[derive(Deserialize)]
struct HubChoices {
    text: Vec<String>,
    label: Vec<String>,
}

impl From<HubRow> for Row {
    fn from(row: HubRow) -> Row {
        Row { question: row.question, choices: row.choices.text, letters: row.choices.label, answer: row.answer_key }
    }
}

pub struct ArcTask {
    name: String,
    rows: Vec<Row>,
}

impl ArcTask {
    /// Loads `split` (`train`, `validation` or `test`; a mirror has no `train`) of `subset`.
    pub fn load(root: &DataRoot, subset: ArcSubset, split: &str) -> Result<ArcTask> {
        if !matches!(split, "train" | "validation" | "test") {
            bail!("ARC split {split:?} does not exist: use \"train\", \"validation\" or \"test\"");
        }
        let subset = match subset {
            ArcSubset::Easy => "Easy",
            ArcSubset::Challenge => "Challenge",
        };
        let name = format!("ARC-{subset}-{split}");
        let mirror = format!("eval/arc/{name}.jsonl");
        let (path, rows) =
            root.rows::<Row, HubRow>(&mirror, &[sources::arc(&format!("ARC-{subset}"), split)], &name)?;
        for (i, row) in rows.iter().enumerate() {
            if row.letters.len() != row.choices.len() || !row.letters.contains(&row.answer) {
                bail!(
                    "{path} row {}: the answer must be one of the letters and there must be one letter per choice",
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
