//! The head daemon: the store, the cluster model, the agent listener and the mounted tree.

pub mod cluster;
mod device;
pub mod hsm;
pub mod images;
pub mod jobs;
mod lead;
pub mod listener;
pub mod peer;
pub mod store;
pub mod vms;

use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use anyhow::{Context, bail};
use clusterfs_fs::{Answer, Caller, Node, Tree, Write};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::auth::Secret;
use crate::config::Config;
use crate::view::View;
use cluster::Cluster;
use hsm::Hsm;
use images::Images;
use jobs::Jobs;
use lead::{Candidate, Election};
use store::{Location, Store};
use vms::Vms;

/// A running head: dropping it unmounts and stops serving agents.
#[derive(Debug)]
pub struct Head {
    pub addr: SocketAddr,
    mountpoint: PathBuf,
    mount: Option<clusterfs_fs::Mount>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// The cluster this head runs, once it leads.
    core: watch::Receiver<Option<Arc<Core>>>,
    /// Set when this head must stop: etcd ended its lease, or it could not take the lead.
    lost: watch::Receiver<bool>,
    /// Its place in the election, with an etcd store.
    election: Option<Arc<Election>>,
}

/// What the leading head runs: the cluster model, its keepers and the tree it renders.
#[derive(Debug)]
pub struct Core {
    pub cluster: Arc<Cluster>,
    pub jobs: Arc<Jobs>,
    pub hsm: Arc<Hsm>,
    pub vms: Arc<Vms>,
    pub view: Arc<View>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Core {
    /// Loads the cluster from `store` and starts scheduling; spools go under `shared`.
    fn start(
        config: &Config,
        store: Store,
        secret: Arc<Secret>,
        shared: &Path,
        me: &Candidate,
    ) -> anyhow::Result<Core> {
        let cluster = Arc::new(Cluster::load(config.head.clone(), store)?);
        let jobs = Arc::new(Jobs::load(config.jobs.clone(), cluster.clone(), shared.join("spool"), secret)?);
        let images = Arc::new(Images::load(config.images.clone(), cluster.clone())?);
        let hsm = Arc::new(Hsm::load(config.hsm.clone(), cluster.clone(), shared.join("hsm-reports"))?);
        let vms = Arc::new(Vms::load(config.vms.clone(), cluster.clone(), shared.join("vm-consoles"))?);
        let kind = if config.head.store.trim().is_empty() { "embedded" } else { "etcd" };
        let view = Arc::new(
            View::new(cluster.clone(), jobs.clone(), images.clone(), hsm.clone(), vms.clone())
                .led_by(&me.name, &me.addr, kind),
        );
        let tasks = vec![
            tokio::spawn(jobs.clone().scheduler()),
            tokio::spawn(images.keeper()),
            tokio::spawn(hsm.clone().keeper()),
            tokio::spawn(vms.clone().keeper()),
        ];
        jobs.resume_copies();
        Ok(Core { cluster, jobs, hsm, vms, view, tasks })
    }
}

impl Head {
    /// Unmounts and stops serving.
    pub fn stop(mut self) {
        for t in &self.tasks {
            t.abort();
        }
        if let Some(core) = self.core.borrow().as_ref() {
            for t in &core.tasks {
                t.abort();
            }
        }
        if let Some(m) = self.mount.take()
            && !m.is_gone()
        {
            if let Err(e) = m.unmount() {
                // Something still has a file open there: detach lazily rather than leave a
                // mount whose daemon is gone.
                warn!(error = %e, mountpoint = %self.mountpoint.display(), "unmount failed; detaching lazily");
                if let Err(e) = nix::mount::umount2(&self.mountpoint, nix::mount::MntFlags::MNT_DETACH) {
                    warn!(error = %e, "lazy detach failed");
                }
            }
        }
    }

    /// Stops, then leaves the election, so that another head leads at once rather than after
    /// the lease's TTL.
    pub async fn shutdown(self) {
        let election = self.election.clone();
        self.stop();
        if let Some(e) = election {
            e.leave().await;
        }
    }

