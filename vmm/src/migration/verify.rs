//! `"verify": true`: both sides hash every page that holds data at switch-over, and
//! the destination compares before it runs the guest. A check of ferry itself, apart
//! from anything the guest verifies: a page lost or sent wrong shows up by number.

use memory::dirty::page_to_guest;
use memory::{GuestRam, PAGE_BYTES, PAGE_SIZE};
use vm_memory::GuestMemoryBackend;
use xxhash_rust::xxh3::xxh3_64;

/// Hashes of memfd pages: (page, hash), by page.
pub type Hashes = Vec<(u64, u64)>;

/// The memfd pages that hold data.
fn data_pages(ram: &GuestRam) -> Result<Vec<u64>, String> {
    let mut pages = Vec::new();
    for (offset, len) in ram.data_extents().map_err(|e| e.to_string())? {
        pages.extend(offset / PAGE_SIZE..(offset + len).div_ceil(PAGE_SIZE));
    }
    Ok(pages)
}

/// Hashes `pages`, split over two threads.
fn hash(ram: &GuestRam, pages: &[u64]) -> Result<Vec<u64>, String> {
    let half = pages.len() / 2;
    let (a, b) = pages.split_at(half);
    let one = |part: &[u64]| -> Result<Vec<u64>, String> {
        let mut buf = vec![0u8; PAGE_BYTES];
        part.iter()
            .map(|&p| {
                let addr = usize::try_from(p)
                    .ok()
                    .and_then(|p| page_to_guest(ram.regions(), p))
                    .ok_or_else(|| format!("page {p} is not guest RAM"))?;
                let slice = ram
                    .memory()
                    .get_slice(addr, PAGE_BYTES)
                    .map_err(|e| format!("guest RAM at {:#x}: {e}", addr.0))?;
                slice.copy_to(&mut buf[..]);
                Ok(xxh3_64(&buf))
            })
            .collect()
    };
    std::thread::scope(|s| {
        let first = s.spawn(|| one(a));
        let second = one(b)?;
        let mut all = first
            .join()
            .map_err(|_| "a hashing thread panicked".to_string())??;
        all.extend(second);
        Ok(all)
    })
}

/// Hashes every page that holds data.
pub fn hash_data_pages(ram: &GuestRam) -> Result<Hashes, String> {
    let pages = data_pages(ram)?;
    let hashes = hash(ram, &pages)?;
    Ok(pages.into_iter().zip(hashes).collect())
}

/// The wire form: (page, hash) pairs, little-endian.
pub fn encode(hashes: &Hashes) -> Vec<u8> {
    let mut out = Vec::with_capacity(hashes.len() * 16);
    for (p, h) in hashes {
        out.extend_from_slice(&p.to_le_bytes());
        out.extend_from_slice(&h.to_le_bytes());
    }
    out
}

/// Parses the wire form, bounded by guest RAM's pages.
pub fn decode(bytes: &[u8], total_pages: u64) -> Result<Hashes, String> {
    if !bytes.len().is_multiple_of(16) {
        return Err(format!(
            "{} bytes of hashes are not whole pairs",
            bytes.len()
        ));
    }
    let word = |b: &[u8]| {
        let mut w = [0u8; 8];
        w.copy_from_slice(b);
        u64::from_le_bytes(w)
    };
    let mut out = Vec::with_capacity(bytes.len() / 16);
    let mut last = None;
    for pair in bytes.chunks_exact(16) {
        let (p, h) = (word(&pair[..8]), word(&pair[8..]));
        if p >= total_pages || last.is_some_and(|l| l >= p) {
            return Err(format!(
                "page {p} in the hashes is out of order or past the {total_pages} pages of guest RAM"
            ));
        }
        last = Some(p);
        out.push((p, h));
    }
    Ok(out)
}

/// Compares the source's hashes with this side's RAM: every page the source listed
/// must hash the same here, and every other page that holds data here must be zero.
/// Names the guest addresses of the first pages that differ.
pub fn compare(ram: &GuestRam, source: &Hashes) -> Result<(), String> {
    let zero = xxh3_64(&[0u8; PAGE_BYTES]);
    let mut pages: Vec<u64> = source.iter().map(|(p, _)| *p).collect();
    let listed = pages.len();
    for p in data_pages(ram)? {
        if source.binary_search_by_key(&p, |(q, _)| *q).is_err() {
            pages.push(p);
        }
    }
    let here = hash(ram, &pages)?;
    let expected = source
        .iter()
        .map(|(_, h)| *h)
        .chain(std::iter::repeat(zero));
    let bad: Vec<u64> = pages
        .iter()
        .zip(here.iter().zip(expected))
        .filter(|(_, (h, e))| **h != *e)
        .map(|(p, _)| *p)
        .collect();
    if bad.is_empty() {
        return Ok(());
    }
    let named: Vec<String> = bad
        .iter()
        .take(8)
        .filter_map(|&p| usize::try_from(p).ok())
        .filter_map(|p| page_to_guest(ram.regions(), p))
        .map(|a| format!("{:#x}", a.0))
        .collect();
    Err(format!(
        "{} of {} pages differ between source and destination, at guest addresses {}{}",
        bad.len(),
        listed.max(pages.len()),
        named.join(", "),
        if bad.len() > named.len() { ", …" } else { "" }
    ))
}
