//! A tap device: Ethernet frames to and from the host's network stack.
//!
//! Opening one is a single `TUNSETIFF` ioctl on `/dev/net/tun`; no well-kept crate does
//! only that without also configuring addresses, so it is written here.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

/// `_IOW('T', 202, int)`.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;

/// Why a tap could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// `/dev/net/tun` could not be opened.
    #[error("cannot open /dev/net/tun: {0}")]
    OpenTun(#[source] std::io::Error),
    /// The name does not fit `IFNAMSIZ`.
    #[error("tap name \"{0}\" is empty, too long (15 bytes at most) or has a NUL")]
    BadName(String),
    /// The kernel refused to attach to the tap.
    #[error("cannot attach to tap \"{name}\": {source}")]
    Attach {
        /// The tap's name.
        name: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// `struct ifreq`, as far as TUNSETIFF reads it.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// An open, non-blocking tap.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Attaches to the tap called `name` (creating it, down, if it does not exist and
    /// ferry may). Frames carry no packet-info header and no virtio-net header.
    pub fn open(name: &str) -> Result<Tap, TapError> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('\0') {
            return Err(TapError::BadName(name.into()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::OpenTun)?;
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: IFF_TAP | IFF_NO_PI,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // A tap just closed can still be held for a moment by a forked child that has not
        // reached exec (O_CLOEXEC closes it only then): retry EBUSY briefly.
        let mut tries = 0;
        loop {
            // SAFETY: TUNSETIFF reads (and may write back the name into) an ifreq, which
            // `req` is, laid out as the kernel's and 40 bytes long; the fd is ours.
            let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) };
            if rc == 0 {
                break;
            }
            let source = std::io::Error::last_os_error();
            tries += 1;
            if source.raw_os_error() != Some(libc::EBUSY) || tries >= 50 {
                return Err(TapError::Attach {
                    name: name.into(),
                    source,
                });
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        Ok(Tap {
            file,
            name: name.into(),
        })
    }

    /// The tap's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads one frame; `WouldBlock` when none is waiting.
    pub fn read_frame(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.file.read(buf)
    }

    /// Sends one frame.
    pub fn write_frame(&mut self, frame: &[u8]) -> std::io::Result<usize> {
        self.file.write(frame)
    }

    /// The fd, for the event loop.
    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}
