#!/usr/bin/env python3
"""An independent check of a Custodia ledger, sharing no code with it.

Fetches the published C2SP checkpoint and tiles over HTTP and checks, with
only Python's hashlib and an Ed25519 implementation (the `cryptography`
package when installed, else the RFC 8032 reference algorithm below):

- the checkpoint's signed-note signature by the log's verifier key;
- every level-0 tile hash is SHA-256(0x00 || entry) of its entry bundle;
- the RFC 9162 Merkle tree head of all leaves is the checkpoint's root, and
  the level-1 tile hashes are the heads of their 256-leaf subtrees;
- each receipt: its checkpoint signature, its salted commitment, and its
  RFC 9162 inclusion proof;
- an RFC 9162 consistency proof from an older checkpoint to the published one.

Usage: verify_log.py BASE_URL VKEY CHECKS.json   (prints OK, exits 0)
"""

import base64
import hashlib
import json
import sys
import urllib.request

# ---------------------------------------------------------------- Ed25519

try:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.exceptions import InvalidSignature

    def ed25519_verify(public, msg, sig):
        try:
            Ed25519PublicKey.from_public_bytes(public).verify(sig, msg)
            return True
        except InvalidSignature:
            return False

    ED25519 = "cryptography"
except ImportError:  # RFC 8032, section 6 (reference implementation)
    _p = 2**255 - 19
    _L = 2**252 + 27742317777372353535851937790883648493

    def _inv(x):
        return pow(x, _p - 2, _p)

    _d = -121665 * _inv(121666) % _p
    _sqrt_m1 = pow(2, (_p - 1) // 4, _p)

    def _add(P, Q):
        A, B = (P[1] - P[0]) * (Q[1] - Q[0]) % _p, (P[1] + P[0]) * (Q[1] + Q[0]) % _p
        C, D = 2 * P[3] * Q[3] * _d % _p, 2 * P[2] * Q[2] % _p
        E, F, G, H = B - A, D - C, D + C, B + A
        return (E * F, G * H, F * G, E * H)

    def _mul(s, P):
        Q = (0, 1, 1, 0)
        while s > 0:
            if s & 1:
                Q = _add(Q, P)
            P = _add(P, P)
            s >>= 1
        return Q

    def _eq(P, Q):
        return (P[0] * Q[2] - Q[0] * P[2]) % _p == 0 and (P[1] * Q[2] - Q[1] * P[2]) % _p == 0

    def _recover_x(y, sign):
        if y >= _p:
            return None
        x2 = (y * y - 1) * _inv(_d * y * y + 1)
        if x2 == 0:
            return None if sign else 0
        x = pow(x2, (_p + 3) // 8, _p)
        if (x * x - x2) % _p != 0:
            x = x * _sqrt_m1 % _p
        if (x * x - x2) % _p != 0:
            return None
        if (x & 1) != sign:
            x = _p - x
        return x

    _gy = 4 * _inv(5) % _p
    _gx = _recover_x(_gy, 0)
    _G = (_gx, _gy, 1, _gx * _gy % _p)

    def _decompress(s):
        y = int.from_bytes(s, "little")
        sign = y >> 255
        y &= (1 << 255) - 1
        x = _recover_x(y, sign)
        return None if x is None else (x, y, 1, x * y % _p)

    def ed25519_verify(public, msg, sig):
        if len(public) != 32 or len(sig) != 64:
            return False
        A, R = _decompress(public), _decompress(sig[:32])
        if A is None or R is None:
            return False
        s = int.from_bytes(sig[32:], "little")
        if s >= _L:
            return False
        h = int.from_bytes(hashlib.sha512(sig[:32] + public + msg).digest(), "little") % _L
        return _eq(_mul(s, _G), _add(R, _mul(h, A)))

    ED25519 = "RFC 8032 reference"

# ---------------------------------------------------------------- helpers


def fail(msg):
    print("FAIL: " + msg)
    sys.exit(1)


def sha256(b):
    return hashlib.sha256(b).digest()


def leaf_hash(entry):
    return sha256(b"\x00" + entry)


def node_hash(l, r):
    return sha256(b"\x01" + l + r)


def mth(leaves):
    """RFC 9162 2.1.1 Merkle Tree Hash of a list of leaf hashes."""
    if not leaves:
        return sha256(b"")
    if len(leaves) == 1:
        return leaves[0]
    k = 1
    while k * 2 < len(leaves):
        k *= 2
    return node_hash(mth(leaves[:k]), mth(leaves[k:]))


def verify_note(note, vkey):
    """C2SP signed-note: returns the note text if vkey's signature verifies."""
    name, key_id, key_b64 = vkey.split("+", 2)
    key = base64.b64decode(key_b64)
    if key[0] != 0x01 or len(key) != 33:
        fail("log key is not an Ed25519 note key")
    expect_id = sha256(name.encode() + b"\n" + key)[:4]
    if expect_id.hex() != key_id:
        fail("log key id does not match its key")
    text, sep, sigs = note.partition("\n\n")
    if not sep:
        fail("note has no signature block")
    text = (text + "\n").encode()
    for line in sigs.splitlines():
        if not line.startswith("\u2014 "):
            fail("malformed signature line")
        sig_name, sig_b64 = line[2:].split(" ", 1)
        sig = base64.b64decode(sig_b64)
        if sig_name == name and sig[:4] == expect_id:
            if ed25519_verify(key[1:], text, sig[4:]):
                return text.decode()
            fail("the log's signature on the checkpoint is INVALID")
    fail("the checkpoint carries no signature by the log key")


def parse_checkpoint(text):
    origin, size, root = text.split("\n")[:3]
    return origin, int(size), base64.b64decode(root)


def verify_inclusion(index, size, leaf, proof, root):
    """RFC 9162 2.1.3.2."""
    if not isinstance(index, int) or not isinstance(size, int) or index < 0 or index >= size:
        return False
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == root


def inclusion_path(m, leaves):
    """RFC 9162 2.1.3.1: the inclusion proof of leaf m."""
    n = len(leaves)
    if n <= 1:
        return []
    k = 1 << ((n - 1).bit_length() - 1)
    if m < k:
        return inclusion_path(m, leaves[:k]) + [mth(leaves[k:])]
    return inclusion_path(m - k, leaves[k:]) + [mth(leaves[:k])]


def verify_consistency(first, second, first_hash, second_hash, proof):
    """RFC 9162 2.1.4.2."""
    # A tree never shrinks: an "old" tree larger than the new one is a
    # rollback, whatever the proof says.
    if first < 0 or first > second:
        return False
    if first == second:
        return not proof and first_hash == second_hash
    if first == 0:
        return not proof
    if first & (first - 1) == 0:
        proof = [first_hash] + proof
    if not proof:
        return False
    fn, sn = first - 1, second - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = proof[0]
    for c in proof[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    return fr == first_hash and sr == second_hash and sn == 0


def tile_index(n):
    """C2SP tlog-tiles index path: 3-digit groups, all but the last x-prefixed."""
    parts = []
    while True:
        parts.append("%03d" % (n % 1000))
        n //= 1000
        if n == 0:
            break
    parts.reverse()
    return "/".join("x" + p for p in parts[:-1]) + ("/" if len(parts) > 1 else "") + parts[-1]


def fetch(base, path):
    with urllib.request.urlopen(base + "/ledger/" + path) as r:
        return r.read()


def tile_path(level, n, width):
    kind = "entries" if level == "entries" else str(level)
    p = "tile/%s/%s" % (kind, tile_index(n))
    return p if width == 256 else p + ".p/%d" % width


def main():
    base, vkey, checks_path = sys.argv[1:4]
    checks = json.load(open(checks_path))
    text = verify_note(fetch(base, "checkpoint").decode(), vkey)
    origin, size, root = parse_checkpoint(text)
    if origin != vkey.split("+")[0]:
        fail("origin does not name the key")

    leaves, entries = [], []
    for n in range((size + 255) // 256):
        width = min(256, size - n * 256)
        tile = fetch(base, tile_path(0, n, width))
        bundle = fetch(base, tile_path("entries", n, width))
        if len(tile) != 32 * width:
            fail("tile %d has the wrong length" % n)
        at = 0
        while at < len(bundle):
            length = int.from_bytes(bundle[at:at + 2], "big")
            entries.append(bundle[at + 2:at + 2 + length])
            at += 2 + length
        leaves += [tile[i * 32:(i + 1) * 32] for i in range(width)]
    if len(entries) != size or len(leaves) != size:
        fail("tiles hold %d leaves and %d entries for a tree of %d" % (len(leaves), len(entries), size))
    for i, (e, h) in enumerate(zip(entries, leaves)):
        if leaf_hash(e) != h:
            fail("leaf %d is not the hash of its entry" % i)
    if mth(leaves) != root:
        fail("the tiles' Merkle tree head is not the checkpoint's root")
    if size >= 256:
        full = size // 256
        width = full if full < 256 else 256
        level1 = fetch(base, tile_path(1, 0, width))
        for k in range(width):
            if level1[k * 32:(k + 1) * 32] != mth(leaves[k * 256:(k + 1) * 256]):
                fail("level-1 tile hash %d is wrong" % k)

    prefix_roots = {}
    for r in checks["receipts"]:
        rtext = verify_note(r["checkpoint"], vkey)
        rorigin, rsize, rroot = parse_checkpoint(rtext)
        if rorigin != origin:
            fail("a receipt's checkpoint names another log: %r" % rorigin)
        if rsize > size:
            fail("a receipt's checkpoint is newer than the published one")
        # The receipt's tree is the published tree's prefix, not another
        # history (a split view).
        if rsize not in prefix_roots:
            prefix_roots[rsize] = mth(leaves[:rsize])
        if prefix_roots[rsize] != rroot:
            fail("a receipt's checkpoint is not a prefix of the published log")
        salt = bytes.fromhex(r["salt"])
        if len(salt) != 32:
            fail("a receipt's salt is not 32 bytes")
        statement = base64.b64decode(r["statement"])
        commitment = sha256(salt + statement)
        proof = [base64.b64decode(h) for h in r["inclusion_proof"]]
        if not verify_inclusion(r["leaf_index"], rsize, leaf_hash(commitment), proof, rroot):
            fail("inclusion proof of leaf %d does not verify" % r["leaf_index"])
        if entries[r["leaf_index"]] != commitment:
            fail("published entry %d is not the receipt's commitment" % r["leaf_index"])
        if json.loads(statement).get("v") != 1:
            fail("statement is not version 1")

    old_text = verify_note(checks["old_checkpoint"], vkey)
    old_origin, old_size, old_root = parse_checkpoint(old_text)
    if old_origin != origin:
        fail("the old checkpoint names another log: %r" % old_origin)
    proof = [base64.b64decode(h) for h in checks["consistency_proof"]]
    if not verify_consistency(old_size, size, old_root, root, proof):
        fail("consistency proof %d -> %d does not verify" % (old_size, size))
    # And a tampered proof must not.
    if proof:
        bad = [bytes([proof[0][0] ^ 1]) + proof[0][1:]] + proof[1:]
        if verify_consistency(old_size, size, old_root, root, bad):
            fail("a tampered consistency proof verified")
    # Nor one that has the tree shrink, nor an inclusion before leaf 0.
    if old_size < size and verify_consistency(size, old_size, root, old_root, proof):
        fail("a consistency proof of a shrinking tree verified")
    if size > 0:
        # Index -1 acts like an index of all ones: with the last leaf's real
        # proof it verified wherever the size is a power of two.
        last = inclusion_path(size - 1, leaves)
        if not verify_inclusion(size - 1, size, leaves[-1], last, root):
            fail("the last leaf's own inclusion proof does not verify")
        if verify_inclusion(-1, size, leaves[-1], last, root):
            fail("an inclusion proof of leaf -1 verified")

    print("OK: %d leaves, %d receipts, consistency %d -> %d (Ed25519: %s)"
          % (size, len(checks["receipts"]), old_size, size, ED25519))


if __name__ == "__main__":
    main()
