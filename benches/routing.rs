//! Routing decisions are pure functions over a snapshot; this measures them at grid sizes far
//! beyond a household's (1,000 peers, 16 backends) to show they cost microseconds.
//!
//! `cargo bench --bench routing`

use std::hint::black_box;

use arknet::catalog::ListedModel;
use arknet::config::BackendKind;
use arknet::error::Dialect;
use arknet::routing::{rank, rank_peers, BackendView, PeerView};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};

fn peers(n: usize) -> Vec<PeerView> {
    (0..n)
        .map(|i| PeerView {
            free_slots: i % 5,
            hot: i % 2 == 0,
            our_in_flight: i % 3,
            grant: 4,
            latency_ms: (i % 17) as f64 * 0.7,
            failures: (i % 4) as u32,
            reliability: 1.0 - (i % 7) as f64 * 0.05,
            probation: i % 11 == 0,
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("rank_peers");
    for n in [10usize, 100, 1000] {
        let views = peers(n);
        // What a request does: the best four (the grid tries at most four peers).
        group.bench_with_input(BenchmarkId::new("best 4", n), &views, |b, v| {
            b.iter(|| rank_peers(black_box(v)).take(4).collect::<Vec<usize>>())
        });
        // The whole order, for comparison.
        group.bench_with_input(BenchmarkId::new("all", n), &views, |b, v| {
            b.iter(|| rank_peers(black_box(v)).collect::<Vec<usize>>())
        });
    }
    group.finish();

    let models: Vec<Vec<ListedModel>> = (0..16)
        .map(|b| {
            (0..50)
                .map(|m| ListedModel::named(&format!("model-{b}-{m}:latest")))
                .collect()
        })
        .collect();
    let backends: Vec<BackendView<'_>> = models
        .iter()
        .enumerate()
        .map(|(i, m)| BackendView {
            kind: if i % 2 == 0 {
                BackendKind::Ollama
            } else {
                BackendKind::Openai
            },
            models: Some(m),
            in_flight: i % 4,
            capacity: 4,
        })
        .collect();
    c.bench_function("rank 16 backends x 50 models", |b| {
        b.iter(|| {
            rank(
                black_box("model-15-49"),
                Dialect::OpenAi,
                black_box(&backends),
            )
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
