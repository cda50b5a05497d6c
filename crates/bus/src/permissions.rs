//! Least privilege on NATS: one user per role, allowed exactly the subjects the code of that
//! role uses (the JetStream API of its own streams and consumers, its own subjects, replies to
//! its own inbox), and the nats-server `authorization` block that declares them
//! (`drover nats-config`).
//!
//! Every connection uses an inbox prefix of its own user, `_INBOX.<prefix>.<user>`, so a user
//! subscribes to its own replies and never to `_INBOX.>` (everyone's replies). A node that runs
//! several roles on its one connection is the `node` user, whose permissions are the union of
//! the worker's, the coordinator's and the api's (so it may also run any one of them alone).
//!
//! What each role does on NATS, and so may do:
//! - every node role provisions (creates or updates) the JOBS and EVENTS streams, publishes
//!   jobs (`<prefix>.job.>`) and relays events (`<prefix>.evt.>`);
//! - worker: provisions and pulls from the consumer of each worker queue it may serve
//!   (`workers-<queue>` on JOBS, filtering `<prefix>.job.<queue>`) and acks its messages,
//!   narrows the `workers` consumer of a Drover before queues (looks it up, and creates it
//!   only with the subject nothing is published to any more), asks which stream stores a
//!   subject (`STREAM.NAMES`, for `publish` steps) and publishes the subjects of `publish`
//!   steps;
//! - coordinator: provisions the RECOVERY stream and its `coordinators` consumer, publishes
//!   recovery tasks and pulls and acks them;
//! - api: listens for signals (`<prefix>.signal.*.*`) and answers them (`allow_responses`);
//!   subscribes to events (`<prefix>.evt.>`, live only, no consumer) for the web console;
//! - events-reader (a program outside the cluster): subscribes to events and reads the EVENTS
//!   stream through its own durable consumer(s); publishes nothing else;
//! - signaler (a program outside the cluster): delivers events to waiting instances by
//!   requesting `<prefix>.signal.<instance>.<event>`.
//!
//! No user may delete or purge a stream, delete a message, or delete a consumer.

use std::fmt::Write as _;

use crate::auth::Secret;
use crate::subjects::{Subjects, is_valid_prefix};
use crate::{Error, LEGACY_WORKER_CONSUMER, Result, worker_consumer_name};
use drover_core::Queue;

/// What a connection does on NATS. A node's roles are the first three; the others are for
/// programs outside the cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum NatsRole {
    Worker,
    Coordinator,
    Api,
    /// Reads the cluster's events (subscription or a durable consumer on EVENTS).
    EventsReader,
    /// Delivers events to waiting instances over NATS.
    Signaler,
}

impl NatsRole {
    /// The roles a `drover node` may run.
    pub const NODE: [NatsRole; 3] = [NatsRole::Worker, NatsRole::Coordinator, NatsRole::Api];

    pub fn as_str(self) -> &'static str {
        match self {
            NatsRole::Worker => "worker",
            NatsRole::Coordinator => "coordinator",
            NatsRole::Api => "api",
            NatsRole::EventsReader => "events-reader",
            NatsRole::Signaler => "signaler",
        }
    }

    /// Does a node run it (and so provision streams and relay events)?
    pub fn is_node_role(self) -> bool {
        NatsRole::NODE.contains(&self)
    }
}

/// The name (without the cluster prefix) of the user, and inbox, of a connection serving
/// `roles`: the role's own for one role, `node` (the union user) for several or none.
pub fn user_for(roles: &[NatsRole]) -> &'static str {
    match roles.split_first() {
        Some((first, rest)) if rest.iter().all(|r| r == first) => first.as_str(),
        _ => NODE_USER,
    }
}

/// The union user of a node running several roles on one connection.
pub const NODE_USER: &str = "node";

/// The NATS user name of `user` in the cluster `prefix`: `<prefix>-<user>`, so that several
/// clusters can share a server.
pub fn user_name(prefix: &str, user: &str) -> String {
    format!("{prefix}-{user}")
}

/// The environment variable the generated configuration reads `user`'s password from:
/// `<PREFIX>_NATS_<USER>_PASSWORD` (`DROVER_NATS_WORKER_PASSWORD`).
pub fn password_env_var(prefix: &str, user: &str) -> String {
    format!("{prefix}_NATS_{user}_PASSWORD")
        .replace('-', "_")
        .to_ascii_uppercase()
}

