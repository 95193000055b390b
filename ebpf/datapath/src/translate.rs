//! Overlap mode: the local cluster's real ↔ global prefixes the tunnel programs translate
//! between (see the `translate` module of the programs).

use std::collections::BTreeMap;

use aya::maps::lpm_trie::Key;
use causeway_datapath_common::{NatPrefix, maps};
use ipnetwork::{IpNetwork, Ipv4Network};

use crate::{Datapath, DatapathError, map_err, prefix_u8};

/// Why a pair cannot be translated.
#[derive(Debug, thiserror::Error)]
pub enum TranslationError {
    #[error("{real} → {global}: a translated pair is two IPv4 prefixes of the same length")]
    Shape { real: IpNetwork, global: IpNetwork },
}

fn key(n: &Ipv4Network) -> Key<u32> {
    Key::new(u32::from(n.prefix()), u32::from_ne_bytes(n.network().octets()))
}

fn value(to: &Ipv4Network) -> NatPrefix {
    NatPrefix { to: u32::from_ne_bytes(to.network().octets()), prefix: u32::from(to.prefix()) }
}

impl Datapath {
    /// Makes the translation tries say exactly `pairs` (the local cluster's real prefix →
    /// its global prefix; empty outside overlap mode): new and changed pairs are written
    /// before stale ones are removed, so a prefix is never untranslated in between.
    pub fn set_translation(&mut self, pairs: &[(IpNetwork, IpNetwork)]) -> Result<(), DatapathError> {
        let mut want: BTreeMap<Ipv4Network, Ipv4Network> = BTreeMap::new();
        for (real, global) in pairs {
            match (real, global) {
                (IpNetwork::V4(r), IpNetwork::V4(g)) if r.prefix() == g.prefix() => {
                    want.insert(*r, *g);
                }
                _ => {
                    return Err(DatapathError::Translation(TranslationError::Shape {
                        real: *real,
                        global: *global,
                    }));
                }
            }
        }
        for (r, g) in &want {
            self.nat_out.insert(&key(r), value(g), 0).map_err(map_err(maps::NAT_OUT_V4))?;
            self.nat_in.insert(&key(g), value(r), 0).map_err(map_err(maps::NAT_IN_V4))?;
        }
        let stale_out: Vec<Ipv4Network> =
            self.translation()?.into_keys().filter(|r| !want.contains_key(r)).collect();
        for r in stale_out {
            crate::ignore_not_found(self.nat_out.remove(&key(&r)).map_err(map_err(maps::NAT_OUT_V4)))?;
        }
        let mut stale_in = Vec::new();
        for item in self.nat_in.iter() {
            let (k, _) = item.map_err(map_err(maps::NAT_IN_V4))?;
            if let Ok(g) = Ipv4Network::new(k.data().to_ne_bytes().into(), prefix_u8(k.prefix_len()))
                && !want.values().any(|w| *w == g)
            {
                stale_in.push(g);
            }
        }
        for g in stale_in {
            crate::ignore_not_found(self.nat_in.remove(&key(&g)).map_err(map_err(maps::NAT_IN_V4)))?;
        }
        Ok(())
    }

    /// The pairs in the outbound trie (real → global).
    pub fn translation(&self) -> Result<BTreeMap<Ipv4Network, Ipv4Network>, DatapathError> {
        let mut out = BTreeMap::new();
        for item in self.nat_out.iter() {
            let (k, v) = item.map_err(map_err(maps::NAT_OUT_V4))?;
            let real = Ipv4Network::new(k.data().to_ne_bytes().into(), prefix_u8(k.prefix_len()));
            let global = Ipv4Network::new(v.to.to_ne_bytes().into(), prefix_u8(v.prefix));
            if let (Ok(r), Ok(g)) = (real, global) {
                out.insert(r, g);
            }
        }
        Ok(out)
    }
}
