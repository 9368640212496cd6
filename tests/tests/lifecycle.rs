//! A node's lifecycle: drained (no new shards; repair moves its shards
//! while it still serves them), removed (refused while it still holds
//! shards, and afterwards the cluster keeps full redundancy without it), a
//! drain undone, and a node added that takes new shards.

use anyhow::{bail, Context, Result};
use custodia_tests::{blake3_hex, bytes, Shape, TestCluster, Tool};
use serde_json::Value;

fn status(c: &TestCluster) -> Result<Value> {
    let out = c.cli(&["status", "--json"])?;
    if !out.status.success() {
        bail!("status failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn node_cmd(c: &TestCluster, args: &[&str]) -> Result<(bool, String)> {
    let mut all = vec!["node"];
    all.extend_from_slice(args);
    let out = c.cli(&all)?;
    Ok((
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    ))
}

#[test]
fn nodes_are_drained_removed_and_added_without_losing_redundancy() -> Result<()> {
    let mut c = TestCluster::start(Shape::default())?;
    c.set_gateway(&[
        ("repair_interval_ms", toml::Value::Integer(300)),
        ("repair_old_copy_grace_ms", toml::Value::Integer(2_000)),
    ])?;
    let mut filed = Vec::new();
    for i in 0..10u64 {
        let data = bytes(20_000 + 6_000 * i as usize, i + 200);
        let r = c.file(&data)?;
        filed.push((r["id"].as_str().unwrap_or_default().to_owned(), data));
    }
    let on_3 = c.shard_files(3).len();
    assert!(on_3 > 0, "node 3 holds shards");

    // Removing an active node is refused: uploads under way may be
    // placing shards on it that no stripe record names yet.
    let (ok, text) = node_cmd(&c, &["remove", "3"])?;
    assert!(!ok, "removing an active node must be refused: {text}");
    assert!(
        text.contains("is active") && text.contains("drain it first"),
        "{text}"
    );

    // Drain: repair moves every shard off node 3 while it still serves.
    let (ok, text) = node_cmd(&c, &["drain", "3", "--wait", "--patience-secs", "60"])?;
    assert!(ok, "drain failed: {text}");
    let s = status(&c)?;
    assert_eq!(s["nodes"][3]["lifecycle"], "draining", "{s}");
    assert_eq!(s["degraded_stripes"], 0, "{s}");
    // What left repair's queue is counted (what `custodia repair`
    // follows while the backlog is past what the status counts).
    assert!(s["repair_settled_stripes"].as_u64().unwrap_or(0) > 0, "{s}");
    // Each shard was copied by its new node straight from node 3: one
    // shard moved per shard, none through the gateway.
    let copied = c.node_metric_sum(
        (0..8u32).filter(|i| *i != 3),
        r#"custodia_node_requests_total{op="rebuild",result="ok","#,
    );
    let moved = c.metric(&c.metrics, "custodia_shards_repaired_total")?;
    assert_eq!(moved, on_3 as f64, "every shard on node 3 moved");
    assert_eq!(copied, moved, "each moved by its new node");
    println!(
        "custodia status while node 3 drains:\n{}",
        String::from_utf8_lossy(&c.cli(&["status"])?.stdout)
    );
    // Node 3's copies outlive the commits that moved them by the grace
    // (2 s here), for reads that began on the old placement, then go.
    let cleared = custodia_tests::eventually(30, || c.shard_files(3).is_empty());
    assert!(
        cleared,
        "node 3 still holds {} shard files after the grace",
        c.shard_files(3).len()
    );
    // New filings place nothing on a draining node.
    let before = c.shard_files(3).len();
    for i in 0..5u64 {
        let data = bytes(25_000, i + 300);
        let r = c.file(&data)?;
        filed.push((r["id"].as_str().unwrap_or_default().to_owned(), data));
    }
    assert!(
        c.shard_files(3).len() <= before,
        "a draining node took new shards"
    );

    let (ok, text) = node_cmd(&c, &["remove", "3"])?;
    assert!(ok, "remove after the drain failed: {text}");
    assert_eq!(status(&c)?["nodes"][3]["lifecycle"], "removed");
    // Nothing is left on it, and once a whole walk has found so, the
    // scanner (every 300 ms here) stops walking the index for it.
    let scanned = || c.metric(&c.metrics, "custodia_repair_scanned_stripes_total");
    let settled = custodia_tests::eventually(30, || {
        let before = scanned().unwrap_or(-1.0);
        std::thread::sleep(std::time::Duration::from_secs(2));
        before >= 0.0 && scanned().unwrap_or(-2.0) == before
    });
    assert!(
        settled,
        "the scanner keeps walking for a removed node with no shards: {} records read",
        scanned()?
    );
    let (ok, text) = node_cmd(&c, &["activate", "3"])?;
    assert!(!ok, "a removed node cannot come back: {text}");
    // Out of the cluster, it is no node that is down: its series go (an
    // alert on node_up == 0 would otherwise page for it forever).
    // Whether a fetched page has a `custodia_cluster_node_up` series for
    // node `i` (whatever its other labels).
    let has_up = |page: &str, i: u32| {
        let label = format!("node=\"{i}\"");
        page.lines().filter(|l| !l.starts_with('#')).any(|l| {
            l.strip_prefix("custodia_cluster_node_up{")
                .and_then(|rest| rest.split_once('}'))
                .is_some_and(|(labels, _)| labels.split(',').any(|kv| kv == label))
        })
    };
    let page = c.metrics_page(&c.metrics)?;
    assert!(has_up(&page, 2), "node 2's series is there: {page}");
    // A page that cannot be fetched does not count as one without it.
    let gone = custodia_tests::eventually(15, || {
        c.metrics_page(&c.metrics)
            .is_ok_and(|page| has_up(&page, 2) && !has_up(&page, 3))
    });
    let page = c.metrics_page(&c.metrics)?;
    assert!(
        gone && has_up(&page, 2) && !has_up(&page, 3),
        "a removed node's series is gone, an active node's stays: {page}"
    );

    // Without node 3, and with m = 2 more nodes dead, everything reads back:
    // every stripe has k+m shards elsewhere.
    c.kill_node(3);
    c.kill_node(0);
    c.kill_node(6);
    for (id, data) in &filed {
        assert_eq!(&c.read(id)?, data, "{id} without nodes 3, 0 and 6");
    }
    c.start_node_and_wait(0)?;
    c.start_node_and_wait(6)?;

    // A drain can be undone.
    let (ok, text) = node_cmd(&c, &["drain", "5"])?;
    assert!(ok, "{text}");
    let (ok, text) = node_cmd(&c, &["activate", "5"])?;
    assert!(ok, "{text}");
    assert_eq!(status(&c)?["nodes"][5]["lifecycle"], "active");

    // A new node joins and takes new shards once the gateway knows it.
    let out = c.custodia(&["node", "add"])?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("node 8 added"), "{text}");
    c.start_node_and_wait(8)?;
    c.kill_gateway();
    c.start_gateway()?;
    c.wait_healthy(8)?;
    for i in 0..8u64 {
        let data = bytes(30_000, i + 400);
        let r = c.file(&data)?;
        filed.push((r["id"].as_str().unwrap_or_default().to_owned(), data));
    }
    assert!(c.holds_shards(8), "the new node took no shards");
    let s = status(&c)?;
    assert_eq!(s["nodes"].as_array().map(Vec::len), Some(9), "{s}");
    println!(
        "custodia status after removing node 3 and adding node 8:\n{}",
        String::from_utf8_lossy(&c.cli(&["status"])?.stdout)
    );
    for (id, data) in &filed {
        assert_eq!(&c.read(id)?, data, "{id}");
    }
    Ok(())
}

#[test]
fn a_node_whose_clock_is_off_is_measured_and_shown() -> Result<()> {
    if !custodia_tests::require(
        "a_node_whose_clock_is_off_is_measured_and_shown",
        &[Tool::Faketime],
    )? {
        return Ok(());
    }
    let mut c = TestCluster::start(Shape::default())?;
    // Node 5 restarts with its wall clock 30 s ahead (monotonic time, which
    // timeouts use, left alone).
    let wrapper = custodia_tests::faketime("+30s")?;
    c.kill_node(5);
    c.start_node_under(5, &wrapper.iter().map(String::as_str).collect::<Vec<_>>())?;
    let measured = custodia_tests::eventually(30, || {
        status(&c).is_ok_and(|s| {
            s["nodes"][5]["clock_offset_ms"]
                .as_i64()
                .is_some_and(|ms| (28_000..32_000).contains(&ms))
        })
    });
    let s = status(&c)?;
    assert!(
        measured,
        "node 5's offset was never measured near +30 s: {s}"
    );
    for n in s["nodes"].as_array().into_iter().flatten() {
        if n["id"] != 5 {
            let ms = n["clock_offset_ms"].as_i64().unwrap_or(i64::MAX);
            assert!(ms.abs() < 1_000, "node {} is off by {ms} ms", n["id"]);
        }
    }
    let table = String::from_utf8_lossy(&c.cli(&["status"])?.stdout).into_owned();
    println!("custodia status with node 5's clock 30 s ahead:\n{table}");
    assert!(table.contains("SKEW"), "{table}");
    // The gauges are refreshed every few seconds.
    let series = "custodia_node_clock_offset_seconds{node=\"5\"}";
    let exported = custodia_tests::eventually(15, || {
        c.metric(&c.metrics, series)
            .is_ok_and(|v| (28.0..32.0).contains(&v))
    });
    assert!(
        exported,
        "{series} = {:?}",
        c.metric(&c.metrics, series).ok()
    );
    Ok(())
}

/// A decision taken by a gateway whose clock is behind the one that took
/// the last (here: the same gateway, its clock two minutes fast, then
/// right) still reaches the archive `recover-index` restores from: each
/// decision is stamped later than the one it replaces. Before, the archive
/// kept the fast clock's drain, and a recovered index brought it back.
#[test]
fn a_decision_stamped_by_a_slower_clock_still_reaches_the_archive() -> Result<()> {
    if !custodia_tests::require(
        "a_decision_stamped_by_a_slower_clock_still_reaches_the_archive",
        &[Tool::Faketime],
    )? {
        return Ok(());
    }
    let mut c = TestCluster::start(Shape::default())?;
    let archived = |c: &TestCluster| -> Result<Vec<u8>> {
        let dir = c.data_dir().join("ledger").join("openings");
        Ok(std::fs::read(
            dir.join("nodes-lifecycle").join("0000000007"),
        )?)
    };
    let wrapper = custodia_tests::faketime("+120s")?;
    c.stop_gateway();
    c.start_gateway_under(&wrapper.iter().map(String::as_str).collect::<Vec<_>>())?;
    c.wait_healthy(8)?;
    let (ok, out) = node_cmd(&c, &["drain", "7"])?;
    assert!(ok, "{out}");
    let drained = archived(&c)?;
    c.stop_gateway();
    c.start_gateway()?;
    c.wait_healthy(8)?;
    let (ok, out) = node_cmd(&c, &["activate", "7"])?;
    assert!(ok, "{out}");
    // Written by the deciding gateway, or by its comparison loop within
    // seconds.
    let reached = custodia_tests::eventually(15, || archived(&c).is_ok_and(|a| a != drained));
    assert!(reached, "the activation never replaced the archived drain");
    Ok(())
}

/// A node down to its free-space reserve (here: a reserve larger than the
/// disk) refuses new shards; the gateway sends new filings elsewhere at full
/// redundancy without calling it down, it keeps serving the shards it holds,
/// `status` and the metrics say it is full, and it takes shards again once
/// it has room.
#[test]
fn a_full_node_takes_no_new_shards_but_keeps_serving() -> Result<()> {
    let mut c = TestCluster::start(Shape::default())?;
    let mut filed = Vec::new();
    let mut file = |c: &TestCluster, n: u64| -> Result<Value> {
        // 5-6 stripes of RS(4,2) with 4 KiB shards.
        let data = bytes(70_000 + 3_000 * (n % 7) as usize, n + 900);
        let r = c.file(&data)?;
        assert_eq!(r["degraded_stripes"], 0, "filing {n}: {r}");
        filed.push((r["id"].as_str().unwrap_or_default().to_owned(), data));
        Ok(r)
    };
    for n in 0..6 {
        file(&c, n)?;
    }
    let held = c.shard_files(2).len();
    assert!(held > 0, "node 2 holds shards before it is full");

    // A reserve no disk here has free: node 2 is full for new shards.
    c.set_node(2, &[("reserve_bytes", toml::Value::Integer(1 << 60))])?;
    let full_and_up = |c: &TestCluster| {
        status(c).is_ok_and(|s| s["nodes"][2]["full"] == true && s["nodes"][2]["state"] == "up")
    };
    assert!(
        custodia_tests::eventually(30, || full_and_up(&c)),
        "node 2 never showed as up and full: {}",
        status(&c)?
    );
    let table = String::from_utf8_lossy(&c.cli(&["status"])?.stdout).into_owned();
    println!("custodia status with node 2 at its reserve:\n{table}");
    assert!(
        table
            .lines()
            .any(|l| l.trim_start().starts_with("2 ") && l.contains("up full")),
        "{table}"
    );
    let series = "custodia_cluster_node_full{node=\"2\"}";
    assert!(
        custodia_tests::eventually(15, || c.metric(&c.metrics, series).is_ok_and(|v| v == 1.0)),
        "{series} = {:?}",
        c.metric(&c.metrics, series).ok()
    );

    // New filings: every stripe at k+m shards, none on node 2.
    let before: usize = (0..8).map(|i| c.shard_files(i).len()).sum();
    let mut stripes = 0;
    for n in 6..14 {
        stripes += file(&c, n)?["stripes"].as_u64().unwrap_or(0) as usize;
    }
    assert_eq!(
        c.shard_files(2).len(),
        held,
        "new shards went to a full node"
    );
    let after: usize = (0..8).map(|i| c.shard_files(i).len()).sum();
    assert_eq!(
        after - before,
        stripes * 6,
        "every new stripe has k+m shards"
    );
    let s = status(&c)?;
    assert_eq!(s["nodes"][2]["full"], true, "{s}");
    assert_eq!(s["nodes"][2]["state"], "up", "a full node is not down: {s}");

    // With room again it takes new shards.
    c.set_node(2, &[("reserve_bytes", toml::Value::Integer(0))])?;
    assert!(
        custodia_tests::eventually(30, || {
            status(&c)
                .is_ok_and(|s| s["nodes"][2]["full"] == false && s["nodes"][2]["state"] == "up")
        }),
        "node 2 never showed room again: {}",
        status(&c)?
    );
    for n in 14..20 {
        file(&c, n)?;
    }
    assert!(
        c.shard_files(2).len() > held,
        "node 2 took no shards once it had room"
    );

    // Full again, and two other nodes dead: stripes with shards on nodes 0,
    // 1 and 2 read back only because the full node still serves its shards.
    c.set_node(2, &[("reserve_bytes", toml::Value::Integer(1 << 60))])?;
    c.kill_node(0);
    c.kill_node(1);
    for (id, data) in &filed {
        assert!(c.read(id)? == *data, "{id} read back different bytes");
    }
    Ok(())
}

/// With every node at its reserve no stripe finds room: a filing is refused
/// with 507 and a JSON body saying so, nothing of it becomes visible or stays
/// on the nodes, what was filed before still reads back, and the same
/// filing succeeds once the nodes have room again.
#[test]
fn a_cluster_without_room_refuses_filings_with_507_and_keeps_what_it_has() -> Result<()> {
    let mut c = TestCluster::start(Shape::default())?;
    let kept = bytes(50_000, 31);
    let kept_id = c.file_id(&kept)?;
    let shards_before = c.all_shard_files().len();
    c.set_nodes(&[("reserve_bytes", toml::Value::Integer(1 << 60))])?;
    let all = |want_full: bool| {
        move |c: &TestCluster| {
            status(c).is_ok_and(|s| {
                s["nodes"].as_array().is_some_and(|n| {
                    n.iter()
                        .all(|n| n["state"] == "up" && n["full"] == want_full)
                })
            })
        }
    };
    assert!(
        custodia_tests::eventually(30, || all(true)(&c)),
        "the nodes never all showed as up and full: {}",
        status(&c)?
    );

    let new = bytes(60_000, 32);
    let refused = c.file_with(&c.token, &new, &[])?;
    assert_eq!(
        refused.status,
        507,
        "{}",
        String::from_utf8_lossy(&refused.body)
    );
    let body = refused.json();
    assert_eq!(body["error"], "insufficient_storage", "{body}");
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.contains("reserve")),
        "{body}"
    );
    let h = blake3_hex(&new);
    let found = c.get_with(&c.token, &format!("/v1/evidence/by-hash/{h}"), &[])?;
    assert_eq!(
        found.json()["filings"].as_array().map(Vec::len),
        Some(0),
        "nothing may be visible"
    );
    assert_eq!(
        c.all_shard_files().len(),
        shards_before,
        "no shard of the refusal stays"
    );
    assert!(
        c.read(&kept_id)? == kept,
        "what was filed before reads back"
    );

    c.set_nodes(&[("reserve_bytes", toml::Value::Integer(0))])?;
    assert!(
        custodia_tests::eventually(30, || all(false)(&c)),
        "the nodes never showed room again: {}",
        status(&c)?
    );
    let filed = c.file(&new)?;
    assert_eq!(filed["blake3"].as_str(), Some(h.as_str()), "{filed}");
    assert_eq!(filed["degraded_stripes"], 0, "{filed}");
    Ok(())
}