    /// Returns once the tree is unmounted by someone else (`umount /cluster`): the head
    /// has nothing left to serve users with.
    pub async fn unmounted(&self) {
        loop {
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            if self.mount.as_ref().is_none_or(clusterfs_fs::Mount::is_gone) {
                return;
            }
        }
    }

    /// Returns when this head must stop: another head may lead now (etcd ended this head's
    /// lease), or it won the lead and could not load the cluster.
    pub async fn lost(&self) {
        if self.lost.clone().wait_for(|lost| *lost).await.is_err() {
            // Nothing can end this head's lead (the embedded store): never.
            std::future::pending::<()>().await;
        }
    }
}

pub fn secret_path(state_dir: &Path) -> PathBuf {
    state_dir.join("secret")
}

/// Starts a head: opens the state, listens for agents, mounts the tree at `mountpoint`. With
/// the embedded store it leads at once; with etcd it campaigns, serving the tree through the
/// leading head until it leads itself.
pub async fn start(config: Config, mountpoint: &Path) -> anyhow::Result<Head> {
    let cfg = config.head.clone();
    let state = cfg.state_dir.clone();
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&state)
        .with_context(|| format!("creating the state directory {}", state.display()))?;
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700))?;
    let shared = if cfg.shared_dir.as_os_str().is_empty() { state.clone() } else { cfg.shared_dir.clone() };
    let location = Location::parse(&cfg.store, &state).map_err(anyhow::Error::msg)?;
    let store = Store::open_at(&location)?;
    let secret = Arc::new(match location {
        Location::Embedded(_) => Secret::load_or_create(&secret_path(&state))?,
        Location::Etcd { .. } => shared_secret(&store, &secret_path(&state))?,
    });
    let listener =
        TcpListener::bind(&cfg.listen).await.with_context(|| format!("listening for agents on {}", cfg.listen))?;
    let addr = listener.local_addr()?;
    let me = Candidate { name: head_name(&cfg.name, addr), addr: advertised(&cfg.advertise, addr) };

    let (core_tx, core) = watch::channel(None::<Arc<Core>>);
    let (leader_tx, leader) = watch::channel(None::<Candidate>);
    let (lost_tx, lost) = watch::channel(false);
    let serving = Arc::new(Serving::default());
    let mut tasks = Vec::new();
    let election = match &location {
        Location::Embedded(_) => {
            let c = Arc::new(Core::start(&config, store, secret.clone(), &shared, &me)?);
            serving.set(c.view.clone());
            core_tx.send_replace(Some(c));
            None
        }
        Location::Etcd { endpoints, prefix } => {
            let election = Election::join(endpoints, prefix, me.clone(), cfg.lease_ttl_s, lost_tx.clone()).await?;
            // Followed from now on, so that a takeover loads the cluster from this head's copy.
            store.mirror(true);
            let remote = peer::Remote::new(&me.name, secret.clone(), cfg.max_frame, leader.clone());
            serving.set(Arc::new(peer::RemoteTree(Arc::new(remote))));
            Some((Arc::new(election), store))
        }
    };
    std::fs::write(state.join("head.addr"), format!("{addr}\n"))?;
    info!(%addr, head = me.name, "listening for agents and heads");
    tasks.push(tokio::spawn(listener::serve(
        listener::Roles { core: core.clone(), leader: leader.clone(), me: me.addr.clone() },
        listener,
        secret.clone(),
    )));

    clear_stale_mount(mountpoint)?;
    let fs_cfg = clusterfs_fs::Config {
        threads: cfg.fuse_threads,
        fsname: "clusterfs".into(),
        ..clusterfs_fs::Config::default()
    };
    // Heads of one store mount with the cluster's filesystem UUID, so NFS handles taken
    // through one head's export hold through another's.
    let uuid = shared_uuid(&election)?;
    let mount = mount_tree(serving.clone(), fs_cfg, mountpoint, &state, cfg.stable_mount, uuid.as_deref())?;

    let place = election.as_ref().map(|(e, _)| e.clone());
    if let Some((election, store)) = election {
        tasks.push(tokio::spawn(election.clone().follow(leader_tx)));
        tasks.push(tokio::spawn(async move {
            let fence = election.campaign().await;
            store.fence(&fence.key, fence.revision);
            if config.head.etcd_compact_s > 0 {
                store.compact_every(std::time::Duration::from_secs(config.head.etcd_compact_s));
            }
            let started = std::time::Instant::now();
            match Core::start(&config, store, secret, &shared, &me) {
                Ok(c) => {
                    let took_ms = started.elapsed().as_millis() as u64;
                    info!(took_ms, "loaded the cluster from the store");
                    c.cluster.store().mirror(false);
                    let c = Arc::new(c);
                    serving.set(c.view.clone());
                    core_tx.send_replace(Some(c));
                }
                Err(e) => {
                    error!(error = %e, "this head won the lead but cannot load the cluster: stopping");
                    lost_tx.send_replace(true);
                }
            }
        }));
    }
    Ok(Head { addr, mountpoint: mountpoint.to_path_buf(), mount: Some(mount), tasks, core, lost, election: place })
}

