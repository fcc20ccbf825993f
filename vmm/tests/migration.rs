//! Live migration end to end: real `ferry` processes on real sockets, the test guest's
//! `verify` workload (every page carries its pass number, checked every pass), and
//! `"verify": true` so that ferry also compares every page on both sides. The
//! destination proves the guest's memory by continuing its passes where the source
//! stopped.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::api_vm::{assert_continues_after, config, last_pass, Vm, BOOT};
use common::{assert_disk_holds_pass, curl, ferry_binary, TempDir, TestTap};
use serde_json::{json, Value};

/// A port on 127.0.0.1 that nothing listens on right now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

fn status(vm: &Vm) -> Value {
    let (code, body) = curl(&vm.sock, "GET", "/migration", None);
    assert_eq!(code, 200, "GET /migration: {body}");
    body
}

/// Polls `GET /migration` until the migration is no longer active; returns its status.
fn wait_ended(vm: &Vm, timeout: Duration) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let s = status(vm);
        if s["state"] != "active" {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "still active after {timeout:?}: {s}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The source's highest round seen while it runs, until it exits.
fn watch_source(vm: &Vm, timeout: Duration) -> u64 {
    let deadline = Instant::now() + timeout;
    let mut round = 0;
    while Instant::now() < deadline {
        let (code, body) = curl(&vm.sock, "GET", "/migration", None);
        if code != 200 {
            break;
        }
        round = round.max(body["round"].as_u64().unwrap_or(0));
        if body["state"] != "active" {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    round
}

fn verify_guest(dir: &TempDir, name: &str) -> Vm {
    let cfg = config("workload=verify start=16M size=32M", 2, 256, json!({}));
    let mut vm = Vm::boot(dir, name, &cfg);
    vm.ferry.expect_line("pass 3 ok", BOOT);
    vm
}

fn receive(dst: &Vm, listen: &str) {
    dst.expect(
        "PUT",
        "/migration/receive",
        json!({ "listen": listen }),
        204,
    );
}

/// Asserts that the source ended with 0 and that the destination's guest goes on from
/// the pass it was in, verifying for `run`; returns the destination's status.
fn assert_moved(src: Vm, dst: &mut Vm, run: Duration) -> Value {
    let (code, console, err) = src.ferry.wait(Duration::from_secs(30));
    assert!(
        code.success(),
        "the source must exit 0 after a migration: {code}\n{err}"
    );
    assert!(
        !console.iter().any(|l| l.contains("corrupt")),
        "{console:#?}"
    );
    let s = wait_ended(dst, Duration::from_secs(30));
    assert_eq!(s["state"], "completed", "{s}");
    assert!(s["downtime_ms"].as_f64().is_some(), "{s}");
    assert_continues_after(dst, &console, run);
    let (_, info) = curl(&dst.sock, "GET", "/", None);
    assert_eq!(info["state"], "Running");
    s
}

fn precopy(tracking: &str) {
    let dir = TempDir::new(&format!("mig-{tracking}"));
    let src = verify_guest(&dir, "src");
    let mut dst = Vm::fresh(&dir, "dst");
    let port = free_port();
    receive(&dst, &format!("tcp:127.0.0.1:{port}"));
    // By name: the sending thread resolves it under its seccomp filter.
    src.expect(
        "PUT",
        "/migration/send",
        json!({ "destination": format!("tcp:localhost:{port}"), "tracking": tracking, "verify": true }),
        204,
    );
    let s = assert_moved(src, &mut dst, Duration::from_secs(5));
    assert!(s["transferred_bytes"].as_u64() > Some(32 << 20), "{s}");
    // The destination shows the configuration the VM came with.
    let (_, cfg) = curl(&dst.sock, "GET", "/vm/config", None);
    assert_eq!(cfg["machine-config"]["mem_size_mib"], 256);
}

#[test]
fn test_precopy_over_tcp_with_uffd_async() {
    precopy("uffd-async");
}

#[test]
fn test_precopy_over_tcp_with_uffd_sync() {
    precopy("uffd-sync");
}

#[test]
fn test_precopy_over_tcp_with_kvm_dirty_log() {
    precopy("kvm-dirty-log");
}

#[test]
fn test_local_migration_hands_memory_to_a_second_copy_of_the_binary() {
    let dir = TempDir::new("mig-local");
    // The new ferry is another file, as when ferry upgrades itself under a guest.
    let copy = dir.path().join("ferry-new");
    std::fs::copy(ferry_binary(), &copy).expect("copy ferry");
    let src = verify_guest(&dir, "src");
    let mut dst = Vm::fresh_with(&dir, "dst", copy.as_os_str(), &[]);
    let listen = format!("unix:{}", dir.path().join("mig.sock").display());
    receive(&dst, &listen);
    // A local migration over TCP is refused: the memfd travels only on a Unix socket.
    let m = src.refused(
        "PUT",
        "/migration/send",
        json!({ "destination": "tcp:127.0.0.1:1", "local": true }),
    );
    assert!(m.contains("unix:"), "{m}");
    src.expect(
        "PUT",
        "/migration/send",
        json!({ "destination": listen, "local": true }),
        204,
    );
    let s = assert_moved(src, &mut dst, Duration::from_secs(5));
    assert_eq!(s["local"], true, "{s}");
    assert_eq!(s["transferred_bytes"], 0, "no memory is copied: {s}");
}

/// Two network namespaces joined by a veth pair, removed when dropped.
struct Netns {
    names: [String; 2],
    addrs: [String; 2],
}

impl Netns {
    fn new() -> Netns {
        let id = std::process::id() % 10_000;
        let names = [format!("fya{id}"), format!("fyb{id}")];
        let octet = id % 250 + 1;
        let addrs = [format!("10.231.{octet}.1"), format!("10.231.{octet}.2")];
        let ns = Netns { names, addrs };
        let ip = |args: &[&str]| {
            let out = Command::new("ip").args(args).output().expect("run ip");
            assert!(
                out.status.success(),
                "ip {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let (a, b) = (&ns.names[0], &ns.names[1]);
        ip(&["netns", "add", a]);
        ip(&["netns", "add", b]);
        let (va, vb) = (format!("v{a}"), format!("v{b}"));
        ip(&["link", "add", &va, "type", "veth", "peer", "name", &vb]);
        for (ns_name, dev, addr) in [(a, &va, &ns.addrs[0]), (b, &vb, &ns.addrs[1])] {
            ip(&["link", "set", dev, "netns", ns_name]);
            ip(&[
                "-n",
                ns_name,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                dev,
            ]);
            ip(&["-n", ns_name, "link", "set", dev, "up"]);
            ip(&["-n", ns_name, "link", "set", "lo", "up"]);
        }
        ns
    }

    /// `ip netns exec NAME ferry`, as a program and its prefix.
    fn exec(&self, i: usize) -> Vec<std::ffi::OsString> {
        vec![
            "netns".into(),
            "exec".into(),
            self.names[i].clone().into(),
            ferry_binary().into_os_string(),
        ]
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for n in &self.names {
            let _ = Command::new("ip").args(["netns", "del", n]).output();
        }
    }
}

/// Migrates the verify guest between two network namespaces joined by a veth pair,
/// each running its own ferry, with `body` (its destination filled in); returns the
/// destination's status.
fn between_namespaces(name: &str, port: u16, body: Value) -> Value {
    let net = Netns::new();
    let dir = TempDir::new(name);
    let cfg = config("workload=verify start=16M size=32M", 2, 256, json!({}));
    let (pa, pb) = (net.exec(0), net.exec(1));
    let pa: Vec<&std::ffi::OsStr> = pa.iter().map(|s| s.as_os_str()).collect();
    let pb: Vec<&std::ffi::OsStr> = pb.iter().map(|s| s.as_os_str()).collect();
    let mut src = Vm::boot_with(&dir, "src", &cfg, "ip".as_ref(), &pa);
    src.ferry.expect_line("pass 3 ok", BOOT);
    let mut dst = Vm::fresh_with(&dir, "dst", "ip".as_ref(), &pb);
    let endpoint = format!("tcp:{}:{port}", net.addrs[1]);
    receive(&dst, &endpoint);
    let mut body = body;
    body["destination"] = json!(endpoint);
    src.expect("PUT", "/migration/send", body, 204);
    assert_moved(src, &mut dst, Duration::from_secs(5))
}

#[test]
fn test_precopy_between_two_network_namespaces() {
    between_namespaces("mig-netns", 7400, json!({ "verify": true }));
}

#[test]
fn test_drive_and_tap_migrated_while_block_requests_run() {
    let (tap, other) = (TestTap::new("m"), TestTap::new("n"));
    let dir = TempDir::new("mig-io");
    let disk = dir.write("disk.img", vec![0u8; 8 << 20]);
    // Passes enough that the destination's guest still runs them when the test reads
    // the migration's end (about 5 ms each here): a guest that has finished ends its
    // VMM, and the API then answers 503.
    let passes = 200;
    let cfg = config(
        &format!("workload=blk passes={passes} depth=32"),
        1,
        128,
        json!({
            "drives": [{ "drive_id": "disk0", "path_on_host": disk, "is_root_device": false }],
            "network-interfaces": [{ "iface_id": "eth0", "host_dev_name": tap.0, "guest_mac": "06:00:ac:10:00:02" }],
        }),
    );
    let mut src = Vm::boot(&dir, "src", &cfg);
    src.ferry.expect_line("blk pass 2 ok", BOOT);
    let mut dst = Vm::fresh(&dir, "dst");
    let listen = format!("unix:{}", dir.path().join("mig.sock").display());
    // An override must name a device the source has.
    dst.expect(
        "PUT",
        "/migration/receive",
        json!({
            "listen": listen,
            "drive_overrides": [{ "drive_id": "disk0", "path_on_host": disk }],
            "network_overrides": [{ "iface_id": "eth0", "host_dev_name": other.0 }],
        }),
        204,
    );
    src.expect(
        "PUT",
        "/migration/send",
        json!({ "destination": listen, "verify": true }),
        204,
    );
    let s = wait_ended(&dst, Duration::from_secs(30));
    assert_eq!(s["state"], "completed", "{s}");
    let (code, console, err) = src.ferry.wait(Duration::from_secs(30));
    assert!(code.success(), "{code}: {err}");
    assert!(!console.iter().any(|l| l.contains("error")), "{console:#?}");
    // The guest finishes every pass on the destination, each read back and checked,
    // then reboots; the file holds the last pass's data.
    dst.ferry
        .expect_line(&format!("blk pass {passes} ok"), Duration::from_secs(60));
    let (code, rest, err) = dst.ferry.wait(Duration::from_secs(30));
    assert!(code.success(), "{code}: {err}");
    assert!(
        !rest
            .iter()
            .any(|l| l.contains("error") || l.contains("corrupt")),
        "{rest:#?}"
    );
    assert_disk_holds_pass(&disk, passes);
}

/// The guest on `vm` keeps verifying: a pass it had not printed before, and no
/// corruption.
fn assert_still_verifies(vm: &mut Vm) {
    // Not a drain until quiet: a guest that prints a pass every few ms is never quiet.
    let before = last_pass(vm.ferry.console());
    let line = vm.ferry.expect_line("pass ", Duration::from_secs(10));
    assert!(line.ends_with(" ok"), "{line}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let line = vm.ferry.expect_line("pass ", Duration::from_secs(10));
        assert!(line.ends_with(" ok"), "{line}");
        if last_pass(&[line]) > before + 1 || Instant::now() > deadline {
            break;
        }
    }
    assert!(
        !vm.ferry.console().iter().any(|l| l.contains("corrupt")),
        "{:#?}",
        vm.ferry.console()
    );
    let (_, info) = curl(&vm.sock, "GET", "/", None);
    assert_eq!(info["state"], "Running");
}

/// A small pseudo-random sequence, seeded and printed, so that a failure repeats.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, below: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % below
    }
}

/// A slow migration (capped to 64 MiB/s) that a test can interrupt.
fn send_slow(src: &Vm, listen: &str) {
    src.expect(
        "PUT",
        "/migration/send",
        json!({ "destination": listen, "max_bandwidth_mib_s": 64, "verify": true }),
        204,
    );
}

#[test]
fn test_killing_the_destination_at_random_moments_leaves_the_source_running() {
    let dir = TempDir::new("mig-kill-dst");
    let mut src = verify_guest(&dir, "src");
    let seed = std::process::id() as u64;
    eprintln!("seed {seed}");
    let mut rng = Lcg(seed);
    for i in 0..20 {
        let dst = Vm::fresh(&dir, &format!("dst{i}"));
        let listen = format!("unix:{}", dir.path().join(format!("mig{i}.sock")).display());
        receive(&dst, &listen);
        send_slow(&src, &listen);
        // Round 0 takes about 0.6 s at the cap, then rounds and the switch-over.
        std::thread::sleep(Duration::from_millis(rng.next(1200)));
        dst.ferry.signal(libc::SIGKILL);
        let s = wait_ended(&src, Duration::from_secs(20));
        assert_eq!(s["state"], "failed", "kill {i}: {s}");
        drop(dst);
        assert_still_verifies(&mut src);
    }
}

#[test]
fn test_killing_the_source_fails_the_destination_which_can_receive_again() {
    let dir = TempDir::new("mig-kill-src");
    let src = verify_guest(&dir, "src");
    let mut dst = Vm::fresh(&dir, "dst");
    let listen = format!("tcp:127.0.0.1:{}", free_port());
    receive(&dst, &listen);
    send_slow(&src, &listen);
    std::thread::sleep(Duration::from_millis(300));
    src.ferry.signal(libc::SIGKILL);
    drop(src);
    let s = wait_ended(&dst, Duration::from_secs(20));
    assert_eq!(s["state"], "failed", "{s}");
    assert!(s["error"].as_str().unwrap_or("").contains("closed"), "{s}");
    let (_, info) = curl(&dst.sock, "GET", "/", None);
    assert_eq!(
        info["state"], "Not started",
        "a half-received guest never runs"
    );

    // The same ferry takes the next migration.
    let src = verify_guest(&dir, "src2");
    let listen = format!("tcp:127.0.0.1:{}", free_port());
    receive(&dst, &listen);
    src.expect(
        "PUT",
        "/migration/send",
        json!({ "destination": listen, "verify": true }),
        204,
    );
    assert_moved(src, &mut dst, Duration::from_secs(2));
}

#[test]
fn test_cancel_on_either_side_leaves_the_source_running() {
    let dir = TempDir::new("mig-cancel");
    let mut src = verify_guest(&dir, "src");
    for side in ["source", "destination"] {
        let dst = Vm::fresh(&dir, &format!("dst-{side}"));
        let listen = format!("unix:{}", dir.path().join(format!("{side}.sock")).display());
        receive(&dst, &listen);
        send_slow(&src, &listen);
        std::thread::sleep(Duration::from_millis(200));
        // Nothing else changes the VM while it migrates.
        let m = src.refused("PATCH", "/vm", json!({ "state": "Paused" }));
        assert!(m.contains("a migration is running"), "{m}");
        let (cancelled, other) = if side == "source" {
            (&src, &dst)
        } else {
            (&dst, &src)
        };
        cancelled.expect("PUT", "/migration/cancel", json!({}), 204);
        let s = wait_ended(cancelled, Duration::from_secs(10));
        assert_eq!(s["state"], "cancelled", "{side}: {s}");
        let o = wait_ended(other, Duration::from_secs(10));
        assert_eq!(o["state"], "failed", "{side}: {o}");
        assert!(
            o["error"].as_str().unwrap_or("").contains("cancelled"),
            "{side}: {o}"
        );
        let (_, info) = curl(&dst.sock, "GET", "/", None);
        assert_eq!(info["state"], "Not started");
        assert_still_verifies(&mut src);
        let m = src.refused("PUT", "/migration/cancel", json!({}));
        assert!(m.contains("no migration is running"), "{m}");
    }
}

/// Forwards one connection from a source to `to`, and cuts both ways when the
/// source's next frame is of `kind` (the protocol's frame header: "FRYM", a 16-bit
/// kind, 16 reserved bits, a 64-bit length, CRC and reserved).
fn cutting_proxy(
    listener: TcpListener,
    to: SocketAddr,
    kind: u16,
) -> std::thread::JoinHandle<bool> {
    std::thread::spawn(move || {
        let (mut from_src, _) = listener.accept().expect("accept");
        let mut to_dst = TcpStream::connect(to).expect("connect");
        let (mut back_src, mut back_dst) = (
            from_src.try_clone().expect("clone"),
            to_dst.try_clone().expect("clone"),
        );
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut back_dst, &mut back_src);
        });
        while let Some((got, payload)) = read_frame(&mut from_src) {
            if got == kind {
                let _ = from_src.shutdown(Shutdown::Both);
                let _ = to_dst.shutdown(Shutdown::Both);
                return true;
            }
            if to_dst.write_all(&frame(got, &payload)).is_err() {
                return false;
            }
        }
        false
    })
}

