//! `render_conversation` / `render_for_completion` against the original's ids and masks
//! (`tests/fixtures/parity/conversations.json`), and the errors for malformed conversations.

mod common;

use nanochat::conversation::*;

fn tokenizer() -> bpe::Tokenizer {
    common::tokenizer().unwrap()
}

fn cases() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(common::parity("conversations.json")).unwrap()).unwrap()
}

fn list<T: serde::de::DeserializeOwned>(v: &serde_json::Value) -> Vec<T> {
    serde_json::from_value(v.clone()).unwrap()
}

#[test]
fn render_conversation_matches_the_original() {
    let tok = tokenizer();
    let cases = cases();
    let cases = cases["render_conversation"].as_array().unwrap();
    assert_eq!(cases.len(), 7);
    for case in cases {
        let conv: Conversation = serde_json::from_value(case["conversation"].clone()).unwrap();
        let max = case["max_tokens"].as_u64().unwrap() as usize;
        let (ids, mask) = render_conversation(&tok, &conv, max).unwrap();
        assert_eq!(ids, list::<u32>(&case["ids"]), "{}", case["name"]);
        assert_eq!(mask, list::<u8>(&case["mask"]), "{}", case["name"]);
        assert_eq!(tok.decode(&ids), case["decoded"].as_str().unwrap());
    }
}

#[test]
fn render_for_completion_matches_the_original() {
    let tok = tokenizer();
    let cases = cases();
    for case in cases["render_for_completion"].as_array().unwrap() {
        let conv: Conversation = serde_json::from_value(case["conversation"].clone()).unwrap();
        assert_eq!(render_for_completion(&tok, &conv).unwrap(), list::<u32>(&case["ids"]), "{}", case["name"]);
    }
}

#[test]
fn malformed_conversations_are_clear_errors() {
    let tok = tokenizer();
    let conv = |msgs: Vec<Message>| Conversation { messages: msgs };
    let u = |t: &str| Message::new(Role::User, t);
    let a = |t: &str| Message::new(Role::Assistant, t);
    let s = |t: &str| Message::new(Role::System, t);

    assert_eq!(render_conversation(&tok, &conv(vec![]), 100), Err(ConversationError::Empty));
    let err = render_conversation(&tok, &conv(vec![u("a"), u("b")]), 100).unwrap_err();
    assert_eq!(err, ConversationError::RoleOrder { index: 1, expected: Role::Assistant, got: Role::User });
    assert!(err.to_string().contains("alternate"));
    assert!(matches!(
        render_conversation(&tok, &conv(vec![a("hi")]), 100),
        Err(ConversationError::RoleOrder { index: 0, .. })
    ));
    assert_eq!(render_conversation(&tok, &conv(vec![s("sys")]), 100), Err(ConversationError::LoneSystem));
    assert!(render_conversation(&tok, &conv(vec![s("sys"), a("x")]), 100).is_err());
    assert!(matches!(
        render_conversation(&tok, &conv(vec![u("a"), a("b"), s("late")]), 100),
        Err(ConversationError::RoleOrder { index: 2, .. })
    ));
    let parts =
        Message { role: Role::User, content: Content::Parts(vec![Part { kind: PartKind::Text, text: "x".into() }]) };
    assert_eq!(render_conversation(&tok, &conv(vec![parts]), 100), Err(ConversationError::UserParts { index: 0 }));
    assert_eq!(render_for_completion(&tok, &conv(vec![u("a")])), Err(ConversationError::NoAssistantAtEnd));
    // The system message folds into the user message exactly as "system\n\nuser".
    let (merged, _) = render_conversation(&tok, &conv(vec![s("S"), u("U")]), 100).unwrap();
    let (plain, _) = render_conversation(&tok, &conv(vec![u("S\n\nU")]), 100).unwrap();
    assert_eq!(merged, plain);
}
