//! Images on this node: loop devices, fsck, mounts, online growth and the scan for ghost loops.

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use clusterfs::images::{LoopInfo, check, command};
use clusterfs::proto::Reply;
use nix::mount::{MntFlags, MsFlags};
use tracing::{info, warn};

/// The images of this agent process; one operation per image file at a time.
#[derive(Debug, Default)]
pub struct Images {
    busy: Mutex<HashSet<PathBuf>>,
}

/// An image file claimed for one operation until dropped.
#[derive(Debug)]
struct Claim<'a> {
    images: &'a Images,
    path: PathBuf,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        self.images.busy.lock().expect("busy set lock is never poisoned").remove(&self.path);
    }
}

impl Images {
    fn claim(&self, path: &Path) -> Result<Claim<'_>, String> {
        if !self.busy.lock().expect("busy set lock is never poisoned").insert(path.to_path_buf()) {
            return Err(format!("another operation on {} is under way", path.display()));
        }
        Ok(Claim { images: self, path: path.to_path_buf() })
    }

    /// Attaches `path` to a loop device, repairs it if unclean and mounts it at `mountpoint`.
    pub fn mount(&self, path: &Path, mountpoint: &Path) -> Result<Reply, String> {
        let _claim = self.claim(path)?;
        let mounts = mounts();
        let loops = loops();
        if let Some(dev) = mounted_at(&mounts, &loops, path, mountpoint) {
            return Ok(Reply::Mounted { dev, repaired: false });
        }
        if let Some((source, _)) = mounts.iter().find(|(_, at)| at == mountpoint) {
            return Err(format!("{} already has {source} mounted on it", mountpoint.display()));
        }
        // Loop devices of this image that are not mounted are ghosts: they go first.
        for dev in ghosts_of(&mounts, &loops, path) {
            detach(&dev)?;
            warn!(dev, image = %path.display(), "detached a ghost loop device before mounting");
        }
        let out = command("losetup", &["--find", "--show", &path.to_string_lossy()])?;
        if out.0 != 0 {
            return Err(format!("losetup {}: {}", path.display(), out.1.trim()));
        }
        let dev = out.2.trim().to_string();
        let mounted = (|| {
            if let Some(root) = mountpoint.parent() {
                share(root)?;
            }
            let (code, err, _) = command("e2fsck", &["-p", &dev])?;
            if code >= 4 {
                return Err(format!(
                    "fsck found damage it cannot repair by itself (exit {code}): {}; run `fsck` from ctl",
                    err.trim()
                ));
            }
            grow_to_device(&dev)?;
            fs::create_dir_all(mountpoint).map_err(|e| format!("cannot make {}: {e}", mountpoint.display()))?;
            nix::mount::mount(
                Some(dev.as_str()),
                mountpoint,
                Some("ext4"),
                MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
                None::<&str>,
            )
            .map_err(|e| format!("mount {dev} on {}: {e}", mountpoint.display()))?;
            Ok(code != 0)
        })();
        match mounted {
            Ok(repaired) => {
                info!(image = %path.display(), dev, mountpoint = %mountpoint.display(), repaired, "image mounted");
                Ok(Reply::Mounted { dev, repaired })
            }
            Err(e) => {
                // Never leave a loop device behind a failed mount.
                let _ = detach(&dev);
                Err(e)
            }
        }
    }

    /// Unmounts `mountpoint` and detaches every loop device backing `path`. A mount that a
    /// process still uses stays, and the answer says so.
    pub fn umount(&self, path: &Path, mountpoint: &Path) -> Result<Reply, String> {
        let _claim = self.claim(path)?;
        if mounts().iter().any(|(_, at)| at == mountpoint) {
            match nix::mount::umount2(mountpoint, MntFlags::empty()) {
                Ok(()) => {}
                Err(nix::errno::Errno::EBUSY) => {
                    return Ok(Reply::Busy {
                        reason: format!(
                            "{} is in use on this node (a process has a file or directory open there)",
                            mountpoint.display()
                        ),
                    });
                }
                Err(e) => return Err(format!("umount {}: {e}", mountpoint.display())),
            }
        }
        for dev in loops_of(&loops(), path) {
            detach(&dev)?;
        }
        let _ = fs::remove_dir(mountpoint);
        info!(image = %path.display(), mountpoint = %mountpoint.display(), "image unmounted");
        Ok(Reply::Done)
    }

    /// Grows the mounted image `path` to `size` bytes, then its filesystem, online.
    pub fn grow(&self, path: &Path, mountpoint: &Path, size: u64) -> Result<Reply, String> {
        let _claim = self.claim(path)?;
        let Some(dev) = mounted_at(&mounts(), &loops(), path, mountpoint) else {
            return Err(format!("{} is not mounted at {} on this node", path.display(), mountpoint.display()));
        };
        let file = fs::OpenOptions::new().write(true).open(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let len = file.metadata().map_err(|e| e.to_string())?.len();
        if len < size {
            file.set_len(size).map_err(|e| format!("growing {}: {e}", path.display()))?;
        }
        check(command("losetup", &["--set-capacity", &dev])?, "losetup --set-capacity")?;
        let out = command("resize2fs", &[&dev])?;
        if out.0 != 0 && out.1.contains("Permission denied") {
            // The kernel wants CAP_SYS_RESOURCE for online growth; without it the next mount
            // grows the filesystem before mounting it.
            warn!(image = %path.display(), "online resize not permitted here; the filesystem grows at the next mount");
            return Ok(Reply::Later {
                reason: "its filesystem grows at the next mount (online resizing is not permitted on this node)".into(),
            });
        }
        check(out, "resize2fs")?;
        info!(image = %path.display(), size, "image grown online");
        Ok(Reply::Done)
    }

    /// Every loop device backing a `.img` file under one of `volumes`.
    pub fn scan(&self, volumes: &[PathBuf]) -> Vec<LoopInfo> {
        let mounts = mounts();
        loops()
            .into_iter()
            .filter(|(_, file)| {
                let f = strip_deleted(file);
                f.extension().is_some_and(|e| e == "img") && volumes.iter().any(|v| f.starts_with(v))
            })
            .map(|(dev, file)| {
                let mountpoint = mounts.iter().find(|(source, _)| *source == dev).map(|(_, at)| at.clone());
                let used = mountpoint.as_deref().and_then(used_bytes);
                LoopInfo { dev, file, mountpoint, used }
            })
            .collect()
    }

    /// Detaches `dev` if it still backs `path`, is not mounted and no operation here uses it.
    pub fn detach(&self, dev: &str, path: &Path) -> Result<Reply, String> {
        let Ok(_claim) = self.claim(strip_deleted(path)) else {
            return Ok(Reply::Busy { reason: format!("{} is being mounted or unmounted", path.display()) });
        };
        let still = loops().into_iter().any(|(d, f)| d == dev && f == path);
        if !still {
            return Ok(Reply::Done);
        }
        if mounts().iter().any(|(source, _)| source == dev) {
            return Ok(Reply::Busy { reason: format!("{dev} is mounted") });
        }
        detach(dev)?;
        info!(dev, image = %path.display(), "ghost loop device detached");
        Ok(Reply::Done)
    }
}

