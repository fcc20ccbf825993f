//! The destination: takes one incoming migration on a thread of its own.
//!
//! 1. `Hello`: the source's configuration with this side's overrides must be one this
//!    host can run (files, taps, vCPUs, memory), before any memory moves.
//! 2. Pages (or, locally, the source's memfd): every range is checked against this
//!    side's memory map, and every batch against its checksum, before a byte of guest
//!    RAM is written.
//! 3. `State`: the VM is built from it in one step, paused (`builder::restore`), and
//!    handed to the VMM thread. `Ready` tells the source.
//! 4. `Go`: the VMM thread runs the guest; `Done` tells the source.
//!
//! A failure before the VM is handed over leaves nothing behind: this ferry can receive
//! again. After that, the VM stays here complete and paused, and is run only on `Go`.

use api::migration::MigrationReceiveParams;
use api::VmConfig;
use memory::{GuestRam, PAGE_SIZE};
use vm_memory::GuestAddress;

use super::protocol::{self, Done, Hello, HelloAck, Kind, Region, Switch};
use super::transport::{Conn, Listener};
use super::{verify, Control, ControlLink, MigrationError, Progress};

/// What the destination's thread needs.
pub struct ReceiveJob {
    /// The request, with its overrides.
    pub params: MigrationReceiveParams,
    /// Bound already, so that the request answers once this side listens.
    pub listener: Listener,
}

/// Starts the destination's thread.
pub fn spawn(
    job: ReceiveJob,
    link: ControlLink,
    progress: std::sync::Arc<Progress>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("migration-recv".into())
        .spawn(move || {
            let result = run(job, &link, &progress);
            if let Err(e) = &result {
                tracing::warn!("incoming migration failed: {e}");
            }
            progress.end(&result);
        })
}

fn refused(msg: impl Into<String>) -> MigrationError {
    MigrationError::Refused(msg.into())
}

fn run(job: ReceiveJob, link: &ControlLink, progress: &Progress) -> Result<(), MigrationError> {
    let stream = job.listener.accept(&progress.cancel)?;
    // One migration per request: nobody else may connect.
    drop(job.listener);
    let mut conn = Conn::new(stream, progress.cancel.clone())?;
    let mut installed = false;
    let result = receive(&mut conn, &job.params, link, progress, &mut installed);
    let result = result.map_err(|e| {
        if e.worth_telling() {
            conn.send_failure(&e.to_string());
        }
        match (&e, installed) {
            (_, false) => e,
            // The source said it gave up, so it did not commit: it runs the guest.
            (MigrationError::Peer(_), true) => {
                let _ = link.send(Control::Discard);
                e
            }
            // Nobody can tell here whether the source committed.
            (_, true) => MigrationError::Vm(format!(
                "{e}; the VM is complete here and stays paused: resume it (PATCH /vm) only if the source does not run it"
            )),
        }
    });
    conn.shutdown();
    result
}

/// The source's configuration with this side's drive files and taps.
fn with_overrides(
    mut config: VmConfig,
    params: &MigrationReceiveParams,
) -> Result<VmConfig, MigrationError> {
    for o in params.drive_overrides.iter().flatten() {
        let drive = config
            .drives
            .iter_mut()
            .find(|d| d.drive_id == o.drive_id)
            .ok_or_else(|| {
                refused(format!(
                    "drive_overrides: the source has no drive \"{}\"",
                    o.drive_id
                ))
            })?;
        drive.path_on_host = Some(o.path_on_host.clone());
    }
    config
        .override_taps(params.network_overrides.as_deref().unwrap_or_default())
        .map_err(|id| {
            refused(format!(
                "network_overrides: the source has no network interface \"{id}\""
            ))
        })?;
    config
        .validate()
        .map_err(|e| refused(format!("this host cannot run the source's VM: {e}")))?;
    Ok(config)
}

/// Checks that `ram` is laid out as the source's.
fn check_map(ram: &GuestRam, source: &[Region]) -> Result<(), MigrationError> {
    let here = protocol::regions_of(ram);
    if here != source {
        return Err(refused(format!(
            "the source's memory map {source:?} differs from this side's {here:?}"
        )));
    }
    Ok(())
}

