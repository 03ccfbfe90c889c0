//! Images: placement over volumes, spares, the mount lease, growth, health and accounting.

use std::collections::HashSet;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use clusterfs_fs::{Caller, Errno, FsError};
use dashmap::DashMap;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tracing::{info, warn};

use crate::config::ImagesConfig;
use crate::head::cluster::{Cluster, NodeState, Which};
use crate::images::{LoopInfo, NewImage, check, command, size_text};
use crate::proto::{Op, Reply};

/// Events kept per image, newest last.
const EVENTS_KEPT: usize = 20;
/// How long a mount (with its fsck) or a resize may take on the node.
const OP_TIMEOUT: Duration = Duration::from_secs(600);
/// How long a health scan may take on one node.
const SCAN_TIMEOUT: Duration = Duration::from_secs(20);
/// Spare images on a volume are named `.spare-<n>.img`.
const SPARE_PREFIX: &str = ".spare-";

/// Where an image stands; every phase but `Unmounted` holds the lease of `Image::node`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Unmounted,
    Mounting,
    Mounted,
    Unmounting,
}

/// One user's image, as the store keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Image {
    pub user: String,
    pub uid: u32,
    pub gid: u32,
    pub volume: String,
    pub size: u64,
    pub created_ms: u64,
    pub changed_ms: u64,
    pub phase: Phase,
    /// The node holding the lease: set (durably) before a mount starts, cleared once the
    /// node confirmed the umount. An image is never mounted anywhere else meanwhile.
    pub node: Option<String>,
    /// What happened to it, newest last: `<time> <text>`.
    pub events: Vec<String>,
}

impl Image {
    /// The first line of `state`.
    pub fn state_line(&self) -> String {
        let node = self.node.as_deref().unwrap_or("?");
        match self.phase {
            Phase::Unmounted => "unmounted".into(),
            Phase::Mounting => format!("mounting on {node}"),
            Phase::Mounted => format!("mounted on {node}"),
            Phase::Unmounting => format!("unmounting on {node}"),
        }
    }

    fn event(&mut self, text: impl Into<String>) {
        let when = humantime::format_rfc3339_seconds(SystemTime::now());
        self.events.push(format!("{when} {}", text.into()));
        let extra = self.events.len().saturating_sub(EVENTS_KEPT);
        self.events.drain(..extra);
        self.changed_ms = now_ms();
    }
}

/// `volumes/<vol>`: one volume's quota and real use.
#[derive(Debug, Clone, PartialEq)]
pub struct VolumeUse {
    pub path: PathBuf,
    pub capacity: u64,
    pub assigned: u64,
    pub used: u64,
    pub images: usize,
    pub spares: usize,
}

/// Every image, with the operations under way.
#[derive(Debug)]
pub struct Images {
    pub cfg: ImagesConfig,
    cluster: Arc<Cluster>,
    images: DashMap<String, Image>,
    /// Users whose image has an operation under way, and which.
    busy: DashMap<String, &'static str>,
    /// Bytes used inside each mounted image, from the last health scan.
    used: DashMap<String, u64>,
    /// Wakes the spare maker after a spare was taken.
    spare_taken: Notify,
}

/// An image claimed for one operation until dropped.
#[derive(Debug)]
struct Claim<'a> {
    images: &'a Images,
    user: String,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        self.images.busy.remove(&self.user);
    }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn io_err(what: &str, e: impl std::fmt::Display) -> FsError {
    FsError::new(Errno::Io, format!("{what}: {e}"))
}

impl Images {
    pub fn load(cfg: ImagesConfig, cluster: Arc<Cluster>) -> Result<Images, crate::head::store::StoreError> {
        let images = cluster.store().scan::<Image>("images")?.into_iter().collect();
        Ok(Images { cfg, cluster, images, busy: DashMap::new(), used: DashMap::new(), spare_taken: Notify::new() })
    }

    pub fn get(&self, user: &str) -> Option<Image> {
        self.images.get(user).map(|i| i.clone())
    }

    pub fn users(&self) -> Vec<String> {
        let mut v: Vec<String> = self.images.iter().map(|i| i.key().clone()).collect();
        v.sort();
        v
    }

