//! Helpers for end-to-end tests: real `ferry` processes, real KVM, the real test guest.
#![allow(dead_code)]

pub mod api_vm;

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use api::action::{InstanceStatus, VmmAction, VmmData, VmmRequest, VmmResult};
use api::server::ApiChannel;
use api::VmConfig;
use vmm_sys_util::eventfd::EventFd;

/// The test guest ELF, built by `scripts/build-guest.sh` (which `scripts/test.sh` runs).
pub fn guest_image() -> PathBuf {
    let path = std::env::var_os("FERRY_GUEST").map(PathBuf::from).expect(
        "FERRY_GUEST is not set: run the suite with scripts/test.sh, which builds the test guest",
    );
    assert!(
        path.is_file(),
        "FERRY_GUEST={} does not exist",
        path.display()
    );
    path
}

/// The Debian kernel directory from `resources/linux/build.sh`.
pub fn linux_dir() -> PathBuf {
    let path = std::env::var_os("FERRY_LINUX_DIR")
        .map(PathBuf::from)
        .expect(
        "FERRY_LINUX_DIR is not set: run the suite with scripts/test.sh, which installs the kernel",
    );
    assert!(
        path.join("vmlinux").is_file(),
        "{}/vmlinux does not exist",
        path.display()
    );
    path
}

/// A directory removed when dropped.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("ferry-test-{tag}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn write(&self, name: &str, contents: impl AsRef<[u8]>) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, contents).expect("write temp file");
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The test guest's check word for `word` in `pass` (splitmix64, as
/// resources/guest/src/workload.rs `check`): its `verify` and `rounds` pages and its
/// `blk` disk pattern.
pub fn check(word: u64, pass: u64) -> u64 {
    let mut z = word ^ (pass << 48) ^ 0x9e37_79b9_7f4a_7c15;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The `ferry` binary under test.
pub fn ferry_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ferry"))
}

/// Asserts every word of `disk` holds the test guest's `blk` pattern of `pass`.
pub fn assert_disk_holds_pass(disk: &Path, pass: u64) {
    let bytes = std::fs::read(disk).expect("read disk");
    for (i, chunk) in bytes.chunks_exact(8).enumerate() {
        let got = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
        assert_eq!(
            got,
            check(i as u64, pass),
            "disk word {i} after pass {pass}"
        );
    }
}

/// A Firecracker-format config for the test guest.
pub fn guest_config(vcpus: u32, mem_mib: u64, args: &str) -> String {
    format!(
        r#"{{"boot-source": {{"kernel_image_path": "{}", "boot_args": "console=ttyS0 {args}"}},
            "machine-config": {{"vcpu_count": {vcpus}, "mem_size_mib": {mem_mib}}}}}"#,
        guest_image().display()
    )
}

/// A running `ferry --config-file FILE --no-api`, with its console read line by line.
pub struct Ferry {
    child: Child,
    lines: Receiver<String>,
    seen: Vec<String>,
    stderr: Option<std::thread::JoinHandle<String>>,
}

impl Ferry {
    pub fn spawn(config: &Path) -> Ferry {
        Ferry::spawn_args(&[
            "--config-file".as_ref(),
            config.as_os_str(),
            "--no-api".as_ref(),
        ])
    }

    /// `ferry ARGS…` with the console on a pipe.
    pub fn spawn_args(args: &[&std::ffi::OsStr]) -> Ferry {
        Ferry::spawn_program(ferry_binary().as_os_str(), &[], args)
    }

    /// `PROGRAM PREFIX… ARGS…` with the console on a pipe: another copy of ferry, or
    /// ferry run through `ip netns exec`.
    pub fn spawn_program(
        program: &std::ffi::OsStr,
        prefix: &[&std::ffi::OsStr],
        args: &[&std::ffi::OsStr],
    ) -> Ferry {
        let mut child = Command::new(program)
            .args(prefix)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ferry");
        let stdout = child.stdout.take().expect("stdout");
        let mut stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s);
            s
        });
        Ferry {
            child,
            lines: rx,
            seen: Vec::new(),
            stderr: Some(stderr),
        }
    }

    /// Waits for a console line containing `needle`; panics with the console so far.
    pub fn expect_line(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    panic!(
                        "no line containing {needle:?} within {timeout:?}; console:\n{}",
                        self.seen.join("\n")
                    )
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let status = self.child.wait().expect("wait");
                    let err = self
                        .stderr
                        .take()
                        .map(|h| h.join().unwrap_or_default())
                        .unwrap_or_default();
                    panic!(
                        "ferry ended ({status}) before a line containing {needle:?}; console:\n{}\nstderr:\n{err}",
                        self.seen.join("\n")
                    )
                }
            }
        }
    }

    /// Takes console lines until none comes for `quiet`, stopping after `quiet` + 200 ms
    /// in all; returns all seen so far. The bound is for a guest that never stops
    /// printing: the verify workload over 16 MiB prints a pass every millisecond or
    /// two, and a drain that waited for a gap in it took minutes. Lines printed before
    /// the call reach the channel well within it.
    pub fn drain(&mut self, quiet: Duration) -> &[String] {
        let deadline = Instant::now() + quiet + Duration::from_millis(200);
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(quiet.min(left)) {
                Ok(line) => self.seen.push(line),
                Err(_) => break,
            }
        }
        &self.seen
    }

    /// Every console line seen so far.
    pub fn console(&self) -> &[String] {
        &self.seen
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: sends a signal to our own child process.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// Waits for the process to end; returns its status, the rest of the console and stderr.
    pub fn wait(mut self, timeout: Duration) -> (ExitStatus, Vec<String>, String) {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "ferry did not end within {timeout:?}; console:\n{}",
                    self.seen.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(2)) {
            self.seen.push(line);
        }
        let err = self
            .stderr
            .take()
            .map(|h| h.join().unwrap_or_default())
            .unwrap_or_default();
        (status, std::mem::take(&mut self.seen), err)
    }
}

