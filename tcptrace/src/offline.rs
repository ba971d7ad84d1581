//! `tcptrace read` and `tcptrace report`: work on recordings, no kernel
//! needed.

use std::io::{self, Write};

use anyhow::anyhow;

use crate::Failure;
use crate::cli::{ReadArgs, ReportArgs};
use crate::otlp;
use tcptrace_core::analyse::Analysis;
use tcptrace_core::analyse::html::Pictures;
use tcptrace_core::filter::{Admit, Filter};
use tcptrace_core::model::Clock;
use tcptrace_core::model::Item;
use tcptrace_core::model::Spec;
use tcptrace_core::model::Stats;
use tcptrace_core::output::{OutputFormat, Printer, Style, TimeFormat};
use tcptrace_core::recording::read;
use tcptrace_core::recording::{self, Recorder};
use tcptrace_core::words::plural;

/// Prints recorded rows as the live run printed them.
pub fn read(args: ReadArgs) -> Result<(), Failure> {
    let mut filter = Filter::new(args.filter.spec());
    let style = args.output.style();
    let header_line = style.format == OutputFormat::Text && !args.output.no_header;
    if args.tail && (args.files.len() != 1 || args.files[0].as_os_str() == "-") {
        return Err(Failure::BadInput(anyhow!(
            "--tail follows one file (the newest of a rotation), not {}",
            if args.files.len() == 1 {
                "stdin".to_string()
            } else {
                format!("{} files", args.files.len())
            }
        )));
    }
    if let Some(path) = &args.write {
        return rewrite(&args, path, &mut filter);
    }
    if let Some(endpoint) = &args.otlp.otlp {
        return ship(&args, endpoint, &mut filter);
    }
    let source = if args.tail {
        Source::Tail(&args.files[0])
    } else {
        Source::Files(&args.files)
    };
    print_rows(source, args.lenient, &mut filter, style, header_line)
}

