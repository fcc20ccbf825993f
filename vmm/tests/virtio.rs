//! virtio-blk and virtio-net end to end: the test guest's polling driver against real
//! files and a real tap, and device state carried across a save and rebuild while the
//! guest has I/O in flight.
// Test constants and sizes are small.
#![allow(clippy::cast_possible_truncation)]

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use api::action::VmmAction;
use api::VmConfig;
use common::{assert_disk_holds_pass, guest_image, Ferry, InProcess, TempDir, TestTap};
use serde_json::json;

const RUN: Duration = Duration::from_secs(60);
const DISK: usize = 8 << 20;

fn vm_json(args: &str, drives: serde_json::Value, nets: serde_json::Value) -> serde_json::Value {
    json!({
        "boot-source": {
            "kernel_image_path": guest_image(),
            "boot_args": format!("console=ttyS0 {args}"),
        },
        "machine-config": { "vcpu_count": 1, "mem_size_mib": 128 },
        "drives": drives,
        "network-interfaces": nets,
    })
}

fn drive(id: &str, path: &Path, read_only: bool) -> serde_json::Value {
    json!({ "drive_id": id, "path_on_host": path, "is_root_device": false, "is_read_only": read_only })
}

/// Runs the guest's `args` with one writable drive, `disk0`, on a zeroed disk, until
/// it is done and ferry exits 0; returns the directory, the disk and the console.
fn run_blk(tag: &str, args: &str) -> (TempDir, PathBuf, Vec<String>) {
    let dir = TempDir::new(tag);
    let disk = dir.write("disk.img", vec![0u8; DISK]);
    let cfg = vm_json(args, json!([drive("disk0", &disk, false)]), json!([]));
    let path = dir.write("vm.json", cfg.to_string());
    let mut ferry = Ferry::spawn(&path);
    ferry.expect_line("ferry-guest: done", RUN);
    let (status, console, stderr) = ferry.wait(RUN);
    assert!(status.success(), "{status}: {stderr}");
    (dir, disk, console)
}

#[test]
fn test_blk_guest_writes_reads_back_and_the_file_holds_its_data() {
    let (_dir, disk, console) = run_blk("blk", "workload=blk passes=3 depth=8");
    assert_eq!(
        console[1],
        "ferry-guest: cmdline console=ttyS0 workload=blk passes=3 depth=8 \
         virtio_mmio.device=4K@0xd0000000:5"
    );
    for line in [
        "ferry-guest: blk capacity 16384 sectors req=65536 depth=8",
        "ferry-guest: blk id disk0",
        "ferry-guest: blk pass 1 ok (8388608 bytes)",
        "ferry-guest: blk pass 3 ok (8388608 bytes)",
        "ferry-guest: blk read past the end: ioerr",
    ] {
        assert!(
            console.iter().any(|l| l == line),
            "{line:?} in {console:#?}"
        );
    }
    assert_disk_holds_pass(&disk, 3);
}

/// The virtio spec lets a driver queue requests before `DRIVER_OK`: the vCPU thread
/// that handles that register write serves them, under its seccomp filter.
#[test]
fn test_blk_request_queued_before_driver_ok_is_served() {
    let (_dir, _, console) = run_blk("blk-early", "workload=blk passes=1 early=1");
    assert!(
        console
            .iter()
            .any(|l| l == "ferry-guest: blk request queued before DRIVER_OK completed"),
        "{console:#?}"
    );
}

#[test]
fn test_read_only_drive_fails_the_guests_write() {
    let dir = TempDir::new("blk-ro");
    let disk = dir.write("disk.img", vec![0u8; DISK]);
    let cfg = vm_json(
        "workload=blk passes=1",
        json!([drive("ro", &disk, true)]),
        json!([]),
    );
    let path = dir.write("vm.json", cfg.to_string());
    let ferry = Ferry::spawn(&path);
    let (status, console, _) = ferry.wait(RUN);
    assert_eq!(status.code(), Some(1), "the guest stops on the error");
    assert!(
        console.iter().any(
            |l| l == "ferry-guest: error: blk: request type 1 at byte 0x0 failed with status 1"
        ),
        "{console:#?}"
    );
    assert!(std::fs::read(&disk).expect("read").iter().all(|b| *b == 0));
}

/// A raw packet socket on the host side of a tap.
struct PacketSocket(std::os::fd::OwnedFd);

const ETH_P_ALL: u16 = 0x0003;
const TEST_ETHERTYPE: u16 = 0x88b5;

