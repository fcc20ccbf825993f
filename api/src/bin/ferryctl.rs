//! `ferryctl`: drives a ferry (or Firecracker) API socket from the command line and
//! prints the JSON answers.

use std::path::PathBuf;
use std::process::ExitCode;

use api::client::Client;
use clap::{Parser, Subcommand};
use serde_json::json;

/// Drive a ferry microVM through its API socket.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// The API socket (ferry --api-sock PATH).
    #[arg(long, value_name = "PATH")]
    sock: PathBuf,
    #[command(subcommand)]
    verb: Verb,
}

#[derive(Subcommand)]
enum Verb {
    /// Instance information: id, state, version.
    Info,
    /// The VMM's version.
    Version,
    /// The whole VM configuration.
    Config,
    /// The metrics.
    Metrics,
    /// Set vCPUs and memory (before start).
    MachineConfig {
        /// Number of vCPUs.
        #[arg(long)]
        vcpus: u64,
        /// Guest memory in MiB.
        #[arg(long)]
        mem_mib: u64,
        /// Two threads per core.
        #[arg(long)]
        smt: bool,
    },
    /// Set the kernel, initrd and command line (before start).
    BootSource {
        /// vmlinux ELF or bzImage.
        #[arg(long)]
        kernel: PathBuf,
        /// Optional initrd.
        #[arg(long)]
        initrd: Option<PathBuf>,
        /// Kernel command line.
        #[arg(long)]
        args: Option<String>,
    },
    /// Send the guest console to a file (before start).
    Serial {
        /// The file.
        #[arg(long)]
        out: PathBuf,
    },
    /// Boot the configured VM.
    Start,
    /// Pause the VM.
    Pause,
    /// Resume the VM.
    Resume,
    /// Press Ctrl-Alt-Del on the guest's keyboard.
    CtrlAltDel,
    /// Write the metrics to the file set with PUT /metrics.
    FlushMetrics,
    /// Any request: METHOD PATH [JSON BODY].
    Request {
        /// GET, PUT or PATCH.
        method: String,
        /// The path, e.g. /machine-config.
        path: String,
        /// JSON body.
        body: Option<String>,
    },
}

fn request(verb: Verb) -> (String, String, Option<String>) {
    let put = |path: &str, body: serde_json::Value| {
        ("PUT".to_owned(), path.to_owned(), Some(body.to_string()))
    };
    match verb {
        Verb::Info => ("GET".into(), "/".into(), None),
        Verb::Version => ("GET".into(), "/version".into(), None),
        Verb::Config => ("GET".into(), "/vm/config".into(), None),
        Verb::Metrics => ("GET".into(), "/metrics".into(), None),
        Verb::MachineConfig {
            vcpus,
            mem_mib,
            smt,
        } => put(
            "/machine-config",
            json!({ "vcpu_count": vcpus, "mem_size_mib": mem_mib, "smt": smt }),
        ),
        Verb::BootSource {
            kernel,
            initrd,
            args,
        } => {
            let mut body = json!({ "kernel_image_path": kernel });
            if let Some(i) = initrd {
                body["initrd_path"] = json!(i);
            }
            if let Some(a) = args {
                body["boot_args"] = json!(a);
            }
            put("/boot-source", body)
        }
        Verb::Serial { out } => put("/serial", json!({ "serial_out_path": out })),
        Verb::Start => put("/actions", json!({ "action_type": "InstanceStart" })),
        Verb::CtrlAltDel => put("/actions", json!({ "action_type": "SendCtrlAltDel" })),
        Verb::FlushMetrics => put("/actions", json!({ "action_type": "FlushMetrics" })),
        Verb::Pause => (
            "PATCH".into(),
            "/vm".into(),
            Some(json!({ "state": "Paused" }).to_string()),
        ),
        Verb::Resume => (
            "PATCH".into(),
            "/vm".into(),
            Some(json!({ "state": "Resumed" }).to_string()),
        ),
        Verb::Request { method, path, body } => (method, path, body),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (method, path, body) = request(cli.verb);
    let response =
        Client::connect(&cli.sock).and_then(|mut c| c.request(&method, &path, body.as_deref()));
    match response {
        Ok(r) => {
            let value = if r.body.is_empty() {
                json!({})
            } else {
                r.json()
            };
            let text = serde_json::to_string_pretty(&value).unwrap_or_else(|_| r.text());
            if (200..300).contains(&r.status) {
                println!("{text}");
                ExitCode::SUCCESS
            } else {
                eprintln!("ferryctl: {method} {path}: HTTP {}: {text}", r.status);
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("ferryctl: {}: {e}", cli.sock.display());
            ExitCode::from(1)
        }
    }
}
