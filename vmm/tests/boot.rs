//! The test guest boots through `ferry --config-file` and reports on its console.

mod common;

use std::time::Duration;

use common::{guest_config, guest_image, run_refused, Ferry, TempDir};

const BOOT: Duration = Duration::from_secs(20);

fn boot_and_verify(vcpus: u32, mem_mib: u64, expected_e820: &[&str]) {
    let dir = TempDir::new("boot");
    let config = dir.write(
        "vm.json",
        guest_config(vcpus, mem_mib, "workload=verify size=8M passes=3"),
    );
    let mut ferry = Ferry::spawn(&config);
    let (status, console, stderr) = {
        ferry.expect_line("ferry-guest: done", BOOT);
        ferry.wait(BOOT)
    };
    assert!(
        status.success(),
        "guest reboot must end ferry with 0, got {status}; stderr: {stderr}"
    );
    assert_eq!(
        console[0], "ferry-guest: start boot=linux64",
        "the first line comes at once"
    );
    assert_eq!(
        console[1],
        "ferry-guest: cmdline console=ttyS0 workload=verify size=8M passes=3"
    );
    let e820: Vec<&str> = console
        .iter()
        .filter_map(|l| l.strip_prefix("ferry-guest: e820 "))
        .collect();
    assert_eq!(e820, expected_e820);
    assert!(
        console.contains(&format!("ferry-guest: cpus {vcpus}")),
        "{console:?}"
    );
    let passes: Vec<&String> = console.iter().filter(|l| l.starts_with("pass ")).collect();
    assert_eq!(passes, ["pass 1 ok", "pass 2 ok", "pass 3 ok"]);
}

#[test]
fn test_guest_boots_with_one_vcpu() {
    boot_and_verify(
        1,
        64,
        &[
            "0x0-0x9fc00 ram",
            "0x9fc00-0xa0000 reserved",
            "0x100000-0x4000000 ram",
        ],
    );
}

#[test]
fn test_guest_boots_with_four_vcpus_and_ram_above_4g() {
    boot_and_verify(
        4,
        5120,
        &[
            "0x0-0x9fc00 ram",
            "0x9fc00-0xa0000 reserved",
            "0x100000-0xc0000000 ram",
            "0x100000000-0x180000000 ram",
        ],
    );
}

#[test]
fn test_guest_sees_tsc_frequency_from_cpuid() {
    let dir = TempDir::new("tsc");
    let mut ferry = Ferry::spawn(&dir.write(
        "vm.json",
        guest_config(1, 32, "workload=verify size=1M passes=1"),
    ));
    let line = ferry.expect_line("ferry-guest: tsc_khz ", BOOT);
    let khz: u64 = line
        .rsplit(' ')
        .next()
        .and_then(|v| v.parse().ok())
        .expect("a number");
    assert!(khz > 100_000, "TSC of {khz} kHz is not plausible");
}

#[test]
fn test_triple_fault_ends_ferry_with_vcpu_exit_and_rip() {
    let dir = TempDir::new("fault");
    let mut ferry = Ferry::spawn(&dir.write("vm.json", guest_config(2, 32, "workload=fault")));
    ferry.expect_line("triple fault on purpose", BOOT);
    let (status, _, stderr) = ferry.wait(BOOT);
    assert_eq!(status.code(), Some(1), "stderr: {stderr}");
    assert!(
        stderr
            .contains("ferry: guest failed: vCPU 0: triple fault (KVM_EXIT_SHUTDOWN) at RIP 0x10"),
        "stderr: {stderr}"
    );
}

#[test]
fn test_sigterm_stops_a_running_guest_cleanly() {
    let dir = TempDir::new("sigterm");
    let mut ferry = Ferry::spawn(&dir.write("vm.json", guest_config(2, 64, "workload=idle")));
    ferry.expect_line("ferry-guest: idle", BOOT);
    ferry.signal(libc::SIGTERM);
    let (status, _, stderr) = ferry.wait(BOOT);
    assert!(status.success(), "{status}: {stderr}");
}

#[test]
fn test_bad_guest_arguments_are_reported_by_the_guest() {
    let dir = TempDir::new("badargs");
    let mut ferry = Ferry::spawn(&dir.write(
        "vm.json",
        guest_config(1, 32, "workload=verify start=0x10000000"),
    ));
    ferry.expect_line("ferry-guest: error: start= is not in usable RAM", BOOT);
    let (status, _, stderr) = ferry.wait(BOOT);
    assert_eq!(
        status.code(),
        Some(1),
        "a guest error must fail the run; stderr: {stderr}"
    );
}

