//! Firecracker's tooling drives ferry unchanged: the command line its Go SDK and firectl
//! pass, `PUT /logger` and `PUT /metrics`, `GET /version`; and seccomp, on by default,
//! confines every thread.

mod common;

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{expect, guest_config, guest_image, refused, spawn_api, Ferry, TempDir};
use serde_json::json;

const BOOT: Duration = Duration::from_secs(20);

/// Configures and starts the test guest through the API, printing forever.
fn start_guest(sock: &Path) {
    let boot = json!({
        "kernel_image_path": guest_image(),
        "boot_args": "console=ttyS0 workload=verify size=8M passes=1000000",
    });
    expect(sock, "PUT", "/boot-source", Some(&boot.to_string()), 204);
    let machine = r#"{"vcpu_count": 2, "mem_size_mib": 64}"#;
    expect(sock, "PUT", "/machine-config", Some(machine), 204);
    expect(
        sock,
        "PUT",
        "/actions",
        Some(r#"{"action_type": "InstanceStart"}"#),
        204,
    );
}

/// Each thread of `pid` with its seccomp mode (0 none, 2 filter).
fn seccomp_modes(pid: u32) -> Vec<(String, u32)> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).expect("tasks") {
        let task = task.expect("task").path();
        let name = std::fs::read_to_string(task.join("comm")).unwrap_or_default();
        let status = std::fs::read_to_string(task.join("status")).unwrap_or_default();
        let mode = status
            .lines()
            .find_map(|l| l.strip_prefix("Seccomp:"))
            .and_then(|v| v.trim().parse().ok())
            .expect("Seccomp: line");
        out.push((name.trim().to_string(), mode));
    }
    out.sort();
    out
}

/// A log line as Firecracker writes it: `YYYY-MM-DDTHH:MM:SS.nnnnnnnnn [`.
fn has_firecracker_time(line: &str) -> bool {
    let b = line.as_bytes();
    b.len() > 31
        && [4, 7].iter().all(|&i| b[i] == b'-')
        && b[10] == b'T'
        && [13, 16].iter().all(|&i| b[i] == b':')
        && b[19] == b'.'
        && b[20..29].iter().all(u8::is_ascii_digit)
        && &line[29..31] == " ["
}

/// The line of `text` that contains `needle`, which must start as Firecracker's do.
fn logged<'a>(text: &'a str, needle: &str) -> &'a str {
    let line = text
        .lines()
        .find(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("no line with {needle:?} in:\n{text}"));
    assert!(has_firecracker_time(line), "{line}");
    line
}

#[test]
fn test_sdk_launch_line_starts_ferry_and_get_reports_its_id() {
    let dir = TempDir::new("fc-sdk");
    // The Go SDK's command line, word for word.
    let (mut ferry, sock) = spawn_api(&dir, &["--id", "vm-123", "--no-seccomp"]);
    let info = expect(&sock, "GET", "/", None, 200);
    assert_eq!(info["id"], "vm-123");
    let version = expect(&sock, "GET", "/version", None, 200);
    assert_eq!(version["firecracker_version"], "1.14.0");
    assert_eq!(version["ferry_version"], env!("CARGO_PKG_VERSION"));
    // --no-seccomp: nothing is confined, even once a guest runs.
    start_guest(&sock);
    ferry.expect_line("pass 1 ok", BOOT);
    let modes = seccomp_modes(ferry.pid());
    assert!(modes.iter().any(|(n, _)| n == "vcpu0"), "{modes:?}");
    assert!(modes.iter().all(|(_, m)| *m == 0), "{modes:?}");
}

