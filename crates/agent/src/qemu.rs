//! What livemig must know of the QEMU it drives: its version (from the QMP greeting) and what
//! that version does with the guest RAM livemig moves itself.
//!
//! The shared engine moves the RAM and lets QEMU's own migration carry only the device state,
//! with `x-ignore-shared`. QEMU 7.2 skips every shared RAM block then; since QEMU 8.1 (commit
//! b0182e537e, `RAM_NAMED_FILE`) only blocks backed by a *named file*: a `memory-backend-memfd`
//! VM would have QEMU copy all of its RAM again while the source is paused (measured on QEMU
//! 10.0.2: about 1 s of downtime and 113 MB of "device state" for a 512 MiB guest). So such a VM
//! is refused before anything is sent, and the device-state stream is capped while it passes.

use std::fmt;

use livemig_memory::{Backend, GuestMemory};
use livemig_qmp::Qmp;

use crate::error::AgentError;

/// A QEMU version from the QMP greeting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct QemuVersion {
    /// e.g. 10
    pub major: u64,
    /// e.g. 0
    pub minor: u64,
    /// e.g. 2
    pub micro: u64,
}

impl QemuVersion {
    /// The first QEMU whose `x-ignore-shared` skips only named-file RAM (not memfd).
    pub const NAMED_FILE_ONLY: QemuVersion = QemuVersion { major: 8, minor: 1, micro: 0 };

    /// The version in a QMP greeting: `{"QMP": {"version": {"qemu": {...}}}}` as QEMU sends it,
    /// or its inner object as [`Qmp::greeting`] keeps it.
    pub fn from_greeting(greeting: &serde_json::Value) -> Option<QemuVersion> {
        let inner = greeting.get("QMP").unwrap_or(greeting);
        let v = inner.get("version")?.get("qemu")?;
        Some(QemuVersion {
            major: v.get("major")?.as_u64()?,
            minor: v.get("minor")?.as_u64()?,
            micro: v.get("micro")?.as_u64()?,
        })
    }

    /// The version of the QEMU behind `qmp`; an error if its greeting has none.
    pub fn of(qmp: &Qmp) -> Result<QemuVersion, AgentError> {
        Self::from_greeting(qmp.greeting()).ok_or_else(|| {
            AgentError::Incompatible(format!("the QMP greeting names no QEMU version: {}", qmp.greeting()))
        })
    }

    /// Whether `x-ignore-shared` skips memfd RAM on this version.
    pub fn ignores_shared_memfd(self) -> bool {
        self < Self::NAMED_FILE_ONLY
    }
}

impl fmt::Display for QemuVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)
    }
}

/// The ids of `mem`'s memfd-backed regions.
pub fn memfd_regions(mem: &GuestMemory) -> Vec<String> {
    mem.regions.iter().filter(|r| *r.backend() == Backend::Memfd).map(|r| r.id().to_string()).collect()
}

/// Refuses a VM whose RAM QEMU `version` would copy itself during the downtime although livemig
/// moves it (memfd RAM on QEMU >= 8.1), with the fix. `side` is "source" or "destination".
pub fn check_shared_engine(version: QemuVersion, memfd_ids: &[String], side: &str) -> Result<(), AgentError> {
    if memfd_ids.is_empty() || version.ignores_shared_memfd() {
        return Ok(());
    }
    Err(AgentError::Incompatible(format!(
        "the {side} VM's RAM (memdev {}) is memory-backend-memfd, and QEMU {version} (>= 8.1) migrates memfd RAM \
         itself even with x-ignore-shared: all guest RAM would be copied again while the source is paused. \
         Start the VM with a named shared file instead, e.g. `-object memory-backend-file,id=mem0,size=4G,\
         mem-path=/dev/shm/vm1.ram,share=on -machine memory-backend=mem0` (libvirt: <memoryBacking><source \
         type='file'/><access mode='shared'/></memoryBacking> with memory_backing_dir on a tmpfs)",
        memfd_ids.join(", ")
    )))
}

/// What QEMU's device-state stream is expected to carry at most (`--max-device-state`): far
/// above any device state (the largest seen here is 16 MiB of VGA RAM with `-vga std`), far below
/// a guest's RAM.
pub const DEFAULT_MAX_DEVICE_STATE: u64 = 64 << 20;

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn version_from_greetings_of_7_2_and_10() {
        let g7 = json!({"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": ""}, "capabilities": ["oob"]}});
        let g10 = json!({"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": ""}, "capabilities": ["oob"]}});
        let v7 = QemuVersion::from_greeting(&g7).unwrap();
        let v10 = QemuVersion::from_greeting(&g10).unwrap();
        assert_eq!(v7.to_string(), "7.2.22");
        assert_eq!(v10.to_string(), "10.0.2");
        assert!(v7.ignores_shared_memfd());
        assert!(!v10.ignores_shared_memfd());
        assert_eq!(QemuVersion::from_greeting(&g10["QMP"]), Some(v10), "the inner object as Qmp keeps it");
        assert!(QemuVersion::from_greeting(&json!({"QMP": {}})).is_none());
        assert!(QemuVersion { major: 8, minor: 0, micro: 5 }.ignores_shared_memfd());
        assert!(!QemuVersion { major: 8, minor: 1, micro: 0 }.ignores_shared_memfd());
    }

    #[test]
    fn memfd_is_refused_from_8_1_with_the_fix() {
        let memfd = vec!["mem0".to_string()];
        let v = |major, minor| QemuVersion { major, minor, micro: 0 };
        assert!(check_shared_engine(v(7, 2), &memfd, "source").is_ok());
        assert!(check_shared_engine(v(8, 0), &memfd, "source").is_ok());
        assert!(check_shared_engine(v(10, 0), &[], "source").is_ok(), "named files are fine everywhere");
        let e = check_shared_engine(v(8, 1), &memfd, "source").unwrap_err().to_string();
        assert!(e.contains("memdev mem0") && e.contains("QEMU 8.1.0") && e.contains("memory-backend-file"), "{e}");
        let e = check_shared_engine(v(10, 0), &memfd, "destination").unwrap_err().to_string();
        assert!(e.contains("destination VM"), "{e}");
    }
}
