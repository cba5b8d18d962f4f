//! The device side of remote updates: its own MQTT session (clean, client id
//! `{client_id}-update`) for offers and chunks, so a download never competes with telemetry
//! for the main session's flow control.

use std::collections::BTreeMap;
use std::sync::mpsc::Sender;
use std::time::Duration;

use ed25519_dalek::VerifyingKey;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::AsyncClient;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, watch};

use super::config::{TrustSource, UpdateConfig};
use crate::engine::Engine;
use crate::infer::config::InferConfig;
use crate::infer::SharedModel;
use crate::model::{bundle, Bundle, Registry};
use crate::mqtt::{spawn_polling, Broker, Outages};
use crate::telemetry::events::{Event, Events};
use crate::telemetry::inbox::LoopMessage;
use crate::trust::floor::Floor;
use crate::trust::root::{Advance, Trust};
use crate::trust::signing::{self, Offer};
use crate::update::UpdateError;

/// Downloads at once (each bounded by `max_bundle_mb`).
const MAX_DOWNLOADS: usize = 2;

/// A finished download and what its verification found.
type Verified = (Download, Result<(Bundle, Value), UpdateError>);

struct Download {
    offer: Offer,
    /// Where the offer came from (for the events).
    topic: String,
    signer: String,
    chunks: BTreeMap<u32, Vec<u8>>,
    bytes: u64,
    /// The sha256 of the chunks so far in order, and the next index it needs.
    hasher: Sha256,
    next: u32,
    deadline: tokio::time::Instant,
}

/// The keys trusted now: fixed (`update.trusted_keys`) or a root's, which newer roots rotate.
enum Keys {
    Fixed(Vec<VerifyingKey>),
    Root(Trust),
}

/// What the updater needs of the daemon beyond `[update]`.
#[derive(Debug, Clone)]
pub struct Device {
    /// `node`: offers on `lathe/{node}/update` are for this device.
    pub node: String,
    /// The registry, the anti-rollback floor and a root's stored chain are kept here.
    pub state_dir: std::path::PathBuf,
    /// A bundle is validated on the engine that would serve it.
    pub infer: InferConfig,
}

pub struct Updater {
    device: Device,
    settings: UpdateConfig,
    /// Behind a lock only because the updater's future must be `Send`; one task uses it.
    keys: std::sync::Mutex<Keys>,
    events: Events,
    loop_tx: Sender<LoopMessage>,
    /// The models the pipelines serve, by pipeline.
    models: Vec<(String, SharedModel)>,
}

fn bundles_topic(sha: &str) -> String {
    format!("lathe/bundles/{sha}/+")
}

/// Starts the updater; it ends when `stop` fires.
///
/// # Errors
/// Unreadable keys or credentials.
pub fn start(
    broker: Broker,
    device: Device,
    settings: &UpdateConfig,
    models: Vec<(String, SharedModel)>,
    events: Events,
    loop_tx: Sender<LoopMessage>,
    stop: watch::Receiver<bool>,
) -> Result<tokio::task::JoinHandle<()>, String> {
    let keys = match &settings.trust {
        TrustSource::Keys(files) => {
            Keys::Fixed(files.iter().map(|k| signing::read_public_key(k)).collect::<Result<Vec<_>, _>>()?)
        }
        TrustSource::Root(file) => Keys::Root(Trust::load(file, &device.state_dir)?),
    };
    let options = broker.side_session("update").map_err(|e| e.to_string())?;
    let (client, eventloop) = AsyncClient::new(options, 256);
    // Quiet: the daemon's main session already warns of a broker outage.
    let session = spawn_polling("Update session", eventloop, broker.login(), Outages::Quiet);
    let keys = std::sync::Mutex::new(keys);
    let updater = Updater { device, settings: settings.clone(), keys, events, loop_tx, models };
    Ok(tokio::spawn(updater.run(client, session, stop)))
}

