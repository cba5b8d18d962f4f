//! `lathe models list | import | promote | rollback`: the registry, offline. A running
//! daemon reads the champion pointers every second and swaps to what they name.

use std::path::PathBuf;

use clap::Subcommand;

use crate::model::Registry;

#[derive(Subcommand)]
pub enum ModelsCommand {
    /// Every model with its versions, champion and rollback history.
    List {
        #[arg(long, default_value = "/var/lib/lathe")]
        state_dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Add a bundle file to the registry without serving it (unless it is the first of its name).
    Import {
        file: PathBuf,
        #[arg(long, default_value = "/var/lib/lathe")]
        state_dir: PathBuf,
    },
    /// Serve VERSION of NAME from now on (it must load and pass its validation set first).
    Promote {
        name: String,
        version: u64,
        #[arg(long, default_value = "/var/lib/lathe")]
        state_dir: PathBuf,
        /// The daemon's config: its state_dir, and its `infer.engine` to validate on (default:
        /// tract, the built-in engine).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Go back to the champion before the current one.
    Rollback {
        name: String,
        #[arg(long, default_value = "/var/lib/lathe")]
        state_dir: PathBuf,
    },
}

pub fn run(cmd: ModelsCommand) -> Result<(), String> {
    let show = |from: Option<u64>, to: u64, name: &str| match from {
        Some(f) => println!("{name}: champion v{f} -> v{to}"),
        None => println!("{name}: champion v{to}"),
    };
    match cmd {
        ModelsCommand::List { state_dir, json } => {
            let entries = Registry::new(&state_dir).list().map_err(|e| e.to_string())?;
            if json {
                println!("{}", serde_json::to_string(&entries).map_err(|e| e.to_string())?);
            }
            for e in entries.iter().filter(|_| !json) {
                let versions: Vec<String> = e
                    .versions
                    .iter()
                    .map(|v| if Some(*v) == e.champion { format!("v{v} (champion)") } else { format!("v{v}") })
                    .collect();
                println!("{}: {}", e.name, versions.join(", "));
            }
            Ok(())
        }
        ModelsCommand::Import { file, state_dir } => {
            let b = Registry::new(&state_dir).import(&file).map_err(|e| e.to_string())?;
            println!("imported {} v{}", b.manifest.name, b.manifest.version);
            Ok(())
        }
        ModelsCommand::Promote { name, version, state_dir, config } => {
            let registry = match config {
                Some(path) => {
                    let c = crate::config::Config::load(&path).map_err(|e| e.to_string())?;
                    Registry::new(&c.state_dir).with_engine(c.infer.engine)
                }
                None => Registry::new(&state_dir),
            };
            let (from, to) = registry.promote(&name, version).map_err(|e| e.to_string())?;
            show(from, to, &name);
            Ok(())
        }
        ModelsCommand::Rollback { name, state_dir } => {
            let (from, to) = Registry::new(&state_dir).rollback(&name).map_err(|e| e.to_string())?;
            show(from, to, &name);
            Ok(())
        }
    }
}
