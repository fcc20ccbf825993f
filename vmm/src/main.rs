//! `ferry`: runs one microVM, from a configuration file, over the HTTP API, or both.

use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use api::VmConfig;
use clap::Parser;
use vmm::{Controller, ExitReason};

mod terminal;

/// ferry: a minimal KVM virtual machine monitor.
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
    #[arg(long, value_name = "PATH")]
    api_sock: Option<PathBuf>,
    /// How long an API request waits for the VMM thread before it gets 503.
    #[arg(long, value_name = "MS", default_value_t = 5000)]
    api_timeout_ms: u64,
    /// Log level for ferry's own messages on stderr (error, warn, info, debug, trace).
    #[arg(long, default_value = "warn")]
    log_level: String,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log_level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter)
        .init();

    // Bind before any thread exists: the socket's mode is set through the umask.
    let listener = match cli.api_sock.as_deref().map(api::server::bind).transpose() {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("ferry: error: {}", error_chain(&e));
            return ExitCode::from(1);
        }
    };
    let socket = listener.as_ref().and(cli.api_sock.clone());
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
    if cli.api_sock.is_none() && !cli.no_api {
        return Err("give --api-sock PATH to serve the API, or --config-file FILE --no-api".into());
    }
    let config = cli.config_file.as_ref().map(read_config).transpose()?;
    if cli.no_api && config.is_none() {
        return Err("--no-api needs --config-file FILE".into());
    }
    let api = match listener {
        Some(listener) => {
            let (channel, _thread) =
                api::server::start(listener, Duration::from_millis(cli.api_timeout_ms))?;
            Some(channel)
        }
        None => None,
    };
    // Keystrokes go to the guest only from a terminal, as with Firecracker's console.
    let raw = terminal::RawStdin::enable();
    let controller = match config {
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
    Ok(vmm::run_until_exit(controller)?)
}
