//! Running an operator command: its request to the API, then the answer printed (the API's
//! JSON with `--json`, else for people).

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use drover_api::{
    ApiClient, CreateCampaign, CreateToken, DeleteWorkflowQuery, LifecycleCommand,
    LifecycleFilterRequest, LifecycleRequest, ListQuery, ResumeMode, ResumeRequest, Secret,
    SetLimit, StartOperation, StartRequest,
};
use serde_json::Value;

use super::args::{
    CampaignCommand, InstanceCommand, LifecycleArgs, OperatorCommand, TokenCommand, WorkflowCommand,
};
use super::render::{View, render};
use crate::UsageError;

/// Where the operator commands send their requests, and how.
#[derive(Debug)]
pub struct Api {
    /// The API's base URL (`--api-url`).
    pub url: String,
    /// The bearer token (`--token`); none sends no `Authorization`.
    pub token: Option<Secret>,
    /// How long one request may take (`--timeout`).
    pub timeout: Duration,
}

/// How much longer than its `?wait=` a waiting start may take: the server answers when the
/// wait lapses, then the answer travels.
const WAIT_SLACK: Duration = Duration::from_secs(10);

/// Runs an operator command against `api`; `json` prints the API's JSON.
pub async fn run(command: OperatorCommand, api: &Api, json: bool) -> Result<()> {
    // A start that waits for its instance may take its wait, whatever the request timeout.
    let wait_for = match &command {
        OperatorCommand::Start {
            wait: Some(wait), ..
        } => Some(
            humantime::parse_duration(wait)
                .map_err(|err| UsageError(format!("--wait {wait:?}: {err} (e.g. --wait 30s)")))?,
        ),
        _ => None,
    };
    // Many instances are followed by short requests; one is waited for by the server.
    let one_waits = matches!(&command, OperatorCommand::Start { count: 1, .. });
    let timeout = match wait_for {
        Some(wait) if one_waits => api.timeout.max(wait + WAIT_SLACK),
        _ => api.timeout,
    };
    let mut client = ApiClient::with_timeout(&api.url, timeout)?;
    if let Some(token) = api.token.clone().filter(|token| !token.expose().is_empty()) {
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
        OperatorCommand::Workflow(WorkflowCommand::Delete {
            name,
            version,
            stop_instances,
        }) => {
            let query = DeleteWorkflowQuery {
                version,
                stop_instances,
            };
            (
                client.delete_workflow(&name, &query).await?,
                View::WorkflowDeleted,
            )
        }
        OperatorCommand::Start {
            workflow,
            version,
            campaign,
            vars,
            count,
            ids,
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
            if let (Some(following), true) = (wait_for, count > 1) {
                return start_and_follow(&client, request, following, json, ids).await;
            }
            if wait.is_some() {
                (
                    client.start(&request, wait.as_deref()).await?,
                    View::Started,
                )
            } else {
                let answer = super::progress::start_all(&client, request).await?;
                (answer, if ids { View::StartedIds } else { View::Started })
            }
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
                parent: None,
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
                .map_err(|err| {
                    UsageError(format!(
                        r#"--payload is not valid JSON: {err} (e.g. --payload '{{"approved":true}}')"#
                    ))
                })?;
            let answer = client.send_event(&id, &name, payload.as_ref()).await?;
            (answer, View::EventSent)
        }
        OperatorCommand::Campaign(command) => run_campaign(&client, command).await?,
        OperatorCommand::Nodes => (client.nodes().await?, View::Nodes),
        OperatorCommand::Leader => (client.leader().await?, View::Leader),
        OperatorCommand::Token(command) => run_token(&client, command).await?,
        OperatorCommand::Schedule(command) => {
            return super::schedule::run(&client, command, json).await;
        }
    };
    let text = if json {
        let mut text = serde_json::to_string_pretty(&answer).context("encoding the answer")?;
        text.push('\n');
        text
    } else {
        render(view, &answer)
    };
    emit(&text)?;
    if matches!(view, View::LifecycleSummary) && answer["state"] == "cancelled" {
        bail!(
            "operation {} was cancelled: the counts above are what it did",
            text_of(&answer["operation"])
        );
    }
    if matches!(view, View::LifecycleSummary) && answer["state"] == "interrupted" {
        bail!(
            "operation {} was interrupted: {}",
            text_of(&answer["operation"]),
            text_of(&answer["error"])
        );
    }
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

/// `start --count N --wait`: starts them, prints the start's summary (or ids), follows them
/// until each ended or `wait` passed, and prints how they ended; fails unless all completed.
async fn start_and_follow(
    client: &ApiClient,
    request: StartRequest,
    wait: Duration,
    json: bool,
    ids: bool,
) -> Result<()> {
    let started = super::progress::start_all(client, request).await?;
    if !json {
        emit(&render(
            if ids { View::StartedIds } else { View::Started },
            &started,
        ))?;
    }
    let followed_ids: Vec<String> = started["ids"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|id| id.as_str().map(str::to_owned))
        .collect();
    let followed = super::follow::follow(client, followed_ids, wait).await?;
    if json {
        let mut answer = started;
        answer["wait"] = followed.to_json();
        let mut text = serde_json::to_string_pretty(&answer).context("encoding the answer")?;
        text.push('\n');
        emit(&text)?;
    } else {
        emit(&followed.summary())?;
    }
    match followed.failure() {
        // With --json the summary above says it all: no second JSON document.
        Some(failure) => Err(crate::Reported(failure).into()),
        None => Ok(()),
    }
}

fn text_of(value: &Value) -> String {
    value
        .as_str()
        .map_or_else(|| value.to_string(), str::to_owned)
}

async fn lifecycle(
    client: &ApiClient,
    command: LifecycleCommand,
    args: LifecycleArgs,
) -> Result<(Value, View)> {
    let (answer, many) = send_lifecycle(client, command, args).await?;
    Ok((
        answer,
        if many {
            View::LifecycleSummary
        } else {
            View::Lifecycle
        },
    ))
}

/// Sends the command; answers the API's JSON and whether it is a filter's summary.
async fn send_lifecycle(
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
            let request = StartOperation {
                command: command.as_str().to_owned(),
                filter: LifecycleFilterRequest {
                    campaign: args.campaign,
                    workflow: args.workflow,
                    state: args.state,
                },
            };
            Ok((
                super::progress::follow_operation(client, &request).await?,
                true,
            ))
        }
    }
}

