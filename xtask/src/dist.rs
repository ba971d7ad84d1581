//! `cargo xtask dist`: what a production host needs, built here once.
//!
//! One statically linked binary (musl) with the eBPF object inside, so the
//! host needs neither Rust, nor nightly, nor bpf-linker; around it the man
//! pages, completions, a systemd unit and the licences. They go out as a
//! tarball and as a .deb that puts each file where Debian looks for it, for
//! x86_64 and for arm64 (cross-built here: the eBPF programs are the same
//! bytes, only the userspace around them is compiled twice). The binary
//! alone also goes out as a container image ([`crate::oci`]).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::{output, status};

/// A CPU the release is built for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Arch {
    /// Rust's target: statically linked with musl.
    pub target: &'static str,
    /// The name in the tarball's (`uname -m`).
    pub machine: &'static str,
    /// Debian's name, in the .deb's.
    pub debian: &'static str,
}

pub const X86_64: Arch = Arch {
    target: "x86_64-unknown-linux-musl",
    machine: "x86_64",
    debian: "amd64",
};

/// Linked with rust-lld, which the toolchain ships: no cross gcc needed.
pub const AARCH64: Arch = Arch {
    target: "aarch64-unknown-linux-musl",
    machine: "aarch64",
    debian: "arm64",
};

/// What `dist` made, for each architecture.
pub struct Dist {
    pub tarball: PathBuf,
    pub deb: PathBuf,
    pub image: PathBuf,
    pub arm64_tarball: PathBuf,
    pub arm64_deb: PathBuf,
    pub arm64_image: PathBuf,
}

/// Builds the static binary for `arch` (adding its Rust target if missing)
/// and returns its path.
pub fn build_static(arch: Arch) -> Result<PathBuf> {
    let installed = output("rustup", &["target", "list", "--installed"])?;
    if !installed.lines().any(|l| l.trim() == arch.target) {
        eprintln!(
            "xtask: adding the {} target (for a static binary)",
            arch.target
        );
        status("rustup", &["target", "add", arch.target])?;
    }
    let mut cmd = Command::new(crate::cargo_bin());
    cmd.args(["build", "--release", "--target", arch.target])
        .args(["--package", "tcptrace"]);
    if arch != X86_64 {
        let var = format!(
            "CARGO_TARGET_{}_LINKER",
            arch.target.to_uppercase().replace('-', "_")
        );
        cmd.env(var, "rust-lld");
    }
    crate::check(cmd)?;
    Ok(PathBuf::from(format!(
        "target/{}/release/tcptrace",
        arch.target
    )))
}

/// One file of the package: where it goes under the install root, its mode,
/// and its contents.
struct Item {
    path: String,
    mode: u32,
    bytes: Vec<u8>,
}

pub fn run(root: &Path) -> Result<Dist> {
    let out = root.join("target/dist");
    let _ = fs::remove_dir_all(&out);
    fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    let bin = root.join(build_static(X86_64)?);
    // Man pages and completions come from the binary this machine runs;
    // they are the same text for every architecture.
    let items = items(root, &bin)?;
    let (tarball, deb) = package(&out, X86_64, &items)?;
    let image = crate::oci::image(&out, X86_64, &items[0].bytes)?;
    let arm64 = root.join(build_static(AARCH64)?);
    let mut arm64_items = items;
    arm64_items[0].bytes =
        fs::read(&arm64).with_context(|| format!("cannot read {}", arm64.display()))?;
    let (arm64_tarball, arm64_deb) = package(&out, AARCH64, &arm64_items)?;
    let arm64_image = crate::oci::image(&out, AARCH64, &arm64_items[0].bytes)?;
    Ok(Dist {
        tarball,
        deb,
        image,
        arm64_tarball,
        arm64_deb,
        arm64_image,
    })
}

/// The tarball and the .deb of one architecture's files.
fn package(out: &Path, arch: Arch, items: &[Item]) -> Result<(PathBuf, PathBuf)> {
    let version = env!("CARGO_PKG_VERSION");
    // The tarball keeps a flat, self-describing layout under one directory.
    let name = format!("tcptrace-{version}-{}-linux", arch.machine);
    let tree = out.join(&name);
    for item in items {
        let flat = match item.path.rsplit_once('/') {
            Some((dir, file)) if dir.ends_with("/man1") => format!("man/{file}"),
            Some((dir, file)) if dir.contains("completions") || dir.contains("zsh") => {
                format!("completions/{file}")
            }
            Some((dir, file)) if dir.ends_with("/docs") => format!("docs/{file}"),
            Some((_, file)) => file.to_string(),
            None => item.path.clone(),
        };
        put(&tree.join(flat), item)?;
    }
    let tarball = out.join(format!("{name}.tar.gz"));
    status(
        "tar",
        &[
            "--owner=0",
            "--group=0",
            "--sort=name",
            "-czf",
            &tarball.to_string_lossy(),
            "-C",
            &out.to_string_lossy(),
            &name,
        ],
    )?;

    // The .deb: the same files at Debian's paths, and a control file.
    let staging = out.join(format!("deb-{}", arch.debian));
    for item in items {
        put(&staging.join(&item.path), item)?;
    }
    let size_kib: u64 = items.iter().map(|i| i.bytes.len() as u64).sum::<u64>() / 1024 + 1;
    let control = format!(
        "Package: tcptrace\n\
         Version: {version}\n\
         Architecture: {}\n\
         Maintainer: tcptrace maintainers <maintainers@tcptrace.invalid>\n\
         Installed-Size: {size_kib}\n\
         Section: net\n\
         Priority: optional\n\
         Description: record every TCP state transition the kernel makes\n \
         tcptrace follows the kernel's sock:inet_sock_set_state tracepoint with\n \
         eBPF and prints each transition of each TCP socket as it happens, with\n \
         the process that holds the socket, its addresses and how long it stayed\n \
         in the state it left; it records them and reports on recordings.\n",
        arch.debian
    );
    put(
        &staging.join("DEBIAN/control"),
        &Item {
            path: "DEBIAN/control".into(),
            mode: 0o644,
            bytes: control.into_bytes(),
        },
    )?;
    let deb = out.join(format!("tcptrace_{version}_{}.deb", arch.debian));
    status(
        "dpkg-deb",
        &[
            "--root-owner-group",
            "--build",
            &staging.to_string_lossy(),
            &deb.to_string_lossy(),
        ],
    )?;
    eprintln!("xtask: built {} and {}", tarball.display(), deb.display());
    Ok((tarball, deb))
}

