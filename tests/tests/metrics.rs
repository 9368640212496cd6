//! Operations: a real Prometheus (Debian `prometheus`, installed by
//! `.ci/run`) scrapes a live cluster; `promtool` checks and unit-tests the
//! alert rules; every query of every Grafana dashboard panel returns data
//! after traffic (filings, reads, S3, a corrupt shard, a dead node, a
//! witness, an upload its client gave up); every `custodia_*` metric the
//! dashboards and the alert rules name exists (a metric renamed in the
//! code but not in `grafana/` fails here); and `custodia status` reports
//! the dead node and the backlog.

use anyhow::{bail, Context, Result};
use custodia_tests::{bytes, start_witness, Shape, TestCluster, Tool};
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace root")
        .to_path_buf()
}

/// A process killed on drop.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn promtool(args: &[&str]) -> Result<String> {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(repo().join("grafana/prometheus"))
        .output()
        .context("running promtool (Debian `prometheus`; .ci/run installs it)")?;
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        bail!("promtool {args:?} failed:\n{text}");
    }
    Ok(text)
}

/// Every `expr` of every panel of every dashboard: (dashboard, panel, expr).
fn panel_queries() -> Result<Vec<(String, String, String)>> {
    let mut out = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(repo().join("grafana/dashboards"))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    for f in files {
        let board: Value = serde_json::from_slice(&std::fs::read(&f)?)
            .with_context(|| format!("parsing {}", f.display()))?;
        let title = board["title"].as_str().unwrap_or_default().to_owned();
        for p in board["panels"].as_array().into_iter().flatten() {
            assert_eq!(
                p["datasource"]["uid"], "custodia-prometheus",
                "{title}: every panel names the provisioned datasource"
            );
            for t in p["targets"].as_array().into_iter().flatten() {
                let expr = t["expr"].as_str().context("a target without expr")?;
                out.push((
                    title.clone(),
                    p["title"].as_str().unwrap_or_default().to_owned(),
                    expr.to_owned(),
                ));
            }
        }
    }
    Ok(out)
}

/// Metrics the dashboards or the alert rules name that this test's cluster
/// (one gateway with a ledger, a development TSA and a witness) need not
/// export, and why.
const CONDITIONAL_METRICS: &[(&str, &str)] = &[(
    "custodia_witness_inconsistent_total",
    "labelled by witness: a series only once a witness holds another tree",
)];

fn word(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Where each `custodia_*` name in `e` begins and ends (a name within a
/// longer word is none).
fn custodia_names(e: &str) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut at = 0;
    while let Some(i) = e[at..].find("custodia_").map(|i| at + i) {
        let end = i + e[i..].find(|c| !word(c)).unwrap_or(e.len() - i);
        if !e[..i].ends_with(word) {
            out.push((i, end));
        }
        at = end;
    }
    out
}

/// Every `custodia_*` name in `exprs`.
fn metric_names<'a>(exprs: impl IntoIterator<Item = &'a str>) -> BTreeSet<String> {
    exprs
        .into_iter()
        .flat_map(|e| {
            custodia_names(e)
                .into_iter()
                .map(|(i, end)| e[i..end].to_owned())
        })
        .collect()
}

/// Every selector in `exprs` that names a `custodia_*` metric with label
/// values it must equal (`name{a="x",b=~"y"}` gives `name{a="x"}`; one
/// with none is left out): what a rule or a panel reads only if the code
/// exports those labels with those values.
fn equality_selectors<'a>(exprs: impl IntoIterator<Item = &'a str>) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for e in exprs {
        for (i, at) in custodia_names(e) {
            let Some(inside) = e[at..]
                .strip_prefix('{')
                .and_then(|rest| rest.split_once('}'))
                .map(|(inside, _)| inside)
            else {
                continue;
            };
            let equal: Vec<String> = inside
                .split(',')
                .filter_map(|m| {
                    let (label, value) = m.split_once('=')?;
                    let (label, value) = (label.trim(), value.trim());
                    let plain = !label.ends_with('!')
                        && !value.starts_with('~')
                        && label.chars().all(word)
                        && value.len() >= 2
                        && value.starts_with('"')
                        && value.ends_with('"');
                    plain.then(|| format!("{label}={value}"))
                })
                .collect();
            if !equal.is_empty() {
                out.insert(format!("{}{{{}}}", &e[i..at], equal.join(",")));
            }
        }
    }
    out
}

