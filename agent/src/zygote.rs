//! The zygote: a single-threaded process forked before the runtime starts, which forks each run's shim without an exec.
//!
//! Exec'ing the agent binary as a shim costs more than the job it supervises (the loader, the
//! relocations, the page faults of a large binary). A fork of a small single-threaded process
//! costs a tenth of that, and is safe where a fork of the threaded agent is not. The agent
//! sends a run directory over a datagram socket and goes on at once; the zygote forks, and the
//! child becomes that run's shim (its own process group, outliving the agent as before), which
//! records its own pid first thing. When a shim has written its exit it says so on the same
//! socket, so its end is sent at once.
//! Children are reaped by the kernel (SIGCHLD ignored in the zygote, restored in each shim).

use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use clusterfs::jobs::Exit;
use dashmap::DashMap;
use nix::unistd::{ForkResult, fork};
use tracing::warn;

/// The zygote of this agent, when it started.
static ZYGOTE: OnceLock<Zygote> = OnceLock::new();

/// The agent's side: the socket, and who to wake per runs directory.
pub struct Zygote {
    sock: UnixDatagram,
    woken: Woken,
}

/// Who to wake when a shim of a run under a runs directory ends.
type Woken = Arc<DashMap<PathBuf, Arc<tokio::sync::Notify>>>;

/// Forks the zygote. Call while the process has a single thread (before the runtime starts).
pub fn start() {
    match fork_zygote() {
        Ok(z) => {
            let _ = ZYGOTE.set(z);
        }
        Err(e) => warn!(error = %e, "no zygote: every run's shim is started by exec"),
    }
}

/// The zygote, if it started.
pub fn get() -> Option<&'static Zygote> {
    ZYGOTE.get()
}

/// Set when the agent stops: the zygote ending then is expected, not news.
static STOPPING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The agent is stopping.
pub fn stopping() {
    STOPPING.store(true, std::sync::atomic::Ordering::SeqCst);
}

fn fork_zygote() -> std::io::Result<Zygote> {
    let (ours, theirs) = UnixDatagram::pair()?;
    let parent = nix::unistd::getpid();
    // SAFETY: the caller guarantees this process has one thread, so the child may run any code.
    match unsafe { fork() }.map_err(std::io::Error::from)? {
        ForkResult::Child => {
            drop(ours);
            std::process::exit(serve(&theirs, parent));
        }
        ForkResult::Parent { child } => {
            drop(theirs);
            let woken = Woken::default();
            let zygote = Zygote { sock: ours.try_clone()?, woken: woken.clone() };
            std::thread::Builder::new().name("zygote-reader".into()).spawn(move || read_notes(&ours, &woken))?;
            std::thread::Builder::new().name("zygote-reaper".into()).spawn(move || {
                let _ = nix::sys::wait::waitpid(child, None);
                if !STOPPING.load(std::sync::atomic::Ordering::SeqCst) {
                    warn!("the zygote ended: runs are started by exec from now on");
                }
            })?;
            Ok(zygote)
        }
    }
}

impl Zygote {
    /// Wakes `ended` when a shim of a run under `runs` ends.
    pub fn watch(&self, runs: &Path, ended: Arc<tokio::sync::Notify>) {
        self.woken.insert(runs.to_path_buf(), ended);
    }

    /// Has the shim of the run in `dir` forked; an error when the zygote is gone. A fork that
    /// fails ends the run with the reason.
    pub fn spawn(&self, dir: &Path) -> std::io::Result<()> {
        self.sock.send(dir.as_os_str().as_bytes()).map(|_| ())
    }
}

