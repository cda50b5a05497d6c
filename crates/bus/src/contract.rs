//! The event contract: what third parties may rely on in the CloudEvents Drover publishes.
//!
//! One JSON Schema (draft 2020-12) per event type, for the whole event (envelope and `data`),
//! kept in `crates/bus/contract/events/<kind>.json` and embedded here; the api serves them at
//! `/v1/schemas/events/<kind>` (an event's `dataschema`) and an AsyncAPI 3.0 document of the
//! subjects, headers and messages at `/v1/asyncapi.json` ([`asyncapi`]). Required fields stay
//! required; new optional fields may be added to `data` at any time (`additionalProperties:
//! true`), so readers must ignore fields they do not know.
//!
//! [`validate`] checks an event against its schema and the rules a schema cannot say: tests
//! use it on every event a run produced.

use std::collections::HashMap;
use std::sync::LazyLock;

use serde_json::{Map, Value, json};

use crate::Subjects;

/// What an event is about, and so its CloudEvent `type` stem, its `subject` and what its
/// `droverseq` counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventScope {
    /// `drover.instance.<kind>`: `subject` is the instance id; `droverseq` counts per instance.
    Instance,
    /// `drover.campaign.<kind>`: `subject` is the campaign name; `droverseq` counts per
    /// campaign.
    Campaign,
}

impl EventScope {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Instance => "instance",
            Self::Campaign => "campaign",
        }
    }
}

/// One event type of the contract.
#[derive(Clone, Copy, Debug)]
pub struct EventType {
    /// The last subject token, the CloudEvent `type` suffix and the schema's name:
    /// `step_completed`.
    pub kind: &'static str,
    pub scope: EventScope,
    source: &'static str,
}

impl EventType {
    /// The CloudEvent `type`: `drover.instance.<kind>` or `drover.campaign.<kind>`.
    pub fn cloudevent_type(&self) -> String {
        format!("drover.{}.{}", self.scope.as_str(), self.kind)
    }

    /// Where the api serves its schema, relative to the API's base URL (the events'
    /// `dataschema`).
    pub fn schema_path(&self) -> String {
        format!("/v1/schemas/events/{}", self.kind)
    }

    /// Its JSON Schema.
    pub fn schema(&self) -> Value {
        serde_json::from_str(self.source)
            .expect("invariant: the embedded schemas are JSON (tested)")
    }
}

macro_rules! event_types {
    ($($scope:ident $kind:literal),* $(,)?) => {
        /// Every event type, instance events first.
        pub const EVENT_TYPES: &[EventType] = &[$(EventType {
            kind: $kind,
            scope: EventScope::$scope,
            source: include_str!(concat!("../contract/events/", $kind, ".json")),
        }),*];
    };
}

event_types! {
    Instance "started",
    Instance "queued",
    Instance "admitted",
    Instance "permit_released",
    Instance "step_completed",
    Instance "step_retry",
    Instance "completed",
    Instance "failed",
    Instance "in_error",
    Instance "waiting",
    Instance "woken",
    Instance "requeued",
    Instance "resumed",
    Instance "paused",
    Instance "pause_requested",
    Instance "unpaused",
    Instance "stop_requested",
    Instance "stopped",
    Instance "restarted",
    Instance "schedule_fired",
    Instance "paused_too_long",
    Campaign "permit_drift",
    Campaign "schedule_skipped",
    Campaign "schedule_changed",
    Campaign "campaign_paused",
    Campaign "campaign_unpaused",
    Campaign "campaign_deleted",
    Campaign "workflow_deleted",
}

/// The event type `kind` (`started`, `permit_drift`, …), if there is one.
pub fn event_type(kind: &str) -> Option<&'static EventType> {
    EVENT_TYPES.iter().find(|t| t.kind == kind)
}

/// The JSON Schema of the events of type `kind`; `None` for an unknown kind.
pub fn schema(kind: &str) -> Option<Value> {
    event_type(kind).map(EventType::schema)
}

