//! `drover pause|unpause|stop|kill|restart` (one instance, or every instance a filter selects)
//! and `drover why`.

use anyhow::{Result, bail};
use drover_api::{ApiClient, LifecycleCommand, LifecycleFilterRequest, LifecycleRequest};
use serde_json::Value;

use super::{parse_state, text};

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

/// Sends the command; answers the API's JSON and whether it is a filter's summary.
pub(super) async fn run(
    client: &ApiClient,
    command: LifecycleCommand,
    args: LifecycleArgs,
) -> Result<(Value, bool)> {
    match args.id {
        Some(id) => {
            let request = LifecycleRequest {};
            Ok((client.lifecycle(&id, command, &request).await?, false))
        }
        None if args.campaign.is_none() && args.state.is_none() && args.workflow.is_none() => {
            bail!("give an instance id, or select instances with --campaign, --state or --workflow")
        }
        None => {
            let request = LifecycleFilterRequest {
                campaign: args.campaign,
                workflow: args.workflow,
                state: args.state,
            };
            Ok((client.lifecycle_many(command, &request).await?, true))
        }
    }
}

/// What a command did to one instance, for people.
pub(super) fn render_result(answer: &Value) -> String {
    let id = text(&answer["id"]);
    let state = text(&answer["state"]);
    let mut out = match answer["outcome"].as_str().unwrap_or_default() {
        "paused" => format!("paused {id}\n"),
        "pause_requested" => {
            format!("pause requested: {id} pauses when its running step finishes\n")
        }
        "unpaused" => format!("unpaused {id}: {state}\n"),
        "pause_withdrawn" => format!("pause request withdrawn: {id} runs on\n"),
        "stop_requested" => format!("stop requested: {id} stops when its running step finishes\n"),
        "stopped" => format!("stopped {id}\n"),
        "killed" => format!("killed {id}\n"),
        "restarted" => format!(
            "restarted {id} as {}: {state}\n",
            text(&answer["restarted_as"])
        ),
        "unchanged" if !answer["restarted_as"].is_null() => format!(
            "{id} was restarted before, as {} (nothing done)\n",
            text(&answer["restarted_as"])
        ),
        "unchanged" => format!("{id} is {state} already (nothing done)\n"),
        other => format!("{} {id}: {other}, {state}\n", text(&answer["action"])),
    };
    for also in answer["cascaded"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "  and {} {} ({})\n",
            text(&also["outcome"]),
            text(&also["id"]),
            text(&also["state"])
        ));
    }
    for admitted in answer["admitted"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "  its permit admitted {} from the queue\n",
            text(admitted)
        ));
    }
    out
}

/// What a command did to the instances of a filter, for people.
pub(super) fn render_summary(answer: &Value) -> String {
    let mut out = format!(
        "{}: {} matched, {} changed, {} unchanged, {} refused\n",
        text(&answer["action"]),
        text(&answer["matched"]),
        text(&answer["changed"]),
        text(&answer["unchanged"]),
        text(&answer["refused"]),
    );
    if let Some(outcomes) = answer["outcomes"].as_object() {
        for (outcome, n) in outcomes {
            out.push_str(&format!("  {outcome}: {}\n", text(n)));
        }
    }
    for (key, what) in [
        ("cascaded", "other instances changed along"),
        ("admitted", "admitted from the queue"),
    ] {
        if answer[key].as_u64().is_some_and(|n| n > 0) {
            out.push_str(&format!("  {what}: {}\n", text(&answer[key])));
        }
    }
    for started in answer["started"].as_array().into_iter().flatten() {
        out.push_str(&format!("  started {}\n", text(started)));
    }
    for refusal in answer["refusals"].as_array().into_iter().flatten() {
        out.push_str(&format!("  refused: {}\n", text(&refusal["message"])));
    }
    out
}

/// `drover why`: the one sentence.
pub(super) fn render_diagnosis(answer: &Value) -> String {
    format!("{}\n", text(&answer["summary"]))
}

