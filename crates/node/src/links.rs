//! Live control of the links between sites.
//!
//! [`LinkControl`] holds the current shape of every pair of sites (from the
//! config's `[[link]]` tables, then as changed through the admin API) and
//! the [`LinkTable`] of every node endpoint registered with it. A table
//! belongs to one site and is keyed by the peers' UDP addresses; changing a
//! pair of sites re-shapes, in every table of either site, the addresses of
//! the nodes of the other one. Only the sender shapes, so each direction
//! of a link is shaped by the node that sends on it.
//!
//! `stretch up` runs every node in one process with one shared
//! `LinkControl`, so one change reaches both directions. `stretch node`
//! runs one node per process, each with its own; every node must then be
//! told (the CLI's `stretch link ... --config` does that).

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use stretch_core::LinkProfile;
use stretch_transport::LinkTable;

use crate::config::{ClusterConfig, link_bandwidth_kbit, link_delay_ms, link_loss_ppm, site_pair};

/// A change to a link's shape; `None` leaves that setting as it is.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LinkChange {
    pub delay_ms: Option<u64>,
    pub jitter_ms: Option<u64>,
    /// 0 removes the limit.
    pub bandwidth_mbit: Option<f64>,
    pub loss_pct: Option<f64>,
}

/// One link as it is now, in the config's units.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinkInfo {
    /// The two sites, in name order.
    pub a: String,
    pub b: String,
    pub delay_ms: u64,
    pub jitter_ms: u64,
    /// `None`: unlimited.
    pub bandwidth_mbit: Option<f64>,
    pub loss_pct: f64,
    pub cut: bool,
}

impl fmt::Display for LinkInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} <-> {}: delay {} ms, jitter {} ms, bandwidth ",
            self.a, self.b, self.delay_ms, self.jitter_ms
        )?;
        match self.bandwidth_mbit {
            Some(mbit) => write!(f, "{mbit} Mbit/s")?,
            None => write!(f, "unlimited")?,
        }
        write!(
            f,
            ", loss {} %, {}",
            self.loss_pct,
            if self.cut { "CUT" } else { "up" }
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    #[error("no site named {name:?} (sites: {known})")]
    UnknownSite { name: String, known: String },
    #[error("a link joins two different sites, not {0:?} and itself")]
    SameSite(String),
    #[error("{0}")]
    Invalid(String),
}

/// The shapes of the links between sites and the tables that apply them.
pub struct LinkControl {
    state: Mutex<State>,
}

struct State {
    /// Every site of the config, with the peer addresses of its nodes.
    sites: BTreeMap<String, Vec<SocketAddr>>,
    /// The shape of every pair of distinct sites, keyed by [`site_pair`].
    links: BTreeMap<(String, String), LinkProfile>,
    /// Registered tables and the site of the node each belongs to.
    tables: Vec<(String, LinkTable)>,
}

impl fmt::Debug for LinkControl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.state.lock();
        f.debug_struct("LinkControl")
            .field("sites", &state.sites)
            .field("links", &state.links)
            .field("tables", &state.tables.len())
            .finish()
    }
}

impl LinkControl {
    /// Every pair of sites shaped as the config says (unshaped without a
    /// `[[link]]`), no table registered yet.
    pub fn from_config(config: &ClusterConfig) -> Self {
        let mut sites: BTreeMap<String, Vec<SocketAddr>> = config
            .sites
            .iter()
            .map(|site| (site.name.clone(), Vec::new()))
            .collect();
        for node in &config.nodes {
            if let (Some(addresses), Some(peer)) = (sites.get_mut(&node.site), node.peer_listen) {
                addresses.push(peer);
            }
        }
        let mut links = BTreeMap::new();
        for a in sites.keys() {
            for b in sites.keys().filter(|b| a < *b) {
                links.insert(site_pair(a, b), config.link_profile(a, b));
            }
        }
        LinkControl {
            state: Mutex::new(State {
                sites,
                links,
                tables: Vec::new(),
            }),
        }
    }

    /// Adds the link table of a node at `local_site` and shapes in it the
    /// peer address of every node of every other site as the links are
    /// now. Later changes reach it too.
    pub fn register(&self, local_site: &str, table: LinkTable) {
        let mut state = self.state.lock();
        for (site, addresses) in &state.sites {
            if site == local_site {
                continue;
            }
            let profile = state
                .links
                .get(&site_pair(local_site, site))
                .copied()
                .unwrap_or(LinkProfile::IDEAL);
            for address in addresses {
                table.set(*address, profile);
            }
        }
        state.tables.push((local_site.to_string(), table));
    }