/// The NATS header every event carries, beside `Content-Type`: its `id`, so JetStream drops a
/// copy published again within the stream's duplicate window.
pub const MSG_ID_HEADER: &str = "Nats-Msg-Id";
/// Every event's `Content-Type` header: structured-mode CloudEvents JSON.
pub const CONTENT_TYPE: &str = "application/cloudevents+json";

/// The compiled schemas, by kind.
static VALIDATORS: LazyLock<HashMap<&'static str, jsonschema::Validator>> = LazyLock::new(|| {
    EVENT_TYPES
        .iter()
        .map(|t| {
            let validator = jsonschema::draft202012::options()
                .should_validate_formats(true)
                .build(&t.schema())
                .expect("invariant: the embedded schemas compile (tested)");
            (t.kind, validator)
        })
        .collect()
});

/// Checks `event` (a whole CloudEvent as published) against the contract: the schema of its
/// `type` (formats included), and what a schema cannot say: `data.seq` equals `droverseq`,
/// and `subject` names what `data` is about (`data.instance`, or `data.campaign` for a
/// campaign event). The error names every violation, with its JSON pointer.
pub fn validate(event: &Value) -> Result<(), String> {
    let Some(ce_type) = event.get("type").and_then(Value::as_str) else {
        return Err("no string `type`: not a Drover event".to_owned());
    };
    let event_type = ce_type
        .strip_prefix("drover.")
        .and_then(|rest| rest.split_once('.'))
        .and_then(|(scope, kind)| event_type(kind).filter(|t| t.scope.as_str() == scope))
        .ok_or_else(|| format!("unknown event type {ce_type:?}"))?;
    let validator = VALIDATORS
        .get(event_type.kind)
        .expect("invariant: every event type has a validator");
    let mut problems: Vec<String> = validator
        .iter_errors(event)
        .map(|err| {
            let at = err.instance_path().to_string();
            format!("{}: {err}", if at.is_empty() { "/" } else { &at })
        })
        .collect();
    let data = event.get("data");
    let seq = data.and_then(|d| d.get("seq"));
    if let (Some(seq), Some(droverseq)) = (seq, event.get("droverseq"))
        && seq != droverseq
    {
        problems.push(format!(
            "/data/seq: {seq} differs from droverseq {droverseq}"
        ));
    }
    let about = match event_type.scope {
        EventScope::Instance => "instance",
        EventScope::Campaign => "campaign",
    };
    if let (Some(named), Some(subject)) = (data.and_then(|d| d.get(about)), event.get("subject"))
        && named != subject
    {
        problems.push(format!(
            "/data/{about}: {named} differs from subject {subject}"
        ));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(format!("{ce_type}: {}", problems.join("; ")))
    }
}

