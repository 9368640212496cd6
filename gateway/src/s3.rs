//! The S3-compatible API (`s3s`): every object is evidence.
//!
//! A PUT files the body through the same pipeline as `POST /v1/evidence`
//! (hashed, erasure-coded, notarized) and commits the object version in the
//! manifest's transaction; a GET is a verified read recorded on the ledger
//! before the first byte, like any other. SigV4 with per-tenant access keys
//! (`indexer::s3`); a bucket belongs to one tenant and other tenants' keys get
//! AccessDenied. Object Lock is enforced in the index transactions
//! (`indexer::s3`), not here.

use crate::api::{Gateway, Store};
use crate::error::ApiError;
use crate::ingest::{self, Filing, FilingMeta, S3Put};
use futures::StreamExt;
use indexer::s3::{
    self as ix, BucketRecord, Deleted, LockMode, ObjectError, ObjectVersion, Retention, Versioning,
};
use indexer::schema::{self, Role};
use protocol::EvidenceId;
use s3s::dto::*;
use s3s::{s3_error, S3Error, S3ErrorCode, S3Request, S3Response, S3Result, S3};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

/// Keys listed per index transaction.
const LIST_BATCH: usize = 1000;

/// The S3 front of a gateway.
pub struct S3Front<S: Store> {
    gw: Arc<Gateway<S>>,
}

/// Who signed the request.
struct Caller {
    tenant: String,
    role: Role,
    access_key: String,
    bypass_governance: bool,
}

impl Caller {
    /// The caller as the evidence API names callers, its credential the
    /// access key (`s3:ACCESS_KEY`).
    fn api_caller(&self) -> crate::api::Caller {
        crate::api::Caller {
            rec: schema::TokenRecord {
                tenant: self.tenant.clone(),
                role: self.role,
            },
            credential: format!("s3:{}", self.access_key),
            live: ix::access_key_ref(&self.access_key),
        }
    }

    /// Who acted, as ledger statements name actors (as the evidence API's,
    /// `tenant/role/credential`).
    fn actor(&self) -> String {
        crate::api::actor(&self.api_caller())
    }
}

/// Looks SigV4 secrets up in the index.
struct Auth<S: Store> {
    gw: Arc<Gateway<S>>,
}

#[async_trait::async_trait]
impl<S: Store + 'static> s3s::auth::S3Auth for Auth<S> {
    async fn get_secret_key(&self, access_key: &str) -> S3Result<s3s::auth::SecretKey> {
        let key = access_key.to_owned();
        let rec = indexer::run(&self.gw.store, |tx| {
            let key = &key;
            async move { ix::get_access_key_tx(&tx, key).await }
        })
        .await
        .map_err(|e| internal(ApiError::Object(e)))?;
        match rec {
            Some(r) => Ok(s3s::auth::SecretKey::from(r.secret)),
            None => Err(s3_error!(InvalidAccessKeyId)),
        }
    }
}

/// Starts the S3 API on `listen` (HTTPS only when `tls` is given); returns
/// the bound address and the task.
pub(crate) async fn serve<S: Store + 'static>(
    gw: Arc<Gateway<S>>,
    listen: SocketAddr,
    domain: Option<&str>,
    tls: Option<&crate::config::ServerTlsPaths>,
    drain: crate::api::Drain,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let acceptor = match tls {
        None => None,
        Some(t) => Some(tokio_rustls::TlsAcceptor::from(
            storage_node::tls::https_server_config(&t.cert, &t.key)
                .map_err(|e| std::io::Error::other(format!("S3 TLS: {e}")))?,
        )),
    };
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let metrics = gw.metrics.clone();
    // Its own, as large as the receive budget (see `s3_chunks`).
    let budget = crate::s3_chunks::Budget {
        memory: Arc::new(tokio::sync::Semaphore::new(gw.receive_memory_kib)),
        kib: gw.receive_memory_kib,
    };
    let http = crate::api::http1(Duration::from_millis(
        gw.config.client_idle_timeout_ms.max(1),
    ));
    let keep_alive_ms = gw.config.s3_keep_alive_after_ms;
    let mut builder = s3s::service::S3ServiceBuilder::new(S3Front { gw: gw.clone() });
    builder.set_auth(Auth { gw });
    // A form upload's file is read whole into memory: bounded (see
    // `s3_digest::FORM_UPLOAD_MAX_BYTES`).
    let mut config = s3s::config::S3Config::default();
    config.post_object_max_file_size = crate::s3_digest::FORM_UPLOAD_MAX_BYTES;
    // An XML document (DeleteObjects, CompleteMultipartUpload, ...) is read
    // whole and parsed before its limits are checked: 20 MB by default, over
    // 100 MB of parsed entries.
    config.xml_max_body_size = crate::s3_digest::XML_MAX_BODY_BYTES;
    builder.set_config(Arc::new(s3s::config::StaticConfigProvider::new(Arc::new(
        config,
    ))));
    let forms = Arc::new(tokio::sync::Semaphore::new(
        crate::s3_digest::FORM_UPLOADS_AT_ONCE,
    ));
    if let Some(d) = domain {
        // Clients send the port in Host: `BUCKET.DOMAIN:PORT`; a Host of
        // `DOMAIN:PORT` alone is path-style.
        let with_port = format!("{d}:{}", addr.port());
        let domains = if d.contains(':') {
            vec![d]
        } else {
            vec![d, with_port.as_str()]
        };
        let host = s3s::host::MultiDomain::new(domains)
            .map_err(|e| std::io::Error::other(format!("S3 domain {d:?}: {e}")))?;
        builder.set_host(host);
    }
    let service = builder.build();
    let keep_alive_after = Duration::from_millis(keep_alive_ms);
    // Counted by method: the S3 operation is known only inside s3s.
    let counted = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let (service, metrics, forms) = (service.clone(), metrics.clone(), forms.clone());
        let budget = budget.clone();
        async move {
            let mut req = req;
            crate::s3_digest::normalize_range(&mut req);
            // From a fixed set: any token is a valid method, and
            // each new label would be a series kept for good.
            let method = crate::metrics::method_label(req.method());
            // Counted as 499 if this future is dropped first (the client
            // left before the response head).
            let request = metrics.http_request("s3", method.to_owned());
            let head = req.method() == http::Method::HEAD;
            let completes = req.method() == http::Method::POST
                && req
                    .uri()
                    .query()
                    .is_some_and(|q| q.split('&').any(|p| p.starts_with("uploadId=")));
            // CopyObject and UploadPartCopy.
            let copies = req.method() == http::Method::PUT
                && req.headers().contains_key("x-amz-copy-source");
            // A form upload is read whole into memory (bounded), a few at
            // a time.
            let form = match crate::s3_digest::is_form_upload(&req) {
                true => Some(forms.try_acquire_owned()),
                false => None,
            };
            let call = async move {
                if let Some(refused) =
                    crate::s3_digest::auth_refusal(&req, crate::ledger::unix_now())
                        .or_else(|| crate::s3_digest::unsupported_refusal(&req))
                        .or_else(|| crate::s3_digest::digest_refusal(&req))
                        .or_else(|| crate::s3_digest::form_too_large(&req))
                        .or_else(|| crate::s3_digest::document_too_large(&req))
                {
                    Ok(refused_response(&refused))
                } else if matches!(form, Some(Err(_))) {
                    Ok(refused_response(&crate::s3_digest::Refused {
                        code: "SlowDown",
                        status: http::StatusCode::SERVICE_UNAVAILABLE,
                        message: "too many form uploads at once; try again shortly".into(),
                    }))
                } else if crate::s3_digest::wants_check(&req) {
                    match crate::s3_digest::wrap(req) {
                        Ok((req, verdict)) => {
                            let resp = service.call(req.map(s3s::Body::http_body_unsync)).await;
                            // s3s answers a body that failed with a 500.
                            let refused = verdict.lock().ok().and_then(|mut v| v.take());
                            match refused {
                                Some(refused) => Ok(refused_response(&refused)),
                                None => resp,
                            }
                        }
                        Err(refused) => Ok(refused_response(&refused)),
                    }
                } else if crate::s3_digest::streaming(req.headers()) {
                    let (req, verdict) = crate::s3_chunks::wrap(req, budget);
                    let resp = service.call(req.map(s3s::Body::http_body_unsync)).await;
                    let refused = verdict.lock().ok().and_then(|mut v| v.take());
                    match refused {
                        Some(refused) => Ok(refused_response(&refused)),
                        None => resp,
                    }
                } else {
                    service.call(req.map(s3s::Body::from)).await
                }
            };
            let (mut resp, request) = match copies {
                true => kept_alive(Box::pin(call), keep_alive_after, request).await,
                false => (call.await, Some(request)),
            };
            // s3s answers a HEAD 200 whatever its output says: a
            // ranged one (with its Content-Range) is a 206, as
            // from S3.
            if let Ok(r) = &mut resp {
                if head
                    && r.status() == http::StatusCode::OK
                    && r.headers().contains_key(http::header::CONTENT_RANGE)
                {
                    *r.status_mut() = http::StatusCode::PARTIAL_CONTENT;
                }
                if let Some(request) = request {
                    request.answered(r.status().as_u16());
                }
                if completes {
                    let body = std::mem::take(r.body_mut());
                    *r.body_mut() = one_xml_declaration(body);
                }
            } else {
                // No response at all: hyper closes the connection.
                if let Some(request) = request {
                    request.answered(http::StatusCode::INTERNAL_SERVER_ERROR.as_u16());
                }
            }
            resp
        }
    });
    let task = tokio::spawn(crate::api::serve_connections(
        listener, acceptor, http, drain, counted,
    ));
    tracing::info!(%addr, https = tls.is_some(), "S3 API listening");
    Ok((addr, task))
}

/// The answer to a copy, kept alive the way S3 keeps its own: a copy
/// still running after `after` is answered 200 at once with an XML
/// declaration, then a space each second, then the copy's own XML, or its
/// error document (inside the 200: the AWS SDKs, botocore, rclone and
/// s3cmd read a CopyObject's or UploadPartCopy's body for an `<Error>`).
/// A copy of many GiB would otherwise send nothing until it is done, and
/// the client's read timeout would cut it off and retry it from the start.
/// The copy runs inside the body: a client that leaves cancels it (its
/// source is read through [`cancellable`], so the filing fails and cleans
/// up after itself).
async fn kept_alive<F, E>(
    mut call: std::pin::Pin<Box<F>>,
    after: Duration,
    request: crate::metrics::HttpRequest,
) -> (
    Result<hyper::Response<s3s::Body>, E>,
    Option<crate::metrics::HttpRequest>,
)
where
    F: std::future::Future<Output = Result<hyper::Response<s3s::Body>, E>> + Send + 'static,
    E: std::fmt::Debug + 'static,
{
    use std::task::Poll;
    if let Ok(resp) = tokio::time::timeout(after, call.as_mut()).await {
        return (resp, Some(request));
    }
    // Counted when the copy's own answer is known (its status, and how
    // long it took), not as the 200 that keeps it alive: a copy failing
    // inside that 200 is a failure. A client gone first counts as one.
    let mut request = Some(request);
    const DECLARATION: &[u8] = br#"<?xml version="1.0" encoding="UTF-8"?>"#;
    let mut tick = tokio::time::interval_at(
        tokio::time::Instant::now() + Duration::from_secs(1),
        Duration::from_secs(1),
    );
    let mut call = Some(call);
    let mut outcome: Option<s3s::Body> = None;
    let mut declared = false;
    let mut first_of_outcome = true;
    let stream = futures::stream::poll_fn(
        move |cx| -> Poll<Option<Result<bytes::Bytes, s3s::StdError>>> {
            use http_body::Body as _;
            if !declared {
                declared = true;
                return Poll::Ready(Some(Ok(bytes::Bytes::from_static(DECLARATION))));
            }
            loop {
                if let Some(body) = outcome.as_mut() {
                    return match std::pin::Pin::new(body).poll_frame(cx) {
                        Poll::Pending => Poll::Pending,
                        Poll::Ready(None) => Poll::Ready(None),
                        Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
                        Poll::Ready(Some(Ok(frame))) => {
                            let Ok(mut data) = frame.into_data() else {
                                // Trailers: a copy's answer has none to send.
                                continue;
                            };
                            if first_of_outcome && !data.is_empty() {
                                first_of_outcome = false;
                                if data.starts_with(DECLARATION) {
                                    data = data.slice(DECLARATION.len()..);
                                }
                            }
                            Poll::Ready(Some(Ok(data)))
                        }
                    };
                }
                let Some(running) = call.as_mut() else {
                    return Poll::Ready(None);
                };
                match running.as_mut().poll(cx) {
                    Poll::Ready(Ok(resp)) => {
                        call = None;
                        if let Some(r) = request.take() {
                            r.answered(resp.status().as_u16());
                        }
                        outcome = Some(resp.into_body());
                    }
                    Poll::Ready(Err(e)) => {
                        call = None;
                        if let Some(r) = request.take() {
                            r.answered(http::StatusCode::INTERNAL_SERVER_ERROR.as_u16());
                        }
                        tracing::error!(error = ?e, "S3 copy failed after its answer began");
                        let mut err = S3Error::new(S3ErrorCode::InternalError);
                        err.set_message("internal error; details are in the gateway's log");
                        let xml = s3_error_document(&err);
                        return Poll::Ready(Some(Ok(bytes::Bytes::from(xml))));
                    }
                    Poll::Pending => {
                        return match tick.poll_tick(cx) {
                            Poll::Ready(_) => {
                                Poll::Ready(Some(Ok(bytes::Bytes::from_static(b" "))))
                            }
                            Poll::Pending => Poll::Pending,
                        };
                    }
                }
            }
        },
    );
    let body = http_body_util::StreamBody::new(futures::StreamExt::map(stream, |r| {
        r.map(http_body::Frame::data)
    }));
    let mut resp = hyper::Response::new(s3s::Body::http_body_unsync(body));
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/xml"),
    );
    tracing::info!(
        after_ms = after.as_millis() as u64,
        "S3 copy still running: answered 200, kept alive"
    );
    (Ok(resp), None)
}

/// An S3 error document without its XML declaration.
fn s3_error_document(err: &S3Error) -> String {
    let code = err.code().as_str();
    let message = err.message().unwrap_or(code);
    format!(
        "<Error><Code>{}</Code><Message>{}</Message></Error>",
        xml_escape(code),
        xml_escape(message)
    )
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A CompleteMultipartUpload answer with at most one XML declaration.
///
/// s3s answers a Complete at once (200, an XML declaration, then spaces
/// while the object is filed) and writes the outcome after; an error is
/// written with a declaration of its own, which is not well-formed XML:
/// botocore's parser then gives up and reports a generic 500, losing the
/// error's code (a 412 from a commit race, a part that could not be read).
/// Later declarations are dropped here.
fn one_xml_declaration(body: s3s::Body) -> s3s::Body {
    use http_body_util::BodyExt;
    const DECLARATION: &[u8] = br#"<?xml version="1.0" encoding="UTF-8"?>"#;
    let mut seen = false;
    let body = body.map_frame(move |frame| match frame.into_data() {
        Ok(data) if data.is_empty() => http_body::Frame::data(data),
        Ok(data) => {
            let later = std::mem::replace(&mut seen, true);
            match later && data.starts_with(DECLARATION) {
                true => http_body::Frame::data(data.slice(DECLARATION.len()..)),
                false => http_body::Frame::data(data),
            }
        }
        Err(frame) => frame,
    });
    s3s::Body::http_body(body)
}

// ---------------------------------------------------------------- errors

/// An S3 XML error answer for a document that failed its digest.
fn refused_response(refused: &crate::s3_digest::Refused) -> hyper::Response<s3s::Body> {
    tracing::warn!(code = refused.code, message = %refused.message, "S3 document refused");
    let mut resp = hyper::Response::new(s3s::Body::from(refused.xml()));
    *resp.status_mut() = refused.status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/xml"),
    );
    resp
}

fn internal(e: ApiError) -> S3Error {
    tracing::error!(error = %e, "S3 request failed");
    let mut err = S3Error::new(S3ErrorCode::InternalError);
    err.set_message("internal error; details are in the gateway's log");
    err
}

/// Maps gateway errors to S3's codes.
fn s3_err(e: ApiError) -> S3Error {
    use S3ErrorCode as C;
    if indexer::Retryable::is_retryable(&e) {
        return S3Error::with_message(C::SlowDown, e.to_string());
    }
    // The index's refusals that mean the same through either wrapping.
    let index = match &e {
        ApiError::Index(s) | ApiError::Object(ObjectError::Schema(s)) => Some(s),
        _ => None,
    };
    match index {
        // An upload whose intent GC aborted (its lease went unrenewed): the
        // server's failure, and a retry files afresh (503, as the evidence
        // API answers).
        Some(schema::SchemaError::IntentAborted(_) | schema::SchemaError::NoIntent(_)) => {
            return S3Error::with_message(C::ServiceUnavailable, e.to_string());
        }
        // The index's storage failed (a disk full or failing): the
        // service's state, not the request's; SDKs retry a 503.
        Some(_) if e.status() == http::StatusCode::SERVICE_UNAVAILABLE => {
            return S3Error::with_message(C::ServiceUnavailable, e.to_string());
        }
        // Expunged between the read of its version and the change.
        Some(schema::SchemaError::NoEvidence(_)) => {
            return S3Error::with_message(C::NoSuchKey, e.to_string());
        }
        _ => {}
    }
    let (code, msg) = match &e {
        ApiError::Object(o) => match o {
            ObjectError::NoSuchBucket => (C::NoSuchBucket, o.to_string()),
            ObjectError::BucketExists { mine: true } => (C::BucketAlreadyOwnedByYou, o.to_string()),
            ObjectError::BucketExists { mine: false } => (C::BucketAlreadyExists, o.to_string()),
            ObjectError::BucketNotEmpty => (C::BucketNotEmpty, o.to_string()),
            ObjectError::NoSuchKey => (C::NoSuchKey, o.to_string()),
            ObjectError::NoSuchVersion => (C::NoSuchVersion, o.to_string()),
            ObjectError::NoSuchUpload => (C::NoSuchUpload, o.to_string()),
            ObjectError::PreconditionFailed(m) => (C::PreconditionFailed, m.clone()),
            ObjectError::Conflict(m) => (C::OperationAborted, m.clone()),
            ObjectError::Locked(m) => (C::AccessDenied, m.clone()),
            ObjectError::BadName("bucket") => (C::InvalidBucketName, o.to_string()),
            ObjectError::BadName(_) => (C::InvalidArgument, o.to_string()),
            ObjectError::NoSuchTenant => (C::AccessDenied, o.to_string()),
            ObjectError::TooManyBuckets => (C::TooManyBuckets, o.to_string()),
            ObjectError::Schema(_) | ObjectError::Journal(_) => return internal(e),
        },
        ApiError::BadDigest | ApiError::ChecksumMismatch(_) => (C::BadDigest, e.to_string()),
        ApiError::HashMismatch { .. } => (C::BadDigest, e.to_string()),
        // s3s reports a signed payload whose SHA-256 does not match as a
        // failed body stream (its error type is not exported, so by name).
        ApiError::BodyIncomplete(m) if m.contains("Sha256Mismatch") => {
            let mut err = S3Error::with_message(
                C::Custom("XAmzContentSHA256Mismatch".into()),
                "the provided 'x-amz-content-sha256' header does not match what was computed",
            );
            err.set_status_code(http::StatusCode::BAD_REQUEST);
            return err;
        }
        // A signed chunk whose signature does not match is a forged or
        // tampered request, not a body cut short; framing s3s cannot parse
        // is a malformed one. (By name, as above: s3s's
        // `AwsChunkedStreamError` reaches here as text.)
        ApiError::BodyIncomplete(m) if m.contains("AwsChunkedStreamError: SignatureMismatch") => (
            C::SignatureDoesNotMatch,
            "an aws-chunked chunk's signature does not match its data; nothing was stored".into(),
        ),
        ApiError::BodyIncomplete(m)
            if [
                "AwsChunkedStreamError: FormatError",
                "AwsChunkedStreamError: ChunkMetaTooLarge",
                "AwsChunkedStreamError: TrailersTooLarge",
                "AwsChunkedStreamError: TooManyTrailerHeaders",
            ]
            .iter()
            .any(|why| m.contains(why)) =>
        {
            (
                C::InvalidRequest,
                format!("malformed aws-chunked body ({m}); nothing was stored"),
            )
        }
        ApiError::BodyIncomplete(_) => (C::IncompleteBody, e.to_string()),
        ApiError::BodyIdle(_) => (C::RequestTimeout, e.to_string()),
        // S3 has no code for a full cluster; 503 with the reason.
        ApiError::Unavailable(_) | ApiError::InsufficientStorage(_) => {
            (C::ServiceUnavailable, e.to_string())
        }
        ApiError::Forbidden(_) | ApiError::Unauthorized => (C::AccessDenied, e.to_string()),
        ApiError::NotFound | ApiError::Gone => (C::NoSuchKey, e.to_string()),
        ApiError::BadRequest(_) | ApiError::Conflict(_) => (C::InvalidRequest, e.to_string()),
        ApiError::Index(schema::SchemaError::Locked(m)) => (C::AccessDenied, m.clone()),
        _ => return internal(e),
    };
    S3Error::with_message(code, msg)
}

