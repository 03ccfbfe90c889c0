//! The per-run supervisor (`clusterfs-agent --shim DIR`): starts the job as its user, waits,
//! enforces the timeout and writes `exit.json`. It outlives agent restarts.

use std::ffi::CString;
use std::fs;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clusterfs::jobs::{Exit, Isolate, Run};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::{Gid, Pid, Uid, User};

use crate::isolate::{Cgroup, ChildSetup, unshare_namespaces};
use crate::runner::{pending_signal, record_job, write_exit};

/// Between a kill's SIGTERM and its SIGKILL, as the head waits for a running job.
const KILL_AFTER_TERM: Duration = Duration::from_secs(1);

/// Grace between SIGTERM and SIGKILL when a run times out or ends with children left.
const GRACE: Duration = Duration::from_secs(2);

/// Runs the shim for the run in `dir`; returns the process exit code.
pub fn main(dir: &Path) -> i32 {
    // Known as this run's supervisor before anything else, even if the agent stops right now.
    let _ = crate::runner::record_shim(dir, std::process::id());
    let run: Run = match fs::read(dir.join("run.json")).ok().and_then(|b| serde_json::from_slice(&b).ok()) {
        Some(r) => r,
        None => {
            let exit = Exit { code: 127, signal: None, reason: Some("failed to start: run.json unreadable".into()) };
            let _ = write_exit(dir, &exit);
            return 1;
        }
    };
    let exit = execute(dir, &run).unwrap_or_else(|e| Exit {
        code: 127,
        signal: None,
        reason: Some(format!("failed to start: {e}")),
    });
    match write_exit(dir, &exit) {
        Ok(()) => 0,
        Err(_) => 1,
    }
}

fn execute(dir: &Path, run: &Run) -> std::io::Result<Exit> {
    // Limits first: the shim joins the run's cgroup and the job, forked next, inherits it. A
    // plain process (`isolate=none`) has no CPU quota, so one without a memory limit has no
    // cgroup: a thousand short runs at once, each in a CPU group of its own, cost the
    // scheduler more than the runs.
    let namespaces = run.isolate == Isolate::Ns;
    let cpus = namespaces.then_some(run.cpus);
    let cgroup = Cgroup::create(run.run, cpus, run.mem).map_err(|e| std::io::Error::other(format!("cgroup: {e}")))?;
    let result = (|| {
        if namespaces {
            let host = run.env.get("CLUSTER_NODE").map_or("", String::as_str);
            unshare_namespaces(host).map_err(|e| std::io::Error::other(format!("namespaces: {e}")))?;
        }
        supervise(dir, run, ChildSetup::new(run, namespaces)?)
    })();
    // Whatever happened above, the cgroup goes.
    let oom = cgroup.as_ref().is_some_and(Cgroup::oom_killed);
    if let Some(c) = cgroup {
        c.remove();
    }
    let mut exit = result?;
    if oom && exit.reason.is_none() {
        exit.reason = Some(format!("out of memory (limit {} bytes)", run.mem.unwrap_or(0)));
    }
    Ok(exit)
}

