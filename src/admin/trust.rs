//! The owner's trust boundary (DESIGN §7), as pure functions of a request's header.
//!
//! - [`HostPolicy`]: the `Host` names the API listener answers to. Any other name is refused
//!   on every route, so a web page whose DNS name was rebound to this machine reads and changes
//!   nothing.
//! - [`Caller`]: the owner is a request from loopback, with no forwarding header, that no
//!   cross-site page sent (`Sec-Fetch-Site`, or `Origin` when the browser sends no fetch
//!   metadata). Anybody else, reads included, needs the admin token.
//! - [`check_admin`]: changes also need a JSON body (a cross-site page can only send
//!   `text/plain`, form or multipart bodies without a CORS preflight, which is never granted)
//!   and are refused outright when a browser says they come from another site, token or not.
//!
//! No sockets here: the admin router and the gateway feed these from the request header.

use std::net::IpAddr;

use http::{header, HeaderMap, Method};

/// Headers that mean "a proxy forwarded this": the loopback exemption does not apply.
pub const FORWARDING_HEADERS: [&str; 4] = ["x-forwarded-for", "forwarded", "x-real-ip", "via"];

/// Which `Host` names the API listener answers to.
#[derive(Debug, Clone, Default)]
pub struct HostPolicy {
    /// Names from the config (`api.allowed_hosts`), lower case.
    configured: Vec<String>,
    /// This machine's host name, lower case, when known.
    hostname: Option<String>,
}

impl HostPolicy {
    /// Answers to IP literals, `localhost` and `*.localhost`, `hostname` and `hostname.local`,
    /// `*.internal` (`host.docker.internal`), and the `configured` names. None of these can be
    /// a name that a stranger's web page is served from (the public DNS has no such names),
    /// which is what defeats DNS rebinding.
    pub fn new(configured: &[String], hostname: Option<&str>) -> Self {
        HostPolicy {
            configured: configured.iter().map(|h| h.to_ascii_lowercase()).collect(),
            hostname: hostname
                .map(|h| h.trim().trim_end_matches('.').to_ascii_lowercase())
                .filter(|h| !h.is_empty()),
        }
    }

    /// Whether a request with this `Host` header (absent for HTTP/1.0) is one for us.
    pub fn allows(&self, host: Option<&str>) -> bool {
        let Some(host) = host else {
            // Browsers always send Host; a client without one is not a rebound page.
            return true;
        };
        let Some(name) = host_name(host) else {
            return false;
        };
        if name.parse::<IpAddr>().is_ok() {
            return true;
        }
        name == "localhost"
            || name.ends_with(".localhost")
            || name.ends_with(".internal")
            || self
                .hostname
                .as_deref()
                .is_some_and(|h| name == h || name.strip_suffix(".local").is_some_and(|n| n == h))
            || self.configured.contains(&name)
    }

    /// Whether `name` was listed in the config (`api.allowed_hosts`).
    fn configured(&self, name: &str) -> bool {
        self.configured.iter().any(|c| c == name)
    }
}

/// The host part of a `Host` (or `Origin` authority) value, lower case, without port, brackets
/// or a trailing dot; `None` when it is not a plausible host.
pub fn host_name(authority: &str) -> Option<String> {
    let authority = authority.trim();
    let name = if let Some(rest) = authority.strip_prefix('[') {
        rest.split_once(']')?.0
    } else {
        match authority.rsplit_once(':') {
            Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
            Some(_) => return None,
            None => authority,
        }
    };
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    let plausible = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._:".contains(&b));
    plausible.then_some(name)
}

/// Who is asking, as far as the admin API is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller {
    /// A program on this machine talking to us directly (a local `curl`, the admin page
    /// opened on `http://127.0.0.1:8910/`).
    Owner,
    /// Someone who presented the admin token.
    TokenHolder,
    /// Anybody else: a proxy's client, the LAN, a page on another site.
    Stranger,
}

/// Why an admin request was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// 401: reads and changes from here need the token.
    TokenRequired,
    /// 403: a browser says another site sent this change.
    CrossSite(String),
    /// 415: a change without a JSON body.
    NotJson,
}

