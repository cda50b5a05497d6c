//! The operator commands (`drover workflow|start|instance|journal|resume|pause|unpause|stop|
//! kill|restart|why|campaign|nodes|leader`). They speak
//! only HTTP to the API, through [`ApiClient`]. With `--json` each prints exactly the API's
//! JSON (pretty); otherwise a table.

mod campaign;
mod lifecycle;
mod schedule;
mod token;

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use chrono::{DateTime, Utc};
use comfy_table::{ContentArrangement, Table, presets};
use drover_api::{
    ApiClient, LifecycleCommand, ListQuery, MAX_START_COUNT, ResumeMode, ResumeRequest, Secret,
    StartRequest,
};
use drover_core::InstanceState;
use serde_json::Value;

#[derive(clap::Subcommand, Debug)]
pub enum OperatorCommand {
    /// Deploy and inspect workflow definitions.
    #[command(subcommand)]
    Workflow(WorkflowCommand),
    /// Start instances of a workflow; prints their ids.
    Start {
        /// The workflow's name.
        workflow: String,
        /// The definition version to run; the latest when absent.
        #[arg(long)]
        version: Option<i32>,
        /// The campaign the instances join; `default` when absent.
        #[arg(long)]
        campaign: Option<String>,
        /// A JSON object overriding the definition's vars key by key, e.g. '{"email":"a@b.c"}'.
        #[arg(long)]
        vars: Option<String>,
        /// How many instances to start.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_START_COUNT)))]
        count: u32,
        /// Wait up to this long (e.g. `30s`, at most `5m`) for the instance to end and print
        /// its final state and vars; exits non-zero unless it completed in time.
        #[arg(long, conflicts_with = "count")]
        wait: Option<String>,
    },
    /// List and inspect instances.
    #[command(subcommand)]
    Instance(InstanceCommand),
    /// An instance's journal.
    Journal {
        /// The instance id.
        id: String,
    },
    /// Resume an in_error instance: retry its current step, or skip to its next one.
    ///
    /// Only the deepest in_error instance of a call chain can be resumed.
    #[command(group(
        clap::ArgGroup::new("mode")
            .required(true)
            .args(["current_step", "next_step"])
    ))]
    Resume {
        /// The instance id.
        id: String,
        /// Retry the current step (attempt 1, a new checkpoint and idempotency key).
        #[arg(long)]
        current_step: bool,
        /// Skip the current step: go on where its `next` transitions lead, evaluated now
        /// (after --set) with `output` its latest recorded output, or null.
        #[arg(long)]
        next_step: bool,
        /// Correct a variable first, KEY=JSON; repeatable, e.g. --set n=3 --set 'email="a@b.c"'.
        #[arg(long = "set", value_name = "KEY=JSON", value_parser = parse_set)]
        set: Vec<(String, Value)>,
    },
    /// Pause an instance (or every one a filter selects): QUEUED, READY and WAITING ones at
    /// once, keeping their permit; a RUNNING one once its step finishes.
    Pause(lifecycle::LifecycleArgs),
    /// Unpause: READY again (or QUEUED if it has no permit and its campaign is full, or WAITING
    /// if it still waits); withdraws a running instance's pending pause.
    Unpause(lifecycle::LifecycleArgs),
    /// Stop gracefully: a RUNNING instance once its step finishes, any other at once; its
    /// permit goes to the next queued instance.
    Stop(lifecycle::LifecycleArgs),
    /// Stop at once, whatever its node is doing (a running step's result is discarded); its
    /// permit goes to the next queued instance.
    Kill(lifecycle::LifecycleArgs),
    /// Start a finished instance again: a new instance of the same definition version and
    /// initial variables, in the same campaign.
    Restart(lifecycle::LifecycleArgs),
    /// Why an instance is not running (or where it runs), in one sentence.
    Why {
        /// The instance id.
        id: String,
    },
    /// Deliver an event to an instance (for its `wait_event` step named NAME). An instance
    /// waiting for it runs on; otherwise the event is kept until it waits for it.
    SendEvent {
        /// The instance id.
        id: String,
        /// The event's name (a slug).
        name: String,
        /// The event's payload as JSON, e.g. '{"approved":true}' (the step's output); null when
        /// absent.
        #[arg(long)]
        payload: Option<String>,
    },
    /// Campaigns.
    #[command(subcommand)]
    Campaign(CampaignCommand),
    /// The cluster's nodes.
    Nodes,
    /// Which coordinator leads (holds the leader lease), under which term.
    Leader,
    /// API tokens (admin scope).
    #[command(subcommand)]
    Token(token::TokenCommand),
    /// Schedules: workflows started on a cron or interval schedule.
    #[command(subcommand)]
    Schedule(schedule::ScheduleCommand),
}

