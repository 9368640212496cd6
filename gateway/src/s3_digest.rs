//! Integrity of the XML documents S3 requests carry.
//!
//! A retention, a legal hold, an Object Lock or versioning configuration, a
//! multi-object delete: these arrive as small XML documents that `s3s` parses
//! before the gateway sees them, and `s3s` checks neither `Content-MD5` nor
//! the `x-amz-checksum-*` headers a client sends with them (the object
//! bodies the gateway files are checked as they stream, in `s3.rs`). A
//! retention date damaged on the way must not become a lock that nobody can
//! lift, so such a document is read whole here (it is small) and checked
//! against every digest the client sent, before `s3s` parses it: a mismatch
//! is `BadDigest`, a malformed `Content-MD5` `InvalidDigest`, both 400 with
//! S3's XML error body, and nothing is changed.
//!
//! The check runs before authentication (the document must be read first),
//! so an unsigned request with a wrong digest hears `BadDigest` rather than
//! `AccessDenied`; it learns nothing by that but that its own bytes and
//! headers disagree.

use bytes::Bytes;
use http_body_util::BodyExt;

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

/// The largest document read whole: a multi-object delete of 1,000 keys of
/// 1,024 bytes, escaped, with room to spare.
pub const MAX_DOCUMENT_BYTES: usize = 8 << 20;

const CONTENT_MD5: &str = "content-md5";

/// The checksum headers S3 defines beside `Content-MD5`.
const CHECKSUMS: [&str; 5] = [
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
    let keys = || {
        req.uri()
            .query()
            .unwrap_or("")
            .split('&')
            .map(|pair| pair.split('=').next().unwrap_or(""))
    };
    // CompleteMultipartUpload (POST ?uploadId=) sends its part list as XML.
    let document = keys().any(|k| DOCUMENTS.contains(&k))
        || (method == http::Method::POST && keys().any(|k| k == "uploadId"));
    let headers = req.headers();
    let streaming = headers
        .get("x-amz-content-sha256")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("STREAMING-"));
    let digest = headers.contains_key(CONTENT_MD5)
        || CHECKSUMS.iter().any(|h| headers.contains_key(*h))
        || payload_sha256(headers).is_some();
    document && !streaming && digest
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

/// Checks `body` against every digest header in `headers`: `Content-MD5`
/// and the checksums first (`BadDigest`), then the signed payload hash.
///
/// `s3s` checks a signed payload's SHA-256 too, but answers a mismatch with
/// a 500 InternalError (and clients retry it); here it is S3's 400
/// `XAmzContentSHA256Mismatch`.
pub fn check(headers: &http::HeaderMap, body: &[u8]) -> Result<(), Refused> {
    use base64::Engine as _;
    use s3s::crypto::Checksum as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    if let Some(sent) = headers.get(CONTENT_MD5) {
        let want = sent
            .to_str()
            .ok()
            .and_then(|v| b64.decode(v.trim()).ok())
            .filter(|v| v.len() == 16)
            .ok_or_else(|| Refused::new("InvalidDigest", "Content-MD5 is not a base64 MD5"))?;
        let got = <md5::Md5 as md5::Digest>::digest(body);
        if got.as_slice() != want.as_slice() {
            return Err(Refused::new(
                "BadDigest",
                "the Content-MD5 you specified did not match what we received",
            ));
        }
    }
    for name in CHECKSUMS {
        let Some(sent) = headers.get(name) else {
            continue;
        };
        let sent = sent.to_str().unwrap_or("").trim();
        let mut hasher = s3s::checksum::ChecksumHasher {
            crc32: (name == CHECKSUMS[0]).then(s3s::crypto::Crc32::new),
            crc32c: (name == CHECKSUMS[1]).then(s3s::crypto::Crc32c::new),
            crc64nvme: (name == CHECKSUMS[2]).then(s3s::crypto::Crc64Nvme::new),
            sha1: (name == CHECKSUMS[3]).then(s3s::crypto::Sha1::new),
            sha256: (name == CHECKSUMS[4]).then(s3s::crypto::Sha256::new),
        };
        hasher.update(body);
        let got = hasher.finalize();
        let got = [
            got.checksum_crc32,
            got.checksum_crc32c,
            got.checksum_crc64nvme,
            got.checksum_sha1,
            got.checksum_sha256,
        ]
        .into_iter()
        .flatten()
        .next()
        .unwrap_or_default();
        if got != sent {
            return Err(Refused::new(
                "BadDigest",
                format!("the {name} you specified did not match what we received"),
            ));
        }
    }
    if let Some(want) = payload_sha256(headers) {
        let got = <sha2::Sha256 as sha2::Digest>::digest(body);
        if got.as_slice() != want.as_slice() {
            return Err(Refused::new(
                "XAmzContentSHA256Mismatch",
                "the provided 'x-amz-content-sha256' header does not match what was computed",
            ));
        }
    }
    Ok(())
}

