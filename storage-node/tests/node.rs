//! A real node and client over QUIC on loopback, with certificates from a fresh
//! cluster CA in a temporary directory.

use bytes::Bytes;
use protocol::wire::NodeInfo;
use protocol::{
    Blake3Hash, ErasureCode, ErrorCode, EvidenceId, NodeId, Request, Response, ShardHeader,
    ShardKey,
};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use storage_node::client::{NodeClient, NodeError};
use storage_node::server::{serve, NodeConfig, RunningNode};
use storage_node::tls::{self, ClusterCa, TlsFiles, NODE_SERVER_NAME};

const SHARD_SIZE: u32 = 1 << 20;

/// Issues a certificate from `ca` into `dir/<who>.{pem,key}`, beside `ca.pem`.
fn issue(ca: &ClusterCa, dir: &Path, who: &str, name: &str) -> TlsFiles {
    std::fs::write(dir.join("ca.pem"), ca.to_pem().0).unwrap();
    let (cert, key) = ca
        .issue(who, &[name.to_string()], &[IpAddr::from([127, 0, 0, 1])])
        .unwrap();
    std::fs::write(dir.join(format!("{who}.pem")), cert).unwrap();
    tls::write_private(&dir.join(format!("{who}.key")), key.as_bytes()).unwrap();
    TlsFiles {
        ca_cert: dir.join("ca.pem"),
        cert: dir.join(format!("{who}.pem")),
        key: dir.join(format!("{who}.key")),
    }
}

struct Cluster {
    _dir: tempfile::TempDir,
    data: std::path::PathBuf,
    node_tls: TlsFiles,
    gateway_tls: TlsFiles,
    ca: ClusterCa,
    tls_dir: std::path::PathBuf,
}

impl Cluster {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let tls_dir = dir.path().join("tls");
        std::fs::create_dir_all(&tls_dir).unwrap();
        let ca = ClusterCa::generate("test cluster CA").unwrap();
        let node_tls = issue(&ca, &tls_dir, "node", NODE_SERVER_NAME);
        let gateway_tls = issue(&ca, &tls_dir, "gateway", "gateway.custodia.internal");
        Cluster {
            data: dir.path().join("node-data"),
            _dir: dir,
            node_tls,
            gateway_tls,
            ca,
            tls_dir,
        }
    }

    async fn start(&self, listen: SocketAddr) -> RunningNode {
        self.start_in(listen, &prometheus::Registry::new()).await
    }

    /// [`Cluster::start`], the node's metrics in `registry`.
    async fn start_in(&self, listen: SocketAddr, registry: &prometheus::Registry) -> RunningNode {
        serve(
            NodeConfig {
                data_dir: self.data.clone(),
                listen,
                node_id: NodeId(7),
                tls: self.node_tls.clone(),
                scrub: Default::default(),
                store: Default::default(),
            },
            registry,
        )
        .await
        .unwrap()
    }

    fn client(&self) -> NodeClient {
        NodeClient::new(&self.gateway_tls).unwrap()
    }
}

fn loopback() -> SocketAddr {
    ([127, 0, 0, 1], 0).into()
}

fn key(n: u64) -> ShardKey {
    ShardKey {
        evidence: EvidenceId::new(1_700_000_000_000 + n, [n as u8; 10]),
        stripe: n,
        index: (n % 6) as u8,
    }
}

fn shard(n: u64, len: usize) -> (ShardHeader, Vec<u8>) {
    let body: Vec<u8> = (0..len).map(|i| (i as u64 * 7 + n) as u8).collect();
    let header = ShardHeader {
        key: key(n),
        code: ErasureCode::new(4, 2, SHARD_SIZE).unwrap(),
        stripe_len: len as u64 * 4,
        len: len as u32,
        blake3: Blake3Hash::of(&body),
    };
    (header, body)
}

#[tokio::test]
async fn put_get_stat_delete_and_info_round_trip() {
    let cluster = Cluster::new();
    let node = cluster.start(loopback()).await;
    let client = cluster.client();
    let addr = node.local_addr;

    for (n, len) in [
        (1, 0),
        (2, 1),
        (3, 4096),
        (4, SHARD_SIZE as usize - 1),
        (5, SHARD_SIZE as usize),
    ] {
        let (header, body) = shard(n, len);
        client
            .rpc_put_shard(addr, &header, Bytes::copy_from_slice(&body))
            .await
            .unwrap();
        let (got_header, got_body) = client.rpc_get_shard(addr, header.key).await.unwrap();
        assert_eq!(got_header, header);
        assert_eq!(got_body, body, "body of {len} bytes");
        for hash in [true, false] {
            let (_, sized) = client
                .rpc_read_shard(addr, header.key, hash, len as u32)
                .await
                .unwrap();
            assert_eq!(sized, body);
            // A caller whose record says another length refuses the answer
            // before reading it.
            assert!(matches!(
                client
                    .rpc_read_shard(addr, header.key, hash, len as u32 + 1)
                    .await,
                Err(NodeError::ShardLength { held, .. }) if held == len as u32
            ));
        }
        assert_eq!(
            client.rpc_stat_shard(addr, header.key).await.unwrap(),
            header
        );
    }

    let info: NodeInfo = client.rpc_node_info(addr).await.unwrap();
    assert_eq!(info.node, NodeId(7));
    assert_eq!(info.shards, 5);
    assert!(info.used_bytes > 2 * SHARD_SIZE as u64);
    assert!(info.capacity_bytes >= info.free_bytes);
    assert_eq!(info.disk_uuid, node.store().disk_uuid());

    assert!(client.rpc_delete_shard(addr, key(3)).await.unwrap());
    assert!(!client.rpc_delete_shard(addr, key(3)).await.unwrap());
    assert!(matches!(
        client.rpc_get_shard(addr, key(3)).await,
        Err(NodeError::Remote(ErrorCode::NotFound))
    ));
    assert!(matches!(
        client.rpc_stat_shard(addr, key(3)).await,
        Err(NodeError::Remote(ErrorCode::NotFound))
    ));
    assert_eq!(client.rpc_node_info(addr).await.unwrap().shards, 4);
    // A fenced delete lands only before its time (by the node's clock).
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    assert!(matches!(
        client
            .rpc_delete_shard_before(addr, key(2), now_ms - 1000)
            .await,
        Err(NodeError::Remote(ErrorCode::Late))
    ));
    assert!(
        client.rpc_stat_shard(addr, key(2)).await.is_ok(),
        "a late delete landed"
    );
    assert!(client
        .rpc_delete_shard_before(addr, key(2), now_ms + 60_000)
        .await
        .unwrap());
    assert!(matches!(
        client.rpc_stat_shard(addr, key(2)).await,
        Err(NodeError::Remote(ErrorCode::NotFound))
    ));
    assert_eq!(client.rpc_node_info(addr).await.unwrap().shards, 3);
    node.shutdown().await;
}

