//! `moltbot bench --kernels`: the quantized matrix kernels alone, per block format, on the shapes the packaged
//! models' feed-forward layers have. A change to a kernel is measured here before it is measured in a model.

use std::time::Instant;

use moltbot_engine::kernels::{Format, Matrix, Quantized, interleaving, simd_level};

/// The formats the packaged models hold, with the shape (rows × columns) their feed-forward layers give them:
/// Qwen2.5-0.5B's gate and up projections (4864 × 896) for 32-weight blocks, its down projection (896 × 4864)
/// for 256-weight super-blocks.
const FORMATS: [Format; 7] =
    [Format::Q4_0, Format::Q4_1, Format::Q5_0, Format::Q8_0, Format::Q4K, Format::Q5K, Format::Q6K];

/// Activation rows per multiplication: one-stream decode, batched decode, prompt chunks.
const ACTIVATION_ROWS: [usize; 5] = [1, 4, 16, 64, 512];

/// A deterministic spread of values in [-1, 1) (no random source needed for a benchmark).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

/// Prints each format's multiply-accumulates per second at each number of activation rows (the median of
/// `repeat` timings), and for one row the weight bytes read per second.
pub fn run(repeat: usize) -> anyhow::Result<()> {
    let threads = std::thread::available_parallelism().map_or(1, usize::from);
    let layout = if interleaving() {
        "rows interleaved (MOLTBOT_ENGINE_NO_INTERLEAVE=1 times them as the file stores them)"
    } else {
        "rows as the file stores them"
    };
    println!("kernels: {}, {layout}; {threads} threads; GMAC/s, median of {repeat}", simd_level());
    for format in FORMATS {
        let (rows, cols) = if format.block_elems() == 256 { (896, 4864) } else { (4864, 896) };
        let matrix = Matrix::quantize(format, &values(rows * cols, 1), rows, cols)?.for_kernels();
        let mut line = format!("{:>5} {rows:>4} x {cols:<4}", format!("{format:?}"));
        for t_rows in ACTIVATION_ROWS {
            let x = values(t_rows * cols, 2);
            let x = Quantized::new(&x, t_rows, cols);
            let mut out = vec![0f32; t_rows * rows];
            // The same work per timing whatever the row count (256 activation rows' worth).
            let reps = (256 / t_rows).max(1);
            matrix.matmul(&x, &mut out);
            let mut secs: Vec<f64> = (0..repeat.max(1))
                .map(|_| {
                    let t = Instant::now();
                    for _ in 0..reps {
                        matrix.matmul(&x, &mut out);
                    }
                    t.elapsed().as_secs_f64() / reps as f64
                })
                .collect();
            secs.sort_by(f64::total_cmp);
            let median = secs[secs.len() / 2];
            line += &format!("  {t_rows:>3} rows {:6.1}", (rows * cols * t_rows) as f64 / median / 1e9);
            if t_rows == 1 {
                line += &format!(" ({:4.1} GB/s)", matrix.bytes() as f64 / median / 1e9);
            }
        }
        println!("{line}");
    }
    Ok(())
}
