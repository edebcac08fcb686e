//! Which survivor takes a group over when its owner holds no lease: the
//! one holding the newest image.
//!
//! With two data sites there is one survivor. With three or more, a write
//! that a `flush-sync` or `sync` volume acknowledged is promised to survive
//! the owner site's loss (G4), yet it may be in only one other site's
//! journal: whichever answered first. So each survivor offers its image (the
//! last whole delta it holds) in a Raft entry before it promotes itself, and
//! a promotion is refused while another survivor offered a newer one (the
//! metadata state machine enforces that; this module decides what a
//! survivor does next, the node and the simulator alike).
//!
//! Waiting for every survivor would let one that is away suspend the group
//! for as long as it is away. A survivor that holds no lease cannot serve
//! the group anyway, so it is passed over; one that holds a lease and has
//! not offered yet is waited for until a deadline, then passed by (its
//! offer, should it come later, still refuses promotions of older images).

use std::collections::BTreeMap;

/// One other survivor, as the deciding site sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Survivor {
    pub site: String,
    /// Its offer at the group's epoch: `None` if it has not offered,
    /// `Some(None)` if it offered no image it could serve.
    pub offer: Option<Option<u64>>,
    /// A majority of the voters still honour a lease they granted it.
    pub holds_lease: bool,
}

/// What a survivor that offered `image` does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageChoice {
    /// Promote this site, naming the survivors whose offers do not count
    /// (they hold no lease).
    Promote { passed_over: Vec<String> },
    /// `site` offered a newer image and holds a lease: it takes the group.
    LeaveTo { site: String, after_seq: u64 },
    /// These survivors hold a lease and have not offered yet.
    Wait { for_sites: Vec<String> },
}

/// The choice of a survivor holding `image` among `others` (every data
/// site but this one and the owner that lost its lease). `deadline_passed`:
/// the survivors that have not offered were waited for long enough.
pub fn choose(image: u64, others: &[Survivor], deadline_passed: bool) -> ImageChoice {
    let mut passed_over = Vec::new();
    let mut waiting = Vec::new();
    let mut newest: Option<(&str, u64)> = None;
    for survivor in others {
        if !survivor.holds_lease {
            if survivor.offer.is_some() {
                passed_over.push(survivor.site.clone());
            }
            continue;
        }
        match survivor.offer {
            None => waiting.push(survivor.site.clone()),
            Some(Some(offered)) if offered > image => {
                if newest.is_none_or(|(_, best)| offered > best) {
                    newest = Some((&survivor.site, offered));
                }
            }
            Some(_) => {}
        }
    }
    if let Some((site, after_seq)) = newest {
        return ImageChoice::LeaveTo {
            site: site.to_owned(),
            after_seq,
        };
    }
    if !waiting.is_empty() && !deadline_passed {
        return ImageChoice::Wait { for_sites: waiting };
    }
    ImageChoice::Promote { passed_over }
}

/// The offers recorded for a group, as [`Survivor`]s: every data site in
/// `sites` but `this` and `owner`, with `holds_lease` answered per site.
pub fn survivors(
    sites: impl IntoIterator<Item = String>,
    this: &str,
    owner: &str,
    offers: &BTreeMap<String, Option<u64>>,
    mut holds_lease: impl FnMut(&str) -> bool,
) -> Vec<Survivor> {
    sites
        .into_iter()
        .filter(|site| site != this && site != owner)
        .map(|site| Survivor {
            offer: offers.get(&site).copied(),
            holds_lease: holds_lease(&site),
            site,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn survivor(site: &str, offer: Option<Option<u64>>, holds_lease: bool) -> Survivor {
        Survivor {
            site: site.into(),
            offer,
            holds_lease,
        }
    }

    #[test]
    fn the_only_survivor_promotes_itself() {
        assert_eq!(
            choose(5, &[], false),
            ImageChoice::Promote {
                passed_over: vec![]
            }
        );
    }

    #[test]
    fn a_newer_image_held_under_a_lease_wins() {
        let others = [
            survivor("c", Some(Some(9)), true),
            survivor("d", Some(Some(12)), true),
            survivor("e", Some(Some(4)), true),
        ];
        assert_eq!(
            choose(7, &others, false),
            ImageChoice::LeaveTo {
                site: "d".into(),
                after_seq: 12
            }
        );
        assert_eq!(
            choose(12, &others, false),
            ImageChoice::Promote {
                passed_over: vec![]
            },
            "an equal image is as good"
        );
    }

    #[test]
    fn a_survivor_without_a_lease_is_passed_over() {
        let others = [survivor("c", Some(Some(9)), false)];
        assert_eq!(
            choose(7, &others, false),
            ImageChoice::Promote {
                passed_over: vec!["c".into()]
            }
        );
        // One that never offered need not be named: no offer of it refuses.
        assert_eq!(
            choose(7, &[survivor("c", None, false)], false),
            ImageChoice::Promote {
                passed_over: vec![]
            }
        );
    }

    #[test]
    fn a_survivor_holding_a_lease_is_waited_for_until_the_deadline() {
        let others = [survivor("c", None, true), survivor("d", Some(None), true)];
        assert_eq!(
            choose(7, &others, false),
            ImageChoice::Wait {
                for_sites: vec!["c".into()]
            }
        );
        assert_eq!(
            choose(7, &others, true),
            ImageChoice::Promote {
                passed_over: vec![]
            }
        );
        // A newer offer wins without waiting for the rest.
        let others = [
            survivor("c", None, true),
            survivor("d", Some(Some(8)), true),
        ];
        assert_eq!(
            choose(7, &others, false),
            ImageChoice::LeaveTo {
                site: "d".into(),
                after_seq: 8
            }
        );
    }

    #[test]
    fn survivors_leave_out_this_site_and_the_owner() {
        let offers = BTreeMap::from([("c".to_string(), Some(3))]);
        let list = survivors(
            ["a", "b", "c", "d"].map(String::from),
            "b",
            "a",
            &offers,
            |site| site != "d",
        );
        assert_eq!(
            list,
            vec![
                survivor("c", Some(Some(3)), true),
                survivor("d", None, false)
            ]
        );
    }
}
