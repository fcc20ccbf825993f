//! A console that nobody reads: the guest prints steadily into a pipe whose reader has
//! stopped. Pause, resume and SIGTERM must still work at their usual speed, and the
//! guest must go on.

mod common;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{curl, guest_config, wait_for_socket, TempDir};

fn metric(sock: &std::path::Path, key: &str) -> u64 {
    let (status, m) = curl(sock, "GET", "/metrics", None);
    assert_eq!(status, 200, "{m}");
    m["uart"][key]
        .as_u64()
        .unwrap_or_else(|| panic!("uart.{key} in {m}"))
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    // Filling the console takes some 70,000 port writes, slow on a loaded host.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn test_a_console_nobody_reads_never_wedges_the_vm() {
    let dir = TempDir::new("console-stuck");
    let sock = dir.path().join("api.sock");
    // 64 KiB verified per pass: the guest prints a line every few microseconds.
    let config = dir.write("vm.json", guest_config(1, 64, "workload=verify size=64K"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .arg("--api-sock")
        .arg(&sock)
        .arg("--config-file")
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn ferry");
    // Held open and not read: the pipe fills, as when an orchestrator's log reader stops.
    let mut stdout = child.stdout.take().expect("stdout");
    // The smallest pipe: filling it takes the guest a page, not 64 KiB.
    {
        use std::os::fd::AsRawFd;
        // SAFETY: F_SETPIPE_SZ on a pipe fd this process holds; no memory is passed.
        unsafe { libc::fcntl(stdout.as_raw_fd(), libc::F_SETPIPE_SZ, 4096) };
    }
    wait_for_socket(&sock);
    wait_until("the console to drop bytes", || {
        metric(&sock, "missed_write_count") > 0
    });

    for _ in 0..5 {
        let started = Instant::now();
        let (status, body) = curl(&sock, "PATCH", "/vm", Some(r#"{"state": "Paused"}"#));
        assert_eq!(status, 204, "pause: {body}");
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "pause took {:?}",
            started.elapsed()
        );
        assert_eq!(curl(&sock, "GET", "/", None).1["state"], "Paused");
        let (status, body) = curl(&sock, "PATCH", "/vm", Some(r#"{"state": "Resumed"}"#));
        assert_eq!(status, 204, "resume: {body}");
        assert_eq!(curl(&sock, "GET", "/", None).1["state"], "Running");
    }

    // The guest goes on after the resumes: reading again, fresh lines arrive, all ok.
    let written = metric(&sock, "write_bytes");
    wait_until("the guest to print more", || {
        metric(&sock, "write_bytes") > written + 10_000
    });
    let mut text = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    let reading = Instant::now();
    while reading.elapsed() < Duration::from_millis(500) {
        let n = stdout.read(&mut buf).expect("read console");
        text.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&text);
    assert!(!text.contains("corrupt"), "the guest found corruption");
    let late_passes: Vec<u64> = text
        .lines()
        .filter_map(|l| l.strip_prefix("pass ")?.strip_suffix(" ok")?.parse().ok())
        .collect();
    assert!(
        late_passes.len() > 100,
        "passes kept coming: {late_passes:?}"
    );

    // Stop reading again, and let the pipe fill.
    let dropped = metric(&sock, "missed_write_count");
    wait_until("the pipe to fill again", || {
        metric(&sock, "missed_write_count") > dropped
    });
    let started = Instant::now();
    // SAFETY: sends a signal to our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            assert!(status.success(), "{status}");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "ferry was still alive 1 s after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}
