//! The HSM coordinator: a durable queue of requests, dispatched to movers by coordinatool's rules.

mod report;
mod rules;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use clusterfs_fs::{Errno, FsError};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tracing::{info, warn};

use crate::config::HsmConfig;
use crate::head::cluster::Cluster;
use crate::head::store::{Change, Store};
use crate::hsm::{Action, Held, Intake, MoverInfo, Request, tag, valid_hint};
use crate::proto::{Message, Op};
pub use report::Meta;
use report::Reports;
pub use rules::Rules;
use rules::{Placement, Slots};

/// The status a canceled request ends with (ECANCELED).
pub const CANCELED: i32 = libc::ECANCELED;
/// How long a mover has to take a batch of requests.
const SEND_TIMEOUT: Duration = Duration::from_secs(30);

/// What the store keeps of a request: it and where it was sent.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    req: Request,
    seq: u64,
    /// The mover it was sent to; none while queued.
    mover: Option<String>,
    hint: Option<String>,
}

/// A request not ended yet.
#[derive(Debug)]
struct Entry {
    rec: Record,
    bytes: u64,
    total: u64,
}

/// What the head knows of one mover.
#[derive(Debug, Default)]
struct Mover {
    info: MoverInfo,
    /// The connection it announced itself on; none while it is away.
    conn: Option<u64>,
    gone_since: Option<Instant>,
    drained: bool,
    running: BTreeMap<Action, u32>,
    sent: BTreeSet<u64>,
    slots: Slots,
}

impl Mover {
    /// Request `cookie` no longer runs here (ended, or queued again): its slot frees.
    fn release(&mut self, cookie: u64, req: &Request) {
        if self.sent.remove(&cookie) {
            let n = self.running.entry(req.action).or_default();
            *n = n.saturating_sub(1);
            if req.action == Action::Archive {
                self.slots.ended(&req.data, now_ms());
            }
        }
    }
}

/// Ended requests, by action.
#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    done: u64,
    failed: u64,
    canceled: u64,
}

#[derive(Debug, Default)]
struct Core {
    requests: HashMap<u64, Entry>,
    /// Queued requests in dispatch order: restores, then removals, then archives, each FIFO.
    queue: BTreeMap<(Action, u64), u64>,
    movers: BTreeMap<String, Mover>,
    next_seq: u64,
    locked: bool,
    ended: BTreeMap<Action, Counts>,
    /// With fair share: requests sent per uid since that uid last had none queued.
    served: HashMap<u32, u64>,
}

/// Admin switches kept across restarts.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct Switches {
    locked: bool,
    drained: BTreeSet<String>,
}

/// The HSM coordinator.
#[derive(Debug)]
pub struct Hsm {
    pub cfg: HsmConfig,
    rules: Rules,
    cluster: Arc<Cluster>,
    core: Mutex<Core>,
    reports: Reports,
    wake: Notify,
    /// Request data whose report hint was not a valid name.
    pub bad_hints: AtomicU64,
    /// Changes were queued for the store that nobody waits for.
    dirty: std::sync::atomic::AtomicBool,
    /// Ends to confirm to movers after the next commit, by mover.
    acks: Mutex<HashMap<String, Vec<u64>>>,
}

/// One line of `hsm/status` per mover, and what `movers/<mover>/` shows.
#[derive(Debug, Clone)]
pub struct MoverView {
    pub name: String,
    pub state: String,
    pub info: MoverInfo,
    pub running: BTreeMap<Action, u32>,
    /// Its requests: cookie, fid, action, bytes, total.
    pub requests: Vec<(u64, String, Action, u64, u64)>,
    pub slot_tags: Vec<String>,
}

