//! The model's tokenizer, read from GGUF metadata as llama.cpp reads it, and the incremental detokenizer that
//! turns generated ids back into text without splitting UTF-8.
//!
//! Two kinds of vocabulary:
//! - **SentencePiece** (`tokenizer.ggml.model = llama`: Llama 2, Gemma). Spaces are written `▁`. Starting from
//!   characters, the adjacent pair whose joined text is the best-scoring token is merged first, until no pair
//!   joins into a token. A character outside the vocabulary becomes its UTF-8 bytes as `<0xXX>` byte tokens.
//! - **Byte-level BPE** (`gpt2`: SmolLM2, Qwen2). The model's pre-tokenizer regex cuts the text into words. Each
//!   word's bytes are merged pair by pair, the pair of lowest merge rank first.
//!
//! Before either, the user-defined tokens are cut out of the text: Gemma's runs of spaces, newlines and tabs, or
//! Qwen's `<tool_call>`. Control tokens (`<|im_start|>`) written in text are plain text. Only
//! [`Tokenizer::encode_pieces`] reads them, where a chat template wrote them.
//!
//! The vocabulary lives in one string, found through a table of ids; merges are keyed by pairs of ids. Gemma's
//! 262,144 tokens cost about 7 MB this way. A general tokenizer library builds SentencePiece as BPE with one merge
//! for every split of every token, and that cost about 90 MB.

use std::{
    collections::{BinaryHeap, HashMap, hash_map::RandomState},
    hash::BuildHasher,
    sync::Arc,
};

use aho_corasick::AhoCorasick;
use hashbrown::HashTable;

use crate::{Error, ModelMetadata, Result};

/// GGUF token types (llama.cpp `llama_token_type`).
const TOKEN_TYPE_NORMAL: u8 = 1;
const TOKEN_TYPE_UNKNOWN: u8 = 2;
const TOKEN_TYPE_CONTROL: u8 = 3;
const TOKEN_TYPE_USER_DEFINED: u8 = 4;
const TOKEN_TYPE_UNUSED: u8 = 5;
const TOKEN_TYPE_BYTE: u8 = 6;

/// Tokens that stand for no text: a model's markers (`<|im_end|>`), its unknown token and unused slots. Left out
/// of decoded text when asked, and special to the grammar engine.
fn is_special(kind: u8) -> bool {
    matches!(kind, TOKEN_TYPE_CONTROL | TOKEN_TYPE_UNKNOWN | TOKEN_TYPE_UNUSED)
}

/// SentencePiece's written space.
const SPACE: &str = "\u{2581}";

#[derive(Clone)]
pub struct Tokenizer {
    /// One copy, shared by every clone (the engine's, the grammars').
    inner: Arc<Inner>,
}

struct Inner {
    vocab: Vocab,
    model: Model,
    /// User-defined tokens, cut out of any text before the model's own algorithm sees it.
    user_defined: Matcher,
    /// Control tokens, which count only where a chat template wrote them ([`Tokenizer::encode_pieces`]).
    control: Matcher,
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

/// What a token stands for in the output, for the grammar engine's trie.
pub(crate) enum TokenBytes<'a> {
    /// A control or unknown token: no text of its own, only its name.
    Special(&'a str),
    Text(Vec<u8>),
}

impl Tokenizer {
    pub fn from_metadata(md: &ModelMetadata) -> Result<Self> {
        let vocab = Vocab::new(&md.tokens, &md.token_types);
        let model = match md.tokenizer_model.as_str() {
            "gpt2" => Model::BytePairs(BytePairs::new(&vocab, &md.merges, md.pre_tokenizer.as_deref())?),
            "llama" => Model::SentencePiece(SentencePiece::new(&vocab, &md.scores, md.add_space_prefix)),
            other => {
                return Err(Error::UnsupportedModel(format!(
                    "tokenizer model `{other}` is not supported (supported: gpt2, llama)"
                )));
            }
        };
        Ok(Self {
            inner: Arc::new(Inner {
                user_defined: Matcher::new(&vocab, TOKEN_TYPE_USER_DEFINED)?,
                control: Matcher::new(&vocab, TOKEN_TYPE_CONTROL)?,
                vocab,
                model,
                bos: md.bos_token_id,
                add_bos: md.add_bos_token,
            }),
        })
    }

