//! `livemig snapshot list|rm`: the memory snapshots kept after migrations (see
//! `livemig_index::snapshot`), which let a later migration of the same VM send references for
//! pages unchanged since.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Subcommand;
use livemig_index::{SnapshotInfo, SnapshotStore};

use crate::exit;

/// Hex digits of a snapshot id shown in the table (`rm` accepts any unique prefix).
const SHORT_ID: usize = 12;

#[derive(Subcommand, Debug, Clone)]
pub(crate) enum SnapshotCommand {
    /// List the memory snapshots of every VM, oldest first.
    List {
        /// The snapshot store directory.
        #[arg(long, value_name = "DIR")]
        snapshot_dir: PathBuf,
        /// Print JSON (one array of objects with the full id and the directory) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Remove the snapshots of a VM: all of them, or the one with the given id.
    Rm {
        /// The snapshot store directory.
        #[arg(long, value_name = "DIR")]
        snapshot_dir: PathBuf,
        /// The VM (as shown by `livemig snapshot list`).
        #[arg(value_name = "VM")]
        vm: String,
        /// The snapshot id, or a unique prefix of its hex digits; all snapshots of VM if absent.
        #[arg(value_name = "ID")]
        id: Option<String>,
    },
}

/// Opens the store for reading and removing: the budget is irrelevant (only writing evicts).
fn open(dir: &PathBuf) -> anyhow::Result<SnapshotStore> {
    SnapshotStore::open(dir, u64::MAX).with_context(|| format!("cannot open the snapshot store {}", dir.display()))
}

pub(crate) fn run(c: &SnapshotCommand) -> anyhow::Result<u8> {
    match c {
        SnapshotCommand::List { snapshot_dir, json } => {
            let list = open(snapshot_dir)?.list().context("cannot list the snapshots")?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&list).context("cannot print the list as JSON")?);
            } else {
                print!("{}", table(&list));
            }
            Ok(exit::OK)
        }
        SnapshotCommand::Rm { snapshot_dir, vm, id } => {
            let store = open(snapshot_dir)?;
            match id {
                None => {
                    let n = store.remove_vm(vm).with_context(|| format!("cannot remove the snapshots of VM {vm:?}"))?;
                    if n == 0 {
                        bail!("no snapshot of VM {vm:?} in {}", snapshot_dir.display());
                    }
                    println!("removed {n} snapshot{} of VM {vm:?}", if n == 1 { "" } else { "s" });
                }
                Some(prefix) => {
                    let list = store.list().context("cannot list the snapshots")?;
                    let id = resolve_id(&list, vm, prefix)?;
                    store.remove(vm, id).with_context(|| format!("cannot remove snapshot {id:032x} of VM {vm:?}"))?;
                    println!("removed snapshot {id:032x} of VM {vm:?}");
                }
            }
            Ok(exit::OK)
        }
    }
}

/// The id of the one snapshot of `vm` whose hex id starts with `prefix`.
fn resolve_id(list: &[SnapshotInfo], vm: &str, prefix: &str) -> anyhow::Result<u128> {
    let p = prefix.trim().to_ascii_lowercase();
    if p.is_empty() || p.len() > 32 || !p.bytes().all(|b| b.is_ascii_hexdigit()) {
        bail!("`{prefix}` is not a snapshot id (up to 32 hex digits)");
    }
    let matches: Vec<u128> =
        list.iter().filter(|i| i.vm == vm && format!("{:032x}", i.id).starts_with(&p)).map(|i| i.id).collect();
    match matches.as_slice() {
        [id] => Ok(*id),
        [] => bail!("VM {vm:?} has no snapshot whose id starts with {p}"),
        _ => bail!("{} snapshots of VM {vm:?} have an id starting with {p}; give more digits", matches.len()),
    }
}

/// The table `list` prints.
fn table(list: &[SnapshotInfo]) -> String {
    if list.is_empty() {
        return "no snapshots\n".to_owned();
    }
    let rows: Vec<[String; 5]> = list
        .iter()
        .map(|i| {
            let id = format!("{:032x}", i.id);
            [i.vm.escape_debug().to_string(), id[..SHORT_ID].to_owned(), i.pages.to_string(), bytes(i.bytes), age(i.age())]
        })
        .collect();
    let head = ["VM", "ID", "PAGES", "ON DISK", "AGE"];
    let mut width = head.map(str::len);
    for r in &rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    for r in std::iter::once(head.map(str::to_owned)).chain(rows) {
        let [vm, id, pages, disk, age] = r;
        out.push_str(&format!(
            "{vm:<w0$}  {id:<w1$}  {pages:>w2$}  {disk:>w3$}  {age:>w4$}\n",
            w0 = width[0],
            w1 = width[1],
            w2 = width[2],
            w3 = width[3],
            w4 = width[4]
        ));
    }
    out
}

/// `512 B`, `3.0 KiB`, `1.5 GiB`.
fn bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if b < 1024 {
        return format!("{b} B");
    }
    let mut v = b as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// `45s`, `12m`, `3h`, `2d`.
fn age(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        7200..=172_799 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(vm: &str, id: u128) -> SnapshotInfo {
        SnapshotInfo { vm: vm.to_owned(), id, pages: 10, created_unix_nanos: 0, bytes: 8192, path: PathBuf::new() }
    }

    #[test]
    fn ids_resolve_by_unique_prefix() {
        let list = [info("a", 0xabc0 << 112), info("a", 0xabd0 << 112), info("b", 0xabc0 << 112)];
        assert_eq!(resolve_id(&list, "a", "ABC").unwrap(), 0xabc0 << 112);
        assert!(resolve_id(&list, "a", "ab").unwrap_err().to_string().contains("2 snapshots"));
        assert!(resolve_id(&list, "a", "ff").is_err());
        assert!(resolve_id(&list, "a", "xyz").is_err());
        assert!(resolve_id(&list, "c", "abc").is_err());
    }

    #[test]
    fn table_and_units() {
        let t = table(&[info("vm-1", 0x0123_4567_89ab_cdef << 64)]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].starts_with("VM"));
        assert!(lines[1].starts_with("vm-1  0123456789ab"), "{t}");
        assert!(lines[1].contains("8.0 KiB"), "{t}");
        assert_eq!(table(&[]), "no snapshots\n");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(3 << 30), "3.0 GiB");
        assert_eq!(age(Duration::from_secs(59)), "59s");
        assert_eq!(age(Duration::from_secs(600)), "10m");
        assert_eq!(age(Duration::from_secs(3 * 86_400)), "3d");
    }
}
