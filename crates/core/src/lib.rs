//! Drover's pure domain: identifiers, workflow definitions and their validation, CEL
//! expressions, the instance state machine and the operator commands' decision table, and the
//! back-off bookkeeping every long-running
//! loop shares. Nothing here does I/O.

pub mod backoff;
pub mod definition;
pub mod event;
pub mod expr;
pub mod ids;
pub mod job;
pub mod lifecycle;
pub mod list;
pub mod route;
pub mod schedule;
pub mod scope;
pub mod state;
pub mod subject;

/// An error and its causes, `: `-separated, each cause left out when the text before already
/// says it (many libraries repeat their source in their own message) or says nothing
/// (hyper's `client error (Connect)`): so a failure is printed once, its root cause included.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        let wrapper = cause_text.starts_with("client error (") && cause.source().is_some();
        if !cause_text.is_empty() && !wrapper && !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

pub use definition::{Definition, DefinitionError, DefinitionErrors, Severity, Step, StepKind};
pub use event::{EventKind, Fact};
pub use ids::{CampaignId, Fence, InstanceId, NodeId, ScheduleId, SignalId, StepSeq};
pub use job::StepJob;
pub use route::{Queue, Route};
pub use scope::Scope;
pub use state::InstanceState;
pub use subject::{PublishPolicy, SubjectAllowList, SubjectPattern};

#[cfg(test)]
mod tests {
    #[derive(Debug, thiserror::Error)]
    #[error("{text}")]
    struct Layer {
        text: &'static str,
        #[source]
        source: Option<Box<Layer>>,
    }

    fn layers(texts: &[&'static str]) -> Layer {
        texts
            .iter()
            .rev()
            .fold(None, |source, text| {
                Some(Layer {
                    text,
                    source: source.map(Box::new),
                })
            })
            .expect("invariant: at least one layer")
    }

    #[test]
    fn an_error_chain_names_each_cause_once_and_keeps_the_root_cause() {
        let err = layers(&[
            "error sending request for url (http://127.0.0.1:9/)",
            "client error (Connect)",
            "tcp connect error",
            "Connection refused (os error 111)",
        ]);
        assert_eq!(
            super::error_chain(&err),
            "error sending request for url (http://127.0.0.1:9/): tcp connect error: \
             Connection refused (os error 111)"
        );
        let err = layers(&[
            "connecting to NATS: connection refused",
            "connection refused",
        ]);
        assert_eq!(
            super::error_chain(&err),
            "connecting to NATS: connection refused"
        );
    }
}
