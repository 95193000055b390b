//! The socket programs in the kernel: attached to a fresh cgroup v2 directory, they send a
//! process's connections to a ClusterSetIP port to its backends (both backends used, each
//! connection whole on one), refuse a port without backends with EPERM, translate UDP too,
//! give the ClusterSetIP back as a reply's source and as the peer's address, leave processes
//! outside the cgroup alone, and follow a new backend list at once.
//! Everything stays on loopback: the "ClusterSetIPs" here are 127.77.0.x. Needs root.

use std::{
    collections::BTreeMap,
    io::Write as _,
    net::{Ipv4Addr, SocketAddrV4, TcpListener, UdpSocket},
    path::PathBuf,
    process::Command,
};

use causeway_datapath::sockets::{Proto, ServiceSockets};
use causeway_datapath_common::ServiceStat;

/// The cgroup v2 mount (`/sys/fs/cgroup` on a unified host, `/sys/fs/cgroup/unified` on a
/// hybrid one like this CI's).
fn cgroup2_root() -> PathBuf {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    mounts
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(f[1]))
        })
        .expect("a cgroup2 mount")
}

struct Cgroup(PathBuf);

impl Drop for Cgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// A TCP server on loopback that answers every connection with `label` and closes it.
fn labelled_server(label: &'static str) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let mut s = s;
            let _ = s.write_all(format!("{label}\n").as_bytes());
        }
    });
    port
}

/// `script` run by bash inside the cgroup: (exit status, stdout, stderr).
fn in_cgroup(cg: &Cgroup, script: &str) -> (bool, String, String) {
    let full = format!("echo $$ > {}/cgroup.procs && {script}", cg.0.display());
    let out = Command::new("bash").args(["-c", &full]).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
#[ignore = "needs root and BPF; run with --run-ignored all"]
fn connections_to_a_clusterset_ip_reach_its_backends_and_only_inside_the_cgroup() {
    causeway_datapath::testing::require_root();
    let cg = Cgroup(cgroup2_root().join(format!("causeway-sockets-test-{}", std::process::id())));
    std::fs::create_dir_all(&cg.0).unwrap();
    let mut sockets = ServiceSockets::attach(&cg.0).expect("attaching the socket programs");

    let (a, b) = (labelled_server("A"), labelled_server("B"));
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    let udp_port = udp.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        while let Ok((n, from)) = udp.recv_from(&mut buf) {
            let _ = udp.send_to(&[b"echo:", &buf[..n]].concat(), from);
        }
    });
    let vip = Ipv4Addr::new(127, 77, 0, 9);
    let dead = Ipv4Addr::new(127, 77, 0, 10);
    let lo = |p| SocketAddrV4::new(Ipv4Addr::LOCALHOST, p);
    let mut want = BTreeMap::new();
    want.insert((vip, 80, Proto::Tcp), vec![lo(a), lo(b)]);
    want.insert((vip, 53, Proto::Udp), vec![lo(udp_port)]);
    want.insert((dead, 80, Proto::Tcp), vec![]);
    sockets.sync(&want).unwrap();

    // 20 connections: every one answered whole by A or B, and both are used.
    let (ok, out, err) = in_cgroup(
        &cg,
        "for i in $(seq 20); do exec 3<>/dev/tcp/127.77.0.9/80 && read -r line <&3 && echo $line; exec 3<&-; done",
    );
    assert!(ok, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 20, "{out}");
    assert!(lines.iter().all(|l| *l == "A" || *l == "B"), "{out}");
    assert!(lines.contains(&"A") && lines.contains(&"B"), "both backends get connections: {out}");

    // UDP to the ClusterSetIP is answered by its backend (`dd` reads one whole datagram;
    // bash's `read` would take it a byte at a time and lose the rest).
    let (ok, out, err) = in_cgroup(
        &cg,
        "exec 3<>/dev/udp/127.77.0.9/53 && echo ping >&3 && timeout 3 dd bs=64 count=1 status=none <&3",
    );
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "echo:ping");

    // This very process joins the cgroup for a moment: an unconnected UDP socket's reply
    // comes from the ClusterSetIP it wrote to (recvmsg), and a TCP socket's peer is the
    // ClusterSetIP (getpeername), though the backends are on 127.0.0.1.
    {
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
        let home = own.lines().find_map(|l| l.strip_prefix("0::")).expect("a cgroup v2 path").to_owned();
        let pid = std::process::id().to_string();
        std::fs::write(cg.0.join("cgroup.procs"), &pid).unwrap();
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        udp.set_read_timeout(Some(std::time::Duration::from_secs(3))).unwrap();
        udp.send_to(b"x", "127.77.0.9:53").unwrap();
        let mut buf = [0u8; 64];
        let got = udp.recv_from(&mut buf);
        let tcp = std::net::TcpStream::connect("127.77.0.9:80");
        let peer = tcp.as_ref().map(|t| t.peer_addr());
        std::fs::write(cgroup2_root().join(home.trim_start_matches('/')).join("cgroup.procs"), &pid).unwrap();
        let (n, from) = got.unwrap();
        assert_eq!(&buf[..n], b"echo:x");
        assert_eq!(from.to_string(), "127.77.0.9:53", "the reply shows the ClusterSetIP");
        assert_eq!(peer.unwrap().unwrap().to_string(), "127.77.0.9:80", "getpeername shows the ClusterSetIP");
    }

    // A port with no backend (every cluster serving it unreachable) is refused at once.
    let (ok, _, err) = in_cgroup(&cg, "exec 3<>/dev/tcp/127.77.0.10/80");
    assert!(!ok);
    assert!(err.contains("Operation not permitted"), "{err}");

    // Outside the cgroup nothing is translated: the test process itself reaches nothing there.
    let outside = std::net::TcpStream::connect_timeout(
        &"127.77.0.9:80".parse().unwrap(),
        std::time::Duration::from_secs(2),
    );
    assert!(outside.is_err(), "no translation outside the cgroup");

    // A new backend list is followed by the next connection; an established one stays.
    let (ok, out, _) = in_cgroup(&cg, "exec 4<>/dev/tcp/127.77.0.9/80; read -r first <&4; echo $first");
    assert!(ok);
    assert!(out.trim() == "A" || out.trim() == "B");
    want.insert((vip, 80, Proto::Tcp), vec![lo(b)]);
    sockets.sync(&want).unwrap();
    let (ok, out, _) = in_cgroup(
        &cg,
        "for i in $(seq 10); do exec 3<>/dev/tcp/127.77.0.9/80 && read -r line <&3 && echo $line; exec 3<&-; done",
    );
    assert!(ok);
    assert!(out.lines().all(|l| l == "B") && out.lines().count() == 10, "{out}");
    // Withdrawn: the address is just an address again (nothing listens on 127.77.0.9:80).
    want.clear();
    sockets.sync(&want).unwrap();
    let (ok, _, err) = in_cgroup(&cg, "exec 3<>/dev/tcp/127.77.0.9/80");
    assert!(!ok);
    assert!(err.contains("Connection refused"), "{err}");

    let stats: BTreeMap<u32, u64> =
        sockets.stats().unwrap().into_iter().map(|(s, n)| (s as u32, n)).collect();
    assert!(stats[&(ServiceStat::Translated as u32)] >= 34, "{stats:?}");
    assert!(stats[&(ServiceStat::Reversed as u32)] >= 2, "{stats:?}");
    assert_eq!(stats[&(ServiceStat::NoBackend as u32)], 1, "{stats:?}");
    drop(sockets);
}

