//! The S3 API driven by real clients against a real cluster: the AWS CLI
//! (`aws`, installed by `.ci/run`) and curl's SigV4 for raw headers.
//! Every object is evidence: its bytes come back exact, its reads are on the
//! ledger, and Object Lock holds against every key, admins included.

use anyhow::{bail, Context, Result};
use custodia_tests::{
    aws_cli, boto3_python, bytes, custodia_bin, header, profile_field, Shape, TestCluster, Tool,
};
use protocol::ledger::Receipt;
use serde_json::Value;
use std::path::PathBuf;
use std::process::{Command, Output};

/// The AWS CLI with one credentials profile, against the cluster's S3 API.
struct Aws {
    endpoint: String,
    creds: PathBuf,
    profile: String,
    /// Where downloads and uploads live.
    work: PathBuf,
}

impl Aws {
    fn admin(c: &TestCluster) -> Aws {
        Aws {
            endpoint: c.s3.clone(),
            creds: c.data_dir().join("s3.credentials"),
            profile: "default".into(),
            work: c.data_dir().join("aws-work"),
        }
    }

    fn run(&self, args: &[&str]) -> Result<Output> {
        std::fs::create_dir_all(&self.work)?;
        // 16 MiB parts: a 100 MiB upload goes in 7 parts.
        std::fs::write(
            self.work.join("config"),
            format!(
                "[{}]\ns3 =\n  multipart_threshold = 16MB\n  multipart_chunksize = 16MB\n",
                if self.profile == "default" {
                    "default".to_owned()
                } else {
                    format!("profile {}", self.profile)
                }
            ),
        )?;
        // CUSTODIA_AWS picks the CLI (.ci/run points it at Debian's).
        Command::new(aws_cli())
            .args(["--endpoint-url", &self.endpoint, "--output", "json"])
            .args(args)
            .current_dir(&self.work)
            .env("AWS_SHARED_CREDENTIALS_FILE", &self.creds)
            .env("AWS_CONFIG_FILE", self.work.join("config"))
            .env("AWS_PROFILE", &self.profile)
            .env("AWS_DEFAULT_REGION", "us-east-1")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("AWS_PAGER", "")
            .output()
            .context("running `aws` (the AWS CLI; .ci/run installs Debian's awscli)")
    }

    /// Runs and expects success; returns stdout.
    fn ok(&self, args: &[&str]) -> Result<String> {
        let out = self.run(args)?;
        if !out.status.success() {
            bail!(
                "aws {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8(out.stdout)?)
    }

    fn json(&self, args: &[&str]) -> Result<Value> {
        let out = self.ok(args)?;
        Ok(if out.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&out)?
        })
    }

    /// Runs and expects failure with S3 error `code`.
    fn fails(&self, code: &str, args: &[&str]) -> Result<()> {
        let out = self.run(args)?;
        let err = String::from_utf8_lossy(&out.stderr);
        if out.status.success() || !err.contains(&format!("({code})")) {
            bail!(
                "aws {args:?}: expected {code}, got status {:?}: {err}",
                out.status.code()
            );
        }
        Ok(())
    }

    fn file(&self, name: &str, data: &[u8]) -> Result<String> {
        std::fs::create_dir_all(&self.work)?;
        std::fs::write(self.work.join(name), data)?;
        Ok(name.to_owned())
    }

    fn read(&self, name: &str) -> Result<Vec<u8>> {
        Ok(std::fs::read(self.work.join(name))?)
    }
}

/// Credentials for a new key of `tenant` (gateway stopped meanwhile), in
/// their own shared-credentials file.
/// New credentials from `custodia key create` on the running cluster (the
/// CLI goes through the gateway's admin API).
fn new_key(c: &TestCluster, tenant: &str, role: &str, extra: &[&str]) -> Result<(Aws, String)> {
    let mut args = vec!["key", "create", "--tenant", tenant, "--role", role];
    args.extend_from_slice(extra);
    let out = c.custodia(&args)?;
    let text = String::from_utf8(out.stdout)?;
    if !out.status.success() {
        bail!(
            "key create failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let creds = c.data_dir().join(format!("{tenant}-{role}.credentials"));
    std::fs::write(&creds, &text)?;
    let token = text
        .lines()
        .find_map(|l| l.strip_prefix("custodia_token = "))
        .unwrap_or_default()
        .to_owned();
    Ok((
        Aws {
            endpoint: c.s3.clone(),
            creds,
            profile: format!("{tenant}-{role}"),
            work: c.data_dir().join(format!("aws-{tenant}-{role}")),
        },
        token,
    ))
}

/// A command line split on spaces (for arguments without spaces).
fn argv(line: &str) -> Vec<String> {
    line.split_whitespace().map(str::to_owned).collect()
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn md5_hex(data: &[u8]) -> String {
    use md5::Digest as _;
    hex::encode(md5::Md5::digest(data))
}

/// curl with SigV4, for headers the AWS CLI does not show.
fn curl_headers(c: &TestCluster, method: &str, path: &str) -> Result<String> {
    let (headers, _) = curl(c, method, &format!("{}{path}", c.s3), &[])?;
    Ok(headers)
}

/// A SigV4-signed request with curl: (lower-cased headers, body).
fn curl(c: &TestCluster, method: &str, url: &str, extra: &[&str]) -> Result<(String, Vec<u8>)> {
    c.s3_curl(method, url, extra)
}

/// PUTs `framed` (an aws-chunked body, unsigned with a SHA-256 trailer)
/// to `url` as `name`, declaring `decoded` bytes: (headers, body).
fn put_chunked(
    c: &TestCluster,
    url: &str,
    name: &str,
    framed: &[u8],
    decoded: u64,
) -> Result<(String, Vec<u8>)> {
    let file = c.data_dir().join(format!("{name}.chunked"));
    std::fs::write(&file, framed)?;
    curl(
        c,
        "PUT",
        url,
        &[
            "-H",
            "x-amz-content-sha256: STREAMING-UNSIGNED-PAYLOAD-TRAILER",
            "-H",
            "content-encoding: aws-chunked",
            "-H",
            &format!("x-amz-decoded-content-length: {decoded}"),
            "-H",
            "x-amz-trailer: x-amz-checksum-sha256",
            "--data-binary",
            &format!("@{}", file.display()),
        ],
    )
}

/// aws-chunked with the checksum in a trailer, framed by hand the way
/// botocore sends it over HTTPS (`STREAMING-UNSIGNED-PAYLOAD-TRAILER`): the
/// checksum arrives after the last byte, and a wrong one must still refuse
/// the object and store nothing.
#[test]
fn aws_chunked_trailers_are_verified_after_the_last_byte() -> Result<()> {
    if !custodia_tests::require(
        "aws_chunked_trailers_are_verified_after_the_last_byte",
        &[Tool::Curl],
    )? {
        return Ok(());
    }
    use base64::Engine as _;
    use sha2::Digest as _;
    let c = TestCluster::start(Shape::default())?;
    let (h, _) = curl(&c, "PUT", &format!("{}/trail", c.s3), &[])?;
    assert!(h.starts_with("http/1.1 200"), "{h}");
    let data = bytes(100_000, 9);
    let sha = |d: &[u8]| base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(d));
    // (name, what is sent, its trailer, what S3 answers). The last: chunks
    // that end short of the decoded length declared (their trailer right
    // for what came), refused as an incomplete body as S3 does, never
    // stored as the whole object.
    let short = &data[..90_000];
    for (name, sent, trailer, answer) in [
        ("good", &data[..], sha(&data), None),
        ("bad", &data[..], sha(b"other"), Some("BadDigest")),
        ("short", short, sha(short), Some("IncompleteBody")),
    ] {
        // Its chunks, the terminating chunk, the trailer.
        let mut framed = Vec::new();
        for chunk in sent.chunks(65_536) {
            framed.extend(format!("{:x}\r\n", chunk.len()).bytes());
            framed.extend(chunk);
            framed.extend(b"\r\n");
        }
        framed.extend(format!("0\r\nx-amz-checksum-sha256:{trailer}\r\n\r\n").bytes());
        let url = format!("{}/trail/{name}", c.s3);
        let (h, body) = put_chunked(&c, &url, name, &framed, data.len() as u64)?;
        let body = String::from_utf8_lossy(&body).into_owned();
        match answer {
            None => {
                assert!(h.starts_with("http/1.1 200"), "{h}{body}");
                let (_, got) = curl(&c, "GET", &url, &[])?;
                assert!(
                    got == data,
                    "the trailer-checked object reads back byte-exact"
                );
                // `aws-chunked` framed the request, not the object: not
                // answered as its encoding, which would also have withheld
                // the checksum the SDKs check what they read against.
                let (h, _) = curl(&c, "HEAD", &url, &["-H", "x-amz-checksum-mode: ENABLED"])?;
                assert!(!h.contains("content-encoding"), "{h}");
                assert!(
                    h.contains(&format!(
                        "x-amz-checksum-sha256: {}",
                        sha(&data).to_lowercase()
                    )),
                    "{h}"
                );
            }
            Some(code) => {
                assert!(h.starts_with("http/1.1 400"), "{name}: {h}{body}");
                assert!(
                    body.contains(code)
                        || (code == "BadDigest" && body.contains("XAmzContentChecksumMismatch")),
                    "{name}: {body}"
                );
                let (h, _) = curl(&c, "HEAD", &url, &[])?;
                assert!(h.starts_with("http/1.1 404"), "{name}: nothing stored: {h}");
            }
        }
    }
    // A chunk header s3s cannot parse (an extension that is no chunk
    // signature): a malformed request, not a body cut short.
    let mut framed = b"10;bogus\r\n".to_vec();
    framed.extend(&data[..16]);
    framed.extend(
        format!(
            "\r\n0\r\nx-amz-checksum-sha256:{}\r\n\r\n",
            sha(&data[..16])
        )
        .bytes(),
    );
    let url = format!("{}/trail/garbled", c.s3);
    let (h, body) = put_chunked(&c, &url, "garbled", &framed, 16)?;
    let body = String::from_utf8_lossy(&body).into_owned();
    assert!(
        h.starts_with("http/1.1 400") && body.contains("InvalidRequest"),
        "{h}{body}"
    );
    let (h, _) = curl(&c, "HEAD", &url, &[])?;
    assert!(h.starts_with("http/1.1 404"), "nothing stored: {h}");
    // A checksum header that is none (not base64, or of another length),
    // or two kinds at once: refused before the body, as S3 does.
    for headers in [
        &["x-amz-checksum-crc32: zz"][..],
        &["x-amz-checksum-crc32: AAAAAAAA"][..],
        &[
            "x-amz-checksum-crc32: AAAAAA==",
            "x-amz-checksum-sha1: AAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        ][..],
    ] {
        let url = format!("{}/trail/checksums", c.s3);
        let mut args = vec!["--data-binary", "sixteen bytes!!!"];
        for h in headers {
            args.extend(["-H", *h]);
        }
        let (h, body) = curl(&c, "PUT", &url, &args)?;
        let body = String::from_utf8_lossy(&body).into_owned();
        assert!(
            h.starts_with("http/1.1 400") && body.contains("InvalidRequest"),
            "{headers:?}: {h}{body}"
        );
        let (h, _) = curl(&c, "HEAD", &url, &[])?;
        assert!(h.starts_with("http/1.1 404"), "nothing stored: {h}");
    }
    // Sent chunked (no Content-Length, so no length to fall short of) and
    // cut off after whole chunks, before the final empty one: refused as
    // incomplete. (s3s takes unsigned chunks only with a trailer, whose
    // absence would refuse this body too; signed chunks with no trailer,
    // which nothing else would refuse, are checked in `s3_chunks`'s unit
    // test: the answer here shows the refusal reaches the client.)
    let mut framed = Vec::new();
    for chunk in data[..65_536].chunks(16_384) {
        framed.extend(format!("{:x}\r\n", chunk.len()).bytes());
        framed.extend(chunk);
        framed.extend(b"\r\n");
    }
    let file = c.data_dir().join("cut.chunked");
    std::fs::write(&file, &framed)?;
    let url = format!("{}/trail/cut", c.s3);
    let (h, body) = curl(
        &c,
        "PUT",
        &url,
        &[
            "-H",
            "x-amz-content-sha256: STREAMING-UNSIGNED-PAYLOAD-TRAILER",
            "-H",
            "content-encoding: aws-chunked",
            "-H",
            &format!("x-amz-decoded-content-length: {}", data.len()),
            "-H",
            "x-amz-trailer: x-amz-checksum-sha256",
            "-H",
            "transfer-encoding: chunked",
            "--data-binary",
            &format!("@{}", file.display()),
        ],
    )?;
    let body = String::from_utf8_lossy(&body).into_owned();
    assert!(h.starts_with("http/1.1 400"), "cut: {h}{body}");
    assert!(body.contains("<Code>IncompleteBody</Code>"), "cut: {body}");
    let (h, _) = curl(&c, "HEAD", &url, &[])?;
    assert!(h.starts_with("http/1.1 404"), "cut: nothing stored: {h}");
    // A whole object in one chunk, as the Go SDK sends it unsigned (s3s
    // holds a chunk whole, charged to the receive budget): stored.
    let whole = bytes(3 << 20, 10);
    let mut framed = format!("{:x}\r\n", whole.len()).into_bytes();
    framed.extend(&whole);
    framed.extend(format!("\r\n0\r\nx-amz-checksum-sha256:{}\r\n\r\n", sha(&whole)).bytes());
    let url = format!("{}/trail/one", c.s3);
    let (h, body) = put_chunked(&c, &url, "one", &framed, whole.len() as u64)?;
    assert!(
        h.lines().any(|l| l.starts_with("http/1.1 200")),
        "one chunk: {h}{}",
        String::from_utf8_lossy(&body)
    );
    let (_, got) = curl(&c, "GET", &url, &[])?;
    assert!(got == whole, "the one-chunk object reads back byte-exact");
    // A chunk larger than all the gateway holds for uploads (1 GiB):
    // refused from its header, 400 EntityTooLarge, nothing stored.
    let mut framed = format!("{:x}\r\n", 2u64 << 30).into_bytes();
    framed.extend(&data);
    let url = format!("{}/trail/huge", c.s3);
    let (h, body) = put_chunked(&c, &url, "huge", &framed, 2u64 << 30)?;
    let body = String::from_utf8_lossy(&body).into_owned();
    assert!(h.starts_with("http/1.1 400"), "huge chunk: {h}{body}");
    assert!(
        body.contains("<Code>EntityTooLarge</Code>") && body.contains("aws-chunked chunk"),
        "huge chunk: {body}"
    );
    let (h, _) = curl(&c, "HEAD", &url, &[])?;
    assert!(
        h.starts_with("http/1.1 404"),
        "huge chunk: nothing stored: {h}"
    );
    Ok(())
}

/// User metadata is held to S3's 2 KB (MetadataTooLarge, nothing stored),
/// a header too large for the server is refused before any upload, and the
/// gateway serves on afterwards.
#[test]
fn oversized_metadata_and_headers_are_refused_and_store_nothing() -> Result<()> {
    if !custodia_tests::require(
        "oversized_metadata_and_headers_are_refused_and_store_nothing",
        &[Tool::Curl],
    )? {
        return Ok(());
    }
    let c = TestCluster::start(Shape::default())?;
    let (h, _) = curl(&c, "PUT", &format!("{}/meta", c.s3), &[])?;
    assert!(h.starts_with("http/1.1 200"), "{h}");
    let file = c.data_dir().join("meta.bin");
    std::fs::write(&file, bytes(10_000, 4))?;
    let put = |name: &str, meta: &str| {
        curl(
            &c,
            "PUT",
            &format!("{}/meta/{name}", c.s3),
            &["-H", meta, "--data-binary", &format!("@{}", file.display())],
        )
    };
    let status = |h: &str| h.split_whitespace().nth(1).unwrap_or("").to_owned();
    // Within the limit: stored, and read back.
    let fits = format!("x-amz-meta-note: {}", "a".repeat(1_500));
    let (h, _) = put("fits", &fits)?;
    assert_eq!(status(&h), "200", "{h}");
    let (h, _) = curl(&c, "HEAD", &format!("{}/meta/fits", c.s3), &[])?;
    assert!(h.contains(&"a".repeat(1_500)), "{h}");
    // Over it: 400 MetadataTooLarge, nothing stored.
    let over = format!("x-amz-meta-note: {}", "b".repeat(3_000));
    let (h, body) = put("over", &over)?;
    let body = String::from_utf8_lossy(&body).into_owned();
    assert_eq!(status(&h), "400", "{h}{body}");
    assert!(body.contains("<Code>MetadataTooLarge</Code>"), "{body}");
    // A request head past what the server reads at all (64 KiB): refused
    // before authentication, nothing stored. Unsigned, since curl will not
    // sign a header this size; from a file, since one command-line argument
    // holds at most 128 KiB.
    let huge = c.data_dir().join("huge-header");
    std::fs::write(&huge, format!("x-amz-meta-huge: {}\n", "c".repeat(200_000)))?;
    let out = std::process::Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "PUT"])
        .args(["--data-binary", &format!("@{}", file.display())])
        .arg("-H")
        .arg(format!("@{}", huge.display()))
        .arg(format!("{}/meta/huge", c.s3))
        .output()?;
    // hyper answers 431 and closes with the rest of the head unread, which
    // the kernel may turn into a reset before curl reads the answer.
    let code = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(code == "431" || code == "000", "a 200 KB head got {code}");
    for name in ["over", "huge"] {
        let (h, _) = curl(&c, "HEAD", &format!("{}/meta/{name}", c.s3), &[])?;
        assert_eq!(status(&h), "404", "{name}: {h}");
    }
    // An anonymous HTML-form upload announcing 1 GiB: refused from its
    // head, not read into memory first (a form's file is read whole, so
    // form uploads are bounded).
    let mut s = std::net::TcpStream::connect(c.s3.trim_start_matches("http://"))?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    use std::io::{Read as _, Write as _};
    write!(
        s,
        "POST /meta HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n\
         Content-Length: 1073741824\r\n\r\n--b\r\nContent-Disposition: form-data; name=\"key\"\r\n\r\nform\r\n"
    )?;
    let mut answer = [0u8; 512];
    let n = s.read(&mut answer)?;
    let answer = String::from_utf8_lossy(&answer[..n]).into_owned();
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("EntityTooLarge"), "{answer}");
    let (h, _) = curl(&c, "HEAD", &format!("{}/meta/form", c.s3), &[])?;
    assert_eq!(status(&h), "404", "{h}");
    // An XML document past what clients send (a DeleteObjects of 6 MiB,
    // signed, with its Content-MD5): refused from its size, not parsed
    // whole, and nothing deleted.
    use base64::Engine as _;
    let mut doc = String::from("<Delete>");
    while doc.len() < 6 << 20 {
        doc.push_str("<Object><Key>fits</Key></Object>");
    }
    doc.push_str("</Delete>");
    let file = c.data_dir().join("delete.xml");
    std::fs::write(&file, &doc)?;
    let md5 = {
        use md5::Digest as _;
        base64::engine::general_purpose::STANDARD.encode(md5::Md5::digest(doc.as_bytes()))
    };
    let (h, body) = curl(
        &c,
        "POST",
        &format!("{}/meta?delete=", c.s3),
        &[
            "-H",
            &format!("content-md5: {md5}"),
            "--data-binary",
            &format!("@{}", file.display()),
        ],
    )?;
    let body = String::from_utf8_lossy(&body).into_owned();
    assert!(h.starts_with("http/1.1 400"), "{h}{body}");
    assert!(body.contains("MaxMessageLengthExceeded"), "{body}");
    let (h, _) = curl(&c, "GET", &format!("{}/meta/fits", c.s3), &[])?;
    assert_eq!(status(&h), "200", "the gateway serves on: {h}");
    Ok(())
}