    /// Changes the shape of the link between `a` and `b` (both directions)
    /// and applies it at once. A cut link stays cut until healed.
    pub fn set(&self, a: &str, b: &str, change: &LinkChange) -> Result<LinkInfo, LinkError> {
        // Check every value before changing anything.
        let delay_ms = change
            .delay_ms
            .map(|ms| link_delay_ms("delay_ms", ms))
            .transpose()
            .map_err(LinkError::Invalid)?;
        let jitter_ms = change
            .jitter_ms
            .map(|ms| link_delay_ms("jitter_ms", ms))
            .transpose()
            .map_err(LinkError::Invalid)?;
        let bandwidth_kbit = change
            .bandwidth_mbit
            .map(link_bandwidth_kbit)
            .transpose()
            .map_err(LinkError::Invalid)?;
        let loss_ppm = change
            .loss_pct
            .map(link_loss_ppm)
            .transpose()
            .map_err(LinkError::Invalid)?;
        self.update(a, b, |profile| {
            if let Some(delay_ms) = delay_ms {
                profile.delay_ms = delay_ms;
            }
            if let Some(jitter_ms) = jitter_ms {
                profile.jitter_ms = jitter_ms;
            }
            if let Some(bandwidth_kbit) = bandwidth_kbit {
                profile.bandwidth_kbit = bandwidth_kbit;
            }
            if let Some(loss_ppm) = loss_ppm {
                profile.loss_ppm = loss_ppm;
            }
        })
    }

    /// Cuts the link between `a` and `b`: nothing gets through either way.
    pub fn cut(&self, a: &str, b: &str) -> Result<LinkInfo, LinkError> {
        self.update(a, b, |profile| profile.cut = true)
    }

    /// Restores a cut link with the shape it had.
    pub fn heal(&self, a: &str, b: &str) -> Result<LinkInfo, LinkError> {
        self.update(a, b, |profile| profile.cut = false)
    }

    /// Every pair of distinct sites, in name order.
    pub fn list(&self) -> Vec<LinkInfo> {
        let state = self.state.lock();
        state
            .links
            .iter()
            .map(|((a, b), profile)| link_info(a, b, profile))
            .collect()
    }

    /// The current shape of the link between `a` and `b`.
    pub fn profile(&self, a: &str, b: &str) -> Result<LinkProfile, LinkError> {
        let state = self.state.lock();
        let key = state.pair(a, b)?;
        Ok(state.links.get(&key).copied().unwrap_or(LinkProfile::IDEAL))
    }

    fn update(
        &self,
        a: &str,
        b: &str,
        change: impl FnOnce(&mut LinkProfile),
    ) -> Result<LinkInfo, LinkError> {
        let mut state = self.state.lock();
        let key = state.pair(a, b)?;
        let profile = state.links.entry(key.clone()).or_insert(LinkProfile::IDEAL);
        change(profile);
        let profile = *profile;
        for (local, table) in &state.tables {
            let remote = if *local == key.0 {
                &key.1
            } else if *local == key.1 {
                &key.0
            } else {
                continue;
            };
            for address in state.sites.get(remote).into_iter().flatten() {
                table.set(*address, profile);
            }
        }
        let info = link_info(&key.0, &key.1, &profile);
        tracing::info!(link = %info, "link changed");
        Ok(info)
    }
}

impl State {
    /// The key of the link between two known, distinct sites.
    fn pair(&self, a: &str, b: &str) -> Result<(String, String), LinkError> {
        for site in [a, b] {
            if !self.sites.contains_key(site) {
                return Err(LinkError::UnknownSite {
                    name: site.to_string(),
                    known: self
                        .sites
                        .keys()
                        .map(String::as_str)
                        .collect::<Vec<_>>()
                        .join(", "),
                });
            }
        }
        if a == b {
            return Err(LinkError::SameSite(a.to_string()));
        }
        Ok(site_pair(a, b))
    }
}

