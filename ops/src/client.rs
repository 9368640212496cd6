//! `custodia put` and `custodia get`: a thin, streaming client of the evidence
//! API with progress bars. The bytes are never held in memory whole.

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

/// The token file a client command uses without `--token-file`: the admin
/// token `init` writes in the default data dir.
const DEFAULT_TOKEN_FILE: &str = "custodia-data/admin.token";

/// The evidence API a client command uses without `--api` or
/// `CUSTODIA_API` when no cluster file says otherwise.
pub const DEFAULT_API: &str = "http://127.0.0.1:8080";

/// The bearer token from `--token-file`, else `./custodia-data/admin.token`.
pub fn token(file: Option<&Path>) -> Result<String> {
    let path = file.unwrap_or(Path::new(DEFAULT_TOKEN_FILE));
    let t = std::fs::read_to_string(path).with_context(|| {
        format!(
            "reading the token from {} (use --token-file)",
            path.display()
        )
    })?;
    Ok(t.trim().to_string())
}

/// Refuses an `http://` API that is not on this machine: a bearer token
/// sent to it would cross the network in clear.
pub fn refuse_clear_text(api: &str) -> Result<()> {
    let uri: ureq::http::Uri = api
        .trim()
        .parse()
        .with_context(|| format!("--api {api:?} is not a URL"))?;
    if uri.scheme_str() != Some("http") {
        return Ok(());
    }
    let host = uri.host().unwrap_or_default();
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let local = bare
        .parse::<std::net::IpAddr>()
        .is_ok_and(|ip| ip.is_loopback())
        || bare.eq_ignore_ascii_case("localhost")
        || bare.to_ascii_lowercase().ends_with(".localhost");
    if !local {
        bail!(
            "not sending a bearer token to {api} in clear: use https:// (the gateway's \
             `api_tls` in cluster.toml), or run the command on the gateway's machine"
        );
    }
    Ok(())
}

/// The CA file `https://` APIs must chain to (`None`: the public web
/// roots), settled once by [`trust`].
static TRUST: std::sync::OnceLock<Option<std::path::PathBuf>> = std::sync::OnceLock::new();

/// What `--ca-cert` (or `CUSTODIA_CA_CERT`) says for "the public web
/// roots", for an evidence API whose certificate a public CA issued.
pub const PUBLIC_ROOTS: &str = "public";

/// Settles, once per process, which CA the client trusts: `ca` (or the
/// public web roots for [`PUBLIC_ROOTS`]), else the cluster CA beside the
/// token file (`DATA_DIR/tls/ca.pem`, where `init` writes both), if there.
pub fn trust(ca: Option<&Path>, token_file: Option<&Path>) {
    let beside_token = || {
        let token = token_file.unwrap_or(Path::new(DEFAULT_TOKEN_FILE));
        let ca = token.parent()?.join("tls").join("ca.pem");
        ca.exists().then_some(ca)
    };
    let chosen = match ca {
        Some(p) if p == Path::new(PUBLIC_ROOTS) => None,
        Some(p) => Some(p.to_path_buf()),
        None => beside_token(),
    };
    if TRUST.set(chosen).is_err() {
        tracing::debug!("the CA to trust was settled already");
    }
}

/// The evidence API a client command reaches when neither `--api` nor
/// `CUSTODIA_API` names one: the gateway of the cluster whose token it
/// sends (`cluster.toml` beside the token file, where `init` writes both),
/// at its listen address and with its scheme, so that a cluster started
/// with `--api-tls` or another `--api` is found as `key create` finds it;
/// [`DEFAULT_API`] where there is no such file. Also whether the address
/// is this machine's own (see [`crate::cluster::Cluster::local_api`]). A
/// cluster file that cannot be read is an error, not [`DEFAULT_API`]: the
/// token would go to whatever else listens there.
pub fn default_api(token_file: Option<&Path>) -> Result<(String, bool)> {
    let token = token_file.unwrap_or(Path::new(DEFAULT_TOKEN_FILE));
    let file = token
        .parent()
        .unwrap_or(Path::new(""))
        .join(crate::cluster::CLUSTER_FILE);
    if !file.try_exists().unwrap_or(false) {
        return Ok((DEFAULT_API.to_owned(), false));
    }
    let cluster = crate::cluster::Cluster::load_file(&file).with_context(|| {
        format!(
            "finding the evidence API in {} (or give --api)",
            file.display()
        )
    })?;
    Ok(cluster.local_api())
}

