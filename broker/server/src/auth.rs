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
    /// Reads the set on behalf of one cluster and writes nothing (route agents: every node
    /// of a cluster runs one, so it must not hold the cluster's write credential).
    Reader(String),
}

impl Identity {
    /// May this identity write the records of `cluster_id`?
    #[must_use]
    pub fn may_write(&self, cluster_id: &str) -> bool {
        match self {
            Identity::Admin => true,
            Identity::Cluster(id) => id == cluster_id,
            Identity::Join | Identity::Reader(_) => false,
        }
    }

    /// May this identity read the cluster set?
    #[must_use]
    pub fn may_read(&self) -> bool {
        !matches!(self, Identity::Join)
    }

    /// The cluster this identity speaks for, if any.
    #[must_use]
    pub fn cluster(&self) -> Option<&str> {
        match self {
            Identity::Cluster(id) | Identity::Reader(id) => Some(id),
            Identity::Admin | Identity::Join => None,
        }
    }
}

/// What the store keeps for a token (under its hash): the identity, and how long and how
/// often it may be used.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Credential {
    pub identity: Identity,
    /// Unix seconds it was issued (0: issued before this was recorded).
    pub issued_at: u64,
    /// Unix seconds from which it no longer works (a TTL, or the end of a rotation's overlap).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
    /// A join token that works for one registration only.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub single_use: bool,
    /// For a cluster's credential: the id of the join credential that registered the cluster
    /// (the same caller may join again and get a credential; nobody else may).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub issued_by: Option<String>,
}

impl Credential {
    /// A credential for `identity`, issued now, with no limits.
    #[must_use]
    pub fn new(identity: Identity) -> Self {
        Self { identity, issued_at: now_unix(), expires_at: None, single_use: false, issued_by: None }
    }

    /// Whether it still works at `now` (unix seconds).
    #[must_use]
    pub fn valid_at(&self, now: u64) -> bool {
        self.expires_at.is_none_or(|t| now < t)
    }
}

/// Stores written before credentials had limits hold the bare identity: still read.
impl<'de> Deserialize<'de> for Credential {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Full {
            identity: Identity,
            #[serde(default)]
            issued_at: u64,
            #[serde(default)]
            expires_at: Option<u64>,
            #[serde(default)]
            single_use: bool,
            #[serde(default)]
            issued_by: Option<String>,
        }
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Either {
            Full(Full),
            Bare(Identity),
        }
        Ok(match Either::deserialize(d)? {
            Either::Full(f) => Credential {
                identity: f.identity,
                issued_at: f.issued_at,
                expires_at: f.expires_at,
                single_use: f.single_use,
                issued_by: f.issued_by,
            },
            Either::Bare(identity) => {
                Credential { identity, issued_at: 0, expires_at: None, single_use: false, issued_by: None }
            }
        })
    }
}

/// Seconds since the Unix epoch (credentials expire on the broker's clock).
#[must_use]
pub fn now_unix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// How operators name a credential (to list or revoke it) without holding its token: the
/// first 12 hex digits of the token's hash.
#[must_use]
pub fn credential_id(hash: &str) -> String {
    hash.chars().take(12).collect()
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
    fn credentials_stored_before_limits_still_read() {
        let old: Credential = serde_json::from_str(r#"{"kind":"cluster","clusterId":"east"}"#).unwrap();
        assert_eq!(old.identity, Identity::Cluster("east".into()));
        assert!(old.valid_at(u64::MAX) && !old.single_use);
        let new = Credential { expires_at: Some(100), single_use: true, ..Credential::new(Identity::Join) };
        let back: Credential = serde_json::from_str(&serde_json::to_string(&new).unwrap()).unwrap();
        assert_eq!(back, new);
        assert!(back.valid_at(99) && !back.valid_at(100));
        assert!(serde_json::from_str::<Credential>(r#"{"kind":"nobody"}"#).is_err());
    }

    #[test]
    fn readers_read_and_write_nothing() {
        let r = Identity::Reader("east".into());
        assert!(r.may_read() && !r.may_write("east") && !r.may_write("west"));
        assert_eq!(r.cluster(), Some("east"));
    }

    #[test]
    fn clusters_write_only_their_own_records() {
        let east = Identity::Cluster("east".into());
        assert!(east.may_write("east") && !east.may_write("west") && east.may_read());
        assert!(Identity::Admin.may_write("west"));
        assert!(!Identity::Join.may_write("east") && !Identity::Join.may_read());
    }
}
