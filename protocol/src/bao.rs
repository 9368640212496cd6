//! BLAKE3 verified streaming (Bao) over 1 MiB chunk groups.
//!
//! A piece of evidence's content root is its plain BLAKE3 hash. BLAKE3 is a
//! Merkle tree, so any byte range can be checked against the root from the
//! range's data plus the sibling hashes on its path: the *outboard*. The
//! [`bao_tree`] crate does the range encoding and checking; this module adds
//! what it lacks for an upload of unknown length, arriving as a stream:
//! [`OutboardBuilder`] hashes the stream once, yielding the content root *and*
//! every outboard hash pair as soon as its subtree is complete, keyed by the
//! [`TreeNode`] number that `bao_tree` itself uses. Pairs of complete subtrees
//! never change as more data arrives, so an ingest pipeline can store them in
//! the same small transactions as its stripe records, and a 1 TiB upload never
//! holds its outboard in memory.
//!
//! With [`GROUP_CHUNK_LOG`] = 10 (1 MiB groups) the outboard costs 64 bytes per
//! MiB of content (0.006 %), and a range read verifies whole 1 MiB groups.
//!
//! [`PairOutboard`] serves stored pairs to `bao_tree`'s validating encoder, which
//! is how the gateway verifies a `Range` read and how an auditor holding only
//! the content root can verify a slice.

use bao_tree::blake3::hazmat::{merge_subtrees_non_root, merge_subtrees_root, HasherExt, Mode};
use bao_tree::io::sync::Outboard;
use bao_tree::{BaoTree, BlockSize, ChunkNum, ChunkRanges, TreeNode};
use std::collections::HashMap;
use std::ops::Range;

pub use bao_tree;

/// log2 of the chunks (1 KiB each) per verified group: 1 MiB groups.
pub const GROUP_CHUNK_LOG: u8 = 10;
/// Bytes per verified group.
pub const GROUP_SIZE: u64 = 1024 << GROUP_CHUNK_LOG;

/// An outboard hash pair: the chaining values of a node's two children.
pub type HashPair = ([u8; 32], [u8; 32]);

/// The `bao_tree` geometry of `size` bytes in [`GROUP_SIZE`] groups.
pub fn tree(size: u64) -> BaoTree {
    BaoTree::new(size, BlockSize::from_chunk_log(GROUP_CHUNK_LOG))
}

/// The stable number of a tree node, the key its hash pair is stored under.
pub fn node_number(node: TreeNode) -> u64 {
    node.mid().0 - 1
}

/// The byte range `range` widened to whole groups and clipped to `size`:
/// what must be read to verify `range`.
pub fn group_aligned(range: Range<u64>, size: u64) -> Range<u64> {
    let start = range.start / GROUP_SIZE * GROUP_SIZE;
    let end = range.end.div_ceil(GROUP_SIZE).saturating_mul(GROUP_SIZE);
    start.min(size)..end.min(size)
}

/// Chunk ranges covering bytes `range` (which should be group-aligned).
pub fn chunk_ranges(range: Range<u64>) -> ChunkRanges {
    ChunkRanges::from(ChunkNum::chunks(range.start)..ChunkNum::chunks(range.end))
}

/// The nodes whose hash pairs are needed to verify bytes `range` of a blob of
/// `size` bytes.
pub fn nodes_for(size: u64, range: Range<u64>) -> Vec<u64> {
    let tree = tree(size);
    let ranges = chunk_ranges(range);
    tree.ranges_pre_order_chunks_iter_ref(&ranges, 0)
        .filter_map(|c| match c {
            bao_tree::iter::BaoChunk::Parent { node, .. } => Some(node_number(node)),
            _ => None,
        })
        .collect()
}

/// A complete subtree waiting for its right sibling.
#[derive(Clone, Copy)]
struct Subtree {
    cv: [u8; 32],
    /// First group it covers.
    first_group: u64,
    /// log2 of the groups it covers.
    log_groups: u32,
}

