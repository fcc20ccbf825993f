//! The VMM thread's event loop: it waits, on epoll through event-manager, for the guest
//! to stop (vCPU events, i8042 reset), for a stop signal, and for console input.

use std::io::Read;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};

use devices::legacy::{Serial, SerialInput};
use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::register_signal_handler;

use crate::{ExitReason, Vmm};

/// The eventfd that SIGINT and SIGTERM write to; -1 until the loop is set up.
static STOP_FD: AtomicI32 = AtomicI32::new(-1);

extern "C" fn handle_stop_signal(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let fd = STOP_FD.load(Ordering::Relaxed);
    if fd >= 0 {
        let one = 1u64;
        // SAFETY: write(2) on an eventfd with an 8-byte buffer is async-signal-safe.
        unsafe { libc::write(fd, &one as *const u64 as *const libc::c_void, 8) };
    }
}

/// Watches everything that ends the VM.
struct ExitWatcher {
    vmm: Arc<Mutex<Vmm>>,
    stop: EventFd,
    exit: Option<ExitReason>,
}

impl MutEventSubscriber for ExitWatcher {
    fn init(&mut self, ops: &mut EventOps) {
        let vmm = self.vmm.lock().expect("poisoned");
        for fd in [
            vmm.vcpu_event_fd.as_raw_fd(),
            vmm.devices.reset_evt.as_raw_fd(),
            self.stop.as_raw_fd(),
        ] {
            if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                tracing::error!("cannot watch fd {fd}: {e:?}");
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.fd() == self.stop.as_raw_fd() {
            let _ = self.stop.read();
            self.exit = Some(ExitReason::Requested);
            return;
        }
        if let Some(reason) = self.vmm.lock().expect("poisoned").guest_exit() {
            self.exit = Some(reason);
        }
    }
}

/// Feeds a terminal's keystrokes to the guest's UART.
pub struct StdinInput {
    serial: Arc<Mutex<Serial>>,
    fd: RawFd,
}

impl StdinInput {
    /// Reads from ferry's stdin.
    pub fn new(serial: Arc<Mutex<Serial>>) -> Self {
        StdinInput {
            serial,
            fd: libc::STDIN_FILENO,
        }
    }
}

impl MutEventSubscriber for StdinInput {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new_raw(self.fd, EventSet::IN)) {
            tracing::warn!("console input disabled: {e:?}");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let mut buf = [0u8; 64];
        match std::io::stdin().lock().read(&mut buf) {
            Ok(0) | Err(_) => {
                // End of input: stop watching, the guest keeps running.
                let _ = ops.remove(events);
            }
            Ok(n) => {
                let taken = self.serial.lock().expect("poisoned").enqueue(&buf[..n]);
                if taken < n {
                    tracing::debug!("serial FIFO full, {} input bytes dropped", n - taken);
                }
            }
        }
    }
}

/// Why the event loop could not run.
#[derive(Debug, thiserror::Error)]
pub enum EventLoopError {
    /// epoll or eventfd setup failed.
    #[error("cannot set up the event loop: {0}")]
    Setup(String),
}

/// Runs the VMM's event loop until the VM ends, and returns why it ended.
pub fn run_until_exit(
    vmm: Arc<Mutex<Vmm>>,
    stdin: Option<StdinInput>,
) -> Result<ExitReason, EventLoopError> {
    let setup = |e: &dyn std::fmt::Debug| EventLoopError::Setup(format!("{e:?}"));
    let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| setup(&e))?;
    STOP_FD.store(stop.as_raw_fd(), Ordering::Relaxed);
    for sig in [libc::SIGINT, libc::SIGTERM] {
        register_signal_handler(sig, handle_stop_signal).map_err(|e| setup(&e))?;
    }

    let mut manager: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> =
        EventManager::new().map_err(|e| setup(&e))?;
    let watcher = Arc::new(Mutex::new(ExitWatcher {
        vmm,
        stop,
        exit: None,
    }));
    manager.add_subscriber(watcher.clone());
    if let Some(input) = stdin {
        manager.add_subscriber(Arc::new(Mutex::new(input)));
    }
    loop {
        if let Some(reason) = watcher.lock().expect("poisoned").exit.take() {
            STOP_FD.store(-1, Ordering::Relaxed);
            return Ok(reason);
        }
        if let Err(e) = manager.run() {
            // A stop signal delivered to this thread interrupts epoll_wait.
            tracing::debug!("event loop woke with {e:?}");
        }
    }
}
