//! Pacing between ingest and the pipelines: rows waiting, publishers blocked, and the wake-up
//! that lets a paused ingest poll again.

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::AsyncClient;
use tokio::sync::Notify;

/// Shared between ingest and the pipelines to pace reading.
#[derive(Debug, Default)]
pub struct Flow {
    /// Rows routed to a pipeline and not yet taken by its inference task.
    pub waiting_rows: AtomicUsize,
    /// Pipelines currently waiting for room in the client's request channel, which only
    /// this task's polling makes.
    pub blocked_publishers: AtomicUsize,
    /// Wakes a paused ingest when either of the above changes in a way that matters.
    pub wake: Notify,
}

impl Flow {
    /// A pipeline took `n` rows off its channel.
    pub fn taken(&self, n: usize) {
        self.waiting_rows.fetch_sub(n, Relaxed);
        self.wake.notify_one();
    }

    /// Publishes through `client`, making sure a paused ingest keeps polling meanwhile.
    pub async fn publish(&self, client: &AsyncClient, topic: String, payload: Vec<u8>) -> bool {
        self.blocked_publishers.fetch_add(1, Relaxed);
        self.wake.notify_one();
        let ok = client.publish(topic, QoS::AtLeastOnce, false, payload).await.is_ok();
        self.blocked_publishers.fetch_sub(1, Relaxed);
        ok
    }
}
