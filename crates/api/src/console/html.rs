//! The layout every page shares and small pieces of markup.

use chrono::{DateTime, Utc};
use drover_core::InstanceState;
use maud::{DOCTYPE, Markup, html};

use super::Session;

/// Which navigation entry a page belongs to.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Nav {
    Instances,
    Campaigns,
    Workflows,
    Schedules,
    Nodes,
    None,
}

/// A whole page. `live`: the server-sent event stream whose events refresh the page's
/// `data-live` regions.
pub(crate) fn page(
    title: &str,
    nav: Nav,
    session: Option<&Session>,
    live: Option<&str>,
    body: Markup,
) -> Markup {
    let entries = [
        (Nav::Instances, "/ui/instances", "Instances"),
        (Nav::Campaigns, "/ui/campaigns", "Campaigns"),
        (Nav::Workflows, "/ui/workflows", "Workflows"),
        (Nav::Schedules, "/ui/schedules", "Schedules"),
        (Nav::Nodes, "/ui/nodes", "Nodes"),
    ];
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · Drover" }
                link rel="stylesheet" href="/ui/assets/console.css";
                script src="/ui/assets/console.js" defer {}
            }
            body data-live=[live] {
                a.skip href="#main" { "Skip to content" }
                header.top {
                    a.brand href="/ui/" { "Drover" }
                    @if let Some(session) = session {
                        nav aria-label="Main" {
                            ul {
                                @for (entry, href, label) in entries {
                                    li {
                                        @if entry == nav {
                                            a href=(href) aria-current="page" { (label) }
                                        } @else {
                                            a href=(href) { (label) }
                                        }
                                    }
                                }
                            }
                        }
                        form.logout method="post" action="/ui/logout" {
                            span.who { (session.principal.name) " · " (session.principal.scope) }
                            button type="submit" { "Log out" }
                        }
                    }
                }
                main #main {
                    h1 { (title) }
                    (body)
                }
                @if live.is_some() {
                    p #live-status.muted role="status" aria-live="polite" {}
                }
            }
        }
    }
}

/// The outcome of an action, shown above the page.
pub(crate) fn banner(result: &Result<String, String>) -> Markup {
    html! {
        @match result {
            Ok(message) => div.banner.ok #result role="status" { (message) },
            Err(message) => div.banner.err #result role="alert" { (message) },
        }
    }
}

pub(crate) fn state_badge(state: InstanceState) -> Markup {
    html! { span class={"state s-" (state.as_str())} { (state.as_str()) } }
}

pub(crate) fn time(at: DateTime<Utc>) -> Markup {
    html! {
        time datetime=(at.to_rfc3339()) title=(at.to_rfc3339()) {
            (at.format("%Y-%m-%d %H:%M:%S"))
        }
    }
}

/// `1.234 s`, `12 ms`, `3 min 4 s`.
pub(crate) fn duration(from: DateTime<Utc>, to: DateTime<Utc>) -> String {
    let ms = (to - from).num_milliseconds().max(0);
    if ms < 1_000 {
        format!("{ms} ms")
    } else if ms < 60_000 {
        format!("{:.3} s", ms as f64 / 1000.0)
    } else if ms < 3_600_000 {
        format!("{} min {} s", ms / 60_000, (ms % 60_000) / 1000)
    } else {
        format!("{} h {} min", ms / 3_600_000, (ms % 3_600_000) / 60_000)
    }
}

/// Pretty JSON in a `<pre>`.
pub(crate) fn json(value: &serde_json::Value) -> Markup {
    let text = serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string());
    html! { pre.json { (text) } }
}
