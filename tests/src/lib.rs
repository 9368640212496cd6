//! A real Custodia cluster for integration tests: `custodia init` in a temporary
//! directory, then one `custodia node` process per node and a `custodia gateway`
//! process, all on 127.0.0.1, killed for real by the tests.
//!
//! The binary is built on first use into the test's own target directory
//! (see [`custodia_bin`]) or taken from `$CUSTODIA_BIN`.

use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::fs;
use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Runs `custodia ARGS --data-dir DIR` (no cluster of this crate's around
/// it: `init`, `node add` on a data dir of a test's own).
pub fn custodia_at(dir: &Path, args: &[&str]) -> Result<std::process::Output> {
    Ok(Command::new(custodia_bin())
        .args(args)
        .arg("--data-dir")
        .arg(dir)
        .env_remove("CUSTODIA_API")
        .output()?)
}

/// The `custodia` binary under test.
///
/// Unless `$CUSTODIA_BIN` names one, this builds it once per test process with
/// the cargo that runs the tests (a no-op when it is up to date), so a test can
/// never run against a stale binary, and `cargo test --workspace` on a clean
/// checkout needs no separate build step.
pub fn custodia_bin() -> PathBuf {
    static BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("CUSTODIA_BIN") {
            return PathBuf::from(p);
        }
        let exe = std::env::current_exe().expect("test executable path");
        // target/<profile>/deps/<test>-<hash> -> target/<profile>
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("target directory")
            .to_path_buf();
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut build = Command::new(cargo);
        build.args(["build", "--quiet", "-p", "ops", "--bin", "custodia"]);
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            build.arg("--release");
        }
        let status = build
            .status()
            .expect("running cargo build for the custodia binary");
        assert!(status.success(), "cargo build -p ops failed");
        let bin = profile_dir.join("custodia");
        assert!(
            bin.exists(),
            "{} not found after building it",
            bin.display()
        );
        bin
    })
    .clone()
}

fn free_tcp_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// How to shape a test cluster.
#[derive(Clone, Debug)]
pub struct Shape {
    pub nodes: u32,
    pub k: u8,
    pub m: u8,
    pub shard_size: u32,
    pub min_write_shards: Option<u8>,
    /// The nodes' `small_shard_bytes`. Tests damage and remove shard files
    /// one at a time, so the default keeps one file per shard (`Some(0)`);
    /// `None` leaves the product default (small shards packed in segments).
    pub small_shard_bytes: Option<u32>,
    /// Serve S3 over HTTPS (`custodia init --s3-tls`); clients trust
    /// [`TestCluster::ca_cert`].
    pub s3_tls: bool,
    /// Serve the evidence API over HTTPS (`custodia init --api-tls`); the
    /// harness's client trusts [`TestCluster::ca_cert`].
    pub api_tls: bool,
}

impl Default for Shape {
    fn default() -> Self {
        Shape {
            nodes: 8,
            k: 4,
            m: 2,
            shard_size: 4096,
            min_write_shards: None,
            small_shard_bytes: Some(0),
            s3_tls: false,
            api_tls: false,
        }
    }
}

pub struct TestCluster {
    pub dir: tempfile::TempDir,
    pub shape: Shape,
    pub api: String,
    /// The S3 API's endpoint URL.
    pub s3: String,
    /// The gateway's Prometheus endpoint (`http://127.0.0.1:PORT/metrics`).
    pub metrics: String,
    pub token: String,
    nodes: Vec<Option<Child>>,
    gateway: Option<Child>,
    agent: ureq::Agent,
}

