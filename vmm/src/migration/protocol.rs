//! The wire format: framed messages on one stream (docs/migration-protocol.md).
//!
//! ```text
//! offset  size  field
//! 0       4     magic "FRYM"
//! 4       2     message kind, little-endian
//! 6       2     reserved, zero
//! 8       8     payload length in bytes, little-endian
//! 16      4     CRC-32 (IEEE) of the payload, little-endian
//! 20      4     reserved, zero
//! 24      ...   payload
//! ```
//!
//! Every length is bounded by its kind before anything is read into memory, and every
//! payload is checked against its CRC before it is used: a page batch is read into a
//! buffer, checked, and only then copied into guest RAM.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::transport::Conn;
use super::MigrationError;

/// The first bytes of every frame.
pub const MAGIC: [u8; 4] = *b"FRYM";
/// The protocol version both sides must speak.
pub const VERSION: u32 = 4;
/// The oldest source version a destination takes (version 2 lacks only `Prepare`;
/// version 3's `Prepare` is always empty).
pub const OLDEST_SOURCE: u32 = 2;
/// Bytes of a frame header.
pub const HEADER_LEN: usize = 24;
/// Most page data in one batch.
pub const BATCH_BYTES: usize = 1 << 20;
/// Most ranges in one batch (a batch of scattered single pages).
pub const MAX_RANGES: usize = BATCH_BYTES / memory::PAGE_BYTES;
/// Most pages one `Request` asks for.
pub const MAX_REQUEST: usize = 512;
/// Largest JSON payload: machine state is tens of KiB per vCPU.
const MAX_JSON: u64 = 64 << 20;

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum Kind {
    /// Source → destination: who is coming (JSON `Hello`).
    Hello = 1,
    /// Destination → source: it can take this VM (JSON `HelloAck`).
    HelloAck = 2,
    /// Source → destination: a batch of pages (binary, see `PageBatch`).
    Pages = 3,
    /// Source → destination: the machine state, after the last pages (JSON `Switch`).
    State = 4,
    /// Source → destination: a hash of every page that holds data (binary).
    Hashes = 5,
    /// Destination → source: the VM is built and paused, ready to run (empty).
    Ready = 6,
    /// Source → destination: run it; the source never runs again (empty).
    Go = 7,
    /// Destination → source: the guest runs here (JSON `Done`).
    Done = 8,
    /// Either way: the sender gives up, and says why (JSON `Failure`).
    Error = 9,
    /// Source → destination: guest RAM's memfd, as SCM_RIGHTS (local migration; empty).
    Memfd = 10,
    /// Source → destination, first on the fault stream: which migration it joins
    /// (JSON `Channel`).
    Channel = 11,
    /// Source → destination after a post-copy `State`: the pages the destination
    /// lacks (binary, see `encode_ranges`).
    Missing = 12,
    /// Destination → source, fault stream: pages a fault needs (binary, u64
    /// guest-physical page addresses).
    Request = 13,
    /// Source → destination: every page the destination lacks has been sent (empty).
    PushDone = 14,
    /// Destination → source: every page is here (empty).
    Complete = 15,
    /// Source → destination: the source saw `Complete` and ends (empty).
    CompleteAck = 16,
    /// Source → destination, just before the source pauses its guest: finish making
    /// the VM; in a pure post-copy, also make room for the pages that hold data (a
    /// range list as in `encode_ranges`; empty otherwise).
    Prepare = 17,
    /// Destination → source: the VM is made; the guest may pause (empty).
    Prepared = 18,
}

impl Kind {
    fn from_u16(v: u16) -> Option<Kind> {
        use Kind::*;
        [
            Hello,
            HelloAck,
            Pages,
            State,
            Hashes,
            Ready,
            Go,
            Done,
            Error,
            Memfd,
            Channel,
            Missing,
            Request,
            PushDone,
            Complete,
            CompleteAck,
            Prepare,
            Prepared,
        ]
        .into_iter()
        .find(|k| *k as u16 == v)
    }

