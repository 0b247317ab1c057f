//! In-process tests of the connection app's pure parts: framing, the body budget and the
//! per-address bound. No sockets, no root.

use super::*;

fn request_with(te: &[&str]) -> RequestHeader {
    let mut h = RequestHeader::build("POST", b"/v1/chat/completions", None).expect("header");
    for v in te {
        h.append_header(header::TRANSFER_ENCODING, *v).expect("te");
    }
    h
}

#[test]
fn only_a_single_chunked_coding_is_accepted() {
    assert!(check_framing(&request_with(&[])).is_ok());
    assert!(check_framing(&request_with(&["chunked"])).is_ok());
    assert!(check_framing(&request_with(&[" Chunked "])).is_ok());
    for bad in [
        &["gzip, chunked"][..],
        &["chunked", "chunked"],
        &["identity"],
        &["x-custom"],
        &["gzip", "chunked"],
    ] {
        let e = check_framing(&request_with(bad)).expect_err("refused");
        assert_eq!(
            (e.status, e.code),
            (501, "unsupported_transfer_coding"),
            "{bad:?}"
        );
    }
}

#[test]
fn the_body_budget_refuses_beyond_its_limit_and_comes_back_on_drop() {
    let budget = BodyBudget::new(100);
    let mut a = budget.lease();
    a.grow(60).expect("fits");
    let mut b = budget.lease();
    assert_eq!(b.grow(41).expect_err("over").code, "overloaded");
    b.grow(40).expect("fits exactly");
    assert_eq!(budget.used(), 100);
    drop(a);
    assert_eq!(budget.used(), 40);
    b.grow(60).expect("room again");
    drop(b);
    assert_eq!(budget.used(), 0);
}

#[test]
fn one_address_gets_at_most_its_share_of_connections() {
    let clients = ClientConnections::new(2);
    let ip: IpAddr = "127.0.0.9".parse().expect("ip");
    let other: IpAddr = "127.0.0.10".parse().expect("ip");
    let first = clients.admit(Some(ip)).expect("first");
    let second = clients.admit(Some(ip)).expect("second");
    assert!(clients.admit(Some(ip)).is_none(), "third refused");
    assert!(
        clients.admit(Some(other)).is_some(),
        "another address is not affected"
    );
    drop(first);
    assert!(clients.admit(Some(ip)).is_some(), "a place is given back");
    drop(second);
    assert!(
        clients.open.lock().expect("lock").get(&ip).is_none(),
        "no entry left behind"
    );
    // No limit, or no IP (a Unix socket): always admitted, never counted.
    assert!(ClientConnections::new(0).admit(Some(ip)).is_some());
    assert!(matches!(clients.admit(None), Some(None)));
}
