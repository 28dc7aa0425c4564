//! The one classification: every way a message can end maps to a
//! [`Disposition`], and the consumer acts on that alone. A run's end is
//! judged here ([`judge`], [`after_failed_run`]), a ledger failure here
//! ([`on_ledger_error`]); the classes are types, never free strings.

use std::time::Duration;

use crate::execute::RunEnd;
use crate::ledger::{LedgerError, LedgerFailure};

/// What the consumer does with a delivery once the handler is through with it.
/// In every case but `Requeue` the message is acked only after what must be
/// published has been confirmed by the broker.
#[derive(Debug, Clone, PartialEq)]
pub enum Disposition {
    /// Publish the job's result; when `dead` is set also put a copy of the event
    /// on the dead queue; then ack.
    Finished {
        event_id: String,
        job_id: uuid::Uuid,
        /// Outbox rows hold these messages too; clear them after the confirms.
        outbox_written: bool,
        result: Vec<u8>,
        routing_key: &'static str,
        dead: Option<DeadLetter>,
    },
    /// Recorded, nothing to publish: ack.
    Ack,
    /// Not finished yet: republish to the retry queue for `delay`, then ack.
    RetryAfter { delay: Duration, why: String, reason: RetryReason },
    /// Malformed (or poison): to the dead queue with the reason, no result
    /// (there is no job), then ack.
    Reject { reason: String, class: ErrorClass },
    /// Our own infrastructure failed (the database is unreachable, or refused
    /// this message): back through the retry queue without counting an attempt,
    /// so no consumer slot waits. `refused` counts towards
    /// `worker.max_ledger_refusals`.
    InfraRetry { why: String, refused: bool },
}

/// Why a message goes back through a retry queue (the metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryReason {
    /// Another delivery holds the owner's lease; waiting counts nothing.
    OwnerBusy,
    /// The run ended unfinished: one failed run on the job's schedule.
    Unfinished,
    /// Our own infrastructure failed (the ledger); counts nothing.
    Infrastructure,
    /// The handler panicked; counted in the message towards poison.
    Panic,
    /// An operator paused reaper (`reaper pause`): the delivery waits,
    /// unrecorded, and counts nothing.
    Paused,
}

impl RetryReason {
    pub const ALL: [RetryReason; 5] = [
        RetryReason::OwnerBusy,
        RetryReason::Unfinished,
        RetryReason::Infrastructure,
        RetryReason::Panic,
        RetryReason::Paused,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RetryReason::OwnerBusy => "owner_busy",
            RetryReason::Unfinished => "unfinished",
            RetryReason::Infrastructure => "infra",
            RetryReason::Panic => "panic",
            RetryReason::Paused => "paused",
        }
    }
}

/// What a run's end means for its job, before the retry schedule is asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Completed,
    /// Dead-lettered now, with its class and reason.
    Dead(ErrorClass, String),
    /// Unfinished: back to the broker if the schedule has a delay left.
    Retry(String),
    /// An operator cancelled it: it ends `cancelled`, not dead-lettered.
    Cancelled(String),
}

/// The classification of a run's end.
pub fn judge(end: RunEnd) -> Verdict {
    match end.without_nul() {
        RunEnd::Completed => Verdict::Completed,
        RunEnd::Permanent(why) => Verdict::Dead(ErrorClass::Permanent, why),
        RunEnd::Plan(why) => Verdict::Dead(ErrorClass::Plan, why),
        // In use: no retry schedule will change that; an operator replays it later.
        RunEnd::Blocked(why) => Verdict::Dead(ErrorClass::Blocked, why),
        RunEnd::Poison(why) => Verdict::Dead(ErrorClass::Poison, why),
        RunEnd::Unfinished(why) => Verdict::Retry(why),
        RunEnd::Cancelled(why) => Verdict::Cancelled(why),
    }
}

/// After a job's `failed_runs`-th unfinished run: the broker delay before its
/// next run, or, the schedule spent, its dead letter.
pub fn after_failed_run(
    schedule: &[Duration],
    failed_runs: u32,
    why: String,
) -> Result<Duration, (ErrorClass, String)> {
    next_delay(schedule, failed_runs)
        .ok_or_else(|| (ErrorClass::Exhausted, format!("out of retries after {failed_runs} failed runs: {why}")))
}

/// Why a message went to the dead queue. The same word is in the dead copy's
/// `x-reaper-error-class` header, the job's `error_class` column (what
/// `reaper replay --error-class` filters on) and the dead-letter metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Not a valid event (no job was opened).
    Malformed,
    /// Delivered or panicking again and again: the worker may crash on it.
    Poison,
    /// A step failed in a way retrying will not fix (4xx, bad SQL).
    Permanent,
    /// Still failing when the retry schedule was spent.
    Exhausted,
    /// The resources cannot be ordered (a cycle).
    Plan,
    /// A guard says a resource is in use; nothing was deleted.
    Blocked,
}

