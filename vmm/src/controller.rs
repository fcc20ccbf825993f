//! The VMM thread. A `Controller` owns the VM's configuration and, once started, the
//! `Vmm`. It runs on an event-manager (epoll) loop and reacts to:
//! - API requests (channel plus eventfd): each one is a lifecycle transition or a
//!   configuration change, answered on the request's own channel;
//! - the guest stopping (vCPU events, i8042 reset);
//! - SIGINT and SIGTERM;
//! - console input, when stdin is a terminal.

use std::io::Read;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};

use api::action::{ApiError, MetricsConfig, VmmAction, VmmData, VmmResult};
use api::server::ApiChannel;
use api::{BootSource, Drive, MachineConfig, NetworkInterface, SerialConfig, VmConfig};
use devices::legacy::SerialInput;
use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::register_signal_handler;
use vmm_sys_util::timerfd::TimerFd;

use crate::migration::{self, Control, ControlChannel, Progress};
use crate::{ExitReason, VmState, Vmm};

/// The eventfd that SIGINT and SIGTERM write to; -1 until the loop is set up.
static STOP_FD: AtomicI32 = AtomicI32::new(-1);

extern "C" fn handle_stop_signal(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let fd = STOP_FD.load(Ordering::Acquire);
    if fd >= 0 {
        let one = 1u64;
        // SAFETY: write(2) on an eventfd with an 8-byte buffer is async-signal-safe.
        unsafe { libc::write(fd, &one as *const u64 as *const libc::c_void, 8) };
    }
}

/// `STOP_FD` set to the loop's eventfd, and back to -1 when dropped.
struct StopFd;

impl StopFd {
    fn publish(fd: RawFd) -> StopFd {
        STOP_FD.store(fd, Ordering::Release);
        StopFd
    }
}

impl Drop for StopFd {
    fn drop(&mut self) {
        STOP_FD.store(-1, Ordering::Release);
    }
}

/// Why the event loop could not run.
#[derive(Debug, thiserror::Error)]
pub enum EventLoopError {
    /// epoll, eventfd or signal setup failed.
    #[error("cannot set up the event loop: {0}")]
    Setup(String),
}

/// The configuration being assembled through the API, before `InstanceStart`.
#[derive(Default)]
struct Resources {
    boot_source: Option<BootSource>,
    machine: MachineConfig,
    drives: Vec<Drive>,
    network_interfaces: Vec<NetworkInterface>,
    serial: Option<SerialConfig>,
}

impl Resources {
    fn from_config(config: &VmConfig) -> Self {
        Resources {
            boot_source: Some(config.boot_source.clone()),
            machine: config.machine_config.clone(),
            drives: config.drives.clone(),
            network_interfaces: config.network_interfaces.clone(),
            serial: config.serial.clone(),
        }
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "boot-source": self.boot_source,
            "machine-config": self.machine,
            "drives": self.drives,
            "network-interfaces": self.network_interfaces,
            "serial": self.serial,
        })
    }

    fn to_config(&self) -> Result<VmConfig, ApiError> {
        let boot_source = self.boot_source.clone().ok_or_else(|| {
            ApiError::bad_request(
                "cannot start the microVM: no boot source is configured (PUT /boot-source)",
            )
        })?;
        let config = VmConfig::new(
            boot_source,
            self.machine.clone(),
            self.drives.clone(),
            self.network_interfaces.clone(),
            self.serial.clone(),
        );
        config
            .validate()
            .map_err(|e| ApiError::bad_request(format!("cannot start the microVM: {e}")))?;
        Ok(config)
    }
}

const NOT_AFTER_BOOT: &str = "the update operation is not allowed after boot";

/// The VMM thread's state.
pub struct Controller {
    resources: Resources,
    vmm: Option<Vmm>,
    api: Option<ApiChannel>,
    stop: EventFd,
    stdin: bool,
    exit: Option<ExitReason>,
    /// Where `FlushMetrics` and the timer write (`PUT /metrics`).
    metrics_file: Option<crate::metrics::MetricsFile>,
    /// Fires every `metrics::PERIOD` once metrics have a destination.
    metrics_timer: Option<TimerFd>,
    /// How long this process took to start, as its launcher measures it.
    startup: crate::metrics::Startup,
    /// Set by the first configuration request: a snapshot then no longer loads.
    configured: bool,
    /// The migration threads' requests.
    control: ControlChannel,
    /// The current or last migration.
    migration: Option<Arc<Progress>>,
    /// The running migration paused the VM (for its switch-over), so an abort resumes it.
    migration_paused: bool,
    /// A post-copy into this ferry failed: guest RAM still misses pages, kept missing
    /// (never zeros) by this registration, and the guest must not run here.
    incomplete: Option<migration::postcopy::Incoming>,
    /// The running or last live snapshot.
    live: Option<Arc<crate::snapshot::LiveSnapshot>>,
}

