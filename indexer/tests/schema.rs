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
        let idem = key.map(|key| schema::Idempotency {
            key,
            request: [7; 32],
        });
        schema::begin_intent_tx(&tx, id, tenant, idem, 1_000, 120_000).await
    })
    .await
}

async fn commit(s: &EmbeddedStore, h: &ManifestHeader) -> Result<schema::Commit, SchemaError> {
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
    // The intent is gone: committing another manifest under this id fails.
    assert!(matches!(
        commit(&s, &header(id, "court", 8)).await,
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
    let intents = run(
        &s,
        |tx| async move { schema::intents_tx(&tx, None, 10).await },
    )
    .await
    .unwrap();
    assert_eq!(intents.len(), 1);
    assert!(intents[0].1.as_ref().is_some_and(|r| r.aborted));
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
        IntentStart::AlreadyFiled(first, Some([7; 32]))
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
    // The same start run again (a commit whose outcome was unknown, which
    // did commit) is still ours, not an upload in progress.
    assert_eq!(
        begin(&s, b, "court", Some("k2")).await.unwrap(),
        IntentStart::Started
    );
    // A filing expunged since: its retry is refused, never filed anew.
    run(
        &s,
        |tx| async move { schema::expunge_tx(&tx, first, 10).await },
    )
    .await
    .unwrap();
    let late = EvidenceId::new(5, [5; 10]);
    assert_eq!(
        begin(&s, late, "court", Some("k1")).await.unwrap(),
        IntentStart::Expunged(first)
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
    // In pages: the next begins after the last looked at, and the last
    // page says there is no more.
    let (first, next) = run(&s, |tx| async move {
        schema::lookup_by_hash_page_tx(&tx, "court", &root, None, 1).await
    })
    .await
    .unwrap();
    assert_eq!(first.len(), 1);
    assert_eq!(next, Some(first[0].evidence));
    let (second, next) = run(&s, |tx| async move {
        schema::lookup_by_hash_page_tx(&tx, "court", &root, next, 1).await
    })
    .await
    .unwrap();
    assert_eq!(second.len(), 1);
    assert!(
        second[0].evidence > first[0].evidence,
        "not in filing order"
    );
    let (last, end) = run(&s, |tx| async move {
        schema::lookup_by_hash_page_tx(&tx, "court", &root, next, 1).await
    })
    .await
    .unwrap();
    assert!(last.is_empty() && end.is_none(), "a page past the end");
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
    use schema::Role;
    assert!(Role::Admin.may(Role::Clerk) && Role::Clerk.may(Role::Reader));
    assert!(!Role::Clerk.may(Role::Admin) && !Role::Reader.may(Role::Clerk));
    for name in ["reader", "clerk", "admin", "expunger"] {
        let role = Role::parse(name).unwrap();
        assert!(role.may(role), "{name}");
    }
    assert_eq!(Role::parse("root"), None);
}

#[tokio::test]
async fn gc_aborts_only_an_intent_whose_lease_really_ended() {
    let (_d, s) = store();
    let id = EvidenceId::new(1, [8; 10]);
    begin(&s, id, "court", None).await.unwrap(); // lease until 1_000
    let abort = |seen: u64| {
        let s = &s;
        async move {
            run(s, |tx| async move {
                schema::abort_if_stale_tx(&tx, id, seen).await
            })
            .await
            .unwrap()
        }
    };
    // GC saw 1_000; the upload then renews from a gateway whose clock is
    // far behind: the lease still moves, ...
    run(&s, |tx| async move {
        schema::renew_intent_tx(&tx, id, 500).await
    })
    .await
    .unwrap();
    let rec = run(&s, |tx| async move { schema::get_intent_tx(&tx, id).await })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(rec.lease_until_ms, 1_001);
    // ... so GC's abort of what it saw is refused, and one of a value the
    // lease never had too.
    assert!(!abort(1_000).await);
    assert!(!abort(99_999).await);
    // Unchanged since GC saw it: aborted, and stays so.
    assert!(abort(1_001).await);
    assert!(abort(0).await);
    assert!(matches!(
        commit(&s, &header(id, "court", 1)).await,
        Err(SchemaError::IntentAborted(_))
    ));
    // Unknown intents are not GC's business.
    let other = EvidenceId::new(2, [8; 10]);
    let aborted = run(&s, |tx| async move {
        schema::abort_if_stale_tx(&tx, other, 5_000).await
    })
    .await
    .unwrap();
    assert!(!aborted);
}

#[tokio::test]
async fn intents_are_listed_in_pages() {
    let (_d, s) = store();
    let ids: Vec<EvidenceId> = (1..=5).map(|i| EvidenceId::new(i, [3; 10])).collect();
    for id in &ids {
        begin(&s, *id, "court", None).await.unwrap();
    }
    // One record no version decodes (damaged, or a newer gateway's): it is
    // listed as such, and the walk goes on past it (GC's would otherwise
    // stop at it for good).
    let damaged = ids[2];
    run(&s, |tx| async move {
        use indexer::Transaction as _;
        let mut key = vec![b'I'];
        key.extend_from_slice(damaged.as_bytes());
        tx.set(&key, b"\xffnot an intent");
        Ok::<_, SchemaError>(())
    })
    .await
    .unwrap();
    let (mut seen, mut after) = (Vec::new(), None);
    loop {
        let page = run(
            &s,
            |tx| async move { schema::intents_tx(&tx, after, 2).await },
        )
        .await
        .unwrap();
        if page.is_empty() {
            break;
        }
        assert!(page.len() <= 2);
        after = page.last().map(|(id, _)| *id);
        seen.extend(page.into_iter().map(|(id, rec)| {
            assert_eq!(rec.is_none(), id == damaged, "{id}");
            assert!(rec.is_none_or(|r| !r.aborted));
            id
        }));
    }
    assert_eq!(seen, ids);
}

#[tokio::test]
async fn a_retried_commit_that_already_landed_succeeds_and_nothing_else_does() {
    let (_d, s) = store();
    let id = EvidenceId::new(1, [9; 10]);
    begin(&s, id, "court", None).await.unwrap();
    let h = header(id, "court", 1);
    assert_eq!(commit(&s, &h).await.unwrap(), schema::Commit::Now);
    // FoundationDB may report commit_unknown_result for a commit that landed;
    // the retry must not turn a filed piece of evidence into an error, and
    // says it landed earlier so that its statement is not queued twice.
    assert_eq!(commit(&s, &h).await.unwrap(), schema::Commit::Earlier);
    // A different manifest under the same id is still refused.
    assert!(matches!(
        commit(&s, &header(id, "court", 2)).await,
        Err(SchemaError::NoIntent(_))
    ));
}

#[tokio::test]
async fn gc_forgets_only_the_stripes_it_deleted() {
    let (_d, s) = store();
    let id = EvidenceId::new(1, [10; 10]);
    begin(&s, id, "court", None).await.unwrap();
    run(&s, |tx| async move {
        for n in 0..3 {
            schema::put_stripe_tx(&tx, id, n, &stripe(false));
        }
        Ok::<_, SchemaError>(())
    })
    .await
    .unwrap();
    // Not aborted yet: nothing may be forgotten.
    let early = run(&s, |tx| async move {
        schema::forget_aborted_stripes_tx(&tx, id, &[0]).await
    })
    .await;
    assert!(matches!(early, Err(SchemaError::NoIntent(_))));
    run(
        &s,
        |tx| async move { schema::abort_intent_tx(&tx, id).await },
    )
    .await
    .unwrap();
    run(&s, |tx| async move {
        schema::forget_aborted_stripes_tx(&tx, id, &[0, 2]).await
    })
    .await
    .unwrap();
    let left = run(&s, |tx| async move {
        schema::stripes_after_tx(&tx, id, 0, 10).await
    })
    .await
    .unwrap();
    assert_eq!(left.iter().map(|(n, _)| *n).collect::<Vec<_>>(), vec![1]);
}

#[tokio::test]
async fn one_ledger_integrator_at_a_time_and_fenced() {
    use indexer::ledger as lx;
    let (_d, s) = store();
    let lease = |owner: u128, now: u64| {
        let s = &s;
        async move {
            run(s, |tx| async move {
                lx::acquire_lease_tx(&tx, owner, now, 100, None).await
            })
            .await
            .unwrap()
            .ok()
        }
    };
    let a = lease(1, 0).await.expect("free lease");
    assert_eq!(lease(2, 50).await, None, "held by 1 until 100");
    assert_eq!(lease(1, 60).await, Some(a), "renewal keeps the fence");
    let b = lease(2, 161).await.expect("expired lease changes hands");
    assert!(b > a);
    // The old holder's integration is refused, the new holder's goes through.
    let fenced = run(&s, |tx| async move { lx::check_fence_tx(&tx, a, 0).await }).await;
    assert!(matches!(fenced, Err(lx::IntegrateError::Fenced(_))));
    let ok = run(&s, |tx| async move { lx::check_fence_tx(&tx, b, 0).await }).await;
    assert_eq!(ok.unwrap().size, 0);
    // An integration renews the lease in its own transaction: the holder
    // keeps it past its first expiry, and others stay out.
    run(&s, |tx| async move {
        lx::check_fence_tx(&tx, b, 0).await?;
        lx::renew_lease_tx(&tx, 2, b, 250, 100);
        Ok::<_, lx::IntegrateError>(())
    })
    .await
    .unwrap();
    assert_eq!(lease(1, 300).await, None, "renewed by 2 until 350");
    assert_eq!(lease(2, 300).await, Some(b));
    let moved = run(&s, |tx| async move { lx::check_fence_tx(&tx, b, 3).await }).await;
    assert!(matches!(
        moved,
        Err(lx::IntegrateError::Moved {
            expected: 3,
            found: 0
        })
    ));
    // A checkpoint never goes backwards.
    for (size, stored) in [(5, true), (3, false), (5, false), (6, true)] {
        let got = run(&s, |tx| async move {
            lx::put_checkpoint_tx(&tx, size, format!("cp {size}").as_bytes()).await
        })
        .await
        .unwrap();
        assert_eq!(got, stored, "size {size}");
    }
    let cp = run(&s, |tx| async move { lx::checkpoint_tx(&tx).await })
        .await
        .unwrap();
    assert_eq!(cp.as_deref(), Some(&b"cp 6"[..]));
}

#[tokio::test]
async fn statements_queued_in_one_transaction_are_all_kept_in_order() {
    use indexer::ledger as lx;
    let (_d, s) = store();
    let rec = |n: u8| lx::PendingRecord {
        evidence: EvidenceId::new(1, [n; 10]),
        salt: [n; 32],
        statement: vec![n],
    };
    run(&s, |tx| async move {
        for n in 0..3u8 {
            lx::enqueue_tx(&tx, u16::from(n), &rec(n));
        }
        Ok::<_, SchemaError>(())
    })
    .await
    .unwrap();
    run(&s, |tx| async move {
        lx::enqueue_tx(&tx, 0, &rec(3));
        Ok::<_, SchemaError>(())
    })
    .await
    .unwrap();
    let pending = run(
        &s,
        |tx| async move { lx::pending_tx(&tx, 10, 1 << 20).await },
    )
    .await
    .unwrap();
    let order: Vec<u8> = pending.iter().map(|(_, p)| p.statement[0]).collect();
    assert_eq!(order, vec![0, 1, 2, 3]);
    // The byte cap keeps a batch small but never empty.
    let capped = run(&s, |tx| async move { lx::pending_tx(&tx, 10, 2).await })
        .await
        .unwrap();
    assert_eq!(capped.len(), 2);
    // A batch says whether it took the whole queue (the checkpoint-age
    // gauge moves only then): not when a limit cut it, also at its end.
    for (after, limit, max_bytes, whole, len) in [
        (None, 10, 1 << 20, true, 4),
        (None, 3, 1 << 20, false, 3),
        (None, 4, 1 << 20, false, 4),
        (None, 10, 2, false, 2),
        (Some(capped[1].0.clone()), 10, 1 << 20, true, 2),
    ] {
        let batch = run(&s, |tx| {
            let after = after.clone();
            async move { lx::pending_batch_tx(&tx, after.as_deref(), limit, max_bytes).await }
        })
        .await
        .unwrap();
        assert_eq!(
            (batch.whole, batch.records.len()),
            (whole, len),
            "limit {limit}, {max_bytes} bytes"
        );
    }
}

#[tokio::test]
async fn worm_is_enforced_in_the_transaction_that_removes_data() {
    let (_d, s) = store();
    let id = EvidenceId::new(1, [11; 10]);
    begin(&s, id, "court", None).await.unwrap();
    run(&s, |tx| async move {
        schema::put_stripe_tx(&tx, id, 0, &stripe(false));
        Ok::<_, SchemaError>(())
    })
    .await
    .unwrap();
    let mut h = header(id, "court", 3);
    h.retain_until_ms = Some(1_000);
    commit(&s, &h).await.unwrap();
    let expunge = |now: u64| {
        let s = &s;
        async move {
            run(
                s,
                |tx| async move { schema::expunge_tx(&tx, id, now).await },
            )
            .await
        }
    };
    assert!(
        matches!(expunge(999).await, Err(SchemaError::Locked(_))),
        "retention runs"
    );
    let shorten = run(&s, |tx| async move {
        schema::extend_retention_tx(&tx, id, 10).await
    })
    .await;
    assert!(
        matches!(shorten, Err(SchemaError::Locked(_))),
        "retention cannot shorten"
    );
    run(&s, |tx| async move {
        schema::set_legal_hold_tx(&tx, id, true).await
    })
    .await
    .unwrap();
    assert!(
        matches!(expunge(5_000).await, Err(SchemaError::Locked(_))),
        "legal hold"
    );
    run(&s, |tx| async move {
        schema::set_legal_hold_tx(&tx, id, false).await
    })
    .await
    .unwrap();
    let gone = expunge(5_000).await.unwrap();
    assert_eq!(gone.evidence, id);
    let after = run(&s, |tx| async move {
        Ok::<_, SchemaError>((
            schema::get_manifest_tx(&tx, id).await?,
            schema::get_expunged_tx(&tx, id).await?,
            schema::lookup_by_hash_tx(&tx, "court", &Blake3Hash([3; 32]), 10).await?,
        ))
    })
    .await
    .unwrap();
    assert!(after.0.is_none() && after.1.is_some() && after.2.is_empty());
    assert!(matches!(
        expunge(6_000).await,
        Err(SchemaError::NoEvidence(_))
    ));
    // The expunge stays listed for GC until its shards are deleted and their
    // records forgotten; it cannot be marked done before.
    let pending = || {
        run(
            &s,
            |tx| async move { schema::expunging_tx(&tx, None, 10).await },
        )
    };
    assert_eq!(pending().await.unwrap(), vec![id]);
    // Paged: the page after it is empty.
    let next = run(&s, |tx| async move {
        schema::expunging_tx(&tx, Some(id), 10).await
    })
    .await
    .unwrap();
    assert!(next.is_empty());
    let done = || {
        run(
            &s,
            |tx| async move { schema::expunge_done_tx(&tx, id).await },
        )
    };
    assert!(matches!(done().await, Err(SchemaError::Locked(_))));
    // A stripe repair had found lost: its mark goes with its record.
    run(&s, |tx| async move {
        schema::mark_lost_tx(&tx, id, 0);
        Ok::<_, SchemaError>(())
    })
    .await
    .unwrap();
    run(&s, |tx| async move {
        schema::forget_stripes_tx(&tx, id, &[0]).await
    })
    .await
    .unwrap();
    let lost = run(&s, |tx| async move { schema::is_lost_tx(&tx, id, 0).await })
        .await
        .unwrap();
    assert!(!lost, "the lost mark outlived its stripe's record");
    done().await.unwrap();
    assert!(pending().await.unwrap().is_empty());
    // Roles: the expunger stands apart from the ordered roles.
    use indexer::schema::Role;
    assert!(Role::Expunger.may(Role::Expunger));
    assert!(!Role::Admin.may(Role::Expunger));
    assert!(!Role::Expunger.may(Role::Reader));
    assert!(Role::Admin.may(Role::Clerk) && !Role::Reader.may(Role::Clerk));
}

/// Repair commits with a compare-and-set: only over the record it read, only
/// while the evidence is visible (never resurrecting an expunged stripe),
/// bumping the version and clearing the lost mark; the queue mark goes only
/// when the repair counted every shard and no one marked the stripe since.
#[tokio::test]
async fn repair_commits_only_over_what_it_read_and_never_after_expunge() {
    let (_d, s) = store();
    let id = EvidenceId::new(1, [9; 10]);
    begin(&s, id, "court", None).await.unwrap();
    run(&s, |tx| async move {
        schema::put_stripe_tx(&tx, id, 0, &stripe(true));
        Ok::<_, SchemaError>(())
    })
    .await
    .unwrap();
    commit(&s, &header(id, "court", 3)).await.unwrap();
    let queued = || async {
        run(&s, |tx| async move {
            schema::degraded_stripes_tx(&tx, 10).await
        })
        .await
        .unwrap()
    };
    assert_eq!(
        queued().await,
        vec![(id, 0)],
        "a stripe missing a shard is queued"
    );
    let marks = || async {
        run(&s, |tx| async move {
            schema::degraded_queue_tx(&tx, None, 10).await
        })
        .await
        .unwrap()
    };
    let first = marks().await;
    assert_eq!(first.len(), 1);
    let (_, _, mark) = first[0].clone();
    // The queue is walked from a cursor, strictly after it.
    let after = run(&s, |tx| async move {
        schema::degraded_queue_tx(&tx, Some((id, 0)), 10).await
    })
    .await
    .unwrap();
    assert!(after.is_empty());

    let seen = stripe(true);
    let mut fixed = seen.clone();
    fixed.shards[0].node = Some(NodeId(9));
    // Another change got there first: nothing is written.
    let mut other = seen.clone();
    other.version = 7;
    let c = run(&s, |tx| {
        let (other, fixed, mark) = (&other, &fixed, &mark);
        async move { schema::commit_repair_tx(&tx, id, 0, other, fixed, Some(mark)).await }
    })
    .await
    .unwrap();
    assert_eq!(c, schema::RepairCommit::Changed);
    // Over what it read: done, version bumped, queue cleared; a lost mark
    // stays (placed shards are not good ones: the repair that read k good
    // shards clears it itself, an adoption leaves it).
    run(&s, |tx| async move {
        schema::mark_lost_tx(&tx, id, 0);
        Ok::<_, SchemaError>(())
    })
    .await
    .unwrap();
    // A read meets damage while the repair works: the stripe is marked again.
    run(&s, |tx| async move {
        schema::mark_degraded_tx(&tx, id, 0);
        Ok::<_, SchemaError>(())
    })
    .await
    .unwrap();
    let c = run(&s, |tx| {
        let (seen, fixed, mark) = (&seen, &fixed, &mark);
        async move { schema::commit_repair_tx(&tx, id, 0, seen, fixed, Some(mark)).await }
    })
    .await
    .unwrap();
    assert_eq!(c, schema::RepairCommit::Done);
    let again = marks().await;
    assert_eq!(
        again.len(),
        1,
        "marked since the repair read it: still queued"
    );
    assert_ne!(again[0].2, mark);
    // Only the mark a repair was given clears it.
    let stale = run(&s, |tx| {
        let mark = &mark;
        async move { schema::clear_degraded_if_tx(&tx, id, 0, mark).await }
    })
    .await
    .unwrap();
    assert!(!stale);
    assert_eq!(marks().await.len(), 1);
    let current = again[0].2.clone();
    let cleared = run(&s, |tx| {
        let current = &current;
        async move { schema::clear_degraded_if_tx(&tx, id, 0, current).await }
    })
    .await
    .unwrap();
    assert!(cleared);
    // Marked again after the clear: never a value an older repair read.
    run(&s, |tx| async move {
        schema::mark_degraded_tx(&tx, id, 0);
        Ok::<_, SchemaError>(())
    })
    .await
    .unwrap();
    let fresh = marks().await;
    assert!(fresh[0].2 != mark && fresh[0].2 != current, "{fresh:?}");
    // A read meeting a stripe known to lack shards marks it only if it is
    // not queued: the mark a repair holds stays as it was.
    let marked = run(&s, |tx| async move {
        schema::mark_degraded_unless_queued_tx(&tx, id, 0).await
    })
    .await
    .unwrap();
    assert!(!marked);
    assert_eq!(marks().await, fresh);
    let current = fresh[0].2.clone();
    run(&s, |tx| {
        let current = &current;
        async move { schema::clear_degraded_if_tx(&tx, id, 0, current).await }
    })
    .await
    .unwrap();
    // Not queued (the queue lost it): marked.
    let marked = run(&s, |tx| async move {
        schema::mark_degraded_unless_queued_tx(&tx, id, 0).await
    })
    .await
    .unwrap();
    assert!(marked);
    assert_eq!(marks().await.len(), 1);
    run(&s, |tx| async move {
        schema::clear_degraded_tx(&tx, id, 0);
        Ok::<_, SchemaError>(())
    })
    .await
    .unwrap();
    let (rec, lost) = run(&s, |tx| async move {
        Ok::<_, SchemaError>((
            schema::get_stripes_tx(&tx, id, 0..1).await?,
            schema::is_lost_tx(&tx, id, 0).await?,
        ))
    })
    .await
    .unwrap();
    assert_eq!(rec[0].version, 2);
    assert_eq!(rec[0].shards[0].node, Some(NodeId(9)));
    assert!(lost, "a commit over placed shards cleared the lost mark");
    assert!(queued().await.is_empty());
    // The scan walks every stripe record in key order.
    let all = run(&s, |tx| async move {
        schema::stripes_scan_tx(&tx, None, 10).await
    })
    .await
    .unwrap();
    assert_eq!(all.len(), 1);
    assert_eq!((all[0].0, all[0].1), (id, 0));
    let after = run(&s, |tx| async move {
        schema::stripes_scan_tx(&tx, Some((id, 0)), 10).await
    })
    .await
    .unwrap();
    assert!(after.is_empty());

    // Expunged: a repair in flight must not bring the stripe back.
    run(
        &s,
        |tx| async move { schema::expunge_tx(&tx, id, 10).await },
    )
    .await
    .unwrap();
    let current = rec[0].clone();
    let c = run(&s, |tx| {
        let (current, fixed) = (&current, &fixed);
        async move { schema::commit_repair_tx(&tx, id, 0, current, fixed, None).await }
    })
    .await
    .unwrap();
    assert_eq!(c, schema::RepairCommit::Gone);
}

/// One task repairs a stripe at a time: a held lease keeps others off
/// unless it is exactly the value they watched go stale; renewing it
/// changes that value; only its holder renews or gives it up; and it goes
/// with the stripe's records.
#[tokio::test]
async fn a_stripe_is_repaired_under_one_tasks_lease() {
    use schema::RepairLease;
    let (_d, s) = store();
    let id = EvidenceId::new(1, [11; 10]);
    let (a, b) = ([1u8; 16], [2u8; 16]);
    let take = |who: [u8; 16], stale: Option<RepairLease>| {
        let s = &s;
        async move {
            run(s, |tx| async move {
                schema::take_repair_lease_tx(&tx, id, 0, who, stale).await
            })
            .await
            .unwrap()
        }
    };
    let holds = |who: [u8; 16]| {
        let s = &s;
        async move {
            run(s, |tx| async move {
                schema::holds_repair_lease_tx(&tx, id, 0, who).await
            })
            .await
            .unwrap()
        }
    };
    let renew = |who: [u8; 16]| {
        let s = &s;
        async move {
            run(s, |tx| async move {
                schema::renew_repair_lease_tx(&tx, id, 0, who).await
            })
            .await
            .unwrap()
        }
    };
    let release = |who: [u8; 16]| {
        let s = &s;
        async move {
            run(s, |tx| async move {
                schema::release_repair_lease_tx(&tx, id, 0, who).await
            })
            .await
            .unwrap()
        }
    };
    assert!(!holds(a).await, "nobody holds a stripe never leased");
    assert!(!renew(a).await, "nor renews one");
    assert_eq!(take(a, None).await, None, "free: taken");
    assert!(holds(a).await);
    let first = RepairLease { owner: a, beat: 0 };
    assert_eq!(
        take(b, None).await,
        Some(first),
        "held: the holder's lease comes back"
    );
    assert!(!holds(b).await);
    assert!(!renew(b).await, "only its holder renews it");
    assert!(renew(a).await);
    let second = RepairLease { owner: a, beat: 1 };
    assert_eq!(
        take(b, Some(first)).await,
        Some(second),
        "renewed since it was watched: not stale"
    );
    release(b).await;
    assert!(holds(a).await, "only the holder gives it up");
    assert_eq!(
        take(b, Some(second)).await,
        None,
        "watched stale: taken over"
    );
    assert!(holds(b).await && !holds(a).await);
    assert!(!renew(a).await, "its old holder cannot renew it back");
    release(a).await;
    assert!(holds(b).await);
    release(b).await;
    assert!(!renew(b).await, "a lease given up is not renewed");
    assert_eq!(take(a, None).await, None, "given up, it is free at once");

    // The stripe's records going (GC after an abort) take the lease too.
    begin(&s, id, "court", None).await.unwrap();
    run(&s, |tx| async move {
        schema::put_stripe_tx(&tx, id, 0, &stripe(true));
        schema::abort_intent_tx(&tx, id).await
    })
    .await
    .unwrap();
    run(&s, |tx| async move {
        schema::forget_aborted_stripes_tx(&tx, id, &[0]).await
    })
    .await
    .unwrap();
    let lease = run(&s, |tx| async move {
        schema::get_repair_lease_tx(&tx, id, 0).await
    })
    .await
    .unwrap();
    assert_eq!(lease, None);
}

/// Admin reaches every tenant: only the operators' tenant is issued it, and
/// an admin credential another tenant holds from before acts as a clerk.
#[tokio::test]
async fn admin_is_the_operators_alone() {
    use indexer::schema::{effective_role, Role, TokenRecord, OPERATOR_TENANT};
    let dir = tempfile::tempdir().unwrap();
    let s = indexer::EmbeddedStore::open(&dir.path().join("i.redb")).unwrap();
    let put = |tenant: &'static str, role: Role| {
        let s = &s;
        async move {
            indexer::run(s, |tx| async move {
                schema::put_token_tx(
                    &tx,
                    &format!("{tenant}-{role:?}"),
                    &TokenRecord {
                        tenant: tenant.into(),
                        role,
                    },
                )
            })
            .await
        }
    };
    put(OPERATOR_TENANT, Role::Admin).await.unwrap();
    put("court-b", Role::Clerk).await.unwrap();
    assert!(matches!(
        put("court-b", Role::Admin).await,
        Err(SchemaError::AdminOutsideOperators)
    ));
    assert_eq!(effective_role(OPERATOR_TENANT, Role::Admin), Role::Admin);
    assert_eq!(effective_role("court-b", Role::Admin), Role::Clerk);
    assert_eq!(effective_role("court-b", Role::Reader), Role::Reader);
}

/// The node registry lists every node recorded, and nothing of the
/// ledger's openings groups that share its tag.
#[tokio::test]
async fn the_node_registry_lists_nodes_among_the_ledgers_keys() {
    use indexer::Transaction as _;
    let (_d, s) = store();
    run(&s, |tx| async move {
        for id in [0u32, 1, 7, 300] {
            schema::put_node_tx(
                &tx,
                &schema::NodeRecord {
                    node: NodeId(id),
                    addr: format!("127.0.0.1:{}", 7000 + id),
                    failure_domain: None,
                    disk_uuid: None,
                    capacity_bytes: 1,
                    free_bytes: 1,
                    used_bytes: 0,
                    last_seen_ms: 5,
                },
            );
        }
        // Openings groups: "N" and a first leaf u64 (leaves 0, 64 and 2^32).
        for leaf in [0u64, 64, 1 << 32] {
            let mut k = vec![b'N'];
            k.extend_from_slice(&leaf.to_be_bytes());
            tx.set(&k, b"not a node record");
        }
        Ok::<_, SchemaError>(())
    })
    .await
    .unwrap();
    let nodes = run(&s, |tx| async move { schema::nodes_tx(&tx).await })
        .await
        .unwrap();
    let ids: Vec<u32> = nodes.iter().map(|n| n.node.0).collect();
    assert_eq!(ids, [0, 1, 7, 300]);
    assert_eq!(nodes[3].addr, "127.0.0.1:7300");
}

/// An index is marked with the format of the version that serves it; one
/// a newer version marked is refused, and left as it was.
#[tokio::test]
async fn an_index_of_a_newer_format_is_refused() {
    use indexer::kv::Transaction;
    let (_d, s) = store();
    let format = || run(&s, |tx| async move { schema::index_format_tx(&tx).await });
    let mark = || run(&s, |tx| async move { schema::mark_format_tx(&tx).await });
    assert_eq!(format().await.unwrap(), 0, "unmarked: an older version's");
    mark().await.unwrap();
    let marked = run(&s, |tx| async move { tx.get(b"F").await })
        .await
        .unwrap();
    assert_eq!(marked, Some(schema::INDEX_FORMAT.to_be_bytes().to_vec()));
    assert_eq!(format().await.unwrap(), schema::INDEX_FORMAT);
    // A newer version's mark stays: this one never lowers it.
    let newer = schema::INDEX_FORMAT + 1;
    run(&s, |tx| async move {
        tx.set(b"F", &newer.to_be_bytes());
        Ok::<_, SchemaError>(())
    })
    .await
    .unwrap();
    mark().await.unwrap();
    assert_eq!(format().await.unwrap(), newer);
}
