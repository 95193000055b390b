//! The policy compiler's tables in the real kernel: packets built here run through the tunnel
//! programs with `BPF_PROG_TEST_RUN` (egress = to a remote cluster, ingress = decrypted from
//! one), verdicts and drop counters read back.
//! Needs root: `#[ignore]`d (reported as skipped) unless run with `--run-ignored all`, as
//! `scripts/test.sh` does; then not being root fails it.

#[path = "support/policy_oracle.rs"]
mod oracle;

use std::collections::{BTreeMap, BTreeSet};

use causeway_broker_api::{PolicyAction, PolicyPeer, PolicyProtocol, PolicyRecord, PortRange};
use causeway_datapath::{Datapath, Stat};
use causeway_gateway::policy::{PolicyInput, compile};
use proptest::{
    strategy::{Strategy as _, ValueTree as _},
    test_runner::TestRunner,
};

const OK: i32 = 0;
const SHOT: i32 = 2;

/// An IPv4 packet: TCP/UDP get ports, ICMP an echo header. `frag` is the fragment offset
/// field (host order), `ihl_words` allows IP options.
fn packet(
    src: [u8; 4],
    dst: [u8; 4],
    proto: u8,
    sport: u16,
    dport: u16,
    frag: u16,
    ihl_words: u8,
) -> Vec<u8> {
    let ihl = usize::from(ihl_words) * 4;
    let l4 = match proto {
        6 => 20,
        _ => 8,
    };
    let mut p = vec![0u8; ihl + l4 + 16];
    p[0] = 0x40 | ihl_words;
    let total = u16::try_from(p.len()).unwrap();
    p[2..4].copy_from_slice(&total.to_be_bytes());
    p[6..8].copy_from_slice(&frag.to_be_bytes());
    p[8] = 64;
    p[9] = proto;
    p[12..16].copy_from_slice(&src);
    p[16..20].copy_from_slice(&dst);
    if proto == 6 || proto == 17 {
        p[ihl..ihl + 2].copy_from_slice(&sport.to_be_bytes());
        p[ihl + 2..ihl + 4].copy_from_slice(&dport.to_be_bytes());
    }
    if proto == 6 {
        p[ihl + 12] = 5 << 4;
        p[ihl + 13] = 0x10; // ACK: no MSS option to clamp
    } else if proto == 1 {
        p[ihl] = 8;
    }
    p
}

fn tcp(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
    packet(src, dst, 6, sport, dport, 0, 5)
}

fn rule(
    name: &str,
    prio: u32,
    from: &str,
    to: &str,
    proto: PolicyProtocol,
    ports: &[&str],
    action: PolicyAction,
) -> PolicyRecord {
    PolicyRecord {
        name: name.into(),
        priority: prio,
        from: PolicyPeer { cluster: Some(from.into()), cidrs: vec![] },
        to: PolicyPeer { cluster: Some(to.into()), cidrs: vec![] },
        protocol: proto,
        ports: ports.iter().map(|p| p.parse::<PortRange>().unwrap()).collect(),
        action,
        generation: 1,
    }
}

fn stat(dp: &Datapath, s: Stat) -> u64 {
    dp.stats().unwrap().into_iter().find(|(k, _)| *k == s).map_or(0, |(_, v)| v)
}

const EAST: [u8; 4] = [10, 1, 0, 5];
const WEST: [u8; 4] = [10, 2, 0, 9];
const NORTH: [u8; 4] = [10, 3, 0, 7];