#[test]
fn test_cutting_the_link_at_switch_over_resumes_the_source() {
    let dir = TempDir::new("mig-cut");
    let mut src = verify_guest(&dir, "src");
    let dst = Vm::fresh(&dir, "dst");
    let port = free_port();
    receive(&dst, &format!("tcp:127.0.0.1:{port}"));
    let proxy = TcpListener::bind("127.0.0.1:0").expect("bind");
    let proxy_addr = proxy.local_addr().expect("addr");
    // Kind 4 is the machine state, sent after the source paused and its last pages.
    let cut = cutting_proxy(proxy, format!("127.0.0.1:{port}").parse().expect("addr"), 4);
    src.expect(
        "PUT",
        "/migration/send",
        json!({ "destination": format!("tcp:{proxy_addr}"), "verify": true }),
        204,
    );
    assert!(cut.join().expect("proxy"), "the proxy never saw the state");
    let s = wait_ended(&src, Duration::from_secs(20));
    assert_eq!(s["state"], "failed", "{s}");
    let d = wait_ended(&dst, Duration::from_secs(20));
    assert_eq!(d["state"], "failed", "{d}");
    let (_, info) = curl(&dst.sock, "GET", "/", None);
    assert_eq!(
        info["state"], "Not started",
        "only the source may run the guest"
    );
    assert_still_verifies(&mut src);
}

