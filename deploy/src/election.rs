//! Active/standby election among a cluster's gateways with a `coordination.k8s.io/v1` Lease.
//!
//! [`decide`] is the whole protocol as a pure function of the Lease and the clock; the
//! [`Elector`] loop reads the Lease, applies the decision with optimistic concurrency
//! (`resourceVersion`: of two gateways racing for an expired Lease, exactly one write
//! succeeds) and publishes the role. A gateway that cannot renew steps down before its Lease
//! runs out, so two gateways never both believe they are active for longer than the
//! clock skew between them.

use std::time::Duration;

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::{Api, Client, api::PostParams};
use tokio::sync::watch;
use tracing::{info, warn};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Active,
    Standby,
}

/// What to do with the Lease as it stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Nobody holds it (or the holder let it expire, or released it): take it.
    Acquire,
    /// We hold it: renew.
    Renew,
    /// Someone else holds a live Lease.
    Follow { holder: String },
}

pub fn decide(spec: Option<&LeaseSpec>, me: &str, now: Timestamp) -> Decision {
    let Some(spec) = spec else { return Decision::Acquire };
    let holder = spec.holder_identity.as_deref().unwrap_or_default();
    if holder.is_empty() {
        return Decision::Acquire;
    }
    if holder == me {
        return Decision::Renew;
    }
    let expired = match (&spec.renew_time, spec.lease_duration_seconds) {
        (Some(MicroTime(renewed)), Some(secs)) => {
            now.as_millisecond() > renewed.as_millisecond() + i64::from(secs) * 1000
        }
        // A Lease without a renew time or duration cannot be live.
        _ => true,
    };
    if expired { Decision::Acquire } else { Decision::Follow { holder: holder.to_owned() } }
}

/// The Lease spec after `me` acquires or renews at `now`.
#[must_use]
pub fn claimed(previous: Option<&LeaseSpec>, me: &str, now: Timestamp, duration: Duration) -> LeaseSpec {
    let prev = previous.cloned().unwrap_or_default();
    let taking_over = prev.holder_identity.as_deref() != Some(me);
    LeaseSpec {
        holder_identity: Some(me.to_owned()),
        lease_duration_seconds: Some(i32::try_from(duration.as_secs()).unwrap_or(i32::MAX)),
        renew_time: Some(MicroTime(now)),
        acquire_time: if taking_over { Some(MicroTime(now)) } else { prev.acquire_time },
        lease_transitions: Some(
            prev.lease_transitions.unwrap_or(0) + i32::from(taking_over && prev.holder_identity.is_some()),
        ),
        ..prev
    }
}

#[derive(Clone, Debug)]
pub struct ElectionConfig {
    pub namespace: String,
    pub lease: String,
    /// This gateway's identity in the Lease (its node name).
    pub identity: String,
    /// How long a Lease lives without renewal. Failover takes at most this long when the
    /// active gateway dies without releasing it.
    pub duration: Duration,
    /// How often the Lease is read and renewed.
    pub retry: Duration,
}

impl ElectionConfig {
    #[must_use]
    pub fn new(namespace: &str, identity: &str) -> Self {
        Self {
            namespace: namespace.into(),
            lease: crate::manifests::GATEWAY_LEASE.into(),
            identity: identity.into(),
            duration: Duration::from_secs(6),
            retry: Duration::from_secs(2),
        }
    }
}

pub struct Elector {
    api: Api<Lease>,
    config: ElectionConfig,
    role: Role,
    /// When we last renewed successfully (monotonic), to step down in time when we cannot.
    renewed: Option<tokio::time::Instant>,
}

impl Elector {
    #[must_use]
    pub fn new(client: Client, config: ElectionConfig) -> Self {
        Self { api: Api::namespaced(client, &config.namespace), config, role: Role::Standby, renewed: None }
    }

    #[must_use]
    pub fn role(&self) -> Role {
        self.role
    }

