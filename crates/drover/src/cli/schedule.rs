//! `drover schedule create|list|show|pause|unpause|trigger|backfill|update|delete`: workflows
//! started on a cron or interval schedule, each fire time exactly once.

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use drover_api::{ApiClient, Backfill, CreateSchedule, PauseSchedule, ScheduleSpec};
use serde_json::Value;

use super::render::{key_values, list, text, time};
use super::run::emit;

/// What a schedule does (create and update).
#[derive(clap::Args, Debug, Default)]
pub struct SpecArgs {
    /// The workflow to start (its latest version at each fire).
    #[arg(long)]
    workflow: Option<String>,
    /// A cron expression: 5 fields, or 6 with a leading seconds field ('*/2 * * * * *').
    #[arg(long, conflicts_with = "every")]
    cron: Option<String>,
    /// The IANA time zone the cron expression is read in (DST-correct); UTC when absent.
    #[arg(long)]
    timezone: Option<String>,
    /// An interval instead of --cron (`30s`, `5m`; at least 1s).
    #[arg(long)]
    every: Option<String>,
    /// Overrides of the workflow's vars, as a JSON object.
    #[arg(long)]
    vars: Option<String>,
    /// The campaign the instances join; `default` when absent.
    #[arg(long)]
    campaign: Option<String>,
    /// While the previous run is still live: skip (default), buffer_one, allow_all,
    /// cancel_other or terminate_other.
    #[arg(long, value_parser = ["skip", "buffer_one", "allow_all", "cancel_other", "terminate_other"])]
    overlap: Option<String>,
    /// Fires missed while the cluster was down run when at most this late (default 1m); older
    /// ones are recorded skipped.
    #[arg(long)]
    catchup_window: Option<String>,
    /// Delay each fire by up to this long (the same delay for a fire wherever computed).
    #[arg(long)]
    jitter: Option<String>,
    /// No fire before this time (RFC 3339).
    #[arg(long)]
    start_at: Option<DateTime<Utc>>,
    /// No fire after this time (RFC 3339).
    #[arg(long)]
    end_at: Option<DateTime<Utc>>,
}

