//! vCPU threads. Each runs `KVM_RUN` in a loop, handles port I/O on the bus, and takes
//! commands (pause, resume, save, stop) over a channel. A command is delivered by sending
//! it and then kicking the thread out of `KVM_RUN` with a signal. `Freeze` keeps every
//! vCPU out of the guest without the VMM thread, for a migration thread that must know
//! the guest runs no more before it says so.

pub mod state;

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devices::{MmioBus, PioBus};
use kvm_bindings::kvm_run;
use kvm_ioctls::{VcpuExit, VcpuFd};
use state::VcpuState;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

/// Why a vCPU could not be controlled.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// The vCPU thread could not be spawned.
    #[error("cannot spawn the thread of vCPU {index}: {source}")]
    Spawn {
        /// vCPU index.
        index: u8,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The kick signal handler could not be installed.
    #[error("cannot install the vCPU kick signal handler: {0}")]
    Signal(#[source] vmm_sys_util::errno::Error),
    /// The vCPU did not answer in time.
    #[error("vCPU {index} did not answer {command:?} within {timeout:?}")]
    Timeout {
        /// vCPU index.
        index: u8,
        /// What was asked.
        command: VcpuCommand,
        /// How long ferry waited.
        timeout: Duration,
    },
    /// The vCPU thread is gone.
    #[error("vCPU {0} has stopped")]
    Gone(u8),
    /// The vCPU's state could not be read.
    #[error(transparent)]
    State(#[from] state::StateError),
    /// Save was asked of a vCPU that is not parked.
    #[error("vCPU {0} is not paused; its state can only be saved while it is")]
    NotPaused(u8),
}

/// What the VMM asks of a vCPU thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuCommand {
    /// Leave `KVM_RUN` and wait.
    Pause,
    /// Continue after a pause.
    Resume,
    /// Read the vCPU's state (while paused) and send it back.
    Save,
    /// End the thread.
    Stop,
}

/// Why a vCPU stopped running the guest on its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuEvent {
    /// The guest asked for a reset (KVM system event).
    Reset,
    /// The guest powered off (KVM system event).
    PowerOff,
    /// The guest cannot go on: triple fault, internal error, unhandled exit.
    Failed(String),
}

/// Exit counts, shared by all vCPUs of a VM, for the metrics endpoint.
#[derive(Default, Debug)]
pub struct VcpuMetrics {
    /// Port reads.
    pub exit_io_in: AtomicU64,
    /// Port writes.
    pub exit_io_out: AtomicU64,
    /// MMIO reads.
    pub exit_mmio_read: AtomicU64,
    /// MMIO writes.
    pub exit_mmio_write: AtomicU64,
    /// Returns from KVM_RUN because ferry kicked the vCPU (pause, stop).
    pub exit_kicked: AtomicU64,
    /// Exits that ended the guest: reset, power-off, triple fault, errors.
    pub exit_final: AtomicU64,
}

impl VcpuMetrics {
    /// The counts as JSON.
    pub fn json(&self) -> serde_json::Value {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        serde_json::json!({
            "exit_io_in": get(&self.exit_io_in),
            "exit_io_out": get(&self.exit_io_out),
            "exit_mmio_read": get(&self.exit_mmio_read),
            "exit_mmio_write": get(&self.exit_mmio_write),
            "exit_kicked": get(&self.exit_kicked),
            "exit_final": get(&self.exit_final),
        })
    }
}

/// How long a vCPU may take to acknowledge a command.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);

/// A command as the vCPU thread receives it: numbered, so that an acknowledgement that
/// arrives late (from a vCPU that was slow to answer an earlier command) is never taken
/// for the answer to a later one.
type Numbered = (u64, VcpuCommand);

/// What a vCPU thread sends back for `Save`, with the command's number: a state that
/// arrives late (after its Save timed out) is never taken for a later Save's.
type Saved = (u64, Result<VcpuState, VcpuError>);

/// Clears this thread's `IMMEDIATE_EXIT` when the vCPU's run loop ends, however it
/// ends (unwinding too): it drops before the `VcpuFd` whose mapping the pointer is in.
struct ImmediateExitGuard;

impl Drop for ImmediateExitGuard {
    fn drop(&mut self) {
        IMMEDIATE_EXIT.with(|p| p.set(std::ptr::null_mut()));
    }
}

fn kick_signal() -> i32 {
    SIGRTMIN()
}

