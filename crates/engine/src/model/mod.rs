//! The decoder-only transformer forward pass over GGUF weights, for a batch of sequences at different positions:
//! every linear layer runs once over the rows of all sequences in the step, attention runs per sequence against
//! that sequence's own blocks of the paged KV cache.
//!
//! One forward pass serves every supported architecture (candle-transformers keeps a file per model; so do we):
//! [`llama`], [`qwen2`] and [`gemma3`] each read their sizes and tensors from the GGUF file and say which of the
//! shared building blocks here their layers use: biases on the projections, norms on the query and key heads,
//! norms after attention and the feed-forward, a sliding attention window, the rotary embedding's base and pair
//! layout, the activation, a scaled embedding.

use std::{
    fs::File,
    io::{Read, Seek, SeekFrom},
    path::Path,
};

use candle_core::quantized::{GgmlDType, gguf_file::Content};
use rayon::prelude::*;

pub use crate::kv::{BLOCK_SIZE, KvCache, KvPool};
use crate::{
    Error, Result,
    kernels::{
        Format, Matrix, Quantized, WeightData, block_scores, block_values, gather_f32, gelu_mul, prefetch, silu_mul,
        softmax,
    },
};

pub mod device;
mod gemma3;
mod llama;
mod qwen2;

/// Query rows of one sequence attended together (see `Model::attention`): at least this many, and at most
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

/// The GGUF `general.architecture` values this engine runs.
pub const ARCHITECTURES: [&str; 3] = ["llama", "qwen2", "gemma3"];

/// Model sizes, from the GGUF `{architecture}.*` metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    pub n_ff: usize,
    pub rms_eps: f32,
    pub rope_base: f32,
    /// Linear RoPE scaling's factor (`{arch}.rope.scaling.factor`); 1 without scaling.
    pub rope_scale: f32,
    pub vocab: usize,
}

impl ModelConfig {
    /// The sizes of the model in a GGUF file, whatever its architecture.
    pub fn read(content: &Content) -> Result<Self> {
        let arch = content.metadata.get("general.architecture").and_then(|v| v.to_string().ok()).cloned();
        match arch.as_deref() {
            Some(arch) if ARCHITECTURES.contains(&arch) => Self::from_gguf(content, arch),
            other => Err(unsupported_architecture(other)),
        }
    }

    /// The sizes every architecture shares, under its own key prefix.
    fn from_gguf(content: &Content, arch: &str) -> Result<Self> {
        let md = &content.metadata;
        let get = |key: &str| {
            md.get(&format!("{arch}.{key}"))
                .and_then(|v| v.to_u32().ok())
                .map(|v| v as usize)
                .ok_or_else(|| Error::UnsupportedModel(format!("the GGUF metadata has no `{arch}.{key}`")))
        };
        let (n_embd, n_head) = (get("embedding_length")?, get("attention.head_count")?);
        let n_kv_head = get("attention.head_count_kv").unwrap_or(n_head);
        let head_dim = get("attention.key_length").unwrap_or(n_embd / n_head.max(1));
        if get("attention.value_length").unwrap_or(head_dim) != head_dim
            || get("rope.dimension_count").unwrap_or(head_dim) != head_dim
            || n_kv_head == 0
            || n_head % n_kv_head != 0
        {
            return Err(Error::UnsupportedModel(
                "partial rotary embeddings, values of another width than keys, or uneven head groups are not supported"
                    .into(),
            ));
        }
        let f =
            |key: &str, default: f32| md.get(&format!("{arch}.{key}")).and_then(|v| v.to_f32().ok()).unwrap_or(default);
        let vocab = content
            .tensor_infos
            .get("token_embd.weight")
            .map(|t| t.shape.dims()[0])
            .ok_or_else(|| Error::UnsupportedModel("the GGUF file has no tensor `token_embd.weight`".into()))?;
        let config = Self {
            n_layer: get("block_count")?,
            n_embd,
            n_head,
            n_kv_head,
            head_dim,
            n_ff: get("feed_forward_length")?,
            rms_eps: f("attention.layer_norm_rms_epsilon", 1e-5),
            rope_base: f("rope.freq_base", 10_000.0),
            rope_scale: 1.0,
            vocab,
        };
        let scaling = md.get(&format!("{arch}.rope.scaling.type")).and_then(|v| v.to_string().ok()).cloned();
        let config = match scaling.as_deref() {
            None | Some("none") => config,
            Some("linear") => Self { rope_scale: f("rope.scaling.factor", 1.0).max(1e-3), ..config },
            Some(other) => {
                return Err(Error::UnsupportedModel(format!(
                    "RoPE scaling `{other}` ({arch}.rope.scaling.type) is not supported; only linear scaling is"
                )));
            }
        };
        if [config.n_embd, config.n_ff, config.q_dim()].iter().any(|n| !n.is_multiple_of(32)) {
            return Err(Error::UnsupportedModel("embedding and feed-forward sizes must be multiples of 32".into()));
        }
        if head_dim % 2 != 0 {
            return Err(Error::UnsupportedModel(format!("heads of {head_dim} values cannot be rotated in pairs")));
        }
        Ok(config)
    }

