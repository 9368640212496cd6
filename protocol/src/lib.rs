//! Custodia's shared language.
//!
//! Everything two components (or a court's verifier) must agree on lives here:
//! [`ids`] (evidence, node and shard identifiers, content hashes), [`code`] (the
//! Reed-Solomon layout that cuts content into stripes and shards), [`manifest`]
//! (what the indexer stores per piece of evidence), [`shard`] (the
//! self-describing header every stored shard carries), [`wire`] (the framed
//! requests between gateways and storage nodes, with numeric error codes),
//! [`bao`] (the streamed BLAKE3 outboard that makes byte ranges verifiable) and
//! [`ledger`] (notarization statements, receipts and their offline verification).
//!
//! This crate does no I/O: it encodes into and decodes from buffers and takes
//! time as an argument, so it is deterministic, fuzzable and small enough for a
//! verifier to embed. Every stored or signed encoding starts with a version byte;
//! the golden-byte tests pin them.

pub mod bao;
pub mod code;
pub mod ids;
pub mod ledger;
pub mod manifest;
pub mod shard;
pub mod tsa;
pub mod wire;
pub mod witness;

pub use code::{CodeError, ErasureCode, StripeLayout};
pub use ids::{Blake3Hash, EvidenceId, NodeId, Sha256Hash, ShardKey};
pub use ledger::{Receipt, Statement};
pub use manifest::{ManifestHeader, ShardPlacement, StripeRecord};
pub use shard::ShardHeader;
pub use wire::{DecodeError, ErrorCode, Request, Response};
