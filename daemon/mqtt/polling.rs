//! A reconnecting session: its event loop polled on a task of its own, what the broker sends
//! forwarded. The Sparkplug edge node, the updater and the central commands each hold one;
//! the daemon's main session (ingest) polls its own, because it paces its reading by the rows
//! waiting to be served and watches the link's keep-alive. Both reconnect through
//! [`Reconnects`].

use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::{Event, EventLoop};
use tokio::sync::mpsc;

use super::session::{explain, taken_over, LoginFiles, Reconnects};

/// How a lost connection is logged: `Warn` where nothing else reports it (the Sparkplug edge
/// node, a central command), `Quiet` (debug lines) where the daemon's main session already
/// warns of the same broker outage (the updater).
#[derive(Clone, Copy, PartialEq)]
pub enum Outages {
    Warn,
    Quiet,
}

/// Polls `eventloop` until its client disconnects, every client handle is dropped, or the
/// receiver is, sending every
/// packet the broker sends (a CONNACK after each reconnect, publishes, acks). rumqttc's
/// `poll` must not be cancelled, and a `select!` on it would, hence the task of its own. After
/// a lost or refused connection the next attempt waits as [`Reconnects`] says: the login files
/// read again (a rotated password or certificate), backing off, and longer while another client
/// seems to hold our client id.
pub fn spawn_polling(
    name: &'static str,
    mut eventloop: EventLoop,
    login: LoginFiles,
    outages: Outages,
) -> mpsc::Receiver<Packet> {
    let (tx, rx) = mpsc::channel(1024);
    tokio::spawn(async move {
        let mut reconnects = Reconnects::new(login);
        loop {
            match eventloop.poll().await {
                Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => return,
                Ok(Event::Outgoing(_)) => {}
                Ok(Event::Incoming(packet)) => {
                    if matches!(packet, Packet::ConnAck(_)) {
                        reconnects.connected();
                    }
                    if tx.send(packet).await.is_err() {
                        return;
                    }
                }
                // Every client handle is gone (its owner ended): nothing can use the session.
                Err(rumqttc::v5::ConnectionError::RequestsDone) => return,
                Err(e) => {
                    // A contested client id: the main session says so once; here, only wait longer.
                    let lost = reconnects.lost(taken_over(&e), &mut eventloop.options);
                    match (lost.contested, outages) {
                        (Some(streak), _) => tracing::debug!(streak, "{name} closed just after it was made: {e}"),
                        (None, Outages::Warn) => tracing::warn!("{name}: {}", explain(&e)),
                        (None, Outages::Quiet) => tracing::debug!("{name}: {e}"),
                    }
                    if let Some(line) = lost.login_changed {
                        tracing::info!("{name}: {line}");
                    }
                    tokio::time::sleep(lost.wait).await;
                }
            }
        }
    });
    rx
}
