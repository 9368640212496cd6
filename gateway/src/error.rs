//! Every gateway error, and its HTTP status and JSON body, in one place.
//!
//! Clients always get `{"error": "<stable code>", "message": "<human text>"}`;
//! quorum failures are 503 so clients retry, never a bare 500 or a panic.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use indexer::s3::ObjectError;
use indexer::schema::SchemaError;
use indexer::{KvError, Retryable};

/// What went wrong with an API call.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No or malformed `Authorization: Bearer` header, or an unknown token.
    #[error("missing or invalid bearer token")]
    Unauthorized,
    /// The token is valid but its role may not do this.
    #[error("this credential's role may not {0}")]
    Forbidden(&'static str),
    /// No such evidence for this tenant (other tenants' evidence is invisible).
    #[error("no such evidence")]
    NotFound,
    /// A credential to revoke that does not exist.
    #[error("no such credential")]
    NoSuchCredential,
    /// A node id neither this gateway's configuration nor the index knows.
    #[error("node {0} is neither in this gateway's configuration (cluster.toml) nor in the index")]
    NoSuchNode(protocol::NodeId),
    /// A malformed header, id, query or range.
    #[error("{0}")]
    BadRequest(String),
    /// A body this API would store as something other than what was meant
    /// (compressed, or a form's envelope around a file): nothing was filed.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// The content does not match the hash the filer computed at acquisition.
    #[error("content {algorithm} is {actual}, the filer declared {declared}")]
    HashMismatch {
        algorithm: &'static str,
        declared: String,
        actual: String,
    },
    /// A Range outside the content.
    #[error("range not satisfiable for {size} bytes")]
    RangeNotSatisfiable { size: u64 },
    /// An If-Match or If-Unmodified-Since the evidence does not meet.
    #[error("the evidence does not meet the request's If-Match or If-Unmodified-Since")]
    PreconditionFailed,
    /// The same Idempotency-Key names an upload still in flight (or one a
    /// crash cut off, until GC aborts it): retry after `retry_after_s`.
    #[error("an upload with this Idempotency-Key is still in progress ({evidence}); send the same request again after {retry_after_s} s: it answers with that filing once it is made, or files anew if it was cut off")]
    UploadInProgress {
        evidence: String,
        retry_after_s: u64,
    },
    /// The Idempotency-Key names an earlier filing that this request does
    /// not repeat (other content or metadata): nothing was filed.
    #[error("this Idempotency-Key was used for evidence {evidence}, filed with another {what}; use a new key to file this")]
    IdempotencyMismatch { evidence: String, what: String },
    /// The request conflicts with the cluster's state (for example removing
    /// a node that still holds shards).
    #[error("{0}")]
    Conflict(String),
    /// The client's body ended or failed before it was complete.
    #[error("the upload body was cut off: {0}")]
    BodyIncomplete(String),
    /// The client sent no body bytes for this long: the upload is abandoned
    /// rather than holding its buffers and intent for as long as the client
    /// keeps the connection open.
    #[error("no body bytes arrived for {} s; the upload was abandoned (send again)", .0.as_secs_f64())]
    BodyIdle(std::time::Duration),
    /// Not enough storage nodes answered to store or read the data durably.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    /// Too few nodes have room for a stripe's shards (they are at their
    /// free-space reserve); nothing was filed.
    #[error("insufficient storage: {0}")]
    InsufficientStorage(String),
    /// The evidence was expunged by court order: its bytes are gone.
    #[error("this evidence was expunged; its receipt and custody record remain")]
    Gone,
    /// No signed checkpoint covers the statement yet.
    #[error(
        "the receipt is not ready yet: no signed checkpoint covers the statement; retry shortly"
    )]
    ReceiptPending,
    /// A small request body that is too large or could not be read.
    #[error("request body: {0}")]
    Body(#[from] axum::extract::rejection::BytesRejection),
    /// The index failed.
    #[error("index: {0}")]
    Index(#[from] SchemaError),
    /// A bucket or object record refused the change (S3 API).
    #[error("{0}")]
    Object(#[from] ObjectError),
    /// The body's MD5 is not the Content-MD5 the client sent.
    #[error("the body's MD5 does not match Content-MD5")]
    BadDigest,
    /// The body does not match an `x-amz-checksum-*` the client sent.
    #[error("{0}")]
    ChecksumMismatch(String),
    /// A bug or an unexpected failure; details are in the gateway's log.
    #[error("internal error")]
    Internal,
}

impl From<KvError> for ApiError {
    fn from(e: KvError) -> Self {
        ApiError::Index(SchemaError::Kv(e))
    }
}

impl Retryable for ApiError {
    fn is_retryable(&self) -> bool {
        match self {
            ApiError::Index(e) => e.is_retryable(),
            ApiError::Object(e) => e.is_retryable(),
            _ => false,
        }
    }
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound | ApiError::NoSuchCredential | ApiError::NoSuchNode(_) => {
                StatusCode::NOT_FOUND
            }
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::HashMismatch { .. } | ApiError::IdempotencyMismatch { .. } => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            ApiError::RangeNotSatisfiable { .. } => StatusCode::RANGE_NOT_SATISFIABLE,
            ApiError::PreconditionFailed => StatusCode::PRECONDITION_FAILED,
            ApiError::UploadInProgress { .. } | ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::BodyIncomplete(_) => StatusCode::BAD_REQUEST,
            ApiError::BodyIdle(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::Body(r) => r.status(),
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::InsufficientStorage(_) => StatusCode::INSUFFICIENT_STORAGE,
            ApiError::ReceiptPending => StatusCode::ACCEPTED,
            ApiError::Gone => StatusCode::GONE,
            ApiError::Index(SchemaError::Locked(_)) => StatusCode::CONFLICT,
            ApiError::Index(SchemaError::NoEvidence(_)) => StatusCode::NOT_FOUND,
            ApiError::Index(SchemaError::BadTenant) => StatusCode::BAD_REQUEST,
            ApiError::Index(SchemaError::AdminOutsideOperators) => StatusCode::FORBIDDEN,
            // Aborted, or aborted and already collected: the same to the
            // filer. Only GC aborts an upload under way, when its lease went
            // unrenewed (this gateway stalled, or could not reach the
            // index): the server's failure, not the request's, and a retry
            // (with the same Idempotency-Key) files afresh. 409 would tell
            // clients not to retry.
            ApiError::Index(SchemaError::IntentAborted(_) | SchemaError::NoIntent(_)) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::Index(e) if e.is_retryable() || unavailable(e) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::Object(ObjectError::Schema(SchemaError::AdminOutsideOperators)) => {
                StatusCode::FORBIDDEN
            }
            ApiError::Object(ObjectError::Schema(SchemaError::BadTenant)) => {
                StatusCode::BAD_REQUEST
            }
            ApiError::Object(ObjectError::Schema(e)) if e.is_retryable() || unavailable(e) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::Object(ObjectError::Locked(_) | ObjectError::Conflict(_)) => {
                StatusCode::CONFLICT
            }
            ApiError::Object(ObjectError::Schema(_) | ObjectError::Journal(_)) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
            ApiError::Object(ObjectError::BucketExists { .. }) => StatusCode::CONFLICT,
            ApiError::Object(ObjectError::BucketNotEmpty) => StatusCode::CONFLICT,
            ApiError::Object(ObjectError::BadName(_) | ObjectError::TooManyBuckets) => {
                StatusCode::BAD_REQUEST
            }
            ApiError::Object(_) => StatusCode::NOT_FOUND,
            ApiError::BadDigest | ApiError::ChecksumMismatch(_) => StatusCode::BAD_REQUEST,
            ApiError::Index(_) | ApiError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// A stable, machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::Unauthorized => "unauthorized",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::NotFound => "not_found",
            ApiError::NoSuchCredential => "no_such_credential",
            ApiError::NoSuchNode(_) => "no_such_node",
            ApiError::BadRequest(_) => "bad_request",
            ApiError::UnsupportedMediaType(_) => "unsupported_media_type",
            ApiError::HashMismatch { .. } => "hash_mismatch",
            ApiError::RangeNotSatisfiable { .. } => "range_not_satisfiable",
            ApiError::PreconditionFailed => "precondition_failed",
            ApiError::UploadInProgress { .. } => "upload_in_progress",
            ApiError::IdempotencyMismatch { .. } => "idempotency_key_reused",
            ApiError::Conflict(_) => "conflict",
            ApiError::BodyIncomplete(_) => "body_incomplete",
            ApiError::BodyIdle(_) => "body_timeout",
            ApiError::Body(r) if r.status() == StatusCode::PAYLOAD_TOO_LARGE => "body_too_large",
            ApiError::Body(_) => "bad_body",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::InsufficientStorage(_) => "insufficient_storage",
            ApiError::ReceiptPending => "receipt_pending",
            ApiError::Gone => "expunged",
            ApiError::Index(SchemaError::Locked(_)) => "locked",
            ApiError::Index(SchemaError::NoEvidence(_)) => "not_found",
            ApiError::Index(SchemaError::BadTenant) => "bad_tenant",
            ApiError::Index(SchemaError::AdminOutsideOperators) => "forbidden",
            ApiError::Index(SchemaError::IntentAborted(_) | SchemaError::NoIntent(_)) => {
                "upload_aborted"
            }
            ApiError::Index(e) if unavailable(e) => "index_unavailable",
            ApiError::Index(_) => "index_error",
            ApiError::Object(ObjectError::Locked(_)) => "locked",
            ApiError::Object(ObjectError::Schema(SchemaError::AdminOutsideOperators)) => {
                "forbidden"
            }
            ApiError::Object(ObjectError::Schema(SchemaError::BadTenant)) => "bad_tenant",
            ApiError::Object(ObjectError::Conflict(_)) => "conflict",
            ApiError::Object(ObjectError::NoSuchTenant) => "no_such_tenant",
            ApiError::Object(ObjectError::BadName(_)) => "bad_name",
            ApiError::Object(ObjectError::TooManyBuckets) => "too_many_buckets",
            ApiError::Object(ObjectError::Schema(e)) if unavailable(e) => "index_unavailable",
            ApiError::Object(ObjectError::Schema(_) | ObjectError::Journal(_)) => "index_error",
            ApiError::Object(_) => "not_found",
            ApiError::BadDigest | ApiError::ChecksumMismatch(_) => "bad_digest",
            ApiError::Internal => "internal",
        }
    }
}

/// The index's storage failed (a disk full or failing, the store closing):
/// the service is unavailable, as `/healthz` says, not broken by the
/// request; a retry (with the same Idempotency-Key, for a filing whose
/// commit may or may not have landed) is what the client should do.
fn unavailable(e: &SchemaError) -> bool {
    matches!(e, SchemaError::Kv(KvError::Storage(_) | KvError::Closed))
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        // The index's storage failing, or an upload it aborted: a retry in
        // a moment is what fixes it (not a gateway kept without a ledger,
        // nor stripes too few nodes hold, which are 503 for as long).
        let retry_soon = match &self {
            ApiError::Index(e) | ApiError::Object(ObjectError::Schema(e)) => {
                unavailable(e)
                    || matches!(e, SchemaError::IntentAborted(_) | SchemaError::NoIntent(_))
            }
            _ => false,
        };
        if status.is_server_error() {
            tracing::error!(error = %self, "request failed");
        } else {
            tracing::debug!(error = %self, "request refused");
        }
        let body = serde_json::json!({ "error": self.code(), "message": self.to_string() });
        let mut resp = (status, axum::Json(body)).into_response();
        if let ApiError::RangeNotSatisfiable { size } = self {
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
                resp.headers_mut().insert(header::CONTENT_RANGE, v);
            }
        }
        if let ApiError::UploadInProgress { retry_after_s, .. } = self {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_s));
        } else if retry_soon {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(1u64));
        }
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A retry of an upload still in flight (or cut off by a crash, until
    /// GC aborts it) is told when to send it again.
    #[test]
    fn an_upload_in_progress_says_when_to_retry() {
        let resp = ApiError::UploadInProgress {
            evidence: "x".into(),
            retry_after_s: 40,
        }
        .into_response();
        assert_eq!(resp.status(), StatusCode::CONFLICT);
        assert_eq!(
            resp.headers()
                .get(header::RETRY_AFTER)
                .map(|v| v.as_bytes()),
            Some(&b"40"[..])
        );
    }

    /// The index's storage failing (a full or failing disk, the store
    /// closing) makes the service unavailable, as /healthz says: 503 with
    /// Retry-After, which clients retry, not a 500 that reads as a bug.
    #[test]
    fn an_index_storage_failure_is_unavailable_not_a_bug() {
        let failed = || SchemaError::Kv(KvError::Storage("disk full".into()));
        for e in [
            ApiError::Index(failed()),
            ApiError::Index(SchemaError::Kv(KvError::Closed)),
            ApiError::Object(ObjectError::Schema(failed())),
        ] {
            assert_eq!(e.status(), StatusCode::SERVICE_UNAVAILABLE, "{e}");
            assert_eq!(e.code(), "index_unavailable");
            let resp = e.into_response();
            assert!(resp.headers().contains_key(header::RETRY_AFTER));
        }
        let broken = ApiError::Index(SchemaError::Decode(protocol::DecodeError::Malformed));
        assert_eq!(broken.status(), StatusCode::INTERNAL_SERVER_ERROR);
        // A 503 that lasts (no ledger kept) says no time to retry at.
        let lasting = ApiError::Unavailable("this gateway keeps no ledger".into()).into_response();
        assert_eq!(lasting.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(!lasting.headers().contains_key(header::RETRY_AFTER));
    }

    /// An upload GC aborted (its lease unrenewed) is the server's failure:
    /// 503, which clients retry, not 409, which they take as final.
    #[test]
    fn an_aborted_upload_is_answered_as_the_servers_failure() {
        let id = protocol::EvidenceId::new(1, [1; 10]);
        for e in [SchemaError::IntentAborted(id), SchemaError::NoIntent(id)] {
            let e = ApiError::Index(e);
            assert_eq!(e.status(), StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(e.code(), "upload_aborted");
        }
    }
}
