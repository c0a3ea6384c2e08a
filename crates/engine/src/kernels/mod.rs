//! CPU kernels for the forward pass: matrix multiplication of GGUF-quantized weights (the block formats of
//! [`Format`], kept in the file's bytes, on x86 [`interleaved`] eight rows at a time; F32 for
//! everything else) by a batch of activation rows quantized to 8 bits, the way llama.cpp does it (ggml's
//! `vec_dot_q4_1_q8_1`). Each weight block is read once for every row of a step (tiled over rows), rows of the
//! weight matrix are spread over the machine's cores, and the SIMD path (AVX-512 VNNI, AVX2 + FMA, or NEON) is
//! chosen at run time with a portable fallback, so a plain release build is fast.
#![allow(unsafe_code)] // SIMD intrinsics, behind run-time feature detection.
#![allow(clippy::needless_range_loop)] // Kernels index several arrays by the same tile row.

use half::f16;
use rayon::prelude::*;

pub mod blocks;
pub mod interleaved;
pub use blocks::Format;

/// Elements per quantization block (all supported formats).
pub const QK: usize = 32;
const Q4_1_BYTES: usize = 20; // f16 d, f16 m, 16 bytes of nibbles
const Q8_0_BYTES: usize = 34; // f16 d, 32 i8

/// Fewest weight rows per parallel task; tasks are sized so each thread gets a few of them per matmul.
const MIN_ROWS_PER_TASK: usize = 16;
const TASKS_PER_THREAD: usize = 4;
/// The tanh GELU's constants, `2 · √(2/π)` and the cubic term's 0.044715, in both of its kernels' form `g · σ(2t)`.
const GELU_TWO_SQRT_2_OVER_PI: f32 = 2.0 * 0.797_884_6;
const GELU_CUBIC: f32 = 0.044_715;

/// Activation rows processed together against one loaded weight block.
const TILE: usize = 4;
/// Weight rows the generic kernel takes together for a step of at least `TILE` rows.
const WEIGHT_TILE: usize = 4;
/// Output rows a matmul's final transpose writes together.
const TRANSPOSE_ROWS: usize = 8;

/// How a weight matrix is stored.
#[derive(Debug, Clone)]
pub enum WeightData {
    /// Rows of ggml blocks, byte for byte as in the file. Q4_1 has a hand-tuned kernel, and Q8_0 one for steps
    /// of fewer than four rows; everything else goes through one generic kernel over [`blocks::Unit`]s.
    Quant(Format, Vec<u8>),
    /// The same blocks, eight rows interleaved ([`interleaved`]): what the x86 kernels read for a matrix of
    /// whole groups of eight rows.
    Interleaved(Format, Vec<u8>),
    /// Plain floats (and F16/BF16, widened at load time).
    F32(Vec<f32>),
}

/// A weight matrix of `rows` outputs by `cols` inputs, row-major as in GGUF.
#[derive(Debug, Clone)]
pub struct Matrix {
    pub rows: usize,
    pub cols: usize,
    pub data: WeightData,
}

/// Activation rows quantized to 8 bits per block of 32, with the block scale `d`, `s = d · Σq`, and the negated
/// sums of each four values (`-Σq₄ₖ..₄ₖ₊₄` in lane `k`, the lane a byte dot product sums them in): the VNNI
/// kernel reads signed weights as unsigned bytes `w + c` and starts each block's byte dot product from these
/// lanes times `c`, which takes `c · Σq` back out of every lane exactly, so each lane holds the same integer as
/// the sign trick's (and every level gives the same bits).
pub struct Quantized<'a> {
    pub rows: usize,
    pub cols: usize,
    d: Vec<f32>,
    s: Vec<f32>,
    lanes: Vec<[i32; 8]>,
    /// `-Σq` of each half of each block: the interleaved kernels' start, times `c`.
    halves: Vec<[i32; 2]>,
    q: Vec<i8>,
    /// The original floats, for F32 weights.
    f: &'a [f32],
}

impl<'a> Quantized<'a> {
    /// Quantizes `x`, `rows` rows of `cols` floats (`cols` a multiple of 32).
    pub fn new(x: &'a [f32], rows: usize, cols: usize) -> Self {
        assert_eq!(x.len(), rows * cols);
        assert_eq!(cols % QK, 0, "row length must be a multiple of {QK}");
        let blocks = rows * cols / QK;
        let (mut d, mut s, mut q) = (vec![0f32; blocks], vec![0f32; blocks], vec![0i8; rows * cols]);
        let mut lanes = vec![[0i32; 8]; blocks];
        // Many rows (a prompt) are quantized on every thread; one row (decoding) is not worth the hand-off.
        if rows >= TILE {
            x.par_chunks_exact(QK)
                .zip(q.par_chunks_exact_mut(QK))
                .zip(d.par_iter_mut().zip(s.par_iter_mut()).zip(lanes.par_iter_mut()))
                .with_min_len(256)
                .for_each(|((x, q), ((d, s), h))| (*d, *s, *h) = quantize_block(x, q));
        } else {
            let scales = d.iter_mut().zip(s.iter_mut()).zip(lanes.iter_mut());
            for ((x, q), ((d, s), h)) in x.chunks_exact(QK).zip(q.chunks_exact_mut(QK)).zip(scales) {
                (*d, *s, *h) = quantize_block(x, q);
            }
        }
        let halves = lanes.iter().map(|l| [l[..4].iter().sum(), l[4..].iter().sum()]).collect();
        Self { rows, cols, d, s, lanes, halves, q, f: x }
    }
}

/// Quantizes one block of 32 floats into `q`; returns its scale `d`, `d · Σq`, and the negated sums of each
/// four values (see [`Quantized`]).
fn quantize_block(x: &[f32], q: &mut [i8]) -> (f32, f32, [i32; 8]) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let scale = amax / 127.0;
    let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
    let mut lanes = [0i32; 8];
    for (k, (v, out)) in x.iter().zip(q.iter_mut()).enumerate() {
        // Round to nearest (ties to even) by the float trick instead of a call to `roundf`: |v · inv| ≤ 127.
        let qv = ((v * inv + ROUNDING) - ROUNDING) as i32;
        *out = qv as i8;
        lanes[k / 4] -= qv;
    }
    (scale, scale * (-lanes.iter().sum::<i32>()) as f32, lanes)
}

/// Adding and subtracting 1.5 · 2^23 rounds an f32 below 2^22 in magnitude to the nearest integer.
const ROUNDING: f32 = 12_582_912.0;

/// Consecutive rows of `Quantized` activations: what a kernel reads.
pub struct Rows<'a> {
    pub rows: usize,
    pub cols: usize,
    d: &'a [f32],
    s: &'a [f32],
    lanes: &'a [[i32; 8]],
    halves: &'a [[i32; 2]],
    q: &'a [i8],
    f: &'a [f32],
}

impl Quantized<'_> {
    /// Rows `range` of these activations.
    pub fn window(&self, range: std::ops::Range<usize>) -> Rows<'_> {
        let blocks = self.cols / QK;
        let (b, c) = (range.start * blocks..range.end * blocks, range.start * self.cols..range.end * self.cols);
        Rows {
            rows: range.len(),
            cols: self.cols,
            d: &self.d[b.clone()],
            s: &self.s[b.clone()],
            lanes: &self.lanes[b.clone()],
            halves: &self.halves[b],
            q: &self.q[c.clone()],
            f: &self.f[c],
        }
    }
}

/// Bytes of activations a kernel keeps in L1 while it runs one task's weight rows past them.
const L1_ACTIVATIONS: usize = 16 << 10;

impl Matrix {
    /// `out[t][n] = Σ_k x[t][k] · w[n][k]` for every activation row `t`; `out` is `x.rows × self.rows`.
    pub fn matmul(&self, x: &Quantized<'_>, out: &mut [f32]) {
        Self::matmul_all(x, &mut [(self, out)]);
    }