/// What one user may publish and subscribe to. A subject is allowed if an `allow` pattern
/// matches it and no `deny` pattern does (nats-server's rule: deny wins).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Permissions {
    pub publish: Vec<String>,
    pub publish_deny: Vec<String>,
    pub subscribe: Vec<String>,
    /// May answer requests it received (once each) whatever their reply subject.
    pub allow_responses: bool,
}

impl Permissions {
    /// Would nats-server let this user publish to `subject` (not counting responses)?
    pub fn may_publish(&self, subject: &str) -> bool {
        self.publish.iter().any(|p| subject_matches(p, subject))
            && !self
                .publish_deny
                .iter()
                .any(|p| subject_matches(p, subject))
    }

    /// Would nats-server let this user subscribe to `subject` (a literal subject)?
    pub fn may_subscribe(&self, subject: &str) -> bool {
        self.subscribe.iter().any(|p| subject_matches(p, subject))
    }

    fn allow_publish(&mut self, subjects: impl IntoIterator<Item = String>) {
        for subject in subjects {
            if !self.publish.contains(&subject) {
                self.publish.push(subject);
            }
        }
    }

    fn allow_subscribe(&mut self, subjects: impl IntoIterator<Item = String>) {
        for subject in subjects {
            if !self.subscribe.contains(&subject) {
                self.subscribe.push(subject);
            }
        }
    }
}

/// Does the NATS subject pattern `pattern` (`*` one token, `>` the rest) match `subject`?
/// Wildcards in `subject` are taken literally, as the server does for a publish.
pub fn subject_matches(pattern: &str, subject: &str) -> bool {
    let mut subject = subject.split('.');
    for token in pattern.split('.') {
        match (token, subject.next()) {
            (">", Some(_)) => return true,
            (_, None) => return false,
            ("*", Some(_)) => {}
            (token, Some(literal)) if token == literal => {}
            _ => return false,
        }
    }
    subject.next().is_none()
}

/// What `drover nats-config` generates.
#[derive(Clone, Debug)]
pub struct AuthorizationConfig {
    /// The cluster's subject prefix.
    pub prefix: String,
    /// The subjects (patterns) the worker's `publish` steps may reach. `None`: any subject but
    /// `$…`, `_INBOX.…` and the cluster's own; as nats-server's deny rules beat its allow
    /// rules, that is an allow-all with the reserved and destructive subjects denied, which
    /// leaves other clusters' JetStream API reachable. Give a list for least privilege.
    pub publish_allow: Option<Vec<String>>,
    /// The durable consumers the events-reader may create and read on the EVENTS stream. If
    /// unsure: `["reader"]`.
    pub events_consumers: Vec<String>,
    /// The worker queues the worker (and node) user may serve: it may pull from these
    /// queues' consumers only. If unsure: the default queue alone.
    pub worker_queues: Vec<Queue>,
}

impl Default for AuthorizationConfig {
    fn default() -> Self {
        Self {
            prefix: "drover".to_owned(),
            publish_allow: None,
            events_consumers: vec!["reader".to_owned()],
            worker_queues: vec![Queue::default()],
        }
    }
}

/// Where the server finds a user's password.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Password {
    /// An environment variable of nats-server (`password: $VAR`): the configuration holds no
    /// secret, and the server refuses to start when it is unset. Its value must be a plain
    /// word (letters and digits), as nats-server parses it like a configuration value.
    Env(String),
    /// The password itself, quoted (test harnesses).
    Literal(Secret),
}

/// One user of the `authorization` block.
#[derive(Clone, Debug)]
pub struct NatsUser {
    pub name: String,
    pub password: Password,
    /// `None`: may do anything (an administrator).
    pub permissions: Option<Permissions>,
    /// Printed above the user.
    pub comment: String,
}

