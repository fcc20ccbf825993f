//! ferry's log: lines in Firecracker's format, on stderr until `PUT /logger` (or
//! `--log-path`) names a file or a FIFO.
//!
//! A line is `<UTC time> [<instance id>:<thread>(:LEVEL)(:file:line)] message`, as
//! Firecracker writes it. Lines are formatted on the stack and written with one
//! `write(2)`, so logging never allocates and never takes a lock a writer could hold
//! for long. A configured file or FIFO is opened non-blocking, so logging to it never
//! blocks: a line a full FIFO cannot take is dropped and counted
//! (`logger.missed_log_count`), as Firecracker does. (stderr is written as it was
//! given.) The same path serves the seccomp signal handler (`Line::finish`).
//!
//! Shared state, all in `STATE`: the level, flags and module prefix are atomics or a
//! `RwLock` read per event, written only by `configure` on the VMM thread. Lines go to
//! one fd number that never changes (`fd`, a copy of stderr at first): `configure`
//! moves a new destination onto it with `dup3`, which is atomic, so a writer (even the
//! signal handler, which takes no lock) writes whole lines to the old destination or
//! the new one, never to a closed or reused fd.

use std::fmt::{self, Write as _};
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicU8, Ordering};
use std::sync::{OnceLock, RwLock};

use tracing::{Event, Metadata, Subscriber};
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::prelude::*;

mod time;

/// The instance id of a ferry started without `--id`, as Firecracker's.
pub const DEFAULT_INSTANCE_ID: &str = "anonymous-instance";

/// Longest line written: a FIFO takes up to `PIPE_BUF` bytes in one piece.
const MAX_LINE: usize = libc::PIPE_BUF;

/// How much is logged, in Firecracker's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Nothing.
    Off = 0,
    /// Errors only.
    Error = 1,
    /// Errors and warnings.
    Warn = 2,
    /// Also what happens: requests, snapshots, migrations.
    Info = 3,
    /// Also detail.
    Debug = 4,
    /// Everything.
    Trace = 5,
}

impl Level {
    fn from_u8(v: u8) -> Level {
        match v {
            0 => Level::Off,
            1 => Level::Error,
            2 => Level::Warn,
            3 => Level::Info,
            4 => Level::Debug,
            _ => Level::Trace,
        }
    }

    fn of(level: &tracing::Level) -> Level {
        match *level {
            tracing::Level::ERROR => Level::Error,
            tracing::Level::WARN => Level::Warn,
            tracing::Level::INFO => Level::Info,
            tracing::Level::DEBUG => Level::Debug,
            tracing::Level::TRACE => Level::Trace,
        }
    }

    /// How a line shows it with `show_level`, as Firecracker does.
    pub fn label(self) -> &'static str {
        match self {
            Level::Off => "OFF",
            Level::Error => "ERROR",
            Level::Warn => "WARN",
            Level::Info => "INFO",
            Level::Debug => "DEBUG",
            Level::Trace => "TRACE",
        }
    }
}

/// A level name that is none of Firecracker's.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("invalid log level \"{0}\": use Error, Warning, Info, Debug, Trace or Off")]
pub struct BadLevel(String);

impl FromStr for Level {
    type Err = BadLevel;

    /// Firecracker's spellings, in any case: `Warning` and `Warn` are the same.
    fn from_str(s: &str) -> Result<Level, BadLevel> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "off" => Level::Off,
            "error" => Level::Error,
            "warn" | "warning" => Level::Warn,
            "info" => Level::Info,
            "debug" => Level::Debug,
            "trace" => Level::Trace,
            _ => return Err(BadLevel(s.to_string())),
        })
    }
}

/// What `PUT /logger` (or the command line) sets. `None` leaves a setting as it is,
/// except the level, which Firecracker resets to `Info` when a request omits it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Config {
    /// A file or FIFO to log to instead of stderr.
    pub log_path: Option<PathBuf>,
    /// The level.
    pub level: Option<Level>,
    /// Whether lines show their level.
    pub show_level: Option<bool>,
    /// Whether lines show the source file and line that logged them.
    pub show_log_origin: Option<bool>,
    /// Only log from modules whose path starts with this.
    pub module: Option<String>,
}