impl Updater {
    fn offer_topics(&self) -> Vec<String> {
        std::iter::once(format!("lathe/{}/update", self.device.node))
            .chain(self.settings.groups.iter().map(|g| format!("lathe/fleet/{g}/update")))
            .collect()
    }

    /// Where new roots come (retained chains), when trust comes from a root.
    fn root_topics(&self) -> Vec<String> {
        match &self.settings.trust {
            TrustSource::Root(_) => vec!["lathe/fleet/root".into(), format!("lathe/{}/root", self.device.node)],
            TrustSource::Keys(_) => vec![],
        }
    }

    /// The keys that sign offers and bundles now.
    ///
    /// # Errors
    /// The root has expired (it trusts nothing until a newer one comes).
    fn trusted(&self) -> Result<Vec<VerifyingKey>, String> {
        let keys = self.keys.lock().map_err(|_| "the trusted keys are poisoned".to_string())?;
        match &*keys {
            Keys::Fixed(k) => Ok(k.clone()),
            Keys::Root(trust) => match trust.expired(crate::telemetry::unix_ms() / 1000) {
                Some(why) => Err(why),
                None => Ok(trust.update_keys().to_vec()),
            },
        }
    }

    /// A root message: the chain is walked from the root held; a newer root is stored before
    /// it is used, and the offers are read again (one refused for a key only the new root
    /// trusts may arrive before it). Returns whether the trust changed.
    fn root_message(&self, topic: &str, payload: &[u8]) -> bool {
        let Ok(mut keys) = self.keys.lock() else { return false };
        let Keys::Root(trust) = &mut *keys else { return false };
        let mut next = trust.clone();
        let refuse = |why: String, held: u64| {
            self.emit(
                "update.root_refused",
                format!("Root on {topic} refused, trusted root v{held} unchanged: {why}"),
                json!({"name": "root", "version": held, "topic": topic, "why": why}),
            );
            false
        };
        match next.advance(payload) {
            Ok(Advance::Unchanged) => false,
            Err(why) => refuse(why, trust.root.version),
            Ok(Advance::To { from, to }) => {
                if let Err(e) = next.store(&self.device.state_dir) {
                    return refuse(format!("cannot store it: {e}"), from);
                }
                let why = format!(
                    "root v{to} signed by the keys of v{from}; update keys {}, {} of {} root keys sign the next",
                    next.update_key_ids().join(", "),
                    next.root.root_threshold,
                    next.root.root_keys.len()
                );
                self.emit(
                    "update.root",
                    format!("Trusting root v{to} (was v{from}): {why}"),
                    json!({"name": "root", "version": to, "from": from, "why": why,
                           "update_keys": next.update_key_ids(), "expires_unix": next.root.expires_unix}),
                );
                *trust = next;
                true
            }
        }
    }

    fn registry(&self) -> Registry {
        Registry::new(&self.device.state_dir).with_engine(self.device.infer.engine.clone())
    }

    fn emit(&self, step: &'static str, message: String, detail: Value) {
        let pipeline = detail["name"]
            .as_str()
            .and_then(|n| self.models.iter().find(|(_, m)| m.load().name == n))
            .map_or_else(String::new, |(p, _)| p.clone());
        self.events.emit(Event::Step { pipeline, step, message, detail });
    }

