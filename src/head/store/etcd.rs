//! The etcd backend: every object a key under the cluster's prefix, written in transactions.
//!
//! Writers' groups are packed into transactions within etcd's default limits (128 operations,
//! 1.5 MiB a request); a group is never split. Calls come from threads that may be the head's
//! async workers, so they run on a runtime of the backend's own and are waited for here.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, ConnectOptions, GetOptions, Txn, TxnOp, TxnOpResponse};

use super::mirror::Mirror;
use super::{Backend, Change, Objects, StoreError};

/// The key a scan marks before it reads this head's copy (see [`Mirror`]).
const MARK: &str = ".mark";
/// How long a scan waits for this head's copy to show its mark before it asks etcd itself.
const CATCH_UP: Duration = Duration::from_secs(2);
/// etcd's default `--max-txn-ops`.
const MAX_OPS: usize = 128;
/// Below etcd's default `--max-request-bytes` (1.5 MiB), with room for the request's framing.
const MAX_BYTES: usize = 1 << 20;
/// Keys a range read asks for at once (fewer when they do not fit in one answer).
const PAGE: i64 = 1000;
/// The largest answer taken from etcd: a page of objects (a job's spec alone may be 1 MiB),
/// or a watch's answer while it catches up (up to 1,000 revisions in one).
pub(super) const MAX_ANSWER: usize = 64 << 20;
/// How long one request may take.
const TIMEOUT: Duration = Duration::from_secs(2);
/// How often the member that leads etcd's raft is looked for again; at once when an answer
/// shows that etcd elected a leader again, or a member failed.
const FIND_LEADER: Duration = Duration::from_secs(10);
/// How often it is looked for while no member names a leader (etcd is electing one).
const FIND_AGAIN: Duration = Duration::from_millis(200);
/// How long a call is tried again, member after member, before the store counts as
/// unreachable. Every call is safe to repeat.
const GIVE_UP: Duration = Duration::from_secs(6);

pub struct Etcd {
    /// One client a member: a request goes to the member that leads etcd's raft (a write sent
    /// to another member is forwarded to it, a hop more), on to the next when it fails.
    clients: Vec<Client>,
    current: Arc<AtomicUsize>,
    /// The raft term of the last answer or look; a new one means etcd elected a leader again.
    term: Arc<AtomicU64>,
    /// Tells the task that follows etcd's leader to look for it now.
    look: Arc<tokio::sync::Notify>,
    /// Set when a call gave up: until one succeeds, calls try each member once and give up
    /// at once, so code that writes many objects in a row fails fast instead of waiting
    /// `GIVE_UP` for each (a head must still stop promptly without its store).
    down: std::sync::atomic::AtomicBool,
    /// Every key starts with it, then `/`.
    prefix: String,
    /// The election key this head holds while it leads, and its creation revision: every
    /// write requires it, so a head whose lease ended writes nothing more.
    fence: std::sync::Mutex<Option<(Vec<u8>, i64)>>,
    /// While kept: the copy of every object etcd's watch feeds, with the task that feeds it,
    /// and how many scans it served.
    mirror: std::sync::Mutex<Option<Kept>>,
    rt: Option<tokio::runtime::Runtime>,
}

#[derive(Debug)]
struct Kept {
    mirror: Arc<Mirror>,
    task: tokio::task::JoinHandle<()>,
    served: usize,
}

impl std::fmt::Debug for Etcd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Etcd").field("prefix", &self.prefix).finish_non_exhaustive()
    }
}

fn unreachable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("etcd: {e}"))
}