impl Controller {
    /// A controller with no VM yet, driven by the API.
    pub fn with_api(api: ApiChannel, stdin: bool) -> Result<Self, EventLoopError> {
        // Read what KVM offers now, not in the first request that needs it. An error
        // here is reported by the request.
        let _ = crate::vm::host();
        // A ferry started without a VM may be a migration's destination or a
        // snapshot's: it will restore vCPUs, which needs the probed MSRs.
        prepare_saves();
        Self::new(Resources::default(), None, Some(api), stdin)
    }

    /// A controller for a VM already built (and started) from `config`; `api` is optional.
    pub fn with_vmm(
        config: &VmConfig,
        vmm: Vmm,
        api: Option<ApiChannel>,
        stdin: bool,
    ) -> Result<Self, EventLoopError> {
        Self::new(Resources::from_config(config), Some(vmm), api, stdin)
    }

    fn new(
        resources: Resources,
        vmm: Option<Vmm>,
        api: Option<ApiChannel>,
        stdin: bool,
    ) -> Result<Self, EventLoopError> {
        let stop =
            EventFd::new(libc::EFD_NONBLOCK).map_err(|e| EventLoopError::Setup(e.to_string()))?;
        let control = ControlChannel::new().map_err(|e| EventLoopError::Setup(e.to_string()))?;
        Ok(Controller {
            control,
            migration: None,
            migration_paused: false,
            incomplete: None,
            live: None,
            resources,
            vmm,
            api,
            stop,
            stdin,
            exit: None,
            metrics_file: None,
            metrics_timer: None,
            startup: crate::metrics::Startup::default(),
            configured: false,
        })
    }

    fn watch_vm(&self, ops: &mut EventOps) {
        let Some(vmm) = &self.vmm else { return };
        prepare_saves();
        let stdin = self.stdin.then_some(libc::STDIN_FILENO);
        watch(ops, vmm.exit_fds().into_iter().chain(stdin));
        watch_devices(vmm, ops);
        confine();
    }

    /// Stops watching every fd of a VM that is going away; before its fds close, as
    /// new ones may get the same numbers.
    fn unwatch_vm(&self, vmm: &Vmm, ops: &mut EventOps) {
        unwatch_devices(vmm, ops);
        let stdin = self.stdin.then_some(libc::STDIN_FILENO);
        for fd in vmm.exit_fds().into_iter().chain(stdin) {
            let _ = ops.remove(Events::new_raw(fd, EventSet::IN));
        }
    }

    fn started(&self) -> Result<&Vmm, ApiError> {
        self.vmm
            .as_ref()
            .ok_or_else(|| ApiError::bad_request("the microVM is not started"))
    }

    fn before_boot(&self) -> Result<(), ApiError> {
        if self.vmm.is_some() {
            return Err(ApiError::bad_request(NOT_AFTER_BOOT));
        }
        Ok(())
    }

    /// Publishes the lifecycle state for the API thread's `GET /`.
    fn publish_state(&self) {
        if let Some(api) = &self.api {
            let state = self.vmm.as_ref().map(Vmm::state);
            api.status.set(
                state.is_some_and(|s| s != VmState::NotStarted),
                state == Some(VmState::Paused),
            );
        }
    }

    fn metrics(&self) -> serde_json::Value {
        let mut m = self
            .vmm
            .as_ref()
            .map_or_else(|| serde_json::json!({}), Vmm::metrics);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        m["utc_timestamp_ms"] = u64::try_from(now.as_millis()).unwrap_or(u64::MAX).into();
        if let Some(api) = &self.api {
            for (k, v) in api.counts.lock().expect("poisoned").json() {
                m[k] = v;
            }
        }
        if let Some(migration) = &self.migration {
            m["migration"] = serde_json::json!(migration.status());
        }
        let missed = self.metrics_file.as_ref().map_or(0, |f| f.missed);
        crate::metrics::add_firecracker_groups(&mut m, &self.startup, missed);
        m
    }

    /// How long this process took to start, for `api_server`'s startup times.
    pub fn set_startup(&mut self, startup: crate::metrics::Startup) {
        self.startup = startup;
    }

    /// Sends metrics to `path` (`--metrics-path`, `PUT /metrics`). Once only, as with
    /// Firecracker.
    pub fn set_metrics_path(&mut self, path: &std::path::Path) -> Result<(), ApiError> {
        if self.metrics_file.is_some() {
            return Err(ApiError::bad_request(
                "metrics are already configured: their destination is set once",
            ));
        }
        let file = crate::metrics::MetricsFile::open(path).map_err(|e| {
            ApiError::bad_request(format!("metrics_path: cannot open {}: {e}", path.display()))
        })?;
        self.metrics_file = Some(file);
        Ok(())
    }

