//! Scale: twenty nodes in twenty namespaces on one bridge; reports how long until every node has
//! discovered (and proved the key of) every other by mDNS.

mod support;

use std::time::{Duration, Instant};

use support::netns::{Lan, NsNode, MDNS_ON_LAN};

const NODES: usize = 20;

#[test]
fn twenty_nodes_all_see_each_other() {
    let Some(lan) = Lan::create(NODES) else {
        return;
    };
    let started = Instant::now();
    let _nodes: Vec<NsNode> = lan
        .hosts
        .iter()
        .map(|h| NsNode::start(h, &["m"], MDNS_ON_LAN))
        .collect();
    let all_up = started.elapsed();
    // Per node: how many others it lists with the mDNS source (their key proven by hello).
    let verified = || -> Vec<usize> {
        lan.hosts
            .iter()
            .map(|h| {
                h.api("GET", "/peers/discovered", None).1["peers"]
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
            })
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let seen = verified();
        if seen.iter().all(|n| *n == NODES - 1) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not every node saw every other within 90 s; verified peers per node: {seen:?}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    eprintln!(
        "{NODES} nodes: all started after {all_up:?}; every node had verified every other {:?} after the first start ({:?} after the last)",
        started.elapsed(),
        started.elapsed() - all_up
    );
}
