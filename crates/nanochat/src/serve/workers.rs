//! The model workers behind `nanochat serve`: N engines, each on its own OS thread (inference
//! blocks, so it must never run on the async runtime), fed from one queue.
//!
//! Design choices:
//! - continuous batching: a worker with the native CPU backend decodes the replies of up to
//!   `batch` requests together, one token for all of them per step (each weight is read once per
//!   step for every reply), admitting queued requests between steps and dropping finished ones,
//!   so throughput grows with concurrency; every reply keeps its own sampler seeded by its
//!   request, so what it generates does not depend on what it was batched with. `batch = 1` is
//!   one request at a time. Engines on a GPU (the candle backend) serve one request at a time;
//! - admission is bounded: at most `workers × batch` requests generate and `queue` more wait;
//!   beyond that `submit` fails at once, which the handlers turn into a 503;
//! - a job streams [`Event`]s back over an unbounded tokio channel (at most `max_tokens` pieces);
//!   when the HTTP side drops the receiver (client gone, handler cancelled) the next send fails
//!   and the worker drops the reply and frees its slot;
//! - every job carries a deadline, checked between decode steps, so no request holds a slot for
//!   longer than the server's time limit;
//! - a panic inside generation is caught and reported on the streams of the replies it hit: the
//!   worker lives on.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use rand::rngs::StdRng;
use rand::SeedableRng;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use crate::engine::{sample, Engine, GenerateOptions, RowState, TextStream};
use crate::model::decode::{DecodeCache, DecodeModel};

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
    /// Requests being generated.
    pub busy: AtomicUsize,
    /// Requests waiting for a slot.
    pub queued: AtomicUsize,
    /// Workers whose every slot is taken.
    pub full_workers: AtomicUsize,
    pub requests_served: AtomicU64,
    pub tokens_generated: AtomicU64,
    pub rejected_busy: AtomicU64,
    /// The largest number of replies decoded together in one step so far.
    pub peak_batch: AtomicUsize,
}

/// A job could not be queued: every slot is busy and the queue is full (or shut down).
#[derive(Debug)]
pub struct Busy;

/// The workers and the sending side of their queue.
pub struct Pool {
    queue: Option<Sender<Job>>,
    threads: Vec<JoinHandle<()>>,
    stats: Arc<Stats>,
    /// Requests accepted and not yet answered (generating or waiting).
    in_flight: Arc<AtomicUsize>,
    time_limit: Duration,
    workers: usize,
    batch: usize,
    queue_capacity: usize,
}

