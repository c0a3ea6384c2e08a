//! The engine handle and its scheduler thread. Callers `submit` a request and read its events; dropping the
//! `Generation` cancels it. The model lives on one thread that batches every running request into each step.

use std::{
    collections::{HashSet, VecDeque},
    fs::File,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed},
        mpsc,
    },
    thread,
};

use candle_core::quantized::gguf_file;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

use crate::{
    ChatMessage, ChatTemplate, Detokenizer, Error, FinishReason, ModelMetadata, Result, SamplingParams, StopMatcher,
    Tokenizer, ToolCall, ToolCallParser, Tools, Usage,
    model::{BLOCK_SIZE, KvCache, KvPool, Model, Quantization, Step, device::DeviceModel},
    sampling::Sampler,
};

/// The longest context the engine keeps, whatever the model supports.
pub const MAX_CONTEXT: usize = 8192;

/// Where the model runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum DeviceChoice {
    /// The engine's own CPU kernels: the fastest way on a CPU.
    #[default]
    Cpu,
    /// The device path ([`crate::model::device`]) with the last `layers` layers and the output projection on CUDA
    /// device `ordinal` (every layer when `layers` is at least the model's count) and the first ones on candle's
    /// CPU device, as llama.cpp's `--n-gpu-layers` (`model_provider.gpu_layers`). Needs a build with the `cuda`
    /// feature.
    Cuda { ordinal: usize, layers: usize },
    /// The device path with every layer on candle's CPU device: what the tests compare with the CPU kernels
    /// where no GPU is (`moltbot bench --device candle-cpu` times it).
    CandleCpu,
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
    /// How long a step may take while sequences are generating: prompt chunks shrink to what fits in it at the
    /// measured cost per token, so running streams keep flowing while a long prompt is read.
    pub max_step: std::time::Duration,
    /// Compute threads; all cores when unset.
    pub threads: Option<usize>,
    /// Memory for the KV cache; the context window shrinks to fit when it cannot hold one whole context.
    pub kv_cache: KvBudget,
    /// Requests that may wait for a place in the batch; `submit` refuses more with `Error::Overloaded`.
    pub max_waiting: usize,
    /// The most prompt tokens a request may have, below the context window: a chat loses its oldest turns to fit
    /// it, and one whose newest message alone does not is refused (`Error::PromptOverCap`). Unset: the window.
    pub max_prompt_tokens: Option<usize>,
    /// Keeps the KV blocks of finished sequences for reuse by later requests that start with the same tokens
    /// (a conversation's next turn, a shared system prompt).
    pub prefix_caching: bool,
    /// Re-quantizes wide weights at load (`model_provider.quantization`).
    pub quantization: Quantization,
    /// Memory the model may take, in bytes; what the machine or container has available when unset. Start-up
    /// refuses a model, KV cache and working memory that would not fit.
    pub memory_limit: Option<u64>,
}

/// How big the KV-cache pool is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvBudget {
    Bytes(usize),
    /// Exactly this many blocks of `model::BLOCK_SIZE` positions.
    Blocks(usize),
}

/// A snapshot of the scheduler, refreshed after every step.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineStats {
    pub kv_blocks_total: usize,
    pub kv_blocks_free: usize,
    pub running: usize,
    pub waiting: usize,
    /// Sequences evicted from the batch (and later recomputed) because the KV cache ran out, since start.
    pub preemptions: u64,
    /// Of the free blocks, those holding a cached prefix (reusable until evicted).
    pub kv_blocks_cached: usize,
    /// Prompt tokens looked up in the prefix cache on admission, since start.
    pub prefix_lookup_tokens: u64,
    /// Of those, tokens whose keys and values were reused instead of computed.
    pub prefix_hit_tokens: u64,
    /// Cached blocks evicted to make room, since start.
    pub prefix_evictions: u64,
    /// Forward passes of the batch since start, the sequences and the tokens they fed (their ratios to `steps`:
    /// the mean batch size and tokens per step).
    pub steps: u64,
    pub step_sequences: u64,
    pub step_tokens: u64,
}

#[derive(Default)]
struct SharedStats {
    kv_blocks_total: AtomicUsize,
    kv_blocks_free: AtomicUsize,
    running: AtomicUsize,
    waiting: AtomicUsize,
    preemptions: AtomicU64,
    kv_blocks_cached: AtomicUsize,
    prefix_lookup_tokens: AtomicU64,
    prefix_hit_tokens: AtomicU64,
    prefix_evictions: AtomicU64,
    /// Submitted requests not yet admitted to the batch for the first time.
    queued: AtomicUsize,
    steps: AtomicU64,
    step_sequences: AtomicU64,
    step_tokens: AtomicU64,
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
            max_batch_tokens: 1024,
            max_step: std::time::Duration::from_millis(200),
            threads: None,
            kv_cache: KvBudget::Bytes(1 << 30),
            max_waiting: 1024,
            max_prompt_tokens: None,
            prefix_caching: true,
            quantization: Quantization::None,
            memory_limit: None,
        }
    }
}

#[derive(Debug, Clone)]
pub enum Prompt {
    /// Used as is.
    Text(String),
    /// Rendered with the model's chat template.
    Chat(Vec<ChatMessage>),
}

pub struct GenerationRequest {
    pub prompt: Prompt,
    pub sampling: SamplingParams,
    /// Functions the model may call (a chat prompt only): shown to it through its template or the fallback prompt,
    /// forced by a grammar when the choice says so, and read back from its output as `ToolCalls`.
    pub tools: Option<Tools>,
}

