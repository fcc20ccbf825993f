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
//! A post-copy that fails after `Go` freezes the vCPUs from this thread (the VMM
//! thread may be blocked on a missing page) before the source hears of it.

use api::migration::MigrationReceiveParams;
use api::VmConfig;
use memory::{GuestRam, PAGE_BYTES, PAGE_SIZE};
use vm_memory::GuestAddress;

use std::sync::Arc;

use super::postcopy::{self, Incoming};
use super::protocol::{self, Channel, Done, Hello, HelloAck, Kind, Region, Switch};
use super::transport::{Conn, Listener, DESTINATION_STALL_TIMEOUT, STALL_TIMEOUT};
use super::{verify, Control, ControlLink, MigrationError, Progress};
use crate::vcpu::Freeze;

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
            // It builds the VM, whose vCPU and console threads start under this filter.
            seccomp::apply(seccomp::Thread::Vmm);
            let result = run(job, &link, &progress);
            if let Err(e) = &result {
                tracing::warn!("incoming migration failed: {e}");
            }
            progress.end(&result);
        })
}

/// The VM the `creating` thread made (once: later calls find it taken).
fn made(
    creating: &mut Option<std::thread::JoinHandle<Result<crate::vm::Vm, crate::vm::VmError>>>,
) -> Result<crate::vm::Vm, MigrationError> {
    creating
        .take()
        .ok_or_else(|| refused("the VM was taken already"))?
        .join()
        .map_err(|_| refused("creating the VM panicked"))?
        .map_err(|e| refused(format!("cannot create the VM: {e}")))
}

fn refused(msg: impl Into<String>) -> MigrationError {
    MigrationError::Refused(msg.into())
}

