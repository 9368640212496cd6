//! Integrity of the XML documents S3 requests carry.
//!
//! A retention, a legal hold, an Object Lock or versioning configuration, a
//! multi-object delete: these arrive as small XML documents that `s3s` parses
//! before the gateway sees them, and `s3s` checks neither `Content-MD5` nor
//! the `x-amz-checksum-*` headers a client sends with them (the object
//! bodies the gateway files are checked as they stream, in `s3.rs`). A
//! retention date damaged on the way must not become a lock that nobody can
//! lift, so such a document's body is hashed as `s3s` reads it (after it has
//! authenticated the request, under its own size limit) and checked against
//! every digest the client sent before `s3s` parses it: a mismatch is
//! `BadDigest` (or `XAmzContentSHA256Mismatch` for the signed payload hash),
//! 400 with S3's XML error body, and nothing is changed. Malformed digest
//! headers are refused up front (`InvalidDigest`, `InvalidRequest`).
//!
//! A document sent aws-chunked is taken only with signed chunks
//! (`STREAMING-AWS4-HMAC-SHA256-PAYLOAD*`), whose signatures `s3s` checks;
//! unsigned chunks (`STREAMING-UNSIGNED-PAYLOAD-TRAILER`) carry their
//! checksum in a trailer nothing here reads, so they are refused (400
//! InvalidRequest). Clients send documents whole.
use bytes::Bytes;
use s3s::crypto::Checksum as _;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

/// Query keys naming a sub-resource whose PUT or POST body is an XML
/// document rather than object data.
const DOCUMENTS: &[&str] = &[
    "acl",
    "cors",
    "delete",
    "encryption",
    "legal-hold",
    "lifecycle",
    "logging",
    "notification",
    "object-lock",
    "ownershipControls",
    "policy",
    "publicAccessBlock",
    "replication",
    "retention",
    "tagging",
    "versioning",
    "website",
];

const CONTENT_MD5: &str = "content-md5";

/// The checksum headers S3 defines beside `Content-MD5`.
pub(crate) const CHECKSUMS: [&str; 5] = [
    "x-amz-checksum-crc32",
    "x-amz-checksum-crc32c",
    "x-amz-checksum-crc64nvme",
    "x-amz-checksum-sha1",
    "x-amz-checksum-sha256",
];

/// Whether the request's body is an XML document (by method and query),
/// sent whole rather than aws-chunked, and carries a digest to check.
pub fn wants_check<B>(req: &http::Request<B>) -> bool {
    let method = req.method();
    if method != http::Method::PUT && method != http::Method::POST {
        return false;
    }
    // CompleteMultipartUpload (POST ?uploadId=) sends its part list as XML.
    let document =
        query_keys(req).any(|k| DOCUMENTS.contains(&k.as_str())) || completes_upload(req);
    let headers = req.headers();
    document && !streaming(headers) && has_digest(headers)
}

/// Whether the body is sent aws-chunked (`STREAMING-*`).
pub(crate) fn streaming(headers: &http::HeaderMap) -> bool {
    headers
        .get("x-amz-content-sha256")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("STREAMING-"))
}

/// Whether the body is sent aws-chunked with each chunk signed.
fn streaming_signed(headers: &http::HeaderMap) -> bool {
    headers
        .get("x-amz-content-sha256")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("STREAMING-AWS4-HMAC-SHA256-PAYLOAD"))
}

/// Whether the request carries a digest of its whole body: `Content-MD5`,
/// an `x-amz-checksum-*` header, or a signed payload SHA-256.
fn has_digest(headers: &http::HeaderMap) -> bool {
    headers.contains_key(CONTENT_MD5)
        || CHECKSUMS.iter().any(|h| headers.contains_key(*h))
        || payload_sha256(headers).is_some()
}

/// An `x-amz-checksum-*` header's value, trimmed, once it is the base64
/// of a checksum of its kind (4 bytes for the CRC32s, 8 for CRC64NVME, 20
/// for SHA-1, 32 for SHA-256): anything else is refused before the body is
/// read, rather than found unequal after all of it.
pub fn checked_checksum_header(name: &str, value: &http::HeaderValue) -> Result<String, Refused> {
    use base64::Engine as _;
    let len = match name {
        "x-amz-checksum-crc32" | "x-amz-checksum-crc32c" => 4,
        "x-amz-checksum-crc64nvme" => 8,
        "x-amz-checksum-sha1" => 20,
        _ => 32,
    };
    value
        .to_str()
        .ok()
        .map(|v| v.trim().to_owned())
        .filter(|v| {
            base64::engine::general_purpose::STANDARD
                .decode(v)
                .is_ok_and(|d| d.len() == len)
        })
        .ok_or_else(|| {
            Refused::new(
                "InvalidRequest",
                format!("{name} must be the base64 of a {}-bit checksum", len * 8),
            )
        })
}

/// Why a document was refused: S3's error code, its status and a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub code: &'static str,
    pub status: http::StatusCode,
    pub message: String,
}

impl Refused {
    fn new(code: &'static str, message: impl Into<String>) -> Self {
        Refused {
            code,
            status: http::StatusCode::BAD_REQUEST,
            message: message.into(),
        }
    }

    /// S3's XML error body for it.
    pub fn xml(&self) -> String {
        let escaped = self
            .message
            .replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;");
        format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{}</Code><Message>{}</Message></Error>",
            self.code, escaped
        )
    }
}

/// The payload's SHA-256 a SigV4 request signed (`x-amz-content-sha256`
/// as 64 hex digits; not `UNSIGNED-PAYLOAD` nor a streaming mode).
fn payload_sha256(headers: &http::HeaderMap) -> Option<[u8; 32]> {
    let v = headers.get("x-amz-content-sha256")?.to_str().ok()?;
    let mut out = [0u8; 32];
    hex::decode_to_slice(v.trim(), &mut out).ok()?;
    Some(out)
}

