//! RFC 3161 time-stamp tokens over ledger checkpoints: independent time.
//!
//! Client and verifier (always built): [`request`] makes a TimeStampReq for a
//! SHA-256 imprint; [`verify_response`] checks a TimeStampResp against the
//! imprint, the nonce when the caller made the request, and the TSA
//! certificate it trusts, and returns the token's genTime. A development TSA
//! (feature `tsa-server`, used by the gateway for `custodia up`): [`make_tsa`]
//! makes its key and long-lived certificate, [`timestamp`] answers requests;
//! `openssl ts -verify` accepts its tokens (tested in `tests/`).
//!
//! No maintained crate implements the TSA side: RustCrypto's `cms` builder
//! pulls a second `der` generation and `rsa` (RUSTSEC-2023-0071), and the
//! client crates bring their own HTTP stacks. The structures (RFC 3161, RFC
//! 5652 SignedData, RFC 5816 ESSCertIDv2) are therefore written with `yasna`
//! (DER), signed with `rcgen`/`ring` and verified with `ring`.

// The verifier alone uses part of the encoding helpers the TSA needs.
#![cfg_attr(not(feature = "tsa-server"), allow(dead_code, unused_imports))]

use ring::digest::{self, Algorithm as DigestAlg};
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{self, VerificationAlgorithm};
use rustls_pki_types::{pem::PemObject, CertificateDer};
use yasna::models::{GeneralizedTime, ObjectIdentifier};
use yasna::tags::{TAG_BOOLEAN, TAG_INTEGER, TAG_OID, TAG_SEQUENCE};
use yasna::{ASN1Result, BERReader, BERReaderSeq, DERWriter, Tag, TagClass};

pub const CONTENT_TYPE_QUERY: &str = "application/timestamp-query";
pub const CONTENT_TYPE_REPLY: &str = "application/timestamp-reply";
/// Policy OID written into every TSTInfo (openssl's sample `tsa_policy1`); pick your own arc.
pub const TSA_POLICY: &[u64] = &[1, 2, 3, 4, 1];

const SHA1: &[u64] = &[1, 3, 14, 3, 2, 26];
const SHA256: &[u64] = &[2, 16, 840, 1, 101, 3, 4, 2, 1];
const SHA384: &[u64] = &[2, 16, 840, 1, 101, 3, 4, 2, 2];
const SHA512: &[u64] = &[2, 16, 840, 1, 101, 3, 4, 2, 3];
const SIGNED_DATA: &[u64] = &[1, 2, 840, 113549, 1, 7, 2];
const CT_TSTINFO: &[u64] = &[1, 2, 840, 113549, 1, 9, 16, 1, 4];
const AT_CONTENT_TYPE: &[u64] = &[1, 2, 840, 113549, 1, 9, 3];
const AT_MESSAGE_DIGEST: &[u64] = &[1, 2, 840, 113549, 1, 9, 4];
const AT_SIGNING_CERT: &[u64] = &[1, 2, 840, 113549, 1, 9, 16, 2, 12];
const AT_SIGNING_CERT_V2: &[u64] = &[1, 2, 840, 113549, 1, 9, 16, 2, 47];
const EC_PUBKEY: &[u64] = &[1, 2, 840, 10045, 2, 1];
const P256: &[u64] = &[1, 2, 840, 10045, 3, 1, 7];
const P384: &[u64] = &[1, 3, 132, 0, 34];
const ECDSA_SHA256: &[u64] = &[1, 2, 840, 10045, 4, 3, 2];
const ECDSA_SHA384: &[u64] = &[1, 2, 840, 10045, 4, 3, 3];
const ECDSA_SHA512: &[u64] = &[1, 2, 840, 10045, 4, 3, 4];
const RSA: &[u64] = &[1, 2, 840, 113549, 1, 1, 1];
const RSA_SHA256: &[u64] = &[1, 2, 840, 113549, 1, 1, 11];
const RSA_SHA384: &[u64] = &[1, 2, 840, 113549, 1, 1, 12];
const RSA_SHA512: &[u64] = &[1, 2, 840, 113549, 1, 1, 13];
const ED25519: &[u64] = &[1, 3, 101, 112];
#[cfg(feature = "tsa-server")]
const EXT_EKU: &[u64] = &[2, 5, 29, 37];
#[cfg(feature = "tsa-server")]
const KP_TIMESTAMPING: &[u64] = &[1, 3, 6, 1, 5, 5, 7, 3, 8];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error(pub String);
impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for Error {}
impl From<yasna::ASN1Error> for Error {
    fn from(e: yasna::ASN1Error) -> Self {
        Error(format!("ASN.1: {e}"))
    }
}
#[cfg(feature = "tsa-server")]
impl From<rcgen::Error> for Error {
    fn from(e: rcgen::Error) -> Self {
        Error(format!("rcgen: {e}"))
    }
}
pub type Result<T> = std::result::Result<T, Error>;
fn fail<T>(msg: impl Into<String>) -> Result<T> {
    Err(Error(msg.into()))
}