impl Etcd {
    /// Connects to `endpoints` and checks that the cluster answers.
    pub fn connect(endpoints: &[String], prefix: &str) -> Result<Etcd, StoreError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("etcd-store")
            .enable_all()
            .build()
            .map_err(unreachable)?;
        let mut clients = Vec::new();
        for endpoint in endpoints {
            let options = ConnectOptions::new().with_timeout(TIMEOUT).with_connect_timeout(TIMEOUT);
            let ep = endpoint.clone();
            clients.push(wait(&rt, async move { Client::connect([ep], Some(options)).await })?.map_err(unreachable)?);
        }
        // Where etcd's raft leader is, now and from now on.
        let found = wait(&rt, leader_of(clients.clone()))?;
        let current = Arc::new(AtomicUsize::new(found.map_or(0, |(i, _)| i)));
        let term = Arc::new(AtomicU64::new(found.map_or(0, |(_, t)| t)));
        let look = Arc::new(tokio::sync::Notify::new());
        let follow =
            Follow { clients: clients.clone(), endpoints: endpoints.to_vec(), term: term.clone(), look: look.clone() };
        rt.spawn(follow.run(Arc::downgrade(&current), found.is_some()));
        let etcd = Etcd {
            clients,
            current,
            term,
            look,
            down: Default::default(),
            prefix: format!("{prefix}/"),
            fence: Default::default(),
            mirror: Default::default(),
            rt: Some(rt),
        };
        // A linearizable read: fails unless a quorum answers.
        let key = etcd.key("");
        etcd.run(move |c| Box::pin(revision_now(c, key.clone())))?;
        let member = endpoints[etcd.current.load(Ordering::Relaxed) % endpoints.len()].as_str();
        tracing::info!(endpoints = ?endpoints, prefix, member, "store: etcd (requests go to the member that leads its raft)");
        Ok(etcd)
    }

    fn kept(&self) -> std::sync::MutexGuard<'_, Option<Kept>> {
        self.mirror.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Writes the scans' mark; the revision of that write.
    fn mark(&self) -> Result<i64, StoreError> {
        let key = self.key(MARK);
        let resp = self.run(move |mut c| {
            let key = key.clone();
            Box::pin(async move { c.put(key, Vec::new(), None).await })
        })?;
        resp.header()
            .map(|h| h.revision())
            .ok_or_else(|| StoreError::Db("etcd: a write answered without its revision".into()))
    }

    fn key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    /// Notes the raft term an answer carried: a new one sends the following task to look for
    /// the leader now, rather than forward every request through another member until its
    /// next look.
    fn saw_term(&self, header: Option<&etcd_client::ResponseHeader>) {
        let Some(term) = header.map(|h| h.raft_term()) else { return };
        let before = self.term.swap(term, Ordering::Relaxed);
        if before != 0 && before != term {
            tracing::debug!(before, term, "etcd's raft term changed: looking for its leader");
            self.look.notify_one();
        }
    }

    /// Runs the request `f` makes, again while it fails (a member down refuses at once) until
    /// `GIVE_UP`.
    fn run<T: Send + 'static>(
        &self,
        f: impl Fn(Client) -> futures::future::BoxFuture<'static, Result<T, etcd_client::Error>>,
    ) -> Result<T, StoreError> {
        let rt = self.rt.as_ref().expect("the runtime lives until drop");
        let started = std::time::Instant::now();
        let give_up = if self.down.load(Ordering::Relaxed) { Duration::ZERO } else { GIVE_UP };
        let mut tries = 0;
        loop {
            let member = self.current.load(Ordering::Relaxed) % self.clients.len();
            match wait(rt, f(self.clients[member].clone()))? {
                Ok(v) => {
                    self.down.store(false, Ordering::Relaxed);
                    return Ok(v);
                }
                Err(e) if started.elapsed() >= give_up && tries + 1 >= self.clients.len() => {
                    self.down.store(true, Ordering::Relaxed);
                    return Err(unreachable(e));
                }
                Err(e) => {
                    tracing::debug!(member, error = %e, "etcd request failed; asking the next member");
                    let next = (member + 1) % self.clients.len();
                    let _ = self.current.compare_exchange(member, next, Ordering::Relaxed, Ordering::Relaxed);
                    self.look.notify_one();
                    tries += 1;
                    // Once round every member at once; then a pause between rounds.
                    if tries % self.clients.len() == 0 {
                        std::thread::sleep(Duration::from_millis(200));
                    }
                }
            }
        }
    }

    /// Every key starting with `prefix`, read from etcd at one revision.
    fn scan_etcd(&self, prefix: &str) -> Result<Objects, StoreError> {
        let (start, end) = (self.key(prefix), prefix_end(&self.key(prefix)));
        let start = start.into_bytes();
        let (pairs, _) = self.run(move |c| Box::pin(read_all(c, start.clone(), end.clone())))?;
        Ok(objects(pairs, &self.prefix).collect())
    }

    /// Every key starting with `prefix`, read from this head's copy once it has every change
    /// made before now; none without a copy. A copy that lags is dropped, so that the scans
    /// after it do not wait for it too.
    fn scan_copy(&self, prefix: &str) -> Result<Option<Objects>, StoreError> {
        let Some(mirror) = self.kept().as_ref().map(|k| k.mirror.clone()) else { return Ok(None) };
        let copied = mirror.scan_at(self.mark()?, prefix, CATCH_UP);
        let mut kept = self.kept();
        match (&copied, kept.as_mut()) {
            (Some(_), Some(k)) => k.served += 1,
            (None, Some(k)) => {
                tracing::warn!(
                    prefix,
                    served = k.served,
                    "this head's copy of the store lags: dropped it, reading etcd itself"
                );
                k.task.abort();
                *kept = None;
            }
            (_, None) => {}
        }
        Ok(copied)
    }
}

