//! S3 records on the embedded store: versions newest first, the current
//! view, S3's delete semantics, and Object Lock enforced in the transaction
//! that would remove data.

use indexer::s3::{
    self as ix, BucketRecord, Deleted, LockMode, ObjectError, ObjectVersion, Retention, Versioning,
};
use indexer::schema;
use indexer::{run, EmbeddedStore, Transaction};
use protocol::{ErasureCode, EvidenceId};

fn store() -> (tempfile::TempDir, EmbeddedStore) {
    let dir = tempfile::tempdir().unwrap();
    let s = EmbeddedStore::open(&dir.path().join("index.redb")).unwrap();
    (dir, s)
}

fn version(ms: u64, null: bool) -> ObjectVersion {
    let id = EvidenceId::new(ms, [ms as u8; 10]);
    ObjectVersion {
        version_id: id,
        null_version: null,
        evidence: Some(id),
        size: ms,
        etag: format!("{ms:032x}"),
        last_modified_ms: ms,
        content_type: None,
        user_metadata: Vec::new(),
        retention: None,
        legal_hold: false,
        content: Default::default(),
    }
}

/// A bucket as [`bucket`] creates it, as a request would have found it.
fn seen() -> BucketRecord {
    BucketRecord {
        tenant: "court".into(),
        created_ms: 1,
        versioning: Versioning::Enabled,
        object_lock: false,
        default_retention: None,
    }
}

async fn bucket(s: &EmbeddedStore, name: &str, versioning: Versioning, lock: bool) {
    let rec = BucketRecord {
        tenant: "court".into(),
        created_ms: 1,
        versioning,
        object_lock: lock,
        default_retention: None,
    };
    run(s, |tx| {
        let rec = &rec;
        async move {
            ix::create_tenant_tx(&tx, "court", 1).await?;
            ix::create_bucket_tx(&tx, name, rec).await
        }
    })
    .await
    .unwrap();
}

async fn put(s: &EmbeddedStore, b: &str, k: &str, v: &ObjectVersion) -> Result<(), ObjectError> {
    run(s, |tx| async move {
        // The bucket as the upload began: as it is now.
        let seen = ix::get_bucket_tx(&tx, b)
            .await?
            .ok_or(ObjectError::NoSuchBucket)?;
        ix::put_version_tx(&tx, b, k, v, 10, &seen).await
    })
    .await
    .map(|_| ())
}

async fn listed(s: &EmbeddedStore, b: &str, prefix: &str, after: Option<&[u8]>) -> Vec<String> {
    run(s, |tx| async move {
        ix::list_current_tx(&tx, b, prefix, after, 100).await
    })
    .await
    .unwrap()
    .into_iter()
    .map(|(k, _)| k)
    .collect()
}

#[tokio::test]
async fn versions_read_newest_first_and_the_current_view_follows() {
    let (_d, s) = store();
    bucket(&s, "vers", Versioning::Enabled, true).await;
    let (old, new) = (version(100, false), version(200, false));
    put(&s, "vers", "a/x", &old).await.unwrap();
    put(&s, "vers", "a/x", &new).await.unwrap();
    put(&s, "vers", "b", &version(150, false)).await.unwrap();
    let all = run(&s, |tx| async move {
        ix::versions_tx(&tx, "vers", "a/x", 10).await
    })
    .await
    .unwrap();
    assert_eq!(all, vec![new.clone(), old.clone()]);
    // Version listings resume after a version, or after a whole key.
    let versions = |after: Option<(&'static str, Option<EvidenceId>)>| {
        let s = &s;
        async move {
            run(s, |tx| async move {
                ix::list_versions_tx(&tx, "vers", "", after, 10).await
            })
            .await
            .unwrap()
            .into_iter()
            .map(|(k, v)| (k, v.version_id))
            .collect::<Vec<_>>()
        }
    };
    let b_id = EvidenceId::new(150, [150; 10]);
    assert_eq!(
        versions(None).await,
        [
            ("a/x".into(), new.version_id),
            ("a/x".into(), old.version_id),
            ("b".into(), b_id)
        ]
    );
    assert_eq!(
        versions(Some(("a/x", Some(new.version_id)))).await,
        [("a/x".into(), old.version_id), ("b".into(), b_id)]
    );
    assert_eq!(versions(Some(("a/x", None))).await, [("b".into(), b_id)]);
    assert_eq!(listed(&s, "vers", "", None).await, ["a/x", "b"]);
    assert_eq!(listed(&s, "vers", "a/", None).await, ["a/x"]);
    assert_eq!(listed(&s, "vers", "", Some(b"a/x")).await, ["b"]);
    // Skipping a whole common prefix with 0xFF.
    assert_eq!(listed(&s, "vers", "", Some(b"a/\xff")).await, ["b"]);

    // A DELETE without version id adds a marker; nothing is removed.
    let marker = ObjectVersion {
        evidence: None,
        ..version(300, false)
    };
    let done = run(&s, |tx| {
        let marker = &marker;
        async move { ix::delete_current_tx(&tx, "vers", "a/x", marker, 10, false, &seen()).await }
    })
    .await
    .unwrap();
    assert!(matches!(done, Deleted::Marker(_)));
    assert_eq!(listed(&s, "vers", "", None).await, ["b"]);
    let newest = run(&s, |tx| async move {
        ix::get_version_tx(&tx, "vers", "a/x", None).await
    })
    .await
    .unwrap();
    assert!(newest.is_delete_marker());
    // Removing the marker brings the newest real version back.
    let mid = marker.version_id;
    run(&s, |tx| async move {
        ix::delete_version_tx(&tx, "vers", "a/x", mid, 10, false, &seen()).await
    })
    .await
    .unwrap();
    assert_eq!(listed(&s, "vers", "", None).await, ["a/x", "b"]);
}

