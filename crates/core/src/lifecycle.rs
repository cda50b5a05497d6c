//! The operator lifecycle commands' decision table: which command applies to an instance in
//! which state, and what it does there. Pure: the store reads the instance under its lock,
//! asks [`decide`], and carries the decision out in the same transaction.
//!
//! | command | RUNNING | QUEUED, READY, WAITING | PAUSED | IN_ERROR | STOPPED | COMPLETED, FAILED |
//! | --- | --- | --- | --- | --- | --- | --- |
//! | pause | request (`pause_requested_by`) | PAUSED now | no-op | refused | refused | refused |
//! | unpause | withdraws a pause request, else refused | no-op (withdraws a pending pause request) | READY / QUEUED / WAITING | refused | refused | refused |
//! | stop | request (`stop_requested_by`) | STOPPED now | STOPPED now | STOPPED now | no-op | refused |
//! | kill | STOPPED now | STOPPED now | STOPPED now | STOPPED now | no-op | refused |
//! | restart | refused | refused | refused | refused | new instance | new instance |
//!
//! A pause asked of a RUNNING instance that is being stopped is refused; asked again while
//! one is pending, it is a no-op, as is a stop asked again. A stop or kill takes the
//! instance's live descendants with it ([`decide_descendant`]); a restart is refused for a
//! child instance, whose parent's step decides about it ([`restart_refusal`]).

use crate::ids::InstanceId;
use crate::state::InstanceState;

/// A lifecycle command applied to existing instances.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LifecycleAction {
    Pause,
    Unpause,
    /// Graceful: a running step finishes first.
    Stop,
    /// Unconditional: fenced at once, whatever its node is doing.
    Kill,
}

impl LifecycleAction {
    pub const ALL: [LifecycleAction; 4] = [Self::Pause, Self::Unpause, Self::Stop, Self::Kill];

    /// The action's name, as audited (`pause`, `unpause`, `stop`, `kill`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pause => "pause",
            Self::Unpause => "unpause",
            Self::Stop => "stop",
            Self::Kill => "kill",
        }
    }
}

/// Why a command does not apply to an instance in its state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// It has finished (`completed`, `failed`, or `stopped` for pause/unpause).
    Finished,
    /// It is `in_error`: it waits for an operator already (resume, stop or kill it).
    InError,
    /// Unpause of a RUNNING instance with no pause requested.
    Running,
    /// Pause of a RUNNING instance that is being stopped (asked by `by`).
    Stopping { by: String },
    /// Restart of an instance that has not finished.
    NotFinished,
    /// Restart of a child instance: its parent's step decides about it.
    Child { parent: InstanceId },
}

/// The operator requests pending on an instance: who asked it to pause or to stop, if anyone.
/// Only a RUNNING instance keeps a stop request; a pause request also outlives a step that
/// parked its instance in WAITING.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Requests<'a> {
    pub pause: Option<&'a str>,
    pub stop: Option<&'a str>,
}

/// What a command does to one instance.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// It is in the state the command leads to already, or the request is pending: nothing
    /// done, nothing written.
    Unchanged,
    Refused(Refusal),
    /// RUNNING: ask it to pause; its step's commit honours the request.
    RequestPause,
    /// Withdraw the pending pause request; the state does not change.
    WithdrawPause,
    /// RUNNING: ask it to stop; its step's commit honours the request.
    RequestStop,
    /// PAUSED now.
    Pause,
    /// Out of PAUSED: WAITING again if its wait is still pending, else READY, or QUEUED when
    /// it needs a permit its campaign has not free.
    Unpause,
    /// STOPPED now, and its live descendants with it (see [`decide_descendant`]).
    Stop,
}

impl Decision {
    /// The state the instance is in afterwards, when the table alone says: `None` for
    /// [`Decision::Unpause`], whose target depends on its wait and its campaign's permits.
    pub fn leads_to(&self, from: InstanceState) -> Option<InstanceState> {
        match self {
            Self::Unchanged
            | Self::Refused(_)
            | Self::RequestPause
            | Self::WithdrawPause
            | Self::RequestStop => Some(from),
            Self::Pause => Some(InstanceState::Paused),
            Self::Unpause => None,
            Self::Stop => Some(InstanceState::Stopped),
        }
    }
}

