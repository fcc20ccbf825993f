//! What the benchmark programs share: finding the binaries and the test guest, reading
//! the guest's console as it prints, and the median of their runs.
// Each benchmark uses a subset.
#![allow(dead_code)]

use std::ffi::CString;
use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// The median of `v`, leaving out NaNs (the upper of the two middle values for an even
/// count); NaN if nothing is left.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| !x.is_nan());
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// `--ferry` if given, else the `ferry` binary next to this program.
pub fn ferry_binary(given: &Option<PathBuf>) -> Result<PathBuf, String> {
    match given {
        Some(p) => Ok(p.clone()),
        None => Ok(std::env::current_exe()
            .map_err(|e| e.to_string())?
            .with_file_name("ferry")),
    }
}

/// `--guest` if given, else `$FERRY_GUEST`.
pub fn guest_image(given: &Option<PathBuf>) -> Result<PathBuf, String> {
    given
        .clone()
        .or_else(|| std::env::var_os("FERRY_GUEST").map(PathBuf::from))
        .ok_or_else(|| {
            "no guest: pass --guest or set FERRY_GUEST (scripts/build-guest.sh prints it)"
                .to_owned()
        })
}

/// The guest's console as a FIFO that a thread of this program reads, stamping each
/// line as it arrives. A console file would have to be read again on every poll, beside
/// the migration or snapshot being measured, on the same two cores.
pub struct ConsoleTap {
    path: PathBuf,
    lines: Arc<Lines>,
    /// This program's own end, kept to write the line that stops the reader.
    stop: std::fs::File,
    reader: Option<std::thread::JoinHandle<()>>,
}

#[derive(Default)]
struct Lines {
    seen: Mutex<Seen>,
    arrived: Condvar,
}

#[derive(Default)]
struct Seen {
    /// Every line, with the time it arrived.
    lines: Vec<(Instant, String)>,
    /// The pass lines' numbers, with the time each arrived.
    passes: Vec<(u64, Instant)>,
}

/// Ends the reader, after whatever partial line a killed ferry left; no guest prints
/// a NUL.
const STOP: &str = "\0stop";

/// The pass number of a `pass N ok` or `dirty pass N` line.
fn pass_number(line: &str) -> Option<u64> {
    let rest = line
        .strip_prefix("pass ")
        .or_else(|| line.strip_prefix("dirty pass "))?;
    rest.split(' ').next()?.parse().ok()
}

impl ConsoleTap {
    /// Makes a FIFO at `path` (replacing what is there) and starts reading it.
    pub fn create(path: &Path) -> Result<ConsoleTap, String> {
        let err = |e: std::io::Error| format!("{}: {e}", path.display());
        let _ = std::fs::remove_file(path);
        let c = CString::new(path.as_os_str().as_bytes()).map_err(|e| e.to_string())?;
        // SAFETY: `c` is a NUL-terminated path that mkfifo only reads.
        if unsafe { libc::mkfifo(c.as_ptr(), 0o600) } != 0 {
            return Err(err(std::io::Error::last_os_error()));
        }
        // Read and write: a read-only open would wait for a writer, and a reader with no
        // writer left would see end-of-file between the source ferry and the destination.
        let fifo = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(err)?;
        let stop = fifo.try_clone().map_err(err)?;
        let lines = Arc::new(Lines::default());
        let shared = Arc::clone(&lines);
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(fifo).lines() {
                let Ok(line) = line else { break };
                if line.ends_with(STOP) {
                    break;
                }
                let now = Instant::now();
                let Ok(mut seen) = shared.seen.lock() else {
                    break;
                };
                if let Some(n) = pass_number(&line) {
                    seen.passes.push((n, now));
                }
                seen.lines.push((now, line));
                shared.arrived.notify_all();
            }
        });
        Ok(ConsoleTap {
            path: path.to_owned(),
            lines,
            stop,
            reader: Some(reader),
        })
    }

    /// The FIFO's path, for `serial_out_path`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Waits up to `timeout` for `found` to find something in what has arrived.
    fn wait_until<T>(&self, timeout: Duration, found: impl Fn(&Seen) -> Option<T>) -> Option<T> {
        let deadline = Instant::now() + timeout;
        let mut seen = self.lines.seen.lock().ok()?;
        loop {
            if let Some(t) = found(&seen) {
                return Some(t);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            seen = self.lines.arrived.wait_timeout(seen, left).ok()?.0;
        }
    }

    /// Waits up to `timeout` for a line that contains `needle`.
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> Result<(), String> {
        self.wait_until(timeout, |seen| {
            seen.lines
                .iter()
                .any(|(_, l)| l.contains(needle))
                .then_some(())
        })
        .ok_or_else(|| format!("the guest never printed {needle:?}"))
    }

    /// The highest pass number printed so far (0 before the first).
    pub fn last_pass(&self) -> u64 {
        self.lines
            .seen
            .lock()
            .map(|s| s.passes.iter().map(|p| p.0).max().unwrap_or(0))
            .unwrap_or(0)
    }

    /// The highest pass number printed before `at`.
    pub fn last_pass_before(&self, at: Instant) -> u64 {
        self.lines
            .seen
            .lock()
            .map(|s| {
                s.passes
                    .iter()
                    .filter(|p| p.1 < at)
                    .map(|p| p.0)
                    .max()
                    .unwrap_or(0)
            })
            .unwrap_or(0)
    }

    /// Waits up to `timeout` for pass `n`, and returns when its line arrived.
    pub fn pass_at(&self, n: u64, timeout: Duration) -> Option<Instant> {
        self.wait_until(timeout, |seen| {
            seen.passes.iter().find(|p| p.0 == n).map(|p| p.1)
        })
    }
}

impl Drop for ConsoleTap {
    fn drop(&mut self) {
        if writeln!(self.stop, "{STOP}").is_ok() {
            if let Some(reader) = self.reader.take() {
                let _ = reader.join();
            }
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::ConsoleTap;
    use std::io::Write;
    use std::time::{Duration, Instant};

    /// Lines written by another opener of the FIFO arrive stamped, pass numbers are
    /// read, and a partial line left by a killed writer does not keep the reader from
    /// stopping.
    #[test]
    fn test_console_tap_stamps_lines_and_stops_after_a_partial_one() {
        let dir = std::env::temp_dir().join(format!("ferry-tap-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let tap = ConsoleTap::create(&dir.join("console")).expect("tap");
        let mut guest = std::fs::OpenOptions::new()
            .append(true)
            .open(tap.path())
            .expect("open the FIFO as a ferry does");
        let before = Instant::now();
        writeln!(guest, "ferry-guest: ready\npass 1 ok\ndirty pass 3 wrote").expect("write");
        tap.wait_for("ready", Duration::from_secs(5))
            .expect("ready");
        let third = tap.pass_at(3, Duration::from_secs(5)).expect("pass 3");
        assert!(third >= before);
        assert_eq!(tap.last_pass(), 3);
        assert_eq!(tap.last_pass_before(before), 0);
        assert_eq!(tap.pass_at(4, Duration::from_millis(20)), None);
        assert!(tap
            .wait_for("never printed", Duration::from_millis(20))
            .is_err());
        write!(guest, "pass 4 o").expect("a partial line");
        drop(guest);
        let (stopped, wait) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            drop(tap);
            let _ = stopped.send(());
        });
        wait.recv_timeout(Duration::from_secs(5))
            .expect("the reader stops after a partial line");
        assert!(!dir.join("console").exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
