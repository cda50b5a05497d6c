//! Reading a definition: YAML or JSON source, or a stored canonical JSON, into the model, with
//! every rule checked and every problem reported at once.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use serde_json::{Map, Value};

use super::model::{
    DEFAULT_MAX_STEPS, DEFAULT_TIMEOUT, Definition, DefinitionError, DefinitionErrors, EndStatus,
    HttpMethod, RetryPolicy, Severity, SleepUntil, Step, StepKind, Transition,
};
use crate::expr::{Expr, on_parse_stack};
use crate::ids::is_slug;
use crate::route::Queue;
use crate::subject::{PublishPolicy, check_literal};

/// The largest source accepted, checked before parsing so a huge upload costs nothing.
pub const MAX_SOURCE_BYTES: usize = 1024 * 1024;
/// The most steps one definition may have.
pub const MAX_STEP_COUNT: usize = 1_000;
/// The longest duration a definition may give (humantime's `1year`): far past any sensible
/// timeout or back-off, and far from overflowing `Instant` or timestamp arithmetic downstream.
pub const MAX_DURATION: Duration = Duration::from_secs(31_557_600);

const TOP_FIELDS: &[&str] = &[
    "name",
    "description",
    "severity",
    "queue",
    "vars",
    "max_steps",
    "steps",
];
const STEP_FIELDS: &[&str] = &[
    "id",
    "kind",
    "queue",
    "next",
    "allow_retry",
    "timeout",
    "retry",
];
const RETRY_FIELDS: &[&str] = &["max_attempts", "backoff", "max_backoff"];
const TRANSITION_FIELDS: &[&str] = &["to", "when"];

impl Definition {
    /// Parses YAML or JSON (YAML is a superset) and validates every rule, collecting all the
    /// errors rather than stopping at the first.
    pub fn parse(source: &str) -> Result<Definition, DefinitionErrors> {
        if source.len() > MAX_SOURCE_BYTES {
            return Err(DefinitionErrors::one(
                "source",
                format!("{} bytes, the limit is 1 MiB", source.len()),
            ));
        }
        on_parse_stack(|| {
            let mut yaml: serde_yaml_ng::Value = serde_yaml_ng::from_str(source)
                .map_err(|e| DefinitionErrors::one("source", e.to_string()))?;
            yaml.apply_merge()
                .map_err(|e| DefinitionErrors::one("source", e.to_string()))?;
            let value = yaml_to_json(yaml, "").map_err(|e| DefinitionErrors(vec![e]))?;
            Self::check(&value, true)
        })
        .unwrap_or_else(|message| Err(DefinitionErrors::one("source", message)))
    }

    /// Loads a stored definition (its canonical JSON), validating it as [`Definition::parse`]
    /// does, except for the rules added since versions were first deployed: that CEL names
    /// only what is in scope and that every step can reach an `end`. A version deployed
    /// before them keeps running; a new deployment goes through [`Definition::parse`].
    pub fn from_json(value: &Value) -> Result<Definition, DefinitionErrors> {
        on_parse_stack(|| Self::check(value, false))
            .unwrap_or_else(|message| Err(DefinitionErrors::one("source", message)))
    }

    fn check(value: &Value, deploying: bool) -> Result<Definition, DefinitionErrors> {
        let mut checker = Checker {
            errors: Vec::new(),
            deploying,
        };
        match checker.definition(value) {
            Some(definition) if checker.errors.is_empty() => Ok(definition),
            _ if checker.errors.is_empty() => {
                Err(DefinitionErrors::one("source", "invalid definition"))
            }
            _ => Err(DefinitionErrors(checker.errors)),
        }
    }

    /// `publish` subjects must stay out of the cluster's own subject space and inside its
    /// allow-list, both runtime settings: so this is checked at deploy time rather than in
    /// [`Definition::parse`] (which already refuses `$…`, `_INBOX…` and malformed subjects).
    pub fn check_publish(&self, policy: &PublishPolicy) -> Result<(), DefinitionErrors> {
        let errors: Vec<DefinitionError> = self
            .steps
            .iter()
            .filter_map(|step| match &step.kind {
                StepKind::Publish { subject, .. } => {
                    policy.check(subject).err().map(|message| DefinitionError {
                        step: Some(step.id.clone()),
                        field: "subject".into(),
                        message,
                    })
                }
                _ => None,
            })
            .collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(DefinitionErrors(errors))
        }
    }
}

impl Definition {
    /// Every `subworkflow` must name a deployed workflow, and a version it has when it gives
    /// one. `deployed` holds the latest version of each deployed workflow the store knows
    /// (versions run 1..=latest and are never deleted); a definition may call itself, its
    /// recursion bounded by the call depth, so its own name always counts as deployed.
    pub fn check_subworkflows(
        &self,
        deployed: &HashMap<String, i32>,
    ) -> Result<(), DefinitionErrors> {
        let mut errors = Vec::new();
        for (step, workflow, version) in self.subworkflows() {
            let latest = if workflow == self.name {
                None
            } else {
                match deployed.get(workflow) {
                    Some(latest) => Some(*latest),
                    None => {
                        errors.push(DefinitionError {
                            step: Some(step.to_owned()),
                            field: "workflow".into(),
                            message: format!(
                                "no workflow named {workflow:?} is deployed; deploy it first"
                            ),
                        });
                        continue;
                    }
                }
            };
            // A self-call's version is the one being deployed or an earlier one; the store
            // decides at run time, as before.
            if let (Some(version), Some(latest)) = (version, latest)
                && version > latest
            {
                errors.push(DefinitionError {
                    step: Some(step.to_owned()),
                    field: "version".into(),
                    message: format!(
                        "workflow {workflow:?} has no version {version} (its latest is {latest})"
                    ),
                });
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(DefinitionErrors(errors))
        }
    }
}

impl StepKind {
    /// The fields a kind adds to the common ones; `None` for an unknown kind.
    fn fields(kind: &str) -> Option<&'static [&'static str]> {
        Some(match kind {
            "assign" => &["set"],
            "http" => &["method", "url", "headers", "body"],
            "publish" => &["subject", "payload"],
            "handler" => &["handler", "input"],
            "sleep" => &["for", "until"],
            // `timeout` is a common field; for `wait_event` it means the event's timeout.
            "wait_event" => &["name"],
            "subworkflow" => &["workflow", "version", "input"],
            "end" => &["status", "reason"],
            _ => return None,
        })
    }
}

impl DefinitionErrors {
    fn one(field: &str, message: impl Into<String>) -> Self {
        DefinitionErrors(vec![DefinitionError {
            step: None,
            field: field.into(),
            message: message.into(),
        }])
    }
}

/// Where an error points: a step by id, or by position when it has no usable id.
struct Loc {
    step: Option<String>,
    prefix: String,
}

impl Loc {
    const TOP: Loc = Loc {
        step: None,
        prefix: String::new(),
    };
}

/// Walks a document, recording every problem. Its methods return what they could read;
/// after any error the result is discarded, so they fall back freely.
struct Checker {
    errors: Vec<DefinitionError>,
    /// Whether the deploy-time rules apply (see [`Definition::from_json`]).
    deploying: bool,
}

impl Checker {
    fn error(&mut self, at: &Loc, field: &str, message: impl Into<String>) {
        self.errors.push(DefinitionError {
            step: at.step.clone(),
            field: format!("{}{field}", at.prefix),
            message: message.into(),
        });
    }

    fn type_error(&mut self, at: &Loc, field: &str, expected: &str, found: &Value) {
        let found = describe(found);
        self.error(at, field, format!("expected {expected}, found {found}"));
    }

    fn unknown_fields(
        &mut self,
        at: &Loc,
        path: &str,
        object: &Map<String, Value>,
        allowed: &[&str],
    ) {
        for key in object.keys().filter(|key| !allowed.contains(&key.as_str())) {
            let expected = allowed.join(", ");
            self.error(
                at,
                &format!("{path}{key}"),
                format!("unknown field; expected one of: {expected}"),
            );
        }
    }