/// The last millisecond of year 9999, the latest instant S3 timestamps
/// (and the `time` crate without its large-dates feature) can show.
const LATEST_TS_MS: u64 = 253_402_300_799_999;

/// `ms` as an S3 timestamp; later instants show as the latest one (a
/// conversion past year 9999 would panic).
///
/// As a time in S3's XML. Milliseconds are kept (S3 writes `.000`):
/// rclone names each version by its time (`--s3-versions`), and versions
/// filed within one second would otherwise share a name and be read as one.
/// Headers (`Last-Modified`) carry whole seconds, as HTTP dates do.
fn ms_to_ts(ms: u64) -> Timestamp {
    Timestamp::from(UNIX_EPOCH + Duration::from_millis(ms.min(LATEST_TS_MS)))
}

/// Object tags are not kept: a write that asks for some is refused rather
/// than filed without them. (An empty `x-amz-tagging` asks for none.)
fn refuse_tags(tagging: Option<&str>) -> S3Result<()> {
    match tagging {
        Some(t) if !t.is_empty() => Err(s3_error!(
            NotImplemented,
            "object tags are not kept here: file without x-amz-tagging"
        )),
        _ => Ok(()),
    }
}

fn ts_to_ms(ts: Timestamp) -> u64 {
    let t: time::OffsetDateTime = ts.into();
    u64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(0)
}

fn lock_mode(m: LockMode) -> ObjectLockMode {
    ObjectLockMode::from_static(match m {
        LockMode::Compliance => ObjectLockMode::COMPLIANCE,
        LockMode::Governance => ObjectLockMode::GOVERNANCE,
    })
}

fn parse_lock_mode(m: &ObjectLockMode) -> S3Result<LockMode> {
    match m.as_str() {
        ObjectLockMode::COMPLIANCE => Ok(LockMode::Compliance),
        ObjectLockMode::GOVERNANCE => Ok(LockMode::Governance),
        other => Err(s3_error!(
            InvalidArgument,
            "unknown Object Lock mode {other:?}"
        )),
    }
}

fn retention_mode(m: LockMode) -> ObjectLockRetentionMode {
    ObjectLockRetentionMode::from_static(match m {
        LockMode::Compliance => ObjectLockRetentionMode::COMPLIANCE,
        LockMode::Governance => ObjectLockRetentionMode::GOVERNANCE,
    })
}

fn parse_retention_mode(m: &ObjectLockRetentionMode) -> S3Result<LockMode> {
    match m.as_str() {
        ObjectLockRetentionMode::COMPLIANCE => Ok(LockMode::Compliance),
        ObjectLockRetentionMode::GOVERNANCE => Ok(LockMode::Governance),
        other => Err(s3_error!(MalformedXML, "unknown retention mode {other:?}")),
    }
}

/// The version a request names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum VersionRef {
    /// No `versionId`: the newest.
    Newest,
    Id(EvidenceId),
    /// `versionId=null`: the version written while versioning was not
    /// enabled, as S3 names it (and as listings show it).
    Null,
}

fn parse_version(v: Option<&str>) -> S3Result<VersionRef> {
    match v {
        None => Ok(VersionRef::Newest),
        Some("null") => Ok(VersionRef::Null),
        Some(s) => s
            .parse()
            .map(VersionRef::Id)
            .map_err(|_| s3_error!(InvalidArgument, "invalid version id {s:?}")),
    }
}

/// `x-amz-object-lock-legal-hold` of GET and HEAD: on a bucket with
/// Object Lock, ON or OFF; on another, ON where a hold applies.
/// `held`: the version's own hold, or one placed on its evidence through
/// the evidence API (which binds the S3 view as well: a delete it refuses
/// must be explained by what the object shows, as its retention is).
fn legal_hold_status(b: &BucketRecord, held: bool) -> Option<ObjectLockLegalHoldStatus> {
    (b.object_lock || held).then(|| {
        ObjectLockLegalHoldStatus::from_static(if held {
            ObjectLockLegalHoldStatus::ON
        } else {
            ObjectLockLegalHoldStatus::OFF
        })
    })
}

fn show_version(b: &BucketRecord, v: &ObjectVersion) -> Option<String> {
    shown_version_id(b, v.null_version, v.version_id)
}

fn shown_version_id(b: &BucketRecord, null_version: bool, id: EvidenceId) -> Option<String> {
    (b.versioning != Versioning::Unversioned || !null_version)
        .then(|| version_name(null_version, id))
}

/// A version's name wherever S3 always names it (listings, a delete
/// marker's answer): its id, or "null" for the null version.
fn version_name(null_version: bool, id: EvidenceId) -> String {
    if null_version {
        "null".to_owned()
    } else {
        id.to_string()
    }
}

/// A multipart object's ETag: the MD5 of its parts' MD5s (hex), then "-N".
fn multipart_etag<'a>(md5s: impl ExactSizeIterator<Item = &'a str>) -> String {
    use md5::Digest as _;
    let n = md5s.len();
    let mut h = md5::Md5::new();
    for m in md5s {
        h.update(hex::decode(m).unwrap_or_default());
    }
    format!("{}-{n}", hex::encode(h.finalize()))
}

impl<S: Store> S3Front<S> {
    async fn caller<T>(&self, req: &S3Request<T>, needed: Role) -> S3Result<Caller> {
        let creds = req
            .credentials
            .as_ref()
            .ok_or_else(|| s3_error!(AccessDenied, "anonymous access is not allowed"))?;
        let key = creds.access_key.clone();
        let rec = indexer::run(&self.gw.store, |tx| {
            let key = &key;
            async move { ix::get_access_key_tx(&tx, key).await }
        })
        .await
        .map_err(|e| s3_err(e.into()))?
        .ok_or_else(|| s3_error!(InvalidAccessKeyId))?;
        let role = schema::effective_role(&rec.tenant, rec.role);
        if !role.may(needed) {
            return Err(s3_error!(
                AccessDenied,
                "this key's role may not do this ({:?} needed)",
                needed
            ));
        }
        Ok(Caller {
            tenant: rec.tenant,
            role,
            access_key: key,
            bypass_governance: rec.bypass_governance,
        })
    }

    /// The bucket, if it belongs to the caller's tenant; AccessDenied if it
    /// belongs to another (as S3 answers), NoSuchBucket if none.
    async fn bucket(&self, who: &Caller, name: &str) -> S3Result<BucketRecord> {
        let n = name.to_owned();
        let b = indexer::run(&self.gw.store, |tx| {
            let n = &n;
            async move { ix::get_bucket_tx(&tx, n).await }
        })
        .await
        .map_err(|e| s3_err(e.into()))?
        .ok_or_else(|| s3_error!(NoSuchBucket))?;
        if b.tenant != who.tenant {
            // S3's own words: whose bucket it is is not the caller's to learn.
            return Err(s3_error!(AccessDenied, "Access Denied"));
        }
        Ok(b)
    }

    async fn version(&self, bucket: &str, key: &str, which: VersionRef) -> S3Result<ObjectVersion> {
        let (b, k) = (bucket.to_owned(), key.to_owned());
        indexer::run(&self.gw.store, |tx| {
            let (b, k) = (&b, &k);
            async move {
                match which {
                    VersionRef::Newest => ix::get_version_tx(&tx, b, k, None).await,
                    VersionRef::Id(id) => ix::get_version_tx(&tx, b, k, Some(id)).await,
                    VersionRef::Null => ix::null_version_tx(&tx, b, k)
                        .await?
                        .ok_or(ObjectError::NoSuchVersion),
                }
            }
        })
        .await
        .map_err(|e| s3_err(e.into()))
    }

    /// A conditional write's check before its upload (a 412 then costs no
    /// upload); the filing checks it again as it commits.
    async fn precheck(
        &self,
        bucket: &str,
        key: &str,
        condition: Option<&ingest::PutCondition>,
    ) -> S3Result<()> {
        let Some(check) = condition else {
            return Ok(());
        };
        let current = match self.version(bucket, key, VersionRef::Newest).await {
            Ok(v) if !v.is_delete_marker() => Some(v),
            Ok(_) => None,
            Err(e) if *e.code() == S3ErrorCode::NoSuchKey => None,
            Err(e) => return Err(e),
        };
        (check.0)(current.as_ref()).map_err(|e| s3_err(e.into()))
    }

    /// The readable version and its manifest: delete markers and expunged
    /// evidence are not found (a marker named by version id is 405, as S3).
    /// The evidence must be `who`'s tenant's: the bucket's owner was checked
    /// in an earlier transaction, and the name may since have passed to
    /// another tenant (deleted, created again).
    async fn readable(
        &self,
        who: &Caller,
        bucket: &str,
        key: &str,
        version_id: Option<&str>,
    ) -> S3Result<(ObjectVersion, protocol::ManifestHeader)> {
        let which = parse_version(version_id)?;
        let v = self.version(bucket, key, which).await?;
        let Some(evidence) = v.evidence else {
            let mut e = if which != VersionRef::Newest {
                s3_error!(MethodNotAllowed, "this version is a delete marker")
            } else {
                s3_error!(NoSuchKey)
            };
            // As S3: the answer says a delete marker is why (clients tell a
            // deleted key from one that never was by it), and which.
            // (Markers exist only in buckets that were versioned, where the
            // null one is named "null".)
            with_headers(
                &mut e,
                &[
                    ("x-amz-delete-marker", "true".to_owned()),
                    (
                        "x-amz-version-id",
                        version_name(v.null_version, v.version_id),
                    ),
                ],
            );
            return Err(e);
        };
        let header = indexer::run(&self.gw.store, |tx| async move {
            schema::get_manifest_tx(&tx, evidence).await
        })
        .await
        .map_err(|e| s3_err(e.into()))?
        .ok_or_else(|| {
            s3_error!(
                NoSuchKey,
                "the evidence behind this object was expunged by court order"
            )
        })?;
        if header.tenant != who.tenant {
            return Err(s3_error!(AccessDenied, "Access Denied"));
        }
        Ok((v, header))
    }

    /// Files one multipart part (`meta.part` set) and deletes the part it
    /// replaced, if any, off the request's path.
    async fn file_part<B, E>(&self, meta: FilingMeta, body: B) -> S3Result<ix::PartRecord>
    where
        B: futures::Stream<Item = Result<bytes::Bytes, E>> + Send + Unpin + 'static,
        E: std::fmt::Display + Send + 'static,
    {
        let filing = tokio::spawn(ingest::file_evidence(self.gw.clone(), meta, body))
            .await
            .map_err(|_| internal(ApiError::Internal))?
            .map_err(s3_err)?;
        let Filing::Part { record, replaced } = filing else {
            return Err(internal(ApiError::Internal));
        };
        if let Some(old) = replaced {
            delete_parts_later(&self.gw, vec![old]);
        }
        Ok(record)
    }

    /// The source of a copy: in a bucket the caller may read, readable, and
    /// matching the copy's preconditions. Returns it with its manifest and
    /// the version id to report as copied (whether or not the request named
    /// one; none for an unversioned bucket's object).
    async fn copy_source(
        &self,
        who: &Caller,
        source: &CopySource,
        conditions: Conditions<'_>,
    ) -> S3Result<(ObjectVersion, protocol::ManifestHeader, Option<String>)> {
        let CopySource::Bucket {
            bucket,
            key,
            version_id,
        } = source
        else {
            return Err(s3_error!(NotImplemented, "copy from an access point"));
        };
        let b = self.bucket(who, bucket).await?;
        let (src, header) = self
            .readable(who, bucket, key, version_id.as_deref())
            .await
            .map_err(|mut e| match e.code() {
                // A delete marker named by its version: S3's 400. Without
                // the marker headers, here and for a source whose current
                // version is a marker: on a copy, `x-amz-version-id` names
                // the copy's version, not the source's.
                S3ErrorCode::MethodNotAllowed => s3_error!(
                    InvalidRequest,
                    "The source of a copy request may not specifically refer to a delete \
                     marker by version id."
                ),
                _ => {
                    e.set_headers(http::HeaderMap::new());
                    e
                }
            })?;
        // Any unmet copy-source condition is a 412.
        if unmet(&src, conditions).is_some() {
            return Err(s3_error!(PreconditionFailed));
        }
        // The version copied, named or not (`x-amz-copy-source-version-id`),
        // as S3 says it for a source in a bucket that keeps versions.
        let copied = show_version(&b, &src);
        Ok((src, header, copied))
    }

    /// One DELETE: of a version (Object Lock enforced in the index
    /// transaction), or of the current object (a delete marker where
    /// versioned). `if_match` (S3's conditional delete) is checked in the
    /// same transaction against the version deleted, or the current object.
    /// Returns (delete marker?, version id) as S3 reports them.
    #[allow(clippy::too_many_arguments)]
    async fn delete_one(
        &self,
        who: &Caller,
        b: &BucketRecord,
        bucket: &str,
        key: &str,
        version_id: Option<&str>,
        if_match: Option<&ETagCondition>,
        bypass_requested: bool,
    ) -> S3Result<(Option<bool>, Option<String>)> {
        if !ix::valid_key(key) {
            return Err(s3_error!(InvalidArgument, "invalid object key"));
        }
        let which = parse_version(version_id)?;
        let now = self.gw.clock.now_ms();
        // Locks end by the compliance clock, which no system clock moves.
        let compliance = self.gw.clock.compliance_ms();
        // Bypassing GOVERNANCE needs both the key's permission and the
        // request's header, as in S3.
        let bypass = who.bypass_governance && bypass_requested;
        let (bucket, key) = (bucket.to_owned(), key.to_owned());
        let unmatched = |v: Option<&ObjectVersion>| {
            if_match.is_some_and(|c| !v.is_some_and(|v| etag_matches(c, &v.etag, true)))
        };
        let refused = || ObjectError::PreconditionFailed("If-Match does not match".into());
        if which == VersionRef::Newest {
            let marker = ObjectVersion {
                version_id: EvidenceId::new(now, rand::random()),
                null_version: false,
                evidence: None,
                size: 0,
                etag: String::new(),
                last_modified_ms: now,
                content_type: None,
                user_metadata: Vec::new(),
                retention: None,
                legal_hold: false,
                content: ix::ContentHeaders::default(),
            };
            let gw = &self.gw;
            let done = indexer::run(&self.gw.store, |tx| {
                let (bucket, key, marker) = (&bucket, &key, &marker);
                async move {
                    if if_match.is_some() {
                        let current = match ix::get_version_tx(&tx, bucket, key, None).await {
                            Ok(v) if !v.is_delete_marker() => Some(v),
                            Ok(_) | Err(ObjectError::NoSuchKey) => None,
                            Err(e) => return Err(e.into()),
                        };
                        // As for a PUT: nothing to match is 404, not 412.
                        if current.is_none() {
                            return Err(ObjectError::NoSuchKey.into());
                        }
                        if unmatched(current.as_ref()) {
                            return Err(refused().into());
                        }
                    }
                    // Outside a bucket with versioning enabled, the null
                    // version (if any) goes for good. (Versioning as this
                    // transaction sees it, as the delete decides by it: a
                    // suspension committed since the bucket was read must
                    // not remove the null version without its statement.)
                    let versioning = ix::bucket_as_seen(&tx, bucket, b).await?.versioning;
                    let null = match versioning {
                        Versioning::Enabled => None,
                        _ => ix::null_version_tx(&tx, bucket, key).await?,
                    };
                    let done =
                        ix::delete_current_tx(&tx, bucket, key, marker, compliance, bypass, b)
                            .await?;
                    let removed_null = match &done {
                        Deleted::Removed => true,
                        Deleted::Marker(m) => m.null_version,
                    };
                    if let Some(v) = null.filter(|_| removed_null) {
                        let unlinked =
                            unlinked_tx(gw, &tx, who.actor(), (bucket, key), &v, None).await?;
                        if let Some(p) = unlinked {
                            indexer::ledger::enqueue_tx(&tx, 0, &p);
                        }
                    }
                    Ok::<_, ApiError>(done)
                }
            })
            .await
            .map_err(s3_err)?;
            if let Some(l) = &self.gw.ledger {
                l.queued();
            }
            return Ok(match done {
                Deleted::Marker(m) => (Some(true), show_version(b, &m)),
                Deleted::Removed => (None, None),
            });
        }
        let gw = &self.gw;
        let removed = indexer::run(&self.gw.store, |tx| {
            let (bucket, key) = (&bucket, &key);
            async move {
                let found = match which {
                    VersionRef::Id(id) => {
                        match ix::get_version_tx(&tx, bucket, key, Some(id)).await {
                            Ok(v) => Some(v),
                            Err(ObjectError::NoSuchVersion) => None,
                            Err(e) => return Err(e.into()),
                        }
                    }
                    _ => ix::null_version_tx(&tx, bucket, key).await?,
                };
                let Some(v) = found else {
                    return Ok(None);
                };
                if unmatched(Some(&v)) {
                    return Err(refused().into());
                }
                let v =
                    ix::delete_version_tx(&tx, bucket, key, v.version_id, compliance, bypass, b)
                        .await?;
                let unlinked = unlinked_tx(gw, &tx, who.actor(), (bucket, key), &v, None).await?;
                if let Some(p) = unlinked {
                    indexer::ledger::enqueue_tx(&tx, 0, &p);
                }
                Ok::<_, ApiError>(Some(v))
            }
        })
        .await
        .map_err(s3_err)?;
        if let Some(l) = &self.gw.ledger {
            l.queued();
        }
        // S3 names the version asked for, whether or not there was one
        // (deleting what is not there succeeds, as S3's DELETE does).
        let named = version_id.map(str::to_owned);
        match removed {
            Some(v) => {
                tracing::info!(bucket = %bucket, key = %key, version = %v.version_id, by = %who.tenant, role = ?who.role, "object version deleted");
                Ok((v.is_delete_marker().then_some(true), named))
            }
            None => Ok((None, named)),
        }
    }

    /// Changes a bucket's record in one transaction; `change` may refuse.
    /// Changes bucket `name`'s record: the bucket the caller was found to
    /// own (`seen`), checked again in the transaction (deleted and made
    /// anew by another tenant meanwhile, it is not this one).
    async fn update_bucket(
        &self,
        name: &str,
        seen: &BucketRecord,
        change: impl Fn(&mut BucketRecord) -> S3Result<()> + Send + Sync,
    ) -> S3Result<()> {
        let n = name.to_owned();
        let refused = std::sync::Mutex::new(None);
        indexer::run(&self.gw.store, |tx| {
            let (n, change, refused) = (&n, &change, &refused);
            async move {
                let mut b = ix::bucket_as_seen(&tx, n, seen).await?;
                if let Err(e) = change(&mut b) {
                    if let Ok(mut r) = refused.lock() {
                        *r = Some(e);
                    }
                    return Ok(());
                }
                ix::put_bucket_tx(&tx, n, &b).await
            }
        })
        .await
        .map_err(|e| s3_err(e.into()))?;
        match refused.into_inner().ok().flatten() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// After a filing through S3: the committed version, and the headers
    /// naming its evidence and receipt (waiting, like the evidence API, for
    /// the checkpoint that covers it).
    async fn filed(
        &self,
        bucket: &str,
        key: &str,
        filing: Filing,
    ) -> S3Result<(ObjectVersion, http::HeaderMap)> {
        let (header, written) = match filing {
            Filing::New {
                header, version, ..
            } => (header, version),
            Filing::Replayed(header) => (header, None),
            Filing::Part { .. } => return Err(internal(ApiError::Internal)),
        };
        // The version as committed: read back, a concurrent PUT or DELETE of
        // the key could already have replaced it (in an unversioned bucket),
        // and a committed write would answer an error (a client retrying a
        // Complete would file it twice).
        let v = match written {
            Some(v) => *v,
            None => {
                self.version(bucket, key, VersionRef::Id(header.evidence))
                    .await?
            }
        };
        let mut headers = self.custodia_headers(header.evidence);
        // Committed: a ledger that cannot build the receipt yet makes it
        // pending, never a failed write.
        let receipt = crate::ledger::wait_for_receipt(
            &self.gw,
            header.evidence,
            &[protocol::ledger::Kind::Filed],
        )
        .await
        .unwrap_or_else(|e| {
            tracing::warn!(evidence = %header.evidence, error = %e, "filed; its receipt could not be built yet");
            None
        });
        let receipt_value = match receipt {
            Some(r) => format!(
                "leaf={}; url=/v1/evidence/{}/receipt",
                r.leaf_index, header.evidence
            ),
            None => format!("pending; url=/v1/evidence/{}/receipt", header.evidence),
        };
        if let Ok(v) = http::HeaderValue::from_str(&receipt_value) {
            headers.insert("x-custodia-receipt", v);
        }
        Ok((v, headers))
    }

    /// The multipart upload `id`, if it is for this bucket, key and tenant.
    async fn multipart(
        &self,
        who: &Caller,
        bucket: &str,
        key: &str,
        id: &str,
    ) -> S3Result<(EvidenceId, ix::MultipartRecord)> {
        let upload: EvidenceId = id.parse().map_err(|_| s3_error!(NoSuchUpload))?;
        let rec = indexer::run(&self.gw.store, |tx| async move {
            ix::get_multipart_tx(&tx, upload).await
        })
        .await
        .map_err(|e| s3_err(e.into()))?
        .filter(|r| r.bucket == bucket && r.key == key && r.tenant == who.tenant)
        .ok_or_else(|| s3_error!(NoSuchUpload))?;
        Ok((upload, rec))
    }

    /// A Complete retried after its upload completed (the first answer
    /// lost on the way, or a retry that raced the first): the same answer,
    /// as S3 gives, if it names the same object and lists the same parts
    /// (`etags`, the listed parts' ETags in order); `None` otherwise.
    async fn completed_again(
        &self,
        tenant: &str,
        b: &BucketRecord,
        (bucket, key): (&str, &str),
        upload: EvidenceId,
        etags: Option<&[String]>,
    ) -> S3Result<Option<CompleteMultipartUploadOutput>> {
        let done = indexer::run(&self.gw.store, |tx| async move {
            ix::completed_upload_tx(&tx, upload).await
        })
        .await
        .map_err(|e| s3_err(e.into()))?
        .filter(|d| d.tenant == tenant && d.bucket == bucket && d.key == key);
        let (Some(done), Some(etags)) = (done, etags) else {
            return Ok(None);
        };
        if etags.is_empty() || multipart_etag(etags.iter().map(String::as_str)) != done.etag {
            return Ok(None);
        }
        tracing::info!(%upload, bucket = %done.bucket, key = %done.key, "a completed multipart upload's Complete again: the same answer");
        Ok(Some(CompleteMultipartUploadOutput {
            version_id: shown_version_id(b, done.null_version, done.version_id),
            location: Some(format!("/{}/{}", done.bucket, done.key)),
            e_tag: Some(ETag::Strong(done.etag)),
            bucket: Some(done.bucket),
            key: Some(done.key),
            ..Default::default()
        }))
    }

    fn custodia_headers(&self, evidence: EvidenceId) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        if let Ok(v) = http::HeaderValue::from_str(&evidence.to_string()) {
            h.insert("x-custodia-evidence-id", v);
        }
        h
    }
}

