//! livemig lab: starts test VMs (QEMU, TCG) running the guest built by `guest/build.sh`.
//!
//! The guest prints machine-readable lines on its serial console (see `guest/README.md`):
//! `LIVEMIG-BOOT ok`, `LIVEMIG-READY ...`, `LIVEMIG-VERIFY ...`, `LIVEMIG-BAD ...`,
//! `LIVEMIG-HEARTBEAT ...`, `LIVEMIG-CACHE ...`. [`Vm`] gives access to the console log and
//! parses them.
//!
//! Files of a VM go to `<run_dir>/<name>.qmp.sock`, `<name>.console.log`, `<name>.qemu.log`,
//! so a migration source and destination can share a run dir if their names differ.

use std::fmt;
use std::fs;
use std::io;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub mod ram;
use serde::{Deserialize, Serialize};

mod disk;
pub use disk::{file_contents, DataDisk, DiskCheck, DiskFormat, DATA_DISK_SERIAL};

/// Errors of the lab.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("test guest not built: {missing} not found in {dir} (run `guest/build.sh`)")]
    NotBuilt { dir: PathBuf, missing: String },
    #[error("guest/build.sh ({script}) failed with {status}:\n{output}")]
    BuildFailed { script: PathBuf, status: String, output: String },
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("invalid VM configuration: {0}")]
    Config(String),
    #[error("QEMU ({name}) exited with {status} while {waiting}\nqemu.log:\n{qemu_log}\nconsole (last lines):\n{console}")]
    QemuExited { name: String, status: String, waiting: String, qemu_log: String, console: String },
    #[error("timeout after {secs:.1} s waiting for {what} ({name})\nconsole (last lines):\n{console}")]
    Timeout { name: String, what: String, secs: f64, console: String },
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> LabError {
    let context = context.into();
    move |source| LabError::Io { context, source }
}

/// Cache dir of the built guest: `$LIVEMIG_CACHE/guest` or `$HOME/.cache/livemig/guest`
/// (the same rule as `guest/build.sh`).
/// The machine's VM lock, `$TMPDIR/livemig-vm-tests.lock`: a pair of TCG guests takes both cores
/// of this machine, so the VM tests and the benchmarks take turns instead of starving each other's
/// guests (and a benchmark's figures mean something only on an otherwise idle machine). Held until
/// the returned file is dropped. `waiting` is called once if another process holds it.
pub fn machine_lock(waiting: impl FnOnce(&Path)) -> Result<fs::File, LabError> {
    let path = std::env::temp_dir().join("livemig-vm-tests.lock");
    let io = |source| LabError::Io { context: format!("cannot lock {}", path.display()), source };
    let file = fs::File::options().create(true).truncate(false).write(true).open(&path).map_err(io)?;
    match file.try_lock() {
        Ok(()) => return Ok(file),
        Err(fs::TryLockError::WouldBlock) => waiting(&path),
        Err(fs::TryLockError::Error(e)) => return Err(io(e)),
    }
    file.lock().map_err(io)?;
    Ok(file)
}

pub fn guest_cache_dir() -> PathBuf {
    match std::env::var_os("LIVEMIG_CACHE") {
        Some(c) if !c.is_empty() => PathBuf::from(c).join("guest"),
        _ => {
            let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
            home.join(".cache/livemig/guest")
        }
    }
}

/// Path of `guest/build.sh`: `$LIVEMIG_GUEST_SCRIPT`, else relative to this crate's source.
pub fn guest_build_script() -> PathBuf {
    match std::env::var_os("LIVEMIG_GUEST_SCRIPT") {
        Some(s) if !s.is_empty() => PathBuf::from(s),
        _ => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../guest/build.sh"),
    }
}

/// The contents of `manifest.json` written by `guest/build.sh`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub kernel_package: String,
    pub kernel_package_version: String,
    pub kernel_version: String,
    pub inputs_hash: String,
    pub files: std::collections::BTreeMap<String, u64>,
    #[serde(default)]
    pub root_dirs: String,
}

