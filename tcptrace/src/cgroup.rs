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

use crate::fasthash::FastMap;

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

/// Cgroup paths live as long as the process, up to a bound that a host
/// making cgroups without end cannot push memory past.
pub fn intern(path: &str) -> Option<&'static str> {
    use std::collections::HashSet;
    use std::sync::{Mutex, OnceLock};
    static PATHS: OnceLock<Mutex<HashSet<&'static str>>> = OnceLock::new();
    if path.is_empty() || path == "/" {
        return None;
    }
    let mut paths = PATHS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if let Some(p) = paths.get(path) {
        return Some(p);
    }
    if paths.len() >= 65_536 {
        return None;
    }
    let leaked: &'static str = Box::leak(path.to_owned().into_boxed_str());
    paths.insert(leaked);
    Some(leaked)
}

/// The systemd unit a cgroup path is in: its deepest `.service` or
/// `.scope` component (`redis-server.service`, `session-3.scope`).
pub fn unit(path: &str) -> Option<&str> {
    path.rsplit('/')
        .find(|c| c.ends_with(".service") || c.ends_with(".scope"))
}

/// The container a cgroup path is in, as its runtime names the cgroup:
/// `docker-<id>.scope`, `cri-containerd-<id>.scope`, `crio-<id>.scope`,
/// `libpod-<id>.scope` (systemd driver) or `/docker/<id>`,
/// `/kubepods/.../<id>` (cgroupfs driver). The id is 64 hex digits.
pub fn container(path: &str) -> Option<&str> {
    let is_id = |s: &str| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit());
    path.rsplit('/').find_map(|c| {
        let c = c.strip_suffix(".scope").unwrap_or(c);
        let id = c.rsplit('-').next().unwrap_or(c);
        is_id(id).then_some(id)
    })
}

/// Container names by cgroup path, from the container runtimes' own state
/// on this host: Docker (`/var/lib/docker/containers/<id>/config.v2.json`),
/// Podman run as root (`/var/lib/containers/storage/overlay-containers/
/// containers.json`) and containerd's CRI (`pod/container` from the task's
/// OCI annotations under `/run/containerd/io.containerd.runtime.v2.task/`).
/// A container gone since, or a recording read on another host, has no
/// name: its id is shown instead. Looked up once per cgroup path.
#[derive(Default)]
pub struct ContainerNames {
    by_path: FastMap<usize, Option<&'static str>>,
}

impl ContainerNames {
    /// The name of the container cgroup `path` (an interned path) is in.
    pub fn of(&mut self, path: &'static str) -> Option<&'static str> {
        *self
            .by_path
            .entry(path.as_ptr() as usize)
            .or_insert_with(|| container(path).and_then(container_name))
    }
}

/// Where the runtimes keep their state; tests point it elsewhere.
fn runtime_root() -> PathBuf {
    std::env::var_os("TCPTRACE_RUNTIME_ROOT").map_or_else(|| PathBuf::from("/"), PathBuf::from)
}

fn container_name(id: &str) -> Option<&'static str> {
    let name = container_name_in(&runtime_root(), id)?;
    Some(Box::leak(name.into_boxed_str()))
}

fn container_name_in(root: &std::path::Path, id: &str) -> Option<String> {
    let json = |rel: String| -> Option<serde_json::Value> {
        serde_json::from_slice(&fs::read(root.join(rel)).ok()?).ok()
    };
    let docker = || {
        let v = json(format!("var/lib/docker/containers/{id}/config.v2.json"))?;
        Some(v["Name"].as_str()?.trim_start_matches('/').to_string())
    };
    let podman = || {
        let v = json("var/lib/containers/storage/overlay-containers/containers.json".into())?;
        v.as_array()?.iter().find(|c| c["id"] == id)?["names"][0]
            .as_str()
            .map(str::to_string)
    };
    let cri = || {
        let v = json(format!(
            "run/containerd/io.containerd.runtime.v2.task/k8s.io/{id}/config.json"
        ))?;
        let a = &v["annotations"];
        let container = a["io.kubernetes.cri.container-name"].as_str()?;
        Some(match a["io.kubernetes.cri.sandbox-name"].as_str() {
            Some(pod) => format!("{pod}/{container}"),
            None => container.to_string(),
        })
    };
    docker()
        .or_else(podman)
        .or_else(cri)
        .filter(|n| !n.is_empty())
}

