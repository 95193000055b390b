//! Credentials: who may call the broker, as what. Tokens are shown once and stored as their
//! SHA-256; every change to the credential set takes the writer's turn, so a single-use join
//! token is spent exactly once and a rotation sees the credentials it replaces.

use std::time::Duration;

use causeway_broker_api::{
    ClusterRecord, CredentialInfo, CredentialKind, IssueRequest, IssueResponse, Object, Record, Token,
    cluster_key,
};
use tracing::{debug, info};

use crate::{
    auth::{self, Credential, Identity},
    broker::{Broker, BrokerError, Writer, describe, require_admin, require_write},
    rules,
};

/// The index of cluster credentials by relay credential id ([`Broker::relay_key`]).
#[derive(Debug, Default)]
pub(crate) struct RelayIds {
    by_id: std::collections::HashMap<[u8; 6], Vec<String>>,
    built: Option<std::time::Instant>,
}

/// The relay's credential index is rebuilt at most this often: a gateway of a cluster that
/// joined since waits about this long (it registers every second until answered); ids nobody
/// has cost one scan of the credential set per interval, however many arrive.
pub(crate) const RELAY_IDS_REFRESH: Duration = Duration::from_secs(1);

impl RelayIds {
    fn lookup(&self, id: &[u8; 6]) -> Option<Vec<String>> {
        self.by_id.get(id).cloned()
    }

    /// Whether a rebuild is allowed now; if so, the next one is not for a while.
    fn may_rebuild(&mut self, now: std::time::Instant) -> bool {
        if self.built.is_some_and(|t| now.saturating_duration_since(t) < RELAY_IDS_REFRESH) {
            return false;
        }
        self.built = Some(now);
        true
    }

    fn rebuild<'a>(&mut self, hashes: impl Iterator<Item = &'a String>) {
        self.by_id.clear();
        for hash in hashes {
            let id: Option<Vec<u8>> =
                (0..12).step_by(2).map(|i| u8::from_str_radix(hash.get(i..i + 2)?, 16).ok()).collect();
            if let Some(Ok(id)) = id.map(<[u8; 6]>::try_from) {
                self.by_id.entry(id).or_default().push(hash.clone());
            }
        }
    }
}

impl Broker {
    /// The identity behind a bearer token (unknown, revoked or expired: 401).
    pub async fn authenticate(&self, token: Option<&str>) -> Result<Identity, BrokerError> {
        let token = token.ok_or(BrokerError::Unauthorized)?;
        match self.store.credential(&auth::hash(token)).await? {
            Some(c) if c.valid_at(auth::now_unix()) => Ok(c.identity),
            _ => Err(BrokerError::Unauthorized),
        }
    }

    /// The MAC key of a relay registration that names credential `id` (the first 6 bytes of a
    /// token's SHA-256) for WireGuard key `key`: the token's SHA-256, if that is a valid
    /// cluster credential and one of that cluster's gateways publishes `key`.
    ///
    /// Every gateway registers every 20 s, so this must not scan the credential set each
    /// time: the hashes are indexed by their id ([`RelayIds`]) and only the few an id names
    /// are read, one by one, so a revoked or expired credential stops counting at once. An
    /// id the index lacks (a credential issued since) rebuilds it, at most every
    /// [`RELAY_IDS_REFRESH`], so made-up ids cannot make the broker scan on every datagram.
    pub async fn relay_key(&self, id: &[u8; 6], key: &[u8; 32]) -> Result<Option<[u8; 32]>, BrokerError> {
        let known = self.relay_ids().lookup(id);
        let hashes = match known {
            Some(h) => h,
            None => {
                if !self.relay_ids().may_rebuild(std::time::Instant::now()) {
                    return Ok(None);
                }
                let all = self.store.credentials().await?;
                let mut ids = self.relay_ids();
                ids.rebuild(
                    all.iter().filter(|(_, c)| matches!(c.identity, Identity::Cluster(_))).map(|(h, _)| h),
                );
                ids.lookup(id).unwrap_or_default()
            }
        };
        let now = auth::now_unix();
        for hash in hashes {
            let Some(c) = self.store.credential(&hash).await? else { continue };
            let Identity::Cluster(cluster) = &c.identity else { continue };
            if !c.valid_at(now) {
                continue;
            }
            let owns = self
                .with_records(|r| r.endpoints().any(|e| e.cluster_id == *cluster && e.public_key.0 == *key));
            let bytes: Option<Vec<u8>> = (0..hash.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(hash.get(i..i + 2)?, 16).ok())
                .collect();
            if owns && let Some(Ok(k)) = bytes.map(<[u8; 32]>::try_from) {
                return Ok(Some(k));
            }
        }
        Ok(None)
    }

