//! Llama (Touvron et al., "LLaMA", 2023) and the models that share its GGUF layout (SmolLM, TinyLlama, Mistral
//! without sliding windows). References: llama.cpp's `llm_build_llama`, candle-transformers' `quantized_llama`.

use super::{Model, ModelConfig, Rope, RopeLayout, Weights};
use crate::Result;

pub(super) fn load(w: &mut Weights<'_>) -> Result<Model> {
    let config = ModelConfig::from_gguf(w.content, "llama")?;
    plain(w, config, RopeLayout::Adjacent)
}

/// A Llama-layout model: pre-norms, SwiGLU, one rotary embedding; the output projection, or the embedding tied.
pub(super) fn plain(w: &mut Weights<'_>, config: ModelConfig, layout: RopeLayout) -> Result<Model> {
    let layers = (0..config.n_layer).map(|l| w.block(&config, l)).collect::<Result<Vec<_>>>()?;
    Ok(Model {
        embed: embedding(w, &config)?,
        output: w.output(&config)?,
        norm: w.vector("output_norm.weight", config.n_embd)?,
        embed_scale: 1.0,
        attn_scale: 1.0 / (config.head_dim as f32).sqrt(),
        layers,
        ropes: vec![Rope { position_scale: 1.0 / config.rope_scale, ..Rope::new(config.rope_base, layout) }],
        max_positions: 0,
        config,
    })
}

pub(super) fn embedding(w: &mut Weights<'_>, c: &ModelConfig) -> Result<crate::kernels::Matrix> {
    let m = w.matrix("token_embd.weight")?;
    if m.cols != c.n_embd {
        return Err(w.bad("token_embd.weight", &format!("has rows of {}, expected {}", m.cols, c.n_embd)));
    }
    Ok(m)
}
