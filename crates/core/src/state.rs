//! The instance state machine (ARCHITECTURE.md, "Instance state machine").

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Where an instance is in its life. Stored and shown as the lowercase name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InstanceState {
    /// Over its campaign's limit; starts as soon as a permit frees, FIFO.
    Queued,
    /// Runnable: a job for its current step is (or will be) on the queue.
    Ready,
    /// A worker has claimed it and runs its current step.
    Running,
    /// Held by a timer, a retry back-off, children or an external event.
    Waiting,
    /// Held by an operator.
    Paused,
    /// Needs an operator: attempts exhausted, a permanent error, or an interrupted
    /// non-retryable step.
    InError,
    Completed,
    Failed,
    Stopped,
}

impl InstanceState {
    pub const ALL: [InstanceState; 9] = [
        Self::Queued,
        Self::Ready,
        Self::Running,
        Self::Waiting,
        Self::Paused,
        Self::InError,
        Self::Completed,
        Self::Failed,
        Self::Stopped,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Ready => "ready",
            Self::Running => "running",
            Self::Waiting => "waiting",
            Self::Paused => "paused",
            Self::InError => "in_error",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Stopped => "stopped",
        }
    }

    /// Terminal states never change again and hold no permit.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Stopped)
    }
}

impl fmt::Display for InstanceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An unknown state name.
#[derive(Debug, thiserror::Error)]
#[error(
    "unknown instance state {0:?} (expected one of queued, ready, running, waiting, paused, in_error, completed, failed, stopped)"
)]
pub struct UnknownState(pub String);

impl FromStr for InstanceState {
    type Err = UnknownState;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| UnknownState(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_state_round_trips_through_its_name() {
        for state in InstanceState::ALL {
            assert_eq!(state.as_str().parse::<InstanceState>().ok(), Some(state));
            assert_eq!(
                serde_json::to_value(state).ok(),
                Some(serde_json::Value::String(state.as_str().to_owned()))
            );
        }
        assert!("RUNNING".parse::<InstanceState>().is_err());
    }
}