/// The users of one cluster, in this order: worker, coordinator, api, node (the union of
/// the three, for nodes running several roles), events-reader, signaler. Passwords come from
/// [`password_env_var`].
pub fn cluster_users(config: &AuthorizationConfig) -> Result<Vec<NatsUser>> {
    if !is_valid_prefix(&config.prefix) {
        return Err(Error::Config(format!(
            "invalid subject prefix {:?}: use [a-z0-9][a-z0-9_-]*",
            config.prefix
        )));
    }
    let subjects = Subjects::new(&config.prefix);
    if let Some(allow) = &config.publish_allow {
        for pattern in allow {
            check_publish_pattern(&subjects, pattern)?;
        }
    }
    if config.worker_queues.is_empty() {
        return Err(Error::Config(
            "name at least one worker queue for the workers to serve".to_owned(),
        ));
    }
    if config.events_consumers.is_empty() {
        return Err(Error::Config(
            "name at least one events consumer for the events-reader".to_owned(),
        ));
    }
    for name in &config.events_consumers {
        if !drover_core::ids::is_slug(name) {
            return Err(Error::Config(format!(
                "invalid events consumer name {name:?}: use [a-z0-9][a-z0-9_-]*"
            )));
        }
    }
    let grants = Grants {
        subjects: &subjects,
        config,
    };
    let user = |name: &str, permissions: Permissions, comment: &str| NatsUser {
        name: user_name(&config.prefix, name),
        password: Password::Env(password_env_var(&config.prefix, name)),
        permissions: Some(permissions),
        comment: comment.to_owned(),
    };
    let mut users = Vec::new();
    for role in NatsRole::NODE {
        let mut comment = format!("`drover node --roles {}`", role.as_str());
        if role == NatsRole::Worker && config.publish_allow.is_none() {
            comment.push_str(
                ".\n`publish` steps may reach any subject but `$…`, `_INBOX.…` and the cluster's own:\n\
                 as deny rules beat allow rules, that is `>` minus a deny-list, which leaves other\n\
                 streams' JetStream API reachable. `--publish-allow` confines it to a list.",
            );
        }
        users.push(user(role.as_str(), grants.of(&[role]), &comment));
    }
    users.push(user(
        NODE_USER,
        grants.of(&NatsRole::NODE),
        "`drover node` running several roles on its one connection: the union of the three",
    ));
    users.push(user(
        NatsRole::EventsReader.as_str(),
        grants.of(&[NatsRole::EventsReader]),
        "reads events; connect with inbox prefix `_INBOX.<prefix>.events-reader`",
    ));
    users.push(user(
        NatsRole::Signaler.as_str(),
        grants.of(&[NatsRole::Signaler]),
        "delivers events to waiting instances; connect with inbox prefix `_INBOX.<prefix>.signaler`",
    ));
    for user in &mut users {
        user.comment = user.comment.replace("<prefix>", &config.prefix);
    }
    Ok(users)
}

/// The permissions of a connection serving `roles` in the cluster of `config`.
pub fn permissions(config: &AuthorizationConfig, roles: &[NatsRole]) -> Permissions {
    let subjects = Subjects::new(&config.prefix);
    Grants {
        subjects: &subjects,
        config,
    }
    .of(roles)
}

/// A subject pattern given for `publish` steps: no wildcard first token (it would reach
/// `$…`), nothing reserved.
fn check_publish_pattern(subjects: &Subjects, pattern: &str) -> Result<()> {
    let bad = |why: &str| Err(Error::Config(format!("publish subject {pattern:?}: {why}")));
    if pattern.is_empty()
        || pattern
            .chars()
            .any(|c| c.is_whitespace() || c == '"' || c == '\\' || c.is_control())
    {
        return bad("empty, or has blanks, quotes or backslashes");
    }
    let tokens: Vec<&str> = pattern.split('.').collect();
    if tokens.iter().any(|t| t.is_empty()) {
        return bad("has an empty token");
    }
    if let Some(i) = tokens.iter().position(|t| *t == ">")
        && i + 1 != tokens.len()
    {
        return bad("`>` may only be the last token");
    }
    if tokens
        .iter()
        .any(|t| t.len() > 1 && (t.contains('*') || t.contains('>')))
    {
        return bad("wildcards must be whole tokens");
    }
    let first = tokens[0];
    if first == "*" || first == ">" {
        return bad("a wildcard first token would reach `$…` and `_INBOX.…` subjects");
    }
    if first.starts_with('$') || first.starts_with("_INBOX") {
        return bad("`$…` and `_INBOX…` subjects are reserved");
    }
    if first == subjects.prefix() {
        return bad("inside the cluster's own prefix");
    }
    Ok(())
}