/// Whether `path` is the cgroup `wanted` or below it.
pub fn is_within(path: &str, wanted: &str) -> bool {
    let wanted = wanted.trim_end_matches('/');
    wanted.is_empty()
        || path
            .strip_prefix(wanted)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// Whether the unit `name` is the one given on the command line: with or
/// without its `.service` suffix.
pub fn unit_matches(unit: &str, wanted: &str) -> bool {
    unit == wanted || unit.strip_suffix(".service") == Some(wanted)
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
    fn units_and_containers_come_from_the_path() {
        assert_eq!(
            unit("/system.slice/redis-server.service"),
            Some("redis-server.service")
        );
        assert_eq!(
            unit("/user.slice/user-0.slice/session-3.scope"),
            Some("session-3.scope")
        );
        assert_eq!(unit("/system.slice"), None);
        let id = "a".repeat(64);
        let docker = format!("/system.slice/docker-{id}.scope");
        assert_eq!(container(&docker), Some(id.as_str()));
        assert_eq!(unit(&docker), Some(&docker["/system.slice/".len()..]));
        assert_eq!(
            container(&format!("/kubepods/burstable/pod1/{id}")),
            Some(id.as_str())
        );
        assert_eq!(
            container(&format!("/kubepods.slice/cri-containerd-{id}.scope")),
            Some(id.as_str())
        );
        assert_eq!(container("/system.slice/nginx.service"), None);
        assert_eq!(container(&format!("/x/{}", "g".repeat(64))), None);
    }

    #[test]
    fn unit_and_cgroup_filters_match_as_a_person_means_them() {
        assert!(unit_matches("redis-server.service", "redis-server"));
        assert!(unit_matches("redis-server.service", "redis-server.service"));
        assert!(!unit_matches("redis-server.service", "redis"));
        assert!(!unit_matches("session-3.scope", "session-3"));
        assert!(is_within("/system.slice/a.service", "/system.slice"));
        assert!(is_within(
            "/system.slice/a.service",
            "/system.slice/a.service/"
        ));
        assert!(!is_within("/system.slice2/a.service", "/system.slice"));
        assert!(is_within("/anything", "/"));
    }

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

    #[test]
    fn container_names_come_from_each_runtimes_state() {
        let root = std::env::temp_dir().join(format!("tcptrace-runtime-{}", std::process::id()));
        let put = |rel: &str, text: &str| {
            let p = root.join(rel);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, text).unwrap();
        };
        let (a, b, c) = ("a".repeat(64), "b".repeat(64), "c".repeat(64));
        put(
            &format!("var/lib/docker/containers/{a}/config.v2.json"),
            r#"{"Name":"/web"}"#,
        );
        put(
            "var/lib/containers/storage/overlay-containers/containers.json",
            &format!(r#"[{{"id":"{b}","names":["db"]}}]"#),
        );
        put(
            &format!("run/containerd/io.containerd.runtime.v2.task/k8s.io/{c}/config.json"),
            r#"{"annotations":{"io.kubernetes.cri.container-name":"app","io.kubernetes.cri.sandbox-name":"shop-7d4"}}"#,
        );
        assert_eq!(container_name_in(&root, &a).as_deref(), Some("web"));
        assert_eq!(container_name_in(&root, &b).as_deref(), Some("db"));
        assert_eq!(
            container_name_in(&root, &c).as_deref(),
            Some("shop-7d4/app")
        );
        assert_eq!(container_name_in(&root, &"d".repeat(64)), None);
        let _ = fs::remove_dir_all(&root);
    }
}
