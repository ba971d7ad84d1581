//! The cgroup v2 hierarchy, where the socket callback attaches: at its root
//! the kernel calls it for the sockets of every process below.

use std::fs;
use std::path::PathBuf;

use anyhow::{Context, Result, anyhow};

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