/// Every file of a release, at the path Debian gives it.
fn items(root: &Path, bin: &Path) -> Result<Vec<Item>> {
    let file = |path: &str, mode: u32, bytes: Vec<u8>| Item {
        path: path.into(),
        mode,
        bytes,
    };
    let read = |p: &str| fs::read(root.join(p)).with_context(|| format!("cannot read {p}"));
    // The binary first: the other architectures' packages replace it.
    let mut items = vec![file(
        "usr/bin/tcptrace",
        0o755,
        fs::read(bin).with_context(|| format!("cannot read {}", bin.display()))?,
    )];
    for (what, page) in [
        ("man", "tcptrace"),
        ("man-read", "tcptrace-read"),
        ("man-report", "tcptrace-report"),
    ] {
        items.push(file(
            &format!("usr/share/man/man1/{page}.1.gz"),
            0o644,
            gzip(&generated(bin, what)?)?,
        ));
    }
    for (what, path) in [
        ("bash", "usr/share/bash-completion/completions/tcptrace"),
        ("zsh", "usr/share/zsh/vendor-completions/_tcptrace"),
        ("fish", "usr/share/fish/vendor_completions.d/tcptrace.fish"),
    ] {
        items.push(file(path, 0o644, generated(bin, what)?));
    }
    items.push(file(
        "usr/lib/systemd/system/tcptrace.service",
        0o644,
        read("tcptrace/packaging/tcptrace.service")?,
    ));
    items.push(file(
        "usr/share/doc/tcptrace/README.md",
        0o644,
        read("README.md")?,
    ));
    // The README links to these pages: they keep their place beside it.
    let mut pages: Vec<PathBuf> = fs::read_dir(root.join("docs"))
        .context("cannot list docs/")?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "md"))
        .collect();
    pages.sort();
    for page in pages {
        let name = page.file_name().unwrap_or_default().to_string_lossy();
        items.push(file(
            &format!("usr/share/doc/tcptrace/docs/{name}"),
            0o644,
            read(&format!("docs/{name}"))?,
        ));
    }
    let mut copyright =
        b"Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\
Upstream-Name: tcptrace\n\n\
Files: *\nCopyright: the tcptrace authors\nLicense: MIT or Apache-2.0\n\n\
License: MIT\n"
            .to_vec();
    for line in String::from_utf8_lossy(&read("LICENSE-MIT")?).lines() {
        // DEP-5: continuation lines start with a space, empty ones are " .".
        copyright.extend_from_slice(
            if line.is_empty() {
                b" .\n".to_vec()
            } else {
                format!(" {line}\n").into_bytes()
            }
            .as_slice(),
        );
    }
    copyright.extend_from_slice(
        b"\nLicense: Apache-2.0\n On Debian systems the full text is in \
          /usr/share/common-licenses/Apache-2.0.\n",
    );
    items.push(file("usr/share/doc/tcptrace/copyright", 0o644, copyright));
    items.push(file(
        "usr/share/doc/tcptrace/LICENSE-MIT",
        0o644,
        read("LICENSE-MIT")?,
    ));
    items.push(file(
        "usr/share/doc/tcptrace/LICENSE-APACHE",
        0o644,
        read("LICENSE-APACHE")?,
    ));
    Ok(items)
}

fn put(dest: &Path, item: &Item) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = dest.parent() {
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    fs::write(dest, &item.bytes).with_context(|| format!("cannot write {}", dest.display()))?;
    fs::set_permissions(dest, fs::Permissions::from_mode(item.mode))
        .with_context(|| format!("cannot set the mode of {}", dest.display()))
}

/// A man page or completion script, from the binary being packaged.
pub fn generated(bin: &Path, what: &str) -> Result<Vec<u8>> {
    let out = Command::new(bin).args(["generate", what]).output()?;
    if !out.status.success() || out.stdout.is_empty() {
        bail!(
            "tcptrace generate {what} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out.stdout)
}

/// `gzip -9n`, as Debian compresses man pages (no name or time inside, so
/// the same page gives the same bytes).
fn gzip(bytes: &[u8]) -> Result<Vec<u8>> {
    use std::io::Write;
    use std::process::Stdio;
    let mut child = Command::new("gzip")
        .args(["-9n"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot run gzip")?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(bytes)
        .context("gzip")?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("gzip failed");
    }
    Ok(out.stdout)
}