#[tokio::test]
async fn bodies_that_do_not_match_their_header_are_refused() {
    let cluster = Cluster::new();
    let node = cluster.start(loopback()).await;
    let client = cluster.client();
    let addr = node.local_addr;

    let (header, mut body) = shard(1, 5000);
    body[100] ^= 1;
    let err = client
        .rpc_put_shard(addr, &header, Bytes::copy_from_slice(&body))
        .await
        .unwrap_err();
    assert!(
        matches!(err, NodeError::Remote(ErrorCode::HashMismatch)),
        "{err:?}"
    );
    assert!(!err.is_retryable());
    assert!(matches!(
        client.rpc_stat_shard(addr, header.key).await,
        Err(NodeError::Remote(ErrorCode::NotFound))
    ));

    // Longer than the code's shard size: refused before the body is read.
    let small_code = ErasureCode::new(4, 2, 4096).unwrap();
    let big = vec![9u8; 4097];
    let header = ShardHeader {
        code: small_code,
        len: big.len() as u32,
        blake3: Blake3Hash::of(&big),
        ..shard(2, 0).0
    };
    let err = client
        .rpc_put_shard(addr, &header, Bytes::copy_from_slice(&big))
        .await
        .unwrap_err();
    assert!(
        matches!(err, NodeError::Remote(ErrorCode::BadRequest)),
        "{err:?}"
    );
    // A shard no stripe of its code has: an index past k+m.
    let (mut outside, body) = shard(2, 10);
    outside.key.index = 200;
    let err = client
        .rpc_put_shard(addr, &outside, Bytes::copy_from_slice(&body))
        .await
        .unwrap_err();
    assert!(
        matches!(err, NodeError::Remote(ErrorCode::BadRequest)),
        "{err:?}"
    );
    assert!(matches!(
        client.rpc_stat_shard(addr, outside.key).await,
        Err(NodeError::Remote(ErrorCode::NotFound))
    ));

    // A body of the wrong length never leaves the client.
    let (header, body) = shard(3, 10);
    assert!(matches!(
        client
            .rpc_put_shard(addr, &header, Bytes::copy_from_slice(&body[..9]))
            .await,
        Err(NodeError::BodyLength {
            expected: 10,
            actual: 9
        })
    ));

    // The connection survives refusals.
    assert_eq!(client.rpc_node_info(addr).await.unwrap().shards, 0);
    node.shutdown().await;
}

#[tokio::test]
async fn corrupt_shards_are_reported_and_quarantined() {
    let cluster = Cluster::new();
    let node = cluster.start(loopback()).await;
    let client = cluster.client();
    let addr = node.local_addr;
    let (header, body) = shard(1, 70_000);
    client
        .rpc_put_shard(addr, &header, Bytes::copy_from_slice(&body))
        .await
        .unwrap();

    let path = node.store().shard_path(&header.key);
    let mut bytes = std::fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&path, bytes).unwrap();

    assert!(matches!(
        client.rpc_get_shard(addr, header.key).await,
        Err(NodeError::Remote(ErrorCode::Corrupt))
    ));
    assert!(matches!(
        client.rpc_get_shard(addr, header.key).await,
        Err(NodeError::Remote(ErrorCode::NotFound))
    ));
    let quarantined = std::fs::read_dir(cluster.data.join("quarantine"))
        .unwrap()
        .count();
    assert_eq!(quarantined, 1);
    node.shutdown().await;
}