/// Starts the job as its user, waits for it and enforces the timeout.
fn supervise(dir: &Path, run: &Run, setup: ChildSetup) -> std::io::Result<Exit> {
    let user = User::from_uid(Uid::from_raw(run.uid)).ok().flatten();
    let home = user.as_ref().map_or_else(|| "/".into(), |u| u.dir.clone());
    let append = |f: &str| {
        let path = dir.join(f);
        fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))
    };
    // The job reads its script through an inherited descriptor: the run directory lives
    // under root's state, which the job's user cannot (and need not) traverse.
    let script =
        script_in_memory(&run.script).map_err(|e| std::io::Error::new(e.kind(), format!("the script: {e}")))?;
    let script_fd = script.as_raw_fd();
    let script_path = format!("/proc/self/fd/{script_fd}");
    let mut cmd = if run.script.starts_with("#!") {
        Command::new(&script_path)
    } else {
        let mut c = Command::new("/bin/sh");
        c.arg(&script_path);
        c
    };
    let path = if run.uid == 0 {
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    } else {
        "/usr/local/bin:/usr/bin:/bin"
    };
    cmd.env_clear()
        .env("HOME", &home)
        .env("USER", &run.user)
        .env("LOGNAME", &run.user)
        .env("PATH", path)
        .env("SHELL", "/bin/sh")
        .envs(&run.env)
        .stdin(Stdio::null())
        .stdout(append("stdout")?)
        .stderr(append("stderr")?)
        .process_group(0);
    // Inside a rootfs the default is its root; elsewhere the user's home when it exists.
    let cwd = run.cwd.clone().unwrap_or_else(|| {
        if run.rootfs.is_none() && home.is_dir() { home.to_string_lossy().into_owned() } else { "/".into() }
    });
    // Checked here, with a sentence: an error inside the child reaches us as a bare errno.
    let seen_from_host = match &run.rootfs {
        Some(root) => Path::new(root).join(cwd.trim_start_matches('/')),
        None => Path::new(&cwd).to_path_buf(),
    };
    if !seen_from_host.is_dir() {
        return Err(std::io::Error::other(format!("cwd {cwd} is not a directory on this node")));
    }
    let cwd = CString::new(cwd).map_err(|_| std::io::Error::other("cwd has a NUL byte"))?;
    let namespaces = run.isolate == Isolate::Ns;
    let (uid, gid) = (Uid::from_raw(run.uid), Gid::from_raw(run.gid));
    let groups: Vec<Gid> = run.groups.iter().map(|g| Gid::from_raw(*g)).collect();
    // SAFETY: the closure runs in the child between fork and exec; it only makes system calls
    // (close_range, fcntl, rt_sigaction, mount, pivot_root, setgroups, setgid, setuid, chdir)
    // on data prepared before fork, in a process that had a single thread when it forked.
    unsafe {
        cmd.pre_exec(move || {
            // The job inherits its stdio and its script, nothing else: descriptors the agent
            // was started with close on exec (as the descriptor that tells `spawn` the exec
            // went through does), and the script's stays open. (Kernels before 5.11 refuse the
            // flag; there, the agent's own descriptors are all close-on-exec.)
            libc::syscall(libc::SYS_close_range, 3, u32::MAX, libc::CLOSE_RANGE_CLOEXEC);
            if libc::fcntl(script_fd, libc::F_SETFD, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // Signals ignored by whoever started the agent (a shell's background job ignores
            // SIGINT and SIGQUIT) are the job's to take: `signal INT` must reach it. Through
            // the system call, as libc refuses the two real-time signals it keeps for itself.
            // An all-zero kernel sigaction is SIG_DFL, no flags, an empty mask.
            let default = [0u64; 4];
            for sig in 1..=64 {
                if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                    libc::syscall(libc::SYS_rt_sigaction, sig, default.as_ptr(), std::ptr::null::<u64>(), 8usize);
                }
            }
            setup.apply()?;
            nix::unistd::setgroups(&groups)?;
            nix::unistd::setgid(gid)?;
            nix::unistd::setuid(uid)?;
            // chdir as the user, so a directory the user may not enter is refused.
            nix::unistd::chdir(cwd.as_c_str())?;
            if namespaces {
                crate::isolate::fork_under_init()?;
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|e| std::io::Error::new(e.kind(), format!("starting the job: {e}")))?;
    drop(script);
    let pid = i32::try_from(child.id()).expect("pids fit in i32");
    if let Err(e) = record_job(dir, pid) {
        // A job whose pid is not recorded could not be signalled: it does not go on.
        let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
        let _ = child.wait();
        return Err(std::io::Error::new(e.kind(), format!("recording the job's pid: {e}")));
    }
    let deadline = run.timeout_s.map(|s| Instant::now() + Duration::from_secs(s));
    // No helper thread: a process that unshared its PID namespace may not make threads.
    let mut kill_at: Option<Instant> = None;
    let mut timed_out = false;
    // A kill that came while the job was being started waited for its pid; as the head does,
    // SIGKILL follows a SIGTERM that did not end the job.
    if let Some(sig) = pending_signal(dir) {
        let _ = killpg(Pid::from_raw(pid), sig);
        if sig == Signal::SIGTERM {
            kill_at = Some(Instant::now() + KILL_AFTER_TERM);
        }
    }
    let ended = pidfd(pid);
    let status = loop {
        if exited_unreaped(pid)? {
            // The job is a zombie: its pid, and so its process group, cannot be reused yet.
            // Whatever it left in its group ends now, then it is reaped.
            let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
            break child.wait()?;
        }
        let now = Instant::now();
        if deadline.is_some_and(|d| now >= d) && !timed_out {
            let _ = killpg(Pid::from_raw(pid), Signal::SIGTERM);
            kill_at = Some(kill_at.map_or(now + GRACE, |k| k.min(now + GRACE)));
            timed_out = true;
        }
        if kill_at.is_some_and(|k| now >= k) {
            let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
        }
        // Until the job ends, or the next deadline (a SIGKILL is sent again every second).
        let next = [deadline.filter(|_| !timed_out), kill_at.filter(|k| *k > now)].into_iter().flatten().min();
        let max = next.map_or(Duration::from_secs(1), |n| n.saturating_duration_since(now).min(Duration::from_secs(1)));
        wait_for_exit(ended.as_ref(), max);
    };
    let signal = std::os::unix::process::ExitStatusExt::signal(&status);
    let code = status.code().unwrap_or_else(|| 128 + signal.unwrap_or(0));
    let reason = timed_out.then(|| format!("timeout after {} s", run.timeout_s.unwrap_or(0)));
    Ok(Exit { code, signal, reason })
}

/// The script in an anonymous memory file: no inode on the node's disk per run. Executable,
/// for a script that starts with `#!`. Kernels before 6.3 know no MFD_EXEC (EINVAL) and make
/// every memory file executable; one whose `vm.memfd_noexec` is 2 refuses it (EACCES) and
/// runs only scripts read by `/bin/sh`.
fn script_in_memory(script: &str) -> std::io::Result<fs::File> {
    let name = c"clusterfs-script";
    // SAFETY: memfd_create takes a NUL-terminated name and flags; it returns a new descriptor or -1.
    let mut fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_EXEC) };
    if fd < 0 && matches!(std::io::Error::last_os_error().raw_os_error(), Some(libc::EINVAL | libc::EACCES)) {
        // SAFETY: as above.
        fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    }
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by memfd_create and is owned by nothing else.
    let mut file = unsafe { fs::File::from_raw_fd(fd) };
    std::io::Write::write_all(&mut file, script.as_bytes())?;
    Ok(file)
}

