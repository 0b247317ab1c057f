//! The model catalog: which models each of the node's backends serves, refreshed in the
//! background and on demand, published as immutable snapshots.
//!
//! Writers are the refresh task and the on-demand refresh after a miss; readers (routing, the
//! model listings) only ever see a complete [`Snapshot`]. A backend that fails a refresh keeps its
//! last known list: a model server that hiccups must not make its models vanish.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use serde_json::{json, Value};
use tokio::sync::{watch, Mutex};

use crate::config::BackendKind;
use crate::error::Dialect;
use crate::metrics::Metrics;
use crate::routing::model_matches;
use crate::upstream::{Backend, Upstream};

pub use crate::routing::ListedModel;

/// What is known about one backend's models.
#[derive(Debug, Clone)]
pub struct BackendModels {
    /// Backend name.
    pub backend: String,
    /// Backend dialect.
    pub kind: BackendKind,
    /// Last successful listing; `None` until one succeeds.
    pub models: Option<Vec<ListedModel>>,
    /// Whether the last refresh succeeded.
    pub up: bool,
}

/// Every backend's models at one moment; index-aligned with the configured backends.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Per backend.
    pub backends: Vec<BackendModels>,
}

impl Snapshot {
    /// Whether any backend lists `model`.
    pub fn knows(&self, model: &str) -> bool {
        self.backends
            .iter()
            .filter_map(|b| b.models.as_deref())
            .flatten()
            .any(|m| model_matches(&m.name, model))
    }

    /// The model listing in `dialect`, merged across backends, first backend wins on duplicates.
    pub fn listing(&self, dialect: Dialect) -> Value {
        self.listing_where(dialect, |_| true)
    }

    /// Model names listed by any backend, without duplicates, in listing order.
    pub fn model_names(&self) -> Vec<String> {
        let mut seen = std::collections::HashSet::new();
        self.backends
            .iter()
            .flat_map(|b| b.models.iter().flatten())
            .filter(|m| seen.insert(m.name.as_str()))
            .map(|m| m.name.clone())
            .collect()
    }

    /// [`Self::listing`] restricted to models for which `keep` is true.
    pub fn listing_where(&self, dialect: Dialect, keep: impl Fn(&str) -> bool) -> Value {
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::new();
        for b in &self.backends {
            for m in b.models.iter().flatten() {
                if keep(&m.name) && seen.insert(m.name.as_str()) {
                    out.push(entry_in(dialect, b, m));
                }
            }
        }
        match dialect {
            Dialect::OpenAi => json!({"object": "list", "data": out}),
            Dialect::Ollama => json!({"models": out}),
        }
    }
}

/// One listing entry in `dialect`: the backend's own entry when it already speaks it, a
/// synthesized one (with the fields the official clients require) otherwise.
fn entry_in(dialect: Dialect, b: &BackendModels, m: &ListedModel) -> Value {
    match (dialect, b.kind) {
        (Dialect::Ollama, BackendKind::Ollama) | (Dialect::OpenAi, BackendKind::Openai)
            if m.entry.is_object() =>
        {
            m.entry.clone()
        }
        _ => synthesized_entry(dialect, &m.name, &b.backend),
    }
}

/// A listing entry for a model known only by name, with the fields the official clients
/// require.
pub fn synthesized_entry(dialect: Dialect, name: &str, owned_by: &str) -> Value {
    match dialect {
        Dialect::OpenAi => json!({
            "id": name, "object": "model", "created": 0, "owned_by": owned_by,
        }),
        Dialect::Ollama => json!({
            "name": name, "model": name, "modified_at": "1970-01-01T00:00:00Z",
            "size": 0, "digest": "",
            "details": {"format": "", "family": "", "families": null,
                        "parameter_size": "", "quantization_level": ""},
        }),
    }
}

/// Parses a listing response of a backend of `kind`.
pub fn parse_listing(kind: BackendKind, body: &Value) -> Option<Vec<ListedModel>> {
    let (items, key) = match kind {
        BackendKind::Ollama => (body.get("models")?.as_array()?, "name"),
        BackendKind::Openai => (body.get("data")?.as_array()?, "id"),
    };
    Some(
        items
            .iter()
            .filter_map(|e| {
                let name = e.get(key).or_else(|| e.get("model"))?.as_str()?;
                Some(ListedModel {
                    name: name.to_string(),
                    entry: e.clone(),
                })
            })
            .collect(),
    )
}

/// Path of the model listing for a backend of `kind`.
pub fn listing_path(kind: BackendKind) -> &'static str {
    match kind {
        BackendKind::Ollama => "/api/tags",
        BackendKind::Openai => "/v1/models",
    }
}

/// Shared handle to the catalog: publishes snapshots, runs refreshes.
pub struct Catalog {
    tx: watch::Sender<Arc<Snapshot>>,
    last_refresh: Mutex<Option<Instant>>,
    backends: Arc<Vec<Backend>>,
    upstream: Arc<Upstream>,
    metrics: Arc<Metrics>,
    period: Duration,
}

impl Catalog {
    /// A catalog for `backends`, empty until the first refresh.
    pub fn new(
        backends: Arc<Vec<Backend>>,
        upstream: Arc<Upstream>,
        metrics: Arc<Metrics>,
        period: Duration,
    ) -> Self {
        let initial = Snapshot {
            backends: backends
                .iter()
                .map(|b| BackendModels {
                    backend: b.config.name.clone(),
                    kind: b.config.kind,
                    models: None,
                    up: false,
                })
                .collect(),
        };
        Catalog {
            tx: watch::Sender::new(Arc::new(initial)),
            last_refresh: Mutex::new(None),
            backends,
            upstream,
            metrics,
            period,
        }
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.tx.borrow().clone()
    }

