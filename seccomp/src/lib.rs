//! seccomp: each of ferry's threads confines itself to the syscalls it makes.
//!
//! `configure` runs once in `main`, before any thread starts: it builds ferry's own
//! filters (or loads a file written by Firecracker's `seccompiler-bin`, or does nothing
//! with `--no-seccomp`) and installs the `SIGSYS` handler. Each thread then calls
//! `apply` with its role when it starts. A syscall outside the filter traps: the
//! handler logs the thread and the syscall and ends the process with status 148, as
//! Firecracker does.
//!
//! Filters stack: a thread keeps the filter of the thread that spawned it and adds its
//! own. So the VMM thread's filter, applied once the microVM runs, allows what the
//! threads it spawns later do before they confine themselves further (see `filters`).
//!
//! Shared state: `FILTERS` is written once by `configure` on the main thread before any
//! other thread exists, and only read afterwards.

use std::cell::Cell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use seccompiler::BpfProgram;

mod filters;
mod names;
mod sigsys;

pub use filters::builtin;

/// A thread's role: which filter it gets. Firecracker's filter files name the first
/// three; a file may also give ferry's own (`console`, `memory`), which otherwise get
/// the `vmm` filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Thread {
    /// The VMM thread, and the migration and snapshot threads it starts.
    Vmm,
    /// The HTTP API thread.
    Api,
    /// Each vCPU.
    Vcpu,
    /// The thread that writes the guest's console out.
    Console,
    /// Threads that move guest pages: fault handlers, dirty tracking, snapshot writers,
    /// post-copy.
    Memory,
}

impl Thread {
    /// Every role.
    pub const ALL: [Thread; 5] = [
        Thread::Vmm,
        Thread::Api,
        Thread::Vcpu,
        Thread::Console,
        Thread::Memory,
    ];

    /// The role's key in a filter file.
    pub fn key(self) -> &'static str {
        match self {
            Thread::Vmm => "vmm",
            Thread::Api => "api",
            Thread::Vcpu => "vcpu",
            Thread::Console => "console",
            Thread::Memory => "memory",
        }
    }

    fn required(self) -> bool {
        matches!(self, Thread::Vmm | Thread::Api | Thread::Vcpu)
    }
}

/// Where the filters come from.
#[derive(Debug, Clone, PartialEq)]
pub enum Policy {
    /// ferry's own (the default).
    Builtin,
    /// None at all (`--no-seccomp`).
    Off,
    /// A file from Firecracker's `seccompiler-bin` (`--seccomp-filter FILE`).
    File(PathBuf),
}

/// Why the filters cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The filter file did not open or read.
    #[error("cannot read the seccomp filter file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The filter file is not what `seccompiler-bin` writes.
    #[error("the seccomp filter file {path} is not a compiled filter map: {reason}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// ferry's own filters did not build (a bug).
    #[error("cannot build ferry's seccomp filters: {0}")]
    Build(#[from] seccompiler::Error),
    /// The `SIGSYS` handler did not install.
    #[error("cannot install the SIGSYS handler: {0}")]
    Handler(std::io::Error),
}

/// Largest filter file taken, as Firecracker's limit.
const MAX_FILE: u64 = 100_000;
/// The kernel's limit on a BPF program's length.
const MAX_INSTRUCTIONS: usize = 4096;

/// `None` inside: seccomp is off.
static FILTERS: OnceLock<Option<HashMap<Thread, BpfProgram>>> = OnceLock::new();
/// Whether the filters came from a user's file, which may lack what ferry's own allow.
static FROM_FILE: OnceLock<bool> = OnceLock::new();

/// Builds or loads the filters and installs the `SIGSYS` handler. Call once, on the
/// main thread, before any thread starts.
pub fn configure(policy: &Policy) -> Result<(), SeccompError> {
    let _ = FROM_FILE.set(matches!(policy, Policy::File(_)));
    let filters = match policy {
        Policy::Off => None,
        Policy::Builtin => Some(builtin()?),
        Policy::File(path) => Some(load(path)?),
    };
    if filters.is_some() {
        sigsys::install().map_err(SeccompError::Handler)?;
        // One malloc arena: glibc's other arenas open /proc/sys/vm/overcommit_memory the
        // first time they shrink, which a confined thread may not do.
        // SAFETY: mallopt only sets an allocator parameter; no thread allocates yet.
        unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
    }
    let _ = FILTERS.set(filters);
    Ok(())
}

/// Whether threads are confined.
pub fn enabled() -> bool {
    FILTERS.get().is_some_and(Option::is_some)
}

/// Whether a thread may set its own scheduling policy: ferry's own `vmm` filter allows
/// it (`sched_setscheduler` on pid 0), and no filter forbids anything; a user's filter
/// file may lack it, and its trap would end ferry.
pub fn allows_own_policy() -> bool {
    !FROM_FILE.get().copied().unwrap_or(false)
}

