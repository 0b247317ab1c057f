//! Every Prometheus metric the node exports, declared once: `arknet_<area>_<what>_<unit>`.
//!
//! Label values come from a closed set (route names, configured backends, models the catalog
//! knows); a model name a client invents is counted as `unknown`, so nobody can blow up the
//! series count by sending random names.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

/// Latency buckets in seconds: sub-millisecond proxy answers up to multi-minute generations.
const LATENCY_BUCKETS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 15.0, 60.0,
    300.0,
];

/// The node's metrics and the registry that renders them.
pub struct Metrics {
    registry: Registry,
    /// Requests answered, by route, model and status.
    pub requests: IntCounterVec,
    /// Time from request header to end of response, by route.
    pub duration: HistogramVec,
    /// Time from request header to first response byte sent, by route.
    pub ttfb: HistogramVec,
    /// Requests being served now.
    pub in_flight: IntGauge,
    /// Failed connection attempts to a backend.
    pub upstream_connect_errors: IntCounterVec,
    /// Requests in flight per backend.
    pub backend_in_flight: IntGaugeVec,
    /// 1 when the last model-list refresh of a backend succeeded.
    pub backend_up: IntGaugeVec,
    /// Models a backend lists.
    pub backend_models: IntGaugeVec,
    /// Peer requests by peer node id, direction (inbound/outbound) and status.
    pub peer_requests: IntCounterVec,
    /// Peer attempts that failed or were busy before the first byte, so the next candidate was tried.
    pub peer_failovers: IntCounterVec,
    /// Tokens of peer requests by peer, direction and kind (prompt/completion).
    pub peer_tokens: IntCounterVec,
    /// Duration of peer requests by direction.
    pub peer_duration: HistogramVec,
    /// Mesh requests refused before any backend, by reason.
    pub mesh_refused: IntCounterVec,
    /// Nodes whose TLS identity did not match the key they claimed or we pinned.
    pub mesh_spoofs: prometheus::IntCounter,
    /// Unapproved keys that connected but were not listed as pending: the bound on such
    /// sightings, in all or from one address, was reached.
    pub mesh_strangers_unlisted: prometheus::IntCounter,
    /// 1 while `approved_peers.json` parses, 0 while a corrupt file is being ignored.
    pub approvals_file_valid: IntGauge,
}

impl Metrics {
    /// Registers every metric in a fresh registry.
    pub fn new() -> Self {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "arknet_http_requests_total",
                "Requests answered on the API listener",
            ),
            &["route", "model", "status"],
        )
        .expect("static metric definition");
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "arknet_http_request_duration_seconds",
                "Time from request header to the end of the response",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["route"],
        )
        .expect("static metric definition");
        let ttfb = HistogramVec::new(
            HistogramOpts::new(
                "arknet_http_time_to_first_byte_seconds",
                "Time from request header to the response header sent to the client",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["route"],
        )
        .expect("static metric definition");
        let in_flight = IntGauge::new(
            "arknet_http_requests_in_flight",
            "Requests being served on the API listener",
        )
        .expect("static metric definition");
        let upstream_connect_errors = IntCounterVec::new(
            Opts::new(
                "arknet_upstream_connect_errors_total",
                "Failed connection attempts to a backend",
            ),
            &["backend"],
        )
        .expect("static metric definition");
        let backend_in_flight = IntGaugeVec::new(
            Opts::new(
                "arknet_backend_requests_in_flight",
                "Requests in flight per backend",
            ),
            &["backend"],
        )
        .expect("static metric definition");
        let backend_up = IntGaugeVec::new(
            Opts::new(
                "arknet_backend_up",
                "1 when the last model-list refresh of the backend succeeded",
            ),
            &["backend"],
        )
        .expect("static metric definition");
        let backend_models = IntGaugeVec::new(
            Opts::new("arknet_backend_models", "Models the backend lists"),
            &["backend"],
        )
        .expect("static metric definition");
        let peer_requests = IntCounterVec::new(
            Opts::new(
                "arknet_peer_requests_total",
                "Peer requests by peer, direction and status",
            ),
            &["peer", "direction", "status"],
        )
        .expect("static metric definition");
        let peer_failovers = IntCounterVec::new(
            Opts::new(
                "arknet_peer_failovers_total",
                "Peer attempts that failed or were busy before the first byte",
            ),
            &["peer"],
        )
        .expect("static metric definition");
        let peer_tokens = IntCounterVec::new(
            Opts::new("arknet_peer_tokens_total", "Tokens of peer requests"),
            &["peer", "direction", "kind"],
        )
        .expect("static metric definition");
        let peer_duration = HistogramVec::new(
            HistogramOpts::new(
                "arknet_peer_request_duration_seconds",
                "Duration of peer requests",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["direction"],
        )
        .expect("static metric definition");
        let mesh_refused = IntCounterVec::new(
            Opts::new(
                "arknet_mesh_refused_total",
                "Mesh requests refused before any backend",
            ),
            &["reason"],
        )
        .expect("static metric definition");
        let mesh_spoofs = prometheus::IntCounter::new(
            "arknet_mesh_spoofs_total",
            "Nodes whose TLS identity did not match the key claimed or pinned",
        )
        .expect("static metric definition");
        let mesh_strangers_unlisted = prometheus::IntCounter::new(
            "arknet_mesh_strangers_unlisted_total",
            "Unapproved keys that connected but were not listed as pending (too many at once)",
        )
        .expect("static metric definition");
        let approvals_file_valid = IntGauge::new(
            "arknet_approvals_file_valid",
            "1 while approved_peers.json parses; 0 while a corrupt file is ignored",
        )
        .expect("static metric definition");
        approvals_file_valid.set(1);
        for c in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(duration.clone()),
            Box::new(ttfb.clone()),
            Box::new(in_flight.clone()),
            Box::new(upstream_connect_errors.clone()),
            Box::new(backend_in_flight.clone()),
            Box::new(backend_up.clone()),
            Box::new(backend_models.clone()),
            Box::new(peer_requests.clone()),
            Box::new(peer_failovers.clone()),
            Box::new(peer_tokens.clone()),
            Box::new(peer_duration.clone()),
            Box::new(mesh_refused.clone()),
            Box::new(mesh_spoofs.clone()),
            Box::new(mesh_strangers_unlisted.clone()),
            Box::new(approvals_file_valid.clone()),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        Metrics {
            registry,
            requests,
            duration,
            ttfb,
            in_flight,
            upstream_connect_errors,
            backend_in_flight,
            backend_up,
            backend_models,
            peer_requests,
            peer_failovers,
            peer_tokens,
            peer_duration,
            mesh_refused,
            mesh_spoofs,
            mesh_strangers_unlisted,
            approvals_file_valid,
        }
    }

    /// The registry, for metrics a module declares next to its code (model sharing).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 * 1024);
        // Encoding into a Vec cannot fail for the text format.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rendered_text_carries_units_and_labels() {
        let m = Metrics::new();
        m.requests
            .with_label_values(&["chat", "llama", "200"])
            .inc();
        m.duration.with_label_values(&["chat"]).observe(0.01);
        let text = String::from_utf8(m.render()).expect("utf8");
        assert!(
            text.contains(
                r#"arknet_http_requests_total{model="llama",route="chat",status="200"} 1"#
            ),
            "{text}"
        );
        assert!(text.contains("arknet_http_request_duration_seconds_bucket"));
        assert!(text.contains("arknet_http_requests_in_flight 0"));
    }
}
