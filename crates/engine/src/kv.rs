//! The paged KV cache (Kwon et al., "Efficient Memory Management for Large Language Model Serving with
//! PagedAttention", 2023) with prefix caching (vLLM's automatic prefix caching; SGLang's RadixAttention keeps the
//! same idea in a tree).
//!
//! Keys and values live in fixed blocks of `BLOCK_SIZE` positions from one pool sized at start-up, stored as f16
//! (half the bytes of f32; attention converts on the fly). A sequence holds a block table (`KvCache`). A block
//! whose positions are all written is *registered* under a hash of its tokens and of every token before it, so the
//! key names the block's whole prefix. When a sequence leaves, its registered blocks stay in the pool as cache;
//! a new sequence whose prompt starts with the same tokens takes those blocks instead of computing them again
//! (the keys and values of a position depend only on the tokens up to it, so the result is the same to the bit).
//! Blocks no sequence uses are evicted least recently used first when the pool needs room; a block in use is
//! never evicted. A leaving sequence's partly filled last block is kept as well (a *tail*, filed under the prefix
//! hash of the blocks before it); the next sequence that continues those tokens takes it over, so a
//! conversation's next turn computes only its new tokens (llama.cpp's slot reuse gets the same by keeping the
//! whole slot).

use std::{
    collections::{BTreeMap, HashMap, hash_map::RandomState},
    hash::{BuildHasher, Hash, Hasher},
};

use half::f16;

use crate::model::ModelConfig;

/// Positions per KV-cache block.
pub const BLOCK_SIZE: usize = 16;

/// The largest f16, what a key or value beyond f16's range is stored as.
pub(crate) const F16_MAX: f32 = 65504.0;

/// What identifies a registered block: the hash of its prefix, checked against the tokens themselves and the
/// parent's hash. The hash is SipHash with keys drawn at random for each pool, so prefixes that collide cannot be
/// searched for from outside; an accidental collision of 64-bit hashes is what is left.
#[derive(Debug, Clone, PartialEq, Eq)]
struct BlockKey {
    hash: u64,
    parent: u64,
    tokens: [u32; BLOCK_SIZE],
}

impl BlockKey {
    fn new(keys: &RandomState, parent: u64, tokens: &[u32]) -> Self {
        let tokens: [u32; BLOCK_SIZE] = tokens.try_into().expect("a whole block of tokens");
        let mut hasher = keys.build_hasher();
        parent.hash(&mut hasher);
        tokens.hash(&mut hasher);
        Self { hash: hasher.finish(), parent, tokens }
    }
}

/// Prefix-cache counters since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheCounters {
    /// Prompt tokens looked up in the cache on admission (a preempted sequence's tokens count again).
    pub lookup_tokens: u64,
    /// Of those, tokens whose keys and values came from the cache instead of being computed.
    pub hit_tokens: u64,
    /// Cached blocks dropped to make room.
    pub evictions: u64,
}

/// The keys and values of every sequence.
pub struct KvPool {
    data: Vec<f16>,
    blocks: usize,
    n_layer: usize,
    kv_dim: usize,
    /// Blocks holding nothing anyone can reuse.
    free: Vec<u32>,
    /// Sequences using each block.
    refs: Vec<u32>,
    /// The key of each registered block.
    keys: Vec<Option<BlockKey>>,
    /// Partly filled last blocks of sequences that left ("tails"), by the prefix hash of the whole blocks before
    /// them, with the tokens they hold: a conversation's next turn continues its last one mid-block.
    tails: HashMap<u64, (u32, Vec<u32>)>,
    /// For a block kept as a tail, the prefix hash it is filed under.
    tail_of: Vec<Option<u64>>,
    /// Registered blocks by hash.
    cached: HashMap<u64, u32>,
    /// Registered blocks no sequence uses, by when they were last let go: the first is evicted first.
    unused: BTreeMap<u64, u32>,
    /// Each unused registered block's place in `unused`.
    released_at: Vec<u64>,
    clock: u64,
    caching: bool,
    counters: CacheCounters,
    /// The hash keys of this pool's prefixes.
    keys_hasher: RandomState,
}