/// Why the log cannot go where asked.
#[derive(Debug, thiserror::Error)]
pub enum LoggerError {
    /// The file or FIFO did not open.
    #[error("cannot open the log file {path}: {source}")]
    Open {
        /// The path given.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The instance id breaks Firecracker's rule.
    #[error("invalid instance id \"{0}\": use 1 to 64 letters, digits and '-'")]
    BadId(String),
}

struct State {
    level: AtomicU8,
    show_level: AtomicBool,
    show_origin: AtomicBool,
    module: RwLock<Option<String>>,
    /// The log's fd: set once, by `init` (or the first `configure` without it); until
    /// then stderr.
    fd: AtomicI32,
    missed: AtomicU64,
}

static STATE: State = State {
    level: AtomicU8::new(Level::Warn as u8),
    show_level: AtomicBool::new(false),
    show_origin: AtomicBool::new(false),
    module: RwLock::new(None),
    fd: AtomicI32::new(-1),
    missed: AtomicU64::new(0),
};

/// The fd lines go to.
fn log_fd() -> i32 {
    match STATE.fd.load(Ordering::Acquire) {
        -1 => libc::STDERR_FILENO,
        fd => fd,
    }
}

static INSTANCE_ID: OnceLock<String> = OnceLock::new();

/// Checks an instance id against Firecracker's rule: 1 to 64 characters, each a letter,
/// a digit or `-`.
pub fn check_instance_id(id: &str) -> Result<(), LoggerError> {
    let ok =
        (1..=64).contains(&id.len()) && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
    if ok {
        Ok(())
    } else {
        Err(LoggerError::BadId(id.to_string()))
    }
}

/// This ferry's instance id: `--id`, or `anonymous-instance`.
pub fn instance_id() -> &'static str {
    INSTANCE_ID
        .get()
        .map_or(DEFAULT_INSTANCE_ID, String::as_str)
}

/// Lines that a full FIFO (or a failing file) did not take.
pub fn missed_log_count() -> u64 {
    STATE.missed.load(Ordering::Relaxed)
}

/// The log's own fd, a copy of stderr until a destination is configured: made by the
/// first caller (`init`, or `configure` in a library test that never called it).
fn own_fd() -> Result<i32, std::io::Error> {
    let fd = STATE.fd.load(Ordering::Acquire);
    if fd >= 0 {
        return Ok(fd);
    }
    // SAFETY: F_DUPFD_CLOEXEC makes a new fd for stderr's open file; no memory is
    // touched.
    let copy = unsafe { libc::fcntl(libc::STDERR_FILENO, libc::F_DUPFD_CLOEXEC, 3) };
    if copy < 0 {
        return Err(std::io::Error::last_os_error());
    }
    match STATE
        .fd
        .compare_exchange(-1, copy, Ordering::AcqRel, Ordering::Acquire)
    {
        Ok(_) => Ok(copy),
        Err(current) => {
            // SAFETY: `copy` is this call's own fd, used by nobody; another call won.
            unsafe { libc::close(copy) };
            Ok(current)
        }
    }
}

/// Starts logging: sets the instance id and the first configuration, and routes
/// `tracing`'s events here. Call once, before any thread starts.
pub fn init(id: &str, config: &Config) -> Result<(), LoggerError> {
    check_instance_id(id)?;
    let _ = INSTANCE_ID.set(id.to_string());
    // Without its own fd the log stays on stderr itself, and a destination cannot be
    // configured later (`configure` says why).
    let _ = own_fd();
    configure(config)?;
    // A second subscriber (in tests) keeps the first; ours is then simply not used.
    let _ = tracing_subscriber::registry().with(FcLayer).try_init();
    Ok(())
}

/// Applies `PUT /logger`: nothing changes unless the new destination is in place.
pub fn configure(config: &Config) -> Result<(), LoggerError> {
    if let Some(path) = &config.log_path {
        let failed = |source| LoggerError::Open {
            path: path.clone(),
            source,
        };
        let file = open_sink(path).map_err(failed)?;
        let fd = own_fd().map_err(failed)?;
        // SAFETY: both fds are open; dup3 atomically makes `fd` refer to the new file
        // (closing what it referred to); `file` closes its own fd after.
        if unsafe { libc::dup3(file.as_raw_fd(), fd, libc::O_CLOEXEC) } < 0 {
            return Err(failed(std::io::Error::last_os_error()));
        }
    }
    let level = config.level.unwrap_or(Level::Info);
    STATE.level.store(level as u8, Ordering::Relaxed);
    if let Some(show) = config.show_level {
        STATE.show_level.store(show, Ordering::Relaxed);
    }
    if let Some(show) = config.show_log_origin {
        STATE.show_origin.store(show, Ordering::Relaxed);
    }
    if let Some(module) = &config.module {
        *STATE.module.write().unwrap_or_else(|e| e.into_inner()) = Some(module.clone());
    }
    Ok(())
}

/// Opens a log or metrics destination as Firecracker does: created if missing, and
/// non-blocking, read and write, so that a FIFO opens with no reader yet and a full
/// one refuses a line instead of stopping the thread that writes it. Appends to a file.
pub fn open_sink(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
}

