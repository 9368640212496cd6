//! A C2SP tlog-witness another court can host (`custodia witness`).
//!
//! `POST /add-checkpoint` takes a log's new checkpoint with a consistency
//! proof from the size this witness last cosigned. The witness checks the log's
//! signature, that `old` is exactly its latest size for that log (409 with its
//! size otherwise), and the proof; then persists the new view atomically
//! (temp file, fsync, rename, fsync dir) and only then returns its
//! `cosignature/v1` line. It never cosigns a smaller tree or a fork, across
//! restarts, because its view is on disk before any cosignature leaves it.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use protocol::ledger::{self as pl, TreeHash};
use protocol::witness::{self as pw, Cosigner};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::sync::Mutex;

/// The witness's signer key file in its data dir.
pub const WITNESS_KEY_FILE: &str = "witness.key";
/// Its public verifier key, for logs and verifiers to configure.
pub const WITNESS_PUB_FILE: &str = "witness.pub";
const STATE_FILE: &str = "witness-state.json";
/// Held for the witness process's life.
const LOCK_FILE: &str = "witness.lock";
/// How far behind its newest cosignature's time the clock may be before a
/// witness stops cosigning (see `add_checkpoint`).
const MAX_CLOCK_BEHIND_SECS: u64 = 5;

/// Why the witness could not start.
#[derive(Debug, thiserror::Error)]
pub enum WitnessStartError {
    #[error("witness I/O on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("witness key: {0}")]
    Key(#[from] pw::WitnessError),
    #[error(
        "witness name {0:?}: a name is one word without '+' (a name like \
         witness.example.org), the name its cosignatures are made under"
    )]
    Name(String),
    #[error("log key {0:?} is not a C2SP Ed25519 verifier key")]
    LogKey(String),
    #[error("witness state {path} is unreadable: {reason}")]
    State { path: PathBuf, reason: String },
    #[error(
        "{0} is in use by another witness process: two would each cosign from their own \
         view, and one could cosign a fork of what the other cosigned"
    )]
    InUse(PathBuf),
    #[error(
        "{0} is missing, though this witness's key exists: a witness that forgot what it \
         cosigned would cosign any tree next, a fork included. Restore the file from a \
         backup, or start with --reset-state if this witness never cosigned anything"
    )]
    StateMissing(PathBuf),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> WitnessStartError + '_ {
    move |source| WitnessStartError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The latest cosigned tree of each log, by origin.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Views {
    logs: BTreeMap<String, View>,
    /// The time of the newest cosignature, Unix seconds: none is ever dated
    /// earlier, whatever the clock does (a cosignature says "as of this
    /// time, the largest tree I saw"; an earlier date on a larger tree
    /// would contradict one already given).
    #[serde(default)]
    cosigned_at: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct View {
    size: u64,
    /// Root hash, base64.
    root: String,
}

struct Witness {
    signer_key: String,
    /// Log origin -> the verifier keys trusted for it (a log may sign with
    /// more than one, say while it rotates: C2SP tlog-witness checks "the
    /// public key(s) it trusts for the checkpoint origin").
    logs: BTreeMap<String, Vec<String>>,
    dir: PathBuf,
    views: Mutex<Views>,
    /// Locked: no other witness process on `dir` while this one serves.
    _lock: std::fs::File,
}

/// Opens (creating on first start) a witness in `dir` named `name`, trusting
/// the logs with these verifier keys. Returns the router and its public key.
///
/// One process at a time holds `dir` (a lock file, held while the router
/// lives). A key without its state file is refused unless `reset_state`
/// says this witness never cosigned anything. `accept_clock`: the date of
/// the last cosignature (Unix seconds, as the refusal says it), which was
/// dated by a clock gone wrong: the clock is right now, and the next is
/// dated by it (see [`add_checkpoint`]'s refusal). Only that date is
/// dropped, so the flag left on does nothing at later starts (a clock
/// wrong again is refused again).
pub fn open(
    dir: &Path,
    name: &str,
    log_keys: &[String],
    reset_state: bool,
    accept_clock: Option<u64>,
) -> Result<(Router, String), WitnessStartError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let lock_path = dir.join(LOCK_FILE);
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(io(&lock_path))?;
    match lock.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => return Err(WitnessStartError::InUse(dir.into())),
        Err(std::fs::TryLockError::Error(e)) => return Err(io(&lock_path)(e)),
    }
    let key_path = dir.join(WITNESS_KEY_FILE);
    let state_path = dir.join(STATE_FILE);
    // A witness that has cosigned nothing: the state every later start
    // requires (see `StateMissing`).
    let write_empty_state = || {
        let empty = serde_json::to_vec(&Views::default()).unwrap_or_default();
        storage_node::store::write_durably(dir, STATE_FILE, &[&empty]).map_err(io(&state_path))
    };
    let signer_key = match std::fs::read_to_string(&key_path) {
        Ok(k) => {
            if !state_path.exists() {
                if !reset_state {
                    return Err(WitnessStartError::StateMissing(state_path));
                }
                // Written at once: the flag is needed once, not at every
                // start before the first cosignature (where it would stay,
                // and hide a state file lost later).
                write_empty_state()?;
            }
            k.trim().to_owned()
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // Before anything is written: a key made under a name that
            // cannot sign would be refused at every later start, whatever
            // name was given then (a key's name is read from its file).
            if !signed_note::is_key_name_valid(name) {
                return Err(WitnessStartError::Name(name.to_owned()));
            }
            let (s, _) = pw::witness_keys(name, &rand::random());
            // The state first (an empty one unless one was put there): a
            // key is never without one.
            if !state_path.exists() {
                write_empty_state()?;
            }
            storage_node::store::write_private(&key_path, s.as_bytes()).map_err(io(&key_path))?;
            s
        }
        Err(e) => return Err(io(&key_path)(e)),
    };
    // A key that cannot cosign is refused at the start, not at each request.
    Cosigner::new(&signer_key, 0)?;
    // What it publishes is derived from the key it signs with, and the
    // file rewritten (durably) when missing or not that: a crash between
    // the two writes, or a key restored beside a newer witness.pub, must
    // neither keep it from starting nor have it hand out a key its
    // cosignatures do not verify with.
    let verifier_key = pw::verifier_key_of(&signer_key)?;
    let pub_path = dir.join(WITNESS_PUB_FILE);
    let published = std::fs::read_to_string(&pub_path).unwrap_or_default();
    if published.trim() != verifier_key {
        if !published.trim().is_empty() {
            tracing::warn!(
                path = %pub_path.display(),
                "the witness's public key file did not match its signing key; rewritten"
            );
        }
        storage_node::store::write_durably(
            dir,
            WITNESS_PUB_FILE,
            &[verifier_key.as_bytes(), b"\n"],
        )
        .map_err(io(&pub_path))?;
    }
    let mut logs = BTreeMap::new();
    for k in log_keys {
        let origin = k.split('+').next().unwrap_or_default().to_owned();
        signed_note::StandardVerifier::new(k).map_err(|_| WitnessStartError::LogKey(k.clone()))?;
        logs.entry(origin).or_insert_with(Vec::new).push(k.clone());
    }
    let mut views: Views = match std::fs::read(&state_path) {
        Ok(b) => serde_json::from_slice(&b).map_err(|e| WitnessStartError::State {
            path: state_path.clone(),
            reason: e.to_string(),
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Views::default(),
        Err(e) => return Err(io(&state_path)(e)),
    };
    let clock = crate::ledger::unix_now();
    let drop_date = accept_clock.filter(|d| *d == views.cosigned_at && *d > clock);
    if let Some(given) = accept_clock.filter(|_| drop_date.is_none()) {
        tracing::info!(
            given,
            last = views.cosigned_at,
            clock,
            "--accept-clock names no date to drop (the last cosignature's is another, or not \
             after this clock): nothing changed"
        );
    }
    if drop_date.is_some() {
        tracing::warn!(
            last = views.cosigned_at,
            clock,
            "the last cosignature was dated after this clock, by a clock gone wrong (told so \
             with --accept-clock): the next is dated by this clock"
        );
        views.cosigned_at = clock;
        let text = serde_json::to_vec(&views).map_err(|e| WitnessStartError::State {
            path: state_path.clone(),
            reason: e.to_string(),
        })?;
        storage_node::store::write_durably(dir, STATE_FILE, &[&text]).map_err(io(&state_path))?;
    }
    let w = Arc::new(Witness {
        signer_key,
        logs,
        dir: dir.to_path_buf(),
        views: Mutex::new(views),
        _lock: lock,
    });
    let router = Router::new()
        .route("/add-checkpoint", post(add_checkpoint))
        .with_state(w);
    Ok((router, verifier_key))
}

/// Serves a witness until the listener fails.
pub async fn serve(
    listen: SocketAddr,
    router: Router,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<std::io::Result<()>>)> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    Ok((
        addr,
        tokio::spawn(async move { axum::serve(listener, router).await }),
    ))
}

