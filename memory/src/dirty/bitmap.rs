//! Page bitmaps indexed by page number in the guest-RAM memfd, which numbers the pages of
//! every RAM region (below and above the MMIO hole) in one space.

use std::sync::atomic::{AtomicU64, Ordering};

use vm_memory::GuestAddress;

use crate::{RamRegion, PAGE_SIZE};

/// Pages written in one round: bit `i` is memfd page `i`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirtyBitmap {
    words: Vec<u64>,
    regions: Vec<RamRegion>,
}

impl DirtyBitmap {
    /// An empty bitmap over `regions`.
    pub fn new(regions: &[RamRegion]) -> Self {
        let pages = total_pages(regions);
        DirtyBitmap {
            words: vec![0; pages.div_ceil(64)],
            regions: regions.to_vec(),
        }
    }

    /// Marks memfd page `page`.
    pub fn set(&mut self, page: usize) {
        if let Some(w) = self.words.get_mut(page / 64) {
            *w |= 1 << (page % 64);
        }
    }

    /// Marks pages `first..first+count`, a word at a time where it can.
    pub fn set_run(&mut self, first: usize, count: usize) {
        let end = first.saturating_add(count).min(self.words.len() * 64);
        for (word, mask) in word_masks(first, end) {
            self.words[word] |= mask;
        }
    }

    /// ORs `other`'s words into this bitmap.
    fn merge_words(&mut self, other: impl Iterator<Item = u64>) {
        for (w, o) in self.words.iter_mut().zip(other) {
            *w |= o;
        }
    }

    /// ORs `words` into this bitmap from page `first_page` on. A page-aligned start that
    /// is a multiple of 64 takes whole words; any other start goes bit by bit.
    pub fn merge_at(&mut self, first_page: usize, words: &[u64]) {
        if first_page.is_multiple_of(64) {
            // Only non-zero words are written: a fresh bitmap's pages stay untouched
            // (and unfaulted) where nothing is dirty.
            let base = first_page / 64;
            for (i, &o) in words.iter().enumerate() {
                if o != 0 {
                    if let Some(w) = self.words.get_mut(base + i) {
                        *w |= o;
                    }
                }
            }
            return;
        }
        for (i, &w) in words.iter().enumerate() {
            let mut w = w;
            while w != 0 {
                let bit = w.trailing_zeros() as usize;
                w &= w - 1;
                self.set(first_page + i * 64 + bit);
            }
        }
    }

    /// Marks every page `other` marks (bitmaps over the same regions).
    pub fn union_with(&mut self, other: &DirtyBitmap) {
        self.merge_words(other.words.iter().copied());
    }

    /// Unmarks every page `other` marks.
    pub fn remove(&mut self, other: &DirtyBitmap) {
        for (w, o) in self.words.iter_mut().zip(&other.words) {
            *w &= !o;
        }
    }

    /// The pages both mark.
    pub fn and(&self, other: &DirtyBitmap) -> DirtyBitmap {
        DirtyBitmap {
            words: self
                .words
                .iter()
                .zip(other.words.iter().chain(std::iter::repeat(&0)))
                .map(|(a, b)| a & b)
                .collect(),
            regions: self.regions.clone(),
        }
    }

    /// Whether page `page` is marked.
    pub fn get(&self, page: usize) -> bool {
        self.words
            .get(page / 64)
            .is_some_and(|w| w & (1 << (page % 64)) != 0)
    }

    /// The bitmap's words: bit `i % 64` of word `i / 64` is page `i`.
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// Number of marked pages.
    pub fn count(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// Marked memfd pages, in order.
    pub fn pages(&self) -> impl Iterator<Item = usize> + '_ {
        self.words.iter().enumerate().flat_map(|(i, &w)| {
            let mut w = w;
            std::iter::from_fn(move || {
                if w == 0 {
                    return None;
                }
                let bit = w.trailing_zeros() as usize;
                w &= w - 1;
                Some(i * 64 + bit)
            })
        })
    }

    /// Guest-physical addresses of the marked pages, in order.
    pub fn guest_pages(&self) -> impl Iterator<Item = GuestAddress> + '_ {
        self.pages().filter_map(|p| page_to_guest(&self.regions, p))
    }

    /// Runs of consecutive marked pages as (first page, count).
    pub fn runs(&self) -> Vec<(usize, usize)> {
        let mut runs: Vec<(usize, usize)> = Vec::new();
        for p in self.pages() {
            match runs.last_mut() {
                Some((start, n)) if *start + *n == p => *n += 1,
                _ => runs.push((p, 1)),
            }
        }
        runs
    }
}

/// Pages of all regions.
pub fn total_pages(regions: &[RamRegion]) -> usize {
    regions
        .iter()
        .map(|r| usize::try_from(r.size / PAGE_SIZE).unwrap_or(usize::MAX))
        .sum()
}

