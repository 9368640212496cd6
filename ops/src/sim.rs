//! `custodia sim placement`: the real placement code (`gateway::placement`,
//! hierarchical rendezvous: failure domain, then node) on a simulated
//! cluster of many nodes, sampling stripes so it runs in minutes.
//!
//! What it measures, and how a sample stands for the whole:
//! - **fill**: shards per node over the sampled stripes. A sample holds far
//!   fewer shards per node than a petabyte does, so its max/mean is mostly
//!   sampling noise; it is printed beside the max/mean of the same number of
//!   shards thrown uniformly at random (the best any placement can do), and
//!   projected to the full cluster's shard count. The projection keeps the
//!   part of each node's excess that is not noise: the spread of the counts
//!   beyond what binomial noise explains (their variance less their mean)
//!   is placement's own and stays at any scale; the rest shrinks with the
//!   square root of the shards per node. (Scaling it all as noise, as this
//!   once did, projected a placement that overloads nodes by 30% to 1.01.)
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
    /// Nodes besides these without a failure domain label (each a domain
    /// of its own), as `node add` without `--failure-domain` makes.
    #[arg(long, default_value_t = 0)]
    unlabelled: u32,
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

/// Node ids of unlabelled nodes start here (labelled ones count from 0).
const UNLABELLED_BASE: u32 = 1 << 30;

fn cluster(nodes: u32, domains: u32, unlabelled: u32) -> Vec<Candidate> {
    (0..nodes)
        .map(|i| Candidate {
            node: NodeId(i),
            failure_domain: Some(format!("rack-{:04}", i % domains)),
        })
        .chain((0..unlabelled).map(|i| Candidate {
            node: NodeId(UNLABELLED_BASE + i),
            failure_domain: None,
        }))
        .collect()
}

