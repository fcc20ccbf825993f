//! Live snapshots: the guest pauses only while its state is saved and the pages it
//! wrote since its memory was write-protected (just before the pause) are protected
//! again; its memory goes to the file while it runs on (`memory::live`), and the
//! request is answered when both files are complete.
//!
//! Who touches what: the VMM thread starts the snapshot and reads its status for
//! `GET /snapshot`; the snapshot's thread waits for the memory file, writes the state
//! file, renames both into place, sets the final status and answers the request. The
//! status is one mutex; the page counters are atomics of `memory::live`.

use std::fs::File;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use api::migration::FaultLatency;
use api::models::{SnapshotCreateParams, SnapshotStatus};
use api::{ApiError, VmmData};
use memory::live::{LiveProgress, LiveSave};

use super::{file, io, partial, MachineState, SnapshotError};
use crate::{VmState, Vmm};

/// A live snapshot, running or ended.
pub struct LiveSnapshot {
    status: Mutex<SnapshotStatus>,
    progress: Arc<LiveProgress>,
    started: Instant,
}

impl LiveSnapshot {
    /// Whether it still runs.
    pub fn running(&self) -> bool {
        self.status.lock().expect("poisoned").state == "active"
    }

    /// Waits until it has ended, at most `timeout`; whether it has.
    pub fn wait(&self, timeout: std::time::Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.running() {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        true
    }

    /// Its status, with the page counts as they are now.
    pub fn status(&self) -> SnapshotStatus {
        let mut s = self.status.lock().expect("poisoned").clone();
        let p = &self.progress;
        let saved = p.saved.load(std::sync::atomic::Ordering::Acquire);
        s.pages_saved = saved;
        s.pages_left = p
            .total
            .load(std::sync::atomic::Ordering::Acquire)
            .saturating_sub(saved);
        s.copy_before_write_faults = p.faults.load(std::sync::atomic::Ordering::Acquire);
        s.fault_latency_us = p.fault_latency_us().map(|(p50, p99, max)| FaultLatency {
            p50: f64::from(p50),
            p99: f64::from(p99),
            max: f64::from(max),
        });
        s
    }

    fn end(&self, result: &Result<(), SnapshotError>) {
        let mut s = self.status.lock().expect("poisoned");
        s.total_ms = Some(self.started.elapsed().as_secs_f64() * 1e3);
        match result {
            Ok(()) => s.state = "completed".into(),
            Err(e) => {
                s.state = "failed".into();
                s.error = Some(e.to_string());
            }
        }
    }
}

impl Vmm {
    /// Starts a live snapshot: write-protects its memory, pauses the VM (if it runs)
    /// for its state and the pages written meanwhile, resumes it, and saves memory on
    /// a thread of its own, which answers `reply` once both files are complete. A
    /// snapshot that fails to start leaves the VM as it was and no file behind.
    pub fn start_live_snapshot(
        &mut self,
        config: &api::VmConfig,
        params: &SnapshotCreateParams,
        reply: api::Reply,
    ) -> Result<Arc<LiveSnapshot>, SnapshotError> {
        let started = Instant::now();
        // Memory is saved as at the pause, a drive's file as it is whenever it is read:
        // a drive the guest writes meanwhile would not match the memory (its page cache,
        // its filesystem's journal), and nothing would say so.
        if let Some(d) = config
            .drives
            .iter()
            .find(|d| !d.is_read_only.unwrap_or(false))
        {
            return Err(SnapshotError::Live(format!(
                "drive \"{}\" is writable: the guest would go on writing it while memory is saved as it was at the pause, and the two would not match; a Live snapshot takes read-only drives only (pause and take a Full snapshot, copying the drive, for writable ones)",
                d.drive_id
            )));
        }
        self.memory_settled()?;
        if self.memory_from_handler() {
            return Err(SnapshotError::Live(
                "guest RAM is served by an external page-fault handler, so it cannot be write-protected: take a Full snapshot".into(),
            ));
        }
        let (mem_path, state_path) = (params.mem_file_path.clone(), params.snapshot_path.clone());
        let mem_tmp = partial(&mem_path);
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&mem_tmp)
            .map_err(io(&mem_tmp))?;
        let sized = file.set_len(self.vm.ram().size()).map_err(io(&mem_tmp));
        let tracking = self.dirty.as_ref().map(|t| t.mode());
        let live_err = |e: memory::live::LiveError| {
            let hint = match tracking {
                Some(m) if m != memory::dirty::TrackingMode::KvmDirtyLog => format!(
                    " (track_dirty_pages uses {} here, which takes guest RAM's userfaultfd: set \"dirty_tracking\": \"kvm-dirty-log\" in machine-config)",
                    m.name()
                ),
                _ => String::new(),
            };
            SnapshotError::Live(format!("{e}{hint}"))
        };
        // What can happen while the guest runs happens before the pause.
        let prepared =
            sized.and_then(|()| LiveSave::prepare(self.vm.ram(), file).map_err(live_err));
        let was_running = self.state == VmState::Running;
        let begun = prepared.and_then(|mut save| {
            let paused = Instant::now();
            if was_running {
                self.pause()?;
            }
            // A save that failed is dropped here, before the resume: dropping it
            // removes every protection, so the guest never waits on it.
            let begun = self
                .machine_state(config)
                .and_then(|state| save.protect().map(|()| state).map_err(live_err))
                .map(|state| (state, save));
            if was_running {
                if let Err(e) = self.resume() {
                    tracing::error!("live snapshot: cannot resume the guest: {e}");
                }
            }
            begun.map(|(state, save)| (state, save, paused.elapsed()))
        });
        let (state, save, pause) = match begun {
            Ok(b) => b,
            Err(e) => {
                let _ = std::fs::remove_file(&mem_tmp);
                return Err(e);
            }
        };
        let live = Arc::new(LiveSnapshot {
            status: Mutex::new(SnapshotStatus {
                state: "active".into(),
                mem_file_path: Some(mem_path.display().to_string()),
                pause_ms: pause.as_secs_f64() * 1e3,
                ..Default::default()
            }),
            progress: save.progress(),
            started,
        });
        let job = Job {
            save,
            state,
            mem_path,
            state_path,
        };
        let thread_live = live.clone();
        std::thread::Builder::new()
            .name("snapshot-live".into())
            .spawn(move || {
                // Started by the confined VMM thread: its filter is this thread's.
                seccomp::inherit();
                let (result, save) = job.run();
                thread_live.end(&result);
                let _ = reply.send(result.map(|()| VmmData::Empty).map_err(|e| {
                    ApiError::bad_request(format!("cannot create the snapshot: {e}"))
                }));
                // The thread that answers the request needs a CPU now, and unregistering
                // would hold this one for 4-10 ms while a running guest holds the other: an
                // answer then waited 0.7-4 ms in a third of the runs here, and none
                // did after a sleep this long (README, live snapshots).
                std::thread::sleep(ANSWER_FIRST);
                // Unregisters guest RAM, after the answer (`LiveSave::complete`).
                drop(save);
            })
            .map_err(|e| {
                // The job went with the closure: its save is dropped, which lifts every
                // protection.
                let _ = std::fs::remove_file(partial(&params.mem_file_path));
                SnapshotError::Live(format!("cannot start its thread: {e}"))
            })?;
        Ok(live)
    }
}

