//! The data plane end to end: real `custodia node` and `custodia gateway`
//! processes on loopback, killed and corrupted for real.

use anyhow::{Context, Result};
use custodia_tests::{blake3_hex, bytes, eventually, output_within, Shape, TestCluster, Tool};
use std::io::{Read, Write};
use std::time::Duration;

const SHARD: usize = 4096;
const STRIPE: usize = 4 * SHARD;

/// Every interesting size round-trips byte-exact, with the right hashes, and
/// range reads return the exact slices.
#[test]
fn sizes_round_trip_with_ranges() -> Result<()> {
    let c = TestCluster::start(Shape::default())?;
    let sizes = [
        0,
        1,
        SHARD - 1,
        SHARD,
        SHARD + 1,
        STRIPE - 1,
        STRIPE,
        STRIPE + 1,
        37 * STRIPE + 5,
    ];
    // Bytes served, as `custodia_read_bytes_total` must count them.
    let mut served = 0u64;
    for (i, &size) in sizes.iter().enumerate() {
        let data = bytes(size, i as u64);
        let filed = c.file(&data)?;
        assert_eq!(filed["size"].as_u64(), Some(size as u64));
        assert_eq!(
            filed["blake3"].as_str(),
            Some(blake3_hex(&data).as_str()),
            "size {size}"
        );
        let sha = {
            use sha2::Digest;
            hex::encode(sha2::Sha256::digest(&data))
        };
        assert_eq!(filed["sha256"].as_str(), Some(sha.as_str()));
        assert_eq!(
            filed["stripes"].as_u64(),
            Some(size.div_ceil(STRIPE) as u64)
        );
        let id = filed["id"].as_str().unwrap_or_default().to_string();
        assert_eq!(c.read(&id)?, data, "size {size} must read back byte-exact");
        served += size as u64;
        if size > 2 {
            let (a, b) = (size as u64 / 3, size as u64 - 2);
            assert_eq!(
                c.read_range(&id, a, b)?,
                data[a as usize..=b as usize],
                "range of size {size}"
            );
            served += b - a + 1;
        }
    }
    // A range counts its own bytes, not what was fetched to verify it.
    assert_eq!(
        c.metric(&c.metrics, "custodia_read_bytes_total")?,
        served as f64
    );
    Ok(())
}

/// 100 MiB in the default 1 MiB shards: many full stripes and a short one.
#[test]
fn hundred_mib_round_trips() -> Result<()> {
    let c = TestCluster::start(Shape {
        shard_size: 1 << 20,
        ..Shape::default()
    })?;
    let data = bytes(100 * 1024 * 1024 + 12345, 99);
    let filed = c.file(&data)?;
    assert_eq!(filed["blake3"].as_str(), Some(blake3_hex(&data).as_str()));
    let id = filed["id"].as_str().unwrap_or_default().to_string();
    assert!(c.read(&id)? == data, "100 MiB must read back byte-exact");
    // Ranges are verified through the Bao outboard in 1 MiB groups: cover
    // group boundaries, the first and last bytes, and the short last group.
    let last = data.len() as u64 - 1;
    let mib = 1u64 << 20;
    let mut served = data.len() as u64;
    for (a, b) in [
        (50_000_000u64, 60_000_000u64),
        (0, 0),
        (mib - 1, mib),
        (3 * mib, 5 * mib - 1),
        (last - 20_000, last),
        (last, last),
    ] {
        assert!(
            c.read_range(&id, a, b)? == data[a as usize..=b as usize],
            "range {a}-{b}"
        );
        served += b - a + 1;
    }
    assert_eq!(
        c.metric(&c.metrics, "custodia_read_bytes_total")?,
        served as f64
    );
    Ok(())
}

/// With m nodes dead every filing still reads back byte-exact, whole and in ranges.
#[test]
fn reads_survive_m_dead_nodes() -> Result<()> {
    let mut c = TestCluster::start(Shape::default())?;
    let items: Vec<(String, Vec<u8>)> = (0..6)
        .map(|i| {
            let data = bytes(3 * STRIPE + i * 1000 + 7, 1000 + i as u64);
            let id = c.file_id(&data)?;
            Ok((id, data))
        })
        .collect::<Result<_>>()?;
    c.kill_node(2);
    c.kill_node(5);
    for (id, data) in &items {
        assert_eq!(&c.read(id)?, data, "read with 2 of 8 nodes dead");
        assert_eq!(c.read_range(id, 5000, 30000)?, data[5000..=30000]);
    }
    // And new filings still work: shards go to the six live nodes.
    let data = bytes(5 * STRIPE, 7);
    let id = c.file_id(&data)?;
    assert_eq!(c.read(&id)?, data);

    // Past m: every shard of one filing gone from every node. A read that
    // cannot be completed is a 503 with a JSON body, never a 200 whose body
    // stops short (evidence this small is fetched and verified before the
    // answer starts); the other filings still read back.
    // Evidence past 1 MiB streams, but its first checked piece is in hand
    // before the answer starts: a whole read and a range read of it fail
    // the same way.
    c.start_node_and_wait(2)?;
    c.start_node_and_wait(5)?;
    let large = c.file_id(&bytes(1536 * 1024, 8))?;
    // Shard files are named `EVIDENCE-STRIPE-INDEX`, the id without hyphens.
    let remove_shards = |id: &str| -> Result<usize> {
        let prefix = format!("{}-", id.replace('-', ""));
        let mut removed = 0;
        for f in c.all_shard_files() {
            let name = f.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            if name.starts_with(&prefix) {
                std::fs::remove_file(&f)?;
                removed += 1;
            }
        }
        Ok(removed)
    };
    let (lost, _) = &items[0];
    assert_eq!(
        remove_shards(lost)?,
        6 * 4,
        "RS(4,2) shards of the filing's 4 stripes"
    );
    assert_eq!(remove_shards(&large)?, 6 * 96, "the large filing's shards");
    for (id, range) in [
        (lost.as_str(), None),
        (large.as_str(), None),
        (large.as_str(), Some("bytes=1000000-1100000")),
    ] {
        let headers: Vec<(&str, &str)> = range.map(|r| ("range", r)).into_iter().collect();
        let a = c.get_with(&c.token, &format!("/v1/evidence/{id}"), &headers)?;
        assert_eq!(
            a.status,
            503,
            "{id} {range:?}: {}",
            String::from_utf8_lossy(&a.body)
        );
        let body: serde_json::Value = serde_json::from_slice(&a.body)?;
        assert_eq!(body["error"], "unavailable", "{body}");
    }
    for (id, data) in &items[1..] {
        assert_eq!(&c.read(id)?, data, "{id} is untouched");
    }
    Ok(())
}

/// A flipped byte in a stored shard: the read still returns the right bytes,
/// the node quarantines the shard and the stripe is queued for repair.
#[test]
fn corrupt_shard_is_rebuilt_and_reported() -> Result<()> {
    let c = TestCluster::start(Shape::default())?;
    let data = bytes(STRIPE, 5);
    let id = c.file_id(&data)?;
    // Corrupt the first data shard (index 0), wherever it is.
    let victim = c
        .all_shard_files()
        .into_iter()
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.ends_with("-0-0"))
        })
        .expect("shard 0 of stripe 0 on some node");
    let mut file = std::fs::read(&victim)?;
    let last = file.len() - 1;
    file[last] ^= 0x40;
    std::fs::write(&victim, &file)?;

    assert_eq!(c.read(&id)?, data, "corruption must be repaired on the fly");
    let in_queue = || queued_for_repair(&c, &id);
    let repaired = || was_repaired(&c, &id);
    // Queued (unless the repair worker, which looks every 10 s, was quicker).
    let queued = eventually(10, || in_queue() || repaired());
    assert!(queued, "the corrupt stripe must be queued for repair");
    assert!(
        !victim.exists(),
        "the node must have quarantined the corrupt shard"
    );
    // Then rebuilt: `custodia repair` returns once the queue is empty, and
    // the repair is on the evidence's custody record.
    let out = c.cli(&["repair", "--patience-secs", "20"])?;
    assert!(
        out.status.success(),
        "repair: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!in_queue() && repaired(), "the stripe was rebuilt");
    assert_eq!(c.read(&id)?, data);
    Ok(())
}

/// A node that serves wrong bytes under a right-looking header (the shard
/// file rewritten with a matching header hash, so the node's own check
/// passes): the read checks every 1 MiB group against the content root,
/// reads the bad group again with each shard checked against the manifest,
/// and still answers the right bytes, whole and in ranges; the stripe is
/// queued for repair, and the repair worker rebuilds it.
#[test]
fn a_shard_rewritten_on_its_node_is_caught_by_the_content_root() -> Result<()> {
    let c = TestCluster::start(Shape::default())?;
    // Three 1 MiB groups over 4 KiB shards: a group spans 64 stripes.
    let data = bytes(3 << 20, 17);
    let id = c.file_id(&data)?;
    // Data shard 2 of stripe 70 (content from 70 x 16 KiB + 2 x 4 KiB, in
    // group 1).
    rewrite_shard(&c, 70, 2, &[100])?;

    assert!(c.read(&id)? == data, "the whole read must still be right");
    let at = 70 * STRIPE + 2 * SHARD + 90;
    for (from, to) in [(at, at + 20), (1 << 20, (2 << 20) - 1), (5, 6)] {
        let a = c.get_with(
            &c.token,
            &format!("/v1/evidence/{id}"),
            &[("range", &format!("bytes={from}-{to}"))],
        )?;
        assert_eq!(a.status, 206, "range {from}-{to}");
        assert!(a.body == data[from..=to], "range {from}-{to} must be right");
    }
    let in_queue = || queued_for_repair(&c, &id);
    let repaired = || was_repaired(&c, &id);
    assert!(
        eventually(10, || in_queue() || repaired()),
        "the stripe with the rewritten shard must be queued for repair"
    );
    let out = c.cli(&["repair", "--patience-secs", "20"])?;
    assert!(
        out.status.success(),
        "repair: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!in_queue() && repaired(), "the stripe was rebuilt");
    assert!(c.read(&id)? == data);
    Ok(())
}

/// The same with shards larger than a group: data shard 1 of a 2 MiB-shard
/// stripe spans groups 2 and 3, and both read back right (the second from
/// the stripe the first one's recheck fetched).
#[test]
fn a_rewritten_shard_spanning_groups_is_caught_in_each() -> Result<()> {
    let c = TestCluster::start(Shape {
        shard_size: 2 << 20,
        ..Shape::default()
    })?;
    let data = bytes(10 << 20, 29);
    let id = c.file_id(&data)?;
    // In group 2 and in group 3.
    rewrite_shard(&c, 0, 1, &[10, (1 << 20) + 10])?;

    assert!(c.read(&id)? == data, "the whole read must still be right");
    let (from, to) = ((2 << 20) + 5, (4 << 20) - 5);
    let a = c.get_with(
        &c.token,
        &format!("/v1/evidence/{id}"),
        &[("range", &format!("bytes={from}-{to}"))],
    )?;
    assert_eq!(a.status, 206);
    assert!(a.body == data[from..=to], "the range over both groups");
    Ok(())
}

/// Whether a stripe of `id` waits in the repair queue.
fn queued_for_repair(c: &TestCluster, id: &str) -> bool {
    c.get_with(&c.token, "/v1/repair/queue", &[])
        .map(|a| {
            a.json()["stripes"]
                .as_array()
                .is_some_and(|s| s.iter().any(|x| x["evidence"] == id))
        })
        .unwrap_or(false)
}

/// Whether `id`'s custody record shows a repair.
fn was_repaired(c: &TestCluster, id: &str) -> bool {
    c.get_with(&c.token, &format!("/v1/evidence/{id}/custody"), &[])
        .is_ok_and(|a| a.json().to_string().contains("repaired"))
}

/// Flips the bytes at `flips` in the body of shard `index` of `stripe`
/// (wherever it is stored) and rewrites its header to match: a node serving
/// wrong bytes that its own check cannot catch.
fn rewrite_shard(c: &TestCluster, stripe: u64, index: u8, flips: &[usize]) -> Result<()> {
    let suffix = format!("-{stripe}-{index}");
    let victim = c
        .all_shard_files()
        .into_iter()
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.ends_with(&suffix))
        })
        .with_context(|| format!("shard {index} of stripe {stripe} on some node"))?;
    let file = std::fs::read(&victim)?;
    let (mut header, body_at) = protocol::ShardHeader::parse_file_prefix(&file)?;
    let mut body = file[body_at..].to_vec();
    for &at in flips {
        body[at] ^= 0x01;
    }
    header.blake3 = protocol::Blake3Hash::of(&body);
    let mut forged = header.file_prefix();
    forged.extend_from_slice(&body);
    std::fs::write(&victim, &forged)?;
    Ok(())
}

/// With the gateway stopped: clears `evidence`'s Bao outboard in the index
/// at `path` (when `clear`), and counts how many of its `needed` pairs are
/// missing.
fn outboard_missing(
    path: &std::path::Path,
    evidence: protocol::EvidenceId,
    needed: &[u64],
    clear: bool,
) -> Result<usize> {
    let store = indexer::EmbeddedStore::open(path)?;
    let rt = tokio::runtime::Builder::new_current_thread().build()?;
    let found = rt.block_on(indexer::run(&store, |tx| async move {
        if clear {
            indexer::schema::clear_outboard_tx(&tx, evidence);
        }
        indexer::schema::get_outboard_pairs_tx(&tx, evidence, needed).await
    }))?;
    Ok(needed.len() - found.len())
}

/// Evidence whose Bao outboard is gone from the index (filed before
/// outboards were kept, or restored by `recover-index` while it could not be
/// read back) still reads, whole or by range: every shard is checked against
/// the manifest and the whole content against its root as it streams, and
/// that read rebuilds and stores the outboard.
#[test]
fn evidence_without_an_outboard_reads_and_gets_it_back() -> Result<()> {
    let mut c = TestCluster::start(Shape::default())?;
    let data = bytes(3 << 20, 23);
    let id = c.file_id(&data)?;
    let evidence: protocol::EvidenceId = id.parse()?;
    let needed = protocol::bao::nodes_for(data.len() as u64, 0..data.len() as u64);
    assert!(!needed.is_empty(), "3 MiB needs hash pairs");
    let path = c.data_dir().join("index.redb");
    let index = |clear: bool| outboard_missing(&path, evidence, &needed, clear);

    c.kill_gateway();
    assert_eq!(index(true)?, needed.len());
    c.start_gateway()?;
    c.wait_healthy(c.shape.nodes.into())?;
    assert!(c.read(&id)? == data, "a whole read needs no outboard");
    c.kill_gateway();
    assert_eq!(index(false)?, 0, "the whole read rebuilt the outboard");

    // A range is served all the same (the whole content is read and checked
    // against the root), and that read rebuilds the outboard too.
    assert_eq!(index(true)?, needed.len());
    c.start_gateway()?;
    c.wait_healthy(c.shape.nodes.into())?;
    let rebuilds = || {
        std::fs::read_to_string(c.data_dir().join("gateway.log"))
            .unwrap_or_default()
            .matches("rebuilt and stored the Bao outboard")
            .count()
    };
    assert_eq!(rebuilds(), 1, "the whole read above");
    // Several at once: one rebuilds, the others wait for it.
    let ranges: [(u64, u64); 3] = [
        ((1 << 20) + 5, (2 << 20) + 77),
        (0, 0),
        ((3 << 20) - 9, (3 << 20) - 1),
    ];
    std::thread::scope(|s| {
        let reads: Vec<_> = ranges
            .iter()
            .map(|&(first, last)| {
                let (c, id) = (&c, &id);
                (first, last, s.spawn(move || c.read_range(id, first, last)))
            })
            .collect();
        for (first, last, read) in reads {
            let got = read.join().expect("read thread");
            assert!(
                got.as_ref().ok().map(Vec::as_slice) == Some(&data[first as usize..=last as usize]),
                "range {first}-{last} of evidence without an outboard: {:?}",
                got.err()
            );
        }
    });
    assert_eq!(rebuilds(), 2, "one rebuild for the concurrent ranges");
    c.kill_gateway();
    assert_eq!(index(false)?, 0, "the range read rebuilt the outboard");
    c.start_gateway()?;
    c.wait_healthy(c.shape.nodes.into())?;
    assert!(c.read_range(&id, 7, (3 << 20) - 2)? == data[7..(3 << 20) - 1]);
    Ok(())
}

/// A reader that goes away while its range waits for an outboard rebuild
/// (a client's timeout on large recovered evidence) does not leave the
/// rebuild undone: the read goes on to the end and stores the outboard, so
/// the retry finds it instead of starting over from byte 0.
#[test]
fn an_abandoned_read_still_finishes_the_outboard_rebuild() -> Result<()> {
    let mut c = TestCluster::start(Shape {
        shard_size: 64 * 1024,
        ..Shape::default()
    })?;
    let data = bytes(128 << 20, 29);
    let id = c.file_id(&data)?;
    let evidence: protocol::EvidenceId = id.parse()?;
    let needed = protocol::bao::nodes_for(data.len() as u64, 0..data.len() as u64);
    let path = c.data_dir().join("index.redb");
    let index = |clear: bool| outboard_missing(&path, evidence, &needed, clear);
    c.kill_gateway();
    assert_eq!(index(true)?, needed.len());
    c.start_gateway()?;
    c.wait_healthy(c.shape.nodes.into())?;
    let log = || std::fs::read_to_string(c.data_dir().join("gateway.log")).unwrap_or_default();
    {
        let mut s = std::net::TcpStream::connect(c.api.trim_start_matches("http://"))?;
        write!(
            s,
            "GET /v1/evidence/{id} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nRange: bytes=0-67108863\r\n\r\n",
            c.token
        )?;
        s.flush()?;
        // Gone once the rebuild has begun, having read nothing of the
        // range the gateway sends meanwhile.
        assert!(
            eventually(20, || log().contains("no usable Bao outboard")),
            "the read never began its rebuild"
        );
    }
    let done = eventually(30, || log().contains("rebuilt and stored the Bao outboard"));
    assert!(done, "the abandoned read did not finish the rebuild");
    assert!(
        log().contains("reading on to finish the outboard"),
        "the reader was gone before the rebuild ended"
    );
    c.kill_gateway();
    assert_eq!(index(false)?, 0, "the abandoned read stored the outboard");
    Ok(())
}