/// Selectors the dashboards or the alert rules name that this test's
/// traffic need not give a series, and why.
const CONDITIONAL_SELECTORS: &[(&str, &str)] = &[];

/// The query of every rule Prometheus loaded.
fn rule_queries(agent: &ureq::Agent, prom: &str) -> Result<Vec<String>> {
    let mut resp = agent.get(format!("{prom}/api/v1/rules")).call()?;
    let v: Value = resp.body_mut().read_json()?;
    if v["status"] != "success" {
        bail!("listing rules failed: {v}");
    }
    let mut out = Vec::new();
    for g in v["data"]["groups"].as_array().into_iter().flatten() {
        for r in g["rules"].as_array().into_iter().flatten() {
            out.push(
                r["query"]
                    .as_str()
                    .context("a rule without query")?
                    .to_owned(),
            );
        }
    }
    Ok(out)
}

/// Sends a whole filing of `data` and closes the connection without
/// waiting for the answer.
fn file_and_leave(c: &TestCluster, data: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(c.api.trim_start_matches("http://"))?;
    write!(
        s,
        "POST /v1/evidence HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        c.token,
        data.len()
    )?;
    s.write_all(data)?;
    s.flush()?;
    Ok(())
}

/// An instant query: the result vector (empty: no data).
fn query(agent: &ureq::Agent, prom: &str, expr: &str) -> Result<Vec<Value>> {
    let mut resp = agent
        .get(format!("{prom}/api/v1/query"))
        .query("query", expr)
        .call()?;
    let v: Value = resp.body_mut().read_json()?;
    if v["status"] != "success" {
        bail!("query {expr:?} failed: {v}");
    }
    Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
}

fn scalar(agent: &ureq::Agent, prom: &str, expr: &str) -> Result<f64> {
    let r = query(agent, prom, expr)?;
    r.first()
        .and_then(|s| s["value"][1].as_str())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("{expr} has no value: {r:?}"))
}