    /// Whether a relay registration is genuine: made with a valid cluster credential whose
    /// cluster has a gateway with the key it names ([`Broker::relay_key`]).
    pub async fn relay_check(&self, r: &causeway_broker_api::relay::Register) -> Result<bool, BrokerError> {
        Ok(self.relay_key(&r.credential, &r.key).await?.is_some_and(|k| r.verify(&k)))
    }

    /// Creates a credential for `identity` and returns its token (shown once, stored hashed).
    pub async fn issue(&self, identity: &Identity) -> Result<Token, BrokerError> {
        let token = auth::new_token();
        let _turn = self.writer().await;
        self.store.put_credential(&auth::hash(&token.0), &Credential::new(identity.clone())).await?;
        Ok(token)
    }

    /// Issues an admin or join credential (admin only), optionally with a TTL and, for a join
    /// token, for one registration only.
    pub async fn issue_limited(
        &self,
        who: &Identity,
        req: &IssueRequest,
    ) -> Result<IssueResponse, BrokerError> {
        require_admin(who, "issue credentials")?;
        let identity = match req.kind {
            CredentialKind::Admin => Identity::Admin,
            CredentialKind::Join => Identity::Join,
            other => {
                return Err(BrokerError::BadRequest(format!(
                    "kind: {other:?} credentials come from join (cluster) or from the cluster (reader), not from here"
                )));
            }
        };
        if req.single_use && identity != Identity::Join {
            return Err(BrokerError::BadRequest("singleUse: only join tokens can be single-use".into()));
        }
        if req.ttl_seconds == Some(0) {
            return Err(BrokerError::BadRequest(
                "ttlSeconds: 0 would never work; omit it for no expiry".into(),
            ));
        }
        let mut cred = Credential::new(identity);
        cred.expires_at = req.ttl_seconds.map(|t| cred.issued_at.saturating_add(t));
        cred.single_use = req.single_use;
        let token = auth::new_token();
        let hash = auth::hash(&token.0);
        {
            let _turn = self.writer().await;
            self.store.put_credential(&hash, &cred).await?;
        }
        info!(id = %auth::credential_id(&hash), kind = ?req.kind, ttl = ?req.ttl_seconds, single_use = req.single_use,
            "credential issued");
        Ok(IssueResponse { id: auth::credential_id(&hash), token, expires_at: cred.expires_at })
    }

    /// A read-only credential for a cluster (route agents), issued by that cluster or the admin.
    pub async fn issue_reader(&self, who: &Identity, cluster_id: &str) -> Result<IssueResponse, BrokerError> {
        require_write(who, cluster_id, "issue a reader credential")?;
        let _turn = self.writer().await;
        if self.stored(&cluster_key(cluster_id)).is_none() {
            return Err(BrokerError::NotFound(cluster_key(cluster_id)));
        }
        let token = auth::new_token();
        let hash = auth::hash(&token.0);
        self.store.put_credential(&hash, &Credential::new(Identity::Reader(cluster_id.to_owned()))).await?;
        info!(cluster = %cluster_id, id = %auth::credential_id(&hash), "reader credential issued");
        Ok(IssueResponse { id: auth::credential_id(&hash), token, expires_at: None })
    }