/// Killing a node while an upload streams: the filing either completes and
/// reads back byte-exact, or fails with an error — never a 201 for data that
/// cannot be read.
#[test]
fn node_killed_during_upload() -> Result<()> {
    let mut c = TestCluster::start(Shape {
        shard_size: 64 * 1024,
        ..Shape::default()
    })?;
    let data = bytes(48 * 1024 * 1024, 11);
    let written = c.metric(&c.metrics, "custodia_shards_written_total")?;
    let (upload, sent) = trickle_in_background(&c, &data);
    kill_node_mid_upload(&mut c, 3, written, &sent, data.len())?;
    let (status, json, _) = upload.join().expect("upload thread")?;
    if status == 201 {
        let id = json["id"].as_str().unwrap_or_default();
        assert_eq!(json["blake3"].as_str(), Some(blake3_hex(&data).as_str()));
        // Full durability: readable even after one more node dies.
        c.kill_node(6);
        assert!(c.read(id)? == data, "a 201 must mean the data reads back");
    } else {
        assert!(status >= 400, "expected a clear error, got {status}");
        assert!(json["error"].is_string(), "errors carry a JSON body");
    }
    Ok(())
}

/// Uploads share a gateway-wide memory budget for the stripes they code and
/// store: held to one upload's pipeline here, six at once take turns, and
/// every one is filed and reads back.
#[test]
fn uploads_beyond_the_memory_budget_wait_their_turn() -> Result<()> {
    let mut c = TestCluster::start(Shape {
        shard_size: 64 * 1024,
        ..Shape::default()
    })?;
    c.set_gateway(&[("ingest_memory_mib", toml::Value::Integer(1))])?;
    let uploads: Vec<_> = (0..6u64)
        .map(|i| {
            let (api, token) = (c.api.clone(), c.token.clone());
            std::thread::spawn(move || -> Result<(String, u64)> {
                let mut resp = ureq::post(format!("{api}/v1/evidence"))
                    .header("authorization", format!("Bearer {token}"))
                    .send(&bytes(2 << 20, 700 + i)[..])?;
                let v: serde_json::Value = resp.body_mut().read_json()?;
                Ok((v["id"].as_str().unwrap_or_default().to_owned(), 700 + i))
            })
        })
        .collect();
    for upload in uploads {
        let (id, seed) = upload.join().expect("upload thread")?;
        assert!(c.read(&id)? == bytes(2 << 20, seed), "{id} reads back");
    }
    let waits = c.metric(&c.metrics, "custodia_ingest_memory_waits_total")?;
    assert!(waits > 0.0, "no stripe waited for memory");
    Ok(())
}

/// The receive budget held by another upload whose client trickles its
/// body (a byte now and then, never idle long enough to be cut off) makes
/// a filing wait no longer than a client may go silent: then 503, to try
/// again, instead of hanging unanswered for as long as the other lasts.
#[test]
fn a_filing_kept_waiting_for_receive_memory_is_told_to_retry() -> Result<()> {
    let mut c = TestCluster::start(Shape {
        shard_size: 256 * 1024,
        ..Shape::default()
    })?;
    // One stripe's room; clients silent for 3 s are cut off.
    c.set_gateway(&[
        ("receive_memory_mib", toml::Value::Integer(1)),
        ("client_idle_timeout_ms", toml::Value::Integer(3000)),
    ])?;
    let mut trickle = std::net::TcpStream::connect(c.api.trim_start_matches("http://"))?;
    write!(
        trickle,
        "POST /v1/evidence HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
        c.token
    )?;
    let held = || {
        c.metric(
            &c.metrics,
            "custodia_gateway_memory_held_bytes{budget=\"receive\"}",
        )
        .unwrap_or(-1.0)
    };
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sender = {
        let (mut s, stop) = (trickle.try_clone()?, stop.clone());
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if s.write_all(b"1\r\nx\r\n").and_then(|()| s.flush()).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        })
    };
    assert!(
        eventually(20, || held() >= f64::from(1u32 << 20)),
        "the trickling body does not hold the budget: {}",
        held()
    );
    let started = std::time::Instant::now();
    let a = c.file_with(&c.token, &bytes(1000, 65), &[])?;
    let waited = started.elapsed();
    assert_eq!(a.status, 503, "{}", String::from_utf8_lossy(&a.body));
    assert_eq!(a.json()["error"], "unavailable", "{}", a.json());
    assert!(
        waited >= Duration::from_secs(2),
        "answered after {waited:?}"
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    sender.join().expect("trickle thread");
    trickle.write_all(b"0\r\n\r\n")?;
    let mut answer = String::new();
    trickle.set_read_timeout(Some(Duration::from_secs(60)))?;
    trickle.read_to_string(&mut answer)?;
    assert!(answer.starts_with("HTTP/1.1 201"), "{answer}");
    Ok(())
}

/// The stripes uploads are still receiving share a budget too. A body of
/// unknown length (chunked) holds a whole stripe's room from its first
/// byte, so with room for one stripe, another filing waits (reading none
/// of its body) until that one hands its stripe on. Bodies of declared
/// length are charged only what they hold, so several stalled small ones
/// leave room for others.
#[test]
fn uploads_being_received_share_a_memory_budget() -> Result<()> {
    let mut c = TestCluster::start(Shape {
        shard_size: 256 * 1024,
        ..Shape::default()
    })?;
    // One stripe: 4 data shards of 256 KiB.
    c.set_gateway(&[("receive_memory_mib", toml::Value::Integer(1))])?;
    let held = || {
        c.metric(
            &c.metrics,
            "custodia_gateway_memory_held_bytes{budget=\"receive\"}",
        )
        .unwrap_or(-1.0)
    };
    let addr = c.api.trim_start_matches("http://").to_owned();
    let begin = |framing: &str| -> Result<std::net::TcpStream> {
        let mut s = std::net::TcpStream::connect(&addr)?;
        write!(
            s,
            "POST /v1/evidence HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n{framing}\r\nConnection: close\r\n\r\n",
            c.token
        )?;
        s.set_read_timeout(Some(Duration::from_secs(60)))?;
        Ok(s)
    };
    let answer = |mut s: std::net::TcpStream| -> Result<u16> {
        let mut resp = String::new();
        s.read_to_string(&mut resp)?;
        Ok(resp
            .split(' ')
            .nth(1)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0))
    };
    let filed = || {
        c.metric(&c.metrics, "custodia_filings_total")
            .unwrap_or(-1.0)
    };

    // A chunked body's first bytes: it holds the whole budget.
    let mut chunked = begin("Transfer-Encoding: chunked")?;
    let first = bytes(100, 61);
    write!(chunked, "{:x}\r\n", first.len())?;
    chunked.write_all(&first)?;
    chunked.write_all(b"\r\n")?;
    chunked.flush()?;
    assert!(
        eventually(20, || held() >= f64::from(1u32 << 20)),
        "a chunked body's stripe does not hold a stripe's room: {}",
        held()
    );
    // A small filing of declared length waits its turn.
    let before = filed();
    let small = bytes(1000, 62);
    let waiting = {
        let (api, token, small) = (c.api.clone(), c.token.clone(), small.clone());
        std::thread::spawn(move || -> Result<u16> {
            let resp = ureq::post(format!("{api}/v1/evidence"))
                .header("authorization", format!("Bearer {token}"))
                .send(&small[..])?;
            Ok(resp.status().as_u16())
        })
    };
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        !waiting.is_finished(),
        "a filing went past the receive budget"
    );
    assert_eq!(filed(), before);
    // The chunked body ends: both are filed.
    let rest = bytes(3000, 63);
    write!(chunked, "{:x}\r\n", rest.len())?;
    chunked.write_all(&rest)?;
    chunked.write_all(b"\r\n0\r\n\r\n")?;
    chunked.flush()?;
    assert_eq!(answer(chunked)?, 201);
    assert_eq!(waiting.join().expect("upload thread")?, 201);
    assert!(
        eventually(20, || held() == 0.0),
        "receive memory is still held: {}",
        held()
    );

    // Two stalled bodies of declared length hold 1 KiB each: a third
    // filing (100 KiB) goes through beside them.
    let stalled: Vec<_> = (0..2)
        .map(|_| -> Result<std::net::TcpStream> {
            let mut s = begin("Content-Length: 1000")?;
            s.write_all(&small[..10])?;
            s.flush()?;
            Ok(s)
        })
        .collect::<Result<_>>()?;
    assert!(
        eventually(20, || held() == 2048.0),
        "two small bodies' stripes hold other than 1 KiB each: {}",
        held()
    );
    let beside = bytes(100 * 1024, 64);
    let id = c.file_id(&beside)?;
    assert!(c.read(&id)? == beside, "read back differs");
    for mut s in stalled {
        s.write_all(&small[10..])?;
        s.flush()?;
        assert_eq!(answer(s)?, 201);
    }
    Ok(())
}

