//! The policy tables: two generations, filled while the other decides, switched with one
//! write of the policy word (see `docs/architecture.md`, "Policy changes are atomic").

use std::collections::BTreeMap;

use aya::{
    maps::{MapError, lpm_trie::Key},
    programs::TcAttachType,
};
use causeway_datapath_common::{
    Config, POLICY_GENERATION_BIT, POLICY_STATE_DENY, POLICY_STATE_ENABLED, POLICY_STATE_GENERATION,
    PolicyAddr, maps, programs,
};

use crate::{
    Datapath, DatapathError, FlowKey, MAX_POLICY_RULES, PolicyKey, PolicyVerdict, ignore_not_found, map_err,
};

impl Datapath {
    /// Attaches the policy program for Ethernet devices to `ifname` (egress or ingress): the
    /// installed policy then also applies to traffic forwarded through that device.
    pub fn attach_policy_eth(&mut self, ifname: &str, egress: bool) -> Result<(), DatapathError> {
        let name = programs::POLICY_ETH;
        let dir = if egress { TcAttachType::Egress } else { TcAttachType::Ingress };
        self.attach_tc(name, ifname, dir)
    }

    /// Makes the kernel's policy `t`, atomically: a packet is judged by the old policy or by
    /// the new one, never by a mix. [`Self::stage_policy`], then [`Self::commit_policy`].
    pub fn set_policy(&mut self, t: &PolicyTables) -> Result<(), DatapathError> {
        let staged = self.stage_policy(t)?;
        self.commit_policy(staged)
    }

    /// Writes `t` into the generation of the tables that is not live (after clearing what an
    /// interrupted update may have left there). The live policy keeps deciding every packet;
    /// an error (a full map) leaves it in force, whole.
    pub fn stage_policy(&mut self, t: &PolicyTables) -> Result<StagedPolicy, DatapathError> {
        let next = 1 - self.policy_state()?.generation;
        self.remove_policy_generation(next)?;
        let tag = if next == 1 { POLICY_GENERATION_BIT } else { 0 };
        for (name, trie, want) in [
            (maps::POLICY_SRC_V4, &mut self.policy_src, &t.src_v4),
            (maps::POLICY_DST_V4, &mut self.policy_dst, &t.dst_v4),
        ] {
            for (net, class) in want {
                let key = Key::new(
                    32 + u32::from(net.prefix()),
                    PolicyAddr { generation: next, addr: u32::from_ne_bytes(net.network().octets()) },
                );
                trie.insert(&key, class | tag, 0).map_err(map_err(name))?;
            }
        }
        for (k, v) in &t.verdicts {
            let k = PolicyKey { src_class: k.src_class | tag, dst_class: k.dst_class | tag, ..*k };
            self.policy_verdicts.insert(k, v, 0).map_err(map_err(maps::POLICY_VERDICTS))?;
        }
        Ok(StagedPolicy { generation: next, enabled: t.enabled, default_deny: t.default_deny })
    }

    /// Makes a staged policy live with one write of the policy word, then removes the old
    /// generation's tables.
    pub fn commit_policy(&mut self, staged: StagedPolicy) -> Result<(), DatapathError> {
        self.config.set(Config::PolicyState as u32, staged.word(), 0).map_err(map_err(maps::CONFIG))?;
        self.remove_policy_generation(1 - staged.generation)
    }

    /// The live policy word, decoded.
    pub fn policy_state(&self) -> Result<StagedPolicy, DatapathError> {
        let word = self.config.get(&(Config::PolicyState as u32), 0).map_err(map_err(maps::CONFIG))?;
        Ok(StagedPolicy {
            generation: u32::from(word & POLICY_STATE_GENERATION != 0),
            enabled: word & POLICY_STATE_ENABLED != 0,
            default_deny: word & POLICY_STATE_DENY != 0,
        })
    }

    /// Entries in the policy tables, both generations: (source trie, destination trie,
    /// verdicts). Outside an update only the live generation has any.
    pub fn policy_table_sizes(&self) -> Result<(usize, usize, usize), DatapathError> {
        fn count<K>(
            mut keys: impl Iterator<Item = Result<K, MapError>>,
            name: &'static str,
        ) -> Result<usize, DatapathError> {
            keys.try_fold(0, |n, k| k.map(|_| n + 1)).map_err(map_err(name))
        }
        let src = count(self.policy_src.keys(), maps::POLICY_SRC_V4)?;
        let dst = count(self.policy_dst.keys(), maps::POLICY_DST_V4)?;
        let verdicts = count(self.policy_verdicts.keys(), maps::POLICY_VERDICTS)?;
        Ok((src, dst, verdicts))
    }