/// One operation of a transaction: a key and its new value, or none to delete it.
type Op<'a> = (&'a str, Option<&'a Vec<u8>>);

/// Packs writers' groups, in order, into transactions within etcd's limits, never splitting a
/// group that fits in one (one that does not, such as 300 HSM requests of one write, goes in
/// as few pieces as fit, in order). etcd refuses a transaction that names a key twice: a later change of a key takes
/// the place of the earlier one, which is what applying both in order would leave.
fn pack(groups: &[Vec<Change>]) -> Vec<Vec<Op<'_>>> {
    let mut txns = Vec::new();
    let mut open: Vec<Op<'_>> = Vec::new();
    let mut slot: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    let mut bytes = 0;
    // A group beyond the limits cannot be one transaction: its pieces go in order, each whole.
    let pieces = groups.iter().flat_map(|g| {
        let mut out: Vec<&[Change]> = Vec::new();
        let (mut from, mut bytes) = (0, 0);
        for (i, (k, v)) in g.iter().enumerate() {
            let size = k.len() + v.as_ref().map_or(0, Vec::len) + 16;
            if i > from && (i - from >= MAX_OPS || bytes + size > MAX_BYTES) {
                out.push(&g[from..i]);
                (from, bytes) = (i, 0);
            }
            bytes += size;
        }
        out.push(&g[from..]);
        out
    });
    for group in pieces {
        let size: usize = group.iter().map(|(k, v)| k.len() + v.as_ref().map_or(0, Vec::len) + 16).sum();
        if !open.is_empty() && (open.len() + group.len() > MAX_OPS || bytes + size > MAX_BYTES) {
            txns.push(std::mem::take(&mut open));
            slot.clear();
            bytes = 0;
        }
        bytes += size;
        for (key, value) in group {
            match slot.get(key.as_str()) {
                Some(&i) => open[i] = (key, value.as_ref()),
                None => {
                    slot.insert(key, open.len());
                    open.push((key, value.as_ref()));
                }
            }
        }
    }
    if !open.is_empty() {
        txns.push(open);
    }
    txns
}

/// Which of `clients` is connected to the member that leads etcd's raft, as the members say,
/// and the raft term it leads in.
async fn leader_of(clients: Vec<Client>) -> Option<(usize, u64)> {
    let asked = clients.into_iter().map(|mut c| async move {
        let status = tokio::time::timeout(TIMEOUT, c.status()).await.ok()?.ok()?;
        Some((status.header()?.member_id(), status.leader(), status.raft_term()))
    });
    let answers = futures::future::join_all(asked).await;
    let leader = answers.iter().flatten().map(|(_, leader, _)| *leader).find(|l| *l != 0)?;
    answers
        .iter()
        .enumerate()
        .find_map(|(i, a)| a.filter(|(member, _, _)| *member == leader).map(|(_, _, term)| (i, term)))
}

/// What the task that keeps requests on etcd's raft leader needs.
struct Follow {
    clients: Vec<Client>,
    endpoints: Vec<String>,
    term: Arc<AtomicU64>,
    look: Arc<tokio::sync::Notify>,
}

impl Follow {
    /// Keeps `current` on the raft leader's member while the backend lives: looks every
    /// `FIND_LEADER`, every `FIND_AGAIN` while no member names a leader (`known` is false), and
    /// at once when told. A leader that changed in between costs a forwarding hop per request.
    async fn run(self, current: std::sync::Weak<AtomicUsize>, mut known: bool) {
        loop {
            let next = if known { FIND_LEADER } else { FIND_AGAIN };
            tokio::select! {
                _ = tokio::time::sleep(next) => {}
                _ = self.look.notified() => {}
            }
            let Some(current) = current.upgrade() else { return };
            let found = leader_of(self.clients.clone()).await;
            known = found.is_some();
            if let Some((i, term)) = found {
                self.term.store(term, Ordering::Relaxed);
                if current.swap(i, Ordering::Relaxed) != i {
                    tracing::info!(
                        member = self.endpoints[i].as_str(),
                        "etcd's raft leader is another member now: requests go there"
                    );
                }
            }
        }
    }
}