/// A gateway killed mid-upload leaves an intent nobody renews. Restarted,
/// the gateway's collector ends it once it has watched the lease stay
/// unchanged for a whole period on its own clock: not before (whatever the
/// stamps say), and not never. Until then the orphan sweep leaves the
/// upload's shards alone (an upload in flight may claim them); after, it
/// deletes them (here with a one-second grace).
#[test]
fn an_upload_cut_off_by_a_gateway_crash_is_collected_after_a_lease() -> Result<()> {
    let mut c = TestCluster::start(Shape {
        shard_size: 64 * 1024,
        ..Shape::default()
    })?;
    let lease = Duration::from_secs(10);
    c.set_gateway(&[
        ("intent_lease_ms", toml::Value::Integer(10_000)),
        ("gc_interval_ms", toml::Value::Integer(200)),
        ("orphan_sweep_interval_ms", toml::Value::Integer(500)),
        ("orphan_grace_ms", toml::Value::Integer(1_000)),
    ])?;
    let data = bytes(48 * 1024 * 1024, 5);
    let (upload, _) = trickle_in_background(&c, &data);
    assert!(
        eventually(20, || c.all_shard_files().len() >= 60),
        "the upload stored no shards"
    );
    c.kill_gateway();
    let cut = upload.join().expect("upload thread");
    assert!(
        !matches!(cut, Ok((201, _, _))),
        "the upload cannot have completed"
    );
    // Shards already received are fsynced and renamed by the nodes.
    std::thread::sleep(Duration::from_millis(300));
    let left = c.all_shard_files().len();
    let restarted = std::time::Instant::now();
    c.start_gateway()?;
    c.wait_healthy(c.shape.nodes.into())?;
    // Watched for most of a lease: nothing is collected before one has
    // passed (a restart slower than that is a failure, not a skipped check).
    let quiet_until = restarted + lease - Duration::from_secs(2);
    assert!(
        std::time::Instant::now() < quiet_until,
        "the restart took {:?}, most of the lease: nothing left to check",
        restarted.elapsed()
    );
    while std::time::Instant::now() < quiet_until {
        assert_eq!(
            c.all_shard_files().len(),
            left,
            "collected before the restarted gateway watched a whole lease"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(
        eventually(30, || c.all_shard_files().is_empty()),
        "{} shards of the abandoned upload are still on the nodes",
        c.all_shard_files().len()
    );
    // The cluster files as before.
    let again = bytes(200_000, 6);
    let id = c.file_id(&again)?;
    assert!(c.read(&id)? == again);
    Ok(())
}

/// An index restored from last night's backup, its ledger with it, knows
/// nothing of what was filed since: every shard of that evidence looks like
/// an orphan to the sweep. Shards of more evidence than the sweep's limit
/// are then not deleted, and the gateway says why.
#[test]
fn an_index_restored_from_a_backup_does_not_sweep_what_was_filed_since() -> Result<()> {
    // The index and the ledger (its tiles and archive) from one directory
    // to another, as a backup holds them.
    let copy_index = |from: &std::path::Path, to: &std::path::Path| -> Result<()> {
        std::fs::copy(from.join("index.redb"), to.join("index.redb"))?;
        let _ = std::fs::remove_dir_all(to.join("ledger"));
        custodia_tests::copy_dir(&from.join("ledger"), &to.join("ledger"))
    };
    let mut c = TestCluster::start(Shape::default())?;
    c.file(&bytes(5000, 80))?;
    // Last night's backup, the gateway stopped.
    c.stop_gateway();
    let backup = tempfile::tempdir()?;
    copy_index(c.data_dir(), backup.path())?;
    c.start_gateway()?;
    c.wait_healthy(c.shape.nodes.into())?;
    // Today's filings, with their receipts.
    let today: Vec<String> = (0..3u64)
        .map(|i| c.file_id(&bytes(9000, 81 + i)))
        .collect::<Result<_>>()?;
    let shards = c.all_shard_files().len();
    // The disk fails; last night's backup comes back. (Today's index, as
    // an operator may yet find it elsewhere, is kept aside.)
    c.stop_gateway();
    let found = tempfile::tempdir()?;
    copy_index(c.data_dir(), found.path())?;
    copy_index(backup.path(), c.data_dir())?;
    // (Restarts the gateway.)
    c.set_gateway(&[
        ("orphan_sweep_interval_ms", toml::Value::Integer(300)),
        ("orphan_grace_ms", toml::Value::Integer(500)),
        ("orphan_sweep_max_evidence", toml::Value::Integer(2)),
    ])?;
    let refused = eventually(30, || {
        c.metric(&c.metrics, "custodia_orphan_sweep_refused")
            .is_ok_and(|v| v == 1.0)
    });
    assert!(refused, "the sweep did not refuse");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(c.all_shard_files().len(), shards, "shards were deleted");
    let log = std::fs::read_to_string(c.data_dir().join("gateway.log"))?;
    assert!(log.contains("is the index behind the nodes"), "not said");
    // Today's index found after all: every filing of today is whole.
    c.stop_gateway();
    copy_index(found.path(), c.data_dir())?;
    c.start_gateway()?;
    c.wait_healthy(c.shape.nodes.into())?;
    for (i, id) in today.iter().enumerate() {
        assert!(c.read(id)? == bytes(9000, 81 + i as u64), "{id}");
    }
    Ok(())
}

/// An upload's thread: its status, JSON body and how long it took.
type Trickle = std::thread::JoinHandle<Result<(u16, serde_json::Value, Duration)>>;

/// [`trickle_upload`] on a thread of its own, so that the test can kill
/// something while the upload streams; with the count of body bytes it has
/// begun to send (see [`kill_node_mid_upload`]).
fn trickle_in_background(
    c: &TestCluster,
    data: &[u8],
) -> (Trickle, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let (api, token, data) = (c.api.clone(), c.token.clone(), data.to_vec());
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = sent.clone();
    let thread = std::thread::spawn(move || trickle_upload(&api, &token, &data, &counted));
    (thread, sent)
}

/// Kills node `i` once the upload that [`trickle_in_background`] streams is
/// under way: once the gateway counts more shards written than `written`
/// (its count before the upload began). Fails if that never comes, or if
/// the upload had begun to send the last of its `len` body bytes by the
/// kill: then the kill did not land mid-upload (the body was not all sent,
/// so nothing can have been filed yet).
fn kill_node_mid_upload(
    c: &mut TestCluster,
    i: u32,
    written: f64,
    sent: &std::sync::atomic::AtomicUsize,
    len: usize,
) -> Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while c.metric(&c.metrics, "custodia_shards_written_total")? <= written {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the upload wrote no shard within 20 s"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    c.kill_node(i);
    let at_kill = sent.load(std::sync::atomic::Ordering::SeqCst);
    anyhow::ensure!(
        at_kill < len,
        "the upload's body was all sent ({at_kill} of {len} bytes) before node {i} was \
         killed: the kill did not land mid-upload"
    );
    Ok(())
}

/// Files `data` by trickling it (1 MiB every 20 ms, so that a kill lands
/// mid-upload) over a raw HTTP/1.1 connection; returns the status, the JSON
/// body and how long it took. `sent` counts the body bytes it has begun to
/// send (each chunk counted before it is written).
fn trickle_upload(
    api: &str,
    token: &str,
    data: &[u8],
    sent: &std::sync::atomic::AtomicUsize,
) -> Result<(u16, serde_json::Value, Duration)> {
    let started = std::time::Instant::now();
    let mut s = std::net::TcpStream::connect(api.trim_start_matches("http://"))?;
    write!(
        s,
        "POST /v1/evidence HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        data.len()
    )?;
    for chunk in data.chunks(1 << 20) {
        sent.fetch_add(chunk.len(), std::sync::atomic::Ordering::SeqCst);
        s.write_all(chunk)?;
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let status = resp
        .split(' ')
        .nth(1)
        .and_then(|x| x.parse().ok())
        .unwrap_or(0);
    let body = resp.split("\r\n\r\n").nth(1).unwrap_or("");
    Ok((
        status,
        serde_json::from_str(body).unwrap_or_default(),
        started.elapsed(),
    ))
}

/// A node killed without closing its connections (SIGKILL: its packets just
/// stop) costs a filing in flight a liveness check, not QUIC's 10 s idle
/// timeout plus a reconnect: the stalled shard puts fail within a couple of
/// seconds, go to other nodes, and the filing is acknowledged at full
/// redundancy. (Before the check, one kill stalled a 300 MB filing 20 s.)
#[test]
fn a_node_killed_mid_filing_costs_seconds_not_the_idle_timeout() -> Result<()> {
    let mut c = TestCluster::start(Shape {
        shard_size: 64 * 1024,
        ..Shape::default()
    })?;
    let data = bytes(32 * 1024 * 1024, 12);
    // The same filing on a healthy cluster, for the time it takes here.
    let (status, json, healthy) = trickle_upload(&c.api, &c.token, &data, &Default::default())?;
    assert_eq!(status, 201, "{json}");
    let written = c.metric(&c.metrics, "custodia_shards_written_total")?;
    let begun = std::time::Instant::now();
    let (upload, sent) = trickle_in_background(&c, &data);
    kill_node_mid_upload(&mut c, 3, written, &sent, data.len())?;
    let killed_at = begun.elapsed();
    let (status, json, took) = upload.join().expect("upload thread")?;
    println!("32 MiB filing: {healthy:?} healthy, {took:?} with node 3 killed at {killed_at:?}");
    assert_eq!(status, 201, "{json}");
    assert_eq!(
        json["degraded_stripes"], 0,
        "spares take the dead node's shards: {json}"
    );
    assert!(
        took < healthy + Duration::from_secs(8),
        "the kill stalled the filing {:?} (healthy {healthy:?}); QUIC's idle timeout is 10 s",
        took.saturating_sub(healthy)
    );
    let id = json["id"].as_str().unwrap_or_default();
    c.kill_node(6);
    assert!(c.read(id)? == data, "a 201 must mean the data reads back");
    Ok(())
}

/// Node `i`'s state as `custodia status` reports it (`up`, `suspect`, ...).
fn node_state(c: &TestCluster, i: usize) -> Result<String> {
    let out = c.cli(&["status", "--json"])?;
    let s: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    Ok(s["nodes"][i]["state"].as_str().unwrap_or("?").to_owned())
}

/// A read that hedges past a node killed a moment ago has that node checked
/// in the background: it is marked down at once, so later reads stop
/// waiting a hedge delay per stripe for it. The prober is slowed to a
/// minute here, so only the read can have found out.
#[test]
fn a_read_that_hedges_past_a_dead_node_has_it_marked_down() -> Result<()> {
    let mut c = TestCluster::start(Shape::default())?;
    c.set_gateway(&[("node_probe_interval_ms", toml::Value::Integer(60_000))])?;
    let data = bytes(40 * STRIPE, 21);
    let id = c.file_id(&data)?;
    assert_eq!(node_state(&c, 3)?, "up");
    c.kill_node(3);
    assert!(c.read(&id)? == data, "read back different bytes");
    assert!(
        eventually(5, || node_state(&c, 3).is_ok_and(|s| s != "up")),
        "node 3 still counts as up after a read hedged past it: {}",
        node_state(&c, 3)?
    );
    assert!(c.read(&id)? == data, "read back different bytes");
    // Within its grace (10 minutes) nothing is queued for node 3: an empty
    // backlog, but `custodia repair` must not call its shards verified.
    let out = c.cli(&["repair", "--patience-secs", "1"])?;
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "repair succeeded: {said}");
    assert!(said.contains("node 3 ("), "{said}");
    Ok(())
}

/// A node killed and started again on its address is used by the next read
/// as if nothing happened: the first packet the gateway sends it on the old
/// connection is answered with a stateless reset that the gateway trusts
/// (the node's reset key is derived from its private key, so it outlives the
/// process), and the request is retried on a new connection at once. Before,
/// the gateway ignored the new process's reset, waited out a liveness check
/// and marked the node down until its next probe, reading around a node
/// that was up. The prober is slowed to a minute, so only reads move the
/// node's state.
#[test]
fn a_node_restarted_after_kill_9_is_reconnected_at_once() -> Result<()> {
    let mut c = TestCluster::start(Shape::default())?;
    c.set_gateway(&[("node_probe_interval_ms", toml::Value::Integer(60_000))])?;
    let data = bytes(40 * STRIPE, 22);
    let id = c.file_id(&data)?;
    // Every node has a connection open from the gateway.
    assert!(c.read(&id)? == data, "read back different bytes");
    let log_path = c.dir.path().join("gateway.log");
    let seen = std::fs::read_to_string(&log_path)?.len();
    let killed = std::time::Instant::now();
    c.kill_node(3);
    c.start_node_and_wait(3)?;
    assert!(c.read(&id)? == data, "read back different bytes");
    // Within the connection's idle timeout (10 s), or the old connection
    // would have timed out and the read found none to be reset.
    let took = killed.elapsed();
    assert!(
        took < Duration::from_secs(8),
        "the restart took {took:?}: nothing left to test"
    );
    // The restarted process served some of it (its counters start at 0).
    let url = c.node_metrics_url(3).expect("node 3 exports metrics");
    assert!(
        c.metric(&url, "custodia_node_shards_read_total")? >= 1.0,
        "the read did not reach the restarted node"
    );
    let log = std::fs::read_to_string(&log_path)?;
    let addr = c.node_addr(3)?;
    assert!(
        !log[seen..]
            .lines()
            .any(|l| l.contains("did not answer a liveness check") && l.contains(&addr)),
        "the restarted node's reset was not trusted: a liveness check ran out"
    );
    assert_eq!(
        node_state(&c, 3)?,
        "up",
        "the restarted node is not counted up"
    );
    Ok(())
}

/// Connects and sends the head of an evidence upload of `len` bytes, over
/// raw HTTP/1.1 so that the test can cut, stall or trickle the body.
fn raw_upload(c: &TestCluster, len: usize, close: bool) -> Result<std::net::TcpStream> {
    let mut s = std::net::TcpStream::connect(c.api.trim_start_matches("http://"))?;
    let close = if close { "Connection: close\r\n" } else { "" };
    write!(
        s,
        "POST /v1/evidence HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Length: {len}\r\n{close}\r\n",
        c.token
    )?;
    Ok(s)
}

/// A client that disconnects mid-upload leaves no visible evidence, and its
/// shards are deleted.
#[test]
fn disconnect_mid_upload_leaves_nothing() -> Result<()> {
    let c = TestCluster::start(Shape::default())?;
    let data = bytes(40 * STRIPE, 3);
    {
        // Half the body sent, and a whole stripe's shards (k+m = 6) on the
        // nodes: there is something to delete.
        let _s = c.half_upload(&data, 6.0)?;
        assert!(
            !c.all_shard_files().is_empty(),
            "the upload's shards are counted written but no node holds them"
        );
    } // dropped: connection closed with half the body sent
    let root = blake3_hex(&data);
    let half = blake3_hex(&data[..data.len() / 2]);
    for h in [root, half] {
        let a = c.get_with(&c.token, &format!("/v1/evidence/by-hash/{h}"), &[])?;
        assert_eq!(a.status, 200);
        assert_eq!(
            a.json()["filings"].as_array().map(Vec::len),
            Some(0),
            "nothing may be visible"
        );
    }
    assert!(
        eventually(15, || c.all_shard_files().is_empty()),
        "shards of the aborted upload must be deleted, found {:?}",
        c.all_shard_files()
    );
    Ok(())
}

/// A credential revoked while its upload streams in files nothing: the
/// filing is checked against it again where it commits, and answered 401;
/// nothing is visible and the shards are collected.
#[test]
fn a_credential_revoked_mid_upload_files_nothing() -> Result<()> {
    let c = TestCluster::start(Shape::default())?;
    // Another administrator's token, to revoke the harness's with.
    let other = c.post_json(
        &c.token,
        "/v1/admin/keys",
        &serde_json::json!({ "tenant": "admin", "role": "admin" }),
    )?;
    assert_eq!(other.status, 201, "{}", other.json());
    let other = other.json()["token"].as_str().context("token")?.to_owned();
    let data = bytes(40 * STRIPE, 5);
    let mut s = c.half_upload(&data, 6.0)?;
    let revoked = c.post_json(
        &other,
        "/v1/admin/keys/revoke",
        &serde_json::json!({ "token": c.token }),
    )?;
    assert_eq!(revoked.status, 200, "{}", revoked.json());
    s.write_all(&data[data.len() / 2..])?;
    s.flush()?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    assert!(resp.starts_with("HTTP/1.1 401"), "{resp}");
    let h = blake3_hex(&data);
    let a = c.get_with(&other, &format!("/v1/evidence/by-hash/{h}"), &[])?;
    assert_eq!(a.status, 200);
    assert_eq!(
        a.json()["filings"].as_array().map(Vec::len),
        Some(0),
        "{}",
        a.json()
    );
    assert!(
        eventually(15, || c.all_shard_files().is_empty()),
        "shards of the refused upload must be deleted, found {:?}",
        c.all_shard_files()
    );
    // The same for a hash-only notarization whose body is still coming.
    let third = c.post_json(
        &other,
        "/v1/admin/keys",
        &serde_json::json!({ "tenant": "admin", "role": "admin" }),
    )?;
    let third = third.json()["token"].as_str().context("token")?.to_owned();
    let body = serde_json::json!({ "items": [{ "blake3": blake3_hex(b"minutes"), "size": 7 }] })
        .to_string();
    let mut s = std::net::TcpStream::connect(c.api.trim_start_matches("http://"))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    write!(
        s,
        "POST /v1/notarize HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {third}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
        body.len(),
        &body[..10]
    )?;
    s.flush()?;
    std::thread::sleep(Duration::from_millis(300));
    let revoked = c.post_json(
        &other,
        "/v1/admin/keys/revoke",
        &serde_json::json!({ "token": third }),
    )?;
    assert_eq!(revoked.status, 200, "{}", revoked.json());
    s.write_all(&body.as_bytes()[10..])?;
    s.flush()?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    assert!(resp.starts_with("HTTP/1.1 401"), "{resp}");
    Ok(())
}

/// A client that stops sending mid-body but keeps its connection open (a
/// stalled or hostile client) does not hold its upload's buffers and intent
/// for as long as it likes: after `client_idle_timeout_ms` it gets 408 with a
/// JSON body, nothing is visible and its shards are deleted. A request head
/// that never ends is cut off after as long.
#[test]
fn a_stalled_upload_times_out_and_leaves_nothing() -> Result<()> {
    let mut c = TestCluster::start(Shape::default())?;
    c.set_gateway(&[("client_idle_timeout_ms", toml::Value::Integer(2_000))])?;
    let data = bytes(40 * STRIPE, 8);
    let mut s = raw_upload(&c, data.len(), false)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.write_all(&data[..data.len() / 2])?;
    s.flush()?;
    let stalled = std::time::Instant::now();
    // The connection stays open; the answer comes anyway.
    let mut resp = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&resp).contains("}") {
        match s.read(&mut buf)? {
            0 => break,
            n => resp.extend_from_slice(&buf[..n]),
        }
    }
    let waited = stalled.elapsed();
    let resp = String::from_utf8_lossy(&resp);
    assert!(resp.starts_with("HTTP/1.1 408"), "{resp}");
    assert!(resp.contains(r#""error":"body_timeout""#), "{resp}");
    assert!(
        waited >= Duration::from_millis(1_900) && waited < Duration::from_secs(20),
        "answered after {waited:?}"
    );
    // A head trickled and never finished is not waited for either (nor is
    // an idle connection kept open for ever).
    let mut h = std::net::TcpStream::connect(c.api.trim_start_matches("http://"))?;
    h.set_read_timeout(Some(Duration::from_secs(30)))?;
    let opened = std::time::Instant::now();
    h.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")?;
    let mut rest = Vec::new();
    let closed = h.read_to_end(&mut rest);
    assert!(
        opened.elapsed() < Duration::from_secs(20),
        "an unfinished head held its connection {:?} ({closed:?})",
        opened.elapsed()
    );
    // Nor a small body announced and never sent, on a route read before
    // anyone is authenticated (the development TSA's): 408 in JSON.
    let mut t = std::net::TcpStream::connect(c.api.trim_start_matches("http://"))?;
    t.set_read_timeout(Some(Duration::from_secs(30)))?;
    let opened = std::time::Instant::now();
    t.write_all(
        b"POST /tsa HTTP/1.1\r\nHost: x\r\nContent-Type: application/timestamp-query\r\n\
          Content-Length: 100\r\n\r\n",
    )?;
    let mut resp = Vec::new();
    while !String::from_utf8_lossy(&resp).contains('}') {
        match t.read(&mut buf)? {
            0 => break,
            n => resp.extend_from_slice(&buf[..n]),
        }
    }
    let resp = String::from_utf8_lossy(&resp);
    assert!(resp.starts_with("HTTP/1.1 408"), "{resp}");
    assert!(resp.contains(r#""error":"body_timeout""#), "{resp}");
    assert!(
        opened.elapsed() < Duration::from_secs(20),
        "a small body never sent held its request {:?}",
        opened.elapsed()
    );
    let half = blake3_hex(&data[..data.len() / 2]);
    let a = c.get_with(&c.token, &format!("/v1/evidence/by-hash/{half}"), &[])?;
    assert_eq!(a.json()["filings"].as_array().map(Vec::len), Some(0));
    assert!(
        eventually(15, || c.all_shard_files().is_empty()),
        "shards of the abandoned upload must be deleted, found {:?}",
        c.all_shard_files()
    );
    drop(s);
    // A client that keeps sending, however slowly, is not cut off.
    let slow = bytes(3 * STRIPE, 9);
    let mut s = raw_upload(&c, slow.len(), true)?;
    for piece in slow.chunks(slow.len() / 4 + 1) {
        std::thread::sleep(Duration::from_millis(600));
        s.write_all(piece)?;
        s.flush()?;
    }
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    assert!(resp.starts_with("HTTP/1.1 201"), "{resp}");
    Ok(())
}

/// A gateway told to stop (SIGTERM, as a supervisor or a rolling upgrade
/// does) stops taking connections at once, but lets the upload under way
/// finish: the clerk whose exhibit was half sent gets a 201 and a filing
/// that reads back after the restart, instead of a cut connection and an
/// upload to start again. Then the gateway exits cleanly.
#[test]
fn a_stopping_gateway_finishes_the_upload_under_way() -> Result<()> {
    let mut c = TestCluster::start(Shape::default())?;
    let data = bytes(40 * STRIPE, 23);
    // Half an upload, under way (its first stripes on the nodes) before the
    // gateway is told to stop.
    let half_upload = |c: &TestCluster| -> Result<std::net::TcpStream> {
        let written = c.metric(&c.metrics, "custodia_shards_written_total")?;
        let mut s = raw_upload(c, data.len(), true)?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        s.write_all(&data[..data.len() / 2])?;
        s.flush()?;
        anyhow::ensure!(
            eventually(10, || c
                .metric(&c.metrics, "custodia_shards_written_total")
                .unwrap_or(0.0)
                > written),
            "the upload never started"
        );
        Ok(s)
    };
    let mut s = half_upload(&c)?;
    // What has arrived shows as it arrives; nothing is filed yet.
    let received = c.metric(&c.metrics, "custodia_received_bytes_total")?;
    assert!(received >= STRIPE as f64, "{received} bytes received");
    assert_eq!(c.metric(&c.metrics, "custodia_ingest_bytes_total")?, 0.0);
    c.signal_gateway("TERM")?;
    let api = c.api.trim_start_matches("http://").to_owned();
    assert!(
        eventually(10, || std::net::TcpStream::connect(&api).is_err()),
        "the gateway still takes connections after SIGTERM"
    );
    assert!(
        c.gateway_exit().is_none(),
        "the gateway did not wait for the upload"
    );
    s.write_all(&data[data.len() / 2..])?;
    s.flush()?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    assert!(resp.starts_with("HTTP/1.1 201"), "{resp}");
    let body = resp.split("\r\n\r\n").nth(1).context("response body")?;
    let filed: serde_json::Value = serde_json::from_str(body)?;
    let id = filed["id"].as_str().context("id")?.to_owned();
    assert!(
        eventually(10, || c.gateway_exit().is_some()),
        "the gateway did not exit once the upload was done"
    );
    let exit = c.gateway_exit().context("exit status")?;
    assert!(exit.success(), "the gateway exited with {exit}");
    c.start_gateway()?;
    c.wait_healthy(c.shape.nodes as u64)?;
    assert!(c.read(&id)? == data, "the filing reads back byte-exact");

    // Told twice, it stops at once: the upload under way is cut off and
    // nothing of it is filed.
    let mut s = half_upload(&c)?;
    c.signal_gateway("TERM")?;
    assert!(
        eventually(10, || std::net::TcpStream::connect(&api).is_err()),
        "the gateway still takes connections after SIGTERM"
    );
    c.signal_gateway("TERM")?;
    assert!(
        eventually(10, || c.gateway_exit().is_some()),
        "a second SIGTERM did not stop the gateway"
    );
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    assert!(
        !resp.contains(" 201 "),
        "the cut-off upload was filed: {resp}"
    );
    c.start_gateway()?;
    c.wait_healthy(c.shape.nodes as u64)?;
    let found = c.get_with(
        &c.token,
        &format!("/v1/evidence/by-hash/{}", blake3_hex(&data)),
        &[],
    )?;
    assert_eq!(
        found.json()["filings"].as_array().map(Vec::len),
        Some(1),
        "only the first filing exists"
    );
    Ok(())
}

/// A reader that stops taking bytes with its connection open does not hold
/// its read (stripes in memory, or an outboard rebuild other readers wait
/// for) for ever: after `client_idle_timeout_ms` the read is abandoned and the
/// response ends short of its Content-Length. Other reads go on.
#[test]
fn a_reader_that_stops_reading_is_cut_off() -> Result<()> {
    let mut c = TestCluster::start(Shape::default())?;
    c.set_gateway(&[("client_idle_timeout_ms", toml::Value::Integer(1_000))])?;
    // Larger than what loopback socket buffers hold, so the gateway blocks.
    let data = bytes(32 * 1024 * 1024, 21);
    let id = c.file(&data)?["id"].as_str().context("id")?.to_owned();
    let mut s = std::net::TcpStream::connect(c.api.trim_start_matches("http://"))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        s,
        "GET /v1/evidence/{id} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
        c.token
    )?;
    let mut first = vec![0u8; 64 * 1024];
    s.read_exact(&mut first)?;
    assert!(first.starts_with(b"HTTP/1.1 200"));
    std::thread::sleep(Duration::from_secs(4));
    let mut rest = Vec::new();
    // The connection closes early: a short read, or a reset.
    let _ = s.read_to_end(&mut rest);
    let got = first.len() + rest.len();
    assert!(
        got < data.len(),
        "the whole response arrived ({got} bytes) although the reader stalled"
    );
    let log = std::fs::read_to_string(c.data_dir().join("gateway.log"))?;
    assert!(log.contains("read abandoned"), "the gateway says why");
    assert!(
        c.read(&id)? == data,
        "a reader that keeps reading gets it all"
    );
    Ok(())
}

/// Credentials: missing or unknown tokens get 401 with a JSON body; a reader
/// cannot file; tenants cannot see each other's evidence.
#[test]
fn authentication_and_tenants() -> Result<()> {
    let c = TestCluster::start(Shape {
        nodes: 6,
        ..Shape::default()
    })?;
    let a = c.file_with("not-a-token", b"x", &[])?;
    assert_eq!(a.status, 401);
    assert_eq!(a.json()["error"], "unauthorized");
    let a = c.get_with("", "/v1/evidence/by-hash/00", &[])?;
    assert_eq!(a.status, 401);

    // Secrets and evidence are the operator's alone: the cluster's
    // directory, the index (S3 secret keys) and the nodes' data.
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &std::path::Path| -> Result<u32> {
            Ok(std::fs::metadata(p)?.permissions().mode() & 0o777)
        };
        assert_eq!(mode(c.data_dir())?, 0o700);
        assert_eq!(mode(&c.data_dir().join("tls"))?, 0o700);
        assert_eq!(mode(&c.data_dir().join("index.redb"))?, 0o600);
        assert_eq!(mode(&c.node_dir(0))?, 0o700);
    }
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    // POST /v1/admin/tokens, any answer: (status, JSON body).
    let token_for = |tenant: &str, role: &str| -> Result<(u16, serde_json::Value)> {
        let mut resp = agent
            .post(format!("{}/v1/admin/tokens", c.api))
            .header("authorization", format!("Bearer {}", c.token))
            .send_json(serde_json::json!({ "tenant": tenant, "role": role }))?;
        let v: serde_json::Value = resp.body_mut().read_json()?;
        Ok((resp.status().as_u16(), v))
    };
    // A token for a tenant nobody registered is refused (a typo would
    // file evidence no one else can see).
    let (status, body) = token_for("cuort-a", "clerk")?;
    assert_eq!(
        (status, body["error"].as_str()),
        (404, Some("no_such_tenant"))
    );
    // A tenant name against the naming rules is the caller's mistake (400),
    // not the server's (it was a 500).
    let mut resp = agent
        .post(format!("{}/v1/admin/tenants", c.api))
        .header("authorization", format!("Bearer {}", c.token))
        .send_json(serde_json::json!({ "name": "Court A" }))?;
    let v: serde_json::Value = resp.body_mut().read_json()?;
    assert_eq!(
        (resp.status().as_u16(), v["error"].as_str()),
        (400, Some("bad_tenant"))
    );
    // The public ledger answers 404 to what is not a tile, a path through
    // one included (it was a 500 from the file system).
    for path in ["/ledger/tile/0/000.p/1/x", "/ledger/tile/x%231"] {
        let a = c.get_with("", path, &[])?;
        assert_eq!(
            (a.status, a.json()["error"].as_str()),
            (404, Some("not_found")),
            "{path}"
        );
    }
    // Errors made before any handler runs (a path that is not UTF-8, no
    // such route, a wrong method) have the API's JSON body too.
    let a = c.get_with("", "/v1/evidence/%FF", &[])?;
    assert_eq!(
        (a.status, a.json()["error"].as_str()),
        (400, Some("bad_request"))
    );
    let a = c.get_with(&c.token, "/v1/no-such-route", &[])?;
    assert_eq!(
        (a.status, a.json()["error"].as_str()),
        (404, Some("not_found"))
    );
    let mut resp = agent.put(format!("{}/healthz", c.api)).send_empty()?;
    let v: serde_json::Value = resp.body_mut().read_json()?;
    assert_eq!(
        (resp.status().as_u16(), v["error"].as_str()),
        (405, Some("method_not_allowed"))
    );
    // The scheme name is case-insensitive.
    let a = c.get_with("", "/v1/evidence/by-hash/00", &[])?;
    assert_eq!(a.status, 401);
    let lower = format!("bearer {}", c.token);
    let a = c.get_with_auth(&lower, &format!("/v1/evidence/by-hash/{}", "0".repeat(64)))?;
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));

    let make = |tenant: &str, role: &str| -> Result<String> {
        ureq::post(format!("{}/v1/admin/tenants", c.api))
            .header("authorization", format!("Bearer {}", c.token))
            .send_json(serde_json::json!({ "name": tenant }))?;
        let resp = ureq::post(format!("{}/v1/admin/tokens", c.api))
            .header("authorization", format!("Bearer {}", c.token))
            .send_json(serde_json::json!({ "tenant": tenant, "role": role }))?;
        let mut resp = resp;
        let v: serde_json::Value = resp.body_mut().read_json()?;
        Ok(v["token"].as_str().unwrap_or_default().to_string())
    };
    let clerk_a = make("court-a", "clerk")?;
    let reader_a = make("court-a", "reader")?;
    let clerk_b = make("court-b", "clerk")?;
    // Admin reaches every tenant: only the operators' tenant holds it.
    let (status, body) = token_for("court-a", "admin")?;
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("forbidden")),
        "{body}"
    );

    let data = bytes(1000, 1);
    let filed = c.file_with(&clerk_a, &data, &[("x-custodia-case", "A-1")])?;
    assert_eq!(filed.status, 201);
    let id = filed.json()["id"].as_str().unwrap_or_default().to_string();
    assert_eq!(c.file_with(&reader_a, &data, &[])?.status, 403);
    // A client that waits for `100 Continue` (curl, for large uploads) gets
    // its refusal at once, not a go-ahead to send 40 GB nobody reads.
    {
        use std::io::{Read, Write};
        let addr = c.api.trim_start_matches("http://");
        let mut s = std::net::TcpStream::connect(addr)?;
        s.set_read_timeout(Some(std::time::Duration::from_secs(30)))?;
        write!(
            s,
            "POST /v1/evidence HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {reader_a}\r\n\
             Content-Length: 40000000000\r\nExpect: 100-continue\r\n\r\n"
        )?;
        let mut head = [0u8; 64];
        let n = s.read(&mut head)?;
        let head = String::from_utf8_lossy(&head[..n]);
        assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    }
    assert_eq!(
        c.get_with(&reader_a, &format!("/v1/evidence/{id}"), &[])?
            .body,
        data
    );
    assert_eq!(
        c.get_with(&clerk_b, &format!("/v1/evidence/{id}"), &[])?
            .status,
        404
    );
    let root = blake3_hex(&data);
    let mine = c
        .get_with(&reader_a, &format!("/v1/evidence/by-hash/{root}"), &[])?
        .json();
    assert_eq!(mine["filings"][0]["case"], "A-1");
    let theirs = c
        .get_with(&clerk_b, &format!("/v1/evidence/by-hash/{root}"), &[])?
        .json();
    assert_eq!(
        theirs["filings"].as_array().map(Vec::len),
        Some(0),
        "lookups stay within the tenant"
    );

    // Content filed more often than a page holds is found in pages, oldest
    // first, each saying where the next begins.
    let copies = b"filed in three cases";
    let mut filed = Vec::new();
    for _ in 0..3 {
        filed.push(c.file(copies)?["id"].as_str().context("id")?.to_owned());
    }
    let root = blake3_hex(copies);
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    for pages in 1.. {
        assert!(pages <= 3, "paging does not end: {seen:?}");
        let query = match &after {
            Some(a) => format!("?limit=2&after={a}"),
            None => "?limit=2".to_owned(),
        };
        let page = c
            .get_with(
                &c.token,
                &format!("/v1/evidence/by-hash/{root}{query}"),
                &[],
            )?
            .json();
        let ids = page["filings"].as_array().context("filings")?;
        assert!(ids.len() <= 2, "a page past its limit: {page}");
        seen.extend(
            ids.iter()
                .filter_map(|f| f["id"].as_str().map(str::to_owned)),
        );
        match page["next_after"].as_str() {
            Some(next) => after = Some(next.to_owned()),
            None => break,
        }
    }
    assert_eq!(seen, filed, "every filing once, in filing order");
    for bad in ["?limit=0", "?limit=1001", "?after=nonsense", "?page=2"] {
        let a = c.get_with(&c.token, &format!("/v1/evidence/by-hash/{root}{bad}"), &[])?;
        assert_eq!(a.status, 400, "{bad}: {}", String::from_utf8_lossy(&a.body));
        assert!(a.json()["error"].is_string(), "{bad}: no JSON error");
    }
    Ok(())
}

