//! The operator commands (`drover workflow|start|instance|journal|campaign|nodes`). They speak
//! only HTTP to the API, through [`ApiClient`]. With `--json` each prints exactly the API's
//! JSON (pretty); otherwise a table.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use chrono::{DateTime, Utc};
use comfy_table::{ContentArrangement, Table, presets};
use drover_api::{ApiClient, ListQuery, MAX_START_COUNT, StartRequest};
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
    },
    /// List and inspect instances.
    #[command(subcommand)]
    Instance(InstanceCommand),
    /// An instance's journal.
    Journal {
        /// The instance id.
        id: String,
    },
    /// Campaigns.
    #[command(subcommand)]
    Campaign(CampaignCommand),
    /// The cluster's nodes.
    Nodes,
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

#[derive(clap::Subcommand, Debug)]
pub enum CampaignCommand {
    /// List campaigns with their limits and counts.
    List,
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
    Nodes,
}

/// Runs an operator command against the API at `api_url`; `json` prints the API's JSON.
pub async fn run(command: OperatorCommand, api_url: &str, json: bool) -> Result<()> {
    let client = ApiClient::new(api_url)?;
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
        } => {
            let vars = vars.as_deref().map(parse_vars).transpose()?;
            let request = StartRequest {
                workflow,
                version,
                campaign,
                vars,
                count: Some(count),
            };
            (client.start(&request).await?, View::Started)
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
            };
            (client.instances(&query).await?, View::Instances)
        }
        OperatorCommand::Instance(InstanceCommand::Show { id }) => {
            (client.instance(&id).await?, View::Instance)
        }
        OperatorCommand::Journal { id } => (client.journal(&id).await?, View::Journal),
        OperatorCommand::Campaign(CampaignCommand::List) => {
            (client.campaigns().await?, View::Campaigns)
        }
        OperatorCommand::Nodes => (client.nodes().await?, View::Nodes),
    };
    let text = if json {
        let mut text = serde_json::to_string_pretty(&answer).context("encoding the answer")?;
        text.push('\n');
        text
    } else {
        render(view, &answer)
    };
    emit(&text)
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
        View::Started => answer["ids"]
            .as_array()
            .map(|ids| ids.iter().map(|id| format!("{}\n", text(id))).collect())
            .unwrap_or_default(),
        View::Instances => list(
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
        ),
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
        View::Campaigns => list(
            &answer["campaigns"],
            "no campaigns",
            &["NAME", "MAX RUNNING", "RUNNING", "QUEUED", "ON ERROR"],
            |c| {
                let max = if c["max_running"].is_null() {
                    "unlimited".to_owned()
                } else {
                    text(&c["max_running"])
                };
                vec![
                    text(&c["name"]),
                    max,
                    text(&c["running"]),
                    text(&c["queued"]),
                    text(&c["on_error_permit"]),
                ]
            },
        ),
        View::Nodes => list(
            &answer["nodes"],
            "no nodes",
            &[
                "ID",
                "ROLES",
                "HOST",
                "VERSION",
                "STATUS",
                "HEARTBEAT",
                "IN FLIGHT",
            ],
            |n| {
                let roles = n["roles"]
                    .as_array()
                    .map(|roles| roles.iter().map(text).collect::<Vec<_>>().join(","))
                    .unwrap_or_else(|| text(&n["roles"]));
                vec![
                    text(&n["id"]),
                    roles,
                    text(&n["host"]),
                    text(&n["version"]),
                    text(&n["status"]),
                    time(&n["heartbeat_at"]),
                    text(&n["in_flight"]),
                ]
            },
        ),
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
}
