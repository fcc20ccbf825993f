//! `ferry-bench-start`: how fast ferry boots the test guest, and how much memory ferry
//! itself uses.
//!
//! For each run it starts `ferry --config-file … --no-api` with the idle test guest and
//! measures the time from spawning the process to the first console line on its
//! stdout, then reads ferry's own resident memory (VmRSS less RssShmem, which is guest
//! RAM) from /proc while the guest runs. The floor is spawning `/bin/echo` and reading
//! its line the same way: no VMM can start faster than a process that does nothing.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;

#[derive(Parser)]
#[command(
    about = "Time from process start to the test guest's first console line, and ferry's own RSS"
)]
struct Args {
    /// Number of runs (at least 10).
    #[arg(long, default_value_t = 20)]
    runs: usize,
    /// The ferry binary (default: next to this program).
    #[arg(long)]
    ferry: Option<PathBuf>,
    /// The test guest ELF (default: $FERRY_GUEST).
    #[arg(long)]
    guest: Option<PathBuf>,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 128)]
    mem_mib: u64,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

struct Stats {
    median: f64,
    min: f64,
    max: f64,
}

fn stats(mut v: Vec<f64>) -> Stats {
    v.sort_by(|a, b| a.total_cmp(b));
    Stats {
        median: v[v.len() / 2],
        min: v[0],
        max: v[v.len() - 1],
    }
}

/// Spawns `cmd` and returns the time until the first newline on its stdout, and the child.
fn time_to_first_line(cmd: &mut Command) -> Result<(Duration, std::process::Child), String> {
    let start = Instant::now();
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .stdin(Stdio::null())
        .spawn()
        .map_err(|e| e.to_string())?;
    let mut out = child.stdout.take().ok_or("no stdout")?;
    let mut buf = [0u8; 256];
    let mut seen = Vec::new();
    loop {
        let n = out.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            return Err(format!(
                "process ended before a line: {:?}",
                String::from_utf8_lossy(&seen)
            ));
        }
        seen.extend_from_slice(&buf[..n]);
        if seen.contains(&b'\n') {
            let elapsed = start.elapsed();
            // Keep the pipe open so the guest never blocks on a full pipe.
            std::thread::spawn(move || while matches!(out.read(&mut buf), Ok(n) if n > 0) {});
            return Ok((elapsed, child));
        }
    }
}

fn status_kib(pid: u32, field: &str) -> Result<f64, String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).map_err(|e| e.to_string())?;
    text.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("no {field} in /proc/{pid}/status"))
}

fn run(args: &Args) -> Result<(), String> {
    if args.runs < 10 {
        return Err("--runs must be at least 10".into());
    }
    let ferry = common::ferry_binary(&args.ferry)?;
    let guest = common::guest_image(&args.guest)?;
    let dir = std::env::temp_dir().join(format!("ferry-bench-start-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let config = dir.join("vm.json");
    let json = format!(
        r#"{{"boot-source": {{"kernel_image_path": "{}", "boot_args": "console=ttyS0 workload=idle"}},
            "machine-config": {{"vcpu_count": 1, "mem_size_mib": {}}}}}"#,
        guest.display(),
        args.mem_mib
    );
    std::fs::write(&config, json).map_err(|e| e.to_string())?;

    let mut start_ms = Vec::new();
    let mut rss_mib = Vec::new();
    let mut floor_ms = Vec::new();
    for _ in 0..args.runs {
        let (t, mut child) = time_to_first_line(
            Command::new(&ferry)
                .arg("--config-file")
                .arg(&config)
                .arg("--no-api"),
        )?;
        let pid = child.id();
        let own = status_kib(pid, "VmRSS:")? - status_kib(pid, "RssShmem:")?;
        // SAFETY: signals our own child.
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        let status = child.wait().map_err(|e| e.to_string())?;
        if !status.success() {
            return Err(format!("ferry exited with {status}"));
        }
        start_ms.push(t.as_secs_f64() * 1e3);
        rss_mib.push(own / 1024.0);

        let (f, mut echo) = time_to_first_line(Command::new("/bin/echo").arg("floor"))?;
        let _ = echo.wait();
        floor_ms.push(f.as_secs_f64() * 1e3);
    }
    let _ = std::fs::remove_dir_all(&dir);
    report(
        args,
        &ferry,
        stats(start_ms),
        stats(rss_mib),
        stats(floor_ms),
    );
    Ok(())
}

fn report(args: &Args, ferry: &Path, start: Stats, rss: Stats, floor: Stats) {
    if args.json {
        println!(
            r#"{{"runs": {}, "mem_mib": {}, "start_ms": {{"median": {:.3}, "min": {:.3}, "max": {:.3}}}, "floor_ms": {{"median": {:.3}, "min": {:.3}, "max": {:.3}}}, "start_to_floor": {:.2}, "own_rss_mib": {{"median": {:.2}, "min": {:.2}, "max": {:.2}}}}}"#,
            args.runs,
            args.mem_mib,
            start.median,
            start.min,
            start.max,
            floor.median,
            floor.min,
            floor.max,
            start.median / floor.median,
            rss.median,
            rss.min,
            rss.max
        );
        return;
    }
    println!(
        "ferry start benchmark: {} runs, {} ({} MiB idle test guest)",
        args.runs,
        ferry.display(),
        args.mem_mib
    );
    println!("{:<34} {:>9} {:>9} {:>9}", "", "median", "min", "max");
    println!(
        "{:<34} {:>9.3} {:>9.3} {:>9.3}",
        "start to first console line (ms)", start.median, start.min, start.max
    );
    println!(
        "{:<34} {:>9.3} {:>9.3} {:>9.3}",
        "floor: spawn /bin/echo (ms)", floor.median, floor.min, floor.max
    );
    println!(
        "{:<34} {:>9.2}",
        "ratio to floor (median)",
        start.median / floor.median
    );
    println!(
        "{:<34} {:>9.2} {:>9.2} {:>9.2}",
        "ferry's own RSS (MiB)", rss.median, rss.min, rss.max
    );
}

fn main() {
    let args = Args::parse();
    if let Err(e) = run(&args) {
        eprintln!("ferry-bench-start: error: {e}");
        std::process::exit(1);
    }
}
