//! The NATS backend: JetStream work queue for jobs, core subjects for events, and cancels on subjects that a small
//! stream also keeps. A cancel published while its job waits in the queue has no subscriber yet; the stream keeps
//! it for the worker that takes the job later. The requester publishes through JetStream (the stream has it
//! before the publish is acknowledged), and a worker subscribes before it asks the stream, so every cancel reaches
//! its job one way or the other.

use std::time::Duration;

use async_nats::jetstream::{self, ErrorCode, consumer::pull, context::PublishErrorKind, stream};
use futures::StreamExt;
use moltbot_proto::{
    Message,
    inference::v1::{CancelJob, GenerateEvent, InferenceJob},
};
use tokio_util::sync::CancellationToken;

use crate::{Error, EventSink, JobEvents, ReceivedJob, Result, job_subject, subject_token};

pub const STREAM: &str = "MOLTBOT_JOBS";
/// The stream that remembers cancels (`moltbot.cancel.<attempt key>`).
pub const CANCELS: &str = "MOLTBOT_CANCELS";
/// How long a cancel is remembered: longer than any job may wait in the queue (a worker drops a job past its
/// deadline anyway).
const CANCEL_MEMORY: Duration = Duration::from_secs(3600);
const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);
/// How long one pull request waits for a job before asking again.
const PULL_EXPIRES: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub struct NatsQueue {
    client: async_nats::Client,
    js: jetstream::Context,
    max_pending: i64,
    /// Ends the task that remakes the streams on reconnection when the last clone of this queue goes.
    _reconnects: std::sync::Arc<tokio_util::sync::DropGuard>,
}

/// The longest pause between reconnection attempts: NATS is retried for as long as it is away.
const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(2);