/// An HTTP(S) client that returns error statuses as answers. Over HTTPS it
/// trusts the CA settled by [`trust`] (rustls with ring, chosen explicitly).
pub fn agent() -> Result<ureq::Agent> {
    use ureq::tls::{Certificate, RootCerts, TlsConfig, TlsProvider};
    let mut tls = TlsConfig::builder()
        .provider(TlsProvider::Rustls)
        .unversioned_rustls_crypto_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ));
    if let Some(Some(ca)) = TRUST.get() {
        let pem = std::fs::read(ca).with_context(|| format!("reading the CA {}", ca.display()))?;
        let certs = ureq::tls::parse_pem(&pem)
            .filter_map(|item| match item {
                Ok(ureq::tls::PemItem::Certificate(c)) => Some(c),
                _ => None,
            })
            .collect::<Vec<Certificate<'static>>>();
        if certs.is_empty() {
            bail!("no certificate in the CA file {}", ca.display());
        }
        tls = tls.root_certs(RootCerts::Specific(std::sync::Arc::new(certs)));
    }
    // A gateway that does not answer fails the command instead of hanging
    // it (a script polling `status`, a half-open connection): connecting,
    // and the answer's head once the request is sent (an upload's 201
    // comes after its last stripes are stored). A body being received has
    // no limit: evidence may be many GiB.
    Ok(ureq::Agent::config_builder()
        .http_status_as_error(false)
        .tls_config(tls.build())
        .timeout_connect(Some(std::time::Duration::from_secs(15)))
        .timeout_recv_response(Some(std::time::Duration::from_secs(600)))
        // `custodia put` sends `Expect: 100-continue` and must not send its
        // body before the gateway says to: an answer given without it (a
        // refusal, or an idempotent retry's "already filed") is given on
        // the understanding that no byte of it was sent. ureq's default,
        // one second, then sends the body regardless.
        .timeout_await_100(Some(std::time::Duration::from_secs(600)))
        .build()
        .into())
}

fn bar(len: u64, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    if let Ok(style) = ProgressStyle::with_template(
        "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
    ) {
        pb.set_style(style.progress_chars("=> "));
    }
    pb.set_message(what.to_string());
    pb
}

/// Turns an error response into a message with its JSON `message`.
pub fn refuse(mut resp: ureq::http::Response<ureq::Body>) -> anyhow::Error {
    let status = resp.status();
    let body = resp.body_mut().read_to_string().unwrap_or_default();
    refusal(status, &body)
}

/// [`refuse`], for an answer whose body was read.
fn refusal(status: ureq::http::StatusCode, body: &str) -> anyhow::Error {
    let body = body.to_owned();
    let msg = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["message"].as_str().map(str::to_string))
        .unwrap_or(body);
    anyhow::anyhow!("the gateway answered {status}: {}", printable(&msg, 500))
}

/// At most `max` characters of `text` fit for a terminal: a proxy's error
/// page is cut short, and control characters (escape sequences that would
/// act on the operator's terminal) are shown as `?`.
fn printable(text: &str, max: usize) -> String {
    let mut out: String = text
        .chars()
        .take(max)
        .map(|c| match c.is_control() && c != '\n' {
            true => '?',
            false => c,
        })
        .collect();
    if text.chars().count() > max {
        out.push_str(" [...]");
    }
    out
}

/// An administrative call (`GET` or `POST` with no body) to the evidence
/// API at `path`; returns the JSON answer, or the gateway's own message.
pub fn admin_call(api: &str, token: &str, method: &str, path: &str) -> Result<serde_json::Value> {
    let url = format!("{}{path}", api.trim_end_matches('/'));
    let auth = format!("Bearer {token}");
    // An action (a repair pass, `--verify-all`, a removal) may walk every
    // stripe record before it answers, and so may a node's account (its
    // stripes counted): an hour (and a minute). A status answer is small:
    // ten minutes.
    let walks = method == "POST" || path.starts_with("/v1/admin/nodes/");
    let limit = Some(std::time::Duration::from_secs(if walks {
        3660
    } else {
        600
    }));
    let sent = match method {
        "POST" => agent()?
            .post(&url)
            .config()
            .timeout_global(limit)
            .build()
            .header("Authorization", &auth)
            .send_empty(),
        _ => agent()?
            .get(&url)
            .config()
            .timeout_global(limit)
            .build()
            .header("Authorization", &auth)
            .call(),
    };
    let mut resp = sent.with_context(|| format!("reaching the gateway at {api}"))?;
    if !resp.status().is_success() {
        return Err(refuse(resp));
    }
    resp.body_mut()
        .read_json()
        .context("reading the gateway's answer")
}

