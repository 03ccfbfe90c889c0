//! Which head leads a cluster whose heads share an etcd store: a lease each, etcd's election API.
//!
//! Every head campaigns with a lease of `lease_ttl_s`; the one elected leads (schedules and
//! serves agents and the other heads' mounts) until its lease ends. The others follow: they
//! learn where the leader is and wait their turn. A leader whose lease etcd has ended must stop
//! at once: its store writes are fenced on its election key, so none of them lands after that.

use std::time::Duration;

use etcd_client::{Client, ConnectOptions, LeaderKey};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{debug, info, warn};

/// How often a connection to etcd is pinged: above etcd's `--grpc-keepalive-min-time` (5 s by
/// default), under which etcd counts pings as abuse and closes the connection.
const KEEP_ALIVE: Duration = Duration::from_secs(6);

/// What a head puts in the election: who it is and where peers and agents reach it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Candidate {
    pub name: String,
    pub addr: String,
}

/// This head's place in the election.
pub struct Election {
    client: Client,
    name: String,
    lease: i64,
    me: Candidate,
}

impl std::fmt::Debug for Election {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Election").field("name", &self.name).field("lease", &self.lease).finish_non_exhaustive()
    }
}

/// The key this head holds while it leads: store writes are made only while it exists.
#[derive(Debug, Clone)]
pub struct Fence {
    pub key: Vec<u8>,
    pub revision: i64,
}

impl Election {
    /// Joins the election of the cluster under `prefix` with a lease of `ttl_s` seconds, kept
    /// alive from now on; `lost` is told when etcd says the lease has ended.
    pub async fn join(
        endpoints: &[String],
        prefix: &str,
        me: Candidate,
        ttl_s: u64,
        lost: watch::Sender<bool>,
    ) -> anyhow::Result<Election> {
        // No request timeout: a campaign waits as long as another head leads. HTTP/2 pings
        // find a connection that went silent; no more often than `KEEP_ALIVE`, or etcd drops
        // the connection with every stream on it (the lease's, the election's).
        let options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_keep_alive(KEEP_ALIVE, Duration::from_secs(2));
        let mut client = Client::connect(endpoints, Some(options)).await?;
        let ttl = i64::try_from(ttl_s).unwrap_or(i64::MAX);
        // The client spreads requests over the members: one that is down fails the request
        // sent to it, and the next goes to another.
        let mut tries = 0;
        let lease = loop {
            match client.lease_grant(ttl, None).await {
                Ok(granted) => break granted.id(),
                Err(e) if tries < 50 => {
                    tries += 1;
                    debug!(error = %e, "cannot get a lease yet; asking again");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => return Err(e.into()),
            }
        };
        tokio::spawn(keep_alive(client.clone(), lease, ttl_s, lost));
        info!(lease, ttl_s, head = me.name, "joined the election");
        Ok(Election { client, name: format!("{prefix}/leader"), lease, me })
    }

    /// Returns once this head leads, with the key it holds while it does.
    pub async fn campaign(&self) -> Fence {
        let value = serde_json::to_vec(&self.me).expect("a candidate serializes");
        loop {
            let mut client = self.client.clone();
            match client.campaign(self.name.clone(), value.clone(), self.lease).await {
                Ok(resp) => {
                    if let Some(key) = resp.leader().map(LeaderKey::key) {
                        let revision = resp.leader().map_or(0, LeaderKey::rev);
                        info!(head = self.me.name, revision, "this head leads");
                        return Fence { key: key.to_vec(), revision };
                    }
                    warn!("etcd answered a campaign without a key; campaigning again");
                }
                Err(e) => debug!(error = %e, "campaign interrupted; campaigning again"),
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// Ends this head's lease, and with it its place in the election (its key goes with it).
    pub async fn leave(&self) {
        let mut client = self.client.clone();
        match tokio::time::timeout(Duration::from_secs(2), client.lease_revoke(self.lease)).await {
            Ok(Ok(_)) => info!(head = self.me.name, "left the election"),
            Ok(Err(e)) => warn!(error = %e, "cannot end the lease: another head leads once it runs out"),
            Err(_) => warn!("etcd did not end the lease in time: another head leads once it runs out"),
        }
    }

    /// Keeps `leader` set to where the leading head is, from etcd's observe stream (a watch
    /// on the election): each change arrives as it happens. While etcd cannot say, the last
    /// answer stands.
    pub async fn follow(self: std::sync::Arc<Self>, leader: watch::Sender<Option<Candidate>>) {
        loop {
            let mut client = self.client.clone();
            match client.observe(self.name.clone()).await {
                Ok(mut stream) => loop {
                    match stream.message().await {
                        Ok(Some(resp)) => {
                            let now = resp.kv().and_then(|kv| serde_json::from_slice::<Candidate>(kv.value()).ok());
                            leader.send_if_modified(|was| {
                                let changed = *was != now;
                                if changed {
                                    info!(leader = ?now, "the leading head changed");
                                    *was = now;
                                }
                                changed
                            });
                        }
                        Ok(None) => break debug!("etcd ended the observe stream; observing again"),
                        Err(e) => break debug!(error = %e, "observing the election failed; observing again"),
                    }
                },
                Err(e) => debug!(error = %e, "cannot observe the election; trying again"),
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
}

/// Renews `lease` every third of its TTL; tells `lost` when etcd says it has ended. While etcd
/// cannot be reached the head keeps its place: etcd renews leases when it gets a quorum back.
async fn keep_alive(mut client: Client, lease: i64, ttl_s: u64, lost: watch::Sender<bool>) {
    let every = Duration::from_millis(ttl_s * 1000 / 3).max(Duration::from_millis(100));
    loop {
        let (mut keeper, mut stream) = match client.lease_keep_alive(lease).await {
            Ok(pair) => pair,
            Err(e) => {
                debug!(error = %e, "cannot renew the lease; trying again");
                tokio::time::sleep(every).await;
                continue;
            }
        };
        loop {
            // Renewals keep their cadence from when each was sent: a slow answer from etcd
            // must not push the next one past the lease's end.
            let sent = tokio::time::Instant::now();
            if let Err(e) = keeper.keep_alive().await {
                warn!(error = %e, "lease renewal failed; renewing on a new stream");
                break;
            }
            match tokio::time::timeout(Duration::from_secs(2), stream.message()).await {
                Ok(Ok(Some(resp))) if resp.ttl() <= 0 => {
                    warn!(lease, "etcd ended this head's lease: it leads no more");
                    let _ = lost.send(true);
                    return;
                }
                Ok(Ok(Some(_))) => {}
                Ok(Ok(None)) | Ok(Err(_)) | Err(_) => break,
            }
            tokio::time::sleep_until(sent + every).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
