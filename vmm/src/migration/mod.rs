//! Live migration: move a running VM to another ferry, over TCP between hosts or a Unix
//! socket on one host.
//!
//! - `protocol`: the framed wire format and its messages.
//! - `transport`: connections that give up on cancel or on a stalled peer, and memfd
//!   passing.
//! - `sender`: the source's thread (pre-copy rounds, switch-over, commit).
//! - `receiver`: the destination's thread (checks, pages into RAM, the VM built from
//!   the state, resume on commit).
//! - `verify`: page hashes that both sides compare at switch-over.
//! - `postcopy`: the destination runs the guest first and fetches its memory on
//!   demand; fault serving on one side, page answers and the background push on the
//!   other.
//!
//! The migration threads never touch the VM itself: what needs the VMM thread (pausing
//! and saving the VM, resuming it, installing a received one) goes to it as a `Control`
//! message over a channel plus an eventfd, as API requests do.
//!
//! Shared state, who writes it and who reads it:
//! - `Progress::status`: written only by the migration thread (and by the VMM thread
//!   once, before the thread starts); read by the VMM thread for `GET /migration`.
//!   A mutex: every update is whole, and there is one writer, so none is lost.
//! - `Progress::phase`: `ACTIVE` until either the API's cancel moves it to
//!   `CANCELLED`, or the source's thread moves it to `COMMITTED` just before it tells
//!   the destination to run. Both are compare-and-swap from `ACTIVE`, so exactly one
//!   wins: a cancel after the commit is refused, and a commit after a cancel never
//!   happens. The `cancel` flag that connections watch is set with `CANCELLED`.

pub mod postcopy;
mod protocol;
pub mod receiver;
pub mod sender;
mod transport;
mod verify;

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use api::migration::{MigrationState, MigrationStatus};
use api::VmConfig;
use vmm_sys_util::eventfd::EventFd;

pub use protocol::{Kind, HEADER_LEN, MAGIC, VERSION};
pub use receiver::spawn as spawn_receiver;
pub use sender::spawn as spawn_sender;
pub use transport::{Listener, STALL_TIMEOUT};

use crate::snapshot::MachineState;
use crate::Vmm;

/// Why a migration failed.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// A socket call failed.
    #[error("cannot {what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The peer closed the connection.
    #[error("the peer closed the connection")]
    Closed,
    /// The peer stopped making progress.
    #[error("the connection stalled: {0}")]
    Stalled(String),
    /// `PUT /migration/cancel`.
    #[error("the migration was cancelled")]
    Cancelled,
    /// The stream broke the protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The peer gave up, and said why.
    #[error("the peer failed: {0}")]
    Peer(String),
    /// This side cannot take the VM.
    #[error("{0}")]
    Refused(String),
    /// The VMM thread could not do its part.
    #[error("{0}")]
    Vm(String),
    /// The pages differ between the two sides.
    #[error("verify: {0}")]
    Verify(String),
}

impl MigrationError {
    /// Whether the peer should be told: not when it gave up itself, nor when the link
    /// is broken or stalled (a message could only wait there).
    fn worth_telling(&self) -> bool {
        !matches!(
            self,
            MigrationError::Peer(_)
                | MigrationError::Closed
                | MigrationError::Stalled(_)
                | MigrationError::Io { .. }
        )
    }

    fn io(what: &str, source: std::io::Error) -> Self {
        MigrationError::Io {
            what: what.to_string(),
            source,
        }
    }
}

const ACTIVE: u8 = 0;
const COMMITTED: u8 = 1;
const CANCELLED: u8 = 2;

/// What a running migration shares with the VMM thread.
pub struct Progress {
    status: Mutex<MigrationStatus>,
    phase: AtomicU8,
    cancel: Arc<AtomicBool>,
    started: Instant,
    finished: AtomicBool,
}

impl Progress {
    /// Progress of a migration in `role` ("send" or "receive") that starts now.
    pub fn new(status: MigrationStatus) -> Arc<Progress> {
        Arc::new(Progress {
            status: Mutex::new(MigrationStatus {
                state: MigrationState::Active,
                ..status
            }),
            phase: AtomicU8::new(ACTIVE),
            cancel: Arc::new(AtomicBool::new(false)),
            started: Instant::now(),
            finished: AtomicBool::new(false),
        })
    }

    /// The status, with the time so far.
    pub fn status(&self) -> MigrationStatus {
        let mut s = self.status.lock().expect("poisoned").clone();
        if s.state == MigrationState::Active {
            s.total_ms = self.started.elapsed().as_secs_f64() * 1e3;
        }
        s
    }

    /// Whether the thread has ended (the migration completed, failed or was cancelled).
    pub fn finished(&self) -> bool {
        self.finished.load(Ordering::Acquire)
    }