/// An administrative `POST` with a JSON body; returns the JSON answer, or
/// the gateway's own message.
pub fn admin_post_json(
    api: &str,
    token: &str,
    path: &str,
    body: &serde_json::Value,
) -> Result<serde_json::Value> {
    let url = format!("{}{path}", api.trim_end_matches('/'));
    let mut resp = agent()?
        .post(&url)
        .header("Authorization", &format!("Bearer {token}"))
        .send_json(body)
        .with_context(|| format!("reaching the gateway at {api}"))?;
    if !resp.status().is_success() {
        return Err(refuse(resp));
    }
    resp.body_mut()
        .read_json()
        .context("reading the gateway's answer")
}

pub fn put(
    api: &str,
    token: &str,
    path: &Path,
    meta: &Filing,
    idempotency_key: Option<String>,
    acquired: &Acquired,
    idle: Duration,
) -> Result<()> {
    // Hashed first and sent as the acquisition hashes: the gateway refuses
    // (and keeps nothing of) a body that is not these bytes, say a file
    // modified while it is sent. A file that only grows meanwhile (a
    // recording still being written) sends the bytes hashed and is filed
    // cut short: its length and modification time, taken before the hash
    // pass, are compared after it and again once the filing is answered.
    // Sent as it is (a media type is no text to encode): a control
    // character (a CRLF script's \r) would fail only as the request is
    // built, read as a send that may have filed.
    if let Some(t) = &meta.media_type {
        if t.trim().is_empty() || !t.bytes().all(|b| (0x20..0x7f).contains(&b)) {
            bail!("--media-type takes a media type such as video/mp4 or \"text/plain; charset=utf-8\" (printable ASCII)");
        }
    }
    for (flag, given) in [
        ("--blake3", &acquired.blake3),
        ("--sha256", &acquired.sha256),
    ] {
        if given
            .as_ref()
            .is_some_and(|h| h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            bail!("{flag} takes 64 hexadecimal digits");
        }
    }
    // Looked at before it is opened (a pipe's open waits for a writer): a
    // device, a pipe or a socket has no length to send and check (a block
    // device reports 0, a pipe is used up by the hash pass); an image of
    // it is what is filed.
    let kind = std::fs::metadata(path).with_context(|| format!("opening {}", path.display()))?;
    if !kind.is_file() && !kind.is_dir() {
        bail!(
            "{} is not a regular file (a device, a pipe or a socket): image it to a file first and file that",
            path.display()
        );
    }
    let stamp = FileStamp::of(path)?;
    let (blake3, sha256, hashed) = hash_file(path)?;
    if FileStamp::of(path)? != stamp || stamp.len != hashed {
        bail!(
            "{} changed while it was hashed; file it once it is complete",
            path.display()
        );
    }
    for (what, given, found) in [
        ("BLAKE3", &acquired.blake3, blake3.to_hex().to_string()),
        ("SHA-256", &acquired.sha256, sha256.to_hex()),
    ] {
        if given
            .as_ref()
            .is_some_and(|g| !g.eq_ignore_ascii_case(&found))
        {
            bail!(
                "{} is not the file acquired: its {what} is {found}, the acquisition's {}; nothing filed",
                path.display(),
                given.as_deref().unwrap_or_default()
            );
        }
    }
    // One key for every attempt: a retry after an answer lost on the way
    // (the connection dropped as the gateway committed) gets that filing
    // back instead of filing the evidence twice. Said, so a put that gave
    // up can be run again under it.
    let key = idempotency_key.unwrap_or_else(|| hex::encode(rand::random::<[u8; 16]>()));
    // Said before the first byte is sent: a put interrupted (Ctrl-C, a
    // dropped session) after the gateway filed it but before its answer
    // came can be run again under it without filing twice.
    eprintln!(
        "filing {} under Idempotency-Key {key} (if this put is interrupted, run it again with --idempotency-key {key})",
        path.display()
    );
    let mut attempt = 1;
    // How long answers "an earlier attempt is still in progress" have been
    // waited on: those are not attempts of this put's (after a gateway
    // restart the gateway says so until it has given the attempt it lost
    // up, a lease and a collection round later, minutes), so they count
    // against this patience instead of the attempts.
    let mut in_progress_waited = Duration::ZERO;
    let again = || format!("to try again without filing twice: --idempotency-key {key}");
    let (status, body) = loop {
        // The answer read whole (a filing's JSON, or an error's): which
        // 409 it is decides whether to try again.
        let sent = put_once(
            api,
            token,
            path,
            (meta, &key, idle),
            (&blake3, &sha256, stamp),
        )
        .and_then(|mut resp| {
            let body = resp
                .body_mut()
                .read_to_string()
                .context("reading the gateway's answer")
                .map_err(Attempt::Unanswered)?;
            Ok((resp.status(), retry_after(&resp), body))
        });
        let wait = match &sent {
            // Nothing was answered: the connection failed (it may have
            // filed; the key tells).
            Err(Attempt::Unanswered(_)) => Some(Duration::from_secs(attempt)),
            // The gateway's failure (503: nodes or the index unavailable, an
            // upload GC aborted), a proxy's that gave up waiting on it (502,
            // 504: the gateway may have filed it meanwhile; the key tells),
            // or the first attempt still in flight (409 upload_in_progress):
            // worth the same request again. Any other 409 (the key used for
            // another filing) is not.
            Ok((status, retry, body))
                if matches!(status.as_u16(), 502..=504)
                    || *status == 409
                        && error_code(body).as_deref() == Some("upload_in_progress") =>
            {
                Some(
                    retry
                        .unwrap_or(Duration::from_secs(attempt))
                        .min(Duration::from_secs(60)),
                )
            }
            _ => None,
        };
        let in_progress = matches!(&sent, Ok((status, _, body))
            if *status == 409 && error_code(body).as_deref() == Some("upload_in_progress"));
        if let (Some(wait), true) = (wait, in_progress) {
            // At least a second apart, whatever Retry-After says (a proxy
            // may say 0): the patience is counted in time waited.
            let wait = wait.max(Duration::from_secs(1));
            if in_progress_waited + wait <= IN_PROGRESS_PATIENCE {
                eprintln!(
                    "an earlier attempt under Idempotency-Key {key} is still in progress at the gateway; asking again in {} s",
                    wait.as_secs()
                );
                std::thread::sleep(wait);
                in_progress_waited += wait;
                continue;
            }
        }
        match (wait, attempt < PUT_ATTEMPTS) {
            (Some(wait), true) => {
                let why = match &sent {
                    Ok((status, _, _)) => format!("the gateway answered {status}"),
                    Err(Attempt::Unanswered(e) | Attempt::Failed(e)) => format!("{e:#}"),
                };
                eprintln!(
                    "filing attempt {attempt} of {PUT_ATTEMPTS} did not complete ({why}); trying again in {} s under Idempotency-Key {key}",
                    wait.as_secs()
                );
                std::thread::sleep(wait);
                attempt += 1;
            }
            // Given up on a failure worth trying again: said with the key
            // to try again under, as a lost answer is.
            (Some(_), false) => {
                let e = match sent {
                    Ok((status, _, body)) => refusal(status, &body),
                    Err(Attempt::Unanswered(e) | Attempt::Failed(e)) => e,
                };
                return Err(e.context(format!("filing {} ({})", path.display(), again())));
            }
            (None, _) => match sent {
                Ok((status, _, body)) => break (status, body),
                Err(Attempt::Unanswered(e) | Attempt::Failed(e)) => {
                    return Err(e.context(format!("filing {} ({})", path.display(), again())))
                }
            },
        }
    };
    if !status.is_success() {
        // A 5xx may have followed a commit (an answer lost inside the
        // gateway): the key is said with it too.
        let e = refusal(status, &body);
        return Err(match status.is_server_error() {
            true => e.context(format!("filing {} ({})", path.display(), again())),
            false => e,
        });
    }
    let len = hashed;
    let filed: serde_json::Value =
        serde_json::from_str(&body).context("reading the gateway's answer")?;
    if filed["blake3"].as_str() != Some(blake3.to_hex().as_str()) || filed["size"] != len {
        bail!(
            "the gateway answered for other content (BLAKE3 {}, {} bytes) than {} (BLAKE3 {}, {len} bytes): {body}",
            filed["blake3"],
            filed["size"],
            path.display(),
            blake3.to_hex()
        );
    }
    println!("{body}");
    if filed["receipt"].is_null() {
        eprintln!(
            "note: the receipt was not ready when the filing was answered; fetch it later from {}{}",
            api.trim_end_matches('/'),
            filed["receipt_url"].as_str().unwrap_or("/v1/evidence/ID/receipt")
        );
    }
    // Filed as it was hashed; a file changed since (a recording appended
    // to while it was sent) is not what was filed.
    if FileStamp::of(path).ok() != Some(stamp) {
        return Err(FiledButChanged(format!(
            "{} changed while it was filed: filing {} holds it as it was hashed ({len} bytes, BLAKE3 {}), not as it is now; file it again once it is complete",
            path.display(),
            filed["id"].as_str().unwrap_or("(no id)"),
            blake3.to_hex()
        ))
        .into());
    }
    Ok(())
}

