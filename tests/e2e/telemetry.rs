//! OpenTelemetry: nodes given the standard OTLP env export a span per step, each its own trace
//! linked to the instance's root span, and the http step sends its span's `traceparent`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;
use drover_tests::{Recorder, TestEnv, wait_until};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue};
use prost::Message;
use serde_json::json;
use uuid::Uuid;

use crate::support::{deploy, get, start, wait_settled};

/// One exported span, as the receiver decoded it.
#[derive(Clone, Debug)]
struct Received {
    name: String,
    trace_id: String,
    span_id: String,
    /// `(trace_id, span_id)` of each link, hex.
    links: Vec<(String, String)>,
    attributes: BTreeMap<String, String>,
    /// The exporting node's `service.name` resource attribute.
    service: String,
}

/// An OTLP/HTTP (protobuf) trace receiver on a free loopback port.
#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<Received>>>,
}

impl Receiver {
    async fn start(&self) -> anyhow::Result<String> {
        let app = Router::new()
            .route("/v1/traces", post(receive))
            .with_state(self.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(format!("http://{addr}"))
    }

    fn spans(&self) -> Vec<Received> {
        self.spans.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Serves OTLP/gRPC on a free loopback port instead.
    async fn start_grpc(&self) -> anyhow::Result<String> {
        let incoming = tonic::transport::server::TcpIncoming::bind("127.0.0.1:0".parse()?)?;
        let addr = incoming.local_addr()?;
        let service = TraceServiceServer::new(self.clone());
        tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(incoming)
                .await;
        });
        Ok(format!("http://{addr}"))
    }

