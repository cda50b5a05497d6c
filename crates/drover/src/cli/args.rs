//! The operator commands' command line: the clap structs of every `drover` operator command,
//! and the parsers of their values. Parsing only: nothing here talks to the API.

use std::path::PathBuf;

/// The most instances one `drover start` starts (in requests of `START_CHUNK`).
pub(super) const MAX_CLI_START_COUNT: u32 = 1_000_000;
use drover_core::{InstanceState, Scope};
use serde_json::Value;

#[derive(clap::Subcommand, Debug)]
pub enum OperatorCommand {
    /// Deploy and inspect workflow definitions.
    #[command(subcommand)]
    Workflow(WorkflowCommand),
    /// Start instances of a workflow; prints a one-line summary (their ids with --ids or
    /// --json). Many are sent in requests of 1000, with a progress bar on a terminal.
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
        /// How many instances to start (at most 1000000, sent in requests of 1000).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_CLI_START_COUNT)))]
        count: u32,
        /// Print the started instances' ids, one a line, instead of a summary.
        #[arg(long)]
        ids: bool,
        /// Wait up to this long for the instances to end (finished, or in_error). One
        /// instance (at most `5m`): prints its final state and vars. With --count N > 1:
        /// follows all N with a live summary (a bar on a terminal, a line every 5 s
        /// otherwise), then prints how they ended. Exits 1 unless every one completed in time.
        #[arg(long, value_name = "DURATION")]
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
    Pause(LifecycleArgs),
    /// Unpause: READY again (or QUEUED if it has no permit and its campaign is full, or WAITING
    /// if it still waits); withdraws a running instance's pending pause.
    Unpause(LifecycleArgs),
    /// Stop gracefully: a RUNNING instance once its step finishes, any other at once; its
    /// permit goes to the next queued instance.
    Stop(LifecycleArgs),
    /// Stop at once, whatever its node is doing (a running step's result is discarded); its
    /// permit goes to the next queued instance.
    Kill(LifecycleArgs),
    /// Start a finished instance again: a new instance of the same definition version and
    /// initial variables, in the same campaign.
    Restart(LifecycleArgs),
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
    Token(TokenCommand),
    /// Schedules: workflows started on a cron or interval schedule.
    #[command(subcommand)]
    Schedule(super::schedule::ScheduleCommand),
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
    /// Delete a workflow (every version) or one version. Refused while live instances use it
    /// (unless --stop-instances) or a schedule starts it. Instances that ran it stay readable.
    Delete {
        /// The workflow's name.
        name: String,
        /// Delete only this version.
        #[arg(long)]
        version: Option<i32>,
        /// Kill the live instances that use it first (audited), instead of refusing.
        #[arg(long)]
        stop_instances: bool,
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

/// One instance by id, or the instances of a filter.
#[derive(clap::Args, Debug)]
#[command(group(
    clap::ArgGroup::new("target")
        .required(true)
        .multiple(true)
        .args(["id", "campaign", "state", "workflow"])
))]
pub struct LifecycleArgs {
    /// The instance id; or select instances with --campaign, --state and --workflow.
    #[arg(conflicts_with_all = ["campaign", "state", "workflow"])]
    pub id: Option<String>,
    /// Every instance of this campaign (that the command can act on, unless --state says).
    #[arg(long)]
    pub campaign: Option<String>,
    /// Only instances in this state.
    #[arg(long, value_parser = parse_state)]
    pub state: Option<String>,
    /// Only instances of this workflow.
    #[arg(long)]
    pub workflow: Option<String>,
}

#[derive(clap::Subcommand, Debug)]
pub enum CampaignCommand {
    /// Create a campaign. With --max-running, at most that many of its instances run at once;
    /// the rest queue and start in order as others finish.
    Create {
        /// The campaign's name (a slug: lowercase letters, digits, `-` and `_`).
        name: String,
        /// How many of its instances may run at once (1 to 100000); unlimited when absent (an
        /// unlimited campaign can never get a limit later).
        #[arg(long, value_parser = clap::value_parser!(i64).range(1..=100_000))]
        max_running: Option<i64>,
        /// What an instance that goes in_error does with its permit: `release` it (the next
        /// queued instance starts; the failed one re-queues when resumed) or `hold` it.
        #[arg(long, value_parser = ["release", "hold"])]
        on_error_permit: Option<String>,
    },
    /// Change a campaign's limit at once: raising it starts queued instances now; lowering it
    /// stops nobody (no instance starts until fewer than the new limit run).
    SetLimit {
        /// The campaign's name.
        name: String,
        /// The new limit (1 to 100000).
        #[arg(value_parser = clap::value_parser!(i64).range(1..=100_000))]
        max_running: i64,
    },
    /// Keep a campaign's finished instances this long (`30d`, `12h`), or `default` for the
    /// cluster default (the `system-cleanup` workflow's `retention` variable); the daily
    /// cleanup deletes older ones.
    SetRetention {
        /// The campaign's name.
        name: String,
        /// A duration such as `30d`, or `default`.
        retention: String,
    },
    /// Show how long a campaign's finished instances are kept.
    Retention {
        /// The campaign's name.
        name: String,
    },
    /// List campaigns with their limits and counts.
    List,
    /// Show a campaign: its limit, how many run and queue, and how long its queue has waited.
    Show {
        /// The campaign's name.
        name: String,
    },
    /// Pause a limited campaign: it starts nothing (new and queued instances wait in its
    /// queue) until unpaused; running ones finish.
    Pause {
        /// The campaign's name.
        name: String,
    },
    /// Unpause a campaign: its queue starts at once, oldest first, up to its limit.
    Unpause {
        /// The campaign's name.
        name: String,
    },
    /// Delete an empty campaign (nothing live or queued, no schedule starting into it).
    Delete {
        /// The campaign's name.
        name: String,
    },
}