    /// Tokenizes a rendered prompt: special tokens count only where the template wrote them. Text between two
    /// markers is encoded as one run, as `encode` would encode it, so a prompt without special tokens in its
    /// messages gets the same ids either way.
    pub fn encode_pieces(&self, pieces: &[Piece<'_>]) -> Result<Vec<u32>> {
        let mut ids = vec![];
        let mut run = String::new();
        let flush = |run: &mut String, ids: &mut Vec<u32>| -> Result<()> {
            self.encode_into(run, ids)?;
            run.clear();
            Ok(())
        };
        for piece in pieces {
            match *piece {
                Piece::Content(text) => run.push_str(text),
                Piece::Template(mut text) => {
                    while let Some((at, len, id)) = self.inner.control.first(text) {
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
        let mut ids = vec![];
        self.encode_into(text, &mut ids)?;
        Ok(ids)
    }

    /// Cuts the user-defined tokens out of `text` and hands the rest to the model's algorithm.
    fn encode_into(&self, mut text: &str, ids: &mut Vec<u32>) -> Result<()> {
        let inner = &*self.inner;
        while !text.is_empty() {
            let (fragment, token) = match inner.user_defined.first(text) {
                Some((at, len, id)) => (&text[..at], Some((at + len, id))),
                None => (text, None),
            };
            if !fragment.is_empty() {
                match &inner.model {
                    Model::SentencePiece(spm) => spm.encode(&inner.vocab, fragment, ids),
                    Model::BytePairs(bpe) => bpe.encode(fragment, ids)?,
                }
            }
            let Some((end, id)) = token else { break };
            ids.push(id);
            text = &text[end..];
        }
        Ok(())
    }

    /// Whether `text` holds a special token's text (`<|im_start|>`).
    pub fn has_special(&self, text: &str) -> bool {
        self.inner.control.texts.is_match(text)
    }

    fn with_bos(&self, ids: Vec<u32>) -> Vec<u32> {
        match (self.inner.add_bos, self.inner.bos) {
            (true, Some(bos)) if ids.first() != Some(&bos) => std::iter::once(bos).chain(ids).collect(),
            _ => ids,
        }
    }

    /// Tokenizes text; special tokens written in the text (`<|im_start|>`) become their ids.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.encode_pieces(&[Piece::Template(text)])
    }

    /// The text of `ids`; bytes that do not form whole characters (a character cut between tokens) come out as
    /// U+FFFD. Ids outside the vocabulary are left out.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        let inner = &*self.inner;
        let mut bytes = vec![];
        for &id in ids {
            if id as usize >= inner.vocab.len() || (skip_special && is_special(inner.vocab.kind(id))) {
                continue;
            }
            inner.model.push_bytes(inner.vocab.text(id), inner.vocab.kind(id), &mut bytes);
        }
        let text = String::from_utf8_lossy(&bytes);
        // The space SentencePiece put before the text is not the model's to say.
        let text = match &inner.model {
            Model::SentencePiece(spm) if spm.space_prefix => text.strip_prefix(' ').unwrap_or(&text),
            _ => &text,
        };
        Ok(text.to_owned())
    }

    /// The id of the token written `token` in the vocabulary (`<|im_end|>`, `Ġworld`, `▁world`).
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.vocab.find(token)
    }

    /// A token as the vocabulary writes it.
    pub fn token_text(&self, id: u32) -> Option<&str> {
        ((id as usize) < self.inner.vocab.len()).then(|| self.inner.vocab.text(id))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.vocab.len()
    }

    /// What `id` adds to the output, as the grammar engine's token trie needs it.
    pub(crate) fn token_bytes(&self, id: u32) -> TokenBytes<'_> {
        let (vocab, text) = (&self.inner.vocab, self.inner.vocab.text(id));
        if is_special(vocab.kind(id)) {
            return TokenBytes::Special(text);
        }
        let mut bytes = vec![];
        self.inner.model.push_bytes(text, vocab.kind(id), &mut bytes);
        TokenBytes::Text(bytes)
    }
}

/// Every token's text in one string, its type, and a table that finds a text's id.
struct Vocab {
    text: String,
    /// Token `i` is `text[ends[i - 1]..ends[i]]` (from 0 for the first).
    ends: Vec<u32>,
    kinds: Vec<u8>,
    /// Ids, by the hash of their text (the last id of a text written twice).
    index: HashTable<u32>,
    hasher: RandomState,
}

impl Vocab {
    fn new(tokens: &[String], types: &[i32]) -> Self {
        let mut text = String::with_capacity(tokens.iter().map(String::len).sum());
        let mut ends = Vec::with_capacity(tokens.len());
        for token in tokens {
            text.push_str(token);
            ends.push(u32::try_from(text.len()).expect("a vocabulary under 4 GB"));
        }
        let kinds =
            (0..tokens.len()).map(|i| types.get(i).map_or(TOKEN_TYPE_NORMAL, |&t| t.clamp(0, 255) as u8)).collect();
        let mut vocab =
            Self { text, ends, kinds, index: HashTable::with_capacity(tokens.len()), hasher: RandomState::new() };
        for (id, token) in (0u32..).zip(tokens) {
            let hash = vocab.hasher.hash_one(token.as_str());
            let Self { index, hasher, text, ends, .. } = &mut vocab;
            match index.find_mut(hash, |&other| token_text(text, ends, other) == token) {
                // A text written twice is the later id's (llama.cpp's `token_to_id`).
                Some(other) => *other = id,
                None => {
                    index.insert_unique(hash, id, |&id| hasher.hash_one(token_text(text, ends, id)));
                }
            }
        }
        vocab
    }