impl Pool {
    /// Starts one thread per engine, each generating up to `batch` replies at once. `queue`
    /// requests may wait for a slot beyond the ones generating.
    pub fn start(engines: Vec<Engine>, batch: usize, queue: usize, time_limit: Duration) -> Result<Pool> {
        ensure!(!engines.is_empty(), "the server needs at least one worker: pass --workers 1 or more");
        ensure!(batch > 0, "--batch must be at least 1");
        let (tx, rx) = channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let stats = Arc::new(Stats::default());
        let in_flight = Arc::new(AtomicUsize::new(0));
        let workers = engines.len();
        let mut threads = Vec::with_capacity(workers);
        for (id, engine) in engines.into_iter().enumerate() {
            let worker =
                Worker { id, rx: Arc::clone(&rx), stats: Arc::clone(&stats), in_flight: Arc::clone(&in_flight) };
            let thread = std::thread::Builder::new()
                .name(format!("nanochat-worker-{id}"))
                .spawn(move || worker.run(&engine, batch))
                .context("starting a model worker thread")?;
            threads.push(thread);
        }
        Ok(Pool { queue: Some(tx), threads, stats, in_flight, time_limit, workers, batch, queue_capacity: queue })
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    pub fn workers(&self) -> usize {
        self.workers
    }

    /// Replies each worker generates together.
    pub fn batch(&self) -> usize {
        self.batch
    }

    pub fn queue_capacity(&self) -> usize {
        self.queue_capacity
    }

    pub fn time_limit(&self) -> Duration {
        self.time_limit
    }

    /// Queues a generation; its events arrive on the returned receiver. Fails at once when every
    /// slot is generating and the queue is full.
    pub fn submit(&self, prompt: Vec<u32>, opts: GenerateOptions) -> Result<UnboundedReceiver<Event>, Busy> {
        let queue = self.queue.as_ref().ok_or(Busy)?;
        let limit = self.workers * self.batch + self.queue_capacity;
        if self.in_flight.fetch_add(1, Ordering::SeqCst) >= limit {
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            self.stats.rejected_busy.fetch_add(1, Ordering::SeqCst);
            return Err(Busy);
        }
        let (events, rx) = unbounded_channel();
        let job = Job { prompt, opts, deadline: Instant::now() + self.time_limit, events };
        // counted before sending so a worker that picks the job up at once never sees it below zero
        self.stats.queued.fetch_add(1, Ordering::SeqCst);
        if queue.send(job).is_err() {
            self.stats.queued.fetch_sub(1, Ordering::SeqCst);
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            return Err(Busy);
        }
        Ok(rx)
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

/// What a worker thread shares with the pool.
struct Worker {
    id: usize,
    rx: Arc<Mutex<Receiver<Job>>>,
    stats: Arc<Stats>,
    in_flight: Arc<AtomicUsize>,
}

impl Worker {
    fn run(&self, engine: &Engine, batch: usize) {
        match engine.native() {
            Some(native) => self.run_batched(engine, native, batch),
            None => self.run_one_at_a_time(engine),
        }
    }

    /// Waits for the next job; `None` once the queue is closed and empty. The lock is held while
    /// waiting, so one idle worker sits in `recv` and the others queue up on the lock.
    fn wait_for_job(&self) -> Option<Job> {
        self.rx.lock().ok()?.recv().ok()
    }

    /// A waiting job if there is one at hand, without blocking: a worker that is generating
    /// leaves jobs to the idle worker waiting in `recv`, if any.
    fn try_take_job(&self) -> Option<Job> {
        self.rx.try_lock().ok()?.try_recv().ok()
    }

    /// Bookkeeping when a job leaves the queue for a slot.
    fn admitted(&self) {
        self.stats.queued.fetch_sub(1, Ordering::SeqCst);
        self.stats.busy.fetch_add(1, Ordering::SeqCst);
    }

    /// Ends a job: counted first, so a client that saw its reply end sees the slot free in
    /// `/stats`, then the closing event, if there is anyone left to tell.
    fn close(&self, events: &UnboundedSender<Event>, event: Option<Event>) {
        self.stats.busy.fetch_sub(1, Ordering::SeqCst);
        self.stats.requests_served.fetch_add(1, Ordering::SeqCst);
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        if let Some(event) = event {
            let _ = events.send(event);
        }
    }

    fn run_one_at_a_time(&self, engine: &Engine) {
        while let Some(job) = self.wait_for_job() {
            self.admitted();
            self.stats.full_workers.fetch_add(1, Ordering::SeqCst);
            let events = job.events.clone();
            let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| self.generate_one(engine, job)));
            self.stats.full_workers.fetch_sub(1, Ordering::SeqCst);
            self.close(&events, outcome.unwrap_or_else(|_| Some(panicked())));
        }
    }

    /// Generates one reply with the engine's own loop. Returns the closing event, or `None` when
    /// the client left.
    fn generate_one(&self, engine: &Engine, job: Job) -> Option<Event> {
        let mut reply = Reply::new(self.id, engine, job);
        if let Some(over) = reply.check() {
            return over;
        }
        let generation = match engine.generate(&reply.job.prompt, &reply.job.opts) {
            Ok(generation) => generation,
            Err(e) => return Some(failed(&e)),
        };
        for step in generation {
            match step {
                Ok((column, _)) => {
                    if let Some(over) = reply.push(column[0], &self.stats) {
                        return over;
                    }
                }
                Err(e) => return Some(failed(&e)),
            }
        }
        reply.finish(Finish::Length)
    }

    /// Continuous batching over the native model: up to `batch` replies in the slots of one cache.
    fn run_batched(&self, engine: &Engine, native: &DecodeModel, batch: usize) {
        let capacity = match engine.max_positions() {
            Ok(capacity) => capacity,
            Err(e) => return self.fail_all_jobs(&format!("{e:#}")),
        };
        let mut cache = match native.new_cache(batch, capacity) {
            Ok(cache) => cache,
            Err(e) => return self.fail_all_jobs(&format!("{e:#}")),
        };
        let mut active: Vec<Active> = Vec::with_capacity(batch);
        loop {
            // Admit: block only when idle, otherwise take what is waiting into the free slots.
            let mut jobs = Vec::new();
            if active.is_empty() {
                match self.wait_for_job() {
                    Some(job) => jobs.push(job),
                    None => return,
                }
            }
            while active.len() + jobs.len() < batch {
                match self.try_take_job() {
                    Some(job) => jobs.push(job),
                    None => break,
                }
            }
            let was_full = active.len() == batch;
            for job in jobs {
                self.admitted();
                let slot = (0..batch).find(|s| active.iter().all(|a| a.slot != *s)).unwrap_or(0);
                let events = job.events.clone();
                let started = std::panic::catch_unwind(AssertUnwindSafe(|| {
                    Active::start(self.id, engine, native, &mut cache, slot, job, &self.stats)
                }));
                match started {
                    Ok(Ok(active_reply)) => active.push(active_reply),
                    Ok(Err(over)) => self.close(&events, over),
                    Err(_) => self.close(&events, Some(panicked())),
                }
            }
            self.track_full(was_full, active.len() == batch);
            if active.is_empty() {
                continue;
            }
            self.stats.peak_batch.fetch_max(active.len(), Ordering::SeqCst);
            // Decode one token for every reply, then let each reply take it.
            let was_full = active.len() == batch;
            let stepped = std::panic::catch_unwind(AssertUnwindSafe(|| {
                let rows: Vec<(usize, u32)> = active.iter().map(|a| (a.slot, a.last)).collect();
                let logits = native.step(&mut cache, &rows)?;
                let vocab = logits.len() / rows.len();
                let mut overs = Vec::new();
                for (i, a) in active.iter_mut().enumerate() {
                    if let Some(over) = a.advance(&logits[i * vocab..(i + 1) * vocab], engine, &self.stats) {
                        overs.push((i, over));
                    }
                }
                Ok::<_, anyhow::Error>(overs)
            }));
            match stepped {
                Ok(Ok(overs)) => {
                    for (i, over) in overs.into_iter().rev() {
                        let done = active.swap_remove(i);
                        self.close(&done.reply.job.events, over);
                    }
                }
                failure => {
                    let event = match failure {
                        Ok(Err(e)) => failed(&e),
                        _ => panicked(),
                    };
                    for done in active.drain(..) {
                        self.close(&done.reply.job.events, Some(event.clone()));
                    }
                }
            }
            self.track_full(was_full, active.len() == batch);
        }
    }

    fn track_full(&self, was_full: bool, is_full: bool) {
        match (was_full, is_full) {
            (false, true) => self.stats.full_workers.fetch_add(1, Ordering::SeqCst),
            (true, false) => self.stats.full_workers.fetch_sub(1, Ordering::SeqCst),
            _ => 0,
        };
    }

    /// A worker that cannot start answers every job with the reason, rather than leaving clients
    /// waiting.
    fn fail_all_jobs(&self, reason: &str) {
        while let Some(job) = self.wait_for_job() {
            self.admitted();
            self.close(&job.events, Some(Event::Error(format!("generation failed: {reason}"))));
        }
    }
}

fn failed(e: &anyhow::Error) -> Event {
    Event::Error(format!("generation failed: {e:#}"))
}

fn panicked() -> Event {
    Event::Error("generation failed: the model worker panicked (see the server log)".into())
}

/// One reply in a slot of a batched worker: its sampler, tool-use state and last token.
struct Active<'e> {
    reply: Reply<'e>,
    slot: usize,
    row: RowState,
    rng: StdRng,
    last: u32,
    generated: usize,
}

