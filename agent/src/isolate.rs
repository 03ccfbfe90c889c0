//! Job isolation on the node: namespaces, a root filesystem, and cgroup limits (v1 or v2).

use clusterfs::jobs::Run;
use std::ffi::CString;
use std::fs;
use std::path::{Path, PathBuf};

/// Where the job's limits live: one cgroup per run in each controller used.
#[derive(Debug)]
pub struct Cgroup {
    /// (controller directory, whether it is the memory controller) — v1 has one per controller,
    /// v2 one directory for all.
    dirs: Vec<PathBuf>,
    memory: Option<PathBuf>,
    v2: bool,
}

const ROOT: &str = "/sys/fs/cgroup";
/// CFS period used for `cpus` quotas, in microseconds.
const PERIOD_US: u64 = 100_000;

impl Cgroup {
    /// Makes the run's cgroup with a quota of `cpus` and a limit of `mem`, each when given,
    /// and moves the calling process into it (the job, forked after, inherits it). None when
    /// there is no limit to set or the node has no usable controller.
    pub fn create(run: u64, cpus: Option<u32>, mem: Option<u64>) -> std::io::Result<Option<Cgroup>> {
        if cpus.is_none() && mem.is_none() {
            return Ok(None);
        }
        // The shim's pid keeps names unique on a machine serving several node names.
        let name = format!("clusterfs/run-{run}-{}", std::process::id());
        let quota = |cpus: u32| u64::from(cpus) * PERIOD_US;
        let v2 = fs::read_to_string(Path::new(ROOT).join("cgroup.controllers"))
            .is_ok_and(|c| c.split_whitespace().any(|x| x == "memory") && c.split_whitespace().any(|x| x == "cpu"));
        let me = std::process::id().to_string();
        if v2 {
            let dir = Path::new(ROOT).join(&name);
            // Children of the parent need the controllers enabled.
            let parent = Path::new(ROOT).join("clusterfs");
            fs::create_dir_all(&parent)?;
            let _ = fs::write(Path::new(ROOT).join("cgroup.subtree_control"), "+cpu +memory");
            let _ = fs::write(parent.join("cgroup.subtree_control"), "+cpu +memory");
            fs::create_dir_all(&dir)?;
            if let Some(c) = cpus {
                fs::write(dir.join("cpu.max"), format!("{} {PERIOD_US}", quota(c)))?;
            }
            if let Some(m) = mem {
                fs::write(dir.join("memory.max"), m.to_string())?;
                let _ = fs::write(dir.join("memory.swap.max"), "0");
            }
            fs::write(dir.join("cgroup.procs"), &me)?;
            return Ok(Some(Cgroup { dirs: vec![dir.clone()], memory: Some(dir), v2 }));
        }
        let cpu = Path::new(ROOT).join("cpu");
        let memory = Path::new(ROOT).join("memory");
        if !cpu.join("cpu.cfs_quota_us").exists() && !memory.join("memory.limit_in_bytes").exists() {
            return Ok(None);
        }
        let mut cg = Cgroup { dirs: Vec::new(), memory: None, v2 };
        if let Some(c) = cpus.filter(|_| cpu.join("cpu.cfs_quota_us").exists()) {
            let dir = cpu.join(&name);
            fs::create_dir_all(&dir)?;
            fs::write(dir.join("cpu.cfs_period_us"), PERIOD_US.to_string())?;
            fs::write(dir.join("cpu.cfs_quota_us"), quota(c).to_string())?;
            fs::write(dir.join("cgroup.procs"), &me)?;
            cg.dirs.push(dir);
        }
        // v1 keeps a hierarchy per controller: a job without a memory limit needs no second
        // cgroup, whose making and removal every run would pay for nothing.
        if let Some(m) = mem.filter(|_| memory.join("memory.limit_in_bytes").exists()) {
            let dir = memory.join(&name);
            fs::create_dir_all(&dir)?;
            fs::write(dir.join("memory.limit_in_bytes"), m.to_string())?;
            // No swap beyond the limit, where the kernel accounts swap.
            let _ = fs::write(dir.join("memory.memsw.limit_in_bytes"), m.to_string());
            fs::write(dir.join("cgroup.procs"), &me)?;
            cg.memory = Some(dir.clone());
            cg.dirs.push(dir);
        }
        Ok(Some(cg))
    }

