//! The cluster-set policy compiler (sans-IO): policy records plus every cluster's CIDRs in,
//! the kernel's lookup tables out ([`PolicyTables`]).
//!
//! The kernel must answer "which rule decides this packet" without scanning rules. So the
//! compiler splits the address space into *classes*: every prefix named by some rule (and
//! `0.0.0.0/0`) is a class; a packet's source class is the longest such prefix containing
//! its source, likewise for the destination (two LPM lookups). The rules that can apply to a
//! class are the rules naming one of its ancestors. For every (source class, destination
//! class) pair some rule applies to, the compiler evaluates the rules in order at every
//! protocol/port the rules mention and writes the result into a hash table keyed by
//! (classes, protocol, port), plus "any other port" and "any other protocol" entries; the
//! kernel falls back exact port → any port → any protocol → the default action. Entries
//! equal to their fallback are left out.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use causeway_broker_api::{PolicyAction, PolicyPeer, PolicyRecord};
use causeway_datapath::{
    MAX_POLICY_VERDICTS, POLICY_ALLOW, POLICY_DENY, PolicyKey, PolicyTables, PolicyVerdict,
};
use ipnetwork::{IpNetwork, Ipv4Network};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    #[error(
        "the policy compiles to more than {max} kernel entries (port ranges are expanded per port, for every pair of source and destination prefixes); use fewer or narrower rules"
    )]
    TooLarge { max: usize },
    #[error("{0} policy rules; at most {1} are supported")]
    TooManyRules(usize, u32),
}

/// What the compiler needs from the cluster set.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyInput {
    /// Every cluster (local one included) → its pod and service CIDRs.
    pub clusters: BTreeMap<String, Vec<IpNetwork>>,
    pub rules: Vec<PolicyRecord>,
    pub default: PolicyAction,
    /// The gateways' in-band probe addresses: ICMP among them is always allowed (rule 0,
    /// [`PROBE_RULE`]), or a deny-by-default set would mark every tunnel down.
    pub probe_ips: BTreeSet<std::net::Ipv4Addr>,
}

/// Name of the implicit first rule that lets the gateways' probes through.
pub const PROBE_RULE: &str = "(gateway-probes)";

/// The compiled policy: kernel tables, and the rule names by index (for the drop counters).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Compiled {
    pub tables: PolicyTables,
    pub rule_names: Vec<String>,
}

struct Rule {
    src: Vec<Ipv4Network>,
    dst: Vec<Ipv4Network>,
    /// IP protocol number; 0 = any.
    proto: u16,
    ports: Vec<(u16, u16)>,
    verdict: PolicyVerdict,
}

impl Rule {
    /// Does the rule match protocol `proto` at `port`? `port` 0 stands for "a port no rule
    /// names", `proto` 0 for "a protocol no rule names".
    fn matches(&self, proto: u16, port: u16) -> bool {
        let proto_ok = self.proto == 0 || self.proto == proto;
        let port_ok =
            self.ports.is_empty() || (port != 0 && self.ports.iter().any(|(a, b)| (*a..=*b).contains(&port)));
        proto_ok && port_ok
    }
}

fn any() -> Ipv4Network {
    Ipv4Network::new(std::net::Ipv4Addr::UNSPECIFIED, 0).expect("0.0.0.0/0 is valid")
}

fn v4(nets: &[IpNetwork]) -> Vec<Ipv4Network> {
    nets.iter()
        .filter_map(|n| match n {
            IpNetwork::V4(n) => Some(*n),
            IpNetwork::V6(_) => None,
        })
        .collect()
}

/// The prefixes one side of a rule covers: a cluster's CIDRs, CIDRs, their intersection, or
/// everything. An unknown cluster covers nothing (the rule waits for it to join).
fn side(peer: &PolicyPeer, clusters: &BTreeMap<String, Vec<IpNetwork>>) -> Vec<Ipv4Network> {
    let cidrs = v4(&peer.cidrs);
    let Some(cluster) = &peer.cluster else {
        return if peer.cidrs.is_empty() { vec![any()] } else { cidrs };
    };
    let Some(nets) = clusters.get(cluster) else { return Vec::new() };
    let cluster_nets = v4(nets);
    if peer.cidrs.is_empty() {
        return cluster_nets;
    }
    let mut out = Vec::new();
    for a in &cluster_nets {
        for b in &cidrs {
            if a.prefix() <= b.prefix() && a.contains(b.network()) {
                out.push(*b);
            } else if b.prefix() < a.prefix() && b.contains(a.network()) {
                out.push(*a);
            }
        }
    }
    out
}