fn receive(
    conn: &mut Conn,
    params: &MigrationReceiveParams,
    link: &ControlLink,
    progress: &Progress,
    installed: &mut bool,
) -> Result<(), MigrationError> {
    let hello: Hello = conn.recv_json(Kind::Hello)?;
    if hello.version != protocol::VERSION {
        return Err(refused(format!(
            "the source speaks migration protocol version {}, this ferry {}",
            hello.version,
            protocol::VERSION
        )));
    }
    let config = with_overrides(hello.config, params)?;
    let host = crate::vm::host().map_err(|e| refused(e.to_string()))?;
    let machine = &config.machine_config;
    host.check_vcpus(u8::try_from(machine.vcpu_count).unwrap_or(u8::MAX))
        .and_then(|()| host.check_memory(machine.mem_size_mib))
        .map_err(|e| refused(format!("this host cannot run the source's VM: {e}")))?;
    // Guest RAM (the source's memfd when local), and the VM created on it: both take
    // time that the switch-over need not wait for.
    let ram = if hello.local {
        conn.recv_empty(Kind::Memfd)?;
        let file = conn.recv_fd()?;
        GuestRam::from_memfd(file, machine.mem_size_mib, host.phys_bits)
            .map_err(|e| refused(format!("the memfd handed over: {e}")))?
    } else {
        GuestRam::new(machine.mem_size_mib, host.phys_bits).map_err(|e| refused(e.to_string()))?
    };
    check_map(&ram, &hello.memory)?;
    // Registering guest RAM with KVM takes milliseconds: on a thread of its own, while
    // the pages arrive.
    let vm_ram = ram.clone();
    let creating = std::thread::Builder::new()
        .name("migration-vm".into())
        .spawn(move || crate::vm::Vm::new(host, vm_ram))
        .map_err(|e| refused(format!("cannot create the VM: {e}")))?;
    progress.update(|s| s.local = hello.local);
    conn.send_json(
        Kind::HelloAck,
        &HelloAck {
            version: protocol::VERSION,
        },
    )?;

    let total_pages = ram.size() / PAGE_SIZE;
    let mut data = Vec::with_capacity(protocol::BATCH_BYTES);
    let mut received = 0u64;
    let mut hashes = None;
    let switch: Switch = loop {
        let header = conn.recv_header()?;
        match header.kind {
            Kind::Pages if !hello.local => {
                let ranges = protocol::read_batch(conn, &header, &mut data)?;
                // Every range is checked before any is written.
                for &(addr, len) in &ranges {
                    ram.pages_of(GuestAddress(addr), len).map_err(|_| {
                        MigrationError::Protocol(format!(
                            "a page batch names {len:#x} bytes at guest address {addr:#x}, which is not all guest RAM here"
                        ))
                    })?;
                }
                let mut at = 0usize;
                for &(addr, len) in &ranges {
                    // Bounded by the batch, which `read_batch` checked against its size.
                    let len = usize::try_from(len)
                        .map_err(|_| MigrationError::Protocol("a page range is too long".into()))?;
                    ram.fill(&data[at..at + len], GuestAddress(addr))
                        .map_err(|e| MigrationError::Vm(e.to_string()))?;
                    at += len;
                }
                received += at as u64;
                progress.update(|s| s.transferred_bytes = received);
            }
            Kind::Hashes if hello.verify && hashes.is_none() => {
                if header.len > total_pages * 16 {
                    return Err(MigrationError::Protocol(format!(
                        "{} bytes of hashes for {total_pages} pages",
                        header.len
                    )));
                }
                let body = conn.read_payload(&header)?;
                hashes =
                    Some(verify::decode(&body, total_pages).map_err(MigrationError::Protocol)?);
            }
            Kind::State => {
                let body = conn.read_payload(&header)?;
                break serde_json::from_slice(&body).map_err(|e| {
                    MigrationError::Protocol(format!("the machine state does not parse: {e}"))
                })?;
            }
            other => {
                return Err(MigrationError::Protocol(format!(
                    "unexpected {other:?} message{}",
                    if hello.local {
                        " in a local migration"
                    } else {
                        ""
                    }
                )))
            }
        }
    };
    let t = std::time::Instant::now();
    progress.update(|s| s.round = switch.rounds);
    if hello.verify {
        let source = hashes.ok_or_else(|| {
            MigrationError::Protocol("the state came before the page hashes".into())
        })?;
        verify::compare(&ram, &source).map_err(MigrationError::Verify)?;
    }
    tracing::debug!("switch-over: state in, verified after {:?}", t.elapsed());
    crate::snapshot::check_memory(&switch.state, &ram).map_err(|e| refused(e.to_string()))?;
    drop(ram);
    let vm = creating
        .join()
        .map_err(|_| refused("creating the VM panicked"))?
        .map_err(|e| refused(format!("cannot create the VM: {e}")))?;
    let mut vmm = crate::builder::restore_on(vm, &config, &switch.state, None)
        .map_err(|e| refused(format!("cannot build the VM from the source's state: {e}")))?;
    if config.machine_config.track_dirty_pages {
        vmm.track_for_snapshots(config.machine_config.dirty_tracking.as_deref())
            .map_err(|e| refused(e.to_string()))?;
    }
    tracing::debug!("switch-over: VM built after {:?}", t.elapsed());
    // From here a cancel here is refused: the VM is ready to run on the source's Go.
    if !progress.commit() {
        return Err(MigrationError::Cancelled);
    }
    link.ask(|tx| Control::Install(Box::new(vmm), Box::new(config), tx))?;
    *installed = true;
    conn.send(Kind::Ready, &[])?;
    conn.recv_empty(Kind::Go)?;
    tracing::debug!("switch-over: installed, Go after {:?}", t.elapsed());
    let resumed_at = link.ask(Control::Resume)?;
    let downtime_ms = resumed_at.saturating_sub(switch.paused_at_ns) as f64 / 1e6;
    progress.update(|s| s.downtime_ms = Some(downtime_ms));
    // The guest runs here now, whatever becomes of this message.
    let _ = conn.send_json(Kind::Done, &Done { downtime_ms });
    Ok(())
}
