//! Constrained decoding: a per-sequence token mask that keeps the output inside a JSON Schema, computed by
//! `llguidance` over a token trie of the model's own vocabulary.

use std::sync::{Arc, OnceLock};

use llguidance::{Matcher, ParserFactory, api::TopLevelGrammar, toktrie};
use toktrie::{TokEnv, TokRxInfo, TokTrie, TokenizerEnv};

use crate::{Error, Result, Tokenizer, tokenizer::TokenBytes};

/// What a generation's output must be.
#[derive(Debug, Clone, PartialEq)]
pub enum Constraint {
    /// Any JSON object (OpenAI's `response_format: {"type": "json_object"}`).
    JsonObject,
    /// JSON valid against this schema (`json_schema`).
    JsonSchema(serde_json::Value),
    /// Text of this Lark grammar in llguidance's dialect (a forced tool call: `crate::tools`).
    Lark(String),
}

/// The whitespace allowed between two JSON tokens.
pub(crate) const WHITESPACE: &str = r"[\x20\x0A\x0D\x09]{1,12}";

/// The model's vocabulary as bytes (a token trie), and the grammar compiler over it, built on first use: they
/// cost a fraction of a second and, for a large vocabulary, over a hundred megabytes, which a server that never
/// constrains output should not pay.
pub(crate) struct Grammars {
    tokenizer: Tokenizer,
    eos: Vec<u32>,
    vocab_size: usize,
    factory: OnceLock<std::result::Result<ParserFactory, String>>,
}

struct Vocabulary {
    trie: TokTrie,
    tokenizer: Tokenizer,
}

impl TokenizerEnv for Vocabulary {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<u32> {
        self.trie.tokenize_with_greedy_fallback(s, |text| self.tokenizer.encode_text(text).unwrap_or_default())
    }
}

impl Vocabulary {
    fn new(tokenizer: &Tokenizer, eos: &[u32], vocab_size: usize) -> Self {
        // A token's bytes: control tokens are special (the trie's marker byte first).
        let mut words: Vec<Vec<u8>> = (0..tokenizer.vocab_size() as u32)
            .map(|id| match tokenizer.token_bytes(id) {
                TokenBytes::Special(name) => special(name),
                TokenBytes::Text(bytes) => bytes,
            })
            .collect();
        while words.len() < vocab_size {
            words.push(special(&format!("<[{}]>", words.len())));
        }
        let first_eos = eos.first().copied().unwrap_or(0);
        let info = TokRxInfo::new(words.len() as u32, first_eos);
        let mut trie = TokTrie::from(&info, &words);
        if eos.len() > 1 {
            trie = trie.with_eos_tokens(eos);
        }
        Self { trie, tokenizer: tokenizer.clone() }
    }
}

impl Grammars {
    /// `vocab_size`: the model's logits per row (at least the tokenizer's vocabulary).
    pub(crate) fn new(tokenizer: &Tokenizer, eos: &[u32], vocab_size: usize) -> Self {
        Self { tokenizer: tokenizer.clone(), eos: eos.to_vec(), vocab_size, factory: OnceLock::new() }
    }

    /// A fresh guide for one sequence; an unusable schema is the request's error.
    pub(crate) fn guide(&self, constraint: &Constraint) -> Result<Guide> {
        let factory = self.factory.get_or_init(|| {
            let env: TokEnv = Arc::new(Vocabulary::new(&self.tokenizer, &self.eos, self.vocab_size));
            let mut factory = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
            factory.set_stderr_log_level(0);
            Ok(factory)
        });
        let factory = factory.as_ref().map_err(|e| Error::Internal(format!("constrained decoding: {e}")))?;
        let (grammar, what) = match constraint {
            Constraint::JsonObject => (json_grammar(serde_json::json!({ "type": "object" })), "JSON schema"),
            Constraint::JsonSchema(schema) => (json_grammar(schema.clone()), "JSON schema"),
            Constraint::Lark(lark) => (TopLevelGrammar::from_lark(lark.clone()), "tool's parameter schema"),
        };
        let parser = factory
            .create_parser(grammar)
            .map_err(|e| Error::InvalidRequest(format!("the {what} cannot be used: {e}")))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(Error::InvalidRequest(format!("the {what} cannot be used: {e}")));
        }
        Ok(Guide { matcher })
    }
}

/// JSON allows any run of whitespace between tokens, and a small model that has nothing left to say writes spaces
/// until max_tokens; a bounded run keeps it moving to the end of the document.
fn json_grammar(mut schema: serde_json::Value) -> TopLevelGrammar {
    if let Some(schema) = schema.as_object_mut() {
        schema.entry("x-guidance").or_insert_with(|| serde_json::json!({ "whitespace_pattern": WHITESPACE }));
    }
    TopLevelGrammar::from_json_schema(schema)
}

/// One sequence's place in its grammar.
pub(crate) struct Guide {
    matcher: Matcher,
}

/// The tokens a grammar allows next.
pub(crate) struct Mask(toktrie::SimpleVob);

impl Guide {
    /// The tokens the grammar allows next; once the output is complete, only end-of-text. It depends on the
    /// tokens so far only, so the scheduler computes it while the forward pass computes the logits.
    pub(crate) fn mask(&mut self) -> Result<Mask> {
        let allowed =
            self.matcher.compute_mask_or_eos().map_err(|e| Error::Internal(format!("constrained decoding: {e}")))?;
        Ok(Mask(allowed))
    }
}

impl Mask {
    /// Sets every token the mask does not allow to −∞.
    pub(crate) fn apply(&self, logits: &mut [f32]) {
        for (id, logit) in logits.iter_mut().enumerate() {
            if !self.0.is_allowed(id as u32) {
                *logit = f32::NEG_INFINITY;
            }
        }
    }
}

impl Guide {
    /// The sampled token, as the grammar's next.
    pub(crate) fn advance(&mut self, token: u32) -> Result<()> {
        self.matcher.consume_token(token).map_err(|e| Error::Internal(format!("constrained decoding: {e}")))
    }
}

fn special(name: &str) -> Vec<u8> {
    std::iter::once(TokTrie::SPECIAL_TOKEN_MARKER).chain(name.bytes()).collect()
}
