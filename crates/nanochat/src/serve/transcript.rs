//! How a conversation reads as text in the web APIs, both ways:
//!
//! - replies ([`ReplyText`]): generated ids become text, ordinary tokens as whole UTF-8 characters,
//!   and the calculator exchange `<|python_start|>expr<|python_end|><|output_start|>result<|output_end|>`
//!   as GSM8K's annotation `<<expr=result>>`: the form the model learnt tool use from (the GSM8K task
//!   turns each annotation into these tokens), readable, and free of special tokens. A call the
//!   calculator refused (no result) reads `<<expr>>`; other special tokens read as nothing.
//! - prompts ([`render_prompt`]): messages become ids the way the model was trained, with the
//!   annotations in assistant messages turned back into the calculator's tokens, so a conversation
//!   sent back as the server wrote it is re-tokenised as the model generated it. OpenAI-style tool
//!   messages (an assistant `calculator` call, then a `tool` message with its result) become the
//!   same tokens.

use anyhow::{Context, Result};

use crate::conversation::PartKind;
use crate::engine::{Engine, TextStream};
use crate::tasks::gsm8k::parse_answer;

/// One piece of a conversation, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Segment {
    /// A system message (first only): joins the next user message after a blank line, as in
    /// training conversations; with no user message right after it, it becomes one of its own.
    System(String),
    User(String),
    /// Assistant text, `<<expr=result>>` annotations included.
    Assistant(String),
    /// A calculator call of the assistant (an OpenAI `tool_calls` entry): its expression.
    Call(String),
    /// The calculator's answer (an OpenAI `tool` message). The assistant's turn goes on after it:
    /// an assistant message that follows continues the same turn, and a conversation that ends
    /// here asks the model to continue that turn rather than start a new one.
    Result(String),
}

/// Renders a conversation as the original's server does (`<|bos|>`, each user message in
/// `<|user_start|>…<|user_end|>`, each assistant turn in `<|assistant_start|>…<|assistant_end|>`,
/// no alternation required), then opens the reply: `<|assistant_start|>`, or nothing when the last
/// segment is a calculator result (the open turn continues).
pub(crate) fn render_prompt(tok: &bpe::Tokenizer, segments: &[Segment]) -> Result<Vec<u32>> {
    let id = |name: &str| tok.special_id(name).with_context(|| format!("the tokenizer has no {name}"));
    let (user_start, user_end) = (id("<|user_start|>")?, id("<|user_end|>")?);
    let (assistant_start, assistant_end) = (id("<|assistant_start|>")?, id("<|assistant_end|>")?);
    let (python_start, python_end) = (id("<|python_start|>")?, id("<|python_end|>")?);
    let (output_start, output_end) = (id("<|output_start|>")?, id("<|output_end|>")?);
    let mut ids = vec![tok.bos_id()];
    let user = |ids: &mut Vec<u32>, text: &str| {
        ids.push(user_start);
        ids.extend(tok.encode(text));
        ids.push(user_end);
    };
    let call = |ids: &mut Vec<u32>, expr: &str| {
        ids.push(python_start);
        ids.extend(tok.encode(expr));
        ids.push(python_end);
    };
    let result = |ids: &mut Vec<u32>, answer: &str| {
        ids.push(output_start);
        ids.extend(tok.encode(answer));
        ids.push(output_end);
    };
    let mut system: Option<&str> = None;
    // an assistant turn is open (its <|assistant_end|> not written yet)
    let mut open = false;
    let mut previous: Option<&Segment> = None;
    for segment in segments {
        let continues = matches!(previous, Some(Segment::Call(_) | Segment::Result(_)));
        match segment {
            Segment::System(text) => system = Some(text),
            Segment::User(text) => {
                if std::mem::take(&mut open) {
                    ids.push(assistant_end);
                }
                match system.take() {
                    Some(system) => user(&mut ids, &format!("{system}\n\n{text}")),
                    None => user(&mut ids, text),
                }
            }
            Segment::Assistant(_) | Segment::Call(_) | Segment::Result(_) => {
                if let Some(system) = system.take() {
                    user(&mut ids, system);
                }
                let new_turn = matches!(segment, Segment::Assistant(_)) && !continues;
                if open && new_turn {
                    ids.push(assistant_end);
                }
                if !open || new_turn {
                    ids.push(assistant_start);
                    open = true;
                }
                match segment {
                    Segment::Assistant(text) => {
                        for part in parse_answer(text) {
                            match part.kind {
                                PartKind::Text => ids.extend(tok.encode(&part.text)),
                                PartKind::Python => call(&mut ids, &part.text),
                                // an annotation without a result: the calculator gave none
                                PartKind::PythonOutput if part.text.is_empty() => {}
                                PartKind::PythonOutput => result(&mut ids, &part.text),
                            }
                        }
                    }
                    Segment::Call(expr) => call(&mut ids, expr),
                    Segment::Result(answer) => result(&mut ids, answer),
                    Segment::System(_) | Segment::User(_) => {}
                }
            }
        }
        previous = Some(segment);
    }
    if let Some(system) = system {
        user(&mut ids, system);
    }
    let continue_turn = open && matches!(previous, Some(Segment::Result(_)));
    if !continue_turn {
        if open {
            ids.push(assistant_end);
        }
        ids.push(assistant_start);
    }
    Ok(ids)
}

