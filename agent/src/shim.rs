//! The per-run supervisor (`clusterfs-agent --shim DIR`): starts the job as its user, waits,
//! enforces the timeout and writes `exit.json`. It outlives agent restarts.

use std::ffi::CString;
use std::fs;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clusterfs::jobs::{Exit, Run};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::{Gid, Pid, Uid, User};

use crate::runner::write_exit;

/// The descriptor a job reads its script from.
const SCRIPT_FD: i32 = 9;

/// Grace between SIGTERM and SIGKILL when a run times out or ends with children left.
const GRACE: Duration = Duration::from_secs(2);

/// Runs the shim for the run in `dir`; returns the process exit code.
pub fn main(dir: &Path) -> i32 {
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
    let user = User::from_uid(Uid::from_raw(run.uid)).ok().flatten();
    let home = user.as_ref().map_or_else(|| "/".into(), |u| u.dir.clone());
    let append = |f: &str| fs::OpenOptions::new().append(true).open(dir.join(f));
    // The job reads its script through an inherited descriptor: the run directory lives
    // under root's state, which the job's user cannot (and need not) traverse.
    let script = fs::File::open(dir.join("script"))?;
    let script_fd = std::os::fd::AsRawFd::as_raw_fd(&script);
    let script_path = format!("/proc/self/fd/{SCRIPT_FD}");
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
    let cwd =
        run.cwd.clone().unwrap_or_else(|| if home.is_dir() { home.to_string_lossy().into_owned() } else { "/".into() });
    let cwd = CString::new(cwd).map_err(|_| std::io::Error::other("cwd has a NUL byte"))?;
    let (uid, gid) = (Uid::from_raw(run.uid), Gid::from_raw(run.gid));
    let groups: Vec<Gid> = run.groups.iter().map(|g| Gid::from_raw(*g)).collect();
    // SAFETY: the closure runs in the child between fork and exec; it only makes
    // async-signal-safe system calls (dup2, setgroups, setgid, setuid, chdir) on data prepared before fork.
    unsafe {
        cmd.pre_exec(move || {
            // dup2 leaves the copy open across exec (no close-on-exec flag).
            if libc::dup2(script_fd, SCRIPT_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            nix::unistd::setgroups(&groups)?;
            nix::unistd::setgid(gid)?;
            nix::unistd::setuid(uid)?;
            // chdir as the user, so a directory the user may not enter is refused.
            nix::unistd::chdir(cwd.as_c_str())?;
            Ok(())
        });
    }
    let mut child = cmd.spawn()?;
    drop(script);
    let pid = i32::try_from(child.id()).expect("pids fit in i32");
    fs::write(dir.join("pid"), format!("{pid}\n"))?;
    let deadline = run.timeout_s.map(|s| Instant::now() + Duration::from_secs(s));
    let mut timed_out = false;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if deadline.is_some_and(|d| Instant::now() >= d) && !timed_out {
            timed_out = true;
            stop_group(pid);
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    // Whatever the job left in its process group ends with it.
    let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
    let signal = std::os::unix::process::ExitStatusExt::signal(&status);
    let code = status.code().unwrap_or_else(|| 128 + signal.unwrap_or(0));
    let reason = timed_out.then(|| format!("timeout after {} s", run.timeout_s.unwrap_or(0)));
    Ok(Exit { code, signal, reason })
}

/// SIGTERM to the group, then SIGKILL after the grace period (from a thread: the waiter goes on).
fn stop_group(pid: i32) {
    let _ = killpg(Pid::from_raw(pid), Signal::SIGTERM);
    std::thread::spawn(move || {
        std::thread::sleep(GRACE);
        let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
    });
}