#[tokio::test]
async fn an_unversioned_bucket_keeps_one_version_per_key() {
    let (_d, s) = store();
    bucket(&s, "plain", Versioning::Unversioned, false).await;
    put(&s, "plain", "k", &version(100, true)).await.unwrap();
    put(&s, "plain", "k", &version(200, true)).await.unwrap();
    let all = run(&s, |tx| async move {
        ix::versions_tx(&tx, "plain", "k", 10).await
    })
    .await
    .unwrap();
    assert_eq!(all, vec![version(200, true)]);
    // A version written as if versioning were on is refused (it changed
    // under an upload).
    assert!(put(&s, "plain", "k", &version(300, false)).await.is_err());
    let marker = ObjectVersion {
        evidence: None,
        ..version(400, true)
    };
    let done = run(&s, |tx| {
        let marker = &marker;
        async move { ix::delete_current_tx(&tx, "plain", "k", marker, 10, false, &seen()).await }
    })
    .await
    .unwrap();
    assert_eq!(done, Deleted::Removed);
    assert!(listed(&s, "plain", "", None).await.is_empty());
    // Empty now: the bucket can go, but only the one the caller saw (not
    // one deleted and created anew meanwhile, by another tenant say).
    let other = BucketRecord {
        tenant: "other".into(),
        ..seen()
    };
    let refused = run(&s, |tx| {
        let other = &other;
        async move { ix::delete_bucket_tx(&tx, "plain", other).await }
    })
    .await;
    assert!(
        matches!(refused, Err(ObjectError::NoSuchBucket)),
        "{refused:?}"
    );
    run(&s, |tx| async move {
        ix::delete_bucket_tx(&tx, "plain", &seen()).await
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn object_lock_is_enforced_in_the_transaction_that_removes_data() {
    let (_d, s) = store();
    bucket(&s, "lock", Versioning::Enabled, true).await;
    let far = 10_000;
    let mut c = version(100, false);
    c.retention = Some(Retention {
        mode: LockMode::Compliance,
        until_ms: far,
    });
    let mut g = version(200, false);
    g.retention = Some(Retention {
        mode: LockMode::Governance,
        until_ms: far,
    });
    let mut h = version(300, false);
    h.legal_hold = true;
    for (k, v) in [("c", &c), ("g", &g), ("h", &h)] {
        put(&s, "lock", k, v).await.unwrap();
    }
    let delete = |k: &'static str, id: EvidenceId, now: u64, bypass: bool| {
        let s = &s;
        async move {
            run(s, |tx| async move {
                ix::delete_version_tx(&tx, "lock", k, id, now, bypass, &seen()).await
            })
            .await
        }
    };
    // COMPLIANCE: nobody, bypass or not, until it expires.
    assert!(matches!(
        delete("c", c.version_id, 50, true).await,
        Err(ObjectError::Locked(_))
    ));
    // Nor shortened, nor weakened to GOVERNANCE.
    let shorten = |r: Retention, bypass: bool| {
        let s = &s;
        let id = c.version_id;
        async move {
            run(s, |tx| async move {
                ix::set_retention_tx(&tx, "lock", "c", id, Some(r), 50, bypass).await
            })
            .await
        }
    };
    assert!(shorten(
        Retention {
            mode: LockMode::Compliance,
            until_ms: far - 1
        },
        true
    )
    .await
    .is_err());
    assert!(shorten(
        Retention {
            mode: LockMode::Governance,
            until_ms: far + 1
        },
        true
    )
    .await
    .is_err());
    shorten(
        Retention {
            mode: LockMode::Compliance,
            until_ms: far + 1,
        },
        false,
    )
    .await
    .unwrap();
    // GOVERNANCE: only with bypass, also to harden it into COMPLIANCE
    // (which nobody could then undo); extended as it is, by anyone.
    let set_g = |mode: LockMode, until_ms: u64, bypass: bool| {
        let s = &s;
        let id = g.version_id;
        async move {
            run(s, |tx| async move {
                let r = Retention { mode, until_ms };
                ix::set_retention_tx(&tx, "lock", "g", id, Some(r), 50, bypass).await
            })
            .await
        }
    };
    assert!(matches!(
        set_g(LockMode::Compliance, far + 1, false).await,
        Err(ObjectError::Locked(_))
    ));
    set_g(LockMode::Governance, far + 1, false).await.unwrap();
    assert!(matches!(
        delete("g", g.version_id, 50, false).await,
        Err(ObjectError::Locked(_))
    ));
    delete("g", g.version_id, 50, true).await.unwrap();
    // Legal hold: nobody, until lifted.
    assert!(matches!(
        delete("h", h.version_id, 50, true).await,
        Err(ObjectError::Locked(_))
    ));
    let hid = h.version_id;
    run(&s, |tx| async move {
        ix::set_legal_hold_tx(&tx, "lock", "h", hid, false).await
    })
    .await
    .unwrap();
    delete("h", h.version_id, 50, false).await.unwrap();
    // After expiry the COMPLIANCE version may go, and the bucket is still
    // not empty until it does.
    assert!(matches!(
        run(&s, |tx| async move {
            ix::delete_bucket_tx(&tx, "lock", &seen()).await
        })
        .await,
        Err(ObjectError::BucketNotEmpty)
    ));
    delete("c", c.version_id, far + 2, false).await.unwrap();
}

#[tokio::test]
async fn buckets_and_keys_belong_to_tenants() {
    let (_d, s) = store();
    bucket(&s, "mine", Versioning::Unversioned, false).await;
    let theirs = BucketRecord {
        tenant: "other".into(),
        created_ms: 1,
        versioning: Versioning::Unversioned,
        object_lock: false,
        default_retention: None,
    };
    // Unknown tenants own nothing; a taken name is taken.
    let r = run(&s, |tx| {
        let theirs = &theirs;
        async move { ix::create_bucket_tx(&tx, "other-b", theirs).await }
    })
    .await;
    assert!(matches!(r, Err(ObjectError::NoSuchTenant)));
    run(&s, |tx| async move {
        ix::create_tenant_tx(&tx, "other", 1).await
    })
    .await
    .unwrap();
    let r = run(&s, |tx| {
        let theirs = &theirs;
        async move { ix::create_bucket_tx(&tx, "mine", theirs).await }
    })
    .await;
    assert!(matches!(r, Err(ObjectError::BucketExists { mine: false })));
    let listed = run(
        &s,
        |tx| async move { ix::list_buckets_tx(&tx, "court").await },
    )
    .await
    .unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].0, "mine");
    assert!(run(
        &s,
        |tx| async move { ix::list_buckets_tx(&tx, "other").await }
    )
    .await
    .unwrap()
    .is_empty());
}

/// Every S3 record the journal rebuilds (all but keys, uploads and the
/// journal itself), raw.
async fn s3_records(s: &EmbeddedStore) -> Vec<(Vec<u8>, Vec<u8>)> {
    use indexer::kv::Transaction;
    let rows = run(s, |tx| async move {
        tx.get_range(b"3", b"4", 100_000, false).await
    })
    .await
    .unwrap();
    rows.into_iter()
        .filter(|(k, _)| [&b"3t"[..], b"3b", b"3B", b"3v", b"3c"].contains(&&k[..2]))
        .collect()
}

/// Moves the journal out of `s` in batches of `batch`, as the gateway does.
async fn drained(s: &EmbeddedStore, batch: usize) -> Vec<ix::JournalEntry> {
    let mut out = Vec::new();
    loop {
        let got = run(s, |tx| async move { ix::journal_tx(&tx, batch).await })
            .await
            .unwrap();
        let Some(last) = got.last().cloned() else {
            return out;
        };
        run(s, |tx| {
            let last = &last;
            async move {
                ix::clear_journal_tx(&tx, last);
                Ok::<_, ObjectError>(())
            }
        })
        .await
        .unwrap();
        out.extend(got);
    }
}

async fn restored(
    entries: Vec<ix::JournalEntry>,
    exists: impl Fn(EvidenceId) -> bool,
) -> (tempfile::TempDir, EmbeddedStore, ix::Replayed) {
    let (d, s) = store();
    let replayed = ix::replay(entries, exists).unwrap();
    run(&s, |tx| {
        let records = &replayed.records;
        async move {
            ix::restore_records_tx(&tx, records);
            Ok::<_, ObjectError>(())
        }
    })
    .await
    .unwrap();
    (d, s, replayed)
}

