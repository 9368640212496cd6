//! Wire frames between gateways and storage nodes, and the versioned encoding
//! every stored structure shares.
//!
//! One bidirectional QUIC stream carries one request: a [`Request`] frame, then
//! for `PutShard` exactly `header.len` body bytes; the node answers with one
//! [`Response`] frame, then for `Shard` the body. A frame is
//! `version u8 | body length u32 LE | postcard body`, at most [`MAX_FRAME`] bytes,
//! so a hostile peer cannot make a node allocate more than that before the body
//! length is checked against the code's shard size. Errors travel as numeric
//! [`ErrorCode`]s, never strings.

use crate::ids::{EvidenceId, NodeId, ShardKey};
use crate::shard::ShardHeader;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Version byte of the frames this code speaks.
pub const WIRE_V1: u8 = 1;
/// Largest frame body: requests and responses carry headers, never content.
pub const MAX_FRAME: usize = 64 * 1024;
/// Bytes before a frame body.
pub const FRAME_PREFIX: usize = 5;

/// Why bytes could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    /// Input ended early.
    #[error("truncated input")]
    Truncated,
    /// A version byte this build does not know.
    #[error("unknown encoding version {0}")]
    UnknownVersion(u8),
    /// A declared length beyond the limit.
    #[error("declared length {0} exceeds the limit")]
    TooLarge(usize),
    /// Bytes left over after a complete value.
    #[error("trailing bytes after the value")]
    TrailingBytes,
    /// A shard file without the shard magic.
    #[error("bad magic")]
    BadMagic,
    /// Bytes that do not form a valid value.
    #[error("malformed value")]
    Malformed,
}

/// Encodes `value` as `version | postcard body`: the one encoding every stored
/// record uses.
pub fn encode_versioned<T: Serialize>(version: u8, value: &T) -> Vec<u8> {
    let mut out = vec![version];
    // Serialising plain structs into a Vec cannot fail.
    postcard::to_io(value, &mut out).expect("postcard encoding into a Vec");
    out
}

/// Decodes what [`encode_versioned`] wrote, refusing other versions and
/// trailing bytes.
pub fn decode_versioned<T: DeserializeOwned>(version: u8, bytes: &[u8]) -> Result<T, DecodeError> {
    let (&v, body) = bytes.split_first().ok_or(DecodeError::Truncated)?;
    if v != version {
        return Err(DecodeError::UnknownVersion(v));
    }
    let (value, rest) = postcard::take_from_bytes(body).map_err(|e| match e {
        postcard::Error::DeserializeUnexpectedEnd => DecodeError::Truncated,
        _ => DecodeError::Malformed,
    })?;
    if !rest.is_empty() {
        return Err(DecodeError::TrailingBytes);
    }
    Ok(value)
}

