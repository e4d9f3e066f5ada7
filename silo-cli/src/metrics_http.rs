//! A small Prometheus text-format registry and the `/metrics` HTTP endpoint.
//!
//! Collectors are closures that append samples when scraped, so values are
//! read from the live metrics structs of the libraries at scrape time and
//! nothing is polled in the background.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;

use std::sync::Mutex;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Kind of a metric family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Monotonic counter.
    Counter,
    /// Value that goes up and down.
    Gauge,
}

/// Writes metric families in the Prometheus text exposition format.
#[derive(Debug, Default)]
pub struct Encoder {
    out: String,
    declared: Vec<String>,
}

impl Encoder {
    /// Adds one sample; the family's HELP/TYPE lines are written the first
    /// time the family is seen.
    pub fn sample(
        &mut self,
        name: &str,
        kind: Kind,
        help: &str,
        labels: &[(&str, &str)],
        value: f64,
    ) {
        if !self.declared.iter().any(|d| d == name) {
            let _ = writeln!(self.out, "# HELP {name} {help}");
            let t = match kind {
                Kind::Counter => "counter",
                Kind::Gauge => "gauge",
            };
            let _ = writeln!(self.out, "# TYPE {name} {t}");
            self.declared.push(name.to_string());
        }
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let v = v
                    .replace('\\', "\\\\")
                    .replace('"', "\\\"")
                    .replace('\n', "\\n");
                let _ = write!(self.out, "{k}=\"{v}\"");
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }

    /// The text so far.
    pub fn finish(self) -> String {
        self.out
    }
}

type Collector = Box<dyn Fn(&mut Encoder) + Send + Sync>;

/// A set of collectors scraped together.
#[derive(Default)]
pub struct Registry {
    collectors: Mutex<Vec<Collector>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").finish_non_exhaustive()
    }
}

impl Registry {
    /// Adds a collector.
    pub fn register(&self, c: impl Fn(&mut Encoder) + Send + Sync + 'static) {
        self.collectors
            .lock()
            .expect("metrics registry poisoned")
            .push(Box::new(c));
    }

    /// Renders every collector.
    pub fn render(&self) -> String {
        let mut enc = Encoder::default();
        for c in self
            .collectors
            .lock()
            .expect("metrics registry poisoned")
            .iter()
        {
            c(&mut enc);
        }
        enc.finish()
    }
}

/// Binds `addr` and serves `GET /metrics` until the task is aborted.
/// Binding errors are returned at once so the CLI can report a bad address
/// or a port in use.
pub async fn serve(
    addr: SocketAddr,
    registry: Arc<Registry>,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = TcpListener::bind(addr).await?;
    tracing::info!(%addr, "metrics endpoint listening on /metrics");
    Ok(tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                continue;
            };
            let registry = registry.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut n = 0;
                // Read the request head, bounded to 8 KiB.
                loop {
                    match tokio::time::timeout(
                        std::time::Duration::from_secs(5),
                        sock.read(&mut buf[n..]),
                    )
                    .await
                    {
                        Ok(Ok(0)) | Err(_) | Ok(Err(_)) => return,
                        Ok(Ok(m)) => n += m,
                    }
                    if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") || n == buf.len() {
                        break;
                    }
                }
                let head = String::from_utf8_lossy(&buf[..n]);
                let first = head.lines().next().unwrap_or("");
                let mut parts = first.split_whitespace();
                let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
                let (status, ctype, body) =
                    if method == "GET" && (path == "/metrics" || path.starts_with("/metrics?")) {
                        (
                            "200 OK",
                            "text/plain; version=0.0.4; charset=utf-8",
                            registry.render(),
                        )
                    } else {
                        (
                            "404 Not Found",
                            "text/plain",
                            "not found: try /metrics\n".to_string(),
                        )
                    };
                let resp = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = sock.write_all(resp.as_bytes()).await;
                let _ = sock.shutdown().await;
            });
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_families_once() {
        let r = Registry::default();
        r.register(|e| {
            e.sample(
                "silo_blocks_migrated",
                Kind::Counter,
                "Blocks migrated",
                &[("device", "a")],
                3.0,
            );
            e.sample(
                "silo_blocks_migrated",
                Kind::Counter,
                "Blocks migrated",
                &[("device", "b\"x")],
                4.0,
            );
        });
        let s = r.render();
        assert_eq!(s.matches("# TYPE silo_blocks_migrated counter").count(), 1);
        assert!(s.contains("silo_blocks_migrated{device=\"a\"} 3"));
        assert!(s.contains("silo_blocks_migrated{device=\"b\\\"x\"} 4"));
    }

    #[tokio::test]
    async fn serves_over_http() {
        let r = Arc::new(Registry::default());
        r.register(|e| e.sample("silo_up", Kind::Gauge, "Up", &[], 1.0));
        // Bind on port 0 by first binding a std listener to learn a free port.
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = probe.local_addr().unwrap();
        drop(probe);
        let h = serve(addr, r).await.unwrap();
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        assert!(out.starts_with("HTTP/1.1 200 OK"), "{out}");
        assert!(out.contains("silo_up 1"), "{out}");
        h.abort();
    }
}
