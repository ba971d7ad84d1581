//! The reset tracepoints' record layout, read from their format files in
//! tracefs rather than assumed: `tcp_send_reset` gained its `reason` in 6.10,
//! and the layout may change again.

use std::collections::HashMap;

use anyhow::{Context, Result, bail};
use tcptrace_common::ResetLayout;

pub const CATEGORY: &str = "sock";
pub const NAME: &str = "inet_sock_set_state";
pub const RESET_CATEGORY: &str = "tcp";
pub const RESET_SENT: &str = "tcp_send_reset";
pub const RESET_RECEIVED: &str = "tcp_receive_reset";

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

/// The layout of a reset tracepoint: its socket address and, where present,
/// its reason, with the reason's names from the print format
/// (`__print_symbolic(REC->reason, { 0, "NOT_SPECIFIED" }, ...)`).
pub fn parse_reset(format: &str) -> Result<(ResetLayout, Vec<(u8, String)>)> {
    let fields = fields(format)?;
    let Some(&(1.., 8)) = fields.get("skaddr") else {
        bail!("no 8-byte skaddr field");
    };
    let reason_arg = matches!(fields.get("reason"), Some(&(_, 4)));
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
            present: 1,
            reason_arg: u32::from(reason_arg),
        },
        names,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_tracepoints_give_the_socket_and_the_reasons_names() {
        let (sent, names) =
            parse_reset(include_str!("testdata/tcp_send_reset-6.18.format")).unwrap();
        assert_eq!((sent.present, sent.reason_arg), (1, 1));
        assert_eq!(names[0], (0, "NOT_SPECIFIED".to_string()));
        assert!(
            names.contains(&(12, "TCP_ABORT_ON_LINGER".to_string())),
            "{names:?}"
        );
        let (received, names) =
            parse_reset(include_str!("testdata/tcp_receive_reset-6.18.format")).unwrap();
        assert_eq!((received.present, received.reason_arg), (1, 0));
        assert!(names.is_empty());
    }

    #[test]
    fn a_reset_format_without_the_socket_is_refused() {
        assert!(parse_reset("garbage").is_err());
        let f = include_str!("testdata/tcp_receive_reset-6.18.format");
        let no_skaddr = f.replace("skaddr;", "sk;");
        assert!(
            parse_reset(&no_skaddr)
                .unwrap_err()
                .to_string()
                .contains("skaddr")
        );
    }
}
