//! Our RFC 3161 TSA against openssl, both ways: `openssl ts -verify` accepts
//! our tokens, and our verifier accepts openssl's.
use protocol::tsa::*;
use std::path::Path;
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

fn sha256(data: &[u8]) -> [u8; 32] {
    ring::digest::digest(&ring::digest::SHA256, data)
        .as_ref()
        .try_into()
        .unwrap()
}
fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
fn openssl(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("$ openssl {}\n{text}", args.join(" "));
    text
}
/// Whether openssl runs (Debian `openssl`; .ci/run installs it). Without it
/// the test says SKIPPED and passes, or fails where CUSTODIA_REQUIRE_TOOLS is
/// set (as .ci/run sets it), like the custodia-tests crate's `require`.
fn have_openssl(test: &str) -> bool {
    let why = match Command::new("openssl").arg("version").output() {
        Ok(out) if out.status.success() => return true,
        Ok(out) => format!("{}: {}", out.status, String::from_utf8_lossy(&out.stderr)),
        Err(e) => e.to_string(),
    };
    let needs = format!("{test} needs openssl (Debian openssl; .ci/run installs it)");
    if std::env::var_os("CUSTODIA_REQUIRE_TOOLS").is_some_and(|v| !v.is_empty()) {
        panic!("{needs}, and CUSTODIA_REQUIRE_TOOLS is set: `openssl version`: {why}");
    }
    println!("SKIPPED: {needs}");
    // And on stderr, unbuffered: libtest captures println! unless --nocapture.
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr(), "SKIPPED: {needs}");
    false
}
/// A scratch directory, removed when the guard drops.
fn scratch(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("custodia-tsa-{name}-"))
        .tempdir()
        .unwrap()
}
fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[test]
fn our_tsa_is_accepted_by_openssl_and_our_client() {
    if !have_openssl("our_tsa_is_accepted_by_openssl_and_our_client") {
        return;
    }
    let guard = scratch("ours");
    let dir = guard.path().to_path_buf();
    let (cert, key) = make_tsa("tsaprobe TSA").unwrap();
    let data = b"hello time-stamping\n";
    let digest = sha256(data);
    let nonce = 0x8123_4567_89ab_cdef; // high bit set: exercises INTEGER zero padding
    let req = request(digest, nonce);
    let t = now();
    let resp = timestamp(&req, &cert, &key, t).unwrap();
    std::fs::write(dir.join("tsa.pem"), &cert).unwrap();
    std::fs::write(dir.join("data.bin"), data).unwrap();
    std::fs::write(dir.join("req.tsq"), &req).unwrap();
    std::fs::write(dir.join("resp.tsr"), &resp).unwrap();
    openssl(&dir, &["x509", "-in", "tsa.pem", "-noout", "-text"]);
    openssl(&dir, &["ts", "-reply", "-in", "resp.tsr", "-text"]);
    let d = hex(&digest);
    for args in [
        vec![
            "ts", "-verify", "-digest", &d, "-in", "resp.tsr", "-CAfile", "tsa.pem",
        ],
        vec![
            "ts", "-verify", "-data", "data.bin", "-in", "resp.tsr", "-CAfile", "tsa.pem",
        ],
        vec![
            "ts",
            "-verify",
            "-queryfile",
            "req.tsq",
            "-in",
            "resp.tsr",
            "-CAfile",
            "tsa.pem",
        ],
    ] {
        assert!(
            openssl(&dir, &args).contains("Verification: OK"),
            "{args:?}"
        );
    }
    // our client
    assert_eq!(
        verify_response(&resp, &digest, Some(nonce), &cert).unwrap(),
        t
    );
    // An offline verifier knows no nonce: everything else is still checked.
    assert_eq!(verify_response(&resp, &digest, None, &cert).unwrap(), t);
    assert!(verify_response(&resp, &sha256(b"other"), Some(nonce), &cert).is_err());
    assert!(verify_response(&resp, &digest, Some(nonce + 1), &cert).is_err());
    let (other_cert, _) = make_tsa("other").unwrap();
    assert!(verify_response(&resp, &digest, Some(nonce), &other_cert).is_err());
    let mut bad = resp.clone();
    let n = bad.len();
    bad[n - 5] ^= 1; // inside the signature
    assert!(verify_response(&bad, &digest, Some(nonce), &cert).is_err());
    // openssl-built request (no nonce variant too) through our TSA
    std::fs::remove_file(dir.join("req.tsq")).unwrap();
    openssl(
        &dir,
        &[
            "ts", "-query", "-data", "data.bin", "-sha256", "-cert", "-out", "req.tsq",
        ],
    );
    let req2 = std::fs::read(dir.join("req.tsq")).unwrap();
    std::fs::write(
        dir.join("resp2.tsr"),
        timestamp(&req2, &cert, &key, now()).unwrap(),
    )
    .unwrap();
    let v = openssl(
        &dir,
        &[
            "ts",
            "-verify",
            "-queryfile",
            "req.tsq",
            "-in",
            "resp2.tsr",
            "-CAfile",
            "tsa.pem",
        ],
    );
    assert!(v.contains("Verification: OK"));
}