fn answer(status: StatusCode, content_type: &'static str, body: String) -> Response {
    (status, [(header::CONTENT_TYPE, content_type)], body).into_response()
}

fn text(status: StatusCode, msg: &str) -> Response {
    answer(status, "text/plain; charset=utf-8", format!("{msg}\n"))
}

async fn add_checkpoint(State(w): State<Arc<Witness>>, body: Bytes) -> Response {
    if body.len() > 64 * 1024 {
        return text(StatusCode::PAYLOAD_TOO_LARGE, "request too large");
    }
    let Ok(body) = std::str::from_utf8(&body) else {
        return text(StatusCode::BAD_REQUEST, "request is not UTF-8");
    };
    let (old, proof, note) = match pw::parse_add_checkpoint(body) {
        Ok(p) => p,
        Err(e) => return text(StatusCode::BAD_REQUEST, &e.to_string()),
    };
    let origin = note.lines().next().unwrap_or_default().to_owned();
    let Some(log_keys) = w.logs.get(&origin) else {
        return text(StatusCode::NOT_FOUND, "unknown log");
    };
    let Some(new) = log_keys
        .iter()
        .find_map(|key| pl::verify_checkpoint(&note, key).ok())
    else {
        return text(StatusCode::FORBIDDEN, "the log's signature does not verify");
    };
    // One checkpoint at a time: the check, the persist and the cosignature
    // form one step per witness.
    let mut views = w.views.lock().await;
    let latest = views.logs.get(&origin).cloned().unwrap_or(View {
        size: 0,
        root: pl::empty_root().to_string(),
    });
    // In the order tlog-witness gives: an old size past the checkpoint is
    // a bad request whatever this witness saw.
    if new.size < old {
        return text(StatusCode::BAD_REQUEST, "checkpoint is smaller than old");
    }
    if old != latest.size {
        return answer(
            StatusCode::CONFLICT,
            "text/x.tlog.size",
            format!("{}\n", latest.size),
        );
    }
    // An empty tree has one root: a checkpoint of size 0 naming another is
    // a lie a verifier would call inconsistent, so it is never cosigned
    // (nor stored as this witness's view).
    if new.size == 0 && new.root != pl::empty_root() {
        tracing::warn!(%origin, "refusing an empty checkpoint whose root is not the empty tree's");
        return text(
            StatusCode::UNPROCESSABLE_ENTITY,
            "a checkpoint of size 0 must have the empty tree's root",
        );
    }
    let Ok(latest_root) = TreeHash::parse_hash(&latest.root) else {
        return text(StatusCode::INTERNAL_SERVER_ERROR, "stored view is corrupt");
    };
    if old == new.size && old > 0 && new.root != latest_root {
        // The same size with another root: a fork of what it cosigned.
        tracing::warn!(%origin, size = old, "refusing a checkpoint that forks the one cosigned");
        return answer(
            StatusCode::CONFLICT,
            "text/x.tlog.size",
            format!("{}\n", latest.size),
        );
    }
    // (From nothing, or to the same tree: no proof to check.)
    let consistent = if old == 0 || old == new.size {
        proof.is_empty()
    } else {
        let old_cp = pl::VerifiedCheckpoint {
            origin: origin.clone(),
            size: old,
            root: latest_root,
        };
        pl::check_consistency(&old_cp, &new, &proof).is_ok()
    };
    if !consistent {
        tracing::warn!(%origin, old, new = new.size, "refusing an inconsistent checkpoint");
        return text(
            StatusCode::UNPROCESSABLE_ENTITY,
            "consistency proof does not verify",
        );
    }
    let clock = crate::ledger::unix_now();
    // A clock a little behind the last cosignature (an NTP step) dates this
    // one at that time. One far behind means the last was dated by a clock
    // gone wrong; dating this one then too would put a time on it that is
    // not this witness's, and logs take witness times as confirmation of
    // the time. Refused until the clock passes it again or an operator
    // who knows the last date was wrong starts it with `--accept-clock`.
    if views.cosigned_at > clock.saturating_add(MAX_CLOCK_BEHIND_SECS) {
        tracing::error!(
            last = views.cosigned_at,
            clock,
            "this witness's clock is behind its last cosignature; not cosigning. If the clock \
             is right, the last cosignature was dated by a clock gone wrong: restart the \
             witness once with --accept-clock {}",
            views.cosigned_at
        );
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!(
                "this witness's clock is behind its last cosignature: fix its clock, or (if the \
                 clock is right) restart it once with --accept-clock {}",
                views.cosigned_at
            ),
        );
    }
    let now = clock.max(views.cosigned_at);
    let mut next = views.clone();
    next.cosigned_at = now;
    next.logs.insert(
        origin.clone(),
        View {
            size: new.size,
            root: new.root.to_string(),
        },
    );
    // Durable before the cosignature leaves: a restarted witness can never
    // be led to cosign a smaller tree or a fork of what it signed.
    let bytes = match serde_json::to_vec_pretty(&next) {
        Ok(b) => b,
        Err(_) => return text(StatusCode::INTERNAL_SERVER_ERROR, "cannot encode state"),
    };
    let dir = w.dir.clone();
    let stored = tokio::task::spawn_blocking(move || {
        storage_node::store::write_durably(&dir, STATE_FILE, &[&bytes])
    })
    .await;
    if !matches!(stored, Ok(Ok(()))) {
        tracing::error!("witness could not persist its state");
        return text(StatusCode::SERVICE_UNAVAILABLE, "cannot persist state");
    }
    *views = next;
    drop(views);
    // The answer is this witness's own cosignature line and nothing else:
    // not the lines a requester put in the note under this witness's name
    // with other key IDs (a log appending the answer as it is would store
    // them as this witness's).
    let Ok(lines) = pw::cosignature_line(&w.signer_key, &note, now) else {
        return text(StatusCode::INTERNAL_SERVER_ERROR, "cannot cosign");
    };
    tracing::info!(%origin, size = new.size, "cosigned");
    answer(StatusCode::OK, "text/plain; charset=utf-8", lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The published key is the signing key's, whatever became of the
    /// file: lost in a crash after the key was written, left empty, or
    /// another witness's.
    #[test]
    fn the_public_key_file_follows_the_signing_key() {
        let dir = tempfile::tempdir().expect("temp dir");
        let pub_path = dir.path().join(WITNESS_PUB_FILE);
        let (_, first) =
            open(dir.path(), "witness.example/a", &[], false, None).expect("first start");
        assert_eq!(
            std::fs::read_to_string(&pub_path).expect("written").trim(),
            first
        );
        let (_, other) = pw::witness_keys("witness.example/a", &[9; 32]);
        for left in [None, Some(String::new()), Some(other)] {
            match &left {
                None => std::fs::remove_file(&pub_path).expect("removed"),
                Some(text) => std::fs::write(&pub_path, text).expect("written"),
            }
            let (_, again) = open(dir.path(), "witness.example/a", &[], false, None)
                .unwrap_or_else(|e| panic!("start with {left:?}: {e}"));
            assert_eq!(again, first, "with {left:?}");
            assert_eq!(
                std::fs::read_to_string(&pub_path)
                    .expect("rewritten")
                    .trim(),
                first,
                "with {left:?}"
            );
        }
    }

    /// A last cosignature dated after the clock (by a clock gone wrong) is
    /// kept as it is, and refuses cosigning, until the witness is told the
    /// clock is right now: then the date is the clock's.
    #[test]
    fn a_wrong_last_date_is_dropped_only_when_told_the_clock_is_right() {
        let dir = tempfile::tempdir().expect("temp dir");
        drop(open(dir.path(), "witness.example/a", &[], false, None).expect("first start"));
        let state = dir.path().join(STATE_FILE);
        let ahead = crate::ledger::unix_now() + 30 * 86_400;
        let views = Views {
            cosigned_at: ahead,
            ..Views::default()
        };
        std::fs::write(&state, serde_json::to_vec(&views).expect("json")).expect("written");
        let read = || -> Views {
            serde_json::from_slice(&std::fs::read(&state).expect("state")).expect("json")
        };
        drop(open(dir.path(), "witness.example/a", &[], false, None).expect("start"));
        assert_eq!(read().cosigned_at, ahead, "dropped without being told");
        // Another date than the last's: nothing changes (a flag left on).
        drop(open(dir.path(), "witness.example/a", &[], false, Some(ahead - 1)).expect("start"));
        assert_eq!(read().cosigned_at, ahead);
        drop(open(dir.path(), "witness.example/a", &[], false, Some(ahead)).expect("start"));
        let now = read().cosigned_at;
        assert!(
            now <= crate::ledger::unix_now() && now + 60 > crate::ledger::unix_now(),
            "{now}"
        );
    }

    /// A name no key can sign under is refused before anything is written,
    /// so the same directory starts under a good name next.
    #[test]
    fn a_witness_name_that_cannot_sign_writes_nothing() {
        let dir = tempfile::tempdir().expect("temp dir");
        for bad in ["Court A", "a+b", ""] {
            match open(dir.path(), bad, &[], false, None) {
                Err(WitnessStartError::Name(n)) => assert_eq!(n, bad),
                other => panic!("{bad:?}: {:?}", other.map(|(_, k)| k)),
            }
            assert!(!dir.path().join(WITNESS_KEY_FILE).exists(), "{bad:?}");
        }
        let (_, key) = open(dir.path(), "court-a.example", &[], false, None).expect("a good name");
        assert!(key.starts_with("court-a.example+"), "{key}");
    }

    /// A log trusted under two keys (one origin, as while it rotates) has
    /// checkpoints signed with either cosigned; one signed with neither is
    /// refused (403).
    #[tokio::test]
    async fn a_log_may_be_trusted_under_more_than_one_key() {
        let dir = tempfile::tempdir().expect("temp dir");
        let origin = "custodia.example/ledger";
        let (first, first_pub) = pl::note_keys(origin, &[1; 32]);
        let (second, second_pub) = pl::note_keys(origin, &[2; 32]);
        let (stranger, _) = pl::note_keys(origin, &[3; 32]);
        let (router, _) = open(
            dir.path(),
            "witness.example/a",
            &[first_pub, second_pub],
            false,
            None,
        )
        .expect("started");
        let (addr, _serving) = serve("127.0.0.1:0".parse().expect("address"), router)
            .await
            .expect("serving");
        let empty = pl::empty_root();
        for (key, want) in [(&first, 200), (&second, 200), (&stranger, 403)] {
            let cp = pl::sign_checkpoint(key, origin, 0, empty).expect("signed");
            let body = pw::add_checkpoint_body(0, &[], &cp);
            let url = format!("http://{addr}/add-checkpoint");
            let status = tokio::task::spawn_blocking(move || match ureq::post(url).send(body) {
                Ok(r) => r.status().as_u16(),
                Err(ureq::Error::StatusCode(code)) => code,
                Err(e) => panic!("{e}"),
            })
            .await
            .expect("sent");
            assert_eq!(status, want);
        }
    }

    /// One witness process to a directory, and none that forgot what it
    /// cosigned: a second start beside a running one is refused, and so is
    /// a key whose state file is gone, unless told it never cosigned.
    #[test]
    fn a_witness_starts_alone_and_never_without_its_state() {
        let dir = tempfile::tempdir().expect("temp dir");
        let running = open(dir.path(), "witness.example/a", &[], false, None).expect("first start");
        assert!(matches!(
            open(dir.path(), "witness.example/a", &[], false, None),
            Err(WitnessStartError::InUse(_))
        ));
        drop(running);
        std::fs::remove_file(dir.path().join(STATE_FILE)).expect("state removed");
        assert!(matches!(
            open(dir.path(), "witness.example/a", &[], false, None),
            Err(WitnessStartError::StateMissing(_))
        ));
        let afresh =
            open(dir.path(), "witness.example/a", &[], true, None).expect("told to start afresh");
        drop(afresh);
        // Once: the state it starts from is written, so the next start
        // needs no flag.
        let _again =
            open(dir.path(), "witness.example/a", &[], false, None).expect("started again");
    }
}
