//! The cluster CA and the mutual-TLS QUIC configurations built on it.
//!
//! [`ClusterCa`] creates the CA (`custodia init`) and issues leaf certificates
//! for nodes and gateways; [`TlsFiles`] names a party's CA, certificate and key
//! on disk; [`server_config`] (storage nodes) and [`client_config`] (gateways,
//! `NodeClient`) turn them into quinn configurations in which each side accepts
//! only certificates chained to the cluster CA. [`write_private`] writes key files
//! readable only by their owner.
//!
//! Every rustls object here is built with the *ring* provider explicitly: other
//! crates in the workspace pull in aws-lc-rs too, and with two providers compiled
//! in, rustls' process-wide default panics rather than guess.

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub use crate::store::write_private;

/// The DNS name every node certificate carries: nodes are addressed by IP,
/// so their certificates are checked against cluster-internal names. Nodes
/// dial each other by this one (what they read from each other is checked
/// against the manifest's hashes), and a peer carrying it is a node.
pub const NODE_SERVER_NAME: &str = "node.custodia.internal";

/// The name node `id`'s certificate carries for it alone, which gateways
/// dial it by: one node's stolen key cannot pass for another node (take
/// its shards, claim them durable, say it erased them).
pub fn node_server_name(id: u32) -> String {
    format!("node-{id}.custodia.internal")
}

/// The node id a name [`node_server_name`] made names, if it is one.
pub fn node_id_of_name(name: &str) -> Option<u32> {
    let id = name
        .strip_prefix("node-")?
        .strip_suffix(".custodia.internal")?;
    // As `node_server_name` writes it: no sign, no leading zero.
    if id.starts_with(['+', '0']) && id != "0" {
        return None;
    }
    id.parse().ok()
}

/// Every name node `id`'s certificate is issued for.
pub fn node_names(id: u32) -> Vec<String> {
    vec![NODE_SERVER_NAME.to_string(), node_server_name(id)]
}
/// The DNS name in gateway certificates. Nodes accept any certificate the
/// cluster CA issued, but only one carrying this name may write or delete
/// shards (others only read: a node rebuilding from its peers).
pub const GATEWAY_NAME: &str = "gateway.custodia.internal";
/// ALPN protocol of node traffic; bumped if the frames ever change incompatibly.
pub const ALPN: &[u8] = b"custodia/1";

/// How long the CA and leaf certificates are valid: evidence is kept for
/// decades, and an expired cluster CA would stop every node at once.
const CA_VALIDITY_DAYS: i64 = 20 * 365;
/// Leaves expire a little before the CA (and never after it, however late
/// they are issued), so no leaf outlives its issuer.
const LEAF_VALIDITY_DAYS: i64 = CA_VALIDITY_DAYS - 30;

/// Why a certificate could not be made or a TLS configuration built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file named in [`TlsFiles`] could not be read.
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A PEM file could not be parsed.
    #[error("parsing {path}: {source}")]
    Pem {
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    /// A certificate file holds no certificate.
    #[error("{0} holds no certificate")]
    NoCertificate(PathBuf),
    /// The cluster CA expires too soon to issue anything more.
    #[error("the cluster CA expires {0}: it can issue no more certificates; replace it")]
    CaExpiring(time::OffsetDateTime),
    /// Generating or signing a certificate failed, or a CA PEM was unusable.
    #[error("certificate generation: {0}")]
    Certificate(#[from] rcgen::Error),
    /// rustls refused the configuration (e.g. a key that does not match its
    /// certificate, or a CA certificate it cannot use as a trust anchor).
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// The client-certificate verifier could not be built from the CA.
    #[error("client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    /// The rustls configuration lacks a cipher suite QUIC needs.
    #[error("QUIC TLS configuration: {0}")]
    Quic(#[from] quinn::crypto::rustls::NoInitialCipherSuite),
}

/// The cluster's certificate authority: its certificate and signing key.
pub struct ClusterCa {
    cert_pem: String,
    key_pem: String,
    issuer: Issuer<'static, KeyPair>,
    /// When the CA certificate expires: no leaf it issues outlives it.
    not_after: time::OffsetDateTime,
}

impl std::fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("ClusterCa").finish_non_exhaustive()
    }
}

impl ClusterCa {
    /// A new self-signed CA named `name`, valid for 20 years.
    pub fn generate(name: &str) -> Result<Self, TlsError> {
        Self::generate_for(name, CA_VALIDITY_DAYS)
    }