fn oid(c: &[u64]) -> ObjectIdentifier {
    ObjectIdentifier::from_slice(c)
}
fn is(o: &ObjectIdentifier, c: &[u64]) -> bool {
    o.components().as_slice() == c
}
fn hash_of(o: &ObjectIdentifier) -> Option<&'static DigestAlg> {
    let c = o.components().as_slice();
    Some(match () {
        _ if c == SHA1 => &digest::SHA1_FOR_LEGACY_USE_ONLY,
        _ if c == SHA256 => &digest::SHA256,
        _ if c == SHA384 => &digest::SHA384,
        _ if c == SHA512 => &digest::SHA512,
        _ => return None,
    })
}
/// AlgorithmIdentifier with absent parameters (RFC 5754 / RFC 5758) or NULL (RSA, RFC 4055).
fn write_alg(w: DERWriter, c: &[u64], null: bool) {
    w.write_sequence(|w| {
        w.next().write_oid(&oid(c));
        if null {
            w.next().write_null();
        }
    })
}
fn read_alg(r: BERReader) -> ASN1Result<ObjectIdentifier> {
    r.read_sequence(|r| {
        let o = r.next().read_oid()?;
        skip_rest(r)?;
        Ok(o)
    })
}
/// Skips whatever elements remain in a SEQUENCE (optional fields we do not need).
fn skip_rest(r: &mut BERReaderSeq) -> ASN1Result<()> {
    while r.read_optional(|r| r.read_der())?.is_some() {}
    Ok(())
}
fn peek(r: &mut BERReaderSeq) -> ASN1Result<Option<Tag>> {
    r.read_optional(|r| r.lookahead_tag())
}

/// The subject (common name) of the development TSA's certificate that
/// `custodia init` makes: a TSA signing with the operator's own clock,
/// never an independent source of time.
pub const DEVELOPMENT_TSA_NAME: &str = "Custodia development TSA";

/// Whether `cert_pem` is a development TSA's certificate (its subject names
/// [`DEVELOPMENT_TSA_NAME`]): its tokens say only what the clock of the
/// machine that signed them said.
pub fn is_development_cert(cert_pem: &str) -> bool {
    parse_cert(cert_pem).is_ok_and(|c| {
        c.subject
            .windows(DEVELOPMENT_TSA_NAME.len())
            .any(|w| w == DEVELOPMENT_TSA_NAME.as_bytes())
    })
}

struct Cert {
    der: Vec<u8>,
    subject: Vec<u8>, // raw Name TLV
    issuer: Vec<u8>,  // raw Name TLV
    serial: Vec<u8>,  // raw INTEGER TLV
    key_alg: ObjectIdentifier,
    curve: Option<ObjectIdentifier>,
    key: Vec<u8>, // subjectPublicKey BIT STRING contents
}

/// Whether `cert_pem` holds a certificate [`verify_response`] can check
/// tokens with (its first, in PEM), before any token is looked at.
pub fn check_cert(cert_pem: &str) -> Result<()> {
    parse_cert(cert_pem).map(|_| ())
}

