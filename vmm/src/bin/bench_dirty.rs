//! `ferry-bench-dirty`: what dirty tracking costs, per mode, against its bare mechanism.
//!
//! It runs the test guest's `dirty` workload (one write per page, sweeping a range at
//! full speed, the sweep number in each page's first word) in VMs of several sizes, and
//! measures, for each tracking mode:
//! - guest throughput with tracking on, as a fraction of the same guest untracked, for a
//!   32 MiB and a 96 MiB range and a collect every 50 ms, 200 ms and 1 s;
//! - the first-write cost derived from it: the guest's extra time per page it dirtied;
//! - collect cost in ns per guest page, with ~0%, ~10% and ~100% of pages dirty (the
//!   guest is paused while `collect` runs, so the set is fixed; the least of `--reps`
//!   runs, alternating with the floor);
//! - the floor: the bare mechanism (`PAGEMAP_SCAN`, `KVM_GET_DIRTY_LOG` + `CLEAR`, or
//!   the sync tracker's own swap and re-protect) on the same state, and the ratio.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use api::VmConfig;
use clap::Parser;
use memory::dirty::{DirtyTracker, TrackingMode, UffdAsync};
use memory::PAGE_SIZE;
use vm_memory::{Bytes, GuestAddress};

#[derive(Parser)]
#[command(about = "Dirty-tracking cost per mode: guest throughput, first-write cost, collect cost")]
struct Args {
    /// Guest sizes in MiB.
    #[arg(long, value_delimiter = ',', default_value = "256,1024,4096")]
    sizes: Vec<u64>,
    /// Modes (uffd-async, uffd-sync, kvm-dirty-log, kvm-dirty-log-hot).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "uffd-async,uffd-sync,kvm-dirty-log,kvm-dirty-log-hot"
    )]
    modes: Vec<TrackingMode>,
    /// Ranges the guest dirties for the throughput figures, in MiB.
    #[arg(long, value_delimiter = ',', default_value = "32,96")]
    ranges: Vec<u64>,
    /// Collect intervals for the throughput figures, in ms.
    #[arg(long, value_delimiter = ',', default_value = "50,200,1000")]
    intervals: Vec<u64>,
    /// Repetitions of each collect measurement.
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Skip uffd-sync collects with everything dirty on guests at least this large (MiB):
    /// every first write is a round trip to the handler thread (~100 µs here), which
    /// makes each sweep of a 1 GiB guest take ~30 s.
    #[arg(long, default_value_t = 1024)]
    sync_full_limit: u64,
    /// Also measure uffd-async throughput with each `PAGEMAP_SCAN` covering at most this
    /// many KiB (the "write-protect in chunks" idea); empty = skip.
    #[arg(long, value_delimiter = ',')]
    async_chunks: Vec<u64>,
    /// Only the collect-cost figures.
    #[arg(long, conflicts_with = "throughput_only")]
    collect_only: bool,
    /// Only the throughput and first-write figures.
    #[arg(long)]
    throughput_only: bool,
    /// The test guest ELF (default: $FERRY_GUEST).
    #[arg(long)]
    guest: Option<PathBuf>,
    /// Print JSON lines instead of tables.
    #[arg(long)]
    json: bool,
}

const RANGE_START: u64 = 16 << 20;

struct Guest {
    vmm: vmm::Vmm,
    start: u64,
    pages: u64,
    total_pages: u64,
}

