//! The other packaged architectures on their real weights (`cargo xtask model all`; `cargo xtask test` fetches
//! them): Qwen2.5-Coder-0.5B (qwen2, Q4_K_M: Q5_0, Q8_0, Q4_K and Q6_K tensors) and Gemma 3 270M (gemma3, Q4_K_M).

use std::path::{Path, PathBuf};

use candle_core::{D, DType, Device, Tensor, quantized::gguf_file::Content};
use moltbot_engine::{
    Engine, EngineConfig, Prompt,
    model::{BLOCK_SIZE, KvCache, KvPool, Model, Step, device::DeviceModel},
};

use super::{all_at_once, assert_same, greedy, one_at_a_time_on};

pub(super) fn packaged(name: &str) -> PathBuf {
    let model = moltbot_config::packaged_model(name).expect("a packaged model");
    let path = model.path();
    assert!(
        path.is_file(),
        "model missing at {}: run `cargo xtask model {name}` (cargo xtask test does)",
        path.display()
    );
    path
}

const QWEN: &str = "qwen2.5-coder-0.5b-instruct";
const GEMMA: &str = "gemma-3-270m";

/// Text that exercises each pre-tokenizer: digits, accents, emoji, runs of spaces, tabs and newlines,
/// contractions in both cases, code.
const TRICKY: &str =
    "Hello world, 12345 tokens! Ünïcödé 😀 ℏ\n\n  spaces\tand\ttabs    don't I'll WE'LL x=f(a[1],b)//2; naïve café";

/// Text that exercises what is cut out before the model's own algorithm: user-defined tokens (Gemma's HTML tags
/// and runs of whitespace, Qwen's `<tool_call>`), control tokens' texts (plain text here), CJK, joined emoji,
/// numbers that are not ASCII digits, `\r\n`.
const CUT_OUT: &str = "<table><tr><td>日本語 한국어</td></tr></table>\r\n<|im_start|><eos><tool_call> 👨\u{200d}👩\u{200d}👧 ½²٣\n\n\n\t\t  x_1 ==  'A'";

#[test]
fn tokenizers_give_llama_cpps_ids() {
    // From llama-server's /tokenize (llama.cpp as vendored by llama-cpp-python 0.3.36) on the same files, without
    // special tokens parsed.
    let qwen: &[u32] = &[
        9707, 1879, 11, 220, 16, 17, 18, 19, 20, 11211, 0, 30512, 77, 37572, 66, 2956, 128505, 90316, 28653, 237, 271,
        220, 12621, 52477, 3244, 3435, 262, 1513, 944, 358, 3278, 19677, 6, 4086, 856, 18111, 2877, 58, 16, 1125, 65,
        27151, 17, 26, 94880, 586, 51950,
    ];
    let gemma: &[u32] = &[
        9259, 1902, 236764, 236743, 236770, 236778, 236800, 236812, 236810, 21739, 236888, 15356, 236749, 238527,
        236755, 55515, 236859, 163543, 236743, 246210, 108, 138, 35220, 255968, 624, 255968, 39218, 140, 13246, 236789,
        236745, 564, 236789, 859, 19716, 236789, 2182, 1123, 236784, 236760, 236769, 236746, 236840, 236770, 1604,
        236763, 60860, 236778, 236793, 120362, 33443,
    ];
    let qwen_cut: &[u32] = &[
        20993, 1784, 376, 1784, 1296, 29, 101059, 102819, 130092, 31079, 522, 1296, 1472, 376, 1472, 2005, 1433, 27,
        91, 318, 4906, 91, 1784, 84399, 29, 151657, 61804, 101, 378, 235, 145233, 378, 235, 145665, 220, 26062, 29456,
        149, 96, 1406, 7847, 856, 62, 16, 621, 220, 364, 32, 6,
    ];
    let gemma_cut: &[u32] = &[
        168, 173, 175, 94951, 50413, 237430, 183, 181, 176, 251, 107, 236820, 236909, 548, 236779, 3041, 236909, 1798,
        211827, 1798, 13205, 236779, 6639, 236813, 236743, 243874, 237243, 243767, 237243, 244814, 47041, 238131,
        242044, 109, 255969, 138, 236781, 236779, 236770, 1251, 138, 236789, 236776, 236789,
    ];
    let smollm_cut: &[u32] = &[
        44, 6413, 21198, 8489, 21198, 11474, 46, 23274, 115, 40993, 179, 120, 248, 216, 33085, 246, 181, 130, 251, 183,
        240, 129, 9617, 11474, 29299, 8489, 29299, 6413, 46, 201, 198, 44, 108, 306, 79, 3738, 108, 21198, 85, 395,
        21198, 19324, 79, 4350, 46, 15107, 235, 118, 321, 231, 10813, 235, 119, 321, 231, 10813, 235, 117, 216, 16738,
        19133, 164, 113, 1116, 3558, 216, 1792, 79, 33, 1758, 216, 637, 49, 23,
    ];
    let cases = [
        (QWEN, TRICKY, qwen),
        (GEMMA, TRICKY, gemma),
        (QWEN, CUT_OUT, qwen_cut),
        (GEMMA, CUT_OUT, gemma_cut),
        (moltbot_config::DEFAULT_MODEL_NAME, CUT_OUT, smollm_cut),
    ];
    for (name, text, want) in cases {
        // The tokenizer alone, from the file's header.
        let mut file = std::fs::File::open(packaged(name)).unwrap();
        let metadata = moltbot_engine::ModelMetadata::from_gguf(&Content::read(&mut file).unwrap()).unwrap();
        let tokenizer = moltbot_engine::Tokenizer::from_metadata(&metadata).unwrap();
        let got = tokenizer.encode_text(text).unwrap();
        assert_eq!(got, want, "{name}: {text:?}");
        assert_eq!(tokenizer.decode(&got, false).unwrap(), text, "{name} decodes back");
    }
}