    pub(crate) fn kv_dim(&self) -> usize {
        self.n_kv_head * self.head_dim
    }

    pub(crate) fn q_dim(&self) -> usize {
        self.n_head * self.head_dim
    }
}

/// Re-quantization at load (`model_provider.quantization`): for a user short of memory with an F32, F16 or Q8
/// model file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Quantization {
    /// Weights as the file stores them (F16, BF16 and F32 widened to f32).
    #[default]
    None,
    /// F32, F16, BF16 and Q8_0 matrices to Q4_K (Q4_0 where rows are not a multiple of 256): about 4.5 bits a
    /// weight.
    Bits4,
    /// F32, F16 and BF16 matrices to Q8_0: 8.5 bits a weight.
    Bits8,
}

/// How a tensor of `dtype` with `ndims` dimensions and rows of `cols` sits in memory: a block format the
/// kernels multiply, or f32 (`None`). Vectors (norms, biases) stay f32.
pub(crate) fn stored_format(dtype: GgmlDType, ndims: usize, cols: usize, quantization: Quantization) -> Option<Format> {
    let wide = matches!(dtype, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16);
    let target = match quantization {
        _ if ndims < 2 => None,
        Quantization::Bits4 if wide || dtype == GgmlDType::Q8_0 => {
            Some(if cols.is_multiple_of(crate::kernels::blocks::QK_K) { Format::Q4K } else { Format::Q4_0 })
        }
        Quantization::Bits8 if wide => Some(Format::Q8_0),
        _ => None,
    };
    target.or_else(|| Format::from_ggml(dtype)).filter(|f| cols.is_multiple_of(f.block_elems()))
}

/// The block format a tensor of `dtype` with `ndims` dimensions and rows of `cols` is re-quantized to at load, if
/// it is (vectors never are).
pub(crate) fn requantize_to(dtype: GgmlDType, ndims: usize, cols: usize, quantization: Quantization) -> Option<Format> {
    stored_format(dtype, ndims, cols, quantization).filter(|&target| Format::from_ggml(dtype) != Some(target))
}