impl SpecArgs {
    fn spec(self) -> Result<ScheduleSpec> {
        let vars = self
            .vars
            .as_deref()
            .map(serde_json::from_str::<Value>)
            .transpose()
            .context(r#"--vars is not valid JSON (e.g. --vars '{"n":1}')"#)?;
        Ok(ScheduleSpec {
            workflow: self.workflow,
            cron: self.cron,
            timezone: self.timezone,
            every: self.every,
            vars,
            campaign: self.campaign,
            overlap: self.overlap,
            catchup_window: self.catchup_window,
            jitter: self.jitter,
            start_at: self.start_at,
            end_at: self.end_at,
        })
    }
}

#[derive(clap::Subcommand, Debug)]
pub enum ScheduleCommand {
    /// Create a schedule: --workflow and one of --cron or --every.
    Create {
        /// The schedule's name (a slug).
        name: String,
        #[command(flatten)]
        spec: SpecArgs,
    },
    /// List schedules with their next fire time and last outcome.
    List,
    /// Show a schedule: its next 5 fire times and recent fires with their instances.
    Show {
        /// The schedule's name.
        name: String,
    },
    /// Pause a schedule: fire times pass unrun until it is unpaused.
    Pause {
        /// The schedule's name.
        name: String,
        /// Why, for the next person.
        #[arg(long)]
        note: Option<String>,
    },
    /// Unpause a schedule: it fires again from its next fire time after now.
    Unpause {
        /// The schedule's name.
        name: String,
    },
    /// Run a schedule now.
    Trigger {
        /// The schedule's name.
        name: String,
    },
    /// Run a schedule once for each of its fire times in [--from, --to] not run yet.
    Backfill {
        /// The schedule's name.
        name: String,
        /// RFC 3339.
        #[arg(long)]
        from: DateTime<Utc>,
        /// RFC 3339.
        #[arg(long)]
        to: DateTime<Utc>,
    },
    /// Change a schedule; options not given keep their value.
    Update {
        /// The schedule's name.
        name: String,
        #[command(flatten)]
        spec: SpecArgs,
    },
    /// Delete a schedule (the instances it started stay).
    Delete {
        /// The schedule's name.
        name: String,
    },
}

/// Sends the command and prints the answer (`json`: the API's JSON).
pub(super) async fn run(client: &ApiClient, command: ScheduleCommand, json: bool) -> Result<()> {
    let (answer, rendered): (Value, fn(&Value) -> String) = match command {
        ScheduleCommand::Create { name, spec } => {
            let request = CreateSchedule {
                name,
                spec: spec.spec()?,
            };
            (client.create_schedule(&request).await?, render_detail)
        }
        ScheduleCommand::List => (client.schedules().await?, render_list),
        ScheduleCommand::Show { name } => (client.schedule(&name).await?, render_detail),
        ScheduleCommand::Pause { name, note } => (
            client
                .pause_schedule(&name, &PauseSchedule { note })
                .await?,
            render_detail,
        ),
        ScheduleCommand::Unpause { name } => (client.unpause_schedule(&name).await?, render_detail),
        ScheduleCommand::Trigger { name } => (client.trigger_schedule(&name).await?, render_fired),
        ScheduleCommand::Backfill { name, from, to } => (
            client
                .backfill_schedule(&name, &Backfill { from, to })
                .await?,
            render_fired,
        ),
        ScheduleCommand::Update { name, spec } => (
            client.update_schedule(&name, &spec.spec()?).await?,
            render_detail,
        ),
        ScheduleCommand::Delete { name } => (client.delete_schedule(&name).await?, |a| {
            format!("schedule {} deleted\n", text(&a["deleted"]))
        }),
    };
    if json {
        let mut out = serde_json::to_string_pretty(&answer).context("encoding the answer")?;
        out.push('\n');
        emit(&out)
    } else {
        emit(&rendered(&answer))
    }
}

fn cadence(s: &Value) -> String {
    if s["cron"].is_string() {
        format!("cron '{}' {}", text(&s["cron"]), text(&s["timezone"]))
    } else {
        format!("every {}", text(&s["every"]))
    }
}

fn last(s: &Value) -> String {
    let fire = &s["last_fire"];
    if fire.is_null() {
        return "-".to_owned();
    }
    format!(
        "{} {} ({})",
        time(&fire["fire_at"]),
        text(&fire["outcome"]),
        text(&fire["reason"])
    )
}

fn render_list(answer: &Value) -> String {
    list(
        &answer["schedules"],
        "no schedules",
        &[
            "NAME",
            "WORKFLOW",
            "WHEN",
            "OVERLAP",
            "PAUSED",
            "NEXT FIRE",
            "LAST",
        ],
        |s| {
            vec![
                text(&s["name"]),
                text(&s["workflow"]),
                cadence(s),
                text(&s["overlap"]),
                text(&s["paused"]),
                time(&s["next_fire_at"]),
                last(s),
            ]
        },
    )
}

fn render_detail(s: &Value) -> String {
    let next = s["next_fires"]
        .as_array()
        .map(|times| times.iter().map(time).collect::<Vec<_>>().join("\n"))
        .unwrap_or_default();
    let mut out = key_values(&[
        ("name", text(&s["name"])),
        ("workflow", text(&s["workflow"])),
        ("campaign", text(&s["campaign"])),
        ("when", cadence(s)),
        ("overlap", text(&s["overlap"])),
        ("catch-up window", text(&s["catchup_window"])),
        ("jitter", text(&s["jitter"])),
        ("paused", text(&s["paused"])),
        ("note", text(&s["note"])),
        (
            "next fires",
            if next.is_empty() { "-".into() } else { next },
        ),
    ]);
    out.push_str(&list(
        &s["recent_fires"],
        "no fires yet",
        &["FIRE TIME", "OUTCOME", "REASON", "INSTANCE"],
        |f| {
            vec![
                time(&f["fire_at"]),
                text(&f["outcome"]),
                text(&f["reason"]),
                text(&f["instance"]),
            ]
        },
    ));
    out
}

fn render_fired(answer: &Value) -> String {
    list(
        &answer["fires"],
        "nothing to run",
        &["FIRE TIME", "INSTANCE"],
        |f| {
            let instance = if f["instance"].is_null() {
                "(already run)".to_owned()
            } else {
                text(&f["instance"])
            };
            vec![time(&f["fire_at"]), instance]
        },
    )
}