/// The filesystem UUID every head of the cluster mounts with, kept in the store.
fn shared_uuid(election: &Option<(Arc<Election>, Store)>) -> anyhow::Result<Option<String>> {
    let Some((_, store)) = election else { return Ok(None) };
    let uuid =
        String::from_utf8_lossy(&store.create_or_get("cluster", "fsid", device::new_uuid().as_bytes())?).into_owned();
    let valid = uuid.len() == 36 && uuid.chars().all(|c| c.is_ascii_hexdigit() || c == '-');
    if !valid {
        bail!("the store's cluster/fsid {uuid:?} is not a UUID: put one there, or delete it to have one made");
    }
    Ok(Some(uuid))
}

/// This head's name among heads: `[head] name`, else the host's short name and the port.
fn head_name(configured: &str, addr: SocketAddr) -> String {
    if !configured.is_empty() {
        return configured.to_string();
    }
    let host = crate::names::hostname();
    let short = host.split('.').next().unwrap_or_default();
    let name = format!("{short}-{}", addr.port());
    if crate::names::check("head", &name).is_ok() { name } else { format!("head-{}", addr.port()) }
}

/// Where other heads and agents reach this head: `[head] advertise`, else the bound address,
/// with this host's name in place of a wildcard address.
fn advertised(configured: &str, addr: SocketAddr) -> String {
    if !configured.is_empty() {
        return configured.to_string();
    }
    if addr.ip().is_unspecified() {
        let host = crate::names::hostname();
        return format!("{host}:{}", addr.port());
    }
    addr.to_string()
}

/// The tree the mount serves: the leading head's own, or the one asked of it.
#[derive(Default)]
struct Serving(RwLock<Option<Arc<dyn Tree>>>);

impl std::fmt::Debug for Serving {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Serving")
    }
}

impl Serving {
    fn set(&self, tree: Arc<dyn Tree>) {
        *self.0.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(tree);
    }

    fn now(&self) -> Arc<dyn Tree> {
        self.0.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone().expect("a tree is set before mounting")
    }
}

