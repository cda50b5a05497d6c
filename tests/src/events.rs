//! Checks a run's events against the event contract ([`drover_bus::contract`]): each event
//! valid against its type's schema, on the subject its envelope names, with the headers the
//! contract promises; per instance (per campaign for campaign events) `droverseq` from 1,
//! without gaps, in order; a copy delivered again only with the same `id`.
//!
//! [`EventReader`] follows a prefix's EVENTS stream as a reader would (an ordered consumer);
//! [`check_event_log`] judges what was read; [`TestEnv::check_events`] does both over every
//! event a test's cluster kept. `TestEnv::cleanup` runs it too unless
//! `DROVER_TEST_CHECK_EVENTS=0` (see [`CHECK_EVENTS_ENV`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::time::Duration;

use anyhow::{Context, bail};
use async_nats::jetstream::consumer::{self, DeliverPolicy};
use drover_bus::contract::{self, EventScope};
use drover_bus::{Bus, Subjects};
use futures::StreamExt;
use serde_json::Value;

use crate::TestEnv;

/// `TestEnv::cleanup` checks every event of the test's cluster against the contract (and
/// fails the test, after cleaning up, when one breaks it) unless this is set to `0`.
pub const CHECK_EVENTS_ENV: &str = "DROVER_TEST_CHECK_EVENTS";

/// The most problems one failed check lists (it counts the rest).
const MAX_LISTED: usize = 25;

/// One message read from the EVENTS stream.
#[derive(Clone, Debug)]
pub struct ReceivedEvent {
    /// The NATS subject it was published on.
    pub subject: String,
    /// Its sequence in the stream (0 when made up by a test).
    pub stream_sequence: u64,
    pub msg_id: Option<String>,
    pub content_type: Option<String>,
    /// The payload as JSON, or why it is not JSON.
    pub payload: Result<Value, String>,
}

impl ReceivedEvent {
    /// An event as the relay publishes it: `payload` on `subject`, with the contract's headers.
    pub fn published(subject: &str, payload: Value) -> Self {
        Self {
            subject: subject.to_owned(),
            stream_sequence: 0,
            msg_id: payload["id"].as_str().map(str::to_owned),
            content_type: Some(contract::CONTENT_TYPE.to_owned()),
            payload: Ok(payload),
        }
    }

    fn from_message(message: &async_nats::jetstream::Message) -> Self {
        let header = |name: &str| {
            message
                .headers
                .as_ref()
                .and_then(|h| h.get(name))
                .map(|v| v.as_str().to_owned())
        };
        Self {
            subject: message.subject.to_string(),
            stream_sequence: message.info().map(|i| i.stream_sequence).unwrap_or(0),
            msg_id: header(contract::MSG_ID_HEADER),
            content_type: header("Content-Type"),
            payload: serde_json::from_slice(&message.payload)
                .map_err(|err| format!("not JSON: {err}")),
        }
    }

    /// The CloudEvent `type`'s kind (`started`), when it has one.
    pub fn kind(&self) -> Option<&str> {
        let payload = self.payload.as_ref().ok()?;
        payload["type"].as_str()?.rsplit('.').next()
    }
}

/// Follows a cluster's EVENTS stream from its first kept event, in stream order, with an
/// ordered consumer (ephemeral, no acks; it recreates itself if the server loses its place).
pub struct EventReader {
    messages: consumer::pull::Ordered,
    last_sequence: u64,
}