/// The digests a request sent for its document, hashed as the body passes.
pub struct Digests {
    md5: Option<(md5::Md5, Vec<u8>)>,
    checksum: Option<(&'static str, s3s::checksum::ChecksumHasher, String)>,
    sha256: Option<(sha2::Sha256, [u8; 32])>,
}

impl Digests {
    /// The digests `headers` name. `checksums`: whether the
    /// `x-amz-checksum-*` headers are the body's (for CompleteMultipartUpload
    /// they are the assembled object's, checked when it is assembled). A
    /// malformed `Content-MD5` is `InvalidDigest`; more than one checksum
    /// header `InvalidRequest`, as S3 answers.
    pub fn new(headers: &http::HeaderMap, checksums: bool) -> Result<Self, Refused> {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD;
        let md5 = match headers.get(CONTENT_MD5) {
            None => None,
            Some(sent) => Some(
                sent.to_str()
                    .ok()
                    .and_then(|v| b64.decode(v.trim()).ok())
                    .filter(|v| v.len() == 16)
                    .map(|want| (<md5::Md5 as md5::Digest>::new(), want))
                    .ok_or_else(|| {
                        Refused::new("InvalidDigest", "Content-MD5 is not a base64 MD5")
                    })?,
            ),
        };
        let sent: Vec<(&'static str, &http::HeaderValue)> = CHECKSUMS
            .iter()
            .filter_map(|name| headers.get(*name).map(|v| (*name, v)))
            .collect();
        let checksum = match sent.as_slice() {
            _ if !checksums => None,
            [] => None,
            [(name, value)] => {
                let value = checked_checksum_header(name, value)?;
                Some((*name, checksum_hasher(|n| n == *name), value))
            }
            _ => {
                return Err(Refused::new(
                    "InvalidRequest",
                    "expecting a single x-amz-checksum- header; multiple checksum types are not allowed",
                ))
            }
        };
        let sha256 =
            payload_sha256(headers).map(|want| (<sha2::Sha256 as sha2::Digest>::new(), want));
        Ok(Digests {
            md5,
            checksum,
            sha256,
        })
    }

    pub fn update(&mut self, bytes: &[u8]) {
        if let Some((h, _)) = &mut self.md5 {
            md5::Digest::update(h, bytes);
        }
        if let Some((_, h, _)) = &mut self.checksum {
            h.update(bytes);
        }
        if let Some((h, _)) = &mut self.sha256 {
            sha2::Digest::update(h, bytes);
        }
    }

    /// Whether everything hashed matches: `Content-MD5` and the checksum
    /// first (`BadDigest`), then the signed payload hash.
    ///
    /// `s3s` checks a signed payload's SHA-256 too, but answers a mismatch
    /// with a 500 InternalError (and clients retry it); here it is S3's 400
    /// `XAmzContentSHA256Mismatch`.
    pub fn finish(self) -> Result<(), Refused> {
        if let Some((h, want)) = self.md5 {
            if md5::Digest::finalize(h).as_slice() != want.as_slice() {
                return Err(Refused::new(
                    "BadDigest",
                    "the Content-MD5 you specified did not match what we received",
                ));
            }
        }
        if let Some((name, h, want)) = self.checksum {
            let got = checksum_value(&h.finalize(), name).unwrap_or_default();
            if got != want {
                return Err(Refused::new(
                    "BadDigest",
                    format!("the {name} you specified did not match what we received"),
                ));
            }
        }
        if let Some((h, want)) = self.sha256 {
            if sha2::Digest::finalize(h).as_slice() != want.as_slice() {
                return Err(Refused::new(
                    "XAmzContentSHA256Mismatch",
                    "the provided 'x-amz-content-sha256' header does not match what was computed",
                ));
            }
        }
        Ok(())
    }
}

/// A hasher for the checksums (of [`CHECKSUMS`]) that `want` names.
pub(crate) fn checksum_hasher(want: impl Fn(&str) -> bool) -> s3s::checksum::ChecksumHasher {
    s3s::checksum::ChecksumHasher {
        crc32: want(CHECKSUMS[0]).then(s3s::crypto::Crc32::new),
        crc32c: want(CHECKSUMS[1]).then(s3s::crypto::Crc32c::new),
        crc64nvme: want(CHECKSUMS[2]).then(s3s::crypto::Crc64Nvme::new),
        sha1: want(CHECKSUMS[3]).then(s3s::crypto::Sha1::new),
        sha256: want(CHECKSUMS[4]).then(s3s::crypto::Sha256::new),
    }
}

/// The value a hasher computed for checksum header `name`, as S3 writes it.
pub(crate) fn checksum_value(got: &s3s::dto::Checksum, name: &str) -> Option<String> {
    match name {
        "x-amz-checksum-crc32" => got.checksum_crc32.clone(),
        "x-amz-checksum-crc32c" => got.checksum_crc32c.clone(),
        "x-amz-checksum-crc64nvme" => got.checksum_crc64nvme.clone(),
        "x-amz-checksum-sha1" => got.checksum_sha1.clone(),
        "x-amz-checksum-sha256" => got.checksum_sha256.clone(),
        _ => None,
    }
}

/// Checks a whole `body` against the digests in `headers`.
pub fn check(headers: &http::HeaderMap, body: &[u8], checksums: bool) -> Result<(), Refused> {
    let mut d = Digests::new(headers, checksums)?;
    d.update(body);
    d.finish()
}

/// Where a [`DigestBody`] leaves why it failed, for the answer.
pub type Verdict = Arc<Mutex<Option<Refused>>>;

/// A request body that hashes what passes through it and, at its end,
/// fails (leaving the reason in its [`Verdict`]) when a digest does not
/// match. `s3s` reads a document only after it has authenticated the
/// request and checked access, under its own size limit; it then answers
/// the failure with a 500, which the caller replaces with the verdict.
pub struct DigestBody<B> {
    inner: B,
    digests: Option<Digests>,
    verdict: Verdict,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}: {1}")]
struct BodyRefused(&'static str, String);

/// Fails a checked body: leaves `refused` in `verdict`, for the answer, and
/// returns the body error that stops `s3s` reading (see [`DigestBody`],
/// `s3_chunks::ChunkLimit`).
pub(crate) fn refuse(
    verdict: &Verdict,
    refused: Refused,
) -> Box<dyn std::error::Error + Send + Sync> {
    let failed = BodyRefused(refused.code, refused.message.clone());
    if let Ok(mut v) = verdict.lock() {
        *v = Some(refused);
    }
    Box::new(failed)
}

/// Wraps `req`'s body to be checked; the verdict to look at after the call.
pub fn wrap<B>(req: http::Request<B>) -> Result<(http::Request<DigestBody<B>>, Verdict), Refused> {
    let checksums = !completes_upload(&req);
    let digests = Digests::new(req.headers(), checksums)?;
    let verdict = Verdict::default();
    let req = req.map(|inner| DigestBody {
        inner,
        digests: Some(digests),
        verdict: verdict.clone(),
    });
    Ok((req, verdict))
}

impl<B> http_body::Body for DigestBody<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(d), Some(data)) = (this.digests.as_mut(), frame.data_ref()) {
                    d.update(data);
                }
                // Checked with the last byte, not at the end of the stream:
                // s3s's own SHA-256 check stops reading once it has
                // Content-Length bytes, and would fail first.
                if this.inner.is_end_stream() {
                    if let Err(e) = this.finish() {
                        return Poll::Ready(Some(Err(e)));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => match this.finish() {
                Err(e) => Poll::Ready(Some(Err(e))),
                Ok(()) => Poll::Ready(None),
            },
        }
    }