    /// Every credential, without its token (admin only).
    pub async fn list_credentials(&self, who: &Identity) -> Result<Vec<CredentialInfo>, BrokerError> {
        require_admin(who, "list credentials")?;
        let mut out: Vec<CredentialInfo> = self
            .store
            .credentials()
            .await?
            .into_iter()
            .map(|(hash, c)| CredentialInfo {
                id: auth::credential_id(&hash),
                kind: match c.identity {
                    Identity::Admin => CredentialKind::Admin,
                    Identity::Join => CredentialKind::Join,
                    Identity::Cluster(_) => CredentialKind::Cluster,
                    Identity::Reader(_) => CredentialKind::Reader,
                },
                cluster_id: c.identity.cluster().map(str::to_owned),
                issued_at: c.issued_at,
                expires_at: c.expires_at,
                single_use: c.single_use,
            })
            .collect();
        out.sort_by(|a, b| (a.kind as u8, &a.cluster_id, &a.id).cmp(&(b.kind as u8, &b.cluster_id, &b.id)));
        Ok(out)
    }

    /// Revokes one credential by its id (admin only). The caller's own is refused: revoking it
    /// would lock the operator out mid-command; issue another admin credential first.
    pub async fn revoke_credential(
        &self,
        who: &Identity,
        caller_hash: &str,
        id: &str,
    ) -> Result<usize, BrokerError> {
        require_admin(who, "revoke credentials")?;
        if id.len() < 12 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(BrokerError::BadRequest(format!(
                "{id:?} is not a credential id (12 hex digits, as `causeway credentials list` shows)"
            )));
        }
        let _turn = self.writer().await;
        let doomed: Vec<String> = self
            .store
            .credentials()
            .await?
            .into_iter()
            .map(|(h, _)| h)
            .filter(|h| h.starts_with(id))
            .collect();
        if doomed.is_empty() {
            return Err(BrokerError::NotFound(format!("credential {id}")));
        }
        if doomed.iter().any(|h| h == caller_hash) {
            return Err(BrokerError::BadRequest(format!(
                "credential {id} is the one this request uses; revoke it with another admin credential"
            )));
        }
        self.store.delete_credentials(&doomed).await?;
        info!(id, "credential revoked");
        Ok(doomed.len())
    }

    /// Deletes credentials that have expired (rotation overlaps that ended, TTLs that ran out).
    pub async fn prune_credentials(&self) -> Result<usize, BrokerError> {
        let now = auth::now_unix();
        let _turn = self.writer().await;
        let expired: Vec<String> = self
            .store
            .credentials()
            .await?
            .into_iter()
            .filter(|(_, c)| !c.valid_at(now))
            .map(|(h, _)| h)
            .collect();
        if !expired.is_empty() {
            self.store.delete_credentials(&expired).await?;
            debug!(count = expired.len(), "expired credentials deleted");
        }
        Ok(expired.len())
    }

    /// Registers a credential by its token's SHA-256 (idempotent). This is how a broker that
    /// `deploy-broker --kubeconfig` set up learns the admin and join tokens the CLI generated:
    /// only their hashes travel, in a Secret.
    pub async fn bootstrap(&self, token_sha256: &str, identity: &Identity) -> Result<(), BrokerError> {
        if token_sha256.len() != 64 || !token_sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(BrokerError::BadRequest(format!(
                "bootstrap credential {token_sha256:?} is not a SHA-256 in hex"
            )));
        }
        let hash = token_sha256.to_ascii_lowercase();
        let _turn = self.writer().await;
        if self.store.credential(&hash).await?.is_some_and(|c| c.identity == *identity) {
            return Ok(());
        }
        self.store.put_credential(&hash, &Credential::new(identity.clone())).await?;
        Ok(())
    }

    /// Registers a new cluster and issues its own credential (join or admin credential;
    /// `caller_hash`: the hash of the token used). A single-use join token is spent by it.
    /// The same caller joining again with the same record gets a fresh credential for the
    /// cluster (its first answer may have been lost); anybody else gets 409.
    pub async fn join(
        &self,
        who: &Identity,
        caller_hash: &str,
        c: ClusterRecord,
    ) -> Result<(Object, Token), BrokerError> {
        if !matches!(who, Identity::Join | Identity::Admin) {
            return Err(BrokerError::Forbidden {
                who: describe(who),
                action: "register a new cluster".into(),
            });
        }
        causeway_broker_api::validate_cluster(&c)?;
        let turn = self.writer().await;
        // Re-read in the writer's turn: a racing join may have spent a single-use token.
        let caller = match self.store.credential(caller_hash).await? {
            Some(cred) if cred.valid_at(auth::now_unix()) => cred,
            _ => return Err(BrokerError::Unauthorized),
        };
        let caller_id = auth::credential_id(caller_hash);
        let id = c.cluster_id.clone();
        let identity = Identity::Cluster(id.clone());
        let same = match self.stored(&cluster_key(&id)) {
            Some(obj) if obj.record == Record::Cluster(c.clone()) => {
                let ours = self.store.credentials().await?.iter().any(|(_, k)| {
                    k.identity == identity && k.issued_by.as_deref() == Some(caller_id.as_str())
                });
                ours.then_some(obj)
            }
            _ => None,
        };
        let obj = match same {
            Some(obj) => {
                info!(cluster = %id, "the same caller joined again: a fresh credential for the cluster");
                obj
            }
            None => self.put(&turn, |state| rules::put_cluster(state, &c, true)).await?,
        };
        let token = auth::new_token();
        let mut cred = Credential::new(identity);
        cred.issued_by = Some(caller_id);
        self.store.put_credential(&auth::hash(&token.0), &cred).await?;
        if caller.single_use {
            self.store.delete_credentials(&[caller_hash.to_owned()]).await?;
            info!(cluster = %id, "single-use join token spent");
        }
        info!(cluster = %id, "cluster joined");
        Ok((obj, token))
    }

    /// A new credential for the cluster. Its old ones keep working for `overlap` (so gateways
    /// and agents can be moved over without an outage), then stop; zero: at once. Returns the
    /// token and when the old ones stop (unix seconds; `None` when there were none).
    pub async fn rotate(
        &self,
        who: &Identity,
        cluster_id: &str,
        overlap: Duration,
    ) -> Result<(Token, Option<u64>), BrokerError> {
        require_write(who, cluster_id, "rotate the credentials")?;
        let _turn = self.writer().await;
        if self.stored(&cluster_key(cluster_id)).is_none() {
            return Err(BrokerError::NotFound(cluster_key(cluster_id)));
        }
        let identity = Identity::Cluster(cluster_id.to_owned());
        let now = auth::now_unix();
        let old: Vec<(String, Credential)> = self
            .store
            .credentials()
            .await?
            .into_iter()
            .filter(|(_, c)| c.identity == identity && c.valid_at(now))
            .collect();
        let until = now.saturating_add(overlap.as_secs());
        let issued_by = old.iter().find_map(|(_, c)| c.issued_by.clone());
        if overlap.is_zero() {
            self.store.delete_credentials(&old.iter().map(|(h, _)| h.clone()).collect::<Vec<_>>()).await?;
        } else {
            for (hash, mut c) in old.clone() {
                c.expires_at = Some(c.expires_at.map_or(until, |t| t.min(until)));
                self.store.put_credential(&hash, &c).await?;
            }
        }
        let token = auth::new_token();
        let mut cred = Credential::new(identity);
        cred.issued_by = issued_by;
        self.store.put_credential(&auth::hash(&token.0), &cred).await?;
        info!(cluster = %cluster_id, overlap = ?overlap, old = old.len(), "credentials rotated");
        Ok((token, (!old.is_empty()).then_some(if overlap.is_zero() { now } else { until })))
    }

    /// Revokes every credential of the cluster, its readers' too (admin only).
    pub async fn revoke(&self, who: &Identity, cluster_id: &str) -> Result<usize, BrokerError> {
        if *who != Identity::Admin {
            return Err(BrokerError::Forbidden { who: describe(who), action: "revoke credentials".into() });
        }
        let turn = self.writer().await;
        let n = self.revoke_cluster(&turn, cluster_id).await?;
        info!(cluster = %cluster_id, revoked = n, "credentials revoked");
        Ok(n)
    }

    /// Deletes the cluster's credentials and its readers'; returns how many.
    pub(crate) async fn revoke_cluster(
        &self,
        _turn: &Writer<'_>,
        cluster_id: &str,
    ) -> Result<usize, BrokerError> {
        let doomed: Vec<String> = self
            .store
            .credentials()
            .await?
            .into_iter()
            .filter(|(_, c)| c.identity.cluster() == Some(cluster_id))
            .map(|(h, _)| h)
            .collect();
        self.store.delete_credentials(&doomed).await?;
        Ok(doomed.len())
    }
}
