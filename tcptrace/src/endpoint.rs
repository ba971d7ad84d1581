//! The `--metrics` endpoint: one HTTP answer per scrape.

/// The next scrape connection, or never when metrics are off.
pub async fn scrape(listener: Option<&tokio::net::TcpListener>) -> Option<tokio::net::TcpStream> {
    match listener {
        Some(l) => l.accept().await.ok().map(|(stream, _)| stream),
        None => std::future::pending().await,
    }
}

/// Serves one scrape on `stream`: any request gets the metrics.
pub async fn answer(mut stream: tokio::net::TcpStream, body: String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut request = [0u8; 2048];
    // The request itself does not matter; read what came, briefly.
    let _ = tokio::time::timeout(
        std::time::Duration::from_millis(200),
        stream.read(&mut request),
    )
    .await;
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/openmetrics-text; version=1.0.0; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), async {
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(body.as_bytes()).await?;
        stream.shutdown().await
    })
    .await;
}
