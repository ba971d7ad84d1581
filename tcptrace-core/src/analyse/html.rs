//! Pictures for `tcptrace report --html`: one self-contained page (inline
//! SVG and CSS, nothing fetched) with what people would rather look at than
//! read: sockets per state over time (the continuous version of repeated
//! netstat snapshots), connection lifelines coloured by state, and
//! time-in-state histograms.
//!
//! Gathered in the report's one streaming pass, in bounded memory: the time
//! series is thinned as it grows, lifelines are kept for the first sockets
//! only, and refused connects are kept as counts per time slot.
//!
//! Above them, one availability band per listening port (from the report's
//! listener section): when something listened, when nothing did, and the
//! connects refused.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;

use super::finwait2::FinWait2;
use crate::analyse::Report;
use crate::model::{Close, Origin, Row};
use crate::model::{Phase, State};

/// Samples of the time series kept at most (thinned by half when full).
const MAX_SAMPLES: usize = 2048;
const MAX_LIFELINES: usize = 120;
/// Left and right margins of the state chart (its time axis).
const SERIES_PAD: f64 = 40.0;
/// Refused connects are remembered per port as (time, count) slots; when a
/// port has this many, neighbours merge.
const MAX_REFUSED_SLOTS: usize = 1024;
/// Time-in-state buckets: below 0.1 ms, 1 ms, 10 ms, ... 100 s, and above.
const BUCKET_LABELS: [&str; 8] = [
    "<0.1ms", "<1ms", "<10ms", "<100ms", "<1s", "<10s", "<100s", "≥100s",
];

struct Lifeline {
    sock: u64,
    owner: String,
    /// Latest local address (a connect's first one has port 0).
    local: std::net::SocketAddr,
    /// (start, state) of each state it went through; the last lasts to `end`.
    segments: Vec<(u64, State)>,
    end: Option<u64>,
}

#[derive(Default)]
pub struct Pictures {
    now: [u32; State::SLOTS],
    state_of: HashMap<u64, State>,
    samples: Vec<(u64, [u32; State::SLOTS])>,
    /// Minimum time between two samples; doubles at each thinning.
    gap_ns: u64,
    lifelines: Vec<Lifeline>,
    line_of: HashMap<u64, usize>,
    dwell: BTreeMap<State, [u64; 8]>,
    first_ns: Option<u64>,
    last_ns: u64,
    /// (netns, port) -> refused connects as (first time, count) slots.
    refused: BTreeMap<(u32, u16), Vec<(u64, u64)>>,
    /// Minimum time a refused slot spans; doubles at each merge.
    refused_gap_ns: u64,
    /// Time in FIN_WAIT2 of connections handed to the time-wait table.
    fin_wait2: FinWait2,
}

impl Pictures {
    pub fn new() -> Pictures {
        Pictures::default()
    }

    pub fn add(&mut self, r: &Row) {
        let t = &r.t;
        self.first_ns = Some(self.first_ns.map_or(t.ts_ns, |f| f.min(t.ts_ns)));
        self.last_ns = self.last_ns.max(t.ts_ns);
        // Sockets per state. Time-wait sockets count from the table's rows.
        let left = self.state_of.remove(&r.sock);
        if let Some(old) = left {
            self.now[old.slot()] = self.now[old.slot()].saturating_sub(1);
        }
        let entered = (t.new != State::CLOSE).then_some(t.new);
        if let Some(new) = entered {
            self.now[new.slot()] += 1;
            self.state_of.insert(r.sock, new);
        }
        if self.samples.last().is_some_and(|(last, _)| t.ts_ns < *last) {
            self.backdate(t.ts_ns, left, entered);
        } else {
            self.sample(t.ts_ns);
        }
        if r.close == Some(Close::Refused) {
            self.refuse(t.netns, t.remote.port(), t.ts_ns);
        }

        if r.origin != Origin::Snapshot
            && t.old != State::CLOSE
            && let Some(ns) = self.fin_wait2.settle(r)
        {
            self.count_dwell(t.old, ns);
        }
        for ns in self.fin_wait2.expired(t.ts_ns) {
            self.count_dwell(State::FIN_WAIT2, ns);
        }

        let line = match self.line_of.get(&r.sock) {
            Some(&i) => Some(i),
            None if self.lifelines.len() < MAX_LIFELINES && !r.origin.is_time_wait() => {
                let owner = r
                    .owner
                    .map(|o| o.comm.as_str().into_owned())
                    .unwrap_or_else(|| "-".into());
                self.lifelines.push(Lifeline {
                    sock: r.sock,
                    owner,
                    local: t.local,
                    segments: Vec::new(),
                    end: None,
                });
                self.line_of.insert(r.sock, self.lifelines.len() - 1);
                Some(self.lifelines.len() - 1)
            }
            None => None,
        };
        if let Some(i) = line {
            let l = &mut self.lifelines[i];
            l.local = t.local;
            if t.new == State::CLOSE {
                l.end = Some(t.ts_ns);
            } else {
                l.segments.push((t.ts_ns, t.new));
                l.end = None;
            }
        }
    }

