//! The test guest's PVH entry, booted by QEMU from the very same ELF that ferry boots
//! through the Linux 64-bit protocol, so ferry's figures can be compared with other VMMs
//! on identical work.

mod common;

use std::process::Command;

use common::guest_image;

#[test]
fn test_guest_boots_through_pvh_in_qemu() {
    let out = Command::new("timeout")
        .args([
            "120",
            "qemu-system-x86_64",
            "-machine",
            "q35,accel=kvm",
            "-cpu",
            "qemu64",
            "-m",
            "128",
        ])
        .args([
            "-nographic",
            "-no-reboot",
            "-monitor",
            "none",
            "-display",
            "none",
            "-serial",
            "stdio",
        ])
        .arg("-kernel")
        .arg(guest_image())
        .args(["-append", "console=ttyS0 workload=verify size=4M passes=2"])
        .output()
        .expect("run qemu-system-x86_64 (scripts/install-deps.sh installs it)");
    let console = String::from_utf8_lossy(&out.stdout).replace('\r', "");
    assert!(
        out.status.success(),
        "QEMU: {}\n{console}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = console
        .lines()
        .map(|l| l.trim_start_matches("Booting from ROM.."))
        .collect();
    assert!(lines.contains(&"ferry-guest: start boot=pvh"), "{console}");
    assert!(
        lines.contains(&"ferry-guest: cmdline console=ttyS0 workload=verify size=4M passes=2"),
        "{console}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("ferry-guest: e820 0x100000-")),
        "{console}"
    );
    let passes: Vec<&&str> = lines.iter().filter(|l| l.starts_with("pass ")).collect();
    assert_eq!(passes, [&"pass 1 ok", &"pass 2 ok"], "{console}");
    assert!(lines.contains(&"ferry-guest: done"), "{console}");
}