#[test]
fn test_launcher_flags_are_taken_and_bad_ones_refused_clearly() {
    let dir = TempDir::new("fc-flags");
    let metrics = dir.path().join("metrics.json");
    let (ferry, sock) = spawn_api(
        &dir,
        &[
            "--id",
            "flags-1",
            "--level",
            "Info",
            "--show-level",
            "--show-log-origin",
            "--metrics-path",
            metrics.to_str().expect("utf-8"),
            "--http-api-max-payload-size",
            "4096",
            "--mmds-size-limit",
            "1000",
            "--boot-timer",
            "--start-time-us",
            "1",
            "--start-time-cpu-us",
            "0",
            "--parent-cpu-time-us",
            "5",
        ],
    );
    // The payload limit is in force.
    let big = format!(
        r#"{{"vcpu_count": 1, "mem_size_mib": 64, "x": "{}"}}"#,
        "y".repeat(5000)
    );
    let m = refused(&sock, "PUT", "/machine-config", Some(&big));
    assert!(m.contains("the limit is 4096"), "{m}");
    let m = expect(&sock, "GET", "/metrics", None, 200);
    assert!(
        m["api_server"]["process_startup_time_us"].as_u64() > Some(0),
        "{m}"
    );
    assert!(
        m["api_server"]["process_startup_time_cpu_us"].as_u64() >= Some(5),
        "{m}"
    );
    expect(
        &sock,
        "PUT",
        "/actions",
        Some(r#"{"action_type": "FlushMetrics"}"#),
        204,
    );
    assert_eq!(
        std::fs::read_to_string(&metrics)
            .expect("metrics")
            .lines()
            .count(),
        1
    );
    ferry.signal(libc::SIGTERM);
    let (_, _, stderr) = ferry.wait(BOOT);
    // Warnings for what ferry lacks, in Firecracker's line format with level and origin.
    let warned = logged(&stderr, "--boot-timer");
    assert!(
        warned.contains("[flags-1:main:WARN:vmm/src/main.rs:"),
        "{warned}"
    );
    assert!(
        stderr.contains("--mmds-size-limit: ferry has no MMDS yet"),
        "{stderr}"
    );

    for (args, error) in [
        (&["--id", "bad id"][..], "invalid instance id \"bad id\""),
        (&["--level", "Loud"][..], "invalid log level \"Loud\""),
        (&["--metadata", "/x.json"][..], "ferry has no MMDS"),
        (
            &["--no-seccomp", "--seccomp-filter", "/x"][..],
            "cannot be used with",
        ),
        (
            &["--seccomp-filter", "/nonexistent"][..],
            "cannot read the seccomp filter file /nonexistent",
        ),
    ] {
        let out = std::process::Command::new(common::ferry_binary())
            .args([
                "--api-sock",
                dir.path().join("x.sock").to_str().expect("utf-8"),
            ])
            .args(args)
            .output()
            .expect("run ferry");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was taken");
        assert!(stderr.contains(error), "{args:?}: {stderr}");
    }
}

/// Sends `n` requests, each on its own connection, for their log lines.
fn requests(sock: &Path, n: usize) {
    for _ in 0..n {
        let mut s = UnixStream::connect(sock).expect("connect");
        // A server that blocks on its log must fail the test, not hang it.
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        s.write_all(b"GET /machine-config HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .expect("send");
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        assert!(
            out.starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&out)
        );
    }
}

/// What is in the FIFO now, without waiting.
fn read_now(fifo: &mut std::fs::File) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 65536];
    while let Ok(n) = fifo.read(&mut buf) {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    String::from_utf8(out).expect("utf-8")
}