impl KvPool {
    /// A pool of `blocks` blocks for `config`'s model; `caching` keeps finished sequences' blocks for reuse.
    pub fn new(config: &ModelConfig, blocks: usize, caching: bool) -> Self {
        // The data is allocated zeroed (as integers: the allocator hands out zeroed pages without writing them),
        // so the operating system commits only the pages a block has used.
        use half::vec::HalfBitsVecExt;
        let data = vec![0u16; blocks * config.n_layer * 2 * BLOCK_SIZE * config.kv_dim()].reinterpret_into();
        Self { data, ..Self::without_storage(config, blocks, caching) }
    }

    /// The blocks of a pool whose keys and values live elsewhere: the device path keeps them in tensors of its
    /// own ([`crate::model::device::DeviceModel`]) and this pool hands out, shares and caches the blocks.
    pub fn without_storage(config: &ModelConfig, blocks: usize, caching: bool) -> Self {
        let kv_dim = config.kv_dim();
        // Reversed, so blocks are handed out from the start of the pool.
        let free = (0..blocks as u32).rev().collect();
        Self {
            data: Vec::new(),
            blocks,
            n_layer: config.n_layer,
            kv_dim,
            free,
            refs: vec![0; blocks],
            keys: vec![None; blocks],
            tails: HashMap::new(),
            tail_of: vec![None; blocks],
            cached: HashMap::new(),
            unused: BTreeMap::new(),
            released_at: vec![0; blocks],
            clock: 0,
            caching,
            counters: CacheCounters::default(),
            keys_hasher: RandomState::new(),
        }
    }

    /// Bytes one block takes.
    pub fn block_bytes(config: &ModelConfig) -> usize {
        config.n_layer * 2 * BLOCK_SIZE * config.kv_dim() * std::mem::size_of::<f16>()
    }

    pub fn total_blocks(&self) -> usize {
        self.blocks
    }

    /// Blocks a sequence can take now: free ones and cached ones no sequence uses.
    pub fn free_blocks(&self) -> usize {
        self.free.len() + self.unused.len()
    }

    /// Cached blocks no sequence uses (reusable, and evictable when room is needed).
    pub fn cached_blocks(&self) -> usize {
        self.unused.len()
    }

    /// Whether finished sequences' blocks are kept for reuse.
    pub fn caching(&self) -> bool {
        self.caching
    }

    pub fn counters(&self) -> CacheCounters {
        self.counters
    }

    /// Where block `block`'s keys (`value` false) or values of layer `layer` start.
    fn offset(&self, block: u32, layer: usize, value: bool) -> usize {
        ((block as usize * self.n_layer + layer) * 2 + usize::from(value)) * BLOCK_SIZE * self.kv_dim
    }

    /// The keys or values of one block and layer, `BLOCK_SIZE × kv_dim` of them. Values are stored position by
    /// position; keys dimension by dimension (key `j`'s `i`-th value at `i · BLOCK_SIZE + j`), so that
    /// attention scores a block's keys for one dimension in a register ([`crate::kernels::block_scores`]), and a
    /// key-value head's keys are one contiguous run.
    pub(crate) fn block(&self, block: u32, layer: usize, value: bool) -> &[f16] {
        &self.data[self.offset(block, layer, value)..][..BLOCK_SIZE * self.kv_dim]
    }

    /// Stores one position's keys and values. Keys and values beyond f16's range are stored as its largest, not
    /// as infinity: attention multiplies the values a query does not see by a weight of 0, and a masked score adds
    /// −∞ to a key's, either of which an infinity would turn into NaN.
    pub(crate) fn write(&mut self, block: u32, slot: usize, layer: usize, keys: &[f32], values: &[f32]) {
        let at = self.offset(block, layer, true) + slot * self.kv_dim;
        let stored = &mut self.data[at..at + self.kv_dim];
        crate::kernels::to_f16(values, stored);
        for v in stored.iter_mut().filter(|v| v.is_infinite()) {
            *v = if v.is_sign_negative() { f16::MIN } else { f16::MAX };
        }
        let at = self.offset(block, layer, false) + slot;
        for (i, k) in keys.iter().enumerate() {
            self.data[at + i * BLOCK_SIZE] = f16::from_f32(k.clamp(-F16_MAX, F16_MAX));
        }
    }