/// The guest address of memfd page `page`.
pub fn page_to_guest(regions: &[RamRegion], page: usize) -> Option<GuestAddress> {
    let offset = page as u64 * PAGE_SIZE;
    regions
        .iter()
        .find(|r| offset >= r.file_offset && offset < r.file_offset + r.size)
        .map(|r| GuestAddress(r.guest_addr.0 + offset - r.file_offset))
}

/// The memfd page of a guest address, if it is RAM.
pub fn guest_to_page(regions: &[RamRegion], addr: GuestAddress) -> Option<usize> {
    regions
        .iter()
        .find(|r| addr.0 >= r.guest_addr.0 && addr.0 < r.guest_addr.0 + r.size)
        .and_then(|r| usize::try_from((r.file_offset + addr.0 - r.guest_addr.0) / PAGE_SIZE).ok())
}

/// Pages `first..end` as (word index, bit mask) pairs, one per word they touch.
fn word_masks(first: usize, end: usize) -> impl Iterator<Item = (usize, u64)> {
    let mut p = first;
    std::iter::from_fn(move || {
        if p >= end {
            return None;
        }
        let bit = p % 64;
        let n = (64 - bit).min(end - p);
        let mask = if n == 64 {
            u64::MAX
        } else {
            ((1u64 << n) - 1) << bit
        };
        let word = p / 64;
        p += n;
        Some((word, mask))
    })
}

/// A bitmap that several threads mark concurrently: the sync handler, and ferry's own
/// writes to guest RAM.
#[derive(Debug)]
pub struct AtomicBitmap {
    words: Vec<AtomicU64>,
    /// Set by every mark, so that taking an untouched bitmap costs one load, not a swap
    /// per word (a 4 GiB guest has 16,384 words).
    any: std::sync::atomic::AtomicBool,
}

