//! The job queue that decouples the dialogue-manager from the inference workers (S11).
//!
//! Two backends with one contract:
//! - **NATS**: jobs go to the JetStream work-queue stream `MOLTBOT_JOBS` (subject `moltbot.jobs.<model>`,
//!   bounded, de-duplicated by `Nats-Msg-Id`); workers pull one job per free slot from the durable consumer
//!   `workers-<model>`; events return on core subject `moltbot.events.<request_id>`; cancels go to
//!   `moltbot.cancel.<request_id>`.
//! - **Local**: a bounded in-process channel per model with the same semantics, for `moltbot serve`.
//!
//! Workers announce the model they serve every two seconds; the queue keeps what it heard (`affinity::Workers`),
//! so a requester knows the models being served (`JobQueue::models`, `JobQueue::lookup`).
//!
//! A conversation's turns go preferably to the worker that ran its earlier ones, which holds its prefix in cache
//! (`affinity`): the job is offered to that worker directly first, and queued when it does not take it at once.
//!
//! A worker acknowledges a job when it takes it; from then on the dialogue-manager watches the job's events
//! (including heartbeats) to notice a dead worker.

pub mod affinity;
mod local;
mod nats;

use std::time::Duration;

use futures::{StreamExt, stream::BoxStream};
use moltbot_proto::{
    common::v1::ModelCard,
    inference::v1::{GenerateEvent, InferenceJob, generate_event::Event},
};
use tokio_util::sync::CancellationToken;

pub use affinity::Lookup;
pub use local::LocalQueue;
pub use nats::{NatsQueue, Offer, STREAM};

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the job queue is full ({0} jobs waiting); retry later")]
    Full(i64),
    #[error("NATS at {url} is not reachable: {message}; start it with `nats-server -js` or set queue.nats_url")]
    Connect { url: String, message: String },
    #[error("job queue error: {0}")]
    Nats(String),
    #[error("the job queue is not reachable: {0}")]
    Unavailable(String),
    #[error("the conversation is too large to send to a worker ({bytes} bytes; the queue takes {max})")]
    TooLarge { bytes: usize, max: usize },
    #[error("malformed queue message: {0}")]
    Decode(#[from] moltbot_proto::DecodeError),
    #[error("the job queue is closed")]
    Closed,
}

/// Subject a model's jobs are published to.
pub fn job_subject(model: &str) -> String {
    format!("moltbot.jobs.{}", subject_token(model))
}

/// The JetStream consumer that every worker of `model` pulls its jobs from: what a lag-based autoscaler watches.
pub fn worker_consumer(model: &str) -> String {
    format!("workers-{}", subject_token(model))
}

/// A model name as one NATS subject token. Names may hold characters subjects cannot (`.`, `*`, `>`, spaces);
/// those become `_` and their code in hex, and `_` itself `__`, so two names never share a token (and with it a
/// queue and a consumer).
pub(crate) fn subject_token(model: &str) -> String {
    let mut token = String::with_capacity(model.len());
    for c in model.chars() {
        match c {
            '_' => token.push_str("__"),
            c if c.is_ascii_alphanumeric() || c == '-' => token.push(c),
            c => token.push_str(&format!("_{:x}_", c as u32)),
        }
    }
    token
}