/// What `action` does to an instance in `state` with `requests` pending (the module's table).
pub fn decide(action: LifecycleAction, state: InstanceState, requests: Requests<'_>) -> Decision {
    use InstanceState as S;
    use LifecycleAction as A;
    match (action, state) {
        (A::Stop | A::Kill, S::Stopped) => Decision::Unchanged,
        (_, S::Completed | S::Failed | S::Stopped) => Decision::Refused(Refusal::Finished),
        (A::Pause | A::Unpause, S::InError) => Decision::Refused(Refusal::InError),

        (A::Pause, S::Paused) => Decision::Unchanged,
        (A::Pause, S::Running) => match (requests.stop, requests.pause) {
            (Some(by), _) => Decision::Refused(Refusal::Stopping { by: by.to_owned() }),
            (None, Some(_)) => Decision::Unchanged,
            (None, None) => Decision::RequestPause,
        },
        (A::Pause, S::Queued | S::Ready | S::Waiting) => Decision::Pause,

        // A pause asked of a running step that ended in a wait is still pending: unpause
        // withdraws it.
        (A::Unpause, S::Queued | S::Ready | S::Waiting | S::Running) => {
            match (requests.pause, state) {
                (Some(_), _) => Decision::WithdrawPause,
                (None, S::Running) => Decision::Refused(Refusal::Running),
                (None, _) => Decision::Unchanged,
            }
        }
        (A::Unpause, S::Paused) => Decision::Unpause,

        (A::Stop, S::Running) => match requests.stop {
            Some(_) => Decision::Unchanged,
            None => Decision::RequestStop,
        },
        (A::Stop | A::Kill, _) => Decision::Stop,
    }
}

/// What a stop or kill of an ancestor does to one of its descendants.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cascade {
    /// Finished already, or asked to stop already: left alone.
    Skip,
    /// RUNNING under a graceful stop: asked to stop, like its ancestor would be.
    RequestStop,
    /// STOPPED now.
    Stop,
}

/// What `action` (a stop or a kill of an ancestor) does to a descendant in `state`: a kill
/// stops every live one at once; a graceful stop lets a running step finish.
pub fn decide_descendant(
    action: LifecycleAction,
    state: InstanceState,
    stop_requested: bool,
) -> Cascade {
    if state.is_terminal() {
        Cascade::Skip
    } else if action == LifecycleAction::Stop && state == InstanceState::Running {
        if stop_requested {
            Cascade::Skip
        } else {
            Cascade::RequestStop
        }
    } else {
        Cascade::Stop
    }
}

