//! The Llama-family forward pass (Touvron et al., "LLaMA", 2023; reference implementations: llama.cpp's
//! `llm_build_llama`, candle-transformers' `quantized_llama`) over GGUF weights, for a batch of sequences at
//! different positions: every linear layer runs once over the rows of all sequences in the step, attention runs
//! per sequence against that sequence's own KV cache.

use std::{
    fs::File,
    io::{Read, Seek, SeekFrom},
};

use candle_core::quantized::{GgmlDType, gguf_file::Content};
use rayon::prelude::*;

pub use crate::kv::{BLOCK_SIZE, KvCache, KvPool};
use crate::{
    Error, Result,
    kernels::{Matrix, Quantized, WeightData, block_scores, block_values, gather_f32, prefetch, silu_mul, softmax},
};

/// Query rows of one sequence attended together (see `Llama::attention`): at least this many, and at most
/// `ATTN_ROWS_MAX`, so that a prompt chunk still makes about two tasks per thread.
const ATTN_ROWS: usize = 4;
const ATTN_ROWS_MAX: usize = 32;

/// The most attention scores (floats) a thread keeps between tasks: 4 MiB.
const KEPT_SCORES: usize = 1 << 20;

thread_local! {
    /// Each thread's attention scores, kept from task to task up to `KEPT_SCORES`: a task's scores (its queries
    /// times the context) take hundreds of KB to MBs, which a fresh allocation would map and zero page by page in
    /// every task of every layer.
    static SCORES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Model sizes, mirrored from the GGUF `llama.*` metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    pub n_ff: usize,
    pub rms_eps: f32,
    pub rope_base: f32,
    pub vocab: usize,
}

impl LlamaConfig {
    fn from_gguf(content: &Content) -> Result<Self> {
        let md = &content.metadata;
        let get = |key: &str| {
            md.get(key)
                .and_then(|v| v.to_u32().ok())
                .map(|v| v as usize)
                .ok_or_else(|| Error::UnsupportedModel(format!("the GGUF metadata has no `{key}`")))
        };
        let (n_embd, n_head) = (get("llama.embedding_length")?, get("llama.attention.head_count")?);
        let n_kv_head = get("llama.attention.head_count_kv").unwrap_or(n_head);
        let head_dim = n_embd / n_head;
        if get("llama.rope.dimension_count").unwrap_or(head_dim) != head_dim || n_head % n_kv_head != 0 {
            return Err(Error::UnsupportedModel(
                "partial rotary embeddings or uneven head groups are not supported".into(),
            ));
        }
        let f = |key: &str, default: f32| md.get(key).and_then(|v| v.to_f32().ok()).unwrap_or(default);
        let vocab = content
            .tensor_infos
            .get("token_embd.weight")
            .map(|t| t.shape.dims()[0])
            .ok_or_else(|| Error::UnsupportedModel("the GGUF file has no token_embd.weight".into()))?;
        Ok(Self {
            n_layer: get("llama.block_count")?,
            n_embd,
            n_head,
            n_kv_head,
            head_dim,
            n_ff: get("llama.feed_forward_length")?,
            rms_eps: f("llama.attention.layer_norm_rms_epsilon", 1e-5),
            rope_base: f("llama.rope.freq_base", 10_000.0),
            vocab,
        })
    }

    pub(crate) fn kv_dim(&self) -> usize {
        self.n_kv_head * self.head_dim
    }
}

struct Layer {
    attn_norm: Vec<f32>,
    wq: Matrix,
    wk: Matrix,
    wv: Matrix,
    wo: Matrix,
    ffn_norm: Vec<f32>,
    w_gate: Matrix,
    w_up: Matrix,
    w_down: Matrix,
}

pub struct Llama {
    pub config: LlamaConfig,
    embed: Matrix,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    output: Matrix,
    /// cos and sin of every position × frequency, `max_positions × head_dim / 2`.
    rope: (Vec<f32>, Vec<f32>),
    max_positions: usize,
}

/// One sequence's part of a step: new tokens (a prompt chunk, or one decode token) and its cache.
pub struct Step<'a> {
    pub tokens: &'a [u32],
    pub cache: &'a mut KvCache,
    /// Whether to compute logits for the last token (false for a prompt chunk that is not the last).
    pub logits: bool,
}

