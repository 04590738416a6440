//! The HumanEval task over the small data mirror (every 16th problem) and, when
//! `NANOCHAT_DATA_MIRROR` names it, the full one: reference solutions pass in the sandbox, a wrong
//! one fails, and code is extracted from completions as the original does.

mod common;

use std::path::Path;

use nanochat::conversation::Content;
use nanochat::execution::{Limits, Outcome};
use nanochat::tasks::humaneval::{extract_code, imports, program, HumanEval};
use nanochat::tasks::{Answer, DataRoot, EvalType, Task};

/// The problems of the small mirror: HumanEval/0, /16, /32, ... /160.
const SAMPLE: usize = 11;

fn load(root: &Path) -> HumanEval {
    HumanEval::load(&DataRoot::new(root), Limits::default()).unwrap()
}

fn task() -> HumanEval {
    load(&common::data())
}

fn reply(example: &nanochat::tasks::Example) -> String {
    match &example.conversation.messages[1].content {
        Content::Text(text) => text.clone(),
        Content::Parts(_) => panic!("HumanEval replies are plain text"),
    }
}

#[test]
fn loads_the_problems_as_generative_conversations() {
    let full = common::full_mirror("loads_the_problems_as_generative_conversations");
    for (task, problems) in std::iter::once((task(), SAMPLE)).chain(full.map(|m| (load(&m), 164))) {
        assert_eq!(task.len(), problems);
        assert_eq!(task.eval_type(), Some(EvalType::Generative));
        let example = task.get(0).unwrap();
        assert_eq!(example.answer, Answer::Final("HumanEval/0".to_string()));
        let Content::Text(prompt) = &example.conversation.messages[0].content else { panic!("user message is text") };
        assert!(reply(&example).starts_with(prompt.as_str()), "the reference reply is prompt + solution");
        assert!(task.get(problems).is_err());
    }
    assert_eq!(task().get(SAMPLE - 1).unwrap().answer, Answer::Final("HumanEval/160".to_string()));
}

#[test]
fn a_sample_of_canonical_solutions_passes_in_the_sandbox() {
    let task = task();
    for index in 0..task.len() {
        let example = task.get(index).unwrap();
        // the reference reply, and the same wrapped in a fenced block as a chat model would write it
        let plain = reply(&example);
        let fenced = format!("Here you go:\n```python\n{plain}\n```\nDone.");
        for completion in [&plain, &fenced] {
            let exec = task.execute(&example, completion).unwrap();
            assert_eq!(exec.outcome, Outcome::Passed, "problem {index}: {}", exec.stderr);
        }
        assert!(task.evaluate(&example, &plain));
    }
}

#[test]
fn a_wrong_solution_fails() {
    let task = task();
    let example = task.get(0).unwrap();
    let wrong = "def has_close_elements(numbers, threshold):\n    return False\n";
    assert!(matches!(task.execute(&example, wrong).unwrap().outcome, Outcome::Failed { .. }));
    assert!(!task.evaluate(&example, wrong));
    assert!(!task.evaluate(&example, "this is not python at all"));
}

#[test]
fn code_is_the_first_fenced_block_or_the_whole_text() {
    assert_eq!(extract_code("```python\nx = 1\n```"), "x = 1");
    assert_eq!(extract_code("text\n```\ny = 2\n```\n```python\nz\n```"), "y = 2");
    assert_eq!(extract_code("  def f():\n    return 1\n"), "def f():\n    return 1");
    // an unclosed fence is not a block: the text is taken as it is
    assert_eq!(extract_code("```python\nx = 1"), "```python\nx = 1");
}

#[test]
fn the_program_keeps_the_prompts_leading_imports() {
    let prompt =
        "from typing import List\nimport math\n\n\ndef f(x: List[int]) -> int:\n    \"\"\"import nothing\"\"\"\n";
    assert_eq!(imports(prompt), "from typing import List\nimport math");
    let program = program(prompt, "def f(x):\n    return 1", "def check(c):\n    assert c([]) == 1", "f");
    assert!(program.starts_with("from typing import List\nimport math\n\ndef f(x):"));
    assert!(program.ends_with("check(f)\n"));
}

/// All 164 reference solutions of the full mirror pass (about 10 s).
#[test]
fn every_canonical_solution_passes_in_the_sandbox() {
    let Some(mirror) = common::full_mirror("every_canonical_solution_passes_in_the_sandbox") else { return };
    let task = load(&mirror);
    let failures: Vec<usize> =
        (0..task.len()).filter(|&i| !task.evaluate(&task.get(i).unwrap(), &reply(&task.get(i).unwrap()))).collect();
    assert!(failures.is_empty(), "reference solutions failing: {failures:?}");
}
