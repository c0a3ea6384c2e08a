//! MoltBot's inference engine: loads a GGUF model (Llama, Qwen2, Gemma 3), builds its tokenizer and chat template from the
//! GGUF metadata, and generates text for many requests at once on a compute thread of its own (continuous
//! batching over its own forward pass and SIMD kernels). It knows nothing about networking: the
//! inference-worker wraps it.

mod constraint;
mod engine;
mod error;
mod gguf;
pub mod kernels;
pub mod kv;
pub mod memory;
pub mod model;
mod sampling;
mod template;
mod tokenizer;
mod tools;

pub use constraint::Constraint;
pub use engine::{
    DeviceChoice, Engine, EngineConfig, EngineStats, Generation, GenerationEvent, GenerationRequest, KvBudget, Prompt,
};
pub use error::{Error, Result};
pub use gguf::ModelMetadata;
pub use model::Quantization;
pub use sampling::{FinishReason, MAX_STOP_BYTES, MAX_STOP_STRINGS, SamplingParams, StopMatcher, Usage};
pub use template::{ChatMessage, ChatTemplate, OwnedPiece};
pub use tokenizer::{Detokenizer, Piece, Tokenizer};
pub use tools::{Tool, ToolCall, ToolCallParser, ToolChoice, Tools};
