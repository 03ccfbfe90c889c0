//! VMs: templates and VMs in the store, placement, the desired state converged on the agents, consoles spooled.

use std::collections::{BTreeMap, VecDeque};
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use clusterfs_fs::{Caller, Errno, FsError};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tracing::{info, warn};

use crate::config::VmsConfig;
use crate::head::cluster::{Cluster, NodeState};
use crate::head::store::Store;
use crate::proto::{Message, Op};
use crate::vms::{Launch, Net, Restart, Template, VmSpec, VmStatus, ip, mac, parse_subnet};

/// How long an agent has to make, start or remove a VM.
const OP_TIMEOUT: Duration = Duration::from_secs(60);
/// Events kept per VM for `state`.
const EVENTS: usize = 20;

/// What the owner asked the VM to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Desired {
    Running,
    Off,
}

/// What the store keeps of a VM.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    pub uid: u32,
    pub gid: u32,
    pub spec: VmSpec,
    /// Everything its node needs, fixed when it was made.
    pub launch: Launch,
    pub node: String,
    pub desired: Desired,
    pub created_ms: u64,
    /// Its history, newest last: the last `EVENTS` events, kept across head restarts.
    #[serde(default, skip_serializing_if = "VecDeque::is_empty")]
    pub events: VecDeque<String>,
}

/// What its node last said of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Actual {
    Unknown,
    Running,
    Off,
    Crashed,
}

/// A VM as the head holds it.
#[derive(Debug, Clone)]
pub struct Vm {
    pub rec: Record,
    pub actual: Actual,
    /// A clean shutdown under way: destroyed at this time if still running.
    shutdown_by: Option<Instant>,
    /// An operation on its node is under way.
    busy: bool,
    /// A crashed VM is started again only when asked (or restart=always).
    start_asked: bool,
    /// Events noted so far, to know when the record has one to store.
    noted: u64,
    pub changed: SystemTime,
}

