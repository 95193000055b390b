//! Property tests: whatever arrives, parsing and validation answer with a value or an error,
//! never a panic; what validates round-trips; overlap detection (IPv4 and IPv6) agrees with an
//! independent oracle that intersects the prefixes' address intervals.

use causeway_broker_api::{
    ClusterRecord, Object, PolicyAction, PolicyPeer, PolicyProtocol, PolicyRecord, PortRange, Record,
    check_overlaps, validate::overlaps, validate_cluster, validate_policy,
};
use ipnetwork::{IpNetwork, Ipv4Network, Ipv6Network};
use proptest::prelude::*;

fn v4_cidr() -> impl Strategy<Value = IpNetwork> {
    (any::<u32>(), 0u8..=32).prop_map(|(addr, len)| {
        IpNetwork::V4(Ipv4Network::new(std::net::Ipv4Addr::from(addr), len).expect("prefix in range"))
    })
}

/// Pairs of prefixes that are often nested or adjacent, either family: a shared base address,
/// each prefix taken at its own length with some low bits changed.
fn related_pair() -> impl Strategy<Value = (IpNetwork, IpNetwork)> {
    let v4 =
        (any::<u32>(), 0u8..=32, 0u8..=32, any::<u32>(), 0u32..32).prop_map(|(base, la, lb, noise, bits)| {
            let other = base ^ (noise & ((1u64 << bits) - 1) as u32);
            (
                IpNetwork::V4(Ipv4Network::new(base.into(), la).unwrap()),
                IpNetwork::V4(Ipv4Network::new(other.into(), lb).unwrap()),
            )
        });
    let v6 = (any::<u128>(), 0u8..=128, 0u8..=128, any::<u128>(), 0u32..128).prop_map(
        |(base, la, lb, noise, bits)| {
            let other = base ^ (noise & ((1u128 << bits) - 1));
            (
                IpNetwork::V6(Ipv6Network::new(base.into(), la).unwrap()),
                IpNetwork::V6(Ipv6Network::new(other.into(), lb).unwrap()),
            )
        },
    );
    let mixed = (v4_cidr(), any::<u128>(), 0u8..=128)
        .prop_map(|(a, b, l)| (a, IpNetwork::V6(Ipv6Network::new(b.into(), l).unwrap())));
    prop_oneof![4 => v4, 4 => v6, 1 => mixed]
}

/// The oracle: a prefix as the closed interval of its addresses, one number line per family.
fn interval(n: &IpNetwork) -> (bool, u128, u128) {
    match n {
        IpNetwork::V4(n) => {
            let lo = u32::from(n.ip()) & !(u32::MAX.checked_shr(u32::from(n.prefix())).unwrap_or(0));
            let size = 1u64 << (32 - u32::from(n.prefix()));
            (false, u128::from(lo), u128::from(lo) + u128::from(size) - 1)
        }
        IpNetwork::V6(n) => {
            let host = u128::MAX.checked_shr(u32::from(n.prefix())).unwrap_or(0);
            let lo = u128::from(n.ip()) & !host;
            (true, lo, lo | host)
        }
    }
}

fn intersect(a: &IpNetwork, b: &IpNetwork) -> bool {
    let ((fa, la, ha), (fb, lb, hb)) = (interval(a), interval(b));
    fa == fb && la <= hb && lb <= ha
}

fn record(id: &str, cidrs: Vec<IpNetwork>) -> ClusterRecord {
    ClusterRecord {
        cluster_id: id.into(),
        pod_cidrs: cidrs,
        service_cidrs: vec![],
        global_cidrs: Vec::new(),
        labels: Default::default(),
        generation: 1,
    }
}

fn cluster_id() -> impl Strategy<Value = String> {
    prop_oneof!["[a-z][a-z0-9-]{0,20}[a-z0-9]", ".{0,70}", "[A-Z_.]{1,5}"]
}

fn cluster() -> impl Strategy<Value = ClusterRecord> {
    (
        cluster_id(),
        prop::collection::vec(v4_cidr(), 0..4),
        prop::collection::vec(v4_cidr(), 0..4),
        any::<u64>(),
    )
        .prop_map(|(cluster_id, pod_cidrs, service_cidrs, generation)| ClusterRecord {
            cluster_id,
            pod_cidrs,
            service_cidrs,
            global_cidrs: Vec::new(),
            labels: Default::default(),
            generation,
        })
}