#[tokio::test]
async fn clients_and_nodes_from_another_ca_are_refused() {
    let cluster = Cluster::new();
    let node = cluster.start(loopback()).await;
    let addr = node.local_addr;

    let foreign_dir = cluster.tls_dir.join("foreign");
    std::fs::create_dir_all(&foreign_dir).unwrap();
    let foreign = ClusterCa::generate("someone else's CA").unwrap();
    let intruder = issue(
        &foreign,
        &foreign_dir,
        "intruder",
        "gateway.custodia.internal",
    );
    let client = NodeClient::new(&intruder).unwrap();
    let err = client.rpc_node_info(addr).await.unwrap_err();
    assert!(matches!(err, NodeError::Connection(_)), "{err:?}");

    // And a gateway of this cluster refuses a node certified by another CA.
    let impostor_tls = issue(&foreign, &foreign_dir, "impostor", NODE_SERVER_NAME);
    let impostor_dir = tempfile::tempdir().unwrap();
    let impostor = serve(
        NodeConfig {
            data_dir: impostor_dir.path().to_path_buf(),
            listen: loopback(),
            node_id: NodeId(666),
            tls: impostor_tls,
            scrub: Default::default(),
            store: Default::default(),
        },
        &prometheus::Registry::new(),
    )
    .await
    .unwrap();
    let err = cluster
        .client()
        .rpc_node_info(impostor.local_addr)
        .await
        .unwrap_err();
    assert!(matches!(err, NodeError::Connection(_)), "{err:?}");

    // The real pair still works.
    cluster.client().rpc_node_info(addr).await.unwrap();
    impostor.shutdown().await;
    node.shutdown().await;
}

#[tokio::test]
async fn shards_and_disk_identity_survive_a_restart_on_the_same_port() {
    let cluster = Cluster::new();
    let node = cluster.start(loopback()).await;
    let addr = node.local_addr;
    // Short connect timeout: the stopped node below must fail fast.
    let client = NodeClient::with_timeouts(
        &cluster.gateway_tls,
        storage_node::client::ClientTimeouts {
            connect: std::time::Duration::from_millis(500),
            request: std::time::Duration::from_secs(10),
            ..Default::default()
        },
    )
    .unwrap();
    let (header, body) = shard(1, 12_345);
    client
        .rpc_put_shard(addr, &header, Bytes::copy_from_slice(&body))
        .await
        .unwrap();
    let before = client.rpc_node_info(addr).await.unwrap();
    let space = client.rpc_space(addr).await.unwrap();
    assert_eq!(
        space.reserve_bytes,
        storage_node::store::DEFAULT_RESERVE_BYTES
    );
    assert!(space.free_bytes > 0 && space.free_bytes <= before.capacity_bytes);
    node.shutdown().await;

    assert!(
        client.rpc_node_info(addr).await.is_err(),
        "a stopped node must not answer"
    );

    let node = cluster.start(addr).await;
    assert_eq!(node.local_addr, addr);
    // The same client: its cached connection died with the old node.
    let after = client.rpc_node_info(addr).await.unwrap();
    assert_eq!(after.disk_uuid, before.disk_uuid);
    assert_eq!(
        (after.shards, after.used_bytes),
        (before.shards, before.used_bytes)
    );
    assert_eq!(
        client.rpc_get_shard(addr, header.key).await.unwrap().1,
        body
    );
    node.shutdown().await;
}