    /// Starts the periodic flush, once metrics have a destination.
    fn start_metrics_timer(&mut self, ops: &mut EventOps) {
        if self.metrics_file.is_none() || self.metrics_timer.is_some() {
            return;
        }
        let timer = TimerFd::new().and_then(|mut t| {
            t.reset(crate::metrics::PERIOD, Some(crate::metrics::PERIOD))?;
            Ok(t)
        });
        match timer {
            Ok(timer) => {
                watch(ops, [timer.as_raw_fd()].into_iter());
                self.metrics_timer = Some(timer);
            }
            Err(e) => tracing::error!("cannot start the metrics timer: {e}"),
        }
    }

    /// Writes one metrics line; false when the destination did not take it.
    fn flush_metrics(&mut self) -> Option<bool> {
        let m = self.metrics();
        self.metrics_file.as_mut().map(|f| f.write(&m))
    }

    /// Whether a migration is running.
    fn migrating(&self) -> bool {
        self.migration.as_ref().is_some_and(|m| !m.finished())
    }

    /// Refuses what cannot run now: most requests while a migration runs, snapshots and
    /// migrations while a live snapshot is written, and running or saving a guest whose
    /// memory is incomplete here.
    fn refuse_now(&self, action: &VmmAction) -> Result<(), ApiError> {
        if self.migrating()
            && !matches!(
                action,
                VmmAction::GetVmConfig
                    | VmmAction::GetMachineConfig
                    | VmmAction::GetMetrics
                    | VmmAction::PutMetrics(_)
                    | VmmAction::PutLogger(_)
                    | VmmAction::FlushMetrics
                    | VmmAction::GetMigration
                    | VmmAction::MigrationCancel
            )
        {
            return Err(ApiError::bad_request(
                "a migration is running: wait for it, or PUT /migration/cancel",
            ));
        }
        if self.live_running()
            && matches!(
                action,
                VmmAction::CreateSnapshot(_) | VmmAction::MigrationSend(..)
            )
        {
            return Err(ApiError::bad_request(
                "a live snapshot is running: wait for it (GET /snapshot)",
            ));
        }
        if self.incomplete.is_some()
            && matches!(
                action,
                VmmAction::Resume | VmmAction::CreateSnapshot(_) | VmmAction::MigrationSend(..)
            )
        {
            return Err(ApiError::bad_request(
                "the guest's memory is incomplete here: a post-copy migration into this ferry failed (see GET /migration), and the source holds the guest",
            ));
        }
        Ok(())
    }