/// Checks the largest and the mean |a - b| against the largest |b|; returns our greedy token.
fn compare(step: usize, got: &[f32], want: &[f32]) -> u32 {
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let diffs: Vec<f32> = got.iter().zip(want).map(|(a, b)| (a - b).abs()).collect();
    let max_diff = diffs.iter().fold(0f32, |m, v| m.max(*v));
    let mean_diff = diffs.iter().sum::<f32>() / diffs.len() as f32;
    eprintln!(
        "step {step}: mean |Δ| {:.2} %, max {:.2} % of the logit scale",
        100.0 * mean_diff / scale,
        100.0 * max_diff / scale
    );
    // As for Llama (`logits_match_candle_quantized_llama`): 8-bit activations on both sides (or f32 in the
    // reference) differ by about 1 % of the logit scale on average; a wrong norm, rotary layout, bias or mask
    // is far above that.
    assert!(mean_diff <= 0.03 * scale, "step {step}: mean |Δlogit| {mean_diff} vs scale {scale}");
    assert!(max_diff <= 0.10 * scale, "step {step}: max |Δlogit| {max_diff} vs scale {scale}");
    let argmax = |v: &[f32]| v.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0 as u32;
    let (ours, best) = (argmax(got), want[argmax(want) as usize]);
    assert!(best - want[ours as usize] <= 0.015 * scale, "step {step}: greedy token {ours} is far from the best");
    ours
}

/// Our logits for the prompt and three greedy steps after it, each compared with `reference(tokens so far,
/// position of the first new one)`.
fn against(path: &Path, ids: Vec<u32>, reference: impl FnMut(&[u32], usize) -> Vec<f32>) {
    against_on(path, ids, None, reference)
}

/// `against` on the CPU kernels (`device` `None`), or on the device path with every layer on `device`.
pub(super) fn against_on(
    path: &Path,
    ids: Vec<u32>,
    device: Option<&Device>,
    mut reference: impl FnMut(&[u32], usize) -> Vec<f32>,
) {
    let mut file = std::fs::File::open(path).unwrap();
    let content = Content::read(&mut file).unwrap();
    let config = moltbot_engine::model::ModelConfig::read(&content).unwrap();
    let blocks = 2048 / BLOCK_SIZE;
    let (kernels, on_device, mut pool) = match device {
        None => (
            Some(Model::load(&content, &mut file, path, 2048, Default::default()).unwrap()),
            None,
            KvPool::new(&config, blocks, false),
        ),
        Some(device) => {
            let layers = vec![device.clone(); config.n_layer];
            let model = DeviceModel::load(&content, &mut file, path, 2048, Default::default(), layers, blocks).unwrap();
            (None, Some(model), KvPool::without_storage(&config, blocks, false))
        }
    };
    let mut cache = KvCache::new();
    let (mut tokens, mut position) = (ids, 0);
    for step in 0..4 {
        let new = tokens[position..].to_vec();
        assert!(cache.reserve(&mut pool, new.len()));
        let mut steps = [Step { tokens: &new, cache: &mut cache, logits: true }];
        let got = match (&kernels, &on_device) {
            (Some(kernels), _) => kernels.forward(&mut pool, &mut steps),
            (_, Some(on_device)) => on_device.forward(&mut steps),
            _ => unreachable!("one of them is loaded"),
        }
        .unwrap();
        let want = reference(&tokens, position);
        position = tokens.len();
        tokens.push(compare(step, &got[0], &want));
    }
}

