//! Sampling parameters, the token sampler, and stop-string matching over streamed text.

use candle_core::Tensor;
use candle_transformers::generation::{LogitsProcessor, Sampling};

use crate::{Error, Result};

/// How many recent tokens the repetition penalty looks at.
const REPEAT_LAST_N: usize = 64;

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    pub top_p: f32,
    /// 0 means no top-k cut.
    pub top_k: u32,
    pub seed: Option<u64>,
    pub repetition_penalty: f32,
    pub max_tokens: u32,
    pub stop: Vec<String>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.7,
            top_p: 0.9,
            top_k: 0,
            seed: None,
            repetition_penalty: 1.1,
            max_tokens: 256,
            stop: vec![],
        }
    }
}

impl SamplingParams {
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: &str| Err(Error::InvalidRequest(msg.to_owned()));
        if !(0.0..=2.0).contains(&self.temperature) {
            return bad("temperature must be between 0 and 2");
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p must be in (0, 1]");
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty <= 10.0) {
            return bad("repetition_penalty must be in (0, 10]");
        }
        if self.max_tokens == 0 {
            return bad("max_tokens must be at least 1");
        }
        if self.stop.len() > 4 || self.stop.iter().any(String::is_empty) {
            return bad("stop takes at most 4 non-empty strings");
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Stop,
    Length,
    Cancelled,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
}

pub(crate) struct Sampler {
    processor: LogitsProcessor,
    repetition_penalty: f32,
}

impl Sampler {
    pub fn new(params: &SamplingParams) -> Self {
        let temperature = f64::from(params.temperature);
        let (k, p) = (params.top_k as usize, f64::from(params.top_p));
        let sampling = match (temperature <= 0.0, k > 0, p < 1.0) {
            (true, _, _) => Sampling::ArgMax,
            (false, true, true) => Sampling::TopKThenTopP { k, p, temperature },
            (false, true, false) => Sampling::TopK { k, temperature },
            (false, false, true) => Sampling::TopP { p, temperature },
            (false, false, false) => Sampling::All { temperature },
        };
        let seed = params.seed.unwrap_or_else(rand::random);
        Self {
            processor: LogitsProcessor::from_sampling(seed, sampling),
            repetition_penalty: params.repetition_penalty,
        }
    }

    /// Samples from the logits of one position; `context` is every token so far (prompt and output).
    pub fn sample(&mut self, logits: &[f32], context: &[u32]) -> Result<u32> {
        let logits = Tensor::new(logits, &candle_core::Device::Cpu)?;
        let logits = if (self.repetition_penalty - 1.0).abs() > f32::EPSILON {
            let recent = &context[context.len().saturating_sub(REPEAT_LAST_N)..];
            candle_transformers::utils::apply_repeat_penalty(&logits, self.repetition_penalty, recent)?
        } else {
            logits
        };
        Ok(self.processor.sample(&logits)?)
    }
}

/// Finds stop strings in streamed text and holds back any tail that could still become one.
#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    text: String,
    emitted: usize,
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        Self { stops, ..Self::default() }
    }

    /// Adds generated text; returns the text safe to emit and whether a stop string was hit.
    pub fn push(&mut self, piece: &str) -> (String, bool) {
        let search_from = self.emitted;
        self.text.push_str(piece);
        let hit = self.stops.iter().filter_map(|s| self.text[search_from..].find(s.as_str())).min();
        if let Some(pos) = hit {
            let out = self.text[self.emitted..search_from + pos].to_owned();
            self.emitted = self.text.len();
            return (out, true);
        }
        let held = self.held_back();
        let safe = self.text.len() - held;
        let out = self.text[self.emitted..safe].to_owned();
        self.emitted = safe;
        (out, false)
    }

    /// Whatever was held back, at the end of generation, consuming the matcher.
    pub fn flush_owned(mut self) -> String {
        self.flush()
    }

    /// Whatever was held back, at the end of generation.
    pub fn flush(&mut self) -> String {
        let out = self.text[self.emitted..].to_owned();
        self.emitted = self.text.len();
        out
    }

    /// Length of the longest unemitted suffix that is a proper prefix of some stop string.
    fn held_back(&self) -> usize {
        let tail = &self.text[self.emitted..];
        tail.char_indices()
            .map(|(i, _)| &tail[i..])
            .find(|suffix| self.stops.iter().any(|s| s.starts_with(suffix)))
            .map_or(0, str::len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(stops: &[&str], pieces: &[&str], expected: &[(&str, bool)], flushed: &str) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let got: Vec<(String, bool)> = pieces.iter().map(|p| m.push(p)).collect();
        let want: Vec<(String, bool)> = expected.iter().map(|(s, b)| (s.to_string(), *b)).collect();
        assert_eq!(got, want);
        assert_eq!(m.flush(), flushed);
    }

    #[test]
    fn stop_strings() {
        check(&[], &["a", "b"], &[("a", false), ("b", false)], "");
        check(&["\n\n"], &["x\n", "\ny"], &[("x", false), ("", true)], "");
        check(&["END"], &["ab", "E", "N", "x"], &[("ab", false), ("", false), ("", false), ("ENx", false)], "");
        check(&["END"], &["abE", "NDzz"], &[("ab", false), ("", true)], "");
        check(&["stop"], &["st"], &[("", false)], "st");
        check(&["é!"], &["aé"], &[("a", false)], "é");
    }

    #[test]
    fn invalid_params_are_named() {
        let p = SamplingParams { temperature: 3.0, ..Default::default() };
        assert!(p.validate().unwrap_err().to_string().contains("temperature"));
        let p = SamplingParams { max_tokens: 0, ..Default::default() };
        assert!(p.validate().unwrap_err().to_string().contains("max_tokens"));
    }
}