    /// [`Matrix::matmul`] for several matrices on the same activations (a layer's query, key and value
    /// projections; its gate and up projections) as one parallel job: a decode step's threads meet once instead
    /// of once per matrix, and those meetings, not the arithmetic, are much of a one-row step's time.
    pub fn matmul_all(x: &Quantized<'_>, jobs: &mut [(&Matrix, &mut [f32])]) {
        let t_rows = x.rows;
        for (m, out) in jobs.iter() {
            assert_eq!(x.cols, m.cols, "inner dimensions differ");
            assert_eq!(out.len(), t_rows * m.rows);
        }
        // Each task owns `per_task` weight rows of one matrix and writes them for all activation rows
        // (transposed), so tasks write disjoint memory; the result is transposed into `out` afterwards. One
        // activation row needs no transpose: the task writes `out` itself.
        let mut transposed: Vec<Vec<f32>> =
            jobs.iter().map(|(m, _)| if t_rows == 1 { vec![] } else { vec![0f32; m.rows * t_rows] }).collect();
        let all_rows: usize = jobs.iter().map(|(m, _)| m.rows).sum();
        let per_task = all_rows
            .div_ceil(rayon::current_num_threads() * TASKS_PER_THREAD)
            .max(MIN_ROWS_PER_TASK)
            .next_multiple_of(interleaved::ROWS);
        // Each task runs its weight rows past a group of activation rows small enough to stay in L1, then the
        // next group: activations are read from L2 once per group instead of once per weight row.
        let group = (L1_ACTIVATIONS / x.cols.max(1)).max(TILE) / TILE * TILE;
        let mut tasks = vec![];
        for ((m, out), buffer) in jobs.iter_mut().zip(&mut transposed) {
            let target = if t_rows == 1 { &mut **out } else { &mut buffer[..] };
            for (task, chunk) in target.chunks_mut(per_task * t_rows).enumerate() {
                tasks.push((*m, task * per_task, chunk));
            }
        }
        tasks.into_par_iter().for_each(|(m, first, chunk)| {
            let mut eights = vec![];
            for g0 in (0..t_rows).step_by(group) {
                let g1 = (g0 + group).min(t_rows);
                let window = x.window(g0..g1);
                if let WeightData::Interleaved(format, bytes) = &m.data {
                    // Eight weight rows at a time, their results eight to an activation row. Tasks start at a
                    // whole group: `per_task` is a multiple of eight.
                    debug_assert!(first.is_multiple_of(interleaved::ROWS));
                    let tiles = interleaved::group_bytes(*format, m.cols);
                    eights.resize((g1 - g0) * interleaved::ROWS, 0.0);
                    for (p, rows) in chunk.chunks_mut(interleaved::ROWS * t_rows).enumerate() {
                        let n = first / interleaved::ROWS + p;
                        simd::interleaved_rows(*format, &bytes[n * tiles..][..tiles], &window, &mut eights);
                        for (r, row) in rows.chunks_exact_mut(t_rows).enumerate() {
                            for (t, o) in row[g0..g1].iter_mut().enumerate() {
                                *o = eights[t * interleaved::ROWS + r];
                            }
                        }
                    }
                    continue;
                }
                // Weight rows four at a time, each activation block loaded once for all four (K-quants measured
                // 10-20 % faster than two at a time by `bench --kernels`); one at a time for a step of few rows,
                // which streams the weights from memory and ran faster on one row at a time.
                for (p, quad) in chunk.chunks_mut(WEIGHT_TILE * t_rows).enumerate() {
                    let n = first + WEIGHT_TILE * p;
                    if quad.len() == WEIGHT_TILE * t_rows && t_rows >= TILE {
                        let (ab, cd) = quad.split_at_mut(2 * t_rows);
                        let (a, b) = ab.split_at_mut(t_rows);
                        let (c, d) = cd.split_at_mut(t_rows);
                        m.rows_dot(n, &window, &mut [&mut a[g0..g1], &mut b[g0..g1], &mut c[g0..g1], &mut d[g0..g1]]);
                    } else {
                        for (i, row) in quad.chunks_exact_mut(t_rows).enumerate() {
                            m.rows_dot(n + i, &window, &mut [&mut row[g0..g1]]);
                        }
                    }
                }
            }
        });
        if t_rows == 1 {
            return;
        }
        for ((m, out), transposed) in jobs.iter_mut().zip(&transposed) {
            let n_rows = m.rows;
            // Eight output rows at a time, so each weight row's results are read as one run instead of one
            // float from a distant line per output row.
            let transpose = |(t8, rows): (usize, &mut [f32])| {
                let t0 = t8 * TRANSPOSE_ROWS;
                let count = rows.len() / n_rows;
                for (n, results) in transposed.chunks_exact(t_rows).enumerate() {
                    for (k, &v) in results[t0..t0 + count].iter().enumerate() {
                        rows[k * n_rows + n] = v;
                    }
                }
            };
            if t_rows >= TILE {
                out.par_chunks_mut(n_rows * TRANSPOSE_ROWS).enumerate().for_each(transpose);
            } else {
                out.chunks_mut(n_rows * TRANSPOSE_ROWS).enumerate().for_each(transpose);
            }
        }
    }

    /// Dot products of weight rows `n..n + R` with every activation row: `out[r][t]` for row `n + r`.
    fn rows_dot<const R: usize>(&self, n: usize, x: &Rows<'_>, out: &mut [&mut [f32]; R]) {
        match &self.data {
            WeightData::Quant(format, bytes) => {
                let size = format.row_bytes(self.cols);
                let rows: [&[u8]; R] = std::array::from_fn(|r| &bytes[(n + r) * size..(n + r + 1) * size]);
                match format {
                    Format::Q4_1 => rows.iter().zip(out.iter_mut()).for_each(|(row, out)| simd::q4_1_row(row, x, out)),
                    Format::Q8_0 if x.rows < 4 => {
                        rows.iter().zip(out.iter_mut()).for_each(|(row, out)| simd::q8_0_row(row, x, out))
                    }
                    _ => simd::unit_rows(*format, rows, x, out),
                }
            }
            WeightData::Interleaved(..) => unreachable!("`matmul_all` multiplies interleaved rows itself"),
            WeightData::F32(w) => {
                for (r, out) in out.iter_mut().enumerate() {
                    let row = &w[(n + r) * self.cols..(n + r + 1) * self.cols];
                    for (t, o) in out.iter_mut().enumerate() {
                        *o = row.iter().zip(&x.f[t * self.cols..(t + 1) * self.cols]).map(|(a, b)| a * b).sum();
                    }
                }
            }
        }
    }

    /// `rows × cols` floats as a matrix of `format` blocks (candle's quantizers): quantization at load, and the
    /// kernel benchmark's weights.
    pub fn quantize(format: Format, floats: &[f32], rows: usize, cols: usize) -> crate::Result<Matrix> {
        let t = candle_core::Tensor::from_slice(floats, (rows, cols), &candle_core::Device::Cpu)?;
        let bytes = candle_core::quantized::QTensor::quantize(&t, format.ggml())?.data()?.into_owned();
        Ok(Matrix { rows, cols, data: WeightData::Quant(format, bytes) })
    }

    /// The layout this CPU's kernels read fastest: where [`interleaving`] is on, block rows in whole groups
    /// of eight are interleaved, in place; anything else is returned as it is.
    pub fn for_kernels(self) -> Matrix {
        if interleaving() { self.interleaved() } else { self }
    }

    /// The matrix with its rows interleaved, where it holds blocks and its rows come in whole groups of eight
    /// (whatever the CPU).
    pub(crate) fn interleaved(self) -> Matrix {
        match self.data {
            WeightData::Quant(format, mut bytes) if self.rows.is_multiple_of(interleaved::ROWS) => {
                interleaved::interleave(format, &mut bytes, self.cols);
                Matrix { data: WeightData::Interleaved(format, bytes), ..self }
            }
            _ => self,
        }
    }

    /// Row `n` as floats (embedding look-up).
    pub fn row(&self, n: usize, out: &mut [f32]) {
        match &self.data {
            WeightData::Quant(format, bytes) => format.dequantize_row(bytes, n, self.cols, out),
            WeightData::Interleaved(format, bytes) => interleaved::dequantize_row(*format, bytes, n, self.cols, out),
            WeightData::F32(w) => out.copy_from_slice(&w[n * self.cols..(n + 1) * self.cols]),
        }
    }

    /// Bytes the weights take in memory.
    pub fn bytes(&self) -> usize {
        match &self.data {
            WeightData::Quant(_, bytes) | WeightData::Interleaved(_, bytes) => bytes.len(),
            WeightData::F32(w) => w.len() * 4,
        }
    }
}

/// The instruction set the kernels use on this CPU (`MOLTBOT_ENGINE_NO_AVX512` and `MOLTBOT_ENGINE_NO_SIMD`
/// force lower ones).
pub fn simd_level() -> &'static str {
    match simd::level() {
        #[cfg(target_arch = "x86_64")]
        simd::Level::Avx512Vnni => "AVX-512 VNNI",
        #[cfg(target_arch = "x86_64")]
        simd::Level::Avx2 => "AVX2",
        #[cfg(target_arch = "aarch64")]
        simd::Level::Neon => "NEON",
        simd::Level::Scalar => "portable (no SIMD)",
    }
}

/// Whether [`Matrix::for_kernels`] interleaves weight rows: on x86 with AVX2 or AVX-512 VNNI, unless
/// `MOLTBOT_ENGINE_NO_INTERLEAVE` is set (to measure the row-at-a-time kernels).
pub fn interleaving() -> bool {
    #[cfg(target_arch = "x86_64")]
    if matches!(simd::level(), simd::Level::Avx512Vnni | simd::Level::Avx2) {
        return std::env::var_os("MOLTBOT_ENGINE_NO_INTERLEAVE").is_none();
    }
    false
}

/// Stores floats as f16 (the KV cache), in hardware where the CPU converts.
pub fn to_f16(src: &[f32], dst: &mut [f16]) {
    use half::slice::HalfFloatSliceExt;
    dst.convert_from_f32_slice(src);
}

/// Reads f16 values (the KV cache) as floats, exactly, in hardware where the CPU converts.
pub fn to_f32(src: &[f16], dst: &mut [f32]) {
    use half::slice::HalfFloatSliceExt;
    src.convert_to_f32_slice(dst);
}

