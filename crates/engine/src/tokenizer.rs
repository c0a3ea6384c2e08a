//! Builds a Hugging Face `tokenizers` tokenizer from GGUF metadata (`gpt2` byte-level BPE and `llama`
//! SentencePiece vocabularies), and turns generated ids back into text incrementally without splitting UTF-8.

use tokenizers::{
    AddedToken, DecoderWrapper, ModelWrapper, NormalizerWrapper, PreTokenizerWrapper, SplitDelimiterBehavior,
    decoders::{byte_fallback::ByteFallback, byte_level::ByteLevel as ByteLevelDecoder, fuse::Fuse, strip::Strip},
    models::bpe::BPE,
    normalizers::{prepend::Prepend, replace::Replace},
    pre_tokenizers::{
        byte_level::ByteLevel,
        digits::Digits,
        sequence::Sequence,
        split::{Split, SplitPattern},
    },
};

use crate::{Error, ModelMetadata, Result};

/// GGUF token types (llama.cpp `llama_token_type`).
const TOKEN_TYPE_NORMAL: i32 = 1;
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

#[derive(Clone)]
pub struct Tokenizer {
    /// The vocabulary, reading special tokens written in text as plain text ([`Tokenizer::first_special`] finds
    /// them where they count). One copy, shared by every clone (the engine's, the grammars'): a large
    /// vocabulary's tables take tens of MB.
    text_only: std::sync::Arc<tokenizers::Tokenizer>,
    /// The control tokens' texts, found in one pass (leftmost, then longest: as the tokenizer's own
    /// added-vocabulary matcher; Gemma has over 6000 of them, too many to search for one by one), and their ids.
    specials: std::sync::Arc<(aho_corasick::AhoCorasick, Vec<u32>)>,
    bos: Option<u32>,
    add_bos: bool,
}

/// A piece of a rendered prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Piece<'a> {
    /// Written by the chat template: special tokens in it (`<|im_start|>`) are markers.
    Template(&'a str),
    /// A message's own text: special tokens written in it are just text, so no one can forge a turn.
    Content(&'a str),
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
        let (texts, ids): (Vec<&str>, Vec<u32>) = special
            .iter()
            .filter(|t| t.special)
            .filter_map(|t| Some((t.content.as_str(), inner.token_to_id(&t.content)?)))
            .unzip();
        let matcher = aho_corasick::AhoCorasick::builder()
            .match_kind(aho_corasick::MatchKind::LeftmostLongest)
            .build(&texts)
            .map_err(|e| Error::Tokenizer(format!("the special tokens cannot be searched for: {e}")))?;
        inner.set_encode_special_tokens(true);
        Ok(Self {
            text_only: std::sync::Arc::new(inner),
            specials: std::sync::Arc::new((matcher, ids)),
            bos: md.bos_token_id,
            add_bos: md.add_bos_token,
        })
    }

    /// Tokenizes a rendered prompt: special tokens count only where the template wrote them. Text between two
    /// markers is encoded as one run, as `encode` would encode it, so a prompt without special tokens in its
    /// messages gets the same ids either way.
    pub fn encode_pieces(&self, pieces: &[Piece<'_>]) -> Result<Vec<u32>> {
        let mut ids = vec![];
        let mut run = String::new();
        let flush = |run: &mut String, ids: &mut Vec<u32>| -> Result<()> {
            if !run.is_empty() {
                ids.extend(self.encode_text(run)?);
                run.clear();
            }
            Ok(())
        };
        for piece in pieces {
            match *piece {
                Piece::Content(text) => run.push_str(text),
                Piece::Template(mut text) => {
                    while let Some((at, len, id)) = self.first_special(text) {
                        run.push_str(&text[..at]);
                        flush(&mut run, &mut ids)?;
                        ids.push(id);
                        text = &text[at + len..];
                    }
                    run.push_str(text);
                }
            }
        }
        flush(&mut run, &mut ids)?;
        Ok(self.with_bos(ids))
    }

    /// Tokenizes a message's text as a prompt holds it: special tokens written in it are text. No BOS.
    pub fn encode_text(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self.text_only.encode_fast(text, false).map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Whether `text` holds a special token's text (`<|im_start|>`).
    pub fn has_special(&self, text: &str) -> bool {
        self.specials.0.is_match(text)
    }

    /// The first special token in `text`: where it starts, its length, its id (the longest at a tie).
    fn first_special(&self, text: &str) -> Option<(usize, usize, u32)> {
        let (matcher, ids) = &*self.specials;
        matcher.find(text).map(|m| (m.start(), m.len(), ids[m.pattern().as_usize()]))
    }

    fn with_bos(&self, ids: Vec<u32>) -> Vec<u32> {
        match (self.add_bos, self.bos) {
            (true, Some(bos)) if ids.first() != Some(&bos) => std::iter::once(bos).chain(ids).collect(),
            _ => ids,
        }
    }

    /// Tokenizes text; special tokens written in the text (`<|im_start|>`) become their ids.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.encode_pieces(&[Piece::Template(text)])
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.text_only.decode(ids, skip_special).map_err(|e| Error::Tokenizer(e.to_string()))
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.text_only.token_to_id(token)
    }

    pub fn vocab_size(&self) -> usize {
        self.text_only.get_vocab_size(true)
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
        // Qwen2's regex (llama.cpp's `LLAMA_VOCAB_PRE_TYPE_QWEN2`): GPT-4's, with digits one by one.
        Some("qwen2") => {
            let split = Split::new(SplitPattern::Regex(QWEN2_PATTERN.into()), SplitDelimiterBehavior::Isolated, false)
                .map_err(|e| Error::Tokenizer(e.to_string()))?;
            PreTokenizerWrapper::Sequence(Sequence::new(vec![
                PreTokenizerWrapper::Split(split),
                PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, false)),
            ]))
        }
        _ => byte_level,
    };
    tok.with_pre_tokenizer(Some(pre));
    tok.with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevelDecoder::default())));
    Ok(tok)
}

