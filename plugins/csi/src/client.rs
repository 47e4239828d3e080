//! A CSI client over the plugin's unix socket, as kubelet and node-driver-registrar dial it:
//! one RPC by name, the request and the answer as JSON. `modelpack-csi call` is its front end
//! (operators debugging a node, and the end-to-end tests driving the plugin as kubelet does).

use std::path::{Path, PathBuf};

use serde::Serialize;
use serde::de::DeserializeOwned;
use tonic::transport::{Channel, Endpoint};

use crate::proto::identity_client::IdentityClient;
use crate::proto::node_client::NodeClient;

/// The RPCs [`call`] knows.
pub const METHODS: &[&str] = &[
    "GetPluginInfo",
    "GetPluginCapabilities",
    "Probe",
    "NodeGetInfo",
    "NodeGetCapabilities",
    "NodePublishVolume",
    "NodeUnpublishVolume",
    "NodeGetVolumeStats",
];

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The socket could not be dialled.
    #[error("cannot connect to {path}: {source}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: tonic::transport::Error,
    },
    /// The request is not JSON of the RPC's request message, or the method is unknown.
    #[error("{0}")]
    Request(String),
    /// The plugin answered with an error status.
    #[error("{}: {}", .0.code(), .0.message())]
    Status(tonic::Status),
}

/// Dials the unix socket at `path`.
pub async fn connect(path: &Path) -> Result<Channel, CallError> {
    let socket = path.to_owned();
    // The URI is not used: every connection dials the socket.
    Endpoint::from_static("http://[::]")
        .connect_with_connector(tower::service_fn(move |_| {
            let socket = socket.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(socket).await?,
                ))
            }
        }))
        .await
        .map_err(|source| CallError::Connect {
            path: path.to_owned(),
            source,
        })
}

/// `request` as the RPC's request message (its type follows from the client method it goes to).
fn parse<T: DeserializeOwned>(request: &serde_json::Value) -> Result<tonic::Request<T>, CallError> {
    serde_json::from_value(request.clone())
        .map(tonic::Request::new)
        .map_err(|e| CallError::Request(e.to_string()))
}

fn answer<T: Serialize>(
    reply: Result<tonic::Response<T>, tonic::Status>,
) -> Result<serde_json::Value, CallError> {
    let reply = reply.map_err(CallError::Status)?;
    serde_json::to_value(reply.get_ref()).map_err(|e| CallError::Request(e.to_string()))
}

/// Calls `method` (one of [`METHODS`]) with `request` (JSON of its request message, field
/// names as in the proto; absent fields default) and returns the response as JSON.
pub async fn call(
    channel: Channel,
    method: &str,
    request: &serde_json::Value,
) -> Result<serde_json::Value, CallError> {
    let mut identity = IdentityClient::new(channel.clone());
    let mut node = NodeClient::new(channel);
    match method {
        "GetPluginInfo" => answer(identity.get_plugin_info(parse(request)?).await),
        "GetPluginCapabilities" => answer(identity.get_plugin_capabilities(parse(request)?).await),
        "Probe" => answer(identity.probe(parse(request)?).await),
        "NodeGetInfo" => answer(node.node_get_info(parse(request)?).await),
        "NodeGetCapabilities" => answer(node.node_get_capabilities(parse(request)?).await),
        "NodePublishVolume" => answer(node.node_publish_volume(parse(request)?).await),
        "NodeUnpublishVolume" => answer(node.node_unpublish_volume(parse(request)?).await),
        "NodeGetVolumeStats" => answer(node.node_get_volume_stats(parse(request)?).await),
        other => Err(CallError::Request(format!(
            "unknown method {other:?} (known: {})",
            METHODS.join(", ")
        ))),
    }
}
