//! HumanEval: 164 Python functions to complete from their signature and docstring, graded by
//! running the completion against the problem's unit tests in the [`Sandbox`].
//!
//! The rows (`task_id`, `prompt`, `entry_point`, `canonical_solution`, `test`) come online from the
//! original's source, `openai/openai_humaneval` on Hugging Face (parquet), or from a mirror's
//! `eval/humaneval/HumanEval.jsonl.gz`, one object per line. As in the original, the user
//! message is the prompt, the reference reply is prompt + canonical solution (the whole function),
//! and grading runs the prompt's imports, the code of the reply (its first ```python block if it
//! has one, else the whole text), the tests and `check(entry_point)`.

use anyhow::{Context, Result};
use serde::Deserialize;

use super::{check_index, Answer, DataRoot, EvalType, Example, Task};
use crate::conversation::{Conversation, Message, Role};
use crate::data::sources;
use crate::execution::{Execution, Limits, Sandbox};

#[derive(Deserialize)]
struct Row {
    task_id: String,
    prompt: String,
    entry_point: String,
    canonical_solution: String,
    test: String,
}

pub struct HumanEval {
    rows: Vec<Row>,
    sandbox: Sandbox,
}

impl HumanEval {
    /// Loads the problems and checks that the sandbox can run Python, so a missing interpreter is
    /// an error here rather than every problem silently failing later.
    pub fn load(root: &DataRoot, limits: Limits) -> Result<HumanEval> {
        let mirror = "eval/humaneval/HumanEval.jsonl.gz";
        let (_, rows) = root.rows::<Row, Row>(mirror, &[sources::humaneval()], "HumanEval")?;
        let sandbox = Sandbox::new(limits)?;
        let probe = sandbox.run("pass\n").context("trying the HumanEval sandbox")?;
        anyhow::ensure!(
            probe.passed(),
            "the sandbox cannot run an empty Python program ({:?}): check the interpreter (NANOCHAT_PYTHON) \
             and the limits",
            probe.outcome
        );
        Ok(HumanEval { rows, sandbox })
    }

    /// Runs `completion` against the tests of `example`: the sandbox's full report.
    pub fn execute(&self, example: &Example, completion: &str) -> Result<Execution> {
        let row = self.row_of(example)?;
        self.sandbox.run(&program(&row.prompt, completion, &row.test, &row.entry_point))
    }

    fn row_of(&self, example: &Example) -> Result<&Row> {
        let Answer::Final(task_id) = &example.answer else {
            anyhow::bail!("not a HumanEval example: its answer names no task id");
        };
        self.rows
            .iter()
            .find(|r| &r.task_id == task_id)
            .with_context(|| format!("{task_id} is not a HumanEval problem of this file"))
    }
}

impl Task for HumanEval {
    fn name(&self) -> String {
        "HumanEval".to_string()
    }

    fn len(&self) -> usize {
        self.rows.len()
    }

    /// The answer is the problem's `task_id`, which [`HumanEval::execute`] finds the tests by.
    fn get(&self, index: usize) -> Result<Example> {
        check_index("HumanEval", index, self.rows.len())?;
        let row = &self.rows[index];
        let messages = vec![
            Message::new(Role::User, row.prompt.clone()),
            Message::new(Role::Assistant, format!("{}{}", row.prompt, row.canonical_solution)),
        ];
        Ok(Example { conversation: Conversation { messages }, answer: Answer::Final(row.task_id.clone()) })
    }

    fn eval_type(&self) -> Option<EvalType> {
        Some(EvalType::Generative)
    }

    /// Passes when the program exits cleanly within the limits. A sandbox failure (not the
    /// program's) counts as a fail and is reported on stderr: `load` already checked the sandbox.
    fn evaluate(&self, example: &Example, completion: &str) -> bool {
        match self.execute(example, completion) {
            Ok(execution) => execution.passed(),
            Err(e) => {
                eprintln!("HumanEval: could not run a completion: {e:#}");
                false
            }
        }
    }
}

/// The program that grades `completion`: the prompt's imports (a completion that restates the
/// function often drops them), the completion's code, the tests, then the call of `check`.
pub fn program(prompt: &str, completion: &str, test: &str, entry_point: &str) -> String {
    format!("{}\n\n{}\n\n{test}\ncheck({entry_point})\n", imports(prompt), extract_code(completion))
}

/// The `import` / `from` lines at the top of a prompt (blank and comment lines skipped), up to
/// its first line of other code.
pub fn imports(prompt: &str) -> String {
    let mut imports = Vec::new();
    for line in prompt.lines().map(str::trim) {
        if line.starts_with("import ") || line.starts_with("from ") {
            imports.push(line);
        } else if !line.is_empty() && !line.starts_with('#') {
            break;
        }
    }
    imports.join("\n")
}

/// The code in a completion: the body of its first fenced block (```python or a bare ```), else
/// the whole text, trimmed.
pub fn extract_code(completion: &str) -> String {
    let fenced = completion.find("```").and_then(|open| {
        let after = &completion[open + 3..];
        let after = after.strip_prefix("python").unwrap_or(after);
        // the fence's language tag ends its line; the code starts on the next
        let body_start = after.find('\n')? + 1;
        if !after[..body_start].trim().is_empty() {
            return None;
        }
        let body = &after[body_start..];
        body.find("```").map(|close| body[..close].to_string())
    });
    fenced.unwrap_or_else(|| completion.to_string()).trim().to_string()
}