thread_local! {
    /// This thread's `kvm_run.immediate_exit`, for the kick handler.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Setting immediate_exit closes the race where the signal lands just before the
    // thread enters KVM_RUN: the ioctl then returns EINTR at once.
    let ptr = IMMEDIATE_EXIT.with(|p| p.get());
    if !ptr.is_null() {
        // SAFETY: the pointer was set by this thread to its own kvm_run mapping, which
        // lives as long as the thread's VcpuFd; a byte store is async-signal-safe.
        unsafe { ptr.write_volatile(1) };
    }
}

/// Installs the kick handler, once per process.
pub fn register_kick_handler() -> Result<(), VcpuError> {
    register_signal_handler(kick_signal(), handle_kick).map_err(VcpuError::Signal)
}

/// Keeps every vCPU of a VM out of the guest, asked from any thread. A destination
/// whose post-copy failed freezes its guest from the migration thread before it tells
/// the source, which may then run the guest again: the VMM thread may be busy, or
/// blocked on a page that will never come.
///
/// Who writes what, and why no vCPU slips through:
/// - `frozen`: written by `freeze` and `thaw`, read by every vCPU thread before each
///   `KVM_RUN` and while it is parked.
/// - `inside`: each vCPU thread adds one before it reads `frozen` and enters `KVM_RUN`,
///   and takes it off once `KVM_RUN` has returned and its exit is handled (a device
///   access the guest made before the freeze is over when `freeze` returns). All four accesses are sequentially
///   consistent, so either the vCPU sees `frozen` and stays out, or `freeze`, which sets
///   `frozen` before it reads `inside`, sees the vCPU inside and kicks it.
/// - `threads`: the live vCPU threads. A thread adds itself before its first `KVM_RUN`
///   and takes itself off, under the lock, before it ends, so a kick sent under the lock
///   never reaches a thread that is gone. A kick sets the thread's `immediate_exit`, so
///   a vCPU kicked just before it enters `KVM_RUN` leaves at once; one waiting in the
///   kernel on a missing page leaves too (the fault is interruptible).
#[derive(Default)]
pub struct Freeze {
    frozen: AtomicBool,
    inside: AtomicUsize,
    threads: Mutex<Vec<libc::pthread_t>>,
}

/// Takes a vCPU thread off `Freeze::threads` when its run loop ends.
struct Registered<'a>(&'a Freeze);

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        let mut threads = self.0.threads.lock().unwrap_or_else(|e| e.into_inner());
        threads.retain(|t| *t != me);
    }
}

impl Freeze {
    /// Stops every vCPU running the guest: none enters `KVM_RUN` again until `thaw`, and
    /// those inside are kicked out. Waits at most `timeout` for them to leave; returns
    /// how many were still inside if they did not.
    pub fn freeze(&self, timeout: Duration) -> Result<(), usize> {
        self.frozen.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + timeout;
        loop {
            // Kicked again every round: a queued signal can be refused (EAGAIN, the
            // pending-signal limit), and a kick lost that way must not leave a vCPU in.
            self.kick_all();
            let round = Instant::now() + Duration::from_millis(10);
            loop {
                let inside = self.inside.load(Ordering::SeqCst);
                if inside == 0 {
                    return Ok(());
                }
                let now = Instant::now();
                if now >= deadline {
                    return Err(inside);
                }
                if now >= round {
                    break;
                }
                std::thread::sleep(Duration::from_micros(200));
            }
        }
    }

    fn kick_all(&self) {
        let threads = self.threads.lock().unwrap_or_else(|e| e.into_inner());
        for t in threads.iter() {
            // SAFETY: `t` is a live vCPU thread: it leaves the list under this lock
            // before it ends. The kick handler is installed before any vCPU runs.
            let refused = unsafe { libc::pthread_kill(*t, kick_signal()) };
            if refused != 0 {
                tracing::warn!("freeze: a vCPU kick was refused (error {refused}); kicking again");
            }
        }
    }

    /// Lets vCPUs enter the guest again; parked ones go on when they next look (they
    /// also obey pause and resume commands as usual). Only whoever froze the VM, or
    /// knows why, thaws it: `Vmm::resume` refuses a frozen VM.
    pub fn thaw(&self) {
        self.frozen.store(false, Ordering::SeqCst);
    }

    /// Whether `freeze` holds.
    pub fn is_frozen(&self) -> bool {
        self.frozen.load(Ordering::SeqCst)
    }