    fn required<'v>(
        &mut self,
        at: &Loc,
        field: &str,
        value: Option<&'v Value>,
    ) -> Option<&'v Value> {
        let value = present(value);
        if value.is_none() {
            self.error(at, field, "missing required field");
        }
        value
    }

    fn string<'v>(&mut self, at: &Loc, field: &str, value: &'v Value) -> Option<&'v str> {
        let string = value.as_str();
        if string.is_none() {
            self.type_error(at, field, "a string", value);
        }
        string
    }

    fn required_str<'v>(
        &mut self,
        at: &Loc,
        field: &str,
        value: Option<&'v Value>,
    ) -> Option<&'v str> {
        self.required(at, field, value)
            .and_then(|v| self.string(at, field, v))
    }

    fn optional_str<'v>(
        &mut self,
        at: &Loc,
        field: &str,
        value: Option<&'v Value>,
    ) -> Option<&'v str> {
        present(value).and_then(|v| self.string(at, field, v))
    }

    /// An optional `queue`: a slug naming a worker queue.
    fn queue(&mut self, at: &Loc, value: Option<&Value>) -> Option<Queue> {
        let name = self.optional_str(at, "queue", value)?;
        match name.parse() {
            Ok(queue) => Some(queue),
            Err(_) => {
                let message = format!(
                    "{name:?} is not a queue name: a slug, [a-z0-9][a-z0-9_-]{{0,62}} (workers \
                     serve queues by name, `drover node --queues`)"
                );
                self.error(at, "queue", message);
                None
            }
        }
    }

    fn slug(&mut self, at: &Loc, field: &str, value: &str) {
        if !is_slug(value) {
            let message = format!("{value:?} is not a slug: [a-z0-9][a-z0-9_-]{{0,62}}");
            self.error(at, field, message);
        }
    }

    fn positive_u32(&mut self, at: &Loc, field: &str, value: &Value) -> Option<u32> {
        let n = value
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .filter(|n| *n >= 1);
        if n.is_none() {
            self.type_error(at, field, "a positive integer (1 to 4294967295)", value);
        }
        n
    }

    fn duration(&mut self, at: &Loc, field: &str, value: Option<&Value>) -> Option<Duration> {
        let text = present(value).and_then(|v| match v.as_str() {
            Some(text) => Some(text),
            None => {
                self.type_error(at, field, "a duration such as \"10s\" or \"200ms\"", v);
                None
            }
        })?;
        match humantime::parse_duration(text) {
            Ok(duration) if duration > MAX_DURATION => {
                self.error(
                    at,
                    field,
                    format!("{text:?} is longer than the limit of 1year"),
                );
                None
            }
            Ok(duration) => Some(duration),
            Err(e) => {
                let message = format!("invalid duration {text:?} ({e}); write e.g. 10s, 200ms, 1m");
                self.error(at, field, message);
                None
            }
        }
    }

    /// An expression outside a `next`, where `output` is not in scope.
    fn expr(&mut self, at: &Loc, field: &str, value: &Value) -> Option<Expr> {
        self.scoped_expr(at, field, value, false)
    }

    /// An expression reading only `vars`, `steps`, `instance` and, in a `next`, `output`.
    fn scoped_expr(
        &mut self,
        at: &Loc,
        field: &str,
        value: &Value,
        output_in_scope: bool,
    ) -> Option<Expr> {
        let Some(source) = value.as_str() else {
            let expected =
                "a CEL expression as a string (a literal is an expression too: \"1\", \"'text'\")";
            self.type_error(at, field, expected, value);
            return None;
        };
        match Expr::compile(source) {
            Ok(expr) => {
                if !self.deploying {
                    return Some(expr);
                }
                let mut undeclared = expr.undeclared();
                if !output_in_scope && expr.uses_output() {
                    undeclared.push("output".to_owned());
                }
                if undeclared.is_empty() {
                    return Some(expr);
                }
                let names = undeclared
                    .iter()
                    .map(|name| format!("`{name}`"))
                    .collect::<Vec<_>>()
                    .join(", ");
                let outside = if output_in_scope {
                    ""
                } else {
                    " (`output` only in the step's own `next`)"
                };
                self.error(
                    at,
                    field,
                    format!(
                        "expression `{source}` names {names}; it can only read `vars`, `steps`, \
                         `instance`, `output`{outside} and CEL's standard functions"
                    ),
                );
                None
            }
            Err(e) => {
                self.error(at, field, e.to_string());
                None
            }
        }
    }

    /// A map of key to CEL expression (`set`, `body`, `payload`, `input`); `None` if absent.
    fn expr_map(
        &mut self,
        at: &Loc,
        field: &str,
        value: Option<&Value>,
    ) -> Option<Vec<(String, Expr)>> {
        let value = present(value)?;
        let Some(object) = value.as_object() else {
            self.type_error(at, field, "a map of key to CEL expression", value);
            return Some(Vec::new());
        };
        let entries = object.iter().filter_map(|(key, value)| {
            let expr = self.expr(at, &format!("{field}.{key}"), value)?;
            Some((key.clone(), expr))
        });
        Some(entries.collect())
    }

    fn definition(&mut self, value: &Value) -> Option<Definition> {
        let at = &Loc::TOP;
        let Some(object) = value.as_object() else {
            self.type_error(at, "source", "a map with `name` and `steps`", value);
            return None;
        };
        self.unknown_fields(at, "", object, TOP_FIELDS);
        let name = self.required_str(at, "name", object.get("name"));
        if let Some(name) = name {
            self.slug(at, "name", name);
        }
        let description = self.optional_str(at, "description", object.get("description"));
        let severity = match self.optional_str(at, "severity", object.get("severity")) {
            None => Severity::default(),
            Some(severity) => severity.parse().unwrap_or_else(|message: String| {
                self.error(at, "severity", message);
                Severity::default()
            }),
        };
        let queue = self.queue(at, object.get("queue"));
        let vars = match present(object.get("vars")) {
            None => Map::new(),
            Some(Value::Object(vars)) => vars.clone(),
            Some(other) => {
                self.type_error(at, "vars", "a map of variable to initial value", other);
                Map::new()
            }
        };
        let max_steps = match present(object.get("max_steps")) {
            None => DEFAULT_MAX_STEPS,
            Some(v) => self
                .positive_u32(at, "max_steps", v)
                .unwrap_or(DEFAULT_MAX_STEPS),
        };
        let steps = self.steps(object.get("steps"));
        Some(Definition {
            name: name?.to_owned(),
            description: description.map(str::to_owned),
            queue,
            severity,
            vars,
            max_steps,
            steps: steps?,
        })
    }

    fn steps(&mut self, value: Option<&Value>) -> Option<Vec<Step>> {
        let at = &Loc::TOP;
        let items = match self.required(at, "steps", value)? {
            Value::Array(items) if items.is_empty() => {
                self.error(at, "steps", "at least one step is required");
                return None;
            }
            Value::Array(items) => items,
            other => {
                self.type_error(at, "steps", "a list of steps", other);
                return None;
            }
        };
        if items.len() > MAX_STEP_COUNT {
            let message = format!("{} steps, the limit is {MAX_STEP_COUNT}", items.len());
            self.error(at, "steps", message);
        }

        // Ids first, so a transition may name a step further down.
        let ids: Vec<Option<&str>> = items.iter().map(|s| s.get("id")?.as_str()).collect();
        let mut index: HashMap<&str, usize> = HashMap::new();
        for (i, id) in ids.iter().enumerate() {
            if let Some(id) = id {
                index.entry(id).or_insert(i);
            }
        }

        let mut steps = Vec::with_capacity(items.len());
        let mut duplicate = vec![false; items.len()];
        let mut edges = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let at = match ids[i] {
                Some(id) => Loc {
                    step: Some(id.to_owned()),
                    prefix: String::new(),
                },
                None => Loc {
                    step: None,
                    prefix: format!("steps[{i}]."),
                },
            };
            if let Some(id) = ids[i]
                && let Some(first) = index.get(id).filter(|first| **first != i)
            {
                duplicate[i] = true;
                self.error(
                    &at,
                    "id",
                    format!("duplicate step id (steps[{first}] has it too)"),
                );
            }
            steps.push(self.step(&at, i, item, &index));
            // Read from the source, so a step with other errors still counts for reachability.
            let targets = item
                .get("next")
                .and_then(Value::as_array)
                .into_iter()
                .flatten();
            let targets = targets.filter_map(|t| index.get(t.get("to")?.as_str()?).copied());
            edges.push(targets.collect::<Vec<usize>>());
        }

        let mut reached = vec![false; items.len()];
        let mut queue = VecDeque::from([0]);
        reached[0] = true;
        while let Some(i) = queue.pop_front() {
            for &target in &edges[i] {
                if !reached[target] {
                    reached[target] = true;
                    queue.push_back(target);
                }
            }
        }
        for (i, id) in ids.iter().enumerate() {
            if !reached[i] && !duplicate[i] {
                let (step, field) = match id {
                    Some(id) => (Some((*id).to_owned()), "id".to_owned()),
                    None => (None, format!("steps[{i}]")),
                };
                let message =
                    "unreachable: no chain of `next` leads here from the first step".into();
                self.errors.push(DefinitionError {
                    step,
                    field,
                    message,
                });
            }
        }
        if self.deploying {
            self.end_reachable(items, &ids, &duplicate, &edges);
        }
        steps.into_iter().collect()
    }

    /// Every step must have a way to an `end`: a loop may go round, but not for ever. Steps
    /// with no usable `next` at all have their own error already.
    fn end_reachable(
        &mut self,
        items: &[Value],
        ids: &[Option<&str>],
        duplicate: &[bool],
        edges: &[Vec<usize>],
    ) {
        let mut incoming = vec![Vec::new(); items.len()];
        for (from, targets) in edges.iter().enumerate() {
            for &to in targets {
                incoming[to].push(from);
            }
        }
        let is_end = |item: &Value| item.get("kind").and_then(Value::as_str) == Some("end");
        let mut ends = vec![false; items.len()];
        let mut queue: VecDeque<usize> = VecDeque::new();
        for (i, item) in items.iter().enumerate() {
            if is_end(item) && !duplicate[i] {
                ends[i] = true;
                queue.push_back(i);
            }
        }
        while let Some(i) = queue.pop_front() {
            for &from in &incoming[i] {
                if !ends[from] {
                    ends[from] = true;
                    queue.push_back(from);
                }
            }
        }
        for i in 0..items.len() {
            if ends[i] || duplicate[i] || edges[i].is_empty() {
                continue;
            }
            let (step, field) = match ids[i] {
                Some(id) => (Some(id.to_owned()), "next".to_owned()),
                None => (None, format!("steps[{i}].next")),
            };
            self.errors.push(DefinitionError {
                step,
                field,
                message:
                    "no `end` is reachable from here: every path through `next` loops for ever"
                        .into(),
            });
        }
    }

    fn step(
        &mut self,
        at: &Loc,
        i: usize,
        value: &Value,
        index: &HashMap<&str, usize>,
    ) -> Option<Step> {
        let Some(object) = value.as_object() else {
            let message = format!("expected a step (a map), found {}", describe(value));
            self.errors.push(DefinitionError {
                step: None,
                field: format!("steps[{i}]"),
                message,
            });
            return None;
        };
        let id = self.required_str(at, "id", object.get("id"));
        if let Some(id) = id {
            self.slug(at, "id", id);
        }
        let kind = self.required_str(at, "kind", object.get("kind"));
        match kind.map(|kind| (kind, StepKind::fields(kind))) {
            Some((_, Some(fields))) => {
                let allowed: Vec<&str> = STEP_FIELDS.iter().chain(fields).copied().collect();
                self.unknown_fields(at, "", object, &allowed);
            }
            Some((kind, None)) => {
                let known = StepKind::NAMES.join(", ");
                self.error(
                    at,
                    "kind",
                    format!("unknown kind {kind:?}; known kinds: {known}"),
                );
            }
            None => {}
        }

        let queue = self.queue(at, object.get("queue"));
        let allow_retry = match present(object.get("allow_retry")) {
            None => true,
            Some(Value::Bool(b)) => *b,
            Some(other) => {
                self.type_error(at, "allow_retry", "true or false", other);
                true
            }
        };
        // A `wait_event`'s `timeout` is how long it waits for its event (read with its kind).
        let timeout = match kind {
            Some("wait_event") => None,
            _ => self.duration(at, "timeout", object.get("timeout")),
        };
        if timeout.is_some_and(|t| t.is_zero()) {
            self.error(at, "timeout", "must be longer than 0s");
        }
        let retry = self.retry(at, object.get("retry"));
        let is_end = kind == Some("end");
        let kind = kind.and_then(|kind| self.kind(at, kind, object));
        let next = self.transitions(at, is_end, object.get("next"), index);
        Some(Step {
            id: id?.to_owned(),
            queue,
            allow_retry,
            timeout: timeout.unwrap_or(DEFAULT_TIMEOUT),
            retry,
            next,
            kind: kind?,
        })
    }

    fn retry(&mut self, at: &Loc, value: Option<&Value>) -> RetryPolicy {
        let mut policy = RetryPolicy::default();
        let Some(value) = present(value) else {
            return policy;
        };
        let Some(object) = value.as_object() else {
            self.type_error(
                at,
                "retry",
                "a map with max_attempts, backoff, max_backoff",
                value,
            );
            return policy;
        };
        self.unknown_fields(at, "retry.", object, RETRY_FIELDS);
        if let Some(v) = present(object.get("max_attempts")) {
            policy.max_attempts = self.positive_u32(at, "retry.max_attempts", v).unwrap_or(1);
        }
        if let Some(backoff) = self.duration(at, "retry.backoff", object.get("backoff")) {
            policy.backoff = backoff;
        }
        if let Some(max) = self.duration(at, "retry.max_backoff", object.get("max_backoff")) {
            policy.max_backoff = max;
        }
        policy
    }

    fn transitions(
        &mut self,
        at: &Loc,
        is_end: bool,
        value: Option<&Value>,
        index: &HashMap<&str, usize>,
    ) -> Vec<Transition> {
        let missing = "missing: every step but `end` needs a `next` whose last entry has no `when`";
        let items = match (present(value), is_end) {
            (None, true) => return Vec::new(),
            (None, false) => {
                self.error(at, "next", missing);
                return Vec::new();
            }
            (Some(_), true) => {
                self.error(at, "next", "an `end` step has no `next`");
                return Vec::new();
            }
            (Some(Value::Array(items)), false) if items.is_empty() => {
                self.error(at, "next", missing);
                return Vec::new();
            }
            (Some(Value::Array(items)), false) => items,
            (Some(other), false) => {
                self.type_error(at, "next", "a list of {to, when}", other);
                return Vec::new();
            }
        };
        let mut transitions = Vec::with_capacity(items.len());
        for (k, item) in items.iter().enumerate() {
            let path = format!("next[{k}]");
            let Some(object) = item.as_object() else {
                self.type_error(at, &path, "a map with `to` and an optional `when`", item);
                continue;
            };
            self.unknown_fields(at, &format!("{path}."), object, TRANSITION_FIELDS);
            let to = self.required_str(at, &format!("{path}.to"), object.get("to"));
            if let Some(to) = to
                && !index.contains_key(to)
            {
                self.error(at, &format!("{path}.to"), format!("unknown target {to:?}"));
            }
            let when = present(object.get("when"));
            if when.is_some() && k + 1 == items.len() {
                let message =
                    "the last entry must have no `when`, so the step always has a way forward";
                self.error(at, &format!("{path}.when"), message);
            }
            let when = when.and_then(|w| self.scoped_expr(at, &format!("{path}.when"), w, true));
            if let Some(to) = to {
                transitions.push(Transition {
                    to: to.to_owned(),
                    when,
                });
            }
        }
        transitions
    }

    fn kind(&mut self, at: &Loc, kind: &str, object: &Map<String, Value>) -> Option<StepKind> {
        Some(match kind {
            "assign" => {
                let set = self.expr_map(at, "set", object.get("set"));
                if set.is_none() {
                    self.error(at, "set", "missing required field");
                }
                StepKind::Assign { set: set? }
            }
            "http" => {
                let method = self.required_str(at, "method", object.get("method"));
                let method = method.and_then(|m| {
                    let found = HttpMethod::ALL
                        .into_iter()
                        .find(|known| known.as_str() == m);
                    if found.is_none() {
                        let message = format!(
                            "unknown method {m:?}; expected GET, POST, PUT, PATCH or DELETE"
                        );
                        self.error(at, "method", message);
                    }
                    found
                });
                let url = self.required_str(at, "url", object.get("url"));
                if let Some(url) = url
                    && let Err(problem) = check_url(url)
                {
                    self.error(at, "url", format!("{url:?} {problem}"));
                }
                let headers = self.headers(at, object.get("headers"));
                let body = self.expr_map(at, "body", object.get("body"));
                StepKind::Http {
                    method: method?,
                    url: url?.to_owned(),
                    headers,
                    body,
                }
            }
            "publish" => {
                let subject = self.required_str(at, "subject", object.get("subject"));
                if let Some(subject) = subject
                    && let Err(problem) = check_literal(subject)
                {
                    self.error(at, "subject", format!("{subject:?} {problem}"));
                }
                let payload = self.expr_map(at, "payload", object.get("payload"));
                StepKind::Publish {
                    subject: subject?.to_owned(),
                    payload: payload.unwrap_or_default(),
                }
            }
            "handler" => {
                let handler = self.required_str(at, "handler", object.get("handler"));
                if handler.is_some_and(|h| h.trim().is_empty()) {
                    self.error(at, "handler", "must name a registered handler");
                }
                let input = self.expr_map(at, "input", object.get("input"));
                StepKind::Handler {
                    handler: handler?.to_owned(),
                    input: input.unwrap_or_default(),
                }
            }
            "sleep" => {
                let duration = self.duration(at, "for", object.get("for"));
                let until = present(object.get("until"));
                match (present(object.get("for")), until) {
                    (Some(_), Some(_)) => {
                        self.error(at, "until", "give either `for` or `until`, not both");
                        return None;
                    }
                    (None, None) => {
                        self.error(
                            at,
                            "for",
                            "missing: a sleep needs `for: <duration>` or `until: <expression>`",
                        );
                        return None;
                    }
                    (Some(_), None) => StepKind::Sleep {
                        until: SleepUntil::For(duration?),
                    },
                    (None, Some(until)) => StepKind::Sleep {
                        until: SleepUntil::Until(self.expr(at, "until", until)?),
                    },
                }
            }
            "wait_event" => {
                let name = self.required_str(at, "name", object.get("name"));
                if let Some(name) = name {
                    self.slug(at, "name", name);
                }
                let timeout = self.duration(at, "timeout", object.get("timeout"));
                if timeout.is_some_and(|t| t.is_zero()) {
                    self.error(at, "timeout", "must be longer than 0s");
                }
                StepKind::WaitEvent {
                    name: name?.to_owned(),
                    timeout,
                }
            }
            "subworkflow" => {
                let workflow = self.required_str(at, "workflow", object.get("workflow"));
                if let Some(workflow) = workflow {
                    self.slug(at, "workflow", workflow);
                }
                let version = match present(object.get("version")) {
                    None => None,
                    Some(v) => {
                        let version = v.as_u64().and_then(|n| i32::try_from(n).ok());
                        match version.filter(|n| *n >= 1) {
                            Some(version) => Some(version),
                            None => {
                                self.type_error(
                                    at,
                                    "version",
                                    "a version number (1 to 2147483647)",
                                    v,
                                );
                                return None;
                            }
                        }
                    }
                };
                let input = self.expr_map(at, "input", object.get("input"));
                StepKind::Subworkflow {
                    workflow: workflow?.to_owned(),
                    version,
                    input: input.unwrap_or_default(),
                }
            }
            "end" => {
                let status = self.required_str(at, "status", object.get("status"));
                let status = status.and_then(|s| match s {
                    "completed" => Some(EndStatus::Completed),
                    "failed" => Some(EndStatus::Failed),
                    _ => {
                        self.error(
                            at,
                            "status",
                            format!("unknown status {s:?}; expected completed or failed"),
                        );
                        None
                    }
                });
                let reason = present(object.get("reason")).and_then(|r| self.expr(at, "reason", r));
                StepKind::End {
                    status: status?,
                    reason,
                }
            }
            _ => return None,
        })
    }

    /// Literal headers; checked here so a bad one fails the deploy, not every request.
    fn headers(&mut self, at: &Loc, value: Option<&Value>) -> Vec<(String, String)> {
        let Some(value) = present(value) else {
            return Vec::new();
        };
        let Some(object) = value.as_object() else {
            self.type_error(at, "headers", "a map of header name to string", value);
            return Vec::new();
        };
        let mut headers = Vec::with_capacity(object.len());
        for (name, value) in object {
            let field = format!("headers.{name}");
            let is_token_char =
                |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
            if name.is_empty() || !name.bytes().all(is_token_char) {
                self.error(at, &field, format!("{name:?} is not a valid header name"));
            }
            let Some(value) = self.string(at, &field, value) else {
                continue;
            };
            if value.chars().any(|c| c.is_control() && c != '\t') {
                self.error(
                    at,
                    &field,
                    "a header value must not contain control characters",
                );
            }
            headers.push((name.clone(), value.to_owned()));
        }
        headers
    }
}

