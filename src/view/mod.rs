//! The tree `/cluster` shows: renders the cluster model as files for `clusterfs-fs`.

mod groups;
mod hsm;
mod images;
pub mod jobs;
pub mod nodes;
mod vms;

use std::fmt::Write as _;
use std::sync::{Arc, LazyLock};
use std::time::SystemTime;

use dashmap::DashMap;

use clusterfs_fs::{Answer, Caller, FsError, Kind, Node, Result, Tree, Write};

use crate::head::cluster::Cluster;
use crate::head::hsm::Hsm;
use crate::head::images::Images;
use crate::head::jobs::Jobs;
use crate::head::vms::Vms;

/// How long a file created and never written is shown.
const CREATED_KEPT: std::time::Duration = std::time::Duration::from_secs(600);

/// Names made by `create` (a shell's `>`, an NFS client's CREATE) whose first write has not
/// come: shown as empty files so that the write finds them, never stored. A write takes the
/// name back whether it is good or refused, so a refused write leaves nothing behind; a name
/// never written goes after [`CREATED_KEPT`].
#[derive(Debug, Default)]
pub struct Created(DashMap<String, std::time::Instant>);

impl Created {
    pub fn insert(&self, name: &str) {
        self.0.retain(|_, made| made.elapsed() < CREATED_KEPT);
        self.0.insert(name.to_string(), std::time::Instant::now());
    }

    pub fn contains(&self, name: &str) -> bool {
        self.0.get(name).is_some_and(|made| made.elapsed() < CREATED_KEPT)
    }

    /// Takes `name` back; whether it was there.
    pub fn take(&self, name: &str) -> bool {
        self.0.remove(name).is_some()
    }

    pub fn names(&self) -> Vec<String> {
        self.0.iter().filter(|e| e.value().elapsed() < CREATED_KEPT).map(|e| e.key().clone()).collect()
    }

    /// A chmod of `name`. An NFS server sets the mode its client asked for on a file it has
    /// just made, so root's chmod of a name awaiting its first write is accepted (the file's
    /// mode stays the tree's); any other is refused.
    pub fn chmod(&self, name: &str, caller: &Caller) -> Result<()> {
        if caller.is_root() && self.contains(name) { Ok(()) } else { Err(FsError::fixed_modes()) }
    }

    /// `rm` of `name`: one never written goes from here alone; a `stored` one by `remove`.
    pub fn remove(&self, name: &str, stored: bool, remove: impl FnOnce() -> Result<()> + Send + 'static) -> Answer<()> {
        if self.take(name) && !stored {
            return Answer::Now(Ok(()));
        }
        blocking(remove)
    }
}

/// Callers of another head's mount, whose processes this head cannot read: their groups, by
/// the stand-in pid (at or above `REMOTE_PID`) their calls carry here.
static REMOTE_CALLERS: LazyLock<DashMap<u32, Vec<u32>>> = LazyLock::new(DashMap::new);
/// Stand-in pids start here, above any real pid (`pid_max` is at most 2^22).
const REMOTE_PID: u32 = 1 << 31;
static NEXT_REMOTE: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// A caller of another head's mount, known here by a stand-in pid while its call runs.
#[derive(Debug)]
pub struct RemoteCaller(pub Caller);

impl RemoteCaller {
    pub fn new(uid: u32, gid: u32, groups: Vec<u32>) -> RemoteCaller {
        let n = NEXT_REMOTE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let pid = REMOTE_PID | (n & (REMOTE_PID - 1));
        REMOTE_CALLERS.insert(pid, groups);
        RemoteCaller(Caller { uid, gid, pid })
    }
}

impl Drop for RemoteCaller {
    fn drop(&mut self) {
        REMOTE_CALLERS.remove(&self.0.pid);
    }
}

