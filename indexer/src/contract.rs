//! The conformance suite every [`KvStore`] backend must pass, so that code
//! tested on the embedded store behaves the same on FoundationDB.
//!
//! Each `pub async fn` is one named check, generic over the backend; it
//! panics (like a test) on the first violation. [`run_all`] runs them in
//! order. Called by `tests/contract_embedded.rs` (one test per check, each on
//! a fresh store) and `tests/contract_fdb.rs` (against a real cluster).
//!
//! Every check writes only under `prefix ++ check name ++ "/"` and clears
//! that range when it succeeds, so the suite can share a FoundationDB cluster.
//! Checks that need concurrency interleave futures in the calling task (a
//! backend's commit is an await point), so `KvStore` needs no `Clone`.
//! Reads come before concurrent commits where it matters, because
//! FoundationDB fixes a transaction's snapshot at its first read, not at begin.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::future::join_all;

use crate::kv::{
    run, KeyValues as Rows, KvError, KvStore, Transaction, MAX_KEY_BYTES, MAX_TRANSACTION_AGE,
    MAX_TRANSACTION_BYTES, MAX_VALUE_BYTES, VERSIONSTAMP_BYTES,
};

/// Runs every check, in order. Takes about 6 s: [`too_old`] waits out the 5 s limit.
pub async fn run_all<S: KvStore>(store: &S, prefix: &[u8]) {
    set_get_clear(store, prefix).await;
    range_order_limit_reverse(store, prefix).await;
    clear_range(store, prefix).await;
    read_your_writes(store, prefix).await;
    snapshot_isolation(store, prefix).await;
    conflict_is_detected_and_retried(store, prefix).await;
    blind_writes_do_not_conflict(store, prefix).await;
    atomic_add_sums_exactly(store, prefix).await;
    versionstamps_are_unique_and_increase(store, prefix).await;
    versionstamps_within_one_transaction(store, prefix).await;
    size_limits(store, prefix).await;
    too_old(store, prefix).await;
}

/// The key range one check owns.
struct Space {
    base: Vec<u8>,
}

impl Space {
    fn new(prefix: &[u8], check: &str) -> Self {
        let mut base = prefix.to_vec();
        base.extend_from_slice(check.as_bytes());
        base.push(b'/');
        Space { base }
    }

    fn key(&self, suffix: &[u8]) -> Vec<u8> {
        let mut key = self.base.clone();
        key.extend_from_slice(suffix);
        key
    }

    fn end(&self) -> Vec<u8> {
        // The base ends in '/', so bumping that byte bounds every key under it.
        let mut end = self.base.clone();
        if let Some(last) = end.last_mut() {
            *last += 1;
        }
        end
    }

    async fn all<T: Transaction>(&self, tx: &T) -> Result<Rows, KvError> {
        tx.get_range(&self.base, &self.end(), 0, false).await
    }

    /// The committed rows, with the space's base stripped from the keys.
    async fn committed<S: KvStore>(&self, store: &S) -> Rows {
        let rows = run(store, |tx| async move { self.all(&tx).await })
            .await
            .expect("read the check's range");
        rows.into_iter()
            .map(|(k, v)| (k[self.base.len()..].to_vec(), v))
            .collect()
    }

    async fn put<S: KvStore>(&self, store: &S, rows: &[(&[u8], &[u8])]) {
        run(store, |tx| async move {
            for (k, v) in rows {
                tx.set(&self.key(k), v);
            }
            Ok::<_, KvError>(())
        })
        .await
        .expect("write the check's rows");
    }

    async fn clean<S: KvStore>(&self, store: &S) {
        run(store, |tx| async move {
            tx.clear_range(&self.base, &self.end());
            Ok::<_, KvError>(())
        })
        .await
        .expect("clear the check's range");
        assert!(self.committed(store).await.is_empty(), "cleanup left keys");
    }
}

fn rows(expected: &[(&[u8], &[u8])]) -> Rows {
    expected
        .iter()
        .map(|(k, v)| (k.to_vec(), v.to_vec()))
        .collect()
}

fn le(value: &[u8]) -> i64 {
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&value[..8]);
    i64::from_le_bytes(bytes)
}