impl GenerationRequest {
    /// A request without tools.
    pub fn new(prompt: Prompt, sampling: SamplingParams) -> Self {
        Self { prompt, sampling, tools: None }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum GenerationEvent {
    /// Text completed by a sampled token (`id`), or held-back text released at the end (`id` is `None`).
    Token {
        text: String,
        id: Option<u32>,
    },
    /// The calls the answer made, just before `Finished` (with `FinishReason::ToolCalls`).
    ToolCalls(Vec<ToolCall>),
    Finished {
        reason: FinishReason,
        usage: Usage,
    },
    Failed(String),
}

/// A running generation. Dropping it cancels the request.
pub struct Generation {
    pub prompt_tokens: u32,
    /// Oldest chat messages left out so the conversation fits the context window.
    pub trimmed_messages: u32,
    events: UnboundedReceiver<GenerationEvent>,
    /// Reads tool calls out of the answer when the request has tools.
    calls: Option<ToolCallParser>,
    /// Events made at the end, to hand out one by one.
    ending: std::collections::VecDeque<GenerationEvent>,
}

impl Generation {
    /// The next event; `None` after `Finished` or `Failed`.
    pub async fn next(&mut self) -> Option<GenerationEvent> {
        if let Some(event) = self.ending.pop_front() {
            return Some(event);
        }
        let event = self.events.recv().await?;
        let Some(parser) = &mut self.calls else { return Some(event) };
        match event {
            GenerationEvent::Token { text, id } => Some(GenerationEvent::Token { text: parser.push(&text), id }),
            GenerationEvent::Finished { reason, usage } => {
                let (rest, calls) = self.calls.take().map(ToolCallParser::finish).unwrap_or_default();
                let reason = if calls.is_empty() { reason } else { FinishReason::ToolCalls };
                if !rest.is_empty() {
                    self.ending.push_back(GenerationEvent::Token { text: rest, id: None });
                }
                if !calls.is_empty() {
                    self.ending.push_back(GenerationEvent::ToolCalls(calls));
                }
                self.ending.push_back(GenerationEvent::Finished { reason, usage });
                self.ending.pop_front()
            }
            other => Some(other),
        }
    }

    /// Collects the whole answer (for tests and benchmarks).
    pub async fn collect(self) -> Result<(String, FinishReason, Usage)> {
        self.collect_calls().await.map(|(text, _, reason, usage)| (text, reason, usage))
    }

    /// Collects the whole answer and the tool calls it made.
    pub async fn collect_calls(mut self) -> Result<(String, Vec<ToolCall>, FinishReason, Usage)> {
        let mut text = String::new();
        let mut calls = vec![];
        while let Some(event) = self.next().await {
            match event {
                GenerationEvent::Token { text: piece, .. } => text.push_str(&piece),
                GenerationEvent::ToolCalls(made) => calls = made,
                GenerationEvent::Finished { reason, usage } => return Ok((text, calls, reason, usage)),
                GenerationEvent::Failed(message) => return Err(Error::InvalidRequest(message)),
            }
        }
        Err(Error::Stopped)
    }
}

struct Job {
    tokens: Vec<u32>,
    sampling: SamplingParams,
    guide: Option<crate::constraint::Guide>,
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
    /// Bytes the model's weights take in memory.
    weight_bytes: usize,
    max_sequences: usize,
    max_waiting: usize,
    /// Prompt tokens a request may have: the window or the configured cap below it.
    max_prompt: Option<usize>,
    device: String,
    stats: Arc<SharedStats>,
    grammars: crate::constraint::Grammars,
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
        let mut magic = [0u8; 4];
        if std::io::Read::read_exact(&mut file, &mut magic).is_err() {
            return Err(load_err(&"the file is shorter than a GGUF header: download it again"));
        }
        if &magic != b"GGUF" {
            return Err(load_err(&format!(
                "not a GGUF file (it starts with {magic:02x?}; GGUF files start with `GGUF`): point \
                 model_provider.model_path at a .gguf file, or set model_provider.model to a packaged model"
            )));
        }
        std::io::Seek::rewind(&mut file).map_err(|e| load_err(&e))?;
        let content = gguf_file::Content::read(&mut file).map_err(|e| {
            load_err(&format!(
                "its GGUF header cannot be read ({e}): the file is damaged, or uses a tensor type or GGUF version \
                 this engine does not know"
            ))
        })?;
        // Every tensor must lie within the file: a download cut short fails here, not halfway through loading.
        let needed = content
            .tensor_infos
            .values()
            .map(|t| {
                let bytes = t.shape.elem_count() / t.ggml_dtype.block_size() * t.ggml_dtype.type_size();
                content.tensor_data_offset + t.offset + bytes as u64
            })
            .max()
            .unwrap_or(0);
        let size = file.metadata().map_err(|e| load_err(&e))?.len();
        if size < needed {
            return Err(load_err(&format!(
                "the file is cut short: it has {size} bytes and its tensors need {needed}; download it again \
                 (`cargo xtask model` checks a packaged model's sha256)"
            )));
        }
        let mut metadata = ModelMetadata::from_gguf(&content)?;
        let tokenizer = Tokenizer::from_metadata(&metadata)?;
        let template = ChatTemplate::new(
            Some(metadata.chat_template.as_deref().unwrap_or(crate::template::fallback_template(&metadata.tokens))),
            metadata.bos_token_id.and_then(|id| tokenizer.token_text(id)).unwrap_or_default(),
            metadata.eos_token_id.and_then(|id| tokenizer.token_text(id)).unwrap_or_default(),
        )?;
        // The tokenizer holds the vocabulary now, in a fraction of the memory.
        metadata.drop_vocabulary();
        let mut context_length = [Some(metadata.context_length), Some(MAX_CONTEXT), config.max_context]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(MAX_CONTEXT);
        crate::model::check_tensor_types(&content, path)?;
        let shape = crate::model::ModelConfig::read(&content)?;
        let blocks = match config.kv_cache {
            KvBudget::Blocks(n) => n,
            KvBudget::Bytes(bytes) => bytes / KvPool::block_bytes(&shape),
        };
        let mut host = crate::memory::MemoryPlan::new(
            &content,
            &shape,
            config.quantization,
            blocks,
            config.max_batch_tokens,
            config.max_batch_size.max(1),
        );
        let placement = Placement::open(config.device, shape.n_layer)?;
        let mut weights_on_gpu = 0;
        if let Some((device, layers)) = placement.gpu() {
            let gpu = crate::memory::DevicePlan::new(
                &content,
                &shape,
                config.quantization,
                blocks,
                layers,
                config.max_batch_tokens,
                config.max_batch_size.max(1),
                context_length,
            );
            crate::memory::check_device(&gpu, &device_memory(device)?, path)?;
            // What went to the GPU does not stay in the host's memory.
            weights_on_gpu = gpu.weights;
            host.weights = host.weights.saturating_sub(gpu.moved);
            host.kv_cache = host.kv_cache.saturating_sub(gpu.kv_cache);
        }
        crate::memory::check(&host, config.memory_limit.or_else(crate::memory::available_memory), path)?;
        let mut model = match &placement {
            Placement::Kernels => {
                Backend::Kernels(Model::load(&content, &mut file, path, context_length, config.quantization)?)
            }
            Placement::Devices(devices) => Backend::Device(DeviceModel::load(
                &content,
                &mut file,
                path,
                context_length,
                config.quantization,
                devices.clone(),
                blocks,
            )?),
        };
        if blocks * BLOCK_SIZE < context_length {
            // One sequence must always fit whole, or the oldest sequence could not finish.
            tracing::warn!(
                kv_blocks = blocks,
                context_length,
                "the KV cache cannot hold a whole context window; the window shrinks to fit"
            );
            context_length = blocks * BLOCK_SIZE;
            model.set_max_positions(context_length);
        }
        if context_length < 2 {
            return Err(load_err(&"the KV cache is too small for even one block; raise its budget"));
        }
        let weight_bytes = match &model {
            Backend::Kernels(m) => m.weight_bytes(),
            Backend::Device(_) => (host.weights + weights_on_gpu) as usize,
        };
        let pool = match &model {
            Backend::Kernels(_) => KvPool::new(model.config(), blocks, config.prefix_caching),
            Backend::Device(_) => KvPool::without_storage(model.config(), blocks, config.prefix_caching),
        };
        let stats = Arc::new(SharedStats::default());
        stats.kv_blocks_total.store(blocks, Relaxed);
        stats.kv_blocks_free.store(blocks, Relaxed);
        let eos: Vec<u32> = metadata
            .eos_token_id
            .into_iter()
            .chain(
                ["<|im_end|>", "<|eot_id|>", "<|end|>", "</s>", "<end_of_turn>"]
                    .iter()
                    .filter_map(|t| tokenizer.token_id(t)),
            )
            .collect();
        let grammars = crate::constraint::Grammars::new(&tokenizer, &eos, model.config().vocab);
        let (jobs, queue) = mpsc::channel();
        let max_sequences = config.max_batch_size.max(1);
        let compute = Compute {
            model,
            pool,
            stats: stats.clone(),
            arrivals: 0,
            tokenizer: tokenizer.clone(),
            eos,
            context_length,
            max_batch_size: max_sequences,
            budget: StepBudget::new(config.max_batch_tokens, config.max_step),
        };
        // The scheduler runs on a worker of the engine's own pool, so each step's parallel work starts on the
        // thread that asks for it instead of being handed across threads.
        let threads = config
            .threads
            .filter(|&n| n > 0)
            .unwrap_or_else(|| thread::available_parallelism().map(std::num::NonZeroUsize::get).unwrap_or(1));
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("moltbot-engine-{i}"))
            .build()
            .map_err(|e| load_err(&e))?;
        thread::Builder::new()
            .name("moltbot-engine".into())
            .spawn(move || pool.install(move || compute.run(queue)))
            .map_err(|e| load_err(&e))?;
        let device = placement.describe();
        let name = config.name.unwrap_or_else(|| metadata.name.clone());
        tracing::info!(
            model = %name, path = %path.display(), %device, context_length, max_sequences, kv_blocks = blocks,
            threads, weights_mib = weight_bytes >> 20, "model loaded"
        );
        let max_waiting = config.max_waiting.max(1);
        Ok(Self {
            inner: Arc::new(Inner {
                jobs,
                tokenizer,
                template,
                name,
                metadata,
                context_length,
                weight_bytes,
                max_sequences,
                max_waiting,
                max_prompt: config.max_prompt_tokens,
                device,
                stats,
                grammars,
            }),
        })
    }

    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The model's metadata, without its vocabulary (that is in [`Engine::tokenizer`]).
    pub fn metadata(&self) -> &ModelMetadata {
        &self.inner.metadata
    }