/// Retries with one Idempotency-Key file once; a wrong acquisition hash is
/// refused and leaves nothing visible.
#[test]
fn idempotency_and_declared_hashes() -> Result<()> {
    if !custodia_tests::require("idempotency_and_declared_hashes", &[Tool::Curl])? {
        return Ok(());
    }
    let c = TestCluster::start(Shape {
        nodes: 6,
        ..Shape::default()
    })?;
    let data = bytes(3 * STRIPE, 8);
    let first = c.file_with(&c.token, &data, &[("idempotency-key", "upload-42")])?;
    let again = c.file_with(&c.token, &data, &[("idempotency-key", "upload-42")])?;
    assert_eq!(first.status, 201);
    assert_eq!(again.status, 201);
    assert_eq!(first.json()["id"], again.json()["id"]);
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    assert_eq!(again.json()["degraded_stripes"], 0);
    assert_eq!(again.json()["degraded_count_capped"], false);
    // Another caller of the tenant reusing the key is not told of a filing
    // it never made (whose statement names someone else).
    let mut made = ureq::post(format!("{}/v1/admin/tokens", c.api))
        .header("authorization", format!("Bearer {}", c.token))
        .send_json(serde_json::json!({ "tenant": "admin", "role": "clerk" }))?;
    let clerk: serde_json::Value = made.body_mut().read_json()?;
    let clerk = clerk["token"].as_str().context("a clerk token")?;
    let other = c.file_with(clerk, &data, &[("idempotency-key", "upload-42")])?;
    assert_eq!(
        other.status,
        422,
        "{}",
        String::from_utf8_lossy(&other.body)
    );
    assert_eq!(other.json()["error"], "idempotency_key_reused");

    // The key names that filing only: a request that does not repeat it
    // (other bytes, another declared hash, other metadata) is refused with
    // 422 and files nothing, instead of answering with the first filing.
    let changed = bytes(3 * STRIPE, 11);
    let key = [("idempotency-key", "upload-42")];
    let a = c.file_with(&c.token, &changed, &key)?;
    assert_eq!(a.status, 422, "{}", String::from_utf8_lossy(&a.body));
    assert_eq!(a.json()["error"], "idempotency_key_reused");
    let found = c.get_with(
        &c.token,
        &format!("/v1/evidence/by-hash/{}", blake3_hex(&changed)),
        &[],
    )?;
    assert_eq!(found.json()["filings"].as_array().map(Vec::len), Some(0));
    let shorter = &data[..data.len() - 1];
    assert_eq!(c.file_with(&c.token, shorter, &key)?.status, 422);
    let declared = blake3_hex(&changed);
    let a = c.file_with(
        &c.token,
        &data,
        &[key[0], ("x-custodia-blake3", declared.as_str())],
    )?;
    assert_eq!(a.status, 422);
    let a = c.file_with(&c.token, &data, &[key[0], ("x-custodia-case", "other")])?;
    assert_eq!(a.status, 422);
    assert!(a.json()["message"]
        .as_str()
        .is_some_and(|m| m.contains("case")));
    // Provenance is notarized with the filing but not kept in its manifest:
    // a retry declaring another source device is refused all the same.
    let a = c.file_with(
        &c.token,
        &data,
        &[key[0], ("x-custodia-source-device", "camera 7")],
    )?;
    assert_eq!(a.status, 422, "{}", String::from_utf8_lossy(&a.body));
    assert!(a.json()["message"]
        .as_str()
        .is_some_and(|m| m.contains("provenance")));
    let declared = blake3_hex(&data);
    let a = c.file_with(
        &c.token,
        &data,
        &[key[0], ("x-custodia-blake3", declared.as_str())],
    )?;
    assert_eq!(a.status, 201);
    assert_eq!(a.json()["id"], first.json()["id"]);
    // The filing's own hash declared over other bytes: the bytes sent are
    // checked too, and are no replay of it (filed fresh, they would be a
    // hash mismatch).
    let a = c.file_with(
        &c.token,
        &changed,
        &[key[0], ("x-custodia-blake3", declared.as_str())],
    )?;
    assert_eq!(a.status, 422, "{}", String::from_utf8_lossy(&a.body));
    assert_eq!(a.json()["error"], "idempotency_key_reused");
    // A body of another length under the key is refused before any of it
    // is read: a client still sending a long one gets the answer, not a
    // reset.
    let a = c.file_with(&c.token, &bytes(3 << 20, 12), &key)?;
    assert_eq!(a.status, 422, "{}", String::from_utf8_lossy(&a.body));
    assert!(
        a.json()["message"]
            .as_str()
            .is_some_and(|m| m.contains("content")),
        "{}",
        a.json()
    );
    let a = c.file_with(&c.token, &data, &[("idempotency-key", "")])?;
    assert_eq!(a.status, 400, "an empty key is refused");
    assert!(a.json()["message"]
        .as_str()
        .is_some_and(|m| m.contains("Idempotency-Key")));

    let other = bytes(100, 9);
    let wrong = blake3_hex(b"something else");
    let a = c.file_with(&c.token, &other, &[("x-custodia-blake3", &wrong)])?;
    assert_eq!(a.status, 422);
    assert_eq!(a.json()["error"], "hash_mismatch");
    let found = c.get_with(
        &c.token,
        &format!("/v1/evidence/by-hash/{}", blake3_hex(&other)),
        &[],
    )?;
    assert_eq!(found.json()["filings"].as_array().map(Vec::len), Some(0));
    let right = blake3_hex(&other);
    assert_eq!(
        c.file_with(&c.token, &other, &[("x-custodia-blake3", &right)])?
            .status,
        201
    );

    let a = c.file_with(&c.token, b"x", &[("x-custodia-sha256", "zz")])?;
    assert_eq!(a.status, 400);
    // A hash under a name this API does not read (misspelt, or another
    // convention's) is refused, never left unchecked behind a 201.
    let sha = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&other))
    };
    for header in ["x-custodia-sha-256", "content-digest", "content-md5"] {
        let a = c.file_with(&c.token, &other, &[(header, &sha)])?;
        assert_eq!(a.status, 400, "{header}: {}", a.json());
        assert!(
            a.json()["message"]
                .as_str()
                .is_some_and(|m| m.contains(header)),
            "{}",
            a.json()
        );
    }

    // Metadata in the query string follows the headers' rules: its hash is
    // checked (it was ignored, and the filing answered 201), its text
    // percent-decoded, and a name it does not know, or one given twice,
    // refused.
    let queried = bytes(321, 11);
    let qsha = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&queried))
    };
    let a = c.file_query(&c.token, &format!("case=C-17&sha256={sha}"), &queried, &[])?;
    assert_eq!(a.status, 422, "a wrong hash in the query: {}", a.json());
    let a = c.file_query(
        &c.token,
        &format!("case=Smith%20%C3%A9&sha256={qsha}&file-name=scene.mp4"),
        &queried,
        &[],
    )?;
    assert_eq!(a.status, 201, "{}", String::from_utf8_lossy(&a.body));
    let found = c.get_with(
        &c.token,
        &format!("/v1/evidence/by-hash/{}", blake3_hex(&queried)),
        &[],
    )?;
    assert_eq!(found.json()["filings"][0]["case"], "Smith \u{e9}");
    assert_eq!(found.json()["filings"][0]["file_name"], "scene.mp4");
    for (query, headers) in [
        ("sha-256=00", &[][..]),
        ("case=a&case=b", &[][..]),
        ("case=a", &[("x-custodia-case", "b")][..]),
        ("case=%0Aa", &[][..]),
        // A space in forms, a plus in URIs: which one is not guessed.
        ("capture-time=2024-05-01T10:00:00+02:00", &[][..]),
    ] {
        let a = c.file_query(&c.token, query, &queried, headers)?;
        assert_eq!(
            a.status,
            400,
            "{query}: {}",
            String::from_utf8_lossy(&a.body)
        );
    }
    // A body this API would file as something else than the file meant: a
    // form's envelope, or compressed bytes; or with a media type curl
    // sends for any file unless told (notarized, it would stay wrong).
    for header in [
        ("content-type", "multipart/form-data; boundary=x"),
        ("content-type", "application/x-www-form-urlencoded"),
        ("content-encoding", "gzip"),
    ] {
        let a = c.file_with(&c.token, &queried, &[header])?;
        assert_eq!(
            a.status,
            415,
            "{header:?}: {}",
            String::from_utf8_lossy(&a.body)
        );
        assert_eq!(a.json()["error"], "unsupported_media_type");
    }
    // A transfer coding other than chunked (HTTP servers pass gzip's bytes
    // through undecoded): the stored bytes would be the compressed stream.
    let coded = b"the coded body, as it arrives";
    let mut s = std::net::TcpStream::connect(c.api.trim_start_matches("http://"))?;
    write!(
        s,
        "POST /v1/evidence HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
         Transfer-Encoding: gzip, chunked\r\nConnection: close\r\n\r\n{:x}\r\n",
        c.token,
        coded.len()
    )?;
    s.write_all(coded)?;
    s.write_all(b"\r\n0\r\n\r\n")?;
    let mut answer = String::new();
    s.read_to_string(&mut answer)?;
    assert!(answer.starts_with("HTTP/1.1 415"), "{answer}");
    assert!(answer.contains("unsupported_media_type"), "{answer}");
    for filed in [&queried[..], &coded[..]] {
        let found = c.get_with(
            &c.token,
            &format!("/v1/evidence/by-hash/{}", blake3_hex(filed)),
            &[],
        )?;
        assert_eq!(
            found.json()["filings"].as_array().map(Vec::len),
            Some(usize::from(filed == &queried[..]))
        );
    }

    // Metadata headers are held to 1 KiB each: 400 with a JSON body, and
    // nothing filed.
    let named = bytes(700, 10);
    let long = "n".repeat(2_000);
    let a = c.file_with(&c.token, &named, &[("x-custodia-file-name", &long)])?;
    assert_eq!(a.status, 400, "{}", String::from_utf8_lossy(&a.body));
    assert_eq!(a.json()["error"], "bad_request");
    assert!(a.json()["message"]
        .as_str()
        .is_some_and(|m| m.contains("x-custodia-file-name")));
    let found = c.get_with(
        &c.token,
        &format!("/v1/evidence/by-hash/{}", blake3_hex(&named)),
        &[],
    )?;
    assert_eq!(found.json()["filings"].as_array().map(Vec::len), Some(0));

    // A request head past 64 KiB is refused (431) before any of it is
    // filed, and the API serves on. (Headers from a file: one command-line
    // argument holds at most 128 KiB.)
    let head = c.data_dir().join("huge-header");
    std::fs::write(&head, format!("x-custodia-case: {}\n", "c".repeat(200_000)))?;
    let out = std::process::Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--data-binary",
            "abc",
        ])
        .args(["-H", &format!("Authorization: Bearer {}", c.token)])
        .arg("-H")
        .arg(format!("@{}", head.display()))
        .arg(format!("{}/v1/evidence", c.api))
        .output()?;
    // hyper answers 431 and closes with the rest of the head unread, which
    // the kernel may turn into a reset before curl reads the answer.
    let code = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(code == "431" || code == "000", "a 200 KB head got {code}");
    let found = c.get_with(
        &c.token,
        &format!("/v1/evidence/by-hash/{}", blake3_hex(b"abc")),
        &[],
    )?;
    assert_eq!(found.json()["filings"].as_array().map(Vec::len), Some(0));
    assert_eq!(
        c.file_with(&c.token, b"abc", &[])?.status,
        201,
        "the API serves on"
    );
    Ok(())
}

