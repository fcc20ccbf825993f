//! Opening a userfaultfd that can write-protect guest RAM and that KVM's faults reach.

use userfaultfd::{FeatureFlags, RegisterMode, Uffd, UffdBuilder};

use super::{DirtyError, TrackedRam};

/// Opens a userfaultfd with `features`, naming the first one the kernel lacks.
pub fn open(features: &[(u64, &'static str)], mode: &'static str) -> Result<Uffd, DirtyError> {
    let builder = |bits: u64| {
        let mut b = UffdBuilder::new();
        // KVM's accesses to guest RAM are kernel-mode faults: a user-mode-only uffd
        // would turn them into errors instead of events (ENVIRONMENT.md).
        b.close_on_exec(true)
            .non_blocking(true)
            .user_mode_only(false)
            .require_features(FeatureFlags::from_bits_retain(bits));
        b
    };
    let all = features.iter().fold(0, |acc, (bit, _)| acc | bit);
    match builder(all).create() {
        Ok(uffd) => Ok(uffd),
        Err(source) => {
            for (bit, name) in features {
                if builder(*bit).create().is_err() {
                    return Err(DirtyError::MissingFeature(name, mode));
                }
            }
            Err(DirtyError::Uffd {
                what: "UFFDIO_API",
                source,
            })
        }
    }
}

/// Runs one userfaultfd operation over each region's whole mapping.
fn each_region(
    ram: &TrackedRam,
    what: &'static str,
    op: impl Fn(*mut libc::c_void, usize) -> userfaultfd::Result<()>,
) -> Result<(), DirtyError> {
    for r in &ram.regions {
        op(r.host_addr as *mut libc::c_void, region_len(r)?).map_err(failed(what))?;
    }
    Ok(())
}

/// The error for a failed userfaultfd operation `what`.
fn failed(what: &'static str) -> impl Fn(userfaultfd::Error) -> DirtyError {
    move |source| DirtyError::Uffd { what, source }
}

/// Registers every region for write-protect tracking.
pub fn register(uffd: &Uffd, ram: &TrackedRam) -> Result<(), DirtyError> {
    each_region(ram, "UFFDIO_REGISTER", |addr, len| {
        uffd.register_with_mode(addr, len, RegisterMode::WRITE_PROTECT)
            .map(drop)
    })
}

/// Write-protects every region.
pub fn protect_all(uffd: &Uffd, ram: &TrackedRam) -> Result<(), DirtyError> {
    each_region(ram, "UFFDIO_WRITEPROTECT", |addr, len| {
        uffd.write_protect(addr, len)
    })
}

/// Write-protects memfd pages `first..first+count` (`on`), or removes the protection.
pub fn protect_run(
    uffd: &Uffd,
    ram: &TrackedRam,
    first: usize,
    count: usize,
    on: bool,
) -> Result<(), DirtyError> {
    for (addr, len) in ram.host_ranges(first, count) {
        let (done, what) = if on {
            (uffd.write_protect(addr, len), "UFFDIO_WRITEPROTECT")
        } else {
            (
                uffd.remove_write_protection(addr, len, false),
                "UFFDIO_WRITEPROTECT (un-protect a run)",
            )
        };
        done.map_err(failed(what))?;
    }
    Ok(())
}

/// Whether this host may map shmem with PMD-sized huge pages (transparent huge pages
/// for shmem at the PMD size, directly or inherited from the global setting). Where it
/// may, a hole that gains data could be mapped by one huge entry, which a partial
/// `PAGEMAP_SCAN` splits; trackers then protect the holes too, leaving page tables
/// everywhere, where one huge entry cannot be made. Unreadable settings count as "may".
pub fn shmem_may_map_pmd() -> bool {
    const THP: &str = "/sys/kernel/mm/transparent_hugepage";
    if !std::path::Path::new(THP).exists() {
        return false;
    }
    let read = |path: String| std::fs::read_to_string(path).ok();
    let global = read(format!("{THP}/shmem_enabled"));
    let pmd = read(format!("{THP}/hpage_pmd_size"))
        .and_then(|s| s.trim().parse::<u64>().ok())
        .and_then(|bytes| read(format!("{THP}/hugepages-{}kB/shmem_enabled", bytes >> 10)));
    !matches!(
        shmem_setting(pmd.as_deref(), global.as_deref()),
        Some("never" | "deny")
    )
}

/// The PMD size's effective shmem setting from the text of its `shmem_enabled` file
/// (absent on kernels before per-size settings) and the global one: the bracketed word.
fn shmem_setting<'a>(pmd: Option<&'a str>, global: Option<&'a str>) -> Option<&'a str> {
    let selected = |text: &'a str| {
        text.split_whitespace()
            .find_map(|w| w.strip_prefix('[')?.strip_suffix(']'))
    };
    match pmd.map(selected) {
        Some(Some("inherit")) | None => global.and_then(selected),
        Some(own) => own,
    }
}

/// Unregisters every region, which also drops its write protection, then wakes every
/// fault still queued there: the kernel wakes none for a range registered for
/// write-protect only (a writer blocked on a protected page would sleep until the
/// userfaultfd is closed), and for missing pages it misses some (see
/// `fault::unregister_missing`). Every region is unregistered and woken even when one
/// fails; the first error is returned.
pub fn unregister(uffd: &Uffd, ram: &TrackedRam) -> Result<(), DirtyError> {
    let mut first = Ok(());
    for r in &ram.regions {
        let len = match region_len(r) {
            Ok(len) => len,
            Err(e) => {
                first = first.and(Err(e));
                continue;
            }
        };
        let addr = r.host_addr as *mut libc::c_void;
        let unregistered = uffd
            .unregister(addr, len)
            .map_err(failed("UFFDIO_UNREGISTER"));
        let woken = uffd.wake(addr, len).map_err(failed("UFFDIO_WAKE"));
        first = first.and(unregistered).and(woken);
    }
    first
}

fn region_len(r: &crate::RamRegion) -> Result<usize, DirtyError> {
    usize::try_from(r.size).map_err(|_| DirtyError::State("over a region too large to map"))
}

/// Userfaultfd feature bits, by kernel name.
pub mod features {
    /// `UFFD_FEATURE_PAGEFAULT_FLAG_WP`.
    pub const WP: (u64, &str) = (1 << 0, "UFFD_FEATURE_PAGEFAULT_FLAG_WP");
    /// `UFFD_FEATURE_WP_HUGETLBFS_SHMEM`: write-protect on shmem, which guest RAM is.
    pub const WP_SHMEM: (u64, &str) = (
        linux_raw_sys::general::UFFD_FEATURE_WP_HUGETLBFS_SHMEM as u64,
        "UFFD_FEATURE_WP_HUGETLBFS_SHMEM",
    );
    /// `UFFD_FEATURE_WP_ASYNC` (Linux 6.7).
    pub const WP_ASYNC: (u64, &str) = (
        linux_raw_sys::general::UFFD_FEATURE_WP_ASYNC as u64,
        "UFFD_FEATURE_WP_ASYNC",
    );
}

#[cfg(test)]
mod tests {
    use super::shmem_setting;

    #[test]
    fn test_shmem_setting_reads_the_pmd_size_or_inherits() {
        let never = "always within_size advise [never] deny force";
        let always = "[always] within_size advise never deny force";
        let inherit = "always [inherit] within_size advise never";
        let own = "always inherit [within_size] advise never";
        assert_eq!(shmem_setting(Some(inherit), Some(never)), Some("never"));
        assert_eq!(shmem_setting(Some(inherit), Some(always)), Some("always"));
        assert_eq!(shmem_setting(Some(own), Some(never)), Some("within_size"));
        assert_eq!(shmem_setting(None, Some(never)), Some("never"));
        assert_eq!(shmem_setting(None, None), None);
        assert_eq!(shmem_setting(Some("garbled"), Some(never)), None);
    }
}
