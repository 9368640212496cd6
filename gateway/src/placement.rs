//! Hierarchical rendezvous placement: which nodes hold the shards of a stripe.
//!
//! Each failure domain, then each node within it, gets a score from BLAKE3 of
//! (evidence, stripe, name). Domains are visited in score order, taking each
//! domain's best node, then each domain's second best, and so on: the first
//! `k + m` picks land in distinct domains whenever there are that many, placement
//! needs no table, and adding a node moves only the shards it now wins. Nodes
//! without a domain label count as a domain of their own. The picks after the
//! first `k + m` are the fallbacks a write uses when a chosen node fails.

use protocol::{EvidenceId, NodeId};

/// A node as placement sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub node: NodeId,
    pub failure_domain: Option<String>,
}

/// A node's score for one stripe: within its domain, the highest wins.
pub fn node_score(evidence: &EvidenceId, stripe: u64, node: NodeId) -> u64 {
    score(evidence, stripe, &node.0.to_le_bytes())
}

/// A labelled failure domain's score for one stripe: domains are visited
/// highest first. (An unlabelled node's domain score is its node score.)
pub fn domain_score(evidence: &EvidenceId, stripe: u64, domain: &str) -> u64 {
    score(evidence, stripe, format!("domain:{domain}").as_bytes())
}

fn score(evidence: &EvidenceId, stripe: u64, what: &[u8]) -> u64 {
    let mut h = blake3::Hasher::new();
    h.update(evidence.as_bytes());
    h.update(&stripe.to_le_bytes());
    h.update(what);
    let out = h.finalize();
    let b = out.as_bytes();
    u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
}

/// All candidates in placement order for one stripe: the first `k + m` are the
/// stripe's home, the rest are fallbacks in order.
pub fn rank(evidence: &EvidenceId, stripe: u64, nodes: &[Candidate]) -> Vec<NodeId> {
    // Group by domain; an unlabelled node is its own domain.
    // (A map from name to slot: at 10,000 nodes a linear search per node
    // cost more than the hashing.)
    let mut domains: Vec<(u64, Vec<(u64, NodeId)>)> = Vec::new();
    let mut slots: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for n in nodes {
        let ns = node_score(evidence, stripe, n.node);
        match n.failure_domain.as_deref() {
            Some(d) => match slots.get(d) {
                Some(&i) => domains[i].1.push((ns, n.node)),
                None => {
                    slots.insert(d, domains.len());
                    domains.push((domain_score(evidence, stripe, d), vec![(ns, n.node)]));
                }
            },
            None => domains.push((ns, vec![(ns, n.node)])),
        }
    }
    domains.sort_by_key(|d| std::cmp::Reverse(d.0));
    for (_, members) in &mut domains {
        members.sort_by_key(|m| std::cmp::Reverse(m.0));
    }
    let mut out = Vec::with_capacity(nodes.len());
    let deepest = domains.iter().map(|d| d.1.len()).max().unwrap_or(0);
    for depth in 0..deepest {
        for (_, members) in &domains {
            if let Some((_, node)) = members.get(depth) {
                out.push(*node);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{HashMap, HashSet};

    fn nodes(n: u32, domains: u32) -> Vec<Candidate> {
        (0..n)
            .map(|i| Candidate {
                node: NodeId(i),
                failure_domain: (domains > 0).then(|| format!("d{}", i % domains)),
            })
            .collect()
    }

    #[test]
    fn distinct_nodes_and_domains() {
        let ns = nodes(24, 8);
        for s in 0..200 {
            let r = rank(&EvidenceId([s as u8; 16]), s, &ns);
            assert_eq!(r.len(), 24);
            assert_eq!(r.iter().collect::<HashSet<_>>().len(), 24);
            let domains: HashSet<u32> = r[..6].iter().map(|n| n.0 % 8).collect();
            assert_eq!(
                domains.len(),
                6,
                "first k+m picks must be in distinct domains"
            );
        }
    }

    #[test]
    fn balanced_and_stable_when_a_node_is_added() {
        let ns = nodes(8, 0);
        let mut load: HashMap<NodeId, u32> = HashMap::new();
        let mut moved = 0;
        let more = nodes(9, 0);
        let stripes = 4000u64;
        for s in 0..stripes {
            let id = EvidenceId([7; 16]);
            let before: HashSet<NodeId> = rank(&id, s, &ns)[..6].iter().copied().collect();
            for n in &before {
                *load.entry(*n).or_default() += 1;
            }
            let after: HashSet<NodeId> = rank(&id, s, &more)[..6].iter().copied().collect();
            moved += before.difference(&after).count();
        }
        let mean = (stripes * 6) as f64 / 8.0;
        let max = *load.values().max().unwrap() as f64;
        assert!(max / mean < 1.1, "max/mean fill {}", max / mean);
        // Ideal: the new node takes 6/9 of a stripe's shards per stripe on average.
        let ideal = stripes as f64 * 6.0 / 9.0;
        assert!(
            (moved as f64) < ideal * 1.15,
            "moved {moved}, ideal {ideal}"
        );
    }
}
