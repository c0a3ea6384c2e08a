//! The device path: the same architectures on candle's tensors, so that a model runs on an NVIDIA GPU (and, for
//! the tests that compare it with the fast CPU kernels, on candle's CPU device).
//!
//! It serves the same scheduler as the CPU kernels: a step is the rows of every sequence in the batch, and the
//! KV cache is paged in the same blocks, handed out by the same [`KvPool`] (its bookkeeping only). What differs is
//! where things live:
//! - the linear layers are candle `QMatMul`s in the file's block format (or re-quantized at load) on the layer's
//!   device, the norms and biases f32 tensors beside them;
//! - each layer's keys and values are one f16 tensor per kind on its device, a row per position of the pool
//!   (`block · BLOCK_SIZE + slot`); a step scatters its new rows in, and each sequence gathers its own rows back;
//! - attention runs per sequence against its own blocks (a sequence's queries of one key-value head attend
//!   together, so grouped-query attention does not repeat the keys for each query head);
//! - the token embedding is looked up on the host, and sampling stays on the host: the step returns logits.
//!
//! `model_provider.gpu_layers` places the last N layers on the GPU, as llama.cpp's `--n-gpu-layers` does, and the
//! first ones on candle's CPU device (slower than the engine's own kernels: a model that fits is best all on the
//! GPU); the output projection goes where the last layer is, so it is on the GPU whenever any layer is.

use std::{fs::File, path::Path};

use candle_core::{
    DType, Device, Module, Tensor,
    quantized::{QMatMul, QTensor, gguf_file::Content},
};

use super::{
    Activation, Angles, BLOCK_SIZE, Block, Model, ModelConfig, Parts, Quantization, RopeLayout, Step, Store, Weights,
    requantize_to,
};
use crate::{Error, Result, kernels::Format, kv::F16_MAX};

/// The device path's parts: `QMatMul`s and f32 tensors on a candle device.
pub struct Tensors;

impl Parts for Tensors {
    type Matrix = QMatMul;
    type Vector = Tensor;
}

/// Reads a model's tensors onto the device of each layer.
struct DeviceWeights<'a> {
    host: Weights<'a>,
    /// The device of each layer; the output projection and the final norm go on the last layer's.
    devices: &'a [Device],
}

impl DeviceWeights<'_> {
    fn last(&self) -> &Device {
        self.devices.last().unwrap_or(&Device::Cpu)
    }

    /// A matrix of `rows × cols` on `device`, in its stored format or re-quantized as `model_provider.quantization`
    /// says (F16, BF16 and F32 become f32 tensors, as on the CPU).
    fn matrix(&mut self, name: &str, rows: usize, cols: usize, device: &Device) -> Result<QMatMul> {
        let host = &mut self.host;
        let info = host.content.tensor_infos.get(name).ok_or_else(|| host.missing(name))?;
        if info.shape.dims() != [rows, cols] {
            return Err(host.bad(name, &format!("has shape {:?}, expected {rows}×{cols}", info.shape.dims())));
        }
        let dtype = info.ggml_dtype;
        let failed = |e: candle_core::Error| host_error(host.path, name, device, e);
        let matrix = match requantize_to(dtype, 2, cols, host.quantization) {
            Some(target) => {
                let wide = host.content.tensor(host.file, name, &Device::Cpu).and_then(|t| t.dequantize(&Device::Cpu));
                wide.and_then(|t| QTensor::quantize_onto(&t, target.ggml(), device)).and_then(QMatMul::from_qtensor)
            }
            // Wide weights stay f16 on a GPU (its matrix units multiply f16, at half the memory of f32); the CPU
            // device widens them to f32, as the kernels do.
            None if Format::from_ggml(dtype).is_none() && !device.is_cpu() => host
                .content
                .tensor(host.file, name, device)
                .and_then(|t| t.dequantize_f16(device))
                .map(QMatMul::TensorF16),
            None => host.content.tensor(host.file, name, device).and_then(QMatMul::from_qtensor),
        };
        matrix.map_err(failed)
    }

    /// A vector of `len` floats on `device`.
    fn vector(&mut self, name: &str, len: usize, device: &Device) -> Result<Tensor> {
        let values = self.host.vector(name, len)?;
        Tensor::from_vec(values, len, device).map_err(|e| host_error(self.host.path, name, device, e))
    }
}