/// `custodia put`'s exit code when the evidence was filed but the file
/// changed meanwhile: a script tells it from an error (1, whose message
/// says whether to try again under the key).
pub const FILED_BUT_CHANGED: u8 = 3;

/// A filing made of a file that changed meanwhile (see [`FILED_BUT_CHANGED`]).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct FiledButChanged(String);

/// A file's length and modification time: whether it changed between two
/// looks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    len: u64,
    modified: Option<std::time::SystemTime>,
}

impl FileStamp {
    fn of(path: &Path) -> Result<FileStamp> {
        let meta =
            std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
        Ok(FileStamp {
            len: meta.len(),
            modified: meta.modified().ok(),
        })
    }
}

/// What a filing says of its evidence besides its bytes: sent as the
/// evidence API's headers, the provenance notarized in its statement.
#[derive(Debug, Default, Clone, clap::Args)]
pub struct Filing {
    /// The case it is filed under.
    #[arg(long)]
    pub case: Option<String>,
    /// Who submitted it (kept with its metadata; the statement's actor is
    /// the credential's).
    #[arg(long)]
    pub submitter: Option<String>,
    /// Its media type, as `video/mp4` (default application/octet-stream).
    #[arg(long)]
    pub media_type: Option<String>,
    /// Provenance, notarized in the filing's statement: the device it
    /// came from.
    #[arg(long)]
    pub source_device: Option<String>,
    /// Provenance: when it was captured (as the acquisition records it).
    #[arg(long)]
    pub capture_time: Option<String>,
    /// Provenance: how it was captured or imaged.
    #[arg(long)]
    pub capture_method: Option<String>,
    /// Provenance: whose custody it was in before this filing.
    #[arg(long)]
    pub prior_custody: Option<String>,
}

