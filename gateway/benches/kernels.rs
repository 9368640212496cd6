//! Per-byte kernels of the data plane, each beside its raw baseline so the
//! figures read as ratios within one run:
//!
//! - content hashing: plain BLAKE3 vs the streamed BLAKE3 + Bao outboard
//!   (`protocol::bao::OutboardBuilder`, what ingest runs) vs SHA-256;
//! - stripe coding: RS(4,2) parity alone vs what ingest does per stripe
//!   (`encode_stripe` plus a BLAKE3 per shard);
//! - rebuild: RS(4,2) reconstruction of two lost data shards;
//! - verified ranges: `protocol::bao::verify_range` over an 8 MiB window.
//!
//! `cargo bench -p gateway --bench kernels`; figures in BENCHMARKS.md.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use protocol::bao;
use reed_solomon_erasure::galois_8::ReedSolomon;
use sha2::Digest;
use std::hint::black_box;

const PIECE: usize = 256 << 10;

fn content(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i.wrapping_mul(2654435761) >> 11) as u8)
        .collect()
}

fn hashing(c: &mut Criterion) {
    let data = content(64 << 20);
    let mut g = c.benchmark_group("hash 64 MiB");
    g.throughput(Throughput::Bytes(data.len() as u64));
    g.sample_size(10);
    g.bench_function("blake3 (baseline)", |b| {
        b.iter(|| {
            let mut h = blake3::Hasher::new();
            data.chunks(PIECE).for_each(|p| {
                h.update(p);
            });
            black_box(h.finalize())
        })
    });
    g.bench_function("blake3 + bao outboard", |b| {
        b.iter(|| {
            let mut h = bao::OutboardBuilder::new();
            let mut pairs = 0;
            for p in data.chunks(PIECE) {
                h.update(p);
                pairs += h.take_pairs().len();
            }
            let (root, rest) = h.finish();
            black_box((root, pairs + rest.len()))
        })
    });
    g.bench_function("sha256", |b| {
        b.iter(|| {
            let mut h = sha2::Sha256::new();
            data.chunks(PIECE).for_each(|p| h.update(p));
            black_box(h.finalize())
        })
    });
    g.finish();
}

fn coding(c: &mut Criterion) {
    let (k, m, shard) = (4usize, 2usize, 1usize << 20);
    let rs = ReedSolomon::new(k, m).expect("valid code");
    let stripe = content(k * shard);
    let mut g = c.benchmark_group("RS(4,2) 4 MiB stripe");
    g.throughput(Throughput::Bytes(stripe.len() as u64));
    let mut shards: Vec<Vec<u8>> = stripe.chunks(shard).map(<[u8]>::to_vec).collect();
    shards.extend((0..m).map(|_| vec![0u8; shard]));
    g.bench_function("parity only (baseline)", |b| {
        b.iter(|| rs.encode(&mut shards).expect("encode"))
    });
    let pool = storage_node::buffers::BufferPool::new(2 * (k + m) * shard);
    g.bench_function("ingest: encode_stripe + shard hashes", |b| {
        b.iter(|| {
            let shards =
                gateway::ingest::encode_stripe(&rs, k, m, &stripe, shard, &pool).expect("encode");
            let hashes: Vec<_> = shards.iter().map(|s| blake3::hash(s)).collect();
            shards.into_iter().for_each(|s| pool.give(s));
            black_box(hashes)
        })
    });
    g.bench_function("ingest, fresh buffers (no pool)", |b| {
        let none = storage_node::buffers::BufferPool::new(0);
        b.iter(|| {
            let shards =
                gateway::ingest::encode_stripe(&rs, k, m, &stripe, shard, &none).expect("encode");
            black_box(shards.iter().map(|s| blake3::hash(s)).collect::<Vec<_>>())
        })
    });
    for lost in [1usize, 2] {
        g.bench_with_input(
            BenchmarkId::new("rebuild data shards", lost),
            &lost,
            |b, &lost| {
                b.iter(|| {
                    let mut got: Vec<Option<Vec<u8>>> = shards.iter().cloned().map(Some).collect();
                    for s in got.iter_mut().take(lost) {
                        *s = None;
                    }
                    rs.reconstruct_data(&mut got).expect("rebuild");
                    black_box(got)
                })
            },
        );
    }
    g.finish();
}

fn verified_ranges(c: &mut Criterion) {
    let data = content(64 << 20);
    let mut b = bao::OutboardBuilder::new();
    b.update(&data);
    let mut pairs: std::collections::HashMap<_, _> = b.take_pairs().into_iter().collect();
    let (root, rest) = b.finish();
    pairs.extend(rest);
    let size = data.len() as u64;
    let window = 24 * bao::GROUP_SIZE..32 * bao::GROUP_SIZE;
    let needed = bao::nodes_for(size, window.clone());
    let outboard = bao::PairOutboard {
        root,
        size,
        pairs: needed.iter().map(|n| (*n, pairs[n])).collect(),
    };
    let bytes = &data[window.start as usize..window.end as usize];
    let mut g = c.benchmark_group("verified range 8 MiB");
    g.throughput(Throughput::Bytes(bytes.len() as u64));
    g.bench_function("blake3 of the window (baseline)", |b| {
        b.iter(|| black_box(blake3::hash(bytes)))
    });
    g.bench_function("bao verify_range", |b| {
        b.iter(|| bao::verify_range(&outboard, window.clone(), bytes).expect("verifies"))
    });
    g.finish();
}

criterion_group!(kernels, hashing, coding, verified_ranges);
criterion_main!(kernels);
