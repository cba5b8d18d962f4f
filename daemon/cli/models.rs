//! `lathe models list | import | promote | rollback`: the registry, offline. A running
//! daemon reads the champion pointers every second and swaps to what they name.

use std::path::{Path, PathBuf};

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
    let state_dir = match &cmd {
        ModelsCommand::Promote { config: Some(path), .. } => {
            crate::service::load_config(path).map_err(|e| e.to_string())?.state_dir
        }
        ModelsCommand::List { state_dir, .. }
        | ModelsCommand::Import { state_dir, .. }
        | ModelsCommand::Promote { state_dir, .. }
        | ModelsCommand::Rollback { state_dir, .. } => state_dir.clone(),
    };
    let result = change(cmd);
    hand_to_owner(&state_dir)
        .map_err(|e| format!("{}: cannot hand what was written to its owner: {e}", state_dir.display()))?;
    result
}

/// An operator's `sudo lathe models …` writes as root; the service (user `lathe`) could then
/// not replace those files. So, run as root, every root-owned entry under the state folder is
/// given to the folder's own owner (nothing to do where the folder is root's, or not there).
fn hand_to_owner(state_dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(());
    }
    let owner = match std::fs::metadata(state_dir) {
        Ok(m) if m.uid() != 0 => m,
        Ok(_) => return Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let mut folders = vec![state_dir.to_path_buf()];
    while let Some(folder) = folders.pop() {
        for entry in std::fs::read_dir(&folder)? {
            let path = entry?.path();
            let meta = std::fs::symlink_metadata(&path)?;
            if meta.uid() == 0 {
                std::os::unix::fs::lchown(&path, Some(owner.uid()), Some(owner.gid()))?;
            }
            if meta.is_dir() {
                folders.push(path);
            }
        }
    }
    Ok(())
}

fn change(cmd: ModelsCommand) -> Result<(), String> {
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
                    let c = crate::service::load_config(&path).map_err(|e| e.to_string())?;
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
            // A pushed version rolled back stays rolled back: its retained offer is refused.
            if let Some(from) = from {
                crate::trust::floor::Floor::new(&state_dir).rolled_back(&name, from)?;
            }
            show(from, to, &name);
            Ok(())
        }
    }
}
