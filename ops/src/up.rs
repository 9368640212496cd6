//! `custodia up`, `custodia node` and `custodia gateway`: running components
//! until SIGINT/SIGTERM/SIGHUP, and stopping them cleanly.

/// `println!` that drops a failed write: a `custodia up` whose output
/// nobody reads any more (piped to `tee`, gone at Ctrl-C) still stops its
/// nodes cleanly instead of panicking midway.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// `eprintln!` likewise.
macro_rules! say_err {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

use crate::cluster::{self, Cluster, InitOptions};
use anyhow::{Context, Result};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};
use storage_node::client::NodeError;
use tokio::process::{Child, Command};

/// Catches SIGINT, SIGTERM and SIGHUP from now on; the future resolves
/// when the process is asked to stop. Made before a component starts, so
/// that a signal during its start (`up` stopping while its nodes come up)
/// stops it cleanly instead of ending the process by the signal's default.
pub fn stop_requested() -> impl std::future::Future<Output = ()> {
    let signals = StopSignals::new();
    async move {
        match signals {
            Ok(mut s) => s.recv().await,
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
}

/// SIGINT, SIGTERM and SIGHUP, caught from creation on: a signal before
/// the first wait is kept for it, not left to its default (which would end
/// the process without stopping its children). SIGHUP (the terminal
/// closed, an SSH session dropped) stops as SIGTERM does, unless the
/// process was started ignoring it (see [`hangup`]).
struct StopSignals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    hup: Option<tokio::signal::unix::Signal>,
}

/// SIGHUP caught from now on, unless the process was started ignoring it
/// (`nohup custodia up &`, a service manager): catching it would replace
/// that choice, and a closing terminal would then stop what was meant to
/// outlive it.
pub fn hangup() -> std::io::Result<Option<tokio::signal::unix::Signal>> {
    // SAFETY: with no new action, sigaction only reads SIGHUP's present
    // disposition into `old`, a plain C struct that zeroes make valid.
    let ignored = unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        libc::sigaction(libc::SIGHUP, std::ptr::null(), &mut old) == 0
            && old.sa_sigaction == libc::SIG_IGN
    };
    match ignored {
        true => Ok(None),
        false => tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).map(Some),
    }
}

/// The next SIGHUP, or never where it is not caught.
pub async fn hung_up(hup: &mut Option<tokio::signal::unix::Signal>) {
    match hup {
        Some(h) => {
            h.recv().await;
        }
        None => std::future::pending().await,
    }
}

impl StopSignals {
    fn new() -> std::io::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(StopSignals {
            int: signal(SignalKind::interrupt())?,
            term: signal(SignalKind::terminate())?,
            hup: hangup()?,
        })
    }

    /// The first request to stop, by any of the three.
    async fn recv(&mut self) {
        tokio::select! {
            _ = self.int.recv() => {}
            _ = self.term.recv() => {}
            () = hung_up(&mut self.hup) => {}
        }
    }

    /// A request to stop at once, while stopping: SIGINT or SIGTERM only. A
    /// hangup often comes twice (the kernel's to the terminal's foreground
    /// group, and the shell's to its jobs), and the second must not cut the
    /// drain short.
    async fn recv_again(&mut self) {
        tokio::select! {
            _ = self.int.recv() => {}
            _ = self.term.recv() => {}
        }
    }
}

pub async fn run_node(
    config: storage_node::server::NodeConfig,
    metrics: Option<std::net::SocketAddr>,
) -> Result<()> {
    let stop = stop_requested();
    let id = config.node_id;
    // Every series of this process says which node it is.
    let labels = std::collections::HashMap::from([("node".to_owned(), id.0.to_string())]);
    let registry = prometheus::Registry::new_custom(None, Some(labels))
        .context("creating the metrics registry")?;
    let mut node = storage_node::server::serve(config, &registry)
        .await
        .context("starting the storage node")?;
    if let Some(addr) = metrics {
        storage_node::metrics::serve_http(addr, registry)
            .await
            .with_context(|| format!("serving metrics on {addr}"))?;
    }
    tracing::info!(node = %id, addr = %node.local_addr, "storage node running");
    let failed = tokio::select! {
        () = stop => None,
        why = node.failed() => Some(why),
    };
    tracing::info!(node = %id, "stopping");
    node.shutdown().await;
    match failed {
        None => Ok(()),
        // Exits with an error, for its supervisor to start it again on what
        // the directory holds now.
        Some(why) => anyhow::bail!(
            "node {id} stopped: the data directory changed under it ({why}); start it again \
             to serve what is there now (the gateway checks it against the index)"
        ),
    }
}

