//! MoltBot's inference engine: loads a GGUF Llama-family model, builds its tokenizer and chat template from the
//! GGUF metadata, and generates text on a compute thread of its own. It knows nothing about networking: the
//! inference-worker wraps it.
//!
//! The forward pass is candle-transformers' `quantized_llama` (Touvron et al., "LLaMA", 2023; reference:
//! llama.cpp), one sequence at a time. Requests queue in FIFO order behind the running one.

mod engine;
mod error;
mod gguf;
pub mod kernels;
pub mod model;
mod sampling;
mod template;
mod tokenizer;

pub use engine::{DeviceChoice, Engine, EngineConfig, Generation, GenerationEvent, GenerationRequest, Prompt};
pub use error::{Error, Result};
pub use gguf::ModelMetadata;
pub use sampling::{FinishReason, SamplingParams, StopMatcher, Usage};
pub use template::{ChatMessage, ChatTemplate};
pub use tokenizer::{Detokenizer, Tokenizer};