/// Reads one frame (header and payload) from `from`.
fn read_frame(from: &mut TcpStream) -> Option<(u16, Vec<u8>)> {
    let mut header = [0u8; 24];
    from.read_exact(&mut header).ok()?;
    let kind = u16::from_le_bytes([header[4], header[5]]);
    let len = u64::from_le_bytes(header[8..16].try_into().ok()?);
    let mut payload = vec![0u8; usize::try_from(len).ok()?];
    from.read_exact(&mut payload).ok()?;
    Some((kind, payload))
}

/// A JSON payload with its "version" set to `version`.
fn with_version(payload: &[u8], version: u32) -> Vec<u8> {
    let mut v: Value = serde_json::from_slice(payload).expect("JSON");
    v["version"] = json!(version);
    v.to_string().into_bytes()
}

/// A source that speaks version 2 of the protocol (no Prepare) migrates into this
/// ferry, so that a running ferry of that version upgrades in place. The source here
/// is this ferry behind a proxy that makes its stream a version 2 one: Hello says 2,
/// Prepare never reaches the destination (the proxy answers it), and the
/// destination's HelloAck, which must say 2, is turned back into 3 for the source.
#[test]
fn test_a_version_2_source_migrates_into_this_ferry() {
    let dir = TempDir::new("mig-v2");
    let src = verify_guest(&dir, "src");
    let mut dst = Vm::fresh(&dir, "dst");
    let port = free_port();
    receive(&dst, &format!("tcp:127.0.0.1:{port}"));
    let proxy = TcpListener::bind("127.0.0.1:0").expect("bind");
    let proxy_addr = proxy.local_addr().expect("addr");
    let forward = std::thread::spawn(move || {
        let (mut from_src, _) = proxy.accept().expect("accept");
        let mut to_dst = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        let to_src = Arc::new(Mutex::new(from_src.try_clone().expect("clone")));
        let mut from_dst = to_dst.try_clone().expect("clone");
        let back = to_src.clone();
        let backward = std::thread::spawn(move || {
            let mut acked = None;
            while let Some((kind, payload)) = read_frame(&mut from_dst) {
                let payload = if kind == 2 {
                    let ack: Value = serde_json::from_slice(&payload).expect("HelloAck");
                    acked = ack["version"].as_u64();
                    with_version(&payload, vmm::migration::VERSION)
                } else {
                    payload
                };
                if back
                    .lock()
                    .expect("lock")
                    .write_all(&frame(kind, &payload))
                    .is_err()
                {
                    break;
                }
            }
            acked
        });
        let mut prepares = 0;
        while let Some((kind, payload)) = read_frame(&mut from_src) {
            let out = match kind {
                1 => frame(1, &with_version(&payload, 2)),
                17 => {
                    prepares += 1;
                    let _ = to_src.lock().expect("lock").write_all(&frame(18, &[]));
                    continue;
                }
                _ => frame(kind, &payload),
            };
            if to_dst.write_all(&out).is_err() {
                break;
            }
        }
        let _ = to_dst.shutdown(Shutdown::Write);
        (prepares, backward.join().expect("backward"))
    });
    src.expect(
        "PUT",
        "/migration/send",
        json!({ "destination": format!("tcp:{proxy_addr}"), "verify": true }),
        204,
    );
    assert_moved(src, &mut dst, Duration::from_secs(5));
    let (prepares, acked) = forward.join().expect("proxy");
    assert_eq!(prepares, 1, "the source sends one Prepare");
    assert_eq!(
        acked,
        Some(2),
        "the destination answers a version 2 Hello in kind"
    );
}

