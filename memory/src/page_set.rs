//! A set of memfd pages that threads take pages out of concurrently: who sends, saves or
//! places each page is decided by taking it, so exactly one thread does.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::dirty::DirtyBitmap;

/// A set of memfd pages that threads take pages out of concurrently.
///
/// Hand-written: vm-memory's `AtomicBitmap` marks and reads bits, but has no
/// test-and-clear that tells exactly one of two racing threads that it took a page.
pub struct PageSet {
    words: Vec<AtomicU64>,
    count: AtomicU64,
}

impl PageSet {
    /// The pages set in `bitmap`, of `pages` in all.
    pub fn from_bitmap(bitmap: &DirtyBitmap, pages: usize) -> PageSet {
        let src = bitmap.words();
        let words: Vec<AtomicU64> = (0..pages.div_ceil(64))
            .map(|i| {
                let mut w = src.get(i).copied().unwrap_or(0);
                if (i + 1) * 64 > pages {
                    // Past the last page: never in.
                    w &= (1u64 << (pages % 64)) - 1;
                }
                AtomicU64::new(w)
            })
            .collect();
        let count = words
            .iter()
            .map(|w| u64::from(w.load(Ordering::Relaxed).count_ones()))
            .sum();
        PageSet {
            words,
            count: AtomicU64::new(count),
        }
    }

    /// Takes `page` out; true for the one caller that found it in.
    pub fn take(&self, page: usize) -> bool {
        let Some(word) = self.words.get(page / 64) else {
            return false;
        };
        let bit = 1u64 << (page % 64);
        let was = word.fetch_and(!bit, Ordering::AcqRel);
        if was & bit != 0 {
            self.count.fetch_sub(1, Ordering::AcqRel);
            true
        } else {
            false
        }
    }

    /// Whether `page` is still in.
    pub fn contains(&self, page: usize) -> bool {
        self.words
            .get(page / 64)
            .is_some_and(|w| w.load(Ordering::Acquire) & (1 << (page % 64)) != 0)
    }

    /// The first page still in at or after `from`, wrapping around once.
    pub fn next(&self, from: usize) -> Option<usize> {
        let n = self.words.len();
        if n == 0 {
            return None;
        }
        let start = (from / 64) % n;
        for i in 0..=n {
            let w = (start + i) % n;
            let mut bits = self.words[w].load(Ordering::Acquire);
            if i == 0 {
                // The first word only from `from` on; its lower bits come last.
                bits &= u64::MAX << (from % 64);
            }
            if i == n {
                bits = self.words[w].load(Ordering::Acquire);
            }
            if bits != 0 {
                return Some(w * 64 + bits.trailing_zeros() as usize);
            }
        }
        None
    }

    /// Pages still in.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{GuestRam, RamRegion, PAGE_SIZE};
    use vm_memory::GuestAddress;

    #[test]
    fn test_page_set_takes_each_page_once_and_finds_the_next() {
        let ram = GuestRam::new(64, 46).expect("ram");
        let mut b = DirtyBitmap::new(ram.regions());
        for p in [3usize, 64, 65, 700] {
            b.set(p);
        }
        let set = PageSet::from_bitmap(&b, 1024);
        assert_eq!(set.count(), 4);
        assert_eq!(set.next(0), Some(3));
        assert_eq!(set.next(4), Some(64));
        assert_eq!(set.next(701), Some(3), "wraps around");
        assert!(set.take(64));
        assert!(!set.take(64), "only once");
        assert!(!set.take(5000), "past the end");
        assert_eq!(set.next(4), Some(65));
        assert_eq!(set.count(), 3);
        for p in [3, 65, 700] {
            assert!(set.take(p));
        }
        assert_eq!(set.next(0), None);
    }

    /// Two threads take every page of a large set at once: each page is taken by
    /// exactly one of them, and the count ends at zero.
    #[test]
    fn test_page_set_racing_takers_never_share_or_lose_a_page() {
        const PAGES: usize = 1 << 18;
        let mut b = DirtyBitmap::new(&[RamRegion {
            guest_addr: GuestAddress(0),
            size: (PAGES as u64) * PAGE_SIZE,
            host_addr: 0,
            file_offset: 0,
        }]);
        b.set_run(0, PAGES);
        let set = PageSet::from_bitmap(&b, PAGES);
        let taken: Vec<Vec<usize>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..2)
                .map(|t| {
                    let set = &set;
                    s.spawn(move || {
                        let mut mine = Vec::new();
                        for i in 0..PAGES {
                            // One from the bottom, one from the top: they meet and race.
                            let p = if t == 0 { i } else { PAGES - 1 - i };
                            if set.take(p) {
                                mine.push(p);
                            }
                        }
                        mine
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("thread"))
                .collect()
        });
        assert_eq!(taken[0].len() + taken[1].len(), PAGES);
        let mut all: Vec<usize> = taken.concat();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), PAGES, "a page taken twice");
        assert_eq!(set.count(), 0);
    }
}