fn policy() -> impl Strategy<Value = PolicyRecord> {
    (
        cluster_id(),
        prop::option::of(cluster_id()),
        prop::collection::vec(v4_cidr(), 0..3),
        prop_oneof![
            Just(PolicyProtocol::Any),
            Just(PolicyProtocol::Tcp),
            Just(PolicyProtocol::Udp),
            Just(PolicyProtocol::Icmp)
        ],
        prop::collection::vec((any::<u16>(), any::<u16>()), 0..3),
        any::<bool>(),
    )
        .prop_map(|(name, cluster, cidrs, protocol, ports, deny)| PolicyRecord {
            name,
            priority: 1,
            from: PolicyPeer { cluster, cidrs },
            to: PolicyPeer::default(),
            protocol,
            ports: ports.into_iter().map(|(first, last)| PortRange { first, last }).collect(),
            action: if deny { PolicyAction::Deny } else { PolicyAction::Allow },
            generation: 1,
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2_000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic_the_parser(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = serde_json::from_slice::<Record>(&bytes);
        let _ = serde_json::from_slice::<Object>(&bytes);
    }

    #[test]
    fn arbitrary_json_shapes_never_panic_the_parser(
        kind in prop_oneof![Just("Cluster".to_owned()), Just("Endpoint".to_owned()), ".{0,8}"],
        field in "[a-zA-Z]{1,12}",
        value in prop_oneof![Just("null".to_owned()), Just("[]".to_owned()), any::<i64>().prop_map(|n| n.to_string()), ".{0,20}".prop_map(|s| format!("{s:?}"))],
    ) {
        let doc = format!(r#"{{"kind":{kind:?},"spec":{{"clusterId":"a","podCidrs":["10.0.0.0/8"],"serviceCidrs":[],{field:?}:{value}}}}}"#);
        if let Ok(Record::Cluster(c)) = serde_json::from_str::<Record>(&doc) {
            let _ = validate_cluster(&c);
        }
    }

    #[test]
    fn validation_never_panics_and_valid_records_round_trip(c in cluster()) {
        if validate_cluster(&c).is_ok() {
            let json = serde_json::to_string(&Record::Cluster(c.clone())).unwrap();
            let back: Record = serde_json::from_str(&json).unwrap();
            prop_assert_eq!(back, Record::Cluster(c.clone()));
            prop_assert!(!c.pod_cidrs.is_empty());
            let ok = c.cluster_id.len() <= 63
                && c.cluster_id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
            prop_assert!(ok, "an invalid id passed: {:?}", c.cluster_id);
        }
    }

    #[test]
    fn policy_validation_never_panics_and_valid_rules_round_trip(p in policy(), text in ".{0,12}") {
        let _ = text.parse::<PortRange>();
        if validate_policy(&p).is_ok() {
            let json = serde_json::to_string(&Record::Policy(p.clone())).unwrap();
            let back: Record = serde_json::from_str(&json).unwrap();
            prop_assert_eq!(back, Record::Policy(p.clone()));
            prop_assert!(p.ports.iter().all(|r| r.first >= 1 && r.first <= r.last));
            prop_assert!(p.ports.is_empty() || matches!(p.protocol, PolicyProtocol::Tcp | PolicyProtocol::Udp));
        }
    }

    #[test]
    fn overlap_detection_is_symmetric(a in v4_cidr(), b in v4_cidr()) {
        prop_assert_eq!(overlaps(&a, &b), overlaps(&b, &a));
        let ca = ClusterRecord { cluster_id: "a".into(), pod_cidrs: vec![a], service_cidrs: vec![], global_cidrs: Vec::new(), labels: Default::default(), generation: 1 };
        let cb = ClusterRecord { cluster_id: "b".into(), pod_cidrs: vec![b], ..ca.clone() };
        prop_assert_eq!(check_overlaps(&ca, [&cb]).is_err(), check_overlaps(&cb, [&ca]).is_err());
        // Any prefix overlaps itself and everything inside it.
        prop_assert!(overlaps(&a, &a));
    }

    #[test]
    fn overlap_detection_agrees_with_interval_intersection((a, b) in related_pair()) {
        prop_assert_eq!(overlaps(&a, &b), intersect(&a, &b), "{} vs {}", a, b);
    }

    #[test]
    fn a_cluster_is_refused_exactly_when_one_of_its_prefixes_meets_another_clusters(
        ours in prop::collection::vec(related_pair(), 1..4),
        theirs in prop::collection::vec(prop::collection::vec(related_pair(), 0..3), 0..4),
    ) {
        // Each of our prefixes comes with a relative: spread those over the other clusters.
        let candidate = record("cand", ours.iter().map(|p| p.0).collect());
        let mut others: Vec<ClusterRecord> = theirs
            .iter()
            .enumerate()
            .map(|(i, ps)| record(&format!("c{i}"), ps.iter().map(|p| p.1).collect()))
            .collect();
        others.push(record("rel", ours.iter().map(|p| p.1).collect()));
        // Our own earlier version never counts against us.
        others.push(record("cand", ours.iter().map(|p| p.1).collect()));
        let clash = |o: &ClusterRecord| {
            o.cluster_id != "cand" && candidate.pod_cidrs.iter().any(|a| o.pod_cidrs.iter().any(|b| intersect(a, b)))
        };
        let expected = others.iter().any(clash);
        match check_overlaps(&candidate, &others) {
            Ok(()) => prop_assert!(!expected, "an overlap went unnoticed"),
            Err(e) => {
                prop_assert!(expected, "refused without an overlap: {}", e);
                prop_assert!(intersect(&e.ours, &e.theirs), "the named prefixes do not meet: {}", e);
                let named = others.iter().find(|o| o.cluster_id == e.other_cluster).unwrap();
                prop_assert!(clash(named) && named.pod_cidrs.contains(&e.theirs) && candidate.pod_cidrs.contains(&e.ours));
            }
        }
    }
}
