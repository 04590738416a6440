//! `nanochat chat` driven as a user would, through piped stdin and the one-shot `-p`, over a
//! checkpoint made from the fixture model: the streamed reply must be the engine's greedy reply,
//! with no special-token strings, and `clear` / `quit` must work; `chat eval` is reachable as a subcommand.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Context, Result};
use nanochat::engine::{GenerateOptions, TextStream};

/// A base dir holding the fixture tokenizer and the fixture weights as SFT checkpoint d2, step 5.
fn base_dir() -> Result<tempfile::TempDir> {
    let base = tempfile::tempdir()?;
    common::fixture_checkpoint(base.path(), "chatsft_checkpoints")?;
    Ok(base)
}

/// The greedy reply to `question` at the start of a conversation, as printed text.
fn expected_reply(question: &str, max_tokens: usize) -> Result<String> {
    let engine = common::fixture_engine()?;
    let tok = engine.tokenizer();
    let special = |name: &str| tok.special_id(name).context(name.to_string());
    let prompt = [
        vec![tok.bos_id(), special("<|user_start|>")?],
        tok.encode(question),
        vec![special("<|user_end|>")?, special("<|assistant_start|>")?],
    ]
    .concat();
    let opts =
        GenerateOptions { num_samples: 1, max_tokens, temperature: 0.0, top_k: None, seed: 0, ..Default::default() };
    let mut text = TextStream::new();
    let mut reply = String::new();
    for step in engine.generate(&prompt, &opts)? {
        reply.push_str(&text.push(tok, step?.0[0]));
    }
    reply.push_str(&text.finish());
    Ok(reply)
}

fn chat(base: &Path, args: &[&str], stdin: &str) -> Result<String> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_nanochat"))
        .arg("chat")
        .args(args)
        .env("NANOCHAT_BASE_DIR", base)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child.stdin.take().context("stdin")?.write_all(stdin.as_bytes())?;
    let out = child.wait_with_output()?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    anyhow::ensure!(out.status.success(), "nanochat chat failed: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    Ok(stdout)
}

#[test]
fn interactive_chat_streams_the_greedy_reply_and_handles_clear_and_quit() -> Result<()> {
    let base = base_dir()?;
    let reply = expected_reply("Hello there", 12)?;
    assert!(!reply.trim().is_empty());
    let out = chat(base.path(), &["-t", "0", "--max-tokens", "12"], "Hello there\nclear\nHello there\nquit\n")?;
    println!("{out}");
    assert_eq!(out.matches(&format!("Assistant: {reply}\n")).count(), 2, "after clear the same reply again");
    assert!(out.contains("Conversation cleared."));
    assert!(out.contains("Goodbye!"));
    assert!(!out.contains("<|"), "special-token strings were printed");
    Ok(())
}

#[test]
fn one_shot_prompt_prints_one_reply_and_exits() -> Result<()> {
    let base = base_dir()?;
    let reply = expected_reply("What is 2+2?", 10)?;
    let out = chat(base.path(), &["-p", "What is 2+2?", "-t", "0", "--max-tokens", "10", "-i", "sft", "-g", "d2"], "")?;
    assert_eq!(out, format!("\nAssistant: {reply}\n"));
    Ok(())
}

#[test]
fn a_missing_checkpoint_is_a_clear_error() -> Result<()> {
    let base = base_dir()?;
    let out = Command::new(env!("CARGO_BIN_EXE_nanochat"))
        .args(["chat", "-p", "hi", "-i", "rl"])
        .env("NANOCHAT_BASE_DIR", base.path())
        .output()?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("chatrl_checkpoints") && err.contains("train that stage first"), "{err}");
    Ok(())
}

#[test]
fn chat_eval_is_a_subcommand_with_its_own_options() -> Result<()> {
    let help = Command::new(env!("CARGO_BIN_EXE_nanochat")).args(["chat", "eval", "--help"]).output()?;
    assert!(help.status.success(), "{}", String::from_utf8_lossy(&help.stderr));
    let text = String::from_utf8_lossy(&help.stdout);
    assert!(text.contains("--task-name") && text.contains("--max-problems"), "{text}");
    // the task list is checked before any model is loaded, so a typo fails fast and says what to use
    let base = base_dir()?;
    let bad = Command::new(env!("CARGO_BIN_EXE_nanochat"))
        .args(["chat", "eval", "-a", "ARC-Hard"])
        .env("NANOCHAT_BASE_DIR", base.path())
        .output()?;
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("unknown task") && err.contains("ARC-Easy"), "{err}");
    Ok(())
}