#[tokio::test]
async fn the_journal_replays_into_the_same_records() {
    let (_d, s) = store();
    bucket(&s, "kept", Versioning::Enabled, true).await;
    bucket(&s, "gone", Versioning::Enabled, false).await;
    bucket(&s, "plain", Versioning::Unversioned, false).await;
    let (a, b, c) = (
        version(100, false),
        version(200, false),
        version(300, false),
    );
    put(&s, "kept", "case/1", &a).await.unwrap();
    put(&s, "kept", "case/1", &b).await.unwrap();
    put(&s, "kept", "case/2", &c).await.unwrap();
    // Retention and a hold on one version, a marker over another key.
    run(&s, |tx| async move {
        let r = Retention {
            mode: LockMode::Compliance,
            until_ms: 1 << 50,
        };
        ix::set_retention_tx(&tx, "kept", "case/1", a.version_id, Some(r), 10, false).await?;
        ix::set_legal_hold_tx(&tx, "kept", "case/1", b.version_id, true).await
    })
    .await
    .unwrap();
    let marker = ObjectVersion {
        evidence: None,
        ..version(400, false)
    };
    run(&s, |tx| {
        let marker = &marker;
        async move { ix::delete_current_tx(&tx, "kept", "case/2", marker, 10, false, &seen()).await }
    })
    .await
    .unwrap();
    // An unversioned key overwritten (the old null version removed), a
    // bucket emptied and deleted.
    put(&s, "plain", "k", &version(500, true)).await.unwrap();
    put(&s, "plain", "k", &version(600, true)).await.unwrap();
    let d = version(700, false);
    put(&s, "gone", "x", &d).await.unwrap();
    run(&s, |tx| async move {
        ix::delete_version_tx(&tx, "gone", "x", d.version_id, 10, false, &seen()).await?;
        ix::delete_bucket_tx(&tx, "gone", &seen()).await
    })
    .await
    .unwrap();

    let want = s3_records(&s).await;
    assert!(want.len() > 8, "{} records", want.len());
    // Drained in small batches, one batch archived twice (two gateways).
    let mut entries = drained(&s, 3).await;
    assert!(drained(&s, 3).await.is_empty(), "the journal is cleared");
    entries.extend(entries[..3].to_vec());
    entries.reverse();
    let (_d2, r, replayed) = restored(entries.clone(), |_| true).await;
    assert_eq!(s3_records(&r).await, want);
    assert_eq!((replayed.tenants, replayed.buckets), (1, 2));
    // a, b, c, the marker over c and the null version 600.
    assert_eq!(replayed.versions, 5);
    assert!(replayed.dropped.is_empty());
    // The held version's evidence is named, for recovery to keep it held.
    assert_eq!(replayed.held, [b.evidence.expect("evidence")]);

    // Merged as a gateway compacts its journal files (part of them, the
    // rest left as they are), the journal replays into the same records:
    // one entry per record in the merged part, clearing entries kept.
    let (merged, rest) = entries.split_at(entries.len() / 2);
    let mut compacted = ix::compact(merged.to_vec());
    assert!(
        compacted.len() < merged.len(),
        "repeats and overwrites merged"
    );
    let keys: std::collections::HashSet<&Vec<u8>> = compacted.iter().map(|e| &e.key).collect();
    assert_eq!(keys.len(), compacted.len(), "one entry per record");
    assert!(
        compacted.iter().any(|e| e.value.is_none()) || merged.iter().all(|e| e.value.is_some()),
        "a cleared record keeps its clearing entry"
    );
    compacted.extend(rest.iter().cloned());
    let (_dc, r, _) = restored(compacted.clone(), |_| true).await;
    assert_eq!(s3_records(&r).await, want);
    let (_dc2, r, _) = restored(ix::compact(compacted), |_| true).await;
    assert_eq!(s3_records(&r).await, want);

    // A version whose evidence was not recovered is dropped, and the
    // current view falls back to the one before it.
    let (_d3, r, replayed) = restored(entries.clone(), |id| id != b.version_id).await;
    assert_eq!(
        replayed.dropped,
        [("kept".to_owned(), "case/1".to_owned(), b.version_id)]
    );
    assert!(replayed.held.is_empty(), "a dropped version holds nothing");
    let current = run(&r, |tx| async move {
        ix::list_current_tx(&tx, "kept", "", None, 10).await
    })
    .await
    .unwrap();
    assert_eq!(current.len(), 1);
    assert_eq!(current[0].1.version_id, a.version_id);

    // After a recovery the index's versionstamps start again; the epoch
    // keeps its changes after the old ones.
    let (_d4, r, _) = restored(entries.clone(), |_| true).await;
    run(&r, |tx| async move {
        ix::set_journal_epoch_tx(&tx, 1);
        ix::delete_version_tx(&tx, "kept", "case/2", marker.version_id, 10, false, &seen()).await
    })
    .await
    .unwrap();
    let later = drained(&r, 100).await;
    assert!(later.iter().all(|e| e.epoch == 1), "{later:?}");
    assert!(later[0].stamp < entries.iter().map(|e| e.stamp).max().unwrap());
    let mut all = entries;
    all.extend(later);
    let (_d5, r2, _) = restored(all, |_| true).await;
    assert_eq!(s3_records(&r2).await, s3_records(&r).await);
    assert_eq!(
        listed(&r2, "kept", "", None).await,
        ["case/1", "case/2"],
        "the marker's removal survived a second recovery"
    );

    // A journal entry for anything else is refused.
    let forged = ix::JournalEntry {
        epoch: 0,
        stamp: [0; 10],
        key: b"3aAKIAEXAMPLE".to_vec(),
        value: Some(vec![1]),
    };
    assert!(matches!(
        ix::replay(vec![forged], |_| true),
        Err(ObjectError::Journal(_))
    ));
    // And a version key too short to name a bucket and a key is an error,
    // not a panic.
    for key in [
        &b"3v"[..],
        b"3vb\0",
        b"3v\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0",
        b"3vab\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0",
    ] {
        let short = ix::JournalEntry {
            epoch: 0,
            stamp: [0; 10],
            key: key.to_vec(),
            value: Some(vec![1]),
        };
        assert!(
            matches!(
                ix::replay(vec![short], |_| true),
                Err(ObjectError::Journal(_))
            ),
            "{key:?}"
        );
    }
}

#[tokio::test]
async fn an_index_from_before_the_journal_is_seeded_whole() {
    let (_d, s) = store();
    bucket(&s, "old", Versioning::Enabled, true).await;
    bucket(&s, "older", Versioning::Unversioned, false).await;
    for i in 0..7 {
        put(&s, "old", &format!("k{i}"), &version(100 + i, false))
            .await
            .unwrap();
    }
    put(&s, "older", "x", &version(90, true)).await.unwrap();
    // As if written before records were journaled.
    drained(&s, 1000).await;
    let seeded = |s: &EmbeddedStore| {
        let s = s.clone();
        async move {
            run(&s, |tx| async move { ix::journal_seeded_tx(&tx).await })
                .await
                .unwrap()
        }
    };
    assert!(!seeded(&s).await);
    let want = s3_records(&s).await;
    // Seeded in small steps, with a change between two of them.
    let mut after: Option<Vec<u8>> = None;
    let mut steps = 0;
    loop {
        let next = run(&s, |tx| {
            let after = after.clone();
            async move { ix::seed_journal_tx(&tx, after.as_deref(), 3).await }
        })
        .await
        .unwrap();
        steps += 1;
        if steps == 2 {
            put(&s, "old", "k0", &version(200, false)).await.unwrap();
        }
        match next {
            Some(k) => after = Some(k),
            None => break,
        }
    }
    assert!(steps >= 4, "{steps} steps");
    assert!(seeded(&s).await);
    let (_d2, r, replayed) = restored(drained(&s, 1000).await, |_| true).await;
    assert_ne!(s3_records(&s).await, want, "k0 changed meanwhile");
    assert_eq!(s3_records(&r).await, s3_records(&s).await);
    assert_eq!((replayed.buckets, replayed.versions), (2, 9));
}

/// Commits the manifest of the evidence version `v` names, as a filing
/// would, with the evidence's own retention and hold.
async fn commit_evidence_of(
    s: &EmbeddedStore,
    v: &ObjectVersion,
    retain_until_ms: Option<u64>,
    legal_hold: bool,
) {
    use protocol::{Blake3Hash, ManifestHeader, Sha256Hash};
    let evidence = v.evidence.unwrap();
    let header = ManifestHeader {
        evidence,
        tenant: "court".into(),
        case: None,
        blake3: Blake3Hash([v.size as u8; 32]),
        sha256: Sha256Hash([v.size as u8; 32]),
        size: v.size,
        media_type: None,
        file_name: None,
        submitter: None,
        filed_at_ms: v.last_modified_ms,
        code: ErasureCode::new(4, 2, 4096).unwrap(),
        stripes: 1,
        retain_until_ms,
        legal_hold,
    };
    run(s, |tx| {
        let header = &header;
        async move {
            schema::begin_intent_tx(&tx, evidence, "court", None, 10_000, 120_000).await?;
            schema::commit_manifest_tx(&tx, header).await
        }
    })
    .await
    .unwrap();
}