    /// A new CA valid for `days`.
    fn generate_for(name: &str, days: i64) -> Result<Self, TlsError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        set_validity(&mut params, days);
        let cert = params.self_signed(&key)?;
        let key_pem = key.serialize_pem();
        let not_after = params.not_after;
        Ok(ClusterCa {
            cert_pem: cert.pem(),
            key_pem,
            issuer: Issuer::new(params, key),
            not_after,
        })
    }

    /// The CA certificate and private key, PEM-encoded. Write the key with
    /// [`write_private`].
    pub fn to_pem(&self) -> (String, String) {
        (self.cert_pem.clone(), self.key_pem.clone())
    }

    /// The CA certificate, PEM-encoded.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Loads a CA written by [`ClusterCa::to_pem`].
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, TlsError> {
        let key = KeyPair::from_pem(key_pem)?;
        let not_after = {
            let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes())
                .map_err(|_| rcgen::Error::CouldNotParseCertificate)?;
            let cert = pem
                .parse_x509()
                .map_err(|_| rcgen::Error::CouldNotParseCertificate)?;
            time::OffsetDateTime::from_unix_timestamp(cert.validity().not_after.timestamp())
                .map_err(|_| rcgen::Error::CouldNotParseCertificate)?
        };
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)?;
        Ok(ClusterCa {
            cert_pem: cert_pem.to_string(),
            key_pem: key_pem.to_string(),
            issuer,
            not_after,
        })
    }

    /// Issues a leaf certificate (with a fresh key) usable both as a TLS server
    /// and a TLS client, for `dns_names` and `ips`: a node's or a gateway's.
    /// Returns `(cert_pem, key_pem)`.
    pub fn issue(
        &self,
        common_name: &str,
        dns_names: &[String],
        ips: &[IpAddr],
    ) -> Result<(String, String), TlsError> {
        self.issue_for(common_name, dns_names, ips, true)
    }

    /// As [`issue`](Self::issue), but usable only as a TLS server: an HTTPS
    /// API's certificate, whose key may be handed to a proxy, must not
    /// also be a client identity the nodes accept.
    pub fn issue_server(
        &self,
        common_name: &str,
        dns_names: &[String],
        ips: &[IpAddr],
    ) -> Result<(String, String), TlsError> {
        self.issue_for(common_name, dns_names, ips, false)
    }

    /// As [`issue`](Self::issue), for the key already in `key_pem` (a
    /// certificate reissued with other names: only the certificate file
    /// changes, in one rename, never out of step with its key).
    pub fn reissue(
        &self,
        common_name: &str,
        dns_names: &[String],
        ips: &[IpAddr],
        key_pem: &str,
    ) -> Result<String, TlsError> {
        let key = KeyPair::from_pem(key_pem)?;
        self.sign(common_name, dns_names, ips, true, &key)
    }

    fn issue_for(
        &self,
        common_name: &str,
        dns_names: &[String],
        ips: &[IpAddr],
        client: bool,
    ) -> Result<(String, String), TlsError> {
        let key = KeyPair::generate()?;
        let cert = self.sign(common_name, dns_names, ips, client, &key)?;
        Ok((cert, key.serialize_pem()))
    }

    fn sign(
        &self,
        common_name: &str,
        dns_names: &[String],
        ips: &[IpAddr],
        client: bool,
        key: &KeyPair,
    ) -> Result<String, TlsError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.subject_alt_names = dns_names
            .iter()
            .map(|n| Ok(SanType::DnsName(n.clone().try_into()?)))
            .chain(ips.iter().map(|ip| Ok(SanType::IpAddress(*ip))))
            .collect::<Result<_, rcgen::Error>>()?;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        if client {
            params
                .extended_key_usages
                .push(ExtendedKeyUsagePurpose::ClientAuth);
        }
        params.use_authority_key_identifier_extension = true;
        set_validity(&mut params, LEAF_VALIDITY_DAYS);
        // A leaf issued years after the CA (a node added late) still
        // expires with it at the latest, a day before.
        params.not_after = params
            .not_after
            .min(self.not_after - time::Duration::days(1));
        // (Less than a day of use left is no certificate worth issuing.)
        if params.not_after < time::OffsetDateTime::now_utc() + time::Duration::days(1) {
            return Err(TlsError::CaExpiring(self.not_after));
        }
        let cert = params.signed_by(key, &self.issuer)?;
        Ok(cert.pem())
    }
}

