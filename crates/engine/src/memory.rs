//! The memory check before loading: the weights as they will sit in memory, the KV-cache pool and a step's
//! working buffers, against what the machine (or the container's cgroup) has available. A model that cannot fit
//! is refused at start-up with the figures and what to change, instead of being killed by the kernel mid-request.

use candle_core::quantized::gguf_file::Content;

use crate::{
    Error, Result,
    kernels::Format,
    model::{ModelConfig, Quantization},
};

/// What a model will take, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryPlan {
    pub weights: u64,
    pub kv_cache: u64,
    /// A step's activations and logits at the largest batch, the tokenizer's and grammars' tables and the rotary
    /// angles; or, if larger, the peak of loading one re-quantized or widened tensor.
    pub working: u64,
}

impl MemoryPlan {
    pub fn total(&self) -> u64 {
        self.weights + self.kv_cache + self.working
    }

    /// The plan for a file's tensors as they will be stored (re-quantized where `quantization` says).
    pub fn new(
        content: &Content,
        config: &ModelConfig,
        quantization: Quantization,
        kv_blocks: usize,
        batch_tokens: usize,
        batch_sequences: usize,
    ) -> Self {
        let (weights, loading) = stored_bytes(content, quantization, 4, |_| true);
        let kv_cache = (kv_blocks * crate::kv::KvPool::block_bytes(config)) as u64;
        let working = step_bytes(config, batch_tokens, batch_sequences) + config.vocab as u64 * 512;
        Self { weights, kv_cache, working: working.max(loading) }
    }
}

/// Bytes the tensors `take` picks will take as stored (re-quantized where `quantization` says, `wide` bytes a value
/// where no block format is kept: f32 on the CPU, f16 on a GPU), and the peak of loading one of them: a
/// re-quantized or widened tensor is whole in memory as read and as f32 besides the result.
fn stored_bytes(content: &Content, quantization: Quantization, wide: u64, take: impl Fn(&str) -> bool) -> (u64, u64) {
    let mut loading = 0u64;
    let weights = content
        .tensor_infos
        .iter()
        .filter(|(name, _)| take(name))
        .map(|(_, info)| {
            let dims = info.shape.dims();
            let cols = *dims.last().unwrap_or(&1);
            let elems = info.shape.elem_count();
            let format = crate::model::stored_format(info.ggml_dtype, dims.len(), cols, quantization);
            if format.is_none() || format != Format::from_ggml(info.ggml_dtype) {
                loading = loading.max(elems as u64 * 6);
            }
            match format {
                Some(f) => (elems / f.block_elems() * f.block_bytes()) as u64,
                None => elems as u64 * wide,
            }
        })
        .sum();
    (weights, loading)
}

/// A step's working memory: per token, the residual, norms, q/k/v, attention and projections (about 8 rows of
/// the embedding and query widths) and the feed-forward's gate and up, in f32, plus their 8-bit copies; the
/// logits of each sequence; and the rotary angles (cos and sin of `head_dim / 2` per token, for at most two
/// embeddings).
fn step_bytes(config: &ModelConfig, batch_tokens: usize, batch_sequences: usize) -> u64 {
    let per_token = 4 * (8 * config.n_embd.max(config.q_dim()) + 3 * config.n_ff);
    let rope = 2 * batch_tokens * config.head_dim * 4;
    (batch_tokens * per_token + batch_sequences * config.vocab * 4 + rope) as u64
}

/// What the layers the device path puts on a GPU take there, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DevicePlan {
    /// Layers on the GPU (the last ones), of `n_layer`.
    pub layers: usize,
    pub n_layer: usize,
    /// Their weights, and the output projection and final norm (where the last layer is).
    pub weights: u64,
    /// Their share of the KV-cache pool.
    pub kv_cache: u64,
    /// A step's activations and logits, the attention of the longest prompt chunk against a whole context, the
    /// peak of loading one tensor, and cuBLAS's workspace and candle's kernels (`CUDA_CONTEXT`).
    pub working: u64,
    /// The output projection and final norm.
    pub output: u64,
    /// Of `weights`, what leaves the host's memory: all but a tied output's embedding, which the host keeps for
    /// looking tokens up.
    pub moved: u64,
}