/// Counts a step's new tokens into each sequence's cache; returns the step's row of the last token of each
/// sequence that asked for logits.
fn advance(steps: &mut [Step<'_>]) -> Vec<usize> {
    let (mut last, mut end) = (vec![], 0);
    for step in steps.iter_mut() {
        end += step.tokens.len();
        step.cache.len += step.tokens.len();
        if step.logits {
            last.push(end - 1);
        }
    }
    last
}

/// Why a matrix of `dtype` in rows of `cols` cannot be multiplied.
fn unsupported_type(dtype: GgmlDType, cols: usize) -> String {
    match Format::from_ggml(dtype) {
        Some(format) => format!(
            "is stored as {dtype:?} in rows of {cols}, which are not whole blocks of {} (the file is damaged)",
            format.block_elems()
        ),
        None => format!(
            "is stored as {dtype:?}, which this engine does not multiply (it runs F32, F16, BF16, Q4_0, Q4_1, \
             Q5_0, Q8_0, Q4_K, Q5_K and Q6_K)"
        ),
    }
}

/// Refuses a file with a matrix this engine cannot multiply, before anything is loaded or counted.
pub(crate) fn check_tensor_types(content: &Content, path: &Path) -> Result<()> {
    let mut infos: Vec<_> = content.tensor_infos.iter().collect();
    infos.sort_by_key(|(name, _)| name.as_str());
    for (name, info) in infos {
        let dims = info.shape.dims();
        let cols = *dims.last().unwrap_or(&1);
        let wide = matches!(info.ggml_dtype, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16);
        if !wide && stored_format(info.ggml_dtype, dims.len().max(2), cols, Quantization::None).is_none() {
            return Err(Error::ModelLoad {
                path: path.to_owned(),
                message: format!("tensor `{name}` {}", unsupported_type(info.ggml_dtype, cols)),
            });
        }
    }
    Ok(())
}

/// What a model's layers are made of: the fast CPU kernels' matrices ([`Host`]), or candle tensors on a device
/// ([`device::Tensors`]).
pub trait Parts {
    type Matrix: Send + Sync;
    type Vector: Send + Sync;
}

/// The fast CPU kernels' parts: matrices in the file's block formats laid out for this CPU, and f32 vectors.
pub struct Host;

impl Parts for Host {
    type Matrix = Matrix;
    type Vector = Vec<f32>;
}

type MatrixOf<S> = <<S as Store>::Parts as Parts>::Matrix;
type VectorOf<S> = <<S as Store>::Parts as Parts>::Vector;

/// Reads a model's tensors from a GGUF file into [`Parts`]. The architectures ([`llama`], [`qwen2`], [`gemma3`])
/// are written once against it, for the CPU kernels and the device path alike.
pub(crate) trait Store {
    type Parts: Parts;

    fn content(&self) -> &Content;

    fn has(&self, name: &str) -> bool {
        self.content().tensor_infos.contains_key(name)
    }

    /// `blk.{layer}.{name}.weight` as a matrix of `rows × cols`.
    fn layer_matrix(&mut self, layer: usize, name: &str, rows: usize, cols: usize) -> Result<MatrixOf<Self>>;

    /// `blk.{layer}.{name}`, a vector (a norm's weights, a bias) of `len` floats.
    fn layer_vector(&mut self, layer: usize, name: &str, len: usize) -> Result<VectorOf<Self>>;

    /// The final norm, `output_norm.weight`.
    fn output_norm(&mut self, len: usize) -> Result<VectorOf<Self>>;

    /// The output projection, or `None` when it is tied to the token embedding.
    fn output(&mut self, c: &ModelConfig) -> Result<Option<MatrixOf<Self>>>;

    /// The token embedding, whose rows are looked up on the host.
    fn embedding(&mut self, c: &ModelConfig) -> Result<Matrix>;

    /// The attention and feed-forward weights every architecture has, with the Llama layout's norms.
    fn block(&mut self, c: &ModelConfig, l: usize) -> Result<Block<Self::Parts>> {
        let (d, q, kv) = (c.n_embd, c.q_dim(), c.kv_dim());
        Ok(Block {
            attn_norm: self.layer_vector(l, "attn_norm.weight", d)?,
            attn: Attention {
                wq: self.layer_matrix(l, "attn_q", q, d)?,
                wk: self.layer_matrix(l, "attn_k", kv, d)?,
                wv: self.layer_matrix(l, "attn_v", kv, d)?,
                wo: self.layer_matrix(l, "attn_output", d, q)?,
                bias: None,
                qk_norm: None,
                rope: 0,
                window: None,
            },
            post_attn_norm: None,
            ffn_norm: self.layer_vector(l, "ffn_norm.weight", d)?,
            ffn: FeedForward {
                gate: self.layer_matrix(l, "ffn_gate", c.n_ff, d)?,
                up: self.layer_matrix(l, "ffn_up", c.n_ff, d)?,
                down: self.layer_matrix(l, "ffn_down", d, c.n_ff)?,
                activation: Activation::Silu,
            },
            post_ffn_norm: None,
        })
    }
}

/// Reads tensors from a GGUF file, each into memory in the file's block format (or re-quantized), laid out
/// for this CPU's kernels ([`Matrix::for_kernels`]).
pub(crate) struct Weights<'a> {
    content: &'a Content,
    file: &'a mut File,
    path: &'a Path,
    quantization: Quantization,
}