    fn register(&self) -> Registered<'_> {
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        self.threads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(me);
        Registered(self)
    }

    /// Called before `KVM_RUN`: false when frozen (the vCPU must stay out).
    fn enter(&self) -> bool {
        self.inside.fetch_add(1, Ordering::SeqCst);
        if self.frozen.load(Ordering::SeqCst) {
            self.inside.fetch_sub(1, Ordering::SeqCst);
            return false;
        }
        true
    }

    /// Called when `KVM_RUN` has returned.
    fn leave(&self) {
        self.inside.fetch_sub(1, Ordering::SeqCst);
    }
}

/// What every vCPU of a VM shares.
#[derive(Clone)]
pub struct Shared {
    /// Port I/O.
    pub bus: Arc<PioBus>,
    /// MMIO.
    pub mmio: Arc<MmioBus>,
    /// Exit counts.
    pub metrics: Arc<VcpuMetrics>,
    /// Keeps the vCPUs out of the guest from any thread.
    pub freeze: Arc<Freeze>,
    /// Where a vCPU reports why it stopped on its own.
    pub events: Sender<(u8, VcpuEvent)>,
}

/// A vCPU, ready to run on its own thread.
pub struct Vcpu {
    index: u8,
    fd: VcpuFd,
    bus: Arc<PioBus>,
    mmio: Arc<MmioBus>,
    metrics: Arc<VcpuMetrics>,
    freeze: Arc<Freeze>,
    events: Sender<(u8, VcpuEvent)>,
    event_fd: EventFd,
    stall: Arc<AtomicU64>,
}

enum Flow {
    Continue,
    Exit(VcpuEvent),
}

/// What one exit means, decided while the exit borrows the vCPU's run area.
enum Outcome {
    Continue,
    Stop(VcpuEvent),
    Fail(String),
    InternalError,
}

/// The width of one element of the port access in `run`. kvm-ioctls hands over
/// `size * count` bytes for string I/O (`rep outsb`) without saying which is which.
fn io_access_size(run: *const kvm_run) -> usize {
    // SAFETY: `run` points at this vCPU's kvm_run mapping, alive as long as its VcpuFd;
    // after a KVM_EXIT_IO the kernel has filled the `io` member of the exit union, and
    // only that plain-data field is read.
    let size = unsafe { (*run).__bindgen_anon_1.io.size };
    match size {
        1 | 2 | 4 => usize::from(size),
        _ => 1,
    }
}

fn handle_exit(
    bus: &PioBus,
    mmio: &MmioBus,
    metrics: &VcpuMetrics,
    index: u8,
    exit: VcpuExit,
    run: *const kvm_run,
) -> Outcome {
    match exit {
        VcpuExit::IoOut(port, data) => {
            metrics.exit_io_out.fetch_add(1, Ordering::Relaxed);
            for element in data.chunks(io_access_size(run)) {
                bus.write(port, element);
            }
            Outcome::Continue
        }
        VcpuExit::IoIn(port, data) => {
            metrics.exit_io_in.fetch_add(1, Ordering::Relaxed);
            for element in data.chunks_mut(io_access_size(run)) {
                bus.read(port, element);
            }
            Outcome::Continue
        }
        VcpuExit::MmioRead(addr, data) => {
            metrics.exit_mmio_read.fetch_add(1, Ordering::Relaxed);
            if !mmio.read(addr, data) {
                tracing::debug!(vcpu = index, "read of unclaimed MMIO address {addr:#x}");
            }
            Outcome::Continue
        }
        VcpuExit::MmioWrite(addr, data) => {
            metrics.exit_mmio_write.fetch_add(1, Ordering::Relaxed);
            if !mmio.write(addr, data) {
                tracing::debug!(vcpu = index, "write to unclaimed MMIO address {addr:#x}");
            }
            Outcome::Continue
        }
        VcpuExit::Shutdown => Outcome::Fail("triple fault (KVM_EXIT_SHUTDOWN)".into()),
        VcpuExit::SystemEvent(kind, _) => match kind {
            kvm_bindings::KVM_SYSTEM_EVENT_RESET => Outcome::Stop(VcpuEvent::Reset),
            kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => Outcome::Stop(VcpuEvent::PowerOff),
            other => Outcome::Fail(format!("system event {other} (KVM_EXIT_SYSTEM_EVENT)")),
        },
        VcpuExit::InternalError => Outcome::InternalError,
        VcpuExit::FailEntry(reason, cpu) => Outcome::Fail(format!(
            "KVM_EXIT_FAIL_ENTRY (hardware reason {reason:#x}, host cpu {cpu})"
        )),
        other => Outcome::Fail(format!("unhandled exit {other:?}")),
    }
}