    fn count_dwell(&mut self, state: State, ns: u64) {
        self.dwell.entry(state).or_default()[dwell_bucket(ns)] += 1;
    }

    /// A row dated before the latest sample (a time-wait table row takes
    /// the kernel's moment, found by a later read): its change counts from
    /// its own time, in every sample since.
    fn backdate(&mut self, ts: u64, left: Option<State>, entered: Option<State>) {
        let apply = |c: &mut [u32; State::SLOTS]| {
            if let Some(old) = left {
                c[old.slot()] = c[old.slot()].saturating_sub(1);
            }
            if let Some(new) = entered {
                c[new.slot()] += 1;
            }
        };
        let at = self.samples.partition_point(|(s, _)| *s < ts);
        for (_, c) in &mut self.samples[at..] {
            apply(c);
        }
        if self.samples.get(at).is_some_and(|(s, _)| *s == ts) {
            return;
        }
        // A step of its own, from the counts just before it.
        let mut counts = match at.checked_sub(1) {
            Some(i) => self.samples[i].1,
            None => [0; State::SLOTS],
        };
        apply(&mut counts);
        self.samples.insert(at, (ts, counts));
        if self.samples.len() >= MAX_SAMPLES {
            let kept: Vec<_> = self.samples.iter().step_by(2).copied().collect();
            self.samples = kept;
            self.gap_ns = (self.gap_ns * 2).max(1_000_000);
        }
    }

    fn refuse(&mut self, netns: u32, port: u16, ts: u64) {
        let gap = self.refused_gap_ns;
        let slots = self.refused.entry((netns, port)).or_default();
        match slots.last_mut() {
            Some((start, n)) if ts < *start + gap => *n += 1,
            _ => slots.push((ts, 1)),
        }
        if slots.len() >= MAX_REFUSED_SLOTS {
            let merged: Vec<(u64, u64)> = slots
                .chunks(2)
                .map(|c| (c[0].0, c.iter().map(|s| s.1).sum()))
                .collect();
            *slots = merged;
            self.refused_gap_ns = (gap * 2).max(1_000_000);
        }
    }

    fn sample(&mut self, ts: u64) {
        if self
            .samples
            .last()
            .is_some_and(|(last, _)| ts < last + self.gap_ns)
        {
            // Within the gap: the latest counts replace the last sample's.
            if let Some(last) = self.samples.last_mut() {
                last.1 = self.now;
            }
            return;
        }
        self.samples.push((ts, self.now));
        if self.samples.len() >= MAX_SAMPLES {
            let kept: Vec<_> = self.samples.iter().step_by(2).copied().collect();
            self.samples = kept;
            self.gap_ns = (self.gap_ns * 2).max(1_000_000);
        }
    }

    /// The page: the pictures, then the text report.
    pub fn page(&self, title: &str, report: &Report) -> String {
        let mut h = String::new();
        let _ = write!(
            h,
            "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{}</title>\n<style>\
             body{{font-family:sans-serif;margin:2em;color:#222}} svg{{background:#fafafa;border:1px solid #ddd;margin:1em 0}}\
             pre{{background:#f4f4f4;padding:1em;overflow-x:auto}} h2{{margin-top:1.5em}} .legend span{{margin-right:1em}}\
             </style></head><body>\n<h1>{}</h1>\n",
            escape(title),
            escape(title)
        );
        if !report.listeners.is_empty() {
            h.push_str("<h2>Availability of the listening ports</h2>\n");
            h.push_str(&self.availability_svg(report));
        }
        h.push_str("<h2>Sockets per state over time (log scale)</h2>\n");
        h.push_str(&self.series_svg());
        h.push_str("<h2>Connection lifelines</h2>\n");
        h.push_str(&self.lifelines_svg());
        h.push_str("<h2>Time in state</h2>\n");
        h.push_str(&self.dwell_svg());
        let _ = write!(
            h,
            "<h2>Report</h2>\n<pre>{}</pre>\n</body></html>\n",
            escape(&report.text())
        );
        h
    }

