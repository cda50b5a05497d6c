//! Domain identifiers. A raw `Uuid` or `i64` never crosses a crate boundary: these do.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

macro_rules! uuid_id {
    ($(#[$meta:meta])* $name:ident) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub Uuid);

        impl $name {
            /// A fresh, time-ordered (v7) id.
            pub fn new() -> Self {
                Self(Uuid::now_v7())
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }

        impl FromStr for $name {
            type Err = uuid::Error;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::parse_str(s).map(Self)
            }
        }
    };
}

uuid_id!(
    /// One workflow instance (a row of `instance`).
    InstanceId
);
impl InstanceId {
    /// The W3C trace id and span id of the instance's root span: derived from the id, so every
    /// step span of the instance can link to it on any node, after any recovery or
    /// re-dispatch, without the root's context having to be stored or carried. The trace id is
    /// the instance id; the span id its low 64 bits (never zero, as the spec requires).
    pub fn trace_root(&self) -> (u128, u64) {
        let id = self.0.as_u128();
        // Truncation intended: the low half of the id.
        #[allow(clippy::cast_possible_truncation)]
        let span = (id as u64).max(1);
        (id, span)
    }
}

uuid_id!(
    /// One node process; a restart gets a new id.
    NodeId
);
uuid_id!(
    /// A schedule (a row of `schedule`).
    ScheduleId
);

macro_rules! int_id {
    ($(#[$meta:meta])* $name:ident) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub i64);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

int_id!(
    /// Bumped at every claim and every requeue; every worker write is conditioned on it.
    Fence
);
int_id!(
    /// The checkpoint sequence of an instance: +1 on every journaled transition.
    StepSeq
);
int_id!(
    /// A campaign row.
    CampaignId
);
int_id!(
    /// One event delivered to an instance (a row of `instance_signal`), in arrival order.
    SignalId
);

impl Fence {
    pub fn next(self) -> Self {
        Self(self.0 + 1)
    }
}

impl StepSeq {
    pub fn next(self) -> Self {
        Self(self.0 + 1)
    }
}

/// Is `s` a slug as used in names and subjects: `[a-z0-9][a-z0-9_-]{0,62}`?
///
/// Only slugs appear in NATS subjects, so no user string can widen a wildcard.
pub fn is_slug(s: &str) -> bool {
    let bytes = s.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && (bytes[0].is_ascii_lowercase() || bytes[0].is_ascii_digit())
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'_' || *b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slugs_are_lowercase_words() {
        assert!(is_slug("welcome-series"));
        assert!(is_slug("a"));
        assert!(is_slug("0_x"));
        assert!(!is_slug(""));
        assert!(!is_slug("-a"));
        assert!(!is_slug("A"));
        assert!(!is_slug("a.b"));
        assert!(!is_slug("a*"));
        assert!(!is_slug(&"a".repeat(64)));
        assert!(is_slug(&"a".repeat(63)));
    }

    #[test]
    fn instance_ids_round_trip_through_text() {
        let id = InstanceId::new();
        assert_eq!(id.to_string().parse::<InstanceId>().ok(), Some(id));
    }
}
