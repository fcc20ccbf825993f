//! Debian's stock kernel boots through ferry's real Linux boot path. On these machines
//! guest kernel code is emulated, so Linux gets as far as its first console lines
//! (banner, command line, e820 map) and no further in reasonable time: that is what these
//! tests check (see ENVIRONMENT.md of the project).

mod common;

use std::time::Duration;

use common::{linux_dir, Ferry, TempDir, TestTap};

/// Emulated early boot clears a 17 MB BSS byte by byte before the first line.
const BANNER: Duration = Duration::from_secs(180);

fn linux_config(kernel: &str, initrd: bool, mem_mib: u64, args: &str) -> String {
    linux_config_with_devices(kernel, initrd, mem_mib, args, "")
}

/// `devices` goes after the machine config: `, "drives": [...]`.
fn linux_config_with_devices(
    kernel: &str,
    initrd: bool,
    mem_mib: u64,
    args: &str,
    devices: &str,
) -> String {
    let dir = linux_dir();
    let initrd = if initrd {
        format!(
            r#", "initrd_path": "{}""#,
            dir.join("initramfs.cpio.gz").display()
        )
    } else {
        String::new()
    };
    format!(
        r#"{{"boot-source": {{"kernel_image_path": "{}", "boot_args": "{args}"{initrd}}},
            "machine-config": {{"vcpu_count": 2, "mem_size_mib": {mem_mib}}}{devices}}}"#,
        dir.join(kernel).display()
    )
}

#[test]
fn test_stock_vmlinux_prints_banner_cmdline_and_e820() {
    let args = "console=ttyS0 earlyprintk=serial,ttyS0,115200 reboot=k panic=1 pci=off nokaslr ferry.test=e820";
    let dir = TempDir::new("linux");
    // A root drive and a network interface: Linux finds them on its command line.
    let disk = dir.write("rootfs.img", vec![0u8; 1 << 20]);
    let tap = TestTap::new("l");
    let devices = format!(
        r#", "drives": [{{"drive_id": "rootfs", "path_on_host": "{}", "is_root_device": true}}],
            "network-interfaces": [{{"iface_id": "eth0", "host_dev_name": "{}", "guest_mac": "06:00:ac:10:00:02"}}]"#,
        disk.display(),
        tap.0
    );
    let config = linux_config_with_devices("vmlinux", true, 5120, args, &devices);
    let mut ferry = Ferry::spawn(&dir.write("vm.json", config));
    let banner = ferry.expect_line("Linux version ", BANNER);
    assert!(banner.contains("Linux version 6."), "{banner}");
    let cmdline = ferry.expect_line("Command line: ", Duration::from_secs(30));
    assert!(
        cmdline.ends_with(&format!(
            "Command line: {args} root=/dev/vda rw \
             virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6"
        )),
        "{cmdline}"
    );
    ferry.expect_line("BIOS-provided physical RAM map:", Duration::from_secs(30));
    let mut e820 = Vec::new();
    while e820.len() < 4 {
        let line = ferry.expect_line("BIOS-e820: ", Duration::from_secs(30));
        e820.push(
            line.split("BIOS-e820: ")
                .nth(1)
                .unwrap_or_default()
                .to_owned(),
        );
    }
    // 5 GiB: 3 GiB below the MMIO hole, 2 GiB above 4 GiB.
    assert_eq!(
        e820,
        [
            "[mem 0x0000000000000000-0x000000000009fbff] usable",
            "[mem 0x000000000009fc00-0x000000000009ffff] reserved",
            "[mem 0x0000000000100000-0x00000000bfffffff] usable",
            "[mem 0x0000000100000000-0x000000017fffffff] usable",
        ]
    );
    // The MP table is found too, before the kernel's crawl goes on.
    ferry.expect_line(
        "found SMP MP-table at [mem 0x0009fc00-0x0009fc0f]",
        Duration::from_secs(60),
    );
    ferry.signal(libc::SIGTERM);
    let (status, _, stderr) = ferry.wait(Duration::from_secs(10));
    assert!(status.success(), "{status}: {stderr}");
}

#[test]
fn test_stock_bzimage_enters_its_decompressor() {
    // The bzImage's own decompressor, entered at its 64-bit entry with boot_params,
    // reads the command line and says so on the serial port.
    let args = "console=ttyS0 earlyprintk=serial,ttyS0,115200 nokaslr";
    let dir = TempDir::new("bzimage");
    let mut ferry = Ferry::spawn(&dir.write("vm.json", linux_config("vmlinuz", false, 256, args)));
    ferry.expect_line("KASLR disabled: 'nokaslr' on cmdline.", BANNER);
    ferry.signal(libc::SIGTERM);
    let (status, _, stderr) = ferry.wait(Duration::from_secs(10));
    assert!(status.success(), "{status}: {stderr}");
}
