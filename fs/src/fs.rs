//! The filesystem logic: inodes, handles, snapshots, logs and control files, with no kernel in sight.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use fuser::{FileAttr, FileType, INodeNo};

use crate::error::{Errno, FsError, Result};
use crate::errors::ErrorBook;
use crate::inodes::{Inodes, PathBuf, ROOT};
use crate::tree::{Answer, Caller, Kind, Node, Tree, Write};

/// Limits and timings of a mount.
#[derive(Clone, Debug)]
pub struct Config {
    /// Attribute and entry TTL for files (short, never zero).
    pub file_ttl: Duration,
    /// Attribute and entry TTL for directories.
    pub dir_ttl: Duration,
    /// FUSE threads reading requests from the kernel.
    pub threads: usize,
    /// Name shown in `mount` output.
    pub fsname: String,
    /// How many objects a walk may visit to find an inode from before a restart.
    pub max_walk: usize,
    /// A block device to mount on (`fuseblk`) instead of an anonymous device: the mount then
    /// has that device's number and UUID, the same at every mount, so the file handles of an
    /// NFS re-export outlive a remount. Root only.
    pub device: Option<std::path::PathBuf>,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            file_ttl: Duration::from_millis(100),
            dir_ttl: Duration::from_secs(1),
            threads: 4,
            fsname: "synthfs".into(),
            max_walk: 1_000_000,
            device: None,
        }
    }
}

/// What a lookup answers: attributes, the NFS generation and how long the kernel may keep them.
#[derive(Clone, Debug)]
pub struct Entry {
    pub attr: FileAttr,
    pub generation: u64,
    pub ttl: Duration,
}

/// One directory entry with the cookie that resumes the listing after it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    pub ino: u64,
    pub cookie: u64,
    pub kind: FileType,
    pub name: String,
}

/// What a setattr asks of a file's mode and owner.
#[derive(Debug, Default, Clone, Copy)]
pub struct Chattr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

/// A render and when it was made.
type Render = (Instant, Arc<Vec<u8>>);

/// An open file.
#[derive(Debug)]
struct Handle {
    ino: u64,
    path: PathBuf,
    kind: Kind,
    /// The bytes rendered at open (snapshot, error, blocking files).
    snapshot: Arc<Vec<u8>>,
    /// Whether the snapshot has been read: a later read at offset 0 renders anew.
    served: bool,
    /// What writes answered, served to reads on the same handle.
    response: Vec<u8>,
    /// How much of `response` has been read.
    cursor: usize,
    written: bool,
    caller: Caller,
}

/// A synthetic filesystem over a [`Tree`].
pub struct SynthFs<T: Tree> {
    tree: Arc<T>,
    cfg: Config,
    inodes: Inodes,
    handles: DashMap<u64, Handle>,
    next_handle: AtomicU64,
    /// Recent renders per (inode, uid), so `stat` and the `open` right after agree on the size.
    renders: DashMap<(u64, u32), Render>,
    errors: ErrorBook,
    /// Tells the kernel to drop cached attributes (set once mounted).
    notifier: std::sync::OnceLock<fuser::Notifier>,
    /// Each directory's listing as its last read from the start made it, for the reads that go
    /// on from a cookie: one listing is one walk of the tree, however many reads it takes.
    listings: DashMap<u64, (Instant, Arc<Vec<DirEntry>>)>,
}

/// How long a listing serves the reads that go on from a cookie.
const LISTING_TTL: std::time::Duration = std::time::Duration::from_secs(30);
/// The most entries one readdir answers with (a kernel buffer holds fewer).
const READDIR_MAX: usize = 4096;

impl<T: Tree> std::fmt::Debug for SynthFs<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SynthFs").field("handles", &self.handles.len()).finish()
    }
}

impl<T: Tree> SynthFs<T> {
    pub fn new(tree: Arc<T>, cfg: Config) -> Arc<SynthFs<T>> {
        Arc::new(SynthFs {
            tree,
            cfg,
            inodes: Inodes::new(),
            handles: DashMap::new(),
            next_handle: AtomicU64::new(1),
            renders: DashMap::new(),
            errors: ErrorBook::default(),
            notifier: std::sync::OnceLock::new(),
            listings: DashMap::new(),
        })
    }

