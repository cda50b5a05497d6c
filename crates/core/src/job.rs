//! A job: "run the current step of this instance, at this checkpoint, under this fence". The
//! store hands jobs out (instances made READY), the bus carries them, a worker claims them.
//! A job is only a hint: the claim's compare-and-set on `(step_seq, fence)` decides, so a
//! stale or duplicate job fails its claim and is dropped.

use crate::{Fence, InstanceId, Route, StepSeq};

/// One job: the instance and the checkpoint it was made for, and where it goes (the route of
/// the instance's current step; a claim does not read it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StepJob {
    pub instance: InstanceId,
    pub step_seq: StepSeq,
    pub fence: Fence,
    pub route: Route,
}

impl StepJob {
    pub fn new(instance: InstanceId, step_seq: StepSeq, fence: Fence, route: Route) -> Self {
        Self {
            instance,
            step_seq,
            fence,
            route,
        }
    }
}
