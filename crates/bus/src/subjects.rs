//! Subject and stream names. Only slugs go into subjects, so no user string can widen a
//! wildcard.

use drover_core::ids::is_slug;
use drover_core::{InstanceId, Queue};

/// Is `prefix` usable as a subject prefix and stream-name stem?
pub fn is_valid_prefix(prefix: &str) -> bool {
    drover_core::ids::is_slug(prefix)
}

/// The names of one cluster's subjects and streams.
#[derive(Clone, Debug)]
pub struct Subjects {
    prefix: String,
    stream_stem: String,
}

impl Subjects {
    /// `prefix` must satisfy [`is_valid_prefix`].
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
            stream_stem: prefix.replace('-', "_").to_ascii_uppercase(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn jobs_stream(&self) -> String {
        format!("{}_JOBS", self.stream_stem)
    }

    pub fn recovery_stream(&self) -> String {
        format!("{}_RECOVERY", self.stream_stem)
    }

    /// Where recovery tasks (one per dead node) are published.
    pub fn recovery(&self) -> String {
        format!("{}.recovery.task", self.prefix)
    }

    pub fn recovery_filter(&self) -> String {
        format!("{}.recovery.>", self.prefix)
    }

    pub fn events_stream(&self) -> String {
        format!("{}_EVENTS", self.stream_stem)
    }

    /// Where the step jobs of worker queue `queue` are published: `<prefix>.job.<queue>`.
    pub fn job(&self, queue: &Queue) -> String {
        format!("{}.job.{queue}", self.prefix)
    }

    /// Where every job went before worker queues, the filter the legacy `workers` consumer is
    /// narrowed to (see [`crate::LEGACY_WORKER_CONSUMER`]). Nothing publishes there now.
    pub fn legacy_job(&self) -> String {
        format!("{}.job.step", self.prefix)
    }

    pub fn job_filter(&self) -> String {
        format!("{}.job.>", self.prefix)
    }

    pub fn event_filter(&self) -> String {
        format!("{}.evt.>", self.prefix)
    }

    /// Every event about one instance: `<prefix>.evt.*.*.<instance>.*`.
    pub fn instance_event_filter(&self, instance: &str) -> String {
        format!("{}.evt.*.*.{instance}.*", self.prefix)
    }

    /// `<prefix>.evt.<campaign>.<workflow>.<instance>.<kind>`.
    pub fn event(&self, campaign: &str, workflow: &str, instance: &str, kind: &str) -> String {
        format!(
            "{}.evt.{campaign}.{workflow}.{instance}.{kind}",
            self.prefix
        )
    }

    /// `<prefix>.evt.<campaign>._campaign._.<kind>`: an event about a campaign itself (e.g.
    /// `permit_drift`). It has as many tokens as an instance event, and `_campaign` cannot be
    /// a workflow name (slugs start with `[a-z0-9]`), so `<prefix>.evt.<campaign>.>` takes
    /// both and no instance filter matches it.
    pub fn campaign_event(&self, campaign: &str, kind: &str) -> String {
        format!("{}.evt.{campaign}._campaign._.{kind}", self.prefix)
    }

    /// `<prefix>.signal.<instance>.<event>`: publish (or, better, request) there to deliver
    /// the event `<event>` to an instance; the payload is the event's JSON (empty: `null`).
    pub fn signal(&self, instance: &str, event: &str) -> String {
        format!("{}.signal.{instance}.{event}", self.prefix)
    }

    /// What the api role subscribes to for signals.
    pub fn signal_filter(&self) -> String {
        format!("{}.signal.*.*", self.prefix)
    }

    /// The instance and event name of a signal subject; `None` unless it is exactly
    /// `<prefix>.signal.<uuid>.<slug>`.
    pub fn parse_signal(&self, subject: &str) -> Option<(InstanceId, String)> {
        let rest = subject
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix(".signal.")?;
        let (instance, event) = rest.split_once('.')?;
        let instance = instance.parse().ok()?;
        is_slug(event).then(|| (instance, event.to_owned()))
    }

    /// The inbox prefix of a connection of `user` (`worker`, `node`, …):
    /// `_INBOX.<prefix>.<user>`. Replies to its requests, and pulled messages, arrive below it,
    /// so its NATS user subscribes to its own replies only.
    pub fn inbox_prefix(&self, user: &str) -> String {
        format!("_INBOX.{}.{user}", self.prefix)
    }

    /// Does a user-chosen subject fall inside this cluster's own namespace?
    pub fn is_reserved(&self, subject: &str) -> bool {
        subject == self.prefix
            || subject
                .strip_prefix(self.prefix.as_str())
                .is_some_and(|rest| rest.starts_with('.'))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_derive_from_the_prefix() {
        let s = Subjects::new("t-1a");
        assert_eq!(s.jobs_stream(), "T_1A_JOBS");
        assert_eq!(s.job(&Queue::default()), "t-1a.job.default");
        let gpu: Queue = "gpu".parse().expect("a slug");
        assert_eq!(s.job(&gpu), "t-1a.job.gpu");
        assert_eq!(
            s.event("default", "wf", "id", "completed"),
            "t-1a.evt.default.wf.id.completed"
        );
        assert_eq!(
            s.campaign_event("spring", "permit_drift"),
            "t-1a.evt.spring._campaign._.permit_drift"
        );
        assert!(s.is_reserved("t-1a.x"));
        assert!(!s.is_reserved("t-1ab.x"));
        assert!(!is_valid_prefix("a.b"));

        let id = InstanceId::new();
        let subject = s.signal(&id.to_string(), "approved");
        assert_eq!(subject, format!("t-1a.signal.{id}.approved"));
        assert_eq!(s.parse_signal(&subject), Some((id, "approved".to_owned())));
        assert_eq!(s.signal_filter(), "t-1a.signal.*.*");
        for garbage in [
            format!("t-1a.signal.{id}"),
            format!("t-1a.signal.{id}.Approved"),
            format!("t-1a.signal.{id}.a.b"),
            "t-1a.signal.not-a-uuid.approved".to_owned(),
            format!("t-1b.signal.{id}.approved"),
            format!("t-1a.evt.{id}.approved"),
        ] {
            assert_eq!(s.parse_signal(&garbage), None, "{garbage}");
        }
        assert!(!is_valid_prefix("a>"));
    }
}
