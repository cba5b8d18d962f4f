//! The `lathe` command line (README, `lathe --help`): every command exits non-zero with a
//! one-line reason on error, and `--json` prints machine-readable output where it reports.

mod aggregate;
mod bundle;
mod capture;
#[cfg(feature = "embedded-broker")]
mod demo;
mod fleet;
mod listen;
mod models;
mod root;
mod store;
mod train;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::Config;

#[derive(Parser)]
#[command(name = "lathe", version, about = "Serve, watch and improve ONNX models on edge devices, over MQTT")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon.
    Run {
        #[arg(long, default_value = "/etc/lathe/lathe.toml")]
        config: PathBuf,
    },
    /// Validate a config file and the bundles it names, without starting.
    Check {
        #[arg(long, default_value = "/etc/lathe/lathe.toml")]
        config: PathBuf,
        #[arg(long)]
        json: bool,
        /// Also connect to the broker with the config's address, credentials and TLS (not in
        /// the unit's ExecStartPre: a broker that is down must not stop lathe from starting).
        #[arg(long)]
        connect: bool,
        /// Also listen SECONDS to each pipeline's source topic (under a client id of its own)
        /// and read what arrives as the daemon would: messages, devices, rows, rejections
        /// with the first reason, and the keys the messages hold. Fails if messages came and
        /// none made a row.
        #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..=600))]
        listen: Option<u64>,
    },

    /// The whole thing on one machine: embedded broker, the sample Shuttle model, real sensor
    /// rows replayed from several devices, a live summary.
    #[cfg(feature = "embedded-broker")]
    Demo(demo::DemoArgs),
    /// Make, show and check model bundles.
    #[command(subcommand)]
    Bundle(bundle::BundleCommand),
    /// The on-device registry: list, import, promote, roll back.
    #[command(subcommand)]
    Models(models::ModelsCommand),
    /// Fine-tune a bundle on fresh data, offline; writes a new bundle only if the gate accepts it.
    Train(Box<train::TrainArgs>),
    /// Federated averaging: combine bundles several devices fine-tuned from the same parent,
    /// given as files or collected from what devices share (`[pipeline.train] share = true`).
    Aggregate(Box<aggregate::AggregateArgs>),
    /// Make an ed25519 key pair for signing updates: OUT.key (secret) and OUT.pub (or
    /// lathe.key and lathe.pub in OUT, a directory).
    Keygen {
        #[arg(short = 'o', long)]
        out: PathBuf,
    },
    /// The central server's side of an update: sign a bundle, publish its chunks and a signed
    /// offer to nodes or a group (optionally canaries first).
    Push(Box<fleet::PushArgs>),
    /// Collect the hard examples nodes publish (`[pipeline.capture]`) into a CSV per pipeline,
    /// with an empty label column for a labelling tool.
    Capture(Box<capture::CaptureArgs>),
    /// The root of trust: which keys sign updates, rotated and revoked by k of n root keys.
    #[command(subcommand)]
    Root(root::RootCommand),
    /// Every node's retained status: model, version, origin, drift, backend.
    Fleet {
        #[command(flatten)]
        broker: fleet::BrokerArgs,
        /// Print every status as JSON, by node.
        #[arg(long)]
        json: bool,
    },
    /// (Internal) the daemon's model probe: a bundle on stdin, loaded and run on its
    /// validation set under the limits the daemon set (`infer::probe`).
    #[command(name = "__probe-model", hide = true)]
    ProbeModel {
        #[arg(long)]
        ort_library: Option<PathBuf>,
        #[arg(long = "provider")]
        providers: Vec<String>,
        #[arg(long)]
        strict: bool,
    },
    /// What the sample store holds for a pipeline, as JSON; `export` writes its rows as CSV
    /// (offline: the daemon holds the file's lock).
    Store(store::StoreArgs),
    /// What the loop did, as one self-contained HTML file: drift per feature against its
    /// reference, training runs and their gate, the timeline of alarms, runs and promotions.
    Report(ReportArgs),
}

#[derive(clap::Args)]
pub struct ReportArgs {
    /// The daemon's state folder (its `state_dir`); or give --config.
    #[arg(long, required_unless_present = "config")]
    state_dir: Option<PathBuf>,
    /// The daemon's config: its state folder, pipelines, models and drift settings.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Only this pipeline.
    #[arg(long)]
    pipeline: Option<String>,
    #[arg(short = 'o', long, default_value = "report.html")]
    output: PathBuf,
}

fn report(a: ReportArgs) -> Result<(), String> {
    let config = a.config.as_deref().map(crate::service::load_config).transpose().map_err(|e| e.to_string())?;
    let state_dir = match (&a.state_dir, &config) {
        (Some(dir), _) => dir.clone(),
        (None, Some(c)) => c.state_dir.clone(),
        (None, None) => return Err("give --state-dir or --config".into()),
    };
    let html = crate::report::render(&state_dir, config.as_ref(), a.pipeline.as_deref())?;
    crate::fs::write_atomic(&a.output, html.as_bytes()).map_err(|e| format!("{}: {e}", a.output.display()))?;
    println!("wrote {} ({} KB)", a.output.display(), html.len() / 1024);
    Ok(())
}