/// The caller's groups: those of the calling process when it runs as the caller, those its
/// head passed on for a caller of another head's mount, else its gid alone (an NFS server
/// writing for a client gives only that).
pub fn caller_groups(caller: &Caller) -> Vec<u32> {
    if let Some(groups) = REMOTE_CALLERS.get(&caller.pid) {
        return groups.clone();
    }
    let status = std::fs::read_to_string(format!("/proc/{}/status", caller.pid)).unwrap_or_default();
    let field = |name: &str| status.lines().find_map(|l| l.strip_prefix(name)).map(str::trim).unwrap_or("");
    let process_uid: Option<u32> = field("Uid:").split_whitespace().nth(1).and_then(|u| u.parse().ok());
    if process_uid == Some(caller.uid) {
        field("Groups:").split_whitespace().filter_map(|g| g.parse().ok()).collect()
    } else {
        vec![caller.gid]
    }
}

/// One file a directory always has: its name, kind, mode and what it holds.
#[derive(Debug)]
pub struct FileSpec {
    pub name: &'static str,
    pub kind: Kind,
    pub perm: u16,
    pub help: &'static str,
}

/// The README every directory has.
pub const README_FILE: FileSpec = FileSpec { name: "README", kind: Kind::Snapshot, perm: 0o444, help: "this text" };
/// The `error` file of every directory that takes writes.
pub const ERROR_FILE: FileSpec =
    FileSpec { name: "error", kind: Kind::Error, perm: 0o444, help: "your last failure here" };

/// One verb a control file takes.
#[derive(Debug)]
pub struct Verb {
    pub name: &'static str,
    pub args: &'static str,
    pub help: &'static str,
}

const ROOT_FILES: &[FileSpec] = &[
    README_FILE,
    FileSpec { name: "version", kind: Kind::Snapshot, perm: 0o444, help: "`clusterfs <version>`" },
    FileSpec { name: "status", kind: Kind::Snapshot, perm: 0o444, help: "one line per subsystem with its counts" },
    FileSpec {
        name: "nodes",
        kind: Kind::Dir,
        perm: 0o755,
        help: "every node: live sitreps, state, drain (see nodes/<node>/README)",
    },
    FileSpec {
        name: "groups",
        kind: Kind::Dir,
        perm: 0o755,
        help: "named nodesets, usable as @name (see groups/README)",
    },
    FileSpec { name: "jobs", kind: Kind::Dir, perm: 0o1777, help: "submit and control jobs (see jobs/README)" },
    FileSpec {
        name: "images",
        kind: Kind::Dir,
        perm: 0o1777,
        help: "per-user disk images: mkdir makes one, ctl mounts it (see images/README)",
    },
    FileSpec {
        name: "hsm",
        kind: Kind::Dir,
        perm: 0o755,
        help: "the Lustre HSM coordinator: request queue, movers, report files (see hsm/README)",
    },
    FileSpec {
        name: "vms",
        kind: Kind::Dir,
        perm: 0o1777,
        help: "VMs: mkdir clones a template and starts it, rmdir destroys (see vms/README)",
    },
];

/// The README of a directory, generated from the tables the code uses.
pub fn readme<'a>(
    title: &str,
    files: impl IntoIterator<Item = &'a FileSpec>,
    verbs: &[(&str, &[Verb])],
    extra: &str,
) -> Vec<u8> {
    let mut out = format!("{title}\n\n");
    for f in files {
        let kind = match f.kind {
            Kind::Dir => "dir ",
            Kind::Control => "w   ",
            Kind::Log => "log ",
            _ => "r   ",
        };
        let _ = writeln!(out, "  {kind} {:<12} {}", f.name, f.help);
    }
    for (file, vs) in verbs {
        let _ = writeln!(out, "\nverbs of {file} (one command per write):");
        for v in *vs {
            let _ = writeln!(out, "  {:<24} {}", format!("{} {}", v.name, v.args).trim_end(), v.help);
        }
    }
    if !extra.is_empty() {
        let _ = write!(out, "\n{extra}");
    }
    out.into_bytes()
}