/// A legal hold or retention placed on the evidence (through the evidence
/// API, on the manifest) binds the S3 version that is that evidence: no
/// permanent delete of it while either holds, bypass or not.
#[tokio::test]
async fn holds_and_retention_on_the_evidence_bind_its_version() {
    let (_d, s) = store();
    bucket(&s, "evid", Versioning::Enabled, true).await;
    let v = version(400, false);
    put(&s, "evid", "k", &v).await.unwrap();
    let evidence = v.evidence.unwrap();
    commit_evidence_of(&s, &v, Some(5_000), true).await;
    let delete = |now: u64| {
        let s = &s;
        let id = v.version_id;
        async move {
            run(s, |tx| async move {
                ix::delete_version_tx(&tx, "evid", "k", id, now, true, &seen()).await
            })
            .await
        }
    };
    assert!(matches!(delete(50).await, Err(ObjectError::Locked(m)) if m.contains("legal hold")));
    run(&s, |tx| async move {
        schema::set_legal_hold_tx(&tx, evidence, false).await
    })
    .await
    .unwrap();
    assert!(matches!(delete(50).await, Err(ObjectError::Locked(m)) if m.contains("retained")));
    // Still there, and current.
    let current = run(&s, |tx| async move {
        ix::get_version_tx(&tx, "evid", "k", None).await
    })
    .await
    .unwrap();
    assert_eq!(current.version_id, v.version_id);
    // Once the retention has run out, the version may go.
    delete(5_001).await.unwrap();
}

/// A request checks its bucket before it runs and commits after (an upload
/// can take minutes): the commit goes only into the bucket it checked. A
/// bucket's uploads in progress go with it, so no later bucket of the same
/// name inherits them.
#[tokio::test]
async fn a_bucket_made_again_is_not_the_one_a_request_checked() {
    let (_d, s) = store();
    bucket(&s, "reused", Versioning::Enabled, false).await;
    let upload = EvidenceId::new(70, [7; 10]);
    let rec = ix::MultipartRecord {
        bucket: "reused".into(),
        key: "case/9".into(),
        tenant: "court".into(),
        created_ms: 2,
        version: version(70, false),
        default_retention: false,
    };
    run(&s, |tx| {
        let rec = &rec;
        async move { ix::create_multipart_tx(&tx, upload, rec, &seen()).await }
    })
    .await
    .unwrap();
    let delete_bucket = || {
        let s = &s;
        async move {
            run(s, |tx| async move {
                ix::delete_bucket_tx(&tx, "reused", &seen()).await
            })
            .await
        }
    };
    // Its uploads in progress go with it (their parts for the caller).
    delete_bucket().await.unwrap();
    let left = run(
        &s,
        |tx| async move { ix::get_multipart_tx(&tx, upload).await },
    )
    .await
    .unwrap();
    assert!(left.is_none(), "the upload went with its bucket");
    // An upload started for the old bucket finds none.
    let r = run(&s, |tx| {
        let rec = &rec;
        async move { ix::create_multipart_tx(&tx, upload, rec, &seen()).await }
    })
    .await;
    assert!(matches!(r, Err(ObjectError::NoSuchBucket)));

    // Another tenant takes the name; a put checked against the old bucket
    // finds no bucket, and leaves the new owner's empty.
    let theirs = BucketRecord {
        tenant: "other".into(),
        created_ms: 5,
        versioning: Versioning::Enabled,
        object_lock: false,
        default_retention: None,
    };
    run(&s, |tx| {
        let theirs = &theirs;
        async move {
            ix::create_tenant_tx(&tx, "other", 1).await?;
            ix::create_bucket_tx(&tx, "reused", theirs).await
        }
    })
    .await
    .unwrap();
    let v = version(80, false);
    let r = run(&s, |tx| {
        let v = &v;
        async move { ix::put_version_tx(&tx, "reused", "case/9", v, 10, &seen()).await }
    })
    .await;
    assert!(matches!(r, Err(ObjectError::NoSuchBucket)));
    let marker = version(90, false);
    let r =
        run(&s, |tx| {
            let marker = &marker;
            async move {
                ix::delete_current_tx(&tx, "reused", "case/9", marker, 10, false, &seen()).await
            }
        })
        .await;
    assert!(matches!(r, Err(ObjectError::NoSuchBucket)));
    let listed = run(&s, |tx| async move {
        ix::list_current_tx(&tx, "reused", "", None, 10).await
    })
    .await
    .unwrap();
    assert!(listed.is_empty());
}

async fn start_upload(s: &EmbeddedStore, b: &str, key: &str, tenant: &str, ms: u64) -> EvidenceId {
    let upload = EvidenceId::new(ms, [ms as u8; 10]);
    let rec = ix::MultipartRecord {
        bucket: b.into(),
        key: key.into(),
        tenant: tenant.into(),
        created_ms: ms,
        version: version(ms, false),
        default_retention: false,
    };
    let ours = ix::MultipartRecord {
        tenant: "court".into(),
        ..rec.clone()
    };
    run(s, |tx| {
        let ours = &ours;
        async move { ix::create_multipart_tx(&tx, upload, ours, &seen()).await }
    })
    .await
    .unwrap();
    if tenant != "court" {
        // Only as an index from before uploads went with their bucket
        // could hold it: written as its record ("3u", id) directly.
        run(s, |tx| {
            let rec = &rec;
            async move {
                let key = [&b"3u"[..], upload.as_bytes()].concat();
                tx.set(&key, &protocol::wire::encode_versioned(3, rec));
                Ok::<_, ObjectError>(())
            }
        })
        .await
        .unwrap();
    }
    upload
}

async fn uploads(
    s: &EmbeddedStore,
    b: &str,
    tenant: Option<&str>,
    prefix: &str,
    after: Option<ix::UploadMarker>,
    limit: usize,
) -> Vec<(String, EvidenceId)> {
    run(s, |tx| {
        let after = after.clone();
        async move { ix::list_multipart_tx(&tx, b, tenant, prefix, after.as_ref(), limit).await }
    })
    .await
    .unwrap()
    .into_iter()
    .map(|(id, r)| (r.key, id))
    .collect()
}