/// A drain does not end, and a removal is refused, while an upload begun
/// before it is still under way: that upload may hold shards on the node
/// that no stripe record names yet (records are written in batches).
/// Once it ends, its shards are moved like the rest.
#[test]
fn a_drain_waits_for_uploads_under_way() -> Result<()> {
    let mut c = TestCluster::start(Shape::default())?;
    c.set_gateway(&[("repair_interval_ms", toml::Value::Integer(300))])?;
    let data = bytes(40 * 4 * 4096, 77);
    let s = c.half_upload(&data, 20.0 * 6.0 - 6.0)?;
    let node = (0..8u32)
        .max_by_key(|&i| c.shard_files(i).len())
        .unwrap_or(0);
    assert!(!c.shard_files(node).is_empty());
    let id = node.to_string();
    let (ok, text) = node_cmd(&c, &["drain", &id])?;
    assert!(ok, "{text}");
    // Nothing recorded on it yet, but the upload may hold shards there.
    let (ok, text) = node_cmd(&c, &["remove", &id])?;
    assert!(!ok && text.contains("uploads begun before"), "{text}");
    let filed = custodia_tests::finish_upload(s, &data)?;
    let (ok, text) = node_cmd(&c, &["drain", &id, "--wait", "--patience-secs", "60"])?;
    assert!(ok, "{text}");
    let (ok, text) = node_cmd(&c, &["remove", &id])?;
    assert!(ok, "{text}");
    c.kill_node(node);
    let evidence = filed["id"].as_str().unwrap_or_default();
    // With the removed node gone and two more dead, it still reads back.
    let others: Vec<u32> = (0..8).filter(|&i| i != node).take(2).collect();
    for &i in &others {
        c.kill_node(i);
    }
    assert!(
        c.read(evidence)? == data,
        "the filing reads back byte-exact"
    );
    Ok(())
}

