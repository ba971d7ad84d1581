// The programs are the binary (main.rs); this library target exists so that
// tcptrace's build script can name this crate as a build dependency, and
// cargo rebuilds the eBPF object when it changes.
#![no_std]
