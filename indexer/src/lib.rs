//! Custodia's metadata layer.
//!
//! [`kv`] is one ordered, transactional key-value trait shaped like
//! FoundationDB (get, set, clear, range reads, atomic add, versionstamped keys,
//! a retry loop, FoundationDB's size and time limits). [`embedded`] implements it
//! on redb for `custodia up` and tests; `fdb` (cargo feature `fdb`) implements it
//! on FoundationDB. [`contract`] is the one conformance suite both must pass.
//! [`schema`] builds Custodia's records (nodes, upload intents, manifests, the
//! content-hash lookup) on top of the trait, and [`ledger`] the notarization
//! ledger's state (outbox, lease, tree hashes, openings, checkpoint); the
//! gateway calls only these two.

pub mod contract;
pub mod embedded;
#[cfg(feature = "fdb")]
pub mod fdb;
pub mod kv;
pub mod ledger;
pub mod s3;
pub mod schema;

pub use embedded::EmbeddedStore;
pub use kv::{run, KeyValues, KvError, KvStore, Retryable, Transaction};