impl<'e> Active<'e> {
    /// Prefills the prompt into `slot` and takes the first token. `Err` holds the closing event
    /// of a reply that is over before it started (client gone, time limit, bad request, one token
    /// long).
    fn start(
        worker: usize,
        engine: &'e Engine,
        native: &DecodeModel,
        cache: &mut DecodeCache,
        slot: usize,
        job: Job,
        stats: &Stats,
    ) -> Result<Self, Option<Event>> {
        let reply = Reply::new(worker, engine, job);
        if let Some(over) = reply.check() {
            return Err(over);
        }
        let (prompt, opts) = (&reply.job.prompt, &reply.job.opts);
        if prompt.is_empty() || prompt.len() + opts.max_tokens > cache.capacity() {
            return Err(Some(Event::Error(format!(
                "generation failed: a prompt of {} tokens plus {} new ones does not fit the model's {} positions",
                prompt.len(),
                opts.max_tokens,
                cache.capacity()
            ))));
        }
        let logits = cache.reset_slot(slot).and_then(|()| native.prefill(cache, slot, prompt));
        let logits = logits.map_err(|e| Some(failed(&e)))?;
        let rng = StdRng::seed_from_u64(opts.seed);
        let mut active = Active { reply, slot, row: RowState::new(), rng, last: 0, generated: 0 };
        match active.advance(logits, engine, stats) {
            Some(over) => Err(over),
            None => Ok(active),
        }
    }