fn key(cookie: u64) -> String {
    format!("{cookie:016x}")
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl Hsm {
    /// Loads the queue from the store; the requests sent before a restart wait for their movers.
    pub fn load(cfg: HsmConfig, cluster: Arc<Cluster>, spool: std::path::PathBuf) -> anyhow::Result<Hsm> {
        let rules = Rules::new(&cfg).map_err(anyhow::Error::msg)?;
        let mut core = Core::default();
        let switches: Switches =
            cluster.store().scan::<Switches>("hsmctl")?.into_iter().next().map(|(_, s)| s).unwrap_or_default();
        core.locked = switches.locked;
        let mut active: HashMap<String, u64> = HashMap::new();
        for (_, rec) in cluster.store().scan::<Record>("hsm")? {
            core.next_seq = core.next_seq.max(rec.seq + 1);
            if let Some(h) = &rec.hint {
                *active.entry(h.clone()).or_default() += 1;
            }
            match &rec.mover {
                None => {
                    core.queue.insert((rec.req.action, rec.seq), rec.req.cookie);
                }
                Some(m) => {
                    let mover = core.movers.entry(m.clone()).or_default();
                    mover.gone_since = Some(Instant::now());
                    mover.sent.insert(rec.req.cookie);
                    *mover.running.entry(rec.req.action).or_default() += 1;
                }
            }
            core.requests.insert(rec.req.cookie, Entry { rec, bytes: 0, total: 0 });
        }
        for m in switches.drained {
            core.movers.entry(m).or_default().drained = true;
        }
        let interval = Duration::from_millis(cfg.reporting_schedule_interval_ms);
        let reports = Reports::open(spool, interval, &active)?;
        info!(requests = core.requests.len(), queued = core.queue.len(), "hsm queue loaded");
        Ok(Hsm {
            cfg,
            rules,
            cluster,
            core: Mutex::new(core),
            reports,
            wake: Notify::new(),
            bad_hints: AtomicU64::new(0),
            dirty: std::sync::atomic::AtomicBool::new(false),
            acks: Mutex::default(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Core> {
        self.core.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn store(&self) -> &Store {
        self.cluster.store()
    }

    /// The report hint of request data, when reporting is on.
    fn hint(&self, data: &str) -> Option<String> {
        let key = self.cfg.reporting_hint.as_deref()?;
        let value = tag(data, key)?;
        if valid_hint(value) {
            Some(value.to_string())
        } else {
            self.bad_hints.fetch_add(1, Ordering::Relaxed);
            None
        }
    }

    fn report(&self, rec: &Record, line: impl FnOnce() -> String) {
        if let Some(h) = &rec.hint {
            self.reports.line(h, &line());
        }
    }

    /// Queues new requests (durable when the returned ticket is waited for); duplicates of a
    /// known cookie are skipped. Returns how many were queued and the store ticket.
    pub fn enqueue_later(&self, requests: Vec<Request>) -> (usize, u64) {
        let mut changes: Vec<Change> = Vec::with_capacity(requests.len());
        let mut core = self.lock();
        let mut queued = 0;
        for req in requests {
            if core.requests.contains_key(&req.cookie) {
                continue;
            }
            let seq = core.next_seq;
            core.next_seq += 1;
            let hint = self.hint(&req.data);
            let rec = Record { req, seq, mover: None, hint };
            match Store::change("hsm", &key(rec.req.cookie), &rec) {
                Ok(c) => changes.push(c),
                Err(e) => {
                    warn!(error = %e, "cannot encode an hsm request");
                    continue;
                }
            }
            if let Some(h) = &rec.hint {
                self.reports.begin(h);
                self.reports.line(h, &format!("new {}", rec.req.fid));
            }
            core.queue.insert((rec.req.action, seq), rec.req.cookie);
            core.requests.insert(rec.req.cookie, Entry { rec, bytes: 0, total: 0 });
            queued += 1;
        }
        let ticket = self.store().write_later(changes);
        drop(core);
        self.wake.notify_one();
        (queued, ticket)
    }

    /// Queues changes for the store; the keeper commits them within a round.
    fn later(&self, changes: Vec<Change>) {
        if !changes.is_empty() {
            self.store().write_later(changes);
            self.dirty.store(true, Ordering::Release);
        }
    }

    /// Waits until the changes of `ticket` are durable (blocking).
    pub fn durable(&self, ticket: u64) -> Result<(), FsError> {
        self.store().wait(ticket).map_err(FsError::from)
    }

    fn save_switches(&self, core: &Core) -> Result<(), FsError> {
        let s = Switches {
            locked: core.locked,
            drained: core.movers.iter().filter(|(_, m)| m.drained).map(|(n, _)| n.clone()).collect(),
        };
        self.store().put("hsmctl", "switches", &s).map_err(FsError::from)
    }

    /// `lock`: no request is sent to a mover until `unlock`.
    pub fn set_locked(&self, locked: bool) -> Result<(), FsError> {
        let mut core = self.lock();
        core.locked = locked;
        self.save_switches(&core)?;
        drop(core);
        self.wake.notify_one();
        Ok(())
    }

    /// `drain <mover>` sends it nothing more (what it runs finishes); `resume` undoes it.
    pub fn set_drained(&self, mover: &str, drained: bool) -> Result<(), FsError> {
        let mut core = self.lock();
        match core.movers.get_mut(mover) {
            Some(m) => m.drained = drained,
            None => return Err(FsError::not_found(format!("mover {mover}"))),
        }
        self.save_switches(&core)?;
        drop(core);
        self.wake.notify_one();
        Ok(())
    }

    /// Ends request `cookie` with `status`: forgotten by the store, `done` reported.
    fn finish(&self, core: &mut Core, cookie: u64, status: i32) {
        let Some(entry) = core.requests.remove(&cookie) else { return };
        let rec = entry.rec;
        match &rec.mover {
            None => {
                core.queue.remove(&(rec.req.action, rec.seq));
            }
            Some(m) => {
                if let Some(mover) = core.movers.get_mut(m) {
                    mover.release(cookie, &rec.req);
                }
            }
        }
        let counts = core.ended.entry(rec.req.action).or_default();
        match status {
            0 => counts.done += 1,
            CANCELED => counts.canceled += 1,
            _ => counts.failed += 1,
        }
        self.report(&rec, || format!("done {} {status}", rec.req.fid));
        if let Some(h) = &rec.hint {
            self.reports.end(h);
        }
        self.later(vec![(format!("hsm/{}", key(cookie)), None)]);
        self.wake.notify_one();
    }

    /// Puts a request sent to a mover back in the queue.
    fn requeue(&self, core: &mut Core, cookie: u64) -> Option<Change> {
        let entry = core.requests.get_mut(&cookie)?;
        let mover = entry.rec.mover.take()?;
        entry.bytes = 0;
        let change = Store::change("hsm", &key(cookie), &entry.rec).ok();
        let (req, seq) = (entry.rec.req.clone(), entry.rec.seq);
        if let Some(m) = core.movers.get_mut(&mover) {
            m.release(cookie, &req);
        }
        core.queue.insert((req.action, seq), cookie);
        change
    }

    /// A mover announced itself on connection `conn` with what it holds: requests it does
    /// not know are queued again, ended ones are accepted, unknown ones are stopped.
    pub fn mover_hello(self: &Arc<Self>, node: &str, conn: u64, info: MoverInfo, held: Vec<Held>) {
        let mut acks = Vec::new();
        let mut stop = Vec::new();
        let mut changes = Vec::new();
        {
            let mut core = self.lock();
            let m = core.movers.entry(node.to_string()).or_default();
            m.info = info;
            m.conn = Some(conn);
            m.gone_since = None;
            let known: HashMap<u64, &Held> = held.iter().map(|h| (h.cookie, h)).collect();
            let lost: Vec<u64> = m.sent.iter().filter(|c| !known.contains_key(c)).copied().collect();
            for cookie in lost {
                changes.extend(self.requeue(&mut core, cookie));
            }
            for h in &held {
                let mine = core.movers.get(node).is_some_and(|m| m.sent.contains(&h.cookie));
                match (mine, h.status) {
                    (true, Some(status)) => {
                        self.finish(&mut core, h.cookie, status);
                        acks.push(h.cookie);
                    }
                    (true, None) => {
                        if let Some(e) = core.requests.get_mut(&h.cookie) {
                            e.bytes = h.bytes;
                            e.total = h.total;
                        }
                    }
                    (false, Some(_)) => acks.push(h.cookie),
                    (false, None) => stop.push(h.cookie),
                }
            }
        }
        self.later(changes);
        info!(mover = node, held = held.len(), stopping = stop.len(), "mover connected");
        for cookie in stop {
            let (hsm, node) = (self.clone(), node.to_string());
            tokio::spawn(async move {
                if let Err(e) = hsm.cluster.request(&node, Op::HsmCancel { cookie }, SEND_TIMEOUT).await {
                    warn!(mover = node, cookie, error = %e, "cannot stop a request the head no longer has");
                }
            });
        }
        self.wake.notify_one();
        self.ack_later(node, acks);
    }

    /// The mover may forget these requests once their end is durable: told after the next commit.
    fn ack_later(&self, node: &str, cookies: Vec<u64>) {
        if cookies.is_empty() {
            return;
        }
        self.acks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(node.to_string())
            .or_default()
            .extend(cookies);
        self.dirty.store(true, Ordering::Release);
        self.wake.notify_one();
    }

    /// Bytes done of a running request.
    pub fn progress(&self, node: &str, cookie: u64, bytes: u64, total: u64) {
        let mut core = self.lock();
        if let Some(e) = core.requests.get_mut(&cookie).filter(|e| e.rec.mover.as_deref() == Some(node)) {
            e.bytes = bytes;
            e.total = total;
        }
    }

    /// A mover ended a request; it is told to forget it once the end is stored.
    pub fn done(&self, node: &str, cookie: u64, status: i32) {
        let mut core = self.lock();
        if core.requests.get(&cookie).is_some_and(|e| e.rec.mover.as_deref() == Some(node)) {
            self.finish(&mut core, cookie, status);
        }
        drop(core);
        self.ack_later(node, vec![cookie]);
    }

    /// The connection `conn` of mover `node` ended: its requests wait `client_grace_ms` for it.
    pub fn detach(&self, node: &str, conn: u64) {
        let mut core = self.lock();
        if let Some(m) = core.movers.get_mut(node)
            && m.conn == Some(conn)
        {
            m.conn = None;
            m.gone_since = Some(Instant::now());
        }
    }

    /// Dispatches, requeues the requests of movers gone past their grace, reports progress
    /// and removes idle report files, until the task is dropped.
    pub async fn keeper(self: Arc<Self>) {
        let interval = Duration::from_millis(self.cfg.reporting_schedule_interval_ms);
        let mut last_report = Instant::now();
        loop {
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            }
            self.expire_graces();
            let sends = self.dispatch(now_ms());
            for (mover, requests, ticket) in sends {
                let hsm = self.clone();
                tokio::spawn(async move { hsm.send(mover, requests, ticket).await });
            }
            if last_report.elapsed() >= interval {
                last_report = Instant::now();
                self.report_progress();
            }
            self.reports.sweep();
            if self.dirty.swap(false, Ordering::AcqRel) {
                let hsm = self.clone();
                let ticket = self.store().write_later(Vec::new());
                let acks = std::mem::take(&mut *self.acks.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
                if let Ok(Ok(())) = tokio::task::spawn_blocking(move || hsm.durable(ticket)).await {
                    for (node, cookies) in acks {
                        self.cluster.tell(&node, Message::HsmAck { cookies }).await;
                    }
                }
            }
            // Coalesces wakes: many completions make one dispatch round.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn expire_graces(&self) {
        let grace = Duration::from_millis(self.cfg.client_grace_ms);
        let mut core = self.lock();
        let gone: Vec<(String, Vec<u64>)> = core
            .movers
            .iter()
            .filter(|(_, m)| {
                m.conn.is_none() && !m.sent.is_empty() && m.gone_since.is_some_and(|t| t.elapsed() >= grace)
            })
            .map(|(n, m)| (n.clone(), m.sent.iter().copied().collect()))
            .collect();
        let mut changes = Vec::new();
        for (name, cookies) in gone {
            warn!(mover = name, requests = cookies.len(), "mover gone past its grace: its requests are queued again");
            for c in cookies {
                changes.extend(self.requeue(&mut core, c));
            }
        }
        self.later(changes);
    }

    /// Whether mover `m` counts for placement: it takes work now or may come back soon.
    fn present(&self, m: &Mover) -> bool {
        let grace = Duration::from_millis(self.cfg.client_grace_ms);
        !m.drained && (m.conn.is_some() || m.gone_since.is_some_and(|t| t.elapsed() < grace))
    }

    /// One dispatch round: picks a mover for every queued request that fits one now and
    /// records where it goes. Returns per mover the requests to send and the store ticket
    /// that must be durable first.
    fn dispatch(&self, now: u64) -> Vec<(String, Vec<Request>, u64)> {
        let mut core = self.lock();
        if core.locked || core.queue.is_empty() {
            return Vec::new();
        }
        let core = &mut *core;
        let mut out: BTreeMap<String, Vec<Request>> = BTreeMap::new();
        let mut changes = Vec::new();
        let present: BTreeSet<String> =
            core.movers.iter().filter(|(_, m)| self.present(m)).map(|(n, _)| n.clone()).collect();
        let is_present = |n: &str| present.contains(n);
        // Movers whose node takes requests now (connected, reporting): asked once a round.
        let reachable: BTreeSet<String> = core.movers.keys().filter(|n| self.cluster.reachable(n)).cloned().collect();
        let mut uid_running: HashMap<u32, u64> = HashMap::new();
        if self.cfg.fair_share {
            let waiting: BTreeSet<u32> =
                core.queue.values().filter_map(|c| core.requests.get(c).and_then(|e| e.rec.req.uid)).collect();
            core.served.retain(|uid, _| waiting.contains(uid));
            for m in core.movers.values() {
                for c in &m.sent {
                    if let Some(uid) = core.requests.get(c).and_then(|e| e.rec.req.uid) {
                        *uid_running.entry(uid).or_default() += 1;
                    }
                }
            }
        }
        for action in Action::ALL {
            let open = |core: &Core| {
                core.movers.iter().any(|(name, m)| {
                    m.conn.is_some()
                        && !m.drained
                        && reachable.contains(name)
                        && m.info.slots(action).is_none_or(|s| m.running.get(&action).copied().unwrap_or(0) < s)
                })
            };
            if !open(core) {
                continue;
            }
            let order = self.order(core, action, &uid_running);
            for cookie in order {
                let Some(entry) = core.requests.get(&cookie) else { continue };
                let req = &entry.rec.req;
                let placement = self.rules.placement(req, &is_present);
                let batching = action == Action::Archive && self.rules.batch.is_some();
                let best = core
                    .movers
                    .iter()
                    .filter(|(name, m)| {
                        m.conn.is_some()
                            && !m.drained
                            && reachable.contains(*name)
                            && m.info.serves(req.archive_id)
                            && m.info.slots(action).is_none_or(|s| m.running.get(&action).copied().unwrap_or(0) < s)
                            && match &placement {
                                Placement::Any => true,
                                Placement::Among(v) => v.iter().any(|x| x == *name),
                            }
                            && (!batching || m.slots.fit(&self.rules, &req.data, now).is_some())
                    })
                    .min_by_key(|(_, m)| (m.slots.busy(), m.running.values().sum::<u32>()))
                    .map(|(n, _)| n.clone());
                let Some(mover) = best else { continue };
                let entry = core.requests.get_mut(&cookie).expect("looked up above");
                entry.rec.mover = Some(mover.clone());
                let (seq, req) = (entry.rec.seq, entry.rec.req.clone());
                if let Ok(c) = Store::change("hsm", &key(cookie), &entry.rec) {
                    changes.push(c);
                }
                self.report(&entry.rec, || format!("assign {} {mover}", req.fid));
                self.report(&entry.rec, || format!("sent {} {mover}", req.fid));
                if let Some(uid) = req.uid {
                    *uid_running.entry(uid).or_default() += 1;
                    *core.served.entry(uid).or_default() += 1;
                }
                core.queue.remove(&(action, seq));
                let m = core.movers.get_mut(&mover).expect("chosen among the movers");
                m.sent.insert(cookie);
                *m.running.entry(action).or_default() += 1;
                if batching && let Some(i) = m.slots.fit(&self.rules, &req.data, now) {
                    m.slots.take(i, &req.data, now);
                }
                out.entry(mover).or_default().push(req);
                if !open(core) {
                    break;
                }
            }
        }
        if out.is_empty() {
            return Vec::new();
        }
        let ticket = self.store().write_later(changes);
        out.into_iter().map(|(m, reqs)| (m, reqs, ticket)).collect()
    }

    /// The queued requests of `action` in the order they are offered to movers: FIFO, or
    /// with fair share the owner with the fewest running first, then the fewest served
    /// since it last had nothing queued, then the oldest.
    fn order(&self, core: &Core, action: Action, uid_running: &HashMap<u32, u64>) -> Vec<u64> {
        let fifo = core.queue.range((action, 0)..=(action, u64::MAX)).map(|(_, c)| *c);
        if !self.cfg.fair_share {
            return fifo.collect();
        }
        let mut by_uid: BTreeMap<u32, VecDeque<u64>> = BTreeMap::new();
        for c in fifo {
            let uid = core.requests.get(&c).and_then(|e| e.rec.req.uid).unwrap_or(u32::MAX);
            by_uid.entry(uid).or_default().push_back(c);
        }
        let mut given: HashMap<u32, u64> = uid_running.clone();
        let mut out = Vec::new();
        while let Some((&uid, _)) = by_uid.iter().filter(|(_, q)| !q.is_empty()).min_by_key(|(uid, q)| {
            let served = core.served.get(uid).copied().unwrap_or(0);
            (given.get(uid).copied().unwrap_or(0), served, core.requests.get(&q[0]).map(|e| e.rec.seq))
        }) {
            let q = by_uid.get_mut(&uid).expect("picked above");
            out.extend(q.pop_front());
            *given.entry(uid).or_default() += 1;
        }
        out
    }

    /// Sends requests to their mover once their assignment is durable.
    async fn send(self: Arc<Self>, mover: String, requests: Vec<Request>, ticket: u64) {
        let hsm = self.clone();
        let durable = tokio::task::spawn_blocking(move || hsm.durable(ticket)).await;
        if !matches!(durable, Ok(Ok(()))) {
            warn!(mover, "the store did not take the assignment: the requests are queued again");
            return self.requeue_all(&requests);
        }
        let n = requests.len();
        match self.cluster.try_request(&mover, Op::Hsm { requests: requests.clone() }, SEND_TIMEOUT).await {
            Ok(Ok(_)) => {}
            // Its node stopped reporting, or its connection closed, before they left.
            Err(e) => {
                warn!(mover, requests = n, error = %e.message, "requests not sent to their mover: queued again");
                self.requeue_all(&requests);
            }
            // The mover went away with them: it says what it holds when it comes back.
            Ok(Err(e)) if matches!(e.errno, Errno::HostDown | Errno::TimedOut) => {
                warn!(mover, requests = n, error = %e.message, "requests not confirmed by their mover");
            }
            Ok(Err(e)) => {
                warn!(mover, requests = n, error = %e.message, "the mover refused requests: queued again");
                self.requeue_all(&requests);
            }
        }
    }

    fn requeue_all(&self, requests: &[Request]) {
        let mut core = self.lock();
        let changes: Vec<Change> = requests.iter().filter_map(|r| self.requeue(&mut core, r.cookie)).collect();
        drop(core);
        self.later(changes);
        self.wake.notify_one();
    }

    /// Every interval: a `progress` line for each reported request, queued or running.
    fn report_progress(&self) {
        let core = self.lock();
        let total = core.queue.len();
        for (pos, cookie) in core.queue.values().enumerate() {
            if let Some(e) = core.requests.get(cookie) {
                self.report(&e.rec, || format!("progress {} global_queue {}/{total}", e.rec.req.fid, pos + 1));
            }
        }
        for e in core.requests.values() {
            if let Some(m) = &e.rec.mover {
                self.report(&e.rec, || format!("progress {} {m} {}/{}", e.rec.req.fid, e.bytes, e.total));
            }
        }
    }

    // What the tree shows.

    pub fn report_names(&self) -> Vec<String> {
        self.reports.names()
    }

    pub fn report_meta(&self, hint: &str) -> Option<Meta> {
        self.reports.meta(hint)
    }

    pub fn report_read(&self, hint: &str, offset: u64, size: u32) -> Option<std::io::Result<Vec<u8>>> {
        self.reports.read(hint, offset, size)
    }

    pub fn has_mover(&self, name: &str) -> bool {
        self.lock().movers.contains_key(name)
    }

    pub fn mover_names(&self) -> Vec<String> {
        self.lock().movers.keys().cloned().collect()
    }

    pub fn mover(&self, name: &str) -> Option<MoverView> {
        let core = self.lock();
        let m = core.movers.get(name)?;
        let grace = Duration::from_millis(self.cfg.client_grace_ms);
        let state = match (&m.conn, m.gone_since, m.drained) {
            (Some(_), _, false) => "up".to_string(),
            (Some(_), _, true) => "drained".to_string(),
            (None, Some(t), _) if t.elapsed() < grace => {
                format!("away for {:.1} s (its requests wait {} s for it)", t.elapsed().as_secs_f64(), grace.as_secs())
            }
            (None, _, _) => "gone".to_string(),
        };
        let requests = m
            .sent
            .iter()
            .filter_map(|c| core.requests.get(c))
            .map(|e| (e.rec.req.cookie, e.rec.req.fid.to_string(), e.rec.req.action, e.bytes, e.total))
            .collect();
        let slot_tags = m.slots.slots.iter().map(|s| s.as_ref().map_or("-".into(), |s| s.tag.clone())).collect();
        Some(MoverView {
            name: name.to_string(),
            state,
            info: m.info.clone(),
            running: m.running.clone(),
            requests,
            slot_tags,
        })
    }

    /// `hsm/status`.
    pub fn status(&self) -> String {
        let core = self.lock();
        let mut out = format!("state {}\n", if core.locked { "locked" } else { "unlocked" });
        for action in Action::ALL {
            let queued = core.queue.range((action, 0)..=(action, u64::MAX)).count();
            let running: u32 = core.movers.values().map(|m| m.running.get(&action).copied().unwrap_or(0)).sum();
            let c = core.ended.get(&action).copied().unwrap_or_default();
            out += &format!(
                "{} queued {queued} running {running} done {} failed {} canceled {}\n",
                action.word(),
                c.done,
                c.failed,
                c.canceled
            );
        }
        drop(core);
        for name in self.mover_names() {
            if let Some(m) = self.mover(&name) {
                out += &format!("mover {} {} {} running {}\n", m.name, m.state, slots_text(&m), m.requests.len());
            }
        }
        out +=
            &format!("reports {} bad_hints {}\n", self.reports.names().len(), self.bad_hints.load(Ordering::Relaxed));
        out
    }

    /// The line of `/cluster/status`.
    pub fn summary(&self) -> String {
        let core = self.lock();
        let up = core.movers.values().filter(|m| m.conn.is_some()).count();
        format!(
            "hsm queued {} running {} movers {up}{}\n",
            core.queue.len(),
            core.requests.len() - core.queue.len(),
            if core.locked { " locked" } else { "" }
        )
    }
}

/// `archive 2/4 restore 0/- remove 0/-`: running and slots per action (`-`: no limit).
pub fn slots_text(m: &MoverView) -> String {
    Action::ALL
        .iter()
        .map(|a| {
            let limit = m.info.slots(*a).map_or("-".to_string(), |s| s.to_string());
            format!("{} {}/{limit}", a.word(), m.running.get(a).copied().unwrap_or(0))
        })
        .collect::<Vec<_>>()
        .join(" ")
}

impl Intake for Hsm {
    fn enqueue(&self, requests: Vec<Request>) -> Result<usize, String> {
        let (n, ticket) = self.enqueue_later(requests);
        self.durable(ticket).map_err(|e| e.message)?;
        Ok(n)
    }

    fn cancel(&self, cookie: u64) -> Result<(), String> {
        let mut core = self.lock();
        let entry = core.requests.get(&cookie).ok_or_else(|| format!("no request with cookie {cookie:#x}"))?;
        match entry.rec.mover.clone() {
            Some(m) if core.movers.get(&m).is_some_and(|m| m.conn.is_some()) => {
                // Its mover stops it and answers with the canceled status.
                let cluster = self.cluster.clone();
                tokio::spawn(async move {
                    if let Err(e) = cluster.request(&m, Op::HsmCancel { cookie }, SEND_TIMEOUT).await {
                        warn!(mover = m, cookie, error = %e, "cannot tell the mover to cancel");
                    }
                });
            }
            // Queued, or its mover is away (it is told to stop when it comes back).
            _ => self.finish(&mut core, cookie, CANCELED),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HeadConfig;
    use crate::hsm::Fid;

    fn request(cookie: u64, action: Action) -> Request {
        let fid = Fid { seq: 0x200000401, oid: cookie as u32, ver: 0 };
        Request {
            cookie,
            fid,
            dfid: fid,
            action,
            archive_id: 1,
            flags: 0,
            extent: (0, u64::MAX),
            gid: 0,
            data: String::new(),
            uid: None,
        }
    }

    fn hsm(dir: &std::path::Path) -> Arc<Hsm> {
        let store = Store::open(&dir.join("store.redb")).unwrap();
        let cluster = Arc::new(Cluster::load(HeadConfig::default(), store).unwrap());
        Arc::new(Hsm::load(HsmConfig::default(), cluster, dir.join("reports")).unwrap())
    }

    #[test]
    fn restores_go_before_removals_before_archives_within_each_movers_slots() {
        let dir = tempfile::tempdir().unwrap();
        let h = hsm(dir.path());
        let (n, _) = h.enqueue_later(vec![
            request(1, Action::Archive),
            request(2, Action::Remove),
            request(3, Action::Restore),
            request(4, Action::Archive),
            request(5, Action::Restore),
        ]);
        assert_eq!(n, 5);
        let (again, _) = h.enqueue_later(vec![request(1, Action::Archive)]);
        assert_eq!(again, 0, "a known cookie is not queued twice");
        let info = MoverInfo { archive_ids: vec![], max_archive: Some(1), max_restore: Some(1), max_remove: None };
        h.mover_hello("m1", 7, info, vec![]);
        assert!(h.dispatch(0).is_empty(), "a mover whose node has no connection is given nothing");
        let (tx, _rx) = tokio::sync::mpsc::channel(8);
        h.cluster.attach("m1", crate::head::cluster::Link { conn: 7, tx }).unwrap();
        let sent: Vec<(u64, Action)> =
            h.dispatch(0).into_iter().flat_map(|(_, reqs, _)| reqs).map(|r| (r.cookie, r.action)).collect();
        assert_eq!(sent, [(3, Action::Restore), (2, Action::Remove), (1, Action::Archive)]);
        // A slot frees when its request ends; the next of that action goes.
        h.done("m1", 3, 0);
        let next: Vec<u64> = h.dispatch(0).into_iter().flat_map(|(_, reqs, _)| reqs).map(|r| r.cookie).collect();
        assert_eq!(next, [5]);
        assert!(h.status().contains("restore queued 0 running 1 done 1"), "{}", h.status());
    }
}
