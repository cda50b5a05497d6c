//! Drover's pure domain: identifiers, workflow definitions and their validation, CEL
//! expressions, and the instance state machine. Nothing here does I/O.

pub mod definition;
pub mod event;
pub mod expr;
pub mod ids;
pub mod scope;
pub mod state;
pub mod subject;

pub use definition::{Definition, DefinitionError, DefinitionErrors, Step, StepKind};
pub use event::OutboxEvent;
pub use ids::{CampaignId, Fence, InstanceId, NodeId, SignalId, StepSeq};
pub use scope::Scope;
pub use state::InstanceState;
pub use subject::{PublishPolicy, SubjectAllowList, SubjectPattern};
