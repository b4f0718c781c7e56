//! The gRPC API's section, `grpc:`: where `vigil.v1.Remediation` (with health and reflection) listens.
//! Its token is the REST API's, `http.token`: one secret guards both APIs.

use std::net::SocketAddr;

use serde::Deserialize;

use crate::values::socket_addr;

/// The gRPC listener.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GrpcConfig {
    /// Serve the gRPC API at all (`vigil up` only: it serves the healer's operations).
    pub enabled: bool,
    /// Where it listens; any non-loopback address needs `http.token`.
    #[serde(deserialize_with = "socket_addr")]
    pub listen: SocketAddr,
}

impl Default for GrpcConfig {
    fn default() -> Self {
        Self { enabled: true, listen: SocketAddr::from(([127, 0, 0, 1], 9751)) }
    }
}
