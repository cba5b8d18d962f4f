//! Files written whole or not at all: the one way lathe writes a file another start, another
//! process or a person will read (bundles, run records, keys, the anti-rollback floor).

use std::io::Write;
use std::path::Path;

/// Writes `data` to `path` atomically: a temporary file beside it, synced, renamed over it,
/// and the folder synced, so a crash leaves the old file or the new one, never a torn one.
///
/// # Errors
/// Any filesystem failure.
pub fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    // `Path::new("x.lathe").parent()` is `Some("")`, which names no directory.
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{}.tmp", path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default()));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}