    /// One round: read the Lease, act, and return the role that results.
    pub async fn step(&mut self) -> Role {
        match self.try_step().await {
            Ok(role) => {
                if role == Role::Active {
                    self.renewed = Some(tokio::time::Instant::now());
                }
                self.set(role)
            }
            Err(e) => {
                // Keep the role while the Lease we last wrote is still ours to use; step down
                // one retry interval before anyone else may take it.
                let deadline = self.config.duration.saturating_sub(self.config.retry);
                let live = self.renewed.is_some_and(|t| t.elapsed() < deadline);
                warn!(error = %e, keeping = live && self.role == Role::Active, "the gateway Lease could not be renewed");
                if live { self.role } else { self.set(Role::Standby) }
            }
        }
    }

    fn set(&mut self, role: Role) -> Role {
        if role != self.role {
            info!(?role, identity = %self.config.identity, lease = %self.config.lease, "gateway role changed");
        }
        self.role = role;
        role
    }

    async fn try_step(&mut self) -> Result<Role, kube::Error> {
        let now = Timestamp::now();
        let me = self.config.identity.clone();
        let current = self.api.get_opt(&self.config.lease).await?;
        let spec = current.as_ref().and_then(|l| l.spec.as_ref());
        match decide(spec, &me, now) {
            Decision::Follow { holder } => {
                tracing::debug!(%holder, "standing by");
                Ok(Role::Standby)
            }
            Decision::Acquire | Decision::Renew => {
                let spec = claimed(spec, &me, now, self.config.duration);
                let written = match current {
                    None => {
                        let lease = Lease {
                            metadata: ObjectMeta {
                                name: Some(self.config.lease.clone()),
                                namespace: Some(self.config.namespace.clone()),
                                ..ObjectMeta::default()
                            },
                            spec: Some(spec),
                        };
                        self.api.create(&PostParams::default(), &lease).await
                    }
                    // The read resourceVersion rides along: a write based on a stale read is a 409.
                    Some(mut lease) => {
                        lease.spec = Some(spec);
                        self.api.replace(&self.config.lease, &PostParams::default(), &lease).await
                    }
                };
                match written {
                    Ok(_) => Ok(Role::Active),
                    Err(kube::Error::Api(s)) if s.is_conflict() || s.is_already_exists() => {
                        info!("another gateway wrote the Lease first");
                        Ok(Role::Standby)
                    }
                    Err(e) => Err(e),
                }
            }
        }
    }

    /// Gives the Lease up (on shutdown) so that a standby takes over at its next round
    /// instead of waiting for the Lease to expire.
    pub async fn release(&mut self) -> Result<(), kube::Error> {
        if self.role != Role::Active {
            return Ok(());
        }
        self.role = Role::Standby;
        let Some(mut lease) = self.api.get_opt(&self.config.lease).await? else { return Ok(()) };
        let Some(spec) = lease.spec.as_mut() else { return Ok(()) };
        if spec.holder_identity.as_deref() != Some(&self.config.identity) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.renew_time = None;
        match self.api.replace(&self.config.lease, &PostParams::default(), &lease).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.is_conflict() => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Runs rounds every `retry` and publishes the role; the task ends (releasing the Lease)
    /// when `stop` fires.
    pub fn spawn(
        mut self,
        mut stop: watch::Receiver<bool>,
    ) -> (watch::Receiver<Role>, tokio::task::JoinHandle<()>) {
        let (tx, rx) = watch::channel(Role::Standby);
        let task = tokio::spawn(async move {
            loop {
                let role = self.step().await;
                tx.send_if_modified(|r| std::mem::replace(r, role) != role);
                tokio::select! {
                    () = tokio::time::sleep(self.config.retry) => {}
                    _ = stop.changed() => break,
                }
            }
            if let Err(e) = self.release().await {
                warn!(error = %e, "releasing the gateway Lease failed; the standby takes over when it expires");
            }
            tx.send_replace(Role::Standby);
        });
        (rx, task)
    }
}

/// The node address (first InternalIP) of the gateway that holds the Lease now, if any: what
/// the route agents of the other nodes route through.
pub async fn active_gateway_address(
    client: &Client,
    namespace: &str,
) -> Result<Option<std::net::IpAddr>, kube::Error> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), namespace);
    let Some(lease) = leases.get_opt(crate::manifests::GATEWAY_LEASE).await? else { return Ok(None) };
    let spec = lease.spec.as_ref();
    let holder = spec.and_then(|s| s.holder_identity.clone()).unwrap_or_default();
    // An expired Lease has no live holder: keep routing where we route until a new one wins.
    if holder.is_empty() || matches!(decide(spec, "", Timestamp::now()), Decision::Acquire) {
        return Ok(None);
    }
    let Some(node) = Api::<k8s_openapi::api::core::v1::Node>::all(client.clone()).get_opt(&holder).await?
    else {
        return Ok(None);
    };
    Ok(node
        .status
        .and_then(|s| s.addresses)
        .into_iter()
        .flatten()
        .filter(|a| a.type_ == "InternalIP")
        .find_map(|a| a.address.parse().ok()))
}

