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
//! - a request for `n` choices takes `n` slots of one worker: the prompt is prefilled once and
//!   copied, and choice i samples with the engine's generator for row i
//!   ([`GenerateOptions::row_seed`]), so each choice is what `Engine::generate` gives for that row;
//! - prompt caching ([`PromptCache`], native backend): when a reply ends, the keys and values of
//!   its first choice's conversation go into a cache the workers share, and a new request
//!   prefills only what follows the longest prefix it shares with a cached conversation;
//! - admission is bounded: at most `workers × batch` requests generate and `queue` more wait (a
//!   request waiting for more free slots than a worker has blocks the ones behind it there);
//!   beyond that `submit` fails at once, which the handlers turn into a 503;
//! - a job streams [`Event`]s back over an unbounded tokio channel (at most `max_tokens` pieces);
//!   when the HTTP side drops the receiver (client gone, handler cancelled) the next send fails
//!   and the worker drops the reply and frees its slot;
//! - every job carries a deadline, checked between decode steps, so no request holds a slot for
//!   longer than the server's time limit;
//! - a panic inside generation is caught and reported on the streams of the replies it hit: the
//!   worker lives on.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

pub use super::metrics::Stats;
use super::prompt_cache::PromptCache;
pub use super::reply::{Event, Finish, TokenInfo};
use super::reply::{Pushed, Reply};
use crate::engine::{logprobs, Engine, GenerateOptions, RowState, Sampler};
use crate::model::decode::{DecodeCache, DecodeModel};

/// One request for a worker.
struct Job {
    prompt: Vec<u32>,
    opts: GenerateOptions,
    /// Stop strings: a choice ends where its text first contains one.
    stop: Vec<String>,
    submitted: Instant,
    deadline: Instant,
    events: UnboundedSender<Event>,
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
    prompt_cache_budget: usize,
}

impl Pool {
    /// Starts one thread per engine, each generating up to `batch` replies at once. `queue`
    /// requests may wait for a slot beyond the ones generating. The workers share a prompt cache
    /// of `prompt_cache_bytes` (0 = none).
    pub fn start(
        engines: Vec<Engine>,
        batch: usize,
        queue: usize,
        time_limit: Duration,
        prompt_cache_bytes: usize,
    ) -> Result<Pool> {
        ensure!(!engines.is_empty(), "the server needs at least one worker: pass --workers 1 or more");
        ensure!(batch > 0, "--batch must be at least 1");
        let (tx, rx) = channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let stats = Arc::new(Stats::default());
        let in_flight = Arc::new(AtomicUsize::new(0));
        let prompt_cache = Arc::new(Mutex::new(PromptCache::new(prompt_cache_bytes)));
        let workers = engines.len();
        let mut threads = Vec::with_capacity(workers);
        for (id, engine) in engines.into_iter().enumerate() {
            let worker = Worker {
                id,
                rx: Arc::clone(&rx),
                stats: Arc::clone(&stats),
                in_flight: Arc::clone(&in_flight),
                prompt_cache: Arc::clone(&prompt_cache),
            };
            let thread = std::thread::Builder::new()
                .name(format!("nanochat-worker-{id}"))
                .spawn(move || worker.run(&engine, batch))
                .context("starting a model worker thread")?;
            threads.push(thread);
        }
        Ok(Pool {
            queue: Some(tx),
            threads,
            stats,
            in_flight,
            time_limit,
            workers,
            batch,
            queue_capacity: queue,
            prompt_cache_budget: prompt_cache_bytes,
        })
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

    /// Bytes the prompt cache may hold (0 = no prompt caching).
    pub fn prompt_cache_budget(&self) -> usize {
        self.prompt_cache_budget
    }

    /// Queues a generation of `opts.num_samples` choices of `prompt`, each ending early where its
    /// text contains one of `stop`; its events arrive on the returned receiver. Fails at once when
    /// every slot is generating and the queue is full.
    pub fn submit(
        &self,
        prompt: Vec<u32>,
        opts: GenerateOptions,
        stop: Vec<String>,
    ) -> Result<UnboundedReceiver<Event>, Busy> {
        let queue = self.queue.as_ref().ok_or(Busy)?;
        let limit = self.workers * self.batch + self.queue_capacity;
        if self.in_flight.fetch_add(1, Ordering::SeqCst) >= limit {
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            self.stats.rejected_busy.fetch_add(1, Ordering::SeqCst);
            return Err(Busy);
        }
        let (events, rx) = unbounded_channel();
        let submitted = Instant::now();
        let job = Job { prompt, opts, stop, submitted, deadline: submitted + self.time_limit, events };
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
    prompt_cache: Arc<Mutex<PromptCache>>,
}

/// One request in a batched worker: its reply and a row per choice.
struct Running<'e> {
    reply: Reply<'e>,
    events: UnboundedSender<Event>,
    prompt: Vec<u32>,
    opts: GenerateOptions,
    rows: Vec<Row>,
    /// Set when the reply must end before its choices did: the closing event, if anyone is left.
    over: Option<Option<Event>>,
}

/// One choice decoding in a slot: its tool-use state, sampler and tokens so far.
struct Row {
    slot: usize,
    state: RowState,
    sampler: Sampler,
    tokens: Vec<u32>,
    done: bool,
}

impl Running<'_> {
    /// Samples choice `i`'s next token from `logits`, through the tool-use state, and hands it to
    /// the reply.
    fn advance(&mut self, i: usize, logits: &[f32], engine: &Engine, stats: &Stats) {
        let row = &mut self.rows[i];
        let sampled = row.sampler.sample(logits);
        let (token, _) = row.state.step(sampled, engine.specials(), engine.tokenizer());
        row.sampler.observe(token);
        row.tokens.push(token);
        let logprob = self.opts.logprobs.map(|top| logprobs(logits, token, top));
        let pushed = match self.reply.push(i, token, logprob, stats) {
            Pushed::Continue if row.tokens.len() >= self.opts.max_tokens => self.reply.end(i, Finish::Length),
            pushed => pushed,
        };
        match pushed {
            Pushed::Continue => {}
            Pushed::Ended => row.done = true,
            Pushed::Over(over) => self.over = Some(over),
        }
    }