/// A line being built on the stack; what does not fit is cut.
pub struct Line {
    buf: [u8; MAX_LINE],
    len: usize,
}

impl Line {
    /// A line with Firecracker's prefix: time, instance id, thread, and the level and
    /// origin when they are shown.
    pub fn start(thread: &str, level: Level, origin: Option<(&str, u32)>) -> Line {
        let mut line = Line {
            buf: [0; MAX_LINE],
            len: 0,
        };
        let _ = write!(line, "{} [{}:{thread}", time::Utc::now(), instance_id());
        if STATE.show_level.load(Ordering::Relaxed) {
            let _ = write!(line, ":{}", level.label());
        }
        if STATE.show_origin.load(Ordering::Relaxed) {
            match origin {
                Some((file, n)) => {
                    let _ = write!(line, ":{file}:{n}");
                }
                None => {
                    let _ = write!(line, ":?");
                }
            }
        }
        let _ = line.write_str("] ");
        line
    }

    /// Ends the line and writes it to the log (stderr or the configured file) with one
    /// `write(2)` and no lock: the seccomp signal handler uses this too, and may have
    /// interrupted a thread holding any lock. A line that does not go whole is counted
    /// as missed.
    pub fn finish(mut self) {
        if self.len == MAX_LINE {
            self.len -= 1;
        }
        self.buf[self.len] = b'\n';
        let bytes = &self.buf[..=self.len];
        // SAFETY: writes from a live buffer of `bytes.len()` bytes to the log's fd.
        let n = unsafe { libc::write(log_fd(), bytes.as_ptr().cast(), bytes.len()) };
        if !usize::try_from(n).is_ok_and(|n| n == bytes.len()) {
            STATE.missed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl fmt::Write for Line {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let room = MAX_LINE - self.len;
        let n = s.len().min(room);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

/// Routes `tracing` events into Firecracker-format lines.
struct FcLayer;

fn enabled(meta: &Metadata<'_>) -> bool {
    if Level::of(meta.level()) > Level::from_u8(STATE.level.load(Ordering::Relaxed)) {
        return false;
    }
    match &*STATE.module.read().unwrap_or_else(|e| e.into_inner()) {
        Some(prefix) => meta
            .module_path()
            .is_some_and(|m| m.starts_with(prefix.as_str())),
        None => true,
    }
}

impl<S: Subscriber> Layer<S> for FcLayer {
    fn register_callsite(&self, _: &'static Metadata<'static>) -> tracing::subscriber::Interest {
        // The level changes at run time: ask every time, never cache.
        tracing::subscriber::Interest::sometimes()
    }

    fn enabled(&self, meta: &Metadata<'_>, _: Context<'_, S>) -> bool {
        enabled(meta)
    }

    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        let meta = event.metadata();
        let origin = meta.file().zip(meta.line());
        // Firecracker shows a thread without a name as `-`.
        let current = std::thread::current();
        let mut line = Line::start(
            current.name().unwrap_or("-"),
            Level::of(meta.level()),
            origin,
        );
        event.record(&mut Fields(&mut line));
        line.finish();
    }
}

/// Writes an event's message, then its other fields as ` name=value`.
struct Fields<'a>(&'a mut Line);

impl tracing::field::Visit for Fields<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.0, "{value:?}");
        } else {
            let _ = write!(self.0, " {}={value:?}", field.name());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_parse_in_firecrackers_spellings() {
        assert_eq!("Warning".parse(), Ok(Level::Warn));
        assert_eq!("warn".parse(), Ok(Level::Warn));
        assert_eq!("DEBUG".parse(), Ok(Level::Debug));
        assert_eq!("Off".parse(), Ok(Level::Off));
        assert_eq!(
            "loud".parse::<Level>().unwrap_err().to_string(),
            "invalid log level \"loud\": use Error, Warning, Info, Debug, Trace or Off"
        );
    }

    #[test]
    fn instance_ids_follow_firecrackers_rule() {
        assert!(check_instance_id("vm-123").is_ok());
        assert!(check_instance_id(&"a".repeat(64)).is_ok());
        assert!(check_instance_id(&"a".repeat(65)).is_err());
        assert!(check_instance_id("").is_err());
        assert!(check_instance_id("vm_1").is_err());
        assert!(check_instance_id("../x").is_err());
    }

    #[test]
    fn a_long_line_is_cut_to_what_a_fifo_takes_whole() {
        let mut line = Line::start("t", Level::Info, None);
        let _ = line.write_str(&"x".repeat(2 * MAX_LINE));
        assert_eq!(line.len, MAX_LINE);
    }
}
