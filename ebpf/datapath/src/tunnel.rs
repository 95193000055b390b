//! The tunnel family: the counting programs on the tunnel device, the remote prefixes they
//! (and the redirect stage) look up, the per-cluster counters, and the MSS clamp.

use std::collections::BTreeMap;

use aya::{
    maps::{MapError, PerCpuValues, lpm_trie::Key},
    programs::TcAttachType,
};
use causeway_datapath_common::{Config, maps, programs};
use ipnetwork::IpNetwork;

use crate::{Datapath, DatapathError, RemoteCidr, TrafficCounters, ignore_not_found, map_err, prefix_u8};

impl Datapath {
    /// Attaches the counting programs to both directions of the tunnel device `ifname`
    /// (resolved in the calling thread's network namespace).
    pub fn attach_tunnel(&mut self, ifname: &str) -> Result<(), DatapathError> {
        for (name, dir) in [
            (programs::TUNNEL_EGRESS, TcAttachType::Egress),
            (programs::TUNNEL_INGRESS, TcAttachType::Ingress),
        ] {
            self.attach_tc(name, ifname, dir)?;
        }
        Ok(())
    }

    /// Sets the largest TCP MSS let through the tunnel from its MTU (IPv4: MTU − 40, IPv6:
    /// MTU − 60); SYN and SYN-ACK segments with a larger MSS option are rewritten.
    pub fn set_tunnel_mtu(&mut self, mtu: u16) -> Result<(), DatapathError> {
        for (cfg, overhead) in [(Config::MssV4, 40), (Config::MssV6, 60)] {
            let mss = u32::from(mtu.saturating_sub(overhead));
            self.config.set(cfg as u32, mss, 0).map_err(map_err(maps::CONFIG))?;
        }
        Ok(())
    }

    /// Maps `net` to its remote cluster's counter slot and tunnel device (insert or replace).
    pub fn set_remote_cidr(&mut self, net: IpNetwork, value: RemoteCidr) -> Result<(), DatapathError> {
        match net {
            IpNetwork::V4(n) => {
                let key = Key::new(u32::from(n.prefix()), u32::from_ne_bytes(n.network().octets()));
                self.remote_v4.insert(&key, value, 0).map_err(map_err(maps::REMOTE_CIDRS_V4))
            }
            IpNetwork::V6(n) => {
                let key = Key::new(u32::from(n.prefix()), n.network().octets());
                self.remote_v6.insert(&key, value, 0).map_err(map_err(maps::REMOTE_CIDRS_V6))
            }
        }
    }

    /// Removes `net`; absent is success.
    pub fn remove_remote_cidr(&mut self, net: IpNetwork) -> Result<(), DatapathError> {
        let res = match net {
            IpNetwork::V4(n) => self
                .remote_v4
                .remove(&Key::new(u32::from(n.prefix()), u32::from_ne_bytes(n.network().octets())))
                .map_err(map_err(maps::REMOTE_CIDRS_V4)),
            IpNetwork::V6(n) => self
                .remote_v6
                .remove(&Key::new(u32::from(n.prefix()), n.network().octets()))
                .map_err(map_err(maps::REMOTE_CIDRS_V6)),
        };
        ignore_not_found(res)
    }

    /// The remote prefixes currently in the maps, with their slots and tunnels.
    pub fn remote_cidrs(&self) -> Result<BTreeMap<IpNetwork, RemoteCidr>, DatapathError> {
        let mut out = BTreeMap::new();
        for item in self.remote_v4.iter() {
            let (k, v) = item.map_err(map_err(maps::REMOTE_CIDRS_V4))?;
            let addr = std::net::Ipv4Addr::from(k.data().to_ne_bytes());
            if let Ok(net) = ipnetwork::Ipv4Network::new(addr, prefix_u8(k.prefix_len())) {
                out.insert(IpNetwork::V4(net), v);
            }
        }
        for item in self.remote_v6.iter() {
            let (k, v) = item.map_err(map_err(maps::REMOTE_CIDRS_V6))?;
            let addr = std::net::Ipv6Addr::from(k.data());
            if let Ok(net) = ipnetwork::Ipv6Network::new(addr, prefix_u8(k.prefix_len())) {
                out.insert(IpNetwork::V6(net), v);
            }
        }
        Ok(out)
    }

    /// Creates the zeroed counter entry of `slot` if it does not exist yet (the programs only
    /// update existing entries, so that a packet never allocates in the kernel).
    pub fn ensure_counters(&mut self, slot: u32) -> Result<(), DatapathError> {
        match self.counters.get(&slot, 0) {
            Ok(_) => Ok(()),
            Err(MapError::KeyNotFound) => {
                let zeros = PerCpuValues::try_from(vec![TrafficCounters::default(); self.ncpus])
                    .map_err(|e| DatapathError::Cpus(e.to_string()))?;
                self.counters.insert(slot, zeros, 0).map_err(map_err(maps::CLUSTER_COUNTERS))
            }
            Err(e) => Err(map_err(maps::CLUSTER_COUNTERS)(e)),
        }
    }

    /// The slots that have a counter entry.
    pub fn counter_slots(&self) -> Result<Vec<u32>, DatapathError> {
        self.counters.keys().collect::<Result<_, _>>().map_err(map_err(maps::CLUSTER_COUNTERS))
    }

    /// Drops the counter entry of `slot`; absent is success.
    pub fn remove_counters(&mut self, slot: u32) -> Result<(), DatapathError> {
        ignore_not_found(self.counters.remove(&slot).map_err(map_err(maps::CLUSTER_COUNTERS)))
    }

    /// Sum over CPUs of the counters of `slot` (zero if it has none).
    pub fn counters(&self, slot: u32) -> Result<TrafficCounters, DatapathError> {
        match self.counters.get(&slot, 0) {
            Ok(values) => Ok(values.iter().fold(TrafficCounters::default(), |a, b| a.merged(*b))),
            Err(MapError::KeyNotFound) => Ok(TrafficCounters::default()),
            Err(e) => Err(map_err(maps::CLUSTER_COUNTERS)(e)),
        }
    }
}