#[test]
fn test_logger_writes_firecracker_lines_to_a_fifo_and_a_file_and_never_blocks() {
    let dir = TempDir::new("fc-logger");
    let (mut ferry, sock) = spawn_api(&dir, &["--id", "vm-log"]);
    let fifo_path = dir.path().join("log.fifo");
    let c = std::ffi::CString::new(fifo_path.to_str().expect("utf-8")).expect("path");
    // SAFETY: mkfifo reads a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let mut fifo = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo_path)
        .expect("open the FIFO");
    // The smallest pipe: a reader that stops fills it after a few dozen lines.
    // SAFETY: F_SETPIPE_SZ takes an int size.
    let size = unsafe { libc::fcntl(fifo.as_raw_fd(), libc::F_SETPIPE_SZ, 4096) };
    assert!(size >= 4096);

    let logger = json!({ "log_path": fifo_path, "level": "Info", "show_level": true });
    expect(&sock, "PUT", "/logger", Some(&logger.to_string()), 204);
    start_guest(&sock);
    ferry.expect_line("pass 1 ok", BOOT);
    let text = read_now(&mut fifo);
    let line = logged(&text, "url=\"/actions\"");
    assert!(
        line.contains(" [vm-log:api:INFO] api request method=\"PUT\""),
        "{line}"
    );

    // Nobody reads any more: the FIFO fills, lines are dropped and counted, and the VMM
    // and its API go on.
    requests(&sock, 200);
    let t = Instant::now();
    expect(&sock, "PATCH", "/vm", Some(r#"{"state": "Paused"}"#), 204);
    expect(&sock, "PATCH", "/vm", Some(r#"{"state": "Resumed"}"#), 204);
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    let m = expect(&sock, "GET", "/metrics", None, 200);
    assert!(m["logger"]["missed_log_count"].as_u64() > Some(0), "{m}");
    let seen = ferry.console().len();
    ferry.expect_line(&format!("pass {} ok", seen + 3), BOOT);
    // What the FIFO holds is whole lines only.
    let held = read_now(&mut fifo);
    assert!(held.ends_with('\n'));
    assert!(held.lines().all(has_firecracker_time), "{held}");

    // To a file, with the origin and without the level.
    let file = dir.path().join("ferry.log");
    let logger = json!({ "log_path": file, "level": "Warning", "show_level": false, "show_log_origin": true });
    expect(&sock, "PUT", "/logger", Some(&logger.to_string()), 204);
    let logger = json!({ "level": "info" });
    expect(&sock, "PUT", "/logger", Some(&logger.to_string()), 204);
    requests(&sock, 1);
    let text = std::fs::read_to_string(&file).expect("log file");
    let line = text.lines().last().expect("a line");
    assert!(has_firecracker_time(line), "{line}");
    assert!(line.contains(" [vm-log:api:api/src/server.rs:"), "{line}");
    assert!(
        line.contains("] api request method=\"GET\" url=\"/machine-config\""),
        "{line}"
    );

    // Bad requests are refused, naming the problem; nothing changes.
    for (body, error) in [
        (r#"{"level": "Loud"}"#, "level: invalid log level \"Loud\""),
        (
            r#"{"log_path": "/nonexistent/dir/x"}"#,
            "cannot open the log file /nonexistent/dir/x",
        ),
        (r#"{"colour": true}"#, "unknown field `colour`"),
    ] {
        let m = refused(&sock, "PUT", "/logger", Some(body));
        assert!(m.contains(error), "{m}");
    }
    // Each refused request was logged there too, and one more request is.
    requests(&sock, 1);
    let now = std::fs::read_to_string(&file).expect("log");
    assert_eq!(now.lines().count(), text.lines().count() + 4, "{now}");
}

#[test]
fn test_metrics_flush_writes_one_json_line_with_firecrackers_groups() {
    let dir = TempDir::new("fc-metrics");
    let config = dir.write(
        "vm.json",
        guest_config(1, 64, "workload=verify size=8M passes=1000000"),
    );
    let (mut ferry, sock) = spawn_api(&dir, &["--config-file", config.to_str().expect("utf-8")]);
    ferry.expect_line("pass 2 ok", BOOT);
    let path = dir.path().join("metrics.json");
    let body = json!({ "metrics_path": path }).to_string();
    expect(&sock, "PUT", "/metrics", Some(&body), 204);
    let again = refused(&sock, "PUT", "/metrics", Some(&body));
    assert!(again.contains("already configured"), "{again}");
    expect(
        &sock,
        "PUT",
        "/actions",
        Some(r#"{"action_type": "FlushMetrics"}"#),
        204,
    );
    let text = std::fs::read_to_string(&path).expect("metrics file");
    assert_eq!(text.lines().count(), 1, "{text}");
    let first: serde_json::Value = serde_json::from_str(text.trim()).expect("one JSON object");
    for key in [
        "utc_timestamp_ms",
        "api_server",
        "block",
        "net",
        "get_api_requests",
        "put_api_requests",
        "patch_api_requests",
        "logger",
        "seccomp",
        "uart",
        "vcpu",
        "vmm",
    ] {
        assert!(first.get(key).is_some(), "no {key} in {first}");
    }
    assert_eq!(first["put_api_requests"]["metrics_fails"], 1, "{first}");
    assert_eq!(first["seccomp"]["num_faults"], 0);
    let exits = first["vcpu"]["exit_io_out"].as_u64().expect("exit_io_out");
    assert!(exits > 0);

    // The second line counts what happened since the first, as Firecracker's do.
    let seen = ferry.console().len();
    ferry.expect_line(&format!("pass {} ok", seen + 2), BOOT);
    expect(
        &sock,
        "PUT",
        "/actions",
        Some(r#"{"action_type": "FlushMetrics"}"#),
        204,
    );
    let total = expect(&sock, "GET", "/metrics", None, 200)["vcpu"]["exit_io_out"]
        .as_u64()
        .expect("total");
    let text = std::fs::read_to_string(&path).expect("metrics file");
    let second: serde_json::Value =
        serde_json::from_str(text.lines().nth(1).expect("a second line")).expect("JSON");
    let delta = second["vcpu"]["exit_io_out"].as_u64().expect("exit_io_out");
    assert!(
        delta > 0 && delta < total && exits + delta <= total,
        "{exits} {delta} {total}"
    );
    assert_eq!(second["put_api_requests"]["actions_count"], 1, "{second}");
}

/// A BPF program that traps `nr` and allows everything else, as `u64`s in
/// `sock_filter` layout.
fn trap_only(nr: i64) -> Vec<u64> {
    let ins = |code: u64, jt: u64, jf: u64, k: u64| code | jt << 16 | jf << 24 | k << 32;
    vec![
        ins(0x20, 0, 0, 0),                                            // ld [nr]
        ins(0x15, 0, 1, u64::try_from(nr).expect("a syscall number")), // jeq nr
        ins(0x06, 0, 0, 0x0003_0000),                                  // ret TRAP
        ins(0x06, 0, 0, 0x7fff_0000),                                  // ret ALLOW
    ]
}

/// A filter map in the layout of Firecracker's `seccompiler-bin` output.
fn filter_file(map: &[(&str, Vec<u64>)]) -> Vec<u8> {
    let mut out = (map.len() as u64).to_le_bytes().to_vec();
    for (key, code) in map {
        out.extend((key.len() as u64).to_le_bytes());
        out.extend(key.as_bytes());
        out.extend((code.len() as u64).to_le_bytes());
        for i in code {
            out.extend(i.to_le_bytes());
        }
    }
    out
}

#[test]
fn test_every_thread_is_confined_by_default() {
    let dir = TempDir::new("fc-seccomp");
    let (mut ferry, sock) = spawn_api(&dir, &[]);
    start_guest(&sock);
    ferry.expect_line("pass 1 ok", BOOT);
    expect(&sock, "PATCH", "/vm", Some(r#"{"state": "Paused"}"#), 204);
    expect(&sock, "PATCH", "/vm", Some(r#"{"state": "Resumed"}"#), 204);
    let modes = seccomp_modes(ferry.pid());
    for name in ["ferry", "api", "console", "vcpu0", "vcpu1"] {
        assert!(
            modes.iter().any(|(n, _)| n == name),
            "no {name} in {modes:?}"
        );
    }
    // Kernel threads KVM starts for the VM (`kvm-nx-lpage-recovery`) show the mode of
    // whichever thread they were copied from: only ferry's own count.
    let ours: Vec<_> = modes
        .iter()
        .filter(|(n, _)| !n.starts_with("kvm-"))
        .collect();
    assert!(ours.iter().all(|(_, m)| *m == 2), "{modes:?}");
}

#[test]
fn test_a_forbidden_syscall_ends_ferry_naming_thread_and_syscall() {
    let dir = TempDir::new("fc-trap");
    // Firecracker's three categories; the vCPU's filter forbids ioctl, which its first
    // KVM_RUN makes.
    // `ret ALLOW`.
    let allow = vec![0x06 | 0x7fff_0000 << 32];
    let file = dir.write(
        "filters.bin",
        filter_file(&[
            ("vmm", allow.clone()),
            ("api", allow),
            ("vcpu", trap_only(libc::SYS_ioctl)),
        ]),
    );
    let config = dir.write(
        "vm.json",
        guest_config(1, 64, "workload=verify size=8M passes=1"),
    );
    let ferry = Ferry::spawn_args(&[
        "--no-api".as_ref(),
        "--config-file".as_ref(),
        config.as_os_str(),
        "--seccomp-filter".as_ref(),
        file.as_os_str(),
    ]);
    let (status, _, stderr) = ferry.wait(BOOT);
    assert_eq!(status.code(), Some(148), "{stderr}");
    let line = logged(&stderr, "bad syscall");
    assert!(
        line.contains("[anonymous-instance:vcpu0] Shutting down VM after intercepting a bad syscall (16: ioctl) on thread vcpu0"),
        "{line}"
    );

    // A file that is not a filter map is refused before anything runs.
    let junk = dir.write("junk.bin", b"not a filter");
    let out = std::process::Command::new(common::ferry_binary())
        .args(["--no-api", "--config-file"])
        .arg(&config)
        .arg("--seccomp-filter")
        .arg(&junk)
        .output()
        .expect("run ferry");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("is not a compiled filter map"), "{stderr}");
}

/// A config file's `logger` and `metrics` sections, as Firecracker's; metrics reach
/// their file every 60 s without a `FlushMetrics`, as Firecracker's do.
#[test]
fn test_config_file_logger_and_metrics_and_the_minute_flush() {
    let dir = TempDir::new("fc-metrics-timer");
    let path = dir.path().join("metrics.json");
    let log = dir.path().join("ferry.log");
    let mut config: serde_json::Value =
        serde_json::from_str(&guest_config(1, 64, "workload=idle")).expect("JSON");
    config["logger"] = json!({ "log_path": log, "level": "Info", "show_level": true });
    config["metrics"] = json!({ "metrics_path": path });
    let file = dir.write("vm.json", config.to_string());
    // A level that is none of Firecracker's is refused, naming the field.
    config["logger"]["level"] = json!("Loud");
    let bad = dir.write("bad.json", config.to_string());
    let out = std::process::Command::new(common::ferry_binary())
        .args(["--no-api", "--config-file"])
        .arg(&bad)
        .output()
        .expect("run ferry");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("logger.level: invalid log level \"Loud\""),
        "{stderr}"
    );

    let (ferry, sock) = spawn_api(&dir, &["--config-file", file.to_str().expect("utf-8")]);
    let start = Instant::now();
    let lines = loop {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        if !text.is_empty() || start.elapsed() > Duration::from_secs(75) {
            break text;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let waited = start.elapsed();
    assert_eq!(lines.lines().count(), 1, "after {waited:?}: {lines:?}");
    assert!(
        waited > Duration::from_secs(50),
        "a line came after {waited:?}"
    );
    let line: serde_json::Value = serde_json::from_str(lines.trim()).expect("JSON");
    assert!(line["utc_timestamp_ms"].as_u64() > Some(0), "{line}");
    assert!(line.get("vcpu").is_some(), "{line}");
    // The API still answers: the timer runs on the VMM thread's loop.
    expect(&sock, "GET", "/", None, 200);
    ferry.signal(libc::SIGTERM);
    let (status, _, stderr) = ferry.wait(BOOT);
    assert!(status.success(), "{status}: {stderr}");
    let text = std::fs::read_to_string(&log).expect("the log file");
    let line = logged(&text, "url=\"/\"");
    assert!(
        line.contains("[anonymous-instance:api:INFO] api request"),
        "{line}"
    );
    assert!(
        !stderr.contains("api request"),
        "the log went to the file: {stderr}"
    );
}