fn run(
    job: ReceiveJob,
    link: &ControlLink,
    progress: &Arc<Progress>,
) -> Result<(), MigrationError> {
    let stream = job.listener.accept(&progress.cancel, None)?;
    let mut conn = Conn::new(stream, progress.cancel.clone())?;
    // The VM's freezer, once the VM is handed to the VMM thread.
    let mut installed = None;
    let mut incoming = None;
    let result = receive(
        &mut conn,
        job.listener,
        &job.params,
        link,
        progress,
        &mut installed,
        &mut incoming,
    );
    let result = result.map_err(|e| {
        // A guest that ran here on post-copy stops before the source hears that it may
        // run it again.
        let frozen = match (&installed, &incoming) {
            (Some(freezer), Some(_)) => freezer.freeze(crate::vcpu::COMMAND_TIMEOUT),
            _ => Ok(()),
        };
        if e.worth_telling() {
            conn.send_failure(&e.to_string());
        }
        let source_runs_it = matches!(e, MigrationError::Peer(_))
            && progress.status().downtime_ms.is_none();
        match (installed.is_some(), incoming) {
            // The source said it gave up before its Go: it runs the guest.
            (true, _) if source_runs_it => {
                let _ = link.send(Control::Discard);
                e
            }
            // Post-copy cannot go on: the guest stops here, and its missing pages stay
            // missing (never zeros) for as long as this VM exists.
            (true, Some(incoming)) => {
                // Stopped first, so that no page is half placed while it is counted.
                incoming.stop();
                let missing = incoming.remaining();
                incoming.publish(progress);
                let frozen = match frozen {
                    Ok(()) => String::new(),
                    Err(n) => format!(
                        " ({n} vCPUs were still inside KVM_RUN after {:?}: kicked, they cannot enter the guest again)",
                        crate::vcpu::COMMAND_TIMEOUT
                    ),
                };
                if missing == 0 {
                    // Complete, but the source may not know it: nobody runs the guest
                    // until an operator chooses.
                    incoming.finish();
                    let _ = link.send(Control::PostcopyFailed(None));
                    return MigrationError::Vm(format!(
                        "{e}; every page arrived, but the source did not confirm the end: the guest is paused here, complete{frozen}; resume it here (PATCH /vm) only if the source does not run it"
                    ));
                }
                let _ = link.send(Control::PostcopyFailed(Some(Box::new(incoming.hold()))));
                MigrationError::Vm(format!(
                    "{e}; post-copy cannot go on: the guest is paused here with {missing} pages still missing and must not run here{frozen}; the source keeps it paused with all of its memory: resume it there (PATCH /vm) or send it again"
                ))
            }
            (false, _) => e,
            // Nobody can tell here whether the source committed.
            (true, None) => MigrationError::Vm(format!(
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
    listener: Listener,
    params: &MigrationReceiveParams,
    link: &ControlLink,
    progress: &Arc<Progress>,
    installed: &mut Option<Arc<Freeze>>,
    incoming: &mut Option<Incoming>,
) -> Result<(), MigrationError> {
    let hello: Hello = conn.recv_json(Kind::Hello)?;
    // A version 2 source (no Prepare) is taken too, so that a running ferry of that
    // version upgrades in place to this one.
    if !(protocol::OLDEST_SOURCE..=protocol::VERSION).contains(&hello.version) {
        return Err(refused(format!(
            "the source speaks migration protocol version {}, this ferry {} (and sources of {} and later)",
            hello.version,
            protocol::VERSION,
            protocol::OLDEST_SOURCE
        )));
    }
    let prepares = hello.version >= 3;
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
    let mut creating = Some(
        std::thread::Builder::new()
            .name("migration-vm".into())
            .spawn(move || {
                // Started by migration-recv, confined already: its filter is this thread's.
                seccomp::inherit();
                crate::vm::Vm::new(host, vm_ram)
            })
            .map_err(|e| refused(format!("cannot create the VM: {e}")))?,
    );
    // The VM, once made; and whether the source's Prepare came.
    let mut vm = None;
    let mut prepared = false;
    progress.update(|s| s.local = hello.local);
    conn.send_json(
        Kind::HelloAck,
        &HelloAck {
            version: hello.version,
        },
    )?;
    // Post-copy's page requests come on a second stream from the same source.
    let mut fault_conn = match hello.fault_channel {
        Some(token) => {
            let deadline = std::time::Instant::now() + STALL_TIMEOUT;
            let stream = listener.accept(&progress.cancel, Some(deadline))?;
            let mut c = Conn::new(stream, progress.cancel.clone())?;
            let channel: Channel = c.recv_json(Kind::Channel)?;
            if channel.token != token {
                return Err(MigrationError::Protocol(
                    "a second connection came that is not this migration's".into(),
                ));
            }
            Some(c)
        }
        None => None,
    };
    // One migration per request: nobody else may connect.
    drop(listener);

    let total_pages = ram.size() / PAGE_SIZE;
    let mut data = Vec::with_capacity(protocol::BATCH_BYTES);
    let mut received = 0u64;
    let mut hashes = None;
    // The pages `make_room` wrote, when the source listed them.
    let mut room = None;
    let switch: Switch = loop {
        // A VM that could not be made fails the migration now, not at the pause.
        if creating.as_ref().is_some_and(|c| c.is_finished()) {
            vm = Some(made(&mut creating)?);
        }
        let header = conn.recv_header()?;
        match header.kind {
            // Once room is made, the memfd holds nothing else (postcopy.rs).
            Kind::Pages if !hello.local && room.is_none() => {
                let (ranges, data) = protocol::read_batch(conn, &header, &mut data)?;
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
            Kind::Prepare if prepares && !prepared => {
                if header.len > 8 + 16 * total_pages {
                    return Err(MigrationError::Protocol(format!(
                        "{} bytes of pages to make room for, for {total_pages} pages",
                        header.len
                    )));
                }
                let body = conn.read_payload(&header)?;
                // A pure post-copy's source lists the pages that hold data: room is
                // made for them now, while the guest still runs there (postcopy.rs).
                if !body.is_empty() {
                    // A local destination's memfd is the source's own guest RAM.
                    if fault_conn.is_none()
                        || received > 0
                        || hello.local
                        || hello.verify
                        || hello.version < 4
                    {
                        return Err(MigrationError::Protocol(
                            "Prepare lists pages to make room for, but the migration is not a pure post-copy".into(),
                        ));
                    }
                    if memory::fault::minor_faults_work() {
                        let t = std::time::Instant::now();
                        let made = postcopy::make_room(&ram, &body, &progress.cancel)?;
                        tracing::debug!(
                            "post-copy: room made for {} MiB in {:?}",
                            (made.count() * PAGE_BYTES) >> 20,
                            t.elapsed()
                        );
                        room = Some(made);
                    } else {
                        tracing::info!(
                            "post-copy: this kernel has no minor faults on shmem; pages are placed into holes"
                        );
                    }
                }
                if vm.is_none() {
                    vm = Some(made(&mut creating)?);
                }
                prepared = true;
                conn.send(Kind::Prepared, &[])?;
            }
            Kind::State if prepares && !prepared => {
                return Err(MigrationError::Protocol(
                    "the state came before Prepare".into(),
                ))
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
    let lacks = if switch.postcopy {
        if hello.verify || fault_conn.is_none() {
            return Err(MigrationError::Protocol(
                "a post-copy switch in a migration that did not announce it".into(),
            ));
        }
        let header = conn.expect(Kind::Missing)?;
        if header.len > 8 + 16 * total_pages {
            return Err(MigrationError::Protocol(format!(
                "{} bytes of missing pages for {total_pages} pages",
                header.len
            )));
        }
        let body = conn.read_payload(&header)?;
        Some(postcopy::decode_missing(&ram, &body)?)
    } else {
        if room.is_some() {
            return Err(MigrationError::Protocol(
                "a pre-copy switch in a migration whose Prepare listed pages to make room for"
                    .into(),
            ));
        }
        None
    };
    if hello.verify {
        let source = hashes.ok_or_else(|| {
            MigrationError::Protocol("the state came before the page hashes".into())
        })?;
        verify::compare(&ram, &source).map_err(MigrationError::Verify)?;
    }
    tracing::debug!("switch-over: state in, verified after {:?}", t.elapsed());
    crate::snapshot::check_memory(&switch.state, &ram).map_err(|e| refused(e.to_string()))?;
    let vm = match vm {
        Some(vm) => vm,
        // A version 2 source: the VM is waited for here, in the pause.
        None => made(&mut creating)?,
    };
    let mut vmm = crate::builder::restore_on(vm, &config, &switch.state, None)
        .map_err(|e| refused(format!("cannot build the VM from the source's state: {e}")))?;
    // Post-copy holds guest RAM's userfaultfd until all memory is here: tracking for
    // snapshots starts then.
    if config.machine_config.track_dirty_pages && lacks.is_none() {
        vmm.track_for_snapshots(config.machine_config.dirty_tracking.as_deref())
            .map_err(|e| refused(e.to_string()))?;
    }
    if let (Some(lacks), Some(mut fault_conn)) = (lacks, fault_conn.take()) {
        // Silence makes this side freeze its guest before the source gives up.
        conn.set_stall(DESTINATION_STALL_TIMEOUT);
        fault_conn.set_stall(DESTINATION_STALL_TIMEOUT);
        progress.update(|s| {
            s.postcopy = true;
            s.remaining_pages = lacks.count() as u64;
        });
        *incoming = Some(postcopy::Incoming::start(
            &ram,
            lacks,
            room.take(),
            fault_conn,
            progress.clone(),
        )?);
    }
    drop(ram);
    tracing::debug!("switch-over: VM built after {:?}", t.elapsed());
    // From here a cancel here is refused: the VM is ready to run on the source's Go.
    if !progress.commit() {
        return Err(MigrationError::Cancelled);
    }
    let freezer = vmm.freezer();
    link.ask(|tx| Control::Install(Box::new(vmm), Box::new(config), tx))?;
    *installed = Some(freezer);
    conn.send(Kind::Ready, &[])?;
    conn.recv_empty(Kind::Go)?;
    tracing::debug!("switch-over: installed, Go after {:?}", t.elapsed());
    let resumed_at = link.ask(Control::Resume)?;
    tracing::debug!("switch-over: resumed after {:?}", t.elapsed());
    let downtime_ms = resumed_at.saturating_sub(switch.paused_at_ns) as f64 / 1e6;
    progress.update(|s| s.downtime_ms = Some(downtime_ms));
    // The guest runs here now, whatever becomes of this message.
    let sent = conn.send_json(Kind::Done, &Done { downtime_ms });
    if let Some(inc) = incoming.as_mut() {
        sent?;
        rest_of_memory(conn, inc, progress)?;
        if let Some(inc) = incoming.take() {
            inc.finish();
        }
        let _ = link.send(Control::PostcopyDone);
    }
    Ok(())
}

/// Post-copy after the guest runs here: places the pages the source pushes until it
/// says it sent them all, waits for the answers still on their way, and ends the
/// migration with the source.
fn rest_of_memory(
    conn: &mut Conn,
    incoming: &mut Incoming,
    progress: &Progress,
) -> Result<(), MigrationError> {
    let failed = |incoming: &Incoming| incoming.error().map(MigrationError::Vm);
    conn.share_cores();
    let mut data = Vec::with_capacity(protocol::BATCH_BYTES);
    let started = std::time::Instant::now();
    let (mut bytes, mut placing) = (0u64, std::time::Duration::ZERO);
    loop {
        let header = conn.recv_header()?;
        match header.kind {
            Kind::Pages => {
                let (ranges, data) = protocol::read_batch(conn, &header, &mut data)?;
                let t = std::time::Instant::now();
                incoming.pushed(&ranges, data)?;
                placing += t.elapsed();
                bytes += data.len() as u64;
                incoming.publish(progress);
                if let Some(e) = failed(incoming) {
                    return Err(e);
                }
            }
            Kind::PushDone => {
                tracing::debug!(
                    "post-copy: {} MiB pushed in {:?}, {placing:?} of it placing them",
                    bytes >> 20,
                    started.elapsed()
                );
                break;
            }
            other => {
                return Err(MigrationError::Protocol(format!(
                    "unexpected {other:?} message during post-copy"
                )))
            }
        }
    }
    // Answers to the last requests may still be on the fault stream.
    let since = std::time::Instant::now();
    while incoming.remaining() > 0 {
        if let Some(e) = failed(incoming) {
            return Err(e);
        }
        if since.elapsed() > DESTINATION_STALL_TIMEOUT {
            return Err(MigrationError::Protocol(format!(
                "the source said it sent every page, but {} are missing",
                incoming.remaining()
            )));
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    // A fault thread that failed on the last pages has said so once it has stopped:
    // only then is guest RAM given back to the kernel.
    incoming.stop();
    if let Some(e) = failed(incoming) {
        return Err(e);
    }
    incoming.complete();
    incoming.publish(progress);
    conn.send(Kind::Complete, &[])?;
    conn.recv_empty(Kind::CompleteAck)?;
    Ok(())
}