    /// Asks the migration to stop. Refused once the source has committed.
    pub fn cancel(&self) -> Result<(), &'static str> {
        if self.finished() {
            return Err("no migration is running");
        }
        match self
            .phase
            .compare_exchange(ACTIVE, CANCELLED, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) | Err(CANCELLED) => {
                self.cancel.store(true, Ordering::Release);
                Ok(())
            }
            Err(_) => {
                Err("too late to cancel: the source has told the destination to run the guest")
            }
        }
    }

    /// The source commits: from here on it never runs the guest again. The
    /// destination commits before it takes the VM: from here on it runs the guest when
    /// the source says Go. False if a cancel came first.
    fn commit(&self) -> bool {
        self.phase
            .compare_exchange(ACTIVE, COMMITTED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    fn update(&self, f: impl FnOnce(&mut MigrationStatus)) {
        f(&mut self.status.lock().expect("poisoned"));
    }

    /// Records how the migration ended.
    fn end(&self, result: &Result<(), MigrationError>) {
        let total_ms = self.started.elapsed().as_secs_f64() * 1e3;
        self.update(|s| {
            s.total_ms = total_ms;
            match result {
                Ok(()) => s.state = MigrationState::Completed,
                Err(MigrationError::Cancelled) => {
                    s.state = MigrationState::Cancelled;
                    s.error = Some(MigrationError::Cancelled.to_string());
                }
                Err(e) => {
                    s.state = MigrationState::Failed;
                    s.error = Some(e.to_string());
                }
            }
        });
        self.finished.store(true, Ordering::Release);
    }
}

/// What a migration thread asks of the VMM thread.
pub enum Control {
    /// Source: pause the VM (if it runs) and return its state with the time of the
    /// pause in ns since the Unix epoch.
    Switchover(Sender<Result<(MachineState, u64), String>>),
    /// Source: this migration ended before the commit: run the guest again, if the
    /// migration paused it.
    Abort(Arc<Progress>),
    /// Source: the destination runs the guest: end this process.
    Finished,
    /// Destination: take this VM, built and paused, with the configuration it runs.
    Install(Box<Vmm>, Box<VmConfig>, Sender<Result<(), String>>),
    /// Destination: drop the VM installed for a migration that the source gave up
    /// before its commit (it said so), so that this ferry can receive again.
    Discard,
    /// Destination: run it; answers with the time its vCPUs were let go, in ns since
    /// the Unix epoch.
    Resume(Sender<Result<u64, String>>),
    /// Destination: post-copy failed: pause the guest, and hold guest RAM's
    /// registration (when pages are missing) so that they are never read as zeros and
    /// the guest never runs here again.
    PostcopyFailed(Option<Box<postcopy::Incoming>>),
    /// Destination: all of memory arrived after a post-copy.
    PostcopyDone,
}

/// The VMM thread's end of the migration threads' requests.
pub struct ControlChannel {
    /// Incoming requests.
    pub requests: Receiver<Control>,
    /// Readable when requests are waiting.
    pub wake: EventFd,
    link: ControlLink,
}

/// A migration thread's end.
#[derive(Clone)]
pub struct ControlLink {
    tx: Sender<Control>,
    wake: Arc<EventFd>,
}

impl ControlChannel {
    /// A new channel.
    pub fn new() -> std::io::Result<ControlChannel> {
        let wake = EventFd::new(libc::EFD_NONBLOCK)?;
        let (tx, requests) = mpsc::channel();
        let link = ControlLink {
            tx,
            wake: Arc::new(wake.try_clone()?),
        };
        Ok(ControlChannel {
            requests,
            wake,
            link,
        })
    }

    /// A link for a migration thread.
    pub fn link(&self) -> ControlLink {
        self.link.clone()
    }
}

impl ControlLink {
    fn send(&self, msg: Control) -> Result<(), MigrationError> {
        self.tx
            .send(msg)
            .map_err(|_| MigrationError::Vm("the VMM thread is gone".into()))?;
        let _ = self.wake.write(1);
        Ok(())
    }

    fn ask<T>(
        &self,
        make: impl FnOnce(Sender<Result<T, String>>) -> Control,
    ) -> Result<T, MigrationError> {
        let (tx, rx) = mpsc::channel();
        self.send(make(tx))?;
        rx.recv()
            .map_err(|_| MigrationError::Vm("the VMM thread is gone".into()))?
            .map_err(MigrationError::Vm)
    }
}

/// Now, in ns since the Unix epoch.
pub fn unix_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cancel and the source's commit race on both cores: exactly one wins every
    /// time, and the cancel flag is set exactly when the cancel won. Two threads that
    /// live for the whole test meet at a spinning barrier before each round, so both
    /// calls start within nanoseconds of each other.
    #[test]
    fn test_commit_and_cancel_never_both_win() {
        use std::sync::atomic::AtomicUsize;
        const ROUNDS: usize = 300_000;
        let progress: Vec<Arc<Progress>> = (0..ROUNDS)
            .map(|_| Progress::new(MigrationStatus::default()))
            .collect();
        let progress = Arc::new(progress);
        let arrived = Arc::new(AtomicUsize::new(0));
        let spin_until = |arrived: &AtomicUsize, round: usize| {
            arrived.fetch_add(1, Ordering::AcqRel);
            while arrived.load(Ordering::Acquire) < 2 * (round + 1) {
                std::hint::spin_loop();
            }
        };
        let (p2, a2) = (progress.clone(), arrived.clone());
        let canceller = std::thread::spawn(move || {
            (0..ROUNDS)
                .map(|i| {
                    spin_until(&a2, i);
                    p2[i].cancel().is_ok()
                })
                .collect::<Vec<bool>>()
        });
        let committed: Vec<bool> = (0..ROUNDS)
            .map(|i| {
                spin_until(&arrived, i);
                progress[i].commit()
            })
            .collect();
        let cancelled = canceller.join().expect("thread");
        for i in 0..ROUNDS {
            assert!(
                committed[i] != cancelled[i],
                "round {i}: committed {}, cancelled {}",
                committed[i],
                cancelled[i]
            );
            assert_eq!(progress[i].cancel.load(Ordering::Acquire), cancelled[i]);
        }
        // Both sides won some rounds, so the race was real.
        assert!(committed.iter().any(|c| *c) && cancelled.iter().any(|c| *c));
    }

    #[test]
    fn test_a_finished_migration_cannot_be_cancelled() {
        let p = Progress::new(MigrationStatus::default());
        p.end(&Err(MigrationError::Closed));
        assert_eq!(p.cancel(), Err("no migration is running"));
        let s = p.status();
        assert_eq!(s.state, MigrationState::Failed);
        assert_eq!(s.error.as_deref(), Some("the peer closed the connection"));
    }
}
