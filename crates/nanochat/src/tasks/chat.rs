//! General chat conversations, the bulk of midtraining and SFT data.
//!
//! Online they are the original's, SmolTalk (`HuggingFaceTB/smol-smoltalk` on Hugging Face:
//! parquet, a `messages` list of `{content, role}`; train 460K conversations, test 24K). A mirror
//! has no SmolTalk; its ShareGPT conversations stand in, `sft/sharegpt_{train,test}.jsonl.gz`, one
//! `{"messages": [{"role", "content"}, …]}` per line. Any file of that shape loads with
//! [`ChatData::from_file`]. Conversations are kept as-is; malformed ones (bad JSON, roles out of
//! order, fewer than two turns) are skipped and counted rather than stopping a long training run
//! over one bad row.

use std::io::BufRead;
use std::path::Path;

use anyhow::{bail, Context, Result};

use super::{
    check_index, check_roles, for_each_parquet_row, open_text, Answer, DataRoot, EvalType, Example, Located, Task,
};
use crate::conversation::Conversation;
use crate::data::sources;

pub struct ChatData {
    name: String,
    conversations: Vec<Conversation>,
    skipped: usize,
}

impl ChatData {
    /// The chat conversations of `split` (`train` or `test`): SmolTalk online, the mirror's
    /// ShareGPT stand-in from a mirror.
    pub fn load(root: &DataRoot, split: &str) -> Result<ChatData> {
        if !matches!(split, "train" | "test") {
            bail!("the chat data split {split:?} does not exist: use \"train\" or \"test\"");
        }
        let mirror = format!("sft/sharegpt_{split}.jsonl.gz");
        match root.locate(&mirror, &sources::smoltalk(split), &format!("SmolTalk-{split}"))? {
            Located::Mirror(path) => ChatData::from_file(&path, &format!("ShareGPT-{split}")),
            Located::Online(paths) => {
                let mut data = ChatData { name: format!("SmolTalk-{split}"), conversations: Vec::new(), skipped: 0 };
                for_each_parquet_row(&paths, &mut |_, _, row| {
                    data.push(serde_json::from_value(row).ok());
                    Ok(())
                })?;
                Ok(data)
            }
        }
    }

    /// Loads any JSON-lines file (gzipped if its name ends in `.gz`) of `{"messages": …}` rows.
    pub fn from_file(path: &Path, name: &str) -> Result<ChatData> {
        let mut data = ChatData { name: name.to_string(), conversations: Vec::new(), skipped: 0 };
        for (i, line) in open_text(path)?.lines().enumerate() {
            let line = line.with_context(|| format!("reading {} line {}", path.display(), i + 1))?;
            if line.trim().is_empty() {
                continue;
            }
            data.push(serde_json::from_str::<Conversation>(&line).ok());
        }
        Ok(data)
    }

    /// Keeps `conversation` when it is well formed, else counts it as skipped.
    fn push(&mut self, conversation: Option<Conversation>) {
        match conversation {
            Some(conversation) if check_roles(&conversation).is_ok() => self.conversations.push(conversation),
            _ => self.skipped += 1,
        }
    }

    /// The original's CustomJSON: a file the user wrote, each line `{"messages": [{"role",
    /// "content"}, …]}` or the bare list of messages. Unlike [`ChatData::from_file`] every line is
    /// checked at load, so a typo in a hand-edited file is reported with its line rather than a
    /// conversation silently dropped.
    pub fn custom_json(path: &Path) -> Result<ChatData> {
        let mut conversations = Vec::new();
        for (i, line) in open_text(path)?.lines().enumerate() {
            let line = line.with_context(|| format!("reading {} line {}", path.display(), i + 1))?;
            if line.trim().is_empty() {
                continue;
            }
            let conversation = parse_custom_line(&line).with_context(|| {
                format!(
                    "{} line {}: expected a conversation like {{\"messages\": [{{\"role\": \"user\", \"content\": \"…\"}}, \
                     {{\"role\": \"assistant\", \"content\": \"…\"}}]}}; fix or remove the line",
                    path.display(),
                    i + 1
                )
            })?;
            conversations.push(conversation);
        }
        let name = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        Ok(ChatData { name, conversations, skipped: 0 })
    }

    /// How many malformed conversations were left out at load.
    pub fn skipped(&self) -> usize {
        self.skipped
    }
}

fn parse_custom_line(line: &str) -> Result<Conversation> {
    let value: serde_json::Value = serde_json::from_str(line).context("not valid JSON")?;
    let conversation = match value {
        serde_json::Value::Array(_) => Conversation { messages: serde_json::from_value(value)? },
        serde_json::Value::Object(_) => serde_json::from_value(value)?,
        _ => bail!("a line must hold a JSON object or array"),
    };
    check_roles(&conversation)?;
    Ok(conversation)
}

impl Task for ChatData {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn len(&self) -> usize {
        self.conversations.len()
    }

    fn get(&self, index: usize) -> Result<Example> {
        check_index(&self.name, index, self.conversations.len())?;
        Ok(Example { conversation: self.conversations[index].clone(), answer: Answer::None })
    }

    fn eval_type(&self) -> Option<EvalType> {
        None
    }
}
