//! End-to-end tests: a real FUSE mount, real agent processes, plain files.
//!
//! They need root and /dev/fuse. Under CI=true a missing /dev/fuse fails the suite;
//! elsewhere the tests that need it are skipped with a message.

mod copy;
mod etcd;
mod faults;
mod fsrules;
mod groups;
mod harness;
mod hostile;
mod hsm;
mod images;
mod jobs;
mod load;
mod multinode;
mod net;
mod nfs;
mod nodes;
mod nodeset;
mod protocol;
mod queueing;
mod vms;

/// Whether mount tests can run here; panics under CI when they cannot.
pub fn can_mount() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let fuse = std::path::Path::new("/dev/fuse").exists();
    if root && fuse {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("CI=true but mount tests cannot run (root: {root}, /dev/fuse: {fuse})");
    }
    eprintln!("skipping: mount tests need root and /dev/fuse");
    false
}
