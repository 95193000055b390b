//! Every answer shape of the specification, checked on the wire: each answer is put in a
//! hickory `Message`, encoded and decoded again before it is looked at.

use causeway_broker_api::{
    ExportSource, ImportedCluster, Object, Record as BrokerRecord, ServiceEndpoint, ServiceExportRecord,
    ServiceImportRecord, ServicePort, ServiceType,
};
use hickory_proto::op::{Message, MessageType, OpCode, Query};

use super::*;

fn port(n: u16, name: Option<&str>) -> ServicePort {
    ServicePort { name: name.map(str::to_owned), port: n, protocol: "TCP".into() }
}

fn ep(ip: &str, host: Option<&str>) -> ServiceEndpoint {
    ServiceEndpoint { ip: ip.parse().unwrap(), hostname: host.map(str::to_owned) }
}

fn export(
    cluster: &str,
    name: &str,
    ty: ServiceType,
    ips: &[&str],
    endpoints: Vec<ServiceEndpoint>,
) -> ServiceExportRecord {
    ServiceExportRecord {
        cluster_id: cluster.into(),
        namespace: "shop".into(),
        name: name.into(),
        ips: ips.iter().map(|i| i.parse().unwrap()).collect(),
        ports: vec![],
        service_type: ty,
        endpoints,
        ready_endpoints: None,
        source: ExportSource::Cli,
        generation: 1,
    }
}

fn part(cluster: &str) -> ImportedCluster {
    ImportedCluster { cluster_id: cluster.into(), ports: vec![], excluded: false, conflict: None }
}

/// shop/web: ClusterSetIP 241.0.0.7, exported by east and west, port 80 named http and an
/// unnamed 8080. shop/db: headless, east with db-0, db-1 and an endpoint without a hostname,
/// west with db-0, north excluded by a type conflict, south with no ready endpoint.
fn objects() -> Vec<Object> {
    let records = vec![
        BrokerRecord::ServiceExport(export(
            "east",
            "web",
            ServiceType::ClusterSetIP,
            &["10.101.0.10"],
            vec![],
        )),
        BrokerRecord::ServiceExport(export(
            "west",
            "web",
            ServiceType::ClusterSetIP,
            &["10.102.0.10"],
            vec![],
        )),
        BrokerRecord::ServiceImport(ServiceImportRecord {
            namespace: "shop".into(),
            name: "web".into(),
            service_type: ServiceType::ClusterSetIP,
            ips: vec!["241.0.0.7".parse().unwrap()],
            ports: vec![port(80, Some("http")), port(8080, None)],
            clusters: vec![part("east"), part("west")],
            generation: 1,
        }),
        BrokerRecord::ServiceExport(export(
            "east",
            "db",
            ServiceType::Headless,
            &[],
            vec![ep("10.1.0.5", Some("db-0")), ep("10.1.0.6", Some("db-1")), ep("10.1.0.7", None)],
        )),
        BrokerRecord::ServiceExport(export(
            "west",
            "db",
            ServiceType::Headless,
            &[],
            vec![ep("10.2.0.5", Some("db-0"))],
        )),
        BrokerRecord::ServiceExport(export(
            "north",
            "db",
            ServiceType::ClusterSetIP,
            &["10.103.0.9"],
            vec![],
        )),
        BrokerRecord::ServiceExport(ServiceExportRecord {
            ready_endpoints: Some(0),
            ..export("south", "db", ServiceType::Headless, &[], vec![ep("10.4.0.5", Some("db-0"))])
        }),
        BrokerRecord::ServiceImport(ServiceImportRecord {
            namespace: "shop".into(),
            name: "db".into(),
            service_type: ServiceType::Headless,
            ips: vec![],
            ports: vec![port(5432, Some("pg"))],
            clusters: vec![
                part("east"),
                part("west"),
                ImportedCluster { excluded: true, conflict: Some("type".into()), ..part("north") },
                part("south"),
            ],
            generation: 1,
        }),
    ];
    records.into_iter().enumerate().map(|(i, r)| Object::new(i as u64 + 1, r)).collect()
}