/// Point writes become visible after commit; clear removes them.
pub async fn set_get_clear<S: KvStore>(store: &S, prefix: &[u8]) {
    let space = Space::new(prefix, "set_get_clear");
    let k = space.key(b"k");
    let missing = run(store, |tx| {
        let k = k.clone();
        async move { tx.get(&k).await }
    })
    .await
    .expect("get a missing key");
    assert_eq!(missing, None);

    space.put(store, &[(b"k", b"v1")]).await;
    space.put(store, &[(b"k", b"v2"), (b"empty", b"")]).await;
    assert_eq!(
        space.committed(store).await,
        rows(&[(b"empty", b""), (b"k", b"v2")]),
        "overwrite, and an empty value is still a value"
    );

    run(store, |tx| {
        let (k, space) = (k.clone(), &space);
        async move {
            tx.clear(&k);
            tx.clear(&space.key(b"never-written"));
            Ok::<_, KvError>(())
        }
    })
    .await
    .expect("clear");
    assert_eq!(space.committed(store).await, rows(&[(b"empty", b"")]));
    space.clean(store).await;
}

/// Range reads are ordered, end-exclusive, limited and reversible.
pub async fn range_order_limit_reverse<S: KvStore>(store: &S, prefix: &[u8]) {
    let space = Space::new(prefix, "range");
    // Written out of order so a backend that returns insertion order fails.
    let keys: Vec<[u8; 1]> = [5u8, 0, 9, 3, 1, 8, 2, 7, 4, 6].map(|i| [i]).to_vec();
    let written: Vec<(&[u8], &[u8])> = keys.iter().map(|k| (&k[..], &k[..])).collect();
    space.put(store, &written).await;

    let read = |begin: u8, end: u8, limit: usize, reverse: bool| {
        let space = &space;
        async move {
            let rows = run(store, |tx| async move {
                tx.get_range(&space.key(&[begin]), &space.key(&[end]), limit, reverse)
                    .await
            })
            .await
            .expect("range read");
            rows.into_iter()
                .map(|(k, v)| {
                    assert_eq!(k[space.base.len()..], v[..], "value belongs to its key");
                    v[0]
                })
                .collect::<Vec<u8>>()
        }
    };
    assert_eq!(read(0, 10, 0, false).await, (0..10).collect::<Vec<_>>());
    assert_eq!(read(0, 10, 3, false).await, vec![0, 1, 2]);
    assert_eq!(
        read(0, 10, 0, true).await,
        (0..10).rev().collect::<Vec<_>>()
    );
    assert_eq!(read(0, 10, 3, true).await, vec![9, 8, 7]);
    assert_eq!(
        read(2, 5, 0, false).await,
        vec![2, 3, 4],
        "end is exclusive"
    );
    assert_eq!(read(2, 5, 0, true).await, vec![4, 3, 2]);
    assert_eq!(
        read(2, 5, 10, false).await,
        vec![2, 3, 4],
        "limit above count"
    );
    assert!(read(5, 5, 0, false).await.is_empty(), "empty range");
    assert!(read(6, 5, 0, false).await.is_empty(), "inverted range");
    space.clean(store).await;
}

/// clear_range removes [begin, end) and nothing else.
pub async fn clear_range<S: KvStore>(store: &S, prefix: &[u8]) {
    let space = Space::new(prefix, "clear_range");
    let keys: Vec<[u8; 1]> = (0u8..10).map(|i| [i]).collect();
    let written: Vec<(&[u8], &[u8])> = keys.iter().map(|k| (&k[..], &b"v"[..])).collect();
    space.put(store, &written).await;
    let space_ref = &space;
    run(store, |tx| async move {
        tx.clear_range(&space_ref.key(&[3]), &space_ref.key(&[7]));
        Ok::<_, KvError>(())
    })
    .await
    .expect("clear_range");
    let left: Vec<u8> = space
        .committed(store)
        .await
        .into_iter()
        .map(|(k, _)| k[0])
        .collect();
    assert_eq!(left, vec![0, 1, 2, 7, 8, 9]);
    space.clean(store).await;
}