thread_local! {
    /// The thread's name as the `SIGSYS` handler reports it: copied here so that the
    /// handler needs neither a lock nor the heap.
    static NAME: Cell<[u8; 16]> = const { Cell::new([0; 16]) };
}

/// Records the calling thread's name for the `SIGSYS` handler, for a thread that runs
/// under the filter it inherited (the `vmm` filter of the thread that started it):
/// stacking the same filter again would only make its syscalls slower.
pub fn inherit() {
    if enabled() {
        remember_name();
    }
}

fn remember_name() -> [u8; 16] {
    let mut name = [0u8; 16];
    let current = std::thread::current();
    let given = current.name().unwrap_or("-").as_bytes();
    let n = given.len().min(name.len() - 1);
    name[..n].copy_from_slice(&given[..n]);
    NAME.with(|cell| cell.set(name));
    name
}

/// Confines the calling thread to `thread`'s filter. Nothing happens when seccomp is
/// off or was never configured (the library's own tests). A filter that will not
/// install ends the process: a thread must not run unconfined when the user asked for
/// confinement.
pub fn apply(thread: Thread) {
    let Some(Some(filters)) = FILTERS.get() else {
        return;
    };
    let name = remember_name();
    let program = filters.get(&thread).or_else(|| filters.get(&Thread::Vmm));
    let Some(program) = program.filter(|p| !p.is_empty()) else {
        return;
    };
    if let Err(e) = seccompiler::apply_filter(program) {
        let mut line = logger::Line::start(thread_name(&name), logger::Level::Error, None);
        let _ = std::fmt::Write::write_fmt(
            &mut line,
            format_args!("cannot apply the {} seccomp filter: {e}", thread.key()),
        );
        line.finish();
        // SAFETY: ends the process; nothing is left to clean up that the kernel doesn't.
        unsafe { libc::_exit(1) };
    }
}

fn thread_name(raw: &[u8; 16]) -> &str {
    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    std::str::from_utf8(&raw[..end]).unwrap_or("-")
}