/// Everything survives a full restart of every process (SIGKILL).
#[test]
fn restart_keeps_everything() -> Result<()> {
    let mut c = TestCluster::start(Shape {
        nodes: 6,
        ..Shape::default()
    })?;
    let data = bytes(9 * STRIPE + 3, 21);
    let id = c.file_id(&data)?;
    c.kill_gateway();
    for i in 0..6 {
        c.kill_node(i);
    }
    for i in 0..6 {
        c.start_node(i)?;
    }
    c.start_gateway()?;
    c.wait_healthy(6)?;
    assert_eq!(c.read(&id)?, data);
    let a = c.get_with(
        &c.token,
        &format!("/v1/evidence/{id}"),
        &[("range", "bytes=999999999-")],
    )?;
    assert_eq!(a.status, 416);
    Ok(())
}

/// `init --api-tls`: the evidence API speaks HTTPS only, with a certificate
/// from the cluster CA. Bearer tokens and evidence do not cross the network
/// in clear: a plain-HTTP request gets no HTTP answer, the CLI finds the CA
/// beside the token and files and reads back, and a client trusting another
/// CA is refused.
#[test]
fn the_evidence_api_serves_https_only_when_asked() -> Result<()> {
    let c = TestCluster::start(Shape {
        nodes: 6,
        api_tls: true,
        ..Shape::default()
    })?;
    assert!(c.api.starts_with("https://"), "{}", c.api);
    let data = bytes(300_000, 61);
    let filed = c.file(&data)?;
    assert_eq!(filed["blake3"].as_str(), Some(blake3_hex(&data).as_str()));
    let id = filed["id"].as_str().unwrap_or_default().to_owned();
    assert_eq!(c.read(&id)?, data);

    // Plain HTTP on the same port: the TLS server answers no HTTP.
    let addr = c.api.trim_start_matches("https://").to_owned();
    let mut plain = std::net::TcpStream::connect(&addr)?;
    plain.set_read_timeout(Some(Duration::from_secs(5)))?;
    plain.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")?;
    let mut answer = Vec::new();
    let _ = plain.read_to_end(&mut answer);
    assert!(
        !answer.starts_with(b"HTTP/"),
        "plain HTTP was answered: {}",
        String::from_utf8_lossy(&answer)
    );

    // The CLI: the cluster CA beside the token file is trusted without a flag.
    let dir = tempfile::tempdir()?;
    // A name no ASCII header holds is filed as it is (RFC 8187's UTF-8'').
    let (file, back) = (
        dir.path().join("Beweis_Müller 100%.mp4"),
        dir.path().join("back.bin"),
    );
    std::fs::write(&file, &data)?;
    let put = c.cli(&[
        "put",
        file.to_str().unwrap_or_default(),
        "--case",
        "Fall Ä-17/Ωμέγα",
        "--media-type",
        "video/mp4",
        "--sha256",
        &hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&data)),
    ])?;
    assert!(
        put.status.success(),
        "{}",
        String::from_utf8_lossy(&put.stderr)
    );
    // Refused before a byte is sent (the CLI waits for 100 Continue): the
    // gateway's reason reaches the operator, not a broken pipe after the
    // first few MiB of a large file.
    let big = dir.path().join("big.bin");
    std::fs::write(&big, vec![7u8; 48 << 20])?;
    let refused = c.cli(&["put", big.to_str().unwrap_or_default(), "--case", "a\u{7}b"])?;
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && said.contains("control or invisible formatting characters"),
        "{said}"
    );
    let put: serde_json::Value = serde_json::from_slice(&put.stdout)?;
    assert_eq!(put["file_name"], "Beweis_Müller 100%.mp4", "{put}");
    assert_eq!(put["case"], "Fall Ä-17/Ωμέγα", "{put}");
    assert_eq!(put["media_type"], "video/mp4", "{put}");
    // Not UTF-8, a control character (encoded or raw), a right-to-left
    // override that shows `invoice\u{202E}gpj.exe` as `invoiceexe.jpg`.
    for bad in [
        "UTF-8''%FF",
        "UTF-8''a%0Ab",
        "a\tb",
        "UTF-8''invoice%E2%80%AEgpj.exe",
    ] {
        let a = c.file_with(&c.token, b"x", &[("x-custodia-file-name", bad)])?;
        assert_eq!(a.status, 400, "{bad}: {}", String::from_utf8_lossy(&a.body));
    }
    // Two of one header: which was meant is not guessed.
    let twice = [("x-custodia-case", "A-1"), ("x-custodia-case", "B-2")];
    let a = c.file_with(&c.token, b"x", &twice)?;
    assert_eq!(a.status, 400, "{}", String::from_utf8_lossy(&a.body));
    // The zero-width non-joiner Persian words are spelt with is not refused.
    let a = c.file_with(
        &c.token,
        b"x",
        &[(
            "x-custodia-case",
            "UTF-8''%D9%85%DB%8C%E2%80%8C%D8%B4%D9%88%D8%AF",
        )],
    )?;
    assert_eq!(a.status, 201, "{}", String::from_utf8_lossy(&a.body));
    assert_eq!(
        a.json()["case"],
        "\u{645}\u{6cc}\u{200c}\u{634}\u{648}\u{62f}"
    );
    let id2 = put["id"].as_str().unwrap_or_default();
    let get = c.cli(&["get", id2, "-o", back.to_str().unwrap_or_default()])?;
    assert!(
        get.status.success(),
        "{}",
        String::from_utf8_lossy(&get.stderr)
    );
    assert_eq!(std::fs::read(&back)?, data);
    {
        // Readable as the umask says, as any file the user writes.
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &std::path::Path| -> Result<u32> {
            Ok(std::fs::metadata(p)?.permissions().mode() & 0o777)
        };
        let plain = dir.path().join("written-plainly");
        std::fs::write(&plain, b"x")?;
        assert_eq!(mode(&back)?, mode(&plain)?, "the copy's mode");
    }
    // An existing file is not replaced without --force.
    std::fs::write(&back, b"an earlier copy")?;
    let again = c.cli(&["get", id2, "-o", back.to_str().unwrap_or_default()])?;
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("--force"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    assert_eq!(std::fs::read(&back)?, b"an earlier copy");
    let forced = c.cli(&[
        "get",
        id2,
        "-o",
        back.to_str().unwrap_or_default(),
        "--force",
    ])?;
    assert!(forced.status.success());
    assert_eq!(std::fs::read(&back)?, data);
    let status = c.cli(&["status"])?;
    assert!(status.status.success());
    // An answer that cannot be verified (no X-Custodia-Blake3: not a
    // gateway, or a proxy that drops headers) is not written.
    let fake = std::net::TcpListener::bind("127.0.0.1:0")?;
    let fake_api = format!("http://{}", fake.local_addr()?);
    let server = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut conn, _) = fake.accept()?;
        let mut head = [0u8; 4096];
        let _ = conn.read(&mut head)?;
        conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello")
    });
    let unverified = dir.path().join("unverified.bin");
    let out = std::process::Command::new(custodia_tests::custodia_bin())
        .args(["get", id2, "-o", unverified.to_str().unwrap_or_default()])
        .args(["--api", &fake_api, "--token-file"])
        .arg(c.data_dir().join("admin.token"))
        .output()?;
    let _ = server.join();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("X-Custodia-Blake3"),
        "{err}"
    );
    assert!(!unverified.exists(), "nothing written");

    // A client that trusts another CA (here: the TSA's certificate) is
    // refused by its own TLS check, with a message and a failing exit code.
    let tsa = c.data_dir().join("tsa.pem");
    let refused = c.cli(&["status", "--ca-cert", tsa.to_str().unwrap_or_default()])?;
    let err = String::from_utf8_lossy(&refused.stderr).to_lowercase();
    assert!(
        !refused.status.success() && err.contains("certificate"),
        "{err}"
    );
    // `--ca-cert public` means the public web roots (for a certificate a
    // public CA issued), which do not vouch for the cluster CA's.
    let public = c.cli(&["status", "--ca-cert", "public"])?;
    let err = String::from_utf8_lossy(&public.stderr).to_lowercase();
    assert!(
        !public.status.success() && err.contains("certificate") && !err.contains("reading the ca"),
        "{err}"
    );
    Ok(())
}

/// A running `custodia up`: its node processes' pids, read from what it
/// printed.
struct Up {
    child: std::process::Child,
    nodes: Vec<i32>,
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How long an `up` expected to refuse may take to exit: a regression that
/// lets it start fails the test (killed, with what it said) instead of
/// hanging it.
const UP_REFUSES_WITHIN: Duration = Duration::from_secs(60);

fn up_command(dir: &std::path::Path, api: u16) -> std::process::Command {
    up_with_nodes(dir, api, 3)
}

fn up_with_nodes(dir: &std::path::Path, api: u16, nodes: u32) -> std::process::Command {
    up_on_ports(dir, api, nodes, 0)
}

/// `custodia up` with its nodes on ports from `node_base` (0: any free).
fn up_on_ports(
    dir: &std::path::Path,
    api: u16,
    nodes: u32,
    node_base: u16,
) -> std::process::Command {
    let mut cmd = std::process::Command::new(custodia_tests::custodia_bin());
    cmd.args(["up", "--data-dir"])
        .arg(dir)
        .args([
            "--nodes",
            &nodes.to_string(),
            "--k",
            "2",
            "--m",
            "1",
            "--api",
        ])
        .arg(format!("127.0.0.1:{api}"))
        .args([
            "--s3",
            "off",
            "--metrics",
            "off",
            "--node-base-port",
            &node_base.to_string(),
            "--node-metrics-base-port",
            "0",
        ]);
    cmd
}

/// Starts `custodia up` and waits for it to say it is up.
fn start_up(dir: &std::path::Path, api: u16) -> Result<Up> {
    start_up_with(up_command(dir, api)).map(|(up, _)| up)
}

/// Starts `command` (a `custodia up`) and waits for it to say it is up;
/// returns it with what it printed.
fn start_up_with(mut command: std::process::Command) -> Result<(Up, Vec<String>)> {
    use std::io::BufRead;
    let mut child = command
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let out = child.stdout.take().context("stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut up = Up {
        child,
        nodes: Vec::new(),
    };
    let mut said = Vec::new();
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(90))
            .context("custodia up did not say it was up")?;
        if let Some(pid) = line.split("  pid ").nth(1) {
            let pid = pid.split_whitespace().next().unwrap_or_default();
            up.nodes.push(pid.parse()?);
        }
        if line.starts_with("Press Ctrl-C") {
            return Ok((up, said));
        }
        said.push(line);
    }
}

/// `custodia up` whose output nobody reads any more (`custodia up 2>&1 |
/// tee up.log`, with `tee` gone at Ctrl-C; a dead log shipper) runs and
/// stops as cleanly as one on a terminal: a failed write of a log line or a
/// message is dropped, not a panic that cuts off requests and kills the
/// nodes.
#[test]
fn custodia_up_stops_cleanly_with_its_output_closed() -> Result<()> {
    use std::io::BufRead;
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("data");
    let api = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut child = up_command(&dir, api)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    // Its log's reader is gone from the start.
    drop(child.stderr.take());
    let out = child.stdout.take().context("stdout")?;
    let mut up = Up {
        child,
        nodes: Vec::new(),
    };
    let mut lines = std::io::BufReader::new(out).lines();
    loop {
        let line = lines
            .next()
            .context("custodia up did not say it was up")??;
        if let Some(pid) = line.split("  pid ").nth(1) {
            up.nodes
                .push(pid.split_whitespace().next().unwrap_or_default().parse()?);
        }
        if line.starts_with("Press Ctrl-C") {
            break;
        }
    }
    // And now its output's.
    drop(lines);
    let token = std::fs::read_to_string(dir.join("admin.token"))?;
    let filed = ureq::post(format!("http://127.0.0.1:{api}/v1/evidence"))
        .header("authorization", format!("Bearer {}", token.trim()))
        .send(&b"logged to nowhere"[..])?;
    assert_eq!(filed.status().as_u16(), 201);
    stop_up(&mut up)
}

/// A second cluster started on node ports another one holds says why it
/// stopped, before it makes anything: the port is in use, and which option
/// to change. (What answered there was the other cluster's node, whose
/// certificate this cluster refuses: that alone would send an operator
/// looking at certificates; and a cluster made on a port in use keeps it.)
#[test]
fn custodia_up_on_ports_another_cluster_holds_says_so() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let free = |udp: bool| -> Result<u16> {
        Ok(if udp {
            std::net::UdpSocket::bind("127.0.0.1:0")?
                .local_addr()?
                .port()
        } else {
            std::net::TcpListener::bind("127.0.0.1:0")?
                .local_addr()?
                .port()
        })
    };
    // Three in a row, all free now.
    let base = (0..50)
        .map(|_| free(true))
        .find(|p| {
            p.as_ref().is_ok_and(|&p| {
                p < u16::MAX - 3
                    && (1..3).all(|i| std::net::UdpSocket::bind(("127.0.0.1", p + i)).is_ok())
            })
        })
        .context("no three free UDP ports in a row")??;
    let (mut first, _) = start_up_with(up_on_ports(&tmp.path().join("a"), free(false)?, 3, base))?;
    let second = output_within(
        &mut up_on_ports(&tmp.path().join("b"), free(false)?, 3, base),
        UP_REFUSES_WITHIN,
    )?;
    let said = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success(), "{said}");
    assert!(
        said.contains("node 0's QUIC")
            && said.contains("in use")
            && said.contains("--node-base-port"),
        "{said}"
    );
    assert!(!tmp.path().join("b").join("cluster.toml").exists());
    // The evidence API's port in use, the same.
    let held = std::net::TcpListener::bind("127.0.0.1:0")?;
    let api = held.local_addr()?.port();
    let third = output_within(
        &mut up_on_ports(&tmp.path().join("c"), api, 3, 0),
        UP_REFUSES_WITHIN,
    )?;
    let said = String::from_utf8_lossy(&third.stderr);
    assert!(
        !third.status.success() && said.contains("the evidence API") && said.contains("--api"),
        "{said}"
    );
    assert!(!tmp.path().join("c").join("cluster.toml").exists());
    stop_up(&mut first)
}

