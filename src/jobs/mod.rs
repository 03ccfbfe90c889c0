//! Jobs as both sides see them: the spec users write, and what the head asks an agent to run.

pub mod copy;
pub mod spec;

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

pub use spec::{Isolate, Spec, SpecError};

/// One execution of a job on one node, as the head asks an agent for it. `run` is unique
/// for ever: the agent starts a given run at most once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Run {
    pub run: u64,
    pub script: String,
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    pub user: String,
    /// Every variable the job gets besides HOME, USER, LOGNAME, PATH, SHELL.
    pub env: BTreeMap<String, String>,
    pub cwd: Option<String>,
    pub timeout_s: Option<u64>,
    pub isolate: Isolate,
    pub rootfs: Option<String>,
    pub cpus: u32,
    pub mem: Option<u64>,
    /// A copy run: instead of a script, the node takes the file from its relay parent to `dest`.
    #[serde(default)]
    pub copy: Option<String>,
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exit {
    /// The exit code, or 128 + signal when killed by a signal (as shells report it).
    pub code: i32,
    pub signal: Option<i32>,
    /// Why clusterfs ended it, when it did: `timeout`, `killed by <user>`, `failed to start: ...`.
    pub reason: Option<String>,
}

/// An agent's account of a run it knows, sent when it (re)connects.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunStatus {
    pub run: u64,
    /// Bytes of stdout and stderr written so far.
    pub len: [u64; 2],
    pub exit: Option<Exit>,
}

/// Output streams of a run, as numbered in bulk frames.
pub const STDOUT: u64 = 0;
pub const STDERR: u64 = 1;

/// The bulk-frame stream id of a run's stdout or stderr.
pub fn stream_id(run: u64, stream: u64) -> u64 {
    (run << 1) | (stream & 1)
}

/// The run and stream of a bulk-frame stream id.
pub fn split_stream(id: u64) -> (u64, u64) {
    (id >> 1, id & 1)
}

/// Up to `len` bytes of `path` from `offset`: a slice of an output file, on either side.
pub fn read_at(path: &std::path::Path, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path)?;
    f.seek(SeekFrom::Start(offset))?;
    let mut buf = Vec::with_capacity(len.min(1 << 20));
    f.take(len as u64).read_to_end(&mut buf)?;
    Ok(buf)
}

/// [`read_at`] of a spooled log (a job's output, a VM's console), which reads as empty until
/// its first byte is spooled.
pub fn read_spooled(path: &std::path::Path, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
    match read_at(path, offset, len) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        other => other,
    }
}

/// Marks `dir` as a top of unrelated trees for ext4 (`chattr +T`), so each subdirectory (a
/// run's on a node, a job's spool on the head) and its files go to a block group of their own:
/// hundreds of runs a second make and free thousands of inodes, and an ext4 without a journal
/// scans past every inode freed in the last minute in the group it allocates from. Other
/// filesystems refuse the flag, which changes nothing.
pub fn spread_subdirectories(dir: &Path) {
    /// `FS_TOPDIR_FL` of linux/fs.h.
    const TOPDIR: libc::c_long = 0x0002_0000;
    let Ok(f) = std::fs::File::open(dir) else { return };
    let fd = std::os::fd::AsRawFd::as_raw_fd(&f);
    let mut flags: libc::c_long = 0;
    // SAFETY: FS_IOC_GETFLAGS and FS_IOC_SETFLAGS read and write one long, which lives for the calls.
    unsafe {
        if libc::ioctl(fd, libc::FS_IOC_GETFLAGS, &mut flags) == 0 && flags & TOPDIR == 0 {
            flags |= TOPDIR;
            libc::ioctl(fd, libc::FS_IOC_SETFLAGS, &flags);
        }
    }
}
