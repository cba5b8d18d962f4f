//! `lathe root`: the central server's root of trust (TUF's root role, `trust::root`). A root
//! names the keys that sign updates and the k of n root keys that sign the next root; each
//! holder of a root key signs offline in turn, and `push` publishes the chain for the fleet.

use std::path::{Path, PathBuf};

use clap::Subcommand;

use super::fleet::{connect, publish_all, BrokerArgs};
use crate::trust::root::{Root, SignedRoot, Trust};
use crate::trust::signing;

#[derive(Subcommand)]
pub enum RootCommand {
    /// Write a root document, signed by each root key given as a secret (`.key`) file.
    Create {
        /// Its version: 1 for the first root, one more than the root it replaces.
        #[arg(long)]
        version: u64,
        /// A root key (repeatable): a `.pub` file lists it, a `.key` file lists it and signs.
        #[arg(long = "root-key", required = true)]
        root_keys: Vec<PathBuf>,
        /// How many root keys must sign a root (the next one included).
        #[arg(long, default_value_t = 1)]
        threshold: u32,
        /// A key whose signatures on offers and bundles devices trust (`.pub`; repeatable).
        #[arg(long = "update-key", required = true)]
        update_keys: Vec<PathBuf>,
        /// The root trusts nothing after this long (e.g. 365d): the fleet must hear from the
        /// central server at least that often.
        #[arg(long, default_value = "365d")]
        expires: String,
        #[arg(short = 'o', long)]
        out: PathBuf,
    },
    /// Add a root key's signature to a root document, in place (a rotation needs the keys of
    /// the root it replaces as well as its own).
    Sign {
        file: PathBuf,
        #[arg(long)]
        key: PathBuf,
    },
    /// Publish the chain of roots (every root after the devices' first, in version order),
    /// retained on `lathe/fleet/root`.
    Push {
        #[arg(required = true)]
        files: Vec<PathBuf>,
        #[command(flatten)]
        broker: BrokerArgs,
    },
}

fn read(path: &Path) -> Result<SignedRoot, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_slice(&bytes).map_err(|e| format!("{}: not a signed root: {e}", path.display()))
}

fn write(path: &Path, signed: &SignedRoot) -> Result<(), String> {
    let bytes = serde_json::to_vec_pretty(signed).map_err(|e| e.to_string())?;
    crate::fs::write_atomic(path, &bytes).map_err(|e| format!("{}: {e}", path.display()))
}

/// What a root's own signatures say: whether it holds on its own yet.
fn standing(signed: &SignedRoot) -> String {
    match Trust::from_signed(signed.clone()) {
        Ok(_) => "holds on its own signatures".into(),
        Err(e) => format!("does not hold yet: {e}"),
    }
}

pub fn run(cmd: RootCommand) -> Result<(), String> {
    match cmd {
        RootCommand::Create { version, root_keys, threshold, update_keys, expires, out } => {
            let mut listed = Vec::new();
            let mut signers = Vec::new();
            for path in &root_keys {
                if path.extension().is_some_and(|e| e == "key") {
                    let key = signing::read_signing_key(path)?;
                    listed.push(hex::encode(key.verifying_key().to_bytes()));
                    signers.push(key);
                } else {
                    listed.push(hex::encode(signing::read_public_key(path)?.to_bytes()));
                }
            }
            let update_keys = update_keys
                .iter()
                .map(|p| signing::read_public_key(p).map(|k| hex::encode(k.to_bytes())))
                .collect::<Result<Vec<_>, _>>()?;
            let expires = crate::config::parse_duration(&expires).ok_or("--expires: expected e.g. 30d, 365d")?;
            let root = Root {
                version,
                expires_unix: crate::telemetry::unix_ms() / 1000 + expires.as_secs(),
                root_keys: listed,
                root_threshold: threshold,
                update_keys,
            };
            let signed = SignedRoot::sign(&root, &signers.iter().collect::<Vec<_>>())?;
            signed.body()?;
            write(&out, &signed)?;
            println!(
                "wrote root v{version} to {} ({} of {} root keys signed; {threshold} needed); it {}",
                out.display(),
                signers.len(),
                root.root_keys.len(),
                standing(&signed)
            );
            Ok(())
        }
        RootCommand::Sign { file, key } => {
            let mut signed = read(&file)?;
            let root = signed.body()?;
            signed.add_signature(&signing::read_signing_key(&key)?);
            write(&file, &signed)?;
            println!(
                "signed root v{} ({} signatures); it {}",
                root.version,
                signed.signatures.len(),
                standing(&signed)
            );
            Ok(())
        }
        RootCommand::Push { files, broker } => {
            let chain = files.iter().map(|f| read(f)).collect::<Result<Vec<_>, _>>()?;
            // The chain must hold together before it goes out: each root signed by the
            // threshold of its predecessor's keys and of its own.
            let mut trust = Trust::from_signed(chain[0].clone())?;
            let message = serde_json::to_vec(&chain).map_err(|e| e.to_string())?;
            trust.advance(&message)?;
            let rt = super::runtime()?;
            rt.block_on(async {
                let (client, mut events) = connect(&broker, "lathe-root").await?;
                publish_all(&client, &mut events, vec![("lathe/fleet/root".to_string(), message)]).await?;
                let _ = client.disconnect().await;
                println!(
                    "published roots v{}..v{} on lathe/fleet/root (retained)",
                    chain[0].body()?.version,
                    trust.root.version
                );
                Ok(())
            })
        }
    }
}