fn catalog() -> Catalog {
    Catalog::new(&objects(), "east", DEFAULT_TTL, 42)
}

fn all_up() -> Health {
    Health::Reachable(["west".to_owned(), "north".to_owned(), "south".to_owned()].into())
}

/// Asks `catalog` and returns the answer as a client decodes it.
fn ask(catalog: &Catalog, name: &str, qtype: RecordType, health: &Health) -> Message {
    let qname = Name::from_ascii(name).unwrap();
    let a = catalog.answer(&qname, qtype, health);
    let mut m = Message::new(7, MessageType::Response, OpCode::Query);
    m.metadata.response_code = a.code;
    m.metadata.authoritative = a.authoritative;
    m.add_query(Query::query(qname, qtype));
    for r in a.answers {
        m.add_answer(r);
    }
    for r in a.soa {
        m.add_authority(r);
    }
    for r in a.additionals {
        m.add_additional(r);
    }
    Message::from_vec(&m.to_vec().unwrap()).unwrap()
}

fn rdata(m: &Message) -> Vec<String> {
    m.answers.iter().map(|r| r.data.to_string()).collect()
}

fn assert_nodata(m: &Message) {
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.answers.is_empty(), "{:?}", m.answers);
    assert_eq!(m.authorities.len(), 1, "NODATA carries the SOA");
    assert_eq!(m.authorities[0].record_type(), RecordType::SOA);
}

fn assert_nxdomain(m: &Message) {
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    assert!(m.answers.is_empty());
    assert_eq!(m.authorities.len(), 1, "NXDOMAIN carries the SOA");
    assert_eq!(m.authorities[0].record_type(), RecordType::SOA);
}

#[test]
fn a_clusterset_ip_service_answers_its_clusterset_ip() {
    let c = catalog();
    let m = ask(&c, "web.shop.svc.clusterset.local.", RecordType::A, &all_up());
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.metadata.authoritative);
    assert_eq!(rdata(&m), vec!["241.0.0.7"]);
    assert_eq!(m.answers[0].ttl, DEFAULT_TTL);
    assert_eq!(m.answers[0].name.to_ascii(), "web.shop.svc.clusterset.local.");
    // Case does not matter.
    assert_eq!(
        rdata(&ask(&c, "WEB.Shop.svc.ClusterSet.LOCAL.", RecordType::A, &all_up())),
        vec!["241.0.0.7"]
    );
    // No IPv6 ClusterSetIP: NODATA, not NXDOMAIN.
    assert_nodata(&ask(&c, "web.shop.svc.clusterset.local.", RecordType::AAAA, &all_up()));
    assert_nodata(&ask(&c, "web.shop.svc.clusterset.local.", RecordType::TXT, &all_up()));
    // The ClusterSetIP stays answered whatever the tunnels do: the nodes choose at connect().
    assert_eq!(
        rdata(&ask(
            &c,
            "web.shop.svc.clusterset.local.",
            RecordType::A,
            &Health::Reachable(Default::default())
        )),
        vec!["241.0.0.7"]
    );
    // Spec §2.3.4: no per-cluster name for a ClusterSetIP service.
    assert_nxdomain(&ask(&c, "west.web.shop.svc.clusterset.local.", RecordType::A, &all_up()));
}