/// One frame of the migration protocol, built by hand.
fn frame(kind: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(24 + payload.len());
    f.extend_from_slice(b"FRYM");
    f.extend_from_slice(&kind.to_le_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    f.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    f.extend_from_slice(&[0; 4]);
    f.extend_from_slice(payload);
    f
}

/// A `Hello` for a 256 MiB test guest.
fn hello() -> Vec<u8> {
    hello_with(None)
}

/// A `Hello` that announces a fault stream with `token`, or none.
fn hello_with(token: Option<u64>) -> Vec<u8> {
    let body = json!({
        "version": vmm::migration::VERSION,
        "ferry_version": "test",
        "config": config("workload=idle", 1, 256, json!({})),
        "memory": [{ "guest_addr": 0, "size": 256u64 << 20 }],
        "local": false,
        "verify": false,
        "fault_channel": token,
    });
    frame(1, body.to_string().as_bytes())
}

/// A source that announces a fault stream and opens one with another token: the
/// destination refuses it, and can receive again.
#[test]
fn test_a_fault_stream_with_the_wrong_token_is_refused() {
    let dir = TempDir::new("pc-token");
    let dst = Vm::fresh(&dir, "dst");
    let port = free_port();
    receive(&dst, &format!("tcp:127.0.0.1:{port}"));
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.write_all(&hello_with(Some(7))).expect("hello");
    let mut ack = [0u8; 24];
    s.read_exact(&mut ack).expect("ack");
    let mut second = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    second
        .write_all(&frame(11, json!({ "token": 8 }).to_string().as_bytes()))
        .expect("channel");
    let st = wait_ended(&dst, Duration::from_secs(10));
    assert_eq!(st["state"], "failed", "{st}");
    assert!(
        st["error"]
            .as_str()
            .unwrap_or("")
            .contains("not this migration's"),
        "{st}"
    );
    let (_, info) = curl(&dst.sock, "GET", "/", None);
    assert_eq!(info["state"], "Not started");
    receive(&dst, &format!("tcp:127.0.0.1:{}", free_port()));
}

/// A pure post-copy's source lists pages to make room for, then sends a page batch,
/// which would land on the zeros made for post-copy's minor faults: the destination
/// refuses it, and can receive again.
#[test]
fn test_pages_after_room_was_made_are_refused() {
    let dir = TempDir::new("pc-room");
    let dst = Vm::fresh(&dir, "dst");
    let port = free_port();
    receive(&dst, &format!("tcp:127.0.0.1:{port}"));
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.write_all(&hello_with(Some(7))).expect("hello");
    let (kind, _) = read_frame(&mut s).expect("HelloAck");
    assert_eq!(kind, 2, "HelloAck");
    let mut faults = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    faults
        .write_all(&frame(11, json!({ "token": 7 }).to_string().as_bytes()))
        .expect("channel");
    s.write_all(&frame(17, &room(&[(0x10_0000, 1 << 20)])))
        .expect("prepare");
    let (kind, _) = read_frame(&mut s).expect("Prepared");
    assert_eq!(kind, 18, "Prepared");
    let _ = s.write_all(&pages(0x10_0000, 4096));
    let st = wait_ended(&dst, Duration::from_secs(10));
    assert_eq!(st["state"], "failed", "{st}");
    // A kernel without minor faults on shmem makes no room, takes the batch, and
    // fails this test at the stream's end instead: loudly, not by passing.
    assert!(
        st["error"]
            .as_str()
            .unwrap_or("")
            .contains("unexpected Pages"),
        "{st}"
    );
    let (_, info) = curl(&dst.sock, "GET", "/", None);
    assert_eq!(info["state"], "Not started");
    receive(&dst, &format!("tcp:127.0.0.1:{}", free_port()));
}

/// A `Prepare` body: the ranges to make room for.
fn room(ranges: &[(u64, u64)]) -> Vec<u8> {
    let mut b = (ranges.len() as u64).to_le_bytes().to_vec();
    for (addr, len) in ranges {
        b.extend_from_slice(&addr.to_le_bytes());
        b.extend_from_slice(&len.to_le_bytes());
    }
    b
}

/// A page batch of one range at `addr` of `len` bytes.
fn pages(addr: u64, len: usize) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&1u32.to_le_bytes());
    p.extend_from_slice(&[0; 4]);
    p.extend_from_slice(&addr.to_le_bytes());
    p.extend_from_slice(&(len as u64).to_le_bytes());
    p.resize(p.len() + len, 0xab);
    frame(3, &p)
}