/// Kernel, initramfs and root disk of the test guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestImage {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub disk: PathBuf,
}

static BUILD_LOCK: Mutex<()> = Mutex::new(());

impl GuestImage {
    /// Finds the built guest in the cache dir; error telling to run `guest/build.sh` if absent.
    pub fn find() -> Result<GuestImage, LabError> {
        let dir = guest_cache_dir();
        let img = GuestImage {
            kernel: dir.join("vmlinuz"),
            initrd: dir.join("initramfs.img"),
            disk: dir.join("root.raw"),
        };
        for p in [&img.kernel, &img.initrd, &img.disk] {
            if !p.is_file() {
                return Err(LabError::NotBuilt {
                    dir: dir.clone(),
                    missing: p.file_name().unwrap_or_default().to_string_lossy().into_owned(),
                });
            }
        }
        Ok(img)
    }

    /// Runs `guest/build.sh` (idempotent, quick when up to date), then [`GuestImage::find`].
    /// With `LIVEMIG_GUEST_PREBUILT=1` (the KVM lane's L1 host, which has the guest but no
    /// build tools) only [`GuestImage::find`].
    pub fn build() -> Result<GuestImage, LabError> {
        if std::env::var_os("LIVEMIG_GUEST_PREBUILT").is_some_and(|v| v == "1") {
            return GuestImage::find();
        }
        let _g = BUILD_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let script = guest_build_script();
        let out = Command::new("bash")
            .arg(&script)
            .stdin(Stdio::null())
            .output()
            .map_err(io_err(format!("running {}", script.display())))?;
        if !out.status.success() {
            let mut output = String::from_utf8_lossy(&out.stdout).into_owned();
            output.push_str(&String::from_utf8_lossy(&out.stderr));
            return Err(LabError::BuildFailed { script, status: out.status.to_string(), output: tail(&output, 40) });
        }
        GuestImage::find()
    }

    /// The build manifest next to the kernel, if readable.
    pub fn manifest(&self) -> Option<Manifest> {
        let p = self.kernel.parent()?.join("manifest.json");
        serde_json::from_slice(&fs::read(p).ok()?).ok()
    }
}

/// `$LIVEMIG_QEMU`, else `qemu-system-x86_64` (on the PATH).
pub fn default_qemu() -> PathBuf {
    std::env::var_os("LIVEMIG_QEMU").filter(|q| !q.is_empty()).map_or_else(|| "qemu-system-x86_64".into(), PathBuf::from)
}

/// QEMU 7.2 beside the system's QEMU: the wrapper `guest/build.sh` makes in
/// `$LIVEMIG_CACHE/qemu-7.2/qemu-system-x86_64` (Debian bookworm's packages, unpacked). Error if
/// it is missing (run `guest/build.sh`).
pub fn qemu_7_2() -> Result<PathBuf, LabError> {
    let dir = guest_cache_dir().parent().map_or_else(|| PathBuf::from("."), Path::to_path_buf).join("qemu-7.2");
    let bin = dir.join("qemu-system-x86_64");
    if bin.is_file() {
        Ok(bin)
    } else {
        Err(LabError::NotBuilt { dir, missing: "qemu-system-x86_64 (QEMU 7.2)".into() })
    }
}

/// Where the guest RAM lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RamBackend {
    /// `memory-backend-file,share=on,mem-path=/dev/shm/livemig-<name>-<pid>-<n>.ram`: a named
    /// shared file the lab makes up and removes when the [`Vm`] is dropped. The default: it works
    /// with every supported QEMU (since QEMU 8.1 `x-ignore-shared` skips only RAM backed by a
    /// named file, see `../shared/FACTS.md`).
    ShmFile,
    /// `memory-backend-memfd,share=on` (QEMU < 8.1 only for the shared engine).
    Memfd,
    /// `memory-backend-file,share=on,mem-path=<path>`
    File(PathBuf),
    /// Plain `-m`: no shared memory (for error tests).
    Anonymous,
}

