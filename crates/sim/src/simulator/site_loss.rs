//! The site-loss check: every other site loses power at once and what
//! was promised to survive the owner's loss must be on their disks (G4).

use super::*;

impl Simulation<'_> {
    /// Every site but one loses power at once; what that one promised would
    /// survive its site's loss must be in at least one of the others.
    pub(super) fn site_loss(&mut self) {
        let rate = self.scenario.faults.site_loss_per_second;
        if self.workload_over {
            return;
        }
        if self.site_loss.is_some() || self.control.isolated().is_some() {
            self.schedule_poisson(rate, Event::SiteLoss);
            return;
        }
        let owner = self.rng.below(self.sites.len() as u64) as usize;
        let writes = self.checker.site_durable_writes(owner);
        self.stats.site_loss_checks += 1;
        let count = writes.len() as u64;
        self.trace.record(
            self.now,
            None,
            &[40, owner as u64, count],
            || {
                format!(
                    "SITE LOSS CHECK: every site but {} loses power; {count} writes must survive elsewhere",
                    owner + 1
                )
            },
        );
        let pending: BTreeSet<usize> = (0..self.sites.len()).filter(|s| *s != owner).collect();
        self.site_loss = Some(SiteLossCheck {
            owner,
            writes,
            found: BTreeSet::new(),
            pending: pending.clone(),
        });
        for site in pending {
            self.crash(site, "site-loss check");
            if self.violation.is_some() {
                return;
            }
        }
        self.schedule_poisson(rate, Event::SiteLoss);
    }

    pub(super) fn site_loss_recovered(
        &mut self,
        site: usize,
        visible: &[View],
    ) -> Result<(), Violation> {
        let Some(check) = &mut self.site_loss else {
            return Ok(());
        };
        if !check.pending.remove(&site) {
            return Ok(());
        }
        let found = self.checker.present_at(visible, &check.writes);
        check.found.extend(found);
        if !check.pending.is_empty() {
            return Ok(());
        }
        let check = self
            .site_loss
            .take()
            .expect("simulator invariant: checked above");
        let missing: Vec<u32> = check
            .writes
            .iter()
            .copied()
            .filter(|id| !check.found.contains(id))
            .collect();
        let Some(first) = missing.first() else {
            return Ok(());
        };
        Err(Violation {
            guarantee: "G4",
            detail: format!(
                "{} was acknowledged as surviving the loss of site {} (a flush-sync FLUSH or FUA, or a sync-mode write), but after every other site lost power none of them holds it ({} such writes missing)",
                self.checker.describe_write(*first),
                check.owner + 1,
                missing.len()
            ),
        })
    }
}
