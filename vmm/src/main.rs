//! `ferry`: runs one microVM.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use api::VmConfig;
use clap::Parser;
use vmm::{ExitReason, StdinInput};

mod terminal;

/// ferry: a minimal KVM virtual machine monitor.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// A Firecracker-format JSON configuration; the VM boots from it at once.
    #[arg(long, value_name = "FILE")]
    config_file: Option<PathBuf>,
    /// Run without the HTTP API (needs --config-file).
    #[arg(long)]
    no_api: bool,
    /// Serve the HTTP API on this Unix socket.
    #[arg(long, value_name = "PATH")]
    api_sock: Option<PathBuf>,
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

    match run(cli) {
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

fn run(cli: Cli) -> Result<ExitReason, Box<dyn std::error::Error>> {
    if cli.api_sock.is_some() || !cli.no_api {
        return Err(
            "the HTTP API is not available yet: run with --config-file FILE --no-api".into(),
        );
    }
    let Some(path) = cli.config_file else {
        return Err("--no-api needs --config-file FILE".into());
    };
    let text = std::fs::read_to_string(&path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let config =
        VmConfig::from_json(&text).map_err(|e| format!("config file {}: {e}", path.display()))?;

    let mut vmm = vmm::build(&config)?;
    let serial = vmm.devices().serial.clone();
    // Keystrokes go to the guest only from a terminal, as with Firecracker's console.
    let _raw = terminal::RawStdin::enable();
    let stdin = _raw.as_ref().map(|_| StdinInput::new(serial));
    vmm.start()?;
    let vmm = Arc::new(Mutex::new(vmm));
    let reason = vmm::run_until_exit(vmm.clone(), stdin)?;
    vmm.lock().expect("poisoned").stop();
    Ok(reason)
}