/// Every `every`, compacts etcd's history up to the revision it had the round before (read
/// with `key`), as long as the backend lives. The copies other heads keep follow the watch
/// closely; one that lags that much copies the store again.
async fn compact(clients: Vec<Client>, current: Arc<AtomicUsize>, key: String, every: Duration) {
    let mut last = None;
    loop {
        tokio::time::sleep(every).await;
        let mut client = clients[current.load(Ordering::Relaxed) % clients.len()].clone();
        if let Some(revision) = last {
            match client.compact(revision, None).await {
                Ok(_) => tracing::info!(revision, "compacted etcd's history"),
                Err(e) => tracing::warn!(revision, error = %e, "cannot compact etcd's history"),
            }
        }
        last = match revision_now(client, key.clone()).await {
            Ok(now) => Some(now),
            Err(e) => {
                tracing::debug!(error = %e, "cannot read etcd's revision to compact up to it later");
                None
            }
        };
    }
}

/// Runs `fut` on `rt` and waits for it from any thread, async worker or not.
fn wait<T: Send + 'static>(
    rt: &tokio::runtime::Runtime,
    fut: impl std::future::Future<Output = T> + Send + 'static,
) -> Result<T, StoreError> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    rt.spawn(async move {
        let _ = tx.send(fut.await);
    });
    rx.recv().map_err(|_| StoreError::Unavailable("etcd: the store's runtime stopped".into()))
}

/// etcd's revision now, read with `key` (a linearizable read: a quorum must answer).
async fn revision_now(mut client: Client, key: String) -> Result<i64, etcd_client::Error> {
    let now = client.get(key, Some(GetOptions::new().with_count_only())).await?;
    Ok(now.header().map_or(0, |h| h.revision()))
}

/// Keys with their values.
pub(super) type Pairs = Vec<(Vec<u8>, Vec<u8>)>;

/// Every key from `start` to before `end` with its value, read at one revision, and that
/// revision. A page too large for one answer is asked for again in halves.
pub(super) async fn read_all(client: Client, start: Vec<u8>, end: Vec<u8>) -> Result<(Pairs, i64), etcd_client::Error> {
    let mut kv = client.kv_client().max_decoding_message_size(MAX_ANSWER);
    let (mut from, mut revision, mut limit, mut out) = (start, 0, PAGE, Pairs::new());
    loop {
        let mut options = GetOptions::new().with_range(end.clone()).with_limit(limit);
        if revision > 0 {
            options = options.with_revision(revision);
        }
        let page = match kv.get(from.clone(), Some(options)).await {
            Err(etcd_client::Error::GRpcStatus(s)) if s.code() == tonic::Code::OutOfRange && limit > 1 => {
                limit /= 2;
                continue;
            }
            page => page?,
        };
        if revision == 0 {
            revision = page.header().map_or(0, |h| h.revision());
        }
        out.extend(page.kvs().iter().map(|kv| (kv.key().to_vec(), kv.value().to_vec())));
        match out.last() {
            Some((last, _)) if page.more() => from = [last.as_slice(), b"\0"].concat(),
            _ => return Ok((out, revision)),
        }
    }
}

/// `pairs` as objects: each key without `prefix`, which it starts with.
pub(super) fn objects(pairs: Pairs, prefix: &str) -> impl Iterator<Item = (String, Vec<u8>)> {
    let len = prefix.len();
    pairs.into_iter().map(move |(k, v)| (String::from_utf8_lossy(k.get(len..).unwrap_or_default()).into_owned(), v))
}

/// The first key after every key starting with `prefix`.
pub(super) fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

impl Backend for Etcd {
    fn commit(&self, groups: &[Vec<Change>]) -> Result<(), StoreError> {
        for ops in pack(groups) {
            let ops: Vec<TxnOp> = ops
                .into_iter()
                .map(|(key, value)| match value {
                    Some(v) => TxnOp::put(self.key(key), v.clone(), None),
                    None => TxnOp::delete(self.key(key), None),
                })
                .collect();
            let fence = self.fence.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
            let resp = self.run(move |mut c| {
                let ops = ops.clone();
                let when: Vec<Compare> = fence
                    .iter()
                    .map(|(key, rev)| Compare::create_revision(key.clone(), CompareOp::Equal, *rev))
                    .collect();
                Box::pin(async move { c.txn(Txn::new().when(when).and_then(ops)).await })
            })?;
            self.saw_term(resp.header());
            if !resp.succeeded() {
                tracing::error!("a store write was refused: this head's election key is gone, so it leads no more");
                return Err(StoreError::Unavailable(
                    "this head no longer leads the cluster (its lease ended); another head takes over".into(),
                ));
            }
        }
        Ok(())
    }

