//! `drover start --count N --wait D`: follows the started instances until every one ended
//! (finished, or `in_error`) or the wait lapsed, with a live summary: a bar on a terminal
//! (`1,234/5,000 ended · 3,700 running · 66 queued · 2 in_error`), a line every few seconds
//! on standard error otherwise. One `POST /v1/instances/states` per 10,000 instances still
//! followed, every [`LOOK_EVERY`]; an instance that ended is not asked about again.

use std::collections::{BTreeMap, HashSet};
use std::io::IsTerminal;
use std::time::Duration;

use anyhow::{Context, Result};
use drover_api::{ApiClient, MAX_STATE_IDS, StatesRequest};
use indicatif::ProgressStyle;
use serde_json::{Value, json};

use super::progress::bar;
use super::render::thousands;

/// How often the followed instances are looked at.
const LOOK_EVERY: Duration = Duration::from_millis(500);
/// How often a line is written when standard error is not a terminal.
const LINE_EVERY: Duration = Duration::from_secs(5);
/// Instances that did not complete, listed by name in the summary for people (`--json` lists
/// them all).
const LISTED: usize = 20;
/// The order the summary shows states in: those that did not end, then those that ended
/// without completing.
const WAITING_ORDER: [&str; 5] = ["running", "ready", "waiting", "paused", "queued"];
const NOT_COMPLETED_ORDER: [&str; 3] = ["in_error", "failed", "stopped"];

/// Where the followed instances stand.
#[derive(Debug, Default)]
pub(super) struct Followed {
    total: u64,
    /// Those that ended, by state.
    ended: BTreeMap<String, u64>,
    /// Those that ended otherwise than `completed`: (id, state).
    not_completed: Vec<(String, String)>,
    /// Ids the API does not know (deleted meanwhile).
    unknown: Vec<String>,
    /// Those that did not end, by state, as last seen.
    waiting: BTreeMap<String, u64>,
    /// The wait lapsed before every instance ended.
    lapsed: bool,
    elapsed: Duration,
}

impl Followed {
    fn ended_count(&self) -> u64 {
        self.ended.values().sum()
    }

    fn still(&self) -> u64 {
        self.waiting.values().sum()
    }

    /// `1,234/5,000 ended · 3,700 running · 66 queued · 2 in_error`.
    pub(super) fn line(&self) -> String {
        let mut out = format!(
            "{}/{} ended",
            thousands(self.ended_count()),
            thousands(self.total)
        );
        out.push_str(&self.states());
        out
    }

    /// ` · 3,700 running · 66 queued · 2 in_error`: the states but `completed`.
    fn states(&self) -> String {
        let mut out = String::new();
        let mut add = |n: u64, state: &str| {
            if n > 0 {
                out.push_str(&format!(" · {} {state}", thousands(n)));
            }
        };
        for state in WAITING_ORDER {
            add(self.waiting.get(state).copied().unwrap_or(0), state);
        }
        for (state, n) in &self.waiting {
            if !WAITING_ORDER.contains(&state.as_str()) {
                add(*n, state);
            }
        }
        for state in NOT_COMPLETED_ORDER {
            add(self.ended.get(state).copied().unwrap_or(0), state);
        }
        add(self.unknown.len() as u64, "unknown");
        out
    }

    /// Did every instance complete in time?
    pub(super) fn all_completed(&self) -> bool {
        !self.lapsed && self.not_completed.is_empty() && self.unknown.is_empty()
    }

    /// The summary for people: one line, then the instances that did not complete (the first
    /// [`LISTED`]).
    pub(super) fn summary(&self) -> String {
        let completed = self.ended.get("completed").copied().unwrap_or(0);
        let took = humantime::format_duration(Duration::from_secs(self.elapsed.as_secs()));
        let mut out = if self.lapsed {
            format!(
                "the wait lapsed after {took}: {}/{} ended, {} completed{}\n",
                thousands(self.ended_count()),
                thousands(self.total),
                thousands(completed),
                self.states()
            )
        } else {
            format!(
                "all {} ended in {took}: {} completed{}\n",
                thousands(self.total),
                thousands(completed),
                self.states()
            )
        };
        for (id, state) in self.not_completed.iter().take(LISTED) {
            out.push_str(&format!("{id}\t{state}\n"));
        }
        if self.not_completed.len() > LISTED {
            out.push_str(&format!(
                "… and {} more that did not complete (--json lists them all)\n",
                thousands((self.not_completed.len() - LISTED) as u64)
            ));
        }
        out
    }

    /// Why the command fails, if it does.
    pub(super) fn failure(&self) -> Option<String> {
        if self.all_completed() {
            return None;
        }
        let mut reasons = Vec::new();
        if self.lapsed {
            reasons.push(format!(
                "{} had not ended when the wait lapsed",
                thousands(self.still())
            ));
        }
        if !self.not_completed.is_empty() {
            reasons.push(format!(
                "{} ended without completing",
                thousands(self.not_completed.len() as u64)
            ));
        }
        if !self.unknown.is_empty() {
            reasons.push(format!(
                "{} are unknown to the API",
                thousands(self.unknown.len() as u64)
            ));
        }
        Some(format!(
            "not every instance completed: {}",
            reasons.join(", ")
        ))
    }

