//! Shared set-up of the VM tests: a source and a destination VM, the `livemig` binary run as the
//! operator runs it, and checks of both VMs' states.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use livemig_lab::{GuestImage, RamBackend, Vm, VmConfig};
use livemig_qmp::Qmp;
use serde_json::Value;

static VM_LOCK: Mutex<()> = Mutex::new(());

/// Held while a VM test runs: see [`vm_lock`].
pub struct VmGuard {
    _thread: MutexGuard<'static, ()>,
    _process: std::fs::File,
}

/// Serialises the VM tests: a pair of TCG guests takes both cores. Within this process (a mutex)
/// and across processes (an exclusive lock on `$TMPDIR/livemig-vm-tests.lock`), so two test runs
/// on one machine take turns instead of starving each other's guests.
pub fn vm_lock() -> VmGuard {
    let thread = VM_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let file = livemig_lab::machine_lock(|_| {}).unwrap_or_else(|e| panic!("{e}"));
    VmGuard { _thread: thread, _process: file }
}

/// Workload parameters of a guest that rewrites `mib` MiB at `rate` MiB/s (0: flat out).
pub fn dirty_guest(mib: u64, rate: u64) -> Vec<(String, String)> {
    [("mode", "dirty".to_string()), ("mib", mib.to_string()), ("rate", rate.to_string()), ("pattern", "uniform".into()), ("verify-secs", "2".into())]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
}

pub fn image() -> GuestImage {
    GuestImage::find().expect("the test guest is built (run `livemig-dev guest build` or .ci/run)")
}

/// The test guest with its root on `root.qcow2` (root.raw's content in a qcow2 overlay over its
/// backing file `root-base.qcow2`).
pub fn image_qcow2() -> GuestImage {
    let mut i = image();
    i.disk = i.disk.with_file_name("root.qcow2");
    assert!(i.disk.is_file(), "{} missing: guest/build.sh makes it", i.disk.display());
    i
}

/// The test guest with its root on `root-1k.raw` (the same files, ext4 with 1 KiB blocks).
pub fn image_1k() -> GuestImage {
    let mut i = image();
    i.disk = i.disk.with_file_name("root-1k.raw");
    assert!(i.disk.is_file(), "{} missing: guest/build.sh makes it", i.disk.display());
    i
}