#[test]
fn bad_requests_get_rejection_responses() {
    let (cert, key) = make_tsa("tsaprobe TSA").unwrap();
    let resp = timestamp(b"\x30\x03\x02\x01\x01", &cert, &key, now()).unwrap();
    let e = verify_response(&resp, &[0; 32], Some(1), &cert).unwrap_err();
    assert!(e.0.contains("status 2"), "{e}");
    // policy we do not serve
    let mut req = request([7; 32], 5);
    req.truncate(req.len() - 3); // drop certReq
    let polreq = yasna::construct_der(|w| {
        w.write_sequence(|w| {
            w.next().write_u8(1);
            w.next().write_der(&req[5..5 + 2 + req[6] as usize]); // messageImprint TLV
            w.next()
                .write_oid(&yasna::models::ObjectIdentifier::from_slice(&[1, 2, 3, 9]));
        })
    });
    let e = verify_response(
        &timestamp(&polreq, &cert, &key, now()).unwrap(),
        &[7; 32],
        Some(5),
        &cert,
    )
    .unwrap_err();
    assert!(e.0.contains("policy"), "{e}");
}

/// openssl as a foreign TSA (RSA + ESSCertID v1/SHA-1, and EC P-384 + SHA-384 + ESSCertIDv2).
#[test]
fn our_client_accepts_openssl_tsa() {
    if !have_openssl("our_client_accepts_openssl_tsa") {
        return;
    }
    // (A TSA signing its TSTInfo by SHA-1 is refused: SHA-1 binds nothing.)
    for (kind, newkey, md, ess) in [
        ("rsa", "rsa:2048", "sha256", "sha1"),
        ("ec", "ec", "sha384", "sha256"),
        ("rsa-sha1", "rsa:2048", "sha1", "sha256"),
    ] {
        let guard = scratch(kind);
        let dir = guard.path().to_path_buf();
        let mut args = vec![
            "req",
            "-x509",
            "-nodes",
            "-days",
            "30",
            "-subj",
            "/CN=ext TSA",
            "-keyout",
            "k.pem",
            "-out",
            "c.pem",
        ];
        args.extend([
            "-addext",
            "extendedKeyUsage=critical,timeStamping",
            "-addext",
            "keyUsage=critical,digitalSignature",
        ]);
        if kind == "ec" {
            args.extend(["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-384"]);
        } else {
            args.extend(["-newkey", newkey]);
        }
        openssl(&dir, &args);
        let cnf = format!(
            "[tsa]\ndefault_tsa=t\n[t]\nserial={d}/serial\ncrypto_device=builtin\nsigner_cert={d}/c.pem\n\
             signer_key={d}/k.pem\nsigner_digest={md}\ndefault_policy=1.2.3.4.1\ndigests=sha256\n\
             accuracy=secs:1\ness_cert_id_alg={ess}\n",
            d = dir.display()
        );
        std::fs::write(dir.join("tsa.cnf"), cnf).unwrap();
        std::fs::write(dir.join("serial"), "01\n").unwrap();
        let digest = sha256(b"external");
        let nonce = 42;
        std::fs::write(dir.join("q.tsq"), request(digest, nonce)).unwrap();
        openssl(
            &dir,
            &[
                "ts",
                "-reply",
                "-config",
                "tsa.cnf",
                "-queryfile",
                "q.tsq",
                "-out",
                "r.tsr",
            ],
        );
        let resp = std::fs::read(dir.join("r.tsr")).unwrap();
        let cert = std::fs::read_to_string(dir.join("c.pem")).unwrap();
        if md == "sha1" {
            let e = verify_response(&resp, &digest, Some(nonce), &cert).unwrap_err();
            assert!(e.0.contains("SHA-1"), "{kind}: {e}");
            continue;
        }
        let t = verify_response(&resp, &digest, Some(nonce), &cert)
            .unwrap_or_else(|e| panic!("{kind}: {e}"));
        assert!(t.abs_diff(now()) < 120, "{kind}");
        assert!(verify_response(&resp, &digest, Some(nonce + 1), &cert).is_err());
    }
}