/// A node started under a low soft limit on open files (the usual 1024,
/// met at about 64 GB of packed shards: a descriptor per segment) raises
/// it to its hard limit, and says so.
#[test]
fn a_node_raises_its_open_file_limit() -> Result<()> {
    let mut c = TestCluster::start(Shape::default())?;
    c.kill_node(0);
    c.start_node_under(0, &["prlimit", "--nofile=256:4096"])?;
    let log = c.data_dir().join("node-0.log");
    let raised = custodia_tests::eventually(20, || {
        std::fs::read_to_string(&log).is_ok_and(|l| {
            l.lines().any(|l| {
                l.contains("raised the open-file limit")
                    && l.contains("from=Some(256)")
                    && l.contains("to=Some(4096)")
            })
        })
    });
    assert!(raised, "node 0 kept a soft limit of 256 open files");
    c.wait_healthy(8)?;
    Ok(())
}

/// `custodia init` of a 3-node RS(2,1) cluster in `parent/data`, nothing
/// started: for what the cluster file alone decides.
fn init_three_nodes(parent: &std::path::Path) -> Result<std::path::PathBuf> {
    let dir = parent.join("data");
    let init = std::process::Command::new(custodia_tests::custodia_bin())
        .args(["init", "--data-dir"])
        .arg(&dir)
        .args(["--nodes", "3", "--k", "2", "--m", "1"])
        .args(["--api", "127.0.0.1:0", "--s3", "off", "--metrics", "off"])
        .args(["--node-base-port", "0", "--node-metrics-base-port", "0"])
        .output()?;
    if !init.status.success() {
        bail!("{}", String::from_utf8_lossy(&init.stderr));
    }
    Ok(dir)
}