    fn record(&self, request: ExportTraceServiceRequest) {
        let mut received = Vec::new();
        for resource_spans in request.resource_spans {
            let service = resource_spans
                .resource
                .map(|r| attributes(&r.attributes))
                .and_then(|mut a| a.remove("service.name"))
                .unwrap_or_default();
            for scope_spans in resource_spans.scope_spans {
                for span in scope_spans.spans {
                    received.push(Received {
                        name: span.name.clone(),
                        trace_id: hex(&span.trace_id),
                        span_id: hex(&span.span_id),
                        links: span
                            .links
                            .iter()
                            .map(|l| (hex(&l.trace_id), hex(&l.span_id)))
                            .collect(),
                        attributes: attributes(&span.attributes),
                        service: service.clone(),
                    });
                }
            }
        }
        if let Ok(mut spans) = self.spans.lock() {
            spans.extend(received);
        }
    }
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.record(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

async fn receive(State(receiver): State<Receiver>, body: Bytes) -> axum::http::StatusCode {
    let Ok(request) = ExportTraceServiceRequest::decode(body) else {
        return axum::http::StatusCode::BAD_REQUEST;
    };
    receiver.record(request);
    // An empty ExportTraceServiceResponse is an empty protobuf message.
    axum::http::StatusCode::OK
}

fn attributes(kvs: &[KeyValue]) -> BTreeMap<String, String> {
    kvs.iter()
        .map(|kv| {
            (
                kv.key.clone(),
                kv.value.as_ref().map(text).unwrap_or_default(),
            )
        })
        .collect()
}

fn text(value: &AnyValue) -> String {
    match &value.value {
        Some(Any::StringValue(s)) => s.clone(),
        Some(Any::IntValue(i)) => i.to_string(),
        Some(Any::BoolValue(b)) => b.to_string(),
        Some(Any::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Alternates between the default queue and `b`, so the steps run on two workers.
fn traced_workflow(recorder: &str) -> String {
    format!(
        r#"
name: traced
vars: {{ n: 0 }}
steps:
  - id: first
    kind: assign
    set: {{ n: "vars.n + 1" }}
    next: [{{ to: call }}]
  - id: call
    kind: http
    queue: b
    method: POST
    url: "{recorder}/ok/traced"
    body: {{ id: "instance.id" }}
    next: [{{ to: second }}]
  - id: second
    kind: assign
    set: {{ n: "vars.n + 1" }}
    next: [{{ to: done }}]
  - id: done
    kind: end
    queue: b
    status: completed
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_instance_on_two_workers_exports_a_step_span_each_linked_to_its_root()
-> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let receiver = Receiver::default();
    let endpoint = receiver.start().await?;
    let recorder = Recorder::default();
    let recorder_url = recorder.start().await?;
    let otel = |service: &str| {
        vec![
            ("OTEL_EXPORTER_OTLP_ENDPOINT".to_owned(), endpoint.clone()),
            (
                "OTEL_EXPORTER_OTLP_PROTOCOL".to_owned(),
                "http/protobuf".to_owned(),
            ),
            ("OTEL_SERVICE_NAME".to_owned(), service.to_owned()),
            (
                "OTEL_RESOURCE_ATTRIBUTES".to_owned(),
                format!("deployment.environment={}", env.prefix),
            ),
            // Export within a moment rather than the default 5 s.
            ("OTEL_BSP_SCHEDULE_DELAY".to_owned(), "100".to_owned()),
        ]
    };
    let api_node = env
        .spawn_node_env("api,coordinator", &[], &otel("drover-api"))
        .await?;
    let worker_a = env
        .spawn_node_env("worker", &[], &otel("drover-worker"))
        .await?;
    let worker_b = env
        .spawn_node_env("worker", &["--queues", "b"], &otel("drover-worker"))
        .await?;
    let api = api_node.api();
    deploy(api, &traced_workflow(&recorder_url)).await?;
    let ids = start(api, "traced", json!({}), 1).await?;
    let id = ids.first().cloned().unwrap_or_default();
    let states = wait_settled(&env, 1, Duration::from_secs(60)).await?;
    assert_eq!(states, vec![("completed".to_owned(), 1)]);

    // The steps the instance ran, from its journal (row 0 is its start).
    let (status, journal) = get(&format!("{api}/v1/instances/{id}/journal")).await?;
    assert_eq!(status, 200);
    let ran: Vec<String> = journal["entries"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .skip(1)
        .filter_map(|e| e["step_id"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(ran, ["first", "call", "second", "done"]);

    // The root: trace id = the instance id, span id = its low 64 bits.
    let root_trace = Uuid::parse_str(&id)?.simple().to_string();
    let root_span = root_trace[16..].to_owned();
    let instance = id.clone();
    let (root, steps) = wait_until(
        "the root and every step span",
        Duration::from_secs(30),
        || {
            let spans = receiver.spans();
            let instance = instance.clone();
            let want = ran.len();
            async move {
                let root = spans.iter().find(|s| {
                    s.name == "instance" && s.attributes.get("instance.id") == Some(&instance)
                });
                let steps: Vec<Received> = spans
                    .iter()
                    .filter(|s| {
                        s.name == "step" && s.attributes.get("instance.id") == Some(&instance)
                    })
                    .cloned()
                    .collect();
                Ok((root.is_some() && steps.len() >= want).then(|| (root.cloned(), steps)))
            }
        },
    )
    .await?;
    let root = root.expect("invariant: waited for the root");
    assert_eq!(
        (root.trace_id.as_str(), root.span_id.as_str()),
        (root_trace.as_str(), root_span.as_str())
    );
    assert_eq!(
        root.attributes.get("workflow").map(String::as_str),
        Some("traced")
    );
    assert_eq!(root.service, "drover-api");

    // One span per step, with the fixed attributes, each its own trace linked to the root.
    let mut by_seq = steps.clone();
    by_seq.sort_by_key(|s| {
        s.attributes
            .get("step.seq")
            .and_then(|n| n.parse::<i64>().ok())
    });
    let step_ids: Vec<&str> = by_seq
        .iter()
        .map(|s| s.attributes.get("step.id").map_or("", String::as_str))
        .collect();
    assert_eq!(step_ids, ran, "one span per step: {steps:#?}");
    let workers = [worker_a.id.to_string(), worker_b.id.to_string()];
    let mut nodes = BTreeSet::new();
    for (seq, span) in by_seq.iter().enumerate() {
        let a = &span.attributes;
        assert_eq!(a.get("step.seq"), Some(&seq.to_string()), "{span:?}");
        assert_eq!(a.get("workflow").map(String::as_str), Some("traced"));
        assert_eq!(a.get("campaign").map(String::as_str), Some("default"));
        assert_eq!(a.get("attempt").map(String::as_str), Some("1"), "{span:?}");
        let node = a.get("node.id").cloned().unwrap_or_default();
        assert!(workers.contains(&node), "{span:?}");
        nodes.insert(node);
        assert_ne!(span.trace_id, root.trace_id, "a step is its own trace");
        assert!(
            span.links
                .contains(&(root.trace_id.clone(), root.span_id.clone())),
            "linked to the root: {span:?}"
        );
        assert_eq!(span.service, "drover-worker");
    }
    assert_eq!(nodes.len(), 2, "the steps ran on both workers");

    // The first job carried the API request's trace context in its headers: the first step
    // links to the `POST /v1/instances` request span.
    let requests_spans: Vec<Received> = receiver
        .spans()
        .into_iter()
        .filter(|s| {
            s.name == "POST /v1/instances"
                && s.attributes.get("http.route").map(String::as_str) == Some("/v1/instances")
        })
        .collect();
    assert!(
        requests_spans.iter().any(|r| r
            .attributes
            .get("http.response.status_code")
            .map(String::as_str)
            == Some("201")
            && by_seq[0]
                .links
                .contains(&(r.trace_id.clone(), r.span_id.clone()))),
        "the first step links to the start request: {:?} {requests_spans:#?}",
        by_seq[0]
    );
    // Logs carry the trace id of the span they were written in.
    let started = api_node.log_lines("instances started");
    assert!(
        requests_spans.iter().any(|r| started
            .iter()
            .any(|l| l.contains(&format!("trace_id={}", r.trace_id)))),
        "the start request's log line carries its trace id: {started:?}"
    );

    // The http step sent its own span's trace context.
    let call = by_seq
        .iter()
        .find(|s| s.attributes.get("step.id").map(String::as_str) == Some("call"))
        .expect("invariant: the call step's span was asserted above");
    let requests = recorder.requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(
        requests[0].traceparent.as_deref(),
        Some(format!("00-{}-{}-01", call.trace_id, call.span_id).as_str())
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_grpc_protocol_the_spans_reach_an_otlp_grpc_receiver() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let receiver = Receiver::default();
    let endpoint = receiver.start_grpc().await?;
    let recorder = Recorder::default();
    let recorder_url = recorder.start().await?;
    let otel = vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT".to_owned(), endpoint),
        ("OTEL_EXPORTER_OTLP_PROTOCOL".to_owned(), "grpc".to_owned()),
        ("OTEL_BSP_SCHEDULE_DELAY".to_owned(), "100".to_owned()),
    ];
    let node = env
        .spawn_node_env("worker,api,coordinator", &["--queues", "default,b"], &otel)
        .await?;
    let api = node.api();
    // Its end on the queue of the step before: that step runs the end at once, and the end
    // still has a span of its own.
    let workflow =
        traced_workflow(&recorder_url).replace("kind: end\n    queue: b\n", "kind: end\n");
    anyhow::ensure!(
        workflow != traced_workflow(&recorder_url),
        "the end moved queue"
    );
    deploy(api, &workflow).await?;
    let id = start(api, "traced", json!({}), 1)
        .await?
        .first()
        .cloned()
        .unwrap_or_default();
    let root_trace = Uuid::parse_str(&id)?.simple().to_string();
    let root = (root_trace.clone(), root_trace[16..].to_owned());
    let steps = wait_until(
        "the root and four step spans over grpc",
        Duration::from_secs(30),
        || {
            let spans = receiver.spans();
            let (id, root) = (id.clone(), root.clone());
            async move {
                let has_root = spans.iter().any(|s| {
                    s.name == "instance" && (s.trace_id.clone(), s.span_id.clone()) == root
                });
                let steps: Vec<Received> = spans
                    .into_iter()
                    .filter(|s| s.name == "step" && s.attributes.get("instance.id") == Some(&id))
                    .collect();
                Ok((has_root && steps.len() >= 4).then_some(steps))
            }
        },
    )
    .await?;
    assert_eq!(steps.len(), 4, "{steps:#?}");
    for span in &steps {
        assert!(span.links.contains(&root), "linked to the root: {span:?}");
        assert_eq!(span.service, "drover", "the default service name");
    }
    let end = steps
        .iter()
        .find(|s| s.attributes.get("step.id").map(String::as_str) == Some("done"))
        .ok_or_else(|| anyhow::anyhow!("no span for the end: {steps:#?}"))?;
    // The step_seq it ran at, as its own claim would have had it (its journal row is 4).
    assert_eq!(
        end.attributes.get("step.seq").map(String::as_str),
        Some("3"),
        "{end:?}"
    );
    Ok(())
}