/// ListObjectVersions with a delimiter folds keys into common prefixes, and
/// a page that ends on a prefix resumes after everything under it.
#[test]
fn version_listings_fold_common_prefixes_and_page() -> Result<()> {
    if !custodia_tests::require(
        "version_listings_fold_common_prefixes_and_page",
        &[Tool::Aws],
    )? {
        return Ok(());
    }
    let c = TestCluster::start(Shape::default())?;
    let aws = Aws::admin(&c);
    aws.ok(&["s3api", "create-bucket", "--bucket", "vers"])?;
    aws.ok(&[
        "s3api",
        "put-bucket-versioning",
        "--bucket",
        "vers",
        "--versioning-configuration",
        "Status=Enabled",
    ])?;
    let f = aws.file("x.txt", b"x")?;
    let put_in = |bucket: &str, key: &str| {
        aws.ok(&[
            "s3api",
            "put-object",
            "--bucket",
            bucket,
            "--key",
            key,
            "--body",
            &f,
        ])
    };
    let versions_of = |bucket: &str, extra: &[&str]| -> Result<Value> {
        let mut args = vec![
            "s3api",
            "list-object-versions",
            "--bucket",
            bucket,
            "--no-paginate",
        ];
        args.extend_from_slice(extra);
        aws.json(&args)
    };
    for key in ["a/1", "a/2", "a/2", "b/c/1", "top.txt", "top.txt"] {
        put_in("vers", key)?;
    }
    let list = |extra: &[&str]| versions_of("vers", &[&["--delimiter", "/"], extra].concat());
    let prefixes = |v: &Value| -> Vec<String> {
        v["CommonPrefixes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p["Prefix"].as_str().map(str::to_owned))
            .collect()
    };
    let all = list(&[])?;
    assert_eq!(prefixes(&all), ["a/", "b/"], "{all}");
    let versions = all["Versions"].as_array().cloned().unwrap_or_default();
    assert_eq!(versions.len(), 2, "both versions of top.txt: {all}");
    assert!(versions.iter().all(|v| v["Key"] == "top.txt"));
    assert_eq!(versions[0]["IsLatest"], true);
    assert_eq!(versions[1]["IsLatest"], false);
    // One entry a page: a, then b (not a again), then top.txt twice.
    let first = list(&["--max-keys", "1"])?;
    assert_eq!(prefixes(&first), ["a/"], "{first}");
    assert_eq!(first["IsTruncated"], true);
    assert_eq!(first["NextKeyMarker"], "a/");
    let second = list(&["--max-keys", "1", "--key-marker", "a/"])?;
    assert_eq!(prefixes(&second), ["b/"], "{second}");
    let third = list(&["--max-keys", "1", "--key-marker", "b/"])?;
    assert_eq!(third["Versions"][0]["Key"], "top.txt", "{third}");
    // A version marker without its key means nothing: refused, as S3 does.
    let vid = third["Versions"][0]["VersionId"]
        .as_str()
        .context("version id")?
        .to_owned();
    aws.fails(
        "InvalidArgument",
        &[
            "s3api",
            "list-object-versions",
            "--bucket",
            "vers",
            "--no-paginate",
            "--version-id-marker",
            &vid,
        ],
    )?;
    // Under a prefix, the delimiter applies past it.
    let under = list(&["--prefix", "a/"])?;
    assert_eq!(
        under["Versions"].as_array().map(Vec::len),
        Some(3),
        "{under}"
    );
    assert!(prefixes(&under).is_empty());

    // The null version is listed and paged as "null": in a bucket written
    // before versioning was enabled, and in one never versioned.
    aws.ok(&["s3api", "create-bucket", "--bucket", "mixed"])?;
    let put = |key: &str| put_in("mixed", key);
    put("k")?;
    put("z")?;
    let page = |extra: &[&str]| versions_of("mixed", &[&["--max-keys", "1"], extra].concat());
    let first = page(&[])?;
    assert_eq!(first["Versions"][0]["VersionId"], "null", "{first}");
    // The next marker is the null version's own id (a position that stays
    // put whatever happens to the null version); "null" is taken too.
    let own = first["NextVersionIdMarker"].as_str().unwrap_or_default();
    assert!(!own.is_empty() && own != "null", "{first}");
    for marker in [own, "null"] {
        let next = page(&["--key-marker", "k", "--version-id-marker", marker])?;
        assert_eq!(next["Versions"][0]["Key"], "z", "{next}");
    }
    aws.ok(&[
        "s3api",
        "put-bucket-versioning",
        "--bucket",
        "mixed",
        "--versioning-configuration",
        "Status=Enabled",
    ])?;
    put("k")?;
    let newest = page(&[])?;
    let id = newest["Versions"][0]["VersionId"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert_ne!(id, "null");
    assert_eq!(newest["NextVersionIdMarker"], id.as_str());
    let older = page(&["--key-marker", "k", "--version-id-marker", &id])?;
    assert_eq!(older["Versions"][0]["VersionId"], "null", "{older}");
    let after = page(&["--key-marker", "k", "--version-id-marker", "null"])?;
    assert_eq!(after["Versions"][0]["Key"], "z", "{after}");

    // Emptying a bucket page by page (list one, delete it, list on): a
    // page that ends on the null version, deleted before the next page is
    // asked for, skips none of the key's older versions.
    aws.ok(&[
        "s3api",
        "put-bucket-versioning",
        "--bucket",
        "mixed",
        "--versioning-configuration",
        "Status=Suspended",
    ])?;
    put("k")?;
    let first = page(&[])?;
    assert_eq!(first["Versions"][0]["VersionId"], "null", "{first}");
    let marker = first["NextVersionIdMarker"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    aws.ok(&[
        "s3api",
        "delete-object",
        "--bucket",
        "mixed",
        "--key",
        "k",
        "--version-id",
        "null",
    ])?;
    for marker in [marker.as_str(), "null"] {
        let next = page(&["--key-marker", "k", "--version-id-marker", marker])?;
        assert_eq!(next["Versions"][0]["Key"], "k", "{marker}: {next}");
        assert_eq!(
            next["Versions"][0]["VersionId"],
            id.as_str(),
            "{marker}: {next}"
        );
    }
    Ok(())
}

/// Whether evidence `id`'s custody comes to show (within 15 s) an
/// administrative event by an S3 credential: its S3 name taken away.
fn unlinked_through_s3(c: &TestCluster, id: &str) -> bool {
    custodia_tests::eventually(15, || {
        c.get_with(&c.token, &format!("/v1/evidence/{id}/custody"), &[])
            .map(|a| {
                a.json()["events"].as_array().is_some_and(|e| {
                    e.iter().any(|e| {
                        use base64::Engine as _;
                        let statement = base64::engine::general_purpose::STANDARD
                            .decode(e["receipt"]["statement"].as_str().unwrap_or_default())
                            .unwrap_or_default();
                        e["kind"] == "admin"
                            && serde_json::from_slice::<Value>(&statement).is_ok_and(|s| {
                                s["actor"].as_str().is_some_and(|a| a.contains("/s3:"))
                            })
                    })
                })
            })
            .unwrap_or(false)
    })
}

#[test]
fn aws_cli_files_lists_reads_and_deletes_objects_as_evidence() -> Result<()> {
    if !custodia_tests::require(
        "aws_cli_files_lists_reads_and_deletes_objects_as_evidence",
        &[Tool::Aws, Tool::Curl],
    )? {
        return Ok(());
    }
    let c = TestCluster::start(Shape::default())?;
    let aws = Aws::admin(&c);
    aws.ok(&["s3", "mb", "s3://evidence"])?;
    let listed = aws.json(&["s3api", "list-buckets"])?;
    assert_eq!(listed["Buckets"][0]["Name"], "evidence");

    // Sizes around the stripe (4 KiB shards x k=4 = 16 KiB) and beyond.
    let sizes = [0usize, 1, 16_383, 16_385, 300_000];
    for (i, n) in sizes.iter().enumerate() {
        let name = aws.file(&format!("f{i}.bin"), &bytes(*n, i as u64))?;
        aws.ok(&["s3", "cp", &name, &format!("s3://evidence/dir/{name}")])?;
    }
    aws.file("top.txt", b"top\n")?;
    aws.ok(&["s3", "cp", "top.txt", "s3://evidence/top.txt"])?;
    for (i, n) in sizes.iter().enumerate() {
        let key = format!("dir/f{i}.bin");
        aws.ok(&[
            "s3",
            "cp",
            &format!("s3://evidence/{key}"),
            &format!("back{i}"),
        ])?;
        assert_eq!(aws.read(&format!("back{i}"))?, bytes(*n, i as u64), "{key}");
        // A single-part ETag is the body's MD5 (rclone and others check it).
        let head = aws.json(&[
            "s3api",
            "head-object",
            "--bucket",
            "evidence",
            "--key",
            &key,
        ])?;
        assert_eq!(
            head["ETag"],
            format!("\"{}\"", md5_hex(&bytes(*n, i as u64)))
        );
        assert_eq!(head["ContentLength"], *n as u64);
    }
    // Ranges, verified through the Bao outboard like any read.
    aws.ok(&[
        "s3api",
        "get-object",
        "--bucket",
        "evidence",
        "--key",
        "dir/f4.bin",
        "--range",
        "bytes=70000-170000",
        "part",
    ])?;
    assert_eq!(
        aws.read("part")?,
        bytes(300_000, 4)[70_000..=170_000].to_vec()
    );
    // Under If-Range, only while it names the object as it is: a download
    // resumed after the object changed gets the whole object, not the rest
    // of another spliced on (RFC 9110 13.1.5).
    let url = format!("{}/evidence/dir/f4.bin", c.s3);
    let etag = format!("\"{}\"", md5_hex(&bytes(300_000, 4)));
    for (if_range, status, body) in [
        (etag.as_str(), "206", bytes(300_000, 4)[70_000..].to_vec()),
        (
            "\"0123456789abcdef0123456789abcdef\"",
            "200",
            bytes(300_000, 4),
        ),
    ] {
        let (h, got) = curl(
            &c,
            "GET",
            &url,
            &[
                "-H",
                "range: bytes=70000-",
                "-H",
                &format!("if-range: {if_range}"),
            ],
        )?;
        assert!(
            h.starts_with(&format!("http/1.1 {status}")),
            "{if_range}: {h}"
        );
        assert!(got == body, "{if_range}: {} bytes", got.len());
    }
    // A Range S3 does not take (several ranges, another unit, a last byte
    // before the first) is ignored, as S3 and RFC 9110 do: the whole
    // object, 200, not a 400 (download tools given a presigned link send
    // several ranges). A unit in capitals is the same unit; a first byte
    // past 2^63 is 416.
    let link = aws.ok(&[
        "s3",
        "presign",
        "s3://evidence/dir/f4.bin",
        "--expires-in",
        "300",
    ])?;
    for (range, status, body) in [
        ("bytes=0-9,100-109", 200, bytes(300_000, 4)),
        ("items=0-5", 200, bytes(300_000, 4)),
        ("bytes=5-2", 200, bytes(300_000, 4)),
        ("Bytes=0-9", 206, bytes(300_000, 4)[..10].to_vec()),
        ("bytes=99999999999999999999-", 416, Vec::new()),
    ] {
        let mut resp = ureq::get(link.trim())
            .config()
            .http_status_as_error(false)
            .build()
            .header("range", range)
            .call()?;
        let got = resp.body_mut().read_to_vec()?;
        assert_eq!(
            resp.status().as_u16(),
            status,
            "{range}: {}",
            String::from_utf8_lossy(&got)
        );
        if status != 416 {
            assert!(got == body, "{range}: {} bytes", got.len());
        }
    }

    // Listings: V2 with a delimiter and pages, V1 too.
    let v2 = aws.json(&[
        "s3api",
        "list-objects-v2",
        "--bucket",
        "evidence",
        "--delimiter",
        "/",
    ])?;
    assert_eq!(v2["CommonPrefixes"][0]["Prefix"], "dir/");
    assert_eq!(v2["Contents"].as_array().map(Vec::len), Some(1));
    assert_eq!(v2["Contents"][0]["Key"], "top.txt");
    let page = aws.json(&[
        "s3api",
        "list-objects-v2",
        "--bucket",
        "evidence",
        "--prefix",
        "dir/",
        "--max-keys",
        "2",
        "--no-paginate",
    ])?;
    assert_eq!(page["IsTruncated"], true, "{page}");
    assert_eq!(page["Contents"][1]["Key"], "dir/f1.bin");
    let token = page["NextContinuationToken"].as_str().unwrap_or_default();
    let rest = aws.json(&[
        "s3api",
        "list-objects-v2",
        "--bucket",
        "evidence",
        "--prefix",
        "dir/",
        "--continuation-token",
        token,
        "--no-paginate",
    ])?;
    let keys: Vec<&str> = rest["Contents"]
        .as_array()
        .map(|a| a.iter().filter_map(|o| o["Key"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(keys, ["dir/f2.bin", "dir/f3.bin", "dir/f4.bin"]);
    let v1 = aws.json(&[
        "s3api",
        "list-objects",
        "--bucket",
        "evidence",
        "--delimiter",
        "/",
    ])?;
    assert_eq!(v1["CommonPrefixes"][0]["Prefix"], "dir/");
    // V1 pages of one: a page ending in a common prefix resumes after it.
    let first = aws.json(&[
        "s3api",
        "list-objects",
        "--bucket",
        "evidence",
        "--delimiter",
        "/",
        "--max-keys",
        "1",
        "--no-paginate",
    ])?;
    assert_eq!(first["CommonPrefixes"][0]["Prefix"], "dir/", "{first}");
    let marker = first["NextMarker"].as_str().unwrap_or_default().to_owned();
    assert_eq!(marker, "dir/");
    let second = aws.json(&[
        "s3api",
        "list-objects",
        "--bucket",
        "evidence",
        "--delimiter",
        "/",
        "--max-keys",
        "1",
        "--marker",
        &marker,
        "--no-paginate",
    ])?;
    assert!(
        second["CommonPrefixes"]
            .as_array()
            .is_none_or(Vec::is_empty),
        "{second}"
    );
    assert_eq!(second["Contents"][0]["Key"], "top.txt", "{second}");
    let recursive = aws.ok(&["s3", "ls", "--recursive", "s3://evidence"])?;
    assert_eq!(recursive.lines().count(), sizes.len() + 1, "{recursive}");
    // Keys with '+' and spaces list as themselves (the CLI asks for
    // url-encoded keys and decodes them, '+' as a space).
    let odd = aws.file("odd", b"odd")?;
    aws.ok(&["s3", "cp", &odd, "s3://evidence/report+v1 final.pdf"])?;
    let listed = aws.json(&[
        "s3api",
        "list-objects-v2",
        "--bucket",
        "evidence",
        "--prefix",
        "report",
    ])?;
    assert_eq!(
        listed["Contents"][0]["Key"], "report+v1 final.pdf",
        "{listed}"
    );
    // Version listings encode them too when asked (rclone decodes whatever
    // it asked for, told or not).
    let (_, body) = curl(
        &c,
        "GET",
        &format!(
            "{}/evidence?encoding-type=url&prefix=report&versions=",
            c.s3
        ),
        &[],
    )?;
    let body = String::from_utf8_lossy(&body);
    assert!(
        body.contains("<Key>report%2Bv1%20final.pdf</Key>")
            && body.contains("<EncodingType>url</EncodingType>"),
        "{body}"
    );
    // And V1 listings: the marker and the delimiter with the keys (the
    // CLI asks for the encoding, and decodes each, '+' as a space).
    let listed = aws.json(&[
        "s3api",
        "list-objects",
        "--bucket",
        "evidence",
        "--marker",
        "report+v0",
        "--delimiter",
        "+",
    ])?;
    assert_eq!(listed["Marker"], "report+v0", "{listed}");
    assert_eq!(listed["Delimiter"], "+", "{listed}");
    assert_eq!(listed["CommonPrefixes"][0]["Prefix"], "report+", "{listed}");
    aws.ok(&["s3", "cp", "s3://evidence/report+v1 final.pdf", "odd-back"])?;
    assert_eq!(aws.read("odd-back")?, b"odd");
    aws.ok(&["s3", "rm", "s3://evidence/report+v1 final.pdf"])?;

    // The object is evidence: its id and receipt come with it, the read is
    // on the ledger, and the filing's receipt verifies.
    let put = curl_headers(&c, "HEAD", "/evidence/top.txt")?;
    let id = header(&put, "x-custodia-evidence-id")
        .context("no x-custodia-evidence-id")?
        .to_owned();
    let receipt = c.get_with(&c.token, &format!("/v1/evidence/{id}/receipt"), &[])?;
    let receipt: Receipt = serde_json::from_slice(&receipt.body)?;
    let key = std::fs::read_to_string(c.data_dir().join("ledger.vkey"))?;
    let verified = receipt.verify(key.trim())?;
    assert_eq!(verified.statement.size, 4);
    assert_eq!(
        verified.statement.blake3,
        blake3::hash(b"top\n").to_hex().to_string()
    );
    let got = curl_headers(&c, "GET", "/evidence/top.txt")?;
    assert!(got.starts_with("http/1.1 200"), "{got}");
    let accessed = custodia_tests::eventually(15, || {
        c.get_with(&c.token, &format!("/v1/evidence/{id}/custody"), &[])
            .map(|a| {
                a.json()["events"]
                    .as_array()
                    .is_some_and(|e| e.iter().any(|e| e["kind"] == "accessed"))
            })
            .unwrap_or(false)
    });
    assert!(accessed, "the S3 read is a custody event");

    // Server-side copy: a read of the source and a new filing of its bytes.
    aws.ok(&[
        "s3",
        "cp",
        "s3://evidence/dir/f4.bin",
        "s3://evidence/copy/f4.bin",
    ])?;
    aws.ok(&["s3", "cp", "s3://evidence/copy/f4.bin", "copied"])?;
    assert_eq!(aws.read("copied")?, bytes(300_000, 4));
    let copied = aws.json(&[
        "s3api",
        "head-object",
        "--bucket",
        "evidence",
        "--key",
        "copy/f4.bin",
    ])?;
    assert_eq!(
        copied["ETag"],
        format!("\"{}\"", md5_hex(&bytes(300_000, 4)))
    );
    // The copy names its submitter as the PUT did.
    let root = blake3::hash(&bytes(300_000, 4)).to_hex().to_string();
    let found = c.get_with(&c.token, &format!("/v1/evidence/by-hash/{root}"), &[])?;
    let submitters: Vec<Value> = found.json()["filings"]
        .as_array()
        .context("filings")?
        .iter()
        .map(|f| f["submitter"].clone())
        .collect();
    assert_eq!(submitters.len(), 2, "{submitters:?}");
    assert!(
        submitters[0] == submitters[1]
            && submitters[0]
                .as_str()
                .is_some_and(|s| s.starts_with("admin/s3:")),
        "{submitters:?}"
    );
    // Each is on the ledger with its own `filed` statement: the copy's
    // (queued beside its source's read), and that of a PUT replacing an
    // object (queued beside the replaced version's unlinking).
    aws.file("top2.txt", b"top, again\n")?;
    aws.ok(&["s3", "cp", "top2.txt", "s3://evidence/top.txt"])?;
    let replacing = header(
        &curl_headers(&c, "HEAD", "/evidence/top.txt")?,
        "x-custodia-evidence-id",
    )
    .context("no evidence id")?
    .to_owned();
    let mut filed_ids: Vec<String> = found.json()["filings"]
        .as_array()
        .context("filings")?
        .iter()
        .filter_map(|f| f["id"].as_str().map(str::to_owned))
        .collect();
    filed_ids.push(replacing);
    let vkey = std::fs::read_to_string(c.data_dir().join("ledger.vkey"))?;
    for id in &filed_ids {
        let mut got = None;
        custodia_tests::eventually(15, || {
            got = c
                .get_with(&c.token, &format!("/v1/evidence/{id}/receipt"), &[])
                .ok()
                .filter(|a| a.status == 200)
                .and_then(|a| serde_json::from_slice::<Receipt>(&a.body).ok());
            got.is_some()
        });
        let receipt = got.with_context(|| format!("no receipt for {id}"))?;
        let verified = receipt.verify(vkey.trim())?;
        assert_eq!(
            verified.statement.kind,
            protocol::ledger::Kind::Filed,
            "{id}"
        );
        assert_eq!(&verified.statement.evidence, id);
    }
    // Virtual-host-style (BUCKET.localhost:PORT) and path-style through the
    // name `localhost:PORT` both address the bucket.
    let port = c.s3.rsplit(':').next().unwrap_or_default();
    let to_loopback = |host: &str| format!("{host}:{port}:127.0.0.1:{port}");
    for (url, host) in [
        (
            format!("http://evidence.localhost:{port}/dir/f1.bin"),
            "evidence.localhost",
        ),
        (
            format!("http://localhost:{port}/evidence/dir/f1.bin"),
            "localhost",
        ),
    ] {
        let (h, body) = curl(&c, "GET", &url, &["--connect-to", &to_loopback(host)])?;
        assert!(h.starts_with("http/1.1 200"), "{url}: {h}");
        assert_eq!(body, bytes(1, 1), "{url}");
    }
    // Presigned URLs work without credentials, and only as signed.
    let url = aws.ok(&[
        "s3",
        "presign",
        "s3://evidence/dir/f1.bin",
        "--expires-in",
        "300",
    ])?;
    let mut got = ureq::get(url.trim()).call()?;
    assert_eq!(got.body_mut().read_to_vec()?, bytes(1, 1));
    // Each answer read whole: one left unread on a kept-alive connection
    // could be taken for the next request's.
    let refused = |url: &str, headers: &[(&str, &str)]| -> Result<(u16, String)> {
        let mut req = ureq::get(url).config().http_status_as_error(false).build();
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        let mut resp = req.call()?;
        Ok((resp.status().as_u16(), resp.body_mut().read_to_string()?))
    };
    let tampered = url.trim().replace("dir/f1.bin", "dir/f2.bin");
    let (status, body) = refused(&tampered, &[])?;
    assert_eq!(status, 403, "a presigned URL names one object: {body}");
    assert!(
        body.contains("<Code>SignatureDoesNotMatch</Code>"),
        "{body}"
    );
    // Refused whatever their signature: a URL valid for more than a week,
    // and a Signature Version 2 header (no expiry s3s enforces).
    // An x-amz- header the URL's signature does not cover (here one that
    // would turn a presigned PUT into a copy of other evidence), as in S3.
    let copy = ("x-amz-copy-source", "/evidence/dir/f2.bin");
    let (status, body) = refused(url.trim(), &[copy])?;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("<Code>AccessDenied</Code>"), "{body}");
    assert!(body.contains("not signed: x-amz-copy-source"), "{body}");
    // Nor does an Authorization header that claims the URL signed it: a
    // request authenticates one way.
    let claim = (
        "authorization",
        "AWS4-HMAC-SHA256 Credential=AK/20261205/us-east-1/s3/aws4_request, \
         SignedHeaders=host;x-amz-copy-source, Signature=00",
    );
    let (status, body) = refused(url.trim(), &[copy, claim])?;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("<Code>InvalidArgument</Code>"), "{body}");
    assert!(body.contains("Only one auth mechanism"), "{body}");
    let long = url
        .trim()
        .replace("X-Amz-Expires=300", "X-Amz-Expires=604801");
    assert_ne!(long, url.trim());
    let (status, body) = refused(&long, &[])?;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("AuthorizationQueryParametersError"), "{body}");
    let object = format!("{}/evidence/dir/f1.bin", c.s3);
    let (status, body) = refused(
        &object,
        &[(
            "authorization",
            "AWS AKIDEXAMPLE:frJIUN8DYpKDtOLCwo//yllqDzg=",
        )],
    )?;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("AWS4-HMAC-SHA256"), "{body}");
    let (status, body) = refused(
        &format!("{object}?AWSAccessKeyId=AKIDEXAMPLE&Expires=4102444800&Signature=x"),
        &[],
    )?;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("AuthorizationQueryParametersError"), "{body}");
    // Multi-object delete.
    let gone = aws.json(&[
        "s3api",
        "delete-objects",
        "--bucket",
        "evidence",
        "--delete",
        r#"{"Objects":[{"Key":"copy/f4.bin"},{"Key":"dir/f0.bin"}]}"#,
    ])?;
    assert_eq!(gone["Deleted"].as_array().map(Vec::len), Some(2), "{gone}");
    aws.fails(
        "404",
        &[
            "s3api",
            "head-object",
            "--bucket",
            "evidence",
            "--key",
            "dir/f0.bin",
        ],
    )?;

    // Deleting through S3 removes the object from the bucket; the evidence,
    // its receipt and custody stay (only an expunge order removes bytes).
    aws.ok(&["s3", "rm", "s3://evidence/top.txt"])?;
    aws.fails(
        "404",
        &[
            "s3api",
            "head-object",
            "--bucket",
            "evidence",
            "--key",
            "top.txt",
        ],
    )?;
    let still = c.get_with(&c.token, &format!("/v1/evidence/{id}"), &[])?;
    assert_eq!((still.status, still.body.as_slice()), (200, &b"top\n"[..]));
    // Who took its name away is on the ledger, in its custody (before, only
    // in the gateway's log).
    assert!(
        unlinked_through_s3(&c, &id),
        "deleting the object through S3 is not a custody event"
    );
    // So is replacing it (the bucket is not versioned): the old evidence
    // stays, its name now leads to the new one.
    aws.file("over.txt", b"first\n")?;
    aws.ok(&["s3", "cp", "over.txt", "s3://evidence/over.txt"])?;
    let first = curl_headers(&c, "HEAD", "/evidence/over.txt")?;
    let first = header(&first, "x-custodia-evidence-id")
        .context("no x-custodia-evidence-id")?
        .to_owned();
    aws.file("over.txt", b"second\n")?;
    aws.ok(&["s3", "cp", "over.txt", "s3://evidence/over.txt"])?;
    aws.ok(&["s3", "cp", "s3://evidence/over.txt", "over-back"])?;
    assert_eq!(aws.read("over-back")?, b"second\n");
    let old = c.get_with(&c.token, &format!("/v1/evidence/{first}"), &[])?;
    assert_eq!((old.status, old.body.as_slice()), (200, &b"first\n"[..]));
    assert!(
        unlinked_through_s3(&c, &first),
        "replacing the object through S3 is not a custody event of the replaced evidence"
    );
    aws.fails(
        "BucketNotEmpty",
        &["s3api", "delete-bucket", "--bucket", "evidence"],
    )?;
    aws.ok(&["s3", "rm", "--recursive", "s3://evidence/"])?;
    aws.ok(&["s3", "rb", "s3://evidence"])?;
    aws.fails(
        "NoSuchBucket",
        &["s3api", "head-bucket", "--bucket", "evidence"],
    )
    .or_else(|_| aws.fails("404", &["s3api", "head-bucket", "--bucket", "evidence"]))?;
    // A wrong Content-MD5 is refused and leaves nothing behind.
    aws.ok(&["s3", "mb", "s3://digests"])?;
    let body = aws.file("d.bin", b"digest me")?;
    aws.fails(
        "BadDigest",
        &[
            "s3api",
            "put-object",
            "--bucket",
            "digests",
            "--key",
            "d.bin",
            "--body",
            &body,
            "--content-md5",
            "AAAAAAAAAAAAAAAAAAAAAA==",
        ],
    )?;
    aws.fails(
        "404",
        &[
            "s3api",
            "head-object",
            "--bucket",
            "digests",
            "--key",
            "d.bin",
        ],
    )?;
    Ok(())
}

#[test]
fn tenants_and_keys_are_isolated_and_signatures_checked() -> Result<()> {
    if !custodia_tests::require(
        "tenants_and_keys_are_isolated_and_signatures_checked",
        &[Tool::Aws],
    )? {
        return Ok(());
    }
    let mut c = TestCluster::start(Shape::default())?;
    let admin = Aws::admin(&c);
    admin.ok(&["s3", "mb", "s3://court-a"])?;
    admin.file("a.txt", b"tenant a's evidence")?;
    admin.ok(&["s3", "cp", "a.txt", "s3://court-a/a.txt"])?;

    // Keys need an existing tenant.
    c.stop_gateway();
    let unknown = c.custodia(&["key", "create", "--tenant", "nobody"])?;
    assert!(!unknown.status.success());
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("tenant create"));
    let made = c.custodia(&["tenant", "create", "court-b"])?;
    assert!(made.status.success());
    c.start_gateway()?;
    c.wait_healthy(c.shape.nodes as u64)?;
    let (b, b_token) = new_key(&c, "court-b", "clerk", &[])?;
    // Through the running gateway, never with the admin token in clear.
    let clear = c.custodia(&[
        "key",
        "create",
        "--tenant",
        "court-b",
        "--api",
        "http://192.0.2.1:8080",
    ])?;
    let said = String::from_utf8_lossy(&clear.stderr);
    assert!(
        !clear.status.success() && said.contains("in clear"),
        "{said}"
    );

    // On the running cluster too: tenants and keys through the admin API,
    // the same refusals, and never an expunger.
    let unknown = c.custodia(&["key", "create", "--tenant", "court-c"])?;
    assert!(!unknown.status.success());
    assert!(
        String::from_utf8_lossy(&unknown.stderr).contains("tenant create"),
        "{}",
        String::from_utf8_lossy(&unknown.stderr)
    );
    let made = c.custodia(&["tenant", "create", "court-c"])?;
    assert!(String::from_utf8_lossy(&made.stdout).contains("tenant court-c created"));
    let again = c.custodia(&["tenant", "create", "court-c"])?;
    assert!(String::from_utf8_lossy(&again.stdout).contains("already exists"));
    // `--api` names the gateway (as its certificate would) instead of the
    // listen address in cluster.toml; `CUSTODIA_API`, which may name another
    // cluster, is not followed with this cluster's admin token.
    let by_name = |api: &str| {
        Command::new(custodia_bin())
            .args(["tenant", "create", "court-d", "--api", api, "--data-dir"])
            .arg(c.data_dir())
            .output()
    };
    let port = c.api.rsplit(':').next().unwrap_or_default().to_string();
    let named = by_name(&format!("http://localhost:{port}/"))?;
    assert!(
        String::from_utf8_lossy(&named.stdout).contains("tenant court-d created"),
        "{}",
        String::from_utf8_lossy(&named.stderr)
    );
    let closed = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let wrong = by_name(&format!("http://localhost:{closed}"))?;
    assert!(!wrong.status.success(), "--api was not used");
    let elsewhere = Command::new(custodia_bin())
        .args(["tenant", "create", "court-e", "--data-dir"])
        .arg(c.data_dir())
        .env("CUSTODIA_API", format!("http://localhost:{closed}"))
        .output()?;
    assert!(
        String::from_utf8_lossy(&elsewhere.stdout).contains("tenant court-e created"),
        "{}",
        String::from_utf8_lossy(&elsewhere.stderr)
    );
    let expunger = c.custodia(&["key", "create", "--tenant", "court-c", "--role", "expunger"])?;
    assert!(!expunger.status.success());
    assert!(String::from_utf8_lossy(&expunger.stderr).contains("gateway stopped"));
    let (court_c, _) = new_key(&c, "court-c", "clerk", &[])?;
    court_c.ok(&["s3", "mb", "s3://court-c"])?;
    court_c.fails(
        "AccessDenied",
        &["s3api", "list-objects-v2", "--bucket", "court-a"],
    )?;
    // Only an admin may mint keys.
    let by_clerk = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .new_agent()
        .post(&format!("{}/v1/admin/keys", c.api))
        .header("Authorization", &format!("Bearer {b_token}"))
        .send_json(serde_json::json!({ "tenant": "court-b", "role": "admin" }))?;
    assert_eq!(by_clerk.status().as_u16(), 403);

    // Another tenant's bucket: AccessDenied for every operation.
    b.fails(
        "AccessDenied",
        &["s3api", "list-objects-v2", "--bucket", "court-a"],
    )?;
    b.fails(
        "AccessDenied",
        &[
            "s3api",
            "get-object",
            "--bucket",
            "court-a",
            "--key",
            "a.txt",
            "x",
        ],
    )?;
    let f = b.file("b.txt", b"tenant b")?;
    b.fails(
        "AccessDenied",
        &[
            "s3api",
            "put-object",
            "--bucket",
            "court-a",
            "--key",
            "b.txt",
            "--body",
            &f,
        ],
    )?;
    b.fails(
        "AccessDenied",
        &[
            "s3api",
            "delete-object",
            "--bucket",
            "court-a",
            "--key",
            "a.txt",
        ],
    )?;
    b.fails(
        "BucketAlreadyExists",
        &["s3api", "create-bucket", "--bucket", "court-a"],
    )?;
    // Its own bucket works, and each tenant lists only its own.
    b.ok(&["s3", "mb", "s3://court-b"])?;
    // Created again by its owner (a set-up script run twice): 200, as S3
    // answers in us-east-1; but not when asked with Object Lock it lacks.
    b.ok(&["s3api", "create-bucket", "--bucket", "court-b"])?;
    b.fails(
        "BucketAlreadyOwnedByYou",
        &[
            "s3api",
            "create-bucket",
            "--bucket",
            "court-b",
            "--object-lock-enabled-for-bucket",
        ],
    )?;
    // A WORM bucket made again without asking for the lock is as it was.
    let worm = |extra: &[&str]| {
        let mut args = vec!["s3api", "create-bucket", "--bucket", "court-b-worm"];
        args.extend_from_slice(extra);
        b.ok(&args)
    };
    worm(&["--object-lock-enabled-for-bucket"])?;
    worm(&[])?;
    b.ok(&["s3", "cp", &f, "s3://court-b/b.txt"])?;
    let names = |aws: &Aws| -> Result<Vec<String>> {
        Ok(aws.json(&["s3api", "list-buckets"])?["Buckets"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|b| b["Name"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default())
    };
    assert_eq!(names(&b)?, ["court-b", "court-b-worm"]);
    assert_eq!(names(&admin)?, ["court-a"]);

    // A reader key reads but cannot write.
    let (reader, _) = new_key(&c, "court-b", "reader", &[])?;
    reader.ok(&["s3", "cp", "s3://court-b/b.txt", "got.txt"])?;
    assert_eq!(reader.read("got.txt")?, b"tenant b");
    reader.fails(
        "AccessDenied",
        &[
            "s3api",
            "put-object",
            "--bucket",
            "court-b",
            "--key",
            "r.txt",
            "--body",
            &reader.file("r.txt", b"r")?,
        ],
    )?;

    // Unknown keys and wrong secrets are refused; nothing is anonymous.
    let forged = c.data_dir().join("forged.credentials");
    std::fs::write(
        &forged,
        "[default]\naws_access_key_id = CUNOSUCHKEY000000000\naws_secret_access_key = x\n",
    )?;
    let nobody = Aws {
        creds: forged,
        ..Aws::admin(&c)
    };
    nobody.fails("InvalidAccessKeyId", &["s3api", "list-buckets"])?;
    let real = std::fs::read_to_string(c.data_dir().join("s3.credentials"))?;
    let wrong_secret: String = real
        .lines()
        .map(|l| match l.strip_prefix("aws_secret_access_key = ") {
            Some(_) => {
                "aws_secret_access_key = 0000000000000000000000000000000000000000".to_owned()
            }
            None => l.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\n");
    let wrong = c.data_dir().join("wrong.credentials");
    std::fs::write(&wrong, wrong_secret)?;
    let wrong = Aws {
        creds: wrong,
        ..Aws::admin(&c)
    };
    wrong.fails("SignatureDoesNotMatch", &["s3api", "list-buckets"])?;
    let anonymous = ureq::get(format!("{}/court-a/a.txt", c.s3)).call();
    assert!(
        matches!(anonymous, Err(ureq::Error::StatusCode(403))),
        "anonymous reads are refused with 403: {anonymous:?}"
    );

    let (_, live) = new_key(&c, "court-b", "reader", &[])?;
    // Revoked credentials stop working at once: the access key, presigned
    // URLs it signed, and the bearer token.
    let presigned = reader.ok(&["s3", "presign", "s3://court-b/b.txt"])?;
    assert!(ureq::get(presigned.trim()).call().is_ok());
    let reader_key = std::fs::read_to_string(&reader.creds)?
        .lines()
        .find_map(|l| l.strip_prefix("aws_access_key_id = ").map(str::to_owned))
        .unwrap_or_default();
    let status_of = |token: &str| -> Result<u16> {
        let zeros = "0".repeat(64);
        Ok(ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .new_agent()
            .get(&format!("{}/v1/evidence/by-hash/{zeros}", c.api))
            .header("Authorization", &format!("Bearer {token}"))
            .call()?
            .status()
            .as_u16())
    };
    assert_eq!(status_of(&b_token)?, 200, "a valid token is let in");
    let token_file = c.data_dir().join("b.token");
    std::fs::write(&token_file, &b_token)?;
    let token_arg = token_file.to_string_lossy().into_owned();
    let revoke = |args: &[&str]| c.custodia(&[&["key", "revoke"][..], args].concat());
    let out = revoke(&["--access-key", &reader_key, "--token-file", &token_arg])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    reader.fails("InvalidAccessKeyId", &["s3api", "list-buckets"])?;
    assert!(
        matches!(
            ureq::get(presigned.trim()).call(),
            Err(ureq::Error::StatusCode(403))
        ),
        "a presigned URL dies with its key"
    );
    assert_eq!(status_of(&b_token)?, 401);
    // The other key of the tenant still works; revoking again finds nothing.
    b.ok(&["s3api", "list-buckets"])?;
    let again = revoke(&["--access-key", &reader_key])?;
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("no such credential"));
    // A live token beside a mistyped key: the token goes, and the command
    // fails all the same, saying which was not found.
    let live_file = c.data_dir().join("live.token");
    std::fs::write(&live_file, &live)?;
    let half = revoke(&[
        "--access-key",
        "AKIAMISTYPED",
        "--token-file",
        &live_file.to_string_lossy(),
    ])?;
    let said = String::from_utf8_lossy(&half.stdout);
    assert!(
        !half.status.success(),
        "a half-done revoke exited 0: {said}"
    );
    assert!(
        said.contains("token: revoked") && said.contains("AKIAMISTYPED: not found"),
        "{said}"
    );
    assert_eq!(status_of(&live)?, 401, "the live token was not revoked");
    // Not the token the request is made with: the CLI would lock itself out.
    let admin_token = c.data_dir().join("admin.token");
    let own = revoke(&["--token-file", &admin_token.to_string_lossy()])?;
    assert!(!own.status.success());
    assert!(
        String::from_utf8_lossy(&own.stderr).contains("another administrator"),
        "{}",
        String::from_utf8_lossy(&own.stderr)
    );
    assert_eq!(status_of(&c.token)?, 200, "the admin token still works");
    // The key DATA_DIR/s3.credentials holds, revoked (leaked, say): the
    // file goes aside with it, so no tool uses it and recover-index, which
    // registers what that file holds, does not bring it back.
    let creds = c.data_dir().join("s3.credentials");
    let admin_key = std::fs::read_to_string(&creds)?
        .lines()
        .find_map(|l| {
            l.split_once('=')
                .filter(|(k, _)| k.trim() == "aws_access_key_id")
                .map(|(_, v)| v.trim().to_owned())
        })
        .context("the admin's access key")?;
    let out = revoke(&["--access-key", &admin_key])?;
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{said}");
    assert!(said.contains("s3.credentials.revoked"), "{said}");
    assert!(!creds.exists(), "the revoked key's file is still in place");
    assert!(c.data_dir().join("s3.credentials.revoked").exists());
    // A token seen misused in custody records, which the operator never
    // held, is revoked by the id those records name it by.
    let (held, seen) = new_key(&c, "court-b", "clerk", &[])?;
    let seen_id = std::fs::read_to_string(&held.creds)?
        .lines()
        .find_map(|l| l.strip_prefix("custodia_token_id = ").map(str::to_owned))
        .context("key create prints the token's id")?;
    assert_eq!(status_of(&seen)?, 200);
    let mut malformed = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .new_agent()
        .post(&format!("{}/v1/admin/keys/revoke", c.api))
        .header("Authorization", &format!("Bearer {}", c.token))
        .send_json(serde_json::json!({ "token_id": "token:xyz" }))?;
    let body = malformed.body_mut().read_to_string()?;
    assert_eq!(malformed.status().as_u16(), 400, "a malformed id: {body}");
    assert_eq!(status_of(&seen)?, 200, "a refused revoke revoked");
    let out = revoke(&["--token-id", &seen_id])?;
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{said}");
    assert!(
        said.contains(&format!("token {seen_id}: revoked")),
        "{said}"
    );
    assert_eq!(status_of(&seen)?, 401, "revoked by its id, it still works");
    let again = revoke(&["--token-id", &seen_id])?;
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("no such credential"));
    Ok(())
}

#[test]
fn object_lock_holds_against_every_key_admins_included() -> Result<()> {
    if !custodia_tests::require(
        "object_lock_holds_against_every_key_admins_included",
        &[Tool::Aws, Tool::Curl],
    )? {
        return Ok(());
    }
    let c = TestCluster::start(Shape::default())?;
    let admin = Aws::admin(&c);
    admin.ok(&[
        "s3api",
        "create-bucket",
        "--bucket",
        "locked",
        "--object-lock-enabled-for-bucket",
    ])?;
    let v = admin.json(&["s3api", "get-bucket-versioning", "--bucket", "locked"])?;
    assert_eq!(v["Status"], "Enabled");
    admin.fails(
        "InvalidBucketState",
        &[
            "s3api",
            "put-bucket-versioning",
            "--bucket",
            "locked",
            "--versioning-configuration",
            "Status=Suspended",
        ],
    )?;
    let far = "2100-01-01T00:00:00Z";
    let data = bytes(50_000, 7);
    let f = admin.file("c.bin", &data)?;
    let put = |aws: &Aws, key: &str, extra: &[&str]| -> Result<String> {
        let mut args = vec![
            "s3api",
            "put-object",
            "--bucket",
            "locked",
            "--key",
            key,
            "--body",
            &f,
        ];
        args.extend_from_slice(extra);
        Ok(aws.json(&args)?["VersionId"]
            .as_str()
            .unwrap_or_default()
            .to_owned())
    };
    let del_version = |key: &str, vid: &str| -> Vec<String> {
        [
            "s3api",
            "delete-object",
            "--bucket",
            "locked",
            "--key",
            key,
            "--version-id",
            vid,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };

    // COMPLIANCE: nobody deletes the version or shortens its retention.
    let c1 = put(
        &admin,
        "c.bin",
        &[
            "--object-lock-mode",
            "COMPLIANCE",
            "--object-lock-retain-until-date",
            far,
        ],
    )?;
    assert!(!c1.is_empty());
    admin.fails("AccessDenied", &strs(&del_version("c.bin", &c1)))?;
    let mut bypass = del_version("c.bin", &c1);
    bypass.push("--bypass-governance-retention".into());
    admin.fails("AccessDenied", &strs(&bypass))?;
    admin.fails("AccessDenied", &strs(&argv(&format!("s3api put-object-retention --bucket locked --key c.bin --version-id {c1} --retention Mode=COMPLIANCE,RetainUntilDate=2030-01-01T00:00:00Z"))))?;
    admin.fails("AccessDenied", &strs(&argv(&format!("s3api put-object-retention --bucket locked --key c.bin --version-id {c1} --retention Mode=GOVERNANCE,RetainUntilDate=2100-01-01T00:00:00Z"))))?;
    // A retain-until date in the past is refused as S3 does, on a PUT and
    // on the retention call.
    admin.fails("InvalidArgument", &strs(&argv(&format!("s3api put-object-retention --bucket locked --key c.bin --version-id {c1} --retention Mode=COMPLIANCE,RetainUntilDate=2001-01-01T00:00:00Z"))))?;
    admin.fails(
        "InvalidArgument",
        &[
            "s3api",
            "put-object",
            "--bucket",
            "locked",
            "--key",
            "past.bin",
            "--body",
            &f,
            "--object-lock-mode",
            "COMPLIANCE",
            "--object-lock-retain-until-date",
            "2001-01-01T00:00:00Z",
        ],
    )?;
    // COMPLIANCE binds the evidence itself: its manifest carries the
    // retention, so not even an expunge order can remove it early.
    let h = curl_headers(&c, "HEAD", &format!("/locked/c.bin?versionId={c1}"))?;
    let c1_evidence = header(&h, "x-custodia-evidence-id")
        .context("no evidence id")?
        .to_owned();
    let manifest = c.get_with(
        &c.token,
        &format!("/v1/evidence/{c1_evidence}/manifest"),
        &[],
    )?;
    assert_eq!(
        manifest.json()["retain_until_ms"],
        4_102_444_800_000u64,
        "{}",
        manifest.json()
    );
    // Extending is allowed.
    admin.ok(&strs(&argv(&format!("s3api put-object-retention --bucket locked --key c.bin --version-id {c1} --retention Mode=COMPLIANCE,RetainUntilDate=2101-01-01T00:00:00Z"))))?;
    let r = admin.json(&[
        "s3api",
        "get-object-retention",
        "--bucket",
        "locked",
        "--key",
        "c.bin",
        "--version-id",
        &c1,
    ])?;
    assert_eq!(r["Retention"]["Mode"], "COMPLIANCE");
    assert!(r["Retention"]["RetainUntilDate"]
        .as_str()
        .unwrap_or_default()
        .starts_with("2101-01-01"));
    // The change is on the ledger, in the evidence's custody.
    let noted = custodia_tests::eventually(15, || {
        c.get_with(
            &c.token,
            &format!("/v1/evidence/{c1_evidence}/custody"),
            &[],
        )
        .map(|a| {
            a.json()["events"]
                .as_array()
                .is_some_and(|e| e.iter().any(|e| e["kind"] == "admin"))
        })
        .unwrap_or(false)
    });
    assert!(noted, "an S3 retention change is a custody event");
    // A PUT adds a version and a DELETE adds a marker, over the lock.
    let c2 = put(&admin, "c.bin", &[])?;
    assert_ne!(c1, c2);
    let marker = admin.json(&[
        "s3api",
        "delete-object",
        "--bucket",
        "locked",
        "--key",
        "c.bin",
    ])?;
    assert_eq!(marker["DeleteMarker"], true);
    admin.fails(
        "NoSuchKey",
        &[
            "s3api",
            "get-object",
            "--bucket",
            "locked",
            "--key",
            "c.bin",
            "gone",
        ],
    )?;
    admin.ok(&[
        "s3api",
        "get-object",
        "--bucket",
        "locked",
        "--key",
        "c.bin",
        "--version-id",
        &c1,
        "old",
    ])?;
    assert_eq!(admin.read("old")?, data, "the locked version is intact");
    // The unlocked newer version can go.
    admin.ok(&strs(&del_version("c.bin", &c2)))?;

    // Legal hold: nobody deletes; a clerk may place but not lift it.
    let (clerk, _) = new_key(&c, "admin", "clerk", &[])?;
    let h1 = put(&admin, "h.bin", &["--object-lock-legal-hold-status", "ON"])?;
    // A hold asked for in any other spelling is refused, not stored as no
    // hold.
    admin.fails(
        "InvalidArgument",
        &strs(&argv(&format!(
            "s3api put-object --bucket locked --key h.bin --body {f} --object-lock-legal-hold-status on"
        ))),
    )?;
    admin.fails("AccessDenied", &strs(&del_version("h.bin", &h1)))?;
    clerk.fails(
        "AccessDenied",
        &[
            "s3api",
            "put-object-legal-hold",
            "--bucket",
            "locked",
            "--key",
            "h.bin",
            "--version-id",
            &h1,
            "--legal-hold",
            "Status=OFF",
        ],
    )?;
    // OFF where no hold is changes nothing, and is answered so (as S3),
    // whoever asks.
    let free = put(&admin, "free.bin", &[])?;
    clerk.ok(&[
        "s3api",
        "put-object-legal-hold",
        "--bucket",
        "locked",
        "--key",
        "free.bin",
        "--version-id",
        &free,
        "--legal-hold",
        "Status=OFF",
    ])?;
    // The hold binds the evidence and is on the ledger.
    let h = curl_headers(&c, "HEAD", &format!("/locked/h.bin?versionId={h1}"))?;
    let h1_evidence = header(&h, "x-custodia-evidence-id")
        .context("no evidence id")?
        .to_owned();
    let manifest = c.get_with(
        &c.token,
        &format!("/v1/evidence/{h1_evidence}/manifest"),
        &[],
    )?;
    assert_eq!(manifest.json()["legal_hold"], true);
    let held = admin.json(&[
        "s3api",
        "get-object-legal-hold",
        "--bucket",
        "locked",
        "--key",
        "h.bin",
        "--version-id",
        &h1,
    ])?;
    assert_eq!(held["LegalHold"]["Status"], "ON");
    admin.ok(&[
        "s3api",
        "put-object-legal-hold",
        "--bucket",
        "locked",
        "--key",
        "h.bin",
        "--version-id",
        &h1,
        "--legal-hold",
        "Status=OFF",
    ])?;
    admin.ok(&strs(&del_version("h.bin", &h1)))?;
    let manifest = c.get_with(
        &c.token,
        &format!("/v1/evidence/{h1_evidence}/manifest"),
        &[],
    )?;
    assert_eq!(manifest.json()["legal_hold"], false);
    let released = custodia_tests::eventually(15, || {
        c.get_with(
            &c.token,
            &format!("/v1/evidence/{h1_evidence}/custody"),
            &[],
        )
        .map(|a| {
            a.json()["events"]
                .as_array()
                .is_some_and(|e| e.iter().any(|e| e["kind"] == "released"))
        })
        .unwrap_or(false)
    });
    assert!(released, "lifting the S3 hold is a custody event");
    // One hold per evidence, whichever API places or lifts it: lifted on
    // the evidence API, S3 says so; placed there, S3 shows it and refuses
    // to delete the version.
    let hold_call = |method: &str, evidence: &str| -> Result<u16> {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        let url = format!("{}/v1/evidence/{evidence}/legal-hold", c.api);
        let auth = format!("Bearer {}", c.token);
        let resp = match method {
            "PUT" => agent
                .put(&url)
                .header("authorization", &auth)
                .send_empty()?,
            _ => agent.delete(&url).header("authorization", &auth).call()?,
        };
        Ok(resp.status().as_u16())
    };
    let s3_hold = |vid: &str| -> Result<String> {
        let got = admin.json(&[
            "s3api",
            "get-object-legal-hold",
            "--bucket",
            "locked",
            "--key",
            "h2.bin",
            "--version-id",
            vid,
        ])?;
        Ok(got["LegalHold"]["Status"]
            .as_str()
            .unwrap_or_default()
            .to_owned())
    };
    let h2 = put(&admin, "h2.bin", &["--object-lock-legal-hold-status", "ON"])?;
    let h = curl_headers(&c, "HEAD", &format!("/locked/h2.bin?versionId={h2}"))?;
    let h2_evidence = header(&h, "x-custodia-evidence-id")
        .context("no evidence id")?
        .to_owned();
    assert_eq!(hold_call("DELETE", &h2_evidence)?, 200);
    assert_eq!(s3_hold(&h2)?, "OFF");
    // Lifted so, S3's OFF lifts nothing more: a clerk's is answered 200
    // (it only clears the version's mirror of the hold), where lifting a
    // hold that stands needs an admin.
    let off = [
        "s3api",
        "put-object-legal-hold",
        "--bucket",
        "locked",
        "--key",
        "h2.bin",
        "--version-id",
        &h2,
        "--legal-hold",
        "Status=OFF",
    ];
    clerk.ok(&off)?;
    assert_eq!(s3_hold(&h2)?, "OFF");
    assert_eq!(hold_call("PUT", &h2_evidence)?, 200);
    assert_eq!(s3_hold(&h2)?, "ON");
    admin.fails("AccessDenied", &strs(&del_version("h2.bin", &h2)))?;

    // Retention set on the evidence through the evidence API is the
    // version's as S3 clients read it, as it holds against their deletes.
    let e1 = put(&admin, "e.bin", &[])?;
    let h = curl_headers(&c, "HEAD", &format!("/locked/e.bin?versionId={e1}"))?;
    assert!(header(&h, "x-amz-object-lock-mode").is_none(), "{h}");
    let e1_evidence = header(&h, "x-custodia-evidence-id")
        .context("no evidence id")?
        .to_owned();
    let until_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as u64
        + 2 * 86_400_000;
    let set = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .new_agent()
        .put(format!("{}/v1/evidence/{e1_evidence}/retention", c.api))
        .header("authorization", format!("Bearer {}", c.token))
        .send_json(serde_json::json!({ "retain_until_ms": until_ms }))?;
    assert_eq!(set.status().as_u16(), 200);
    let r = admin.json(&strs(&argv(&format!(
        "s3api get-object-retention --bucket locked --key e.bin --version-id {e1}"
    ))))?;
    assert_eq!(r["Retention"]["Mode"], "COMPLIANCE", "{r}");
    let h = curl_headers(&c, "HEAD", &format!("/locked/e.bin?versionId={e1}"))?;
    assert_eq!(
        header(&h, "x-amz-object-lock-mode"),
        Some("compliance"),
        "{h}"
    );
    admin.fails("AccessDenied", &strs(&del_version("e.bin", &e1)))?;

    // GOVERNANCE: bypassed only by a key with the permission, asking for it.
    let g1 = put(
        &admin,
        "g.bin",
        &[
            "--object-lock-mode",
            "GOVERNANCE",
            "--object-lock-retain-until-date",
            far,
        ],
    )?;
    let mut g_bypass = del_version("g.bin", &g1);
    g_bypass.push("--bypass-governance-retention".into());
    admin.fails("AccessDenied", &strs(&g_bypass))?;
    let (officer, _) = new_key(&c, "admin", "clerk", &["--bypass-governance"])?;
    officer.fails("AccessDenied", &strs(&del_version("g.bin", &g1)))?;
    officer.ok(&strs(&g_bypass))?;

    // Default retention applies to PUTs without headers.
    admin.ok(&["s3api", "put-object-lock-configuration", "--bucket", "locked", "--object-lock-configuration",
               r#"{"ObjectLockEnabled":"Enabled","Rule":{"DefaultRetention":{"Mode":"COMPLIANCE","Days":1}}}"#])?;
    let d1 = put(&admin, "d.bin", &[])?;
    let r = admin.json(&[
        "s3api",
        "get-object-retention",
        "--bucket",
        "locked",
        "--key",
        "d.bin",
    ])?;
    assert_eq!(r["Retention"]["Mode"], "COMPLIANCE");
    admin.fails("AccessDenied", &strs(&del_version("d.bin", &d1)))?;
    // A default in years is kept in years (answered back as set) and runs
    // to the same date by the calendar, not to 365 days on.
    admin.ok(&["s3api", "put-object-lock-configuration", "--bucket", "locked", "--object-lock-configuration",
               r#"{"ObjectLockEnabled":"Enabled","Rule":{"DefaultRetention":{"Mode":"GOVERNANCE","Years":1}}}"#])?;
    // A period out of range, and no configuration at all (an empty body,
    // which must not clear the default retention), are refused.
    admin.fails("InvalidArgument", &["s3api", "put-object-lock-configuration", "--bucket", "locked",
        "--object-lock-configuration", r#"{"ObjectLockEnabled":"Enabled","Rule":{"DefaultRetention":{"Mode":"GOVERNANCE","Days":0}}}"#])?;
    // An empty configuration, one not saying Enabled, and a Rule without
    // its DefaultRetention: malformed, the default kept (checked below).
    for conf in [
        r#"{}"#,
        r#"{"Rule":{"DefaultRetention":{"Mode":"GOVERNANCE","Days":3}}}"#,
        r#"{"ObjectLockEnabled":"Enabled","Rule":{}}"#,
    ] {
        admin.fails(
            "MalformedXML",
            &[
                "s3api",
                "put-object-lock-configuration",
                "--bucket",
                "locked",
                "--object-lock-configuration",
                conf,
            ],
        )?;
    }
    // (Only with a digest of the body, as S3 has it.)
    let url = format!("{}/locked?object-lock=", c.s3);
    let (head, body) = curl(&c, "PUT", &url, &[])?;
    assert!(head.starts_with("http/1.1 400"), "{head}");
    assert!(
        String::from_utf8_lossy(&body).contains("InvalidRequest"),
        "{head}"
    );
    let empty_md5 = "content-md5: 1B2M2Y8AsgTpgAmY7PhCfg==";
    let (head, body) = curl(&c, "PUT", &url, &["-H", empty_md5])?;
    assert!(
        head.starts_with("http/1.1 400"),
        "{head}{}",
        String::from_utf8_lossy(&body)
    );
    assert!(
        String::from_utf8_lossy(&body).contains("MalformedXML"),
        "{head}"
    );
    let conf = admin.json(&[
        "s3api",
        "get-object-lock-configuration",
        "--bucket",
        "locked",
    ])?;
    let rule = &conf["ObjectLockConfiguration"]["Rule"]["DefaultRetention"];
    assert_eq!(
        (&rule["Years"], &rule["Days"], &rule["Mode"]),
        (&1.into(), &Value::Null, &"GOVERNANCE".into()),
        "{conf}"
    );
    put(&admin, "y.bin", &[])?;
    let head = admin.json(&[
        "s3api",
        "head-object",
        "--bucket",
        "locked",
        "--key",
        "y.bin",
    ])?;
    // RetainUntilDate is ISO 8601; LastModified is an HTTP date ("Thu, 03
    // Dec 2026 22:59:49 GMT") from aws-cli 1, ISO 8601 from aws-cli 2
    // (Debian's): each as (year, month, day).
    let until = head["ObjectLockRetainUntilDate"]
        .as_str()
        .unwrap_or_default();
    let iso = |d: &str| -> Option<(u32, u32, u32)> {
        Some((
            d.get(..4)?.parse().ok()?,
            d.get(5..7)?.parse().ok()?,
            d.get(8..10)?.parse().ok()?,
        ))
    };
    let http = |d: &str| -> Option<(u32, u32, u32)> {
        let mut w = d.split_whitespace().skip(1);
        let day = w.next()?.parse().ok()?;
        let months = [
            "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
        ];
        let name = w.next()?;
        let month = months.iter().position(|m| *m == name)? as u32 + 1;
        Some((w.next()?.parse().ok()?, month, day))
    };
    let modified = head["LastModified"].as_str().unwrap_or_default();
    let filed = http(modified)
        .or_else(|| iso(modified))
        .with_context(|| format!("LastModified {modified:?}"))?;
    let want = match filed {
        (y, 2, 29) => (y + 1, 3, 1),
        (y, m, d) => (y + 1, m, d),
    };
    assert_eq!(iso(until), Some(want), "a calendar year on: {head}");

    // A multipart object takes the default as it stands at completion
    // (changed here during the upload), as S3 applies it.
    let up = admin.json(&[
        "s3api",
        "create-multipart-upload",
        "--bucket",
        "locked",
        "--key",
        "m.bin",
    ])?;
    let upload = up["UploadId"].as_str().unwrap_or_default().to_owned();
    let on_upload = format!("--bucket locked --key m.bin --upload-id {upload}");
    let part = admin.json(&strs(&argv(&format!(
        "s3api upload-part {on_upload} --part-number 1 --body {f}"
    ))))?;
    admin.ok(&["s3api", "put-object-lock-configuration", "--bucket", "locked", "--object-lock-configuration",
               r#"{"ObjectLockEnabled":"Enabled","Rule":{"DefaultRetention":{"Mode":"COMPLIANCE","Days":1}}}"#])?;
    let mut complete = argv(&format!("s3api complete-multipart-upload {on_upload}"));
    complete.push("--multipart-upload".into());
    complete.push(format!(
        r#"{{"Parts":[{{"PartNumber":1,"ETag":{}}}]}}"#,
        part["ETag"]
    ));
    admin.ok(&strs(&complete))?;
    let r = admin.json(&strs(&argv(
        "s3api get-object-retention --bucket locked --key m.bin",
    )))?;
    assert_eq!(r["Retention"]["Mode"], "COMPLIANCE", "{r}");

    // Lock headers on a bucket without Object Lock are refused.
    admin.ok(&["s3", "mb", "s3://plain"])?;
    let put_plain = [
        "s3api",
        "put-object",
        "--bucket",
        "plain",
        "--key",
        "x",
        "--body",
        &f,
    ];
    let lock = [
        "--object-lock-mode",
        "COMPLIANCE",
        "--object-lock-retain-until-date",
        far,
    ];
    admin.fails("InvalidRequest", &[&put_plain[..], &lock[..]].concat())?;
    // Nor is there a lock to read there.
    admin.ok(&put_plain)?;
    for call in ["get-object-retention", "get-object-legal-hold"] {
        admin.fails(
            "InvalidRequest",
            &["s3api", call, "--bucket", "plain", "--key", "x"],
        )?;
    }
    // Unless its evidence is held through the evidence API: the hold that
    // refuses the version's deletion is shown, as its retention would be.
    let h = curl_headers(&c, "HEAD", "/plain/x")?;
    assert!(header(&h, "x-amz-object-lock-legal-hold").is_none(), "{h}");
    let x_evidence = header(&h, "x-custodia-evidence-id")
        .context("no evidence id")?
        .to_owned();
    assert_eq!(hold_call("PUT", &x_evidence)?, 200);
    let h = curl_headers(&c, "HEAD", "/plain/x")?;
    assert_eq!(
        header(&h, "x-amz-object-lock-legal-hold"),
        Some("on"), // (headers lower-cased, values too)
        "{h}"
    );
    let got = admin.json(&[
        "s3api",
        "get-object-legal-hold",
        "--bucket",
        "plain",
        "--key",
        "x",
    ])?;
    assert_eq!(got["LegalHold"]["Status"], "ON", "{got}");
    assert_eq!(hold_call("DELETE", &x_evidence)?, 200);
    admin.fails(
        "InvalidRequest",
        &[
            "s3api",
            "get-object-legal-hold",
            "--bucket",
            "plain",
            "--key",
            "x",
        ],
    )?;
    // And so is a retention set through the evidence API.
    let until = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis()
        + 3_600_000) as u64;
    let resp = ureq::Agent::from(
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build(),
    )
    .put(format!("{}/v1/evidence/{x_evidence}/retention", c.api))
    .header("authorization", &format!("Bearer {}", c.token))
    .send_json(serde_json::json!({ "retain_until_ms": until }))?;
    assert_eq!(resp.status().as_u16(), 200);
    let got = admin.json(&[
        "s3api",
        "get-object-retention",
        "--bucket",
        "plain",
        "--key",
        "x",
    ])?;
    assert_eq!(got["Retention"]["Mode"], "COMPLIANCE", "{got}");
    check_on_disk(&c, &data)
}

/// The locked bytes are still on the nodes: reading them through the
/// evidence API by content root finds the filing.
fn check_on_disk(c: &TestCluster, data: &[u8]) -> Result<()> {
    let root = blake3::hash(data).to_hex().to_string();
    let found = c.get_with(&c.token, &format!("/v1/evidence/by-hash/{root}"), &[])?;
    let n = found.json()["filings"]
        .as_array()
        .map(Vec::len)
        .unwrap_or(0);
    if n == 0 {
        bail!(
            "no filing of the locked content: {}",
            String::from_utf8_lossy(&found.body)
        );
    }
    Ok(())
}

#[test]
fn multipart_uploads_complete_abort_and_list() -> Result<()> {
    if !custodia_tests::require("multipart_uploads_complete_abort_and_list", &[Tool::Aws])? {
        return Ok(());
    }
    let c = TestCluster::start(Shape {
        shard_size: 256 * 1024,
        ..Shape::default()
    })?;
    let aws = Aws::admin(&c);
    aws.ok(&["s3", "mb", "s3://big"])?;
    // 100 MiB through `aws s3 cp`, which splits it into 7 parts.
    let data = bytes(100 << 20, 42);
    let f = aws.file("big.bin", &data)?;
    let counted = |series: &str| c.metric(&c.metrics, series).unwrap_or(0.0);
    let (ingest, read) = (
        counted("custodia_ingest_bytes_total"),
        counted("custodia_read_bytes_total"),
    );
    aws.ok(&["s3", "cp", &f, "s3://big/video.bin"])?;
    // What the client sent counts once as ingest (its parts), and the
    // completion's reading of them back is nobody's read.
    assert_eq!(
        counted("custodia_ingest_bytes_total") - ingest,
        (100u64 << 20) as f64
    );
    assert_eq!(counted("custodia_read_bytes_total") - read, 0.0);
    let head = aws.json(&[
        "s3api",
        "head-object",
        "--bucket",
        "big",
        "--key",
        "video.bin",
    ])?;
    assert_eq!(head["ContentLength"], 100u64 << 20);
    assert!(
        head["ETag"].as_str().unwrap_or_default().ends_with("-7\""),
        "{head}"
    );
    aws.ok(&["s3", "cp", "s3://big/video.bin", "back.bin"])?;
    assert!(
        aws.read("back.bin")? == data,
        "100 MiB read back byte-exact"
    );
    // The object is one piece of evidence with the whole file's roots.
    let root = blake3::hash(&data).to_hex().to_string();
    let found = c.get_with(&c.token, &format!("/v1/evidence/by-hash/{root}"), &[])?;
    assert_eq!(found.json()["filings"].as_array().map(Vec::len), Some(1));
    // No multipart upload is left behind, and the parts' shards are gone:
    // the nodes hold one erasure-coded copy (1.5x for RS(4,2)).
    let uploads = aws.json(&["s3api", "list-multipart-uploads", "--bucket", "big"])?;
    assert!(
        uploads["Uploads"].as_array().is_none_or(Vec::is_empty),
        "{uploads}"
    );
    // (Deleted once the answer is on its way: it does not wait for them.)
    let stored = || -> u64 {
        c.all_shard_files()
            .iter()
            .filter_map(|p| std::fs::metadata(p).ok())
            .map(|m| m.len())
            .sum()
    };
    assert!(
        custodia_tests::eventually(30, || stored() < (100u64 << 20) * 16 / 10),
        "parts were not deleted: {} bytes on nodes",
        stored()
    );
    // Its parts are not kept apart: it reads as one part, whole, and a
    // part-wise downloader asking for part 2 is told there is none.
    let by_part = |n: &str| {
        aws.run(&[
            "s3api",
            "get-object",
            "--bucket",
            "big",
            "--key",
            "video.bin",
            "--part-number",
            n,
            "part.bin",
        ])
    };
    let part1 = by_part("1")?;
    assert!(
        part1.status.success(),
        "{}",
        String::from_utf8_lossy(&part1.stderr)
    );
    let answer: Value = serde_json::from_slice(&part1.stdout)?;
    assert_eq!(answer["ContentLength"], 100u64 << 20, "{answer}");
    assert!(answer.get("PartsCount").is_none(), "{answer}");
    let part2 = by_part("2")?;
    let said = String::from_utf8_lossy(&part2.stderr);
    assert!(
        !part2.status.success() && said.contains("InvalidPartNumber"),
        "{said}"
    );
    // Asked for encryption with a KMS key it does not have, the store
    // refuses rather than keep the bytes unencrypted.
    let small = aws.file("small.bin", b"sealed")?;
    let kms = aws.run(&[
        "s3",
        "cp",
        &small,
        "s3://big/sealed.bin",
        "--sse",
        "aws:kms",
    ])?;
    let said = String::from_utf8_lossy(&kms.stderr);
    assert!(
        !kms.status.success() && said.contains("NotImplemented"),
        "{said}"
    );
    aws.ok(&["s3", "cp", &small, "s3://big/small.bin"])?;
    let part1 = aws.json(&[
        "s3api",
        "get-object",
        "--bucket",
        "big",
        "--key",
        "small.bin",
        "--part-number",
        "1",
        "part1.bin",
    ])?;
    assert_eq!(part1["ContentLength"], 6, "{part1}");
    assert_eq!(aws.read("part1.bin")?, b"sealed");
    // Copied inside the store, as `aws s3 cp` does past 8 MiB: part by part,
    // after asking for the source's tags.
    aws.ok(&["s3", "cp", "s3://big/video.bin", "s3://big/video-copy.bin"])?;
    let copy = aws.json(&[
        "s3api",
        "head-object",
        "--bucket",
        "big",
        "--key",
        "video-copy.bin",
    ])?;
    assert_eq!(copy["ContentLength"], 100u64 << 20, "{copy}");

    // By hand: parts listed, too-small parts refused at completion, abort.
    let up = aws.json(&[
        "s3api",
        "create-multipart-upload",
        "--bucket",
        "big",
        "--key",
        "m.bin",
    ])?;
    let id = up["UploadId"].as_str().unwrap_or_default().to_owned();
    let p1 = aws.file("p1", &bytes(1 << 20, 1))?;
    let p2 = aws.file("p2", &bytes(1000, 2))?;
    for (n, p) in [("1", &p1), ("2", &p2)] {
        aws.ok(&[
            "s3api",
            "upload-part",
            "--bucket",
            "big",
            "--key",
            "m.bin",
            "--upload-id",
            &id,
            "--part-number",
            n,
            "--body",
            p,
        ])?;
    }
    let parts = aws.json(&[
        "s3api",
        "list-parts",
        "--bucket",
        "big",
        "--key",
        "m.bin",
        "--upload-id",
        &id,
    ])?;
    assert_eq!(parts["Parts"].as_array().map(Vec::len), Some(2));
    assert_eq!(
        parts["Parts"][0]["ETag"],
        format!("\"{}\"", md5_hex(&bytes(1 << 20, 1)))
    );
    let listing = format!(
        r#"{{"Parts":[{{"PartNumber":1,"ETag":{}}},{{"PartNumber":2,"ETag":{}}}]}}"#,
        parts["Parts"][0]["ETag"], parts["Parts"][1]["ETag"]
    );
    // A part listed without its ETag, or with a SHA-256 it was not
    // uploaded with, is not the part the client meant.
    let sha = |b: &[u8]| {
        use base64::Engine as _;
        use sha2::Digest as _;
        base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(b))
    };
    for (bad, why) in [
        (
            format!(
                r#"{{"Parts":[{{"PartNumber":1}},{{"PartNumber":2,"ETag":{}}}]}}"#,
                parts["Parts"][1]["ETag"]
            ),
            "no ETag",
        ),
        (
            format!(
                r#"{{"Parts":[{{"PartNumber":1,"ETag":{},"ChecksumSHA256":"{}"}},{{"PartNumber":2,"ETag":{}}}]}}"#,
                parts["Parts"][0]["ETag"],
                sha(&bytes(1 << 20, 9)),
                parts["Parts"][1]["ETag"]
            ),
            "another SHA-256",
        ),
    ] {
        let out = aws.run(&[
            "s3api",
            "complete-multipart-upload",
            "--bucket",
            "big",
            "--key",
            "m.bin",
            "--upload-id",
            &id,
            "--multipart-upload",
            &bad,
        ])?;
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("InvalidPart"),
            "{why}: {err}"
        );
    }
    aws.fails(
        "EntityTooSmall",
        &[
            "s3api",
            "complete-multipart-upload",
            "--bucket",
            "big",
            "--key",
            "m.bin",
            "--upload-id",
            &id,
            "--multipart-upload",
            &listing,
        ],
    )?;
    let uploads = aws.json(&["s3api", "list-multipart-uploads", "--bucket", "big"])?;
    assert_eq!(uploads["Uploads"][0]["UploadId"], id.as_str());
    // Listed in key order and paged by the markers, as S3 does.
    let begin = |key: &'static str| -> Result<(&str, String)> {
        let up = aws.json(&[
            "s3api",
            "create-multipart-upload",
            "--bucket",
            "big",
            "--key",
            key,
        ])?;
        Ok((key, up["UploadId"].as_str().unwrap_or_default().to_owned()))
    };
    let listed = |extra: &[&str]| {
        let mut args = vec!["s3api", "list-multipart-uploads", "--bucket", "big"];
        args.extend_from_slice(extra);
        aws.json(&args)
    };
    // The `field` of each entry of `list` in a listing.
    let each = |v: &serde_json::Value, list: &str, field: &str| -> Vec<String> {
        v[list]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|u| u[field].as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    };
    let keys = |v: &serde_json::Value| each(v, "Uploads", "Key");
    let prefixes = |v: &serde_json::Value| each(v, "CommonPrefixes", "Prefix");
    let mut others = vec![begin("z.bin")?, begin("a.bin")?];
    let all = listed(&[])?;
    assert_eq!(keys(&all), ["a.bin", "m.bin", "z.bin"]);
    let first = listed(&["--max-uploads", "1", "--no-paginate"])?;
    assert_eq!(keys(&first), ["a.bin"]);
    assert_eq!(first["IsTruncated"], true, "{first}");
    let next = listed(&[
        "--max-uploads",
        "1",
        "--no-paginate",
        "--key-marker",
        first["NextKeyMarker"].as_str().unwrap_or_default(),
        "--upload-id-marker",
        first["NextUploadIdMarker"].as_str().unwrap_or_default(),
    ])?;
    assert_eq!(keys(&next), ["m.bin"]);
    // With a delimiter, keys under a common prefix are rolled up into it,
    // which counts as one entry and can end a page.
    others.extend([begin("d/1.bin")?, begin("d/2.bin")?]);
    let rolled = listed(&["--delimiter", "/"])?;
    assert_eq!(keys(&rolled), ["a.bin", "m.bin", "z.bin"], "{rolled}");
    assert_eq!(prefixes(&rolled), ["d/"], "{rolled}");
    let page = listed(&["--delimiter", "/", "--max-uploads", "2", "--no-paginate"])?;
    assert_eq!(
        (keys(&page), prefixes(&page)),
        (vec!["a.bin".to_string()], vec!["d/".to_string()]),
        "{page}"
    );
    assert_eq!(page["NextKeyMarker"], "d/", "{page}");
    let rest = listed(&["--delimiter", "/", "--key-marker", "d/"])?;
    assert_eq!(keys(&rest), ["m.bin", "z.bin"], "{rest}");
    assert!(prefixes(&rest).is_empty(), "{rest}");
    let under = listed(&["--delimiter", "/", "--prefix", "d/"])?;
    assert_eq!(keys(&under), ["d/1.bin", "d/2.bin"], "{under}");
    // A bucket with nothing but an upload in progress can be deleted (as
    // in S3); the upload goes with it.
    aws.ok(&["s3", "mb", "s3://scratch"])?;
    let up = aws.json(&[
        "s3api",
        "create-multipart-upload",
        "--bucket",
        "scratch",
        "--key",
        "left.bin",
    ])?;
    let left = up["UploadId"].as_str().unwrap_or_default().to_owned();
    aws.ok(&[
        "s3api",
        "upload-part",
        "--bucket",
        "scratch",
        "--key",
        "left.bin",
        "--upload-id",
        &left,
        "--part-number",
        "1",
        "--body",
        &p1,
    ])?;
    aws.ok(&["s3", "rb", "s3://scratch"])?;
    aws.ok(&["s3", "mb", "s3://scratch"])?;
    let none = aws.json(&["s3api", "list-multipart-uploads", "--bucket", "scratch"])?;
    assert!(keys(&none).is_empty(), "{none}");
    for (key, up) in &others {
        aws.ok(&[
            "s3api",
            "abort-multipart-upload",
            "--bucket",
            "big",
            "--key",
            key,
            "--upload-id",
            up,
        ])?;
    }
    aws.ok(&[
        "s3api",
        "abort-multipart-upload",
        "--bucket",
        "big",
        "--key",
        "m.bin",
        "--upload-id",
        &id,
    ])?;
    aws.fails(
        "NoSuchUpload",
        &[
            "s3api",
            "list-parts",
            "--bucket",
            "big",
            "--key",
            "m.bin",
            "--upload-id",
            &id,
        ],
    )?;
    aws.fails(
        "404",
        &["s3api", "head-object", "--bucket", "big", "--key", "m.bin"],
    )?;

    // Two completions of one upload at once, in a versioned bucket (a
    // client's retry racing its first request): one object version (the
    // upload ends in the transaction that makes the object visible), and
    // both requests get its answer, as from S3.
    aws.ok(&["s3api", "create-bucket", "--bucket", "twice"])?;
    aws.ok(&[
        "s3api",
        "put-bucket-versioning",
        "--bucket",
        "twice",
        "--versioning-configuration",
        "Status=Enabled",
    ])?;
    let up = aws.json(&[
        "s3api",
        "create-multipart-upload",
        "--bucket",
        "twice",
        "--key",
        "t.bin",
    ])?;
    let tid = up["UploadId"].as_str().unwrap_or_default().to_owned();
    let p = aws.file("t1", &bytes(6 << 20, 71))?;
    let part = aws.json(&[
        "s3api",
        "upload-part",
        "--bucket",
        "twice",
        "--key",
        "t.bin",
        "--upload-id",
        &tid,
        "--part-number",
        "1",
        "--body",
        &p,
    ])?;
    let listing = format!(
        r#"{{"Parts":[{{"PartNumber":1,"ETag":{}}}]}}"#,
        part["ETag"]
    );
    let complete_with = |listing: &str| {
        aws.run(&[
            "s3api",
            "complete-multipart-upload",
            "--bucket",
            "twice",
            "--key",
            "t.bin",
            "--upload-id",
            &tid,
            "--multipart-upload",
            listing,
        ])
    };
    let complete = || complete_with(&listing);
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(complete);
        let b = s.spawn(complete);
        (a.join(), b.join())
    });
    let answers: Vec<serde_json::Value> = [a, b]
        .into_iter()
        .filter_map(|r| r.ok().and_then(Result::ok))
        .filter(|o| o.status.success())
        .filter_map(|o| serde_json::from_slice(&o.stdout).ok())
        .collect();
    assert_eq!(answers.len(), 2, "both completions answer: {answers:?}");
    let versions = aws.json(&["s3api", "list-object-versions", "--bucket", "twice"])?;
    assert_eq!(
        versions["Versions"].as_array().map(Vec::len),
        Some(1),
        "{versions}"
    );
    let version = &versions["Versions"][0];
    // Done within `s3_keep_alive_after_ms`, each answer names the version.
    for answer in &answers {
        assert_eq!(answer["ETag"], version["ETag"], "{answer}");
        assert_eq!(answer["VersionId"], version["VersionId"], "{answer}");
    }
    // A retry long after gets the same answer; one listing other parts is
    // not a retry of this completion, and finds no upload.
    let again = complete()?;
    let again: serde_json::Value = serde_json::from_slice(&again.stdout).unwrap_or_default();
    assert_eq!(again["ETag"], version["ETag"], "{again}");
    assert_eq!(again["VersionId"], version["VersionId"], "{again}");
    let other = format!(
        r#"{{"Parts":[{{"PartNumber":1,"ETag":"\"{}\""}}]}}"#,
        md5_hex(b"x")
    );
    let refused = complete_with(&other)?;
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && said.contains("NoSuchUpload"),
        "{said}"
    );

    // UploadPartCopy: a part cut from an existing object, then a plain part.
    let up = aws.json(&[
        "s3api",
        "create-multipart-upload",
        "--bucket",
        "big",
        "--key",
        "assembled.bin",
    ])?;
    let id = up["UploadId"].as_str().unwrap_or_default().to_owned();
    let copy_args = |range: String| -> Vec<String> {
        argv(&format!(
            "s3api upload-part-copy --bucket big --key assembled.bin --upload-id {id} \
             --part-number 1 --copy-source big/video.bin --copy-source-range {range}"
        ))
    };
    let (from, to) = (3u64 << 20, (9u64 << 20) - 1);
    let past_end = format!("bytes={}-{}", 100u64 << 20, (101u64 << 20) - 1);
    // As S3 answers: InvalidArgument, for a range past the end as for one
    // malformed.
    aws.fails("InvalidArgument", &strs(&copy_args(past_end)))?;
    aws.fails("InvalidArgument", &strs(&copy_args("bytes=5-".into())))?;
    let copied = aws.json(&strs(&copy_args(format!("bytes={from}-{to}"))))?;
    let expected = &data[from as usize..=to as usize];
    assert_eq!(
        copied["CopyPartResult"]["ETag"],
        format!("\"{}\"", md5_hex(expected))
    );
    let on_upload = format!("--bucket big --key assembled.bin --upload-id {id}");
    aws.ok(&strs(&argv(&format!(
        "s3api upload-part {on_upload} --part-number 2 --body {p2}"
    ))))?;
    let parts = aws.json(&strs(&argv(&format!("s3api list-parts {on_upload}"))))?;
    let mut complete = argv(&format!("s3api complete-multipart-upload {on_upload}"));
    complete.push("--multipart-upload".into());
    complete.push(format!(
        r#"{{"Parts":[{{"PartNumber":1,"ETag":{}}},{{"PartNumber":2,"ETag":{}}}]}}"#,
        parts["Parts"][0]["ETag"], parts["Parts"][1]["ETag"]
    ));
    aws.ok(&strs(&complete))?;
    aws.ok(&["s3", "cp", "s3://big/assembled.bin", "assembled.out"])?;
    let mut want = expected.to_vec();
    want.extend_from_slice(&bytes(1000, 2));
    assert!(
        aws.read("assembled.out")? == want,
        "a copied part and a plain part make the object"
    );
    Ok(())
}

/// A CompleteMultipartUpload that fails while the object is being filed
/// (here: its part's shards are gone from every node) is answered after
/// its 200 has started: the answer is still one well-formed XML document
/// carrying the error, which clients parse for its code (a second XML
/// declaration made botocore report a generic 500 instead).
#[test]
fn a_complete_that_fails_while_filing_answers_one_xml_document() -> Result<()> {
    if !custodia_tests::require(
        "a_complete_that_fails_while_filing_answers_one_xml_document",
        &[Tool::Aws, Tool::Curl],
    )? {
        return Ok(());
    }
    let mut c = TestCluster::start(Shape::default())?;
    let aws = Aws::admin(&c);
    aws.ok(&["s3", "mb", "s3://late"])?;
    let up = aws.json(&[
        "s3api",
        "create-multipart-upload",
        "--bucket",
        "late",
        "--key",
        "gone.bin",
    ])?;
    let id = up["UploadId"].as_str().context("upload id")?.to_owned();
    let p = aws.file("p1", &bytes(100_000, 5))?;
    let part = aws.json(&[
        "s3api",
        "upload-part",
        "--bucket",
        "late",
        "--key",
        "gone.bin",
        "--upload-id",
        &id,
        "--part-number",
        "1",
        "--body",
        &p,
    ])?;
    let etag = part["ETag"].as_str().context("etag")?.to_owned();
    // A part without its number is not a part list S3 reads.
    let numberless = format!(
        "<CompleteMultipartUpload><Part><ETag>{etag}</ETag></Part></CompleteMultipartUpload>"
    );
    let (head, body) = curl(
        &c,
        "POST",
        &format!("{}/late/gone.bin?uploadId={id}", c.s3),
        &[
            "--data-binary",
            &numberless,
            "-H",
            "content-type: application/xml",
        ],
    )?;
    let body = String::from_utf8_lossy(&body);
    assert!(
        head.starts_with("http/1.1 400") && body.contains("<Code>MalformedXML</Code>"),
        "{head}{body}"
    );
    // The part is all the cluster holds.
    let files = c.all_shard_files();
    assert!(!files.is_empty(), "the part is on the nodes");
    for f in &files {
        std::fs::remove_file(f)?;
    }
    let xml = format!(
        "<CompleteMultipartUpload><Part><PartNumber>1</PartNumber><ETag>{etag}</ETag></Part></CompleteMultipartUpload>"
    );
    // Failing at once, it is answered with its own status; failing after
    // the answer began (here at once), inside the 200.
    for (keep_alive_after, status) in [(15_000, "503"), (0, "200")] {
        c.set_gateway(&[(
            "s3_keep_alive_after_ms",
            toml::Value::Integer(keep_alive_after),
        )])?;
        let (head, body) = curl(
            &c,
            "POST",
            &format!("{}/late/gone.bin?uploadId={id}", c.s3),
            &["--data-binary", &xml, "-H", "content-type: application/xml"],
        )?;
        let body = String::from_utf8_lossy(&body);
        assert!(head.starts_with(&format!("http/1.1 {status}")), "{head}");
        // The cluster's failure (503, worth a retry once the nodes are
        // back), not a client's cut-off body (400).
        assert!(
            body.contains("<Error><Code>ServiceUnavailable</Code>"),
            "{head}{body}"
        );
        assert_eq!(body.matches("<?xml").count(), 1, "{body}");
        assert!(
            body.trim_start().starts_with("<?xml"),
            "the declaration comes first: {body}"
        );
    }
    // Nothing was filed under the key.
    let listed = aws.json(&["s3api", "list-objects-v2", "--bucket", "late"])?;
    assert!(
        listed["Contents"].as_array().is_none_or(Vec::is_empty),
        "{listed}"
    );
    Ok(())
}

/// Content-Encoding, -Disposition, -Language, Cache-Control and Expires are
/// kept with the object and answered on GET and HEAD, carried by a copy
/// (replaced with `REPLACE`) and a multipart upload; a signed download may
/// override them with `response-*` parameters, as S3 allows.
#[test]
fn standard_headers_are_kept_and_a_download_may_override_them() -> Result<()> {
    if !custodia_tests::require(
        "standard_headers_are_kept_and_a_download_may_override_them",
        &[Tool::Aws, Tool::Boto3, Tool::Curl],
    )? {
        return Ok(());
    }
    let c = TestCluster::start(Shape::default())?;
    let aws = Aws::admin(&c);
    aws.ok(&["s3", "mb", "s3://headers"])?;
    let f = aws.file("f", &bytes(10_000, 3))?;
    let disposition = r#"attachment; filename="scene 4.mp4""#;
    aws.ok(&[
        "s3api",
        "put-object",
        "--bucket",
        "headers",
        "--key",
        "a.bin",
        "--body",
        &f,
        "--content-type",
        "video/mp4",
        "--content-disposition",
        disposition,
        "--content-encoding",
        "identity",
        "--content-language",
        "de-CH",
        "--cache-control",
        "max-age=60",
        "--expires",
        "2031-03-01T00:00:00Z",
    ])?;
    let expect = |head: &Value, disposition: &str, what: &str| {
        assert_eq!(head["ContentType"], "video/mp4", "{what}: {head}");
        assert_eq!(head["ContentDisposition"], disposition, "{what}: {head}");
        assert_eq!(head["ContentEncoding"], "identity", "{what}: {head}");
        assert_eq!(head["ContentLanguage"], "de-CH", "{what}: {head}");
        assert_eq!(head["CacheControl"], "max-age=60", "{what}: {head}");
        assert!(
            head["Expires"].as_str().is_some_and(|e| e.contains("2031")),
            "{what}: {head}"
        );
    };
    let head = aws.json(&[
        "s3api",
        "head-object",
        "--bucket",
        "headers",
        "--key",
        "a.bin",
    ])?;
    expect(&head, disposition, "put");
    let got = aws.json(&[
        "s3api",
        "get-object",
        "--bucket",
        "headers",
        "--key",
        "a.bin",
        "a.out",
    ])?;
    expect(&got, disposition, "get");

    // A copy keeps them; REPLACE takes the request's instead.
    aws.ok(&[
        "s3api",
        "copy-object",
        "--bucket",
        "headers",
        "--key",
        "copy.bin",
        "--copy-source",
        "headers/a.bin",
    ])?;
    let head = aws.json(&[
        "s3api",
        "head-object",
        "--bucket",
        "headers",
        "--key",
        "copy.bin",
    ])?;
    expect(&head, disposition, "copy");
    aws.ok(&[
        "s3api",
        "copy-object",
        "--bucket",
        "headers",
        "--key",
        "replaced.bin",
        "--copy-source",
        "headers/a.bin",
        "--metadata-directive",
        "REPLACE",
        "--content-type",
        "text/plain",
    ])?;
    let head = aws.json(&[
        "s3api",
        "head-object",
        "--bucket",
        "headers",
        "--key",
        "replaced.bin",
    ])?;
    assert_eq!(head["ContentType"], "text/plain", "{head}");
    assert!(
        head.get("ContentDisposition").is_none() && head.get("CacheControl").is_none(),
        "{head}"
    );

    // A multipart upload takes them at its creation.
    let up = aws.json(&[
        "s3api",
        "create-multipart-upload",
        "--bucket",
        "headers",
        "--key",
        "m.bin",
        "--content-type",
        "video/mp4",
        "--content-disposition",
        disposition,
        "--content-encoding",
        "identity",
        "--content-language",
        "de-CH",
        "--cache-control",
        "max-age=60",
        "--expires",
        "2031-03-01T00:00:00Z",
    ])?;
    let id = up["UploadId"].as_str().context("upload id")?.to_owned();
    let part = aws.json(&[
        "s3api",
        "upload-part",
        "--bucket",
        "headers",
        "--key",
        "m.bin",
        "--upload-id",
        &id,
        "--part-number",
        "1",
        "--body",
        &f,
    ])?;
    let parts = format!(
        r#"{{"Parts":[{{"PartNumber":1,"ETag":{}}}]}}"#,
        part["ETag"]
    );
    aws.ok(&[
        "s3api",
        "complete-multipart-upload",
        "--bucket",
        "headers",
        "--key",
        "m.bin",
        "--upload-id",
        &id,
        "--multipart-upload",
        &parts,
    ])?;
    let head = aws.json(&[
        "s3api",
        "head-object",
        "--bucket",
        "headers",
        "--key",
        "m.bin",
    ])?;
    expect(&head, disposition, "multipart");

    // A presigned download link names its own file name, for its answers
    // only (made by boto3, fetched by plain curl).
    let (mut python, name) = python_with_boto3(&c)?;
    let out = python
        .args([
            "-c",
            "import boto3, botocore.config, os\n\
             s3 = boto3.client('s3', endpoint_url=os.environ['S3_ENDPOINT'], region_name='us-east-1',\n\
                 config=botocore.config.Config(signature_version='s3v4'))\n\
             print(s3.generate_presigned_url('get_object', Params={'Bucket': 'headers', 'Key': 'a.bin',\n\
                 'ResponseContentDisposition': 'attachment; filename=exhibit-7.mp4',\n\
                 'ResponseCacheControl': 'no-store'}, ExpiresIn=300))\n",
        ])
        .output()
        .with_context(|| format!("running {name} (set CUSTODIA_PYTHON to one with boto3)"))?;
    let url = String::from_utf8(out.stdout)?.trim().to_owned();
    assert!(
        url.starts_with("http"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let body_file = c.data_dir().join("presigned-body");
    let out = Command::new("curl")
        .args(["-s", "-S", "--max-time", "30", "-D", "-", "-o"])
        .arg(&body_file)
        .arg(&url)
        .output()?;
    let head = String::from_utf8_lossy(&out.stdout).to_ascii_lowercase();
    let body = std::fs::read(&body_file)?;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(
        head.contains("content-disposition: attachment; filename=exhibit-7.mp4")
            && head.contains("cache-control: no-store")
            && head.contains("content-language: de-ch"),
        "{head}"
    );
    assert_eq!(body, bytes(10_000, 3));
    let head = aws.json(&[
        "s3api",
        "head-object",
        "--bucket",
        "headers",
        "--key",
        "a.bin",
    ])?;
    expect(&head, disposition, "after the download");
    // Asked for checksums (as the AWS SDKs ask, to validate what they
    // read), a whole object's GET and HEAD carry its SHA-256, multipart or
    // not, which boto3 checks the body against; a range carries none.
    let lines = boto3_lines(
        &c,
        "import boto3, os, base64, hashlib\n\
         s3 = boto3.client('s3', endpoint_url=os.environ['S3_ENDPOINT'], region_name='us-east-1')\n\
         for key in ['a.bin', 'm.bin']:\n\
         \x20   r = s3.get_object(Bucket='headers', Key=key, ChecksumMode='ENABLED')\n\
         \x20   body = r['Body'].read()\n\
         \x20   want = base64.b64encode(hashlib.sha256(body).digest()).decode()\n\
         \x20   h = s3.head_object(Bucket='headers', Key=key, ChecksumMode='ENABLED')\n\
         \x20   print(key, r.get('ChecksumSHA256') == want, r.get('ChecksumType'), h.get('ChecksumSHA256') == want)\n\
         r = s3.get_object(Bucket='headers', Key='a.bin', Range='bytes=0-9', ChecksumMode='ENABLED')\n\
         print('range', r.get('ChecksumSHA256'))\n",
    )?;
    assert_eq!(
        lines,
        [
            "a.bin True FULL_OBJECT True",
            "m.bin True FULL_OBJECT True",
            "range None"
        ],
    );
    Ok(())
}

/// A copy still running after `s3_keep_alive_after_ms` (here at once) is
/// answered 200 and kept alive, as S3 does: the copy's XML comes after, or
/// its error inside the 200, which the AWS CLI reads as the failure it is.
#[test]
fn long_copies_are_kept_alive_and_fail_inside_the_200() -> Result<()> {
    if !custodia_tests::require(
        "long_copies_are_kept_alive_and_fail_inside_the_200",
        &[Tool::Aws, Tool::Boto3, Tool::Curl],
    )? {
        return Ok(());
    }
    let mut c = TestCluster::start(Shape::default())?;
    c.set_gateway(&[("s3_keep_alive_after_ms", toml::Value::Integer(0))])?;
    let aws = Aws::admin(&c);
    aws.ok(&["s3", "mb", "s3://copies"])?;
    let data = bytes(3 << 20, 21);
    let src = aws.file("src", &data)?;
    aws.ok(&[
        "s3api",
        "put-object",
        "--bucket",
        "copies",
        "--key",
        "src.bin",
        "--body",
        &src,
    ])?;

    // By hand: 200, one declaration, then the result; no headers that were
    // not known when the answer began.
    let (head, body) = curl(
        &c,
        "PUT",
        &format!("{}/copies/by-hand.bin", c.s3),
        &["-H", "x-amz-copy-source: copies/src.bin"],
    )?;
    let body = String::from_utf8_lossy(&body);
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(
        !head.contains("x-custodia-evidence-id"),
        "the answer began before the copy was done: {head}"
    );
    assert_eq!(body.matches("<?xml").count(), 1, "{body}");
    assert!(
        body.starts_with("<?xml") && body.contains("<CopyObjectResult>"),
        "{body}"
    );
    assert!(
        body.contains(&md5_hex(&data)),
        "the copy's ETag is its MD5: {body}"
    );

    // The AWS CLI parses it as any other answer.
    aws.ok(&[
        "s3api",
        "copy-object",
        "--bucket",
        "copies",
        "--key",
        "cli.bin",
        "--copy-source",
        "copies/src.bin",
    ])?;
    aws.ok(&["s3", "cp", "s3://copies/cli.bin", "cli.out"])?;
    assert!(aws.read("cli.out")? == data, "the copy reads back");
    let up = aws.json(&[
        "s3api",
        "create-multipart-upload",
        "--bucket",
        "copies",
        "--key",
        "parts.bin",
    ])?;
    let id = up["UploadId"].as_str().context("upload id")?.to_owned();
    let part = aws.json(&[
        "s3api",
        "upload-part-copy",
        "--bucket",
        "copies",
        "--key",
        "parts.bin",
        "--upload-id",
        &id,
        "--part-number",
        "1",
        "--copy-source",
        "copies/src.bin",
    ])?;
    let etag = part["CopyPartResult"]["ETag"]
        .as_str()
        .context("part etag")?
        .to_owned();
    let parts = format!(r#"{{"Parts":[{{"PartNumber":1,"ETag":{etag:?}}}]}}"#);
    aws.ok(&[
        "s3api",
        "complete-multipart-upload",
        "--bucket",
        "copies",
        "--key",
        "parts.bin",
        "--upload-id",
        &id,
        "--multipart-upload",
        &parts,
    ])?;
    aws.ok(&["s3", "cp", "s3://copies/parts.bin", "parts.out"])?;
    assert!(aws.read("parts.out")? == data, "the part copy reads back");
    // Each copy read the source once, on its custody record: three.
    let h = curl_headers(&c, "HEAD", "/copies/src.bin")?;
    let src_id = header(&h, "x-custodia-evidence-id")
        .context("no evidence id")?
        .to_owned();
    let reads_of_src = || -> usize {
        c.get_with(&c.token, &format!("/v1/evidence/{src_id}/custody"), &[])
            .map(|a| {
                a.json()["events"]
                    .as_array()
                    .map_or(0, |e| e.iter().filter(|e| e["kind"] == "accessed").count())
            })
            .unwrap_or(0)
    };
    assert!(
        custodia_tests::eventually(15, || reads_of_src() == 3),
        "{} reads of the source on record",
        reads_of_src()
    );

    // A copy whose source cannot be read fails after its 200 began: the
    // error is the body, and the CLI reports it and exits non-zero.
    for f in c.all_shard_files() {
        std::fs::remove_file(f)?;
    }
    let (head, body) = curl(
        &c,
        "PUT",
        &format!("{}/copies/lost.bin", c.s3),
        &["-H", "x-amz-copy-source: copies/src.bin"],
    )?;
    let body = String::from_utf8_lossy(&body);
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(
        body.starts_with("<?xml") && body.contains("<Error><Code>ServiceUnavailable</Code>"),
        "{head}{body}"
    );
    assert_eq!(body.matches("<?xml").count(), 1, "{body}");
    // The AWS CLI (its botocore of 2022 takes the code from the parsed
    // success, so it says "Unknown") and current boto3 (the code) both fail.
    let out = aws.run(&[
        "s3api",
        "copy-object",
        "--bucket",
        "copies",
        "--key",
        "lost.bin",
        "--copy-source",
        "copies/src.bin",
    ])?;
    assert!(
        !out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let (mut python, name) = python_with_boto3(&c)?;
    let out = python
        .args([
            "-c",
            "import boto3, botocore.config, botocore.exceptions, os\n\
             s3 = boto3.client('s3', endpoint_url=os.environ['S3_ENDPOINT'], region_name='us-east-1',\n\
                 config=botocore.config.Config(retries={'max_attempts': 1}))\n\
             try:\n\
             \x20   s3.copy_object(Bucket='copies', Key='lost.bin', CopySource='copies/src.bin')\n\
             \x20   print('copied')\n\
             except botocore.exceptions.ClientError as e:\n\
             \x20   print('code', e.response['Error']['Code'])\n",
        ])
        .output()
        .with_context(|| format!("running {name} (set CUSTODIA_PYTHON to one with boto3)"))?;
    let said = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        said.trim(),
        "code ServiceUnavailable",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed = aws.json(&[
        "s3api",
        "list-objects-v2",
        "--bucket",
        "copies",
        "--prefix",
        "lost",
    ])?;
    assert!(
        listed["Contents"].as_array().is_none_or(Vec::is_empty),
        "nothing filed under the failed copy's key: {listed}"
    );
    // And no read of the source on record for copies that failed: the
    // record commits with the copy. (A record queued would be on the
    // ledger within a round: given a few.)
    std::thread::sleep(std::time::Duration::from_secs(2));
    assert_eq!(reads_of_src(), 3, "failed copies left no custody record");
    // Counted as what they were, not as the 200 that kept them alive.
    let failed = c.metric(
        &c.metrics,
        r#"custodia_http_requests_total{api="s3",route="PUT",status="503"}"#,
    )?;
    assert!(failed >= 1.0, "{failed} failed copies counted");
    Ok(())
}

/// An upload neither completed nor aborted goes after `multipart_expiry_ms`
/// (S3's AbortIncompleteMultipartUpload), and its parts' shards with it.
#[test]
fn incomplete_uploads_expire_and_their_parts_go() -> Result<()> {
    if !custodia_tests::require(
        "incomplete_uploads_expire_and_their_parts_go",
        &[Tool::Aws, Tool::Faketime],
    )? {
        return Ok(());
    }
    let mut c = TestCluster::start(Shape::default())?;
    let aws = Aws::admin(&c);
    aws.ok(&["s3", "mb", "s3://left"])?;
    let up = aws.json(&[
        "s3api",
        "create-multipart-upload",
        "--bucket",
        "left",
        "--key",
        "half.bin",
    ])?;
    let id = up["UploadId"].as_str().unwrap_or_default().to_owned();
    let part = aws.file("p1", &bytes(300_000, 5))?;
    let args = |n: &str| {
        argv(&format!(
            "s3api upload-part --bucket left --key half.bin --upload-id {id} \
             --part-number {n} --body {part}"
        ))
    };
    aws.ok(&strs(&args("1")))?;
    // Part 1 again: the part it replaces goes at once.
    aws.ok(&strs(&args("1")))?;
    let stored = c.all_shard_files().len();
    assert!(stored > 0, "the part is stored");
    let listed = |aws: &Aws| aws.json(&["s3api", "list-multipart-uploads", "--bucket", "left"]);
    assert!(listed(&aws)?["Uploads"]
        .as_array()
        .is_some_and(|u| u.len() == 1));
    // A gateway whose wall clock runs eight days ahead, past the default
    // seven-day expiry, ends nothing: expiry goes by the compliance clock,
    // which does not jump forward with it.
    c.set_gateway(&[("gc_interval_ms", toml::Value::Integer(300))])?;
    c.kill_gateway();
    let ahead = custodia_tests::faketime("+8d")?;
    c.start_gateway_under(&ahead.iter().map(String::as_str).collect::<Vec<_>>())?;
    c.wait_healthy(8)?;
    std::thread::sleep(std::time::Duration::from_secs(3));
    // (Asked with the clocks agreeing again: S3 signatures carry the time.)
    c.kill_gateway();
    c.start_gateway()?;
    c.wait_healthy(8)?;
    assert!(
        listed(&aws)?["Uploads"]
            .as_array()
            .is_some_and(|u| u.len() == 1),
        "a gateway eight days ahead ended the upload"
    );
    assert_eq!(c.all_shard_files().len(), stored, "its parts were deleted");
    // Only now an expiry short enough for a test (the gateway restarts):
    // set before, it could end the upload between the client's calls.
    c.set_gateway(&[
        ("multipart_expiry_ms", toml::Value::Integer(1_000)),
        ("gc_interval_ms", toml::Value::Integer(500)),
    ])?;
    let gone = custodia_tests::eventually(60, || {
        listed(&aws).is_ok_and(|l| l["Uploads"].as_array().is_none_or(Vec::is_empty))
            && c.all_shard_files().is_empty()
    });
    assert!(
        gone,
        "the upload and its {stored} shard files are still there: {} files",
        c.all_shard_files().len()
    );
    aws.fails(
        "NoSuchUpload",
        &strs(&argv(&format!(
            "s3api list-parts --bucket left --key half.bin --upload-id {id}"
        ))),
    )?;
    // Expiry counts from an upload's last sign of life, not from its
    // start: one whose parts keep coming (a large file over a slow link)
    // outlives the expiry more than twice over, while one begun beside it
    // and left idle goes; once its parts stop, it goes too.
    c.set_gateway(&[
        ("multipart_expiry_ms", toml::Value::Integer(6_000)),
        ("gc_interval_ms", toml::Value::Integer(500)),
    ])?;
    let create = |key: &str| -> Result<String> {
        let up = aws.json(&[
            "s3api",
            "create-multipart-upload",
            "--bucket",
            "left",
            "--key",
            key,
        ])?;
        Ok(up["UploadId"].as_str().unwrap_or_default().to_owned())
    };
    let busy = create("busy.bin")?;
    let idle = create("idle.bin")?;
    let keys = |aws: &Aws| -> Result<Vec<String>> {
        Ok(listed(aws)?["Uploads"]
            .as_array()
            .map(|u| {
                u.iter()
                    .filter_map(|u| u["Key"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default())
    };
    let began = std::time::Instant::now();
    let mut n = 0;
    while began.elapsed() < std::time::Duration::from_secs(15) {
        n += 1;
        aws.ok(&strs(&argv(&format!(
            "s3api upload-part --bucket left --key busy.bin --upload-id {busy} \
             --part-number {n} --body {part}"
        ))))?;
    }
    assert_eq!(
        keys(&aws)?,
        ["busy.bin"],
        "after {:?} only the idle upload {idle} went",
        began.elapsed()
    );
    assert!(
        custodia_tests::eventually(60, || keys(&aws).is_ok_and(|k| k.is_empty())),
        "the busy upload did not go once its parts stopped"
    );
    Ok(())
}

/// boto3 from PyPI with its default settings (CRC32 checksums on every
/// upload), through `tests/independent/s3_boto3.py`. CUSTODIA_PYTHON names
/// an interpreter with boto3 (.ci/run makes a venv); default `python3`.
/// Over HTTP botocore sends the checksum as a header.
#[test]
fn boto3_with_its_default_checksums() -> Result<()> {
    if !custodia_tests::require("boto3_with_its_default_checksums", &[Tool::Boto3])? {
        return Ok(());
    }
    boto3_checks(false)
}

/// The same over HTTPS (`--s3-tls`), where botocore streams every upload as
/// aws-chunked with the CRC32 in a trailer: the path that must be verified
/// after the last byte.
#[test]
fn boto3_over_https_sends_aws_chunked_trailers() -> Result<()> {
    if !custodia_tests::require(
        "boto3_over_https_sends_aws_chunked_trailers",
        &[Tool::Boto3],
    )? {
        return Ok(());
    }
    boto3_checks(true)
}

fn boto3_checks(tls: bool) -> Result<()> {
    let c = TestCluster::start(Shape {
        shard_size: 256 * 1024,
        s3_tls: tls,
        ..Shape::default()
    })?;
    let (mut python, name) = python_with_boto3(&c)?;
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("independent/s3_boto3.py");
    let out = python
        .arg(&script)
        .env("AWS_CA_BUNDLE", c.ca_cert())
        .env("EXPECT_TRAILER", if tls { "1" } else { "" })
        .output()
        .with_context(|| format!("running {name} (set CUSTODIA_PYTHON to one with boto3)"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    if !out.status.success() || !stdout.contains("checks passed") {
        bail!(
            "boto3 checks failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// The Python with boto3 (`CUSTODIA_PYTHON`, else `python3`), with the
/// cluster's S3 endpoint and admin keys in its environment and none of the
/// machine's AWS configuration; and its name, for messages.
fn python_with_boto3(c: &TestCluster) -> Result<(Command, String)> {
    let creds = std::fs::read_to_string(c.data_dir().join("s3.credentials"))?;
    let field = |name: &str| profile_field(&creds, name);
    let name = boto3_python();
    let mut python = Command::new(&name);
    python
        .env("S3_ENDPOINT", &c.s3)
        .env("AWS_ACCESS_KEY_ID", field("aws_access_key_id"))
        .env("AWS_SECRET_ACCESS_KEY", field("aws_secret_access_key"))
        .env("AWS_CONFIG_FILE", c.data_dir().join("no-aws-config"))
        .env(
            "AWS_SHARED_CREDENTIALS_FILE",
            c.data_dir().join("no-aws-credentials"),
        );
    Ok((python, name))
}

/// Runs a boto3 `script` against the cluster's S3 API; the lines it
/// printed, failing with its stderr.
fn boto3_lines(c: &TestCluster, script: &str) -> Result<Vec<String>> {
    let (mut python, name) = python_with_boto3(c)?;
    let out = python
        .args(["-c", script])
        .output()
        .with_context(|| format!("running {name} (set CUSTODIA_PYTHON to one with boto3)"))?;
    let said = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("{said}{}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(said.lines().map(str::to_owned).collect())
}

/// Runs a client command; returns stdout, failing with its stderr.
fn client(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// rclone and s3cmd (Debian's, installed by .ci/run): put (single, and
/// 100 MiB multipart in 7 parts), list, check, get, range, delete; and the
/// Object Lock flows they can drive (neither can set a lock: the bucket's
/// default COMPLIANCE retention binds what they write).
#[test]
fn rclone_and_s3cmd_put_get_list_and_delete() -> Result<()> {
    if !custodia_tests::require(
        "rclone_and_s3cmd_put_get_list_and_delete",
        &[Tool::Aws, Tool::Rclone, Tool::S3cmd],
    )? {
        return Ok(());
    }
    let c = TestCluster::start(Shape {
        shard_size: 256 * 1024,
        ..Shape::default()
    })?;
    let creds = std::fs::read_to_string(c.data_dir().join("s3.credentials"))?;
    let (key, secret) = (
        profile_field(&creds, "aws_access_key_id"),
        profile_field(&creds, "aws_secret_access_key"),
    );
    let hostport = c.s3.trim_start_matches("http://").to_owned();
    let src = c.data_dir().join("src");
    std::fs::create_dir_all(&src)?;
    std::fs::write(src.join("small.bin"), bytes(300_000, 1))?;
    std::fs::write(src.join("big.bin"), bytes(100 << 20, 2))?;
    std::fs::write(src.join("note.txt"), b"note\n")?;

    // rclone: `check` compares MD5s (ETags, and rclone's own metadata for
    // multipart objects).
    let conf = c.data_dir().join("rclone.conf");
    std::fs::write(
        &conf,
        format!(
            "[cu]\ntype = s3\nprovider = Other\naccess_key_id = {key}\nsecret_access_key = {secret}\nendpoint = {}\nregion = us-east-1\n",
            c.s3
        ),
    )?;
    let rclone = |args: &[&str]| -> Result<String> {
        client(
            Command::new("rclone")
                .arg("--config")
                .arg(&conf)
                .args(args)
                // A CA bundle in the environment makes rclone refuse plain HTTP.
                .env_remove("AWS_CA_BUNDLE"),
        )
    };
    rclone(&["mkdir", "cu:rclone"])?;
    // Multipart past 10 MiB, in 16 MiB parts (rclone's defaults would put
    // anything under 200 MiB in one request).
    rclone(&[
        "copy",
        "--s3-upload-cutoff",
        "10M",
        "--s3-chunk-size",
        "16M",
        src.to_str().unwrap_or_default(),
        "cu:rclone/dir",
    ])?;
    let listed = rclone(&["ls", "cu:rclone"])?;
    assert!(
        listed.contains("104857600 dir/big.bin") && listed.contains("300000 dir/small.bin"),
        "{listed}"
    );
    let admin = Aws::admin(&c);
    let head = admin.json(&[
        "s3api",
        "head-object",
        "--bucket",
        "rclone",
        "--key",
        "dir/big.bin",
    ])?;
    assert!(
        head["ETag"].as_str().unwrap_or_default().ends_with("-7\""),
        "{head}"
    );
    rclone(&["check", src.to_str().unwrap_or_default(), "cu:rclone/dir"])?;
    let out = c.data_dir().join("rclone-out");
    rclone(&["copy", "cu:rclone/dir", out.to_str().unwrap_or_default()])?;
    assert!(std::fs::read(out.join("big.bin"))? == bytes(100 << 20, 2));
    let part = rclone(&[
        "cat",
        "cu:rclone/dir/note.txt",
        "--offset",
        "1",
        "--count",
        "3",
    ])?;
    assert_eq!(part, "ote");
    rclone(&["delete", "cu:rclone/dir/note.txt"])?;
    assert!(!rclone(&["ls", "cu:rclone"])?.contains("note.txt"));

    // Object Lock through rclone: overwrite and delete only add versions and
    // a marker; every version still reads back; removing one is refused.
    admin.ok(&[
        "s3api",
        "create-bucket",
        "--bucket",
        "held",
        "--object-lock-enabled-for-bucket",
    ])?;
    admin.ok(&[
        "s3api",
        "put-object-lock-configuration",
        "--bucket",
        "held",
        "--object-lock-configuration",
        "ObjectLockEnabled=Enabled,Rule={DefaultRetention={Mode=COMPLIANCE,Days=1}}",
    ])?;
    let versions = [&b"first version\n"[..], &b"the second version\n"[..]];
    for (i, v) in versions.iter().enumerate() {
        let f = src.join(format!("v{i}.txt"));
        std::fs::write(&f, v)?;
        rclone(&[
            "copyto",
            f.to_str().unwrap_or_default(),
            "cu:held/exhibit.txt",
        ])?;
    }
    rclone(&["deletefile", "cu:held/exhibit.txt"])?;
    assert!(
        !rclone(&["ls", "cu:held"])?.contains("exhibit"),
        "hidden by a delete marker"
    );
    // A copy naming the marker by its version: S3's 400 InvalidRequest.
    let listed = admin.json(&["s3api", "list-object-versions", "--bucket", "held"])?;
    let marker = listed["DeleteMarkers"][0]["VersionId"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(!marker.is_empty(), "{listed}");
    admin.fails(
        "InvalidRequest",
        &strs(&argv(&format!(
            "s3api copy-object --bucket held --key copied.txt \
             --copy-source held/exhibit.txt?versionId={marker}"
        ))),
    )?;
    // `--s3-versions` lists versions with a delimiter, as S3 allows.
    let listed = rclone(&["ls", "--s3-versions", "cu:held"])?;
    let old: Vec<String> = listed
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter(|n| n.starts_with("exhibit-v"))
        .map(str::to_owned)
        .collect();
    assert_eq!(old.len(), 2, "both versions listed: {listed}");
    let mut read = Vec::new();
    for name in &old {
        read.push(rclone(&[
            "cat",
            "--s3-versions",
            &format!("cu:held/{name}"),
        ])?);
        let out = Command::new("rclone")
            .arg("--config")
            .arg(&conf)
            .args(["deletefile", "--s3-versions", &format!("cu:held/{name}")])
            .env_remove("AWS_CA_BUNDLE")
            .output()?;
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("AccessDenied"),
            "{err}"
        );
    }
    read.sort();
    assert_eq!(
        read,
        ["first version\n", "the second version\n"],
        "every version intact"
    );

    // s3cmd, multipart in 5 MiB parts.
    let cfg = c.data_dir().join("s3cfg");
    std::fs::write(
        &cfg,
        format!(
            "[default]\naccess_key = {key}\nsecret_key = {secret}\nhost_base = {hostport}\nhost_bucket = {hostport}\nbucket_location = us-east-1\nuse_https = False\nsignature_v2 = False\n"
        ),
    )?;
    let s3cmd = |args: &[&str]| -> Result<String> {
        client(Command::new("s3cmd").arg("-c").arg(&cfg).args(args))
    };
    let path = |name: &str| src.join(name).to_string_lossy().into_owned();
    s3cmd(&["mb", "s3://s3cmd"])?;
    s3cmd(&["put", &path("small.bin"), "s3://s3cmd/x/small.bin"])?;
    s3cmd(&[
        "put",
        "--multipart-chunk-size-mb=16",
        &path("big.bin"),
        "s3://s3cmd/x/big.bin",
    ])?;
    let head = admin.json(&[
        "s3api",
        "head-object",
        "--bucket",
        "s3cmd",
        "--key",
        "x/big.bin",
    ])?;
    assert!(
        head["ETag"].as_str().unwrap_or_default().ends_with("-7\""),
        "{head}"
    );
    let listed = s3cmd(&["ls", "-r", "s3://s3cmd"])?;
    assert!(
        listed.contains("s3://s3cmd/x/big.bin") && listed.contains("s3://s3cmd/x/small.bin"),
        "{listed}"
    );
    let got = c.data_dir().join("s3cmd-big.bin");
    s3cmd(&[
        "get",
        "--force",
        "s3://s3cmd/x/big.bin",
        &got.to_string_lossy(),
    ])?;
    assert!(std::fs::read(&got)? == bytes(100 << 20, 2));
    s3cmd(&["del", "s3://s3cmd/x/small.bin"])?;
    assert!(!s3cmd(&["ls", "-r", "s3://s3cmd"])?.contains("small.bin"));

    // Object Lock through s3cmd: its delete hides the locked object behind a
    // marker; the version stays, and nobody may remove it.
    s3cmd(&["put", &path("note.txt"), "s3://held/s3cmd/note.txt"])?;
    s3cmd(&["del", "s3://held/s3cmd/note.txt"])?;
    assert!(!s3cmd(&["ls", "-r", "s3://held/s3cmd/"])?.contains("note.txt"));
    let listed = admin.json(&[
        "s3api",
        "list-object-versions",
        "--bucket",
        "held",
        "--prefix",
        "s3cmd/",
    ])?;
    let version = listed["Versions"][0]["VersionId"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert_eq!(listed["DeleteMarkers"][0]["IsLatest"], true, "{listed}");
    admin.ok(&[
        "s3api",
        "get-object",
        "--bucket",
        "held",
        "--key",
        "s3cmd/note.txt",
        "--version-id",
        &version,
        "note-back.txt",
    ])?;
    assert_eq!(admin.read("note-back.txt")?, b"note\n");
    admin.fails(
        "AccessDenied",
        &[
            "s3api",
            "delete-object",
            "--bucket",
            "held",
            "--key",
            "s3cmd/note.txt",
            "--version-id",
            &version,
        ],
    )?;
    Ok(())
}

/// The Rust `object_store` crate's S3 client (with SHA-256 checksums on
/// every upload): put (plain, create-only, update-if-match), get, range,
/// head, list (with and without delimiter), 100 MiB multipart in 7 parts,
/// copy, delete; and on an Object Lock bucket with default COMPLIANCE
/// retention, its delete only hides the object: the locked version stays.
#[test]
fn rust_object_store_client() -> Result<()> {
    if !custodia_tests::require("rust_object_store_client", &[Tool::Aws])? {
        return Ok(());
    }
    use futures::TryStreamExt as _;
    use object_store::aws::{AmazonS3Builder, Checksum};
    use object_store::path::Path as OsPath;
    use object_store::{
        ObjectStore, PutMode, PutOptions, PutPayload, UpdateVersion, WriteMultipart,
    };

    // quinn's ring and object_store's aws-lc-rs are both linked: choose.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let c = TestCluster::start(Shape {
        shard_size: 256 * 1024,
        ..Shape::default()
    })?;
    let admin = Aws::admin(&c);
    admin.ok(&["s3api", "create-bucket", "--bucket", "rust"])?;
    admin.ok(&[
        "s3api",
        "create-bucket",
        "--bucket",
        "rust-locked",
        "--object-lock-enabled-for-bucket",
    ])?;
    admin.ok(&[
        "s3api",
        "put-object-lock-configuration",
        "--bucket",
        "rust-locked",
        "--object-lock-configuration",
        "ObjectLockEnabled=Enabled,Rule={DefaultRetention={Mode=COMPLIANCE,Days=1}}",
    ])?;
    let creds = std::fs::read_to_string(c.data_dir().join("s3.credentials"))?;
    let store = |bucket: &str| {
        AmazonS3Builder::new()
            .with_endpoint(&c.s3)
            .with_allow_http(true)
            .with_region("us-east-1")
            .with_bucket_name(bucket)
            .with_access_key_id(profile_field(&creds, "aws_access_key_id"))
            .with_secret_access_key(profile_field(&creds, "aws_secret_access_key"))
            .with_checksum_algorithm(Checksum::SHA256)
            .build()
    };
    let (s, locked) = (store("rust")?, store("rust-locked")?);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let locked_version = rt.block_on(async {
        let small = bytes(70_000, 11);
        let p = OsPath::from("docs/a.bin");
        s.put(&p, PutPayload::from(small.clone())).await?;
        let got = s.get(&p).await?.bytes().await?;
        assert_eq!(&got[..], &small[..], "get returns the bytes put");
        let r = s.get_range(&p, 1000..1500).await?;
        assert_eq!(&r[..], &small[1000..1500], "ranged get");
        let meta = s.head(&p).await?;
        assert_eq!(meta.size, small.len() as u64);
        assert_eq!(
            meta.e_tag.as_deref().map(|e| e.trim_matches('"')),
            Some(md5_hex(&small).as_str()),
            "a single-part ETag is the MD5 of the body"
        );

        // Create-only (If-None-Match: *) and update-if-match (If-Match).
        let create = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        let q = OsPath::from("docs/b.bin");
        s.put_opts(&q, PutPayload::from_static(b"first"), create.clone())
            .await?;
        let again = s
            .put_opts(&q, PutPayload::from_static(b"second"), create)
            .await;
        assert!(
            matches!(again, Err(object_store::Error::AlreadyExists { .. })),
            "a create-only put over an existing key is refused: {again:?}"
        );
        let etag = s.head(&q).await?.e_tag;
        let update = |e_tag: Option<String>| PutOptions {
            mode: PutMode::Update(UpdateVersion {
                e_tag,
                version: None,
            }),
            ..Default::default()
        };
        s.put_opts(&q, PutPayload::from_static(b"second"), update(etag.clone()))
            .await?;
        let stale = s
            .put_opts(&q, PutPayload::from_static(b"third"), update(etag))
            .await;
        assert!(
            matches!(stale, Err(object_store::Error::Precondition { .. })),
            "an update with a stale ETag is refused: {stale:?}"
        );
        assert_eq!(&s.get(&q).await?.bytes().await?[..], b"second");

        // Conditional writes racing on one key: checked again when each
        // upload commits, so exactly one of eight create-only PUTs, and one
        // of eight updates of the same ETag, wins (the others all passed the
        // check made when their upload began).
        let racers = |n: u8| bytes(3 << 20, 40 + u64::from(n));
        let r = OsPath::from("docs/race.bin");
        let puts = (0..8u8).map(|n| {
            let (s, r, opts) = (
                &s,
                &r,
                PutOptions {
                    mode: PutMode::Create,
                    ..Default::default()
                },
            );
            async move { s.put_opts(r, PutPayload::from(racers(n)), opts).await }
        });
        let outcomes = futures::future::join_all(puts).await;
        let won: Vec<usize> = (0..8).filter(|n| outcomes[*n].is_ok()).collect();
        assert_eq!(won.len(), 1, "one create-only PUT wins: {outcomes:?}");
        for o in &outcomes {
            assert!(
                o.is_ok() || matches!(o, Err(object_store::Error::AlreadyExists { .. })),
                "the others are refused as existing: {o:?}"
            );
        }
        let got = s.get(&r).await?.bytes().await?;
        assert!(got == racers(won[0] as u8)[..], "the winner's bytes");
        let etag = s.head(&r).await?.e_tag;
        let puts = (0..8u8).map(|n| {
            let (s, r, opts) = (&s, &r, update(etag.clone()));
            async move { s.put_opts(r, PutPayload::from(racers(10 + n)), opts).await }
        });
        let outcomes = futures::future::join_all(puts).await;
        let won: Vec<usize> = (0..8).filter(|n| outcomes[*n].is_ok()).collect();
        assert_eq!(won.len(), 1, "one update of the ETag wins: {outcomes:?}");
        for o in &outcomes {
            assert!(
                o.is_ok() || matches!(o, Err(object_store::Error::Precondition { .. })),
                "the others fail their precondition: {o:?}"
            );
        }
        let got = s.get(&r).await?.bytes().await?;
        assert!(got == racers(10 + won[0] as u8)[..], "the winner's bytes");
        s.delete(&r).await?;

        // 100 MiB in 16 MiB parts: 7 parts.
        let big = bytes(100 << 20, 12);
        let bp = OsPath::from("video/big.bin");
        let mut w = WriteMultipart::new_with_chunk_size(s.put_multipart(&bp).await?, 16 << 20);
        for chunk in big.chunks(5 << 20) {
            w.write(chunk);
        }
        w.finish().await?;
        let got = s.get(&bp).await?.bytes().await?;
        assert!(
            got == big[..],
            "the 100 MiB multipart object reads back exact"
        );
        let meta = s.head(&bp).await?;
        assert!(
            meta.e_tag
                .as_deref()
                .is_some_and(|e| e.ends_with("-7\"") || e.ends_with("-7")),
            "a multipart ETag names its 7 parts: {:?}",
            meta.e_tag
        );
        let tail = s.get_range(&bp, (100 << 20) - 10..100 << 20).await?;
        assert_eq!(&tail[..], &big[big.len() - 10..]);

        s.copy(&p, &OsPath::from("docs/copy.bin")).await?;
        assert_eq!(
            &s.get(&OsPath::from("docs/copy.bin")).await?.bytes().await?[..],
            &small[..]
        );

        let all: Vec<_> = s.list(None).try_collect().await?;
        let mut names: Vec<String> = all.iter().map(|m| m.location.to_string()).collect();
        names.sort();
        assert_eq!(
            names,
            ["docs/a.bin", "docs/b.bin", "docs/copy.bin", "video/big.bin"]
        );
        let top = s.list_with_delimiter(None).await?;
        let mut prefixes: Vec<String> = top.common_prefixes.iter().map(|p| p.to_string()).collect();
        prefixes.sort();
        assert_eq!(prefixes, ["docs", "video"]);
        let docs = s.list_with_delimiter(Some(&OsPath::from("docs"))).await?;
        assert_eq!(docs.objects.len(), 3);

        for name in ["docs/a.bin", "docs/b.bin", "docs/copy.bin", "video/big.bin"] {
            s.delete(&OsPath::from(name)).await?;
        }
        let gone = s.get(&p).await;
        assert!(matches!(gone, Err(object_store::Error::NotFound { .. })));
        assert!(s.list(None).try_collect::<Vec<_>>().await?.is_empty());

        // Default COMPLIANCE retention: object_store's delete (no version
        // id) adds a delete marker; the locked version is still there.
        let lp = OsPath::from("held.bin");
        locked.put(&lp, PutPayload::from(small.clone())).await?;
        locked.delete(&lp).await?;
        let hidden = locked.get(&lp).await;
        assert!(matches!(hidden, Err(object_store::Error::NotFound { .. })));
        anyhow::Ok(small)
    })?;
    let versions = admin.json(&["s3api", "list-object-versions", "--bucket", "rust-locked"])?;
    let vid = versions["Versions"][0]["VersionId"]
        .as_str()
        .context("the locked version is listed")?
        .to_owned();
    let ret = admin.json(&[
        "s3api",
        "get-object-retention",
        "--bucket",
        "rust-locked",
        "--key",
        "held.bin",
        "--version-id",
        &vid,
    ])?;
    assert_eq!(
        ret["Retention"]["Mode"], "COMPLIANCE",
        "default retention applied"
    );
    admin.fails(
        "AccessDenied",
        &[
            "s3api",
            "delete-object",
            "--bucket",
            "rust-locked",
            "--key",
            "held.bin",
            "--version-id",
            &vid,
        ],
    )?;
    admin.ok(&[
        "s3api",
        "get-object",
        "--bucket",
        "rust-locked",
        "--key",
        "held.bin",
        "--version-id",
        &vid,
        "held.out",
    ])?;
    assert_eq!(admin.read("held.out")?, locked_version);
    Ok(())
}

/// CompleteMultipartUpload checks what the client says of the whole
/// object: a full-object CRC (computed over the assembled bytes), a
/// composite SHA-256 (over the parts' SHA-256s) and the object's size. A
/// mismatch files nothing, and the upload stays for a Complete that gets
/// them right; boto3's own multipart upload (with whatever checksums it
/// sends by default) completes and reads back.
#[test]
fn completing_an_upload_checks_the_whole_objects_checksums_and_size() -> Result<()> {
    if !custodia_tests::require(
        "completing_an_upload_checks_the_whole_objects_checksums_and_size",
        &[Tool::Boto3],
    )? {
        return Ok(());
    }
    let c = TestCluster::start(Shape::default())?;
    let script = r#"
import base64, boto3, botocore.config, botocore.exceptions, hashlib, io, os, zlib
from boto3.s3.transfer import TransferConfig
s3 = boto3.client('s3', endpoint_url=os.environ['S3_ENDPOINT'], region_name='us-east-1',
    config=botocore.config.Config(retries={'max_attempts': 1}))
s3.create_bucket(Bucket='whole')
parts = [bytes((i * 7 + j) % 251 for i in range(5 * 1024 * 1024)) for j in range(1)] + [b'tail' * 300]
data = b''.join(parts)
b64 = lambda b: base64.b64encode(b).decode()
crc32 = lambda b: b64(zlib.crc32(b).to_bytes(4, 'big'))
def upload(algorithm, **create):
    up = s3.create_multipart_upload(Bucket='whole', Key='o', ChecksumAlgorithm=algorithm, **create)['UploadId']
    listed = []
    for n, p in enumerate(parts, 1):
        r = s3.upload_part(Bucket='whole', Key='o', UploadId=up, PartNumber=n, Body=p, ChecksumAlgorithm=algorithm)
        entry = {'PartNumber': n, 'ETag': r['ETag']}
        for k in ('ChecksumCRC32', 'ChecksumSHA256'):
            if k in r:
                entry[k] = r[k]
        listed.append(entry)
    return up, listed
def complete(up, listed, **extra):
    try:
        s3.complete_multipart_upload(Bucket='whole', Key='o', UploadId=up,
            MultipartUpload={'Parts': listed}, **extra)
        return 'ok'
    except botocore.exceptions.ClientError as e:
        return e.response['Error']['Code']
def read():
    return s3.get_object(Bucket='whole', Key='o')['Body'].read() == data
# A composite CRC without its part count, as minio-go sends one: taken.
up, listed = upload('CRC32')
print('crc64nvme with a part count', complete(up, listed, ChecksumCRC64NVME='AAAAAAAAAAA=-2'))
composite_crc = crc32(b''.join(zlib.crc32(p).to_bytes(4, 'big') for p in parts))
print('composite crc, no count', complete(up, listed, ChecksumCRC32=composite_crc), read())
up, listed = upload('CRC32', ChecksumType='FULL_OBJECT')
print('crc wrong', complete(up, listed, ChecksumCRC32=crc32(b'other'), ChecksumType='FULL_OBJECT'))
print('size wrong', complete(up, listed, ChecksumCRC32=crc32(data), ChecksumType='FULL_OBJECT', MpuObjectSize=len(data) + 1))
print('crc right', complete(up, listed, ChecksumCRC32=crc32(data), ChecksumType='FULL_OBJECT', MpuObjectSize=len(data)), read())
up, listed = upload('SHA256')
composite = b64(hashlib.sha256(b''.join(hashlib.sha256(p).digest() for p in parts)).digest())
print('composite wrong', complete(up, listed, ChecksumSHA256=b64(hashlib.sha256(b'x').digest()) + '-2'))
print('count wrong', complete(up, listed, ChecksumSHA256=composite + '-3'))
print('composite right', complete(up, listed, ChecksumSHA256=composite + '-2'), read())
s3.upload_fileobj(io.BytesIO(data), 'whole', 'o', Config=TransferConfig(multipart_threshold=5 * 1024 * 1024, multipart_chunksize=5 * 1024 * 1024))
print('boto3 multipart', read())
"#;
    let said = boto3_lines(&c, script)?;
    assert_eq!(
        said,
        [
            "crc64nvme with a part count InvalidRequest",
            "composite crc, no count ok True",
            "crc wrong BadDigest",
            "size wrong InvalidRequest",
            "crc right ok True",
            "composite wrong BadDigest",
            "count wrong InvalidRequest",
            "composite right ok True",
            "boto3 multipart True",
        ],
        "{said:?}"
    );
    Ok(())
}

/// ListBuckets takes a prefix and pages by max-buckets with a continuation
/// token (boto3 sends them; the listing ignored them, all buckets each time).
#[test]
fn bucket_listings_filter_by_prefix_and_page() -> Result<()> {
    if !custodia_tests::require("bucket_listings_filter_by_prefix_and_page", &[Tool::Boto3])? {
        return Ok(());
    }
    let c = TestCluster::start(Shape::default())?;
    let script = r#"
import boto3, botocore.exceptions, os
s3 = boto3.client('s3', endpoint_url=os.environ['S3_ENDPOINT'], region_name='us-east-1')
for b in ('court-3', 'court-1', 'other', 'court-2'):
    s3.create_bucket(Bucket=b)
page = s3.list_buckets(Prefix='court-', MaxBuckets=2)
print([b['Name'] for b in page['Buckets']], 'ContinuationToken' in page)
page = s3.list_buckets(Prefix='court-', MaxBuckets=2, ContinuationToken=page['ContinuationToken'])
print([b['Name'] for b in page['Buckets']], 'ContinuationToken' in page)
print([b['Name'] for b in s3.list_buckets()['Buckets']])
try:
    s3.list_buckets(MaxBuckets=10001)
except botocore.exceptions.ClientError as e:
    print(e.response['Error']['Code'])
"#;
    let said = boto3_lines(&c, script)?;
    assert_eq!(
        said,
        [
            "['court-1', 'court-2'] True",
            "['court-3'] False",
            "['court-1', 'court-2', 'court-3', 'other']",
            "InvalidArgument",
        ],
        "{said:?}"
    );
    Ok(())
}

/// A part that streams in for longer than `multipart_expiry_ms` (a slow
/// field link) keeps its upload alive while it comes: each renewal of its
/// lease is a sign of the upload's life, so the collector does not expire
/// the upload under it (and delete its other parts).
#[test]
fn a_part_streaming_past_the_expiry_keeps_its_upload_alive() -> Result<()> {
    if !custodia_tests::require(
        "a_part_streaming_past_the_expiry_keeps_its_upload_alive",
        &[Tool::Curl],
    )? {
        return Ok(());
    }
    let mut c = TestCluster::start(Shape::default())?;
    c.set_gateway(&[
        ("multipart_expiry_ms", toml::Value::Integer(2_000)),
        ("gc_interval_ms", toml::Value::Integer(300)),
        ("intent_lease_ms", toml::Value::Integer(1_500)),
    ])?;
    let (h, _) = curl(&c, "PUT", &format!("{}/slow", c.s3), &[])?;
    assert!(h.starts_with("http/1.1 200"), "{h}");
    let upload = c.s3_create_upload("slow", "field.bin")?;
    let data = bytes(300_000, 91);
    let part = c.data_dir().join("slow-part.bin");
    std::fs::write(&part, &data)?;
    // About 6 s at 50 KB/s: three times the expiry.
    let started = std::time::Instant::now();
    let (h, body) = curl(
        &c,
        "PUT",
        &format!("{}/slow/field.bin?partNumber=1&uploadId={upload}", c.s3),
        &[
            "--limit-rate",
            "50k",
            "--data-binary",
            &format!("@{}", part.display()),
        ],
    )?;
    assert!(
        started.elapsed() > std::time::Duration::from_secs(4),
        "the part came too fast to test anything: {:?}",
        started.elapsed()
    );
    assert!(
        h.starts_with("http/1.1 200"),
        "{h}{}",
        String::from_utf8_lossy(&body)
    );
    let etag = custodia_tests::header(&h, "etag")
        .context("no part etag")?
        .to_owned();
    let (h, body) = c.s3_complete("slow", "field.bin", &upload, &[(1, &etag)])?;
    assert!(h.starts_with("http/1.1 200"), "{h}{body}");
    let (_, got) = curl(&c, "GET", &format!("{}/slow/field.bin", c.s3), &[])?;
    assert!(got == data, "the object did not read back byte-exact");
    Ok(())
}