    pub fn context_length(&self) -> usize {
        self.inner.context_length
    }

    /// Bytes the model's weights take in memory (quantized blocks as the file stores them).
    pub fn weight_bytes(&self) -> usize {
        self.inner.weight_bytes
    }

    pub fn device(&self) -> &str {
        &self.inner.device
    }

    /// How many sequences generate at once.
    pub fn max_sequences(&self) -> usize {
        self.inner.max_sequences
    }

    /// The scheduler's state after its last step.
    pub fn stats(&self) -> EngineStats {
        let s = &self.inner.stats;
        EngineStats {
            kv_blocks_total: s.kv_blocks_total.load(Relaxed),
            kv_blocks_free: s.kv_blocks_free.load(Relaxed),
            running: s.running.load(Relaxed),
            waiting: s.waiting.load(Relaxed),
            preemptions: s.preemptions.load(Relaxed),
            kv_blocks_cached: s.kv_blocks_cached.load(Relaxed),
            prefix_lookup_tokens: s.prefix_lookup_tokens.load(Relaxed),
            prefix_hit_tokens: s.prefix_hit_tokens.load(Relaxed),
            prefix_evictions: s.prefix_evictions.load(Relaxed),
            steps: s.steps.load(Relaxed),
            step_sequences: s.step_sequences.load(Relaxed),
            step_tokens: s.step_tokens.load(Relaxed),
        }
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.inner.tokenizer
    }

