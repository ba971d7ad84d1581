//! One OTLP/HTTP request and what its answer means: sent, try again
//! (later, or when the collector says), or refused for good.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{HeaderName, HeaderValue};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use prost::Message;

use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceResponse;

/// A collector that takes longer than this to answer is treated as away.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest a Retry-After is waited for.
const RETRY_AFTER_MAX: Duration = Duration::from_secs(300);

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

pub fn client() -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(Duration::from_secs(5)));
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        // A collector closes idle connections on its own schedule: a
        // request on one it just closed fails before it was read, which
        // costs a retry. Short-lived pooled connections avoid most.
        .pool_idle_timeout(Duration::from_secs(20))
        .build(connector)
}

pub enum Outcome {
    /// The collector took every record.
    Sent,
    /// The collector took the request but rejected some records (partial
    /// success): how many, and why.
    Partial(u64, String),
    /// Try again: the collector is away, overloaded or says so; after the
    /// collector's Retry-After when it gave one.
    Retry(String, Option<Duration>),
    /// Refused for good (a 4xx other than 429): sending again would fail
    /// the same way.
    Refused(String),
}

pub async fn post(
    client: &HttpClient,
    uri: &hyper::Uri,
    headers: &[(HeaderName, HeaderValue)],
    body: Bytes,
) -> Outcome {
    let mut req = hyper::Request::post(uri.clone())
        .header(hyper::header::CONTENT_TYPE, "application/x-protobuf")
        .header(hyper::header::CONTENT_ENCODING, "gzip")
        .header(
            hyper::header::USER_AGENT,
            concat!("tcptrace/", env!("CARGO_PKG_VERSION")),
        );
    for (name, value) in headers {
        req = req.header(name, value);
    }
    let req = match req.body(Full::new(body)) {
        Ok(r) => r,
        Err(e) => return Outcome::Refused(format!("cannot build the request: {e}")),
    };
    let answer = tokio::time::timeout(REQUEST_TIMEOUT, async {
        let resp = client.request(req).await?;
        let status = resp.status();
        let retry_after = resp
            .headers()
            .get(hyper::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(|s| Duration::from_secs(s).min(RETRY_AFTER_MAX));
        let body = resp
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        Ok::<_, hyper_util::client::legacy::Error>((status, retry_after, body))
    })
    .await;
    let (status, retry_after, body) = match answer {
        Err(_) => {
            return Outcome::Retry(
                format!("no answer within {}s", REQUEST_TIMEOUT.as_secs()),
                None,
            );
        }
        Ok(Err(e)) => return Outcome::Retry(connection_error(&e), None),
        Ok(Ok(a)) => a,
    };
    let code = status.as_u16();
    match code {
        200..=299 => match ExportLogsServiceResponse::decode(body) {
            Ok(ExportLogsServiceResponse {
                partial_success: Some(p),
            }) if p.rejected_log_records > 0 => {
                Outcome::Partial(p.rejected_log_records as u64, p.error_message)
            }
            _ => Outcome::Sent,
        },
        429 | 502 | 503 | 504 => Outcome::Retry(format!("HTTP {status}"), retry_after),
        _ => Outcome::Refused(format!("HTTP {status}{}", detail(&body))),
    }
}

/// The innermost cause of a failed request, as one phrase.
fn connection_error(e: &hyper_util::client::legacy::Error) -> String {
    let mut source: Option<&dyn std::error::Error> = Some(e);
    let mut last = e.to_string();
    while let Some(s) = source {
        last = s.to_string();
        source = s.source();
    }
    last
}

/// What a refusal's body says, when it is short text (a collector's
/// google.rpc.Status is protobuf: its message is shown when readable).
fn detail(body: &[u8]) -> String {
    let text: String = String::from_utf8_lossy(body)
        .chars()
        .filter(|c| !c.is_control())
        .take(200)
        .collect();
    let text = text.trim();
    if text.is_empty() {
        String::new()
    } else {
        format!(": {text}")
    }
}
