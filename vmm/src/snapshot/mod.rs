//! Snapshots: the whole machine saved to two files, and loaded back into a fresh ferry.
//!
//! - The state file (`file`) holds one `MachineState`: every component's typed state,
//!   the configuration the VM came from, and the memory map.
//! - The memory file holds guest RAM, one region after the other (the memfd's layout,
//!   and Firecracker's), with holes where guest RAM holds nothing. A Diff memory file
//!   holds only the pages written since the previous snapshot, at the same offsets.
//!
//! A load builds a new `Vmm` from the state in one step (`builder::restore`): it either
//! comes back whole and paused, or not at all, and the process can load again.

mod file;
mod live;
mod uffd;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Instant;

use api::models::{MemBackendType, SnapshotCreateParams, SnapshotLoadParams, SnapshotType};
use api::VmConfig;
use devices::legacy::{I8042State, SerialSnapshot};
use memory::dirty::{DirtyBitmap, DirtyError, TrackingMode};
use memory::{GuestRam, RamError};
use serde::{Deserialize, Serialize};

pub use file::{FORMAT_VERSION, HEADER_LEN, MAGIC};
pub use live::LiveSnapshot;
pub use uffd::UffdBackend;

use memory::fault::{FileSource, LazyLoad};

/// Where a loaded VM's memory comes from, for as long as the VM lives.
pub enum MemoryBackend {
    /// The memory file, page by page on first touch and in the background.
    File(LazyLoad),
    /// An external page-fault handler (Firecracker's Uffd backend).
    Uffd(UffdBackend),
}

use crate::builder::BuildError;
use crate::vcpu::state::VcpuState;
use crate::vcpu::VcpuError;
use crate::virtio::DeviceSnapshot;
use crate::vm::{KvmVmState, VmError};
use crate::{LifecycleError, VmState, Vmm};

