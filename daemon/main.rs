//! The `lathe` binary: everything lives in the library; this sets up the allocator and hands
//! over the arguments.

fn main() -> std::process::ExitCode {
    one_malloc_arena();
    lathe::cli::main()
}

/// glibc gives each thread that allocates an arena of its own; lathe's threads (tokio workers,
/// the monitor's calibration, training) hand rows to each other, so memory freed in one arena
/// is not reused by the next thread that needs it. One arena lowered the benchmark's peak RSS
/// by 1.1 MiB at the same throughput (docs/performance.md). Before any thread
/// starts; `MALLOC_ARENA_MAX` in the environment still decides where it is set.
fn one_malloc_arena() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets an allocator parameter; no thread exists yet.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 1);
        }
    }
}
