//! The eBPF object built into tcptrace, made loadable: bpf-linker leaves
//! Rust generic names (`MaybeUninit<u8>`, from aya-log's globals) in its
//! BTF, which the kernel refuses, and the tp_btf programs cannot load
//! without that BTF. The names are rewritten in place before aya sees the
//! object.

use anyhow::{Context, Result, bail};

use crate::kernel::btf;

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tcptrace"));

/// A copy of the object, 8-byte aligned as the ELF parser wants it.
pub struct Object {
    words: Vec<u64>,
    len: usize,
}

impl Object {
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: `words` holds at least `len` initialised bytes; u8 has no
        // alignment or validity requirements.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr().cast(), self.len) }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`, and `self` is borrowed mutably.
        unsafe { std::slice::from_raw_parts_mut(self.words.as_mut_ptr().cast(), self.len) }
    }
}

/// The built-in object with its BTF names made acceptable to the kernel.
pub fn loadable() -> Result<Object> {
    let mut object = Object {
        words: vec![0; OBJECT.len().div_ceil(8)],
        len: OBJECT.len(),
    };
    object.bytes_mut().copy_from_slice(OBJECT);
    if let Some(range) = section(object.bytes(), ".BTF")? {
        let changed = btf::sanitize_names(&mut object.bytes_mut()[range])
            .context("the eBPF object's BTF is malformed")?;
        log::debug!("renamed {changed} BTF names of the eBPF object");
    }
    Ok(object)
}

/// Where section `name` lies in a little-endian ELF64 file.
fn section(elf: &[u8], name: &str) -> Result<Option<std::ops::Range<usize>>> {
    let get = |o: usize, n: usize| -> Result<u64> {
        let b = elf.get(o..o + n).context("the eBPF object is cut off")?;
        Ok(b.iter()
            .rev()
            .fold(0u64, |acc, &byte| acc << 8 | u64::from(byte)))
    };
    if elf.get(0..6) != Some(b"\x7fELF\x02\x01") {
        bail!("the eBPF object is not a little-endian ELF64 file");
    }
    let (shoff, shentsize, shnum, shstrndx) = (
        get(0x28, 8)? as usize,
        get(0x3a, 2)? as usize,
        get(0x3c, 2)? as usize,
        get(0x3e, 2)? as usize,
    );
    let header = |i: usize| -> Result<(u64, std::ops::Range<usize>)> {
        let h = shoff + i * shentsize;
        let (off, size) = (get(h + 24, 8)? as usize, get(h + 32, 8)? as usize);
        if elf.get(off..off + size).is_none() {
            bail!("section {i} of the eBPF object lies outside it");
        }
        Ok((get(h, 4)?, off..off + size))
    };
    let (_, names) = header(shstrndx)?;
    for i in 0..shnum {
        let (name_off, range) = header(i)?;
        let rest = elf
            .get(names.start + name_off as usize..names.end)
            .unwrap_or(&[]);
        if rest.strip_prefix(name.as_bytes()).and_then(|r| r.first()) == Some(&0) {
            return Ok(Some(range));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_built_in_object_has_btf_and_keeps_its_size() {
        let object = loadable().unwrap();
        assert_eq!(object.bytes().len(), OBJECT.len());
        let range = section(object.bytes(), ".BTF").unwrap().expect(".BTF");
        // Sanitizing again changes nothing: every name is an identifier now.
        let mut copy = object.bytes()[range].to_vec();
        assert_eq!(btf::sanitize_names(&mut copy).unwrap(), 0);
    }

    #[test]
    fn a_generic_name_becomes_an_identifier_and_nothing_else_moves() {
        let mut original = OBJECT.to_vec();
        let range = section(&original, ".BTF").unwrap().unwrap();
        let changed = btf::sanitize_names(&mut original[range.clone()]).unwrap();
        assert!(
            changed > 0,
            "aya-log's Global<u8> should leave MaybeUninit<u8>"
        );
        let fixed = loadable().unwrap();
        let strings = String::from_utf8_lossy(&fixed.bytes()[range]).into_owned();
        assert!(strings.contains("MaybeUninit_u8_"), "{strings}");
        assert!(!strings.contains("MaybeUninit<"));
        assert!(strings.contains(".rodata"), "section names stay");
    }

    #[test]
    fn a_file_that_is_not_elf_is_an_error() {
        assert!(section(b"not an object", ".BTF").is_err());
        assert!(section(b"\x7fELF\x02\x01", ".BTF").is_err());
    }
}