#[derive(clap::Subcommand, Debug)]
pub enum WorkflowCommand {
    /// Deploy a definition; a changed one becomes the next version.
    Deploy {
        /// The definition, YAML or JSON (`-` reads standard input).
        file: PathBuf,
    },
    /// List workflows (the latest version of each).
    List,
    /// Show a workflow version and its source.
    Show {
        /// The workflow's name.
        name: String,
        /// The version to show; the latest when absent.
        #[arg(long)]
        version: Option<i32>,
    },
}

#[derive(clap::Subcommand, Debug)]
pub enum InstanceCommand {
    /// List instances, newest first.
    List {
        /// Only instances in this state.
        #[arg(long, value_parser = parse_state)]
        state: Option<String>,
        /// Only instances of this campaign.
        #[arg(long)]
        campaign: Option<String>,
        /// Only instances of this workflow.
        #[arg(long)]
        workflow: Option<String>,
        /// At most this many (the API caps it at 1000).
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(i64).range(1..))]
        limit: i64,
        /// Only instances created before this one (the last id of the previous page).
        #[arg(long)]
        before: Option<String>,
    },
    /// Show one instance.
    Show {
        /// The instance id.
        id: String,
    },
}

pub use campaign::CampaignCommand;

/// `KEY=JSON` of `--set`: a non-empty key and a JSON value.
fn parse_set(arg: &str) -> Result<(String, Value), String> {
    let example = r#"e.g. --set n=3 or --set 'email="a@example.com"' (strings in double quotes)"#;
    let Some((key, value)) = arg.split_once('=') else {
        return Err(format!("expected KEY=JSON, not {arg:?} ({example})"));
    };
    let key = key.trim();
    if key.is_empty() {
        return Err(format!("the key of {arg:?} is empty ({example})"));
    }
    let value: Value = serde_json::from_str(value)
        .map_err(|err| format!("the value of {key:?} is not valid JSON: {err} ({example})"))?;
    Ok((key.to_owned(), value))
}

fn parse_state(state: &str) -> Result<String, String> {
    state
        .parse::<InstanceState>()
        .map(|state| state.as_str().to_owned())
        .map_err(|err| err.to_string())
}

/// How to show an answer to a person.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum View {
    Deployed,
    Workflows,
    Workflow,
    Started,
    Instances,
    Instance,
    Journal,
    Campaigns,
    Campaign,
    LimitChanged,
    Nodes,
    Resumed,
    Leader,
    EventSent,
    Lifecycle,
    LifecycleSummary,
    Diagnosis,
    TokenCreated,
    Tokens,
    TokenRevoked,
}