    fn handle(&mut self, action: VmmAction, ops: &mut EventOps) -> VmmResult {
        let bad = |e: api::ConfigError| ApiError::bad_request(e.to_string());
        self.refuse_now(&action)?;
        if matches!(
            action,
            VmmAction::PutMachineConfig(_)
                | VmmAction::PatchMachineConfig(_)
                | VmmAction::PutBootSource(_)
                | VmmAction::PutDrive(_)
                | VmmAction::PutNetworkInterface(_)
                | VmmAction::PutSerial(_)
        ) {
            self.configured = true;
        }
        match action {
            VmmAction::GetVmConfig => Ok(VmmData::Json(self.resources.json())),
            VmmAction::GetMachineConfig => {
                Ok(VmmData::Json(serde_json::json!(self.resources.machine)))
            }
            VmmAction::GetMetrics => Ok(VmmData::Json(self.metrics())),
            VmmAction::PutMachineConfig(config) => {
                self.before_boot()?;
                check_host_fits(&config)?;
                self.resources.machine = config;
                Ok(VmmData::Empty)
            }
            VmmAction::PatchMachineConfig(update) => {
                self.before_boot()?;
                let config = self.resources.machine.updated(&update).map_err(bad)?;
                check_host_fits(&config)?;
                self.resources.machine = config;
                Ok(VmmData::Empty)
            }
            VmmAction::PutBootSource(source) => {
                self.before_boot()?;
                self.resources.boot_source = Some(source);
                Ok(VmmData::Empty)
            }
            VmmAction::PutDrive(drive) => {
                self.before_boot()?;
                let drives = &mut self.resources.drives;
                match drives.iter_mut().find(|d| d.drive_id == drive.drive_id) {
                    Some(d) => *d = drive,
                    None => drives.push(drive),
                }
                Ok(VmmData::Empty)
            }
            VmmAction::PutNetworkInterface(iface) => {
                self.before_boot()?;
                let ifaces = &mut self.resources.network_interfaces;
                match ifaces.iter_mut().find(|n| n.iface_id == iface.iface_id) {
                    Some(n) => *n = iface,
                    None => ifaces.push(iface),
                }
                Ok(VmmData::Empty)
            }
            VmmAction::PatchDrive(update) => {
                let vmm = self.vmm.as_ref().ok_or_else(|| {
                    ApiError::bad_request("PATCH /drives is only allowed after InstanceStart")
                })?;
                if update.rate_limiter.is_some() {
                    return Err(ApiError::bad_request(
                        "drives.rate_limiter is not supported by ferry yet",
                    ));
                }
                let Some(path) = &update.path_on_host else {
                    return Err(ApiError::bad_request(
                        "PATCH /drives needs path_on_host: nothing else can change",
                    ));
                };
                vmm.devices()
                    .virtio
                    .replace_drive_file(&update.drive_id, path)
                    .map_err(|e| ApiError::bad_request(e.to_string()))?;
                if let Some(d) = self
                    .resources
                    .drives
                    .iter_mut()
                    .find(|d| d.drive_id == update.drive_id)
                {
                    d.path_on_host = Some(path.clone());
                }
                Ok(VmmData::Empty)
            }
            VmmAction::PatchNetworkInterface(update) => {
                let vmm = self.vmm.as_ref().ok_or_else(|| {
                    ApiError::bad_request(
                        "PATCH /network-interfaces is only allowed after InstanceStart",
                    )
                })?;
                if !vmm.devices().virtio.has_net(&update.iface_id) {
                    return Err(ApiError::bad_request(format!(
                        "the microVM has no network interface \"{}\"",
                        update.iface_id
                    )));
                }
                if update.rx_rate_limiter.is_some() || update.tx_rate_limiter.is_some() {
                    return Err(ApiError::bad_request(
                        "network-interfaces rate limiters are not supported by ferry yet",
                    ));
                }
                Ok(VmmData::Empty)
            }
            VmmAction::SaveDevices => {
                let vmm = self.started()?;
                let state = vmm
                    .save_devices()
                    .map_err(|e| ApiError::bad_request(e.to_string()))?;
                Ok(VmmData::Json(state))
            }
            VmmAction::RestoreDevices(saved) => {
                let vmm = self
                    .vmm
                    .as_mut()
                    .ok_or_else(|| ApiError::bad_request("the microVM is not started"))?;
                // The old taps close as their devices go: stop watching them first, as a
                // new tap may get the same fd number.
                unwatch_devices(vmm, ops);
                let result = vmm.restore_devices(saved);
                watch_devices(vmm, ops);
                result.map_err(|e| ApiError::bad_request(e.to_string()))?;
                Ok(VmmData::Empty)
            }
            VmmAction::PutSerial(serial) => {
                self.before_boot()?;
                self.resources.serial = Some(serial);
                Ok(VmmData::Empty)
            }
            VmmAction::PutMetrics(MetricsConfig { metrics_path }) => {
                self.set_metrics_path(&metrics_path)?;
                self.start_metrics_timer(ops);
                Ok(VmmData::Empty)
            }
            VmmAction::PutLogger(settings) => {
                logger::configure(&settings).map_err(|e| ApiError::bad_request(e.to_string()))?;
                Ok(VmmData::Empty)
            }
            VmmAction::FlushMetrics => match self.flush_metrics() {
                None => Err(ApiError::bad_request(
                    "metrics are not configured: PUT /metrics first",
                )),
                Some(false) => Err(ApiError::bad_request(
                    "cannot write metrics: the destination did not take the line (a FIFO nobody reads?)",
                )),
                Some(true) => Ok(VmmData::Empty),
            },
            VmmAction::StartInstance => {
                if self.vmm.is_some() {
                    return Err(ApiError::bad_request("the microVM is already started"));
                }
                let config = self.resources.to_config()?;
                let mut vmm = crate::build(&config)
                    .map_err(|e| ApiError::bad_request(format!("cannot start the microVM: {e}")))?;
                vmm.start()
                    .map_err(|e| ApiError::bad_request(format!("cannot start the microVM: {e}")))?;
                self.vmm = Some(vmm);
                self.watch_vm(ops);
                Ok(VmmData::Empty)
            }
            VmmAction::CreateSnapshot(params) => {
                let config = self.resources.to_config()?;
                let vmm = self
                    .vmm
                    .as_mut()
                    .ok_or_else(|| ApiError::bad_request("the microVM is not started"))?;
                let stats = vmm.create_snapshot(&config, &params).map_err(|e| {
                    ApiError::bad_request(format!("cannot create the snapshot: {e}"))
                })?;
                tracing::info!(
                    "snapshot written to {} and {}: {} bytes of memory in {} µs",
                    params.snapshot_path.display(),
                    params.mem_file_path.display(),
                    stats.memory_bytes,
                    stats.total_us
                );
                Ok(VmmData::Empty)
            }
            VmmAction::LoadSnapshot(params) => {
                if self.vmm.is_some() {
                    return Err(ApiError::bad_request(
                        "cannot load a snapshot: this microVM is already started; load into a fresh ferry",
                    ));
                }
                if self.configured {
                    return Err(ApiError::bad_request(
                        "cannot load a snapshot: this ferry was already configured; load into a fresh ferry",
                    ));
                }
                let (mut vmm, config) = crate::snapshot::load(&params)
                    .map_err(|e| ApiError::bad_request(format!("cannot load the snapshot: {e}")))?;
                if params.resume_vm {
                    vmm.resume().map_err(|e| {
                        ApiError::bad_request(format!(
                            "the snapshot loaded, but cannot resume: {e}"
                        ))
                    })?;
                }
                self.resources = Resources::from_config(&config);
                self.configured = true;
                self.vmm = Some(vmm);
                self.watch_vm(ops);
                Ok(VmmData::Empty)
            }
            VmmAction::MigrationSend(params, endpoint) => self.migrate(params, endpoint),
            VmmAction::MigrationReceive(params, endpoint) => self.receive(params, endpoint),
            VmmAction::MigrationCancel => {
                let m = self
                    .migration
                    .as_ref()
                    .ok_or_else(|| ApiError::bad_request("no migration is running"))?;
                m.cancel().map_err(ApiError::bad_request)?;
                Ok(VmmData::Empty)
            }
            VmmAction::GetSnapshot => {
                let status = match &self.live {
                    Some(live) => live.status(),
                    None => api::models::SnapshotStatus {
                        state: "idle".into(),
                        ..Default::default()
                    },
                };
                serde_json::to_value(status)
                    .map(VmmData::Json)
                    .map_err(|e| ApiError::bad_request(e.to_string()))
            }
            VmmAction::GetMigration => {
                let status = self
                    .migration
                    .as_ref()
                    .map(|m| m.status())
                    .unwrap_or_default();
                Ok(VmmData::Json(serde_json::json!(status)))
            }
            VmmAction::SendCtrlAltDel => {
                self.started()?
                    .send_ctrl_alt_del()
                    .map_err(|e| ApiError::bad_request(format!("cannot send Ctrl-Alt-Del: {e}")))?;
                Ok(VmmData::Empty)
            }
            VmmAction::Pause | VmmAction::Resume => {
                let vmm = self
                    .vmm
                    .as_mut()
                    .ok_or_else(|| ApiError::bad_request("the microVM is not started"))?;
                let result = if action == VmmAction::Pause {
                    vmm.pause()
                } else {
                    vmm.resume()
                };
                result.map_err(|e| ApiError::bad_request(e.to_string()))?;
                Ok(VmmData::Empty)
            }
        }
    }