/// An HTTP answer, whatever its status.
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Answer {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

impl TestCluster {
    /// Starts a cluster on fresh temporary dirs and ports. Ports are picked
    /// free at `init` and released until the processes bind them, so a test
    /// starting beside this one can take one first; the gateway then
    /// (rightly) refuses the node that answers with another id. Such a start
    /// is torn down and retried on new ports, at most three times.
    pub fn start(shape: Shape) -> Result<Self> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match Self::start_once(shape.clone()) {
                Err(e) if attempt < 3 && e.to_string().contains("not healthy") => {
                    eprintln!("cluster start attempt {attempt} failed (port race?), retrying: {e}");
                }
                r => return r,
            }
        }
    }

    fn start_once(shape: Shape) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let api_port = free_tcp_port();
        let s3_port = free_tcp_port();
        let metrics_port = free_tcp_port();
        let mut init = Command::new(custodia_bin());
        init.arg("init")
            .arg("--data-dir")
            .arg(dir.path())
            .args(["--nodes", &shape.nodes.to_string()])
            .args(["--k", &shape.k.to_string(), "--m", &shape.m.to_string()])
            .args(["--shard-size", &shape.shard_size.to_string()])
            .args(["--api", &format!("127.0.0.1:{api_port}")])
            .args(["--s3", &format!("127.0.0.1:{s3_port}")])
            .args(["--node-base-port", "0"])
            .args(["--metrics", &format!("127.0.0.1:{metrics_port}")])
            .args(["--node-metrics-base-port", "0"]);
        if let Some(w) = shape.min_write_shards {
            init.args(["--min-write-shards", &w.to_string()]);
        }
        if shape.s3_tls {
            init.arg("--s3-tls");
        }
        if shape.api_tls {
            init.arg("--api-tls");
        }
        let out = init.output()?;
        if !out.status.success() {
            bail!(
                "custodia init failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let token = fs::read_to_string(dir.path().join("admin.token"))?
            .trim()
            .to_string();
        let mut tls = ureq::tls::TlsConfig::builder()
            .provider(ureq::tls::TlsProvider::Rustls)
            .unversioned_rustls_crypto_provider(std::sync::Arc::new(
                rustls::crypto::ring::default_provider(),
            ));
        if shape.api_tls {
            let pem = fs::read(dir.path().join("tls").join("ca.pem"))?;
            let ca = ureq::tls::parse_pem(&pem)
                .filter_map(|item| match item {
                    Ok(ureq::tls::PemItem::Certificate(c)) => Some(c),
                    _ => None,
                })
                .collect::<Vec<_>>();
            tls = tls.root_certs(ureq::tls::RootCerts::Specific(std::sync::Arc::new(ca)));
        }
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(300)))
            .tls_config(tls.build())
            .build()
            .into();
        let mut c = TestCluster {
            dir,
            api: format!(
                "{}://127.0.0.1:{api_port}",
                if shape.api_tls { "https" } else { "http" }
            ),
            s3: format!(
                "{}://127.0.0.1:{s3_port}",
                if shape.s3_tls { "https" } else { "http" }
            ),
            metrics: format!("http://127.0.0.1:{metrics_port}/metrics"),
            token,
            nodes: (0..shape.nodes).map(|_| None).collect(),
            gateway: None,
            shape,
            agent,
        };
        if let Some(bytes) = c.shape.small_shard_bytes {
            c.write_node_settings(
                None,
                &[("small_shard_bytes", toml::Value::Integer(bytes.into()))],
            )?;
        }
        for i in 0..c.shape.nodes {
            c.start_node(i)?;
        }
        c.start_gateway()?;
        c.wait_healthy(c.shape.nodes as u64)?;
        Ok(c)
    }

    /// Restarts the gateway with `settings` (top-level keys of its section
    /// of cluster.toml) changed.
    pub fn set_gateway(&mut self, settings: &[(&str, toml::Value)]) -> Result<()> {
        self.edit_gateway(|g| {
            for (k, v) in settings {
                g.insert((*k).to_owned(), v.clone());
            }
            Ok(())
        })
    }

    /// Restarts the gateway with its `[gateway]` table of cluster.toml
    /// changed by `edit`, and waits until it sees every node.
    pub fn edit_gateway(
        &mut self,
        edit: impl FnOnce(&mut toml::map::Map<String, toml::Value>) -> Result<()>,
    ) -> Result<()> {
        self.kill_gateway();
        let file = self.data_dir().join("cluster.toml");
        let mut cluster: toml::Value = toml::from_str(&fs::read_to_string(&file)?)?;
        let gateway = cluster
            .get_mut("gateway")
            .and_then(|g| g.as_table_mut())
            .context("gateway")?;
        edit(gateway)?;
        fs::write(&file, toml::to_string(&cluster)?)?;
        self.start_gateway()?;
        self.wait_healthy(self.shape.nodes as u64)
    }

    /// Restarts every node with `settings` (keys of each `[[nodes]]` table
    /// of cluster.toml) changed, waiting for each to serve.
    pub fn set_nodes(&mut self, settings: &[(&str, toml::Value)]) -> Result<()> {
        self.write_node_settings(None, settings)?;
        for i in 0..self.shape.nodes {
            self.kill_node(i);
            self.start_node_and_wait(i)?;
        }
        Ok(())
    }

    /// Restarts node `i` alone with `settings` changed in its `[[nodes]]`
    /// table, waiting for it to serve.
    pub fn set_node(&mut self, i: u32, settings: &[(&str, toml::Value)]) -> Result<()> {
        self.write_node_settings(Some(i), settings)?;
        self.kill_node(i);
        self.start_node_and_wait(i)
    }

    /// Changes `settings` in the `[[nodes]]` table of node `only`, or of
    /// every node (taking effect when each node next starts).
    fn write_node_settings(
        &self,
        only: Option<u32>,
        settings: &[(&str, toml::Value)],
    ) -> Result<()> {
        let file = self.data_dir().join("cluster.toml");
        let mut cluster: toml::Value = toml::from_str(&fs::read_to_string(&file)?)?;
        for node in cluster
            .get_mut("nodes")
            .and_then(|n| n.as_array_mut())
            .context("nodes")?
            .iter_mut()
            .filter(|n| {
                only.is_none_or(|i| n.get("id").and_then(|v| v.as_integer()) == Some(i.into()))
            })
        {
            let table = node.as_table_mut().context("node table")?;
            for (k, v) in settings {
                table.insert((*k).to_owned(), v.clone());
            }
        }
        fs::write(&file, toml::to_string(&cluster)?)?;
        Ok(())
    }

    /// Node `i`'s QUIC address (`IP:PORT`), as the gateway reaches it.
    pub fn node_addr(&self, i: u32) -> Result<String> {
        let file = self.data_dir().join("cluster.toml");
        let cluster: toml::Value = toml::from_str(&fs::read_to_string(&file)?)?;
        Ok(cluster["nodes"][i as usize]["listen"]
            .as_str()
            .context("listen")?
            .to_owned())
    }

    /// Node `i`'s Prometheus endpoint (`http://ADDR/metrics`).
    pub fn node_metrics_url(&self, i: u32) -> Result<String> {
        let file = self.data_dir().join("cluster.toml");
        let cluster: toml::Value = toml::from_str(&fs::read_to_string(&file)?)?;
        let addr = cluster["nodes"][i as usize]["metrics_listen"]
            .as_str()
            .context("metrics_listen")?
            .to_owned();
        Ok(format!("http://{addr}/metrics"))
    }

    /// A Prometheus text page, as fetched.
    pub fn metrics_page(&self, url: &str) -> Result<String> {
        Ok(self.agent.get(url).call()?.body_mut().read_to_string()?)
    }

    /// An upload of `data` begun over a connection of its own, its first
    /// half sent, returned once `shards` more shards than before are on the
    /// nodes (the upload is then under way); [`finish_upload`] sends the rest.
    pub fn half_upload(&self, data: &[u8], shards: f64) -> Result<std::net::TcpStream> {
        use std::io::Write;
        let written = self.metric(&self.metrics, "custodia_shards_written_total")?;
        let mut s = std::net::TcpStream::connect(self.api.trim_start_matches("http://"))?;
        write!(
            s,
            "POST /v1/evidence HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            self.token,
            data.len()
        )?;
        s.set_read_timeout(Some(Duration::from_secs(60)))?;
        s.write_all(&data[..data.len() / 2])?;
        s.flush()?;
        let started = eventually(20, || {
            self.metric(&self.metrics, "custodia_shards_written_total")
                .unwrap_or(0.0)
                >= written + shards
        });
        if !started {
            bail!("the upload's first half never reached the nodes");
        }
        Ok(s)
    }

    /// One sample of a metric from a Prometheus text page: the first line
    /// whose name is `series`, or whose labels begin with those `series`
    /// gives (`name{a="x",` matches `name{a="x",b="y"}`).
    pub fn metric(&self, url: &str, series: &str) -> Result<f64> {
        self.metrics_page(url)?
            .lines()
            .filter(|l| !l.starts_with('#'))
            .find_map(|l| {
                let (name, value) = l.rsplit_once(' ')?;
                (name == series
                    || name.starts_with(&format!("{series}{{"))
                    || (series.ends_with(',') && name.starts_with(series)))
                .then(|| value.parse().ok())
                .flatten()
            })
            .with_context(|| format!("{series} not in {url}"))
    }

    /// The sum of one series over the metrics pages of `nodes` (a node
    /// whose page lacks it, or cannot be read, adds nothing).
    pub fn node_metric_sum(&self, nodes: impl Iterator<Item = u32>, series: &str) -> f64 {
        nodes
            .map(|i| {
                self.node_metrics_url(i)
                    .and_then(|u| self.metric(&u, series))
                    .unwrap_or(0.0)
            })
            .sum()
    }

    /// Restarts the gateway with its `[gateway.ledger]` table changed.
    pub fn edit_ledger(
        &mut self,
        edit: impl FnOnce(&mut toml::map::Map<String, toml::Value>),
    ) -> Result<()> {
        self.edit_gateway(|g| {
            let ledger = g
                .get_mut("ledger")
                .and_then(|l| l.as_table_mut())
                .context("gateway.ledger")?;
            edit(ledger);
            Ok(())
        })
    }

    /// Restarts the gateway with these witnesses (url, verifier key) in its
    /// ledger configuration, asked every `interval_ms`.
    pub fn use_witnesses(&mut self, witnesses: &[(&str, &str)], interval_ms: i64) -> Result<()> {
        self.edit_ledger(|ledger| {
            ledger.insert(
                "witness_interval_ms".into(),
                toml::Value::Integer(interval_ms),
            );
            let entries = witnesses
                .iter()
                .map(|(url, key)| {
                    let mut entry = toml::map::Map::new();
                    entry.insert("url".into(), toml::Value::String((*url).to_owned()));
                    entry.insert("key".into(), toml::Value::String((*key).to_owned()));
                    toml::Value::Table(entry)
                })
                .collect();
            ledger.insert("witnesses".into(), toml::Value::Array(entries));
        })
    }

    /// A SigV4-signed request with curl: (lower-cased headers, body).
    pub fn s3_curl(&self, method: &str, url: &str, extra: &[&str]) -> Result<(String, Vec<u8>)> {
        let body = self.data_dir().join("curl-body");
        // A request that says what its payload is keeps its own header.
        let payload = if extra
            .iter()
            .any(|a| a.to_ascii_lowercase().starts_with("x-amz-content-sha256:"))
        {
            vec![]
        } else {
            vec!["-H", "x-amz-content-sha256: UNSIGNED-PAYLOAD"]
        };
        let creds = std::fs::read_to_string(self.data_dir().join("s3.credentials"))?;
        let field = |name: &str| profile_field(&creds, name);
        // `-X HEAD` would wait for a body that never comes; `-I` does not.
        let verb = if method == "HEAD" {
            vec!["-I"]
        } else {
            vec!["-X", method]
        };
        // A transfer that fails before any body leaves the file as it was:
        // an earlier call's body must not pass for this one's.
        match std::fs::remove_file(&body) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
        let out = Command::new("curl")
            .args(["-s", "-S", "--max-time", "30", "-D", "-", "-o"])
            .arg(&body)
            .args(verb)
            .args(extra)
            .args(["--aws-sigv4", "aws:amz:us-east-1:s3"])
            .args([
                "--user",
                &format!(
                    "{}:{}",
                    field("aws_access_key_id"),
                    field("aws_secret_access_key")
                ),
            ])
            .args(payload)
            .arg(url)
            .output()
            .context("running curl (with SigV4 support)")?;
        if !out.status.success() {
            bail!(
                "curl {method} {url} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        // No body file: the answer had none (a HEAD, a 204).
        let got = match std::fs::read(&body) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e.into()),
        };
        Ok((String::from_utf8_lossy(&out.stdout).to_lowercase(), got))
    }

    /// Begins an S3 multipart upload of `bucket/key` ([`Self::s3_curl`]):
    /// its upload id.
    pub fn s3_create_upload(&self, bucket: &str, key: &str) -> Result<String> {
        let (h, body) = self.s3_curl(
            "POST",
            &format!("{}/{bucket}/{key}?uploads=", self.s3),
            &["--data-binary", ""],
        )?;
        let body = String::from_utf8_lossy(&body);
        if !h.starts_with("http/1.1 200") {
            bail!("CreateMultipartUpload: {h}{body}");
        }
        Ok(body
            .split("<UploadId>")
            .nth(1)
            .and_then(|r| r.split("</UploadId>").next())
            .context("no upload id")?
            .to_owned())
    }

    /// Completes `upload` of `bucket/key` with `parts` (number, ETag as S3
    /// gave it): the lower-cased head and the body, whatever the status.
    pub fn s3_complete(
        &self,
        bucket: &str,
        key: &str,
        upload: &str,
        parts: &[(u32, &str)],
    ) -> Result<(String, String)> {
        let listed: String = parts
            .iter()
            .map(|(n, etag)| {
                format!("<Part><PartNumber>{n}</PartNumber><ETag>{etag}</ETag></Part>")
            })
            .collect();
        let xml = format!("<CompleteMultipartUpload>{listed}</CompleteMultipartUpload>");
        let (h, body) = self.s3_curl(
            "POST",
            &format!("{}/{bucket}/{key}?uploadId={upload}", self.s3),
            &["--data-binary", &xml, "-H", "content-type: application/xml"],
        )?;
        Ok((h, String::from_utf8_lossy(&body).into_owned()))
    }

    /// Runs `custodia ARGS` as a client of this cluster's evidence API, with
    /// the admin token (`status`, `repair`, ...).
    pub fn cli(&self, args: &[&str]) -> Result<std::process::Output> {
        Ok(Command::new(custodia_bin())
            .args(args)
            .args(["--api", &self.api, "--token-file"])
            .arg(self.dir.path().join("admin.token"))
            .output()?)
    }

    /// Runs `custodia ARGS` against this cluster's data dir (for commands
    /// that open the index, stop the gateway first).
    pub fn custodia(&self, args: &[&str]) -> Result<std::process::Output> {
        custodia_at(self.dir.path(), args)
    }

    /// A new expunger credential, issued on the index host (the gateway
    /// must be stopped, as the CLI requires).
    pub fn mint_expunger(&self) -> Result<String> {
        let out = self.custodia(&["key", "create", "--tenant", "admin", "--role", "expunger"])?;
        String::from_utf8(out.stdout)?
            .lines()
            .find_map(|l| l.strip_prefix("custodia_token = "))
            .map(str::to_owned)
            .context("no expunger token")
    }

    /// The cluster CA certificate (what an HTTPS S3 client trusts).
    pub fn ca_cert(&self) -> PathBuf {
        self.data_dir().join("tls").join("ca.pem")
    }

    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn node_dir(&self, i: u32) -> PathBuf {
        self.dir.path().join("nodes").join(format!("n{i}"))
    }

    fn log(&self, name: &str) -> Result<fs::File> {
        Ok(fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(name))?)
    }

    pub fn start_node(&mut self, i: u32) -> Result<()> {
        self.start_node_under(i, &[])
    }

    /// Starts node `i` under a wrapper command (`faketime -f +30s`, ...).
    pub fn start_node_under(&mut self, i: u32, wrapper: &[&str]) -> Result<()> {
        let log = self.log(&format!("node-{i}.log"))?;
        let child = custodia_under(wrapper)
            .arg("node")
            .arg("--cluster")
            .arg(self.dir.path().join("cluster.toml"))
            .args(["--id", &i.to_string()])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        let i = i as usize;
        if self.nodes.len() <= i {
            // A node added to the cluster after it started.
            self.nodes.resize_with(i + 1, || None);
        }
        self.nodes[i] = Some(child);
        Ok(())
    }

    /// Starts node `i` and waits until it says it is serving (for commands
    /// that talk to nodes without a gateway's patience).
    pub fn start_node_and_wait(&mut self, i: u32) -> Result<()> {
        let log = self.dir.path().join(format!("node-{i}.log"));
        let running = || {
            fs::read_to_string(&log)
                .unwrap_or_default()
                .matches("storage node running")
                .count()
        };
        let before = running();
        self.start_node(i)?;
        if !eventually(20, || running() > before) {
            bail!("node {i} did not start within 20 s");
        }
        Ok(())
    }

    /// How node `i`'s process ended, once it has (`None` while it runs, or
    /// if it was not started).
    pub fn node_exit(&mut self, i: u32) -> Option<std::process::ExitStatus> {
        self.nodes
            .get_mut(i as usize)
            .and_then(Option::as_mut)
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// SIGKILL, no goodbye.
    pub fn kill_node(&mut self, i: u32) {
        if let Some(mut c) = self.nodes.get_mut(i as usize).and_then(Option::take) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn start_gateway(&mut self) -> Result<()> {
        self.start_gateway_under(&[])
    }

    /// Starts the gateway under a wrapper command (see [`faketime`]).
    pub fn start_gateway_under(&mut self, wrapper: &[&str]) -> Result<()> {
        let log = self.log("gateway.log")?;
        let child = custodia_under(wrapper)
            .arg("gateway")
            .arg("--data-dir")
            .arg(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        self.gateway = Some(child);
        Ok(())
    }

    /// Sends the gateway process `signal` (`"TERM"`, `"INT"`, ...) and
    /// returns at once.
    pub fn signal_gateway(&self, signal: &str) -> Result<()> {
        let child = self.gateway.as_ref().context("no gateway running")?;
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &child.id().to_string()])
            .status()?;
        anyhow::ensure!(status.success(), "kill -{signal} failed: {status}");
        Ok(())
    }

    /// How the gateway process ended, once it has (`None` while it runs).
    pub fn gateway_exit(&mut self) -> Option<std::process::ExitStatus> {
        self.gateway
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// SIGTERM (a clean stop), waiting for the process to go.
    pub fn stop_gateway(&mut self) {
        if let Some(mut c) = self.gateway.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn kill_gateway(&mut self) {
        if let Some(mut c) = self.gateway.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// How many nodes the gateway counts healthy now (`None`: it did not
    /// answer).
    pub fn healthy_nodes(&self) -> Option<u64> {
        self.get_with(&self.token, "/healthz", &[])
            .ok()
            .and_then(|a| a.json()["nodes_healthy"].as_u64())
    }

    /// Waits until the gateway answers and sees at least `nodes` healthy nodes.
    pub fn wait_healthy(&self, nodes: u64) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(mut r) = self.agent.get(format!("{}/healthz", self.api)).call() {
                if let Ok(v) = r.body_mut().read_json::<Value>() {
                    if v["nodes_healthy"].as_u64().unwrap_or(0) >= nodes {
                        return Ok(());
                    }
                }
            }
            if Instant::now() > deadline {
                let log =
                    fs::read_to_string(self.dir.path().join("gateway.log")).unwrap_or_default();
                bail!("cluster not healthy within 30 s; gateway log:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn answer(resp: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> Result<Answer> {
        let mut resp = resp?;
        let status = resp.status().as_u16();
        let headers = resp
            .headers()
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
            .collect();
        let mut body = Vec::new();
        resp.body_mut().as_reader().read_to_end(&mut body)?;
        Ok(Answer {
            status,
            headers,
            body,
        })
    }

    /// POST /v1/evidence with the admin token and extra headers.
    pub fn file_with(&self, token: &str, bytes: &[u8], headers: &[(&str, &str)]) -> Result<Answer> {
        self.file_query(token, "", bytes, headers)
    }

    /// POST /v1/evidence?`query` (none when empty), as [`Self::file_with`].
    pub fn file_query(
        &self,
        token: &str,
        query: &str,
        bytes: &[u8],
        headers: &[(&str, &str)],
    ) -> Result<Answer> {
        let url = match query {
            "" => format!("{}/v1/evidence", self.api),
            q => format!("{}/v1/evidence?{q}", self.api),
        };
        let mut req = self
            .agent
            .post(url)
            .header("authorization", format!("Bearer {token}"));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        Self::answer(req.send(bytes))
    }

    /// Files `bytes` and insists on 201; returns the JSON.
    pub fn file(&self, bytes: &[u8]) -> Result<Value> {
        let a = self.file_with(&self.token, bytes, &[])?;
        if a.status != 201 {
            bail!(
                "filing answered {}: {}",
                a.status,
                String::from_utf8_lossy(&a.body)
            );
        }
        Ok(a.json())
    }

    /// Files `bytes` as the admin, like [`TestCluster::file`]; its id.
    pub fn file_id(&self, bytes: &[u8]) -> Result<String> {
        Ok(self.file(bytes)?["id"]
            .as_str()
            .unwrap_or_default()
            .to_owned())
    }

    pub fn get_with(&self, token: &str, path: &str, headers: &[(&str, &str)]) -> Result<Answer> {
        let mut req = self
            .agent
            .get(format!("{}{path}", self.api))
            .header("authorization", format!("Bearer {token}"));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        Self::answer(req.call())
    }

    /// POST `body` as JSON to `path` with `token`; any status.
    pub fn post_json(&self, token: &str, path: &str, body: &Value) -> Result<Answer> {
        let req = self
            .agent
            .post(format!("{}{path}", self.api))
            .header("authorization", format!("Bearer {token}"));
        Self::answer(req.send_json(body))
    }

    /// GET with `authorization` exactly as given.
    pub fn get_with_auth(&self, authorization: &str, path: &str) -> Result<Answer> {
        let req = self
            .agent
            .get(format!("{}{path}", self.api))
            .header("authorization", authorization);
        Self::answer(req.call())
    }

    pub fn head_with(&self, token: &str, path: &str) -> Result<Answer> {
        let req = self
            .agent
            .head(format!("{}{path}", self.api))
            .header("authorization", format!("Bearer {token}"));
        Self::answer(req.call())
    }

    /// GET /v1/evidence/{id}, insisting on 200.
    pub fn read(&self, id: &str) -> Result<Vec<u8>> {
        let a = self.get_with(&self.token, &format!("/v1/evidence/{id}"), &[])?;
        if a.status != 200 {
            bail!(
                "read answered {}: {}",
                a.status,
                String::from_utf8_lossy(&a.body)
            );
        }
        Ok(a.body)
    }

    /// GET with `Range: bytes=a-b` (inclusive), insisting on 206.
    pub fn read_range(&self, id: &str, first: u64, last: u64) -> Result<Vec<u8>> {
        let range = format!("bytes={first}-{last}");
        let a = self.get_with(
            &self.token,
            &format!("/v1/evidence/{id}"),
            &[("range", &range)],
        )?;
        if a.status != 206 {
            bail!(
                "range read answered {}: {}",
                a.status,
                String::from_utf8_lossy(&a.body)
            );
        }
        Ok(a.body)
    }

    /// Every shard file on node `i`.
    pub fn shard_files(&self, i: u32) -> Vec<PathBuf> {
        let mut out = Vec::new();
        let mut stack = vec![self.node_dir(i).join("shards")];
        while let Some(d) = stack.pop() {
            for e in fs::read_dir(&d).into_iter().flatten().flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    out.push(p);
                }
            }
        }
        out.sort();
        out
    }

    /// Whether node `i` holds any shard: a shard file, or a non-empty
    /// segment (a node added by `custodia node add` packs small shards).
    pub fn holds_shards(&self, i: u32) -> bool {
        let segments = fs::read_dir(self.node_dir(i).join("segments"))
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| e.metadata().is_ok_and(|m| m.len() > 0));
        segments || !self.shard_files(i).is_empty()
    }

    /// Every file under any node's data directory that holds `needle`.
    pub fn node_files_holding(&self, needle: &[u8]) -> Vec<PathBuf> {
        let mut found = Vec::new();
        let mut stack: Vec<PathBuf> = (0..self.shape.nodes).map(|i| self.node_dir(i)).collect();
        while let Some(d) = stack.pop() {
            for e in fs::read_dir(&d).into_iter().flatten().flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else if fs::read(&p).is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle)) {
                    found.push(p);
                }
            }
        }
        found
    }

    /// The node holding `needle` in one of its files (the first found).
    pub fn node_holding(&self, needle: &[u8]) -> Option<u32> {
        let file = self.node_files_holding(needle).into_iter().next()?;
        (0..self.shape.nodes).find(|&i| file.starts_with(self.node_dir(i)))
    }

    /// The log's verifier key (`DATA_DIR/ledger.vkey`), as receipts are
    /// verified against.
    pub fn log_key(&self) -> Result<String> {
        Ok(fs::read_to_string(self.dir.path().join("ledger.vkey"))?
            .trim()
            .to_owned())
    }

    pub fn all_shard_files(&self) -> Vec<PathBuf> {
        (0..self.shape.nodes)
            .flat_map(|i| self.shard_files(i))
            .collect()
    }

    /// The process id of the gateway (for tests that signal it).
    pub fn gateway_pid(&self) -> Option<u32> {
        self.gateway.as_ref().map(Child::id)
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        self.kill_gateway();
        for i in 0..self.nodes.len() as u32 {
            self.kill_node(i);
        }
    }
}