#[derive(clap::Subcommand, Debug)]
pub enum TokenCommand {
    /// Create a token and print it. It is shown this once: store it somewhere safe.
    Create {
        /// The token's name (a slug): the actor of everything done with it.
        name: String,
        /// What it may do: `viewer` reads; `operator` also starts instances, runs lifecycle
        /// commands, resumes, sends events and sets campaign limits; `admin` also deploys
        /// workflows, creates campaigns and manages tokens.
        #[arg(long)]
        scope: Scope,
        /// How long it is valid, e.g. `90d` or `12h`; it never expires when absent.
        #[arg(long, value_name = "DURATION")]
        expires: Option<String>,
    },
    /// List tokens (names, scopes, expiry; never the tokens).
    List,
    /// Revoke a token: every request with it is refused from now on (on every API node within
    /// 5 s).
    Revoke {
        /// The token's name.
        name: String,
    },
}

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

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};
    use serde_json::json;

    use super::*;
    use crate::{Cli, Command};

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
        assert!(parse(&["start", "w", "--count", "1000001"]).is_err());
        let err = parse(&["instance", "list", "--state", "RUNNING"]).expect_err("unknown state");
        assert!(
            err.to_string().contains("in_error"),
            "lists the states: {err}"
        );
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
    fn send_event_takes_an_id_a_name_and_an_optional_payload() {
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
    }

    /// The whole `drover` command line, down to the operator command.
    fn parse_operator(args: &[&str]) -> Result<OperatorCommand, clap::Error> {
        let cli = Cli::try_parse_from(std::iter::once("drover").chain(args.iter().copied()))?;
        match cli.command {
            Command::Operator(command) => Ok(command),
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn lifecycle_commands_take_an_id_or_a_filter_but_not_both() {
        let OperatorCommand::Kill(args) = parse_operator(&["kill", "0190"]).expect("parses") else {
            panic!("not a kill");
        };
        assert_eq!(args.id.as_deref(), Some("0190"));
        assert!(
            parse_operator(&["kill", "0190", "--actor", "ada"]).is_err(),
            "the actor is the token's name, not a flag"
        );
        let OperatorCommand::Pause(args) = parse_operator(&[
            "pause",
            "--campaign",
            "spring",
            "--state",
            "queued",
            "--workflow",
            "w",
        ])
        .expect("parses") else {
            panic!("not a pause");
        };
        assert_eq!(args.id, None);
        assert_eq!(args.campaign.as_deref(), Some("spring"));
        assert_eq!(args.state.as_deref(), Some("queued"));
        assert_eq!(args.workflow.as_deref(), Some("w"));
        for command in ["pause", "unpause", "stop", "kill", "restart"] {
            parse_operator(&[command, "x"]).expect("an id");
            parse_operator(&[command, "--state", "paused"]).expect("a filter");
            assert!(
                parse_operator(&[command]).is_err(),
                "{command} needs a target"
            );
            assert!(
                parse_operator(&[command, "x", "--campaign", "c"]).is_err(),
                "{command}: an id or a filter, not both"
            );
        }
        let err = parse_operator(&["unpause", "--state", "PAUSED"]).expect_err("not a state");
        assert!(err.to_string().contains("paused"), "{err}");
        assert!(matches!(
            parse_operator(&["why", "0190"]).expect("parses"),
            OperatorCommand::Why { ref id } if id == "0190"
        ));
        assert!(parse_operator(&["why"]).is_err());
    }

    #[derive(Parser, Debug)]
    struct CampaignCli {
        #[command(subcommand)]
        command: CampaignCommand,
    }

    fn parse_campaign(args: &[&str]) -> Result<CampaignCommand, clap::Error> {
        CampaignCli::try_parse_from(std::iter::once("campaign").chain(args.iter().copied()))
            .map(|cli| cli.command)
    }

    #[test]
    fn campaign_commands_parse_and_refuse_bad_limits_before_any_request() {
        assert!(matches!(
            parse_campaign(&["create", "spring", "--max-running", "10", "--on-error-permit", "hold"]),
            Ok(CampaignCommand::Create { ref name, max_running: Some(10), on_error_permit: Some(ref p), .. })
                if name == "spring" && p == "hold"
        ));
        assert!(matches!(
            parse_campaign(&["create", "spring"]),
            Ok(CampaignCommand::Create {
                max_running: None,
                on_error_permit: None,
                ..
            })
        ));
        assert!(matches!(
            parse_campaign(&["set-limit", "spring", "3"]),
            Ok(CampaignCommand::SetLimit { max_running: 3, .. })
        ));
        assert!(matches!(
            parse_campaign(&["show", "spring"]),
            Ok(CampaignCommand::Show { .. })
        ));
        for bad in [
            &["create", "x", "--max-running", "0"][..],
            &["create", "x", "--max-running", "100001"],
            &["create", "x", "--on-error-permit", "keep"],
            &["set-limit", "x", "0"],
            &["set-limit", "x"],
        ] {
            assert!(parse_campaign(bad).is_err(), "{bad:?}");
        }
    }
}
