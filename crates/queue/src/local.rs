//! The in-process queue of `moltbot serve`: a bounded channel per model that its workers pull from when they have
//! room, and the same registry of served models that NATS announcements fill.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex as SyncMutex},
};

use futures::StreamExt;
use moltbot_proto::inference::v1::InferenceJob;
use tokio::sync::{Mutex, mpsc};
use tokio_util::sync::CancellationToken;

use crate::{Error, EventSink, JobEvents, ReceivedJob, Result, affinity};

struct Queued {
    job: InferenceJob,
    events: mpsc::UnboundedSender<Result<moltbot_proto::inference::v1::GenerateEvent>>,
    cancelled: CancellationToken,
}

/// One model's jobs.
#[derive(Clone)]
pub struct Channel {
    tx: mpsc::Sender<Queued>,
    rx: Arc<Mutex<mpsc::Receiver<Queued>>>,
}

#[derive(Clone)]
pub struct LocalQueue {
    channels: Arc<SyncMutex<HashMap<String, Channel>>>,
    capacity: i64,
    workers: affinity::Workers,
}

impl LocalQueue {
    pub fn new(max_pending_jobs: i64) -> Self {
        Self { channels: Arc::default(), capacity: max_pending_jobs, workers: affinity::Workers::default() }
    }

    /// Model `model`'s channel, made on first use (by its worker or by a job for it).
    pub(crate) fn channel(&self, model: &str) -> Channel {
        let mut channels = self.channels.lock().expect("never poisoned");
        let capacity = self.capacity.max(1) as usize;
        channels
            .entry(model.to_owned())
            .or_insert_with(|| {
                let (tx, rx) = mpsc::channel(capacity);
                Channel { tx, rx: Arc::new(Mutex::new(rx)) }
            })
            .clone()
    }

    pub(crate) fn registry(&self) -> &affinity::Workers {
        &self.workers
    }

    pub(crate) fn submit(&self, job: InferenceJob) -> Result<JobEvents> {
        let model = job.request.as_ref().map(|r| r.model.clone()).unwrap_or_default();
        let (events, rx) = mpsc::unbounded_channel();
        let cancelled = CancellationToken::new();
        self.channel(&model).tx.try_send(Queued { job, events, cancelled: cancelled.clone() }).map_err(
            |e| match e {
                mpsc::error::TrySendError::Full(_) => Error::Full(self.capacity),
                mpsc::error::TrySendError::Closed(_) => Error::Closed,
            },
        )?;
        let stream = tokio_stream::wrappers::UnboundedReceiverStream::new(rx).boxed();
        Ok(JobEvents { stream, cancel_on_drop: Some(cancelled.drop_guard()), ended: CancellationToken::new() })
    }

    /// Jobs waiting, over every model.
    pub(crate) fn pending(&self) -> u64 {
        let channels = self.channels.lock().expect("never poisoned");
        channels.values().map(|c| (c.tx.max_capacity() - c.tx.capacity()) as u64).sum()
    }
}

impl Channel {
    pub(crate) async fn next_job(&self) -> Result<ReceivedJob> {
        loop {
            let queued = self.rx.lock().await.recv().await.ok_or(Error::Closed)?;
            if queued.cancelled.is_cancelled() {
                continue;
            }
            return Ok(ReceivedJob {
                job: queued.job,
                cancelled: queued.cancelled,
                sink: EventSink::Local(queued.events),
                watch: None,
            });
        }
    }
}