impl Tree for Serving {
    fn remote(&self, path: &[&str]) -> bool {
        self.now().remote(path)
    }
    fn node(&self, path: &[&str]) -> clusterfs_fs::Result<Node> {
        self.now().node(path)
    }
    fn list(&self, path: &[&str]) -> clusterfs_fs::Result<Vec<String>> {
        self.now().list(path)
    }
    fn render(&self, path: &[&str], caller: &Caller, nonblock: bool) -> Answer<Vec<u8>> {
        self.now().render(path, caller, nonblock)
    }
    fn read_log(&self, path: &[&str], caller: &Caller, offset: u64, size: u32) -> Answer<Vec<u8>> {
        self.now().read_log(path, caller, offset, size)
    }
    fn write(&self, path: &[&str], caller: &Caller, write: Write<'_>) -> Answer<Vec<u8>> {
        self.now().write(path, caller, write)
    }
    fn flush(&self, path: &[&str], caller: &Caller, handle: u64) -> Answer<()> {
        self.now().flush(path, caller, handle)
    }
    fn release(&self, path: &[&str], caller: &Caller, handle: u64) {
        self.now().release(path, caller, handle)
    }
    fn mkdir(&self, path: &[&str], caller: &Caller, mode: u32) -> Answer<()> {
        self.now().mkdir(path, caller, mode)
    }
    fn rmdir(&self, path: &[&str], caller: &Caller) -> Answer<()> {
        self.now().rmdir(path, caller)
    }
    fn create(&self, path: &[&str], caller: &Caller, mode: u32) -> Answer<()> {
        self.now().create(path, caller, mode)
    }
    fn unlink(&self, path: &[&str], caller: &Caller) -> Answer<()> {
        self.now().unlink(path, caller)
    }
    fn chmod(&self, path: &[&str], caller: &Caller, mode: u32) -> clusterfs_fs::Result<()> {
        self.now().chmod(path, caller, mode)
    }
}

/// Copies every object of the store at `from` into the empty store at `to`, and the cluster
/// secret with them; each is a state directory or an etcd URL. Returns how many objects.
pub fn copy_store(from: &str, to: &str) -> anyhow::Result<usize> {
    let place = |spec: &str| -> anyhow::Result<(Location, Option<PathBuf>)> {
        if spec.starts_with("etcd://") {
            return Ok((Location::parse(spec, Path::new("")).map_err(anyhow::Error::msg)?, None));
        }
        let dir = PathBuf::from(spec);
        Ok((Location::Embedded(dir.join("store.redb")), Some(dir)))
    };
    let ((src, src_dir), (dst, dst_dir)) = (place(from)?, place(to)?);
    if let (Location::Embedded(p), _) = (&src, &src_dir)
        && !p.exists()
    {
        bail!("{from} holds no store ({} is missing)", p.display());
    }
    let source = Store::open_at(&src).with_context(|| format!("opening {from} (is a head still using it?)"))?;
    let target = Store::open_at(&dst).with_context(|| format!("opening {to}"))?;
    // The secret first: a target that has another cluster's secret is refused untouched.
    let secret = match &src_dir {
        Some(dir) => Secret::load(&secret_path(dir))?,
        None => stored_secret(&source, &Secret::generate())?,
    };
    let objects: Vec<_> = source.all()?.into_iter().filter(|(k, _)| !k.starts_with("secret/")).collect();
    if target.all()?.iter().any(|(k, _)| !k.starts_with("secret/")) {
        bail!("{to} already holds objects: copy into an empty store only");
    }
    match &dst_dir {
        Some(dir) => match Secret::load(&secret_path(dir)) {
            Ok(have) if have != secret => bail!("{to} has another cluster's secret"),
            Ok(_) => {}
            Err(_) => secret.save(&secret_path(dir))?,
        },
        None if stored_secret(&target, &secret)? != secret => bail!("{to} has another cluster's secret"),
        None => {}
    }
    let count = objects.len();
    for chunk in objects.chunks(64) {
        target.write(chunk.iter().map(|(k, v)| (k.clone(), Some(v.clone()))).collect())?;
    }
    Ok(count)
}

/// The secret of a cluster whose heads share a store: the first head to start puts its own in
/// the store, every head takes the store's and writes it to its state directory, where local
/// agents and admins read it.
fn shared_secret(store: &Store, file: &Path) -> anyhow::Result<Secret> {
    let secret = stored_secret(store, &Secret::generate())?;
    match Secret::load(file) {
        Ok(have) if have == secret => {}
        Ok(_) => {
            warn!(file = %file.display(), "the secret file differs from the cluster's secret in the store: replacing it");
            secret.save(file)?;
        }
        Err(_) => secret.save(file)?,
    }
    Ok(secret)
}

