//! Worker queues: where a step's job goes, and what a worker needs to run it.
//!
//! A workflow (or one of its steps) names a [`Queue`]; only workers serving that queue are
//! sent its jobs. A `handler` step also needs a worker that registered its handler: the
//! [`Route`] of a step carries both, from the definition to the instance row to the job.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::ids::is_slug;

/// A worker queue's name: a slug, so it can go into a NATS subject and a consumer name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Queue(String);

impl Queue {
    /// The queue of a workflow that names none, and the one a worker serves unless told
    /// otherwise.
    pub const DEFAULT: &'static str = "default";

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for Queue {
    fn default() -> Self {
        Self(Self::DEFAULT.to_owned())
    }
}

impl fmt::Display for Queue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why a name is not a queue.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid queue name {0:?}: use a slug, [a-z0-9][a-z0-9_-]{{0,62}}")]
pub struct InvalidQueue(pub String);

impl TryFrom<String> for Queue {
    type Error = InvalidQueue;
    fn try_from(name: String) -> Result<Self, Self::Error> {
        if is_slug(&name) {
            Ok(Self(name))
        } else {
            Err(InvalidQueue(name))
        }
    }
}

impl FromStr for Queue {
    type Err = InvalidQueue;
    fn from_str(name: &str) -> Result<Self, Self::Err> {
        Self::try_from(name.to_owned())
    }
}

impl From<Queue> for String {
    fn from(queue: Queue) -> Self {
        queue.0
    }
}

/// Where a step's job goes and what a worker needs to run it: the step's queue, and for a
/// `handler` step the handler's name. Kept on the instance row for its current step and
/// handed back with every job.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Route {
    pub queue: Queue,
    /// The handler a `handler` step calls; `None` for every other kind.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handler: Option<String>,
}

impl Route {
    /// Can a worker serving `queues` with the handlers `has_handler` says it has run it?
    pub fn runs_on(&self, queues: &[Queue], has_handler: impl Fn(&str) -> bool) -> bool {
        queues.contains(&self.queue) && self.handler.as_deref().is_none_or(has_handler)
    }
}

impl fmt::Display for Route {
    /// `queue Q` or `queue Q with handler H`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "queue {}", self.queue)?;
        if let Some(handler) = &self.handler {
            write!(f, " with handler {handler}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_names_are_slugs() {
        assert_eq!(Queue::default().as_str(), "default");
        assert_eq!(
            "gpu-2".parse::<Queue>().map(String::from),
            Ok("gpu-2".into())
        );
        for bad in ["", "GPU", "a.b", "a>", "*", "-a", &"q".repeat(64)] {
            assert!(bad.parse::<Queue>().is_err(), "{bad:?} accepted");
        }
        assert!(serde_json::from_str::<Queue>("\"a.>\"").is_err());
        assert_eq!(
            serde_json::from_str::<Queue>("\"gpu\"").ok(),
            "gpu".parse().ok()
        );
    }

    #[test]
    fn a_route_runs_only_on_a_worker_of_its_queue_with_its_handler() {
        let gpu: Queue = "gpu".parse().expect("a slug");
        let route = Route {
            queue: gpu.clone(),
            handler: Some("greet".into()),
        };
        assert!(route.runs_on(std::slice::from_ref(&gpu), |h| h == "greet"));
        assert!(!route.runs_on(std::slice::from_ref(&gpu), |_| false));
        assert!(!route.runs_on(&[Queue::default()], |_| true));
        assert!(Route::default().runs_on(&[Queue::default(), gpu], |_| false));
        assert_eq!(route.to_string(), "queue gpu with handler greet");
        assert_eq!(Route::default().to_string(), "queue default");
    }
}