#[test]
fn test_receiver_refuses_bad_streams_and_receives_again() {
    let dir = TempDir::new("mig-bad");
    let dst = Vm::fresh(&dir, "dst");
    let cases: Vec<(&str, Vec<Vec<u8>>, &str)> = vec![
        (
            "garbage",
            vec![b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()],
            "not a ferry migration stream",
        ),
        (
            "truncated",
            vec![hello(), pages(0x10_0000, 8192)[..1000].to_vec()],
            "closed",
        ),
        (
            "outside RAM",
            vec![hello(), pages(256 << 20, 4096)],
            "at guest address 0x10000000, which is not all guest RAM here",
        ),
        (
            "into the MMIO hole",
            vec![hello(), pages((256 << 20) - 4096, 8192)],
            "not all guest RAM here",
        ),
        (
            "flipped byte",
            vec![hello(), {
                let mut p = pages(0x10_0000, 4096);
                let last = p.len() - 1;
                p[last] ^= 1;
                p
            }],
            "checksum does not match",
        ),
        (
            "too long",
            vec![hello(), {
                let mut f = frame(3, &[]);
                f[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
                f
            }],
            "longer than its limit",
        ),
        (
            "out of order",
            vec![hello(), frame(6, &[])],
            "unexpected Ready",
        ),
        // Kind 4 is the machine state; kind 17 Prepare, which must come before it.
        (
            "state before Prepare",
            vec![hello(), frame(4, b"{}")],
            "the state came before Prepare",
        ),
        (
            "Prepare twice",
            vec![hello(), frame(17, &[]), frame(17, &[])],
            "unexpected Prepare",
        ),
        // Room is made only for a pure post-copy (this Hello announces no fault
        // stream), and the list is bounded by the guest's pages.
        (
            "room without post-copy",
            vec![hello(), frame(17, &room(&[(0, 4096)]))],
            "not a pure post-copy",
        ),
        (
            "room for too many pages",
            vec![hello(), {
                let mut f = frame(17, &[]);
                f[8..16].copy_from_slice(&(1u64 << 30).to_le_bytes());
                f
            }],
            "pages to make room for",
        ),
    ];
    for (name, writes, expected) in cases {
        let port = free_port();
        receive(&dst, &format!("tcp:127.0.0.1:{port}"));
        let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        for w in &writes {
            let _ = s.write_all(w);
        }
        if name != "garbage" {
            // The destination answers a good Hello before it reads further.
            let mut ack = [0u8; 24];
            let _ = s.read_exact(&mut ack);
        }
        let _ = s.shutdown(Shutdown::Write);
        let st = wait_ended(&dst, Duration::from_secs(10));
        assert_eq!(st["state"], "failed", "{name}: {st}");
        assert!(
            st["error"].as_str().unwrap_or("").contains(expected),
            "{name}: {st}"
        );
        let (_, info) = curl(&dst.sock, "GET", "/", None);
        assert_eq!(info["state"], "Not started", "{name}");
    }
}

/// A source that says Hello and then nothing: the destination gives up after its stall
/// timeout (10 s) with a message that says so, and can receive again.
#[test]
fn test_a_stalled_stream_fails_the_receiver() {
    let dir = TempDir::new("mig-stall");
    let dst = Vm::fresh(&dir, "dst");
    let port = free_port();
    receive(&dst, &format!("tcp:127.0.0.1:{port}"));
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.write_all(&hello()).expect("hello");
    let mut ack = [0u8; 24];
    s.read_exact(&mut ack).expect("ack");
    let started = Instant::now();
    let st = wait_ended(&dst, Duration::from_secs(30));
    assert_eq!(st["state"], "failed", "{st}");
    assert!(
        st["error"].as_str().unwrap_or("").contains("stalled"),
        "{st}"
    );
    assert!(
        started.elapsed() >= Duration::from_secs(9),
        "gave up too early"
    );
    receive(&dst, &format!("tcp:127.0.0.1:{}", free_port()));
    drop(s);
}

#[test]
fn test_migration_requests_in_the_wrong_state_are_refused() {
    let dir = TempDir::new("mig-states");
    let src = verify_guest(&dir, "src");
    let fresh = Vm::fresh(&dir, "fresh");
    // Nothing to send from a ferry with no VM, or a paused one.
    let m = fresh.refused(
        "PUT",
        "/migration/send",
        json!({ "destination": "tcp:127.0.0.1:1" }),
    );
    assert!(m.contains("not started"), "{m}");
    src.pause();
    let m = src.refused(
        "PUT",
        "/migration/send",
        json!({ "destination": "tcp:127.0.0.1:1" }),
    );
    assert!(m.contains("only a running microVM migrates"), "{m}");
    src.resume();
    // A configured or running ferry does not receive.
    let m = src.refused(
        "PUT",
        "/migration/receive",
        json!({ "listen": "tcp:127.0.0.1:0" }),
    );
    assert!(m.contains("receive into a fresh ferry"), "{m}");
    // Bad bodies name their field.
    for (body, expected) in [
        (json!({ "destination": "udp:1.2.3.4:5" }), "destination"),
        (json!({ "destination": "tcp:127.0.0.1" }), "tcp:ADDR:PORT"),
        (
            json!({ "destination": "tcp:127.0.0.1:1", "mode": "sideways" }),
            "mode",
        ),
        (
            json!({ "destination": "tcp:127.0.0.1:1", "tracking": "psychic" }),
            "tracking",
        ),
        (
            json!({ "destination": "tcp:127.0.0.1:1", "max_bandwidth_mib_s": 0 }),
            "max_bandwidth_mib_s",
        ),
    ] {
        let m = src.refused("PUT", "/migration/send", body.clone());
        assert!(m.contains(expected), "{body}: {m}");
    }
    // A second migration while one runs.
    let dst = Vm::fresh(&dir, "dst");
    let listen = format!("unix:{}", dir.path().join("m.sock").display());
    receive(&dst, &listen);
    let m = dst.refused("PUT", "/migration/receive", json!({ "listen": listen }));
    assert!(m.contains("a migration is running"), "{m}");
    send_slow(&src, &listen);
    let m = src.refused("PUT", "/migration/send", json!({ "destination": listen }));
    assert!(m.contains("a migration is running"), "{m}");
    src.expect("PUT", "/migration/cancel", json!({}), 204);
    wait_ended(&src, Duration::from_secs(10));
    // A destination nobody listens at fails the migration, and the guest runs on.
    src.expect(
        "PUT",
        "/migration/send",
        json!({ "destination": format!("unix:{}", dir.path().join("nobody.sock").display()) }),
        204,
    );
    let s = wait_ended(&src, Duration::from_secs(10));
    assert_eq!(s["state"], "failed", "{s}");
    assert!(
        s["error"].as_str().unwrap_or("").contains("cannot connect"),
        "{s}"
    );
}

#[test]
fn test_a_guest_rewriting_96_mib_at_full_speed_switches_over_within_max_rounds() {
    let dir = TempDir::new("mig-fast");
    let cfg = config("workload=verify start=16M size=96M", 2, 256, json!({}));
    let mut src = Vm::boot(&dir, "src", &cfg);
    src.ferry.expect_line("pass 3 ok", BOOT);
    let mut dst = Vm::fresh(&dir, "dst");
    let listen = format!("tcp:127.0.0.1:{}", free_port());
    receive(&dst, &listen);
    src.expect(
        "PUT",
        "/migration/send",
        json!({ "destination": listen, "verify": true, "max_rounds": 5, "downtime_limit_ms": 1 }),
        204,
    );
    let round = watch_source(&src, Duration::from_secs(60));
    assert!(round <= 6, "pre-copy went on for {round} rounds");
    let s = assert_moved(src, &mut dst, Duration::from_secs(5));
    assert!(s["downtime_ms"].as_f64() > Some(0.0), "{s}");
}

/// A post-copy or hybrid migration of the verify guest (`size` of RAM rewritten and
/// checked every pass) over loopback TCP: the guest goes on from its pass on the
/// destination while its memory arrives, and every pass there is `ok`.
fn postcopy(name: &str, body: Value, mem_mib: u64, size: &str) -> Value {
    let s = migrate_verifier(name, body, mem_mib, size);
    assert_postcopied(&s);
    s
}

/// Migrates a guest verifying `size` as `body` asks; the destination's status.
fn migrate_verifier(name: &str, body: Value, mem_mib: u64, size: &str) -> Value {
    let dir = TempDir::new(name);
    let cfg = config(
        &format!("workload=verify start=16M size={size}"),
        2,
        mem_mib,
        json!({}),
    );
    let mut src = Vm::boot(&dir, "src", &cfg);
    src.ferry.expect_line("pass 3 ok", BOOT);
    let mut dst = Vm::fresh(&dir, "dst");
    let listen = format!("tcp:127.0.0.1:{}", free_port());
    receive(&dst, &listen);
    let mut body = body;
    body["destination"] = json!(listen);
    src.expect("PUT", "/migration/send", body, 204);
    assert_moved(src, &mut dst, Duration::from_secs(5))
}

/// The destination's status after a post-copy: every page arrived, asked for or
/// pushed.
fn assert_postcopied(s: &Value) {
    assert_eq!(s["postcopy"], true, "{s}");
    assert_eq!(s["remaining_pages"], 0, "{s}");
    assert!(
        s["pages_requested"].as_u64().unwrap_or(0) + s["pages_pushed"].as_u64().unwrap_or(0) > 0,
        "{s}"
    );
}

#[test]
fn test_postcopy_of_a_guest_verifying_1_gib_over_tcp() {
    // The guest touches pages before they are pushed, so faults are served; a guest
    // starved of the CPU (the suite runs two tests at once on two cores) may touch
    // none until the push has passed it, once in a while: such a run is repeated.
    let mut s = Value::Null;
    for attempt in 0..3 {
        s = postcopy(
            &format!("pc-tcp-{attempt}"),
            json!({ "mode": "postcopy" }),
            1100,
            "1G",
        );
        assert!(s["transferred_bytes"].as_u64() > Some(1 << 30), "{s}");
        if s["postcopy_faults"].as_u64() > Some(0) {
            break;
        }
        eprintln!("attempt {attempt}: the guest faulted on no page: {s}");
    }
    assert!(s["postcopy_faults"].as_u64() > Some(0), "{s}");
    assert!(s["fault_latency_us"]["p50"].as_f64() > Some(0.0), "{s}");
}

#[test]
fn test_hybrid_over_tcp() {
    let s = postcopy(
        "pc-hybrid",
        json!({ "mode": "hybrid", "precopy_rounds": 1 }),
        256,
        // A full-speed writer, and the switch right after the first full pass: pages
        // are dirty then, so some move in post-copy (a short second round, over before
        // a starved guest wrote a page, once left none).
        "96M",
    );
    assert_eq!(s["round"], 1, "{s}");
}

/// A guest rewriting 96 MiB at full speed, which pre-copy with no downtime allowed
/// cannot converge: after `max_rounds` it falls back to post-copy instead of a stop.
#[test]
fn test_a_full_speed_writer_falls_back_to_postcopy() {
    // A guest starved of the CPU (the suite runs two tests at once on two cores) may
    // write nothing for a whole round; pre-copy has then rightly converged, with
    // nothing left to send. The fallback is what is tested: such a run is repeated.
    for attempt in 0..3 {
        let s = migrate_verifier(
            &format!("pc-fallback-{attempt}"),
            // One round: the decision follows a round that sent what the first pass
            // left, long enough for the writer to dirty pages however the host
            // schedules it (a round of a few hot pages was once over before the guest
            // wrote one).
            json!({ "max_rounds": 1, "downtime_limit_ms": 0, "postcopy_fallback": true }),
            256,
            "96M",
        );
        if s["postcopy"] == true {
            assert_postcopied(&s);
            assert!(s["round"].as_u64() >= Some(2), "{s}");
            return;
        }
        eprintln!(
            "attempt {attempt}: pre-copy converged (the guest wrote nothing in a round): {s}"
        );
    }
    panic!("a full-speed writer never fell back to post-copy in 3 attempts");
}

#[test]
fn test_postcopy_between_two_network_namespaces() {
    let s = between_namespaces("pc-netns", 7401, json!({ "mode": "postcopy" }));
    assert_postcopied(&s);
}

/// Block requests run through the switch: the device model's reads into guest RAM
/// fault on missing pages like the vCPUs do, and are served the same way.
#[test]
fn test_postcopy_with_block_requests_running() {
    let dir = TempDir::new("pc-io");
    let disk = dir.write("disk.img", vec![0u8; 8 << 20]);
    // Passes enough that the destination's guest still runs them when the test reads
    // the migration's end (about 5 ms each here): a guest that has finished ends its
    // VMM, and the API then answers 503.
    let passes = 200;
    let cfg = config(
        &format!("workload=blk passes={passes} depth=32"),
        1,
        128,
        json!({
            "drives": [{ "drive_id": "disk0", "path_on_host": disk, "is_root_device": false }],
        }),
    );
    let mut src = Vm::boot(&dir, "src", &cfg);
    src.ferry.expect_line("blk pass 2 ok", BOOT);
    let mut dst = Vm::fresh(&dir, "dst");
    let listen = format!("tcp:127.0.0.1:{}", free_port());
    receive(&dst, &listen);
    src.expect(
        "PUT",
        "/migration/send",
        json!({ "destination": listen, "mode": "postcopy" }),
        204,
    );
    let s = wait_ended(&dst, Duration::from_secs(30));
    assert_eq!(s["state"], "completed", "{s}");
    let (code, console, err) = src.ferry.wait(Duration::from_secs(30));
    assert!(code.success(), "{code}: {err}");
    assert!(!console.iter().any(|l| l.contains("error")), "{console:#?}");
    assert_postcopied(&s);
    dst.ferry
        .expect_line(&format!("blk pass {passes} ok"), Duration::from_secs(60));
    let (code, rest, err) = dst.ferry.wait(Duration::from_secs(30));
    assert!(code.success(), "{code}: {err}");
    assert!(
        !rest
            .iter()
            .any(|l| l.contains("error") || l.contains("corrupt")),
        "{rest:#?}"
    );
    assert_disk_holds_pass(&disk, passes);
}

/// Forwards a post-copy's two connections from a source to `to`, and cuts both when
/// the source has pushed `pages` page batches after the switch (its `Missing`).
fn postcopy_cutting_proxy(
    listener: TcpListener,
    to: SocketAddr,
    pages: usize,
) -> std::thread::JoinHandle<bool> {
    std::thread::spawn(move || {
        let forward = |from: TcpStream, to: TcpStream| {
            let (mut a, mut b) = (from, to);
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut a, &mut b);
            });
        };
        let (mut from_src, _) = listener.accept().expect("accept");
        let mut to_dst = TcpStream::connect(to).expect("connect");
        forward(
            to_dst.try_clone().expect("clone"),
            from_src.try_clone().expect("clone"),
        );
        // The fault stream, passed through both ways until the cut.
        let second = std::thread::spawn(move || {
            let (faults_src, _) = listener.accept().expect("accept");
            let faults_dst = TcpStream::connect(to).expect("connect");
            forward(
                faults_src.try_clone().expect("clone"),
                faults_dst.try_clone().expect("clone"),
            );
            forward(
                faults_dst.try_clone().expect("clone"),
                faults_src.try_clone().expect("clone"),
            );
            (faults_src, faults_dst)
        });
        let mut switched = false;
        let mut pushed = 0;
        while let Some((kind, payload)) = read_frame(&mut from_src) {
            switched |= kind == 12;
            if switched && kind == 3 {
                pushed += 1;
            }
            if pushed > pages {
                let (a, b) = second.join().expect("second stream");
                for s in [&from_src, &to_dst, &a, &b] {
                    let _ = s.shutdown(Shutdown::Both);
                }
                return true;
            }
            if to_dst.write_all(&frame(kind, &payload)).is_err() {
                return false;
            }
        }
        false
    })
}

