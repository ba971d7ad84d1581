//! Byte helpers for the row writers: pieces appended to the output buffer
//! without `fmt`, which costs more than the row itself.
//!
//! Text and JSON rows are some twenty short pieces each, written for every
//! row shown or replayed; these are the copies, paddings and numbers both
//! writers share, each as cheap as the compiler can make it. All are
//! `#[inline]`: they lived in one module with the writers before, and a
//! call into another codegen unit cost a printing run 2-3% more
//! instructions.

use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::ptr;

/// Appends `s` to `b`. A row is some twenty pieces a few bytes long, and
/// `extend_from_slice` calls memcpy for any length it cannot see at compile
/// time: those calls cost more than the copying, a sixth of a printing run's
/// CPU. Up to 32 bytes this copies with two overlapping moves of a fixed
/// size instead, which compile to a few instructions.
#[inline(always)]
pub(super) fn put(b: &mut Vec<u8>, s: &[u8]) {
    let n = s.len();
    if n > 32 {
        b.extend_from_slice(s);
        return;
    }
    b.reserve(32);
    let len = b.len();
    // SAFETY: `reserve` left room for 32 bytes from `len`. Every copy reads
    // within `s` (each pair covers `0..n` from both ends, so never past
    // `n`) and writes within `len..len + n`, exactly the bytes `set_len`
    // then counts as initialised.
    unsafe {
        let (src, dst) = (s.as_ptr(), b.as_mut_ptr().add(len));
        if n >= 16 {
            ptr::copy_nonoverlapping(src, dst, 16);
            ptr::copy_nonoverlapping(src.add(n - 16), dst.add(n - 16), 16);
        } else if n >= 8 {
            ptr::copy_nonoverlapping(src, dst, 8);
            ptr::copy_nonoverlapping(src.add(n - 8), dst.add(n - 8), 8);
        } else if n >= 4 {
            ptr::copy_nonoverlapping(src, dst, 4);
            ptr::copy_nonoverlapping(src.add(n - 4), dst.add(n - 4), 4);
        } else if n > 0 {
            *dst = *src;
            *dst.add(n / 2) = *src.add(n / 2);
            *dst.add(n - 1) = *src.add(n - 1);
        }
        b.set_len(len + n);
    }
}

/// Appends `n` spaces (see [`put`]: `resize` calls memset).
#[inline(always)]
pub(super) fn pad(b: &mut Vec<u8>, mut n: usize) {
    const SPACES: [u8; 32] = [b' '; 32];
    while n > SPACES.len() {
        put(b, &SPACES);
        n -= SPACES.len();
    }
    put(b, &SPACES[..n]);
}

/// True if `bytes` print as they are in text and in a JSON string: printable
/// ASCII without quote or backslash. Nearly every command name is.
#[inline]
pub(super) fn is_plain(bytes: &[u8]) -> bool {
    bytes
        .iter()
        .all(|&c| (b' '..=b'~').contains(&c) && c != b'\\' && c != b'"')
}

/// `.` and six digits of microseconds.
#[inline]
pub(super) fn push_micros(b: &mut Vec<u8>, us: u32) {
    let mut digits = [b'.', b'0', b'0', b'0', b'0', b'0', b'0'];
    let mut n = us;
    for d in digits[1..].iter_mut().rev() {
        *d = b'0' + (n % 10) as u8;
        n /= 10;
    }
    put(b, &digits);
}

/// An address as `Display` shows it; IPv4 without the formatting machinery.
#[inline]
pub(super) fn push_ip(b: &mut Vec<u8>, ip: &IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            let (text, len) = ipv4_text(v4);
            put(b, &text[..len]);
        }
        IpAddr::V6(v6) => {
            let _ = write!(b, "{v6}");
        }
    }
}