/// What a gateway (or repair worker) asks a storage node.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum Request {
    /// Store a shard; `header.len` body bytes follow. Answered `Stored` only after
    /// the shard is fsynced.
    PutShard(ShardHeader),
    /// Read a shard; answered `Shard` and the body.
    GetShard(ShardKey),
    /// The stored header of a shard, without its body.
    StatShard(ShardKey),
    /// Delete a shard (repair moves, garbage collection, expunge).
    DeleteShard(ShardKey),
    /// Who the node is and how full.
    NodeInfo,
    /// The headers of the shards this node stores, in key order after `after`,
    /// at most `limit` (capped at [`MAX_LIST`]): `recover-index` and orphan
    /// collection page through a node's inventory with it.
    ListShards { after: Option<ShardKey>, limit: u16 },
    /// The keys of shards this node has quarantined (failed their hash on
    /// read or scrub) after `after`, in key order, at most [`MAX_LIST`]:
    /// how scrub findings reach the repair worker.
    ListQuarantined { after: Option<ShardKey> },
    /// The node's wall clock, so gateways can measure clock skew.
    Time,
    /// Read the shard back from disk and check it against its header's
    /// BLAKE3 on the node; answered `Stat` with the header, or `Corrupt`
    /// (and quarantined). Repair re-counts a written shard with it without
    /// moving its body over the network again.
    VerifyShard(ShardKey),
    /// The node's free space and the reserve it keeps; answered `Space`.
    /// (A request of its own, not fields added to `NodeInfo`, so gateways
    /// and nodes of either version keep decoding each other's frames: an
    /// older node answers `Error(BadRequest)`.)
    Space,
    /// Read a shard as [`GetShard`](Self::GetShard) does, without hashing its
    /// body on the node: for a caller that checks every byte itself against
    /// something stronger than the shard header (a gateway's read, checked
    /// group by group against the content root). The node still checks that
    /// the header names the shard and that the body has its length. A caller
    /// whose check fails reads the shard again with `GetShard`, so the node
    /// finds, quarantines and reports the corruption. An older node answers
    /// `Error(BadRequest)`.
    GetShardUnchecked(ShardKey),
    /// Build a shard here from `k` others of its stripe and store it: the
    /// node fetches each source from its node (`GetShardUnchecked`), checks
    /// it against the hash the manifest records, decodes, and stores the
    /// result as [`PutShard`](Self::PutShard) would, checked against
    /// `header.blake3`; answered `Stored` after the fsync. How repair moves
    /// k shards in and none out of a gateway (instead of k in and one out),
    /// so the gateway is not the hub every rebuilt byte passes through. A
    /// source that cannot be had or fails its hash is answered
    /// [`ErrorCode::SourceUnavailable`] with nothing stored; the caller then
    /// rebuilds the old way, reading every shard itself. With one source
    /// that is the shard itself, the node copies it instead: how a drain
    /// moves a shard off a node that still serves it (one shard moves, not
    /// k+1). An older node answers `Error(BadRequest)`.
    RebuildShard(RebuildShard),
    /// Erase every trace of this evidence's shards on the node (an expunge):
    /// its shard files and packed records, whichever node placement put them
    /// on, the forensic copies in quarantine, and any damaged segment that
    /// holds one; packed records are overwritten, not only marked deleted.
    /// Answered `Erased` once all of it is durable. Idempotent. An older
    /// node answers `Error(BadRequest)`.
    EraseEvidence(EvidenceId),
    /// The ids of every node removed from the cluster (at most
    /// [`MAX_DENIED`]), added to those the node had (a removal is for
    /// good, and a list read before one may arrive after it): it serves none of
    /// them any more (a removed node's key, taken from its host or its
    /// disposed-of disk, must not read the shards its stripes still have
    /// elsewhere). Kept on the node's disk; answered `Denied`. Gateways
    /// only. An older node answers `Error(BadRequest)`.
    DenyNodes(Vec<u32>),
    /// [`DeleteShard`](Self::DeleteShard), fenced: carried out only while
    /// the node's wall clock has not passed `not_after_ms` (ms since the
    /// Unix epoch), checked again under the shard's lock right before it
    /// goes (after any wait for a busy disk); else answered `Error(Late)`
    /// with nothing deleted. How repair and the orphan sweep delete under a
    /// stripe lease: a request that reaches the node, or its disk, after
    /// the lease could have passed to another gateway (which may have
    /// placed the shard here again, committed, and named it in the stripe's
    /// record) must not land. An older node answers `Error(BadRequest)`.
    DeleteShardBefore { key: ShardKey, not_after_ms: u64 },
}

/// Most node ids one [`Request::DenyNodes`] carries.
pub const MAX_DENIED: usize = 4096;

/// What [`Request::RebuildShard`] asks for.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct RebuildShard {
    /// The shard to build, as its manifest names it.
    pub header: ShardHeader,
    /// Exactly `k` other shards of the same stripe, or the shard itself
    /// alone (a copy), each with its node's address and the hash the
    /// manifest records for it.
    pub sources: Vec<RebuildSource>,
}

/// One shard a [`RebuildShard`] reads.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct RebuildSource {
    /// Where the shard's node listens.
    pub addr: std::net::SocketAddr,
    /// The shard's index in its stripe.
    pub index: u8,
    /// Its BLAKE3, as the manifest records it.
    pub blake3: crate::ids::Blake3Hash,
}

impl RebuildShard {
    /// Whether the sources are the shard itself: a copy, not a decode.
    pub fn is_copy(&self) -> bool {
        matches!(&self.sources[..], [only] if only.index == self.header.key.index)
    }

