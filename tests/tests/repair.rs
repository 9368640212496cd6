//! Healing: a node dies and its shards are rebuilt elsewhere; a node comes
//! back with a wiped disk and that is noticed and repaired. Proven the hard
//! way: after each repair, m more nodes are killed and every filing still
//! reads back byte-exact, which only k+m live shards per stripe allow.

use anyhow::{bail, Context, Result};
use custodia_tests::{bytes, Shape, TestCluster};
use serde_json::Value;

fn status(c: &TestCluster) -> Result<Value> {
    let out = c.cli(&["status", "--json"])?;
    if !out.status.success() {
        bail!("status failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn status_table(c: &TestCluster) -> Result<String> {
    Ok(String::from_utf8(c.cli(&["status"])?.stdout)?)
}

/// Nodes down after 1 s of silence, rebuilt after 0.5 s more, passes
/// every 0.3 s; and `more` settings.
fn quick_to_repair(c: &mut TestCluster, more: &[(&str, toml::Value)]) -> Result<()> {
    let mut settings = vec![
        ("node_down_after_ms", toml::Value::Integer(1_000)),
        ("repair_after_down_ms", toml::Value::Integer(500)),
        ("repair_interval_ms", toml::Value::Integer(300)),
    ];
    settings.extend(more.iter().cloned());
    c.set_gateway(&settings)
}

/// Whether a repair pass says, within 20 s, that shards have nowhere to go.
fn says_nowhere_to_go(c: &TestCluster) -> bool {
    let log = c.data_dir().join("gateway.log");
    custodia_tests::eventually(20, || {
        std::fs::read_to_string(&log).is_ok_and(|l| l.contains("too few nodes"))
    })
}

/// `custodia repair` until the backlog is empty; fails if it does not
/// empty within its patience.
fn repair(c: &TestCluster) -> Result<()> {
    let out = c.cli(&["repair", "--patience-secs", "30"])?;
    if !out.status.success() {
        bail!(
            "custodia repair failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// How many distinct shards (evidence, stripe, index) the nodes hold as
/// files. Distinct, not files: a node that a read found dead may be
/// repaired away while it is down (that is the job), and when it comes back
/// its old copies stay on its disk as orphans until their grace ends.
fn shard_count(c: &TestCluster, nodes: impl Iterator<Item = u32>) -> usize {
    nodes
        .flat_map(|i| c.shard_files(i))
        .filter_map(|p| p.file_name().map(|n| n.to_owned()))
        .collect::<std::collections::BTreeSet<_>>()
        .len()
}

#[test]
fn dead_nodes_and_wiped_disks_are_repaired_to_full_redundancy() -> Result<()> {
    let mut c = TestCluster::start(Shape::default())?;
    // Down after 2 s of silence, rebuilt after 1 s more; the worker looks
    // every 500 ms. (Production: 30 s and 10 minutes.)
    c.set_gateway(&[
        ("node_down_after_ms", toml::Value::Integer(2_000)),
        ("repair_after_down_ms", toml::Value::Integer(1_000)),
        ("repair_interval_ms", toml::Value::Integer(500)),
    ])?;
    let mut filed = Vec::new();
    let mut stripes = 0u64;
    for i in 0..12u64 {
        let data = bytes(20_000 + 9_000 * i as usize, i);
        let r = c.file(&data)?;
        stripes += r["stripes"].as_u64().context("stripes")?;
        filed.push((r["id"].as_str().unwrap_or_default().to_owned(), data));
    }
    let check_all = |c: &TestCluster, why: &str| -> Result<()> {
        for (id, data) in &filed {
            if c.read(id)? != *data {
                bail!("{id} did not read back byte-exact {why}");
            }
        }
        Ok(())
    };
    assert_eq!(shard_count(&c, 0..8), 6 * stripes as usize);

    // 1. A node dies for good.
    c.kill_node(3);
    let down = custodia_tests::eventually(20, || {
        status(&c).is_ok_and(|s| s["nodes"][3]["state"] == "down")
    });
    assert!(down, "node 3 never showed as down");
    println!(
        "custodia status after killing node 3:\n{}",
        status_table(&c)?
    );
    repair(&c)?;
    let s = status(&c)?;
    assert_eq!(s["degraded_stripes"], 0, "{s}");
    println!("custodia status after repair:\n{}", status_table(&c)?);
    let live = [0u32, 1, 2, 4, 5, 6, 7];
    assert_eq!(
        shard_count(&c, live.iter().copied()),
        6 * stripes as usize,
        "every stripe has k+m shards on live nodes"
    );
    // Each shard lost with node 3 was rebuilt by the node that now holds
    // it, from k shards it read from the others: none passed through the
    // gateway.
    let rebuilt_by_nodes = c.node_metric_sum(
        live.iter().copied(),
        r#"custodia_node_requests_total{op="rebuild",result="ok","#,
    );
    let repaired = c.metric(&c.metrics, "custodia_shards_repaired_total")?;
    assert!(repaired > 0.0, "node 3 held shards that were repaired");
    assert_eq!(
        rebuilt_by_nodes, repaired,
        "every shard lost with node 3 was rebuilt on its new node"
    );
    // The repairs are on the ledger, on the evidence's custody record.
    let custody = c
        .get_with(
            &c.token,
            &format!("/v1/evidence/{}/custody", filed[11].0),
            &[],
        )?
        .json();
    assert!(
        custody.to_string().contains("repaired"),
        "a repaired entry on the custody record: {custody}"
    );
    // Two more nodes die: still everything reads back.
    c.kill_node(0);
    c.kill_node(1);
    check_all(&c, "with node 3 repaired away and nodes 0 and 1 dead")?;
    c.start_node(0)?;
    c.start_node(1)?;
    let back = custodia_tests::eventually(20, || {
        status(&c).is_ok_and(|s| s["nodes"][0]["state"] == "up" && s["nodes"][1]["state"] == "up")
    });
    assert!(back, "nodes 0 and 1 came back");

    // 2. A node comes back with an empty disk.
    let before = c.shard_files(5).len();
    assert!(before > 0);
    c.kill_node(5);
    std::fs::remove_dir_all(c.node_dir(5))?;
    c.start_node(5)?;
    // The disk change itself, not a backlog: stripes queued while nodes 0
    // and 1 were down may still be, and a repair that empties them before
    // the gateway's next probe of node 5 would end before node 5's stripes
    // are queued.
    let noticed = custodia_tests::eventually(20, || {
        std::fs::read_to_string(c.data_dir().join("gateway.log"))
            .is_ok_and(|l| l.contains("different disk"))
    });
    assert!(noticed, "the wiped disk went unnoticed");
    repair(&c)?;
    assert_eq!(status(&c)?["degraded_stripes"], 0);
    let files: usize = live.iter().map(|&i| c.shard_files(i).len()).sum();
    println!(
        "after the wiped disk's repair: {files} shard files on live nodes, {} of them \
         copies left by repairs of nodes that were down and came back",
        files - shard_count(&c, live.iter().copied())
    );
    assert_eq!(
        shard_count(&c, live.iter().copied()),
        6 * stripes as usize,
        "the wiped node's shards were rebuilt"
    );
    c.kill_node(6);
    c.kill_node(7);
    check_all(&c, "with the wiped disk repaired and nodes 6 and 7 dead")?;
    Ok(())
}

#[test]
fn scrub_finds_corruption_no_read_met_and_repair_rebuilds_it() -> Result<()> {
    let mut c = TestCluster::start(Shape::default())?;
    c.set_gateway(&[("repair_interval_ms", toml::Value::Integer(500))])?;
    let mut filed = Vec::new();
    for i in 0..6u64 {
        let data = bytes(30_000 + 7_000 * i as usize, i + 70);
        let r = c.file(&data)?;
        filed.push((r["id"].as_str().unwrap_or_default().to_owned(), data));
    }
    // Scrub everything every second, fast.
    c.set_nodes(&[
        ("scrub_bytes_per_sec", toml::Value::Integer(64 << 20)),
        ("scrub_pass_interval_secs", toml::Value::Integer(1)),
    ])?;
    // A bit flips in the last byte of a shard on node 4 that nobody reads.
    let victim = c
        .shard_files(4)
        .into_iter()
        .max()
        .context("node 4 holds shards")?;
    let name = victim.file_name().context("name")?.to_owned();
    let mut body = std::fs::read(&victim)?;
    let last = body.len() - 1;
    body[last] ^= 0x01;
    std::fs::write(&victim, &body)?;
    // And another is torn: cut short, which scrub's listing itself finds.
    let torn = c
        .shard_files(4)
        .into_iter()
        .min()
        .context("node 4 holds two shards")?;
    assert_ne!(torn, victim);
    let cut = std::fs::read(&torn)?;
    std::fs::write(&torn, &cut[..cut.len() / 2])?;

    let quarantine = c.node_dir(4).join("quarantine");
    let found = custodia_tests::eventually(30, || {
        std::fs::read_dir(&quarantine).is_ok_and(|d| {
            d.filter_map(|e| e.ok()).any(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with(&*name.to_string_lossy())
            })
        })
    });
    assert!(found, "the scrubber never quarantined {name:?}");
    // The counters move just after the store has quarantined the shard.
    let url = c.node_metrics_url(4)?;
    for (series, at_least) in [
        // Both: the flipped bit and the torn file.
        ("custodia_node_scrub_corrupt_shards_total", 2.0),
        ("custodia_node_scrub_passes_total", 1.0),
        ("custodia_node_scrub_shards_total", 1.0),
    ] {
        let counted =
            custodia_tests::eventually(10, || c.metric(&url, series).is_ok_and(|v| v >= at_least));
        assert!(counted, "{series} = {:?}", c.metric(&url, series).ok());
    }

    // The repair worker learns of it from the node and rebuilds the shard.
    let queued = custodia_tests::eventually(20, || {
        status(&c).is_ok_and(|s| s["degraded_stripes"].as_u64() >= Some(1))
    });
    let rebuilt = |c: &TestCluster| {
        (0..8).any(|i| {
            c.shard_files(i)
                .iter()
                .any(|p| p.file_name() == Some(&name))
        })
    };
    assert!(
        queued || rebuilt(&c),
        "the quarantined shard was never queued for repair"
    );
    repair(&c)?;
    assert_eq!(status(&c)?["degraded_stripes"], 0);
    assert!(rebuilt(&c), "{name:?} was not rebuilt on any node");
    for (id, data) in &filed {
        assert_eq!(&c.read(id)?, data, "{id}");
    }
    Ok(())
}

/// On a cluster of exactly k+m nodes every node holds a shard of every
/// stripe, so a damaged shard has no other node to go to: it is rebuilt
/// onto its own node, whose put replaces the bad copy, and the stripe is
/// whole again (rather than failing repair at every pass for ever).
#[test]
fn a_damaged_shard_with_no_other_home_is_rebuilt_in_place() -> Result<()> {
    let mut c = TestCluster::start(Shape {
        nodes: 6,
        ..Shape::default()
    })?;
    let filing = Filing::new(&c, 77)?;
    flip_last_byte(&filing.victim)?;
    let out = c.cli(&["repair", "--verify-all", "--patience-secs", "30"])?;
    assert!(
        out.status.success(),
        "custodia repair failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(status(&c)?["degraded_stripes"], 0);
    assert_eq!(
        std::fs::read(&filing.victim)?,
        filing.good,
        "the shard was not rebuilt onto its node"
    );
    filing.reads_with_two_other_nodes_dead(&mut c)
}

/// One filing on a cluster of k+m nodes, and its shard on node 2.
struct Filing {
    id: String,
    data: Vec<u8>,
    /// Node 2's shard file, and its bytes as stored.
    victim: std::path::PathBuf,
    good: Vec<u8>,
}

impl Filing {
    fn new(c: &TestCluster, seed: u64) -> Result<Self> {
        let data = bytes(50_000, seed);
        let id = c.file(&data)?["id"].as_str().context("id")?.to_owned();
        let victim = c
            .shard_files(2)
            .into_iter()
            .next()
            .context("node 2 holds a shard")?;
        let good = std::fs::read(&victim)?;
        Ok(Filing {
            id,
            data,
            victim,
            good,
        })
    }

    /// Whole again: it reads back with two nodes other than 2 dead.
    fn reads_with_two_other_nodes_dead(&self, c: &mut TestCluster) -> Result<()> {
        c.kill_node(0);
        c.kill_node(1);
        assert_eq!(c.read(&self.id)?, self.data, "with two other nodes dead");
        Ok(())
    }
}

/// The same on a cluster of k+m nodes, found by scrub twice: the shard
/// rebuilt onto its node and found corrupt there again is rebuilt again
/// (the node's quarantine names the key once, however often it rots).
#[test]
fn a_shard_rebuilt_onto_its_node_and_rotting_again_is_rebuilt_again() -> Result<()> {
    let mut c = TestCluster::start(Shape {
        nodes: 6,
        ..Shape::default()
    })?;
    c.set_gateway(&[
        ("repair_interval_ms", toml::Value::Integer(300)),
        ("quarantine_recheck_ms", toml::Value::Integer(500)),
    ])?;
    let filing = Filing::new(&c, 78)?;
    c.set_nodes(&[
        ("scrub_bytes_per_sec", toml::Value::Integer(64 << 20)),
        ("scrub_pass_interval_secs", toml::Value::Integer(1)),
    ])?;
    for round in 1..=2 {
        flip_last_byte(&filing.victim)?;
        let healed = custodia_tests::eventually(60, || {
            std::fs::read(&filing.victim).is_ok_and(|now| now == filing.good)
        });
        assert!(
            healed,
            "round {round}: the shard was not rebuilt onto node 2"
        );
        // Out of the repair queue (so only the quarantine can bring it
        // back), and its entry looked at again since.
        let settled =
            custodia_tests::eventually(30, || status(&c).is_ok_and(|s| s["degraded_stripes"] == 0));
        assert!(settled, "round {round}: the stripe stayed queued");
        std::thread::sleep(std::time::Duration::from_secs(2));
    }
    filing.reads_with_two_other_nodes_dead(&mut c)
}

#[test]
fn orphan_shards_are_collected_after_their_grace_and_nothing_else_is() -> Result<()> {
    let mut c = TestCluster::start(Shape::default())?;
    c.set_gateway(&[
        ("orphan_sweep_interval_ms", toml::Value::Integer(500)),
        ("orphan_grace_ms", toml::Value::Integer(4_000)),
    ])?;
    let mut filed = Vec::new();
    for i in 0..6u64 {
        let data = bytes(30_000 + 5_000 * i as usize, i + 90);
        let r = c.file(&data)?;
        filed.push((r["id"].as_str().unwrap_or_default().to_owned(), data));
    }
    // One more, whose stripe record is damaged (or a newer version's): its
    // shards, on six of the eight nodes, say nothing the sweep can read,
    // and it goes on past them. (It failed every sweep at the first.)
    let damaged: protocol::EvidenceId = c.file(&bytes(20_000, 89))?["id"]
        .as_str()
        .context("id")?
        .parse()?;
    c.kill_gateway();
    garble_stripe_record(&c, damaged)?;
    c.start_gateway()?;
    c.wait_healthy(8)?;
    // A copy of a shard of node 1 lands on node 2, which holds no shard of
    // that name: what an interrupted repair or upload leaves behind.
    let on_2: std::collections::HashSet<_> = c
        .shard_files(2)
        .iter()
        .filter_map(|p| p.file_name().map(|n| n.to_owned()))
        .collect();
    // (Not one of the damaged evidence's: its copies are kept, rightly.)
    let damaged_files = hex::encode(damaged.0);
    let source = c
        .shard_files(1)
        .into_iter()
        .find(|p| {
            p.file_name().is_some_and(|n| {
                !on_2.contains(n) && !n.to_string_lossy().starts_with(&damaged_files)
            })
        })
        .context("a shard of node 1 that node 2 lacks")?;
    let fanout = source
        .parent()
        .and_then(|p| p.file_name())
        .context("fan-out dir")?;
    let dir = c.node_dir(2).join("shards").join(fanout);
    std::fs::create_dir_all(&dir)?;
    let orphan = dir.join(source.file_name().context("name")?);
    std::fs::copy(&source, &orphan)?;
    let before = c.all_shard_files().len();

    // Not before its grace...
    std::thread::sleep(std::time::Duration::from_millis(1_500));
    assert!(orphan.exists(), "an orphan was deleted before its grace");
    // ...but after it.
    let gone = custodia_tests::eventually(30, || !orphan.exists());
    assert!(gone, "the orphan shard was never collected");
    assert!(source.exists(), "the referenced copy must stay");
    assert_eq!(
        c.all_shard_files().len(),
        before - 1,
        "only the orphan went"
    );
    let deleted = c.metric(&c.metrics, "custodia_orphan_shards_deleted_total")?;
    assert!(deleted >= 1.0, "deleted counter {deleted}");
    for (id, data) in &filed {
        assert_eq!(&c.read(id)?, data, "{id}");
    }
    let log = std::fs::read_to_string(c.data_dir().join("gateway.log"))?;
    assert!(
        log.contains("orphan sweep kept shards whose stripe records do not decode"),
        "not said"
    );
    Ok(())
}

/// Stripe 0's record of `id` ("S", evidence, stripe) in the stopped
/// gateway's index, garbled.
fn garble_stripe_record(c: &TestCluster, id: protocol::EvidenceId) -> Result<()> {
    let store = indexer::EmbeddedStore::open(&c.data_dir().join("index.redb"))?;
    let rt = tokio::runtime::Builder::new_current_thread().build()?;
    rt.block_on(indexer::run(&store, |tx| async move {
        use indexer::kv::Transaction;
        let mut key = vec![b'S'];
        key.extend_from_slice(id.as_bytes());
        key.extend_from_slice(&0u64.to_be_bytes());
        tx.set(&key, b"\xffnot a stripe record");
        Ok::<_, indexer::KvError>(())
    }))?;
    Ok(())
}

/// A copy the index places on another node is an orphan only while that
/// node's copy is good. Here the recorded copy is lost (as when an index
/// restored from an older backup names copies that repairs have since
/// moved): the other copy, once the only one, is adopted in its place, not
/// deleted after its grace as an old copy was before.
#[test]
fn a_copy_whose_recorded_twin_is_lost_is_adopted_not_swept() -> Result<()> {
    let mut c = TestCluster::start(Shape::default())?;
    c.set_gateway(&[
        ("orphan_sweep_interval_ms", toml::Value::Integer(500)),
        ("orphan_grace_ms", toml::Value::Integer(2_000)),
    ])?;
    let data = bytes(50_000, 93);
    let id = c.file_id(&data)?;
    let placed = placement_of(&c, &id, &[]);
    let (x, recorded) = placed.get(&0).cloned().context("shard 0")?;
    let y = (0..8u32)
        .find(|n| placed.values().all(|(m, _)| m != n))
        .context("a node without a shard of the stripe")?;
    let fanout = recorded
        .parent()
        .and_then(|p| p.file_name())
        .context("fan-out dir")?;
    let dir = c.node_dir(y).join("shards").join(fanout);
    std::fs::create_dir_all(&dir)?;
    let copy = dir.join(recorded.file_name().context("name")?);
    std::fs::copy(&recorded, &copy)?;
    std::fs::remove_file(&recorded)?;

    let log = c.data_dir().join("gateway.log");
    let adopted = custodia_tests::eventually(30, || {
        std::fs::read_to_string(&log).is_ok_and(|l| l.contains("in place of the recorded one"))
    });
    assert!(adopted, "the copy was not adopted");
    // Sweeps after the adoption leave it be.
    std::thread::sleep(std::time::Duration::from_millis(3_000));
    assert!(copy.exists(), "the only copy of shard 0 was swept");
    // Two more nodes dead: the adopted copy is one of the four shards left.
    let others: Vec<u32> = placed
        .values()
        .map(|(n, _)| *n)
        .filter(|n| *n != x)
        .take(2)
        .collect();
    for n in &others {
        c.kill_node(*n);
    }
    assert_eq!(c.read(&id)?, data, "with nodes {others:?} dead");
    Ok(())
}

/// Where the shards of a one-stripe filing lie, on nodes other than
/// `skip`: index -> (node, file).
fn placement_of(
    c: &TestCluster,
    id: &str,
    skip: &[u32],
) -> std::collections::BTreeMap<u8, (u32, std::path::PathBuf)> {
    let prefix = format!("{}-0-", id.replace('-', ""));
    let mut out = std::collections::BTreeMap::new();
    for n in (0..8u32).filter(|n| !skip.contains(n)) {
        for p in c.shard_files(n) {
            let name = p.file_name().map(|f| f.to_string_lossy().into_owned());
            if let Some(index) = name.as_deref().and_then(|f| f.strip_prefix(&prefix)) {
                if let Ok(index) = index.parse() {
                    out.insert(index, (n, p));
                }
            }
        }
    }
    out
}

fn flip_last_byte(path: &std::path::Path) -> Result<Vec<u8>> {
    let mut body = std::fs::read(path)?;
    let last = body.len() - 1;
    body[last] ^= 0x10;
    std::fs::write(path, &body)?;
    Ok(body)
}

/// A dead node's stripes are rebuilt from k shards, and the shards the
/// rebuild did not need are re-counted too: damage on one of them is found
/// and rebuilt before the stripe leaves the queue (it used to stay, unseen,
/// until a read or a scrub met it, and two more dead nodes then lost data).
#[test]
fn repairing_a_dead_node_re_counts_the_shards_it_did_not_read() -> Result<()> {
    let mut c = TestCluster::start(Shape::default())?;
    c.set_gateway(&[
        ("node_down_after_ms", toml::Value::Integer(2_000)),
        ("repair_after_down_ms", toml::Value::Integer(1_000)),
        ("repair_interval_ms", toml::Value::Integer(500)),
    ])?;
    // One stripe each (4 x 4 KiB).
    let mut filed = Vec::new();
    for i in 0..8u64 {
        let data = bytes(10_000 + 700 * i as usize, i + 300);
        let r = c.file(&data)?;
        filed.push((r["id"].as_str().unwrap_or_default().to_owned(), data));
    }
    // In each filing with a shard on node 3, a bit flips in the shard the
    // rebuild reads last, if at all: the highest index elsewhere.
    let mut damaged = Vec::new();
    for (id, data) in &filed {
        let placed = placement_of(&c, id, &[]);
        assert_eq!(placed.len(), 6, "{id} has k+m shard files");
        if !placed.values().any(|(n, _)| *n == 3) {
            continue;
        }
        let (index, (node, path)) = placed
            .iter()
            .rev()
            .find(|(_, (n, _))| *n != 3)
            .context("a shard off node 3")?;
        let flipped = flip_last_byte(path)?;
        damaged.push((
            id.clone(),
            data.clone(),
            *index,
            *node,
            path.clone(),
            flipped,
        ));
    }
    assert!(!damaged.is_empty(), "no filing had a shard on node 3");

    c.kill_node(3);
    let down = custodia_tests::eventually(20, || {
        status(&c).is_ok_and(|s| s["nodes"][3]["state"] == "down")
    });
    assert!(down, "node 3 never showed as down");
    repair(&c)?;
    assert_eq!(status(&c)?["degraded_stripes"], 0);
    for (id, _, index, node, path, flipped) in &damaged {
        assert!(
            std::fs::read(path).ok().as_ref() != Some(flipped),
            "shard {index} of {id} on node {node} is still the damaged copy"
        );
        let placed = placement_of(&c, id, &[3]);
        assert_eq!(placed.len(), 6, "{id}: k+m shards off node 3: {placed:?}");
    }
    // The proof: with two more of its nodes dead, the first damaged filing
    // still reads back, which needs its rebuilt shard.
    let (id, data, index, ..) = &damaged[0];
    let placed = placement_of(&c, id, &[3]);
    let rebuilt_on = placed.get(index).map(|(n, _)| *n);
    let others: Vec<u32> = placed
        .values()
        .map(|(n, _)| *n)
        .filter(|n| Some(*n) != rebuilt_on)
        .take(2)
        .collect();
    for n in &others {
        c.kill_node(*n);
    }
    assert_eq!(
        &c.read(id)?,
        data,
        "{id} with nodes {others:?} dead after repair"
    );
    Ok(())
}

/// "Lost" goes on the public ledger and cannot be taken back, so only
/// shards that can never be read again count towards it: with two nodes
/// down past their grace and a third shard damaged, a stripe waits for the
/// nodes (which come back with their shards) instead of being declared lost.
#[test]
fn nodes_down_past_their_grace_do_not_make_a_stripe_lost() -> Result<()> {
    let mut c = TestCluster::start(Shape::default())?;
    quick_to_repair(&mut c, &[])?;
    let data = bytes(12_345, 77);
    let r = c.file(&data)?;
    let id = r["id"].as_str().context("id")?.to_owned();
    let placed = placement_of(&c, &id, &[]);
    let holders: Vec<u32> = placed.values().map(|(n, _)| *n).collect();
    let (a, b) = (holders[0], holders[1]);
    let (_, path) = &placed[&5];
    flip_last_byte(path)?;
    c.kill_node(a);
    c.kill_node(b);
    let down = custodia_tests::eventually(20, || {
        status(&c).is_ok_and(|s| {
            s["nodes"][a as usize]["state"] == "down" && s["nodes"][b as usize]["state"] == "down"
        })
    });
    assert!(down, "nodes {a} and {b} never showed as down");
    // Passes run against the stripe: 3 good shards of the 4 needed.
    let out = c.cli(&["repair", "--patience-secs", "3"])?;
    assert!(
        !out.status.success(),
        "a stripe with 3 good shards cannot be repaired"
    );
    let custody = |c: &TestCluster| -> Result<String> {
        Ok(
            c.get_with(&c.token, &format!("/v1/evidence/{id}/custody"), &[])?
                .json()
                .to_string(),
        )
    };
    let before = custody(&c)?;
    assert!(!before.contains("\"lost\""), "declared lost: {before}");
    c.start_node(a)?;
    c.start_node(b)?;
    c.wait_healthy(8)?;
    repair(&c)?;
    assert_eq!(status(&c)?["degraded_stripes"], 0);
    assert_eq!(c.read(&id)?, data);
    let after = custody(&c)?;
    assert!(
        after.contains("repaired") && !after.contains("\"lost\""),
        "{after}"
    );
    Ok(())
}

/// A stripe declared lost whose shards come back (a disk mounted late, a
/// directory restored) gets a later statement on the ledger that it was
/// found whole: `lost` cannot be taken back, and a court reading the
/// custody would otherwise take intact evidence for lost.
#[test]
fn a_lost_stripe_found_whole_says_so_on_the_ledger() -> Result<()> {
    let mut c = TestCluster::start(Shape::default())?;
    quick_to_repair(&mut c, &[])?;
    let data = bytes(12_345, 78);
    let id = c.file(&data)?["id"].as_str().context("id")?.to_owned();
    let placed = placement_of(&c, &id, &[]);
    // Three of its six shards gone from their nodes (k = 4): lost.
    let aside = c.data_dir().join("aside");
    std::fs::create_dir_all(&aside)?;
    let moved: Vec<(std::path::PathBuf, std::path::PathBuf)> = placed
        .values()
        .take(3)
        .enumerate()
        .map(|(i, (_, p))| (p.clone(), aside.join(i.to_string())))
        .collect();
    for (from, to) in &moved {
        std::fs::rename(from, to)?;
    }
    let kinds = |c: &TestCluster| -> Result<Vec<String>> {
        let a = c.get_with(&c.token, &format!("/v1/evidence/{id}/custody"), &[])?;
        Ok(a.json()["events"]
            .as_array()
            .context("events")?
            .iter()
            .map(|e| e["kind"].as_str().unwrap_or("").to_owned())
            .collect())
    };
    let out = c.cli(&["repair", "--verify-all", "--patience-secs", "3"])?;
    assert!(
        !out.status.success(),
        "a stripe with 3 of 6 shards repaired"
    );
    let lost = custodia_tests::eventually(20, || {
        kinds(&c).is_ok_and(|k| k.iter().any(|k| k == "lost"))
    });
    assert!(lost, "never declared lost: {:?}", kinds(&c)?);
    // The shards come back; a pass finds every one good.
    for (from, to) in &moved {
        std::fs::rename(to, from)?;
    }
    let out = c.cli(&["repair", "--verify-all", "--patience-secs", "30"])?;
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let found = custodia_tests::eventually(20, || {
        kinds(&c).is_ok_and(|k| {
            k.iter()
                .skip_while(|k| *k != "lost")
                .any(|k| k == "repaired")
        })
    });
    assert!(found, "no statement after `lost`: {:?}", kinds(&c)?);
    assert_eq!(c.read(&id)?, data);
    Ok(())
}

/// A stripe filed short of k+m shards (`min_write_shards`, with nodes
/// down) has slots no copy of will ever turn up for: left with fewer than
/// k good shards, it is declared lost at once, without waiting for an
/// orphan sweep to have listed every node (an hour after start, and never
/// while a node is down), which matters only after `recover-index`.
#[test]
fn a_stripe_filed_short_is_declared_lost_without_waiting_for_a_sweep() -> Result<()> {
    let mut c = TestCluster::start(Shape {
        min_write_shards: Some(5),
        ..Shape::default()
    })?;
    quick_to_repair(&mut c, &[])?;
    for n in [5, 6, 7] {
        c.kill_node(n);
    }
    let data = bytes(12_345, 79);
    let key = [("Idempotency-Key", "short-filing")];
    let filed = c.file_with(&c.token, &data, &key)?.json();
    assert_eq!(filed["degraded_stripes"], 1, "{filed}");
    let id = filed["id"].as_str().context("id")?.to_owned();
    // A retry whose first answer was lost is told the same, not that
    // every stripe has all its shards.
    let again = c.file_with(&c.token, &data, &key)?.json();
    assert_eq!(again["id"], filed["id"], "{again}");
    assert_eq!(again["degraded_stripes"], 1, "{again}");
    let placed = placement_of(&c, &id, &[5, 6, 7]);
    assert_eq!(placed.len(), 5, "{placed:?}");
    // Two of its five shards gone (k = 4): three good ones left.
    let aside = c.data_dir().join("aside");
    std::fs::create_dir_all(&aside)?;
    for (i, (_, path)) in placed.values().take(2).enumerate() {
        std::fs::rename(path, aside.join(i.to_string()))?;
    }
    for n in [5, 6, 7] {
        c.start_node_and_wait(n)?;
    }
    let out = c.cli(&["repair", "--verify-all", "--patience-secs", "3"])?;
    assert!(!out.status.success(), "a stripe of 3 good shards repaired");
    let lost = custodia_tests::eventually(20, || {
        c.get_with(&c.token, &format!("/v1/evidence/{id}/custody"), &[])
            .is_ok_and(|a| {
                a.json()["events"]
                    .as_array()
                    .is_some_and(|e| e.iter().any(|e| e["kind"] == "lost"))
            })
    });
    assert!(lost, "never declared lost");
    Ok(())
}

/// A pass that verifies every stripe does not say so when a stripe record
/// does not decode (damage, or a newer version's): it fails, saying how
/// many it could not read and where they are named.
#[test]
fn verify_all_says_what_it_could_not_read() -> Result<()> {
    let mut c = TestCluster::start(Shape::default())?;
    quick_to_repair(&mut c, &[])?;
    let id: protocol::EvidenceId = c.file(&bytes(9_000, 80))?["id"]
        .as_str()
        .context("id")?
        .parse()?;
    c.kill_gateway();
    garble_stripe_record(&c, id)?;
    c.start_gateway()?;
    c.wait_healthy(8)?;
    let out = c.cli(&["repair", "--verify-all", "--patience-secs", "10"])?;
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{said}");
    assert!(
        said.contains("1 stripe records that do not decode"),
        "{said}"
    );
    Ok(())
}

/// A node whose data directory is put back from an older copy (a snapshot
/// or backup restored: the same disk identity, the shards stored since
/// gone) is caught: it no longer holds the last shard it stored, which the
/// index places on it. Its inventory is reconciled and repair rebuilds
/// what it lost; every shard is back.
#[test]
fn a_node_restored_from_an_older_copy_is_caught_and_repaired() -> Result<()> {
    let mut c = TestCluster::start(Shape::default())?;
    quick_to_repair(&mut c, &[])?;
    c.file(&bytes(20_000, 61))?;
    // Node 2's directory, copied while it is stopped.
    let snapshot = c.data_dir().join("n2-snapshot");
    c.kill_node(2);
    custodia_tests::copy_dir(&c.node_dir(2), &snapshot)?;
    c.start_node_and_wait(2)?;
    c.wait_healthy(8)?;
    let before = c.shard_files(2).len();
    let mut filed = Vec::new();
    for i in 0..4u64 {
        let data = bytes(30_000, 70 + i);
        filed.push((
            c.file(&data)?["id"].as_str().context("id")?.to_owned(),
            data,
        ));
    }
    assert!(
        c.shard_files(2).len() > before,
        "nothing filed since on node 2"
    );
    let whole = shard_count(&c, 0..8);
    // Put back as it was.
    c.kill_node(2);
    std::fs::remove_dir_all(c.node_dir(2))?;
    std::fs::rename(&snapshot, c.node_dir(2))?;
    c.start_node_and_wait(2)?;
    assert!(shard_count(&c, 0..8) < whole, "the restore lost nothing");
    let log = c.data_dir().join("gateway.log");
    let caught = custodia_tests::eventually(20, || {
        std::fs::read_to_string(&log).is_ok_and(|l| l.contains("no longer holds a shard it stored"))
    });
    assert!(caught, "a node restored from an older copy went unnoticed");
    repair(&c)?;
    assert_eq!(shard_count(&c, 0..8), whole, "every shard rebuilt");
    for (id, data) in &filed {
        assert_eq!(&c.read(id)?, data);
    }
    Ok(())
}

/// A cluster of exactly k+m nodes with one gone for good: its shards have
/// nowhere to go. Passes say so, once each, and read nothing: before, each
/// read and decoded every such stripe, every pass, for as long as the node
/// stayed away.
#[test]
fn with_nowhere_to_rebuild_a_pass_reads_nothing() -> Result<()> {
    let mut c = TestCluster::start(Shape {
        nodes: 6,
        ..Shape::default()
    })?;
    quick_to_repair(&mut c, &[])?;
    for i in 0..4u64 {
        c.file(&bytes(30_000, 40 + i))?;
    }
    c.kill_node(2);
    let said = says_nowhere_to_go(&c);
    assert!(said, "no pass said that the stripes have nowhere to go");
    // Shard reads the live nodes served; a page that cannot be fetched
    // fails the test rather than count as none.
    let reads = |c: &TestCluster| -> Result<f64> {
        let mut sum = 0.0;
        for node in [0u32, 1, 3, 4, 5] {
            let url = c.node_metrics_url(node)?;
            let page = (0..5)
                .find_map(|_| {
                    let got = c.metrics_page(&url).ok();
                    if got.is_none() {
                        std::thread::sleep(std::time::Duration::from_millis(200));
                    }
                    got
                })
                .with_context(|| format!("node {node}'s metrics"))?;
            for op in ["get", "get_unchecked", "verify", "rebuild"] {
                let series = format!(r#"custodia_node_requests_total{{op="{op}",result="ok","#);
                sum += page
                    .lines()
                    .filter(|l| l.starts_with(&series))
                    .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
                    .sum::<f64>();
            }
        }
        Ok(sum)
    };
    let before = reads(&c)?;
    // Several passes, 300 ms apart.
    std::thread::sleep(std::time::Duration::from_secs(2));
    assert_eq!(
        reads(&c)?,
        before,
        "passes read shards with nowhere to put them"
    );
    let s = status(&c)?;
    assert!(s["degraded_stripes"].as_u64().unwrap_or(0) > 0, "{s}");
    Ok(())
}

/// The same cluster with one node gone for good, and then a shard on
/// another node found rotten by scrub: the lost shard still has nowhere to
/// go, but the rotten one is rebuilt onto its own node. Before, the stripe
/// waited for a home for the lost one and carried two bad shards (all its
/// parity) for as long as the node stayed away.
#[test]
fn with_a_node_gone_and_nowhere_to_go_a_rotten_shard_is_still_rebuilt() -> Result<()> {
    let mut c = TestCluster::start(Shape {
        nodes: 6,
        ..Shape::default()
    })?;
    quick_to_repair(
        &mut c,
        &[("quarantine_recheck_ms", toml::Value::Integer(500))],
    )?;
    let filing = Filing::new(&c, 79)?;
    c.set_nodes(&[
        ("scrub_bytes_per_sec", toml::Value::Integer(64 << 20)),
        ("scrub_pass_interval_secs", toml::Value::Integer(1)),
    ])?;
    c.kill_node(3);
    let said = says_nowhere_to_go(&c);
    assert!(said, "no pass said that the stripe has nowhere to go");
    flip_last_byte(&filing.victim)?;
    let healed = custodia_tests::eventually(60, || {
        std::fs::read(&filing.victim).is_ok_and(|now| now == filing.good)
    });
    assert!(healed, "the rotten shard was not rebuilt onto node 2");
    let s = status(&c)?;
    assert!(
        s["degraded_stripes"].as_u64().unwrap_or(0) > 0,
        "the stripe left the queue with a shard still lost: {s}"
    );
    // Nodes 0 and 3 dead: the four shards left, node 2's among them, are
    // all a read has.
    c.kill_node(0);
    assert_eq!(c.read(&filing.id)?, filing.data, "with nodes 0 and 3 dead");
    Ok(())
}

/// A data directory wiped under a running node, which is not restarted:
/// the node notices, stops with an error (for its supervisor to start it
/// again), and started again on the empty directory it is another disk to
/// the gateway, which rebuilds what it held. Before, the node served on
/// with its old disk UUID and nothing was queued until a read met a hole.
#[test]
fn a_disk_wiped_under_a_running_node_is_noticed() -> Result<()> {
    let mut c = TestCluster::start(Shape::default())?;
    c.set_gateway(&[("repair_interval_ms", toml::Value::Integer(500))])?;
    let mut filed = Vec::new();
    let mut stripes = 0u64;
    for i in 0..6u64 {
        let data = bytes(20_000 + 7_000 * i as usize, 60 + i);
        let r = c.file(&data)?;
        stripes += r["stripes"].as_u64().context("stripes")?;
        filed.push((r["id"].as_str().unwrap_or_default().to_owned(), data));
    }
    assert!(!c.shard_files(4).is_empty(), "node 4 holds shards");
    std::fs::remove_dir_all(c.node_dir(4))?;
    let mut exit = None;
    let stopped = custodia_tests::eventually(30, || {
        exit = c.node_exit(4);
        exit.is_some()
    });
    assert!(stopped, "node 4 kept running on a wiped directory");
    assert!(exit.is_some_and(|s| !s.success()), "{exit:?}");
    let log = std::fs::read_to_string(c.data_dir().join("node-4.log"))?;
    assert!(log.contains("data directory changed"), "{log}");
    c.start_node(4)?;
    let noticed = custodia_tests::eventually(20, || {
        std::fs::read_to_string(c.data_dir().join("gateway.log"))
            .is_ok_and(|l| l.contains("different disk"))
    });
    assert!(noticed, "the gateway did not see another disk");
    repair(&c)?;
    assert_eq!(
        shard_count(&c, 0..8),
        6 * stripes as usize,
        "every shard is back"
    );
    c.kill_node(0);
    c.kill_node(1);
    for (id, data) in &filed {
        assert!(
            c.read(id)? == *data,
            "{id} with node 4 rebuilt, nodes 0 and 1 dead"
        );
    }
    Ok(())
}

/// A disk wiped while an upload is under way: the shards it had put there
/// are in stripe records the upload writes only later (in batches), so the
/// walk over recorded stripes that follows the new disk cannot find them.
/// They are checked once the upload has ended, and rebuilt.
#[test]
fn a_disk_wiped_during_an_upload_is_repaired_once_the_upload_ends() -> Result<()> {
    let mut c = TestCluster::start(Shape::default())?;
    c.set_gateway(&[("repair_interval_ms", toml::Value::Integer(500))])?;
    // 40 stripes of 4 x 4 KiB: fewer than a batch of stripe records. Half
    // of them on the nodes, none of them recorded yet.
    let data = bytes(40 * 4 * 4096, 31);
    let s = c.half_upload(&data, 20.0 * 6.0 - 6.0)?;
    let node = (0..8)
        .max_by_key(|&i| c.shard_files(i).len())
        .context("a node")?;
    assert!(
        !c.shard_files(node).is_empty(),
        "the upload put shards on nodes"
    );
    c.kill_node(node);
    std::fs::remove_dir_all(c.node_dir(node))?;
    c.start_node(node)?;
    let noticed = custodia_tests::eventually(20, || {
        std::fs::read_to_string(c.data_dir().join("gateway.log"))
            .is_ok_and(|l| l.contains("different disk"))
    });
    assert!(noticed, "the wiped disk went unnoticed");
    let filed = custodia_tests::finish_upload(s, &data)?;
    let stripes = filed["stripes"].as_u64().context("stripes")? as usize;
    let id = filed["id"].as_str().context("id")?.to_owned();
    // `custodia repair` waits until the node is reconciled, which it is once
    // the upload's stripes are queued.
    repair(&c)?;
    assert_eq!(status(&c)?["degraded_stripes"], 0);
    assert_eq!(
        shard_count(&c, 0..8),
        6 * stripes,
        "the shards lost with the wiped disk were rebuilt"
    );
    // Proven: with two other nodes dead, it still reads back.
    let others: Vec<u32> = (0..8).filter(|&i| i != node).take(2).collect();
    for &i in &others {
        c.kill_node(i);
    }
    assert!(c.read(&id)? == data, "the filing reads back byte-exact");
    Ok(())
}

/// A node dead since before the gateway started is not given a fresh grace
/// by each restart: gateways restarted more often than
/// `repair_after_down_ms` (a crash loop, rolling deploys) still repair it,
/// counting the silence the index saw before.
#[test]
fn gateway_restarts_do_not_postpone_a_dead_nodes_repair() -> Result<()> {
    let mut c = TestCluster::start(Shape::default())?;
    c.set_gateway(&[
        ("node_probe_interval_ms", toml::Value::Integer(500)),
        ("node_down_after_ms", toml::Value::Integer(1_000)),
        ("repair_after_down_ms", toml::Value::Integer(10_000)),
        ("repair_interval_ms", toml::Value::Integer(500)),
    ])?;
    let mut stripes = 0;
    for i in 0..4u64 {
        let r = c.file(&bytes(30_000, 40 + i))?;
        stripes += r["stripes"].as_u64().context("stripes")? as usize;
    }
    c.kill_node(3);
    // Restarted every 3 s, for longer than the grace, while the nodes that
    // are up go on being seen.
    for _ in 0..5 {
        std::thread::sleep(std::time::Duration::from_secs(3));
        c.kill_gateway();
        c.start_gateway()?;
        c.wait_healthy(7)?;
    }
    let live = [0u32, 1, 2, 4, 5, 6, 7];
    // Well inside the grace since this gateway started.
    let rebuilt =
        custodia_tests::eventually(5, || shard_count(&c, live.iter().copied()) == 6 * stripes);
    assert!(
        rebuilt,
        "node 3, silent for 15 s, waits for a grace of 10 s from the last restart: {}",
        status_table(&c)?
    );
    Ok(())
}

/// Shards filed while a failure domain was down land two to a rack; once
/// the rack is back the scanner finds the crowded stripes and repair moves
/// one shard of each into it, copied node to node. Proven the hard way:
/// after the move, the whole rack that held two shards of every stripe is
/// killed and everything still reads back. Then nothing moves any more.
#[test]
fn shards_crowded_into_one_failure_domain_move_once_another_is_back() -> Result<()> {
    let mut c = TestCluster::start(Shape {
        nodes: 4,
        k: 2,
        m: 1,
        ..Shape::default()
    })?;
    let racks = ["rack-a", "rack-a", "rack-b", "rack-c"];
    c.edit_gateway(|g| {
        g.insert("node_probe_interval_ms".into(), toml::Value::Integer(300));
        g.insert("node_down_after_ms".into(), toml::Value::Integer(1_000));
        g.insert("repair_interval_ms".into(), toml::Value::Integer(300));
        g.insert("repair_old_copy_grace_ms".into(), toml::Value::Integer(500));
        g.insert("crowding_walk_gap_ms".into(), toml::Value::Integer(500));
        for node in g
            .get_mut("nodes")
            .and_then(|n| n.as_array_mut())
            .context("the gateway's nodes")?
        {
            let id = node.get("id").and_then(|v| v.as_integer()).context("id")?;
            let table = node.as_table_mut().context("node table")?;
            table.insert("failure_domain".into(), racks[id as usize].into());
        }
        Ok(())
    })?;
    // rack-c is down while these are filed: each stripe gets two shards in
    // rack-a (nodes 0 and 1) and one in rack-b.
    c.kill_node(3);
    let seen_down = custodia_tests::eventually(10, || c.healthy_nodes() == Some(3));
    assert!(seen_down, "the gateway did not see node 3 go");
    let mut filed = Vec::new();
    let mut stripes = 0;
    for i in 0..6u64 {
        let data = bytes(20_000 + 3_000 * i as usize, 70 + i);
        let r = c.file(&data)?;
        stripes += r["stripes"].as_u64().context("stripes")? as usize;
        filed.push((r["id"].as_str().context("id")?.to_owned(), data));
    }
    // A shard file is EVIDENCE-STRIPE-INDEX: its stripe is the name less
    // the index.
    let stripes_on = |c: &TestCluster, n: u32| -> std::collections::BTreeSet<String> {
        c.shard_files(n)
            .iter()
            .filter_map(|p| Some(p.file_name()?.to_str()?.rsplit_once('-')?.0.to_owned()))
            .collect()
    };
    let both = |c: &TestCluster| stripes_on(c, 0).intersection(&stripes_on(c, 1)).count();
    assert_eq!(
        both(&c),
        stripes,
        "every stripe filed with two shards in rack-a"
    );
    // While rack-c stays down there is nowhere better: nothing moves.
    std::thread::sleep(std::time::Duration::from_secs(2));
    assert_eq!(both(&c), stripes, "shards moved with no better home up");

    c.start_node_and_wait(3)?;
    repair(&c)?;
    let spread = custodia_tests::eventually(20, || {
        both(&c) == 0 && stripes_on(&c, 3).len() == stripes && shard_count(&c, 0..4) == 3 * stripes
    });
    assert!(
        spread,
        "stripes still two to a rack: {} of {stripes}; node 3 holds {}\n{}",
        both(&c),
        stripes_on(&c, 3).len(),
        status_table(&c)?
    );
    for n in [2, 3] {
        assert_eq!(
            c.shard_files(n).len(),
            stripes,
            "node {n}, alone in its rack, holds one shard of every stripe"
        );
    }
    assert_eq!(
        c.shard_files(0).len() + c.shard_files(1).len(),
        stripes,
        "rack-a holds one shard of each stripe, the old copies deleted"
    );
    // Settled: a pass that looks at every stripe again (each goes past
    // the crowding check: nothing else would queue it) moves nothing.
    let moved = c.metric(&c.metrics, "custodia_shards_repaired_total")?;
    assert_eq!(moved as usize, stripes, "one shard moved per stripe");
    let out = c.cli(&["repair", "--verify-all", "--patience-secs", "30"])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        c.metric(&c.metrics, "custodia_shards_repaired_total")?,
        moved,
        "shards moved again once spread"
    );
    // Proven: rack-a dies whole, and every filing still reads back.
    c.kill_node(0);
    c.kill_node(1);
    for (id, data) in &filed {
        assert!(
            &c.read(id)? == data,
            "{id} reads back byte-exact without rack-a"
        );
    }
    Ok(())
}

/// One shard a scrub found corrupt and quarantined is not taken for a data
/// directory put back from an older copy (which re-reads every stripe the
/// node holds): the gateway's check of the last shard it stored there sees
/// it quarantined, not gone; repair rebuilds that shard alone.
#[test]
fn a_quarantined_shard_is_not_taken_for_a_restored_disk() -> Result<()> {
    let mut c = TestCluster::start(Shape::default())?;
    c.set_gateway(&[
        ("repair_interval_ms", toml::Value::Integer(600_000)),
        ("node_probe_interval_ms", toml::Value::Integer(300)),
    ])?;
    let data = bytes(10_000, 93);
    let id = c.file_id(&data)?;
    c.set_nodes(&[
        ("scrub_bytes_per_sec", toml::Value::Integer(64 << 20)),
        ("scrub_pass_interval_secs", toml::Value::Integer(1)),
    ])?;
    // A node placement gave one of the filing's shards (its one stripe
    // goes to six of the eight nodes, chosen by its id).
    let (node, victim) = (0..8u32)
        .find_map(|n| match c.shard_files(n).as_slice() {
            [one] => Some((n, one.clone())),
            _ => None,
        })
        .context("no node holds exactly one shard of the filing")?;
    flip_last_byte(&victim)?;
    let quarantine = c.node_dir(node).join("quarantine");
    let quarantined = custodia_tests::eventually(30, || {
        std::fs::read_dir(&quarantine).is_ok_and(|d| d.count() > 0)
    });
    assert!(quarantined, "the scrubber never quarantined the shard");
    // Ten probes of the node.
    std::thread::sleep(std::time::Duration::from_secs(3));
    let log = std::fs::read_to_string(c.data_dir().join("gateway.log"))?;
    assert!(
        !log.contains("no longer holds a shard it stored"),
        "one quarantined shard was taken for a restored disk"
    );
    // Repair collects it from the quarantine (at its next pass) and
    // rebuilds it.
    quick_to_repair(&mut c, &[])?;
    let rebuilt = custodia_tests::eventually(30, || shard_count(&c, 0..8) == 6);
    assert!(
        rebuilt,
        "{} shards: the shard was not rebuilt",
        shard_count(&c, 0..8)
    );
    assert!(c.read(&id)? == data);
    Ok(())
}
