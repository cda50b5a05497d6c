//! The canonical JSON of a definition: the form that is stored and compared between versions.

use std::time::Duration;

use serde_json::{Map, Value, json};

use super::model::{Definition, Severity, SleepUntil, Step, StepKind};
use crate::expr::Expr;

impl Definition {
    /// The canonical JSON of the definition, the form that is stored and compared between
    /// versions: fixed key order, defaults written out, optional fields omitted when absent.
    pub fn to_json(&self) -> Value {
        let mut object = Map::new();
        object.insert("name".into(), json!(self.name));
        if let Some(description) = &self.description {
            object.insert("description".into(), json!(description));
        }
        // Omitted when `normal`, so a definition stored before severities existed compares equal.
        if self.severity != Severity::Normal {
            object.insert("severity".into(), json!(self.severity.as_str()));
        }
        if let Some(queue) = &self.queue {
            object.insert("queue".into(), json!(queue));
        }
        object.insert("vars".into(), Value::Object(self.vars.clone()));
        object.insert("max_steps".into(), json!(self.max_steps));
        let steps = self.steps.iter().map(Step::to_json).collect();
        object.insert("steps".into(), Value::Array(steps));
        Value::Object(object)
    }
}

impl Step {
    fn to_json(&self) -> Value {
        let mut object = Map::new();
        object.insert("id".into(), json!(self.id));
        object.insert("kind".into(), json!(self.kind.name()));
        if let Some(queue) = &self.queue {
            object.insert("queue".into(), json!(queue));
        }
        match &self.kind {
            StepKind::Assign { set } => {
                object.insert("set".into(), exprs_to_json(set));
            }
            StepKind::Http {
                method,
                url,
                headers,
                body,
            } => {
                object.insert("method".into(), json!(method.as_str()));
                object.insert("url".into(), json!(url));
                let headers = headers.iter().map(|(k, v)| (k.clone(), json!(v)));
                object.insert("headers".into(), Value::Object(headers.collect()));
                if let Some(body) = body {
                    object.insert("body".into(), exprs_to_json(body));
                }
            }
            StepKind::Publish { subject, payload } => {
                object.insert("subject".into(), json!(subject));
                object.insert("payload".into(), exprs_to_json(payload));
            }
            StepKind::Handler { handler, input } => {
                object.insert("handler".into(), json!(handler));
                object.insert("input".into(), exprs_to_json(input));
            }
            StepKind::Sleep { until } => match until {
                SleepUntil::For(duration) => {
                    object.insert("for".into(), duration_to_json(*duration));
                }
                SleepUntil::Until(expr) => {
                    object.insert("until".into(), json!(expr.source()));
                }
            },
            StepKind::WaitEvent { name, timeout } => {
                object.insert("name".into(), json!(name));
                // `timeout` is the event's: written here, and the per-attempt one not at all.
                if let Some(timeout) = timeout {
                    object.insert("timeout".into(), duration_to_json(*timeout));
                }
            }
            StepKind::Subworkflow {
                workflow,
                version,
                input,
            } => {
                object.insert("workflow".into(), json!(workflow));
                if let Some(version) = version {
                    object.insert("version".into(), json!(version));
                }
                object.insert("input".into(), exprs_to_json(input));
            }
            StepKind::End { status, reason } => {
                object.insert("status".into(), json!(status.as_str()));
                if let Some(reason) = reason {
                    object.insert("reason".into(), json!(reason.source()));
                }
            }
        }
        if !matches!(self.kind, StepKind::WaitEvent { .. }) {
            object.insert("timeout".into(), duration_to_json(self.timeout));
        }
        object.insert(
            "retry".into(),
            json!({
                "max_attempts": self.retry.max_attempts,
                "backoff": duration_to_json(self.retry.backoff),
                "max_backoff": duration_to_json(self.retry.max_backoff),
            }),
        );
        object.insert("allow_retry".into(), json!(self.allow_retry));
        if !matches!(self.kind, StepKind::End { .. }) {
            let next = self.next.iter().map(|t| match &t.when {
                None => json!({ "to": t.to }),
                Some(when) => json!({ "to": t.to, "when": when.source() }),
            });
            object.insert("next".into(), Value::Array(next.collect()));
        }
        Value::Object(object)
    }
}

fn exprs_to_json(entries: &[(String, Expr)]) -> Value {
    let entries = entries.iter().map(|(k, e)| (k.clone(), json!(e.source())));
    Value::Object(entries.collect())
}