/// A tensor that could not be put on its device.
fn host_error(path: &Path, name: &str, device: &Device, e: candle_core::Error) -> Error {
    Error::ModelLoad {
        path: path.to_owned(),
        message: format!("tensor `{name}` cannot be loaded onto {}: {e}", device_name(device)),
    }
}

/// `cpu` or `cuda:N`.
pub(crate) fn device_name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

impl Store for DeviceWeights<'_> {
    type Parts = Tensors;

    fn content(&self) -> &Content {
        self.host.content
    }

    fn layer_matrix(&mut self, layer: usize, name: &str, rows: usize, cols: usize) -> Result<QMatMul> {
        let device = self.devices[layer].clone();
        self.matrix(&format!("blk.{layer}.{name}.weight"), rows, cols, &device)
    }

    fn layer_vector(&mut self, layer: usize, name: &str, len: usize) -> Result<Tensor> {
        let device = self.devices[layer].clone();
        self.vector(&format!("blk.{layer}.{name}"), len, &device)
    }

    fn output_norm(&mut self, len: usize) -> Result<Tensor> {
        let device = self.last().clone();
        self.vector("output_norm.weight", len, &device)
    }

    /// The output projection on the last layer's device; a tied one is the embedding's matrix, loaded there too
    /// (the host keeps its own copy for looking tokens up).
    fn output(&mut self, c: &ModelConfig) -> Result<Option<QMatMul>> {
        let name = if self.has("output.weight") { "output.weight" } else { "token_embd.weight" };
        let device = self.last().clone();
        self.matrix(name, c.vocab, c.n_embd, &device).map(Some)
    }

    fn embedding(&mut self, c: &ModelConfig) -> Result<crate::kernels::Matrix> {
        self.host.embedding(c)
    }
}

/// A model on the device path, with the keys and values of its KV-cache pool.
pub struct DeviceModel {
    model: Model<Tensors>,
    /// Each layer's keys and values, `[blocks · BLOCK_SIZE, kv_dim]` in f16 on the layer's device.
    kv: Vec<[Tensor; 2]>,
    devices: Vec<Device>,
}

/// One sequence's part of a step: its rows, and the positions its queries read.
struct Span {
    /// The step (sequence) whose rows these are.
    step: usize,
    first_row: usize,
    rows: usize,
    /// The position of its first new token.
    start: usize,
}

impl DeviceModel {
    /// Loads the architecture `general.architecture` names with layer `l` on `devices[l]`, and a KV-cache pool of
    /// `kv_blocks` blocks beside the layers.
    pub fn load(
        content: &Content,
        file: &mut File,
        path: &Path,
        max_positions: usize,
        quantization: Quantization,
        devices: Vec<Device>,
        kv_blocks: usize,
    ) -> Result<Self> {
        let config = ModelConfig::read(content)?;
        if devices.len() != config.n_layer {
            return Err(Error::Internal(format!("{} devices for {} layers", devices.len(), config.n_layer)));
        }
        let mut weights = DeviceWeights { host: Weights { content, file, path, quantization }, devices: &devices };
        let model = Model::read(&mut weights, max_positions)?;
        let kv = devices
            .iter()
            .map(|device| {
                let zeros = || Tensor::zeros((kv_blocks * BLOCK_SIZE, config.kv_dim()), DType::F16, device);
                Ok([zeros()?, zeros()?])
            })
            .collect::<candle_core::Result<Vec<_>>>()
            .map_err(|e| Error::ModelLoad { path: path.to_owned(), message: format!("the KV cache: {e}") })?;
        Ok(Self { model, kv, devices })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.model.config
    }

    /// The longest context a sequence may reach.
    pub fn set_max_positions(&mut self, positions: usize) {
        self.model.set_max_positions(positions);
    }

