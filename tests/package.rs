//! The release as a production host gets it: the .deb installed with dpkg,
//! used, and removed; the tarball's contents. Both come from `cargo xtask
//! dist` (`cargo xtask test` builds them and says where).

use std::path::PathBuf;
use std::process::Command;

use tcptrace_tests::{CLIENT_CLOSES, Netns, SERVER_PASSIVE, Tracer, life, unique_port};

const INSTALLED: [&str; 9] = [
    "/usr/bin/tcptrace",
    "/usr/share/man/man1/tcptrace.1.gz",
    "/usr/share/man/man1/tcptrace-read.1.gz",
    "/usr/share/man/man1/tcptrace-report.1.gz",
    "/usr/share/bash-completion/completions/tcptrace",
    "/usr/share/zsh/vendor-completions/_tcptrace",
    "/usr/share/fish/vendor_completions.d/tcptrace.fish",
    "/usr/lib/systemd/system/tcptrace.service",
    "/usr/share/doc/tcptrace/docs/how-it-works.md",
];

fn built(var: &str, suffix: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(var) {
        return PathBuf::from(p);
    }
    let dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target/dist"));
    std::fs::read_dir(&dir)
        .ok()
        .and_then(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.path())
                .find(|p| p.to_string_lossy().ends_with(suffix))
        })
        .unwrap_or_else(|| panic!("no *{suffix} in {}: run `cargo xtask dist`", dir.display()))
}

fn run(cmd: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// The package installed for one test, purged on drop (also when it fails).
struct Installed;

impl Installed {
    fn new() -> Installed {
        let deb = built("TCPTRACE_DEB", "_amd64.deb");
        let (ok, out) = run("dpkg", &["-i", &deb.to_string_lossy()]);
        assert!(ok, "dpkg -i {}: {out}", deb.display());
        Installed
    }
}

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = run("dpkg", &["--purge", "tcptrace"]);
    }
}

#[test]
fn the_deb_installs_a_static_tcptrace_that_traces_and_removes_cleanly() {
    let (listed, contents) = run(
        "dpkg-deb",
        &[
            "--contents",
            &built("TCPTRACE_DEB", "_amd64.deb").to_string_lossy(),
        ],
    );
    assert!(listed, "{contents}");
    let installed = Installed::new();
    for path in INSTALLED {
        assert!(
            std::path::Path::new(path).is_file(),
            "{path} is not installed; the package holds:\n{contents}"
        );
    }

    let (ok, version) = run("/usr/bin/tcptrace", &["--version"]);
    assert!(ok, "{version}");
    assert_eq!(
        version.trim(),
        format!("tcptrace {}", env!("CARGO_PKG_VERSION"))
    );
    // Static: no program interpreter, so no libc of the host is needed.
    let (_, ldd) = run("ldd", &["/usr/bin/tcptrace"]);
    assert!(
        ldd.contains("statically linked") || ldd.contains("not a dynamic executable"),
        "{ldd}"
    );
    // man finds the pages where Debian keeps them.
    for page in ["tcptrace", "tcptrace-read", "tcptrace-report"] {
        let (ok, path) = run("man", &["-w", page]);
        assert!(ok, "man -w {page}: {path}");
        assert_eq!(path.trim(), format!("/usr/share/man/man1/{page}.1.gz"));
    }
    let (_, verify) = run(
        "systemd-analyze",
        &["verify", "/usr/lib/systemd/system/tcptrace.service"],
    );
    // verify also complains (and fails) about units it pulls in that this
    // container lacks; only lines about our unit count.
    let ours: Vec<&str> = verify
        .lines()
        .filter(|l| l.contains("tcptrace.service"))
        .collect();
    assert!(ours.is_empty(), "{verify}");
    let unit = std::fs::read_to_string("/usr/lib/systemd/system/tcptrace.service").unwrap();
    assert!(unit.contains("ExecStart=/usr/bin/tcptrace "), "{unit}");
    // Installed, not enabled.
    assert!(
        !std::path::Path::new("/etc/systemd/system/multi-user.target.wants/tcptrace.service")
            .exists()
    );

    // One connection, client closes first, traced by the installed binary.
    let ns = Netns::new();
    let port = unique_port();
    let tracer = Tracer::builder()
        .program("/usr/bin/tcptrace")
        .json()
        .no_snapshot()
        .port(port)
        .start();
    ns.connections(&format!("127.0.0.1:{port}"), 1);
    ns.settle("fin-wait-1");
    let out = tracer.stop();
    assert!(out.status.success(), "{}", out.stderr);
    let lives = out.lives();
    let client = life(&lives, CLIENT_CLOSES);
    let server = life(&lives, SERVER_PASSIVE);
    assert_eq!(lives.len(), 3, "client, server child, listener: {lives:?}");
    assert_eq!(client.rport(), port);
    assert_eq!(server.lport(), port);
    assert!(
        out.rows().iter().all(|r| r.netns == Some(ns.inode())),
        "{}",
        out.stdout
    );

    drop(installed);
    for path in INSTALLED {
        assert!(
            !std::path::Path::new(path).exists(),
            "{path} is left after dpkg --purge"
        );
    }
    let (_, status) = run("dpkg", &["-s", "tcptrace"]);
    assert!(status.contains("not installed"), "{status}");
}