/// A bucket's uploads in progress are listed from an index of its own, in
/// S3's order (key, then upload id), paged by the markers, without reading
/// any other bucket's; uploads begun before that index are indexed once.
#[tokio::test]
async fn uploads_in_progress_are_listed_by_bucket() {
    let (_d, s) = store();
    bucket(&s, "mine", Versioning::Enabled, false).await;
    bucket(&s, "mine2", Versioning::Enabled, false).await;
    let b2 = start_upload(&s, "mine", "b", "court", 30).await;
    let a = start_upload(&s, "mine", "a", "court", 40).await;
    let b1 = start_upload(&s, "mine", "b", "court", 20).await;
    let ab = start_upload(&s, "mine", "a/b", "court", 10).await;
    let elsewhere = start_upload(&s, "mine2", "a", "court", 50).await;
    // Left under this name by another tenant before uploads went with
    // their bucket.
    let foreign = start_upload(&s, "mine", "c", "other", 60).await;
    let all = uploads(&s, "mine", None, "", None, 100).await;
    let named = |v: &[(&str, EvidenceId)]| -> Vec<(String, EvidenceId)> {
        v.iter().map(|(k, id)| (k.to_string(), *id)).collect()
    };
    assert_eq!(
        all,
        named(&[("a", a), ("a/b", ab), ("b", b1), ("b", b2), ("c", foreign)])
    );
    let mine = uploads(&s, "mine", Some("court"), "", None, 100).await;
    assert_eq!(mine, all[..4]);
    assert_eq!(
        uploads(&s, "mine", Some("court"), "", None, 2).await,
        all[..2]
    );
    assert_eq!(uploads(&s, "mine", None, "a", None, 100).await, all[..2]);
    assert_eq!(uploads(&s, "mine", None, "a/", None, 100).await, all[1..2]);
    let marker = |key: &str, upload: Option<EvidenceId>| {
        Some(ix::UploadMarker {
            key: key.into(),
            upload,
            past_prefix: false,
        })
    };
    // A key marker alone passes every upload of that key; with an upload
    // id, only those up to it.
    assert_eq!(
        uploads(&s, "mine", None, "", marker("b", None), 100).await,
        all[4..]
    );
    assert_eq!(
        uploads(&s, "mine", None, "", marker("a", None), 100).await,
        all[1..]
    );
    assert_eq!(
        uploads(&s, "mine", None, "", marker("b", Some(b1)), 100).await,
        all[3..]
    );
    assert_eq!(
        uploads(&s, "mine", None, "b", marker("a", None), 100).await,
        all[2..4]
    );
    assert!(uploads(&s, "mine", None, "a", marker("b", None), 100)
        .await
        .is_empty());
    // A common prefix as the marker passes every key under it.
    let past = |key: &str| {
        Some(ix::UploadMarker {
            key: key.into(),
            upload: None,
            past_prefix: true,
        })
    };
    assert_eq!(
        uploads(&s, "mine", None, "", past("a/"), 100).await,
        all[2..]
    );
    assert_eq!(
        uploads(&s, "mine", None, "", past("a"), 100).await,
        all[2..]
    );
    assert_eq!(
        uploads(&s, "mine", None, "", past("b"), 100).await,
        all[4..]
    );
    assert_eq!(
        uploads(&s, "mine2", None, "", None, 100).await,
        named(&[("a", elsewhere)])
    );
    // An ended upload leaves the listing.
    run(&s, |tx| async move { ix::end_multipart_tx(&tx, b1).await })
        .await
        .unwrap();
    assert_eq!(
        uploads(&s, "mine", Some("court"), "", None, 100).await,
        named(&[("a", a), ("a/b", ab), ("b", b2)])
    );

    // An index from before: the uploads' records only, no "3U" entries.
    run(&s, |tx| async move {
        tx.clear_range(b"3U", b"3V");
        Ok::<_, ObjectError>(())
    })
    .await
    .unwrap();
    assert!(uploads(&s, "mine", None, "", None, 100).await.is_empty());
    let mut after = None;
    let mut steps = 0;
    loop {
        after = run(&s, |tx| async move {
            ix::index_bucket_uploads_tx(&tx, after, 2).await
        })
        .await
        .unwrap();
        steps += 1;
        if after.is_none() {
            break;
        }
    }
    assert!(steps >= 3, "{steps} steps");
    assert_eq!(
        uploads(&s, "mine", None, "", None, 100).await,
        named(&[("a", a), ("a/b", ab), ("b", b2), ("c", foreign)])
    );
    assert_eq!(uploads(&s, "mine2", None, "", None, 100).await.len(), 1);
    // Once done, never again: an entry cleared now stays cleared.
    run(&s, |tx| async move {
        tx.clear_range(b"3U", b"3V");
        ix::index_bucket_uploads_tx(&tx, None, 2).await
    })
    .await
    .unwrap();
    assert!(uploads(&s, "mine", None, "", None, 100).await.is_empty());
}

#[tokio::test]
async fn a_completed_upload_is_remembered_a_while_and_completes_once() {
    let (_d, s) = store();
    bucket(&s, "mine", Versioning::Enabled, false).await;
    let first = start_upload(&s, "mine", "a", "court", 1_000).await;
    let second = start_upload(&s, "mine", "b", "court", 2_000).await;
    let done = |upload: EvidenceId, ms: u64| ix::CompletedUpload {
        tenant: "court".into(),
        bucket: "mine".into(),
        key: "a".into(),
        etag: format!("{ms:032x}-1"),
        version_id: upload,
        null_version: false,
        completed_ms: ms,
    };
    for (upload, ms) in [(first, 10_000), (second, 20_000)] {
        let d = done(upload, ms);
        run(&s, |tx| {
            let d = &d;
            async move { ix::complete_multipart_tx(&tx, upload, d).await }
        })
        .await
        .unwrap();
    }
    // Completed once: a second completion finds no upload, and the upload
    // is gone from the listing; its answer is kept.
    let d = done(first, 11_000);
    let again = run(&s, |tx| {
        let d = &d;
        async move { ix::complete_multipart_tx(&tx, first, d).await }
    })
    .await;
    assert!(matches!(again, Err(ObjectError::NoSuchUpload)), "{again:?}");
    assert!(uploads(&s, "mine", None, "", None, 100).await.is_empty());
    let kept = |upload: EvidenceId| {
        let s = s.clone();
        async move {
            run(&s, |tx| async move {
                ix::completed_upload_tx(&tx, upload).await
            })
            .await
            .unwrap()
        }
    };
    assert_eq!(kept(first).await, Some(done(first, 10_000)));
    // Expired oldest first, only those completed before the cut.
    let expired = run(&s, |tx| async move {
        ix::expire_completed_tx(&tx, 15_000, 100).await
    })
    .await
    .unwrap();
    assert_eq!(expired, 1);
    assert_eq!(kept(first).await, None);
    assert_eq!(kept(second).await, Some(done(second, 20_000)));
    let expired = run(&s, |tx| async move {
        ix::expire_completed_tx(&tx, 15_000, 100).await
    })
    .await
    .unwrap();
    assert_eq!(expired, 0);
}

#[tokio::test]
async fn multipart_records_from_before_default_retention_still_read() {
    // The version as it was then, before its content headers.
    #[derive(serde::Serialize)]
    struct VersionThen {
        version_id: EvidenceId,
        null_version: bool,
        evidence: Option<EvidenceId>,
        size: u64,
        etag: String,
        last_modified_ms: u64,
        content_type: Option<String>,
        user_metadata: Vec<(String, String)>,
        retention: Option<ix::Retention>,
        legal_hold: bool,
    }
    #[derive(serde::Serialize)]
    struct Before {
        bucket: String,
        key: String,
        tenant: String,
        created_ms: u64,
        version: VersionThen,
    }
    let (_d, s) = store();
    let upload = EvidenceId::new(80, [8; 10]);
    let v = version(80, false);
    let old = Before {
        bucket: "mine".into(),
        key: "k".into(),
        tenant: "court".into(),
        created_ms: 80,
        version: VersionThen {
            version_id: v.version_id,
            null_version: v.null_version,
            evidence: v.evidence,
            size: v.size,
            etag: v.etag.clone(),
            last_modified_ms: v.last_modified_ms,
            content_type: v.content_type.clone(),
            user_metadata: v.user_metadata.clone(),
            retention: v.retention,
            legal_hold: v.legal_hold,
        },
    };
    run(&s, |tx| {
        let old = &old;
        async move {
            let key = [&b"3u"[..], upload.as_bytes()].concat();
            tx.set(&key, &protocol::wire::encode_versioned(1, old));
            Ok::<_, ObjectError>(())
        }
    })
    .await
    .unwrap();
    let rec = run(
        &s,
        |tx| async move { ix::get_multipart_tx(&tx, upload).await },
    )
    .await
    .unwrap()
    .unwrap();
    // Its retention stays as it was taken when the upload began.
    assert_eq!(
        (rec.version, rec.default_retention),
        (version(80, false), false)
    );
}