impl NatsQueue {
    /// Connects and makes sure the streams exist. Once connected, a lost connection is retried without limit;
    /// meanwhile `submit` fails at once, and on reconnection the streams are made again should the server have
    /// lost them (the cancel stream lives in memory).
    pub async fn connect(url: &str, max_pending: i64) -> Result<Self> {
        let connect_err = |e: &dyn std::fmt::Display| Error::Connect { url: url.into(), message: e.to_string() };
        let (reconnected_tx, mut reconnected) = tokio::sync::mpsc::channel(1);
        let client = async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(5))
            .max_reconnects(None)
            .reconnect_delay_callback(|attempts| {
                (Duration::from_millis(100) * 2u32.saturating_pow(attempts.min(8) as u32)).min(MAX_RECONNECT_DELAY)
            })
            .event_callback(move |event| {
                let reconnected = reconnected_tx.clone();
                async move {
                    match event {
                        async_nats::Event::Connected => {
                            let _ = reconnected.try_send(());
                        }
                        async_nats::Event::Disconnected => tracing::warn!("lost the connection to NATS; reconnecting"),
                        other => tracing::debug!(event = %other, "NATS"),
                    }
                }
            })
            .connect(url)
            .await
            .map_err(|e| connect_err(&e))?;
        tokio::time::timeout(Duration::from_secs(5), client.flush())
            .await
            .map_err(|_| connect_err(&"no answer within 5 s"))?
            .map_err(|e| connect_err(&e))?;
        let js = jetstream::new(client.clone());
        ensure_streams(&js, max_pending).await.map_err(|message| Error::Connect { url: url.into(), message })?;
        let (stop, again) = (CancellationToken::new(), js.clone());
        let stopped = stop.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = stopped.cancelled() => return,
                    event = reconnected.recv() => if event.is_none() { return },
                }
                tracing::info!("connected to NATS again");
                if let Err(message) = ensure_streams(&again, max_pending).await {
                    tracing::warn!(%message, "cannot make the streams again after reconnecting");
                }
            }
        });
        Ok(Self { client, js, max_pending, _reconnects: std::sync::Arc::new(stop.drop_guard()) })
    }

    /// Whether the cancel stream holds a cancel for the attempt `key`; when it cannot be asked, the job runs.
    async fn remembers_cancel(&self, key: &str) -> bool {
        let cancels = match self.js.get_stream_no_info(CANCELS).await {
            Ok(cancels) => cancels,
            Err(error) => {
                tracing::warn!(%error, %key, "cannot open the cancel stream; running the job");
                return false;
            }
        };
        match cancels.get_last_raw_message_by_subject(&format!("moltbot.cancel.{key}")).await {
            Ok(_) => true,
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => false,
            Err(error) => {
                tracing::warn!(%error, %key, "cannot ask the cancel stream; running the job");
                false
            }
        }
    }

    /// Fails at once while NATS is away, rather than letting a request wait for a reconnection.
    fn connected(&self) -> Result<()> {
        match self.client.connection_state() {
            async_nats::connection::State::Connected => Ok(()),
            _ => Err(Error::Unavailable("the connection to NATS is down; reconnecting".into())),
        }
    }

    pub(crate) async fn submit(&self, job: InferenceJob) -> Result<JobEvents> {
        self.connected()?;
        let request = job.request.as_ref().ok_or(Error::Nats("job without a request".into()))?;
        let request_id = request.request_id.clone();
        let subject = job_subject(&request.model);
        // One key per attempt: a retried job's events and cancels never mix with those of an earlier attempt.
        let key = attempt_key(&request_id, job.attempt);
        let mut job = job;
        job.reply_subject = format!("moltbot.events.{key}");
        // Subscribe before publishing so that no event can be missed.
        let payload = job.encode_to_vec();
        let max_payload = self.client.server_info().max_payload;
        if max_payload > 0 && payload.len() > max_payload {
            return Err(Error::TooLarge { bytes: payload.len(), max: max_payload });
        }
        let events = self.client.subscribe(job.reply_subject.clone()).await.map_err(|e| Error::Nats(e.to_string()))?;
        let publish = jetstream::message::PublishMessage::build().payload(payload.into()).message_id(key.clone());
        let ack = self.js.send_publish(subject, publish).await.map_err(|e| Error::Nats(e.to_string()))?;
        ack.await.map_err(|e| match e.kind() {
            PublishErrorKind::Other if jetstream_code(&e) == Some(ErrorCode::STREAM_STORE_FAILED) => {
                Error::Full(self.max_pending)
            }
            PublishErrorKind::TimedOut | PublishErrorKind::BrokenPipe | PublishErrorKind::StreamNotFound => {
                Error::Unavailable(e.to_string())
            }
            _ => Error::Nats(e.to_string()),
        })?;
        let (cancelled, ended) = (CancellationToken::new(), CancellationToken::new());
        let (js, token, job_ended) = (self.js.clone(), cancelled.clone(), ended.clone());
        tokio::spawn(async move {
            tokio::select! {
                () = token.cancelled() => {}
                // The job ended by itself: nothing to cancel, and this task goes.
                () = job_ended.cancelled() => return,
            }
            let cancel = CancelJob { request_id: request_id.clone() };
            let published = js.publish(format!("moltbot.cancel.{key}"), cancel.encode_to_vec().into()).await;
            if let Err(e) = match published {
                Ok(ack) => ack.await.map(drop),
                Err(e) => Err(e),
            } {
                tracing::warn!(error = %e, %key, "cannot publish a cancel; the job may run for nobody");
            }
        });
        let stream = events.map(|m| GenerateEvent::decode(m.payload).map_err(Error::from)).boxed();
        Ok(JobEvents { stream, cancel_on_drop: Some(cancelled.drop_guard()), ended })
    }

    pub(crate) async fn consumer(&self, model: &str) -> Result<NatsConsumer> {
        let consumer = self.pull_consumer(model).await?;
        Ok(NatsConsumer { queue: self.clone(), model: model.to_owned(), consumer })
    }

    /// The model's durable pull consumer, made unless it exists.
    async fn pull_consumer(&self, model: &str) -> Result<jetstream::consumer::Consumer<pull::Config>> {
        let name = format!("workers-{}", subject_token(model));
        let stream = self.js.get_stream(STREAM).await.map_err(|e| Error::Nats(e.to_string()))?;
        stream
            .get_or_create_consumer(
                &name,
                pull::Config {
                    durable_name: Some(name.clone()),
                    filter_subject: job_subject(model),
                    ack_policy: jetstream::consumer::AckPolicy::Explicit,
                    ack_wait: Duration::from_secs(30),
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| Error::Nats(e.to_string()))
    }
}

