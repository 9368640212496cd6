//! `custodia sim placement`: the real placement code (`gateway::placement`,
//! hierarchical rendezvous: failure domain, then node) on a simulated
//! cluster of many nodes, sampling stripes so it runs in minutes.
//!
//! What it measures, and how a sample stands for the whole:
//! - **fill**: shards per node over the sampled stripes. A sample holds far
//!   fewer shards per node than a petabyte does, so its max/mean is mostly
//!   sampling noise; it is printed beside the max/mean of the same number of
//!   shards thrown uniformly at random (the best any placement can do), and
//!   projected to the full cluster's shard count by scaling the excess over
//!   1 with the square root of the shards per node (binomial noise).
//! - **domains**: stripes with two shards in one failure domain (target 0).
//! - **moved**: shards whose node changes when 1% more nodes join, against
//!   the ideal (the new nodes' share of all shards).
//! - **repair fan-out**: for one dead node, the nodes that take part in
//!   rebuilding its shards (k sources and one new home per stripe). Stripes
//!   holding that node are found by a cheap pre-filter on domain and node
//!   scores (the same scores `rank` uses), each confirmed with `rank`
//!   itself, and counted up to the number such a node holds at full scale.

use anyhow::{bail, Result};
use gateway::placement::{self, Candidate};
use protocol::{EvidenceId, NodeId};
use std::collections::{HashMap, HashSet};
use std::time::Instant;

#[derive(clap::Args, Debug, Clone)]
pub struct PlacementArgs {
    /// Storage nodes.
    #[arg(long, default_value_t = 10_000)]
    nodes: u32,
    /// Failure domains (racks); nodes are spread evenly over them.
    #[arg(long, default_value_t = 100)]
    domains: u32,
    /// Data shards per stripe.
    #[arg(long, default_value_t = 10)]
    k: usize,
    /// Parity shards per stripe.
    #[arg(long, default_value_t = 4)]
    m: usize,
    /// Raw evidence stored, in PB (10^15 bytes).
    #[arg(long, default_value_t = 1.0)]
    petabytes: f64,
    /// Bytes per shard.
    #[arg(long, default_value_t = protocol::ErasureCode::DEFAULT_SHARD_SIZE)]
    shard_size: u32,
    /// Stripes sampled for fill, domains and moves.
    #[arg(long, default_value_t = 40_000)]
    stripes: u64,
    /// Nodes added for the movement figure, in percent.
    #[arg(long, default_value_t = 1.0)]
    add_percent: f64,
    /// Stripes of the dead node sampled for the fan-out figure.
    #[arg(long, default_value_t = 4_000)]
    dead_node_stripes: u64,
}

fn cluster(nodes: u32, domains: u32) -> Vec<Candidate> {
    (0..nodes)
        .map(|i| Candidate {
            node: NodeId(i),
            failure_domain: Some(format!("rack-{:04}", i % domains)),
        })
        .collect()
}

/// A sampled stripe: a random evidence id and stripe number.
fn sample(i: u64) -> (EvidenceId, u64) {
    (
        EvidenceId::new(1_700_000_000_000 + i, rand::random()),
        i % 4096,
    )
}

/// Runs `f` over `0..n` on every core; sums what each returns.
fn parallel<T: Send + Default>(
    n: u64,
    f: impl Fn(std::ops::Range<u64>) -> T + Sync,
    merge: impl Fn(&mut T, T),
) -> T {
    let threads = std::thread::available_parallelism().map_or(1, |p| p.get()) as u64;
    let chunk = n.div_ceil(threads);
    let parts: Vec<T> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let f = &f;
                s.spawn(move || f(t * chunk..((t + 1) * chunk).min(n)))
            })
            .collect();
        handles.into_iter().filter_map(|h| h.join().ok()).collect()
    });
    let mut out = T::default();
    for p in parts {
        merge(&mut out, p);
    }
    out
}

#[derive(Default)]
struct Tally {
    fill: HashMap<u32, u64>,
    same_domain: u64,
    moved: u64,
}

