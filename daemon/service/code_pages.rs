//! Gives back the pages of lathe's own code that loading a model or training ran once.
//!
//! Loading a model runs a lot of code once: tract parses, checks and optimizes the graph. The
//! kernel maps each page of code that runs, and the pages around it (fault-around, 64 KiB),
//! into the process, and they stay counted in its resident memory while serving never runs
//! them again: they were half of lathe's peak RSS. Once serving starts (and after each
//! training run), `MADV_DONTNEED` unmaps them. They stay in the page cache, so code that runs
//! again comes back with a minor fault, from memory, not from disk.
//!
//! Only mappings of the lathe binary that are not writable and hold no private (anonymous)
//! page qualify: the relocated read-only data (RELRO) was written once while loading, and
//! unmapping it would bring back the file's unrelocated bytes.

/// Unmaps lathe's resident code and read-only data pages; returns how many bytes were resident
/// in the mappings it released (0 where this is not Linux or `/proc` cannot be read).
pub fn release() -> u64 {
    #[cfg(target_os = "linux")]
    {
        let Ok(exe) = std::env::current_exe() else { return 0 };
        let Ok(smaps) = std::fs::read_to_string("/proc/self/smaps") else { return 0 };
        let mut released = 0;
        for m in clean_mappings_of(&smaps, &exe.to_string_lossy()) {
            // SAFETY: the range is a whole mapping of our own executable, read-only and
            // without a private page, so every page in it equals the file's: unmapping it
            // changes no value the process can read, only when the next read faults.
            let done = unsafe { libc::madvise(m.start as *mut libc::c_void, m.len, libc::MADV_DONTNEED) };
            if done == 0 {
                released += m.resident;
            }
        }
        released
    }
    #[cfg(not(target_os = "linux"))]
    0
}

#[derive(Debug, PartialEq)]
struct Mapping {
    start: usize,
    len: usize,
    /// Bytes resident (smaps `Rss`).
    resident: u64,
}

/// The read-only mappings of `exe` in `smaps` (`/proc/self/smaps`'s text) with no anonymous
/// page.
fn clean_mappings_of(smaps: &str, exe: &str) -> Vec<Mapping> {
    // A deleted (replaced) binary is listed with this suffix, as current_exe() reads it too.
    let exe = exe.trim_end_matches(" (deleted)");
    let mut found = Vec::new();
    // The mapping being read: (start, len, eligible so far, resident bytes).
    let mut current: Option<(usize, usize, bool, u64)> = None;
    let mut finish = |m: Option<(usize, usize, bool, u64)>| {
        if let Some((start, len, true, resident)) = m {
            found.push(Mapping { start, len, resident });
        }
    };
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let first = fields.next().unwrap_or_default();
        if let Some((lo, hi)) = first.split_once('-') {
            // A mapping's header: "start-end perms offset dev inode [path]".
            if let (Ok(lo), Ok(hi)) = (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16)) {
                finish(current.take());
                // Readable, not writable ("r--p", "r-xp").
                let read_only = fields.next().is_some_and(|perms| perms.starts_with("r-"));
                let path = fields.skip(3).collect::<Vec<_>>().join(" ");
                let eligible = read_only && path.trim_end_matches(" (deleted)") == exe;
                current = Some((lo, hi.saturating_sub(lo), eligible, 0));
                continue;
            }
        }
        let Some(m) = current.as_mut() else { continue };
        let mut kib = || fields.next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        match first {
            "Rss:" => m.3 = kib() * 1024,
            "Anonymous:" if kib() > 0 => m.2 = false,
            _ => {}
        }
    }
    finish(current);
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    // The shape of a real /proc/self/smaps (trimmed): the binary's four mappings (headers and
    // rodata, code, RELRO, data), a library, the heap.
    const SMAPS: &str = "\
5581a0000000-5581a0400000 r--p 00000000 fd:01 1234   /usr/bin/lathe
Size:               4096 kB
Rss:                3200 kB
Anonymous:             0 kB
5581a0400000-5581a1400000 r-xp 00400000 fd:01 1234   /usr/bin/lathe
Size:              16384 kB
Rss:               12400 kB
Anonymous:             0 kB
5581a1400000-5581a1500000 r--p 01400000 fd:01 1234   /usr/bin/lathe
Size:               1024 kB
Rss:                1024 kB
Anonymous:           900 kB
5581a1500000-5581a1510000 rw-p 01500000 fd:01 1234   /usr/bin/lathe
Size:                 64 kB
Rss:                  64 kB
Anonymous:            64 kB
7f0000000000-7f0000200000 r-xp 00000000 fd:01 99     /usr/lib/x86_64-linux-gnu/libc.so.6
Size:               2048 kB
Rss:                1200 kB
Anonymous:             0 kB
5581a2000000-5581a3000000 rw-p 00000000 00:00 0      [heap]
Size:              16384 kB
Rss:                7000 kB
Anonymous:          7000 kB
";

    #[test]
    fn only_the_binarys_clean_read_only_mappings_are_released() {
        let found = clean_mappings_of(SMAPS, "/usr/bin/lathe");
        assert_eq!(
            found,
            vec![
                Mapping { start: 0x5581_a000_0000, len: 0x40_0000, resident: 3200 * 1024 },
                Mapping { start: 0x5581_a040_0000, len: 0x100_0000, resident: 12400 * 1024 },
            ]
        );
        // A replaced binary reads " (deleted)" on both sides.
        let deleted = SMAPS.replace("/usr/bin/lathe", "/usr/bin/lathe (deleted)");
        assert_eq!(clean_mappings_of(&deleted, "/usr/bin/lathe (deleted)").len(), 2);
        assert!(clean_mappings_of(SMAPS, "/usr/bin/other").is_empty());
    }

    #[test]
    fn releasing_leaves_the_process_working() {
        // Runs in the test binary: its own code is unmapped under it, and the test goes on.
        let released = release();
        let again: u64 = (1..=1000u64).map(|i| i * i).sum();
        assert_eq!(again, 333_833_500);
        assert!(released > 0, "nothing of the test binary's code was resident");
    }
}
