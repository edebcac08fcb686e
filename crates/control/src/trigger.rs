//! Why a data site takes a group over, and whether that reason still holds
//! when the takeover starts.

/// Why a takeover runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TakeoverTrigger {
    /// An operator promotes this site and accepts the loss.
    Operator,
    /// This site's owner check found the owner of the group's epoch
    /// `epoch` holding no lease.
    OwnerLost {
        /// The group's epoch when the check found its owner lease-less.
        epoch: u64,
    },
}

impl TakeoverTrigger {
    /// Whether the takeover is the automatic one (survivors offer their
    /// images and the newest goes on) rather than an operator's.
    pub fn automatic(self) -> bool {
        self != Self::Operator
    }

    /// Whether the takeover may still run against the group at `epoch`.
    /// The owner check and the takeover read the metadata at different
    /// times: if another survivor took the group (or its owner moved it)
    /// in between, its new owner holds a lease, and taking the group from
    /// it would cut a live owner off. Whether the new owner holds a lease
    /// is for the next check to say. An operator's promotion runs against
    /// whoever owns the group: the operator accepted that.
    pub fn still_applies(self, epoch: u64) -> bool {
        match self {
            Self::Operator => true,
            Self::OwnerLost { epoch: seen } => seen == epoch,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::TakeoverTrigger;

    #[test]
    fn a_lost_owner_takeover_runs_only_against_the_epoch_the_check_saw() {
        let trigger = TakeoverTrigger::OwnerLost { epoch: 3 };
        assert!(trigger.automatic());
        assert!(trigger.still_applies(3));
        assert!(
            !trigger.still_applies(4),
            "another survivor took the group meanwhile"
        );
        assert!(!trigger.still_applies(2));
    }

    #[test]
    fn an_operator_promotion_runs_against_any_epoch() {
        let trigger = TakeoverTrigger::Operator;
        assert!(!trigger.automatic());
        assert!(trigger.still_applies(3));
        assert!(trigger.still_applies(4));
    }
}
