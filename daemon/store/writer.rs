//! The store's one writing thread. Pipelines and ingest hand it jobs without waiting (a full
//! queue drops the job's rows from the store, counted, never the predictions); it commits
//! everything queued in one transaction, then releases the jobs' MQTT acks. So a message is
//! acknowledged to the broker only once its sample is durable: a kill -9 at any moment loses
//! nothing the broker will not deliver again.
//!
//! A failed commit (a full disk) is counted and reported, the acks still go (inference must
//! go on, and the broker cannot hold a plant's telemetry for days), and the database is
//! reopened so writing resumes by itself once there is room again.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;

use super::{Store, Write};
use crate::mqtt::ack::{AckSender, AckTicket};
use crate::telemetry::events::{Counters, Event, Events};

/// Jobs waiting for the writer; past this, new ones are dropped (counted as `store_dropped`).
const QUEUE: usize = 4096;
/// Most jobs folded into one transaction.
const MAX_JOBS_PER_COMMIT: usize = 512;

struct Job {
    pipeline: Arc<str>,
    writes: Vec<Write>,
    /// Released (acked) once the writes are committed, or have failed.
    tickets: Vec<Arc<AckTicket>>,
    counters: Arc<Counters>,
}

enum Msg {
    Job(Job),
    /// Answered once everything queued before it is committed.
    Flush(SyncSender<()>),
}

#[derive(Clone)]
pub struct Writer {
    tx: SyncSender<Msg>,
    acks: AckSender,
}

impl Writer {
    /// Queues `job`; when the queue is full its rows are counted as dropped from the store and
    /// its acks released at once.
    fn submit(&self, job: Job) {
        match self.tx.try_send(Msg::Job(job)) {
            Ok(()) => {}
            Err(TrySendError::Full(Msg::Job(job)) | TrySendError::Disconnected(Msg::Job(job))) => {
                let samples = job.writes.iter().filter(|w| matches!(w, Write::Sample(_))).count();
                job.counters.store_dropped.fetch_add(samples as u64, Relaxed);
                release(&self.acks, job.tickets);
            }
            Err(_) => {}
        }
    }

    /// A handle that submits `pipeline`'s writes, counted on `counters`.
    pub fn for_pipeline(&self, pipeline: &str, counters: Arc<Counters>) -> PipelineWriter {
        PipelineWriter { writer: self.clone(), pipeline: Arc::from(pipeline), counters }
    }

    /// Waits until every job queued so far is committed (or has failed).
    pub fn flush(&self) {
        let (tx, rx) = sync_channel(1);
        if self.tx.send(Msg::Flush(tx)).is_ok() {
            let _ = rx.recv();
        }
    }
}

/// One pipeline's way into the store (its name and counters fixed once, at start).
#[derive(Clone)]
pub struct PipelineWriter {
    writer: Writer,
    pipeline: Arc<str>,
    counters: Arc<Counters>,
}

impl PipelineWriter {
    /// Queues `writes`; `tickets` are acked once they are committed (or have failed).
    pub fn submit(&self, writes: Vec<Write>, tickets: Vec<Arc<AckTicket>>) {
        self.writer.submit(Job { pipeline: self.pipeline.clone(), writes, tickets, counters: self.counters.clone() });
    }
}

fn release(acks: &AckSender, tickets: Vec<Arc<AckTicket>>) {
    for t in tickets {
        if let Some(ticket) = Arc::into_inner(t) {
            acks.done(ticket);
        }
    }
}

/// Starts the writing thread; it ends when every [`Writer`] is dropped.
///
/// # Errors
/// The thread cannot be started.
pub fn start(store: Arc<Store>, acks: AckSender, events: Events) -> Result<Writer, String> {
    let (tx, rx) = sync_channel(QUEUE);
    let thread_acks = acks.clone();
    std::thread::Builder::new()
        .name("lathe-store".into())
        .spawn(move || run(&store, &rx, &thread_acks, &events))
        .map_err(|e| format!("cannot start the store thread: {e}"))?;
    Ok(Writer { tx, acks })
}

fn run(store: &Store, rx: &Receiver<Msg>, acks: &AckSender, events: &Events) {
    let mut failing = false;
    let heartbeat = crate::telemetry::liveness::register("store writer");
    while let Ok(first) = rx.recv() {
        let mut jobs = Vec::new();
        let mut flushes = Vec::new();
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            match msg {
                Msg::Job(j) => jobs.push(j),
                Msg::Flush(done) => flushes.push(done),
            }
            if jobs.len() < MAX_JOBS_PER_COMMIT {
                next = rx.try_recv().ok();
            }
        }
        {
            let _busy = heartbeat.busy();
            commit(store, &mut jobs, acks, events, &mut failing);
        }
        for done in flushes {
            let _ = done.send(());
        }
    }
}

fn commit(store: &Store, jobs: &mut Vec<Job>, acks: &AckSender, events: &Events, failing: &mut bool) {
    if jobs.is_empty() {
        return;
    }
    let batches: Vec<(&str, &[Write])> = jobs.iter().map(|j| (&*j.pipeline, j.writes.as_slice())).collect();
    match store.apply(&batches, crate::telemetry::unix_ms()) {
        Ok(applied) => {
            for (job, a) in jobs.iter().zip(applied) {
                job.counters.stored.fetch_add(a.stored, Relaxed);
                job.counters.labels_stored.fetch_add(a.labels_joined, Relaxed);
                job.counters.store_evicted.fetch_add(a.evicted, Relaxed);
            }
            if std::mem::take(failing) {
                events.emit(Event::StoreRecovered { path: store.settings().path.display().to_string() });
            }
        }
        Err(e) => {
            for job in jobs.iter() {
                let samples = job.writes.iter().filter(|w| matches!(w, Write::Sample(_))).count() as u64;
                job.counters.store_failed.fetch_add(samples, Relaxed);
                events.emit(Event::StoreFailed {
                    pipeline: job.pipeline.to_string(),
                    rows: samples,
                    error: e.message.clone(),
                });
            }
            *failing = true;
            if let Err(e) = store.reopen() {
                tracing::debug!("Store reopen failed (will retry on the next write): {e}");
            }
        }
    }
    for job in jobs.drain(..) {
        release(acks, job.tickets);
    }
}
