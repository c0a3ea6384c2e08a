//! Gemma 3 (Gemma Team, "Gemma 3 Technical Report", 2025), text only: GeGLU feed-forward, the embedding scaled
//! by √n_embd, RMS norms on each query and key head, norms after attention and after the feed-forward, and
//! local layers with a sliding window and a rotary base of their own between global layers (five local, then one
//! global). GGUF norm weights already hold Gemma's `1 + w`. References: llama.cpp's `llm_build_gemma3`
//! (`LLM_FFN_GELU`, SWA pattern 6, local base 10 000) and Hugging Face's `Gemma3ForCausalLM`.
//! candle-transformers' `quantized_gemma3` is not a reference here: its feed-forward uses SiLU.

use super::{Activation, Model, ModelConfig, Rope, RopeLayout, Store};
use crate::Result;

/// Local layers per global one plus one: layer `l` is global when `(l + 1) % 6 == 0`.
const PATTERN: usize = 6;
/// The local layers' rotary base.
const LOCAL_ROPE_BASE: f32 = 10_000.0;

pub(super) fn load<S: Store>(w: &mut S) -> Result<Model<S::Parts>> {
    let config = ModelConfig::from_gguf(w.content(), "gemma3")?;
    let md = &w.content().metadata;
    let window = md.get("gemma3.attention.sliding_window").and_then(|v| v.to_u32().ok()).map(|v| v as usize);
    let pattern = md
        .get("gemma3.attention.sliding_window_pattern")
        .and_then(|v| v.to_u32().ok())
        .map_or(PATTERN, |v| v as usize)
        .max(1);
    let local_base = md.get("gemma3.rope.local_freq_base").and_then(|v| v.to_f32().ok()).unwrap_or(LOCAL_ROPE_BASE);
    let (d, hd) = (config.n_embd, config.head_dim);
    let layers = (0..config.n_layer)
        .map(|l| {
            let mut block = w.block(&config, l)?;
            block.attn.qk_norm =
                Some([w.layer_vector(l, "attn_q_norm.weight", hd)?, w.layer_vector(l, "attn_k_norm.weight", hd)?]);
            block.post_attn_norm = Some(w.layer_vector(l, "post_attention_norm.weight", d)?);
            block.post_ffn_norm = Some(w.layer_vector(l, "post_ffw_norm.weight", d)?);
            block.ffn.activation = Activation::GeluTanh;
            if (l + 1) % pattern != 0 {
                block.attn.window = window;
                block.attn.rope = 1;
            }
            Ok(block)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Model {
        embed: w.embedding(&config)?,
        output: w.output(&config)?,
        norm: w.output_norm(d)?,
        embed_scale: (d as f32).sqrt(),
        // Gemma 3 27B (62 layers) scales by 1/√(n_embd / n_head) instead of 1/√head_dim, as llama.cpp does.
        attn_scale: 1.0 / (if config.n_layer == 62 { d / config.n_head } else { hd } as f32).sqrt(),
        layers,
        // Linear RoPE scaling (Gemma 3 4B and up) applies to the global layers only.
        ropes: vec![
            Rope { position_scale: 1.0 / config.rope_scale, ..Rope::new(config.rope_base, RopeLayout::Halves) },
            Rope::new(local_base, RopeLayout::Halves),
        ],
        max_positions: 0,
        config,
    })
}