    /// The `wait` object of `start --json --wait`.
    pub(super) fn to_json(&self) -> Value {
        json!({
            "total": self.total,
            "ended": self.ended_count(),
            "lapsed": self.lapsed,
            "elapsed_ms": u64::try_from(self.elapsed.as_millis()).unwrap_or(u64::MAX),
            "ended_by_state": self.ended,
            "not_ended_by_state": self.waiting,
            "not_completed": self.not_completed.iter()
                .map(|(id, state)| json!({"id": id, "state": state}))
                .collect::<Vec<_>>(),
            "unknown": self.unknown,
        })
    }
}

/// Follows `ids` until each ended or `wait` passed.
pub(super) async fn follow(
    client: &ApiClient,
    ids: Vec<String>,
    wait: Duration,
) -> Result<Followed> {
    let started = tokio::time::Instant::now();
    let deadline = started + wait;
    let total = ids.len() as u64;
    let mut followed = Followed {
        total,
        ..Default::default()
    };
    let terminal = std::io::stderr().is_terminal();
    let progress = bar(total, "waiting");
    progress.set_style(
        ProgressStyle::with_template("waiting {bar:20} {msg} ({elapsed})")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut pending = ids;
    let mut last_line = started;
    let mut looks = tokio::time::interval(LOOK_EVERY);
    looks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        looks.tick().await;
        let mut waiting: BTreeMap<String, u64> = BTreeMap::new();
        let mut still = Vec::with_capacity(pending.len());
        for chunk in pending.chunks(MAX_STATE_IDS) {
            let answer = client
                .instance_states(&StatesRequest {
                    ids: chunk.to_vec(),
                })
                .await
                .context("reading the instances' states")?;
            look(&answer, chunk, &mut followed, &mut waiting, &mut still);
        }
        pending = still;
        followed.waiting = waiting;
        followed.elapsed = started.elapsed();
        let now = tokio::time::Instant::now();
        let done = pending.is_empty();
        followed.lapsed = !done && now >= deadline;
        if terminal {
            // The message first: it holds the counts, the bar only follows them.
            progress.set_message(followed.line());
            progress.set_position(followed.ended_count());
        } else if !done && !followed.lapsed && now.duration_since(last_line) >= LINE_EVERY {
            last_line = now;
            eprintln!("waiting: {}", followed.line());
        }
        if done || followed.lapsed {
            break;
        }
    }
    progress.finish_and_clear();
    Ok(followed)
}

/// Takes in one answer of `POST /v1/instances/states` about `asked`: the ended and unknown
/// ones into `followed`, the states of the others into `waiting`, their ids into `still`.
fn look(
    answer: &Value,
    asked: &[String],
    followed: &mut Followed,
    waiting: &mut BTreeMap<String, u64>,
    still: &mut Vec<String>,
) {
    let mut gone = HashSet::new();
    let mut ended_now: BTreeMap<String, u64> = BTreeMap::new();
    for instance in answer["ended_instances"].as_array().into_iter().flatten() {
        let id = instance["id"].as_str().unwrap_or_default().to_owned();
        let state = instance["state"].as_str().unwrap_or_default().to_owned();
        *ended_now.entry(state.clone()).or_default() += 1;
        if state != "completed" {
            followed.not_completed.push((id.clone(), state));
        }
        gone.insert(id);
    }
    for (state, n) in &ended_now {
        *followed.ended.entry(state.clone()).or_default() += n;
    }
    for id in answer["unknown_ids"].as_array().into_iter().flatten() {
        let id = id.as_str().unwrap_or_default().to_owned();
        followed.unknown.push(id.clone());
        gone.insert(id);
    }
    for (state, n) in answer["counts"].as_object().into_iter().flatten() {
        let ended = ended_now.get(state).copied().unwrap_or(0);
        let n = n.as_u64().unwrap_or(0).saturating_sub(ended);
        if n > 0 {
            *waiting.entry(state.clone()).or_default() += n;
        }
    }
    // A repeated id is answered once: follow it once.
    let mut asked_once = HashSet::new();
    still.extend(
        asked
            .iter()
            .filter(|id| !gone.contains(*id) && asked_once.insert(id.as_str()))
            .cloned(),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_summary_counts_what_ended_and_names_what_did_not_complete() {
        let mut followed = Followed {
            total: 5000,
            ..Default::default()
        };
        let asked: Vec<String> = ["a", "b", "c", "d"].map(str::to_owned).to_vec();
        let answer = json!({
            "total": 4,
            "counts": {"running": 1, "queued": 1, "completed": 1, "in_error": 1},
            "ended": 2,
            "ended_instances": [{"id": "c", "state": "completed"}, {"id": "d", "state": "in_error"}],
            "unknown": 0,
            "unknown_ids": [],
        });
        let (mut waiting, mut still) = (BTreeMap::new(), Vec::new());
        look(&answer, &asked, &mut followed, &mut waiting, &mut still);
        followed.waiting = waiting;
        assert_eq!(still, ["a", "b"]);
        assert_eq!(
            followed.line(),
            "2/5,000 ended · 1 running · 1 queued · 1 in_error"
        );
        followed.lapsed = true;
        followed.elapsed = Duration::from_secs(30);
        assert_eq!(
            followed.summary(),
            "the wait lapsed after 30s: 2/5,000 ended, 1 completed · 1 running · 1 queued · 1 in_error\nd\tin_error\n"
        );
        assert_eq!(
            followed.failure().as_deref(),
            Some(
                "not every instance completed: 2 had not ended when the wait lapsed, 1 ended without completing"
            )
        );
        assert_eq!(
            followed.to_json()["not_completed"],
            json!([{"id": "d", "state": "in_error"}])
        );
    }
}
