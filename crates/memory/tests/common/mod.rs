//! Starts a paused TCG QEMU for tests and kills it on drop.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use livemig_qmp::Qmp;

pub const T: Duration = Duration::from_secs(10);

/// A QEMU child process; killed and reaped on drop, also when a test panics.
#[derive(Debug)]
pub struct Qemu {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub sock: PathBuf,
}

impl Qemu {
    /// `qemu-system-x86_64 -accel tcg -S -nodefaults -display none -qmp unix:SOCK` plus `args`.
    pub fn start(args: &[&str]) -> Qemu {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("qmp.sock");
        let child = Command::new("qemu-system-x86_64")
            .args(["-accel", "tcg", "-S", "-nodefaults", "-display", "none"])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", sock.display()))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("qemu-system-x86_64 starts");
        let mut q = Qemu { child, dir, sock };
        let deadline = Instant::now() + T;
        while !q.sock.exists() {
            if let Some(status) = q.child.try_wait().expect("try_wait") {
                let mut err = String::new();
                if let Some(mut e) = q.child.stderr.take() {
                    std::io::Read::read_to_string(&mut e, &mut err).ok();
                }
                panic!("QEMU exited early ({status}): {err}");
            }
            assert!(Instant::now() < deadline, "QMP socket never appeared");
            std::thread::sleep(Duration::from_millis(20));
        }
        q
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn qmp(&self) -> Qmp {
        Qmp::connect(&self.sock, T).expect("QMP connects")
    }

    /// Waits for the process to exit by itself (after `quit`).
    pub fn wait_exit(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.child.try_wait().expect("try_wait").is_some() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}
