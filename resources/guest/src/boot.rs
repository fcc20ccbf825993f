//! What the guest learns from its boot protocol: the command line and the memory map.
//! All reads go through raw physical addresses, which our page tables identity-map.

/// Which protocol entered the guest.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum BootKind {
    /// Linux 64-bit boot protocol, pointer to `boot_params`.
    Linux,
    /// PVH, pointer to `hvm_start_info`.
    Pvh,
}

/// One usable RAM range.
#[derive(Clone, Copy, Default)]
pub struct Range {
    /// Start address.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
    /// E820 type (1 = RAM).
    pub kind: u32,
}

/// At most this many memory-map entries are kept.
pub const MAX_RANGES: usize = 32;

/// Parsed boot information.
pub struct BootInfo {
    /// The command line, as bytes without the terminating NUL.
    pub cmdline: &'static [u8],
    /// The memory map.
    pub ranges: [Range; MAX_RANGES],
    /// Number of valid entries in `ranges`.
    pub nr_ranges: usize,
}

const HVM_START_MAGIC: u32 = 0x336e_c578;
const CMDLINE_MAX: usize = 4096;

fn read<T: Copy>(addr: u64) -> T {
    // SAFETY: the address comes from the VMM's boot structures, which lie in RAM that our
    // page tables identity-map; unaligned reads are allowed.
    unsafe { core::ptr::read_unaligned(addr as *const T) }
}

fn cstr_at(addr: u64) -> &'static [u8] {
    if addr == 0 {
        return &[];
    }
    let mut len = 0;
    while len < CMDLINE_MAX && read::<u8>(addr + len as u64) != 0 {
        len += 1;
    }
    // SAFETY: the `len` bytes at `addr` were just read one by one and are identity-mapped.
    unsafe { core::slice::from_raw_parts(addr as *const u8, len) }
}

impl BootInfo {
    /// Parses the boot structure at `ptr` for the given protocol. Returns `None` when the
    /// structure is not what the protocol promises.
    pub fn parse(kind: BootKind, ptr: u64) -> Option<BootInfo> {
        let mut info = BootInfo {
            cmdline: &[],
            ranges: [Range::default(); MAX_RANGES],
            nr_ranges: 0,
        };
        match kind {
            BootKind::Linux => {
                // boot_params: hdr.cmd_line_ptr at 0x228, ext_cmd_line_ptr at 0xc8,
                // e820_entries at 0x1e8, e820_table at 0x2d0 (20-byte entries).
                let cmd = read::<u32>(ptr + 0x228) as u64 | (read::<u32>(ptr + 0xc8) as u64) << 32;
                info.cmdline = cstr_at(cmd);
                let n = (read::<u8>(ptr + 0x1e8) as usize).min(MAX_RANGES);
                for i in 0..n {
                    let e = ptr + 0x2d0 + 20 * i as u64;
                    info.ranges[i] = Range {
                        start: read(e),
                        len: read(e + 8),
                        kind: read(e + 16),
                    };
                }
                info.nr_ranges = n;
            }
            BootKind::Pvh => {
                // hvm_start_info: magic at 0, cmdline_paddr at 24, memmap_paddr at 40,
                // memmap_entries at 48; memmap entries are 24 bytes.
                if read::<u32>(ptr) != HVM_START_MAGIC {
                    return None;
                }
                info.cmdline = cstr_at(read(ptr + 24));
                let map: u64 = read(ptr + 40);
                let n = (read::<u32>(ptr + 48) as usize).min(MAX_RANGES);
                for i in 0..n {
                    let e = map + 24 * i as u64;
                    info.ranges[i] = Range {
                        start: read(e),
                        len: read(e + 8),
                        kind: read(e + 16),
                    };
                }
                info.nr_ranges = n;
            }
        }
        Some(info)
    }

    /// The memory-map entries.
    pub fn ranges(&self) -> &[Range] {
        &self.ranges[..self.nr_ranges]
    }

    /// The value of `key=value` on the command line, if present.
    pub fn arg(&self, key: &str) -> Option<&'static [u8]> {
        self.cmdline.split(|b| *b == b' ').find_map(|word| {
            let rest = word.strip_prefix(key.as_bytes())?;
            rest.strip_prefix(b"=")
        })
    }
}

/// Parses a number: decimal or 0x-hex, with an optional K/M/G suffix.
pub fn parse_size(s: &[u8]) -> Option<u64> {
    let (digits, shift) = match s.last()? {
        b'K' | b'k' => (&s[..s.len() - 1], 10),
        b'M' | b'm' => (&s[..s.len() - 1], 20),
        b'G' | b'g' => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    let (digits, radix) = match digits.strip_prefix(b"0x") {
        Some(hex) => (hex, 16),
        None => (digits, 10),
    };
    if digits.is_empty() {
        return None;
    }
    let mut v: u64 = 0;
    for &d in digits {
        let digit = (d as char).to_digit(radix)? as u64;
        v = v.checked_mul(radix as u64)?.checked_add(digit)?;
    }
    v.checked_mul(1 << shift)
}
