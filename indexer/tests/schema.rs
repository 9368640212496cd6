//! The evidence schema on the embedded store: intents, idempotency, the commit
//! that makes evidence visible, GC aborts, tenant-scoped lookups.

use indexer::schema::{self, IntentStart, SchemaError};
use indexer::{run, EmbeddedStore};
use protocol::{Blake3Hash, ErasureCode, EvidenceId, ManifestHeader, NodeId, Sha256Hash};
use protocol::{ShardPlacement, StripeRecord};

fn store() -> (tempfile::TempDir, EmbeddedStore) {
    let dir = tempfile::tempdir().unwrap();
    let s = EmbeddedStore::open(&dir.path().join("index.redb")).unwrap();
    (dir, s)
}

fn header(id: EvidenceId, tenant: &str, root: u8) -> ManifestHeader {
    ManifestHeader {
        evidence: id,
        tenant: tenant.into(),
        case: Some("C-7".into()),
        blake3: Blake3Hash([root; 32]),
        sha256: Sha256Hash([root; 32]),
        size: 10,
        media_type: None,
        file_name: None,
        submitter: None,
        filed_at_ms: 5,
        code: ErasureCode {
            k: 4,
            m: 2,
            shard_size: 4096,
        },
        stripes: 1,
        retain_until_ms: None,
        legal_hold: false,
    }
}

fn stripe(missing: bool) -> StripeRecord {
    StripeRecord {
        version: 1,
        shard_len: 3,
        shards: (0..6)
            .map(|i| ShardPlacement {
                node: (!(missing && i == 0)).then_some(NodeId(i)),
                blake3: Blake3Hash([i as u8; 32]),
            })
            .collect(),
    }
}

async fn begin(
    s: &EmbeddedStore,
    id: EvidenceId,
    tenant: &str,
    key: Option<&str>,
) -> Result<IntentStart, SchemaError> {
    run(s, |tx| async move {
        schema::begin_intent_tx(&tx, id, tenant, key, 1_000).await
    })
    .await
}

async fn commit(s: &EmbeddedStore, h: &ManifestHeader) -> Result<(), SchemaError> {
    run(
        s,
        |tx| async move { schema::commit_manifest_tx(&tx, h).await },
    )
    .await
}

#[tokio::test]
async fn filing_becomes_visible_only_at_commit() {
    let (_d, s) = store();
    let id = EvidenceId::new(1, [1; 10]);
    assert_eq!(
        begin(&s, id, "court", None).await.unwrap(),
        IntentStart::Started
    );
    run(&s, |tx| async move {
        schema::renew_intent_tx(&tx, id, 2_000).await?;
        schema::put_stripe_tx(&tx, id, 0, &stripe(false));
        Ok::<_, SchemaError>(())
    })
    .await
    .unwrap();
    let seen = run(
        &s,
        |tx| async move { schema::get_manifest_tx(&tx, id).await },
    )
    .await
    .unwrap();
    assert!(seen.is_none(), "no evidence before the manifest commit");
    let h = header(id, "court", 9);
    commit(&s, &h).await.unwrap();
    let seen = run(
        &s,
        |tx| async move { schema::get_manifest_tx(&tx, id).await },
    )
    .await
    .unwrap();
    assert_eq!(seen, Some(h.clone()));
    let stripes = run(&s, |tx| async move {
        schema::get_stripes_tx(&tx, id, 0..1).await
    })
    .await
    .unwrap();
    assert_eq!(stripes, vec![stripe(false)]);
    // The intent is gone: committing twice fails.
    assert!(matches!(
        commit(&s, &h).await,
        Err(SchemaError::NoIntent(_))
    ));
}

