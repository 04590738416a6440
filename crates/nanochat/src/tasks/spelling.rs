//! Spelling tasks, generated from a word list: SpellingBee ("how many r are in strawberry?") and
//! SimpleSpelling ("spell the word: …"). Letter counting is hard for a model that sees tokens, not
//! letters; the original teaches it to spell the word out, count by hand, then check with a
//! calculator call `'word'.count('x')`, and these tasks reproduce that format.
//!
//! The word list is the original's, `words_alpha.txt` of `dwyl/english-words` on GitHub (CRLF line
//! endings), downloaded on first use, or a mirror's `words/words_alpha.txt`. Example `i` is generated from its own
//! generator seeded by (task, split, `i`), so any example can be built alone, always the same.

use std::sync::Arc;

use anyhow::{Context, Result};
use rand::seq::IndexedRandom;
use rand::Rng;

use super::{check_index, example_rng, Answer, DataRoot, EvalType, Example, Task};
use crate::conversation::{Content, Conversation, Message, Part, PartKind, Role};
use crate::data::sources::Dataset;

/// Which side of the train/test divide the generated examples fall on: the two splits draw from
/// disjoint seed streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    Test,
}

impl Split {
    fn as_str(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Test => "test",
        }
    }
}

/// Loads the word list, one lowercase word per line; blank lines and line endings are dropped.
pub fn load_words(root: &DataRoot) -> Result<Arc<[String]>> {
    let path = root.locate_file("words/words_alpha.txt", Dataset::Words, "the SpellingBee word list")?;
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let words: Arc<[String]> = text.lines().map(str::trim).filter(|w| !w.is_empty()).map(String::from).collect();
    anyhow::ensure!(!words.is_empty(), "{} holds no words", path.display());
    Ok(words)
}

/// Ways to ask the question; `{letter}` and `{word}` are filled in (possibly quoted).
const TEMPLATES: [&str; 22] = [
    "How many {letter} are in the word {word}",
    "How many {letter} are in {word}",
    "How many {letter}'s are in {word}",
    "How many times does {letter} appear in {word}",
    "How many times does the letter {letter} occur in {word}",
    "Count the number of {letter} in {word}",
    "Count how many {letter} appear in {word}",
    "Can you count the {letter} letters in {word}",
    "What's the count of {letter} in {word}",
    "In the word {word}, how many {letter} are there",
    "In {word}, how many times does {letter} show up",
    "Tell me how many {letter} there are in {word}",
    "Find the number of {letter} in {word}",
    "How often does {letter} appear in the word {word}",
    "¿Cuántas {letter} hay en {word}",
    "¿Cuántas veces aparece la letra {letter} en {word}",
    "Combien de {letter} y a-t-il dans {word}",
    "Wie oft kommt {letter} in {word} vor",
    "{word}中有多少个{letter}",
    "{word}里有几个{letter}",
    "{word}에 {letter}가 몇 개 있나요",
    "{word}に{letter}はいくつありますか",
];

const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz";

/// Seed streams, one per (task, split), so the tasks and splits never share a generator.
const BEE_TRAIN: u64 = 1;
const BEE_TEST: u64 = 2;
const SIMPLE_TRAIN: u64 = 3;
const SIMPLE_TEST: u64 = 4;

/// "How many X are in W?", answered by spelling, counting, a calculator check and `#### N`.
pub struct SpellingBee {
    words: Arc<[String]>,
    size: usize,
    split: Split,
}

impl SpellingBee {
    pub fn new(words: Arc<[String]>, size: usize, split: Split) -> SpellingBee {
        SpellingBee { words, size, split }
    }
}

impl Task for SpellingBee {
    fn name(&self) -> String {
        format!("SpellingBee-{}", self.split.as_str())
    }

    fn len(&self) -> usize {
        self.size
    }

