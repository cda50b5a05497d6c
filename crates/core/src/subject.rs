//! NATS subjects that `publish` steps may use, and the subject patterns of an allow-list.
//!
//! A `publish` step's subject is a literal NATS subject (`.`-separated non-empty tokens, no
//! wildcards, no whitespace) outside the spaces a workflow must never reach:
//! - `$…` (`$JS.API…` manages streams, `$SYS…`, `$KV…`, …),
//! - `_INBOX…` (replies to other clients' requests; NATS subjects are case-sensitive, so
//!   this is the exact spelling clients use, whatever follows it in the first token),
//! - the cluster's own `<prefix>.…` (jobs, events, signals, recovery).
//!
//! A cluster may narrow this further with an allow-list of patterns ([`SubjectAllowList`]),
//! with the NATS wildcard semantics: `*` is exactly one token, `>` one or more trailing tokens.

use std::fmt;
use std::str::FromStr;

/// Is `subject` a literal NATS subject a `publish` step may name, wherever it runs? Checks
/// the form and the `$` and `_INBOX` spaces, not the cluster's prefix or allow-list (see
/// [`PublishPolicy`]).
pub fn check_literal(subject: &str) -> Result<(), &'static str> {
    if subject.chars().any(|c| c.is_whitespace() || c.is_control()) {
        Err("must not contain whitespace")
    } else if subject.contains(['*', '>']) {
        Err("must not contain the wildcards `*` or `>`")
    } else if subject.split('.').any(str::is_empty) {
        Err("must be non-empty tokens separated by single dots")
    } else if subject.starts_with('$') {
        Err("is in the NATS system space `$…` (JetStream API, system account, KV)")
    } else if subject.starts_with("_INBOX") {
        Err("is in the NATS reply space `_INBOX…`")
    } else {
        Ok(())
    }
}

/// One pattern of an allow-list: a NATS subject whose tokens may be `*` (exactly one token)
/// or, as the last token, `>` (one or more tokens).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubjectPattern {
    text: String,
}

impl SubjectPattern {
    /// Does `subject` (a literal subject) match this pattern?
    pub fn matches(&self, subject: &str) -> bool {
        let mut subject = subject.split('.');
        for token in self.text.split('.') {
            match (token, subject.next()) {
                (">", Some(_)) => return true,
                ("*", Some(_)) => {}
                (token, Some(s)) if token == s => {}
                _ => return false,
            }
        }
        subject.next().is_none()
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl FromStr for SubjectPattern {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let problem = if text.chars().any(|c| c.is_whitespace() || c.is_control()) {
            Some("must not contain whitespace")
        } else if text.split('.').any(str::is_empty) {
            Some("must be non-empty tokens separated by single dots")
        } else if text
            .split('.')
            .any(|t| t != "*" && t != ">" && t.contains(['*', '>']))
        {
            Some("`*` and `>` must be whole tokens")
        } else if text.split('.').rev().skip(1).any(|t| t == ">") {
            Some("`>` must be the last token")
        } else {
            None
        };
        match problem {
            Some(problem) => Err(format!("subject pattern {text:?} {problem}")),
            None => Ok(Self {
                text: text.to_owned(),
            }),
        }
    }
}

impl fmt::Display for SubjectPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// Comma-separated [`SubjectPattern`]s (`orders.>,crm.*`); a subject is allowed when any
/// pattern matches it. Blank entries are ignored, so an empty text is an empty list.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SubjectAllowList(pub Vec<SubjectPattern>);

impl SubjectAllowList {
    pub fn matches(&self, subject: &str) -> bool {
        self.0.iter().any(|pattern| pattern.matches(subject))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl FromStr for SubjectAllowList {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        crate::list::parse_comma_list(text).map(Self)
    }
}

impl fmt::Display for SubjectAllowList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        crate::list::write_comma_list(f, self.0.iter().map(SubjectPattern::as_str))
    }
}

/// Where one cluster's `publish` steps may publish: checked when a workflow is deployed and
/// again when the step runs (the allow-list may have changed in between).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PublishPolicy {
    /// The cluster's subject prefix: `<prefix>` and `<prefix>.…` are its own.
    pub prefix: String,
    /// When set (and not empty), only subjects one of these patterns matches.
    pub allow: Option<SubjectAllowList>,
}

