//! Reads what the engine needs from a GGUF file's metadata: architecture, sizes, tokenizer and chat template.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::{Content, Value};

use crate::{Error, Result};

/// The model facts the engine uses, mirrored from GGUF metadata keys (`general.*`, `llama.*`,
/// `tokenizer.ggml.*`, `tokenizer.chat_template`).
#[derive(Debug, Clone)]
pub struct ModelMetadata {
    pub name: String,
    pub architecture: String,
    pub context_length: usize,
    pub tokenizer_model: String,
    pub pre_tokenizer: Option<String>,
    pub tokens: Vec<String>,
    pub token_types: Vec<i32>,
    pub scores: Vec<f32>,
    pub merges: Vec<String>,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    pub add_bos_token: bool,
    /// SentencePiece: whether a space is put before the text (`tokenizer.ggml.add_space_prefix`, default true).
    pub add_space_prefix: bool,
    pub chat_template: Option<String>,
}

impl ModelMetadata {
    pub fn from_gguf(content: &Content) -> Result<Self> {
        let md = &content.metadata;
        let architecture = string(md, "general.architecture").unwrap_or_default();
        if !crate::model::ARCHITECTURES.contains(&architecture.as_str()) {
            return Err(crate::model::unsupported_architecture((!architecture.is_empty()).then_some(&architecture)));
        }
        let tokens = md
            .get("tokenizer.ggml.tokens")
            .and_then(|v| v.to_vec().ok())
            .ok_or_else(|| Error::UnsupportedModel("the GGUF file has no tokenizer.ggml.tokens".into()))?
            .iter()
            .map(|v| v.to_string().cloned().unwrap_or_default())
            .collect();
        let ints = |key: &str| -> Vec<i32> {
            md.get(key)
                .and_then(|v| v.to_vec().ok())
                .map(|vs| vs.iter().filter_map(|v| v.to_i32().ok()).collect())
                .unwrap_or_default()
        };
        Ok(Self {
            name: string(md, "general.name").unwrap_or_else(|| "model".into()),
            context_length: md
                .get(&format!("{architecture}.context_length"))
                .and_then(|v| v.to_u32().ok())
                .unwrap_or(2048) as usize,
            tokenizer_model: string(md, "tokenizer.ggml.model").unwrap_or_else(|| "gpt2".into()),
            pre_tokenizer: string(md, "tokenizer.ggml.pre"),
            tokens,
            token_types: ints("tokenizer.ggml.token_type"),
            scores: md
                .get("tokenizer.ggml.scores")
                .and_then(|v| v.to_vec().ok())
                .map(|vs| vs.iter().filter_map(|v| v.to_f32().ok()).collect())
                .unwrap_or_default(),
            merges: md
                .get("tokenizer.ggml.merges")
                .and_then(|v| v.to_vec().ok())
                .map(|vs| vs.iter().filter_map(|v| v.to_string().ok().cloned()).collect())
                .unwrap_or_default(),
            bos_token_id: md.get("tokenizer.ggml.bos_token_id").and_then(|v| v.to_u32().ok()),
            eos_token_id: md.get("tokenizer.ggml.eos_token_id").and_then(|v| v.to_u32().ok()),
            add_bos_token: md.get("tokenizer.ggml.add_bos_token").and_then(|v| v.to_bool().ok()).unwrap_or(false),
            add_space_prefix: md.get("tokenizer.ggml.add_space_prefix").and_then(|v| v.to_bool().ok()).unwrap_or(true),
            chat_template: string(md, "tokenizer.chat_template"),
            architecture,
        })
    }

    /// Frees the token texts, types, scores and merges once a [`crate::Tokenizer`] holds them (the engine's copy
    /// has none: ask [`crate::Engine::tokenizer`]).
    pub fn drop_vocabulary(&mut self) {
        (self.tokens, self.token_types, self.scores, self.merges) = Default::default();
    }
}

fn string(md: &HashMap<String, Value>, key: &str) -> Option<String> {
    md.get(key).and_then(|v| v.to_string().ok()).cloned()
}