impl Filing {
    /// The `X-Custodia-*` headers it is sent as (text, before encoding).
    fn headers(&self) -> impl Iterator<Item = (&'static str, &String)> {
        [
            ("x-custodia-case", &self.case),
            ("x-custodia-submitter", &self.submitter),
            ("x-custodia-source-device", &self.source_device),
            ("x-custodia-capture-time", &self.capture_time),
            ("x-custodia-capture-method", &self.capture_method),
            ("x-custodia-prior-custody", &self.prior_custody),
        ]
        .into_iter()
        .filter_map(|(name, value)| value.as_ref().map(|v| (name, v)))
    }
}

/// How long `put` and `get` wait on a connection gone silent.
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct Idle {
    /// Give up when the connection takes or brings no byte for this long
    /// (a dead connection): a get leaves nothing behind, a put's attempt
    /// is tried again under its key. It bounds a get's wait for its
    /// answer too; a put waits at least ten minutes for its answer, which
    /// comes once the last stripes are stored.
    #[arg(long = "idle-timeout-secs", default_value_t = 600, value_name = "SECS")]
    pub secs: u64,
}

impl Idle {
    pub fn duration(self) -> Duration {
        Duration::from_secs(self.secs.max(1))
    }
}

/// Hashes an acquisition recorded (an imaging tool's report): `put`
/// refuses a file that is not those bytes before sending any.
#[derive(Debug, Default, Clone, clap::Args)]
pub struct Acquired {
    /// The BLAKE3 recorded at acquisition (hex): a file that is not those
    /// bytes is refused before any is sent.
    #[arg(long, value_name = "HEX")]
    pub blake3: Option<String>,
    /// The SHA-256 recorded at acquisition (hex, as imaging tools report
    /// it): a file that is not those bytes is refused before any is sent.
    #[arg(long, value_name = "HEX")]
    pub sha256: Option<String>,
}

