//! Admission by queue wait: a turn is refused (429 with `Retry-After`) while the oldest job this
//! dialogue-manager queued has waited longer than `dialogue_manager.max_queue_wait` for a worker. A count of jobs
//! says little (a job may take 50 ms or a minute); how long they wait is what a client feels, and the oldest
//! wait is also a fair guess of when to come back. Each model is admitted on its own: a remote API that rate
//! limits, or a model short of workers, does not turn away the requests of the others.

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use moltbot_proto::ErrorCode;
use tonic::Status;

/// The jobs submitted and not yet started, by submission order.
#[derive(Clone)]
pub(crate) struct Waiting {
    jobs: Arc<Mutex<BTreeMap<u64, Instant>>>,
    next: Arc<AtomicU64>,
    /// Zero: never refuse.
    limit: Duration,
}

/// A job's place among the waiting, given up when it starts (or ends) and dropped.
pub(crate) struct Place {
    jobs: Arc<Mutex<BTreeMap<u64, Instant>>>,
    key: Option<u64>,
}

/// The waiting jobs of each model.
#[derive(Clone)]
pub(crate) struct ByModel {
    models: Arc<Mutex<std::collections::HashMap<String, Waiting>>>,
    limit: Duration,
}

impl ByModel {
    pub(crate) fn new(limit: Duration) -> Self {
        Self { models: Arc::default(), limit }
    }

    /// Model `model`'s waiting jobs.
    pub(crate) fn of(&self, model: &str) -> Waiting {
        let mut models = self.models.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        models.entry(model.to_owned()).or_insert_with(|| Waiting::new(self.limit)).clone()
    }
}

impl Waiting {
    pub(crate) fn new(limit: Duration) -> Self {
        Self { jobs: Arc::default(), next: Arc::default(), limit }
    }

    /// How long the oldest waiting job has waited.
    pub(crate) fn oldest(&self) -> Option<Duration> {
        let jobs = self.jobs.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        jobs.values().next().map(Instant::elapsed)
    }

    /// Refuses a new turn while the workers are behind, with when to come back.
    pub(crate) fn admit(&self) -> Result<(), Status> {
        match self.oldest() {
            Some(waited) if !self.limit.is_zero() && waited > self.limit => {
                let retry_after = waited.as_secs_f64().ceil().clamp(1.0, 120.0) as u64;
                let mut status = ErrorCode::ResourceExhausted.status(format!(
                    "the inference workers are behind (a queued request has waited {} s for one, \
                     dialogue_manager.max_queue_wait is {} s); retry in {retry_after} s",
                    waited.as_secs(),
                    self.limit.as_secs()
                ));
                status.metadata_mut().insert("retry-after", retry_after.into());
                Err(status)
            }
            _ => Ok(()),
        }
    }

    /// Counts a job as waiting from now.
    pub(crate) fn join(&self) -> Place {
        let key = self.next.fetch_add(1, Ordering::Relaxed);
        self.jobs.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(key, Instant::now());
        Place { jobs: self.jobs.clone(), key: Some(key) }
    }
}

impl Place {
    /// The job started (or ended): it no longer waits.
    pub(crate) fn leave(&mut self) {
        if let Some(key) = self.key.take() {
            self.jobs.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&key);
        }
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        self.leave();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn turns_are_refused_while_the_oldest_job_waits_too_long() {
        let waiting = Waiting::new(Duration::from_millis(50));
        assert!(waiting.admit().is_ok());
        let mut first = waiting.join();
        let _second = waiting.join();
        std::thread::sleep(Duration::from_millis(80));
        let refused = waiting.admit().unwrap_err();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert_eq!(refused.metadata().get("retry-after").unwrap(), "1");
        first.leave();
        assert!(waiting.admit().is_err(), "the second job still waits");
        drop(_second);
        assert!(waiting.admit().is_ok() && waiting.oldest().is_none());
        assert!(Waiting::new(Duration::ZERO).join().key.is_some());
    }
}