/// Reads the document body of `req` whole (at most
/// [`MAX_DOCUMENT_BYTES`]) and checks it: the request back with the body
/// as read, or why it is refused.
pub async fn read_checked<B>(req: http::Request<B>) -> Result<http::Request<Bytes>, Refused>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (parts, body) = req.into_parts();
    let limited = http_body_util::Limited::new(body, MAX_DOCUMENT_BYTES);
    let body = match limited.collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return Err(Refused::new(
                "MaxMessageLengthExceeded",
                format!("the XML document is over {MAX_DOCUMENT_BYTES} bytes"),
            ))
        }
        Err(e) => {
            return Err(Refused::new(
                "IncompleteBody",
                format!("the request body could not be read: {e}"),
            ))
        }
    };
    check(&parts.headers, &body)?;
    Ok(http::Request::from_parts(parts, body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;

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
        assert_eq!(check(&h, doc), Ok(()));
        // One byte changed on the way.
        let mut damaged = doc.to_vec();
        damaged[20] ^= 1;
        assert_eq!(check(&h, &damaged).unwrap_err().code, "BadDigest");
        h.insert("content-md5", "not base64!".parse().unwrap());
        assert_eq!(check(&h, doc).unwrap_err().code, "InvalidDigest");

        // CRC32 of the document, as boto3 sends it.
        let crc = crc32_b64(doc);
        let mut h = http::HeaderMap::new();
        h.insert("x-amz-checksum-crc32", crc.parse().unwrap());
        assert_eq!(check(&h, doc), Ok(()));
        assert_eq!(check(&h, &damaged).unwrap_err().code, "BadDigest");
        // A right MD5 does not excuse a wrong CRC32.
        h.insert("content-md5", good.parse().unwrap());
        h.insert("x-amz-checksum-crc32", "AAAAAA==".parse().unwrap());
        let refused = check(&h, doc).unwrap_err();
        assert_eq!(refused.code, "BadDigest");
        assert!(refused.xml().contains("<Code>BadDigest</Code>"));

        // The signed payload hash, as every SigV4 client but streaming ones sends.
        let mut h = http::HeaderMap::new();
        let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(doc));
        h.insert("x-amz-content-sha256", sha.parse().unwrap());
        assert_eq!(check(&h, doc), Ok(()));
        let refused = check(&h, &damaged).unwrap_err();
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

    #[tokio::test]
    async fn an_oversized_document_is_refused() {
        let body = http_body_util::Full::new(Bytes::from(vec![b' '; MAX_DOCUMENT_BYTES + 1]));
        let req = http::Request::builder()
            .method("POST")
            .uri("/b?delete")
            .header("content-md5", "AAAAAAAAAAAAAAAAAAAAAA==")
            .body(body)
            .unwrap();
        let refused = read_checked(req).await.unwrap_err();
        assert_eq!(refused.code, "MaxMessageLengthExceeded");
    }
}
