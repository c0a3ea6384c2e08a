//! The device path ([`moltbot_engine::model::device`]) against the CPU kernels, on every device this build and
//! machine have: candle's CPU device always, CUDA device 0 with the `cuda` feature where a GPU is (candle's own
//! test pattern: one test, every available device).

use std::path::Path;

use candle_core::{Device, quantized::gguf_file::Content};
use moltbot_engine::{
    DeviceChoice, Engine, EngineConfig,
    model::{BLOCK_SIZE, KvCache, KvPool, Model, Step, device::DeviceModel},
};

use super::{
    all_at_once,
    architectures::{chat_ids, packaged},
    assert_same, greedy, model_path, one_at_a_time_with,
};

/// The devices to run the device path on, with the engine's name for each.
pub(super) fn devices() -> Vec<(Device, DeviceChoice)> {
    #[allow(unused_mut)]
    let mut devices = vec![(Device::Cpu, DeviceChoice::CandleCpu)];
    #[cfg(feature = "cuda")]
    if let Ok(gpu) = Device::new_cuda(0) {
        devices.push((gpu, DeviceChoice::Cuda { ordinal: 0, layers: usize::MAX }));
    }
    devices
}

/// The largest and the mean |a − b| as fractions of the largest |b|.
fn differences(got: &[f32], want: &[f32]) -> (f32, f32) {
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let diffs: Vec<f32> = got.iter().zip(want).map(|(a, b)| (a - b).abs()).collect();
    let max = diffs.iter().fold(0f32, |m, v| m.max(*v));
    (max / scale, diffs.iter().sum::<f32>() / diffs.len() as f32 / scale)
}

fn argmax(v: &[f32]) -> u32 {
    v.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0 as u32
}

/// The prompt and three greedy steps on the CPU kernels and on `device`, every layer there, compared step by step;
/// the greedy token is the kernels'.
fn compare_on(path: &Path, device: &Device, prompt: &str) {
    let ids = chat_ids(path, prompt);
    let mut file = std::fs::File::open(path).unwrap();
    let content = Content::read(&mut file).unwrap();
    let kernels = Model::load(&content, &mut file, path, 1024, Default::default()).unwrap();
    let blocks = 1024 / BLOCK_SIZE;
    let layers = vec![device.clone(); kernels.config.n_layer];
    let on_device = DeviceModel::load(&content, &mut file, path, 1024, Default::default(), layers, blocks).unwrap();
    let (mut pool, mut cache) = (KvPool::new(&kernels.config, blocks, false), KvCache::new());
    let (mut device_pool, mut device_cache) = (KvPool::without_storage(&kernels.config, blocks, false), KvCache::new());
    let (mut tokens, mut position) = (ids, 0);
    for step in 0..4 {
        let new = tokens[position..].to_vec();
        assert!(cache.reserve(&mut pool, new.len()) && device_cache.reserve(&mut device_pool, new.len()));
        let want = kernels.forward(&mut pool, &mut [Step { tokens: &new, cache: &mut cache, logits: true }]).unwrap();
        let got = on_device.forward(&mut [Step { tokens: &new, cache: &mut device_cache, logits: true }]).unwrap();
        let (want, got) = (&want[0], &got[0]);
        let (max, mean) = differences(got, want);
        eprintln!(
            "{} on {device:?}, step {step}: mean |Δ| {:.3} %, max {:.3} %",
            path.display(),
            100.0 * mean,
            100.0 * max
        );
        // Both quantize activations to 8 bits per block (the kernels per 32 values, candle per its weights'
        // block) and keep keys and values in f16, where a last-bit difference can flip a rounding and travel
        // through every layer. Each is within 3 % (mean) and 10 % (max) of the logit scale of an exact reference
        // (`architectures`; the device path past Gemma 3's sliding window too), so they may differ by the sum.
        // Measured on this machine: mean 0.2-0.3 % (Qwen2.5), 1.1-2.7 % (SmolLM2), 3.5 % (Gemma 3, whose
        // activations are the largest); max 1.1-8.3 %. A wrong rotary layout, mask, norm, bias or cache slot is
        // far above that, and picks another greedy token.
        assert!(mean <= 0.05, "step {step}: mean |Δlogit| {mean} of the scale");
        assert!(max <= 0.15, "step {step}: max |Δlogit| {max} of the scale");
        let ours = argmax(got);
        let (best, theirs) = (want[argmax(want) as usize], want[ours as usize]);
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(
            best - theirs <= 0.015 * scale,
            "step {step}: the device path's greedy token {ours} is far from the best"
        );
        position = tokens.len();
        tokens.push(argmax(want));
    }
}

#[test]
fn the_device_path_matches_the_cpu_kernels_on_every_architecture_and_device() {
    let models = [
        (model_path(), "What is the capital of France?"),
        (packaged("qwen2.5-coder-0.5b-instruct"), "Write a Python function that reverses a string."),
        (packaged("gemma-3-270m"), "Name three colors of the rainbow."),
    ];
    for (device, _) in devices() {
        for (path, prompt) in &models {
            compare_on(path, &device, prompt);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_greedy_output_on_the_device_path_equals_one_sequence_at_a_time() {
    for (_, device) in devices() {
        // A small token budget forces long prompts into chunks that share steps with other sequences' decoding.
        let config =
            EngineConfig { device, max_batch_size: 4, max_batch_tokens: 48, ..EngineConfig::new(model_path()) };
        let batched = Engine::load(config).unwrap();
        let sampling = greedy(12);
        let single = EngineConfig { device, ..EngineConfig::new(model_path()) };
        assert_same(&all_at_once(&batched, &sampling).await, &one_at_a_time_with(single, &sampling).await);
        let stats = batched.stats();
        assert!(stats.step_sequences > stats.steps, "the sequences never shared a step: {stats:?}");
        assert_eq!(stats.kv_blocks_free, stats.kv_blocks_total, "finished sequences hold no blocks: {stats:?}");
    }
}

#[cfg(not(feature = "cuda"))]
#[test]
fn gpu_layers_without_a_cuda_build_is_a_clear_start_up_error() {
    let config =
        EngineConfig { device: DeviceChoice::Cuda { ordinal: 0, layers: 8 }, ..EngineConfig::new(model_path()) };
    let error = Engine::load(config).err().expect("refused").to_string();
    assert!(error.starts_with("ModelLoadError: no usable GPU"), "{error}");
    for said in ["--features cuda", "cargo xtask cuda", "gpu_layers: 0"] {
        assert!(error.contains(said), "`{said}` is not said: {error}");
    }
}