/// Stops a running `up` as Ctrl-C does, and waits for it and its nodes.
fn stop_up(up: &mut Up) -> Result<()> {
    std::process::Command::new("kill")
        .args(["-TERM", &up.child.id().to_string()])
        .status()?;
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(s) = up.child.try_wait()? {
            break s;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(30),
            "up did not stop"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    anyhow::ensure!(status.success(), "up exited {status}");
    anyhow::ensure!(
        eventually(10, || up.nodes.iter().all(|p| !alive(*p))),
        "a node outlived up"
    );
    Ok(())
}

/// A node that fails as it starts (its key unreadable here; a failing
/// disk as a rule) is said, and the cluster serves on the others, as it
/// does for a node that dies later; with too few left to file to, `up`
/// refuses, saying why each failed.
#[test]
fn custodia_up_serves_on_without_a_node_that_fails_to_start() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("data");
    let api = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let (mut first, _) = start_up_with(up_with_nodes(&dir, api, 4))?;
    stop_up(&mut first)?;
    let key = dir.join("tls").join("node-3.key");
    let kept = std::fs::read(&key)?;
    std::fs::write(&key, b"not a key")?;
    let (mut second, said) = start_up_with(up_with_nodes(&dir, api, 4))?;
    assert_eq!(second.nodes.len(), 3, "{said:?}");
    assert!(
        said.iter()
            .any(|l| l.starts_with("node 3 exited during start-up")),
        "{said:?}"
    );
    assert!(
        said.iter().any(|l| l.contains("3 storage nodes")),
        "{said:?}"
    );
    let token = std::fs::read_to_string(dir.join("admin.token"))?;
    let body = bytes(50_000, 44);
    let mut resp = ureq::post(format!("http://127.0.0.1:{api}/v1/evidence"))
        .header("authorization", format!("Bearer {}", token.trim()))
        .config()
        .http_status_as_error(false)
        .build()
        .send(&body[..])?;
    let text = resp.body_mut().read_to_string()?;
    assert_eq!(resp.status(), 201, "{text}");
    stop_up(&mut second)?;
    // Two of four failing leave too few for RS(2,1): refused, each said.
    let key2 = dir.join("tls").join("node-2.key");
    std::fs::write(&key2, b"not a key")?;
    let refused = output_within(&mut up_with_nodes(&dir, api, 4), UP_REFUSES_WITHIN)?;
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{err}");
    assert!(
        err.contains("node 2 exited during start-up")
            && err.contains("node 3 exited during start-up")
            && err.contains("2 of 4 nodes started: filing needs 3"),
        "{err}"
    );
    std::fs::write(&key, kept)?;
    Ok(())
}

/// A node taken out of the cluster (`custodia node remove`) stays out: the
/// next `up` says so and does not start it, and the cluster files and
/// serves on the others. And a cluster whose index is gone does not start
/// on an empty one.
#[test]
fn custodia_up_does_not_start_a_removed_node() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("data");
    let api = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let (mut first, _) = start_up_with(up_with_nodes(&dir, api, 4))?;
    assert_eq!(first.nodes.len(), 4, "four node pids printed");
    let remove = || {
        std::process::Command::new(custodia_tests::custodia_bin())
            .args(["node", "remove", "3", "--force", "--api"])
            .arg(format!("http://127.0.0.1:{api}"))
            .arg("--token-file")
            .arg(dir.join("admin.token"))
            .output()
    };
    // Forced out only once dead: a node that answers is drained instead.
    let alive = remove()?;
    let said = String::from_utf8_lossy(&alive.stderr);
    assert!(!alive.status.success(), "a live node was forced out");
    assert!(
        said.contains("a forced removal is for a dead node"),
        "{said}"
    );
    std::process::Command::new("kill")
        .args(["-KILL", &first.nodes[3].to_string()])
        .status()?;
    let mut said = String::new();
    // Silent for as long as a node takes to be called down (30 s).
    let removed = custodia_tests::eventually(60, || match remove() {
        Ok(out) => {
            said = String::from_utf8_lossy(&out.stderr).into_owned();
            out.status.success()
        }
        Err(_) => false,
    });
    assert!(removed, "the dead node could not be removed: {said}");
    stop_up(&mut first)?;

    let (mut second, said) = start_up_with(up_with_nodes(&dir, api, 4))?;
    assert_eq!(
        second.nodes.len(),
        3,
        "the removed node was started: {said:?}"
    );
    assert!(
        said.iter().any(|l| l.starts_with("node 3 was removed")),
        "up did not say why node 3 is not started: {said:?}"
    );
    assert!(
        said.iter().any(|l| l.contains("3 storage nodes")),
        "{said:?}"
    );
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(60)))
        .build()
        .into();
    let token = std::fs::read_to_string(dir.join("admin.token"))?;
    let body = bytes(100_000, 43);
    let mut resp = agent
        .post(format!("http://127.0.0.1:{api}/v1/evidence"))
        .header("authorization", format!("Bearer {}", token.trim()))
        .send(&body[..])?;
    let text = resp.body_mut().read_to_string()?;
    assert_eq!(resp.status(), 201, "{text}");
    let id = serde_json::from_str::<serde_json::Value>(&text)?["id"]
        .as_str()
        .context("id")?
        .to_owned();
    let back = agent
        .get(format!("http://127.0.0.1:{api}/v1/evidence/{id}"))
        .header("authorization", format!("Bearer {}", token.trim()))
        .call()?
        .body_mut()
        .read_to_vec()?;
    assert!(back == body, "read back differs");
    stop_up(&mut second)?;

    // An index gone missing is not made anew, empty (every shard would
    // look like an orphan): `up` refuses and says how to rebuild it.
    std::fs::rename(dir.join("index.redb"), dir.join("index.redb.moved"))?;
    let refused = output_within(&mut up_with_nodes(&dir, api, 4), UP_REFUSES_WITHIN)?;
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "up started without its index");
    assert!(err.contains("custodia recover-index"), "{err}");
    assert!(!dir.join("index.redb").exists(), "an empty index was made");
    Ok(())
}

fn alive(pid: i32) -> bool {
    // A zombie (exited, not yet reaped) is not alive.
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        !s.rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
    })
}

/// The README's first command, as a newcomer and an operator use it: `up`
/// serves; a second `up` on the same directory is refused without touching
/// the first; SIGTERM stops every process it started, and exits 0; a
/// killed `up` takes its nodes with it; a directory whose cluster file is
/// gone is not initialised over its evidence.
#[test]
fn custodia_up_serves_stops_and_guards_its_directory() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("data");
    let api = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(60)))
        .build()
        .into();
    // A first `up` that fails (too few nodes for RS(2,1)) leaves nothing
    // that the next would take for an earlier cluster.
    let failed = output_within(&mut up_with_nodes(&dir, api, 2), UP_REFUSES_WITHIN)?;
    let err = String::from_utf8_lossy(&failed.stderr);
    assert!(!failed.status.success() && err.contains("node"), "{err}");
    let first = start_up(&dir, api)?;
    assert_eq!(first.nodes.len(), 3, "three node pids printed");
    let token = std::fs::read_to_string(dir.join("admin.token"))?;
    let body = bytes(300_000, 41);
    let mut resp = agent
        .post(format!("http://127.0.0.1:{api}/v1/evidence"))
        .header("authorization", format!("Bearer {}", token.trim()))
        .send(&body[..])?;
    assert_eq!(resp.status().as_u16(), 201);
    let filed: serde_json::Value = serde_json::from_slice(&resp.body_mut().read_to_vec()?)?;
    let id = filed["id"].as_str().context("id")?.to_owned();

    // A second `up` on the same directory is refused at once.
    let second = output_within(&mut up_command(&dir, api), UP_REFUSES_WITHIN)?;
    assert!(!second.status.success());
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(err.contains("in use"), "{err}");
    let read = |agent: &ureq::Agent| -> Result<Vec<u8>> {
        let mut r = agent
            .get(format!("http://127.0.0.1:{api}/v1/evidence/{id}"))
            .header("authorization", format!("Bearer {}", token.trim()))
            .call()?;
        anyhow::ensure!(r.status().as_u16() == 200, "read answered {}", r.status());
        Ok(r.body_mut().read_to_vec()?)
    };
    assert!(read(&agent)? == body, "the first cluster still serves");
    // A node killed (RS(2,1) tolerates one): `up` serves on, and the
    // filing still reads back byte-exact.
    std::process::Command::new("kill")
        .args(["-KILL", &first.nodes[1].to_string()])
        .status()?;
    assert!(
        eventually(10, || !alive(first.nodes[1])),
        "the node survived SIGKILL"
    );
    let mut first = first;
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        first.child.try_wait()?.is_none(),
        "up stopped when a node died"
    );
    assert!(
        read(&agent)? == body,
        "a node down, the cluster still serves"
    );

    // SIGTERM: everything stops, and `up` says it stopped cleanly.
    stop_up(&mut first)?;

    // Again, with the killed node's directory gone (a wiped disk): the
    // evidence is back. Killed outright, `up` takes its nodes with it, and
    // the directory is free for the next one.
    let wiped: Vec<_> = std::fs::read_dir(dir.join("nodes"))?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()?;
    std::fs::remove_dir_all(&wiped[0])?;
    let mut again = start_up(&dir, api)?;
    assert!(
        wiped[0].join("node.log").exists(),
        "the wiped node did not start"
    );
    assert!(read(&agent)? == body, "the evidence is back");
    again.child.kill()?;
    again.child.wait()?;
    assert!(
        eventually(10, || again.nodes.iter().all(|p| !alive(*p))),
        "no node outlives a killed up"
    );
    // A cluster made before node certificates carried names of their own:
    // `up` reissues each (same key) and records the name, which the gateway
    // then requires; the cluster serves as before.
    let file = dir.join("cluster.toml");
    let mut cluster: toml::Value = toml::from_str(&std::fs::read_to_string(&file)?)?;
    let ca = storage_node::tls::ClusterCa::from_pem(
        &std::fs::read_to_string(dir.join("tls/ca.pem"))?,
        &std::fs::read_to_string(dir.join("tls/ca.key"))?,
    )?;
    for entry in cluster["gateway"]["nodes"]
        .as_array_mut()
        .context("nodes")?
    {
        entry.as_table_mut().context("node")?.remove("server_name");
    }
    let mut certs = Vec::new();
    for node in cluster["nodes"].as_array().context("nodes")? {
        let id = node["id"].as_integer().context("id")?;
        let cert = std::path::PathBuf::from(node["cert"].as_str().context("cert")?);
        let key = std::fs::read_to_string(node["key"].as_str().context("key")?)?;
        let old = ca.reissue(
            &format!("custodia node {id}"),
            &[storage_node::tls::NODE_SERVER_NAME.to_string()],
            &[],
            &key,
        )?;
        std::fs::write(&cert, old)?;
        certs.push((id, cert));
    }
    std::fs::write(&file, toml::to_string(&cluster)?)?;
    let names_in = |cert: &std::path::Path| -> Result<Vec<u8>> {
        use base64::Engine as _;
        let pem = std::fs::read_to_string(cert)?;
        let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        Ok(base64::engine::general_purpose::STANDARD.decode(b64)?)
    };
    let has = |der: &[u8], name: &str| der.windows(name.len()).any(|w| w == name.as_bytes());
    for (id, cert) in &certs {
        assert!(!has(
            &names_in(cert)?,
            &format!("node-{id}.custodia.internal")
        ));
    }
    let third = start_up(&dir, api)?;
    assert!(read(&agent)? == body);
    drop(third);
    let cluster: toml::Value = toml::from_str(&std::fs::read_to_string(&file)?)?;
    for (id, cert) in &certs {
        let name = format!("node-{id}.custodia.internal");
        assert!(
            has(&names_in(cert)?, &name),
            "node {id}'s certificate lacks {name}"
        );
        let entry = cluster["gateway"]["nodes"]
            .as_array()
            .and_then(|n| n.iter().find(|e| e["id"].as_integer() == Some(*id)))
            .context("entry")?;
        assert_eq!(entry["server_name"].as_str(), Some(name.as_str()));
    }

    // Without its cluster file, the directory is not initialised anew
    // (which would replace the ledger's and the CA's keys).
    std::fs::rename(dir.join("cluster.toml"), tmp.path().join("cluster.toml"))?;
    let vkey = std::fs::read(dir.join("ledger.vkey"))?;
    let refused = output_within(&mut up_command(&dir, api), UP_REFUSES_WITHIN)?;
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("holds an earlier cluster"), "{err}");
    assert_eq!(
        std::fs::read(dir.join("ledger.vkey"))?,
        vkey,
        "keys untouched"
    );
    Ok(())
}

/// A raw GET of evidence `id` whose client reads the first few KiB of its
/// answer and then nothing more, its connection left open.
fn stalled_get(c: &TestCluster, id: &str) -> Result<std::net::TcpStream> {
    let mut s = std::net::TcpStream::connect(c.api.trim_start_matches("http://"))?;
    write!(
        s,
        "GET /v1/evidence/{id} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\r\n",
        c.token
    )?;
    let mut head = [0u8; 4096];
    s.read_exact(&mut head)?;
    anyhow::ensure!(
        head.starts_with(b"HTTP/1.1 200"),
        "the read was not answered 200"
    );
    Ok(s)
}

/// A client that stops reading (its connection open) holds back no other
/// read: the stripes its read fetched ahead give their turn at the nodes
/// back as soon as they arrive, not when the client takes them.
#[test]
fn a_client_that_stops_reading_holds_back_no_other_read() -> Result<()> {
    let mut c = TestCluster::start(Shape {
        shard_size: 256 << 10,
        ..Shape::default()
    })?;
    // One stripe fetched at a time, gateway-wide: the tightest gate.
    c.set_gateway(&[("read_stripes_in_flight", toml::Value::Integer(1))])?;
    let big = bytes(48 << 20, 61);
    let big_id = c.file(&big)?["id"].as_str().context("id")?.to_owned();
    let small = bytes(300_000, 62);
    let small_id = c.file(&small)?["id"].as_str().context("id")?.to_owned();
    let stalled = [stalled_get(&c, &big_id)?, stalled_get(&c, &big_id)?];
    // Long enough for their buffers to fill and their reads to stall.
    std::thread::sleep(Duration::from_secs(3));
    let started = std::time::Instant::now();
    assert!(c.read(&small_id)? == small, "the other read is byte-exact");
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(10),
        "a read behind two stalled clients took {took:?}"
    );
    drop(stalled);
    Ok(())
}

/// Reads share a bounded memory for what they read ahead: with the budget
/// at its floor (one read's pipeline), a stalled client's read-ahead holds
/// it, and another read waits (counted) instead of taking more; the
/// stalled client gone, its memory goes back and the other read completes
/// byte-exact.
#[test]
fn reads_wait_for_memory_a_stalled_client_holds_and_get_it_back() -> Result<()> {
    let mut c = TestCluster::start(Shape {
        shard_size: 256 << 10,
        ..Shape::default()
    })?;
    c.set_gateway(&[("read_memory_mib", toml::Value::Integer(1))])?;
    let big = bytes(48 << 20, 71);
    let big_id = c.file_id(&big)?;
    let small = bytes(300_000, 72);
    let small_id = c.file_id(&small)?;
    let waits = |c: &TestCluster| c.metric(&c.metrics, "custodia_read_memory_waits_total");
    let before = waits(&c)?;
    let stalled = stalled_get(&c, &big_id)?;
    // Long enough for its buffers to fill and its read-ahead to stall.
    std::thread::sleep(Duration::from_secs(3));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::scope(|s| -> Result<()> {
        s.spawn(|| tx.send(c.read(&small_id).map(|got| got == small)));
        assert!(
            eventually(10, || waits(&c).is_ok_and(|w| w > before)),
            "the other read never waited for memory"
        );
        assert!(
            rx.recv_timeout(Duration::from_secs(2)).is_err(),
            "the other read went past the budget"
        );
        drop(stalled);
        let done = rx.recv_timeout(Duration::from_secs(30))?;
        assert!(done?, "the other read is byte-exact");
        Ok(())
    })
}

/// `custodia get` interrupted mid-download (Ctrl-C) leaves nothing behind:
/// neither the file nor a hidden partial copy of unchecked bytes. The
/// "gateway" here is a stand-in that sends half the evidence and stalls.
/// And the CLI sends no bearer token in clear to another machine.
#[test]
fn an_interrupted_get_leaves_nothing_and_tokens_stay_off_clear_text() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let token = dir.path().join("token");
    std::fs::write(&token, "t0ken")?;
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let server = std::thread::spawn(move || -> Result<()> {
        let (mut s, _) = listener.accept()?;
        let mut head = [0u8; 4096];
        let _ = s.read(&mut head)?;
        write!(
            s,
            "HTTP/1.1 200 OK\r\ncontent-length: 2000000\r\nx-custodia-blake3: {}\r\n\r\n",
            blake3_hex(b"whatever")
        )?;
        s.write_all(&[7u8; 1_000_000])?;
        s.flush()?;
        // Stalls until the client goes.
        let _ = s.read(&mut head);
        Ok(())
    });
    let out = dir.path().join("exhibit.bin");
    let mut child = std::process::Command::new(custodia_tests::custodia_bin())
        .args(["get", "01a2460e-bfe0-7549-9148-b16e65350dcb", "-o"])
        .arg(&out)
        .arg("--api")
        .arg(format!("http://{addr}"))
        .arg("--token-file")
        .arg(&token)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let partial = || {
        std::fs::read_dir(dir.path())
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter(|e| {
                        e.file_name()
                            .to_string_lossy()
                            .starts_with(".custodia-partial-")
                    })
                    .map(|e| e.path())
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default()
    };
    let started = eventually(10, || {
        partial()
            .first()
            .is_some_and(|p| std::fs::metadata(p).is_ok_and(|m| m.len() > 0))
    });
    assert!(started, "the download never began");
    let pid = child.id().to_string();
    std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()?;
    let status = child.wait()?;
    let mut err = String::new();
    child
        .stderr
        .take()
        .context("stderr")?
        .read_to_string(&mut err)?;
    assert_eq!(status.code(), Some(130), "{err}");
    assert!(err.contains("nothing written"), "{err}");
    assert!(partial().is_empty(), "a partial copy was left behind");
    assert!(!out.exists());
    let _ = server.join();

    // A token is not sent in clear to another machine; on this one it is.
    let refused = std::process::Command::new(custodia_tests::custodia_bin())
        .args(["status", "--api", "http://192.0.2.1:8080", "--token-file"])
        .arg(&token)
        .output()?;
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && said.contains("in clear"),
        "{said}"
    );
    Ok(())
}