/// Why an instance in `state`, child of `parent` if it has one, cannot be restarted; `None`:
/// it can (unless restarted before, which the store knows).
pub fn restart_refusal(state: InstanceState, parent: Option<InstanceId>) -> Option<Refusal> {
    if !state.is_terminal() {
        Some(Refusal::NotFinished)
    } else {
        parent.map(|parent| Refusal::Child { parent })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    use InstanceState as S;
    use LifecycleAction as A;

    const NONE: Requests<'static> = Requests {
        pause: None,
        stop: None,
    };

    /// The table of the module docs, row by row, with no request pending.
    #[test]
    fn the_table_with_no_request_pending() {
        use Decision as D;
        let refused = |refusal| D::Refused(refusal);
        let rows: [(A, [D; 9]); 4] = [
            (
                A::Pause,
                [
                    D::Pause,
                    D::Pause,
                    D::RequestPause,
                    D::Pause,
                    D::Unchanged,
                    refused(Refusal::InError),
                    refused(Refusal::Finished),
                    refused(Refusal::Finished),
                    refused(Refusal::Finished),
                ],
            ),
            (
                A::Unpause,
                [
                    D::Unchanged,
                    D::Unchanged,
                    refused(Refusal::Running),
                    D::Unchanged,
                    D::Unpause,
                    refused(Refusal::InError),
                    refused(Refusal::Finished),
                    refused(Refusal::Finished),
                    refused(Refusal::Finished),
                ],
            ),
            (
                A::Stop,
                [
                    D::Stop,
                    D::Stop,
                    D::RequestStop,
                    D::Stop,
                    D::Stop,
                    D::Stop,
                    refused(Refusal::Finished),
                    refused(Refusal::Finished),
                    D::Unchanged,
                ],
            ),
            (
                A::Kill,
                [
                    D::Stop,
                    D::Stop,
                    D::Stop,
                    D::Stop,
                    D::Stop,
                    D::Stop,
                    refused(Refusal::Finished),
                    refused(Refusal::Finished),
                    D::Unchanged,
                ],
            ),
        ];
        for (action, expected) in rows {
            for (state, expected) in S::ALL.into_iter().zip(expected) {
                assert_eq!(
                    decide(action, state, NONE),
                    expected,
                    "{action:?} of {state}"
                );
            }
        }
    }

    #[test]
    fn a_pause_is_asked_of_a_running_instance_once_and_not_while_it_stops() {
        let pausing = Requests {
            pause: Some("ann"),
            stop: None,
        };
        let stopping = Requests {
            pause: None,
            stop: Some("bob"),
        };
        assert_eq!(decide(A::Pause, S::Running, pausing), Decision::Unchanged);
        assert_eq!(
            decide(A::Pause, S::Running, stopping),
            Decision::Refused(Refusal::Stopping { by: "bob".into() })
        );
        assert_eq!(decide(A::Stop, S::Running, stopping), Decision::Unchanged);
        assert_eq!(decide(A::Stop, S::Running, pausing), Decision::RequestStop);
        assert_eq!(decide(A::Kill, S::Running, stopping), Decision::Stop);
    }

    #[test]
    fn unpause_withdraws_a_pending_pause_request_in_any_unfinished_unpaused_state() {
        let pausing = Requests {
            pause: Some("ann"),
            stop: None,
        };
        for state in [S::Queued, S::Ready, S::Running, S::Waiting] {
            assert_eq!(
                decide(A::Unpause, state, pausing),
                Decision::WithdrawPause,
                "{state}"
            );
        }
        assert_eq!(decide(A::Unpause, S::Paused, pausing), Decision::Unpause);
    }

    #[test]
    fn a_stop_lets_running_descendants_finish_their_step_and_a_kill_does_not() {
        assert_eq!(
            decide_descendant(A::Stop, S::Running, false),
            Cascade::RequestStop
        );
        assert_eq!(decide_descendant(A::Stop, S::Running, true), Cascade::Skip);
        assert_eq!(decide_descendant(A::Kill, S::Running, true), Cascade::Stop);
        for state in S::ALL {
            let expected = if state.is_terminal() {
                Cascade::Skip
            } else if state == S::Running {
                Cascade::RequestStop
            } else {
                Cascade::Stop
            };
            assert_eq!(
                decide_descendant(A::Stop, state, false),
                expected,
                "{state}"
            );
        }
    }

    #[test]
    fn only_a_finished_top_level_instance_can_be_restarted() {
        let parent = InstanceId(uuid::Uuid::nil());
        for state in S::ALL {
            let expected = if state.is_terminal() {
                None
            } else {
                Some(Refusal::NotFinished)
            };
            assert_eq!(restart_refusal(state, None), expected, "{state}");
        }
        assert_eq!(
            restart_refusal(S::Completed, Some(parent)),
            Some(Refusal::Child { parent })
        );
        assert_eq!(
            restart_refusal(S::Running, Some(parent)),
            Some(Refusal::NotFinished)
        );
    }

    /// The requests left on the instance once `decision` is carried out (as the store does).
    fn requests_after<'a>(decision: &Decision, before: Requests<'a>) -> Requests<'a> {
        match decision {
            Decision::Unchanged | Decision::Refused(_) => before,
            Decision::RequestPause => Requests {
                pause: Some("op"),
                ..before
            },
            Decision::RequestStop => Requests {
                pause: None,
                stop: Some("op"),
            },
            Decision::WithdrawPause => Requests {
                pause: None,
                ..before
            },
            Decision::Pause | Decision::Unpause | Decision::Stop => NONE,
        }
    }

    fn any_state() -> impl Strategy<Value = InstanceState> {
        prop::sample::select(S::ALL.to_vec())
    }

    fn any_action() -> impl Strategy<Value = LifecycleAction> {
        prop::sample::select(A::ALL.to_vec())
    }

    fn any_requests() -> impl Strategy<Value = Requests<'static>> {
        (prop::option::of(Just("ann")), prop::option::of(Just("bob")))
            .prop_map(|(pause, stop)| Requests { pause, stop })
    }

    proptest! {
        #[test]
        fn a_command_repeated_changes_nothing_the_second_time(
            action in any_action(),
            state in any_state(),
            requests in any_requests(),
            unpaused_to in prop::sample::select(vec![S::Ready, S::Queued, S::Waiting]),
        ) {
            let first = decide(action, state, requests);
            let state = first.leads_to(state).unwrap_or(unpaused_to);
            let second = decide(action, state, requests_after(&first, requests));
            prop_assert!(
                matches!(second, Decision::Unchanged | Decision::Refused(_)),
                "{:?} then {:?}", first, second
            );
        }

        #[test]
        fn finished_instances_never_change_and_only_running_ones_take_requests(
            action in any_action(),
            state in any_state(),
            requests in any_requests(),
        ) {
            let decision = decide(action, state, requests);
            if state.is_terminal() {
                prop_assert!(matches!(decision, Decision::Unchanged | Decision::Refused(Refusal::Finished)));
            }
            if state != S::Running {
                prop_assert!(!matches!(decision, Decision::RequestPause | Decision::RequestStop));
            }
            if action == A::Kill && !state.is_terminal() {
                prop_assert_eq!(decision, Decision::Stop);
            }
        }
    }
}