/// YAML to JSON by hand rather than through serde, so that YAML's duplicate keys are errors
/// (serde_json would keep the last) and scalar keys become strings; `path` names the field.
fn yaml_to_json(value: serde_yaml_ng::Value, path: &str) -> Result<Value, DefinitionError> {
    use serde_yaml_ng::Value as Yaml;
    let error = |message: String| DefinitionError {
        step: None,
        field: if path.is_empty() {
            "source".into()
        } else {
            path.into()
        },
        message,
    };
    Ok(match value {
        Yaml::Null => Value::Null,
        Yaml::Bool(b) => Value::Bool(b),
        Yaml::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), _, _) => Value::from(i),
            (None, Some(u), _) => Value::from(u),
            (None, None, f) => f
                .and_then(serde_json::Number::from_f64)
                .map(Value::Number)
                .ok_or_else(|| error(format!("{n} is not a number JSON can hold")))?,
        },
        Yaml::String(s) => Value::String(s),
        Yaml::Sequence(items) => {
            let items = items.into_iter().enumerate();
            let items = items.map(|(i, item)| yaml_to_json(item, &format!("{path}[{i}]")));
            Value::Array(items.collect::<Result<_, _>>()?)
        }
        Yaml::Mapping(mapping) => {
            let mut object = Map::new();
            for (key, value) in mapping {
                let key = match key {
                    Yaml::String(s) => s,
                    Yaml::Bool(b) => b.to_string(),
                    Yaml::Number(n) => n.to_string(),
                    _ => return Err(error("map keys must be strings".into())),
                };
                let child = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                let value = yaml_to_json(value, &child)?;
                if object.insert(key, value).is_some() {
                    let message = "duplicate key (a number or bool key equals its string)".into();
                    return Err(DefinitionError {
                        step: None,
                        field: child,
                        message,
                    });
                }
            }
            Value::Object(object)
        }
        Yaml::Tagged(tagged) => {
            return Err(error(format!(
                "YAML tags ({}) are not supported",
                tagged.tag
            )));
        }
    })
}