/// The node of `name` at the top of the tree, a fixed file or directory.
pub fn root_node(name: &str) -> Option<Node> {
    spec_node(ROOT_FILES, name)
}

/// The node of a fixed file in `files`.
fn spec_node(files: &[FileSpec], name: &str) -> Option<Node> {
    files.iter().find(|f| f.name == name).map(|f| Node::new(f.kind, f.perm).mtime(SystemTime::now()))
}

/// A control command as text: UTF-8, no NUL, one line, not empty.
pub fn command_text(data: &[u8], max: usize) -> Result<&str> {
    if data.len() > max {
        return Err(FsError::invalid(format!("a command is at most {max} bytes (got {})", data.len())));
    }
    let text = std::str::from_utf8(data).map_err(|_| FsError::invalid("the command is not valid UTF-8"))?;
    if text.contains('\0') {
        return Err(FsError::invalid("the command contains a NUL byte"));
    }
    let text = text.strip_suffix('\n').unwrap_or(text).trim();
    if text.is_empty() {
        return Err(FsError::invalid("empty command"));
    }
    if text.contains('\n') {
        return Err(FsError::invalid("one command per write (got several lines)"));
    }
    Ok(text)
}

/// `e` with the verbs `file` takes, so the `error` file says what would have worked.
pub fn with_usage(e: FsError, file: &str, verbs: &[Verb]) -> FsError {
    let verbs: Vec<String> = verbs.iter().map(|v| format!("{} {}", v.name, v.args).trim_end().to_string()).collect();
    FsError::new(e.errno, format!("{}; {file} takes: {}", e.message, verbs.join(" | ")))
}

/// Runs store-touching work off the FUSE thread.
pub fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Answer<T> {
    Answer::later(async move {
        tokio::task::spawn_blocking(f)
            .await
            .unwrap_or_else(|e| Err(FsError::new(clusterfs_fs::Errno::Io, format!("internal error: {e}"))))
    })
}

/// The `/cluster` tree.
#[derive(Debug)]
pub struct View {
    cluster: Arc<Cluster>,
    groups: groups::GroupsView,
    jobs: jobs::JobsView,
    images: images::ImagesView,
    hsm: hsm::HsmView,
    vms: vms::VmsView,
    /// The first line of `status`: the head that runs the cluster.
    leader: String,
}

impl View {
    pub fn new(cluster: Arc<Cluster>, jobs: Arc<Jobs>, images: Arc<Images>, hsm: Arc<Hsm>, vms: Arc<Vms>) -> View {
        View {
            groups: groups::GroupsView::new(cluster.clone()),
            cluster,
            jobs: jobs::JobsView::new(jobs),
            images: images::ImagesView::new(images),
            hsm: hsm::HsmView::new(hsm),
            vms: vms::VmsView::new(vms),
            leader: String::new(),
        }
    }

    /// Names the head that renders this tree, for `status`: `leader <name> addr=<addr> store=<kind>`.
    pub fn led_by(mut self, name: &str, addr: &str, store: &str) -> View {
        self.leader = format!("leader {name} addr={addr} store={store}\n");
        self
    }
}

impl View {
    /// What is on node `name`: its running jobs, the images mounted there, its VMs.
    fn on_node(&self, name: &str) -> Vec<String> {
        let (jobs, images, vms) = (self.jobs.on_node(name), self.images.on_node(name), self.vms.on_node(name));
        let mut holds = Vec::new();
        if !jobs.is_empty() {
            holds.push(format!("jobs {}", jobs.trim_end().replace('\n', ",")));
        }
        if !images.is_empty() {
            holds.push(format!("the images of {}", images.join(",")));
        }
        if !vms.is_empty() {
            holds.push(format!("VMs {}", vms.join(",")));
        }
        holds
    }
}