    pub fn render(&self, messages: &[ChatMessage]) -> Result<String> {
        self.inner.template.render(messages)
    }

    /// Tokenizes a prompt as `submit` would. A raw text prompt may hold special tokens; in a chat, only the
    /// template's markers become special tokens, never what a message says.
    pub fn tokenize(&self, prompt: &Prompt) -> Result<Vec<u32>> {
        match prompt {
            Prompt::Text(text) => self.inner.tokenizer.encode(text),
            Prompt::Chat(messages) => self.tokenize_chat(messages, None),
        }
    }

    fn tokenize_chat(&self, messages: &[ChatMessage], tools: Option<&Tools>) -> Result<Vec<u32>> {
        let tokenizer = &self.inner.tokenizer;
        let template = &self.inner.template;
        let messages = template.with_tools(messages, tools);
        // Messages without special-token text render with their own content, so a template that transforms it
        // (`| trim`, `.split(...)`) does so; only where a message holds such text does it go in as a placeholder.
        if !messages.iter().any(|m| tokenizer.has_special(&m.content)) {
            return tokenizer.encode(&template.render_with(&messages, tools)?);
        }
        let pieces = template.render_pieces(&messages, tools)?;
        let pieces: Vec<_> = pieces.iter().map(crate::template::OwnedPiece::as_piece).collect();
        self.inner.tokenizer.encode_pieces(&pieces)
    }

    /// Fits a conversation into the context window, leaving room for a reply of `max_tokens` (at most half the
    /// window): the oldest turns go first, a turn being a user message and everything after it up to the next
    /// one, so a tool call never loses its result. Leading system messages and the last message always stay;
    /// when they alone do not fit, the prompt is too long. Returns the kept messages' tokens and how many
    /// messages were left out.
    pub fn fit_chat(
        &self,
        messages: &[ChatMessage],
        tools: Option<&Tools>,
        max_tokens: u32,
    ) -> Result<(Vec<u32>, usize)> {
        let budget = self.inner.context_length - (max_tokens as usize).clamp(1, self.inner.context_length / 2);
        let budget = budget.min(self.inner.max_prompt.unwrap_or(usize::MAX));
        let system = messages.iter().take_while(|m| m.role == "system").count();
        // Where each droppable turn starts: every user message after the system prompt, save the last message.
        let cuts: Vec<usize> = (system + 1..messages.len().saturating_sub(1))
            .filter(|&i| messages[i].role == "user")
            .chain(std::iter::once(messages.len().saturating_sub(1)).filter(|&last| last > system))
            .collect();
        let render = |drop_to: usize| -> Result<Vec<u32>> {
            let kept: Vec<ChatMessage> = messages[..system].iter().chain(&messages[drop_to..]).cloned().collect();
            self.tokenize_chat(&kept, tools)
        };
        let all = render(system)?;
        if all.len() <= budget || cuts.is_empty() {
            return Ok((all, 0));
        }
        // Binary search for the fewest dropped turns that fit; fewer kept messages never take more tokens.
        let (mut lo, mut hi) = (0, cuts.len() - 1);
        let mut best = render(cuts[hi])?;
        if best.len() > budget {
            return Ok((best, cuts[hi] - system));
        }
        while lo < hi {
            let mid = (lo + hi) / 2;
            let tokens = render(cuts[mid])?;
            if tokens.len() <= budget {
                (hi, best) = (mid, tokens);
            } else {
                lo = mid + 1;
            }
        }
        Ok((best, cuts[hi] - system))
    }

    /// Validates and queues a request. Errors here (bad parameters, prompt too long) are the caller's. A chat
    /// longer than the context window loses its oldest turns first (`fit_chat`).
    pub fn submit(&self, request: GenerationRequest) -> Result<Generation> {
        let GenerationRequest { prompt, mut sampling, tools } = request;
        sampling.validate()?;
        if let Some(tools) = &tools {
            tools.validate()?;
            if matches!(prompt, Prompt::Text(_)) {
                return Err(Error::InvalidRequest("tools need a chat prompt".into()));
            }
            if let Some(grammar) = tools.forced_grammar(crate::constraint::WHITESPACE) {
                if sampling.constraint.is_some() {
                    return Err(Error::InvalidRequest(
                        "a forced tool_choice and a response_format cannot be combined".into(),
                    ));
                }
                sampling.constraint = Some(crate::Constraint::Lark(grammar));
            }
        }
        let calls = tools.as_ref().and_then(ToolCallParser::new);
        if let Some(tools) = tools.as_ref().filter(|t| t.active()) {
            // A model that made its call and goes on to imagine the result stops there; without parallel calls, it
            // stops after its first.
            let mut ends = vec![crate::tools::OPEN_RESPONSE];
            if !tools.parallel {
                ends.push(crate::tools::CLOSE_CALL);
            }
            for end in ends {
                if !sampling.stop.iter().any(|s| s == end) {
                    sampling.stop.push(end.to_owned());
                }
            }
        }
        let (tokens, trimmed_messages) = match &prompt {
            Prompt::Chat(messages) => self.fit_chat(messages, tools.as_ref(), sampling.max_tokens)?,
            Prompt::Text(_) => (self.tokenize(&prompt)?, 0),
        };
        if tokens.is_empty() {
            return Err(Error::InvalidRequest("the prompt is empty".into()));
        }
        if tokens.len() >= self.inner.context_length {
            return Err(Error::PromptTooLong {
                prompt_tokens: tokens.len(),
                context_length: self.inner.context_length,
            });
        }
        if let Some(max_prompt_tokens) = self.inner.max_prompt
            && tokens.len() > max_prompt_tokens
        {
            return Err(Error::PromptOverCap { prompt_tokens: tokens.len(), max_prompt_tokens });
        }
        // The grammar is compiled here, on the caller's thread: the compute thread only steps it.
        let guide = sampling.constraint.as_ref().map(|c| self.inner.grammars.guide(c)).transpose()?;
        let prompt_tokens = tokens.len() as u32;
        let queued = &self.inner.stats.queued;
        let waiting = queued.fetch_add(1, Relaxed);
        if waiting >= self.inner.max_waiting {
            queued.fetch_sub(1, Relaxed);
            return Err(Error::Overloaded { waiting });
        }
        let (events, rx) = unbounded_channel();
        if self.inner.jobs.send(Job { tokens, sampling, guide, events }).is_err() {
            queued.fetch_sub(1, Relaxed);
            return Err(Error::Stopped);
        }
        Ok(Generation {
            prompt_tokens,
            trimmed_messages: trimmed_messages as u32,
            events: rx,
            calls,
            ending: Default::default(),
        })
    }
}