    fn mirror(&self, on: bool) {
        let mut kept = self.kept();
        if !on {
            if let Some(k) = kept.take() {
                k.task.abort();
                tracing::info!(served = k.served, "scans read this head's copy of the store: dropped it");
            }
        } else if kept.is_none() {
            let mirror = Arc::new(Mirror::default());
            let (clients, current) = (self.clients.clone(), self.current.clone());
            let client = move |n: usize| clients[(current.load(Ordering::Relaxed) + n) % clients.len()].clone();
            let rt = self.rt.as_ref().expect("the runtime lives until drop");
            let task = rt.spawn(mirror.clone().keep(client, self.prefix.clone()));
            *kept = Some(Kept { mirror, task, served: 0 });
        }
    }

    fn compact_every(&self, every: Duration) {
        let (clients, current, key) = (self.clients.clone(), self.current.clone(), self.key(""));
        let rt = self.rt.as_ref().expect("the runtime lives until drop");
        rt.spawn(compact(clients, current, key, every));
    }

    fn fence(&self, key: &[u8], revision: i64) {
        *self.fence.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some((key.to_vec(), revision));
    }

    fn scan(&self, prefix: &str) -> Result<Objects, StoreError> {
        let mut out = match self.scan_copy(prefix)? {
            Some(objects) => objects,
            None => self.scan_etcd(prefix)?,
        };
        out.retain(|(key, _)| key != MARK);
        Ok(out)
    }

    /// One transaction: put when the key was never made, read it otherwise.
    fn create_or_get(&self, key: &str, value: &[u8]) -> Result<Vec<u8>, StoreError> {
        let (key, value) = (self.key(key), value.to_vec());
        let put = value.clone();
        let resp = self.run(move |mut c| {
            let (key, put) = (key.clone(), put.clone());
            Box::pin(async move {
                let txn = Txn::new()
                    .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                    .and_then([TxnOp::put(key.clone(), put, None)])
                    .or_else([TxnOp::get(key, None)]);
                c.txn(txn).await
            })
        })?;
        if resp.succeeded() {
            return Ok(value);
        }
        match resp.op_responses().into_iter().next() {
            Some(TxnOpResponse::Get(get)) => match get.kvs().first() {
                Some(kv) => Ok(kv.value().to_vec()),
                None => Err(StoreError::Db("etcd: a key that exists read as none".into())),
            },
            _ => Err(StoreError::Db("etcd: a transaction answered without its read".into())),
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        // Dropped from async code too, where a runtime may not block to shut down.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(key: &str, value: Option<&str>) -> Change {
        (key.to_string(), value.map(|v| v.as_bytes().to_vec()))
    }

    #[test]
    fn groups_pack_within_limits_whole_and_without_a_key_twice() {
        let groups = vec![
            vec![change("jobs/1", Some("a")), change("runs/1", Some("r"))],
            vec![change("jobs/1", Some("b"))],
            vec![change("jobs/2", None)],
        ];
        let txns = pack(&groups);
        assert_eq!(txns.len(), 1);
        let b = b"b".to_vec();
        let r = b"r".to_vec();
        assert_eq!(txns[0], vec![("jobs/1", Some(&b)), ("runs/1", Some(&r)), ("jobs/2", None)]);
        // 300 one-key groups: three transactions of at most 128 operations.
        let many: Vec<Vec<Change>> = (0..300).map(|i| vec![change(&format!("jobs/{i}"), Some("x"))]).collect();
        let sizes: Vec<usize> = pack(&many).iter().map(Vec::len).collect();
        assert_eq!(sizes, [128, 128, 44]);
        // A group is never split: 100 + 100 do not share a transaction.
        let two: Vec<Vec<Change>> =
            (0..2).map(|g| (0..100).map(|i| change(&format!("k/{g}-{i}"), Some("x"))).collect()).collect();
        assert_eq!(pack(&two).iter().map(Vec::len).collect::<Vec<_>>(), [100, 100]);
        // Nor are big values packed past the request limit.
        let big = "x".repeat(600 << 10);
        let heavy: Vec<Vec<Change>> = (0..3).map(|i| vec![change(&format!("b/{i}"), Some(&big))]).collect();
        assert_eq!(pack(&heavy).len(), 3);
        // A group beyond the limits goes in pieces that fit, in order.
        let big_group: Vec<Vec<Change>> = vec![(0..300).map(|i| change(&format!("h/{i}"), Some("x"))).collect()];
        let txns = pack(&big_group);
        assert_eq!(txns.iter().map(Vec::len).collect::<Vec<_>>(), [128, 128, 44]);
        assert_eq!(txns[2][43].0, "h/299");
    }

    #[test]
    fn a_prefix_ends_after_its_last_key() {
        assert_eq!(prefix_end("/clusterfs/"), b"/clusterfs0");
        assert_eq!(prefix_end("a\u{7f}"), b"a\x80");
    }
}
