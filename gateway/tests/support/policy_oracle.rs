//! An independent oracle for the cluster-set policy: the rules as written, evaluated one by
//! one in their documented order (priority, then name; the gateways' probe rule first), the
//! first match deciding. No classes, no tables, no fallbacks: whatever the compiler and the
//! kernel do, they must agree with this. Also the random policies and packets to compare on.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr},
};

use causeway_broker_api::{
    PolicyAction, PolicyPeer, PolicyProtocol, PolicyRecord, PortRange, validate_policy,
};
use causeway_gateway::policy::PolicyInput;
use ipnetwork::{IpNetwork, Ipv4Network};
use proptest::prelude::*;

/// The cluster set every random policy is written against ("south" never joined).
pub fn clusters() -> BTreeMap<String, Vec<IpNetwork>> {
    BTreeMap::from([
        ("east".to_owned(), vec!["10.1.0.0/16".parse().unwrap(), "10.101.0.0/16".parse().unwrap()]),
        ("west".to_owned(), vec!["10.2.0.0/16".parse().unwrap()]),
        ("north".to_owned(), vec!["10.3.0.0/16".parse().unwrap()]),
    ])
}

fn covers(peer: &PolicyPeer, clusters: &BTreeMap<String, Vec<IpNetwork>>, a: Ipv4Addr) -> bool {
    let in_cidrs = peer.cidrs.is_empty() || peer.cidrs.iter().any(|c| c.contains(IpAddr::V4(a)));
    match &peer.cluster {
        None => in_cidrs,
        Some(c) => {
            clusters.get(c).is_some_and(|nets| nets.iter().any(|n| n.contains(IpAddr::V4(a)))) && in_cidrs
        }
    }
}

/// What the policy decides for one packet: (allowed, index of the deciding rule in the order
/// the compiler names them).
pub fn decide(
    input: &PolicyInput,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: u8,
    port: u16,
) -> (bool, Option<u32>) {
    if input.rules.is_empty() && input.default == PolicyAction::Allow {
        return (true, None);
    }
    let mut order: Vec<&PolicyRecord> = input.rules.iter().collect();
    order.sort_by(|a, b| (a.priority, &a.name).cmp(&(b.priority, &b.name)));
    let mut index = 0u32;
    if !input.probe_ips.is_empty() {
        if proto == 1 && input.probe_ips.contains(&src) && input.probe_ips.contains(&dst) {
            return (true, Some(0));
        }
        index = 1;
    }
    let has_ports = proto == 6 || proto == 17;
    for r in order {
        let proto_ok = r.protocol == PolicyProtocol::Any || r.protocol.number() == proto;
        let port_ok =
            r.ports.is_empty() || (has_ports && r.ports.iter().any(|p| (p.first..=p.last).contains(&port)));
        if proto_ok && port_ok && covers(&r.from, &input.clusters, src) && covers(&r.to, &input.clusters, dst)
        {
            return (r.action == PolicyAction::Allow, Some(index));
        }
        index += 1;
    }
    (input.default == PolicyAction::Allow, None)
}

/// A prefix near the clusters' ranges (so rules overlap, nest and cut across clusters).
fn prefix() -> impl Strategy<Value = IpNetwork> {
    (
        prop::sample::select(vec![0u8, 1, 2, 3, 101]),
        0u8..4,
        any::<u8>(),
        prop::sample::select(vec![8u8, 12, 16, 17, 20, 24, 25, 28, 32]),
    )
        .prop_map(|(b, c, d, len)| {
            let n = Ipv4Network::new(Ipv4Addr::new(10, b, c, d), len).unwrap();
            IpNetwork::V4(Ipv4Network::new(n.network(), len).unwrap())
        })
}

fn peer() -> impl Strategy<Value = PolicyPeer> {
    let cluster = prop::option::weighted(0.7, prop::sample::select(vec!["east", "west", "north", "south"]));
    (cluster, prop::collection::vec(prefix(), 0..3))
        .prop_map(|(c, cidrs)| PolicyPeer { cluster: c.map(str::to_owned), cidrs })
}

fn protocol() -> impl Strategy<Value = PolicyProtocol> {
    prop::sample::select(vec![
        PolicyProtocol::Any,
        PolicyProtocol::Tcp,
        PolicyProtocol::Udp,
        PolicyProtocol::Icmp,
    ])
}

/// A small port space, so that ranges overlap and tie.
fn ports() -> impl Strategy<Value = Vec<PortRange>> {
    prop::collection::vec(
        (1u16..20, 0u16..5).prop_map(|(first, span)| PortRange { first, last: first + span }),
        0..3,
    )
}

/// Up to 10 valid rules with tied priorities (0..3) and names in another order than their
/// position, plus a default and sometimes probe addresses.
pub fn policy() -> impl Strategy<Value = PolicyInput> {
    let rule = (0u32..3, peer(), peer(), protocol(), ports(), any::<bool>());
    (
        prop::collection::vec(rule, 0..10),
        any::<bool>(),
        prop::collection::btree_set(
            prop::sample::select(vec![
                Ipv4Addr::new(10, 1, 0, 0),
                Ipv4Addr::new(10, 2, 0, 0),
                Ipv4Addr::new(10, 3, 0, 0),
            ]),
            0..3,
        ),
    )
        .prop_map(|(rules, deny, probe_ips)| {
            let n = rules.len();
            let rules = rules
                .into_iter()
                .enumerate()
                .map(|(i, (priority, from, to, protocol, ports, allow))| PolicyRecord {
                    // Reversed names: the tie-break by name disagrees with insertion order.
                    name: format!("r{}", n - i),
                    priority,
                    from,
                    to,
                    ports: if matches!(protocol, PolicyProtocol::Tcp | PolicyProtocol::Udp) {
                        ports
                    } else {
                        Vec::new()
                    },
                    protocol,
                    action: if allow { PolicyAction::Allow } else { PolicyAction::Deny },
                    generation: 1,
                })
                .filter(|r| validate_policy(r).is_ok())
                .collect();
            PolicyInput {
                clusters: clusters(),
                rules,
                default: if deny { PolicyAction::Deny } else { PolicyAction::Allow },
                probe_ips: probe_ips.into_iter().collect::<BTreeSet<_>>(),
            }
        })
}

/// A packet: (source, destination, IP protocol, destination port).
pub type Packet = (Ipv4Addr, Ipv4Addr, u8, u16);

/// Addresses at the edges of the rules' prefixes and inside the clusters, and strangers.
fn address(input: &PolicyInput) -> BoxedStrategy<Ipv4Addr> {
    let mut edges: Vec<Ipv4Addr> = vec![Ipv4Addr::new(192, 168, 0, 1), Ipv4Addr::new(10, 9, 9, 9)];
    edges.extend(input.probe_ips.iter().copied());
    for r in &input.rules {
        for n in r.from.cidrs.iter().chain(&r.to.cidrs) {
            if let IpNetwork::V4(n) = n {
                edges.push(n.network());
                edges.push(n.broadcast());
            }
        }
    }
    prop_oneof![
        prop::sample::select(edges),
        (prop::sample::select(vec![1u8, 2, 3, 101]), 0u8..4, any::<u8>())
            .prop_map(|(b, c, d)| Ipv4Addr::new(10, b, c, d)),
    ]
    .boxed()
}

/// Packets worth asking about under `input`.
pub fn packets(input: &PolicyInput, n: usize) -> impl Strategy<Value = Vec<Packet>> + use<> {
    let one = (address(input), address(input), prop::sample::select(vec![1u8, 6, 17, 47]), 1u16..26);
    prop::collection::vec(one, n)
}
