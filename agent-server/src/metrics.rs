//! `--metrics ADDR`: Prometheus metrics of this host's agents, served at `GET /metrics` in
//! the OpenMetrics text format.
//!
//! Most are read at each scrape from what the agents keep on this host, as `agent-client
//! status` shows it: the history that both programs append to, the journals of migrations
//! under way, the forward records, the tunnels and the flows. So outgoing migrations,
//! which `agent-client` runs, count as well as the incoming ones this server handles, and
//! counters carry across restarts. What this process does on its own (the sweeper,
//! recovery) is counted as it happens ([`Actions`]).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result};
use common::housekeeping::{self, HostStatus};
use common::migration::history::Direction;
use hyper::header::CONTENT_TYPE;
use hyper::service::{make_service_fn, service_fn};
use hyper::{Body, Method, Request, Response, StatusCode};
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use serde::Serialize;

use crate::ServerContext;

const CONTENT: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// What this process does on its own, counted as it happens.
#[derive(Clone, Debug, Default)]
pub struct Actions {
    /// Forwarding of containers that left, removed by the sweeper once nothing needed it.
    pub swept: Counter,
    /// Migrations settled after an agent died, by when: at this agent's start
    /// (`restart`), or an `agent-client`'s that died (`adopted`).
    pub recovered: Family<Kind, Counter>,
}

impl Actions {
    pub fn recovered(&self, kind: &str, actions: usize) {
        self.recovered
            .get_or_create(&Kind { kind: kind.into() })
            .inc_by(actions as u64);
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Kind {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Migrations {
    direction: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Failures {
    direction: String,
    phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Tunnel {
    interface: String,
    peer: String,
}

/// The name serde gives `value` (`outgoing`, `switch_traffic`): label values that match
/// the JSON report's.
fn serde_name(value: impl Serialize) -> String {
    serde_json::to_value(value)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

fn migrations(direction: Direction) -> Migrations {
    Migrations {
        direction: serde_name(direction),
    }
}

/// Binds `addr` (an error now, not later, if it cannot) and returns the server to run.
pub fn serve(addr: SocketAddr, context: Arc<ServerContext>) -> Result<impl Future<Output = ()>> {
    let server =
        hyper::Server::try_bind(&addr).with_context(|| format!("metrics: listen on {addr}"))?;
    let make = make_service_fn(move |_| {
        let context = context.clone();
        async move {
            Ok::<_, Infallible>(service_fn(move |request| {
                let context = context.clone();
                async move { Ok::<_, Infallible>(respond(&request, &context).await) }
            }))
        }
    });
    Ok(async move {
        if let Err(e) = server.serve(make).await {
            tracing::warn!("metrics server stopped: {e}");
        }
    })
}

async fn respond(request: &Request<Body>, context: &ServerContext) -> Response<Body> {
    let (status, content, body) =
        if request.method() != Method::GET || request.uri().path() != "/metrics" {
            (
                StatusCode::NOT_FOUND,
                "text/plain",
                "only GET /metrics\n".to_string(),
            )
        } else {
            match render(context).await {
                Ok(text) => (StatusCode::OK, CONTENT, text),
                Err(e) => (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    format!("{e:#}\n"),
                ),
            }
        };
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content),
    );
    response
}

/// The metrics as they stand now.
async fn render(context: &ServerContext) -> Result<String> {
    // The whole history: the counters count every migration this host took part in.
    let status = housekeeping::status(&context.state_dir, usize::MAX).await?;
    let mut registry = Registry::with_prefix("live_migrate");
    register_migrations(&mut registry, &status);
    register_forwarding(&mut registry, &status);
    registry.register(
        "sweeper_removed_forwards",
        "Forwarding of containers that left, removed once nothing needed it",
        context.actions.swept.clone(),
    );
    registry.register(
        "recovery_actions",
        "Migrations settled after an agent died: at this agent's start, or adopted from a dead agent-client",
        context.actions.recovered.clone(),
    );
    let mut text = String::new();
    encode(&mut text, &registry)?;
    Ok(text)
}

fn register_migrations(registry: &mut Registry, status: &HostStatus) {
    let started = Family::<Migrations, Counter>::default();
    let succeeded = Family::<Migrations, Counter>::default();
    let failed = Family::<Failures, Counter>::default();
    let in_progress = Family::<Migrations, Gauge>::default();
    // 50 ms to about 25 s.
    let freeze = Histogram::new(exponential_buckets(0.05, 2.0, 10));
    let transferred = Counter::<u64>::default();
    for entry in &status.history {
        started.get_or_create(&migrations(entry.direction)).inc();
        if entry.succeeded {
            succeeded.get_or_create(&migrations(entry.direction)).inc();
        } else {
            let phase = entry
                .failed_phase
                .map_or_else(|| "unknown".to_string(), serde_name);
            failed
                .get_or_create(&Failures {
                    direction: serde_name(entry.direction),
                    phase,
                })
                .inc();
        }
        if let Some(ms) = entry.freeze_to_resume_ms {
            freeze.observe(ms / 1000.0);
        }
        if let Some(bytes) = entry.transferred_bytes {
            transferred.inc_by(bytes);
        }
    }
    for migration in &status.migrations {
        started
            .get_or_create(&migrations(migration.direction))
            .inc();
        in_progress
            .get_or_create(&migrations(migration.direction))
            .inc();
    }
    registry.register(
        "migrations_started",
        "Migrations begun, by direction",
        started,
    );
    registry.register(
        "migrations_succeeded",
        "Migrations after which the container ran on the destination",
        succeeded,
    );
    registry.register(
        "migrations_failed",
        "Migrations that did not move the container, by the phase that failed",
        failed,
    );
    registry.register(
        "migrations_in_progress",
        "Migrations under way, or abandoned by an agent that died",
        in_progress,
    );
    registry.register(
        "freeze_seconds",
        "From the freeze on this host until the container ran on the destination",
        freeze,
    );
    registry.register(
        "transferred_bytes",
        "Checkpoint and memory sent by migrations that moved",
        transferred,
    );
}

fn register_forwarding(registry: &mut Registry, status: &HostStatus) {
    let containers = Gauge::<i64>::default();
    containers.set(status.forwards.len() as i64);
    let flows = Gauge::<i64>::default();
    flows.set(status.forwards.iter().map(|f| f.flows as i64).sum());
    let received = Family::<Tunnel, Counter>::default();
    let sent = Family::<Tunnel, Counter>::default();
    let returning = Family::<Tunnel, Gauge>::default();
    for tunnel in &status.tunnels {
        let labels = Tunnel {
            interface: tunnel.interface.clone(),
            peer: tunnel.peer_address.to_string(),
        };
        received.get_or_create(&labels).inc_by(tunnel.rx_bytes);
        sent.get_or_create(&labels).inc_by(tunnel.tx_bytes);
        returning
            .get_or_create(&labels)
            .set(tunnel.returning_flows as i64);
    }
    registry.register(
        "forwarded_containers",
        "Containers that left this host and are still forwarded to",
        containers,
    );
    registry.register(
        "forwarded_flows",
        "Live flows of containers that left, forwarded through this host",
        flows,
    );
    registry.register(
        "tunnel_received_bytes",
        "Bytes received through each WireGuard tunnel",
        received,
    );
    registry.register(
        "tunnel_sent_bytes",
        "Bytes sent through each WireGuard tunnel",
        sent,
    );
    registry.register(
        "tunnel_returning_flows",
        "Flows of containers that arrived here whose replies go back through the tunnel",
        returning,
    );
}