/// A development TSA's certificate says what it is (its tokens carry only
/// its machine's clock); any other TSA's does not pass for one.
#[test]
fn a_development_tsa_is_told_by_its_certificate() {
    let (dev, _) = make_tsa(DEVELOPMENT_TSA_NAME).unwrap();
    let (other, _) = make_tsa("tsaprobe TSA").unwrap();
    assert!(is_development_cert(&dev));
    assert!(!is_development_cert(&other));
    assert!(!is_development_cert("not a certificate"));
}

/// A token is worth only what its TSA certificate vouches for: one signed
/// outside the certificate's validity, or by a key certified for something
/// other than time-stamping (RFC 3161 §2.3), is refused.
#[test]
fn tokens_outside_the_certificates_life_or_use_are_refused() {
    let (cert, key) = make_tsa("tsaprobe TSA").unwrap();
    let digest = sha256(b"when?");
    let req = request(digest, 7);
    let good = timestamp(&req, &cert, &key, now()).unwrap();
    assert!(verify_response(&good, &digest, Some(7), &cert).is_ok());
    // The certificate begins a day before now: a token "from 2001" is not
    // one it vouches for.
    let early = timestamp(&req, &cert, &key, 1_000_000_000).unwrap();
    let e = verify_response(&early, &digest, Some(7), &cert).unwrap_err();
    assert!(e.0.contains("validity"), "{e}");
    // A key certified without id-kp-timeStamping.
    let other = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(vec!["not-a-tsa.example".into()]).unwrap();
    p.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(1);
    let plain = p.self_signed(&other).unwrap().pem();
    let token = timestamp(&req, &plain, &other.serialize_pem(), now()).unwrap();
    let e = verify_response(&token, &digest, Some(7), &plain).unwrap_err();
    assert!(e.0.contains("timeStamping"), "{e}");
    // A key certified (critically) for time-stamping and for TLS servers
    // too: RFC 3161 §2.3, and OpenSSL, want time-stamping alone.
    let wide_key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(vec!["wide.example".into()]).unwrap();
    p.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(1);
    let oid = yasna::models::ObjectIdentifier::from_slice;
    let eku = yasna::construct_der(|w| {
        w.write_sequence(|w| {
            w.next().write_oid(&oid(&[1, 3, 6, 1, 5, 5, 7, 3, 8]));
            w.next().write_oid(&oid(&[1, 3, 6, 1, 5, 5, 7, 3, 1]));
        })
    });
    let mut ext = rcgen::CustomExtension::from_oid_content(&[2, 5, 29, 37], eku);
    ext.set_criticality(true);
    p.custom_extensions.push(ext);
    let wide = p.self_signed(&wide_key).unwrap().pem();
    let token = timestamp(&req, &wide, &wide_key.serialize_pem(), now()).unwrap();
    let e = verify_response(&token, &digest, Some(7), &wide).unwrap_err();
    assert!(e.0.contains("id-kp-timeStamping only"), "{e}");
}
