//! The model workers behind `nanochat serve`: N engines, each on its own OS thread (candle
//! inference blocks, so it must never run on the async runtime), fed from one bounded queue.
//!
//! Design choices:
//! - the queue is a `sync_channel(queue)` shared by the workers: `try_send` either hands the job to
//!   an idle worker, parks it in the queue, or fails at once, which the handlers turn into a 503;
//!   with `queue = 0` a request is accepted only when a worker is idle;
//! - a job streams [`Event`]s back over an unbounded tokio channel (at most `max_tokens` pieces);
//!   when the HTTP side drops the receiver (client gone, handler cancelled) the next send fails
//!   and the worker stops generating and takes the next job;
//! - every job carries a deadline, checked between decode steps, so no request holds a worker
//!   for longer than the server's time limit;
//! - a panic inside a job is caught and reported on that job's stream: the worker lives on.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use crate::engine::{Engine, GenerateOptions, TextStream};

/// What a worker reports about one job, in order: text pieces, then exactly one of `Done` or
/// `Error`.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Newly complete reply text (never empty) and the worker producing it.
    Text { text: String, worker: usize },
    /// The reply ended; `completion_tokens` counts generated tokens without the closing stop token.
    Done { completion_tokens: usize, finish: Finish },
    /// The request failed after it was accepted (time limit, engine error).
    Error(String),
}

/// Why a reply ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// The model closed its turn (`<|assistant_end|>` or `<|bos|>`).
    Stop,
    /// `max_tokens` reached.
    Length,
}

/// One request for a worker.
struct Job {
    prompt: Vec<u32>,
    opts: GenerateOptions,
    deadline: Instant,
    events: UnboundedSender<Event>,
}

/// Live counters, read by `/stats` and `/health`.
#[derive(Debug, Default)]
pub struct Stats {
    pub busy: AtomicUsize,
    pub queued: AtomicUsize,
    pub requests_served: AtomicU64,
    pub tokens_generated: AtomicU64,
    pub rejected_busy: AtomicU64,
}

/// A job could not be queued: every worker is busy and the queue is full (or shut down).
#[derive(Debug)]
pub struct Busy;

/// The workers and the sending side of their queue.
pub struct Pool {
    queue: Option<SyncSender<Job>>,
    threads: Vec<JoinHandle<()>>,
    stats: Arc<Stats>,
    time_limit: Duration,
    workers: usize,
    queue_capacity: usize,
}

impl Pool {
    /// Starts one thread per engine. `queue` jobs may wait for a worker beyond the ones running.
    pub fn start(engines: Vec<Engine>, queue: usize, time_limit: Duration) -> Result<Pool> {
        anyhow::ensure!(!engines.is_empty(), "the server needs at least one worker: pass --workers 1 or more");
        let (tx, rx) = sync_channel::<Job>(queue);
        let rx = Arc::new(Mutex::new(rx));
        let stats = Arc::new(Stats::default());
        let workers = engines.len();
        let mut threads = Vec::with_capacity(workers);
        for (id, engine) in engines.into_iter().enumerate() {
            let (rx, stats) = (Arc::clone(&rx), Arc::clone(&stats));
            let thread = std::thread::Builder::new()
                .name(format!("nanochat-worker-{id}"))
                .spawn(move || worker_loop(id, &engine, &rx, &stats))
                .context("starting a model worker thread")?;
            threads.push(thread);
        }
        Ok(Pool { queue: Some(tx), threads, stats, time_limit, workers, queue_capacity: queue })
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    pub fn workers(&self) -> usize {
        self.workers
    }

    pub fn queue_capacity(&self) -> usize {
        self.queue_capacity
    }

    pub fn time_limit(&self) -> Duration {
        self.time_limit
    }

    /// Queues a generation; its events arrive on the returned receiver. Fails at once when no
    /// worker is idle and the queue is full.
    pub fn submit(&self, prompt: Vec<u32>, opts: GenerateOptions) -> Result<UnboundedReceiver<Event>, Busy> {
        let queue = self.queue.as_ref().ok_or(Busy)?;
        let (events, rx) = unbounded_channel();
        let job = Job { prompt, opts, deadline: Instant::now() + self.time_limit, events };
        // counted before sending so a worker that picks the job up at once never sees it below zero
        self.stats.queued.fetch_add(1, Ordering::SeqCst);
        match queue.try_send(job) {
            Ok(()) => Ok(rx),
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.stats.queued.fetch_sub(1, Ordering::SeqCst);
                self.stats.rejected_busy.fetch_add(1, Ordering::SeqCst);
                Err(Busy)
            }
        }
    }