/// What the trust decisions read from a request.
#[derive(Debug, Clone, Copy)]
pub struct RequestFacts<'a> {
    /// The method.
    pub method: &'a Method,
    /// The header.
    pub headers: &'a HeaderMap,
    /// The TCP peer's address, when known.
    pub client_ip: Option<IpAddr>,
    /// Whether the admin token was presented and is right.
    pub token_ok: bool,
}

/// Whether a browser says this request comes from another site: `Sec-Fetch-Site` when present
/// (every current browser sends it), else an `Origin` other than the request's own.
pub fn cross_site(headers: &HeaderMap, hosts: &HostPolicy) -> Option<String> {
    let value = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(site) = value("sec-fetch-site") {
        return match site.trim().to_ascii_lowercase().as_str() {
            "same-origin" | "none" => None,
            other => Some(format!("Sec-Fetch-Site: {other}")),
        };
    }
    let origin = value(header::ORIGIN.as_str())?.trim();
    let authority = origin.split_once("://").map(|(_, a)| a);
    let same = authority.is_some_and(|a| {
        value(header::HOST.as_str()).is_some_and(|h| h.eq_ignore_ascii_case(a))
            || host_name(a).is_some_and(|n| hosts.configured(&n))
    });
    (!same).then(|| format!("Origin: {origin}"))
}

/// Who the caller is: the owner, a token holder or a stranger.
pub fn caller(facts: &RequestFacts<'_>, hosts: &HostPolicy) -> Caller {
    if facts.token_ok {
        return Caller::TokenHolder;
    }
    let loopback = facts.client_ip.is_some_and(|ip| ip.is_loopback());
    let forwarded = FORWARDING_HEADERS
        .iter()
        .any(|h| facts.headers.contains_key(*h));
    if loopback && !forwarded && cross_site(facts.headers, hosts).is_none() {
        Caller::Owner
    } else {
        Caller::Stranger
    }
}

/// Whether an admin request may proceed. Reads need the owner or the token; changes also need
/// a JSON body and must not come from another site, whoever sends them.
pub fn check_admin(facts: &RequestFacts<'_>, hosts: &HostPolicy) -> Result<Caller, Refusal> {
    let read_only = facts.method == Method::GET || facts.method == Method::HEAD;
    if !read_only {
        if let Some(why) = cross_site(facts.headers, hosts) {
            return Err(Refusal::CrossSite(why));
        }
        if !is_json(facts.headers) {
            return Err(Refusal::NotJson);
        }
    }
    match caller(facts, hosts) {
        Caller::Stranger => Err(Refusal::TokenRequired),
        who => Ok(who),
    }
}