/// Reads inside a transaction see its own sets, clears, range clears and
/// atomic adds, in point and range reads; what commits is what it saw.
pub async fn read_your_writes<S: KvStore>(store: &S, prefix: &[u8]) {
    let space = Space::new(prefix, "read_your_writes");
    let ten = 10i64.to_le_bytes();
    space
        .put(
            store,
            &[
                (b"a", b"1"),
                (b"b", b"2"),
                (b"c", b"3"),
                (b"d", b"4"),
                (b"f", b"6"),
                (b"n", &ten),
            ],
        )
        .await;

    let fifteen = 15i64.to_le_bytes();
    let seven = 7i64.to_le_bytes();
    let expected = rows(&[
        (b"a", b"1"),
        (b"b", b"20"),
        (b"d2", b"new"),
        (b"e", b"5"),
        (b"f", b"6"),
        (b"n", &fifteen),
        (b"z", &seven),
    ]);
    let seen = run(store, |tx| {
        let space = &space;
        async move {
            tx.set(&space.key(b"b"), b"20");
            tx.clear(&space.key(b"c"));
            tx.set(&space.key(b"e"), b"5");
            tx.set(&space.key(b"dd"), b"gone");
            tx.clear_range(&space.key(b"d"), &space.key(b"e"));
            tx.set(&space.key(b"d2"), b"new");
            tx.atomic_add(&space.key(b"n"), 5);
            tx.atomic_add(&space.key(b"z"), 3);
            tx.atomic_add(&space.key(b"z"), 4);

            assert_eq!(tx.get(&space.key(b"b")).await?, Some(b"20".to_vec()));
            assert_eq!(tx.get(&space.key(b"c")).await?, None, "cleared key");
            assert_eq!(tx.get(&space.key(b"d")).await?, None, "range-cleared key");
            assert_eq!(
                tx.get(&space.key(b"dd")).await?,
                None,
                "set, then range-cleared"
            );
            assert_eq!(tx.get(&space.key(b"d2")).await?, Some(b"new".to_vec()));
            assert_eq!(tx.get(&space.key(b"n")).await?, Some(fifteen.to_vec()));
            assert_eq!(tx.get(&space.key(b"z")).await?, Some(seven.to_vec()));

            let reverse = tx
                .get_range(&space.base, &space.end(), 2, true)
                .await?
                .into_iter()
                .map(|(k, _)| k[space.base.len()..].to_vec())
                .collect::<Vec<_>>();
            assert_eq!(
                reverse,
                vec![b"z".to_vec(), b"n".to_vec()],
                "reverse, limited"
            );
            let all = space.all(&tx).await?;
            Ok::<_, KvError>(
                all.into_iter()
                    .map(|(k, v)| (k[space.base.len()..].to_vec(), v))
                    .collect::<Rows>(),
            )
        }
    })
    .await
    .expect("read-your-writes transaction");
    assert_eq!(seen, expected, "range read merges the transaction's writes");
    assert_eq!(
        space.committed(store).await,
        expected,
        "the commit applies what the transaction saw"
    );
    space.clean(store).await;
}

/// A transaction keeps reading its snapshot while others commit.
pub async fn snapshot_isolation<S: KvStore>(store: &S, prefix: &[u8]) {
    let space = Space::new(prefix, "snapshot_isolation");
    space.put(store, &[(b"old", b"1")]).await;

    let reader = store.begin().expect("begin");
    assert_eq!(
        reader.get(&space.key(b"old")).await.expect("first read"),
        Some(b"1".to_vec())
    );
    space.put(store, &[(b"old", b"2"), (b"new", b"x")]).await;

    assert_eq!(
        reader.get(&space.key(b"old")).await.expect("read"),
        Some(b"1".to_vec()),
        "a concurrent commit is invisible"
    );
    assert_eq!(reader.get(&space.key(b"new")).await.expect("read"), None);
    let range = space.all(&reader).await.expect("range read");
    assert_eq!(range.len(), 1, "range reads use the same snapshot");
    reader
        .commit()
        .await
        .expect("a read-only transaction commits");

    assert_eq!(
        space.committed(store).await,
        rows(&[(b"new", b"x"), (b"old", b"2")]),
        "a new transaction sees the commit"
    );
    space.clean(store).await;
}