impl Drop for Ferry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs ferry on a config that must be refused; returns (exit code, stderr).
pub fn run_refused(config: &Path) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .arg("--config-file")
        .arg(config)
        .arg("--no-api")
        .stdin(Stdio::null())
        .output()
        .expect("run ferry");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Waits until a Unix socket accepts connections.
pub fn wait_for_socket(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::os::unix::net::UnixStream::connect(path).is_err() {
        assert!(
            Instant::now() < deadline,
            "{} never accepted connections",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// `ferry --api-sock DIR/api.sock EXTRA…`, once its socket accepts connections.
pub fn spawn_api(dir: &TempDir, extra: &[&str]) -> (Ferry, PathBuf) {
    let sock = dir.path().join("api.sock");
    let mut args: Vec<&std::ffi::OsStr> = vec!["--api-sock".as_ref(), sock.as_os_str()];
    args.extend(extra.iter().map(|a| std::ffi::OsStr::new(*a)));
    let ferry = Ferry::spawn_args(&args);
    wait_for_socket(&sock);
    (ferry, sock)
}

/// One request with curl that must get `status`; returns the body.
pub fn expect(
    sock: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
    status: u16,
) -> serde_json::Value {
    let (got, json) = curl(sock, method, path, body);
    assert_eq!(got, status, "{method} {path} {body:?}: {json}");
    json
}

/// One request with curl that must fail with 400; returns its fault message.
pub fn refused(sock: &Path, method: &str, path: &str, body: Option<&str>) -> String {
    expect(sock, method, path, body, 400)["fault_message"]
        .as_str()
        .expect("fault_message")
        .to_string()
}

/// One request with curl, a real HTTP client: returns (status, body as JSON or Null).
pub fn curl(sock: &Path, method: &str, path: &str, body: Option<&str>) -> (u16, serde_json::Value) {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "20", "--unix-socket"])
        .arg(sock);
    cmd.args([
        "-X",
        method,
        "-w",
        "\n%{http_code}",
        "-H",
        "Content-Type: application/json",
    ]);
    if body.is_some() {
        cmd.args(["--data-binary", "@-"]);
    }
    cmd.arg(format!("http://localhost{path}"));
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .expect("run curl (scripts/install-deps.sh installs it)");
    if let Some(b) = body {
        use std::io::Write;
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(b.as_bytes())
            .expect("write body");
    }
    let out = child.wait_with_output().expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    let status = code.trim().parse().unwrap_or_else(|_| {
        panic!(
            "curl {method} {path}: {text} {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (
        status,
        serde_json::from_str(body).unwrap_or(serde_json::Value::Null),
    )
}

/// A tap for one test, removed when dropped.
pub struct TestTap(pub String);

impl TestTap {
    pub fn new(tag: &str) -> TestTap {
        let name = format!("fry{tag}{}", std::process::id() % 100_000);
        let ip = |args: &[&str]| {
            let out = Command::new("ip")
                .args(args)
                .output()
                .expect("run ip (iproute2)");
            assert!(
                out.status.success(),
                "ip {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        ip(&["tuntap", "add", "dev", &name, "mode", "tap"]);
        // No IPv6 chatter from the host stack.
        let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1");
        ip(&["link", "set", &name, "up"]);
        TestTap(name)
    }
}

impl Drop for TestTap {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.0]).output();
    }
}

/// ferry's VMM thread, run in this process, with a channel for requests (those with no
/// HTTP route too, such as saving and rebuilding devices).
pub struct InProcess {
    requests: mpsc::Sender<VmmRequest>,
    wake: EventFd,
    thread: Option<std::thread::JoinHandle<vmm::ExitReason>>,
}

impl InProcess {
    pub fn start(config: &VmConfig) -> InProcess {
        let mut vm = vmm::build(config).expect("build");
        vm.start().expect("start");
        InProcess::run(config, vm)
    }

    /// Runs an already started `vm` on a VMM thread of its own.
    pub fn run(config: &VmConfig, vm: vmm::Vmm) -> InProcess {
        let (tx, rx) = mpsc::channel();
        let wake = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let api = ApiChannel {
            requests: rx,
            wake: wake.try_clone().expect("clone"),
            status: Arc::new(InstanceStatus::default()),
            counts: Arc::default(),
        };
        let controller =
            vmm::Controller::with_vmm(config, vm, Some(api), false).expect("controller");
        let thread =
            std::thread::spawn(move || vmm::run_until_exit(controller).expect("event loop"));
        InProcess {
            requests: tx,
            wake,
            thread: Some(thread),
        }
    }

    pub fn ask(&self, action: VmmAction) -> VmmResult {
        let (tx, answer) = mpsc::channel();
        let reply = api::Reply::new(tx, None);
        self.requests
            .send(VmmRequest { action, reply })
            .expect("VMM thread gone");
        self.wake.write(1).expect("wake");
        answer
            .recv_timeout(Duration::from_secs(10))
            .expect("no answer")
    }

    pub fn json(&self, action: VmmAction) -> serde_json::Value {
        match self.ask(action) {
            Ok(VmmData::Json(v)) => v,
            other => panic!("expected JSON, got {other:?}"),
        }
    }

    pub fn finish(mut self) -> vmm::ExitReason {
        let thread = self.thread.take().expect("thread");
        let deadline = Instant::now() + Duration::from_secs(60);
        while !thread.is_finished() {
            assert!(Instant::now() < deadline, "the guest did not finish");
            std::thread::sleep(Duration::from_millis(20));
        }
        thread.join().expect("VMM thread panicked")
    }
}