    fn span(&self) -> (u64, u64) {
        let first = self.first_ns.unwrap_or(0);
        (first, self.last_ns.max(first + 1))
    }

    fn series_svg(&self) -> String {
        let (w, hgt, pad) = (900.0, 300.0, SERIES_PAD);
        let (t0, t1) = self.span();
        let max = self
            .samples
            .iter()
            .flat_map(|(_, c)| c.iter())
            .copied()
            .max()
            .unwrap_or(0)
            .max(1);
        let x = |t: u64| pad + (t - t0) as f64 / (t1 - t0) as f64 * (w - 2.0 * pad);
        // Log scale: one LISTEN socket stays visible next to thousands in
        // TIME_WAIT. log(1 + n) keeps 0 on the axis.
        let scale = (1.0 + f64::from(max)).log10();
        let y = |n: u32| hgt - pad - (1.0 + f64::from(n)).log10() / scale * (hgt - 2.0 * pad);
        let mut s = format!(
            "<svg id=\"sockets-over-time\" data-scale=\"log\" width=\"{w}\" height=\"{hgt}\" viewBox=\"0 0 {w} {hgt}\" xmlns=\"http://www.w3.org/2000/svg\">"
        );
        axes(
            &mut s,
            w,
            hgt,
            pad,
            &format!("{max}"),
            &format!("{:.3} s", (t1 - t0) as f64 / 1e9),
        );
        let mut tick = 1u32;
        // Up to the top label, not over it.
        while tick < max && y(tick) - y(max) > 12.0 {
            let _ = write!(
                s,
                "<line class=\"tick\" x1=\"{}\" y1=\"{:.1}\" x2=\"{}\" y2=\"{:.1}\" stroke=\"#ddd\"/><text x=\"4\" y=\"{:.1}\" font-size=\"10\">{tick}</text>",
                pad,
                y(tick),
                w - pad,
                y(tick),
                y(tick) + 3.0
            );
            tick = tick.saturating_mul(10);
        }
        let mut legend = Vec::new();
        for st in 1..State::SLOTS {
            if self.samples.iter().all(|(_, c)| c[st] == 0) {
                continue;
            }
            let state = State(st as u8);
            // A count holds until the next sample: steps, not slopes.
            let mut points: Vec<String> = Vec::with_capacity(self.samples.len() * 2);
            let mut prev: Option<u32> = None;
            for (t, c) in &self.samples {
                if let Some(p) = prev {
                    points.push(format!("{:.1},{:.1}", x(*t), y(p)));
                }
                points.push(format!("{:.1},{:.1}", x(*t), y(c[st])));
                prev = Some(c[st]);
            }
            // The counts themselves, for tools: time (ns, the recording's
            // clock) and count of each sample.
            let counts: Vec<String> = self
                .samples
                .iter()
                .map(|(t, c)| format!("{t}:{}", c[st]))
                .collect();
            let _ = write!(
                s,
                "<polyline class=\"state\" data-state=\"{state}\" data-counts=\"{}\" fill=\"none\" stroke=\"{}\" stroke-width=\"2\" points=\"{}\"/>",
                counts.join(" "),
                colour(state),
                points.join(" ")
            );
            legend.push(state);
        }
        for (i, state) in legend.iter().enumerate() {
            let lx = pad + 10.0 + (i % 6) as f64 * 140.0;
            let ly = 14.0 + (i / 6) as f64 * 14.0;
            let _ = write!(
                s,
                "<rect x=\"{lx}\" y=\"{}\" width=\"10\" height=\"10\" fill=\"{}\"/><text x=\"{}\" y=\"{}\" font-size=\"11\">{state}</text>",
                ly - 9.0,
                colour(*state),
                lx + 14.0,
                ly
            );
        }
        s.push_str("</svg>\n");
        s
    }