    /// A block for a sequence: a free one, else the least recently used cached one, which is evicted.
    fn take(&mut self) -> Option<u32> {
        let block = match self.free.pop() {
            Some(block) => block,
            None => {
                let (_, block) = self.unused.pop_first()?;
                match (self.keys[block as usize].take(), self.tail_of[block as usize].take()) {
                    (Some(key), _) => drop(self.cached.remove(&key.hash)),
                    (None, Some(parent)) => drop(self.tails.remove(&parent)),
                    (None, None) => unreachable!("an unused cached block is registered or a tail"),
                }
                self.counters.evictions += 1;
                block
            }
        };
        self.refs[block as usize] = 1;
        Some(block)
    }

    /// One more sequence uses a registered block.
    fn share(&mut self, block: u32) {
        let refs = &mut self.refs[block as usize];
        if *refs == 0 {
            self.unused.remove(&self.released_at[block as usize]);
        }
        *refs += 1;
    }

    /// A sequence lets a block go: a registered one stays cached, anything else is free again.
    fn put(&mut self, block: u32) {
        let refs = &mut self.refs[block as usize];
        *refs -= 1;
        if *refs > 0 {
            return;
        }
        if self.keys[block as usize].is_some() {
            self.clock += 1;
            self.released_at[block as usize] = self.clock;
            self.unused.insert(self.clock, block);
        } else {
            self.free.push(block);
        }
    }

    /// Keeps a leaving sequence's partly filled last block as a tail under `parent` (the prefix hash of the whole
    /// blocks before it), holding `tokens`; it is evicted like an unused cached block. A tail already kept under
    /// the same prefix is replaced by the longer of the two.
    fn keep_tail(&mut self, block: u32, parent: u64, tokens: &[u32]) {
        debug_assert_eq!(self.refs[block as usize], 1, "a partly filled block is never shared");
        if self.tails.get(&parent).is_some_and(|(_, held)| held.len() >= tokens.len()) {
            self.put(block);
            return;
        }
        if let Some((old, _)) = self.tails.remove(&parent) {
            self.unused.remove(&self.released_at[old as usize]);
            self.tail_of[old as usize] = None;
            self.free.push(old);
        }
        self.refs[block as usize] = 0;
        self.tails.insert(parent, (block, tokens.to_vec()));
        self.tail_of[block as usize] = Some(parent);
        self.clock += 1;
        self.released_at[block as usize] = self.clock;
        self.unused.insert(self.clock, block);
    }

    /// How many of `tokens` the tail kept under `parent` holds (its leading tokens that equal theirs).
    fn tail_match(&self, parent: u64, tokens: &[u32]) -> usize {
        self.tails.get(&parent).map_or(0, |(_, held)| held.iter().zip(tokens).take_while(|(a, b)| a == b).count())
    }

    /// Takes the tail kept under `parent` for a sequence's own (its positions past the match get overwritten).
    fn claim_tail(&mut self, parent: u64) -> Option<u32> {
        let (block, _) = self.tails.remove(&parent)?;
        self.unused.remove(&self.released_at[block as usize]);
        self.tail_of[block as usize] = None;
        self.refs[block as usize] = 1;
        Some(block)
    }

    /// Counts an admitted sequence's lookup: `tokens` looked up, `hit` of them found.
    pub fn record_lookup(&mut self, tokens: usize, hit: usize) {
        self.counters.lookup_tokens += tokens as u64;
        self.counters.hit_tokens += hit as u64;
    }