/// How many times `custodia put` sends a filing before giving up.
const PUT_ATTEMPTS: u64 = 3;

/// How long `custodia put` waits, at most, on answers that an earlier
/// attempt under its key is still in progress: longer than a gateway
/// takes to give up an attempt it lost in a restart (its lease, two
/// minutes by default, and a collection round).
const IN_PROGRESS_PATIENCE: Duration = Duration::from_secs(300);

/// Why one attempt of [`put`] did not get an answer.
enum Attempt {
    /// Sent (perhaps whole) but never answered: a retry under the same
    /// key is safe and may find it filed.
    Unanswered(anyhow::Error),
    /// Not sendable at all (the file changed, or cannot be read).
    Failed(anyhow::Error),
}

/// The `error` code of a JSON error answer.
fn error_code(body: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    v.get("error")?.as_str().map(str::to_owned)
}

/// A `Retry-After` in seconds, if the answer has one.
fn retry_after(resp: &ureq::http::Response<ureq::Body>) -> Option<Duration> {
    resp.headers()
        .get("retry-after")?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
        .map(Duration::from_secs)
}

/// One attempt of [`put`]: the file, as hashed, under `key`.
fn put_once(
    api: &str,
    token: &str,
    path: &Path,
    (meta, key, idle): (&Filing, &str, Duration),
    (blake3, sha256, stamp): (&protocol::Blake3Hash, &protocol::Sha256Hash, FileStamp),
) -> Result<ureq::http::Response<ureq::Body>, Attempt> {
    let file = File::open(path)
        .with_context(|| format!("opening {}", path.display()))
        .map_err(Attempt::Failed)?;
    // As it was hashed, at each attempt (a retry comes seconds later).
    let now = FileStamp::of(path).map_err(Attempt::Failed)?;
    if now != stamp {
        return Err(Attempt::Failed(anyhow::anyhow!(
            "{} changed since it was hashed ({} bytes, now {}); file it once it is complete",
            path.display(),
            stamp.len,
            now.len
        )));
    }
    let len = stamp.len;
    let pb = bar(len, "filing");
    // Exactly `len` bytes, as the length sent says: a file that shrinks
    // while it is sent fails the upload (a body that ends early would
    // leave the client waiting for bytes that never come), and one that
    // grows sends only what was hashed (and the gateway refuses the
    // digest if those bytes changed).
    let changed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut reader = pb.wrap_read(Exactly {
        inner: std::io::Read::take(file, len),
        left: len,
        changed: changed.clone(),
    });
    // A connection that goes silent (no byte taken or answered for `idle`)
    // fails the attempt rather than hang it for good; the answer's head
    // still has its own ten minutes (it comes after the last stripes are
    // stored).
    let mut req = agent()
        .map_err(Attempt::Failed)?
        .post(format!("{}/v1/evidence", api.trim_end_matches('/')))
        .config()
        .timeout_per_write(Some(idle))
        .timeout_per_read(Some(idle.max(Duration::from_secs(600))))
        .build()
        .header("authorization", format!("Bearer {token}"))
        .header(
            "content-type",
            meta.media_type
                .as_deref()
                .unwrap_or("application/octet-stream"),
        )
        // The gateway answers a refusal (a revoked credential, a reader's,
        // a bad header) before any byte is sent, rather than after reading
        // at most 4 MiB of it and closing: without it the answer was lost
        // to a broken pipe on a large file.
        .header("expect", "100-continue")
        // Its length, known from the hash pass: a body of unknown length
        // is charged a whole stripe of the gateway's receive memory, and
        // an exact one is held to its length.
        .header("content-length", len)
        .header("x-custodia-blake3", blake3.to_hex())
        .header("x-custodia-sha256", sha256.to_hex())
        .header("idempotency-key", key);
    match path.file_name().map(|n| n.to_str()) {
        Some(Some(name)) => req = req.header("x-custodia-file-name", header_text(name)),
        Some(None) => eprintln!(
            "note: the file name of {} is not UTF-8; filed without it",
            path.display()
        ),
        None => {}
    }
    for (name, value) in meta.headers() {
        req = req.header(name, header_text(value));
    }
    let sent = req.send(ureq::SendBody::from_reader(&mut reader));
    pb.finish_and_clear();
    // The file changing while it is sent is no reason to send it again.
    if changed.load(std::sync::atomic::Ordering::Relaxed) {
        return Err(Attempt::Failed(anyhow::anyhow!(
            "{} changed while it was sent; file it once it is complete",
            path.display()
        )));
    }
    sent.context("sending the evidence")
        .map_err(Attempt::Unanswered)
}

