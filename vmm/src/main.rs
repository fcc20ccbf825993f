//! `ferry`: runs one microVM, from a configuration file, over the HTTP API, or both.

use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use api::VmConfig;
use clap::Parser;
use vmm::{Controller, ExitReason};

mod terminal;

/// ferry: a minimal KVM virtual machine monitor. It takes Firecracker's command line.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// A Firecracker-format JSON configuration; the VM boots from it at once.
    #[arg(long, value_name = "FILE")]
    config_file: Option<PathBuf>,
    /// Run without the HTTP API (needs --config-file).
    #[arg(long, conflicts_with = "api_sock")]
    no_api: bool,
    /// Serve the HTTP API on this Unix socket (mode 0600).
    #[arg(long, value_name = "PATH", default_value = "/run/firecracker.socket")]
    api_sock: PathBuf,
    /// How long an API request waits for the VMM thread before it gets 503.
    #[arg(long, value_name = "MS", default_value_t = 5000)]
    api_timeout_ms: u64,
    /// The instance id, shown by `GET /` and in every log line: 1 to 64 letters,
    /// digits and '-'.
    #[arg(long, default_value = logger::DEFAULT_INSTANCE_ID)]
    id: String,
    /// Run every thread unconfined.
    #[arg(long, conflicts_with = "seccomp_filter")]
    no_seccomp: bool,
    /// Seccomp filters compiled by Firecracker's seccompiler-bin, in place of ferry's.
    #[arg(long, value_name = "FILE")]
    seccomp_filter: Option<PathBuf>,
    /// Log to this file or FIFO instead of stderr.
    #[arg(long, value_name = "PATH")]
    log_path: Option<PathBuf>,
    /// Log level: Error, Warning, Info, Debug, Trace or Off.
    #[arg(long, alias = "log-level", default_value = "Warning", value_parser = parse_level)]
    level: logger::Level,
    /// Only log from modules whose path starts with this.
    #[arg(long, value_name = "PREFIX")]
    module: Option<String>,
    /// Show each line's level.
    #[arg(long)]
    show_level: bool,
    /// Show the source file and line of each log line.
    #[arg(long)]
    show_log_origin: bool,
    /// Write metrics to this file or FIFO, one JSON line per flush.
    #[arg(long, value_name = "PATH")]
    metrics_path: Option<PathBuf>,
    /// Largest API request body, in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = api::server::MAX_BODY)]
    http_api_max_payload_size: usize,
    /// Firecracker's guest boot timer device: ferry has none (accepted, warned about).
    #[arg(long)]
    boot_timer: bool,
    /// Firecracker's MMDS data store limit: ferry has no MMDS (accepted, warned about).
    #[arg(long, value_name = "BYTES")]
    mmds_size_limit: Option<usize>,
    /// When the launcher started this process (µs, CLOCK_MONOTONIC), for
    /// `api_server.process_startup_time_us`.
    #[arg(long, value_name = "US")]
    start_time_us: Option<u64>,
    /// The launcher's process CPU time at that moment (µs), for
    /// `api_server.process_startup_time_cpu_us`.
    #[arg(long, value_name = "US")]
    start_time_cpu_us: Option<u64>,
    /// CPU time the launcher's parent spent (µs), added to the CPU startup time.
    #[arg(long, value_name = "US")]
    parent_cpu_time_us: Option<u64>,
    /// Firecracker's MMDS contents: refused, ferry has no MMDS.
    #[arg(long, value_name = "FILE")]
    metadata: Option<PathBuf>,
}