/// A node added at an address another node of the file has is refused
/// before anything is written (the file would no longer load, stopping
/// `custodia up`, the gateway and every later edit), with a message naming
/// that node; the exit status says it failed.
#[test]
fn a_node_added_at_another_nodes_address_is_refused() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = init_three_nodes(tmp.path())?;
    let file = dir.join("cluster.toml");
    let before = std::fs::read_to_string(&file)?;
    let cluster: toml::Value = toml::from_str(&before)?;
    let taken = cluster["gateway"]["nodes"][1]["addr"]
        .as_str()
        .context("node 1's address")?
        .to_owned();
    let out = std::process::Command::new(custodia_tests::custodia_bin())
        .args(["node", "add", "--listen", &taken, "--data-dir"])
        .arg(&dir)
        .output()?;
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{said}");
    assert!(said.contains("already node 1's address"), "{said}");
    assert_eq!(std::fs::read_to_string(&file)?, before, "the file changed");
    assert!(!dir.join("tls").join("node-3.pem").exists());
    // Without an address given, the node gets one of its own.
    let out = std::process::Command::new(custodia_tests::custodia_bin())
        .args(["node", "add", "--data-dir"])
        .arg(&dir)
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Nodes added at once (a script's `&`) each get an id, a certificate and
/// an entry of their own: every edit of cluster.toml is made under one
/// lock, from the file as the last edit left it.
#[test]
fn nodes_added_at_once_are_all_kept() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = init_three_nodes(tmp.path())?;
    let adds: Vec<_> = (0..4)
        .map(|_| {
            std::process::Command::new(custodia_tests::custodia_bin())
                .args(["node", "add", "--data-dir"])
                .arg(&dir)
                .spawn()
        })
        .collect::<std::io::Result<_>>()?;
    for mut add in adds {
        assert!(add.wait()?.success(), "a node add failed");
    }
    let cluster: toml::Value = toml::from_str(&std::fs::read_to_string(dir.join("cluster.toml"))?)?;
    let ids = |v: &toml::Value| -> Vec<i64> {
        let mut ids: Vec<i64> = v
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|n| n.get("id")?.as_integer())
            .collect();
        ids.sort();
        ids
    };
    assert_eq!(ids(&cluster["nodes"]), [0, 1, 2, 3, 4, 5, 6], "{cluster}");
    assert_eq!(
        ids(&cluster["gateway"]["nodes"]),
        [0, 1, 2, 3, 4, 5, 6],
        "{cluster}"
    );
    for id in 3..7 {
        let cert = std::fs::read_to_string(dir.join("tls").join(format!("node-{id}.pem")))?;
        let key = std::fs::read_to_string(dir.join("tls").join(format!("node-{id}.key")))?;
        assert!(
            cert.contains("BEGIN CERTIFICATE") && key.contains("PRIVATE KEY"),
            "node {id}"
        );
    }
    Ok(())
}