/// Logs to journald with structured fields (PIPELINE, DEVICE, MODEL_VERSION, EVENT, …: every
/// field of a log line, uppercased) when systemd connected our output to the journal
/// (`JOURNAL_STREAM`) and its socket answers; readable lines on stderr otherwise.
fn init_logging(default: &str) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = || {
        tracing_subscriber::EnvFilter::try_from_env("LATHE_LOG")
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default))
    };
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        if let Ok(journal) = tracing_journald::layer() {
            let journal = journal.with_field_prefix(None).with_syslog_identifier("lathe".into());
            if tracing_subscriber::registry().with(filter()).with(journal).try_init().is_ok() {
                return;
            }
        }
    }
    // Colours only on a terminal: a log file or a pipe gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt().with_env_filter(filter()).with_writer(std::io::stderr).with_ansi(ansi).try_init();
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("lathe-worker")
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))
}

/// Parses the arguments and runs the command.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::ProbeModel { ort_library, providers, strict } => {
            return crate::infer::probe::child_main(ort_library, providers, strict)
        }
        Command::Run { config } => {
            init_logging("info,rumqttd=warn");
            crate::infer::probe::enable();
            run(&config)
        }
        Command::Check { config, json, connect, listen } => check(&config, json, connect, listen),
        #[cfg(feature = "embedded-broker")]
        Command::Demo(args) => {
            // Rejections are on the screen; log only errors so they do not scribble over it.
            init_logging("error,rumqttd=off");
            demo::run(args)
        }
        Command::Bundle(cmd) => bundle::run(cmd),
        Command::Models(cmd) => models::run(cmd),
        Command::Train(args) => {
            // On stderr, beside the summary: which backend runs and, when `auto` fell back to
            // the CPU, why.
            init_logging("info");
            train::run(*args)
        }
        Command::Store(args) => store::run(args),
        Command::Keygen { out } => fleet::keygen(&out),
        Command::Push(args) => {
            init_logging("warn");
            fleet::push(*args)
        }
        Command::Capture(args) => {
            init_logging("warn");
            capture::run(*args)
        }
        Command::Root(cmd) => {
            init_logging("warn");
            root::run(cmd)
        }
        Command::Fleet { broker, json } => fleet::fleet(&broker, json),
        Command::Aggregate(args) => aggregate::run(*args),
        Command::Report(args) => {
            init_logging("warn");
            report(args)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("lathe: {message}");
            ExitCode::FAILURE
        }
    }
}

/// The daemon. SIGHUP with a valid, changed config drains and stops the pipelines and starts
/// them again with it, in the same process (the broker keeps our session, so nothing sent in
/// between is lost); pipelines whose settings did not change keep their model and state. A
/// bad config is refused and the running pipelines go on; one that is valid but cannot start
/// (its metrics port taken, say) is rolled back: the previous config starts again.
fn run(path: &std::path::Path) -> Result<(), String> {
    let mut config = crate::service::load_config(path).map_err(|e| e.to_string())?;
    let rt = runtime()?;
    let state_dir = config.state_dir.clone();
    let crashed = crate::service::crash_guard::at_start(&state_dir);
    let (mut kept, mut prepared) = (crate::service::Kept::default(), crate::service::Prepared::at_start(crashed));
    // The config that ran before a reload, until the reloaded one has started.
    let mut previous: Option<Config> = None;
    // Every end but a crash or a kill is clean: the next start does not count against a
    // version on trial.
    let ended = |result: Result<(), String>| {
        crate::service::crash_guard::clean_stop(&state_dir);
        result
    };
    loop {
        let next = std::sync::Arc::new(std::sync::Mutex::new(None));
        let running = crate::service::Running {
            path: path.to_path_buf(),
            config: config.clone(),
            prints: crate::service::fingerprints(&config),
        };
        let slot = next.clone();
        let signal = async move {
            match crate::service::stop_or_reload(Some(running)).await {
                crate::service::Ending::Reload(new) => {
                    if let Ok(mut s) = slot.lock() {
                        *s = Some(*new);
                    }
                    true
                }
                crate::service::Ending::Stop => false,
            }
        };
        // A reload's run gets a copy of what the last run kept: if the new config cannot
        // start (a port in use, a file it cannot read), the last one starts again with it.
        kept = match rt.block_on(crate::service::run_keeping(config.clone(), kept.clone(), prepared, signal, |_| {})) {
            Ok(kept) => kept,
            Err(e) => match previous.take() {
                Some(before) => {
                    tracing::error!("The reloaded config could not start, going back to the previous one: {e}");
                    (config, prepared) = (before, crate::service::Prepared::rolled_back(e.to_string()));
                    continue;
                }
                None => return ended(Err(e.to_string())),
            },
        };
        match next.lock().ok().and_then(|mut s| s.take()) {
            Some((new, models)) => {
                tracing::info!("Reloaded {}", path.display());
                previous = Some(std::mem::replace(&mut config, new));
                prepared = models;
            }
            None => return ended(Ok(())),
        }
    }
}

