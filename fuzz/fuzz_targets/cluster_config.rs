//! The cluster config (TOML text from an operator): parse and validate,
//! then the lookups a node makes on a validated config. Must hold: no
//! panic, whatever the text.
#![no_main]

use libfuzzer_sys::fuzz_target;
use stretch_node::ClusterConfig;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(config) = ClusterConfig::parse(text, "fuzz") else {
        return;
    };
    let _ = config.tuning.engine();
    for link in &config.links {
        let _ = link.profile();
    }
    let data_sites = config.data_sites();
    for node in &config.nodes {
        let _ = config.is_data_node(node);
        let _ = config.peers(&node.name);
        assert!(config.node(&node.name).is_some());
    }
    for a in &data_sites {
        for b in &data_sites {
            let _ = config.link_profile(&a.name, &b.name);
        }
    }
});