#[tokio::test]
#[ignore = "privileged: needs root (BPF, namespaces); scripts/test.sh runs it"]
async fn compiled_policy_decides_in_the_kernel_both_ways() {
    causeway_datapath::testing::require_root();
    let mut dp = Datapath::load().expect("loading the datapath");
    // No policy: nothing is looked up, everything passes.
    assert_eq!(dp.test_tunnel(true, &tcp(EAST, WEST, 40000, 22)).unwrap(), OK);

    let clusters = BTreeMap::from([
        ("east".to_owned(), vec!["10.1.0.0/16".parse().unwrap()]),
        ("west".to_owned(), vec!["10.2.0.0/16".parse().unwrap()]),
        ("north".to_owned(), vec!["10.3.0.0/16".parse().unwrap()]),
    ]);
    let input = PolicyInput {
        clusters,
        rules: vec![
            rule("web", 10, "east", "west", PolicyProtocol::Tcp, &["80", "8000-8010"], PolicyAction::Allow),
            rule("ping", 20, "east", "west", PolicyProtocol::Icmp, &[], PolicyAction::Allow),
            rule("no-north", 5, "north", "west", PolicyProtocol::Any, &[], PolicyAction::Deny),
            rule("north-dns", 1, "north", "west", PolicyProtocol::Udp, &["53"], PolicyAction::Allow),
        ],
        default: PolicyAction::Deny,
        ..PolicyInput::default()
    };
    let compiled = compile(&input).unwrap();
    let index = |name: &str| compiled.rule_names.iter().position(|n| n == name).unwrap();
    dp.set_policy(&compiled.tables).unwrap();

    // Egress (east's gateway sending to west) and ingress (west's gateway receiving) agree.
    for egress in [true, false] {
        assert_eq!(dp.test_tunnel(egress, &tcp(EAST, WEST, 40000, 80)).unwrap(), OK, "allowed port");
        assert_eq!(dp.test_tunnel(egress, &tcp(EAST, WEST, 40000, 8005)).unwrap(), OK, "inside the range");
        assert_eq!(dp.test_tunnel(egress, &tcp(EAST, WEST, 40001, 8011)).unwrap(), SHOT, "outside the range");
        assert_eq!(
            dp.test_tunnel(egress, &packet(EAST, WEST, 17, 40002, 80, 0, 5)).unwrap(),
            SHOT,
            "UDP is not TCP"
        );
        assert_eq!(dp.test_tunnel(egress, &packet(EAST, WEST, 1, 0, 0, 0, 5)).unwrap(), OK, "ICMP rule");
        assert_eq!(dp.test_tunnel(egress, &tcp(NORTH, WEST, 40003, 80)).unwrap(), SHOT, "deny rule");
        assert_eq!(
            dp.test_tunnel(egress, &packet(NORTH, WEST, 17, 40004, 53, 0, 5)).unwrap(),
            OK,
            "priority 1 wins"
        );
        // IP options move the ports: still found.
        assert_eq!(
            dp.test_tunnel(egress, &packet(EAST, WEST, 6, 40005, 80, 0, 8)).unwrap(),
            OK,
            "IP options"
        );
        // A non-first fragment has no ports: only port-less rules can allow it.
        assert_eq!(dp.test_tunnel(egress, &packet(EAST, WEST, 6, 0, 0, 185, 5)).unwrap(), SHOT, "fragment");
        // Truncated and IPv6 packets get the default action (deny here).
        assert_eq!(dp.test_tunnel(egress, &[0x45, 0, 0, 20]).unwrap(), SHOT, "truncated");
        let mut v6 = vec![0u8; 60];
        v6[0] = 0x60;
        v6[6] = 6;
        assert_eq!(dp.test_tunnel(egress, &v6).unwrap(), SHOT, "IPv6 gets the default");
    }
    // Six frames per direction were refused: each is counted once, in its own direction.
    assert_eq!(stat(&dp, Stat::PolicyDeniedTx), 6);
    assert_eq!(stat(&dp, Stat::PolicyDeniedRx), 6);
    let (per_rule, default) = dp.policy_drops(compiled.rule_names.len()).unwrap();
    assert_eq!(per_rule[index("no-north")], 2, "one per direction, counted against the deciding rule");
    assert_eq!(per_rule[index("web")], 0);
    // The other five per direction fell through to the default action.
    assert_eq!(default, 10, "refusals counted against the default");

    // The Ethernet flavour (forwarding paths without a tunnel device) decides the same.
    let eth = |p: Vec<u8>, ethertype: u16| {
        let mut f = vec![0u8; 12];
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.extend(p);
        f
    };
    assert_eq!(dp.test_policy_eth(&eth(tcp(EAST, WEST, 43000, 80), 0x0800)).unwrap(), OK);
    assert_eq!(dp.test_policy_eth(&eth(tcp(EAST, WEST, 43000, 81), 0x0800)).unwrap(), SHOT);
    assert_eq!(dp.test_policy_eth(&eth(vec![0; 28], 0x0806)).unwrap(), OK, "ARP is not policed");

    // Replies of an allowed flow pass the other way; other traffic that way does not.
    assert_eq!(dp.test_tunnel(true, &tcp(EAST, WEST, 41000, 80)).unwrap(), OK);
    let replies = stat(&dp, Stat::PolicyReplyAllowed);
    assert_eq!(dp.test_tunnel(false, &tcp(WEST, EAST, 80, 41000)).unwrap(), OK, "the reply");
    assert_eq!(stat(&dp, Stat::PolicyReplyAllowed), replies + 1);
    assert_eq!(dp.test_tunnel(false, &tcp(WEST, EAST, 80, 41001)).unwrap(), SHOT, "not a reply");
    assert_eq!(dp.test_tunnel(false, &tcp(WEST, EAST, 40000, 22)).unwrap(), SHOT, "west may not start flows");
    // ICMP errors about an allowed flow's packets pass (path MTU discovery); others do not.
    // (They come from a router on the path, here an address of north, which may not
    // otherwise send ICMP to east; east → west pings make west → east ICMP a reply.)
    let icmp_error = |kind: u8, quoted: Vec<u8>| {
        let mut p = packet(NORTH, EAST, 1, 0, 0, 0, 5);
        p.truncate(20);
        p.extend_from_slice(&[kind, 4, 0, 0, 0, 0, 0x05, 0x14]); // frag needed, MTU 1300
        p.extend_from_slice(&quoted[..28]);
        let total = u16::try_from(p.len()).unwrap();
        p[2..4].copy_from_slice(&total.to_be_bytes());
        p
    };
    let quoted = tcp(EAST, WEST, 41000, 80);
    assert_eq!(
        dp.test_tunnel(false, &icmp_error(3, quoted.clone())).unwrap(),
        OK,
        "frag needed for an allowed flow"
    );
    assert_eq!(dp.test_tunnel(false, &icmp_error(11, quoted)).unwrap(), OK, "time exceeded");
    let unknown = tcp(EAST, WEST, 41999, 80);
    assert_eq!(dp.test_tunnel(false, &icmp_error(3, unknown)).unwrap(), SHOT, "error about no allowed flow");
    assert_eq!(
        dp.test_tunnel(false, &icmp_error(8, tcp(EAST, WEST, 41000, 80))).unwrap(),
        SHOT,
        "an echo request is no error"
    );

    // A new policy replaces the old one in place: default allow, one deny.
    let input = PolicyInput {
        rules: vec![rule("no-ssh", 1, "east", "west", PolicyProtocol::Tcp, &["22"], PolicyAction::Deny)],
        default: PolicyAction::Allow,
        ..input
    };
    let compiled = compile(&input).unwrap();
    dp.set_policy(&compiled.tables).unwrap();
    dp.clear_policy_flows().unwrap();
    assert_eq!(dp.test_tunnel(true, &tcp(EAST, WEST, 42000, 22)).unwrap(), SHOT);
    assert_eq!(dp.test_tunnel(true, &tcp(EAST, WEST, 42000, 8011)).unwrap(), OK, "now allowed by default");
    assert_eq!(dp.test_tunnel(true, &tcp(NORTH, WEST, 42000, 80)).unwrap(), OK, "old rule gone");
    // And switching it off stops all lookups.
    dp.set_policy(&compile(&PolicyInput::default()).unwrap().tables).unwrap();
    assert_eq!(dp.test_tunnel(true, &tcp(EAST, WEST, 42000, 22)).unwrap(), OK);
}