/// JetStream API subjects that no worker may reach even when `publish` steps may reach any
/// user subject.
const DESTRUCTIVE_JS_API: &[&str] = &[
    "STREAM.DELETE",
    "STREAM.PURGE",
    "STREAM.MSG.DELETE",
    "STREAM.MSG.GET",
    "STREAM.SNAPSHOT",
    "STREAM.RESTORE",
    "STREAM.PEER",
    "STREAM.LEADER",
    "CONSUMER.DELETE",
    "CONSUMER.LEADER",
    "CONSUMER.PAUSE",
    "CONSUMER.RESET",
    "CONSUMER.UNPIN",
    "DIRECT",
    "META",
    "SERVER",
    "ACCOUNT",
];

/// The `$` namespaces nats-server uses besides `$JS`.
const SYSTEM_NAMESPACES: &[&str] = &["$SYS", "$KV", "$O", "$MQTT", "$NRG", "$JSC", "$SRV"];

struct Grants<'a> {
    subjects: &'a Subjects,
    config: &'a AuthorizationConfig,
}

impl Grants<'_> {
    fn of(&self, roles: &[NatsRole]) -> Permissions {
        let s = self.subjects;
        let mut p = Permissions::default();
        p.allow_subscribe([s.inbox_prefix(user_for(roles)) + ".>"]);
        if roles.len() > 1 {
            // The union user may also serve one role alone, under that role's inbox.
            p.allow_subscribe(roles.iter().map(|r| s.inbox_prefix(r.as_str()) + ".>"));
        }
        if roles.iter().any(|r| r.is_node_role()) {
            p.allow_publish(stream_admin(&s.jobs_stream()));
            p.allow_publish(stream_admin(&s.events_stream()));
            p.allow_publish([s.job_filter(), s.event_filter()]);
        }
        for role in roles {
            match role {
                NatsRole::Worker => {
                    for queue in &self.config.worker_queues {
                        p.allow_publish(durable_consumer(
                            &s.jobs_stream(),
                            &worker_consumer_name(queue),
                            Some(&s.job(queue)),
                        ));
                    }
                    // Narrowing the consumer of a Drover before queues: look it up, and create
                    // it only with the subject nothing is published to (no pull, no ack).
                    let stream = s.jobs_stream();
                    let legacy = LEGACY_WORKER_CONSUMER;
                    p.allow_publish([
                        js_api(&format!("CONSUMER.INFO.{stream}.{legacy}")),
                        js_api(&format!(
                            "CONSUMER.CREATE.{stream}.{legacy}.{}",
                            s.legacy_job()
                        )),
                    ]);
                    p.allow_publish([js_api("STREAM.NAMES")]);
                }
                NatsRole::Coordinator => {
                    p.allow_publish(stream_admin(&s.recovery_stream()));
                    p.allow_publish(durable_consumer(
                        &s.recovery_stream(),
                        crate::RECOVERY_CONSUMER,
                        Some(&s.recovery_filter()),
                    ));
                    p.allow_publish([s.recovery_filter()]);
                    // The leader samples each worker queue's pending jobs (read only).
                    for queue in &self.config.worker_queues {
                        p.allow_publish([js_api(&format!(
                            "CONSUMER.INFO.{}.{}",
                            s.jobs_stream(),
                            worker_consumer_name(queue)
                        ))]);
                    }
                }
                NatsRole::Api => {
                    p.allow_subscribe([s.signal_filter()]);
                    // The web console's live updates: plain subscriptions, no consumer.
                    p.allow_subscribe([s.event_filter()]);
                    p.allow_responses = true;
                }
                NatsRole::EventsReader => {
                    p.allow_publish([js_api(&format!("STREAM.INFO.{}", s.events_stream()))]);
                    for name in &self.config.events_consumers {
                        p.allow_publish(durable_consumer(&s.events_stream(), name, None));
                    }
                    p.allow_subscribe([s.event_filter()]);
                }
                NatsRole::Signaler => p.allow_publish([s.signal_filter()]),
            }
        }
        if roles.contains(&NatsRole::Worker) {
            self.allow_publish_steps(&mut p);
        }
        p
    }

    /// The subjects of `publish` steps: the given allow-list, or anything but the reserved.
    fn allow_publish_steps(&self, p: &mut Permissions) {
        if let Some(allow) = &self.config.publish_allow {
            p.allow_publish(allow.iter().cloned());
            return;
        }
        let s = self.subjects;
        p.allow_publish([">".to_owned()]);
        let mut deny: Vec<String> = DESTRUCTIVE_JS_API
            .iter()
            .map(|api| js_api(&format!("{api}.>")))
            .collect();
        deny.extend(SYSTEM_NAMESPACES.iter().map(|ns| format!("{ns}.>")));
        deny.push("_INBOX.>".to_owned());
        // The cluster's own subjects this user does not publish itself.
        for family in [
            s.job_filter(),
            s.event_filter(),
            s.recovery_filter(),
            format!("{}.signal.>", s.prefix()),
        ] {
            if !p.publish.contains(&family) {
                deny.push(family);
            }
        }
        p.publish_deny = deny;
    }
}

