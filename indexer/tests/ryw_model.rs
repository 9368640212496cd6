//! Model test of the embedded store's read-your-writes merge: random writes
//! over a random committed base, checked against a BTreeMap after every step
//! (point and range reads, both directions, with limits) and after commit.

use std::collections::BTreeMap;

use indexer::{EmbeddedStore, KvStore, Transaction};
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Op {
    Set(u8, u8),
    Clear(u8),
    ClearRange(u8, u8),
    Add(u8, i8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u8..16, any::<u8>()).prop_map(|(k, v)| Op::Set(k, v)),
        (0u8..16).prop_map(Op::Clear),
        (0u8..17, 0u8..17).prop_map(|(b, e)| Op::ClearRange(b, e)),
        (0u8..16, any::<i8>()).prop_map(|(k, d)| Op::Add(k, d)),
    ]
}

type Model = BTreeMap<Vec<u8>, Vec<u8>>;

fn apply(model: &mut Model, tx: &impl Transaction, op: &Op) {
    match *op {
        Op::Set(k, v) => {
            tx.set(&[k], &[v]);
            model.insert(vec![k], vec![v]);
        }
        Op::Clear(k) => {
            tx.clear(&[k]);
            model.remove(&vec![k]);
        }
        Op::ClearRange(b, e) => {
            tx.clear_range(&[b], &[e]);
            model.retain(|k, _| !(k.as_slice() >= &[b][..] && k.as_slice() < &[e][..]));
        }
        Op::Add(k, d) => {
            tx.atomic_add(&[k], i64::from(d));
            let mut base = [0u8; 8];
            if let Some(old) = model.get(&vec![k]) {
                let n = old.len().min(8);
                base[..n].copy_from_slice(&old[..n]);
            }
            let sum = i64::from_le_bytes(base).wrapping_add(i64::from(d));
            model.insert(vec![k], sum.to_le_bytes().to_vec());
        }
    }
}

async fn check(model: &Model, tx: &impl Transaction, limit: usize) {
    for k in 0u8..16 {
        assert_eq!(
            tx.get(&[k]).await.expect("get"),
            model.get(&vec![k]).cloned()
        );
    }
    let all: Vec<_> = model.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    let forward = tx
        .get_range(&[0], &[16], limit, false)
        .await
        .expect("range");
    let backward = tx.get_range(&[0], &[16], limit, true).await.expect("range");
    let take = if limit == 0 { all.len() } else { limit };
    assert_eq!(forward, all.iter().take(take).cloned().collect::<Vec<_>>());
    assert_eq!(
        backward,
        all.iter().rev().take(take).cloned().collect::<Vec<_>>()
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn reads_match_a_model(
        base in proptest::collection::btree_map(0u8..16, any::<u8>(), 0..12),
        ops in proptest::collection::vec(op(), 1..24),
        limit in 0usize..5,
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        runtime.block_on(async {
            let dir = tempfile::tempdir().expect("tempdir");
            let store = EmbeddedStore::open(&dir.path().join("index.redb")).expect("open");
            let mut model = Model::new();
            let seed = store.begin().expect("begin");
            for (k, v) in &base {
                seed.set(&[*k], &[*v]);
                model.insert(vec![*k], vec![*v]);
            }
            seed.commit().await.expect("seed");

            let tx = store.begin().expect("begin");
            for op in &ops {
                apply(&mut model, &tx, op);
                check(&model, &tx, limit).await;
            }
            tx.commit().await.expect("commit");
            check(&model, &store.begin().expect("begin"), 0).await;
        });
    }
}