/// `null` is how YAML writes an empty field (`description:`), so it counts as absent.
fn present(value: Option<&Value>) -> Option<&Value> {
    value.filter(|v| !v.is_null())
}

fn describe(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a bool",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a map",
    }
}

fn check_url(url: &str) -> Result<(), &'static str> {
    let strip = |scheme: &str| {
        let head = url.get(..scheme.len())?;
        head.eq_ignore_ascii_case(scheme)
            .then(|| url.get(scheme.len()..))
            .flatten()
    };
    match strip("http://").or_else(|| strip("https://")) {
        None => Err("must start with http:// or https://"),
        Some("") => Err("has no host"),
        Some(_) if url.chars().any(|c| c.is_whitespace() || c.is_control()) => {
            Err("must not contain whitespace")
        }
        Some(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::definition::fixtures::{EXAMPLE, assert_error, errors_of, with_first_step};
    use crate::expr::Scope;
    use proptest::prelude::*;
    use serde_json::json;

    #[test]
    fn a_queue_that_is_not_a_slug_is_an_error_naming_the_field() {
        for bad in ["GPU", "a.b", "gpu.>", "\"*\"", "\"\"", "-x"] {
            let source =
                format!("name: w\nqueue: {bad}\nsteps: [{{id: a, kind: end, status: completed}}]");
            assert_error(&source, None, "queue", "not a queue name");
            let source = with_first_step(&format!(
                "    kind: assign\n    queue: {bad}\n    set: {{}}\n    next: [{{to: b}}]"
            ));
            assert_error(&source, Some("a"), "queue", "not a queue name");
        }
        assert_error(
            "name: w\nqueue: [gpu]\nsteps: [{id: a, kind: end, status: completed}]",
            None,
            "queue",
            "a string",
        );
        let long = "q".repeat(64);
        assert_error(
            &format!("name: w\nqueue: {long}\nsteps: [{{id: a, kind: end, status: completed}}]"),
            None,
            "queue",
            "slug",
        );
    }

    #[test]
    fn the_documented_example_parses_and_loops_back() {
        let definition = Definition::parse(EXAMPLE).expect("the example is valid");
        assert_eq!(definition.name, "welcome-series");
        assert_eq!(definition.max_steps, DEFAULT_MAX_STEPS);
        assert_eq!(definition.entry().id, "count");
        let record = definition.step("record").expect("record exists");
        assert_eq!(record.next[0].to, "count");
        assert_eq!(record.timeout, Duration::from_secs(10));
        assert_eq!(record.retry.max_attempts, 5);
        let StepKind::Http {
            method,
            headers,
            body,
            ..
        } = &record.kind
        else {
            panic!("record is an http step");
        };
        assert_eq!(*method, HttpMethod::Post);
        assert_eq!(headers, &[("X-Campaign".to_owned(), "spring".to_owned())]);
        let keys: Vec<&str> = body.iter().flatten().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["n", "id"]);

        let vars = json!({"n": 3}).as_object().cloned().unwrap_or_default();
        let (steps, instance) = (Map::new(), json!({"id": "i"}));
        let scope = Scope {
            vars: &vars,
            steps: &steps,
            instance: &instance,
            output: None,
        };
        assert_eq!(record.choose_next(&scope).ok().flatten(), Some("count"));
        let vars = json!({"n": 10}).as_object().cloned().unwrap_or_default();
        let scope = Scope {
            vars: &vars,
            ..scope
        };
        assert_eq!(record.choose_next(&scope).ok().flatten(), Some("done"));
    }

    #[test]
    fn malformed_source_is_one_error_with_its_position() {
        let errors = errors_of("name: w\nsteps: [\n");
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].field, "source");
        assert!(errors[0].message.contains("line"), "{}", errors[0].message);
        assert_error("- a\n- b\n", None, "source", "expected a map");
    }

    #[test]
    fn duplicate_keys_tags_and_nan_are_rejected() {
        let end = "steps: [{id: a, kind: end, status: completed}]";
        assert_error(
            &format!("name: w\nname: v\n{end}"),
            None,
            "source",
            "duplicate",
        );
        assert_error(
            &format!("name: w\nvars: {{a: 1, 'a': 2}}\n{end}"),
            None,
            "source",
            "duplicate",
        );
        assert_error(
            &format!("name: w\nvars: {{1: 1, '1': 2}}\n{end}"),
            None,
            "vars.1",
            "duplicate",
        );
        assert_error(
            &format!("name: w\nvars: {{x: !t 1}}\n{end}"),
            None,
            "vars.x",
            "tags",
        );
        assert_error(
            &format!("name: w\nvars: {{x: .nan}}\n{end}"),
            None,
            "vars.x",
            "JSON",
        );
    }

    #[test]
    fn yaml_merge_keys_are_applied() {
        let source = "name: w\nsteps:\n  - &base {id: a, kind: end, status: completed, timeout: 5s}\n  - {<<: *base, id: b}\n";
        // `b` is unreachable, which shows the merge produced a real step.
        assert_error(source, Some("b"), "id", "unreachable");
        assert_eq!(errors_of(source).len(), 1, "{:?}", errors_of(source));
    }

    #[test]
    fn oversized_source_is_rejected_before_parsing() {
        let source = format!("#{}", " ".repeat(MAX_SOURCE_BYTES));
        assert_error(&source, None, "source", "1 MiB");
    }

    #[test]
    fn unknown_kind_lists_the_known_kinds() {
        let source = with_first_step("    kind: nap\n    for: 1s\n    next: [{to: b}]");
        assert_error(
            &source,
            Some("a"),
            "kind",
            "assign, http, publish, handler, sleep, wait_event, subworkflow, end",
        );
    }

    fn kind_of(source: &str) -> StepKind {
        match Definition::parse(source) {
            Ok(definition) => definition.steps[0].kind.clone(),
            Err(errors) => panic!("{source} does not parse: {errors}"),
        }
    }

    #[test]
    fn sleep_takes_a_duration_or_a_timestamp_expression() {
        let source = with_first_step("    kind: sleep\n    for: 90s\n    next: [{to: b}]");
        assert_eq!(
            kind_of(&source),
            StepKind::Sleep {
                until: SleepUntil::For(Duration::from_secs(90))
            }
        );
        let source = with_first_step(
            "    kind: sleep\n    until: \"timestamp('2030-01-01T00:00:00Z')\"\n    next: [{to: b}]",
        );
        assert!(matches!(
            kind_of(&source),
            StepKind::Sleep {
                until: SleepUntil::Until(_)
            }
        ));
        assert!(kind_of(&source).waits());
    }

    #[test]
    fn sleep_needs_exactly_one_of_for_and_until() {
        let both = with_first_step(
            "    kind: sleep\n    for: 1s\n    until: \"vars.t\"\n    next: [{to: b}]",
        );
        assert_error(&both, Some("a"), "until", "either `for` or `until`");
        let neither = with_first_step("    kind: sleep\n    next: [{to: b}]");
        assert_error(&neither, Some("a"), "for", "missing");
        let bad = with_first_step("    kind: sleep\n    for: later\n    next: [{to: b}]");
        assert_error(&bad, Some("a"), "for", "invalid duration");
        let bad = with_first_step("    kind: sleep\n    until: 'vars.'\n    next: [{to: b}]");
        assert_error(&bad, Some("a"), "until", "does not compile");
        let bad = with_first_step("    kind: sleep\n    for: 1s\n    name: x\n    next: [{to: b}]");
        assert_error(&bad, Some("a"), "name", "unknown field");
    }

    #[test]
    fn wait_event_has_a_slug_name_and_its_own_timeout() {
        let source = with_first_step(
            "    kind: wait_event\n    name: approved\n    timeout: 1h\n    next: [{to: b}]",
        );
        let definition = Definition::parse(&source).expect("valid");
        assert_eq!(
            definition.steps[0].kind,
            StepKind::WaitEvent {
                name: "approved".into(),
                timeout: Some(Duration::from_secs(3600))
            }
        );
        // The per-attempt timeout keeps its default; the canonical JSON has only the event's.
        assert_eq!(definition.steps[0].timeout, DEFAULT_TIMEOUT);
        assert_eq!(definition.to_json()["steps"][0]["timeout"], "1h");
        let source =
            with_first_step("    kind: wait_event\n    name: approved\n    next: [{to: b}]");
        let definition = Definition::parse(&source).expect("valid");
        assert_eq!(definition.to_json()["steps"][0].get("timeout"), None);

        let bad =
            with_first_step("    kind: wait_event\n    name: Approved.x\n    next: [{to: b}]");
        assert_error(&bad, Some("a"), "name", "slug");
        let bad = with_first_step("    kind: wait_event\n    next: [{to: b}]");
        assert_error(&bad, Some("a"), "name", "missing required field");
        let bad = with_first_step(
            "    kind: wait_event\n    name: x\n    timeout: never\n    next: [{to: b}]",
        );
        assert_error(&bad, Some("a"), "timeout", "invalid duration");
        let bad = with_first_step(
            "    kind: wait_event\n    name: x\n    timeout: 0s\n    next: [{to: b}]",
        );
        assert_error(&bad, Some("a"), "timeout", "longer than 0s");
    }

    #[test]
    fn subworkflow_names_a_workflow_an_optional_version_and_input() {
        let source = with_first_step(
            "    kind: subworkflow\n    workflow: child\n    version: 2\n    input: {n: 'vars.n + 1'}\n    next: [{to: b}]",
        );
        let StepKind::Subworkflow {
            workflow,
            version,
            input,
        } = kind_of(&source)
        else {
            panic!("a subworkflow step");
        };
        assert_eq!((workflow.as_str(), version), ("child", Some(2)));
        assert_eq!(input.len(), 1);
        let source =
            with_first_step("    kind: subworkflow\n    workflow: child\n    next: [{to: b}]");
        assert!(matches!(
            kind_of(&source),
            StepKind::Subworkflow { version: None, ref input, .. } if input.is_empty()
        ));

        for bad in ["0", "-1", "1.5", "'2'", "3000000000"] {
            let source = with_first_step(&format!(
                "    kind: subworkflow\n    workflow: child\n    version: {bad}\n    next: [{{to: b}}]"
            ));
            assert_error(&source, Some("a"), "version", "version number");
        }
        let bad =
            with_first_step("    kind: subworkflow\n    workflow: Child\n    next: [{to: b}]");
        assert_error(&bad, Some("a"), "workflow", "slug");
        let bad = with_first_step("    kind: subworkflow\n    next: [{to: b}]");
        assert_error(&bad, Some("a"), "workflow", "missing required field");
        let bad = with_first_step(
            "    kind: subworkflow\n    workflow: c\n    input: {n: 'vars.'}\n    next: [{to: b}]",
        );
        assert_error(&bad, Some("a"), "input.n", "does not compile");
    }

    fn callers(steps: &[(&str, Option<i32>)]) -> Definition {
        let calls: Vec<Value> = steps
            .iter()
            .enumerate()
            .map(|(i, (workflow, version))| {
                let mut step = json!({"id": format!("c{i}"), "kind": "subworkflow",
                    "workflow": workflow, "next": [{"to": format!("c{}", i + 1)}]});
                if let Some(version) = version {
                    step["version"] = json!(version);
                }
                step
            })
            .chain([
                json!({"id": format!("c{}", steps.len()), "kind": "end", "status": "completed"}),
            ])
            .collect();
        Definition::parse(&json!({"name": "caller", "steps": calls}).to_string())
            .expect("a valid caller")
    }

    #[test]
    fn a_subworkflow_naming_no_deployed_workflow_or_version_names_the_step_and_field() {
        let deployed = HashMap::from([("child".to_owned(), 2)]);
        let caller = callers(&[("child", None), ("child", Some(2)), ("caller", Some(9))]);
        assert_eq!(caller.check_subworkflows(&deployed), Ok(()));

        let caller = callers(&[("child", Some(3)), ("nowhere", None), ("child", Some(1))]);
        let errors = caller
            .check_subworkflows(&deployed)
            .expect_err("two errors")
            .0;
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert_eq!(errors[0].step.as_deref(), Some("c0"));
        assert_eq!(errors[0].field, "version");
        assert!(errors[0].message.contains("no version 3"), "{errors:?}");
        assert_eq!(errors[1].step.as_deref(), Some("c1"));
        assert_eq!(errors[1].field, "workflow");
        assert!(errors[1].message.contains("\"nowhere\""), "{errors:?}");
        assert!(errors[1].message.contains("deploy it first"), "{errors:?}");
    }

    #[test]
    fn the_readme_workflows_parse_as_written() {
        let readme = include_str!("../../../../README.md");
        let blocks: Vec<&str> = readme
            .split("```yaml\n")
            .skip(1)
            .filter_map(|rest| rest.split("```").next())
            .collect();
        assert!(blocks.len() >= 2, "the README shows workflows");
        for block in blocks {
            Definition::parse(block)
                .unwrap_or_else(|e| panic!("a README workflow does not deploy: {e}\n{block}"));
        }
    }

    #[test]
    fn the_shipped_examples_parse_with_the_deploy_time_rules() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples");
        let mut seen = 0;
        for entry in std::fs::read_dir(dir).expect("examples/ exists") {
            let path = entry.expect("a directory entry").path();
            if !matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("yaml" | "yml" | "json")
            ) {
                continue;
            }
            let source = std::fs::read_to_string(&path).expect("readable");
            let definition = Definition::parse(&source)
                .unwrap_or_else(|e| panic!("{} does not deploy: {e}", path.display()));
            let deployed = HashMap::new();
            definition
                .check_subworkflows(&deployed)
                .unwrap_or_else(|e| {
                    panic!("{} calls a workflow not in examples/: {e}", path.display())
                });
            seen += 1;
        }
        assert!(seen > 0, "no example in {dir}");
    }

    #[test]
    fn unknown_target_names_the_step_and_field() {
        let source = with_first_step(
            "    kind: assign\n    set: {}\n    next: [{to: b, when: 'true'}, {to: nope}]",
        );
        assert_error(&source, Some("a"), "next[1].to", "unknown target \"nope\"");
        let errors = Definition::parse(&source)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            errors.contains(r#"step "a", field "next[1].to": unknown target "nope""#),
            "{errors}"
        );
    }

    #[test]
    fn duplicate_step_id_names_the_second_step() {
        let source = "name: w\nsteps:\n  - {id: a, kind: assign, set: {}, next: [{to: a, when: 'true'}, {to: b}]}\n  - {id: a, kind: end, status: failed}\n  - {id: b, kind: end, status: completed}\n";
        let errors = errors_of(source);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_error(source, Some("a"), "id", "duplicate");
    }

    #[test]
    fn unreachable_step_names_the_step() {
        let source = "name: w\nsteps:\n  - {id: a, kind: end, status: completed}\n  - {id: b, kind: end, status: failed}\n";
        assert_error(source, Some("b"), "id", "unreachable");
    }

    #[test]
    fn a_step_without_an_unconditional_way_forward_is_rejected() {
        assert_error(
            &with_first_step("    kind: assign\n    set: {}"),
            Some("a"),
            "next",
            "missing",
        );
        assert_error(
            &with_first_step("    kind: assign\n    set: {}\n    next: []"),
            Some("a"),
            "next",
            "missing",
        );
        let source = with_first_step(
            "    kind: assign\n    set: {}\n    next: [{to: b, when: 'vars.n > 1'}]",
        );
        assert_error(&source, Some("a"), "next[0].when", "last entry");
    }

    #[test]
    fn an_end_step_with_next_is_rejected() {
        let source =
            "name: w\nsteps:\n  - {id: a, kind: end, status: completed, next: [{to: a}]}\n";
        assert_error(source, Some("a"), "next", "no `next`");
    }

    #[test]
    fn invalid_cel_names_the_key() {
        let source =
            with_first_step("    kind: assign\n    set: {n: 'vars.n +'}\n    next: [{to: b}]");
        assert_error(&source, Some("a"), "set.n", "does not compile");
        let source = with_first_step(
            "    kind: assign\n    set: {}\n    next: [{to: b, when: '(('}, {to: b}]",
        );
        assert_error(&source, Some("a"), "next[0].when", "does not compile");
    }

    #[test]
    fn cel_naming_undeclared_variables_names_the_step_field_and_names() {
        let source = with_first_step(
            "    kind: assign\n    set: {n: 'var.n', m: 'input.x + vars.n'}\n    next: [{to: b}]",
        );
        assert_error(&source, Some("a"), "set.m", "names `input`");
        let source = with_first_step(
            "    kind: handler\n    handler: h\n    input: {k: 'foo + bar'}\n    next: [{to: b}]",
        );
        assert_error(&source, Some("a"), "input.k", "names `bar`, `foo`");
        let source = with_first_step(
            "    kind: assign\n    set: {}\n    next: [{to: b, when: 'outptu.ok'}, {to: b}]",
        );
        assert_error(&source, Some("a"), "next[0].when", "names `outptu`");
        let source = "name: w\nsteps:\n  - id: e\n    kind: end\n    status: failed\n    \
                      reason: 'x.all(y, y) ? reason : \"\"'\n";
        assert_error(source, Some("e"), "reason", "names `reason`, `x`");
    }

    #[test]
    fn output_is_only_in_scope_in_the_steps_own_next() {
        let source = with_first_step(
            "    kind: assign\n    set: {n: 'output.n'}\n    next: [{to: b, when: 'output.ok'}, {to: b}]",
        );
        let errors = errors_of(&source);
        assert_eq!(errors.len(), 1, "{errors:#?}");
        assert_error(&source, Some("a"), "set.n", "names `output`");
    }

    #[test]
    fn macro_variables_types_and_standard_functions_are_declared() {
        let source = with_first_step(
            "    kind: assign\n    set:\n      a: 'vars.items.all(x, x > 0) && vars.items.exists(y, y == 1)'\n      \
             b: 'vars.items.map(i, i * 2).filter(j, j > size(vars.items))'\n      \
             c: 'type(vars.n) == int && optional.of(1).hasValue() && has(steps.a)'\n      \
             d: 'duration(\"1s\") + timestamp(instance.started_at)'\n    \
             next: [{to: b, when: 'output.n.exists_one(z, z == 2)'}, {to: b}]",
        );
        assert_eq!(errors_of(&source), Vec::new());
    }

    #[test]
    fn a_loop_with_no_way_to_an_end_names_each_of_its_steps() {
        let source = "name: w\nsteps:\n  - id: a\n    kind: assign\n    set: {}\n    \
                      next: [{to: b}]\n  - id: b\n    kind: assign\n    set: {}\n    \
                      next: [{to: a, when: 'vars.n < 3'}, {to: c}]\n  - id: c\n    \
                      kind: assign\n    set: {}\n    next: [{to: b}]\n  - id: e\n    \
                      kind: end\n    status: completed\n";
        let errors = errors_of(source);
        for step in ["a", "b", "c"] {
            assert_error(source, Some(step), "next", "no `end` is reachable");
        }
        // `e` is also unreachable; that is its own error.
        assert_eq!(errors.len(), 4, "{errors:#?}");
    }

    #[test]
    fn a_loop_with_an_exit_is_accepted() {
        let source = "name: w\nsteps:\n  - id: a\n    kind: assign\n    set: {}\n    \
                      next: [{to: b}]\n  - id: b\n    kind: assign\n    set: {}\n    \
                      next: [{to: a, when: 'vars.n < 3'}, {to: e}]\n  - id: e\n    \
                      kind: end\n    status: completed\n";
        assert_eq!(errors_of(source), Vec::new());
        // A self-loop whose only exit leads into a closed loop has no end either.
        let source = "name: w\nsteps:\n  - id: a\n    kind: assign\n    set: {}\n    \
                      next: [{to: a, when: 'vars.n < 3'}, {to: b}, {to: e}]\n  - id: b\n    \
                      kind: assign\n    set: {}\n    next: [{to: b}]\n  - id: e\n    \
                      kind: end\n    status: completed\n";
        let errors = errors_of(source);
        assert!(
            errors.iter().all(|e| e.step.as_deref() != Some("a")),
            "{errors:#?}"
        );
        assert_error(source, Some("b"), "next", "no `end` is reachable");
    }

    #[test]
    fn a_stored_definition_from_before_the_deploy_time_rules_still_loads() {
        let source = "name: w\nsteps:\n  - id: a\n    kind: assign\n    set: {n: 'foo'}\n    \
                      next: [{to: a, when: 'output.ok'}, {to: a}]\n";
        assert_error(source, Some("a"), "set.n", "names `foo`");
        assert_error(source, Some("a"), "next", "no `end` is reachable");
        let body = json!({"name": "w", "steps": [
            {"id": "a", "kind": "assign", "set": {"n": "foo"}, "next": [{"to": "a"}]}
        ]});
        let loaded = Definition::from_json(&body);
        assert!(loaded.is_ok(), "{loaded:?}");
        // The rules that always held still hold.
        let body = json!({"name": "w", "steps": [
            {"id": "a", "kind": "assign", "set": {"n": "foo +"}, "next": [{"to": "a"}]}
        ]});
        assert!(Definition::from_json(&body).is_err());
    }

    #[test]
    fn an_oversized_expression_is_rejected() {
        let long = format!(
            "    kind: assign\n    set: {{n: '{}'}}\n    next: [{{to: b}}]",
            "1".repeat(65 * 1024)
        );
        assert_error(&with_first_step(&long), Some("a"), "set.n", "64 KiB");
    }

    #[test]
    fn non_string_expressions_are_rejected_naming_the_key() {
        let source = with_first_step(
            "    kind: handler\n    handler: h\n    input: {n: 1}\n    next: [{to: b}]",
        );
        assert_error(&source, Some("a"), "input.n", "CEL expression as a string");
    }

    #[test]
    fn invalid_slugs_are_rejected() {
        assert_error(
            "name: Bad Name\nsteps: [{id: a, kind: end, status: completed}]",
            None,
            "name",
            "slug",
        );
        assert_error(
            "name: w\nsteps: [{id: A.1, kind: end, status: completed}]",
            Some("A.1"),
            "id",
            "slug",
        );
    }

    #[test]
    fn a_step_without_an_id_is_named_by_position() {
        assert_error(
            "name: w\nsteps: [{kind: end, status: completed}]",
            None,
            "steps[0].id",
            "missing",
        );
        assert_error("name: w\nsteps: [7]", None, "steps[0]", "expected a step");
    }

    #[test]
    fn unparsable_and_zero_durations_are_rejected() {
        let source = with_first_step(
            "    kind: assign\n    set: {}\n    timeout: soon\n    retry: {backoff: 5}\n    next: [{to: b}]",
        );
        assert_error(&source, Some("a"), "timeout", "invalid duration");
        assert_error(&source, Some("a"), "retry.backoff", "expected a duration");
        let source =
            with_first_step("    kind: assign\n    set: {}\n    timeout: 0s\n    next: [{to: b}]");
        assert_error(&source, Some("a"), "timeout", "longer than 0s");
        let source = with_first_step(
            "    kind: assign\n    set: {}\n    retry: {max_backoff: 2years}\n    next: [{to: b}]",
        );
        assert_error(&source, Some("a"), "retry.max_backoff", "limit of 1year");
    }

    #[test]
    fn too_many_steps_are_rejected() {
        let mut source = String::from("name: w\nsteps:\n");
        for i in 0..=MAX_STEP_COUNT {
            source.push_str(&format!(
                "  - {{id: s{i}, kind: assign, set: {{}}, next: [{{to: s{}}}]}}\n",
                i + 1
            ));
        }
        source.push_str(&format!(
            "  - {{id: s{}, kind: end, status: completed}}\n",
            MAX_STEP_COUNT + 1
        ));
        assert_error(&source, None, "steps", "the limit is 1000");
    }

    #[test]
    fn at_least_one_step_is_required() {
        assert_error("name: w\nsteps: []", None, "steps", "at least one");
        assert_error("name: w", None, "steps", "missing");
    }

    #[test]
    fn unknown_fields_are_errors_naming_the_field() {
        assert_error(
            "name: w\nstep: []\nsteps: [{id: a, kind: end, status: completed}]",
            None,
            "step",
            "unknown field",
        );
        let source = with_first_step(
            "    kind: http\n    metod: GET\n    method: GET\n    url: http://x\n    retry: {tries: 2}\n    next: [{to: b, wen: x}]",
        );
        assert_error(&source, Some("a"), "metod", "unknown field");
        assert_error(&source, Some("a"), "retry.tries", "unknown field");
        assert_error(&source, Some("a"), "next[0].wen", "unknown field");
        let source = with_first_step(
            "    kind: assign\n    set: {}\n    url: http://x\n    next: [{to: b}]",
        );
        assert_error(&source, Some("a"), "url", "unknown field");
    }

    #[test]
    fn missing_required_fields_are_named() {
        for (kind, field) in [
            ("assign", "set"),
            ("http", "method"),
            ("http", "url"),
            ("publish", "subject"),
            ("handler", "handler"),
        ] {
            let source = with_first_step(&format!("    kind: {kind}\n    next: [{{to: b}}]"));
            assert_error(&source, Some("a"), field, "missing required field");
        }
        assert_error(
            "name: w\nsteps: [{id: a, kind: end}]",
            Some("a"),
            "status",
            "missing required field",
        );
        assert_error(
            "steps: [{id: a, kind: end, status: completed}]",
            None,
            "name",
            "missing required field",
        );
    }

    #[test]
    fn wrong_types_are_named() {
        let source = with_first_step(
            "    kind: assign\n    set: [n]\n    allow_retry: sometimes\n    next: [{to: b}]",
        );
        assert_error(&source, Some("a"), "set", "expected a map");
        assert_error(&source, Some("a"), "allow_retry", "true or false");
        for bad in ["0", "-1", "1.5", "'10'", "99999999999"] {
            let source = format!(
                "name: w\nmax_steps: {bad}\nsteps: [{{id: a, kind: end, status: completed}}]"
            );
            assert_error(&source, None, "max_steps", "positive integer");
        }
        assert_error(
            "name: w\nvars: [1]\nsteps: [{id: a, kind: end, status: completed}]",
            None,
            "vars",
            "expected a map",
        );
        let source = with_first_step(
            "    kind: http\n    method: GET\n    url: http://x\n    headers: {X-N: 5}\n    next: [{to: b}]",
        );
        assert_error(&source, Some("a"), "headers.X-N", "expected a string");
    }

    #[test]
    fn http_urls_and_methods_are_checked() {
        let source = with_first_step(
            "    kind: http\n    method: get\n    url: ftp://x\n    next: [{to: b}]",
        );
        assert_error(
            &source,
            Some("a"),
            "method",
            "expected GET, POST, PUT, PATCH or DELETE",
        );
        assert_error(&source, Some("a"), "url", "http:// or https://");
    }

    #[test]
    fn retry_needs_at_least_one_attempt() {
        let source = with_first_step(
            "    kind: assign\n    set: {}\n    retry: {max_attempts: 0}\n    next: [{to: b}]",
        );
        assert_error(&source, Some("a"), "retry.max_attempts", "positive integer");
    }

    #[test]
    fn publish_subjects_are_literal_nats_subjects() {
        for bad in ["'a.*'", "'a.>'", "'a..b'", "'a b'", "'.a'"] {
            let source = with_first_step(&format!(
                "    kind: publish\n    subject: {bad}\n    next: [{{to: b}}]"
            ));
            assert_error(&source, Some("a"), "subject", "");
        }
    }

    #[test]
    fn publish_subjects_must_avoid_the_reserved_prefix() {
        let source =
            with_first_step("    kind: publish\n    subject: drover.events\n    next: [{to: b}]");
        let definition = Definition::parse(&source).expect("valid");
        let errors = definition
            .check_publish(&PublishPolicy::new("drover"))
            .err()
            .map(|e| e.0);
        assert_eq!(
            errors
                .as_deref()
                .map(|e| (e[0].step.as_deref(), e[0].field.as_str())),
            Some((Some("a"), "subject"))
        );
        assert!(
            definition
                .check_publish(&PublishPolicy::new("drov"))
                .is_ok()
        );
        assert!(
            definition
                .check_publish(&PublishPolicy::new("other"))
                .is_ok()
        );
    }

    #[test]
    fn publish_subjects_must_avoid_nats_system_and_reply_spaces() {
        for bad in ["$JS.API.STREAM.DELETE.DROVER_JOBS", "_INBOX.x", "_INBOX"] {
            let source = with_first_step(&format!(
                "    kind: publish\n    subject: '{bad}'\n    next: [{{to: b}}]"
            ));
            assert_error(&source, Some("a"), "subject", "space");
        }
    }

    #[test]
    fn publish_subjects_must_be_in_the_allow_list_when_one_is_set() {
        let source =
            with_first_step("    kind: publish\n    subject: crm.lead.new\n    next: [{to: b}]");
        let definition = Definition::parse(&source).expect("valid");
        let policy = |allow: &str| PublishPolicy {
            prefix: "drover".into(),
            allow: Some(allow.parse().expect("valid allow-list")),
        };
        let errors = definition
            .check_publish(&policy("orders.>,crm.*"))
            .err()
            .map(|e| e.0)
            .unwrap_or_default();
        assert_eq!(errors.len(), 1);
        assert_eq!(
            (errors[0].step.as_deref(), errors[0].field.as_str()),
            (Some("a"), "subject")
        );
        assert!(errors[0].message.contains("allow-list"), "{errors:?}");
        assert!(definition.check_publish(&policy("orders.>,crm.>")).is_ok());
    }

    #[test]
    fn every_error_is_reported_at_once() {
        let source = "name: W\nsteps:\n  - {id: a, kind: assign, set: {n: '+'}, next: [{to: zz}]}\n  - {id: b, kind: nope}\n";
        let fields: Vec<String> = errors_of(source).into_iter().map(|e| e.field).collect();
        for field in ["name", "set.n", "next[0].to", "kind", "id"] {
            assert!(
                fields.iter().any(|f| f == field),
                "{field} missing from {fields:?}"
            );
        }
    }

    fn mutated_example() -> impl Strategy<Value = String> {
        let edit = (
            any::<prop::sample::Index>(),
            0u8..3,
            prop::sample::select(vec![
                ':', '-', ' ', '\n', '{', '[', '\'', '"', '#', '*', '&', '!', '|', '>', 'x', '1',
                '\t', 'é',
            ]),
        );
        prop::collection::vec(edit, 1..8).prop_map(|edits| {
            let mut chars: Vec<char> = EXAMPLE.chars().collect();
            for (at, op, c) in edits {
                let i = at.index(chars.len() + 1);
                match op {
                    0 if i < chars.len() => {
                        chars.remove(i);
                    }
                    1 if i < chars.len() => chars[i] = c,
                    _ => chars.insert(i, c),
                }
            }
            chars.into_iter().collect()
        })
    }

    /// Steps `s0..sN` with random transitions, some of them `end` steps.
    fn random_graph() -> impl Strategy<Value = (Vec<bool>, Vec<Vec<usize>>)> {
        (2usize..8).prop_flat_map(|n| {
            (
                prop::collection::vec(prop::bool::weighted(0.2), n),
                prop::collection::vec(prop::collection::vec(0..n, 1..4), n),
            )
        })
    }

    proptest! {
        #[test]
        fn garbage_never_panics(source in any::<String>(), bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            let _ = Definition::parse(&source);
            let _ = Definition::parse(&String::from_utf8_lossy(&bytes));
        }

        #[test]
        fn mutated_examples_never_panic(source in mutated_example()) {
            if let Err(errors) = Definition::parse(&source) {
                prop_assert!(!errors.0.is_empty());
            }
        }

        #[test]
        fn exactly_the_calls_to_undeployed_workflows_or_versions_are_rejected(
            calls in prop::collection::vec((0usize..4, prop::option::of(1i32..6)), 1..6),
            latest in prop::collection::vec(prop::option::of(1i32..5), 4),
        ) {
            let names = ["a", "b", "c", "caller"];
            let deployed: HashMap<String, i32> = names.iter().zip(&latest)
                .filter_map(|(name, latest)| Some(((*name).to_owned(), (*latest)?)))
                .collect();
            let steps: Vec<(&str, Option<i32>)> = calls.iter().map(|(w, v)| (names[*w], *v)).collect();
            let caller = callers(&steps);
            let mut flagged: Vec<(String, String)> = match caller.check_subworkflows(&deployed) {
                Ok(()) => Vec::new(),
                Err(errors) => errors.0.into_iter().map(|e| (e.step.unwrap_or_default(), e.field)).collect(),
            };
            flagged.sort();
            // The oracle: a call is fine when it names itself, or a deployed workflow with no
            // version or one at most its latest.
            let mut expected: Vec<(String, String)> = steps.iter().enumerate().filter_map(|(i, (w, v))| {
                if *w == "caller" { return None; }
                match (deployed.get(*w), v) {
                    (None, _) => Some((format!("c{i}"), "workflow".to_owned())),
                    (Some(latest), Some(v)) if v > latest => Some((format!("c{i}"), "version".to_owned())),
                    _ => None,
                }
            }).collect();
            expected.sort();
            prop_assert_eq!(flagged, expected);
        }

        #[test]
        fn exactly_the_steps_with_no_way_to_an_end_are_rejected((ends, targets) in random_graph()) {
            let steps: Vec<Value> = ends.iter().zip(&targets).enumerate().map(|(i, (end, to))| {
                if *end {
                    json!({"id": format!("s{i}"), "kind": "end", "status": "completed"})
                } else {
                    let mut next: Vec<Value> = to.iter().map(|t| json!({"to": format!("s{t}"), "when": "vars.n > 0"})).collect();
                    if let Some(last) = next.last_mut().and_then(Value::as_object_mut) { last.remove("when"); }
                    json!({"id": format!("s{i}"), "kind": "assign", "set": {}, "next": next})
                }
            }).collect();
            // The oracle: grow the set of steps that reach an end until it stops growing.
            let mut reaches = ends.clone();
            let mut grew = true;
            while grew {
                grew = false;
                for i in 0..ends.len() {
                    if !reaches[i] && targets[i].iter().any(|&t| reaches[t]) {
                        reaches[i] = true;
                        grew = true;
                    }
                }
            }
            let source = json!({"name": "g", "vars": {"n": 0}, "steps": steps}).to_string();
            let mut flagged: Vec<String> = errors_of(&source).into_iter()
                .filter(|e| e.message.contains("no `end` is reachable"))
                .filter_map(|e| e.step).collect();
            flagged.sort();
            let mut expected: Vec<String> = (0..ends.len()).filter(|&i| !reaches[i]).map(|i| format!("s{i}")).collect();
            expected.sort();
            prop_assert_eq!(flagged, expected);
        }
    }
}