    /// The rows still decoding, as (slot, last token).
    fn live_rows(&self) -> impl Iterator<Item = (usize, u32)> + '_ {
        self.rows.iter().filter(|r| !r.done).map(|r| (r.slot, r.tokens.last().copied().unwrap_or(0)))
    }

    fn is_finished(&self) -> bool {
        self.over.is_some() || self.reply.all_ended()
    }
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

    /// Bookkeeping when a job leaves the queue for `slots` slots.
    fn admitted(&self, slots: usize) {
        self.stats.queued.fetch_sub(1, Ordering::SeqCst);
        self.stats.busy.fetch_add(1, Ordering::SeqCst);
        self.stats.active_slots.fetch_add(slots, Ordering::SeqCst);
    }

    /// Ends a job that held `slots` slots: counted first, so a client that saw its reply end sees
    /// the slots free in `/stats`, then the closing event, if there is anyone left to tell.
    fn close(&self, events: &UnboundedSender<Event>, slots: usize, event: Option<Event>) {
        self.stats.busy.fetch_sub(1, Ordering::SeqCst);
        self.stats.active_slots.fetch_sub(slots, Ordering::SeqCst);
        self.stats.requests_served.fetch_add(1, Ordering::SeqCst);
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        if let Some(event) = event {
            let _ = events.send(event);
        }
    }

    fn run_one_at_a_time(&self, engine: &Engine) {
        while let Some(job) = self.wait_for_job() {
            let slots = job.opts.num_samples;
            self.admitted(slots);
            self.stats.full_workers.fetch_add(1, Ordering::SeqCst);
            let events = job.events.clone();
            let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| self.generate_one(engine, job)));
            self.stats.full_workers.fetch_sub(1, Ordering::SeqCst);
            self.close(&events, slots, outcome.unwrap_or_else(|_| Some(panicked())));
        }
    }

    /// Generates one request's choices with the engine's own loop. Returns the closing event, or
    /// `None` when the client left.
    fn generate_one(&self, engine: &Engine, job: Job) -> Option<Event> {
        let Job { prompt, opts, stop, submitted, deadline, events } = job;
        let mut reply = Reply::new(self.id, engine, opts.num_samples, stop, events, (submitted, deadline));
        if let Some(over) = reply.check() {
            return over;
        }
        self.stats.prompt_tokens.fetch_add(prompt.len() as u64, Ordering::SeqCst);
        let mut generation = match engine.generate(&prompt, &opts) {
            Ok(generation) => generation,
            Err(e) => return Some(failed(&e)),
        };
        let mut steps = 0;
        while let Some(step) = generation.next() {
            let column = match step {
                Ok((column, _)) => column,
                Err(e) => return Some(failed(&e)),
            };
            steps += 1;
            for (i, &token) in column.iter().enumerate() {
                if reply.is_ended(i) {
                    continue;
                }
                let logprob = generation.logprobs().get(i).cloned();
                let pushed = match reply.push(i, token, logprob, &self.stats) {
                    Pushed::Continue if steps >= opts.max_tokens => reply.end(i, Finish::Length),
                    pushed => pushed,
                };
                if let Pushed::Over(over) = pushed {
                    return over;
                }
            }
            if reply.all_ended() {
                return Some(reply.done());
            }
        }
        reply.finish_all(Finish::Length)
    }

    /// Continuous batching over the native model: the choices of several requests in the slots of
    /// one cache.
    fn run_batched(&self, engine: &Engine, native: &DecodeModel, batch: usize) {
        let capacity = match engine.max_positions() {
            Ok(capacity) => capacity,
            Err(e) => return self.fail_all_jobs(&format!("{e:#}")),
        };
        let mut cache = match native.new_cache(batch, capacity) {
            Ok(cache) => cache,
            Err(e) => return self.fail_all_jobs(&format!("{e:#}")),
        };
        let mut taken = vec![false; batch];
        let mut running: Vec<Running> = Vec::with_capacity(batch);
        // a job taken from the queue that waits for enough free slots
        let mut waiting: Option<Job> = None;
        loop {
            // Admit: block only when idle, otherwise take what is waiting into the free slots.
            if running.is_empty() && waiting.is_none() {
                match self.wait_for_job() {
                    Some(job) => waiting = Some(job),
                    None => return,
                }
            }
            let was_full = taken.iter().all(|&t| t);
            loop {
                let Some(job) = waiting.take().or_else(|| self.try_take_job()) else { break };
                let need = job.opts.num_samples;
                if need == 0 || need > batch {
                    self.admitted(0);
                    let message = format!("generation failed: {need} choices do not fit a worker's {batch} slots");
                    self.close(&job.events, 0, Some(Event::Error(message)));
                    continue;
                }
                let free: Vec<usize> = (0..batch).filter(|&s| !taken[s]).take(need).collect();
                if free.len() < need {
                    waiting = Some(job);
                    break;
                }
                self.admitted(need);
                free.iter().for_each(|&s| taken[s] = true);
                let events = job.events.clone();
                let started = std::panic::catch_unwind(AssertUnwindSafe(|| {
                    self.start(engine, native, &mut cache, free.clone(), job)
                }));
                let over = match started {
                    Ok(Ok(run)) => {
                        running.push(run);
                        continue;
                    }
                    Ok(Err(over)) => over,
                    Err(_) => Some(panicked()),
                };
                free.iter().for_each(|&s| taken[s] = false);
                self.close(&events, need, over);
            }
            self.track_full(was_full, taken.iter().all(|&t| t));
            if running.is_empty() {
                continue;
            }
            // Decode one token for every live choice, then let each take it.
            let rows: Vec<(usize, u32)> = running.iter().flat_map(|run| run.live_rows()).collect();
            self.stats.peak_batch.fetch_max(rows.len(), Ordering::SeqCst);
            let was_full = taken.iter().all(|&t| t);
            let stepped = std::panic::catch_unwind(AssertUnwindSafe(|| {
                let logits = native.step(&mut cache, &rows)?;
                let vocab = logits.len() / rows.len();
                let mut k = 0;
                for run in running.iter_mut() {
                    for i in 0..run.rows.len() {
                        if run.rows[i].done {
                            continue;
                        }
                        // a reply that is over skips its other rows, whose logits are still counted
                        if run.over.is_none() {
                            run.advance(i, &logits[k * vocab..(k + 1) * vocab], engine, &self.stats);
                        }
                        k += 1;
                    }
                }
                Ok::<_, anyhow::Error>(())
            }));
            let failure = match stepped {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(failed(&e)),
                Err(_) => Some(panicked()),
            };
            let mut j = 0;
            while j < running.len() {
                if failure.is_none() && !running[j].is_finished() {
                    j += 1;
                    continue;
                }
                let mut run = running.swap_remove(j);
                let event = match (&failure, run.over.take()) {
                    (Some(failure), _) => Some(failure.clone()),
                    (None, Some(over)) => over,
                    (None, None) => {
                        self.remember(&cache, &run);
                        Some(run.reply.done())
                    }
                };
                run.rows.iter().for_each(|r| taken[r.slot] = false);
                self.close(&run.events, run.rows.len(), event);
            }
            self.track_full(was_full, taken.iter().all(|&t| t));
        }
    }

    /// Prefills a job's prompt into the first of `slots` (from the prompt cache's longest prefix),
    /// copies it into the others and takes each choice's first token. `Err` holds the closing event
    /// of a reply that is over before it started (client gone, time limit, bad request, finished
    /// at its first token).
    fn start<'e>(
        &self,
        engine: &'e Engine,
        native: &DecodeModel,
        cache: &mut DecodeCache,
        slots: Vec<usize>,
        job: Job,
    ) -> Result<Running<'e>, Option<Event>> {
        let Job { prompt, opts, stop, submitted, deadline, events } = job;
        let mut reply = Reply::new(self.id, engine, opts.num_samples, stop, events.clone(), (submitted, deadline));
        if let Some(over) = reply.check() {
            return Err(over);
        }
        if prompt.is_empty() || prompt.len() + opts.max_tokens > cache.capacity() {
            return Err(Some(Event::Error(format!(
                "generation failed: a prompt of {} tokens plus {} new ones does not fit the model's {} positions",
                prompt.len(),
                opts.max_tokens,
                cache.capacity()
            ))));
        }
        let first = slots[0];
        let prefill = |cache: &mut DecodeCache| -> Result<(usize, Vec<f32>)> {
            let cached = match self.prompt_cache.lock() {
                Ok(mut prompt_cache) => prompt_cache.restore(&prompt, cache, first)?,
                // a worker panicked while holding the cache: go on without it
                Err(_) => {
                    cache.reset_slot(first)?;
                    0
                }
            };
            let logits = native.prefill(cache, first, &prompt[cached..])?.to_vec();
            for &slot in &slots[1..] {
                cache.copy_slot(first, slot)?;
            }
            Ok((cached, logits))
        };
        let (cached, logits) = prefill(cache).map_err(|e| Some(failed(&e)))?;
        self.stats.prompt_tokens.fetch_add(prompt.len() as u64, Ordering::SeqCst);
        self.stats.cached_tokens.fetch_add(cached as u64, Ordering::SeqCst);
        reply.set_cached_tokens(cached);
        let rows = slots
            .iter()
            .enumerate()
            .map(|(i, &slot)| Row {
                slot,
                state: RowState::new(),
                sampler: opts.sampler(i),
                tokens: Vec::new(),
                done: false,
            })
            .collect();
        let mut run = Running { reply, events, prompt, opts, rows, over: None };
        for i in 0..run.rows.len() {
            if run.over.is_none() {
                run.advance(i, &logits, engine, &self.stats);
            }
        }
        match run.over.take() {
            Some(over) => Err(over),
            None if run.reply.all_ended() => {
                self.remember(cache, &run);
                Err(Some(run.reply.done()))
            }
            None => Ok(run),
        }
    }

    /// Puts the conversation of a finished reply's first choice into the prompt cache: the prompt
    /// and every generated token the model read (all but the last).
    fn remember(&self, cache: &DecodeCache, run: &Running) {
        let Some(row) = run.rows.first() else { return };
        let Ok(mut prompt_cache) = self.prompt_cache.lock() else { return };
        let read = row.tokens.len().saturating_sub(1);
        if prompt_cache.budget() == 0 || cache.pos(row.slot) != run.prompt.len() + read {
            return;
        }
        let Ok(kv) = cache.save_slot(row.slot) else { return };
        prompt_cache.store([&run.prompt[..], &row.tokens[..read]].concat(), kv);
        prompt_cache.report(&self.stats);
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
            self.admitted(0);
            self.close(&job.events, 0, Some(Event::Error(format!("generation failed: {reason}"))));
        }
    }
}

fn failed(e: &anyhow::Error) -> Event {
    Event::Error(format!("generation failed: {e:#}"))
}

fn panicked() -> Event {
    Event::Error("generation failed: the model worker panicked (see the server log)".into())
}