/// The cluster secret kept in `store`, put there as `candidate` when it has none.
fn stored_secret(store: &Store, candidate: &Secret) -> anyhow::Result<Secret> {
    let stored = store.create_or_get("secret", "cluster", candidate.to_hex().as_bytes())?;
    Ok(Secret::from_hex(&String::from_utf8_lossy(&stored), "the store's secret/cluster")?)
}

/// Mounts the tree, on the state directory's loop device when `stable` and it can be had,
/// else plain fuse (whose NFS handles change at a restart).
fn mount_tree(
    view: Arc<Serving>,
    fs_cfg: clusterfs_fs::Config,
    mountpoint: &Path,
    state: &Path,
    stable: bool,
    uuid: Option<&str>,
) -> anyhow::Result<clusterfs_fs::Mount> {
    let mount = |device: Option<PathBuf>| {
        let fs = clusterfs_fs::SynthFs::new(view.clone(), clusterfs_fs::Config { device, ..fs_cfg.clone() });
        clusterfs_fs::mount(fs, mountpoint, tokio::runtime::Handle::current())
    };
    let device = stable.then(|| device::attach(state, uuid)).and_then(|attached| {
        attached.map_err(|e| warn!(error = %e, "no loop device for the mount: mounting plain fuse")).ok()
    });
    if let Some(device) = device {
        let mounted = mount(Some(device.clone()));
        // Busy from now on (or unused on failure): the kernel frees it when the mount goes.
        if let Err(e) = device::release(&device) {
            warn!(error = %e, device = %device.display(), "cannot mark the mount device to go with the mount");
        }
        match mounted {
            Ok(m) => {
                info!(mountpoint = %mountpoint.display(), device = %device.display(), "mounted");
                return Ok(m);
            }
            Err(e) => warn!(error = %e, "cannot mount on the loop device: mounting plain fuse"),
        }
    }
    let m = mount(None).with_context(|| format!("mounting {}", mountpoint.display()))?;
    info!(mountpoint = %mountpoint.display(), "mounted");
    Ok(m)
}

/// A FUSE mount whose daemon died answers ENOTCONN; detach it so we can mount again.
/// A live clusterfs mount there is an error: another head is running.
fn clear_stale_mount(mountpoint: &Path) -> anyhow::Result<()> {
    let mounted = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(4).is_some_and(|p| Path::new(&unescape(p)) == mountpoint));
    // A listing must reach the daemon; stat may be answered from the kernel's cache.
    match std::fs::read_dir(mountpoint).and_then(|_| std::fs::metadata(mountpoint)) {
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) || (mounted && e.raw_os_error() == Some(libc::EIO)) => {
            warn!(mountpoint = %mountpoint.display(), "clearing a stale mount left by a crash");
            nix::mount::umount2(mountpoint, nix::mount::MntFlags::MNT_DETACH)
                .with_context(|| format!("clearing the stale mount at {}", mountpoint.display()))?;
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(mountpoint).with_context(|| format!("creating {}", mountpoint.display()))
        }
        Err(e) => Err(e).with_context(|| format!("checking {}", mountpoint.display())),
        Ok(_) if mounted => bail!("{} is already mounted; is another head running?", mountpoint.display()),
        Ok(m) if !m.is_dir() => bail!("{} is not a directory", mountpoint.display()),
        Ok(_) => Ok(()),
    }
}

/// mountinfo escapes spaces and such as octal.
fn unescape(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\\' {
            let code: String = chars.by_ref().take(3).collect();
            if let Ok(n) = u8::from_str_radix(&code, 8) {
                out.push(n as char);
                continue;
            }
            out.push('\\');
            out.push_str(&code);
        } else {
            out.push(c);
        }
    }
    out
}