    async fn run(self, client: AsyncClient, mut session: mpsc::Receiver<Packet>, mut stop: watch::Receiver<bool>) {
        let (done_tx, mut done) = mpsc::channel::<Verified>(4);
        let mut downloads: BTreeMap<String, Download> = BTreeMap::new();
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tokio::select! {
                packet = session.recv() => match packet {
                    Some(Packet::ConnAck(_)) => {
                        // Offers again (retained), and every download resumes where it was.
                        for t in self.root_topics().into_iter().chain(self.offer_topics()) {
                            let _ = client.subscribe(t, QoS::AtLeastOnce).await;
                        }
                        for sha in downloads.keys() {
                            let _ = client.subscribe(bundles_topic(sha), QoS::AtLeastOnce).await;
                        }
                    }
                    Some(Packet::Publish(p)) => {
                        let (topic, payload) = (String::from_utf8_lossy(&p.topic).into_owned(), p.payload.to_vec());
                        if let Some(rest) = topic.strip_prefix("lathe/bundles/") {
                            self.chunk(rest, payload, &mut downloads, &client, &done_tx).await;
                        } else if payload.is_empty() {
                            // A cleared retained offer.
                        } else if self.root_topics().contains(&topic) {
                            if self.root_message(&topic, &payload) {
                                for t in self.offer_topics() {
                                    let _ = client.unsubscribe(t.clone()).await;
                                    let _ = client.subscribe(t, QoS::AtLeastOnce).await;
                                }
                            }
                        } else if let Some(offer) = self.consider(&topic, &payload, &downloads) {
                            if downloads.len() >= MAX_DOWNLOADS {
                                self.emit("update.refused", "too many downloads at once; offer again later".into(), json!({"name": offer.0.name, "version": offer.0.version, "verified": true, "why": "too many downloads at once"}));
                                continue;
                            }
                            let (offer, signer) = offer;
                            self.emit(
                                "update.downloading",
                                format!("Downloading {} v{} ({} bytes in {} chunks)", offer.name, offer.version, offer.length, offer.chunks),
                                json!({"name": offer.name, "version": offer.version, "sha256": offer.sha256, "signer": signer}),
                            );
                            let _ = client.subscribe(bundles_topic(&offer.sha256), QoS::AtLeastOnce).await;
                            downloads.insert(offer.sha256.clone(), Download {
                                deadline: tokio::time::Instant::now() + self.settings.download_timeout,
                                offer, topic, signer, chunks: BTreeMap::new(), bytes: 0, hasher: Sha256::new(), next: 0,
                            });
                        }
                    }
                    Some(_) => {}
                    None => break,
                },
                Some((download, result)) = done.recv() => self.finish(download, result),
                _ = tick.tick() => {
                    let now = tokio::time::Instant::now();
                    let late: Vec<String> = downloads.iter().filter(|(_, d)| d.deadline <= now).map(|(k, _)| k.clone()).collect();
                    for sha in late {
                        if let Some(d) = downloads.remove(&sha) {
                            let _ = client.unsubscribe(bundles_topic(&sha)).await;
                            self.failed(&d.offer, format!(
                                "truncated download: {} of {} bytes ({} of {} chunks) after {} s",
                                d.bytes, d.offer.length, d.chunks.len(), d.offer.chunks, self.settings.download_timeout.as_secs()
                            ));
                        }
                    }
                }
                _ = stop.changed() => break,
            }
        }
        let _ = client.try_disconnect();
        // The session's task ends once the DISCONNECT is out, closing the channel.
        let _ = tokio::time::timeout(Duration::from_secs(2), async { while session.recv().await.is_some() {} }).await;
    }

    fn failed(&self, offer: &Offer, why: String) {
        self.emit(
            "update.failed",
            format!("Update {} v{} failed, champion unchanged: {why}", offer.name, offer.version),
            json!({"name": offer.name, "version": offer.version, "sha256": offer.sha256, "why": why}),
        );
    }

    /// An offer message: `Some((offer, signer))` when it should be downloaded. Refusals are
    /// events; an offer already acted on (a retained offer seen again) is dropped quietly.
    fn consider(&self, topic: &str, payload: &[u8], downloads: &BTreeMap<String, Download>) -> Option<(Offer, String)> {
        // Every refusal names the model and version, an offer that did not open by what it
        // claims (`"verified": false`): an operator looks for "v7 of press-anomaly".
        let refuse_as = |name: &str, version: Option<u64>, verified: bool, why: String| {
            self.emit(
                "update.refused",
                format!("Offer on {topic} refused, champion unchanged: {why}"),
                json!({"name": name, "version": version, "verified": verified, "topic": topic, "why": why}),
            );
            None
        };
        let trusted = match self.trusted() {
            Ok(k) => k,
            Err(why) => {
                let (name, version) = signing::offer_claims(payload);
                return refuse_as(&name, version, false, why);
            }
        };
        let (offer, signer) = match signing::open_offer(payload, &trusted) {
            Ok(o) => o,
            Err(e) => {
                let (name, version) = signing::offer_claims(payload);
                return refuse_as(&name, version, false, e);
            }
        };
        let refuse = |name: &str, why: String| refuse_as(name, Some(offer.version), true, why);
        if downloads.contains_key(&offer.sha256) {
            return None;
        }
        if !offer.targets.iter().any(|t| t == topic) {
            let why = match offer.targets.is_empty() {
                true => "the offer names no target (lathe push signs each offer for its topics)".to_string(),
                false => format!("the offer is signed for {}, not for this topic", offer.targets.join(", ")),
            };
            return refuse(&offer.name, why);
        }
        let now = crate::telemetry::unix_ms() / 1000;
        if now > offer.expires_unix {
            return refuse(&offer.name, format!("the offer expired at {} (now {now})", offer.expires_unix));
        }
        if offer.compatible != self.settings.compatible {
            return refuse(
                &offer.name,
                format!(
                    "the offer is for hardware {:?}; this device is {:?}",
                    offer.compatible, self.settings.compatible
                ),
            );
        }
        if !signing::version_at_least(env!("CARGO_PKG_VERSION"), &offer.min_daemon_version) {
            return refuse(
                &offer.name,
                format!("it needs lathe {} or later; this is {}", offer.min_daemon_version, env!("CARGO_PKG_VERSION")),
            );
        }
        if !self.models.iter().any(|(_, m)| m.load().name == offer.name) {
            return refuse(&offer.name, format!("no pipeline here serves model {:?}", offer.name));
        }
        if offer.length > self.settings.max_bundle_bytes || offer.chunks == 0 || u64::from(offer.chunks) > offer.length
        {
            return refuse(
                &offer.name,
                format!(
                    "{} bytes in {} chunks is not acceptable (update.max_bundle_mb = {})",
                    offer.length,
                    offer.chunks,
                    self.settings.max_bundle_bytes >> 20
                ),
            );
        }
        let floor = Floor::new(&self.device.state_dir);
        let accepted = match floor.read() {
            Ok(all) => all.get(&offer.name).cloned(),
            Err(e) => return refuse(&offer.name, format!("the anti-rollback floor is unreadable: {e}")),
        };
        let registry = self.registry();
        let champion = registry.champion_version(&offer.name).ok().flatten();
        // Accepted before (the same bytes): done, or (killed before the promotion) go on.
        if let Some(a) = accepted.as_ref().filter(|a| a.version == offer.version && a.sha256 == offer.sha256) {
            if a.failed_trial {
                return refuse(
                    &offer.name,
                    format!("v{} failed its trial here and was rolled back; offer a newer version", offer.version),
                );
            }
            if a.rolled_back {
                return refuse(
                    &offer.name,
                    format!("v{} was rolled back here by an operator; offer a newer version", offer.version),
                );
            }
            if champion == Some(offer.version) {
                return None;
            }
        } else {
            if let Ok(Some(why)) = floor.check(&offer.name, offer.version, &offer.sha256) {
                return refuse(&offer.name, why);
            }
            let held = registry.versions(&offer.name).unwrap_or_default().into_iter().max().unwrap_or(0);
            if offer.version <= held {
                return refuse(
                    &offer.name,
                    format!("v{} is not newer than v{held}, which this device holds", offer.version),
                );
            }
            // The floor only rises: a signed offer far ahead (fast-forward) would shut out
            // every real update after it.
            let highest = held.max(accepted.as_ref().map_or(0, |a| a.version));
            if offer.version.saturating_sub(highest) > self.settings.max_version_step {
                return refuse(
                    &offer.name,
                    format!(
                        "v{} is {} versions past v{highest}; at most {} (update.max_version_step)",
                        offer.version,
                        offer.version - highest,
                        self.settings.max_version_step
                    ),
                );
            }
        }
        Some((offer, signer))
    }

    async fn chunk(
        &self,
        rest: &str,
        payload: Vec<u8>,
        downloads: &mut BTreeMap<String, Download>,
        client: &AsyncClient,
        done: &mpsc::Sender<Verified>,
    ) {
        let Some((sha, index)) = rest.split_once('/') else { return };
        let Some(d) = downloads.get_mut(sha) else { return };
        let problem = match index.parse::<u32>() {
            Err(_) => Some(format!("chunk topic {index:?} is not an index")),
            Ok(i) if i >= d.offer.chunks => {
                Some(format!("chunk {i} is past the {} the offer declared", d.offer.chunks))
            }
            Ok(i) if d.chunks.contains_key(&i) || i < d.next => None, // seen (a resubscription)
            Ok(i) => {
                d.bytes += payload.len() as u64;
                d.chunks.insert(i, payload);
                // Hash in order as the bytes become contiguous.
                while let Some(c) = d.chunks.get(&d.next) {
                    d.hasher.update(c);
                    d.next += 1;
                }
                (d.bytes > d.offer.length)
                    .then(|| format!("more than the {} bytes the offer declared (endless data)", d.offer.length))
            }
        };
        let complete = d.next == d.offer.chunks;
        if problem.is_none() && !complete {
            return;
        }
        let sha = sha.to_string();
        let _ = client.unsubscribe(bundles_topic(&sha)).await;
        let Some(d) = downloads.remove(&sha) else { return };
        if let Some(why) = problem {
            return self.failed(&d.offer, why);
        }
        if d.bytes != d.offer.length {
            return self.failed(&d.offer, format!("{} bytes arrived, the offer declared {}", d.bytes, d.offer.length));
        }
        let got = hex::encode(d.hasher.clone().finalize());
        if got != d.offer.sha256 {
            return self
                .failed(&d.offer, format!("sha256 {got} is not the offer's {} (tampered chunks)", d.offer.sha256));
        }
        // Verification and validation load a model: off the async workers. The keys are
        // those trusted now: a root that revoked the offer's signer meanwhile stops it here.
        let trusted = self.trusted();
        let (infer, state_dir, done) = (self.device.infer.clone(), self.device.state_dir.clone(), done.clone());
        tokio::task::spawn_blocking(move || {
            let bytes: Vec<u8> = d.chunks.values().flatten().copied().collect();
            let result = trusted
                .map_err(UpdateError::Untrusted)
                .and_then(|trusted| verify(&bytes, &d.offer, &trusted, &infer, &state_dir));
            let _ = done.blocking_send((d, result));
        });
    }

    /// A verified bundle: into the registry, then the floor (trust), then the loop promotes it.
    fn finish(&self, d: Download, result: Result<(Bundle, Value), UpdateError>) {
        let stored = result.and_then(|(bundle, record)| {
            self.registry().add(&bundle).map_err(|e| UpdateError::Store(format!("cannot store the bundle: {e}")))?;
            Floor::new(&self.device.state_dir)
                .record(&d.offer.name, d.offer.version, &d.offer.sha256)
                .map_err(|e| UpdateError::Store(format!("cannot record the anti-rollback floor: {e}")))?;
            Ok((bundle, record))
        });
        let (bundle, mut record) = match stored {
            Ok(r) => r,
            Err(why) => return self.failed(&d.offer, why.to_string()),
        };
        record["origin"] = "pushed".into();
        record["offer_topic"] = d.topic.as_str().into();
        record["signer"] = d.signer.as_str().into();
        self.emit(
            "update.verified",
            format!(
                "{} v{} verified (signed by {}), validated and recorded; promoting",
                d.offer.name, d.offer.version, d.signer
            ),
            record.clone(),
        );
        let model = bundle.manifest.name.clone();
        let _ = self.loop_tx.send(LoopMessage::Pushed { model, bundle: Box::new(bundle), record });
    }
}