/// One side's classes: the prefix set, rule lists per class, descendants per prefix.
struct Classes {
    /// Sorted by (network, prefix length): descendants of a prefix are a contiguous run.
    sorted: Vec<Ipv4Network>,
    ids: HashMap<Ipv4Network, u32>,
    /// Rules naming each prefix.
    by_prefix: HashMap<Ipv4Network, Vec<u32>>,
}

impl Classes {
    fn new(rules: &[Rule], pick: impl Fn(&Rule) -> &Vec<Ipv4Network>) -> Self {
        let mut set: BTreeSet<(u32, u8)> = BTreeSet::from([(0, 0)]);
        let mut by_prefix: HashMap<Ipv4Network, Vec<u32>> = HashMap::new();
        for (i, r) in rules.iter().enumerate() {
            for n in pick(r) {
                set.insert((u32::from(n.network()), n.prefix()));
                by_prefix.entry(*n).or_default().push(u32::try_from(i).unwrap_or(u32::MAX));
            }
        }
        let sorted: Vec<Ipv4Network> = set
            .into_iter()
            .map(|(a, p)| Ipv4Network::new(a.into(), p).expect("prefixes come from valid networks"))
            .collect();
        let ids =
            sorted.iter().enumerate().map(|(i, n)| (*n, u32::try_from(i).unwrap_or(u32::MAX))).collect();
        Self { sorted, ids, by_prefix }
    }

    /// Classes inside `n` (itself included).
    fn descendants(&self, n: &Ipv4Network) -> impl Iterator<Item = &Ipv4Network> {
        let lo = u32::from(n.network());
        let hi = u32::from(n.broadcast());
        let start = self.sorted.partition_point(|c| u32::from(c.network()) < lo);
        self.sorted[start..]
            .iter()
            .take_while(move |c| u32::from(c.network()) <= hi)
            .filter(move |c| c.prefix() >= n.prefix())
    }

    /// Rules that apply to every address of class `c`: those naming `c` or an ancestor.
    fn rules_of(&self, c: &Ipv4Network) -> BTreeSet<u32> {
        let mut out = BTreeSet::new();
        for len in 0..=c.prefix() {
            // `new` keeps host bits; re-base on the network address to get the prefix itself.
            let anc = Ipv4Network::new(c.network(), len).expect("len ≤ 32");
            let anc = Ipv4Network::new(anc.network(), len).expect("len ≤ 32");
            if let Some(rs) = self.by_prefix.get(&anc) {
                out.extend(rs.iter().copied());
            }
        }
        out
    }
}

