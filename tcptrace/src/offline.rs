//! `tcptrace read` and `tcptrace report`: work on recordings, no kernel
//! needed.

use std::io::{self, Write};

use anyhow::anyhow;

use crate::Failure;
use crate::analyse::Analysis;
use crate::cli::{ReadArgs, ReportArgs};
use crate::filter::{Admit, Filter, Spec};
use crate::format::{Clock, OutputFormat, Printer, Style, TimeFormat};
use crate::html::Pictures;
use crate::replay::{self, Item};

/// Prints recorded rows as the live run printed them.
pub fn read(args: ReadArgs) -> Result<(), Failure> {
    let mut filter = Filter::new(args.filter.spec());
    let style = args.output.style();
    let header_line = style.format == OutputFormat::Text && !args.output.no_header;
    print_rows(&args.files, args.lenient, &mut filter, style, header_line)
}

/// Streams the rows of `files` that pass `filter` to stdout.
fn print_rows(
    files: &[std::path::PathBuf],
    lenient: bool,
    filter: &mut Filter,
    style: Style,
    header_line: bool,
) -> Result<(), Failure> {
    let stdout = io::stdout();
    let mut out = io::BufWriter::with_capacity(1 << 16, stdout.lock());
    let mut printer: Option<Printer> = None;
    let mut warned_no_header = false;
    let bar = progress_bar(files, ProgressFor::Read);
    let result = replay::read(files, lenient, bar.as_ref(), |item| -> io::Result<()> {
        match item {
            Item::Header(h) => match &mut printer {
                Some(p) => p.set_clock(h.clock()),
                None => {
                    let p = Printer::new(style, h.clock());
                    if header_line {
                        p.header(&mut out)?;
                    }
                    printer = Some(p);
                }
            },
            Item::Stats(_) | Item::Gap(_) | Item::Holders(_) => {}
            Item::Row(row) => {
                let p = printer.get_or_insert_with(|| {
                    // Rows without a header (cut from a recording): this
                    // boot's clock offset is the best guess for wall time.
                    if !warned_no_header {
                        warned_no_header = true;
                        eprintln!(
                            "tcptrace: warning: no recording header; times assume this boot's clock"
                        );
                    }
                    Printer::new(style, Clock::now())
                });
                if let Admit::Show(held) = filter.admit(&row) {
                    for r in held.as_deref().into_iter().chain(std::iter::once(&row)) {
                        p.row(&mut out, r)?;
                    }
                }
            }
        }
        Ok(())
    });
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    let written = match result {
        Err(bad) => return Err(Failure::BadInput(anyhow!(bad.0))),
        Ok(r) => r.and_then(|()| out.flush()),
    };
    match written {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(Failure::Other(anyhow!("cannot write to stdout: {e}"))),
        Ok(()) => Ok(()),
    }
}

#[derive(PartialEq)]
enum ProgressFor {
    Read,
    Report,
}

/// A progress bar on stderr, only for a person watching a terminal: never
/// when stderr is not a terminal, and for `read` not when the rows
/// themselves go to the terminal or into a pipe.
fn progress_bar(files: &[std::path::PathBuf], what: ProgressFor) -> Option<indicatif::ProgressBar> {
    use std::os::unix::fs::FileTypeExt;
    // SAFETY: isatty only inspects the descriptors.
    let (err_tty, out_tty) = unsafe { (libc::isatty(2) == 1, libc::isatty(1) == 1) };
    let out_pipe = std::fs::metadata("/proc/self/fd/1").is_ok_and(|m| m.file_type().is_fifo());
    if !err_tty || (what == ProgressFor::Read && (out_tty || out_pipe)) {
        return None;
    }
    let total: u64 = files
        .iter()
        .filter(|f| f.as_os_str() != "-")
        .filter_map(|f| std::fs::metadata(f).ok())
        .map(|m| m.len())
        .sum();
    let bar = indicatif::ProgressBar::with_draw_target(
        Some(total),
        indicatif::ProgressDrawTarget::stderr(),
    );
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{spinner} reading {bytes}/{total_bytes} [{wide_bar}] {bytes_per_sec}, {eta} left",
    ) {
        bar.set_style(style);
    }
    Some(bar)
}

pub fn report(args: ReportArgs) -> Result<(), Failure> {
    if let Some(tuple) = args.follow {
        // One connection's timeline: its rows, both sides, with time in state.
        let mut filter = Filter::new(Spec {
            follow: Some(tuple),
            ..Spec::default()
        });
        let style = Style {
            format: args.format,
            time: TimeFormat::Utc,
            show_skaddr: false,
            wide: false,
            color: false,
        };
        return print_rows(
            &args.files,
            args.lenient,
            &mut filter,
            style,
            args.format == OutputFormat::Text,
        );
    }
    let mut analysis = Analysis::new();
    let mut pictures = args.html.as_ref().map(|_| Pictures::new());
    let bar = progress_bar(&args.files, ProgressFor::Report);
    let read = replay::read(
        &args.files,
        args.lenient,
        bar.as_ref(),
        |item| -> Result<(), ()> {
            if let (Some(p), Item::Row(row)) = (&mut pictures, &item) {
                p.add(row);
            }
            analysis.add(item);
            Ok(())
        },
    );
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    read.map_err(|bad| Failure::BadInput(anyhow!(bad.0)))?.ok();
    let report = analysis.report(args.top);
    if let (Some(path), Some(p)) = (&args.html, &pictures) {
        let title = format!(
            "tcptrace report: {}",
            args.files
                .iter()
                .map(|f| f.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
        std::fs::write(path, p.page(&title, &report))
            .map_err(|e| Failure::Other(anyhow!("cannot write {}: {e}", path.display())))?;
    }
    let text = match args.format {
        OutputFormat::Text => report.text(),
        OutputFormat::Json => {
            let mut s =
                serde_json::to_string_pretty(&report).map_err(|e| Failure::Other(e.into()))?;
            s.push('\n');
            s
        }
    };
    match io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() != io::ErrorKind::BrokenPipe => {
            Err(Failure::Other(anyhow!("cannot write to stdout: {e}")))
        }
        _ => Ok(()),
    }
}
