//! The engine handle and its scheduler thread. Callers `submit` a request and read its events; dropping the
//! `Generation` cancels it. The model lives on one thread that batches every running request into each step.

use std::{
    collections::VecDeque,
    fs::File,
    path::PathBuf,
    sync::{Arc, mpsc},
    thread,
};

use candle_core::quantized::gguf_file;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

use crate::{
    ChatMessage, ChatTemplate, Detokenizer, Error, FinishReason, ModelMetadata, Result, SamplingParams, StopMatcher,
    Tokenizer, Usage,
    model::{KvCache, Llama, Step},
    sampling::Sampler,
};

/// The longest context the engine keeps, whatever the model supports.
pub const MAX_CONTEXT: usize = 8192;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum DeviceChoice {
    /// The CPU today (the batched engine has no CUDA path yet).
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
    /// Sequences generating together in one batch.
    pub max_batch_size: usize,
    /// Tokens (decode tokens plus prompt chunks) in one forward pass.
    pub max_batch_tokens: usize,
}

impl EngineConfig {
    /// The defaults for a model file.
    pub fn new(model_path: impl Into<PathBuf>) -> Self {
        Self {
            model_path: model_path.into(),
            name: None,
            device: DeviceChoice::default(),
            max_context: None,
            max_batch_size: 16,
            max_batch_tokens: 512,
        }
    }
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
    max_sequences: usize,
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
        if matches!(config.device, DeviceChoice::Cuda(_)) {
            return Err(Error::UnsupportedModel(
                "the batched engine runs on the CPU only for now; set model_provider.gpu_layers to 0".into(),
            ));
        }
        let context_length = [Some(metadata.context_length), Some(MAX_CONTEXT), config.max_context]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(MAX_CONTEXT);
        let model = Llama::load(&content, &mut file, context_length)?;
        let eos: Vec<u32> = metadata
            .eos_token_id
            .into_iter()
            .chain(["<|im_end|>", "<|eot_id|>", "<|end|>", "</s>"].iter().filter_map(|t| tokenizer.token_id(t)))
            .collect();
        let (jobs, queue) = mpsc::channel();
        let max_sequences = config.max_batch_size.max(1);
        let compute = Compute {
            model,
            tokenizer: tokenizer.clone(),
            eos,
            context_length,
            max_batch_size: max_sequences,
            max_batch_tokens: config.max_batch_tokens.max(1),
        };
        thread::Builder::new()
            .name("moltbot-engine".into())
            .spawn(move || compute.run(queue))
            .map_err(|e| load_err(&e))?;
        let device = "cpu".to_owned();
        let name = config.name.unwrap_or_else(|| metadata.name.clone());
        tracing::info!(model = %name, path = %path.display(), context_length, max_sequences, "model loaded");
        Ok(Self {
            inner: Arc::new(Inner { jobs, tokenizer, template, name, metadata, context_length, max_sequences, device }),
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
        self.inner.max_sequences
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

/// A sequence in the running set.
struct Active {
    events: UnboundedSender<GenerationEvent>,
    sampler: Sampler,
    stops: StopMatcher,
    detok: Detokenizer,
    /// Prompt and generated tokens; those past `cache.len()` are still to be fed to the model.
    tokens: Vec<u32>,
    cache: KvCache,
    prompt_tokens: usize,
    generated: usize,
    max_new: usize,
}

struct Compute {
    model: Llama,
    tokenizer: Tokenizer,
    eos: Vec<u32>,
    context_length: usize,
    max_batch_size: usize,
    max_batch_tokens: usize,
}

impl Compute {
    /// The scheduler: every step admits waiting requests (first come, first served) while there is room, drops
    /// cancelled ones, and runs one forward pass over a decode token of every generating sequence plus chunks
    /// of prompts, within `max_batch_tokens`.
    fn run(mut self, queue: mpsc::Receiver<Job>) {
        let mut waiting: VecDeque<Job> = VecDeque::new();
        let mut running: Vec<Active> = Vec::new();
        loop {
            if running.is_empty() && waiting.is_empty() {
                match queue.recv() {
                    Ok(job) => waiting.push_back(job),
                    Err(_) => break,
                }
            }
            waiting.extend(queue.try_iter());
            waiting.retain(|job| !job.events.is_closed());
            while running.len() < self.max_batch_size {
                let Some(job) = waiting.pop_front() else { break };
                running.push(self.admit(job));
            }
            // A request whose caller went away leaves the batch now; its cache is freed with it.
            running.retain(|a| !a.events.is_closed());
            if running.is_empty() {
                continue;
            }
            if let Err(e) = self.step(&mut running) {
                tracing::error!(error = %e, "generation step failed");
                for a in running.drain(..) {
                    let _ = a.events.send(GenerationEvent::Failed(e.to_string()));
                }
            }
        }
        tracing::debug!("engine compute thread stopped");
    }

    fn admit(&self, job: Job) -> Active {
        let Job { tokens, sampling, events } = job;
        let prompt_tokens = tokens.len();
        Active {
            events,
            sampler: Sampler::new(&sampling),
            stops: StopMatcher::new(sampling.stop.clone()),
            detok: Detokenizer::new(&tokens),
            max_new: (sampling.max_tokens as usize).min(self.context_length - prompt_tokens),
            tokens,
            cache: KvCache::new(&self.model.config),
            prompt_tokens,
            generated: 0,
        }
    }

    /// One forward pass and one sampled token for every sequence whose whole prompt is in.
    fn step(&mut self, running: &mut Vec<Active>) -> Result<()> {
        // Generating sequences first (one token each), then prompt chunks in arrival order.
        let mut budget = self.max_batch_tokens;
        let mut order: Vec<usize> = (0..running.len()).collect();
        order.sort_by_key(|&i| running[i].cache.len() < running[i].prompt_tokens);
        let mut take = vec![0usize; running.len()];
        for &i in &order {
            let pending = running[i].tokens.len() - running[i].cache.len();
            take[i] = pending.min(budget);
            budget -= take[i];
        }
        let mut fed = vec![];
        let mut steps: Vec<Step<'_>> = running
            .iter_mut()
            .zip(&take)
            .enumerate()
            .filter(|(_, (_, n))| **n > 0)
            .map(|(i, (a, &n))| {
                let start = a.cache.len();
                let logits = start + n == a.tokens.len();
                fed.push((i, logits));
                Step { tokens: &a.tokens[start..start + n], cache: &mut a.cache, logits }
            })
            .collect();
        let logits = self.model.forward(&mut steps)?;
        drop(steps);
        let mut logits = logits.into_iter();
        let mut finished = vec![];
        for (i, wants) in fed {
            if !wants {
                continue;
            }
            let row = logits.next().expect("one logits row per sequence that asked");
            if let Some(reason) = self.advance(&mut running[i], &row)? {
                finished.push((i, reason));
            }
        }
        for (i, reason) in finished.into_iter().rev() {
            let a = running.swap_remove(i);
            let usage = Usage { prompt_tokens: a.prompt_tokens as u32, completion_tokens: a.generated as u32 };
            let rest = a.stops.flush_owned();
            if !rest.is_empty() {
                let _ = a.events.send(GenerationEvent::Token { text: rest, id: None });
            }
            let _ = a.events.send(GenerationEvent::Finished { reason, usage });
        }
        Ok(())
    }

    /// Samples the next token of `a`; returns why it finished, if it did.
    fn advance(&self, a: &mut Active, logits: &[f32]) -> Result<Option<FinishReason>> {
        let next = a.sampler.sample(logits, &a.tokens)?;
        if self.eos.contains(&next) {
            return Ok(Some(FinishReason::Stop));
        }
        a.generated += 1;
        a.tokens.push(next);
        let (text, hit) = a.stops.push(&a.detok.push(&self.tokenizer, next)?);
        if a.events.send(GenerationEvent::Token { text, id: Some(next) }).is_err() {
            return Ok(Some(FinishReason::Cancelled));
        }
        if hit {
            return Ok(Some(FinishReason::Stop));
        }
        Ok((a.generated >= a.max_new).then_some(FinishReason::Length))
    }
}