impl Guest {
    fn boot(guest: &Path, mem_mib: u64, size: u64) -> Result<Guest, String> {
        let json = format!(
            r#"{{"boot-source": {{"kernel_image_path": "{}", "boot_args": "console=ttyS0 workload=dirty start={RANGE_START:#x} size={size:#x} rate=0"}},
                "machine-config": {{"vcpu_count": 1, "mem_size_mib": {mem_mib}}},
                "serial": {{"serial_out_path": "/dev/null"}}}}"#,
            guest.display()
        );
        let config = VmConfig::from_json(&json).map_err(|e| e.to_string())?;
        let mut vmm = vmm::build(&config).map_err(|e| e.to_string())?;
        vmm.start().map_err(|e| e.to_string())?;
        let g = Guest {
            vmm,
            start: RANGE_START,
            pages: size / PAGE_SIZE,
            total_pages: mem_mib * 256,
        };
        g.wait_sweeps(1, Duration::from_secs(120))?;
        Ok(g)
    }

    /// The sweep the guest is in: the first page of the range holds its number.
    fn sweep(&self) -> u64 {
        self.vmm
            .ram()
            .memory()
            .read_obj::<u64>(GuestAddress(self.start))
            .unwrap_or(0)
    }

    fn wait_sweeps(&self, n: u64, timeout: Duration) -> Result<(), String> {
        let target = self.sweep() + n;
        let deadline = Instant::now() + timeout;
        while self.sweep() < target {
            if Instant::now() > deadline {
                return Err(format!(
                    "the guest did not finish {n} sweeps in {timeout:?}"
                ));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        Ok(())
    }

    /// Pages the guest has written since it started: the pages of the current sweep
    /// hold its number, the rest the previous one, so a binary search finds where it is.
    fn progress(&self) -> u64 {
        let mem = self.vmm.ram().memory();
        let word = |page: u64| {
            mem.read_obj::<u64>(GuestAddress(self.start + page * PAGE_SIZE))
                .unwrap_or(0)
        };
        let sweep = word(0);
        let (mut lo, mut hi) = (1, self.pages);
        while lo < hi {
            let mid = (lo + hi) / 2;
            if word(mid) >= sweep {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        sweep.saturating_sub(1) * self.pages + lo
    }

    /// Pages written per second over `window`, collecting every `interval` when `collect`
    /// is given.
    fn page_rate(
        &self,
        window: Duration,
        interval: Duration,
        mut collect: Option<&mut dyn FnMut()>,
    ) -> f64 {
        let p0 = self.progress();
        let t0 = Instant::now();
        while t0.elapsed() < window {
            std::thread::sleep(interval.min(window));
            if let Some(c) = collect.as_mut() {
                c();
            }
        }
        (self.progress() - p0) as f64 / t0.elapsed().as_secs_f64()
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The least time: for fixed work, the sample least disturbed by the machine.
fn least(v: Vec<f64>) -> f64 {
    v.into_iter().fold(f64::INFINITY, f64::min)
}

fn throughput(args: &Args, guest: &Path, mem_mib: u64) -> Result<(), String> {
    for &range in &args.ranges {
        let g = Guest::boot(guest, mem_mib, range << 20)?;
        let untracked = g.page_rate(Duration::from_secs(1), Duration::from_millis(100), None);
        // Each mode, then uffd-async once per --async-chunks size.
        let variants = args.modes.iter().map(|m| (*m, None)).chain(
            args.async_chunks
                .iter()
                .map(|kib| (TrackingMode::UffdAsync, Some(kib << 10))),
        );
        for (mode, chunk) in variants {
            let label = match chunk {
                Some(bytes) => format!("uffd-async/{}K", bytes >> 10),
                None => mode.name().to_owned(),
            };
            for &interval_ms in &args.intervals {
                let interval = Duration::from_millis(interval_ms);
                let mut tracker: Box<dyn DirtyTracker> = match chunk {
                    Some(bytes) => Box::new(
                        UffdAsync::new(g.vmm.ram().tracked())
                            .map_err(|e| e.to_string())?
                            .chunk(bytes),
                    ),
                    None => g.vmm.dirty_tracker(mode).map_err(|e| e.to_string())?,
                };
                tracker.start().map_err(|e| e.to_string())?;
                let window = Duration::from_millis((interval_ms * 4).max(1000));
                let mut failed = None;
                let mut collect = || {
                    if let Err(e) = tracker.collect() {
                        failed = Some(e.to_string());
                    }
                };
                let tracked = g.page_rate(window, interval, Some(&mut collect));
                if let Some(e) = failed {
                    return Err(e);
                }
                tracker.stop().map_err(|e| e.to_string())?;
                // Per round the guest spends `interval`. Untracked, its writes would have
                // taken written / untracked. The rest is first writes: one per distinct
                // page it dirtied in the round.
                let written = tracked * interval.as_secs_f64();
                let dirtied = written.min(g.pages as f64).max(1.0);
                let first_write_us =
                    (interval.as_secs_f64() - written / untracked).max(0.0) / dirtied * 1e6;
                let fraction = tracked / untracked;
                if args.json {
                    println!(
                        r#"{{"figure": "throughput", "guest_mib": {mem_mib}, "mode": "{label}", "range_mib": {range}, "interval_ms": {interval_ms}, "untracked_pages_per_s": {untracked:.0}, "tracked_pages_per_s": {tracked:.0}, "fraction": {fraction:.3}, "first_write_us": {first_write_us:.2}}}"#
                    );
                } else {
                    println!(
                        "{:>6} MiB  {:<14} {:>4} MiB  every {:>5} ms   {:>7.3} -> {:>7.3} Mpages/s   {:>6.3} of untracked   {:>6.2} µs/first write",
                        mem_mib,
                        label,
                        range,
                        interval_ms,
                        untracked / 1e6,
                        tracked / 1e6,
                        fraction,
                        first_write_us
                    );
                }
            }
        }
    }
    Ok(())
}

/// Times `collect` and the floor on a paused guest with the range all dirty, and with
/// nothing dirty. Returns (dirty pages, collect ms, floor ms) per state.
fn collect_cost(
    args: &Args,
    guest: &Path,
    mem_mib: u64,
    range: u64,
    mode: TrackingMode,
) -> Result<(), String> {
    let mut g = Guest::boot(guest, mem_mib, range)?;
    let mut tracker = g.vmm.bench_tracker(mode).map_err(|e| e.to_string())?;
    tracker.start().map_err(|e| e.to_string())?;
    tracker.collect().map_err(|e| e.to_string())?;
    let timeout = Duration::from_secs(600);
    let (mut full, mut full_floor, mut dirty) = (Vec::new(), Vec::new(), 0);
    for rep in 0..args.reps * 2 {
        // Two sweeps after the last collect: every page of the range is dirty. Collect
        // and floor alternate, so that neither always runs first.
        g.wait_sweeps(2, timeout)?;
        g.vmm.pause().map_err(|e| e.to_string())?;
        let t = Instant::now();
        if rep % 2 == 0 {
            dirty = tracker.collect().map_err(|e| e.to_string())?.count();
            full.push(ms(t.elapsed()));
        } else {
            tracker.floor_collect().map_err(|e| e.to_string())?;
            full_floor.push(ms(t.elapsed()));
        }
        g.vmm.resume().map_err(|e| e.to_string())?;
    }
    g.vmm.pause().map_err(|e| e.to_string())?;
    tracker.collect().map_err(|e| e.to_string())?;
    let (mut clean, mut clean_floor) = (Vec::new(), Vec::new());
    for _ in 0..args.reps {
        let t = Instant::now();
        tracker.collect().map_err(|e| e.to_string())?;
        clean.push(ms(t.elapsed()));
        let t = Instant::now();
        tracker.floor_collect().map_err(|e| e.to_string())?;
        clean_floor.push(ms(t.elapsed()));
    }
    tracker.stop().map_err(|e| e.to_string())?;
    g.vmm.stop();
    let pages = g.total_pages as f64;
    for (label, pct, c, f) in [
        ("clean", 0.0, least(clean), least(clean_floor)),
        (
            "dirty",
            dirty as f64 / pages * 100.0,
            least(full),
            least(full_floor),
        ),
    ] {
        let (c_ns, f_ns) = (c * 1e6 / pages, f * 1e6 / pages);
        if args.json {
            println!(
                r#"{{"figure": "collect", "guest_mib": {mem_mib}, "mode": "{}", "state": "{label}", "dirty_pct": {pct:.1}, "collect_ms": {c:.3}, "floor_ms": {f:.3}, "collect_ns_per_page": {c_ns:.1}, "floor_ns_per_page": {f_ns:.1}, "ratio": {:.2}}}"#,
                mode.name(),
                c / f
            );
        } else {
            println!(
                "{:>6} MiB  {:<14} {:>5.1}% dirty   collect {:>9.3} ms = {:>6.1} ns/page   floor {:>9.3} ms = {:>6.1} ns/page   ratio {:>5.2}",
                mem_mib, mode.name(), pct, c, c_ns, f, f_ns, c / f
            );
        }
    }
    Ok(())
}

fn run(args: &Args) -> Result<(), String> {
    let guest = common::guest_image(&args.guest)?;
    if !args.json {
        println!(
            "guest throughput under tracking (dirty workload at full speed, one write per page)"
        );
    }
    for &mem in &args.sizes {
        if !args.collect_only {
            throughput(args, &guest, mem)?;
        }
    }
    if !args.json {
        println!("\ncollect cost per guest page (guest paused during the collect; floor = the bare mechanism)");
    }
    for &mem in &args.sizes {
        if args.throughput_only {
            break;
        }
        // ~10% of the guest, and everything from 16 MiB to the end of low RAM.
        let low_end = (mem << 20).min(3 << 30);
        for (range, full) in [
            (((mem << 20) / 10) & !0xfffff, false),
            (low_end - RANGE_START, true),
        ] {
            for &mode in &args.modes {
                if full && mode == TrackingMode::UffdSync && mem >= args.sync_full_limit {
                    if !args.json {
                        println!("{mem:>6} MiB  {:<14} skipped with everything dirty (--sync-full-limit)", mode.name());
                    }
                    continue;
                }
                collect_cost(args, &guest, mem, range, mode)?;
            }
        }
    }
    Ok(())
}

fn main() {
    let args = Args::parse();
    if let Err(e) = run(&args) {
        eprintln!("ferry-bench-dirty: error: {e}");
        std::process::exit(1);
    }
}