/// What cuBLAS's workspace and candle's kernels take on a GPU, about; the CUDA context itself is made before the
/// free memory is read.
const CUDA_CONTEXT: u64 = 256 << 20;

impl DevicePlan {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        content: &Content,
        config: &ModelConfig,
        quantization: Quantization,
        kv_blocks: usize,
        layers: usize,
        batch_tokens: usize,
        batch_sequences: usize,
        context: usize,
    ) -> Self {
        let (n_layer, layers) = (config.n_layer, layers.min(config.n_layer));
        let on_gpu = |name: &str| {
            let layer = name.strip_prefix("blk.").and_then(|rest| rest.split('.').next()?.parse::<usize>().ok());
            layer.is_some_and(|l| l >= n_layer - layers)
        };
        let (weights, loading) = stored_bytes(content, quantization, 2, on_gpu);
        let tied = !content.tensor_infos.contains_key("output.weight");
        let (output, _) = stored_bytes(content, quantization, 2, |name| {
            name == "output.weight" || name == "output_norm.weight" || (tied && name == "token_embd.weight")
        });
        let (embedding, _) = stored_bytes(content, quantization, 2, |name| tied && name == "token_embd.weight");
        let kv_cache = (kv_blocks * crate::kv::KvPool::block_bytes(config) * layers / n_layer.max(1)) as u64;
        // Scores and weights of every query head of a chunk against a whole context, in f32, and a context's
        // keys and values gathered (f16), widened (f32) and laid out by head (f32).
        let chunk = batch_tokens.min(context);
        let attention = 2 * 4 * config.n_head * chunk * context + 2 * 10 * context * config.kv_dim();
        let working = step_bytes(config, batch_tokens, batch_sequences) + attention as u64 + loading + CUDA_CONTEXT;
        let (output, embedding) = if layers > 0 { (output, embedding) } else { (0, 0) };
        let moved = weights + output - embedding;
        Self { layers, n_layer, weights: weights + output, kv_cache, working, output, moved }
    }

    pub fn total(&self) -> u64 {
        self.weights + self.kv_cache + self.working
    }

    /// The most layers that fit in `free` bytes, the output projection beside them.
    pub fn layers_that_fit(&self, free: u64) -> usize {
        let per_layer = (self.weights - self.output + self.kv_cache) / self.layers.max(1) as u64;
        let room = free.saturating_sub(self.working + self.output);
        ((room / per_layer.max(1)) as usize).min(self.n_layer)
    }
}

/// A GPU's name and memory, in bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceMemory {
    pub name: String,
    pub free: u64,
    pub total: u64,
}

/// Refuses a device plan that does not fit in the GPU's free memory, with the figures and the seed's advice.
pub fn check_device(plan: &DevicePlan, gpu: &DeviceMemory, path: &std::path::Path) -> Result<()> {
    if plan.total() <= gpu.free {
        return Ok(());
    }
    Err(Error::DeviceOutOfMemory(format!(
        "{} needs about {} MiB on {} for {} of its {} layers (weights {} MiB, KV cache {} MiB, working memory {} \
         MiB) but only {} MiB of its {} MiB are free; lower model_provider.max_tokens or context_length (or \
         inference_worker.kv_cache_mib), set model_provider.quantization to \"4bit\", put fewer layers on the GPU \
         (model_provider.gpu_layers: {} fits), or update the GPU driver",
        path.display(),
        mib(plan.total()),
        gpu.name,
        plan.layers,
        plan.n_layer,
        mib(plan.weights),
        mib(plan.kv_cache),
        mib(plan.working),
        mib(gpu.free),
        mib(gpu.total),
        plan.layers_that_fit(gpu.free),
    )))
}