    /// Not ended until the digests have been checked (a reader that trusts
    /// this would otherwise stop before the check).
    fn is_end_stream(&self) -> bool {
        self.digests.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl<B> DigestBody<B> {
    /// Checks the digests once; a failure is left in the verdict.
    fn finish(&mut self) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        match self.digests.take().map(Digests::finish) {
            Some(Err(refused)) => Err(refuse(&self.verdict, refused)),
            _ => Ok(()),
        }
    }
}

/// CompleteMultipartUpload: its checksum headers are the object's.
fn completes_upload<B>(req: &http::Request<B>) -> bool {
    req.method() == http::Method::POST && query_keys(req).any(|k| k == "uploadId")
}

/// The query keys Signature Version 2 signs (s3s 0.14's list, as AWS's).
const V2_SIGNED_QUERY: [&str; 35] = [
    "accelerate",
    "acl",
    "analytics",
    "cors",
    "defaultObjectAcl",
    "delete",
    "inventory",
    "lifecycle",
    "location",
    "logging",
    "metrics",
    "notification",
    "object-lock",
    "partNumber",
    "policy",
    "replication",
    "requestPayment",
    "response-cache-control",
    "response-content-disposition",
    "response-content-encoding",
    "response-content-language",
    "response-content-type",
    "response-expires",
    "restore",
    "select",
    "select-type",
    "storageClass",
    "tagging",
    "torrent",
    "uploadId",
    "uploads",
    "versionId",
    "versioning",
    "versions",
    "website",
];
/// Headers botocore copies into a SigV2 presigned URL's query (a presigned
/// PUT with a ContentType, Metadata, an ACL): s3s never reads them there
/// (the uploader sends them as headers, which the signature covers), so
/// they act on nothing.
fn v2_header_copy(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    key == "content-type" || key == "content-md5" || key.starts_with("x-amz-")
}

/// A SigV2 presigned URL's own parameters, and `x-id`, which SDKs add to
/// name the operation and which routes no write.
const V2_AUTH_QUERY: [&str; 4] = ["AWSAccessKeyId", "Expires", "Signature", "x-id"];

/// The longest a presigned URL may be valid, as in S3: a week.
pub const MAX_PRESIGNED_SECS: u64 = 7 * 24 * 3600;

/// A refusal for a request signed in a way this gateway does not accept,
/// before s3s sees it (`now_secs`: the time, as Unix seconds):
///
/// - Signature Version 2 in an `Authorization: AWS ...` header: s3s checks
///   no time on it, so a captured request replays for ever.
/// - A presigned URL valid for more than [`MAX_PRESIGNED_SECS`]: SigV4's
///   `X-Amz-Expires` (s3s accepts up to 136 years), or SigV2's absolute
///   `Expires` further than that from now. SigV2 presigned URLs are still
///   taken: boto3 makes them by default for any endpoint but AWS's own.
pub fn auth_refusal<B>(req: &http::Request<B>, now_secs: u64) -> Option<Refused> {
    let v2 = || Refused {
        code: "InvalidRequest",
        status: http::StatusCode::BAD_REQUEST,
        message: "The authorization mechanism you have provided is not supported. \
                  Please use AWS4-HMAC-SHA256."
            .into(),
    };
    // s3s takes any first word of a header for SigV4's (its string to sign
    // always names AWS4-HMAC-SHA256), while the check of the signed
    // `x-amz-*` headers below reads only a header that names it: any other
    // word would pass unsigned headers through.
    if let Some(auth) = req.headers().get(http::header::AUTHORIZATION) {
        if !auth.as_bytes().starts_with(b"AWS4-HMAC-SHA256 ") {
            return Some(v2());
        }
    }
    let too_long = |what: &str| Refused {
        code: "AuthorizationQueryParametersError",
        status: http::StatusCode::BAD_REQUEST,
        message: format!(
            "{what} must be less than a week (in seconds) that is {MAX_PRESIGNED_SECS}"
        ),
    };
    let query = req.uri().query().unwrap_or("");
    let mut v2_presigned = false;
    let mut v4_presigned = false;
    let mut v2_expires = None;
    let mut unsigned_by_v2 = Vec::new();
    let mut signed_seen: Vec<String> = Vec::new();
    for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
        if matches!(
            &*k,
            "X-Amz-Signature" | "X-Amz-Algorithm" | "X-Amz-Credential"
        ) {
            v4_presigned = true;
        }
        if V2_SIGNED_QUERY.contains(&&*k) {
            // s3s signs a subresource given once only (a repeated one drops
            // out of the string to sign, and still routes).
            if signed_seen.iter().any(|s| *s == *k) {
                unsigned_by_v2.push(k.clone().into_owned());
            }
            signed_seen.push(k.clone().into_owned());
        } else if !V2_AUTH_QUERY.contains(&&*k) && !v2_header_copy(&k) {
            unsigned_by_v2.push(k.clone().into_owned());
        }
        match &*k {
            "Signature" | "AWSAccessKeyId" => v2_presigned = true,
            "Expires" => v2_expires = Some(v.parse::<u64>().ok()),
            "X-Amz-Expires" if v.parse::<u64>().map_or(true, |s| s > MAX_PRESIGNED_SECS) => {
                return Some(too_long("X-Amz-Expires"));
            }
            _ => {}
        }
    }
    // As S3: a request authenticates one way. s3s would check the query's
    // signature and act on what a header claims, or the other way round.
    let header_auth = req.headers().contains_key(http::header::AUTHORIZATION);
    if (v2_presigned || v4_presigned) && header_auth || v2_presigned && v4_presigned {
        return Some(Refused::new(
            "InvalidArgument",
            "Only one auth mechanism allowed; only the X-Amz-Algorithm query parameter, \
             Signature query string parameter or the Authorization header should be specified",
        ));
    }
    if v2_presigned {
        match v2_expires {
            Some(Some(at)) if at <= now_secs.saturating_add(MAX_PRESIGNED_SECS) => {}
            Some(Some(_)) => return Some(too_long("Expires, from now,")),
            _ => return Some(v2()),
        }
        // SigV2 signs only the subresources s3s lists: any other query key
        // on a presigned write (`?retention` or `?legal-hold` added to a
        // PUT's URL) would act unsigned. Reads may carry listing
        // parameters, which change nothing.
        let reads = matches!(*req.method(), http::Method::GET | http::Method::HEAD);
        if !reads && !unsigned_by_v2.is_empty() {
            return Some(Refused {
                code: "AccessDenied",
                status: http::StatusCode::FORBIDDEN,
                message: format!(
                    "There were query parameters present in the request which were not signed: {}",
                    unsigned_by_v2.join(", ")
                ),
            });
        }
    }
    let unsigned = unsigned_amz_headers(req);
    if !unsigned.is_empty() {
        return Some(Refused {
            code: "AccessDenied",
            status: http::StatusCode::FORBIDDEN,
            message: format!(
                "There were headers present in the request which were not signed: {}",
                unsigned.join(", ")
            ),
        });
    }
    None
}

/// Largest file a browser-based upload (a POST of an HTML form to a
/// bucket) may carry. s3s reads such a form's file whole into memory before
/// anyone checks who sent it (the signature is a form field), so it is
/// bounded, and so is the number read at once
/// ([`FORM_UPLOADS_AT_ONCE`]): anything larger comes by PUT or multipart
/// upload, streamed.
pub const FORM_UPLOAD_MAX_BYTES: u64 = 64 << 20;
/// What a form's other fields may add (s3s's own bound on them).
pub const FORM_FIELDS_MAX_BYTES: u64 = 20 << 20;
/// Form uploads read at once; more wait for none, answered 503 SlowDown.
pub const FORM_UPLOADS_AT_ONCE: usize = 4;

/// Whether `req` is a browser-based upload: a POST of an HTML form.
pub fn is_form_upload<B>(req: &http::Request<B>) -> bool {
    is_form(req.method(), req.headers())
}

/// [`is_form_upload`], from a request's method and headers.
pub fn is_form(method: &http::Method, headers: &http::HeaderMap) -> bool {
    *method == http::Method::POST
        && headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                v.trim_start()
                    .to_ascii_lowercase()
                    .starts_with("multipart/form-data")
            })
}