#[tokio::test]
async fn an_aborted_intent_can_never_commit() {
    let (_d, s) = store();
    let id = EvidenceId::new(1, [2; 10]);
    begin(&s, id, "court", None).await.unwrap();
    run(&s, |tx| async move {
        schema::put_stripe_tx(&tx, id, 0, &stripe(true));
        Ok::<_, SchemaError>(())
    })
    .await
    .unwrap();
    let degraded = run(&s, |tx| async move {
        schema::degraded_stripes_tx(&tx, 10).await
    })
    .await
    .unwrap();
    assert_eq!(degraded, vec![(id, 0)]);
    assert!(run(
        &s,
        |tx| async move { schema::abort_intent_tx(&tx, id).await }
    )
    .await
    .unwrap());
    assert!(matches!(
        commit(&s, &header(id, "court", 1)).await,
        Err(SchemaError::IntentAborted(_))
    ));
    let renew = run(
        &s,
        |tx| async move { schema::renew_intent_tx(&tx, id, 5).await },
    )
    .await;
    assert!(matches!(renew, Err(SchemaError::IntentAborted(_))));
    let stale = run(&s, |tx| async move {
        schema::stale_intents_tx(&tx, 0, 10).await
    })
    .await
    .unwrap();
    assert_eq!(stale.len(), 1);
    let listed = run(&s, |tx| async move {
        schema::stripes_after_tx(&tx, id, 0, 10).await
    })
    .await
    .unwrap();
    assert_eq!(listed.len(), 1);
    run(
        &s,
        |tx| async move { schema::forget_aborted_tx(&tx, id).await },
    )
    .await
    .unwrap();
    let listed = run(&s, |tx| async move {
        schema::stripes_after_tx(&tx, id, 0, 10).await
    })
    .await
    .unwrap();
    assert!(listed.is_empty());
    let degraded = run(&s, |tx| async move {
        schema::degraded_stripes_tx(&tx, 10).await
    })
    .await
    .unwrap();
    assert!(degraded.is_empty());
}

#[tokio::test]
async fn idempotency_keys_replay_per_tenant() {
    let (_d, s) = store();
    let first = EvidenceId::new(1, [3; 10]);
    let retry = EvidenceId::new(2, [3; 10]);
    assert_eq!(
        begin(&s, first, "court", Some("k1")).await.unwrap(),
        IntentStart::Started
    );
    assert_eq!(
        begin(&s, retry, "court", Some("k1")).await.unwrap(),
        IntentStart::InFlight(first)
    );
    // Another tenant's identical key is unrelated.
    assert_eq!(
        begin(&s, retry, "police", Some("k1")).await.unwrap(),
        IntentStart::Started
    );
    commit(&s, &header(first, "court", 4)).await.unwrap();
    assert_eq!(
        begin(&s, retry, "court", Some("k1")).await.unwrap(),
        IntentStart::AlreadyFiled(first)
    );
    // A failed first attempt lets the retry file anew.
    let a = EvidenceId::new(3, [4; 10]);
    let b = EvidenceId::new(4, [4; 10]);
    begin(&s, a, "court", Some("k2")).await.unwrap();
    run(
        &s,
        |tx| async move { schema::abort_intent_tx(&tx, a).await },
    )
    .await
    .unwrap();
    assert_eq!(
        begin(&s, b, "court", Some("k2")).await.unwrap(),
        IntentStart::Started
    );
}

#[tokio::test]
async fn content_lookup_stays_within_the_tenant() {
    let (_d, s) = store();
    for (n, tenant) in [(1u8, "court"), (2, "court"), (3, "police")] {
        let id = EvidenceId::new(n as u64, [n; 10]);
        begin(&s, id, tenant, None).await.unwrap();
        commit(&s, &header(id, tenant, 7)).await.unwrap();
    }
    let root = Blake3Hash([7; 32]);
    let court = run(&s, |tx| async move {
        schema::lookup_by_hash_tx(&tx, "court", &root, 100).await
    })
    .await
    .unwrap();
    assert_eq!(court.len(), 2);
    assert!(court.iter().all(|h| h.tenant == "court"));
    let police = run(&s, |tx| async move {
        schema::lookup_by_hash_tx(&tx, "police", &root, 100).await
    })
    .await
    .unwrap();
    assert_eq!(police.len(), 1);
    let other = Blake3Hash([8; 32]);
    let none = run(&s, |tx| async move {
        schema::lookup_by_hash_tx(&tx, "court", &other, 100).await
    })
    .await
    .unwrap();
    assert!(none.is_empty());
    assert!(matches!(
        begin(&s, EvidenceId::new(9, [9; 10]), "Bad Tenant", None).await,
        Err(SchemaError::BadTenant)
    ));
}

#[tokio::test]
async fn tokens_are_stored_hashed() {
    let (_d, s) = store();
    let rec = schema::TokenRecord {
        tenant: "court".into(),
        role: schema::Role::Clerk,
    };
    let r = &rec;
    run(&s, |tx| async move {
        schema::put_token_tx(&tx, "secret-token", r)
    })
    .await
    .unwrap();
    let got = run(&s, |tx| async move {
        schema::get_token_tx(&tx, "secret-token").await
    })
    .await
    .unwrap();
    assert_eq!(got, Some(rec));
    let none = run(
        &s,
        |tx| async move { schema::get_token_tx(&tx, "other").await },
    )
    .await
    .unwrap();
    assert_eq!(none, None);
    assert!(
        schema::Role::Admin > schema::Role::Clerk && schema::Role::Clerk > schema::Role::Reader
    );
}