/// Most bytes of user metadata (`x-amz-meta-*` names and values) on one
/// object, as S3 allows.
const MAX_USER_METADATA: usize = 2048;

/// A retain-until date as ms, if it is after `now`: S3 refuses one in the
/// past ("The retain until date must be in the future!").
fn future_ms(until: Timestamp, now: u64) -> S3Result<u64> {
    let ms = ts_to_ms(until);
    if ms <= now {
        return Err(s3_error!(
            InvalidArgument,
            "The retain until date must be in the future!"
        ));
    }
    if ms > now.saturating_add(crate::api::MAX_RETENTION_AHEAD_MS) {
        return Err(s3_error!(
            InvalidArgument,
            "The retain until date must be at most 100 years from now (use a legal hold to keep an object indefinitely)"
        ));
    }
    Ok(ms)
}

/// The version record an upload will commit: lock settings from the
/// request or the bucket's default, checked against the bucket.
fn object_template(
    b: &BucketRecord,
    now: u64,
    (content_type, content): (Option<String>, ix::ContentHeaders),
    metadata: Option<Metadata>,
    lock_mode: Option<&ObjectLockMode>,
    retain_until: Option<Timestamp>,
    legal_hold: Option<&ObjectLockLegalHoldStatus>,
) -> S3Result<ObjectVersion> {
    let retention = match (lock_mode, retain_until) {
        (Some(m), Some(until)) => Some(Retention {
            mode: parse_lock_mode(m)?,
            until_ms: future_ms(until, now)?,
        }),
        (None, None) => b.default_retention.map(|d| Retention {
            mode: d.mode,
            until_ms: d.until_ms(now),
        }),
        _ => {
            return Err(s3_error!(
                InvalidArgument,
                "x-amz-object-lock-mode and x-amz-object-lock-retain-until-date go together"
            ))
        }
    };
    // Anything but ON or OFF is refused, as S3 does: a hold asked for as
    // "on" or "true" must not be stored as no hold at all.
    let legal_hold = match legal_hold.map(|s| s.as_str()) {
        None | Some(ObjectLockLegalHoldStatus::OFF) => false,
        Some(ObjectLockLegalHoldStatus::ON) => true,
        Some(other) => {
            return Err(s3_error!(
                InvalidArgument,
                "Legal Hold must be either of 'ON' or 'OFF', not {other:?}"
            ))
        }
    };
    if (retention.is_some() || legal_hold) && !b.object_lock {
        return Err(s3_error!(
            InvalidRequest,
            "the bucket was not created with Object Lock enabled"
        ));
    }
    let mut user_metadata: Vec<(String, String)> =
        metadata.unwrap_or_default().into_iter().collect();
    user_metadata.sort();
    // S3's limit (keys and values, UTF-8); it also keeps a version record
    // far inside the index's value limit.
    let meta_len: usize = user_metadata.iter().map(|(k, v)| k.len() + v.len()).sum();
    if meta_len > MAX_USER_METADATA {
        return Err(s3_error!(
            MetadataTooLarge,
            "user metadata is {meta_len} bytes; at most {MAX_USER_METADATA} are allowed"
        ));
    }
    // Each is answered as a header on every read: one no header can carry
    // (a browser form's field may hold any byte) would make the object
    // unreadable.
    for (what, value) in [
        ("Content-Type", content_type.as_deref()),
        ("Content-Encoding", content.encoding.as_deref()),
        ("Content-Disposition", content.disposition.as_deref()),
        ("Content-Language", content.language.as_deref()),
        ("Cache-Control", content.cache_control.as_deref()),
    ] {
        if value.is_some_and(|v| !header_safe(v)) {
            return Err(s3_error!(
                InvalidArgument,
                "{what} holds characters an HTTP header cannot carry"
            ));
        }
    }
    if let Some((k, _)) = user_metadata.iter().find(|(k, _)| !meta_key_safe(k)) {
        return Err(s3_error!(
            InvalidArgument,
            "the user metadata key {k:?} holds characters an HTTP header name cannot carry"
        ));
    }
    if content_type
        .as_ref()
        .is_some_and(|t| t.len() > MAX_USER_METADATA)
    {
        return Err(s3_error!(
            InvalidArgument,
            "Content-Type is longer than {MAX_USER_METADATA} bytes"
        ));
    }
    // Kept in the same record: bounded the same way.
    if content.len() > MAX_USER_METADATA {
        return Err(s3_error!(
            InvalidArgument,
            "Content-Encoding, -Disposition, -Language and Cache-Control together are longer than {MAX_USER_METADATA} bytes"
        ));
    }
    Ok(ObjectVersion {
        version_id: EvidenceId([0; 16]),
        null_version: b.versioning != Versioning::Enabled,
        evidence: None,
        size: 0,
        etag: String::new(),
        last_modified_ms: now,
        // S3's type for an object sent without one (boto3's put_object
        // sends none, and reads ContentType back).
        content_type: content_type.or_else(|| Some("binary/octet-stream".to_owned())),
        user_metadata,
        retention,
        legal_hold,
        content,
    })
}

/// The standard headers a write (PUT, CreateMultipartUpload, a copy with
/// `REPLACE`) gives the object: its type and [`ix::ContentHeaders`].
macro_rules! content_of {
    ($input:expr) => {
        (
            $input.content_type.clone(),
            ix::ContentHeaders {
                encoding: object_encoding($input.content_encoding.as_deref()),
                disposition: $input.content_disposition.clone(),
                language: $input.content_language.clone(),
                cache_control: $input.cache_control.clone(),
                expires_ms: $input.expires.clone().map(ts_to_ms),
            },
        )
    };
}

/// The object's Content-Encoding, from a request's: less `aws-chunked`,
/// which says how the request's body was framed (the AWS SDKs send it
/// with every checksum trailer, `gzip,aws-chunked` when the object is
/// gzipped), not how the object is: S3 drops it too. Kept, a GET would
/// say the object is framed so, and, being coded, lose its checksum.
fn object_encoding(encoding: Option<&str>) -> Option<String> {
    let encoding = encoding?;
    let chunked = |e: &str| e.trim().eq_ignore_ascii_case("aws-chunked");
    if !encoding.split(',').any(chunked) {
        return Some(encoding.to_owned());
    }
    let kept: Vec<&str> = encoding
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty() && !e.eq_ignore_ascii_case("aws-chunked"))
        .collect();
    (!kept.is_empty()).then(|| kept.join(","))
}

/// Whether `value` can be sent as an HTTP header's value.
fn header_safe(value: &str) -> bool {
    http::HeaderValue::from_str(value).is_ok()
}

/// Whether user metadata under `key` can be sent as an `x-amz-meta-*`
/// header. (Any value can: s3s sends one a header cannot carry
/// RFC 2047-encoded, as S3 does.)
fn meta_key_safe(key: &str) -> bool {
    http::HeaderName::from_bytes(format!("x-amz-meta-{key}").as_bytes()).is_ok()
}

/// An object's stored content headers and user metadata, less those no
/// header can carry (stored before such were refused): what a read
/// answers, and what a copy takes, rather than a failure.
fn sendable(v: &ObjectVersion) -> (Option<String>, ix::ContentHeaders, Vec<(String, String)>) {
    let keep = |v: &Option<String>| v.clone().filter(|v| header_safe(v));
    let c = &v.content;
    (
        keep(&v.content_type),
        ix::ContentHeaders {
            // Stored before `aws-chunked` was dropped on the way in.
            encoding: keep(&c.encoding).and_then(|e| object_encoding(Some(&e))),
            disposition: keep(&c.disposition),
            language: keep(&c.language),
            cache_control: keep(&c.cache_control),
            expires_ms: c.expires_ms,
        },
        v.user_metadata
            .iter()
            .filter(|(k, _)| meta_key_safe(k))
            .cloned()
            .collect(),
    )
}

/// The object's user metadata as a GET or HEAD answers it (see
/// [`sendable`]).
fn answered_metadata(v: &ObjectVersion) -> Option<Metadata> {
    let (_, _, metadata) = sendable(v);
    (!metadata.is_empty()).then(|| metadata.into_iter().collect())
}

/// The headers a GET or HEAD answers with: the object's, or those its
/// `response-*` parameters name instead (a presigned download link's
/// `response-content-disposition`, as S3 allows; s3s refuses one no
/// header can carry before we see it). A stored one no header can carry
/// (kept before such were refused) is left out.
macro_rules! answered_content {
    ($input:expr, $v:expr) => {{
        let (content_type, c, _) = sendable(&$v);
        (
            $input.response_content_type.clone().or(content_type),
            $input.response_content_encoding.clone().or(c.encoding),
            $input
                .response_content_disposition
                .clone()
                .or(c.disposition),
            $input.response_content_language.clone().or(c.language),
            $input.response_cache_control.clone().or(c.cache_control),
            $input
                .response_expires
                .clone()
                .or_else(|| c.expires_ms.map(ms_to_ts)),
        )
    }};
}

/// `x-amz-checksum-sha256` as a header: checked by the ingest's own SHA-256.
fn sha256_header(header: Option<&str>) -> S3Result<Option<protocol::Sha256Hash>> {
    use base64::Engine as _;
    header
        .map(|b64| {
            base64::engine::general_purpose::STANDARD
                .decode(b64.trim())
                .ok()
                .and_then(|v| <[u8; 32]>::try_from(v).ok())
                .map(protocol::Sha256Hash)
                .ok_or_else(|| {
                    s3_error!(
                        InvalidDigest,
                        "x-amz-checksum-sha256 is not a base64 SHA-256"
                    )
                })
        })
        .transpose()
}

/// The evidence-level WORM state an S3 version implies: COMPLIANCE
/// retention and legal holds bind the evidence itself, so an expunge order
/// cannot remove what Object Lock protects. (GOVERNANCE stays an S3 matter.)
fn evidence_worm(v: &ObjectVersion) -> (Option<u64>, bool) {
    let until = v
        .retention
        .filter(|r| r.mode == LockMode::Compliance)
        .map(|r| r.until_ms);
    (until, v.legal_hold)
}

/// The statement, for the ledger in the transaction that removes it, that
/// `actor` removed version `v` of `bucket/key` from S3 for good (deleted
/// by its id, the null version a DELETE replaced, or the null version a
/// PUT, copy or multipart completion replaced: then `by` is the new
/// version): its evidence stays, and the evidence API still reads it, but
/// no S3 name leads to it any more, and custody shows who did that. None
/// for a delete marker, or where no ledger runs. The caller queues it, at
/// a number of its own among the transaction's statements (see
/// `indexer::ledger::enqueue_tx`).
pub(crate) async fn unlinked_tx<S: Store>(
    gw: &Gateway<S>,
    tx: &<S as indexer::KvStore>::Tx,
    actor: String,
    (bucket, key): (&str, &str),
    v: &ObjectVersion,
    by: Option<EvidenceId>,
) -> Result<Option<indexer::ledger::PendingRecord>, ApiError> {
    let Some(evidence) = v.evidence else {
        return Ok(None);
    };
    let Some(h) = schema::get_manifest_tx(tx, evidence).await? else {
        return Ok(None);
    };
    let version = v.version_id.to_string();
    let detail = match by {
        None => serde_json::json!({
            "s3_version_deleted": { "bucket": bucket, "key": key, "version": version },
        }),
        Some(by) => serde_json::json!({
            "s3_version_replaced": {
                "bucket": bucket, "key": key, "version": version, "by": by.to_string(),
            },
        }),
    };
    crate::api::event_statement(gw, &h, protocol::ledger::Kind::Admin, actor, &detail)
}