    fn len(&self) -> usize {
        self.ends.len()
    }

    fn text(&self, id: u32) -> &str {
        token_text(&self.text, &self.ends, id)
    }

    fn kind(&self, id: u32) -> u8 {
        self.kinds[id as usize]
    }

    fn find(&self, text: &str) -> Option<u32> {
        self.index.find(self.hasher.hash_one(text), |&id| self.text(id) == text).copied()
    }

    /// The id of a normal token written `text` (what merges may make).
    fn find_normal(&self, text: &str) -> Option<u32> {
        self.find(text).filter(|&id| self.kind(id) == TOKEN_TYPE_NORMAL)
    }
}

fn token_text<'a>(text: &'a str, ends: &[u32], id: u32) -> &'a str {
    let id = id as usize;
    let start = if id == 0 { 0 } else { ends[id - 1] as usize };
    &text[start..ends[id] as usize]
}

/// Finds one type of token's texts in text: the leftmost, then the longest. (llama.cpp cuts the longest tokens out
/// first, wherever they are; the two orders differ only where two tokens' texts overlap, which in the packaged
/// vocabularies none do.) Gemma has over 6000 control tokens, too many to search for one by one.
struct Matcher {
    texts: AhoCorasick,
    ids: Vec<u32>,
}

impl Matcher {
    fn new(vocab: &Vocab, kind: u8) -> Result<Self> {
        let (texts, ids): (Vec<&str>, Vec<u32>) = (0..vocab.len() as u32)
            .filter(|&id| vocab.kind(id) == kind && !vocab.text(id).is_empty())
            .map(|id| (vocab.text(id), id))
            .unzip();
        let texts = AhoCorasick::builder()
            .match_kind(aho_corasick::MatchKind::LeftmostLongest)
            .build(&texts)
            .map_err(|e| Error::Tokenizer(format!("the special tokens cannot be searched for: {e}")))?;
        Ok(Self { texts, ids })
    }

    /// The first token in `text`: where it starts, its length, its id.
    fn first(&self, text: &str) -> Option<(usize, usize, u32)> {
        self.texts.find(text).map(|m| (m.start(), m.len(), self.ids[m.pattern().as_usize()]))
    }
}

