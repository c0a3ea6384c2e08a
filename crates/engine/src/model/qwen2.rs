//! Qwen2 and Qwen2.5 (Qwen team, "Qwen2 Technical Report", 2024): the Llama layout with biases on the query, key
//! and value projections, and the rotary embedding over halves of each head. References: llama.cpp's
//! `llm_build_qwen2`, candle-transformers' `quantized_qwen2`.

use super::{Model, ModelConfig, RopeLayout, Store, llama};
use crate::Result;

pub(super) fn load<S: Store>(w: &mut S) -> Result<Model<S::Parts>> {
    let config = ModelConfig::from_gguf(w.content(), "qwen2")?;
    let mut model = llama::plain(w, config, RopeLayout::Halves)?;
    let (q, kv) = (model.config.q_dim(), model.config.kv_dim());
    for (l, layer) in model.layers.iter_mut().enumerate() {
        layer.attn.bias = Some([
            w.layer_vector(l, "attn_q.bias", q)?,
            w.layer_vector(l, "attn_k.bias", kv)?,
            w.layer_vector(l, "attn_v.bias", kv)?,
        ]);
    }
    Ok(model)
}