/// The `custodia` binary as a command, run by `wrapper` (a program and its
/// arguments, e.g. [`faketime`]'s) if there is one.
fn custodia_under(wrapper: &[&str]) -> Command {
    match wrapper.split_first() {
        None => Command::new(custodia_bin()),
        Some((program, args)) => {
            let mut c = Command::new(program);
            c.args(args).arg(custodia_bin());
            c
        }
    }
}

/// A wrapper (for `start_node_under`, `start_gateway_under`,
/// `start_witness_under`) that runs the
/// process with its wall clock moved by `offset` (libfaketime syntax:
/// `+30s`, `-12h`, `+1d`), monotonic time left alone (timeouts use it).
/// libfaketime is preloaded through `env`, which execs: the `faketime`
/// wrapper forks, and killing it would leave the process running after the
/// test.
pub fn faketime(offset: &str) -> Result<Vec<String>> {
    let lib = libfaketime().context(
        "libfaketime.so.1 not found under /usr/lib/*/faketime (apt-get install faketime)",
    )?;
    Ok(vec![
        "env".into(),
        format!("LD_PRELOAD={}", lib.display()),
        format!("FAKETIME={offset}"),
        "FAKETIME_DONT_FAKE_MONOTONIC=1".into(),
    ])
}

/// libfaketime's library, where Debian's `faketime` puts it.
fn libfaketime() -> Option<PathBuf> {
    fs::read_dir("/usr/lib")
        .ok()?
        .flatten()
        .map(|dir| dir.path().join("faketime").join("libfaketime.so.1"))
        .find(|lib| lib.exists())
}