fn load_matrix(content: &Content, file: &mut File, name: &str) -> Result<Matrix> {
    let info = content
        .tensor_infos
        .get(name)
        .ok_or_else(|| Error::UnsupportedModel(format!("the GGUF file has no tensor `{name}`")))?;
    let dims = info.shape.dims();
    let (rows, cols) = match dims {
        [n] => (1, *n),
        [r, c] => (*r, *c),
        _ => return Err(Error::UnsupportedModel(format!("tensor `{name}` has shape {dims:?}"))),
    };
    let elems = rows * cols;
    let raw = |file: &mut File, bytes: usize| -> Result<Vec<u8>> {
        let mut buf = vec![0u8; bytes];
        file.seek(SeekFrom::Start(content.tensor_data_offset + info.offset))
            .and_then(|_| file.read_exact(&mut buf))
            .map_err(|e| Error::UnsupportedModel(format!("cannot read tensor `{name}`: {e}")))?;
        Ok(buf)
    };
    let data = match info.ggml_dtype {
        GgmlDType::Q4_1 => WeightData::Q4_1(raw(file, elems / 32 * 20)?),
        GgmlDType::Q8_0 => WeightData::Q8_0(raw(file, elems / 32 * 34)?),
        GgmlDType::F32 => WeightData::F32(
            raw(file, elems * 4)?.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        ),
        // Everything else (F16, Q4_0, K-quants, …) is dequantized once at load time by candle.
        _ => {
            let tensor = content.tensor(file, name, &candle_core::Device::Cpu)?;
            WeightData::F32(tensor.dequantize(&candle_core::Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?)
        }
    };
    Ok(Matrix { rows, cols, data })
}

fn load_vector(content: &Content, file: &mut File, name: &str) -> Result<Vec<f32>> {
    let m = load_matrix(content, file, name)?;
    let mut v = vec![0f32; m.cols];
    m.row(0, &mut v);
    Ok(v)
}

impl Llama {
    pub fn load(content: &Content, file: &mut File, max_positions: usize) -> Result<Self> {
        let config = LlamaConfig::from_gguf(content)?;
        if config.n_embd % 32 != 0 || config.n_ff % 32 != 0 {
            return Err(Error::UnsupportedModel("embedding and feed-forward sizes must be multiples of 32".into()));
        }
        let embed = load_matrix(content, file, "token_embd.weight")?;
        let output = if content.tensor_infos.contains_key("output.weight") {
            load_matrix(content, file, "output.weight")?
        } else {
            embed.clone()
        };
        let layers = (0..config.n_layer)
            .map(|i| {
                let mut m = |name: &str| load_matrix(content, file, &format!("blk.{i}.{name}.weight"));
                Ok(Layer {
                    wq: m("attn_q")?,
                    wk: m("attn_k")?,
                    wv: m("attn_v")?,
                    wo: m("attn_output")?,
                    w_gate: m("ffn_gate")?,
                    w_up: m("ffn_up")?,
                    w_down: m("ffn_down")?,
                    attn_norm: load_vector(content, file, &format!("blk.{i}.attn_norm.weight"))?,
                    ffn_norm: load_vector(content, file, &format!("blk.{i}.ffn_norm.weight"))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let norm = load_vector(content, file, "output_norm.weight")?;
        let half = config.head_dim / 2;
        let (mut cos, mut sin) = (Vec::with_capacity(max_positions * half), Vec::with_capacity(max_positions * half));
        for pos in 0..max_positions {
            for i in 0..half {
                let angle = pos as f32 * config.rope_base.powf(-((2 * i) as f32) / config.head_dim as f32);
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        Ok(Self { config, embed, layers, norm, output, rope: (cos, sin), max_positions })
    }

    /// Runs one step over every sequence's new tokens; returns the last-token logits of each step that asked.
    ///
    /// Each step's cache must hold blocks for its new tokens already (`KvCache::reserve`).
    pub fn forward(&self, pool: &mut KvPool, steps: &mut [Step<'_>]) -> Result<Vec<Vec<f32>>> {
        let c = &self.config;
        let (d, kv_dim) = (c.n_embd, c.kv_dim());
        // Row r of the step belongs to sequence `owner[r]` at position `pos[r]`.
        let (mut owner, mut pos) = (vec![], vec![]);
        for (s, step) in steps.iter().enumerate() {
            if step.cache.len + step.tokens.len() > self.max_positions {
                return Err(Error::PromptTooLong {
                    prompt_tokens: step.cache.len + step.tokens.len(),
                    context_length: self.max_positions,
                });
            }
            if step.cache.blocks.len() * BLOCK_SIZE < step.cache.len + step.tokens.len() {
                return Err(Error::Internal("a sequence was scheduled without KV-cache blocks for its tokens".into()));
            }
            for i in 0..step.tokens.len() {
                owner.push(s);
                pos.push(step.cache.len + i);
            }
        }
        let rows = owner.len();
        let mut x = vec![0f32; rows * d];
        for (row, token) in x.chunks_exact_mut(d).zip(steps.iter().flat_map(|s| s.tokens.iter())) {
            if *token as usize >= c.vocab {
                return Err(Error::InvalidRequest(format!("token id {token} is outside the vocabulary")));
            }
            self.embed.row(*token as usize, row);
        }
        let (mut q, mut k, mut v) = (vec![0f32; rows * d], vec![0f32; rows * kv_dim], vec![0f32; rows * kv_dim]);
        let mut attn = vec![0f32; rows * d];
        let mut proj = vec![0f32; rows * d];
        let (mut gate, mut up) = (vec![0f32; rows * c.n_ff], vec![0f32; rows * c.n_ff]);
        for (l, layer) in self.layers.iter().enumerate() {
            let h = rms_norm(&x, &layer.attn_norm, c.rms_eps);
            let hq = Quantized::new(&h, rows, d);
            Matrix::matmul_all(&hq, &mut [(&layer.wq, &mut q), (&layer.wk, &mut k), (&layer.wv, &mut v)]);
            for r in 0..rows {
                self.rotate(&mut q[r * d..(r + 1) * d], pos[r]);
                self.rotate(&mut k[r * kv_dim..(r + 1) * kv_dim], pos[r]);
            }
            // Write this step's keys and values into the pool, then attend: rows of a prompt chunk see earlier
            // rows. Every (row, head) pair is one parallel task.
            for (r, (kr, vr)) in k.chunks_exact(kv_dim).zip(v.chunks_exact(kv_dim)).enumerate() {
                let table = &steps[owner[r]].cache.blocks;
                pool.write(table[pos[r] / BLOCK_SIZE], pos[r] % BLOCK_SIZE, l, kr, vr);
            }
            self.attention(pool, l, steps, &owner, &pos, &q, &mut attn);
            layer.wo.matmul(&Quantized::new(&attn, rows, d), &mut proj);
            add(&mut x, &proj);

            let h = rms_norm(&x, &layer.ffn_norm, c.rms_eps);
            let hq = Quantized::new(&h, rows, d);
            Matrix::matmul_all(&hq, &mut [(&layer.w_gate, &mut gate), (&layer.w_up, &mut up)]);
            silu_mul(&mut gate, &up);
            layer.w_down.matmul(&Quantized::new(&gate, rows, c.n_ff), &mut proj);
            add(&mut x, &proj);
        }
        let mut last_rows = vec![];
        let mut end = 0;
        for step in steps.iter_mut() {
            end += step.tokens.len();
            step.cache.len += step.tokens.len();
            if step.logits {
                last_rows.extend_from_slice(&x[(end - 1) * d..end * d]);
            }
        }
        let n = last_rows.len() / d;
        if n == 0 {
            return Ok(vec![]);
        }
        let h = rms_norm(&last_rows, &self.norm, c.rms_eps);
        let mut logits = vec![0f32; n * c.vocab];
        self.output.matmul(&Quantized::new(&h, n, d), &mut logits);
        Ok(logits.chunks_exact(c.vocab).map(<[f32]>::to_vec).collect())
    }

    /// Rotary position embedding, adjacent pairs (llama.cpp's "normal" RoPE, which GGUF Llama weights expect).
    fn rotate(&self, heads: &mut [f32], pos: usize) {
        let half = self.config.head_dim / 2;
        let (cos, sin) = (&self.rope.0[pos * half..(pos + 1) * half], &self.rope.1[pos * half..(pos + 1) * half]);
        for head in heads.chunks_exact_mut(self.config.head_dim) {
            for i in 0..half {
                let (a, b) = (head[2 * i], head[2 * i + 1]);
                head[2 * i] = a * cos[i] - b * sin[i];
                head[2 * i + 1] = a * sin[i] + b * cos[i];
            }
        }
    }

    /// Causal attention for every row of a step. Rows of one sequence go in runs (of `ATTN_ROWS` to
    /// `ATTN_ROWS_MAX`: fewer tasks read the cache fewer times, enough keep every thread busy), and each task
    /// takes a run and one key-value head: every cached block is converted from f16 once for all its rows and
    /// for every query head that shares the key-value head (grouped-query attention), instead of once per row and
    /// head. Each (row, head) is computed in the same order whatever else shares its task, so the result does not
    /// depend on how rows were batched.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        pool: &KvPool,
        layer: usize,
        steps: &[Step<'_>],
        owner: &[usize],
        pos: &[usize],
        q: &[f32],
        out: &mut [f32],
    ) {
        let c = &self.config;
        let (d, hd, group) = (c.n_embd, c.head_dim, c.n_head / c.n_kv_head);
        // Each sequence's rows in even runs of `ATTN_ROWS` to `ATTN_ROWS_MAX`, about two tasks per thread.
        let mut tasks = vec![];
        let (mut start, threads) = (0, rayon::current_num_threads());
        while start < owner.len() {
            let rows = owner[start..].iter().take_while(|&&o| o == owner[start]).count();
            let run = (rows * c.n_kv_head).div_ceil(2 * threads).clamp(ATTN_ROWS, ATTN_ROWS_MAX);
            let run = rows.div_ceil(rows.div_ceil(run));
            for first in (start..start + rows).step_by(run) {
                tasks.extend((0..c.n_kv_head).map(|g| (first..(first + run).min(start + rows), g)));
            }
            start += rows;
        }
        let results: Vec<Vec<f32>> = tasks
            .par_iter()
            .map(|(rows, g)| self.attend(pool, layer, &steps[owner[rows.start]].cache.blocks, q, rows.clone(), pos, *g))
            .collect();
        for ((rows, g), result) in tasks.iter().zip(&results) {
            for (i, r) in rows.clone().enumerate() {
                let heads = &mut out[r * d + g * group * hd..][..group * hd];
                heads.copy_from_slice(&result[i * group * hd..][..group * hd]);
            }
        }
    }

    /// Attention of `rows` (of one sequence, at positions `pos`) for the query heads of key-value head `g` over
    /// the sequence's blocks; returns row by row, head by head, `head_dim` values each.
    #[allow(clippy::too_many_arguments)]
    fn attend(
        &self,
        pool: &KvPool,
        layer: usize,
        table: &[u32],
        q: &[f32],
        rows: std::ops::Range<usize>,
        pos: &[usize],
        g: usize,
    ) -> Vec<f32> {
        let c = &self.config;
        let (d, hd, kv_dim, group) = (c.n_embd, c.head_dim, c.kv_dim(), c.n_head / c.n_kv_head);
        let kv = g * hd;
        // Query `i * group + k` is row `rows.start + i`, head `g * group + k`, scaled; it sees `visible[i]`
        // positions, and its scores are a row of `stride`.
        let visible: Vec<usize> = rows.clone().map(|r| pos[r] + 1).collect();
        let most = visible.iter().copied().max().unwrap_or(0);
        let (queries, stride) = (visible.len() * group, most.next_multiple_of(BLOCK_SIZE));
        let scale = 1.0 / (hd as f32).sqrt();
        let mut qs = Vec::with_capacity(queries * hd);
        for r in rows.clone() {
            qs.extend(q[r * d + g * group * hd..][..group * hd].iter().map(|x| x * scale));
        }
        SCORES.with_borrow_mut(|kept| {
            // A long prompt's scores are not kept past this task.
            let mut fresh = vec![];
            let scores = if queries * stride > KEPT_SCORES {
                fresh.resize(queries * stride, 0.0);
                &mut fresh[..]
            } else {
                if kept.len() < queries * stride {
                    kept.resize(queries * stride, 0.0);
                }
                &mut kept[..queries * stride]
            };
            // Every score a query reads is written first: `block_scores` fills whole blocks, the softmax zeroes
            // what a query does not see.
            let mut cached = vec![0f32; BLOCK_SIZE * hd];
            let blocks = || table.iter().take(most.div_ceil(BLOCK_SIZE)).enumerate();
            let ahead = |b: usize, value: bool| {
                if let Some(&next) = table.get(b + 1).filter(|_| (b + 1) * BLOCK_SIZE < most) {
                    let block = pool.block(next, layer, value);
                    match value {
                        false => prefetch(&block[kv * BLOCK_SIZE..], 0, hd * BLOCK_SIZE, 1),
                        true => prefetch(&block[kv..], kv_dim, hd, BLOCK_SIZE),
                    }
                }
            };
            for (b, &block) in blocks() {
                ahead(b, false);
                let keys = &pool.block(block, layer, false)[kv * BLOCK_SIZE..];
                gather_f32(keys, hd * BLOCK_SIZE, hd * BLOCK_SIZE, &mut cached);
                block_scores(&qs, hd, &cached, &mut scores[b * BLOCK_SIZE..], stride);
            }
            // Softmax over the positions each query sees; those it does not see get weight 0.
            for n in 0..queries {
                let (row, unseen) = scores[n * stride..][..stride].split_at_mut(visible[n / group]);
                softmax(row);
                unseen.fill(0.0);
            }
            let mut out = vec![0f32; queries * hd];
            for (b, &block) in blocks() {
                ahead(b, true);
                let n = (most - b * BLOCK_SIZE).min(BLOCK_SIZE);
                gather_f32(&pool.block(block, layer, true)[kv..], kv_dim, hd, &mut cached[..n * hd]);
                block_values(&mut out, hd, &scores[b * BLOCK_SIZE..], stride, n, &cached[..n * hd]);
            }
            out
        })
    }
}

fn rms_norm(x: &[f32], weight: &[f32], eps: f32) -> Vec<f32> {
    let d = weight.len();
    let mut out = vec![0f32; x.len()];
    for (row, o) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        let mean = row.iter().map(|v| v * v).sum::<f32>() / d as f32;
        let inv = 1.0 / (mean + eps).sqrt();
        for ((o, v), w) in o.iter_mut().zip(row).zip(weight) {
            *o = v * inv * w;
        }
    }
    out
}

fn add(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}