/// A descriptor that becomes readable when process `pid` ends (`pidfd_open`, Linux 5.3).
fn pidfd(pid: i32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    let fd = i32::try_from(fd).ok().filter(|fd| *fd >= 0)?;
    // SAFETY: a non-negative result is a descriptor nothing else owns.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Returns when the process behind `ended` ends or after `max`; without a pidfd, after
/// 20 ms at most.
fn wait_for_exit(ended: Option<&OwnedFd>, max: Duration) {
    let Some(fd) = ended else {
        return std::thread::sleep(max.min(Duration::from_millis(20)));
    };
    let mut poll = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    let ms = i32::try_from(max.as_millis()).unwrap_or(i32::MAX).max(1);
    // SAFETY: poll reads and writes only the one pollfd, which lives for the call.
    unsafe { libc::poll(&mut poll, 1, ms) };
}

/// Whether the child `pid` has exited, without reaping it (`waitid` with `WNOWAIT`).
fn exited_unreaped(pid: i32) -> std::io::Result<bool> {
    // SAFETY: siginfo_t is plain data the kernel fills; zeroed is a valid starting value.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    let id = libc::id_t::try_from(pid).map_err(|_| std::io::Error::other("bad pid"))?;
    // SAFETY: waitid writes only into `info`, which lives for the call.
    let rc = unsafe { libc::waitid(libc::P_PID, id, &mut info, libc::WEXITED | libc::WNOHANG | libc::WNOWAIT) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: after a successful waitid, si_pid is set (0 when no child has changed state).
    Ok(unsafe { info.si_pid() } != 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::signal::{SigHandler, signal};

    #[test]
    fn a_kill_that_came_before_the_pid_ends_the_job_even_when_the_shim_ignores_it() {
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        // The shim was started ignoring SIGTERM (as a background job ignores SIGINT): the job
        // does not inherit that, so the SIGTERM that waited for its pid ends it.
        let dir = tempfile::tempdir().unwrap();
        let run = Run { script: "exec sleep 30\n".into(), ..crate::runner::tests::run(1) };
        for f in ["stdout", "stderr"] {
            fs::write(dir.path().join(f), "").unwrap();
        }
        fs::write(dir.path().join(crate::runner::PENDING_SIGNAL), "15\n").unwrap();
        crate::runner::record_shim(dir.path(), std::process::id()).unwrap();
        // SAFETY: only the disposition changes (no handler runs), put back below.
        unsafe { signal(Signal::SIGTERM, SigHandler::SigIgn) }.unwrap();
        let started = Instant::now();
        let exit = supervise(dir.path(), &run, ChildSetup::new(&run, false).unwrap());
        // SAFETY: as above.
        unsafe { signal(Signal::SIGTERM, SigHandler::SigDfl) }.unwrap();
        assert_eq!(exit.map(|e| (e.code, e.reason)).unwrap(), (143, None));
        assert!(started.elapsed() < Duration::from_secs(1), "ended by the SIGKILL after: {:?}", started.elapsed());
    }
}
