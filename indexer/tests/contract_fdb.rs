//! The shared KV contract on FoundationDB. Runs only when `FDB_CLUSTER_FILE`
//! names a cluster; otherwise it says it was skipped and passes.
#![cfg(feature = "fdb")]

use std::time::{SystemTime, UNIX_EPOCH};

use indexer::contract;
use indexer::fdb::FdbStore;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contract_on_foundationdb() {
    let Ok(cluster_file) = std::env::var("FDB_CLUSTER_FILE") else {
        // On stderr, unbuffered: libtest captures println! unless --nocapture.
        use std::io::Write as _;
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED: FoundationDB contract tests need FDB_CLUSTER_FILE"
        );
        return;
    };
    let store = FdbStore::open(Some(&cluster_file)).expect("connect to FoundationDB");
    // A prefix no other run uses, so runs can share a cluster.
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let prefix = format!("custodia-contract/{}-{nanos}/", std::process::id());
    contract::run_all(&store, prefix.as_bytes()).await;
    drop(store);
    indexer::fdb::shutdown_network();
}
