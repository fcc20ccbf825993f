//! `ferry-bench-blk`: virtio-blk throughput from the test guest, against the same I/O
//! done directly on the host file in the same run.
//!
//! For each request size and direction, the guest (`workload=blk-bench`) moves `--total`
//! bytes sequentially over a `--disk-mib` file with `--depth` requests in flight and
//! times itself with the TSC. The floor is this program doing the same sequential
//! `pread`/`pwrite` calls of the same size on the same file into one buffer: ferry's
//! device does exactly those calls, into guest memory, plus the virtio protocol. Both
//! run against the page cache (the file is written once first), so the comparison is
//! the device's overhead, not the disk's speed.

mod common;

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use clap::Parser;

#[derive(Parser)]
#[command(about = "virtio-blk throughput of the test guest against direct host I/O")]
struct Args {
    /// Bytes moved per measurement, in MiB.
    #[arg(long, default_value_t = 1024)]
    total_mib: u64,
    /// Size of the disk file, in MiB.
    #[arg(long, default_value_t = 256)]
    disk_mib: u64,
    /// Requests the guest keeps in flight.
    #[arg(long, default_value_t = 32)]
    depth: u32,
    /// Runs per measurement; the median is reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// The ferry binary (default: next to this program).
    #[arg(long)]
    ferry: Option<PathBuf>,
    /// The test guest ELF (default: $FERRY_GUEST).
    #[arg(long)]
    guest: Option<PathBuf>,
    /// Where the disk file goes (default: the system temp directory).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// Seconds for the host to move `total` bytes in `req`-byte calls over the file.
fn host_run(file: &File, disk: u64, req: u64, total: u64, write: bool) -> Result<f64, String> {
    let mut buf = vec![0x5au8; usize::try_from(req).map_err(|e| e.to_string())?];
    let start = Instant::now();
    let mut done = 0;
    while done < total {
        let offset = done % (disk / req * req);
        if write {
            file.write_all_at(&buf, offset)
        } else {
            file.read_exact_at(&mut buf, offset)
        }
        .map_err(|e| format!("host I/O at {offset}: {e}"))?;
        done += req;
    }
    std::hint::black_box(&buf);
    Ok(start.elapsed().as_secs_f64())
}

/// Seconds the guest reports for the same I/O through ferry.
fn guest_run(
    args: &Args,
    ferry: &Path,
    guest: &Path,
    disk: &Path,
    req: u64,
    write: bool,
) -> Result<f64, String> {
    let config = serde_json::json!({
        "boot-source": {
            "kernel_image_path": guest,
            "boot_args": format!(
                "console=ttyS0 workload=blk-bench op={} req={req} depth={} total={}",
                if write { "write" } else { "read" },
                args.depth,
                args.total_mib << 20
            ),
        },
        "machine-config": { "vcpu_count": 1, "mem_size_mib": 256 },
        "drives": [{ "drive_id": "bench", "path_on_host": disk, "is_root_device": false }],
    });
    let config_path = disk.with_extension("json");
    std::fs::write(&config_path, config.to_string()).map_err(|e| e.to_string())?;
    let mut child = Command::new(ferry)
        .args(["--no-api", "--config-file"])
        .arg(&config_path)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", ferry.display()))?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut ns = None;
    for line in BufReader::new(stdout).lines() {
        let line = line.map_err(|e| e.to_string())?;
        if line.contains("error") {
            return Err(format!("guest: {line}"));
        }
        if let Some(v) = line.strip_prefix("ferry-guest: blk-bench ") {
            ns = v
                .split_whitespace()
                .find_map(|kv| kv.strip_prefix("ns="))
                .and_then(|n| n.parse::<u64>().ok());
        }
    }
    let status = child.wait().map_err(|e| e.to_string())?;
    if !status.success() {
        return Err(format!("ferry exited with {status}"));
    }
    ns.map(|ns| ns as f64 / 1e9)
        .ok_or_else(|| "the guest printed no blk-bench result".into())
}

fn run(args: &Args) -> Result<(), String> {
    if args.runs == 0 || args.total_mib == 0 || args.disk_mib == 0 {
        return Err("--runs, --total-mib and --disk-mib must be at least 1".into());
    }
    let ferry = common::ferry_binary(&args.ferry)?;
    let guest = common::guest_image(&args.guest)?;
    let dir = args.dir.clone().unwrap_or_else(std::env::temp_dir);
    let disk_path = dir.join(format!("ferry-bench-blk-{}.img", std::process::id()));
    let disk = args.disk_mib << 20;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&disk_path)
        .map_err(|e| format!("{}: {e}", disk_path.display()))?;
    let total = args.total_mib << 20;
    let result = (|| {
        // Allocate every block once, so that neither side pays for it.
        host_run(&file, disk, 1 << 20, disk, true)?;
        let mut rows = Vec::new();
        for req in [4u64 << 10, 64 << 10] {
            for write in [false, true] {
                let mut host = Vec::new();
                let mut guest_t = Vec::new();
                for _ in 0..args.runs {
                    host.push(host_run(&file, disk, req, total, write)?);
                    guest_t.push(guest_run(args, &ferry, &guest, &disk_path, req, write)?);
                }
                let mib = total as f64 / f64::from(1 << 20);
                let host = mib / common::median(host);
                let guest_mib = mib / common::median(guest_t);
                rows.push((req, write, guest_mib, host));
            }
        }
        Ok::<_, String>(rows)
    })();
    let _ = std::fs::remove_file(&disk_path);
    let _ = std::fs::remove_file(disk_path.with_extension("json"));
    let rows = result?;
    if args.json {
        let rows: Vec<_> = rows
            .iter()
            .map(|(req, write, guest, host)| {
                serde_json::json!({
                    "op": if *write { "write" } else { "read" },
                    "req_bytes": req,
                    "guest_mib_s": guest,
                    "host_mib_s": host,
                    "ratio": guest / host,
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({ "depth": args.depth, "total_mib": args.total_mib, "results": rows })
        );
        return Ok(());
    }
    println!(
        "virtio-blk, sequential, {} MiB per run over a {} MiB file, depth {}, median of {}",
        args.total_mib, args.disk_mib, args.depth, args.runs
    );
    println!(
        "{:<6} {:>7} {:>12} {:>12} {:>7}",
        "op", "req", "guest MiB/s", "host MiB/s", "ratio"
    );
    for (req, write, guest, host) in rows {
        println!(
            "{:<6} {:>6}K {:>12.0} {:>12.0} {:>7.2}",
            if write { "write" } else { "read" },
            req >> 10,
            guest,
            host,
            guest / host
        );
    }
    Ok(())
}

fn main() {
    let args = Args::parse();
    if let Err(e) = run(&args) {
        eprintln!("ferry-bench-blk: error: {e}");
        std::process::exit(1);
    }
}