/// The node's `custodia_node_quic_connections` gauge: connections open now.
fn open_connections(registry: &prometheus::Registry) -> i64 {
    registry
        .gather()
        .iter()
        .find(|f| f.name() == "custodia_node_quic_connections")
        .and_then(|f| f.get_metric().first())
        .map(|m| m.get_gauge().get_value() as i64)
        .expect("the node exports custodia_node_quic_connections")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_puts_share_one_connection() {
    use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
    use std::sync::Arc;
    let cluster = Cluster::new();
    let registry = prometheus::Registry::new();
    let node = cluster.start_in(loopback(), &registry).await;
    let addr = node.local_addr;
    let client = cluster.client();
    // The most connections the node has open at once, watched while the
    // puts run: a client that dialled per request (or per clone) would
    // have many open together.
    let most = Arc::new(AtomicI64::new(0));
    let watching = Arc::new(AtomicBool::new(true));
    let watcher = tokio::spawn({
        let (registry, most, watching) = (registry.clone(), most.clone(), watching.clone());
        async move {
            while watching.load(Ordering::SeqCst) {
                most.fetch_max(open_connections(&registry), Ordering::SeqCst);
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
        }
    });
    let puts = (0..300u64).map(|n| {
        let client = client.clone();
        tokio::spawn(async move {
            let (header, body) = shard(n, 64 * 1024 + n as usize);
            client
                .rpc_put_shard(addr, &header, Bytes::copy_from_slice(&body))
                .await
        })
    });
    let puts: Vec<_> = puts.collect();
    for put in puts {
        put.await.unwrap().unwrap();
    }
    watching.store(false, Ordering::SeqCst);
    watcher.await.unwrap();
    assert_eq!(
        most.load(Ordering::SeqCst),
        1,
        "300 concurrent puts had that many connections open at once"
    );
    assert_eq!(client.rpc_node_info(addr).await.unwrap().shards, 300);
    for n in [0u64, 150, 299] {
        assert_eq!(
            client.rpc_get_shard(addr, key(n)).await.unwrap().1,
            shard(n, 64 * 1024 + n as usize).1
        );
    }
    // The one connection outlives its requests, for the next ones.
    assert_eq!(
        (open_connections(&registry), client.connection_rtts().len()),
        (1, 1),
        "connections open at the node, and cached by the client, after the requests"
    );
    node.shutdown().await;
}

/// Sends raw bytes on one stream and returns the response frame.
async fn raw_exchange(conn: &quinn::Connection, bytes: &[u8]) -> Response {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    // The node may stop reading before all bytes arrive; its answer is what
    // this test checks.
    let _ = send.write_all(bytes).await;
    let _ = send.finish();
    let all = recv.read_to_end(1 << 20).await.unwrap();
    let len = protocol::wire::decode_frame_prefix(all[..5].try_into().unwrap()).unwrap();
    assert_eq!(all.len(), 5 + len, "error responses carry no body");
    Response::decode_body(&all[5..]).unwrap()
}

#[tokio::test]
async fn malformed_frames_get_error_codes_not_panics() {
    let cluster = Cluster::new();
    let node = cluster.start(loopback()).await;
    let mut endpoint = quinn::Endpoint::client(loopback()).unwrap();
    endpoint.set_default_client_config(tls::client_config(&cluster.gateway_tls).unwrap());
    let conn = endpoint
        .connect(node.local_addr, NODE_SERVER_NAME)
        .unwrap()
        .await
        .unwrap();

    let bad = Response::Error(ErrorCode::BadRequest);
    assert_eq!(
        raw_exchange(&conn, &[9, 0, 0, 0, 0]).await,
        Response::Error(ErrorCode::UnsupportedVersion)
    );
    assert_eq!(raw_exchange(&conn, &[1, 0xff, 0xff, 0xff, 0x7f]).await, bad);
    assert_eq!(
        raw_exchange(&conn, &[1, 3, 0, 0, 0, 0xee, 0xee, 0xee]).await,
        bad
    );
    assert_eq!(raw_exchange(&conn, &[1, 3]).await, bad);
    assert_eq!(raw_exchange(&conn, &[]).await, bad);

    // A put that promises more body than it sends.
    let (header, body) = shard(1, 1000);
    let mut frame = Request::PutShard(header).encode();
    frame.extend_from_slice(&body[..500]);
    assert_eq!(raw_exchange(&conn, &frame).await, bad);

    // A put whose header carries an invalid code.
    let mut header = shard(2, 10).0;
    header.code.k = 0;
    assert_eq!(
        raw_exchange(&conn, &Request::PutShard(header).encode()).await,
        bad
    );

    // The connection is still good.
    let info = raw_exchange(&conn, &Request::NodeInfo.encode()).await;
    assert!(matches!(info, Response::Info(NodeInfo { shards: 0, .. })));
    conn.close(0u32.into(), b"done");
    node.shutdown().await;
}

#[tokio::test]
async fn an_unreachable_node_times_out_and_is_retryable() {
    let cluster = Cluster::new();
    let client = NodeClient::with_timeouts(
        &cluster.gateway_tls,
        storage_node::client::ClientTimeouts {
            connect: std::time::Duration::from_millis(300),
            request: std::time::Duration::from_secs(1),
            ..Default::default()
        },
    )
    .unwrap();
    // Bound but silent: packets vanish, as with a node that is down.
    let silent = std::net::UdpSocket::bind(loopback()).unwrap();
    let err = client
        .rpc_node_info(silent.local_addr().unwrap())
        .await
        .unwrap_err();
    assert!(matches!(err, NodeError::Timeout), "{err:?}");
    assert!(err.is_retryable());
    // Keep the CA alive until here so the files above stay meaningful.
    drop(cluster.ca);
}

/// The node counts what it does on the registry it is given, and the
/// exporter serves that registry as Prometheus text at `/metrics`.
#[tokio::test]
async fn metrics_count_requests_shards_and_corruption() {
    let cluster = Cluster::new();
    let registry = prometheus::Registry::new();
    let node = serve(
        NodeConfig {
            data_dir: cluster.data.clone(),
            listen: loopback(),
            node_id: NodeId(7),
            tls: cluster.node_tls.clone(),
            scrub: Default::default(),
            // One file per shard, so the test can damage one.
            store: storage_node::store::StoreConfig {
                small_shard_max: 0,
                ..Default::default()
            },
        },
        &registry,
    )
    .await
    .unwrap();
    let client = cluster.client();
    let addr = node.local_addr;
    let (good, good_body) = shard(1, 5000);
    let (bad, bad_body) = shard(2, 7000);
    client
        .rpc_put_shard(addr, &good, Bytes::copy_from_slice(&good_body))
        .await
        .unwrap();
    client
        .rpc_put_shard(addr, &bad, Bytes::copy_from_slice(&bad_body))
        .await
        .unwrap();
    // A body damaged on its way is refused and stored nowhere: no shard
    // on this disk is corrupt.
    let (liar, mut liar_body) = shard(3, 3000);
    liar_body[10] ^= 1;
    assert!(client
        .rpc_put_shard(addr, &liar, Bytes::from(liar_body))
        .await
        .is_err());
    client.rpc_get_shard(addr, good.key).await.unwrap();
    let path = node.store().shard_path(&bad.key);
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&path, bytes).unwrap();
    assert!(client.rpc_get_shard(addr, bad.key).await.is_err());
    assert!(client.rpc_get_shard(addr, key(9)).await.is_err());

    let (metrics_addr, _task) = storage_node::metrics::serve_http(loopback(), registry.clone())
        .await
        .unwrap();
    // A raw HTTP/1.1 GET: what Prometheus sends.
    let text = tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(metrics_addr).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    })
    .await
    .unwrap();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    // One address holds a few connections at most: the next from it is
    // closed at once, and a scrape from another address is still served.
    let from = |ip: [u8; 4]| async move {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind((ip, 0).into()).unwrap();
        socket.connect(metrics_addr).await.unwrap()
    };
    let mut held = Vec::new();
    for _ in 0..8 {
        held.push(from([127, 0, 0, 1]).await);
    }
    let started = std::time::Instant::now();
    let mut ninth = from([127, 0, 0, 1]).await;
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        tokio::io::AsyncReadExt::read(&mut ninth, &mut buf),
    )
    .await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "a ninth connection from one address was kept: {read:?} after {:?}",
        started.elapsed()
    );
    let mut other = from([127, 0, 0, 2]).await;
    tokio::io::AsyncWriteExt::write_all(
        &mut other,
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let mut answer = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(&mut other, &mut answer)
        .await
        .unwrap();
    assert!(
        answer.starts_with(b"HTTP/1.1 200"),
        "{:?}",
        &answer[..answer.len().min(64)]
    );
    drop(held);
    // Seen closed by the node before the next client (which must meet the
    // head deadline, not the per-address bound).
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    // A client that connects and says nothing is not kept: its connection
    // is closed once the head's deadline (10 s) passes.
    let closed = tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let mut s = std::net::TcpStream::connect(metrics_addr).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(30)))
            .unwrap();
        let started = std::time::Instant::now();
        let mut buf = [0u8; 512];
        // Closed: end of stream (perhaps after a 408), not a timeout.
        while s.read(&mut buf).is_ok_and(|n| n > 0) {}
        started.elapsed()
    })
    .await
    .unwrap();
    assert!(
        closed < std::time::Duration::from_secs(20),
        "a silent metrics client was kept {closed:?}"
    );
    assert!(
        closed > std::time::Duration::from_secs(5),
        "a silent metrics client was refused, not timed out: {closed:?}"
    );
    let value = |series: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("{series} missing from:\n{text}"))
    };
    assert_eq!(value("custodia_node_shards_written_total"), 2.0);
    assert_eq!(value("custodia_node_shard_bytes_written_total"), 12_000.0);
    assert_eq!(value("custodia_node_shards_read_total"), 1.0);
    assert_eq!(value("custodia_node_shard_bytes_read_total"), 5000.0);
    assert_eq!(value("custodia_node_corrupt_shards_total"), 1.0);
    assert_eq!(value("custodia_node_refused_puts_total"), 1.0);
    assert_eq!(
        value(r#"custodia_node_requests_total{op="put",result="ok"}"#),
        2.0
    );
    assert_eq!(
        value(r#"custodia_node_requests_total{op="get",result="corrupt"}"#),
        1.0
    );
    assert_eq!(
        value(r#"custodia_node_requests_total{op="get",result="not_found"}"#),
        1.0
    );
    assert_eq!(
        value(r#"custodia_node_request_duration_seconds_count{op="put"}"#),
        3.0
    );
    assert_eq!(value("custodia_node_quic_connections"), 1.0);
    // The disk gauges are set at start-up (the first tick is immediate).
    assert!(value("custodia_node_capacity_bytes") > 0.0);
    node.shutdown().await;
}

/// Forwards UDP between one client and `node` until `silent` is set, then
/// drops every packet both ways: a node killed mid-request, as QUIC sees it
/// (no close, just silence). Returns the address to connect to.
async fn relay(
    node: SocketAddr,
    silent: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> SocketAddr {
    use std::sync::atomic::Ordering;
    let front = tokio::net::UdpSocket::bind(loopback()).await.unwrap();
    let back = tokio::net::UdpSocket::bind(loopback()).await.unwrap();
    back.connect(node).await.unwrap();
    let addr = front.local_addr().unwrap();
    tokio::spawn(async move {
        let mut client = None;
        let (mut up, mut down) = (vec![0u8; 65_536], vec![0u8; 65_536]);
        loop {
            tokio::select! {
                Ok((n, from)) = front.recv_from(&mut up) => {
                    client = Some(from);
                    if !silent.load(Ordering::Relaxed) {
                        let _ = back.send(&up[..n]).await;
                    }
                }
                Ok(n) = back.recv(&mut down) => {
                    if let (Some(to), false) = (client, silent.load(Ordering::Relaxed)) {
                        let _ = front.send_to(&down[..n], to).await;
                    }
                }
            }
        }
    });
    addr
}

/// A node holding every stream its connection allows (a disk pausing while
/// hundreds of puts wait for their fsync) is busy, not gone: the liveness
/// check, which cannot open a stream of its own then, waits for the node
/// to acknowledge a keep-alive rather than closing the connection and
/// failing every request on it as unresponsive. Requests end at their own
/// limit.
#[tokio::test]
async fn a_node_holding_every_stream_is_busy_not_gone() {
    let cluster = Cluster::new();
    // A node that takes requests and never answers them, with the streams
    // a connection gets before its peer's role is known (4).
    let server = tls::server_config(&cluster.node_tls).unwrap();
    let endpoint =
        storage_node::udp::endpoint(loopback(), Some((quinn::EndpointConfig::default(), server)))
            .unwrap();
    let addr = endpoint.local_addr().unwrap();
    let (opened_tx, opened) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(incoming) = endpoint.accept().await {
            let opened_tx = opened_tx.clone();
            tokio::spawn(async move {
                let Ok(conn) = incoming.await else { return };
                // And it tries to open a stream of its own to the gateway,
                // which never accepts one: it gets no credit to.
                let toward = conn.clone();
                tokio::spawn(async move {
                    let open =
                        tokio::time::timeout(std::time::Duration::from_secs(1), toward.open_bi());
                    let _ = opened_tx.send(open.await.is_ok());
                });
                let mut held = Vec::new();
                while let Ok(stream) = conn.accept_bi().await {
                    held.push(stream);
                }
            });
        }
    });
    let stall = std::time::Duration::from_millis(200);
    let limit = std::time::Duration::from_secs(5);
    let client = NodeClient::with_timeouts(
        &cluster.gateway_tls,
        storage_node::client::ClientTimeouts {
            connect: std::time::Duration::from_secs(2),
            request: limit,
            stall,
        },
    )
    .unwrap();
    let started = std::time::Instant::now();
    let calls: Vec<_> = (0..6)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move { client.rpc_node_info(addr).await })
        })
        .collect();
    for call in calls {
        let err = call.await.unwrap().unwrap_err();
        assert!(matches!(err, NodeError::Timeout), "{err:?}");
    }
    assert!(started.elapsed() >= limit, "{:?}", started.elapsed());
    let mut opened = opened;
    assert_eq!(
        opened.recv().await,
        Some(false),
        "a node opened a stream toward the gateway"
    );
}

