//! The server's live counters ([`Stats`]), read by `/stats` and `/health` as JSON and by
//! `GET /metrics` in Prometheus' text exposition format (version 0.0.4): requests by route and
//! status, prompt, cached and generated tokens, time to first token and time per output token as
//! histograms, queue depth, active requests and slots, and the prompt cache's size.
//!
//! Written by hand rather than through a metrics crate: a handful of atomics, two fixed-bucket
//! histograms and a few lines of text format, all updated without locks on the decode path (the
//! per-route request counts, updated once per request, sit behind a mutex).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderValue};
use axum::response::Response;

use super::AppState;

/// Upper bounds (seconds) of the time-to-first-token buckets: a prompt cache hit on a small model
/// takes milliseconds, a long prompt on a large one seconds.
const TTFT_BUCKETS: [f64; 14] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];
/// Upper bounds (seconds) of the time-per-output-token buckets.
const TOKEN_BUCKETS: [f64; 12] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];

/// A Prometheus histogram with fixed buckets: a count per bucket (not cumulative; summed when
/// written), the number of observations and their sum in nanoseconds.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    count: AtomicU64,
    sum_nanos: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_nanos: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(bucket) = self.bounds.iter().position(|&b| secs <= b) {
            self.counts[bucket].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_nanos.fetch_add(d.as_nanos().min(u64::MAX as u128) as u64, Ordering::Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    fn write(&self, out: &mut String, name: &str, help: &str) {
        describe(out, name, help, "histogram");
        let mut cumulative = 0;
        for (bound, count) in self.bounds.iter().zip(&self.counts) {
            cumulative += count.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        // read after the buckets, so +Inf is never below the last bucket
        let count = self.count().max(cumulative);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "{name}_sum {}", self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9);
        let _ = writeln!(out, "{name}_count {count}");
    }
}

/// Live counters of the server.
#[derive(Debug)]
pub struct Stats {
    /// Requests being generated.
    pub busy: AtomicUsize,
    /// Requests waiting for a slot.
    pub queued: AtomicUsize,
    /// Workers whose every slot is taken.
    pub full_workers: AtomicUsize,
    /// Slots decoding a choice of a request (a request with `n` choices takes `n`).
    pub active_slots: AtomicUsize,
    pub requests_served: AtomicU64,
    pub tokens_generated: AtomicU64,
    pub rejected_busy: AtomicU64,
    /// The largest number of replies decoded together in one step so far.
    pub peak_batch: AtomicUsize,
    /// Prompt tokens of the requests admitted, and the part of them the prompt cache supplied.
    pub prompt_tokens: AtomicU64,
    pub cached_tokens: AtomicU64,
    /// Conversations in the prompt cache and the bytes of keys and values they hold.
    pub cache_entries: AtomicUsize,
    pub cache_bytes: AtomicUsize,
    /// From a request's admission to the queue to its first generated token.
    pub ttft: Histogram,
    /// Between consecutive tokens of one choice.
    pub token_latency: Histogram,
    /// Answered HTTP requests by (route, status).
    http: Mutex<BTreeMap<(String, u16), u64>>,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            busy: AtomicUsize::new(0),
            queued: AtomicUsize::new(0),
            full_workers: AtomicUsize::new(0),
            active_slots: AtomicUsize::new(0),
            requests_served: AtomicU64::new(0),
            tokens_generated: AtomicU64::new(0),
            rejected_busy: AtomicU64::new(0),
            peak_batch: AtomicUsize::new(0),
            prompt_tokens: AtomicU64::new(0),
            cached_tokens: AtomicU64::new(0),
            cache_entries: AtomicUsize::new(0),
            cache_bytes: AtomicUsize::new(0),
            ttft: Histogram::new(&TTFT_BUCKETS),
            token_latency: Histogram::new(&TOKEN_BUCKETS),
            http: Mutex::new(BTreeMap::new()),
        }
    }
}

/// The sizes a `/metrics` page reports besides the counters.
pub struct Capacity {
    pub workers: usize,
    pub slots: usize,
    pub queue: usize,
    pub prompt_cache_bytes: usize,
}

impl Stats {
    /// Counts one answered HTTP request.
    pub fn count_request(&self, route: &str, status: u16) {
        if let Ok(mut http) = self.http.lock() {
            *http.entry((route.to_string(), status)).or_default() += 1;
        }
    }

