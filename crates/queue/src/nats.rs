//! The NATS backend: JetStream work queue for jobs, core subjects for events, and cancels on subjects that a small
//! stream also keeps. A cancel published while its job waits in the queue has no subscriber yet; the stream keeps
//! it for the worker that takes the job later. The requester publishes through JetStream (the stream has it
//! before the publish is acknowledged), and a worker subscribes before it asks the stream, so every cancel reaches
//! its job one way or the other.
//!
//! A job whose conversation prefers a worker (`affinity`: the one that holds its prefix in cache) is first offered
//! to that worker directly, by core NATS request to `moltbot.offer.<model>.<worker>`. The worker answers
//! `taken` only with a free slot and nothing waiting in its engine; `busy`, no responder (the worker is gone) or
//! no answer within a second sends the job to the shared queue instead, under another key, so a late taker of the
//! offer is cancelled and its events go nowhere.

use std::time::Duration;

use async_nats::jetstream::{self, ErrorCode, consumer::pull, context::PublishErrorKind, stream};
use futures::StreamExt;
use moltbot_proto::{
    Message,
    common::v1::ModelCard,
    inference::v1::{Announcement, CancelJob, GenerateEvent, InferenceJob, generate_event::Event},
};
use tokio_util::sync::CancellationToken;

use crate::{Error, EventSink, JobEvents, ReceivedJob, Result, affinity, job_subject, subject_token};

pub const STREAM: &str = "MOLTBOT_JOBS";
/// The stream that remembers cancels (`moltbot.cancel.<attempt key>`).
pub const CANCELS: &str = "MOLTBOT_CANCELS";
/// How long a cancel is remembered: longer than any job may wait in the queue (a worker drops a job past its
/// deadline anyway).
const CANCEL_MEMORY: Duration = Duration::from_secs(3600);
const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);
/// How long one pull request waits for a job before asking again.
const PULL_EXPIRES: Duration = Duration::from_secs(5);
/// How long a preferred worker may take to answer an offer before the job goes to the shared queue.
const OFFER_TIMEOUT: Duration = Duration::from_secs(1);
const TAKEN: &[u8] = b"taken";
const BUSY: &[u8] = b"busy";

/// Where a process that connects asks the workers to announce themselves now.
const HELLO: &str = "moltbot.hello";

/// Where workers announce themselves (`moltbot.workers.<model>`, an `Announcement` as payload).
const ANNOUNCE_PREFIX: &str = "moltbot.workers.";

/// Where a worker hears offers of jobs meant for it.
fn offer_subject(model: &str, worker: &str) -> String {
    format!("moltbot.offer.{}.{}", subject_token(model), subject_token(worker))
}

#[derive(Clone)]
pub struct NatsQueue {
    client: async_nats::Client,
    js: jetstream::Context,
    max_pending: i64,
    /// The workers seen serving jobs, for conversation affinity.
    workers: affinity::Workers,
    /// Ends the task that remakes the streams on reconnection when the last clone of this queue goes.
    _reconnects: std::sync::Arc<tokio_util::sync::DropGuard>,
}

/// The longest pause between reconnection attempts: NATS is retried for as long as it is away.
const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(2);

impl NatsQueue {
    /// The job stream's messages: jobs no worker has taken yet.
    pub(crate) async fn pending(&self) -> Result<u64> {
        let unavailable = |e: &dyn std::fmt::Display| Error::Unavailable(format!("the job stream's state: {e}"));
        let mut stream = self.js.get_stream(STREAM).await.map_err(|e| unavailable(&e))?;
        Ok(stream.info().await.map_err(|e| unavailable(&e))?.state.messages)
    }

