//! Test support: the gate of the tests that need root, and (feature `testing`) the hooks that
//! run one frame through a program with `BPF_PROG_TEST_RUN`, nothing attached, maps live.
//! Production builds do not carry the hooks.

/// The gate of every test that needs root and BPF. Such tests are `#[ignore]`d, so a plain
/// `cargo test` reports them as skipped in its own summary; asked for (`--run-ignored all`,
/// `--include-ignored`, which `scripts/test.sh` passes) they must run, so not being root
/// fails the test instead of passing it silently.
pub fn require_root() {
    let root = std::fs::read_to_string("/proc/self/status")
        .is_ok_and(|s| s.lines().any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0")));
    assert!(root, "this test needs root (BPF, network namespaces): run it as root, or leave it ignored");
}

#[cfg(feature = "testing")]
use causeway_datapath_common::programs;

#[cfg(feature = "testing")]
use crate::{Datapath, DatapathError, GuardVerdict, UplinkHook};

#[cfg(feature = "testing")]
impl Datapath {
    /// Runs one Ethernet frame through the redirect stage with `BPF_PROG_TEST_RUN`; returns
    /// its verdict (`TC_ACT_OK` 0: to the stack, `TC_ACT_REDIRECT` 7) and the frame as the
    /// program left it.
    pub fn test_cluster_redirect(&mut self, frame: &[u8]) -> Result<(i32, Vec<u8>), DatapathError> {
        use aya::programs::{TestRun as _, TestRunOptions};
        let name = programs::CLUSTER_REDIRECT;
        let prog = self.tunnel_program(name)?;
        let mut out = vec![0u8; frame.len().max(64)];
        let opts =
            TestRunOptions { data_in: Some(frame), data_out: Some(&mut out), ..TestRunOptions::default() };
        let r = prog.test_run(opts).map_err(|source| DatapathError::Program { name, source })?;
        let len = usize::try_from(r.data_size_out).unwrap_or(0).min(out.len());
        out.truncate(len);
        Ok((i32::try_from(r.return_value).unwrap_or(i32::MAX), out))
    }

    /// Runs one IP packet (as the tunnel device carries it: no link-layer header) through the
    /// egress (`true`) or ingress tunnel program with `BPF_PROG_TEST_RUN`, without attaching
    /// anything; returns the program's verdict (`TC_ACT_OK` 0, `TC_ACT_SHOT` 2).
    pub fn test_tunnel(&mut self, egress: bool, packet: &[u8]) -> Result<i32, DatapathError> {
        let name = if egress { programs::TUNNEL_EGRESS } else { programs::TUNNEL_INGRESS };
        self.test_tc(name, packet)
    }

    /// Like [`Self::test_tunnel`], and the packet as the program left it.
    pub fn test_tunnel_packet(
        &mut self,
        egress: bool,
        packet: &[u8],
    ) -> Result<(i32, Vec<u8>), DatapathError> {
        use aya::programs::{TestRun as _, TestRunOptions};
        let name = if egress { programs::TUNNEL_EGRESS } else { programs::TUNNEL_INGRESS };
        let prog = self.tunnel_program(name)?;
        let mut data = packet.to_vec();
        if data.len() < 14 {
            data.resize(14, 0);
        }
        let mut out = vec![0u8; data.len() + 64];
        let opts =
            TestRunOptions { data_in: Some(&data), data_out: Some(&mut out), ..TestRunOptions::default() };
        let r = prog.test_run(opts).map_err(|source| DatapathError::Program { name, source })?;
        let len = usize::try_from(r.data_size_out).unwrap_or(0).min(out.len());
        out.truncate(len);
        Ok((i32::try_from(r.return_value).unwrap_or(i32::MAX), out))
    }

    /// Runs one Ethernet frame through the Ethernet policy program (see
    /// [`Self::attach_policy_eth`]); returns its verdict.
    pub fn test_policy_eth(&mut self, frame: &[u8]) -> Result<i32, DatapathError> {
        self.test_tc(programs::POLICY_ETH, frame)
    }

    fn test_tc(&mut self, name: &'static str, packet: &[u8]) -> Result<i32, DatapathError> {
        use aya::programs::{TestRun as _, TestRunOptions};
        let prog = self.tunnel_program(name)?;
        // The kernel wants at least an Ethernet header's worth of bytes; the program reads
        // from offset 0, which is where the packet starts.
        let mut data = packet.to_vec();
        if data.len() < 14 {
            data.resize(14, 0);
        }
        let opts = TestRunOptions { data_in: Some(&data), ..TestRunOptions::default() };
        let r = prog.test_run(opts).map_err(|source| DatapathError::Program { name, source })?;
        Ok(i32::try_from(r.return_value).unwrap_or(i32::MAX))
    }

    /// Runs the uplink guard at `hook` on one Ethernet frame with `BPF_PROG_TEST_RUN`
    /// (nothing attached, maps and counters live). (A test run cannot make a GSO socket
    /// buffer: the kernel refuses `gso_size` in the context; the end-to-end test sends runs.)
    pub fn test_uplink_guard(
        &mut self,
        hook: UplinkHook,
        frame: &[u8],
        wireguard_port: u16,
        rate: u32,
        burst: u32,
    ) -> Result<GuardVerdict, DatapathError> {
        use aya::programs::{TestRun as _, TestRunOptions};
        let opts = TestRunOptions { data_in: Some(frame), ..TestRunOptions::default() };
        // Each hook's own return codes: XDP_DROP 1 / XDP_PASS 2, TC_ACT_OK 0 / TC_ACT_SHOT 2.
        let (name, run, drop, pass) = match hook {
            UplinkHook::Xdp => {
                let prog = self.load_uplink_guard(wireguard_port, rate, burst)?;
                (programs::UPLINK_GUARD, prog.test_run(opts), 1, 2)
            }
            UplinkHook::Tc => {
                self.configure_uplink_guard(wireguard_port, rate, burst)?;
                let prog = self.tunnel_program(programs::UPLINK_GUARD_TC)?;
                (programs::UPLINK_GUARD_TC, prog.test_run(opts), 2, 0)
            }
        };
        let r = run.map_err(|source| DatapathError::Program { name, source })?;
        Ok(match r.return_value {
            v if v == drop => GuardVerdict::Drop,
            v if v == pass => GuardVerdict::Pass,
            other => GuardVerdict::Other(i64::from(other)),
        })
    }
}
