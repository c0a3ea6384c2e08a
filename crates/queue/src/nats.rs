//! The NATS backend: JetStream work queue for jobs, core subjects for events, and cancels on subjects that a small
//! stream also keeps. A cancel published while its job waits in the queue has no subscriber yet; the stream keeps
//! it for the worker that takes the job later. The requester publishes through JetStream (the stream has it
//! before the publish is acknowledged), and a worker subscribes before it asks the stream, so every cancel reaches
//! its job one way or the other.

use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull, context::PublishErrorKind, stream};
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
    cancels: stream::Stream,
    max_pending: i64,
}

impl NatsQueue {
    /// Connects and makes sure the job stream exists.
    pub async fn connect(url: &str, max_pending: i64) -> Result<Self> {
        let connect_err = |e: &dyn std::fmt::Display| Error::Connect { url: url.into(), message: e.to_string() };
        let client = async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(5))
            .max_reconnects(Some(3))
            .connect(url)
            .await
            .map_err(|e| connect_err(&e))?;
        tokio::time::timeout(Duration::from_secs(5), client.flush())
            .await
            .map_err(|_| connect_err(&"no answer within 5 s"))?
            .map_err(|e| connect_err(&e))?;
        let js = jetstream::new(client.clone());
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
        .map_err(|e| Error::Connect {
            url: url.into(),
            message: format!("JetStream is not usable ({e}); run nats-server with -js"),
        })?;
        let cancels = js
            .get_or_create_stream(stream::Config {
                name: CANCELS.into(),
                subjects: vec!["moltbot.cancel.>".into()],
                max_messages_per_subject: 1,
                max_age: CANCEL_MEMORY,
                storage: stream::StorageType::Memory,
                ..Default::default()
            })
            .await
            .map_err(|e| Error::Connect {
                url: url.into(),
                message: format!("cannot make the {CANCELS} stream: {e}"),
            })?;
        Ok(Self { client, js, cancels, max_pending })
    }

    pub(crate) async fn submit(&self, job: InferenceJob) -> Result<JobEvents> {
        let request = job.request.as_ref().ok_or(Error::Nats("job without a request".into()))?;
        let request_id = request.request_id.clone();
        let subject = job_subject(&request.model);
        // One key per attempt: a retried job's events and cancels never mix with those of an earlier attempt.
        let key = attempt_key(&request_id, job.attempt);
        let mut job = job;
        job.reply_subject = format!("moltbot.events.{key}");
        // Subscribe before publishing so that no event can be missed.
        let events = self.client.subscribe(job.reply_subject.clone()).await.map_err(|e| Error::Nats(e.to_string()))?;
        let publish =
            jetstream::message::PublishMessage::build().payload(job.encode_to_vec().into()).message_id(key.clone());
        let ack = self.js.send_publish(subject, publish).await.map_err(|e| Error::Nats(e.to_string()))?;
        ack.await.map_err(|e| match e.kind() {
            PublishErrorKind::Other if e.to_string().contains("maximum messages") => Error::Full(self.max_pending),
            _ => Error::Nats(e.to_string()),
        })?;
        let cancelled = CancellationToken::new();
        let (js, token) = (self.js.clone(), cancelled.clone());
        tokio::spawn(async move {
            token.cancelled().await;
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
        Ok(JobEvents { stream, _cancel_on_drop: cancelled.drop_guard() })
    }

    pub(crate) async fn consumer(&self, model: &str) -> Result<NatsConsumer> {
        let name = format!("workers-{}", subject_token(model));
        let stream = self.js.get_stream(STREAM).await.map_err(|e| Error::Nats(e.to_string()))?;
        let consumer = stream
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
            .map_err(|e| Error::Nats(e.to_string()))?;
        Ok(NatsConsumer { client: self.client.clone(), cancels: self.cancels.clone(), consumer })
    }
}

/// `<request_id>-<attempt>`, safe as a subject token: the job's message id and its event and cancel subjects.
fn attempt_key(request_id: &str, attempt: u32) -> String {
    subject_token(&format!("{request_id}-{attempt}"))
}

pub struct NatsConsumer {
    client: async_nats::Client,
    cancels: stream::Stream,
    consumer: jetstream::consumer::Consumer<pull::Config>,
}

impl NatsConsumer {
    pub(crate) async fn next_job(&mut self) -> Result<ReceivedJob> {
        loop {
            let mut batch = self
                .consumer
                .batch()
                .max_messages(1)
                .expires(PULL_EXPIRES)
                .messages()
                .await
                .map_err(|e| Error::Nats(e.to_string()))?;
            let Some(message) = batch.next().await else {
                continue;
            };
            let message = message.map_err(|e| Error::Nats(e.to_string()))?;
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
            let mut cancels =
                self.client.subscribe(format!("moltbot.cancel.{key}")).await.map_err(|e| Error::Nats(e.to_string()))?;
            // Cancelled while it waited in the queue: the worker ends it before any work.
            match self.cancels.get_last_raw_message_by_subject(&format!("moltbot.cancel.{key}")).await {
                Ok(_) => cancelled.cancel(),
                Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => {}
                Err(e) => tracing::warn!(error = %e, %key, "cannot ask the cancel stream; running the job"),
            }
            let token = cancelled.clone();
            tokio::spawn(async move {
                tokio::select! {
                    Some(_) = cancels.next() => token.cancel(),
                    () = token.cancelled() => {}
                }
            });
            let sink = EventSink::Nats { client: self.client.clone(), subject: job.reply_subject.clone() };
            return Ok(ReceivedJob { job, cancelled, sink });
        }
    }
}