fn parse_level(s: &str) -> Result<logger::Level, String> {
    s.parse().map_err(|e: logger::BadLevel| e.to_string())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = logger::Config {
        log_path: cli.log_path.clone(),
        level: Some(cli.level),
        show_level: Some(cli.show_level),
        show_log_origin: Some(cli.show_log_origin),
        module: cli.module.clone(),
    };
    if let Err(e) = logger::init(&cli.id, &config) {
        eprintln!("ferry: error: {e}");
        return ExitCode::from(1);
    }
    if let Some(path) = &cli.metadata {
        eprintln!(
            "ferry: error: --metadata {}: ferry has no MMDS (metadata service) yet",
            path.display()
        );
        return ExitCode::from(1);
    }
    if cli.boot_timer {
        tracing::warn!("--boot-timer: ferry has no boot timer device yet; ignored");
    }
    if cli.mmds_size_limit.is_some() {
        tracing::warn!("--mmds-size-limit: ferry has no MMDS yet; ignored");
    }
    api::server::set_max_body(cli.http_api_max_payload_size);
    let policy = match (&cli.seccomp_filter, cli.no_seccomp) {
        (Some(file), _) => seccomp::Policy::File(file.clone()),
        (None, true) => seccomp::Policy::Off,
        (None, false) => seccomp::Policy::Builtin,
    };
    if let Err(e) = seccomp::configure(&policy) {
        eprintln!("ferry: error: {e}");
        return ExitCode::from(1);
    }

    // Bind before any thread exists: the socket's mode is set through the umask.
    let listener = match (!cli.no_api)
        .then(|| api::server::bind(&cli.api_sock))
        .transpose()
    {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("ferry: error: {}", error_chain(&e));
            return ExitCode::from(1);
        }
    };
    let socket = listener.as_ref().map(|_| cli.api_sock.clone());
    let result = run(cli, listener);
    if let Some(path) = socket {
        // This process created it; nobody can reach this VM through it any more.
        let _ = std::fs::remove_file(path);
    }
    match result {
        Ok(ExitReason::GuestFailed(msg)) => {
            eprintln!("ferry: guest failed: {msg}");
            ExitCode::from(1)
        }
        Ok(reason) => {
            tracing::info!("VM ended: {reason:?}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ferry: error: {}", error_chain(e.as_ref()));
            ExitCode::from(1)
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !msg.contains(&text) {
            msg.push_str(": ");
            msg.push_str(&text);
        }
        source = s.source();
    }
    msg
}

fn read_config(path: &PathBuf) -> Result<VmConfig, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    VmConfig::from_json(&text).map_err(|e| format!("config file {}: {e}", path.display()))
}

fn run(cli: Cli, listener: Option<UnixListener>) -> Result<ExitReason, Box<dyn std::error::Error>> {
    let config = cli.config_file.as_ref().map(read_config).transpose()?;
    if cli.no_api && config.is_none() {
        return Err("--no-api needs --config-file FILE".into());
    }
    // The file's "logger" and "metrics" sections, as Firecracker applies them: after
    // the command line's.
    if let Some(section) = config.as_ref().and_then(|c| c.logger.as_ref()) {
        let settings = section
            .settings()
            .map_err(|e| format!("the config file's \"logger\": {e}"))?;
        logger::configure(&settings).map_err(|e| format!("the config file's \"logger\": {e}"))?;
    }
    let file_metrics = config.as_ref().and_then(|c| c.metrics.clone());
    let api = match listener {
        Some(listener) => {
            let (channel, _thread) =
                api::server::start(listener, Duration::from_millis(cli.api_timeout_ms))?;
            Some(channel)
        }
        None => None,
    };
    let startup = vmm::Startup::measure(
        cli.start_time_us,
        cli.start_time_cpu_us,
        cli.parent_cpu_time_us,
    );
    // Keystrokes go to the guest only from a terminal, as with Firecracker's console.
    let raw = terminal::RawStdin::enable();
    let mut controller = match config {
        Some(config) => {
            let mut vmm = vmm::build(&config)?;
            vmm.start()?;
            Controller::with_vmm(&config, vmm, api, raw.is_some())?
        }
        None => match api {
            Some(api) => Controller::with_api(api, raw.is_some())?,
            None => return Err("nothing to run".into()),
        },
    };
    controller.set_startup(startup);
    if let Some(path) = &cli.metrics_path {
        controller
            .set_metrics_path(path)
            .map_err(|e| format!("--metrics-path: {}", e.message))?;
    }
    if let Some(metrics) = &file_metrics {
        controller
            .set_metrics_path(&metrics.metrics_path)
            .map_err(|e| format!("the config file's \"metrics\": {}", e.message))?;
    }
    Ok(vmm::run_until_exit(controller)?)
}
