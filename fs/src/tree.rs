//! What a filesystem built on this crate implements: a tree of typed nodes addressed by path.

use std::future::Future;
use std::pin::Pin;
use std::time::SystemTime;

use crate::error::Result;

/// How a file behaves; the layer applies the rules of each kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Dir,
    /// Rendered whole into the handle at open; reads slice that snapshot.
    Snapshot,
    /// Grows only; served live at any offset, its size always the current length.
    Log,
    /// Acts on each write. Reads like a snapshot until the handle writes; from then on a
    /// read on that handle gives what the writes answered.
    Control,
    /// The caller's last failure in this directory, kept by the layer.
    Error,
    /// Like a snapshot, but rendering may wait (`wait`); EAGAIN at once under O_NONBLOCK.
    Blocking,
}

impl Kind {
    pub fn is_dir(self) -> bool {
        self == Kind::Dir
    }
}

/// One object of the tree as `stat` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    pub kind: Kind,
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    pub mtime: SystemTime,
    /// The length, for `Log` files (snapshots are sized by rendering them).
    pub size: u64,
    /// Changes when an object is recreated under the same path, so old NFS handles go stale.
    pub generation: u64,
}

impl Node {
    /// A node owned by root.
    pub fn new(kind: Kind, perm: u16) -> Node {
        Node { kind, perm, uid: 0, gid: 0, mtime: SystemTime::UNIX_EPOCH, size: 0, generation: 0 }
    }

    pub fn dir() -> Node {
        Node::new(Kind::Dir, 0o755)
    }

    pub fn owned(mut self, uid: u32, gid: u32) -> Node {
        self.uid = uid;
        self.gid = gid;
        self
    }

    pub fn mtime(mut self, mtime: SystemTime) -> Node {
        self.mtime = mtime;
        self
    }

    pub fn size(mut self, size: u64) -> Node {
        self.size = size;
        self
    }
}

/// Who is asking, from the FUSE request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
}

impl Caller {
    pub const ROOT: Caller = Caller { uid: 0, gid: 0, pid: 0 };

    pub fn is_root(&self) -> bool {
        self.uid == 0
    }
}

/// A result now, or a future the layer finishes from a task so no FUSE thread waits.
pub enum Answer<T> {
    Now(Result<T>),
    Later(Pin<Box<dyn Future<Output = Result<T>> + Send + 'static>>),
}

impl<T> Answer<T> {
    pub fn later(f: impl Future<Output = Result<T>> + Send + 'static) -> Answer<T> {
        Answer::Later(Box::pin(f))
    }

    /// `f` applied to the result, now or when it comes.
    pub fn then<U>(self, f: impl FnOnce(Result<T>) -> Result<U> + Send + 'static) -> Answer<U>
    where
        T: 'static,
    {
        match self {
            Answer::Now(r) => Answer::Now(f(r)),
            Answer::Later(fut) => Answer::later(async move { f(fut.await) }),
        }
    }

    /// The result, waited for if it comes later.
    pub async fn finish(self) -> Result<T> {
        match self {
            Answer::Now(r) => r,
            Answer::Later(fut) => fut.await,
        }
    }
}

impl<T> From<Result<T>> for Answer<T> {
    fn from(r: Result<T>) -> Answer<T> {
        Answer::Now(r)
    }
}

impl<T> std::fmt::Debug for Answer<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Answer::Now(_) => "Answer::Now",
            Answer::Later(_) => "Answer::Later",
        })
    }
}

/// One write into a control file.
#[derive(Debug)]
pub struct Write<'a> {
    /// The open handle, stable for the life of the open: later writes continue the first.
    pub handle: u64,
    pub offset: u64,
    pub data: &'a [u8],
}

/// The tree a synthetic filesystem serves. Paths are the components below the mount root.
///
/// Methods that return a plain `Result` must be quick and never wait on the network or disk;
/// anything slower returns `Answer::Later`. The one exception is a tree whose `node` and `list`
/// are answered elsewhere (a following head's): it says so with `remote`, and the layer then
/// calls them off its FUSE threads.
pub trait Tree: Send + Sync + 'static {
    /// Whether answering for `path` (its `node`, `list`, and what it holds at open) may wait
    /// on the network.
    fn remote(&self, _path: &[&str]) -> bool {
        false
    }

    /// The object at `path`, or ENOENT.
    fn node(&self, path: &[&str]) -> Result<Node>;

    /// The names in directory `path`.
    fn list(&self, path: &[&str]) -> Result<Vec<String>>;

    /// The content of a `Snapshot`, `Control` or `Blocking` file for `caller`.
    fn render(&self, path: &[&str], caller: &Caller, nonblock: bool) -> Answer<Vec<u8>>;

    /// Up to `size` bytes of a `Log` file from `offset`.
    fn read_log(&self, path: &[&str], caller: &Caller, offset: u64, size: u32) -> Answer<Vec<u8>> {
        let _ = (path, caller, offset, size);
        Answer::Now(Err(crate::FsError::invalid("not a log file")))
    }

    /// A write into a `Control` file; the answer is appended to what the handle reads back.
    fn write(&self, path: &[&str], caller: &Caller, write: Write<'_>) -> Answer<Vec<u8>>;

    /// What was written on a control handle must be durable: called before its answer is
    /// read back and when the handle is closed (`close(2)` waits for it).
    fn flush(&self, path: &[&str], caller: &Caller, handle: u64) -> Answer<()> {
        let _ = (path, caller, handle);
        Answer::Now(Ok(()))
    }

    /// The writer of a control handle closed it.
    fn release(&self, path: &[&str], caller: &Caller, handle: u64) {
        let _ = (path, caller, handle);
    }

    /// `mkdir`: makes the object the directory stands for.
    fn mkdir(&self, path: &[&str], caller: &Caller, mode: u32) -> Answer<()> {
        let _ = (path, caller, mode);
        Answer::Now(Err(crate::FsError::new(crate::Errno::Perm, "directories cannot be made here")))
    }

    fn rmdir(&self, path: &[&str], caller: &Caller) -> Answer<()> {
        let _ = (path, caller);
        Answer::Now(Err(crate::FsError::new(crate::Errno::Perm, "this directory cannot be removed")))
    }

    /// Makes a new file (not a control file that exists already: the layer opens those).
    fn create(&self, path: &[&str], caller: &Caller, mode: u32) -> Answer<()> {
        let _ = (path, caller, mode);
        Answer::Now(Err(crate::FsError::new(crate::Errno::Perm, "files cannot be made here")))
    }

    fn unlink(&self, path: &[&str], caller: &Caller) -> Answer<()> {
        let _ = (path, caller);
        Answer::Now(Err(crate::FsError::new(crate::Errno::Perm, "this file cannot be removed")))
    }

    /// `chmod` of a file the caller just created (an NFS server sets the mode its client
    /// asked for after an exclusive create); modes are otherwise clusterfs's.
    fn chmod(&self, path: &[&str], caller: &Caller, mode: u32) -> crate::Result<()> {
        let _ = (path, caller, mode);
        Err(crate::FsError::fixed_modes())
    }
}