    pub fn path(&self, img: &Image) -> PathBuf {
        let dir = self.cfg.volumes.get(&img.volume).map_or_else(PathBuf::new, |v| v.path.clone());
        dir.join(format!("{}.img", img.user))
    }

    pub fn mountpoint(&self, user: &str) -> PathBuf {
        self.cfg.mount_root.join(user)
    }

    /// Bytes used inside the image at its last scan while mounted.
    pub fn used(&self, user: &str) -> Option<u64> {
        self.used.get(user).map(|u| *u)
    }

    fn claim(&self, user: &str, what: &'static str) -> Result<Claim<'_>, FsError> {
        match self.busy.entry(user.to_string()) {
            dashmap::Entry::Occupied(e) => {
                Err(FsError::new(Errno::Busy, format!("{user}'s image is busy: {} is under way", e.get())))
            }
            dashmap::Entry::Vacant(v) => {
                v.insert(what);
                Ok(Claim { images: self, user: user.to_string() })
            }
        }
    }

    /// Root or the image's own user; anyone else gets EACCES.
    fn allowed(caller: &Caller, user: &str, uid: u32) -> Result<(), FsError> {
        if caller.is_root() || caller.uid == uid {
            Ok(())
        } else {
            Err(FsError::new(Errno::Acces, format!("only root or {user} may do that to {user}'s image")))
        }
    }

    fn image(&self, user: &str) -> Result<Image, FsError> {
        self.get(user).ok_or_else(|| FsError::not_found(format!("image {user}")))
    }

    /// Updates image `user` and stores it durably.
    fn update(&self, user: &str, f: impl FnOnce(&mut Image)) -> Result<Image, FsError> {
        let mut img = self.image(user)?;
        f(&mut img);
        self.cluster.store().put("images", user, &img).map_err(FsError::from)?;
        self.images.insert(user.to_string(), img.clone());
        Ok(img)
    }

    /// Records an event without failing the caller: the store may be slow, never wrong.
    fn note(&self, user: &str, text: String) {
        info!(image = user, event = %text, "image event");
        if let Err(e) = self.update(user, |i| i.event(text)) {
            warn!(image = user, error = %e, "cannot record an image event");
        }
    }

    /// Assigned bytes per volume: the sizes of the images placed on it.
    fn assigned(&self, volume: &str) -> u64 {
        self.images.iter().filter(|i| i.volume == volume).map(|i| i.size).sum()
    }

    /// The volume with the lowest assigned-quota percentage that has room for `size`.
    fn place(&self, size: u64) -> Result<String, FsError> {
        if self.cfg.volumes.is_empty() {
            return Err(FsError::new(Errno::NoSpc, "no volumes are configured: add [images.volumes] to the config"));
        }
        let mut best: Option<(f64, &String)> = None;
        let mut full = Vec::new();
        for (name, v) in &self.cfg.volumes {
            let assigned = self.assigned(name);
            if assigned.saturating_add(size) > v.capacity.0 {
                full.push(format!(
                    "{name} has {} of its {} quota left",
                    size_text(v.capacity.0.saturating_sub(assigned)),
                    size_text(v.capacity.0)
                ));
                continue;
            }
            let pct = assigned as f64 / v.capacity.0 as f64;
            if best.is_none_or(|(p, _)| pct < p) {
                best = Some((pct, name));
            }
        }
        best.map(|(_, n)| n.clone()).ok_or_else(|| {
            FsError::new(
                Errno::NoSpc,
                format!("no volume has room for a {} image: {}", size_text(size), full.join("; ")),
            )
        })
    }

    /// Makes `new.user`'s image (blocking: it writes and formats a file).
    pub fn create(&self, caller: &Caller, new: &NewImage) -> Result<Image, FsError> {
        let user = new.user.as_str();
        crate::names::check("image", user).map_err(FsError::invalid)?;
        let account = nix::unistd::User::from_name(user)
            .map_err(|e| io_err("looking up the user", e))?
            .ok_or_else(|| FsError::invalid(format!("there is no user {user} on the head")))?;
        let (uid, gid) = (account.uid.as_raw(), account.gid.as_raw());
        Self::allowed(caller, user, uid)?;
        let template = match &new.template {
            Some(t) => Some(self.template(t)?),
            None => None,
        };
        let size = match (new.size, &template) {
            (Some(s), Some((_, len))) if s < *len => {
                return Err(FsError::invalid(format!(
                    "size {} is smaller than the template ({})",
                    size_text(s),
                    size_text(*len)
                )));
            }
            (Some(s), _) => s,
            (None, Some((_, len))) => *len,
            (None, None) => self.cfg.default_size.0,
        };
        let _claim = self.claim(user, "create")?;
        if self.images.contains_key(user) {
            return Err(FsError::new(Errno::Exist, format!("{user} has an image already")));
        }
        let volume = self.place(size)?;
        let dir = self.cfg.volumes[&volume].path.clone();
        let path = dir.join(format!("{user}.img"));
        if path.exists() {
            return Err(FsError::new(
                Errno::Exist,
                format!("{} exists already but is no image of this cluster; move it away first", path.display()),
            ));
        }
        let how = self.make_file(&dir, &path, size, template.as_ref().map(|t| t.0.as_path()))?;
        let fixed = (|| {
            std::os::unix::fs::chown(&path, Some(uid), Some(gid))?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        })();
        let owned =
            fixed.map_err(|e| io_err("setting the image's owner", e)).and_then(|()| root_owner(&path, uid, gid));
        if let Err(e) = owned {
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        let mut img = Image {
            user: user.to_string(),
            uid,
            gid,
            volume: volume.clone(),
            size,
            created_ms: now_ms(),
            changed_ms: now_ms(),
            phase: Phase::Unmounted,
            node: None,
            events: Vec::new(),
        };
        img.event(format!("created on {volume}, {} ({how})", size_text(size)));
        if let Err(e) = self.cluster.store().put("images", user, &img) {
            let _ = std::fs::remove_file(&path);
            return Err(e.into());
        }
        self.images.insert(user.to_string(), img.clone());
        info!(image = user, volume, size, how, "image created");
        Ok(img)
    }

    /// A template image by name, with its size.
    fn template(&self, name: &str) -> Result<(PathBuf, u64), FsError> {
        crate::names::check("template", name).map_err(FsError::invalid)?;
        let dir = self
            .cfg
            .template_dir
            .as_ref()
            .ok_or_else(|| FsError::invalid("no templates are configured: set images.template_dir"))?;
        let path = dir.join(format!("{name}.img"));
        let len = std::fs::metadata(&path)
            .map_err(|_| FsError::invalid(format!("there is no template {name} ({} is missing)", path.display())))?
            .len();
        Ok((path, len))
    }

    /// Puts a formatted image of `size` at `path`: a spare, a template copy or a new file.
    /// Says which. Nothing is left behind on failure.
    fn make_file(&self, dir: &Path, path: &Path, size: u64, template: Option<&Path>) -> Result<&'static str, FsError> {
        if template.is_none() && size == self.cfg.default_size.0 {
            for spare in spares(dir) {
                // A rename in one directory is atomic: two creations never get the same spare.
                if std::fs::rename(&spare, path).is_ok() {
                    self.spare_taken.notify_one();
                    return Ok("from a spare");
                }
            }
        }
        let tmp = dir.join(format!(".new-{}", path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default()));
        let made = match template {
            Some(t) => copy_template(t, &tmp, size),
            None => format_new(&tmp, size),
        };
        let made = made.and_then(|()| std::fs::rename(&tmp, path).map_err(|e| io_err("placing the image", e)));
        if let Err(e) = made {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        Ok(if template.is_some() { "from a template" } else { "formatted now" })
    }

    /// Claims image `user` for `what`, which only an unmounted image allows, if `caller` may.
    fn claim_unmounted(&self, caller: &Caller, user: &str, what: &'static str) -> Result<(Claim<'_>, Image), FsError> {
        Self::allowed(caller, user, self.image(user)?.uid)?;
        let claim = self.claim(user, what)?;
        let img = self.image(user)?;
        if img.phase != Phase::Unmounted {
            return Err(FsError::new(Errno::Busy, format!("{user}'s image is {}: umount it first", img.state_line())));
        }
        Ok((claim, img))
    }

    /// Removes image `user` (blocking); refused while it is mounted or leased.
    pub fn remove(&self, caller: &Caller, user: &str) -> Result<(), FsError> {
        let (_claim, img) = self.claim_unmounted(caller, user, "removal")?;
        match std::fs::remove_file(self.path(&img)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("removing the image file", e)),
        }
        self.cluster.store().delete("images", user).map_err(FsError::from)?;
        self.images.remove(user);
        self.used.remove(user);
        info!(image = user, "image removed");
        Ok(())
    }

    /// Mounts image `user` on `node` (default: the best node now).
    pub async fn mount(self: &Arc<Self>, caller: &Caller, user: &str, node: Option<&str>) -> Result<(), FsError> {
        let img = self.image(user)?;
        Self::allowed(caller, user, img.uid)?;
        let node = match node {
            Some(n) => {
                let v = self.cluster.view(n).ok_or_else(|| FsError::invalid(format!("there is no node {n}")))?;
                match v.state {
                    NodeState::Up => n.to_string(),
                    NodeState::Down(r) => return Err(FsError::new(Errno::HostDown, format!("{n} is down: {r}"))),
                    NodeState::Drained(r) => return Err(FsError::new(Errno::Busy, format!("{n} is drained: {r}"))),
                }
            }
            None => self.cluster.best().ok_or_else(|| FsError::new(Errno::Again, "no node is up to mount it on"))?,
        };
        let _claim = self.claim(user, "a mount")?;
        let this = self.clone();
        let (u, n) = (user.to_string(), node.clone());
        let img = blocking(move || {
            let img = this.image(&u)?;
            if img.phase != Phase::Unmounted {
                return Err(FsError::new(Errno::Busy, format!("{u}'s image is {} already", img.state_line())));
            }
            // The lease is taken, durably, before the node is asked.
            this.update(&u, |i| {
                i.phase = Phase::Mounting;
                i.node = Some(n.clone());
            })
        })
        .await?;
        self.drive_mount(&img, &node).await
    }

    /// Asks `node` to mount `img` (leased to it), and records how that went.
    async fn drive_mount(self: &Arc<Self>, img: &Image, node: &str) -> Result<(), FsError> {
        let user = img.user.clone();
        let op = Op::ImageMount { path: self.path(img), mountpoint: self.mountpoint(&user) };
        let answer = self.cluster.request(node, op, OP_TIMEOUT).await;
        let this = self.clone();
        let node = node.to_string();
        let mountpoint = self.mountpoint(&user);
        blocking(move || match answer {
            Ok(Reply::Mounted { dev, repaired }) => {
                let fixed = if repaired { ", after fsck repaired it" } else { "" };
                this.update(&user, |i| {
                    i.phase = Phase::Mounted;
                    i.event(format!("mounted on {node} at {} ({dev}){fixed}", mountpoint.display()));
                })?;
                Ok(())
            }
            Ok(other) => Err(FsError::new(Errno::Io, format!("{node} answered {other:?} to a mount"))),
            Err(e) if e.errno == Errno::Io => {
                // The node said no: nothing is mounted, the lease goes.
                this.update(&user, |i| {
                    i.phase = Phase::Unmounted;
                    i.node = None;
                    i.event(format!("mount on {node} failed: {}", e.message));
                })?;
                Err(e)
            }
            Err(e) => {
                // No answer: it may be mounted. The lease stays; the health scan finishes it.
                this.note(&user, format!("mount on {node} not confirmed ({}); retried when {node} answers", e.message));
                Err(FsError::new(e.errno, format!("{}; {user}'s image stays leased to {node}", e.message)))
            }
        })
        .await
    }

    /// Unmounts image `user` and releases its lease once the node confirmed it.
    pub async fn umount(self: &Arc<Self>, caller: &Caller, user: &str) -> Result<(), FsError> {
        let img = self.image(user)?;
        Self::allowed(caller, user, img.uid)?;
        let _claim = self.claim(user, "an umount")?;
        let this = self.clone();
        let u = user.to_string();
        let img = blocking(move || {
            let img = this.image(&u)?;
            if img.phase == Phase::Unmounted {
                return Err(FsError::invalid(format!("{u}'s image is not mounted")));
            }
            this.update(&u, |i| i.phase = Phase::Unmounting)
        })
        .await?;
        self.drive_umount(&img).await
    }

    async fn drive_umount(self: &Arc<Self>, img: &Image) -> Result<(), FsError> {
        let user = img.user.clone();
        let Some(node) = img.node.clone() else {
            let this = self.clone();
            return blocking(move || this.update(&user, |i| i.phase = Phase::Unmounted).map(|_| ())).await;
        };
        let op = Op::ImageUmount { path: self.path(img), mountpoint: self.mountpoint(&user) };
        let answer = self.cluster.request(&node, op, OP_TIMEOUT).await;
        let this = self.clone();
        blocking(move || match answer {
            Ok(Reply::Done) => {
                this.used.remove(&user);
                this.update(&user, |i| {
                    i.phase = Phase::Unmounted;
                    i.node = None;
                    i.event(format!("unmounted from {node}, loop device detached"));
                })?;
                Ok(())
            }
            Ok(Reply::Busy { reason }) => {
                this.update(&user, |i| i.phase = Phase::Mounted)?;
                Err(FsError::new(Errno::Busy, format!("{user}'s image stays mounted on {node}: {reason}")))
            }
            Ok(other) => Err(FsError::new(Errno::Io, format!("{node} answered {other:?} to an umount"))),
            Err(e) => {
                this.note(
                    &user,
                    format!("umount on {node} not confirmed ({}); retried when {node} answers", e.message),
                );
                Err(FsError::new(
                    e.errno,
                    format!("{}; {user}'s image stays leased to {node} until it confirms", e.message),
                ))
            }
        })
        .await
    }

    /// Grows image `user` to `size` bytes (`+N`: by N): online on its node when mounted.
    pub async fn resize(self: &Arc<Self>, caller: &Caller, user: &str, text: &str) -> Result<(), FsError> {
        let img = self.image(user)?;
        Self::allowed(caller, user, img.uid)?;
        let size = match text.strip_prefix('+') {
            // A growth of any size: the image it makes is at least as large as the one there.
            Some(more) => match crate::jobs::spec::parse_size(more) {
                Some(m) if m > 0 => img.size.saturating_add(m),
                _ => return Err(FsError::invalid(format!("resize: +{more} is not a growth like +512M or +10G"))),
            },
            None => crate::images::parse_image_size(text).map_err(|e| FsError::invalid(format!("resize: {e}")))?,
        };
        if size < img.size {
            return Err(FsError::invalid(format!(
                "images only grow: {user}'s is {}, asked {}",
                size_text(img.size),
                size_text(size)
            )));
        }
        if size > crate::images::MAX_SIZE {
            return Err(FsError::invalid(format!(
                "resize: an image is at most {}",
                size_text(crate::images::MAX_SIZE)
            )));
        }
        if size == img.size {
            return Ok(());
        }
        let _claim = self.claim(user, "a resize")?;
        let img = self.image(user)?;
        let capacity = self.cfg.volumes.get(&img.volume).map_or(0, |v| v.capacity.0);
        let others = self.assigned(&img.volume) - img.size;
        if others + size > capacity {
            return Err(FsError::new(
                Errno::NoSpc,
                format!(
                    "{} has {} of its quota left: {user}'s image cannot grow to {}",
                    img.volume,
                    size_text(capacity.saturating_sub(others + img.size)),
                    size_text(size)
                ),
            ));
        }
        let path = self.path(&img);
        let how = match (img.phase, img.node.clone()) {
            (Phase::Mounted, Some(node)) => {
                let op = Op::ImageGrow { path, mountpoint: self.mountpoint(user), size };
                match self.cluster.request(&node, op, OP_TIMEOUT).await? {
                    Reply::Done => format!(" online on {node}"),
                    Reply::Later { reason } => format!("; {reason}"),
                    other => return Err(FsError::new(Errno::Io, format!("{node} answered {other:?} to a resize"))),
                }
            }
            (Phase::Unmounted, _) => {
                blocking(move || grow_offline(&path, size)).await?;
                String::new()
            }
            _ => return Err(FsError::new(Errno::Busy, format!("{user}'s image is {}", img.state_line()))),
        };
        let this = self.clone();
        let u = user.to_string();
        blocking(move || {
            this.update(&u, |i| {
                i.size = size;
                i.event(format!("grown to {}{how}", size_text(size)));
            })
            .map(|_| ())
        })
        .await
    }

    /// Checks and repairs an unmounted image (blocking).
    pub fn fsck(&self, caller: &Caller, user: &str) -> Result<(), FsError> {
        let (_claim, img) = self.claim_unmounted(caller, user, "an fsck")?;
        let path = self.path(&img);
        let (code, err, out) =
            command("e2fsck", &["-f", "-y", &path.to_string_lossy()]).map_err(|e| io_err("fsck", e))?;
        let verdict = match code {
            0 => "clean".to_string(),
            1 | 2 => "errors repaired".to_string(),
            c => format!("errors left (exit {c}): {}", err.trim().lines().last().unwrap_or(out.trim())),
        };
        self.note(user, format!("fsck: {verdict}"));
        if code >= 4 {
            return Err(FsError::new(Errno::Io, format!("fsck of {user}'s image: {verdict}")));
        }
        Ok(())
    }

    /// `volumes/<vol>` figures (blocking: it stats the images).
    pub fn volume_use(&self, name: &str) -> Option<VolumeUse> {
        let v = self.cfg.volumes.get(name)?;
        let mine: Vec<Image> = self.images.iter().filter(|i| i.volume == name).map(|i| i.clone()).collect();
        Some(VolumeUse {
            path: v.path.clone(),
            capacity: v.capacity.0,
            assigned: mine.iter().map(|i| i.size).sum(),
            used: mine.iter().map(|i| self.allocated(i)).sum(),
            images: mine.len(),
            spares: spares(&v.path).len(),
        })
    }

    /// Bytes the image file really takes on its volume.
    pub fn allocated(&self, img: &Image) -> u64 {
        std::fs::metadata(self.path(img)).map_or(0, |m| m.blocks() * 512)
    }

    /// `bill`: per team, its users' images (blocking). Users in no team are billed to `-`.
    pub fn bill(&self) -> String {
        let mut out = String::from("team images assigned used\n");
        let all: Vec<Image> = self.users().into_iter().filter_map(|u| self.get(&u)).collect();
        let mut billed: HashSet<&str> = HashSet::new();
        let mut line = |team: &str, imgs: Vec<&Image>| {
            let assigned: u64 = imgs.iter().map(|i| i.size).sum();
            let used: u64 = imgs.iter().map(|i| self.allocated(i)).sum();
            out.push_str(&format!("{team} {} {assigned} {used}\n", imgs.len()));
        };
        for (team, members) in &self.cfg.teams {
            let imgs: Vec<&Image> = all.iter().filter(|i| members.contains(&i.user)).collect();
            billed.extend(imgs.iter().map(|i| i.user.as_str()));
            line(team, imgs);
        }
        let rest: Vec<&Image> = all.iter().filter(|i| !billed.contains(i.user.as_str())).collect();
        if !rest.is_empty() {
            line("-", rest);
        }
        out
    }

    /// Keeps every volume's spares made, then scans the nodes, for ever.
    pub async fn keeper(self: Arc<Self>) {
        let every = Duration::from_secs(self.cfg.health_interval_s);
        loop {
            let this = self.clone();
            let _ = tokio::task::spawn_blocking(move || this.make_spares()).await;
            self.health().await;
            let _ = tokio::time::timeout(every, self.spare_taken.notified()).await;
        }
    }

    /// Tops up each volume to `spares` formatted images of the default size (blocking).
    fn make_spares(&self) {
        for (name, v) in &self.cfg.volumes {
            let mut have = spares(&v.path).len();
            while have < self.cfg.spares as usize {
                let n = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
                let spare = v.path.join(format!("{SPARE_PREFIX}{n}.img"));
                let tmp = v.path.join(format!(".making{SPARE_PREFIX}{n}"));
                let made = format_new(&tmp, self.cfg.default_size.0)
                    .and_then(|()| std::fs::rename(&tmp, &spare).map_err(|e| io_err("placing the spare", e)));
                if let Err(e) = made {
                    let _ = std::fs::remove_file(&tmp);
                    warn!(volume = name, error = %e, "cannot make a spare image");
                    break;
                }
                info!(volume = name, spare = %spare.display(), "spare image made");
                have += 1;
            }
        }
    }

    /// One health pass: ghost loops are detached, missing mounts mounted again, and leases
    /// left mid-way (no answer from the node) are finished.
    pub async fn health(self: &Arc<Self>) {
        let volumes: Vec<PathBuf> = self.cfg.volumes.values().map(|v| v.path.clone()).collect();
        if volumes.is_empty() {
            return;
        }
        let nodes: Vec<String> = self.cluster.set(Which::Up).iter().collect();
        let scans = futures::future::join_all(nodes.iter().map(|n| {
            let op = Op::ImageScan { volumes: volumes.clone() };
            async move { (n.clone(), self.cluster.request(n, op, SCAN_TIMEOUT).await) }
        }))
        .await;
        let mut detached = HashSet::new();
        let mut scanned = std::collections::HashMap::new();
        for (node, answer) in scans {
            let Ok(Reply::Loops { loops }) = answer else { continue };
            for l in &loops {
                self.check_loop(&node, l, &mut detached).await;
            }
            scanned.insert(node, loops);
        }
        for user in self.users() {
            let Some(node) = self.get(&user).and_then(|i| i.node) else { continue };
            let Some(loops) = scanned.get(&node) else { continue };
            // Claimed only when there is something to repair, so a user's own mount or umount
            // never meets an EBUSY from a scan that found all well.
            if !self.get(&user).is_some_and(|i| self.needs_repair(&i, loops)) {
                continue;
            }
            let Ok(_claim) = self.claim(&user, "a health repair") else { continue };
            // Read again under the claim: the user's own operation may have just ended.
            let Some(img) = self.get(&user).filter(|i| i.node.as_ref() == Some(&node) && self.needs_repair(i, loops))
            else {
                continue;
            };
            let done = match img.phase {
                Phase::Mounted => {
                    self.note(&user, format!("missing mount on {node}: mounting it again"));
                    self.drive_mount(&img, &node).await
                }
                Phase::Mounting => self.drive_mount(&img, &node).await,
                Phase::Unmounting => self.drive_umount(&img).await,
                _ => Ok(()),
            };
            if let Err(e) = done {
                warn!(image = user, node, error = %e, "image repair failed");
            }
        }
    }

    /// Whether image `img` is not where its lease says, by `loops` of its node: mounted there
    /// but missing, or left mid-way by a mount or umount that got no answer.
    fn needs_repair(&self, img: &Image, loops: &[LoopInfo]) -> bool {
        let (path, at) = (self.path(img), self.mountpoint(&img.user));
        match img.phase {
            Phase::Mounted => !loops.iter().any(|l| l.file == path && l.mountpoint.as_deref() == Some(at.as_path())),
            Phase::Mounting | Phase::Unmounting => true,
            Phase::Unmounted => false,
        }
    }

    /// Notes the use of a mounted image; detaches a loop device that backs an image but is
    /// mounted nowhere (a ghost), unless an operation on that image is under way.
    async fn check_loop(self: &Arc<Self>, node: &str, l: &LoopInfo, detached: &mut HashSet<String>) {
        let user = self.owner_of(&l.file);
        if let (Some(user), Some(used)) = (&user, l.used) {
            self.used.insert(user.clone(), used);
        }
        if l.mountpoint.is_some() || detached.contains(&l.dev) {
            return;
        }
        let _claim = match &user {
            Some(u) => match self.claim(u, "a ghost cleanup") {
                Ok(c) => Some(c),
                Err(_) => return,
            },
            None => None,
        };
        if user.as_ref().and_then(|u| self.get(u)).is_some_and(|i| i.phase == Phase::Mounting) {
            return;
        }
        let op = Op::ImageDetach { dev: l.dev.clone(), path: l.file.clone() };
        match self.cluster.request(node, op, SCAN_TIMEOUT).await {
            Ok(Reply::Done) => {
                detached.insert(l.dev.clone());
                let text = format!("ghost loop device {} on {node} detached (attached, not mounted)", l.dev);
                match &user {
                    Some(u) => self.note(u, text),
                    None => warn!(file = %l.file.display(), "{text}"),
                }
            }
            Ok(_) => {}
            Err(e) => warn!(node, dev = l.dev, error = %e, "cannot detach a ghost loop device"),
        }
    }

    /// The user whose image `file` is, if it is one of ours.
    fn owner_of(&self, file: &Path) -> Option<String> {
        let user = file.file_stem()?.to_str()?.to_string();
        let img = self.get(&user)?;
        (self.path(&img) == file).then_some(user)
    }

    /// `images` line of `status`.
    pub fn status(&self) -> String {
        let mounted = self.images.iter().filter(|i| i.phase == Phase::Mounted).count();
        format!("images {} mounted {} volumes {}\n", self.images.len(), mounted, self.cfg.volumes.len())
    }
}

/// Runs blocking work (store commits, file work) off the runtime.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, FsError> + Send + 'static) -> Result<T, FsError> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(FsError::new(Errno::Io, format!("internal error: {e}"))))
}

