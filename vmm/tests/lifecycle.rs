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

    // The guest rewrites its whole range every pass, so memory that stays the same
    // for 40 ms means no vCPU ran; while it runs, the same wait always sees a change.
    let running_before = range_digest(&vmm);
    std::thread::sleep(Duration::from_millis(40));
    assert_ne!(
        range_digest(&vmm),
        running_before,
        "a running guest changes memory"
    );
    for cycle in 0..200 {
        vmm.pause().expect("pause");
        assert_eq!(vmm.state(), VmState::Paused);
        if cycle % 25 == 0 {
            // A paused guest makes no progress at all.
            let before = range_digest(&vmm);
            let printed = console(&out).len();
            std::thread::sleep(Duration::from_millis(40));
            assert_eq!(
                range_digest(&vmm),
                before,
                "guest memory changed while paused (cycle {cycle})"
            );
            assert_eq!(console(&out).len(), printed, "guest printed while paused");
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

/// A digest of the `verify` workload's range (4 MiB + 32 MiB), read from the host.
fn range_digest(vmm: &vmm::Vmm) -> u64 {
    use vm_memory::{Bytes, GuestAddress};
    let mut buf = vec![0u8; 32 << 20];
    vmm.ram()
        .memory()
        .read_slice(&mut buf, GuestAddress(4 << 20))
        .expect("read guest memory");
    buf.chunks_exact(8).fold(0u64, |h, w| {
        (h ^ u64::from_le_bytes(w.try_into().expect("8 bytes")))
            .rotate_left(5)
            .wrapping_mul(0x100_0000_01b3)
    })
}

/// A vCPU that does not park in time: the pause is undone, the VM keeps running and
/// says so, and once the vCPU is back, pause and resume work again.
#[test]
fn test_pause_a_vcpu_cannot_follow_leaves_the_vm_running() {
    let dir = TempDir::new("stuck-pause");
    let out = dir.path().join("console.log");
    let mut vmm = vmm::build(&config(&out, 2, "workload=verify size=32M")).expect("build");
    vmm.start().expect("start");
    wait_for(&out, "pass 2", |t| t.contains("pass 2 ok"));
    for stuck in [0, 1] {
        vmm.stall_vcpu(stuck, Duration::from_secs(3));
        let started = Instant::now();
        let err = vmm.pause().expect_err("a stuck vCPU cannot pause");
        assert!(matches!(err, LifecycleError::PauseFailed(_)), "{err}");
        assert_eq!(
            err.to_string(),
            format!("cannot pause: vCPU {stuck} did not answer Pause within 2s; the VM was resumed and keeps running")
        );
        assert!(started.elapsed() < Duration::from_secs(3), "bounded");
        assert_eq!(vmm.state(), VmState::Running);
        // Every vCPU runs again: the guest (on vCPU 0) goes on passing.
        let passes = ok_passes(&console(&out));
        wait_for(&out, "two more passes", |t| ok_passes(t) >= passes + 2);
        // Back to normal once the stall is over.
        std::thread::sleep(Duration::from_millis(1500));
        vmm.pause().expect("pause after the stall");
        let before = range_digest(&vmm);
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(range_digest(&vmm), before, "paused for real");
        vmm.resume().expect("resume");
    }
    assert!(!console(&out).contains("corrupt"));
    vmm.stop();
}

/// Stopping waits a bounded time for each vCPU, never forever.
#[test]
fn test_stop_with_a_stuck_vcpu_is_bounded() {
    let dir = TempDir::new("stuck-stop");
    let out = dir.path().join("console.log");
    let mut vmm = vmm::build(&config(&out, 2, "workload=verify size=8M")).expect("build");
    vmm.start().expect("start");
    wait_for(&out, "pass 1", |t| t.contains("pass 1 ok"));
    vmm.stall_vcpu(1, Duration::from_secs(20));
    let started = Instant::now();
    vmm.stop();
    let took = started.elapsed();
    assert_eq!(vmm.state(), VmState::Stopped);
    assert!(
        took < Duration::from_secs(3),
        "stop took {took:?} with a stuck vCPU"
    );
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
    // A dirty tracker names guest RAM to the kernel when it stops: it keeps the
    // mapping alive, so those addresses are still guest RAM then.
    let mut tracker = vmm
        .dirty_tracker(memory::dirty::TrackingMode::KvmDirtyLog)
        .expect("tracker");
    tracker.start().expect("start");
    vmm.stop();
    drop(vmm);
    assert!(
        mapped(),
        "a tracker that outlives the VM keeps guest RAM mapped"
    );
    tracker.stop().expect("stop after the VM is gone");
    drop(tracker);
    assert!(!mapped(), "guest RAM is still mapped after stop");
}

/// Another thread freezes the guest without the VMM thread: at once no vCPU runs it,
/// the pause that follows never undoes itself (even with a vCPU too slow to answer),
/// resume is refused until a thaw, and then the guest goes on with every pass `ok`.
#[test]
fn test_a_freeze_from_another_thread_stops_the_guest_until_resume() {
    let dir = TempDir::new("freeze");
    let out = dir.path().join("console.log");
    let mut vmm = vmm::build(&config(&out, 2, "workload=verify size=32M")).expect("build");
    vmm.start().expect("start");
    wait_for(&out, "pass 2", |t| t.contains("pass 2 ok"));
    let freezer = vmm.freezer();
    std::thread::spawn(move || freezer.freeze(Duration::from_secs(1)))
        .join()
        .expect("freezing thread")
        .expect("every vCPU left the guest");
    let before = range_digest(&vmm);
    let printed = console(&out).len();
    std::thread::sleep(Duration::from_millis(60));
    assert_eq!(
        range_digest(&vmm),
        before,
        "guest memory changed while frozen"
    );
    assert_eq!(console(&out).len(), printed, "guest printed while frozen");

    // vCPU 1 answers its pause late: the VM is paused all the same, and stays frozen.
    vmm.stall_vcpu(1, Duration::from_secs(3));
    let late = vmm.pause_frozen().expect_err("vCPU 1 is late");
    assert!(
        late.to_string().contains("vCPU 1 did not answer Pause"),
        "{late}"
    );
    assert_eq!(vmm.state(), VmState::Paused);
    std::thread::sleep(Duration::from_millis(60));
    assert_eq!(
        range_digest(&vmm),
        before,
        "guest memory changed while paused"
    );
    std::thread::sleep(Duration::from_secs(1));
    let refused = vmm.resume().expect_err("a frozen VM is not resumed");
    assert!(refused.to_string().contains("frozen"), "{refused}");
    vmm.freezer().thaw();
    vmm.resume().expect("resume after the thaw");
    let passes = ok_passes(&console(&out));
    wait_for(&out, "two more passes", |t| ok_passes(t) >= passes + 2);
    assert!(!console(&out).contains("corrupt"));
    vmm.stop();
}

/// A vCPU waiting in the kernel on a page that never comes (post-copy, the link gone)
/// is kicked out of KVM_RUN by a freeze: the fault is interruptible, so `freeze`
/// returns with every vCPU out instead of timing out.
#[test]
fn test_a_freeze_reaches_a_vcpu_waiting_on_a_missing_page() {
    use vm_memory::GuestAddress;
    let dir = TempDir::new("freeze-missing");
    let out = dir.path().join("console.log");
    let mut vmm = vmm::build(&config(&out, 1, "workload=verify size=32M")).expect("build");
    vmm.start().expect("start");
    wait_for(&out, "pass 1", |t| t.contains("pass 1 ok"));
    // Registered, then emptied: the guest's next touch of its range waits on the fault.
    let (uffd, claim) =
        memory::fault::register_missing(&vmm.ram().tracked()).expect("register missing");
    vmm.ram()
        .discard(GuestAddress(4 << 20), 32 << 20)
        .expect("empty the range");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match uffd.read_event() {
            Ok(Some(userfaultfd::Event::Pagefault { .. })) => break,
            Ok(_) => {}
            Err(e) => panic!("reading the userfaultfd: {e}"),
        }
        assert!(Instant::now() < deadline, "the guest never faulted");
        std::thread::sleep(Duration::from_millis(1));
    }
    let started = Instant::now();
    vmm.freezer()
        .freeze(Duration::from_secs(2))
        .expect("the waiting vCPU left KVM_RUN");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    vmm.pause_frozen().expect("pause");
    vmm.stop();
    memory::fault::unregister_missing(&uffd, &vmm.ram().tracked());
    drop(claim);
}
