//! tt-otlp-receiver: an OTLP/HTTP logs receiver for the tests. Decodes each
//! ExportLogsServiceRequest (gzip or not) with the OpenTelemetry protobuf
//! definitions and appends every log record to a file as one JSON line:
//! its times, severity, body, attributes, the resource's attributes and
//! the request's headers. Written before the answer, so that what the
//! client was told was taken is in the file.
//!
//!   tt-otlp-receiver --listen 127.0.0.1:PORT --out FILE [--status CODE]
//!                    [--unavailable N]
//!
//! `--discard` answers 200 without decoding or keeping anything: a
//! receiver cheap enough not to be what an exporter benchmark measures.
//! `--status CODE` answers every request with CODE and keeps nothing;
//! `--unavailable N` answers the first N requests 503 with Retry-After: 1;
//! `--die-after N` exits once it has written the records of the Nth
//! request, before answering it (a collector that dies mid-request).
//! Prints `listening` on stdout once bound.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::logs::v1::{
    ExportLogsServiceRequest, ExportLogsServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value::Value};
use prost::Message;
use serde_json::{Value as Json, json};

struct Options {
    listen: String,
    out: String,
    status: Option<u16>,
    unavailable: u64,
    die_after: Option<u64>,
    discard: bool,
}

fn options() -> Options {
    let mut args = std::env::args().skip(1);
    let mut o = Options {
        listen: String::new(),
        out: String::new(),
        status: None,
        unavailable: 0,
        die_after: None,
        discard: false,
    };
    while let Some(a) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--listen" => o.listen = value(),
            "--out" => o.out = value(),
            "--discard" => o.discard = true,
            "--status" => o.status = Some(value().parse().expect("--status CODE")),
            "--unavailable" => o.unavailable = value().parse().expect("--unavailable N"),
            "--die-after" => o.die_after = Some(value().parse().expect("--die-after N")),
            other => panic!("unknown argument {other}"),
        }
    }
    assert!(
        !o.listen.is_empty() && !o.out.is_empty(),
        "--listen and --out"
    );
    o
}

fn main() {
    let o = Arc::new(options());
    let listener = TcpListener::bind(&o.listen).expect("bind");
    println!("listening");
    std::io::stdout().flush().ok();
    let out = Arc::new(Mutex::new(
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&o.out)
            .expect("open --out"),
    ));
    let requests = Arc::new(AtomicU64::new(0));
    for stream in listener.incoming().map_while(Result::ok) {
        let (o, out, requests) = (Arc::clone(&o), Arc::clone(&out), Arc::clone(&requests));
        std::thread::spawn(move || {
            let _ = serve(stream, &o, &out, &requests);
        });
    }
}

/// One connection: requests until the client closes it.
fn serve(
    stream: TcpStream,
    o: &Options,
    out: &Mutex<std::fs::File>,
    requests: &AtomicU64,
) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let mut headers = BTreeMap::new();
        loop {
            let mut h = String::new();
            reader.read_line(&mut h)?;
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
            }
        }
        let len: usize = headers
            .get("content-length")
            .and_then(|l| l.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0; len];
        reader.read_exact(&mut body)?;
        let n = requests.fetch_add(1, Ordering::SeqCst);
        let (code, reason) = if n < o.unavailable {
            (503, "Service Unavailable")
        } else if let Some(code) = o.status {
            (code, "Refused")
        } else {
            (200, "OK")
        };
        if code == 200 && !o.discard {
            let mut lines = String::new();
            for r in decode(&line, &headers, &body) {
                lines.push_str(&format!("{r}\n"));
            }
            // One write per request: a reader sees whole lines but the last.
            let mut f = out.lock().unwrap_or_else(|p| p.into_inner());
            f.write_all(lines.as_bytes())?;
            if o.die_after == Some(n + 1) {
                std::process::exit(3);
            }
        }
        let answer = if code == 200 {
            ExportLogsServiceResponse::default().encode_to_vec()
        } else {
            b"refused by tt-otlp-receiver".to_vec()
        };
        let retry = if code == 503 {
            "Retry-After: 1\r\n"
        } else {
            ""
        };
        // One write: a head and a body written apart wait for the
        // client's delayed ACK (Nagle), some 40 ms a request.
        let mut response = format!(
            "HTTP/1.1 {code} {reason}\r\nContent-Type: application/x-protobuf\r\n{retry}\
             Content-Length: {}\r\n\r\n",
            answer.len()
        )
        .into_bytes();
        response.extend_from_slice(&answer);
        writer.write_all(&response)?;
    }
}

/// Every log record of the request, as JSON.
fn decode(request_line: &str, headers: &BTreeMap<String, String>, body: &[u8]) -> Vec<Json> {
    let raw = if headers.get("content-encoding").map(String::as_str) == Some("gzip") {
        let mut d = flate2::read::GzDecoder::new(body);
        let mut v = Vec::new();
        d.read_to_end(&mut v).expect("gzip body");
        v
    } else {
        body.to_vec()
    };
    let req = ExportLogsServiceRequest::decode(raw.as_slice()).expect("ExportLogsServiceRequest");
    let mut out = Vec::new();
    for rl in req.resource_logs {
        let resource = attributes(&rl.resource.map(|r| r.attributes).unwrap_or_default());
        for sl in rl.scope_logs {
            let scope = sl.scope.map(|s| s.name).unwrap_or_default();
            for r in sl.log_records {
                out.push(json!({
                    "request": request_line.trim_end(),
                    "headers": headers,
                    "time_unix_nano": r.time_unix_nano,
                    "observed_time_unix_nano": r.observed_time_unix_nano,
                    "severity_number": r.severity_number,
                    "severity_text": r.severity_text,
                    "event_name": r.event_name,
                    "body": r.body.as_ref().map(any).unwrap_or(Json::Null),
                    "attributes": attributes(&r.attributes),
                    "resource": resource,
                    "scope": scope,
                }));
            }
        }
    }
    out
}

fn attributes(kvs: &[KeyValue]) -> Json {
    Json::Object(
        kvs.iter()
            .map(|kv| {
                (
                    kv.key.clone(),
                    kv.value.as_ref().map(any).unwrap_or(Json::Null),
                )
            })
            .collect(),
    )
}

fn any(v: &AnyValue) -> Json {
    match &v.value {
        Some(Value::StringValue(s)) => json!(s),
        Some(Value::IntValue(i)) => json!(i),
        Some(Value::BoolValue(b)) => json!(b),
        Some(Value::DoubleValue(d)) => json!(d),
        Some(other) => json!(format!("{other:?}")),
        None => Json::Null,
    }
}