/// How many programs `bpftool` sees attached to the cgroup.
fn attached_programs(cg: &Cgroup) -> usize {
    let out = Command::new("bpftool").args(["cgroup", "show"]).arg(&cg.0).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // A header line, then one line per attached program (names cut at 15 characters).
    String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.contains("service_")).count()
}

/// The first line the ClusterSetIP port 127.77.0.11:80 answers inside the cgroup, or the error.
fn first_line(cg: &Cgroup) -> Result<String, String> {
    let (ok, out, err) = in_cgroup(cg, "exec 3<>/dev/tcp/127.77.0.11/80 && read -r line <&3 && echo $line");
    if ok { Ok(out.trim().to_owned()) } else { Err(err) }
}

#[test]
#[ignore = "needs root and BPF; run with --run-ignored all"]
fn pinned_socket_programs_outlive_their_process_and_a_restart_takes_them_over() {
    causeway_datapath::testing::require_root();
    let cg = Cgroup(cgroup2_root().join(format!("causeway-sockets-pin-{}", std::process::id())));
    std::fs::create_dir_all(&cg.0).unwrap();
    // On /run (a tmpfs): attach_pinned mounts its own bpffs there.
    let dir = PathBuf::from(format!("/run/causeway-sockets-pin-{}", std::process::id()));
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = causeway_datapath::PinDir::at(&self.0).remove();
            let _ = Command::new("umount").arg(&self.0).status();
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _unmount = Unmount(dir.clone());
    let (a, b) = (labelled_server("A"), labelled_server("B"));
    let vip = Ipv4Addr::new(127, 77, 0, 11);
    let lo = |p| SocketAddrV4::new(Ipv4Addr::LOCALHOST, p);
    let port = (vip, 80, Proto::Tcp);

    let mut first = ServiceSockets::attach_pinned(&cg.0, &dir).expect("first attach");
    first.sync(&BTreeMap::from([(port, vec![lo(a)])])).unwrap();
    assert_eq!(first_line(&cg), Ok("A".into()));
    drop(first);
    // No process holds them now: the pins keep the programs translating with their map.
    assert_eq!(first_line(&cg), Ok("A".into()), "the programs left with their process");
    assert_eq!(attached_programs(&cg), 4);

    // The next run reuses the map (its counters and backends are there before any sync) and
    // takes the links over: still four programs attached, not eight.
    let mut second = ServiceSockets::attach_pinned(&cg.0, &dir).expect("second attach");
    assert_eq!(attached_programs(&cg), 4, "the first run's programs were not replaced");
    let translated = |s: &ServiceSockets| {
        s.stats().unwrap().into_iter().find(|(k, _)| *k == ServiceStat::Translated).unwrap().1
    };
    assert!(translated(&second) >= 2, "the pinned counters were not reused");
    assert_eq!(first_line(&cg), Ok("A".into()), "the reused map lost its backends");
    second.sync(&BTreeMap::from([(port, vec![lo(b)])])).unwrap();
    assert_eq!(first_line(&cg), Ok("B".into()));
    // What the first run installed is the second's to withdraw.
    second.sync(&BTreeMap::new()).unwrap();
    let refused = first_line(&cg).unwrap_err();
    assert!(refused.contains("Connection refused"), "{refused}");

    // Removing the pins (`causeway cleanup`) detaches them once no process holds them.
    second.sync(&BTreeMap::from([(port, vec![lo(a)])])).unwrap();
    drop(second);
    causeway_datapath::PinDir::at(&dir).remove().unwrap();
    assert_eq!(attached_programs(&cg), 0, "programs stayed attached without pins");
    let refused = first_line(&cg).unwrap_err();
    assert!(refused.contains("Connection refused"), "{refused}");
}
