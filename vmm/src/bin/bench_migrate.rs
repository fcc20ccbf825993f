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
    /// Scenarios: idle, local, slow, fast, postcopy, postcopy-fast.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "idle,local,slow,fast,postcopy,postcopy-fast"
    )]
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
    /// Keep each ferry's log at debug level in this directory (the switch-over's
    /// timings are there), as `<scenario>-<MiB>-<run>-src.log` and `-dst.log`. Each
    /// poll then writes a line on both sides too, which costs the figures a little.
    #[arg(long)]
    logs: Option<PathBuf>,
}

struct Ferry {
    child: Child,
    sock: PathBuf,
}

impl Ferry {
    fn spawn(
        bin: &Path,
        dir: &Path,
        name: &str,
        config: Option<&Value>,
        log: Option<PathBuf>,
    ) -> Result<Ferry, String> {
        let sock = dir.join(format!("{name}.sock"));
        let mut cmd = Command::new(bin);
        cmd.arg("--api-sock").arg(&sock);
        if let Some(log) = log {
            cmd.arg("--log-path").arg(log).args(["--level", "Debug"]);
        }
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

    /// A keep-alive connection for polling.
    fn client(&self) -> Result<Client, String> {
        Client::connect(&self.sock).map_err(|e| format!("connect: {e}"))
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, String> {
        let mut client =
            Client::connect(&self.sock).map_err(|e| format!("{method} {path}: {e}"))?;
        request(&mut client, method, path, body)
    }
}

/// One request on `client`: the response's JSON body (`{}` when empty), or an error
/// that names the request.
fn request(
    client: &mut Client,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> Result<Value, String> {
    let body = body.map(|b| b.to_string());
    let r = client
        .request(method, path, body.as_deref())
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

impl Drop for Ferry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Figures {
    total_ms: f64,
    downtime_ms: f64,
    rounds: u64,
    mib: f64,
    rate_mib_s: f64,
    guest_ratio: Option<f64>,
    /// From the source's pause to all memory on the destination (post-copy).
    all_here_ms: f64,
    /// From the source's pause to the end of the first pass that ran wholly on the
    /// destination (verify guests).
    first_pass_ms: f64,
    faults: f64,
    p50_us: f64,
    p99_us: f64,
    max_us: f64,
}

/// A scenario at one guest size.
struct Plan {
    name: String,
    /// Guest RAM in MiB.
    size: u64,
    /// The test guest's workload arguments.
    workload: String,
    /// The console line that says the guest is ready.
    ready: &'static str,
    /// Hand the memfd over a Unix socket.
    local: bool,
}

impl Plan {
    fn mode(&self) -> &'static str {
        if self.name.starts_with("postcopy") {
            "postcopy"
        } else {
            "precopy"
        }
    }
}

/// One migration of the guest `plan` describes.
fn migrate(
    bin: &Path,
    guest: &Path,
    plan: &Plan,
    tracking: &str,
    logs: Option<PathBuf>,
) -> Result<Figures, String> {
    let (mem, workload, ready, local, mode) = (
        plan.size,
        plan.workload.as_str(),
        plan.ready,
        plan.local,
        plan.mode(),
    );
    let dir = std::env::temp_dir().join(format!("ferry-bench-migrate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let console = common::ConsoleTap::create(&dir.join("console"))?;
    let cfg = json!({
        "boot-source": { "kernel_image_path": guest, "boot_args": format!("console=ttyS0 {workload}") },
        "machine-config": { "vcpu_count": 1, "mem_size_mib": mem },
        "serial": { "serial_out_path": console.path() },
    });
    let log = |side: &str| {
        logs.as_ref()
            .map(|l| PathBuf::from(format!("{}-{side}.log", l.display())))
    };
    let src = Ferry::spawn(bin, &dir, "src", Some(&cfg), log("src"))?;
    let dst = Ferry::spawn(bin, &dir, "dst", None, log("dst"))?;
    console.wait_for(ready, Duration::from_secs(60))?;
    // A VM that has run a moment, and a destination that has waited a moment, as a
    // user's are: ferry's one-time work after start (the MSR probe) is done.
    std::thread::sleep(Duration::from_millis(300));
    // The guest's own pace before the migration, over a second.
    // `verify` prints every pass; `dirty` at most once a second, too seldom to count.
    let writing = workload.contains("verify");
    let before = if writing {
        let p0 = console.last_pass();
        std::thread::sleep(Duration::from_secs(1));
        Some((console.last_pass() - p0) as f64)
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
    let p0 = console.last_pass();
    let start = Instant::now();
    src.call(
        "PUT",
        "/migration/send",
        Some(json!({ "destination": listen, "local": local, "tracking": tracking, "mode": mode })),
    )?;
    // When the source paused (from the destination's resume less the downtime).
    let mut paused: Option<Instant> = None;
    // Polled every millisecond on a kept connection: the destination here, and for
    // pre-copy's sending rate (post-copy reports none) the source on a thread of its
    // own, since a source that has handed its guest over exits, and a request it took
    // then waits for its exit (up to 15 ms here), which the total would count. (Every
    // 200 µs, or with a connection per request, the polling's own threads in both
    // processes took a good part of the core the migration threads share.)
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let source_rate = (mode == "precopy").then(|| {
        let (client, stop) = (src.client(), std::sync::Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut rate: f64 = 0.0;
            let Ok(mut client) = client else {
                return rate;
            };
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let Ok(s) = request(&mut client, "GET", "/migration", None) else {
                    break;
                };
                rate = rate.max(s["throughput_mib_s"].as_f64().unwrap_or(0.0));
                std::thread::sleep(Duration::from_millis(1));
            }
            rate
        })
    });
    let mut dst_poll = dst.client()?;
    let status = loop {
        let s = request(&mut dst_poll, "GET", "/migration", None)?;
        if let (None, Some(d)) = (paused, s["downtime_ms"].as_f64()) {
            paused = Some(Instant::now() - Duration::from_secs_f64(d / 1e3));
        }
        match s["state"].as_str() {
            Some("active") => {}
            Some("completed") => break s,
            _ => return Err(format!("the migration did not complete: {s}")),
        }
        if start.elapsed() > Duration::from_secs(120) {
            return Err("the migration took over 120 s".into());
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    let total = start.elapsed();
    let all_here = paused.map(|at| at.elapsed());
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let rate = source_rate.map_or(0.0, |t| t.join().unwrap_or(0.0));
    // The pass in progress at the pause ends on the destination, then the first pass
    // that ran there from its start.
    let first_pass = match (paused, writing) {
        (Some(at), true) => console
            .pass_at(console.last_pass_before(at) + 2, Duration::from_secs(20))
            .map(|end| end.saturating_duration_since(at)),
        _ => None,
    };
    let guest_ratio = before.map(|b| {
        let during = (console.last_pass() - p0) as f64 / total.as_secs_f64();
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
        all_here_ms: all_here.map_or(f64::NAN, |d| d.as_secs_f64() * 1e3),
        first_pass_ms: first_pass.map_or(f64::NAN, |d| d.as_secs_f64() * 1e3),
        faults: status["postcopy_faults"].as_f64().unwrap_or(0.0),
        p50_us: status["fault_latency_us"]["p50"]
            .as_f64()
            .unwrap_or(f64::NAN),
        p99_us: status["fault_latency_us"]["p99"]
            .as_f64()
            .unwrap_or(f64::NAN),
        max_us: status["fault_latency_us"]["max"]
            .as_f64()
            .unwrap_or(f64::NAN),
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
/// With `busy`, a third thread spins meanwhile, as a running guest's vCPU does: on two
/// cores the sender and the receiver then share one.
fn tcp_floor(busy: bool) -> Result<f64, String> {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let spinner = busy.then(|| {
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                std::hint::spin_loop();
            }
        })
    });
    let best = tcp_best_of_3();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    if let Some(s) = spinner {
        let _ = s.join();
    }
    best
}

fn tcp_best_of_3() -> Result<f64, String> {
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
    if let Some(dir) = &args.logs {
        if let Err(e) = std::fs::create_dir_all(dir) {
            eprintln!("ferry-bench-migrate: {}: {e}", dir.display());
            return std::process::ExitCode::FAILURE;
        }
    }
    let memcpy = memcpy_floor();
    let (tcp, tcp_busy) = match (tcp_floor(false), tcp_floor(true)) {
        (Ok(t), Ok(b)) => (t, b),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("ferry-bench-migrate: loopback floor: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    println!(
        "floors: memcpy {memcpy:.0} MiB/s, loopback TCP {tcp:.0} MiB/s ({tcp_busy:.0} MiB/s with a third thread spinning, as a running guest does)"
    );
    println!(
        "{:<8} {:>6} {:>10} {:>10} {:>7} {:>9} {:>9} {:>7} {:>8} {:>7}",
        "scenario",
        "MiB",
        "total ms",
        "down ms",
        "rounds",
        "sent MiB",
        "MiB/s",
        "vs TCP",
        "vs busy",
        "guest"
    );
    let mut plan: Vec<Plan> = Vec::new();
    let mut add = |name: &str, size, workload: String, ready, local| {
        plan.push(Plan {
            name: name.to_string(),
            size,
            workload,
            ready,
            local,
        })
    };
    let mut postcopy_floor = None;
    for s in &args.scenarios {
        match s.as_str() {
            "idle" | "local" => {
                for &size in &args.sizes {
                    add(
                        s,
                        size,
                        "workload=idle".into(),
                        "ferry-guest: idle",
                        s == "local",
                    );
                }
            }
            // 40 MiB touched, 8 MiB of it rewritten every 100 ms.
            "slow" => add(
                s,
                1024,
                "workload=dirty start=16M size=40M rate=20480".into(),
                "dirty pass 1",
                false,
            ),
            // 96 MiB rewritten and verified as fast as the guest can.
            "fast" => add(
                s,
                1024,
                "workload=verify start=16M size=96M".into(),
                "pass 3 ok",
                false,
            ),
            // Post-copy of a guest that verifies all but 48 MiB of its memory (at most
            // 976 MiB: a pass over 4 GiB takes the guest too long), every page its
            // pass number.
            "postcopy" => {
                for &size in &args.sizes {
                    add(
                        s,
                        size,
                        format!(
                            "workload=verify start=16M size={}M",
                            size.saturating_sub(48).min(976)
                        ),
                        "pass 1 ok",
                        false,
                    );
                }
            }
            // The fast writer in post-copy.
            "postcopy-fast" => add(
                s,
                1024,
                "workload=verify start=16M size=96M".into(),
                "pass 3 ok",
                false,
            ),
            other => {
                eprintln!("ferry-bench-migrate: unknown scenario {other}");
                return std::process::ExitCode::FAILURE;
            }
        }
    }
    let mut postcopy_rows = Vec::new();
    for p in plan {
        let (name, size, mode) = (p.name.clone(), p.size, p.mode());
        if mode == "postcopy" && postcopy_floor.is_none() {
            match floor::postcopy_fault_us(10) {
                Ok(us) => postcopy_floor = Some(us),
                Err(e) => {
                    eprintln!("ferry-bench-migrate: post-copy floor: {e}");
                    return std::process::ExitCode::FAILURE;
                }
            }
        }
        let mut runs = Vec::new();
        for run in 0..args.runs.max(1) {
            let logs = args
                .logs
                .as_ref()
                .map(|d| d.join(format!("{name}-{size}-{run}")));
            match migrate(&bin, &guest, &p, &args.tracking, logs) {
                Ok(f) => runs.push(f),
                Err(e) => {
                    eprintln!("ferry-bench-migrate: {name} {size} MiB: {e}");
                    return std::process::ExitCode::FAILURE;
                }
            }
        }
        let m = |f: fn(&Figures) -> f64| common::median(runs.iter().map(f).collect());
        let rate = m(|f| f.rate_mib_s);
        let guest_ratio = runs[0]
            .guest_ratio
            .map(|_| m(|f| f.guest_ratio.unwrap_or(f64::NAN)));
        // Under 1 MiB sent, the rate is the sender's starting guess, not a measure.
        let no_rate = p.local || mode == "postcopy" || m(|f| f.mib) < 1.0;
        let ratio = |floor: f64| {
            if no_rate {
                "-".to_string()
            } else {
                format!("{:.2}", rate / floor)
            }
        };
        let shown_rate = if no_rate {
            "-".to_string()
        } else {
            format!("{rate:.0}")
        };
        println!(
            "{:<8} {:>6} {:>10.1} {:>10.2} {:>7} {:>9.1} {:>9} {:>7} {:>8} {:>7}",
            name,
            size,
            m(|f| f.total_ms),
            m(|f| f.downtime_ms),
            m(|f| f.rounds as f64),
            m(|f| f.mib),
            shown_rate,
            ratio(tcp),
            ratio(tcp_busy),
            guest_ratio.map_or("-".to_string(), |g| format!("{g:.2}")),
        );
        if mode == "postcopy" {
            postcopy_rows.push((
                name,
                size,
                m(|f| f.downtime_ms),
                m(|f| f.all_here_ms),
                m(|f| f.first_pass_ms),
                m(|f| f.faults),
                m(|f| f.p50_us),
                m(|f| f.p99_us),
                m(|f| f.max_us),
            ));
        }
    }
    if let Some(floor) = postcopy_floor {
        println!(
            "\npost-copy (ms from the source's pause; fault latency in µs; floor: a CPL3 guest's missing page fetched over loopback TCP and placed with UFFDIO_COPY, {floor:.1} µs)"
        );
        println!(
            "{:<14} {:>6} {:>8} {:>9} {:>10} {:>8} {:>7} {:>7} {:>8} {:>10} {:>10}",
            "scenario",
            "MiB",
            "runs at",
            "all here",
            "first pass",
            "faults",
            "p50",
            "p99",
            "max",
            "p50/floor",
            "p99/floor"
        );
        for (name, size, runs_at, all_here, first, faults, p50, p99, max) in postcopy_rows {
            println!(
                "{:<14} {:>6} {:>8.2} {:>9.1} {:>10.1} {:>8.0} {:>7.1} {:>7.1} {:>8.1} {:>10.2} {:>10.2}",
                name, size, runs_at, all_here, first, faults, p50, p99, max, p50 / floor, p99 / floor
            );
        }
    }
    std::process::ExitCode::SUCCESS
}

/// The post-copy floor, as `../shared/probes/postcopy-floor.c` measures it: a CPL3
/// guest reads 32 MiB of memfd memory whose pages were punched out, and a handler
/// thread serves each missing fault by fetching the page from a server thread over
/// loopback TCP (one request per fault) and placing it with `UFFDIO_COPY`. No VMM
/// around it: the bare cost of one remote fault on this machine.
mod floor {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::time::Instant;

    use kvm_bindings::{kvm_segment, kvm_userspace_memory_region};
    use kvm_ioctls::{Kvm, VcpuExit};
    use userfaultfd::{Event, UffdBuilder};

    const MEM: usize = 64 << 20;
    const TOUCHED: usize = 32 << 20;
    const AT: usize = 0x40_0000;
    const PAGES: usize = TOUCHED / 4096;

    /// Microseconds per missing page, over `passes` passes.
    pub fn postcopy_fault_us(passes: u32) -> Result<f64, String> {
        let err = |what: &str| {
            let what = what.to_string();
            move |e: &dyn std::fmt::Display| format!("{what}: {e}")
        };
        let ram = memory::GuestRam::new((MEM >> 20) as u64, 46).map_err(|e| err("ram")(&e))?;
        let base = ram.regions()[0].host_addr;
        let mut bytes = vec![0u8; 0x5000];
        let kvm = Kvm::new().map_err(|e| err("kvm")(&e))?;
        let vm = kvm.create_vm().map_err(|e| err("vm")(&e))?;
        let region = kvm_userspace_memory_region {
            slot: 0,
            guest_phys_addr: 0,
            memory_size: MEM as u64,
            userspace_addr: base,
            flags: 0,
        };
        // SAFETY: the region is guest RAM's live mapping, which outlives the VM (both
        // dropped at the end of this function, the VM first).
        unsafe { vm.set_user_memory_region(region) }.map_err(|e| err("memory")(&e))?;
        vm.set_tss_address(0xfffb_d000)
            .map_err(|e| err("tss")(&e))?;
        let mut vcpu = vm.create_vcpu(0).map_err(|e| err("vcpu")(&e))?;
        // Identity-mapped 2 MiB pages for the first 64 MiB, user-accessible.
        let put = |bytes: &mut [u8], at: usize, v: u64| {
            bytes[at..at + 8].copy_from_slice(&v.to_le_bytes())
        };
        put(&mut bytes, 0x2000, 7 | 0x3000);
        put(&mut bytes, 0x3000, 7 | 0x4000);
        for i in 0..32usize {
            put(&mut bytes, 0x4000 + 8 * i, 7 | 0x80 | ((i as u64) << 21));
        }
        // inc rbx; mov rdi, AT; loop: mov rax, [rdi]; add rdi, 4096;
        // cmp rdi, AT + TOUCHED; jb loop; mov dx, 0x3f8; out dx, al; jmp start.
        let code: [u8; 39] = [
            0x48, 0xff, 0xc3, 0x48, 0xbf, 0, 0, 0x40, 0, 0, 0, 0, 0, 0x48, 0x8b, 0x07, 0x48, 0x81,
            0xc7, 0, 0x10, 0, 0, 0x48, 0x81, 0xff, 0, 0, 0x40, 0x02, 0x72, 0xed, 0x66, 0xba, 0xf8,
            0x03, 0xee, 0xeb, 0xd9,
        ];
        bytes[0x1000..0x1000 + code.len()].copy_from_slice(&code);
        ram.write(&bytes, vm_memory::GuestAddress(0))
            .map_err(|e| err("guest RAM")(&e))?;
        let mut s = vcpu.get_sregs().map_err(|e| err("sregs")(&e))?;
        s.cr3 = 0x2000;
        s.cr4 = 1 << 5;
        s.cr0 = 1 | (1 << 1) | (1 << 4) | (1 << 5) | (1 << 16) | (1 << 31);
        s.efer = (1 << 8) | (1 << 10);
        let mut seg = kvm_segment {
            base: 0,
            limit: 0xffff_ffff,
            selector: (1 << 3) | 3,
            present: 1,
            type_: 11,
            dpl: 3,
            db: 0,
            s: 1,
            l: 1,
            g: 1,
            ..Default::default()
        };
        s.cs = seg;
        seg.type_ = 3;
        seg.selector = (2 << 3) | 3;
        seg.l = 0;
        seg.db = 1;
        (s.ds, s.es, s.fs, s.gs, s.ss) = (seg, seg, seg, seg, seg);
        vcpu.set_sregs(&s).map_err(|e| err("sregs")(&e))?;
        let regs = kvm_bindings::kvm_regs {
            rip: 0x1000,
            rsp: 0x20_0000,
            rflags: 0x3002,
            ..Default::default()
        };
        vcpu.set_regs(&regs).map_err(|e| err("regs")(&e))?;

        // The page server, and the connection the handler asks it on.
        let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| err("listen")(&e))?;
        let addr = listener.local_addr().map_err(|e| err("listen")(&e))?;
        std::thread::spawn(move || {
            let Ok((mut c, _)) = listener.accept() else {
                return;
            };
            let _ = c.set_nodelay(true);
            let mut page = vec![0u8; 4096];
            let mut off = [0u8; 8];
            while c.read_exact(&mut off).is_ok() {
                page.fill(u64::from_le_bytes(off).to_le_bytes()[1] >> 4);
                if c.write_all(&page).is_err() {
                    return;
                }
            }
        });
        let mut sock = TcpStream::connect(addr).map_err(|e| err("connect")(&e))?;
        sock.set_nodelay(true).map_err(|e| err("nodelay")(&e))?;
        let uffd = UffdBuilder::new()
            .close_on_exec(true)
            .non_blocking(false)
            .user_mode_only(false)
            .create()
            .map_err(|e| err("userfaultfd")(&e))?;
        uffd.register((base + AT as u64) as *mut libc::c_void, TOUCHED)
            .map_err(|e| err("register")(&e))?;
        let uffd = std::sync::Arc::new(uffd);
        let handler_uffd = uffd.clone();
        std::thread::spawn(move || {
            let mut page = vec![0u8; 4096];
            while let Ok(Some(Event::Pagefault { addr, .. })) = handler_uffd.read_event() {
                let a = addr as u64 & !4095;
                let off = a - base;
                if sock.write_all(&off.to_le_bytes()).is_err()
                    || sock.read_exact(&mut page).is_err()
                {
                    return;
                }
                // SAFETY: `page` is a live 4 KiB buffer; `a` is a page of the
                // registered range.
                let _ = unsafe {
                    handler_uffd.copy(page.as_ptr().cast(), a as *mut libc::c_void, 4096, true)
                };
            }
        });
        let mut total = 0.0;
        for _ in 0..passes {
            // Every page missing again.
            ram.discard(vm_memory::GuestAddress(AT as u64), TOUCHED as u64)
                .map_err(|e| err("punch")(&e))?;
            let t = Instant::now();
            match vcpu.run() {
                Ok(VcpuExit::IoOut(0x3f8, _)) => {}
                Ok(other) => return Err(format!("unexpected exit {other:?}")),
                Err(e) => return Err(format!("run: {e}")),
            }
            total += t.elapsed().as_secs_f64();
        }
        Ok(total * 1e6 / f64::from(passes) / PAGES as f64)
    }
}