impl PacketSocket {
    fn bind(ifname: &str) -> PacketSocket {
        use std::os::fd::FromRawFd;
        // SAFETY: plain socket(2); the fd is checked and owned below.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW,
                i32::from(ETH_P_ALL.to_be()),
            )
        };
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        // SAFETY: `fd` is a new socket nothing else owns.
        let sock = PacketSocket(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) });
        let name = std::ffi::CString::new(ifname).expect("name");
        // SAFETY: a NUL-terminated name.
        let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
        assert!(index > 0, "no interface {ifname}");
        // SAFETY: zero is a valid sockaddr_ll.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = ETH_P_ALL.to_be();
        addr.sll_ifindex = index as i32;
        // SAFETY: `addr` is a sockaddr_ll of the size passed.
        let rc = unsafe {
            libc::bind(
                fd,
                &addr as *const libc::sockaddr_ll as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 200_000,
        };
        // SAFETY: SO_RCVTIMEO takes a timeval of the size passed.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const libc::timeval as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as u32,
            )
        };
        sock
    }

    fn send(&self, frame: &[u8]) {
        use std::os::fd::AsRawFd;
        // SAFETY: `frame` is readable for its length.
        let n = unsafe { libc::send(self.0.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        assert_eq!(
            n,
            frame.len() as isize,
            "send: {}",
            std::io::Error::last_os_error()
        );
    }

    fn recv(&self) -> Option<Vec<u8>> {
        use std::os::fd::AsRawFd;
        let mut buf = vec![0u8; 2048];
        // SAFETY: `buf` is writable for its length.
        let n = unsafe { libc::recv(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        let n = usize::try_from(n).ok()?;
        buf.truncate(n);
        Some(buf)
    }
}

const GUEST_MAC: [u8; 6] = [0x06, 0x00, 0xac, 0x10, 0x00, 0x02];
const HOST_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0xaa];

fn test_frame(i: usize) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&HOST_MAC);
    f.extend_from_slice(&TEST_ETHERTYPE.to_be_bytes());
    f.extend_from_slice(format!("ferry frame {i:04}").as_bytes());
    // Sizes from the minimum to a full MTU.
    f.resize(60 + (i * 97) % 1455, (i % 251) as u8);
    f
}

/// Sends `count` test frames and checks each comes back from the guest's MAC, to ours,
/// with the same payload.
fn echo_frames(sock: &PacketSocket, count: usize) {
    for i in 0..count {
        let sent = test_frame(i);
        sock.send(&sent);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            assert!(Instant::now() < deadline, "frame {i} never came back");
            let Some(got) = sock.recv() else { continue };
            if got.len() < 14
                || got[6..12] != GUEST_MAC
                || got[12..14] != TEST_ETHERTYPE.to_be_bytes()
            {
                continue;
            }
            assert_eq!(&got[..6], &HOST_MAC, "echo of frame {i} is addressed to us");
            assert_eq!(&got[14..], &sent[14..], "echo of frame {i} has its payload");
            break;
        }
    }
}

#[test]
fn test_net_guest_echoes_frames_through_a_tap() {
    let tap = TestTap::new("n");
    let dir = TempDir::new("net");
    let cfg = vm_json(
        "workload=net passes=40",
        json!([]),
        json!([{ "iface_id": "eth0", "host_dev_name": tap.0, "guest_mac": "06:00:ac:10:00:02" }]),
    );
    let path = dir.write("vm.json", cfg.to_string());
    let mut ferry = Ferry::spawn(&path);
    ferry.expect_line("ferry-guest: net ready", RUN);
    let sock = PacketSocket::bind(&tap.0);
    echo_frames(&sock, 40);
    ferry.expect_line("ferry-guest: net echoed 40 frames", RUN);
    let (status, console, stderr) = ferry.wait(RUN);
    assert!(status.success(), "{status}: {stderr}");
    assert!(console
        .iter()
        .any(|l| l == "ferry-guest: net mac 06:00:ac:10:00:02"));
}