    /// Closes the queue and waits for the workers to finish their current and queued jobs (each
    /// bounded by the time limit).
    pub fn shutdown(mut self) {
        self.queue = None;
        for thread in self.threads.drain(..) {
            // a worker that panicked outside a job has nothing left to clean up
            let _ = thread.join();
        }
    }
}

fn worker_loop(id: usize, engine: &Engine, rx: &Mutex<Receiver<Job>>, stats: &Stats) {
    loop {
        // the lock is held while waiting so exactly one idle worker sits in `recv`: enough for a
        // zero-capacity queue to hand it a job, and the others queue up on the lock
        let job = match rx.lock() {
            Ok(rx) => rx.recv(),
            Err(_) => return,
        };
        let Ok(job) = job else { return };
        stats.queued.fetch_sub(1, Ordering::SeqCst);
        stats.busy.fetch_add(1, Ordering::SeqCst);
        let events = job.events.clone();
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| run_job(id, engine, job, stats)));
        let event = match outcome {
            Ok(Ok(Some(event))) => Some(event),
            Ok(Ok(None)) => None,
            Ok(Err(e)) => Some(Event::Error(format!("generation failed: {e:#}"))),
            Err(_) => Some(Event::Error("generation failed: the model worker panicked (see the server log)".into())),
        };
        // counted before the closing event goes out, so a client that saw its reply end sees the
        // worker free in /stats
        stats.busy.fetch_sub(1, Ordering::SeqCst);
        stats.requests_served.fetch_add(1, Ordering::SeqCst);
        if let Some(event) = event {
            // the client may be gone already: nothing to tell then
            let _ = events.send(event);
        }
    }
}

/// Generates one reply, sending its text as it completes. Returns the closing event, or `None`
/// when the client left (nobody to tell).
fn run_job(worker: usize, engine: &Engine, job: Job, stats: &Stats) -> Result<Option<Event>> {
    if job.events.is_closed() {
        return Ok(None);
    }
    let time_limit_error = || {
        Event::Error(
            "generation stopped: the server's time limit per request was reached; ask for fewer tokens or retry \
             when the server is less busy"
                .to_string(),
        )
    };
    if Instant::now() >= job.deadline {
        return Ok(Some(time_limit_error()));
    }
    let mut text = ReplyText::new(engine);
    let mut completion_tokens = 0;
    let mut finish = Finish::Length;
    for step in engine.generate(&job.prompt, &job.opts)? {
        let token = step?.0[0];
        if engine.specials().is_stop(token) {
            finish = Finish::Stop;
            break;
        }
        completion_tokens += 1;
        stats.tokens_generated.fetch_add(1, Ordering::SeqCst);
        let piece = text.push(token);
        if !piece.is_empty() && job.events.send(Event::Text { text: piece, worker }).is_err() {
            return Ok(None);
        }
        // a client that left between pieces (say, while a character is still incomplete)
        if job.events.is_closed() {
            return Ok(None);
        }
        if Instant::now() >= job.deadline {
            return Ok(Some(time_limit_error()));
        }
    }
    let rest = text.finish();
    if !rest.is_empty() && job.events.send(Event::Text { text: rest, worker }).is_err() {
        return Ok(None);
    }
    Ok(Some(Event::Done { completion_tokens, finish }))
}

/// The reply as text for the web: ordinary tokens through [`TextStream`] (whole characters only),
/// and the calculator's markers `<|python_start|>` `<|python_end|>` `<|output_start|>`
/// `<|output_end|>` as their names, as the original's server sends them, so the UI can show the
/// tool call. Other specials print nothing.
pub struct ReplyText<'a> {
    engine: &'a Engine,
    stream: TextStream,
}

impl<'a> ReplyText<'a> {
    pub fn new(engine: &'a Engine) -> Self {
        Self { engine, stream: TextStream::new() }
    }

    /// Adds one generated id; returns the text that became complete (possibly empty).
    pub fn push(&mut self, id: u32) -> String {
        let sp = self.engine.specials();
        let tok = self.engine.tokenizer();
        if [sp.python_start, sp.python_end, sp.output_start, sp.output_end].contains(&id) {
            let mut out = self.stream.finish();
            out.push_str(&tok.id_to_token(id));
            return out;
        }
        self.stream.push(tok, id)
    }

    /// What is left at the end: an unfinished character becomes U+FFFD.
    pub fn finish(&mut self) -> String {
        self.stream.finish()
    }
}