/// Compiles the cluster set's policy for the kernel.
pub fn compile(input: &PolicyInput) -> Result<Compiled, PolicyError> {
    let mut records: Vec<&PolicyRecord> = input.rules.iter().collect();
    records.sort_by(|a, b| (a.priority, &a.name).cmp(&(b.priority, &b.name)));
    if records.len() > causeway_datapath::MAX_POLICY_RULES as usize {
        return Err(PolicyError::TooManyRules(records.len(), causeway_datapath::MAX_POLICY_RULES));
    }
    let default_deny = input.default == PolicyAction::Deny;
    let enabled = !records.is_empty() || default_deny;
    let probes: Vec<IpNetwork> = input
        .probe_ips
        .iter()
        .map(|ip| IpNetwork::V4(Ipv4Network::new(*ip, 32).expect("/32 is valid")))
        .collect();
    let probe_rule = PolicyRecord {
        name: PROBE_RULE.into(),
        priority: 0,
        from: PolicyPeer { cluster: None, cidrs: probes.clone() },
        to: PolicyPeer { cluster: None, cidrs: probes },
        protocol: causeway_broker_api::PolicyProtocol::Icmp,
        ports: Vec::new(),
        action: PolicyAction::Allow,
        generation: 0,
    };
    if !input.probe_ips.is_empty() {
        records.insert(0, &probe_rule);
    }
    let rule_names = records.iter().map(|r| r.name.clone()).collect();
    let rules: Vec<Rule> = records
        .iter()
        .enumerate()
        .map(|(i, r)| Rule {
            src: side(&r.from, &input.clusters),
            dst: side(&r.to, &input.clusters),
            proto: u16::from(r.protocol.number()),
            ports: r.ports.iter().map(|p| (p.first, p.last)).collect(),
            verdict: PolicyVerdict {
                action: if r.action == PolicyAction::Deny { POLICY_DENY } else { POLICY_ALLOW },
                rule: u32::try_from(i).unwrap_or(u32::MAX),
            },
        })
        .collect();
    let src = Classes::new(&rules, |r| &r.src);
    let dst = Classes::new(&rules, |r| &r.dst);
    let max = MAX_POLICY_VERDICTS as usize;

    // The (source class, destination class) pairs some rule applies to.
    let mut pairs: BTreeSet<(Ipv4Network, Ipv4Network)> = BTreeSet::new();
    for r in &rules {
        for s in &r.src {
            let ds: Vec<&Ipv4Network> = src.descendants(s).collect();
            for d in &r.dst {
                for dd in dst.descendants(d) {
                    for sd in &ds {
                        pairs.insert((**sd, *dd));
                    }
                    if pairs.len() > max {
                        return Err(PolicyError::TooLarge { max });
                    }
                }
            }
        }
    }

    let mut src_rules: HashMap<Ipv4Network, BTreeSet<u32>> = HashMap::new();
    let mut dst_rules: HashMap<Ipv4Network, BTreeSet<u32>> = HashMap::new();
    let mut verdicts = BTreeMap::new();
    for (s, d) in pairs {
        let sr = src_rules.entry(s).or_insert_with(|| src.rules_of(&s));
        let dr = dst_rules.entry(d).or_insert_with(|| dst.rules_of(&d));
        let (small, large) = if sr.len() <= dr.len() { (&*sr, &*dr) } else { (&*dr, &*sr) };
        let applicable: Vec<&Rule> =
            small.iter().filter(|i| large.contains(i)).map(|i| &rules[*i as usize]).collect();
        let first =
            |proto: u16, port: u16| applicable.iter().find(|r| r.matches(proto, port)).map(|r| r.verdict);
        let (sc, dc) = (src.ids[&s], dst.ids[&d]);
        let key = |proto: u16, port: u16| PolicyKey { src_class: sc, dst_class: dc, port, proto };
        let any = first(0, 0);
        if let Some(v) = any {
            verdicts.insert(key(0, 0), v);
        }
        let protos: BTreeSet<u16> = applicable.iter().map(|r| r.proto).filter(|p| *p != 0).collect();
        for p in protos {
            let wide = first(p, 0);
            if wide != any
                && let Some(v) = wide
            {
                verdicts.insert(key(p, 0), v);
            }
            let ports: BTreeSet<u16> = applicable
                .iter()
                .filter(|r| r.proto == p)
                .flat_map(|r| r.ports.iter().flat_map(|(a, b)| *a..=*b))
                .collect();
            for port in ports {
                let v = first(p, port);
                if v != wide
                    && let Some(v) = v
                {
                    verdicts.insert(key(p, port), v);
                }
            }
            if verdicts.len() > max {
                return Err(PolicyError::TooLarge { max });
            }
        }
    }
    let classes = |c: &Classes| c.ids.iter().map(|(n, id)| (*n, *id)).collect();
    Ok(Compiled {
        tables: PolicyTables {
            enabled,
            default_deny,
            src_v4: if enabled { classes(&src) } else { BTreeMap::new() },
            dst_v4: if enabled { classes(&dst) } else { BTreeMap::new() },
            verdicts,
        },
        rule_names,
    })
}

/// What the kernel would decide for one packet: the userspace mirror of the TC program's
/// lookups, for tests and for `diagnose`-style explanations. Returns (allowed, rule index).
#[must_use]
pub fn evaluate(
    t: &PolicyTables,
    src: std::net::Ipv4Addr,
    dst: std::net::Ipv4Addr,
    proto: u8,
    port: u16,
) -> (bool, Option<u32>) {
    if !t.enabled {
        return (true, None);
    }
    let class = |m: &BTreeMap<Ipv4Network, u32>, a: std::net::Ipv4Addr| {
        m.iter().filter(|(n, _)| n.contains(a)).max_by_key(|(n, _)| n.prefix()).map_or(0, |(_, c)| *c)
    };
    let (sc, dc) = (class(&t.src_v4, src), class(&t.dst_v4, dst));
    let proto = u16::from(proto);
    let port = if proto == 6 || proto == 17 { port } else { 0 };
    for (p, q) in [(proto, port), (proto, 0), (0, 0)] {
        if let Some(v) = t.verdicts.get(&PolicyKey { src_class: sc, dst_class: dc, port: q, proto: p }) {
            return (v.action == POLICY_ALLOW, Some(v.rule));
        }
    }
    (!t.default_deny, None)
}