/// Asks the CPU to bring `rows` rows of `width` f16 values, `stride` apart, into its cache ahead of use: the
/// next KV block, which lives far from this one in the pool, so no hardware prefetcher guesses it.
pub fn prefetch(src: &[f16], stride: usize, width: usize, rows: usize) {
    #[cfg(target_arch = "x86_64")]
    for j in 0..rows {
        for line in src[(j * stride).min(src.len())..][..width.min(src.len().saturating_sub(j * stride))].chunks(32) {
            // SAFETY: a prefetch is a hint; the address is within `src`.
            unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(line.as_ptr().cast()) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (src, stride, width, rows);
}

/// Reads `dst.len() / width` rows of `width` f16 values, `stride` apart in `src` (one key-value head's keys or
/// values of a KV block), into `dst` as floats, exactly: one call per block keeps the conversion in registers
/// instead of a call per row.
pub fn gather_f32(src: &[f16], stride: usize, width: usize, dst: &mut [f32]) {
    let rows = dst.len() / width.max(1);
    assert!(rows == 0 || (rows - 1) * stride + width <= src.len(), "rows past the end of the block");
    match simd::level() {
        // SAFETY: both levels imply AVX2 and F16C, detected at run time; the rows are in bounds (asserted).
        #[cfg(target_arch = "x86_64")]
        simd::Level::Avx512Vnni | simd::Level::Avx2 => unsafe {
            simd::x86::floats::gather_f32(src, stride, width, rows, dst)
        },
        #[allow(unreachable_patterns)]
        _ => {
            for (j, row) in dst.chunks_exact_mut(width).enumerate() {
                to_f32(&src[j * stride..][..width], row);
            }
        }
    }
}

/// Keys in a block of [`block_scores`] and [`block_values`]: the KV cache's block size (two registers of eight
/// floats in the SIMD kernel).
pub const BLOCK_KEYS: usize = crate::kv::BLOCK_SIZE;
const _: () = assert!(BLOCK_KEYS == 16, "the attention kernels hold a block's keys in two registers");

/// The scores of every query against one block of keys: `out[n · stride + j] = Σ_i queries[n · width + i] ·
/// keys[i · BLOCK_KEYS + j]` for the `BLOCK_KEYS` keys `j`, which the KV cache stores dimension by dimension
/// (`keys[i · BLOCK_KEYS + j]` is key `j`'s `i`-th value), so the keys of one dimension fill the lanes of a
/// register and no sum is reduced across lanes. Each query's scores are summed over `i` in order whatever the
/// other queries, so batching does not change a query's scores. A block's keys past those written hold stale
/// values; the caller overwrites their scores (attention gives them weight 0).
pub fn block_scores(queries: &[f32], width: usize, keys: &[f32], out: &mut [f32], stride: usize) {
    let n = queries.len() / width.max(1);
    assert!(keys.len() >= width * BLOCK_KEYS, "fewer keys than a block");
    assert!(stride >= BLOCK_KEYS && (n == 0 || (n - 1) * stride + BLOCK_KEYS <= out.len()), "scores out of bounds");
    match simd::level() {
        // SAFETY: both levels imply AVX2 and FMA, detected at run time; the keys and scores are in bounds
        // (asserted).
        #[cfg(target_arch = "x86_64")]
        simd::Level::Avx512Vnni | simd::Level::Avx2 if width > 0 => unsafe {
            simd::x86::floats::block_scores(queries, width, keys, out, stride)
        },
        _ => scalar::block_scores(queries, width, keys, out, stride),
    }
}

/// Softmax in place: `s = exp(s - max) / Σ exp(s - max)`. The exponential is Cephes' polynomial on eight lanes
/// at a time where the CPU has AVX2 (within 2 ulp of `f32::exp`), and so are the maximum and the division, which
/// attention over a long context spends much of its time on otherwise.
pub fn softmax(scores: &mut [f32]) {
    match simd::level() {
        // SAFETY: both levels imply AVX2 and FMA, detected at run time.
        #[cfg(target_arch = "x86_64")]
        simd::Level::Avx512Vnni | simd::Level::Avx2 => unsafe { simd::x86::floats::softmax(scores) },
        #[allow(unreachable_patterns)]
        _ => scalar::softmax(scores),
    }
}

/// The feed-forward activation in place: `gate = silu(gate) · up = gate / (1 + e^-gate) · up`, with the
/// exponential eight lanes at a time where the CPU has AVX2.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    gated::<false>(gate, up)
}

/// Elements of an activation one task takes (a prompt's are spread over the cores; each element is on its own,
/// so the split never changes a result).
const ACTIVATION_CHUNK: usize = 16 << 10;

/// `silu_mul`, or with `GELU` `gelu_mul`.
fn gated<const GELU: bool>(gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len());
    let run = |(gate, up): (&mut [f32], &[f32])| match simd::level() {
        // SAFETY: both levels imply AVX2 and FMA, detected at run time; the lengths are equal (asserted).
        #[cfg(target_arch = "x86_64")]
        simd::Level::Avx512Vnni | simd::Level::Avx2 => unsafe { simd::x86::floats::gated::<GELU>(gate, up) },
        #[allow(unreachable_patterns)]
        _ if GELU => scalar::gelu_mul(gate, up),
        _ => scalar::silu_mul(gate, up),
    };
    if gate.len() >= 4 * ACTIVATION_CHUNK {
        gate.par_chunks_mut(ACTIVATION_CHUNK).zip(up.par_chunks(ACTIVATION_CHUNK)).for_each(run);
    } else {
        run((gate, up));
    }
}

/// GeGLU's activation in place: `gate = gelu(gate) · up`, with GELU's tanh approximation
/// (`0.5 · g · (1 + tanh(√(2/π) · (g + 0.044715 · g³)))`, PyTorch's `gelu(approximate="tanh")`).
pub fn gelu_mul(gate: &mut [f32], up: &[f32]) {
    gated::<true>(gate, up)
}

/// Every query's share of one block of values: `out[n · width + i] += Σ_{j < rows} weights[n · stride + j] ·
/// values[j · width + i]`, summed over `j` in order. A query that sees fewer than `rows` of the block's positions
/// has zero weights for the rest, which leave its sums exactly as they were: a query's output does not depend on
/// which other queries share the call.
pub fn block_values(out: &mut [f32], width: usize, weights: &[f32], stride: usize, rows: usize, values: &[f32]) {
    let queries = out.len() / width.max(1);
    assert_eq!(out.len(), queries * width, "whole output rows");
    assert!(rows <= BLOCK_KEYS && rows <= stride && values.len() >= rows * width, "fewer values than weights");
    assert!(queries == 0 || (queries - 1) * stride + rows <= weights.len(), "weights out of bounds");
    match simd::level() {
        // SAFETY: both levels imply AVX2 and FMA, detected at run time; the values and weights are in bounds
        // (asserted).
        #[cfg(target_arch = "x86_64")]
        simd::Level::Avx512Vnni | simd::Level::Avx2 if width > 0 && width.is_multiple_of(8) => unsafe {
            simd::x86::floats::block_values(out, width, weights, stride, rows, values)
        },
        _ => scalar::block_values(out, width, weights, stride, rows, values),
    }
}

fn f16_at(bytes: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

/// Portable reference dot products, also the fallback on CPUs without AVX2.
mod scalar {
    use super::*;

    /// Σ over blocks of `block_dot(weight block, activation block index)`, for every activation row.
    fn rows(row: &[u8], block_bytes: usize, x: &Rows<'_>, out: &mut [f32], block_dot: impl Fn(&[u8], usize) -> f32) {
        let blocks = x.cols / QK;
        for (t, o) in out.iter_mut().enumerate() {
            *o = (0..blocks).map(|b| block_dot(&row[b * block_bytes..][..block_bytes], t * blocks + b)).sum();
        }
    }

    /// The keys of one dimension at a time, across the block, so the compiler vectorizes it.
    pub fn block_scores(queries: &[f32], width: usize, keys: &[f32], out: &mut [f32], stride: usize) {
        for (n, query) in queries.chunks_exact(width.max(1)).enumerate() {
            let mut acc = [0f32; BLOCK_KEYS];
            for (x, k) in query.iter().zip(keys.chunks_exact(BLOCK_KEYS)) {
                for (a, k) in acc.iter_mut().zip(k) {
                    *a += x * k;
                }
            }
            out[n * stride..][..BLOCK_KEYS].copy_from_slice(&acc);
        }
    }

    /// As `g · σ(2t)`, which equals `0.5 · g · (1 + tanh(t))` and keeps its digits for negative inputs (the vector
    /// kernel's form too, so a row's tail computed here agrees with it).
    pub fn gelu_mul(gate: &mut [f32], up: &[f32]) {
        for (g, u) in gate.iter_mut().zip(up) {
            let x = *g;
            let t2 = super::GELU_TWO_SQRT_2_OVER_PI * (x * (1.0 + super::GELU_CUBIC * x * x));
            *g = x / (1.0 + (-t2).exp()) * u;
        }
    }

    pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
        for (g, u) in gate.iter_mut().zip(up) {
            *g = *g / (1.0 + (-*g).exp()) * u;
        }
    }

    pub fn softmax(scores: &mut [f32]) {
        let max = scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
        let mut total = 0.0;
        for s in scores.iter_mut() {
            *s = (*s - max).exp();
            total += *s;
        }
        let inverse = 1.0 / total;
        scores.iter_mut().for_each(|s| *s *= inverse);
    }

    pub fn block_values(out: &mut [f32], width: usize, weights: &[f32], stride: usize, rows: usize, values: &[f32]) {
        for (n, o) in out.chunks_exact_mut(width.max(1)).enumerate() {
            for (w, v) in weights[n * stride..][..rows].iter().zip(values.chunks_exact(width)) {
                for (o, v) in o.iter_mut().zip(v) {
                    *o += w * v;
                }
            }
        }
    }

    pub fn q4_1_row(row: &[u8], x: &Rows<'_>, out: &mut [f32]) {
        rows(row, Q4_1_BYTES, x, out, |w, xb| {
            let q = &x.q[xb * QK..][..QK];
            let isum: i32 = (0..16)
                .map(|j| i32::from(w[4 + j] & 0x0f) * i32::from(q[j]) + i32::from(w[4 + j] >> 4) * i32::from(q[j + 16]))
                .sum();
            f16_at(w, 0) * x.d[xb] * isum as f32 + f16_at(w, 2) * x.s[xb]
        })
    }
}

pub(crate) mod simd {
    use super::*;

