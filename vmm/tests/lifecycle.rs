//! Start, pause, resume and stop on a real KVM VM running the test guest, driven through
//! the `vmm` library; the guest's console goes to a file.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use api::VmConfig;
use common::{guest_image, TempDir};
use vmm::{LifecycleError, VmState};

fn config(console: &Path, vcpus: u32, args: &str) -> VmConfig {
    let json = format!(
        r#"{{"boot-source": {{"kernel_image_path": "{}", "boot_args": "console=ttyS0 {args}"}},
            "machine-config": {{"vcpu_count": {vcpus}, "mem_size_mib": 128}},
            "serial": {{"serial_out_path": "{}"}}}}"#,
        guest_image().display(),
        console.display()
    );
    VmConfig::from_json(&json).expect("valid config")
}

fn console(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

fn wait_for(path: &Path, what: &str, done: impl Fn(&str) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done(&console(path)) {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; console:\n{}",
            console(path)
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The complete pass lines (a pause may cut the last line short), checked to be
/// `pass N ok` with N counting up from 1.
fn ok_passes(text: &str) -> usize {
    let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
    let passes: Vec<&str> = complete
        .lines()
        .filter(|l| l.starts_with("pass "))
        .collect();
    for (i, line) in passes.iter().enumerate() {
        assert_eq!(
            *line,
            format!("pass {} ok", i + 1),
            "guest reported a bad pass"
        );
    }
    passes.len()
}

#[test]
fn test_verify_stays_ok_across_200_pause_resume_cycles() {
    let dir = TempDir::new("pause-resume");
    let out = dir.path().join("console.log");
    let mut vmm = vmm::build(&config(&out, 2, "workload=verify size=32M")).expect("build");
    vmm.start().expect("start");
    wait_for(&out, "pass 3", |t| t.contains("pass 3 ok"));

    for cycle in 0..200 {
        vmm.pause().expect("pause");
        assert_eq!(vmm.state(), VmState::Paused);
        if cycle % 25 == 0 {
            // A paused guest makes no progress at all.
            let before = console(&out).len();
            std::thread::sleep(Duration::from_millis(40));
            assert_eq!(
                console(&out).len(),
                before,
                "guest printed while paused (cycle {cycle})"
            );
        }
        vmm.resume().expect("resume");
        assert_eq!(vmm.state(), VmState::Running);
        std::thread::sleep(Duration::from_millis(2));
    }

    // Resuming continues where the guest was: the pass count goes on from where it was.
    let after_cycles = ok_passes(&console(&out));
    wait_for(&out, "three more passes", |t| {
        t.matches(" ok\n").count() >= after_cycles + 3
    });
    vmm.pause().expect("final pause");
    let total = ok_passes(&console(&out));
    assert!(total >= after_cycles + 3, "{total} passes");
    assert!(!console(&out).contains("corrupt"));
    vmm.stop();
    assert_eq!(vmm.state(), VmState::Stopped);
}

#[test]
fn test_invalid_transitions_are_refused() {
    let dir = TempDir::new("transitions");
    let out = dir.path().join("console.log");
    let mut vmm = vmm::build(&config(&out, 1, "workload=idle")).expect("build");
    assert!(matches!(
        vmm.resume(),
        Err(LifecycleError::InvalidTransition {
            from: VmState::NotStarted,
            ..
        })
    ));
    assert!(matches!(
        vmm.pause(),
        Err(LifecycleError::InvalidTransition {
            from: VmState::NotStarted,
            ..
        })
    ));
    vmm.start().expect("start");
    assert!(matches!(
        vmm.start(),
        Err(LifecycleError::InvalidTransition {
            from: VmState::Running,
            ..
        })
    ));
    assert!(matches!(
        vmm.resume(),
        Err(LifecycleError::InvalidTransition {
            from: VmState::Running,
            ..
        })
    ));
    vmm.pause().expect("pause");
    let err = vmm.pause().expect_err("second pause");
    assert_eq!(err.to_string(), "cannot go from Paused to Paused");
    vmm.resume().expect("resume");
    wait_for(&out, "idle line", |t| t.contains("ferry-guest: idle"));
    vmm.stop();
}

#[test]
fn test_guest_memory_is_freed_on_stop() {
    let dir = TempDir::new("free");
    let out = dir.path().join("console.log");
    let mut vmm = vmm::build(&config(&out, 1, "workload=verify size=64M passes=2")).expect("build");
    let memfd = vmm.ram().file().try_clone().expect("dup memfd");
    use std::os::unix::fs::MetadataExt;
    let inode = format!(" {} ", memfd.metadata().expect("stat").ino());
    let mapped = || {
        std::fs::read_to_string("/proc/self/maps")
            .expect("maps")
            .lines()
            .any(|l| l.contains(&inode))
    };
    assert!(mapped(), "guest RAM is mapped while the VM exists");
    vmm.start().expect("start");
    wait_for(&out, "pass 1", |t| t.contains("pass 1 ok"));
    assert!(
        memfd.metadata().expect("stat").blocks() > 0,
        "the guest touched memory"
    );
    vmm.stop();
    drop(vmm);
    assert!(!mapped(), "guest RAM is still mapped after stop");
}
