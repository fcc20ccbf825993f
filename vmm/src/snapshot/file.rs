//! The state file: a fixed header, then the machine state as JSON.
//!
//! ```text
//! offset  size  field
//! 0       8     magic "FERRYSNP"
//! 8       4     format version, little-endian (FORMAT_VERSION)
//! 12      4     reserved, zero
//! 16      8     body length in bytes, little-endian
//! 24      4     CRC-32 (IEEE) of the body, little-endian
//! 28      4     reserved, zero
//! 32      ...   body: MachineState as JSON
//! ```
//!
//! docs/snapshot-format.md describes the body.

use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;

use super::{MachineState, SnapshotError};

/// The first bytes of every ferry state file.
pub const MAGIC: [u8; 8] = *b"FERRYSNP";
/// The body layout this ferry writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Bytes before the body.
pub const HEADER_LEN: usize = 32;
/// The largest body a load reads: state is tens of KiB per vCPU, so anything near this
/// is not a ferry snapshot.
pub const MAX_BODY: u64 = 64 << 20;

fn io(path: &Path) -> impl Fn(std::io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `state` to `path` (the caller writes beside the final name and renames).
pub fn write(path: &Path, state: &MachineState) -> Result<(), SnapshotError> {
    let body = serde_json::to_vec(state).map_err(|e| SnapshotError::Encode(e.to_string()))?;
    let mut header = [0u8; HEADER_LEN];
    header[..8].copy_from_slice(&MAGIC);
    header[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    header[16..24].copy_from_slice(&(body.len() as u64).to_le_bytes());
    header[24..28].copy_from_slice(&crc32fast::hash(&body).to_le_bytes());
    let mut file = File::create(path).map_err(io(path))?;
    file.write_all(&header).map_err(io(path))?;
    file.write_all(&body).map_err(io(path))
}

/// Reads and checks a state file: magic, version, length and checksum, then the body.
pub fn read(path: &Path) -> Result<MachineState, SnapshotError> {
    let mut file = File::open(path).map_err(io(path))?;
    let len = file.metadata().map_err(io(path))?.len();
    let not_ours = || SnapshotError::NotASnapshot(path.to_path_buf());
    let mut header = [0u8; HEADER_LEN];
    if len < HEADER_LEN as u64 {
        // Too short for a header: a ferry file cut short still starts with the magic.
        let mut start = vec![0u8; usize::try_from(len).unwrap_or(0)];
        file.read_exact(&mut start).map_err(io(path))?;
        if start.len() >= MAGIC.len() && start[..MAGIC.len()] == MAGIC {
            return Err(SnapshotError::Truncated {
                path: path.to_path_buf(),
                expected: HEADER_LEN as u64,
                got: len,
            });
        }
        return Err(not_ours());
    }
    file.read_exact(&mut header).map_err(io(path))?;
    if header[..8] != MAGIC {
        return Err(not_ours());
    }
    let word = |at: usize| {
        u32::from_le_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]])
    };
    let version = word(8);
    if version != FORMAT_VERSION {
        return Err(SnapshotError::Version {
            path: path.to_path_buf(),
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    let mut body_len = [0u8; 8];
    body_len.copy_from_slice(&header[16..24]);
    let body_len = u64::from_le_bytes(body_len);
    if body_len > MAX_BODY {
        return Err(SnapshotError::Corrupt {
            path: path.to_path_buf(),
            reason: format!("the header gives a body of {body_len} bytes, more than {MAX_BODY}"),
        });
    }
    let expected = HEADER_LEN as u64 + body_len;
    if len < expected {
        return Err(SnapshotError::Truncated {
            path: path.to_path_buf(),
            expected,
            got: len,
        });
    }
    if len > expected {
        return Err(SnapshotError::Corrupt {
            path: path.to_path_buf(),
            reason: format!("{} bytes follow the state", len - expected),
        });
    }
    // Bounded by MAX_BODY above.
    let mut body = vec![0u8; usize::try_from(body_len).unwrap_or(0)];
    file.read_exact(&mut body).map_err(io(path))?;
    let crc = crc32fast::hash(&body);
    if crc != word(24) {
        return Err(SnapshotError::Checksum {
            path: path.to_path_buf(),
            expected: word(24),
            got: crc,
        });
    }
    serde_json::from_slice(&body).map_err(|e| SnapshotError::Corrupt {
        path: path.to_path_buf(),
        reason: format!("the state does not parse: {e}"),
    })
}
