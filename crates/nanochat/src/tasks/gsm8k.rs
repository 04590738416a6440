//! GSM8K: grade-school math word problems whose worked answers carry calculator annotations.
//!
//! The rows (`question`, `answer`) come online from the original's source, `openai/gsm8k` on
//! Hugging Face, config `main` (parquet), or from a mirror's `eval/gsm8k/{train,test}.jsonl`, one
//! object per line. Each `<<expr=result>>` annotation in an answer becomes a python part (`expr`) and a
//! python_output part (`result`), so training teaches the model to call the calculator where the
//! dataset's authors did; the text around them, including the final `#### N` line, stays text.

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use super::{check_index, extract_answer, Answer, DataRoot, EvalType, Example, Task};
use crate::conversation::{Content, Conversation, Message, Part, PartKind, Role};
use crate::data::sources;

#[derive(Deserialize)]
struct Row {
    question: String,
    answer: String,
}

pub struct Gsm8k {
    name: String,
    rows: Vec<Row>,
}

impl Gsm8k {
    /// Loads `split`: `train` or `test`.
    pub fn load(root: &DataRoot, split: &str) -> Result<Gsm8k> {
        if !matches!(split, "train" | "test") {
            bail!("GSM8K split {split:?} does not exist: use \"train\" or \"test\"");
        }
        let name = format!("GSM8K-{split}");
        let (_, rows) = root.rows::<Row, Row>(&format!("eval/gsm8k/{split}.jsonl"), &[sources::gsm8k(split)], &name)?;
        Ok(Gsm8k { name, rows })
    }
}

impl Task for Gsm8k {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn len(&self) -> usize {
        self.rows.len()
    }

    fn get(&self, index: usize) -> Result<Example> {
        check_index(&self.name, index, self.rows.len())?;
        let row = &self.rows[index];
        let parts = parse_answer(&row.answer);
        // The original grades against the last text part, which holds the `#### N` line.
        let reference = parts
            .iter()
            .rev()
            .find(|p| p.kind == PartKind::Text)
            .and_then(|p| extract_answer(&p.text))
            .with_context(|| format!("{} example {index}: the answer has no final '#### N' line", self.name))?;
        let messages = vec![
            Message::new(Role::User, row.question.clone()),
            Message { role: Role::Assistant, content: Content::Parts(parts) },
        ];
        Ok(Example { conversation: Conversation { messages }, answer: Answer::Final(reference) })
    }

    fn eval_type(&self) -> Option<EvalType> {
        Some(EvalType::Generative)
    }
}

/// Splits a GSM8K answer at its `<<inner>>` annotations (the original's `<<[^>]+>>`): the text
/// between them becomes text parts; `inner` splits at its last `=` into a python part and a
/// python_output part (an annotation without `=` gets an empty output). Empty text pieces, which
/// the original keeps, are dropped: they render to no tokens either way.
pub fn parse_answer(answer: &str) -> Vec<Part> {
    let part = |kind, text: &str| Part { kind, text: text.to_string() };
    let mut parts = Vec::new();
    let mut text_start = 0;
    let mut search = 0;
    while let Some(offset) = answer[search..].find("<<") {
        let open = search + offset;
        let inner_start = open + 2;
        let inner_len = answer[inner_start..].find('>').unwrap_or(0);
        let close = inner_start + inner_len;
        if inner_len == 0 || !answer[close..].starts_with(">>") {
            // Not an annotation here; like the regex, try again one character further on.
            search = open + 1;
            continue;
        }
        if open > text_start {
            parts.push(part(PartKind::Text, &answer[text_start..open]));
        }
        let inner = &answer[inner_start..close];
        let (expr, result) = inner.rsplit_once('=').unwrap_or((inner, ""));
        parts.push(part(PartKind::Python, expr));
        parts.push(part(PartKind::PythonOutput, result));
        text_start = close + 2;
        search = text_start;
    }
    if text_start < answer.len() {
        parts.push(part(PartKind::Text, &answer[text_start..]));
    }
    parts
}