/// The pre-tokenizer regex of Qwen2's `tokenizer.json`.
const QWEN2_PATTERN: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// A SentencePiece vocabulary (GGUF `llama`: Llama 2, Gemma) as llama.cpp's SPM tokenizer reads it: starting
/// from characters, the adjacent pair whose joined text is the best-scoring token is merged first, and
/// characters outside the vocabulary fall back to `<0xXX>` byte tokens. That is byte-pair encoding whose merges
/// are every split of every token into two tokens, ranked by the joined token's score (Hugging Face builds
/// Gemma's and Llama's `tokenizer.json` the same way).
fn sentencepiece(md: &ModelMetadata) -> Result<tokenizers::Tokenizer> {
    let ids: std::collections::HashMap<&str, u32> = md.tokens.iter().map(String::as_str).zip(0u32..).collect();
    let score = |id: usize| md.scores.get(id).copied().unwrap_or(0.0);
    let mut merges: Vec<(f32, u32, String, String)> = vec![];
    for (id, token) in md.tokens.iter().enumerate() {
        if md.token_types.get(id).is_some_and(|t| *t != TOKEN_TYPE_NORMAL) {
            continue;
        }
        for (at, _) in token.char_indices().skip(1) {
            let (a, b) = token.split_at(at);
            if ids.contains_key(a) && ids.contains_key(b) {
                merges.push((score(id), id as u32, a.to_owned(), b.to_owned()));
            }
        }
    }
    // Best score first; among equals, the lower id (llama.cpp's tie-break by position then applies within a word).
    merges.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)));
    let vocab: tokenizers::models::bpe::Vocab = md.tokens.iter().cloned().zip(0u32..).collect();
    let merges = merges.into_iter().map(|(_, _, a, b)| (a, b)).collect();
    let mut builder = BPE::builder().vocab_and_merges(vocab, merges).byte_fallback(true).fuse_unk(true);
    if let Some(unk) = md.tokens.iter().find(|t| *t == "<unk>") {
        builder = builder.unk_token(unk.clone());
    }
    let bpe = builder.build().map_err(|e| Error::Tokenizer(e.to_string()))?;
    let mut tok = tokenizers::Tokenizer::new(ModelWrapper::BPE(bpe));
    let replace = Replace::new(" ", "▁").map_err(|e| Error::Tokenizer(e.to_string()))?;
    let mut normalizers = vec![NormalizerWrapper::Replace(replace)];
    if md.add_space_prefix {
        normalizers.insert(0, NormalizerWrapper::Prepend(Prepend::new("▁".into())));
    }
    tok.with_normalizer(Some(NormalizerWrapper::Sequence(tokenizers::normalizers::Sequence::new(normalizers))));
    let replace_back = tokenizers::decoders::DecoderWrapper::Replace(
        Replace::new("▁", " ").map_err(|e| Error::Tokenizer(e.to_string()))?,
    );
    let mut decoders =
        vec![replace_back, DecoderWrapper::ByteFallback(ByteFallback::new()), DecoderWrapper::Fuse(Fuse::new())];
    if md.add_space_prefix {
        decoders.push(DecoderWrapper::Strip(Strip::new(' ', 1, 0)));
    }
    tok.with_decoder(Some(DecoderWrapper::Sequence(tokenizers::decoders::sequence::Sequence::new(decoders))));
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