/// The reply as text for the web: ordinary tokens through [`TextStream`] (whole characters only),
/// the calculator exchange as `<<expr=result>>` (see the module's comment). Whether a call has a
/// result is known only from the token after `<|python_end|>`, so its closing is written then.
pub struct ReplyText<'a> {
    engine: &'a Engine,
    stream: TextStream,
    /// `<|python_end|>` came last: `=` follows if `<|output_start|>` comes next, else `>>`.
    call_ended: bool,
}

impl<'a> ReplyText<'a> {
    pub fn new(engine: &'a Engine) -> Self {
        Self { engine, stream: TextStream::new(), call_ended: false }
    }

    /// Adds one generated id; returns the text that became complete (possibly empty).
    pub fn push(&mut self, id: u32) -> String {
        let sp = self.engine.specials();
        let mut out = String::new();
        if std::mem::take(&mut self.call_ended) && id != sp.output_start {
            out.push_str(">>");
        }
        if id == sp.python_start {
            out.push_str(&self.stream.finish());
            out.push_str("<<");
        } else if id == sp.python_end {
            out.push_str(&self.stream.finish());
            self.call_ended = true;
        } else if id == sp.output_start {
            out.push_str(&self.stream.finish());
            out.push('=');
        } else if id == sp.output_end {
            out.push_str(&self.stream.finish());
            out.push_str(">>");
        } else {
            out.push_str(&self.stream.push(self.engine.tokenizer(), id));
        }
        out
    }

    /// What is left at the end: an unfinished character becomes U+FFFD, a call without a result
    /// is closed.
    pub fn finish(&mut self) -> String {
        let mut out = self.stream.finish();
        if std::mem::take(&mut self.call_ended) {
            out.push_str(">>");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokenizer() -> bpe::Tokenizer {
        let text = "The sum of 12 and 34 is 46. Hello there, what is the answer? ".repeat(20);
        bpe::Tokenizer::train([text.as_str()], 300, bpe::DEFAULT_PATTERN).unwrap()
    }

    #[test]
    fn annotations_and_tool_messages_render_as_the_calculator_tokens() {
        let tok = tokenizer();
        let sp = |name: &str| tok.special_id(name).unwrap();
        let parts = [
            vec![tok.bos_id(), sp("<|user_start|>")],
            tok.encode("Be brief.\n\nWhat is 12+34?"),
            vec![sp("<|user_end|>"), sp("<|assistant_start|>")],
            tok.encode("The sum is "),
            vec![sp("<|python_start|>")],
            tok.encode("12+34"),
            vec![sp("<|python_end|>"), sp("<|output_start|>")],
            tok.encode("46"),
            vec![sp("<|output_end|>")],
            tok.encode("46."),
            vec![sp("<|assistant_end|>"), sp("<|user_start|>")],
            tok.encode("Thanks"),
            vec![sp("<|user_end|>"), sp("<|assistant_start|>")],
        ];
        let expected = parts.concat();
        let system = Segment::System("Be brief.".into());
        let question = Segment::User("What is 12+34?".into());
        let thanks = Segment::User("Thanks".into());
        let annotated =
            [system.clone(), question.clone(), Segment::Assistant("The sum is <<12+34=46>>46.".into()), thanks.clone()];
        assert_eq!(render_prompt(&tok, &annotated).unwrap(), expected);
        let tool_messages = [
            system,
            question,
            Segment::Assistant("The sum is ".into()),
            Segment::Call("12+34".into()),
            Segment::Result("46".into()),
            Segment::Assistant("46.".into()),
            thanks,
        ];
        assert_eq!(render_prompt(&tok, &tool_messages).unwrap(), expected);
        // ending on a result continues the turn; a call without a result has no output tokens
        assert_eq!(render_prompt(&tok, &tool_messages[..5]).unwrap(), parts[..9].concat());
        let refused = render_prompt(&tok, &[Segment::User("x".into()), Segment::Assistant("<<1/0>>".into())]).unwrap();
        let tail =
            [vec![sp("<|python_start|>")], tok.encode("1/0"), vec![sp("<|python_end|>"), sp("<|assistant_end|>")]];
        assert!(refused.ends_with(&[tail.concat(), vec![sp("<|assistant_start|>")]].concat()), "{refused:?}");
    }
}
