//! A ferry driven over its API socket with curl, and what its test guest prints: shared
//! by the snapshot and migration tests.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::json;

use super::{curl, guest_image, wait_for_socket, Ferry, TempDir};

pub const BOOT: Duration = Duration::from_secs(20);

pub fn config(args: &str, vcpus: u32, mem_mib: u64, extra: serde_json::Value) -> serde_json::Value {
    let mut cfg = json!({
        "boot-source": {
            "kernel_image_path": guest_image(),
            "boot_args": format!("console=ttyS0 {args}"),
        },
        "machine-config": { "vcpu_count": vcpus, "mem_size_mib": mem_mib },
    });
    if let (Some(cfg), Some(extra)) = (cfg.as_object_mut(), extra.as_object()) {
        for (k, v) in extra {
            if k == "machine-config" {
                for (mk, mv) in v.as_object().expect("object") {
                    cfg["machine-config"][mk] = mv.clone();
                }
            } else {
                cfg.insert(k.clone(), v.clone());
            }
        }
    }
    cfg
}

/// A ferry with an API socket.
pub struct Vm {
    pub ferry: Ferry,
    pub sock: PathBuf,
}

impl Vm {
    /// A fresh ferry, not configured.
    pub fn fresh(dir: &TempDir, name: &str) -> Vm {
        Vm::fresh_with(dir, name, super::ferry_binary().as_os_str(), &[])
    }

    /// A fresh ferry started as `PROGRAM PREFIX… --api-sock SOCK`.
    pub fn fresh_with(
        dir: &TempDir,
        name: &str,
        program: &std::ffi::OsStr,
        prefix: &[&std::ffi::OsStr],
    ) -> Vm {
        let sock = dir.path().join(format!("{name}.sock"));
        let ferry =
            Ferry::spawn_program(program, prefix, &["--api-sock".as_ref(), sock.as_os_str()]);
        wait_for_socket(&sock);
        Vm { ferry, sock }
    }

    /// A ferry started as `PROGRAM PREFIX… --api-sock SOCK --config-file CFG`.
    pub fn boot_with(
        dir: &TempDir,
        name: &str,
        cfg: &serde_json::Value,
        program: &std::ffi::OsStr,
        prefix: &[&std::ffi::OsStr],
    ) -> Vm {
        let sock = dir.path().join(format!("{name}.sock"));
        let path = dir.write(&format!("{name}.json"), cfg.to_string());
        let ferry = Ferry::spawn_program(
            program,
            prefix,
            &[
                "--api-sock".as_ref(),
                sock.as_os_str(),
                "--config-file".as_ref(),
                path.as_os_str(),
            ],
        );
        wait_for_socket(&sock);
        Vm { ferry, sock }
    }

    /// A ferry booted from `cfg`, with an API socket.
    pub fn boot(dir: &TempDir, name: &str, cfg: &serde_json::Value) -> Vm {
        Vm::boot_with(dir, name, cfg, super::ferry_binary().as_os_str(), &[])
    }

    pub fn call(
        &self,
        method: &str,
        path: &str,
        body: &serde_json::Value,
    ) -> (u16, serde_json::Value) {
        curl(&self.sock, method, path, Some(&body.to_string()))
    }

    pub fn expect(
        &self,
        method: &str,
        path: &str,
        body: serde_json::Value,
        status: u16,
    ) -> serde_json::Value {
        let (got, json) = self.call(method, path, &body);
        assert_eq!(got, status, "{method} {path} {body}: {json}");
        json
    }

    /// A request that must fail with 400; returns its fault message.
    pub fn refused(&self, method: &str, path: &str, body: serde_json::Value) -> String {
        super::refused(&self.sock, method, path, Some(&body.to_string()))
    }

    pub fn pause(&self) {
        self.expect("PATCH", "/vm", json!({ "state": "Paused" }), 204);
    }

    pub fn resume(&self) {
        self.expect("PATCH", "/vm", json!({ "state": "Resumed" }), 204);
    }

    pub fn state(&self) -> String {
        let (_, info) = curl(&self.sock, "GET", "/", None);
        info["state"].as_str().unwrap_or_default().to_string()
    }

    /// Pauses and snapshots; returns the last pass the guest finished before the pause.
    pub fn snapshot(&mut self, kind: &str, state: &Path, mem: &Path) -> u64 {
        self.pause();
        let last = last_pass(self.ferry.drain(Duration::from_millis(300)));
        self.expect(
            "PUT",
            "/snapshot/create",
            json!({ "snapshot_type": kind, "snapshot_path": state, "mem_file_path": mem }),
            204,
        );
        last
    }

    /// Loads a snapshot with the File backend and runs it.
    pub fn load_file(&self, state: &Path, mem: &Path) {
        self.expect(
            "PUT",
            "/snapshot/load",
            json!({
                "snapshot_path": state,
                "mem_backend": { "backend_type": "File", "backend_path": mem },
                "resume_vm": true,
            }),
            204,
        );
    }
}

/// The number of the last `pass N ok` line.
pub fn last_pass(console: &[String]) -> u64 {
    console
        .iter()
        .rev()
        .find_map(|l| l.strip_prefix("pass ")?.strip_suffix(" ok")?.parse().ok())
        .unwrap_or(0)
}

/// Asserts that the guest's next pass is `after + 1`, and that every pass it reports
/// for `run` is ok, in order. `after` comes from a console read while the old process
/// lived (`drain`), which never holds a line without its newline.
///
/// A pause can fall while the guest prints `pass N+1 ok`: the old console then ends
/// in part of that line and the restored guest prints the rest of it first, then
/// `pass N+2 ok`.
pub fn assert_continues(vm: &mut Vm, after: u64, run: Duration) {
    continues(vm, after, false, run)
}

/// As `assert_continues`, for a source console read to its end (`Ferry::wait`): its
/// last line may lack its newline, and counts.
pub fn assert_continues_after(vm: &mut Vm, source: &[String], run: Duration) {
    continues(vm, last_pass(source), true, run)
}

fn continues(vm: &mut Vm, after: u64, tail_counted: bool, run: Duration) {
    let first = vm.ferry.expect_line("", BOOT);
    let whole = format!("pass {} ok", after + 1);
    let mut expected = after + 2;
    if first != whole {
        if first.is_empty() && tail_counted {
            // The old console's last line was whole but for its newline, and `after`
            // counted it: the next pass is `after + 1`.
            expected = after + 1;
        } else {
            assert!(
                // An empty rest: the pause fell between the line and its newline.
                whole.ends_with(&first),
                "the restored guest must go on from the pass it was in ({whole}), it printed {first:?}"
            );
        }
        let line = vm.ferry.expect_line("pass ", BOOT);
        assert_eq!(line, format!("pass {expected} ok"));
        expected += 1;
    }
    let deadline = Instant::now() + run;
    while Instant::now() < deadline {
        let line = vm.ferry.expect_line("pass ", BOOT);
        assert_eq!(line, format!("pass {expected} ok"));
        expected += 1;
    }
}