/// A sample of the random policies that `policy_oracle.rs` checks in userspace, replayed
/// through the kernel program itself: every packet's verdict is the oracle's (or, for a
/// reply of a flow allowed earlier, a pass, which the program remembers on purpose).
#[tokio::test]
#[ignore = "privileged: needs root (BPF, namespaces); scripts/test.sh runs it"]
async fn random_policies_decide_in_the_kernel_as_the_oracle_says() {
    causeway_datapath::testing::require_root();
    let mut dp = Datapath::load().expect("loading the datapath");
    // Deterministic: a failure names a policy that the next run reproduces.
    let mut runner = TestRunner::deterministic();
    let (mut policies, mut checked) = (0, 0);
    let mut sport = 30_000u16;
    while policies < 40 {
        let input = oracle::policy().new_tree(&mut runner).unwrap().current();
        let Ok(compiled) = compile(&input) else { continue };
        policies += 1;
        dp.set_policy(&compiled.tables).unwrap();
        dp.clear_policy_flows().unwrap();
        let mut allowed_flows = BTreeSet::new();
        let packets = oracle::packets(&input, 50).new_tree(&mut runner).unwrap().current();
        for (i, (src, dst, proto, port)) in packets.into_iter().enumerate() {
            let egress = i % 2 == 0;
            // A source port of its own per packet (TCP/UDP): no packet is another's reply.
            sport += 1;
            let frame = packet(src.octets(), dst.octets(), proto, sport, port, 0, 5);
            let ports = if proto == 6 || proto == 17 { (sport, port) } else { (0, 0) };
            let (allow, _) = oracle::decide(&input, src, dst, proto, port);
            let reply = allowed_flows.contains(&(dst, src, ports.1, ports.0, proto));
            let expected = if allow || reply { OK } else { SHOT };
            let verdict = dp.test_tunnel(egress, &frame).unwrap();
            assert_eq!(
                verdict, expected,
                "policy {policies}: {src} → {dst} proto {proto} port {port} (egress {egress}): {input:#?}"
            );
            if verdict == OK && allow {
                allowed_flows.insert((src, dst, ports.0, ports.1, proto));
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 40 * 50);
}

/// A policy change is atomic: while the new tables are written (staged) every packet is still
/// judged by the old policy as a whole; after the one-word switch, by the new one as a whole;
/// nothing of the old generation is left behind; and an update abandoned half-way (a full
/// map, a crash) leaves the live policy in force and is cleaned up by the next one.
#[tokio::test]
#[ignore = "privileged: needs root (BPF, namespaces); scripts/test.sh runs it"]
async fn a_policy_change_is_atomic() {
    causeway_datapath::testing::require_root();
    let mut dp = Datapath::load().expect("loading the datapath");
    let clusters = BTreeMap::from([
        ("east".to_owned(), vec!["10.1.0.0/16".parse().unwrap()]),
        ("west".to_owned(), vec!["10.2.0.0/16".parse().unwrap()]),
        ("north".to_owned(), vec!["10.3.0.0/16".parse().unwrap()]),
    ]);
    // Two policies that disagree on every probe below, with different default verdicts.
    let one = PolicyInput {
        clusters: clusters.clone(),
        rules: vec![
            rule("web", 10, "east", "west", PolicyProtocol::Tcp, &["80"], PolicyAction::Allow),
            rule("north", 20, "north", "west", PolicyProtocol::Any, &[], PolicyAction::Deny),
        ],
        default: PolicyAction::Deny,
        ..PolicyInput::default()
    };
    let two = PolicyInput {
        clusters,
        rules: vec![
            rule("web", 10, "east", "west", PolicyProtocol::Tcp, &["80"], PolicyAction::Deny),
            rule("north", 20, "north", "west", PolicyProtocol::Any, &[], PolicyAction::Allow),
        ],
        default: PolicyAction::Allow,
        ..PolicyInput::default()
    };
    let probes = [
        tcp(EAST, WEST, 40000, 80),
        tcp(NORTH, WEST, 40001, 22),
        tcp(EAST, WEST, 40002, 443),
        packet(EAST, NORTH, 17, 40003, 53, 0, 5),
    ];
    let verdicts = |dp: &mut Datapath| -> Vec<i32> {
        dp.clear_policy_flows().unwrap();
        probes.iter().map(|p| dp.test_tunnel(true, p).unwrap()).collect()
    };
    let (one_c, two_c) = (compile(&one).unwrap(), compile(&two).unwrap());
    let sizes = |c: &causeway_gateway::policy::Compiled| {
        (c.tables.src_v4.len(), c.tables.dst_v4.len(), c.tables.verdicts.len())
    };

    dp.set_policy(&one_c.tables).unwrap();
    let under_one = verdicts(&mut dp);
    assert_eq!(under_one, vec![OK, SHOT, SHOT, SHOT], "policy one");
    assert_eq!(dp.policy_table_sizes().unwrap(), sizes(&one_c), "only the live generation is held");

    // Staged, not live: both generations are in the maps, and the old one decides alone.
    let staged = dp.stage_policy(&two_c.tables).unwrap();
    let (s1, d1, v1) = sizes(&one_c);
    let (s2, d2, v2) = sizes(&two_c);
    assert_eq!(dp.policy_table_sizes().unwrap(), (s1 + s2, d1 + d2, v1 + v2));
    assert_eq!(verdicts(&mut dp), under_one, "a staged policy decides nothing");

    // The switch: policy two as a whole, default included; policy one's entries are gone.
    dp.commit_policy(staged).unwrap();
    let under_two = verdicts(&mut dp);
    assert_eq!(under_two, vec![SHOT, OK, OK, OK], "policy two");
    assert_eq!(dp.policy_table_sizes().unwrap(), sizes(&two_c));

    // An update abandoned after staging: policy two stays in force; the next update clears
    // the leftovers before it writes.
    let _abandoned = dp.stage_policy(&one_c.tables).unwrap();
    assert_eq!(verdicts(&mut dp), under_two);
    dp.set_policy(&one_c.tables).unwrap();
    assert_eq!(verdicts(&mut dp), under_one);
    assert_eq!(dp.policy_table_sizes().unwrap(), sizes(&one_c));

    // Switching enforcement off and on keeps the live generation.
    dp.set_policy_enabled(false).unwrap();
    assert_eq!(verdicts(&mut dp), vec![OK; 4]);
    dp.set_policy_enabled(true).unwrap();
    assert_eq!(verdicts(&mut dp), under_one);
}