#[test]
fn the_tarball_holds_the_binary_its_pages_completions_unit_and_licences() {
    let tarball = built("TCPTRACE_TARBALL", "-x86_64-linux.tar.gz");
    let (ok, list) = run("tar", &["-tzf", &tarball.to_string_lossy()]);
    assert!(ok, "{list}");
    let top = format!("tcptrace-{}-x86_64-linux", env!("CARGO_PKG_VERSION"));
    for name in [
        "tcptrace",
        "man/tcptrace.1.gz",
        "man/tcptrace-read.1.gz",
        "man/tcptrace-report.1.gz",
        "completions/tcptrace",
        "completions/_tcptrace",
        "completions/tcptrace.fish",
        "tcptrace.service",
        "README.md",
        "docs/how-it-works.md",
        "docs/recording-format.md",
        "LICENSE-MIT",
        "LICENSE-APACHE",
    ] {
        let want = format!("{top}/{name}");
        assert!(list.lines().any(|l| l == want), "{want} not in:\n{list}");
    }
}

/// The ELF header's machine and whether the file asks for a dynamic loader
/// (a PT_INTERP program header): a static binary does not.
fn elf_machine_and_interp(bytes: &[u8]) -> (u16, bool) {
    assert_eq!(&bytes[..4], b"\x7fELF", "not an ELF file");
    assert_eq!(bytes[4], 2, "not a 64-bit ELF file");
    let u16_at = |o: usize| u16::from_le_bytes([bytes[o], bytes[o + 1]]);
    let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().unwrap());
    let (phoff, phentsize, phnum) = (u64_at(0x20) as usize, u16_at(0x36), u16_at(0x38));
    const PT_INTERP: u32 = 3;
    let interp = (0..usize::from(phnum)).any(|i| {
        let at = phoff + i * usize::from(phentsize);
        u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) == PT_INTERP
    });
    (u16_at(0x12), interp)
}

#[test]
fn the_arm64_release_holds_a_static_aarch64_binary_and_the_same_files() {
    const EM_AARCH64: u16 = 183;
    let deb = built("TCPTRACE_ARM64_DEB", "_arm64.deb");
    let (ok, info) = run(
        "dpkg-deb",
        &["--field", &deb.to_string_lossy(), "Architecture"],
    );
    assert!(ok, "{info}");
    assert_eq!(info.trim(), "arm64");
    // Every file the amd64 package installs, at the same place.
    let names = |deb: &std::path::Path| -> Vec<String> {
        let (ok, list) = run("dpkg-deb", &["--contents", &deb.to_string_lossy()]);
        assert!(ok, "{list}");
        let mut names: Vec<String> = list
            .lines()
            .filter_map(|l| l.split_whitespace().last().map(str::to_string))
            .collect();
        names.sort();
        names
    };
    assert_eq!(names(&deb), names(&built("TCPTRACE_DEB", "_amd64.deb")));
    let dir = tcptrace_tests::TempDir::new("arm64-deb");
    let (ok, out) = run(
        "dpkg-deb",
        &["-x", &deb.to_string_lossy(), &dir.path("root")],
    );
    assert!(ok, "{out}");
    let bin = std::fs::read(dir.path("root/usr/bin/tcptrace")).unwrap();
    assert_eq!(elf_machine_and_interp(&bin), (EM_AARCH64, false));

    let tarball = built("TCPTRACE_ARM64_TARBALL", "-aarch64-linux.tar.gz");
    let (ok, list) = run("tar", &["-tzf", &tarball.to_string_lossy()]);
    assert!(ok, "{list}");
    let top = format!("tcptrace-{}-aarch64-linux", env!("CARGO_PKG_VERSION"));
    let (_, x86_list) = run(
        "tar",
        &[
            "-tzf",
            &built("TCPTRACE_TARBALL", "-x86_64-linux.tar.gz").to_string_lossy(),
        ],
    );
    let x86_top = format!("tcptrace-{}-x86_64-linux", env!("CARGO_PKG_VERSION"));
    assert_eq!(list.replace(&top, "TOP"), x86_list.replace(&x86_top, "TOP"));
}

/// A blob of an OCI layout unpacked in `dir`: checked against its
/// descriptor by `sha256sum` and its size, then returned.
fn oci_blob(dir: &tcptrace_tests::TempDir, descriptor: &serde_json::Value) -> Vec<u8> {
    let digest = descriptor["digest"]
        .as_str()
        .expect("a descriptor's digest");
    let hex = digest.strip_prefix("sha256:").expect("sha256 digests");
    let path = dir.path(&format!("layout/blobs/sha256/{hex}"));
    let (ok, sum) = run("sha256sum", &[&path]);
    assert!(ok, "{sum}");
    assert_eq!(sum.split_whitespace().next(), Some(hex), "{path}");
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(
        descriptor["size"].as_u64(),
        Some(bytes.len() as u64),
        "{path}"
    );
    bytes
}