impl Weights<'_> {
    fn missing(&self, name: &str) -> Error {
        Error::ModelLoad { path: self.path.to_owned(), message: format!("the file has no tensor `{name}`") }
    }

    /// A weight matrix: block formats stay in their bytes (interleaved for the kernels where the CPU reads them
    /// so); F16, BF16 and F32 become floats.
    fn matrix(&mut self, name: &str) -> Result<Matrix> {
        let info = self.content.tensor_infos.get(name).ok_or_else(|| self.missing(name))?;
        let dims = info.shape.dims();
        let (rows, cols) = match dims {
            [n] => (1, *n),
            [r, c] => (*r, *c),
            _ => return Err(self.bad(name, &format!("has shape {dims:?}"))),
        };
        let (offset, dtype) = (self.content.tensor_data_offset + info.offset, info.ggml_dtype);
        let data = match Format::from_ggml(dtype) {
            Some(format) if cols % format.block_elems() == 0 => {
                WeightData::Quant(format, self.read(name, offset, rows * format.row_bytes(cols))?)
            }
            _ => match dtype {
                GgmlDType::F32 => WeightData::F32(
                    self.read(name, offset, rows * cols * 4)?
                        .chunks_exact(4)
                        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                        .collect(),
                ),
                GgmlDType::F16 | GgmlDType::BF16 => {
                    let bytes = self.read(name, offset, rows * cols * 2)?;
                    let half = |b: &[u8]| match dtype {
                        GgmlDType::F16 => half::f16::from_le_bytes([b[0], b[1]]).to_f32(),
                        _ => half::bf16::from_le_bytes([b[0], b[1]]).to_f32(),
                    };
                    WeightData::F32(bytes.chunks_exact(2).map(half).collect())
                }
                other => return Err(self.bad(name, &unsupported_type(other, cols))),
            },
        };
        let matrix = Matrix { rows, cols, data };
        let matrix = match requantize_to(dtype, dims.len(), cols, self.quantization) {
            Some(target) => requantize(&matrix, target)?,
            None => matrix,
        };
        Ok(matrix.for_kernels())
    }

    fn bad(&self, name: &str, what: &str) -> Error {
        Error::ModelLoad { path: self.path.to_owned(), message: format!("tensor `{name}` {what}") }
    }

    fn read(&mut self, name: &str, offset: u64, bytes: usize) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; bytes];
        self.file.seek(SeekFrom::Start(offset)).and_then(|_| self.file.read_exact(&mut buf)).map_err(|e| {
            self.bad(name, &format!("cannot be read ({e}): the file is cut short or damaged; download it again"))
        })?;
        Ok(buf)
    }

    /// A vector (a norm's weights, a bias) of `len` floats.
    fn vector(&mut self, name: &str, len: usize) -> Result<Vec<f32>> {
        let m = self.matrix(name)?;
        if m.rows * m.cols != len {
            return Err(self.bad(name, &format!("has {} values, expected {len}", m.rows * m.cols)));
        }
        let mut v = vec![0f32; m.cols];
        m.row(0, &mut v);
        Ok(v)
    }
}

impl Store for Weights<'_> {
    type Parts = Host;

    fn content(&self) -> &Content {
        self.content
    }

    fn layer_matrix(&mut self, layer: usize, name: &str, rows: usize, cols: usize) -> Result<Matrix> {
        let full = format!("blk.{layer}.{name}.weight");
        let m = self.matrix(&full)?;
        if (m.rows, m.cols) != (rows, cols) {
            return Err(self.bad(&full, &format!("is {}×{}, expected {rows}×{cols}", m.rows, m.cols)));
        }
        Ok(m)
    }

    fn layer_vector(&mut self, layer: usize, name: &str, len: usize) -> Result<Vec<f32>> {
        self.vector(&format!("blk.{layer}.{name}"), len)
    }

    fn output_norm(&mut self, len: usize) -> Result<Vec<f32>> {
        self.vector("output_norm.weight", len)
    }

    fn output(&mut self, c: &ModelConfig) -> Result<Option<Matrix>> {
        if !self.has("output.weight") {
            return Ok(None);
        }
        let m = self.matrix("output.weight")?;
        if (m.rows, m.cols) != (c.vocab, c.n_embd) {
            return Err(
                self.bad("output.weight", &format!("is {}×{}, expected {}×{}", m.rows, m.cols, c.vocab, c.n_embd))
            );
        }
        Ok(Some(m))
    }

    fn embedding(&mut self, c: &ModelConfig) -> Result<Matrix> {
        let m = self.matrix("token_embd.weight")?;
        if m.cols != c.n_embd {
            return Err(self.bad("token_embd.weight", &format!("has rows of {}, expected {}", m.cols, c.n_embd)));
        }
        Ok(m)
    }
}

/// How the rotary embedding pairs a head's values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RopeLayout {
    /// Adjacent pairs (2i, 2i + 1): llama.cpp's "normal" RoPE, which GGUF Llama weights (permuted at conversion)
    /// expect.
    Adjacent,
    /// Halves (i, i + head_dim / 2): GPT-NeoX's, and Qwen2's and Gemma 3's in GGUF.
    Halves,
}

/// A rotary embedding (Su et al., "RoFormer", 2021). The cos and sin of a step's positions are computed for the
/// step (a table for every position of a long context would take tens of megabytes; a step's angles cost far
/// less than its matrix products).
struct Rope {
    base: f32,
    layout: RopeLayout,
    /// Positions are multiplied by this (linear RoPE scaling: 1 / factor).
    position_scale: f32,
}