pub(super) fn chat_ids(path: &Path, text: &str) -> Vec<u32> {
    let engine = Engine::load(EngineConfig::new(path)).unwrap();
    engine.tokenize(&Prompt::Chat(vec![moltbot_engine::ChatMessage::new("user", text)])).unwrap()
}

#[test]
fn qwen2_logits_match_candle_quantized_qwen2() {
    use candle_transformers::models::quantized_qwen2::ModelWeights;
    let path = packaged(QWEN);
    let ids = chat_ids(&path, "Write a Python function that reverses a string.");
    let mut file = std::fs::File::open(&path).unwrap();
    let mut reference = ModelWeights::from_gguf(Content::read(&mut file).unwrap(), &mut file, &Device::Cpu).unwrap();
    against(&path, ids, |tokens, position| {
        let input = Tensor::new(&tokens[position..], &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let logits = reference.forward(&input, position).unwrap();
        logits.squeeze(0).unwrap().to_vec1::<f32>().unwrap()
    });
}

/// Gemma 3 written out plainly in f32 on candle tensors from the GGUF file's dequantized weights, after Hugging
/// Face's `Gemma3ForCausalLM`: the reference for our Gemma 3 (candle-transformers' `quantized_gemma3` runs its
/// feed-forward with SiLU where Gemma uses GELU, so it cannot be one). Recomputes the whole sequence each call.
pub(super) struct GemmaReference {
    content: Content,
    file: std::fs::File,
    tensors: std::collections::HashMap<String, Tensor>,
}

impl GemmaReference {
    fn weight(&mut self, name: &str) -> Tensor {
        if !self.tensors.contains_key(name) {
            let t = self.content.tensor(&mut self.file, name, &Device::Cpu).unwrap().dequantize(&Device::Cpu).unwrap();
            self.tensors.insert(name.to_owned(), t);
        }
        self.tensors[name].clone()
    }

    fn meta(&self, key: &str) -> usize {
        self.content.metadata[&format!("gemma3.{key}")].to_u32().unwrap() as usize
    }

    fn logits(&mut self, tokens: &[u32]) -> Vec<f32> {
        let (d, heads, kv_heads, hd) = (
            self.meta("embedding_length"),
            self.meta("attention.head_count"),
            self.meta("attention.head_count_kv"),
            self.meta("attention.key_length"),
        );
        let (layers, window) = (self.meta("block_count"), self.meta("attention.sliding_window"));
        let eps = 1e-6;
        let n = tokens.len();
        let norm = |x: &Tensor, w: &Tensor| -> Tensor {
            let rms = (x.sqr().unwrap().mean_keepdim(D::Minus1).unwrap() + eps).unwrap().sqrt().unwrap();
            x.broadcast_div(&rms).unwrap().broadcast_mul(w).unwrap()
        };
        let linear = |x: &Tensor, w: &Tensor| x.matmul(&w.t().unwrap()).unwrap();
        let rope = |x: &Tensor, base: f32| -> Tensor {
            // x: (heads, n, hd); halves rotated (NeoX layout).
            let half = hd / 2;
            let inv: Vec<f32> = (0..half).map(|i| base.powf(-((2 * i) as f32) / hd as f32)).collect();
            let angles: Vec<f32> = (0..n).flat_map(|p| inv.iter().map(move |f| p as f32 * f)).collect();
            let angles = Tensor::from_vec(angles, (n, half), &Device::Cpu).unwrap();
            let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
            let (a, b) = (x.narrow(D::Minus1, 0, half).unwrap(), x.narrow(D::Minus1, half, half).unwrap());
            let ra = (a.broadcast_mul(&cos).unwrap() - b.broadcast_mul(&sin).unwrap()).unwrap();
            let rb = (a.broadcast_mul(&sin).unwrap() + b.broadcast_mul(&cos).unwrap()).unwrap();
            Tensor::cat(&[ra, rb], D::Minus1).unwrap()
        };
        let embed = self.weight("token_embd.weight");
        let ids = Tensor::new(tokens, &Device::Cpu).unwrap();
        let mut x = (embed.index_select(&ids, 0).unwrap() * (d as f64).sqrt()).unwrap();
        for l in 0..layers {
            let w = |s: &mut Self, name: &str| s.weight(&format!("blk.{l}.{name}.weight"));
            let sliding = (l + 1) % 6 != 0;
            let h = norm(&x, &w(self, "attn_norm"));
            let split = |t: Tensor, count: usize| {
                t.reshape((n, count, hd)).unwrap().transpose(0, 1).unwrap().contiguous().unwrap()
            };
            let q = norm(&split(linear(&h, &w(self, "attn_q")), heads), &w(self, "attn_q_norm"));
            let k = norm(&split(linear(&h, &w(self, "attn_k")), kv_heads), &w(self, "attn_k_norm"));
            let v = split(linear(&h, &w(self, "attn_v")), kv_heads);
            let base = if sliding { 10_000.0 } else { 1_000_000.0 };
            let (q, k) = (rope(&q, base), rope(&k, base));
            let group = heads / kv_heads;
            let k = Tensor::cat(&vec![k; group], 0).unwrap();
            let v = Tensor::cat(&vec![v; group], 0).unwrap();
            let scores = (q.matmul(&k.transpose(1, 2).unwrap()).unwrap() / (hd as f64).sqrt()).unwrap();
            let mask: Vec<f32> = (0..n)
                .flat_map(|i| {
                    (0..n).map(move |j| if j > i || (sliding && i - j >= window) { f32::NEG_INFINITY } else { 0.0 })
                })
                .collect();
            let scores = scores.broadcast_add(&Tensor::from_vec(mask, (n, n), &Device::Cpu).unwrap()).unwrap();
            let max = scores.max_keepdim(D::Minus1).unwrap();
            let e = scores.broadcast_sub(&max).unwrap().exp().unwrap();
            let p = e.broadcast_div(&e.sum_keepdim(D::Minus1).unwrap()).unwrap();
            let attn = p.matmul(&v).unwrap().transpose(0, 1).unwrap().reshape((n, heads * hd)).unwrap();
            let out = norm(&linear(&attn, &w(self, "attn_output")), &w(self, "post_attention_norm"));
            x = (x + out).unwrap();
            let h = norm(&x, &w(self, "ffn_norm"));
            let gate = linear(&h, &w(self, "ffn_gate")).gelu().unwrap();
            let up = linear(&h, &w(self, "ffn_up"));
            let out = norm(&linear(&(gate * up).unwrap(), &w(self, "ffn_down")), &w(self, "post_ffw_norm"));
            x = (x + out).unwrap();
        }
        let last = x.narrow(0, n - 1, 1).unwrap();
        let h = norm(&last, &self.weight("output_norm.weight"));
        linear(&h, &embed).squeeze(0).unwrap().to_dtype(DType::F32).unwrap().to_vec1().unwrap()
    }
}

#[test]
fn gemma3_logits_match_a_plain_f32_gemma3_on_the_kernels_and_the_device_path() {
    let path = packaged(GEMMA);
    // Longer than the 512-position sliding window, so local layers see only part of the prompt.
    let long = "Once upon a time, in a small village by the sea, there lived an old fisherman. ".repeat(34);
    let ids = chat_ids(&path, &format!("{long}Tell me how the story ends."));
    assert!(ids.len() > 560, "{} tokens do not pass the window", ids.len());
    let mut file = std::fs::File::open(&path).unwrap();
    let content = Content::read(&mut file).unwrap();
    let mut reference = GemmaReference { content, file, tensors: Default::default() };
    against(&path, ids.clone(), |tokens, _| reference.logits(tokens));
    // The device path too, its sliding-window masks included, on every device.
    for (device, _) in super::device::devices() {
        against_on(&path, ids.clone(), Some(&device), |tokens, _| reference.logits(tokens));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_greedy_output_equals_one_sequence_at_a_time_for_each_architecture() {
    for name in [QWEN, GEMMA] {
        let path = packaged(name);
        let config = EngineConfig { max_batch_size: 4, max_batch_tokens: 48, ..EngineConfig::new(&path) };
        let batched = Engine::load(config).unwrap();
        let sampling = greedy(12);
        assert_same(&all_at_once(&batched, &sampling).await, &one_at_a_time_on(&path, &sampling).await);
    }
}