    /// The largest payload this kind may have.
    fn max_len(self) -> u64 {
        match self {
            Kind::Pages => (8 + 16 * MAX_RANGES + BATCH_BYTES) as u64,
            // A page number and its hash for every page of the largest guest ferry
            // makes (the memory map bounds it again on receipt).
            Kind::Hashes => 16 << 30,
            // A range per page at worst (bounded by the memory map again on receipt).
            Kind::Missing | Kind::Prepare => 16 << 30,
            Kind::Request => (8 * MAX_REQUEST) as u64,
            Kind::Ready
            | Kind::Go
            | Kind::Memfd
            | Kind::PushDone
            | Kind::Complete
            | Kind::CompleteAck
            | Kind::Prepared => 0,
            _ => MAX_JSON,
        }
    }
}

/// A frame header as read.
#[derive(Debug, Clone, Copy)]
pub struct Header {
    /// The kind.
    pub kind: Kind,
    /// Payload bytes.
    pub len: u64,
    /// CRC-32 of the payload.
    pub crc: u32,
}

fn protocol(msg: impl Into<String>) -> MigrationError {
    MigrationError::Protocol(msg.into())
}

impl Header {
    fn encode(kind: Kind, len: u64, crc: u32) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[..4].copy_from_slice(&MAGIC);
        h[4..6].copy_from_slice(&(kind as u16).to_le_bytes());
        h[8..16].copy_from_slice(&len.to_le_bytes());
        h[16..20].copy_from_slice(&crc.to_le_bytes());
        h
    }

    /// Parses and bounds a header.
    pub fn decode(h: &[u8; HEADER_LEN]) -> Result<Header, MigrationError> {
        if h[..4] != MAGIC {
            return Err(protocol(format!(
                "not a ferry migration stream: a frame starts with {:02x?}, not \"FRYM\"",
                &h[..4]
            )));
        }
        let raw = u16::from_le_bytes([h[4], h[5]]);
        let kind =
            Kind::from_u16(raw).ok_or_else(|| protocol(format!("unknown message kind {raw}")))?;
        let mut len = [0u8; 8];
        len.copy_from_slice(&h[8..16]);
        let len = u64::from_le_bytes(len);
        if len > kind.max_len() {
            return Err(protocol(format!(
                "a {kind:?} message of {len} bytes is longer than its limit of {}",
                kind.max_len()
            )));
        }
        let crc = u32::from_le_bytes([h[16], h[17], h[18], h[19]]);
        Ok(Header { kind, len, crc })
    }
}

impl Conn {
    /// Sends one frame whose payload is `parts`, one after the other.
    pub fn send(&mut self, kind: Kind, parts: &[&[u8]]) -> Result<(), MigrationError> {
        let mut crc = crc32fast::Hasher::new();
        let mut len = 0u64;
        for p in parts {
            crc.update(p);
            len += p.len() as u64;
        }
        let header = Header::encode(kind, len, crc.finalize());
        // A cancel is taken between frames: one that stops a frame half-way would
        // leave the peer reading the rest of it from whatever follows.
        self.check_cancel()?;
        self.torn = true;
        self.write_all(&header)?;
        for p in parts {
            self.write_all(p)?;
        }
        self.torn = false;
        Ok(())
    }

    /// Sends a JSON message.
    pub fn send_json<T: Serialize>(&mut self, kind: Kind, value: &T) -> Result<(), MigrationError> {
        let body = serde_json::to_vec(value)
            .map_err(|e| protocol(format!("cannot encode {kind:?}: {e}")))?;
        self.send(kind, &[&body])
    }

    /// Reads the next frame header.
    pub fn recv_header(&mut self) -> Result<Header, MigrationError> {
        // A peer that keeps sending never lets a read wait: look between frames too.
        self.check_cancel()?;
        let mut h = [0u8; HEADER_LEN];
        self.read_all(&mut h)?;
        let header = Header::decode(&h)?;
        if header.kind == Kind::Error {
            // The peer gave up: its reason is the error here too.
            let body = self.read_payload(&header)?;
            let failure: Failure = serde_json::from_slice(&body)
                .map_err(|e| protocol(format!("the peer's error does not parse: {e}")))?;
            return Err(MigrationError::Peer(failure.error));
        }
        Ok(header)
    }

