"""Drives Custodia's S3 API with boto3 as agencies' scripts would: default
settings, so current boto3 sends CRC32 checksums as aws-chunked trailers.

Environment: S3_ENDPOINT, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY; for an
https endpoint AWS_CA_BUNDLE, and EXPECT_TRAILER=1 to require that botocore
sent its checksums as aws-chunked trailers.
Exits non-zero (with a traceback) on the first failed check.
"""

import hashlib
import io
import os
import ssl
import sys
import urllib.request

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.exceptions import ClientError

checks = 0


def check(cond, what):
    global checks
    if not cond:
        raise AssertionError(what)
    checks += 1


def error_code(fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except ClientError as e:
        return e.response["Error"]["Code"]
    return None


def data(n, seed):
    out = bytearray()
    block = hashlib.sha256(str(seed).encode()).digest()
    while len(out) < n:
        out += block
        block = hashlib.sha256(block).digest()
    return bytes(out[:n])


s3 = boto3.client("s3", endpoint_url=os.environ["S3_ENDPOINT"], region_name="us-east-1")

# Record what boto3 sends, to know the trailer path is exercised.
sent = []
def text(v):
    return v.decode() if isinstance(v, bytes) else v


s3.meta.events.register(
    "before-send.s3.PutObject",
    lambda request, **kw: sent.append({k.lower(): text(v) for k, v in request.headers.items()}),
)

s3.create_bucket(Bucket="boto")
body = data(3 << 20, 1)
put = s3.put_object(Bucket="boto", Key="a/one.bin", Body=body)
check(put["ETag"] == '"%s"' % hashlib.md5(body).hexdigest(), "single-part ETag is the MD5")
# botocore sends its default CRC32 as an aws-chunked trailer over HTTPS and
# as a header over HTTP; either way it must be there and verified.
crc = [h.get("x-amz-checksum-crc32") or h.get("x-amz-trailer") for h in sent]
check(all(crc), "boto3 sent a CRC32 with each PutObject")
via = "trailer" if any(h.get("x-amz-trailer") for h in sent) else "header"
if os.environ.get("EXPECT_TRAILER"):
    check(via == "trailer", "boto3 sent aws-chunked trailers over HTTPS")
    check(all("aws-chunked" in h.get("content-encoding", "") for h in sent), "aws-chunked encoding")
got = s3.get_object(Bucket="boto", Key="a/one.bin")["Body"].read()
check(got == body, "read back byte-exact")
part = s3.get_object(Bucket="boto", Key="a/one.bin", Range="bytes=1000-1999")["Body"].read()
check(part == body[1000:2000], "range")
head = s3.head_object(Bucket="boto", Key="a/one.bin")
check(head["ContentLength"] == len(body), "head size")

# A wrong checksum is refused and leaves nothing.
code = error_code(s3.put_object, Bucket="boto", Key="bad.bin", Body=b"x" * 1000, ChecksumCRC32="AAAAAA==")
check(code in ("BadDigest", "InvalidRequest", "XAmzContentChecksumMismatch"), "wrong CRC32 refused: %s" % code)
check(error_code(s3.head_object, Bucket="boto", Key="bad.bin") == "404", "nothing stored")

# A signed body damaged on the way (no checksum beside the signed SHA-256,
# as botocore sends when told to add checksums only where required): S3's
# XAmzContentSHA256Mismatch, 400, nothing stored. Over HTTPS botocore signs
# no payload hash (TLS protects it), so only over HTTP.
if os.environ["S3_ENDPOINT"].startswith("http:"):
    from botocore.config import Config

    bare = boto3.client(
        "s3", endpoint_url=os.environ["S3_ENDPOINT"], region_name="us-east-1",
        config=Config(request_checksum_calculation="when_required", retries={"max_attempts": 1}),
    )

    def flip(request, **kw):
        raw = request.body.read() if hasattr(request.body, "read") else request.body
        request.body = b"Y" + raw[1:]

    bare.meta.events.register("before-send.s3.PutObject", flip)
    code = error_code(bare.put_object, Bucket="boto", Key="flipped.bin", Body=b"X" * 5000)
    check(code == "XAmzContentSHA256Mismatch", "a damaged signed body is refused: %r" % code)
    check(error_code(s3.head_object, Bucket="boto", Key="flipped.bin") == "404", "nothing stored")

# Multipart with the transfer manager: 100 MiB in 16 MiB parts (7).
big = data(100 << 20, 2)
s3.upload_fileobj(
    io.BytesIO(big), "boto", "a/big.bin",
    Config=TransferConfig(multipart_threshold=8 << 20, multipart_chunksize=16 << 20),
)
out = io.BytesIO()
s3.download_fileobj("boto", "a/big.bin", out)
check(out.getvalue() == big, "multipart read back byte-exact")
check(s3.head_object(Bucket="boto", Key="a/big.bin")["ETag"].endswith('-7"'), "multipart ETag")

# Listing with a paginator.
for i in range(7):
    s3.put_object(Bucket="boto", Key="many/%02d" % i, Body=b"%d" % i)
pages = s3.get_paginator("list_objects_v2").paginate(Bucket="boto", Prefix="many/", PaginationConfig={"PageSize": 3})
keys = [o["Key"] for p in pages for o in p.get("Contents", [])]
check(keys == ["many/%02d" % i for i in range(7)], "paginated listing: %r" % keys)

# Presigned GET.
url = s3.generate_presigned_url("get_object", Params={"Bucket": "boto", "Key": "many/03"}, ExpiresIn=300)
tls = ssl.create_default_context(cafile=os.environ["AWS_CA_BUNDLE"]) if url.startswith("https:") else None
check(urllib.request.urlopen(url, context=tls).read() == b"3", "presigned URL")

# A browser form upload (presigned POST): its checksum fields are checked as
# headers are; a wrong one is refused and stores nothing.
import base64, binascii, urllib3

def form_post(key, body, fields):
    post = s3.generate_presigned_post(
        "boto", key, Fields=dict(fields), Conditions=[{k: v} for k, v in fields.items()], ExpiresIn=300
    )
    form = dict(post["fields"])
    form["file"] = ("f.bin", body)
    encoded, ctype = urllib3.encode_multipart_formdata(form)
    req = urllib.request.Request(post["url"], data=encoded, headers={"Content-Type": ctype}, method="POST")
    try:
        return urllib.request.urlopen(req, context=tls).status, b""
    except urllib.error.HTTPError as e:
        return e.code, e.read()

form_body = b"filed through a form" * 100
good_crc = base64.b64encode((binascii.crc32(form_body) & 0xFFFFFFFF).to_bytes(4, "big")).decode()
status, _ = form_post("form/good", form_body, {"x-amz-checksum-crc32": good_crc})
check(status in (200, 204), "a form upload with a right CRC32 is stored: %r" % status)
check(s3.get_object(Bucket="boto", Key="form/good")["Body"].read() == form_body, "form upload read back")
status, err = form_post("form/bad", form_body, {"x-amz-checksum-crc32": "AAAAAA=="})
check(status == 400 and b"BadDigest" in err, "a form upload with a wrong CRC32 is refused: %r %r" % (status, err))
check(error_code(s3.head_object, Bucket="boto", Key="form/bad") == "404", "nothing stored from it")
# A form field may hold bytes no header can carry: such a Content-Type is
# refused (it would make the object unreadable), and so is a download
# link asking for one (by s3s, before the read is recorded).
status, err = form_post("form/ctl", form_body, {"Content-Type": "text/plain\x01"})
check(status == 400 and b"InvalidArgument" in err, "a Content-Type no header can carry is refused: %r %r" % (status, err))
check(error_code(s3.head_object, Bucket="boto", Key="form/ctl") == "404", "nothing stored from it")
url = s3.generate_presigned_url(
    "get_object", Params={"Bucket": "boto", "Key": "form/good", "ResponseContentType": "a\x01b"}, ExpiresIn=300
)
try:
    urllib.request.urlopen(url, context=tls)
    check(False, "a download link asking for a header no header can carry was served")
except urllib.error.HTTPError as e:
    refused = e.read()
    check(e.code == 400 and b"InvalidRequest" in refused, "such a download link is refused: %r %r" % (e.code, refused))

# Multi-object delete.
res = s3.delete_objects(Bucket="boto", Delete={"Objects": [{"Key": "many/%02d" % i} for i in range(7)]})
check(len(res.get("Deleted", [])) == 7, "delete_objects")

# Object Lock: COMPLIANCE holds against this (admin) key.
s3.create_bucket(Bucket="boto-locked", ObjectLockEnabledForBucket=True)
import datetime

v = s3.put_object(
    Bucket="boto-locked", Key="c", Body=b"locked",
    ObjectLockMode="COMPLIANCE",
    ObjectLockRetainUntilDate=datetime.datetime(2100, 1, 1, tzinfo=datetime.timezone.utc),
)["VersionId"]
check(error_code(s3.delete_object, Bucket="boto-locked", Key="c", VersionId=v) == "AccessDenied", "COMPLIANCE holds")
check(s3.delete_object(Bucket="boto-locked", Key="c")["DeleteMarker"], "a delete marker goes on top")
got = s3.get_object(Bucket="boto-locked", Key="c", VersionId=v)["Body"].read()
check(got == b"locked", "the locked version is intact")

# A lock document damaged on the way is refused whole: every digest botocore
# sends with it (Content-MD5 or its default CRC32) is checked by the gateway.
# The damage keeps the length and the XML valid: OFF becomes ON.
def damage(request, **kw):
    body = request.body if isinstance(request.body, bytes) else request.body.encode()
    request.body = body.replace(b"<Status>OFF</Status>", b"<Status>ON</Status >")
    check(request.body != body, "the legal hold request was damaged")

s3.meta.events.register("before-send.s3.PutObjectLegalHold", damage)
code = error_code(s3.put_object_legal_hold, Bucket="boto-locked", Key="c", VersionId=v, LegalHold={"Status": "OFF"})
s3.meta.events.unregister("before-send.s3.PutObjectLegalHold", damage)
check(code == "BadDigest", "a legal hold damaged in transit is refused: %r" % code)
hold = s3.get_object_legal_hold(Bucket="boto-locked", Key="c", VersionId=v)["LegalHold"]["Status"]
check(hold == "OFF", "the damaged request changed nothing: %r" % hold)
s3.put_object_legal_hold(Bucket="boto-locked", Key="c", VersionId=v, LegalHold={"Status": "ON"})
hold = s3.get_object_legal_hold(Bucket="boto-locked", Key="c", VersionId=v)["LegalHold"]["Status"]
check(hold == "ON", "the same request undamaged applies: %r" % hold)

# The "null" version (written before versioning was enabled), by the name
# S3 gives it and listings show.
s3.create_bucket(Bucket="boto-nulls")
s3.put_object(Bucket="boto-nulls", Key="k", Body=b"before versioning")
s3.put_bucket_versioning(Bucket="boto-nulls", VersioningConfiguration={"Status": "Enabled"})
newer = s3.put_object(Bucket="boto-nulls", Key="k", Body=b"after")["VersionId"]
ids = sorted(v["VersionId"] for v in s3.list_object_versions(Bucket="boto-nulls")["Versions"])
check(ids == sorted(["null", newer]), "the null version listed: %r" % ids)
got = s3.get_object(Bucket="boto-nulls", Key="k", VersionId="null")["Body"].read()
check(got == b"before versioning", "GET versionId=null")
code = error_code(s3.get_object, Bucket="boto-nulls", Key="k", VersionId="not-a-version")
check(code == "InvalidArgument", "a malformed version id: %r" % code)
s3.delete_object(Bucket="boto-nulls", Key="k", VersionId="null")
ids = [v["VersionId"] for v in s3.list_object_versions(Bucket="boto-nulls").get("Versions", [])]
check(ids == [newer], "DELETE versionId=null removed it, and only it: %r" % ids)

# Conditional delete: a stale ETag is refused and deletes nothing.
etag = s3.head_object(Bucket="boto-nulls", Key="k")["ETag"]
stale = '"0123456789abcdef0123456789abcdef"'
code = error_code(s3.delete_object, Bucket="boto-nulls", Key="k", IfMatch=stale)
check(code == "PreconditionFailed", "If-Match with a stale ETag: %r" % code)
check(s3.get_object(Bucket="boto-nulls", Key="k")["Body"].read() == b"after", "nothing deleted")
check(s3.delete_object(Bucket="boto-nulls", Key="k", IfMatch=etag).get("DeleteMarker"), "If-Match with the current ETag deletes")
try:
    s3.get_object(Bucket="boto-nulls", Key="k")
    check(False, "a GET under a delete marker fails")
except ClientError as e:
    headers = e.response["ResponseMetadata"]["HTTPHeaders"]
    check(e.response["Error"]["Code"] == "NoSuchKey", "NoSuchKey under a delete marker")
    check(headers.get("x-amz-delete-marker") == "true", "the 404 says a delete marker: %r" % headers)
    check(bool(headers.get("x-amz-version-id")), "the 404 names the marker: %r" % headers)
    check(headers.get("content-type") == "application/xml", "the 404 is XML: %r" % headers)
# If-Match with no current object (here a delete marker) is 404 NoSuchKey,
# not 412, for a write and a delete alike, as in S3.
code = error_code(s3.put_object, Bucket="boto-nulls", Key="k", Body=b"x", IfMatch=etag)
check(code == "NoSuchKey", "If-Match PUT over no object: %r" % code)
code = error_code(s3.delete_object, Bucket="boto-nulls", Key="k", IfMatch=etag)
check(code == "NoSuchKey", "If-Match DELETE of no object: %r" % code)

# An object sent without a type is binary/octet-stream, as S3 says; copied
# onto itself changing nothing it is refused; max-keys=0 lists nothing.
s3.put_object(Bucket="boto-nulls", Key="typeless", Body=b"t")
ctype = s3.head_object(Bucket="boto-nulls", Key="typeless").get("ContentType")
check(ctype == "binary/octet-stream", "default Content-Type: %r" % ctype)
code = error_code(s3.copy_object, Bucket="boto-nulls", Key="typeless",
                  CopySource={"Bucket": "boto-nulls", "Key": "typeless"})
check(code == "InvalidRequest", "a copy onto itself changing nothing: %r" % code)
s3.copy_object(Bucket="boto-nulls", Key="typeless", CopySource={"Bucket": "boto-nulls", "Key": "typeless"},
               MetadataDirective="REPLACE", ContentType="text/plain")
ctype = s3.head_object(Bucket="boto-nulls", Key="typeless").get("ContentType")
check(ctype == "text/plain", "a copy onto itself replacing its metadata: %r" % ctype)
# A 416 says the size; a 304 carries the validators.
try:
    s3.get_object(Bucket="boto-nulls", Key="typeless", Range="bytes=100-")
    check(False, "a range past the end is refused")
except ClientError as e:
    headers = e.response["ResponseMetadata"]["HTTPHeaders"]
    check(e.response["ResponseMetadata"]["HTTPStatusCode"] == 416, "416: %r" % e.response)
    check(headers.get("content-range") == "bytes */1", "416 Content-Range: %r" % headers)
# A ranged HEAD answers as the GET would.
ranged = s3.head_object(Bucket="boto-nulls", Key="typeless", Range="bytes=0-0")
check(ranged["ResponseMetadata"]["HTTPStatusCode"] == 206, "ranged HEAD: %r" % ranged)
check(ranged["ContentLength"] == 1 and ranged.get("ContentRange") == "bytes 0-0/1",
      "ranged HEAD headers: %r" % ranged)
try:
    s3.head_object(Bucket="boto-nulls", Key="typeless", Range="bytes=100-")
    check(False, "a HEAD range past the end is refused")
except ClientError as e:
    check(e.response["ResponseMetadata"]["HTTPStatusCode"] == 416, "HEAD 416: %r" % e.response)
etag = s3.head_object(Bucket="boto-nulls", Key="typeless")["ETag"]
try:
    s3.get_object(Bucket="boto-nulls", Key="typeless", IfNoneMatch=etag)
    check(False, "If-None-Match with the current ETag is 304")
except ClientError as e:
    headers = e.response["ResponseMetadata"]["HTTPHeaders"]
    check(e.response["ResponseMetadata"]["HTTPStatusCode"] == 304, "304: %r" % e.response)
    check(headers.get("etag") == etag and headers.get("last-modified"), "304 validators: %r" % headers)
# The conditions take lists (RFC 9110), as a cache revalidating several
# copies sends them; If-Match compares strongly (a weak tag never matches),
# If-None-Match weakly.
def status_of(fn, **kwargs):
    try:
        return fn(**kwargs)["ResponseMetadata"]["HTTPStatusCode"]
    except ClientError as e:
        return e.response["ResponseMetadata"]["HTTPStatusCode"]
typeless = dict(Bucket="boto-nulls", Key="typeless")
check(status_of(s3.get_object, IfNoneMatch='"0000", ' + etag, **typeless) == 304, "If-None-Match list")
check(status_of(s3.get_object, IfNoneMatch="W/" + etag, **typeless) == 304, "If-None-Match weak")
check(status_of(s3.get_object, IfNoneMatch='"0000", "1111"', **typeless) == 200, "If-None-Match list, no member")
check(status_of(s3.head_object, IfMatch='"0000", ' + etag, **typeless) == 200, "If-Match list")
check(status_of(s3.head_object, IfMatch="W/" + etag, **typeless) == 412, "If-Match weak")
# Tags: every object's set is empty (aws s3 cp asks before each multipart
# copy), and a write asking for tags is refused, not filed without them.
tags = s3.get_object_tagging(Bucket="boto-nulls", Key="typeless")
check(tags["TagSet"] == [] and tags.get("VersionId"), "empty tag set, version named: %r" % tags)
code = error_code(s3.get_object_tagging, Bucket="boto-nulls", Key="no-such-key")
check(code == "NoSuchKey", "tags of no object: %r" % code)
code = error_code(s3.put_object, Bucket="boto-nulls", Key="tagged", Body=b"x", Tagging="case=1")
check(code == "NotImplemented", "a tagged PUT: %r" % code)
code = error_code(s3.get_object, Bucket="boto-nulls", Key="tagged")
check(code == "NoSuchKey", "the tagged PUT filed nothing: %r" % code)
# The version a copy read is named whether or not the request named it.
current = s3.head_object(Bucket="boto-nulls", Key="typeless")["VersionId"]
copied = s3.copy_object(Bucket="boto-nulls", Key="copied", CopySource={"Bucket": "boto-nulls", "Key": "typeless"})
check(copied.get("CopySourceVersionId") == current, "x-amz-copy-source-version-id: %r" % copied)
none = s3.list_object_versions(Bucket="boto-nulls", MaxKeys=0)
check(not none.get("Versions") and not none.get("IsTruncated"), "max-keys=0 lists nothing: %r" % none)

# Object Lock on an existing bucket whose versioning is enabled, as S3 allows;
# not on one without versioning.
s3.put_object_lock_configuration(
    Bucket="boto-nulls",
    ObjectLockConfiguration={"ObjectLockEnabled": "Enabled", "Rule": {"DefaultRetention": {"Mode": "GOVERNANCE", "Days": 1}}},
)
held = s3.put_object(Bucket="boto-nulls", Key="h", Body=b"held")["VersionId"]
head = s3.head_object(Bucket="boto-nulls", Key="h")
check(head.get("ObjectLockMode") == "GOVERNANCE", "default retention applies: %r" % head)
check(head.get("ObjectLockLegalHoldStatus") == "OFF", "HEAD reports the legal hold: %r" % head)
code = error_code(s3.delete_object, Bucket="boto-nulls", Key="h", VersionId=held)
check(code == "AccessDenied", "the new lock holds: %r" % code)
s3.create_bucket(Bucket="boto-plain")
code = error_code(
    s3.put_object_lock_configuration, Bucket="boto-plain", ObjectLockConfiguration={"ObjectLockEnabled": "Enabled"}
)
check(code == "InvalidBucketState", "no Object Lock without versioning: %r" % code)

print("boto3 %s (CRC32 as %s): %d checks passed" % (boto3.__version__, via, checks))
sys.exit(0)