/// Reads a filter map as Firecracker's `seccompiler-bin` writes it: a map of thread
/// category to BPF instructions, each a u64 in little-endian `sock_filter` layout.
/// Firecracker up to 1.14 encodes it with bincode and fixed integers (a u64 count of
/// entries; per entry a u64-prefixed name and a u64-prefixed list); from 1.15 with
/// bitcode. Both are taken: bincode first, whose exact layout a bitcode file fails.
fn load(path: &Path) -> Result<HashMap<Thread, BpfProgram>, SeccompError> {
    use bincode::Options;
    use std::io::Read;

    let read = |source| SeccompError::Read {
        path: path.to_path_buf(),
        source,
    };
    let bad = |reason: String| SeccompError::Format {
        path: path.to_path_buf(),
        reason,
    };
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .map_err(read)?
        .take(MAX_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(read)?;
    if bytes.len() as u64 > MAX_FILE {
        return Err(bad(format!("it is larger than {MAX_FILE} bytes")));
    }
    let raw: HashMap<String, Vec<u64>> = match bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .with_little_endian()
        .with_limit(MAX_FILE)
        .deserialize(&bytes)
    {
        Ok(map) => map,
        Err(bincode_error) => bitcode::deserialize(&bytes).map_err(|bitcode_error| {
            bad(format!(
                "as Firecracker 1.14's bincode: {bincode_error}; as 1.15's bitcode: {bitcode_error}"
            ))
        })?,
    };
    let mut unknown: Vec<String> = Vec::new();
    let mut map = HashMap::new();
    for (key, code) in raw {
        let key = key.to_ascii_lowercase();
        let Some(thread) = Thread::ALL.into_iter().find(|t| t.key() == key) else {
            unknown.push(key);
            continue;
        };
        if code.len() > MAX_INSTRUCTIONS {
            return Err(bad(format!(
                "the {key} filter has {} instructions; the kernel takes at most {MAX_INSTRUCTIONS}",
                code.len()
            )));
        }
        map.insert(thread, code.into_iter().map(instruction).collect());
    }
    if !unknown.is_empty() {
        unknown.sort();
        let ours: Vec<&str> = Thread::ALL.iter().map(|t| t.key()).collect();
        return Err(bad(format!(
            "unknown thread categories: {} (ferry's are {})",
            unknown.join(", "),
            ours.join(", ")
        )));
    }
    if let Some(missing) = Thread::ALL
        .into_iter()
        .find(|t| t.required() && !map.contains_key(t))
    {
        return Err(bad(format!("no filter for the {} threads", missing.key())));
    }
    Ok(map)
}

/// One BPF instruction from its 8 little-endian bytes (`struct sock_filter`).
fn instruction(raw: u64) -> seccompiler::sock_filter {
    let b = raw.to_le_bytes();
    seccompiler::sock_filter {
        code: u16::from_le_bytes([b[0], b[1]]),
        jt: b[2],
        jf: b[3],
        k: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes a filter map in `seccompiler-bin`'s layout, by hand, from the layout its
    /// documentation gives (not through bincode, which the loader uses).
    fn encode(map: &[(&str, &[u64])]) -> Vec<u8> {
        let mut out = (map.len() as u64).to_le_bytes().to_vec();
        for (key, code) in map {
            out.extend((key.len() as u64).to_le_bytes());
            out.extend(key.as_bytes());
            out.extend((code.len() as u64).to_le_bytes());
            for i in *code {
                out.extend(i.to_le_bytes());
            }
        }
        out
    }

    fn load_bytes(bytes: &[u8]) -> Result<HashMap<Thread, BpfProgram>, String> {
        let dir = std::env::temp_dir().join(format!("ferry-seccomp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join(format!("f{}", bytes.len()));
        std::fs::write(&path, bytes).expect("write");
        let result = load(&path).map_err(|e| e.to_string());
        let _ = std::fs::remove_file(&path);
        result
    }

    /// `BPF_RET | BPF_K` with `SECCOMP_RET_ALLOW`.
    const ALLOW: u64 = 0x06 | (0x7fff_0000 << 32);

    #[test]
    fn a_firecracker_filter_file_loads() {
        let map = load_bytes(&encode(&[
            ("vmm", &[ALLOW]),
            ("API", &[ALLOW]),
            ("vcpu", &[]),
        ]))
        .expect("loads");
        assert_eq!(map[&Thread::Api].len(), 1);
        assert_eq!(map[&Thread::Api][0].code, 0x06);
        assert_eq!(map[&Thread::Api][0].k, 0x7fff_0000);
        assert!(map[&Thread::Vcpu].is_empty());
    }

    #[test]
    fn a_firecracker_1_15_bitcode_filter_file_loads() {
        // What seccompiler-bin 1.15 and later write: bitcode of a map of category to
        // instructions (`bitcode::serialize(&BTreeMap<String, Vec<u64>>)`).
        let map: std::collections::BTreeMap<String, Vec<u64>> = [
            ("vmm".to_string(), vec![ALLOW]),
            ("api".to_string(), vec![ALLOW, ALLOW]),
            ("vcpu".to_string(), vec![]),
        ]
        .into_iter()
        .collect();
        let bytes = bitcode::serialize(&map).expect("encode");
        let loaded = load_bytes(&bytes).expect("loads");
        assert_eq!(loaded[&Thread::Api].len(), 2);
        assert_eq!(loaded[&Thread::Vmm][0].k, 0x7fff_0000);
        assert!(loaded[&Thread::Vcpu].is_empty());
    }

    #[test]
    fn bad_filter_files_are_refused_with_the_reason() {
        let missing = load_bytes(&encode(&[("vmm", &[ALLOW]), ("api", &[ALLOW])]));
        assert!(missing
            .unwrap_err()
            .ends_with("no filter for the vcpu threads"));
        let unknown = load_bytes(&encode(&[
            ("vmm", &[ALLOW]),
            ("api", &[ALLOW]),
            ("vcpu", &[ALLOW]),
            ("gpu", &[ALLOW]),
        ]));
        assert!(unknown
            .unwrap_err()
            .contains("unknown thread categories: gpu"));
        let long = vec![ALLOW; MAX_INSTRUCTIONS + 1];
        let too_long = load_bytes(&encode(&[("vmm", &long), ("api", &[]), ("vcpu", &[])]));
        assert!(too_long.unwrap_err().contains("4097 instructions"));
        let mut cut = encode(&[("vmm", &[ALLOW]), ("api", &[ALLOW]), ("vcpu", &[ALLOW])]);
        cut.truncate(cut.len() - 3);
        assert!(load_bytes(&cut)
            .unwrap_err()
            .contains("not a compiled filter map"));
        // A length prefix far beyond the file is refused, not allocated.
        let mut huge = 1u64.to_le_bytes().to_vec();
        huge.extend(u64::MAX.to_le_bytes());
        assert!(load_bytes(&huge).is_err());
        assert!(load_bytes(&vec![0; 100_001])
            .unwrap_err()
            .contains("larger than 100000 bytes"));
    }

    /// Runs in a child process of its own (a filter cannot be taken back): a thread
    /// confined as a vCPU opens a socket and the process ends, saying so.
    #[test]
    fn a_forbidden_syscall_ends_the_process_naming_thread_and_syscall() {
        const NAME: &str = "tests::a_forbidden_syscall_ends_the_process_naming_thread_and_syscall";
        if std::env::var_os("FERRY_SECCOMP_CHILD").is_some() {
            configure(&Policy::Builtin).expect("configure");
            let thread = std::thread::Builder::new()
                .name("vcpu0".into())
                .spawn(|| {
                    apply(Thread::Vcpu);
                    // What the filter allows still works.
                    assert!(
                        std::io::Write::write_all(&mut std::io::stderr(), b"confined\n").is_ok()
                    );
                    // SAFETY: socket(2) with constant arguments; the filter traps it.
                    unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
                })
                .expect("spawn");
            let _ = thread.join();
            return;
        }
        let stderr = trapped_in_child(NAME);
        assert!(stderr.contains("confined\n"), "{stderr}");
        assert!(
            stderr.contains(
                "[anonymous-instance:vcpu0] Shutting down VM after intercepting a bad syscall (41: socket) on thread vcpu0"
            ),
            "{stderr}"
        );
    }

    /// Runs the test `name` again in a child process with `var` set (a filter cannot
    /// be taken back, nor `configure` done twice); returns how it ended and its stderr.
    fn in_child(name: &str, var: (&str, &str)) -> (Option<i32>, String) {
        let out = std::process::Command::new(std::env::current_exe().expect("test binary"))
            .args(["--exact", name, "--nocapture", "--test-threads", "1"])
            .env(var.0, var.1)
            .output()
            .expect("run the child");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Runs the test `name` again in a child process, which must end trapped; returns
    /// its stderr.
    fn trapped_in_child(name: &str) -> String {
        let (status, stderr) = in_child(name, ("FERRY_SECCOMP_CHILD", "1"));
        assert_eq!(status, Some(sigsys::BAD_SYSCALL_STATUS), "{stderr}");
        stderr
    }

    /// A thread under the `vmm` filter may change its own scheduling policy (a
    /// post-copy fault thread does) and no other thread's.
    #[test]
    fn a_thread_may_set_its_own_scheduling_policy_only() {
        const NAME: &str = "tests::a_thread_may_set_its_own_scheduling_policy_only";
        if std::env::var_os("FERRY_SECCOMP_CHILD").is_some() {
            configure(&Policy::Builtin).expect("configure");
            // SAFETY: getpid(2) has no arguments.
            let main = unsafe { libc::getpid() };
            let thread = std::thread::Builder::new()
                .name("migration-recv".into())
                .spawn(move || {
                    apply(Thread::Vmm);
                    let param = libc::sched_param { sched_priority: 0 };
                    // SAFETY: sets this thread's own policy to the default one;
                    // `param` lives across the call.
                    let own = unsafe { libc::sched_setscheduler(0, libc::SCHED_OTHER, &param) };
                    eprintln!("own policy set: {own}");
                    // SAFETY: as above, for the main thread; the filter traps it.
                    unsafe { libc::sched_setscheduler(main, libc::SCHED_OTHER, &param) };
                })
                .expect("spawn");
            let _ = thread.join();
            return;
        }
        let stderr = trapped_in_child(NAME);
        assert!(stderr.contains("own policy set: 0\n"), "{stderr}");
        assert!(
            stderr.contains("bad syscall (144: sched_setscheduler) on thread migration-recv"),
            "{stderr}"
        );
    }

    /// Under a user's filter file, which may lack `sched_setscheduler`, ferry does not
    /// ask for it; under its own filters or none, it may. (In a child: `configure`
    /// holds for the process.)
    #[test]
    fn only_ferrys_own_filters_let_a_thread_set_its_policy() {
        const NAME: &str = "tests::only_ferrys_own_filters_let_a_thread_set_its_policy";
        if let Some(policy) = std::env::var_os("FERRY_SECCOMP_POLICY") {
            let path = std::env::temp_dir().join(format!("ferry-policy-{}", std::process::id()));
            std::fs::write(
                &path,
                encode(&[("vmm", &[ALLOW]), ("api", &[ALLOW]), ("vcpu", &[ALLOW])]),
            )
            .expect("write");
            let policy = match policy.to_str() {
                Some("file") => Policy::File(path.clone()),
                Some("off") => Policy::Off,
                _ => Policy::Builtin,
            };
            configure(&policy).expect("configure");
            let _ = std::fs::remove_file(&path);
            eprintln!("allows own policy: {}", allows_own_policy());
            return;
        }
        for (policy, allows) in [("file", false), ("off", true), ("builtin", true)] {
            let (_, stderr) = in_child(NAME, ("FERRY_SECCOMP_POLICY", policy));
            assert!(
                stderr.contains(&format!("allows own policy: {allows}\n")),
                "{policy}: {stderr}"
            );
        }
    }

    #[test]
    fn ferrys_own_filters_build_for_every_thread() {
        let map = builtin().expect("builds");
        for thread in Thread::ALL {
            let program = &map[&thread];
            assert!(!program.is_empty() && program.len() <= MAX_INSTRUCTIONS);
        }
    }
}
