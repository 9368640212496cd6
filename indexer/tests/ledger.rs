//! The ledger's openings groups and hash tiles on the embedded store: leaves
//! integrated in batches of any size (and statements of any size) read back
//! exactly, one by one and by range; the openings archive's runs chain
//! back from their file names.

use indexer::ledger::{self as lx, LeafRecord, TreeState, GROUP_BYTES, GROUP_LEAVES};
use indexer::{run, EmbeddedStore};
use protocol::ledger::Kind;
use protocol::EvidenceId;

fn store() -> (tempfile::TempDir, EmbeddedStore) {
    let dir = tempfile::tempdir().unwrap();
    let s = EmbeddedStore::open(&dir.path().join("index.redb")).unwrap();
    (dir, s)
}

fn leaf(n: u64) -> LeafRecord {
    // Every 37th statement is large enough that a group holds only one or
    // two of them, so groups are cut by bytes as well as by count.
    let len = if n.is_multiple_of(37) {
        50_000
    } else {
        100 + (n % 7) as usize
    };
    LeafRecord {
        evidence: EvidenceId::new(n, [(n % 251) as u8; 10]),
        salt: [(n % 256) as u8; 32],
        statement: vec![(n % 256) as u8; len],
        commitment: [(n / 256) as u8; 32],
    }
}

/// Queued statements as the integration's leaves (commitments left zero:
/// these tests check the index's records, not the tree).
fn as_leaves(pending: &[(Vec<u8>, lx::PendingRecord)]) -> Vec<(Vec<u8>, LeafRecord, Kind)> {
    pending
        .iter()
        .map(|(k, p)| {
            let leaf = LeafRecord {
                evidence: p.evidence,
                salt: p.salt,
                statement: p.statement.clone(),
                commitment: [0; 32],
            };
            (k.clone(), leaf, Kind::Notarized)
        })
        .collect()
}