enum Source<'a> {
    Files(&'a [std::path::PathBuf]),
    /// One file, followed as it grows and rotates.
    Tail(&'a std::path::Path),
}

/// Streams the rows of `files` that pass `filter` to stdout.
fn print_rows(
    source: Source,
    lenient: bool,
    filter: &mut Filter,
    style: Style,
    header_line: bool,
) -> Result<(), Failure> {
    let stdout = io::stdout();
    // Shared with the follower, which flushes it before it waits.
    let out = std::cell::RefCell::new(io::BufWriter::with_capacity(1 << 16, stdout.lock()));
    let mut printer: Option<Printer> = None;
    let mut warned_no_header = false;
    let bar = match source {
        Source::Files(files) => progress_bar(files, ProgressFor::Read),
        Source::Tail(_) => None,
    };
    let sink = |item| -> io::Result<()> {
        let mut out = out.borrow_mut();
        let out = &mut *out;
        match item {
            Item::Header(h) => match &mut printer {
                Some(p) => p.set_clock(h.clock()),
                None => {
                    let p = Printer::new(style, h.clock());
                    if header_line {
                        p.header(out)?;
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
                        p.row(out, r)?;
                    }
                }
            }
        }
        Ok(())
    };
    let result = match source {
        Source::Files(files) => read::read(files, lenient, bar.as_ref(), sink),
        Source::Tail(path) => {
            let mut idle = || {
                let _ = out.borrow_mut().flush();
            };
            read::tail(path, lenient, &mut idle, sink)
        }
    };
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    let written = match result {
        Err(bad) => return Err(Failure::BadInput(anyhow!(bad.0))),
        Ok(r) => r.and_then(|()| out.borrow_mut().flush()),
    };
    match written {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(Failure::Other(anyhow!("cannot write to stdout: {e}"))),
        Ok(()) => Ok(()),
    }
}

/// `read -w`: the rows the filter keeps, and the notes, recorded again
/// (in the other format, or the files of a rotation as one).
fn rewrite(args: &ReadArgs, path: &std::path::Path, filter: &mut Filter) -> Result<(), Failure> {
    let mut recorder: Option<Recorder> = None;
    let mut stats: Option<Stats> = None;
    let mut failed: Option<String> = None;
    let opts = recording::Options {
        path: path.to_path_buf(),
        force: args.force,
        rotate_size: None,
        rotate_keep: None,
        format: args.write_format,
        skaddr: args.output.show_skaddr,
    };
    let bar = progress_bar(&args.files, ProgressFor::Report);
    let result = read::read(&args.files, args.lenient, bar.as_ref(), |item| {
        let r = match (item, &mut recorder) {
            (Item::Header(mut h), None) => {
                // One file now, whatever the parts were.
                h.part = 0;
                recorder = Some(Recorder::create(opts.clone(), *h)?);
                return Ok(());
            }
            (Item::Header(_), Some(_)) => return Ok(()),
            (_, None) => {
                return Err(anyhow!(
                    "the recording has no header: rows without one cannot be recorded again"
                ));
            }
            (Item::Row(row), Some(r)) => match filter.admit(&row) {
                Admit::Show(held) => held
                    .as_deref()
                    .into_iter()
                    .chain(std::iter::once(&row))
                    .try_for_each(|row| r.row(row)),
                _ => Ok(()),
            },
            (Item::Gap(g), Some(r)) => r.note(&g),
            (Item::Holders(h), Some(r)) => r.note(&h),
            (Item::Stats(s), Some(_)) => {
                stats = Some(s);
                Ok(())
            }
        };
        r.map_err(|f| {
            failed = Some(f.message.clone());
            anyhow!(f.message)
        })
    });
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    let result = result.map_err(|bad| Failure::BadInput(anyhow!(bad.0)))?;
    if let Err(e) = result {
        return Err(if failed.is_some() {
            Failure::Other(e)
        } else {
            Failure::BadInput(e)
        });
    }
    let Some(r) = recorder else {
        return Err(Failure::BadInput(anyhow!("the recording has no header")));
    };
    let done = match stats {
        Some(mut s) => {
            // What this file holds, once filtered.
            s.events = r.events;
            r.finish(s)
        }
        None => r.close(),
    };
    done.map_err(|f| Failure::Other(anyhow!(f.message)))
}

/// `read --otlp`: the rows the filters keep, to the collector, as the
/// live run would have sent them; returns once the collector has
/// acknowledged them all (or refused some: then status 1).
fn ship(args: &ReadArgs, endpoint: &otlp::Endpoint, filter: &mut Filter) -> Result<(), Failure> {
    let spool = args.otlp.otlp_spool.as_deref().map(|d| {
        (
            d,
            args.otlp
                .otlp_spool_size
                .unwrap_or(otlp::DEFAULT_SPOOL_SIZE),
        )
    });
    let exporter = otlp::Exporter::start(endpoint, &args.otlp.otlp_headers, spool, true, None)
        .map_err(Failure::BadInput)?;
    let style = args.output.style();
    let mut exporter = Some(exporter);
    let mut feed: Option<otlp::Feed> = None;
    let bar = progress_bar(&args.files, ProgressFor::Report);
    let result = read::read(
        &args.files,
        args.lenient,
        bar.as_ref(),
        |item| -> Result<(), ()> {
            let clock = match &item {
                Item::Header(h) => Some(h.clock()),
                _ => None,
            };
            if let (Some(c), Some(f)) = (clock, &mut feed) {
                f.set_clock(c);
            }
            let f = match (&mut feed, &mut exporter) {
                (Some(f), _) => f,
                (None, e) => {
                    let e = e.take().expect("the feed takes the exporter once");
                    feed.insert(otlp::Feed::new(e, style, clock.unwrap_or_else(Clock::now)))
                }
            };
            if let Item::Row(row) = item
                && let Admit::Show(held) = filter.admit(&row)
            {
                for r in held.as_deref().into_iter().chain(std::iter::once(&row)) {
                    f.push_wait(r);
                }
            }
            Ok(())
        },
    );
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    let exporter = feed.map(|f| f.exporter).or(exporter);
    let summary = exporter.map(|e| e.finish(None));
    result
        .map_err(|bad| Failure::BadInput(anyhow!(bad.0)))?
        .ok();
    let Some(summary) = summary else {
        return Ok(());
    };
    let c = summary.counts;
    eprintln!(
        "tcptrace: otlp: {} sent to {}, {} dropped",
        plural(c.sent, "record", "records"),
        summary.shown,
        c.dropped
    );
    if c.dropped > 0 {
        return Err(Failure::Other(anyhow!(
            "{} could not be delivered",
            plural(c.dropped, "record", "records")
        )));
    }
    Ok(())
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
            Source::Files(&args.files),
            args.lenient,
            &mut filter,
            style,
            args.format == OutputFormat::Text,
        );
    }
    let mut analysis = Analysis::new();
    let mut pictures = args.html.as_ref().map(|_| Pictures::new());
    let bar = progress_bar(&args.files, ProgressFor::Report);
    let read = read::read(
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