    /// Whether the request is one a node can carry out: a valid code, a
    /// length within the shard size, and either the shard itself as the one
    /// source or exactly `k` distinct sources in the stripe, none of them
    /// the shard being built. Checked before any allocation or connection.
    pub fn is_well_formed(&self) -> bool {
        let code = self.header.code;
        let (k, total) = (
            code.data_shards(),
            code.data_shards() + code.parity_shards(),
        );
        let index = usize::from(self.header.key.index);
        let mut seen = vec![false; total.max(index + 1)];
        let valid = self.header.is_well_formed();
        if self.is_copy() {
            return valid;
        }
        valid
            && self.sources.len() == k
            && self.sources.iter().all(|s| {
                let i = usize::from(s.index);
                let fresh = i < total && i != index && !seen[i];
                if fresh {
                    seen[i] = true;
                }
                fresh
            })
    }
}

/// Most shard headers in one `ListShards` answer (an encoded header is under
/// 100 bytes, so a full page stays well inside [`MAX_FRAME`]).
pub const MAX_LIST: u16 = 500;

/// A node's identity and capacity.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct NodeInfo {
    pub node: NodeId,
    /// The UUID written into the data dir when it was first used; a node that
    /// comes back with another disk reports another UUID.
    pub disk_uuid: [u8; 16],
    pub capacity_bytes: u64,
    pub free_bytes: u64,
    /// Bytes of shard files this node stores.
    pub used_bytes: u64,
    pub shards: u64,
}

/// A node's free space against the reserve it keeps.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct SpaceInfo {
    /// Bytes available to the node on its data dir's file system.
    pub free_bytes: u64,
    /// Free bytes the node keeps for deletes, compaction and the file
    /// system: it refuses a new shard ([`ErrorCode::DiskFull`]) that would
    /// leave less than this free, so it is full for new shards once
    /// `free_bytes` is at or under it.
    pub reserve_bytes: u64,
}

impl SpaceInfo {
    /// Whether the node takes no new shards now: its free space is within
    /// its reserve.
    pub fn is_full(&self) -> bool {
        self.free_bytes <= self.reserve_bytes
    }
}

/// What a node answers.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum Response {
    Stored,
    /// The shard's header; its body follows.
    Shard(ShardHeader),
    Stat(ShardHeader),
    Deleted {
        existed: bool,
    },
    Info(NodeInfo),
    Error(ErrorCode),
    /// A page of shard headers; an empty page means the listing ended.
    Shards(Vec<ShardHeader>),
    /// A page of shard keys; an empty page means the listing ended.
    Keys(Vec<ShardKey>),
    /// Milliseconds since the Unix epoch on the node's clock.
    Time(u64),
    /// Free space and reserve, for `Space`.
    Space(SpaceInfo),
    /// What an `EraseEvidence` removed: shards (files and packed records)
    /// and forensic copies (quarantined shards, damaged segments).
    Erased {
        shards: u64,
        copies: u64,
    },
    /// A `DenyNodes` is in force (and durable): how many nodes it names.
    Denied(u32),
}

/// Numeric error codes on the wire. Unknown codes from newer peers decode as
/// [`ErrorCode::Other`] so old gateways keep working.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(from = "u16", into = "u16")]
pub enum ErrorCode {
    /// The request could not be decoded or is inconsistent (e.g. a body longer
    /// than the code's shard size).
    BadRequest,
    /// No such shard on this node.
    NotFound,
    /// The body sent does not hash to the header's BLAKE3; nothing was stored.
    HashMismatch,
    /// The stored shard failed its hash on read; it has been quarantined.
    Corrupt,
    /// The disk is full; nothing was stored.
    DiskFull,
    /// The node's disk failed in another way.
    Io,
    /// A frame version this node does not speak.
    UnsupportedVersion,
    /// A `RebuildShard` could not read one of its sources, or one failed its
    /// hash; nothing was stored.
    SourceUnavailable,
    /// The peer's certificate may not make this request (only the gateway
    /// writes or deletes shards; other nodes only read them).
    Forbidden,
    /// A [`Request::DeleteShardBefore`] that came (or reached the disk)
    /// after its time: nothing was deleted.
    Late,
    /// A code this build does not know.
    Other(u16),
}

impl From<u16> for ErrorCode {
    fn from(v: u16) -> Self {
        match v {
            1 => ErrorCode::BadRequest,
            2 => ErrorCode::NotFound,
            3 => ErrorCode::HashMismatch,
            4 => ErrorCode::Corrupt,
            5 => ErrorCode::DiskFull,
            6 => ErrorCode::Io,
            7 => ErrorCode::UnsupportedVersion,
            8 => ErrorCode::SourceUnavailable,
            9 => ErrorCode::Forbidden,
            10 => ErrorCode::Late,
            other => ErrorCode::Other(other),
        }
    }
}