impl Vcpu {
    /// Wraps a configured vCPU. `shared.events` and `event_fd` report why it stopped on
    /// its own.
    pub fn new(index: u8, fd: VcpuFd, shared: Shared, event_fd: EventFd) -> Self {
        Vcpu {
            index,
            fd,
            bus: shared.bus,
            mmio: shared.mmio,
            metrics: shared.metrics,
            freeze: shared.freeze,
            events: shared.events,
            event_fd,
            stall: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Starts the thread. The vCPU runs until told otherwise or until the guest stops;
    /// with `paused`, it waits for `Resume` first (a restored VM starts that way).
    pub fn start(self, paused: bool) -> Result<VcpuHandle, VcpuError> {
        let index = self.index;
        let stall = self.stall.clone();
        let (cmd_tx, cmd_rx) = mpsc::channel();
        let (ack_tx, ack_rx) = mpsc::channel();
        let (state_tx, state_rx) = mpsc::channel();
        let link = Link {
            commands: cmd_rx,
            acks: ack_tx,
            states: state_tx,
        };
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || self.run(link, paused))
            .map_err(|source| VcpuError::Spawn { index, source })?;
        Ok(VcpuHandle {
            index,
            thread: Some(thread),
            commands: cmd_tx,
            acks: ack_rx,
            states: state_rx,
            next: 1,
            stall,
        })
    }

    /// The vCPU's state; the thread must be outside `KVM_RUN` (it calls this itself).
    fn save(&self) -> Result<VcpuState, VcpuError> {
        let host = crate::vm::host().map_err(|e| {
            VcpuError::State(state::StateError::Refused {
                index: self.index,
                field: "msrs".into(),
                reason: e.to_string(),
            })
        })?;
        Ok(VcpuState::save(
            self.index,
            &self.fd,
            state::saved_msrs(host),
        )?)
    }

    /// Handles queued commands after a kick, parked while paused or frozen. Returns
    /// false when the thread must end.
    fn wait_for_commands(&self, link: &Link, mut paused: bool) -> bool {
        loop {
            let (seq, cmd) = if paused {
                match link.commands.recv() {
                    Ok(cmd) => cmd,
                    Err(_) => return false,
                }
            } else if self.freeze.is_frozen() {
                // Nothing tells a parked thread of a thaw: it looks again now and then.
                match link.commands.recv_timeout(Duration::from_millis(10)) {
                    Ok(cmd) => cmd,
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => return false,
                }
            } else {
                match link.commands.try_recv() {
                    Ok(cmd) => cmd,
                    Err(TryRecvError::Empty) => return true,
                    Err(TryRecvError::Disconnected) => return false,
                }
            };
            let ms = self.stall.swap(0, Ordering::AcqRel);
            if ms > 0 {
                // A test stands in for a vCPU held up elsewhere (a device, the kernel).
                std::thread::sleep(Duration::from_millis(ms));
            }
            match cmd {
                VcpuCommand::Pause => {
                    // Tells a kvmclock guest that it was stopped, so that its watchdogs do
                    // not fire on resume; EINVAL for a guest without kvmclock.
                    let _ = self.fd.kvmclock_ctrl();
                    paused = true;
                }
                VcpuCommand::Resume => paused = false,
                VcpuCommand::Save => {
                    let saved = if paused {
                        self.save()
                    } else {
                        Err(VcpuError::NotPaused(self.index))
                    };
                    // Sent before the ack, so that the ack means the state is there.
                    let _ = link.states.send((seq, saved));
                }
                VcpuCommand::Stop => {
                    let _ = link.acks.send(seq);
                    return false;
                }
            }
            // The VMM may have stopped waiting; the command is still carried out.
            let _ = link.acks.send(seq);
        }
    }

    fn run(mut self, link: Link, paused: bool) {
        seccomp::apply(seccomp::Thread::Vcpu);
        let run: *mut kvm_run = self.fd.get_kvm_run();
        // SAFETY: `run` is this vCPU's live kvm_run mapping; only a field address is taken.
        let immediate_exit = unsafe { std::ptr::addr_of_mut!((*run).immediate_exit) };
        IMMEDIATE_EXIT.with(|p| p.set(immediate_exit));
        let _clear = ImmediateExitGuard;
        let freeze = self.freeze.clone();
        let _registered = freeze.register();
        // A command sent before the lines above was kicked with no pointer to set, so
        // that kick is lost: look for commands once before the first KVM_RUN.
        if !self.wait_for_commands(&link, paused) {
            return;
        }
        loop {
            if !freeze.enter() {
                // An exit's port or MMIO access completes only in the next KVM_RUN: one
                // with immediate_exit set completes it and runs no guest instruction, so
                // that a state saved while frozen is whole.
                self.fd.set_kvm_immediate_exit(1);
                let _ = self.fd.run();
                self.fd.set_kvm_immediate_exit(0);
                if !self.wait_for_commands(&link, false) {
                    break;
                }
                continue;
            }
            let result = self.fd.run();
            let flow = match result {
                Ok(exit) => {
                    let outcome =
                        handle_exit(&self.bus, &self.mmio, &self.metrics, self.index, exit, run);
                    // Only now: a device access the guest made before a freeze (a queue
                    // notify does block I/O here) is done when `freeze` returns.
                    freeze.leave();
                    match outcome {
                        Outcome::Continue => Flow::Continue,
                        Outcome::Stop(event) => Flow::Exit(event),
                        Outcome::Fail(what) => Flow::Exit(self.failure(what)),
                        Outcome::InternalError => {
                            let run = self.fd.get_kvm_run();
                            // SAFETY: after KVM_EXIT_INTERNAL_ERROR the kernel fills the
                            // `internal` member of the exit union; the union is plain data.
                            let suberror = unsafe { run.__bindgen_anon_1.internal.suberror };
                            Flow::Exit(
                                self.failure(format!(
                                    "KVM_EXIT_INTERNAL_ERROR (suberror {suberror})"
                                )),
                            )
                        }
                    }
                }
                // A kick; or, while frozen, a fault KVM could not finish because the kick
                // interrupted it (a missing page that will never come).
                Err(e)
                    if e.errno() == libc::EINTR
                        || e.errno() == libc::EAGAIN
                        || (e.errno() == libc::EFAULT && freeze.is_frozen()) =>
                {
                    freeze.leave();
                    self.fd.set_kvm_immediate_exit(0);
                    self.metrics.exit_kicked.fetch_add(1, Ordering::Relaxed);
                    if tracing::enabled!(tracing::Level::DEBUG) {
                        let r = self.fd.get_regs().unwrap_or_default();
                        tracing::debug!(
                            vcpu = self.index,
                            "kicked at RIP {:#x} rcx {:#x} rdi {:#x}",
                            r.rip,
                            r.rcx,
                            r.rdi
                        );
                    }
                    if !self.wait_for_commands(&link, false) {
                        break;
                    }
                    Flow::Continue
                }
                Err(e) => {
                    freeze.leave();
                    Flow::Exit(self.failure(format!("KVM_RUN failed: {e}")))
                }
            };
            if let Flow::Exit(event) = flow {
                self.metrics.exit_final.fetch_add(1, Ordering::Relaxed);
                // A closed channel means the VMM is already stopping.
                let _ = self.events.send((self.index, event));
                let _ = self.event_fd.write(1);
                // Stay reachable so that pause and stop still get answers.
                while let Ok((seq, cmd)) = link.commands.recv() {
                    if cmd == VcpuCommand::Save {
                        let _ = link.states.send((seq, Err(VcpuError::Gone(self.index))));
                    }
                    let _ = link.acks.send(seq);
                    if cmd == VcpuCommand::Stop {
                        break;
                    }
                }
                break;
            }
        }
    }

    fn failure(&self, what: String) -> VcpuEvent {
        let rip = match self.fd.get_regs() {
            Ok(regs) => format!("{:#x}", regs.rip),
            Err(e) => format!("unknown ({e})"),
        };
        VcpuEvent::Failed(format!("vCPU {}: {what} at RIP {rip}", self.index))
    }
}

/// The vCPU thread's end of its channels.
struct Link {
    commands: Receiver<Numbered>,
    acks: Sender<u64>,
    states: Sender<Saved>,
}

/// The VMM's end of a vCPU thread.
pub struct VcpuHandle {
    index: u8,
    thread: Option<JoinHandle<()>>,
    commands: Sender<Numbered>,
    acks: Receiver<u64>,
    states: Receiver<Saved>,
    /// The number the next command gets.
    next: u64,
    stall: Arc<AtomicU64>,
}

impl VcpuHandle {
    /// This vCPU's index.
    pub fn index(&self) -> u8 {
        self.index
    }

