//! `ferry-bench-snapshot`: what snapshots cost, against their floors.
//!
//! For each guest size it boots the test guest's `verify` workload over `--touched` MiB
//! (so that much of guest RAM holds data), and measures, in this process, on the same
//! code paths the API calls:
//! - **create, Full**: the time of `create_snapshot` with the VM paused, the memory
//!   file's allocated size, and the floor: `write(2)` of the same number of bytes, in
//!   1 MiB calls, to a file in the same directory;
//! - **create, Diff** after `--diff-mib` MiB of writes to guest RAM (made through ferry's
//!   tracked mapping while paused): time and bytes written;
//! - **load, File**: the time of `snapshot::load` (the request's work), from its start
//!   to the guest's next verified pass on the console, and to all of memory loaded;
//! - **eager copy**: the other way to load a File, copying its data extents into a
//!   fresh guest RAM before the guest runs, timed alone;
//! - **load, Uffd**: the same as File, served by `ferry-uffd-handler`;
//! - **create, Live** of a running guest that touched `--touched` MiB, idle (halted,
//!   its memory filled by the host) and rewriting 32 MiB at full speed: the guest's
//!   pause, the time to complete files against a Full create of the same paused guest,
//!   the guest's passes per second during the snapshot against before it, and the
//!   copy-before-write faults with their p50/p99 beside the floor of one uffd-wp sync
//!   fault (a host thread writing protected pages, each served by a handler thread).
//!
//! Before every timed create and the floor, the page cache is readied the same way
//! (`settle_page_cache`): the host's free page reporting otherwise made one file write
//! of 128 MiB take 30 ms or 300 ms with which pages it got.

mod common;

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use api::models::{SnapshotCreateParams, SnapshotLoadParams, SnapshotType};
use api::VmConfig;
use clap::Parser;
use vm_memory::GuestAddress;

#[derive(Parser)]
#[command(about = "Snapshot create and load times against write(2) and the guest's own pass")]
struct Args {
    /// Guest sizes in MiB.
    #[arg(long, value_delimiter = ',', default_value = "1024,4096")]
    sizes: Vec<u64>,
    /// MiB of guest RAM the guest touches (its verify range, from 16 MiB).
    #[arg(long, default_value_t = 112)]
    touched: u64,
    /// MiB written before the Diff.
    #[arg(long, default_value_t = 8)]
    diff_mib: u64,
    /// Live snapshots of each guest (each with its Full), their medians reported.
    #[arg(long, default_value_t = 3)]
    live_runs: usize,
    /// Directory for the snapshot files.
    #[arg(long, default_value = "/tmp")]
    dir: PathBuf,
    /// The test guest (default: $FERRY_GUEST).
    #[arg(long)]
    guest: Option<PathBuf>,
}