/// The largest XML document a request may carry: the largest clients send,
/// a Complete of 10,000 parts with their checksums or a DeleteObjects of
/// 1,000 keys of 1 KiB, is under 3 MiB. `s3s` reads a document whole (20 MB
/// by default) before its own limits are checked.
pub const XML_MAX_BODY_BYTES: usize = 5 << 20;

/// A refusal, from its head, for an XML document whose declared length is
/// past [`XML_MAX_BODY_BYTES`] (`s3s` would read it up to that limit and
/// answer one past it, sent whole, with a 500).
pub fn document_too_large<B>(req: &http::Request<B>) -> Option<Refused> {
    let method = req.method();
    if method != http::Method::PUT && method != http::Method::POST {
        return None;
    }
    let len = req
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())?;
    let document =
        query_keys(req).any(|k| DOCUMENTS.contains(&k.as_str())) || completes_upload(req);
    (document && len > XML_MAX_BODY_BYTES as u64).then(|| Refused {
        code: "MaxMessageLengthExceeded",
        status: http::StatusCode::BAD_REQUEST,
        message: format!(
            "an XML document here is at most {} MiB",
            XML_MAX_BODY_BYTES >> 20
        ),
    })
}

/// A refusal, from its head, for a form upload whose declared length is
/// past what one may carry.
pub fn form_too_large<B>(req: &http::Request<B>) -> Option<Refused> {
    let len = req
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())?;
    (is_form_upload(req) && len > FORM_UPLOAD_MAX_BYTES + FORM_FIELDS_MAX_BYTES).then(|| Refused {
        code: "EntityTooLarge",
        status: http::StatusCode::BAD_REQUEST,
        message: format!(
            "a form upload here carries at most {} MiB; upload larger objects with PUT or a \
             multipart upload",
            FORM_UPLOAD_MAX_BYTES >> 20
        ),
    })
}

/// A refusal for what this gateway does not do and must not pretend to:
/// server-side encryption with the client's key (SSE-C) or a KMS key.
/// Taken silently, `aws s3 cp --sse-c` would store the object readable by
/// anyone with a reader key, as if encrypted. (SSE-S3, `AES256`, which S3
/// applies to everything by default, is taken as asked of any store.)
pub fn unsupported_refusal<B>(req: &http::Request<B>) -> Option<Refused> {
    let h = req.headers();
    let customer_key = [
        "x-amz-server-side-encryption-customer-algorithm",
        "x-amz-copy-source-server-side-encryption-customer-algorithm",
    ]
    .iter()
    .any(|name| h.contains_key(*name));
    let kms = h
        .get("x-amz-server-side-encryption")
        .is_some_and(|v| v.as_bytes().starts_with(b"aws:kms"));
    // HTTP/1.1 servers decode only `chunked` and pass any other coding
    // (`gzip, chunked`) through as the body's bytes, which would be stored
    // as the object.
    let coded = h.get_all(http::header::TRANSFER_ENCODING).iter().any(|v| {
        v.to_str().map_or(true, |v| {
            v.split(',')
                .any(|coding| !coding.trim().eq_ignore_ascii_case("chunked"))
        })
    });
    if coded {
        return Some(Refused {
            code: "NotImplemented",
            status: http::StatusCode::NOT_IMPLEMENTED,
            message: "Transfer-Encoding: only chunked is decoded here; a body in another \
                      transfer coding would be stored coded; the object was not stored"
                .into(),
        });
    }
    (customer_key || kms).then(|| Refused {
        code: "NotImplemented",
        status: http::StatusCode::NOT_IMPLEMENTED,
        message: "server-side encryption with a customer-provided or KMS key is not supported \
                  here; the object was not stored"
            .into(),
    })
}

/// The requests S3 takes only with a digest of their body: a lock's date,
/// a hold or a bucket's default retention (and which versions a
/// multi-object delete names) must not be taken from a document damaged
/// on the way. Query keys by method.
const DIGEST_REQUIRED: [(&http::Method, &str); 4] = [
    (&http::Method::PUT, "retention"),
    (&http::Method::PUT, "legal-hold"),
    (&http::Method::PUT, "object-lock"),
    (&http::Method::POST, "delete"),
];

/// A refusal for a request [`DIGEST_REQUIRED`] names that carries no
/// digest of its body: no `Content-MD5`, no `x-amz-checksum-*`, and a
/// payload neither signed by its SHA-256 nor sent aws-chunked (whose
/// chunks are signed or whose trailer carries a checksum). S3 answers
/// 400 InvalidRequest; the AWS SDKs and CLIs, rclone, s3cmd and
/// object_store all send one.
pub fn digest_refusal<B>(req: &http::Request<B>) -> Option<Refused> {
    let method = req.method();
    let document = (method == http::Method::PUT || method == http::Method::POST)
        && (query_keys(req).any(|k| DOCUMENTS.contains(&k.as_str())) || completes_upload(req));
    if document && streaming(req.headers()) && !streaming_signed(req.headers()) {
        return Some(Refused::new(
            "InvalidRequest",
            "an XML document sent aws-chunked must have signed chunks \
             (STREAMING-AWS4-HMAC-SHA256-PAYLOAD); send it whole, with Content-MD5 or an \
             x-amz-checksum- header",
        ));
    }
    let needs = query_keys(req).any(|k| {
        DIGEST_REQUIRED
            .iter()
            .any(|(m, key)| *m == method && *key == k.as_str())
    });
    if !needs {
        return None;
    }
    let headers = req.headers();
    let digest = has_digest(headers) || streaming_signed(headers);
    (!digest).then(|| {
        Refused::new(
            "InvalidRequest",
            "Missing required header for this request: Content-MD5 (or an x-amz-checksum- header)",
        )
    })
}

/// `x-amz-*` headers a client may add around a signed request: S3 takes
/// them unsigned, and each is checked against the body, not trusted.
const UNSIGNED_AMZ_ALLOWED: [&str; 4] = [
    "x-amz-content-sha256",
    "x-amz-decoded-content-length",
    "x-amz-trailer",
    "x-amz-checksum-algorithm",
];

/// The `x-amz-*` headers of a SigV4 request that its signature does not
/// cover. s3s 0.14 checks only the headers the request names as signed,
/// yet routes and acts on all of them: an `x-amz-copy-source`, an Object
/// Lock mode or `x-amz-bypass-governance-retention` added to a presigned
/// URL would turn it into a copy of other evidence, a lock nobody can lift,
/// or a bypass the signer never asked for. S3 refuses such a request, and
/// so does this gateway. (SigV2 signs every `x-amz-*` header by itself.)
fn unsigned_amz_headers<B>(req: &http::Request<B>) -> Vec<String> {
    // Not signed by a header or a query: anonymous, which is refused (any
    // other Authorization header is refused by `auth_refusal`).
    let Some(signed) = signed_headers(req) else {
        return Vec::new();
    };
    req.headers()
        .keys()
        .map(|name| name.as_str())
        .filter(|name| name.starts_with("x-amz-"))
        .filter(|name| !UNSIGNED_AMZ_ALLOWED.contains(name))
        .filter(|name| !signed.iter().any(|s| s == name))
        .map(str::to_owned)
        .collect()
}