/// Follows [`active_gateway_address`] every `every`; the channel changes only when the address
/// does, and a failed read keeps the last known address.
pub fn follow_active_gateway(
    client: Client,
    namespace: String,
    every: Duration,
) -> watch::Receiver<Option<std::net::IpAddr>> {
    let (tx, rx) = watch::channel(None);
    tokio::spawn(async move {
        loop {
            match active_gateway_address(&client, &namespace).await {
                Ok(Some(ip)) => {
                    tx.send_if_modified(|cur| cur.replace(ip) != Some(ip));
                }
                Ok(None) => {}
                Err(e) => warn!(error = %e, "reading the gateway Lease failed"),
            }
            if tx.is_closed() {
                return;
            }
            tokio::time::sleep(every).await;
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + s).unwrap()
    }

    fn held(by: &str, renewed: i64, secs: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(by.into()),
            renew_time: Some(MicroTime(t(renewed))),
            lease_duration_seconds: Some(secs),
            ..LeaseSpec::default()
        }
    }

    #[test]
    fn the_protocol() {
        assert_eq!(decide(None, "a", t(0)), Decision::Acquire);
        assert_eq!(decide(Some(&LeaseSpec::default()), "a", t(0)), Decision::Acquire);
        assert_eq!(decide(Some(&held("a", 0, 6)), "a", t(100)), Decision::Renew);
        assert_eq!(decide(Some(&held("b", 0, 6)), "a", t(5)), Decision::Follow { holder: "b".into() });
        assert_eq!(decide(Some(&held("b", 0, 6)), "a", t(6)), Decision::Follow { holder: "b".into() });
        assert_eq!(decide(Some(&held("b", 0, 6)), "a", t(7)), Decision::Acquire);
        let mut released = held("b", 0, 6);
        released.holder_identity = None;
        assert_eq!(decide(Some(&released), "a", t(1)), Decision::Acquire);
    }

    #[test]
    fn taking_over_counts_a_transition_and_renewing_does_not() {
        let took = claimed(Some(&held("b", 0, 6)), "a", t(10), Duration::from_secs(6));
        assert_eq!(took.holder_identity.as_deref(), Some("a"));
        assert_eq!(took.lease_transitions, Some(1));
        assert_eq!(took.acquire_time, Some(MicroTime(t(10))));
        let renewed = claimed(Some(&took), "a", t(12), Duration::from_secs(6));
        assert_eq!(renewed.lease_transitions, Some(1));
        assert_eq!(renewed.acquire_time, Some(MicroTime(t(10))));
        assert_eq!(renewed.renew_time, Some(MicroTime(t(12))));
        let first = claimed(None, "a", t(0), Duration::from_secs(6));
        assert_eq!(first.lease_transitions, Some(0));
    }
}