/// Hashes a stream into its BLAKE3 root and Bao outboard pairs, in one pass.
///
/// Feed bytes with [`update`](Self::update); take pairs that became final with
/// [`take_pairs`](Self::take_pairs) whenever convenient; [`finish`](Self::finish)
/// returns the root and the last pairs (those on the tree's right edge, which
/// depend on the total length).
pub struct OutboardBuilder {
    group: bao_tree::blake3::Hasher,
    /// Bytes in the current group.
    group_len: u64,
    /// Index of the current group.
    group_index: u64,
    /// Complete subtrees of strictly decreasing size, left to right.
    stack: Vec<Subtree>,
    pairs: Vec<(u64, HashPair)>,
}

impl Default for OutboardBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl OutboardBuilder {
    pub fn new() -> Self {
        OutboardBuilder {
            group: bao_tree::blake3::Hasher::new(),
            group_len: 0,
            group_index: 0,
            stack: Vec::new(),
            pairs: Vec::new(),
        }
    }

    /// Total bytes fed so far.
    pub fn len(&self) -> u64 {
        self.group_index * GROUP_SIZE + self.group_len
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn update(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.group_len == GROUP_SIZE {
                // A full group is closed only once more data arrives: the last
                // group is hashed differently (as the root, when it is alone).
                self.close_group();
            }
            let take = ((GROUP_SIZE - self.group_len) as usize).min(data.len());
            self.group.update(&data[..take]);
            self.group_len += take as u64;
            data = &data[take..];
        }
    }

    /// Pairs that became final since the last call, as (node number, pair).
    pub fn take_pairs(&mut self) -> Vec<(u64, HashPair)> {
        std::mem::take(&mut self.pairs)
    }

    /// The content root and the remaining pairs. The last pair is the
    /// root's own, which verifying any group needs: pairs stored in the
    /// order they were built, cut short, verify no group at all.
    pub fn finish(mut self) -> ([u8; 32], Vec<(u64, HashPair)>) {
        if self.stack.is_empty() {
            // At most one group: the root is the plain hash.
            return (*self.group.finalize().as_bytes(), self.pairs);
        }
        // Not empty: a group is closed only when more data follows.
        let mut right = self.current_group();
        let mut root = right.cv;
        while let Some(left) = self.stack.pop() {
            let is_root = self.stack.is_empty();
            self.pairs.push((parent_node(&left), (left.cv, right.cv)));
            root = if is_root {
                *merge_subtrees_root(&left.cv, &right.cv, Mode::Hash).as_bytes()
            } else {
                merge_subtrees_non_root(&left.cv, &right.cv, Mode::Hash)
            };
            right = Subtree {
                cv: root,
                first_group: left.first_group,
                log_groups: left.log_groups + 1,
            };
        }
        (root, self.pairs)
    }

    /// The current (possibly partial) group as a non-root subtree.
    fn current_group(&self) -> Subtree {
        Subtree {
            cv: self.group.finalize_non_root(),
            first_group: self.group_index,
            log_groups: 0,
        }
    }

    fn close_group(&mut self) {
        let done = self.current_group();
        self.group_index += 1;
        self.group_len = 0;
        self.group = bao_tree::blake3::Hasher::new();
        self.group.set_input_offset(self.group_index * GROUP_SIZE);
        self.push(done);
    }

    /// Pushes a complete subtree, merging equal-sized neighbours (which are then
    /// known not to be the root: more data follows).
    fn push(&mut self, mut sub: Subtree) {
        while let Some(left) = self.stack.last().copied() {
            if left.log_groups != sub.log_groups {
                break;
            }
            self.stack.pop();
            self.pairs.push((parent_node(&left), (left.cv, sub.cv)));
            sub = Subtree {
                cv: merge_subtrees_non_root(&left.cv, &sub.cv, Mode::Hash),
                first_group: left.first_group,
                log_groups: left.log_groups + 1,
            };
        }
        self.stack.push(sub);
    }
}

