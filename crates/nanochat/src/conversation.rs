//! Conversations and their rendering into token ids, exactly as the original's tokenizer does it.
//!
//! `<|bos|>`, then per message `<|user_start|>…<|user_end|>` or `<|assistant_start|>…<|assistant_end|>`,
//! with no separators. The mask says which tokens the model is trained to produce: 1 for the
//! assistant's content and its `<|assistant_end|>` (and its calculator calls), 0 for everything
//! else, including the calculator's output, which the engine forces rather than the model writing it.

use serde::{Deserialize, Serialize};

/// Who speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

/// A message's content: plain text, or (assistant only) a list of parts with tool calls.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Part>),
}

/// One part of an assistant message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Part {
    #[serde(rename = "type")]
    pub kind: PartKind,
    pub text: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PartKind {
    /// Ordinary text (trained on).
    Text,
    /// A calculator expression, between `<|python_start|>` and `<|python_end|>` (trained on).
    Python,
    /// The calculator's result, between `<|output_start|>` and `<|output_end|>` (not trained on).
    PythonOutput,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: Role,
    pub content: Content,
}

impl Message {
    pub fn new(role: Role, text: impl Into<String>) -> Self {
        Message { role, content: Content::Text(text.into()) }
    }
}

/// A conversation as the original stores it: `{"messages": [...]}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Conversation {
    pub messages: Vec<Message>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConversationError {
    #[error("the conversation has no messages")]
    Empty,
    #[error("message {index} is from the {got:?} but the {expected:?} was expected: roles must alternate user, assistant, user, … (a system message may only come first)")]
    RoleOrder { index: usize, expected: Role, got: Role },
    #[error("message {index}: user messages must be plain text")]
    UserParts { index: usize },
    #[error("a system message must be followed by a user message")]
    LoneSystem,
    #[error("rendering for completion needs a conversation that ends with an assistant message")]
    NoAssistantAtEnd,
}

/// The ids of the special tokens used by the chat format.
struct Specials {
    bos: u32,
    user_start: u32,
    user_end: u32,
    assistant_start: u32,
    assistant_end: u32,
    python_start: u32,
    python_end: u32,
    output_start: u32,
    output_end: u32,
}

impl Specials {
    fn of(tok: &bpe::Tokenizer) -> Specials {
        // The nine specials always follow the mergeable tokens in `bpe::SPECIAL_TOKENS` order.
        let id = |i: u32| tok.bos_id() + i;
        Specials {
            bos: id(0),
            user_start: id(1),
            user_end: id(2),
            assistant_start: id(3),
            assistant_end: id(4),
            python_start: id(5),
            python_end: id(6),
            output_start: id(7),
            output_end: id(8),
        }
    }
}

/// Renders a conversation for training: `(ids, mask)`, both cut to `max_tokens`.
pub fn render_conversation(
    tok: &bpe::Tokenizer,
    conversation: &Conversation,
    max_tokens: usize,
) -> Result<(Vec<u32>, Vec<u8>), ConversationError> {
    let messages = merge_system(&conversation.messages)?;
    let sp = Specials::of(tok);
    let mut ids = vec![sp.bos];
    let mut mask = vec![0u8];
    let push = |new: &[u32], m: u8, ids: &mut Vec<u32>, mask: &mut Vec<u8>| {
        ids.extend_from_slice(new);
        mask.extend(std::iter::repeat_n(m, new.len()));
    };
    for (i, msg) in messages.iter().enumerate() {
        let expected = if i % 2 == 0 { Role::User } else { Role::Assistant };
        if msg.role != expected {
            return Err(ConversationError::RoleOrder { index: i, expected, got: msg.role });
        }
        match (&msg.role, &msg.content) {
            (Role::User, Content::Text(text)) => {
                push(&[sp.user_start], 0, &mut ids, &mut mask);
                push(&tok.encode(text), 0, &mut ids, &mut mask);
                push(&[sp.user_end], 0, &mut ids, &mut mask);
            }
            (Role::User, Content::Parts(_)) => return Err(ConversationError::UserParts { index: i }),
            (_, content) => {
                push(&[sp.assistant_start], 0, &mut ids, &mut mask);
                match content {
                    Content::Text(text) => push(&tok.encode(text), 1, &mut ids, &mut mask),
                    Content::Parts(parts) => {
                        for part in parts {
                            let body = tok.encode(&part.text);
                            match part.kind {
                                PartKind::Text => push(&body, 1, &mut ids, &mut mask),
                                PartKind::Python => {
                                    push(&[sp.python_start], 1, &mut ids, &mut mask);
                                    push(&body, 1, &mut ids, &mut mask);
                                    push(&[sp.python_end], 1, &mut ids, &mut mask);
                                }
                                PartKind::PythonOutput => {
                                    push(&[sp.output_start], 0, &mut ids, &mut mask);
                                    push(&body, 0, &mut ids, &mut mask);
                                    push(&[sp.output_end], 0, &mut ids, &mut mask);
                                }
                            }
                        }
                    }
                }
                push(&[sp.assistant_end], 1, &mut ids, &mut mask);
            }
        }
    }
    ids.truncate(max_tokens);
    mask.truncate(max_tokens);
    Ok((ids, mask))
}

/// Renders a conversation whose last (assistant) message the model is to write: the rest of the
/// conversation followed by `<|assistant_start|>`.
pub fn render_for_completion(tok: &bpe::Tokenizer, conversation: &Conversation) -> Result<Vec<u32>, ConversationError> {
    let Some((last, rest)) = conversation.messages.split_last() else {
        return Err(ConversationError::Empty);
    };
    if last.role != Role::Assistant {
        return Err(ConversationError::NoAssistantAtEnd);
    }
    let prefix = Conversation { messages: rest.to_vec() };
    let (mut ids, _) = render_conversation(tok, &prefix, 2048)?;
    ids.push(Specials::of(tok).assistant_start);
    Ok(ids)
}

/// Folds a leading system message into the first user message, separated by a blank line.
fn merge_system(messages: &[Message]) -> Result<Vec<Message>, ConversationError> {
    let Some(first) = messages.first() else {
        return Err(ConversationError::Empty);
    };
    if first.role != Role::System {
        return Ok(messages.to_vec());
    }
    let system = match &first.content {
        Content::Text(t) => t.clone(),
        Content::Parts(_) => return Err(ConversationError::UserParts { index: 0 }),
    };
    let mut rest = messages[1..].to_vec();
    match rest.first_mut() {
        Some(Message { role: Role::User, content: Content::Text(user) }) => {
            *user = format!("{system}\n\n{user}");
            Ok(rest)
        }
        Some(Message { role: Role::User, .. }) => Err(ConversationError::UserParts { index: 1 }),
        _ => Err(ConversationError::LoneSystem),
    }
}