/// At most how many bytes a request's body holds: its Content-Length,
/// where that frames it (no Transfer-Encoding), as s3s leaves it (the
/// decoded length of an aws-chunked body). Not for a form upload, whose
/// file s3s cuts out of the form and whose length it sets to 0; nor 0 at
/// all, which bounds nothing worth knowing.
fn body_len_at_most(method: &http::Method, headers: &http::HeaderMap) -> Option<u64> {
    if crate::s3_digest::is_form(method, headers)
        || headers.contains_key(http::header::TRANSFER_ENCODING)
    {
        return None;
    }
    let len: u64 = headers
        .get(http::header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()?;
    (len > 0).then_some(len)
}

fn content_md5(header: Option<&str>) -> S3Result<Option<[u8; 16]>> {
    use base64::Engine as _;
    header
        .map(|b64| {
            base64::engine::general_purpose::STANDARD
                .decode(b64.trim())
                .ok()
                .and_then(|v| <[u8; 16]>::try_from(v).ok())
                .ok_or_else(|| s3_error!(InvalidDigest, "Content-MD5 is not a base64 MD5"))
        })
        .transpose()
}

/// The checksums s3s read into a PutObject or UploadPart input (from its
/// headers, or a form upload's fields), in [`checked_body`]'s order.
macro_rules! declared_checksums {
    ($input:expr) => {
        [
            $input.checksum_crc32.clone(),
            $input.checksum_crc32c.clone(),
            $input.checksum_crc64nvme.clone(),
            $input.checksum_sha1.clone(),
        ]
    };
}

/// A request body as the ingest reads it.
type Body = std::pin::Pin<Box<dyn futures::Stream<Item = Result<bytes::Bytes, String>> + Send>>;

/// Verifies S3's additional checksums (CRC32, CRC32C, CRC64NVME, SHA-1,
/// SHA-256) of a body, whether sent as headers or as aws-chunked trailers
/// (announced by `x-amz-trailer`): returns the body wrapped to hash what
/// passes through, and the check to run when it has all passed.
fn checked_body(
    body: Option<StreamingBlob>,
    headers: &http::HeaderMap,
    trailers: Option<s3s::TrailingHeaders>,
    declared: [Option<String>; 4],
) -> S3Result<(Body, Option<ingest::BodyCheck>)> {
    use crate::s3_digest::CHECKSUMS as NAMES;
    let announced: Vec<String> = headers
        .get_all("x-amz-trailer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|v| v.trim().to_ascii_lowercase())
        .collect();
    let mut wanted = Vec::new();
    for (i, name) in NAMES.into_iter().enumerate() {
        // As a header, or as s3s read it into the input (a browser form
        // upload's fields arrive that way, not as headers).
        let header = headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .or_else(|| declared.get(i).cloned().flatten());
        let trailer = announced.iter().any(|a| a == name);
        // A SHA-256 header is checked by the ingest's own SHA-256.
        if name == "x-amz-checksum-sha256" && header.is_some() {
            continue;
        }
        if header.is_some() || trailer {
            wanted.push((name, header));
        }
    }
    if let Some(other) = announced.iter().find(|a| !NAMES.contains(&a.as_str())) {
        return Err(s3_error!(InvalidArgument, "unsupported trailer {other:?}"));
    }
    // Refused before the body is read, as S3 does, rather than found
    // unequal after all of it: a value that is no checksum of its kind,
    // or more than one checksum.
    for name in NAMES {
        if let Some(value) = headers.get(name) {
            crate::s3_digest::checked_checksum_header(name, value)
                .map_err(|r| s3_error!(InvalidRequest, "{}", r.message))?;
        }
    }
    let sent = NAMES
        .iter()
        .filter(|n| headers.contains_key(**n) || announced.iter().any(|a| a == *n))
        .count();
    if sent > 1 {
        return Err(s3_error!(
            InvalidRequest,
            "expecting a single x-amz-checksum- header or trailer; several checksum types are not allowed"
        ));
    }
    let body: Body = match body {
        None => Box::pin(futures::stream::empty()),
        Some(b) => Box::pin(b.map(|r| r.map_err(|e| e.to_string()))),
    };
    Ok(checking(body, wanted, trailers))
}

/// `body`, hashed as it passes for the `x-amz-checksum-*` checksums
/// `wanted` (each with the value sent as a header, else one of
/// `trailers`), and the check of them once it has all passed.
fn checking(
    body: Body,
    wanted: Vec<(&'static str, Option<String>)>,
    trailers: Option<s3s::TrailingHeaders>,
) -> (Body, Option<ingest::BodyCheck>) {
    if wanted.is_empty() {
        return (body, None);
    }
    let want = |n: &str| wanted.iter().any(|(w, _)| *w == n);
    let hasher = crate::s3_digest::checksum_hasher(want);
    let hasher = Arc::new(std::sync::Mutex::new(Some(hasher)));
    let feed = hasher.clone();
    let body = Box::pin(body.inspect(move |chunk| {
        if let (Ok(c), Ok(mut h)) = (chunk, feed.lock()) {
            if let Some(h) = h.as_mut() {
                h.update(c);
            }
        }
    }));
    let check = move || -> Result<(), ApiError> {
        let Some(h) = hasher.lock().ok().and_then(|mut h| h.take()) else {
            return Err(ApiError::Internal);
        };
        let got = h.finalize();
        let trailing = trailers.as_ref().and_then(|t| t.read(|h| h.clone()));
        for (name, header) in &wanted {
            let expected = header.clone().or_else(|| {
                trailing
                    .as_ref()
                    .and_then(|t| t.get(*name))
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            });
            let Some(expected) = expected else {
                return Err(ApiError::ChecksumMismatch(format!(
                    "{name} was announced as a trailer but not sent"
                )));
            };
            let actual = crate::s3_digest::checksum_value(&got, name);
            if actual.as_deref() != Some(expected.trim()) {
                return Err(ApiError::ChecksumMismatch(format!(
                    "{name} is {}, the client sent {expected}",
                    actual.unwrap_or_default()
                )));
            }
        }
        Ok(())
    };
    (body, Some(ingest::BodyCheck(Arc::new(check))))
}

/// What a CompleteMultipartUpload's `x-amz-checksum-*` headers ask of the
/// object it assembles from `parts`: the full-object checksums to compute
/// over the assembled bytes (CRC64NVME, which S3 keeps only whole, and any
/// CRC sent with `x-amz-checksum-type: FULL_OBJECT`), and a whole-object
/// SHA-256 (sent with FULL_OBJECT) for the ingest's own SHA-256 to match.
/// Any other value is composite (a checksum of the parts' checksums, `-N`
/// after it, or without it as minio-go sends one); with a count it must
/// name as many parts as are listed; a composite SHA-256 is
/// checked against the parts' SHA-256s, which are kept. (A composite CRC or
/// SHA-1 was checked part by part as each was uploaded; the parts' values
/// are not kept, so only its count is checked here.)
#[allow(clippy::type_complexity)]
fn completion_checksums(
    input: &CompleteMultipartUploadInput,
    parts: &[ix::PartRecord],
) -> S3Result<(
    Vec<(&'static str, Option<String>)>,
    Option<protocol::Sha256Hash>,
)> {
    use crate::s3_digest::CHECKSUMS as NAMES;
    use base64::Engine as _;
    let full_object = input
        .checksum_type
        .as_ref()
        .is_some_and(|t| t.as_str() == ChecksumType::FULL_OBJECT);
    let sent = [
        input.checksum_crc32.as_deref(),
        input.checksum_crc32c.as_deref(),
        input.checksum_crc64nvme.as_deref(),
        input.checksum_sha1.as_deref(),
        input.checksum_sha256.as_deref(),
    ];
    let mut wanted = Vec::new();
    let mut whole_sha256 = None;
    for (name, value) in NAMES.into_iter().zip(sent) {
        let Some(value) = value.map(str::trim) else {
            continue;
        };
        let (sum, count) = match value.rsplit_once('-') {
            Some((sum, n)) => {
                let n: usize = n.parse().map_err(|_| {
                    s3_error!(InvalidRequest, "{name}: {value:?} is not a checksum")
                })?;
                (sum, Some(n))
            }
            None => (value, None),
        };
        if count.is_some() && full_object {
            return Err(s3_error!(
                InvalidRequest,
                "{name}: a FULL_OBJECT checksum has no part count"
            ));
        }
        if count.is_some() && name == "x-amz-checksum-crc64nvme" {
            return Err(s3_error!(
                InvalidRequest,
                "{name} is always a FULL_OBJECT checksum: it has no part count"
            ));
        }
        if let Some(n) = count.filter(|n| *n != parts.len()) {
            return Err(s3_error!(
                InvalidRequest,
                "{name} is over {n} parts; {} are listed",
                parts.len()
            ));
        }
        // A value without a part count is the whole object's when the
        // request says FULL_OBJECT (or it is a CRC64NVME, never composite):
        // checked over the assembled bytes. Otherwise it may be a
        // composite one sent without its count, as minio-go sends every
        // multipart upload's CRC32C: a SHA-256 is checked as the composite
        // of the parts' SHA-256s; a composite CRC or SHA-1 (with or
        // without `-N`) is checked for its part count only, the parts' own
        // checksums of those kinds not being kept. (Nor is the type the
        // upload named at its creation: a Complete that leaves out
        // FULL_OBJECT has its CRC taken unchecked.)
        let whole = count.is_none() && (full_object || name == "x-amz-checksum-crc64nvme");
        match (whole, name) {
            (true, "x-amz-checksum-sha256") => whole_sha256 = sha256_header(Some(sum))?,
            (true, _) => wanted.push((name, Some(sum.to_owned()))),
            (false, "x-amz-checksum-sha256") => {
                let mut h = <sha2::Sha256 as sha2::Digest>::new();
                for p in parts {
                    sha2::Digest::update(&mut h, p.sha256);
                }
                let composite =
                    base64::engine::general_purpose::STANDARD.encode(sha2::Digest::finalize(h));
                if composite != sum {
                    return Err(s3_error!(
                        BadDigest,
                        "{name} is {composite}-{} over the listed parts, the client sent {value}",
                        parts.len()
                    ));
                }
            }
            (false, _) => {}
        }
    }
    Ok((wanted, whole_sha256))
}

/// A read's `If-Match` / `If-None-Match` against the version's ETag.
/// A read's (or a copy source's) conditional headers.
#[derive(Clone, Copy, Default)]
struct Conditions<'a> {
    if_match: Option<&'a ETagCondition>,
    if_none_match: Option<&'a ETagCondition>,
    if_modified_since: Option<&'a Timestamp>,
    if_unmodified_since: Option<&'a Timestamp>,
}

/// A GetObject's or HeadObject's conditions (the same fields in both).
macro_rules! conditions {
    ($input:expr) => {
        Conditions {
            if_match: $input.if_match.as_ref(),
            if_none_match: $input.if_none_match.as_ref(),
            if_modified_since: $input.if_modified_since.as_ref(),
            if_unmodified_since: $input.if_unmodified_since.as_ref(),
        }
    };
}

/// A CopyObject's or UploadPartCopy's conditions on its source.
macro_rules! copy_source_conditions {
    ($input:expr) => {
        Conditions {
            if_match: $input.copy_source_if_match.as_ref(),
            if_none_match: $input.copy_source_if_none_match.as_ref(),
            if_modified_since: $input.copy_source_if_modified_since.as_ref(),
            if_unmodified_since: $input.copy_source_if_unmodified_since.as_ref(),
        }
    };
}

/// Why a condition failed: 412, or 304 for a read whose copy is current.
#[derive(Debug, PartialEq, Eq)]
enum Unmet {
    Precondition,
    NotModified,
}

/// RFC 9110's order, as S3 applies it: If-Match, else If-Unmodified-Since;
/// then If-None-Match, else If-Modified-Since (dates to the second, as
/// Last-Modified is sent).
fn unmet(v: &ObjectVersion, c: Conditions<'_>) -> Option<Unmet> {
    let modified = v.last_modified_ms / 1000;
    let secs = |t: &Timestamp| ts_to_ms(t.clone()) / 1000;
    match (c.if_match, c.if_unmodified_since) {
        (Some(m), _) if !etag_matches(m, &v.etag, true) => return Some(Unmet::Precondition),
        (None, Some(t)) if modified > secs(t) => return Some(Unmet::Precondition),
        _ => {}
    }
    match (c.if_none_match, c.if_modified_since) {
        (Some(n), _) if etag_matches(n, &v.etag, false) => Some(Unmet::NotModified),
        (None, Some(t)) if modified <= secs(t) => Some(Unmet::NotModified),
        _ => None,
    }
}

/// The retention a version is shown with: its own, or its evidence's
/// COMPLIANCE retention (set through the evidence API, or extended there)
/// where that ends later, or binds harder while it lasts (over GOVERNANCE,
/// which a bypass would otherwise seem to pass) by the compliance clock
/// `now_ms`. A deletion is refused by either, so what S3 clients read is
/// what holds, as in S3, where there is only one.
fn shown_retention(
    v: &ObjectVersion,
    h: &protocol::ManifestHeader,
    now_ms: u64,
) -> Option<Retention> {
    match (v.retention, h.retain_until_ms) {
        (Some(r), Some(until))
            if until > r.until_ms || (r.mode == LockMode::Governance && until > now_ms) =>
        {
            Some(Retention {
                mode: LockMode::Compliance,
                until_ms: until,
            })
        }
        (None, Some(until)) => Some(Retention {
            mode: LockMode::Compliance,
            until_ms: until,
        }),
        (r, _) => r,
    }
}

/// A GET or HEAD by `partNumber`. A multipart object is filed anew, whole,
/// and its parts are not kept apart, so every object reads as one part:
/// part 1 is the object (answered without `x-amz-mp-parts-count`, which
/// part-wise downloaders read as "one part"), any other is one it does not
/// have, refused as S3 refuses those.
fn whole_part(part_number: Option<i32>, ranged: bool) -> S3Result<()> {
    let Some(n) = part_number else {
        return Ok(());
    };
    if ranged {
        return Err(s3_error!(
            InvalidRequest,
            "Cannot specify both Range header and partNumber query parameter"
        ));
    }
    if n < 1 {
        return Err(s3_error!(
            InvalidArgument,
            "Part number must be an integer between 1 and 10000, inclusive"
        ));
    }
    if n != 1 {
        let mut e = s3_error!(
            InvalidArgument,
            "The requested partnumber is not satisfiable"
        );
        e.set_code(S3ErrorCode::Custom("InvalidPartNumber".into()));
        e.set_status_code(http::StatusCode::RANGE_NOT_SATISFIABLE);
        return Err(e);
    }
    Ok(())
}

fn preconditions(v: &ObjectVersion, c: Conditions<'_>) -> S3Result<()> {
    match unmet(v, c) {
        None => Ok(()),
        Some(Unmet::Precondition) => Err(s3_error!(PreconditionFailed)),
        // A 304 carries the validators (RFC 9110 15.4.5), so a cache can
        // refresh what it holds.
        Some(Unmet::NotModified) => {
            let mut e = S3Error::new(S3ErrorCode::NotModified);
            with_headers(
                &mut e,
                &[
                    ("etag", format!("\"{}\"", v.etag)),
                    ("last-modified", http_date(v.last_modified_ms)),
                ],
            );
            Err(e)
        }
    }
}

/// Sets headers on an error answer. s3s replaces the answer's headers with
/// the error's, so its XML Content-Type goes with them.
fn with_headers(e: &mut S3Error, headers: &[(&'static str, String)]) {
    let mut map = http::HeaderMap::new();
    map.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/xml"),
    );
    for (name, value) in headers {
        if let Ok(v) = http::HeaderValue::from_str(value) {
            map.insert(*name, v);
        }
    }
    e.set_headers(map);
}

/// `x-amz-checksum-sha256` of a GET or HEAD that asks for checksums
/// (`x-amz-checksum-mode: ENABLED`, which the AWS SDKs send to validate
/// what they read): the whole object's SHA-256, known for all evidence
/// however it was uploaded, so a FULL_OBJECT checksum; none for a range,
/// as S3 sends none, nor under a Content-Encoding (a browser's fetch
/// decodes the body before an SDK could check it).
fn whole_object_checksum(
    mode: Option<&ChecksumMode>,
    range: &Option<std::ops::Range<u64>>,
    encoding: Option<&str>,
    sha256: &protocol::Sha256Hash,
) -> Option<String> {
    use base64::Engine as _;
    let asked = mode.is_some_and(|m| m.as_str() == ChecksumMode::ENABLED);
    let coded = encoding.is_some_and(|e| !e.trim().eq_ignore_ascii_case("identity"));
    (asked && range.is_none() && !coded)
        .then(|| base64::engine::general_purpose::STANDARD.encode(sha256.0))
}

fn full_object() -> ChecksumType {
    ChecksumType::from_static(ChecksumType::FULL_OBJECT)
}

/// Whether a Range applies under the request's `If-Range` (RFC 9110
/// 13.1.5): with none, yes; with an entity-tag, only if it is the object's
/// strong ETag; with a date, only if it is the object's Last-Modified, to
/// the second. Otherwise the whole current object is sent (200): a client
/// resuming a download of an object since overwritten must not get the
/// rest of the new one spliced onto the start of the old.
fn if_range_holds(headers: &http::HeaderMap, v: &ObjectVersion) -> bool {
    let Some(value) = headers.get(http::header::IF_RANGE) else {
        return true;
    };
    let Ok(value) = value.to_str() else {
        return false;
    };
    let value = value.trim();
    // A weak tag never matches (strong comparison); nor does a date: a key
    // written twice within one second has one Last-Modified for both
    // (RFC 9110 8.8.2.2), and sending the whole object is always right.
    value.strip_prefix('"').and_then(|t| t.strip_suffix('"')) == Some(&v.etag)
}

/// An HTTP date (IMF-fixdate) of ms since the epoch.
pub(crate) fn http_date(ms: u64) -> String {
    httpdate::fmt_http_date(std::time::UNIX_EPOCH + Duration::from_millis(ms))
}

/// A PUT's `If-Match` / `If-None-Match` as a check of the key's current
/// version (`None`: no object, or a delete marker), run before the upload and
/// again in the transaction that commits it ([`ingest::S3Put::condition`]).
fn put_condition(
    if_match: Option<ETagCondition>,
    if_none_match: Option<ETagCondition>,
) -> Option<ingest::PutCondition> {
    if if_match.is_none() && if_none_match.is_none() {
        return None;
    }
    Some(ingest::PutCondition(Arc::new(
        move |current: Option<&ix::ObjectVersion>| {
            if let (Some(c), Some(v)) = (&if_none_match, current) {
                if etag_matches(c, &v.etag, false) {
                    return Err(ObjectError::PreconditionFailed(
                        "the object exists (If-None-Match)".into(),
                    ));
                }
            }
            if let Some(c) = &if_match {
                // No object to match: S3 answers 404 NoSuchKey, not 412 (a
                // client's compare-and-swap loop tells the two apart).
                let Some(v) = current else {
                    return Err(ObjectError::NoSuchKey);
                };
                if !etag_matches(c, &v.etag, true) {
                    return Err(ObjectError::PreconditionFailed(
                        "If-Match does not match the current object".into(),
                    ));
                }
            }
            Ok(())
        },
    )))
}

/// Whether `cond` (an `If-Match` or `If-None-Match`) names `etag`. s3s
/// reads the header as one entity-tag, so a list (`"a", W/"b"`, as a cache
/// revalidating several copies sends) arrives as one odd value: it is
/// split again and each member compared, a weak one never under `strong`
/// comparison (If-Match's; If-None-Match's is weak), as RFC 9110 §13.1.1-2
/// have it.
fn etag_matches(cond: &ETagCondition, etag: &str, strong: bool) -> bool {
    let raw = match cond {
        ETagCondition::Any => return true,
        ETagCondition::ETag(ETag::Strong(v)) => format!("\"{v}\""),
        ETagCondition::ETag(ETag::Weak(v)) => format!("W/\"{v}\""),
    };
    raw.split(',').map(str::trim).any(|item| {
        let (weak, tag) = match item.strip_prefix("W/") {
            Some(tag) => (true, tag),
            None => (false, item),
        };
        let tag = tag
            .strip_prefix('"')
            .and_then(|t| t.strip_suffix('"'))
            .unwrap_or(tag);
        item == "*" || (tag == etag && !(weak && strong))
    })
}

#[async_trait::async_trait]
impl<S: Store + 'static> S3 for S3Front<S> {
    async fn list_buckets(
        &self,
        req: S3Request<ListBucketsInput>,
    ) -> S3Result<S3Response<ListBucketsOutput>> {
        let who = self.caller(&req, Role::Reader).await?;
        let tenant = who.tenant.clone();
        let input = req.input;
        // 1 to 10,000 a page, as S3 (which lists every bucket without it).
        let max = match input.max_buckets {
            None => usize::MAX,
            Some(n) if (1..=10_000).contains(&n) => n as usize,
            Some(n) => {
                return Err(s3_error!(
                    InvalidArgument,
                    "max-buckets is {n}; it must be 1 to 10000"
                ))
            }
        };
        let buckets = indexer::run(&self.gw.store, |tx| {
            let tenant = &tenant;
            async move { ix::list_buckets_tx(&tx, tenant).await }
        })
        .await
        .map_err(|e| s3_err(e.into()))?;
        // A tenant's buckets are few (S3 allows 10,000): paged here, by
        // name, the continuation token the last name of the page before.
        let prefix = input.prefix.clone().unwrap_or_default();
        let mut buckets: Vec<_> = buckets
            .into_iter()
            .filter(|(name, _)| name.starts_with(&prefix))
            .filter(|(name, _)| {
                input
                    .continuation_token
                    .as_deref()
                    .is_none_or(|after| name.as_str() > after)
            })
            .collect();
        buckets.sort_by(|a, b| a.0.cmp(&b.0));
        let more = buckets.len() > max;
        buckets.truncate(max);
        let continuation_token = more
            .then(|| buckets.last().map(|(n, _)| n.clone()))
            .flatten();
        Ok(S3Response::new(ListBucketsOutput {
            prefix: input.prefix,
            continuation_token,
            buckets: Some(
                buckets
                    .into_iter()
                    .map(|(name, b)| Bucket {
                        name: Some(name),
                        creation_date: Some(ms_to_ts(b.created_ms)),
                        ..Default::default()
                    })
                    .collect(),
            ),
            owner: Some(Owner {
                display_name: Some(who.tenant.clone()),
                id: Some(who.tenant),
            }),
        }))
    }

    async fn create_bucket(
        &self,
        req: S3Request<CreateBucketInput>,
    ) -> S3Result<S3Response<CreateBucketOutput>> {
        let who = self.caller(&req, Role::Clerk).await?;
        let lock = req.input.object_lock_enabled_for_bucket.unwrap_or(false);
        let rec = BucketRecord {
            tenant: who.tenant,
            created_ms: self.gw.clock.now_ms(),
            // Object Lock needs versioning, as in S3.
            versioning: if lock {
                Versioning::Enabled
            } else {
                Versioning::Unversioned
            },
            object_lock: lock,
            default_retention: None,
        };
        let name = req.input.bucket.clone();
        let created = indexer::run(&self.gw.store, |tx| {
            let (name, rec) = (&name, &rec);
            async move { ix::create_bucket_tx(&tx, name, rec).await }
        })
        .await;
        match created {
            Ok(()) => {}
            // As S3 in us-east-1 (the region this API presents): creating
            // a bucket you already own succeeds, so an idempotent set-up
            // script runs again. Not when it asks for another Object Lock
            // setting than the bucket has: a 200 would let the script
            // believe a bucket without WORM has it.
            Err(ObjectError::BucketExists { mine: true }) => {
                let owned = indexer::run(&self.gw.store, |tx| {
                    let name = &name;
                    async move { ix::get_bucket_tx(&tx, name).await }
                })
                .await
                .map_err(|e| s3_err(e.into()))?;
                if owned.is_none_or(|b| lock && !b.object_lock) {
                    return Err(s3_error!(
                        BucketAlreadyOwnedByYou,
                        "you own this bucket already, without Object Lock"
                    ));
                }
                tracing::info!(bucket = %name, tenant = %rec.tenant, "bucket created again by its owner: nothing changed");
                return Ok(S3Response::new(CreateBucketOutput {
                    location: Some(format!("/{name}")),
                }));
            }
            Err(e) => return Err(s3_err(e.into())),
        }
        tracing::info!(bucket = %name, tenant = %rec.tenant, object_lock = lock, "bucket created");
        Ok(S3Response::new(CreateBucketOutput {
            location: Some(format!("/{name}")),
        }))
    }

    async fn head_bucket(
        &self,
        req: S3Request<HeadBucketInput>,
    ) -> S3Result<S3Response<HeadBucketOutput>> {
        let who = self.caller(&req, Role::Reader).await?;
        self.bucket(&who, &req.input.bucket).await?;
        Ok(S3Response::new(HeadBucketOutput::default()))
    }

    async fn get_bucket_location(
        &self,
        req: S3Request<GetBucketLocationInput>,
    ) -> S3Result<S3Response<GetBucketLocationOutput>> {
        let who = self.caller(&req, Role::Reader).await?;
        self.bucket(&who, &req.input.bucket).await?;
        // us-east-1 is written as no constraint.
        Ok(S3Response::new(GetBucketLocationOutput::default()))
    }

    async fn delete_bucket(
        &self,
        req: S3Request<DeleteBucketInput>,
    ) -> S3Result<S3Response<DeleteBucketOutput>> {
        let who = self.caller(&req, Role::Clerk).await?;
        let seen = self.bucket(&who, &req.input.bucket).await?;
        let name = req.input.bucket.clone();
        // Its multipart uploads in progress go with it (as in S3), one per
        // transaction (each may have 10,000 parts).
        while let Some(parts) = indexer::run(&self.gw.store, |tx| {
            let (name, seen) = (&name, &seen);
            async move { ix::end_an_upload_of_bucket_tx(&tx, name, seen).await }
        })
        .await
        .map_err(|e| s3_err(e.into()))?
        {
            delete_parts_later(&self.gw, parts);
        }
        let parts = indexer::run(&self.gw.store, |tx| {
            let (name, seen) = (&name, &seen);
            async move { ix::delete_bucket_tx(&tx, name, seen).await }
        })
        .await
        .map_err(|e| s3_err(e.into()))?;
        delete_parts_later(&self.gw, parts);
        Ok(S3Response::new(DeleteBucketOutput::default()))
    }

    async fn put_object(
        &self,
        req: S3Request<PutObjectInput>,
    ) -> S3Result<S3Response<PutObjectOutput>> {
        let who = self.caller(&req, Role::Clerk).await?;
        let mut input = req.input;
        let b = self.bucket(&who, &input.bucket).await?;
        if !ix::valid_key(&input.key) {
            return Err(s3_error!(
                InvalidArgument,
                "object keys are 1 to 1024 bytes of UTF-8 without NUL"
            ));
        }
        refuse_tags(input.tagging.as_deref())?;
        let now = self.gw.clock.now_ms();
        // Conditional writes: checked before the upload (a 412 costs no
        // upload) and again in the transaction that makes the new version
        // current, as S3 does: of two writers racing on a condition, the
        // second to complete gets 412 and files nothing.
        let condition = put_condition(input.if_match.take(), input.if_none_match.take());
        self.precheck(&input.bucket, &input.key, condition.as_ref())
            .await?;
        let template = object_template(
            &b,
            now,
            content_of!(input),
            input.metadata.take(),
            input.object_lock_mode.as_ref(),
            input.object_lock_retain_until_date.clone(),
            input.object_lock_legal_hold_status.as_ref(),
        )?;
        let expect_md5 = content_md5(input.content_md5.as_deref())?;
        let expect_sha256 = sha256_header(input.checksum_sha256.as_deref())?;
        let (body, body_check) = checked_body(
            input.body.take(),
            &req.headers,
            req.trailing_headers,
            declared_checksums!(input),
        )?;
        let (retain_until_ms, legal_hold) = evidence_worm(&template);
        let meta = FilingMeta {
            tenant: who.tenant.clone(),
            credential: Some(ix::access_key_ref(&who.access_key)),
            case: None,
            retain_until_ms,
            legal_hold,
            file_name: Some(input.key.clone()),
            media_type: input.content_type.clone(),
            submitter: Some(format!("{}/s3:{}", who.tenant, who.access_key)),
            actor: Some(who.actor()),
            expect_sha256,
            expect_md5,
            body_check,
            s3: Some(S3Put {
                bucket: input.bucket.clone(),
                key: input.key.clone(),
                version: template,
                etag: None,
                condition,
                seen: b.clone(),
                completes: None,
            }),
            body_len_at_most: body_len_at_most(&req.method, &req.headers),
            body_len_exact: true,
            ..Default::default()
        };
        // The upload runs in its own task, so a client that goes away leaves
        // a clean abort behind rather than a half-dropped future.
        let gw = self.gw.clone();
        let filing = tokio::spawn(ingest::file_evidence(gw, meta, body))
            .await
            .map_err(|_| internal(ApiError::Internal))?
            .map_err(s3_err)?;
        let (v, headers) = self.filed(&input.bucket, &input.key, filing).await?;
        let mut resp = S3Response::new(PutObjectOutput {
            e_tag: Some(ETag::Strong(v.etag.clone())),
            version_id: show_version(&b, &v),
            size: Some(v.size as i64),
            ..Default::default()
        });
        resp.headers = headers;
        Ok(resp)
    }

    async fn get_object(
        &self,
        req: S3Request<GetObjectInput>,
    ) -> S3Result<S3Response<GetObjectOutput>> {
        let who = self.caller(&req, Role::Reader).await?;
        let input = &req.input;
        let b = self.bucket(&who, &input.bucket).await?;
        let (v, header) = self
            .readable(&who, &input.bucket, &input.key, input.version_id.as_deref())
            .await?;
        // The evidence's hold is the object's (see `removal_refused`).
        let held = header.legal_hold;
        let retention = shown_retention(&v, &header, self.gw.clock.compliance_ms());
        preconditions(&v, conditions!(input))?;
        whole_part(input.part_number, input.range.is_some())?;
        let size = header.size;
        let asked = input
            .range
            .as_ref()
            .filter(|_| if_range_holds(&req.headers, &v));
        let range = object_range(asked, size)?;
        let read = range.clone().unwrap_or(0..size);
        let actor = who.actor();
        let evidence = header.evidence;
        let sha256 = header.sha256;
        let body = match crate::api::recorded_read(&self.gw, header, actor, read.clone())
            .await
            .map_err(s3_err)?
        {
            crate::api::ReadBody::Verified(bytes) => StreamingBlob::from(s3s::Body::from(bytes)),
            crate::api::ReadBody::Streamed(stream) => StreamingBlob::wrap(stream),
        };
        let (
            content_type,
            content_encoding,
            content_disposition,
            content_language,
            cache_control,
            expires,
        ) = answered_content!(input, v);
        let checksum = whole_object_checksum(
            input.checksum_mode.as_ref(),
            &range,
            content_encoding.as_deref(),
            &sha256,
        );
        let mut resp = S3Response::new(GetObjectOutput {
            body: Some(body),
            content_length: Some((read.end - read.start) as i64),
            content_range: content_range(range.as_ref(), size),
            accept_ranges: Some("bytes".into()),
            content_type,
            content_encoding,
            content_disposition,
            content_language,
            cache_control,
            expires,
            e_tag: Some(ETag::Strong(v.etag.clone())),
            last_modified: Some(ms_to_ts(v.last_modified_ms)),
            metadata: answered_metadata(&v),
            version_id: show_version(&b, &v),
            object_lock_mode: retention.map(|r| lock_mode(r.mode)),
            object_lock_retain_until_date: retention.map(|r| ms_to_ts(r.until_ms)),
            object_lock_legal_hold_status: legal_hold_status(&b, held),
            checksum_type: checksum.as_ref().map(|_| full_object()),
            checksum_sha256: checksum,
            ..Default::default()
        });
        // s3s answers 206 for a Content-Range (the status set here it does
        // not read).
        resp.headers = self.custodia_headers(evidence);
        Ok(resp)
    }

    async fn head_object(
        &self,
        req: S3Request<HeadObjectInput>,
    ) -> S3Result<S3Response<HeadObjectOutput>> {
        let who = self.caller(&req, Role::Reader).await?;
        let input = &req.input;
        let b = self.bucket(&who, &input.bucket).await?;
        let (v, header) = self
            .readable(&who, &input.bucket, &input.key, input.version_id.as_deref())
            .await?;
        // The evidence's hold is the object's (see `removal_refused`).
        let held = header.legal_hold;
        let retention = shown_retention(&v, &header, self.gw.clock.compliance_ms());
        preconditions(&v, conditions!(input))?;
        whole_part(input.part_number, input.range.is_some())?;
        // A ranged HEAD answers as the GET would: 206 with the range's
        // length and Content-Range, or 416 (as S3 does).
        let size = header.size;
        let asked = input
            .range
            .as_ref()
            .filter(|_| if_range_holds(&req.headers, &v));
        let range = object_range(asked, size)?;
        let sha256 = header.sha256;
        let (
            content_type,
            content_encoding,
            content_disposition,
            content_language,
            cache_control,
            expires,
        ) = answered_content!(input, v);
        let checksum = whole_object_checksum(
            input.checksum_mode.as_ref(),
            &range,
            content_encoding.as_deref(),
            &sha256,
        );
        let mut resp = S3Response::new(HeadObjectOutput {
            content_length: Some(range.as_ref().map_or(size, |r| r.end - r.start) as i64),
            content_range: content_range(range.as_ref(), size),
            accept_ranges: Some("bytes".into()),
            content_type,
            content_encoding,
            content_disposition,
            content_language,
            cache_control,
            expires,
            e_tag: Some(ETag::Strong(v.etag.clone())),
            last_modified: Some(ms_to_ts(v.last_modified_ms)),
            metadata: answered_metadata(&v),
            version_id: show_version(&b, &v),
            object_lock_mode: retention.map(|r| lock_mode(r.mode)),
            object_lock_retain_until_date: retention.map(|r| ms_to_ts(r.until_ms)),
            object_lock_legal_hold_status: legal_hold_status(&b, held),
            checksum_type: checksum.as_ref().map(|_| full_object()),
            checksum_sha256: checksum,
            ..Default::default()
        });
        // Its 206 is set around s3s, which answers every HEAD 200.
        resp.headers = self.custodia_headers(header.evidence);
        Ok(resp)
    }

    async fn delete_object(
        &self,
        req: S3Request<DeleteObjectInput>,
    ) -> S3Result<S3Response<DeleteObjectOutput>> {
        let who = self.caller(&req, Role::Clerk).await?;
        let input = &req.input;
        let b = self.bucket(&who, &input.bucket).await?;
        let bypass = input.bypass_governance_retention == Some(true);
        let (delete_marker, version_id) = self
            .delete_one(
                &who,
                &b,
                &input.bucket,
                &input.key,
                input.version_id.as_deref(),
                input.if_match.as_ref(),
                bypass,
            )
            .await?;
        Ok(S3Response::new(DeleteObjectOutput {
            delete_marker,
            version_id,
            ..Default::default()
        }))
    }

    async fn delete_objects(
        &self,
        req: S3Request<DeleteObjectsInput>,
    ) -> S3Result<S3Response<DeleteObjectsOutput>> {
        let who = self.caller(&req, Role::Clerk).await?;
        let input = req.input;
        let b = self.bucket(&who, &input.bucket).await?;
        if input.delete.objects.len() > 1000 {
            return Err(s3_error!(MalformedXML, "at most 1000 keys per request"));
        }
        let bypass = input.bypass_governance_retention == Some(true);
        let quiet = input.delete.quiet == Some(true);
        let mut deleted = Vec::new();
        let mut errors = Vec::new();
        for o in &input.delete.objects {
            let if_match = o.e_tag.clone().map(ETagCondition::ETag);
            match self
                .delete_one(
                    &who,
                    &b,
                    &input.bucket,
                    &o.key,
                    o.version_id.as_deref(),
                    if_match.as_ref(),
                    bypass,
                )
                .await
            {
                Ok((marker, vid)) if !quiet => deleted.push(DeletedObject {
                    key: Some(o.key.clone()),
                    version_id: o.version_id.clone(),
                    delete_marker: marker,
                    delete_marker_version_id: marker.and(vid),
                }),
                Ok(_) => {}
                Err(e) => errors.push(Error {
                    key: Some(o.key.clone()),
                    version_id: o.version_id.clone(),
                    code: Some(e.code().as_str().to_owned()),
                    message: e.message().map(str::to_owned),
                }),
            }
        }
        Ok(S3Response::new(DeleteObjectsOutput {
            deleted: Some(deleted),
            errors: Some(errors),
            ..Default::default()
        }))
    }

    async fn copy_object(
        &self,
        req: S3Request<CopyObjectInput>,
    ) -> S3Result<S3Response<CopyObjectOutput>> {
        let who = self.caller(&req, Role::Clerk).await?;
        let mut input = req.input;
        let b = self.bucket(&who, &input.bucket).await?;
        // The source's tags (none) are copied unless others replace them.
        if input
            .tagging_directive
            .as_ref()
            .is_some_and(|d| d.as_str() == TaggingDirective::REPLACE)
        {
            refuse_tags(input.tagging.as_deref())?;
        }
        // An object copied onto itself changing nothing is refused, as by
        // S3 (here it would file the same bytes again as new evidence).
        if let CopySource::Bucket {
            bucket,
            key,
            version_id: None,
        } = &input.copy_source
        {
            let unchanged = input
                .metadata_directive
                .as_ref()
                .is_none_or(|d| d.as_str() != MetadataDirective::REPLACE)
                && input.object_lock_mode.is_none()
                && input.object_lock_retain_until_date.is_none()
                && input.object_lock_legal_hold_status.is_none();
            if **bucket == *input.bucket && **key == *input.key && unchanged {
                return Err(s3_error!(
                    InvalidRequest,
                    "This copy request is illegal because it is trying to copy an object to \
                     itself without changing the object's metadata, storage class, website \
                     redirect location or encryption attributes."
                ));
            }
        }
        // The copy is a read of the source (on the ledger) and a new filing
        // of the same bytes.
        let (src, header, src_version) = self
            .copy_source(&who, &input.copy_source, copy_source_conditions!(input))
            .await?;
        let replace = input
            .metadata_directive
            .as_ref()
            .is_some_and(|d| d.as_str() == MetadataDirective::REPLACE);
        let now = self.gw.clock.now_ms();
        // S3 copies the source's headers with its metadata, or replaces
        // both with the request's.
        let (content, metadata) = if replace {
            (content_of!(input), input.metadata.take())
        } else {
            let (content_type, content, metadata) = sendable(&src);
            (
                (content_type, content),
                Some(metadata.into_iter().collect()),
            )
        };
        let template = object_template(
            &b,
            now,
            content,
            metadata,
            input.object_lock_mode.as_ref(),
            input.object_lock_retain_until_date.clone(),
            input.object_lock_legal_hold_status.as_ref(),
        )?;
        let actor = who.actor();
        let size = header.size;
        // The read of the source is recorded with the copy, in its commit.
        let source_read =
            crate::api::access_statement(&self.gw, &header, actor.clone(), &(0..size))
                .map_err(s3_err)?;
        let (retain_until_ms, legal_hold) = evidence_worm(&template);
        let meta = FilingMeta {
            tenant: who.tenant.clone(),
            credential: Some(ix::access_key_ref(&who.access_key)),
            retain_until_ms,
            legal_hold,
            file_name: Some(input.key.clone()),
            media_type: template.content_type.clone(),
            // As a PUT and a completed upload name their submitter (the
            // `filed` statement's actor names the role too).
            submitter: Some(format!("{}/s3:{}", who.tenant, who.access_key)),
            actor: Some(actor),
            expect_blake3: Some(header.blake3),
            s3: Some(S3Put {
                bucket: input.bucket.clone(),
                key: input.key.clone(),
                version: template,
                etag: None,
                condition: None,
                seen: b.clone(),
                completes: None,
            }),
            body_from_store: true,
            copied_from: vec![header.evidence],
            source_read,
            body_len_at_most: Some(size),
            ..Default::default()
        };
        let body = crate::read::stream_range(self.gw.clone(), header, 0..size, None);
        let (body, _left) = while_client_here(Box::pin(body));
        let filing = tokio::spawn(ingest::file_evidence(self.gw.clone(), meta, Box::pin(body)))
            .await
            .map_err(|_| internal(ApiError::Internal))?
            .map_err(s3_err)?;
        let (v, headers) = self.filed(&input.bucket, &input.key, filing).await?;
        let mut resp = S3Response::new(CopyObjectOutput {
            copy_object_result: Some(CopyObjectResult {
                e_tag: Some(ETag::Strong(v.etag.clone())),
                last_modified: Some(ms_to_ts(v.last_modified_ms)),
                ..Default::default()
            }),
            version_id: show_version(&b, &v),
            copy_source_version_id: src_version,
            ..Default::default()
        });
        resp.headers = headers;
        Ok(resp)
    }

    async fn get_bucket_versioning(
        &self,
        req: S3Request<GetBucketVersioningInput>,
    ) -> S3Result<S3Response<GetBucketVersioningOutput>> {
        let who = self.caller(&req, Role::Reader).await?;
        let b = self.bucket(&who, &req.input.bucket).await?;
        let status = match b.versioning {
            Versioning::Unversioned => None,
            Versioning::Enabled => Some(BucketVersioningStatus::ENABLED),
            Versioning::Suspended => Some(BucketVersioningStatus::SUSPENDED),
        };
        Ok(S3Response::new(GetBucketVersioningOutput {
            status: status.map(BucketVersioningStatus::from_static),
            ..Default::default()
        }))
    }

    async fn put_bucket_versioning(
        &self,
        req: S3Request<PutBucketVersioningInput>,
    ) -> S3Result<S3Response<PutBucketVersioningOutput>> {
        let who = self.caller(&req, Role::Clerk).await?;
        let seen = self.bucket(&who, &req.input.bucket).await?;
        let to = match req
            .input
            .versioning_configuration
            .status
            .as_ref()
            .map(|s| s.as_str())
        {
            Some(BucketVersioningStatus::ENABLED) => Versioning::Enabled,
            Some(BucketVersioningStatus::SUSPENDED) => Versioning::Suspended,
            _ => {
                return Err(s3_error!(
                    MalformedXML,
                    "Status must be Enabled or Suspended"
                ))
            }
        };
        self.update_bucket(&req.input.bucket, &seen, |b| {
            if b.object_lock && to != Versioning::Enabled {
                return Err(s3_error!(
                    InvalidBucketState,
                    "versioning cannot be suspended on a bucket with Object Lock"
                ));
            }
            b.versioning = to;
            Ok(())
        })
        .await?;
        Ok(S3Response::new(PutBucketVersioningOutput::default()))
    }

    async fn get_object_lock_configuration(
        &self,
        req: S3Request<GetObjectLockConfigurationInput>,
    ) -> S3Result<S3Response<GetObjectLockConfigurationOutput>> {
        let who = self.caller(&req, Role::Reader).await?;
        let b = self.bucket(&who, &req.input.bucket).await?;
        if !b.object_lock {
            return Err(s3_error!(
                ObjectLockConfigurationNotFoundError,
                "Object Lock is not enabled on this bucket"
            ));
        }
        Ok(S3Response::new(GetObjectLockConfigurationOutput {
            object_lock_configuration: Some(ObjectLockConfiguration {
                object_lock_enabled: Some(ObjectLockEnabled::from_static(
                    ObjectLockEnabled::ENABLED,
                )),
                rule: b.default_retention.map(|d| ObjectLockRule {
                    default_retention: Some(s3s::dto::DefaultRetention {
                        days: match d.period {
                            ix::RetentionPeriod::Days(n) => Some(n as i32),
                            ix::RetentionPeriod::Years(_) => None,
                        },
                        mode: Some(retention_mode(d.mode)),
                        years: match d.period {
                            ix::RetentionPeriod::Years(n) => Some(n as i32),
                            ix::RetentionPeriod::Days(_) => None,
                        },
                    }),
                }),
            }),
        }))
    }

    async fn put_object_lock_configuration(
        &self,
        req: S3Request<PutObjectLockConfigurationInput>,
    ) -> S3Result<S3Response<PutObjectLockConfigurationOutput>> {
        let who = self.caller(&req, Role::Clerk).await?;
        let seen = self.bucket(&who, &req.input.bucket).await?;
        // No configuration at all (an empty body) is malformed, as S3 has
        // it, never a request to clear the default retention.
        let Some(config) = req.input.object_lock_configuration else {
            return Err(s3_error!(
                MalformedXML,
                "the request needs an ObjectLockConfiguration"
            ));
        };
        // Nor is one that does not say `Enabled` (an empty
        // `<ObjectLockConfiguration/>`, as `--object-lock-configuration '{}'`
        // sends), or a `Rule` without its `DefaultRetention`: only
        // `Enabled` and no `Rule` at all clears the default, as in S3.
        if config
            .object_lock_enabled
            .as_ref()
            .is_none_or(|e| e.as_str() != ObjectLockEnabled::ENABLED)
        {
            return Err(s3_error!(
                MalformedXML,
                "an ObjectLockConfiguration needs ObjectLockEnabled=Enabled"
            ));
        }
        let rule = match config.rule {
            None => None,
            Some(r) => Some(
                r.default_retention
                    .ok_or_else(|| s3_error!(MalformedXML, "a Rule needs a DefaultRetention"))?,
            ),
        };
        let default = match rule {
            None => None,
            Some(d) => {
                let mode = d
                    .mode
                    .as_ref()
                    .map(parse_retention_mode)
                    .transpose()?
                    .ok_or_else(|| s3_error!(MalformedXML, "DefaultRetention needs a Mode"))?;
                let period = match (d.days, d.years) {
                    // At most 100 years either way (S3's own bound).
                    (Some(n), None) if n > 0 && n <= 36_500 => ix::RetentionPeriod::Days(n as u32),
                    (None, Some(y)) if y > 0 && y <= 100 => ix::RetentionPeriod::Years(y as u32),
                    // One period, out of range: S3's InvalidArgument.
                    (Some(_), None) | (None, Some(_)) => {
                        return Err(s3_error!(
                            InvalidArgument,
                            "the default retention period must be a positive number of Days (at most 36500) or Years (at most 100)"
                        ))
                    }
                    _ => {
                        return Err(s3_error!(
                            MalformedXML,
                            "DefaultRetention needs Days or Years, not both"
                        ))
                    }
                };
                Some(ix::DefaultRetention { mode, period })
            }
        };
        self.update_bucket(&req.input.bucket, &seen, |b| {
            // As S3 now allows: an existing bucket takes Object Lock once its
            // versioning is enabled (and keeps both for good).
            if !b.object_lock && b.versioning == Versioning::Enabled {
                b.object_lock = true;
            }
            if !b.object_lock {
                return Err(s3_error!(
                    InvalidBucketState,
                    "Object Lock needs ObjectLockEnabled=Enabled on a bucket whose versioning is enabled"
                ));
            }
            b.default_retention = default;
            Ok(())
        })
        .await?;
        Ok(S3Response::new(PutObjectLockConfigurationOutput::default()))
    }

    /// Every object's tag set is empty (tags are refused on writes). Clients
    /// ask even when they set none: `aws s3 cp` does before every multipart
    /// copy, and fails the copy on an error.
    async fn get_object_tagging(
        &self,
        req: S3Request<GetObjectTaggingInput>,
    ) -> S3Result<S3Response<GetObjectTaggingOutput>> {
        let who = self.caller(&req, Role::Reader).await?;
        let input = &req.input;
        let b = self.bucket(&who, &input.bucket).await?;
        let (v, _) = self
            .readable(&who, &input.bucket, &input.key, input.version_id.as_deref())
            .await?;
        Ok(S3Response::new(GetObjectTaggingOutput {
            tag_set: Vec::new(),
            version_id: show_version(&b, &v),
        }))
    }

    async fn get_object_retention(
        &self,
        req: S3Request<GetObjectRetentionInput>,
    ) -> S3Result<S3Response<GetObjectRetentionOutput>> {
        let who = self.caller(&req, Role::Reader).await?;
        let input = &req.input;
        let locking = self.bucket(&who, &input.bucket).await?.object_lock;
        let (v, header) = self
            .readable(&who, &input.bucket, &input.key, input.version_id.as_deref())
            .await?;
        // As for legal holds: a bucket without Object Lock has no
        // retention of its own, but its objects' evidence may be retained
        // through the evidence API, which refuses their deletion: shown.
        if !locking && header.retain_until_ms.is_none() {
            return Err(s3_error!(
                InvalidRequest,
                "Bucket is missing Object Lock Configuration"
            ));
        }
        let r = shown_retention(&v, &header, self.gw.clock.compliance_ms()).ok_or_else(|| {
            s3_error!(
                NoSuchObjectLockConfiguration,
                "this version has no retention"
            )
        })?;
        Ok(S3Response::new(GetObjectRetentionOutput {
            retention: Some(ObjectLockRetention {
                mode: Some(retention_mode(r.mode)),
                retain_until_date: Some(ms_to_ts(r.until_ms)),
            }),
        }))
    }

    async fn put_object_retention(
        &self,
        req: S3Request<PutObjectRetentionInput>,
    ) -> S3Result<S3Response<PutObjectRetentionOutput>> {
        let who = self.caller(&req, Role::Clerk).await?;
        let input = req.input;
        let b = self.bucket(&who, &input.bucket).await?;
        if !b.object_lock {
            return Err(s3_error!(InvalidRequest, "the bucket has no Object Lock"));
        }
        let retention = match input.retention {
            None => None,
            Some(r) => match (r.mode, r.retain_until_date) {
                (Some(m), Some(until)) => Some(Retention {
                    mode: parse_retention_mode(&m)?,
                    until_ms: future_ms(until, self.gw.clock.now_ms())?,
                }),
                (None, None) => None,
                _ => {
                    return Err(s3_error!(
                        MalformedXML,
                        "Retention needs Mode and RetainUntilDate"
                    ))
                }
            },
        };
        let (v, header) = self
            .readable(&who, &input.bucket, &input.key, input.version_id.as_deref())
            .await?;
        let compliance = self.gw.clock.compliance_ms();
        let bypass = who.bypass_governance && input.bypass_governance_retention == Some(true);
        let (bucket, key, vid) = (input.bucket.clone(), input.key.clone(), v.version_id);
        let evidence = header.evidence;
        // A retention change is on the ledger, as the evidence API's is and
        // as S3 legal holds are: custody shows who locked what until when.
        let detail = serde_json::json!({
            "retention": retention.map(|r| serde_json::json!({
                "mode": if r.mode == LockMode::Compliance { "COMPLIANCE" } else { "GOVERNANCE" },
                "retain_until_ms": r.until_ms,
            })),
            "bypass_governance": bypass,
            "s3": { "bucket": bucket, "key": key, "version": vid.to_string() },
        });
        crate::api::worm(
            &self.gw,
            &who.api_caller(),
            &header,
            protocol::ledger::Kind::Admin,
            detail,
            |tx| {
                let (bucket, key) = (bucket.clone(), key.clone());
                async move {
                    ix::set_retention_tx(&tx, &bucket, &key, vid, retention, compliance, bypass)
                        .await?;
                    let h = schema::get_manifest_tx(&tx, evidence)
                        .await?
                        .ok_or(ObjectError::NoSuchVersion)?;
                    // COMPLIANCE binds the evidence itself (only ever extended).
                    if let Some(r) = retention.filter(|r| r.mode == LockMode::Compliance) {
                        if h.retain_until_ms.is_none_or(|u| u < r.until_ms) {
                            return Ok(
                                schema::extend_retention_tx(&tx, evidence, r.until_ms).await?
                            );
                        }
                    }
                    Ok::<_, ObjectError>(h)
                }
            },
        )
        .await
        .map_err(s3_err)?;
        tracing::info!(bucket = %bucket, key = %key, version = %vid, ?retention, by = %who.tenant, "retention set");
        Ok(S3Response::new(PutObjectRetentionOutput::default()))
    }

    async fn get_object_legal_hold(
        &self,
        req: S3Request<GetObjectLegalHoldInput>,
    ) -> S3Result<S3Response<GetObjectLegalHoldOutput>> {
        let who = self.caller(&req, Role::Reader).await?;
        let input = &req.input;
        let locking = self.bucket(&who, &input.bucket).await?.object_lock;
        let (_, header) = self
            .readable(&who, &input.bucket, &input.key, input.version_id.as_deref())
            .await?;
        // A bucket without Object Lock has no holds of its own, but its
        // objects' evidence may be held through the evidence API: that
        // hold, which refuses their deletion, is shown.
        if !locking && !header.legal_hold {
            return Err(s3_error!(
                InvalidRequest,
                "Bucket is missing Object Lock Configuration"
            ));
        }
        Ok(S3Response::new(GetObjectLegalHoldOutput {
            legal_hold: Some(ObjectLockLegalHold {
                status: Some(ObjectLockLegalHoldStatus::from_static(
                    if header.legal_hold {
                        ObjectLockLegalHoldStatus::ON
                    } else {
                        ObjectLockLegalHoldStatus::OFF
                    },
                )),
            }),
        }))
    }

    async fn put_object_legal_hold(
        &self,
        req: S3Request<PutObjectLegalHoldInput>,
    ) -> S3Result<S3Response<PutObjectLegalHoldOutput>> {
        let who = self.caller(&req, Role::Clerk).await?;
        let input = req.input;
        let b = self.bucket(&who, &input.bucket).await?;
        if !b.object_lock {
            return Err(s3_error!(InvalidRequest, "the bucket has no Object Lock"));
        }
        let on = match input
            .legal_hold
            .and_then(|h| h.status)
            .as_ref()
            .map(|s| s.as_str())
        {
            Some(ObjectLockLegalHoldStatus::ON) => true,
            Some(ObjectLockLegalHoldStatus::OFF) => false,
            _ => {
                return Err(s3_error!(
                    MalformedXML,
                    "LegalHold Status must be ON or OFF"
                ))
            }
        };
        let (v, header) = self
            .readable(&who, &input.bucket, &input.key, input.version_id.as_deref())
            .await?;
        // OFF where there is no hold changes nothing: 200, as S3 answers
        // it, and nothing on the ledger (no hold was released). The
        // evidence's hold is the one that decides (see
        // `removal_refused`): one an administrator lifted through the
        // evidence API leaves the version's mirror of it set, which is
        // cleared here, lifting nothing. (Kept, it made every OFF after
        // such a release an admin's, whom a court's tenant never has.)
        if !on && !header.legal_hold {
            if v.legal_hold {
                let (bucket, key, vid) = (&input.bucket, &input.key, v.version_id);
                let evidence = header.evidence;
                indexer::run(&self.gw.store, |tx| async move {
                    // Unless a hold was placed since it was read (or the
                    // evidence's record is gone, and the version's flag
                    // is the hold): that is an admin's to lift.
                    let held = schema::get_any_manifest_tx(&tx, evidence)
                        .await?
                        .is_none_or(|(h, _)| h.legal_hold);
                    if held {
                        return Err(ObjectError::Locked(
                            "lifting a legal hold needs an admin key".into(),
                        ));
                    }
                    ix::set_legal_hold_tx(&tx, bucket, key, vid, false).await?;
                    Ok::<_, ObjectError>(())
                })
                .await
                .map_err(|e| s3_err(e.into()))?;
            }
            return Ok(S3Response::new(PutObjectLegalHoldOutput::default()));
        }
        // As on the evidence API: placing a hold is a clerk's, lifting one
        // an administrator's.
        if !on && !who.role.may(Role::Admin) {
            return Err(s3_error!(
                AccessDenied,
                "lifting a legal hold needs an admin key"
            ));
        }
        let (bucket, key, vid) = (input.bucket.clone(), input.key.clone(), v.version_id);
        // The hold binds the evidence too, and is on the ledger like any
        // hold or release.
        let evidence = header.evidence;
        crate::api::worm(
            &self.gw,
            &who.api_caller(),
            &header,
            if on {
                protocol::ledger::Kind::LegalHold
            } else {
                protocol::ledger::Kind::Released
            },
            serde_json::json!({ "legal_hold": on, "s3": { "bucket": bucket, "key": key, "version": vid.to_string() } }),
            |tx| {
                let (bucket, key) = (bucket.clone(), key.clone());
                async move {
                    ix::set_legal_hold_tx(&tx, &bucket, &key, vid, on).await?;
                    Ok::<_, ObjectError>(schema::set_legal_hold_tx(&tx, evidence, on).await?)
                }
            },
        )
        .await
        .map_err(s3_err)?;
        tracing::info!(bucket = %bucket, key = %key, version = %vid, on, by = %who.tenant, "legal hold set");
        Ok(S3Response::new(PutObjectLegalHoldOutput::default()))
    }

    async fn create_multipart_upload(
        &self,
        req: S3Request<CreateMultipartUploadInput>,
    ) -> S3Result<S3Response<CreateMultipartUploadOutput>> {
        let who = self.caller(&req, Role::Clerk).await?;
        let mut input = req.input;
        let b = self.bucket(&who, &input.bucket).await?;
        if !ix::valid_key(&input.key) {
            return Err(s3_error!(InvalidArgument, "invalid object key"));
        }
        refuse_tags(input.tagging.as_deref())?;
        let now = self.gw.clock.now_ms();
        let version = object_template(
            &b,
            now,
            content_of!(input),
            input.metadata.take(),
            input.object_lock_mode.as_ref(),
            input.object_lock_retain_until_date.clone(),
            input.object_lock_legal_hold_status.as_ref(),
        )?;
        let upload = EvidenceId::new(now, rand::random());
        let rec = ix::MultipartRecord {
            bucket: input.bucket.clone(),
            key: input.key.clone(),
            tenant: who.tenant.clone(),
            created_ms: now,
            version,
            default_retention: input.object_lock_mode.is_none()
                && input.object_lock_retain_until_date.is_none(),
        };
        indexer::run(&self.gw.store, |tx| {
            let (rec, b) = (&rec, &b);
            async move { ix::create_multipart_tx(&tx, upload, rec, b).await }
        })
        .await
        .map_err(|e| s3_err(e.into()))?;
        Ok(S3Response::new(CreateMultipartUploadOutput {
            bucket: Some(input.bucket),
            key: Some(input.key),
            upload_id: Some(upload.to_string()),
            ..Default::default()
        }))
    }

    async fn upload_part(
        &self,
        req: S3Request<UploadPartInput>,
    ) -> S3Result<S3Response<UploadPartOutput>> {
        let who = self.caller(&req, Role::Clerk).await?;
        let mut input = req.input;
        self.bucket(&who, &input.bucket).await?;
        let (upload, _) = self
            .multipart(&who, &input.bucket, &input.key, &input.upload_id)
            .await?;
        let (body, body_check) = checked_body(
            input.body.take(),
            &req.headers,
            req.trailing_headers,
            declared_checksums!(input),
        )?;
        let number = part_number(input.part_number)?;
        let meta = FilingMeta {
            tenant: who.tenant.clone(),
            credential: Some(ix::access_key_ref(&who.access_key)),
            expect_md5: content_md5(input.content_md5.as_deref())?,
            expect_sha256: sha256_header(input.checksum_sha256.as_deref())?,
            body_check,
            part: Some((upload, number)),
            body_len_at_most: body_len_at_most(&req.method, &req.headers),
            body_len_exact: true,
            ..Default::default()
        };
        let record = self.file_part(meta, body).await?;
        Ok(S3Response::new(UploadPartOutput {
            e_tag: Some(ETag::Strong(record.md5)),
            ..Default::default()
        }))
    }

    /// A part copied from (a range of) an existing object: a read of the
    /// source (on the ledger) and a new part filing of those bytes.
    async fn upload_part_copy(
        &self,
        req: S3Request<UploadPartCopyInput>,
    ) -> S3Result<S3Response<UploadPartCopyOutput>> {
        let who = self.caller(&req, Role::Clerk).await?;
        let input = req.input;
        self.bucket(&who, &input.bucket).await?;
        let (upload, _) = self
            .multipart(&who, &input.bucket, &input.key, &input.upload_id)
            .await?;
        let number = part_number(input.part_number)?;
        let (_, header, src_version) = self
            .copy_source(&who, &input.copy_source, copy_source_conditions!(input))
            .await?;
        let range = match input.copy_source_range.as_deref() {
            None => 0..header.size,
            Some(r) => copy_range(r, header.size)?,
        };
        let actor = who.actor();
        // Recorded with the part, in its commit.
        let source_read =
            crate::api::access_statement(&self.gw, &header, actor, &range).map_err(s3_err)?;
        let meta = FilingMeta {
            tenant: who.tenant.clone(),
            credential: Some(ix::access_key_ref(&who.access_key)),
            part: Some((upload, number)),
            body_from_store: true,
            copied_from: vec![header.evidence],
            source_read,
            body_len_at_most: Some(range.end - range.start),
            ..Default::default()
        };
        let body = crate::read::stream_range(self.gw.clone(), header, range, None);
        let (body, _left) = while_client_here(Box::pin(body));
        let record = self.file_part(meta, Box::pin(body)).await?;
        Ok(S3Response::new(UploadPartCopyOutput {
            copy_part_result: Some(CopyPartResult {
                e_tag: Some(ETag::Strong(record.md5)),
                last_modified: Some(ms_to_ts(self.gw.clock.now_ms())),
                ..Default::default()
            }),
            copy_source_version_id: src_version,
            ..Default::default()
        }))
    }

    async fn complete_multipart_upload(
        &self,
        req: S3Request<CompleteMultipartUploadInput>,
    ) -> S3Result<S3Response<CompleteMultipartUploadOutput>> {
        let who = self.caller(&req, Role::Clerk).await?;
        let input = req.input;
        let b = self.bucket(&who, &input.bucket).await?;
        // The listed parts' ETags, if every part lists one.
        let etags: Option<Vec<String>> = input
            .multipart_upload
            .as_ref()
            .and_then(|m| m.parts.as_ref())
            .and_then(|parts| {
                parts
                    .iter()
                    .map(|p| p.e_tag.as_ref().map(|e| e.value().to_owned()))
                    .collect()
            });
        let (upload, rec) = match self
            .multipart(&who, &input.bucket, &input.key, &input.upload_id)
            .await
        {
            Ok(found) => found,
            Err(e) => {
                let Ok(upload) = input.upload_id.parse::<EvidenceId>() else {
                    return Err(e);
                };
                let object = (input.bucket.as_str(), input.key.as_str());
                return match self
                    .completed_again(&who.tenant, &b, object, upload, etags.as_deref())
                    .await?
                {
                    Some(answer) => Ok(S3Response::new(answer)),
                    None => Err(e),
                };
            }
        };
        // Anything that fails from here may be a retry that raced the
        // first Complete, which has since committed (and deleted the
        // parts): its answer, if it listed the same parts.
        let (etags_again, b_again) = (etags.clone(), b.clone());
        let attempt: S3Result<S3Response<CompleteMultipartUploadOutput>> = async {
            // Conditional completion, as for PUT: checked now and again in the
            // transaction that makes the object current.
            let condition = put_condition(input.if_match.clone(), input.if_none_match.clone());
            self.precheck(&input.bucket, &input.key, condition.as_ref())
                .await?;
            // A sign of life: the collector does not expire an upload
            // whose Complete is filing its parts (many GiB take a while).
            let now = self.gw.clock.now_ms();
            let stored = indexer::run(&self.gw.store, |tx| async move {
                ix::touch_open_upload_tx(&tx, upload, now).await?;
                ix::parts_tx(&tx, upload).await
            })
            .await
            .map_err(|e| s3_err(e.into()))?;
            let listed = input
                .multipart_upload
                .as_ref()
                .and_then(|m| m.parts.clone())
                .unwrap_or_default();
            if listed.is_empty() {
                return Err(s3_error!(MalformedXML, "no parts listed"));
            }
            // The listed parts, in ascending order, each stored with that ETag;
            // all but the last at least 5 MiB, as in S3.
            let mut chosen = Vec::with_capacity(listed.len());
            // Their numbers, to say which one a failed read-back was.
            let mut numbers = Vec::with_capacity(listed.len());
            let mut last = 0u32;
            for p in &listed {
                let n = match p.part_number.map(u32::try_from) {
                    Some(Ok(n)) => n,
                    // No number, or a negative one: not a part list S3 reads.
                    _ => return Err(s3_error!(MalformedXML, "a part without a PartNumber")),
                };
                if n <= last {
                    return Err(s3_error!(InvalidPartOrder));
                }
                last = n;
                let part = stored
                    .iter()
                    .find(|(m, _)| *m == n)
                    .map(|(_, r)| r.clone())
                    .ok_or_else(|| s3_error!(InvalidPart, "part {n} was not uploaded"))?;
                // The ETag is required, as in S3: it says which upload of the
                // part the client means (a part may be uploaded again).
                match &p.e_tag {
                    None => {
                        return Err(s3_error!(
                            InvalidPart,
                            "part {n} is listed without its ETag"
                        ))
                    }
                    Some(e) if e.value() != part.md5 => {
                        return Err(s3_error!(InvalidPart, "part {n} has another ETag"))
                    }
                    Some(_) => {}
                }
                // A part's SHA-256, when the client lists one, is the stored
                // part's (S3 refuses a listed checksum the part was not
                // uploaded with).
                if let Some(sum) = &p.checksum_sha256 {
                    use base64::Engine as _;
                    let listed = base64::engine::general_purpose::STANDARD
                        .decode(sum.as_bytes())
                        .map_err(|_| {
                            s3_error!(InvalidPart, "part {n}'s ChecksumSHA256 is not base64")
                        })?;
                    if listed != part.sha256 {
                        return Err(s3_error!(InvalidPart, "part {n} has another SHA-256"));
                    }
                }
                chosen.push(part);
                numbers.push(n);
            }
            if chosen[..chosen.len() - 1]
                .iter()
                .any(|p| p.size < 5 * 1024 * 1024)
            {
                return Err(s3_error!(
                    EntityTooSmall,
                    "every part but the last must be at least 5 MiB"
                ));
            }
            let (checksums, expect_sha256) = completion_checksums(&input, &chosen)?;
            let total: u64 = chosen.iter().map(|p| p.size).sum();
            if let Some(declared) = input.mpu_object_size {
                if u64::try_from(declared).ok() != Some(total) {
                    return Err(s3_error!(
                        InvalidRequest,
                        "x-amz-mp-object-size is {declared}; the listed parts hold {total} bytes"
                    ));
                }
            }
            let etag = multipart_etag(chosen.iter().map(|p| p.md5.as_str()));
            // The bucket's default retention as the object comes to be: counted
            // from now, and as the bucket has it now (set or changed during a
            // long upload), as S3 applies it.
            let mut version = rec.version.clone();
            if rec.default_retention {
                let now = self.gw.clock.now_ms();
                version.retention = b.default_retention.map(|d| Retention {
                    mode: d.mode,
                    until_ms: d.until_ms(now),
                });
            }
            let (retain_until_ms, legal_hold) = evidence_worm(&version);
            // Parts copied from evidence (UploadPartCopy) file the object only
            // while that evidence is still filed: an expunge since the copy
            // must not come back as this object.
            let mut copied_from: Vec<EvidenceId> =
                chosen.iter().filter_map(|p| p.copied_from).collect();
            copied_from.sort_unstable();
            copied_from.dedup();
            let mut meta = FilingMeta {
                copied_from,
                tenant: who.tenant.clone(),
                credential: Some(ix::access_key_ref(&who.access_key)),
                retain_until_ms,
                legal_hold,
                expect_sha256,
                file_name: Some(input.key.clone()),
                media_type: rec.version.content_type.clone(),
                submitter: Some(format!("{}/s3:{}", who.tenant, who.access_key)),
                actor: Some(who.actor()),
                s3: Some(S3Put {
                    bucket: input.bucket.clone(),
                    key: input.key.clone(),
                    version: ObjectVersion {
                        null_version: b.versioning != Versioning::Enabled,
                        ..version
                    },
                    etag: Some(etag),
                    condition,
                    seen: b.clone(),
                    completes: Some(upload),
                }),
                body_from_store: true,
                ..Default::default()
            };
            // The object is filed anew from the parts' verified bytes, so its
            // BLAKE3 root, SHA-256 and receipt are the whole object's. This can
            // take a while: see below.
            let front = S3Front {
                gw: self.gw.clone(),
            };
            let (bucket, key) = (input.bucket.clone(), input.key.clone());
            let caller_tenant = who.tenant.clone();
            let future = async move {
                let gw = front.gw.clone();
                let tenant = meta.tenant.clone();
                let body = futures::stream::iter(chosen.clone().into_iter().zip(numbers))
                    .map(move |(p, n)| {
                        // A part that cannot be read back (its stripes
                        // short of shards) is named: the client can upload
                        // that one again.
                        crate::read::stream_part(gw.clone(), p.read_header(&tenant), 0..p.size)
                            .map(move |r| {
                                r.map_err(|e| std::io::Error::other(format!("part {n}: {e}")))
                            })
                    })
                    .flatten();
                // The whole object's checksums the client sent, over the
                // bytes as they are assembled: a mismatch files nothing, and
                // the upload stays for a Complete that gets them right.
                let body = body.map(|r| r.map_err(|e| e.to_string()));
                let (body, check) = checking(Box::pin(body), checksums, None);
                meta.body_check = check;
                // The filing and the deletion of the parts run to their end in
                // a task of their own: the upload ends in the filing's own
                // transaction, after which nothing else refers to the parts, so
                // a client gone meanwhile (dropping this future) must not leave
                // them stored for good.
                // The answer does not wait for the deletion (of up to 10,000
                // parts): the upload's end queued every part for it in the
                // filing's transaction, so a crash meanwhile is covered.
                let (gw, parts) = (front.gw.clone(), stored.clone());
                let filing = tokio::spawn(async move {
                    let filing = ingest::file_evidence(gw.clone(), meta, Box::pin(body)).await;
                    if filing.is_ok() {
                        delete_parts_later(&gw, parts.into_iter().map(|(_, p)| p).collect());
                    }
                    filing
                })
                .await
                .map_err(|_| internal(ApiError::Internal))?;
                let filing = match filing {
                    Ok(filing) => filing,
                    // A concurrent Complete of the same upload (a retry that
                    // raced the first) committed first: its answer, if it
                    // listed the same parts. This one then failed at its commit
                    // (the upload gone) or before (reading parts the other
                    // deleted once it committed).
                    Err(e) => {
                        let object = (bucket.as_str(), key.as_str());
                        return match front
                            .completed_again(&caller_tenant, &b, object, upload, etags.as_deref())
                            .await?
                        {
                            Some(answer) => Ok(answer),
                            None => {
                                // Aborted meanwhile, or completed with other
                                // parts: NoSuchUpload, as S3 answers, not the
                                // failed read of its parts that it caused.
                                let gone = indexer::run(&front.gw.store, |tx| async move {
                                    ix::get_multipart_tx(&tx, upload).await
                                })
                                .await
                                .is_ok_and(|r| r.is_none());
                                Err(match gone {
                                    true => s3_error!(NoSuchUpload),
                                    false => s3_err(e),
                                })
                            }
                        };
                    }
                };
                let (v, _) = front.filed(&bucket, &key, filing).await?;
                tracing::info!(%upload, bucket = %bucket, key = %key, parts = chosen.len(), size = v.size, "multipart upload completed");
                Ok(CompleteMultipartUploadOutput {
                    bucket: Some(bucket.clone()),
                    key: Some(key.clone()),
                    e_tag: Some(ETag::Strong(v.etag.clone())),
                    version_id: show_version(&b, &v),
                    location: Some(format!("/{bucket}/{key}")),
                    ..Default::default()
                })
            };
            // Answered as any other request when it is done in time, with
            // its version id and its error's own status; kept alive by s3s
            // (200, spaces, then the outcome) once it takes longer.
            let mut future: futures::future::BoxFuture<'static, _> = Box::pin(future);
            let after = Duration::from_millis(self.gw.config.s3_keep_alive_after_ms);
            match tokio::time::timeout(after, future.as_mut()).await {
                Ok(done) => done.map(S3Response::new),
                Err(_) => Ok(S3Response::new(CompleteMultipartUploadOutput {
                    future: Some(future),
                    ..Default::default()
                })),
            }
        }
        .await;
        match attempt {
            Ok(answer) => Ok(answer),
            Err(e) => {
                let object = (input.bucket.as_str(), input.key.as_str());
                match self
                    .completed_again(
                        &who.tenant,
                        &b_again,
                        object,
                        upload,
                        etags_again.as_deref(),
                    )
                    .await?
                {
                    Some(answer) => Ok(S3Response::new(answer)),
                    None => Err(e),
                }
            }
        }
    }

    async fn abort_multipart_upload(
        &self,
        req: S3Request<AbortMultipartUploadInput>,
    ) -> S3Result<S3Response<AbortMultipartUploadOutput>> {
        let who = self.caller(&req, Role::Clerk).await?;
        let input = req.input;
        self.bucket(&who, &input.bucket).await?;
        let (upload, _) = self
            .multipart(&who, &input.bucket, &input.key, &input.upload_id)
            .await?;
        let parts = indexer::run(&self.gw.store, |tx| async move {
            ix::abort_multipart_tx(&tx, upload).await
        })
        .await
        .map_err(|e| s3_err(e.into()))?;
        delete_parts_later(&self.gw, parts);
        Ok(S3Response::new(AbortMultipartUploadOutput::default()))
    }

    async fn list_parts(
        &self,
        req: S3Request<ListPartsInput>,
    ) -> S3Result<S3Response<ListPartsOutput>> {
        let who = self.caller(&req, Role::Reader).await?;
        let input = req.input;
        self.bucket(&who, &input.bucket).await?;
        let (upload, _) = self
            .multipart(&who, &input.bucket, &input.key, &input.upload_id)
            .await?;
        let after = input
            .part_number_marker
            .and_then(|m| u32::try_from(m).ok())
            .unwrap_or(0);
        let max = input.max_parts.unwrap_or(1000).clamp(1, 1000) as usize;
        let parts = indexer::run(&self.gw.store, |tx| async move {
            ix::parts_tx(&tx, upload).await
        })
        .await
        .map_err(|e| s3_err(e.into()))?;
        let mut page: Vec<_> = parts.into_iter().filter(|(n, _)| *n > after).collect();
        let truncated = page.len() > max;
        page.truncate(max);
        Ok(S3Response::new(ListPartsOutput {
            bucket: Some(input.bucket),
            key: Some(input.key),
            upload_id: Some(input.upload_id),
            is_truncated: Some(truncated),
            max_parts: Some(max as i32),
            next_part_number_marker: page.last().filter(|_| truncated).map(|(n, _)| *n as i32),
            parts: Some(
                page.into_iter()
                    .map(|(n, p)| Part {
                        part_number: Some(n as i32),
                        e_tag: Some(ETag::Strong(p.md5)),
                        size: Some(p.size as i64),
                        last_modified: Some(ms_to_ts(p.uploaded_ms)),
                        ..Default::default()
                    })
                    .collect(),
            ),
            ..Default::default()
        }))
    }

    async fn list_multipart_uploads(
        &self,
        req: S3Request<ListMultipartUploadsInput>,
    ) -> S3Result<S3Response<ListMultipartUploadsOutput>> {
        let who = self.caller(&req, Role::Reader).await?;
        let input = req.input;
        let b = self.bucket(&who, &input.bucket).await?;
        let max = input.max_uploads.unwrap_or(1000).clamp(1, 1000) as usize;
        let prefix = input.prefix.clone().unwrap_or_default();
        let delimiter = input.delimiter.clone().filter(|d| !d.is_empty());
        // The first key past `prefix` that holds the delimiter ends there.
        let common_prefix = |key: &str| common_prefix(&prefix, delimiter.as_deref(), key);
        let mut after = match input.key_marker.as_deref().filter(|k| !k.is_empty()) {
            None => None,
            Some(key) => {
                // An id marker counts only with a key marker, as in S3.
                let upload = match input.upload_id_marker.as_deref().filter(|k| !k.is_empty()) {
                    None => None,
                    Some(id) => Some(
                        id.parse::<EvidenceId>()
                            .map_err(|_| s3_error!(InvalidArgument, "bad upload-id-marker"))?,
                    ),
                };
                Some(ix::UploadMarker {
                    key: key.to_string(),
                    // A key marker that is a common prefix (what a
                    // truncated page ends with) resumes after every key
                    // under it.
                    past_prefix: upload.is_none() && common_prefix(key).as_deref() == Some(key),
                    upload,
                })
            }
        };
        let mut uploads: Vec<(String, String, u64)> = Vec::new();
        let mut prefixes = Vec::new();
        let (mut listed, mut truncated) = (0usize, false);
        let mut next: Option<(String, Option<String>)> = None;
        'pages: loop {
            // One row past what is left says whether the listing goes on.
            let limit = max - listed + 1;
            let rows = indexer::run(&self.gw.store, |tx| {
                let (bucket, tenant, prefix, after) = (&input.bucket, &b.tenant, &prefix, &after);
                async move {
                    ix::list_multipart_tx(&tx, bucket, Some(tenant), prefix, after.as_ref(), limit)
                        .await
                }
            })
            .await
            .map_err(|e| s3_err(e.into()))?;
            let whole = rows.len() == limit;
            let mut cut = false;
            for (id, r) in rows {
                if listed == max {
                    truncated = true;
                    break 'pages;
                }
                // A common prefix counts as one entry, as in S3.
                listed += 1;
                if let Some(common) = common_prefix(&r.key) {
                    prefixes.push(common.clone());
                    next = Some((common.clone(), None));
                    // The rest of these rows may be under it: read again.
                    after = Some(ix::UploadMarker {
                        key: common,
                        upload: None,
                        past_prefix: true,
                    });
                    cut = true;
                    break;
                }
                next = Some((r.key.clone(), Some(id.to_string())));
                after = Some(ix::UploadMarker {
                    key: r.key.clone(),
                    upload: Some(id),
                    past_prefix: false,
                });
                uploads.push((r.key, id.to_string(), r.created_ms));
            }
            if !cut && !whole {
                break;
            }
        }
        let (next_key, next_id) = next.filter(|_| truncated).unzip();
        // encoding-type=url: keys, prefixes and markers go out
        // percent-encoded, as from S3.
        let encode = url_encoded(input.encoding_type.as_ref());
        let shown = |v| url_encoded_if(encode, v);
        Ok(S3Response::new(ListMultipartUploadsOutput {
            bucket: Some(input.bucket),
            prefix: shown(input.prefix),
            delimiter: shown(input.delimiter),
            key_marker: shown(input.key_marker),
            upload_id_marker: input.upload_id_marker,
            max_uploads: Some(max as i32),
            is_truncated: Some(truncated),
            next_key_marker: shown(next_key),
            next_upload_id_marker: next_id.flatten(),
            encoding_type: input.encoding_type,
            common_prefixes: Some(
                prefixes
                    .into_iter()
                    .map(|p| CommonPrefix {
                        prefix: shown(Some(p)),
                    })
                    .collect(),
            ),
            uploads: Some(
                uploads
                    .into_iter()
                    .map(|(key, id, created_ms)| MultipartUpload {
                        key: shown(Some(key)),
                        upload_id: Some(id),
                        initiated: Some(ms_to_ts(created_ms)),
                        ..Default::default()
                    })
                    .collect(),
            ),
            ..Default::default()
        }))
    }

    async fn list_object_versions(
        &self,
        req: S3Request<ListObjectVersionsInput>,
    ) -> S3Result<S3Response<ListObjectVersionsOutput>> {
        let who = self.caller(&req, Role::Reader).await?;
        let input = req.input;
        self.bucket(&who, &input.bucket).await?;
        let delimiter = input.delimiter.clone().filter(|d| !d.is_empty());
        let prefix = input.prefix.clone().unwrap_or_default();
        // max-keys=0 lists nothing (and is not truncated), as in S3.
        let max = input.max_keys.unwrap_or(1000).clamp(0, 1000) as usize;
        let marker_key = input.key_marker.clone().filter(|k| !k.is_empty());
        // `Err(())`: the marker names a null version that is gone.
        let marker_version = match (input.version_id_marker.as_deref(), &marker_key) {
            (None | Some(""), _) => Ok(None),
            // As S3: a version marker means nothing without its key.
            (Some(_), None) => {
                return Err(s3_error!(
                    InvalidArgument,
                    "A version-id marker cannot be specified without a key marker."
                ))
            }
            // A marker of "null" (this listing gives the null version's own
            // id as its next marker, but a client may send "null") resumes
            // after that key's null version, wherever it sorts. Gone since
            // (deleted or replaced): from the key's first version again, so
            // a client deleting page by page still sees the versions after
            // it (a few may be listed twice; none is skipped).
            (Some("null"), Some(k)) => self
                .version(&input.bucket, k, VersionRef::Null)
                .await
                .map(|v| Some(v.version_id))
                .map_err(|_| ()),
            (Some(v), _) => {
                Ok(Some(v.parse::<EvidenceId>().map_err(|_| {
                    s3_error!(InvalidArgument, "bad version-id-marker")
                })?))
            }
        };
        // The first key past `prefix` that holds the delimiter ends there.
        let common_prefix = |key: &str| common_prefix(&prefix, delimiter.as_deref(), key);
        // A key marker that is a common prefix (what a truncated page ends
        // with) resumes after every key under it.
        let mut cursor = match (&marker_key, marker_version) {
            (None, _) => Cursor::Start,
            (Some(k), Err(())) => Cursor::KeyStart(k.clone()),
            (Some(k), Ok(None)) if common_prefix(k).as_deref() == Some(k.as_str()) => {
                Cursor::Prefix(k.clone())
            }
            (Some(k), Ok(v)) => Cursor::Version(k.clone(), v),
        };
        let mut versions = Vec::new();
        let mut markers = Vec::new();
        let mut prefixes = Vec::new();
        let mut previous: Option<String> = marker_key
            .clone()
            .filter(|_| matches!(marker_version, Ok(Some(_))));
        let (mut listed, mut truncated) = (0usize, false);
        let mut next: Option<(String, Option<String>)> = None;
        'pages: loop {
            if max == 0 {
                break;
            }
            let (bucket, p, at) = (input.bucket.clone(), prefix.clone(), cursor.clone());
            let rows = indexer::run(&self.gw.store, |tx| {
                let (bucket, p, at) = (&bucket, &p, &at);
                async move {
                    let after = match at {
                        Cursor::Start => ix::VersionsAfter::Start,
                        Cursor::Version(k, v) => ix::VersionsAfter::Version(k, *v),
                        Cursor::Prefix(k) => ix::VersionsAfter::Prefix(k),
                        Cursor::KeyStart(k) => ix::VersionsAfter::KeyStart(k),
                    };
                    ix::list_versions_after_tx(&tx, bucket, p, after, LIST_BATCH).await
                }
            })
            .await
            .map_err(|e| s3_err(e.into()))?;
            let full_batch = rows.len() == LIST_BATCH;
            let mut cut = false;
            for (key, v) in rows {
                if listed == max {
                    // A row remains: the listing is truncated here.
                    truncated = true;
                    break 'pages;
                }
                listed += 1;
                if let Some(common) = common_prefix(&key) {
                    prefixes.push(CommonPrefix {
                        prefix: Some(common.clone()),
                    });
                    next = Some((common.clone(), None));
                    // The rest of this batch may be under it: read again.
                    cursor = Cursor::Prefix(common);
                    cut = true;
                    break;
                }
                let latest = previous.as_deref() != Some(key.as_str());
                previous = Some(key.clone());
                // Listings name every version, the null one "null" (in a
                // bucket never versioned too, as S3 lists it).
                let shown = version_name(v.null_version, v.version_id);
                if v.is_delete_marker() {
                    markers.push(DeleteMarkerEntry {
                        key: Some(key.clone()),
                        version_id: Some(shown.clone()),
                        is_latest: Some(latest),
                        last_modified: Some(ms_to_ts(v.last_modified_ms)),
                        ..Default::default()
                    });
                } else {
                    versions.push(s3s::dto::ObjectVersion {
                        key: Some(key.clone()),
                        version_id: Some(shown.clone()),
                        is_latest: Some(latest),
                        e_tag: Some(ETag::Strong(v.etag.clone())),
                        size: Some(v.size as i64),
                        last_modified: Some(ms_to_ts(v.last_modified_ms)),
                        storage_class: Some(ObjectVersionStorageClass::from_static(
                            ObjectVersionStorageClass::STANDARD,
                        )),
                        ..Default::default()
                    });
                }
                // The next marker names the version by its own id, the
                // null one too: "null" names whichever version is null when
                // the next page is asked for, and that one may be gone.
                next = Some((key.clone(), Some(v.version_id.to_string())));
                cursor = Cursor::Version(key, Some(v.version_id));
            }
            if !cut && !full_batch {
                break;
            }
        }
        let next = next.filter(|_| truncated);
        // With encoding-type=url, every key, prefix and marker goes out
        // percent-encoded, as from S3 (rclone decodes them whatever it is
        // told; a raw "a+b" would come back to it as "a b").
        let encode = url_encoded(input.encoding_type.as_ref());
        let shown = |v| url_encoded_if(encode, v);
        if encode {
            for v in &mut versions {
                v.key = v.key.as_deref().map(url_encode);
            }
            for m in &mut markers {
                m.key = m.key.as_deref().map(url_encode);
            }
            for p in &mut prefixes {
                p.prefix = p.prefix.as_deref().map(url_encode);
            }
        }
        Ok(S3Response::new(ListObjectVersionsOutput {
            name: Some(input.bucket),
            prefix: shown(input.prefix),
            delimiter: shown(input.delimiter),
            key_marker: shown(input.key_marker),
            version_id_marker: input.version_id_marker,
            max_keys: Some(max as i32),
            is_truncated: Some(truncated),
            next_key_marker: shown(next.as_ref().map(|(k, _)| k.clone())),
            next_version_id_marker: next.and_then(|(_, v)| v),
            versions: Some(versions),
            delete_markers: Some(markers),
            common_prefixes: Some(prefixes),
            encoding_type: input.encoding_type,
            ..Default::default()
        }))
    }

    async fn list_objects_v2(
        &self,
        req: S3Request<ListObjectsV2Input>,
    ) -> S3Result<S3Response<ListObjectsV2Output>> {
        let who = self.caller(&req, Role::Reader).await?;
        let input = req.input;
        self.bucket(&who, &input.bucket).await?;
        let after = match (&input.continuation_token, &input.start_after) {
            (Some(t), _) => Some(
                hex::decode(t).map_err(|_| s3_error!(InvalidArgument, "bad continuation token"))?,
            ),
            (None, Some(s)) => Some(s.as_bytes().to_vec()),
            (None, None) => None,
        };
        let prefix = input.prefix.clone().unwrap_or_default();
        let max = input.max_keys.unwrap_or(1000).clamp(0, 1000) as usize;
        let mut page = self
            .list(
                &input.bucket,
                &prefix,
                input.delimiter.as_deref(),
                after,
                max,
            )
            .await?;
        let key_count = (page.objects.len() + page.prefixes.len()) as i32;
        // With encoding-type=url (which the AWS CLI and boto3 always ask
        // for, and then decode), keys, prefixes, the delimiter and
        // start-after go out percent-encoded: a key "a+b c" sent raw would
        // be read back as "a b c".
        let encode = url_encoded(input.encoding_type.as_ref());
        let shown = |v| url_encoded_if(encode, v);
        let (delimiter, start_after) = (shown(input.delimiter), shown(input.start_after));
        let shown_prefix = encode_page(&mut page, input.encoding_type.as_ref(), input.prefix);
        Ok(S3Response::new(ListObjectsV2Output {
            name: Some(input.bucket),
            prefix: shown_prefix,
            delimiter,
            max_keys: Some(max as i32),
            key_count: Some(key_count),
            is_truncated: Some(page.next.is_some()),
            next_continuation_token: page.next.map(hex::encode),
            continuation_token: input.continuation_token,
            start_after,
            encoding_type: input.encoding_type,
            contents: Some(page.objects),
            common_prefixes: Some(page.prefixes),
            ..Default::default()
        }))
    }

    async fn list_objects(
        &self,
        req: S3Request<ListObjectsInput>,
    ) -> S3Result<S3Response<ListObjectsOutput>> {
        let who = self.caller(&req, Role::Reader).await?;
        let input = req.input;
        self.bucket(&who, &input.bucket).await?;
        let prefix = input.prefix.clone().unwrap_or_default();
        let max = input.max_keys.unwrap_or(1000).clamp(0, 1000) as usize;
        // A marker that is a common prefix (what a page ending in one gives
        // as NextMarker) resumes after every key under it, not at its
        // first key (which would fold into the same prefix again).
        let after = input.marker.as_ref().map(|m| {
            let mut after = m.as_bytes().to_vec();
            let folds = input
                .delimiter
                .as_deref()
                .filter(|d| !d.is_empty())
                .is_some_and(|d| {
                    m.starts_with(&prefix)
                        && m[prefix.len()..].ends_with(d)
                        && m[prefix.len()..].find(d) == Some(m.len() - prefix.len() - d.len())
                });
            if folds {
                after.push(0xFF);
            }
            after
        });
        let mut page = self
            .list(
                &input.bucket,
                &prefix,
                input.delimiter.as_deref(),
                after,
                max,
            )
            .await?;
        // V1 gives NextMarker only with a delimiter; clients otherwise use
        // the last key. Both are the last key or common prefix returned.
        let next_marker = page.next.as_ref().and_then(|_| {
            let last_key = page.objects.last().and_then(|o| o.key.clone());
            let last_prefix = page.prefixes.last().and_then(|p| p.prefix.clone());
            last_key.max(last_prefix)
        });
        // Encoded as V2 encodes: the marker and the delimiter too (botocore
        // decodes every one of them when it asked for the encoding).
        let encode = url_encoded(input.encoding_type.as_ref());
        let shown = |v| url_encoded_if(encode, v);
        let next_marker = shown(next_marker);
        let has_delimiter = input.delimiter.is_some();
        let (delimiter, marker) = (shown(input.delimiter), shown(input.marker));
        let shown_prefix = encode_page(&mut page, input.encoding_type.as_ref(), input.prefix);
        Ok(S3Response::new(ListObjectsOutput {
            name: Some(input.bucket),
            prefix: shown_prefix,
            marker,
            delimiter,
            max_keys: Some(max as i32),
            is_truncated: Some(page.next.is_some()),
            next_marker: next_marker.filter(|_| has_delimiter),
            encoding_type: input.encoding_type,
            contents: Some(page.objects),
            common_prefixes: Some(page.prefixes),
            ..Default::default()
        }))
    }
}

/// `v` as a listing shows it: percent-encoded when `encode` (the request's
/// `encoding-type=url`), else as it is.
fn url_encoded_if(encode: bool, v: Option<String>) -> Option<String> {
    match encode {
        true => v.as_deref().map(url_encode),
        false => v,
    }
}

/// S3's `encoding-type=url`: keys and prefixes percent-encoded, '/' and the
/// unreserved characters kept (clients decode what they asked to be
/// encoded; the AWS CLI always asks).
fn url_encode(s: &str) -> String {
    use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
    const KEEP: &AsciiSet = &NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'_')
        .remove(b'.')
        .remove(b'~')
        .remove(b'/');
    utf8_percent_encode(s, KEEP).to_string()
}