    /// `PUT /migration/send`: starts tracking (so that a mechanism already taken is
    /// refused here, with 400) and the source's thread.
    fn migrate(
        &mut self,
        params: api::migration::MigrationSendParams,
        endpoint: api::migration::Endpoint,
    ) -> VmmResult {
        use api::migration::MigrationTracking;
        use memory::dirty::TrackingMode;
        let vmm = self
            .vmm
            .as_ref()
            .ok_or_else(|| ApiError::bad_request("cannot migrate: the microVM is not started"))?;
        let config = self.resources.to_config()?;
        // A guest paused by a post-copy that failed may be sent again.
        let resend = vmm.state() == VmState::Paused
            && self.migration.as_ref().is_some_and(|m| {
                let s = m.status();
                s.postcopy
                    && s.state == api::migration::MigrationState::Failed
                    && s.role.as_deref() == Some("send")
            });
        if vmm.state() != VmState::Running && !resend {
            return Err(ApiError::bad_request(format!(
                "cannot migrate: the microVM is {:?}; only a running microVM migrates",
                vmm.state()
            )));
        }
        vmm.memory_settled()
            .map_err(|e| ApiError::bad_request(format!("cannot migrate: {e}")))?;
        // The MSRs a save reads are probed once per process on a scratch VM, which
        // takes milliseconds: now, not while the guest is paused at switch-over.
        if let Ok(host) = crate::vm::host() {
            crate::vcpu::state::saved_msrs(host);
        }
        let tracker = if params.local || params.mode == api::migration::MigrationMode::Postcopy {
            None
        } else {
            // Hot pages stay writable where the mechanism allows it: pre-copy sends
            // them once, at switch-over, so the guest need not fault on them every
            // round.
            let mode = match params.tracking {
                MigrationTracking::UffdAsync => TrackingMode::UffdAsyncHot,
                MigrationTracking::UffdSync => TrackingMode::UffdSync,
                MigrationTracking::KvmDirtyLog => TrackingMode::KvmDirtyLogHot,
            };
            let start = |mode| -> Result<_, memory::dirty::DirtyError> {
                let began = std::time::Instant::now();
                let mut t = vmm.dirty_tracker(mode)?;
                t.start()?;
                tracing::debug!("migration: tracking started in {:?}", began.elapsed());
                Ok(t)
            };
            Some(start(mode).map_err(|e| ApiError::bad_request(format!("cannot migrate: {e}")))?)
        };
        let progress = Progress::new(api::migration::MigrationStatus {
            role: Some("send".into()),
            mode: Some(params.mode),
            tracking: (!params.local).then_some(params.tracking),
            local: params.local,
            ..Default::default()
        });
        let job = migration::sender::SendJob {
            params,
            endpoint,
            ram: vmm.ram().clone(),
            tracker,
            config,
            whole: vmm.memory_from_handler(),
        };
        migration::spawn_sender(job, self.control.link(), progress.clone()).map_err(|e| {
            ApiError::bad_request(format!("cannot start the migration thread: {e}"))
        })?;
        self.migration = Some(progress);
        self.migration_paused = false;
        Ok(VmmData::Empty)
    }