enum Model {
    SentencePiece(SentencePiece),
    BytePairs(BytePairs),
}

impl Model {
    /// Appends the bytes a token of type `kind` stands for. Only normal and byte tokens are written in the model's
    /// alphabet; the others (user-defined, control) are plain text (llama.cpp's `token_to_piece`).
    fn push_bytes(&self, text: &str, kind: u8, out: &mut Vec<u8>) {
        if !matches!(kind, TOKEN_TYPE_NORMAL | TOKEN_TYPE_BYTE) {
            out.extend_from_slice(text.as_bytes());
            return;
        }
        match self {
            Self::SentencePiece(_) => match byte_token(text) {
                Some(byte) => out.push(byte),
                None => out.extend_from_slice(text.replace(SPACE, " ").as_bytes()),
            },
            // A character outside the byte alphabet stands for itself.
            Self::BytePairs(_) => {
                for c in text.chars() {
                    match byte_of_char(c) {
                        Some(byte) => out.push(byte),
                        None => out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
                    }
                }
            }
        }
    }
}

/// A byte token's byte (`<0x0A>`).
fn byte_token(text: &str) -> Option<u8> {
    let hex = text.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

/// llama.cpp's SentencePiece tokenizer (`llm_tokenizer_spm`), with one difference: pairs merge only into normal
/// tokens (llama.cpp takes any), so text in a message can never become a control token.
struct SentencePiece {
    scores: Vec<f32>,
    /// Whether a space goes before the text (`tokenizer.ggml.add_space_prefix`).
    space_prefix: bool,
    /// The `<0xXX>` token of each byte, for characters outside the vocabulary.
    bytes: [Option<u32>; 256],
    unknown: Option<u32>,
}

/// A character run of the text being merged: its place in the text and its neighbours (a linked list over the
/// characters; a run merged into its left neighbour is left empty).
#[derive(Clone, Copy)]
struct Run {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

/// Two adjacent runs whose joined text is a token, by that token's score: the best first, then the leftmost.
struct Candidate {
    score: f32,
    left: usize,
    right: usize,
    len: usize,
}

impl PartialEq for Candidate {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other).is_eq()
    }
}

impl Eq for Candidate {}

impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Candidate {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.score.total_cmp(&other.score).then(other.left.cmp(&self.left))
    }
}

impl SentencePiece {
    fn new(vocab: &Vocab, scores: &[f32], space_prefix: bool) -> Self {
        let scores = (0..vocab.len()).map(|id| scores.get(id).copied().unwrap_or(0.0)).collect();
        let bytes = std::array::from_fn(|b| vocab.find(&format!("<0x{b:02X}>")));
        let unknown = (0..vocab.len() as u32).find(|&id| vocab.kind(id) == TOKEN_TYPE_UNKNOWN);
        Self { scores, space_prefix, bytes, unknown }
    }

    /// Each fragment starts the text or follows a token cut out of it: llama.cpp puts the space prefix before
    /// every one.
    fn encode(&self, vocab: &Vocab, fragment: &str, ids: &mut Vec<u32>) {
        let prefix = if self.space_prefix { SPACE } else { "" };
        let text = format!("{prefix}{}", fragment.replace(' ', SPACE));
        let mut runs: Vec<Run> = text
            .char_indices()
            .enumerate()
            .map(|(i, (start, c))| Run { start, len: c.len_utf8(), prev: i.checked_sub(1), next: Some(i + 1) })
            .collect();
        if let Some(last) = runs.last_mut() {
            last.next = None;
        }
        let mut queue = BinaryHeap::new();
        let candidate = |runs: &[Run], left: Option<usize>, right: Option<usize>| {
            let (left, right) = (left?, right?);
            let (start, len) = (runs[left].start, runs[left].len + runs[right].len);
            let id = vocab.find_normal(&text[start..start + len])?;
            Some(Candidate { score: self.scores[id as usize], left, right, len })
        };
        for i in 1..runs.len() {
            queue.extend(candidate(&runs, Some(i - 1), Some(i)));
        }
        while let Some(Candidate { left, right, len, .. }) = queue.pop() {
            // A candidate whose runs have changed since it was found no longer applies.
            let (l, r) = (runs[left], runs[right]);
            if l.len == 0 || r.len == 0 || l.len + r.len != len {
                continue;
            }
            runs[left].len = len;
            runs[left].next = r.next;
            runs[right].len = 0;
            if let Some(next) = r.next {
                runs[next].prev = Some(left);
            }
            queue.extend(candidate(&runs, l.prev, Some(left)));
            queue.extend(candidate(&runs, Some(left), r.next));
        }
        let mut at = (!runs.is_empty()).then_some(0);
        while let Some(i) = at {
            let piece = &text[runs[i].start..runs[i].start + runs[i].len];
            match vocab.find_normal(piece) {
                Some(id) => ids.push(id),
                None => ids.extend(piece.bytes().filter_map(|b| self.bytes[b as usize].or(self.unknown))),
            }
            at = runs[i].next;
        }
    }
}

