//! Credentials: random bearer tokens, stored only as SHA-256 hashes, each bound to one
//! identity. A cluster's identity lets it write its own records and nobody else's.

use causeway_broker_api::Token;
use rand_core::{OsRng, RngCore as _};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// Who a credential belongs to.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", content = "clusterId", rename_all = "camelCase")]
pub enum Identity {
    Admin,
    /// May only register new clusters.
    Join,
    Cluster(String),
}

impl Identity {
    /// May this identity write the records of `cluster_id`?
    #[must_use]
    pub fn may_write(&self, cluster_id: &str) -> bool {
        match self {
            Identity::Admin => true,
            Identity::Cluster(id) => id == cluster_id,
            Identity::Join => false,
        }
    }

    /// May this identity read the cluster set?
    #[must_use]
    pub fn may_read(&self) -> bool {
        !matches!(self, Identity::Join)
    }
}

/// A new random token: 32 bytes from the OS, base64url, with a recognisable prefix.
#[must_use]
pub fn new_token() -> Token {
    use base64::Engine as _;
    let mut bytes = [0u8; 32];
    OsRng.fill_bytes(&mut bytes);
    Token(format!("cw1_{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)))
}

/// What the store keeps of a token.
#[must_use]
pub fn hash(token: &str) -> String {
    Sha256::digest(token.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

/// The file `deploy-broker --kubeconfig` puts in the broker's bootstrap Secret: identities and
/// the SHA-256 of their tokens (the tokens themselves stay with the operator).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BootstrapFile {
    pub credentials: Vec<BootstrapCredential>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BootstrapCredential {
    pub identity: Identity,
    pub token_sha256: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_and_hashes_stable() {
        let (a, b) = (new_token(), new_token());
        assert_ne!(a, b);
        assert!(a.0.starts_with("cw1_") && a.0.len() > 40);
        assert_eq!(hash(&a.0), hash(&a.0));
        assert_ne!(hash(&a.0), hash(&b.0));
        assert_eq!(hash("").len(), 64);
    }

    #[test]
    fn clusters_write_only_their_own_records() {
        let east = Identity::Cluster("east".into());
        assert!(east.may_write("east") && !east.may_write("west") && east.may_read());
        assert!(Identity::Admin.may_write("west"));
        assert!(!Identity::Join.may_write("east") && !Identity::Join.may_read());
    }
}