/// The spare images waiting in `dir`, oldest first.
fn spares(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut v: Vec<PathBuf> = entries
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            (name.starts_with(SPARE_PREFIX) && name.ends_with(".img")).then(|| dir.join(name))
        })
        .collect();
    v.sort();
    v
}

/// A sparse file of `size` bytes with a fresh ext4 on it.
fn format_new(path: &Path, size: u64) -> Result<(), FsError> {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| disk_err(&format!("making {}", path.display()), e))?;
    file.set_len(size).map_err(|e| disk_err("sizing the image", e))?;
    drop(file);
    let p = path.to_string_lossy();
    let out = command("mkfs.ext4", &["-F", "-q", "-m", "0", "-E", "lazy_itable_init=1,lazy_journal_init=1", &p])
        .map_err(|e| io_err("mkfs", e))?;
    check(out, "mkfs.ext4").map_err(|e| FsError::new(Errno::Io, e))
}

/// A copy of template `from` at `to`, grown to `size`.
fn copy_template(from: &Path, to: &Path, size: u64) -> Result<(), FsError> {
    let out = command("cp", &["--sparse=always", "--reflink=auto", &from.to_string_lossy(), &to.to_string_lossy()])
        .map_err(|e| io_err("copying the template", e))?;
    check(out, "copying the template").map_err(|e| FsError::new(Errno::Io, e))?;
    grow_offline(to, size)
}