/// Each node is in cluster.toml twice, where it listens and where the
/// gateway dials it. An edit of one alone (to get around a port in use) is
/// refused with both addresses, before anything starts: `up` said the
/// cluster was up while the gateway dialled a port nobody listened on. A
/// node listening on every address may be dialled anywhere.
#[test]
fn a_node_listening_where_the_gateway_does_not_dial_is_refused() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = init_three_nodes(tmp.path())?;
    let file = dir.join("cluster.toml");
    let mut cluster: toml::Value = toml::from_str(&std::fs::read_to_string(&file)?)?;
    let dialled = cluster["gateway"]["nodes"][0]["addr"]
        .as_str()
        .context("addr")?
        .to_owned();
    let port: u16 = dialled.rsplit(':').next().context("port")?.parse()?;
    // Nothing binds it: the file is refused before any node starts.
    let moved = format!("127.0.0.1:{}", port.wrapping_add(1000));
    cluster["nodes"][0]["listen"] = toml::Value::String(moved.clone());
    std::fs::write(&file, toml::to_string(&cluster)?)?;
    let out = std::process::Command::new(custodia_tests::custodia_bin())
        .args(["up", "--data-dir"])
        .arg(&dir)
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!(
            "node 0 listens on {moved} but the gateway dials it at {dialled}"
        )),
        "{err}"
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains("Custodia is up"));
    // A node on every address, dialled elsewhere (another host, a port
    // mapping), is the network's business: the file is taken.
    let mut cluster: toml::Value = toml::from_str(&std::fs::read_to_string(&file)?)?;
    cluster["nodes"][0]["listen"] =
        toml::Value::String(format!("0.0.0.0:{}", port.wrapping_add(1000)));
    // And one listing under [[nodes]] only this host's (nodes 0 and 1;
    // node 2 runs elsewhere): a node added gets an id neither list holds.
    if let Some(nodes) = cluster["nodes"].as_array_mut() {
        nodes.truncate(2);
    }
    std::fs::write(&file, toml::to_string(&cluster)?)?;
    let add = std::process::Command::new(custodia_tests::custodia_bin())
        .args(["node", "add", "--data-dir"])
        .arg(&dir)
        .output()?;
    assert!(
        add.status.success(),
        "{}",
        String::from_utf8_lossy(&add.stderr)
    );
    let cluster: toml::Value = toml::from_str(&std::fs::read_to_string(&file)?)?;
    let ids: Vec<i64> = cluster["gateway"]["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|n| n["id"].as_integer())
        .collect();
    assert_eq!(ids, [0, 1, 2, 3], "{cluster}");
    Ok(())
}