    /// `PUT /migration/receive`: listens (so that a bad address is a 400 here), then
    /// waits for the source on the destination's thread.
    fn receive(
        &mut self,
        params: api::migration::MigrationReceiveParams,
        endpoint: api::migration::Endpoint,
    ) -> VmmResult {
        if self.vmm.is_some() || self.configured {
            return Err(ApiError::bad_request(
                "cannot receive a migration: this ferry is already configured or started; receive into a fresh ferry",
            ));
        }
        let listener = migration::Listener::bind(&endpoint)
            .map_err(|e| ApiError::bad_request(format!("cannot receive a migration: {e}")))?;
        // Restoring vCPUs needs the probed MSRs: probe them now, beside the pre-copy,
        // not while the source's guest is paused at switch-over.
        prepare_saves();
        let progress = Progress::new(api::migration::MigrationStatus {
            role: Some("receive".into()),
            ..Default::default()
        });
        let job = migration::receiver::ReceiveJob { params, listener };
        migration::spawn_receiver(job, self.control.link(), progress.clone()).map_err(|e| {
            ApiError::bad_request(format!("cannot start the migration thread: {e}"))
        })?;
        self.migration = Some(progress);
        Ok(VmmData::Empty)
    }

    /// What a migration thread asks of this thread.
    fn serve_control(&mut self, ops: &mut EventOps) {
        let _ = self.control.wake.read();
        let requests: Vec<_> = self.control.requests.try_iter().collect();
        for request in requests {
            match request {
                Control::Switchover(reply) => {
                    let _ = reply.send(self.switchover());
                }
                Control::Abort(which) => {
                    let current = self
                        .migration
                        .as_ref()
                        .is_some_and(|m| Arc::ptr_eq(m, &which));
                    if current && std::mem::take(&mut self.migration_paused) {
                        if let Some(vmm) = self.vmm.as_mut() {
                            if let Err(e) = vmm.resume() {
                                tracing::error!("cannot resume after the failed migration: {e}");
                            }
                        }
                    }
                }
                Control::Finished => self.exit = Some(ExitReason::Migrated),
                Control::Install(vmm, config, reply) => {
                    let result = if self.vmm.is_some() {
                        Err("this ferry already runs a microVM".to_string())
                    } else {
                        self.resources = Resources::from_config(&config);
                        self.configured = true;
                        self.vmm = Some(*vmm);
                        self.watch_vm(ops);
                        Ok(())
                    };
                    let _ = reply.send(result);
                }
                Control::Discard => {
                    if let Some(vmm) = self.vmm.take() {
                        self.unwatch_vm(&vmm, ops);
                    }
                    self.resources = Resources::default();
                    self.configured = false;
                }
                Control::PostcopyFailed(incoming) => {
                    if let Some(vmm) = self.vmm.as_mut() {
                        // The migration thread froze the vCPUs already.
                        if vmm.state() == VmState::Running {
                            if let Err(e) = vmm.pause_frozen() {
                                tracing::error!(
                                    "pausing the guest after the failed post-copy: {e}; it is frozen all the same"
                                );
                            }
                        }
                    }
                    // Complete here: an operator may resume it (exactly one side).
                    if let (None, Some(vmm)) = (&incoming, self.vmm.as_ref()) {
                        vmm.freezer().thaw();
                    }
                    self.incomplete = incoming.map(|i| *i);
                }
                Control::PostcopyDone => {
                    let machine = &self.resources.machine;
                    if let (true, Some(vmm)) = (machine.track_dirty_pages, self.vmm.as_mut()) {
                        if let Err(e) = vmm.track_for_snapshots(machine.dirty_tracking.as_deref()) {
                            tracing::error!("cannot track dirty pages after the post-copy: {e}");
                        }
                    }
                }
                Control::Resume(reply) => {
                    let result = match self.vmm.as_mut() {
                        Some(vmm) => vmm
                            .resume()
                            .map(|()| migration::unix_ns())
                            .map_err(|e| e.to_string()),
                        None => Err("no microVM was received".to_string()),
                    };
                    let _ = reply.send(result);
                }
            }
            self.publish_state();
        }
    }

