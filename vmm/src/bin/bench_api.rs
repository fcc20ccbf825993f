//! `ferry-bench-api`: round-trip latency of the HTTP API.
//!
//! It starts `ferry --api-sock` with the idle test guest, then times, over one keep-alive
//! connection, `GET /` and a pause+resume pair (two `PATCH /vm` requests), reporting p50,
//! p99 and max. The floor is a round trip of a request-sized message to an echo thread
//! over a Unix socket in this process: no API on a Unix socket can answer faster.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use api::client::Client;
use clap::Parser;

#[derive(Parser)]
#[command(about = "Latency of GET / and of pause+resume through ferry's API socket")]
struct Args {
    /// Timed GET / requests.
    #[arg(long, default_value_t = 5000)]
    gets: usize,
    /// Timed pause+resume pairs.
    #[arg(long, default_value_t = 1000)]
    pauses: usize,
    /// The ferry binary (default: next to this program).
    #[arg(long)]
    ferry: Option<PathBuf>,
    /// The test guest ELF (default: $FERRY_GUEST).
    #[arg(long)]
    guest: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

struct Percentiles {
    p50: f64,
    p99: f64,
    max: f64,
}

fn percentiles(mut us: Vec<f64>) -> Percentiles {
    us.sort_by(|a, b| a.total_cmp(b));
    // Nearest rank, in integers: the sample at `per_mille`/1000 of the sorted list.
    let at = |per_mille: usize| us[(us.len() - 1) * per_mille / 1000];
    Percentiles {
        p50: at(500),
        p99: at(990),
        max: at(1000),
    }
}

fn time_us(f: &mut dyn FnMut() -> Result<(), String>) -> Result<f64, String> {
    let t = Instant::now();
    f()?;
    Ok(t.elapsed().as_secs_f64() * 1e6)
}

fn expect(
    client: &mut Client,
    method: &str,
    path: &str,
    body: Option<&str>,
    status: u16,
) -> Result<(), String> {
    let r = client
        .request(method, path, body)
        .map_err(|e| e.to_string())?;
    if r.status != status {
        return Err(format!("{method} {path}: HTTP {} {}", r.status, r.text()));
    }
    Ok(())
}

/// Round trips of `size` bytes to an echo thread over a Unix socket pair.
fn floor(rounds: usize, size: usize) -> Result<Percentiles, String> {
    let (mut a, mut b) = UnixStream::pair().map_err(|e| e.to_string())?;
    let echo = std::thread::spawn(move || {
        let mut buf = vec![0u8; size];
        while b.read_exact(&mut buf).is_ok() {
            if b.write_all(&buf).is_err() {
                break;
            }
        }
    });
    let msg = vec![b'x'; size];
    let mut back = vec![0u8; size];
    let mut samples = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        samples.push(time_us(&mut || {
            a.write_all(&msg).map_err(|e| e.to_string())?;
            a.read_exact(&mut back).map_err(|e| e.to_string())
        })?);
    }
    drop(a);
    let _ = echo.join();
    Ok(percentiles(samples))
}

fn run(args: &Args) -> Result<(), String> {
    let ferry = common::ferry_binary(&args.ferry)?;
    let guest = common::guest_image(&args.guest)?;
    let dir = std::env::temp_dir().join(format!("ferry-bench-api-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let sock = dir.join("api.sock");
    let mut child = Command::new(&ferry)
        .arg("--api-sock")
        .arg(&sock)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| format!("{}: {e}", ferry.display()))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while UnixStream::connect(&sock).is_err() {
        if Instant::now() > deadline {
            return Err("ferry never opened its API socket".into());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let result = measure(args, &sock, &guest);
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn measure(args: &Args, sock: &std::path::Path, guest: &std::path::Path) -> Result<(), String> {
    let mut c = Client::connect(sock).map_err(|e| e.to_string())?;
    let boot = serde_json::json!({ "kernel_image_path": guest, "boot_args": "console=ttyS0 workload=idle" });
    expect(&mut c, "PUT", "/boot-source", Some(&boot.to_string()), 204)?;
    expect(
        &mut c,
        "PUT",
        "/actions",
        Some(r#"{"action_type": "InstanceStart"}"#),
        204,
    )?;

    // Warm up, then time.
    for _ in 0..200 {
        expect(&mut c, "GET", "/", None, 200)?;
    }
    let mut gets = Vec::with_capacity(args.gets);
    for _ in 0..args.gets {
        gets.push(time_us(&mut || expect(&mut c, "GET", "/", None, 200))?);
    }
    let mut pauses = Vec::with_capacity(args.pauses);
    for _ in 0..args.pauses {
        pauses.push(time_us(&mut || {
            expect(&mut c, "PATCH", "/vm", Some(r#"{"state": "Paused"}"#), 204)?;
            expect(&mut c, "PATCH", "/vm", Some(r#"{"state": "Resumed"}"#), 204)
        })?);
    }
    // A GET / request with its headers is about 100 bytes.
    let floor = floor(args.gets, 100)?;
    let (get, pause) = (percentiles(gets), percentiles(pauses));
    if args.json {
        println!(
            r#"{{"get_us": {{"p50": {:.1}, "p99": {:.1}, "max": {:.1}}}, "pause_resume_us": {{"p50": {:.1}, "p99": {:.1}, "max": {:.1}}}, "floor_us": {{"p50": {:.1}, "p99": {:.1}}}, "get_to_floor": {:.1}}}"#,
            get.p50,
            get.p99,
            get.max,
            pause.p50,
            pause.p99,
            pause.max,
            floor.p50,
            floor.p99,
            get.p50 / floor.p50
        );
    } else {
        println!(
            "ferry API latency: {} GET /, {} pause+resume pairs, one keep-alive connection",
            args.gets, args.pauses
        );
        println!("{:<36} {:>9} {:>9} {:>9}", "", "p50 µs", "p99 µs", "max µs");
        println!(
            "{:<36} {:>9.1} {:>9.1} {:>9.1}",
            "GET /", get.p50, get.p99, get.max
        );
        println!(
            "{:<36} {:>9.1} {:>9.1} {:>9.1}",
            "pause+resume (2 requests)", pause.p50, pause.p99, pause.max
        );
        println!(
            "{:<36} {:>9.1} {:>9.1} {:>9.1}",
            "floor: Unix socket echo round trip", floor.p50, floor.p99, floor.max
        );
        println!("{:<36} {:>9.1}", "GET / p50 to floor", get.p50 / floor.p50);
    }
    Ok(())
}

fn main() {
    let args = Args::parse();
    if let Err(e) = run(&args) {
        eprintln!("ferry-bench-api: error: {e}");
        std::process::exit(1);
    }
}
