//! The fuser adapter: converts kernel requests, calls [`SynthFs`], replies. No logic of its own.

use std::ffi::OsStr;
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use fuser::{
    BsdFileFlags, Errno as FuseErrno, FileHandle, Filesystem, FopenFlags, Generation, INodeNo, InitFlags, KernelConfig,
    LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry,
    ReplyOpen, ReplyWrite, Request, TimeOrNow, WriteFlags,
};
use tokio::runtime::Handle;
use tracing::{debug, debug_span, warn};

use crate::error::FsError;
use crate::fs::{Entry, SynthFs};
use crate::tree::{Answer, Caller, Tree};

/// Logs a failed request at its level and replies with its errno.
macro_rules! fuse_error {
    ($op:expr, $reply:expr, $err:expr) => {{
        let err: FsError = $err;
        if err.is_routine() {
            debug!(op = $op, error = %err, "request failed");
        } else {
            warn!(op = $op, error = %err, "request failed");
        }
        $reply.error(FuseErrno::from_i32(err.errno.code()));
    }};
}

pub struct Adapter<T: Tree> {
    pub fs: Arc<SynthFs<T>>,
    pub rt: Handle,
}

impl<T: Tree> Adapter<T> {
    /// Runs a request inside the runtime (so the tree may spawn tasks) and contains a panic
    /// to that request: its reply is dropped, which answers EIO, and the FUSE thread lives.
    fn guard(&self, op: &'static str, f: impl FnOnce()) {
        let _rt = self.rt.enter();
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).is_err() {
            tracing::error!(op, "request handler panicked; answered EIO");
        }
    }

    /// Runs `f` (which answers a request about `ino`, or `name` in it) on this FUSE thread;
    /// or, when the tree's answer may wait on the network, on the runtime's blocking pool, so
    /// no FUSE thread waits.
    fn run(
        &self,
        op: &'static str,
        (ino, name): (u64, Option<&OsStr>),
        f: impl FnOnce(&Arc<SynthFs<T>>, &Handle) + Send + 'static,
    ) {
        let (fs, rt) = (self.fs.clone(), self.rt.clone());
        if !fs.remote(ino, name.and_then(OsStr::to_str)) {
            return self.guard(op, || f(&fs, &rt));
        }
        self.rt.spawn_blocking(move || {
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&fs, &rt))).is_err() {
                tracing::error!(op, "request handler panicked; answered EIO");
            }
        });
    }
}

/// Replies now, or from a task of `rt` once a slow answer is ready.
fn answer<X: Send + 'static>(rt: &Handle, a: Answer<X>, reply: impl FnOnce(crate::Result<X>) + Send + 'static) {
    match a {
        Answer::Now(r) => reply(r),
        Answer::Later(fut) => {
            rt.spawn(async move { reply(fut.await) });
        }
    }
}

impl<T: Tree> Adapter<T> {
    /// An operation on a name in `parent` that answers with an entry (mknod, mkdir).
    fn entry_op(&self, op: &'static str, name: &OsStr, reply: ReplyEntry, f: impl FnOnce(&str) -> Answer<Entry>) {
        match name_str(name) {
            Ok(n) => answer(&self.rt, f(n), move |r| match r {
                Ok(e) => reply.entry(&e.ttl, &e.attr, Generation(e.generation)),
                Err(e) => fuse_error!(op, reply, e),
            }),
            Err(e) => fuse_error!(op, reply, e),
        }
    }

    /// An operation on a name in `parent` that answers with nothing (unlink, rmdir).
    fn empty_op(&self, op: &'static str, name: &OsStr, reply: ReplyEmpty, f: impl FnOnce(&str) -> Answer<()>) {
        match name_str(name) {
            Ok(n) => answer(&self.rt, f(n), move |r| match r {
                Ok(()) => reply.ok(),
                Err(e) => fuse_error!(op, reply, e),
            }),
            Err(e) => fuse_error!(op, reply, e),
        }
    }
}

fn caller(req: &Request) -> Caller {
    Caller { uid: req.uid(), gid: req.gid(), pid: req.pid() }
}

fn name_str(name: &OsStr) -> Result<&str, FsError> {
    name.to_str().ok_or_else(|| FsError::not_found("a name that is not UTF-8"))
}

