//! The worker's `Inference` gRPC service.

use moltbot_engine::Prompt;
use moltbot_proto::inference::v1::{
    GenerateEvent, GenerateRequest, GetModelInfoRequest, ModelInfo, TokenizeRequest, TokenizeResponse,
    inference_server::Inference, tokenize_request::Input,
};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::{Worker, drive};

pub struct InferenceService {
    worker: Worker,
}

impl InferenceService {
    pub fn new(worker: Worker) -> Self {
        Self { worker }
    }
}

#[tonic::async_trait]
impl Inference for InferenceService {
    async fn get_model_info(&self, _: Request<GetModelInfoRequest>) -> Result<Response<ModelInfo>, Status> {
        let worker = &self.worker;
        let counts = ModelInfo {
            worker_id: worker.id.clone(),
            jobs_completed: worker.jobs_completed(),
            jobs_cancelled: worker.jobs_cancelled(),
            jobs_cancelled_in_queue: worker.jobs_cancelled_in_queue(),
            max_sequences: worker.provider.slots() as u32,
            ..Default::default()
        };
        let engine = match &worker.provider {
            crate::Provider::Local(engine) => engine,
            crate::Provider::Remote(remote) => {
                let card = remote.card();
                return Ok(Response::new(ModelInfo {
                    name: card.id,
                    architecture: "remote_api".into(),
                    context_length: card.context_length,
                    device: remote.url().to_owned(),
                    ..counts
                }));
            }
        };
        let stats = engine.stats();
        Ok(Response::new(ModelInfo {
            name: engine.name().to_owned(),
            architecture: engine.metadata().architecture.clone(),
            context_length: engine.context_length() as u32,
            vocab_size: engine.tokenizer().vocab_size() as u32,
            device: engine.device().to_owned(),
            kv_blocks_total: stats.kv_blocks_total as u64,
            kv_blocks_free: stats.kv_blocks_free as u64,
            preemptions: stats.preemptions,
            running: stats.running as u32,
            waiting: stats.waiting as u32,
            kv_blocks_cached: stats.kv_blocks_cached as u64,
            prefix_lookup_tokens: stats.prefix_lookup_tokens,
            prefix_hit_tokens: stats.prefix_hit_tokens,
            prefix_evictions: stats.prefix_evictions,
            ..counts
        }))
    }

    async fn tokenize(&self, request: Request<TokenizeRequest>) -> Result<Response<TokenizeResponse>, Status> {
        let Some(engine) = self.worker.provider.engine() else {
            return Err(Status::failed_precondition(format!(
                "model `{}` is a remote API's: its tokenizer is not here",
                self.worker.provider.name()
            )));
        };
        let (text, prompt) = match request.into_inner().input {
            Some(Input::Text(text)) => (text.clone(), Prompt::Text(text)),
            Some(Input::Chat(chat)) => {
                let messages: Vec<_> =
                    chat.messages.into_iter().map(|m| moltbot_engine::ChatMessage::new(m.role, m.content)).collect();
                (engine.render(&messages).map_err(crate::drive::status)?, Prompt::Chat(messages))
            }
            None => return Err(Status::invalid_argument("input is required")),
        };
        let ids = engine.tokenize(&prompt).map_err(crate::drive::status)?;
        Ok(Response::new(TokenizeResponse { ids, text }))
    }

    type GenerateStream = ReceiverStream<Result<GenerateEvent, Status>>;

    async fn generate(&self, request: Request<GenerateRequest>) -> Result<Response<Self::GenerateStream>, Status> {
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let (events_tx, mut events_rx) = tokio::sync::mpsc::channel(64);
        let worker = self.worker.clone();
        let cancelled = CancellationToken::new();
        let mut request = request.into_inner();
        // A direct call's generation joins the call's trace (a queued job carries its turn's).
        if request.trace_context.is_empty() {
            request.trace_context = moltbot_telemetry::trace::current();
        }
        tokio::spawn(drive(worker, request, 0, cancelled.clone(), events_tx));
        tokio::spawn(async move {
            // Stops the generation when the client goes away.
            let _guard = cancelled.drop_guard();
            while let Some(event) = events_rx.recv().await {
                if tx.send(Ok(event)).await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
