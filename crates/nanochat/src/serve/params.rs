//! The request fields every generating endpoint shares (the native `/chat/completions`, OpenAI's
//! `/v1/chat/completions` and `/v1/completions`), read from the request's JSON with the path of a
//! bad field kept for the error, checked against the API's limits, and turned into the engine's
//! options.

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;

use super::ServerConfig;
use crate::engine::{GenerateOptions, Penalties};

pub const MAX_TEMPERATURE: f64 = 2.0;
pub const MAX_TOP_K: i64 = 200;
pub const MAX_MAX_TOKENS: i64 = 4_096;
/// OpenAI's range for both penalties.
pub const MAX_PENALTY: f64 = 2.0;
/// Stop strings per request, and characters per stop string.
pub const MAX_STOPS: usize = 16;
pub const MAX_STOP_CHARS: usize = 256;
/// OpenAI's limit on `top_logprobs`.
pub const MAX_TOP_LOGPROBS: i64 = 20;

/// A request the API refuses: its message and the request field at fault.
#[derive(Debug)]
pub struct Invalid {
    pub message: String,
    pub param: String,
}

pub fn reject(message: impl Into<String>, param: &str) -> Invalid {
    Invalid { message: message.into(), param: param.to_string() }
}

/// Reads `T` from the request's JSON; a field of the wrong type is named by its path
/// (`messages[1].content: invalid type: ...`).
pub fn parse<T: DeserializeOwned>(value: &Value) -> Result<T, Invalid> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let param = if path == "." { String::new() } else { path.clone() };
        let message = if param.is_empty() { e.inner().to_string() } else { format!("{path}: {}", e.inner()) };
        Invalid { message, param }
    })
}

/// `stop`: one string or a list.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

/// The sampling and stopping fields; absent ones take the server's defaults.
#[derive(Debug, Default, Deserialize)]
pub struct SamplingFields {
    pub temperature: Option<f64>,
    // signed, so a negative value gets the range message rather than a type error
    pub top_k: Option<i64>,
    pub top_p: Option<f64>,
    pub seed: Option<i64>,
    pub frequency_penalty: Option<f64>,
    pub presence_penalty: Option<f64>,
    pub stop: Option<Stop>,
    pub max_tokens: Option<i64>,
    /// OpenAI's newer name for `max_tokens`; wins when both are given.
    pub max_completion_tokens: Option<i64>,
}

/// What a request asks the workers for, apart from its prompt.
#[derive(Debug)]
pub struct Sampling {
    pub opts: GenerateOptions,
    pub stop: Vec<String>,
}

impl SamplingFields {
    /// Checks the fields and fills in the defaults of `config`: one choice, a fresh random seed
    /// unless one is given (the same seed, prompt and settings give the same reply).
    pub fn resolve(&self, config: &ServerConfig) -> Result<Sampling, Invalid> {
        let temperature = self.temperature.unwrap_or(config.temperature);
        if !(0.0..=MAX_TEMPERATURE).contains(&temperature) {
            return Err(reject(format!("temperature must be between 0 and {MAX_TEMPERATURE}"), "temperature"));
        }
        let top_k = self.top_k.unwrap_or(config.top_k as i64);
        if !(0..=MAX_TOP_K).contains(&top_k) {
            return Err(reject(format!("top_k must be between 0 and {MAX_TOP_K} (0 = no limit)"), "top_k"));
        }
        let top_p = self.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(reject("top_p must be above 0 and at most 1 (1 = no nucleus limit)", "top_p"));
        }
        let penalty = |value: Option<f64>, param: &str| match value.unwrap_or(0.0) {
            p if (-MAX_PENALTY..=MAX_PENALTY).contains(&p) => Ok(p as f32),
            _ => Err(reject(format!("{param} must be between -{MAX_PENALTY} and {MAX_PENALTY}"), param)),
        };
        let penalties = Penalties {
            frequency: penalty(self.frequency_penalty, "frequency_penalty")?,
            presence: penalty(self.presence_penalty, "presence_penalty")?,
        };
        let (max_tokens, param) = match (self.max_completion_tokens, self.max_tokens) {
            (Some(m), _) => (m, "max_completion_tokens"),
            (None, Some(m)) => (m, "max_tokens"),
            (None, None) => (config.max_tokens as i64, "max_tokens"),
        };
        if !(1..=MAX_MAX_TOKENS).contains(&max_tokens) {
            return Err(reject(format!("{param} must be between 1 and {MAX_MAX_TOKENS}"), param));
        }
        let stop = match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(list)) => list.clone(),
        };
        if stop.len() > MAX_STOPS {
            return Err(reject(format!("stop takes at most {MAX_STOPS} strings"), "stop"));
        }
        if stop.iter().any(|s| s.is_empty() || s.chars().count() > MAX_STOP_CHARS) {
            return Err(reject(format!("each stop string must have 1 to {MAX_STOP_CHARS} characters"), "stop"));
        }
        let opts = GenerateOptions {
            num_samples: 1,
            max_tokens: max_tokens as usize,
            temperature,
            top_k: Some(top_k as usize),
            top_p,
            penalties,
            // the same seed gives the same reply; without one every request draws its own
            seed: self.seed.map_or_else(rand::random, |s| s as u64),
            logprobs: None,
        };
        Ok(Sampling { opts, stop })
    }
}

/// `n`: choices sampled from one prefill, at most a worker's slots.
pub fn choices(n: Option<i64>, batch: usize) -> Result<usize, Invalid> {
    match n.unwrap_or(1) {
        n if n >= 1 && n as u64 <= batch as u64 => Ok(n as usize),
        _ => Err(reject(
            format!("n must be between 1 and {batch} (a worker decodes at most --batch {batch} choices together)"),
            "n",
        )),
    }
}