/// A read-write conflict fails the later commit with `Conflict`, and `run`
/// retries it until both increments land.
pub async fn conflict_is_detected_and_retried<S: KvStore>(store: &S, prefix: &[u8]) {
    let space = Space::new(prefix, "conflict");
    let counter = space.key(b"counter");
    space.put(store, &[(b"counter", b"0")]).await;

    let first = store.begin().expect("begin");
    let second = store.begin().expect("begin");
    let a = first.get(&counter).await.expect("read");
    let b = second.get(&counter).await.expect("read");
    assert_eq!(a, b);
    first.set(&counter, b"1");
    second.set(&counter, b"1");
    first.commit().await.expect("first commit wins");
    let err = second
        .commit()
        .await
        .expect_err("second commit read a stale value");
    assert!(matches!(err, KvError::Conflict), "got {err:?}");
    assert!(err.is_retryable());

    let range_reader = store.begin().expect("begin");
    space.all(&range_reader).await.expect("range read");
    range_reader.set(&space.key(b"elsewhere"), b"x");
    space.put(store, &[(b"inside-the-range", b"")]).await;
    let err = range_reader
        .commit()
        .await
        .expect_err("a write inside a read range conflicts");
    assert!(matches!(err, KvError::Conflict), "got {err:?}");

    // A read that stopped at its limit saw nothing past its last key, so a
    // write past it must not fail the reader (queues depend on this).
    let limited = store.begin().expect("begin");
    let first_row = limited
        .get_range(&space.base, &space.end(), 1, false)
        .await
        .expect("limited range read");
    assert_eq!(first_row.len(), 1);
    limited.set(&space.key(b"elsewhere"), b"x");
    space.put(store, &[(b"zzz-past-the-limit", b"")]).await;
    limited
        .commit()
        .await
        .expect("a write past a limited read's last key does not conflict");

    // Both closures read before either commits (the barrier), so one of them
    // must conflict, retry, and read the other's increment.
    space.put(store, &[(b"counter", b"0")]).await;
    let barrier = tokio::sync::Barrier::new(2);
    let attempts = AtomicUsize::new(0);
    let increment = || {
        let (counter, barrier, attempts) = (&counter, &barrier, &attempts);
        let first_attempt = AtomicUsize::new(0);
        async move {
            let first_attempt = &first_attempt;
            run(store, |tx| async move {
                attempts.fetch_add(1, Ordering::SeqCst);
                let n: u32 = match tx.get(counter).await? {
                    Some(v) => String::from_utf8_lossy(&v).parse().unwrap_or(0),
                    None => 0,
                };
                if first_attempt.fetch_add(1, Ordering::SeqCst) == 0 {
                    barrier.wait().await;
                }
                tx.set(counter, (n + 1).to_string().as_bytes());
                Ok::<_, KvError>(())
            })
            .await
        }
    };
    for result in join_all([increment(), increment()]).await {
        result.expect("run retries conflicts to success");
    }
    let value = run(store, |tx| {
        let counter = &counter;
        async move { tx.get(counter).await }
    })
    .await
    .expect("read counter");
    assert_eq!(value, Some(b"2".to_vec()), "both increments landed");
    assert!(
        attempts.load(Ordering::SeqCst) >= 3,
        "one attempt was retried"
    );
    space.clean(store).await;
}

/// Transactions that only write (or only atomically add) never conflict.
pub async fn blind_writes_do_not_conflict<S: KvStore>(store: &S, prefix: &[u8]) {
    let space = Space::new(prefix, "blind_writes");
    let k = space.key(b"k");
    let n = space.key(b"n");
    let elsewhere = space.key(b"elsewhere");
    let first = store.begin().expect("begin");
    let second = store.begin().expect("begin");
    // Reads of other keys fix both snapshots before either commits.
    first.get(&elsewhere).await.expect("read");
    second.get(&elsewhere).await.expect("read");
    first.set(&k, b"first");
    second.set(&k, b"second");
    first.atomic_add(&n, 1);
    second.atomic_add(&n, 1);
    first.commit().await.expect("blind write commits");
    second
        .commit()
        .await
        .expect("a concurrent blind write commits too");
    let committed = space.committed(store).await;
    assert_eq!(
        committed,
        rows(&[(b"k", b"second"), (b"n", &2i64.to_le_bytes())]),
        "the last commit wins; adds sum"
    );
    space.clean(store).await;
}

/// Atomic adds from many concurrent transactions sum exactly, negatives included.
pub async fn atomic_add_sums_exactly<S: KvStore>(store: &S, prefix: &[u8]) {
    let space = Space::new(prefix, "atomic_add");
    let n = space.key(b"n");
    let adds = (0..100i64).map(|i| {
        let n = &n;
        run(store, move |tx| async move {
            tx.atomic_add(n, if i % 10 == 0 { -1 } else { 2 });
            Ok::<_, KvError>(())
        })
    });
    for result in join_all(adds).await {
        result.expect("atomic add commits");
    }
    let value = run(store, |tx| {
        let n = &n;
        async move { tx.get(n).await }
    })
    .await
    .expect("read sum")
    .expect("the sum exists");
    assert_eq!(le(&value), 90 * 2 - 10);
    space.clean(store).await;
}

