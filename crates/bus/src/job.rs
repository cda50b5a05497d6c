//! The `StepJob` wire format: msgpack with named fields and a version, ids only.

use drover_core::{Fence, InstanceId, StepSeq};
use serde::{Deserialize, Serialize};

/// "Run the current step of `instance`, at checkpoint `step_seq`, under `fence`."
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepJob {
    /// Wire version; new fields get `#[serde(default)]`.
    pub v: u8,
    pub instance: InstanceId,
    pub step_seq: StepSeq,
    pub fence: Fence,
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

    pub fn new(instance: InstanceId, step_seq: StepSeq, fence: Fence) -> Self {
        Self {
            v: Self::VERSION,
            instance,
            step_seq,
            fence,
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
        let job = StepJob::new(InstanceId::new(), StepSeq(3), Fence(7));
        let bytes = job.encode();
        assert!(bytes.len() < 100, "jobs stay small: {} bytes", bytes.len());
        assert_eq!(StepJob::decode(&bytes, 4096).ok(), Some(job));
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
