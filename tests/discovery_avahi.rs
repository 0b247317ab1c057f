//! Interoperability with avahi: an avahi-daemon on the same LAN (another namespace) sees an
//! ArkNet node's `_arknet._tcp` record with its TXT; and a record published with avahi that
//! claims a key its address cannot prove over TLS is refused as a spoof.

mod support;

use std::time::Duration;

use support::avahi::Avahi;
use support::grid::assert_eventually;
use support::netns::{Lan, NsNode, MDNS_ON_LAN};

#[test]
fn avahi_sees_the_node_and_a_forged_record_is_refused_as_a_spoof() {
    let Some(lan) = Lan::create(3) else { return };
    let (a, b, c) = (&lan.hosts[0], &lan.hosts[1], &lan.hosts[2]);
    let _node_a = NsNode::start(a, &["llama3.1:8b"], MDNS_ON_LAN);
    let _node_b = NsNode::start(b, &["qwen3.5:35b"], MDNS_ON_LAN);
    let health = |h: &support::netns::Host| h.api("GET", "/health", None).1;
    let (id_a, key_a) = (
        health(a)["node_id"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        health(a)["public_key"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
    );
    let key_b = health(b)["public_key"]
        .as_str()
        .unwrap_or_default()
        .to_string();

    let avahi = Avahi::start(c);
    let seen = avahi.browse_until(c, Duration::from_secs(20), |out| {
        out.contains(&id_a) && out.contains("\"pk=")
    });
    let line = seen
        .lines()
        .find(|l| l.starts_with('=') && l.contains(&id_a))
        .expect("resolved line");
    assert!(line.contains(&format!("\"pk={key_a}\"")), "{line}");
    assert!(
        line.contains(&format!("\"id={id_a}\"")) && line.contains("\"v=1\""),
        "{line}"
    );
    assert!(
        line.contains(&a.ip.to_string()) && line.contains(";8911;"),
        "{line}"
    );
    eprintln!("avahi-browse on another host: {line}");

    // A forged record: B's key, at C's address, where no node holds B's key.
    let _forged = avahi.publish(
        c,
        "ark-forged",
        8911,
        &[
            "id=ark-forged".to_string(),
            format!("pk={key_b}"),
            "v=1".into(),
        ],
    );
    // C also runs a node, so C's address answers TLS, with C's own identity.
    let _node_c = NsNode::start(c, &["phi3:mini"], MDNS_ON_LAN);
    assert_eventually(
        Duration::from_secs(20),
        "a counts the forged record as a spoof",
        || {
            let (_, _) = a.api("GET", "/health", None);
            let metrics = std::process::Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &a.ns,
                    "curl",
                    "-s",
                    "http://127.0.0.1:8910/metrics",
                ])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            metrics
                .lines()
                .any(|l| l.starts_with("arknet_mesh_spoofs_total") && !l.ends_with(" 0"))
        },
    );
    let listed = a.api("GET", "/peers/discovered", None).1;
    let forged_listed = listed["peers"].as_array().is_some_and(|ps| {
        ps.iter().any(|p| {
            p["public_key"] == key_b.as_str()
                && p["endpoint"]
                    .as_str()
                    .is_some_and(|e| e.starts_with(&c.ip.to_string()))
        })
    });
    assert!(
        !forged_listed,
        "the forged record was listed as a candidate: {listed}"
    );
    assert!(
        listed["peers"]
            .as_array()
            .is_some_and(|ps| ps.iter().any(|p| p["public_key"] == key_b.as_str())),
        "b itself is still discovered at its real address: {listed}"
    );
}
