//! Where the metadata's Raft leadership belongs.
//!
//! Raft replicates only from the leader: a voter the leader cannot reach
//! applies nothing new, and a data site behind on the metadata gets no
//! ownership lease (the voters fence it until it applied every change that
//! took a group from it). So the leader should be a voter that reaches
//! every other one: the witness whenever it does (a later cut between two
//! data sites then leaves both applying every change), else any voter
//! that does. A leader that reaches every voter keeps leading unless the
//! witness reaches them all too.

/// One voter the leader reaches, and whether that voter said it reaches
/// every other voter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reach {
    pub voter: u64,
    pub reaches_all: bool,
}

/// The voter the current leader should hand leadership to, if any.
/// `leader_reaches_all`: whether the leader reaches every other voter;
/// `witness`: the witness's id unless the leader is the witness;
/// `reached`: the voters the leader reaches, with what each said.
pub fn hand_leadership_to(
    leader_reaches_all: bool,
    witness: Option<u64>,
    reached: &[Reach],
) -> Option<u64> {
    if let Some(witness) = witness
        && reached
            .iter()
            .any(|reach| reach.voter == witness && reach.reaches_all)
    {
        return Some(witness);
    }
    if leader_reaches_all {
        return None;
    }
    reached
        .iter()
        .find(|reach| reach.reaches_all)
        .map(|reach| reach.voter)
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: u64 = 1;
    const B: u64 = 2;
    const W: u64 = 3;

    fn reach(voter: u64, reaches_all: bool) -> Reach {
        Reach { voter, reaches_all }
    }

    #[test]
    fn a_data_leader_hands_to_a_witness_that_reaches_everyone() {
        assert_eq!(
            hand_leadership_to(true, Some(W), &[reach(B, true), reach(W, true)]),
            Some(W)
        );
    }

    #[test]
    fn a_leader_cut_from_a_voter_hands_to_one_that_reaches_all() {
        // a–b cut, a leads: the witness reaches both.
        assert_eq!(
            hand_leadership_to(false, Some(W), &[reach(W, true)]),
            Some(W)
        );
        // a–w cut, the witness leads: b reaches both.
        assert_eq!(hand_leadership_to(false, None, &[reach(B, true)]), Some(B));
    }

    #[test]
    fn no_hand_over_to_a_witness_that_misses_a_voter_so_leadership_does_not_bounce() {
        // b leads after a–w was cut: the witness does not reach a.
        assert_eq!(
            hand_leadership_to(true, Some(W), &[reach(A, true), reach(W, false)]),
            None
        );
    }

    #[test]
    fn no_voter_reaches_all_leaves_the_leader_in_place() {
        assert_eq!(hand_leadership_to(false, None, &[reach(B, false)]), None);
        assert_eq!(hand_leadership_to(false, Some(W), &[]), None);
    }
}