/// Byte-level BPE (GPT-2's scheme, as Hugging Face's `tokenizers` and llama.cpp run it).
struct BytePairs {
    /// Pairs of ids (left in the high half) that merge: the merge's rank (lower merges first) and the id made.
    merges: HashMap<u64, (u32, u32)>,
    /// The token of each single byte, as the byte-level alphabet writes it.
    bytes: [Option<u32>; 256],
    split: WordSplit,
}

/// How the text is cut into words before merging (the GGUF `tokenizer.ggml.pre`).
struct WordSplit {
    /// Each digit a word of its own, before the regex (SmolLM, StarCoder).
    digits: bool,
    regex: fancy_regex::Regex,
}

/// GPT-2's pre-tokenizer regex.
const GPT2_PATTERN: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";

/// The pre-tokenizer regex of Qwen2's `tokenizer.json` (llama.cpp's `LLAMA_VOCAB_PRE_TYPE_QWEN2`): GPT-4's, with
/// digits one by one.
const QWEN2_PATTERN: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

impl BytePairs {
    fn new(vocab: &Vocab, merges: &[String], pre: Option<&str>) -> Result<Self> {
        let mut table = HashMap::with_capacity(merges.len());
        let mut unusable = 0;
        for (rank, merge) in (0u32..).zip(merges) {
            let (a, b) = merge
                .split_once(' ')
                .ok_or_else(|| Error::Tokenizer(format!("malformed merge `{merge}` in tokenizer.ggml.merges")))?;
            match (vocab.find(a), vocab.find(b), vocab.find(&format!("{a}{b}"))) {
                (Some(a), Some(b), Some(id)) => {
                    // The first of a pair listed twice (llama.cpp's rule).
                    table.entry((u64::from(a) << 32) | u64::from(b)).or_insert((rank, id));
                }
                _ => unusable += 1,
            }
        }
        if unusable > 0 {
            tracing::debug!(unusable, "merges naming tokens outside the vocabulary are ignored");
        }
        let (digits, pattern) = match pre {
            // Pre-tokenizers whose GGUF name llama.cpp maps to a digit-splitting regex split digits one by one
            // before the GPT-2 regex.
            Some("smollm" | "starcoder" | "refact") => (true, GPT2_PATTERN),
            Some("qwen2") => (false, QWEN2_PATTERN),
            _ => (false, GPT2_PATTERN),
        };
        let regex = fancy_regex::Regex::new(pattern).map_err(|e| Error::Tokenizer(e.to_string()))?;
        let bytes = std::array::from_fn(|b| vocab.find(BYTE_CHARS[b].encode_utf8(&mut [0; 4])));
        Ok(Self { merges: table, bytes, split: WordSplit { digits, regex } })
    }

    fn encode(&self, fragment: &str, ids: &mut Vec<u32>) -> Result<()> {
        let mut words = vec![];
        if self.split.digits {
            for part in split_digits(fragment) {
                split_isolated(&self.split.regex, part, &mut words)?;
            }
        } else {
            split_isolated(&self.split.regex, fragment, &mut words)?;
        }
        for word in words {
            self.merge(word.as_bytes(), ids);
        }
        Ok(())
    }