/// Why a snapshot could not be created or loaded.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The file does not start with ferry's magic.
    #[error("{} is not a ferry snapshot state file (no FERRYSNP header)", .0.display())]
    NotASnapshot(PathBuf),
    /// A format version this ferry does not read.
    #[error("{}: snapshot format version {found} is not supported; this ferry reads version {supported}", path.display())]
    Version {
        /// The file.
        path: PathBuf,
        /// The version in the file.
        found: u32,
        /// The version this ferry reads.
        supported: u32,
    },
    /// The file is shorter than its header says.
    #[error("{}: the state file is truncated: {got} bytes, the header needs {expected}", path.display())]
    Truncated {
        /// The file.
        path: PathBuf,
        /// Bytes the header promises.
        expected: u64,
        /// Bytes there are.
        got: u64,
    },
    /// The body does not match its checksum.
    #[error("{}: the state's checksum does not match (header {expected:#010x}, body {got:#010x}): the file is corrupt", path.display())]
    Checksum {
        /// The file.
        path: PathBuf,
        /// The CRC-32 in the header.
        expected: u32,
        /// The CRC-32 of the body.
        got: u32,
    },
    /// The state is malformed.
    #[error("{}: {reason}", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The state could not be encoded.
    #[error("cannot encode the machine state: {0}")]
    Encode(String),
    /// The memory file's size does not match the saved memory map.
    #[error("{}: the memory file is {got} bytes, the snapshot's memory map needs {expected}", path.display())]
    MemorySize {
        /// The memory file.
        path: PathBuf,
        /// Bytes the map needs.
        expected: u64,
        /// Bytes the file has.
        got: u64,
    },
    /// The saved memory map is not one this ferry lays out.
    #[error("the snapshot's memory map does not fit: {0}")]
    MemoryMap(String),
    /// The VM is not paused.
    #[error("the microVM must be paused to create a snapshot (it is {0:?}): PATCH /vm {{\"state\": \"Paused\"}} first")]
    NotPaused(VmState),
    /// A Diff was asked of a VM that does not track dirty pages.
    #[error("a Diff snapshot needs dirty page tracking: set \"track_dirty_pages\": true in machine-config (or in /snapshot/load)")]
    NoTracking,
    /// The requested dirty tracking cannot serve snapshots here.
    #[error("machine-config: {0}")]
    Tracking(String),
    /// Dirty tracking lost track of some pages: only a Full snapshot is right now.
    #[error("dirty page tracking failed earlier, so a Diff could miss pages: take a Full snapshot first")]
    NeedsFull,
    /// A `network_overrides` entry names no interface of the snapshot.
    #[error("network_overrides: the snapshot has no network interface \"{0}\"")]
    Override(String),
    /// The Uffd page-fault handler could not be reached or did not take guest memory.
    #[error("mem_backend {}: {reason}", path.display())]
    Handler {
        /// Its socket.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// Building the VM from the state failed.
    #[error(transparent)]
    Build(#[from] BuildError),
    /// A vCPU could not be saved.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// VM-wide state could not be saved.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// The VM is not in a state that allows this.
    #[error(transparent)]
    Lifecycle(#[from] LifecycleError),
    /// Guest RAM could not be read or filled.
    #[error(transparent)]
    Ram(#[from] RamError),
    /// Dirty tracking failed.
    #[error(transparent)]
    Dirty(#[from] DirtyError),
    /// A live snapshot cannot be taken, or its thread failed to start.
    #[error("live snapshot: {0}")]
    Live(String),
    /// The snapshot this VM was loaded from could not be loaded whole.
    #[error("guest memory: {0}")]
    Loading(String),
}

/// One region of guest RAM: where the guest sees it, and where it sits in the memory
/// file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedRegion {
    /// Guest-physical start.
    pub guest_addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// Offset in the memory file.
    pub file_offset: u64,
}

/// Everything a snapshot or a migration carries besides guest memory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineState {
    /// The ferry that wrote it.
    pub ferry_version: String,
    /// The configuration the VM was built from. Its host backends (drive paths, taps)
    /// are defaults that the loading side may override.
    pub config: VmConfig,
    /// Guest RAM's regions.
    pub memory: Vec<SavedRegion>,
    /// Interrupt controllers, PIT, clock.
    pub vm: KvmVmState,
    /// Every vCPU, by index.
    pub vcpus: Vec<VcpuState>,
    /// COM1.
    pub serial: SerialSnapshot,
    /// The keyboard controller.
    pub i8042: I8042State,
    /// Every virtio device's guest-visible state, in placement order.
    pub virtio: Vec<DeviceSnapshot>,
}

/// What a created snapshot cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct CreateStats {
    /// Bytes of guest memory written to the memory file.
    pub memory_bytes: u64,
    /// Time from the request to both files complete, in µs.
    pub total_us: u64,
}

/// `path` with `.partial` appended: where a file is written before it is renamed into
/// place, so that a failed write never replaces a good file with half of one.
fn partial(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".partial");
    PathBuf::from(name)
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn regions(ram: &GuestRam) -> Vec<SavedRegion> {
    ram.regions()
        .iter()
        .map(|r| SavedRegion {
            guest_addr: r.guest_addr.0,
            size: r.size,
            file_offset: r.file_offset,
        })
        .collect()
}

/// The tracking mechanism for Diff snapshots: userfaultfd write-protect unless guest
/// RAM is already registered with another userfaultfd (a loaded snapshot's backend),
/// where KVM's dirty log is used. `requested` is machine-config's `dirty_tracking`.
fn diff_tracking(requested: Option<&str>, uffd_backend: bool) -> Result<TrackingMode, String> {
    match requested {
        Some(name) => {
            let mode: TrackingMode = name.parse()?;
            if uffd_backend && mode != TrackingMode::KvmDirtyLog {
                return Err(format!(
                    "dirty_tracking {name} cannot be used on a VM loaded from a snapshot: guest RAM's userfaultfd serves the memory backend; use kvm-dirty-log"
                ));
            }
            Ok(mode)
        }
        None if uffd_backend => Ok(TrackingMode::KvmDirtyLog),
        None => Ok(TrackingMode::UffdAsync),
    }
}

impl Vmm {
    /// Starts tracking pages for Diff snapshots (`track_dirty_pages`).
    pub fn track_for_snapshots(&mut self, requested: Option<&str>) -> Result<(), SnapshotError> {
        let mode =
            diff_tracking(requested, self.backend.is_some()).map_err(SnapshotError::Tracking)?;
        let mut tracker = self.vm.dirty_tracker(mode)?;
        tracker.start()?;
        self.dirty = Some(tracker);
        Ok(())
    }

    /// Waits (at most a minute) until a snapshot's memory being loaded on first touch
    /// is all in guest RAM: until then the memfd's holes are not all zero pages.
    pub fn memory_settled(&self) -> Result<(), SnapshotError> {
        if let Some(MemoryBackend::File(load)) = &self.backend {
            if !load.wait(std::time::Duration::from_secs(60)) {
                return Err(SnapshotError::Loading(
                    "the snapshot's memory is still loading after a minute".into(),
                ));
            }
            if let Some(e) = load.stats().error {
                return Err(SnapshotError::Loading(e));
            }
        }
        Ok(())
    }

    /// Whether guest RAM is served by an external page-fault handler (the Uffd
    /// backend): its holes are pages not served yet, not zero pages.
    pub fn memory_from_handler(&self) -> bool {
        matches!(self.backend, Some(MemoryBackend::Uffd(_)))
    }

    /// The state of every component. The VM must be paused, so that the state is final.
    pub fn machine_state(&mut self, config: &VmConfig) -> Result<MachineState, SnapshotError> {
        if self.state != VmState::Paused {
            return Err(SnapshotError::NotPaused(self.state));
        }
        let deadline = Instant::now() + crate::vcpu::COMMAND_TIMEOUT;
        let vcpus = self
            .vcpus
            .iter_mut()
            .map(|v| v.save(deadline))
            .collect::<Result<Vec<_>, _>>()?;
        let vm = self.vm.save_state()?;
        let serial = self.devices.serial.lock().expect("poisoned").state();
        let i8042 = self.devices.i8042.lock().expect("poisoned").state();
        Ok(MachineState {
            ferry_version: env!("CARGO_PKG_VERSION").into(),
            config: config.clone(),
            memory: regions(self.vm.ram()),
            vm,
            vcpus,
            serial,
            i8042,
            virtio: self.devices.virtio.snapshot(),
        })
    }

    /// The pages written since the previous snapshot (with those a failed snapshot
    /// could not save), and re-arms tracking. `None` without tracking.
    fn dirty_since_snapshot(&mut self) -> Result<Option<DirtyBitmap>, SnapshotError> {
        let Some(tracker) = self.dirty.as_mut() else {
            return Ok(None);
        };
        // A collect that fails may have re-armed part of RAM already: those writes are
        // gone from tracking, so no Diff is right until a Full is taken.
        let mut pages = tracker.collect().inspect_err(|_| self.needs_full = true)?;
        if let Some(unsaved) = self.unsaved.take() {
            for page in unsaved.pages() {
                pages.set(page);
            }
        }
        Ok(Some(pages))
    }

    /// Writes a snapshot of this (paused) VM: the memory file, then the state file.
    /// `config` is what the VM was built from. On failure neither file is left half
    /// written, the VM stays paused and intact, and the pages a Diff would have saved
    /// are kept for the next one.
    pub fn create_snapshot(
        &mut self,
        config: &VmConfig,
        params: &SnapshotCreateParams,
    ) -> Result<CreateStats, SnapshotError> {
        let started = Instant::now();
        self.memory_settled()?;
        let state = self.machine_state(config)?;
        let pages = self.dirty_since_snapshot()?;
        let kind = params.snapshot_type.unwrap_or(SnapshotType::Full);
        if kind == SnapshotType::Live {
            return Err(SnapshotError::Live(
                "taken with start_live_snapshot, not here".into(),
            ));
        }
        if kind == SnapshotType::Diff && pages.is_none() {
            return Err(SnapshotError::NoTracking);
        }
        if kind == SnapshotType::Diff && self.needs_full {
            self.unsaved = pages;
            return Err(SnapshotError::NeedsFull);
        }
        let result = self.write_files(&state, params, kind, pages.as_ref());
        if result.is_err() {
            // What this snapshot did not save must reach the next Diff.
            self.unsaved = pages;
        } else if kind == SnapshotType::Full {
            self.needs_full = false;
        }
        let memory_bytes = result?;
        Ok(CreateStats {
            memory_bytes,
            total_us: u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
        })
    }

    fn write_files(
        &self,
        state: &MachineState,
        params: &SnapshotCreateParams,
        kind: SnapshotType,
        pages: Option<&DirtyBitmap>,
    ) -> Result<u64, SnapshotError> {
        let ram = self.vm.ram();
        let (mem_path, state_path) = (&params.mem_file_path, &params.snapshot_path);
        let (mem_tmp, state_tmp) = (partial(mem_path), partial(state_path));
        // Both files are complete before either replaces what was there.
        let written = (|| -> Result<u64, SnapshotError> {
            let mut file = File::create(&mem_tmp).map_err(io(&mem_tmp))?;
            file.set_len(ram.size()).map_err(io(&mem_tmp))?;
            let written = match (kind, pages) {
                (SnapshotType::Diff, Some(pages)) => ram.save_pages(&mut file, pages)?,
                // Pages an external handler has not served yet are holes in the memfd
                // but not zero: read all of guest RAM through the mapping, which
                // faults each in from the handler (as Firecracker does).
                _ if self.memory_from_handler() => ram.save_all(&mut file)?,
                _ => ram.save_full(&mut file)?,
            };
            file::write(&state_tmp, state)?;
            std::fs::rename(&mem_tmp, mem_path).map_err(io(mem_path))?;
            std::fs::rename(&state_tmp, state_path).map_err(io(state_path))?;
            Ok(written)
        })();
        if written.is_err() {
            let _ = std::fs::remove_file(&mem_tmp);
            let _ = std::fs::remove_file(&state_tmp);
        }
        written
    }
}

/// Checks that the saved memory map is the one this ferry lays out for the saved size,
/// and that the memory file (when there is one) holds exactly that much.
pub(crate) fn check_memory(state: &MachineState, ram: &GuestRam) -> Result<(), SnapshotError> {
    let here = regions(ram);
    if here != state.memory {
        return Err(SnapshotError::MemoryMap(format!(
            "the state has regions {:?}, {} MiB of guest RAM is laid out as {:?}",
            state.memory, state.config.machine_config.mem_size_mib, here
        )));
    }
    Ok(())
}

/// Loads a snapshot into a new, paused `Vmm`, and returns it with the configuration it
/// runs (the saved one, with the request's overrides).
pub fn load(params: &SnapshotLoadParams) -> Result<(Vmm, VmConfig), SnapshotError> {
    let state = file::read(&params.snapshot_path)?;
    let mut config = state.config.clone();
    config
        .override_taps(params.network_overrides.as_deref().unwrap_or_default())
        .map_err(SnapshotError::Override)?;
    config.machine_config.track_dirty_pages = params.dirty_tracking_wanted();
    config.validate().map_err(|e| SnapshotError::Corrupt {
        path: params.snapshot_path.clone(),
        reason: format!("the saved configuration is not valid: {e}"),
    })?;
    if state.vcpus.len() as u64 != config.machine_config.vcpu_count {
        return Err(SnapshotError::Corrupt {
            path: params.snapshot_path.clone(),
            reason: format!(
                "{} vCPU states for a machine of {} vCPUs",
                state.vcpus.len(),
                config.machine_config.vcpu_count
            ),
        });
    }
    let host = crate::vm::host()?;
    let mem_mib = config.machine_config.mem_size_mib;
    host.check_memory(mem_mib)?;
    let ram = GuestRam::new(mem_mib, host.phys_bits)?;
    check_memory(&state, &ram)?;
    let (backend_type, backend_path) = params.backend();
    let backend = match backend_type {
        MemBackendType::File => {
            let file = File::open(backend_path).map_err(io(backend_path))?;
            let len = file.metadata().map_err(io(backend_path))?.len();
            if len != ram.size() {
                return Err(SnapshotError::MemorySize {
                    path: backend_path.to_path_buf(),
                    expected: ram.size(),
                    got: len,
                });
            }
            // Pages arrive on first touch and in the background: the load does not
            // wait for the file (see "Snapshots" in the README for both measured).
            let source = Box::new(FileSource::new(file, len));
            MemoryBackend::File(LazyLoad::start(&ram, source).map_err(|e| {
                SnapshotError::Handler {
                    path: backend_path.to_path_buf(),
                    reason: e.to_string(),
                }
            })?)
        }
        MemBackendType::Uffd => MemoryBackend::Uffd(uffd::connect(&ram, backend_path)?),
    };
    let mut vmm = crate::builder::restore(&config, &state, ram, Some(backend))?;
    if config.machine_config.track_dirty_pages {
        vmm.track_for_snapshots(config.machine_config.dirty_tracking.as_deref())?;
    }
    Ok((vmm, config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_partial_appends() {
        assert_eq!(
            partial(Path::new("/a/b.mem")),
            PathBuf::from("/a/b.mem.partial")
        );
    }

    #[test]
    fn test_diff_tracking_follows_the_backend() {
        assert_eq!(diff_tracking(None, false), Ok(TrackingMode::UffdAsync));
        assert_eq!(diff_tracking(None, true), Ok(TrackingMode::KvmDirtyLog));
        assert_eq!(
            diff_tracking(Some("kvm-dirty-log"), false),
            Ok(TrackingMode::KvmDirtyLog)
        );
        assert!(diff_tracking(Some("uffd-async"), true).is_err());
        assert!(diff_tracking(Some("bogus"), false).is_err());
    }
}