    /// Runs one step over every sequence's new tokens; returns the last-token logits of each step that asked, as
    /// [`Model::forward`] does.
    pub fn forward(&self, steps: &mut [Step<'_>]) -> Result<Vec<Vec<f32>>> {
        let (owner, pos) = self.model.rows(steps)?;
        let rows = owner.len();
        if rows == 0 {
            return Ok(vec![]);
        }
        let m = &self.model;
        let c = &m.config;
        let mut spans: Vec<Span> = vec![];
        for (r, &s) in owner.iter().enumerate() {
            match spans.last_mut() {
                Some(span) if span.step == s => span.rows += 1,
                _ => spans.push(Span { step: s, first_row: r, rows: 1, start: pos[r] }),
            }
        }
        // Each row's place in the pool.
        let slots: Vec<u32> = owner.iter().zip(&pos).map(|(&s, &p)| slot(&steps[s].cache.blocks, p)).collect();
        let angles: Vec<Angles> = m.ropes.iter().map(|rope| rope.angles(c.head_dim, &pos)).collect();
        // What a step needs on a device, made once per device (and per attention window) the layers use.
        let mut on: Vec<(Device, StepTables)> = vec![];
        let mut x = Tensor::from_vec(m.embed(steps), (rows, c.n_embd), &self.devices[0])?;
        for (l, layer) in m.layers.iter().enumerate() {
            let device = &self.devices[l];
            if !x.device().same_device(device) {
                x = x.to_device(device)?;
            }
            let at = match on.iter().position(|(d, _)| d.same_device(device)) {
                Some(at) => at,
                None => {
                    on.push((device.clone(), StepTables::new(device, &slots, &angles, c)?));
                    on.len() - 1
                }
            };
            let tables = &mut on[at].1;
            x = self.layer(l, layer, x, tables, &spans, steps)?;
        }
        let last: Vec<u32> = super::advance(steps).into_iter().map(|r| r as u32).collect();
        if last.is_empty() {
            return Ok(vec![]);
        }
        let n = last.len();
        let h = x.index_select(&Tensor::from_vec(last, n, x.device())?, 0)?;
        let h = candle_nn::ops::rms_norm(&h, &m.norm, c.rms_eps)?;
        let output = m.output.as_ref().ok_or_else(|| Error::Internal("the device path has no output".into()))?;
        Ok(output.forward(&h)?.to_device(&Device::Cpu)?.to_vec2::<f32>()?)
    }

    /// One transformer layer over the step's rows `x` (`[rows, n_embd]`).
    fn layer(
        &self,
        l: usize,
        layer: &Block<Tensors>,
        x: Tensor,
        tables: &mut StepTables,
        spans: &[Span],
        steps: &[Step<'_>],
    ) -> Result<Tensor> {
        let c = &self.model.config;
        let (rows, hd, nh, nkv) = (x.dim(0)?, c.head_dim, c.n_head, c.n_kv_head);
        let a = &layer.attn;
        let h = candle_nn::ops::rms_norm(&x, &layer.attn_norm, c.rms_eps)?;
        let (mut q, mut k, mut v) = (a.wq.forward(&h)?, a.wk.forward(&h)?, a.wv.forward(&h)?);
        if let Some([bq, bk, bv]) = &a.bias {
            (q, k, v) = (q.broadcast_add(bq)?, k.broadcast_add(bk)?, v.broadcast_add(bv)?);
        }
        if let Some([q_norm, k_norm]) = &a.qk_norm {
            q = candle_nn::ops::rms_norm(&q.reshape((rows * nh, hd))?, q_norm, c.rms_eps)?;
            k = candle_nn::ops::rms_norm(&k.reshape((rows * nkv, hd))?, k_norm, c.rms_eps)?;
        }
        // Heads first, `[heads, rows, head_dim]`, rotated.
        let (cos, sin) = (&tables.cos[a.rope], &tables.sin[a.rope]);
        let rotate = |t: Tensor, heads: usize| -> Result<Tensor> {
            let t = t.reshape((rows, heads, hd))?.transpose(0, 1)?.contiguous()?.unsqueeze(0)?;
            let t = match self.model.ropes[a.rope].layout {
                RopeLayout::Adjacent => candle_nn::rotary_emb::rope_i(&t, cos, sin)?,
                RopeLayout::Halves => candle_nn::rotary_emb::rope(&t, cos, sin)?,
            };
            Ok(t.squeeze(0)?)
        };
        let (q, k) = (rotate(q, nh)?, rotate(k, nkv)?);
        // This step's keys and values into the pool first: rows of a prompt chunk see earlier rows of it.
        let [keys, values] = &self.kv[l];
        let k = k.transpose(0, 1)?.contiguous()?.reshape((rows, c.kv_dim()))?;
        // Keys and values beyond f16's range are stored as its largest, as on the CPU (`KvPool::write`).
        let (k, v) = (k.clamp(-F16_MAX, F16_MAX)?, v.clamp(-F16_MAX, F16_MAX)?);
        keys.scatter_set(&tables.write, &k.to_dtype(DType::F16)?, 0)?;
        values.scatter_set(&tables.write, &v.to_dtype(DType::F16)?, 0)?;
        let q = (q * f64::from(self.model.attn_scale))?;
        let mut heads = Vec::with_capacity(spans.len());
        for (s, span) in spans.iter().enumerate() {
            let seen = tables.seen(s, span, a.window, &steps[span.step].cache.blocks)?;
            heads.push(self.attend(&q.narrow(1, span.first_row, span.rows)?, keys, values, seen)?);
        }
        let attn = Tensor::cat(&heads, 1)?.transpose(0, 1)?.contiguous()?.reshape((rows, c.q_dim()))?;
        let x = residual(x, a.wo.forward(&attn)?, layer.post_attn_norm.as_ref(), c.rms_eps)?;

        let f = &layer.ffn;
        let h = candle_nn::ops::rms_norm(&x, &layer.ffn_norm, c.rms_eps)?;
        let gate = f.gate.forward(&h)?;
        let gate = match f.activation {
            Activation::Silu => gate.silu()?,
            Activation::GeluTanh => gate.gelu()?,
        };
        let y = f.down.forward(&(gate * f.up.forward(&h)?)?)?;
        residual(x, y, layer.post_ffn_norm.as_ref(), c.rms_eps)
    }

    /// Attention of one sequence's queries `q` (`[n_head, rows, head_dim]`, scaled) over the positions `seen`
    /// gathers from the pool; returns `[n_head, rows, head_dim]`.
    fn attend(&self, q: &Tensor, keys: &Tensor, values: &Tensor, seen: &Seen) -> Result<Tensor> {
        let c = &self.model.config;
        let (nh, rows, hd) = q.dims3()?;
        let (nkv, group, n) = (c.n_kv_head, c.n_head / c.n_kv_head, seen.positions);
        // The queries of one key-value head's group together: `[n_kv_head, group · rows, head_dim]`.
        let q = q.contiguous()?.reshape((nkv, group * rows, hd))?;
        let gather = |t: &Tensor| -> Result<Tensor> {
            let t = t.index_select(&seen.slots, 0)?.to_dtype(DType::F32)?;
            Ok(t.reshape((n, nkv, hd))?.transpose(0, 1)?.contiguous()?)
        };
        let (k, v) = (gather(keys)?, gather(values)?);
        let mut scores = q.matmul(&k.t()?)?;
        if let Some(mask) = &seen.mask {
            scores = scores.reshape((nkv, group, rows, n))?.broadcast_add(mask)?.reshape((nkv, group * rows, n))?;
        }
        let weights = candle_nn::ops::softmax_last_dim(&scores)?;
        Ok(weights.matmul(&v)?.reshape((nh, rows, hd))?)
    }
}

/// Position `p`'s row in the pool, for a sequence whose block table is `blocks`.
fn slot(blocks: &[u32], p: usize) -> u32 {
    blocks[p / BLOCK_SIZE] * BLOCK_SIZE as u32 + (p % BLOCK_SIZE) as u32
}

/// `x + y`, with `y` normed first where the layer has a post-norm.
fn residual(x: Tensor, y: Tensor, norm: Option<&Tensor>, eps: f32) -> Result<Tensor> {
    let y = match norm {
        Some(weight) => candle_nn::ops::rms_norm(&y, weight, eps)?,
        None => y,
    };
    Ok((x + y)?)
}

/// What one sequence's queries read in a layer: the pool rows of the positions from the first block any of them
/// sees, and a mask where some of them do not see all of those.
struct Seen {
    slots: Tensor,
    positions: usize,
    /// `[rows, positions]`: 0 where a query sees a position, −∞ where not.
    mask: Option<Tensor>,
}

/// A step's tables on one device: the rotary angles, where each row's keys and values go, and what each sequence
/// reads (per attention window, made when a layer first asks).
struct StepTables {
    device: Device,
    cos: Vec<Tensor>,
    sin: Vec<Tensor>,
    /// `[rows, kv_dim]`: each row's slot in the pool, repeated along the row (scatter's index shape).
    write: Tensor,
    seen: Vec<((usize, Option<usize>), Seen)>,
}

impl StepTables {
    fn new(device: &Device, slots: &[u32], angles: &[Angles], c: &ModelConfig) -> Result<Self> {
        let (rows, half) = (slots.len(), c.head_dim / 2);
        let table = |v: &[f32]| Tensor::from_slice(v, (rows, half), device);
        let write: Vec<u32> = slots.iter().flat_map(|&s| std::iter::repeat_n(s, c.kv_dim())).collect();
        Ok(Self {
            device: device.clone(),
            cos: angles.iter().map(|a| table(&a.cos)).collect::<candle_core::Result<_>>()?,
            sin: angles.iter().map(|a| table(&a.sin)).collect::<candle_core::Result<_>>()?,
            write: Tensor::from_vec(write, (rows, c.kv_dim()), device)?,
            seen: vec![],
        })
    }

    /// What sequence `s` (its rows `span`, its block table `blocks`) reads under `window`.
    fn seen(&mut self, s: usize, span: &Span, window: Option<usize>, blocks: &[u32]) -> Result<&Seen> {
        if let Some(at) = self.seen.iter().position(|(key, _)| *key == (s, window)) {
            return Ok(&self.seen[at].1);
        }
        // Query i (position start + i) sees the positions from `first(i)` through its own.
        let first = |i: usize| window.map_or(0, |w| (span.start + i + 1).saturating_sub(w));
        let from = first(0) / BLOCK_SIZE * BLOCK_SIZE;
        let end = span.start + span.rows;
        let positions = end - from;
        let slots: Vec<u32> = (from..end).map(|p| slot(blocks, p)).collect();
        let mut mask = vec![0f32; span.rows * positions];
        let mut masked = false;
        for (i, row) in mask.chunks_exact_mut(positions).enumerate() {
            for (j, m) in row.iter_mut().enumerate() {
                let p = from + j;
                if p > span.start + i || p < first(i) {
                    *m = f32::NEG_INFINITY;
                    masked = true;
                }
            }
        }
        let seen = Seen {
            slots: Tensor::from_vec(slots, positions, &self.device)?,
            positions,
            mask: if masked { Some(Tensor::from_vec(mask, (span.rows, positions), &self.device)?) } else { None },
        };
        self.seen.push(((s, window), seen));
        Ok(&self.seen.last().expect("just pushed").1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sequence_reads_its_own_slots_and_sees_only_its_window() {
        let device = Device::Cpu;
        let config = ModelConfig {
            n_layer: 1,
            n_embd: 32,
            n_head: 1,
            n_kv_head: 1,
            head_dim: 32,
            n_ff: 32,
            rms_eps: 1e-6,
            rope_base: 10_000.0,
            rope_scale: 1.0,
            vocab: 1,
        };
        let mut tables = StepTables::new(&device, &[], &[], &config).unwrap();
        // Positions 20..25 of a sequence whose blocks are 3, 1 and 2 of the pool.
        let (blocks, span) = ([3u32, 1, 2], Span { step: 0, first_row: 0, rows: 5, start: 20 });
        let slot = |p: usize| blocks[p / BLOCK_SIZE] as usize * BLOCK_SIZE + p % BLOCK_SIZE;
        for window in [None, Some(7), Some(16)] {
            let seen = tables.seen(0, &span, window, &blocks).unwrap();
            // From the first block any query sees.
            let from = window.map_or(0, |w| (21 - w) / BLOCK_SIZE * BLOCK_SIZE);
            assert_eq!(seen.positions, 25 - from, "{window:?}");
            let slots = seen.slots.to_vec1::<u32>().unwrap();
            assert_eq!(slots, (from..25).map(|p| slot(p) as u32).collect::<Vec<_>>(), "{window:?}");
            let mask = seen.mask.as_ref().expect("a chunk's rows do not all see each other").to_vec2::<f32>().unwrap();
            for (i, row) in mask.iter().enumerate() {
                for (j, m) in row.iter().enumerate() {
                    let (p, q) = (from + j, 20 + i);
                    let visible = p <= q && window.is_none_or(|w| p + w > q);
                    assert_eq!(*m == 0.0, visible, "{window:?}: query at {q}, key at {p}: {m}");
                }
            }
        }
        // One decode row without a window sees everything: no mask at all.
        let one = Span { step: 1, first_row: 5, rows: 1, start: 40 };
        let seen = tables.seen(1, &one, None, &blocks).unwrap();
        assert!(seen.mask.is_none() && seen.positions == 41);
    }
}