    pub(crate) fn set_notifier(&self, n: fuser::Notifier) {
        let _ = self.notifier.set(n);
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn tree(&self) -> &Arc<T> {
        &self.tree
    }

    /// Whether answering for `ino` (or for `name` in it) may wait on the network; so it may
    /// when `ino` is not known yet, as finding it walks the tree.
    pub fn remote(&self, ino: u64, name: Option<&str>) -> bool {
        let Some(path) = self.inodes.path(ino) else { return self.tree.remote(&[]) };
        let mut path = refs(&path);
        path.extend(name);
        self.tree.remote(&path)
    }

    /// The path of `ino`; after a restart the tree is walked to find it, else ESTALE.
    pub fn resolve(&self, ino: u64) -> Result<PathBuf> {
        if let Some(p) = self.inodes.path(ino) {
            return Ok(p);
        }
        let mut queue: std::collections::VecDeque<Vec<String>> = [Vec::new()].into();
        let mut visited = 0usize;
        while let Some(dir) = queue.pop_front() {
            let refs: Vec<&str> = dir.iter().map(String::as_str).collect();
            let Ok(names) = self.tree.list(&refs) else { continue };
            for name in names {
                visited += 1;
                if visited > self.cfg.max_walk {
                    break;
                }
                let mut child = dir.clone();
                child.push(name);
                if Inodes::matches(&child, ino) {
                    self.inodes.ino(&child);
                    if let Some(p) = self.inodes.path(ino) {
                        return Ok(p);
                    }
                }
                let crefs: Vec<&str> = child.iter().map(String::as_str).collect();
                if self.tree.node(&crefs).is_ok_and(|n| n.kind.is_dir()) {
                    queue.push_back(child);
                }
            }
        }
        Err(FsError::new(Errno::Stale, format!("inode {ino} is not known (the object is gone)")))
    }

    fn node(&self, path: &[String]) -> Result<Node> {
        self.tree.node(&refs(path))
    }

    fn child(&self, parent: u64, name: &str) -> Result<Vec<String>> {
        if name.is_empty() || name.contains('/') || name == "." || name == ".." {
            return Err(FsError::invalid(format!("{name:?} is not a valid name")));
        }
        let mut path = self.resolve(parent)?.to_vec();
        path.push(name.to_string());
        Ok(path)
    }

    /// The size a `stat` reports: exactly what an open + read would give now.
    fn size(&self, ino: u64, path: &PathBuf, node: &Node, caller: &Caller) -> u64 {
        match node.kind {
            Kind::Dir => 0,
            Kind::Log => node.size,
            Kind::Error => self.errors.render(&parent_of(path), caller.uid).len() as u64,
            Kind::Snapshot | Kind::Control | Kind::Blocking => {
                self.cached_render(ino, path, node.kind, caller).map_or(0, |b| b.len() as u64)
            }
        }
    }

    /// The render `stat` made for `uid` less than one file TTL ago, if any: open and reads
    /// reuse it, so the size and the bytes agree.
    fn fresh_render(&self, ino: u64, uid: u32) -> Option<Arc<Vec<u8>>> {
        self.renders.get(&(ino, uid)).filter(|r| r.0.elapsed() < self.cfg.file_ttl).map(|r| r.1.clone())
    }

    /// A render at most one file TTL old, or a fresh one when the tree answers at once.
    fn cached_render(&self, ino: u64, path: &PathBuf, kind: Kind, caller: &Caller) -> Option<Arc<Vec<u8>>> {
        let key = (ino, caller.uid);
        if let Some(bytes) = self.fresh_render(ino, caller.uid) {
            return Some(bytes);
        }
        match self.tree.render(&refs(path), caller, kind == Kind::Blocking) {
            Answer::Now(Ok(bytes)) => {
                let bytes = Arc::new(bytes);
                self.renders.insert(key, (Instant::now(), bytes.clone()));
                Some(bytes)
            }
            // A slow render (a round trip): size from the last one, the read gives the truth.
            Answer::Now(Err(_)) | Answer::Later(_) => self.renders.get(&key).map(|r| r.1.clone()),
        }
    }

    fn attr(&self, ino: u64, node: &Node, size: u64) -> FileAttr {
        let dir = node.kind.is_dir();
        FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: node.mtime,
            mtime: node.mtime,
            ctime: node.mtime,
            crtime: node.mtime,
            kind: if dir { FileType::Directory } else { FileType::RegularFile },
            perm: node.perm,
            nlink: if dir { 2 } else { 1 },
            uid: node.uid,
            gid: node.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    fn entry_of(&self, path: &PathBuf, caller: &Caller) -> Result<Entry> {
        Ok(self.entry_with(path, self.node(path)?, caller))
    }

    /// The entry of `path`, whose node the caller has just read.
    fn entry_with(&self, path: &PathBuf, node: Node, caller: &Caller) -> Entry {
        let ino = self.inodes.ino(path);
        let size = self.size(ino, path, &node, caller);
        let ttl = if node.kind.is_dir() { self.cfg.dir_ttl } else { self.cfg.file_ttl };
        Entry { attr: self.attr(ino, &node, size), generation: node.generation, ttl }
    }

    pub fn lookup(&self, parent: u64, name: &str, caller: &Caller) -> Result<Entry> {
        let path: PathBuf = match name {
            "." => self.resolve(parent)?,
            ".." => parent_of(&self.resolve(parent)?),
            _ => self.child(parent, name)?.into(),
        };
        self.entry_of(&path, caller)
    }

    pub fn getattr(&self, ino: u64, handle: Option<u64>, caller: &Caller) -> Result<(FileAttr, Duration)> {
        // A snapshot already read is rendered anew by its next read at offset 0: its size is
        // the current one, as that read will return (the render is shared for file_ttl).
        if let Some(h) = handle.and_then(|fh| self.handles.get(&fh))
            && ((matches!(h.kind, Kind::Snapshot | Kind::Error) && !h.served)
                || h.kind == Kind::Blocking
                || (h.kind == Kind::Control && !h.written))
        {
            let node = self.node(&h.path)?;
            return Ok((self.attr(ino, &node, h.snapshot.len() as u64), self.cfg.file_ttl));
        }
        let path = self.resolve(ino)?;
        let entry = self.entry_of(&path, caller)?;
        Ok((entry.attr, entry.ttl))
    }

    /// Truncation of a control file to 0 is accepted (`echo x > ctl` opens with O_TRUNC); a
    /// chown that changes nothing is accepted and a chmod goes to the tree (an NFS server
    /// sets both on what it just created); nothing else changes.
    pub fn setattr(&self, ino: u64, size: Option<u64>, owner: Chattr, caller: &Caller) -> Result<(FileAttr, Duration)> {
        let path = self.resolve(ino)?;
        let r = self.setattr_at(&path, size, owner, caller);
        self.note_failure(&parent_of(&path), caller.uid, r)
    }

    fn setattr_at(
        &self,
        path: &Arc<[String]>,
        size: Option<u64>,
        owner: Chattr,
        caller: &Caller,
    ) -> Result<(FileAttr, Duration)> {
        let node = self.node(path)?;
        if owner.uid.is_some_and(|u| u != node.uid) || owner.gid.is_some_and(|g| g != node.gid) {
            return Err(FsError::fixed_modes());
        }
        if let Some(mode) = owner.mode.filter(|m| m & 0o7777 != u32::from(node.perm)) {
            self.tree.chmod(&refs(path), caller, mode & 0o7777)?;
        }
        if size.is_some_and(|s| s != 0) || (size.is_some() && node.kind != Kind::Control) {
            let name = path.last().map_or("/", String::as_str);
            return Err(FsError::new(
                Errno::Perm,
                format!("{name}: only control files may be truncated, and only to 0"),
            ));
        }
        // The node just read, unless a chmod changed it: one call of the tree fewer for each
        // `echo x > ctl` (a round trip on a head that does not lead).
        let entry =
            if owner.mode.is_some() { self.entry_of(path, caller)? } else { self.entry_with(path, node, caller) };
        Ok((entry.attr, entry.ttl))
    }

    pub fn readdir(&self, ino: u64, offset: u64) -> Result<Vec<DirEntry>> {
        // A read from the start lists anew; one going on from a cookie uses that listing.
        let cached = self.listings.get(&ino).filter(|l| offset > 2 && l.0.elapsed() < LISTING_TTL).map(|l| l.1.clone());
        let all = match cached {
            Some(all) => all,
            None => {
                let all = Arc::new(self.list_dir(ino)?);
                if self.listings.len() > 256 {
                    self.listings.retain(|_, l| l.0.elapsed() < LISTING_TTL);
                }
                self.listings.insert(ino, (Instant::now(), all.clone()));
                all
            }
        };
        let from = all.partition_point(|e| e.cookie <= offset);
        Ok(all[from..].iter().take(READDIR_MAX).cloned().collect())
    }

    /// Every entry of directory `ino`, "." and ".." first, then by cookie.
    fn list_dir(&self, ino: u64) -> Result<Vec<DirEntry>> {
        let path = self.resolve(ino)?;
        let node = self.node(&path)?;
        if !node.kind.is_dir() {
            return Err(FsError::new(Errno::NotDir, "not a directory"));
        }
        let mut entries: Vec<DirEntry> = Vec::new();
        for name in self.tree.list(&refs(&path))? {
            let mut child = path.to_vec();
            child.push(name.clone());
            // An entry that vanished between list and node is skipped, not an error.
            let Ok(n) = self.node(&child) else { continue };
            let ino = self.inodes.ino(&child);
            let kind = if n.kind.is_dir() { FileType::Directory } else { FileType::RegularFile };
            entries.push(DirEntry { ino, cookie: ino, kind, name });
        }
        // Sorted by inode, each entry's cookie is its inode: a listing resumed at any cookie
        // (even by another handle, as NFS does) is neither repeated nor skipped.
        entries.sort_by_key(|e| e.ino);
        let parent_ino = self.inodes.ino(&parent_of(&path));
        let dots = [
            DirEntry { ino, cookie: 1, kind: FileType::Directory, name: ".".into() },
            DirEntry { ino: parent_ino, cookie: 2, kind: FileType::Directory, name: "..".into() },
        ];
        Ok(dots.into_iter().chain(entries).collect())
    }

    fn new_handle(&self, ino: u64, path: PathBuf, kind: Kind, snapshot: Arc<Vec<u8>>, caller: Caller) -> u64 {
        let fh = self.next_handle.fetch_add(1, Ordering::Relaxed);
        self.handles.insert(
            fh,
            Handle {
                ino,
                path,
                kind,
                snapshot,
                served: false,
                response: Vec::new(),
                cursor: 0,
                written: false,
                caller,
            },
        );
        fh
    }

    /// Opens `ino`; snapshots are rendered here, into the handle.
    pub fn open(self: &Arc<Self>, ino: u64, nonblock: bool, caller: &Caller) -> Answer<u64> {
        let path = match self.resolve(ino) {
            Ok(p) => p,
            Err(e) => return Answer::Now(Err(e)),
        };
        let node = match self.node(&path) {
            Ok(n) => n,
            Err(e) => return Answer::Now(Err(e)),
        };
        let caller = *caller;
        let render = match node.kind {
            Kind::Dir => return Answer::Now(Err(FsError::new(Errno::IsDir, "is a directory"))),
            Kind::Log => {
                return Answer::Now(Ok(self.new_handle(ino, path, node.kind, Arc::default(), caller)));
            }
            Kind::Error => {
                let bytes = self.errors.render(&parent_of(&path), caller.uid);
                return Answer::Now(Ok(self.new_handle(ino, path, node.kind, Arc::new(bytes), caller)));
            }
            Kind::Snapshot | Kind::Control => {
                // The render `stat` just sized is reused so both agree; older ones are redone.
                if let Some(bytes) = self.fresh_render(ino, caller.uid) {
                    return Answer::Now(Ok(self.new_handle(ino, path, node.kind, bytes, caller)));
                }
                self.tree.render(&refs(&path), &caller, false)
            }
            Kind::Blocking => self.tree.render(&refs(&path), &caller, nonblock),
        };
        let kind = node.kind;
        let dir = parent_of(&path);
        match render {
            Answer::Now(r) => {
                let r = self.note_failure(&dir, caller.uid, r);
                Answer::Now(r.map(|b| self.finish_open(ino, path, kind, b, caller)))
            }
            Answer::Later(fut) => {
                let this = self.clone();
                Answer::later(async move {
                    let bytes = this.note_failure(&dir, caller.uid, fut.await)?;
                    let fh = this.finish_open(ino, path, kind, bytes, caller);
                    // The size the kernel cached at lookup predates this render: drop it
                    // before the open is answered, so fstat on the handle asks again.
                    // Attributes only (offset -1): no page-cache lock is taken.
                    if let Some(n) = this.notifier.get()
                        && let Err(e) = n.inval_inode(fuser::INodeNo(ino), -1, 0)
                    {
                        tracing::debug!(ino, error = %e, "attribute invalidation failed");
                    }
                    Ok(fh)
                })
            }
        }
    }

    fn finish_open(&self, ino: u64, path: PathBuf, kind: Kind, bytes: Vec<u8>, caller: Caller) -> u64 {
        let bytes = Arc::new(bytes);
        if kind == Kind::Blocking {
            // What the wait saw happen is in every read after it, not a render from before.
            self.renders.clear();
        } else {
            self.renders.insert((ino, caller.uid), (Instant::now(), bytes.clone()));
        }
        self.new_handle(ino, path, kind, bytes, caller)
    }

    /// A read: a written control handle's answer is served once what was written is durable;
    /// a snapshot read again from offset 0 is rendered anew.
    pub fn read_handle(self: &Arc<Self>, handle: u64, offset: u64, size: u32) -> Answer<Vec<u8>> {
        if offset == 0
            && let Some(answer) = self.rerender(handle, size)
        {
            return answer;
        }
        let this = self.clone();
        match self.flush(handle) {
            Answer::Now(Ok(())) => self.read(handle, offset, size),
            Answer::Now(Err(e)) => Answer::Now(Err(e)),
            Answer::Later(fut) => Answer::later(async move {
                fut.await?;
                this.read(handle, offset, size).finish().await
            }),
        }
    }

    /// Makes what was written on a control handle durable (the tree decides what that means).
    /// A control file's close: what its writes did is made durable; a failure is the
    /// writer's last failure in that directory too.
    pub fn flush(self: &Arc<Self>, handle: u64) -> Answer<()> {
        let Some((path, caller)) = self
            .handles
            .get(&handle)
            .filter(|h| h.kind == Kind::Control && h.written)
            .map(|h| (h.path.clone(), h.caller))
        else {
            return Answer::Now(Ok(()));
        };
        let answer = self.tree.flush(&refs(&path), &caller, handle);
        self.recorded(parent_of(&path), caller.uid, answer)
    }

    /// Renders a snapshot or error handle that was already read anew, for a read at offset 0:
    /// `cat` opens anew each time anyway, but an NFS server keeps one open file for many
    /// clients' reads, which must not see what was true at its first open forever (rule 2).
    /// The render `stat` just sized is reused, as at open.
    fn rerender(self: &Arc<Self>, handle: u64, size: u32) -> Option<Answer<Vec<u8>>> {
        let (ino, path, kind, caller) = self
            .handles
            .get(&handle)
            .filter(|h| h.served && matches!(h.kind, Kind::Snapshot | Kind::Error))
            .map(|h| (h.ino, h.path.clone(), h.kind, h.caller))?;
        let dir = parent_of(&path);
        if kind == Kind::Error {
            let bytes = Arc::new(self.errors.render(&dir, caller.uid));
            return Some(Answer::Now(self.reread(handle, bytes, size)));
        }
        if let Some(bytes) = self.fresh_render(ino, caller.uid) {
            return Some(Answer::Now(self.reread(handle, bytes, size)));
        }
        let this = self.clone();
        let rendered = move |bytes: Result<Vec<u8>>| -> Result<Vec<u8>> {
            let bytes = Arc::new(this.note_failure(&dir, caller.uid, bytes)?);
            this.renders.insert((ino, caller.uid), (Instant::now(), bytes.clone()));
            this.reread(handle, bytes, size)
        };
        Some(self.tree.render(&refs(&path), &caller, false).then(rendered))
    }

    /// Puts a new render into `handle` and reads it from the start.
    fn reread(&self, handle: u64, bytes: Arc<Vec<u8>>, size: u32) -> Result<Vec<u8>> {
        if let Some(mut h) = self.handles.get_mut(&handle) {
            h.snapshot = bytes;
        }
        self.read_held(handle, 0, size)
    }

    /// What a read of `handle` gives: from what the handle holds, or a log file's from the tree.
    /// A log's failed read is the reader's last failure in its directory.
    pub fn read(self: &Arc<Self>, handle: u64, offset: u64, size: u32) -> Answer<Vec<u8>> {
        let log = self.handles.get(&handle).filter(|h| h.kind == Kind::Log).map(|h| (h.path.clone(), h.caller));
        let Some((path, caller)) = log else { return Answer::Now(self.read_held(handle, offset, size)) };
        let (dir, this) = (parent_of(&path), self.clone());
        self.tree.read_log(&refs(&path), &caller, offset, size).then(move |r| this.note_failure(&dir, caller.uid, r))
    }

    /// A read of what a (not log) handle holds.
    fn read_held(&self, handle: u64, offset: u64, size: u32) -> Result<Vec<u8>> {
        let mut h =
            self.handles.get_mut(&handle).ok_or_else(|| FsError::new(Errno::Stale, "the file handle is closed"))?;
        match h.kind {
            Kind::Snapshot | Kind::Error => {
                h.served = true;
                Ok(slice(&h.snapshot, offset, size))
            }
            Kind::Blocking => Ok(slice(&h.snapshot, offset, size)),
            // The answer is read from its own cursor: after a write the kernel offset has moved
            // past the written bytes, yet `read id <&3` must see the answer from its start.
            Kind::Control if !h.written => Ok(slice(&h.snapshot, offset, size)),
            Kind::Control => {
                let start = h.cursor.min(h.response.len());
                let end = (start + size as usize).min(h.response.len());
                let out = h.response[start..end].to_vec();
                h.cursor = end;
                Ok(out)
            }
            Kind::Log => Err(FsError::new(Errno::Io, "a log file is read from the tree")),
            Kind::Dir => Err(FsError::new(Errno::IsDir, "is a directory")),
        }
    }

    /// A write into a control file: acted on now, its answer kept for reads on this handle.
    pub fn write(self: &Arc<Self>, handle: u64, offset: u64, data: &[u8], caller: &Caller) -> Answer<u32> {
        let (path, kind) = match self.handles.get_mut(&handle) {
            Some(mut h) => {
                h.written = true;
                (h.path.clone(), h.kind)
            }
            None => return Answer::Now(Err(FsError::new(Errno::Stale, "the file handle is closed"))),
        };
        if kind != Kind::Control {
            return Answer::Now(Err(FsError::new(Errno::Acces, "this file is read-only")));
        }
        let len = u32::try_from(data.len()).unwrap_or(u32::MAX);
        let answer = self.tree.write(&refs(&path), caller, Write { handle, offset, data });
        let answer = self.recorded(parent_of(&path), caller.uid, answer);
        let this = self.clone();
        let keep = move |resp: Vec<u8>| {
            if let Some(mut h) = this.handles.get_mut(&handle) {
                h.response.extend_from_slice(&resp);
            }
            len
        };
        match answer {
            Answer::Now(r) => Answer::Now(r.map(keep)),
            Answer::Later(fut) => Answer::later(async move { fut.await.map(keep) }),
        }
    }

    pub fn release(&self, handle: u64) {
        if let Some((_, h)) = self.handles.remove(&handle)
            && h.kind == Kind::Control
            && h.written
        {
            self.tree.release(&refs(&h.path), &h.caller, handle);
        }
    }

    pub fn mkdir(self: &Arc<Self>, parent: u64, name: &str, mode: u32, caller: &Caller) -> Answer<Entry> {
        let path = match self.child(parent, name) {
            Ok(p) => p,
            Err(e) => return self.fail(parent, caller, e),
        };
        let answer = self.tree.mkdir(&refs(&path), caller, mode);
        self.then_entry(path, caller, answer)
    }

    pub fn rmdir(self: &Arc<Self>, parent: u64, name: &str, caller: &Caller) -> Answer<()> {
        self.in_dir(parent, name, caller, |tree, path, caller| tree.rmdir(path, caller))
    }

    pub fn unlink(self: &Arc<Self>, parent: u64, name: &str, caller: &Caller) -> Answer<()> {
        self.in_dir(parent, name, caller, |tree, path, caller| tree.unlink(path, caller))
    }

    /// `mknod`/`create` of a name: an existing control file is simply opened (NFS clients
    /// and shells may send CREATE for files that exist); anything else is made by the tree.
    pub fn create(self: &Arc<Self>, parent: u64, name: &str, mode: u32, caller: &Caller) -> Answer<Entry> {
        let path = match self.child(parent, name) {
            Ok(p) => p,
            Err(e) => return self.fail(parent, caller, e),
        };
        match self.node(&path) {
            Ok(n) if n.kind == Kind::Control => Answer::Now(self.entry_of(&path.into(), caller)),
            Ok(_) => self.fail(
                parent,
                caller,
                FsError::new(Errno::Exist, format!("{name} exists and is not a control file")),
            ),
            Err(_) => {
                // A name made by `>` stands until its first write, which may refuse it and so
                // unmake it: the kernel keeps no entry for the name, so that `>` again (a
                // retry) makes it anew instead of opening a name that is gone (ENOENT).
                let answer = self.tree.create(&refs(&path), caller, mode);
                self.then_entry(path, caller, answer).then(|r| r.map(|entry| Entry { ttl: Duration::ZERO, ..entry }))
            }
        }
    }

    fn in_dir(
        self: &Arc<Self>,
        parent: u64,
        name: &str,
        caller: &Caller,
        op: impl FnOnce(&T, &[&str], &Caller) -> Answer<()>,
    ) -> Answer<()> {
        match self.child(parent, name) {
            Ok(path) => {
                let answer = op(&self.tree, &refs(&path), caller);
                self.recorded(parent_of(&path.into()), caller.uid, answer)
            }
            Err(e) => self.fail(parent, caller, e),
        }
    }

    fn then_entry(self: &Arc<Self>, path: Vec<String>, caller: &Caller, answer: Answer<()>) -> Answer<Entry> {
        let path: PathBuf = path.into();
        let answer = self.recorded(parent_of(&path), caller.uid, answer);
        let caller = *caller;
        match answer {
            Answer::Now(r) => Answer::Now(r.and_then(|()| self.entry_of(&path, &caller))),
            Answer::Later(fut) => {
                let this = self.clone();
                Answer::later(async move {
                    fut.await?;
                    this.entry_of(&path, &caller)
                })
            }
        }
    }

    /// `mv`, `ln` and `ln -s` in `dir`: names in the tree are given by what they stand for,
    /// so each is refused with EPERM and a sentence in `dir`'s error file.
    pub fn refuse_naming<X>(&self, dir: u64, what: &str, name: &str, caller: &Caller) -> Answer<X> {
        let e = FsError::new(
            Errno::Perm,
            format!("{name}: {what} is not possible here: names in this tree stand for cluster objects"),
        );
        self.fail(dir, caller, e)
    }

    fn fail<X>(&self, dir: u64, caller: &Caller, e: FsError) -> Answer<X> {
        if let Ok(p) = self.resolve(dir) {
            self.errors.record(p, caller.uid, &e);
        }
        Answer::Now(Err(e))
    }

    /// Records a failure of `answer` in `dir`'s error book, now or when it completes; a
    /// success drops cached renders so the next read shows what the change did.
    fn recorded<X: Send + 'static>(self: &Arc<Self>, dir: PathBuf, uid: u32, answer: Answer<X>) -> Answer<X> {
        let this = self.clone();
        answer.then(move |r| this.settle(&dir, uid, r))
    }

    fn settle<X>(&self, dir: &PathBuf, uid: u32, r: Result<X>) -> Result<X> {
        if r.is_ok() {
            self.renders.clear();
        }
        self.note_failure(dir, uid, r)
    }

    /// A failed open (a ping to a down node) is also the reader's last failure there.
    fn note_failure<X>(&self, dir: &PathBuf, uid: u32, r: Result<X>) -> Result<X> {
        if let Err(e) = &r
            && e.errno != Errno::Again
        {
            self.errors.record(dir.clone(), uid, e);
        }
        r
    }
}

fn slice(bytes: &[u8], offset: u64, size: u32) -> Vec<u8> {
    let start = usize::try_from(offset).unwrap_or(usize::MAX).min(bytes.len());
    let end = start.saturating_add(size as usize).min(bytes.len());
    bytes[start..end].to_vec()
}

fn parent_of(path: &PathBuf) -> PathBuf {
    if path.is_empty() { path.clone() } else { Arc::from(path[..path.len() - 1].to_vec()) }
}

fn refs(path: &[String]) -> Vec<&str> {
    path.iter().map(String::as_str).collect()
}

pub const ROOT_INO: u64 = ROOT;