#[tokio::test]
async fn a_request_to_a_node_gone_silent_fails_after_a_liveness_check_not_the_idle_timeout() {
    let cluster = Cluster::new();
    let node = cluster.start(loopback()).await;
    let silent = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let addr = relay(node.local_addr, silent.clone()).await;
    let stall = std::time::Duration::from_millis(300);
    let client = NodeClient::with_timeouts(
        &cluster.gateway_tls,
        storage_node::client::ClientTimeouts {
            connect: std::time::Duration::from_secs(2),
            request: std::time::Duration::from_secs(30),
            stall,
        },
    )
    .unwrap();
    let (header, body) = shard(3, 200_000);
    client
        .rpc_put_shard(addr, &header, Bytes::copy_from_slice(&body))
        .await
        .unwrap();

    // Silence mid-connection: four reads and a put in flight on it. (A
    // moment first for what the node sent before the silence to be taken
    // in: anything received during a check counts as a sign of life.)
    silent.store(true, std::sync::atomic::Ordering::Relaxed);
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let started = std::time::Instant::now();
    let mut calls = Vec::new();
    for _ in 0..4 {
        let (client, key) = (client.clone(), header.key);
        calls.push(tokio::spawn(async move {
            client.rpc_get_shard(addr, key).await.map(|_| ())
        }));
    }
    let (other, other_body) = shard(4, 100_000);
    let putter = client.clone();
    calls.push(tokio::spawn(async move {
        putter
            .rpc_put_shard(addr, &other, Bytes::from(other_body))
            .await
    }));
    for call in calls {
        let err = call.await.unwrap().unwrap_err();
        assert!(matches!(err, NodeError::Unresponsive), "{err:?}");
        assert!(err.is_retryable());
    }
    let took = started.elapsed();
    // A stall, a check as long, and no reconnect: far under the 10 s idle
    // timeout and the 30 s request timeout.
    assert!(took < stall * 6, "took {took:?}");

    // The node answers again (a restart, a healed network): the next request
    // gets a fresh connection.
    silent.store(false, std::sync::atomic::Ordering::Relaxed);
    let (_, back) = client.rpc_get_shard(addr, header.key).await.unwrap();
    assert_eq!(back[..], body[..]);

    // The check alone, as a read that hedged past a slow node asks for it.
    assert!(client.check_alive(addr).await, "a live node answers");
    silent.store(true, std::sync::atomic::Ordering::Relaxed);
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let started = std::time::Instant::now();
    assert!(
        !client.check_alive(addr).await,
        "a silent node is not alive"
    );
    assert!(
        started.elapsed() < stall * 3,
        "took {:?}",
        started.elapsed()
    );
    silent.store(false, std::sync::atomic::Ordering::Relaxed);
    let (_, back) = client.rpc_get_shard(addr, header.key).await.unwrap();
    assert_eq!(back[..], body[..]);
    node.shutdown().await;
}