/// Versions locked through S3 by an older gateway (a hold or a COMPLIANCE
/// date on the version record only) are found, once, for their evidence
/// to be bound (which the gateway does, with a ledger statement); an index
/// whose holds were carried by the upgrade before (with no statement) has
/// its held versions stated; once done, nothing is looked at again.
#[tokio::test]
async fn locks_on_versions_only_are_found_for_their_evidence() {
    let (_d, s) = store();
    bucket(&s, "old", Versioning::Enabled, true).await;
    let compliance = |until_ms| {
        Some(Retention {
            mode: LockMode::Compliance,
            until_ms,
        })
    };
    let held = ObjectVersion {
        legal_hold: true,
        ..version(500, false)
    };
    let dated = ObjectVersion {
        retention: compliance(9_000_000),
        ..version(600, false)
    };
    // Its evidence's own retention runs longer already: nothing to do.
    let covered = ObjectVersion {
        retention: compliance(700),
        ..version(700, false)
    };
    // Its date is past (the clock is at 100 here): it binds nothing.
    let past = ObjectVersion {
        retention: compliance(50),
        ..version(800, false)
    };
    for (k, v, retain) in [
        ("h", &held, None),
        ("d", &dated, None),
        ("c", &covered, Some(800)),
        ("p", &past, None),
    ] {
        put(&s, "old", k, v).await.unwrap();
        commit_evidence_of(&s, v, retain, false).await;
    }
    let find = || {
        let s = &s;
        async move {
            let (mut after, mut found, mut rounds) = (None, Vec::new(), 0);
            loop {
                let (next, page) = run(s, |tx| {
                    let after = after.clone();
                    async move { ix::locks_to_carry_tx(&tx, after, 1, 100).await }
                })
                .await
                .unwrap();
                found.extend(page);
                rounds += 1;
                match next {
                    Some(k) => after = Some(k),
                    None => return (found, rounds),
                }
            }
        }
    };
    let (mut found, _) = find().await;
    found.sort_by_key(|l| l.evidence);
    let lock = |v: &ObjectVersion, until, hold, restate_hold| ix::LockToCarry {
        evidence: v.evidence.unwrap(),
        compliance_until_ms: until,
        hold,
        restate_hold,
    };
    assert_eq!(
        found,
        vec![
            lock(&held, None, true, false),
            lock(&dated, Some(9_000_000), false, false)
        ]
    );
    // Bound as the gateway binds them: then the evidence refuses removal,
    // and nothing is left to find.
    let (h, d) = (held.evidence.unwrap(), dated.evidence.unwrap());
    run(&s, |tx| async move {
        schema::set_legal_hold_tx(&tx, h, true).await?;
        schema::extend_retention_tx(&tx, d, 9_000_000).await
    })
    .await
    .unwrap();
    let delete = run(&s, |tx| async move {
        ix::delete_version_tx(&tx, "old", "h", held.version_id, 50, true, &seen()).await
    })
    .await;
    assert!(matches!(delete, Err(ObjectError::Locked(m)) if m.contains("legal hold")));
    assert_eq!(find().await.0, vec![]);
    // Holds carried by the earlier upgrade, which stated none: stated now
    // (as the earlier upgrade marked it, by hand).
    run(&s, |tx| async move {
        tx.set(b"3h", b"");
        Ok::<_, ObjectError>(())
    })
    .await
    .unwrap();
    assert_eq!(find().await.0, vec![lock(&held, None, false, true)]);
    // An index rebuilt from the ledger: its holds are stated there.
    run(&s, |tx| async move {
        ix::set_holds_carried_tx(&tx);
        Ok::<_, ObjectError>(())
    })
    .await
    .unwrap();
    assert_eq!(find().await.0, vec![]);
    // Done once: the next start looks at nothing.
    run(&s, |tx| async move {
        ix::set_locks_carried_tx(&tx);
        Ok::<_, ObjectError>(())
    })
    .await
    .unwrap();
    assert_eq!(find().await, (vec![], 1));
}

/// Files a part of `upload` under a new part id (its intent begun and
/// ended as ingest does); returns the id and the part it replaced.
async fn put_part(
    s: &EmbeddedStore,
    upload: EvidenceId,
    number: u32,
    seed: u8,
) -> Result<(EvidenceId, Option<ix::PartRecord>), ObjectError> {
    put_part_at(s, upload, number, seed, 50_000).await
}

/// [`put_part`], stored at `uploaded_ms`.
async fn put_part_at(
    s: &EmbeddedStore,
    upload: EvidenceId,
    number: u32,
    seed: u8,
    uploaded_ms: u64,
) -> Result<(EvidenceId, Option<ix::PartRecord>), ObjectError> {
    let part_id = EvidenceId::new(50_000 + u64::from(seed), [seed; 10]);
    let part = ix::PartRecord {
        part_id,
        size: 5,
        md5: String::new(),
        blake3: [seed; 32],
        sha256: [seed; 32],
        code: ErasureCode::new(4, 2, 4096).unwrap(),
        stripes: 1,
        uploaded_ms,
        copied_from: None,
    };
    run(s, |tx| {
        let part = &part;
        async move {
            schema::begin_intent_tx(&tx, part_id, "court", None, 100_000, 120_000).await?;
            ix::put_part_tx(&tx, upload, number, part).await
        }
    })
    .await
    .map(|old| (part_id, old))
}

async fn queued_for_deletion(s: &EmbeddedStore) -> std::collections::BTreeSet<EvidenceId> {
    run(s, |tx| async move {
        ix::parts_to_delete_tx(&tx, None, 100).await
    })
    .await
    .unwrap()
    .into_iter()
    .collect()
}

#[tokio::test]
async fn no_part_outlives_its_upload_and_stale_uploads_are_found() {
    let (_d, s) = store();
    bucket(&s, "mine", Versioning::Enabled, false).await;
    let done = start_upload(&s, "mine", "a", "court", 1_000).await;
    let stale = start_upload(&s, "mine", "b", "court", 2_000).await;
    let fresh = start_upload(&s, "mine", "c", "court", 9_000).await;
    // A part uploaded again: the one it replaces is queued at once.
    let (first, _) = put_part(&s, done, 1, 1).await.unwrap();
    let (again, replaced) = put_part(&s, done, 1, 2).await.unwrap();
    assert_eq!(replaced.map(|p| p.part_id), Some(first));
    assert_eq!(queued_for_deletion(&s).await, [first].into());
    // Completed: every part it has is queued, including one a Complete
    // that listed only part 1 did not know of.
    let (late, _) = put_part(&s, done, 2, 3).await.unwrap();
    let d = ix::CompletedUpload {
        tenant: "court".into(),
        bucket: "mine".into(),
        key: "a".into(),
        etag: "x-1".into(),
        version_id: done,
        null_version: false,
        completed_ms: 10_000,
    };
    run(&s, |tx| {
        let d = &d;
        async move { ix::complete_multipart_tx(&tx, done, d).await }
    })
    .await
    .unwrap();
    assert_eq!(queued_for_deletion(&s).await, [first, again, late].into());
    // An Abort that comes after the Complete committed is told so.
    let abort = run(
        &s,
        |tx| async move { ix::abort_multipart_tx(&tx, done).await },
    )
    .await;
    assert!(matches!(abort, Err(ObjectError::NoSuchUpload)), "{abort:?}");
    // A part filed after its upload ended is refused (its shards are the
    // intent collector's).
    let after = put_part(&s, done, 3, 4).await;
    assert!(matches!(after, Err(ObjectError::NoSuchUpload)), "{after:?}");
    // Deleted parts leave the queue.
    run(&s, |tx| async move {
        ix::part_deleted_tx(&tx, first);
        Ok::<_, ObjectError>(())
    })
    .await
    .unwrap();
    assert_eq!(queued_for_deletion(&s).await, [again, late].into());
    // Paged in id order.
    let first_page = run(&s, |tx| async move {
        ix::parts_to_delete_tx(&tx, None, 1).await
    })
    .await
    .unwrap();
    let rest = run(&s, |tx| {
        let after = first_page[0];
        async move { ix::parts_to_delete_tx(&tx, Some(after), 10).await }
    })
    .await
    .unwrap();
    let mut both = [again, late];
    both.sort();
    assert_eq!((first_page, rest), (vec![both[0]], vec![both[1]]));
    // Uploads begun before the cut and idle since are stale, the others
    // not: one begun as early whose part came after the cut, or whose
    // Complete began after it, is alive.
    let (kept, _) = put_part_at(&s, stale, 1, 5, 1_500).await.unwrap();
    let busy = start_upload(&s, "mine", "d", "court", 2_500).await;
    put_part_at(&s, busy, 1, 6, 6_000).await.unwrap();
    let completing = start_upload(&s, "mine", "e", "court", 2_600).await;
    run(&s, |tx| async move {
        ix::touch_upload_tx(&tx, completing, 7_000);
        Ok::<_, ObjectError>(())
    })
    .await
    .unwrap();
    let stale_at = |cut: u64, after: Option<EvidenceId>, limit: usize| {
        let s = s.clone();
        async move {
            run(&s, |tx| async move {
                ix::stale_uploads_tx(&tx, after, cut, limit).await
            })
            .await
            .unwrap()
        }
    };
    assert_eq!(stale_at(5_000, None, 100).await, (vec![stale], None));
    // Paged: the walk goes on past a page of live uploads, and stops at
    // the first begun after the cut.
    let (page, next) = stale_at(5_500, None, 1).await;
    assert_eq!((page, next), (vec![stale], Some(stale)));
    let (page, next) = stale_at(5_500, next, 1).await;
    assert_eq!((page, next), (vec![], Some(busy)));
    let (page, next) = stale_at(5_500, next, 1).await;
    assert_eq!((page, next), (vec![], Some(completing)));
    assert_eq!(stale_at(5_500, next, 1).await, (vec![], None));
    assert_eq!(stale_at(5_500, None, 100).await, (vec![stale], None));
    let parts = run(
        &s,
        |tx| async move { ix::abort_multipart_tx(&tx, stale).await },
    )
    .await
    .unwrap();
    assert_eq!(parts.iter().map(|p| p.part_id).collect::<Vec<_>>(), [kept]);
    assert!(queued_for_deletion(&s).await.contains(&kept));
    assert_eq!(stale_at(5_000, None, 100).await, (vec![], None));
    assert_eq!(
        stale_at(10_000, None, 100).await,
        (vec![busy, completing, fresh], None)
    );
    // A sign of life after the listing: the expiry, which reads it again,
    // lets the upload be; the others go, once; a Complete's touch finds a
    // gone upload gone, and leaves no sign of life behind it.
    run(&s, |tx| async move {
        ix::touch_open_upload_tx(&tx, busy, 10_500).await
    })
    .await
    .unwrap();
    let expire = |upload: EvidenceId| {
        let s = s.clone();
        async move {
            run(&s, |tx| async move {
                ix::expire_upload_tx(&tx, upload, 10_000).await
            })
            .await
        }
    };
    assert!(matches!(expire(busy).await, Ok(None)));
    assert!(matches!(expire(fresh).await, Ok(Some(_))));
    assert!(matches!(
        expire(fresh).await,
        Err(ObjectError::NoSuchUpload)
    ));
    let touched = run(&s, |tx| async move {
        ix::touch_open_upload_tx(&tx, fresh, 11_000).await
    })
    .await;
    assert!(
        matches!(touched, Err(ObjectError::NoSuchUpload)),
        "{touched:?}"
    );
    assert_eq!(
        stale_at(20_000, None, 100).await,
        (vec![busy, completing], None)
    );
}