    /// Reads a header and requires `kind`.
    pub fn expect(&mut self, kind: Kind) -> Result<Header, MigrationError> {
        let header = self.recv_header()?;
        if header.kind != kind {
            return Err(protocol(format!(
                "expected {kind:?}, got {:?}",
                header.kind
            )));
        }
        Ok(header)
    }

    /// Reads a whole (bounded) payload and checks its CRC.
    pub fn read_payload(&mut self, header: &Header) -> Result<Vec<u8>, MigrationError> {
        let len = usize::try_from(header.len).map_err(|_| protocol("payload too large"))?;
        let mut body = vec![0u8; len];
        self.read_all(&mut body)?;
        check_crc(header, &[&body])?;
        Ok(body)
    }

    /// Reads a JSON message of `kind`.
    pub fn recv_json<T: DeserializeOwned>(&mut self, kind: Kind) -> Result<T, MigrationError> {
        let header = self.expect(kind)?;
        let body = self.read_payload(&header)?;
        serde_json::from_slice(&body).map_err(|e| protocol(format!("{kind:?} does not parse: {e}")))
    }

    /// Reads an empty message of `kind`.
    pub fn recv_empty(&mut self, kind: Kind) -> Result<(), MigrationError> {
        let header = self.expect(kind)?;
        self.read_payload(&header).map(drop)
    }

    /// After a failed write: the reason the peer gave, if it sent one before it
    /// closed the connection (a peer that gives up says why, then hangs up).
    pub fn peer_reason(&mut self) -> Option<MigrationError> {
        self.closing();
        match self.recv_header() {
            Err(e @ MigrationError::Peer(_)) => Some(e),
            _ => None,
        }
    }

    /// Tells the peer why this side gives up. Best effort: the link may be gone.
    pub fn send_failure(&mut self, error: &str) {
        if self.torn {
            // Inside a half-written frame the peer could not read it as a frame.
            return;
        }
        self.closing();
        let _ = self.send_json(
            Kind::Error,
            &Failure {
                error: error.to_string(),
            },
        );
    }
}

/// Checks the CRC of a payload read in parts.
pub fn check_crc(header: &Header, parts: &[&[u8]]) -> Result<(), MigrationError> {
    let mut crc = crc32fast::Hasher::new();
    for p in parts {
        crc.update(p);
    }
    let got = crc.finalize();
    if got != header.crc {
        return Err(protocol(format!(
            "a {:?} message's checksum does not match (header {:#010x}, payload {got:#010x})",
            header.kind, header.crc
        )));
    }
    Ok(())
}

/// One region of guest RAM, as both sides lay it out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Region {
    /// Guest-physical start.
    pub guest_addr: u64,
    /// Bytes.
    pub size: u64,
}

/// Guest RAM's regions as the protocol names them.
pub fn regions_of(ram: &memory::GuestRam) -> Vec<Region> {
    ram.regions()
        .iter()
        .map(|r| Region {
            guest_addr: r.guest_addr.0,
            size: r.size,
        })
        .collect()
}

/// The source introduces the VM.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hello {
    /// `VERSION`.
    pub version: u32,
    /// The sending ferry's version, for messages.
    pub ferry_version: String,
    /// The VM's configuration: the destination applies its own overrides to the host
    /// backends, and checks that it can run it before any memory moves.
    pub config: api::VmConfig,
    /// Guest RAM's regions.
    pub memory: Vec<Region>,
    /// Whether guest RAM's memfd follows instead of pages.
    pub local: bool,
    /// Whether hashes of every page follow the last pages.
    pub verify: bool,
    /// Whether the source opens a second stream, for post-copy page requests, after
    /// `HelloAck`; it presents this token there.
    pub fault_channel: Option<u64>,
}

/// The first message on the fault stream.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Channel {
    /// `Hello::fault_channel`.
    pub token: u64,
}

/// The destination's answer to `Hello`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HelloAck {
    /// `VERSION`.
    pub version: u32,
}

/// The machine state at switch-over.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Switch {
    /// Every component's state.
    pub state: crate::snapshot::MachineState,
    /// When the source's vCPUs stopped, in ns since the Unix epoch (for the downtime).
    pub paused_at_ns: u64,
    /// Pre-copy rounds before the switch-over.
    pub rounds: u32,
    /// Whether the guest runs on the destination before all of its memory is there:
    /// `Missing` follows.
    pub postcopy: bool,
}