async fn start_gateway(cluster: &Cluster) -> Result<gateway::RunningGateway> {
    let store = cluster::open_index(&cluster.gateway.index_path)?;
    gateway::serve(cluster.gateway.clone(), store, prometheus::Registry::new())
        .await
        .context("starting the gateway")
}

fn api_scheme(cluster: &Cluster) -> &'static str {
    if cluster.gateway.api_tls.is_some() {
        "https"
    } else {
        "http"
    }
}

fn s3_scheme(cluster: &Cluster) -> &'static str {
    if cluster.gateway.s3_tls.is_some() {
        "https"
    } else {
        "http"
    }
}

pub async fn run_gateway(data_dir: &Path) -> Result<()> {
    let mut stop = StopSignals::new().context("catching SIGINT, SIGTERM and SIGHUP")?;
    let _lock = cluster::lock_cluster_dir(data_dir)?;
    let cluster = Cluster::load(data_dir)?;
    // A signal during the start is kept for the wait below: the start (its
    // migrations included) is not cut short.
    let mut gw = start_gateway(&cluster).await?;
    say!("evidence API: {}://{}", api_scheme(&cluster), gw.local_addr);
    if let Some(a) = gw.s3_addr {
        say!("S3 API: {}://{a}", s3_scheme(&cluster));
    }
    if let Some(a) = gw.metrics_addr {
        say!("metrics: http://{a}/metrics");
    }
    tokio::select! {
        e = gw.stopped() => {
            // What still serves (the other API, when a background task
            // died) lets the requests under way finish.
            drain(gw, &mut stop).await;
            return Err(anyhow::Error::from(e).context("the gateway stopped"));
        }
        () = stop.recv() => tracing::info!("stopping"),
    }
    drain(gw, &mut stop).await;
    Ok(())
}

/// Stops the gateway cleanly ([`gateway::RunningGateway::shutdown`]: the
/// requests under way finish first), or at once on a second signal.
async fn drain(mut gw: gateway::RunningGateway, stop: &mut StopSignals) {
    tokio::select! {
        () = gw.shutdown() => tracing::info!("gateway stopped"),
        () = stop.recv_again() => tracing::warn!("asked again: stopping without waiting for the requests under way"),
    }
    gw.abort();
}

