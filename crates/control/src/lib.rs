//! The control logic of stretch that is ours (not Raft's): ownership
//! leases and the fencing that lets a volume change owner without two sites
//! ever accepting writes for it at once (G1).
//!
//! Like the protocol core, it is a set of deterministic state machines: time
//! comes in as each site's own monotonic [`Timestamp`], nothing reads a
//! clock, nothing does I/O. The node and the simulator drive the same code.
//!
//! The rules (see `DESIGN.md` §4 and the README's control-plane section):
//! - a data site may accept writes and serve strict reads for the groups it
//!   owns only while it holds a **lease** from a majority of the voters
//!   ([`Holder`]); it renews it with every voter directly, not through the
//!   Raft leader, so a cut between two data sites that both still reach the
//!   witness takes nothing away from either;
//! - the holder counts a grant from the moment it *sent* the request, on
//!   its own clock; each voter ([`Grantor`]) promises, on its clock, not to
//!   help take anything from the holder for longer than that, stretched by
//!   the worst clock-rate drift and a margin;
//! - ownership of a group moves away from a site by a Raft entry at some
//!   log index *i*; a voter that applied it **fences** the old owner: it
//!   grants that site again only once the site says it applied *i* too, so
//!   a grant issued after the fence never lets the old owner write the
//!   group it lost;
//! - the new owner starts writing only after a majority of voters, each
//!   having applied *i*, told it how long their older grants to the old
//!   owner may still run, and that time (stretched for drift, plus the
//!   margin) passed on its own clock ([`Takeover`]): every majority the old
//!   owner could hold a lease from contains one of them;
//! - when an owner loses its lease, the survivors offer their images and
//!   the one holding the newest takes each `auto` group over
//!   ([`choose_image`]);
//! - a voter that restarts forgets its grants, so for one promise period
//!   after its start it answers as if it had granted every site a lease
//!   just before.

/// How often each data site asks whether the owners of the groups it does
/// not own still hold their leases (the node and the simulator alike).
pub const OWNER_CHECK_INTERVAL_MS: u64 = 250;
/// How long a survivor of an owner's lost lease waits for the other
/// survivors that hold a lease to offer their images before it takes a
/// group over with its own (see [`choose_image`]).
pub const IMAGE_OFFER_WAIT_MS: u64 = 2_000;
/// How long a question about a site's leases to one voter may take before
/// it counts as unanswered.
pub const LEASE_STATE_TIMEOUT_MS: u64 = 400;

mod follow;
mod image_choice;
mod lease;
mod migration;
mod placement;
mod takeover;
#[cfg(test)]
mod testing;
mod trigger;
mod verdict;

pub use follow::{FollowMove, FollowSettings, FollowTracker};
pub use image_choice::{ImageChoice, Survivor, choose as choose_image, survivors};
pub use lease::{ControlBug, Grant, GrantRefused, Grantor, Holder, LeaseConfig, LeaseRequest};
pub use migration::SwitchPoint;
pub use placement::{Reach, hand_leadership_to};
pub use takeover::{Takeover, TakeoverState};
pub use trigger::TakeoverTrigger;
pub use verdict::{LeaseState, holds_no_lease, takeover_heard_enough};
