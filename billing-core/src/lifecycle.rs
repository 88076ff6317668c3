//! The subscription state machine: every allowed transition, and nothing else.
//!
//! | from \ event      | trial_ended | payment_failed | payment_succeeded | grace_expired | cancel_now | period_ended | change_plan_now | schedule_change / schedule_cancel / resume / set_auto_renew |
//! |-------------------|-------------|----------------|-------------------|---------------|------------|--------------|-----------------|--------------------------------------------------------------|
//! | trialing          | active      | —              | —                 | —             | canceled   | see below    | canceled (replaced) | trialing                                                 |
//! | active            | —           | past_due       | active            | —             | canceled   | see below    | canceled (replaced) | active                                                   |
//! | past_due          | —           | past_due       | active            | canceled      | canceled   | past_due     | —               | —                                                            |
//! | canceled, expired | —           | —              | —                 | —             | —          | —            | —               | —                                                            |
//!
//! `period_ended` (the end of a billing period was reached) leads to `canceled` when a cancel at
//! period end was scheduled, to `expired` when auto-renew is off, and otherwise renews (the
//! status stays). A past-due subscription keeps its status across period ends until it is paid
//! (`payment_succeeded`) or its grace period runs out (`grace_expired` → canceled).
//! `canceled` and `expired` are final: a customer who comes back gets a new subscription.
//!
//! A plan change takes effect as a new subscription (the new plan version) starting the instant
//! the old one ends; the old one ends `canceled` and names its successor (`replaced_by`), and the
//! new one starts in the old one's status. A past-due subscription cannot change plan until paid.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    Trialing,
    Active,
    PastDue,
    Canceled,
    Expired,
}

impl Status {
    pub const ALL: [Status; 5] = [
        Status::Trialing,
        Status::Active,
        Status::PastDue,
        Status::Canceled,
        Status::Expired,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Trialing => "trialing",
            Status::Active => "active",
            Status::PastDue => "past_due",
            Status::Canceled => "canceled",
            Status::Expired => "expired",
        }
    }

    pub fn parse(s: &str) -> Option<Status> {
        Status::ALL.into_iter().find(|x| x.as_str() == s)
    }

    /// Canceled and expired subscriptions never change again.
    pub fn is_final(self) -> bool {
        matches!(self, Status::Canceled | Status::Expired)
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What happens to a subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Event {
    TrialEnded,
    PaymentFailed,
    PaymentSucceeded,
    GraceExpired,
    CancelNow,
    /// The end of a billing period was reached.
    PeriodEnded {
        cancel_at_period_end: bool,
        auto_renew: bool,
    },
    /// Upgrade or downgrade now (this subscription ends; a new one takes over).
    ChangePlanNow,
    /// Upgrade or downgrade at the end of the current period.
    ScheduleChange,
    ScheduleCancel,
    /// Undo a scheduled cancel or plan change.
    Resume,
    SetAutoRenew,
}

impl Event {
    pub fn name(self) -> &'static str {
        match self {
            Event::TrialEnded => "trial_ended",
            Event::PaymentFailed => "payment_failed",
            Event::PaymentSucceeded => "payment_succeeded",
            Event::GraceExpired => "grace_expired",
            Event::CancelNow => "cancel_now",
            Event::PeriodEnded { .. } => "period_ended",
            Event::ChangePlanNow => "change_plan_now",
            Event::ScheduleChange => "schedule_change",
            Event::ScheduleCancel => "schedule_cancel",
            Event::Resume => "resume",
            Event::SetAutoRenew => "set_auto_renew",
        }
    }
}

/// A transition the machine does not allow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a {from} subscription cannot take `{event}`")]
pub struct Refused {
    pub from: Status,
    pub event: &'static str,
}

/// The status after `event`, or why not.
pub fn next(from: Status, event: Event) -> Result<Status, Refused> {
    use Event::*;
    use Status::*;
    let to = match (from, event) {
        (Trialing, TrialEnded) => Active,
        (Active, PaymentFailed) | (PastDue, PaymentFailed) => PastDue,
        (Active, PaymentSucceeded) | (PastDue, PaymentSucceeded) => Active,
        (PastDue, GraceExpired) => Canceled,
        (Trialing | Active | PastDue, CancelNow) => Canceled,
        (PastDue, PeriodEnded { .. }) => PastDue,
        (
            Trialing | Active,
            PeriodEnded {
                cancel_at_period_end,
                auto_renew,
            },
        ) => {
            if cancel_at_period_end {
                Canceled
            } else if !auto_renew {
                Expired
            } else {
                from
            }
        }
        (Trialing | Active, ChangePlanNow) => Canceled,
        (Trialing | Active, ScheduleChange | ScheduleCancel | Resume | SetAutoRenew) => from,
        _ => {
            return Err(Refused {
                from,
                event: event.name(),
            })
        }
    };
    Ok(to)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events() -> Vec<Event> {
        let mut v = vec![
            Event::TrialEnded,
            Event::PaymentFailed,
            Event::PaymentSucceeded,
            Event::GraceExpired,
            Event::CancelNow,
            Event::ChangePlanNow,
            Event::ScheduleChange,
            Event::ScheduleCancel,
            Event::Resume,
            Event::SetAutoRenew,
        ];
        for c in [false, true] {
            for a in [false, true] {
                v.push(Event::PeriodEnded {
                    cancel_at_period_end: c,
                    auto_renew: a,
                });
            }
        }
        v
    }

    /// The table of the module documentation, cell by cell (`None`: refused).
    fn expected(from: Status, e: Event) -> Option<Status> {
        use Status::*;
        match e {
            Event::TrialEnded => (from == Trialing).then_some(Active),
            Event::PaymentFailed => matches!(from, Active | PastDue).then_some(PastDue),
            Event::PaymentSucceeded => matches!(from, Active | PastDue).then_some(Active),
            Event::GraceExpired => (from == PastDue).then_some(Canceled),
            Event::CancelNow => (!from.is_final()).then_some(Canceled),
            Event::PeriodEnded {
                cancel_at_period_end,
                auto_renew,
            } => match from {
                PastDue => Some(PastDue),
                Trialing | Active if cancel_at_period_end => Some(Canceled),
                Trialing | Active if !auto_renew => Some(Expired),
                Trialing | Active => Some(from),
                _ => None,
            },
            Event::ChangePlanNow => matches!(from, Trialing | Active).then_some(Canceled),
            Event::ScheduleChange | Event::ScheduleCancel | Event::Resume | Event::SetAutoRenew => {
                matches!(from, Trialing | Active).then_some(from)
            }
        }
    }

    #[test]
    fn every_state_times_every_event_follows_the_table() {
        let mut allowed = 0;
        for from in Status::ALL {
            for e in events() {
                let got = next(from, e).ok();
                assert_eq!(got, expected(from, e), "{from} + {e:?}");
                allowed += usize::from(got.is_some());
            }
        }
        assert_eq!(allowed, 31);
    }

    #[test]
    fn final_states_refuse_everything_with_a_clear_error() {
        for from in [Status::Canceled, Status::Expired] {
            for e in events() {
                let err = next(from, e).expect_err("final");
                assert_eq!(err.from, from);
                assert!(err.to_string().contains(from.as_str()));
            }
        }
        assert_eq!(
            next(Status::Trialing, Event::PaymentFailed)
                .expect_err("no payment during a trial")
                .to_string(),
            "a trialing subscription cannot take `payment_failed`"
        );
    }
}