/// `ADDR:PORT`, IPv6 in brackets, as `SocketAddr`'s `Display`.
#[inline]
pub(super) fn push_addr(b: &mut Vec<u8>, addr: &SocketAddr) {
    let mut digits = itoa::Buffer::new();
    let port = digits.format(addr.port());
    match addr.ip() {
        IpAddr::V4(v4) => {
            // The octets are built apart and copied in at once: a copy per
            // octet cost more than the digits.
            let (mut text, len) = ipv4_text(&v4);
            text[len] = b':';
            put(b, &text[..=len]);
            put(b, port.as_bytes());
        }
        IpAddr::V6(v6) => {
            let _ = write!(b, "[{v6}]:");
            put(b, port.as_bytes());
        }
    }
}

/// Each byte's decimal digits (left-aligned) and their count.
const OCTETS: [([u8; 3], u8); 256] = {
    let mut t = [([0u8; 3], 0u8); 256];
    let mut n = 0;
    while n < 256 {
        let (h, d, u) = ((n / 100) as u8, (n / 10 % 10) as u8, (n % 10) as u8);
        t[n] = match n {
            0..=9 => ([b'0' + u, 0, 0], 1),
            10..=99 => ([b'0' + d, b'0' + u, 0], 2),
            _ => ([b'0' + h, b'0' + d, b'0' + u], 3),
        };
        n += 1;
    }
    t
};

/// Dotted quad, room left for `:` and a port: (bytes, length). Each octet
/// is a fixed three-byte copy, advanced by its length.
#[inline]
fn ipv4_text(ip: &Ipv4Addr) -> ([u8; 24], usize) {
    let mut text = [0u8; 24];
    let mut len = 0;
    for (i, octet) in ip.octets().into_iter().enumerate() {
        if i > 0 {
            text[len] = b'.';
            len += 1;
        }
        let (digits, n) = OCTETS[usize::from(octet)];
        text[len..len + 3].copy_from_slice(&digits);
        len += usize::from(n);
    }
    (text, len)
}

/// Digits by `itoa`, which does two at a time from a table: a row has up
/// to seven numbers, the timestamp fourteen digits long.
#[inline]
pub(super) fn push_u64(b: &mut Vec<u8>, n: u64) {
    put(b, itoa::Buffer::new().format(n).as_bytes());
}

/// `n` as exactly `width` digits (the fraction after a decimal point).
#[inline]
pub(super) fn push_frac(b: &mut Vec<u8>, mut n: u64, width: usize) {
    let mut digits = [b'0'; 9];
    for d in digits[..width].iter_mut().rev() {
        *d = b'0' + (n % 10) as u8;
        n /= 10;
    }
    put(b, &digits[..width]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_and_numbers_print_as_display_does() {
        for octet in 0..=255u8 {
            for port in [0u16, 9, 10, 99, 100, 6389, 65535] {
                let addr = std::net::SocketAddr::from(([octet, 0, 255 - octet, 10], port));
                let mut b = Vec::new();
                push_addr(&mut b, &addr);
                assert_eq!(String::from_utf8(b).unwrap(), addr.to_string());
                let mut b = Vec::new();
                push_ip(&mut b, &addr.ip());
                assert_eq!(String::from_utf8(b).unwrap(), addr.ip().to_string());
            }
        }
        let v6: std::net::SocketAddr = "[fe80::1:2]:443".parse().unwrap();
        let mut b = Vec::new();
        push_addr(&mut b, &v6);
        assert_eq!(String::from_utf8(b).unwrap(), v6.to_string());
        for n in [0u64, 7, 10, 99, 100, 12_345, u64::MAX] {
            let mut b = Vec::new();
            push_u64(&mut b, n);
            assert_eq!(String::from_utf8(b).unwrap(), n.to_string());
        }
    }

    /// Every length `put` copies in its own way, and past them, after a
    /// prefix that leaves the vector's end anywhere in a block.
    #[test]
    fn put_and_pad_append_exactly_what_they_are_given() {
        let source: Vec<u8> = (1..=80).collect();
        for before in 0..3 {
            for n in 0..=source.len() {
                let mut b = vec![b'x'; before];
                put(&mut b, &source[..n]);
                pad(&mut b, n);
                let mut want = vec![b'x'; before];
                want.extend_from_slice(&source[..n]);
                want.resize(before + 2 * n, b' ');
                assert_eq!(b, want, "{before} before, {n} bytes");
            }
        }
    }
}
