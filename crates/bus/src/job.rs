//! The `StepJob` wire format: msgpack with named fields and a version: ids, and the route of
//! the step.

use drover_core::{Fence, InstanceId, Queue, Route, StepSeq};
use serde::{Deserialize, Serialize};

/// "Run the current step of `instance`, at checkpoint `step_seq`, under `fence`."
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepJob {
    /// Wire version; new fields get `#[serde(default)]`.
    pub v: u8,
    pub instance: InstanceId,
    pub step_seq: StepSeq,
    pub fence: Fence,
    /// The worker queue it is published to (`<prefix>.job.<queue>`).
    #[serde(default)]
    pub queue: Queue,
    /// The handler a `handler` step needs: a worker without it leaves the job to one that has
    /// it, without claiming.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handler: Option<String>,
}

/// Why a job message could not be read.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("job message of {size} bytes exceeds the limit of {limit}")]
    Oversized { size: usize, limit: usize },
    #[error("job message is not a step job: {0}")]
    Malformed(String),
    #[error("job message has unsupported version {0}")]
    Version(u8),
}

impl StepJob {
    pub const VERSION: u8 = 1;

    pub fn new(instance: InstanceId, step_seq: StepSeq, fence: Fence, route: Route) -> Self {
        Self {
            v: Self::VERSION,
            instance,
            step_seq,
            fence,
            queue: route.queue,
            handler: route.handler,
        }
    }

    /// Where it goes and what it needs.
    pub fn route(&self) -> Route {
        Route {
            queue: self.queue.clone(),
            handler: self.handler.clone(),
        }
    }

    /// The deterministic message id: a re-dispatch of the same job is deduplicated.
    pub fn msg_id(&self) -> String {
        format!("j:{}:{}:{}", self.instance, self.step_seq, self.fence)
    }

    pub fn encode(&self) -> bytes::Bytes {
        let bytes = rmp_serde::to_vec_named(self).expect("invariant: a StepJob always encodes");
        bytes::Bytes::from(bytes)
    }

    pub fn decode(payload: &[u8], limit: usize) -> Result<Self, DecodeError> {
        if payload.len() > limit {
            return Err(DecodeError::Oversized {
                size: payload.len(),
                limit,
            });
        }
        let job: StepJob =
            rmp_serde::from_slice(payload).map_err(|e| DecodeError::Malformed(e.to_string()))?;
        if job.v != Self::VERSION {
            return Err(DecodeError::Version(job.v));
        }
        Ok(job)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_round_trips_and_garbage_is_rejected() {
        let job = StepJob::new(InstanceId::new(), StepSeq(3), Fence(7), Route::default());
        let bytes = job.encode();
        assert!(bytes.len() < 100, "jobs stay small: {} bytes", bytes.len());
        assert_eq!(StepJob::decode(&bytes, 4096).ok(), Some(job.clone()));
        let route = Route {
            queue: "gpu".parse().expect("a slug"),
            handler: Some("greet".into()),
        };
        let routed = StepJob::new(job.instance, job.step_seq, job.fence, route.clone());
        let decoded = StepJob::decode(&routed.encode(), 4096).expect("decodes");
        assert_eq!(decoded.route(), route);
        assert!(matches!(
            StepJob::decode(b"\xff\x00garbage", 4096),
            Err(DecodeError::Malformed(_))
        ));
        assert!(matches!(
            StepJob::decode(&[0u8; 5000], 4096),
            Err(DecodeError::Oversized { .. })
        ));
        assert!(job.msg_id().starts_with("j:"));
    }

    #[test]
    fn a_job_published_before_queues_reads_as_the_default_queue() {
        #[derive(Serialize)]
        struct Before {
            v: u8,
            instance: InstanceId,
            step_seq: StepSeq,
            fence: Fence,
        }
        let before = Before {
            v: 1,
            instance: InstanceId::new(),
            step_seq: StepSeq(1),
            fence: Fence(2),
        };
        let bytes = rmp_serde::to_vec_named(&before).expect("encodes");
        let job = StepJob::decode(&bytes, 4096).expect("decodes");
        assert_eq!(job.instance, before.instance);
        assert_eq!(job.route(), Route::default());
    }
}

/// "Take back the instances of dead node `node`": one per dead node, consumed by every
/// coordinator (a work queue), so requeue work spreads and survives a coordinator's death.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoveryTask {
    pub v: u8,
    pub node: drover_core::NodeId,
    /// The leader term that published it (for the logs; the requeue itself is safe anyway).
    pub term: i64,
}

impl RecoveryTask {
    pub fn new(node: drover_core::NodeId, term: i64) -> Self {
        Self {
            v: StepJob::VERSION,
            node,
            term,
        }
    }

    pub fn encode(&self) -> bytes::Bytes {
        let bytes =
            rmp_serde::to_vec_named(self).expect("invariant: a RecoveryTask always encodes");
        bytes::Bytes::from(bytes)
    }

    pub fn decode(payload: &[u8]) -> Result<Self, DecodeError> {
        if payload.len() > 4096 {
            return Err(DecodeError::Oversized {
                size: payload.len(),
                limit: 4096,
            });
        }
        let task: RecoveryTask =
            rmp_serde::from_slice(payload).map_err(|e| DecodeError::Malformed(e.to_string()))?;
        if task.v != StepJob::VERSION {
            return Err(DecodeError::Version(task.v));
        }
        Ok(task)
    }
}