/// A create request for `name.state` and `name.mem` in `dir`.
fn request(dir: &Path, kind: SnapshotType, name: &str) -> SnapshotCreateParams {
    SnapshotCreateParams {
        snapshot_type: Some(kind),
        snapshot_path: dir.join(format!("{name}.state")),
        mem_file_path: dir.join(format!("{name}.mem")),
        version: None,
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
}

/// The floor of a Full create: `bytes` written with write(2) in 1 MiB calls.
fn write_floor(dir: &Path, bytes: u64) -> Result<Duration, String> {
    let path = dir.join("ferry-bench-floor");
    let chunk = vec![0x5au8; 1 << 20];
    let start = Instant::now();
    let mut file = File::create(&path).map_err(|e| e.to_string())?;
    let mut left = bytes;
    while left > 0 {
        let n = usize::try_from(left.min(1 << 20)).unwrap_or(1 << 20);
        file.write_all(&chunk[..n]).map_err(|e| e.to_string())?;
        left -= n as u64;
    }
    drop(file);
    let took = start.elapsed();
    let _ = std::fs::remove_file(&path);
    Ok(took)
}

/// Waits until `console` holds a `pass N ok` line after byte `from`; returns when.
fn next_pass(console: &Path, from: usize, timeout: Duration) -> Option<Instant> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(text) = std::fs::read_to_string(console) {
            if text.get(from..).is_some_and(|t| {
                t.lines()
                    .any(|l| l.starts_with("pass ") && l.ends_with(" ok"))
            }) {
                return Some(Instant::now());
            }
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    None
}

/// Loads a snapshot with `backend` in this process and runs it: returns the VM, when
/// the load started, how long it took, and when the guest's next verified pass came.
fn load_and_run(
    console: &Path,
    state: &Path,
    backend: &str,
    backend_path: &Path,
) -> Result<(vmm::Vmm, Instant, Duration, Instant), String> {
    let from = std::fs::metadata(console).map_or(0, |m| usize::try_from(m.len()).unwrap_or(0));
    let load: SnapshotLoadParams = serde_json::from_value(serde_json::json!({
        "snapshot_path": state,
        "mem_backend": { "backend_type": backend, "backend_path": backend_path },
    }))
    .map_err(|e| e.to_string())?;
    let start = Instant::now();
    let (mut vm, _) = vmm::snapshot::load(&load).map_err(|e| e.to_string())?;
    let loaded = start.elapsed();
    vm.resume().map_err(|e| e.to_string())?;
    let pass = next_pass(console, from, Duration::from_secs(30)).ok_or("no pass after load")?;
    Ok((vm, start, loaded, pass))
}

fn run(args: &Args, guest: &Path, size: u64) -> Result<(), String> {
    let dir = args
        .dir
        .join(format!("ferry-bench-snapshot-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let console = dir.join("console.txt");
    let cfg = serde_json::json!({
        "boot-source": {
            "kernel_image_path": guest,
            "boot_args": format!("console=ttyS0 workload=verify start=16M size={}M", args.touched),
        },
        "machine-config": { "vcpu_count": 1, "mem_size_mib": size, "track_dirty_pages": true },
        "serial": { "serial_out_path": console },
    });
    let config = VmConfig::from_json(&cfg.to_string()).map_err(|e| e.to_string())?;
    let mut vm = vmm::build(&config).map_err(|e| e.to_string())?;
    vm.start().map_err(|e| e.to_string())?;
    next_pass(&console, 0, Duration::from_secs(30)).ok_or("the guest never passed")?;
    vm.pause().map_err(|e| e.to_string())?;

    let full = request(&dir, SnapshotType::Full, "full");
    settle_page_cache(&dir, args.touched << 20)?;
    let start = Instant::now();
    let stats = vm
        .create_snapshot(&config, &full)
        .map_err(|e| e.to_string())?;
    let create = start.elapsed();
    settle_page_cache(&dir, stats.memory_bytes)?;
    let floor = write_floor(&dir, stats.memory_bytes)?;
    println!(
        "{size:>5} MiB  create Full  {:>8.1} ms  file {:>4} MiB apparent, {:>4} MiB allocated  floor write(2) {:>8.1} ms  ratio {:.2}",
        ms(create),
        size,
        allocated(&full.mem_file_path) >> 20,
        ms(floor),
        create.as_secs_f64() / floor.as_secs_f64()
    );

    let page = vec![0xa5u8; 4096];
    for i in 0..args.diff_mib * 256 {
        vm.ram()
            .write(&page, GuestAddress((16 << 20) + i * 4096))
            .map_err(|e| e.to_string())?;
    }
    let diff = request(&dir, SnapshotType::Diff, "diff");
    let start = Instant::now();
    let stats = vm
        .create_snapshot(&config, &diff)
        .map_err(|e| e.to_string())?;
    println!(
        "{size:>5} MiB  create Diff  {:>8.1} ms  {} MiB written after {} MiB of writes",
        ms(start.elapsed()),
        stats.memory_bytes >> 20,
        args.diff_mib
    );
    drop(vm);

    let (vm, start, loaded, pass) =
        load_and_run(&console, &full.snapshot_path, "File", &full.mem_file_path)?;
    vm.memory_settled().map_err(|e| e.to_string())?;
    let settled = start.elapsed();
    println!(
        "{size:>5} MiB  load File    {:>8.1} ms  to the next verified pass {:>8.1} ms  all memory in {:>8.1} ms",
        ms(loaded),
        ms(pass - start),
        ms(settled)
    );
    drop(vm);

    // The other way to load a File: copy its data extents before the guest runs.
    let ram = memory::GuestRam::new(size, 46).map_err(|e| e.to_string())?;
    let mut file = File::open(&full.mem_file_path).map_err(|e| e.to_string())?;
    let start = Instant::now();
    let bytes = ram.load_from(&mut file).map_err(|e| e.to_string())?;
    println!(
        "{size:>5} MiB  eager copy   {:>8.1} ms  of {} MiB of data extents (what a load would wait for)",
        ms(start.elapsed()),
        bytes >> 20
    );
    drop(ram);

    // The Uffd backend, served by ferry-uffd-handler in a process of its own.
    let handler_sock = dir.join("uffd.sock");
    let handler_bin = std::env::current_exe()
        .map_err(|e| e.to_string())?
        .with_file_name("ferry-uffd-handler");
    let mut handler = std::process::Command::new(&handler_bin)
        .arg(&handler_sock)
        .arg(&full.mem_file_path)
        .stdout(std::process::Stdio::null())
        .spawn()
        .map_err(|e| format!("{}: {e}", handler_bin.display()))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !handler_sock.exists() {
        if Instant::now() > deadline {
            return Err("ferry-uffd-handler never listened".into());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let (vm, start, loaded, pass) =
        load_and_run(&console, &full.snapshot_path, "Uffd", &handler_sock)?;
    println!(
        "{size:>5} MiB  load Uffd    {:>8.1} ms  to the next verified pass {:>8.1} ms",
        ms(loaded),
        ms(pass - start)
    );
    drop(vm);
    let _ = handler.kill();
    let _ = handler.wait();
    let _ = std::fs::remove_dir_all(&dir);
    live(args, guest, size, "idle")?;
    live(args, guest, size, "writer")?;
    Ok(())
}

/// The last `pass N ok` in `console`.
fn last_pass(console: &Path) -> u64 {
    std::fs::read_to_string(console)
        .unwrap_or_default()
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("pass ")?.strip_suffix(" ok")?.parse().ok())
        .unwrap_or(0)
}

/// A live snapshot of a running guest, `idle` (halted) or a `writer` of 32 MiB at full
/// speed; the rest of `--touched` MiB is filled by the host.
fn live(args: &Args, guest: &Path, size: u64, kind: &str) -> Result<(), String> {
    let dir = args
        .dir
        .join(format!("ferry-bench-live-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let console = dir.join("console.txt");
    let (workload, written) = match kind {
        "idle" => ("workload=idle".to_string(), 0),
        _ => ("workload=verify start=16M size=32M".to_string(), 32),
    };
    let cfg = serde_json::json!({
        "boot-source": { "kernel_image_path": guest, "boot_args": format!("console=ttyS0 {workload}") },
        "machine-config": { "vcpu_count": 1, "mem_size_mib": size },
        "serial": { "serial_out_path": console },
    });
    let config = VmConfig::from_json(&cfg.to_string()).map_err(|e| e.to_string())?;
    let mut vm = vmm::build(&config).map_err(|e| e.to_string())?;
    vm.start().map_err(|e| e.to_string())?;
    if written > 0 {
        next_pass(&console, 0, Duration::from_secs(30)).ok_or("the guest never passed")?;
    }
    // The rest of the touched memory, from the host.
    let page = vec![0x3cu8; 1 << 20];
    for mib in 16 + written..16 + args.touched {
        vm.ram()
            .write(&page, GuestAddress(mib << 20))
            .map_err(|e| e.to_string())?;
    }
    let mut ratios = Vec::new();
    let mut paces = Vec::new();
    for _ in 0..args.live_runs.max(1) {
        let (ratio, pace) = live_once(args, &mut vm, &config, &dir, &console, size, kind)?;
        ratios.push(ratio);
        paces.extend(pace);
    }
    let guest = if paces.is_empty() {
        String::new()
    } else {
        format!(", guest {:.2} of untracked", common::median(paces))
    };
    println!(
        "{size:>5} MiB  live {kind:<6}  median of {}: {:.2} of Full{guest}",
        ratios.len(),
        common::median(ratios)
    );
    drop(vm);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// One live snapshot of `vm`, running, then a Full of it paused, printed; resumes it
/// after. Returns the Live's time over the Full's, and the guest's pace during the
/// Live against the second before it (a writer's only).
fn live_once(
    args: &Args,
    vm: &mut vmm::Vmm,
    config: &VmConfig,
    dir: &Path,
    console: &Path,
    size: u64,
    kind: &str,
) -> Result<(f64, Option<f64>), String> {
    // The guest's pace untracked.
    let (p0, t0) = (last_pass(console), Instant::now());
    std::thread::sleep(Duration::from_secs(1));
    let before = (last_pass(console) - p0) as f64 / t0.elapsed().as_secs_f64();

    let params = request(dir, SnapshotType::Live, "live");
    settle_page_cache(dir, args.touched << 20)?;
    let (tx, rx) = std::sync::mpsc::channel();
    let (p0, start) = (last_pass(console), Instant::now());
    let snap = vm
        .start_live_snapshot(config, &params, api::Reply::new(tx, None))
        .map_err(|e| e.to_string())?;
    rx.recv_timeout(Duration::from_secs(600))
        .map_err(|e| e.to_string())?
        .map_err(|e| e.message)?;
    let total = start.elapsed();
    let during = (last_pass(console) - p0) as f64 / total.as_secs_f64();
    let status = snap.status();

    // A Full create of the same guest, paused, for comparison.
    vm.pause().map_err(|e| e.to_string())?;
    let full = request(dir, SnapshotType::Full, "full");
    settle_page_cache(dir, args.touched << 20)?;
    let start = Instant::now();
    vm.create_snapshot(config, &full)
        .map_err(|e| e.to_string())?;
    let full_ms = ms(start.elapsed());
    vm.resume().map_err(|e| e.to_string())?;
    for p in [
        &params.mem_file_path,
        &params.snapshot_path,
        &full.mem_file_path,
        &full.snapshot_path,
    ] {
        let _ = std::fs::remove_file(p);
    }
    let latency = status.fault_latency_us.map_or("-".to_string(), |l| {
        format!("p50 {:.0} µs p99 {:.0} µs", l.p50, l.p99)
    });
    let pace = (kind != "idle").then(|| during / before.max(1.0));
    let throughput = pace.map_or(String::new(), |p| format!("  guest {p:.2} of untracked"));
    println!(
        "{size:>5} MiB  live {kind:<6}  pause {:>5.2} ms  total {:>7.1} ms  ({:.2} of Full {:>7.1} ms, paused throughout){throughput}  cbw faults {} {latency}",
        status.pause_ms,
        ms(total),
        ms(total) / full_ms,
        full_ms,
        status.copy_before_write_faults,
    );
    Ok((ms(total) / full_ms, pace))
}

/// Readies the page cache for a measured create that writes `bytes`, so that every
/// create (and the write(2) floor) starts from the same state:
/// - writes every dirty page back first: a file write that found the last snapshot's
///   128 MiB still dirty could wait on their writeback;
/// - then writes and deletes a scratch file of `bytes` in `dir`, so that the create
///   allocates pages just freed. This host's balloon reports free memory to its
///   hypervisor (free page reporting: 2 MiB blocks left free for about 2 s), and the
///   first write to a reported page costs about 10 µs: `dd` of 128 MiB took 260-370
///   ms after a few idle seconds and 38 ms right after another. Without this, Fulls
///   of the same guest took 27-41 ms or 150-340 ms with what the allocator handed
///   out, and so did the Lives (README, live snapshots).
fn settle_page_cache(dir: &Path, bytes: u64) -> Result<(), String> {
    // SAFETY: sync(2) takes no arguments and changes no memory of this process.
    unsafe { libc::sync() };
    write_floor(dir, bytes).map(|_| ())
}

/// The floor of one copy-before-write: µs per uffd-wp sync fault, a host thread
/// writing one word into each of 8192 protected pages, each served (recorded and
/// un-protected) by ferry's uffd-sync handler thread.
fn sync_fault_floor() -> Result<f64, String> {
    use memory::dirty::{DirtyTracker, UffdSync};
    let ram = memory::GuestRam::new(64, 46).map_err(|e| e.to_string())?;
    let page = vec![1u8; 32 << 20];
    ram.write(&page, GuestAddress(0))
        .map_err(|e| e.to_string())?;
    let mut tracker = UffdSync::new(ram.tracked());
    tracker.start().map_err(|e| e.to_string())?;
    let start = Instant::now();
    for p in 0..8192u64 {
        ram.write(&[2u8], GuestAddress(p * 4096))
            .map_err(|e| e.to_string())?;
    }
    let us = start.elapsed().as_secs_f64() * 1e6 / 8192.0;
    tracker.stop().map_err(|e| e.to_string())?;
    Ok(us)
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let guest = match common::guest_image(&args.guest) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("ferry-bench-snapshot: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match sync_fault_floor() {
        Ok(us) => println!("floor: one uffd-wp sync fault (host write, handler thread) {us:.1} µs"),
        Err(e) => eprintln!("ferry-bench-snapshot: the uffd-wp sync floor: {e}"),
    }
    for &size in &args.sizes {
        if let Err(e) = run(&args, &guest, size) {
            eprintln!("ferry-bench-snapshot: {size} MiB: {e}");
            return std::process::ExitCode::FAILURE;
        }
    }
    std::process::ExitCode::SUCCESS
}
