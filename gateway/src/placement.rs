//! Hierarchical rendezvous placement: which nodes hold the shards of a stripe.
//!
//! Each failure domain, then each node within it, gets a score from BLAKE3 of
//! (evidence, stripe, name). Domains are visited in score order, taking each
//! domain's best node, then each domain's second best, and so on: the first
//! `k + m` picks land in distinct domains whenever there are that many, placement
//! needs no table, and adding a node moves only the shards it now wins. Nodes
//! without a domain label count as a domain of their own. The picks after the
//! first `k + m` are the fallbacks a write uses when a chosen node fails.
//!
//! A domain's score is weighted by its number of nodes (weighted rendezvous,
//! `-w / ln(u)`): a domain is picked in about proportion to its size, so a
//! node's share hardly depends on the size of its rack. (Hardly: domains are
//! drawn without repeats, so where k+m is a large part of all domains a
//! small one is drawn more often than its size says, up to ~1.6 times with
//! 14 of 22; and once every stripe takes every domain, no weight helps.) Unweighted,
//! a rack of 2 among 20 racks of 10 was picked as often as each of them, and
//! its nodes filled 4.5 times as fast; a node without a label, 9 times
//! (among 100 racks of 100: 49 and 98 times). With domains of equal size
//! the order is the unweighted one.

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

/// A labelled failure domain's draw for one stripe, before it is weighted
/// by [`domain_key`]. (An unlabelled node's draw is its node score.)
pub fn domain_score(evidence: &EvidenceId, stripe: u64, domain: &str) -> u64 {
    score(evidence, stripe, format!("domain:{domain}").as_bytes())
}

/// The key domains are visited by, highest first: the draw `score` (see
/// [`domain_score`]) weighted by the domain's `nodes` (weighted
/// rendezvous: `nodes / -ln(u)`, `u` the draw as a fraction in (0, 1)).
/// It rises with the draw, so equal weights keep the draws' order.
pub fn domain_key(score: u64, nodes: usize) -> f64 {
    // The top 52 bits and a half, exactly as an f64 holds them: never 0
    // or 1 (with 53 bits, the highest draw rounded up to 1, and its key
    // to minus infinity).
    let u = ((score >> 12) as f64 + 0.5) / (1u64 << 52) as f64;
    nodes as f64 / -u.ln()
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
    // Equal keys (equal draws to 52 bits, or weights that meet) are
    // ordered by the whole draw, as they were unweighted.
    type Keyed = ((f64, u64), Vec<(u64, NodeId)>);
    let mut domains: Vec<Keyed> = domains
        .into_iter()
        .map(|(draw, members)| ((domain_key(draw, members.len()), draw), members))
        .collect();
    domains.sort_by(|a, b| b.0 .0.total_cmp(&a.0 .0).then(b.0 .1.cmp(&a.0 .1)));
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

    /// A node's share does not depend on the size of its domain: a small
    /// rack among large ones, or a node without a label, fills about as
    /// fast as any other (unweighted, here they took 4.5 and 9 times the
    /// mean).
    #[test]
    fn a_small_domain_or_an_unlabelled_node_takes_its_share_only() {
        let mut ns: Vec<Candidate> = (0..200)
            .map(|i| Candidate {
                node: NodeId(i),
                failure_domain: Some(format!("rack{}", i % 20)),
            })
            .collect();
        ns.extend((200..202).map(|i| Candidate {
            node: NodeId(i),
            failure_domain: Some("small".into()),
        }));
        ns.push(Candidate {
            node: NodeId(202),
            failure_domain: None,
        });
        let stripes = 20_000u64;
        let mut load: HashMap<NodeId, u64> = HashMap::new();
        for s in 0..stripes {
            let r = rank(&EvidenceId([(s % 251) as u8; 16]), s, &ns);
            let domains: HashSet<Option<&str>> = r[..6]
                .iter()
                .map(|n| ns[n.0 as usize].failure_domain.as_deref())
                .collect();
            assert_eq!(domains.len(), 6, "first k+m picks in distinct domains");
            for n in &r[..6] {
                *load.entry(*n).or_default() += 1;
            }
        }
        let mean = (stripes * 6) as f64 / ns.len() as f64;
        for n in [NodeId(200), NodeId(201), NodeId(202), NodeId(0), NodeId(45)] {
            let share = load.get(&n).copied().unwrap_or(0) as f64 / mean;
            assert!(
                (0.8..1.3).contains(&share),
                "node {} holds {share:.2} of the mean",
                n.0
            );
        }
    }

    /// The highest and lowest draws give finite keys in draw order.
    #[test]
    fn domain_keys_are_finite_and_rise_with_the_draw() {
        let keys: Vec<f64> = [0, 1 << 12, u64::MAX / 2, u64::MAX - (1 << 12), u64::MAX]
            .iter()
            .map(|&d| domain_key(d, 3))
            .collect();
        assert!(keys.iter().all(|k| k.is_finite() && *k > 0.0), "{keys:?}");
        assert!(keys.windows(2).all(|w| w[0] < w[1]), "{keys:?}");
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