    /// The source's switch-over: pauses the VM if it runs, and saves its state.
    fn switchover(&mut self) -> Result<(crate::snapshot::MachineState, u64), String> {
        let config = self.resources.to_config().map_err(|e| e.message)?;
        let vmm = self.vmm.as_mut().ok_or("the microVM is gone")?;
        if vmm.state() == VmState::Running {
            vmm.pause().map_err(|e| e.to_string())?;
            self.migration_paused = true;
        }
        let paused_at = migration::unix_ns();
        vmm.machine_state(&config)
            .map(|state| (state, paused_at))
            .map_err(|e| format!("cannot save the machine state: {e}"))
    }

    fn live_running(&self) -> bool {
        self.live.as_ref().is_some_and(|l| l.running())
    }

    fn start_live_snapshot(
        &mut self,
        action: &VmmAction,
        params: &api::models::SnapshotCreateParams,
        reply: api::Reply,
    ) -> Result<(), ApiError> {
        self.refuse_now(action)?;
        let config = self.resources.to_config()?;
        let vmm = self
            .vmm
            .as_mut()
            .ok_or_else(|| ApiError::bad_request("the microVM is not started"))?;
        let live = vmm
            .start_live_snapshot(&config, params, reply)
            .map_err(|e| ApiError::bad_request(format!("cannot create the snapshot: {e}")))?;
        self.live = Some(live);
        Ok(())
    }

    fn serve_api(&mut self, ops: &mut EventOps) {
        let Some(api) = &self.api else { return };
        let _ = api.wake.read();
        let requests: Vec<_> = api.requests.try_iter().collect();
        for request in requests {
            if let VmmAction::CreateSnapshot(params) = &request.action {
                if params.snapshot_type == Some(api::models::SnapshotType::Live) {
                    // Answered by the snapshot's thread once its files are complete.
                    if let Err(e) =
                        self.start_live_snapshot(&request.action, params, request.reply.clone())
                    {
                        let _ = request.reply.send(Err(e));
                    }
                    self.publish_state();
                    continue;
                }
            }
            let result = self.handle(request.action, ops);
            self.publish_state();
            // The API thread may have given up waiting; nothing to do then.
            let _ = request.reply.send(result);
        }
    }

    fn console_input(&mut self, events: Events, ops: &mut EventOps) {
        let mut buf = [0u8; 64];
        match std::io::stdin().lock().read(&mut buf) {
            Ok(0) | Err(_) => {
                // End of input: stop watching it; the guest keeps running.
                let _ = ops.remove(events);
            }
            Ok(n) => {
                if let Some(vmm) = &self.vmm {
                    let taken = vmm
                        .devices()
                        .serial
                        .lock()
                        .expect("poisoned")
                        .enqueue(&buf[..n]);
                    if taken < n {
                        tracing::debug!("serial FIFO full, {} input bytes dropped", n - taken);
                    }
                }
            }
        }
    }
}

/// Confines the VMM thread once a microVM runs here, as Firecracker does: configuring
/// and building it come before, unconfined; everything after runs under the `vmm`
/// filter, which the threads this one starts inherit.
fn confine() {
    static DONE: std::sync::Once = std::sync::Once::new();
    DONE.call_once(|| seccomp::apply(seccomp::Thread::Vmm));
}

/// Probes, once per process and on a thread of its own, the MSRs that saving a vCPU
/// reads (a scratch VM, about 13 ms here), so that no snapshot or migration switch-over
/// pays for it while the guest is paused, nor a migration request while it waits.
fn prepare_saves() {
    static STARTED: std::sync::Once = std::sync::Once::new();
    STARTED.call_once(|| {
        let spawned = std::thread::Builder::new()
            .name("msr-probe".into())
            .spawn(|| {
                seccomp::apply(seccomp::Thread::Vmm);
                if let Ok(host) = crate::vm::host() {
                    crate::vcpu::state::saved_msrs(host);
                }
            });
        if let Err(e) = spawned {
            tracing::warn!("cannot start the MSR probe: {e}");
        }
    });
}

/// Refuses at once a machine this host cannot run (too much memory for the address
/// width, the address space or KVM; too many vCPUs), so that no `InstanceStart` is
/// doomed.
fn check_host_fits(config: &MachineConfig) -> Result<(), ApiError> {
    let host = crate::vm::host().map_err(|e| ApiError::bad_request(e.to_string()))?;
    let vcpus = u8::try_from(config.vcpu_count).unwrap_or(u8::MAX);
    host.check_vcpus(vcpus)
        .and_then(|()| host.check_memory(config.mem_size_mib))
        .map_err(|e| ApiError::bad_request(format!("machine-config: {e}")))
}

/// Readable events, edge-triggered for fds a device reads only while it has room.
fn event_set(edge: bool) -> EventSet {
    if edge {
        EventSet::IN | EventSet::EDGE_TRIGGERED
    } else {
        EventSet::IN
    }
}

