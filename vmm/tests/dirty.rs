//! Dirty-page tracking against the real test guest, for every mode: exact page sets,
//! no missed write over 1,000 rounds at full speed, both RAM regions, and a guest whose
//! own verification stays clean while tracked.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use api::action::VmmAction;
use api::VmConfig;
use common::{check, guest_image, InProcess, TempDir};
use memory::dirty::{DirtyBitmap, DirtyTracker, TrackingMode};
use memory::{PAGE_BYTES, PAGE_SIZE};
use vm_memory::{Bytes, GuestAddress};

fn build(console: &Path, mem_mib: u64, args: &str) -> vmm::Vmm {
    let json = format!(
        r#"{{"boot-source": {{"kernel_image_path": "{}", "boot_args": "console=ttyS0 {args}"}},
            "machine-config": {{"vcpu_count": 1, "mem_size_mib": {mem_mib}}},
            "serial": {{"serial_out_path": "{}"}}}}"#,
        guest_image().display(),
        console.display()
    );
    let mut vmm = vmm::build(&VmConfig::from_json(&json).expect("config")).expect("build");
    vmm.start().expect("start");
    vmm
}

fn wait_for_console(path: &Path, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.contains(needle) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no {needle:?} on the console:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The guest's `in_round`: the pages it writes in a round.
fn in_round(page: u64, round: u64) -> bool {
    check(page, round).is_multiple_of(4)
}

fn in_range(b: &DirtyBitmap, start: u64, size: u64) -> Vec<u64> {
    b.guest_pages()
        .map(|a| a.0)
        .filter(|a| *a >= start && *a < start + size)
        .collect()
}

/// The host starts each round through the mailbox; after the guest says it is done,
/// `collect` must report exactly that round's pages of the range, and the mailbox.
fn exact_rounds(mode: TrackingMode, mem_mib: u64, start: u64, size: u64) {
    let hot_mode = matches!(
        mode,
        TrackingMode::KvmDirtyLogHot | TrackingMode::UffdAsyncHot
    );
    let mut previous: Vec<u64> = Vec::new();
    let mut hot: std::collections::BTreeSet<u64> = std::collections::BTreeSet::new();
    let dir = TempDir::new("dirty-exact");
    let console = dir.path().join("console.log");
    let mailbox = GuestAddress(0x80_0000);
    let args = format!(
        "workload=rounds start={start:#x} size={size:#x} mailbox={:#x}",
        mailbox.0
    );
    let mut vmm = build(&console, mem_mib, &args);
    wait_for_console(&console, "ferry-guest: mailbox");
    let mut tracker = vmm.dirty_tracker(mode).expect("tracker");
    tracker.start().expect("start");
    tracker.collect().expect("first collect");
    for round in 1..=20u64 {
        vmm.ram()
            .write(&round.to_le_bytes(), mailbox)
            .expect("mailbox");
        let deadline = Instant::now() + Duration::from_secs(10);
        while vmm
            .ram()
            .memory()
            .read_obj::<u64>(GuestAddress(mailbox.0 + 8))
            .expect("read")
            != round
        {
            assert!(
                Instant::now() < deadline,
                "{mode:?}: the guest never finished round {round}"
            );
            std::hint::spin_loop();
        }
        let got = tracker.collect().expect("collect");
        let want: Vec<u64> = (start..start + size)
            .step_by(PAGE_BYTES)
            .filter(|p| in_round(*p, round))
            .collect();
        // With hot retention, pages reported in two rounds in a row stay writable and
        // are reported every round from then on: a superset, simulated here exactly.
        let want: Vec<u64> = if hot_mode {
            let expected: std::collections::BTreeSet<u64> =
                want.iter().copied().chain(hot.iter().copied()).collect();
            hot.extend(expected.iter().filter(|p| previous.contains(p)));
            previous = expected.iter().copied().collect();
            expected.into_iter().collect()
        } else {
            want
        };
        assert!(
            want.len() > (size / PAGE_SIZE / 8) as usize,
            "the round writes a quarter of the pages"
        );
        assert_eq!(
            in_range(&got, start, size),
            want,
            "{mode:?} round {round}: reported pages differ from written ones"
        );
        assert!(
            got.guest_pages().any(|a| a == mailbox),
            "{mode:?} round {round}: the mailbox page was written"
        );
    }
    tracker.stop().expect("stop");
    vmm.stop();
}

#[test]
fn test_collect_reports_exactly_the_pages_the_guest_wrote() {
    for mode in TrackingMode::ALL {
        exact_rounds(mode, 256, 0x100_0000, 16 << 20);
    }
}

#[test]
fn test_hot_retention_reports_written_and_hot_pages_exactly() {
    exact_rounds(TrackingMode::KvmDirtyLogHot, 256, 0x100_0000, 16 << 20);
}

#[test]
fn test_uffd_async_hot_retention_reports_written_and_hot_pages_exactly() {
    exact_rounds(TrackingMode::UffdAsyncHot, 256, 0x100_0000, 16 << 20);
}

#[test]
fn test_collect_covers_ram_above_4g() {
    for mode in TrackingMode::ALL {
        exact_rounds(mode, 5 * 1024, 1 << 32, 8 << 20);
    }
}

/// A host copy of the range, refreshed only from the pages `collect` reports, must equal
/// guest memory after a final collect with the guest paused: any missed write would
/// leave a stale page behind.
#[test]
fn test_no_write_missed_over_1000_rounds_at_full_speed() {
    const START: u64 = 0x100_0000;
    const SIZE: usize = 8 << 20;
    // The hot-page variants report a superset, which this test allows.
    for mode in TrackingMode::ALL
        .into_iter()
        .chain([TrackingMode::KvmDirtyLogHot, TrackingMode::UffdAsyncHot])
    {
        let dir = TempDir::new("dirty-miss");
        let console = dir.path().join("console.log");
        let mut vmm = build(
            &console,
            256,
            &format!("workload=dirty start={START:#x} size={SIZE:#x} rate=0"),
        );
        wait_for_console(&console, "ferry-guest: workload dirty");
        let mem = vmm.ram().memory().clone();
        let mut tracker = vmm.dirty_tracker(mode).expect("tracker");
        tracker.start().expect("start");
        let mut shadow = vec![0u8; SIZE];
        mem.read_slice(&mut shadow, GuestAddress(START))
            .expect("initial copy");
        let mut refresh = |b: &DirtyBitmap| {
            let pages = in_range(b, START, SIZE as u64);
            for p in &pages {
                let at = usize::try_from(p - START).expect("inside the range");
                mem.read_slice(&mut shadow[at..at + PAGE_BYTES], GuestAddress(*p))
                    .expect("copy page");
            }
            pages.len()
        };
        let mut reported = 0;
        for _ in 0..1000 {
            reported += refresh(&tracker.collect().expect("collect"));
            // Rounds are spaced, as in migration; back-to-back re-protection would
            // starve the guest instead of testing it.
            std::thread::sleep(Duration::from_millis(1));
        }
        vmm.pause().expect("pause");
        refresh(&tracker.collect().expect("final collect"));
        let mut now = vec![0u8; SIZE];
        mem.read_slice(&mut now, GuestAddress(START)).expect("read");
        let stale = (0..SIZE)
            .step_by(PAGE_BYTES)
            .find(|at| shadow[*at..*at + 4096] != now[*at..*at + 4096]);
        assert_eq!(
            stale.map(|at| START + at as u64),
            None,
            "{mode:?}: a write was missed"
        );
        assert!(
            reported >= 2 * SIZE / PAGE_BYTES,
            "{mode:?}: the guest kept writing during the rounds ({reported} pages)"
        );
        tracker.stop().expect("stop");
        vmm.stop();
    }
}

#[test]
fn test_verify_stays_ok_while_tracked() {
    for mode in TrackingMode::ALL
        .into_iter()
        .chain([TrackingMode::KvmDirtyLogHot])
    {
        let dir = TempDir::new("dirty-verify");
        let console = dir.path().join("console.log");
        let mut vmm = build(&console, 256, "workload=verify size=8M");
        wait_for_console(&console, "pass 2 ok");
        let mut tracker = vmm.dirty_tracker(mode).expect("tracker");
        tracker.start().expect("start");
        let passes = || {
            std::fs::read_to_string(&console)
                .unwrap_or_default()
                .matches(" ok\n")
                .count()
        };
        let before = passes();
        // Collect every 2 ms until the guest has verified 3 more passes under tracking.
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut collects = 0;
        while passes() < before + 3 || collects < 100 {
            assert!(
                Instant::now() < deadline,
                "{mode:?}: the guest made no progress while tracked"
            );
            tracker.collect().expect("collect");
            collects += 1;
            std::thread::sleep(Duration::from_millis(2));
        }
        tracker.stop().expect("stop");
        vmm.pause().expect("pause");
        let text = std::fs::read_to_string(&console).unwrap_or_default();
        assert!(!text.contains("corrupt"), "{mode:?}:\n{text}");
        vmm.stop();
    }
}

/// A host copy of a range, refreshed only from the pages a tracker reports.
struct Shadow {
    tracker: Box<dyn DirtyTracker>,
    copy: Vec<u8>,
    start: u64,
}

impl Shadow {
    fn new(
        mut tracker: Box<dyn DirtyTracker>,
        mem: &memory::GuestMemoryMmap,
        start: u64,
        size: usize,
    ) -> Shadow {
        tracker.start().expect("start tracking");
        let mut copy = vec![0u8; size];
        mem.read_slice(&mut copy, GuestAddress(start))
            .expect("initial copy");
        Shadow {
            tracker,
            copy,
            start,
        }
    }

    fn refresh(&mut self, mem: &memory::GuestMemoryMmap) {
        let got = self.tracker.collect().expect("collect");
        for p in in_range(&got, self.start, self.copy.len() as u64) {
            let at = usize::try_from(p - self.start).expect("inside the range");
            mem.read_slice(&mut self.copy[at..at + PAGE_BYTES], GuestAddress(p))
                .expect("copy page");
        }
    }

    /// The first page whose copy is stale.
    fn stale(&self, mem: &memory::GuestMemoryMmap) -> Option<u64> {
        let mut now = vec![0u8; self.copy.len()];
        mem.read_slice(&mut now, GuestAddress(self.start))
            .expect("read");
        (0..self.copy.len())
            .step_by(PAGE_BYTES)
            .find(|at| self.copy[*at..*at + PAGE_BYTES] != now[*at..*at + PAGE_BYTES])
            .map(|at| self.start + at as u64)
    }
}

/// The guest's `blk` workload reads its disk back into its own memory: those are
/// device writes, made by ferry. Trackers collect every 3 ms while it runs, several at
/// once where the mechanisms allow, and a final collect after the VM paused (devices
/// included) must leave each tracker's copy of the driver's memory equal to the guest's.
fn device_writes_are_tracked(modes: &[TrackingMode]) {
    const START: u64 = 0x100_0000;
    const SIZE: usize = 4 << 20;
    let dir = TempDir::new("dirty-blk");
    let disk = dir.write("disk.img", vec![0u8; 4 << 20]);
    let console = dir.path().join("console.log");
    let json = serde_json::json!({
        "boot-source": {
            "kernel_image_path": guest_image(),
            "boot_args": format!("console=ttyS0 workload=blk start={START:#x} size={SIZE:#x} depth=8"),
        },
        "machine-config": { "vcpu_count": 1, "mem_size_mib": 128 },
        "drives": [{ "drive_id": "disk0", "path_on_host": disk, "is_root_device": false }],
        "serial": { "serial_out_path": console },
    });
    let config = VmConfig::from_json(&json.to_string()).expect("config");
    let mut vm = vmm::build(&config).expect("build");
    let mem = vm.ram().memory().clone();
    let trackers: Vec<_> = modes
        .iter()
        .map(|m| vm.dirty_tracker(*m).expect("tracker"))
        .collect();
    vm.start().expect("start");
    let vmm = InProcess::run(&config, vm);
    wait_for_console(&console, "blk pass 1 ok");
    let mut shadows: Vec<Shadow> = trackers
        .into_iter()
        .map(|t| Shadow::new(t, &mem, START, SIZE))
        .collect();
    let read_bytes = |vmm: &InProcess| {
        vmm.json(VmmAction::GetMetrics)["virtio"]["block"]["disk0"]["read_bytes"]
            .as_u64()
            .expect("read_bytes")
    };
    let read_before = read_bytes(&vmm);
    for _ in 0..300 {
        for s in &mut shadows {
            s.refresh(&mem);
        }
        std::thread::sleep(Duration::from_millis(3));
    }
    assert!(vmm.ask(VmmAction::Pause).is_ok(), "pause");
    let read = read_bytes(&vmm) - read_before;
    assert!(
        read >= 4 << 20,
        "the device wrote guest memory while tracked: {read} bytes"
    );
    for (s, mode) in shadows.iter_mut().zip(modes) {
        s.refresh(&mem);
        assert_eq!(s.stale(&mem), None, "{mode:?}: a write was missed");
    }
    for s in &mut shadows {
        s.tracker.stop().expect("stop");
    }
    vmm.ask(VmmAction::Resume).expect("resume");
    vmm.ask(VmmAction::SendCtrlAltDel).expect("ctrl-alt-del");
    assert_eq!(vmm.finish(), vmm::ExitReason::GuestStop);
    assert!(!std::fs::read_to_string(&console)
        .unwrap_or_default()
        .contains("error"));
}

#[test]
fn test_device_writes_reach_every_mode() {
    for mode in TrackingMode::ALL
        .into_iter()
        .chain([TrackingMode::KvmDirtyLogHot, TrackingMode::UffdAsyncHot])
    {
        device_writes_are_tracked(&[mode]);
    }
}

/// A userfaultfd tracker and a KVM one at once: each sees every write, ferry's too.
#[test]
fn test_two_trackers_at_once_each_see_every_write() {
    device_writes_are_tracked(&[TrackingMode::UffdAsync, TrackingMode::KvmDirtyLog]);
    device_writes_are_tracked(&[TrackingMode::UffdSync, TrackingMode::KvmDirtyLogHot]);
}

#[test]
fn test_a_second_tracker_of_one_mechanism_is_refused() {
    let dir = TempDir::new("dirty-busy");
    let console = dir.path().join("console.log");
    let mut vmm = build(&console, 64, "workload=idle");
    let mut first = vmm
        .dirty_tracker(TrackingMode::KvmDirtyLog)
        .expect("tracker");
    first.start().expect("start");
    let mut second = vmm
        .dirty_tracker(TrackingMode::KvmDirtyLogHot)
        .expect("tracker");
    let err = second.start().expect_err("KVM's log serves one tracker");
    assert_eq!(
        err.to_string(),
        "cannot start dirty tracking: KVM's dirty log already serves another tracker"
    );
    first.stop().expect("stop");
    second.start().expect("free again");
    second.stop().expect("stop");
    vmm.stop();
}