/// A reader of exactly `left` more bytes: an end before then is an error
/// (and `changed` says so).
struct Exactly<R> {
    inner: R,
    left: u64,
    changed: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl<R: std::io::Read> std::io::Read for Exactly<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && self.left > 0 && !buf.is_empty() {
            self.changed
                .store(true, std::sync::atomic::Ordering::Relaxed);
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!(
                    "the file ended {} bytes early: it changed while it was sent",
                    self.left
                ),
            ));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// How far [`get`] got, for a Ctrl-C to act on: the temporary file it is
/// writing (to remove), or that the file it was asked for is written.
pub type Partial = std::sync::Arc<std::sync::Mutex<Download>>;

#[derive(Debug, Default)]
pub struct Download {
    /// Written to, not yet renamed to the file asked for.
    pub temp: Option<std::path::PathBuf>,
    /// Renamed: the file asked for is there, verified.
    pub written: bool,
}

pub fn get(
    api: &str,
    token: &str,
    id: &str,
    output: &Path,
    force: bool,
    idle: Duration,
    partial: &Partial,
) -> Result<()> {
    // Checked first, so nothing is fetched for nothing; the final rename
    // checks again (another writer may come meanwhile).
    // Not even with --force: the rename at the end could not replace it,
    // and a read is recorded for good before that.
    if output.is_dir() || output.as_os_str().as_encoded_bytes().ends_with(b"/") {
        bail!(
            "{} is a directory; name the file to write (-o DIR/NAME)",
            output.display()
        );
    }
    if !force && output.symlink_metadata().is_ok() {
        bail!(
            "{} exists; not replacing it (pass --force to)",
            output.display()
        );
    }
    // Write beside the target and rename at the end: a cut-off download never
    // leaves a plausible-looking partial file under the requested name.
    // Made before the request: the gateway records every read in the
    // ledger for good, so a destination that cannot be written must fail
    // before any read is recorded.
    let dir = output
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    // Readable as the umask says, as any file the user writes (a
    // temporary file's own 0600 would keep a copy in a shared folder from
    // the colleagues it was fetched for).
    let mut tmp = tempfile::Builder::new()
        .prefix(".custodia-partial-")
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o666))
        .tempfile_in(dir)
        .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
    partial.lock().unwrap_or_else(|e| e.into_inner()).temp = Some(tmp.path().to_path_buf());
    // A body has no time limit (evidence may be many GiB), but a
    // connection that goes silent (a VPN dropped, a laptop asleep) fails
    // the command after `idle` rather than hang it, and a script with it,
    // for good.
    let mut resp = agent()?
        .get(format!("{}/v1/evidence/{id}", api.trim_end_matches('/')))
        .config()
        .timeout_per_read(Some(idle))
        .build()
        .header("authorization", format!("Bearer {token}"))
        .call()
        .context("requesting the evidence")?;
    if !resp.status().is_success() {
        return Err(refuse(resp));
    }
    let len: u64 = resp
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let Some(expect) = resp
        .headers()
        .get("x-custodia-blake3")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
    else {
        bail!(
            "the answer carries no X-Custodia-Blake3 (is {api} a Custodia gateway, or a proxy \
             dropping headers?): what arrives could not be verified; nothing written"
        );
    };
    let pb = bar(len, "fetching");
    let mut hasher = blake3::Hasher::new();
    let mut reader = resp.body_mut().as_reader();
    let mut buf = vec![0u8; 1 << 20];
    let mut received = 0u64;
    loop {
        let n = reader.read(&mut buf).with_context(|| {
            format!(
                "reading the evidence ({received} bytes received; nothing for {} s is given up on)",
                idle.as_secs()
            )
        })?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        tmp.write_all(&buf[..n])?;
        received += n as u64;
        pb.inc(n as u64);
    }
    pb.finish_and_clear();
    let got = hasher.finalize().to_hex().to_string();
    if got != expect {
        bail!(
            "the bytes received hash to {got}, the evidence's BLAKE3 is {expect}; nothing written"
        );
    }
    tmp.as_file().sync_all()?;
    // The rename and what it changes for a Ctrl-C under one lock: one
    // between them would remove nothing and say nothing was written while
    // the file was.
    let mut state = partial.lock().unwrap_or_else(|e| e.into_inner());
    if force {
        tmp.persist(output)
            .with_context(|| format!("writing {}", output.display()))?;
    } else if let Err(e) = tmp.persist_noclobber(output) {
        let exists = e.error.kind() == std::io::ErrorKind::AlreadyExists;
        return Err(anyhow::Error::new(e.error).context(match exists {
            true => format!(
                "writing {} (it exists now; pass --force to replace it)",
                output.display()
            ),
            false => format!("writing {}", output.display()),
        }));
    }

    // Only now: a Ctrl-C before the rename still removes the copy (after
    // it, the path it would remove is gone).
    state.temp = None;
    state.written = true;
    drop(state);
    // The rename made durable before "wrote" is said: a power cut must not
    // take back a copy the user was told is there. The copy is in place
    // and verified whatever this says: a folder that cannot be opened to
    // sync (a write-only drop folder) or synced (some shared folders) is
    // said, not a failure.
    if let Err(e) = File::open(dir).and_then(|d| d.sync_all()) {
        eprintln!(
            "note: could not sync {} after the rename ({e}); the copy is in place, but a power cut now could undo it",
            dir.display()
        );
    }
    println!(
        "wrote {} ({received} bytes, BLAKE3 {got})",
        output.display()
    );
    Ok(())
}

