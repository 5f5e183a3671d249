//! The Prometheus endpoint: `GET /metrics` over plain HTTP/1.1 on its own address (off by default;
//! bind it to loopback or a management network: it needs no credentials and says what the agent does,
//! not what its guests hold). A request of at most 8 KiB is read within 5 s, answered, and the
//! connection closed; at most 16 are served at once, more wait for the listener's backlog.
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::agent::AgentView;

const REQUEST_MAX: usize = 8 * 1024;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECTIONS_MAX: usize = 16;

pub struct MetricsEndpoint {
    listener: TcpListener,
    view: AgentView,
}

pub async fn bind(addr: &str, view: AgentView) -> anyhow::Result<MetricsEndpoint> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("metrics endpoint: listening on {addr}"))?;
    Ok(MetricsEndpoint { listener, view })
}

impl MetricsEndpoint {
    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("bound listener has an address")
    }

    /// Serves scrapes until the process ends; errors of one connection end only that connection.
    pub async fn serve(self) {
        let slots = Arc::new(tokio::sync::Semaphore::new(CONNECTIONS_MAX));
        loop {
            let Ok(slot) = slots.clone().acquire_owned().await else {
                return;
            };
            let stream = match self.listener.accept().await {
                Ok((stream, _)) => stream,
                Err(err) => {
                    tracing::debug!("metrics endpoint: accepting: {err}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let view = self.view.clone();
            tokio::spawn(async move {
                if let Err(err) = tokio::time::timeout(REQUEST_TIMEOUT, answer(stream, &view)).await {
                    tracing::debug!("metrics endpoint: {err}");
                }
                drop(slot);
            });
        }
    }
}

/// Reads one request head and answers it.
async fn answer(mut stream: TcpStream, view: &AgentView) {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
        if head.len() > REQUEST_MAX {
            let _ = respond(&mut stream, "431 Request Header Fields Too Large", "text/plain", "").await;
            return;
        }
    }
    let request_line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let request_line = String::from_utf8_lossy(request_line);
    let mut parts = request_line.split(' ');
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    let (status, body) = match (method, path) {
        ("GET", "/metrics") => {
            let metrics = crate::metrics::get();
            metrics.vms_hosted.set(view.vms_hosted() as i64);
            ("200 OK", metrics.render())
        }
        ("GET", _) => ("404 Not Found", "perfplus serves GET /metrics\n".to_string()),
        _ => ("405 Method Not Allowed", "perfplus serves GET /metrics\n".to_string()),
    };
    let _ = respond(&mut stream, status, crate::metrics::CONTENT_TYPE, &body).await;
}

async fn respond(stream: &mut TcpStream, status: &str, content_type: &str, body: &str) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}