/// The node whose left child is `left`: its level is that of a subtree twice
/// `left`'s size, centred on `left`'s end.
fn parent_node(left: &Subtree) -> u64 {
    let left_chunks = 1u64 << (left.log_groups + u32::from(GROUP_CHUNK_LOG));
    let start_chunk = left.first_group << GROUP_CHUNK_LOG;
    start_chunk + left_chunks - 1
}

/// Stored hash pairs served to `bao_tree`, for verifying ranges. Holds only the
/// pairs a verification needs (see [`nodes_for`]); a missing pair makes the
/// verification fail, never pass.
pub struct PairOutboard {
    pub root: [u8; 32],
    pub size: u64,
    pub pairs: HashMap<u64, HashPair>,
}

impl Outboard for PairOutboard {
    fn root(&self) -> bao_tree::blake3::Hash {
        self.root.into()
    }

    fn tree(&self) -> BaoTree {
        tree(self.size)
    }

    fn load(
        &self,
        node: TreeNode,
    ) -> std::io::Result<Option<(bao_tree::blake3::Hash, bao_tree::blake3::Hash)>> {
        Ok(Some(match self.pairs.get(&node_number(node)) {
            Some((l, r)) => ((*l).into(), (*r).into()),
            // Zero hashes never verify (the trait's convention for absent pairs).
            None => ([0u8; 32].into(), [0u8; 32].into()),
        }))
    }
}

/// Why a range failed verification.
#[derive(Debug, thiserror::Error)]
#[error("range {start}..{end} does not verify against the content root: {reason}")]
pub struct RangeMismatch {
    pub start: u64,
    pub end: u64,
    pub reason: String,
}

/// Verifies `data`, the bytes at `range` (group-aligned, see
/// [`group_aligned`]), against `outboard`.
pub fn verify_range(
    outboard: &PairOutboard,
    range: Range<u64>,
    data: &[u8],
) -> Result<(), RangeMismatch> {
    let fail = |reason: String| RangeMismatch {
        start: range.start,
        end: range.end,
        reason,
    };
    if range.end - range.start != data.len() as u64 {
        return Err(fail("wrong length".into()));
    }
    let window = Window {
        base: range.start,
        data,
    };
    let ranges = chunk_ranges(range.clone());
    bao_tree::io::sync::encode_ranges_validated(window, outboard, &ranges, std::io::sink())
        .map_err(|e| fail(e.to_string()))
}

/// Groups in a blob of `size` bytes (an empty blob is one empty group).
pub fn group_count(size: u64) -> u64 {
    size.div_ceil(GROUP_SIZE).max(1)
}

/// Bytes `range` of group `index` of a blob of `size` bytes.
pub fn group_range(size: u64, index: u64) -> Range<u64> {
    let start = index.saturating_mul(GROUP_SIZE).min(size);
    start..start.saturating_add(GROUP_SIZE).min(size)
}

/// The chaining value each of `groups` must hash to (see [`GroupHasher`]),
/// derived from the content root down through `pairs` (as loaded for
/// [`nodes_for`] of the groups' bytes). Every pair on the way is checked
/// against its parent, so the values are as trustworthy as the root; a
/// missing or inconsistent pair is an error, never a pass.
///
/// This is how a read verifies whole groups in one BLAKE3 pass over its
/// bytes, each group before any of its bytes is released.
pub fn expected_group_cvs(
    root: &[u8; 32],
    size: u64,
    pairs: &HashMap<u64, HashPair>,
    groups: Range<u64>,
) -> Result<Vec<(u64, [u8; 32])>, RangeMismatch> {
    let n = group_count(size);
    let groups = groups.start.min(n)..groups.end.min(n);
    let mut out = Vec::with_capacity(groups.end.saturating_sub(groups.start) as usize);
    if !groups.is_empty() {
        walk(0..n, *root, true, &groups, pairs, &mut out).map_err(|reason| RangeMismatch {
            start: groups.start.saturating_mul(GROUP_SIZE),
            end: groups.end.saturating_mul(GROUP_SIZE).min(size),
            reason,
        })?;
    }
    Ok(out)
}