fn set_validity(params: &mut CertificateParams, days: i64) {
    let now = time::OffsetDateTime::now_utc();
    // A day of slack for clocks that lag the machine that issued the cert.
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(days);
}

/// Where one party's TLS material lives: the cluster CA certificate, its own
/// certificate (chain) and its private key, all PEM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    pub ca_cert: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The parsed contents of [`TlsFiles`].
#[derive(Debug)]
pub struct TlsMaterial {
    pub ca: Vec<CertificateDer<'static>>,
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl TlsFiles {
    /// Reads and parses the three files.
    pub fn load(&self) -> Result<TlsMaterial, TlsError> {
        let ca = read_certs(&self.ca_cert)?;
        let chain = read_certs(&self.cert)?;
        let key_pem = read(&self.key)?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|source| TlsError::Pem {
            path: self.key.clone(),
            source,
        })?;
        Ok(TlsMaterial { ca, chain, key })
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem {
            path: path.to_path_buf(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(path.to_path_buf()));
    }
    Ok(certs)
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(ca: &[CertificateDer<'static>]) -> Result<Arc<rustls::RootCertStore>, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in ca {
        roots.add(cert.clone())?;
    }
    Ok(Arc::new(roots))
}

/// A storage node's QUIC server configuration: presents the node's certificate
/// and accepts only clients with a certificate chained to the cluster CA.
pub fn server_config(files: &TlsFiles) -> Result<quinn::ServerConfig, TlsError> {
    let m = files.load()?;
    let provider = provider();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        roots(&m.ca)?,
        provider.clone(),
    )
    .build()?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(m.chain, m.key)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(Arc::new(tls))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(transport());
    Ok(config)
}

/// A node's QUIC endpoint configuration: its stateless-reset key, and the
/// key its connection IDs are tagged with, are derived from the node's
/// private key and id, so they are the same after the node restarts.
///
/// A node killed and started again has none of its old connections. A
/// gateway's next packet on one is answered with a stateless reset (RFC 9000
/// §10.3), which the gateway accepts only if its token was made with the key
/// the old process used. With quinn's default (a random key per process) the
/// gateway ignores it, and its requests on the old connection wait for a
/// liveness check to fail; the node is then marked down until the next probe.
/// With a key that outlives the process, the first request fails at once as
/// a reset connection and is retried on a new one ([`crate::NodeClient`]
/// retries a lost cached connection once). An endpoint answers only packets
/// whose connection ID it could have issued ([`TaggedCids`]), so the ID key
/// has to outlive the process too, or the old IDs are dropped unanswered.
///
/// The keys must stay secret (anyone holding the reset key can reset the
/// node's connections), which is why they come from the node's private key
/// and not from anything public about it. The node's id goes in too, so
/// nodes configured with one key file between them still reset only their
/// own connections (RFC 9000 §10.3.2).
pub fn endpoint_config(
    files: &TlsFiles,
    node: protocol::NodeId,
) -> Result<quinn::EndpointConfig, TlsError> {
    let m = files.load()?;
    let derive = |context: &str| {
        let mut h = blake3::Hasher::new_derive_key(context);
        h.update(m.key.secret_der());
        h.update(&node.0.to_le_bytes());
        *h.finalize().as_bytes()
    };
    let reset = derive("custodia 2026-12 storage node QUIC stateless reset key");
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &reset);
    let mut config = quinn::EndpointConfig::new(Arc::new(key));
    let cids = TaggedCids {
        key: derive("custodia 2026-12 storage node QUIC connection ID key"),
    };
    config.cid_generator(move || Box::new(cids.clone()));
    Ok(config)
}

/// Connection IDs of [`CID_RANDOM`] random bytes and a [`CID_TAG`]-byte
/// keyed-BLAKE3 tag of them: an endpoint answers (with a stateless reset)
/// only IDs it could have issued, under a key that outlives the process.
///
/// Not quinn's `HashedConnectionIdGenerator`: its IDs carry a 3-byte nonce
/// and a non-cryptographic tag, so with a key kept across restarts the IDs
/// (and the reset tokens they reveal) would repeat, and could be forged and
/// harvested; here neither can be, as RFC 9000 §10.3.2 asks.
#[derive(Clone)]
struct TaggedCids {
    key: [u8; 32],
}

const CID_RANDOM: usize = 8;
const CID_TAG: usize = 8;