/// How long a live snapshot's thread leaves its CPU to the answer it sent before it
/// unregisters guest RAM.
const ANSWER_FIRST: Duration = Duration::from_micros(200);

/// What the snapshot's thread finishes.
struct Job {
    save: LiveSave,
    state: MachineState,
    mem_path: PathBuf,
    state_path: PathBuf,
}

impl Job {
    /// Waits for the memory file, then writes the state file and renames both into
    /// place; on failure removes both partial files. Returns the save, for its caller
    /// to drop once it has answered.
    fn run(mut self) -> (Result<(), SnapshotError>, LiveSave) {
        let mem_tmp = partial(&self.mem_path);
        let state_tmp = partial(&self.state_path);
        let result = (|| {
            // Starts the writer (the guest runs again by now), then waits for it.
            self.save.complete().map_err(|e| SnapshotError::Io {
                path: mem_tmp.clone(),
                source: std::io::Error::other(e.to_string()),
            })?;
            file::write(&state_tmp, &self.state)?;
            std::fs::rename(&mem_tmp, &self.mem_path).map_err(io(&self.mem_path))?;
            std::fs::rename(&state_tmp, &self.state_path).map_err(io(&self.state_path))
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&mem_tmp);
            let _ = std::fs::remove_file(&state_tmp);
        }
        (result, self.save)
    }
}