fn link_info(a: &str, b: &str, profile: &LinkProfile) -> LinkInfo {
    LinkInfo {
        a: a.to_string(),
        b: b.to_string(),
        delay_ms: profile.delay_ms,
        jitter_ms: profile.jitter_ms,
        bandwidth_mbit: profile
            .bandwidth_kbit
            .filter(|kbit| *kbit > 0)
            .map(|kbit| kbit as f64 / 1000.0),
        loss_pct: profile.loss_ppm as f64 / 10_000.0,
        cut: profile.cut,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::LOCAL_CONFIG;

    /// Two nodes at a, one at b, one at c; a-b 25 ms, a-c 40 ms.
    const THREE_SITES: &str = r#"
[cluster]
name = "links"

[[site]]
name = "a"
[[site]]
name = "b"
[[site]]
name = "c"

[[node]]
name = "a1"
site = "a"
nbd_listen = "127.0.0.1:20001"
admin_listen = "127.0.0.1:20002"
peer_listen = "127.0.0.1:20003"
[[node]]
name = "a2"
site = "a"
nbd_listen = "127.0.0.1:20011"
admin_listen = "127.0.0.1:20012"
peer_listen = "127.0.0.1:20013"
[[node]]
name = "b1"
site = "b"
nbd_listen = "127.0.0.1:20021"
admin_listen = "127.0.0.1:20022"
peer_listen = "127.0.0.1:20023"
[[node]]
name = "c1"
site = "c"
nbd_listen = "127.0.0.1:20031"
admin_listen = "127.0.0.1:20032"
peer_listen = "127.0.0.1:20033"

[[link]]
sites = ["b", "a"]
delay_ms = 25
[[link]]
sites = ["a", "c"]
delay_ms = 40
bandwidth_mbit = 100
"#;

    fn address(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    const A1: u16 = 20003;
    const A2: u16 = 20013;
    const B1: u16 = 20023;
    const C1: u16 = 20033;

    fn delay(ms: u64) -> LinkProfile {
        LinkProfile {
            delay_ms: ms,
            ..LinkProfile::IDEAL
        }
    }

    /// The control and one registered table per node, as `stretch up` has.
    fn cluster() -> (LinkControl, BTreeMap<&'static str, LinkTable>) {
        let config = ClusterConfig::parse(THREE_SITES, "test").expect("valid config");
        let control = LinkControl::from_config(&config);
        let mut tables = BTreeMap::new();
        for (node, site) in [("a1", "a"), ("a2", "a"), ("b1", "b"), ("c1", "c")] {
            let table = LinkTable::new(7);
            control.register(site, table.clone());
            tables.insert(node, table);
        }
        (control, tables)
    }

    #[test]
    fn register_shapes_every_peer_of_other_sites_from_the_config() {
        let (_control, tables) = cluster();
        let a_to_c = LinkProfile {
            delay_ms: 40,
            bandwidth_kbit: Some(100_000),
            ..LinkProfile::IDEAL
        };
        for node in ["a1", "a2"] {
            let table = &tables[node];
            assert_eq!(table.profile(address(B1)), Some(delay(25)), "{node}");
            assert_eq!(table.profile(address(C1)), Some(a_to_c), "{node}");
        }
        // The own site's nodes are not shaped.
        assert_eq!(tables["a1"].profile(address(A2)), None);
        assert_eq!(tables["a2"].profile(address(A1)), None);
        for peer in [A1, A2] {
            assert_eq!(tables["b1"].profile(address(peer)), Some(delay(25)));
            assert_eq!(tables["c1"].profile(address(peer)), Some(a_to_c));
        }
        // No [[link]] between b and c: registered, unshaped.
        assert_eq!(tables["b1"].profile(address(C1)), Some(LinkProfile::IDEAL));
        assert_eq!(tables["c1"].profile(address(B1)), Some(LinkProfile::IDEAL));
    }

    #[test]
    fn set_changes_both_directions_of_that_pair_only() {
        let (control, tables) = cluster();
        let info = control
            .set(
                "b",
                "a",
                &LinkChange {
                    delay_ms: Some(5),
                    loss_pct: Some(1.5),
                    ..LinkChange::default()
                },
            )
            .expect("valid change");
        assert_eq!((info.a.as_str(), info.b.as_str()), ("a", "b"));
        assert_eq!(info.delay_ms, 5);
        assert_eq!(info.loss_pct, 1.5);
        let shaped = LinkProfile {
            delay_ms: 5,
            loss_ppm: 15_000,
            ..LinkProfile::IDEAL
        };
        assert_eq!(tables["a1"].profile(address(B1)), Some(shaped));
        assert_eq!(tables["a2"].profile(address(B1)), Some(shaped));
        assert_eq!(tables["b1"].profile(address(A1)), Some(shaped));
        assert_eq!(tables["b1"].profile(address(A2)), Some(shaped));
        // Other pairs and the own site are untouched.
        assert_eq!(
            tables["a1"].profile(address(C1)).map(|p| p.delay_ms),
            Some(40)
        );
        assert_eq!(
            tables["c1"].profile(address(A1)).map(|p| p.delay_ms),
            Some(40)
        );
        assert_eq!(tables["b1"].profile(address(C1)), Some(LinkProfile::IDEAL));
        assert_eq!(tables["a1"].profile(address(A2)), None);
        // Omitted settings keep their value; bandwidth 0 removes the limit.
        let info = control
            .set(
                "a",
                "c",
                &LinkChange {
                    bandwidth_mbit: Some(0.0),
                    ..LinkChange::default()
                },
            )
            .expect("valid change");
        assert_eq!(info.delay_ms, 40);
        assert_eq!(info.bandwidth_mbit, None);
        assert_eq!(tables["c1"].profile(address(A2)), Some(delay(40)));
    }

    #[test]
    fn cut_and_heal_keep_the_shape() {
        let (control, tables) = cluster();
        let info = control.cut("a", "b").expect("known sites");
        assert!(info.cut);
        let cut = LinkProfile {
            cut: true,
            ..delay(25)
        };
        assert_eq!(tables["a1"].profile(address(B1)), Some(cut));
        assert_eq!(tables["b1"].profile(address(A2)), Some(cut));
        assert_eq!(
            tables["a1"].profile(address(C1)).map(|p| p.cut),
            Some(false)
        );
        // A change while cut keeps the link cut.
        control
            .set(
                "a",
                "b",
                &LinkChange {
                    delay_ms: Some(30),
                    ..LinkChange::default()
                },
            )
            .expect("valid change");
        assert_eq!(
            tables["b1"].profile(address(A1)),
            Some(LinkProfile {
                cut: true,
                ..delay(30)
            })
        );
        let info = control.heal("b", "a").expect("known sites");
        assert!(!info.cut);
        assert_eq!(tables["a1"].profile(address(B1)), Some(delay(30)));
        assert_eq!(tables["b1"].profile(address(A1)), Some(delay(30)));
    }

    #[test]
    fn a_table_registered_later_gets_the_current_shape() {
        let (control, _tables) = cluster();
        control.cut("a", "b").expect("known sites");
        let late = LinkTable::new(1);
        control.register("b", late.clone());
        assert_eq!(late.profile(address(A1)).map(|p| p.cut), Some(true));
    }

    #[test]
    fn bad_requests_change_nothing() {
        let (control, tables) = cluster();
        let before = control.list();
        let error = control.cut("a", "zz").expect_err("unknown site");
        assert!(matches!(&error, LinkError::UnknownSite { name, .. } if name == "zz"));
        assert!(error.to_string().contains("sites: a, b, c"), "{error}");
        assert_eq!(control.heal("b", "b"), Err(LinkError::SameSite("b".into())));
        let invalid = [
            LinkChange {
                loss_pct: Some(-1.0),
                ..LinkChange::default()
            },
            LinkChange {
                loss_pct: Some(f64::NAN),
                ..LinkChange::default()
            },
            LinkChange {
                delay_ms: Some(5),
                bandwidth_mbit: Some(-2.0),
                ..LinkChange::default()
            },
            LinkChange {
                jitter_ms: Some(u64::MAX),
                ..LinkChange::default()
            },
        ];
        for change in invalid {
            let error = control.set("a", "b", &change).expect_err("out of range");
            assert!(
                matches!(error, LinkError::Invalid(_)),
                "{change:?}: {error}"
            );
        }
        assert_eq!(control.list(), before);
        assert_eq!(tables["a1"].profile(address(B1)), Some(delay(25)));
    }

    #[test]
    fn list_shows_every_pair_in_config_units() {
        let (control, _tables) = cluster();
        let list = control.list();
        let pairs: Vec<(&str, &str)> = list
            .iter()
            .map(|link| (link.a.as_str(), link.b.as_str()))
            .collect();
        assert_eq!(pairs, [("a", "b"), ("a", "c"), ("b", "c")]);
        assert_eq!(list[1].bandwidth_mbit, Some(100.0));
        assert_eq!(
            list[0].to_string(),
            "a <-> b: delay 25 ms, jitter 0 ms, bandwidth unlimited, loss 0 %, up"
        );
    }

    #[test]
    fn local_config_shapes_the_witness_links_as_unshaped() {
        let config = ClusterConfig::parse(LOCAL_CONFIG, "local.toml").expect("valid");
        let control = LinkControl::from_config(&config);
        let witness = LinkTable::new(3);
        control.register("w", witness.clone());
        assert_eq!(witness.profile(address(7400)), Some(LinkProfile::IDEAL));
        assert_eq!(witness.profile(address(7401)), Some(LinkProfile::IDEAL));
        assert_eq!(
            control.profile("a", "b").map(|profile| profile.delay_ms),
            Ok(25)
        );
        assert_eq!(control.list().len(), 3);
    }
}