/// A mistyped data directory is said so, and nothing is created there; an
/// error's cause is said once.
#[test]
fn cli_errors_name_the_problem_once_and_create_nothing() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let missing = dir.path().join("no-such-cluster");
    for cmd in ["recover-index", "gateway"] {
        let out = std::process::Command::new(custodia_tests::custodia_bin())
            .args([cmd, "--data-dir"])
            .arg(&missing)
            .output()?;
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("no cluster in"),
            "{cmd}: {err}"
        );
        assert!(!missing.exists(), "{cmd} created {}", missing.display());
    }
    let out = std::process::Command::new(custodia_tests::custodia_bin())
        .args(["init", "--k", "0", "--data-dir"])
        .arg(dir.path().join("bad-shape"))
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert_eq!(err.matches("k must be at least 1").count(), 1, "{err}");
    Ok(())
}

/// Options no cluster could run with are refused before anything is
/// written: into a `tls/` the operator provided, a refused init leaves no
/// key that a later init would take for an earlier cluster's. A log origin
/// no checkpoint could be signed under, and two listeners on one port,
/// are among them.
#[test]
fn an_init_refused_for_its_options_writes_nothing() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("data");
    std::fs::create_dir_all(dir.join("tls"))?;
    std::fs::write(dir.join("tls").join("operator-note.txt"), b"kept\n")?;
    let custodia = |args: &[&str]| custodia_tests::custodia_at(&dir, args);
    // Its locks aside, which any command on a data dir takes.
    let listed = || -> Result<Vec<String>> {
        let mut names: Vec<String> = walkdir(&dir)?;
        names.retain(|n| !n.ends_with(".lock"));
        names.sort();
        Ok(names)
    };
    let before = listed()?;
    for (args, said) in [
        (&["init", "--nodes", "2"][..], "at least k + m"),
        (
            &["init", "--log-origin", "Springfield County Court"][..],
            "not one word",
        ),
        (&["init", "--log-origin", "a+b"][..], "not one word"),
        (&["init", "--min-write-shards", "4"][..], "min_write_shards"),
        (
            &[
                "init",
                "--api",
                "127.0.0.1:47312",
                "--metrics",
                "0.0.0.0:47312",
            ][..],
            "--api and --metrics would both listen",
        ),
        (
            &["up", "--api", "127.0.0.1:47311", "--s3", "127.0.0.1:47311"][..],
            "would both listen on 127.0.0.1:47311",
        ),
    ] {
        let out = custodia(args)?;
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(said),
            "{args:?}: {err}"
        );
        assert_eq!(listed()?, before, "{args:?} wrote into the data dir");
    }
    let out = custodia(&["init"])?;
    assert!(
        out.status.success(),
        "a valid init after refused ones: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read(dir.join("tls").join("operator-note.txt"))?,
        b"kept\n"
    );
    Ok(())
}

/// A failure domain set on a node's own `[[nodes]]` entry (beside its
/// other settings) but not on the `[[gateway.nodes]]` entry placement
/// reads is refused, naming where to set it: unused, it would have let
/// stripes crowd into one rack with no word said.
#[test]
fn a_failure_domain_placement_would_not_read_is_refused() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("data");
    let custodia = |args: &[&str]| custodia_tests::custodia_at(&dir, args);
    assert!(custodia(&["init"])?.status.success());
    let file = dir.join("cluster.toml");
    let text = std::fs::read_to_string(&file)?;
    let own = "[[nodes]]\nid = 0\n";
    assert_eq!(text.matches(own).count(), 1, "{text}");
    std::fs::write(
        &file,
        text.replace(own, &format!("{own}failure_domain = \"rack-a\"\n")),
    )?;
    let out = custodia(&["node", "add"])?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("set it there") && err.contains("rack-a"),
        "{err}"
    );
    // Set on both, it is the node's domain.
    let text = std::fs::read_to_string(&file)?;
    let dialled = "[[gateway.nodes]]\nid = 0\n";
    assert_eq!(text.matches(dialled).count(), 1, "{text}");
    std::fs::write(
        &file,
        text.replace(dialled, &format!("{dialled}failure_domain = \"rack-a\"\n")),
    )?;
    let out = custodia(&["node", "add"])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// A data dir copied elsewhere (to a new disk, or a backup restored to look
/// into it) does not serve the original's files, which its cluster file
/// names by absolute paths: refused, naming the cluster they belong to.
#[test]
fn a_copied_data_dir_does_not_serve_the_originals_files() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("data");
    let copy = tmp.path().join("copy");
    let custodia = custodia_tests::custodia_at;
    assert!(custodia(&dir, &["init"])?.status.success());
    let copied = std::process::Command::new("cp")
        .arg("-a")
        .arg(&dir)
        .arg(&copy)
        .status()?;
    assert!(copied.success());
    let out = custodia(&copy, &["node", "add"])?;
    let err = String::from_utf8_lossy(&out.stderr);
    let original = dir.canonicalize()?.display().to_string();
    assert!(
        !out.status.success()
            && err.contains("copied or moved")
            && err.contains(&format!("in the cluster at {original}")),
        "{err}"
    );
    // Nothing was added to either.
    let nodes = |d: &std::path::Path| -> Result<usize> {
        Ok(std::fs::read_to_string(d.join("cluster.toml"))?
            .matches("[[nodes]]")
            .count())
    };
    assert_eq!((nodes(&dir)?, nodes(&copy)?), (8, 8));
    // Nor does a node started from the copy's cluster file serve (and
    // scrub, and change) the original's folder: it exits at once.
    // (How it exits within `secs`, if it does, and what it said.)
    let node = |dir: &std::path::Path, file: &std::path::Path, secs: u64| -> Result<_> {
        let mut node = std::process::Command::new(custodia_tests::custodia_bin())
            .args(["node", "--id", "0", "--cluster"])
            .arg(file)
            .current_dir(dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()?;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
        let status = loop {
            if let Some(s) = node.try_wait()? {
                break Some(s);
            }
            if std::time::Instant::now() > deadline {
                node.kill()?;
                node.wait()?;
                break None;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        };
        let mut err = String::new();
        std::io::Read::read_to_string(&mut node.stderr.take().context("stderr")?, &mut err)?;
        Ok((status, err))
    };
    let (status, err) = node(&copy, &copy.join("cluster.toml"), 20)?;
    assert!(
        status.is_some_and(|s| !s.success()) && err.contains("copied or moved"),
        "{status:?} {err}"
    );
    // The original's own file, named as an operator may (bare, from its
    // folder; or through a link elsewhere), is not taken for a copy.
    let link = tmp.path().join("elsewhere");
    std::fs::create_dir_all(&link)?;
    std::os::unix::fs::symlink(dir.join("cluster.toml"), link.join("cluster.toml"))?;
    for (at, file) in [
        (&dir, std::path::PathBuf::from("cluster.toml")),
        (&link, link.join("cluster.toml")),
    ] {
        let (status, err) = node(at, &file, 3)?;
        assert!(
            !err.contains("copied or moved"),
            "{file:?}: {status:?} {err}"
        );
    }
    // The original is its own.
    assert!(custodia(&dir, &["node", "add"])?.status.success());
    Ok(())
}

/// Every path under `dir`, relative to it.
fn walkdir(dir: &std::path::Path) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d)? {
            let path = e?.path();
            out.push(path.strip_prefix(dir)?.display().to_string());
            if path.is_dir() {
                todo.push(path);
            }
        }
    }
    Ok(out)
}

/// An init cut short (killed before it saved its cluster file, the last
/// thing it writes) is not taken for an earlier cluster: the next init
/// starts it again. One that finished leaves no mark of being under way.
#[test]
fn an_init_cut_short_is_started_again() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("data");
    let init = || {
        std::process::Command::new(custodia_tests::custodia_bin())
            .args(["init", "--data-dir"])
            .arg(&dir)
            .output()
    };
    let out = init()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let marker = dir.join(".init-in-progress");
    assert!(!marker.exists(), "a finished init left its marker");
    // As if killed while saving its file (its durable write's temporary
    // file left behind).
    let vkey = std::fs::read(dir.join("ledger.vkey"))?;
    std::fs::remove_file(dir.join("cluster.toml"))?;
    std::fs::write(&marker, b"\n")?;
    let leftover = dir.join(".cluster.toml.0190aa.tmp");
    std::fs::write(&leftover, b"[gateway")?;
    let out = init()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && err.contains("cut short"), "{err}");
    assert!(dir.join("cluster.toml").exists() && !marker.exists() && !leftover.exists());
    assert_ne!(
        std::fs::read(dir.join("ledger.vkey"))?,
        vkey,
        "a new cluster"
    );
    Ok(())
}

/// An index a newer version of Custodia marked is refused by this one,
/// by the gateway and by every CLI command that opens it offline, with a
/// message that says to run the newer version; nothing in it changes.
#[test]
fn an_index_of_a_newer_version_is_refused_everywhere() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("data");
    let custodia = || std::process::Command::new(custodia_tests::custodia_bin());
    let out = custodia().args(["init", "--data-dir"]).arg(&dir).output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let index = dir.join("index.redb");
    let newer = indexer::schema::INDEX_FORMAT + 1;
    let rt = tokio::runtime::Builder::new_current_thread().build()?;
    {
        let store = indexer::EmbeddedStore::open(&index)?;
        rt.block_on(indexer::run(&store, |tx| async move {
            use indexer::kv::Transaction;
            tx.set(b"F", &newer.to_be_bytes());
            Ok::<_, indexer::KvError>(())
        }))?;
    }
    let refused = |args: &[&str]| -> Result<()> {
        // One that took the index would go on serving: it is stopped.
        let out = output_within(
            custodia().args(args).arg("--data-dir").arg(&dir),
            Duration::from_secs(60),
        )?;
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(&format!("index format {newer}")),
            "{args:?} took a newer index: {err}"
        );
        Ok(())
    };
    refused(&["tenant", "create", "newcomer"])?;
    refused(&["key", "create", "--tenant", "admin", "--role", "reader"])?;
    refused(&["release-unclaimed", "--list"])?;
    refused(&["gateway"])?;
    let store = indexer::EmbeddedStore::open(&index)?;
    let (format, tenant) = rt.block_on(indexer::run(&store, |tx| async move {
        let format = indexer::schema::index_format_tx(&tx).await?;
        let tenant = indexer::s3::tenant_exists_tx(&tx, "newcomer").await?;
        Ok::<_, indexer::s3::ObjectError>((format, tenant))
    }))?;
    assert_eq!(format, newer, "the newer version's mark stays");
    assert!(!tenant, "a tenant was created in a newer index");
    Ok(())
}

/// A node's certificate carries a name of its own, which the gateway
/// requires: node 0 started with node 1's certificate and key (a key
/// stolen from one node) is not taken for node 0, and gets no shards.
#[test]
fn one_nodes_key_does_not_pass_for_another_node() -> Result<()> {
    let mut c = TestCluster::start(Shape::default())?;
    let file = c.data_dir().join("cluster.toml");
    let cluster: toml::Value = toml::from_str(&std::fs::read_to_string(&file)?)?;
    let tls_of = |i: usize, what: &str| -> Result<toml::Value> {
        Ok(cluster["nodes"][i][what].as_str().context("path")?.into())
    };
    let (own_cert, own_key) = (tls_of(0, "cert")?, tls_of(0, "key")?);
    c.set_node(
        0,
        &[("cert", tls_of(1, "cert")?), ("key", tls_of(1, "key")?)],
    )?;
    // Serving, and refused: node 0 stays out however long it runs.
    assert!(
        eventually(30, || c.healthy_nodes() == Some(7)),
        "the gateway took node 1's certificate for node 0"
    );
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(c.healthy_nodes(), Some(7), "node 0 came in on node 1's key");
    let data = bytes(100_000, 9);
    let id = c.file_id(&data)?;
    assert!(c.shard_files(0).is_empty(), "node 0 was given shards");
    assert!(c.read(&id)? == data);
    let log = std::fs::read_to_string(c.data_dir().join("gateway.log"))?;
    assert!(
        log.lines()
            .any(|l| l.contains("node probe failed") && l.contains("not valid for name")),
        "the gateway does not say why it refuses node 0: {}",
        log.lines().rev().take(30).collect::<Vec<_>>().join("\n")
    );
    // Its own certificate back: in again.
    c.set_node(0, &[("cert", own_cert), ("key", own_key)])?;
    assert!(
        eventually(15, || c.healthy_nodes() == Some(8)),
        "node 0 with its own certificate is not taken back"
    );
    Ok(())
}

/// An aborted upload's shards on a node known to be down are not asked for
/// one stripe at a time (each ask waiting out the connect timeout): those
/// on live nodes go at once, and the down node's once it is back. While it
/// stays down, GC asks again after a doubling wait, not every pass (each
/// try sends a delete for every shard still recorded).
#[test]
fn an_aborted_uploads_shards_go_at_once_while_a_node_is_down() -> Result<()> {
    let mut c = TestCluster::start(Shape::default())?;
    c.set_gateway(&[
        ("node_probe_interval_ms", toml::Value::Integer(300)),
        ("node_down_after_ms", toml::Value::Integer(1_000)),
        ("gc_interval_ms", toml::Value::Integer(500)),
    ])?;
    let data = bytes(80 * STRIPE, 12);
    let s = c.half_upload(&data, 40.0 * 6.0 - 6.0)?;
    assert!(
        !c.shard_files(3).is_empty(),
        "node 3 holds none of the upload"
    );
    c.kill_node(3);
    // Within a few probes (each waits at most 3 s for a node); a CI
    // machine running other clusters beside this one may take longer.
    let seen = eventually(30, || c.healthy_nodes() == Some(7));
    assert!(seen, "the gateway did not see node 3 go");
    drop(s);
    let live = |c: &TestCluster| {
        (0..8)
            .filter(|&i| i != 3)
            .all(|i| c.shard_files(i).is_empty())
    };
    assert!(
        eventually(5, || live(&c)),
        "the live nodes' shards were not deleted at once: {:?}",
        c.all_shard_files()
    );
    let tries = || -> Result<usize> {
        Ok(std::fs::read_to_string(c.data_dir().join("gateway.log"))?
            .matches("collecting an aborted upload")
            .count())
    };
    let before = tries()?;
    std::thread::sleep(Duration::from_secs(4));
    let during = tries()? - before;
    // Passes every 500 ms: 8 in 4 s; tries after 0.5, 1, 2 s waits: 4
    // (and one more each time the nodes answering change: a live node
    // slow to a probe on a loaded machine, counted once).
    assert!(
        during <= 6,
        "{during} tries in 4 s with the node still down"
    );
    c.start_node_and_wait(3)?;
    assert!(
        eventually(20, || c.shard_files(3).is_empty()),
        "node 3's shards of the aborted upload were not deleted once it was back"
    );
    Ok(())
}

/// The head of an HTTP request read off `s` (up to its blank line), and
/// the value of its `name` header.
fn request_head(s: &mut std::net::TcpStream, name: &str) -> Result<(Vec<u8>, Option<String>)> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        anyhow::ensure!(s.read(&mut byte)? == 1, "the request ended in its head");
        head.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    let value = text.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
    });
    Ok((head, value))
}

/// Reads a filing request whole, as a gateway would before answering:
/// its head (answering `100 Continue`) and its Content-Length of body.
/// Returns its Idempotency-Key.
fn read_filing(s: &mut std::net::TcpStream) -> Result<Option<String>> {
    let (head, key) = request_head(s, "idempotency-key")?;
    let len: usize = String::from_utf8_lossy(&head)
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().to_owned())
        })
        .context("no content-length")?
        .parse()?;
    s.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
    let mut body = vec![0u8; len];
    s.read_exact(&mut body)?;
    Ok(key)
}

