//! The container image, per architecture: an OCI image layout in a tar
//! (`oci-layout`, `index.json`, `blobs/sha256/`), built here without a
//! registry or a container engine. One gzipped layer holds the static
//! binary at /usr/bin/tcptrace, the entrypoint. Every timestamp is zero
//! and every owner root, so the same binary gives the same bytes.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::dist::Arch;

const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const INDEX: &str = "application/vnd.oci.image.index.v1+json";

/// A content-addressed blob: its bytes and `sha256:HEX`.
struct Blob {
    bytes: Vec<u8>,
    digest: String,
}

fn sha256(bytes: &[u8]) -> String {
    let hash = Sha256::digest(bytes);
    let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

impl Blob {
    fn new(bytes: Vec<u8>) -> Blob {
        let digest = sha256(&bytes);
        Blob { bytes, digest }
    }

    fn json(v: &Value) -> Blob {
        Blob::new(serde_json::to_vec(v).expect("JSON serializes"))
    }

    fn descriptor(&self, media_type: &str) -> Value {
        json!({"mediaType": media_type, "digest": self.digest, "size": self.bytes.len()})
    }
}

/// A tar header for root's `path`, at time zero.
fn header(path: &str, size: u64, mode: u32, kind: tar::EntryType) -> Result<tar::Header> {
    let mut h = tar::Header::new_gnu();
    h.set_path(path)?;
    h.set_size(size);
    h.set_mode(mode);
    h.set_entry_type(kind);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_cksum();
    Ok(h)
}

/// A tar of `dirs` and then `files` (path, mode, bytes).
fn tarball(dirs: &[&str], files: &[(&str, u32, &[u8])]) -> Result<Vec<u8>> {
    let mut t = tar::Builder::new(Vec::new());
    for d in dirs {
        let h = header(d, 0, 0o755, tar::EntryType::Directory)?;
        t.append(&h, std::io::empty())?;
    }
    for (path, mode, bytes) in files {
        let h = header(path, bytes.len() as u64, *mode, tar::EntryType::Regular)?;
        t.append(&h, *bytes)?;
    }
    Ok(t.into_inner()?)
}

/// gzip with no name and time zero: the same input, the same bytes.
fn gzip(bytes: &[u8]) -> Result<Vec<u8>> {
    use std::io::Write;
    let mut gz = flate2::GzBuilder::new()
        .mtime(0)
        .write(Vec::new(), flate2::Compression::best());
    gz.write_all(bytes)?;
    Ok(gz.finish()?)
}

/// Writes `out`/tcptrace-VERSION-MACHINE.oci.tar holding `binary`.
pub fn image(out: &Path, arch: Arch, binary: &[u8]) -> Result<PathBuf> {
    let version = env!("CARGO_PKG_VERSION");
    let layer_tar = tarball(
        &["usr/", "usr/bin/"],
        &[("usr/bin/tcptrace", 0o755, binary)],
    )?;
    // The config names the layer by its uncompressed digest, the manifest
    // by the compressed one.
    let diff_id = sha256(&layer_tar);
    let layer = Blob::new(gzip(&layer_tar)?);
    let config = Blob::json(&json!({
        "created": "1970-01-01T00:00:00Z",
        "architecture": arch.debian,
        "os": "linux",
        "config": {
            "Entrypoint": ["/usr/bin/tcptrace"],
            "Env": ["PATH=/usr/bin"],
            "Labels": {
                "org.opencontainers.image.title": "tcptrace",
                "org.opencontainers.image.version": version,
            },
        },
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "cargo xtask dist"}],
    }));
    let manifest = Blob::json(&json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST,
        "config": config.descriptor(CONFIG),
        "layers": [layer.descriptor(LAYER)],
        "annotations": {"org.opencontainers.image.version": version},
    }));
    let mut entry = manifest.descriptor(MANIFEST);
    entry["platform"] = json!({"architecture": arch.debian, "os": "linux"});
    entry["annotations"] = json!({"org.opencontainers.image.ref.name": version});
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": INDEX,
        "manifests": [entry],
    }))?;
    let layout = br#"{"imageLayoutVersion":"1.0.0"}"#;
    let blob_path = |b: &Blob| format!("blobs/sha256/{}", &b.digest["sha256:".len()..]);
    let (lp, cp, mp) = (blob_path(&layer), blob_path(&config), blob_path(&manifest));
    let archive = tarball(
        &["blobs/", "blobs/sha256/"],
        &[
            ("oci-layout", 0o644, layout),
            ("index.json", 0o644, &index),
            (&mp, 0o644, &manifest.bytes),
            (&cp, 0o644, &config.bytes),
            (&lp, 0o644, &layer.bytes),
        ],
    )?;
    let path = out.join(format!("tcptrace-{version}-{}.oci.tar", arch.machine));
    fs::write(&path, archive).with_context(|| format!("cannot write {}", path.display()))?;
    eprintln!("xtask: built {}", path.display());
    Ok(path)
}