/// Descends from the subtree of groups `span`, whose chaining value is `cv`,
/// to the groups in `want`.
fn walk(
    span: Range<u64>,
    cv: [u8; 32],
    is_root: bool,
    want: &Range<u64>,
    pairs: &HashMap<u64, HashPair>,
    out: &mut Vec<(u64, [u8; 32])>,
) -> Result<(), String> {
    let groups = span.end - span.start;
    if groups == 1 {
        out.push((span.start, cv));
        return Ok(());
    }
    // BLAKE3's left subtree: the largest power of two of groups (whole
    // chunks, so whole groups) that leaves the right one non-empty.
    let left = 1u64 << (63 - (groups - 1).leading_zeros());
    let split = span.start + left;
    let node = (split << GROUP_CHUNK_LOG) - 1;
    let (l, r) = pairs
        .get(&node)
        .ok_or_else(|| format!("hash pair of tree node {node} is missing"))?;
    let merged = if is_root {
        *merge_subtrees_root(l, r, Mode::Hash).as_bytes()
    } else {
        merge_subtrees_non_root(l, r, Mode::Hash)
    };
    if merged != cv {
        return Err(format!(
            "hash pair of tree node {node} does not match its parent"
        ));
    }
    if want.start < split {
        walk(span.start..split, *l, false, want, pairs, out)?;
    }
    if want.end > split {
        walk(split..span.end, *r, false, want, pairs, out)?;
    }
    Ok(())
}

/// Hashes one group's bytes, fed in pieces, into the chaining value
/// [`expected_group_cvs`] gives for it (the content root itself when the
/// blob is a single group).
pub struct GroupHasher {
    hasher: bao_tree::blake3::Hasher,
    alone: bool,
}

impl GroupHasher {
    /// For group `index` of a blob of `size` bytes.
    pub fn new(size: u64, index: u64) -> Self {
        let mut hasher = bao_tree::blake3::Hasher::new();
        // A whole number of chunks, however large `index` (BLAKE3 asks it).
        hasher.set_input_offset(index.min(u64::MAX / GROUP_SIZE) * GROUP_SIZE);
        GroupHasher {
            hasher,
            alone: group_count(size) == 1,
        }
    }

    pub fn update(&mut self, data: &[u8]) {
        self.hasher.update(data);
    }

    pub fn finish(&self) -> [u8; 32] {
        if self.alone {
            *self.hasher.finalize().as_bytes()
        } else {
            self.hasher.finalize_non_root()
        }
    }
}

/// Bytes `base..base + data.len()` of a blob, for positioned reads.
struct Window<'a> {
    base: u64,
    data: &'a [u8],
}

