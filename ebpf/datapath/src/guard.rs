//! The uplink guard: what may reach the WireGuard port (well-formed messages, data only from
//! known peers' sessions, handshakes within a per-source budget), at XDP or TC.

use aya::programs::{TcAttachType, Xdp, XdpMode, links::FdLink, xdp::XdpLink};
use causeway_datapath_common::{Config, PeerSession, maps, programs};
use tracing::{info, warn};

use crate::{
    Datapath, DatapathError,
    attach::{link_err, pin_link, pinned_link, unpin_stale},
    ignore_not_found, map_err,
};

/// Where the uplink guard runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UplinkHook {
    /// XDP: drops before the kernel allocates anything. The choice for a physical NIC.
    Xdp,
    /// TC ingress: after the socket buffer exists. The choice for a veth uplink, where an XDP
    /// program makes the peer segment every GSO run (and copies every packet into XDP's
    /// layout), which costs more than the guard saves.
    Tc,
}

/// The uplink guard's verdict on one frame (from a test run).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuardVerdict {
    Pass,
    Drop,
    /// A return code the guard never gives (a bug).
    Other(i64),
}

impl Datapath {
    /// Attaches the uplink guard to `ifname` at `hook`: datagrams to `wireguard_port` must be
    /// well-formed WireGuard messages, data messages must come from a known peer
    /// ([`Self::set_known_peers`]), handshake initiations are limited to `rate` per second per
    /// source with bursts of `burst`. XDP: native where the driver has it, generic otherwise.
    pub fn attach_uplink_guard(
        &mut self,
        ifname: &str,
        hook: UplinkHook,
        wireguard_port: u16,
        rate: u32,
        burst: u32,
    ) -> Result<(), DatapathError> {
        if hook == UplinkHook::Tc {
            self.configure_uplink_guard(wireguard_port, rate, burst)?;
            return self.attach_tc(programs::UPLINK_GUARD_TC, ifname, TcAttachType::Ingress);
        }
        let name = programs::UPLINK_GUARD;
        let pin = self.pins.as_ref().map(|p| p.link(name, ifname));
        let prog = self.load_uplink_guard(wireguard_port, rate, burst)?;
        let perr = |source| DatapathError::Program { name, source };
        if let Some(path) = &pin
            && let Some(link) = pinned_link(name, path)?
        {
            match XdpLink::try_from(link) {
                Ok(link) => match prog.attach_to_link(link) {
                    Ok(id) => {
                        drop(prog.take_link(id).map_err(perr)?);
                        info!(program = name, interface = ifname, "replaced the program in its pinned link");
                        self.attached.push(path.clone());
                        return Ok(());
                    }
                    Err(e) => warn!(program = name, error = %e, "pinned link is defunct; attaching afresh"),
                },
                Err(e) => {
                    warn!(program = name, error = %e, "pinned object is not an XDP link; attaching afresh")
                }
            }
            unpin_stale(name, path)?;
        }
        let id = match prog.attach(ifname, XdpMode::Default) {
            Ok(id) => id,
            Err(e) => {
                warn!(interface = ifname, error = %e, "native XDP unavailable; using generic XDP");
                prog.attach(ifname, XdpMode::Skb).map_err(perr)?
            }
        };
        if let Some(path) = pin {
            let link = FdLink::try_from(prog.take_link(id).map_err(perr)?).map_err(link_err(name, &path))?;
            pin_link(name, link, &path)?;
            self.attached.push(path);
        }
        info!(program = name, interface = ifname, wireguard_port, "attached");
        Ok(())
    }

    /// Sets the uplink guard's port and handshake limits (shared by both hooks).
    pub(crate) fn configure_uplink_guard(
        &mut self,
        wireguard_port: u16,
        rate: u32,
        burst: u32,
    ) -> Result<(), DatapathError> {
        for (cfg, v) in [
            (Config::WireGuardPort, u32::from(wireguard_port)),
            (Config::HandshakeRate, rate),
            (Config::HandshakeBurst, burst),
        ] {
            self.config.set(cfg as u32, v, 0).map_err(map_err(maps::CONFIG))?;
        }
        Ok(())
    }

    /// Configures and loads (once) the XDP uplink guard without attaching it.
    pub(crate) fn load_uplink_guard(
        &mut self,
        wireguard_port: u16,
        rate: u32,
        burst: u32,
    ) -> Result<&mut Xdp, DatapathError> {
        self.configure_uplink_guard(wireguard_port, rate, burst)?;
        let name = programs::UPLINK_GUARD;
        let prog: &mut Xdp = self
            .ebpf
            .program_mut(name)
            .ok_or(DatapathError::Missing { what: "program", name })?
            .try_into()
            .map_err(|source| DatapathError::Program { name, source })?;
        if prog.fd().is_err() {
            prog.load().map_err(|source| DatapathError::Program { name, source })?;
        }
        Ok(prog)
    }

    /// Lets the STUN responder at `server` answer on the WireGuard port (binding success
    /// responses from exactly that address and port; the cable checks the transaction).
    /// `None`: no STUN message passes.
    pub fn set_stun_server(&mut self, server: Option<std::net::SocketAddrV4>) -> Result<(), DatapathError> {
        let (ip, port) =
            server.map_or((0, 0), |s| (u32::from_ne_bytes(s.ip().octets()), u32::from(s.port())));
        for (cfg, v) in [(Config::StunServer, ip), (Config::StunPort, port)] {
            self.config.set(cfg as u32, v, 0).map_err(map_err(maps::CONFIG))?;
        }
        Ok(())
    }

    /// Makes the known-peer set equal `peers` (the addresses data messages may come from).
    pub fn set_known_peers(
        &mut self,
        peers: &std::collections::BTreeSet<std::net::Ipv4Addr>,
    ) -> Result<(), DatapathError> {
        let want: std::collections::BTreeSet<u32> =
            peers.iter().map(|a| u32::from_ne_bytes(a.octets())).collect();
        let have: std::collections::BTreeSet<u32> =
            self.known_peers.keys().collect::<Result<_, _>>().map_err(map_err(maps::KNOWN_PEERS_V4))?;
        for k in have.difference(&want) {
            ignore_not_found(self.known_peers.remove(k).map_err(map_err(maps::KNOWN_PEERS_V4)))?;
        }
        for k in want.difference(&have) {
            self.known_peers.insert(k, 1, 0).map_err(map_err(maps::KNOWN_PEERS_V4))?;
        }
        Ok(())
    }

    /// Makes the (peer address, session index) set equal `sessions`: the data messages the
    /// guard lets through (with [`Self::set_known_peers`] for the addresses themselves).
    pub fn set_peer_sessions(
        &mut self,
        sessions: &std::collections::BTreeSet<(std::net::Ipv4Addr, u32)>,
    ) -> Result<(), DatapathError> {
        let want: std::collections::BTreeSet<PeerSession> = sessions
            .iter()
            .map(|(a, index)| PeerSession { addr: u32::from_ne_bytes(a.octets()), index: *index })
            .collect();
        let have: std::collections::BTreeSet<PeerSession> =
            self.peer_sessions.keys().collect::<Result<_, _>>().map_err(map_err(maps::PEER_SESSIONS_V4))?;
        for k in have.difference(&want) {
            ignore_not_found(self.peer_sessions.remove(k).map_err(map_err(maps::PEER_SESSIONS_V4)))?;
        }
        for k in want.difference(&have) {
            self.peer_sessions.insert(k, 1, 0).map_err(map_err(maps::PEER_SESSIONS_V4))?;
        }
        Ok(())
    }
}
