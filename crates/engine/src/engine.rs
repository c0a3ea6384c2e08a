//! The engine handle and its compute thread. Callers `submit` a request and read its events; dropping the
//! `Generation` cancels it. The model lives on one thread that runs requests in arrival order.

use std::{
    fs::File,
    path::PathBuf,
    sync::{Arc, mpsc},
    thread,
};

use candle_core::{Device, Tensor, quantized::gguf_file};
use candle_transformers::models::quantized_llama::{MAX_SEQ_LEN, ModelWeights};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

use crate::{
    ChatMessage, ChatTemplate, Detokenizer, Error, FinishReason, ModelMetadata, Result, SamplingParams, StopMatcher,
    Tokenizer, Usage, sampling::Sampler,
};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum DeviceChoice {
    /// CUDA device 0 when built with the `cuda` feature and a GPU is present, otherwise CPU.
    #[default]
    Auto,
    Cpu,
    Cuda(usize),
}

#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub model_path: PathBuf,
    /// The name clients use for the model; the GGUF file's `general.name` when unset.
    pub name: Option<String>,
    pub device: DeviceChoice,
    /// Caps the context window below the model's own.
    pub max_context: Option<usize>,
}

pub enum Prompt {
    /// Used as is.
    Text(String),
    /// Rendered with the model's chat template.
    Chat(Vec<ChatMessage>),
}

pub struct GenerationRequest {
    pub prompt: Prompt,
    pub sampling: SamplingParams,
}

#[derive(Debug, Clone, PartialEq)]
pub enum GenerationEvent {
    /// Text completed by a sampled token (`id`), or held-back text released at the end (`id` is `None`).
    Token {
        text: String,
        id: Option<u32>,
    },
    Finished {
        reason: FinishReason,
        usage: Usage,
    },
    Failed(String),
}

/// A running generation. Dropping it cancels the request.
pub struct Generation {
    pub prompt_tokens: u32,
    events: UnboundedReceiver<GenerationEvent>,
}

impl Generation {
    /// The next event; `None` after `Finished` or `Failed`.
    pub async fn next(&mut self) -> Option<GenerationEvent> {
        self.events.recv().await
    }

    /// Collects the whole answer (for tests and benchmarks).
    pub async fn collect(mut self) -> Result<(String, FinishReason, Usage)> {
        let mut text = String::new();
        while let Some(event) = self.next().await {
            match event {
                GenerationEvent::Token { text: piece, .. } => text.push_str(&piece),
                GenerationEvent::Finished { reason, usage } => return Ok((text, reason, usage)),
                GenerationEvent::Failed(message) => return Err(Error::InvalidRequest(message)),
            }
        }
        Err(Error::Stopped)
    }
}

struct Job {
    tokens: Vec<u32>,
    sampling: SamplingParams,
    events: UnboundedSender<GenerationEvent>,
}

/// A cheap, clonable handle to a loaded model.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

struct Inner {
    jobs: mpsc::Sender<Job>,
    tokenizer: Tokenizer,
    template: ChatTemplate,
    name: String,
    metadata: ModelMetadata,
    context_length: usize,
    device: String,
}

impl Engine {
    /// Loads the model and starts the compute thread.
    pub fn load(config: EngineConfig) -> Result<Self> {
        let path = &config.model_path;
        let load_err = |e: &dyn std::fmt::Display| Error::ModelLoad { path: path.clone(), message: e.to_string() };
        if !path.is_file() {
            return Err(Error::ModelNotFound { path: path.clone() });
        }
        let mut file = File::open(path).map_err(|e| load_err(&e))?;
        let content = gguf_file::Content::read(&mut file).map_err(|e| load_err(&e))?;
        let metadata = ModelMetadata::from_gguf(&content)?;
        let tokenizer = Tokenizer::from_metadata(&metadata)?;
        let template = ChatTemplate::new(
            metadata.chat_template.as_deref(),
            metadata.token(metadata.bos_token_id).unwrap_or_default(),
            metadata.token(metadata.eos_token_id).unwrap_or_default(),
        )?;
        let device = select_device(config.device)?;
        let model = ModelWeights::from_gguf(content, &mut file, &device).map_err(|e| load_err(&e))?;
        let context_length = [Some(metadata.context_length), Some(MAX_SEQ_LEN), config.max_context]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(MAX_SEQ_LEN);
        let eos: Vec<u32> = metadata
            .eos_token_id
            .into_iter()
            .chain(["<|im_end|>", "<|eot_id|>", "<|end|>", "</s>"].iter().filter_map(|t| tokenizer.token_id(t)))
            .collect();
        let (jobs, queue) = mpsc::channel();
        let compute = Compute { model, device: device.clone(), tokenizer: tokenizer.clone(), eos, context_length };
        thread::Builder::new()
            .name("moltbot-engine".into())
            .spawn(move || compute.run(queue))
            .map_err(|e| load_err(&e))?;
        let name = config.name.unwrap_or_else(|| metadata.name.clone());
        tracing::info!(model = %name, path = %path.display(), context_length, device = ?device, "model loaded");
        Ok(Self {
            inner: Arc::new(Inner {
                jobs,
                tokenizer,
                template,
                name,
                metadata,
                context_length,
                device: format!("{device:?}"),
            }),
        })
    }