    /// The registered block with this prefix, if any.
    fn lookup(&self, key: &BlockKey) -> Option<u32> {
        let block = *self.cached.get(&key.hash)?;
        (self.keys[block as usize].as_ref() == Some(key)).then_some(block)
    }

    /// Registers a block a sequence has just filled, unless the same prefix is cached already.
    fn register(&mut self, block: u32, key: BlockKey) {
        if self.caching && !self.cached.contains_key(&key.hash) && self.keys[block as usize].is_none() {
            self.cached.insert(key.hash, block);
            self.keys[block as usize] = Some(key);
        }
    }
}

/// One sequence's place in the pool: its block table and how many positions are filled.
#[derive(Debug, Default)]
pub struct KvCache {
    pub(crate) blocks: Vec<u32>,
    pub(crate) len: usize,
    /// Leading blocks whose prefix hash is known (matched on admission or registered when filled).
    hashed: usize,
    /// The prefix hash of the last of them.
    last_hash: u64,
}

impl KvCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// Positions already in the cache.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Blocks held.
    pub fn blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Blocks needed to hold `positions` positions.
    pub fn blocks_for(positions: usize) -> usize {
        positions.div_ceil(BLOCK_SIZE)
    }

    /// Takes blocks from the pool until `len + n` positions fit; takes none and returns false when the pool
    /// has too few blocks to give (free, or cached and unused).
    pub fn reserve(&mut self, pool: &mut KvPool, n: usize) -> bool {
        let missing = Self::blocks_for(self.len + n).saturating_sub(self.blocks.len());
        if missing > pool.free_blocks() {
            return false;
        }
        for _ in 0..missing {
            let block = pool.take().expect("counted above");
            self.blocks.push(block);
        }
        true
    }

    /// For an empty cache: takes every cached block that continues `tokens`' prefix, then the tail kept after
    /// them if it starts with the next tokens, leaving at least the last token to compute (its logits are
    /// needed). Returns the positions now in the cache.
    pub fn reuse_prefix(&mut self, pool: &mut KvPool, tokens: &[u32]) -> usize {
        debug_assert!(self.blocks.is_empty(), "only an empty cache reuses a prefix");
        let whole = tokens.len().saturating_sub(1) / BLOCK_SIZE;
        if pool.caching {
            for chunk in tokens.chunks_exact(BLOCK_SIZE).take(whole) {
                let key = BlockKey::new(&pool.keys_hasher, self.last_hash, chunk);
                let Some(block) = pool.lookup(&key) else { break };
                pool.share(block);
                self.blocks.push(block);
                self.last_hash = key.hash;
            }
        }
        self.hashed = self.blocks.len();
        self.len = self.hashed * BLOCK_SIZE;
        if pool.caching {
            let rest = &tokens[self.len..tokens.len().saturating_sub(1).max(self.len)];
            let matched = pool.tail_match(self.last_hash, rest).min(BLOCK_SIZE - 1);
            if matched > 0 {
                let block = pool.claim_tail(self.last_hash).expect("a tail was matched");
                self.blocks.push(block);
                self.len += matched;
            }
        }
        self.len
    }

    /// The prefix hash of the block after those reused: the next whole block of `tokens` that could have come
    /// from the cache (the last token is always computed). `None` when there is none.
    pub fn next_block(&self, pool: &KvPool, tokens: &[u32]) -> Option<u64> {
        let at = self.hashed * BLOCK_SIZE;
        (at + BLOCK_SIZE < tokens.len())
            .then(|| BlockKey::new(&pool.keys_hasher, self.last_hash, &tokens[at..at + BLOCK_SIZE]).hash)
    }

    /// The prefix hashes of the whole blocks of `tokens` that this sequence has yet to compute and register:
    /// what it will add to the cache.
    pub fn unregistered(&self, pool: &KvPool, tokens: &[u32]) -> Vec<u64> {
        let mut hash = self.last_hash;
        tokens[self.hashed * BLOCK_SIZE..]
            .chunks_exact(BLOCK_SIZE)
            .map(|chunk| {
                hash = BlockKey::new(&pool.keys_hasher, hash, chunk).hash;
                hash
            })
            .collect()
    }

    /// Registers the blocks that `tokens` (the sequence's tokens, of which the first `len` are in the cache) have
    /// filled since the last call.
    pub fn register_full(&mut self, pool: &mut KvPool, tokens: &[u32]) {
        while self.hashed < self.len / BLOCK_SIZE {
            let key =
                BlockKey::new(&pool.keys_hasher, self.last_hash, &tokens[self.hashed * BLOCK_SIZE..][..BLOCK_SIZE]);
            self.last_hash = key.hash;
            pool.register(self.blocks[self.hashed], key);
            self.hashed += 1;
        }
    }

    /// Gives every block back to the pool and empties the cache. Registered blocks stay cached, the last of a
    /// sequence evicted first (a prefix is only found from its start). A partly filled last block stays too, as
    /// a tail holding the first `len` of `tokens` past the whole blocks (`tokens` are the sequence's tokens).
    pub fn release(&mut self, pool: &mut KvPool, tokens: &[u32]) {
        let whole = self.len / BLOCK_SIZE;
        let tail =
            pool.caching && !self.len.is_multiple_of(BLOCK_SIZE) && self.hashed == whole && self.blocks.len() > whole;
        for (i, block) in self.blocks.drain(..).enumerate().rev() {
            if tail && i == whole {
                pool.keep_tail(block, self.last_hash, &tokens[whole * BLOCK_SIZE..self.len]);
            } else {
                pool.put(block);
            }
        }
        *self = Self::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> ModelConfig {
        ModelConfig {
            n_layer: 2,
            n_embd: 64,
            n_head: 2,
            n_kv_head: 1,
            head_dim: 32,
            n_ff: 64,
            rms_eps: 1e-5,
            rope_base: 10_000.0,
            rope_scale: 1.0,
            vocab: 100,
        }
    }

    #[test]
    fn keys_are_stored_by_dimension_and_keys_and_values_beyond_f16_saturate() {
        let c = config();
        let mut pool = KvPool::new(&c, 2, false);
        let keys: Vec<f32> = (0..c.kv_dim()).map(|i| i as f32).collect();
        let mut values = vec![0.5f32; c.kv_dim()];
        (values[0], values[1]) = (1e6, -1e6);
        pool.write(1, 3, 1, &keys, &values);
        let (k, v) = (pool.block(1, 1, false), pool.block(1, 1, true));
        for (i, &key) in keys.iter().enumerate() {
            assert_eq!(k[i * BLOCK_SIZE + 3].to_f32(), key, "key dimension {i} of position 3");
        }
        assert_eq!((v[3 * c.kv_dim()], v[3 * c.kv_dim() + 1]), (f16::MAX, f16::MIN));
        assert_eq!(v[3 * c.kv_dim() + 2].to_f32(), 0.5);
        let mut keys = keys;
        (keys[0], keys[1]) = (1e6, -1e6);
        pool.write(1, 4, 1, &keys, &values);
        let k = pool.block(1, 1, false);
        assert_eq!((k[4], k[BLOCK_SIZE + 4]), (f16::MAX, f16::MIN), "keys saturate too");
    }

    /// A sequence that "computes" its tokens: blocks reserved, positions counted, full blocks registered.
    fn fill(pool: &mut KvPool, tokens: &[u32]) -> Option<KvCache> {
        let mut cache = KvCache::new();
        cache.reuse_prefix(pool, tokens);
        if !cache.reserve(pool, tokens.len() - cache.len()) {
            cache.release(pool, tokens);
            return None;
        }
        cache.len = tokens.len();
        cache.register_full(pool, tokens);
        Some(cache)
    }

    #[test]
    fn a_finished_sequences_blocks_are_reused_by_the_next_with_the_same_prefix() {
        let mut pool = KvPool::new(&config(), 8, true);
        let prompt: Vec<u32> = (0..40).collect();
        let mut first = fill(&mut pool, &prompt).unwrap();
        let held: Vec<u32> = first.blocks.clone();
        first.release(&mut pool, &prompt);
        assert_eq!(pool.free_blocks(), 8);
        assert_eq!(pool.cached_blocks(), 3, "two whole blocks stay cached, and the partly filled third as a tail");

        // The same 32 tokens then something else: both whole blocks are reused.
        let mut next: Vec<u32> = (0..32).collect();
        next.extend([99, 98, 97]);
        let mut cache = KvCache::new();
        assert_eq!(cache.reuse_prefix(&mut pool, &next), 32, "the tail holds 32..40, not 99");
        assert_eq!(cache.blocks, held[..2]);
        // The conversation's next turn continues the tail: its 8 positions are reused too, in the same block.
        let mut turn = KvCache::new();
        let longer: Vec<u32> = (0..45).collect();
        assert_eq!(turn.reuse_prefix(&mut pool, &longer), 40);
        assert_eq!(turn.blocks, held);
        assert_eq!(pool.cached_blocks(), 0, "the tail is the new sequence's own now");
        // A tail that matches only in part gives its matching positions.
        turn.len = 45;
        turn.register_full(&mut pool, &longer);
        turn.release(&mut pool, &longer);
        let mut part = KvCache::new();
        let diverging: Vec<u32> = (0..35).chain([77, 78]).collect();
        assert_eq!(part.reuse_prefix(&mut pool, &diverging), 35);
        // A different first token shares nothing, though later blocks hold equal tokens.
        let mut other = KvCache::new();
        let shifted: Vec<u32> = std::iter::once(7).chain(1..40).collect();
        assert_eq!(other.reuse_prefix(&mut pool, &shifted), 0);
        // At least the last token is left to compute.
        let mut exact = KvCache::new();
        let exactly_two: Vec<u32> = (0..32).collect();
        assert_eq!(exact.reuse_prefix(&mut pool, &exactly_two), 16);
    }

    #[test]
    fn eviction_takes_the_least_recently_used_and_never_a_block_in_use() {
        let mut pool = KvPool::new(&config(), 4, true);
        let a: Vec<u32> = (0..33).collect();
        let b: Vec<u32> = (100..133).collect();
        let mut first = fill(&mut pool, &a).unwrap();
        first.release(&mut pool, &a);
        // `a`'s two whole blocks are cached (and its last token's block as a tail); a sequence on the same prefix takes them while `b` needs three.
        let mut reader = KvCache::new();
        assert_eq!(reader.reuse_prefix(&mut pool, &a), 32);
        assert!(fill(&mut pool, &b).is_none(), "two blocks are free; the two in use cannot be evicted");
        assert_eq!(pool.counters().evictions, 0);
        assert_eq!(reader.blocks(), 2);
        reader.release(&mut pool, &a);
        // Now they are unused: `b` evicts them, the deepest first (the tail, then the second whole block).
        let second = fill(&mut pool, &b).unwrap();
        assert_eq!(pool.counters().evictions, 2, "two more blocks were needed than the free one");
        let mut again = KvCache::new();
        assert_eq!(again.reuse_prefix(&mut pool, &a), 16, "the first block of `a` outlived its second");
        again.release(&mut pool, &a);
        drop(second);
    }

    #[test]
    fn without_caching_nothing_is_kept() {
        let mut pool = KvPool::new(&config(), 4, false);
        let tokens: Vec<u32> = (0..40).collect();
        fill(&mut pool, &tokens).unwrap().release(&mut pool, &tokens);
        assert_eq!(pool.cached_blocks(), 0);
        assert_eq!(KvCache::new().reuse_prefix(&mut pool, &tokens), 0);
    }

    #[test]
    fn f16_halves_the_bytes_of_a_position() {
        let c = config();
        // keys and values, every layer, two bytes each (four with f32).
        assert_eq!(KvPool::block_bytes(&c) / BLOCK_SIZE, c.n_layer * 2 * c.kv_dim() * 2);
    }
}