/// How QEMU runs the guest's code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// Software emulation (`-accel tcg -cpu max`): what this machine can run.
    Tcg,
    /// Hardware virtualisation (`-accel kvm -cpu host`): the KVM lane (`lane/run`), where the
    /// L1 host has a real kvm-amd.
    Kvm,
}

impl Accel {
    /// `$LIVEMIG_ACCEL` (`tcg` or `kvm`; the KVM lane sets `kvm`), else TCG.
    pub fn from_env() -> Result<Accel, LabError> {
        match std::env::var("LIVEMIG_ACCEL").as_deref() {
            Err(_) | Ok("") | Ok("tcg") => Ok(Accel::Tcg),
            Ok("kvm") => Ok(Accel::Kvm),
            Ok(other) => Err(LabError::Config(format!("LIVEMIG_ACCEL={other:?}: expected tcg or kvm"))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Accel::Tcg => "tcg",
            Accel::Kvm => "kvm",
        }
    }

    fn cpu(self) -> &'static str {
        match self {
            Accel::Tcg => "max",
            // No nested virtualisation inside the test guests: with it, QEMU migrates the
            // vCPUs' nested state, and in the lane (KVM inside an L1 that TCG emulates) the
            // destination's KVM_SET_NESTED_STATE failed now and then ("Failed to set nested
            // state: Invalid argument"), so its QEMU exited while loading the device state.
            Accel::Kvm => "host,-svm,-vmx",
        }
    }
}

/// Configuration of one test VM.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Used in file names (`<run_dir>/<name>.console.log` ...) and as QEMU's `-name`.
    pub name: String,
    pub mem_mib: u64,
    pub backend: RamBackend,
    /// Adds `-incoming defer -S`.
    pub incoming: bool,
    /// `lm.KEY=VALUE` kernel parameters, e.g. `("mode", "dirty")`.
    pub workload: Vec<(String, String)>,
    /// Attach the root disk read-only as virtio `/dev/vda`.
    pub with_disk: bool,
    /// Where qmp.sock, console.log and qemu.log go (created if missing).
    pub run_dir: PathBuf,
    /// Extra QEMU arguments (appended; keep source and destination identical).
    pub extra_qemu_args: Vec<String>,
    /// TCG, or KVM in the KVM lane. [`VmConfig::new`] takes it from `$LIVEMIG_ACCEL`.
    pub accel: Accel,
    /// The QEMU binary (`None`: `$LIVEMIG_QEMU`, else `qemu-system-x86_64` on the PATH); e.g.
    /// [`qemu_7_2`] for the tests that cover QEMU 7.2.
    pub qemu: Option<PathBuf>,
    /// A writable data disk (the same image for the source and its destination: shared
    /// storage). Needs the root disk ([`VmConfig::with_disk`]) so that it is not `/dev/vda`,
    /// which the guest's init mounts read-only.
    pub data_disk: Option<DataDisk>,
}

impl VmConfig {
    /// Defaults: 512 MiB, a shared file on /dev/shm ([`RamBackend::ShmFile`]), not incoming,
    /// heartbeat workload, with disk, QEMU from `$LIVEMIG_QEMU` or `qemu-system-x86_64`.
    pub fn new(name: impl Into<String>, run_dir: impl Into<PathBuf>) -> VmConfig {
        VmConfig {
            name: name.into(),
            mem_mib: 512,
            backend: RamBackend::ShmFile,
            incoming: false,
            workload: Vec::new(),
            with_disk: true,
            run_dir: run_dir.into(),
            extra_qemu_args: Vec::new(),
            // A bad value is reported by qemu_args (Vm::start), not here.
            accel: Accel::from_env().unwrap_or(Accel::Tcg),
            qemu: None,
            data_disk: None,
        }
    }

