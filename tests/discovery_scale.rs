//! Scale: fifty nodes in fifty namespaces on one bridge, started one after another as a
//! street's would be. Every node must have discovered, and proved the key of, every other by
//! mDNS within ten seconds of the last start; then the test reports what each node costs in
//! CPU while idle with 49 peers.

mod support;

use std::time::{Duration, Instant};

use support::netns::{Host, Lan, NsNode, MDNS_ON_LAN};

const NODES: usize = 50;
/// Promised: from the last node's start until every node lists every other.
const CONVERGED_WITHIN: Duration = Duration::from_secs(10);
/// How long the test keeps watching, to report how late a slow grid is (bounded).
const WATCH_AT_MOST: Duration = Duration::from_secs(60);
/// Measurement window for the idle CPU figure.
const IDLE_WINDOW: Duration = Duration::from_secs(20);
/// A node idling among 49 peers must stay far below this share of one core.
const IDLE_CPU_AT_MOST: f64 = 0.05;

/// How many others `host` lists with the mDNS source (their key proven by hello).
fn verified_by_mdns(host: &Host) -> usize {
    host.api("GET", "/peers/discovered", None).1["peers"]
        .as_array()
        .map_or(0, |ps| {
            ps.iter()
                .filter(|p| {
                    p["sources"]
                        .as_array()
                        .is_some_and(|s| s.iter().any(|x| x == "mdns"))
                })
                .count()
        })
}

#[test]
fn fifty_nodes_verify_each_other_within_ten_seconds_of_the_last_start() {
    let Some(lan) = Lan::create(NODES) else {
        return;
    };
    let first_start = Instant::now();
    let mut last_start = first_start;
    let mut nodes: Vec<NsNode> = Vec::with_capacity(NODES);
    for h in &lan.hosts {
        last_start = Instant::now();
        nodes.push(NsNode::start(h, &["m"], MDNS_ON_LAN));
    }
    let spread = last_start - first_start;

    // When each node first listed all the others, counted from the last start.
    let mut converged: Vec<Option<Duration>> = vec![None; NODES];
    let mut counts = vec![0; NODES];
    while converged.iter().any(Option::is_none) && last_start.elapsed() < WATCH_AT_MOST {
        for (i, h) in lan.hosts.iter().enumerate() {
            if converged[i].is_none() {
                counts[i] = verified_by_mdns(h);
                if counts[i] == NODES - 1 {
                    converged[i] = Some(last_start.elapsed());
                }
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let slowest = converged.iter().flatten().max().copied();
    eprintln!(
        "{NODES} nodes started over {spread:?}; verified peers per node: {counts:?}; \
         every node listed every other {slowest:?} after the last start"
    );
    assert!(
        converged.iter().all(Option::is_some),
        "not converged {WATCH_AT_MOST:?} after the last start; peers verified per node: {counts:?}"
    );

    // Idle: nothing starts or stops; hellos, mDNS upkeep and catalog refreshes go on.
    let before: Vec<Duration> = nodes.iter().map(|n| n.node.cpu_time()).collect();
    std::thread::sleep(IDLE_WINDOW);
    let shares: Vec<f64> = nodes
        .iter()
        .zip(&before)
        .map(|(n, b)| (n.node.cpu_time() - *b).as_secs_f64() / IDLE_WINDOW.as_secs_f64())
        .collect();
    let mean = shares.iter().sum::<f64>() / shares.len() as f64;
    let max = shares.iter().copied().fold(0.0, f64::max);
    eprintln!(
        "idle with {} peers, over {IDLE_WINDOW:?}: CPU per node mean {:.2}% max {:.2}% of one core",
        NODES - 1,
        mean * 100.0,
        max * 100.0
    );
    let slowest = slowest.unwrap_or(WATCH_AT_MOST);
    assert!(
        slowest <= CONVERGED_WITHIN,
        "converged only {slowest:?} after the last start (promised {CONVERGED_WITHIN:?})"
    );
    assert!(
        max < IDLE_CPU_AT_MOST,
        "a node idles at {:.1}% CPU",
        max * 100.0
    );
}