/// The downloaded bytes as a bundle: signed by a trusted key, the one offered, loading and
/// finite on the serving engine, and not worse than the champion by the gate's rule on its
/// own validation set.
fn verify(
    bytes: &[u8],
    offer: &Offer,
    trusted: &[VerifyingKey],
    infer: &InferConfig,
    state_dir: &std::path::Path,
) -> Result<(Bundle, Value), UpdateError> {
    let engine = &infer.engine;
    let bundle = Bundle::from_bytes(bytes).map_err(UpdateError::NotABundle)?;
    let signer = signing::verify_bundle(&bundle, trusted).map_err(UpdateError::Untrusted)?;
    let m = &bundle.manifest;
    if m.name != offer.name || m.version != offer.version {
        let (got, offered) = (format!("{} v{}", m.name, m.version), format!("{} v{}", offer.name, offer.version));
        return Err(UpdateError::NotTheOffer { got, offered });
    }
    let model = |e: String| UpdateError::Model(e);
    crate::infer::probe::check(&bundle, engine, &infer.load_limits).map_err(model)?;
    let candidate = Engine::load_with(&bundle.model, engine).map_err(|e| model(e.to_string()))?;
    let (x, outputs) = bundle.validated_outputs(&candidate).map_err(|e| model(e.to_string()))?;
    let truth = bundle.validation_targets().map_err(|e| model(e.to_string()))?;
    let f = m.inputs.len();
    let measured = bundle::measure(m.task, m.baseline.threshold, &outputs, m.primary_output, &x, f, &truth)
        .map_err(|e| model(e.to_string()))?;
    let metric = &m.gate.metric;
    let value = measured.metrics.get(metric).copied().unwrap_or(f64::NAN);
    let mut record = json!({
        "name": m.name, "version": m.version, "sha256": offer.sha256, "bundle_signer": signer,
        "validation": measured.metrics, "gate_metric": metric,
    });
    let registry = Registry::new(state_dir).with_engine(engine.clone());
    if let Ok(champion) = registry.champion(&m.name) {
        let c = &champion.manifest;
        let names = |b: &Bundle| b.manifest.inputs.iter().map(|i| i.name.clone()).collect::<Vec<_>>().join(",");
        if names(&champion) != names(&bundle) || c.window != m.window {
            return Err(UpdateError::Inputs { theirs: names(&bundle), champion: names(&champion) });
        }
        let serving = Engine::load_with(&champion.model, engine).map_err(|e| model(e.to_string()))?;
        let out = serving
            .run(&bundle.validation_samples().map_err(|e| model(e.to_string()))?)
            .map_err(|e| model(e.to_string()))?;
        let theirs = bundle::measure(c.task, c.baseline.threshold, &out, c.primary_output, &x, f, &truth)
            .map_err(|e| model(e.to_string()))?;
        let champ = theirs.metrics.get(metric).copied().unwrap_or(f64::NAN);
        let slack = m.gate.max_forgetting * champ.abs();
        let worse = if m.gate.higher_is_better { value < champ - slack } else { value > champ + slack };
        record["champion_validation"] = json!(theirs.metrics);
        if worse || !value.is_finite() {
            let max_forgetting = m.gate.max_forgetting;
            return Err(UpdateError::Gate { metric: metric.clone(), value, champion: champ, max_forgetting });
        }
    }
    Ok((bundle, record))
}
