//! Console output that never blocks a vCPU: the UART hands bytes to a bounded buffer, and
//! a thread of its own writes them to the sink (stdout, a file, a pipe).
//!
//! A sink that stops taking bytes (a pipe nobody reads) blocks only that thread. Once
//! the buffer is full, further bytes are dropped and counted (`dropped`), as a real
//! UART's output is lost when nobody listens; the guest, the VMM thread and the API go
//! on. Firecracker fixed the same hang the same way.
//!
//! Who writes and reads `Buffer`: the UART's writers (vCPU threads, under the UART's
//! lock) append; the console thread takes everything there is; `finish` closes it. All
//! under the one mutex, held only to copy bytes, never across I/O.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// Bytes the console holds for a sink that is slow or stuck.
pub const CONSOLE_BUFFER: usize = 64 * 1024;

/// How long `finish` waits for a sink that makes no progress.
const FINISH_STALL: Duration = Duration::from_millis(200);

#[derive(Default)]
struct Buffer {
    bytes: VecDeque<u8>,
    closed: bool,
    /// The console thread has ended.
    done: bool,
}

struct Shared {
    buffer: Mutex<Buffer>,
    /// Signalled when bytes arrive, when the buffer is closed, and when the console
    /// thread writes some out or ends.
    changed: Condvar,
    capacity: usize,
    /// Bytes the guest wrote, dropped ones included.
    written: AtomicU64,
    /// Bytes dropped because the buffer was full.
    dropped: AtomicU64,
    /// Bytes the sink took.
    flushed: AtomicU64,
}

/// The console's writing thread and its buffer.
pub struct Console {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Console {
    /// Starts a console thread writing to `sink`, buffering at most `capacity` bytes.
    pub fn spawn(sink: Box<dyn Write + Send>, capacity: usize) -> io::Result<Console> {
        let shared = Arc::new(Shared {
            buffer: Mutex::new(Buffer::default()),
            changed: Condvar::new(),
            capacity,
            written: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            flushed: AtomicU64::new(0),
        });
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("console".into())
            .spawn(move || {
                seccomp::apply(seccomp::Thread::Console);
                write_out(&thread_shared, sink)
            })?;
        Ok(Console {
            shared,
            thread: Some(thread),
        })
    }

    /// The UART's end: a `Write` that never blocks.
    pub fn output(&self) -> SerialOutput {
        SerialOutput {
            shared: self.shared.clone(),
        }
    }

    /// Bytes the guest wrote.
    pub fn written(&self) -> u64 {
        self.shared.written.load(Ordering::Relaxed)
    }

    /// Bytes dropped because the sink did not keep up.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// Takes no more bytes, and waits while the sink takes what is buffered. Gives up
    /// once the sink has taken nothing for 200 ms: a stuck sink never holds ferry.
    pub fn finish(&mut self) {
        let mut buffer = self.shared.buffer.lock().expect("poisoned");
        buffer.closed = true;
        self.shared.changed.notify_all();
        loop {
            if buffer.done {
                drop(buffer);
                if let Some(thread) = self.thread.take() {
                    let _ = thread.join();
                }
                return;
            }
            let before = self.shared.flushed.load(Ordering::Acquire);
            let (next, _) = self
                .shared
                .changed
                .wait_timeout(buffer, FINISH_STALL)
                .expect("poisoned");
            buffer = next;
            if !buffer.done && self.shared.flushed.load(Ordering::Acquire) == before {
                tracing::warn!(
                    "the console's sink took nothing for {FINISH_STALL:?}; {} bytes not written",
                    buffer.bytes.len()
                );
                // Left behind, blocked in the sink; it ends with the process.
                self.thread = None;
                return;
            }
        }
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.finish();
        }
    }
}