impl PublishPolicy {
    /// Only the fixed rules and the cluster's own prefix; no allow-list.
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
            allow: None,
        }
    }

    /// Why `subject` may not be published to, if it may not.
    pub fn check(&self, subject: &str) -> Result<(), String> {
        check_literal(subject).map_err(|problem| format!("{subject:?} {problem}"))?;
        let prefix = self.prefix.as_str();
        if !prefix.is_empty()
            && subject
                .strip_prefix(prefix)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
        {
            return Err(format!(
                "{subject:?} is in the cluster's reserved `{prefix}.` space"
            ));
        }
        match &self.allow {
            Some(allow) if !allow.is_empty() && !allow.matches(subject) => Err(format!(
                "{subject:?} is not in the cluster's publish allow-list ({allow})"
            )),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pattern(text: &str) -> SubjectPattern {
        text.parse().expect("test pattern")
    }

    #[test]
    fn wildcards_follow_nats_semantics() {
        let star = pattern("orders.*");
        assert!(star.matches("orders.new"));
        assert!(!star.matches("orders"));
        assert!(!star.matches("orders.new.eu"));
        assert!(!star.matches("order.new"));
        let tail = pattern("orders.>");
        assert!(tail.matches("orders.new"));
        assert!(tail.matches("orders.new.eu.1"));
        assert!(!tail.matches("orders"));
        assert!(!tail.matches("ordersx.new"));
        let middle = pattern("a.*.c");
        assert!(middle.matches("a.b.c"));
        assert!(!middle.matches("a.b.d"));
        assert!(!middle.matches("a.c"));
        assert!(pattern(">").matches("anything.at.all"));
        assert!(pattern("exact.one").matches("exact.one"));
        assert!(!pattern("exact.one").matches("exact.one.more"));
    }

    #[test]
    fn malformed_patterns_are_rejected() {
        for bad in ["", "a..b", ".a", "a.", "a.>.b", "a*", "a.b>", "a b", "a.\t"] {
            assert!(bad.parse::<SubjectPattern>().is_err(), "{bad:?}");
        }
        let list: SubjectAllowList = "orders.>, crm.* ,,".parse().expect("valid list");
        assert_eq!(list.to_string(), "orders.>,crm.*");
        assert!("orders.>,a..b".parse::<SubjectAllowList>().is_err());
        assert!("".parse::<SubjectAllowList>().is_ok_and(|l| l.is_empty()));
    }

    #[test]
    fn system_inbox_and_malformed_subjects_are_refused() {
        for bad in [
            "$JS.API.STREAM.DELETE.DROVER_JOBS",
            "$SYS.REQ.SERVER.PING",
            "$KV.bucket.key",
            "_INBOX.abc",
            "_INBOX",
            "_INBOX_custom.abc",
            "a.*",
            "a.>",
            "a..b",
            ".a",
            "a.",
            "a b",
            "",
        ] {
            assert!(check_literal(bad).is_err(), "{bad:?}");
        }
        for good in ["orders.new", "a", "x$.y", "my_INBOX.a", "inbox.x"] {
            assert_eq!(check_literal(good), Ok(()), "{good:?}");
        }
    }

    #[test]
    fn the_policy_refuses_the_prefix_and_subjects_outside_the_allow_list() {
        let mut policy = PublishPolicy::new("drover");
        assert!(policy.check("drover").is_err());
        let err = policy.check("drover.job.step").expect_err("reserved");
        assert!(err.contains("reserved `drover.` space"), "{err}");
        assert!(policy.check("drovers.x").is_ok());
        assert!(policy.check("crm.lead").is_ok());
        assert!(policy.check("$JS.API.INFO").is_err());
        policy.allow = Some("orders.>,crm.*".parse().expect("valid list"));
        assert!(policy.check("crm.lead").is_ok());
        assert!(policy.check("orders.new.eu").is_ok());
        let err = policy.check("crm.lead.x").expect_err("outside");
        assert!(err.contains("not in the cluster's publish allow-list (orders.>,crm.*)"));
        // The allow-list cannot open the fixed spaces.
        policy.allow = Some(">".parse().expect("valid list"));
        assert!(policy.check("drover.job.step").is_err());
        assert!(policy.check("_INBOX.x").is_err());
        policy.allow = Some(SubjectAllowList::default());
        assert!(
            policy.check("any.thing").is_ok(),
            "an empty list is no list"
        );
    }

    /// The matcher's definition, written differently: tokens side by side.
    fn reference(pattern: &[&str], subject: &[&str]) -> bool {
        match (pattern.split_first(), subject.split_first()) {
            (Some((&">", _)), Some(_)) => true,
            (Some((&"*", p)), Some((_, s))) => reference(p, s),
            (Some((t, p)), Some((u, s))) => t == u && reference(p, s),
            (None, None) => true,
            _ => false,
        }
    }

    fn tokens() -> impl Strategy<Value = Vec<String>> {
        prop::collection::vec(prop::sample::select(vec!["a", "b", "c"]), 1..5)
            .prop_map(|t| t.into_iter().map(str::to_owned).collect())
    }

    proptest! {
        #[test]
        fn matching_agrees_with_the_token_by_token_reference(
            subject in tokens(),
            body in prop::collection::vec(prop::sample::select(vec!["a", "b", "*"]), 0..5),
            tail in prop::sample::select(vec!["a", "*", ">"]),
        ) {
            let mut pattern_tokens: Vec<&str> = body.clone();
            pattern_tokens.push(tail);
            let text = pattern_tokens.join(".");
            let parsed = pattern(&text);
            let subject_tokens: Vec<&str> = subject.iter().map(String::as_str).collect();
            prop_assert_eq!(
                parsed.matches(&subject.join(".")),
                reference(&pattern_tokens, &subject_tokens)
            );
        }

        #[test]
        fn a_subject_matches_itself_and_its_wildcarded_forms(
            subject in tokens(),
            stars in prop::collection::vec(any::<bool>(), 5),
            cut in any::<prop::sample::Index>(),
        ) {
            let text = subject.join(".");
            prop_assert!(pattern(&text).matches(&text));
            let starred: Vec<&str> = subject
                .iter()
                .zip(&stars)
                .map(|(t, star)| if *star { "*" } else { t.as_str() })
                .collect();
            prop_assert!(pattern(&starred.join(".")).matches(&text));
            // `>` stands for one or more trailing tokens, never none.
            let keep = cut.index(subject.len());
            let mut tail: Vec<&str> = subject[..keep].iter().map(String::as_str).collect();
            tail.push(">");
            prop_assert!(pattern(&tail.join(".")).matches(&text));
            let mut longer = subject.clone();
            longer.push(">".to_owned());
            prop_assert!(!pattern(&longer.join(".")).matches(&text));
        }
    }
}