    fn remove_policy_generation(&mut self, generation: u32) -> Result<(), DatapathError> {
        for (name, trie) in
            [(maps::POLICY_SRC_V4, &mut self.policy_src), (maps::POLICY_DST_V4, &mut self.policy_dst)]
        {
            let stale: Vec<Key<PolicyAddr>> = trie
                .keys()
                .filter_map(|k| match k {
                    Ok(k) if k.data().generation == generation => Some(Ok(k)),
                    Ok(_) => None,
                    Err(e) => Some(Err(e)),
                })
                .collect::<Result<_, _>>()
                .map_err(map_err(name))?;
            for k in stale {
                ignore_not_found(trie.remove(&k).map_err(map_err(name)))?;
            }
        }
        let tag = if generation == 1 { POLICY_GENERATION_BIT } else { 0 };
        let stale: Vec<PolicyKey> = self
            .policy_verdicts
            .keys()
            .filter_map(|k| match k {
                Ok(k) if k.src_class & POLICY_GENERATION_BIT == tag => Some(Ok(k)),
                Ok(_) => None,
                Err(e) => Some(Err(e)),
            })
            .collect::<Result<_, _>>()
            .map_err(map_err(maps::POLICY_VERDICTS))?;
        for k in stale {
            ignore_not_found(self.policy_verdicts.remove(&k).map_err(map_err(maps::POLICY_VERDICTS)))?;
        }
        Ok(())
    }

    /// Switches enforcement of the installed tables on or off (nothing else changes).
    pub fn set_policy_enabled(&mut self, on: bool) -> Result<(), DatapathError> {
        let word = StagedPolicy { enabled: on, ..self.policy_state()? }.word();
        self.config.set(Config::PolicyState as u32, word, 0).map_err(map_err(maps::CONFIG))
    }

    /// Forgets the flows the policy allowed (their replies are judged afresh).
    pub fn clear_policy_flows(&mut self) -> Result<(), DatapathError> {
        let keys: Vec<FlowKey> =
            self.policy_flows.keys().collect::<Result<_, _>>().map_err(map_err(maps::POLICY_FLOWS))?;
        for k in keys {
            ignore_not_found(self.policy_flows.remove(&k).map_err(map_err(maps::POLICY_FLOWS)))?;
        }
        Ok(())
    }

    /// Packets dropped by each of the first `rules` rule indices, and by the default action
    /// (sums over CPUs).
    pub fn policy_drops(&self, rules: usize) -> Result<(Vec<u64>, u64), DatapathError> {
        let get = |i: u32| -> Result<u64, DatapathError> {
            Ok(self.policy_drops.get(&i, 0).map_err(map_err(maps::POLICY_DROPS))?.iter().sum())
        };
        let n = u32::try_from(rules).unwrap_or(MAX_POLICY_RULES).min(MAX_POLICY_RULES);
        let per_rule = (0..n).map(get).collect::<Result<_, _>>()?;
        Ok((per_rule, get(MAX_POLICY_RULES)?))
    }
}

/// A policy written into the tables' spare generation, not yet live
/// ([`Datapath::stage_policy`]); also the live policy word, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StagedPolicy {
    /// Which generation of the tables (0 or 1).
    pub generation: u32,
    pub enabled: bool,
    pub default_deny: bool,
}

impl StagedPolicy {
    /// The policy word (`Config::PolicyState`) that makes this policy live.
    #[must_use]
    pub fn word(self) -> u32 {
        let flag = |on: bool, bit: u32| if on { bit } else { 0 };
        flag(self.enabled, POLICY_STATE_ENABLED)
            | flag(self.default_deny, POLICY_STATE_DENY)
            | flag(self.generation == 1, POLICY_STATE_GENERATION)
    }
}

/// A compiled cluster-set policy, as the kernel holds it (the gateway's policy compiler
/// builds it; [`Datapath::set_policy`] installs it).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyTables {
    /// Off: no lookups at all, everything passes.
    pub enabled: bool,
    /// What happens when no rule matches.
    pub default_deny: bool,
    /// Source prefix → source class.
    pub src_v4: BTreeMap<ipnetwork::Ipv4Network, u32>,
    /// Destination prefix → destination class.
    pub dst_v4: BTreeMap<ipnetwork::Ipv4Network, u32>,
    pub verdicts: BTreeMap<PolicyKey, PolicyVerdict>,
}