/// The names (lower case) of the headers a SigV4 request's signature
/// covers; `None` when it is not signed so.
fn signed_headers<B>(req: &http::Request<B>) -> Option<Vec<String>> {
    // s3s checks a presigned URL's signature (the query's) whenever the
    // query carries one, whatever an Authorization header says: the signed
    // headers are then the query's, never a header's own claim.
    let query = url::form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes());
    let signed = match query.clone().any(|(k, _)| k == "X-Amz-Signature") {
        true => Some(
            query
                .into_iter()
                .find(|(k, _)| k == "X-Amz-SignedHeaders")
                .map_or_else(String::new, |(_, v)| v.into_owned()),
        ),
        false => req
            .headers()
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("AWS4-HMAC-SHA256 "))
            .map(|v| {
                // None named: none signed.
                v.split(',')
                    .find_map(|part| part.trim().strip_prefix("SignedHeaders="))
                    .map_or_else(String::new, str::to_owned)
            }),
    };
    Some(
        signed?
            .split(';')
            .map(|h| h.trim().to_ascii_lowercase())
            .collect(),
    )
}

/// A GET's or HEAD's `Range` made one s3s takes. s3s refuses (400
/// InvalidArgument) any `Range` but exactly one `bytes=FIRST-LAST`,
/// `bytes=FIRST-` or `bytes=-SUFFIX` with numbers up to 2^63-1, where RFC
/// 9110 and S3 ignore a Range they do not take (another unit, several
/// ranges, a last byte before the first: the whole object, 200). So such a
/// header is dropped, a unit in capitals written in lower case, and a
/// number past 2^63-1 (no object is that large) made 2^63-1, so a first
/// byte that far is 416 as any first byte past the end is. Not when the
/// signature covers the header: changed, it would no longer match (s3s
/// then refuses it as it would have).
pub fn normalize_range<B>(req: &mut http::Request<B>) {
    if req.method() != http::Method::GET && req.method() != http::Method::HEAD {
        return;
    }
    let Some(value) = req.headers().get(http::header::RANGE) else {
        return;
    };
    let canonical = value.to_str().ok().and_then(canonical_range);
    if canonical.as_deref() == value.to_str().ok() {
        return;
    }
    if signed_headers(req).is_some_and(|s| s.iter().any(|h| h == "range")) {
        return;
    }
    match canonical.and_then(|c| http::HeaderValue::from_str(&c).ok()) {
        Some(c) => {
            req.headers_mut().insert(http::header::RANGE, c);
        }
        None => {
            req.headers_mut().remove(http::header::RANGE);
        }
    }
}

/// `value` as the one byte range s3s reads, if it is one (see
/// [`normalize_range`]).
fn canonical_range(value: &str) -> Option<String> {
    let (unit, set) = value.trim().split_once('=')?;
    if !unit.trim().eq_ignore_ascii_case("bytes") || set.contains(',') {
        return None;
    }
    let (first, last) = set.trim().split_once('-')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let number = |s: &str| s.parse::<u64>().unwrap_or(u64::MAX).min(i64::MAX as u64);
    match (first, last) {
        ("", suffix) if digits(suffix) => Some(format!("bytes=-{}", number(suffix))),
        (first, "") if digits(first) => Some(format!("bytes={}-", number(first))),
        (first, last) if digits(first) && digits(last) => {
            let (first, last) = (number(first), number(last));
            (first <= last).then(|| format!("bytes={first}-{last}"))
        }
        _ => None,
    }
}