/// A text field as a header value: as it is when it is visible ASCII,
/// else as RFC 8187's `UTF-8''` and its percent-encoded bytes, which the
/// gateway decodes (a file name with an umlaut, a case in Greek).
fn header_text(text: &str) -> String {
    let plain = text.bytes().all(|b| (0x20..0x7f).contains(&b))
        && !text
            .get(..7)
            .is_some_and(|p| p.eq_ignore_ascii_case("utf-8''"));
    match plain {
        true => text.to_string(),
        false => format!(
            "UTF-8''{}",
            percent_encoding::utf8_percent_encode(text, percent_encoding::NON_ALPHANUMERIC)
        ),
    }
}

/// BLAKE3, SHA-256 and size of a file, in one pass.
pub fn hash_file(path: &Path) -> Result<(protocol::Blake3Hash, protocol::Sha256Hash, u64)> {
    use sha2::Digest;
    use std::io::Read;
    // A directory opens, and fails only at its first read, with an error
    // that names no path ("Is a directory").
    if std::fs::metadata(path).is_ok_and(|m| m.is_dir()) {
        bail!("{} is a directory, not a file", path.display());
    }
    let mut f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut b3 = blake3::Hasher::new();
    let mut sha = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        b3.update(&buf[..n]);
        sha.update(&buf[..n]);
        size += n as u64;
    }
    Ok((
        protocol::Blake3Hash::from(b3.finalize()),
        protocol::Sha256Hash(sha.finalize().into()),
        size,
    ))
}

#[cfg(test)]
mod tests {
    use std::io::Read as _;

    /// A body that ends before its length is an error, not an end.
    #[test]
    fn a_file_that_shrinks_while_sent_is_an_error() {
        let changed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut r = super::Exactly {
            inner: std::io::Read::take(&b"abc"[..], 5),
            left: 5,
            changed: changed.clone(),
        };
        let mut out = Vec::new();
        let e = r.read_to_end(&mut out).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof);
        assert_eq!(out, b"abc");
        assert!(changed.load(std::sync::atomic::Ordering::Relaxed));
        let unchanged = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut whole = super::Exactly {
            inner: std::io::Read::take(&b"abcdef"[..], 3),
            left: 3,
            changed: unchanged.clone(),
        };
        let mut out = Vec::new();
        whole.read_to_end(&mut out).unwrap();
        assert_eq!(out, b"abc");
        assert!(!unchanged.load(std::sync::atomic::Ordering::Relaxed));
    }
}