impl ErrorClass {
    pub const ALL: [ErrorClass; 6] = [
        ErrorClass::Malformed,
        ErrorClass::Poison,
        ErrorClass::Permanent,
        ErrorClass::Exhausted,
        ErrorClass::Plan,
        ErrorClass::Blocked,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::Malformed => "malformed",
            ErrorClass::Poison => "poison",
            ErrorClass::Permanent => "permanent",
            ErrorClass::Exhausted => "exhausted",
            ErrorClass::Plan => "plan",
            ErrorClass::Blocked => "blocked",
        }
    }

    pub fn parse(s: &str) -> Option<ErrorClass> {
        ErrorClass::ALL.into_iter().find(|c| c.as_str() == s)
    }
}

/// A job's dead-lettered event: what its dead copy says (the message itself
/// is built in one place, `broker::dead_letter_headers`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub class: ErrorClass,
    pub reason: String,
    pub job_id: String,
}

/// A ledger failure leaves the job where it was. The message comes back
/// while the database is merely unreachable; data the database can never take
/// (SQLSTATE 21, 22, 23), or an error it gave this message `limit` times in a
/// row (`refusals_before` earlier ones), dead-letters it instead of cycling
/// through the retry queue forever.
pub fn on_ledger_error(e: &LedgerError, refusals_before: u32, limit: u32) -> Disposition {
    match e.failure() {
        LedgerFailure::Data => {
            tracing::error!(error = %e, "the ledger refused the message's data; dead-lettering it");
            Disposition::Reject {
                reason: format!("the ledger cannot store this message: {e}"),
                class: ErrorClass::Permanent,
            }
        }
        LedgerFailure::Refused if refusals_before + 1 >= limit => {
            tracing::error!(error = %e, times = refusals_before + 1, "the ledger keeps refusing the message; dead-lettering it");
            Disposition::Reject {
                reason: format!("the ledger refused this message {} times in a row: {e}", refusals_before + 1),
                class: ErrorClass::Poison,
            }
        }
        failure => {
            tracing::warn!(error = %e, "the ledger failed; the message goes back through the retry queue");
            Disposition::InfraRetry { why: e.to_string(), refused: failure == LedgerFailure::Refused }
        }
    }
}

/// Which broker delay a job gets after its `failed_runs`-th unfinished run, or
/// `None` when the schedule is spent and the job must be dead-lettered.
/// Deliveries after a crash are not runs that failed and do not count here.
pub fn next_delay(schedule: &[Duration], failed_runs: u32) -> Option<Duration> {
    let i = failed_runs.checked_sub(1)? as usize;
    schedule.get(i).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_run_end_has_one_class() {
        let w = || "why\0".to_string();
        assert_eq!(judge(RunEnd::Completed), Verdict::Completed);
        assert_eq!(judge(RunEnd::Permanent(w())), Verdict::Dead(ErrorClass::Permanent, "why".into()), "NUL removed");
        assert_eq!(judge(RunEnd::Plan(w())), Verdict::Dead(ErrorClass::Plan, "why".into()));
        assert_eq!(judge(RunEnd::Blocked(w())), Verdict::Dead(ErrorClass::Blocked, "why".into()));
        assert_eq!(judge(RunEnd::Poison(w())), Verdict::Dead(ErrorClass::Poison, "why".into()));
        assert_eq!(judge(RunEnd::Unfinished(w())), Verdict::Retry("why".into()));
        let s = [Duration::from_secs(10)];
        assert_eq!(after_failed_run(&s, 1, "x".into()), Ok(Duration::from_secs(10)));
        assert_eq!(
            after_failed_run(&s, 2, "x".into()),
            Err((ErrorClass::Exhausted, "out of retries after 2 failed runs: x".into()))
        );
        for c in ErrorClass::ALL {
            assert_eq!(ErrorClass::parse(c.as_str()), Some(c));
        }
    }

    #[test]
    fn the_schedule_is_walked_once_then_spent() {
        let s = [Duration::from_secs(10), Duration::from_secs(60)];
        assert_eq!(next_delay(&s, 1), Some(Duration::from_secs(10)));
        assert_eq!(next_delay(&s, 2), Some(Duration::from_secs(60)));
        assert_eq!(next_delay(&s, 3), None);
        assert_eq!(next_delay(&[], 1), None);
    }
}