/// A node asked to rebuild a shard reads k others from their nodes, checks
/// each against the hash the request names, decodes, and stores the result
/// only if it has the hash the manifest gives it; a source that is missing
/// or not the named shard, or a result with another hash, stores nothing.
/// Asked with the shard itself as the one source, it copies it.
#[tokio::test]
async fn a_node_rebuilds_or_copies_a_shard_and_stores_nothing_from_bad_sources() {
    use protocol::wire::{RebuildShard, RebuildSource};
    let cluster = Cluster::new();
    let registries: Vec<_> = (0..3).map(|_| prometheus::Registry::new()).collect();
    let start = |n: u32| {
        serve(
            NodeConfig {
                data_dir: cluster._dir.path().join(format!("node-{n}")),
                listen: loopback(),
                node_id: NodeId(n),
                tls: cluster.node_tls.clone(),
                scrub: Default::default(),
                store: Default::default(),
            },
            &registries[n as usize - 1],
        )
    };
    let (a, b, c) = (
        start(1).await.unwrap(),
        start(2).await.unwrap(),
        start(3).await.unwrap(),
    );
    let client = cluster.client();

    // RS(2,1): two data shards of 300,000 bytes and their parity.
    let code = ErasureCode::new(2, 1, SHARD_SIZE).unwrap();
    let len = 300_000usize;
    let mut shards: Vec<Vec<u8>> = (0..3u8)
        .map(|i| {
            (0..len)
                .map(|j| (j as u8).wrapping_mul(31) ^ i.wrapping_mul(97))
                .collect()
        })
        .collect();
    shards[2].fill(0);
    reed_solomon_erasure::galois_8::ReedSolomon::new(2, 1)
        .unwrap()
        .encode(&mut shards)
        .unwrap();
    let evidence = EvidenceId::new(1_700_000_000_000, [9; 10]);
    let header = |index: u8| ShardHeader {
        key: ShardKey {
            evidence,
            stripe: 0,
            index,
        },
        code,
        stripe_len: 2 * len as u64,
        len: len as u32,
        blake3: Blake3Hash::of(&shards[usize::from(index)]),
    };
    for (node, index) in [(&a, 0u8), (&b, 2u8)] {
        let body = Bytes::copy_from_slice(&shards[usize::from(index)]);
        client
            .rpc_put_shard(node.local_addr, &header(index), body)
            .await
            .unwrap();
    }
    let source = |node: &RunningNode, index: u8| RebuildSource {
        addr: node.local_addr,
        index,
        blake3: header(index).blake3,
    };
    let good = RebuildShard {
        header: header(1),
        sources: vec![source(&a, 0), source(&b, 2)],
    };
    let stored_on_c = || client.rpc_stat_shard(c.local_addr, header(1).key);

    // A source hash that is not the shard's.
    let mut wrong_source = good.clone();
    wrong_source.sources[1].blake3 = Blake3Hash([0; 32]);
    // A source asked of a node that does not have it.
    let mut absent = good.clone();
    absent.sources[0].addr = c.local_addr;
    for bad in [wrong_source, absent] {
        assert!(matches!(
            client.rpc_rebuild_shard(c.local_addr, &bad).await,
            Err(NodeError::Remote(ErrorCode::SourceUnavailable))
        ));
        assert!(matches!(
            stored_on_c().await,
            Err(NodeError::Remote(ErrorCode::NotFound))
        ));
    }
    // A result that is not the manifest's shard.
    let mut wrong_result = good.clone();
    wrong_result.header.blake3 = Blake3Hash([1; 32]);
    assert!(matches!(
        client.rpc_rebuild_shard(c.local_addr, &wrong_result).await,
        Err(NodeError::Remote(ErrorCode::HashMismatch))
    ));
    // Fewer than k sources.
    let mut short = good.clone();
    short.sources.pop();
    assert!(matches!(
        client.rpc_rebuild_shard(c.local_addr, &short).await,
        Err(NodeError::Remote(ErrorCode::BadRequest))
    ));
    assert!(matches!(
        stored_on_c().await,
        Err(NodeError::Remote(ErrorCode::NotFound))
    ));

    // The good request: C holds the lost data shard, byte for byte.
    client.rpc_rebuild_shard(c.local_addr, &good).await.unwrap();
    let (got_header, got_body) = client
        .rpc_get_shard(c.local_addr, header(1).key)
        .await
        .unwrap();
    assert_eq!(got_header, header(1));
    assert_eq!(got_body, shards[1]);
    // Asked again (a retry), it answers the same.
    client.rpc_rebuild_shard(c.local_addr, &good).await.unwrap();

    // A copy: the parity shard, from B to C as it is; asked of a node
    // without it (A), nothing is stored.
    let copy = |from: &RunningNode| RebuildShard {
        header: header(2),
        sources: vec![source(from, 2)],
    };
    assert!(matches!(
        client.rpc_rebuild_shard(c.local_addr, &copy(&a)).await,
        Err(NodeError::Remote(ErrorCode::SourceUnavailable))
    ));
    assert!(matches!(
        client.rpc_stat_shard(c.local_addr, header(2).key).await,
        Err(NodeError::Remote(ErrorCode::NotFound))
    ));
    client
        .rpc_rebuild_shard(c.local_addr, &copy(&b))
        .await
        .unwrap();
    let (got_header, got_body) = client
        .rpc_get_shard(c.local_addr, header(2).key)
        .await
        .unwrap();
    assert_eq!(got_header, header(2));
    assert_eq!(got_body, shards[2]);
    for node in [a, b, c] {
        node.shutdown().await;
    }
}