    /// The QEMU binary this VM runs: [`VmConfig::qemu`], else `$LIVEMIG_QEMU`, else
    /// `qemu-system-x86_64`.
    pub fn qemu_binary(&self) -> PathBuf {
        self.qemu.clone().unwrap_or_else(default_qemu)
    }

    /// A new RAM file path for a [`RamBackend::ShmFile`] VM, unique per VM start: a restarted
    /// destination never finds the memory of the QEMU before it.
    fn new_shm_ram_path(&self) -> PathBuf {
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        PathBuf::from(format!("/dev/shm/livemig-{}-{}-{n}.ram", self.name, std::process::id()))
    }

    /// Adds one `lm.KEY=VALUE` parameter (builder style).
    pub fn param(mut self, key: &str, value: impl fmt::Display) -> VmConfig {
        self.workload.push((key.to_string(), value.to_string()));
        self
    }

    /// The same configuration as an incoming (destination) VM named `name`.
    pub fn as_incoming(&self, name: impl Into<String>) -> VmConfig {
        VmConfig { name: name.into(), incoming: true, ..self.clone() }
    }

    pub fn qmp_path(&self) -> PathBuf {
        self.run_dir.join(format!("{}.qmp.sock", self.name))
    }
    /// A second QMP monitor, for tests that watch a VM while livemig holds the first one.
    pub fn observer_qmp_path(&self) -> PathBuf {
        self.run_dir.join(format!("{}.qmp2.sock", self.name))
    }
    pub fn console_path(&self) -> PathBuf {
        self.run_dir.join(format!("{}.console.log", self.name))
    }
    pub fn qemu_log_path(&self) -> PathBuf {
        self.run_dir.join(format!("{}.qemu.log", self.name))
    }

    /// Kernel command line.
    pub fn append(&self) -> String {
        let mut s = String::from("console=ttyS0 quiet panic=-1");
        for (k, v) in &self.workload {
            s.push_str(&format!(" lm.{k}={v}"));
        }
        s
    }

    /// The full QEMU argument list (without the program name).
    pub fn qemu_args(&self, image: &GuestImage) -> Result<Vec<String>, LabError> {
        if self.name.is_empty() || self.name.contains(['/', ' ', ',']) {
            return Err(LabError::Config(format!("bad VM name {:?}", self.name)));
        }
        for (k, v) in &self.workload {
            if k.is_empty() || k.contains(char::is_whitespace) || k.contains('=') || v.contains(char::is_whitespace) || v.contains('"') {
                return Err(LabError::Config(format!("bad workload parameter {k:?}={v:?}")));
            }
        }
        if self.mem_mib == 0 {
            return Err(LabError::Config("mem_mib is 0".into()));
        }
        let qmp = self.qmp_path();
        let observer = self.observer_qmp_path();
        if observer.as_os_str().len() >= 108 {
            return Err(LabError::Config(format!("QMP socket path too long for a unix socket: {}", observer.display())));
        }
        let p = |p: &Path| p.to_string_lossy().into_owned();
        let m = self.mem_mib;
        Accel::from_env()?;
        let mut a: Vec<String> = vec!["-name".into(), self.name.clone(), "-accel".into(), self.accel.name().into()];
        match &self.backend {
            RamBackend::Memfd => a.extend([
                "-machine".into(),
                "q35,memory-backend=mem0".into(),
                "-m".into(),
                format!("{m}M"),
                "-object".into(),
                format!("memory-backend-memfd,id=mem0,size={m}M,share=on"),
            ]),
            RamBackend::File(_) | RamBackend::ShmFile => {
                let path = match &self.backend {
                    RamBackend::File(path) => path.clone(),
                    // Vm::start turns ShmFile into File before it gets here.
                    _ => PathBuf::from(format!("/dev/shm/livemig-{}.ram", self.name)),
                };
                let ps = p(&path);
                if ps.contains(',') {
                    return Err(LabError::Config(format!("memory file path contains ',': {ps}")));
                }
                a.extend([
                    "-machine".into(),
                    "q35,memory-backend=mem0".into(),
                    "-m".into(),
                    format!("{m}M"),
                    "-object".into(),
                    format!("memory-backend-file,id=mem0,size={m}M,mem-path={ps},share=on"),
                ]);
            }
            RamBackend::Anonymous => a.extend(["-machine".into(), "q35".into(), "-m".into(), format!("{m}M")]),
        }
        a.extend(
            [
                "-nodefaults", "-vga", "none", "-display", "none", "-no-user-config", "-cpu", self.accel.cpu(), "-smp",
                "1", "-no-reboot",
            ]
            .map(String::from),
        );
        a.extend([
            "-chardev".into(),
            format!("file,id=con0,path={}", p(&self.console_path())),
            "-serial".into(),
            "chardev:con0".into(),
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", p(&qmp)),
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", p(&observer)),
            "-kernel".into(),
            p(&image.kernel),
            "-initrd".into(),
            p(&image.initrd),
            "-append".into(),
            self.append(),
        ]);
        if self.with_disk {
            // A `.qcow2` root (e.g. root.qcow2 over its backing file) as qcow2, else raw.
            let format = if image.disk.extension().is_some_and(|e| e == "qcow2") { "qcow2" } else { "raw" };
            a.extend(["-drive".into(), format!("file={},format={format},if=virtio,readonly=on", p(&image.disk))]);
        }
        if let Some(d) = &self.data_disk {
            if !self.with_disk {
                return Err(LabError::Config("a data disk needs the root disk (with_disk)".into()));
            }
            a.extend(d.qemu_args());
        }
        if self.incoming {
            a.extend(["-incoming".into(), "defer".into(), "-S".into()]);
        }
        a.extend(self.extra_qemu_args.iter().cloned());
        Ok(a)
    }
}