impl Tree for View {
    fn node(&self, path: &[&str]) -> Result<Node> {
        let node = match path {
            [] => Ok(Node::dir()),
            [name] => spec_node(ROOT_FILES, name).ok_or_else(|| FsError::not_found(format!("/{name}"))),
            ["nodes", rest @ ..] => nodes::node(&self.cluster, rest),
            ["groups", rest @ ..] => self.groups.node(rest),
            ["jobs", rest @ ..] => self.jobs.node(rest),
            ["images", rest @ ..] => self.images.node(rest),
            ["hsm", rest @ ..] => self.hsm.node(rest),
            ["vms", rest @ ..] => self.vms.node(rest),
            _ => Err(FsError::not_found(path.join("/"))),
        }?;
        // Objects with no time of their own date from the head's start.
        Ok(if node.mtime == SystemTime::UNIX_EPOCH { node.mtime(self.cluster.started_at) } else { node })
    }

    fn list(&self, path: &[&str]) -> Result<Vec<String>> {
        match path {
            [] => Ok(ROOT_FILES.iter().map(|f| f.name.to_string()).collect()),
            ["nodes", rest @ ..] => nodes::list(&self.cluster, rest),
            ["groups", rest @ ..] => self.groups.list(rest),
            ["jobs", rest @ ..] => self.jobs.list(rest),
            ["images", rest @ ..] => self.images.list(rest),
            ["hsm", rest @ ..] => self.hsm.list(rest),
            ["vms", rest @ ..] => self.vms.list(rest),
            _ => Err(FsError::not_found(path.join("/"))),
        }
    }

    fn render(&self, path: &[&str], caller: &Caller, nonblock: bool) -> Answer<Vec<u8>> {
        match path {
            ["README"] => Answer::Now(Ok(readme(
                "/cluster: the whole cluster as one filesystem",
                ROOT_FILES,
                &[],
                "Every directory that accepts writes has a README and an `error` file; `error`\n\
                 shows the reader's own last failure there as `ERRNO: sentence`.\n",
            ))),
            ["version"] => Answer::Now(Ok(format!("clusterfs {}\n", env!("CARGO_PKG_VERSION")).into_bytes())),
            ["status"] => Answer::Now(Ok((self.leader.clone()
                + &self.cluster.status()
                + &self.jobs.status()
                + &self.images.status()
                + &self.hsm.status()
                + &self.vms.status())
                .into_bytes())),
            ["nodes", name, "jobs"] if self.cluster.exists(name) => {
                Answer::Now(Ok(self.jobs.on_node(name).into_bytes()))
            }
            ["nodes", rest @ ..] => nodes::render(&self.cluster, rest, caller),
            ["jobs", rest @ ..] => self.jobs.render(rest, caller, nonblock),
            ["groups", rest @ ..] => self.groups.render(rest),
            ["images", rest @ ..] => self.images.render(rest),
            ["hsm", rest @ ..] => self.hsm.render(rest),
            ["vms", rest @ ..] => self.vms.render(rest),
            _ => Answer::Now(Err(FsError::not_found(path.join("/")))),
        }
    }

    fn write(&self, path: &[&str], caller: &Caller, write: Write<'_>) -> Answer<Vec<u8>> {
        match path {
            ["nodes", rest @ ..] => nodes::write(&self.cluster, rest, caller, write.data),
            ["groups", rest @ ..] => self.groups.write(rest, caller, write.data),
            ["jobs", rest @ ..] => self.jobs.write(rest, caller, write.handle, write.offset, write.data),
            ["images", rest @ ..] => self.images.write(rest, caller, write.data),
            ["hsm", rest @ ..] => self.hsm.write(rest, caller, write.handle, write.offset, write.data),
            ["vms", rest @ ..] => self.vms.write(rest, caller, write.data),
            _ => Answer::Now(Err(FsError::denied("this file is read-only"))),
        }
    }

