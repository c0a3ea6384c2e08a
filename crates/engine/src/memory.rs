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
        // While loading, a re-quantized or widened tensor is whole in memory as read and as f32 besides the result.
        let mut loading = 0u64;
        let weights = content
            .tensor_infos
            .values()
            .map(|info| {
                let dims = info.shape.dims();
                let cols = *dims.last().unwrap_or(&1);
                let elems = info.shape.elem_count();
                let format = crate::model::stored_format(info.ggml_dtype, dims.len(), cols, quantization);
                if format.is_none() || format != Format::from_ggml(info.ggml_dtype) {
                    loading = loading.max(elems as u64 * 6);
                }
                match format {
                    Some(f) => (elems / f.block_elems() * f.block_bytes()) as u64,
                    None => elems as u64 * 4,
                }
            })
            .sum();
        let kv_cache = (kv_blocks * crate::kv::KvPool::block_bytes(config)) as u64;
        // Per token of a step: the residual, norms, q/k/v, attention and projections (about 8 rows of the
        // embedding and query widths) and the feed-forward's gate and up, in f32, plus their 8-bit copies; the
        // logits of each sequence; and a vocabulary-sized allowance for the tokenizer and constrained decoding.
        let per_token = 4 * (8 * config.n_embd.max(config.q_dim()) + 3 * config.n_ff);
        // A step's rotary angles: cos and sin of `head_dim / 2` per token, for at most two embeddings.
        let rope = 2 * batch_tokens * config.head_dim * 4;
        let working =
            (batch_tokens * per_token + batch_sequences * config.vocab * 4 + config.vocab * 512 + rope) as u64;
        let working = working.max(loading);
        Self { weights, kv_cache, working }
    }
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