/// Humantime's own rendering (`1m 30s`, `200ms`), which it parses back to the same value.
fn duration_to_json(duration: Duration) -> Value {
    json!(humantime::format_duration(duration).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::definition::HttpMethod;
    use crate::definition::fixtures::EXAMPLE;
    use proptest::prelude::*;

    #[test]
    fn canonical_json_round_trips_and_ignores_formatting() {
        let definition = Definition::parse(EXAMPLE).expect("the example is valid");
        let json = definition.to_json();
        let again = Definition::parse(&json.to_string()).expect("canonical JSON is valid");
        assert_eq!(again, definition);
        assert_eq!(again.to_json(), json);
        assert_eq!(json["steps"][2]["timeout"], "30s");
        assert_eq!(
            json["steps"][0]["retry"],
            json!({"max_attempts": 3, "backoff": "1s", "max_backoff": "1m"})
        );

        let uncommented: Value = serde_yaml_ng::from_str(EXAMPLE).expect("the example is YAML");
        let reordered =
            EXAMPLE.replace("  - id: done\n    kind: end", "  - kind: end\n    id: done");
        for source in [
            serde_json::to_string_pretty(&json).unwrap_or_default(),
            serde_yaml_ng::to_string(&uncommented).unwrap_or_default(),
            reordered,
        ] {
            let reformatted = Definition::parse(&source).map(|d| d.to_json());
            assert_eq!(reformatted.ok().as_ref(), Some(&json), "{source}");
        }
    }

    /// A valid linear workflow, possibly with conditional jumps back, as a JSON document.
    fn linear_workflow() -> impl Strategy<Value = Value> {
        let expr = prop::sample::select(vec![
            "vars.n + 1",
            "'text'",
            "instance.id",
            "[1, 2]",
            "{'a': vars.n}",
            "steps.s0",
        ]);
        let exprs =
            prop::collection::vec(("[a-z][a-z0-9_]{0,5}", expr), 0..4).prop_map(|entries| {
                Value::Object(entries.into_iter().map(|(k, e)| (k, json!(e))).collect())
            });
        let duration = prop::sample::select(vec!["10s", "200ms", "1m", "1h 2m", "90s", "1day"]);
        let kind = prop_oneof![
            exprs.clone().prop_map(|set| json!({"kind": "assign", "set": set})),
            (prop::sample::select(HttpMethod::ALL.to_vec()), "[a-z]{1,8}", prop::option::of(exprs.clone()))
                .prop_map(|(method, path, body)| {
                    let mut step = json!({"kind": "http", "method": method.as_str(), "url": format!("https://example.com/{path}"), "headers": {"X-A": path}});
                    if let Some(body) = body { step["body"] = body; }
                    step
                }),
            ("[a-z]{1,5}(\\.[a-z0-9]{1,5}){0,3}", exprs.clone()).prop_map(|(subject, payload)| json!({"kind": "publish", "subject": subject, "payload": payload})),
            ("[a-z_]{1,10}", exprs.clone()).prop_map(|(handler, input)| json!({"kind": "handler", "handler": handler, "input": input})),
            prop::sample::select(vec!["1s", "90s", "1day", "0s"]).prop_map(|d| json!({"kind": "sleep", "for": d})),
            Just(json!({"kind": "sleep", "until": "vars.wake_at"})),
            ("[a-z][a-z0-9_-]{0,8}", prop::option::of(prop::sample::select(vec!["1s", "5m", "2h"]))).prop_map(|(name, timeout)| {
                let mut step = json!({"kind": "wait_event", "name": name});
                if let Some(timeout) = timeout { step["timeout"] = json!(timeout); }
                step
            }),
            ("[a-z][a-z0-9-]{0,8}", prop::option::of(1i32..5), exprs).prop_map(|(workflow, version, input)| {
                let mut step = json!({"kind": "subworkflow", "workflow": workflow, "input": input});
                if let Some(version) = version { step["version"] = json!(version); }
                step
            }),
        ];
        let step = (
            kind,
            prop::option::of(duration.clone()),
            prop::option::of((1u32..10, duration.clone(), duration)),
            prop::option::of(any::<bool>()),
            prop::option::of(any::<prop::sample::Index>()),
        );
        (prop::collection::vec(step, 0..6), any::<bool>(), prop::option::of(1u32..100_000)).prop_map(|(steps, failed, max_steps)| {
            let count = steps.len();
            let mut list: Vec<Value> = steps.into_iter().enumerate().map(|(i, (mut step, timeout, retry, allow_retry, back))| {
                step["id"] = json!(format!("s{i}"));
                if let Some(timeout) = timeout { step["timeout"] = json!(timeout); }
                if let Some((n, b, m)) = retry { step["retry"] = json!({"max_attempts": n, "backoff": b, "max_backoff": m}); }
                if let Some(allow) = allow_retry { step["allow_retry"] = json!(allow); }
                let forward = json!({"to": format!("s{}", i + 1)});
                step["next"] = match back {
                    Some(back) => json!([{"to": format!("s{}", back.index(i + 1)), "when": "vars.n < 3"}, forward]),
                    None => json!([forward]),
                };
                step
            }).collect();
            list.push(json!({"id": format!("s{count}"), "kind": "end", "status": if failed { "failed" } else { "completed" }, "reason": "'done'"}));
            let mut definition = json!({"name": "generated", "vars": {"n": 0, "s": "x"}, "steps": list});
            if let Some(max) = max_steps { definition["max_steps"] = json!(max); }
            definition
        })
    }

    proptest! {
        #[test]
        fn generated_workflows_round_trip_through_canonical_json(document in linear_workflow()) {
            let from_json = Definition::parse(&document.to_string());
            prop_assert!(from_json.is_ok(), "{:?}", from_json);
            let Ok(definition) = from_json else { return Ok(()) };
            let canonical = definition.to_json();
            let again = Definition::parse(&canonical.to_string()).map(|d| d.to_json()).ok();
            prop_assert_eq!(again.as_ref(), Some(&canonical));
            let yaml = serde_yaml_ng::to_string(&document).unwrap_or_default();
            let from_yaml = Definition::parse(&yaml).map(|d| d.to_json()).ok();
            prop_assert_eq!(from_yaml.as_ref(), Some(&canonical));
        }
    }
}