    /// The instruction sets a kernel can use, best first; detected once per process.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Level {
        /// AVX-512 VNNI on 256-bit registers: one `vpdpbusd` per block instead of `vpmaddubsw` + `vpmaddwd`.
        #[cfg(target_arch = "x86_64")]
        Avx512Vnni,
        #[cfg(target_arch = "x86_64")]
        Avx2,
        /// Every aarch64 CPU has NEON (Advanced SIMD).
        #[cfg(target_arch = "aarch64")]
        Neon,
        Scalar,
    }

    /// Every level this CPU runs, best first (for tests).
    #[cfg(test)]
    pub fn levels() -> Vec<Level> {
        let all = [
            #[cfg(target_arch = "x86_64")]
            Level::Avx512Vnni,
            #[cfg(target_arch = "x86_64")]
            Level::Avx2,
            #[cfg(target_arch = "aarch64")]
            Level::Neon,
            Level::Scalar,
        ];
        all.into_iter().skip_while(|l| *l != level()).collect()
    }

    pub fn level() -> Level {
        use std::sync::OnceLock;
        static LEVEL: OnceLock<Level> = OnceLock::new();
        *LEVEL.get_or_init(|| {
            if std::env::var_os("MOLTBOT_ENGINE_NO_SIMD").is_some() {
                return Level::Scalar;
            }
            #[cfg(target_arch = "x86_64")]
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c") {
                let vnni = is_x86_feature_detected!("avx512vnni")
                    && is_x86_feature_detected!("avx512vl")
                    && is_x86_feature_detected!("avx512dq")
                    && is_x86_feature_detected!("avx512bw");
                return if vnni && std::env::var_os("MOLTBOT_ENGINE_NO_AVX512").is_none() {
                    Level::Avx512Vnni
                } else {
                    Level::Avx2
                };
            }
            #[cfg(target_arch = "aarch64")]
            return Level::Neon;
            #[allow(unreachable_code)]
            Level::Scalar
        })
    }

    pub fn q4_1_row(row: &[u8], x: &Rows<'_>, out: &mut [f32]) {
        q4_1_row_at(level(), row, x, out)
    }

    /// `q4_1_row` on `level`, which must be `level()` or below it.
    pub fn q4_1_row_at(level: Level, row: &[u8], x: &Rows<'_>, out: &mut [f32]) {
        match level {
            // SAFETY: the features each kernel needs were detected at run time.
            #[cfg(target_arch = "x86_64")]
            // On 256-bit registers: AMD's Zen 4 splits 512-bit operations in two, and one-stream decoding measured
            // 1.2-1.4x faster there than with the 512-bit kernel. One kernel for every row count, so a row's result
            // never depends on how many others share its step.
            Level::Avx512Vnni => unsafe { x86::vnni::q4_1_row(row, x, out) },
            #[cfg(target_arch = "x86_64")]
            Level::Avx2 => unsafe { x86::avx2::q4_1_row(row, x, out) },
            #[cfg(target_arch = "aarch64")]
            Level::Neon => unsafe { arm::q4_1_row(row, x, out) },
            Level::Scalar => scalar::q4_1_row(row, x, out),
        }
    }

    /// Q8_0 for a step of one to three rows (decoding): the generic kernel gives the same sums, to the bit, but
    /// ran one-row steps on a large matrix (a tied output projection) at half the speed of this one, which
    /// streams one weight row at a time.
    pub fn q8_0_row(row: &[u8], x: &Rows<'_>, out: &mut [f32]) {
        q8_0_row_at(level(), row, x, out)
    }

    /// `q8_0_row` on `level`, which must be `level()` or below it.
    pub fn q8_0_row_at(level: Level, row: &[u8], x: &Rows<'_>, out: &mut [f32]) {
        match level {
            // SAFETY: the features each kernel needs were detected at run time.
            #[cfg(target_arch = "x86_64")]
            Level::Avx512Vnni => unsafe { x86::vnni::q8_0_row(row, x, out) },
            #[cfg(target_arch = "x86_64")]
            Level::Avx2 => unsafe { x86::avx2::q8_0_row(row, x, out) },
            #[cfg(target_arch = "aarch64")]
            // SAFETY: every aarch64 CPU has NEON.
            Level::Neon => unsafe { arm::q8_0_row(row, x, out) },
            _ => blocks::scalar_row(Format::Q8_0, row, x, out),
        }
    }

    /// Eight interleaved weight rows against every activation row: `out[t · 8 + r]`.
    pub fn interleaved_rows(format: Format, tiles: &[u8], x: &Rows<'_>, out: &mut [f32]) {
        interleaved_rows_at(level(), format, tiles, x, out)
    }

    /// `interleaved_rows` on `level`, which must be `level()` or below it.
    pub fn interleaved_rows_at(level: Level, format: Format, tiles: &[u8], x: &Rows<'_>, out: &mut [f32]) {
        match level {
            // SAFETY: the features each kernel needs were detected at run time.
            #[cfg(target_arch = "x86_64")]
            Level::Avx512Vnni => unsafe { interleaved::x86::vnni::rows(format, tiles, x, out) },
            #[cfg(target_arch = "x86_64")]
            Level::Avx2 => unsafe { interleaved::x86::avx2::rows(format, tiles, x, out) },
            _ => interleaved::scalar_rows(format, tiles, x, out),
        }
    }

    /// The generic kernel for every block format but Q4_1, on `R` weight rows at once (NEON runs the portable
    /// path but for Q8_0).
    pub fn unit_rows<const R: usize>(format: Format, rows: [&[u8]; R], x: &Rows<'_>, out: &mut [&mut [f32]; R]) {
        unit_rows_at(level(), format, rows, x, out)
    }

    /// `unit_rows` on `level`, which must be `level()` or below it.
    pub fn unit_rows_at<const R: usize>(
        level: Level,
        format: Format,
        rows: [&[u8]; R],
        x: &Rows<'_>,
        out: &mut [&mut [f32]; R],
    ) {
        match level {
            // SAFETY: the features each kernel needs were detected at run time.
            #[cfg(target_arch = "x86_64")]
            Level::Avx512Vnni => unsafe { blocks::x86::vnni::rows(format, rows, x, out) },
            #[cfg(target_arch = "x86_64")]
            Level::Avx2 => unsafe { blocks::x86::avx2::rows(format, rows, x, out) },
            #[cfg(target_arch = "aarch64")]
            Level::Neon if format == Format::Q8_0 => {
                for (row, out) in rows.iter().zip(out.iter_mut()) {
                    // SAFETY: every aarch64 CPU has NEON.
                    unsafe { arm::q8_0_row(row, x, out) };
                }
            }
            _ => {
                for (row, out) in rows.iter().zip(out.iter_mut()) {
                    blocks::scalar_row(format, row, x, out);
                }
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    pub(super) mod x86 {
        use std::arch::x86_64::*;

        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        pub(crate) fn hsum(v: __m256) -> f32 {
            let lo = _mm256_castps256_ps128(v);
            let hi = _mm256_extractf128_ps(v, 1);
            let s = _mm_add_ps(lo, hi);
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
            _mm_cvtss_f32(s)
        }

        /// The two f16 values at the start of a block (`d`, and `m` for Q4_1), converted in hardware.
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        fn f16_pair(block: &[u8]) -> (f32, f32) {
            let bits = i32::from_le_bytes([block[0], block[1], block[2], block[3]]);
            let v = _mm_cvtph_ps(_mm_cvtsi32_si128(bits));
            (_mm_cvtss_f32(v), _mm_cvtss_f32(_mm_shuffle_ps(v, v, 1)))
        }

        /// Sum of `a · b` for 32 unsigned bytes `a` and 32 signed bytes `b`, as 8 floats (AVX2).
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        pub(crate) fn dot_u8_i8_avx2(a: __m256i, b: __m256i) -> __m256 {
            let pairs = _mm256_maddubs_epi16(a, b);
            _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
        }

        /// The same with one VNNI instruction, which also cannot saturate.
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
        pub(crate) fn dot_u8_i8_vnni(a: __m256i, b: __m256i) -> __m256 {
            _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(_mm256_setzero_si256(), a, b))
        }

        /// `from` plus the byte dot products of `a` (unsigned) and `b` (signed), in 32-bit lanes: one VNNI
        /// instruction, which cannot saturate.
        #[inline]
        #[target_feature(enable = "avx2,fma,avx512vnni,avx512vl")]
        pub(crate) fn dot_u8_i8_from_vnni(from: __m256i, a: __m256i, b: __m256i) -> __m256i {
            _mm256_dpbusd_epi32(from, a, b)
        }

        /// The same on AVX2, where pairs of products saturate at 16 bits: safe for `a` below 128, or up to 128
        /// with `b` within ±127 (the activations always are). The generic kernel's AVX2 level takes the sign trick
        /// instead; the interleaved one uses this for weights below 64 and Q8_0's sign trick (|w| up to 128).
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        pub(crate) fn dot_u8_i8_from_avx2(from: __m256i, a: __m256i, b: __m256i) -> __m256i {
            _mm256_add_epi32(from, _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1)))
        }

        /// The row kernels, stamped out per instruction set: `$dot` is the byte dot product, `$features` what the
        /// compiler may use, and the list which kernels the set gets.
        macro_rules! kernels {
            ($name:ident, $features:literal, $dot:ident, $($kernel:ident),+) => {
                pub mod $name {
                    use std::arch::x86_64::*;

                    use super::super::super::*;
                    use super::{$dot, f16_pair, hsum};

                    $(kernels!(@$kernel, $features, $dot);)+
                }
            };
            (@q4_1, $features:literal, $dot:ident) => {
                #[target_feature(enable = $features)]
                pub unsafe fn q4_1_row(row: &[u8], x: &Rows<'_>, out: &mut [f32]) {
                    let mut t0 = 0;
                    while t0 < x.rows {
                        let n = (x.rows - t0).min(TILE);
                        // SAFETY: rows t0..t0 + n exist (the caller's `x` and `out` agree on rows).
                        unsafe {
                            match n {
                                4 => q4_1_tile::<4>(row, x, t0, out),
                                3 => q4_1_tile::<3>(row, x, t0, out),
                                2 => q4_1_tile::<2>(row, x, t0, out),
                                _ => q4_1_tile::<1>(row, x, t0, out),
                            }
                        }
                        t0 += n;
                    }
                }

                /// Activation rows `t0..t0 + N` against one weight row. The row loop is unrolled (N is a
                /// constant), so the accumulators stay in registers; each row's sums are taken in the same order
                /// whatever N is.
                #[inline]
                #[target_feature(enable = $features)]
                unsafe fn q4_1_tile<const N: usize>(row: &[u8], x: &Rows<'_>, t0: usize, out: &mut [f32]) {
                    const { assert!(N <= TILE) };
                    let blocks = x.cols / QK;
                    assert!(row.len() >= blocks * Q4_1_BYTES && out.len() >= t0 + N);
                    assert!(x.q.len() >= (t0 + N) * blocks * QK && x.d.len().min(x.s.len()) >= (t0 + N) * blocks);
                    let mask = _mm_set1_epi8(0x0f);
                    let mut acc = [_mm256_setzero_ps(); N];
                    let mut offset = [0f32; N];
                    let (q, xd, xs) = (x.q.as_ptr(), x.d.as_ptr(), x.s.as_ptr());
                    for b in 0..blocks {
                        // SAFETY: block b of the row, and of rows t0..t0 + N, are in bounds (asserted above).
                        unsafe {
                            let w = row.as_ptr().add(b * Q4_1_BYTES);
                            let (d, m) = f16_pair(std::slice::from_raw_parts(w, 4));
                            let packed = _mm_loadu_si128(w.add(4).cast());
                            let lo = _mm_and_si128(packed, mask);
                            let hi = _mm_and_si128(_mm_srli_epi16(packed, 4), mask);
                            let nibbles = _mm256_set_m128i(hi, lo);
                            for i in 0..N {
                                let xb = (t0 + i) * blocks + b;
                                let qv = _mm256_loadu_si256(q.add(xb * QK).cast());
                                let scale = _mm256_set1_ps(d * *xd.add(xb));
                                acc[i] = _mm256_fmadd_ps(scale, $dot(nibbles, qv), acc[i]);
                                offset[i] += m * *xs.add(xb);
                            }
                        }
                    }
                    for i in 0..N {
                        out[t0 + i] = hsum(acc[i]) + offset[i];
                    }
                }
            };
            (@q8_0, $features:literal, $dot:ident) => {
                #[target_feature(enable = $features)]
                pub unsafe fn q8_0_row(row: &[u8], x: &Rows<'_>, out: &mut [f32]) {
                    let blocks = x.cols / QK;
                    for t0 in (0..x.rows).step_by(TILE) {
                        let tiles = (x.rows - t0).min(TILE);
                        let mut acc = [_mm256_setzero_ps(); TILE];
                        for b in 0..blocks {
                            let w = &row[b * Q8_0_BYTES..][..Q8_0_BYTES];
                            let d = f16_pair(w).0;
                            // SAFETY: `w` holds 34 bytes; bytes 2..34 are the 32 quantized weights.
                            let wq = unsafe { _mm256_loadu_si256(w.as_ptr().add(2).cast()) };
                            let w_abs = _mm256_sign_epi8(wq, wq);
                            for i in 0..tiles {
                                let xb = (t0 + i) * blocks + b;
                                // SAFETY: block `xb` has 32 quantized values.
                                let q = unsafe { _mm256_loadu_si256(x.q.as_ptr().add(xb * QK).cast()) };
                                // |w| · (q · sign(w)) = w · q, with the unsigned operand first.
                                let q_signed = _mm256_sign_epi8(q, wq);
                                let scale = _mm256_set1_ps(d * x.d[xb]);
                                acc[i] = _mm256_fmadd_ps(scale, $dot(w_abs, q_signed), acc[i]);
                            }
                        }
                        for i in 0..tiles {
                            out[t0 + i] = hsum(acc[i]);
                        }
                    }
                }
            };
        }

        /// Float kernels: attention over KV blocks, the softmax and the feed-forward activation.
        pub mod floats {
            use std::arch::x86_64::*;

            use super::hsum;

            /// # Safety
            /// `width > 0`; `keys` holds `width · BLOCK_KEYS` floats and `out` a row of `BLOCK_KEYS` at every
            /// `stride` for each of the `queries.len() / width` queries.
            #[target_feature(enable = "avx2,fma,f16c")]
            pub unsafe fn block_scores(queries: &[f32], width: usize, keys: &[f32], out: &mut [f32], stride: usize) {
                let n = queries.len() / width;
                let mut first = 0;
                while first < n {
                    // SAFETY: queries first..first + m exist (the caller's bounds).
                    let m = match n - first {
                        6.. => unsafe { scores_tile::<6>(queries, width, keys, out, stride, first) },
                        5 => unsafe { scores_tile::<5>(queries, width, keys, out, stride, first) },
                        4 => unsafe { scores_tile::<4>(queries, width, keys, out, stride, first) },
                        3 => unsafe { scores_tile::<3>(queries, width, keys, out, stride, first) },
                        2 => unsafe { scores_tile::<2>(queries, width, keys, out, stride, first) },
                        _ => unsafe { scores_tile::<1>(queries, width, keys, out, stride, first) },
                    };
                    first += m;
                }
            }

            /// The scores of queries `first..first + M` (returns `M`): for each dimension, its 16 keys in two
            /// registers times each query's value there, accumulated in two registers per query (six queries
            /// leave the last of sixteen registers for the query value).
            #[inline]
            #[target_feature(enable = "avx2,fma,f16c")]
            unsafe fn scores_tile<const M: usize>(
                queries: &[f32],
                width: usize,
                keys: &[f32],
                out: &mut [f32],
                stride: usize,
                first: usize,
            ) -> usize {
                let mut acc = [[_mm256_setzero_ps(); 2]; M];
                // SAFETY: query first + M - 1 ends within `queries`, dimension i's keys within `keys`, and each
                // query's row of scores within `out` (the caller's bounds).
                unsafe {
                    let (q, k) = (queries.as_ptr().add(first * width), keys.as_ptr());
                    for i in 0..width {
                        let (k0, k1) = (_mm256_loadu_ps(k.add(i * 16)), _mm256_loadu_ps(k.add(i * 16 + 8)));
                        for (m, a) in acc.iter_mut().enumerate() {
                            let x = _mm256_broadcast_ss(&*q.add(m * width + i));
                            a[0] = _mm256_fmadd_ps(x, k0, a[0]);
                            a[1] = _mm256_fmadd_ps(x, k1, a[1]);
                        }
                    }
                    for (m, a) in acc.iter().enumerate() {
                        let o = out.as_mut_ptr().add((first + m) * stride);
                        _mm256_storeu_ps(o, a[0]);
                        _mm256_storeu_ps(o.add(8), a[1]);
                    }
                }
                M
            }

            /// e^x on eight lanes (Cephes `expf`: x = n·ln 2 + r, a degree-5 polynomial for e^r, 2^n in the
            /// exponent bits); inputs below -87.3 give about 1e-38 instead of denormals, above 88.3 about 2e38 instead of
            /// infinity.
            #[inline]
            #[target_feature(enable = "avx2,fma,f16c")]
            fn exp8(x: __m256) -> __m256 {
                let x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3)), _mm256_set1_ps(88.3));
                let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
                    x,
                    _mm256_set1_ps(std::f32::consts::LOG2_E),
                ));
                let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
                let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
                let mut p = _mm256_set1_ps(1.987_569_1e-4);
                for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_65, 0.5] {
                    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
                }
                let p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0)));
                let bits = _mm256_slli_epi32::<23>(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)));
                _mm256_mul_ps(p, _mm256_castsi256_ps(bits))
            }

            /// `gate = gate · σ(a) · up`: SiLU's with `a = gate`, or with `GELU` the tanh GELU's, `0.5 · g · (1 +
            /// tanh(t)) = g · σ(2t)` with `t = √(2/π) · (g + 0.044715 · g³)`.
            ///
            /// # Safety
            /// `up` is as long as `gate`.
            #[target_feature(enable = "avx2,fma,f16c")]
            pub unsafe fn gated<const GELU: bool>(gate: &mut [f32], up: &[f32]) {
                use crate::kernels::{GELU_CUBIC, GELU_TWO_SQRT_2_OVER_PI as TWO_SQRT_2_OVER_PI};
                let one = _mm256_set1_ps(1.0);
                let done = gate.len() / 8 * 8;
                let mut chunks = gate.chunks_exact_mut(8);
                for (chunk, u) in (&mut chunks).zip(up.chunks_exact(8)) {
                    // SAFETY: both chunks hold eight floats.
                    unsafe {
                        let g = _mm256_loadu_ps(chunk.as_ptr());
                        let a = if GELU {
                            let g2 = _mm256_mul_ps(g, g);
                            let inner = _mm256_fmadd_ps(_mm256_set1_ps(GELU_CUBIC), g2, one);
                            _mm256_mul_ps(_mm256_mul_ps(g, inner), _mm256_set1_ps(TWO_SQRT_2_OVER_PI))
                        } else {
                            g
                        };
                        let e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), a));
                        let gated = _mm256_div_ps(g, _mm256_add_ps(one, e));
                        _mm256_storeu_ps(chunk.as_mut_ptr(), _mm256_mul_ps(gated, _mm256_loadu_ps(u.as_ptr())));
                    }
                }
                let rest = chunks.into_remainder();
                if GELU {
                    super::super::super::scalar::gelu_mul(rest, &up[done..]);
                } else {
                    super::super::super::scalar::silu_mul(rest, &up[done..]);
                }
            }

            #[target_feature(enable = "avx2,fma,f16c")]
            pub unsafe fn softmax(scores: &mut [f32]) {
                let mut chunks = scores.chunks_exact(8);
                let mut most = _mm256_set1_ps(f32::NEG_INFINITY);
                for chunk in &mut chunks {
                    // SAFETY: the chunk holds eight floats.
                    most = _mm256_max_ps(most, unsafe { _mm256_loadu_ps(chunk.as_ptr()) });
                }
                let mut lanes = [0f32; 8];
                // SAFETY: eight floats into eight.
                unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), most) };
                let max = lanes.into_iter().chain(chunks.remainder().iter().copied()).fold(f32::NEG_INFINITY, f32::max);
                // SAFETY: this function's features.
                let inverse = _mm256_set1_ps(1.0 / unsafe { exp_sum(scores, max) });
                let mut chunks = scores.chunks_exact_mut(8);
                for chunk in &mut chunks {
                    // SAFETY: the chunk holds eight floats.
                    unsafe {
                        _mm256_storeu_ps(chunk.as_mut_ptr(), _mm256_mul_ps(_mm256_loadu_ps(chunk.as_ptr()), inverse))
                    };
                }
                let inverse = _mm256_cvtss_f32(inverse);
                chunks.into_remainder().iter_mut().for_each(|s| *s *= inverse);
            }

            #[target_feature(enable = "avx2,fma,f16c")]
            unsafe fn exp_sum(scores: &mut [f32], max: f32) -> f32 {
                let (m, mut total) = (_mm256_set1_ps(max), _mm256_setzero_ps());
                let mut chunks = scores.chunks_exact_mut(8);
                for chunk in &mut chunks {
                    // SAFETY: the chunk holds eight floats.
                    unsafe {
                        let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(chunk.as_ptr()), m));
                        _mm256_storeu_ps(chunk.as_mut_ptr(), e);
                        total = _mm256_add_ps(total, e);
                    }
                }
                let mut sum = hsum(total);
                for s in chunks.into_remainder() {
                    *s = (*s - max).exp();
                    sum += *s;
                }
                sum
            }

            /// # Safety
            /// `(rows - 1) * stride + width ≤ src.len()` and `rows * width ≤ dst.len()`.
            #[target_feature(enable = "avx2,fma,f16c")]
            pub unsafe fn gather_f32(src: &[half::f16], stride: usize, width: usize, rows: usize, dst: &mut [f32]) {
                debug_assert!(rows * width <= dst.len());
                for j in 0..rows {
                    let (from, to) = (&src[j * stride..][..width], &mut dst[j * width..][..width]);
                    let mut i = 0;
                    while i + 8 <= width {
                        // SAFETY: i + 8 ≤ width, the length of both rows.
                        unsafe {
                            let h = _mm_loadu_si128(from.as_ptr().add(i).cast());
                            _mm256_storeu_ps(to.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
                        }
                        i += 8;
                    }
                    for k in i..width {
                        to[k] = from[k].to_f32();
                    }
                }
            }

            /// The operands of one `block_values` call besides its output.
            struct Values<'a> {
                width: usize,
                weights: &'a [f32],
                stride: usize,
                rows: usize,
                values: &'a [f32],
            }

            /// # Safety
            /// `width` is a non-zero multiple of 8, `out` holds whole rows of `width`, `values` holds `rows` rows
            /// of `width` and `weights` holds `rows` floats at `n · stride` for every query `n`.
            #[target_feature(enable = "avx2,fma,f16c")]
            pub unsafe fn block_values(
                out: &mut [f32],
                width: usize,
                weights: &[f32],
                stride: usize,
                rows: usize,
                values: &[f32],
            ) {
                let (v, queries) = (Values { width, weights, stride, rows, values }, out.len() / width);
                // Columns in chunks of up to 32 (four registers), queries two at a time.
                let mut c0 = 0;
                while c0 < width {
                    let c = ((width - c0) / 8).min(4);
                    let mut first = 0;
                    while first < queries {
                        let q = (queries - first).min(2);
                        let tile: unsafe fn(&mut [f32], &Values<'_>, usize, usize) = match (q, c) {
                            (2, 4) => values_tile::<2, 4>,
                            (2, 3) => values_tile::<2, 3>,
                            (2, 2) => values_tile::<2, 2>,
                            (2, _) => values_tile::<2, 1>,
                            (_, 4) => values_tile::<1, 4>,
                            (_, 3) => values_tile::<1, 3>,
                            (_, 2) => values_tile::<1, 2>,
                            _ => values_tile::<1, 1>,
                        };
                        // SAFETY: queries first..first + q and columns c0..c0 + 8c are within the caller's bounds.
                        unsafe { tile(out, &v, first, c0) };
                        first += q;
                    }
                    c0 += 8 * c;
                }
            }

            /// Columns `c0..c0 + 8C` of queries `first..first + Q`: a row of values is loaded once for the
            /// queries, which accumulate in registers; each query's sum runs over the rows in order.
            #[target_feature(enable = "avx2,fma,f16c")]
            unsafe fn values_tile<const Q: usize, const C: usize>(
                out: &mut [f32],
                v: &Values<'_>,
                first: usize,
                c0: usize,
            ) {
                let Values { width, weights, stride, rows, values } = *v;
                // SAFETY: queries first..first + Q have rows of `width` in `out` and `rows` weights at their
                // stride; columns c0..c0 + 8C are within every row of `values` (the caller's bounds).
                unsafe {
                    let base = out.as_mut_ptr();
                    let o = |q: usize| base.add((first + q) * width + c0);
                    // Loops rather than `array::from_fn`, whose closures would not be compiled with this
                    // function's features.
                    let mut acc = [[_mm256_setzero_ps(); C]; Q];
                    for (q, a) in acc.iter_mut().enumerate() {
                        for (c, a) in a.iter_mut().enumerate() {
                            *a = _mm256_loadu_ps(o(q).add(8 * c));
                        }
                    }
                    for j in 0..rows {
                        let row = values.as_ptr().add(j * width + c0);
                        let mut vr = [_mm256_setzero_ps(); C];
                        for (c, v) in vr.iter_mut().enumerate() {
                            *v = _mm256_loadu_ps(row.add(8 * c));
                        }
                        for (q, a) in acc.iter_mut().enumerate() {
                            let w = _mm256_broadcast_ss(&*weights.as_ptr().add((first + q) * stride + j));
                            for (a, x) in a.iter_mut().zip(vr) {
                                *a = _mm256_fmadd_ps(w, x, *a);
                            }
                        }
                    }
                    for (q, a) in acc.iter().enumerate() {
                        for (c, a) in a.iter().enumerate() {
                            _mm256_storeu_ps(o(q).add(8 * c), *a);
                        }
                    }
                }
            }
        }

        kernels!(avx2, "avx2,fma,f16c", dot_u8_i8_avx2, q4_1, q8_0);
        kernels!(vnni, "avx2,fma,f16c,avx512vnni,avx512vl", dot_u8_i8_vnni, q4_1, q8_0);
    }

    #[cfg(target_arch = "aarch64")]
    mod arm {
        use std::arch::aarch64::*;

        use super::super::*;

        /// Σ a·b over 16 signed bytes, added pairwise into four 32-bit lanes of `acc`.
        #[inline]
        #[target_feature(enable = "neon")]
        fn dot16(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
            let lo = vmull_s8(vget_low_s8(a), vget_low_s8(b));
            let hi = vmull_high_s8(a, b);
            vpadalq_s16(vpadalq_s16(acc, lo), hi)
        }

        #[target_feature(enable = "neon")]
        pub unsafe fn q4_1_row(row: &[u8], x: &Rows<'_>, out: &mut [f32]) {
            let blocks = x.cols / QK;
            for t0 in (0..x.rows).step_by(TILE) {
                let tiles = (x.rows - t0).min(TILE);
                let mut acc = [vdupq_n_f32(0.0); TILE];
                let mut offset = [0f32; TILE];
                for b in 0..blocks {
                    let w = &row[b * Q4_1_BYTES..][..Q4_1_BYTES];
                    let (d, m) = (f16_at(w, 0), f16_at(w, 2));
                    // SAFETY: `w` holds 20 bytes; bytes 4..20 are the 16 bytes of nibbles.
                    let packed = unsafe { vld1q_u8(w.as_ptr().add(4)) };
                    // Nibbles are 0..16, so reading them as signed bytes keeps their values.
                    let lo = vreinterpretq_s8_u8(vandq_u8(packed, vdupq_n_u8(0x0f)));
                    let hi = vreinterpretq_s8_u8(vshrq_n_u8(packed, 4));
                    for i in 0..tiles {
                        let xb = (t0 + i) * blocks + b;
                        // SAFETY: block `xb` has 32 quantized values.
                        let (q0, q1) = unsafe {
                            let q = x.q.as_ptr().add(xb * QK);
                            (vld1q_s8(q), vld1q_s8(q.add(16)))
                        };
                        let isum = dot16(dot16(vdupq_n_s32(0), lo, q0), hi, q1);
                        acc[i] = vmlaq_n_f32(acc[i], vcvtq_f32_s32(isum), d * x.d[xb]);
                        offset[i] += m * x.s[xb];
                    }
                }
                for i in 0..tiles {
                    out[t0 + i] = vaddvq_f32(acc[i]) + offset[i];
                }
            }
        }

        #[target_feature(enable = "neon")]
        pub unsafe fn q8_0_row(row: &[u8], x: &Rows<'_>, out: &mut [f32]) {
            let blocks = x.cols / QK;
            for t0 in (0..x.rows).step_by(TILE) {
                let tiles = (x.rows - t0).min(TILE);
                let mut acc = [vdupq_n_f32(0.0); TILE];
                for b in 0..blocks {
                    let w = &row[b * Q8_0_BYTES..][..Q8_0_BYTES];
                    let d = f16_at(w, 0);
                    // SAFETY: `w` holds 34 bytes; bytes 2..34 are the 32 quantized weights.
                    let (w0, w1) = unsafe { (vld1q_s8(w.as_ptr().add(2).cast()), vld1q_s8(w.as_ptr().add(18).cast())) };
                    for i in 0..tiles {
                        let xb = (t0 + i) * blocks + b;
                        // SAFETY: block `xb` has 32 quantized values.
                        let (q0, q1) = unsafe {
                            let q = x.q.as_ptr().add(xb * QK);
                            (vld1q_s8(q), vld1q_s8(q.add(16)))
                        };
                        let isum = dot16(dot16(vdupq_n_s32(0), w0, q0), w1, q1);
                        acc[i] = vmlaq_n_f32(acc[i], vcvtq_f32_s32(isum), d * x.d[xb]);
                    }
                }
                for i in 0..tiles {
                    out[t0 + i] = vaddvq_f32(acc[i]);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic pseudo-random floats in [-1, 1).
    fn noise(n: usize, seed: u64) -> Vec<f32> {
        let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// `w` (`n` rows of `k`) quantized by candle, an implementation independent of these kernels.
    fn quantize(format: Format, w: &[f32], n: usize, k: usize) -> Vec<u8> {
        let t = candle_core::Tensor::from_slice(w, (n, k), &candle_core::Device::Cpu).unwrap();
        candle_core::quantized::QTensor::quantize(&t, format.ggml()).unwrap().data().unwrap().into_owned()
    }

    /// candle's dequantization of the same bytes.
    fn dequantize(format: Format, bytes: &[u8], n: usize, k: usize) -> Vec<f32> {
        use candle_core::quantized::{QStorage, QTensor};
        let storage =
            QStorage::from_data(std::borrow::Cow::Borrowed(bytes), &candle_core::Device::Cpu, format.ggml()).unwrap();
        let t = QTensor::new(storage, (n, k)).unwrap();
        t.dequantize(&candle_core::Device::Cpu).unwrap().flatten_all().unwrap().to_vec1().unwrap()
    }

    const FORMATS: [Format; 7] =
        [Format::Q4_0, Format::Q4_1, Format::Q5_0, Format::Q8_0, Format::Q4K, Format::Q5K, Format::Q6K];

    /// The naive reference: weights dequantized by candle, activations as floats, multiplied in f32.
    fn naive(w: &[f32], cols: usize, x: &[f32], rows: usize) -> Vec<f32> {
        let n = w.len() / cols;
        let mut out = vec![0f32; rows * n];
        for (i, w) in w.chunks_exact(cols).enumerate() {
            for t in 0..rows {
                out[t * n + i] = w.iter().zip(&x[t * cols..(t + 1) * cols]).map(|(a, b)| a * b).sum();
            }
        }
        out
    }

    fn check(format: Option<Format>, rows: usize, n: usize, k: usize) {
        let w = noise(n * k, 1);
        let x = noise(rows * k, 2);
        let (data, dequantized) = match format {
            Some(f) => {
                let bytes = quantize(f, &w, n, k);
                let dequantized = dequantize(f, &bytes, n, k);
                (WeightData::Quant(f, bytes), dequantized)
            }
            None => (WeightData::F32(w.clone()), w),
        };
        let m = Matrix { rows: n, cols: k, data };
        // Rows read back as candle reads them.
        let mut row = vec![0f32; k];
        for nn in [0, n / 2, n - 1] {
            m.row(nn, &mut row);
            for (j, (a, b)) in row.iter().zip(&dequantized[nn * k..]).enumerate() {
                assert!((a - b).abs() <= 1e-6 * (1.0 + b.abs()), "{format:?} row {nn} [{j}]: {a} vs candle {b}");
            }
        }
        let expected = naive(&dequantized, k, &x, rows);
        let q = Quantized::new(&x, rows, k);
        let mut got = vec![0f32; rows * n];
        m.matmul(&q, &mut got);
        // The error bound comes from quantizing activations to 8 bits: |x| < 1, so per element ≤ d/2 ≈ 1/254.
        let tol = 0.01 * (k as f32).sqrt();
        for (i, (a, b)) in got.iter().zip(&expected).enumerate() {
            assert!((a - b).abs() < tol, "{format:?} {rows}x{n}x{k} [{i}]: {a} vs {b}");
        }
        if let Some(f) = format.filter(|_| n.is_multiple_of(interleaved::ROWS)) {
            check_interleaved(f, &m, &q, &expected, tol);
        }
        // Every SIMD level this CPU has agrees closely with the portable path (same integer sums, float
        // rounding aside).
        let WeightData::Quant(format, bytes) = &m.data else { return };
        let size = format.row_bytes(k);
        let (mut scalar, mut simd) = (vec![0f32; rows], vec![0f32; rows]);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        let mut first_level: Vec<Vec<u32>> = vec![];
        for level in simd::levels().into_iter().filter(|l| *l != simd::Level::Scalar) {
            for (p, nn) in [0, n / 2, n - 1].into_iter().enumerate() {
                let row = &bytes[nn * size..(nn + 1) * size];
                let x = q.window(0..rows);
                match format {
                    Format::Q4_1 => {
                        scalar::q4_1_row(row, &x, &mut scalar);
                        simd::q4_1_row_at(level, row, &x, &mut simd);
                    }
                    _ => {
                        blocks::scalar_row(*format, row, &x, &mut scalar);
                        simd::unit_rows_at(level, *format, [row], &x, &mut [&mut simd]);
                        // Two rows at once give each row exactly what it gets alone.
                        let other = &bytes[(n - 1 - nn) * size..(n - nn) * size];
                        let (mut first, mut second) = (vec![0f32; rows], vec![0f32; rows]);
                        simd::unit_rows_at(level, *format, [row, other], &x, &mut [&mut first, &mut second]);
                        assert_eq!(bits(&first), bits(&simd), "{format:?} {level:?}: a row beside another");
                        simd::unit_rows_at(level, *format, [other], &x, &mut [&mut first]);
                        assert_eq!(bits(&first), bits(&second), "{format:?} {level:?}: a row beside another");
                        // And four (`matmul_all`'s tile), which take fewer activation rows at a time.
                        let mut four = [vec![0f32; rows], vec![0f32; rows], vec![0f32; rows], vec![0f32; rows]];
                        let [a, b, c, d] = &mut four;
                        simd::unit_rows_at(level, *format, [other, row, other, row], &x, &mut [a, b, c, d]);
                        assert_eq!(bits(&four[1]), bits(&simd), "{format:?} {level:?}: a row among four");
                        assert_eq!(bits(&four[2]), bits(&second), "{format:?} {level:?}: a row among four");
                        // And each activation row gets alone what it gets in a tile of many (Q8_0 from the
                        // kernel that takes steps of fewer than four rows).
                        for t in 0..rows {
                            let mut alone = [0f32];
                            let x = q.window(t..t + 1);
                            simd::unit_rows_at(level, *format, [row], &x, &mut [&mut alone]);
                            assert_eq!(alone[0].to_bits(), simd[t].to_bits(), "{format:?} {level:?}: row {t} alone");
                            if *format == Format::Q8_0 {
                                simd::q8_0_row_at(level, row, &x, &mut alone);
                                assert_eq!(
                                    alone[0].to_bits(),
                                    simd[t].to_bits(),
                                    "Q8_0 {level:?}: row {t}, one-row kernel"
                                );
                            }
                        }
                    }
                }
                // Every SIMD level sums the same integers in the same float order (the VNNI level's biased
                // weights included), so the instruction set a worker runs on never changes a result.
                if *format != Format::Q4_1 {
                    match first_level.get(p) {
                        Some(earlier) => assert_eq!(&bits(&simd), earlier, "{format:?} {level:?}: row {nn}"),
                        None => first_level.push(bits(&simd)),
                    }
                }
                for t in 0..rows {
                    let (a, b) = (simd[t], scalar[t]);
                    assert!((a - b).abs() <= 1e-3 * (1.0 + b.abs()), "{format:?} {level:?}: {a} vs scalar {b}");
                }
            }
        }
    }

    /// The interleaved layout of `m`: the same rows, bit for bit; the product within `tol` of `expected`; and
    /// every level, the portable one included, giving the same bits for each activation row, alone or in a
    /// step of many.
    fn check_interleaved(format: Format, m: &Matrix, q: &Quantized<'_>, expected: &[f32], tol: f32) {
        let (n, k, rows) = (m.rows, m.cols, q.rows);
        let im = m.clone().interleaved();
        let WeightData::Interleaved(_, tiles) = &im.data else { panic!("{format:?} was not interleaved") };
        let (mut a, mut b) = (vec![0f32; k], vec![0f32; k]);
        for nn in 0..n {
            m.row(nn, &mut a);
            im.row(nn, &mut b);
            let first = a.iter().zip(&b).position(|(a, b)| a.to_bits() != b.to_bits());
            assert_eq!(first, None, "{format:?}: interleaved row {nn} differs");
        }
        let mut got = vec![0f32; rows * n];
        im.matmul(q, &mut got);
        for (i, (a, b)) in got.iter().zip(expected).enumerate() {
            assert!((a - b).abs() < tol, "{format:?} interleaved {rows}x{n}x{k} [{i}]: {a} vs {b}");
        }
        let size = interleaved::group_bytes(format, k);
        let x = q.window(0..rows);
        for level in simd::levels() {
            for (g, group) in tiles.chunks_exact(size).enumerate() {
                let mut out = vec![0f32; rows * interleaved::ROWS];
                simd::interleaved_rows_at(level, format, group, &x, &mut out);
                for t in 0..rows {
                    for r in 0..interleaved::ROWS {
                        let (a, b) = (out[t * interleaved::ROWS + r], got[t * n + g * interleaved::ROWS + r]);
                        assert_eq!(a.to_bits(), b.to_bits(), "{format:?} {level:?}: row {r} of group {g}, t {t}");
                    }
                    let mut alone = [0f32; interleaved::ROWS];
                    simd::interleaved_rows_at(level, format, group, &q.window(t..t + 1), &mut alone);
                    assert_eq!(alone[..], out[t * interleaved::ROWS..][..interleaved::ROWS], "{level:?}: t {t} alone");
                }
            }
        }
    }

    #[test]
    fn matmul_matches_the_naive_reference() {
        for format in FORMATS.map(Some).into_iter().chain([None]) {
            let shapes: &[(usize, usize, usize)] = if format.is_some_and(|f| f.block_elems() == blocks::QK_K) {
                &[(1, 1, 256), (1, 37, 512), (3, 17, 256), (3, 8, 256), (5, 33, 768), (16, 40, 1536), (64, 8, 256)]
            } else {
                &[
                    (1, 1, 32),
                    (1, 37, 64),
                    (3, 17, 96),
                    (3, 16, 96),
                    (4, 16, 576),
                    (5, 33, 576),
                    (16, 40, 1536),
                    (64, 8, 64),
                ]
            };
            for &(rows, n, k) in shapes {
                check(format, rows, n, k);
            }
        }
    }

    #[test]
    fn q8_0_weights_of_minus_128_are_exact_on_every_level() {
        // candle's quantizer never writes -128, but a file may: the VNNI kernel reads it as 0 + 128.
        let (n, k, rows) = (8, 64, 5);
        let mut bytes = vec![];
        for r in 0..n {
            for b in 0..k / QK {
                bytes.extend(half::f16::from_f32(0.01 * (r + 1) as f32).to_le_bytes());
                bytes.extend((0..QK).map(|j| if (j + b + r) % 3 == 0 { 0x80 } else { (j * 37 % 256) as u8 }));
            }
        }
        let x = noise(rows * k, 3);
        let q = Quantized::new(&x, rows, k);
        let window = q.window(0..rows);
        let size = Format::Q8_0.row_bytes(k);
        let interleaved =
            Matrix { rows: n, cols: k, data: WeightData::Quant(Format::Q8_0, bytes.clone()) }.interleaved();
        for r in 0..n {
            let row = &bytes[r * size..(r + 1) * size];
            // The exact sum, in f64 from the same quantized activations.
            let expected: Vec<f64> = (0..rows)
                .map(|t| {
                    (0..k / QK)
                        .map(|b| {
                            let w = &row[b * size / (k / QK)..];
                            let d = f64::from(half::f16::from_le_bytes([w[0], w[1]]).to_f32());
                            let dot: i32 =
                                (0..QK).map(|j| i32::from(w[2 + j] as i8) * i32::from(q.q[t * k + b * QK + j])).sum();
                            d * f64::from(q.d[t * k / QK + b]) * f64::from(dot)
                        })
                        .sum()
                })
                .collect();
            let mut levels = vec![];
            for level in simd::levels().into_iter().filter(|l| *l != simd::Level::Scalar) {
                let (mut generic, mut one_row) = (vec![0f32; rows], vec![0f32; rows]);
                simd::unit_rows_at(level, Format::Q8_0, [row], &window, &mut [&mut generic]);
                simd::q8_0_row_at(level, row, &window, &mut one_row);
                assert_eq!(generic, one_row, "{level:?}: the one-row kernel");
                for (g, e) in generic.iter().zip(&expected) {
                    assert!((f64::from(*g) - e).abs() <= 1e-4 * (1.0 + e.abs()), "{level:?}: {g} vs {e}");
                }
                levels.push(generic);
            }
            assert!(levels.windows(2).all(|w| w[0] == w[1]), "the levels differ: {levels:?}");
            // The interleaved layout (eight rows: one group) on every level, the portable one included.
            let WeightData::Interleaved(_, tiles) = &interleaved.data else { panic!("not interleaved") };
            for level in simd::levels() {
                let mut out = vec![0f32; rows * interleaved::ROWS];
                simd::interleaved_rows_at(level, Format::Q8_0, tiles, &window, &mut out);
                for (t, e) in expected.iter().enumerate() {
                    let g = out[t * interleaved::ROWS + r];
                    assert!((f64::from(g) - e).abs() <= 1e-4 * (1.0 + e.abs()), "{level:?} interleaved: {g} vs {e}");
                }
            }
        }
    }

    #[test]
    fn several_matrices_in_one_job_equal_each_alone() {
        // Mixed types and sizes on the same activations, one row (written in place) and several (transposed).
        for rows in [1, 3, 9] {
            let k = 96;
            let x = noise(rows * k, 3);
            let q = Quantized::new(&x, rows, k);
            let matrices = [
                Matrix {
                    rows: 40,
                    cols: k,
                    data: WeightData::Quant(Format::Q4_1, quantize(Format::Q4_1, &noise(40 * k, 4), 40, k)),
                },
                Matrix {
                    rows: 7,
                    cols: k,
                    data: WeightData::Quant(Format::Q5_0, quantize(Format::Q5_0, &noise(7 * k, 5), 7, k)),
                },
                Matrix { rows: 130, cols: k, data: WeightData::F32(noise(130 * k, 6)) },
                // Interleaved, 24 rows: three groups of eight (split between tasks in whole groups when it is
                // multiplied alone).
                Matrix {
                    rows: 24,
                    cols: k,
                    data: WeightData::Quant(Format::Q8_0, quantize(Format::Q8_0, &noise(24 * k, 7), 24, k)),
                }
                .interleaved(),
            ];
            let alone: Vec<Vec<f32>> = matrices
                .iter()
                .map(|m| {
                    let mut out = vec![0f32; rows * m.rows];
                    m.matmul(&q, &mut out);
                    out
                })
                .collect();
            let mut outs: Vec<Vec<f32>> = matrices.iter().map(|m| vec![f32::NAN; rows * m.rows]).collect();
            let [a, b, c, d] = &mut outs[..] else { unreachable!() };
            let m = &matrices;
            Matrix::matmul_all(&q, &mut [(&m[0], a), (&m[1], b), (&m[2], c), (&m[3], d)]);
            for ((together, alone), m) in outs.iter().zip(&alone).zip(&matrices) {
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(together), bits(alone), "{rows} rows");
                // And both are the product (the one-job path is the same code, so check it on its own too).
                let tol = 0.01 * (k as f32).sqrt();
                let mut w = vec![0f32; m.rows * k];
                for (n, row) in w.chunks_exact_mut(k).enumerate() {
                    m.row(n, row);
                }
                for (a, b) in together.iter().zip(naive(&w, k, &x, rows)) {
                    assert!((a - b).abs() < tol, "{rows} rows: {a} vs {b}");
                }
            }
        }
    }

    #[test]
    fn attention_helpers_match_the_portable_path() {
        for n in [1, 7, 16, 64, 100] {
            let b = noise(n, 5);
            let (mut b16, mut back) = (vec![f16::ZERO; n], vec![0f32; n]);
            to_f16(&b, &mut b16);
            to_f32(&b16, &mut back);
            for (x, y) in b.iter().zip(&back) {
                // f16 keeps 11 significant bits.
                assert!((x - y).abs() <= x.abs() / 2048.0 + 1e-7, "{x} stored as {y}");
            }
        }
        // Queries against a block of keys (stored dimension by dimension), and each query's weighted sum of the
        // first `seen` values, for widths on and off the SIMD path and query counts around the SIMD tile.
        for (width, queries) in
            [(64, 1), (64, 5), (64, 16), (128, 7), (96, 4), (8, 3), (12, 9), (200, 2), (3, 13), (80, 3), (56, 5)]
        {
            let (q, keys, values) =
                (noise(width * queries, 4), noise(width * BLOCK_KEYS, 5), noise(width * BLOCK_KEYS, 6));
            let stride = BLOCK_KEYS + 3;
            let (mut got, mut portable) = (vec![f32::NAN; queries * stride], vec![f32::NAN; queries * stride]);
            block_scores(&q, width, &keys, &mut got, stride);
            scalar::block_scores(&q, width, &keys, &mut portable, stride);
            for (n, j) in (0..queries).flat_map(|n| (0..BLOCK_KEYS).map(move |j| (n, j))) {
                let (g, p) = (got[n * stride + j], portable[n * stride + j]);
                let exact: f32 = (0..width).map(|i| q[n * width + i] * keys[i * BLOCK_KEYS + j]).sum();
                assert!((g - exact).abs() <= 1e-5 * width as f32, "scores {width}x{queries}[{n}][{j}]: {g} vs {exact}");
                assert!(
                    (g - p).abs() <= 1e-5 * width as f32,
                    "scores {width}x{queries}[{n}][{j}]: {g} vs portable {p}"
                );
            }
            // The last query's scores are the same alone as beside others (batching does not change an answer).
            let mut alone = vec![0f32; BLOCK_KEYS];
            block_scores(&q[(queries - 1) * width..], width, &keys, &mut alone, BLOCK_KEYS);
            let beside = &got[(queries - 1) * stride..][..BLOCK_KEYS];
            assert_eq!(
                alone.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                beside.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
            );
            // Each query sees a different number of the block's rows; the weights of the others are zero.
            let rows = BLOCK_KEYS - 2;
            let mut weights = noise(queries * stride, 7);
            let seen: Vec<usize> = (0..queries).map(|n| (n * 5 + 1) % (rows + 1)).collect();
            for (n, &s) in seen.iter().enumerate() {
                weights[n * stride + s..(n + 1) * stride].fill(0.0);
            }
            let start = noise(width * queries, 8);
            let (mut out, mut reference) = (start.clone(), start.clone());
            block_values(&mut out, width, &weights, stride, rows, &values);
            scalar::block_values(&mut reference, width, &weights, stride, rows, &values);
            for (n, i) in (0..queries).flat_map(|n| (0..width).map(move |i| (n, i))) {
                let (o, r) = (out[n * width + i], reference[n * width + i]);
                let exact = start[n * width + i]
                    + (0..seen[n]).map(|j| weights[n * stride + j] * values[j * width + i]).sum::<f32>();
                assert!((o - r).abs() <= 1e-5 * rows as f32, "values {width}x{queries}[{n}][{i}]: {o} vs portable {r}");
                assert!((o - exact).abs() <= 1e-5 * rows as f32, "values {width}x{queries}[{n}][{i}]: {o} vs {exact}");
            }
            // The last query's output is the same alone, over only the rows it sees, as beside others.
            let last = queries - 1;
            let mut alone = start[last * width..].to_vec();
            block_values(&mut alone, width, &weights[last * stride..], stride, seen[last], &values);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&alone), bits(&out[last * width..]), "values {width}x{queries}: the last query alone");
        }
        // Gathering rows of a KV block from f16.
        let (width, stride, rows) = (64, 192, 16);
        let block: Vec<f16> = noise(stride * rows, 8).iter().map(|&x| f16::from_f32(x)).collect();
        let mut gathered = vec![0f32; width * rows];
        gather_f32(&block[64..], stride, width, &mut gathered);
        for j in 0..rows {
            for i in 0..width {
                assert_eq!(gathered[j * width + i], block[64 + j * stride + i].to_f32(), "gather [{j}][{i}]");
            }
        }
    }

    #[test]
    fn the_vector_softmax_matches_the_library_exponential() {
        let mut xs: Vec<f32> = (0..2000).map(|i| -(i as f32) * 0.05).collect(); // 0 down to -100
        xs.extend([1.5, 0.25, -1e-6, f32::NEG_INFINITY]);
        let max = 1.5;
        let (mut got, mut portable) = (xs.clone(), xs.clone());
        softmax(&mut got);
        scalar::softmax(&mut portable);
        let total: f64 = xs.iter().map(|x| f64::from(x - max).exp()).sum();
        // The largest score's weight is 1 / total, so each weight over it is the exponential alone (within the
        // rounding of one product).
        let top = got[2000];
        assert!((f64::from(top) - 1.0 / total).abs() <= 1e-6 / total, "{top} vs {}", 1.0 / total);
        for ((g, p), x) in got.iter().zip(&portable).zip(&xs) {
            let want = (x - max).exp();
            if x - max > -80.0 {
                let e = g / top;
                assert!((e - want).abs() <= 6.0 * f32::EPSILON * want, "exp({}) = {e}, expected {want}", x - max);
            }
            assert!((g - p).abs() <= 1e-5 * p + 1e-37, "{g} vs portable {p}");
        }
        assert!((got.iter().map(|&g| f64::from(g)).sum::<f64>() - 1.0).abs() < 1e-5);
    }

    #[test]
    fn the_vector_activation_matches_the_library_one() {
        let mut gate: Vec<f32> = (0..2003).map(|i| (i as f32 - 1000.0) * 0.1).collect(); // -100 to 100
        let up = noise(gate.len(), 9);
        let want: Vec<f32> = gate.iter().zip(&up).map(|(g, u)| g / (1.0 + (-g).exp()) * u).collect();
        let mut gelu = gate.clone();
        silu_mul(&mut gate, &up);
        for (i, (g, w)) in gate.iter().zip(&want).enumerate() {
            assert!((g - w).abs() <= 8.0 * f32::EPSILON * w.abs() + 1e-30, "silu [{i}]: {g} vs {w}");
        }
        // GELU against f64, as `g · σ(2t)`: the tanh form `0.5 · g · (1 + tanh(t))` loses every digit to
        // cancellation for negative inputs (in f32 from about -3, in f64 from about -9).
        let want: Vec<f64> = gelu
            .iter()
            .zip(&up)
            .map(|(&g, &u)| {
                let (g, u) = (f64::from(g), f64::from(u));
                let t = (2.0 / std::f64::consts::PI).sqrt() * (g + 0.044_715 * g * g * g);
                g / (1.0 + (-2.0 * t).exp()) * u
            })
            .collect();
        gelu_mul(&mut gelu, &up);
        for (i, (&g, w)) in gelu.iter().zip(&want).enumerate() {
            let err = (f64::from(g) - w).abs();
            // σ(2t) far in its tail is e^-2t, whose relative error is that of 2t in f32 times |2t| (up to ~100).
            assert!(err <= 2e-5 * w.abs() + 1e-30, "gelu [{i}]: {g} vs {w}");
        }
        // A prompt's worth, spread over the cores, equals the same on one.
        let big = noise(5 * ACTIVATION_CHUNK + 3, 10);
        let (mut spread, mut one) = (big.clone(), big.clone());
        gelu_mul(&mut spread, &big);
        for (g, u) in one.chunks_mut(8).zip(big.chunks(8)) {
            gelu_mul(g, u);
        }
        assert_eq!(spread, one);
    }
}