/// The AWS CLI the tests run: `$CUSTODIA_AWS` (.ci/run points it at
/// Debian's), else `aws` on PATH.
pub fn aws_cli() -> String {
    std::env::var("CUSTODIA_AWS").unwrap_or_else(|_| "aws".into())
}

/// The Python with boto3 the tests run: `$CUSTODIA_PYTHON` (.ci/run makes a
/// venv with boto3 from PyPI), else `python3`.
pub fn boto3_python() -> String {
    std::env::var("CUSTODIA_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// A program a test shells out to that only `.ci/run` installs (a clean
/// machine has none of them). A test names the ones it needs in [`require`].
#[derive(Clone, Copy, Debug)]
pub enum Tool {
    /// The AWS CLI ([`aws_cli`]).
    Aws,
    /// A Python with boto3 ([`boto3_python`]).
    Boto3,
    /// curl, for SigV4-signed raw requests ([`TestCluster::s3_curl`]).
    Curl,
    /// libfaketime, for [`faketime`].
    Faketime,
    /// `openssl ts -verify`.
    Openssl,
    /// A Prometheus server.
    Prometheus,
    /// Prometheus's rule and config checker.
    Promtool,
    /// python3 with the `cryptography` package (Ed25519, for the ledger's
    /// independent check).
    PythonCryptography,
    Rclone,
    S3cmd,
}

impl Tool {
    /// What the tool is, where it comes from, and whether it works (if not,
    /// why not).
    fn probe(self) -> (String, String, std::result::Result<(), String>) {
        let debian = |package: &str| format!("Debian {package}; .ci/run installs it");
        // A program that answers `args` with exit status 0.
        let program = |program: String, args: &[&str], package: &str| {
            let works = run_probe(&program, args);
            (program, debian(package), works)
        };
        match self {
            Tool::Aws => program(aws_cli(), &["--version"], "awscli"),
            Tool::Boto3 => {
                let python = boto3_python();
                let works = run_probe(&python, &["-c", "import boto3"]);
                (
                    format!("{python} with boto3"),
                    "CUSTODIA_PYTHON names a python with it; .ci/run makes a venv with boto3 \
                     from PyPI"
                        .into(),
                    works,
                )
            }
            Tool::Curl => program("curl".into(), &["--version"], "curl"),
            Tool::Faketime => {
                let works = libfaketime()
                    .map(|_| ())
                    .ok_or_else(|| "libfaketime.so.1 not found under /usr/lib/*/faketime".into());
                ("libfaketime".into(), debian("faketime"), works)
            }
            Tool::Openssl => program("openssl".into(), &["version"], "openssl"),
            Tool::Prometheus => program("prometheus".into(), &["--version"], "prometheus"),
            Tool::Promtool => program("promtool".into(), &["--version"], "prometheus"),
            Tool::PythonCryptography => {
                let works = run_probe("python3", &["-c", "import cryptography"]);
                (
                    "python3 with cryptography".into(),
                    debian("python3-cryptography"),
                    works,
                )
            }
            Tool::Rclone => program("rclone".into(), &["version"], "rclone"),
            Tool::S3cmd => program("s3cmd".into(), &["--version"], "s3cmd"),
        }
    }
}

/// Runs `program args`: Ok when it exits 0, else what went wrong.
fn run_probe(program: &str, args: &[&str]) -> std::result::Result<(), String> {
    let quoted: Vec<String> = args
        .iter()
        .map(|a| {
            if a.contains(' ') {
                format!("'{a}'")
            } else {
                (*a).to_owned()
            }
        })
        .collect();
    let shown = format!("`{program} {}`", quoted.join(" "));
    match Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
    {
        Err(e) => Err(format!("running {shown}: {e}")),
        Ok(out) if out.status.success() => Ok(()),
        // The last line says what is wrong (a Python traceback's does).
        Ok(out) => Err(format!(
            "{shown} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .rfind(|l| !l.trim().is_empty())
                .unwrap_or_default()
        )),
    }
}

/// Whether `test` can run: true when every tool in `tools` works. Call it
/// first, before a cluster starts, and return `Ok(())` on false.
///
/// Without a tool, the test prints `SKIPPED: <test> needs <tool> (<where it
/// comes from>)` and passes, as the FoundationDB tests do without a cluster;
/// with `CUSTODIA_REQUIRE_TOOLS` set (non-empty; .ci/run sets it) the
/// missing tool is an error instead, so CI cannot skip what it installs.
pub fn require(test: &str, tools: &[Tool]) -> Result<bool> {
    let missing: Vec<(String, String)> = tools
        .iter()
        .filter_map(|tool| {
            let (what, source, probe) = tool.probe();
            probe.err().map(|why| (format!("{what} ({source})"), why))
        })
        .collect();
    if missing.is_empty() {
        return Ok(true);
    }
    let needs = missing
        .iter()
        .map(|(needs, _)| needs.as_str())
        .collect::<Vec<_>>()
        .join(" and ");
    if std::env::var_os("CUSTODIA_REQUIRE_TOOLS").is_some_and(|v| !v.is_empty()) {
        let why: String = missing
            .iter()
            .map(|(_, why)| format!("\n  {why}"))
            .collect();
        bail!(
            "{test} needs {needs}; CUSTODIA_REQUIRE_TOOLS is set (as .ci/run sets it), \
             so this fails the test instead of skipping it:{why}"
        );
    }
    let line = format!("SKIPPED: {test} needs {needs}");
    println!("{line}");
    // And on stderr, unbuffered: libtest captures println! unless --nocapture.
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr(), "{line}");
    Ok(false)
}

/// Deterministic pseudo-random bytes (no two sizes share a prefix pattern).
pub fn bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

pub fn blake3_hex(b: &[u8]) -> String {
    blake3::hash(b).to_hex().to_string()
}

/// Polls `f` until it is true or `secs` pass.
/// Sends the second half of `data` on an upload [`TestCluster::half_upload`]
/// began; returns the filing's JSON once it is answered 201.
pub fn finish_upload(mut s: std::net::TcpStream, data: &[u8]) -> Result<Value> {
    use std::io::Write;
    s.write_all(&data[data.len() / 2..])?;
    s.flush()?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    if !resp.starts_with("HTTP/1.1 201") {
        bail!("the upload was not filed: {resp}");
    }
    let body = resp.split("\r\n\r\n").nth(1).context("response body")?;
    Ok(serde_json::from_str(body)?)
}

pub fn eventually(secs: u64, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    f()
}

/// Runs `command` to its end as [`Command::output`] does (stdin null,
/// stdout and stderr captured), for a command expected to end by itself
/// (one that refuses to start): if it still runs after `limit`, it is
/// killed and this fails, saying what it printed, instead of waiting on
/// it for ever. Its output goes to unnamed temporary files, so no pipe
/// fills up while it runs.
pub fn output_within(command: &mut Command, limit: Duration) -> Result<std::process::Output> {
    use std::io::{Seek, SeekFrom};
    let mut stdout = tempfile::tempfile()?;
    let mut stderr = tempfile::tempfile()?;
    let mut child = command
        .stdin(Stdio::null())
        .stdout(stdout.try_clone()?)
        .stderr(stderr.try_clone()?)
        .spawn()
        .with_context(|| format!("starting {command:?}"))?;
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let read = |f: &mut fs::File| -> Result<Vec<u8>> {
        f.seek(SeekFrom::Start(0))?;
        let mut b = Vec::new();
        f.read_to_end(&mut b)?;
        Ok(b)
    };
    let stdout = read(&mut stdout)?;
    let stderr = read(&mut stderr)?;
    let Some(status) = status else {
        bail!(
            "{command:?} still ran after {limit:?}, and was killed; it said:\n{}{}",
            String::from_utf8_lossy(&stdout),
            String::from_utf8_lossy(&stderr)
        );
    };
    Ok(std::process::Output {
        status,
        stdout,
        stderr,
    })
}

/// Fails with context.
pub fn ensure_eq<T: PartialEq + std::fmt::Debug>(a: T, b: T, what: &str) -> Result<()> {
    if a != b {
        bail!("{what}: {a:?} != {b:?}");
    }
    Ok(())
}

/// Copies the directory tree `from` to `to` (created), files and folders.
pub fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    fs::create_dir_all(to)?;
    for e in fs::read_dir(from)? {
        let e = e?;
        let target = to.join(e.file_name());
        if e.file_type()?.is_dir() {
            copy_dir(&e.path(), &target)?;
        } else {
            fs::copy(e.path(), target)?;
        }
    }
    Ok(())
}

