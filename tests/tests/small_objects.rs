//! Small evidence end to end with the nodes' default layout: shards packed
//! into append-only segments, acknowledged by group commit, kept across
//! `kill -9` of every node.

use anyhow::Result;
use custodia_tests::{bytes, eventually, Shape, TestCluster};

const FILERS: u64 = 8;
const EACH: u64 = 25;

/// Sums a metric over every node.
fn over_nodes(c: &TestCluster, series: &str) -> f64 {
    (0..c.shape.nodes)
        .map(|i| {
            c.node_metrics_url(i)
                .and_then(|url| c.metric(&url, series))
                .unwrap_or(f64::NAN)
        })
        .sum()
}

#[test]
fn small_filings_are_group_committed_into_segments_and_survive_kill_9() -> Result<()> {
    let mut c = TestCluster::start(Shape {
        small_shard_bytes: None,
        ..Shape::default()
    })?;
    let shards_per_filing = (c.shape.k + c.shape.m) as f64;

    // Eight clerks file 4 KiB exhibits at once.
    let filed: Vec<(String, Vec<u8>)> = std::thread::scope(|s| {
        let clerks: Vec<_> = (0..FILERS)
            .map(|t| {
                let c = &c;
                s.spawn(move || -> Result<Vec<(String, Vec<u8>)>> {
                    let mut out = Vec::new();
                    for i in 0..EACH {
                        let data = bytes(4096, t * 1000 + i);
                        let r = c.file(&data)?;
                        let id = r["id"].as_str().unwrap_or_default().to_owned();
                        anyhow::ensure!(!id.is_empty(), "filing refused: {r}");
                        out.push((id, data));
                    }
                    Ok(out)
                })
            })
            .collect();
        clerks
            .into_iter()
            .map(|h| h.join().expect("clerk thread"))
            .collect::<Result<Vec<_>>>()
            .map(|v| v.into_iter().flatten().collect())
    })?;
    let shards = filed.len() as f64 * shards_per_filing;

    // Packed: no shard has a file of its own, every node has segments.
    assert!(
        c.all_shard_files().is_empty(),
        "small shards stay out of the shard tree"
    );
    for i in 0..c.shape.nodes {
        let segments = std::fs::read_dir(c.node_dir(i).join("segments"))?.count();
        assert!(segments >= 1, "node {i} has no segment file");
    }
    // Group commit: fewer fsyncs than shards acknowledged (the gauges are
    // refreshed every 5 s).
    assert!(
        eventually(20, || over_nodes(&c, "custodia_node_shards_written_total")
            >= shards
            && over_nodes(&c, "custodia_node_segment_fsyncs_total") > 0.0),
        "node counters never caught up"
    );
    let fsyncs = over_nodes(&c, "custodia_node_segment_fsyncs_total");
    let written = over_nodes(&c, "custodia_node_shards_written_total");
    eprintln!("{written} shards acknowledged with {fsyncs} segment fsyncs");
    // Some grouped. How much depends on how many filings overlap at one
    // node's disk, which here is little: a filing spends most of its time
    // waiting for its receipt. The store's own test
    // (`concurrent_small_puts_share_their_fsyncs`) holds it to 4 puts per
    // fsync with puts that all overlap.
    assert!(
        fsyncs < written,
        "{fsyncs} segment fsyncs for {written} shards: nothing was grouped"
    );

    // Every node dies without warning; every acknowledged shard is back.
    for i in 0..c.shape.nodes {
        c.kill_node(i);
    }
    for i in 0..c.shape.nodes {
        c.start_node_and_wait(i)?;
    }
    c.wait_healthy(c.shape.nodes as u64)?;
    assert!(
        eventually(20, || over_nodes(&c, "custodia_node_shards") == shards),
        "nodes hold {} shards after kill -9, {shards} were acknowledged",
        over_nodes(&c, "custodia_node_shards")
    );
    for (id, data) in &filed {
        assert_eq!(&c.read(id)?, data, "{id} reads back byte-exact");
    }
    // Damage inside node 5's segments: a byte flipped every 4 KiB lands in
    // many records. Reads still return every filing byte-exact (at most one
    // shard of a stripe is on node 5), and the node reports what it found.
    // Flipped in place while the node runs (its reads see the page cache).
    for seg in std::fs::read_dir(c.node_dir(5).join("segments"))? {
        use std::os::unix::fs::FileExt;
        let path = seg?.path();
        let raw = std::fs::read(&path)?;
        let file = std::fs::OpenOptions::new().write(true).open(&path)?;
        for at in (512..raw.len()).step_by(4096) {
            file.write_all_at(&[raw[at] ^ 0x20], at as u64)?;
        }
    }
    for (id, data) in &filed {
        assert_eq!(&c.read(id)?, data, "{id} reads back past node 5's damage");
    }
    let url = c.node_metrics_url(5).expect("node 5 exports metrics");
    assert!(
        eventually(20, || c
            .metric(&url, "custodia_node_corrupt_shards_total")
            .unwrap_or(0.0)
            >= 1.0),
        "node 5 never reported a damaged record"
    );
    // A node that loses its segments is repaired like any lost disk: the
    // filings still read back from the others.
    c.kill_node(3);
    std::fs::remove_dir_all(c.node_dir(3).join("segments"))?;
    c.start_node_and_wait(3)?;
    for (id, data) in filed.iter().step_by(17) {
        assert_eq!(
            &c.read(id)?,
            data,
            "{id} reads back without node 3's shards"
        );
    }
    Ok(())
}