fn parse_cert(cert_pem: &str) -> Result<Cert> {
    let der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
        .map_err(|e| Error(format!("certificate PEM: {e}")))?
        .to_vec();
    let (serial, issuer, subject, key_alg, curve, key) = yasna::parse_ber(&der, |r| {
        r.read_sequence(|r| {
            let tbs = r.next().read_sequence(|r| {
                r.read_optional(|r| r.read_tagged(Tag::context(0), |r| r.read_der()))?;
                let serial = r.next().read_der()?;
                r.next().read_der()?; // signature
                let issuer = r.next().read_der()?;
                r.next().read_der()?; // validity
                let subject = r.next().read_der()?;
                let (alg, curve, key) = r.next().read_sequence(|r| {
                    let (alg, curve) = r.next().read_sequence(|r| {
                        let a = r.next().read_oid()?;
                        let c = r.read_optional(|r| r.read_oid())?;
                        skip_rest(r)?;
                        Ok((a, c))
                    })?;
                    Ok((alg, curve, r.next().read_bitvec_bytes()?.0))
                })?;
                skip_rest(r)?;
                Ok((serial, issuer, subject, alg, curve, key))
            })?;
            skip_rest(r)?;
            Ok(tbs)
        })
    })?;
    Ok(Cert {
        der,
        subject,
        issuer,
        serial,
        key_alg,
        curve,
        key,
    })
}

