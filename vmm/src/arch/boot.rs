//! Loading a Linux kernel (vmlinux ELF or bzImage), an initrd and the command line, and
//! filling `boot_params` with the e820 map, per the Linux x86 boot protocol.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use linux_loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::Elf;
use linux_loader::loader::KernelLoader;
use memory::GuestMemoryMmap;
use memory::GuestRam;
use vm_memory::{Bytes, GuestAddress};

use super::layout::{CMDLINE, CMDLINE_MAX, EBDA, EBDA_END, HIMEM, ZERO_PAGE};

/// Why a guest could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel file cannot be opened or read.
    #[error("cannot read kernel {}: {source}", path.display())]
    KernelFile {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The file is neither a vmlinux ELF nor a bzImage, or is damaged.
    #[error("kernel {} is not a valid kernel image: {reason}", path.display())]
    InvalidKernel {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The initrd cannot be read.
    #[error("cannot read initrd {}: {source}", path.display())]
    InitrdFile {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The initrd is empty.
    #[error("initrd {} is empty", path.display())]
    EmptyInitrd {
        /// The file.
        path: PathBuf,
    },
    /// The initrd does not fit in guest memory below the kernel's limit.
    #[error("initrd {} ({size} bytes) does not fit in guest memory", path.display())]
    InitrdTooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
    /// The command line is too long or malformed.
    #[error("invalid kernel command line: {0}")]
    Cmdline(String),
    /// Writing boot structures failed.
    #[error("cannot write {what} to guest memory: {reason}")]
    Memory {
        /// What was being written.
        what: &'static str,
        /// The error.
        reason: String,
    },
}

/// What the vCPU needs to start the kernel.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    /// 64-bit entry point.
    pub entry: GuestAddress,
    /// First byte past the kernel image.
    pub end: u64,
    /// The bzImage setup header, for boot_params.
    setup_header: Option<linux_loader::bootparam::setup_header>,
}

const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
/// Offset of the 64-bit entry point in a bzImage's protected-mode code (startup_64).
const BZIMAGE_ENTRY_64: u64 = 0x200;

/// Loads a vmlinux ELF or a bzImage, whichever `path` holds.
pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<LoadedKernel, BootError> {
    let file_err = |source| BootError::KernelFile {
        path: path.to_owned(),
        source,
    };
    let mut file = File::open(path).map_err(file_err)?;
    let mut magic = [0u8; 4];
    let invalid = |reason: String| BootError::InvalidKernel {
        path: path.to_owned(),
        reason,
    };
    if let Err(e) = file.read_exact(&mut magic) {
        return Err(match e.kind() {
            std::io::ErrorKind::UnexpectedEof => invalid("the file is too short".into()),
            _ => file_err(e),
        });
    }
    if &magic == ELF_MAGIC {
        let r = Elf::load(mem, None, &mut file, Some(HIMEM)).map_err(|e| invalid(e.to_string()))?;
        Ok(LoadedKernel {
            entry: r.kernel_load,
            end: r.kernel_end,
            setup_header: None,
        })
    } else {
        let r = BzImage::load(mem, None, &mut file, Some(HIMEM))
            .map_err(|e| invalid(format!("not a vmlinux ELF, and as a bzImage: {e}")))?;
        Ok(LoadedKernel {
            entry: GuestAddress(r.kernel_load.0 + BZIMAGE_ENTRY_64),
            end: r.kernel_end,
            setup_header: r.setup_header,
        })
    }
}

/// Where an initrd sits: page-aligned, as high as possible in low RAM.
#[derive(Debug, Clone, Copy)]
pub struct LoadedInitrd {
    /// Its address.
    pub addr: GuestAddress,
    /// Its size.
    pub size: u64,
}

/// Loads the initrd at the top of the first RAM region, below the kernel's limit, above
/// the kernel.
pub fn load_initrd(
    ram: &GuestRam,
    kernel: &LoadedKernel,
    path: &Path,
) -> Result<LoadedInitrd, BootError> {
    let data = std::fs::read(path).map_err(|source| BootError::InitrdFile {
        path: path.to_owned(),
        source,
    })?;
    if data.is_empty() {
        return Err(BootError::EmptyInitrd {
            path: path.to_owned(),
        });
    }
    let size = data.len() as u64;
    let too_large = || BootError::InitrdTooLarge {
        path: path.to_owned(),
        size,
    };
    let max_addr = kernel
        .setup_header
        .map(|h| u64::from(h.initrd_addr_max))
        .filter(|m| *m != 0)
        .unwrap_or(u32::MAX as u64);
    let low_end = ram.regions()[0].size.min(max_addr + 1);
    let addr = low_end.checked_sub(size).ok_or_else(too_large)? & !0xfff;
    if addr < kernel.end.max(HIMEM.0) {
        return Err(too_large());
    }
    ram.memory()
        .write_slice(&data, GuestAddress(addr))
        .map_err(|e| BootError::Memory {
            what: "the initrd",
            reason: e.to_string(),
        })?;
    Ok(LoadedInitrd {
        addr: GuestAddress(addr),
        size,
    })
}

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;

/// The e820 map ferry gives guests: conventional memory, the EBDA (reserved, it holds
/// the MP table), and RAM from 1 MiB in one or two regions around the MMIO hole.
pub fn e820_map(ram: &GuestRam) -> Vec<(u64, u64, u32)> {
    let mut map = vec![
        (0, EBDA.0, E820_RAM),
        (EBDA.0, EBDA_END.0 - EBDA.0, E820_RESERVED),
    ];
    for r in ram.regions() {
        let start = r.guest_addr.0.max(HIMEM.0);
        let end = r.guest_addr.0 + r.size;
        if end > start {
            map.push((start, end - start, E820_RAM));
        }
    }
    map
}

/// Writes the command line and `boot_params` (with the e820 map) to guest memory.
pub fn write_boot_params(
    ram: &GuestRam,
    kernel: &LoadedKernel,
    initrd: Option<&LoadedInitrd>,
    cmdline: &str,
) -> Result<(), BootError> {
    if cmdline.len() >= CMDLINE_MAX {
        return Err(BootError::Cmdline(format!(
            "{} bytes is longer than the {} Linux accepts",
            cmdline.len(),
            CMDLINE_MAX - 1
        )));
    }
    if cmdline.bytes().any(|b| b == 0 || !b.is_ascii()) {
        return Err(BootError::Cmdline(
            "it must be ASCII without NUL bytes".into(),
        ));
    }
    let mem = ram.memory();
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, CMDLINE)
        .map_err(|e| BootError::Memory {
            what: "the command line",
            reason: e.to_string(),
        })?;

    let below_4g = |what: &'static str, v: u64| {
        u32::try_from(v).map_err(|_| BootError::Memory {
            what,
            reason: format!("{v:#x} is not below 4 GiB"),
        })
    };
    let mut params = boot_params::default();
    if let Some(hdr) = kernel.setup_header {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = below_4g("the command line", CMDLINE.0)?;
    params.hdr.cmdline_size = below_4g("the command line", bytes.len() as u64)?;
    if params.hdr.kernel_alignment == 0 {
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    }
    if let Some(initrd) = initrd {
        params.hdr.ramdisk_image = below_4g("the initrd", initrd.addr.0)?;
        params.hdr.ramdisk_size = below_4g("the initrd", initrd.size)?;
    }
    let map = e820_map(ram);
    for (slot, (addr, size, type_)) in params.e820_table.iter_mut().zip(&map) {
        *slot = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: *type_,
        };
    }
    params.e820_entries = u8::try_from(map.len()).map_err(|_| BootError::Memory {
        what: "the e820 map",
        reason: format!("{} entries", map.len()),
    })?;

    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new(&params, ZERO_PAGE),
        mem,
    )
    .map_err(|e| BootError::Memory {
        what: "boot_params",
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn ram(mib: u64) -> GuestRam {
        GuestRam::new(mib, 46).expect("guest ram")
    }

    fn temp_file(name: &str, bytes: &[u8]) -> PathBuf {
        let path =
            std::env::temp_dir().join(format!("ferry-boot-test-{}-{name}", std::process::id()));
        File::create(&path)
            .and_then(|mut f| f.write_all(bytes))
            .expect("write temp file");
        path
    }

    #[test]
    fn test_missing_kernel_names_file() {
        let err = load_kernel(ram(16).memory(), Path::new("/nonexistent/vmlinux"))
            .expect_err("must fail");
        let msg = err.to_string();
        assert!(
            msg.contains("/nonexistent/vmlinux") && msg.contains("No such file"),
            "{msg}"
        );
    }

    #[test]
    fn test_truncated_elf_is_rejected_with_reason() {
        let path = temp_file("truncated", b"\x7fELF\x02\x01\x01\0\0\0");
        let err = load_kernel(ram(16).memory(), &path).expect_err("must fail");
        let msg = err.to_string();
        assert!(
            msg.contains("not a valid kernel image") && msg.contains(path.to_str().expect("utf-8")),
            "{msg}"
        );
        std::fs::remove_file(path).ok();
    }

    #[test]
    fn test_text_file_is_not_a_kernel() {
        let path = temp_file("text", &[b'x'; 8192]);
        let err = load_kernel(ram(16).memory(), &path).expect_err("must fail");
        assert!(err.to_string().contains("not a vmlinux ELF"), "{err}");
        std::fs::remove_file(path).ok();
    }

    #[test]
    fn test_empty_initrd_is_rejected() {
        let path = temp_file("initrd", b"");
        let kernel = LoadedKernel {
            entry: HIMEM,
            end: 0x20_0000,
            setup_header: None,
        };
        let err = load_initrd(&ram(16), &kernel, &path).expect_err("must fail");
        assert!(err.to_string().contains("is empty"), "{err}");
        std::fs::remove_file(path).ok();
    }

    #[test]
    fn test_initrd_goes_to_top_of_low_ram() {
        let path = temp_file("initrd-ok", &[7u8; 5000]);
        let kernel = LoadedKernel {
            entry: HIMEM,
            end: 0x20_0000,
            setup_header: None,
        };
        let r = ram(32);
        let initrd = load_initrd(&r, &kernel, &path).expect("load");
        assert_eq!(initrd.addr.0, (32 << 20) - 8192);
        assert_eq!(r.memory().read_obj::<u8>(initrd.addr).expect("read"), 7);
        std::fs::remove_file(path).ok();
    }

    #[test]
    fn test_e820_splits_around_mmio_hole() {
        let map = e820_map(&ram(4096));
        assert_eq!(map[2], (HIMEM.0, (3 << 30) - HIMEM.0, E820_RAM));
        assert_eq!(map[3], (4 << 30, 1 << 30, E820_RAM));
    }

    #[test]
    fn test_cmdline_limits() {
        let r = ram(16);
        let k = LoadedKernel {
            entry: HIMEM,
            end: 0x20_0000,
            setup_header: None,
        };
        let long = "x".repeat(CMDLINE_MAX);
        assert!(matches!(
            write_boot_params(&r, &k, None, &long),
            Err(BootError::Cmdline(_))
        ));
        write_boot_params(&r, &k, None, "console=ttyS0").expect("short line");
        let p: boot_params = r.memory().read_obj(ZERO_PAGE).expect("read");
        let ptr = p.hdr.cmd_line_ptr;
        assert_eq!(u64::from(ptr), CMDLINE.0);
        assert_eq!(p.e820_entries, 3);
    }
}
