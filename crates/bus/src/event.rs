//! Events on the wire: the store's facts rendered as structured-mode JSON CloudEvents on their
//! subjects (README, "Events").

use drover_core::event::{Fact, FactSubject};
use serde_json::{Map, Value, json};

use crate::Subjects;

pub use drover_core::EventKind;

/// Where the JSON Schema of an event type's CloudEvent is served (relative to the API's base
/// URL): the event's `dataschema`.
pub fn dataschema(kind: EventKind) -> String {
    format!("/v1/schemas/events/{}", kind.as_str())
}

/// A fact as it is published: its subject and its CloudEvent.
#[derive(Clone, Debug, PartialEq)]
pub struct Rendered {
    pub subject: String,
    pub cloudevent: Value,
}

/// Renders `fact` for the cluster of `subjects`: the CloudEvent carries the fact's sequence
/// as the extension attribute `droverseq` and as `data.seq`, and `data` names what the event
/// is about (`instance`, `campaign`, `workflow`, `version`).
pub fn render(subjects: &Subjects, fact: &Fact) -> Rendered {
    let mut data = match &fact.data {
        Value::Object(map) => map.clone(),
        Value::Null => Map::new(),
        other => {
            let mut map = Map::new();
            map.insert("value".to_owned(), other.clone());
            map
        }
    };
    data.insert("campaign".to_owned(), Value::from(fact.campaign.as_str()));
    data.insert("seq".to_owned(), Value::from(fact.seq));
    let kind = fact.kind.as_str();
    let (about, subject_id, subject) = match &fact.subject {
        FactSubject::Instance {
            id,
            workflow,
            version,
        } => {
            let id = id.to_string();
            data.insert("instance".to_owned(), Value::from(id.as_str()));
            data.insert("workflow".to_owned(), Value::from(workflow.as_str()));
            data.insert("version".to_owned(), Value::from(*version));
            let subject = subjects.event(&fact.campaign, workflow, &id, kind);
            ("instance", id, subject)
        }
        FactSubject::Campaign => (
            "campaign",
            fact.campaign.clone(),
            subjects.campaign_event(&fact.campaign, kind),
        ),
    };
    let cloudevent = json!({
        "specversion": "1.0",
        "id": fact.id,
        "source": format!("drover/{}", subjects.prefix()),
        "type": format!("drover.{about}.{kind}"),
        "subject": subject_id,
        "time": fact.time.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        "datacontenttype": "application/json",
        "dataschema": dataschema(fact.kind),
        "droverseq": fact.seq,
        "data": data,
    });
    Rendered {
        subject,
        cloudevent,
    }
}

#[cfg(test)]
mod tests {
    use chrono::Utc;
    use drover_core::InstanceId;
    use uuid::Uuid;

    use super::*;

    #[test]
    fn an_instance_fact_renders_with_its_sequence_and_what_it_is_about() {
        let id = InstanceId::new();
        let fact = Fact {
            id: Uuid::now_v7(),
            subject: FactSubject::Instance {
                id,
                workflow: "onboard".into(),
                version: 3,
            },
            campaign: "spring".into(),
            seq: 7,
            kind: EventKind::StepCompleted,
            data: json!({ "step": "send", "state": "ready" }),
            time: Utc::now(),
        };
        let rendered = render(&Subjects::new("drv"), &fact);
        assert_eq!(
            rendered.subject,
            format!("drv.evt.spring.onboard.{id}.step_completed")
        );
        let ce = &rendered.cloudevent;
        assert_eq!(ce["type"], "drover.instance.step_completed");
        assert_eq!(ce["droverseq"], 7);
        assert_eq!(ce["subject"], id.to_string());
        assert_eq!(ce["dataschema"], "/v1/schemas/events/step_completed");
        assert_eq!(ce["data"]["seq"], 7);
        assert_eq!(ce["data"]["instance"], id.to_string());
        assert_eq!(ce["data"]["version"], 3);
        assert_eq!(ce["data"]["step"], "send");
    }

    #[test]
    fn a_campaign_fact_renders_on_the_campaign_subject() {
        let fact = Fact {
            id: Uuid::now_v7(),
            subject: FactSubject::Campaign,
            campaign: "spring".into(),
            seq: 1,
            kind: EventKind::PermitDrift,
            data: json!({ "kind": "running_count" }),
            time: Utc::now(),
        };
        let rendered = render(&Subjects::new("drv"), &fact);
        assert_eq!(rendered.subject, "drv.evt.spring._campaign._.permit_drift");
        assert_eq!(rendered.cloudevent["type"], "drover.campaign.permit_drift");
        assert_eq!(rendered.cloudevent["subject"], "spring");
        assert!(rendered.cloudevent["data"].get("instance").is_none());
    }
}
