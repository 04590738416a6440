//! A reply as its client receives it, whichever loop generates it: the tokens of each of its
//! choices (samples) become [`Event`]s of text, with their log-probabilities when asked, and each
//! choice ends on the model's own stop token, a stop string, or its token budget.
//!
//! Stop strings are matched on the reply's text (calculator annotations included, see
//! [`transcript`](super::transcript)), across token boundaries: text that could be the start of a
//! stop string is held back until the next tokens show it is not; when one completes, the text
//! before it is sent and the rest, the stop string included, never is. A token's log-probability
//! goes out with the first text it contributes to (a token that only starts a character waits for
//! the token that completes it), and a token whose text is entirely cut by a stop string is not
//! reported.

use std::time::Instant;

use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};

use super::metrics::Stats;
use super::transcript::ReplyText;
use crate::engine::{Engine, TokenLogprob};

/// What a worker reports about one job, in order: text pieces and the end of each choice, then
/// exactly one of `Done` or `Error`.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Newly complete text of choice `index` and the log-probabilities of the tokens it comes
    /// from (when asked for), from the worker producing it.
    Text { index: usize, text: String, logprobs: Vec<TokenInfo>, worker: usize },
    /// Choice `index` ended.
    End { index: usize, finish: Finish },
    /// Every choice ended. `completion_tokens` counts generated tokens without the closing stop
    /// tokens, over all choices; `cached_tokens` is the part of the prompt the prompt cache saved
    /// from prefilling.
    Done { completion_tokens: usize, cached_tokens: usize },
    /// The request failed after it was accepted (time limit, engine error).
    Error(String),
}

/// Why a choice ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// The model closed its turn (`<|assistant_end|>` or `<|bos|>`) or wrote a stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
}

/// A generated token's log-probabilities and where its text starts in its choice's text, in
/// characters.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenInfo {
    pub offset: usize,
    pub logprob: TokenLogprob,
}

/// A reply read to its end, for the APIs that answer in one body: each choice's text and the
/// log-probabilities of its tokens (when asked for), why it ended, and the counts of `Done`.
pub(crate) struct Gathered {
    pub(crate) text: Vec<String>,
    pub(crate) logprobs: Vec<Vec<TokenInfo>>,
    pub(crate) finish: Vec<Finish>,
    pub(crate) completion_tokens: usize,
    pub(crate) cached_tokens: usize,
}

impl Gathered {
    /// Reads the events of a reply of `n` choices to its `Done`; the worker's message on `Error`
    /// or when the events stop first.
    pub(crate) async fn read(events: &mut UnboundedReceiver<Event>, n: usize) -> Result<Gathered, String> {
        let mut reply = Gathered {
            text: vec![String::new(); n],
            logprobs: vec![Vec::new(); n],
            finish: vec![Finish::Length; n],
            completion_tokens: 0,
            cached_tokens: 0,
        };
        while let Some(event) = events.recv().await {
            match event {
                Event::Text { index, text, logprobs, .. } => {
                    if let (Some(t), Some(l)) = (reply.text.get_mut(index), reply.logprobs.get_mut(index)) {
                        t.push_str(&text);
                        l.extend(logprobs);
                    }
                }
                Event::End { index, finish } => {
                    if let Some(slot) = reply.finish.get_mut(index) {
                        *slot = finish;
                    }
                }
                Event::Error(message) => return Err(message),
                Event::Done { completion_tokens, cached_tokens } => {
                    reply.completion_tokens = completion_tokens;
                    reply.cached_tokens = cached_tokens;
                    return Ok(reply);
                }
            }
        }
        Err("the model worker stopped without finishing the reply".into())
    }
}

/// What [`Reply::push`] made of a token.
pub(crate) enum Pushed {
    /// The choice goes on.
    Continue,
    /// The choice ended (its `End` is sent).
    Ended,
    /// The whole reply must end now: with this closing event, or none when the client left.
    Over(Option<Event>),
}