impl EventReader {
    /// Opens a reader on `bus`'s EVENTS stream (which must exist: a node or `Bus::connect`
    /// provisions it).
    pub async fn open(bus: &Bus) -> anyhow::Result<Self> {
        let subjects = bus.subjects();
        let stream = bus
            .jetstream()
            .get_stream(subjects.events_stream())
            .await
            .with_context(|| format!("stream {}", subjects.events_stream()))?;
        let consumer = stream
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: subjects.event_filter(),
                deliver_policy: DeliverPolicy::All,
                ..Default::default()
            })
            .await
            .context("creating an ordered consumer on the events stream")?;
        let messages = consumer
            .messages()
            .await
            .context("reading the events stream")?;
        Ok(Self {
            messages,
            last_sequence: 0,
        })
    }

    /// The next event, or `None` when none arrives within `timeout`.
    pub async fn next(&mut self, timeout: Duration) -> anyhow::Result<Option<ReceivedEvent>> {
        match tokio::time::timeout(timeout, self.messages.next()).await {
            Err(_) => Ok(None),
            Ok(None) => bail!("the events consumer ended"),
            Ok(Some(Err(err))) => bail!("reading the events stream: {err}"),
            Ok(Some(Ok(message))) => {
                let event = ReceivedEvent::from_message(&message);
                self.last_sequence = event.stream_sequence;
                Ok(Some(event))
            }
        }
    }

    /// The stream sequence of the last event read (0 before the first).
    pub fn last_sequence(&self) -> u64 {
        self.last_sequence
    }
}

/// Every event `bus`'s EVENTS stream holds now, in stream order; and whether the stream has
/// dropped older ones (its limits), so the first events of some instances may be gone.
pub async fn read_all_events(bus: &Bus) -> anyhow::Result<(Vec<ReceivedEvent>, bool)> {
    let subjects = bus.subjects();
    let mut stream = bus
        .jetstream()
        .get_stream(subjects.events_stream())
        .await
        .with_context(|| format!("stream {}", subjects.events_stream()))?;
    let state = stream.info().await?.state.clone();
    let truncated = state.first_sequence > 1;
    let mut events = Vec::with_capacity(usize::try_from(state.messages).unwrap_or(0));
    if state.messages == 0 {
        return Ok((events, truncated));
    }
    let mut reader = EventReader::open(bus).await?;
    while reader.last_sequence() < state.last_sequence {
        match reader.next(Duration::from_secs(10)).await? {
            Some(event) => events.push(event),
            None => bail!(
                "the events stream stopped at sequence {} of {}",
                reader.last_sequence(),
                state.last_sequence
            ),
        }
    }
    Ok((events, truncated))
}

/// When `bus`'s EVENTS stream was created (ns since the epoch), if it exists.
pub(crate) async fn events_stream_created(bus: &Bus) -> Option<i128> {
    let mut stream = bus
        .jetstream()
        .get_stream(bus.subjects().events_stream())
        .await
        .ok()?;
    Some(stream.info().await.ok()?.created.unix_timestamp_nanos())
}