/// The cos and sin of each row of a step, `head_dim / 2` each per row.
struct Angles {
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl Rope {
    fn new(base: f32, layout: RopeLayout) -> Self {
        Self { base, layout, position_scale: 1.0 }
    }

    fn angles(&self, head_dim: usize, positions: &[usize]) -> Angles {
        let half = head_dim / 2;
        let frequencies: Vec<f32> = (0..half).map(|i| self.base.powf(-((2 * i) as f32) / head_dim as f32)).collect();
        let mut angles = Angles { cos: Vec::with_capacity(positions.len() * half), sin: vec![] };
        angles.sin.reserve(positions.len() * half);
        for &pos in positions {
            for &frequency in &frequencies {
                let angle = pos as f32 * self.position_scale * frequency;
                angles.cos.push(angle.cos());
                angles.sin.push(angle.sin());
            }
        }
        angles
    }

    /// Rotates the heads of step row `row`.
    fn rotate(&self, heads: &mut [f32], head_dim: usize, angles: &Angles, row: usize) {
        let half = head_dim / 2;
        let (cos, sin) = (&angles.cos[row * half..(row + 1) * half], &angles.sin[row * half..(row + 1) * half]);
        // Pair i is (step · i, step · i + apart).
        let (step, apart) = match self.layout {
            RopeLayout::Adjacent => (2, 1),
            RopeLayout::Halves => (1, half),
        };
        for head in heads.chunks_exact_mut(head_dim) {
            for i in 0..half {
                let (a, b) = (step * i, step * i + apart);
                let (x, y) = (head[a], head[b]);
                head[a] = x * cos[i] - y * sin[i];
                head[b] = x * sin[i] + y * cos[i];
            }
        }
    }
}

/// A layer's self-attention.
pub(crate) struct Attention<P: Parts> {
    wq: P::Matrix,
    wk: P::Matrix,
    wv: P::Matrix,
    wo: P::Matrix,
    /// Biases added to the query, key and value projections (Qwen2).
    bias: Option<[P::Vector; 3]>,
    /// RMS norms over each query and key head before the rotary embedding (Gemma 3).
    qk_norm: Option<[P::Vector; 2]>,
    /// Which of the model's rotary embeddings this layer uses.
    rope: usize,
    /// A sliding window: each position sees only this many positions, itself included (Gemma 3's local
    /// layers); `None` sees the whole context.
    window: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Activation {
    /// SwiGLU's `silu(gate) · up` (Llama, Qwen2).
    Silu,
    /// GeGLU's `gelu(gate) · up`, the tanh approximation (Gemma).
    GeluTanh,
}

pub(crate) struct FeedForward<P: Parts> {
    gate: P::Matrix,
    up: P::Matrix,
    down: P::Matrix,
    activation: Activation,
}

/// One transformer layer: `x += post_attn_norm(attn(attn_norm(x)))`, `x += post_ffn_norm(ffn(ffn_norm(x)))`,
/// the post-norms only where the architecture has them.
pub(crate) struct Block<P: Parts> {
    attn_norm: P::Vector,
    attn: Attention<P>,
    post_attn_norm: Option<P::Vector>,
    ffn_norm: P::Vector,
    ffn: FeedForward<P>,
    post_ffn_norm: Option<P::Vector>,
}

/// A loaded model: on the fast CPU kernels ([`Host`], the default), or the layers of the device path
/// ([`device::DeviceModel`]).
pub struct Model<P: Parts = Host> {
    pub config: ModelConfig,
    /// The token embedding, looked up on the host.
    embed: Matrix,
    /// The embedding is multiplied by this (Gemma: √n_embd).
    embed_scale: f32,
    /// Attention scores are `q · k` times this (1/√head_dim; Gemma 3 27B's differs).
    attn_scale: f32,
    layers: Vec<Block<P>>,
    norm: P::Vector,
    /// `None`: tied to the embedding, which is not copied.
    output: Option<P::Matrix>,
    ropes: Vec<Rope>,
    max_positions: usize,
}

/// One sequence's part of a step: new tokens (a prompt chunk, or one decode token) and its cache.
pub struct Step<'a> {
    pub tokens: &'a [u32],
    pub cache: &'a mut KvCache,
    /// Whether to compute logits for the last token (false for a prompt chunk that is not the last).
    pub logits: bool,
}

impl<P: Parts> Model<P> {
    /// The architecture `general.architecture` names, read through `store`.
    fn read<S: Store<Parts = P>>(store: &mut S, max_positions: usize) -> Result<Self> {
        let content = store.content();
        let arch = content.metadata.get("general.architecture").and_then(|v| v.to_string().ok()).cloned();
        let mut model = match arch.as_deref() {
            Some("llama") => llama::load(store)?,
            Some("qwen2") => qwen2::load(store)?,
            Some("gemma3") => gemma3::load(store)?,
            other => return Err(unsupported_architecture(other)),
        };
        model.set_max_positions(max_positions);
        Ok(model)
    }