/// The scheduling policy and real-time priority of `pid`'s thread named `name`
/// (`/proc`'s stat, fields 41 and 40).
fn thread_policy(pid: u32, name: &str) -> Option<(i32, i32)> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    for task in tasks.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim_end() != name {
            continue;
        }
        let stat = std::fs::read_to_string(task.path().join("stat")).ok()?;
        // Fields after the name, which ends at the last ')', start at field 3.
        let fields: Vec<&str> = stat[stat.rfind(')')? + 2..].split(' ').collect();
        let field = |n: usize| fields.get(n - 3)?.parse().ok();
        return Some((field(41)?, field(40)?));
    }
    None
}

/// The destination after a failed post-copy: it says so, its guest is paused, and it
/// refuses to run it.
fn assert_destination_stopped(dst: &Vm) {
    let d = wait_ended(dst, Duration::from_secs(30));
    assert_eq!(d["state"], "failed", "{d}");
    assert!(
        d["error"]
            .as_str()
            .unwrap_or("")
            .contains("post-copy cannot go on"),
        "{d}"
    );
    // Every vCPU left the guest before the source was told.
    assert!(
        !d["error"].as_str().unwrap_or("").contains("KVM_RUN"),
        "{d}"
    );
    assert!(d["remaining_pages"].as_u64() > Some(0), "{d}");
    let (_, info) = curl(&dst.sock, "GET", "/", None);
    assert_eq!(info["state"], "Paused", "{info}");
    let e = dst.refused("PATCH", "/vm", json!({ "state": "Resumed" }));
    assert!(e.contains("memory is incomplete"), "{e}");
}

