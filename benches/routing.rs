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

/// Nanoseconds this thread has spent on a CPU (`/proc/thread-self/schedstat`, first field).
fn thread_cpu_ns() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    s.split_whitespace().next()?.parse().ok()
}

/// CPU time per call, beside criterion's wall-clock figures: on a shared machine a thread waits
/// for a core, and wall time counts the wait; the scheduler's own account of the time this
/// thread ran does not. Medians of 5 rounds of 0.5 s each.
fn cpu_per_call(c: &mut Criterion) {
    let _ = c;
    for n in [10usize, 100, 1000] {
        let views = peers(n);
        let mut rounds: Vec<f64> = (0..5)
            .filter_map(|_| {
                let start = std::time::Instant::now();
                let before = thread_cpu_ns()?;
                let mut calls = 0u64;
                while start.elapsed() < std::time::Duration::from_millis(500) {
                    for _ in 0..100 {
                        black_box(rank_peers(black_box(&views)).take(4).count());
                    }
                    calls += 100;
                }
                let spent = thread_cpu_ns()? - before;
                Some(spent as f64 / calls as f64 / 1000.0)
            })
            .collect();
        rounds.sort_by(f64::total_cmp);
        if let Some(median) = rounds.get(rounds.len() / 2) {
            eprintln!("rank_peers best 4 of {n}: {median:.2} µs CPU per call (median of 5)");
        }
    }
}

criterion_group!(benches, bench, cpu_per_call);
criterion_main!(benches);