/// Makes the job and cancel streams unless they exist.
async fn ensure_streams(js: &jetstream::Context, max_pending: i64) -> Result<(), String> {
    js.get_or_create_stream(stream::Config {
        name: STREAM.into(),
        subjects: vec!["moltbot.jobs.>".into()],
        retention: stream::RetentionPolicy::WorkQueue,
        max_messages: max_pending,
        discard: stream::DiscardPolicy::New,
        duplicate_window: DUPLICATE_WINDOW,
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await
    .map_err(|e| format!("JetStream is not usable ({e}); run nats-server with -js"))?;
    js.get_or_create_stream(stream::Config {
        name: CANCELS.into(),
        subjects: vec!["moltbot.cancel.>".into()],
        max_messages_per_subject: 1,
        max_age: CANCEL_MEMORY,
        storage: stream::StorageType::Memory,
        ..Default::default()
    })
    .await
    .map_err(|e| format!("cannot make the {CANCELS} stream: {e}"))?;
    Ok(())
}

/// The JetStream error code behind a refused publish.
fn jetstream_code(e: &async_nats::jetstream::context::PublishError) -> Option<ErrorCode> {
    let source = std::error::Error::source(e)?;
    source.downcast_ref::<async_nats::jetstream::Error>().map(async_nats::jetstream::Error::error_code)
}

/// `<request_id>-<attempt>`, safe as a subject token: the job's message id and its event and cancel subjects.
fn attempt_key(request_id: &str, attempt: u32) -> String {
    subject_token(&format!("{request_id}-{attempt}"))
}

pub struct NatsConsumer {
    queue: NatsQueue,
    model: String,
    consumer: jetstream::consumer::Consumer<pull::Config>,
}

impl NatsConsumer {
    pub(crate) async fn next_job(&mut self, stop: &CancellationToken) -> Result<Option<ReceivedJob>> {
        loop {
            if stop.is_cancelled() {
                return Ok(None);
            }
            self.queue.connected()?;
            let batch = self.consumer.batch().max_messages(1).expires(PULL_EXPIRES).messages().await;
            let pulled = match batch {
                Ok(mut batch) => batch.next().await.transpose().map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            let message = match pulled {
                Ok(Some(message)) => message,
                Ok(None) => continue,
                Err(error) => {
                    // The server may have come back without the consumer (a fresh store): make it again (the
                    // call is idempotent).
                    tracing::warn!(%error, "cannot pull a job; making the consumer again");
                    self.consumer = self.queue.pull_consumer(&self.model).await?;
                    return Err(Error::Nats(error));
                }
            };
            // Taken: the dialogue-manager watches liveness from here on.
            message.ack().await.map_err(|e| Error::Nats(e.to_string()))?;
            let job = match InferenceJob::decode(message.payload.clone()) {
                Ok(job) => job,
                Err(e) => {
                    tracing::warn!(error = %e, "dropping a malformed job");
                    continue;
                }
            };
            let request_id = job.request.as_ref().map(|r| r.request_id.clone()).unwrap_or_default();
            let key = attempt_key(&request_id, job.attempt);
            let cancelled = CancellationToken::new();
            let client = &self.queue.client;
            let mut cancels =
                client.subscribe(format!("moltbot.cancel.{key}")).await.map_err(|e| Error::Nats(e.to_string()))?;
            // Cancelled while it waited in the queue: the worker ends it before any work.
            if self.queue.remembers_cancel(&key).await {
                cancelled.cancel();
            }
            // Watches for a cancel while the job runs; the subscription ends with the job (`ReceivedJob` aborts
            // this task when dropped).
            let token = cancelled.clone();
            let watch = tokio::spawn(async move {
                if cancels.next().await.is_some() {
                    token.cancel();
                }
            });
            let sink = EventSink::Nats { client: client.clone(), subject: job.reply_subject.clone() };
            return Ok(Some(ReceivedJob { job, cancelled, sink, watch: Some(watch.abort_handle()) }));
        }
    }
}
