//! Model files users get wrong, and the memory switches: each bad file a clear `ModelLoadError` naming the file
//! and the fault; a model that cannot fit refused at start-up; `quantization` re-quantizing an F16 file (written
//! here from the default model) at load.

use std::path::{Path, PathBuf};

use candle_core::{
    Device,
    quantized::{GgmlDType, QTensor, gguf_file},
};
use moltbot_engine::{
    Engine, EngineConfig, KvBudget, Quantization,
    model::{BLOCK_SIZE, KvCache, KvPool, Model, Step},
};

use super::model_path;

/// A directory of its own under the system's temporary directory, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("moltbot-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes the default model's metadata and tensors to `path`, each tensor through `change` (`None` leaves it out).
fn rewrite(path: &Path, mut change: impl FnMut(&str, QTensor) -> Option<QTensor>) {
    let mut file = std::fs::File::open(model_path()).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    let tensors: Vec<(String, QTensor)> = names
        .into_iter()
        .filter_map(|name| {
            let t = content.tensor(&mut file, name, &Device::Cpu).unwrap();
            change(name, t).map(|t| (name.clone(), t))
        })
        .collect();
    let metadata: Vec<(&str, &gguf_file::Value)> = content.metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut out = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    gguf_file::write(&mut out, &metadata, &tensors).unwrap();
}

fn load_error(path: &Path) -> String {
    match Engine::load(EngineConfig::new(path)) {
        Ok(_) => panic!("{} loaded", path.display()),
        Err(e) => {
            eprintln!("{e}");
            e.to_string()
        }
    }
}

fn assert_names(error: &str, path: &Path, what: &str) {
    assert!(error.starts_with("ModelLoadError"), "{error}");
    assert!(error.contains(&path.display().to_string()), "the file is not named: {error}");
    assert!(error.contains(what), "`{what}` is not said: {error}");
}

#[test]
fn each_kind_of_bad_model_file_gets_a_clear_model_load_error() {
    let scratch = Scratch::new("bad-files");
    let original = std::fs::read(model_path()).unwrap();

    let truncated = scratch.0.join("truncated.gguf");
    std::fs::write(&truncated, &original[..original.len() / 2]).unwrap();
    assert_names(&load_error(&truncated), &truncated, "cut short");

    let magic = scratch.0.join("not-gguf.gguf");
    std::fs::write(&magic, [b"PK\x03\x04".as_slice(), &original[4..4096]].concat()).unwrap();
    assert_names(&load_error(&magic), &magic, "not a GGUF file");

    // A tensor type no GGUF reader knows: the type field after `output_norm.weight`'s name and dimensions.
    let unknown = scratch.0.join("unknown-type.gguf");
    let mut bytes = original.clone();
    let name = b"output_norm.weight";
    let at = bytes.windows(name.len()).position(|w| w == name).expect("the tensor's info") + name.len();
    let dims = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
    let ty = at + 4 + 8 * dims;
    bytes[ty..ty + 4].copy_from_slice(&99u32.to_le_bytes());
    std::fs::write(&unknown, bytes).unwrap();
    assert_names(&load_error(&unknown), &unknown, "99");

    // A type GGUF knows but this engine does not multiply.
    let q2k = scratch.0.join("q2k.gguf");
    rewrite(&q2k, |name, t| {
        Some(if name == "blk.0.ffn_down.weight" {
            QTensor::quantize(&t.dequantize(&Device::Cpu).unwrap(), GgmlDType::Q2K).unwrap()
        } else {
            t
        })
    });
    let error = load_error(&q2k);
    assert_names(&error, &q2k, "blk.0.ffn_down.weight");
    assert!(error.contains("Q2K") && error.contains("Q4_K"), "the type and the supported ones: {error}");

    let missing = scratch.0.join("missing.gguf");
    rewrite(&missing, |name, t| (name != "blk.3.ffn_up.weight").then_some(t));
    assert_names(&load_error(&missing), &missing, "no tensor `blk.3.ffn_up.weight`");
}