#[cfg(test)]
mod tests {
    use clap::Parser;
    use serde_json::json;

    use super::*;
    use crate::cli::OperatorCommand;
    use crate::{Cli, Command};

    fn parse(args: &[&str]) -> Result<OperatorCommand, clap::Error> {
        let cli = Cli::try_parse_from(std::iter::once("drover").chain(args.iter().copied()))?;
        match cli.command {
            Command::Operator(command) => Ok(command),
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn lifecycle_commands_take_an_id_or_a_filter_but_not_both() {
        let OperatorCommand::Kill(args) = parse(&["kill", "0190"]).expect("parses") else {
            panic!("not a kill");
        };
        assert_eq!(args.id.as_deref(), Some("0190"));
        assert!(
            parse(&["kill", "0190", "--actor", "ada"]).is_err(),
            "the actor is the token's name, not a flag"
        );
        let OperatorCommand::Pause(args) = parse(&[
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
            parse(&[command, "x"]).expect("an id");
            parse(&[command, "--state", "paused"]).expect("a filter");
            assert!(parse(&[command]).is_err(), "{command} needs a target");
            assert!(
                parse(&[command, "x", "--campaign", "c"]).is_err(),
                "{command}: an id or a filter, not both"
            );
        }
        let err = parse(&["unpause", "--state", "PAUSED"]).expect_err("not a state");
        assert!(err.to_string().contains("paused"), "{err}");
        assert!(matches!(
            parse(&["why", "0190"]).expect("parses"),
            OperatorCommand::Why { ref id } if id == "0190"
        ));
        assert!(parse(&["why"]).is_err());
    }

    #[test]
    fn what_a_command_did_renders_for_people() {
        let paused = json!({"id": "i1", "action": "pause", "outcome": "pause_requested",
                            "changed": true, "state": "running", "cascaded": [], "admitted": []});
        assert_eq!(
            render_result(&paused),
            "pause requested: i1 pauses when its running step finishes\n"
        );
        let killed = json!({"id": "i1", "action": "kill", "outcome": "killed", "state": "stopped",
                            "cascaded": [{"id": "c1", "outcome": "killed", "state": "stopped"}],
                            "admitted": ["q1"]});
        assert_eq!(
            render_result(&killed),
            "killed i1\n  and killed c1 (stopped)\n  its permit admitted q1 from the queue\n"
        );
        let again = json!({"id": "i1", "outcome": "unchanged", "state": "paused"});
        assert_eq!(
            render_result(&again),
            "i1 is paused already (nothing done)\n"
        );
        let restarted = json!({"id": "i1", "outcome": "restarted", "state": "queued",
                               "restarted_as": "i2"});
        assert_eq!(render_result(&restarted), "restarted i1 as i2: queued\n");

        let summary = json!({"action": "kill", "matched": 3, "changed": 2, "unchanged": 0,
                             "refused": 1, "outcomes": {"killed": 2, "refused": 1},
                             "admitted": 2, "cascaded": 0, "started": [],
                             "refusals": [{"message": "cannot kill i3: it has finished"}]});
        let shown = render_summary(&summary);
        assert!(
            shown.starts_with("kill: 3 matched, 2 changed, 0 unchanged, 1 refused\n"),
            "{shown}"
        );
        assert!(shown.contains("  killed: 2\n"), "{shown}");
        assert!(shown.contains("admitted from the queue: 2"), "{shown}");
        assert!(shown.contains("refused: cannot kill i3"), "{shown}");
        assert!(!shown.contains("other instances changed"), "{shown}");

        let why = json!({"summary": "Instance i1 is queued.", "details": {}});
        assert_eq!(render_diagnosis(&why), "Instance i1 is queued.\n");
        for garbage in [
            json!(null),
            json!([1]),
            json!({"cascaded": "x", "outcomes": 3}),
        ] {
            let _ = render_result(&garbage);
            let _ = render_summary(&garbage);
            let _ = render_diagnosis(&garbage);
        }
    }
}