fn check(path: &std::path::Path, json: bool, connect: bool, listen: Option<u64>) -> Result<(), String> {
    let result =
        crate::service::load_config(path).and_then(|c| crate::service::check_models(&c).map(|models| (c, models)));
    let connect = connect || listen.is_some();
    match (result, json) {
        (Ok((c, models)), false) => {
            println!("{}: ok ({} pipeline(s))", path.display(), c.pipelines.len());
            for (p, m) in c.pipelines.iter().zip(&models) {
                println!("  {}: {} v{} ({})", p.name, m.name, m.version, &m.sha256[..12]);
            }
            for warning in warnings(&c, &models) {
                println!("  warning: {warning}");
            }
            if let Some(connected) = connect.then(|| check_broker(&c)).transpose()? {
                println!("  broker: {connected}");
            }
            let Some(seconds) = listen else { return Ok(()) };
            let heard = listen::listen(&c, &models, seconds)?;
            for h in &heard {
                println!("  listen {}", h.line(seconds));
            }
            listened(&heard)
        }
        (Ok((c, models)), true) => {
            let warnings = warnings(&c, &models);
            let broker = connect.then(|| check_broker(&c));
            let mut report = serde_json::json!({"file": path, "ok": true, "errors": [], "warnings": warnings});
            match &broker {
                Some(Ok(connected)) => report["broker"] = serde_json::json!({"ok": true, "message": connected}),
                Some(Err(e)) => report["broker"] = serde_json::json!({"ok": false, "message": e}),
                None => {}
            }
            let heard = match (&broker, listen) {
                (Some(Ok(_)), Some(seconds)) => Some(listen::listen(&c, &models, seconds)),
                _ => None,
            };
            match &heard {
                Some(Ok(heard)) => report["listen"] = heard.iter().map(listen::Heard::json).collect(),
                Some(Err(e)) => report["listen"] = serde_json::json!({"error": e}),
                None => {}
            }
            println!("{report}");
            broker.transpose()?;
            heard.transpose()?.map_or(Ok(()), |heard| listened(&heard))
        }
        (Err(e), true) => {
            let errors: Vec<_> =
                e.errors.iter().map(|x| serde_json::json!({"key": x.key, "message": x.message})).collect();
            println!("{}", serde_json::json!({"file": path, "ok": false, "errors": errors}));
            Err(format!("{} error(s) in {}", e.errors.len(), path.display()))
        }
        (Err(e), false) => Err(e.to_string()),
    }
}

/// `check --listen` fails when a pipeline heard messages and made no row of any.
fn listened(heard: &[listen::Heard]) -> Result<(), String> {
    let failed: Vec<&str> = heard.iter().filter(|h| h.failed()).map(|h| h.pipeline.as_str()).collect();
    match failed.is_empty() {
        true => Ok(()),
        false => Err(format!("no message made a row for pipeline(s) {}", failed.join(", "))),
    }
}

/// `check --connect`: one connection to the broker, with the config's credentials.
fn check_broker(config: &Config) -> Result<String, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    rt.block_on(crate::mqtt::try_connect(&config.mqtt, &config.client_id(), std::time::Duration::from_secs(10)))
}

/// What loads but may not behave as hoped: drift references (the bundle's, or one re-based
/// later) too small for their window, and a training window in UTC on a device whose clock
/// is not (a night shift's 02:00 is not UTC's).
fn warnings(config: &Config, models: &[crate::infer::ActiveModel]) -> Vec<String> {
    let mut out = Vec::new();
    let offset = crate::config::utc_offset_s(crate::telemetry::unix_ms() / 1000);
    for (p, m) in config.pipelines.iter().zip(models) {
        if offset != 0 && p.train.as_ref().and_then(|t| t.hours).is_some_and(|h| !h.local) {
            let (sign, minutes) = (if offset < 0 { '-' } else { '+' }, offset.abs() / 60);
            out.push(format!(
                "train.hours in pipeline {} is UTC, and this device's time is UTC{sign}{}:{:02}: end it with \" local\" \
                 for the device's time",
                p.name,
                minutes / 60,
                minutes % 60
            ));
        }
        let Some(drift) = &p.drift else { continue };
        let model = format!("{} v{} (pipeline {})", m.name, m.version, p.name);
        out.extend(crate::infer::small_reference(&model, m.reference_rows, drift.window));
        let enough = crate::infer::SMALL_REFERENCE_WINDOWS * drift.window;
        if p.train.is_some() && (1..enough).contains(&drift.rebase_rows) {
            out.push(format!(
                "drift.rebase_rows = {} in pipeline {} is under {enough} (four windows of {}): a reference re-based on \
                 so few rows can raise false alarms",
                drift.rebase_rows, p.name, drift.window
            ));
        }
    }
    out
}