/// Any leaf the cluster CA issued passes the handshake, but only the
/// gateway's writes, deletes or lists shards: another node's key (taken
/// from its host, say) reads a shard it names, as a rebuild does, and is
/// refused everything else.
#[tokio::test]
async fn only_the_gateway_writes_or_deletes_shards() {
    let cluster = Cluster::new();
    let node = cluster.start(loopback()).await;
    let addr = node.local_addr;
    let (header, body) = shard(3, 3000);
    cluster
        .client()
        .rpc_put_shard(addr, &header, Bytes::copy_from_slice(&body))
        .await
        .unwrap();

    let peer = NodeClient::new(&cluster.node_tls).unwrap();
    // Reads are a peer's (a rebuild reads its sources from other nodes).
    let (got, bytes) = peer.rpc_get_shard(addr, header.key).await.unwrap();
    assert_eq!((got.key, bytes), (header.key, body.clone()));
    let err = peer.rpc_delete_shard(addr, header.key).await.unwrap_err();
    assert!(
        matches!(err, NodeError::Remote(ErrorCode::Forbidden)),
        "{err:?}"
    );
    // Nor does it learn what the node holds: listing, stat and verify are
    // the gateway's alone.
    for err in [
        peer.rpc_list_shards(addr, None)
            .await
            .map(|_| ())
            .unwrap_err(),
        peer.rpc_stat_shard(addr, header.key)
            .await
            .map(|_| ())
            .unwrap_err(),
        peer.rpc_verify_shard(addr, header.key)
            .await
            .map(|_| ())
            .unwrap_err(),
    ] {
        assert!(
            matches!(err, NodeError::Remote(ErrorCode::Forbidden)),
            "{err:?}"
        );
    }
    let (other, other_body) = shard(4, 3000);
    let err = peer
        .rpc_put_shard(addr, &other, Bytes::copy_from_slice(&other_body))
        .await
        .unwrap_err();
    assert!(
        matches!(err, NodeError::Remote(ErrorCode::Forbidden)),
        "{err:?}"
    );
    // A leaf of the cluster CA named for neither (an HTTPS API's, older
    // ones of which can act as clients) reads nothing: it only says hello.
    let https = issue(
        &cluster.ca,
        &cluster.tls_dir,
        "custodia S3 API",
        "localhost",
    );
    let api = NodeClient::new(&https).unwrap();
    assert!(api.rpc_node_info(addr).await.is_ok());
    for err in [
        api.rpc_get_shard(addr, header.key)
            .await
            .map(|_| ())
            .unwrap_err(),
        api.rpc_list_shards(addr, None)
            .await
            .map(|_| ())
            .unwrap_err(),
    ] {
        assert!(
            matches!(err, NodeError::Remote(ErrorCode::Forbidden)),
            "{err:?}"
        );
    }
    // An HTTPS certificate issued now cannot act as a client at all.
    let (cert, key) = cluster
        .ca
        .issue_server("custodia S3 API", &["localhost".to_string()], &[])
        .unwrap();
    std::fs::write(cluster.tls_dir.join("server-only.pem"), cert).unwrap();
    tls::write_private(&cluster.tls_dir.join("server-only.key"), key.as_bytes()).unwrap();
    let server_only = NodeClient::new(&TlsFiles {
        cert: cluster.tls_dir.join("server-only.pem"),
        key: cluster.tls_dir.join("server-only.key"),
        ..https.clone()
    })
    .unwrap();
    assert!(server_only.rpc_node_info(addr).await.is_err());
    // Nothing changed: the shard is still there, the other never stored.
    assert!(cluster
        .client()
        .rpc_get_shard(addr, header.key)
        .await
        .is_ok());
    assert!(cluster
        .client()
        .rpc_get_shard(addr, other.key)
        .await
        .is_err());
    // The gateway still deletes.
    assert!(cluster
        .client()
        .rpc_delete_shard(addr, header.key)
        .await
        .unwrap());
    node.shutdown().await;
}