    /// Connects and makes sure the streams exist. Once connected, a lost connection is retried without limit;
    /// meanwhile `submit` fails at once, and on reconnection the streams are made again should the server have
    /// lost them (the cancel stream lives in memory).
    pub async fn connect(config: &moltbot_config::QueueConfig) -> Result<Self> {
        let (url, shown) = (config.nats_url.as_str(), moltbot_config::redact_url(&config.nats_url));
        let streams = Streams { max_pending: config.max_pending_jobs, replicas: config.stream_replicas };
        let connect_err = |e: &dyn std::fmt::Display| Error::Connect { url: shown.clone(), message: e.to_string() };
        let (reconnected_tx, mut reconnected) = tokio::sync::mpsc::channel(1);
        // A user in the address (`nats://worker:<password>@host`) logs in. The client is given the address without
        // it: it does not log in from there, and it logs the address it connects to.
        let (bare, credentials) = moltbot_config::split_credentials(url);
        let options = match credentials {
            Some((user, password)) => async_nats::ConnectOptions::with_user_and_password(user, password),
            None => async_nats::ConnectOptions::new(),
        };
        let client = options
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
            .connect(bare.as_str())
            .await
            .map_err(|e| connect_err(&e))?;
        tokio::time::timeout(Duration::from_secs(5), client.flush())
            .await
            .map_err(|_| connect_err(&"no answer within 5 s"))?
            .map_err(|e| connect_err(&e))?;
        let js = jetstream::new(client.clone());
        ensure_streams(&js, streams).await.map_err(|message| Error::Connect { url: shown.clone(), message })?;
        let (stop, again) = (CancellationToken::new(), js.clone());
        let stopped = stop.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = stopped.cancelled() => return,
                    event = reconnected.recv() => if event.is_none() { return },
                }
                tracing::info!("connected to NATS again");
                if let Err(message) = ensure_streams(&again, streams).await {
                    tracing::warn!(%message, "cannot make the streams again after reconnecting");
                }
            }
        });
        let workers = affinity::Workers::default();
        let mut announcements = client.subscribe(format!("{ANNOUNCE_PREFIX}>")).await.map_err(|e| connect_err(&e))?;
        let (heard, stopped) = (workers.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let message = tokio::select! {
                    () = stopped.cancelled() => return,
                    message = announcements.next() => match message { Some(m) => m, None => return },
                };
                match Announcement::decode(message.payload.as_ref()) {
                    Ok(Announcement { worker_id, model: Some(card) }) => heard.announced(&card, &worker_id),
                    _ => tracing::debug!(subject = %message.subject, "ignoring a malformed worker announcement"),
                }
            }
        });
        // Workers announce themselves at once when asked, so a process that just connected knows them in
        // milliseconds rather than at their next announcement.
        client.publish(HELLO, bytes::Bytes::new()).await.map_err(|e| connect_err(&e))?;
        Ok(Self {
            client,
            js,
            max_pending: config.max_pending_jobs,
            workers,
            _reconnects: std::sync::Arc::new(stop.drop_guard()),
        })
    }

    /// A message each time a process connects to the queue (workers then announce themselves).
    pub(crate) async fn hellos(&self) -> Result<futures::stream::BoxStream<'static, ()>> {
        let hellos = self.client.subscribe(HELLO).await.map_err(|e| Error::Nats(e.to_string()))?;
        Ok(hellos.map(|_| ()).boxed())
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
        let (request_id, model) = (request.request_id.clone(), subject_token(&request.model));
        let subject = job_subject(&request.model);
        let conversation = affinity::conversation_key(request);
        // One key per attempt: a retried job's events and cancels never mix with those of an earlier attempt.
        let key = attempt_key(&request_id, job.attempt);
        // A first attempt goes to the worker its conversation prefers, when that worker takes it now.
        if job.attempt == 0
            && affinity::follows_up(request)
            && let Some(worker) = conversation.and_then(|k| self.workers.preferred(&model, k))
            && let Some(events) = self.offer(&job, &format!("{key}-o"), &worker, conversation).await?
        {
            return Ok(events);
        }
        let (payload, events) = self.addressed(job, &key).await?;
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
        Ok(self.job_events(events, key, request_id, model, conversation))
    }

    /// `job` with its events addressed to the attempt `key`, encoded, and the subscription to those events, made
    /// before the job is sent so that no event can be missed. A job larger than the server takes is refused.
    async fn addressed(&self, mut job: InferenceJob, key: &str) -> Result<(Vec<u8>, async_nats::Subscriber)> {
        job.reply_subject = format!("moltbot.events.{key}");
        let payload = job.encode_to_vec();
        let max_payload = self.client.server_info().max_payload;
        if max_payload > 0 && payload.len() > max_payload {
            return Err(Error::TooLarge { bytes: payload.len(), max: max_payload });
        }
        let events = self.client.subscribe(job.reply_subject).await.map_err(|e| Error::Nats(e.to_string()))?;
        Ok((payload, events))
    }

    /// Offers `job` to `worker` under `key`; its events when the worker took it, `None` when the job should go
    /// to the shared queue instead.
    async fn offer(
        &self,
        job: &InferenceJob,
        key: &str,
        worker: &str,
        conversation: Option<u64>,
    ) -> Result<Option<JobEvents>> {
        let request = job.request.as_ref().expect("checked by submit");
        let (request_id, model) = (request.request_id.clone(), subject_token(&request.model));
        let (payload, events) = self.addressed(job.clone(), key).await?;
        let asked = self.client.request(offer_subject(&request.model, worker), payload.into());
        match tokio::time::timeout(OFFER_TIMEOUT, asked).await {
            Ok(Ok(answer)) if answer.payload.as_ref() == TAKEN => {
                tracing::debug!(%request_id, %worker, "the conversation's worker took the job");
                return Ok(Some(self.job_events(events, key.to_owned(), request_id, model, conversation)));
            }
            Ok(Ok(_busy)) => {}
            Ok(Err(e)) if e.kind() == async_nats::RequestErrorKind::NoResponders => self.workers.forget(&model, worker),
            // The offer may have reached the worker: a cancel under its key stops it there.
            Ok(Err(error)) => {
                tracing::debug!(%error, %worker, "offer failed; queueing the job");
                self.cancel(key, &request_id).await;
            }
            // The worker may still take it: a cancel under the offer's key stops it there.
            Err(_) => {
                tracing::warn!(%worker, %request_id, "a worker did not answer an offer within 1 s; queueing the job");
                self.cancel(key, &request_id).await;
            }
        }
        Ok(None)
    }

    /// Publishes a cancel for the attempt `key` (kept by the cancel stream for a worker that takes it later).
    async fn cancel(&self, key: &str, request_id: &str) {
        let cancel = CancelJob { request_id: request_id.to_owned() };
        let published = self.js.publish(format!("moltbot.cancel.{key}"), cancel.encode_to_vec().into()).await;
        if let Err(e) = match published {
            Ok(ack) => ack.await.map(drop),
            Err(e) => Err(e),
        } {
            tracing::warn!(error = %e, %key, "cannot publish a cancel; the job may run for nobody");
        }
    }

    /// The events of the job under `key`, from `events`; dropping them before the job ended cancels it. The
    /// worker that starts the job is remembered as its conversation's.
    fn job_events(
        &self,
        events: async_nats::Subscriber,
        key: String,
        request_id: String,
        model: String,
        conversation: Option<u64>,
    ) -> JobEvents {
        let (cancelled, ended) = (CancellationToken::new(), CancellationToken::new());
        let (queue, token, job_ended) = (self.clone(), cancelled.clone(), ended.clone());
        tokio::spawn(async move {
            tokio::select! {
                () = token.cancelled() => {}
                // The job ended by itself: nothing to cancel, and this task goes.
                () = job_ended.cancelled() => return,
            }
            queue.cancel(&key, &request_id).await;
        });
        let workers = self.workers.clone();
        let stream = events
            .map(move |m| {
                let event = GenerateEvent::decode(m.payload).map_err(Error::from)?;
                if let Some(Event::Started(started)) = &event.event {
                    workers.ran(&model, &started.worker_id, conversation);
                }
                Ok(event)
            })
            .boxed();
        JobEvents { stream, cancel_on_drop: Some(cancelled.drop_guard()), ended }
    }

    /// Tells the dialogue-managers that `worker` serves `card` (every two seconds while it takes jobs).
    pub(crate) async fn announce(&self, card: &ModelCard, worker: &str) -> Result<()> {
        let subject = format!("{ANNOUNCE_PREFIX}{}", subject_token(&card.id));
        let announcement = Announcement { worker_id: worker.to_owned(), model: Some(card.clone()) };
        let payload = announcement.encode_to_vec();
        self.client.publish(subject, payload.into()).await.map_err(|e| Error::Nats(e.to_string()))
    }

    pub(crate) fn registry(&self) -> &affinity::Workers {
        &self.workers
    }

    /// The offers of jobs meant for `worker`.
    pub(crate) async fn offers(&self, model: &str, worker: &str) -> Result<NatsOffers> {
        // A queue group: should two processes share a worker id, each offer still reaches one of them.
        let subscriber = self
            .client
            .queue_subscribe(offer_subject(model, worker), "offers".into())
            .await
            .map_err(|e| Error::Nats(e.to_string()))?;
        Ok(NatsOffers { queue: self.clone(), subscriber })
    }

    /// What a worker needs to run a job it took: a watch for its cancel (asked of the cancel stream too, for one
    /// sent while it waited) and where its events go.
    async fn receive(&self, job: InferenceJob) -> Result<ReceivedJob> {
        let request_id = job.request.as_ref().map(|r| r.request_id.clone()).unwrap_or_default();
        let key = job
            .reply_subject
            .strip_prefix("moltbot.events.")
            .map_or_else(|| attempt_key(&request_id, job.attempt), str::to_owned);
        let cancelled = CancellationToken::new();
        let mut cancels =
            self.client.subscribe(format!("moltbot.cancel.{key}")).await.map_err(|e| Error::Nats(e.to_string()))?;
        // Cancelled while it waited: the worker ends it before any work.
        if self.remembers_cancel(&key).await {
            cancelled.cancel();
        }
        // Watches for a cancel while the job runs; the subscription ends with the job (`ReceivedJob` aborts this
        // task when dropped).
        let token = cancelled.clone();
        let watch = tokio::spawn(async move {
            if cancels.next().await.is_some() {
                token.cancel();
            }
        });
        let sink = EventSink::Nats { client: self.client.clone(), subject: job.reply_subject.clone() };
        Ok(ReceivedJob { job, cancelled, sink, watch: Some(watch.abort_handle()) })
    }

    pub(crate) async fn consumer(&self, model: &str) -> Result<NatsConsumer> {
        let consumer = self.pull_consumer(model).await?;
        Ok(NatsConsumer { queue: self.clone(), model: model.to_owned(), consumer })
    }

    /// The model's durable pull consumer, made unless it exists.
    async fn pull_consumer(&self, model: &str) -> Result<jetstream::consumer::Consumer<pull::Config>> {
        let name = crate::worker_consumer(model);
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

/// How the streams are made: the job stream's cap and both streams' copies.
#[derive(Clone, Copy)]
struct Streams {
    max_pending: i64,
    replicas: usize,
}

/// Makes the job and cancel streams unless they exist.
async fn ensure_streams(js: &jetstream::Context, streams: Streams) -> Result<(), String> {
    let jobs = js
        .get_or_create_stream(stream::Config {
            name: STREAM.into(),
            subjects: vec!["moltbot.jobs.>".into()],
            retention: stream::RetentionPolicy::WorkQueue,
            max_messages: streams.max_pending,
            num_replicas: streams.replicas,
            discard: stream::DiscardPolicy::New,
            duplicate_window: DUPLICATE_WINDOW,
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await
        .map_err(|e| format!("JetStream is not usable ({e}); run nats-server with -js"))?;
    // An existing stream keeps the copies it was made with.
    let kept = jobs.cached_info().config.num_replicas;
    if kept != streams.replicas {
        tracing::warn!(
            stream = STREAM,
            kept,
            configured = streams.replicas,
            "the job stream keeps another number of copies than queue.stream_replicas; change it with \
             `nats stream edit {STREAM} --replicas N` (the setting applies only when the stream is made)"
        );
    }
    js.get_or_create_stream(stream::Config {
        name: CANCELS.into(),
        subjects: vec!["moltbot.cancel.>".into()],
        max_messages_per_subject: 1,
        max_age: CANCEL_MEMORY,
        storage: stream::StorageType::Memory,
        num_replicas: streams.replicas,
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
            return self.queue.receive(job).await.map(Some);
        }
    }
}

/// Jobs offered to one worker.
pub struct NatsOffers {
    queue: NatsQueue,
    subscriber: async_nats::Subscriber,
}

impl NatsOffers {
    /// The next offer; `None` when the subscription ended.
    pub(crate) async fn next(&mut self) -> Option<Offer> {
        loop {
            let message = self.subscriber.next().await?;
            let Some(reply) = message.reply else { continue };
            match InferenceJob::decode(message.payload) {
                Ok(job) => return Some(Offer { queue: self.queue.clone(), job, reply }),
                Err(e) => tracing::warn!(error = %e, "dropping a malformed offer"),
            }
        }
    }
}

/// A job offered to this worker; it goes elsewhere unless accepted.
pub struct Offer {
    queue: NatsQueue,
    job: InferenceJob,
    reply: async_nats::Subject,
}

impl Offer {
    /// The conversation the job belongs to (`affinity::conversation_key`).
    pub fn conversation(&self) -> Option<u64> {
        self.job.request.as_ref().and_then(affinity::conversation_key)
    }

    /// Takes the job: its cancel is watched before the requester hears it was taken. Once the answer is sent the
    /// job is this worker's, whatever happens to the flush: the requester waits for its events.
    pub async fn accept(self) -> Result<ReceivedJob> {
        let client = self.queue.client.clone();
        let received = self.queue.receive(self.job).await?;
        client.publish(self.reply, TAKEN.into()).await.map_err(|e| Error::Nats(e.to_string()))?;
        if let Err(error) = client.flush().await {
            tracing::warn!(%error, "cannot flush the answer to an offer; running the job anyway");
        }
        Ok(received)
    }

    /// Leaves the job to the shared queue.
    pub async fn decline(self) {
        let client = &self.queue.client;
        if let Err(error) = client.publish(self.reply, BUSY.into()).await {
            tracing::debug!(%error, "cannot decline an offer; the requester queues the job after its timeout");
        }
    }
}
