//! `ferry-bench-migrate`: what a live migration costs, against its floors.
//!
//! Each scenario boots the test guest in a `ferry --api-sock` process, starts a fresh
//! destination ferry, and migrates over loopback TCP (or, for `local`, hands the memfd
//! over a Unix socket), driving both through the API as a user would. It reports:
//! - **total**: from the `PUT /migration/send` request to the destination reporting
//!   `completed` (polled every 200 µs);
//! - **downtime**: from the source's pause to the destination's resume, as the
//!   destination reports it;
//! - rounds and bytes of guest memory sent;
//! - the source's sending rate, and for writing guests the guest's own progress during
//!   the migration against before it (passes per second; pass numbers carry on across
//!   the migration).
//!
//! Floors, measured in the same run: memcpy bandwidth, and loopback TCP between two
//! plain sockets in this process (1 MiB writes).

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use api::client::Client;
use clap::Parser;
use serde_json::{json, Value};

#[derive(Parser)]
#[command(about = "Live migration time, downtime and rate against memcpy and loopback TCP")]
struct Args {
    /// Guest sizes in MiB for the idle and local scenarios.
    #[arg(long, value_delimiter = ',', default_value = "256,1024,4096")]
    sizes: Vec<u64>,
    /// Scenarios: idle, local, slow, fast.
    #[arg(long, value_delimiter = ',', default_value = "idle,local,slow,fast")]
    scenarios: Vec<String>,
    /// Runs of each, the median reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Tracking mode for pre-copy.
    #[arg(long, default_value = "uffd-async")]
    tracking: String,
    /// The ferry binary (default: next to this program).
    #[arg(long)]
    ferry: Option<PathBuf>,
    /// The test guest (default: $FERRY_GUEST).
    #[arg(long)]
    guest: Option<PathBuf>,
}

struct Ferry {
    child: Child,
    sock: PathBuf,
}

impl Ferry {
    fn spawn(bin: &Path, dir: &Path, name: &str, config: Option<&Value>) -> Result<Ferry, String> {
        let sock = dir.join(format!("{name}.sock"));
        let mut cmd = Command::new(bin);
        cmd.arg("--api-sock").arg(&sock);
        if let Some(cfg) = config {
            let path = dir.join(format!("{name}.json"));
            std::fs::write(&path, cfg.to_string()).map_err(|e| e.to_string())?;
            cmd.arg("--config-file").arg(path);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", bin.display()))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while Client::connect(&sock).is_err() {
            if Instant::now() > deadline {
                return Err("ferry's API socket never appeared".into());
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(Ferry { child, sock })
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, String> {
        let body = body.map(|b| b.to_string());
        let r = Client::connect(&self.sock)
            .and_then(|mut c| c.request(method, path, body.as_deref()))
            .map_err(|e| format!("{method} {path}: {e}"))?;
        if !(200..300).contains(&r.status) {
            return Err(format!("{method} {path}: HTTP {}: {}", r.status, r.text()));
        }
        Ok(if r.body.is_empty() {
            json!({})
        } else {
            r.json()
        })
    }
}

impl Drop for Ferry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The highest `pass N ok` (or `dirty pass N`) number in a console file.
fn last_pass(console: &Path) -> u64 {
    let text = std::fs::read_to_string(console).unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let rest = l
                .strip_prefix("pass ")
                .or_else(|| l.strip_prefix("dirty pass "))?;
            rest.split(' ').next()?.parse().ok()
        })
        .max()
        .unwrap_or(0)
}

fn wait_for(console: &Path, needle: &str) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if std::fs::read_to_string(console).is_ok_and(|t| t.contains(needle)) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Err(format!("the guest never printed {needle:?}"))
}

struct Figures {
    total_ms: f64,
    downtime_ms: f64,
    rounds: u64,
    mib: f64,
    rate_mib_s: f64,
    guest_ratio: Option<f64>,
}