    /// Merges one word's bytes, the pair of lowest rank first (the leftmost among equals).
    fn merge(&self, word: &[u8], ids: &mut Vec<u32>) {
        // Each symbol's id; None for a byte without a token (it merges with nothing, so nothing merges across it,
        // and it is left out, as llama.cpp does) or once merged into its left neighbour. `next` links the symbols.
        let mut symbols: Vec<Option<u32>> = word.iter().map(|&b| self.bytes[b as usize]).collect();
        let n = symbols.len();
        let mut next: Vec<usize> = (1..=n).collect();
        let mut prev: Vec<Option<usize>> = (0..n).map(|i| i.checked_sub(1)).collect();
        let merge_of = |a: u32, b: u32| self.merges.get(&((u64::from(a) << 32) | u64::from(b))).copied();
        // (rank, left, left id, right id, merged id), smallest first.
        let mut queue = BinaryHeap::new();
        for i in 1..n {
            if let (Some(a), Some(b)) = (symbols[i - 1], symbols[i])
                && let Some((rank, id)) = merge_of(a, b)
            {
                queue.push(std::cmp::Reverse((rank, i - 1, a, b, id)));
            }
        }
        while let Some(std::cmp::Reverse((_, left, a, b, id))) = queue.pop() {
            // A candidate whose symbols have changed since it was found no longer applies (a merged symbol's
            // token is longer than either part, so an unchanged id means an unchanged symbol).
            let right = next[left];
            if symbols[left] != Some(a) || right >= n || symbols[right] != Some(b) {
                continue;
            }
            symbols[left] = Some(id);
            symbols[right] = None;
            next[left] = next[right];
            if next[right] < n {
                prev[next[right]] = Some(left);
            }
            if let Some(p) = prev[left]
                && let Some(pid) = symbols[p]
                && let Some((rank, merged)) = merge_of(pid, id)
            {
                queue.push(std::cmp::Reverse((rank, p, pid, id, merged)));
            }
            if next[left] < n
                && let Some(nid) = symbols[next[left]]
                && let Some((rank, merged)) = merge_of(id, nid)
            {
                queue.push(std::cmp::Reverse((rank, left, id, nid, merged)));
            }
        }
        ids.extend(symbols.into_iter().flatten());
    }
}

/// Cuts `text` at each match of `regex`, keeping matches and what lies between them (Hugging Face's `Isolated`).
fn split_isolated<'t>(regex: &fancy_regex::Regex, text: &'t str, words: &mut Vec<&'t str>) -> Result<()> {
    let mut last = 0;
    for m in regex.find_iter(text) {
        let m = m.map_err(|e| Error::Tokenizer(format!("the pre-tokenizer failed on the text: {e}")))?;
        if m.start() > last {
            words.push(&text[last..m.start()]);
        }
        if !m.as_str().is_empty() {
            words.push(m.as_str());
        }
        last = m.end();
    }
    if last < text.len() {
        words.push(&text[last..]);
    }
    Ok(())
}

/// Cuts `text` into single numeric characters and the runs between them.
fn split_digits(text: &str) -> impl Iterator<Item = &str> {
    let mut rest = text;
    std::iter::from_fn(move || {
        let first = rest.chars().next()?;
        let end = if first.is_numeric() { first.len_utf8() } else { rest.find(char::is_numeric).unwrap_or(rest.len()) };
        let (word, tail) = rest.split_at(end);
        rest = tail;
        Some(word)
    })
}

/// GPT-2's byte-level alphabet: the character that writes each byte. Printable bytes stand for themselves; the
/// other 68 move to U+0100 and up, in order.
const BYTE_CHARS: [char; 256] = {
    let mut table = ['\0'; 256];
    let mut moved = 0x100;
    let mut b = 0;
    while b < 256 {
        let code = if printable(b as u8) {
            b
        } else {
            moved += 1;
            moved - 1
        };
        table[b as usize] = match char::from_u32(code) {
            Some(c) => c,
            None => panic!("a valid character"),
        };
        b += 1;
    }
    table
};