/// The AsyncAPI 3.0 document of the events and signals of the cluster `subjects` names: the
/// channels (subject layouts, with their parameters), every event type's message with its
/// payload schema, the headers, the EVENTS stream, and the signal subject the api role
/// serves.
pub fn asyncapi(subjects: &Subjects) -> Value {
    let prefix = subjects.prefix();
    let stream = subjects.events_stream();
    let filter = subjects.event_filter();
    let kinds = |scope: EventScope| {
        EVENT_TYPES
            .iter()
            .filter(move |t| t.scope == scope)
            .map(|t| t.kind)
    };
    let instance_kinds: Vec<&str> = kinds(EventScope::Instance).collect();
    let campaign_kinds: Vec<&str> = kinds(EventScope::Campaign).collect();
    let refs = |channel: &str, kinds: &[&str]| -> (Value, Value) {
        let by_name: Map<String, Value> = kinds
            .iter()
            .map(|k| {
                (
                    k.to_string(),
                    json!({ "$ref": format!("#/components/messages/{k}") }),
                )
            })
            .collect();
        let in_channel: Vec<Value> = kinds
            .iter()
            .map(|k| json!({ "$ref": format!("#/channels/{channel}/messages/{k}") }))
            .collect();
        (Value::Object(by_name), Value::Array(in_channel))
    };
    let (instance_messages, instance_operation_messages) = refs("instanceEvents", &instance_kinds);
    let (campaign_messages, campaign_operation_messages) = refs("campaignEvents", &campaign_kinds);
    let slug = "a slug: [a-z0-9][a-z0-9_-]*, at most 63 characters";

    let mut messages = Map::new();
    for t in EVENT_TYPES {
        let mut payload = t.schema();
        // The payload is an AsyncAPI Schema Object (a superset of JSON Schema draft-07,
        // whose keywords these schemas keep to); the standalone 2020-12 document is served
        // at `schema_path`.
        if let Some(object) = payload.as_object_mut() {
            object.remove("$schema");
        }
        let summary = payload.get("description").cloned().unwrap_or(Value::Null);
        messages.insert(
            t.kind.to_owned(),
            json!({
                "name": t.kind,
                "title": t.cloudevent_type(),
                "summary": summary,
                "contentType": CONTENT_TYPE,
                "headers": { "$ref": "#/components/schemas/eventHeaders" },
                "payload": payload,
                "externalDocs": {
                    "description": "The event's JSON Schema (draft 2020-12), from the API",
                    "url": t.schema_path(),
                },
            }),
        );
    }
    messages.insert(
        "signal".to_owned(),
        json!({
            "name": "signal",
            "title": "An event for a waiting instance",
            "summary": "Any JSON (an empty payload is null): what the instance's `wait_event` \
                        step receives. At most 1 MiB.",
            "contentType": "application/json",
            "payload": {},
        }),
    );
    messages.insert(
        "signalAnswer".to_owned(),
        json!({
            "name": "signalAnswer",
            "title": "What became of a signal",
            "contentType": "application/json",
            "payload": {
                "oneOf": [
                    {
                        "type": "object",
                        "required": ["delivered"],
                        "properties": { "delivered": {
                            "enum": ["woke", "kept"],
                            "description": "`woke`: the instance was waiting for it and runs \
                                            on; `kept`: stored until it waits for an event of \
                                            this name.",
                        } },
                    },
                    {
                        "type": "object",
                        "required": ["error"],
                        "description": "The API's error body: {\"error\": {\"code\", \
                                        \"message\", \"details\"?}}.",
                        "properties": { "error": {
                            "type": "object",
                            "required": ["code", "message"],
                            "properties": {
                                "code": { "type": "string" },
                                "message": { "type": "string" },
                            },
                        } },
                    },
                ],
            },
        }),
    );

    json!({
        "asyncapi": "3.0.0",
        "info": {
            "title": "Drover events",
            "version": env!("CARGO_PKG_VERSION"),
            "description": format!(
                "Every transition of every instance, published as a structured-mode \
                 CloudEvent (JSON) on NATS and kept in the JetStream stream {stream} \
                 (subjects {filter}). Per instance, events are published in `droverseq` \
                 order (1, 2, 3, … without gaps), at least once: deduplicate by `id`. New \
                 optional fields may be added to `data`; ignore those you do not know."
            ),
        },
        "defaultContentType": CONTENT_TYPE,
        "channels": {
            "instanceEvents": {
                "address": format!("{prefix}.evt.{{campaign}}.{{workflow}}.{{instance}}.{{kind}}"),
                "title": "Instance events",
                "description": format!(
                    "What happened to an instance. Kept in the stream {stream}; subscribe to \
                     {prefix}.evt.<campaign>.> for one campaign, \
                     {prefix}.evt.*.*.<instance>.* for one instance."
                ),
                "parameters": {
                    "campaign": { "description": format!("The instance's campaign ({slug}).") },
                    "workflow": { "description": format!("The instance's workflow ({slug}).") },
                    "instance": { "description": "The instance id (a UUID)." },
                    "kind": { "enum": instance_kinds, "description": "The event type's kind." },
                },
                "messages": instance_messages,
                "x-jetstream-stream": stream,
            },
            "campaignEvents": {
                "address": format!("{prefix}.evt.{{campaign}}._campaign._.{{kind}}"),
                "title": "Campaign events",
                "description": format!(
                    "What happened to a campaign itself. Kept in the stream {stream}, beside \
                     the instance events: {prefix}.evt.<campaign>.> takes both."
                ),
                "parameters": {
                    "campaign": { "description": format!("The campaign ({slug}).") },
                    "kind": { "enum": campaign_kinds, "description": "The event type's kind." },
                },
                "messages": campaign_messages,
                "x-jetstream-stream": stream,
            },
            "signals": {
                "address": format!("{prefix}.signal.{{instance}}.{{event}}"),
                "title": "Signals",
                "description": "Delivers the event `event` to an instance (its `wait_event` \
                                step takes it), like POST /v1/instances/{id}/events/{name}. \
                                Plain NATS, served by the api role: send it as a request and \
                                wait for the answer (a signal published while no api node \
                                listens is lost).",
                "parameters": {
                    "instance": { "description": "The instance id (a UUID)." },
                    "event": { "description": format!("The event's name ({slug}).") },
                },
                "messages": { "signal": { "$ref": "#/components/messages/signal" } },
            },
            "signalAnswers": {
                "address": null,
                "title": "Signal answers",
                "description": "The requester's reply subject (its inbox).",
                "messages": { "signalAnswer": { "$ref": "#/components/messages/signalAnswer" } },
            },
        },
        "operations": {
            "publishInstanceEvents": {
                "action": "send",
                "channel": { "$ref": "#/channels/instanceEvents" },
                "summary": "Drover publishes every instance transition.",
                "messages": instance_operation_messages,
            },
            "publishCampaignEvents": {
                "action": "send",
                "channel": { "$ref": "#/channels/campaignEvents" },
                "summary": "Drover publishes what happened to a campaign.",
                "messages": campaign_operation_messages,
            },
            "receiveSignals": {
                "action": "receive",
                "channel": { "$ref": "#/channels/signals" },
                "summary": "The api role delivers signals to instances and answers each request.",
                "messages": [{ "$ref": "#/channels/signals/messages/signal" }],
                "reply": {
                    "channel": { "$ref": "#/channels/signalAnswers" },
                    "messages": [{ "$ref": "#/channels/signalAnswers/messages/signalAnswer" }],
                },
            },
        },
        "components": {
            "messages": messages,
            "schemas": {
                "eventHeaders": {
                    "type": "object",
                    "required": [MSG_ID_HEADER, "Content-Type"],
                    "properties": {
                        MSG_ID_HEADER: {
                            "type": "string",
                            "format": "uuid",
                            "description": "The event's `id`: JetStream drops a copy published \
                                            again within its duplicate window.",
                        },
                        "Content-Type": { "const": CONTENT_TYPE },
                    },
                },
            },
        },
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::EventKind;

    /// Every [`EventKind`]. The match below fails to compile when a kind is added, so a new
    /// kind cannot ship without its schema.
    const ALL_KINDS: [EventKind; 28] = [
        EventKind::Started,
        EventKind::StepCompleted,
        EventKind::StepRetry,
        EventKind::Completed,
        EventKind::Failed,
        EventKind::InError,
        EventKind::Requeued,
        EventKind::Resumed,
        EventKind::Waiting,
        EventKind::Woken,
        EventKind::Paused,
        EventKind::PauseRequested,
        EventKind::Unpaused,
        EventKind::StopRequested,
        EventKind::Stopped,
        EventKind::Restarted,
        EventKind::Queued,
        EventKind::Admitted,
        EventKind::PermitReleased,
        EventKind::PermitDrift,
        EventKind::ScheduleFired,
        EventKind::ScheduleSkipped,
        EventKind::PausedTooLong,
        EventKind::ScheduleChanged,
        EventKind::CampaignPaused,
        EventKind::CampaignUnpaused,
        EventKind::CampaignDeleted,
        EventKind::WorkflowDeleted,
    ];

    fn scope_of(kind: EventKind) -> EventScope {
        match kind {
            EventKind::PermitDrift
            | EventKind::ScheduleSkipped
            | EventKind::ScheduleChanged
            | EventKind::CampaignPaused
            | EventKind::CampaignUnpaused
            | EventKind::CampaignDeleted
            | EventKind::WorkflowDeleted => EventScope::Campaign,
            EventKind::Started
            | EventKind::StepCompleted
            | EventKind::StepRetry
            | EventKind::Completed
            | EventKind::Failed
            | EventKind::InError
            | EventKind::Requeued
            | EventKind::Resumed
            | EventKind::Waiting
            | EventKind::Woken
            | EventKind::Paused
            | EventKind::PauseRequested
            | EventKind::Unpaused
            | EventKind::StopRequested
            | EventKind::Stopped
            | EventKind::Restarted
            | EventKind::Queued
            | EventKind::Admitted
            | EventKind::PermitReleased
            | EventKind::ScheduleFired
            | EventKind::PausedTooLong => EventScope::Instance,
        }
    }

    #[test]
    fn every_event_kind_has_exactly_one_schema_of_its_scope() {
        let kinds: BTreeSet<&str> = ALL_KINDS.iter().map(|k| k.as_str()).collect();
        assert_eq!(kinds.len(), ALL_KINDS.len(), "ALL_KINDS repeats a kind");
        let types: BTreeSet<&str> = EVENT_TYPES.iter().map(|t| t.kind).collect();
        assert_eq!(types.len(), EVENT_TYPES.len(), "EVENT_TYPES repeats a kind");
        assert_eq!(kinds, types);
        for kind in ALL_KINDS {
            let event_type = event_type(kind.as_str()).expect("listed");
            assert_eq!(event_type.scope, scope_of(kind), "{}", kind.as_str());
        }
    }

    #[test]
    fn every_schema_is_a_valid_draft_2020_12_schema_of_its_type() {
        for t in EVENT_TYPES {
            let schema = t.schema();
            if let Err(err) = jsonschema::meta::validate(&schema) {
                panic!("{}: not a valid schema: {err}", t.kind);
            }
            assert_eq!(
                schema["$schema"], "https://json-schema.org/draft/2020-12/schema",
                "{}",
                t.kind
            );
            assert_eq!(schema["title"], t.cloudevent_type());
            assert_eq!(schema["properties"]["type"]["const"], t.cloudevent_type());
            assert_eq!(
                schema["properties"]["dataschema"]["pattern"],
                format!("{}$", t.schema_path())
            );
            let data = &schema["properties"]["data"];
            assert_eq!(data["additionalProperties"], true, "{}", t.kind);
            for field in data["required"].as_array().expect("data.required") {
                let field = field.as_str().expect("field names");
                assert!(
                    data["properties"].get(field).is_some(),
                    "{}: required {field} is described",
                    t.kind
                );
            }
        }
        assert!(VALIDATORS.len() == EVENT_TYPES.len());
        assert_eq!(schema("nope"), None);
    }

    /// The schemas repeat the envelope and the common `data` fields (each file stands alone
    /// for its readers); this keeps the copies equal.
    #[test]
    fn the_envelope_and_common_fields_are_the_same_in_every_schema() {
        let envelope = [
            "specversion",
            "id",
            "source",
            "time",
            "datacontenttype",
            "droverseq",
        ];
        let common = ["instance", "campaign", "workflow", "version", "seq"];
        let first = |scope| {
            EVENT_TYPES
                .iter()
                .find(|t| t.scope == scope)
                .expect("a type of each scope")
                .schema()
        };
        let instance = first(EventScope::Instance);
        for t in EVENT_TYPES {
            let schema = t.schema();
            assert_eq!(schema["required"], instance["required"], "{}", t.kind);
            for field in envelope {
                let reference = &instance["properties"][field];
                let mine = &schema["properties"][field];
                if field == "droverseq" {
                    assert_eq!(mine["type"], reference["type"], "{}", t.kind);
                    assert_eq!(mine["minimum"], reference["minimum"], "{}", t.kind);
                } else {
                    assert_eq!(mine, reference, "{}: {field}", t.kind);
                }
            }
            if t.scope != EventScope::Instance {
                continue;
            }
            assert_eq!(
                schema["properties"]["subject"],
                instance["properties"]["subject"]
            );
            let data = &schema["properties"]["data"];
            let required: Vec<&Value> = data["required"]
                .as_array()
                .expect("required")
                .iter()
                .collect();
            for field in common.iter().chain(["state"].iter()) {
                assert!(
                    required.contains(&&json!(field)),
                    "{}: requires {field}",
                    t.kind
                );
            }
            for field in common.iter().chain(["actor"].iter()) {
                assert_eq!(
                    data["properties"][field], instance["properties"]["data"]["properties"][field],
                    "{}: data.{field}",
                    t.kind
                );
            }
        }
    }

    fn started() -> Value {
        json!({
            "specversion": "1.0",
            "id": "0195f3a0-7c1e-7000-8000-000000000001",
            "source": "drover/dr-1",
            "type": "drover.instance.started",
            "subject": "0195f3a0-7c1e-7000-8000-0000000000aa",
            "time": "2026-11-22T10:00:00.123456Z",
            "datacontenttype": "application/json",
            "dataschema": "/v1/schemas/events/started",
            "droverseq": 1,
            "data": {
                "instance": "0195f3a0-7c1e-7000-8000-0000000000aa",
                "campaign": "default",
                "workflow": "welcome",
                "version": 1,
                "seq": 1,
                "state": "ready",
                "step": "count",
                "actor": "ada",
                "a_field_added_later": { "any": "thing" },
            },
        })
    }

    #[test]
    fn a_conforming_event_validates_and_every_broken_rule_is_named() {
        validate(&started()).expect("conforms");
        let drift = json!({
            "specversion": "1.0",
            "id": "0195f3a0-7c1e-7000-8000-000000000002",
            "source": "drover/dr-1",
            "type": "drover.campaign.permit_drift",
            "subject": "spring",
            "time": "2026-11-22T10:00:00+01:00",
            "datacontenttype": "application/json",
            "dataschema": "https://api.example/v1/schemas/events/permit_drift",
            "droverseq": 3,
            "data": { "campaign": "spring", "seq": 3, "kind": "running_counter",
                      "detail": "running 3, permits 2", "repaired": true, "leader_term": 7 },
        });
        validate(&drift).expect("conforms");

        let broken = |edit: &dyn Fn(&mut Value), expected: &str| {
            let mut event = started();
            edit(&mut event);
            let err = validate(&event).expect_err(expected);
            assert!(err.contains(expected), "{expected:?} not in {err:?}");
        };
        broken(&|e| e["id"] = json!("not-a-uuid"), "/id");
        broken(&|e| e["time"] = json!("yesterday"), "/time");
        broken(&|e| e["droverseq"] = json!(0), "/droverseq");
        broken(&|e| e["data"]["seq"] = json!(2), "differs from droverseq");
        broken(&|e| e["data"]["state"] = json!("sleeping"), "/data/state");
        broken(
            &|e| {
                e["data"].as_object_mut().expect("data").remove("step");
            },
            "\"step\" is a required property",
        );
        broken(
            &|e| e["data"]["instance"] = json!("0195f3a0-7c1e-7000-8000-0000000000bb"),
            "differs from subject",
        );
        broken(
            &|e| e["type"] = json!("drover.instance.exploded"),
            "unknown event type",
        );
        broken(
            &|e| e["type"] = json!("drover.campaign.started"),
            "unknown event type",
        );
        broken(
            &|e| e["dataschema"] = json!("/v1/schemas/events/queued"),
            "/dataschema",
        );
        assert!(validate(&json!({ "data": {} })).is_err());
    }

    #[test]
    fn terminal_events_fix_the_state_they_leave() {
        let mut completed = started();
        completed["type"] = json!("drover.instance.completed");
        completed["dataschema"] = json!("/v1/schemas/events/completed");
        let data = &mut completed["data"];
        for (k, v) in [
            ("step", json!("done")),
            ("step_seq", json!(4)),
            ("attempt", json!(1)),
            ("outcome", json!("completed")),
            ("next_step", Value::Null),
            ("error", Value::Null),
            ("state", json!("completed")),
        ] {
            data[k] = v;
        }
        validate(&completed).expect("conforms");
        completed["data"]["state"] = json!("running");
        assert!(validate(&completed).is_err_and(|e| e.contains("/data/state")));
    }

    #[test]
    fn the_asyncapi_document_names_every_type_channel_and_header() {
        let subjects = Subjects::new("dr-1");
        let doc = asyncapi(&subjects);
        let text = serde_json::to_string(&doc).expect("serializes");
        let doc: Value = serde_json::from_str(&text).expect("valid JSON");
        assert_eq!(doc["asyncapi"], "3.0.0");
        let messages = doc["components"]["messages"].as_object().expect("messages");
        let channels = doc["channels"].as_object().expect("channels");
        for t in EVENT_TYPES {
            let message = &messages[t.kind];
            assert_eq!(message["title"], t.cloudevent_type());
            assert_eq!(message["contentType"], CONTENT_TYPE);
            let channel = match t.scope {
                EventScope::Instance => "instanceEvents",
                EventScope::Campaign => "campaignEvents",
            };
            assert_eq!(
                channels[channel]["messages"][t.kind]["$ref"],
                format!("#/components/messages/{}", t.kind)
            );
            assert!(
                channels[channel]["parameters"]["kind"]["enum"]
                    .as_array()
                    .expect("kinds")
                    .contains(&json!(t.kind))
            );
            // The payload compiles as a schema, and takes the events its type's schema takes.
            let payload = jsonschema::draft202012::options()
                .should_validate_formats(true)
                .build(&message["payload"])
                .unwrap_or_else(|err| panic!("{}: payload does not compile: {err}", t.kind));
            if t.kind == "started" {
                assert!(payload.is_valid(&started()));
            }
        }
        let headers = &doc["components"]["schemas"]["eventHeaders"];
        assert_eq!(headers["required"], json!([MSG_ID_HEADER, "Content-Type"]));
        jsonschema::draft202012::new(headers).expect("the headers schema compiles");

        // Every channel address is the prefix and dot-separated tokens, each a literal or a
        // `{parameter}` the channel describes; every operation's messages are its channel's.
        for (name, channel) in channels {
            let Some(address) = channel["address"].as_str() else {
                assert_eq!(name, "signalAnswers", "only the reply channel is dynamic");
                continue;
            };
            let tokens: Vec<&str> = address.split('.').collect();
            assert_eq!(tokens[0], "dr-1", "{address}");
            let mut named = BTreeSet::new();
            for token in &tokens[1..] {
                if let Some(parameter) = token.strip_prefix('{').and_then(|t| t.strip_suffix('}')) {
                    assert!(
                        channel["parameters"].get(parameter).is_some(),
                        "{address}: {parameter} is described"
                    );
                    named.insert(parameter);
                } else {
                    assert!(
                        !token.is_empty()
                            && token.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                        "{address}: literal token {token:?}"
                    );
                }
            }
            let described: BTreeSet<&str> = channel["parameters"]
                .as_object()
                .map(|p| p.keys().map(String::as_str).collect())
                .unwrap_or_default();
            assert_eq!(named, described, "{address}");
        }
        assert_eq!(
            channels["signals"]["address"],
            subjects.signal("{instance}", "{event}")
        );
        assert_eq!(
            channels["instanceEvents"]["address"],
            subjects.event("{campaign}", "{workflow}", "{instance}", "{kind}")
        );
        assert_eq!(
            channels["campaignEvents"]["address"],
            subjects.campaign_event("{campaign}", "{kind}")
        );
        for (name, operation) in doc["operations"].as_object().expect("operations") {
            let channel = operation["channel"]["$ref"].as_str().expect("a channel");
            for message in operation["messages"].as_array().expect("messages") {
                let reference = message["$ref"].as_str().expect("a reference");
                assert!(
                    reference.starts_with(&format!("{channel}/messages/")),
                    "{name}"
                );
                let key = reference.rsplit('/').next().expect("a key");
                let channel_name = channel.rsplit('/').next().expect("a name");
                assert!(
                    channels[channel_name]["messages"].get(key).is_some(),
                    "{name}"
                );
            }
        }
        assert!(text.contains(&subjects.events_stream()));
    }
}