pub fn read_file(p: &Path) -> Result<Vec<u8>> {
    fs::read(p).with_context(|| p.display().to_string())
}

/// A `custodia witness` process, killed on drop.
pub struct WitnessProcess {
    pub child: std::process::Child,
    pub url: String,
}

impl Drop for WitnessProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `custodia witness` in `dir` on `port`, trusting the log key in
/// `log_pub`; returns once it answers.
pub fn start_witness(dir: &Path, port: u16, log_pub: &Path) -> Result<WitnessProcess> {
    start_witness_under(dir, port, log_pub, &[])
}

/// [`start_witness`] under a wrapper command (see [`faketime`]).
pub fn start_witness_under(
    dir: &Path,
    port: u16,
    log_pub: &Path,
    wrapper: &[&str],
) -> Result<WitnessProcess> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("witness.log"))?;
    let child = custodia_under(wrapper)
        .arg("witness")
        .arg("--data-dir")
        .arg(dir)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--name", "witness.example/court-b"])
        .arg("--log-key")
        .arg(log_pub)
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?;
    let url = format!("http://127.0.0.1:{port}");
    let up = eventually(20, || {
        ureq::post(format!("{url}/add-checkpoint"))
            .send("")
            .map(|_| true)
            .unwrap_or_else(|e| matches!(e, ureq::Error::StatusCode(_)))
    });
    if !up {
        bail!("witness did not start");
    }
    Ok(WitnessProcess { child, url })
}

/// A header's value in the lower-cased head [`TestCluster::s3_curl`] returns.
pub fn header<'a>(headers: &'a str, name: &str) -> Option<&'a str> {
    headers
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}: ")))
        .map(str::trim)
}

/// A field of an AWS shared-credentials file.
pub fn profile_field(creds: &str, name: &str) -> String {
    creds
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name} = ")))
        .unwrap_or_default()
        .to_owned()
}