/// A bucket with many uploads of many parts in progress is deleted one
/// upload per transaction: all of them in the one transaction passed the
/// 10 MB limit (every part queued for deletion), for good.
#[tokio::test]
async fn a_bucket_with_many_large_uploads_in_progress_can_be_deleted() {
    let (_d, s) = store();
    bucket(&s, "busy", Versioning::Enabled, false).await;
    let (uploads, parts) = (20u64, 10_000u32);
    for u in 0..uploads {
        let upload = start_upload(&s, "busy", &format!("k{u}"), "court", 1_000 + u).await;
        for first in (1..=parts).step_by(2_000) {
            run(&s, |tx| async move {
                for n in first..first + 2_000 {
                    let part_id = EvidenceId::new(1_000_000 + u * 100_000 + u64::from(n), [7; 10]);
                    schema::begin_intent_tx(&tx, part_id, "court", None, 100_000, 120_000).await?;
                    let part = ix::PartRecord {
                        part_id,
                        size: 5 << 20,
                        md5: String::new(),
                        blake3: [1; 32],
                        sha256: [1; 32],
                        code: ErasureCode::new(4, 2, 4096).unwrap(),
                        stripes: 1,
                        uploaded_ms: 1_000,
                        copied_from: None,
                    };
                    ix::put_part_tx(&tx, upload, n, &part).await?;
                }
                Ok::<_, ObjectError>(())
            })
            .await
            .unwrap();
        }
    }
    // All at once: too large, whatever the retries.
    let at_once = run(&s, |tx| async move {
        ix::delete_bucket_tx(&tx, "busy", &seen()).await
    })
    .await;
    assert!(
        at_once.is_err(),
        "{} uploads ended in one transaction",
        uploads
    );
    // An upload a transaction, then the bucket.
    let mut ended = 0;
    while let Some(gone) = run(&s, |tx| async move {
        ix::end_an_upload_of_bucket_tx(&tx, "busy", &seen()).await
    })
    .await
    .unwrap()
    {
        assert_eq!(gone.len(), parts as usize, "an upload's parts are returned");
        ended += 1;
    }
    assert_eq!(ended, uploads);
    let left = run(&s, |tx| async move {
        ix::delete_bucket_tx(&tx, "busy", &seen()).await
    })
    .await
    .unwrap();
    assert!(left.is_empty());
    // A bucket with a version is not touched: its uploads stay.
    bucket(&s, "full", Versioning::Enabled, false).await;
    put(&s, "full", "obj", &version(5_000, false))
        .await
        .unwrap();
    start_upload(&s, "full", "k", "court", 6_000).await;
    let r = run(&s, |tx| async move {
        ix::end_an_upload_of_bucket_tx(&tx, "full", &seen()).await
    })
    .await;
    assert!(matches!(r, Err(ObjectError::BucketNotEmpty)), "{r:?}");
}

/// The version committed last is the current one, whatever the clock that
/// minted its id (a gateway's clock stepped back, another gateway's behind,
/// a request begun before one that committed first): a PUT or DELETE that
/// succeeds always changes what a GET returns, and the id it was given is
/// the one stored.
#[tokio::test]
async fn the_version_committed_last_is_current_whatever_its_ids_clock() {
    let (_d, s) = store();
    bucket(&s, "late", Versioning::Enabled, false).await;
    put(&s, "late", "k", &version(2_000, false)).await.unwrap();
    // Minted a second earlier, committed later.
    let behind = version(1_000, false);
    let stored = run(&s, |tx| {
        let behind = &behind;
        async move { ix::put_version_tx(&tx, "late", "k", behind, 10, &seen()).await }
    })
    .await
    .unwrap()
    .0;
    assert!(stored.version_id > EvidenceId::new(2_000, [208; 10]));
    assert_eq!(stored.evidence, behind.evidence, "the evidence is the same");
    let current = run(&s, |tx| async move {
        ix::get_version_tx(&tx, "late", "k", None).await
    })
    .await
    .unwrap();
    assert_eq!(current, stored, "the later commit is not current");
    let by_id = run(&s, |tx| async move {
        ix::get_version_tx(&tx, "late", "k", Some(stored.version_id)).await
    })
    .await
    .unwrap();
    assert_eq!(by_id, stored, "not found by the id it was given");
    // A delete marker minted earlier still hides the object.
    let mut marker = version(500, false);
    marker.evidence = None;
    let deleted = run(&s, |tx| {
        let marker = &marker;
        async move { ix::delete_current_tx(&tx, "late", "k", marker, 10, false, &seen()).await }
    })
    .await
    .unwrap();
    let ix::Deleted::Marker(m) = deleted else {
        panic!("no marker: {deleted:?}");
    };
    assert!(m.version_id > stored.version_id);
    assert!(
        listed(&s, "late", "", None).await.is_empty(),
        "the marker hides nothing"
    );
}