/// Runs an operator command against the API at `api_url`, authenticated by `token`; `json`
/// prints the API's JSON.
pub async fn run(
    command: OperatorCommand,
    api_url: &str,
    token: Option<Secret>,
    json: bool,
) -> Result<()> {
    let mut client = ApiClient::new(api_url)?;
    if let Some(token) = token.filter(|token| !token.expose().is_empty()) {
        client = client.with_token(token);
    }
    let (answer, view) = match command {
        OperatorCommand::Workflow(WorkflowCommand::Deploy { file }) => {
            let source = read_source(&file).await?;
            (client.deploy(source).await?, View::Deployed)
        }
        OperatorCommand::Workflow(WorkflowCommand::List) => {
            (client.workflows().await?, View::Workflows)
        }
        OperatorCommand::Workflow(WorkflowCommand::Show { name, version }) => {
            (client.workflow(&name, version).await?, View::Workflow)
        }
        OperatorCommand::Start {
            workflow,
            version,
            campaign,
            vars,
            count,
            wait,
        } => {
            let vars = vars.as_deref().map(parse_vars).transpose()?;
            let request = StartRequest {
                workflow,
                version,
                campaign,
                vars,
                count: Some(count),
            };
            (
                client.start(&request, wait.as_deref()).await?,
                View::Started,
            )
        }
        OperatorCommand::Instance(InstanceCommand::List {
            state,
            campaign,
            workflow,
            limit,
            before,
        }) => {
            let query = ListQuery {
                state,
                campaign,
                workflow,
                limit: Some(limit),
                before,
                include: None,
            };
            (client.instances(&query).await?, View::Instances)
        }
        OperatorCommand::Instance(InstanceCommand::Show { id }) => {
            (client.instance(&id).await?, View::Instance)
        }
        OperatorCommand::Journal { id } => (client.journal(&id).await?, View::Journal),
        OperatorCommand::Resume {
            id,
            current_step,
            next_step,
            set,
        } => {
            let mode = match (current_step, next_step) {
                (true, false) => ResumeMode::CurrentStep,
                (false, true) => ResumeMode::NextStep,
                _ => bail!("give exactly one of --current-step and --next-step"),
            };
            let request = ResumeRequest {
                mode,
                set: (!set.is_empty()).then(|| Value::Object(set.into_iter().collect())),
            };
            (client.resume(&id, &request).await?, View::Resumed)
        }
        OperatorCommand::Pause(args) => lifecycle(&client, LifecycleCommand::Pause, args).await?,
        OperatorCommand::Unpause(args) => {
            lifecycle(&client, LifecycleCommand::Unpause, args).await?
        }
        OperatorCommand::Stop(args) => lifecycle(&client, LifecycleCommand::Stop, args).await?,
        OperatorCommand::Kill(args) => lifecycle(&client, LifecycleCommand::Kill, args).await?,
        OperatorCommand::Restart(args) => {
            lifecycle(&client, LifecycleCommand::Restart, args).await?
        }
        OperatorCommand::Why { id } => (client.diagnosis(&id).await?, View::Diagnosis),
        OperatorCommand::SendEvent { id, name, payload } => {
            let payload = payload
                .as_deref()
                .map(serde_json::from_str::<Value>)
                .transpose()
                .context(r#"--payload is not valid JSON (e.g. --payload '{"approved":true}')"#)?;
            let answer = client.send_event(&id, &name, payload.as_ref()).await?;
            (answer, View::EventSent)
        }
        OperatorCommand::Campaign(command) => campaign::run(&client, command).await?,
        OperatorCommand::Nodes => (client.nodes().await?, View::Nodes),
        OperatorCommand::Leader => (client.leader().await?, View::Leader),
        OperatorCommand::Token(command) => token::run(&client, command).await?,
        OperatorCommand::Schedule(command) => return schedule::run(&client, command, json).await,
    };
    let text = if json {
        let mut text = serde_json::to_string_pretty(&answer).context("encoding the answer")?;
        text.push('\n');
        text
    } else {
        render(view, &answer)
    };
    emit(&text)?;
    // A waited-for instance that did not complete in time fails the command.
    let result = &answer["result"];
    if matches!(view, View::Started) && result.is_object() {
        let id = text_of(&result["instance"]["id"]);
        let state = text_of(&result["instance"]["state"]);
        if result["ended"] != Value::Bool(true) {
            bail!("instance {id} is still {state}: the wait lapsed");
        }
        if state != "completed" {
            bail!("instance {id} ended {state}");
        }
    }
    Ok(())
}

fn text_of(value: &Value) -> String {
    value
        .as_str()
        .map_or_else(|| value.to_string(), str::to_owned)
}

async fn lifecycle(
    client: &ApiClient,
    command: LifecycleCommand,
    args: lifecycle::LifecycleArgs,
) -> Result<(Value, View)> {
    let (answer, many) = lifecycle::run(client, command, args).await?;
    Ok((
        answer,
        if many {
            View::LifecycleSummary
        } else {
            View::Lifecycle
        },
    ))
}

/// Writes to stdout; a closed pipe (`drover instance list | head`) is not an error.
fn emit(text: &str) -> Result<()> {
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Err(err) if err.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(err).context("writing to stdout")
        }
        _ => Ok(()),
    }
}