const fn printable(b: u8) -> bool {
    matches!(b, 0x21..=0x7e | 0xa1..=0xac | 0xae..=0xff)
}

/// The byte that `c` writes in the byte-level alphabet.
fn byte_of_char(c: char) -> Option<u8> {
    /// The bytes moved to U+0100 and up, in order: [`BYTE_CHARS`] read backwards.
    const MOVED: [u8; 68] = {
        let mut table = [0; 68];
        let mut b = 0;
        while b < 256 {
            let code = BYTE_CHARS[b] as u32;
            if code >= 0x100 {
                table[(code - 0x100) as usize] = b as u8;
            }
            b += 1;
        }
        table
    };
    let code = c as u32;
    match code {
        0..0x100 => printable(code as u8).then_some(code as u8),
        _ => MOVED.get((code - 0x100) as usize).copied(),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_byte_level_alphabet_maps_back_to_every_byte() {
        assert_eq!(byte_of_char('A'), Some(b'A'));
        assert_eq!(byte_of_char('Ġ'), Some(b' '), "U+0120 is the space");
        assert_eq!(byte_of_char('Ċ'), Some(b'\n'));
        assert_eq!(byte_of_char('\u{100}'), Some(0));
        assert_eq!(byte_of_char(' '), None, "the space is written Ġ");
        for b in 0..=255u8 {
            assert_eq!(byte_of_char(BYTE_CHARS[b as usize]), Some(b));
        }
        let distinct: std::collections::HashSet<char> = BYTE_CHARS.into_iter().collect();
        assert_eq!(distinct.len(), 256);
    }

    #[test]
    fn digits_and_regex_words_are_cut_as_hugging_face_cuts_them() {
        assert_eq!(split_digits("ab12c3").collect::<Vec<_>>(), ["ab", "1", "2", "c", "3"]);
        assert_eq!(split_digits("").count(), 0);
        let regex = fancy_regex::Regex::new(GPT2_PATTERN).unwrap();
        let mut words = vec![];
        split_isolated(&regex, "Hello  world's end\n", &mut words).unwrap();
        assert_eq!(words, ["Hello", " ", " world", "'s", " end", "\n"]);
    }

    fn vocabulary(tokens: &[&str], types: &[i32]) -> ModelMetadata {
        ModelMetadata {
            name: "test".into(),
            architecture: "llama".into(),
            context_length: 64,
            tokenizer_model: "llama".into(),
            pre_tokenizer: None,
            tokens: tokens.iter().map(|t| t.to_string()).collect(),
            token_types: types.to_vec(),
            scores: vec![],
            merges: vec![],
            bos_token_id: None,
            eos_token_id: None,
            add_bos_token: false,
            add_space_prefix: false,
            chat_template: None,
        }
    }

    #[test]
    fn sentencepiece_merges_the_best_scoring_pair_first_and_falls_back_to_bytes() {
        // "abc": "ab" (score -1) beats "bc" (-2), then "abc" is not a token, so [ab, c].
        let mut md = vocabulary(
            &["<unk>", "a", "b", "c", "ab", "bc", "▁", "▁a", "<0xC3>", "<0xA9>", "<ctl>", "  "],
            &[2, 1, 1, 1, 1, 1, 1, 1, 6, 6, 3, 4],
        );
        md.scores = vec![0.0, -5.0, -5.0, -5.0, -1.0, -2.0, -5.0, -0.5, 0.0, 0.0, 0.0, 0.0];
        let tok = Tokenizer::from_metadata(&md).unwrap();
        assert_eq!(tok.encode_text("abc").unwrap(), [4, 3]);
        md.scores[5] = -0.1;
        let tok = Tokenizer::from_metadata(&md).unwrap();
        assert_eq!(tok.encode_text("abc").unwrap(), [1, 5], "now bc scores best");
        // é is outside the vocabulary: its two UTF-8 bytes; a space is ▁, merged with the a after it.
        assert_eq!(tok.encode_text("é a").unwrap(), [8, 9, 7]);
        assert_eq!(tok.decode(&[8, 9, 7], false).unwrap(), "é a");
        // A user-defined token is cut out first; a control token's text is plain text (here unknown: no bytes).
        assert_eq!(tok.encode_text("a  b").unwrap(), [1, 11, 2]);
        assert_eq!(tok.encode("<ctl>a").unwrap(), [10, 1]);
        assert_eq!(tok.decode(&[10, 1], true).unwrap(), "a");
        assert_eq!(tok.token_id("▁a"), Some(7));
        assert_eq!(tok.token_id("zz"), None);
        // With a space prefix, one ▁ goes before the text, and decoding takes it off again.
        md.add_space_prefix = true;
        let tok = Tokenizer::from_metadata(&md).unwrap();
        assert_eq!(tok.encode_text("a").unwrap(), [7]);
        assert_eq!(tok.decode(&[7], false).unwrap(), "a");
    }

    #[test]
    fn byte_pairs_merge_by_rank_and_cut_digits() {
        // Byte-level: "Ġ" is the space. Merges: "a b" (rank 0), "Ġ a" (1), "Ġa b" (2).
        let mut md = vocabulary(&["a", "b", "Ġ", "ab", "Ġa", "Ġab", "1", "2", "<|end|>"], &[1, 1, 1, 1, 1, 1, 1, 1, 3]);
        md.tokenizer_model = "gpt2".into();
        md.pre_tokenizer = Some("smollm".into());
        md.merges = vec!["a b".into(), "Ġ a".into(), "Ġa b".into()];
        let tok = Tokenizer::from_metadata(&md).unwrap();
        // "ab ab": words "ab", " ab"; in " ab", "a b" (rank 0) merges before "Ġ a" (rank 1), leaving [Ġ, ab].
        assert_eq!(tok.encode_text("ab ab").unwrap(), [3, 2, 3]);
        md.merges = vec!["Ġ a".into(), "a b".into(), "Ġa b".into()];
        let tok = Tokenizer::from_metadata(&md).unwrap();
        assert_eq!(tok.encode_text("ab ab").unwrap(), [3, 5]);
        assert_eq!(tok.encode_text("12").unwrap(), [6, 7], "digits one by one");
        assert_eq!(tok.encode("<|end|>ab").unwrap(), [8, 3]);
        assert!(!tok.encode_text("<|end|>").unwrap().contains(&8), "control tokens in text are text");
        assert_eq!(tok.decode(&[3, 5, 8], false).unwrap(), "ab ab<|end|>");
        assert_eq!(tok.decode(&[3, 5, 8], true).unwrap(), "ab ab");
        assert!(matches!(tok.token_bytes(5), TokenBytes::Text(b) if b == b" ab"));

        assert!(matches!(tok.token_bytes(8), TokenBytes::Special("<|end|>")));
    }

    #[test]
    fn nothing_merges_across_a_byte_without_a_token() {
        // "!\x01!" is one word; llama.cpp keeps the tokenless byte between the two "!" (and then leaves it out).
        let mut md = vocabulary(&["!", "!!"], &[1, 1]);
        md.tokenizer_model = "gpt2".into();
        md.merges = vec!["! !".into()];
        let tok = Tokenizer::from_metadata(&md).unwrap();
        assert_eq!(tok.encode_text("!!").unwrap(), [1]);
        assert_eq!(tok.encode_text("!\u{1}!").unwrap(), [0, 0]);
    }

    #[test]
    fn grammar_bytes_are_what_each_token_writes() {
        let md = vocabulary(&["<unk>", "▁hi", "<0x0A>", "<eos>"], &[2, 1, 6, 3]);
        let tok = Tokenizer::from_metadata(&md).unwrap();
        assert!(matches!(tok.token_bytes(0), TokenBytes::Special("<unk>")));
        assert!(matches!(tok.token_bytes(1), TokenBytes::Text(b) if b == b" hi"));
        assert!(matches!(tok.token_bytes(2), TokenBytes::Text(b) if b == b"\n"));
        assert!(matches!(tok.token_bytes(3), TokenBytes::Special("<eos>")));
    }
}