impl Vm {
    /// `running on cn3`, `starting on cn3`, `shutting down on cn3`, `crashed on cn3`, `off on cn3`.
    pub fn state_line(&self) -> String {
        let node = &self.rec.node;
        match (self.rec.desired, self.actual) {
            (_, Actual::Crashed) if !self.start_asked && self.rec.spec.restart == Restart::Never => {
                format!("crashed on {node}")
            }
            (Desired::Running, Actual::Running) => format!("running on {node}"),
            (Desired::Running, Actual::Unknown) => format!("unknown on {node} (its node has not reported it)"),
            (Desired::Running, _) => format!("starting on {node}"),
            (Desired::Off, Actual::Running) => format!("shutting down on {node}"),
            (Desired::Off, _) => format!("off on {node}"),
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// The VMs of the cluster.
#[derive(Debug)]
pub struct Vms {
    pub cfg: VmsConfig,
    cluster: Arc<Cluster>,
    vms: Mutex<BTreeMap<String, Vm>>,
    templates: Mutex<BTreeMap<String, Template>>,
    spool: PathBuf,
    next_id: AtomicU64,
    wake: Notify,
}

impl Vms {
    pub fn load(cfg: VmsConfig, cluster: Arc<Cluster>, spool: PathBuf) -> anyhow::Result<Vms> {
        std::fs::create_dir_all(&spool)?;
        let mut vms = BTreeMap::new();
        let mut next = 1;
        for (name, rec) in cluster.store().scan::<Record>("vms")? {
            next = next.max(rec.launch.id + 1);
            vms.insert(
                name,
                Vm {
                    rec,
                    actual: Actual::Unknown,
                    shutdown_by: None,
                    busy: false,
                    start_asked: false,
                    noted: 0,
                    changed: SystemTime::now(),
                },
            );
        }
        let templates = cluster.store().scan::<Template>("vmtemplates")?.into_iter().collect();
        Ok(Vms {
            cfg,
            cluster,
            vms: Mutex::new(vms),
            templates: Mutex::new(templates),
            spool,
            next_id: AtomicU64::new(next),
            wake: Notify::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Vm>> {
        self.vms.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn templates(&self) -> MutexGuard<'_, BTreeMap<String, Template>> {
        self.templates.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn names(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }

    pub fn get(&self, name: &str) -> Option<Vm> {
        self.lock().get(name).cloned()
    }

    pub fn template_names(&self) -> Vec<String> {
        self.templates().keys().cloned().collect()
    }

    pub fn template(&self, name: &str) -> Option<Template> {
        self.templates().get(name).cloned()
    }

    /// Root writes a template.
    pub fn set_template(&self, name: &str, t: Template) -> Result<(), FsError> {
        crate::names::check("template", name).map_err(FsError::invalid)?;
        self.cluster.store().put("vmtemplates", name, &t).map_err(FsError::from)?;
        self.templates().insert(name.to_string(), t);
        Ok(())
    }

    pub fn remove_template(&self, name: &str) -> Result<(), FsError> {
        if self.templates().remove(name).is_none() {
            return Err(FsError::not_found(format!("template {name}")));
        }
        self.cluster.store().delete("vmtemplates", name).map_err(FsError::from)
    }

    fn console_file(&self, name: &str) -> Console {
        Console { path: self.spool.join(format!("{name}.console")) }
    }

    /// The size of `console` as users read it (what the head keeps of it).
    pub fn console_len(&self, name: &str) -> u64 {
        self.console_file(name).kept()
    }

    /// Up to `size` bytes of VM `name`'s console from `offset` (none before its first byte).
    pub fn console_read(&self, name: &str, offset: u64, size: u32) -> std::io::Result<Vec<u8>> {
        crate::jobs::read_spooled(&self.console_file(name).path, offset, size as usize)
    }

    /// The address a VM gets from its name, when the VM network is configured.
    pub fn net(&self, name: &str) -> Option<Net> {
        let (subnet, prefix) = parse_subnet(self.cfg.subnet.as_deref()?).ok()?;
        let gateway = std::net::Ipv4Addr::from(u32::from(subnet) & (u32::MAX << (32 - u32::from(prefix))) | 1);
        Some(Net {
            bridge: self.cfg.bridge.clone(),
            gateway,
            prefix,
            ip: ip(name, subnet, prefix),
            uplink: self.cfg.uplink.clone(),
        })
    }

    /// The node for a new VM: the one it names, or the up, undrained node with the lowest load
    /// index that has `mem` free; either with at least `cpus` cpus, which a VM's vcpus never
    /// outnumber.
    fn place(&self, spec: &VmSpec, mem: u64, cpus: u32) -> Result<String, FsError> {
        if let Some(n) = &spec.node {
            let v = self.cluster.view(n).ok_or_else(|| FsError::not_found(format!("node {n}")))?;
            return match v.state {
                NodeState::Up if v.report.cpus < u64::from(cpus) => Err(FsError::new(
                    Errno::NoSpc,
                    format!("node {n} has {} cpus, fewer than the VM's {cpus} vcpus", v.report.cpus),
                )),
                NodeState::Up => Ok(n.clone()),
                s => Err(FsError::new(Errno::HostDown, format!("node {n} is {}", s.line()))),
            };
        }
        // VMs placed on a node count in its load and memory from the start, before their
        // guests use what they were given.
        let mut placed: BTreeMap<String, (u64, u64)> = BTreeMap::new();
        for vm in self.lock().values().filter(|v| v.rec.desired == Desired::Running) {
            let e = placed.entry(vm.rec.node.clone()).or_default();
            e.0 += vm.rec.launch.mem;
            e.1 += u64::from(vm.rec.launch.cpus);
        }
        let load = |v: &crate::head::cluster::NodeView| {
            let cpus = placed.get(&v.name).map_or(0, |p| p.1);
            v.report.load_index() + 100.0 * cpus as f64 / v.report.perf_score()
        };
        let up: Vec<_> = self
            .cluster
            .names()
            .into_iter()
            .filter_map(|n| self.cluster.view(&n))
            .filter(|v| v.state == NodeState::Up)
            .collect();
        let most = up.iter().map(|v| v.report.cpus).max().unwrap_or(0);
        if !up.is_empty() && most < u64::from(cpus) {
            return Err(FsError::new(
                Errno::NoSpc,
                format!(
                    "no up, undrained node has {cpus} cpus (the most is {most}): a VM's vcpus never outnumber its node's cpus"
                ),
            ));
        }
        up.into_iter()
            .filter(|v| {
                let given = placed.get(&v.name).map_or(0, |p| p.0);
                v.report.cpus >= u64::from(cpus)
                    && v.report.mem_avail >= mem
                    && v.report.mem_total.saturating_sub(given) >= mem
            })
            .min_by(|a, b| load(a).total_cmp(&load(b)))
            .map(|v| v.name)
            .ok_or_else(|| {
                FsError::new(Errno::NoSpc, format!("no up, undrained node has {} MiB of memory free", mem >> 20))
            })
    }

    /// Makes a VM: checks the spec, places it, has its node make the clone, records it (to
    /// be started by the keeper). Nothing is recorded when a step fails.
    pub async fn create(&self, caller: &Caller, spec: VmSpec) -> Result<(), FsError> {
        crate::vms::check_spec(&spec).map_err(FsError::invalid)?;
        if self.lock().contains_key(&spec.name) {
            return Err(FsError::new(Errno::Exist, format!("VM {} exists", spec.name)));
        }
        let tname = spec.template.clone().unwrap_or_else(|| self.cfg.default_template.clone());
        let template = self.template(&tname).ok_or_else(|| {
            FsError::new(
                Errno::NoEnt,
                format!("there is no template {tname}: root writes one as vms/templates/{tname}"),
            )
        })?;
        let mem = spec.mem.unwrap_or(template.mem).0;
        let cpus = spec.cpus.unwrap_or(template.cpus);
        let node = self.place(&spec, mem, cpus)?;
        let launch = Launch {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            name: spec.name.clone(),
            cpus,
            template,
            mem,
            data_disk: spec.data_disk.map(|d| d.0),
            append: spec.append.clone(),
            mac: mac(&spec.name),
            net: self.net(&spec.name),
            accel: self.cfg.accel.clone(),
            qemu: self.cfg.qemu.clone(),
        };
        self.cluster.request(&node, Op::VmCreate { launch: Box::new(launch.clone()) }, OP_TIMEOUT).await?;
        let rec = Record {
            uid: caller.uid,
            gid: caller.gid,
            spec,
            launch,
            node: node.clone(),
            desired: Desired::Running,
            created_ms: now_ms(),
            events: VecDeque::new(),
        };
        let name = rec.spec.name.clone();
        let mut vm = Vm {
            rec,
            actual: Actual::Off,
            shutdown_by: None,
            busy: false,
            start_asked: true,
            noted: 0,
            changed: SystemTime::now(),
        };
        event(&mut vm, format!("made on {node}"));
        self.cluster.store().put("vms", &name, &vm.rec).map_err(FsError::from)?;
        self.console_file(&name).remove();
        self.lock().insert(name.clone(), vm);
        info!(vm = name, node, "vm made");
        self.wake.notify_one();
        Ok(())
    }

    fn owned(&self, caller: &Caller, name: &str) -> Result<Vm, FsError> {
        let vm = self.get(name).ok_or_else(|| FsError::not_found(format!("VM {name}")))?;
        if caller.uid != 0 && caller.uid != vm.rec.uid {
            return Err(FsError::denied(format!("VM {name} is not yours")));
        }
        Ok(vm)
    }

    fn update(&self, name: &str, f: impl FnOnce(&mut Vm)) -> Result<(), FsError> {
        let mut vms = self.lock();
        let vm = vms.get_mut(name).ok_or_else(|| FsError::not_found(format!("VM {name}")))?;
        let before = (vm.rec.desired, vm.noted);
        f(vm);
        vm.changed = SystemTime::now();
        if (vm.rec.desired, vm.noted) != before {
            self.cluster.store().put("vms", name, &vm.rec).map_err(FsError::from)?;
        }
        drop(vms);
        self.wake.notify_one();
        Ok(())
    }

    /// Writing `running` or `off` into `state`.
    pub fn want(&self, caller: &Caller, name: &str, desired: Desired) -> Result<(), FsError> {
        self.owned(caller, name)?;
        self.update(name, |vm| {
            vm.rec.desired = desired;
            vm.start_asked = desired == Desired::Running;
            event(vm, format!("asked to be {}", if desired == Desired::Running { "running" } else { "off" }));
        })
    }

    /// `ctl`: start | shutdown | destroy | reboot.
    pub async fn ctl(&self, caller: &Caller, name: &str, verb: &str) -> Result<(), FsError> {
        let vm = self.owned(caller, name)?;
        match verb {
            "start" => self.want(caller, name, Desired::Running),
            "shutdown" => self.want(caller, name, Desired::Off),
            "destroy" => {
                self.want(caller, name, Desired::Off)?;
                self.command(&vm.rec.node, name, "quit").await
            }
            "reboot" => {
                if vm.actual != Actual::Running {
                    return Err(FsError::new(Errno::Inval, format!("VM {name} is not running")));
                }
                self.command(&vm.rec.node, name, "reset").await?;
                self.update(name, |vm| event(vm, "rebooted".into()))
            }
            other => Err(FsError::invalid(format!("unknown verb {other:?}"))),
        }
    }

    async fn command(&self, node: &str, name: &str, verb: &str) -> Result<(), FsError> {
        let op = Op::VmCommand { name: name.to_string(), verb: verb.to_string() };
        self.cluster.request(node, op, OP_TIMEOUT).await.map(|_| ())
    }

    /// `rmdir`: stops it and removes every file of it, on its node and here.
    pub async fn remove(&self, caller: &Caller, name: &str) -> Result<(), FsError> {
        let vm = self.owned(caller, name)?;
        self.update(name, |vm| vm.busy = true)?;
        let removed = self.cluster.request(&vm.rec.node, Op::VmRemove { name: name.to_string() }, OP_TIMEOUT).await;
        if let Err(e) = removed {
            self.update(name, |vm| vm.busy = false)?;
            return Err(e);
        }
        self.cluster.store().delete("vms", name).map_err(FsError::from)?;
        self.lock().remove(name);
        self.console_file(name).remove();
        info!(vm = name, "vm removed");
        Ok(())
    }

    /// An agent reported its VMs; the answer asks for console bytes the head lacks.
    pub fn report(&self, node: &str, list: Vec<VmStatus>) -> Vec<Message> {
        let mut out = Vec::new();
        let mut noted = Vec::new();
        let mut vms = self.lock();
        for s in list {
            let Some(vm) = vms.get_mut(&s.name).filter(|v| v.rec.node == node && v.rec.launch.id == s.id) else {
                continue;
            };
            let actual = match (s.running, s.crashed) {
                (true, _) => Actual::Running,
                (false, true) => Actual::Crashed,
                (false, false) => Actual::Off,
            };
            if actual != vm.actual {
                let what = match actual {
                    Actual::Running => "running",
                    Actual::Crashed => "crashed: it stopped without being asked to",
                    _ => "off",
                };
                event(vm, what.to_string());
                if actual == Actual::Crashed {
                    vm.start_asked = false;
                }
                vm.actual = actual;
                vm.changed = SystemTime::now();
                match Store::change("vms", &s.name, &vm.rec) {
                    Ok(change) => noted.push(change),
                    Err(e) => warn!(vm = s.name, error = %e, "cannot store the VM's new event"),
                }
            }
            let have = self.console_file(&s.name).received();
            if s.console_len > have {
                out.push(Message::VmConsoleFrom { id: s.id, from: have });
            }
        }
        // Queued with the VMs locked, so in the order their records changed; the commit is
        // waited for off the agent's connection task.
        let ticket = (!noted.is_empty()).then(|| self.cluster.store().write_later(noted));
        drop(vms);
        if let Some(ticket) = ticket {
            let (cluster, node) = (self.cluster.clone(), node.to_string());
            tokio::task::spawn_blocking(move || {
                if let Err(e) = cluster.store().wait(ticket) {
                    warn!(node, error = %e, "cannot store the VMs' new events");
                }
            });
        }
        self.wake.notify_one();
        out
    }

    /// Console bytes from an agent, at `offset` of VM `id`'s console.
    pub fn console(&self, node: &str, id: u64, offset: u64, data: &[u8]) {
        let name =
            self.lock().values().find(|v| v.rec.launch.id == id && v.rec.node == node).map(|v| v.rec.spec.name.clone());
        let Some(name) = name else { return };
        if let Err(e) = self.console_file(&name).append(offset, data, self.cfg.console_max.0) {
            warn!(vm = name, error = %e, "cannot spool the console");
        }
    }

    /// Converges every VM to its desired state, until the task is dropped.
    pub async fn keeper(self: Arc<Self>) {
        let timeout = Duration::from_secs(self.cfg.shutdown_timeout_s);
        loop {
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            let todo: Vec<(String, String, &'static str, Launch)> = {
                let mut vms = self.lock();
                let mut todo = Vec::new();
                for (name, vm) in vms.iter_mut() {
                    let up = self.cluster.view(&vm.rec.node).is_some_and(|v| !matches!(v.state, NodeState::Down(_)));
                    if vm.busy || !up || vm.actual == Actual::Unknown {
                        continue;
                    }
                    if vm.rec.desired == Desired::Running {
                        // A shutdown called off: the next one gets its whole timeout.
                        vm.shutdown_by = None;
                    }
                    let verb = match (vm.rec.desired, vm.actual) {
                        (Desired::Running, Actual::Running) => None,
                        (Desired::Running, Actual::Crashed)
                            if !vm.start_asked && vm.rec.spec.restart == Restart::Never =>
                        {
                            None
                        }
                        (Desired::Running, _) => Some("start"),
                        (Desired::Off, Actual::Running) => match vm.shutdown_by {
                            None => {
                                vm.shutdown_by = Some(Instant::now() + timeout);
                                Some("powerdown")
                            }
                            Some(t) if Instant::now() >= t => Some("quit"),
                            Some(_) => None,
                        },
                        (Desired::Off, _) => {
                            vm.shutdown_by = None;
                            None
                        }
                    };
                    if let Some(verb) = verb {
                        vm.busy = true;
                        todo.push((name.clone(), vm.rec.node.clone(), verb, vm.rec.launch.clone()));
                    }
                }
                todo
            };
            for (name, node, verb, launch) in todo {
                let me = self.clone();
                tokio::spawn(async move {
                    let op = match verb {
                        "start" => Op::VmStart { launch: Box::new(launch) },
                        v => Op::VmCommand { name: name.clone(), verb: v.to_string() },
                    };
                    let result = me.cluster.request(&node, op, OP_TIMEOUT).await;
                    let _ = me.update(&name, |vm| {
                        vm.busy = false;
                        match &result {
                            Ok(_) if verb == "start" => {
                                vm.start_asked = false;
                                vm.actual = Actual::Running;
                                event(vm, format!("started on {node}"));
                            }
                            Ok(_) if verb == "powerdown" => event(vm, "ACPI shutdown asked".into()),
                            Ok(_) => {
                                event(vm, "destroyed after the shutdown timeout".into());
                                // Not again until its node has had the time to say it is off:
                                // each pass re-sent it, and its events filled the history.
                                vm.shutdown_by = Some(Instant::now() + timeout);
                            }
                            Err(e) => {
                                warn!(vm = name, verb, error = %e, "vm operation failed");
                                event(vm, format!("{verb} failed: {}", e.message));
                                if verb == "start" {
                                    // Not again and again: the owner asks anew.
                                    vm.rec.desired = Desired::Off;
                                }
                            }
                        }
                    });
                });
            }
        }
    }

    /// The line of `/cluster/status`.
    pub fn status(&self) -> String {
        let vms = self.lock();
        let running = vms.values().filter(|v| v.actual == Actual::Running).count();
        format!("vms {} running {running} templates {}\n", vms.len(), self.templates().len())
    }
}

fn event(vm: &mut Vm, what: String) {
    let at = humantime::format_rfc3339_seconds(SystemTime::now());
    vm.rec.events.push_back(format!("{at} {what}"));
    while vm.rec.events.len() > EVENTS {
        vm.rec.events.pop_front();
    }
    vm.noted += 1;
}

/// A VM's console on the head: a file of at most `console_max` bytes, and in `<file>.dropped`
/// how many of the first bytes the VM wrote were let go to keep it so. Offsets from agents
/// count from the VM's first byte.
#[derive(Debug)]
struct Console {
    path: PathBuf,
}

impl Console {
    fn dropped_path(&self) -> PathBuf {
        self.path.with_extension("console.dropped")
    }

    /// Bytes let go from the start.
    fn dropped(&self) -> u64 {
        std::fs::read_to_string(self.dropped_path()).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0)
    }

    /// Bytes in the file.
    fn kept(&self) -> u64 {
        std::fs::metadata(&self.path).map_or(0, |m| m.len())
    }

    /// Bytes received from the VM's start: where the next ones go.
    fn received(&self) -> u64 {
        self.dropped() + self.kept()
    }

    /// Adds what of `data` (at `offset` from the VM's start) is new. Past `max` (0: no
    /// limit), the file keeps its newest half of `max`: rewritten whole, then renamed in.
    fn append(&self, offset: u64, data: &[u8], max: u64) -> std::io::Result<()> {
        let (dropped, kept) = (self.dropped(), self.kept());
        let have = dropped + kept;
        if offset > have {
            // A gap: the agent is asked again from `have` at its next status.
            return Ok(());
        }
        let skip = usize::try_from(have - offset).unwrap_or(usize::MAX).min(data.len());
        let new = &data[skip..];
        if new.is_empty() {
            return Ok(());
        }
        if max == 0 || kept + new.len() as u64 <= max {
            let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&self.path)?;
            return f.write_all(new);
        }
        let mut all = crate::jobs::read_at(&self.path, 0, usize::try_from(kept).unwrap_or(usize::MAX))?;
        all.extend_from_slice(new);
        let keep = usize::try_from(max / 2).unwrap_or(usize::MAX).min(all.len());
        let gone = all.len() - keep;
        let write = |path: &std::path::Path, bytes: &[u8]| {
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, bytes)?;
            std::fs::rename(&tmp, path)
        };
        write(&self.dropped_path(), (dropped + gone as u64).to_string().as_bytes())?;
        write(&self.path, &all[gone..])
    }

    fn remove(&self) {
        let _ = std::fs::remove_file(&self.path);
        let _ = std::fs::remove_file(self.dropped_path());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_console_keeps_its_newest_half_past_its_limit_and_counts_what_went() {
        let dir = tempfile::tempdir().unwrap();
        let c = Console { path: dir.path().join("v.console") };
        c.append(0, b"0123456789", 16).unwrap();
        c.append(5, b"56789abc", 16).unwrap(); // resent in part: only "abc" is new
        assert_eq!((c.kept(), c.received()), (13, 13));
        // "defg" passes 16: the newest 8 bytes stay.
        c.append(13, b"defg", 16).unwrap();
        assert_eq!(std::fs::read(&c.path).unwrap(), b"89abcdefg"[1..]);
        assert_eq!((c.dropped(), c.kept(), c.received()), (9, 8, 17));
        // Offsets go on from the VM's start; a gap is not written.
        c.append(17, b"h", 16).unwrap();
        c.append(30, b"zz", 16).unwrap();
        assert_eq!(std::fs::read(&c.path).unwrap(), b"9abcdefgh");
        assert_eq!(c.received(), 18);
        // No limit: nothing goes.
        c.append(18, &[b'x'; 100], 0).unwrap();
        assert_eq!((c.dropped(), c.kept()), (9, 109));
        c.remove();
        assert_eq!(c.received(), 0);
    }
}
