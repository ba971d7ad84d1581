//! Recordings come from files anyone may have edited: every line, and the
//! streaming reader around it, must give a row, a header, a stats object or
//! an error, never a panic. The analysis takes whatever parses. Binary
//! recordings too: the whole reader (framing, checksums, cut-off ends), and
//! the record decoder alone, which random bytes rarely reach past a
//! checksum.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tcptrace_core::analyse::Analysis;
use tcptrace_core::recording::binary::Decoder;
use tcptrace_core::recording::read as replay;

fuzz_target!(|data: &[u8]| {
    let mut analysis = Analysis::new();
    for line in data.split(|&b| b == b'\n') {
        if let Ok(item) = replay::parse_line(line) {
            analysis.add(item);
        }
    }
    // Both ways of meeting damage: stop at it, or skip it and go on.
    let lenient = data.len() % 2 == 0;
    let _ = replay::read_reader("fuzz", data, lenient, |item| -> Result<(), ()> {
        analysis.add(item);
        Ok(())
    });
    let _ = Decoder::default().chunk(data, &mut |item| -> Result<(), ()> {
        analysis.add(item);
        Ok(())
    });
    let report = analysis.report(5);
    let _ = report.text();
    // The kernel-facing parsers read files too (tracefs format, BTF).
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = tcptrace::layout::parse_reset(text);
    }
    let _ = tcptrace::btf::Btf::parse(data).map(|b| b.path_offset("net", &["ns", "inum"]));
});
