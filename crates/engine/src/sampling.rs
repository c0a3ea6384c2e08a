//! Sampling parameters, the token sampler, and stop-string matching over streamed text.

use rand::{Rng, SeedableRng, rngs::StdRng};

use crate::{Error, Result};

/// Candidates sorted for top-p before falling back to sorting the whole vocabulary.
const TOP_P_CANDIDATES: usize = 1024;

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
    /// End-of-text tokens are held back until this many tokens were generated.
    pub min_tokens: u32,
    pub stop: Vec<String>,
    /// Output that must follow a grammar (JSON, or JSON valid against a schema).
    pub constraint: Option<crate::Constraint>,
}

/// Stop strings a request may give, and the longest one in bytes.
pub const MAX_STOP_STRINGS: usize = 4;
pub const MAX_STOP_BYTES: usize = 256;

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.7,
            top_p: 0.9,
            top_k: 0,
            seed: None,
            repetition_penalty: 1.1,
            max_tokens: 256,
            min_tokens: 0,
            stop: vec![],
            constraint: None,
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
        if self.min_tokens > self.max_tokens {
            return bad("min_tokens must not be above max_tokens");
        }
        if self.stop.len() > MAX_STOP_STRINGS || self.stop.iter().any(|s| s.is_empty() || s.len() > MAX_STOP_BYTES) {
            return bad("stop takes at most 4 non-empty strings of at most 256 bytes");
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Stop,
    Length,
    Cancelled,
    /// The answer is one or more tool calls.
    ToolCalls,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    /// Prompt tokens reused from the prefix cache when the request was first admitted.
    pub cached_tokens: u32,
}

pub(crate) struct Sampler {
    rng: StdRng,
    temperature: f32,
    top_p: f32,
    top_k: usize,
    repetition_penalty: f32,
}

impl Sampler {
    pub fn new(params: &SamplingParams) -> Self {
        Self {
            rng: StdRng::seed_from_u64(params.seed.unwrap_or_else(rand::random)),
            temperature: params.temperature,
            top_p: params.top_p,
            top_k: params.top_k as usize,
            repetition_penalty: params.repetition_penalty,
        }
    }

    /// Samples from the logits of one position; `context` is every token so far (prompt and output).
    pub fn sample(&mut self, logits: &[f32], context: &[u32]) -> Result<u32> {
        let mut logits = logits.to_vec();
        if (self.repetition_penalty - 1.0).abs() > f32::EPSILON {
            let mut recent = context[context.len().saturating_sub(REPEAT_LAST_N)..].to_vec();
            recent.sort_unstable();
            recent.dedup();
            for &t in &recent {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = if *l >= 0.0 { *l / self.repetition_penalty } else { *l * self.repetition_penalty };
                }
            }
        }
        let argmax = || logits.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map_or(0, |(i, _)| i as u32);
        if self.temperature <= 0.0 || self.top_k == 1 {
            return Ok(argmax());
        }
        // Probabilities at this temperature.
        let max = logits.iter().fold(f32::NEG_INFINITY, |m, v| m.max(*v));
        let mut probs: Vec<(u32, f32)> =
            logits.iter().enumerate().map(|(i, l)| (i as u32, ((l - max) / self.temperature).exp())).collect();
        let total: f32 = probs.iter().map(|p| p.1).sum();
        // The most likely candidates, sorted: top-k, then as many as top-p needs.
        let by_prob = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1);
        let limit = if self.top_k > 0 { self.top_k.min(probs.len()) } else { probs.len() };
        let mut keep = limit.min(TOP_P_CANDIDATES);
        if keep < probs.len() {
            probs.select_nth_unstable_by(keep - 1, by_prob);
        }
        probs[..keep].sort_unstable_by(by_prob);
        let mass = |n: usize, probs: &[(u32, f32)]| probs[..n].iter().map(|p| p.1).sum::<f32>() / total;
        if keep < limit && mass(keep, &probs) < self.top_p {
            // Rare: a flat distribution; sort everything the limit allows.
            probs.sort_unstable_by(by_prob);
            keep = limit;
        }
        let mut cumulative = 0.0;
        let mut cut = keep;
        for (i, p) in probs[..keep].iter().enumerate() {
            cumulative += p.1 / total;
            if cumulative >= self.top_p {
                cut = i + 1;
                break;
            }
        }
        let kept = &probs[..cut];
        let kept_total: f32 = kept.iter().map(|p| p.1).sum();
        let mut r = self.rng.random::<f32>() * kept_total;
        for p in kept {
            r -= p.1;
            if r <= 0.0 {
                return Ok(p.0);
            }
        }
        Ok(kept.last().map_or_else(argmax, |p| p.0))
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

    fn sampler(temperature: f32, top_p: f32, top_k: u32, seed: u64) -> Sampler {
        Sampler::new(&SamplingParams {
            temperature,
            top_p,
            top_k,
            seed: Some(seed),
            repetition_penalty: 1.0,
            ..Default::default()
        })
    }

    #[test]
    fn sampling_is_reproducible_and_respects_its_limits() {
        let logits: Vec<f32> = (0..5000).map(|i| ((i * 7919) % 5000) as f32 / 500.0).collect();
        let best = logits.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0 as u32;
        let draw = |mut s: Sampler| (0..50).map(|_| s.sample(&logits, &[]).unwrap()).collect::<Vec<_>>();
        // The same seed draws the same tokens; another seed other ones.
        assert_eq!(draw(sampler(1.0, 0.95, 0, 7)), draw(sampler(1.0, 0.95, 0, 7)));
        assert_ne!(draw(sampler(1.0, 0.95, 0, 7)), draw(sampler(1.0, 0.95, 0, 8)));
        // Greedy, top-k 1 and a tiny top-p all pick the most likely token.
        for s in [sampler(0.0, 1.0, 0, 1), sampler(1.0, 1.0, 1, 1), sampler(1.0, 1e-6, 0, 1)] {
            assert!(draw(s).iter().all(|&t| t == best));
        }
        // Top-k 3 only draws among the 3 most likely tokens.
        let mut top3: Vec<u32> = (0..5000u32).collect();
        top3.sort_by(|a, b| logits[*b as usize].total_cmp(&logits[*a as usize]));
        assert!(draw(sampler(5.0, 1.0, 3, 1)).iter().all(|t| top3[..3].contains(t)));
        // A flat distribution with top-p 1 can draw beyond the pre-sorted candidates.
        let flat = vec![0f32; 5000];
        let mut s = sampler(1.0, 1.0, 0, 3);
        assert!((0..200).map(|_| s.sample(&flat, &[]).unwrap()).any(|t| t as usize >= TOP_P_CANDIDATES));
    }

    #[test]
    fn repetition_penalty_discourages_recent_tokens() {
        let logits = vec![1.0f32, 0.9, 0.1];
        let mut s = Sampler::new(&SamplingParams { temperature: 0.0, repetition_penalty: 2.0, ..Default::default() });
        assert_eq!(s.sample(&logits, &[0]).unwrap(), 1);
        assert_eq!(s.sample(&logits, &[]).unwrap(), 0);
    }

    #[test]
    fn invalid_params_are_named() {
        let p = SamplingParams { temperature: 3.0, ..Default::default() };
        assert!(p.validate().unwrap_err().to_string().contains("temperature"));
        let p = SamplingParams { max_tokens: 0, ..Default::default() };
        assert!(p.validate().unwrap_err().to_string().contains("max_tokens"));
    }
}