#[cfg(feature = "tsa-server")]
/// Creates a self-signed ECDSA P-256 TSA certificate (100 years, critical EKU timeStamping,
/// critical KU digitalSignature+nonRepudiation, no basicConstraints). Returns (cert PEM, PKCS#8 key PEM).
pub fn make_tsa(name: &str) -> Result<(String, String)> {
    let key = rcgen::KeyPair::generate()?; // PKCS_ECDSA_P256_SHA256
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name.push(rcgen::DnType::CommonName, name);
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::days(1);
    p.not_after = now + time::Duration::days(36525);
    p.key_usages = vec![
        rcgen::KeyUsagePurpose::DigitalSignature,
        rcgen::KeyUsagePurpose::ContentCommitment,
    ];
    // rcgen writes `extended_key_usages` as NON-critical; RFC 3161 (and openssl) need critical.
    let eku =
        yasna::construct_der(|w| w.write_sequence(|w| w.next().write_oid(&oid(KP_TIMESTAMPING))));
    let mut ext = rcgen::CustomExtension::from_oid_content(EXT_EKU, eku);
    ext.set_criticality(true);
    p.custom_extensions.push(ext);
    let cert = p.self_signed(&key)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Builds a DER TimeStampReq: v1, SHA-256 imprint, nonce, certReq=TRUE.
pub fn request(sha256: [u8; 32], nonce: u64) -> Vec<u8> {
    yasna::construct_der(|w| {
        w.write_sequence(|w| {
            w.next().write_u8(1);
            w.next().write_sequence(|w| {
                write_alg(w.next(), SHA256, false);
                w.next().write_bytes(&sha256);
            });
            w.next().write_u64(nonce);
            w.next().write_bool(true);
        })
    })
}

/// A random 63-bit nonce for [`request`].
pub fn random_nonce() -> u64 {
    let mut b = [0u8; 8];
    SystemRandom::new().fill(&mut b).expect("system RNG");
    u64::from_be_bytes(b) >> 1
}

#[cfg(feature = "tsa-server")]
struct Req {
    imprint: Vec<u8>,       // raw MessageImprint TLV, echoed verbatim into TSTInfo
    nonce: Option<Vec<u8>>, // raw INTEGER TLV, echoed verbatim
    cert_req: bool,
}

// PKIFailureInfo bit numbers (RFC 3161 2.4.2)
#[cfg(feature = "tsa-server")]
const BAD_ALG: usize = 0;
#[cfg(feature = "tsa-server")]
const BAD_REQUEST: usize = 2;
#[cfg(feature = "tsa-server")]
const BAD_DATA_FORMAT: usize = 5;
#[cfg(feature = "tsa-server")]
const UNACCEPTED_POLICY: usize = 15;
#[cfg(feature = "tsa-server")]
const UNACCEPTED_EXTENSION: usize = 16;

#[cfg(feature = "tsa-server")]
fn parse_request(der: &[u8]) -> std::result::Result<Req, (usize, &'static str)> {
    let (version, imprint, policy, nonce, cert_req, ext) = yasna::parse_der(der, |r| {
        r.read_sequence(|r| {
            let version = r.next().read_u64()?;
            let imprint = r.next().read_der()?;
            let (mut policy, mut nonce, mut cert_req, mut ext) = (None, None, false, false);
            while let Some(t) = peek(r)? {
                if t == TAG_OID {
                    policy = Some(r.next().read_oid()?);
                } else if t == TAG_INTEGER {
                    nonce = Some(r.next().read_der()?);
                } else if t == TAG_BOOLEAN {
                    cert_req = r.next().read_bool()?;
                } else {
                    ext = true;
                    r.next().read_der()?;
                }
            }
            Ok((version, imprint, policy, nonce, cert_req, ext))
        })
    })
    .map_err(|_| (BAD_DATA_FORMAT, "malformed TimeStampReq (DER expected)"))?;
    if version != 1 {
        return Err((BAD_REQUEST, "unsupported TimeStampReq version"));
    }
    let (alg, hash) = yasna::parse_der(&imprint, |r| {
        r.read_sequence(|r| Ok((read_alg(r.next())?, r.next().read_bytes()?)))
    })
    .map_err(|_| (BAD_DATA_FORMAT, "malformed MessageImprint"))?;
    match hash_of(&alg) {
        Some(h) if !is(&alg, SHA1) && h.output_len() == hash.len() => {}
        _ => return Err((BAD_ALG, "unsupported imprint hash (want SHA-256/384/512)")),
    }
    if policy.is_some_and(|p| !is(&p, TSA_POLICY)) {
        return Err((UNACCEPTED_POLICY, "requested policy not supported"));
    }
    if ext {
        return Err((UNACCEPTED_EXTENSION, "request extensions not supported"));
    }
    Ok(Req {
        imprint,
        nonce,
        cert_req,
    })
}

#[cfg(feature = "tsa-server")]
fn rejection(bit: usize, text: &str) -> Vec<u8> {
    let mut bits = vec![0u8; bit / 8 + 1];
    bits[bit / 8] = 0x80 >> (bit % 8);
    yasna::construct_der(|w| {
        w.write_sequence(|w| {
            w.next().write_sequence(|w| {
                w.next().write_u8(2); // rejection
                w.next()
                    .write_sequence(|w| w.next().write_utf8_string(text));
                w.next().write_bitvec_bytes(&bits, bit + 1);
            })
        })
    })
}

#[cfg(feature = "tsa-server")]
/// TSA side: DER TimeStampReq in, DER TimeStampResp out. Bad requests yield a `rejection`
/// response (status 2 + failInfo), not an `Err`; `Err` means the TSA key/cert/clock is unusable.
/// `now` is unix seconds (genTime, UTC, whole seconds; accuracy 1 s).
pub fn timestamp(req_der: &[u8], cert_pem: &str, key_pem: &str, now: u64) -> Result<Vec<u8>> {
    let key = rcgen::KeyPair::from_pem(key_pem)?;
    let cert = parse_cert(cert_pem)?;
    let req = match parse_request(req_der) {
        Ok(r) => r,
        Err((bit, text)) => return Ok(rejection(bit, text)),
    };
    // CMS digestAlgorithm must be the hash the signature uses (openssl hashes with it).
    let a = key.algorithm();
    let (dig, dig_oid, sig_oid, sig_null) = if a == &rcgen::PKCS_ECDSA_P256_SHA256 {
        (&digest::SHA256, SHA256, ECDSA_SHA256, false)
    } else if a == &rcgen::PKCS_ECDSA_P384_SHA384 {
        (&digest::SHA384, SHA384, ECDSA_SHA384, false)
    } else if a == &rcgen::PKCS_RSA_SHA256 {
        (&digest::SHA256, SHA256, RSA_SHA256, true)
    } else {
        return fail("unsupported TSA key algorithm (use ECDSA P-256/P-384 or RSA)");
    };
    let t =
        time::OffsetDateTime::from_unix_timestamp(now as i64).map_err(|e| Error(e.to_string()))?;
    let gen_time =
        GeneralizedTime::from_datetime_opt(t).ok_or(Error("genTime out of range".into()))?;
    let mut serial = [0u8; 16];
    SystemRandom::new()
        .fill(&mut serial)
        .map_err(|_| Error("RNG failure".into()))?;
    serial[0] = (serial[0] & 0x7f) | 0x40; // positive, 16 bytes, unique enough

    let tst = yasna::construct_der(|w| {
        w.write_sequence(|w| {
            w.next().write_u8(1); // version
            w.next().write_oid(&oid(TSA_POLICY));
            w.next().write_der(&req.imprint);
            w.next().write_bigint_bytes(&serial, true);
            w.next().write_generalized_time(&gen_time);
            w.next().write_sequence(|w| w.next().write_u8(1)); // accuracy { seconds 1 }
            if let Some(n) = &req.nonce {
                w.next().write_der(n);
            }
        })
    });
    let tst_digest = digest::digest(dig, &tst);
    let cert_sha256 = digest::digest(&digest::SHA256, &cert.der);
    // SignedAttributes, DER SET OF (yasna sorts the elements): signed over with tag 0x31.
    let attrs = yasna::construct_der(|w| {
        w.write_set_of(|s| {
            s.next().write_sequence(|w| {
                w.next().write_oid(&oid(AT_CONTENT_TYPE));
                w.next()
                    .write_set_of(|s| s.next().write_oid(&oid(CT_TSTINFO)));
            });
            s.next().write_sequence(|w| {
                w.next().write_oid(&oid(AT_MESSAGE_DIGEST));
                w.next()
                    .write_set_of(|s| s.next().write_bytes(tst_digest.as_ref()));
            });
            // SigningCertificateV2 { certs SEQ OF ESSCertIDv2 { hashAlgorithm DEFAULT sha256 (omitted), certHash } }
            s.next().write_sequence(|w| {
                w.next().write_oid(&oid(AT_SIGNING_CERT_V2));
                w.next().write_set_of(|s| {
                    s.next().write_sequence(|w| {
                        w.next().write_sequence(|w| {
                            w.next()
                                .write_sequence(|w| w.next().write_bytes(cert_sha256.as_ref()))
                        })
                    })
                });
            });
        })
    });
    let sig = rcgen::SigningKey::sign(&key, &attrs)?;
    let mut attrs_implicit = attrs;
    attrs_implicit[0] = 0xA0; // [0] IMPLICIT in SignerInfo

    let token = yasna::construct_der(|w| {
        w.write_sequence(|w| {
            w.next().write_oid(&oid(SIGNED_DATA));
            w.next().write_tagged(Tag::context(0), |w| {
                w.write_sequence(|w| {
                    w.next().write_u8(3); // eContentType != id-data
                    w.next()
                        .write_set_of(|s| write_alg(s.next(), dig_oid, false));
                    w.next().write_sequence(|w| {
                        w.next().write_oid(&oid(CT_TSTINFO));
                        w.next()
                            .write_tagged(Tag::context(0), |w| w.write_bytes(&tst));
                    });
                    if req.cert_req {
                        w.next().write_tagged_implicit(Tag::context(0), |w| {
                            w.write_set_of(|s| s.next().write_der(&cert.der))
                        });
                    }
                    w.next().write_set_of(|s| {
                        s.next().write_sequence(|w| {
                            w.next().write_u8(1); // sid = issuerAndSerialNumber
                            w.next().write_sequence(|w| {
                                w.next().write_der(&cert.issuer);
                                w.next().write_der(&cert.serial);
                            });
                            write_alg(w.next(), dig_oid, false);
                            w.next().write_der(&attrs_implicit);
                            write_alg(w.next(), sig_oid, sig_null);
                            w.next().write_bytes(&sig);
                        })
                    });
                })
            });
        })
    });
    Ok(yasna::construct_der(|w| {
        w.write_sequence(|w| {
            w.next().write_sequence(|w| w.next().write_u8(0)); // granted
            w.next().write_der(&token);
        })
    }))
}

struct Signer {
    digest_alg: ObjectIdentifier,
    attrs: Option<Vec<u8>>,
    sig_alg: ObjectIdentifier,
    sig: Vec<u8>,
}

fn int_is(bytes: &[u8], n: u64) -> bool {
    let b: Vec<u8> = bytes.iter().copied().skip_while(|&x| x == 0).collect();
    let nb = n.to_be_bytes();
    let nb: Vec<u8> = nb.iter().copied().skip_while(|&x| x == 0).collect();
    b == nb
}

fn verification_alg(
    cert: &Cert,
    sig_alg: &ObjectIdentifier,
    dig_alg: &ObjectIdentifier,
) -> Result<&'static dyn VerificationAlgorithm> {
    let s = sig_alg.components().as_slice();
    let h = match () {
        _ if s == ECDSA_SHA256 || s == RSA_SHA256 => SHA256,
        _ if s == ECDSA_SHA384 || s == RSA_SHA384 => SHA384,
        _ if s == ECDSA_SHA512 || s == RSA_SHA512 => SHA512,
        _ if s == RSA || s == EC_PUBKEY => dig_alg.components().as_slice(),
        _ if s == ED25519 => ED25519,
        _ => return fail(format!("unsupported signatureAlgorithm {sig_alg}")),
    };
    let k = cert.key_alg.components().as_slice();
    let curve = cert.curve.as_ref().map(|c| c.components().as_slice());
    Ok(match (k, curve, h) {
        (EC_PUBKEY, Some(P256), SHA256) => &signature::ECDSA_P256_SHA256_ASN1,
        (EC_PUBKEY, Some(P256), SHA384) => &signature::ECDSA_P256_SHA384_ASN1,
        (EC_PUBKEY, Some(P384), SHA256) => &signature::ECDSA_P384_SHA256_ASN1,
        (EC_PUBKEY, Some(P384), SHA384) => &signature::ECDSA_P384_SHA384_ASN1,
        (RSA, _, SHA256) => &signature::RSA_PKCS1_2048_8192_SHA256,
        (RSA, _, SHA384) => &signature::RSA_PKCS1_2048_8192_SHA384,
        (RSA, _, SHA512) => &signature::RSA_PKCS1_2048_8192_SHA512,
        (ED25519, _, ED25519) => &signature::ED25519,
        _ => return fail("TSA key / signature algorithm combination not supported"),
    })
}