fn workdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("livemig-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A source VM running a workload and a destination VM waiting with `-incoming defer`.
pub struct Pair {
    pub src: Vm,
    pub dst: Vm,
    pub dir: PathBuf,
    dst_cfg: VmConfig,
    /// The guest both VMs boot (its root disk attached when `with_disk`).
    pub image: GuestImage,
}

/// Kills both VMs; the work dir (logs, reports, copies of disks: up to 400 MiB) goes too unless the
/// test failed, so a run of the suite does not leave gigabytes in $TMPDIR.
impl Drop for Pair {
    fn drop(&mut self) {
        self.src.kill();
        self.dst.kill();
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

impl Pair {
    pub fn start(name: &str, workload: Vec<(String, String)>, dst_cfg: impl FnOnce(VmConfig) -> VmConfig) -> Pair {
        Self::start_with_backend(name, workload, RamBackend::ShmFile, dst_cfg)
    }

    pub fn start_with_backend(
        name: &str,
        workload: Vec<(String, String)>,
        backend: RamBackend,
        dst_cfg: impl FnOnce(VmConfig) -> VmConfig,
    ) -> Pair {
        Self::start_custom(
            name,
            workload,
            |mut c| {
                c.backend = backend;
                c
            },
            dst_cfg,
        )
    }

    /// A pair whose source configuration `src_cfg` adjusts (384 MiB, a shared file on /dev/shm, no
    /// disk by default).
    pub fn start_custom(
        name: &str,
        workload: Vec<(String, String)>,
        src_cfg: impl FnOnce(VmConfig) -> VmConfig,
        dst_cfg: impl FnOnce(VmConfig) -> VmConfig,
    ) -> Pair {
        Self::start_custom_on(image(), name, workload, src_cfg, dst_cfg)
    }

    /// [`Pair::start_custom`] of the guest `image` (e.g. [`image_1k`]).
    pub fn start_custom_on(
        image: GuestImage,
        name: &str,
        workload: Vec<(String, String)>,
        src_cfg: impl FnOnce(VmConfig) -> VmConfig,
        dst_cfg: impl FnOnce(VmConfig) -> VmConfig,
    ) -> Pair {
        let dir = workdir(name);
        let mut cfg = VmConfig::new("source", &dir);
        cfg.mem_mib = 384;
        cfg.workload = workload;
        cfg.with_disk = false;
        let cfg = src_cfg(cfg);
        let src = Vm::start(&image, &cfg).expect("source VM starts");
        src.wait_console(Duration::from_secs(180), |l| l.contains("LIVEMIG-VERIFY"))
            .expect("the source guest runs its verifier");
        let dcfg = dst_cfg(cfg.as_incoming("destination"));
        let dst = Vm::start(&image, &dcfg).expect("destination VM starts");
        Pair { src, dst, dir, dst_cfg: dcfg, image }
    }

    /// Replaces the destination VM by a fresh one (after a failed attempt it has consumed its
    /// `migrate-incoming`).
    pub fn restart_destination(&mut self) {
        let cfg = self.dst_cfg.clone();
        self.dst.kill();
        self.dst = Vm::start(&self.image, &cfg).expect("destination VM restarts");
    }

    /// A new VM waiting with `-incoming defer`, configured as the destination (for a return trip).
    pub fn start_incoming(&self, name: &str) -> Vm {
        Vm::start(&self.image, &self.dst_cfg.as_incoming(name)).expect("incoming VM starts")
    }

    /// Kills the destination QEMU (SIGKILL), as a crash would.
    pub fn kill_destination_qemu(pid: u32) {
        let ok = Command::new("kill").args(["-9", &pid.to_string()]).status().map(|s| s.success()).unwrap_or(false);
        assert!(ok, "kill -9 {pid}");
    }

    fn status(path: &std::path::Path) -> String {
        match Qmp::connect(path, Duration::from_secs(10)).and_then(|mut q| q.query_status()) {
            Ok(s) => s.status,
            Err(e) => format!("unreachable: {e}"),
        }
    }

    pub fn status_of_source(&self) -> String {
        Self::status(self.src.qmp_path())
    }

    pub fn status_of_destination(&self) -> String {
        Self::status(self.dst.qmp_path())
    }

    /// The destination's state through its second monitor, while `receive` holds the first.
    pub fn observed_status_of_destination(&self) -> String {
        Self::status(&self.dst.observer_qmp_path())
    }

    fn assert_guest_verifies(vm: &Vm, from: usize, passes: usize, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(240);
        loop {
            let lines = vm.verify_lines();
            let new = &lines[from.min(lines.len())..];
            let bad: Vec<_> = new.iter().filter(|l| l.bad > 0).collect();
            assert!(bad.is_empty(), "{what}: the guest verifier found bad pages: {bad:?} {:?}", vm.bad_lines());
            if new.len() >= passes {
                return;
            }
            assert!(Instant::now() < deadline, "{what}: only {} verifier passes; console:\n{}", new.len(), vm.console());
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// The destination guest runs its verifier `passes` times after the switchover, no bad page.
    pub fn assert_destination_guest_verifies(&self, passes: usize) {
        Self::assert_guest_verifies(&self.dst, 0, passes, "destination");
    }

    /// The source guest, still running, passes `passes` more verifier passes with no bad page.
    pub fn assert_source_guest_still_verifies(&self, passes: usize) {
        let seen = self.src.verify_lines().len();
        Self::assert_guest_verifies(&self.src, seen, passes, "source");
    }
}

/// One `livemig send` + `livemig receive` run.
pub struct Migration {
    pub send_code: i32,
    pub recv_code: i32,
    pub send_stderr: String,
    pub recv_stderr: String,
    pub send_report: Value,
    pub recv_report: Value,
}

/// Handle given to a test while the migration runs.
pub struct Running {
    receiver: Child,
    send_log: PathBuf,
    sender_pid: u32,
}

impl Running {
    /// Waits until the sender's output contains `text`.
    pub fn wait_send_progress(&self, text: &str) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let s = std::fs::read_to_string(&self.send_log).unwrap_or_default();
            if s.contains(text) {
                return;
            }
            assert!(Instant::now() < deadline, "send never printed {text:?}:\n{s}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn kill_receiver(&mut self) {
        self.receiver.kill().expect("kill receiver");
    }

    /// Sends a signal (`STOP`, `CONT`, ...) to the `livemig receive` process.
    pub fn signal_receiver(&self, sig: &str) {
        let pid = self.receiver.id();
        let ok = Command::new("kill").args([&format!("-{sig}"), &pid.to_string()]).status().is_ok_and(|s| s.success());
        assert!(ok, "kill -{sig} {pid}");
    }

    /// Sends a signal (`TERM`, `INT`, ...) to the `livemig send` process.
    pub fn signal_sender(&self, sig: &str) {
        let ok = Command::new("kill").args([&format!("-{sig}"), &self.sender_pid.to_string()]).status().is_ok_and(|s| s.success());
        assert!(ok, "kill -{sig} {}", self.sender_pid);
    }
}

fn wait(c: &mut Child, what: &str) -> i32 {
    match livemig_lab::wait_timeout(c, Duration::from_secs(600)).unwrap() {
        Some(s) => s.code().unwrap_or(-1),
        None => {
            let _ = c.kill();
            panic!("{what} did not finish in 600 s");
        }
    }
}

fn read(p: &PathBuf) -> String {
    let mut s = String::new();
    if let Ok(mut f) = std::fs::File::open(p) {
        let _ = f.read_to_string(&mut s);
    }
    s
}

impl Migration {
    pub fn run(pair: &Pair, send_args: &[&str], recv_args: &[&str]) -> Migration {
        Self::run_with(pair, send_args, recv_args, |_| {})
    }

    pub fn run_with(pair: &Pair, send_args: &[&str], recv_args: &[&str], during: impl FnOnce(&mut Running)) -> Migration {
        Self::between(&pair.src, &pair.dst, &pair.dir, "", send_args, recv_args, during)
    }

    /// A migration from `src` to `dst`; logs and reports go to `dir` with names prefixed by `tag`.
    pub fn between(
        src: &Vm,
        dst: &Vm,
        d: &std::path::Path,
        tag: &str,
        send_args: &[&str],
        recv_args: &[&str],
        during: impl FnOnce(&mut Running),
    ) -> Migration {
        Self::between_via(src, dst, d, tag, send_args, recv_args, str::to_string, during)
    }

    /// As [`Migration::between`], the sender's `--to` being `via(receiver address)` (e.g. a proxy
    /// in front of the receiver).
    #[allow(clippy::too_many_arguments)]
    pub fn between_via(
        src: &Vm,
        dst: &Vm,
        d: &std::path::Path,
        tag: &str,
        send_args: &[&str],
        recv_args: &[&str],
        via: impl FnOnce(&str) -> String,
        during: impl FnOnce(&mut Running),
    ) -> Migration {
        let exe = env!("CARGO_BIN_EXE_livemig");
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let addr = format!("127.0.0.1:{port}");
        let (send_log, recv_log) = (d.join(format!("{tag}send.log")), d.join(format!("{tag}receive.log")));
        let (send_json, recv_json) = (d.join(format!("{tag}send.json")), d.join(format!("{tag}receive.json")));
        let receiver = spawn_receive(&addr, dst, &recv_json, &recv_log, recv_args);
        let to = via(&addr);
        // The shared engine unless the test names one: most tests here are of that engine.
        let engine = (!send_args.contains(&"--engine")).then_some(["--engine", "shared"]);
        let mut sender = Command::new(exe)
            .args(["send", "--to", &to, "--timeout", "30s"])
            .args(engine.iter().flatten())
            .args(insecure(send_args).then_some("--insecure"))
            .arg("--qmp")
            .arg(src.qmp_path())
            .arg("--report")
            .arg(&send_json)
            .args(send_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&send_log).unwrap())
            .spawn()
            .expect("start livemig send");
        let mut running = Running { receiver, send_log: send_log.clone(), sender_pid: sender.id() };
        during(&mut running);
        let send_code = wait(&mut sender, "send");
        let recv_code = wait(&mut running.receiver, "receive");
        let parse = |p: &PathBuf| serde_json::from_str(&read(p)).unwrap_or(Value::Null);
        let m = Migration {
            send_code,
            recv_code,
            send_stderr: read(&send_log),
            recv_stderr: read(&recv_log),
            send_report: parse(&send_json),
            recv_report: parse(&recv_json),
        };
        eprintln!("--- send (exit {}):\n{}--- receive (exit {}):\n{}", m.send_code, m.send_stderr, m.recv_code, m.recv_stderr);
        m
    }

    /// The outcome every failure before the commit must have: `send` exits 1 saying the source
    /// keeps running, `receive` exits 1 saying the destination was not resumed, the source VM runs
    /// and its guest verifies with no bad page, the destination does not run. `what` names the case
    /// in the messages.
    pub fn assert_failed_before_commit(&self, pair: &Pair, what: &str) {
        let m = self;
        assert_eq!(m.send_code, 1, "{what}: send must fail:\n{}", m.send_stderr);
        assert!(m.send_stderr.contains("the source VM keeps running"), "{what}: {}", m.send_stderr);
        assert_eq!(m.send_report["outcome"], "failed", "{what}: {:#}", m.send_report);
        assert_eq!(m.send_report["source_state"], "running", "{what}: {:#}", m.send_report);
        assert_eq!(m.recv_code, 1, "{what}: receive must fail:\n{}", m.recv_stderr);
        assert!(m.recv_stderr.contains("the destination VM was not resumed"), "{what}: {}", m.recv_stderr);
        assert_eq!(pair.status_of_source(), "running", "{what}");
        assert_ne!(pair.status_of_destination(), "running", "{what}");
        pair.assert_source_guest_still_verifies(1);
    }

    pub fn assert_completed(&self) {
        assert_eq!(self.send_code, 0, "send failed:\n{}", self.send_stderr);
        assert_eq!(self.recv_code, 0, "receive failed:\n{}", self.recv_stderr);
        assert_eq!(self.send_report["outcome"], "completed");
        assert_eq!(self.recv_report["outcome"], "completed");
    }
}

/// Plain TCP unless the test chose a TLS setup for the side.
fn insecure(args: &[&str]) -> bool {
    !args.iter().any(|a| a.starts_with("--tls") || a.starts_with("--psk"))
}

/// Starts `livemig receive` on `addr` for `dst`, its report in `json` and its output in `log`.
fn spawn_receive(addr: &str, dst: &Vm, json: &std::path::Path, log: &std::path::Path, args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_livemig"))
        .args(["receive", "--listen", addr, "--timeout", "30s", "--accept-timeout", "20s"])
        .args(insecure(args).then_some("--insecure"))
        .arg("--qmp")
        .arg(dst.qmp_path())
        .arg("--report")
        .arg(json)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .expect("start livemig receive")
}

/// A `livemig receive` run alone (the test plays the sender): `during` gets its address.
/// Returns its exit code, its output and its report.
pub fn receive_alone(dst: &Vm, d: &std::path::Path, recv_args: &[&str], during: impl FnOnce(&str)) -> (i32, String, Value) {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr = format!("127.0.0.1:{port}");
    let (log, json) = (d.join("receive.log"), d.join("receive.json"));
    let mut receiver = spawn_receive(&addr, dst, &json, &log, recv_args);
    during(&addr);
    let code = wait(&mut receiver, "receive");
    let stderr = read(&log);
    eprintln!("--- receive (exit {code}):\n{stderr}");
    (code, stderr, serde_json::from_str(&read(&json)).unwrap_or(Value::Null))
}

/// Resumes a paused VM (QMP `cont`), as an operator would.
/// A pair with plain `-m` RAM and the (read-only) root disk on both sides, and a block dirty
/// bitmap `bitmap` that lives only in the source QEMU (as an incremental backup keeps one).
pub fn private_ram_with_bitmap(name: &str, workload: Vec<(String, String)>, bitmap: &str) -> Pair {
    let anon_disk = |mut c: VmConfig| {
        c.backend = RamBackend::Anonymous;
        c.with_disk = true;
        c
    };
    let pair = Pair::start_custom(name, workload, anon_disk, anon_disk);
    let mut q = Qmp::connect(&pair.src.observer_qmp_path(), Duration::from_secs(10)).expect("the source's second monitor");
    q.execute("block-dirty-bitmap-add", Some(serde_json::json!({"node": "virtio0", "name": bitmap}))).expect("a dirty bitmap on the source's disk");
    pair
}

/// Whether the destination QEMU holds the block dirty bitmap `name` (through its second monitor).
pub fn destination_has_bitmap(pair: &Pair, name: &str) -> bool {
    let mut q = Qmp::connect(&pair.dst.observer_qmp_path(), Duration::from_secs(10)).expect("the destination's second monitor");
    let blocks = q.execute("query-block", None).expect("query-block");
    blocks.as_array().into_iter().flatten().flat_map(|b| b["inserted"]["dirty-bitmaps"].as_array().into_iter().flatten()).any(|d| d["name"] == name)
}

pub fn qmp_cont(qmp_path: &std::path::Path) {
    let mut qmp = Qmp::connect(qmp_path, Duration::from_secs(10)).expect("QMP");
    qmp.cont().expect("cont");
}

/// The digest of a paused VM's memory, computed here page by page (not by the agents), its
/// page hashes keyed with `key_hex` (a plain-link migration's `page_key_hex` from its report).
pub fn memory_digest(qmp_path: &std::path::Path, key_hex: &str) -> String {
    let key = livemig_track::PageKey::from_hex(key_hex).expect("a page key of 64 hex digits");
    let mut qmp = Qmp::connect(qmp_path, Duration::from_secs(10)).expect("QMP");
    let mem = livemig_memory::GuestMemory::open(&mut qmp).expect("guest memory");
    let mut buf = Box::new(livemig_memory::PageBuf::zeroed());
    let mut d = livemig_track::Digest(0);
    for p in 0..mem.total_pages() {
        mem.read_page(p, &mut buf).expect("read page");
        d.add(p, key.hash_page(&buf.0));
    }
    d.to_string()
}

/// `vm`'s guest verifier reports `passes` passes with zero bad pages.
pub fn assert_guest_verifies(vm: &Vm, passes: usize) {
    Pair::assert_guest_verifies(vm, 0, passes, vm.name());
}