fn url_encoded(encoding: Option<&EncodingType>) -> bool {
    encoding.is_some_and(|e| e.as_str() == EncodingType::URL)
}

/// Applies `encoding-type=url` to a page and returns the prefix to echo.
fn encode_page(
    page: &mut Page,
    encoding: Option<&EncodingType>,
    prefix: Option<String>,
) -> Option<String> {
    if !url_encoded(encoding) {
        return prefix;
    }
    for o in &mut page.objects {
        o.key = o.key.as_deref().map(url_encode);
    }
    for p in &mut page.prefixes {
        p.prefix = p.prefix.as_deref().map(url_encode);
    }
    prefix.as_deref().map(url_encode)
}

/// A copy's source, read [`cancellable`] until the guard returned with it
/// is dropped (with the request's future: its client left).
fn while_client_here<B, E>(
    body: B,
) -> (
    impl futures::Stream<Item = Result<bytes::Bytes, String>> + Send + 'static,
    tokio_util::sync::DropGuard,
)
where
    B: futures::Stream<Item = Result<bytes::Bytes, E>> + Send + Unpin + 'static,
    E: std::fmt::Display,
{
    let client_here = tokio_util::sync::CancellationToken::new();
    let guard = client_here.clone().drop_guard();
    (cancellable(body, client_here), guard)
}

