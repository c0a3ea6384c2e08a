//! Builds a Hugging Face `tokenizers` tokenizer from GGUF metadata (`gpt2` byte-level BPE and `llama`
//! SentencePiece vocabularies), and turns generated ids back into text incrementally without splitting UTF-8.

use tokenizers::{
    AddedToken, DecoderWrapper, ModelWrapper, NormalizerWrapper, PreTokenizerWrapper,
    decoders::{byte_fallback::ByteFallback, byte_level::ByteLevel as ByteLevelDecoder, fuse::Fuse, strip::Strip},
    models::{bpe::BPE, unigram::Unigram},
    normalizers::{prepend::Prepend, replace::Replace},
    pre_tokenizers::{byte_level::ByteLevel, digits::Digits, sequence::Sequence},
};

use crate::{Error, ModelMetadata, Result};

/// GGUF token types (llama.cpp `llama_token_type`).
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos: Option<u32>,
    add_bos: bool,
}

impl Tokenizer {
    pub fn from_metadata(md: &ModelMetadata) -> Result<Self> {
        let mut inner = match md.tokenizer_model.as_str() {
            "gpt2" => gpt2(md)?,
            "llama" => sentencepiece(md)?,
            other => {
                return Err(Error::UnsupportedModel(format!(
                    "tokenizer model `{other}` is not supported (supported: gpt2, llama)"
                )));
            }
        };
        let special: Vec<AddedToken> = md
            .token_types
            .iter()
            .enumerate()
            .filter(|(_, t)| matches!(**t, TOKEN_TYPE_CONTROL | TOKEN_TYPE_USER_DEFINED))
            .filter_map(|(id, t)| {
                let content = md.tokens.get(id)?;
                (!content.is_empty()).then(|| AddedToken::from(content.clone(), *t == TOKEN_TYPE_CONTROL))
            })
            .collect();
        inner.add_special_tokens(&special);
        Ok(Self { inner, bos: md.bos_token_id, add_bos: md.add_bos_token })
    }

    /// Tokenizes text; special tokens written in the text (`<|im_start|>`) become their ids.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self.inner.encode_fast(text, false).map_err(|e| Error::Tokenizer(e.to_string()))?;
        let mut ids = Vec::with_capacity(encoding.len() + 1);
        if let (true, Some(bos)) = (self.add_bos, self.bos)
            && encoding.get_ids().first() != Some(&bos)
        {
            ids.push(bos);
        }
        ids.extend_from_slice(encoding.get_ids());
        Ok(ids)
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner.decode(ids, skip_special).map_err(|e| Error::Tokenizer(e.to_string()))
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

fn gpt2(md: &ModelMetadata) -> Result<tokenizers::Tokenizer> {
    let vocab: Vec<(String, u32)> = md.tokens.iter().cloned().zip(0u32..).collect();
    let merges = md
        .merges
        .iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_owned(), b.to_owned()))
                .ok_or_else(|| Error::Tokenizer(format!("malformed merge `{m}` in tokenizer.ggml.merges")))
        })
        .collect::<Result<Vec<_>>>()?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab.into_iter().collect::<tokenizers::models::bpe::Vocab>(), merges)
        .build()
        .map_err(|e| Error::Tokenizer(e.to_string()))?;
    let mut tok = tokenizers::Tokenizer::new(ModelWrapper::BPE(bpe));
    let byte_level = PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true));
    // Pre-tokenizers whose GGUF name llama.cpp maps to a digit-splitting regex (SmolLM, StarCoder) split
    // digits one by one before the GPT-2 regex.
    let pre = match md.pre_tokenizer.as_deref() {
        Some("smollm" | "starcoder" | "refact") => PreTokenizerWrapper::Sequence(Sequence::new(vec![
            PreTokenizerWrapper::Digits(Digits::new(true)),
            byte_level,
        ])),
        _ => byte_level,
    };
    tok.with_pre_tokenizer(Some(pre));
    tok.with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevelDecoder::default())));
    Ok(tok)
}

fn sentencepiece(md: &ModelMetadata) -> Result<tokenizers::Tokenizer> {
    let vocab: Vec<(String, f64)> =
        md.tokens.iter().cloned().zip(md.scores.iter().map(|s| *s as f64).chain(std::iter::repeat(0.0))).collect();
    let unk = md.tokens.iter().position(|t| t == "<unk>");
    let unigram = Unigram::from(vocab, unk, true).map_err(|e| Error::Tokenizer(e.to_string()))?;
    let mut tok = tokenizers::Tokenizer::new(ModelWrapper::Unigram(unigram));
    let replace = Replace::new(" ", "▁").map_err(|e| Error::Tokenizer(e.to_string()))?;
    tok.with_normalizer(Some(NormalizerWrapper::Sequence(tokenizers::normalizers::Sequence::new(vec![
        NormalizerWrapper::Prepend(Prepend::new("▁".into())),
        NormalizerWrapper::Replace(replace),
    ]))));
    let replace_back = tokenizers::decoders::DecoderWrapper::Replace(
        Replace::new("▁", " ").map_err(|e| Error::Tokenizer(e.to_string()))?,
    );
    tok.with_decoder(Some(DecoderWrapper::Sequence(tokenizers::decoders::sequence::Sequence::new(vec![
        replace_back,
        DecoderWrapper::ByteFallback(ByteFallback::new()),
        DecoderWrapper::Fuse(Fuse::new()),
        DecoderWrapper::Strip(Strip::new(' ', 1, 0)),
    ]))));
    Ok(tok)
}

/// Turns a stream of generated ids into text pieces, holding back bytes until they form whole characters.
pub struct Detokenizer {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl Detokenizer {
    /// `context` is the tail of the prompt: decoding starts after it so that leading spaces come out right.
    pub fn new(context: &[u32]) -> Self {
        let ids = context[context.len().saturating_sub(4)..].to_vec();
        let n = ids.len();
        Self { ids, prefix_offset: 0, read_offset: n }
    }

    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        let prefix = tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset], true)?;
        let full = tokenizer.decode(&self.ids[self.prefix_offset..], true)?;
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') && full.is_char_boundary(prefix.len()) {
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            Ok(full[prefix.len()..].to_owned())
        } else {
            Ok(String::new())
        }
    }
}