    /// Samples the next token from `logits`, through the tool-use state, and hands it to the
    /// reply. Returns the closing event (or `None` inside) once the reply is over.
    fn advance(&mut self, logits: &[f32], engine: &Engine, stats: &Stats) -> Option<Option<Event>> {
        let opts = &self.reply.job.opts;
        let sampled = sample(logits, opts.temperature, opts.top_k, &mut self.rng);
        let (token, _) = self.row.step(sampled, engine.specials(), engine.tokenizer());
        self.last = token;
        self.generated += 1;
        if let Some(over) = self.reply.push(token, stats) {
            return Some(over);
        }
        (self.generated >= self.reply.job.opts.max_tokens).then(|| self.reply.finish(Finish::Length))
    }
}

/// A reply being generated: turns tokens into events for its client, whichever loop makes them.
struct Reply<'e> {
    worker: usize,
    job: Job,
    text: ReplyText<'e>,
    completion_tokens: usize,
}

impl<'e> Reply<'e> {
    fn new(worker: usize, engine: &'e Engine, job: Job) -> Self {
        Self { worker, job, text: ReplyText::new(engine), completion_tokens: 0 }
    }

    /// `Some(closing event or None)` when the reply must end now: the client left, or its time ran out.
    fn check(&self) -> Option<Option<Event>> {
        if self.job.events.is_closed() {
            return Some(None);
        }
        if Instant::now() >= self.job.deadline {
            return Some(Some(Event::Error(
                "generation stopped: the server's time limit per request was reached; ask for fewer tokens or \
                 retry when the server is less busy"
                    .to_string(),
            )));
        }
        None
    }

    /// Takes one generated token; `Some` when the reply is over (see [`Reply::check`]).
    fn push(&mut self, token: u32, stats: &Stats) -> Option<Option<Event>> {
        if self.text.engine.specials().is_stop(token) {
            return Some(self.finish(Finish::Stop));
        }
        self.completion_tokens += 1;
        stats.tokens_generated.fetch_add(1, Ordering::SeqCst);
        let piece = self.text.push(token);
        if !piece.is_empty() && self.job.events.send(Event::Text { text: piece, worker: self.worker }).is_err() {
            return Some(None);
        }
        // a client that left between pieces (say, while a character is still incomplete)
        self.check()
    }

    /// The end of the reply: the text still held back, then `Done`.
    fn finish(&mut self, finish: Finish) -> Option<Event> {
        let rest = self.text.finish();
        if !rest.is_empty() && self.job.events.send(Event::Text { text: rest, worker: self.worker }).is_err() {
            return None;
        }
        Some(Event::Done { completion_tokens: self.completion_tokens, finish })
    }
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