async fn read_source(file: &Path) -> Result<String> {
    if file == Path::new("-") {
        let mut source = String::new();
        tokio::io::AsyncReadExt::read_to_string(&mut tokio::io::stdin(), &mut source)
            .await
            .context("cannot read the definition from standard input")?;
        return Ok(source);
    }
    tokio::fs::read_to_string(file)
        .await
        .with_context(|| format!("cannot read definition file {}", file.display()))
}

fn parse_vars(vars: &str) -> Result<Value> {
    let example = r#"e.g. --vars '{"email":"a@example.com"}'"#;
    let value: Value = serde_json::from_str(vars)
        .with_context(|| format!("--vars is not valid JSON ({example})"))?;
    if !value.is_object() {
        bail!("--vars must be a JSON object, not {value} ({example})");
    }
    Ok(value)
}

fn render(view: View, answer: &Value) -> String {
    render_at(view, answer, Utc::now())
}

/// As [`render`], with heartbeat ages measured to `now`.
fn render_at(view: View, answer: &Value, now: DateTime<Utc>) -> String {
    match view {
        View::Deployed => format!(
            "{} v{} ({})\n",
            text(&answer["name"]),
            text(&answer["version"]),
            if answer["created"] == Value::Bool(true) {
                "new version"
            } else {
                "unchanged"
            }
        ),
        View::Workflows => list(
            &answer["workflows"],
            "no workflows deployed",
            &["NAME", "VERSION", "STEPS", "DESCRIPTION", "DEPLOYED"],
            |w| {
                vec![
                    text(&w["name"]),
                    text(&w["version"]),
                    text(&w["steps"]),
                    text(&w["description"]),
                    time(&w["created_at"]),
                ]
            },
        ),
        View::Workflow => {
            let mut out = key_values(&[
                ("name", text(&answer["name"])),
                ("version", text(&answer["version"])),
                ("deployed", time(&answer["created_at"])),
            ]);
            out.push('\n');
            let source = answer["source"].as_str().unwrap_or_default();
            out.push_str(source);
            if !source.ends_with('\n') {
                out.push('\n');
            }
            out
        }
        View::Started if answer["result"].is_object() => {
            let instance = &answer["result"]["instance"];
            let mut out = format!("{}\t{}\n", text(&instance["id"]), text(&instance["state"]));
            out.push_str(&format!("vars: {}\n", instance["vars"]));
            if let Some(error) = instance["error"].as_str() {
                out.push_str(&format!("error: {error}\n"));
            }
            out
        }
        View::Started => answer["ids"]
            .as_array()
            .map(|ids| ids.iter().map(|id| format!("{}\n", text(id))).collect())
            .unwrap_or_default(),
        View::Instances => {
            let mut out = list(
                &answer["instances"],
                "no instances",
                &[
                    "ID", "WORKFLOW", "VERSION", "CAMPAIGN", "STATE", "STEP", "SEQ", "CREATED",
                ],
                |i| {
                    vec![
                        text(&i["id"]),
                        text(&i["workflow"]),
                        text(&i["version"]),
                        text(&i["campaign"]),
                        text(&i["state"]),
                        text(&i["current_step"]),
                        text(&i["step_seq"]),
                        time(&i["created_at"]),
                    ]
                },
            );
            if let Some(next) = answer["next"].as_str() {
                out.push_str(&format!("(more: add --before {next})\n"));
            }
            out
        }
        View::Instance => match answer.as_object() {
            Some(fields) => {
                let rows: Vec<(&str, String)> = fields
                    .iter()
                    .map(|(key, value)| {
                        let shown = if key.ends_with("_at") {
                            time(value)
                        } else {
                            text(value)
                        };
                        (key.as_str(), shown)
                    })
                    .collect();
                key_values(&rows)
            }
            None => format!("{}\n", text(answer)),
        },
        View::Journal => list(
            &answer["entries"],
            "no journal entries",
            &[
                "SEQ",
                "STEP",
                "OUTCOME",
                "TRANSITION",
                "ATTEMPT",
                "BY",
                "FINISHED",
                "OUTPUT",
                "ERROR",
            ],
            |e| {
                let by = if e["node_id"].is_null() {
                    text(&e["actor"])
                } else {
                    text(&e["node_id"])
                };
                vec![
                    text(&e["step_seq"]),
                    text(&e["step_id"]),
                    text(&e["outcome"]),
                    text(&e["transition"]),
                    text(&e["attempt"]),
                    by,
                    time(&e["finished_at"]),
                    truncate(&text(&e["output"]), 60),
                    truncate(&text(&e["error"]), 80),
                ]
            },
        ),
        View::Campaigns => campaign::render_list(answer),
        View::Campaign => campaign::render_campaign(answer),
        View::LimitChanged => campaign::render_limit_changed(answer),
        View::Nodes => list(
            &answer["nodes"],
            "no nodes",
            &[
                "ID",
                "ROLES",
                "QUEUES",
                "HANDLERS",
                "HOST",
                "VERSION",
                "STATUS",
                "LAST HEARTBEAT",
                "IN FLIGHT",
                "MEMORY",
            ],
            |n| {
                let joined = |key: &str| match n[key].as_array() {
                    Some(items) if items.is_empty() => "-".to_owned(),
                    Some(items) => items.iter().map(text).collect::<Vec<_>>().join(","),
                    None => text(&n[key]),
                };
                vec![
                    text(&n["id"]),
                    joined("roles"),
                    joined("queues"),
                    joined("handlers"),
                    text(&n["host"]),
                    text(&n["version"]),
                    text(&n["status"]),
                    age(&n["heartbeat_at"], now),
                    text(&n["in_flight"]),
                    bytes(&n["rss_bytes"]),
                ]
            },
        ),
        View::Resumed => format!(
            "resumed {}: {} at step {} (checkpoint {})\n",
            text(&answer["id"]),
            text(&answer["state"]),
            text(&answer["current_step"]),
            text(&answer["step_seq"]),
        ),
        View::Leader => {
            if answer["live"] == Value::Bool(true) && !answer["holder"].is_null() {
                format!(
                    "leader: {} (term {}, lease expires {})\n",
                    text(&answer["holder"]),
                    text(&answer["term"]),
                    time(&answer["expires_at"]),
                )
            } else {
                format!(
                    "no coordinator holds the lease (last term {})\n",
                    text(&answer["term"])
                )
            }
        }
        View::Lifecycle => lifecycle::render_result(answer),
        View::LifecycleSummary => lifecycle::render_summary(answer),
        View::Diagnosis => lifecycle::render_diagnosis(answer),
        View::TokenCreated => token::render_created(answer),
        View::Tokens => token::render_list(answer),
        View::TokenRevoked => token::render_revoked(answer),
        View::EventSent => match answer["delivered"].as_str() {
            Some("woke") => "delivered: the instance was waiting for it and runs on\n".to_owned(),
            Some("kept") => "delivered: kept until the instance waits for it\n".to_owned(),
            _ => format!("delivered: {}\n", text(&answer["delivered"])),
        },
    }
}