    /// Refreshes every backend's listing unless a refresh finished less than `min_age` ago.
    /// Concurrent callers wait for the one refresh in progress instead of starting their own.
    pub async fn refresh_if_older(&self, min_age: Duration) -> Arc<Snapshot> {
        let mut last = self.last_refresh.lock().await;
        if last.is_some_and(|t| t.elapsed() < min_age) {
            return self.snapshot();
        }
        let mut next = (*self.snapshot()).clone();
        for (b, slot) in self.backends.iter().zip(next.backends.iter_mut()) {
            let result = self
                .upstream
                .get_json(
                    b.peer(),
                    &b.config.url.authority,
                    &b.upstream_path(listing_path(b.config.kind)),
                )
                .await
                .and_then(|body| {
                    parse_listing(b.config.kind, &body)
                        .ok_or_else(|| "listing has an unexpected shape".to_string())
                });
            match result {
                Ok(models) => {
                    self.metrics
                        .backend_models
                        .with_label_values(&[&b.config.name])
                        .set(models.len() as i64);
                    log_model_changes(&b.config.name, slot.models.as_deref(), &models);
                    slot.models = Some(models);
                    slot.up = true;
                }
                Err(e) => {
                    if slot.up || slot.models.is_none() {
                        tracing::warn!(backend = %b.config.name, error = %e, "model listing failed");
                    }
                    slot.up = false;
                }
            }
            self.metrics
                .backend_up
                .with_label_values(&[&b.config.name])
                .set(i64::from(slot.up));
        }
        let next = Arc::new(next);
        self.tx.send_replace(next.clone());
        *last = Some(Instant::now());
        next
    }
}

/// One INFO line when a backend's model list is first known or changes: the owner sees what
/// the node serves without polling.
fn log_model_changes(backend: &str, before: Option<&[ListedModel]>, after: &[ListedModel]) {
    let names = |l: &[ListedModel]| -> Vec<String> { l.iter().map(|m| m.name.clone()).collect() };
    let now = names(after);
    match before {
        None => tracing::info!(backend, models = %now.join(", "), "backend models"),
        Some(before) => {
            let was = names(before);
            let added: Vec<&str> = now
                .iter()
                .filter(|m| !was.contains(m))
                .map(String::as_str)
                .collect();
            let removed: Vec<&str> = was
                .iter()
                .filter(|m| !now.contains(m))
                .map(String::as_str)
                .collect();
            if !added.is_empty() || !removed.is_empty() {
                tracing::info!(
                    backend,
                    added = %added.join(", "),
                    removed = %removed.join(", "),
                    "backend models changed"
                );
            }
        }
    }
}

/// The background refresh loop, run by Pingora as a background service.
pub struct CatalogRefresh(pub Arc<Catalog>);

#[async_trait]
impl BackgroundService for CatalogRefresh {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        loop {
            self.0.refresh_if_older(Duration::ZERO).await;
            tokio::select! {
                _ = tokio::time::sleep(self.0.period) => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot() -> Snapshot {
        let ollama =
            json!({"models": [{"name": "llama3.1:8b", "model": "llama3.1:8b", "size": 5}]});
        let openai = json!({"object": "list", "data": [{"id": "smollm2", "object": "model"}, {"id": "llama3.1:8b"}]});
        Snapshot {
            backends: vec![
                BackendModels {
                    backend: "ollama".into(),
                    kind: BackendKind::Ollama,
                    models: parse_listing(BackendKind::Ollama, &ollama),
                    up: true,
                },
                BackendModels {
                    backend: "llama".into(),
                    kind: BackendKind::Openai,
                    models: parse_listing(BackendKind::Openai, &openai),
                    up: true,
                },
            ],
        }
    }

    #[test]
    fn listings_merge_backends_without_duplicates() {
        let s = snapshot();
        let openai = s.listing(Dialect::OpenAi);
        let ids: Vec<&str> = openai["data"]
            .as_array()
            .expect("array")
            .iter()
            .filter_map(|m| m["id"].as_str())
            .collect();
        assert_eq!(ids, ["llama3.1:8b", "smollm2"]);
        let ollama = s.listing(Dialect::Ollama);
        let models = ollama["models"].as_array().expect("array");
        assert_eq!(models.len(), 2);
        assert_eq!(
            models[0]["size"], 5,
            "an Ollama backend's own entry is kept"
        );
        assert_eq!(models[1]["name"], "smollm2");
        assert!(
            models[1]["details"].is_object(),
            "synthesized entries carry details"
        );
    }

    #[test]
    fn malformed_listings_are_rejected() {
        assert!(parse_listing(BackendKind::Ollama, &json!({"data": []})).is_none());
        assert!(parse_listing(BackendKind::Openai, &json!([1])).is_none());
        assert_eq!(
            parse_listing(BackendKind::Openai, &json!({"data": [{"x": 1}]})),
            Some(vec![])
        );
    }

    #[test]
    fn knows_matches_latest_tags() {
        let mut s = snapshot();
        s.backends[0].models = Some(vec![ListedModel::named("qwen:latest")]);
        assert!(s.knows("qwen"));
        assert!(!s.knows("mistral"));
    }
}