    /// One band per listening port: up (a listener's life), down (nothing
    /// listening), and a mark per time slot with refused connects, on the
    /// state chart's time axis.
    fn availability_svg(&self, report: &Report) -> String {
        // The state chart's time axis, so that a window lines up with what
        // the sockets did in it.
        let (w, row, pad, top) = (900.0, 44.0, SERIES_PAD, 10.0);
        let hgt = top * 2.0 + row * report.listeners.len() as f64;
        let (t0, t1) = self.span();
        let x = |t: u64| pad + (t.clamp(t0, t1) - t0) as f64 / (t1 - t0) as f64 * (w - 2.0 * pad);
        let mut s = format!(
            "<svg id=\"availability\" width=\"{w}\" height=\"{hgt}\" viewBox=\"0 0 {w} {hgt}\" xmlns=\"http://www.w3.org/2000/svg\">"
        );
        for (i, p) in report.listeners.iter().enumerate() {
            let y = top + i as f64 * row + 12.0;
            let _ = write!(
                s,
                "<g class=\"port\" data-port=\"{}\"><text x=\"{pad}\" y=\"{}\" font-size=\"11\">port {}: up (green), nothing listening (red), {} connects refused (ticks)</text>",
                p.port,
                y - 2.0,
                p.port,
                p.refused
            );
            let band = 20.0;
            for l in &p.listeners {
                let (a, b) = (x(l.from_ns.unwrap_or(t0)), x(l.to_ns.unwrap_or(t1)));
                let _ = write!(
                    s,
                    "<rect class=\"up\" x=\"{a:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"#2ca02c\"><title>{}</title></rect>",
                    y + 2.0,
                    (b - a).max(1.0),
                    band,
                    escape(&format!(
                        "listening {} {} {}",
                        l.addr,
                        l.pid.map(|p| p.to_string()).unwrap_or_default(),
                        l.comm.as_deref().unwrap_or("")
                    ))
                );
            }
            for d in &p.down {
                let (a, b) = (x(d.start_ns.unwrap_or(t0)), x(d.end_ns.unwrap_or(t1)));
                let _ = write!(
                    s,
                    "<rect class=\"down\" data-refused=\"{}\" data-ms=\"{:.3}\" x=\"{a:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"#d62728\"><title>nothing listening for {:.3} ms, {} refused</title></rect>",
                    d.refused,
                    d.duration_ms,
                    y + 2.0,
                    (b - a).max(2.0),
                    band,
                    d.duration_ms,
                    d.refused
                );
            }
            let key = (p.netns.unwrap_or(0), p.port);
            for (ts, n) in self.refused.get(&key).into_iter().flatten() {
                let _ = write!(
                    s,
                    "<line class=\"refused\" data-count=\"{n}\" x1=\"{:.1}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"#000\"/>",
                    x(*ts),
                    y + band + 3.0,
                    x(*ts),
                    y + band + 9.0
                );
            }
            s.push_str("</g>");
        }
        s.push_str("</svg>\n");
        s
    }

    fn lifelines_svg(&self) -> String {
        let (w, row, pad, label_w) = (900.0, 14.0, 20.0, 230.0);
        let hgt = pad * 2.0 + row * self.lifelines.len().max(1) as f64;
        let (t0, t1) = self.span();
        let x = |t: u64| label_w + (t - t0) as f64 / (t1 - t0) as f64 * (w - label_w - pad);
        let mut s = format!(
            "<svg id=\"lifelines\" width=\"{w}\" height=\"{hgt}\" viewBox=\"0 0 {w} {hgt}\" xmlns=\"http://www.w3.org/2000/svg\">"
        );
        for (i, l) in self.lifelines.iter().enumerate() {
            let y = pad + i as f64 * row;
            let _ = write!(
                s,
                "<text x=\"4\" y=\"{}\" font-size=\"10\">{}</text>",
                y + row - 4.0,
                escape(&format!("{} {} {}", l.sock, l.owner, l.local))
            );
            for (j, (start, state)) in l.segments.iter().enumerate() {
                let end = l
                    .segments
                    .get(j + 1)
                    .map(|(t, _)| *t)
                    .or(l.end)
                    .unwrap_or(t1);
                let (x0, x1) = (x(*start), x(end).max(x(*start) + 1.0));
                let _ = write!(
                    s,
                    "<rect class=\"segment\" data-sock=\"{}\" data-state=\"{state}\" data-from-ns=\"{start}\" data-to-ns=\"{end}\" x=\"{x0:.1}\" y=\"{}\" width=\"{:.1}\" height=\"{}\" fill=\"{}\"><title>{state}</title></rect>",
                    l.sock,
                    y + 2.0,
                    x1 - x0,
                    row - 4.0,
                    colour(*state)
                );
            }
        }
        s.push_str("</svg>\n");
        s
    }