/// `Content-Type: application/json`, with or without parameters.
fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    fn policy() -> HostPolicy {
        HostPolicy::new(
            &["arknet".to_string(), "ark.lan".to_string()],
            Some("myhost"),
        )
    }

    fn check(
        method: Method,
        pairs: &[(&'static str, &'static str)],
        ip: &str,
        token_ok: bool,
    ) -> Result<Caller, Refusal> {
        let h = headers(pairs);
        let facts = RequestFacts {
            method: &method,
            headers: &h,
            client_ip: Some(ip.parse().expect("ip")),
            token_ok,
        };
        check_admin(&facts, &policy())
    }

    const JSON: (&str, &str) = ("content-type", "application/json");

    #[test]
    fn host_names_a_page_could_be_served_from_are_refused() {
        let p = policy();
        for ok in [
            "127.0.0.1:8910",
            "[::1]:8910",
            "192.168.1.5",
            "localhost:8910",
            "LOCALHOST",
            "ark.localhost",
            "host.docker.internal:8910",
            "myhost:8910",
            "myhost.local",
            "arknet",
            "ark.lan:443",
        ] {
            assert!(p.allows(Some(ok)), "{ok} should be allowed");
        }
        for bad in [
            "evil.example:8910",
            "evil.example",
            "localhost.evil.example",
            "127.0.0.1.nip.io",
            "myhost.evil",
            "",
            "a b",
            "evil.example:80:80",
        ] {
            assert!(!p.allows(Some(bad)), "{bad} should be refused");
        }
        assert!(p.allows(None), "HTTP/1.0 without Host is not a browser");
    }

    #[test]
    fn a_local_curl_is_the_owner_for_reads_and_changes() {
        assert_eq!(
            check(Method::GET, &[], "127.0.0.1", false),
            Ok(Caller::Owner)
        );
        assert_eq!(
            check(Method::POST, &[JSON], "127.0.0.1", false),
            Ok(Caller::Owner)
        );
        assert_eq!(
            check(Method::POST, &[JSON], "::1", false),
            Ok(Caller::Owner)
        );
    }

    #[test]
    fn the_admin_page_on_its_own_origin_is_the_owner() {
        let same = [
            JSON,
            ("origin", "http://127.0.0.1:8910"),
            ("host", "127.0.0.1:8910"),
            ("sec-fetch-site", "same-origin"),
        ];
        assert_eq!(
            check(Method::POST, &same, "127.0.0.1", false),
            Ok(Caller::Owner)
        );
        let old_browser = [
            JSON,
            ("origin", "http://localhost:8910"),
            ("host", "localhost:8910"),
        ];
        assert_eq!(
            check(Method::POST, &old_browser, "127.0.0.1", false),
            Ok(Caller::Owner)
        );
    }

    #[test]
    fn a_cross_site_change_is_refused_even_with_the_token() {
        for pairs in [
            &[JSON, ("sec-fetch-site", "cross-site")][..],
            &[JSON, ("sec-fetch-site", "same-site")][..],
            &[
                JSON,
                ("origin", "http://evil.example"),
                ("host", "127.0.0.1:8910"),
            ][..],
            &[
                JSON,
                ("origin", "http://127.0.0.5:9000"),
                ("host", "127.0.0.1:8910"),
            ][..],
            &[JSON, ("origin", "null"), ("host", "127.0.0.1:8910")][..],
        ] {
            for token in [false, true] {
                assert!(
                    matches!(
                        check(Method::POST, pairs, "127.0.0.1", token),
                        Err(Refusal::CrossSite(_))
                    ),
                    "{pairs:?} token={token}"
                );
            }
        }
    }

    #[test]
    fn a_change_without_a_json_body_is_refused() {
        for ct in [
            "text/plain",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
            "application/jsonp",
        ] {
            let h: [(&str, &str); 1] = [("content-type", ct)];
            let h = h.map(|(k, v)| (k, Box::leak(v.to_string().into_boxed_str()) as &'static str));
            assert_eq!(
                check(Method::POST, &h, "127.0.0.1", false),
                Err(Refusal::NotJson),
                "{ct}"
            );
        }
        assert_eq!(
            check(Method::POST, &[], "127.0.0.1", true),
            Err(Refusal::NotJson)
        );
        let with_charset = [("content-type", "Application/JSON; charset=utf-8")];
        assert_eq!(
            check(Method::PATCH, &with_charset, "127.0.0.1", false),
            Ok(Caller::Owner)
        );
    }

    #[test]
    fn reads_from_elsewhere_need_the_token() {
        assert_eq!(
            check(Method::GET, &[], "192.168.1.9", false),
            Err(Refusal::TokenRequired)
        );
        let proxied = [("x-forwarded-for", "192.168.1.9")];
        assert_eq!(
            check(Method::GET, &proxied, "127.0.0.1", false),
            Err(Refusal::TokenRequired)
        );
        let cross = [("sec-fetch-site", "cross-site")];
        assert_eq!(
            check(Method::GET, &cross, "127.0.0.1", false),
            Err(Refusal::TokenRequired)
        );
        assert_eq!(
            check(Method::GET, &proxied, "127.0.0.1", true),
            Ok(Caller::TokenHolder)
        );
        assert_eq!(
            check(Method::POST, &[JSON], "10.0.0.2", true),
            Ok(Caller::TokenHolder)
        );
    }
}
