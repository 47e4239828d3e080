//! Prometheus metrics over plain HTTP (`GET /metrics`), on an address the operator chooses.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;

use modelpack_proto::control::MountInfo;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;
use tracing::warn;

use crate::control::mount_rows;
use crate::service::Service;

/// The metrics document in Prometheus text format.
pub fn render(service: &Service) -> String {
    let rows = mount_rows(service);
    let stats = service.stats();
    let mut out = String::new();
    let mut metric = |name: &str, help: &str, kind: &str, value: u64| {
        let _ = writeln!(out, "# HELP modelpack_snapshotter_{name} {help}");
        let _ = writeln!(out, "# TYPE modelpack_snapshotter_{name} {kind}");
        let _ = writeln!(out, "modelpack_snapshotter_{name} {value}");
    };
    let counters = [
        (
            "remote_prepared_total",
            "Remote Prepares served lazily.",
            &stats.remote_prepared,
        ),
        (
            "remote_fallbacks_total",
            "Remote Prepares that fell back to an ordinary snapshot.",
            &stats.remote_fallbacks,
        ),
        (
            "mounts_total",
            "Remote layer mounts made, remounts on start included.",
            &stats.mounts,
        ),
        (
            "mount_micros_total",
            "Time spent mounting remote layers, microseconds.",
            &stats.mount_micros,
        ),
    ];
    for (name, help, value) in counters {
        metric(name, help, "counter", value.load(Ordering::Relaxed));
    }
    metric(
        "mirror_fallbacks_total",
        "Registry requests a mirror of a hosts.toml failed that went on to the next host.",
        "counter",
        modelpack_registry::mirror_fallbacks(),
    );
    let cache = service.cache_stats().unwrap_or_default();
    let cache_counters = [
        (
            "cache_evictions_total",
            "Cached chunks evicted to stay under the cache cap.",
            cache.evictions,
        ),
        (
            "cache_evicted_bytes_total",
            "Bytes of the chunks evicted.",
            cache.evicted_bytes,
        ),
        (
            "cache_refetches_total",
            "Evicted chunks read again, so fetched again.",
            cache.refetches,
        ),
    ];
    for (name, help, value) in cache_counters {
        metric(name, help, "counter", value);
    }
    let in_state = |state: &str| rows.iter().filter(|r| r.state == state).count() as u64;
    let total = |field: fn(&MountInfo) -> u64| rows.iter().map(field).sum::<u64>();
    let gauges = [
        (
            "mounted",
            "Remote snapshots currently mounted.",
            in_state("mounted"),
        ),
        (
            "mount_failures",
            "Remote snapshots that could not be mounted.",
            in_state("failed"),
        ),
        (
            "fetched_bytes",
            "Blob bytes fetched from registries, summed over the snapshots held now.",
            total(|r| r.fetched_bytes),
        ),
        (
            "served_bytes",
            "Bytes handed to readers, summed over the snapshots held now.",
            total(|r| r.served_bytes),
        ),
        (
            "on_demand_fetches",
            "Ranged fetches made on demand or by readahead, over the snapshots held now.",
            total(|r| r.fetches),
        ),
        (
            "cache_bytes",
            "Chunk bytes in the node's cache now.",
            cache.bytes,
        ),
        (
            "cache_max_bytes",
            "The cache cap in bytes (0: unbounded).",
            cache.max_bytes.unwrap_or(0),
        ),
        (
            "on_demand_fetch_micros",
            "Total latency of those fetches, microseconds (divide by the count for the mean).",
            total(|r| r.fetch_micros),
        ),
    ];
    for (name, help, value) in gauges {
        metric(name, help, "gauge", value);
    }
    let _ = writeln!(
        out,
        "# HELP modelpack_snapshotter_layer_fetched_bytes Blob bytes fetched, per layer.\n\
         # TYPE modelpack_snapshotter_layer_fetched_bytes gauge"
    );
    for r in &rows {
        let _ = writeln!(
            out,
            "modelpack_snapshotter_layer_fetched_bytes{{digest=\"{}\",path=\"{}\"}} {}",
            r.layer_digest,
            r.path.replace('\\', "\\\\").replace('"', "\\\""),
            r.fetched_bytes
        );
    }
    out
}

/// Serves `/metrics` on `address` until the process ends.
pub async fn serve(address: String, service: Service) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let listener = TcpListener::bind(&address)
        .await
        .with_context(|| format!("cannot listen for metrics on {address}"))?;
    modelpack_daemon::serve_connections(listener, move |mut stream| {
        let service = service.clone();
        async move {
            let mut buf = [0u8; 2048];
            let n = match stream.read(&mut buf).await {
                Ok(n) => n,
                Err(e) => {
                    warn!(error = %e, "metrics request");
                    return;
                }
            };
            let request = String::from_utf8_lossy(&buf[..n]);
            let (status, body) = if request.starts_with("GET /metrics") {
                ("200 OK", render(&service))
            } else {
                ("404 Not Found", "not found\n".to_owned())
            };
            let response = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
        }
    });
    Ok(())
}