fn wait_for_console(path: &PathBuf, needle: &str) -> String {
    let deadline = Instant::now() + RUN;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.contains(needle) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "no {needle:?} in console:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn test_devices_rebuilt_from_saved_state_finish_io_in_flight() {
    let tap = TestTap::new("r");
    let dir = TempDir::new("restore");
    let disk = dir.write("disk.img", vec![0u8; DISK]);
    let console = dir.path().join("console.txt");
    let mut cfg = vm_json(
        "workload=blk passes=30 depth=32 hold=2000",
        json!([drive("disk0", &disk, false)]),
        json!([{ "iface_id": "eth0", "host_dev_name": tap.0, "guest_mac": "06:00:ac:10:00:02" }]),
    );
    cfg["serial"] = json!({ "serial_out_path": console });
    let config = VmConfig::from_json(&cfg.to_string()).expect("config");
    let vm = InProcess::start(&config);
    wait_for_console(&console, "blk pass 2 ok");

    // Pause until the guest has requests the device has not taken; that is the moment
    // that matters. `hold=2000` leaves 32 of them in the ring, not yet notified, about
    // 85% of the time.
    let mut saved = None;
    for tries in 0..400 {
        vm.ask(VmmAction::Pause).expect("pause");
        let metrics = vm.json(VmmAction::GetMetrics);
        let pending = metrics["virtio"]["block"]["disk0"]["pending_requests"][0]
            .as_u64()
            .expect("pending_requests");
        // Kicks reach the device through the ioeventfd, not as exits to ferry: after
        // hundreds of requests the only trapped writes are the driver's setup.
        let requests = metrics["virtio"]["block"]["disk0"]["write_count"]
            .as_u64()
            .expect("write_count");
        let trapped = metrics["vcpu"]["exit_mmio_write"].as_u64().expect("exits");
        assert!(
            requests > 200 && trapped < 40,
            "{requests} requests, {trapped} MMIO write exits"
        );
        if pending > 0 {
            saved = Some((pending, vm.json(VmmAction::SaveDevices)));
            break;
        }
        vm.ask(VmmAction::Resume).expect("resume");
        // Gaps of different lengths, so that pauses do not fall in step with the
        // guest's batches (about 2.7 ms each).
        std::thread::sleep(Duration::from_micros(300 + 300 * (tries % 7)));
    }
    let (pending, state) = saved.expect("never caught the guest with requests in flight");
    let devices = state.as_array().expect("a list of devices");
    assert_eq!(devices.len(), 2);
    assert_eq!(devices[0]["id"], "disk0");
    assert_eq!(devices[0]["irq"], 5);
    assert!(devices[0]["device"]["block"].is_object(), "{state}");
    assert_eq!(devices[1]["device"]["net"]["host_dev_name"], tap.0.as_str());
    let queue = &devices[0]["transport"]["queues"][0];
    assert!(queue["ready"].as_bool().expect("ready"));

    // Through bytes, as a migration would carry it.
    let bytes = serde_json::to_vec(&state).expect("serialize");
    let state: serde_json::Value = serde_json::from_slice(&bytes).expect("parse");
    vm.ask(VmmAction::RestoreDevices(state.clone()))
        .expect("restore");
    let metrics = vm.json(VmmAction::GetMetrics);
    let block = &metrics["virtio"]["block"]["disk0"];
    assert_eq!(
        block["pending_requests"][0], pending,
        "the new device has the same work"
    );
    assert_eq!(
        block["read_bytes"], 0,
        "counters start afresh with the new device"
    );
    vm.ask(VmmAction::Resume).expect("resume");

    let text = wait_for_console(&console, "ferry-guest: done");
    assert!(!text.contains("error"), "{text}");
    assert!(text.contains("ferry-guest: blk pass 30 ok"), "{text}");
    assert_eq!(vm.finish(), vmm::ExitReason::GuestStop);
    assert_disk_holds_pass(&disk, 30);

    // State that does not fit is refused, and the VM it was meant for is untouched.
    let mut bad = state;
    bad[0]["irq"] = json!(9);
    let dir2 = TempDir::new("restore-bad");
    let disk2 = dir2.write("disk.img", vec![0u8; DISK]);
    let cfg2 = vm_json(
        "workload=idle",
        json!([drive("disk0", &disk2, false)]),
        json!([]),
    );
    let vm2 = InProcess::start(&VmConfig::from_json(&cfg2.to_string()).expect("config"));
    let err = vm2
        .ask(VmmAction::RestoreDevices(bad.clone()))
        .expect_err("running VMs refuse");
    assert!(err.message.contains("Running"), "{}", err.message);
    vm2.ask(VmmAction::Pause).expect("pause");
    let err = vm2
        .ask(VmmAction::RestoreDevices(bad))
        .expect_err("misfit refused");
    assert!(
        err.message.contains("device state does not fit"),
        "{}",
        err.message
    );
}

