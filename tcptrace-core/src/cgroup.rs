//! What a cgroup v2 path says about a process: its systemd unit, its
//! container (and that container's name, from the runtimes' own state),
//! and whether it is within a cgroup a filter names.

use std::fs;
use std::path::PathBuf;

use crate::fasthash::FastMap;

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