/// Versionstamped keys are unique and sort in commit order.
pub async fn versionstamps_are_unique_and_increase<S: KvStore>(store: &S, prefix: &[u8]) {
    let space = Space::new(prefix, "versionstamps");
    let log = space.key(b"log/");
    for i in 0u8..5 {
        let log = &log;
        run(store, move |tx| async move {
            tx.set_versionstamped_key(log, &[i], &[i]);
            Ok::<_, KvError>(())
        })
        .await
        .expect("versionstamped commit");
    }
    let concurrent = (5u8..45).map(|i| {
        let log = &log;
        run(store, move |tx| async move {
            tx.set_versionstamped_key(log, &[i], &[i]);
            Ok::<_, KvError>(())
        })
    });
    for result in join_all(concurrent).await {
        result.expect("concurrent versionstamped commit");
    }
    let entries = space.committed(store).await;
    assert_eq!(entries.len(), 45, "every commit wrote its own key");
    let mut stamps = Vec::new();
    for (key, value) in &entries {
        let key = &key[b"log/".len()..];
        assert_eq!(key.len(), VERSIONSTAMP_BYTES + 1);
        assert_eq!(
            key[VERSIONSTAMP_BYTES], value[0],
            "suffix follows the stamp"
        );
        stamps.push(key[..VERSIONSTAMP_BYTES].to_vec());
    }
    assert!(stamps.windows(2).all(|w| w[0] < w[1]), "stamps are unique");
    let sequential: Vec<u8> = entries.iter().take(5).map(|(_, v)| v[0]).collect();
    assert_eq!(
        sequential,
        vec![0, 1, 2, 3, 4],
        "stamps follow commit order"
    );
    space.clean(store).await;
}

/// Within one transaction every versionstamped key gets the same stamp
/// (so keys that must differ differ in their suffix: the ledger's queue
/// numbers them), ordered by suffix; the same key stamped twice keeps the
/// last value (the S3 journal writes a record's final state so).
pub async fn versionstamps_within_one_transaction<S: KvStore>(store: &S, prefix: &[u8]) {
    let space = Space::new(prefix, "versionstamps_in_one");
    let log = space.key(b"log/");
    let log = &log;
    run(store, move |tx| async move {
        tx.set_versionstamped_key(log, b"b", b"first b");
        tx.set_versionstamped_key(log, b"a", b"a");
        tx.set_versionstamped_key(log, b"b", b"last b");
        Ok::<_, KvError>(())
    })
    .await
    .expect("versionstamped commit");
    let entries = space.committed(store).await;
    let found: Vec<(&[u8], &[u8], &[u8])> = entries
        .iter()
        .map(|(k, v)| {
            let k = &k[b"log/".len()..];
            (
                &k[..VERSIONSTAMP_BYTES],
                &k[VERSIONSTAMP_BYTES..],
                v.as_slice(),
            )
        })
        .collect();
    assert_eq!(found.len(), 2, "one key per suffix: {found:?}");
    assert_eq!(found[0].0, found[1].0, "one stamp per transaction");
    assert_eq!(
        (found[0].1, found[0].2, found[1].1, found[1].2),
        (&b"a"[..], &b"a"[..], &b"b"[..], &b"last b"[..]),
        "ordered by suffix, the last write kept"
    );
    space.clean(store).await;
}

