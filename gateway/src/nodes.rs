//! The gateway's live view of its storage nodes: addresses, failure domains,
//! health. Health comes from a periodic `NodeInfo` probe and from failed calls,
//! and only steers where new shards go; reads try every placed shard anyway.
//! Each probe also records the node's capacity and disk UUID in the index, and
//! warns when a node comes back with a different disk.

use crate::api::Store;
use crate::config::NodeEntry;
use crate::placement::Candidate;
use indexer::schema::{self, NodeRecord};
use protocol::NodeId;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use storage_node::client::NodeClient;

struct NodeState {
    entry: NodeEntry,
    healthy: AtomicBool,
}

/// The nodes and a client to reach them.
pub struct NodeSet {
    nodes: Vec<NodeState>,
    pub client: NodeClient,
}

impl NodeSet {
    pub fn new(entries: &[NodeEntry], client: NodeClient) -> Self {
        let nodes = entries
            .iter()
            .map(|e| NodeState {
                entry: e.clone(),
                healthy: AtomicBool::new(true),
            })
            .collect();
        NodeSet { nodes, client }
    }

    fn get(&self, id: NodeId) -> Option<&NodeState> {
        self.nodes.iter().find(|n| n.entry.id == id.0)
    }

    pub fn addr(&self, id: NodeId) -> Option<SocketAddr> {
        self.get(id).map(|n| n.entry.addr)
    }

    pub fn mark(&self, id: NodeId, healthy: bool) {
        if let Some(n) = self.get(id) {
            if n.healthy.swap(healthy, Ordering::Relaxed) != healthy {
                tracing::info!(node = %id, healthy, "node health changed");
            }
        }
    }

    /// Whether `id` answered its last probe or request.
    pub fn is_healthy(&self, id: NodeId) -> bool {
        self.get(id)
            .is_some_and(|n| n.healthy.load(Ordering::Relaxed))
    }

    pub fn healthy_count(&self) -> usize {
        self.nodes
            .iter()
            .filter(|n| n.healthy.load(Ordering::Relaxed))
            .count()
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Nodes new shards may go to: the healthy ones, or all of them when too few
    /// are healthy to hold a stripe (a stale health flag must not refuse writes).
    pub fn write_candidates(&self, need: usize) -> Vec<Candidate> {
        let healthy: Vec<Candidate> = self
            .nodes
            .iter()
            .filter(|n| n.healthy.load(Ordering::Relaxed))
            .map(|n| candidate(&n.entry))
            .collect();
        if healthy.len() >= need {
            healthy
        } else {
            self.nodes.iter().map(|n| candidate(&n.entry)).collect()
        }
    }

    /// Asks every node who it is; records it in the index and updates health.
    pub async fn probe_all<S: Store>(&self, store: &S, now_ms: u64) {
        let probes = self.nodes.iter().map(|n| async move {
            let info = tokio::time::timeout(
                Duration::from_secs(3),
                self.client.rpc_node_info(n.entry.addr),
            )
            .await;
            (n, info)
        });
        for (n, info) in futures::future::join_all(probes).await {
            let id = n.entry.node_id();
            let info = match info {
                Ok(Ok(info)) => info,
                Ok(Err(e)) => {
                    tracing::debug!(node = %id, error = %e, "node probe failed");
                    self.mark(id, false);
                    continue;
                }
                Err(_) => {
                    self.mark(id, false);
                    continue;
                }
            };
            if info.node != id {
                tracing::error!(node = %id, reported = %info.node, "node at this address reports another id; not using it");
                self.mark(id, false);
                continue;
            }
            self.mark(id, true);
            let entry = n.entry.clone();
            let result = indexer::run(store, |tx| {
                let entry = entry.clone();
                let info = info.clone();
                async move {
                    let prev = schema::get_node_tx(&tx, id).await?;
                    if let Some(old) = prev.as_ref().and_then(|p| p.disk_uuid) {
                        if old != info.disk_uuid {
                            tracing::warn!(node = %id, "node came back with a different disk; its shards must be reconciled");
                        }
                    }
                    schema::put_node_tx(
                        &tx,
                        &NodeRecord {
                            node: id,
                            addr: entry.addr.to_string(),
                            failure_domain: entry.failure_domain.clone(),
                            disk_uuid: Some(info.disk_uuid),
                            capacity_bytes: info.capacity_bytes,
                            free_bytes: info.free_bytes,
                            used_bytes: info.used_bytes,
                            last_seen_ms: now_ms,
                        },
                    );
                    Ok::<_, schema::SchemaError>(())
                }
            })
            .await;
            if let Err(e) = result {
                tracing::warn!(node = %id, error = %e, "could not record node in the index");
            }
        }
    }
}

fn candidate(e: &NodeEntry) -> Candidate {
    Candidate {
        node: e.node_id(),
        failure_domain: e.failure_domain.clone(),
    }
}