/// Grows the unmounted filesystem on `dev` to the device's size if the image grew meanwhile.
fn grow_to_device(dev: &str) -> Result<(), String> {
    let (_, _, head) = command("dumpe2fs", &["-h", dev])?;
    let field = |k: &str| head.lines().find_map(|l| l.strip_prefix(k)).and_then(|v| v.trim().parse::<u64>().ok());
    let (Some(blocks), Some(block)) = (field("Block count:"), field("Block size:")) else {
        return Err(format!("cannot read the filesystem size on {dev}"));
    };
    let device = fs::read_to_string(format!("/sys/block/{}/size", dev.trim_start_matches("/dev/")))
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .map_or(0, |sectors| sectors * 512);
    if blocks * block + block > device {
        return Ok(());
    }
    let fsck = command("e2fsck", &["-f", "-p", dev])?;
    if fsck.0 >= 4 {
        return Err(format!("fsck before growing the filesystem failed: {}", fsck.1.trim()));
    }
    check(command("resize2fs", &[dev])?, "resize2fs")?;
    info!(dev, "filesystem grown to its image before mounting");
    Ok(())
}

/// The loop device backing `path` that is mounted at `mountpoint`.
fn mounted_at(mounts: &[(String, PathBuf)], loops: &[(String, PathBuf)], path: &Path, at: &Path) -> Option<String> {
    let devs = loops_of(loops, path);
    mounts.iter().find(|(source, m)| m == at && devs.contains(source)).map(|(source, _)| source.clone())
}

/// Loop devices backing `path` that are mounted nowhere.
fn ghosts_of(mounts: &[(String, PathBuf)], loops: &[(String, PathBuf)], path: &Path) -> Vec<String> {
    loops_of(loops, path).into_iter().filter(|d| !mounts.iter().any(|(s, _)| s == d)).collect()
}

fn loops_of(loops: &[(String, PathBuf)], path: &Path) -> Vec<String> {
    let path = fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    loops.iter().filter(|(_, f)| strip_deleted(f) == path).map(|(d, _)| d.clone()).collect()
}

/// A file the kernel still reads after it was removed is named `<path> (deleted)`.
fn strip_deleted(file: &Path) -> &Path {
    file.to_str().and_then(|s| s.strip_suffix(" (deleted)")).map_or(file, Path::new)
}

/// Attached loop devices and their backing files, from sysfs.
fn loops() -> Vec<(String, PathBuf)> {
    let Ok(entries) = fs::read_dir("/sys/block") else { return Vec::new() };
    let mut out: Vec<(String, PathBuf)> = entries
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            let file = fs::read_to_string(format!("/sys/block/{name}/loop/backing_file")).ok()?;
            Some((format!("/dev/{name}"), PathBuf::from(file.trim_end_matches('\n'))))
        })
        .collect();
    out.sort();
    out
}