#[cfg(test)]
mod tests {
    use causeway_broker_api::{PolicyProtocol, PortRange};

    use super::*;

    fn clusters() -> BTreeMap<String, Vec<IpNetwork>> {
        BTreeMap::from([
            ("east".into(), vec!["10.1.0.0/16".parse().unwrap(), "10.101.0.0/16".parse().unwrap()]),
            ("west".into(), vec!["10.2.0.0/16".parse().unwrap()]),
            ("north".into(), vec!["10.3.0.0/16".parse().unwrap()]),
        ])
    }

    fn rule(
        name: &str,
        prio: u32,
        from: Option<&str>,
        to: Option<&str>,
        proto: PolicyProtocol,
        ports: &[&str],
        action: PolicyAction,
    ) -> PolicyRecord {
        PolicyRecord {
            name: name.into(),
            priority: prio,
            from: PolicyPeer { cluster: from.map(Into::into), cidrs: vec![] },
            to: PolicyPeer { cluster: to.map(Into::into), cidrs: vec![] },
            protocol: proto,
            ports: ports.iter().map(|p| p.parse::<PortRange>().unwrap()).collect(),
            action,
            generation: 1,
        }
    }

    fn ip(s: &str) -> std::net::Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn no_rules_and_default_allow_is_off() {
        let c = compile(&PolicyInput { clusters: clusters(), ..Default::default() }).unwrap();
        assert!(!c.tables.enabled);
        assert!(c.tables.verdicts.is_empty());
        assert_eq!(evaluate(&c.tables, ip("10.1.0.5"), ip("10.2.0.5"), 6, 22), (true, None));
    }

    #[test]
    fn deny_by_default_with_one_allowed_port() {
        let input = PolicyInput {
            clusters: clusters(),
            rules: vec![rule(
                "web",
                10,
                Some("east"),
                Some("west"),
                PolicyProtocol::Tcp,
                &["80", "8000-8002"],
                PolicyAction::Allow,
            )],
            default: PolicyAction::Deny,
            ..Default::default()
        };
        let c = compile(&input).unwrap();
        let t = &c.tables;
        assert!(t.enabled && t.default_deny);
        assert_eq!(evaluate(t, ip("10.1.2.3"), ip("10.2.0.9"), 6, 80), (true, Some(0)));
        assert_eq!(
            evaluate(t, ip("10.101.2.3"), ip("10.2.0.9"), 6, 8001),
            (true, Some(0)),
            "service CIDR too"
        );
        assert!(!evaluate(t, ip("10.1.2.3"), ip("10.2.0.9"), 6, 81).0);
        assert!(!evaluate(t, ip("10.1.2.3"), ip("10.2.0.9"), 17, 80).0, "UDP is not TCP");
        assert!(!evaluate(t, ip("10.2.0.9"), ip("10.1.2.3"), 6, 80).0, "the other direction");
        assert!(!evaluate(t, ip("10.3.0.1"), ip("10.2.0.9"), 6, 80).0, "another cluster");
        assert_eq!(c.rule_names, vec!["web"]);
    }

    #[test]
    fn priorities_decide_and_broad_rules_reach_narrow_classes() {
        let mut narrow = rule("no-db", 5, None, None, PolicyProtocol::Tcp, &["5432"], PolicyAction::Deny);
        narrow.to.cidrs = vec!["10.2.5.0/24".parse().unwrap()];
        let input = PolicyInput {
            clusters: clusters(),
            rules: vec![
                rule(
                    "east-to-west",
                    20,
                    Some("east"),
                    Some("west"),
                    PolicyProtocol::Any,
                    &[],
                    PolicyAction::Allow,
                ),
                narrow,
                rule("no-ssh", 1, None, None, PolicyProtocol::Tcp, &["22"], PolicyAction::Deny),
            ],
            default: PolicyAction::Deny,
            ..Default::default()
        };
        let c = compile(&input).unwrap();
        let t = &c.tables;
        assert_eq!(c.rule_names, vec!["no-ssh", "no-db", "east-to-west"]);
        // 10.2.5.9 is in the narrower class of "no-db", but "east-to-west" (naming all of
        // west) still applies there for everything "no-db" does not decide first.
        assert_eq!(evaluate(t, ip("10.1.0.1"), ip("10.2.5.9"), 6, 5432), (false, Some(1)));
        assert_eq!(evaluate(t, ip("10.1.0.1"), ip("10.2.5.9"), 6, 443), (true, Some(2)));
        assert_eq!(evaluate(t, ip("10.1.0.1"), ip("10.2.5.9"), 1, 0), (true, Some(2)), "ICMP");
        assert_eq!(evaluate(t, ip("10.1.0.1"), ip("10.2.0.1"), 6, 22), (false, Some(0)), "priority 1 wins");
        assert_eq!(
            evaluate(t, ip("10.1.0.1"), ip("10.2.0.1"), 6, 5432),
            (true, Some(2)),
            "outside 10.2.5.0/24"
        );
        assert_eq!(evaluate(t, ip("10.3.0.1"), ip("10.2.0.1"), 6, 443), (false, None), "the default");
    }

