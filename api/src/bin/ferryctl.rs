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
    /// Migrate this running VM to a ferry waiting with `receive`, showing progress.
    Migrate {
        /// tcp:ADDR:PORT or unix:PATH.
        #[arg(long, value_name = "DEST")]
        to: String,
        /// Hand guest memory's memfd over (a ferry on this host, unix: only).
        #[arg(long)]
        local: bool,
        /// Hash every page on both sides at switch-over.
        #[arg(long)]
        verify: bool,
        /// precopy (default), postcopy or hybrid.
        #[arg(long)]
        mode: Option<String>,
        /// Hybrid: pre-copy rounds before post-copy (default 1).
        #[arg(long)]
        precopy_rounds: Option<u32>,
        /// Pre-copy: switch to post-copy when rounds stop converging.
        #[arg(long)]
        postcopy_fallback: bool,
        /// uffd-async (default), uffd-sync or kvm-dirty-log.
        #[arg(long)]
        tracking: Option<String>,
        /// The longest stop the switch-over may cost, by estimate (default 50).
        #[arg(long, value_name = "MS")]
        downtime_ms: Option<u64>,
        /// Rounds before switching over anyway (default 30).
        #[arg(long)]
        max_rounds: Option<u32>,
        /// A cap on the sending rate.
        #[arg(long, value_name = "MIB_S")]
        max_bandwidth: Option<u64>,
        /// The destination's API socket, for its figures at the end.
        #[arg(long, value_name = "PATH")]
        dest_sock: Option<PathBuf>,
        /// Start it and return at once.
        #[arg(long)]
        no_wait: bool,
    },
    /// Wait for one incoming migration (a fresh ferry).
    Receive {
        /// tcp:ADDR:PORT or unix:PATH.
        #[arg(long, value_name = "ADDR")]
        listen: String,
        /// DRIVE=PATH: use this file for that drive (repeatable).
        #[arg(long = "drive", value_name = "DRIVE=PATH")]
        drive: Vec<String>,
        /// IFACE=TAP: use this tap for that interface (repeatable).
        #[arg(long = "net", value_name = "IFACE=TAP")]
        net: Vec<String>,
    },
    /// The current or last migration's progress.
    Migration,
    /// Stop the running migration.
    Cancel,
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
    /// Write the state file and the memory file (the VM must be paused, unless --live).
    Create {
        /// The state file.
        #[arg(long)]
        state: PathBuf,
        /// The memory file.
        #[arg(long)]
        mem: PathBuf,
        /// Only the pages written since the previous snapshot (needs track_dirty_pages).
        #[arg(long, conflicts_with = "live")]
        diff: bool,
        /// Of the running VM: a pause of a few milliseconds, memory saved while the guest
        /// runs on; answers when both files are complete.
        #[arg(long)]
        live: bool,
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

/// `KEY=VALUE` pairs as objects with the two given field names.
fn pairs(list: &[String], key: &str, value: &str) -> Vec<serde_json::Value> {
    list.iter()
        .map(|o| {
            let (k, v) = o.split_once('=').unwrap_or((o, ""));
            json!({ key: k, value: v })
        })
        .collect()
}

fn snapshot(verb: SnapshotVerb) -> serde_json::Value {
    match verb {
        SnapshotVerb::Create {
            state,
            mem,
            diff,
            live,
        } => json!({
            "snapshot_type": match (diff, live) {
                (true, _) => "Diff",
                (_, true) => "Live",
                _ => "Full",
            },
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
            let overrides = pairs(&net, "iface_id", "host_dev_name");
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
        Verb::Migrate {
            to,
            local,
            verify,
            mode,
            precopy_rounds,
            postcopy_fallback,
            tracking,
            downtime_ms,
            max_rounds,
            max_bandwidth,
            ..
        } => {
            let mut body = json!({ "destination": to, "local": local, "verify": verify });
            if let Some(m) = mode {
                body["mode"] = json!(m);
            }
            if let Some(n) = precopy_rounds {
                body["precopy_rounds"] = json!(n);
            }
            if postcopy_fallback {
                body["postcopy_fallback"] = json!(true);
            }
            if let Some(t) = tracking {
                body["tracking"] = json!(t);
            }
            if let Some(d) = downtime_ms {
                body["downtime_limit_ms"] = json!(d);
            }
            if let Some(r) = max_rounds {
                body["max_rounds"] = json!(r);
            }
            if let Some(b) = max_bandwidth {
                body["max_bandwidth_mib_s"] = json!(b);
            }
            put("/migration/send", body)
        }
        Verb::Receive { listen, drive, net } => {
            let mut body = json!({ "listen": listen });
            if !drive.is_empty() {
                body["drive_overrides"] = json!(pairs(&drive, "drive_id", "path_on_host"));
            }
            if !net.is_empty() {
                body["network_overrides"] = json!(pairs(&net, "iface_id", "host_dev_name"));
            }
            put("/migration/receive", body)
        }
        Verb::Migration => ("GET".into(), "/migration".into(), None),
        Verb::Cancel => put("/migration/cancel", json!({})),
        Verb::Request { method, path, body } => (method, path, body),
    }
}

/// One `GET /migration`, or `None` once the socket is gone (a source that migrated
/// exits).
fn migration_status(sock: &std::path::Path) -> Option<serde_json::Value> {
    let r = Client::connect(sock)
        .and_then(|mut c| c.request("GET", "/migration", None))
        .ok()?;
    (r.status == 200).then(|| r.json())
}

/// Follows a migration from the source's socket with a progress bar, and ends with one
/// summary line. Exit status 0 when the guest runs on the destination.
fn follow_migration(sock: &std::path::Path, dest: Option<&std::path::Path>) -> ExitCode {
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {elapsed_precise} round {prefix} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
    );
    let mut last = json!({});
    while let Some(status) = migration_status(sock) {
        let mib = |v: &serde_json::Value| v.as_u64().unwrap_or(0) as f64 / (1 << 20) as f64;
        bar.set_prefix(status["round"].to_string());
        if status["postcopy"] == true {
            bar.set_message(format!(
                "post-copy: {:.1} MiB sent, {} pages left, {} faults, {} pages requested, {} pushed",
                mib(&status["transferred_bytes"]),
                status["remaining_pages"],
                status["postcopy_faults"],
                status["pages_requested"],
                status["pages_pushed"],
            ));
        } else {
            bar.set_message(format!(
                "{:.1} MiB sent, {:.0} MiB/s, {} dirty pages left, about {:.1} ms of downtime",
                mib(&status["transferred_bytes"]),
                status["throughput_mib_s"].as_f64().unwrap_or(0.0),
                status["remaining_dirty_pages"],
                status["expected_downtime_ms"].as_f64().unwrap_or(0.0),
            ));
        }
        bar.tick();
        let active = status["state"] == "active";
        last = status;
        if !active {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    bar.finish_and_clear();
    let state = last["state"].as_str().unwrap_or("");
    if matches!(state, "failed" | "cancelled") {
        let error = last["error"].as_str().unwrap_or("");
        if last["postcopy"] == true {
            eprintln!("ferryctl: migration {state}: {error}");
        } else {
            eprintln!("ferryctl: migration {state}: {error}; the guest runs on here");
        }
        return ExitCode::from(1);
    }
    // The source exits once the destination runs the guest.
    let end = dest.and_then(migration_status).unwrap_or(last);
    let faults = match &end["fault_latency_us"] {
        serde_json::Value::Object(l) => format!(
            ", {} post-copy faults (p50 {} µs, p99 {} µs, max {} µs)",
            end["postcopy_faults"], l["p50"], l["p99"], l["max"]
        ),
        _ => String::new(),
    };
    println!(
        "migrated: {:.1} MiB in {:.1} ms, downtime {}, {} rounds{faults}",
        end["transferred_bytes"].as_u64().unwrap_or(0) as f64 / (1 << 20) as f64,
        end["total_ms"].as_f64().unwrap_or(0.0),
        end["downtime_ms"]
            .as_f64()
            .map_or("unknown (give --dest-sock)".to_string(), |d| format!(
                "{d:.2} ms"
            )),
        end["round"],
    );
    ExitCode::SUCCESS
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let follow = match &cli.verb {
        Verb::Migrate {
            no_wait: false,
            dest_sock,
            ..
        } => Some(dest_sock.clone()),
        _ => None,
    };
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
                if let Some(dest) = follow {
                    return follow_migration(&cli.sock, dest.as_deref());
                }
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