#[test]
fn srv_answers_named_ports_only() {
    let c = catalog();
    let m = ask(&c, "_http._tcp.web.shop.svc.clusterset.local.", RecordType::SRV, &all_up());
    assert_eq!(rdata(&m), vec!["0 100 80 web.shop.svc.clusterset.local."]);
    assert_eq!(m.additionals.iter().map(|r| r.data.to_string()).collect::<Vec<_>>(), vec!["241.0.0.7"]);
    // Unnamed ports have no SRV; unknown names and protocols do not exist.
    assert_nxdomain(&ask(&c, "_https._tcp.web.shop.svc.clusterset.local.", RecordType::SRV, &all_up()));
    assert_nxdomain(&ask(&c, "_http._udp.web.shop.svc.clusterset.local.", RecordType::SRV, &all_up()));
    // The SRV name exists: another type is NODATA; so is the empty non-terminal above it.
    assert_nodata(&ask(&c, "_http._tcp.web.shop.svc.clusterset.local.", RecordType::A, &all_up()));
    assert_nodata(&ask(&c, "_tcp.web.shop.svc.clusterset.local.", RecordType::SRV, &all_up()));
    assert_nxdomain(&ask(&c, "_udp.web.shop.svc.clusterset.local.", RecordType::SRV, &all_up()));
}

#[test]
fn a_headless_service_answers_ready_endpoints_of_reachable_clusters() {
    let c = catalog();
    let m = ask(&c, "db.shop.svc.clusterset.local.", RecordType::A, &all_up());
    // East's three and west's one: north is excluded by its conflict, south has none ready.
    assert_eq!(rdata(&m), vec!["10.1.0.5", "10.1.0.6", "10.1.0.7", "10.2.0.5"]);
    // West's tunnel is down: its endpoint leaves the answer; the local cluster stays.
    let west_down = Health::Reachable(Default::default());
    assert_eq!(
        rdata(&ask(&c, "db.shop.svc.clusterset.local.", RecordType::A, &west_down)),
        vec!["10.1.0.5", "10.1.0.6", "10.1.0.7"]
    );
    // Per cluster and per host.
    assert_eq!(
        rdata(&ask(&c, "west.db.shop.svc.clusterset.local.", RecordType::A, &all_up())),
        vec!["10.2.0.5"]
    );
    assert_nxdomain(&ask(&c, "west.db.shop.svc.clusterset.local.", RecordType::A, &west_down));
    assert_eq!(
        rdata(&ask(&c, "db-1.east.db.shop.svc.clusterset.local.", RecordType::A, &all_up())),
        vec!["10.1.0.6"]
    );
    assert_nxdomain(&ask(&c, "db-9.east.db.shop.svc.clusterset.local.", RecordType::A, &all_up()));
    assert_nxdomain(&ask(&c, "db-0.north.db.shop.svc.clusterset.local.", RecordType::A, &all_up()));
    assert_nxdomain(&ask(&c, "db-0.south.db.shop.svc.clusterset.local.", RecordType::A, &all_up()));
    assert_nodata(&ask(&c, "db.shop.svc.clusterset.local.", RecordType::AAAA, &all_up()));
    // SRV: one per endpoint with a hostname, targets per cluster, addresses in additionals.
    let m = ask(&c, "_pg._tcp.db.shop.svc.clusterset.local.", RecordType::SRV, &all_up());
    assert_eq!(
        rdata(&m),
        vec![
            "0 100 5432 db-0.east.db.shop.svc.clusterset.local.",
            "0 100 5432 db-1.east.db.shop.svc.clusterset.local.",
            "0 100 5432 db-0.west.db.shop.svc.clusterset.local.",
        ]
    );
    assert_eq!(m.additionals.len(), 3);
    // No endpoint of a cluster that is up: NXDOMAIN (spec §2.4.1).
    let only_west = Catalog::new(
        &objects()
            .into_iter()
            .filter(|o| !matches!(&o.record, BrokerRecord::ServiceExport(s) if s.cluster_id == "east"))
            .collect::<Vec<_>>(),
        "east",
        DEFAULT_TTL,
        1,
    );
    assert_nxdomain(&ask(&only_west, "db.shop.svc.clusterset.local.", RecordType::A, &west_down));
    assert_eq!(
        rdata(&ask(&only_west, "db.shop.svc.clusterset.local.", RecordType::A, &all_up())),
        vec!["10.2.0.5"]
    );
}