    fn read_log(&self, path: &[&str], caller: &Caller, offset: u64, size: u32) -> Answer<Vec<u8>> {
        Answer::Now(match path {
            ["jobs", rest @ ..] => self.jobs.read_log(rest, caller, offset, size),
            ["hsm", rest @ ..] => self.hsm.read_log(rest, offset, size),
            ["vms", rest @ ..] => self.vms.read_log(rest, caller, offset, size),
            _ => Err(FsError::invalid("not a log file")),
        })
    }

    fn flush(&self, path: &[&str], _caller: &Caller, handle: u64) -> Answer<()> {
        match path {
            ["jobs", rest @ ..] => self.jobs.flush(rest, handle),
            ["hsm", rest @ ..] => self.hsm.flush(rest, handle),
            _ => Answer::Now(Ok(())),
        }
    }

    fn release(&self, path: &[&str], _caller: &Caller, handle: u64) {
        match path {
            ["jobs", rest @ ..] => self.jobs.release(rest, handle),
            ["hsm", rest @ ..] => self.hsm.release(rest, handle),
            _ => {}
        }
    }

    fn rmdir(&self, path: &[&str], caller: &Caller) -> Answer<()> {
        match path {
            ["nodes", name] => nodes::forget(&self.cluster, name, caller, || self.on_node(name)),
            ["jobs", rest @ ..] => self.jobs.rmdir(rest, caller),
            ["images", rest @ ..] => self.images.rmdir(rest, caller),
            ["vms", rest @ ..] => self.vms.rmdir(rest, caller),
            _ => Answer::Now(Err(FsError::new(clusterfs_fs::Errno::Perm, "this directory cannot be removed"))),
        }
    }

    fn mkdir(&self, path: &[&str], caller: &Caller, _mode: u32) -> Answer<()> {
        match path {
            ["images", rest @ ..] => self.images.mkdir(rest, caller),
            ["vms", rest @ ..] => self.vms.mkdir(rest, caller),
            _ => Answer::Now(Err(FsError::new(clusterfs_fs::Errno::Perm, "directories cannot be made here"))),
        }
    }

    fn create(&self, path: &[&str], caller: &Caller, mode: u32) -> Answer<()> {
        match path {
            ["groups", name] => self.groups.create(name, caller),
            ["jobs", rest @ ..] => self.jobs.create_file(rest, caller, mode),
            ["vms", rest @ ..] => self.vms.create_file(rest, caller),
            _ => Answer::Now(Err(FsError::new(clusterfs_fs::Errno::Perm, "files cannot be made here"))),
        }
    }

    fn chmod(&self, path: &[&str], caller: &Caller, mode: u32) -> clusterfs_fs::Result<()> {
        match path {
            ["jobs", rest @ ..] => self.jobs.chmod(rest, caller, mode),
            ["groups", name] => self.groups.chmod(name, caller),
            ["vms", "templates", name] => self.vms.chmod_template(name, caller),
            _ => Err(FsError::fixed_modes()),
        }
    }

    fn unlink(&self, path: &[&str], caller: &Caller) -> Answer<()> {
        match path {
            ["groups", name] => self.groups.remove(name, caller),
            ["vms", rest @ ..] => self.vms.unlink(rest, caller),
            _ => Answer::Now(Err(FsError::new(clusterfs_fs::Errno::Perm, "this file cannot be removed"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_roots_chmod_of_a_name_awaiting_its_first_write_is_taken() {
        let created = Created::default();
        let user = Caller { uid: 1000, gid: 1000, pid: 1 };
        assert!(created.chmod("g", &Caller::ROOT).is_err(), "a name never made");
        created.insert("g");
        assert!(created.chmod("g", &Caller::ROOT).is_ok());
        assert_eq!(created.chmod("g", &user).map_err(|e| e.errno.code()), Err(libc::EPERM));
        assert!(created.take("g"), "its first write");
        assert!(created.chmod("g", &Caller::ROOT).is_err(), "a name written");
    }
}