    /// The longest context a sequence may reach.
    pub fn set_max_positions(&mut self, positions: usize) {
        self.max_positions = positions;
    }

    /// Row `r` of the step belongs to step `owner[r]` at position `pos[r]`; refuses steps past the context window,
    /// without blocks for their tokens, or with tokens outside the vocabulary.
    fn rows(&self, steps: &[Step<'_>]) -> Result<(Vec<usize>, Vec<usize>)> {
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
            if let Some(token) = step.tokens.iter().find(|&&t| t as usize >= self.config.vocab) {
                return Err(Error::InvalidRequest(format!("token id {token} is outside the vocabulary")));
            }
            for i in 0..step.tokens.len() {
                owner.push(s);
                pos.push(step.cache.len + i);
            }
        }
        Ok((owner, pos))
    }

    /// The embedding of every new token of the steps, one row of `n_embd` each, scaled where the model scales it.
    fn embed(&self, steps: &[Step<'_>]) -> Vec<f32> {
        let d = self.config.n_embd;
        let rows: usize = steps.iter().map(|s| s.tokens.len()).sum();
        let mut x = vec![0f32; rows * d];
        for (row, token) in x.chunks_exact_mut(d).zip(steps.iter().flat_map(|s| s.tokens.iter())) {
            self.embed.row(*token as usize, row);
            if self.embed_scale != 1.0 {
                row.iter_mut().for_each(|v| *v *= self.embed_scale);
            }
        }
        x
    }
}

impl Model {
    /// Loads the architecture `general.architecture` names onto the fast CPU kernels, for contexts of up to
    /// `max_positions` tokens.
    pub fn load(
        content: &Content,
        file: &mut File,
        path: &Path,
        max_positions: usize,
        quantization: Quantization,
    ) -> Result<Self> {
        Self::read(&mut Weights { content, file, path, quantization }, max_positions)
    }

    /// Bytes the weights take in memory.
    pub fn weight_bytes(&self) -> usize {
        let block = |b: &Block<Host>| {
            let a = &b.attn;
            [&a.wq, &a.wk, &a.wv, &a.wo, &b.ffn.gate, &b.ffn.up, &b.ffn.down].iter().map(|m| m.bytes()).sum::<usize>()
        };
        self.embed.bytes()
            + self.output.as_ref().map_or(0, Matrix::bytes)
            + self.layers.iter().map(block).sum::<usize>()
    }