/// Agent side: wakes the runner of each shim that ended.
fn read_notes(sock: &UnixDatagram, woken: &Woken) {
    let mut buf = vec![0u8; 8192];
    loop {
        let n = match sock.recv(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let dir = Path::new(std::ffi::OsStr::from_bytes(&buf[..n]));
        if let Some(n) = dir.parent().and_then(|runs| woken.get(runs)) {
            n.notify_one();
        }
    }
}

/// Zygote side: forks a shim for each run directory received, until the agent is gone.
fn serve(sock: &UnixDatagram, agent: nix::unistd::Pid) -> i32 {
    // SAFETY: prctl and signal with constant arguments have no memory effects.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
        libc::signal(libc::SIGCHLD, libc::SIG_IGN);
    }
    // The agent may have ended before PDEATHSIG was set.
    if nix::unistd::getppid() != agent {
        return 0;
    }
    // Among hundreds of runnable jobs a fair share of the CPU would make every start wait:
    // the zygote runs ahead of them, and each shim goes back to the agent's priority.
    // SAFETY: getpriority and setpriority on this process have no memory effects.
    let base = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
    // SAFETY: as above.
    unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, (base - 10).max(-20)) };
    let mut buf = vec![0u8; 8192];
    loop {
        let n = match sock.recv(&mut buf) {
            Ok(n) if n > 0 => n,
            _ => return 0,
        };
        let dir = PathBuf::from(std::ffi::OsStr::from_bytes(&buf[..n]));
        // SAFETY: the zygote has one thread, so the child may run any code.
        match unsafe { fork() } {
            Ok(ForkResult::Child) => std::process::exit(shim(sock, &dir, base)),
            Ok(ForkResult::Parent { .. }) => {}
            Err(e) => {
                let reason = format!("failed to start: fork: {e}");
                let _ = crate::runner::write_exit(&dir, &Exit { code: 127, signal: None, reason: Some(reason) });
                let _ = sock.send(dir.as_os_str().as_bytes());
            }
        }
    }
}

/// In the forked child: becomes the run's shim as `clusterfs-agent --shim DIR` would, then
/// says it ended.
fn shim(sock: &UnixDatagram, dir: &Path, priority: i32) -> i32 {
    // SAFETY: signal, setpriority, setpgid, open and dup2 on constant arguments have no
    // memory effects.
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, 0, priority);
        libc::signal(libc::SIGCHLD, libc::SIG_DFL);
        libc::prctl(libc::PR_SET_PDEATHSIG, 0);
        libc::setpgid(0, 0);
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        if null >= 0 {
            for fd in 0..3 {
                libc::dup2(null, fd);
            }
            if null > 2 {
                libc::close(null);
            }
        }
    }
    show_as_shim(dir);
    let code = crate::shim::main(dir);
    let _ = sock.send(dir.as_os_str().as_bytes());
    code
}

/// Makes `ps` and `pgrep -f` show this process as `clusterfs-agent --shim DIR`, as an exec'd
/// shim is shown (admins and scripts find a run's supervisor by it), by writing over the
/// command line the fork inherited (where `/proc/self/stat` says it is). A line longer than
/// the agent's own is cut to fit.
fn show_as_shim(dir: &Path) {
    let Some((start, end)) = std::fs::read_to_string("/proc/self/stat").ok().and_then(|stat| {
        // arg_start and arg_end are fields 48 and 49; the name in parentheses may hold spaces.
        let fields: Vec<&str> = stat.rsplit(')').next()?.split_whitespace().collect();
        Some((fields.get(45)?.parse::<usize>().ok()?, fields.get(46)?.parse::<usize>().ok()?))
    }) else {
        return;
    };
    let Some(room) = end.checked_sub(start).filter(|n| *n > 1) else { return };
    let mut line = b"clusterfs-agent\0--shim\0".to_vec();
    line.extend_from_slice(dir.as_os_str().as_bytes());
    line.truncate(room - 1);
    // The rest is zeros: the kernel shows the arguments up to the first empty one's end.
    line.resize(room, 0);
    // SAFETY: [start, end) is this process's own argument area (writable stack memory the
    // kernel reports); nothing in this process reads it after the fork.
    unsafe { std::ptr::copy_nonoverlapping(line.as_ptr(), start as *mut u8, room) };
}