/// Checks one architecture's OCI image archive; returns the binary in
/// its layer.
fn check_oci_archive(var: &str, suffix: &str, arch: &str) -> Vec<u8> {
    use serde_json::Value;
    let archive = built(var, suffix);
    let dir = tcptrace_tests::TempDir::new("oci");
    std::fs::create_dir_all(dir.path("layout")).unwrap();
    let (ok, out) = run(
        "tar",
        &["-xf", &archive.to_string_lossy(), "-C", &dir.path("layout")],
    );
    assert!(ok, "{out}");
    let layout: Value =
        serde_json::from_slice(&std::fs::read(dir.path("layout/oci-layout")).unwrap()).unwrap();
    assert_eq!(layout["imageLayoutVersion"], "1.0.0");
    let index: Value =
        serde_json::from_slice(&std::fs::read(dir.path("layout/index.json")).unwrap()).unwrap();
    let entries = index["manifests"]
        .as_array()
        .expect("index.json lists manifests");
    assert_eq!(entries.len(), 1, "{index}");
    assert_eq!(entries[0]["platform"]["architecture"], arch);
    let manifest: Value = serde_json::from_slice(&oci_blob(&dir, &entries[0])).unwrap();
    assert_eq!(
        manifest["mediaType"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    let config: Value = serde_json::from_slice(&oci_blob(&dir, &manifest["config"])).unwrap();
    assert_eq!(
        (&config["architecture"], &config["os"]),
        (&arch.into(), &"linux".into())
    );
    assert_eq!(config["config"]["Entrypoint"][0], "/usr/bin/tcptrace");
    let layers = manifest["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 1, "{manifest}");
    assert_eq!(
        layers[0]["mediaType"],
        "application/vnd.oci.image.layer.v1.tar+gzip"
    );
    let gz = oci_blob(&dir, &layers[0]);
    std::fs::write(dir.path("layer.tar.gz"), &gz).unwrap();
    // The config names the layer by its uncompressed digest.
    let (ok, tar) = run(
        "sh",
        &[
            "-c",
            &format!("gzip -dc {} | sha256sum", dir.path("layer.tar.gz")),
        ],
    );
    assert!(ok, "{tar}");
    assert_eq!(
        config["rootfs"]["diff_ids"][0],
        format!("sha256:{}", tar.split_whitespace().next().unwrap())
    );
    std::fs::create_dir_all(dir.path("rootfs")).unwrap();
    let (ok, out) = run(
        "tar",
        &["-xzf", &dir.path("layer.tar.gz"), "-C", &dir.path("rootfs")],
    );
    assert!(ok, "{out}");
    // skopeo reads the archive as a registry client would, checking every
    // digest on the way.
    let (ok, inspect) = run(
        "skopeo",
        &["inspect", &format!("oci-archive:{}", archive.display())],
    );
    assert!(
        ok,
        "skopeo (apt-get install skopeo; `cargo xtask test` installs it): {inspect}"
    );
    let inspect: Value = serde_json::from_str(&inspect).unwrap();
    assert_eq!(inspect["Architecture"], arch);
    assert_eq!(inspect["Digest"], entries[0]["digest"]);
    let copy = dir.path("copy");
    let (ok, out) = run(
        "skopeo",
        &[
            "copy",
            &format!("oci-archive:{}", archive.display()),
            &format!("dir:{copy}"),
        ],
    );
    assert!(ok, "skopeo copy: {out}");
    std::fs::read(dir.path("rootfs/usr/bin/tcptrace")).expect("the layer holds /usr/bin/tcptrace")
}

#[test]
fn the_oci_images_hold_the_static_binary_as_their_entrypoint() {
    const EM_X86_64: u16 = 62;
    const EM_AARCH64: u16 = 183;
    let bin = check_oci_archive("TCPTRACE_OCI", "-x86_64.oci.tar", "amd64");
    assert_eq!(elf_machine_and_interp(&bin), (EM_X86_64, false));
    // The image's binary runs here, as a container's would.
    let dir = tcptrace_tests::TempDir::new("oci-run");
    let path = dir.path("tcptrace");
    std::fs::write(&path, &bin).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    let (ok, version) = run(&path, &["--version"]);
    assert!(ok, "{version}");
    assert_eq!(
        version.trim(),
        format!("tcptrace {}", env!("CARGO_PKG_VERSION"))
    );
    let arm = check_oci_archive("TCPTRACE_ARM64_OCI", "-aarch64.oci.tar", "arm64");
    assert_eq!(elf_machine_and_interp(&arm), (EM_AARCH64, false));
}
