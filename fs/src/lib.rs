//! clusterfs-fs: a synthetic filesystem over fuser that knows files, not clusters.
//!
//! A user of this crate implements [`Tree`]; [`mount`] serves it with the rules that make
//! `cat`, `echo`, `tail -f` and an NFS re-export behave: true sizes, snapshots at open,
//! append-only logs, control files acting on write, stable inode numbers and readdir
//! cookies, and no FUSE thread ever waiting on the network.

mod error;
mod errors;
mod fs;
mod fuse;
mod inodes;
mod tree;

use std::io;
use std::path::Path;
use std::sync::Arc;

pub use crate::error::{Errno, FsError, Result};
pub use crate::fs::{Chattr, Config, DirEntry, Entry, ROOT_INO, SynthFs};
pub use crate::tree::{Answer, Caller, Kind, Node, Tree, Write};
pub use fuser::FileType;

/// A mounted filesystem; dropping it unmounts.
pub struct Mount {
    session: Option<fuser::BackgroundSession>,
    /// Set when this crate made the mount itself (on a device): fuser does not unmount it.
    own: Option<std::path::PathBuf>,
}

impl std::fmt::Debug for Mount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Mount")
    }
}

impl Mount {
    /// Whether the mount is gone from under its threads (`umount` by someone else), so that
    /// they have ended.
    pub fn is_gone(&self) -> bool {
        self.session.as_ref().is_some_and(|s| s.guard.is_finished())
    }

    /// Unmounts and waits for the FUSE threads to end.
    pub fn unmount(mut self) -> io::Result<()> {
        self.end()
    }

    fn end(&mut self) -> io::Result<()> {
        let Some(session) = self.session.take() else { return Ok(()) };
        if let Some(path) = self.own.take() {
            // The threads end when the kernel closes the connection, at unmount; a mount still
            // in use is left to the caller, and its threads keep serving it.
            if let Err(e) = nix::mount::umount(&path) {
                self.session = Some(session);
                self.own = Some(path);
                return Err(e.into());
            }
        }
        // The kernel ends the threads' reads when the last reference to the mount goes. A
        // process in a mount namespace of its own made while the tree was mounted (a job with
        // isolate=ns) holds a copy of it until that process ends: the unmount is done here,
        // the threads are not waited for past JOIN_WAIT (the process exits without them).
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = done_tx.send(session.umount_and_join());
        });
        match done_rx.recv_timeout(JOIN_WAIT) {
            Ok(result) => result,
            Err(_) => {
                tracing::warn!(
                    waited_ms = JOIN_WAIT.as_millis() as u64,
                    "unmounted, but another mount namespace (a running job's) still holds the mount: not waiting for it"
                );
                Ok(())
            }
        }
    }
}

/// How long an unmount waits for the FUSE threads to end.
const JOIN_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

impl Drop for Mount {
    fn drop(&mut self) {
        if self.end().is_err()
            && let Some(path) = self.own.take()
        {
            let _ = nix::mount::umount2(&path, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

/// Mounts `fs` at `mountpoint`: `allow_other`, `default_permissions`, several FUSE threads.
/// Slow answers run on `rt`.
pub fn mount<T: Tree>(fs: Arc<SynthFs<T>>, mountpoint: &Path, rt: tokio::runtime::Handle) -> io::Result<Mount> {
    let mut cfg = fuser::Config::default();
    cfg.mount_options = vec![
        fuser::MountOption::FSName(fs.config().fsname.clone()),
        fuser::MountOption::Subtype("clusterfs".into()),
        fuser::MountOption::DefaultPermissions,
        fuser::MountOption::NoDev,
        fuser::MountOption::NoSuid,
        fuser::MountOption::NoAtime,
    ];
    cfg.acl = fuser::SessionACL::All;
    cfg.n_threads = Some(fs.config().threads.max(1));
    let adapter = fuse::Adapter { fs: fs.clone(), rt };
    let (session, own) = match &fs.config().device {
        None => (fuser::Session::new(adapter, mountpoint, &cfg)?, None),
        Some(device) => {
            let fd = mount_on_device(device, mountpoint)?;
            match fuser::Session::from_fd(adapter, fd, cfg.acl, cfg) {
                Ok(s) => (s, Some(mountpoint.to_path_buf())),
                Err(e) => {
                    let _ = nix::mount::umount2(mountpoint, nix::mount::MntFlags::MNT_DETACH);
                    return Err(e);
                }
            }
        }
    };
    fs.set_notifier(session.notifier());
    let session = session.spawn()?;
    Ok(Mount { session: Some(session), own })
}

/// Mounts a FUSE connection at `mountpoint` as `fuseblk` on `device`, with the options
/// [`mount`] gives fuser; returns the connection's descriptor.
fn mount_on_device(device: &Path, mountpoint: &Path) -> io::Result<std::os::fd::OwnedFd> {
    use nix::mount::MsFlags;
    let fuse = std::fs::OpenOptions::new().read(true).write(true).open("/dev/fuse")?;
    let fd = std::os::fd::AsRawFd::as_raw_fd(&fuse);
    let data = format!(
        "fd={fd},rootmode=40000,user_id={},group_id={},default_permissions,allow_other,blksize=4096",
        nix::unistd::getuid(),
        nix::unistd::getgid()
    );
    let flags = MsFlags::MS_NODEV | MsFlags::MS_NOSUID | MsFlags::MS_NOATIME;
    nix::mount::mount(Some(device), mountpoint, Some("fuseblk.clusterfs"), flags, Some(data.as_str())).map_err(
        |e| io::Error::new(io::Error::from(e).kind(), format!("mounting fuseblk on {}: {e}", device.display())),
    )?;
    Ok(fuse.into())
}
