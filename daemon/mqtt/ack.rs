//! Acknowledging telemetry in the order it arrived.
//!
//! MQTT 3.1.1 §4.6 requires PUBACKs in the order the PUBLISHes were received (rumqttd drops a
//! client that does otherwise), but messages finish out of order: a rejected one at once, an
//! accepted one after its batch is published. So ingest numbers every QoS 1 message, the
//! pipelines report when they are done with one, and this task sends the acks in arrival
//! order as the head of the line completes.

use std::collections::VecDeque;

use rumqttc::v5::mqttbytes::v5::Publish;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::AsyncClient;
use tokio::sync::mpsc;

#[derive(Debug)]
pub enum AckMsg {
    /// Ingest took message `seq`, which arrived with packet id `pkid`.
    Received { seq: u64, pkid: u16, qos: QoS },
    /// Every pipeline is done with `seq`.
    Done { seq: u64 },
    /// A connection lost, and again when the next one is made: the broker will redeliver
    /// whatever was not acked, so the old packet ids mean nothing any more.
    Reset { next_seq: u64 },
    /// Answered once every message before it has been handled (acks handed to the client):
    /// lets a stop send the last acks before it disconnects.
    Flush(tokio::sync::oneshot::Sender<()>),
}

/// Handed along with a message; the last holder calls [`AckSender::done`].
#[derive(Debug)]
pub struct AckTicket {
    pub seq: u64,
}

#[derive(Clone, Debug)]
pub struct AckSender {
    // Unbounded on purpose: the poll task must never wait, and the broker's in-flight window
    // bounds how many messages can be unacknowledged at once.
    tx: mpsc::UnboundedSender<AckMsg>,
}

impl AckSender {
    pub fn send(&self, msg: AckMsg) {
        let _ = self.tx.send(msg);
    }

    pub fn done(&self, ticket: AckTicket) {
        self.send(AckMsg::Done { seq: ticket.seq });
    }

    /// Waits until every ack due so far has been handed to the client.
    pub async fn flush(&self) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.send(AckMsg::Flush(tx));
        let _ = rx.await;
    }
}

/// The in-order bookkeeping, apart from I/O so it can be tested.
#[derive(Default)]
struct Line {
    base: u64,
    /// (packet id and QoS, done) per message since `base`.
    slots: VecDeque<(Option<(u16, QoS)>, bool)>,
}

impl Line {
    /// Applies one message; returns the acks now due, in order.
    fn apply(&mut self, msg: AckMsg) -> Vec<(u16, QoS)> {
        match msg {
            AckMsg::Received { seq, pkid, qos } => {
                if seq >= self.base {
                    while self.base + (self.slots.len() as u64) < seq {
                        self.slots.push_back((None, true)); // a QoS 0 gap: nothing to ack
                    }
                    self.slots.push_back((Some((pkid, qos)), false));
                }
            }
            AckMsg::Done { seq } => {
                if let Some(slot) = seq.checked_sub(self.base).and_then(|i| self.slots.get_mut(i as usize)) {
                    slot.1 = true;
                }
            }
            AckMsg::Reset { next_seq } => {
                self.slots.clear();
                self.base = next_seq;
            }
            AckMsg::Flush(done) => {
                let _ = done.send(());
            }
        }
        let mut due = Vec::new();
        while self.slots.front().is_some_and(|s| s.1) {
            if let Some((Some(token), _)) = self.slots.pop_front() {
                due.push(token);
            }
            self.base += 1;
        }
        due
    }
}

pub fn acker(client: AsyncClient) -> (AckSender, impl std::future::Future<Output = ()>) {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let task = async move {
        let mut line = Line::default();
        while let Some(msg) = rx.recv().await {
            for (pkid, qos) in line.apply(msg) {
                let mut token = Publish::new("", qos, Vec::new(), None);
                token.pkid = pkid;
                if client.ack(&token).await.is_err() {
                    return;
                }
            }
        }
    };
    (AckSender { tx }, task)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn received(seq: u64, pkid: u16) -> AckMsg {
        AckMsg::Received { seq, pkid, qos: QoS::AtLeastOnce }
    }

    fn pkids(v: Vec<(u16, QoS)>) -> Vec<u16> {
        v.into_iter().map(|p| p.0).collect()
    }

    #[test]
    fn acks_wait_for_every_earlier_message() {
        let mut line = Line::default();
        for seq in 0..3 {
            assert!(line.apply(received(seq, seq as u16 + 10)).is_empty());
        }
        assert!(line.apply(AckMsg::Done { seq: 2 }).is_empty());
        assert!(line.apply(AckMsg::Done { seq: 1 }).is_empty());
        assert_eq!(pkids(line.apply(AckMsg::Done { seq: 0 })), vec![10, 11, 12]);
    }

    #[test]
    fn a_reconnect_forgets_stale_packet_ids() {
        let mut line = Line::default();
        line.apply(received(0, 1));
        line.apply(AckMsg::Reset { next_seq: 1 });
        assert!(line.apply(AckMsg::Done { seq: 0 }).is_empty());
        line.apply(received(1, 1));
        assert_eq!(pkids(line.apply(AckMsg::Done { seq: 1 })), vec![1]);
    }
}