/// What `custodia put` and `get` cannot vouch for is refused, against a
/// stand-in gateway: a file that grew while it was filed (a recording
/// still being written: the filing holds it cut short; exit 3), a file
/// that is not the acquisition's (`--sha256`), a media type with a control
/// character, a pipe, a download whose bytes are not the BLAKE3 the answer
/// names, one that goes silent halfway (given up after
/// `--idle-timeout-secs`, nothing left), and an output path that is a
/// directory (refused before any read is asked for, and so recorded). The
/// key a put files under is said before it sends.
#[test]
fn the_client_refuses_what_it_cannot_vouch_for() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let token = dir.path().join("token");
    std::fs::write(&token, "not-a-real-token\n")?;
    let custodia = |args: &[&str], api: &str| {
        output_within(
            std::process::Command::new(custodia_tests::custodia_bin())
                .args(args)
                .args(["--api", api, "--token-file"])
                .arg(&token),
            Duration::from_secs(60),
        )
    };
    let partials = |d: &std::path::Path| -> Result<Vec<String>> {
        Ok(std::fs::read_dir(d)?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".custodia-partial-"))
            .collect())
    };

    // A file appended to while it is sent.
    let growing = dir.path().join("recording.mp4");
    let first = bytes(300_000, 5);
    std::fs::write(&growing, &first)?;
    let front = std::net::TcpListener::bind("127.0.0.1:0")?;
    let api = format!("http://{}", front.local_addr()?);
    let (heard, head_read) = std::sync::mpsc::channel();
    let (go_on, appended) = std::sync::mpsc::channel::<()>();
    let answer = serde_json::json!({
        "id": "0193a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b",
        "blake3": blake3_hex(&first),
        "size": first.len(),
        "receipt": null,
        "receipt_url": "/v1/evidence/0193a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b/receipt",
    })
    .to_string();
    let server = std::thread::spawn(move || -> Result<Option<String>> {
        let (mut s, _) = front.accept()?;
        let (_, key) = request_head(&mut s, "idempotency-key")?;
        let _ = heard.send(());
        let _ = appended.recv_timeout(Duration::from_secs(30));
        s.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
        let mut body = vec![0u8; 300_000];
        s.read_exact(&mut body)?;
        s.write_all(
            format!(
                "HTTP/1.1 201 Created\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{answer}",
                answer.len()
            )
            .as_bytes(),
        )?;
        Ok(key)
    });
    let appender = {
        let growing = growing.clone();
        std::thread::spawn(move || -> Result<()> {
            head_read.recv_timeout(Duration::from_secs(30))?;
            // A later modification time than the first write's, on any
            // file system's clock granularity.
            std::thread::sleep(Duration::from_millis(20));
            let mut f = std::fs::OpenOptions::new().append(true).open(&growing)?;
            f.write_all(&bytes(50_000, 6))?;
            let _ = go_on.send(());
            Ok(())
        })
    };
    let put = custodia(&["put", growing.to_str().unwrap_or_default()], &api)?;
    appender
        .join()
        .map_err(|_| anyhow::anyhow!("the appender panicked"))??;
    let key = server
        .join()
        .map_err(|_| anyhow::anyhow!("the stand-in panicked"))??
        .context("no idempotency key")?;
    let said = String::from_utf8_lossy(&put.stderr);
    assert!(
        put.status.code() == Some(3) && said.contains("changed while it was filed"),
        "filed, but not the file as it is: exit 3 ({:?}): {said}",
        put.status.code()
    );
    assert!(
        String::from_utf8_lossy(&put.stdout).contains(&blake3_hex(&first)),
        "the filing is printed"
    );
    assert!(
        said.contains(&format!("Idempotency-Key {key}")),
        "the key is said: {said}"
    );

    // Not the acquisition's bytes, and not a regular file: refused before
    // anything is sent (no stand-in listens: a request would fail
    // otherwise).
    let nobody = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        format!("http://{}", l.local_addr()?)
    };
    let wrong = "ab".repeat(32);
    let out = custodia(
        &[
            "put",
            growing.to_str().unwrap_or_default(),
            "--sha256",
            &wrong,
        ],
        &nobody,
    )?;
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && said.contains("is not the file acquired"),
        "{said}"
    );
    let out = custodia(
        &[
            "put",
            growing.to_str().unwrap_or_default(),
            "--media-type",
            "video/mp4\r",
        ],
        &nobody,
    )?;
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.code() == Some(1) && said.contains("--media-type takes"),
        "{said}"
    );
    let fifo = dir.path().join("pipe");
    anyhow::ensure!(
        std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()?
            .success(),
        "mkfifo"
    );
    let out = custodia(&["put", fifo.to_str().unwrap_or_default()], &nobody)?;
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && said.contains("not a regular file"),
        "{said}"
    );

    // A download whose bytes are not the BLAKE3 its answer names.
    let front = std::net::TcpListener::bind("127.0.0.1:0")?;
    let api = format!("http://{}", front.local_addr()?);
    let claimed = blake3_hex(b"other bytes");
    let server = std::thread::spawn(move || -> Result<()> {
        let (mut s, _) = front.accept()?;
        request_head(&mut s, "authorization")?;
        s.write_all(
            format!("HTTP/1.1 200 OK\r\ncontent-length: 5\r\nx-custodia-blake3: {claimed}\r\nconnection: close\r\n\r\nhello")
                .as_bytes(),
        )?;
        Ok(())
    });
    let out_dir = dir.path().join("exhibits");
    std::fs::create_dir(&out_dir)?;
    let target = out_dir.join("exhibit.bin");
    let id = "0193a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b";
    let out = custodia(
        &["get", id, "-o", target.to_str().unwrap_or_default()],
        &api,
    )?;
    server
        .join()
        .map_err(|_| anyhow::anyhow!("the stand-in panicked"))??;
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && said.contains("nothing written"),
        "{said}"
    );
    assert!(!target.exists(), "unverified bytes written");
    assert!(partials(&out_dir)?.is_empty(), "a partial copy stayed");

    // A download that goes silent halfway (the connection dead, never
    // closed) is given up after --idle-timeout-secs, leaving nothing.
    let front = std::net::TcpListener::bind("127.0.0.1:0")?;
    let api = format!("http://{}", front.local_addr()?);
    let (done, finished) = std::sync::mpsc::channel::<()>();
    let server = std::thread::spawn(move || -> Result<()> {
        let (mut s, _) = front.accept()?;
        request_head(&mut s, "authorization")?;
        let claimed = blake3_hex(&[7u8; 1000]);
        s.write_all(
            format!(
                "HTTP/1.1 200 OK\r\ncontent-length: 1000\r\nx-custodia-blake3: {claimed}\r\n\r\n"
            )
            .as_bytes(),
        )?;
        s.write_all(&[7u8; 500])?;
        // Silent, the connection open, until the client is done.
        let _ = finished.recv_timeout(Duration::from_secs(60));
        Ok(())
    });
    let started = std::time::Instant::now();
    let out = custodia(
        &[
            "get",
            id,
            "-o",
            target.to_str().unwrap_or_default(),
            "--idle-timeout-secs",
            "2",
        ],
        &api,
    )?;
    let _ = done.send(());
    server
        .join()
        .map_err(|_| anyhow::anyhow!("the stand-in panicked"))??;
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.code() == Some(1) && said.contains("500 bytes received"),
        "{said}"
    );
    assert!(started.elapsed() < Duration::from_secs(30), "it hung");
    assert!(!target.exists(), "a partial download was written");
    assert!(partials(&out_dir)?.is_empty(), "a partial copy stayed");

    // A directory as the output, --force or not: refused before a request.
    let front = std::net::TcpListener::bind("127.0.0.1:0")?;
    front.set_nonblocking(true)?;
    let api = format!("http://{}", front.local_addr()?);
    for force in [false, true] {
        let mut args = vec!["get", id, "-o", out_dir.to_str().unwrap_or_default()];
        if force {
            args.push("--force");
        }
        let out = custodia(&args, &api)?;
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && said.contains("is a directory"),
            "--force {force}: {said}"
        );
    }
    assert!(
        matches!(front.accept(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "a read was asked for"
    );
    assert!(partials(&out_dir)?.is_empty(), "a partial copy stayed");
    Ok(())
}

/// `custodia put` sends the evidence again when the answer is lost on the
/// way (the connection dropped, as at a gateway restart), under one
/// Idempotency-Key (a random one when none is given): the evidence is
/// filed once, and the put succeeds.
#[test]
fn custodia_put_retries_a_lost_answer_without_filing_twice() -> Result<()> {
    let c = TestCluster::start(Shape::default())?;
    let data = bytes(40_000, 88);
    let file = c.data_dir().join("retried.bin");
    std::fs::write(&file, &data)?;
    let front = std::net::TcpListener::bind("127.0.0.1:0")?;
    let front_api = format!("http://{}", front.local_addr()?);
    let gateway = c.api.trim_start_matches("http://").to_owned();
    let relay = std::thread::spawn(move || -> Result<Vec<Option<String>>> {
        let mut keys = Vec::new();
        // The first attempt: read whole, and never answered.
        let (mut s, _) = front.accept()?;
        keys.push(read_filing(&mut s)?);
        drop(s);
        // The second: passed on to the gateway.
        let (mut s, _) = front.accept()?;
        let (head, key) = request_head(&mut s, "idempotency-key")?;
        keys.push(key);
        let mut g = std::net::TcpStream::connect(&gateway)?;
        g.write_all(&head)?;
        let (mut from_client, mut to_gateway) = (s.try_clone()?, g.try_clone()?);
        let up = std::thread::spawn(move || {
            let _ = std::io::copy(&mut from_client, &mut to_gateway);
            let _ = to_gateway.shutdown(std::net::Shutdown::Write);
        });
        let _ = std::io::copy(&mut g, &mut s);
        let _ = s.shutdown(std::net::Shutdown::Both);
        let _ = up.join();
        Ok(keys)
    });
    let out = output_within(
        std::process::Command::new(custodia_tests::custodia_bin())
            .arg("put")
            .arg(&file)
            .args(["--api", &front_api, "--token-file"])
            .arg(c.data_dir().join("admin.token")),
        Duration::from_secs(60),
    )?;
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{said}");
    assert!(said.contains("trying again"), "{said}");
    let filed: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let keys = relay
        .join()
        .map_err(|_| anyhow::anyhow!("the relay panicked"))??;
    assert_eq!(keys.len(), 2);
    assert!(keys[0].is_some() && keys[0] == keys[1], "{keys:?}");
    let found = c.get_with(
        &c.token,
        &format!("/v1/evidence/by-hash/{}", blake3_hex(&data)),
        &[],
    )?;
    let filings = found.json()["filings"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(filings.len(), 1, "{filings:?}");
    assert_eq!(filings[0]["id"], filed["id"]);
    Ok(())
}

/// A command's output piped into a reader that stopped reading (`| head`)
/// ends it as a Unix tool ends, by SIGPIPE, with no panic or backtrace on
/// stderr (Rust ignores SIGPIPE, so `println!` panicked with exit code 101).
#[test]
fn output_into_a_closed_pipe_ends_the_command_quietly() -> Result<()> {
    use std::os::unix::process::ExitStatusExt;
    let (reader, writer) = std::io::pipe()?;
    drop(reader);
    let out = std::process::Command::new(custodia_tests::custodia_bin())
        .args(["sim", "placement", "--nodes", "100", "--domains", "10"])
        .args(["--stripes", "1000", "--dead-node-stripes", "100"])
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    // 13: SIGPIPE, on Linux.
    assert_eq!(out.status.signal(), Some(13), "{:?}: {stderr}", out.status);
    assert!(!stderr.contains("panicked"), "{stderr}");
    Ok(())
}

/// The Idempotency-Keys a stand-in gateway got, once it has answered.
type KeysSeen = std::thread::JoinHandle<Result<Vec<Option<String>>>>;

/// A stand-in gateway that answers each filing, read whole, with the next
/// of `answers` (status, JSON body); returns its URL and the Idempotency-Key
/// of each request it got.
fn answering_gateway(answers: Vec<(u16, &'static str)>) -> Result<(String, KeysSeen)> {
    let front = std::net::TcpListener::bind("127.0.0.1:0")?;
    let url = format!("http://{}", front.local_addr()?);
    // A put that stops early (a regression) must fail the test, not leave
    // this waiting for a request that never comes.
    front.set_nonblocking(true)?;
    let served = std::thread::spawn(move || -> Result<Vec<Option<String>>> {
        let mut keys = Vec::new();
        for (status, body) in answers {
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            let mut s = loop {
                match front.accept() {
                    Ok((s, _)) => break s,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if std::time::Instant::now() > deadline {
                            anyhow::bail!("only {} requests came", keys.len());
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(e) => return Err(e.into()),
                }
            };
            s.set_nonblocking(false)?;
            keys.push(read_filing(&mut s)?);
            write!(
                s,
                "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\nretry-after: 0\r\n\
                 content-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            )?;
        }
        Ok(keys)
    });
    Ok((url, served))
}

/// `custodia put` that gives up on a gateway failing each time says the
/// key to try again under; a 409 other than `upload_in_progress` (the key
/// used for another filing) is not tried again.
#[test]
fn custodia_put_gives_up_with_its_key_and_retries_only_what_may_pass() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("e.bin");
    std::fs::write(&file, bytes(1_000, 3))?;
    let token = dir.path().join("token");
    std::fs::write(&token, "t")?;
    let put = |url: &str| {
        output_within(
            std::process::Command::new(custodia_tests::custodia_bin())
                .arg("put")
                .arg(&file)
                .args(["--api", url, "--token-file"])
                .arg(&token),
            Duration::from_secs(60),
        )
    };
    let busy = r#"{"error":"index_unavailable","message":"the index is unavailable"}"#;
    let (url, served) = answering_gateway(vec![(503, busy); 3])?;
    let out = put(&url)?;
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    let keys = served.join().map_err(|_| anyhow::anyhow!("panicked"))??;
    assert_eq!(out.status.code(), Some(1), "{said}");
    let key = keys[0].clone().context("a key")?;
    assert!(
        keys.iter().all(|k| k.as_deref() == Some(key.as_str())),
        "{keys:?}"
    );
    let last = said.lines().last().unwrap_or_default();
    assert!(
        last.contains(&format!("--idempotency-key {key}")) && last.contains("503"),
        "{said}"
    );
    // An earlier attempt still in progress (after a gateway restart, for
    // minutes) is waited on, not counted among the attempts.
    let in_progress =
        r#"{"error":"upload_in_progress","message":"an upload under this key is in progress"}"#;
    let mut answers = vec![(409, in_progress); 4];
    answers.extend([(503, busy); 3]);
    let (url, served) = answering_gateway(answers)?;
    let out = put(&url)?;
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    let keys = served.join().map_err(|_| anyhow::anyhow!("panicked"))??;
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert_eq!(keys.len(), 7, "{said}");
    assert_eq!(said.matches("still in progress").count(), 4, "{said}");
    let reused =
        r#"{"error":"conflict","message":"the Idempotency-Key was used for another filing"}"#;
    let (url, served) = answering_gateway(vec![(409, reused)])?;
    let out = put(&url)?;
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(!said.contains("trying again"), "{said}");
    assert!(said.contains("used for another filing"), "{said}");
    assert_eq!(
        served
            .join()
            .map_err(|_| anyhow::anyhow!("panicked"))??
            .len(),
        1
    );
    Ok(())
}

/// A read that fails after its answer's head (a stripe past the first
/// group short of good shards) ends its body short, and is counted in
/// `custodia_reads_failed_total`, where the request counts see a 200.
#[test]
fn a_read_failing_mid_stream_is_cut_off_and_counted() -> Result<()> {
    let c = TestCluster::start(Shape::default())?;
    let data = bytes(3 << 20, 41);
    let id = c.file_id(&data)?;
    let series = "custodia_reads_failed_total{reason=\"unrecoverable\"}";
    assert_eq!(c.metric(&c.metrics, series)?, 0.0);
    // Three of stripe 70's six shards (k = 4) damaged: in group 1, after
    // the first 1 MiB went out.
    for index in 0..3 {
        rewrite_shard(&c, 70, index, &[100])?;
    }
    let got = c.get_with(&c.token, &format!("/v1/evidence/{id}"), &[]);
    // An error reading it (the body cut off), or a short body.
    if let Ok(a) = &got {
        assert!(
            a.status != 200 || a.body.len() < data.len(),
            "{} with {} bytes",
            a.status,
            a.body.len()
        );
    }
    assert!(
        eventually(10, || c.metric(&c.metrics, series).unwrap_or(0.0) >= 1.0),
        "counted"
    );
    Ok(())
}

/// Evidence answers with its validators (its BLAKE3 root as a strong
/// ETag, its filing time as Last-Modified) and meets conditional requests:
/// a client revalidating gets 304 without a read, a guard that fails gets
/// 412, and an If-Range that does not name it gets the whole content.
#[test]
fn evidence_reads_carry_validators_and_meet_conditions() -> Result<()> {
    let c = TestCluster::start(Shape::default())?;
    let data = bytes(50_000, 7);
    let id = c.file_id(&data)?;
    let path = format!("/v1/evidence/{id}");
    let a = c.get_with(&c.token, &path, &[])?;
    let etag = format!("\"{}\"", blake3_hex(&data));
    assert_eq!(a.header("etag"), Some(etag.as_str()));
    let modified = a
        .header("last-modified")
        .context("last-modified")?
        .to_owned();
    let read_before = c.metric(&c.metrics, "custodia_read_bytes_total")?;
    for (name, value) in [
        ("if-none-match", etag.as_str()),
        ("if-modified-since", &modified),
    ] {
        let a = c.get_with(&c.token, &path, &[(name, value)])?;
        assert_eq!((a.status, a.body.len()), (304, 0), "{name}");
        assert_eq!(a.header("etag"), Some(etag.as_str()));
    }
    assert_eq!(
        c.metric(&c.metrics, "custodia_read_bytes_total")?,
        read_before,
        "a 304 reads nothing"
    );
    let a = c.get_with(&c.token, &path, &[("if-match", "\"other\"")])?;
    assert_eq!(
        (a.status, a.json()["error"].as_str()),
        (412, Some("precondition_failed"))
    );
    let ranged = |if_range: &str| {
        c.get_with(
            &c.token,
            &path,
            &[("range", "bytes=10-19"), ("if-range", if_range)],
        )
    };
    let a = ranged(&etag)?;
    assert_eq!((a.status, &a.body[..]), (206, &data[10..20]));
    let a = ranged("\"other\"")?;
    assert_eq!(a.status, 200);
    assert!(a.body == data);
    Ok(())
}

/// `init` (and so `up`) makes a cluster only in a new or empty directory
/// (one holding only `tls/` may be used): a slip such as `--data-dir ~`
/// neither puts a cluster among other files nor makes their directory
/// private to its operator.
#[test]
fn a_cluster_is_made_only_in_an_empty_directory() -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir()?;
    let home = tmp.path().join("home");
    std::fs::create_dir(&home)?;
    std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o755))?;
    std::fs::write(home.join("notes.txt"), b"someone else's")?;
    let init = |dir: &std::path::Path| {
        std::process::Command::new(custodia_tests::custodia_bin())
            .args(["init", "--data-dir"])
            .arg(dir)
            .output()
    };
    let out = init(&home)?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.code() == Some(1) && err.contains("is not empty (notes.txt)"),
        "{err}"
    );
    let mode = std::fs::metadata(&home)?.permissions().mode() & 0o777;
    assert_eq!(mode, 0o755, "left as it was");
    assert!(!home.join("cluster.toml").exists() && !home.join("nodes").exists());
    // Certificates put in tls/ beforehand are the cluster's to use.
    let with_tls = tmp.path().join("with-tls");
    std::fs::create_dir_all(with_tls.join("tls"))?;
    let out = init(&with_tls)?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}