impl bao_tree::io::sync::ReadAt for Window<'_> {
    fn read_at(&self, pos: u64, buf: &mut [u8]) -> std::io::Result<usize> {
        let off = pos
            .checked_sub(self.base)
            .and_then(|o| usize::try_from(o).ok())
            .filter(|o| *o <= self.data.len())
            .ok_or_else(|| std::io::Error::other("read outside the verified window"))?;
        let n = buf.len().min(self.data.len() - off);
        buf[..n].copy_from_slice(&self.data[off..off + n]);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bao_tree::io::outboard::PostOrderMemOutboard;
    use proptest::prelude::*;

    fn content(len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| ((i as u64 * 2654435761) >> 13) as u8)
            .collect()
    }

    fn build(data: &[u8], feed: usize) -> PairOutboard {
        let mut b = OutboardBuilder::new();
        let mut pairs = HashMap::new();
        for piece in data.chunks(feed.max(1)) {
            b.update(piece);
            pairs.extend(b.take_pairs());
        }
        assert_eq!(b.len(), data.len() as u64);
        let (root, rest) = b.finish();
        pairs.extend(rest);
        PairOutboard {
            root,
            size: data.len() as u64,
            pairs,
        }
    }

    /// The streamed outboard is exactly `bao_tree`'s own, pair for pair, and
    /// the root is plain BLAKE3.
    fn check_against_bao_tree(len: usize, feed: usize) {
        let data = content(len);
        let ours = build(&data, feed);
        assert_eq!(
            ours.root,
            *blake3::hash(&data).as_bytes(),
            "root, len {len}"
        );
        let reference =
            PostOrderMemOutboard::create(&data, BlockSize::from_chunk_log(GROUP_CHUNK_LOG));
        let t = tree(len as u64);
        let mut expected = 0;
        for node in t.post_order_nodes_iter() {
            if let Some(pair) = reference.load(node).expect("in memory") {
                expected += 1;
                let got = ours.pairs.get(&node_number(node)).copied();
                assert_eq!(
                    got,
                    Some((*pair.0.as_bytes(), *pair.1.as_bytes())),
                    "node {node:?}, len {len}"
                );
            }
        }
        assert_eq!(ours.pairs.len(), expected, "no extra pairs, len {len}");
        assert_eq!(expected as u64 * 64, t.outboard_size());
    }

    #[test]
    fn matches_bao_tree_at_group_boundaries() {
        let g = GROUP_SIZE as usize;
        for len in [
            0,
            1,
            1023,
            1024,
            g - 1,
            g,
            g + 1,
            2 * g,
            3 * g - 7,
            3 * g,
            4 * g,
            5 * g + 1,
            11 * g + 3,
        ] {
            for feed in [1 << 16, g, 7919] {
                check_against_bao_tree(len, feed);
            }
        }
    }

    #[test]
    fn verifies_ranges_and_catches_a_flipped_byte() {
        let g = GROUP_SIZE;
        let mut data = content((5 * g + 1234) as usize);
        let ob = build(&data, 1 << 20);
        let size = data.len() as u64;
        for want in [0..1, 10..g + 10, 2 * g..3 * g, 3 * g + 5..size, 0..size] {
            let r = group_aligned(want.clone(), size);
            let needed: HashMap<u64, HashPair> = nodes_for(size, r.clone())
                .into_iter()
                .map(|n| (n, ob.pairs[&n]))
                .collect();
            let partial = PairOutboard {
                root: ob.root,
                size,
                pairs: needed,
            };
            let bytes = &data[r.start as usize..r.end as usize];
            verify_range(&partial, r.clone(), bytes).expect("genuine bytes verify");
        }
        let r = group_aligned(2 * g + 5..2 * g + 6, size);
        data[(2 * g + 100) as usize] ^= 1;
        let bytes = &data[r.start as usize..r.end as usize];
        assert!(
            verify_range(&ob, r.clone(), bytes).is_err(),
            "a flipped byte fails"
        );
        // A wrong root fails too, even with the right bytes and pairs.
        data[(2 * g + 100) as usize] ^= 1;
        let bytes = &data[r.start as usize..r.end as usize];
        let forged = PairOutboard {
            root: [7; 32],
            size,
            pairs: ob.pairs.clone(),
        };
        assert!(verify_range(&forged, r, bytes).is_err());
    }

    fn group_cvs_of(data: &[u8]) -> Vec<[u8; 32]> {
        let size = data.len() as u64;
        (0..group_count(size))
            .map(|g| {
                let r = group_range(size, g);
                let mut h = GroupHasher::new(size, g);
                // In uneven pieces, as a read receives them.
                for piece in data[r.start as usize..r.end as usize].chunks(300_007) {
                    h.update(piece);
                }
                h.finish()
            })
            .collect()
    }

    #[test]
    fn each_group_checks_against_the_root_in_one_pass() {
        let g = GROUP_SIZE as usize;
        for len in [
            0,
            1,
            g - 1,
            g,
            g + 1,
            2 * g,
            3 * g - 7,
            4 * g,
            5 * g + 1,
            11 * g + 3,
        ] {
            let data = content(len);
            let ob = build(&data, 1 << 20);
            let size = len as u64;
            let n = group_count(size);
            let got = group_cvs_of(&data);
            for want in [0..n, 0..1, n - 1..n, n / 2..n, 1.min(n)..n.div_ceil(2)] {
                let bytes =
                    group_range(size, want.start).start..group_range(size, want.end.max(1) - 1).end;
                // Only the pairs a verifier loads for those bytes.
                let pairs: HashMap<u64, HashPair> = nodes_for(size, bytes)
                    .into_iter()
                    .map(|node| (node, ob.pairs[&node]))
                    .collect();
                let expected = expected_group_cvs(&ob.root, size, &pairs, want.clone())
                    .expect("genuine pairs verify");
                let groups: Vec<u64> = expected.iter().map(|(g, _)| *g).collect();
                assert_eq!(groups, want.clone().collect::<Vec<_>>(), "len {len}");
                for (g, cv) in expected {
                    assert_eq!(got[g as usize], cv, "group {g} of len {len}");
                }
            }
        }
    }

    #[test]
    fn without_the_last_pair_built_no_group_verifies() {
        let g = GROUP_SIZE as usize;
        for len in [g + 1, 2 * g, 3 * g - 7, 4 * g, 11 * g + 3] {
            let data = content(len);
            let mut b = OutboardBuilder::new();
            let mut built = Vec::new();
            for piece in data.chunks(1 << 19) {
                b.update(piece);
                built.extend(b.take_pairs());
            }
            let (root, rest) = b.finish();
            built.extend(rest);
            let size = len as u64;
            let n = group_count(size);
            let all: HashMap<u64, HashPair> = built.iter().copied().collect();
            assert!(expected_group_cvs(&root, size, &all, 0..n).is_ok());
            let cut: HashMap<u64, HashPair> = built[..built.len() - 1].iter().copied().collect();
            for group in 0..n {
                assert!(
                    expected_group_cvs(&root, size, &cut, group..group + 1).is_err(),
                    "group {group} of len {len} verified without the root's pair"
                );
            }
        }
    }

    #[test]
    fn a_flipped_byte_fails_its_group_only_and_forged_pairs_fail() {
        let g = GROUP_SIZE as usize;
        let mut data = content(5 * g + 1234);
        let ob = build(&data, 1 << 20);
        let size = data.len() as u64;
        let expected = expected_group_cvs(&ob.root, size, &ob.pairs, 0..6).unwrap();
        data[2 * g + 100] ^= 1;
        let got = group_cvs_of(&data);
        let failing: Vec<u64> = expected
            .iter()
            .filter(|(i, cv)| got[*i as usize] != *cv)
            .map(|(i, _)| *i)
            .collect();
        assert_eq!(failing, vec![2]);
        // A wrong root, a changed pair or a missing one: no values at all.
        assert!(expected_group_cvs(&[7; 32], size, &ob.pairs, 0..6).is_err());
        let mut forged = ob.pairs.clone();
        let node = *forged.keys().next().unwrap();
        forged.get_mut(&node).unwrap().0[0] ^= 1;
        assert!(expected_group_cvs(&ob.root, size, &forged, 0..6).is_err());
        let mut short = ob.pairs.clone();
        short.remove(&node);
        assert!(expected_group_cvs(&ob.root, size, &short, 0..6).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        #[test]
        fn any_length_and_feed_matches(len in 0usize..(9 << 20), feed in 1usize..(3 << 20)) {
            check_against_bao_tree(len, feed);
        }
    }
}