/// Removed nodes stay refused whatever order gateways' lists arrive in:
/// a list read before a removal, arriving after the one that names it,
/// does not have the node just removed served again. Kept across a
/// restart.
#[tokio::test]
async fn a_stale_list_of_removed_nodes_unremoves_none() {
    let cluster = Cluster::new();
    let node = cluster.start(loopback()).await;
    let addr = node.local_addr;
    let (header, body) = shard(5, 3000);
    let gateway = cluster.client();
    gateway
        .rpc_put_shard(addr, &header, Bytes::copy_from_slice(&body))
        .await
        .unwrap();
    // A node's certificate, with the names `init` gives it.
    let peer = |id: u32| {
        let (cert, key) = cluster
            .ca
            .issue(&format!("custodia node {id}"), &tls::node_names(id), &[])
            .unwrap();
        let dir = &cluster.tls_dir;
        std::fs::write(dir.join(format!("node-{id}.pem")), cert).unwrap();
        tls::write_private(&dir.join(format!("node-{id}.key")), key.as_bytes()).unwrap();
        NodeClient::new(&TlsFiles {
            ca_cert: dir.join("ca.pem"),
            cert: dir.join(format!("node-{id}.pem")),
            key: dir.join(format!("node-{id}.key")),
        })
        .unwrap()
    };
    let (three, five) = (peer(3), peer(5));
    assert!(five.rpc_get_shard(addr, header.key).await.is_ok());
    // Node 5 removed after node 3: the newer list, then an older one.
    assert_eq!(gateway.rpc_deny_nodes(addr, vec![3, 5]).await.unwrap(), 2);
    assert_eq!(gateway.rpc_deny_nodes(addr, vec![3]).await.unwrap(), 2);
    let refused = |err: NodeError| matches!(err, NodeError::Remote(ErrorCode::Forbidden));
    for client in [&three, &five] {
        let err = client.rpc_get_shard(addr, header.key).await.unwrap_err();
        assert!(refused(err));
    }
    node.shutdown().await;
    let node = cluster.start(loopback()).await;
    let err = five
        .rpc_get_shard(node.local_addr, header.key)
        .await
        .unwrap_err();
    assert!(refused(err), "after a restart");
    // A node never removed still reads.
    assert!(peer(4)
        .rpc_get_shard(node.local_addr, header.key)
        .await
        .is_ok());
}