/// Drains asked at once are decided one after another: with 8 nodes and
/// RS(4,2), two may go but a third would leave fewer than k+m active, so
/// however they interleave exactly one of three is refused (each checked
/// the nodes' lifecycles in the transaction that records its own).
#[test]
fn drains_at_once_never_leave_fewer_than_k_plus_m_active() -> Result<()> {
    let c = TestCluster::start(Shape::default())?;
    // Straight to the API, released together, so the three overlap.
    let start = std::sync::Barrier::new(3);
    let answers: Vec<(bool, String)> = std::thread::scope(|s| {
        let asks: Vec<_> = ["5", "6", "7"]
            .into_iter()
            .map(|id| {
                let (c, start) = (&c, &start);
                s.spawn(move || -> Result<(bool, String)> {
                    let agent: ureq::Agent = ureq::Agent::config_builder()
                        .http_status_as_error(false)
                        .build()
                        .into();
                    let request = agent
                        .post(format!("{}/v1/admin/nodes/{id}/drain", c.api))
                        .header("authorization", &format!("Bearer {}", c.token));
                    start.wait();
                    let mut answer = request.send_empty()?;
                    Ok((
                        answer.status().is_success(),
                        answer.body_mut().read_to_string()?,
                    ))
                })
            })
            .collect();
        asks.into_iter()
            .map(|a| a.join().map_err(|_| anyhow::anyhow!("a drain panicked"))?)
            .collect::<Result<_>>()
    })?;
    let refused: Vec<&String> = answers
        .iter()
        .filter(|(ok, _)| !ok)
        .map(|(_, t)| t)
        .collect();
    assert_eq!(refused.len(), 1, "{answers:?}");
    assert!(
        refused[0].contains("other active nodes would remain")
            || refused[0].contains("changed meanwhile"),
        "{}",
        refused[0]
    );
    let s = status(&c)?;
    let active = s["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|n| n["lifecycle"] == "active")
        .count();
    assert_eq!(active, 6, "{s}");
    Ok(())
}

/// A removed node's key (taken from its host, or from a disposed-of disk)
/// reads nothing more from the nodes that stay: the gateway tells every
/// node which nodes were removed, and each keeps that on its disk. (Before
/// the removal the key read shards by name, as a rebuild does: with the
/// keys of the shards it held, the other shards of their stripes.)
#[test]
fn a_removed_nodes_key_reads_nothing_more() -> Result<()> {
    use storage_node::client::{NodeClient, NodeError};
    let mut c = TestCluster::start(Shape::default())?;
    let data = bytes(30_000, 77);
    let id = c.file(&data)?["id"].as_str().context("id")?.to_owned();
    // A shard of it on a node other than 7.
    let prefix = format!("{}-0-", id.replace('-', ""));
    let (holder, index) = (0..7u32)
        .find_map(|n| {
            c.shard_files(n).iter().find_map(|p| {
                let name = p.file_name()?.to_string_lossy().into_owned();
                let index: u8 = name.strip_prefix(&prefix)?.parse().ok()?;
                Some((n, index))
            })
        })
        .context("no shard on nodes 0 to 6")?;
    let cluster: toml::Value =
        toml::from_str(&std::fs::read_to_string(c.data_dir().join("cluster.toml"))?)?;
    let path =
        |v: &toml::Value| -> Result<std::path::PathBuf> { Ok(v.as_str().context("path")?.into()) };
    let tls = storage_node::tls::TlsFiles {
        ca_cert: c.data_dir().join("tls").join("ca.pem"),
        cert: path(&cluster["nodes"][7]["cert"])?,
        key: path(&cluster["nodes"][7]["key"])?,
    };
    let addr: std::net::SocketAddr = cluster["gateway"]["nodes"][holder as usize]["addr"]
        .as_str()
        .context("addr")?
        .parse()?;
    let key = protocol::ShardKey {
        evidence: id.parse().map_err(|_| anyhow::anyhow!("id {id}"))?,
        stripe: 0,
        index,
    };
    let rt = tokio::runtime::Runtime::new()?;
    let read = || -> std::result::Result<(), NodeError> {
        rt.block_on(async {
            let client = NodeClient::new(&tls)?;
            client.rpc_get_shard(addr, key).await.map(|_| ())
        })
    };
    read().context("node 7's key reads a shard by name before its removal")?;
    c.kill_node(7);
    let mut text = String::new();
    // Silent for as long as a node takes to be called down (30 s).
    let removed = custodia_tests::eventually(60, || {
        let (ok, said) = node_cmd(&c, &["remove", "7", "--force"]).unwrap_or_default();
        text = said;
        ok
    });
    assert!(removed, "{text}");
    let refused = custodia_tests::eventually(20, || {
        matches!(
            read(),
            Err(NodeError::Remote(protocol::wire::ErrorCode::Forbidden))
        )
    });
    assert!(refused, "the removed node's key still reads: {:?}", read());
    // Kept on the node's disk: so after it restarts too. (The node refuses
    // at once, before its durable write of the list ends: the file may
    // come a moment after the first refusal.)
    let file = c.node_dir(holder).join("denied-nodes");
    let kept = custodia_tests::eventually(10, || {
        std::fs::read_to_string(&file).is_ok_and(|t| t.trim() == "7")
    });
    assert!(kept, "{:?}", std::fs::read_to_string(&file));
    Ok(())
}

/// The parts of an S3 multipart upload nobody has completed yet are moved
/// like evidence: a node holding some drains, and is removed, while the
/// upload stays open (a client may take days), with every part stripe at
/// k+m shards on the other nodes; the upload then completes and reads back
/// byte-exact without the node.
#[test]
fn a_drain_moves_the_parts_of_an_unfinished_multipart_upload() -> Result<()> {
    if !custodia_tests::require(
        "a_drain_moves_the_parts_of_an_unfinished_multipart_upload",
        &[Tool::Curl],
    )? {
        return Ok(());
    }
    let mut c = TestCluster::start(Shape::default())?;
    c.set_gateway(&[
        ("repair_interval_ms", toml::Value::Integer(300)),
        ("repair_old_copy_grace_ms", toml::Value::Integer(1_000)),
    ])?;
    let (h, _) = c.s3_curl("PUT", &format!("{}/parts", c.s3), &[])?;
    assert!(h.starts_with("http/1.1 200"), "{h}");
    let upload = c.s3_create_upload("parts", "big.bin")?;
    let data = bytes(50_000, 5);
    let part = c.data_dir().join("part.bin");
    std::fs::write(&part, &data)?;
    let (h, _) = c.s3_curl(
        "PUT",
        &format!("{}/parts/big.bin?partNumber=1&uploadId={upload}", c.s3),
        &["--data-binary", &format!("@{}", part.display())],
    )?;
    assert!(h.starts_with("http/1.1 200"), "{h}");
    let etag = custodia_tests::header(&h, "etag")
        .context("no part etag")?
        .to_owned();
    // The part is all the cluster holds: a node with a shard holds one of it.
    let shards = (0..8u32).map(|n| c.shard_files(n).len()).sum::<usize>();
    let holder = (0..8u32)
        .find(|&n| !c.shard_files(n).is_empty())
        .context("no node holds the part")?;
    let (ok, text) = node_cmd(
        &c,
        &[
            "drain",
            &holder.to_string(),
            "--wait",
            "--patience-secs",
            "20",
        ],
    )?;
    assert!(
        ok,
        "the drain of a node holding a part did not finish: {text}"
    );
    let others = || (0..8u32).filter(|&n| n != holder);
    let moved = custodia_tests::eventually(20, || {
        c.shard_files(holder).is_empty()
            && others().map(|n| c.shard_files(n).len()).sum::<usize>() == shards
    });
    assert!(
        moved,
        "every part shard on the other nodes, none left on node {holder}: {} there, {} elsewhere of {shards}",
        c.shard_files(holder).len(),
        others().map(|n| c.shard_files(n).len()).sum::<usize>()
    );
    let (ok, text) = node_cmd(&c, &["remove", &holder.to_string()])?;
    assert!(ok, "a drained node was not removed: {text}");
    c.kill_node(holder);
    let (h, body) = c.s3_complete("parts", "big.bin", &upload, &[(1, &etag)])?;
    assert!(
        h.starts_with("http/1.1 200") && body.contains("<CompleteMultipartUploadResult"),
        "{h}{body}"
    );
    let (h, got) = c.s3_curl("GET", &format!("{}/parts/big.bin", c.s3), &[])?;
    assert!(h.starts_with("http/1.1 200"), "{h}");
    assert!(
        got == data,
        "the completed object did not read back byte-exact"
    );
    Ok(())
}

/// A dead node taken out of cluster.toml before it was removed is not
/// stranded: `custodia node remove N --force` still takes it out (it was
/// refused as "no such evidence" while repair waited on its shards for
/// good), and its stripes are then rebuilt on the others. Other actions on
/// it, and an id nobody knows, are refused with a message that says so.
#[test]
fn a_dead_node_taken_out_of_the_configuration_can_still_be_removed() -> Result<()> {
    let mut c = TestCluster::start(Shape::default())?;
    c.set_gateway(&[
        ("node_down_after_ms", toml::Value::Integer(1_000)),
        ("repair_after_down_ms", toml::Value::Integer(500)),
        ("repair_interval_ms", toml::Value::Integer(300)),
    ])?;
    let mut filed = Vec::new();
    let mut stripes = 0u64;
    for i in 0..6u64 {
        let data = bytes(20_000 + 7_000 * i as usize, 40 + i);
        let r = c.file(&data)?;
        stripes += r["stripes"].as_u64().context("stripes")?;
        filed.push((r["id"].as_str().unwrap_or_default().to_owned(), data));
    }
    c.kill_node(7);
    c.kill_gateway();
    let file = c.data_dir().join("cluster.toml");
    let mut cluster: toml::Value = toml::from_str(&std::fs::read_to_string(&file)?)?;
    let listed = cluster
        .get_mut("gateway")
        .and_then(|g| g.get_mut("nodes"))
        .and_then(|n| n.as_array_mut())
        .context("[[gateway.nodes]]")?;
    let not_7 = |n: &toml::Value| n.get("id").and_then(toml::Value::as_integer) != Some(7);
    listed.retain(not_7);
    assert_eq!(listed.len(), 7);
    let processes = cluster
        .get_mut("nodes")
        .and_then(|n| n.as_array_mut())
        .context("[[nodes]]")?;
    processes.retain(not_7);
    std::fs::write(&file, toml::to_string(&cluster)?)?;
    c.start_gateway()?;
    c.wait_healthy(7)?;

    // Still active as the index has it, not "removed" for being unlisted.
    let detail = c.get_with(&c.token, "/v1/admin/nodes/7", &[])?;
    assert_eq!(
        detail.status,
        200,
        "{}",
        String::from_utf8_lossy(&detail.body)
    );
    assert_eq!(detail.json()["lifecycle"], "active", "{}", detail.json());
    let (ok, text) = node_cmd(&c, &["drain", "7"])?;
    assert!(!ok && text.contains("node remove 7 --force"), "{text}");
    let (ok, text) = node_cmd(&c, &["drain", "42"])?;
    assert!(
        !ok && text.contains("node n42 is neither in this gateway's configuration"),
        "{text}"
    );
    let mut text = String::new();
    let removed = custodia_tests::eventually(30, || {
        let (ok, said) = node_cmd(&c, &["remove", "7", "--force"]).unwrap_or_default();
        text = said;
        ok
    });
    assert!(removed, "the unlisted dead node was not removed: {text}");
    let out = c.cli(&["repair", "--patience-secs", "30"])?;
    assert!(
        out.status.success(),
        "custodia repair failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let on_live = (0..7u32)
        .flat_map(|i| c.shard_files(i))
        .filter_map(|p| p.file_name().map(|n| n.to_owned()))
        .collect::<std::collections::BTreeSet<_>>()
        .len();
    assert_eq!(
        on_live,
        6 * stripes as usize,
        "every stripe has k+m shards on the listed nodes"
    );
    for (id, data) in &filed {
        assert!(c.read(id)? == *data, "{id} did not read back byte-exact");
    }
    // Its key and folder destroyed too, its id is still not given again:
    // the archived decisions and the other nodes' refusals keep it.
    let dir = c.data_dir().to_path_buf();
    for f in ["node-7.pem", "node-7.key"] {
        std::fs::remove_file(dir.join("tls").join(f))?;
    }
    let _ = std::fs::remove_dir_all(dir.join("nodes").join("n7"));
    let out = c.custodia(&["node", "add"])?;
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && said.contains("node 8 added"),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}