/// The link breaks in the middle of a post-copy: the destination stops its guest and
/// keeps what it has; the source keeps the guest with all of its memory, and resuming
/// it there goes on verifying from the pass it was in.
#[test]
fn test_cutting_the_link_during_postcopy_and_resuming_the_source() {
    let dir = TempDir::new("pc-cut");
    let cfg = config("workload=verify start=16M size=64M", 2, 256, json!({}));
    let mut src = Vm::boot(&dir, "src", &cfg);
    src.ferry.expect_line("pass 3 ok", BOOT);
    let dst = Vm::fresh(&dir, "dst");
    let port = free_port();
    receive(&dst, &format!("tcp:127.0.0.1:{port}"));
    let proxy = TcpListener::bind("127.0.0.1:0").expect("bind");
    let proxy_addr = proxy.local_addr().expect("addr");
    let cut = postcopy_cutting_proxy(proxy, format!("127.0.0.1:{port}").parse().expect("addr"), 4);
    src.expect(
        "PUT",
        "/migration/send",
        json!({ "destination": format!("tcp:{proxy_addr}"), "mode": "postcopy", "max_bandwidth_mib_s": 16 }),
        204,
    );
    assert!(cut.join().expect("proxy"), "the proxy never saw post-copy");
    let s = wait_ended(&src, Duration::from_secs(30));
    assert_eq!(s["state"], "failed", "{s}");
    assert!(
        s["error"]
            .as_str()
            .unwrap_or("")
            .contains("during post-copy"),
        "{s}"
    );
    assert_destination_stopped(&dst);
    // The source's guest stopped at its switch-over and waits there.
    let (_, info) = curl(&src.sock, "GET", "/", None);
    assert_eq!(info["state"], "Paused", "{info}");
    let paused_at = last_pass(src.ferry.drain(Duration::from_millis(200)));
    src.resume();
    let line = src.ferry.expect_line("pass ", Duration::from_secs(10));
    assert!(line.ends_with(" ok"), "{line}");
    // The pass that was running at the pause completes next: nothing was lost or
    // rolled forward.
    assert!(
        last_pass(std::slice::from_ref(&line)) <= paused_at + 1,
        "{line} after pass {paused_at}"
    );
    assert_still_verifies(&mut src);
}