/// Grows an unmounted image file and its filesystem to `size`.
fn grow_offline(path: &Path, size: u64) -> Result<(), FsError> {
    let file = std::fs::OpenOptions::new().write(true).open(path).map_err(|e| io_err("opening the image", e))?;
    if file.metadata().map_err(|e| io_err("the image", e))?.len() >= size {
        return Ok(());
    }
    file.set_len(size).map_err(|e| disk_err("growing the image", e))?;
    let p = path.to_string_lossy();
    // resize2fs wants a checked filesystem first.
    let fsck = command("e2fsck", &["-f", "-p", &p]).map_err(|e| io_err("fsck", e))?;
    if fsck.0 >= 4 {
        return Err(FsError::new(Errno::Io, format!("fsck before the resize failed: {}", fsck.1.trim())));
    }
    check(command("resize2fs", &[&p]).map_err(|e| io_err("resize2fs", e))?, "resize2fs")
        .map_err(|e| FsError::new(Errno::Io, e))
}

/// Makes the filesystem's root directory the user's, private (mode 0700: the user may open
/// it up), without mounting it.
fn root_owner(path: &Path, uid: u32, gid: u32) -> Result<(), FsError> {
    let p = path.to_string_lossy();
    for (field, value) in [("uid", uid.to_string()), ("gid", gid.to_string()), ("mode", "040700".to_string())] {
        let req = format!("set_inode_field <2> {field} {value}");
        let out = command("debugfs", &["-w", "-R", &req, &p]).map_err(|e| io_err("debugfs", e))?;
        check(out, "setting the filesystem's owner").map_err(|e| FsError::new(Errno::Io, e))?;
    }
    Ok(())
}

/// A file error where a full disk is ENOSPC.
fn disk_err(what: &str, e: std::io::Error) -> FsError {
    let errno = if e.raw_os_error() == Some(libc::ENOSPC) { Errno::NoSpc } else { Errno::Io };
    FsError::new(errno, format!("{what}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_bounded_and_state_names_the_node() {
        let mut i = Image {
            user: "a".into(),
            uid: 1,
            gid: 1,
            volume: "v".into(),
            size: 1,
            created_ms: 0,
            changed_ms: 0,
            phase: Phase::Mounted,
            node: Some("cn1".into()),
            events: Vec::new(),
        };
        for n in 0..30 {
            i.event(format!("e{n}"));
        }
        assert_eq!(i.events.len(), EVENTS_KEPT);
        assert!(i.events.last().unwrap().ends_with(" e29"));
        assert_eq!(i.state_line(), "mounted on cn1");
    }
}