    /// Runs one step over every sequence's new tokens; returns the last-token logits of each step that asked.
    ///
    /// Each step's cache must hold blocks for its new tokens already (`KvCache::reserve`).
    pub fn forward(&self, pool: &mut KvPool, steps: &mut [Step<'_>]) -> Result<Vec<Vec<f32>>> {
        let c = &self.config;
        let (d, q_dim, kv_dim, hd) = (c.n_embd, c.q_dim(), c.kv_dim(), c.head_dim);
        let (owner, pos) = self.rows(steps)?;
        let rows = owner.len();
        let mut x = self.embed(steps);
        let (mut q, mut k, mut v) = (vec![0f32; rows * q_dim], vec![0f32; rows * kv_dim], vec![0f32; rows * kv_dim]);
        let mut attn = vec![0f32; rows * q_dim];
        let mut proj = vec![0f32; rows * d];
        let angles: Vec<Angles> = self.ropes.iter().map(|rope| rope.angles(hd, &pos)).collect();
        let (mut gate, mut up) = (vec![0f32; rows * c.n_ff], vec![0f32; rows * c.n_ff]);
        for (l, layer) in self.layers.iter().enumerate() {
            let a = &layer.attn;
            let h = rms_norm(&x, &layer.attn_norm, c.rms_eps);
            let hq = Quantized::new(&h, rows, d);
            Matrix::matmul_all(&hq, &mut [(&a.wq, &mut q), (&a.wk, &mut k), (&a.wv, &mut v)]);
            if let Some([bq, bk, bv]) = &a.bias {
                add_rows(&mut q, bq);
                add_rows(&mut k, bk);
                add_rows(&mut v, bv);
            }
            if let Some([q_norm, k_norm]) = &a.qk_norm {
                q = rms_norm(&q, q_norm, c.rms_eps);
                k = rms_norm(&k, k_norm, c.rms_eps);
            }
            let (rope, angles) = (&self.ropes[a.rope], &angles[a.rope]);
            for r in 0..rows {
                rope.rotate(&mut q[r * q_dim..(r + 1) * q_dim], hd, angles, r);
                rope.rotate(&mut k[r * kv_dim..(r + 1) * kv_dim], hd, angles, r);
            }
            // Write this step's keys and values into the pool, then attend: rows of a prompt chunk see earlier
            // rows.
            for (r, (kr, vr)) in k.chunks_exact(kv_dim).zip(v.chunks_exact(kv_dim)).enumerate() {
                let table = &steps[owner[r]].cache.blocks;
                pool.write(table[pos[r] / BLOCK_SIZE], pos[r] % BLOCK_SIZE, l, kr, vr);
            }
            self.attention(pool, l, a.window, steps, &owner, &pos, &q, &mut attn);
            a.wo.matmul(&Quantized::new(&attn, rows, q_dim), &mut proj);
            residual(&mut x, &mut proj, layer.post_attn_norm.as_deref(), c.rms_eps);

            let f = &layer.ffn;
            let h = rms_norm(&x, &layer.ffn_norm, c.rms_eps);
            let hq = Quantized::new(&h, rows, d);
            Matrix::matmul_all(&hq, &mut [(&f.gate, &mut gate), (&f.up, &mut up)]);
            match f.activation {
                Activation::Silu => silu_mul(&mut gate, &up),
                Activation::GeluTanh => gelu_mul(&mut gate, &up),
            }
            f.down.matmul(&Quantized::new(&gate, rows, c.n_ff), &mut proj);
            residual(&mut x, &mut proj, layer.post_ffn_norm.as_deref(), c.rms_eps);
        }
        let last_rows: Vec<f32> =
            advance(steps).into_iter().flat_map(|r| x[r * d..(r + 1) * d].iter().copied()).collect();
        let n = last_rows.len() / d;
        if n == 0 {
            return Ok(vec![]);
        }
        let h = rms_norm(&last_rows, &self.norm, c.rms_eps);
        let mut logits = vec![0f32; n * c.vocab];
        self.output.as_ref().unwrap_or(&self.embed).matmul(&Quantized::new(&h, n, d), &mut logits);
        Ok(logits.chunks_exact(c.vocab).map(<[f32]>::to_vec).collect())
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
        window: Option<usize>,
        steps: &[Step<'_>],
        owner: &[usize],
        pos: &[usize],
        q: &[f32],
        out: &mut [f32],
    ) {
        let c = &self.config;
        let (d, hd, group) = (c.q_dim(), c.head_dim, c.n_head / c.n_kv_head);
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
            .map(|(rows, g)| {
                self.attend(pool, layer, window, &steps[owner[rows.start]].cache.blocks, q, rows.clone(), pos, *g)
            })
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
        window: Option<usize>,
        table: &[u32],
        q: &[f32],
        rows: std::ops::Range<usize>,
        pos: &[usize],
        g: usize,
    ) -> Vec<f32> {
        let c = &self.config;
        let (d, hd, kv_dim, group) = (c.q_dim(), c.head_dim, c.kv_dim(), c.n_head / c.n_kv_head);
        let kv = g * hd;
        // Query `i * group + k` is row `rows.start + i`, head `g * group + k`, scaled; it sees the positions
        // before `visible[i]` from `first[i]` on (all of them, or the last `window`), and its scores are a row of
        // `stride`.
        let visible: Vec<usize> = rows.clone().map(|r| pos[r] + 1).collect();
        let first: Vec<usize> = visible.iter().map(|v| window.map_or(0, |w| v.saturating_sub(w))).collect();
        let most = visible.iter().copied().max().unwrap_or(0);
        // Blocks wholly before every row's window are skipped.
        let skip = first.iter().copied().min().unwrap_or(0) / BLOCK_SIZE;
        let (queries, stride) = (visible.len() * group, most.next_multiple_of(BLOCK_SIZE));
        let scale = self.attn_scale;
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
            let blocks = || table.iter().take(most.div_ceil(BLOCK_SIZE)).enumerate().skip(skip);
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
            // Softmax over the positions each query sees; those it does not see (in the blocks read) get weight 0.
            for n in 0..queries {
                let (row, unseen) = scores[n * stride..][..stride].split_at_mut(visible[n / group]);
                let (before, row) = row.split_at_mut(first[n / group]);
                softmax(row);
                before[skip * BLOCK_SIZE..].fill(0.0);
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

/// `matrix` in `target`, a few thousand rows at a time (candle's quantizers, on rows read back as floats). The
/// source matrix is whole in memory meanwhile (f32 for an F16 file): the memory check counts it.
fn requantize(matrix: &Matrix, target: Format) -> Result<Matrix> {
    let (rows, cols) = (matrix.rows, matrix.cols);
    let chunk = (1 << 22) / cols.max(1);
    let mut bytes = Vec::with_capacity(rows * target.row_bytes(cols));
    let mut floats = vec![0f32; chunk.max(1) * cols];
    for first in (0..rows).step_by(chunk.max(1)) {
        let n = chunk.max(1).min(rows - first);
        for (i, row) in floats[..n * cols].chunks_exact_mut(cols).enumerate() {
            matrix.row(first + i, row);
        }
        let WeightData::Quant(_, chunk) = Matrix::quantize(target, &floats[..n * cols], n, cols)?.data else {
            unreachable!("quantize gives blocks")
        };
        bytes.extend_from_slice(&chunk);
    }
    Ok(Matrix { rows, cols, data: WeightData::Quant(target, bytes) })
}

/// An unsupported `general.architecture`, with what is supported.
pub(crate) fn unsupported_architecture(arch: Option<&str>) -> Error {
    Error::UnsupportedModel(format!(
        "architecture `{}` is not supported; this engine runs {} GGUF models",
        arch.unwrap_or("(none: the file has no general.architecture)"),
        ARCHITECTURES.join(", ")
    ))
}

/// RMS norm of each row of `weight.len()` values (a token's embedding, or one attention head).
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

/// `x += y`, with `y` normed first where the layer has a post-norm.
fn residual(x: &mut [f32], y: &mut Vec<f32>, norm: Option<&[f32]>, eps: f32) {
    if let Some(weight) = norm {
        *y = rms_norm(y, weight, eps);
    }
    for (a, b) in x.iter_mut().zip(y.iter()) {
        *a += b;
    }
}

/// Adds `bias` to every row.
fn add_rows(x: &mut [f32], bias: &[f32]) {
    for row in x.chunks_exact_mut(bias.len()) {
        for (a, b) in row.iter_mut().zip(bias) {
            *a += b;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sliding_window_sees_exactly_its_last_positions() {
        let hd = 32;
        let config = ModelConfig {
            n_layer: 1,
            n_embd: hd,
            n_head: 1,
            n_kv_head: 1,
            head_dim: hd,
            n_ff: hd,
            rms_eps: 1e-6,
            rope_base: 10_000.0,
            rope_scale: 1.0,
            vocab: 1,
        };
        // Only what `attend` reads.
        let model = Model {
            config: config.clone(),
            embed: Matrix { rows: 1, cols: hd, data: WeightData::F32(vec![0.0; hd]) },
            embed_scale: 1.0,
            attn_scale: 1.0,
            layers: vec![],
            norm: vec![],
            output: None,
            ropes: vec![],
            max_positions: 64,
        };
        let (mut pool, mut cache, n) = (KvPool::new(&config, 8, false), KvCache::new(), 50);
        assert!(cache.reserve(&mut pool, n));
        // Zero keys give every visible position the same weight; position p's values are all p, so a query's
        // output is the mean of the positions it sees.
        for p in 0..n {
            pool.write(cache.blocks[p / BLOCK_SIZE], p % BLOCK_SIZE, 0, &vec![0.0; hd], &vec![p as f32; hd]);
        }
        let (pos, q): (Vec<usize>, Vec<f32>) = ((0..n).collect(), vec![0.0; n * hd]);
        for window in [None, Some(1), Some(7), Some(16), Some(20), Some(49)] {
            // One task's rows: all of them, a run across a block edge, the last one.
            for rows in [0..n, 14..19, 30..34, n - 1..n] {
                let out = model.attend(&pool, 0, window, &cache.blocks, &q, rows.clone(), &pos, 0);
                for (i, r) in rows.enumerate() {
                    let first = window.map_or(0, |w| (r + 1).saturating_sub(w));
                    let want = (first..=r).sum::<usize>() as f32 / (r + 1 - first) as f32;
                    for v in &out[i * hd..(i + 1) * hd] {
                        assert!((v - want).abs() <= 1e-4 * want.max(1.0), "window {window:?} row {r}: {v} vs {want}");
                    }
                }
            }
        }
    }
}