/// One parsed `LIVEMIG-VERIFY pass=<n> pages=<count> bad=<count> writes=<n>` line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyLine {
    pub pass: u64,
    pub pages: u64,
    pub bad: u64,
    pub writes: u64,
}

impl VerifyLine {
    /// Parses a console line; `None` if it is not a well-formed `LIVEMIG-VERIFY` line.
    pub fn parse(line: &str) -> Option<VerifyLine> {
        let rest = line.trim_end().strip_prefix("LIVEMIG-VERIFY ")?;
        let get = |k: &str| kv(rest, k).and_then(|v| v.parse::<u64>().ok());
        Some(VerifyLine { pass: get("pass")?, pages: get("pages")?, bad: get("bad")?, writes: get("writes")? })
    }
}

/// Value of `key=value` in a space-separated line.
pub fn kv<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace().find_map(|w| w.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A running QEMU process. Dropping it kills QEMU (SIGKILL) and reaps it.
#[derive(Debug)]
pub struct Vm {
    name: String,
    child: Mutex<Child>,
    pid: u32,
    qmp: PathBuf,
    console: PathBuf,
    qemu_log: PathBuf,
    args: Vec<String>,
    /// A run directory the VM owns (paused test VMs); removed after QEMU is killed.
    private_dir: Option<tempfile::TempDir>,
    /// The RAM file of a [`RamBackend::ShmFile`] VM; removed after QEMU is killed.
    ram_file: Option<PathBuf>,
}

const QEMU_START_TIMEOUT: Duration = Duration::from_secs(60);

impl Vm {
    /// Starts QEMU; returns when its QMP socket accepts connections.
    /// The QEMU binary is [`VmConfig::qemu_binary`].
    pub fn start(image: &GuestImage, cfg: &VmConfig) -> Result<Vm, LabError> {
        Self::start_wrapped(image, cfg, &[])
    }

    /// Like [`Vm::start`], but runs QEMU under a command prefix that ends by exec'ing its
    /// arguments, e.g. `["ip", "netns", "exec", "NS"]` to start it in a network namespace.
    /// [`Vm::pid`] is then the pid of the prefix's first process, which is QEMU's own pid for a
    /// prefix that execs (as `ip netns exec`, `nice`, `taskset` do).
    pub fn start_wrapped(image: &GuestImage, cfg: &VmConfig, prefix: &[String]) -> Result<Vm, LabError> {
        let mut cfg = cfg.clone();
        let ram_file = (cfg.backend == RamBackend::ShmFile).then(|| cfg.new_shm_ram_path());
        if let Some(f) = &ram_file {
            cfg.backend = RamBackend::File(f.clone());
        }
        let args = cfg.qemu_args(image)?;
        let mut vm = Self::spawn(&cfg, args, prefix);
        match &mut vm {
            Ok(vm) => vm.ram_file = ram_file,
            Err(_) => {
                if let Some(f) = ram_file {
                    let _ = fs::remove_file(f);
                }
            }
        }
        vm
    }

    /// Starts a QEMU that runs no guest code (`-S`, no kernel): `-accel tcg -S -nodefaults
    /// -display none`, its QMP socket in a private run directory (removed with the VM), then
    /// `args`. For tests of QMP and of guest memory access, which need a real QEMU but no guest.
    pub fn start_paused(name: &str, args: &[&str]) -> Result<Vm, LabError> {
        let dir = tempfile::Builder::new()
            .prefix("livemig-qemu-")
            .tempdir()
            .map_err(io_err("creating a run directory"))?;
        let cfg = VmConfig::new(name, dir.path());
        let mut all: Vec<String> = ["-accel", "tcg", "-S", "-nodefaults", "-display", "none", "-qmp"]
            .into_iter()
            .map(String::from)
            .collect();
        all.push(format!("unix:{},server=on,wait=off", cfg.qmp_path().display()));
        all.extend(args.iter().map(|a| (*a).to_string()));
        let mut vm = Self::spawn(&cfg, all, &[])?;
        vm.private_dir = Some(dir);
        Ok(vm)
    }

    /// Spawns QEMU with `args` (which must put its QMP socket at `cfg.qmp_path()`) and waits
    /// until the socket accepts connections; with a non-empty `prefix`, runs `prefix... qemu args...`.
    fn spawn(cfg: &VmConfig, args: Vec<String>, prefix: &[String]) -> Result<Vm, LabError> {
        fs::create_dir_all(&cfg.run_dir).map_err(io_err(format!("creating {}", cfg.run_dir.display())))?;
        let qmp = cfg.qmp_path();
        let console = cfg.console_path();
        let qemu_log = cfg.qemu_log_path();
        for f in [&qmp, &console] {
            match fs::remove_file(f) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(format!("removing {}", f.display()))(e)),
            }
        }
        let log = fs::File::create(&qemu_log).map_err(io_err(format!("creating {}", qemu_log.display())))?;
        let log2 = log.try_clone().map_err(io_err("dup qemu.log"))?;
        let qemu = cfg.qemu_binary();
        let mut cmd = match prefix.split_first() {
            Some((prog, rest)) => {
                let mut c = Command::new(prog);
                c.args(rest).arg(&qemu);
                c
            }
            None => Command::new(&qemu),
        };
        let child = cmd
            .args(&args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(io_err(format!("starting {}", PathBuf::from(&qemu).display())))?;
        let vm = Vm {
            name: cfg.name.clone(),
            pid: child.id(),
            child: Mutex::new(child),
            qmp,
            console,
            qemu_log,
            args,
            private_dir: None,
            ram_file: None,
        };
        let t0 = Instant::now();
        loop {
            if let Some(st) = vm.exit_status() {
                return Err(vm.exited_error(st, "waiting for the QMP socket"));
            }
            if vm.qmp.exists() && UnixStream::connect(&vm.qmp).is_ok() {
                return Ok(vm);
            }
            if t0.elapsed() > QEMU_START_TIMEOUT {
                return Err(vm.timeout_error("the QMP socket", t0.elapsed()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn qmp_path(&self) -> &Path {
        &self.qmp
    }
    /// The second QMP monitor of a VM started from a [`VmConfig`] (see
    /// [`VmConfig::observer_qmp_path`]): free while livemig holds the first.
    pub fn observer_qmp_path(&self) -> PathBuf {
        self.qmp.with_file_name(format!("{}.qmp2.sock", self.name))
    }
    pub fn console_path(&self) -> &Path {
        &self.console
    }
    pub fn qemu_log_path(&self) -> &Path {
        &self.qemu_log
    }
    pub fn pid(&self) -> u32 {
        self.pid
    }
    /// The QEMU arguments this VM was started with.
    pub fn args(&self) -> &[String] {
        &self.args
    }

    /// Whole console log so far (lossy UTF-8, "\r\n" turned into "\n").
    pub fn console(&self) -> String {
        fs::read(&self.console)
            .map(|b| String::from_utf8_lossy(&b).replace("\r\n", "\n"))
            .unwrap_or_default()
    }

    /// Current length in bytes of the console log: a mark for [`Vm::wait_console_from`].
    pub fn console_mark(&self) -> usize {
        fs::metadata(&self.console).map_or(0, |m| usize::try_from(m.len()).unwrap_or(usize::MAX))
    }

    pub fn qemu_log(&self) -> String {
        fs::read(&self.qemu_log).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default()
    }

    /// Waits until a complete console line satisfies `pred`; returns that line (without the
    /// line ending). Looks at the whole log, also at lines printed before the call. Error on
    /// timeout or if QEMU exited (with the last console lines).
    pub fn wait_console(&self, timeout: Duration, pred: impl Fn(&str) -> bool) -> Result<String, LabError> {
        let mut mark = 0;
        self.wait_console_from(&mut mark, timeout, pred)
    }

    /// Like [`Vm::wait_console`] but only looks at lines starting at byte offset `*mark` of
    /// the console log or later, and on success moves `*mark` past the returned line. Start
    /// with [`Vm::console_mark`] to wait for lines printed from now on; call repeatedly with
    /// `|_| true` to read the console line by line.
    pub fn wait_console_from(
        &self,
        mark: &mut usize,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Result<String, LabError> {
        let t0 = Instant::now();
        loop {
            let exited = self.exit_status();
            let data = fs::read(&self.console).unwrap_or_default();
            while *mark < data.len() {
                let Some(nl) = data[*mark..].iter().position(|&b| b == b'\n') else { break };
                let raw = &data[*mark..*mark + nl];
                *mark += nl + 1;
                let line = String::from_utf8_lossy(raw);
                let line = line.trim_end_matches('\r');
                if pred(line) {
                    return Ok(line.to_string());
                }
            }
            if let Some(st) = exited {
                return Err(self.exited_error(st, "waiting for a console line"));
            }
            if t0.elapsed() > timeout {
                return Err(self.timeout_error("a console line", t0.elapsed()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Parsed `LIVEMIG-VERIFY` lines seen so far.
    pub fn verify_lines(&self) -> Vec<VerifyLine> {
        self.console().lines().filter_map(VerifyLine::parse).collect()
    }

    /// `LIVEMIG-BAD` lines seen so far.
    pub fn bad_lines(&self) -> Vec<String> {
        self.console().lines().filter(|l| l.starts_with("LIVEMIG-BAD ")).map(String::from).collect()
    }

    fn exit_status(&self) -> Option<ExitStatus> {
        let mut c = self.child.lock().unwrap_or_else(|e| e.into_inner());
        c.try_wait().ok().flatten()
    }

    pub fn is_alive(&mut self) -> bool {
        self.exit_status().is_none()
    }

    /// Waits up to `timeout` for QEMU to exit by itself (e.g. after QMP `quit`).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let mut c = self.child.lock().unwrap_or_else(|e| e.into_inner());
        wait_timeout(&mut c, timeout).ok().flatten()
    }

    /// SIGKILL and wait.
    pub fn kill(&mut self) {
        let mut c = self.child.lock().unwrap_or_else(|e| e.into_inner());
        if let Ok(None) = c.try_wait() {
            let _ = c.kill();
        }
        let _ = c.wait();
        if let Some(f) = self.ram_file.take() {
            let _ = fs::remove_file(f);
        }
    }

    /// The file holding the guest RAM of a [`RamBackend::ShmFile`] VM (until it is killed).
    pub fn ram_file(&self) -> Option<&Path> {
        self.ram_file.as_deref()
    }

    fn console_tail(&self) -> String {
        tail(&self.console(), 20)
    }

    fn exited_error(&self, st: ExitStatus, waiting: &str) -> LabError {
        LabError::QemuExited {
            name: self.name.clone(),
            status: st.to_string(),
            waiting: waiting.to_string(),
            qemu_log: tail(&self.qemu_log(), 20),
            console: self.console_tail(),
        }
    }

    fn timeout_error(&self, what: &str, took: Duration) -> LabError {
        LabError::Timeout {
            name: self.name.clone(),
            what: what.to_string(),
            secs: took.as_secs_f64(),
            console: self.console_tail(),
        }
    }
}

/// Waits up to `limit` for `child` to exit; `None` if it still runs then.
pub fn wait_timeout(child: &mut Child, limit: Duration) -> io::Result<Option<ExitStatus>> {
    let t0 = Instant::now();
    loop {
        if let Some(st) = child.try_wait()? {
            return Ok(Some(st));
        }
        if t0.elapsed() > limit {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_verify_line() {
        let v = VerifyLine::parse("LIVEMIG-VERIFY pass=3 pages=16384 bad=0 writes=12345").unwrap();
        assert_eq!(v, VerifyLine { pass: 3, pages: 16384, bad: 0, writes: 12345 });
        assert!(VerifyLine::parse("LIVEMIG-VERIFY pass=x pages=1 bad=0 writes=1").is_none());
        assert!(VerifyLine::parse("LIVEMIG-HEARTBEAT n=1 uptime_ms=3").is_none());
        assert_eq!(kv("LIVEMIG-BAD page=4 reason=checksum", "reason"), Some("checksum"));
    }

    #[test]
    fn command_line() {
        let img = GuestImage { kernel: "/k".into(), initrd: "/i".into(), disk: "/d".into() };
        let cfg = VmConfig::new("src", "/tmp/x").param("mode", "dirty").param("mib", 64);
        let a = cfg.qemu_args(&img).unwrap().join(" ");
        assert!(a.contains("-append console=ttyS0 quiet panic=-1 lm.mode=dirty lm.mib=64"), "{a}");
        assert!(a.contains("memory-backend-file,id=mem0,size=512M,mem-path=/dev/shm/livemig-src.ram,share=on"), "{a}");
        let mut memfd = cfg.clone();
        memfd.backend = RamBackend::Memfd;
        assert!(memfd.qemu_args(&img).unwrap().join(" ").contains("memory-backend-memfd,id=mem0,size=512M,share=on"));
        assert!(a.contains("file=/d,format=raw,if=virtio,readonly=on"));
        assert!(!a.contains("-incoming"));
        let dst = cfg.as_incoming("dst");
        let b = dst.qemu_args(&img).unwrap().join(" ");
        assert!(b.ends_with("-incoming defer -S"));
        // Identical except name/paths and -incoming.
        let norm = |s: &str, n: &str| s.replace(n, "NAME").replace(" -incoming defer -S", "");
        assert_eq!(norm(&a, "src"), norm(&b, "dst"));
        let mut anon = cfg.clone();
        anon.backend = RamBackend::Anonymous;
        let c = anon.qemu_args(&img).unwrap().join(" ");
        assert!(!c.contains("memory-backend"));
        assert!(VmConfig::new("a", "/t").param("mode", "a b").qemu_args(&img).is_err());
    }
}
