//! Builds the eBPF object (tcptrace-ebpf, for the BPF target, with the nightly
//! toolchain and bpf-linker) into OUT_DIR, where `capture` embeds it.
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../tcptrace-ebpf");
    aya_build::build_ebpf(
        [Package {
            name: "tcptrace-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        Toolchain::default(),
    )
}