    /// Sends a command; kicks the thread out of `KVM_RUN` when it must notice at once.
    /// Returns the command's number, for `wait_ack`.
    pub fn send(&mut self, cmd: VcpuCommand) -> Result<u64, VcpuError> {
        let seq = self.next;
        self.next += 1;
        self.commands
            .send((seq, cmd))
            .map_err(|_| VcpuError::Gone(self.index))?;
        if matches!(cmd, VcpuCommand::Pause | VcpuCommand::Stop) {
            if let Some(thread) = &self.thread {
                // The thread may already have left; then there is nothing to kick.
                let _ = thread.kill(kick_signal());
            }
        }
        Ok(seq)
    }

    /// Waits until the thread has acted on command `seq` (and so on every command
    /// before it), at most until `deadline`.
    pub fn wait_ack(&self, seq: u64, cmd: VcpuCommand, deadline: Instant) -> Result<(), VcpuError> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.acks.recv_timeout(left) {
                Ok(done) if done >= seq => return Ok(()),
                // A late answer to an earlier command.
                Ok(_) => continue,
                Err(RecvTimeoutError::Timeout) => {
                    return Err(VcpuError::Timeout {
                        index: self.index,
                        command: cmd,
                        timeout: COMMAND_TIMEOUT,
                    })
                }
                Err(RecvTimeoutError::Disconnected) => return Err(VcpuError::Gone(self.index)),
            }
        }
    }

    /// Reads the state of this (paused) vCPU on its own thread, waiting at most until
    /// `deadline`.
    pub fn save(&mut self, deadline: Instant) -> Result<VcpuState, VcpuError> {
        // Which MSRs to save is probed once, on a scratch VM: here, never on the vCPU's
        // thread, whose seccomp filter does not let it create one.
        if let Ok(host) = crate::vm::host() {
            state::saved_msrs(host);
        }
        let seq = self.send(VcpuCommand::Save)?;
        self.wait_ack(seq, VcpuCommand::Save, deadline)?;
        // The state is sent before the ack; older ones belong to Saves that timed out.
        loop {
            match self.states.try_recv() {
                Ok((n, saved)) if n == seq => return saved,
                Ok(_) => continue,
                Err(_) => return Err(VcpuError::Gone(self.index)),
            }
        }
    }

    /// Asks the thread to end, without waiting.
    pub fn request_stop(&mut self) -> Option<u64> {
        self.thread.as_ref()?;
        self.send(VcpuCommand::Stop).ok()
    }

    /// Joins the thread if it acknowledged `stop` (a command number from
    /// `request_stop`) by `deadline`. A thread that did not is left behind, never
    /// waited for: a stuck vCPU must not keep ferry from exiting.
    pub fn finish_stop(&mut self, stop: Option<u64>, deadline: Instant) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        let acked = match stop {
            Some(seq) => self.wait_ack(seq, VcpuCommand::Stop, deadline).is_ok(),
            // The channel is closed: the thread has already ended.
            None => true,
        };
        if !acked {
            tracing::error!(
                "vCPU {} did not stop within {COMMAND_TIMEOUT:?}; leaving its thread behind",
                self.index
            );
            return;
        }
        if thread.join().is_err() {
            tracing::error!("vCPU {} thread panicked", self.index);
        }
    }

    /// Stops and joins the thread, waiting at most `COMMAND_TIMEOUT`.
    pub fn stop(&mut self) {
        let seq = self.request_stop();
        self.finish_stop(seq, Instant::now() + COMMAND_TIMEOUT);
    }

    /// For tests: the next command this vCPU takes waits `duration` first, as a vCPU
    /// held up in a device or the kernel would.
    #[doc(hidden)]
    pub fn stall_next_command(&self, duration: Duration) {
        let ms = u64::try_from(duration.as_millis()).unwrap_or(u64::MAX);
        self.stall.store(ms, Ordering::Release);
    }
}

impl Drop for VcpuHandle {
    fn drop(&mut self) {
        self.stop();
    }
}