/// A stored part is found by its id (what repair needs to rebuild it, with
/// no manifest) while its upload records it, and not once it is replaced
/// or its upload ends. A part copied from evidence (UploadPartCopy) is
/// dropped by that evidence's expunge, in the expunge's transaction: out
/// of its upload, and queued for deletion.
#[tokio::test]
async fn parts_are_found_by_id_and_an_expunge_drops_those_copied_from_it() {
    let (_d, s) = store();
    bucket(&s, "mine", Versioning::Enabled, false).await;
    let upload = start_upload(&s, "mine", "a", "court", 1_000).await;
    let (first, _) = put_part(&s, upload, 1, 1).await.unwrap();
    let live = |id| {
        let s = &s;
        async move {
            run(s, |tx| async move { ix::live_part_tx(&tx, id).await })
                .await
                .unwrap()
        }
    };
    let found = live(first).await.expect("the part is found by its id");
    assert_eq!((found.upload, found.number), (upload, 1));
    assert_eq!(found.header.evidence, first);
    assert_eq!(found.header.tenant, "court");
    // Replaced by another upload of its number: no longer the upload's.
    let (second, _) = put_part(&s, upload, 1, 2).await.unwrap();
    assert_eq!(live(first).await, None);
    assert!(live(second).await.is_some());

    // Evidence, and a part copied from it.
    let source = EvidenceId::new(77, [7; 10]);
    let header = protocol::ManifestHeader {
        evidence: source,
        tenant: "court".into(),
        case: None,
        blake3: protocol::Blake3Hash([7; 32]),
        sha256: protocol::Sha256Hash([7; 32]),
        size: 5,
        media_type: None,
        file_name: None,
        submitter: None,
        filed_at_ms: 77,
        code: ErasureCode::new(4, 2, 4096).unwrap(),
        stripes: 1,
        retain_until_ms: None,
        legal_hold: false,
    };
    run(&s, |tx| {
        let header = &header;
        async move {
            schema::begin_intent_tx(&tx, source, "court", None, 100_000, 120_000).await?;
            schema::commit_manifest_tx(&tx, header).await
        }
    })
    .await
    .unwrap();
    let copy = EvidenceId::new(60_000, [9; 10]);
    let part = ix::PartRecord {
        part_id: copy,
        size: 5,
        md5: String::new(),
        blake3: [7; 32],
        sha256: [7; 32],
        code: ErasureCode::new(4, 2, 4096).unwrap(),
        stripes: 1,
        uploaded_ms: 60_000,
        copied_from: Some(source),
    };
    run(&s, |tx| {
        let part = &part;
        async move {
            schema::begin_intent_tx(&tx, copy, "court", None, 100_000, 120_000).await?;
            ix::put_part_tx(&tx, upload, 2, part).await
        }
    })
    .await
    .unwrap();
    assert!(live(copy).await.is_some());
    run(&s, |tx| async move {
        schema::expunge_tx(&tx, source, 100_000).await
    })
    .await
    .unwrap();
    assert_eq!(live(copy).await, None, "the copy left its upload");
    let parts = run(&s, |tx| async move { ix::parts_tx(&tx, upload).await })
        .await
        .unwrap();
    assert_eq!(
        parts
            .iter()
            .map(|(n, p)| (*n, p.part_id))
            .collect::<Vec<_>>(),
        [(1, second)],
        "the upload lists only the part not copied from expunged evidence"
    );
    assert!(queued_for_deletion(&s).await.contains(&copy));
    // The upload ends: its part is no longer found.
    run(
        &s,
        |tx| async move { ix::abort_multipart_tx(&tx, upload).await },
    )
    .await
    .unwrap();
    assert_eq!(live(second).await, None);
}

/// Parts copied from one object are dropped a page at a time: any number
/// of uploads may copy it, more than one transaction could drop.
#[tokio::test]
async fn parts_copied_from_an_object_are_dropped_a_page_at_a_time() {
    let (_d, s) = store();
    bucket(&s, "mine", Versioning::Enabled, false).await;
    let upload = start_upload(&s, "mine", "a", "court", 1_000).await;
    let source = EvidenceId::new(77, [7; 10]);
    for n in 0..3u64 {
        let copy = EvidenceId::new(60_000 + n, [9; 10]);
        let part = ix::PartRecord {
            part_id: copy,
            size: 5,
            md5: String::new(),
            blake3: [7; 32],
            sha256: [7; 32],
            code: ErasureCode::new(4, 2, 4096).unwrap(),
            stripes: 1,
            uploaded_ms: 60_000,
            copied_from: Some(source),
        };
        run(&s, |tx| {
            let part = &part;
            async move {
                schema::begin_intent_tx(&tx, copy, "court", None, 100_000, 120_000).await?;
                ix::put_part_tx(&tx, upload, 2 + n as u32, part).await
            }
        })
        .await
        .unwrap();
    }
    let drop_two = || {
        let s = &s;
        async move {
            run(s, |tx| async move {
                ix::drop_parts_copied_from_tx(&tx, source, 2).await
            })
            .await
            .unwrap()
        }
    };
    assert_eq!(drop_two().await, (2, true));
    assert_eq!(drop_two().await, (1, false));
    assert_eq!(drop_two().await, (0, false));
    let parts = run(&s, |tx| async move { ix::parts_tx(&tx, upload).await })
        .await
        .unwrap();
    assert!(parts.is_empty(), "{parts:?}");
    assert_eq!(queued_for_deletion(&s).await.len(), 3);
}

/// A key's "null" version is found under any number of versions written
/// since versioning was enabled (S3 keeps exactly one): read by
/// `?versionId=null`, and replaced, not doubled, by a write once
/// versioning is suspended.
#[tokio::test]
async fn the_null_version_is_found_under_any_number_of_versions() {
    let (_d, s) = store();
    bucket(&s, "deep", Versioning::Unversioned, false).await;
    let set = |versioning: Versioning| {
        let s = &s;
        async move {
            run(s, |tx| async move {
                let mut b = ix::get_bucket_tx(&tx, "deep").await?.expect("bucket");
                b.versioning = versioning;
                ix::put_bucket_tx(&tx, "deep", &b).await
            })
            .await
            .unwrap()
        }
    };
    put(&s, "deep", "k", &version(1, true)).await.unwrap();
    set(Versioning::Enabled).await;
    let newer = 10_050u64;
    for chunk in (2..2 + newer).collect::<Vec<_>>().chunks(1_000) {
        run(&s, |tx| async move {
            for &ms in chunk {
                ix::put_version_tx(&tx, "deep", "k", &version(ms, false), 10, &seen()).await?;
            }
            Ok::<_, ObjectError>(())
        })
        .await
        .unwrap();
    }
    let null = run(&s, |tx| async move {
        ix::null_version_tx(&tx, "deep", "k").await
    })
    .await
    .unwrap();
    assert_eq!(null.map(|v| v.size), Some(1), "the null version is found");
    set(Versioning::Suspended).await;
    run(&s, |tx| async move {
        let mut seen = seen();
        seen.versioning = Versioning::Suspended;
        ix::put_version_tx(&tx, "deep", "k", &version(20_000, true), 10, &seen).await
    })
    .await
    .unwrap();
    let nulls = run(&s, |tx| async move {
        let all = ix::versions_tx(&tx, "deep", "k", 20_000).await?;
        Ok::<_, ObjectError>(all.into_iter().filter(|v| v.null_version).count())
    })
    .await
    .unwrap();
    assert_eq!(nulls, 1, "the old null version was replaced");
}

/// A version decided by the bucket as the upload began (no retention, no
/// default then) is not stored under a bucket whose Object Lock changed
/// meanwhile: the default set since would not bind it.
#[tokio::test]
async fn a_version_is_not_stored_under_a_lock_configuration_it_did_not_see() {
    let (_d, s) = store();
    bucket(&s, "late", Versioning::Enabled, false).await;
    let before = run(&s, |tx| async move { ix::get_bucket_tx(&tx, "late").await })
        .await
        .unwrap()
        .unwrap();
    let mut now = before.clone();
    now.object_lock = true;
    now.default_retention = Some(ix::DefaultRetention {
        mode: LockMode::Compliance,
        period: ix::RetentionPeriod::Days(1),
    });
    run(&s, |tx| {
        let now = &now;
        async move { ix::put_bucket_tx(&tx, "late", now).await }
    })
    .await
    .unwrap();
    let v = version(100, false);
    let stale = run(&s, |tx| {
        let (v, before) = (&v, &before);
        async move { ix::put_version_tx(&tx, "late", "k", v, 10, before).await }
    })
    .await;
    assert!(matches!(stale, Err(ObjectError::Conflict(_))), "{stale:?}");
    // Sent again, it sees the bucket as it is.
    put(&s, "late", "k", &v).await.unwrap();
}