impl AtomicBitmap {
    /// An empty bitmap of `pages` bits.
    pub fn new(pages: usize) -> Self {
        AtomicBitmap {
            words: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            any: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Marks pages `first..first+count`.
    ///
    /// The words are ORed before `any` is set, and `take_into` clears `any` before it
    /// swaps the words. So a take that races with this mark either sees `any` set,
    /// which it can only do after the ORs (release/acquire on `any`), and takes the
    /// bits; or it finds `any` clear, and then this mark's store of `any` comes after
    /// the take's swap of it and leaves `any` set for the next take. Setting `any`
    /// first, as this once did, let a take clear `any` and swap the words between the
    /// store and the OR: the bit then sat in a word with `any` clear, unseen by every
    /// later take.
    pub fn set_range(&self, first: usize, count: usize) {
        if count == 0 {
            return;
        }
        let end = first.saturating_add(count).min(self.words.len() * 64);
        // One atomic OR per word, not per page: device DMA marks 16 pages per 64 KiB.
        for (word, mask) in word_masks(first, end) {
            self.words[word].fetch_or(mask, Ordering::AcqRel);
        }
        self.any.store(true, Ordering::Release);
    }

    /// Whether `page` is marked.
    pub fn get(&self, page: usize) -> bool {
        self.words
            .get(page / 64)
            .is_some_and(|w| w.load(Ordering::Acquire) & (1 << (page % 64)) != 0)
    }

    /// Forgets every mark (when tracking starts afresh).
    pub fn clear(&self) {
        self.any.store(false, Ordering::Release);
        self.words
            .iter()
            .for_each(|w| w.store(0, Ordering::Release));
    }

    /// ORs every marked page into `into` and clears them here. A mark that races with
    /// this is taken now or by the next call, never lost (see `set_range`).
    pub fn take_into(&self, into: &mut DirtyBitmap) {
        if self.any.swap(false, Ordering::AcqRel) {
            into.merge_words(self.words.iter().map(|w| w.swap(0, Ordering::AcqRel)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::MIB;

    fn regions() -> Vec<RamRegion> {
        vec![
            RamRegion {
                guest_addr: GuestAddress(0),
                size: 3072 * MIB,
                host_addr: 0,
                file_offset: 0,
            },
            RamRegion {
                guest_addr: GuestAddress(4096 * MIB),
                size: 1024 * MIB,
                host_addr: 0,
                file_offset: 3072 * MIB,
            },
        ]
    }

    #[test]
    fn test_pages_map_across_the_mmio_hole() {
        let r = regions();
        let high = GuestAddress(4096 * MIB + 8192);
        let page = guest_to_page(&r, high).expect("RAM");
        assert_eq!(page, (3072 * MIB / PAGE_SIZE) as usize + 2);
        assert_eq!(page_to_guest(&r, page), Some(high));
        assert_eq!(
            guest_to_page(&r, GuestAddress(3584 * MIB)),
            None,
            "the MMIO hole is not RAM"
        );
    }

    #[test]
    fn test_runs_and_counts() {
        let mut b = DirtyBitmap::new(&regions());
        for p in [1, 2, 3, 64, 65, 200] {
            b.set(p);
        }
        assert_eq!(b.count(), 6);
        assert_eq!(b.runs(), vec![(1, 3), (64, 2), (200, 1)]);
        assert_eq!(b.guest_pages().next(), Some(GuestAddress(4096)));
    }

    #[test]
    fn test_set_operations() {
        let mut a = DirtyBitmap::new(&regions());
        let mut b = DirtyBitmap::new(&regions());
        a.set_run(0, 70);
        b.set_run(60, 20);
        assert_eq!(a.and(&b).runs(), vec![(60, 10)]);
        let mut u = a.clone();
        u.union_with(&b);
        assert_eq!(u.runs(), vec![(0, 80)]);
        u.remove(&b);
        assert_eq!(u.runs(), vec![(0, 60)]);
        assert!(a.get(69) && !a.get(70));
    }

    #[test]
    fn test_set_run_fills_words() {
        let mut a = DirtyBitmap::new(&regions());
        a.set_run(60, 200);
        assert_eq!(a.count(), 200);
        assert_eq!(a.runs(), vec![(60, 200)]);
        let b = AtomicBitmap::new(256);
        let mut into = DirtyBitmap::new(&regions());
        b.take_into(&mut into);
        assert_eq!(into.count(), 0);
        b.set_range(7, 2);
        b.take_into(&mut into);
        assert_eq!(into.pages().collect::<Vec<_>>(), vec![7, 8]);
    }

    #[test]
    fn test_merge_at_aligned_and_unaligned() {
        let mut a = DirtyBitmap::new(&regions());
        a.merge_at(128, &[0b101]);
        a.merge_at(3, &[0b11]);
        assert_eq!(a.pages().collect::<Vec<_>>(), vec![3, 4, 128, 130]);
    }

    /// One thread marks a page, then waits for two more takes by a collector on the
    /// other core, and checks that one of them took the mark. The bitmap is one word,
    /// so that a take is as short as a mark and they race as often as they can.
    #[test]
    fn test_no_mark_is_lost_to_a_racing_take() {
        use std::sync::atomic::{AtomicBool, AtomicUsize};
        use std::sync::Arc;
        const MARKS: usize = 1_000_000;
        let bits = Arc::new(AtomicBitmap::new(64));
        let takes = Arc::new(AtomicUsize::new(0));
        let seen: Arc<Vec<AtomicUsize>> = Arc::new((0..64).map(|_| AtomicUsize::new(0)).collect());
        let done = Arc::new(AtomicBool::new(false));
        let regions = vec![RamRegion {
            guest_addr: GuestAddress(0),
            size: 64 * PAGE_SIZE,
            host_addr: 0,
            file_offset: 0,
        }];
        let collector = {
            let (bits, takes, seen, done) =
                (bits.clone(), takes.clone(), seen.clone(), done.clone());
            std::thread::spawn(move || {
                while !done.load(Ordering::Acquire) {
                    let mut got = DirtyBitmap::new(&regions);
                    bits.take_into(&mut got);
                    for p in got.pages() {
                        seen[p].fetch_add(1, Ordering::AcqRel);
                    }
                    takes.fetch_add(1, Ordering::SeqCst);
                    // Pairs with the marker's fence: the take after a count the marker
                    // did not see finds its mark, as a take that starts after it must.
                    std::sync::atomic::fence(Ordering::SeqCst);
                }
            })
        };
        let started = std::time::Instant::now();
        let mut lost = Vec::new();
        for i in 0..MARKS {
            let page = i % 64;
            let before = seen[page].load(Ordering::Acquire);
            bits.set_range(page, 1);
            // The mark is complete before the count is read (no store-load reordering),
            // so the second take from here starts after it.
            std::sync::atomic::fence(Ordering::SeqCst);
            let at = takes.load(Ordering::SeqCst);
            while takes.load(Ordering::Acquire) < at + 2 {
                std::hint::spin_loop();
            }
            if seen[page].load(Ordering::Acquire) == before {
                lost.push(i);
                // Taken by a later mark's take, so the next check is fair again.
                bits.set_range(page, 1);
                std::sync::atomic::fence(Ordering::SeqCst);
                let at = takes.load(Ordering::SeqCst);
                while takes.load(Ordering::Acquire) < at + 2 {
                    std::hint::spin_loop();
                }
            }
        }
        done.store(true, Ordering::Release);
        collector.join().expect("collector");
        assert!(
            lost.is_empty(),
            "{} of {MARKS} marks were not taken by the two takes after them: {:?}",
            lost.len(),
            &lost[..lost.len().min(5)]
        );
        assert!(started.elapsed() < std::time::Duration::from_secs(30));
    }

    #[test]
    fn test_atomic_take_clears() {
        let a = AtomicBitmap::new(130);
        a.set_range(63, 3);
        let mut into = DirtyBitmap::new(&regions());
        a.take_into(&mut into);
        assert_eq!(into.pages().collect::<Vec<_>>(), vec![63, 64, 65]);
        let mut again = DirtyBitmap::new(&regions());
        a.take_into(&mut again);
        assert_eq!(again.count(), 0);
        a.set_range(1, 1);
        a.clear();
        a.take_into(&mut again);
        assert_eq!(again.count(), 0, "clear forgets marks");
    }
}