/// The source dies in the middle of a post-copy: the destination never runs on with
/// missing memory.
#[test]
fn test_killing_the_source_during_postcopy_stops_the_destination() {
    let dir = TempDir::new("pc-kill");
    let cfg = config("workload=verify start=16M size=64M", 2, 256, json!({}));
    let mut src = Vm::boot(&dir, "src", &cfg);
    src.ferry.expect_line("pass 3 ok", BOOT);
    let dst = Vm::fresh(&dir, "dst");
    let listen = format!("tcp:127.0.0.1:{}", free_port());
    receive(&dst, &listen);
    src.expect(
        "PUT",
        "/migration/send",
        json!({ "destination": listen, "mode": "postcopy", "max_bandwidth_mib_s": 16 }),
        204,
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while status(&dst)["downtime_ms"].is_null() {
        assert!(
            Instant::now() < deadline,
            "the destination never ran the guest"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(200));
    // The threads that serve faults run ahead of the bulk threads on both sides.
    for (vm, thread) in [(&dst, "postcopy-faults"), (&src, "postcopy-answer")] {
        assert_eq!(
            thread_policy(vm.ferry.pid(), thread),
            Some((libc::SCHED_FIFO, 1)),
            "{thread}'s scheduling policy and priority"
        );
    }
    src.ferry.signal(libc::SIGKILL);
    drop(src);
    assert_destination_stopped(&dst);
    let d = status(&dst);
    let e = d["error"].as_str().unwrap_or("");
    assert!(e.contains("closed") || e.contains("reset by peer"), "{d}");
}
