//! `ferryctl` drives a real ferry through its socket and prints JSON.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{guest_image, wait_for_socket, Ferry, TempDir};

/// ferryctl is built next to ferry (`cargo build --workspace --bins`, as scripts/test.sh does).
fn ferryctl_bin() -> PathBuf {
    let path = Path::new(env!("CARGO_BIN_EXE_ferry")).with_file_name("ferryctl");
    assert!(
        path.is_file(),
        "{} is missing: build the workspace's binaries first",
        path.display()
    );
    path
}

fn ferryctl(sock: &Path, args: &[&str]) -> (i32, serde_json::Value, String) {
    let out = Command::new(ferryctl_bin())
        .arg("--sock")
        .arg(sock)
        .args(args)
        .output()
        .expect("run ferryctl");
    let json = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    (
        out.status.code().unwrap_or(-1),
        json,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn ok(sock: &Path, args: &[&str]) -> serde_json::Value {
    let (code, json, stderr) = ferryctl(sock, args);
    assert_eq!(code, 0, "ferryctl {args:?}: {stderr}");
    json
}

#[test]
fn test_ferryctl_configures_starts_pauses_resumes() {
    let dir = TempDir::new("ferryctl");
    let sock = dir.path().join("api.sock");
    let mut ferry = Ferry::spawn_args(&["--api-sock".as_ref(), sock.as_os_str()]);
    wait_for_socket(&sock);
    let guest = guest_image();

    assert_eq!(ok(&sock, &["info"])["state"], "Not started");
    assert_eq!(
        ok(
            &sock,
            &["machine-config", "--vcpus", "2", "--mem-mib", "96"]
        ),
        serde_json::json!({})
    );
    ok(
        &sock,
        &[
            "boot-source",
            "--kernel",
            guest.to_str().expect("utf-8"),
            "--args",
            "console=ttyS0 workload=verify size=8M",
        ],
    );
    assert_eq!(ok(&sock, &["config"])["machine-config"]["mem_size_mib"], 96);
    ok(&sock, &["start"]);
    ferry.expect_line("pass 1 ok", Duration::from_secs(20));
    assert_eq!(ok(&sock, &["info"])["state"], "Running");
    ok(&sock, &["pause"]);
    assert_eq!(ok(&sock, &["info"])["state"], "Paused");
    ok(&sock, &["resume"]);
    assert_eq!(ok(&sock, &["info"])["state"], "Running");
    assert!(ok(&sock, &["metrics"])["vcpu"]["exit_io_out"].as_u64() > Some(0));
    assert!(ok(&sock, &["version"])["ferry_version"].is_string());

    let (code, _, stderr) = ferryctl(&sock, &["request", "GET", "/nope"]);
    assert_eq!(code, 1);
    assert!(
        stderr.contains("HTTP 404") && stderr.contains("no such resource: /nope"),
        "{stderr}"
    );
    let (code, _, stderr) = ferryctl(&sock, &["pause"]);
    assert_eq!(code, 0, "{stderr}");
    let (code, _, stderr) = ferryctl(&sock, &["pause"]);
    assert_eq!(code, 1);
    assert!(
        stderr.contains("cannot go from Paused to Paused"),
        "{stderr}"
    );
    let (code, _, stderr) = ferryctl(&dir.path().join("missing.sock"), &["info"]);
    assert_eq!(code, 1);
    assert!(stderr.contains("missing.sock"), "{stderr}");
}

#[test]
fn test_ferryctl_snapshot_create_and_load() {
    let dir = TempDir::new("ferryctl-snap");
    let sock = dir.path().join("a.sock");
    let mut ferry = Ferry::spawn_args(&["--api-sock".as_ref(), sock.as_os_str()]);
    wait_for_socket(&sock);
    let guest = guest_image();
    ok(
        &sock,
        &["machine-config", "--vcpus", "1", "--mem-mib", "64"],
    );
    ok(
        &sock,
        &[
            "boot-source",
            "--kernel",
            guest.to_str().expect("utf-8"),
            "--args",
            "console=ttyS0 workload=verify start=16M size=8M",
        ],
    );
    ok(&sock, &["start"]);
    ferry.expect_line("pass 2 ok", Duration::from_secs(20));
    let state = dir.path().join("vm.state");
    let mem = dir.path().join("vm.mem");
    let (s, m) = (state.to_str().expect("utf-8"), mem.to_str().expect("utf-8"));
    let (code, _, stderr) = ferryctl(&sock, &["snapshot", "create", "--state", s, "--mem", m]);
    assert_eq!(code, 1);
    assert!(stderr.contains("must be paused"), "{stderr}");
    // A live one of the running VM; it runs on.
    let (ls, lm) = (dir.path().join("live.state"), dir.path().join("live.mem"));
    let (ls, lm) = (ls.to_str().expect("utf-8"), lm.to_str().expect("utf-8"));
    ok(
        &sock,
        &["snapshot", "create", "--live", "--state", ls, "--mem", lm],
    );
    assert_eq!(ok(&sock, &["info"])["state"], "Running");
    assert!(std::path::Path::new(lm).exists() && std::path::Path::new(ls).exists());
    ok(&sock, &["pause"]);
    ok(&sock, &["snapshot", "create", "--state", s, "--mem", m]);
    drop(ferry);

    let sock = dir.path().join("b.sock");
    let mut ferry = Ferry::spawn_args(&["--api-sock".as_ref(), sock.as_os_str()]);
    wait_for_socket(&sock);
    ok(
        &sock,
        &["snapshot", "load", "--state", s, "--mem", m, "--resume"],
    );
    assert_eq!(ok(&sock, &["info"])["state"], "Running");
    let line = ferry.expect_line("pass ", Duration::from_secs(20));
    assert!(!line.contains("corrupt"), "{line}");
    ferry.expect_line(" ok", Duration::from_secs(20));
}

#[test]
fn test_ferryctl_receives_and_migrates_with_a_summary() {
    let dir = TempDir::new("ferryctl-mig");
    let (src, dst) = (dir.path().join("src.sock"), dir.path().join("dst.sock"));
    let cfg = dir.write(
        "vm.json",
        common::guest_config(1, 128, "workload=verify start=16M size=16M"),
    );
    let mut source = Ferry::spawn_args(&[
        "--api-sock".as_ref(),
        src.as_os_str(),
        "--config-file".as_ref(),
        cfg.as_os_str(),
    ]);
    let mut dest = Ferry::spawn_args(&["--api-sock".as_ref(), dst.as_os_str()]);
    wait_for_socket(&src);
    wait_for_socket(&dst);
    source.expect_line("pass 2 ok", Duration::from_secs(20));
    let listen = format!("unix:{}", dir.path().join("mig.sock").display());
    ok(&dst, &["receive", "--listen", &listen]);
    let out = Command::new(ferryctl_bin())
        .arg("--sock")
        .arg(&src)
        .args(["migrate", "--to", &listen, "--verify", "--dest-sock"])
        .arg(&dst)
        .output()
        .expect("run ferryctl");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary = stdout.lines().last().unwrap_or_default();
    assert!(
        summary.starts_with("migrated: ")
            && summary.contains(" ms, downtime ")
            && summary.ends_with(" rounds"),
        "{summary}"
    );
    assert!(!summary.contains("unknown"), "{summary}");
    let (status, _, _) = source.wait(Duration::from_secs(10));
    assert!(status.success());
    dest.expect_line("pass ", Duration::from_secs(10));
    assert_eq!(ok(&dst, &["migration"])["state"], "completed");
    // Nothing runs any more on the source's socket; on the destination, a cancel is
    // refused with the server's message.
    let (code, _, stderr) = ferryctl(&dst, &["cancel"]);
    assert_eq!(code, 1);
    assert!(stderr.contains("no migration is running"), "{stderr}");
}