impl<T: Tree> Filesystem for Adapter<T> {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // NFS re-export: the kernel may then resolve file handles by LOOKUP of "." and "..".
        if let Err(missing) = config.add_capabilities(InitFlags::FUSE_EXPORT_SUPPORT) {
            warn!(?missing, "kernel lacks export support; NFS re-export will not keep handles");
        }
        // Lookups and listings in one directory may run at once (the layer is safe for it): a
        // slow one, answered elsewhere, does not hold the others back.
        if let Err(missing) = config.add_capabilities(InitFlags::FUSE_PARALLEL_DIROPS) {
            debug!(?missing, "kernel lacks parallel directory operations");
        }
        // `>` truncates within the open (O_TRUNC passed on) instead of a setattr after it.
        if let Err(missing) = config.add_capabilities(InitFlags::FUSE_ATOMIC_O_TRUNC) {
            debug!(?missing, "kernel lacks atomic O_TRUNC");
        }
        Ok(())
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let at = (parent.0, Some(name));
        let (unique, who, name) = (req.unique().0, caller(req), name.to_os_string());
        self.run("lookup", at, move |fs, _| {
            let _s = debug_span!("lookup", req = unique, ino = parent.0, ?name).entered();
            match name_str(&name).and_then(|n| fs.lookup(parent.0, n, &who)) {
                Ok(e) => reply.entry(&e.ttl, &e.attr, Generation(e.generation)),
                Err(e) => fuse_error!("lookup", reply, e),
            }
        });
    }

    fn getattr(&self, req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        let (unique, who) = (req.unique().0, caller(req));
        self.run("getattr", (ino.0, None), move |fs, _| {
            let _s = debug_span!("getattr", req = unique, ino = ino.0).entered();
            match fs.getattr(ino.0, fh.map(|f| f.0), &who) {
                Ok((attr, ttl)) => reply.attr(&ttl, &attr),
                Err(e) => fuse_error!("getattr", reply, e),
            }
        });
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        self.guard("setattr", || {
            let _s = debug_span!("setattr", req = req.unique().0, ino = ino.0, ?size).entered();
            match self.fs.setattr(ino.0, size, crate::fs::Chattr { mode, uid, gid }, &caller(req)) {
                Ok((attr, ttl)) => reply.attr(&ttl, &attr),
                Err(e) => fuse_error!("setattr", reply, e),
            }
        });
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        self.guard("mknod", || {
            let _s = debug_span!("mknod", req = req.unique().0, ino = parent.0, ?name).entered();
            self.entry_op("mknod", name, reply, |n| self.fs.create(parent.0, n, mode, &caller(req)));
        });
    }

    fn mkdir(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, _umask: u32, reply: ReplyEntry) {
        self.guard("mkdir", || {
            let _s = debug_span!("mkdir", req = req.unique().0, ino = parent.0, ?name).entered();
            self.entry_op("mkdir", name, reply, |n| self.fs.mkdir(parent.0, n, mode, &caller(req)));
        });
    }

    fn unlink(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.guard("unlink", || {
            let _s = debug_span!("unlink", req = req.unique().0, ino = parent.0, ?name).entered();
            self.empty_op("unlink", name, reply, |n| self.fs.unlink(parent.0, n, &caller(req)));
        });
    }

    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        _newparent: INodeNo,
        _newname: &OsStr,
        _flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        self.guard("rename", || {
            self.empty_op("rename", name, reply, |n| self.fs.refuse_naming(parent.0, "renaming", n, &caller(req)));
        });
    }

    fn link(&self, req: &Request, _ino: INodeNo, newparent: INodeNo, newname: &OsStr, reply: ReplyEntry) {
        self.guard("link", || {
            self.entry_op("link", newname, reply, |n| {
                self.fs.refuse_naming(newparent.0, "a hard link", n, &caller(req))
            });
        });
    }

    fn symlink(&self, req: &Request, parent: INodeNo, link_name: &OsStr, _target: &Path, reply: ReplyEntry) {
        self.guard("symlink", || {
            self.entry_op("symlink", link_name, reply, |n| {
                self.fs.refuse_naming(parent.0, "a symbolic link", n, &caller(req))
            });
        });
    }

    fn rmdir(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.guard("rmdir", || {
            let _s = debug_span!("rmdir", req = req.unique().0, ino = parent.0, ?name).entered();
            self.empty_op("rmdir", name, reply, |n| self.fs.rmdir(parent.0, n, &caller(req)));
        });
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let (unique, who) = (req.unique().0, caller(req));
        self.run("open", (ino.0, None), move |fs, rt| {
            let _s = debug_span!("open", req = unique, ino = ino.0).entered();
            let nonblock = flags.0 & libc::O_NONBLOCK != 0;
            // O_TRUNC is checked as the setattr the kernel would otherwise send after the open.
            if flags.0 & libc::O_TRUNC != 0
                && let Err(e) = fs.setattr(ino.0, Some(0), crate::fs::Chattr::default(), &who)
            {
                return fuse_error!("open", reply, e);
            }
            // Synthetic files bypass the page cache: sizes change under the kernel's feet. A
            // handle that cannot write has nothing to make durable at close: no FLUSH for it.
            let mut fopen = FopenFlags::FOPEN_DIRECT_IO;
            if flags.0 & libc::O_ACCMODE == libc::O_RDONLY {
                fopen |= FopenFlags::FOPEN_NOFLUSH;
            }
            answer(rt, fs.open(ino.0, nonblock, &who), move |r| match r {
                Ok(fh) => reply.opened(FileHandle(fh), fopen),
                Err(e) => fuse_error!("open", reply, e),
            });
        });
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        self.guard("create", || {
            let _s = debug_span!("create", req = req.unique().0, ino = parent.0, ?name).entered();
            let name = match name_str(name) {
                Ok(n) => n,
                Err(e) => return fuse_error!("create", reply, e),
            };
            let who = caller(req);
            let fs = self.fs.clone();
            let nonblock = flags & libc::O_NONBLOCK != 0;
            let rt = self.rt.clone();
            answer(&self.rt, self.fs.create(parent.0, name, mode, &who), move |r| match r {
                Ok(entry) => {
                    let ino = entry.attr.ino.0;
                    let reply_open = move |r: crate::Result<u64>| match r {
                        Ok(fh) => reply.created(
                            &entry.ttl,
                            &entry.attr,
                            Generation(entry.generation),
                            FileHandle(fh),
                            FopenFlags::FOPEN_DIRECT_IO,
                        ),
                        Err(e) => fuse_error!("create", reply, e),
                    };
                    match fs.open(ino, nonblock, &who) {
                        Answer::Now(r) => reply_open(r),
                        Answer::Later(fut) => {
                            rt.spawn(async move { reply_open(fut.await) });
                        }
                    }
                }
                Err(e) => fuse_error!("create", reply, e),
            });
        });
    }

    fn read(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.guard("read", || {
            let _s = debug_span!("read", req = req.unique().0, ino = ino.0, offset, size).entered();
            answer(&self.rt, self.fs.read_handle(fh.0, offset, size), move |r| match r {
                Ok(data) => reply.data(&data),
                Err(e) => fuse_error!("read", reply, e),
            });
        });
    }

    fn write(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        self.guard("write", || {
            let _s = debug_span!("write", req = req.unique().0, ino = ino.0, offset, len = data.len()).entered();
            answer(&self.rt, self.fs.write(fh.0, offset, data, &caller(req)), move |r| match r {
                Ok(n) => reply.written(n),
                Err(e) => fuse_error!("write", reply, e),
            });
        });
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        self.guard("flush", || {
            answer(&self.rt, self.fs.flush(fh.0), move |r| match r {
                Ok(()) => reply.ok(),
                Err(e) => fuse_error!("flush", reply, e),
            });
        });
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.guard("release", || {
            self.fs.release(fh.0);
            reply.ok();
        });
    }

    fn fsync(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        self.guard("fsync", || {
            reply.ok();
        });
    }

    fn readdir(&self, req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let unique = req.unique().0;
        self.run("readdir", (ino.0, None), move |fs, _| {
            let _s = debug_span!("readdir", req = unique, ino = ino.0, offset).entered();
            match fs.readdir(ino.0, offset) {
                Ok(entries) => {
                    for e in entries {
                        if reply.add(INodeNo(e.ino), e.cookie, e.kind, &e.name) {
                            break;
                        }
                    }
                    reply.ok();
                }
                Err(e) => fuse_error!("readdir", reply, e),
            }
        });
    }

    fn fsyncdir(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        self.guard("fsyncdir", || {
            reply.ok();
        });
    }

    fn getxattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, _size: u32, reply: fuser::ReplyXattr) {
        self.guard("getxattr", || {
            // No extended attributes. ENOSYS, not ENODATA: the kernel then stops asking (it
            // asked for security.capability before every truncation, as of `echo x > ctl`)
            // and answers EOPNOTSUPP itself.
            reply.error(FuseErrno::from_i32(libc::ENOSYS));
        });
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, size: u32, reply: fuser::ReplyXattr) {
        self.guard("listxattr", || if size == 0 { reply.size(0) } else { reply.data(&[]) });
    }

    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        // Not a terminal, not a device: shells probe with TCGETS.
        reply.error(FuseErrno::from_i32(libc::ENOTTY));
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        self.guard("access", || {
            // Permission checks are the kernel's (default_permissions) and the tree's.
            reply.ok();
        });
    }
}