#[test]
fn a_model_that_cannot_fit_is_refused_with_the_figures() {
    // A KV cache of a terabyte: the kernel would allow the reservation and kill the server later.
    let config = EngineConfig { kv_cache: KvBudget::Bytes(1 << 40), ..EngineConfig::new(model_path()) };
    let error = Engine::load(config).err().expect("refused").to_string();
    assert!(error.starts_with("ModelLoadError: not enough memory"), "{error}");
    for said in ["KV cache 1048576 MiB", "available", "kv_cache_mib", "quantization", "smaller model"] {
        assert!(error.contains(said), "`{said}` is not said: {error}");
    }
    // The same figures against a stated limit: 64 MiB holds not even the default model's weights.
    let config = EngineConfig { memory_limit: Some(64 << 20), ..EngineConfig::new(model_path()) };
    let error = Engine::load(config).err().expect("refused").to_string();
    assert!(error.contains("only 64 MiB are available"), "{error}");
}

/// The logits after `prompt` with the model at `path` loaded with `quantization`, and its weights' bytes.
fn first_logits(path: &Path, quantization: Quantization, prompt: &[u32]) -> (Vec<f32>, usize) {
    let mut file = std::fs::File::open(path).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    let model = Model::load(&content, &mut file, path, 256, quantization).unwrap();
    let mut pool = KvPool::new(&model.config, 256 / BLOCK_SIZE, false);
    let mut cache = KvCache::new();
    assert!(cache.reserve(&mut pool, prompt.len()));
    let logits = model.forward(&mut pool, &mut [Step { tokens: prompt, cache: &mut cache, logits: true }]).unwrap();
    (logits.into_iter().next().unwrap(), model.weight_bytes())
}

#[test]
fn quantization_at_load_shrinks_an_f16_model_and_keeps_its_logits() {
    let scratch = Scratch::new("f16");
    let f16 = scratch.0.join("smollm2-f16.gguf");
    rewrite(&f16, |_, t| {
        let dims = t.shape().dims().len();
        Some(if dims == 2 {
            QTensor::quantize(&t.dequantize(&Device::Cpu).unwrap(), GgmlDType::F16).unwrap()
        } else {
            t
        })
    });
    let engine = Engine::load(EngineConfig::new(&f16)).unwrap();
    let prompt = engine.tokenizer().encode("The capital of France is Paris. The capital of Italy is").unwrap();
    drop(engine);
    let (wide, wide_bytes) = first_logits(&f16, Quantization::None, &prompt);
    let scale = wide.iter().fold(0f32, |m, v| m.max(v.abs()));
    for (quantization, bytes_per_weight, mean_bound) in
        [(Quantization::Bits8, 34.0 / 32.0, 0.04), (Quantization::Bits4, 0.6, 0.15)]
    {
        let (logits, bytes) = first_logits(&f16, quantization, &prompt);
        // Weights: f32 in memory without quantization (4 bytes each), 8.5 or about 4.5 bits each with it.
        let ratio = bytes as f64 / wide_bytes as f64;
        assert!(ratio <= bytes_per_weight / 4.0 + 0.01, "{quantization:?}: weights take {ratio:.3} of f32");
        let mean = logits.iter().zip(&wide).map(|(a, b)| (a - b).abs()).sum::<f32>() / wide.len() as f32;
        eprintln!(
            "{quantization:?}: weights {:.3} of f32, mean |Δlogit| {:.2} % of the scale",
            ratio,
            100.0 * mean / scale
        );
        // 8-bit activations alone move the logits by 1-3 % of the scale (see `logits_match_candle_quantized_llama`);
        // 4-bit weights of a 135M model, most of them Q4_0 (rows of 576), measured 9.5 %. The wide model's
        // choice stays among the quantized model's best five.
        assert!(mean <= mean_bound * scale, "{quantization:?}: mean |Δlogit| {mean} against scale {scale}");
        let best = wide.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0;
        let above = logits.iter().filter(|v| **v > logits[best]).count();
        assert!(above < 5, "{quantization:?}: the wide model's token ranks {} here", above + 1);
    }
    // The switch makes a model fit where it did not: the F16 file widened to f32 needs over 500 MiB.
    let small =
        EngineConfig { memory_limit: Some(400 << 20), kv_cache: KvBudget::Bytes(64 << 20), ..EngineConfig::new(&f16) };
    let refused = Engine::load(small.clone()).err().expect("the f32 weights do not fit in 400 MiB").to_string();
    assert!(refused.contains("not enough memory"), "{refused}");
    Engine::load(EngineConfig { quantization: Quantization::Bits4, ..small }).unwrap();
}