/// Client side: checks a DER TimeStampResp against the request's SHA-256 imprint and nonce and the
/// TSA certificate (PEM) the caller trusts. Returns genTime as unix seconds.
/// Checks: status granted(0)/grantedWithMods(1); ContentInfo signedData; eContentType TSTInfo;
/// exactly one SignerInfo; signed attrs content-type + message-digest; ESSCertID(v2) hash == cert;
/// signature over the signed attrs with the cert's key; TSTInfo v1, imprint, nonce.
/// The certificate is the trust anchor (no chain is built), but it must
/// be one for time-stamping (RFC 3161 §2.3: a critical extendedKeyUsage
/// naming id-kp-timeStamping) and valid at genTime. Not checked: policy.
pub fn verify_response(
    resp_der: &[u8],
    sha256: &[u8; 32],
    nonce: Option<u64>,
    cert_pem: &str,
) -> Result<u64> {
    let cert = parse_cert(cert_pem)?;
    let (status, text, token) = yasna::parse_ber(resp_der, |r| {
        r.read_sequence(|r| {
            let (status, text) = r.next().read_sequence(|r| {
                let s = r.next().read_u64()?;
                let t = r.read_optional(|r| r.collect_sequence_of(|r| r.read_utf8string()))?;
                skip_rest(r)?;
                Ok((s, t))
            })?;
            Ok((status, text, r.read_optional(|r| r.read_der())?))
        })
    })?;
    if status > 1 {
        return fail(format!(
            "TSA refused: status {status} {}",
            text.unwrap_or_default().join("; ")
        ));
    }
    let Some(token) = token else {
        return fail("granted response without timeStampToken");
    };

    let (ct, ect, tst, signers) = yasna::parse_ber(&token, |r| {
        r.read_sequence(|r| {
            let ct = r.next().read_oid()?;
            let sd = r.next().read_tagged(Tag::context(0), |r| {
                r.read_sequence(|r| {
                    r.next().read_u64()?; // version
                    r.next().read_der()?; // digestAlgorithms
                    let (ect, tst) = r.next().read_sequence(|r| {
                        let o = r.next().read_oid()?;
                        Ok((
                            o,
                            r.next().read_tagged(Tag::context(0), |r| r.read_bytes())?,
                        ))
                    })?;
                    // certificates [0] / crls [1]: skipped, the caller supplies the TSA cert.
                    while peek(r)?.is_some_and(|t| t.tag_class == TagClass::ContextSpecific) {
                        r.next().read_der()?;
                    }
                    let signers = r.next().collect_set_of(|r| {
                        r.read_sequence(|r| {
                            r.next().read_u64()?; // version
                            r.next().read_der()?; // sid (the signature check binds the signer)
                            let digest_alg = read_alg(r.next())?;
                            let attrs = if peek(r)? == Some(Tag::context(0)) {
                                Some(r.next().read_der()?)
                            } else {
                                None
                            };
                            let sig_alg = read_alg(r.next())?;
                            let sig = r.next().read_bytes()?;
                            skip_rest(r)?; // unsignedAttrs
                            Ok(Signer {
                                digest_alg,
                                attrs,
                                sig_alg,
                                sig,
                            })
                        })
                    })?;
                    Ok((ect, tst, signers))
                })
            })?;
            Ok((ct, sd.0, sd.1, sd.2))
        })
    })?;
    if !is(&ct, SIGNED_DATA) || !is(&ect, CT_TSTINFO) {
        return fail("token is not a SignedData over TSTInfo");
    }
    let [s] = signers.as_slice() else {
        return fail("token must have exactly one SignerInfo");
    };
    let Some(attrs_implicit) = &s.attrs else {
        return fail("SignerInfo without signed attributes");
    };
    let mut attrs = attrs_implicit.clone();
    attrs[0] = 0x31; // signature is over the SET OF encoding
    let list: Vec<(ObjectIdentifier, Vec<u8>)> = yasna::parse_ber(&attrs, |r| {
        r.collect_set_of(|r| {
            r.read_sequence(|r| {
                let o = r.next().read_oid()?;
                let vals = r.next().collect_set_of(|r| r.read_der())?;
                Ok((o, vals.into_iter().next().unwrap_or_default()))
            })
        })
    })?;
    let attr = |c: &[u64]| {
        list.iter()
            .find(|(o, _)| is(o, c))
            .map(|(_, v)| v.as_slice())
    };

    let Some(ct_attr) = attr(AT_CONTENT_TYPE) else {
        return fail("no content-type attribute");
    };
    if !is(&yasna::parse_der(ct_attr, |r| r.read_oid())?, CT_TSTINFO) {
        return fail("content-type attribute is not id-ct-TSTInfo");
    }
    let Some(md_attr) = attr(AT_MESSAGE_DIGEST) else {
        return fail("no message-digest attribute");
    };
    // SHA-1 binds nothing any more (chosen-prefix collisions): a TSA that
    // signed one TSTInfo would have signed another with the same digest.
    if is(&s.digest_alg, SHA1) {
        return fail("the token's signature covers its TSTInfo by SHA-1, which binds nothing");
    }
    let Some(dig) = hash_of(&s.digest_alg) else {
        return fail("unsupported digestAlgorithm");
    };
    if yasna::parse_der(md_attr, |r| r.read_bytes())? != digest::digest(dig, &tst).as_ref() {
        return fail("message-digest does not match TSTInfo");
    }
    // ESSCertIDv2 { hashAlgorithm DEFAULT sha256, certHash, issuerSerial OPT } / ESSCertID { sha1 certHash, .. }
    let (ess_alg, ess_hash) = if let Some(v) = attr(AT_SIGNING_CERT_V2) {
        yasna::parse_ber(v, |r| {
            r.read_sequence(|r| {
                let first = r.next().read_sequence(|r| {
                    let first = r.next().read_sequence(|r| {
                        let alg = if peek(r)? == Some(TAG_SEQUENCE) {
                            read_alg(r.next())?
                        } else {
                            oid(SHA256)
                        };
                        let h = r.next().read_bytes()?;
                        skip_rest(r)?; // issuerSerial
                        Ok((alg, h))
                    })?;
                    skip_rest(r)?; // further ESSCertIDv2 (chain)
                    Ok(first)
                })?;
                skip_rest(r)?; // policies
                Ok(first)
            })
        })?
    } else if let Some(v) = attr(AT_SIGNING_CERT) {
        let h = yasna::parse_ber(v, |r| {
            r.read_sequence(|r| {
                let h = r.next().read_sequence(|r| {
                    let h = r.next().read_sequence(|r| {
                        let h = r.next().read_bytes()?;
                        skip_rest(r)?;
                        Ok(h)
                    })?;
                    skip_rest(r)?;
                    Ok(h)
                })?;
                skip_rest(r)?;
                Ok(h)
            })
        })?;
        (oid(SHA1), h)
    } else {
        return fail("no signingCertificate(V2) attribute");
    };
    let Some(ess_dig) = hash_of(&ess_alg) else {
        return fail("unsupported ESSCertIDv2 hash");
    };
    if digest::digest(ess_dig, &cert.der).as_ref() != ess_hash.as_slice() {
        return fail("token was not issued for the given TSA certificate (ESSCertID mismatch)");
    }
    let alg = verification_alg(&cert, &s.sig_alg, &s.digest_alg)?;
    signature::UnparsedPublicKey::new(alg, &cert.key)
        .verify(&attrs, &s.sig)
        .map_err(|_| Error("bad TSA signature".into()))?;

    let (version, imp_alg, imp_hash, gen_time, tst_nonce) = yasna::parse_ber(&tst, |r| {
        r.read_sequence(|r| {
            let version = r.next().read_u64()?;
            r.next().read_oid()?; // policy
            let (a, h) = r
                .next()
                .read_sequence(|r| Ok((read_alg(r.next())?, r.next().read_bytes()?)))?;
            r.next().read_der()?; // serialNumber
            let gen_time = r.next().read_generalized_time()?;
            let mut nonce = None; // accuracy, ordering, nonce, tsa, extensions: only nonce is an INTEGER
            while let Some(t) = peek(r)? {
                if t == TAG_INTEGER {
                    nonce = Some(r.next().read_bigint_bytes()?);
                } else {
                    r.next().read_der()?;
                }
            }
            Ok((version, a, h, gen_time, nonce))
        })
    })?;
    if version != 1 {
        return fail("TSTInfo version is not 1");
    }
    if !is(&imp_alg, SHA256) || imp_hash != sha256 {
        return fail("messageImprint does not match the request");
    }
    match (nonce, tst_nonce) {
        // Offline verifiers did not make the request and know no nonce.
        (None, _) => {}
        (Some(nonce), Some((n, true))) if int_is(&n, nonce) => {}
        _ => return fail("nonce missing or different"),
    }
    let gen_time = u64::try_from(gen_time.datetime().unix_timestamp())
        .map_err(|_| Error("genTime before 1970".into()))?;
    check_tsa_use(&cert.der, gen_time)?;
    Ok(gen_time)
}