impl From<ErrorCode> for u16 {
    fn from(c: ErrorCode) -> u16 {
        match c {
            ErrorCode::BadRequest => 1,
            ErrorCode::NotFound => 2,
            ErrorCode::HashMismatch => 3,
            ErrorCode::Corrupt => 4,
            ErrorCode::DiskFull => 5,
            ErrorCode::Io => 6,
            ErrorCode::UnsupportedVersion => 7,
            ErrorCode::SourceUnavailable => 8,
            ErrorCode::Forbidden => 9,
            ErrorCode::Late => 10,
            ErrorCode::Other(v) => v,
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self {
            ErrorCode::BadRequest => "bad request",
            ErrorCode::NotFound => "shard not found",
            ErrorCode::HashMismatch => "shard body does not match its hash",
            ErrorCode::Corrupt => "stored shard is corrupt",
            ErrorCode::DiskFull => "disk full",
            ErrorCode::Io => "disk error",
            ErrorCode::UnsupportedVersion => "unsupported frame version",
            ErrorCode::SourceUnavailable => "a shard to rebuild from is unavailable",
            ErrorCode::Forbidden => "this peer may not make that request",
            ErrorCode::Late => "the request came after its time; nothing was done",
            ErrorCode::Other(v) => return write!(f, "error code {v}"),
        };
        f.write_str(name)
    }
}

/// Encodes a frame: prefix and body.
pub fn encode_frame<T: Serialize>(value: &T) -> Vec<u8> {
    let mut out = vec![WIRE_V1, 0, 0, 0, 0];
    postcard::to_io(value, &mut out).expect("postcard encoding into a Vec");
    let len = (out.len() - FRAME_PREFIX) as u32;
    out[1..FRAME_PREFIX].copy_from_slice(&len.to_le_bytes());
    out
}

/// Reads a frame prefix: checks the version and returns the body length.
pub fn decode_frame_prefix(prefix: &[u8; FRAME_PREFIX]) -> Result<usize, DecodeError> {
    if prefix[0] != WIRE_V1 {
        return Err(DecodeError::UnknownVersion(prefix[0]));
    }
    let len = u32::from_le_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
    if len > MAX_FRAME {
        return Err(DecodeError::TooLarge(len));
    }
    Ok(len)
}

fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, DecodeError> {
    let (value, rest) = postcard::take_from_bytes(body).map_err(|e| match e {
        postcard::Error::DeserializeUnexpectedEnd => DecodeError::Truncated,
        _ => DecodeError::Malformed,
    })?;
    if !rest.is_empty() {
        return Err(DecodeError::TrailingBytes);
    }
    Ok(value)
}

impl Request {
    pub fn encode(&self) -> Vec<u8> {
        encode_frame(self)
    }

    /// Decodes a request frame body (after [`decode_frame_prefix`]).
    pub fn decode_body(body: &[u8]) -> Result<Self, DecodeError> {
        decode_body(body)
    }

    /// Decodes a whole frame, prefix included (fuzzing, tests).
    pub fn decode_frame(frame: &[u8]) -> Result<Self, DecodeError> {
        let prefix: &[u8; FRAME_PREFIX] = frame
            .get(..FRAME_PREFIX)
            .and_then(|p| p.try_into().ok())
            .ok_or(DecodeError::Truncated)?;
        let len = decode_frame_prefix(prefix)?;
        let body = &frame[FRAME_PREFIX..];
        match body.len().cmp(&len) {
            std::cmp::Ordering::Less => Err(DecodeError::Truncated),
            std::cmp::Ordering::Greater => Err(DecodeError::TrailingBytes),
            std::cmp::Ordering::Equal => decode_body(body),
        }
    }
}

impl Response {
    pub fn encode(&self) -> Vec<u8> {
        encode_frame(self)
    }

