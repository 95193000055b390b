//! The redirect stage on the cluster-facing interface.

use aya::programs::TcAttachType;
use causeway_datapath_common::programs;

use crate::{Datapath, DatapathError};

impl Datapath {
    /// Attaches the redirect stage to the ingress of the cluster-facing interface `ifname`:
    /// packets for remote prefixes whose entry names a tunnel device skip the kernel's
    /// forwarding path and go straight to it.
    pub fn attach_cluster_redirect(&mut self, ifname: &str) -> Result<(), DatapathError> {
        self.attach_tc(programs::CLUSTER_REDIRECT, ifname, TcAttachType::Ingress)
    }
}