#[cfg(test)]
mod tests {
    #[test]
    fn names_that_differ_have_different_subject_tokens() {
        let names = ["a.b", "a_b", "a_2e_b", "a b", "qwen2.5-coder", "a__b", "a_2e", "a.", "a"];
        let tokens: std::collections::HashSet<String> = names.iter().map(|n| super::subject_token(n)).collect();
        assert_eq!(tokens.len(), names.len(), "{tokens:?}");
        assert!(tokens.iter().all(|t| t.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')));
    }
}

/// A queue either backend serves; cheap to clone.
#[derive(Clone)]
pub enum JobQueue {
    Nats(Box<NatsQueue>),
    Local(LocalQueue),
}

impl JobQueue {
    /// The NATS backend at `config.nats_url`: connects and makes sure the job and cancel streams exist.
    pub async fn nats(config: &moltbot_config::QueueConfig) -> Result<Self> {
        Ok(Self::Nats(Box::new(NatsQueue::connect(config).await?)))
    }

    /// The in-process backend.
    pub fn local(max_pending_jobs: i64) -> Self {
        Self::Local(LocalQueue::new(max_pending_jobs))
    }

    /// Queues a job and returns its events. Dropping the events cancels the job.
    pub async fn submit(&self, job: InferenceJob) -> Result<JobEvents> {
        match self {
            Self::Nats(q) => q.submit(job).await,
            Self::Local(q) => q.submit(job),
        }
    }

    /// Jobs queued and not yet taken by a worker (NATS: the job stream's messages, which a worker acks when it
    /// takes one; in process: the channel's).
    pub async fn pending(&self) -> Result<u64> {
        match self {
            Self::Nats(q) => q.pending().await,
            Self::Local(q) => Ok(q.pending()),
        }
    }

    /// The jobs offered to worker `worker` of `model` directly (conversation affinity); `None` in process,
    /// where there is one worker.
    pub async fn offers(&self, model: &str, worker: &str) -> Result<Option<Offers>> {
        match self {
            Self::Nats(q) => Ok(Some(Offers(q.offers(model, worker).await?))),
            Self::Local(_) => Ok(None),
        }
    }

    /// Tells the requesters that `worker` serves the model `card` describes; a worker calls it every two seconds.
    pub async fn announce(&self, card: &ModelCard, worker: &str) -> Result<()> {
        match self {
            Self::Nats(q) => q.announce(card, worker).await,
            Self::Local(q) => {
                q.registry().announced(card, worker);
                Ok(())
            }
        }
    }

    /// A message each time another process connects to the queue and asks the workers to announce themselves;
    /// `None` in process.
    pub async fn hellos(&self) -> Result<Option<BoxStream<'static, ()>>> {
        match self {
            Self::Nats(q) => Ok(Some(q.hellos().await?)),
            Self::Local(_) => Ok(None),
        }
    }

    fn registry(&self) -> &affinity::Workers {
        match self {
            Self::Nats(q) => q.registry(),
            Self::Local(q) => q.registry(),
        }
    }

    /// What is known of model `id`: served by a live worker, served once, or never heard of.
    pub fn lookup(&self, id: &str) -> Lookup {
        self.registry().lookup(id)
    }

    /// The models a live worker serves, by name.
    pub fn models(&self) -> Vec<ModelCard> {
        self.registry().models()
    }

    /// A consumer of `model`'s jobs, for a worker.
    pub async fn consumer(&self, model: &str) -> Result<JobConsumer> {
        match self {
            Self::Nats(q) => Ok(JobConsumer::Nats(Box::new(q.consumer(model).await?))),
            Self::Local(q) => Ok(JobConsumer::Local(q.channel(model))),
        }
    }
}

/// The events of one submitted job, in order.
pub struct JobEvents {
    stream: BoxStream<'static, Result<GenerateEvent>>,
    /// Cancels the job when these events are dropped before it ended; disarmed by its last event (`Finished` or
    /// `Error`), so only abandoned jobs are cancelled.
    cancel_on_drop: Option<tokio_util::sync::DropGuard>,
    /// Cancelled when the job ended by itself, which ends whatever waited to send its cancel.
    ended: CancellationToken,
}

impl JobEvents {
    /// The next event, or `None` when none came within `timeout` (`Some(Err)` on a broken queue).
    pub async fn next_within(&mut self, timeout: Duration) -> Option<Result<GenerateEvent>> {
        let next = tokio::time::timeout(timeout, self.stream.next()).await.unwrap_or(None);
        if let Some(Ok(GenerateEvent { event: Some(Event::Finished(_) | Event::Error(_)) })) = &next
            && let Some(guard) = self.cancel_on_drop.take()
        {
            guard.disarm();
            self.ended.cancel();
        }
        next
    }

    /// Whether dropping these events would cancel the job (it has not ended).
    pub fn cancels_on_drop(&self) -> bool {
        self.cancel_on_drop.is_some()
    }
}

/// Jobs offered to one worker; see `JobQueue::offers`.
pub struct Offers(nats::NatsOffers);

impl Offers {
    /// The next offer; `None` once the subscription ended.
    pub async fn next(&mut self) -> Option<Offer> {
        self.0.next().await
    }
}

/// A worker's view of the queue.
pub enum JobConsumer {
    Nats(Box<nats::NatsConsumer>),
    Local(local::Channel),
}

impl JobConsumer {
    /// Takes the next job, waiting for one. Call it only with a free slot: that is what spreads load.
    ///
    /// `None` once `stop` is cancelled. A request for a job already made to the queue is seen through first
    /// (NATS could hand it a job after the worker stopped listening, stranding that job until its
    /// acknowledgement timed out), so this returns within one pull (5 s) of `stop`.
    pub async fn next_job(&mut self, stop: &CancellationToken) -> Result<Option<ReceivedJob>> {
        match self {
            Self::Nats(c) => c.next_job(stop).await,
            Self::Local(q) => tokio::select! {
                () = stop.cancelled() => Ok(None),
                job = q.next_job() => job.map(Some),
            },
        }
    }
}

/// A job a worker took, with where its events go and a token cancelled when the requester gives up.
pub struct ReceivedJob {
    pub job: InferenceJob,
    pub cancelled: CancellationToken,
    sink: EventSink,
    /// The task that watches for the job's cancel, ended with the job.
    watch: Option<tokio::task::AbortHandle>,
}

impl Drop for ReceivedJob {
    fn drop(&mut self) {
        if let Some(watch) = self.watch.take() {
            watch.abort();
        }
    }
}

enum EventSink {
    Nats { client: async_nats::Client, subject: String },
    Local(tokio::sync::mpsc::UnboundedSender<Result<GenerateEvent>>),
}

impl ReceivedJob {
    /// Sends an event to the requester. The job's last event (`Finished` or `Error`) is flushed before this
    /// returns, so a worker that stops right after its job still delivers how it ended.
    pub async fn publish(&self, event: GenerateEvent) -> Result<()> {
        let last = matches!(event.event, Some(Event::Finished(_) | Event::Error(_)));
        match &self.sink {
            EventSink::Nats { client, subject } => {
                client
                    .publish(subject.clone(), moltbot_proto::Message::encode_to_vec(&event).into())
                    .await
                    .map_err(|e| Error::Nats(e.to_string()))?;
                if last {
                    self.flush().await?;
                }
                Ok(())
            }
            EventSink::Local(tx) => tx.send(Ok(event)).map_err(|_| Error::Closed),
        }
    }

    /// Waits until the events published so far have left for the queue.
    pub async fn flush(&self) -> Result<()> {
        match &self.sink {
            EventSink::Nats { client, .. } => client.flush().await.map_err(|e| Error::Nats(e.to_string())),
            EventSink::Local(_) => Ok(()),
        }
    }
}
