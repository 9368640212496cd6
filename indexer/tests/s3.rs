//! S3 records on the embedded store: versions newest first, the current
//! view, S3's delete semantics, and Object Lock enforced in the transaction
//! that would remove data.

use indexer::s3::{
    self as ix, BucketRecord, Deleted, LockMode, ObjectError, ObjectVersion, Retention, Versioning,
};
use indexer::{run, EmbeddedStore};
use protocol::EvidenceId;

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
    run(
        s,
        |tx| async move { ix::put_version_tx(&tx, b, k, v, 10).await },
    )
    .await
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
        async move { ix::delete_current_tx(&tx, "vers", "a/x", marker, 10, false).await }
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
        ix::delete_version_tx(&tx, "vers", "a/x", mid, 10, false).await
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
        async move { ix::delete_current_tx(&tx, "plain", "k", marker, 10, false).await }
    })
    .await
    .unwrap();
    assert_eq!(done, Deleted::Removed);
    assert!(listed(&s, "plain", "", None).await.is_empty());
    // Empty now: the bucket can go.
    run(
        &s,
        |tx| async move { ix::delete_bucket_tx(&tx, "plain").await },
    )
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
                ix::delete_version_tx(&tx, "lock", k, id, now, bypass).await
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
    // GOVERNANCE: only with bypass.
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
        run(
            &s,
            |tx| async move { ix::delete_bucket_tx(&tx, "lock").await }
        )
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