    /// Whether the kernel's OOM killer killed something in this cgroup.
    pub fn oom_killed(&self) -> bool {
        let Some(dir) = &self.memory else { return false };
        let file = if self.v2 { "memory.events" } else { "memory.oom_control" };
        fs::read_to_string(dir.join(file))
            .unwrap_or_default()
            .lines()
            .any(|l| l.strip_prefix("oom_kill ").is_some_and(|n| n.trim() != "0"))
    }

    /// Moves the calling process out and removes the cgroup (retrying while it drains).
    pub fn remove(self) {
        let me = std::process::id().to_string();
        for dir in &self.dirs {
            // The parent of the run's cgroup is `clusterfs/`; its parent is the hierarchy root.
            if let Some(root) = dir.parent().and_then(Path::parent) {
                let _ = fs::write(root.join("cgroup.procs"), &me);
            }
            for _ in 0..50 {
                if fs::remove_dir(dir).is_ok() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
    }
}

/// Puts the calling (single-threaded) process in new PID, IPC and UTS namespaces: its next
/// child is PID 1 of the new PID namespace. The mount namespace is the child's own
/// ([`ChildSetup::apply`]), so the caller keeps its view of the filesystem.
pub fn unshare_namespaces(hostname: &str) -> std::io::Result<()> {
    use nix::sched::CloneFlags;
    nix::sched::unshare(CloneFlags::CLONE_NEWPID | CloneFlags::CLONE_NEWIPC | CloneFlags::CLONE_NEWUTS)?;
    if !hostname.is_empty() {
        nix::unistd::sethostname(hostname)?;
    }
    Ok(())
}

/// In the child that is PID 1 of the job's PID namespace, once it holds the job's identity:
/// forks the job, which returns and goes on to exec, while this process stays the
/// namespace's init. The kernel drops signals an init has no handler for, so a job that was
/// PID 1 itself ignored SIGTERM; under this init the job takes signals as it would anywhere
/// else (both are in the process group the shim signals). The init reaps orphans and, when
/// the job ends, exits with its status (128+N for signal N), which ends the namespace.
///
/// # Safety
/// Call only between fork and exec, in a process that had a single thread when it forked.
pub unsafe fn fork_under_init() -> std::io::Result<()> {
    // SAFETY: the caller guarantees a single-threaded child between fork and exec.
    let job = unsafe { libc::fork() };
    if job < 0 {
        let e = std::io::Error::last_os_error();
        return Err(std::io::Error::new(e.kind(), format!("fork the job under its init: {e}")));
    }
    if job == 0 {
        return Ok(());
    }
    // SAFETY: close_range, waitpid and _exit touch only this process's descriptors, the
    // status word on this stack, and end the process.
    unsafe {
        // Nothing of the job's stays open here: its output files, and the pipe that tells the
        // shim the job's exec went through (it closes on exec; this copy would hold it).
        libc::syscall(libc::SYS_close_range, 0, u32::MAX, 0);
        loop {
            let mut status = 0;
            let pid = libc::waitpid(-1, &mut status, 0);
            if pid == job {
                if libc::WIFEXITED(status) {
                    libc::_exit(libc::WEXITSTATUS(status));
                }
                if libc::WIFSIGNALED(status) {
                    libc::_exit(128 + libc::WTERMSIG(status));
                }
            } else if pid < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                libc::_exit(255);
            }
        }
    }
}

/// Makes the calling thread's file-system identity (fsuid, fsgid and groups) the given one:
/// its file accesses are checked as that user's. Raw system calls: other threads keep theirs.
pub fn set_fs_identity(uid: u32, gid: u32, groups: &[u32]) -> std::io::Result<()> {
    // SAFETY: setgroups reads `groups.len()` gids from a live slice; the raw syscall changes
    // only the calling thread's credentials.
    let rc = unsafe { libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: setfsgid and setfsuid take plain ids and change only this thread's fs identity.
    unsafe {
        libc::setfsgid(gid);
        libc::setfsuid(uid);
    }
    Ok(())
}

/// Runs `f` with the calling thread's file-system identity set to `run`'s user, then puts
/// this process's own back.
fn as_user<T>(run: &Run, f: impl FnOnce() -> T) -> std::io::Result<T> {
    if run.uid == 0 {
        return Ok(f());
    }
    let own: Vec<u32> = nix::unistd::getgroups()?.into_iter().map(|g| g.as_raw()).collect();
    set_fs_identity(run.uid, run.gid, &run.groups)?;
    let out = f();
    set_fs_identity(nix::unistd::geteuid().as_raw(), nix::unistd::getegid().as_raw(), &own)?;
    Ok(out)
}

/// What the child does before exec, prepared before fork so that it only makes system calls.
#[derive(Debug)]
pub struct ChildSetup {
    rootfs: Option<CString>,
    proc_: bool,
}

impl ChildSetup {
    /// Checks `run`'s rootfs as its user sees it: the root enters it as root, so without this a
    /// job could reach a tree under a directory its user may not enter.
    pub fn new(run: &Run, namespaces: bool) -> std::io::Result<ChildSetup> {
        let rootfs = match &run.rootfs {
            Some(r) => {
                let c = CString::new(r.as_str()).map_err(|_| std::io::Error::other("rootfs has a NUL byte"))?;
                let p = Path::new(r);
                let why = as_user(run, || {
                    // SAFETY: `c` is a NUL-terminated path; faccessat reads it only.
                    let rc = unsafe { libc::faccessat(libc::AT_FDCWD, c.as_ptr(), libc::X_OK, libc::AT_EACCESS) };
                    if rc != 0 {
                        Some(format!("{} may not enter it ({})", run.user, std::io::Error::last_os_error()))
                    } else if !p.join("bin/sh").exists() && !p.join("bin/sh").is_symlink() {
                        Some("it has no /bin/sh".to_string())
                    } else if !p.join("proc").is_dir() {
                        Some("it has no /proc directory".to_string())
                    } else {
                        None
                    }
                })?;
                if let Some(why) = why {
                    return Err(std::io::Error::other(format!("rootfs {r}: {why}")));
                }
                Some(c)
            }
            None => None,
        };
        Ok(ChildSetup { rootfs, proc_: namespaces })
    }

    /// In the child, as root, before dropping privileges: enter the root filesystem and mount
    /// a /proc that shows the job's PID namespace.
    ///
    /// # Safety
    /// Call only between fork and exec; it makes system calls on memory prepared before fork.
    pub unsafe fn apply(&self) -> std::io::Result<()> {
        // Each step names itself: the message reaches the job's `state`. (The message is a
        // static string: nothing is allocated here unless a step fails.)
        let step = |rc: libc::c_int, what: &'static str| {
            if rc < 0 {
                let e = std::io::Error::last_os_error();
                Err(std::io::Error::new(e.kind(), format!("{what}: {e}")))
            } else {
                Ok(())
            }
        };
        if !self.proc_ && self.rootfs.is_none() {
            return Ok(());
        }
        // SAFETY: every pointer is a NUL-terminated string that lives in `self` or is static.
        unsafe {
            // A mount namespace of the job's own: its /proc and root change nothing outside,
            // and the node's unmounts reach it (slave, not private): an image unmounted on the
            // node is gone here too, or its umount fails with EBUSY while the job uses it.
            step(libc::unshare(libc::CLONE_NEWNS), "unshare the mount namespace")?;
            step(
                libc::mount(
                    std::ptr::null(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_SLAVE,
                    std::ptr::null(),
                ),
                "make mounts slaves of the node's",
            )?;
            if let Some(root) = &self.rootfs {
                step(
                    libc::mount(
                        root.as_ptr(),
                        root.as_ptr(),
                        std::ptr::null(),
                        libc::MS_BIND | libc::MS_REC,
                        std::ptr::null(),
                    ),
                    "bind the rootfs",
                )?;
                step(libc::chdir(root.as_ptr()), "enter the rootfs")?;
                let dot = c".".as_ptr();
                step(libc::syscall(libc::SYS_pivot_root, dot, dot) as libc::c_int, "pivot_root")?;
                step(libc::umount2(dot, libc::MNT_DETACH), "detach the old root")?;
                step(libc::chdir(c"/".as_ptr()), "chdir /")?;
                // The tree is the user's choice: a set-user-id program in it (with its own
                // /etc/passwd beside it) must not make the job root. Nor may anything it runs.
                step(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "set no_new_privs")?;
            }
            let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
            step(
                libc::mount(c"proc".as_ptr(), c"/proc".as_ptr(), c"proc".as_ptr(), flags, std::ptr::null()),
                "mount /proc",
            )?;
        }
        Ok(())
    }
}