/// Text and log-probabilities ready to send.
#[derive(Default)]
struct Piece {
    text: String,
    logprobs: Vec<TokenInfo>,
}

/// One choice's text on its way out.
struct ChoiceText<'e> {
    text: ReplyText<'e>,
    /// Generated text not sent yet: held back while it could be the start of a stop string.
    held: String,
    /// Log-probabilities of tokens whose text is not sent yet, with the byte offset in `held`
    /// where their text starts.
    pending: Vec<(usize, TokenLogprob)>,
    sent_chars: usize,
    tokens: usize,
    ended: bool,
    /// When its last token came, for the per-token latency.
    last_token: Option<Instant>,
}

impl<'e> ChoiceText<'e> {
    fn new(engine: &'e Engine) -> Self {
        ChoiceText {
            text: ReplyText::new(engine),
            held: String::new(),
            pending: Vec::new(),
            sent_chars: 0,
            tokens: 0,
            ended: false,
            last_token: None,
        }
    }

    /// Adds a token's text; returns what may be sent now and whether a stop string completed (after
    /// which nothing more is sent).
    fn push(&mut self, token: u32, logprob: Option<TokenLogprob>, stops: &[String]) -> (Piece, bool) {
        if let Some(logprob) = logprob {
            self.pending.push((self.held.len(), logprob));
        }
        let new = self.text.push(token);
        self.held.push_str(&new);
        if let Some(at) = stops.iter().filter_map(|s| self.held.find(s.as_str())).min() {
            let piece = self.release(at, false);
            self.held.clear();
            self.pending.clear();
            return (piece, true);
        }
        let keep = stops.iter().map(|s| held_back(&self.held, s)).max().unwrap_or(0);
        (self.release(self.held.len() - keep, false), false)
    }

    /// Everything left, at the end of the choice.
    fn finish(&mut self) -> Piece {
        let rest = self.text.finish();
        self.held.push_str(&rest);
        self.release(self.held.len(), true)
    }

    /// Sends the first `upto` bytes of the held text with the log-probabilities of the tokens whose
    /// text starts there (or of every pending token with `all`).
    fn release(&mut self, upto: usize, all: bool) -> Piece {
        let text: String = self.held.drain(..upto).collect();
        let (sent, kept): (Vec<_>, Vec<_>) = self.pending.drain(..).partition(|(start, _)| all || *start < upto);
        let logprobs = sent
            .into_iter()
            .map(|(start, logprob)| {
                let start = start.min(text.len());
                TokenInfo { offset: self.sent_chars + text[..start].chars().count(), logprob }
            })
            .collect();
        self.pending = kept.into_iter().map(|(start, logprob)| (start - upto, logprob)).collect();
        self.sent_chars += text.chars().count();
        Piece { text, logprobs }
    }
}

/// How many bytes at the end of `held` are the start of `stop` (a proper prefix of it): the text
/// to hold back until the next tokens decide.
fn held_back(held: &str, stop: &str) -> usize {
    (1..stop.len()).rev().find(|&k| stop.is_char_boundary(k) && held.ends_with(&stop[..k])).unwrap_or(0)
}

/// A reply being generated: its choices and the channel to its client.
pub(crate) struct Reply<'e> {
    worker: usize,
    engine: &'e Engine,
    events: UnboundedSender<Event>,
    submitted: Instant,
    deadline: Instant,
    stops: Vec<String>,
    choices: Vec<ChoiceText<'e>>,
    cached_tokens: usize,
    first_token_seen: bool,
}

impl<'e> Reply<'e> {
    pub(crate) fn new(
        worker: usize,
        engine: &'e Engine,
        choices: usize,
        stops: Vec<String>,
        events: UnboundedSender<Event>,
        (submitted, deadline): (Instant, Instant),
    ) -> Self {
        Reply {
            worker,
            engine,
            events,
            submitted,
            deadline,
            stops,
            choices: (0..choices).map(|_| ChoiceText::new(engine)).collect(),
            cached_tokens: 0,
            first_token_seen: false,
        }
    }

