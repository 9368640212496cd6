//! The Custodia gateway: the evidence API and the pipelines behind it.
//!
//! - [`api`]: the axum routes (`/v1/evidence`, `/healthz`, ...) and their auth.
//! - [`ingest`]: the write path — upload intent, one streaming pass that hashes
//!   (BLAKE3 and SHA-256), cuts stripes, Reed-Solomon codes them and puts the
//!   shards on distinct nodes, then the one transaction that makes a filing visible.
//! - [`read`]: the verified read path — k shards per stripe with hedging,
//!   reconstruction around missing or corrupt shards, damage reported for repair.
//! - [`ledger`]: the notarization ledger's sequencer (C2SP tlog: tiles,
//!   signed checkpoints), receipts and proofs.
//! - [`s3`]: the S3-compatible API (s3s); every object is evidence.
//! - [`witness`]: a C2SP tlog-witness (`custodia witness`) that other courts host.
//! - [`repair`]: rebuilds missing and corrupt shards; scans for down nodes.
//! - [`recover`]: `recover-index`, the index rebuilt from the ledger archive and the nodes.
//! - [`placement`]: hierarchical rendezvous hashing (failure domain, then node).
//! - [`metrics`]: what the gateway counts, for Prometheus.
//! - [`nodes`]: the live view of the storage nodes and their health.
//! - [`error`]: every error mapped to an HTTP status and JSON body, in one place.
//!
//! `custodia gateway` (the `ops` crate) builds a [`config::GatewayConfig`] and
//! calls [`serve`].

pub mod api;
pub mod clock;
pub mod config;
pub mod credentials;
pub mod error;
pub mod gc;
pub mod ingest;
pub mod ledger;
pub mod lifecycle_archive;
pub mod metrics;
pub mod nodes;
pub mod placement;
pub mod read;
pub mod recover;
pub mod repair;
pub mod s3;
pub mod s3_chunks;
pub mod s3_digest;
pub mod s3_journal;
pub mod witness;

pub use api::{serve, Gateway, RunningGateway};
pub use config::GatewayConfig;