#[test]
fn test_idle_guest_halts_at_cpl0_and_prints_two_lines() {
    for args in ["workload=idle", "quiet"] {
        let dir = TempDir::new("idle");
        let mut ferry = Ferry::spawn(&dir.write("vm.json", guest_config(1, 32, args)));
        ferry.expect_line("ferry-guest: idle", BOOT);
        assert_eq!(
            ferry.console(),
            ["ferry-guest: start boot=linux64", "ferry-guest: idle"],
            "{args}"
        );
        ferry.signal(libc::SIGTERM);
        let (status, _, stderr) = ferry.wait(BOOT);
        assert!(status.success(), "{status}: {stderr}");
    }
}

/// Each bad input: exit code 1, a message naming the problem, no panic.
#[test]
fn test_bad_input_gets_clear_error_and_nonzero_exit() {
    let dir = TempDir::new("badinput");
    let guest = guest_image();
    let guest_bytes = std::fs::read(&guest).expect("read guest");
    let truncated = dir.write("truncated.elf", &guest_bytes[..200]);
    let empty_initrd = dir.write("empty.initrd", b"");
    let kernel = guest.display().to_string();
    let machine = |m: &str| {
        format!(r#"{{"boot-source": {{"kernel_image_path": "{kernel}"}}, "machine-config": {m}}}"#)
    };
    let cases: Vec<(&str, String, String)> = vec![
        (
            "missing kernel",
            r#"{"boot-source": {"kernel_image_path": "/nonexistent/vmlinux"}}"#.into(),
            "boot-source.kernel_image_path: /nonexistent/vmlinux does not exist".into(),
        ),
        (
            "truncated ELF",
            format!(
                r#"{{"boot-source": {{"kernel_image_path": "{}"}}}}"#,
                truncated.display()
            ),
            format!("kernel {} is not a valid kernel image", truncated.display()),
        ),
        (
            "zero-byte initrd",
            format!(
                r#"{{"boot-source": {{"kernel_image_path": "{kernel}", "initrd_path": "{}"}}}}"#,
                empty_initrd.display()
            ),
            format!("initrd {} is empty", empty_initrd.display()),
        ),
        (
            "0 MiB",
            machine(r#"{"vcpu_count": 1, "mem_size_mib": 0}"#),
            "machine-config.mem_size_mib: 0 is out of range".into(),
        ),
        (
            "1 EiB",
            machine(r#"{"vcpu_count": 1, "mem_size_mib": 1099511627776}"#),
            "memory size 1099511627776 MiB does not fit in the".into(),
        ),
        (
            "u64::MAX MiB",
            machine(r#"{"vcpu_count": 1, "mem_size_mib": 18446744073709551615}"#),
            "memory size 18446744073709551615 MiB does not fit in the".into(),
        ),
        (
            "0 vCPUs",
            machine(r#"{"vcpu_count": 0, "mem_size_mib": 64}"#),
            "machine-config.vcpu_count: 0 is out of range: it must be 1 to 32".into(),
        ),
        (
            "1000 vCPUs",
            machine(r#"{"vcpu_count": 1000, "mem_size_mib": 64}"#),
            "machine-config.vcpu_count: 1000 is out of range: it must be 1 to 32".into(),
        ),
        (
            "unknown field",
            machine(r#"{"vcpu_count": 1, "mem_size_mib": 64, "bogus": 1}"#),
            "unknown field `bogus`".into(),
        ),
        (
            "not JSON",
            "{boot-source".into(),
            "invalid configuration: key must be a string".into(),
        ),
        (
            "unsupported section",
            format!(r#"{{"boot-source": {{"kernel_image_path": "{kernel}"}}, "balloon": {{}}}}"#),
            "the \"balloon\" section is not supported by ferry yet".into(),
        ),
    ];
    for (name, json, expected) in cases {
        let config = dir.write("bad.json", json);
        let (code, stderr) = run_refused(&config);
        assert_eq!(code, Some(1), "{name}: exit code; stderr: {stderr}");
        assert!(
            stderr.contains(&expected),
            "{name}: expected {expected:?} in stderr: {stderr}"
        );
        assert!(
            !stderr.contains("panicked"),
            "{name}: ferry panicked: {stderr}"
        );
    }
    let (code, stderr) = run_refused(&dir.path().join("no-such-config.json"));
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains("no-such-config.json: No such file or directory"),
        "{stderr}"
    );
}

#[test]
fn test_64_gib_guest_boots_without_touching_its_memory() {
    let dir = TempDir::new("64g");
    let mut ferry =
        Ferry::spawn(&dir.write("vm.json", guest_config(1, 64 * 1024, "workload=idle")));
    ferry.expect_line("ferry-guest: idle", BOOT);
    let pid = ferry.pid();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let shmem_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("RssShmem:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("RssShmem");
    assert!(
        shmem_kib < 64 * 1024,
        "a 64 GiB idle guest has {shmem_kib} KiB of guest RAM resident"
    );
    ferry.signal(libc::SIGTERM);
    let (status, _, stderr) = ferry.wait(BOOT);
    assert!(status.success(), "{status}: {stderr}");
}
