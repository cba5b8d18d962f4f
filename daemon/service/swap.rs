//! Follows the registry. When a pipeline's champion changes (`lathe models promote` or
//! `rollback` today; the training loop and remote updates later), the new version is loaded
//! off the async workers, checked, and swapped in whole. A version that fails to load is
//! reported once and the current model keeps serving.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::Serving;
use crate::config::Config;
use crate::infer::ActiveModel;
use crate::model::Registry;
use crate::telemetry::events::{Event, Events};

/// How often the champion pointers are read.
const POLL: Duration = Duration::from_millis(250);

pub async fn watch(config: Config, serving: Arc<Vec<Serving>>, events: Events, mut stop: watch::Receiver<bool>) {
    let registry = Registry::new(&config.state_dir).with_engine(config.infer.engine.clone());
    // Versions that failed to load, so a broken one is reported once, not every second.
    let mut refused: HashMap<String, u64> = HashMap::new();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(POLL) => {}
            _ = stop.changed() => return,
        }
        for (pipeline, s) in config.pipelines.iter().zip(serving.iter()) {
            let current = s.model.load_full();
            let Ok(Some(version)) = registry.champion_version(&current.name) else { continue };
            if version == current.version || refused.get(&pipeline.name) == Some(&version) {
                continue;
            }
            let (config, name, pipeline_config) = (config.clone(), current.name.clone(), pipeline.clone());
            // A new version must read the same features: the telemetry does not change with it.
            let inputs: Vec<String> = current.extractor.names().map(String::from).collect();
            let loaded = tokio::task::spawn_blocking(move || {
                let bundle = Registry::new(&config.state_dir)
                    .with_engine(config.infer.engine.clone())
                    .champion(&name)
                    .map_err(|e| e.to_string())?;
                let new: Vec<&str> = bundle.manifest.inputs.iter().map(|i| i.name.as_str()).collect();
                if new != inputs {
                    return Err(format!(
                        "its inputs ({}) differ from the serving model's ({})",
                        new.join(","),
                        inputs.join(",")
                    ));
                }
                ActiveModel::load(&bundle, &pipeline_config, config.load_context())
            })
            .await
            .unwrap_or_else(|e| Err(format!("loading panicked: {e}")));
            match loaded {
                Ok(model) => {
                    events.emit(Event::Swapped {
                        pipeline: pipeline.name.clone(),
                        model: model.name.clone(),
                        from: current.version,
                        to: model.version,
                    });
                    s.model.store(Arc::new(model));
                    refused.remove(&pipeline.name);
                }
                Err(error) => {
                    events.emit(Event::SwapRefused {
                        pipeline: pipeline.name.clone(),
                        model: current.name.clone(),
                        version,
                        error,
                    });
                    refused.insert(pipeline.name.clone(), version);
                }
            }
        }
    }
}