    pub fn name(&self) -> &str {
        &self.inner.name
    }

    pub fn metadata(&self) -> &ModelMetadata {
        &self.inner.metadata
    }

    pub fn context_length(&self) -> usize {
        self.inner.context_length
    }

    pub fn device(&self) -> &str {
        &self.inner.device
    }

    /// How many sequences generate at once.
    pub fn max_sequences(&self) -> usize {
        1
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.inner.tokenizer
    }

    pub fn render(&self, messages: &[ChatMessage]) -> Result<String> {
        self.inner.template.render(messages)
    }

    /// Tokenizes a prompt as `submit` would.
    pub fn tokenize(&self, prompt: &Prompt) -> Result<Vec<u32>> {
        match prompt {
            Prompt::Text(text) => self.inner.tokenizer.encode(text),
            Prompt::Chat(messages) => self.inner.tokenizer.encode(&self.render(messages)?),
        }
    }

    /// Validates and queues a request. Errors here (bad parameters, prompt too long) are the caller's.
    pub fn submit(&self, request: GenerationRequest) -> Result<Generation> {
        request.sampling.validate()?;
        let tokens = self.tokenize(&request.prompt)?;
        if tokens.is_empty() {
            return Err(Error::InvalidRequest("the prompt is empty".into()));
        }
        if tokens.len() >= self.inner.context_length {
            return Err(Error::PromptTooLong {
                prompt_tokens: tokens.len(),
                context_length: self.inner.context_length,
            });
        }
        let prompt_tokens = tokens.len() as u32;
        let (events, rx) = unbounded_channel();
        self.inner.jobs.send(Job { tokens, sampling: request.sampling, events }).map_err(|_| Error::Stopped)?;
        Ok(Generation { prompt_tokens, events: rx })
    }
}

fn select_device(choice: DeviceChoice) -> Result<Device> {
    Ok(match choice {
        DeviceChoice::Cpu => Device::Cpu,
        DeviceChoice::Cuda(ordinal) => Device::new_cuda(ordinal)?,
        DeviceChoice::Auto if candle_core::utils::cuda_is_available() => Device::new_cuda(0)?,
        DeviceChoice::Auto => Device::Cpu,
    })
}

struct Compute {
    model: ModelWeights,
    device: Device,
    tokenizer: Tokenizer,
    eos: Vec<u32>,
    context_length: usize,
}

impl Compute {
    fn run(mut self, queue: mpsc::Receiver<Job>) {
        while let Ok(job) = queue.recv() {
            if job.events.is_closed() {
                continue;
            }
            let events = job.events.clone();
            let result = self.generate(job);
            let event = match result {
                Ok(Some((reason, usage))) => GenerationEvent::Finished { reason, usage },
                Ok(None) => continue,
                Err(e) => {
                    tracing::error!(error = %e, "generation failed");
                    GenerationEvent::Failed(e.to_string())
                }
            };
            let _ = events.send(event);
        }
        tracing::debug!("engine compute thread stopped");
    }

    /// Runs one request to its end; `None` when the caller went away.
    fn generate(&mut self, job: Job) -> Result<Option<(FinishReason, Usage)>> {
        let Job { tokens, sampling, events } = job;
        let prompt_tokens = tokens.len();
        let max_new = (sampling.max_tokens as usize).min(self.context_length - prompt_tokens);
        let mut sampler = Sampler::new(&sampling);
        let mut stops = StopMatcher::new(sampling.stop.clone());
        let mut detok = Detokenizer::new(&tokens);
        let mut context = tokens;
        let input = Tensor::new(context.as_slice(), &self.device)?.unsqueeze(0)?;
        let mut logits = self.model.forward(&input, 0)?;
        let mut reason = FinishReason::Length;
        let mut generated = 0;
        while generated < max_new {
            if events.is_closed() {
                return Ok(None);
            }
            let next = sampler.sample(&logits, &context)?;
            if self.eos.contains(&next) {
                reason = FinishReason::Stop;
                break;
            }
            generated += 1;
            context.push(next);
            let (text, hit) = stops.push(&detok.push(&self.tokenizer, next)?);
            if events.send(GenerationEvent::Token { text, id: Some(next) }).is_err() {
                return Ok(None);
            }
            if hit {
                reason = FinishReason::Stop;
                break;
            }
            if generated < max_new {
                let input = Tensor::new(&[next], &self.device)?.unsqueeze(0)?;
                logits = self.model.forward(&input, context.len() - 1)?;
            }
        }
        let rest = stops.flush();
        if !rest.is_empty() {
            let _ = events.send(GenerationEvent::Token { text: rest, id: None });
        }
        Ok(Some((reason, Usage { prompt_tokens: prompt_tokens as u32, completion_tokens: generated as u32 })))
    }
}
