//! Property tests: whatever arrives, parsing and validation answer with a value or an error,
//! never a panic; what validates round-trips; overlap detection is symmetric.

use causeway_broker_api::{
    ClusterRecord, Object, PolicyAction, PolicyPeer, PolicyProtocol, PolicyRecord, PortRange, Record,
    check_overlaps, validate::overlaps, validate_cluster, validate_policy,
};
use ipnetwork::{IpNetwork, Ipv4Network};
use proptest::prelude::*;

fn v4_cidr() -> impl Strategy<Value = IpNetwork> {
    (any::<u32>(), 0u8..=32).prop_map(|(addr, len)| {
        IpNetwork::V4(Ipv4Network::new(std::net::Ipv4Addr::from(addr), len).expect("prefix in range"))
    })
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
            global_cidr: None,
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
        let ca = ClusterRecord { cluster_id: "a".into(), pod_cidrs: vec![a], service_cidrs: vec![], global_cidr: None, labels: Default::default(), generation: 1 };
        let cb = ClusterRecord { cluster_id: "b".into(), pod_cidrs: vec![b], ..ca.clone() };
        prop_assert_eq!(check_overlaps(&ca, [&cb]).is_err(), check_overlaps(&cb, [&ca]).is_err());
        // Any prefix overlaps itself and everything inside it.
        prop_assert!(overlaps(&a, &a));
    }
}