/// Mounts in this process's namespace: (source, mount point).
fn mounts() -> Vec<(String, PathBuf)> {
    let text = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let source = l.split_once(" - ")?.1.split(' ').nth(1)?;
            Some((unescape(source), mount_point(l)?))
        })
        .collect()
}

/// Makes `root` (the mount root) a shared mount of its own, once. A job's mount namespace
/// holds a copy of every mount made before it started, as a slave of the mount it copies
/// (agent/src/isolate.rs): under a shared root, an image unmounted here is unmounted in every
/// job's copy too, or the umount fails with EBUSY while a job uses it, so that its loop device
/// is free after it and the image is never left mounted on two nodes.
fn share(root: &Path) -> Result<(), String> {
    fs::create_dir_all(root).map_err(|e| format!("cannot make {}: {e}", root.display()))?;
    let info = fs::read_to_string("/proc/self/mountinfo").map_err(|e| format!("/proc/self/mountinfo: {e}"))?;
    let fail = |what: &str, e: nix::Error| format!("{what} {}: {e}", root.display());
    match mount_at(&info, root) {
        Some(true) => return Ok(()),
        Some(false) => {}
        // Images mounted under it before this agent did this stay where they are.
        None if info.lines().filter_map(mount_point).any(|at| at.starts_with(root)) => {
            warn!(root = %root.display(), "images are mounted under the mount root: it is made shared once they are gone");
            return Ok(());
        }
        None => nix::mount::mount(Some(root), root, None::<&str>, MsFlags::MS_BIND, None::<&str>)
            .map_err(|e| fail("bind", e))?,
    }
    nix::mount::mount(None::<&str>, root, None::<&str>, MsFlags::MS_SHARED, None::<&str>)
        .map_err(|e| fail("make shared", e))?;
    info!(root = %root.display(), "mount root made a shared mount");
    Ok(())
}

/// The mount point of one mountinfo line.
fn mount_point(line: &str) -> Option<PathBuf> {
    line.split(' ').nth(4).map(|at| PathBuf::from(unescape(at)))
}

/// Whether `dir` is a mount point in `mountinfo`, and if so whether its topmost mount is shared.
fn mount_at(mountinfo: &str, dir: &Path) -> Option<bool> {
    mountinfo.lines().rev().find_map(|l| {
        let (left, _) = l.split_once(" - ")?;
        let optional = left.split(' ').skip(6);
        (mount_point(l)? == dir).then(|| optional.clone().any(|f| f.starts_with("shared:")))
    })
}

/// mountinfo writes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|o| u8::from_str_radix(std::str::from_utf8(o).ok()?, 8).ok());
        match (bytes[i], octal) {
            (b'\\', Some(b)) => {
                out.push(b);
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn used_bytes(mountpoint: &Path) -> Option<u64> {
    let s = nix::sys::statvfs::statvfs(mountpoint).ok()?;
    Some((s.blocks() as u64).saturating_sub(s.blocks_free() as u64) * s.fragment_size() as u64)
}

fn detach(dev: &str) -> Result<(), String> {
    check(command("losetup", &["--detach", dev])?, "losetup --detach")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_points_and_their_sharing_are_read_from_mountinfo() {
        let info = "27 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n\
                    40 27 254:0 /m /m rw,relatime - ext4 /dev/vda rw\n\
                    41 40 254:0 /m /m rw,relatime shared:5 - ext4 /dev/vda rw\n\
                    42 27 0:50 / /a\\040b rw master:3 - tmpfs t rw\n";
        assert_eq!(mount_at(info, Path::new("/m")), Some(true), "the topmost mount counts");
        assert_eq!(mount_at(info, Path::new("/a b")), Some(false));
        assert_eq!(mount_at(info, Path::new("/x")), None);
    }

    #[test]
    fn mountinfo_names_are_unescaped_and_deleted_files_matched() {
        assert_eq!(unescape("/mnt/a\\040b"), "/mnt/a b");
        assert_eq!(unescape("/x\\\\y"), "/x\\\\y");
        assert_eq!(unescape("/x\\134y"), "/x\\y");
        assert_eq!(strip_deleted(Path::new("/v/a.img (deleted)")), Path::new("/v/a.img"));
        assert_eq!(strip_deleted(Path::new("/v/a.img")), Path::new("/v/a.img"));
        let loops = vec![("/dev/loop3".to_string(), PathBuf::from("/nonexistent/v/a.img"))];
        let mounts = vec![("/dev/loop3".to_string(), PathBuf::from("/m/a"))];
        assert_eq!(
            mounted_at(&mounts, &loops, Path::new("/nonexistent/v/a.img"), Path::new("/m/a")).as_deref(),
            Some("/dev/loop3")
        );
        assert!(ghosts_of(&mounts, &loops, Path::new("/nonexistent/v/a.img")).is_empty());
        assert_eq!(ghosts_of(&[], &loops, Path::new("/nonexistent/v/a.img")), ["/dev/loop3"]);
    }
}
