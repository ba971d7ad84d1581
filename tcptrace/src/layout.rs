//! The tracepoint's record layout, read from its format file in tracefs
//! rather than assumed: it changed before (5.6 widened `protocol` to 16 bits
//! and moved every address), and may again.

use std::collections::HashMap;

use anyhow::{Context, Result, bail};
use tcptrace_ebpf::{Layout, RECORD_MAX, ResetLayout};

pub const CATEGORY: &str = "sock";
pub const NAME: &str = "inet_sock_set_state";
pub const RESET_CATEGORY: &str = "tcp";
pub const RESET_SENT: &str = "tcp_send_reset";
pub const RESET_RECEIVED: &str = "tcp_receive_reset";

/// Field name, and the sizes tcptrace can read for it.
const FIELDS: [(&str, &[u32]); 11] = [
    ("skaddr", &[8]),
    ("oldstate", &[4]),
    ("newstate", &[4]),
    ("sport", &[2]),
    ("dport", &[2]),
    ("family", &[2]),
    ("protocol", &[1, 2]),
    ("saddr", &[4]),
    ("daddr", &[4]),
    ("saddr_v6", &[16]),
    ("daddr_v6", &[16]),
];

/// The `field:` lines of a format file: name -> (offset, size).
fn fields(format: &str) -> Result<HashMap<&str, (u32, u32)>> {
    let mut fields: HashMap<&str, (u32, u32)> = HashMap::new();
    for line in format.lines() {
        let Some(decl) = line.trim().strip_prefix("field:") else {
            continue;
        };
        let mut parts = decl.split(';').map(str::trim);
        let (Some(decl), Some(offset), Some(size)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let name = decl.rsplit([' ', '*']).next().unwrap_or("");
        let name = name.split('[').next().unwrap_or(name);
        let number = |kv: &str, key: &str| -> Result<u32> {
            kv.strip_prefix(key)
                .and_then(|v| v.parse().ok())
                .with_context(|| format!("cannot read {key:?} of field {name:?} in {line:?}"))
        };
        fields.insert(name, (number(offset, "offset:")?, number(size, "size:")?));
    }
    Ok(fields)
}

/// Parses a format file and checks every field tcptrace reads is there, has
/// a size it can read, and lies within the bytes the program copies.
pub fn parse(format: &str) -> Result<Layout> {
    let fields = fields(format)?;

    let get = |name: &str| -> Result<(u32, u32)> {
        let Some((_, sizes)) = FIELDS.iter().find(|(n, _)| *n == name) else {
            unreachable!("{name} is in FIELDS");
        };
        let Some(&(offset, size)) = fields.get(name) else {
            bail!("the {CATEGORY}:{NAME} tracepoint on this kernel has no field {name:?}");
        };
        if !sizes.contains(&size) {
            bail!(
                "field {name:?} of the {CATEGORY}:{NAME} tracepoint is {size} bytes on this kernel; \
                 tcptrace reads {sizes:?}"
            );
        }
        if (offset + size) as usize > RECORD_MAX {
            bail!(
                "field {name:?} ends at byte {}, past the {RECORD_MAX} bytes tcptrace copies",
                offset + size
            );
        }
        Ok((offset, size))
    };
    let (skaddr, _) = get("skaddr")?;
    let (oldstate, _) = get("oldstate")?;
    let (newstate, _) = get("newstate")?;
    let (sport, _) = get("sport")?;
    let (dport, _) = get("dport")?;
    let (family, _) = get("family")?;
    let (protocol, protocol_size) = get("protocol")?;
    let (saddr, _) = get("saddr")?;
    let (daddr, _) = get("daddr")?;
    let (saddr_v6, _) = get("saddr_v6")?;
    let (daddr_v6, _) = get("daddr_v6")?;
    let record_len = FIELDS
        .iter()
        .filter_map(|(n, _)| fields.get(n))
        .map(|(o, s)| o + s)
        .max()
        .unwrap_or(0);
    Ok(Layout {
        record_len,
        skaddr,
        oldstate,
        newstate,
        sport,
        dport,
        family,
        protocol,
        protocol_size,
        saddr,
        daddr,
        saddr_v6,
        daddr_v6,
    })
}

/// The layout of a reset tracepoint: its socket address and, where present,
/// its reason, with the reason's names from the print format
/// (`__print_symbolic(REC->reason, { 0, "NOT_SPECIFIED" }, ...)`).
pub fn parse_reset(format: &str) -> Result<(ResetLayout, Vec<(u8, String)>)> {
    let fields = fields(format)?;
    let Some(&(skaddr, 8)) = fields.get("skaddr") else {
        bail!("no 8-byte skaddr field");
    };
    let (reason, reason_size) = match fields.get("reason") {
        Some(&(o, 4)) => (o, 4),
        _ => (0, 0),
    };
    let record_len = (skaddr + 8).max(reason + reason_size);
    if record_len as usize > RECORD_MAX {
        bail!("fields end past the {RECORD_MAX} bytes tcptrace copies");
    }
    let mut names = Vec::new();
    if let Some(table) = format.split("REC->reason,").nth(1) {
        let table = table.split(')').next().unwrap_or("");
        for entry in table.split('{').skip(1) {
            let mut parts = entry.split(',');
            let (Some(n), Some(name)) = (parts.next(), parts.next()) else {
                continue;
            };
            let name = name.trim().trim_end_matches('}').trim().trim_matches('"');
            if let Ok(n) = n.trim().parse::<u8>() {
                names.push((n, name.to_string()));
            }
        }
    }
    Ok((
        ResetLayout {
            record_len,
            skaddr,
            reason,
            reason_size,
        },
        names,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_kernels_format() {
        let l = parse(include_str!("testdata/inet_sock_set_state-6.18.format")).unwrap();
        assert_eq!(
            l,
            Layout {
                record_len: 72,
                skaddr: 8,
                oldstate: 16,
                newstate: 20,
                sport: 24,
                dport: 26,
                family: 28,
                protocol: 30,
                protocol_size: 2,
                saddr: 32,
                daddr: 36,
                saddr_v6: 40,
                daddr_v6: 56,
            }
        );
    }

    /// The layout kernels before 5.6 had (8-bit protocol, packed addresses),
    /// written from the kernel's TRACE_EVENT definition of that time.
    #[test]
    fn older_layout_with_8_bit_protocol() {
        let old = "\
\tfield:const void * skaddr;\toffset:8;\tsize:8;\tsigned:0;
\tfield:int oldstate;\toffset:16;\tsize:4;\tsigned:1;
\tfield:int newstate;\toffset:20;\tsize:4;\tsigned:1;
\tfield:__u16 sport;\toffset:24;\tsize:2;\tsigned:0;
\tfield:__u16 dport;\toffset:26;\tsize:2;\tsigned:0;
\tfield:__u16 family;\toffset:28;\tsize:2;\tsigned:0;
\tfield:__u8 protocol;\toffset:30;\tsize:1;\tsigned:0;
\tfield:__u8 saddr[4];\toffset:31;\tsize:4;\tsigned:0;
\tfield:__u8 daddr[4];\toffset:35;\tsize:4;\tsigned:0;
\tfield:__u8 saddr_v6[16];\toffset:39;\tsize:16;\tsigned:0;
\tfield:__u8 daddr_v6[16];\toffset:55;\tsize:16;\tsigned:0;
";
        let l = parse(old).unwrap();
        assert_eq!(
            (
                l.protocol,
                l.protocol_size,
                l.saddr,
                l.daddr_v6,
                l.record_len
            ),
            (30, 1, 31, 55, 71)
        );
    }

    #[test]
    fn reset_tracepoints_give_the_socket_and_the_reasons_names() {
        let (sent, names) =
            parse_reset(include_str!("testdata/tcp_send_reset-6.18.format")).unwrap();
        assert_eq!(
            (sent.skaddr, sent.reason, sent.reason_size, sent.record_len),
            (16, 28, 4, 32)
        );
        assert_eq!(names[0], (0, "NOT_SPECIFIED".to_string()));
        assert!(
            names.contains(&(12, "TCP_ABORT_ON_LINGER".to_string())),
            "{names:?}"
        );
        let (received, names) =
            parse_reset(include_str!("testdata/tcp_receive_reset-6.18.format")).unwrap();
        assert_eq!(
            (received.skaddr, received.reason_size, received.record_len),
            (8, 0, 16)
        );
        assert!(names.is_empty());
    }

    #[test]
    fn missing_or_resized_fields_are_refused_with_their_name() {
        let f = include_str!("testdata/inet_sock_set_state-6.18.format");
        let no_sport = f.replace("__u16 sport;", "__u16 lport;");
        assert!(
            parse(&no_sport)
                .unwrap_err()
                .to_string()
                .contains("no field \"sport\"")
        );
        let wide = f.replace("offset:16;\tsize:4;", "offset:16;\tsize:8;");
        assert!(
            parse(&wide)
                .unwrap_err()
                .to_string()
                .contains("\"oldstate\" of the sock:inet_sock_set_state tracepoint is 8 bytes")
        );
        let far = f.replace("offset:56;", "offset:120;");
        assert!(
            parse(&far)
                .unwrap_err()
                .to_string()
                .contains("past the 128 bytes")
        );
        assert!(parse("garbage").is_err());
    }
}
