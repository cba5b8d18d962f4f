//! The in-process broker (`mqtt.url = "embedded"`, and `lathe demo`): rumqttd on a thread of
//! its own. rumqttd's `start()` blocks forever and only logs a port already in use, so we
//! check the port first and the broker lives as long as the process.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};

/// Starts the broker on `listen` and waits until it accepts connections.
///
/// # Errors
/// A bad address, a port already taken, or a broker that does not come up.
pub fn start(listen: &str) -> Result<SocketAddr, String> {
    let addr: SocketAddr = listen.parse().map_err(|e| format!("embedded broker address {listen:?}: {e}"))?;
    // Bind once ourselves: rumqttd would only log the failure.
    let probe = TcpListener::bind(addr).map_err(|e| format!("embedded broker cannot listen on {addr}: {e}"))?;
    let addr = probe.local_addr().map_err(|e| e.to_string())?;
    drop(probe);
    let connections = ConnectionSettings {
        connection_timeout_ms: 60_000,
        max_payload_size: 1 << 20,
        max_inflight_count: 1000,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
    };
    let server =
        ServerSettings { name: "v5".into(), listen: addr, tls: None, next_connection_delay_ms: 1, connections };
    let config = Config {
        router: RouterConfig {
            max_connections: 1000,
            max_outgoing_packet_count: 200,
            max_segment_size: 100 * 1024,
            // rumqttd keeps each topic's last `count × size` bytes, and a subscriber that falls
            // further behind than that skips to the head: those messages are lost (the demo
            // counts them). 10 segments hold ~7,000 telemetry messages, 3.5 s at the demo's
            // 2,000 msg/s. More do not help: with 50, rumqttd's router itself slowed lathe to
            // ~1,500 msg/s (p50 latency 800 µs instead of 210 µs) on this 2-core machine.
            max_segment_count: 10,
            ..Default::default()
        },
        // lathe speaks MQTT v5 (see ingest::connection), so the embedded broker does too.
        v5: Some(HashMap::from([("v5".to_string(), server)])),
        ..Default::default()
    };
    std::thread::Builder::new()
        .name("embedded-broker".into())
        .spawn(move || {
            if let Err(e) = Broker::new(config).start() {
                tracing::error!("Embedded broker stopped: {e}");
            }
        })
        .map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
            return Ok(addr);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(format!("embedded broker did not start listening on {addr}"))
}

/// A free loopback address for a private broker.
pub fn free_loopback() -> Result<String, String> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    Ok(l.local_addr().map_err(|e| e.to_string())?.to_string())
}
