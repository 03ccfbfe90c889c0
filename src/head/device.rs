//! The loop device the tree is mounted on, so that its identity outlives a head restart.
//!
//! An NFS server puts the exported filesystem's identity in every file handle. A plain FUSE
//! mount has none of its own: it gets whichever anonymous device number is free, so a
//! restarted head's mount may differ, and every handle a login host holds goes stale. Mounted
//! as `fuseblk` on a loop device of a small ext2 image in the state directory, the mount has
//! that image's UUID, the same at every start (nfs-ganesha takes a device's UUID first).
//! Heads sharing an etcd store give their images the cluster's one UUID, so a handle taken
//! through one head's export holds through another's.

use std::path::{Path, PathBuf};

use tracing::info;

use crate::images::{check, command};

/// The image's name in the state directory.
const IMAGE: &str = "mount.img";
/// Large enough for mkfs.ext2, small enough to go unnoticed.
const IMAGE_BYTES: u64 = 1 << 20;

/// Attaches the state directory's mount image to a free loop device, making the image the
/// first time, with filesystem UUID `uuid` when one is given; returns the device.
pub fn attach(state_dir: &Path, uuid: Option<&str>) -> Result<PathBuf, String> {
    let image = state_dir.join(IMAGE);
    if !image.exists() {
        make_image(&image)?;
    }
    if let Some(uuid) = uuid {
        check(command("tune2fs", &["-U", uuid, &image.to_string_lossy()])?, "tune2fs -U")?;
    }
    let out = command("losetup", &["--find", "--show", &image.to_string_lossy()])?;
    check(out.clone(), "losetup --find")?;
    let device = PathBuf::from(out.2.trim());
    info!(device = %device.display(), image = %image.display(), "mount device attached");
    Ok(device)
}

/// Detaches `device` once nothing uses it: called right after the mount, it makes the kernel
/// free the device when the mount goes, even after a crash.
pub fn release(device: &Path) -> Result<(), String> {
    check(command("losetup", &["--detach", &device.to_string_lossy()])?, "losetup --detach")
}

/// A fresh random UUID, as mkfs prints them.
pub fn new_uuid() -> String {
    let b: [u8; 16] = rand::random();
    let h = hex::encode(b);
    format!("{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..])
}

/// Makes a fresh ext2 image (with a random UUID) and puts it in place whole.
fn make_image(image: &Path) -> Result<(), String> {
    let tmp = image.with_extension("img.new");
    let file = std::fs::File::create(&tmp).map_err(|e| format!("cannot make {}: {e}", tmp.display()))?;
    file.set_len(IMAGE_BYTES).map_err(|e| format!("cannot size {}: {e}", tmp.display()))?;
    drop(file);
    check(command("mkfs.ext2", &["-q", "-F", "-L", "clusterfs", &tmp.to_string_lossy()])?, "mkfs.ext2")?;
    std::fs::rename(&tmp, image).map_err(|e| format!("cannot place {}: {e}", image.display()))
}