pub fn placement(a: &PlacementArgs) -> Result<()> {
    let total = a.k + a.m;
    if a.domains == 0 || a.nodes < a.domains || (a.nodes as usize) < total {
        bail!("need at least k+m nodes and one node per domain");
    }
    let started = Instant::now();
    let base = cluster(a.nodes, a.domains);
    let added = ((a.nodes as f64) * a.add_percent / 100.0).round() as u32;
    let grown = cluster(a.nodes + added, a.domains);
    let domain_of = |n: NodeId| n.0 % a.domains;

    // Fill, domains, moves.
    let t = parallel(
        a.stripes,
        |range| {
            let mut t = Tally::default();
            for i in range {
                let (e, s) = sample(i);
                let home: Vec<NodeId> = placement::rank(&e, s, &base)[..total].to_vec();
                let after: HashSet<NodeId> = placement::rank(&e, s, &grown)[..total]
                    .iter()
                    .copied()
                    .collect();
                let mut seen = HashSet::new();
                if !home.iter().all(|n| seen.insert(domain_of(*n))) {
                    t.same_domain += 1;
                }
                for n in &home {
                    *t.fill.entry(n.0).or_default() += 1;
                    if !after.contains(n) {
                        t.moved += 1;
                    }
                }
            }
            t
        },
        |acc, t| {
            for (n, c) in t.fill {
                *acc.fill.entry(n).or_default() += c;
            }
            acc.same_domain += t.same_domain;
            acc.moved += t.moved;
        },
    );
    let shards = a.stripes * total as u64;
    let mean = shards as f64 / a.nodes as f64;
    let max = (0..a.nodes)
        .map(|n| t.fill.get(&n).copied().unwrap_or(0))
        .max()
        .unwrap_or(0) as f64;
    let min = (0..a.nodes)
        .map(|n| t.fill.get(&n).copied().unwrap_or(0))
        .min()
        .unwrap_or(0) as f64;
    // The same number of shards thrown uniformly at random.
    let mut ideal = vec![0u64; a.nodes as usize];
    for _ in 0..shards {
        ideal[rand::random_range(0..a.nodes as usize)] += 1;
    }
    let ideal_max = ideal.iter().copied().max().unwrap_or(0) as f64;
    let full_stripes = (a.petabytes * 1e15 / (a.k as f64 * a.shard_size as f64)).ceil();
    let full_mean = full_stripes * total as f64 / a.nodes as f64;
    let projected = 1.0 + (max / mean - 1.0) * (mean / full_mean).sqrt();
    let ideal_moved = shards as f64 * added as f64 / (a.nodes + added) as f64;

    // Repair fan-out for one dead node: stripes that hold it.
    let dead = NodeId(a.nodes / 2);
    let dead_domain = format!("rack-{:04}", domain_of(dead));
    let members: Vec<NodeId> = base
        .iter()
        .filter(|c| c.failure_domain.as_deref() == Some(dead_domain.as_str()))
        .map(|c| c.node)
        .collect();
    let domains: Vec<String> = (0..a.domains).map(|d| format!("rack-{d:04}")).collect();
    let per_node_full = full_mean.round() as u64;
    let want = a.dead_node_stripes.min(per_node_full.max(1));
    let hits = std::sync::atomic::AtomicU64::new(0);
    let found: Vec<(EvidenceId, u64)> = parallel(
        u64::MAX / 4,
        |range| {
            let mut out = Vec::new();
            for i in range {
                if hits.load(std::sync::atomic::Ordering::Relaxed) >= want {
                    break;
                }
                let (e, s) = sample(i);
                // Pre-filter: the dead node's domain among the first k+m
                // domains, and the dead node first within it.
                let mine = placement::domain_score(&e, s, &dead_domain);
                let outranked = domains
                    .iter()
                    .filter(|d| placement::domain_score(&e, s, d) > mine)
                    .nth(total - 1)
                    .is_some();
                if outranked {
                    continue;
                }
                let score = placement::node_score(&e, s, dead);
                if members
                    .iter()
                    .any(|n| placement::node_score(&e, s, *n) > score)
                {
                    continue;
                }
                out.push((e, s));
                hits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            out
        },
        |acc: &mut Vec<_>, v| acc.extend(v),
    );
    let mut takers: HashSet<NodeId> = HashSet::new();
    let mut confirmed = 0u64;
    for (e, s) in &found {
        let ranked = placement::rank(e, *s, &base);
        let home = &ranked[..total];
        let Some(pos) = home.iter().position(|n| *n == dead) else {
            bail!("the pre-filter disagrees with rank: the dead node is not in the home");
        };
        confirmed += 1;
        // k sources from the survivors, and the first fallback as new home.
        takers.extend(
            home.iter()
                .enumerate()
                .filter(|(i, _)| *i != pos)
                .map(|(_, n)| *n)
                .take(a.k),
        );
        if let Some(new_home) = ranked[total..].first() {
            takers.insert(*new_home);
        }
    }
    let fan_out = takers.len() as f64 / (a.nodes - 1) as f64;

    println!("custodia sim placement: {} nodes in {} failure domains, RS({},{}), {:.2} PB of evidence ({:.3e} stripes of {} MiB shards)",
        a.nodes, a.domains, a.k, a.m, a.petabytes, full_stripes, a.shard_size >> 20);
    println!(
        "sampled {} stripes ({} shards, {:.1} per node) in {:.1} s",
        a.stripes,
        shards,
        mean,
        started.elapsed().as_secs_f64()
    );
    println!();
    println!("fill, sampled:        max/mean {:.3}, min/mean {:.3} (uniform random, same shards: max/mean {:.3})", max / mean, min / mean, ideal_max / mean);
    println!(
        "fill, projected to {:.0} shards per node: max/mean {:.4} (target <= 1.02)",
        full_mean, projected
    );
    println!(
        "stripes with two shards in one domain: {} of {} (target 0)",
        t.same_domain, a.stripes
    );
    println!("moved when {added} nodes ({:.1}%) join: {} shards, ideal {:.0}: {:.3}x ideal (target <= 1.1)", a.add_percent, t.moved, ideal_moved, t.moved as f64 / ideal_moved);
    println!("repair fan-out when node {} dies: {} of {} other nodes take part ({:.1}%) over {} of its stripes (it holds ~{} at full scale; target >= 90%)",
        dead.0, takers.len(), a.nodes - 1, fan_out * 100.0, confirmed, per_node_full);
    println!("took {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}