impl TaggedCids {
    fn tag(&self, random: &[u8]) -> [u8; CID_TAG] {
        let mut tag = [0u8; CID_TAG];
        tag.copy_from_slice(&blake3::keyed_hash(&self.key, random).as_bytes()[..CID_TAG]);
        tag
    }
}

impl quinn_proto::ConnectionIdGenerator for TaggedCids {
    fn generate_cid(&mut self) -> quinn_proto::ConnectionId {
        let random: [u8; CID_RANDOM] = rand::random();
        let mut cid = [0u8; CID_RANDOM + CID_TAG];
        cid[..CID_RANDOM].copy_from_slice(&random);
        cid[CID_RANDOM..].copy_from_slice(&self.tag(&random));
        quinn_proto::ConnectionId::new(&cid)
    }

    fn validate(&self, cid: &quinn_proto::ConnectionId) -> Result<(), quinn_proto::InvalidCid> {
        if cid.len() != CID_RANDOM + CID_TAG {
            return Err(quinn_proto::InvalidCid);
        }
        let (random, tag) = cid.split_at(CID_RANDOM);
        // Compared in constant time: a packet's fate must not say how much
        // of a guessed tag was right.
        let differs = self
            .tag(random)
            .iter()
            .zip(tag)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        match differs {
            0 => Ok(()),
            _ => Err(quinn_proto::InvalidCid),
        }
    }

    fn cid_len(&self) -> usize {
        CID_RANDOM + CID_TAG
    }

    fn cid_lifetime(&self) -> Option<Duration> {
        None
    }
}

/// An HTTPS server configuration (the S3 API): presents `cert` (a PEM chain)
/// with `key`; clients are authenticated by SigV4, not certificates. TLS 1.2
/// and 1.3, since S3 clients in the field still speak 1.2; HTTP/1.1 only.
pub fn https_server_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let chain = read_certs(cert)?;
    let key_pem = read(key)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|source| TlsError::Pem {
        path: key.to_path_buf(),
        source,
    })?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(tls))
}

/// A gateway's QUIC client configuration: trusts only the cluster CA and
/// presents the gateway's certificate. Connect with [`NODE_SERVER_NAME`].
pub fn client_config(files: &TlsFiles) -> Result<quinn::ClientConfig, TlsError> {
    let m = files.load()?;
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots(&m.ca)?)
        .with_client_auth_cert(m.chain, m.key)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(Arc::new(tls))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(client_transport());
    Ok(config)
}

/// [`transport`] for the side that only asks: it never accepts a stream,
/// so the peer may open none (each could park 8 MiB in its buffers, and
/// take a share of the connection's window, for the connection's life).
fn client_transport() -> Arc<quinn::TransportConfig> {
    let mut t = transport_settings();
    t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(0));
    Arc::new(t)
}

/// Transport settings for node traffic: 1 MiB shard bodies on many parallel
/// streams, so windows are large enough that a stream is never stalled on flow
/// control at loopback or LAN speeds; keep-alives keep idle gateway connections
/// open, and the idle timeout finds dead peers.
fn transport() -> Arc<quinn::TransportConfig> {
    Arc::new(transport_settings())
}

fn transport_settings() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    // A node killed without closing its connections is found dead after the
    // idle timeout (one restarted on its port resets them at once: see
    // `endpoint_config`); keep-alives keep live idle connections open.
    t.keep_alive_interval(Some(KEEP_ALIVE));
    // 10 s always fits a QUIC idle timeout (a VarInt of milliseconds).
    if let Ok(idle) = quinn::IdleTimeout::try_from(Duration::from_secs(10)) {
        t.max_idle_timeout(Some(idle));
    }
    t.stream_receive_window(quinn::VarInt::from_u32(8 << 20));
    t.receive_window(quinn::VarInt::from_u32(64 << 20));
    t.send_window(64 << 20);
    // What a peer may open before the node knows who it is: the node
    // raises it for a gateway (`GATEWAY_STREAMS`) and a node once their
    // certificates say so (QUIC credit can be raised, never taken back).
    t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(INITIAL_STREAMS));
    t.max_concurrent_uni_streams(quinn::VarInt::from_u32(0));
    t
}

/// How often an idle connection pings its peer (whose acknowledgement is
/// all a connection with nothing else to send hears of it).
pub const KEEP_ALIVE: Duration = Duration::from_secs(2);