    /// The prompt tokens the prompt cache saved, reported in `Done`.
    pub(crate) fn set_cached_tokens(&mut self, cached: usize) {
        self.cached_tokens = cached;
    }

    /// `Some(closing event or None)` when the reply must end now: the client left, or its time ran out.
    pub(crate) fn check(&self) -> Option<Option<Event>> {
        if self.events.is_closed() {
            return Some(None);
        }
        if Instant::now() >= self.deadline {
            return Some(Some(Event::Error(
                "generation stopped: the server's time limit per request was reached; ask for fewer tokens or \
                 retry when the server is less busy"
                    .to_string(),
            )));
        }
        None
    }

    pub(crate) fn is_ended(&self, index: usize) -> bool {
        self.choices.get(index).is_none_or(|c| c.ended)
    }

    /// Whether every choice ended.
    pub(crate) fn all_ended(&self) -> bool {
        self.choices.iter().all(|c| c.ended)
    }

    /// Takes choice `index`'s next token (and its log-probabilities when asked for).
    pub(crate) fn push(&mut self, index: usize, token: u32, logprob: Option<TokenLogprob>, stats: &Stats) -> Pushed {
        if self.is_ended(index) {
            return Pushed::Continue;
        }
        let now = Instant::now();
        if !std::mem::replace(&mut self.first_token_seen, true) {
            stats.ttft.observe(now - self.submitted);
        }
        let choice = &mut self.choices[index];
        if let Some(last) = choice.last_token.replace(now) {
            stats.token_latency.observe(now - last);
        }
        if self.engine.specials().is_stop(token) {
            return self.end(index, Finish::Stop);
        }
        choice.tokens += 1;
        stats.tokens_generated.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let (piece, stopped) = choice.push(token, logprob, &self.stops);
        if !self.send(index, piece) {
            return Pushed::Over(None);
        }
        if stopped {
            return self.end(index, Finish::Stop);
        }
        match self.check() {
            Some(over) => Pushed::Over(over),
            None => Pushed::Continue,
        }
    }

    /// Ends choice `index`: the text still held back, then its `End`.
    pub(crate) fn end(&mut self, index: usize, finish: Finish) -> Pushed {
        let Some(choice) = self.choices.get_mut(index).filter(|c| !c.ended) else { return Pushed::Ended };
        choice.ended = true;
        let piece = choice.finish();
        if !self.send(index, piece) || self.events.send(Event::End { index, finish }).is_err() {
            return Pushed::Over(None);
        }
        Pushed::Ended
    }

    /// Ends every choice still going with `finish`; the closing event, or `None` when the client
    /// left.
    pub(crate) fn finish_all(&mut self, finish: Finish) -> Option<Event> {
        for index in 0..self.choices.len() {
            if let Pushed::Over(over) = self.end(index, finish) {
                return over;
            }
        }
        Some(self.done())
    }

    /// The closing event of a reply whose choices all ended.
    pub(crate) fn done(&self) -> Event {
        Event::Done {
            completion_tokens: self.choices.iter().map(|c| c.tokens).sum(),
            cached_tokens: self.cached_tokens,
        }
    }

    /// Sends a piece unless it is empty; false when the client left.
    fn send(&self, index: usize, piece: Piece) -> bool {
        if piece.text.is_empty() && piece.logprobs.is_empty() {
            return true;
        }
        let event = Event::Text { index, text: piece.text, logprobs: piece.logprobs, worker: self.worker };
        self.events.send(event).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::held_back;

    #[test]
    fn held_back_is_the_longest_proper_prefix_of_the_stop_string_at_the_end() {
        assert_eq!(held_back("hello wor", "world"), 3);
        assert_eq!(held_back("hello", "world"), 0);
        assert_eq!(held_back("abab", "abc"), 2);
        assert_eq!(held_back("x", "x"), 0, "a whole stop string is found, not held");
        assert_eq!(held_back("café ", "é!"), 0);
        assert_eq!(held_back("caf\u{e9}", "\u{e9}!"), 2, "a multi-byte character is held whole");
    }
}