/// Max/mean of per-node `counts` (mean `mean`) projected to `full_mean`
/// shards per node: each node's excess over the mean split into its
/// systematic part, kept, and binomial noise, scaled by the square root of
/// `mean / full_mean`. The systematic share is the counts' variance beyond
/// their mean (a binomial count's variance is about its mean) and its
/// sampling error, of all of it.
fn projected_fill(counts: &[u64], full_mean: f64) -> f64 {
    let n = counts.len() as f64;
    let mean = counts.iter().sum::<u64>() as f64 / n;
    if mean <= 0.0 {
        return f64::NAN;
    }
    let var = counts
        .iter()
        .map(|&c| (c as f64 - mean).powi(2))
        .sum::<f64>()
        / n;
    // Less two standard errors of the noise's own variance estimate
    // (`mean * sqrt(2 / n)`): a fair placement's counts vary by that much
    // from sample to sample, and must not read as an overload.
    let noise = mean * (1.0 + 2.0 * (2.0 / n).sqrt());
    let systematic = match var > 0.0 {
        true => ((var - noise) / var).clamp(0.0, 1.0),
        false => 0.0,
    };
    let scale = systematic + (1.0 - systematic) * (mean / full_mean).min(1.0).sqrt();
    let max = counts.iter().copied().max().unwrap_or(0) as f64;
    1.0 + (max / mean - 1.0) * scale
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
    if a.unlabelled >= UNLABELLED_BASE || a.nodes >= UNLABELLED_BASE {
        bail!("too many nodes");
    }
    let started = Instant::now();
    let base = cluster(a.nodes, a.domains, a.unlabelled);
    let added = ((a.nodes as f64) * a.add_percent / 100.0).round() as u32;
    let grown = cluster(a.nodes + added, a.domains, a.unlabelled);
    // An unlabelled node is a domain of its own.
    let domain_of = |n: NodeId| match n.0 >= UNLABELLED_BASE {
        true => n.0,
        false => n.0 % a.domains,
    };
    let all: Vec<u32> = base.iter().map(|c| c.node.0).collect();
    let node_count = all.len() as u32;

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
    let mean = shards as f64 / node_count as f64;
    let counts: Vec<u64> = all
        .iter()
        .map(|n| t.fill.get(n).copied().unwrap_or(0))
        .collect();
    let max = counts.iter().copied().max().unwrap_or(0) as f64;
    let min = counts.iter().copied().min().unwrap_or(0) as f64;
    // The same number of shards thrown uniformly at random.
    let mut ideal = vec![0u64; node_count as usize];
    for _ in 0..shards {
        ideal[rand::random_range(0..node_count as usize)] += 1;
    }
    let ideal_max = ideal.iter().copied().max().unwrap_or(0) as f64;
    let full_stripes = (a.petabytes * 1e15 / (a.k as f64 * a.shard_size as f64)).ceil();
    let full_mean = full_stripes * total as f64 / node_count as f64;
    let projected = projected_fill(&counts, full_mean);
    let ideal_moved = shards as f64 * added as f64 / (node_count + added) as f64;

    // Repair fan-out for one dead node: stripes that hold it.
    let dead = NodeId(a.nodes / 2);
    let dead_domain = format!("rack-{:04}", domain_of(dead));
    let members: Vec<NodeId> = base
        .iter()
        .filter(|c| c.failure_domain.as_deref() == Some(dead_domain.as_str()))
        .map(|c| c.node)
        .collect();
    // Each domain's size, for its weighted key, as `rank` counts it.
    let mut sizes: HashMap<&str, usize> = HashMap::new();
    for c in &base {
        if let Some(d) = c.failure_domain.as_deref() {
            *sizes.entry(d).or_default() += 1;
        }
    }
    let domains: Vec<(String, usize)> = (0..a.domains)
        .map(|d| {
            let name = format!("rack-{d:04}");
            let size = sizes.get(name.as_str()).copied().unwrap_or(0);
            (name, size)
        })
        .collect();
    let singles: Vec<NodeId> = base
        .iter()
        .filter(|c| c.failure_domain.is_none())
        .map(|c| c.node)
        .collect();
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
                // domains (unlabelled nodes each one), and the dead node
                // first within it.
                let mine = placement::domain_key(
                    placement::domain_score(&e, s, &dead_domain),
                    members.len(),
                );
                let outranked = domains
                    .iter()
                    .map(|(d, size)| {
                        placement::domain_key(placement::domain_score(&e, s, d), *size)
                    })
                    .chain(
                        singles
                            .iter()
                            .map(|n| placement::domain_key(placement::node_score(&e, s, *n), 1)),
                    )
                    .filter(|key| *key > mine)
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
    let fan_out = takers.len() as f64 / (node_count - 1) as f64;

    let unlabelled = match a.unlabelled {
        0 => String::new(),
        n => format!(" and {n} without a label"),
    };
    println!("custodia sim placement: {} nodes in {} failure domains{unlabelled}, RS({},{}), {:.2} PB of evidence ({:.3e} stripes of {} MiB shards)",
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
    if a.unlabelled > 0 {
        let worst = all
            .iter()
            .zip(&counts)
            .filter(|(n, _)| **n >= UNLABELLED_BASE)
            .map(|(_, c)| *c)
            .max()
            .unwrap_or(0);
        println!(
            "fill of the unlabelled nodes, sampled: max/mean {:.3}",
            worst as f64 / mean
        );
    }
    match added {
        0 => println!("moved when nodes join: none join at {}% of {} (raise --add-percent)", a.add_percent, a.nodes),
        _ => println!("moved when {added} nodes ({:.1}%) join: {} shards, ideal {:.0}: {:.3}x ideal (target <= 1.1)", a.add_percent, t.moved, ideal_moved, t.moved as f64 / ideal_moved),
    }
    println!("repair fan-out when node {} dies: {} of {} other nodes take part ({:.1}%) over {} of its stripes (it holds ~{} at full scale; target >= 90%)",
        dead.0, takers.len(), node_count - 1, fan_out * 100.0, confirmed, per_node_full);
    println!("took {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::projected_fill;

    /// Binomial noise is projected away at full scale; a placement's own
    /// overload is not.
    #[test]
    fn the_projection_keeps_an_overload_and_drops_noise() {
        use rand::RngExt;
        let mut rng = rand::rng();
        let nodes = 1000usize;
        let shards = 200_000;
        // Fair: every node the same chance.
        let mut fair = vec![0u64; nodes];
        for _ in 0..shards {
            fair[rng.random_range(0..nodes)] += 1;
        }
        let projected = projected_fill(&fair, 130_000.0);
        assert!(
            projected < 1.05,
            "a fair placement projected to {projected}"
        );
        // Biased: a tenth of the nodes take 30% more (drawn by rejection).
        let mut biased = vec![0u64; nodes];
        let mut placed = 0;
        while placed < shards {
            let n = rng.random_range(0..nodes);
            let weight = if n % 10 == 0 { 1.3 } else { 1.0 };
            if rng.random_range(0.0..1.3) < weight {
                biased[n] += 1;
                placed += 1;
            }
        }
        let projected = projected_fill(&biased, 130_000.0);
        assert!(projected > 1.1, "a 30% overload projected to {projected}");
    }
}