/// `body`, failing once `client_here` is cancelled (the request's future
/// dropped: its client left). A copy's filing runs in a task of its own so
/// that it cleans up after itself; without this it would also run on to
/// file a copy nobody is waiting for (which a client's retry files again).
fn cancellable<B, E>(
    body: B,
    client_here: tokio_util::sync::CancellationToken,
) -> impl futures::Stream<Item = Result<bytes::Bytes, String>> + Send + 'static
where
    B: futures::Stream<Item = Result<bytes::Bytes, E>> + Send + Unpin + 'static,
    E: std::fmt::Display,
{
    futures::stream::unfold(Some((body, client_here)), |state| async move {
        let (mut body, client_here) = state?;
        tokio::select! {
            biased;
            () = client_here.cancelled() => Some((
                Err("the client left: the copy is cancelled".to_owned()),
                None,
            )),
            item = body.next() => {
                let item = item?.map_err(|e| e.to_string());
                Some((item, Some((body, client_here))))
            }
        }
    })
}

/// A part number as S3 allows it: 1 to 10000.
fn part_number(n: i32) -> S3Result<u32> {
    u32::try_from(n)
        .ok()
        .filter(|n| (1..=10_000).contains(n))
        .ok_or_else(|| s3_error!(InvalidArgument, "part numbers are 1 to 10000"))
}

