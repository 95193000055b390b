//! CNI integration, as pure functions: render the network config the real CNI `bridge` +
//! `host-local` plugins take (the sandbox and the netns harness wire pods with them), and
//! parse the plugins' results. Later: detect the cluster's CNI, read and patch its conflist,
//! and the chained plugin that hooks pods into the datapath.

use std::path::Path;

use ipnetwork::IpNetwork;
use serde::Deserialize;

/// The CNI spec version Causeway speaks to the plugins (Debian ships plugins v1.1).
pub const CNI_VERSION: &str = "0.4.0";

/// A `bridge` network for one node's pod subnet, with `host-local` IPAM storing leases under
/// `data_dir`. No masquerade: pod addresses must survive the trip to other clusters.
#[must_use]
pub fn bridge_config(
    network: &str,
    bridge: &str,
    subnet: IpNetwork,
    data_dir: &Path,
    mtu: u16,
) -> serde_json::Value {
    let default_route = if subnet.is_ipv4() { "0.0.0.0/0" } else { "::/0" };
    serde_json::json!({
        "cniVersion": CNI_VERSION,
        "name": network,
        "type": "bridge",
        "bridge": bridge,
        "isGateway": true,
        "ipMasq": false,
        "mtu": mtu,
        "ipam": {
            "type": "host-local",
            "ranges": [[{ "subnet": subnet.to_string() }]],
            "routes": [{ "dst": default_route }],
            "dataDir": data_dir.display().to_string(),
        }
    })
}

#[derive(Debug, thiserror::Error)]
pub enum ResultError {
    #[error("the CNI plugin's result is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("the CNI plugin returned error {code}: {msg}")]
    Plugin { code: u32, msg: String },
    #[error("the CNI plugin's result has no IP address")]
    NoAddress,
}

#[derive(Deserialize)]
struct CniResult {
    #[serde(default)]
    ips: Vec<CniIp>,
    #[serde(default)]
    code: Option<u32>,
    #[serde(default)]
    msg: Option<String>,
}

#[derive(Deserialize)]
struct CniIp {
    address: IpNetwork,
}

/// The addresses an ADD assigned (first one first).
pub fn parse_add_result(stdout: &[u8]) -> Result<Vec<IpNetwork>, ResultError> {
    let r: CniResult = serde_json::from_slice(stdout)?;
    if let Some(code) = r.code {
        return Err(ResultError::Plugin { code, msg: r.msg.unwrap_or_default() });
    }
    if r.ips.is_empty() {
        return Err(ResultError::NoAddress);
    }
    Ok(r.ips.into_iter().map(|i| i.address).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bridge_config_has_no_masquerade_and_the_subnet() {
        let c = bridge_config("causeway", "cni0", "10.1.2.0/24".parse().unwrap(), Path::new("/run/x"), 1500);
        assert_eq!(c["type"], "bridge");
        assert_eq!(c["ipMasq"], false);
        assert_eq!(c["ipam"]["ranges"][0][0]["subnet"], "10.1.2.0/24");
        assert_eq!(c["ipam"]["dataDir"], "/run/x");
        assert_eq!(c["ipam"]["routes"][0]["dst"], "0.0.0.0/0");
    }

    #[test]
    fn parses_results_and_errors() {
        let ok = br#"{"cniVersion":"0.4.0","interfaces":[{"name":"eth0"}],"ips":[{"version":"4","interface":0,"address":"10.1.2.2/24","gateway":"10.1.2.1"}]}"#;
        assert_eq!(parse_add_result(ok).unwrap(), vec!["10.1.2.2/24".parse::<IpNetwork>().unwrap()]);
        let err = br#"{"code":7,"msg":"failed to allocate"}"#;
        assert_eq!(
            parse_add_result(err).unwrap_err().to_string(),
            "the CNI plugin returned error 7: failed to allocate"
        );
        assert!(matches!(parse_add_result(b"{}"), Err(ResultError::NoAddress)));
        assert!(matches!(parse_add_result(b"garbage"), Err(ResultError::Json(_))));
    }
}
