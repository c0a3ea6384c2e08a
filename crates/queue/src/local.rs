//! The in-process queue of `moltbot serve`: a bounded channel that workers pull from when they have room.

use std::sync::Arc;

use futures::StreamExt;
use moltbot_proto::inference::v1::InferenceJob;
use tokio::sync::{Mutex, mpsc};
use tokio_util::sync::CancellationToken;

use crate::{Error, EventSink, JobEvents, ReceivedJob, Result};

struct Queued {
    job: InferenceJob,
    events: mpsc::UnboundedSender<Result<moltbot_proto::inference::v1::GenerateEvent>>,
    cancelled: CancellationToken,
}

#[derive(Clone)]
pub struct LocalQueue {
    tx: mpsc::Sender<Queued>,
    rx: Arc<Mutex<mpsc::Receiver<Queued>>>,
    capacity: i64,
}

impl LocalQueue {
    pub fn new(max_pending_jobs: i64) -> Self {
        let (tx, rx) = mpsc::channel(max_pending_jobs.max(1) as usize);
        Self { tx, rx: Arc::new(Mutex::new(rx)), capacity: max_pending_jobs }
    }

    pub(crate) fn submit(&self, job: InferenceJob) -> Result<JobEvents> {
        let (events, rx) = mpsc::unbounded_channel();
        let cancelled = CancellationToken::new();
        self.tx.try_send(Queued { job, events, cancelled: cancelled.clone() }).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => Error::Full(self.capacity),
            mpsc::error::TrySendError::Closed(_) => Error::Closed,
        })?;
        let stream = tokio_stream::wrappers::UnboundedReceiverStream::new(rx).boxed();
        Ok(JobEvents { stream, cancel_on_drop: Some(cancelled.drop_guard()), ended: CancellationToken::new() })
    }

    pub(crate) fn pending(&self) -> u64 {
        (self.tx.max_capacity() - self.tx.capacity()) as u64
    }

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