/// The request's query keys, percent-decoded as s3s decodes them before
/// it routes: `?%72etention` is routed as `?retention`, so it must be seen
/// as one here too.
fn query_keys<B>(req: &http::Request<B>) -> impl Iterator<Item = String> + '_ {
    url::form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
        .map(|(k, _)| k.into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;

    /// Lock, hold and default-retention documents and multi-object
    /// deletes need a digest of their body, as S3 has it; other requests,
    /// and those with any digest (or an aws-chunked body), pass.
    #[test]
    fn lock_documents_without_a_digest_are_refused() {
        let code = |method: &str, uri: &str, headers: &[(&str, &str)]| {
            digest_refusal(&req(method, uri, headers)).map(|r| r.code)
        };
        let unsigned = ("x-amz-content-sha256", "UNSIGNED-PAYLOAD");
        for (method, uri) in [
            ("PUT", "/b/k?retention"),
            ("PUT", "/b/k?legal-hold=&versionId=v"),
            ("PUT", "/b?object-lock"),
            ("POST", "/b?delete"),
        ] {
            assert_eq!(
                code(method, uri, &[unsigned]),
                Some("InvalidRequest"),
                "{method} {uri}"
            );
            for digest in [
                ("content-md5", "1B2M2Y8AsgTpgAmY7PhCfg=="),
                ("x-amz-checksum-crc32", "AAAAAA=="),
                (
                    "x-amz-content-sha256",
                    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
                ),
                ("x-amz-content-sha256", "STREAMING-AWS4-HMAC-SHA256-PAYLOAD"),
            ] {
                assert_eq!(
                    code(method, uri, &[digest]),
                    None,
                    "{method} {uri} {digest:?}"
                );
            }
            // Unsigned chunks: their trailer's checksum is read by nobody
            // here, so not even a Content-MD5 beside them is a digest.
            let chunked = ("x-amz-content-sha256", "STREAMING-UNSIGNED-PAYLOAD-TRAILER");
            let md5 = ("content-md5", "1B2M2Y8AsgTpgAmY7PhCfg==");
            for headers in [&[chunked][..], &[chunked, md5]] {
                assert_eq!(
                    code(method, uri, headers),
                    Some("InvalidRequest"),
                    "{method} {uri} {headers:?}"
                );
            }
        }
        // Nor any other document (a versioning configuration, a part list).
        let chunked = ("x-amz-content-sha256", "STREAMING-UNSIGNED-PAYLOAD-TRAILER");
        for (method, uri) in [("PUT", "/b?versioning"), ("POST", "/b/k?uploadId=u")] {
            assert_eq!(code(method, uri, &[chunked]), Some("InvalidRequest"));
        }
        // Object data sent so is checked as it streams.
        assert_eq!(code("PUT", "/b/k", &[chunked]), None);
        assert_eq!(
            code("PUT", "/b/k?partNumber=1&uploadId=u", &[chunked]),
            None
        );
        for (method, uri) in [
            ("GET", "/b/k?retention"),
            ("PUT", "/b/k"),
            ("PUT", "/b?versioning"),
            ("POST", "/b/k?uploads"),
        ] {
            assert_eq!(code(method, uri, &[unsigned]), None, "{method} {uri}");
        }
    }

    #[test]
    fn only_sigv4_within_a_week_gets_through() {
        let now = 1_796_000_000u64;
        let code = |uri: &str, headers: &[(&str, &str)]| {
            auth_refusal(&req("GET", uri, headers), now).map(|r| r.code)
        };
        let v4 = "AWS4-HMAC-SHA256 Credential=AK/20261205/us-east-1/s3/aws4_request, \
                  SignedHeaders=host, Signature=00";
        assert_eq!(code("/b/k", &[("authorization", v4)]), None);
        assert_eq!(
            code("/b/k", &[("authorization", "AWS AK:c2lnbmF0dXJl")]),
            Some("InvalidRequest")
        );
        // SigV2 presigned (boto3's default off AWS): within a week only.
        let v2 = |expires: u64| format!("/b/k?AWSAccessKeyId=AK&Expires={expires}&Signature=x");
        assert_eq!(code(&v2(now + 300), &[]), None);
        assert_eq!(code(&v2(now + MAX_PRESIGNED_SECS), &[]), None);
        assert_eq!(
            code(&v2(now + MAX_PRESIGNED_SECS + 1), &[]),
            Some("AuthorizationQueryParametersError")
        );
        assert_eq!(
            code("/b/k?AWSAccessKeyId=AK&Signature=x", &[]),
            Some("InvalidRequest"),
            "no expiry"
        );
        assert_eq!(
            code("/b/k?AWSAccessKeyId=AK&Expires=soon&Signature=x", &[]),
            Some("InvalidRequest")
        );
        let presigned = |expires: &str| {
            format!(
                "/b/k?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AK%2F20261205%2Fus-east-1%2Fs3%2Faws4_request\
                 &X-Amz-Date=20261205T000000Z&X-Amz-Expires={expires}&X-Amz-SignedHeaders=host&X-Amz-Signature=00"
            )
        };
        assert_eq!(code(&presigned("604800"), &[]), None);
        assert_eq!(code(&presigned("3600"), &[]), None);
        for bad in ["604801", "4294967295", "-1", "x"] {
            assert_eq!(
                code(&presigned(bad), &[]),
                Some("AuthorizationQueryParametersError"),
                "{bad}"
            );
        }
        // A key or a value that merely contains the names is not SigV2.
        assert_eq!(code("/b/k?prefix=Signature", &[]), None);
    }

    #[test]
    fn encryption_with_keys_this_store_lacks_is_refused() {
        let code = |headers: &[(&str, &str)]| {
            unsupported_refusal(&req("PUT", "/b/k", headers)).map(|r| r.code)
        };
        assert_eq!(
            code(&[("x-amz-server-side-encryption-customer-algorithm", "AES256")]),
            Some("NotImplemented")
        );
        assert_eq!(
            code(&[(
                "x-amz-copy-source-server-side-encryption-customer-algorithm",
                "AES256"
            )]),
            Some("NotImplemented")
        );
        assert_eq!(
            code(&[("x-amz-server-side-encryption", "aws:kms")]),
            Some("NotImplemented")
        );
        assert_eq!(
            code(&[("x-amz-server-side-encryption", "aws:kms:dsse")]),
            Some("NotImplemented")
        );
        assert_eq!(code(&[("x-amz-server-side-encryption", "AES256")]), None);
        assert_eq!(code(&[]), None);
        // A transfer coding other than chunked would be stored coded.
        assert_eq!(
            code(&[("transfer-encoding", "gzip, chunked")]),
            Some("NotImplemented")
        );
        assert_eq!(code(&[("transfer-encoding", "chunked")]), None);
        assert_eq!(code(&[("transfer-encoding", "Chunked")]), None);
    }

    #[test]
    fn html_form_uploads_past_their_bound_are_refused_from_the_head() {
        let form = |method: &str, content_type: &str, len: Option<u64>| {
            let mut headers = vec![("content-type", content_type.to_owned())];
            if let Some(len) = len {
                headers.push(("content-length", len.to_string()));
            }
            let headers: Vec<(&str, &str)> =
                headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let r = req(method, "/b", &headers);
            (is_form_upload(&r), form_too_large(&r).map(|r| r.code))
        };
        let ct = "multipart/form-data; boundary=x";
        assert_eq!(form("POST", ct, Some(1000)), (true, None));
        assert_eq!(
            form("POST", " Multipart/Form-Data;boundary=y", None),
            (true, None)
        );
        assert_eq!(
            form(
                "POST",
                ct,
                Some(FORM_UPLOAD_MAX_BYTES + FORM_FIELDS_MAX_BYTES + 1)
            ),
            (true, Some("EntityTooLarge"))
        );
        // Other POSTs (DeleteObjects, multipart uploads) and PUTs are none.
        assert_eq!(
            form("POST", "application/xml", Some(1 << 40)),
            (false, None)
        );
        assert_eq!(form("PUT", ct, Some(1 << 40)), (false, None));
    }

    #[test]
    fn every_amz_header_must_be_signed() {
        let refused = |uri: &str, headers: &[(&str, &str)]| {
            auth_refusal(&req("PUT", uri, headers), 1_796_000_000).map(|r| (r.code, r.message))
        };
        let presigned = |signed: &str| {
            format!(
                "/b/k?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AK%2F20261205%2Fus-east-1%2Fs3%2Faws4_request\
                 &X-Amz-Date=20261205T000000Z&X-Amz-Expires=300&X-Amz-SignedHeaders={signed}&X-Amz-Signature=00"
            )
        };
        // A presigned PUT turned into a copy of other evidence, or a lock.
        let copy = [("X-Amz-Copy-Source", "/casefiles/secret.mp4")];
        let (code, message) = refused(&presigned("host"), &copy).expect("refused");
        assert_eq!(code, "AccessDenied");
        assert!(
            message.ends_with("not signed: x-amz-copy-source"),
            "{message}"
        );
        let lock = [
            ("x-amz-object-lock-mode", "COMPLIANCE"),
            (
                "x-amz-object-lock-retain-until-date",
                "9999-01-01T00:00:00Z",
            ),
        ];
        assert!(refused(&presigned("host"), &lock).is_some());
        assert_eq!(
            refused(
                &presigned("host%3Bx-amz-object-lock-mode%3Bx-amz-object-lock-retain-until-date"),
                &lock
            ),
            None,
            "signed, they stand"
        );
        // Header authentication: the same rule, names compared without case.
        let auth = |signed: &str| {
            format!(
                "AWS4-HMAC-SHA256 Credential=AK/20261205/us-east-1/s3/aws4_request, \
                 SignedHeaders={signed}, Signature=00"
            )
        };
        let bypass = auth("host;x-amz-date");
        let headers = [
            ("authorization", bypass.as_str()),
            ("x-amz-date", "20261205T000000Z"),
            ("x-amz-bypass-governance-retention", "true"),
        ];
        assert!(refused("/b/k", &headers).is_some());
        let signed = auth("host;X-Amz-Bypass-Governance-Retention;x-amz-date");
        let headers = [
            ("authorization", signed.as_str()),
            ("x-amz-date", "20261205T000000Z"),
            ("x-amz-bypass-governance-retention", "true"),
        ];
        assert_eq!(refused("/b/k", &headers), None);
        // s3s checks a SigV4 signature whatever the header's first word:
        // only AWS4-HMAC-SHA256 is taken, so no other word can carry an
        // unsigned header past this check.
        for word in ["aws4-hmac-sha256", "X", "AWS4-HMAC-SHA256X"] {
            let renamed = bypass.replacen("AWS4-HMAC-SHA256", word, 1);
            let headers = [
                ("authorization", renamed.as_str()),
                ("x-amz-date", "20261205T000000Z"),
                ("x-amz-bypass-governance-retention", "true"),
            ];
            let (code, _) = refused("/b/k", &headers).expect("refused");
            assert_eq!(code, "InvalidRequest", "{word}");
        }
        // A header naming no signed headers signs none.
        let unnamed =
            "AWS4-HMAC-SHA256 Credential=AK/20261205/us-east-1/s3/aws4_request, Signature=00";
        let headers = [
            ("authorization", unnamed),
            ("x-amz-bypass-governance-retention", "true"),
        ];
        assert_eq!(refused("/b/k", &headers).map(|r| r.0), Some("AccessDenied"));
        // What clients add around a signed request, and what is not x-amz-.
        let around = auth("host;x-amz-date");
        let headers = [
            ("authorization", around.as_str()),
            ("x-amz-date", "20261205T000000Z"),
            ("x-amz-content-sha256", "STREAMING-UNSIGNED-PAYLOAD-TRAILER"),
            ("x-amz-decoded-content-length", "5"),
            ("x-amz-trailer", "x-amz-checksum-crc32"),
            ("x-amzn-trace-id", "Root=1"),
            ("user-agent", "aws-cli"),
        ];
        assert_eq!(refused("/b/k", &headers), None);
        // Unsigned requests are s3s's to refuse (no anonymous access).
        assert_eq!(refused("/b/k", &copy), None);
        // A presigned URL's signed headers are its query's: an
        // Authorization header added to claim more is not believed (s3s
        // checks the query's signature), and two ways at once are refused.
        let claims = auth("host;x-amz-object-lock-mode;x-amz-object-lock-retain-until-date");
        let mut forged = lock.to_vec();
        forged.push(("authorization", claims.as_str()));
        let (code, _) = refused(&presigned("host"), &forged).expect("refused");
        assert_eq!(code, "InvalidArgument");
        assert_eq!(
            unsigned_amz_headers(&req("PUT", &presigned("host"), &forged)),
            [
                "x-amz-object-lock-mode",
                "x-amz-object-lock-retain-until-date"
            ]
        );
        let both = format!(
            "{}&AWSAccessKeyId=AK&Expires=1796000300&Signature=x",
            presigned("host")
        );
        assert_eq!(refused(&both, &[]).map(|r| r.0), Some("InvalidArgument"));
        let v2_and_header = "/b/k?AWSAccessKeyId=AK&Expires=1796000300&Signature=x";
        assert_eq!(
            refused(v2_and_header, &[("authorization", claims.as_str())]).map(|r| r.0),
            Some("InvalidArgument")
        );
    }

    /// SigV2 signs a fixed list of subresources: a presigned write's URL
    /// with another key added (spelled plainly or percent-encoded, as s3s
    /// decodes it before routing) is refused; reads may list freely.
    #[test]
    fn a_sigv2_presigned_write_carries_only_signed_query_keys() {
        let now = 1_796_000_000;
        let url = |extra: &str| {
            format!(
                "/b/k?AWSAccessKeyId=AK&Expires={}&Signature=x{extra}",
                now + 300
            )
        };
        let refused = |method: &str, extra: &str| {
            auth_refusal(&req(method, &url(extra), &[]), now).map(|r| (r.code, r.message))
        };
        assert_eq!(refused("PUT", ""), None);
        assert_eq!(refused("PUT", "&partNumber=2&uploadId=u"), None);
        assert_eq!(refused("PUT", "&x-id=PutObject"), None);
        // What botocore copies from the headers into the query.
        assert_eq!(
            refused(
                "PUT",
                "&Content-Type=application%2Fpdf&x-amz-meta-case=7&x-amz-acl=private"
            ),
            None
        );
        // A signed subresource given twice drops out of the signature.
        assert!(refused("PUT", "&versioning&versioning").is_some());
        for extra in [
            "&retention",
            "&%72etention",
            "&legal-hold=",
            "&le%67al-hold",
        ] {
            let (code, message) = refused("PUT", extra).expect(extra);
            assert_eq!(code, "AccessDenied", "{extra}");
            assert!(message.contains("not signed"), "{message}");
        }
        assert!(refused("POST", "&restore&x=1").is_some());
        assert_eq!(refused("GET", "&prefix=a&max-keys=5"), None);
        assert_eq!(refused("HEAD", "&retention"), None);
    }

    /// Ranges s3s would refuse are made ones it takes, or dropped (the
    /// whole object), as RFC 9110 and S3 read them; a signed one is left.
    #[test]
    fn ranges_s3s_would_refuse_are_read_as_s3_reads_them() {
        let big = i64::MAX;
        for (sent, taken) in [
            ("bytes=0-99", Some("bytes=0-99".to_owned())),
            ("bytes=5-", Some("bytes=5-".to_owned())),
            ("bytes=-20", Some("bytes=-20".to_owned())),
            ("Bytes=0-5", Some("bytes=0-5".to_owned())),
            ("bytes=0-99,200-299", None),
            ("items=0-5", None),
            ("bytes=5-2", None),
            ("bytes=a-b", None),
            ("bytes=", None),
            ("bytes=-", None),
            ("bytes=99999999999999999999-", Some(format!("bytes={big}-"))),
            (
                "bytes=9223372036854775808-9223372036854775809",
                Some(format!("bytes={big}-{big}")),
            ),
            ("bytes=-99999999999999999999", Some(format!("bytes=-{big}"))),
        ] {
            let mut r = req("GET", "/b/k", &[("range", sent)]);
            normalize_range(&mut r);
            let got = r
                .headers()
                .get("range")
                .map(|v| v.to_str().unwrap().to_owned());
            assert_eq!(got, taken, "{sent}");
            // Each one taken is one s3s parses.
            if let Some(t) = &taken {
                assert!(s3s::dto::Range::parse(t).is_ok(), "{t}");
            }
        }
        // Covered by the signature: left as it is.
        let auth = "AWS4-HMAC-SHA256 Credential=AK/20261205/us-east-1/s3/aws4_request, \
                    SignedHeaders=host;range;x-amz-date, Signature=00";
        let mut r = req(
            "GET",
            "/b/k",
            &[("range", "bytes=0-1,5-6"), ("authorization", auth)],
        );
        normalize_range(&mut r);
        assert_eq!(r.headers()["range"], "bytes=0-1,5-6");
        // Only reads.
        let mut r = req("PUT", "/b/k", &[("range", "items=0-5")]);
        normalize_range(&mut r);
        assert_eq!(r.headers()["range"], "items=0-5");
    }

    /// The keys that decide a request's route are seen decoded, as s3s
    /// sees them: `%72etention` needs its digest as `retention` does.
    #[test]
    fn percent_encoded_query_keys_are_seen_as_routed() {
        let unsigned = ("x-amz-content-sha256", "UNSIGNED-PAYLOAD");
        for uri in ["/b/k?%72etention", "/b/k?legal%2Dhold="] {
            assert_eq!(
                digest_refusal(&req("PUT", uri, &[unsigned])).map(|r| r.code),
                Some("InvalidRequest"),
                "{uri}"
            );
        }
        let md5 = [("content-md5", "AAAAAAAAAAAAAAAAAAAAAA==")];
        assert!(wants_check(&req("PUT", "/b/k?%72etention", &md5)));
    }

    fn req(method: &str, uri: &str, headers: &[(&str, &str)]) -> http::Request<()> {
        let mut b = http::Request::builder().method(method).uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    fn md5_b64(body: &[u8]) -> String {
        let d = <md5::Md5 as md5::Digest>::digest(body);
        base64::engine::general_purpose::STANDARD.encode(d)
    }

    #[test]
    fn documents_with_digests_are_checked_and_object_bodies_are_not() {
        let md5 = [("content-md5", "AAAAAAAAAAAAAAAAAAAAAA==")];
        assert!(wants_check(&req("PUT", "/b/k?retention&versionId=1", &md5)));
        assert!(wants_check(&req("PUT", "/b/k?legal-hold=", &md5)));
        assert!(wants_check(&req("PUT", "/b?object-lock", &md5)));
        assert!(wants_check(&req("POST", "/b?delete", &md5)));
        assert!(wants_check(&req("POST", "/b/k?uploadId=x", &md5)));
        let crc = [("x-amz-checksum-crc32", "AAAAAA==")];
        assert!(wants_check(&req("PUT", "/b?versioning", &crc)));
        // Object data streams through the ingest, which checks it there.
        assert!(!wants_check(&req("PUT", "/b/k", &md5)));
        assert!(!wants_check(&req(
            "PUT",
            "/b/k?partNumber=1&uploadId=x",
            &md5
        )));
        // A signed payload's SHA-256 is a digest too.
        let signed = [(
            "x-amz-content-sha256",
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        )];
        assert!(wants_check(&req("PUT", "/b/k?retention", &signed)));
        let unsigned = [("x-amz-content-sha256", "UNSIGNED-PAYLOAD")];
        assert!(!wants_check(&req("PUT", "/b/k?retention", &unsigned)));
        // No digest sent, nothing to check; reads carry no document.
        assert!(!wants_check(&req("PUT", "/b/k?retention", &[])));
        assert!(!wants_check(&req("GET", "/b/k?retention", &md5)));
        // An aws-chunked body is decoded (and its signature checked) by s3s.
        let chunked = [
            ("content-md5", "AAAAAAAAAAAAAAAAAAAAAA=="),
            ("x-amz-content-sha256", "STREAMING-AWS4-HMAC-SHA256-PAYLOAD"),
        ];
        assert!(!wants_check(&req("PUT", "/b/k?retention", &chunked)));
    }

    #[test]
    fn every_digest_sent_must_match() {
        let doc = b"<Retention><Mode>COMPLIANCE</Mode></Retention>";
        let good = md5_b64(doc);
        let mut h = http::HeaderMap::new();
        h.insert("content-md5", good.parse().unwrap());
        assert_eq!(check(&h, doc, true), Ok(()));
        // One byte changed on the way.
        let mut damaged = doc.to_vec();
        damaged[20] ^= 1;
        assert_eq!(check(&h, &damaged, true).unwrap_err().code, "BadDigest");
        h.insert("content-md5", "not base64!".parse().unwrap());
        assert_eq!(check(&h, doc, true).unwrap_err().code, "InvalidDigest");

        // CRC32 of the document, as boto3 sends it.
        let crc = crc32_b64(doc);
        let mut h = http::HeaderMap::new();
        h.insert("x-amz-checksum-crc32", crc.parse().unwrap());
        assert_eq!(check(&h, doc, true), Ok(()));
        assert_eq!(check(&h, &damaged, true).unwrap_err().code, "BadDigest");
        // A right MD5 does not excuse a wrong CRC32.
        h.insert("content-md5", good.parse().unwrap());
        h.insert("x-amz-checksum-crc32", "AAAAAA==".parse().unwrap());
        let refused = check(&h, doc, true).unwrap_err();
        assert_eq!(refused.code, "BadDigest");
        assert!(refused.xml().contains("<Code>BadDigest</Code>"));

        // The signed payload hash, as every SigV4 client but streaming ones sends.
        let mut h = http::HeaderMap::new();
        let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(doc));
        h.insert("x-amz-content-sha256", sha.parse().unwrap());
        assert_eq!(check(&h, doc, true), Ok(()));
        let refused = check(&h, &damaged, true).unwrap_err();
        assert_eq!(refused.code, "XAmzContentSHA256Mismatch");
        assert_eq!(refused.status, http::StatusCode::BAD_REQUEST);
    }

    /// CRC32 (IEEE) of `data`, big-endian, base64: computed here bit by bit
    /// so the test does not check s3s against itself.
    fn crc32_b64(data: &[u8]) -> String {
        let mut crc = 0xffff_ffffu32;
        for &b in data {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 == 1 {
                    (crc >> 1) ^ 0xedb8_8320
                } else {
                    crc >> 1
                };
            }
        }
        base64::engine::general_purpose::STANDARD.encode((!crc).to_be_bytes())
    }

    #[test]
    fn an_upload_completion_carries_the_objects_checksum_and_one_checksum_is_allowed() {
        let doc = b"<CompleteMultipartUpload></CompleteMultipartUpload>";
        let mut h = http::HeaderMap::new();
        // The whole object's CRC32, not the document's: not checked here.
        h.insert("x-amz-checksum-crc32", "AAAAAA==".parse().unwrap());
        assert_eq!(check(&h, doc, false), Ok(()));
        let complete = req(
            "POST",
            "/b/k?uploadId=x",
            &[("x-amz-checksum-crc32", "AAAAAA==")],
        );
        assert!(completes_upload(&complete));
        // Its Content-MD5 is the document's.
        h.insert("content-md5", "AAAAAAAAAAAAAAAAAAAAAA==".parse().unwrap());
        assert_eq!(check(&h, doc, false).unwrap_err().code, "BadDigest");
        // Two checksum types at once, or one that is not base64: refused.
        let mut h = http::HeaderMap::new();
        h.insert("x-amz-checksum-crc32", crc32_b64(doc).parse().unwrap());
        h.insert(
            "x-amz-checksum-sha1",
            "AAAAAAAAAAAAAAAAAAAAAAAAAAA=".parse().unwrap(),
        );
        assert_eq!(check(&h, doc, true).unwrap_err().code, "InvalidRequest");
        let mut h = http::HeaderMap::new();
        h.insert("x-amz-checksum-crc32", "not base64!".parse().unwrap());
        assert_eq!(check(&h, doc, true).unwrap_err().code, "InvalidRequest");
    }

    /// The body passes through unchanged; a damaged one ends in an error,
    /// with the reason left for the answer, and a good one leaves none.
    #[tokio::test]
    async fn the_body_is_checked_as_it_is_read() {
        use http_body_util::BodyExt;
        let doc = Bytes::from_static(b"<LegalHold><Status>ON</Status></LegalHold>");
        let build = |body: Bytes| {
            http::Request::builder()
                .method("PUT")
                .uri("/b/k?legal-hold")
                .header(
                    "content-md5",
                    md5_b64(b"<LegalHold><Status>ON</Status></LegalHold>"),
                )
                .body(http_body_util::Full::new(body))
                .unwrap()
        };
        let (req, verdict) = wrap(build(doc.clone())).unwrap();
        let got = req.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(got, doc);
        assert!(verdict.lock().unwrap().is_none());

        let damaged = Bytes::from_static(b"<LegalHold><Status>OF</Status></LegalHold>");
        let (req, verdict) = wrap(build(damaged)).unwrap();
        assert!(req.into_body().collect().await.is_err());
        let refused = verdict.lock().unwrap().take().expect("a verdict");
        assert_eq!(refused.code, "BadDigest");
    }
}