    #[test]
    fn gateway_probes_pass_a_deny_by_default_set() {
        let input = PolicyInput {
            clusters: clusters(),
            default: PolicyAction::Deny,
            probe_ips: [ip("10.1.0.0"), ip("10.2.0.0")].into_iter().collect(),
            ..Default::default()
        };
        let c = compile(&input).unwrap();
        assert_eq!(c.rule_names, vec![PROBE_RULE]);
        assert_eq!(evaluate(&c.tables, ip("10.1.0.0"), ip("10.2.0.0"), 1, 0), (true, Some(0)));
        assert_eq!(evaluate(&c.tables, ip("10.1.0.0"), ip("10.2.0.0"), 6, 80), (false, None), "only ICMP");
        assert_eq!(
            evaluate(&c.tables, ip("10.1.0.7"), ip("10.2.0.0"), 1, 0),
            (false, None),
            "only the probes"
        );
    }

    #[test]
    fn rules_for_clusters_not_yet_joined_match_nothing() {
        let input = PolicyInput {
            clusters: clusters(),
            rules: vec![rule("future", 1, Some("south"), None, PolicyProtocol::Any, &[], PolicyAction::Deny)],
            default: PolicyAction::Allow,
            ..Default::default()
        };
        let c = compile(&input).unwrap();
        assert_eq!(evaluate(&c.tables, ip("10.1.0.1"), ip("10.2.0.1"), 6, 80), (true, None));
    }

    #[test]
    fn cost_in_the_kernel_is_constant_and_size_stays_linear() {
        // 10,000 rules, each allowing one /32 destination in west: a handful of lookups per
        // packet whatever the count, and about one verdict entry per rule.
        let rules: Vec<PolicyRecord> = (0..10_000u32)
            .map(|i| {
                let mut r = rule(
                    &format!("r{i}"),
                    i,
                    Some("east"),
                    None,
                    PolicyProtocol::Tcp,
                    &["443"],
                    PolicyAction::Allow,
                );
                r.to.cidrs = vec![format!("10.2.{}.{}/32", i / 256, i % 256).parse().unwrap()];
                r
            })
            .collect();
        let c = compile(&PolicyInput {
            clusters: clusters(),
            rules,
            default: PolicyAction::Deny,
            ..Default::default()
        })
        .unwrap();
        assert!(c.tables.verdicts.len() <= 2 * 10_000 + 10, "{}", c.tables.verdicts.len());
        assert_eq!(
            evaluate(&c.tables, ip("10.1.0.1"), ip("10.2.39.15"), 6, 443),
            (true, Some(39 * 256 + 15))
        );
        assert!(!evaluate(&c.tables, ip("10.1.0.1"), ip("10.2.39.15"), 6, 80).0);
    }

    #[test]
    fn huge_expansions_are_refused_not_truncated() {
        let mut rules = Vec::new();
        for i in 0..40u32 {
            let mut r =
                rule(&format!("r{i}"), i, None, None, PolicyProtocol::Tcp, &["1-65535"], PolicyAction::Allow);
            r.from.cidrs = vec![format!("10.9.{i}.0/24").parse().unwrap()];
            rules.push(r);
        }
        let err = compile(&PolicyInput {
            clusters: clusters(),
            rules,
            default: PolicyAction::Deny,
            ..Default::default()
        })
        .unwrap_err();
        assert!(matches!(err, PolicyError::TooLarge { .. }), "{err}");
    }
}