/// That the TSA certificate is one for time-stamping and was valid at
/// `gen_time` (Unix seconds): a token signed by a key certified for
/// something else, or before or after its certificate's life, says nothing.
fn check_tsa_use(der: &[u8], gen_time: u64) -> Result<()> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| Error(format!("TSA certificate: {e}")))?;
    let validity = cert.validity();
    let t = i64::try_from(gen_time).unwrap_or(i64::MAX);
    if t < validity.not_before.timestamp() || t > validity.not_after.timestamp() {
        return fail(format!(
            "the token's genTime ({gen_time}) is outside its TSA certificate's validity \
             ({} to {})",
            validity.not_before, validity.not_after
        ));
    }
    match cert.extended_key_usage() {
        Ok(Some(eku)) if !eku.value.time_stamping => {
            fail("the TSA certificate is not for time-stamping (no id-kp-timeStamping)")
        }
        Ok(Some(eku)) if !eku.critical => {
            fail("the TSA certificate's extendedKeyUsage is not critical (RFC 3161 §2.3)")
        }
        // id-kp-timeStamping alone (RFC 3161 §2.3; OpenSSL refuses the
        // purposes it knows, this any other too): a key certified for
        // serving TLS as well is not a TSA's.
        Ok(Some(eku))
            if eku.value.any
                || eku.value.server_auth
                || eku.value.client_auth
                || eku.value.code_signing
                || eku.value.email_protection
                || eku.value.ocsp_signing
                || !eku.value.other.is_empty() =>
        {
            fail("the TSA certificate is for other uses than time-stamping too: it must be for id-kp-timeStamping only (RFC 3161 §2.3)")
        }
        Ok(Some(_)) => Ok(()),
        Ok(None) => fail("the TSA certificate has no extendedKeyUsage id-kp-timeStamping"),
        Err(e) => fail(format!("the TSA certificate's extendedKeyUsage: {e}")),
    }
}