    fn dwell_svg(&self) -> String {
        let (cell_w, cell_h, cols) = (290.0, 150.0, 3usize);
        let n = self.dwell.len().max(1);
        let (w, hgt) = (cell_w * cols as f64, cell_h * n.div_ceil(cols) as f64);
        let mut s = format!(
            "<svg id=\"dwell-histograms\" width=\"{w}\" height=\"{hgt}\" viewBox=\"0 0 {w} {hgt}\" xmlns=\"http://www.w3.org/2000/svg\">"
        );
        // Connections still waiting for a time-wait row count with the
        // tracepoint's time in FIN_WAIT2.
        let mut dwell = self.dwell.clone();
        for ns in self.fin_wait2.waiting() {
            dwell.entry(State::FIN_WAIT2).or_default()[dwell_bucket(ns)] += 1;
        }
        for (i, (state, buckets)) in dwell.iter().enumerate() {
            let (ox, oy) = ((i % cols) as f64 * cell_w, (i / cols) as f64 * cell_h);
            let max = buckets.iter().copied().max().unwrap_or(0).max(1);
            let _ = write!(
                s,
                "<g class=\"histogram\" data-state=\"{state}\"><text x=\"{}\" y=\"{}\" font-size=\"12\">{state}</text>",
                ox + 10.0,
                oy + 16.0
            );
            for (b, &count) in buckets.iter().enumerate() {
                let bh = count as f64 / max as f64 * (cell_h - 50.0);
                let bx = ox + 10.0 + b as f64 * 34.0;
                let _ = write!(
                    s,
                    "<rect x=\"{bx:.1}\" y=\"{:.1}\" width=\"28\" height=\"{bh:.1}\" fill=\"{}\"><title>{} {count}</title></rect>\
                     <text x=\"{bx:.1}\" y=\"{:.1}\" font-size=\"8\">{}</text>",
                    oy + cell_h - 24.0 - bh,
                    colour(*state),
                    BUCKET_LABELS[b],
                    oy + cell_h - 12.0,
                    BUCKET_LABELS[b]
                );
            }
            s.push_str("</g>");
        }
        s.push_str("</svg>\n");
        s
    }
}

/// The histogram bucket of a time in state: below 0.1 ms, then by decade.
fn dwell_bucket(ns: u64) -> usize {
    match ns {
        n if n < 100_000 => 0,
        n => ((n as f64 / 100_000.0).log10().floor() as usize + 1).min(7),
    }
}

fn axes(s: &mut String, w: f64, h: f64, pad: f64, top: &str, right: &str) {
    let _ = write!(
        s,
        "<line x1=\"{pad}\" y1=\"{pad}\" x2=\"{pad}\" y2=\"{}\" stroke=\"#888\"/>\
         <line x1=\"{pad}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"#888\"/>\
         <text x=\"4\" y=\"{}\" font-size=\"10\">{top}</text><text x=\"{}\" y=\"{}\" font-size=\"10\">{right}</text>",
        h - pad,
        h - pad,
        w - pad,
        h - pad,
        pad + 4.0,
        w - pad - 40.0,
        h - pad + 14.0
    );
}

/// Colours by meaning, as the terminal's (opening cyan, listening blue,
/// established green, closing warm, closed grey), one shade per state.
fn colour(state: State) -> &'static str {
    match state {
        State::SYN_SENT => "#17becf",
        State::SYN_RECV => "#9edae5",
        State::LISTEN => "#1f77b4",
        State::ESTABLISHED => "#2ca02c",
        State::FIN_WAIT1 => "#ffbb78",
        State::FIN_WAIT2 => "#ff7f0e",
        State::CLOSE_WAIT => "#d62728",
        State::LAST_ACK => "#e377c2",
        State::CLOSING => "#bcbd22",
        State::TIME_WAIT => "#8c564b",
        s if s.phase() == Phase::Closing => "#c49c94",
        _ => "#999999",
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}