/// Requests at once a peer may make before its role is known (another
/// leaf's stays at this).
pub const INITIAL_STREAMS: u32 = 4;

/// Requests at once on a gateway's connection (its uploads, reads and
/// repairs).
pub const GATEWAY_STREAMS: u32 = 256;

#[cfg(test)]
mod tests {
    use super::*;

    /// No leaf outlives the CA that issued it, however late it is issued
    /// (here by a CA, reloaded from its PEM, with ten days left); a CA
    /// with a day or less left issues nothing.
    #[test]
    fn no_leaf_outlives_its_ca() {
        let expiry = |pem: &str| {
            let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
            pem.parse_x509().unwrap().validity().not_after.timestamp()
        };
        let ca = ClusterCa::generate_for("short-lived", 10).unwrap();
        let (ca_pem, ca_key) = ca.to_pem();
        let ca = ClusterCa::from_pem(&ca_pem, &ca_key).unwrap();
        let (leaf, _) = ca
            .issue("node", &[NODE_SERVER_NAME.to_string()], &[])
            .unwrap();
        let (ca_end, leaf_end) = (expiry(&ca_pem), expiry(&leaf));
        assert!(
            leaf_end <= ca_end - 86_400,
            "leaf {leaf_end} vs CA {ca_end}"
        );
        assert!(leaf_end > ca_end - 2 * 86_400);
        let dying = ClusterCa::generate_for("dying", 1).unwrap();
        assert!(matches!(
            dying.issue("node", &[NODE_SERVER_NAME.to_string()], &[]),
            Err(TlsError::CaExpiring(_))
        ));
    }

    /// A restarted node (same key) accepts the IDs its previous process
    /// issued, and nothing else: not a tampered ID, not another key's.
    #[test]
    fn connection_ids_are_recognised_across_restarts_and_unforgeable() {
        use quinn_proto::ConnectionIdGenerator;
        let mut before = TaggedCids { key: [7; 32] };
        let after = TaggedCids { key: [7; 32] };
        let other = TaggedCids { key: [8; 32] };
        let ids: Vec<_> = (0..64).map(|_| before.generate_cid()).collect();
        for id in &ids {
            assert_eq!(id.len(), before.cid_len());
            assert!(after.validate(id).is_ok());
            assert!(other.validate(id).is_err());
            for at in [0, CID_RANDOM - 1, CID_RANDOM, CID_RANDOM + CID_TAG - 1] {
                let mut bytes = id.to_vec();
                bytes[at] ^= 1;
                let tampered = quinn_proto::ConnectionId::new(&bytes);
                assert!(after.validate(&tampered).is_err(), "byte {at} flipped");
            }
        }
        let distinct: std::collections::HashSet<Vec<u8>> = ids.iter().map(|i| i.to_vec()).collect();
        assert_eq!(distinct.len(), ids.len(), "IDs repeat");
        assert!(after
            .validate(&quinn_proto::ConnectionId::new(&[0; 8]))
            .is_err());
    }

    #[test]
    fn a_ca_survives_pem_and_issues_loadable_leaves() {
        let ca = ClusterCa::generate("test CA").unwrap();
        let (cert_pem, key_pem) = ca.to_pem();
        let again = ClusterCa::from_pem(&cert_pem, &key_pem).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), &cert_pem).unwrap();
        let (leaf, key) = again
            .issue(
                "node 0",
                &[NODE_SERVER_NAME.to_string()],
                &[IpAddr::from([127, 0, 0, 1])],
            )
            .unwrap();
        std::fs::write(dir.path().join("n.pem"), leaf).unwrap();
        write_private(&dir.path().join("n.key"), key.as_bytes()).unwrap();
        let files = TlsFiles {
            ca_cert: dir.path().join("ca.pem"),
            cert: dir.path().join("n.pem"),
            key: dir.path().join("n.key"),
        };
        assert_eq!(files.load().unwrap().chain.len(), 1);
        server_config(&files).unwrap();
        client_config(&files).unwrap();
    }

    #[test]
    fn missing_and_garbled_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("empty.pem"), "").unwrap();
        let files = TlsFiles {
            ca_cert: dir.path().join("empty.pem"),
            cert: dir.path().join("nope.pem"),
            key: dir.path().join("nope.key"),
        };
        assert!(matches!(files.load(), Err(TlsError::NoCertificate(_))));
        assert!(ClusterCa::from_pem("garbage", "garbage").is_err());
    }
}
