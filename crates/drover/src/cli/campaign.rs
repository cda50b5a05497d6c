//! `drover campaign create|set-limit|list|show`: campaigns and their concurrency limits.

use anyhow::Result;
use drover_api::{ApiClient, CreateCampaign, SetLimit};
use serde_json::Value;

use super::{View, key_values, list, text, time};

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
    /// List campaigns with their limits and counts.
    List,
    /// Show a campaign: its limit, how many run and queue, and how long its queue has waited.
    Show {
        /// The campaign's name.
        name: String,
    },
}

/// Sends the command; answers the API's JSON and how to show it.
pub(super) async fn run(client: &ApiClient, command: CampaignCommand) -> Result<(Value, View)> {
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
        CampaignCommand::List => (client.campaigns().await?, View::Campaigns),
        CampaignCommand::Show { name } => (client.campaign(&name).await?, View::Campaign),
    })
}

/// `unlimited`, or the limit.
fn limit(campaign: &Value) -> String {
    if campaign["max_running"].is_null() {
        "unlimited".to_owned()
    } else {
        text(&campaign["max_running"])
    }
}

/// A queue's age in seconds (`12.3s`), `-` when nothing queues.
pub(super) fn queue_age(campaign: &Value) -> String {
    match campaign["oldest_queued_age_ms"].as_i64() {
        Some(ms) => format!("{:.1}s", ms as f64 / 1000.0),
        None => "-".to_owned(),
    }
}

/// The campaigns table.
pub(super) fn render_list(answer: &Value) -> String {
    list(
        &answer["campaigns"],
        "no campaigns",
        &[
            "NAME",
            "MAX RUNNING",
            "RUNNING",
            "QUEUED",
            "OLDEST QUEUED",
            "ON ERROR",
        ],
        |c| {
            vec![
                text(&c["name"]),
                limit(c),
                text(&c["running"]),
                text(&c["queued"]),
                queue_age(c),
                text(&c["on_error_permit"]),
            ]
        },
    )
}

/// One campaign.
pub(super) fn render_campaign(campaign: &Value) -> String {
    key_values(&[
        ("name", text(&campaign["name"])),
        ("max running", limit(campaign)),
        ("running", text(&campaign["running"])),
        ("queued", text(&campaign["queued"])),
        (
            "oldest queued",
            match campaign["oldest_queued_at"].as_str() {
                Some(_) => format!(
                    "{} ({} ago)",
                    time(&campaign["oldest_queued_at"]),
                    queue_age(campaign)
                ),
                None => "-".to_owned(),
            },
        ),
        ("on error", text(&campaign["on_error_permit"])),
    ])
}

/// What a limit change did.
pub(super) fn render_limit_changed(answer: &Value) -> String {
    let campaign = &answer["campaign"];
    let admitted = answer["admitted"].as_array().map_or(0, Vec::len);
    format!(
        "campaign {}: limit {} -> {} ({} running, {} queued; {admitted} admitted now)\n",
        text(&campaign["name"]),
        text(&answer["previous"]),
        limit(campaign),
        text(&campaign["running"]),
        text(&campaign["queued"]),
    )
}

#[cfg(test)]
mod tests {
    use clap::Parser;
    use serde_json::json;

    use super::*;

    #[derive(Parser, Debug)]
    struct TestCli {
        #[command(subcommand)]
        command: CampaignCommand,
    }

    fn parse(args: &[&str]) -> Result<CampaignCommand, clap::Error> {
        TestCli::try_parse_from(std::iter::once("campaign").chain(args.iter().copied()))
            .map(|cli| cli.command)
    }

    #[test]
    fn campaign_commands_parse_and_refuse_bad_limits_before_any_request() {
        assert!(matches!(
            parse(&["create", "spring", "--max-running", "10", "--on-error-permit", "hold"]),
            Ok(CampaignCommand::Create { ref name, max_running: Some(10), on_error_permit: Some(ref p), .. })
                if name == "spring" && p == "hold"
        ));
        assert!(matches!(
            parse(&["create", "spring"]),
            Ok(CampaignCommand::Create {
                max_running: None,
                on_error_permit: None,
                ..
            })
        ));
        assert!(matches!(
            parse(&["set-limit", "spring", "3"]),
            Ok(CampaignCommand::SetLimit { max_running: 3, .. })
        ));
        assert!(matches!(
            parse(&["show", "spring"]),
            Ok(CampaignCommand::Show { .. })
        ));
        for bad in [
            &["create", "x", "--max-running", "0"][..],
            &["create", "x", "--max-running", "100001"],
            &["create", "x", "--on-error-permit", "keep"],
            &["set-limit", "x", "0"],
            &["set-limit", "x"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn campaigns_render_for_people() {
        let campaign = json!({
            "name": "spring", "max_running": 3, "running": 3, "queued": 7,
            "on_error_permit": "release", "oldest_queued_at": "2025-01-02T03:04:05Z",
            "oldest_queued_age_ms": 12_345
        });
        let shown = render_campaign(&campaign);
        assert!(
            shown.contains("spring") && shown.contains("12.3s ago"),
            "{shown}"
        );
        let listed = render_list(&json!({"campaigns": [campaign, {"name": "default",
            "max_running": null, "running": 0, "queued": 0, "on_error_permit": "release"}]}));
        assert!(
            listed.contains("OLDEST QUEUED") && listed.contains("unlimited"),
            "{listed}"
        );
        let changed = render_limit_changed(&json!({
            "campaign": {"name": "spring", "max_running": 5, "running": 5, "queued": 5},
            "previous": 3, "admitted": ["a", "b"]
        }));
        assert_eq!(
            changed,
            "campaign spring: limit 3 -> 5 (5 running, 5 queued; 2 admitted now)\n"
        );
        for bad in [
            json!(null),
            json!({"campaign": 1}),
            json!({"campaigns": "x"}),
        ] {
            let _ = render_campaign(&bad);
            let _ = render_list(&bad);
            let _ = render_limit_changed(&bad);
        }
    }
}