#[test]
fn ptr_names_clusterset_ips_and_headless_endpoints() {
    let c = catalog();
    let m = ask(&c, "7.0.0.241.in-addr.arpa.", RecordType::PTR, &all_up());
    assert_eq!(rdata(&m), vec!["web.shop.svc.clusterset.local."]);
    let m = ask(&c, "5.0.2.10.in-addr.arpa.", RecordType::PTR, &all_up());
    assert_eq!(rdata(&m), vec!["db-0.west.db.shop.svc.clusterset.local."]);
    // Addresses that are not ours are somebody else's zone.
    assert_eq!(
        ask(&c, "8.0.0.241.in-addr.arpa.", RecordType::PTR, &all_up()).metadata.response_code,
        ResponseCode::Refused
    );
    assert_eq!(
        ask(&c, "7.0.1.10.in-addr.arpa.", RecordType::PTR, &all_up()).metadata.response_code,
        ResponseCode::Refused
    );
    assert_eq!(
        ask(&c, "0.241.in-addr.arpa.", RecordType::PTR, &all_up()).metadata.response_code,
        ResponseCode::Refused
    );
    // IPv6 reverse names parse (nibbles), and unknown ones are refused too.
    let v6: Name = "2001:db8::1".parse::<IpAddr>().map(Name::from).unwrap();
    assert_eq!(reverse_ip(&v6), Some("2001:db8::1".parse().unwrap()));
    assert_eq!(
        ask(&c, &v6.to_ascii(), RecordType::PTR, &all_up()).metadata.response_code,
        ResponseCode::Refused
    );
}

#[test]
fn the_zone_itself_and_names_that_do_not_exist() {
    let c = catalog();
    let m = ask(&c, "dns-version.clusterset.local.", RecordType::TXT, &all_up());
    assert_eq!(rdata(&m), vec!["1.0.0"]);
    let m = ask(&c, "clusterset.local.", RecordType::SOA, &all_up());
    assert_eq!(m.answers.len(), 1);
    assert_eq!(m.answers[0].record_type(), RecordType::SOA);
    assert_nodata(&ask(&c, "clusterset.local.", RecordType::A, &all_up()));
    assert_nodata(&ask(&c, "svc.clusterset.local.", RecordType::A, &all_up()));
    assert_nodata(&ask(&c, "shop.svc.clusterset.local.", RecordType::A, &all_up()));
    assert_nxdomain(&ask(&c, "bank.svc.clusterset.local.", RecordType::A, &all_up()));
    assert_nxdomain(&ask(&c, "cart.shop.svc.clusterset.local.", RecordType::A, &all_up()));
    assert_nxdomain(&ask(&c, "a.b.c.d.e.f.shop.svc.clusterset.local.", RecordType::A, &all_up()));
    assert_nxdomain(&ask(&c, "web.shop.pod.clusterset.local.", RecordType::A, &all_up()));
    // Outside the zone: not ours to answer.
    let m = ask(&c, "example.com.", RecordType::A, &all_up());
    assert_eq!(m.metadata.response_code, ResponseCode::Refused);
    assert!(!m.metadata.authoritative);
    // Unexported: the name goes.
    let none = Catalog::new(&[], "east", DEFAULT_TTL, 1);
    assert_nxdomain(&ask(&none, "web.shop.svc.clusterset.local.", RecordType::A, &all_up()));
    assert_nxdomain(&ask(&none, "shop.svc.clusterset.local.", RecordType::A, &all_up()));
}

#[test]
fn the_ttl_is_configurable_and_the_serial_is_the_revision() {
    let c = Catalog::new(&objects(), "east", 30, 42);
    let m = ask(&c, "web.shop.svc.clusterset.local.", RecordType::A, &all_up());
    assert_eq!(m.answers[0].ttl, 30);
    let m = ask(&c, "clusterset.local.", RecordType::SOA, &all_up());
    match &m.answers[0].data {
        RData::SOA(soa) => {
            assert_eq!(soa.serial, 42);
            assert_eq!(soa.minimum, 30);
        }
        other => panic!("{other:?}"),
    }
}
