//! Trace context on the wire (W3C `traceparent`) and the instance root span.
//!
//! An instance's root span has ids derived from its id ([`InstanceId::trace_root`]): it is
//! recorded once, when the instance starts, and every step span links to it from any node,
//! after any recovery or re-dispatch, with nothing stored or carried for it. Each step is its
//! own trace (no single trace grows for as long as an instance runs).
//!
//! All of this is inert until [`enable`] is called (the node does when an OTLP endpoint is
//! configured): no root spans are recorded and no headers are added.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};

use drover_core::InstanceId;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, Tracer,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{IdGenerator, RandomIdGenerator};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::Delivery;

/// Set once by the node when spans are exported.
static ENABLED: AtomicBool = AtomicBool::new(false);

thread_local! {
    /// The ids the next span built on this thread must have (the instance root's).
    static FORCED: Cell<Option<(u128, u64)>> = const { Cell::new(None) };
}

/// Turns tracing on: root spans are recorded, job messages carry `traceparent`. The tracer
/// provider must be built with [`TraceIds`] for root spans to get their derived ids.
pub fn enable() {
    ENABLED.store(true, Ordering::Relaxed);
}

/// Whether spans are exported (see [`enable`]).
pub fn is_enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// The tracer provider's id generator: random ids, except for an instance root span.
#[derive(Debug, Default)]
pub struct TraceIds(RandomIdGenerator);

impl IdGenerator for TraceIds {
    fn new_trace_id(&self) -> TraceId {
        FORCED
            .get()
            .map_or_else(|| self.0.new_trace_id(), |(trace, _)| TraceId::from(trace))
    }

    fn new_span_id(&self) -> SpanId {
        FORCED
            .get()
            .map_or_else(|| self.0.new_span_id(), |(_, span)| SpanId::from(span))
    }
}

/// The span context of `instance`'s root span, for links.
pub fn instance_root(instance: InstanceId) -> SpanContext {
    let (trace, span) = instance.trace_root();
    SpanContext::new(
        TraceId::from(trace),
        SpanId::from(span),
        TraceFlags::SAMPLED,
        true,
        TraceState::default(),
    )
}

/// Records the root span of each started instance (a new trace each, linked to the span that
/// started them, e.g. the API request).
pub fn record_instance_roots(
    instances: impl IntoIterator<Item = InstanceId>,
    workflow: &str,
    campaign: &str,
) {
    if !is_enabled() {
        return;
    }
    let tracer = opentelemetry::global::tracer("drover");
    let starter = tracing::Span::current()
        .context()
        .span()
        .span_context()
        .clone();
    for instance in instances {
        let mut builder = tracer.span_builder("instance").with_attributes([
            KeyValue::new("instance.id", instance.to_string()),
            KeyValue::new("workflow", workflow.to_owned()),
            KeyValue::new("campaign", campaign.to_owned()),
        ]);
        if starter.is_valid() {
            builder = builder.with_links(vec![opentelemetry::trace::Link::with_context(
                starter.clone(),
            )]);
        }
        FORCED.set(Some(instance.trace_root()));
        let mut span = builder.start_with_context(&tracer, &Context::new());
        FORCED.set(None);
        opentelemetry::trace::Span::end(&mut span);
    }
}

/// Links `span` (a step's) to `instance`'s root span.
pub fn link_to_instance_root(span: &tracing::Span, instance: InstanceId) {
    if is_enabled() {
        span.add_link_with_attributes(
            instance_root(instance),
            vec![KeyValue::new("drover.link", "instance")],
        );
    }
}

/// Links `span` (a step's) to the span that published the job it runs, when the job carried
/// one (a job re-dispatched from the database by the leader carries the sweep's).
pub fn link_to_publisher<T>(span: &tracing::Span, delivery: &Delivery<T>) {
    if !is_enabled() {
        return;
    }
    if let Some(publisher) = delivery.trace_context() {
        span.add_link_with_attributes(
            publisher,
            vec![KeyValue::new("drover.link", "published_by")],
        );
    }
}

/// Reads a W3C `traceparent` header value.
pub(crate) fn parse_traceparent(traceparent: &str) -> Option<SpanContext> {
    struct One<'a>(&'a str);
    impl opentelemetry::propagation::Extractor for One<'_> {
        fn get(&self, key: &str) -> Option<&str> {
            (key == "traceparent").then_some(self.0)
        }
        fn keys(&self) -> Vec<&str> {
            vec!["traceparent"]
        }
    }
    let cx = TraceContextPropagator::new().extract(&One(traceparent));
    let span = cx.span();
    let sc = span.span_context();
    sc.is_valid().then(|| sc.clone())
}

/// The W3C `traceparent` of the current span, when it is traced.
pub fn current_traceparent() -> Option<String> {
    if !is_enabled() {
        return None;
    }
    let cx = tracing::Span::current().context();
    let span = cx.span();
    let sc = span.span_context();
    sc.is_valid().then(|| {
        format!(
            "00-{}-{}-{:02x}",
            sc.trace_id(),
            sc.span_id(),
            sc.trace_flags().to_u8()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_traceparent_reads_back_as_the_span_context_it_was_written_from() {
        let sc = parse_traceparent("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
            .expect("a valid traceparent");
        assert_eq!(
            sc.trace_id().to_string(),
            "0af7651916cd43dd8448eb211c80319c"
        );
        assert_eq!(sc.span_id().to_string(), "b7ad6b7169203331");
        assert!(sc.is_sampled() && sc.is_remote());
        assert!(parse_traceparent("garbage").is_none());
    }

    #[test]
    fn the_instance_root_is_the_instance_id_and_its_low_half() {
        let id = InstanceId::new();
        let root = instance_root(id);
        let hex = id.0.simple().to_string();
        assert_eq!(root.trace_id().to_string(), hex);
        assert_eq!(root.span_id().to_string(), hex[16..]);
    }
}