fn js_api(rest: &str) -> String {
    format!("$JS.API.{rest}")
}

/// Provisioning a stream: look it up, create it, update its configuration. Never delete or
/// purge.
fn stream_admin(stream: &str) -> [String; 3] {
    ["INFO", "CREATE", "UPDATE"].map(|op| js_api(&format!("STREAM.{op}.{stream}")))
}

/// Creating, looking up, pulling from and acking one durable pull consumer. `filter`: the
/// one filter subject it is created with (async-nats names it in the create subject); `None`
/// allows any.
fn durable_consumer(stream: &str, name: &str, filter: Option<&str>) -> Vec<String> {
    let create = js_api(&format!("CONSUMER.CREATE.{stream}.{name}"));
    let mut subjects = match filter {
        Some(filter) => vec![format!("{create}.{filter}")],
        None => vec![create.clone(), format!("{create}.>")],
    };
    subjects.extend([
        js_api(&format!("CONSUMER.INFO.{stream}.{name}")),
        js_api(&format!("CONSUMER.MSG.NEXT.{stream}.{name}")),
        format!("$JS.ACK.{stream}.{name}.>"),
    ]);
    subjects
}

/// The `authorization { users: [...] }` block of a nats-server configuration for `users`.
pub fn render_authorization(users: &[NatsUser]) -> String {
    let mut out = String::from("authorization {\n  users: [\n");
    for user in users {
        for line in user.comment.lines() {
            let _ = writeln!(out, "    # {line}");
        }
        out.push_str("    {\n");
        let _ = writeln!(out, "      user: {}", quote(&user.name));
        match &user.password {
            Password::Env(var) => {
                let _ = writeln!(out, "      password: ${var}");
            }
            Password::Literal(secret) => {
                let _ = writeln!(out, "      password: {}", quote(secret.expose()));
            }
        }
        if let Some(p) = &user.permissions {
            out.push_str("      permissions: {\n        publish: {\n");
            list(&mut out, "allow", &p.publish);
            list(&mut out, "deny", &p.publish_deny);
            out.push_str("        }\n        subscribe: {\n");
            list(&mut out, "allow", &p.subscribe);
            out.push_str("        }\n");
            if p.allow_responses {
                out.push_str("        allow_responses: true\n");
            }
            out.push_str("      }\n");
        }
        out.push_str("    }\n");
    }
    out.push_str("  ]\n}\n");
    out
}

fn list(out: &mut String, key: &str, subjects: &[String]) {
    if subjects.is_empty() {
        return;
    }
    let _ = writeln!(out, "          {key}: [");
    for subject in subjects {
        let _ = writeln!(out, "            {}", quote(subject));
    }
    out.push_str("          ]\n");
}

