//! Llama (Touvron et al., "LLaMA", 2023) and the models that share its GGUF layout (SmolLM, TinyLlama, Mistral
//! without sliding windows). References: llama.cpp's `llm_build_llama`, candle-transformers' `quantized_llama`.

use super::{Model, ModelConfig, Rope, RopeLayout, Store};
use crate::Result;

pub(super) fn load<S: Store>(w: &mut S) -> Result<Model<S::Parts>> {
    let config = ModelConfig::from_gguf(w.content(), "llama")?;
    plain(w, config, RopeLayout::Adjacent)
}

/// A Llama-layout model: pre-norms, SwiGLU, one rotary embedding; the output projection, or the embedding tied.
pub(super) fn plain<S: Store>(w: &mut S, config: ModelConfig, layout: RopeLayout) -> Result<Model<S::Parts>> {
    let layers = (0..config.n_layer).map(|l| w.block(&config, l)).collect::<Result<Vec<_>>>()?;
    Ok(Model {
        embed: w.embedding(&config)?,
        output: w.output(&config)?,
        norm: w.output_norm(config.n_embd)?,
        embed_scale: 1.0,
        attn_scale: 1.0 / (config.head_dim as f32).sqrt(),
        layers,
        ropes: vec![Rope { position_scale: 1.0 / config.rope_scale, ..Rope::new(config.rope_base, layout) }],
        max_positions: 0,
        config,
    })
}