/// What a passed check saw.
#[derive(Debug, Default)]
pub struct EventCheck {
    /// Events read, copies included.
    pub events: usize,
    /// Copies of an event read again (same `droverseq`, same `id`).
    pub duplicates: usize,
    /// The last `droverseq` of each instance (campaign events: each campaign), by
    /// `(scope, subject)`.
    pub last_seq: BTreeMap<(&'static str, String), u64>,
    /// Each kind, with how many events of it were read.
    pub kinds: BTreeMap<String, usize>,
}

/// The ids of one instance's (or campaign's) events, by `droverseq`.
struct Sequence {
    /// The `droverseq` of `ids[0]`: 1 unless the stream dropped older events.
    first: u64,
    ids: Vec<String>,
}

impl Sequence {
    /// The `droverseq` due next.
    fn next(&self) -> u64 {
        self.first + self.ids.len() as u64
    }
}

/// Judges `events` (in the order they were read) against the contract of the cluster
/// `subjects` names. `truncated`: the stream may have dropped the oldest events, so an
/// instance's sequence may start past 1. Fails listing every problem (up to 25, then counts).
pub fn check_event_log(
    subjects: &Subjects,
    events: &[ReceivedEvent],
    truncated: bool,
) -> anyhow::Result<EventCheck> {
    let mut check = EventCheck {
        events: events.len(),
        ..EventCheck::default()
    };
    let mut problems = Vec::new();
    let mut sequences: HashMap<(&'static str, String), Sequence> = HashMap::new();
    // Each id: the (scope, subject, droverseq) it was first seen as.
    let mut ids: HashMap<String, (&'static str, String, u64)> = HashMap::new();
    for event in events {
        let at = format!("stream #{} on {}", event.stream_sequence, event.subject);
        let payload = match &event.payload {
            Ok(payload) => payload,
            Err(err) => {
                problems.push(format!("{at}: {err}"));
                continue;
            }
        };
        if let Err(err) = contract::validate(payload) {
            problems.push(format!("{at}: {err}"));
        }
        let Some(kind) = event.kind() else {
            continue;
        };
        *check.kinds.entry(kind.to_owned()).or_default() += 1;
        let Some(event_type) = contract::event_type(kind) else {
            continue;
        };
        let (id, subject) = (payload["id"].as_str(), payload["subject"].as_str());
        let (Some(id), Some(subject)) = (id, subject) else {
            continue;
        };
        if event.msg_id.as_deref() != Some(id) {
            problems.push(format!(
                "{at}: header {} {:?} is not the event's id {id}",
                contract::MSG_ID_HEADER,
                event.msg_id
            ));
        }
        if event.content_type.as_deref() != Some(contract::CONTENT_TYPE) {
            problems.push(format!(
                "{at}: header Content-Type {:?}, not {}",
                event.content_type,
                contract::CONTENT_TYPE
            ));
        }
        let expected_subject = match event_type.scope {
            EventScope::Instance => subjects.event(
                payload["data"]["campaign"].as_str().unwrap_or("?"),
                payload["data"]["workflow"].as_str().unwrap_or("?"),
                subject,
                kind,
            ),
            EventScope::Campaign => subjects.campaign_event(subject, kind),
        };
        if event.subject != expected_subject {
            problems.push(format!(
                "{at}: {id} belongs on {expected_subject} (its campaign, workflow, subject \
                 and type)"
            ));
        }
        let expected_source = format!("drover/{}", subjects.prefix());
        if payload["source"] != expected_source.as_str() {
            problems.push(format!("{at}: source is not {expected_source}"));
        }
        let Some(seq) = payload["droverseq"].as_u64() else {
            continue; // the schema check named it
        };
        let key = (event_type.scope.as_str(), subject.to_owned());
        match ids.get(id) {
            Some(first) if *first != (key.0, key.1.clone(), seq) => problems.push(format!(
                "{at}: id {id} was {} {} droverseq {} before, now {} {subject} droverseq {seq}",
                first.0, first.1, first.2, key.0
            )),
            Some(_) => {}
            None => {
                ids.insert(id.to_owned(), (key.0, key.1.clone(), seq));
            }
        }
        let sequence = sequences.entry(key.clone()).or_insert_with(|| Sequence {
            // A truncated stream may have dropped an instance's first events.
            first: if truncated { seq } else { 1 },
            ids: Vec::new(),
        });
        let due = sequence.next();
        if seq < due {
            match seq
                .checked_sub(sequence.first)
                .and_then(|i| sequence.ids.get(usize::try_from(i).ok()?))
            {
                Some(earlier) if earlier == id => check.duplicates += 1,
                Some(earlier) if earlier.is_empty() => problems.push(format!(
                    "{at}: {} {subject} droverseq {seq} arrived after a later one",
                    key.0
                )),
                Some(earlier) => problems.push(format!(
                    "{at}: {} {subject} droverseq {seq} again with id {id}; it was {earlier}",
                    key.0
                )),
                None => problems.push(format!(
                    "{at}: {} {subject} droverseq {seq} comes before the first one read",
                    key.0
                )),
            }
            continue;
        }
        if seq > due {
            problems.push(format!(
                "{at}: {} {subject} droverseq {seq} ({kind}) arrived while {due} was due: a \
                 gap or out of order",
                key.0
            ));
            // Judge what follows against this one, so one gap is reported once.
            while sequence.next() < seq {
                sequence.ids.push(String::new());
            }
        }
        sequence.ids.push(id.to_owned());
        check.last_seq.insert(key, seq);
    }
    if problems.is_empty() {
        return Ok(check);
    }
    let mut report = format!(
        "{} problem(s) with the event contract in {} event(s):",
        problems.len(),
        events.len()
    );
    for problem in problems.iter().take(MAX_LISTED) {
        let _ = write!(report, "\n  - {problem}");
    }
    if problems.len() > MAX_LISTED {
        let _ = write!(report, "\n  … and {} more", problems.len() - MAX_LISTED);
    }
    bail!(report)
}

/// The channel of the AsyncAPI document `doc` whose address `subject` matches (each
/// `{parameter}` one token, within the parameter's `enum` when it has one), and the
/// parameters' values.
pub fn asyncapi_channel<'d>(
    doc: &'d Value,
    subject: &str,
) -> Option<(&'d str, BTreeMap<String, String>)> {
    let tokens: Vec<&str> = subject.split('.').collect();
    doc["channels"]
        .as_object()?
        .iter()
        .find_map(|(name, channel)| {
            let address: Vec<&str> = channel["address"].as_str()?.split('.').collect();
            if address.len() != tokens.len() {
                return None;
            }
            let mut values = BTreeMap::new();
            for (pattern, token) in address.iter().zip(&tokens) {
                match pattern.strip_prefix('{').and_then(|p| p.strip_suffix('}')) {
                    Some(parameter) => {
                        let allowed = &channel["parameters"][parameter]["enum"];
                        if let Some(allowed) = allowed.as_array()
                            && !allowed.iter().any(|v| v == *token)
                        {
                            return None;
                        }
                        values.insert(parameter.to_owned(), (*token).to_owned());
                    }
                    None if pattern == token => {}
                    None => return None,
                }
            }
            Some((name.as_str(), values))
        })
}

impl TestEnv {
    /// Reads every event this test's cluster kept and checks it against the contract
    /// ([`check_event_log`]).
    pub async fn check_events(&self) -> anyhow::Result<EventCheck> {
        let (events, truncated) = read_all_events(&self.bus).await?;
        // A test that deleted the stream lost the events it held: later ones start late.
        let recreated = events_stream_created(&self.bus).await != self.events_stream_created;
        check_event_log(self.bus.subjects(), &events, truncated || recreated)
    }

    /// Whether `cleanup` checks the events ([`CHECK_EVENTS_ENV`]).
    pub(crate) fn checks_events_at_cleanup() -> bool {
        std::env::var(CHECK_EVENTS_ENV).map_or(true, |v| v != "0")
    }
}

/// Kinds and subjects seen, for a test's own assertions.
pub fn kinds_and_subjects(events: &[ReceivedEvent]) -> (BTreeSet<String>, BTreeSet<String>) {
    let kinds = events
        .iter()
        .filter_map(|e| e.kind().map(str::to_owned))
        .collect();
    let subjects = events.iter().map(|e| e.subject.clone()).collect();
    (kinds, subjects)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const INSTANCE: &str = "0195f3a0-7c1e-7000-8000-0000000000aa";

    fn event(seq: u64, id: u64, kind: &str, extra: Value) -> ReceivedEvent {
        let mut data = json!({
            "instance": INSTANCE, "campaign": "default", "workflow": "wf", "version": 1,
            "seq": seq, "state": "ready", "step": "a",
        });
        if let (Some(data), Value::Object(extra)) = (data.as_object_mut(), extra) {
            data.extend(extra);
        }
        let payload = json!({
            "specversion": "1.0",
            "id": format!("0195f3a0-7c1e-7000-8000-{id:012}"),
            "source": "drover/t-1",
            "type": format!("drover.instance.{kind}"),
            "subject": INSTANCE,
            "time": "2026-11-22T10:00:00Z",
            "datacontenttype": "application/json",
            "dataschema": format!("/v1/schemas/events/{kind}"),
            "droverseq": seq,
            "data": data,
        });
        ReceivedEvent::published(&format!("t-1.evt.default.wf.{INSTANCE}.{kind}"), payload)
    }

    fn step(seq: u64, id: u64) -> ReceivedEvent {
        event(
            seq,
            id,
            "step_completed",
            json!({ "step_seq": seq, "attempt": 1, "outcome": "completed",
                    "next_step": "a", "error": null }),
        )
    }

    fn check(events: &[ReceivedEvent]) -> anyhow::Result<EventCheck> {
        check_event_log(&Subjects::new("t-1"), events, false)
    }

    fn fails(events: &[ReceivedEvent], expected: &str) {
        let err = check(events).expect_err(expected).to_string();
        assert!(err.contains(expected), "{expected:?} not in {err}");
    }

    #[test]
    fn a_contiguous_sequence_with_same_id_copies_passes() {
        let started = event(1, 1, "started", json!({}));
        let events = [started.clone(), step(2, 2), started, step(2, 2), step(3, 3)];
        let check = check(&events).expect("passes");
        assert_eq!(check.events, 5);
        assert_eq!(check.duplicates, 2);
        assert_eq!(check.last_seq[&("instance", INSTANCE.to_owned())], 3);
        assert_eq!(check.kinds["step_completed"], 3);
    }

    #[test]
    fn gaps_reorderings_and_copies_with_another_id_fail() {
        let started = event(1, 1, "started", json!({}));
        fails(
            &[started.clone(), step(3, 3)],
            "droverseq 3 (step_completed) arrived while 2 was due",
        );
        fails(&[step(2, 2)], "while 1 was due");
        fails(
            &[started.clone(), step(3, 3), step(2, 2)],
            "droverseq 2 arrived after a later one",
        );
        fails(
            &[started.clone(), step(2, 2), step(2, 9)],
            "droverseq 2 again with id",
        );
        fails(
            &[started.clone(), step(2, 1)],
            "id 0195f3a0-7c1e-7000-8000-000000000001 was",
        );
        // Truncated by the stream's limits: a sequence may start late, not skip.
        let late = [step(7, 7), step(8, 8)];
        check_event_log(&Subjects::new("t-1"), &late, true).expect("a late start passes");
        assert!(check_event_log(&Subjects::new("t-1"), &[step(7, 7), step(9, 9)], true).is_err());
    }

    #[test]
    fn schema_headers_subject_and_source_are_checked() {
        let mut bad = event(1, 1, "started", json!({}));
        bad.payload.as_mut().expect("json")["data"]
            .as_object_mut()
            .expect("data")
            .remove("step");
        fails(&[bad], "\"step\" is a required property");

        let mut moved = event(1, 1, "started", json!({}));
        moved.subject = format!("t-1.evt.other.wf.{INSTANCE}.started");
        fails(&[moved], "belongs on t-1.evt.default.wf.");

        let mut headers = event(1, 1, "started", json!({}));
        headers.msg_id = Some("j:1".to_owned());
        headers.content_type = None;
        fails(std::slice::from_ref(&headers), "header Nats-Msg-Id");
        fails(&[headers], "header Content-Type None");

        let mut garbage = event(1, 1, "started", json!({}));
        garbage.payload = Err("not JSON: eof".to_owned());
        fails(&[garbage], "not JSON");

        let mut source = event(1, 1, "started", json!({}));
        source.payload.as_mut().expect("json")["source"] = json!("drover/t-2");
        fails(&[source], "source is not drover/t-1");
    }

    #[test]
    fn subjects_are_matched_to_asyncapi_channels() {
        let subjects = Subjects::new("t-1");
        let doc = contract::asyncapi(&subjects);
        let (channel, values) = asyncapi_channel(
            &doc,
            &format!("t-1.evt.default.wf.{INSTANCE}.step_completed"),
        )
        .expect("an instance event");
        assert_eq!(channel, "instanceEvents");
        assert_eq!(values["kind"], "step_completed");
        assert_eq!(values["instance"], INSTANCE);
        let (channel, _) = asyncapi_channel(&doc, "t-1.evt.spring._campaign._.permit_drift")
            .expect("a campaign event");
        assert_eq!(channel, "campaignEvents");
        assert!(
            asyncapi_channel(&doc, &format!("t-1.evt.default.wf.{INSTANCE}.exploded")).is_none()
        );
        assert!(asyncapi_channel(&doc, "t-2.evt.default.wf.x.started").is_none());
        assert!(asyncapi_channel(&doc, "t-1.evt.default.wf.started").is_none());
    }
}