#[test]
fn test_api_attaches_devices_and_patch_swaps_the_drive_file() {
    let tap = TestTap::new("a");
    let dir = TempDir::new("api-virtio");
    let disk_a = dir.write("a.img", vec![0u8; 1 << 20]);
    let disk_b = dir.write("b.img", vec![0u8; 1 << 20]);
    let sock = dir.path().join("api.sock");
    let mut ferry = Ferry::spawn_args(&["--api-sock".as_ref(), sock.as_os_str()]);
    common::wait_for_socket(&sock);
    let call = |method: &str, path: &str, body: Option<serde_json::Value>, status: u16| {
        let body = body.map(|b| b.to_string());
        let (got, json) = common::curl(&sock, method, path, body.as_deref());
        assert_eq!(got, status, "{method} {path}: {json}");
        json
    };
    call(
        "PUT",
        "/boot-source",
        Some(json!({
            "kernel_image_path": guest_image(),
            "boot_args": "console=ttyS0 workload=blk passes=0 depth=4",
        })),
        204,
    );
    call(
        "PUT",
        "/drives/disk0",
        Some(drive("disk0", &disk_a, false)),
        204,
    );
    let net =
        json!({ "iface_id": "eth0", "host_dev_name": tap.0, "guest_mac": "06:00:ac:10:00:02" });
    call("PUT", "/network-interfaces/eth0", Some(net.clone()), 204);
    let config = call("GET", "/vm/config", None, 200);
    assert_eq!(config["drives"][0]["path_on_host"], json!(disk_a));
    assert_eq!(config["network-interfaces"][0], net);
    call(
        "PUT",
        "/actions",
        Some(json!({ "action_type": "InstanceStart" })),
        204,
    );
    ferry.expect_line("ferry-guest: blk pass 2 ok", RUN);

    let fault = |json: serde_json::Value| {
        json["fault_message"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };
    // Swap files the way a user keeps the guest's view consistent: pause, copy, point
    // the drive at the copy, resume. The guest's later passes go to the new file.
    call("PATCH", "/vm", Some(json!({ "state": "Paused" })), 204);
    std::fs::copy(&disk_a, &disk_b).expect("copy");
    let swap = json!({ "drive_id": "disk0", "path_on_host": disk_b });
    call("PATCH", "/drives/disk0", Some(swap), 204);
    call("PATCH", "/vm", Some(json!({ "state": "Resumed" })), 204);
    let frozen = std::fs::read(&disk_a).expect("read");
    // Two whole passes later, by the device's own count, the new file has them.
    let written = |m: serde_json::Value| m["virtio"]["block"]["disk0"]["write_bytes"].as_u64();
    let start = written(call("GET", "/metrics", None, 200)).expect("write_bytes");
    let deadline = Instant::now() + RUN;
    while written(call("GET", "/metrics", None, 200)) < Some(start + (3 << 20)) {
        assert!(Instant::now() < deadline, "the guest stopped writing");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(
        std::fs::read(&disk_a).expect("read") == frozen,
        "the old file is left alone"
    );
    assert!(
        std::fs::read(&disk_b).expect("read") != frozen,
        "the guest's writes reach the new file"
    );
    assert_eq!(
        call("GET", "/vm/config", None, 200)["drives"][0]["path_on_host"],
        json!(disk_b)
    );
    let m = call("GET", "/metrics", None, 200);
    assert!(
        m["virtio"]["block"]["disk0"]["write_bytes"].as_u64() > Some(0),
        "{m}"
    );
    assert_eq!(m["virtio"]["block"]["disk0"]["needs_reset"], false);
    assert!(m["virtio"]["net"]["eth0"].is_object(), "{m}");

    for (method, path, body, message) in [
        (
            "PATCH",
            "/drives/nope",
            json!({ "drive_id": "nope", "path_on_host": disk_a }),
            "the microVM has no drive \"nope\"",
        ),
        (
            "PATCH",
            "/drives/disk0",
            json!({ "drive_id": "disk0" }),
            "PATCH /drives needs path_on_host",
        ),
        (
            "PATCH",
            "/drives/disk0",
            json!({ "drive_id": "disk0", "path_on_host": dir.path().join("missing.img") }),
            "cannot open drive disk0 backing file",
        ),
        (
            "PATCH",
            "/network-interfaces/nope",
            json!({ "iface_id": "nope" }),
            "the microVM has no network interface \"nope\"",
        ),
        (
            "PATCH",
            "/network-interfaces/eth0",
            json!({ "iface_id": "eth0", "rx_rate_limiter": {} }),
            "rate limiters are not supported",
        ),
        (
            "PUT",
            "/drives/disk1",
            drive("disk1", &disk_a, false),
            "not allowed after boot",
        ),
    ] {
        let got = fault(call(method, path, Some(body), 400));
        assert!(got.contains(message), "{method} {path}: {got:?}");
    }
    call(
        "PATCH",
        "/network-interfaces/eth0",
        Some(json!({ "iface_id": "eth0" })),
        204,
    );
    // A failed PATCH leaves the drive working.
    let line = ferry.expect_line("ferry-guest: blk pass", RUN);
    assert!(line.ends_with("ok (1048576 bytes)"), "{line}");

    call(
        "PUT",
        "/actions",
        Some(json!({ "action_type": "SendCtrlAltDel" })),
        204,
    );
    let (status, console, stderr) = ferry.wait(RUN);
    assert!(status.success(), "{status}: {stderr}");
    assert!(console
        .iter()
        .any(|l| l == "ferry-guest: ctrl-alt-del, rebooting"));
}