fn status_json(c: &TestCluster) -> Result<Value> {
    let out = c.cli(&["status", "--json"])?;
    if !out.status.success() {
        bail!("status failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

#[test]
fn prometheus_scrapes_every_process_and_every_dashboard_query_has_data() -> Result<()> {
    if !custodia_tests::require(
        "prometheus_scrapes_every_process_and_every_dashboard_query_has_data",
        &[Tool::Promtool, Tool::Prometheus, Tool::Curl],
    )? {
        return Ok(());
    }
    // Static checks first: they need no cluster.
    println!("{}", promtool(&["check", "rules", "alerts.yml"])?);
    println!("{}", promtool(&["test", "rules", "alerts.test.yml"])?);

    let mut c = TestCluster::start(Shape::default())?;
    let log_pub = c.data_dir().join("ledger.vkey");
    let wdir = tempfile::tempdir()?;
    let wport = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let witness = start_witness(wdir.path(), wport, &log_pub)?;
    let wkey = std::fs::read_to_string(wdir.path().join("witness.pub"))?
        .trim()
        .to_owned();
    c.use_witnesses(&[(&witness.url, &wkey)], 300)?;

    // Traffic: filings, whole and ranged reads, S3.
    let mut filed = Vec::new();
    for i in 0..5u64 {
        let data = bytes(60_000 + i as usize * 1000, i);
        let id = c.file_id(&data)?;
        filed.push((id, data));
    }
    assert!(c.read(&filed[0].0)? == filed[0].1);
    assert_eq!(c.read_range(&filed[1].0, 10, 99)?, &filed[1].1[10..100]);
    let (h, _) = c.s3_curl("PUT", &format!("{}/metrics-bucket", c.s3), &[])?;
    assert!(h.starts_with("http/1.1 200"), "{h}");
    let obj = c.data_dir().join("obj.bin");
    std::fs::write(&obj, bytes(5000, 9))?;
    let (h, _) = c.s3_curl(
        "PUT",
        &format!("{}/metrics-bucket/o.bin", c.s3),
        &["--data-binary", &format!("@{}", obj.display())],
    )?;
    assert!(h.starts_with("http/1.1 200"), "{h}");
    let (_, body) = c.s3_curl("GET", &format!("{}/metrics-bucket/o.bin", c.s3), &[])?;
    assert_eq!(body, bytes(5000, 9));

    // Damage: flip a byte in one shard; the reads still return the bytes
    // and report the shard. Then kill a node and read around it.
    // A data shard (index < k: `EVIDENCE-STRIPE-INDEX`), which reads fetch.
    let victim = c
        .shard_files(0)
        .into_iter()
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str()?.rsplit('-').next()?.parse::<u8>().ok())
                .is_some_and(|i| i < 4)
        })
        .context("node 0 holds a data shard")?;
    let mut raw = std::fs::read(&victim)?;
    let last = raw.len() - 1;
    raw[last] ^= 0x55;
    std::fs::write(&victim, raw)?;
    for (id, data) in &filed {
        assert!(c.read(id)? == *data, "reads survive the corrupt shard");
    }
    let (h, body) = c.s3_curl("GET", &format!("{}/metrics-bucket/o.bin", c.s3), &[])?;
    assert!(h.starts_with("http/1.1 200"), "{h}");
    assert_eq!(body, bytes(5000, 9), "S3 reads survive the corrupt shard");
    c.kill_node(7);
    for (id, data) in &filed {
        assert!(c.read(id)? == *data, "reads survive the dead node");
    }

    // `custodia status` sees it all.
    // The gateway probes nodes every 5 s: within a few probes it has seen
    // the dead node and the shards the others now hold.
    let mut last = Value::Null;
    let seen = custodia_tests::eventually(20, || {
        last = status_json(&c).unwrap_or_default();
        last["degraded_stripes"].as_u64().unwrap_or(0) >= 1
            && last["nodes"][7]["state"] != "up"
            && last["nodes"][0]["shards"].as_u64().unwrap_or(0) > 0
    });
    assert!(
        seen,
        "status never showed the dead node and the degraded stripe: {last}"
    );
    let s = status_json(&c)?;
    let nodes = s["nodes"].as_array().context("nodes")?;
    assert_eq!(nodes.len(), 8);
    assert_ne!(nodes[7]["state"], "up", "the killed node is not up: {s}");
    assert!(nodes[..7].iter().all(|n| n["state"] == "up"), "{s}");
    assert!(nodes[0]["shards"].as_u64().unwrap_or(0) > 0, "{s}");
    assert!(s["ledger"]["entries"].as_u64().unwrap_or(0) >= 5, "{s}");
    // The one gateway integrates the ledger, and says how fresh it is.
    assert_eq!(s["ledger"]["integrating"], true, "{s}");
    assert!(
        s["ledger"]["checkpoint_age_s"]
            .as_f64()
            .is_some_and(|a| (0.0..30.0).contains(&a)),
        "{s}"
    );
    let table = c.cli(&["status"])?;
    let table = String::from_utf8(table.stdout)?;
    println!("custodia status after killing node 7:\n{table}");
    assert!(table.contains("nodes: 7 of 8 up"), "{table}");

    // A real Prometheus scraping the gateway and every node.
    let cluster: toml::Value =
        toml::from_str(&std::fs::read_to_string(c.data_dir().join("cluster.toml"))?)?;
    let gateway_target = c
        .metrics
        .trim_start_matches("http://")
        .trim_end_matches("/metrics")
        .to_owned();
    let node_targets: Vec<String> = cluster["nodes"]
        .as_array()
        .context("nodes")?
        .iter()
        .filter_map(|n| n.get("metrics_listen")?.as_str().map(str::to_owned))
        .collect();
    assert_eq!(node_targets.len(), 8, "every node exports metrics");
    let pdir = c.data_dir().join("prometheus");
    std::fs::create_dir_all(&pdir)?;
    let quote = |v: &[String]| {
        v.iter()
            .map(|t| format!("\"{t}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
         rule_files:\n  - {rules}\n\
         scrape_configs:\n\
         \x20 - job_name: custodia-gateway\n    static_configs:\n      - targets: [{gw}]\n\
         \x20 - job_name: custodia-nodes\n    static_configs:\n      - targets: [{nodes}]\n",
        rules = repo().join("grafana/prometheus/alerts.yml").display(),
        gw = quote(&[gateway_target]),
        nodes = quote(&node_targets),
    );
    let config_file = pdir.join("prometheus.yml");
    std::fs::write(&config_file, config)?;
    promtool(&["check", "config", &config_file.display().to_string()])?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let log = std::fs::File::create(pdir.join("prometheus.log"))?;
    let _prometheus = Killed(
        Command::new("prometheus")
            .arg(format!("--config.file={}", config_file.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                pdir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting prometheus (Debian `prometheus`; .ci/run installs it)")?,
    );
    let prom = format!("http://127.0.0.1:{port}");
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into();
    // Eight processes up (node 7 is dead: its target is down).
    let scraping = custodia_tests::eventually(60, || {
        scalar(&agent, &prom, "count(up)").is_ok_and(|n| n == 9.0)
            && scalar(&agent, &prom, "count(up == 1)").is_ok_and(|n| n == 8.0)
    });
    assert!(
        scraping,
        "Prometheus did not scrape the gateway and 7 nodes"
    );
    assert_eq!(scalar(&agent, &prom, "count(up == 0)")?, 1.0);

    // More traffic while scraped, so rates are not all zero.
    for i in 0..3u64 {
        c.file(&bytes(30_000, 100 + i))?;
    }
    c.read(&filed[2].0)?;
    // Filings whose client leaves once its body is sent, while the
    // gateway stores it and waits for its receipt: hyper drops the
    // handler, and the request is counted all the same, as a 499. (One
    // cut off mid-body is answered 400, `BodyIncomplete`, and counted so.)
    for i in 0..3u64 {
        file_and_leave(&c, &bytes(30_000, 200 + i))?;
    }

    let queries = panel_queries()?;
    assert!(queries.len() >= 30, "{} panel queries", queries.len());
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut missing: Vec<&(String, String, String)> = queries.iter().collect();
    while !missing.is_empty() && Instant::now() < deadline {
        // Data is a number: `histogram_quantile` over no traffic is NaN.
        let has_data = |r: Vec<Value>| {
            r.iter().any(|s| {
                s["value"][1]
                    .as_str()
                    .and_then(|v| v.parse::<f64>().ok())
                    .is_some_and(f64::is_finite)
            })
        };
        missing.retain(|(_, _, expr)| query(&agent, &prom, expr).map_or(true, |r| !has_data(r)));
        if !missing.is_empty() {
            std::thread::sleep(Duration::from_secs(1));
        }
    }
    for (board, panel, expr) in &missing {
        eprintln!("no data: {board} / {panel}: {expr}");
    }
    assert!(
        missing.is_empty(),
        "{} panel queries returned no data",
        missing.len()
    );

    // And the data mean what they say.
    assert_eq!(
        scalar(
            &agent,
            &prom,
            "count(max by (node) (custodia_cluster_node_up) == 1)"
        )?,
        7.0
    );
    assert!(
        scalar(
            &agent,
            &prom,
            "sum(custodia_ledger_entries_integrated_total)"
        )? >= 8.0,
        "the ledger's growth is counted"
    );
    // Degraded at some scrape (repair may have healed it since).
    assert!(
        scalar(
            &agent,
            &prom,
            "max(max_over_time(custodia_degraded_stripes[10m]))"
        )? >= 1.0
    );
    // Counters bumped by the traffic above: the panels may all have had
    // data before the scrape that follows the last filing (scrapes are 1 s
    // apart), so wait for that scrape rather than read the one before it.
    let at_least = |expr: &str, want: f64| {
        let mut got = None;
        let ok = custodia_tests::eventually(20, || {
            got = scalar(&agent, &prom, expr).ok();
            got.is_some_and(|v| v >= want)
        });
        assert!(ok, "{expr}: {got:?}, want at least {want}");
    };
    at_least("sum(custodia_node_corrupt_shards_total)", 1.0);
    at_least("sum(custodia_stripes_reconstructed_total)", 1.0);
    at_least("sum(custodia_filings_total)", 8.0);
    // Counters a panel shows that this traffic must have moved (a panel
    // over a counter registered at 0 has "data" whether or not anything
    // counts into it).
    at_least("sum(custodia_ingest_bytes_total)", 8.0 * 30_000.0);
    at_least("sum(custodia_read_bytes_total)", 30_000.0);
    at_least("sum(custodia_shards_written_total)", 8.0 * 6.0);
    at_least("sum(custodia_shards_read_total)", 4.0);
    at_least("sum(custodia_shards_damaged_total)", 1.0);
    at_least(
        r#"sum(custodia_node_requests_total{op="put",result="ok"})"#,
        8.0 * 6.0,
    );
    at_least(
        "sum(custodia_node_shard_bytes_written_total)",
        8.0 * 30_000.0,
    );
    // The rules evaluate against the live series: the dead node's alert is
    // pending (its `for:` is 2 minutes), and under its own label.
    at_least(
        r#"count(ALERTS{alertname="CustodiaNodeDown",node="7",alertstate=~"pending|firing"})"#,
        1.0,
    );
    at_least("max(custodia_ledger_entries)", 8.0);
    at_least(
        r#"sum(custodia_http_requests_total{api="s3",route="PUT",status="200"})"#,
        2.0,
    );
    let cosigned = custodia_tests::eventually(20, || {
        scalar(
            &agent,
            &prom,
            "max(custodia_ledger_checkpoint_cosignatures)",
        )
        .is_ok_and(|v| v >= 1.0)
    });
    assert!(cosigned, "the witness's cosignatures are counted");
    let age = scalar(
        &agent,
        &prom,
        "time() - max(custodia_ledger_integrated_timestamp_seconds > 0)",
    )?;
    assert!(age < 30.0, "checkpoint age {age} s on a healthy ledger");
    // The S3 records written above reached the archive (drained each
    // second): the journal's age is small, and known.
    let mut journal_age = None;
    let synced = custodia_tests::eventually(20, || {
        journal_age = scalar(
            &agent,
            &prom,
            "time() - max(custodia_s3_journal_synced_timestamp_seconds > 0)",
        )
        .ok();
        journal_age.is_some_and(|a| a < 30.0)
    });
    assert!(synced, "S3 journal age {journal_age:?} s after S3 traffic");
    // The filings their clients left are counted, as 499s.
    at_least(
        r#"sum(custodia_http_requests_total{api="evidence",status="499"})"#,
        1.0,
    );

    // Every metric a dashboard or an alert rule names exists: a metric
    // renamed in the code and not in grafana/ would leave a panel empty
    // and a rule silent for good.
    let rules = rule_queries(&agent, &prom)?;
    assert!(rules.len() >= 20, "{} rules loaded", rules.len());
    let names = metric_names(
        queries
            .iter()
            .map(|(_, _, e)| e.as_str())
            .chain(rules.iter().map(String::as_str)),
    );
    assert!(names.len() >= 40, "{} metric names: {names:?}", names.len());
    for (name, why) in CONDITIONAL_METRICS {
        assert!(
            names.contains(*name),
            "{name} is no longer used in grafana/: drop it from CONDITIONAL_METRICS ({why})"
        );
    }
    let mut absent: Vec<&String> = names
        .iter()
        .filter(|n| !CONDITIONAL_METRICS.iter().any(|(c, _)| c == n))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !absent.is_empty() && Instant::now() < deadline {
        absent.retain(|n| {
            query(&agent, &prom, &format!("count({{__name__=\"{n}\"}})"))
                .map_or(true, |r| r.is_empty())
        });
        if !absent.is_empty() {
            std::thread::sleep(Duration::from_secs(1));
        }
    }
    assert!(
        absent.is_empty(),
        "metrics named in grafana/ that no process exports: {absent:?}"
    );
    // And every label value they select on exists: a reason or a result
    // renamed in the code would leave a rule silent for good, its metric
    // still there.
    let selectors = equality_selectors(
        queries
            .iter()
            .map(|(_, _, e)| e.as_str())
            .chain(rules.iter().map(String::as_str)),
    );
    assert!(selectors.len() >= 5, "{selectors:?}");
    let unmatched: Vec<&String> = selectors
        .iter()
        .filter(|sel| !CONDITIONAL_SELECTORS.iter().any(|(c, _)| c == sel))
        .filter(|sel| query(&agent, &prom, &format!("count({sel})")).map_or(true, |r| r.is_empty()))
        .collect();
    assert!(
        unmatched.is_empty(),
        "label values grafana/ selects on that no series has: {unmatched:?}"
    );
    drop(witness);
    Ok(())
}
