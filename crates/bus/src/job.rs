//! The job wire format: msgpack with named fields and a version: ids, and the route of the
//! step. The job itself is the domain's [`StepJob`]; only its encoding lives here.

use drover_core::{Fence, InstanceId, Queue, Route, StepJob, StepSeq};
use serde::{Deserialize, Serialize};

/// The version of the job and recovery-task wire formats; new fields get `#[serde(default)]`.
pub(crate) const VERSION: u8 = 1;

/// A [`StepJob`] on the wire.
#[derive(Serialize, Deserialize)]
struct Wire {
    v: u8,
    instance: InstanceId,
    step_seq: StepSeq,
    fence: Fence,
    /// The worker queue it is published to (`<prefix>.job.<queue>`).
    #[serde(default)]
    queue: Queue,
    /// The handler a `handler` step needs: a worker without it leaves the job to one that has
    /// it, without claiming.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    handler: Option<String>,
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

/// The deterministic message id of `job`: a re-dispatch of the same job is deduplicated.
pub(crate) fn msg_id(job: &StepJob) -> String {
    format!("j:{}:{}:{}", job.instance, job.step_seq, job.fence)
}

pub fn encode_job(job: &StepJob) -> bytes::Bytes {
    let wire = Wire {
        v: VERSION,
        instance: job.instance,
        step_seq: job.step_seq,
        fence: job.fence,
        queue: job.route.queue.clone(),
        handler: job.route.handler.clone(),
    };
    let bytes = rmp_serde::to_vec_named(&wire).expect("invariant: a StepJob always encodes");
    bytes::Bytes::from(bytes)
}

/// Reads a job message of at most `limit` bytes.
pub fn decode_job(payload: &[u8], limit: usize) -> Result<StepJob, DecodeError> {
    if payload.len() > limit {
        return Err(DecodeError::Oversized {
            size: payload.len(),
            limit,
        });
    }
    let wire: Wire =
        rmp_serde::from_slice(payload).map_err(|e| DecodeError::Malformed(e.to_string()))?;
    if wire.v != VERSION {
        return Err(DecodeError::Version(wire.v));
    }
    Ok(StepJob {
        instance: wire.instance,
        step_seq: wire.step_seq,
        fence: wire.fence,
        route: Route {
            queue: wire.queue,
            handler: wire.handler,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_round_trips_and_garbage_is_rejected() {
        let job = StepJob::new(InstanceId::new(), StepSeq(3), Fence(7), Route::default());
        let bytes = encode_job(&job);
        assert!(bytes.len() < 100, "jobs stay small: {} bytes", bytes.len());
        assert_eq!(decode_job(&bytes, 4096).ok(), Some(job.clone()));
        let route = Route {
            queue: "gpu".parse().expect("a slug"),
            handler: Some("greet".into()),
        };
        let routed = StepJob::new(job.instance, job.step_seq, job.fence, route.clone());
        let decoded = decode_job(&encode_job(&routed), 4096).expect("decodes");
        assert_eq!(decoded.route, route);
        assert!(matches!(
            decode_job(b"\xff\x00garbage", 4096),
            Err(DecodeError::Malformed(_))
        ));
        assert!(matches!(
            decode_job(&[0u8; 5000], 4096),
            Err(DecodeError::Oversized { .. })
        ));
        assert!(msg_id(&job).starts_with("j:"));
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
        let job = decode_job(&bytes, 4096).expect("decodes");
        assert_eq!(job.instance, before.instance);
        assert_eq!(job.route, Route::default());
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
            v: VERSION,
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
        if task.v != VERSION {
            return Err(DecodeError::Version(task.v));
        }
        Ok(task)
    }
}
