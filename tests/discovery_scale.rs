//! Scale: twenty nodes in twenty namespaces on one bridge; reports how long until every node has
//! discovered (and proved the key of) every other.

mod support;

use std::time::{Duration, Instant};

use support::grid::assert_eventually;
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
    assert_eventually(
        Duration::from_secs(90),
        "every node lists every other, verified",
        || {
            lan.hosts.iter().all(|h| {
                h.api("GET", "/peers/discovered", None).1["peers"]
                    .as_array()
                    .is_some_and(|ps| {
                        ps.len() == NODES - 1
                            && ps.iter().all(|p| {
                                p["sources"]
                                    .as_array()
                                    .is_some_and(|s| s.iter().any(|x| x == "mdns"))
                            })
                    })
            })
        },
    );
    eprintln!(
        "{NODES} nodes: all started after {all_up:?}; every node had verified every other {:?} after the first start ({:?} after the last)",
        started.elapsed(),
        started.elapsed() - all_up
    );
}