/// Integrates `leaves` at leaf `first` in one transaction, as the sequencer
/// does (without tiles).
async fn integrate(store: &EmbeddedStore, first: u64, leaves: &[(Vec<u8>, LeafRecord, Kind)]) {
    let state = TreeState {
        size: first + leaves.len() as u64,
        root: [0; 32],
        fence: 0,
    };
    run(store, |tx| {
        let state = &state;
        async move {
            lx::integrate_tx(&tx, first, leaves, &[], state);
            Ok::<_, indexer::schema::SchemaError>(())
        }
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn an_index_in_the_old_ledger_layout_is_told_apart() {
    let (_dir, store) = store();
    let current =
        || async { run(&store, |tx| async move { lx::layout_current_tx(&tx).await }).await };
    assert!(current().await.unwrap(), "an empty ledger is current");
    // A tree of one leaf written without its hash tile, as the old layout did.
    run(&store, |tx| async move {
        let leaves = vec![(vec![b'Q', 0], leaf(0), Kind::Notarized)];
        let state = TreeState {
            size: 1,
            root: [0; 32],
            fence: 0,
        };
        lx::integrate_tx(&tx, 0, &leaves, &[], &state);
        Ok::<_, indexer::schema::SchemaError>(())
    })
    .await
    .unwrap();
    assert!(!current().await.unwrap());
    run(&store, |tx| async move {
        let state = TreeState {
            size: 1,
            root: [0; 32],
            fence: 0,
        };
        lx::integrate_tx(&tx, 1, &[], &[(0, 0, vec![1; 32])], &state);
        Ok::<_, indexer::schema::SchemaError>(())
    })
    .await
    .unwrap();
    assert!(current().await.unwrap());
}

#[tokio::test]
async fn openings_integrated_in_groups_read_back_one_by_one_and_by_range() {
    let (_dir, store) = store();
    let mut size = 0u64;
    // Batch sizes that cross group and tile boundaries in every way.
    for batch in [1u64, 63, 64, 65, 300, 2, 700, 129] {
        let leaves: Vec<(Vec<u8>, LeafRecord, Kind)> = (size..size + batch)
            .map(|n| (vec![b'Q', 0], leaf(n), Kind::Notarized))
            .collect();
        let first = size;
        size += batch;
        let state = TreeState {
            size,
            root: [0; 32],
            fence: 0,
        };
        let tiles = vec![(0u8, first >> 8, vec![7u8; 32])];
        run(&store, |tx| {
            let (leaves, tiles, state) = (&leaves, &tiles, &state);
            async move {
                lx::integrate_tx(&tx, first, leaves, tiles, state);
                Ok::<_, indexer::schema::SchemaError>(())
            }
        })
        .await
        .unwrap();
    }
    const { assert!(GROUP_LEAVES < 300 && 2 * 50_000 > GROUP_BYTES) };
    for n in 0..size {
        let got = run(&store, |tx| async move { lx::leaf_tx(&tx, n).await })
            .await
            .unwrap();
        assert_eq!(got, Some(leaf(n)), "leaf {n}");
    }
    let beyond = run(&store, |tx| async move { lx::leaf_tx(&tx, size).await })
        .await
        .unwrap();
    assert_eq!(beyond, None);
    for (a, b) in [
        (0, size),
        (5, 6),
        (63, 200),
        (64, 129),
        (250, 1000),
        (1200, size + 10),
    ] {
        let got = run(&store, |tx| async move { lx::leaves_tx(&tx, a..b).await })
            .await
            .unwrap();
        let want: Vec<LeafRecord> = (a..b.min(size)).map(leaf).collect();
        assert_eq!(got, want, "leaves {a}..{b}");
    }
    let asked = [
        1300,
        0,
        1,
        63,
        64,
        65,
        499,
        500,
        1000,
        37,
        74,
        64,
        size - 1,
        size,
        size + 5,
    ];
    let got = run(
        &store,
        |tx| async move { lx::leaves_at_tx(&tx, &asked).await },
    )
    .await
    .unwrap();
    let mut want: Vec<u64> = asked.iter().copied().filter(|n| *n < size).collect();
    want.sort_unstable();
    want.dedup();
    let want: Vec<(u64, LeafRecord)> = want.into_iter().map(|n| (n, leaf(n))).collect();
    assert_eq!(got, want);
    let tiles = run(&store, |tx| async move {
        lx::tiles_tx(&tx, &[(0, 0), (0, 9)]).await
    })
    .await
    .unwrap();
    assert_eq!(tiles, vec![Some(vec![7u8; 32]), None]);
}

/// Archive file names round-trip, sort in leaf order, and nothing else
/// (temporary files, other layouts) is taken for a run.
#[test]
fn archive_names() {
    for (a, b) in [(0, 1), (255, 8192), (65_535, 65_536), (65_536, 70_000)] {
        let name = lx::archive_name(a, b);
        assert_eq!(lx::parse_archive_name(&name), Some(a..b), "{name}");
    }
    assert!(lx::archive_name(9, 10) < lx::archive_name(10, 11));
    assert!(lx::archive_name(65_535, 65_536) < lx::archive_name(65_536, 65_537));
    for bad in [
        "openings-000000000000",
        "0000000/00000000000000000000-00000000000000000001#1",
        "0000000/00000000000000000005-00000000000000000005",
        "0000001/00000000000000000000-00000000000000000001",
        "0000000/0000000000000000000x-00000000000000000001",
        "00000000000000000000-00000000000000000001",
    ] {
        assert_eq!(lx::parse_archive_name(bad), None, "{bad}");
    }
}

/// The runs read back cover leaves from 0 without a gap, each leaf once,
/// whatever the runs' order and overlaps; a gap ends the archive.
#[test]
fn archive_chain_covers_without_gaps() {
    // Read back the leaves a chain yields.
    fn cover(ranges: &[std::ops::Range<u64>]) -> Vec<u64> {
        lx::archive_chain(ranges)
            .into_iter()
            .flat_map(|(i, from)| from..ranges[i].end)
            .collect()
    }
    assert_eq!(cover(&[]), Vec::<u64>::new());
    let gap_at_start = [1..5, 5..7];
    assert_eq!(cover(&gap_at_start), Vec::<u64>::new());
    assert_eq!(cover(&[3..6, 0..3]), (0..6).collect::<Vec<_>>());
    // A run re-published after a crash overlaps others.
    assert_eq!(
        cover(&[0..4, 4..8, 2..8, 8..9, 0..2]),
        (0..9).collect::<Vec<_>>()
    );
    // A shorter duplicate never shortens the archive.
    assert_eq!(cover(&[0..10, 0..4, 4..6]), (0..10).collect::<Vec<_>>());
    assert_eq!(cover(&[0..4, 4..6, 7..9]), (0..6).collect::<Vec<_>>());
    let chain = lx::archive_chain(&[0..4, 2..10]);
    assert_eq!(chain, vec![(0, 0), (1, 4)]);
}

/// The records as they were encoded before their byte fields were marked
/// `serde_bytes`: indexes and archives written then must read the same.
mod before_serde_bytes {
    use protocol::EvidenceId;
    #[derive(serde::Serialize, serde::Deserialize)]
    pub struct Pending {
        pub evidence: EvidenceId,
        pub salt: [u8; 32],
        pub statement: Vec<u8>,
    }
    #[derive(serde::Serialize, serde::Deserialize)]
    pub struct Leaf {
        pub evidence: EvidenceId,
        pub salt: [u8; 32],
        pub statement: Vec<u8>,
        pub commitment: [u8; 32],
    }
    #[derive(serde::Serialize, serde::Deserialize)]
    pub struct Archived {
        pub evidence: EvidenceId,
        pub salt: [u8; 32],
        pub statement: Vec<u8>,
        pub manifest: Option<Vec<u8>>,
        pub expunged: bool,
    }
    #[derive(serde::Serialize, serde::Deserialize)]
    pub struct Run {
        pub first: u64,
        pub leaves: Vec<Archived>,
    }
}

#[test]
fn byte_fields_encode_as_before() {
    use protocol::wire::{decode_versioned, encode_versioned};
    // Lengths around postcard's varint boundaries, and a 64 KiB statement.
    for len in [0usize, 1, 127, 128, 300, 16_383, 16_384, 65_536] {
        let l = leaf(len as u64);
        let statement: Vec<u8> = (0..len).map(|i| (i * 7 + len) as u8).collect();

        let old = before_serde_bytes::Pending {
            evidence: l.evidence,
            salt: l.salt,
            statement: statement.clone(),
        };
        let new = lx::PendingRecord {
            evidence: l.evidence,
            salt: l.salt,
            statement: statement.clone(),
        };
        let bytes = encode_versioned(1, &old);
        assert_eq!(encode_versioned(1, &new), bytes, "pending, {len} bytes");
        assert_eq!(
            decode_versioned::<lx::PendingRecord>(1, &bytes).unwrap(),
            new
        );

        let old = before_serde_bytes::Leaf {
            evidence: l.evidence,
            salt: l.salt,
            statement: statement.clone(),
            commitment: l.commitment,
        };
        let new = LeafRecord {
            statement: statement.clone(),
            ..l.clone()
        };
        let bytes = encode_versioned(1, &vec![old]);
        assert_eq!(
            encode_versioned(1, &vec![new.clone()]),
            bytes,
            "leaf, {len} bytes"
        );
        assert_eq!(
            decode_versioned::<Vec<LeafRecord>>(1, &bytes).unwrap(),
            vec![new]
        );

        for manifest in [
            None,
            Some(statement.iter().rev().copied().collect::<Vec<u8>>()),
        ] {
            let old = before_serde_bytes::Run {
                first: len as u64,
                leaves: vec![before_serde_bytes::Archived {
                    evidence: l.evidence,
                    salt: l.salt,
                    statement: statement.clone(),
                    manifest: manifest.clone(),
                    expunged: len % 2 == 0,
                }],
            };
            let new = lx::ArchiveRun {
                first: len as u64,
                leaves: vec![lx::ArchivedLeaf {
                    evidence: l.evidence,
                    salt: l.salt,
                    statement: statement.clone(),
                    manifest,
                    expunged: len % 2 == 0,
                }],
            };
            let bytes = encode_versioned(2, &old);
            assert_eq!(lx::encode_archive(&new), bytes, "archive, {len} bytes");
            assert_eq!(lx::decode_archive(&bytes).unwrap(), new);
        }
    }
}

/// Statements queued one per key (as single filings do) and many per
/// transaction (as `POST /v1/notarize` does, in chunks under the value limit)
/// come out of the queue in order, each chunk whole: the integration
/// dequeues with one range clear up to the last key it took.
#[tokio::test]
async fn queued_chunks_are_dequeued_whole_and_in_order() {
    let (_dir, store) = store();
    let rec = |n: u64| lx::PendingRecord {
        evidence: EvidenceId::new(n, [3; 10]),
        salt: [(n % 256) as u8; 32],
        // Every 97th near the 64 KiB limit, so chunks are cut by bytes too.
        statement: vec![
            (n % 251) as u8;
            if n.is_multiple_of(97) {
                60_000
            } else {
                300 + (n % 50) as usize
            }
        ],
    };
    // 40 statements queued alone (more keys than the first page of the
    // queue read), then 1,000 in one transaction, then one alone and 100 as
    // chunks in the same transaction.
    let all: Vec<lx::PendingRecord> = (0..1141).map(rec).collect();
    for p in &all[..40] {
        run(&store, |tx| async move {
            lx::enqueue_tx(&tx, 0, p);
            Ok::<_, indexer::schema::SchemaError>(())
        })
        .await
        .unwrap();
    }
    let (many, alone, more) = (&all[40..1040], &all[1040], &all[1041..]);
    run(&store, |tx| async move {
        lx::enqueue_notarizations_tx(&tx, many, "t");
        Ok::<_, indexer::schema::SchemaError>(())
    })
    .await
    .unwrap();
    run(&store, |tx| async move {
        lx::enqueue_tx(&tx, 0, alone);
        lx::enqueue_notarizations_tx(&tx, more, "t");
        Ok::<_, indexer::schema::SchemaError>(())
    })
    .await
    .unwrap();
    let mut got = Vec::new();
    let mut keys = std::collections::HashSet::new();
    let limits = [
        (1usize, 1usize << 20),
        // More than the first page of 16 keys: the read goes on a page.
        (30, 1 << 20),
        (500, 100_000),
        (3, 1),
        (8192, 1 << 24),
    ];
    for &(limit, max_bytes) in limits.iter().cycle().take(1000) {
        let pending = run(&store, |tx| async move {
            lx::pending_tx(&tx, limit, max_bytes).await
        })
        .await
        .unwrap();
        if pending.is_empty() {
            break;
        }
        let distinct: std::collections::HashSet<&Vec<u8>> =
            pending.iter().map(|(k, _)| k).collect();
        let bytes: usize = pending.iter().map(|(_, p)| p.statement.len()).sum();
        assert!(
            distinct.len() == 1 || (pending.len() <= limit && bytes <= max_bytes),
            "{} statements, {bytes} bytes over {} keys for limit {limit}, {max_bytes} bytes",
            pending.len(),
            distinct.len()
        );
        keys.extend(distinct.into_iter().cloned());
        integrate(&store, got.len() as u64, &as_leaves(&pending)).await;
        got.extend(pending.into_iter().map(|(_, p)| p));
    }
    assert_eq!(got.len(), all.len());
    assert!(got == all, "statements came out of the queue out of order");
    // Chunks, not one key per statement: besides the 41 single statements,
    // ~1,100 statements of ~330 bytes and a dozen of 60 kB in a few dozen keys.
    assert!(
        keys.len() > 41 + 2 && keys.len() < 41 + 40,
        "{} queue keys",
        keys.len()
    );
}

/// The integrator reads the next batch while the previous one's integration
/// is still committing, starting after the previous batch's last queue key:
/// nothing is read twice or skipped, chunks stay whole, and statements
/// queued meanwhile come after.
#[tokio::test]
async fn the_next_batch_is_read_after_one_still_committing() {
    let (_dir, store) = store();
    let rec = |n: u64| lx::PendingRecord {
        evidence: EvidenceId::new(n, [5; 10]),
        salt: [(n % 256) as u8; 32],
        statement: vec![(n % 253) as u8; 200 + (n % 40) as usize],
    };
    let all: Vec<lx::PendingRecord> = (0..2000).map(rec).collect();
    let enqueue = |recs: &'static [lx::PendingRecord], chunked: bool| {
        let store = &store;
        async move {
            run(store, |tx| async move {
                if chunked {
                    lx::enqueue_notarizations_tx(&tx, recs, "t");
                } else {
                    for (i, r) in recs.iter().enumerate() {
                        lx::enqueue_tx(&tx, i as u16, r);
                    }
                }
                Ok::<_, indexer::schema::SchemaError>(())
            })
            .await
            .unwrap()
        }
    };
    let all: &'static [lx::PendingRecord] = Box::leak(all.into_boxed_slice());
    enqueue(&all[..700], true).await;
    enqueue(&all[700..720], false).await;
    enqueue(&all[720..1500], true).await;

    let mut got: Vec<lx::PendingRecord> = Vec::new();
    // The batch read but not yet integrated, and where it starts.
    type Batch = Vec<(Vec<u8>, lx::PendingRecord)>;
    let mut reading: Option<(u64, Batch)> = None;
    let mut rounds = 0;
    loop {
        rounds += 1;
        if rounds == 3 {
            // Queued while a batch is in flight: read after it, in order.
            enqueue(&all[1500..], true).await;
        }
        // Batches of one chunk (~316 statements), of several, and of the
        // single statements queued between chunks.
        let limit = [300, 700, 1000, 5][rounds % 4];
        let next = match &reading {
            None => {
                run(&store, |tx| async move {
                    lx::pending_tx(&tx, limit, 1 << 20).await
                })
                .await
            }
            Some((_, batch)) => {
                let after = batch.last().map(|(k, _)| k.clone()).unwrap();
                let after = &after;
                run(&store, |tx| async move {
                    lx::pending_after_tx(&tx, after, limit, 1 << 20).await
                })
                .await
            }
        }
        .unwrap();
        // Only now does the previous batch's integration commit.
        if let Some((first, batch)) = reading.take() {
            got.extend(batch.iter().map(|(_, p)| p.clone()));
            integrate(&store, first, &as_leaves(&batch)).await;
        }
        if next.is_empty() {
            break;
        }
        let keys: std::collections::HashSet<&Vec<u8>> = next.iter().map(|(k, _)| k).collect();
        assert!(
            next.len() <= limit || keys.len() == 1,
            "{} statements for a limit of {limit}",
            next.len()
        );
        reading = Some((got.len() as u64, next));
    }
    assert_eq!(got.len(), all.len(), "after {rounds} rounds");
    assert!(got == all, "statements read ahead came out out of order");
    let left = run(&store, |tx| async move {
        lx::pending_tx(&tx, 10, 1 << 20).await
    })
    .await
    .unwrap();
    assert!(
        left.is_empty(),
        "{} statements left in the queue",
        left.len()
    );
}

/// Notarizations queued in chunks get one "M" key per chunk at integration,
/// not a "V" link each, and are still found by id (leaf and tenant);
/// statements queued singly, and chunks queued by the previous version
/// (numbered from `CHUNK_SEQ`, without "P" records), keep their "V" links.
#[tokio::test]
async fn notarizations_in_chunks_are_found_by_id_without_a_link_each() {
    use indexer::kv::Transaction;
    let (_dir, store) = store();
    let rec = |n: u64| lx::PendingRecord {
        evidence: EvidenceId::new(5_000 + n, [9; 10]),
        salt: [n as u8; 32],
        statement: vec![b's'; 300 + n as usize],
    };
    let chunked: Vec<lx::PendingRecord> = (0..600).map(rec).collect();
    let single = rec(600);
    let legacy: Vec<lx::PendingRecord> = (601..606).map(rec).collect();
    let placed = run(&store, |tx| {
        let (chunked, single, legacy) = (&chunked, &single, &legacy);
        async move {
            lx::enqueue_tx(&tx, 0, single);
            let placed = lx::enqueue_notarizations_tx(&tx, chunked, "court-a");
            tx.set_versionstamped_key(
                b"Q",
                &lx::CHUNK_SEQ.to_be_bytes(),
                &protocol::wire::encode_versioned(2, legacy),
            );
            Ok::<_, indexer::schema::SchemaError>(placed)
        }
    })
    .await
    .unwrap();
    // Chunks of ~90 kB: several, each named by its first statement.
    let chunks: std::collections::BTreeSet<EvidenceId> = placed.iter().map(|(c, _)| *c).collect();
    assert!(chunks.len() > 2, "{} chunks", chunks.len());
    for (r, (chunk, position)) in chunked.iter().zip(&placed) {
        let first = chunked.iter().position(|x| x.evidence == *chunk).unwrap();
        assert_eq!(chunked[first + *position as usize].evidence, r.evidence);
    }
    let id = chunked[7].evidence;
    let before = run(&store, |tx| async move {
        Ok::<_, indexer::schema::SchemaError>((
            lx::leaves_of_tx(&tx, id).await?,
            lx::notarization_tenant_tx(&tx, id).await?,
        ))
    })
    .await
    .unwrap();
    assert_eq!(
        before,
        (vec![], Some("court-a".to_string())),
        "before integration"
    );

    let pending = run(&store, |tx| async move {
        lx::pending_tx(&tx, 10_000, 1 << 24).await
    })
    .await
    .unwrap();
    assert_eq!(pending.len(), 606);
    let leaves = as_leaves(&pending);
    let order: Vec<EvidenceId> = leaves.iter().map(|(_, l, _)| l.evidence).collect();
    integrate(&store, 0, &leaves).await;

    for (n, id) in order.iter().enumerate() {
        let (found, tenant) = run(&store, |tx| async move {
            Ok::<_, indexer::schema::SchemaError>((
                lx::leaves_of_tx(&tx, *id).await?,
                lx::notarization_tenant_tx(&tx, *id).await?,
            ))
        })
        .await
        .unwrap();
        assert_eq!(found, vec![(n as u64, Kind::Notarized)], "leaf of {id}");
        let in_chunk = chunked.iter().any(|r| r.evidence == *id);
        assert_eq!(tenant.is_some(), in_chunk, "tenant of {id}");
    }
    let links = run(&store, |tx| async move {
        Ok::<_, indexer::schema::SchemaError>(tx.get_range(b"V", b"W", 0, false).await?)
    })
    .await
    .unwrap();
    assert_eq!(
        links.len(),
        1 + legacy.len(),
        "V links: only the single statement and the old chunk"
    );
    let starts = run(&store, |tx| async move {
        Ok::<_, indexer::schema::SchemaError>(tx.get_range(b"M", b"N", 0, false).await?)
    })
    .await
    .unwrap();
    assert_eq!(starts.len(), chunks.len());
}

/// The integrator lease: a live lease of another owner is refused (and
/// returned); one the caller watched go unrenewed for a whole term is taken
/// over even while its `until_ms` is ahead (a holder whose clock ran ahead,
/// then died), with a larger fence; a lease that changed since is not.
#[tokio::test]
async fn a_lease_left_unrenewed_is_taken_over_whatever_its_clock_said() {
    let (_d, s) = store();
    let (a, b) = (1u128, 2u128);
    let day = 86_400_000u64;
    // A's clock is a day ahead when it takes the lease.
    let fence = run(&s, |tx| async move {
        lx::acquire_lease_tx(&tx, a, 1_000 + day, 10_000, None).await
    })
    .await
    .unwrap();
    assert_eq!(fence, Ok(1));
    // B, on the right time, finds it live.
    let theirs = run(&s, |tx| async move {
        lx::acquire_lease_tx(&tx, b, 2_000, 10_000, None).await
    })
    .await
    .unwrap()
    .expect_err("A's lease is live by its until_ms");
    assert_eq!((theirs.owner, theirs.fence), (a, 1));
    // A record B did not watch (here: another until_ms) is not stale.
    let other = lx::LeaseRecord {
        until_ms: theirs.until_ms + 1,
        ..theirs
    };
    let refused = run(&s, |tx| async move {
        lx::acquire_lease_tx(&tx, b, 12_000, 10_000, Some(other)).await
    })
    .await
    .unwrap();
    assert_eq!(refused, Err(theirs));
    // The one B watched unchanged for a term: taken over, fence 2.
    let taken = run(&s, |tx| async move {
        lx::acquire_lease_tx(&tx, b, 12_000, 10_000, Some(theirs)).await
    })
    .await
    .unwrap();
    assert_eq!(taken, Ok(2));
    // And A, back, finds B's lease live (its fence says A lost it).
    let back = run(&s, |tx| async move {
        lx::acquire_lease_tx(&tx, a, 13_000, 10_000, None).await
    })
    .await
    .unwrap();
    assert_eq!(back.map_err(|l| (l.owner, l.fence)), Err((b, 2)));
}

/// A checkpoint re-signed at its size (a log key rotated) takes the place
/// of the old note, and what was gathered over the old note's text (its
/// time-stamp token, the witnessed and time-stamped records at that size)
/// goes with it; older records stay; a size that is not the newest is not
/// replaced.
#[tokio::test]
async fn a_resigned_checkpoint_drops_what_was_gathered_over_the_old_note() {
    let (_dir, store) = store();
    run(&store, |tx| async move {
        lx::put_checkpoint_tx(&tx, 5, b"old note 5").await?;
        lx::put_timestamp_tx(&tx, 5, "old note 5", b"token over the old note").await?;
        lx::add_cosignature_tx(&tx, 5, "old note 5", "", |_| 0).await?;
        lx::put_checkpoint_tx(&tx, 7, b"old note 7").await?;
        lx::put_timestamp_tx(&tx, 7, "old note 7", b"token 7").await?;
        lx::add_cosignature_tx(&tx, 7, "old note 7", "", |_| 0).await?;
        Ok::<_, indexer::schema::SchemaError>(())
    })
    .await
    .unwrap();
    let replaced = |size: u64| {
        run(&store, move |tx| async move {
            lx::replace_checkpoint_tx(&tx, size, b"new note").await
        })
    };
    assert!(!replaced(5).await.unwrap(), "not the newest size");
    assert!(replaced(7).await.unwrap());
    let (note, t5, t7, witnessed, stamped) = run(&store, |tx| async move {
        Ok::<_, indexer::schema::SchemaError>((
            lx::checkpoint_tx(&tx).await?,
            lx::timestamp_tx(&tx, 5).await?,
            lx::timestamp_tx(&tx, 7).await?,
            lx::witnessed_tx(&tx).await?,
            lx::stamped_tx(&tx).await?,
        ))
    })
    .await
    .unwrap();
    assert_eq!(note.as_deref(), Some(&b"new note"[..]));
    assert_eq!(
        t5.as_deref(),
        Some(&b"token over the old note"[..]),
        "older tokens stay"
    );
    assert_eq!(t7, None);
    assert_eq!(witnessed, None);
    assert_eq!(stamped, None);
}

/// A newer checkpoint's first cosignature does not take away an earlier
/// one's full set: the record it replaces is kept aside while it is the
/// best-cosigned, until a newer one is as well cosigned.
#[tokio::test]
async fn the_best_cosigned_earlier_checkpoint_is_kept() {
    let (_dir, store) = store();
    let note = |size: u64| format!("log\n{size}\nroot\n\n\u{2014} log sig{size}\n");
    // As the gateway weighs a note: the witnesses configured now that
    // cosigned it (here, by their lines; "gone" is no longer configured).
    fn weight(note: &str) -> usize {
        note.lines().filter(|l| l.starts_with("\u{2014} w")).count()
    }
    let line = |w: &str, size: u64| format!("\u{2014} {w} c{size}\n");
    let cosign = |size: u64, w: &'static str| {
        let (note, line) = (note(size), line(w, size));
        let store = &store;
        async move {
            run(store, |tx| {
                let (note, line) = (note.clone(), line.clone());
                async move { lx::add_cosignature_tx(&tx, size, &note, &line, weight).await }
            })
            .await
            .unwrap()
        }
    };
    let records = || async {
        run(&store, |tx| async move {
            Ok::<_, indexer::schema::SchemaError>((
                lx::witnessed_tx(&tx)
                    .await?
                    .map(|w| (w.size, weight(&w.note))),
                lx::kept_witnessed_tx(&tx)
                    .await?
                    .map(|w| (w.size, weight(&w.note))),
            ))
        })
        .await
        .unwrap()
    };
    cosign(5, "w1").await;
    cosign(5, "w2").await;
    assert_eq!(records().await, (Some((5, 2)), None));
    // Size 7 cosigned by w1 alone (w2 is down): 5's full set is kept.
    cosign(7, "w1").await;
    assert_eq!(records().await, (Some((7, 1)), Some((5, 2))));
    // And stays kept past 7's lesser set.
    cosign(9, "w1").await;
    assert_eq!(records().await, (Some((9, 1)), Some((5, 2))));
    // An older size's late cosignature changes nothing.
    cosign(7, "w2").await;
    assert_eq!(records().await, (Some((9, 1)), Some((5, 2))));
    // w2 back: 9 as well cosigned as 5, so 9 is kept when 11 comes.
    cosign(9, "w2").await;
    cosign(11, "w1").await;
    assert_eq!(records().await, (Some((11, 1)), Some((9, 2))));
    // A record with lines of a witness no longer configured weighs only
    // what the configured ones vouch for: it does not displace 9.
    cosign(13, "gone").await;
    cosign(13, "w1").await;
    cosign(15, "w1").await;
    assert_eq!(records().await, (Some((15, 1)), Some((9, 2))));
    cosign(15, "w2").await;
    cosign(17, "w1").await;
    assert_eq!(records().await, (Some((17, 1)), Some((15, 2))));
}

/// The node registry shares the ledger's groups' tag (`N`, a 4-byte id
/// there, an 8-byte leaf index here): node 0's record is never read as a
/// group, so asking an empty ledger for a leaf finds none rather than
/// failing on an unreadable record.
#[tokio::test]
async fn node_records_are_never_read_as_leaf_groups() {
    let (_d, store) = store();
    run(&store, |tx| async move {
        indexer::schema::put_node_tx(
            &tx,
            &indexer::schema::NodeRecord {
                node: protocol::NodeId(0),
                addr: "127.0.0.1:1".into(),
                failure_domain: None,
                disk_uuid: None,
                capacity_bytes: 0,
                free_bytes: 0,
                used_bytes: 0,
                last_seen_ms: 0,
            },
        );
        Ok::<_, indexer::schema::SchemaError>(())
    })
    .await
    .unwrap();
    let got = run(
        &store,
        |tx| async move { lx::leaves_at_tx(&tx, &[0, 3]).await },
    )
    .await
    .unwrap();
    assert!(got.is_empty(), "{got:?}");
}

/// The node registry's keys share the openings groups' tag and sort among
/// them: node 1's key just before the group of leaf 2^32. Leaves on either
/// side of it still read, one by one and by range.
#[tokio::test]
async fn openings_past_leaf_2_pow_32_read_beside_the_node_registry() {
    let (_dir, store) = store();
    run(&store, |tx| async move {
        for id in [0u32, 1, 2] {
            indexer::schema::put_node_tx(
                &tx,
                &indexer::schema::NodeRecord {
                    node: protocol::NodeId(id),
                    addr: "127.0.0.1:7000".into(),
                    failure_domain: None,
                    disk_uuid: None,
                    capacity_bytes: 1,
                    free_bytes: 1,
                    used_bytes: 0,
                    last_seen_ms: 5,
                },
            );
        }
        Ok::<_, indexer::schema::SchemaError>(())
    })
    .await
    .unwrap();
    let first = (1u64 << 32) - 2;
    let leaves: Vec<(Vec<u8>, LeafRecord, Kind)> = (first..first + 4)
        .map(|n| (vec![b'Q', 0], leaf(n), Kind::Notarized))
        .collect();
    integrate(&store, first, &leaves).await;
    for n in first..first + 4 {
        let got = run(&store, |tx| async move { lx::leaf_tx(&tx, n).await })
            .await
            .unwrap();
        assert_eq!(
            got.map(|l| l.statement),
            Some(leaf(n).statement),
            "leaf {n}"
        );
    }
    let got = run(&store, |tx| async move {
        lx::leaves_tx(&tx, first..first + 4).await
    })
    .await
    .unwrap();
    assert_eq!(got.len(), 4);
    // And the registry still lists its nodes among the groups.
    let nodes = run(
        &store,
        |tx| async move { indexer::schema::nodes_tx(&tx).await },
    )
    .await
    .unwrap();
    assert_eq!(nodes.len(), 3);
}

/// A token is stamped each interval; only those a receipt can still use
/// stay: the newest few, and those over the witnessed checkpoints.
#[tokio::test]
async fn old_time_stamp_tokens_are_cleared_as_new_ones_come() {
    let (_dir, store) = store();
    run(&store, |tx| async move {
        lx::add_cosignature_tx(&tx, 10, "note 10", "", |_| 0).await?;
        for size in 1..=100u64 {
            let token = format!("token {size}");
            lx::put_timestamp_tx(&tx, size, &format!("note {size}"), token.as_bytes()).await?;
        }
        Ok::<_, indexer::schema::SchemaError>(())
    })
    .await
    .unwrap();
    let mut kept = Vec::new();
    for size in 1..=100u64 {
        let t = run(
            &store,
            |tx| async move { lx::timestamp_tx(&tx, size).await },
        )
        .await
        .unwrap();
        if let Some(t) = t {
            assert_eq!(t, format!("token {size}").into_bytes());
            kept.push(size);
        }
    }
    let mut want = vec![10];
    want.extend(84..=100);
    assert_eq!(kept, want);
    let stamped = run(&store, |tx| async move { lx::stamped_tx(&tx).await })
        .await
        .unwrap();
    assert_eq!(stamped.map(|s| s.size), Some(100));
}