/// One migration of a guest running `args` in `mem` MiB.
fn migrate(
    bin: &Path,
    guest: &Path,
    mem: u64,
    workload: &str,
    ready: &str,
    local: bool,
    tracking: &str,
) -> Result<Figures, String> {
    let dir = std::env::temp_dir().join(format!("ferry-bench-migrate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let console = dir.join("console.txt");
    let _ = std::fs::remove_file(&console);
    let cfg = json!({
        "boot-source": { "kernel_image_path": guest, "boot_args": format!("console=ttyS0 {workload}") },
        "machine-config": { "vcpu_count": 1, "mem_size_mib": mem },
        "serial": { "serial_out_path": console },
    });
    let src = Ferry::spawn(bin, &dir, "src", Some(&cfg))?;
    let dst = Ferry::spawn(bin, &dir, "dst", None)?;
    wait_for(&console, ready)?;
    // A VM that has run a moment, and a destination that has waited a moment, as a
    // user's are: ferry's one-time work after start (the MSR probe) is done.
    std::thread::sleep(Duration::from_millis(300));
    // The guest's own pace before the migration, over a second.
    // `verify` prints every pass; `dirty` at most once a second, too seldom to count.
    let writing = workload.contains("verify");
    let before = if writing {
        let p0 = last_pass(&console);
        std::thread::sleep(Duration::from_secs(1));
        Some((last_pass(&console) - p0) as f64)
    } else {
        None
    };
    let listen = if local {
        format!("unix:{}", dir.join("mig.sock").display())
    } else {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| e.to_string())?
            .port();
        format!("tcp:127.0.0.1:{port}")
    };
    dst.call(
        "PUT",
        "/migration/receive",
        Some(json!({ "listen": listen })),
    )?;
    let p0 = last_pass(&console);
    let start = Instant::now();
    src.call(
        "PUT",
        "/migration/send",
        Some(json!({ "destination": listen, "local": local, "tracking": tracking })),
    )?;
    let mut rate: f64 = 0.0;
    let status = loop {
        if let Ok(s) = src.call("GET", "/migration", None) {
            rate = rate.max(s["throughput_mib_s"].as_f64().unwrap_or(0.0));
        }
        let s = dst.call("GET", "/migration", None)?;
        match s["state"].as_str() {
            Some("active") => {}
            Some("completed") => break s,
            _ => return Err(format!("the migration did not complete: {s}")),
        }
        if start.elapsed() > Duration::from_secs(120) {
            return Err("the migration took over 120 s".into());
        }
        std::thread::sleep(Duration::from_micros(200));
    };
    let total = start.elapsed();
    let guest_ratio = before.map(|b| {
        let during = (last_pass(&console) - p0) as f64 / total.as_secs_f64();
        during / b
    });
    drop(src);
    drop(dst);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(Figures {
        total_ms: total.as_secs_f64() * 1e3,
        downtime_ms: status["downtime_ms"].as_f64().unwrap_or(f64::NAN),
        rounds: status["round"].as_u64().unwrap_or(0),
        mib: status["transferred_bytes"].as_u64().unwrap_or(0) as f64 / (1 << 20) as f64,
        rate_mib_s: rate,
        guest_ratio,
    })
}

/// memcpy of 256 MiB between two buffers already faulted in, best of 3, in MiB/s.
fn memcpy_floor() -> f64 {
    let len = 256 << 20;
    let src = vec![0x5au8; len];
    let mut dst = vec![0u8; len];
    dst.copy_from_slice(&src);
    (0..3)
        .map(|_| {
            let t = Instant::now();
            dst.copy_from_slice(std::hint::black_box(&src));
            std::hint::black_box(&dst);
            256.0 / t.elapsed().as_secs_f64()
        })
        .fold(0.0, f64::max)
}

/// 1 GiB over loopback TCP between two threads, 1 MiB writes, best of 3, in MiB/s.
fn tcp_floor() -> Result<f64, String> {
    let mut best: f64 = 0.0;
    for _ in 0..3 {
        let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let reader = std::thread::spawn(move || -> std::io::Result<u64> {
            let (mut s, _) = listener.accept()?;
            let mut buf = vec![0u8; 1 << 20];
            let mut total = 0u64;
            loop {
                let n = s.read(&mut buf)?;
                if n == 0 {
                    return Ok(total);
                }
                total += n as u64;
            }
        });
        let mut s = TcpStream::connect(addr).map_err(|e| e.to_string())?;
        s.set_nodelay(true).map_err(|e| e.to_string())?;
        let buf = vec![0xa5u8; 1 << 20];
        let t = Instant::now();
        for _ in 0..1024 {
            s.write_all(&buf).map_err(|e| e.to_string())?;
        }
        drop(s);
        let got = reader
            .join()
            .map_err(|_| "reader panicked".to_string())?
            .map_err(|e| e.to_string())?;
        best = best.max(got as f64 / (1 << 20) as f64 / t.elapsed().as_secs_f64());
    }
    Ok(best)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let (bin, guest) = match (
        common::ferry_binary(&args.ferry),
        common::guest_image(&args.guest),
    ) {
        (Ok(b), Ok(g)) => (b, g),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("ferry-bench-migrate: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let memcpy = memcpy_floor();
    let tcp = match tcp_floor() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("ferry-bench-migrate: loopback floor: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    println!("floors: memcpy {memcpy:.0} MiB/s, loopback TCP {tcp:.0} MiB/s");
    println!(
        "{:<8} {:>6} {:>10} {:>10} {:>7} {:>9} {:>9} {:>7} {:>7}",
        "scenario", "MiB", "total ms", "down ms", "rounds", "sent MiB", "MiB/s", "vs TCP", "guest"
    );
    let mut plan: Vec<(String, u64, String, &str, bool)> = Vec::new();
    for s in &args.scenarios {
        match s.as_str() {
            "idle" | "local" => {
                for &size in &args.sizes {
                    plan.push((
                        s.clone(),
                        size,
                        "workload=idle".into(),
                        "ferry-guest: idle",
                        s == "local",
                    ));
                }
            }
            // 40 MiB touched, 8 MiB of it rewritten every 100 ms.
            "slow" => plan.push((
                s.clone(),
                1024,
                "workload=dirty start=16M size=40M rate=20480".into(),
                "dirty pass 1",
                false,
            )),
            // 96 MiB rewritten and verified as fast as the guest can.
            "fast" => plan.push((
                s.clone(),
                1024,
                "workload=verify start=16M size=96M".into(),
                "pass 3 ok",
                false,
            )),
            other => {
                eprintln!("ferry-bench-migrate: unknown scenario {other}");
                return std::process::ExitCode::FAILURE;
            }
        }
    }
    for (name, size, workload, ready, local) in plan {
        let mut runs = Vec::new();
        for _ in 0..args.runs.max(1) {
            match migrate(&bin, &guest, size, &workload, ready, local, &args.tracking) {
                Ok(f) => runs.push(f),
                Err(e) => {
                    eprintln!("ferry-bench-migrate: {name} {size} MiB: {e}");
                    return std::process::ExitCode::FAILURE;
                }
            }
        }
        let m = |f: fn(&Figures) -> f64| median(runs.iter().map(f).collect());
        let rate = m(|f| f.rate_mib_s);
        let guest_ratio = runs[0]
            .guest_ratio
            .map(|_| m(|f| f.guest_ratio.unwrap_or(f64::NAN)));
        // Under 1 MiB sent, the rate is the sender's starting guess, not a measure.
        let no_rate = local || m(|f| f.mib) < 1.0;
        let shown_rate = if no_rate {
            "-".to_string()
        } else {
            format!("{rate:.0}")
        };
        println!(
            "{:<8} {:>6} {:>10.1} {:>10.2} {:>7} {:>9.1} {:>9} {:>7} {:>7}",
            name,
            size,
            m(|f| f.total_ms),
            m(|f| f.downtime_ms),
            m(|f| f.rounds as f64),
            m(|f| f.mib),
            shown_rate,
            if no_rate {
                "-".to_string()
            } else {
                format!("{:.2}", rate / tcp)
            },
            guest_ratio.map_or("-".to_string(), |g| format!("{g:.2}")),
        );
    }
    std::process::ExitCode::SUCCESS
}