/// Key, value and transaction sizes over FoundationDB's limits fail at commit
/// with the matching error; sizes at the limits commit.
pub async fn size_limits<S: KvStore>(store: &S, prefix: &[u8]) {
    let space = Space::new(prefix, "size_limits");
    let key_of = |len: usize| {
        let mut key = space.key(b"");
        key.resize(len, b'k');
        key
    };

    let at_limits = store.begin().expect("begin");
    at_limits.set(&key_of(MAX_KEY_BYTES), &vec![1u8; MAX_VALUE_BYTES]);
    at_limits
        .commit()
        .await
        .expect("a key and value at the limits commit");
    let err = at_limits.commit().await.expect_err("committed once");
    assert!(matches!(err, KvError::Finished), "got {err:?}");
    // A key at the limit, which could be set, can be cleared.
    let clear = store.begin().expect("begin");
    let mut at_limit = space.key(b"cleared");
    at_limit.resize(MAX_KEY_BYTES, b'x');
    clear.clear(&at_limit);
    clear
        .commit()
        .await
        .expect("a key at the limit is cleared as it was set");

    // A write within the limits, then one over: neither lands, however
    // often commit is called.
    let long_key = store.begin().expect("begin");
    long_key.set(&space.key(b"before"), b"v");
    long_key.set(&key_of(MAX_KEY_BYTES + 1), b"v");
    let err = long_key.commit().await.expect_err("key over the limit");
    assert!(
        matches!(err, KvError::KeyTooLarge(n) if n == MAX_KEY_BYTES + 1),
        "got {err:?}"
    );
    assert!(!err.is_retryable());
    let err = long_key.commit().await.expect_err("still refused");
    assert!(
        matches!(err, KvError::KeyTooLarge(_) | KvError::Finished),
        "got {err:?}"
    );

    let long_value = store.begin().expect("begin");
    long_value.set(&space.key(b"v"), &vec![0u8; MAX_VALUE_BYTES + 1]);
    let err = long_value.commit().await.expect_err("value over the limit");
    assert!(
        matches!(err, KvError::ValueTooLarge(n) if n == MAX_VALUE_BYTES + 1),
        "got {err:?}"
    );

    let huge = store.begin().expect("begin");
    let value = vec![0u8; MAX_VALUE_BYTES];
    for i in 0..=(MAX_TRANSACTION_BYTES / MAX_VALUE_BYTES) as u32 {
        huge.set(&space.key(&i.to_be_bytes()), &value);
    }
    let err = huge.commit().await.expect_err("transaction over the limit");
    assert!(
        matches!(err, KvError::TransactionTooLarge(n) if n > MAX_TRANSACTION_BYTES),
        "got {err:?}"
    );

    // Many small writes: their keys count three times (the mutation and
    // its write conflict range), as FoundationDB counts them, so 90 % of
    // the limit in keys and values alone is over it.
    let small = store.begin().expect("begin");
    let key_len = space.key(&0u32.to_be_bytes()).len();
    let n = (MAX_TRANSACTION_BYTES * 9 / 10 / (key_len + 64)) as u32;
    for i in 0..n {
        small.set(&space.key(&i.to_be_bytes()), &[7u8; 64]);
    }
    let err = small
        .commit()
        .await
        .expect_err("small writes over the limit");
    assert!(
        matches!(err, KvError::TransactionTooLarge(n) if n > MAX_TRANSACTION_BYTES),
        "got {err:?}"
    );
    // Reads count too (their conflict ranges): 10 MB of keys read, one set;
    // without the set, a read-only transaction commits whatever it read.
    for write in [true, false] {
        let reads = store.begin().expect("begin");
        for i in 0..=(MAX_TRANSACTION_BYTES / (2 * MAX_KEY_BYTES)) as u32 {
            let mut key = space.key(&i.to_be_bytes());
            key.resize(MAX_KEY_BYTES, b'r');
            reads.get(&key).await.expect("read");
        }
        if write {
            reads.set(&space.key(b"after reads"), b"v");
            let err = reads.commit().await.expect_err("reads over the limit");
            assert!(
                matches!(err, KvError::TransactionTooLarge(_)),
                "got {err:?}"
            );
        } else {
            reads.commit().await.expect("read-only commits");
        }
    }
    // A cleared key counts as the range [key, key + 0x00) it is.
    let clears = store.begin().expect("begin");
    let key_len = MAX_KEY_BYTES / 2;
    // As many as would fit if a clear cost what a set of no value does.
    for i in 0..(MAX_TRANSACTION_BYTES / (3 * key_len + 1)) as u32 {
        let mut key = space.key(&i.to_be_bytes());
        key.resize(key_len, b'c');
        clears.clear(&key);
    }
    let err = clears.commit().await.expect_err("clears over the limit");
    assert!(
        matches!(err, KvError::TransactionTooLarge(_)),
        "got {err:?}"
    );

    let rows = space.committed(store).await;
    assert_eq!(rows.len(), 1, "failed commits wrote nothing");
    space.clean(store).await;
}

/// A transaction older than 5 s fails reads and commit with retryable `TooOld`.
pub async fn too_old<S: KvStore>(store: &S, prefix: &[u8]) {
    let space = Space::new(prefix, "too_old");
    let tx = store.begin().expect("begin");
    tx.get(&space.key(b"k")).await.expect("fresh read");
    tx.set(&space.key(b"k"), b"v");
    tokio::time::sleep(MAX_TRANSACTION_AGE + Duration::from_millis(200)).await;

    let err = tx
        .get(&space.key(b"other"))
        .await
        .expect_err("read after 5 s");
    assert!(matches!(err, KvError::TooOld), "got {err:?}");
    assert!(err.is_retryable());
    let err = tx.commit().await.expect_err("commit after 5 s");
    assert!(matches!(err, KvError::TooOld), "got {err:?}");
    assert!(space.committed(store).await.is_empty(), "nothing committed");
    space.clean(store).await;
}