/// Steps' worth of time (`max_step`) after which a prompt still being read goes ahead of shorter ones.
const STARVING: u32 = 10;

/// A sequence in the waiting queue or the running set.
struct Active {
    events: UnboundedSender<GenerationEvent>,
    sampler: Sampler,
    stops: StopMatcher,
    detok: Detokenizer,
    /// Prompt and generated tokens; those past `cache.len()` are still to be fed to the model.
    tokens: Vec<u32>,
    cache: KvCache,
    prompt_tokens: usize,
    max_new: usize,
    /// End-of-text is held back until this many tokens were generated.
    min_new: usize,
    /// Arrival order: older sequences are scheduled first and preempted last.
    arrival: u64,
    /// When it was admitted to the batch: a prompt read for too long goes ahead of shorter ones (`step`).
    admitted: std::time::Instant,
    /// Still counted against `max_waiting` (never admitted yet).
    queued: bool,
    /// Prompt tokens reused from the prefix cache on first admission.
    cached_tokens: usize,
    /// Keeps the output inside the request's grammar (`SamplingParams::constraint`).
    guide: Option<crate::constraint::Guide>,
}

impl Active {
    /// Tokens sampled so far.
    fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_tokens
    }

    /// Tokens not in the KV cache yet: one while decoding, more for a prompt or a recomputation.
    fn pending(&self) -> usize {
        self.tokens.len() - self.cache.len()
    }
}

/// The forward pass a scheduler drives: the CPU kernels, or the device path.
enum Backend {
    Kernels(Model),
    Device(DeviceModel),
}

impl Backend {
    fn config(&self) -> &crate::model::ModelConfig {
        match self {
            Self::Kernels(m) => &m.config,
            Self::Device(m) => m.config(),
        }
    }

    fn set_max_positions(&mut self, positions: usize) {
        match self {
            Self::Kernels(m) => m.set_max_positions(positions),
            Self::Device(m) => m.set_max_positions(positions),
        }
    }

    fn forward(&self, pool: &mut KvPool, steps: &mut [Step<'_>]) -> Result<Vec<Vec<f32>>> {
        match self {
            Self::Kernels(m) => m.forward(pool, steps),
            Self::Device(m) => m.forward(steps),
        }
    }
}

/// Where each layer runs, from [`DeviceChoice`].
enum Placement {
    Kernels,
    /// The device path: each layer's device.
    Devices(Vec<candle_core::Device>),
}

impl Placement {
    /// Opens the devices `choice` names for a model of `n_layer` layers.
    fn open(choice: DeviceChoice, n_layer: usize) -> Result<Self> {
        Ok(match choice {
            DeviceChoice::Cpu => Self::Kernels,
            DeviceChoice::CandleCpu => Self::Devices(vec![candle_core::Device::Cpu; n_layer]),
            DeviceChoice::Cuda { ordinal, layers } => {
                let gpu = open_cuda(ordinal)?;
                let first = n_layer.saturating_sub(layers);
                Self::Devices(
                    (0..n_layer).map(|l| if l >= first { gpu.clone() } else { candle_core::Device::Cpu }).collect(),
                )
            }
        })
    }

    /// The GPU and how many layers it holds, if any.
    fn gpu(&self) -> Option<(&candle_core::Device, usize)> {
        let Self::Devices(devices) = self else { return None };
        let gpu = devices.iter().find(|d| !d.is_cpu())?;
        Some((gpu, devices.iter().filter(|d| !d.is_cpu()).count()))
    }