/// A table of `rows` (an array of objects), or `empty` when there are none.
fn list(rows: &Value, empty: &str, header: &[&str], row: impl Fn(&Value) -> Vec<String>) -> String {
    let rows = rows.as_array().map(Vec::as_slice).unwrap_or_default();
    if rows.is_empty() {
        return format!("{empty}\n");
    }
    let mut table = table();
    table.set_header(header.to_vec());
    for item in rows {
        table.add_row(row(item));
    }
    finish(&table)
}

fn key_values(rows: &[(&str, String)]) -> String {
    let mut table = table();
    for (key, value) in rows {
        table.add_row(vec![format!("{key}:"), value.clone()]);
    }
    finish(&table)
}

fn table() -> Table {
    let mut table = Table::new();
    table
        .load_preset(presets::NOTHING)
        .set_content_arrangement(ContentArrangement::Disabled);
    table
}

/// The table's lines without the preset's edge padding.
fn finish(table: &Table) -> String {
    table
        .lines()
        .map(|line| {
            format!(
                "{}\n",
                line.trim_end().strip_prefix(' ').unwrap_or(line.trim_end())
            )
        })
        .collect()
}

/// A JSON value as a cell: strings bare, null as `-`, the rest as compact JSON.
fn text(value: &Value) -> String {
    match value {
        Value::Null => "-".to_owned(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// An RFC 3339 timestamp to the second, in UTC; anything else as [`text`].
fn time(value: &Value) -> String {
    value
        .as_str()
        .and_then(|s| s.parse::<DateTime<Utc>>().ok())
        .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_else(|| text(value))
}

/// How long before `now` an RFC 3339 timestamp was, in whole seconds (`3s ago`).
fn age(value: &Value, now: DateTime<Utc>) -> String {
    match value.as_str().and_then(|s| s.parse::<DateTime<Utc>>().ok()) {
        Some(at) => format!("{}s ago", (now - at).num_seconds().max(0)),
        None => text(value),
    }
}

/// A byte count for people (`512 B`, `12.3 MiB`); `-` when unknown (0 or not a number).
fn bytes(value: &Value) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let Some(n) = value.as_u64().filter(|n| *n > 0) else {
        return "-".to_owned();
    };
    let mut size = n as f64;
    let mut unit = 0;
    while size >= 1024.0 && unit + 1 < UNITS.len() {
        size /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{size:.1} {}", UNITS[unit])
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_owned();
    }
    let mut cut: String = s.chars().take(max.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};
    use serde_json::json;

    use super::*;

    /// Shaped like the real top-level parser: global `--api-url`/`--json`, a `--version` flag.
    #[derive(Parser, Debug)]
    #[command(name = "drover", version)]
    struct TestCli {
        #[arg(long, global = true, default_value = "http://127.0.0.1:8080")]
        api_url: String,
        #[arg(long, global = true)]
        json: bool,
        #[command(subcommand)]
        command: OperatorCommand,
    }

    fn parse(args: &[&str]) -> Result<TestCli, clap::Error> {
        TestCli::try_parse_from(std::iter::once("drover").chain(args.iter().copied()))
    }

    #[test]
    fn the_command_line_is_consistent_and_parses_every_command() {
        TestCli::command().debug_assert();
        let cli = parse(&[
            "start",
            "greeting",
            "--version",
            "2",
            "--count",
            "5",
            "--json",
        ])
        .expect("parses");
        assert!(cli.json);
        assert!(matches!(
            cli.command,
            OperatorCommand::Start { ref workflow, version: Some(2), count: 5, .. } if workflow == "greeting"
        ));
        assert!(matches!(
            parse(&["workflow", "show", "greeting", "--version", "1"])
                .expect("parses")
                .command,
            OperatorCommand::Workflow(WorkflowCommand::Show {
                version: Some(1),
                ..
            })
        ));
        assert!(matches!(
            parse(&["instance", "list", "--state", "in_error"]).expect("parses").command,
            OperatorCommand::Instance(InstanceCommand::List { state: Some(ref s), limit: 100, .. }) if s == "in_error"
        ));
        for args in [
            &["journal", "x"][..],
            &["campaign", "list"],
            &["nodes"],
            &["workflow", "deploy", "f.yaml"],
        ] {
            parse(args).expect("parses");
        }
    }

    #[test]
    fn the_drover_command_line_embeds_the_operator_commands_consistently() {
        crate::Cli::command().debug_assert();
        let cli = crate::Cli::try_parse_from(["drover", "--json", "start", "w", "--version", "3"])
            .expect("parses");
        assert!(cli.json);
        assert!(matches!(
            cli.command,
            crate::Command::Operator(OperatorCommand::Start {
                version: Some(3),
                count: 1,
                ..
            })
        ));
    }

    #[test]
    fn bad_counts_and_states_are_refused_before_any_request() {
        assert!(parse(&["start", "w", "--count", "0"]).is_err());
        assert!(parse(&["start", "w", "--count", "10001"]).is_err());
        let err = parse(&["instance", "list", "--state", "RUNNING"]).expect_err("unknown state");
        assert!(
            err.to_string().contains("in_error"),
            "lists the states: {err}"
        );
    }

    #[test]
    fn vars_must_be_a_json_object() {
        assert_eq!(parse_vars(r#"{"a": 1}"#).ok(), Some(json!({"a": 1})));
        let err = parse_vars("[1]").expect_err("an array");
        assert!(err.to_string().contains("JSON object"), "{err}");
        let err = parse_vars("{nope").expect_err("not JSON");
        assert!(err.to_string().contains("--vars"), "{err}");
    }

    #[tokio::test]
    async fn an_unreadable_definition_file_is_named_in_the_error() {
        let err = read_source(Path::new("/nonexistent/welcome.yaml"))
            .await
            .expect_err("missing");
        assert!(
            format!("{err:#}").contains("/nonexistent/welcome.yaml"),
            "{err:#}"
        );
    }

    #[test]
    fn answers_render_for_people() {
        let deployed = render(
            View::Deployed,
            &json!({"name": "welcome-series", "version": 2, "created": true}),
        );
        assert_eq!(deployed, "welcome-series v2 (new version)\n");
        let same = render(
            View::Deployed,
            &json!({"name": "welcome-series", "version": 2, "created": false}),
        );
        assert_eq!(same, "welcome-series v2 (unchanged)\n");
        let started = render(
            View::Started,
            &json!({"ids": ["a", "b"], "workflow": "w", "version": 1, "campaign": "default"}),
        );
        assert_eq!(started, "a\nb\n");

        let instance = json!({
            "id": "0190", "workflow": "w", "state": "ready", "error": null,
            "vars": {"n": 1}, "created_at": "2025-01-02T03:04:05.678Z"
        });
        let shown = render(View::Instance, &instance);
        assert!(
            shown.contains("state:") && shown.contains("ready"),
            "{shown}"
        );
        assert!(shown.contains(r#"{"n":1}"#), "{shown}");
        assert!(shown.contains("2025-01-02 03:04:05"), "{shown}");
        let listed = render(View::Instances, &json!({"instances": [instance]}));
        assert!(
            listed.lines().next().is_some_and(|h| h.starts_with("ID")),
            "{listed}"
        );
        assert_eq!(listed.lines().count(), 2, "{listed}");
        assert_eq!(
            render(View::Instances, &json!({"instances": []})),
            "no instances\n"
        );

        // Unexpected shapes never panic.
        for view in [
            View::Workflows,
            View::Workflow,
            View::Journal,
            View::Campaigns,
            View::Nodes,
            View::Instance,
        ] {
            let _ = render(view, &json!(null));
            let _ = render(
                view,
                &json!({"workflows": [1], "entries": [null], "campaigns": "x", "nodes": [{}]}),
            );
        }
    }

    #[test]
    fn resume_takes_exactly_one_mode_and_set_values_as_json() {
        let cli = parse(&[
            "resume",
            "0190",
            "--next-step",
            "--set",
            "n=3",
            "--set",
            r#"email="a@b.c""#,
            "--set",
            "flags={\"x\":[1,2]}",
        ])
        .expect("parses");
        match cli.command {
            OperatorCommand::Resume {
                id,
                current_step,
                next_step,
                set,
            } => {
                assert_eq!(id, "0190");
                assert!(next_step && !current_step);
                assert_eq!(
                    set,
                    vec![
                        ("n".to_owned(), json!(3)),
                        ("email".to_owned(), json!("a@b.c")),
                        ("flags".to_owned(), json!({"x": [1, 2]})),
                    ]
                );
            }
            other => panic!("parsed as {other:?}"),
        }
        assert!(matches!(
            parse(&["resume", "x", "--current-step"])
                .expect("parses")
                .command,
            OperatorCommand::Resume {
                current_step: true,
                next_step: false,
                ..
            }
        ));
        assert!(parse(&["resume", "x"]).is_err(), "a mode is required");
        assert!(
            parse(&["resume", "x", "--current-step", "--next-step"]).is_err(),
            "the modes exclude each other"
        );
        let err = parse(&["resume", "x", "--current-step", "--set", "email=a@b.c"])
            .expect_err("a bare string is not JSON");
        assert!(err.to_string().contains("not valid JSON"), "{err}");
        assert!(parse(&["resume", "x", "--next-step", "--set", "n"]).is_err());
        assert!(parse(&["resume", "x", "--next-step", "--set", "=1"]).is_err());
        parse(&["leader"]).expect("parses");
    }

    #[test]
    fn nodes_leader_and_resume_render_for_people() {
        let now: DateTime<Utc> = "2025-01-02T03:04:10Z".parse().expect("a timestamp");
        let nodes = json!({"nodes": [{
            "id": "n1", "roles": ["worker", "api"], "queues": ["default", "gpu"],
            "handlers": [], "host": "box", "version": "0.1.0",
            "status": "alive", "heartbeat_at": "2025-01-02T03:04:07.500Z", "in_flight": 4,
            "rss_bytes": 12_900_000
        }]});
        let shown = render_at(View::Nodes, &nodes, now);
        let header = shown.lines().next().unwrap_or_default();
        assert!(
            header.contains("LAST HEARTBEAT") && header.contains("MEMORY"),
            "{shown}"
        );
        let row = shown.lines().nth(1).unwrap_or_default();
        for cell in [
            "n1",
            "worker,api",
            "default,gpu",
            "box",
            "0.1.0",
            "alive",
            "2s ago",
            "4",
            "12.3 MiB",
        ] {
            assert!(row.contains(cell), "{cell} in {row}");
        }
        assert_eq!(bytes(&json!(512)), "512 B");
        assert_eq!(bytes(&json!(0)), "-");
        assert_eq!(bytes(&json!(3 * 1024 * 1024 * 1024_u64)), "3.0 GiB");

        let leader = json!({"name": "coordinator", "holder": "n1", "term": 7,
                            "expires_at": "2025-01-02T03:04:12Z", "live": true});
        let shown = render(View::Leader, &leader);
        assert!(shown.contains("n1") && shown.contains("term 7"), "{shown}");
        let lapsed = json!({"name": "coordinator", "holder": "n1", "term": 7, "live": false});
        assert!(
            render(View::Leader, &lapsed).starts_with("no coordinator holds the lease"),
            "a lapsed lease has no leader"
        );
        let resumed = render(
            View::Resumed,
            &json!({"id": "i1", "state": "ready", "current_step": "call", "step_seq": 4}),
        );
        assert_eq!(resumed, "resumed i1: ready at step call (checkpoint 4)\n");
        for view in [View::Leader, View::Resumed, View::Nodes] {
            let _ = render(view, &json!(null));
            let _ = render(
                view,
                &json!({"nodes": [{"heartbeat_at": 3, "rss_bytes": -1}]}),
            );
        }
    }

    #[test]
    fn send_event_parses_and_renders_what_became_of_the_event() {
        let cli = parse(&[
            "send-event",
            "0190",
            "approved",
            "--payload",
            r#"{"ok":true}"#,
        ])
        .expect("parses");
        assert!(matches!(
            cli.command,
            OperatorCommand::SendEvent { ref id, ref name, payload: Some(ref p) }
                if id == "0190" && name == "approved" && p == r#"{"ok":true}"#
        ));
        assert!(matches!(
            parse(&["send-event", "0190", "approved"])
                .expect("parses")
                .command,
            OperatorCommand::SendEvent { payload: None, .. }
        ));
        assert!(parse(&["send-event", "0190"]).is_err());
        assert!(render(View::EventSent, &json!({"delivered": "woke"})).contains("runs on"));
        assert!(render(View::EventSent, &json!({"delivered": "kept"})).contains("kept"));
        let _ = render(View::EventSent, &json!(null));
    }
}