fn quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn users(publish_allow: Option<&[&str]>) -> Vec<NatsUser> {
        cluster_users(&AuthorizationConfig {
            prefix: "dr-1".to_owned(),
            publish_allow: publish_allow.map(|a| a.iter().map(|s| (*s).to_owned()).collect()),
            events_consumers: vec!["reader".to_owned(), "audit".to_owned()],
            ..Default::default()
        })
        .expect("a valid configuration")
    }

    fn of<'a>(users: &'a [NatsUser], name: &str) -> &'a Permissions {
        users
            .iter()
            .find(|u| u.name == format!("dr-1-{name}"))
            .and_then(|u| u.permissions.as_ref())
            .unwrap_or_else(|| panic!("no user {name}"))
    }

    #[test]
    fn subject_patterns_match_as_nats_server_matches_them() {
        assert!(subject_matches("a.>", "a.b.c"));
        assert!(!subject_matches("a.>", "a"));
        assert!(subject_matches("a.*.c", "a.b.c"));
        assert!(!subject_matches("a.*", "a.b.c"));
        assert!(subject_matches(">", "$JS.API.STREAM.DELETE.X"));
        assert!(subject_matches("a.b", "a.b"));
        assert!(!subject_matches("a.b", "a.bc"));
        // A publish to a subject holding a wildcard token matches it only through a wildcard.
        assert!(subject_matches("a.*.x.>", "a.b.x.>"));
        assert!(!subject_matches("a.b.x", "a.b.>"));
    }

    #[test]
    fn the_generated_block_names_one_user_per_role_with_passwords_from_the_environment() {
        let users = users(None);
        let names: Vec<&str> = users.iter().map(|u| u.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "dr-1-worker",
                "dr-1-coordinator",
                "dr-1-api",
                "dr-1-node",
                "dr-1-events-reader",
                "dr-1-signaler"
            ]
        );
        let text = render_authorization(&users);
        assert!(text.starts_with("authorization {\n  users: [\n"), "{text}");
        assert!(
            text.contains("password: $DR_1_NATS_WORKER_PASSWORD\n"),
            "{text}"
        );
        assert!(
            text.contains("password: $DR_1_NATS_EVENTS_READER_PASSWORD\n"),
            "{text}"
        );
        assert!(text.contains("\"$JS.API.STREAM.INFO.DR_1_JOBS\""), "{text}");
        assert!(text.contains("\"_INBOX.dr-1.worker.>\""), "{text}");
        assert_eq!(text.matches('{').count(), text.matches('}').count());
        assert_eq!(text.matches('[').count(), text.matches(']').count());
        let admin = NatsUser {
            name: "admin".to_owned(),
            password: Password::Literal(Secret::new("a\"b")),
            permissions: None,
            comment: String::new(),
        };
        let text = render_authorization(&[admin]);
        assert!(text.contains("password: \"a\\\"b\"\n"), "{text}");
        assert!(!text.contains("permissions"), "{text}");
    }

    #[test]
    fn each_node_role_may_do_what_its_code_does() {
        let s = Subjects::new("dr-1");
        for allow in [None, Some(&["ext.>"][..])] {
            let users = users(allow);
            for role in ["worker", "coordinator", "api", "node"] {
                let p = of(&users, role);
                for subject in [
                    "$JS.API.STREAM.INFO.DR_1_JOBS",
                    "$JS.API.STREAM.CREATE.DR_1_JOBS",
                    "$JS.API.STREAM.UPDATE.DR_1_EVENTS",
                    &s.job(&Queue::default()),
                    "dr-1.job.gpu",
                    &s.event("default", "wf", "id", "completed"),
                    &s.campaign_event("spring", "permit_drift"),
                ] {
                    assert!(p.may_publish(subject), "{role} may not publish {subject}");
                }
                let inbox = format!("_INBOX.dr-1.{role}.abc.1");
                assert!(p.may_subscribe(&inbox), "{role}: {inbox}");
            }
            let worker = of(&users, "worker");
            for subject in [
                "$JS.API.CONSUMER.CREATE.DR_1_JOBS.workers-default.dr-1.job.default",
                "$JS.API.CONSUMER.INFO.DR_1_JOBS.workers-default",
                "$JS.API.CONSUMER.MSG.NEXT.DR_1_JOBS.workers-default",
                "$JS.ACK.DR_1_JOBS.workers-default.1.2.3.4.5.6.7",
                "$JS.API.CONSUMER.INFO.DR_1_JOBS.workers",
                "$JS.API.CONSUMER.CREATE.DR_1_JOBS.workers.dr-1.job.step",
                "$JS.API.STREAM.NAMES",
                "ext.orders.created",
            ] {
                assert!(worker.may_publish(subject), "worker: {subject}");
            }
            let coordinator = of(&users, "coordinator");
            for subject in [
                "$JS.API.STREAM.CREATE.DR_1_RECOVERY",
                "$JS.API.CONSUMER.CREATE.DR_1_RECOVERY.coordinators.dr-1.recovery.>",
                "$JS.API.CONSUMER.MSG.NEXT.DR_1_RECOVERY.coordinators",
                "$JS.ACK.DR_1_RECOVERY.coordinators.1.2.3.4.5.6.7",
                &s.recovery(),
            ] {
                assert!(coordinator.may_publish(subject), "coordinator: {subject}");
            }
            let api = of(&users, "api");
            assert!(api.may_subscribe(&s.signal_filter()));
            assert!(api.may_subscribe(&s.event_filter()));
            assert!(api.allow_responses);
            let node = of(&users, "node");
            for subject in worker.publish.iter().chain(&coordinator.publish) {
                assert!(node.may_publish(subject), "node: {subject}");
            }
            assert!(node.may_subscribe(&s.signal_filter()) && node.allow_responses);
            assert!(node.may_subscribe("_INBOX.dr-1.node.x"));
        }
    }

    #[test]
    fn no_role_may_delete_purge_or_reach_another_roles_subjects() {
        for allow in [None, Some(&["ext.>", "other.*"][..])] {
            let users = users(allow);
            for user in &users {
                let p = user.permissions.as_ref().expect("permissions");
                for subject in [
                    "$JS.API.STREAM.DELETE.DR_1_JOBS",
                    "$JS.API.STREAM.PURGE.DR_1_JOBS",
                    "$JS.API.STREAM.PURGE.DR_1_EVENTS",
                    "$JS.API.STREAM.MSG.DELETE.DR_1_JOBS",
                    "$JS.API.CONSUMER.DELETE.DR_1_JOBS.workers",
                    "$SYS.REQ.SERVER.PING",
                    "_INBOX.someone.else",
                ] {
                    assert!(!p.may_publish(subject), "{}: {subject}", user.name);
                }
                assert!(!p.may_subscribe("_INBOX.abc"), "{}", user.name);
                assert!(
                    !p.may_subscribe("_INBOX.dr-1.api.x")
                        || user.name.ends_with("-api")
                        || user.name.ends_with("-node"),
                    "{}",
                    user.name
                );
            }
            let worker = of(&users, "worker");
            for subject in ["dr-1.signal.x.y", "dr-1.recovery.task", "$KV.b.k"] {
                assert!(!worker.may_publish(subject), "worker: {subject}");
            }
            let reader = of(&users, "events-reader");
            for subject in [
                "dr-1.job.step",
                "dr-1.evt.a.b.c.d",
                "$JS.API.CONSUMER.MSG.NEXT.DR_1_JOBS.workers",
                "$JS.API.CONSUMER.CREATE.DR_1_JOBS.reader",
                "$JS.API.STREAM.INFO.DR_1_JOBS",
                "$JS.API.CONSUMER.CREATE.DR_1_EVENTS.somebody",
                "ext.x",
            ] {
                assert!(!reader.may_publish(subject), "reader: {subject}");
            }
            for subject in [
                "$JS.API.STREAM.INFO.DR_1_EVENTS",
                "$JS.API.CONSUMER.CREATE.DR_1_EVENTS.reader",
                "$JS.API.CONSUMER.CREATE.DR_1_EVENTS.audit.dr-1.evt.>",
                "$JS.API.CONSUMER.MSG.NEXT.DR_1_EVENTS.audit",
                "$JS.ACK.DR_1_EVENTS.reader.1.2.3.4.5.6.7",
            ] {
                assert!(reader.may_publish(subject), "reader: {subject}");
            }
            assert!(reader.may_subscribe("dr-1.evt.a.b.c.d"));
            assert!(!reader.may_subscribe("dr-1.job.step"));
            let signaler = of(&users, "signaler");
            assert!(signaler.may_publish("dr-1.signal.id.approved"));
            assert_eq!(signaler.publish.len(), 1);
        }
    }

    #[test]
    fn a_worker_pulls_only_from_the_queues_it_may_serve() {
        let gpu: Queue = "gpu".parse().expect("a slug");
        let users = cluster_users(&AuthorizationConfig {
            prefix: "dr-1".to_owned(),
            publish_allow: Some(vec!["ext.>".to_owned()]),
            worker_queues: vec![Queue::default(), gpu],
            ..Default::default()
        })
        .expect("a valid configuration");
        for name in ["worker", "node"] {
            let p = of(&users, name);
            for queue in ["default", "gpu"] {
                for subject in [
                    format!("$JS.API.CONSUMER.CREATE.DR_1_JOBS.workers-{queue}.dr-1.job.{queue}"),
                    format!("$JS.API.CONSUMER.MSG.NEXT.DR_1_JOBS.workers-{queue}"),
                    format!("$JS.ACK.DR_1_JOBS.workers-{queue}.1.2.3.4.5.6.7"),
                ] {
                    assert!(p.may_publish(&subject), "{name}: {subject}");
                }
            }
            for subject in [
                // Another queue's consumer, or a consumer of another queue's subject.
                "$JS.API.CONSUMER.MSG.NEXT.DR_1_JOBS.workers-cpu",
                "$JS.API.CONSUMER.CREATE.DR_1_JOBS.workers-cpu.dr-1.job.cpu",
                "$JS.API.CONSUMER.CREATE.DR_1_JOBS.workers-gpu.dr-1.job.default",
                "$JS.API.CONSUMER.CREATE.DR_1_JOBS.workers-gpu.dr-1.job.>",
                // The legacy consumer: never widened again, never pulled from.
                "$JS.API.CONSUMER.CREATE.DR_1_JOBS.workers.dr-1.job.>",
                "$JS.API.CONSUMER.MSG.NEXT.DR_1_JOBS.workers",
                "$JS.ACK.DR_1_JOBS.workers.1.2.3.4.5.6.7",
            ] {
                assert!(!p.may_publish(subject), "{name}: {subject}");
            }
        }
        let users = users_with_queues(vec![]);
        assert!(users.is_err(), "no queue at all is refused");
    }

    fn users_with_queues(queues: Vec<Queue>) -> Result<Vec<NatsUser>> {
        cluster_users(&AuthorizationConfig {
            worker_queues: queues,
            ..Default::default()
        })
    }

    #[test]
    fn a_publish_allow_list_confines_the_worker_to_it() {
        let users = users(Some(&["ext.>", "other.*"]));
        let worker = of(&users, "worker");
        assert!(worker.publish_deny.is_empty());
        assert!(worker.may_publish("ext.a.b") && worker.may_publish("other.x"));
        for subject in [
            "other.x.y",
            "elsewhere",
            "dr-1.nothing",
            "$JS.API.STREAM.UPDATE.SOMEONE_ELSE",
            "$JS.API.CONSUMER.CREATE.OTHER.c",
        ] {
            assert!(!worker.may_publish(subject), "worker: {subject}");
        }
        // Without a list, every user subject.
        let users = self::users(None);
        assert!(of(&users, "worker").may_publish("anything.at.all"));
        assert!(!of(&users, "api").may_publish("anything.at.all"));
    }

    #[test]
    fn bad_publish_patterns_and_names_are_refused() {
        for bad in [
            ">",
            "*.x",
            "$JS.>",
            "_INBOX.>",
            "_INBOX_x.y",
            "dr-1.x",
            "a..b",
            "a.>.b",
            "a b",
            "a.b*",
            "",
        ] {
            let config = AuthorizationConfig {
                prefix: "dr-1".to_owned(),
                publish_allow: Some(vec![bad.to_owned()]),
                ..Default::default()
            };
            assert!(cluster_users(&config).is_err(), "{bad:?} accepted");
        }
        let config = AuthorizationConfig {
            events_consumers: vec!["a.b".to_owned()],
            ..Default::default()
        };
        assert!(cluster_users(&config).is_err());
        let config = AuthorizationConfig {
            prefix: "Bad".to_owned(),
            ..Default::default()
        };
        assert!(cluster_users(&config).is_err());
    }

    #[test]
    fn the_user_of_a_connection_follows_its_roles() {
        assert_eq!(user_for(&[NatsRole::Worker]), "worker");
        assert_eq!(user_for(&[NatsRole::Worker, NatsRole::Worker]), "worker");
        assert_eq!(user_for(&[NatsRole::Worker, NatsRole::Api]), "node");
        assert_eq!(user_for(&[]), "node");
        assert_eq!(
            password_env_var("drover", "events-reader"),
            "DROVER_NATS_EVENTS_READER_PASSWORD"
        );
    }
}
