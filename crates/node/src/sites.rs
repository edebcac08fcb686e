//! Site names and the numbers the engine knows them by.

use stretch_core::SiteId;

use crate::config::{ClusterConfig, SiteRole};

/// Every site of the cluster config, numbered from 1 in config order. All
/// nodes read the same config, so they agree on the numbers.
#[derive(Debug, Clone)]
pub(crate) struct SiteTable {
    sites: Vec<(String, SiteRole)>,
}

impl SiteTable {
    pub fn from_config(config: &ClusterConfig) -> Self {
        SiteTable {
            sites: config
                .sites
                .iter()
                .map(|site| (site.name.clone(), site.role))
                .collect(),
        }
    }

    pub fn id(&self, name: &str) -> Option<SiteId> {
        self.sites
            .iter()
            .position(|(site, _)| site == name)
            .map(|index| SiteId(index as u32 + 1))
    }

    pub fn name(&self, id: SiteId) -> Option<&str> {
        let index = (id.0 as usize).checked_sub(1)?;
        self.sites.get(index).map(|(name, _)| name.as_str())
    }

    /// Whether `name` is a site that holds volume legs.
    pub fn is_data_site(&self, name: &str) -> bool {
        self.sites
            .iter()
            .any(|(site, role)| site == name && *role == SiteRole::Data)
    }

    /// How many sites hold volume legs.
    pub fn data_site_count(&self) -> usize {
        self.sites
            .iter()
            .filter(|(_, role)| *role == SiteRole::Data)
            .count()
    }

    /// The data sites other than `local`.
    pub fn data_peers(&self, local: &str) -> Vec<SiteId> {
        self.sites
            .iter()
            .enumerate()
            .filter(|(_, (name, role))| name != local && *role == SiteRole::Data)
            .map(|(index, _)| SiteId(index as u32 + 1))
            .collect()
    }
}
