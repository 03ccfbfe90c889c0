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
}

impl std::fmt::Debug for Mount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Mount")
    }
}

impl Mount {
    /// Unmounts and waits for the FUSE threads to end.
    pub fn unmount(mut self) -> io::Result<()> {
        match self.session.take() {
            Some(s) => s.umount_and_join(),
            None => Ok(()),
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Some(s) = self.session.take() {
            let _ = s.umount_and_join();
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
    let session = fuser::Session::new(adapter, mountpoint, &cfg)?;
    fs.set_notifier(session.notifier());
    let session = session.spawn()?;
    Ok(Mount { session: Some(session) })
}
