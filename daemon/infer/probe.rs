//! A model's load and first inference, tried in a child process under a memory and a time
//! limit before the daemon loads it itself. The static checks (`untrusted`) see what a graph
//! declares; a model can still ask for memory from its data (a `Range` to a bound computed
//! from the input: 17 GB at the first row) or run for ever. In the daemon that is an OOM kill
//! or a wedged pipeline; in the child it is a refusal with a reason. `lathe run` enables it;
//! the offline commands (`lathe check`, `bundle`, `models`) load in process as before.
//!
//! The child is the daemon's own binary (`lathe __probe-model`): it reads the bundle from its
//! stdin, loads the model on the serving engine and runs the bundle's validation set, as the
//! daemon would next. Its address space is capped (`RLIMIT_AS`, `infer.load_memory_mb`) and it
//! is killed after `infer.load_timeout`. `load_memory_mb = 0` leaves the address space
//! uncapped, as do ONNX Runtime's GPU providers (CUDA reserves tens of GB of it at start).

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::EngineKind;
use crate::model::Bundle;

use crate::engine::Limits;

/// The binary that runs the child, set by `lathe run`.
static PROBE_EXE: OnceLock<PathBuf> = OnceLock::new();

/// From now on, every model the daemon loads is tried in a child first.
pub fn enable() {
    if let Ok(exe) = std::env::current_exe() {
        let _ = PROBE_EXE.set(exe);
    }
}

/// Tries `bundle` as [`child_main`] does, under `limits`; a no-op unless [`enable`]d.
/// Blocks (up to the timeout): call it off the async workers.
///
/// # Errors
/// Why the model was refused: the child's own reason, killed at the memory limit, or past
/// the time limit.
pub fn check(bundle: &Bundle, engine: &EngineKind, limits: &Limits) -> Result<(), String> {
    let Some(exe) = PROBE_EXE.get() else { return Ok(()) };
    let bytes = bundle.to_bytes().map_err(|e| e.to_string())?;
    let mut command = Command::new(exe);
    command.arg("__probe-model");
    if let EngineKind::Ort { library, providers, strict } = engine {
        command.arg("--ort-library").arg(library);
        for p in providers {
            command.args(["--provider", p]);
        }
        if *strict {
            command.arg("--strict");
        }
    }
    let bytes_limit = limits.memory_mb.saturating_mul(1 << 20);
    // CUDA and TensorRT reserve tens of GB of address space when they start, far past any
    // cap on it that would still mean something: with GPU providers only the time is limited.
    let gpu = matches!(engine, EngineKind::Ort { providers, .. } if !providers.is_empty());
    // SAFETY: between fork and exec only setrlimit, which is async-signal-safe, runs.
    if bytes_limit > 0 && !gpu {
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut command, move || {
                let limit = libc::rlimit { rlim_cur: bytes_limit, rlim_max: bytes_limit };
                if libc::setrlimit(libc::RLIMIT_AS, &limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let mut child = command
        .env("LATHE_LOG", "error")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start the model probe {}: {e}", exe.display()))?;
    if let Some(mut stdin) = child.stdin.take() {
        // A child that died early closes its end: its exit status says why.
        let _ = stdin.write_all(&bytes);
    }
    let mut stderr = child.stderr.take();
    let started = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if started.elapsed() >= limits.timeout => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "loading it and running its validation set took more than {} s (infer.load_timeout); refused",
                    limits.timeout.as_secs()
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => return Err(format!("the model probe: {e}")),
        }
    };
    if status.success() {
        return Ok(());
    }
    let mut text = String::new();
    if let Some(s) = stderr.as_mut() {
        let _ = s.take(64 << 10).read_to_string(&mut text);
    }
    let reason = text.lines().rev().find_map(|l| l.strip_prefix("lathe: ")).map(str::to_string);
    let memory = format!("the memory limit (infer.load_memory_mb = {})", limits.memory_mb);
    Err(match (reason, std::os::unix::process::ExitStatusExt::signal(&status)) {
        (Some(r), _) if r.contains("allocat") => format!("{r}: past {memory}"),
        (Some(r), _) => r,
        (None, Some(sig)) => format!("loading it or its first inference was killed by signal {sig}, past {memory}"),
        (None, None) => format!("the model probe failed ({status}) at {memory}"),
    })
}

/// `lathe __probe-model`: a bundle on stdin, loaded on the engine named and run on its own
/// validation set. Exit 0 when it serves; otherwise `lathe: REASON` on stderr, exit 1.
pub fn child_main(ort_library: Option<PathBuf>, providers: Vec<String>, strict: bool) -> ExitCode {
    let engine = match ort_library {
        Some(library) => EngineKind::Ort { library, providers, strict },
        None => EngineKind::Tract,
    };
    let result = (|| -> Result<(), String> {
        let mut bytes = Vec::new();
        std::io::stdin().read_to_end(&mut bytes).map_err(|e| e.to_string())?;
        let bundle = Bundle::from_bytes(&bytes).map_err(|e| e.to_string())?;
        let engine = super::Engine::load_with(&bundle.model, &engine).map_err(|e| e.to_string())?;
        bundle.validate(&engine).map_err(|e| e.to_string())
    })();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lathe: {e}");
            ExitCode::FAILURE
        }
    }
}