/// Waits until every node answers over QUIC, so the gateway starts with a full
/// view of the cluster. A node that exits on its own during start-up (its
/// disk failing, say) is left out, as one that dies later is: returned, by
/// its place in `nodes`, with why. One that answers as another node, or
/// refuses the gateway's certificate, is a mistake in the cluster's files:
/// an error.
async fn wait_for_nodes(
    cluster: &Cluster,
    nodes: &[&cluster::NodeSpec],
    children: &mut [Child],
) -> Result<Vec<(usize, String)>> {
    let mut exited = Vec::new();
    let client = storage_node::client::NodeClient::new(&cluster.gateway.tls.files())?;
    // By the names the gateway will hold them to: a node whose certificate
    // the gateway would refuse fails here, said, not later as a node down.
    for e in &cluster.gateway.nodes {
        if let Some(name) = &e.server_name {
            client.expect_name(e.addr, name.clone());
        }
    }
    // Dialled where the gateway will dial it (`[[gateway.nodes]]`), and it
    // must say it is that node: `up` does not call a cluster up that the
    // gateway then finds down.
    let addrs: std::collections::HashMap<u32, std::net::SocketAddr> = cluster
        .gateway
        .nodes
        .iter()
        .map(|e| (e.id, e.addr))
        .collect();
    // No deadline while a node runs: it reads its segment files before it
    // listens, which on a large store and a cold page cache takes longer
    // than any fixed limit would allow. It is said, and Ctrl-C stops it.
    let started = Instant::now();
    let mut said = Instant::now();
    for (i, (n, child)) in nodes.iter().zip(children.iter_mut()).enumerate() {
        let addr = addrs.get(&n.id).copied().unwrap_or(n.listen);
        loop {
            if let Some(status) = child.try_wait()? {
                exited.push((
                    i,
                    format!(
                        "node {} exited during start-up ({status}){}",
                        n.id,
                        last_words(n)
                    ),
                ));
                break;
            }
            let answer = client.rpc_node_info(addr).await;
            // A handshake refused (a certificate that does not name this
            // node) or a frame not understood will not mend by waiting.
            if let Err(
                e @ (NodeError::Connection(
                    quinn::ConnectionError::TransportError(_)
                    | quinn::ConnectionError::ConnectionClosed(_),
                )
                | NodeError::Protocol(_)
                | NodeError::UnexpectedResponse
                | NodeError::Remote(_)),
            ) = &answer
            {
                // Perhaps not this node at all: one that could not bind its
                // port (another cluster's there) exits at once, and what
                // answered is what holds the port. Its own words first.
                // (Long enough for a loaded machine to start the process
                // and open its store: this only costs time on a failure.)
                let exited = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
                if let Ok(Ok(status)) = exited {
                    anyhow::bail!(
                        "node {} exited during start-up ({status}){}; what answers on {addr} \
                         is not this cluster's node",
                        n.id,
                        last_words(n)
                    );
                }
                anyhow::bail!("node {} on {addr} refused start-up: {e}", n.id);
            }
            if let Ok(info) = answer {
                if info.node.0 != n.id {
                    anyhow::bail!(
                        "{addr}, where the gateway dials node {}, is answered by node {}: \
                         check the addresses in cluster.toml",
                        n.id,
                        info.node
                    );
                }
                break;
            }
            if said.elapsed() >= Duration::from_secs(15) {
                said = Instant::now();
                say!(
                    "still waiting for node {} on {addr} after {} s (a node reads its \
                     segment files before it listens; its log is in {})",
                    n.id,
                    started.elapsed().as_secs(),
                    n.data_dir.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(exited)
}

/// The last line node `n` logged (why it stopped, as a rule), for an
/// error that says it stopped; where its log is otherwise.
fn last_words(n: &cluster::NodeSpec) -> String {
    use std::io::{Read as _, Seek as _};
    let log = n.data_dir.join("node.log");
    // Its end alone: the log is kept across runs.
    let mut tail = Vec::new();
    if let Ok(mut f) = std::fs::File::open(&log) {
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = f.seek(std::io::SeekFrom::Start(len.saturating_sub(16 * 1024)));
        let _ = f.take(16 * 1024).read_to_end(&mut tail);
    }
    let text = String::from_utf8_lossy(&tail);
    match text.lines().rev().find(|l| !l.trim().is_empty()) {
        Some(line) => format!(": {}\n(its log: {})", line.trim(), log.display()),
        None => format!("; see its log {}", log.display()),
    }
}

/// Asks every node to stop, and kills those still running 10 s later (10 s
/// in all, not 10 s more for each node in turn).
async fn stop_children(children: &mut [Child]) {
    say!("stopping {} nodes", children.len());
    children.iter().for_each(stop_child);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    for c in children.iter_mut() {
        if tokio::time::timeout_at(deadline, c.wait()).await.is_err() {
            let _ = c.kill().await;
        }
    }
}

fn stop_child(child: &Child) {
    if let Some(pid) = child
        .id()
        .and_then(|p| rustix::process::Pid::from_raw(p as i32))
    {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    }
}

/// Refuses a node directory another process holds (a node an earlier
/// `up` left running): a second node process on it would delete the first
/// one's shards in flight, and `up` would take the old node's answers for
/// the new one's.
fn check_node_free(n: &cluster::NodeSpec) -> Result<()> {
    let path = n.data_dir.join(storage_node::server::NODE_LOCK_FILE);
    let Ok(file) = std::fs::File::open(&path) else {
        return Ok(());
    };
    match file.try_lock() {
        Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
            "node {}'s directory {} is in use by a running node process (left by an earlier \
             `custodia up`?); stop it first",
            n.id,
            n.data_dir.display()
        ),
        _ => Ok(()),
    }
}

/// An address `up` is to listen on, what for, and how to change it.
struct Port {
    addr: std::net::SocketAddr,
    udp: bool,
    what: String,
    /// The option of a new cluster's `up`.
    flag: &'static str,
    /// The cluster.toml setting of an existing one.
    setting: String,
    node: Option<u32>,
}

/// The addresses a new cluster would take (those chosen free, port 0 or
/// none given, are not checked: they are picked as it is made).
fn planned_ports(opts: &InitOptions) -> Result<Vec<Port>> {
    let mut ports = vec![Port {
        addr: opts.api,
        udp: false,
        what: "the evidence API".into(),
        flag: "--api",
        setting: "listen".into(),
        node: None,
    }];
    for (addr, what, flag, setting) in [
        (opts.s3, "the S3 API", "--s3", "s3_listen"),
        (
            opts.metrics,
            "the gateway's metrics",
            "--metrics",
            "metrics_listen",
        ),
    ] {
        if let Some(addr) = addr {
            ports.push(Port {
                addr,
                udp: false,
                what: what.into(),
                flag,
                setting: setting.into(),
                node: None,
            });
        }
    }
    for id in 0..opts.nodes {
        for (base, udp, what, flag) in [
            (opts.node_base_port, true, "QUIC", "--node-base-port"),
            (
                opts.node_metrics_base_port,
                false,
                "metrics",
                "--node-metrics-base-port",
            ),
        ] {
            if base == 0 {
                continue;
            }
            let port = u16::try_from(u32::from(base) + id).context("node ports run past 65535")?;
            ports.push(Port {
                addr: ([127, 0, 0, 1], port).into(),
                udp,
                what: format!("node {id}'s {what}"),
                flag,
                setting: String::new(),
                node: Some(id),
            });
        }
    }
    Ok(ports)
}

/// The addresses an existing cluster listens on, by its cluster.toml.
fn configured_ports(c: &Cluster) -> Vec<Port> {
    let g = &c.gateway;
    let mut ports = Vec::new();
    for (addr, what, setting) in [
        (Some(g.listen), "the evidence API", "[gateway] listen"),
        (g.s3_listen, "the S3 API", "[gateway] s3_listen"),
        (
            g.metrics_listen,
            "the gateway's metrics",
            "[gateway] metrics_listen",
        ),
    ] {
        if let Some(addr) = addr {
            ports.push(Port {
                addr,
                udp: false,
                what: what.into(),
                flag: "",
                setting: setting.into(),
                node: None,
            });
        }
    }
    for n in &c.nodes {
        let id = n.id;
        ports.push(Port {
            addr: n.listen,
            udp: true,
            what: format!("node {id}'s QUIC"),
            flag: "",
            setting: format!(
                "listen of the [[nodes]] entry with id = {id} and addr of the [[gateway.nodes]] \
                 entry with id = {id} (the two must agree)"
            ),
            node: Some(id),
        });
        if let Some(addr) = n.metrics_listen {
            ports.push(Port {
                addr,
                udp: false,
                what: format!("node {id}'s metrics"),
                flag: "",
                setting: format!("metrics_listen of the [[nodes]] entry with id = {id}"),
                node: Some(id),
            });
        }
    }
    ports
}

/// Refuses, naming what to change, when another program holds one of
/// `ports` (bound for a moment and let go: one taken in between is still
/// said by the component that cannot bind it).
fn ports_free(ports: &[Port], fresh: bool) -> Result<()> {
    // Each is free alone, so two of them on one port are seen only here:
    // the second to start would find the first on it.
    for (i, a) in ports.iter().enumerate() {
        if let Some(b) = ports[i + 1..]
            .iter()
            .find(|b| a.udp == b.udp && gateway::config::same_port(a.addr, b.addr))
        {
            match fresh {
                true => anyhow::bail!(
                    "{} and {} would both listen on {}: give one another address with {} or {} \
                     (nothing was created)",
                    a.what,
                    b.what,
                    b.addr,
                    a.flag,
                    b.flag
                ),
                false => anyhow::bail!(
                    "{} and {} both listen on {}: change {} or {} in cluster.toml (nothing was \
                     started)",
                    a.what,
                    b.what,
                    b.addr,
                    a.setting,
                    b.setting
                ),
            }
        }
    }
    for p in ports.iter().filter(|p| p.addr.port() != 0) {
        let taken = match p.udp {
            true => std::net::UdpSocket::bind(p.addr).err(),
            false => std::net::TcpListener::bind(p.addr).err(),
        };
        let Some(e) = taken else { continue };
        match fresh {
            true => anyhow::bail!(
                "{} ({}) cannot be listened on: {e}. Give another with {} (nothing was created)",
                p.addr,
                p.what,
                p.flag
            ),
            false => anyhow::bail!(
                "{} ({}) cannot be listened on: {e}. Stop what holds it, or change {} in \
                 cluster.toml (nothing was started)",
                p.addr,
                p.what,
                p.setting
            ),
        }
    }
    Ok(())
}

pub async fn up(data_dir: &Path, opts: &InitOptions) -> Result<()> {
    let mut stop = StopSignals::new().context("catching SIGINT, SIGTERM and SIGHUP")?;
    let _lock = cluster::lock_data_dir(data_dir)?;
    let fresh = !data_dir.join(cluster::CLUSTER_FILE).exists();
    if fresh {
        // Before anything is made: a cluster made on a port in use would
        // keep that port (its cluster.toml decides, not the options).
        ports_free(&planned_ports(opts)?, true)?;
        cluster::init(data_dir, opts).await?;
        say!("initialised a new cluster in {}", data_dir.display());
    }
    cluster::make_private(data_dir);
    let mut cluster = Cluster::load(data_dir)?;
    if !fresh {
        // Said, not silently ignored: an operator working around a port in
        // use would otherwise try again with the same address.
        say!(
            "starting the cluster already in {} ({} nodes, RS({},{}), evidence API on {}): its \
             cluster.toml decides these; the shape and address options apply only to a new \
             cluster",
            data_dir.display(),
            cluster.nodes.len(),
            cluster.gateway.k,
            cluster.gateway.m,
            cluster.gateway.listen
        );
    }
    let exe = std::env::current_exe().context("locating the custodia binary")?;
    let cluster_file = data_dir.join(cluster::CLUSTER_FILE);
    // The file as the last edit left it, and no edit until the nodes'
    // certificates are named: a `node add` meanwhile is either read here
    // (and checked like the others) or waits.
    let edit = cluster::lock_cluster_edits(data_dir)?;
    cluster = Cluster::load(data_dir)?;
    // A node taken out (`custodia node remove`) stays out: started again, it
    // would serve nothing the cluster counts and be reported down forever.
    let removed = removed_nodes(&cluster).await?;
    for n in &cluster.nodes {
        if removed.contains(&n.id) {
            say!(
                "node {} was removed from the cluster: not started (its data dir {} is left as \
                 it was)",
                n.id,
                n.data_dir.display()
            );
        } else {
            check_node_free(n)?;
        }
    }
    // Before any node starts: one started and a gateway that then cannot
    // listen leaves nothing to show but an error.
    let in_use: Vec<Port> = configured_ports(&cluster)
        .into_iter()
        .filter(|p| p.node.is_none_or(|id| !removed.contains(&id)))
        .collect();
    ports_free(&in_use, false)?;
    // Only with no node of this cluster running (checked just above): a
    // running one would keep the certificate it loaded.
    let named = cluster.name_node_certs(data_dir)?;
    drop(edit);
    if !named.is_empty() {
        say!(
            "gave the certificates of nodes {named:?} a name of their own: the gateway now \
             requires it of each, so no node's key passes for another's"
        );
    }
    let nodes: Vec<&cluster::NodeSpec> = cluster
        .nodes
        .iter()
        .filter(|n| !removed.contains(&n.id))
        .collect();
    let mut children = Vec::new();
    for n in &nodes {
        // A directory that is gone (a wiped disk) is made again: the node
        // starts empty, and the gateway finds its disk new and has what it
        // held rebuilt.
        cluster::create_private_dir(&n.data_dir)?;
        // Appended to: an earlier run's lines (why a node died) stay.
        let log_path = n.data_dir.join("node.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("opening {}", log_path.display()))?;
        let mut command = Command::new(&exe);
        command
            .arg("node")
            .arg("--cluster")
            .arg(&cluster_file)
            .arg("--id")
            .arg(n.id.to_string())
            .envs(cluster::colocated_node_workers(nodes.len()).map(|w| ("TOKIO_WORKER_THREADS", w)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            // Out of the terminal's process group: a Ctrl-C reaches `up`
            // alone, which stops the gateway before the nodes.
            .process_group(0)
            .kill_on_drop(true);
        let parent = rustix::process::getpid();
        // SAFETY: prctl and getppid are async-signal-safe and touch no
        // memory of this process; they run in the child between fork and exec.
        unsafe {
            command.pre_exec(move || {
                // A node outlives no `up` killed without its Ctrl-C
                // handling (SIGKILL, the OOM killer).
                rustix::process::set_parent_process_death_signal(Some(
                    rustix::process::Signal::TERM,
                ))
                .map_err(std::io::Error::from)?;
                // `up` died between the fork and here: no signal will come.
                if rustix::process::getppid() != Some(parent) {
                    return Err(std::io::Error::other("custodia up is gone"));
                }
                Ok(())
            });
        }
        let child = command
            .spawn()
            .with_context(|| format!("starting node {}", n.id))?;
        children.push(child);
    }
    // Nodes that exited during start-up: the cluster serves without them
    // while enough are left to file to (the README's promise for a node
    // that dies later, kept for one that fails at once, the usual way a
    // disk goes); the next `up` starts them again.
    let mut running = vec![true; children.len()];
    let started = async {
        let exited = wait_for_nodes(&cluster, &nodes, &mut children).await?;
        let left = nodes.len() - exited.len();
        let need = cluster.gateway.write_quorum();
        if left < need {
            let why: Vec<&str> = exited.iter().map(|(_, why)| why.as_str()).collect();
            anyhow::bail!(
                "{}\n{left} of {} nodes started: filing needs {need}",
                why.join("\n"),
                nodes.len()
            );
        }
        for (i, why) in &exited {
            running[*i] = false;
            say!("{why}");
            say!(
                "the cluster serves on without node {}; fix what stopped it (its node.log \
                 says), then the next `custodia up` starts it again",
                nodes[*i].id
            );
        }
        start_gateway(&cluster).await
    };
    let started = tokio::select! {
        r = started => Some(r),
        _ = stop.recv() => None,
    };
    let mut gw = match started {
        Some(Ok(gw)) => gw,
        Some(Err(e)) => {
            stop_children(&mut children).await;
            return Err(e);
        }
        // Asked to stop before it was up: a clean stop, as after (exit 0).
        None => {
            stop_children(&mut children).await;
            say!("stopped before the cluster was up; everything filed before is kept");
            return Ok(());
        }
    };
    say!(
        "Custodia is up: {} storage nodes, RS({},{})",
        running.iter().filter(|r| **r).count(),
        cluster.gateway.k,
        cluster.gateway.m
    );
    say!(
        "  evidence API   {}://{}",
        api_scheme(&cluster),
        gw.local_addr
    );
    if cluster.gateway.api_tls.is_some() {
        say!(
            "                 trust {} (curl --cacert ...; the CLI finds it)",
            cluster.gateway.tls.ca_cert.display()
        );
    }
    say!(
        "  admin token    {}",
        data_dir.join(cluster::ADMIN_TOKEN_FILE).display()
    );
    if let Some(a) = gw.s3_addr {
        say!(
            "  S3 API         {}://{a}  keys in {} (AWS_SHARED_CREDENTIALS_FILE=...)",
            s3_scheme(&cluster),
            data_dir.join(cluster::S3_CREDENTIALS_FILE).display()
        );
        if cluster.gateway.s3_tls.is_some() {
            say!(
                "                 trust {} (AWS_CA_BUNDLE=...)",
                cluster.gateway.tls.ca_cert.display()
            );
        }
    }
    if let Some(l) = &cluster.gateway.ledger {
        say!(
            "  ledger         {}://{}/ledger/checkpoint  origin {:?}",
            api_scheme(&cluster),
            gw.local_addr,
            l.origin
        );
        say!(
            "  ledger key     {}  (verify receipts with it: custodia verify)",
            data_dir.join(cluster::LEDGER_VKEY_FILE).display()
        );
    }
    if let Some(a) = gw.metrics_addr {
        say!("  metrics        http://{a}/metrics  (nodes: see each node below)");
    }
    for ((n, c), _) in nodes
        .iter()
        .zip(&children)
        .zip(&running)
        .filter(|(_, r)| **r)
    {
        say!(
            "  node {:<3}       quic://{}  pid {}  {}{}",
            n.id,
            n.listen,
            c.id().unwrap_or(0),
            n.data_dir.display(),
            n.metrics_listen
                .map(|a| format!("  metrics http://{a}/metrics"))
                .unwrap_or_default()
        );
    }
    say!("Press Ctrl-C to stop.");
    // A node that dies (killed to see the erasure coding at work, a disk
    // gone) is reported, and the cluster serves on without it, as a real
    // one does: reads rebuild what it held, filings go to the others while
    // enough are left, and the repair worker restores redundancy once it
    // is declared down. The next `up` starts it again.
    let failed = loop {
        let exited = first_exit(&mut children, &running);
        tokio::select! {
            // Asked to stop: that, whatever else ends at the same moment.
            biased;
            _ = stop.recv() => break None,
            e = gw.stopped() => break Some(anyhow::Error::from(e).context("the gateway stopped")),
            (i, status) = exited => {
                running[i] = false;
                let id = nodes.get(i).map_or(i, |n| n.id as usize);
                let left = running.iter().filter(|r| **r).count();
                tracing::warn!(node = id, %status, "a node exited");
                say_err!(
                    "node {id} exited ({status}); see its node.log. The cluster serves on \
                     with {left} of {} nodes; the next `custodia up` starts it again.",
                    running.len()
                );
            }
        }
    };
    // The gateway first, so nothing is filed to nodes that are stopping;
    // the requests under way finish while the nodes still run (also when
    // the gateway failed: what still serves, the other API when a
    // background task died, finishes its requests).
    drain(gw, &mut stop).await;
    stop_children(&mut children).await;
    match failed {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// The nodes of `cluster` its index records as removed. Read with the
/// gateway not yet started (the index is this process's alone), and closed
/// again before it starts.
async fn removed_nodes(cluster: &Cluster) -> Result<std::collections::BTreeSet<u32>> {
    let path = &cluster.gateway.index_path;
    let store = cluster::open_index(path)?;
    let states = indexer::run(&store, |tx| async move {
        indexer::schema::lifecycles_tx(&tx).await
    })
    .await
    .with_context(|| format!("reading the node states in {}", path.display()))?;
    Ok(states
        .into_iter()
        .filter(|(_, r)| r.state == indexer::schema::Lifecycle::Removed)
        .map(|(id, _)| id.0)
        .collect())
}

/// The first of the node processes still `running` to exit (its index),
/// with how it ended.
async fn first_exit(children: &mut [Child], running: &[bool]) -> (usize, String) {
    if !running.contains(&true) {
        return std::future::pending().await;
    }
    let waits = children
        .iter_mut()
        .enumerate()
        .filter(|(i, _)| running.get(*i).copied().unwrap_or(false))
        .map(|(i, c)| {
            Box::pin(async move {
                let status = c
                    .wait()
                    .await
                    .map_or_else(|e| e.to_string(), |s| s.to_string());
                (i, status)
            })
        });
    futures::future::select_all(waits).await.0
}
