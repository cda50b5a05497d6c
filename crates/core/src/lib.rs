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

pub use definition::{Definition, DefinitionError, DefinitionErrors, Severity, Step, StepKind};
pub use event::{EventKind, Fact};
pub use ids::{CampaignId, Fence, InstanceId, NodeId, ScheduleId, SignalId, StepSeq};
pub use job::StepJob;
pub use route::{Queue, Route};
pub use scope::Scope;
pub use state::InstanceState;
pub use subject::{PublishPolicy, SubjectAllowList, SubjectPattern};