/// Watches every device fd of `vmm` (queues and backends).
fn watch_devices(vmm: &Vmm, ops: &mut EventOps) {
    for (fd, edge) in vmm.devices().virtio.fds() {
        if let Err(e) = ops.add(Events::new_raw(fd, event_set(edge))) {
            tracing::error!("cannot watch device fd {fd}: {e:?}");
        }
    }
}

/// Stops watching every device fd of `vmm`.
fn unwatch_devices(vmm: &Vmm, ops: &mut EventOps) {
    for (fd, edge) in vmm.devices().virtio.fds() {
        let _ = ops.remove(Events::new_raw(fd, event_set(edge)));
    }
}

/// Adds each fd to the loop, readable events only.
fn watch(ops: &mut EventOps, fds: impl Iterator<Item = RawFd>) {
    for fd in fds {
        if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
            tracing::error!("cannot watch fd {fd}: {e:?}");
        }
    }
}

impl MutEventSubscriber for Controller {
    fn init(&mut self, ops: &mut EventOps) {
        let api = self.api.as_ref().map(|a| a.wake.as_raw_fd());
        let control = self.control.wake.as_raw_fd();
        watch(ops, [self.stop.as_raw_fd(), control].into_iter().chain(api));
        self.watch_vm(ops);
        self.start_metrics_timer(ops);
        self.publish_state();
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.stop.as_raw_fd() {
            let _ = self.stop.read();
            self.exit = Some(ExitReason::Requested);
        } else if self.api.as_ref().is_some_and(|a| a.wake.as_raw_fd() == fd) {
            self.serve_api(ops);
        } else if fd == self.control.wake.as_raw_fd() {
            self.serve_control(ops);
        } else if self
            .metrics_timer
            .as_ref()
            .is_some_and(|t| t.as_raw_fd() == fd)
        {
            if let Some(timer) = &mut self.metrics_timer {
                let _ = timer.wait();
            }
            if self.flush_metrics() == Some(false) {
                tracing::warn!("metrics: the destination did not take a line");
            }
        } else if fd == libc::STDIN_FILENO {
            self.console_input(events, ops);
        } else if self
            .vmm
            .as_ref()
            .is_some_and(|vmm| vmm.devices().virtio.handle(fd))
        {
            // A device's queue or backend.
        } else if let Some(reason) = self.vmm.as_ref().and_then(Vmm::guest_exit) {
            self.exit = Some(reason);
        }
    }
}

/// How long ferry waits at exit for a live snapshot to be complete.
const LIVE_AT_EXIT: std::time::Duration = std::time::Duration::from_secs(60);

/// Runs the VMM thread's loop until the VM ends (or ferry is told to stop), stops the
/// VM, waits for a live snapshot still being written, and returns why it ended.
pub fn run_until_exit(controller: Controller) -> Result<ExitReason, EventLoopError> {
    let setup = |e: &dyn std::fmt::Debug| EventLoopError::Setup(format!("{e:?}"));
    // Published only for as long as the loop (and so the eventfd) lives: the guard
    // takes it back on every way out, so the handler never writes to a reused fd.
    let _stop_fd = StopFd::publish(controller.stop.as_raw_fd());
    for sig in [libc::SIGINT, libc::SIGTERM] {
        register_signal_handler(sig, handle_stop_signal).map_err(|e| setup(&e))?;
    }
    let mut manager: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> =
        EventManager::new().map_err(|e| setup(&e))?;
    let controller = Arc::new(Mutex::new(controller));
    manager.add_subscriber(controller.clone());
    loop {
        {
            let mut c = controller.lock().expect("poisoned");
            if let Some(reason) = c.exit.take() {
                if let Some(vmm) = c.vmm.as_mut() {
                    vmm.stop();
                }
                // A live snapshot still being written finishes (its thread has its own
                // mapping of guest RAM, which the stopped guest no longer writes), so
                // that no half-written file is left behind.
                if let Some(live) = c.live.as_ref().filter(|l| l.running()) {
                    if !live.wait(LIVE_AT_EXIT) {
                        tracing::error!(
                            "the live snapshot did not finish within {LIVE_AT_EXIT:?}; its .partial files stay"
                        );
                    }
                }
                return Ok(reason);
            }
        }
        if let Err(e) = manager.run() {
            // A stop signal delivered to this thread interrupts epoll_wait.
            tracing::debug!("event loop woke with {e:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The signal handler must never see an fd after the loop that owned it is gone.
    #[test]
    fn test_stop_fd_is_taken_back_when_the_loop_ends() {
        {
            let _published = StopFd::publish(7);
            assert_eq!(STOP_FD.load(Ordering::Acquire), 7);
        }
        assert_eq!(STOP_FD.load(Ordering::Acquire), -1);
    }
}
