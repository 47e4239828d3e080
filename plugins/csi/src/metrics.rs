//! Prometheus metrics over plain HTTP (`GET /metrics`): per model, its size and the bytes of it
//! local and verified (equal once the model is fully on the node), volumes, publish latency,
//! the cache.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;
use tracing::warn;

use crate::node::Volumes;

/// The metrics document in Prometheus text format.
pub async fn render(volumes: &Volumes) -> String {
    let mut out = String::new();
    let header = |out: &mut String, name: &str, help: &str, kind: &str| {
        let _ = writeln!(out, "# HELP modelpack_csi_{name} {help}");
        let _ = writeln!(out, "# TYPE modelpack_csi_{name} {kind}");
    };
    let stats = &volumes.stats;
    let counters = [
        (
            "publishes_total",
            "NodePublishVolume calls that succeeded.",
            &stats.publishes,
        ),
        (
            "publish_errors_total",
            "NodePublishVolume calls that failed.",
            &stats.publish_errors,
        ),
        (
            "publish_micros_total",
            "Time spent in successful publishes, microseconds.",
            &stats.publish_micros,
        ),
        (
            "unpublishes_total",
            "NodeUnpublishVolume calls.",
            &stats.unpublishes,
        ),
        (
            "model_mounts_total",
            "Lazy mounts of models made.",
            &stats.mounts,
        ),
    ];
    for (name, help, value) in counters {
        header(&mut out, name, help, "counter");
        let _ = writeln!(
            out,
            "modelpack_csi_{name} {}",
            value.load(Ordering::Relaxed)
        );
    }
    header(
        &mut out,
        "volumes",
        "Volumes published on this node.",
        "gauge",
    );
    let _ = writeln!(
        out,
        "modelpack_csi_volumes {}",
        volumes.volume_count().await
    );
    let cache = volumes.cache_stats();
    header(
        &mut out,
        "cache_bytes",
        "Chunk bytes in the node cache.",
        "gauge",
    );
    let _ = writeln!(out, "modelpack_csi_cache_bytes {}", cache.bytes);
    header(
        &mut out,
        "cache_max_bytes",
        "The node cache's cap (0: none).",
        "gauge",
    );
    let _ = writeln!(
        out,
        "modelpack_csi_cache_max_bytes {}",
        cache.max_bytes.unwrap_or(0)
    );
    header(
        &mut out,
        "cache_evicted_bytes_total",
        "Bytes evicted to stay under the cap.",
        "counter",
    );
    let _ = writeln!(
        out,
        "modelpack_csi_cache_evicted_bytes_total {}",
        cache.evicted_bytes
    );
    header(
        &mut out,
        "cache_refetches_total",
        "Evicted chunks read again, so fetched again.",
        "counter",
    );
    let _ = writeln!(
        out,
        "modelpack_csi_cache_refetches_total {}",
        cache.refetches
    );
    header(
        &mut out,
        "mirror_fallbacks_total",
        "Registry requests a hosts.toml mirror failed.",
        "counter",
    );
    let _ = writeln!(
        out,
        "modelpack_csi_mirror_fallbacks_total {}",
        modelpack_registry::mirror_fallbacks()
    );
    let rows = volumes.model_rows().await;
    type Field = fn(&crate::node::ModelRow) -> u64;
    let per_model: [(&str, &str, &str, Field); 4] = [
        (
            "model_bytes",
            "Bytes of a mounted model's files.",
            "gauge",
            |r| r.bytes,
        ),
        (
            "model_local_bytes",
            "Bytes of a model local and verified (= model_bytes: fully local).",
            "gauge",
            |r| r.local_bytes,
        ),
        (
            "model_fetched_bytes",
            "Bytes fetched from the registry for a model's mount.",
            "counter",
            |r| r.fetched_bytes,
        ),
        ("model_volumes", "Volumes using a model.", "gauge", |r| {
            r.volumes
        }),
    ];
    for (name, help, kind, value) in per_model {
        header(&mut out, name, help, kind);
        for row in &rows {
            let _ = writeln!(
                out,
                "modelpack_csi_{name}{{reference=\"{}\",digest=\"{}\"}} {}",
                escape(&row.reference),
                row.digest,
                value(row)
            );
        }
    }
    out
}

fn escape(label: &str) -> String {
    label
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Serves the metrics at `address` in the background.
pub async fn serve(address: &str, volumes: Arc<Volumes>) -> std::io::Result<()> {
    let listener = TcpListener::bind(address).await?;
    modelpack_daemon::serve_connections(listener, move |mut stream| {
        let volumes = volumes.clone();
        async move {
            let mut buf = [0u8; 1024];
            let n = stream.read(&mut buf).await.unwrap_or(0);
            let request = String::from_utf8_lossy(&buf[..n]);
            let response = if request.starts_with("GET /metrics") {
                let body = render(&volumes).await;
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )
            } else {
                "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    .to_owned()
            };
            if let Err(e) = stream.write_all(response.as_bytes()).await {
                warn!("metrics: {e}");
            }
        }
    });
    Ok(())
}
