//! What an API token may do. Scopes are ordered: `admin` may do everything `operator` may,
//! which may do everything `viewer` may.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// An API token's scope.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Read anything (every `GET`), change nothing.
    Viewer,
    /// Run things: start instances, lifecycle commands, resume, send events, campaign limits.
    Operator,
    /// Change what runs: deploy workflows, create campaigns, manage tokens.
    Admin,
}

impl Scope {
    pub const ALL: [Scope; 3] = [Scope::Viewer, Scope::Operator, Scope::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Viewer => "viewer",
            Scope::Operator => "operator",
            Scope::Admin => "admin",
        }
    }

    /// Does a token of this scope allow what `needed` allows?
    pub fn allows(self, needed: Scope) -> bool {
        self >= needed
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An unknown scope name.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown scope {0:?} (known scopes: viewer, operator, admin)")]
pub struct UnknownScope(pub String);

impl FromStr for Scope {
    type Err = UnknownScope;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Scope::ALL
            .into_iter()
            .find(|scope| scope.as_str() == s)
            .ok_or_else(|| UnknownScope(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_scope_allows_itself_and_the_ones_below() {
        assert!(Scope::Admin.allows(Scope::Operator));
        assert!(Scope::Admin.allows(Scope::Viewer));
        assert!(Scope::Operator.allows(Scope::Viewer));
        assert!(Scope::Operator.allows(Scope::Operator));
        assert!(!Scope::Operator.allows(Scope::Admin));
        assert!(!Scope::Viewer.allows(Scope::Operator));
    }

    #[test]
    fn scopes_parse_from_their_names_only() {
        for scope in Scope::ALL {
            assert_eq!(scope.as_str().parse::<Scope>(), Ok(scope));
        }
        assert!("Admin".parse::<Scope>().is_err());
        assert!("root".parse::<Scope>().is_err());
    }
}