    fn get(&self, index: usize) -> Result<Example> {
        check_index(&self.name(), index, self.size)?;
        let mut rng = example_rng(if self.split == Split::Train { BEE_TRAIN } else { BEE_TEST }, index);
        let word = self.words.choose(&mut rng).context("the word list is empty")?;
        // Mostly a letter of the word; sometimes one it may not contain, so 0 is a possible answer.
        let letter = if rng.random::<f64>() < 0.9 {
            word.chars().nth(rng.random_range(0..word.chars().count())).unwrap_or('a')
        } else {
            char::from(ALPHABET[rng.random_range(0..ALPHABET.len())])
        };
        let count = word.chars().filter(|&c| c == letter).count();

        let mut template = TEMPLATES[rng.random_range(0..TEMPLATES.len())].to_string();
        if rng.random::<f64>() < 0.3 {
            template = template.to_lowercase();
        }
        let quotes = ["", "'", "\""];
        let letter_quote = quotes[rng.random_range(0..quotes.len())];
        let word_quote = quotes[rng.random_range(0..quotes.len())];
        let mut question = template
            .replace("{letter}", &format!("{letter_quote}{letter}{letter_quote}"))
            .replace("{word}", &format!("{word_quote}{word}{word_quote}"));
        if rng.random::<f64>() < 0.5 {
            question.push('?');
        }

        let mut manual = format!(
            "We are asked to find the number '{letter}' in the word '{word}'. Let me try a manual approach first.\n\n\
             First spell the word out:\n{word}:{}\n\nThen count the occurrences of '{letter}':\n",
            spelled(word)
        );
        let mut running = 0;
        for (i, c) in word.chars().enumerate() {
            if c == letter {
                running += 1;
                manual.push_str(&format!("{}:{c} hit! count={running}\n", i + 1));
            } else {
                manual.push_str(&format!("{}:{c}\n", i + 1));
            }
        }
        manual.push_str(&format!("\nThis gives us {running}."));
        let part = |kind, text: String| Part { kind, text };
        let parts = vec![
            part(PartKind::Text, manual),
            part(PartKind::Text, "\n\nLet me double check this using Python:\n\n".to_string()),
            part(PartKind::Python, format!("'{word}'.count('{letter}')")),
            part(PartKind::PythonOutput, count.to_string()),
            part(PartKind::Text, format!("\n\nPython gives us {count}.\n\nMy final answer is:\n\n#### {count}")),
        ];
        let messages =
            vec![Message::new(Role::User, question), Message { role: Role::Assistant, content: Content::Parts(parts) }];
        Ok(Example { conversation: Conversation { messages }, answer: Answer::Final(count.to_string()) })
    }

    fn eval_type(&self) -> Option<EvalType> {
        Some(EvalType::Generative)
    }
}

/// "Spell the word: W" → "W:w,o,r,d": the spelling step of SpellingBee on its own, to teach the
/// mapping from a word's tokens to its letters.
pub struct SimpleSpelling {
    words: Arc<[String]>,
    size: usize,
    split: Split,
}

impl SimpleSpelling {
    pub fn new(words: Arc<[String]>, size: usize, split: Split) -> SimpleSpelling {
        SimpleSpelling { words, size, split }
    }
}

impl Task for SimpleSpelling {
    fn name(&self) -> String {
        format!("SimpleSpelling-{}", self.split.as_str())
    }

    fn len(&self) -> usize {
        self.size
    }

    fn get(&self, index: usize) -> Result<Example> {
        check_index(&self.name(), index, self.size)?;
        let mut rng = example_rng(if self.split == Split::Train { SIMPLE_TRAIN } else { SIMPLE_TEST }, index);
        let word = self.words.choose(&mut rng).context("the word list is empty")?;
        let messages = vec![
            Message::new(Role::User, format!("Spell the word: {word}")),
            Message::new(Role::Assistant, format!("{word}:{}", spelled(word))),
        ];
        Ok(Example { conversation: Conversation { messages }, answer: Answer::None })
    }

    fn eval_type(&self) -> Option<EvalType> {
        None
    }
}

/// `word` → `w,o,r,d`.
fn spelled(word: &str) -> String {
    word.chars().map(String::from).collect::<Vec<_>>().join(",")
}