    /// The counters in Prometheus' text format.
    pub fn prometheus(&self, capacity: &Capacity) -> String {
        let mut out = String::new();
        describe(&mut out, "nanochat_http_requests_total", "HTTP requests answered, by route and status.", "counter");
        if let Ok(http) = self.http.lock() {
            for ((route, status), count) in http.iter() {
                let route = route.replace('\\', "\\\\").replace('"', "\\\"");
                let _ = writeln!(out, "nanochat_http_requests_total{{route=\"{route}\",status=\"{status}\"}} {count}");
            }
        }
        let load = |a: &AtomicU64| a.load(Ordering::SeqCst);
        let counters = [
            (
                "nanochat_requests_completed_total",
                "Generation requests answered (completed, failed or cancelled).",
                load(&self.requests_served),
            ),
            (
                "nanochat_requests_rejected_total",
                "Generation requests refused with 503 because every slot and the queue were full.",
                load(&self.rejected_busy),
            ),
            (
                "nanochat_prompt_tokens_total",
                "Prompt tokens of the generation requests admitted.",
                load(&self.prompt_tokens),
            ),
            (
                "nanochat_prompt_tokens_cached_total",
                "Prompt tokens taken from the prompt cache instead of being prefilled.",
                load(&self.cached_tokens),
            ),
            (
                "nanochat_generation_tokens_total",
                "Tokens generated, without the closing stop tokens.",
                load(&self.tokens_generated),
            ),
        ];
        for (name, help, value) in counters {
            describe(&mut out, name, help, "counter");
            let _ = writeln!(out, "{name} {value}");
        }
        self.ttft.write(
            &mut out,
            "nanochat_time_to_first_token_seconds",
            "From a request's admission (queueing included) to its first generated token.",
        );
        self.token_latency.write(
            &mut out,
            "nanochat_time_per_output_token_seconds",
            "Time between consecutive generated tokens of one choice.",
        );
        let load = |a: &AtomicUsize| a.load(Ordering::SeqCst);
        let gauges = [
            ("nanochat_workers", "Model workers.", capacity.workers),
            ("nanochat_slots", "Choices the workers can decode together (workers x batch).", capacity.slots),
            ("nanochat_slots_active", "Slots decoding a choice now.", load(&self.active_slots)),
            ("nanochat_requests_active", "Generation requests being decoded now.", load(&self.busy)),
            ("nanochat_queue_depth", "Generation requests waiting for a slot.", load(&self.queued)),
            ("nanochat_queue_capacity", "Requests that may wait before the server answers 503.", capacity.queue),
            (
                "nanochat_prompt_cache_entries",
                "Conversations whose keys and values the prompt cache holds.",
                load(&self.cache_entries),
            ),
            ("nanochat_prompt_cache_bytes", "Bytes of keys and values in the prompt cache.", load(&self.cache_bytes)),
            (
                "nanochat_prompt_cache_capacity_bytes",
                "The prompt cache's budget (--prompt-cache-mb).",
                capacity.prompt_cache_bytes,
            ),
        ];
        for (name, help, value) in gauges {
            describe(&mut out, name, help, "gauge");
            let _ = writeln!(out, "{name} {value}");
        }
        out
    }
}

/// `GET /metrics`.
pub(crate) async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let pool = &state.pool;
    let capacity = Capacity {
        workers: pool.workers(),
        slots: pool.workers() * pool.batch(),
        queue: pool.queue_capacity(),
        prompt_cache_bytes: pool.prompt_cache_budget(),
    };
    let mut response = Response::new(Body::from(pool.stats().prometheus(&capacity)));
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"));
    response
}

fn describe(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_end_with_the_count() {
        let h = Histogram::new(&[0.01, 0.1, 1.0]);
        for ms in [5, 50, 50, 500, 5000] {
            h.observe(Duration::from_millis(ms));
        }
        let mut out = String::new();
        h.write(&mut out, "x_seconds", "help");
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(
            lines[2..],
            [
                "x_seconds_bucket{le=\"0.01\"} 1",
                "x_seconds_bucket{le=\"0.1\"} 3",
                "x_seconds_bucket{le=\"1\"} 4",
                "x_seconds_bucket{le=\"+Inf\"} 5",
                "x_seconds_sum 5.605",
                "x_seconds_count 5",
            ]
        );
    }
}