/// Sends the command; answers the API's JSON and how to show it.
async fn run_campaign(client: &ApiClient, command: CampaignCommand) -> Result<(Value, View)> {
    Ok(match command {
        CampaignCommand::Create {
            name,
            max_running,
            on_error_permit,
        } => {
            let request = CreateCampaign {
                name,
                max_running,
                on_error_permit,
            };
            (client.create_campaign(&request).await?, View::Campaign)
        }
        CampaignCommand::SetLimit { name, max_running } => {
            let request = SetLimit { max_running };
            (
                client.set_campaign_limit(&name, &request).await?,
                View::LimitChanged,
            )
        }
        CampaignCommand::SetRetention { name, retention } => {
            let retention = (retention != "default").then_some(retention);
            let request = drover_api::SetRetention { retention };
            (
                client.set_campaign_retention(&name, &request).await?,
                View::Retention,
            )
        }
        CampaignCommand::Retention { name } => {
            (client.campaign_retention(&name).await?, View::Retention)
        }
        CampaignCommand::List => (client.campaigns().await?, View::Campaigns),
        CampaignCommand::Show { name } => (client.campaign(&name).await?, View::Campaign),
        CampaignCommand::Pause { name } => (
            client.pause_campaign(&name, true).await?,
            View::CampaignPaused,
        ),
        CampaignCommand::Unpause { name } => (
            client.pause_campaign(&name, false).await?,
            View::CampaignPaused,
        ),
        CampaignCommand::Delete { name } => {
            (client.delete_campaign(&name).await?, View::CampaignDeleted)
        }
    })
}

/// Sends the command; answers the API's JSON and how to show it.
async fn run_token(client: &ApiClient, command: TokenCommand) -> Result<(Value, View)> {
    Ok(match command {
        TokenCommand::Create {
            name,
            scope,
            expires,
        } => {
            let request = CreateToken {
                name,
                scope,
                expires_in: expires,
            };
            (client.create_token(&request).await?, View::TokenCreated)
        }
        TokenCommand::List => (client.tokens().await?, View::Tokens),
        TokenCommand::Revoke { name } => (client.revoke_token(&name).await?, View::TokenRevoked),
    })
}

/// Writes to stdout; a closed pipe (`drover instance list | head`) is not an error.
pub(super) fn emit(text: &str) -> Result<()> {
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

fn parse_vars(vars: &str) -> Result<Value, UsageError> {
    let example = r#"e.g. --vars '{"email":"a@example.com"}'"#;
    let value: Value = serde_json::from_str(vars)
        .map_err(|err| UsageError(format!("--vars is not valid JSON: {err} ({example})")))?;
    if !value.is_object() {
        return Err(UsageError(format!(
            "--vars must be a JSON object, not {value} ({example})"
        )));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

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
}