/// `x-amz-copy-source-range`: `bytes=FIRST-LAST`, both inclusive and both
/// required, inside the source object.
fn copy_range(spec: &str, size: u64) -> S3Result<std::ops::Range<u64>> {
    let parsed = spec
        .strip_prefix("bytes=")
        .and_then(|r| r.split_once('-'))
        .and_then(|(a, b)| Some((a.parse::<u64>().ok()?, b.parse::<u64>().ok()?)));
    // S3's codes and words: InvalidArgument (400) for both, not GET's 416.
    match parsed {
        Some((first, last)) if first <= last && last < size => Ok(first..last + 1),
        Some(_) => Err(s3_error!(
            InvalidArgument,
            "Range specified is not valid for source object of size: {size}"
        )),
        None => Err(s3_error!(
            InvalidArgument,
            "The x-amz-copy-source-range value must be of the form bytes=first-last where \
             first and last are the zero-based offsets of the first and last bytes to copy"
        )),
    }
}

/// The bytes a GET or HEAD `Range` selects of an object of `size`; `None`
/// without one. Nothing to select (a suffix range of an empty object) is not
/// satisfiable either: 416 `InvalidRange`, with the size, as RFC 9110 asks.
fn object_range(range: Option<&Range>, size: u64) -> S3Result<Option<std::ops::Range<u64>>> {
    let Some(r) = range else {
        return Ok(None);
    };
    r.check(size)
        .ok()
        .filter(|r| !r.is_empty())
        .map(Some)
        .ok_or_else(|| {
            let mut e = s3_error!(InvalidRange);
            with_headers(&mut e, &[("content-range", format!("bytes */{size}"))]);
            e
        })
}