/// Guest-physical ranges as (address, length), whole pages, in the binary layout of
/// `Missing`: u64 count, then count × (u64 address, u64 length), little-endian.
pub fn encode_ranges(ranges: &[(u64, u64)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + 16 * ranges.len());
    out.extend_from_slice(&(ranges.len() as u64).to_le_bytes());
    for &(addr, len) in ranges {
        out.extend_from_slice(&addr.to_le_bytes());
        out.extend_from_slice(&len.to_le_bytes());
    }
    out
}

fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

/// Parses `encode_ranges`' layout; each range must be whole pages, and the count must
/// match the length. The caller checks them against its memory map.
pub fn decode_ranges(body: &[u8]) -> Result<Vec<(u64, u64)>, MigrationError> {
    if body.len() < 8 {
        return Err(protocol("a range list is shorter than its count"));
    }
    let count = le_u64(body);
    if Some(body.len() as u64) != count.checked_mul(16).and_then(|n| n.checked_add(8)) {
        return Err(protocol(format!(
            "a range list of {} bytes says it holds {count} ranges",
            body.len()
        )));
    }
    body[8..]
        .chunks_exact(16)
        .map(|r| {
            let (addr, len) = (le_u64(r), le_u64(&r[8..]));
            if len == 0
                || !addr.is_multiple_of(memory::PAGE_SIZE)
                || !len.is_multiple_of(memory::PAGE_SIZE)
            {
                return Err(protocol(format!(
                    "a range list names {len:#x} bytes at {addr:#x}: ranges must be whole pages"
                )));
            }
            Ok((addr, len))
        })
        .collect()
}

/// Parses a `Request`: whole-page guest-physical addresses, 1 to `MAX_REQUEST`.
pub fn decode_request(body: &[u8]) -> Result<Vec<u64>, MigrationError> {
    if body.is_empty() || !body.len().is_multiple_of(8) || body.len() > 8 * MAX_REQUEST {
        return Err(protocol(format!(
            "a page request of {} bytes: it must be 1 to {MAX_REQUEST} addresses of 8 bytes",
            body.len()
        )));
    }
    body.chunks_exact(8)
        .map(|a| {
            let addr = le_u64(a);
            if !addr.is_multiple_of(memory::PAGE_SIZE) {
                return Err(protocol(format!(
                    "a page request names {addr:#x}, which is not a page's start"
                )));
            }
            Ok(addr)
        })
        .collect()
}

/// The destination runs the guest.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Done {
    /// From the source's pause to the destination's resume.
    pub downtime_ms: f64,
}

/// Why a side gave up.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Failure {
    /// The message.
    pub error: String,
}

/// A batch of pages: a count, the guest-physical ranges, then their bytes in order.
pub struct PageBatch {
    ranges: Vec<u8>,
    data: Vec<u8>,
    count: u32,
}

impl PageBatch {
    /// An empty batch.
    pub fn new() -> PageBatch {
        PageBatch {
            ranges: Vec::with_capacity(16 * 64),
            data: Vec::with_capacity(BATCH_BYTES),
            count: 0,
        }
    }

    /// Bytes of page data it holds.
    pub fn data_len(&self) -> usize {
        self.data.len()
    }

    /// Whether `len` more bytes fit, by data and by ranges.
    pub fn fits(&self, len: usize) -> bool {
        self.data.len() + len <= BATCH_BYTES && (self.count as usize) < MAX_RANGES
    }

    /// Adds a range: `fill` copies its `len` bytes into the slice it is given.
    pub fn push(
        &mut self,
        guest_addr: u64,
        len: usize,
        fill: impl FnOnce(&mut [u8]) -> Result<(), MigrationError>,
    ) -> Result<(), MigrationError> {
        let at = self.data.len();
        self.data.resize(at + len, 0);
        fill(&mut self.data[at..])?;
        self.ranges.extend_from_slice(&guest_addr.to_le_bytes());
        self.ranges.extend_from_slice(&(len as u64).to_le_bytes());
        self.count += 1;
        Ok(())
    }