/// Bytes this process may still take: the smaller of the machine's `MemAvailable` and, inside a container, the
/// cgroup's limit less what the cgroup already uses. `None` where neither can be read.
pub fn available_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| {
        s.lines().find_map(|l| l.strip_prefix("MemAvailable:")?.trim().trim_end_matches(" kB").parse::<u64>().ok())
    });
    let machine = meminfo.map(|kb| kb * 1024);
    [machine, cgroup_room()].into_iter().flatten().min()
}

/// cgroup v2 (`memory.max` − `memory.current`) or v1 (`memory.limit_in_bytes` − `memory.usage_in_bytes`).
fn cgroup_room() -> Option<u64> {
    let read = |path: &str| std::fs::read_to_string(path).ok().and_then(|s| s.trim().parse::<u64>().ok());
    let (limit, used) = match read("/sys/fs/cgroup/memory.max") {
        Some(limit) => (limit, read("/sys/fs/cgroup/memory.current")?),
        None => {
            (read("/sys/fs/cgroup/memory/memory.limit_in_bytes")?, read("/sys/fs/cgroup/memory/memory.usage_in_bytes")?)
        }
    };
    // v1 reports "no limit" as a huge number.
    (limit < 1 << 60).then(|| limit.saturating_sub(used))
}

fn mib(bytes: u64) -> u64 {
    bytes.div_ceil(1 << 20)
}

/// Refuses a plan that does not fit in `available` bytes, with the figures and the seed's advice.
pub fn check(plan: &MemoryPlan, available: Option<u64>, path: &std::path::Path) -> Result<()> {
    let Some(available) = available else { return Ok(()) };
    if plan.total() <= available {
        return Ok(());
    }
    Err(Error::OutOfMemory(format!(
        "{} needs about {} MiB (weights {} MiB, KV cache {} MiB, working memory {} MiB) but only {} MiB are \
         available; lower inference_worker.kv_cache_mib or model_provider.context_length / max_tokens, set \
         model_provider.quantization to \"4bit\" (or \"8bit\"), or pick a smaller model",
        path.display(),
        mib(plan.total()),
        mib(plan.weights),
        mib(plan.kv_cache),
        mib(plan.working),
        mib(available)
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gpu_too_small_is_refused_with_the_figures_and_the_layers_that_fit() {
        const MIB: u64 = 1 << 20;
        // 30 layers of 100 MiB weights and 10 MiB of KV cache each, a 50 MiB output, 600 MiB working memory.
        let plan = DevicePlan {
            layers: 30,
            n_layer: 30,
            weights: 3050 * MIB,
            kv_cache: 300 * MIB,
            working: 600 * MIB,
            output: 50 * MIB,
            moved: 3050 * MIB,
        };
        let gpu = |free| DeviceMemory { name: "NVIDIA T4 (cuda:0)".into(), free, total: 16 << 30 };
        let path = std::path::Path::new("/models/m.gguf");
        assert!(check_device(&plan, &gpu(4000 * MIB), path).is_ok());
        let error = check_device(&plan, &gpu(2048 * MIB), path).unwrap_err().to_string();
        assert!(
            error.starts_with("ModelLoadError: CUDA out of memory: /models/m.gguf needs about 3950 MiB"),
            "{error}"
        );
        // (2048 − 600 − 50) / 110 MiB a layer.
        for said in [
            "NVIDIA T4 (cuda:0) for 30 of its 30 layers",
            "weights 3050 MiB, KV cache 300 MiB, working memory 600 MiB",
            "only 2048 MiB of its 16384 MiB are free",
            "max_tokens",
            "\"4bit\"",
            "gpu_layers: 12 fits",
            "driver",
        ] {
            assert!(error.contains(said), "`{said}` is not said: {error}");
        }
        // The output goes with any layer: without room for it beside every layer, one layer stays on the CPU.
        assert_eq!(plan.layers_that_fit(3950 * MIB), 30);
        assert_eq!(plan.layers_that_fit(3950 * MIB - 1), 29);
        assert_eq!(plan.layers_that_fit(100 * MIB), 0);
    }
}