    /// `cpu`, `cpu (device path)`, or `cuda:0 (24 of 30 layers)`.
    fn describe(&self) -> String {
        match (self, self.gpu()) {
            (Self::Kernels, _) => "cpu".into(),
            (Self::Devices(_), None) => "cpu (device path)".into(),
            (Self::Devices(devices), Some((gpu, layers))) => {
                format!("{} ({layers} of {} layers)", crate::model::device::device_name(gpu), devices.len())
            }
        }
    }
}

/// CUDA device `ordinal`, or why it cannot be used: it cannot be opened, or this build's kernels were compiled
/// for another generation of GPU (`CUDA_COMPUTE_CAP` at build time; candle's kernels are machine code for that
/// generation, and would fail to launch, or leave their output unwritten, on another).
#[cfg(feature = "cuda")]
fn open_cuda(ordinal: usize) -> Result<candle_core::Device> {
    let device = candle_core::Device::new_cuda(ordinal).map_err(|e| {
        Error::NoDevice(format!(
            "CUDA device {ordinal} cannot be opened ({e}): check that `nvidia-smi` lists it, that its driver supports \
             the CUDA release MoltBot was built with (CUDA 13.0: driver 580 or later) and that CUDA_VISIBLE_DEVICES \
             includes it; or set model_provider.gpu_layers: 0 to run on the CPU"
        ))
    })?;
    let (major, minor) = device
        .as_cuda_device()?
        .cuda_stream()
        .context()
        .compute_capability()
        .map_err(|e| Error::NoDevice(format!("CUDA device {ordinal}'s compute capability cannot be read: {e}")))?;
    if let Some(built) = option_env!("CUDA_COMPUTE_CAP").and_then(|cap| cap.parse::<i32>().ok())
        && (major != built / 10 || minor < built % 10)
    {
        return Err(Error::NoDevice(format!(
            "CUDA device {ordinal} has compute capability {major}.{minor}, but this build's kernels are for {}.{} \
             (CUDA_COMPUTE_CAP={built}): rebuild with CUDA_COMPUTE_CAP={major}{minor} (the image: --build-arg), or \
             set model_provider.gpu_layers: 0 to run on the CPU",
            built / 10,
            built % 10
        )));
    }
    Ok(device)
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(_ordinal: usize) -> Result<candle_core::Device> {
    Err(Error::NoDevice(
        "model_provider.gpu_layers is above 0 but this build has no CUDA support: build with `--features cuda` \
         (`cargo xtask cuda`, or the GPU image) and run where an NVIDIA driver is, or set \
         model_provider.gpu_layers: 0 to run on the CPU"
            .into(),
    ))
}

/// The GPU's name and its free and total memory.
#[cfg(feature = "cuda")]
fn device_memory(device: &candle_core::Device) -> Result<crate::memory::DeviceMemory> {
    let context = device.as_cuda_device()?.cuda_stream().context().clone();
    let failed = |e: &dyn std::fmt::Display| Error::NoDevice(format!("the GPU's memory cannot be read: {e}"));
    let (free, total) = context.mem_get_info().map_err(|e| failed(&e))?;
    let name = context.name().map_err(|e| failed(&e))?;
    Ok(crate::memory::DeviceMemory {
        name: format!("{name} ({})", crate::model::device::device_name(device)),
        free: free as u64,
        total: total as u64,
    })
}

#[cfg(not(feature = "cuda"))]
fn device_memory(_device: &candle_core::Device) -> Result<crate::memory::DeviceMemory> {
    Err(Error::NoDevice("this build has no CUDA support".into()))
}

struct Compute {
    model: Backend,
    pool: KvPool,
    stats: Arc<SharedStats>,
    arrivals: u64,
    tokenizer: Tokenizer,
    eos: Vec<u32>,
    context_length: usize,
    max_batch_size: usize,
    budget: StepBudget,
}

/// How many tokens a step may take: `max_batch_tokens`, and no more than fit in `max_step` at the measured cost
/// of a prompt token while sequences are generating (at least a chunk of 16 beside their decode tokens), or in
/// five times that while only prompts are read: larger chunks read a prompt faster, and a cancelled request still
/// stops within about a second.
#[derive(Debug, Clone, Copy)]
struct StepBudget {
    max_batch_tokens: usize,
    max_step: std::time::Duration,
    /// What a token of a step that mostly read prompts has cost lately (a moving average), once measured.
    secs_per_token: Option<f64>,
}

impl StepBudget {
    fn new(max_batch_tokens: usize, max_step: std::time::Duration) -> Self {
        Self { max_batch_tokens: max_batch_tokens.max(1), max_step, secs_per_token: None }
    }

    /// The tokens of the next step, with `decoding` sequences generating.
    fn tokens(&self, decoding: usize) -> usize {
        let Some(cost) = self.secs_per_token else { return self.max_batch_tokens };
        let time = if decoding > 0 { self.max_step } else { self.max_step * 5 };
        let in_time = (time.as_secs_f64() / cost.max(1e-9)) as usize;
        in_time.max(decoding + 16).min(self.max_batch_tokens.max(decoding))
    }

    /// A step of `fed` tokens, `decoding` of them one token of a generating sequence, took `secs`. The budget is
    /// for prompt chunks, so only steps that mostly read prompts tell what a token costs: a decode step pays for
    /// reading every weight with one token per sequence, several times a prompt token's share, and counting it
    /// split a follow-up turn that arrived beside a running stream into chunks (each one reading the whole cached
    /// context again).
    fn observe(&mut self, fed: usize, decoding: usize, secs: f64) {
        if fed > 0 && fed >= 2 * decoding {
            let cost = secs / fed as f64;
            self.secs_per_token = Some(self.secs_per_token.map_or(cost, |avg| 0.8 * avg + 0.2 * cost));
        }
    }
}

impl Compute {
    /// The scheduler. Every step it drops cancelled requests (freeing their KV blocks), gives every running
    /// sequence the blocks its next tokens need (preempting the newest sequences when the pool runs dry),
    /// admits waiting requests first come, first served while the batch and the pool have room, and runs one
    /// forward pass over a decode token of every generating sequence plus chunks of prompts, within
    /// `max_batch_tokens`.
    fn run(mut self, queue: mpsc::Receiver<Job>) {
        let mut waiting: VecDeque<Active> = VecDeque::new();
        let mut running: Vec<Active> = Vec::new();
        loop {
            if running.is_empty() && waiting.is_empty() {
                match queue.recv() {
                    Ok(job) => waiting.push_back(self.accept(job)),
                    Err(_) => break,
                }
            }
            for job in queue.try_iter() {
                waiting.push_back(self.accept(job));
            }
            // A request whose caller went away leaves now, and its blocks go back to the pool.
            for a in waiting.iter_mut().chain(running.iter_mut()).filter(|a| a.events.is_closed()) {
                self.retire(a);
            }
            waiting.retain(|a| !a.events.is_closed());
            running.retain(|a| !a.events.is_closed());
            running.sort_by_key(|a| a.arrival);
            self.grow(&mut running, &mut waiting);
            self.admit(&mut running, &mut waiting);
            if !running.is_empty()
                && let Err(e) = self.step(&mut running)
            {
                tracing::error!(error = %e, "generation step failed");
                for mut a in running.drain(..) {
                    a.cache.release(&mut self.pool, &a.tokens);
                    let _ = a.events.send(GenerationEvent::Failed(e.to_string()));
                }
            }
            self.publish();
            self.stats.running.store(running.len(), Relaxed);
            self.stats.waiting.store(waiting.len(), Relaxed);
        }
        tracing::debug!("engine compute thread stopped");
    }

    /// Admits waiting requests first come, first served while the batch and the pool have room; a request takes
    /// the cached blocks of its prefix and computes only the rest. A request whose next prompt block a running
    /// sequence is computing right now waits for it to be cached instead of computing the same tokens beside it
    /// (sixteen users arriving together behind one long system prompt compute it once); requests behind it may
    /// go first meanwhile.
    fn admit(&mut self, running: &mut Vec<Active>, waiting: &mut VecDeque<Active>) {
        // Nothing to admit (most steps while streams decode): no prefix hashing on the step loop.
        if waiting.is_empty() || running.len() >= self.max_batch_size {
            return;
        }
        let mut in_flight: HashSet<u64> = if self.pool.caching() {
            running.iter().flat_map(|a| a.cache.unregistered(&self.pool, &a.tokens)).collect()
        } else {
            HashSet::new()
        };
        let mut i = 0;
        while running.len() < self.max_batch_size && i < waiting.len() {
            let w = &mut waiting[i];
            let reused = w.cache.reuse_prefix(&mut self.pool, &w.tokens);
            if w.cache.next_block(&self.pool, &w.tokens).is_some_and(|hash| in_flight.contains(&hash)) {
                w.cache.release(&mut self.pool, &w.tokens);
                i += 1;
                continue;
            }
            let pending = w.pending();
            if !w.cache.reserve(&mut self.pool, pending) {
                w.cache.release(&mut self.pool, &w.tokens);
                break;
            }
            self.pool.record_lookup(w.tokens.len(), reused);
            let mut a = waiting.remove(i).expect("an index below the length");
            if std::mem::take(&mut a.queued) {
                self.stats.queued.fetch_sub(1, Relaxed);
                a.cached_tokens = reused.min(a.prompt_tokens);
            }
            if self.pool.caching() {
                in_flight.extend(a.cache.unregistered(&self.pool, &a.tokens));
            }
            a.admitted = std::time::Instant::now();
            running.push(a);
        }
    }

    /// The scheduler's state for `Engine::stats`.
    fn publish(&self) {
        let (s, counters) = (&self.stats, self.pool.counters());
        s.kv_blocks_free.store(self.pool.free_blocks(), Relaxed);
        s.kv_blocks_cached.store(self.pool.cached_blocks(), Relaxed);
        s.prefix_lookup_tokens.store(counters.lookup_tokens, Relaxed);
        s.prefix_hit_tokens.store(counters.hit_tokens, Relaxed);
        s.prefix_evictions.store(counters.evictions, Relaxed);
    }

    fn accept(&mut self, job: Job) -> Active {
        let Job { tokens, sampling, guide, events } = job;
        let prompt_tokens = tokens.len();
        self.arrivals += 1;
        Active {
            events,
            sampler: Sampler::new(&sampling),
            stops: StopMatcher::new(sampling.stop.clone()),
            detok: Detokenizer::new(&tokens),
            max_new: (sampling.max_tokens as usize).min(self.context_length - prompt_tokens),
            min_new: sampling.min_tokens as usize,
            tokens,
            cache: KvCache::new(),
            prompt_tokens,
            arrival: self.arrivals,
            admitted: std::time::Instant::now(),
            queued: true,
            cached_tokens: 0,
            guide,
        }
    }

    /// Frees what a sequence that leaves holds.
    fn retire(&mut self, a: &mut Active) {
        a.cache.release(&mut self.pool, &a.tokens);
        if std::mem::take(&mut a.queued) {
            self.stats.queued.fetch_sub(1, Relaxed);
        }
    }

    /// Gives each running sequence (oldest first) blocks for its pending tokens. When the pool is dry, the newest
    /// running sequence is preempted: its blocks are freed and it goes back to the front of the waiting queue, to
    /// be recomputed from its tokens later (vLLM's recompute preemption). The pool holds at least one whole
    /// context, so the oldest sequence always fits.
    fn grow(&mut self, running: &mut Vec<Active>, waiting: &mut VecDeque<Active>) {
        let mut i = 0;
        while i < running.len() {
            let pending = running[i].pending();
            if running[i].cache.reserve(&mut self.pool, pending) {
                i += 1;
                continue;
            }
            let mut victim = running.pop().expect("running is not empty");
            victim.cache.release(&mut self.pool, &victim.tokens);
            self.stats.preemptions.fetch_add(1, Relaxed);
            tracing::debug!(arrival = victim.arrival, tokens = victim.tokens.len(), "preempted: KV cache full");
            waiting.push_front(victim);
        }
    }

    /// One forward pass and one sampled token for every sequence whose tokens are all in.
    fn step(&mut self, running: &mut Vec<Active>) -> Result<()> {
        // Generating sequences first (one token each), then prompt chunks, the shortest prompt first: a short
        // request is not held behind a long one. But a prompt admitted `STARVING` steps' time ago goes first,
        // oldest first, or a long prompt would never be read while shorter ones keep coming.
        let decoding = running.iter().filter(|a| a.pending() == 1).count();
        let mut budget = self.budget.tokens(decoding);
        let (starving, now) = (self.budget.max_step * STARVING, std::time::Instant::now());
        let mut order: Vec<usize> = (0..running.len()).collect();
        order.sort_by_key(|&i| {
            let a = &running[i];
            let prompt = a.pending() > 1;
            let starved = prompt && now.duration_since(a.admitted) > starving;
            (prompt, !starved, if starved { a.arrival as usize } else { a.pending() })
        });
        let mut take = vec![0usize; running.len()];
        for &i in &order {
            take[i] = running[i].pending().min(budget);
            budget -= take[i];
        }
        let fed_tokens: usize = take.iter().sum();
        let started = std::time::Instant::now();
        let mut fed = vec![];
        let mut guides = vec![];
        let mut steps: Vec<Step<'_>> = running
            .iter_mut()
            .zip(&take)
            .enumerate()
            .filter(|(_, (_, n))| **n > 0)
            .map(|(i, (a, &n))| {
                let start = a.cache.len();
                let logits = start + n == a.tokens.len();
                fed.push((i, logits));
                if let Some(guide) = a.guide.as_mut().filter(|_| logits) {
                    guides.push((i, guide));
                }
                Step { tokens: &a.tokens[start..start + n], cache: &mut a.cache, logits }
            })
            .collect();
        self.stats.steps.fetch_add(1, Relaxed);
        self.stats.step_sequences.fetch_add(steps.len() as u64, Relaxed);
        self.stats.step_tokens.fetch_add(fed_tokens as u64, Relaxed);
        // The grammars' masks (they depend on the tokens so far, not on the logits) are computed on the engine's
        // pool while the forward pass runs there, each sequence's apart: a constrained sequence does not hold up
        // the batch by its mask's cost.
        // A step without constrained sequences (most steps) runs the forward pass alone.
        let (logits, mut masks) = if guides.is_empty() {
            (self.model.forward(&mut self.pool, &mut steps)?, vec![])
        } else {
            let (model, pool) = (&self.model, &mut self.pool);
            let (logits, masks) = rayon::join(
                || model.forward(pool, &mut steps),
                || {
                    use rayon::prelude::*;
                    guides.par_iter_mut().map(|(i, guide)| guide.mask().map(|m| (*i, m))).collect::<Result<Vec<_>>>()
                },
            );
            (logits?, masks?)
        };
        drop(steps);
        for &(i, _) in &fed {
            let a = &mut running[i];
            a.cache.register_full(&mut self.pool, &a.tokens);
        }
        self.budget.observe(fed_tokens, decoding, started.elapsed().as_secs_f64());
        let mut logits = logits.into_iter();
        let mut finished = vec![];
        for (i, wants) in fed {
            if !wants {
                continue;
            }
            let mut row = logits.next().expect("one logits row per sequence that asked");
            let mask = masks.iter().position(|(m, _)| *m == i).map(|at| masks.swap_remove(at).1);
            if let Some(reason) = self.advance(&mut running[i], &mut row, mask)? {
                finished.push((i, reason));
            }
        }
        for (i, reason) in finished.into_iter().rev() {
            let mut a = running.swap_remove(i);
            self.retire(&mut a);
            let usage = Usage {
                prompt_tokens: a.prompt_tokens as u32,
                completion_tokens: a.generated() as u32,
                cached_tokens: a.cached_tokens as u32,
            };
            let rest = a.stops.flush_owned();
            if !rest.is_empty() {
                let _ = a.events.send(GenerationEvent::Token { text: rest, id: None });
            }
            let _ = a.events.send(GenerationEvent::Finished { reason, usage });
        }
        Ok(())
    }

    /// Samples the next token of `a` (within its grammar's `mask`, when it has one); returns why it finished, if
    /// it did.
    fn advance(
        &self,
        a: &mut Active,
        logits: &mut [f32],
        mask: Option<crate::constraint::Mask>,
    ) -> Result<Option<FinishReason>> {
        // A grammar decides when constrained output ends: holding end-of-text back after a complete document would
        // leave no token to choose.
        if a.generated() < a.min_new && a.guide.is_none() {
            // Too early to end: the end-of-text tokens cannot be chosen (the row is this step's own).
            for &id in &self.eos {
                if let Some(l) = logits.get_mut(id as usize) {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
        if let Some(mask) = mask {
            mask.apply(logits);
        }
        let next = a.sampler.sample(logits, &a.tokens)?;
        if let Some(guide) = a.guide.as_mut().filter(|_| !self.eos.contains(&next)) {
            guide.advance(next)?;
        }
        if self.eos.contains(&next) {
            return Ok(Some(FinishReason::Stop));
        }
        a.tokens.push(next);
        let (text, hit) = a.stops.push(&a.detok.push(&self.tokenizer, next)?);
        if a.events.send(GenerationEvent::Token { text, id: Some(next) }).is_err() {
            return Ok(Some(FinishReason::Cancelled));
        }
        if hit {
            return Ok(Some(FinishReason::Stop));
        }
        Ok((a.generated() >= a.max_new).then_some(FinishReason::Length))
    }
}

#[cfg(test)]
mod tests {
    use super::StepBudget;

    #[test]
    fn a_prompt_beside_running_streams_is_read_at_a_prompt_tokens_cost() {
        let mut budget = StepBudget::new(1024, std::time::Duration::from_millis(200));
        assert_eq!(budget.tokens(1), 1024, "unmeasured: max_batch_tokens");
        // A 40-token prompt read alone at 2.5 ms a token, then many steps of one stream decoding at 12 ms.
        budget.observe(40, 0, 0.1);
        for _ in 0..50 {
            budget.observe(1, 1, 0.012);
        }
        // A follow-up turn of 32 tokens arriving now is read in one step beside the stream.
        assert_eq!(budget.tokens(1), 80);
        // Mostly-prompt steps do move it: at 4 ms a token (the average now), 50 fit beside the stream, and five
        // times as many when only prompts are read.
        budget.observe(33, 1, 0.33);
        assert!((49..=50).contains(&budget.tokens(1)), "{}", budget.tokens(1));
        assert!((249..=250).contains(&budget.tokens(0)), "{}", budget.tokens(0));
        // Never less than a chunk of 16 beside the decode tokens, never more than max_batch_tokens.
        budget.observe(16, 0, 16.0);
        assert_eq!(budget.tokens(3), 19);
        assert_eq!(StepBudget::new(8, std::time::Duration::from_secs(1)).tokens(0), 8);
    }
}
