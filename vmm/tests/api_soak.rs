//! 10,000 mixed valid and invalid requests on 8 concurrent connections while the guest
//! runs. ferry must answer every one, the guest must keep verifying its memory, and
//! ferry's own memory must not grow.

mod common;

use std::path::Path;
use std::time::Duration;

use api::client::Client;
use common::{guest_image, wait_for_socket, Ferry, TempDir};
use serde_json::json;

const CONNECTIONS: usize = 8;
const REQUESTS: usize = 10_000;

/// ferry's own resident memory in KiB: guest RAM (shmem) excluded.
fn own_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("no {name}"))
    };
    field("VmRSS:") - field("RssShmem:")
}

/// One request of the mix, by its number and connection, with the one status it must
/// get and, for errors, the message. Only connection 0 pauses and resumes, so the VM's
/// state, and so every answer, is known: pause, a second pause (refused), resume.
fn mixed(
    i: usize,
    connection: usize,
) -> (
    &'static str,
    &'static str,
    Option<&'static str>,
    u16,
    Option<&'static str>,
) {
    const PAUSE: Option<&str> = Some(r#"{"state": "Paused"}"#);
    match (i % 10, connection) {
        (0, _) => ("GET", "/", None, 200, None),
        (1, _) => ("GET", "/metrics", None, 200, None),
        (2, _) => ("GET", "/machine-config", None, 200, None),
        (3, _) => (
            "PUT",
            "/machine-config",
            Some(r#"{"vcpu_count": 1, "mem_size_mib": 64}"#),
            400,
            Some("the update operation is not allowed after boot"),
        ),
        (4, _) => (
            "PUT",
            "/boot-source",
            Some(r#"{"kernel_image_path": 12"#),
            400,
            Some("invalid JSON body: kernel_image_path: invalid type: integer `12`, expected path string at line 1 column 24"),
        ),
        (5, _) => ("GET", "/nope", None, 404, Some("no such resource: /nope")),
        (6, _) => (
            "DELETE",
            "/",
            None,
            405,
            Some("method DELETE is not allowed on /; allowed: GET"),
        ),
        (7, 0) => ("PATCH", "/vm", PAUSE, 204, None),
        (8, 0) => (
            "PATCH",
            "/vm",
            PAUSE,
            400,
            Some("cannot go from Paused to Paused"),
        ),
        (9, 0) => ("PATCH", "/vm", Some(r#"{"state": "Resumed"}"#), 204, None),
        _ => ("GET", "/vm/config", None, 200, None),
    }
}

fn hammer(sock: &Path, connections: usize, per_connection: usize) -> usize {
    let threads: Vec<_> = (0..connections)
        .map(|t| {
            let sock = sock.to_owned();
            std::thread::spawn(move || {
                let mut client = Client::connect(&sock).expect("connect");
                for i in 0..per_connection {
                    let (method, path, body, status, message) = mixed(i + t, t);
                    let r = client.request(method, path, body).expect("answered");
                    assert_eq!(r.status, status, "{method} {path}: {}", r.text());
                    if let Some(message) = message {
                        assert_eq!(r.json()["fault_message"], message, "{method} {path}");
                    }
                }
                per_connection
            })
        })
        .collect();
    threads
        .into_iter()
        .map(|t| t.join().expect("client thread"))
        .sum()
}

#[test]
fn test_soak_10000_mixed_requests_on_8_connections() {
    let dir = TempDir::new("soak");
    let sock = dir.path().join("api.sock");
    let mut ferry = Ferry::spawn_args(&["--api-sock".as_ref(), sock.as_os_str()]);
    wait_for_socket(&sock);
    let mut c = Client::connect(&sock).expect("connect");
    let boot = json!({
        "kernel_image_path": guest_image(),
        "boot_args": "console=ttyS0 workload=verify size=16M rate=100000",
    });
    assert_eq!(
        c.request("PUT", "/boot-source", Some(&boot.to_string()))
            .expect("boot")
            .status,
        204
    );
    assert_eq!(
        c.request(
            "PUT",
            "/actions",
            Some(r#"{"action_type": "InstanceStart"}"#)
        )
        .expect("start")
        .status,
        204
    );
    ferry.expect_line("pass 2 ok", Duration::from_secs(20));

    // Warm up every path and every connection thread before measuring memory.
    hammer(&sock, CONNECTIONS, 50);
    let rss_before = own_rss_kib(ferry.pid());
    let answered = hammer(&sock, CONNECTIONS, REQUESTS / CONNECTIONS);
    assert_eq!(answered, REQUESTS);
    let rss_after = own_rss_kib(ferry.pid());

    // Connection 0 ended on a resume.
    let info = c.request("GET", "/", None).expect("info");
    assert_eq!(info.json()["state"], "Running", "{}", info.text());
    // The guest still verifies its memory, and every pass it reported was clean.
    let seen = ferry.console().len();
    ferry.expect_line(" ok", Duration::from_secs(20));
    ferry.expect_line(" ok", Duration::from_secs(20));
    assert!(ferry.console().len() > seen);
    assert!(ferry.console().iter().all(|l| !l.contains("corrupt")));
    assert!(
        rss_after <= rss_before + 1024,
        "ferry's own RSS grew from {rss_before} KiB to {rss_after} KiB over {REQUESTS} requests"
    );
}