    pub fn decode_body(body: &[u8]) -> Result<Self, DecodeError> {
        decode_body(body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::code::ErasureCode;
    use crate::ids::{Blake3Hash, EvidenceId};
    use proptest::prelude::*;

    fn key() -> ShardKey {
        ShardKey {
            evidence: EvidenceId([0x33; 16]),
            stripe: 1,
            index: 2,
        }
    }

    #[test]
    fn request_frames_golden_bytes() {
        // version 1, body length 19, variant GetShard (1), evidence, stripe 1, index 2
        assert_eq!(
            hex::encode(Request::GetShard(key()).encode()),
            "011300000001333333333333333333333333333333330102"
        );
        // NodeInfo is variant 4 with no fields.
        assert_eq!(hex::encode(Request::NodeInfo.encode()), "010100000004");
        // GetShardUnchecked is appended (variant 10), so older frames keep their numbers.
        assert_eq!(
            hex::encode(Request::GetShardUnchecked(key()).encode()),
            "01130000000a333333333333333333333333333333330102"
        );
        // DeleteShardBefore is appended (variant 14): the key, then the
        // time as a varint (1000 = e8 07).
        assert_eq!(
            hex::encode(
                Request::DeleteShardBefore {
                    key: key(),
                    not_after_ms: 1000
                }
                .encode()
            ),
            "01150000000e333333333333333333333333333333330102e807"
        );
        // Error(HashMismatch): variant 5, code 3.
        assert_eq!(
            hex::encode(Response::Error(ErrorCode::HashMismatch).encode()),
            "01020000000503"
        );
        // Info: variant 4; node 7, the disk UUID, then capacity 1000, free
        // 300, used 5 and shards 2 as varints (unchanged since the first
        // version: older gateways and nodes decode it).
        let info = Response::Info(NodeInfo {
            node: NodeId(7),
            disk_uuid: [0x11; 16],
            capacity_bytes: 1000,
            free_bytes: 300,
            used_bytes: 5,
            shards: 2,
        });
        assert_eq!(
            hex::encode(info.encode()),
            "0118000000040711111111111111111111111111111111e807ac020502"
        );
        // Space: request and response variant 9 (free 300, reserve 200).
        assert_eq!(hex::encode(Request::Space.encode()), "010100000009");
        let space = Response::Space(SpaceInfo {
            free_bytes: 300,
            reserve_bytes: 200,
        });
        assert_eq!(hex::encode(space.encode()), "010500000009ac02c801");
        // EraseEvidence: request variant 12 (appended), the evidence id;
        // Erased: response variant 10, shards 300 and copies 2 as varints.
        assert_eq!(
            hex::encode(Request::EraseEvidence(EvidenceId([0x33; 16])).encode()),
            concat!("0111000000", "0c", "33333333333333333333333333333333")
        );
        let erased = Response::Erased {
            shards: 300,
            copies: 2,
        };
        assert_eq!(hex::encode(erased.encode()), "01040000000aac0202");
        // DenyNodes: request variant 13 (appended), a length and varints;
        // Denied: response variant 11, a varint.
        assert_eq!(
            hex::encode(Request::DenyNodes(vec![3, 300]).encode()),
            "0105000000".to_owned() + "0d02" + "03" + "ac02"
        );
        assert_eq!(hex::encode(Response::Denied(2).encode()), "01020000000b02");
    }

    fn rebuild() -> RebuildShard {
        let code = ErasureCode {
            k: 2,
            m: 1,
            shard_size: 1 << 20,
        };
        let source = |index, port| RebuildSource {
            addr: std::net::SocketAddr::from(([127, 0, 0, 1], port)),
            index,
            blake3: Blake3Hash([index; 32]),
        };
        RebuildShard {
            header: ShardHeader {
                key: key(),
                code,
                stripe_len: 10,
                len: 5,
                blake3: Blake3Hash([0x44; 32]),
            },
            sources: vec![source(0, 7001), source(1, 7002)],
        }
    }

    #[test]
    fn rebuild_frames_golden_bytes() {
        // Body length 139, variant 11 (appended). The header (key, code 2+1
        // of 1 MiB, stripe length 10, length 5, hash), then two sources: an
        // IPv4 socket address (variant 0, four bytes, port 7001 as a
        // varint), the index, the hash.
        let hex = hex::encode(Request::RebuildShard(rebuild()).encode());
        assert_eq!(
            hex,
            concat!(
                "018b0000000b",
                "333333333333333333333333333333330102",
                "0201808040",
                "0a05",
                "4444444444444444444444444444444444444444444444444444444444444444",
                "02",
                "007f000001d93600",
                "0000000000000000000000000000000000000000000000000000000000000000",
                "007f000001da3601",
                "0101010101010101010101010101010101010101010101010101010101010101",
            )
        );
        assert_eq!(
            hex::encode(Response::Error(ErrorCode::SourceUnavailable).encode()),
            "01020000000508"
        );
    }

    #[test]
    fn a_rebuild_names_k_distinct_other_shards_of_a_valid_code() {
        assert!(rebuild().is_well_formed());
        let mut r = rebuild();
        r.sources.pop();
        assert!(!r.is_well_formed(), "fewer than k sources");
        let mut r = rebuild();
        r.sources[1].index = 0;
        assert!(!r.is_well_formed(), "a source twice");
        let mut r = rebuild();
        r.sources[1].index = 2;
        assert!(
            !r.is_well_formed(),
            "the shard being built as its own source"
        );
        let mut r = rebuild();
        r.sources[1].index = 3;
        assert!(!r.is_well_formed(), "a source outside the stripe");
        let mut r = rebuild();
        r.header.key.index = 3;
        assert!(!r.is_well_formed(), "a shard outside the stripe");
        let mut r = rebuild();
        r.header.len = (1 << 20) + 1;
        assert!(!r.is_well_formed(), "longer than a shard");
        let mut r = rebuild();
        r.header.code.k = 0;
        assert!(!r.is_well_formed(), "an invalid code");
        // A copy: the shard itself, alone.
        let mut r = rebuild();
        r.sources.truncate(1);
        r.sources[0].index = r.header.key.index;
        assert!(r.is_copy() && r.is_well_formed(), "a copy");
        r.sources.push(r.sources[0]);
        assert!(
            !r.is_copy() && !r.is_well_formed(),
            "the shard itself twice"
        );
    }

    #[test]
    fn a_node_is_full_once_its_free_space_is_within_its_reserve() {
        let info = |free_bytes, reserve_bytes| SpaceInfo {
            free_bytes,
            reserve_bytes,
        };
        assert!(!info(201, 200).is_full());
        assert!(info(200, 200).is_full());
        assert!(info(0, 200).is_full());
        assert!(info(0, 0).is_full());
        assert!(!info(1, 0).is_full());
    }

    #[test]
    fn error_codes_are_stable_numbers() {
        for code in 0u16..20 {
            assert_eq!(u16::from(ErrorCode::from(code)), code);
        }
        assert_eq!(ErrorCode::from(900), ErrorCode::Other(900));
        // Each code's number, written out: a swap of two in both
        // directions, or one added to one direction only (decoded as
        // Other, and so taken for a passing failure), passes the loop.
        let table = [
            (ErrorCode::BadRequest, 1),
            (ErrorCode::NotFound, 2),
            (ErrorCode::HashMismatch, 3),
            (ErrorCode::Corrupt, 4),
            (ErrorCode::DiskFull, 5),
            (ErrorCode::Io, 6),
            (ErrorCode::UnsupportedVersion, 7),
            (ErrorCode::SourceUnavailable, 8),
            (ErrorCode::Forbidden, 9),
            (ErrorCode::Late, 10),
        ];
        for (code, n) in table {
            assert_eq!(u16::from(code), n, "{code:?}");
            assert_eq!(ErrorCode::from(n), code, "{n}");
        }
    }

    /// Every request and answer keeps its variant number on the wire (the
    /// byte after the frame prefix): a reordered enum would have an old
    /// gateway's StatShard reach a new node as DeleteShard.
    #[test]
    fn every_variant_keeps_its_number() {
        let header = rebuild().header;
        let tag = |frame: Vec<u8>| frame[FRAME_PREFIX];
        let requests = [
            Request::PutShard(header),
            Request::GetShard(key()),
            Request::StatShard(key()),
            Request::DeleteShard(key()),
            Request::NodeInfo,
            Request::ListShards {
                after: None,
                limit: 1,
            },
            Request::ListQuarantined { after: None },
            Request::Time,
            Request::VerifyShard(key()),
            Request::Space,
            Request::GetShardUnchecked(key()),
            Request::RebuildShard(rebuild()),
            Request::EraseEvidence(key().evidence),
            Request::DenyNodes(vec![1]),
            Request::DeleteShardBefore {
                key: key(),
                not_after_ms: 1,
            },
        ];
        for (n, r) in requests.into_iter().enumerate() {
            assert_eq!(usize::from(tag(r.encode())), n, "{r:?}");
        }
        let responses = [
            Response::Stored,
            Response::Shard(header),
            Response::Stat(header),
            Response::Deleted { existed: true },
            Response::Info(NodeInfo {
                node: crate::NodeId(1),
                disk_uuid: [0; 16],
                capacity_bytes: 1,
                free_bytes: 1,
                used_bytes: 0,
                shards: 0,
            }),
            Response::Error(ErrorCode::Io),
            Response::Shards(Vec::new()),
            Response::Keys(Vec::new()),
            Response::Time(1),
            Response::Space(SpaceInfo {
                free_bytes: 1,
                reserve_bytes: 0,
            }),
            Response::Erased {
                shards: 0,
                copies: 0,
            },
            Response::Denied(0),
        ];
        for (n, r) in responses.into_iter().enumerate() {
            assert_eq!(usize::from(tag(r.encode())), n, "{r:?}");
        }
    }

    #[test]
    fn hostile_frames_are_refused_before_allocation() {
        assert_eq!(
            decode_frame_prefix(&[1, 0xff, 0xff, 0xff, 0xff]),
            Err(DecodeError::TooLarge(u32::MAX as usize))
        );
        assert_eq!(
            decode_frame_prefix(&[2, 0, 0, 0, 0]),
            Err(DecodeError::UnknownVersion(2))
        );
        let mut frame = Request::NodeInfo.encode();
        frame.push(0);
        assert_eq!(
            Request::decode_frame(&frame),
            Err(DecodeError::TrailingBytes)
        );
        assert_eq!(
            Request::decode_frame(&frame[..3]),
            Err(DecodeError::Truncated)
        );
    }

    fn any_request() -> impl Strategy<Value = Request> {
        let key = (any::<[u8; 16]>(), any::<u64>(), any::<u8>()).prop_map(|(e, s, i)| ShardKey {
            evidence: EvidenceId(e),
            stripe: s,
            index: i,
        });
        prop_oneof![
            (key.clone(), any::<u64>(), any::<u32>(), any::<[u8; 32]>()).prop_map(
                |(key, size, len, h)| {
                    Request::PutShard(ShardHeader {
                        key,
                        code: ErasureCode {
                            k: 4,
                            m: 2,
                            shard_size: 1 << 20,
                        },
                        stripe_len: size,
                        len,
                        blake3: Blake3Hash(h),
                    })
                }
            ),
            key.clone().prop_map(Request::GetShard),
            key.clone().prop_map(Request::GetShardUnchecked),
            (
                key.clone(),
                proptest::collection::vec(
                    (
                        any::<[u8; 4]>(),
                        any::<u16>(),
                        any::<u8>(),
                        any::<[u8; 32]>()
                    ),
                    0..6
                )
            )
                .prop_map(|(key, sources)| {
                    Request::RebuildShard(RebuildShard {
                        header: ShardHeader {
                            key,
                            code: ErasureCode {
                                k: 4,
                                m: 2,
                                shard_size: 1 << 20,
                            },
                            stripe_len: 1,
                            len: 1,
                            blake3: Blake3Hash([9; 32]),
                        },
                        sources: sources
                            .into_iter()
                            .map(|(ip, port, index, h)| RebuildSource {
                                addr: std::net::SocketAddr::from((ip, port)),
                                index,
                                blake3: Blake3Hash(h),
                            })
                            .collect(),
                    })
                }),
            key.clone().prop_map(Request::StatShard),
            key.clone().prop_map(Request::DeleteShard),
            (key, any::<u64>())
                .prop_map(|(key, not_after_ms)| Request::DeleteShardBefore { key, not_after_ms }),
            any::<[u8; 16]>().prop_map(|e| Request::EraseEvidence(EvidenceId(e))),
            proptest::collection::vec(any::<u32>(), 0..20).prop_map(Request::DenyNodes),
            Just(Request::NodeInfo),
            Just(Request::Space),
            Just(Request::ListShards {
                after: None,
                limit: MAX_LIST
            }),
        ]
    }

    proptest! {
        #[test]
        fn requests_round_trip(req in any_request()) {
            prop_assert_eq!(Request::decode_frame(&req.encode()).unwrap(), req);
        }

        #[test]
        fn request_decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Request::decode_frame(&bytes);
            let _ = Response::decode_body(&bytes);
        }
    }
}
