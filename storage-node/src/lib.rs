//! Custodia storage node.
//!
//! A storage node keeps erasure-coded shards on its local disk and serves them
//! to gateways over QUIC with mutual TLS under the cluster CA.
//!
//! - [`store`] — [`ShardStore`], durable self-describing shard files in one data
//!   directory (temp file, fsync, rename, fsync dir), quarantine of shards that
//!   fail their BLAKE3, the disk UUID.
//! - [`tls`] — [`ClusterCa`] (create the CA, issue node and gateway certificates)
//!   and the quinn server/client configurations built from [`TlsFiles`].
//! - [`server`] — [`serve`] runs a node (`custodia node`, `custodia up`, tests);
//!   one request per bidirectional stream, `handle_*` functions per request.
//! - [`scrub`] — re-reads every shard at a bounded rate; corrupt ones are
//!   quarantined and listed for the gateway's repair worker.
//! - [`client`] — [`NodeClient`], what gateways use to reach nodes; its
//!   `rpc_*` methods pair with the server's `handle_*` functions.
//!
//! Frames and error codes are defined in the `protocol` crate.

pub mod buffers;
pub mod client;
pub mod metrics;
pub mod scrub;
mod segments;
pub mod server;
pub mod store;
pub mod tls;
pub mod udp;

pub use client::{ClientTimeouts, NodeClient, NodeError};
pub use server::{serve, NodeConfig, NodeServerError, RunningNode};
pub use store::{ShardStore, StoreError, StoreInfo};
pub use tls::{ClusterCa, TlsError, TlsFiles};