    /// Sends it and empties it.
    pub fn flush(&mut self, conn: &mut Conn) -> Result<(), MigrationError> {
        if self.count == 0 {
            return Ok(());
        }
        let mut head = [0u8; 8];
        head[..4].copy_from_slice(&self.count.to_le_bytes());
        conn.send(Kind::Pages, &[&head, &self.ranges, &self.data])?;
        self.ranges.clear();
        self.data.clear();
        self.count = 0;
        Ok(())
    }
}

/// A batch's ranges: (guest address, length) each.
pub type Ranges = Vec<(u64, u64)>;

/// Reads a `Pages` payload, checks its layout and CRC, and returns the ranges as (guest
/// address, length) with their pages, read into the front of `data` (a buffer reused
/// between batches). Nothing of it has touched guest RAM yet: the caller checks each
/// range against its memory map.
pub fn read_batch<'a>(
    conn: &mut Conn,
    header: &Header,
    data: &'a mut Vec<u8>,
) -> Result<(Ranges, &'a [u8]), MigrationError> {
    let mut head = [0u8; 8];
    if header.len < 8 {
        return Err(protocol("a page batch is shorter than its count"));
    }
    conn.read_all(&mut head)?;
    let count = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
    if count == 0 || count > MAX_RANGES {
        return Err(protocol(format!(
            "a page batch names {count} ranges: it must name 1 to {MAX_RANGES}"
        )));
    }
    let ranges_len = 16 * count;
    if header.len < (8 + ranges_len) as u64 {
        return Err(protocol("a page batch is shorter than its ranges"));
    }
    let mut raw = vec![0u8; ranges_len];
    conn.read_all(&mut raw)?;
    let mut ranges = Vec::with_capacity(count);
    let mut total = 0u64;
    for r in raw.chunks_exact(16) {
        let mut a = [0u8; 8];
        let mut l = [0u8; 8];
        a.copy_from_slice(&r[..8]);
        l.copy_from_slice(&r[8..]);
        let (addr, len) = (u64::from_le_bytes(a), u64::from_le_bytes(l));
        if len == 0
            || !addr.is_multiple_of(memory::PAGE_SIZE)
            || !len.is_multiple_of(memory::PAGE_SIZE)
        {
            return Err(protocol(format!(
                "a page batch names {len:#x} bytes at {addr:#x}: ranges must be whole pages"
            )));
        }
        total = total
            .checked_add(len)
            .ok_or_else(|| protocol("a page batch's ranges add up past 2^64 bytes"))?;
        ranges.push((addr, len));
    }
    if Some(header.len) != total.checked_add(8 + ranges_len as u64) {
        return Err(protocol(format!(
            "a page batch of {} bytes names {total} bytes of pages in {count} ranges",
            header.len
        )));
    }
    // Bounded by Kind::Pages's limit, which the header passed.
    let total = usize::try_from(total).map_err(|_| protocol("page batch too large"))?;
    // Grown only, never shrunk: shrinking and growing again for the next, longer
    // batch zeroed the difference every time (a few per cent of the receiver's time).
    if data.len() < total {
        data.resize(total, 0);
    }
    let data = &mut data[..total];
    conn.read_all(data)?;
    check_crc(header, &[&head, &raw, data])?;
    Ok((ranges, data))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_header_round_trips_and_bounds_lengths() {
        let h = Header::encode(Kind::State, 1234, 0xdead_beef);
        let d = Header::decode(&h).expect("decode");
        assert_eq!((d.kind, d.len, d.crc), (Kind::State, 1234, 0xdead_beef));
        let mut bad = h;
        bad[0] = b'X';
        assert!(Header::decode(&bad)
            .unwrap_err()
            .to_string()
            .contains("not a ferry migration stream"));
        let big = Header::encode(Kind::Pages, u64::MAX, 0);
        assert!(Header::decode(&big)
            .unwrap_err()
            .to_string()
            .contains("longer than its limit"));
        let mut unknown = h;
        unknown[4] = 99;
        assert!(Header::decode(&unknown)
            .unwrap_err()
            .to_string()
            .contains("unknown message kind 99"));
        let go = Header::encode(Kind::Go, 1, 0);
        assert!(Header::decode(&go).is_err(), "Go carries nothing");
    }
}
