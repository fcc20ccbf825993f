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
    /// Snapshots: create one of a paused VM, or load one into a fresh ferry.
    Snapshot {
        #[command(subcommand)]
        verb: SnapshotVerb,
    },
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

#[derive(Subcommand)]
enum SnapshotVerb {
    /// Write the state file and the memory file (the VM must be paused).
    Create {
        /// The state file.
        #[arg(long)]
        state: PathBuf,
        /// The memory file.
        #[arg(long)]
        mem: PathBuf,
        /// Only the pages written since the previous snapshot (needs track_dirty_pages).
        #[arg(long)]
        diff: bool,
    },
    /// Load a snapshot into this (fresh) ferry.
    Load {
        /// The state file.
        #[arg(long)]
        state: PathBuf,
        /// The memory file (the File backend).
        #[arg(long, conflicts_with = "uffd")]
        mem: Option<PathBuf>,
        /// A page-fault handler's socket (the Uffd backend).
        #[arg(long, value_name = "SOCKET")]
        uffd: Option<PathBuf>,
        /// Run the guest at once.
        #[arg(long)]
        resume: bool,
        /// Track dirty pages, for Diff snapshots of the loaded VM.
        #[arg(long)]
        track_dirty_pages: bool,
        /// IFACE=TAP: use this tap for that interface (repeatable).
        #[arg(long = "net", value_name = "IFACE=TAP")]
        net: Vec<String>,
    },
}

fn snapshot(verb: SnapshotVerb) -> serde_json::Value {
    match verb {
        SnapshotVerb::Create { state, mem, diff } => json!({
            "snapshot_type": if diff { "Diff" } else { "Full" },
            "snapshot_path": state,
            "mem_file_path": mem,
        }),
        SnapshotVerb::Load {
            state,
            mem,
            uffd,
            resume,
            track_dirty_pages,
            net,
        } => {
            let backend = match (mem, uffd) {
                (_, Some(sock)) => json!({ "backend_type": "Uffd", "backend_path": sock }),
                (Some(mem), None) => json!({ "backend_type": "File", "backend_path": mem }),
                // The server names what is missing.
                (None, None) => serde_json::Value::Null,
            };
            let overrides: Vec<serde_json::Value> = net
                .iter()
                .map(|o| {
                    let (iface, tap) = o.split_once('=').unwrap_or((o, ""));
                    json!({ "iface_id": iface, "host_dev_name": tap })
                })
                .collect();
            let mut body = json!({
                "snapshot_path": state,
                "resume_vm": resume,
                "track_dirty_pages": track_dirty_pages,
            });
            if !backend.is_null() {
                body["mem_backend"] = backend;
            }
            if !overrides.is_empty() {
                body["network_overrides"] = json!(overrides);
            }
            body
        }
    }
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
        Verb::Snapshot { verb } => {
            let path = match verb {
                SnapshotVerb::Create { .. } => "/snapshot/create",
                SnapshotVerb::Load { .. } => "/snapshot/load",
            };
            put(path, snapshot(verb))
        }
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
