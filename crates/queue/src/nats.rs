//! The NATS backend: JetStream work queue for jobs, core subjects for events and cancels.

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
const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);
/// How long one pull request waits for a job before asking again.
const PULL_EXPIRES: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub struct NatsQueue {
    client: async_nats::Client,
    js: jetstream::Context,
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
        Ok(Self { client, js, max_pending })
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
        let (client, token) = (self.client.clone(), cancelled.clone());
        tokio::spawn(async move {
            token.cancelled().await;
            let cancel = CancelJob { request_id: request_id.clone() };
            let subject = format!("moltbot.cancel.{key}");
            let _ = client.publish(subject, cancel.encode_to_vec().into()).await;
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
        Ok(NatsConsumer { client: self.client.clone(), consumer })
    }
}

/// `<request_id>-<attempt>`, safe as a subject token: the job's message id and its event and cancel subjects.
fn attempt_key(request_id: &str, attempt: u32) -> String {
    subject_token(&format!("{request_id}-{attempt}"))
}

pub struct NatsConsumer {
    client: async_nats::Client,
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
            let cancelled = CancellationToken::new();
            let mut cancels = self
                .client
                .subscribe(format!("moltbot.cancel.{}", attempt_key(&request_id, job.attempt)))
                .await
                .map_err(|e| Error::Nats(e.to_string()))?;
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
