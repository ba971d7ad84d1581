//! The cgroup v2 hierarchy: where the socket callback attaches (at its root
//! the kernel calls it for the sockets of every process below), and where
//! a process's cgroup path tells its service: the systemd unit
//! (`/system.slice/redis-server.service`) or container
//! (`/system.slice/docker-<id>.scope`) an owner belongs to.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};

use tcptrace_core::cgroup::intern;
use tcptrace_core::fasthash::FastMap;

/// Cgroup paths by the id the kernel programs give (`bpf_get_current_cgroup_id`:
/// the inode of the cgroup's directory), as interned strings.
pub struct Cgroups {
    root: Option<PathBuf>,
    by_id: FastMap<u64, Option<&'static str>>,
    /// When the tree was last walked for an id no process told.
    walked: Option<Instant>,
}

/// A walk of the whole tree (for an id /proc/PID/cgroup did not explain)
/// at most this often.
const WALK_EVERY: Duration = Duration::from_secs(1);

impl Cgroups {
    pub fn new() -> Cgroups {
        Cgroups {
            root: root().ok(),
            by_id: FastMap::default(),
            walked: None,
        }
    }

    /// The path of cgroup `id`, which process `pid` was in; None for the
    /// root or when it cannot be found (the cgroup is gone, or no cgroup2
    /// is mounted where we can see it).
    pub fn path(&mut self, id: u64, pid: u32) -> Option<&'static str> {
        if id == 0 {
            return None;
        }
        if let Some(p) = self.by_id.get(&id) {
            return *p;
        }
        let found = self
            .proc_path(pid)
            .filter(|p| self.id_of(p) == Some(id))
            .or_else(|| self.walk_for(id));
        let interned = found.as_deref().and_then(intern);
        // Misses are not remembered: a cgroup made since the last walk
        // will be found by the next.
        if found.is_some() || self.root.is_none() {
            self.by_id.insert(id, interned);
        }
        interned
    }

    /// The cgroup path of a running process, from /proc.
    pub fn of_pid(&mut self, pid: u32) -> Option<&'static str> {
        let path = self.proc_path(pid)?;
        if let Some(id) = self.id_of(&path) {
            let interned = intern(&path);
            self.by_id.insert(id, interned);
            return interned;
        }
        intern(&path)
    }

    fn proc_path(&self, pid: u32) -> Option<String> {
        let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix("0::"))
            .map(|p| p.trim_end_matches(" (deleted)").to_string())
    }

    fn id_of(&self, path: &str) -> Option<u64> {
        let root = self.root.as_ref()?;
        fs::metadata(root.join(path.trim_start_matches('/')))
            .ok()
            .map(|m| m.ino())
    }

    fn walk_for(&mut self, id: u64) -> Option<String> {
        let root = self.root.clone()?;
        if self.walked.is_some_and(|t| t.elapsed() < WALK_EVERY) {
            return None;
        }
        self.walked = Some(Instant::now());
        let mut stack = vec![(root.clone(), String::new())];
        let mut seen = 0;
        while let Some((dir, rel)) = stack.pop() {
            let Ok(entries) = fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.flatten() {
                let Ok(meta) = e.metadata() else { continue };
                if !meta.is_dir() {
                    continue;
                }
                seen += 1;
                if seen > 100_000 {
                    return None;
                }
                let rel = format!("{rel}/{}", e.file_name().to_string_lossy());
                if meta.ino() == id {
                    return Some(rel);
                }
                stack.push((e.path(), rel));
            }
        }
        None
    }
}

impl Default for Cgroups {
    fn default() -> Self {
        Cgroups::new()
    }
}

/// Where the root of the cgroup v2 hierarchy is mounted (`/sys/fs/cgroup`
/// on a unified system, `/sys/fs/cgroup/unified` on a hybrid one).
pub fn root() -> Result<PathBuf> {
    let mountinfo =
        fs::read_to_string("/proc/self/mountinfo").context("cannot read /proc/self/mountinfo")?;
    root_in(&mountinfo).ok_or_else(|| anyhow!("no cgroup v2 hierarchy is mounted"))
}

/// The first mount of the whole cgroup2 hierarchy in a mountinfo table.
/// A mount of a sub-cgroup (its root field is not "/"), as a container
/// sees, would only cover that subtree; it is still better than none, so
/// it is taken when no whole mount exists.
fn root_in(mountinfo: &str) -> Option<PathBuf> {
    let mut partial = None;
    for line in mountinfo.lines() {
        // id parent major:minor root mount-point options [optional...] - type source ...
        let Some((mount, fs)) = line.split_once(" - ") else {
            continue;
        };
        if fs.split(' ').next() != Some("cgroup2") {
            continue;
        }
        let mut fields = mount.split(' ');
        let (Some(root), Some(point)) = (fields.nth(3), fields.next()) else {
            continue;
        };
        let point = PathBuf::from(unescape(point));
        if root == "/" {
            return Some(point);
        }
        partial.get_or_insert(point);
    }
    partial
}

/// mountinfo writes space, tab, newline and backslash as octal escapes.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            Some(d) => {
                let value = d.iter().fold(0u32, |v, c| v * 8 + u32::from(c - b'0'));
                out.push(value as u8);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_cgroup_resolves_by_its_id() {
        let mut c = Cgroups::new();
        let Some(path) = c.of_pid(std::process::id()) else {
            // In the root cgroup, or no cgroup2 here: nothing to resolve.
            return;
        };
        let id = c.id_of(path).expect("the directory of our own cgroup");
        let mut fresh = Cgroups::new();
        assert_eq!(fresh.path(id, std::process::id()), Some(path));
        // Found by walking the tree when the process does not tell.
        let mut walker = Cgroups::new();
        assert_eq!(walker.path(id, 0), Some(path));
    }

    const HYBRID: &str = "\
25 1 0:23 / /sys rw,nosuid - sysfs sysfs rw
30 25 0:26 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw,nsdelegate
32 30 0:28 / /sys/fs/cgroup/cpu rw,nosuid - cgroup cgroup rw,cpu
";

    #[test]
    fn finds_the_unified_hierarchy_of_a_hybrid_system() {
        assert_eq!(
            root_in(HYBRID),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn prefers_the_whole_hierarchy_to_a_subtree_and_unescapes_the_path() {
        let info = "\
40 1 0:30 /system.slice /mnt/sub rw - cgroup2 cgroup2 rw
41 1 0:30 / /mnt/with\\040space rw,relatime shared:9 - cgroup2 none rw
";
        assert_eq!(root_in(info), Some(PathBuf::from("/mnt/with space")));
        let only_sub = info.lines().next().unwrap();
        assert_eq!(root_in(only_sub), Some(PathBuf::from("/mnt/sub")));
    }

    #[test]
    fn a_machine_without_cgroup2_has_no_root() {
        let v1_only = HYBRID
            .lines()
            .filter(|l| !l.contains("cgroup2"))
            .collect::<Vec<_>>()
            .join("\n");
        assert_eq!(root_in(&v1_only), None);
    }
}