/// The `Content-Range` of a ranged answer.
fn content_range(range: Option<&std::ops::Range<u64>>, size: u64) -> Option<String> {
    range.map(|r| format!("bytes {}-{}/{}", r.start, r.end.saturating_sub(1), size))
}

/// Deletes a part queued for deletion (see `ix::parts_to_delete_tx`): its
/// shards, then its stripe records, and, once every one is gone, the queue
/// entry. What is left (a node unreachable) the collector finishes; run
/// twice, the second finds nothing to delete.
pub(crate) async fn delete_part<S: Store>(gw: &Gateway<S>, part: EvidenceId) {
    let done = crate::gc::delete_recorded_stripes(
        gw,
        part,
        |tx, gone| async move {
            schema::forget_part_stripes_tx(&tx, part, &gone);
            Ok(())
        },
        &mut Vec::new(),
    )
    .await;
    match done {
        Ok(0) => {
            let cleared = indexer::run(&gw.store, |tx| async move {
                ix::part_deleted_tx(&tx, part);
                Ok::<_, ObjectError>(())
            })
            .await;
            if let Err(e) = cleared {
                tracing::debug!(%part, error = %e, "a deleted part stays queued; the collector clears it");
            }
        }
        Ok(kept) => {
            tracing::warn!(%part, stripes = kept, "some shards of a multipart part could not be deleted yet; the collector retries")
        }
        Err(e) => {
            tracing::warn!(%part, error = %e, "could not delete a multipart part yet; the collector retries")
        }
    }
}

/// Deletes `parts` in a task of its own: the records that referred to them
/// are gone, and a client that leaves (dropping the request's future) must
/// not cut the deletion short. Each is queued too, so a crash is covered.
fn delete_parts_later<S: Store>(gw: &Arc<Gateway<S>>, parts: Vec<ix::PartRecord>) {
    if parts.is_empty() {
        return;
    }
    let gw = gw.clone();
    tokio::spawn(async move {
        for p in &parts {
            delete_part(&gw, p.part_id).await;
        }
    });
}

/// Where a version listing resumes (owned; see `ix::VersionsAfter`).
#[derive(Clone)]
enum Cursor {
    Start,
    Version(String, Option<EvidenceId>),
    Prefix(String),
    KeyStart(String),
}

/// The common prefix `key` folds into: `prefix` and the rest of `key` up
/// to and including the first `delimiter` after it; none without one.
fn common_prefix(prefix: &str, delimiter: Option<&str>, key: &str) -> Option<String> {
    let rest = key.strip_prefix(prefix)?;
    let d = delimiter.filter(|d| !d.is_empty())?;
    rest.find(d)
        .map(|i| format!("{prefix}{}", &rest[..i + d.len()]))
}

/// One page of a listing.
struct Page {
    objects: Vec<Object>,
    prefixes: Vec<CommonPrefix>,
    /// Where the next page starts (exclusive key bytes), if truncated.
    next: Option<Vec<u8>>,
}

impl<S: Store> S3Front<S> {
    /// Lists current objects after `after`, folding keys that contain
    /// `delimiter` past `prefix` into common prefixes; at most `max` entries
    /// (objects and prefixes together).
    async fn list(
        &self,
        bucket: &str,
        prefix: &str,
        delimiter: Option<&str>,
        mut after: Option<Vec<u8>>,
        max: usize,
    ) -> S3Result<Page> {
        let delimiter = delimiter.filter(|d| !d.is_empty());
        let mut page = Page {
            objects: Vec::new(),
            prefixes: Vec::new(),
            next: None,
        };
        if max == 0 {
            return Ok(page);
        }
        loop {
            let (b, p) = (bucket.to_owned(), prefix.to_owned());
            let rows = indexer::run(&self.gw.store, |tx| {
                let (b, p, after) = (&b, &p, &after);
                async move { ix::list_current_tx(&tx, b, p, after.as_deref(), LIST_BATCH).await }
            })
            .await
            .map_err(|e| s3_err(e.into()))?;
            let full_batch = rows.len() == LIST_BATCH;
            let mut cut = false;
            for (key, v) in rows {
                if page.objects.len() + page.prefixes.len() == max {
                    // A row remains: the listing is truncated here.
                    page.next = after;
                    return Ok(page);
                }
                if let Some(common) = common_prefix(prefix, delimiter, &key) {
                    // Continue after every key under this common prefix;
                    // the rest of this batch may be under it: read again.
                    let mut skip = common.clone().into_bytes();
                    skip.push(0xff);
                    after = Some(skip);
                    page.prefixes.push(CommonPrefix {
                        prefix: Some(common),
                    });
                    cut = true;
                    break;
                }
                after = Some(key.clone().into_bytes());
                page.objects.push(Object {
                    key: Some(key),
                    size: Some(v.size as i64),
                    e_tag: Some(ETag::Strong(v.etag)),
                    last_modified: Some(ms_to_ts(v.last_modified_ms)),
                    storage_class: Some(ObjectStorageClass::from_static(
                        ObjectStorageClass::STANDARD,
                    )),
                    ..Default::default()
                });
            }
            if !cut && !full_batch {
                return Ok(page);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    /// A tampered signed chunk is answered as such (403), malformed framing
    /// as a malformed request, a body cut short as incomplete.
    #[test]
    fn aws_chunked_failures_are_named_for_what_they_are() {
        use crate::error::ApiError;
        for (said, code, status) in [
            (
                "AwsChunkedStreamError: SignatureMismatch",
                "SignatureDoesNotMatch",
                403,
            ),
            ("AwsChunkedStreamError: FormatError", "InvalidRequest", 400),
            ("AwsChunkedStreamError: Incomplete", "IncompleteBody", 400),
        ] {
            let e = super::s3_err(ApiError::BodyIncomplete(said.into()));
            assert_eq!(e.code().as_str(), code, "{said}");
            assert_eq!(e.status_code().map(|s| s.as_u16()), Some(status), "{said}");
        }
    }

    /// `aws-chunked` is how a request was framed, never the object's
    /// encoding; what else it names is kept.
    #[test]
    fn aws_chunked_is_not_the_objects_encoding() {
        for (sent, kept) in [
            (None, None),
            (Some("aws-chunked"), None),
            (Some("AWS-Chunked"), None),
            (Some("gzip,aws-chunked"), Some("gzip")),
            (Some("aws-chunked, gzip"), Some("gzip")),
            (Some("gzip, br"), Some("gzip, br")),
            (Some("identity"), Some("identity")),
        ] {
            assert_eq!(super::object_encoding(sent).as_deref(), kept, "{sent:?}");
        }
    }

    use super::{
        copy_range, http_date, if_range_holds, ms_to_ts, shown_retention, ts_to_ms, unmet,
        Conditions, LockMode, Retention, Unmet, LATEST_TS_MS,
    };
    use s3s::dto::{ETag, ETagCondition};

    /// A copy's source read through `cancellable` passes on as it is, and
    /// fails (not ends, which would file a short copy) once its client
    /// leaves.
    #[tokio::test]
    async fn a_copy_whose_client_left_fails() {
        use futures::StreamExt as _;
        let chunks = futures::stream::iter([Ok::<_, String>(bytes::Bytes::from_static(b"ab"))]);
        let whole: Vec<_> = super::cancellable(chunks, Default::default())
            .collect()
            .await;
        assert_eq!(whole, [Ok(bytes::Bytes::from_static(b"ab"))]);
        // A source still being read when the client leaves.
        let client_here = tokio_util::sync::CancellationToken::new();
        let guard = client_here.clone().drop_guard();
        let slow = futures::stream::pending::<Result<bytes::Bytes, String>>();
        let mut body = Box::pin(super::cancellable(slow, client_here));
        drop(guard);
        assert!(matches!(body.next().await, Some(Err(_))));
        assert!(body.next().await.is_none());
    }

    /// An upload GC aborted is the server's failure (503, retry), however
    /// the index's refusal came wrapped; evidence expunged under a change
    /// is not found. Neither is an internal error.
    #[test]
    fn the_index_refusals_map_to_s3_codes() {
        use crate::error::ApiError;
        use indexer::s3::ObjectError;
        use indexer::schema::SchemaError;
        use s3s::S3ErrorCode as C;
        let id = protocol::EvidenceId([3; 16]);
        let cases = [
            (
                ApiError::Index(SchemaError::IntentAborted(id)),
                C::ServiceUnavailable,
                503,
            ),
            (
                ApiError::Index(SchemaError::NoIntent(id)),
                C::ServiceUnavailable,
                503,
            ),
            (
                ApiError::Object(ObjectError::Schema(SchemaError::IntentAborted(id))),
                C::ServiceUnavailable,
                503,
            ),
            (
                ApiError::Index(SchemaError::NoEvidence(id)),
                C::NoSuchKey,
                404,
            ),
        ];
        for (e, code, status) in cases {
            let what = e.to_string();
            let err = super::s3_err(e);
            assert_eq!(*err.code(), code, "{what}");
            let got = err
                .status_code()
                .unwrap_or_else(|| code.status_code().unwrap());
            assert_eq!(got.as_u16(), status, "{what}");
        }
    }

    /// A one-byte version with this ETag, last modified then.
    fn version_tagged(etag: &str, last_modified_ms: u64) -> indexer::s3::ObjectVersion {
        indexer::s3::ObjectVersion {
            version_id: protocol::EvidenceId([1; 16]),
            null_version: false,
            evidence: None,
            size: 1,
            etag: etag.into(),
            last_modified_ms,
            content_type: None,
            user_metadata: Vec::new(),
            retention: None,
            legal_hold: false,
            content: Default::default(),
        }
    }

    /// A Range applies under If-Range only if it names the object as it
    /// is: its strong ETag (a date is too weak a validator for a key that
    /// may be written twice within a second).
    #[test]
    fn if_range_names_the_object_as_it_is() {
        let v = version_tagged("abc", 1_796_000_000_500);
        let holds = |value: Option<&str>| {
            let mut h = http::HeaderMap::new();
            if let Some(value) = value {
                h.insert(http::header::IF_RANGE, value.parse().unwrap());
            }
            if_range_holds(&h, &v)
        };
        assert!(holds(None));
        assert!(holds(Some("\"abc\"")));
        assert!(!holds(Some("\"xyz\"")));
        assert!(!holds(Some("W/\"abc\"")), "weak tags never match");
        // A date never: two writes within its second share it.
        assert!(!holds(Some(&http_date(1_796_000_000_000))));
        assert!(!holds(Some(&http_date(1_795_999_999_000))));
        assert!(!holds(Some("yesterday")));
    }

    /// GET's and a copy source's conditions in RFC 9110's order, dates to
    /// the second (as Last-Modified is sent).
    #[test]
    fn conditional_reads_follow_the_rfc_order() {
        let v = version_tagged("abc", 10_500);
        let (right, wrong) = (
            ETagCondition::ETag(ETag::Strong("abc".into())),
            ETagCondition::ETag(ETag::Strong("xyz".into())),
        );
        let (before, same, after) = (ms_to_ts(9_000), ms_to_ts(10_000), ms_to_ts(11_000));
        let c = |m, n, ims, ius| Conditions {
            if_match: m,
            if_none_match: n,
            if_modified_since: ims,
            if_unmodified_since: ius,
        };
        assert_eq!(unmet(&v, Conditions::default()), None);
        assert_eq!(
            unmet(&v, c(None, None, None, Some(&before))),
            Some(Unmet::Precondition)
        );
        assert_eq!(unmet(&v, c(None, None, None, Some(&same))), None);
        // If-Match decides over If-Unmodified-Since.
        assert_eq!(unmet(&v, c(Some(&right), None, None, Some(&before))), None);
        assert_eq!(
            unmet(&v, c(Some(&wrong), None, None, None)),
            Some(Unmet::Precondition)
        );
        assert_eq!(
            unmet(&v, c(None, None, Some(&same), None)),
            Some(Unmet::NotModified)
        );
        assert_eq!(
            unmet(&v, c(None, None, Some(&after), None)),
            Some(Unmet::NotModified)
        );
        assert_eq!(unmet(&v, c(None, None, Some(&before), None)), None);
        // If-None-Match decides over If-Modified-Since.
        assert_eq!(unmet(&v, c(None, Some(&wrong), Some(&after), None)), None);
        assert_eq!(
            unmet(&v, c(None, Some(&right), None, None)),
            Some(Unmet::NotModified)
        );
        // Lists, as s3s hands them over (one odd entity-tag), and weak
        // tags: If-Match compares strongly, If-None-Match weakly.
        let parsed = |h: &str| ETagCondition::parse_http_header(h.as_bytes()).expect(h);
        let (list, none_of, weak) = (
            parsed(r#""xyz", "abc""#),
            parsed(r#""xyz", W/"def""#),
            parsed(r#"W/"abc""#),
        );
        assert_eq!(unmet(&v, c(Some(&list), None, None, None)), None);
        assert_eq!(
            unmet(&v, c(Some(&none_of), None, None, None)),
            Some(Unmet::Precondition)
        );
        assert_eq!(
            unmet(&v, c(Some(&weak), None, None, None)),
            Some(Unmet::Precondition)
        );
        assert_eq!(
            unmet(&v, c(None, Some(&list), None, None)),
            Some(Unmet::NotModified)
        );
        assert_eq!(
            unmet(&v, c(None, Some(&weak), None, None)),
            Some(Unmet::NotModified)
        );
        assert_eq!(unmet(&v, c(None, Some(&none_of), None, None)), None);
    }

    /// A version shows its evidence's COMPLIANCE retention where that ends
    /// later, or over GOVERNANCE while it lasts; otherwise its own.
    #[test]
    fn a_version_shows_the_retention_that_binds_it() {
        let mut v = indexer::s3::ObjectVersion {
            version_id: protocol::EvidenceId([1; 16]),
            null_version: false,
            evidence: None,
            size: 1,
            etag: "abc".into(),
            last_modified_ms: 0,
            content_type: None,
            user_metadata: Vec::new(),
            retention: None,
            legal_hold: false,
            content: Default::default(),
        };
        let mut h = protocol::ManifestHeader {
            evidence: protocol::EvidenceId([1; 16]),
            tenant: "t".into(),
            case: None,
            blake3: protocol::Blake3Hash([0; 32]),
            sha256: protocol::Sha256Hash([0; 32]),
            size: 1,
            media_type: None,
            file_name: None,
            submitter: None,
            filed_at_ms: 0,
            code: protocol::ErasureCode::new(4, 2, 4096).expect("code"),
            stripes: 1,
            retain_until_ms: None,
            legal_hold: false,
        };
        let r = |mode, until_ms| Some(Retention { mode, until_ms });
        let now = 1_000;
        assert_eq!(shown_retention(&v, &h, now), None);
        h.retain_until_ms = Some(5_000);
        assert_eq!(shown_retention(&v, &h, now), r(LockMode::Compliance, 5_000));
        v.retention = r(LockMode::Compliance, 9_000);
        assert_eq!(shown_retention(&v, &h, now), r(LockMode::Compliance, 9_000));
        v.retention = r(LockMode::Governance, 9_000);
        assert_eq!(shown_retention(&v, &h, now), r(LockMode::Compliance, 5_000));
        assert_eq!(
            shown_retention(&v, &h, 6_000),
            r(LockMode::Governance, 9_000)
        );
    }

    /// A retain-until date past year 9999 (a default retention of many
    /// days, say) shows as the latest date instead of panicking the request.
    #[test]
    fn timestamps_past_year_9999_are_shown_as_its_end() {
        assert_eq!(ts_to_ms(ms_to_ts(1_000)), 1_000);
        assert_eq!(ts_to_ms(ms_to_ts(LATEST_TS_MS)), LATEST_TS_MS);
        assert_eq!(ts_to_ms(ms_to_ts(u64::MAX)), LATEST_TS_MS);
    }

    #[test]
    fn copy_source_ranges_are_inclusive_and_inside_the_source() {
        assert_eq!(copy_range("bytes=0-0", 10).ok(), Some(0..1));
        assert_eq!(copy_range("bytes=3-9", 10).ok(), Some(3..10));
        for bad in [
            "bytes=3-10",
            "bytes=5-4",
            "bytes=-4",
            "bytes=4-",
            "3-4",
            "bytes=a-b",
        ] {
            assert!(copy_range(bad, 10).is_err(), "{bad} was accepted");
        }
    }
}