fn write_out(shared: &Shared, mut sink: Box<dyn Write + Send>) {
    let mut chunk = Vec::new();
    loop {
        {
            let mut buffer = shared.buffer.lock().expect("poisoned");
            while buffer.bytes.is_empty() && !buffer.closed {
                buffer = shared.changed.wait(buffer).expect("poisoned");
            }
            if buffer.bytes.is_empty() {
                buffer.done = true;
                shared.changed.notify_all();
                return;
            }
            chunk.clear();
            chunk.extend(buffer.bytes.drain(..));
        }
        // A sink that fails (a closed pipe) loses the bytes; the guest is not told.
        let _ = sink.write_all(&chunk).and_then(|()| sink.flush());
        shared
            .flushed
            .fetch_add(chunk.len() as u64, Ordering::AcqRel);
        shared.changed.notify_all();
    }
}

/// What the UART writes to: appends to the console's buffer, never blocks.
pub struct SerialOutput {
    shared: Arc<Shared>,
}

impl Write for SerialOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let s = &self.shared;
        s.written.fetch_add(buf.len() as u64, Ordering::Relaxed);
        let mut buffer = s.buffer.lock().expect("poisoned");
        if buffer.closed {
            s.dropped.fetch_add(buf.len() as u64, Ordering::Relaxed);
            return Ok(buf.len());
        }
        let was_empty = buffer.bytes.is_empty();
        let room = s.capacity.saturating_sub(buffer.bytes.len());
        let taken = room.min(buf.len());
        buffer.bytes.extend(&buf[..taken]);
        if taken < buf.len() {
            s.dropped
                .fetch_add((buf.len() - taken) as u64, Ordering::Relaxed);
        }
        drop(buffer);
        // The console thread waits only while the buffer is empty.
        if was_empty && taken > 0 {
            s.changed.notify_all();
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// A sink that takes nothing until told to, like a pipe nobody reads.
    struct Stuck(Arc<(Mutex<bool>, Condvar)>, Arc<Mutex<Vec<u8>>>);

    impl Write for Stuck {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let (open, cv) = &*self.0;
            let mut open = open.lock().expect("poisoned");
            while !*open {
                open = cv.wait(open).expect("poisoned");
            }
            self.1.lock().expect("poisoned").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn test_a_stuck_sink_never_blocks_the_writer() {
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        let got = Arc::new(Mutex::new(Vec::new()));
        let mut console =
            Console::spawn(Box::new(Stuck(gate.clone(), got.clone())), 4096).expect("spawn");
        let mut out = console.output();
        let started = Instant::now();
        for _ in 0..100 {
            out.write_all(&[b'x'; 1000]).expect("write");
        }
        assert!(started.elapsed() < Duration::from_secs(1), "writes blocked");
        assert_eq!(console.written(), 100_000);
        // The sink took (at most) one chunk before it blocked; the rest stayed or went.
        assert!(
            console.dropped() >= 100_000 - 2 * 4096,
            "{}",
            console.dropped()
        );
        let started = Instant::now();
        console.finish();
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "finish waited for a stuck sink"
        );
        // Let the thread go, so the test leaves nothing blocked behind.
        *gate.0.lock().expect("poisoned") = true;
        gate.1.notify_all();
    }

    #[test]
    fn test_everything_reaches_a_sink_that_keeps_up() {
        let gate = Arc::new((Mutex::new(true), Condvar::new()));
        let got = Arc::new(Mutex::new(Vec::new()));
        let mut console =
            Console::spawn(Box::new(Stuck(gate, got.clone())), 1 << 20).expect("spawn");
        let mut out = console.output();
        for i in 0..1000u32 {
            out.write_all(format!("line {i}\n").as_bytes())
                .expect("write");
        }
        console.finish();
        let text = String::from_utf8(got.lock().expect("poisoned").clone()).expect("utf-8");
        assert_eq!(text.lines().count(), 1000);
        assert_eq!(text.lines().last(), Some("line 999"));
        assert_eq!(console.dropped(), 0);
    }
}
