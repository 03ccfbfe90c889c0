//! The etcd store: a real 3-member etcd cluster on loopback ports, heads that keep their
//! state in it, a site moved into it with `clusterfs store copy`, and members killed.

use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::{Cluster, bin, eventually, sh_as};
use crate::jobs::wait;

/// An etcd cluster of `n` members, each a process with its own data directory; killed on drop.
pub struct Etcd {
    members: Vec<Option<Child>>,
    client_ports: Vec<u16>,
    _dir: tempfile::TempDir,
}

/// `n` distinct free ports: each listener is held until all are picked, so the system cannot
/// hand out one port twice (two members on one client port left a 3-member cluster with 2).
fn free_ports(n: usize) -> Vec<u16> {
    let held: Vec<_> = (0..n).map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    held.iter().map(|l| l.local_addr().unwrap().port()).collect()
}

impl Etcd {
    /// Starts the members and waits until every one is healthy; None without etcd here.
    pub fn start(n: usize) -> Option<Etcd> {
        if Command::new("etcd").arg("--version").output().is_err() {
            assert!(std::env::var("CI").map_or(true, |v| v != "true"), "CI=true but no etcd");
            eprintln!("skipping: no etcd (scripts/install-deps installs etcd-server)");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let mut ports = free_ports(2 * n);
        let peer_ports = ports.split_off(n);
        let client_ports = ports;
        let initial: Vec<String> =
            peer_ports.iter().enumerate().map(|(i, p)| format!("m{i}=http://127.0.0.1:{p}")).collect();
        let members = (0..n)
            .map(|i| {
                let client = format!("http://127.0.0.1:{}", client_ports[i]);
                let peer = format!("http://127.0.0.1:{}", peer_ports[i]);
                let log = std::fs::File::create(dir.path().join(format!("m{i}.log"))).unwrap();
                Some(
                    Command::new("etcd")
                        .arg("--name")
                        .arg(format!("m{i}"))
                        .arg("--data-dir")
                        .arg(dir.path().join(format!("m{i}")))
                        .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
                        .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
                        .args(["--initial-cluster", &initial.join(",")])
                        .args(["--initial-cluster-state", "new", "--initial-cluster-token"])
                        .arg(format!("clusterfs-test-{}", std::process::id()))
                        .stdout(Stdio::null())
                        .stderr(log)
                        .spawn()
                        .expect("start etcd"),
                )
            })
            .collect();
        let etcd = Etcd { members, client_ports, _dir: dir };
        let healthy = eventually(Duration::from_secs(30), || (0..n).all(|i| etcd.healthy(i)));
        assert!(healthy, "etcd never became healthy");
        Some(etcd)
    }

    /// `--store` for a head: every member, under `prefix`.
    pub fn url(&self, prefix: &str) -> String {
        let hosts: Vec<String> = self.client_ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        format!("etcd://{}/{prefix}", hosts.join(","))
    }

    /// What member `port`'s JSON gateway answers to `body` POSTed at `path`.
    fn post(port: u16, path: &str, body: &str) -> Option<serde_json::Value> {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
        let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
        let request = format!("POST {path} HTTP/1.0\r\nContent-Length: {}\r\n\r\n{body}", body.len());
        s.write_all(request.as_bytes()).ok()?;
        let mut answer = String::new();
        let _ = s.read_to_string(&mut answer);
        serde_json::from_str(answer.split_once("\r\n\r\n")?.1).ok()
    }

    /// The client URL of the member that leads the raft, as member 0 sees it (its status
    /// names the leader's id; each member's status names its own).
    pub fn raft_leader(&self) -> Option<String> {
        let status = |port: u16| Etcd::post(port, "/v3/maintenance/status", "{}");
        let ports: Vec<u16> =
            self.members.iter().zip(&self.client_ports).filter(|(m, _)| m.is_some()).map(|(_, p)| *p).collect();
        let leader = ports.iter().find_map(|p| status(*p))?["leader"].as_str()?.to_string();
        ports
            .into_iter()
            .find(|p| status(*p).is_some_and(|s| s["header"]["member_id"].as_str() == Some(&leader)))
            .map(|p| format!("http://127.0.0.1:{p}"))
    }

    /// Hands the raft's leadership to the next member and waits until they all say so; the
    /// new leader's client URL.
    pub fn move_leader(&self) -> String {
        let status = |port: u16| Etcd::post(port, "/v3/maintenance/status", "{}").expect("a member answers");
        let id = |port: u16| status(port)["header"]["member_id"].as_str().unwrap().to_string();
        let from = self.raft_leader().expect("etcd names its raft leader");
        let at = self.client_ports.iter().position(|p| from.ends_with(&format!(":{p}"))).unwrap();
        let to = self.client_ports[(at + 1) % self.client_ports.len()];
        let body = format!(r#"{{"targetID":"{}"}}"#, id(to));
        Etcd::post(self.client_ports[at], "/v3/maintenance/transfer-leadership", &body).expect("etcd moves its leader");
        let url = format!("http://127.0.0.1:{to}");
        assert!(eventually(Duration::from_secs(10), || self.raft_leader().as_deref() == Some(url.as_str())));
        url
    }

    /// etcd's current revision.
    pub fn revision(&self) -> i64 {
        let now = Etcd::post(self.client_ports[0], "/v3/kv/range", r#"{"key":"AA=="}"#).expect("etcd answers a read");
        now["header"]["revision"].as_str().and_then(|r| r.parse().ok()).expect("a revision")
    }

    /// Whether etcd has compacted away `revision`: a read as of then is refused.
    pub fn compacted(&self, revision: i64) -> bool {
        let body = format!(r#"{{"key":"AA==","revision":"{revision}"}}"#);
        let answer = Etcd::post(self.client_ports[0], "/v3/kv/range", &body).expect("etcd answers a read");
        answer.to_string().contains("compacted")
    }

    /// Compacts away every revision before the current one; returns it.
    pub fn compact(&self) -> i64 {
        let revision = self.revision();
        let body = format!(r#"{{"revision":"{revision}","physical":true}}"#);
        Etcd::post(self.client_ports[0], "/v3/kv/compaction", &body).expect("etcd compacts");
        revision
    }

    /// Member `i`'s /health answer says it serves with a quorum.
    fn healthy(&self, i: usize) -> bool {
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.client_ports[i])) else { return false };
        let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
        if s.write_all(b"GET /health HTTP/1.0\r\n\r\n").is_err() {
            return false;
        }
        let mut answer = String::new();
        let _ = s.read_to_string(&mut answer);
        answer.contains("\"health\":\"true\"")
    }

    pub fn kill(&mut self, i: usize) {
        if let Some(mut m) = self.members[i].take() {
            let _ = m.kill();
            let _ = m.wait();
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}

/// Writes `data` into `rel` and closes it, as `echo data > rel` does: the errno of the write
/// or of the close (a submission is made durable by its close).
fn write_and_close(c: &Cluster, rel: &str, data: &[u8]) -> Result<(), i32> {
    use std::os::fd::IntoRawFd;
    let errno = |e: std::io::Error| e.raw_os_error().unwrap_or(0);
    let mut f = std::fs::OpenOptions::new().write(true).truncate(true).open(c.path(rel)).map_err(errno)?;
    f.write_all(data).map_err(errno)?;
    // SAFETY: the descriptor is ours alone, taken from the File, and closed once here.
    match unsafe { libc::close(f.into_raw_fd()) } {
        0 => Ok(()),
        _ => Err(errno(std::io::Error::last_os_error())),
    }
}

/// Points the cluster's head at `store` (its config file ends inside `[head]`).
fn use_store(c: &Cluster, store: &str) {
    let config = c.dir.path().join("config.toml");
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(&format!("store = \"{store}\"\n"));
    std::fs::write(config, text).unwrap();
}

#[test]
fn a_head_keeps_its_state_in_a_three_member_etcd_and_refuses_writes_without_a_quorum() {
    if !crate::can_mount() {
        return;
    }
    let Some(mut etcd) = Etcd::start(3) else { return };
    let mut c = Cluster::up_with("cn[0-1]", 200, &format!("store = \"{}\"\n", etcd.url("site1")));
    assert!(!c.state.join("store.redb").exists(), "an embedded store was made");
    // The store writes to the member that leads etcd's raft (no forwarding hop).
    let leader = etcd.raft_leader().expect("etcd names its raft leader");
    let log = c.log();
    assert!(log.contains(&format!("member=\"{leader}\"")), "the store does not use the raft leader {leader}: {log}");
    assert_eq!(c.write("groups/g1", b"cn[0-1]\n"), Ok(()), "{}", c.read("groups/error"));
    let id = crate::jobs::submit_as(&c, "root", "echo from etcd\n");
    assert_eq!(wait(&c, id), "0\n");
    let secret = std::fs::read_to_string(c.state.join("secret")).unwrap();

    // A head SIGKILLed and started again has it all, from etcd; its agent is let in again.
    c.crash_head();
    c.start_head();
    assert_eq!(c.read("groups/g1"), "cn[0-1]\n");
    // `wait` answers as the end arrives, its commit follows; the agent keeps the run until the
    // head has stored its end: an end the crash took is reported again when the agent is back.
    let state = format!("jobs/{id}/state");
    assert!(eventually(Duration::from_secs(10), || c.read(&state) == "done 0\n"), "{}", c.read(&state));
    assert_eq!(c.read(&format!("jobs/{id}/stdout")), "from etcd\n");
    assert_eq!(std::fs::read_to_string(c.state.join("secret")).unwrap(), secret);
    // A head whose spool lacks an ended job's output (another head's, without a shared_dir
    // between them; here it is removed) says so rather than show the job as silent.
    std::fs::remove_dir_all(c.state.join("spool").join(id.to_string())).unwrap();
    let stdout = std::fs::read(c.path(&format!("jobs/{id}/stdout")));
    assert_eq!(stdout.map_err(|e| e.raw_os_error()), Err(Some(libc::EIO)));
    let why = c.read(&format!("jobs/{id}/error"));
    assert!(why.contains("10 bytes were spooled") && why.contains("shared_dir"), "{why}");

    // One member down: nothing stops.
    etcd.kill(0);
    let started = Instant::now();
    let id2 = crate::jobs::submit_as(&c, "root", "echo one member down\n");
    assert_eq!(wait(&c, id2), "0\n");
    assert_eq!(c.write("groups/g2", b"cn0\n"), Ok(()), "{}\n{}", c.read("groups/error"), c.log());
    eprintln!("etcd with one member of 3 down: a job submitted and done in {:?}", started.elapsed());
    // A head started while that member is down gets its lease and leads (requests sent to the
    // dead member are asked again of another).
    c.crash_head();
    c.start_head();
    assert_eq!(c.read("groups/g2"), "cn0\n");
    assert_eq!(c.write("groups/g2", b"cn1\n"), Ok(()), "{}\n{}", c.read("groups/error"), c.log());

    // Two down: no quorum. Writes are refused with EROFS and a sentence; reads go on.
    etcd.kill(1);
    let started = Instant::now();
    assert_eq!(c.write("groups/g3", b"cn0\n"), Err(libc::EROFS));
    let refused_in = started.elapsed();
    let why = c.read("groups/error");
    assert!(why.contains("EROFS") && why.contains("store is unreachable, so writes are refused"), "{why}");
    assert_eq!(write_and_close(&c, "jobs/new", b"echo no quorum\n"), Err(libc::EROFS));
    assert!(c.read("jobs/error").contains("store is unreachable"), "{}", c.read("jobs/error"));
    assert!(c.try_read("groups/g3").is_none(), "a refused group was made");
    assert_eq!(c.read("groups/g2"), "cn1\n");
    assert_eq!(c.read(&format!("jobs/{id2}/stdout")), "one member down\n");
    assert_eq!(c.read("nodes/all"), "cn[0-1]\n");
    eprintln!("etcd without a quorum: a write refused in {refused_in:?}");
    // Without its store a head still stops when asked (stop_head kills it after 10 s).
    let started = Instant::now();
    c.stop_head();
    assert!(started.elapsed() < Duration::from_secs(9), "SIGTERM took {:?}", started.elapsed());
    assert!(!c.is_mounted(), "the mount stayed");
}

#[test]
fn store_copy_moves_an_embedded_site_into_etcd() {
    if !crate::can_mount() {
        return;
    }
    let Some(etcd) = Etcd::start(3) else { return };
    let mut c = Cluster::up("cn[0-1]", 200);
    assert_eq!(c.write("groups/g1", b"cn1\n"), Ok(()));
    let id = crate::jobs::submit_as(&c, "root", "echo before the move\n");
    assert_eq!(wait(&c, id), "0\n");
    let secret = std::fs::read_to_string(c.state.join("secret")).unwrap();

    let copy = |from: &str, to: &str| {
        Command::new(bin("clusterfs")).args(["store", "copy", "--from", from, "--to", to]).output().unwrap()
    };
    let state = c.state.to_string_lossy().to_string();
    // A head still holds its store: refused, with a reason.
    let out = copy(&state, &etcd.url("moved"));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is a head still using it"), "{out:?}");

    c.stop_head();
    let out = copy(&state, &etcd.url("moved"));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("copied"), "{out:?}");
    // Copying again into a store that has objects is refused.
    let out = copy(&state, &etcd.url("moved"));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already holds objects"), "{out:?}");

    // The site, started on etcd with a fresh state directory's secret gone: the same cluster.
    std::fs::remove_file(c.state.join("store.redb")).unwrap();
    std::fs::remove_file(c.state.join("secret")).unwrap();
    use_store(&c, &etcd.url("moved"));
    c.start_head();
    assert_eq!(std::fs::read_to_string(c.state.join("secret")).unwrap(), secret);
    assert_eq!(c.read("groups/g1"), "cn1\n");
    assert_eq!(c.read(&format!("jobs/{id}/state")), "done 0\n");
    let id2 = crate::jobs::submit_as(&c, "root", "echo after the move\n");
    assert_eq!(wait(&c, id2), "0\n");
}

/// A head's default name: the host's short name and its port.
pub fn head_name(c: &Cluster) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let port = c.addr().rsplit_once(':').unwrap().1.to_string();
    format!("{}-{port}", host.trim().split('.').next().unwrap())
}

/// Runs `tail -f` on `path` until stopped; what it printed.
struct Tail(Child);

impl Tail {
    fn start(path: &std::path::Path) -> Tail {
        Tail(Command::new("tail").arg("-f").arg(path).stdout(Stdio::piped()).spawn().expect("tail"))
    }

    fn stop(mut self) -> String {
        let _ = self.0.kill();
        let mut out = String::new();
        self.0.stdout.take().unwrap().read_to_string(&mut out).unwrap();
        let _ = self.0.wait();
        out
    }
}

fn inode(path: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).ino()
}

/// Writes `data` into `rel` of `c`, again while no head leads; how long it took.
pub fn write_when_led(c: &Cluster, rel: &str, data: &[u8]) -> Duration {
    let started = Instant::now();
    loop {
        match c.write(rel, data) {
            Ok(()) => return started.elapsed(),
            Err(e) if started.elapsed() < Duration::from_secs(30) => {
                let why = || std::fs::read_to_string(c.path(rel).with_file_name("error")).unwrap_or_default();
                assert!([libc::EAGAIN, libc::EHOSTDOWN, libc::EROFS].contains(&e), "errno {e}: {}\n{}", why(), c.log());
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("no head took writes for 30 s (errno {e}):\n{}", c.log()),
        }
    }
}

/// How many times a head's log says it loaded the cluster from its watched copy of the store
/// (a copy that lagged is dropped at once, with another line, and not counted).
fn loads_from_copy(log: &str) -> usize {
    let dropped = log.lines().filter(|l| l.contains("scans read this head's copy of the store: dropped it"));
    dropped.filter(|l| !l.ends_with(" served=0")).count()
}

#[test]
fn two_heads_serve_one_cluster_and_the_other_leads_when_the_leader_is_killed() {
    if !crate::can_mount() {
        return;
    }
    let Some(mut etcd) = Etcd::start(3) else { return };
    // Job output is spooled where both heads see it.
    let shared = tempfile::tempdir().unwrap();
    let volumes = crate::images::Volumes::new();
    crate::jobs::users();
    let config = format!(
        "store = \"{}\"\nlease_ttl_s = 2\nshared_dir = \"{}\"\n{}",
        etcd.url("two"),
        shared.path().display(),
        volumes.config("spares = 0")
    );
    let mut a = Cluster::up_with("", 200, &config);
    let mut b = Cluster::up_with("", 200, &config);
    assert_eq!(std::fs::read(a.secret_file()).unwrap(), std::fs::read(b.secret_file()).unwrap());
    let heads = format!("{},{}", a.addr(), b.addr());
    for n in 1..=2 {
        a.agent_on(&[], &heads, &["--name", &format!("cn{n}")]);
    }
    // cn3 dials the head that does not lead first: that head passes its connection through.
    a.agent_on(&[], &format!("{},{}", b.addr(), a.addr()), &["--name", "cn3"]);
    // An HSM mover (an lhsmtool_cmd-style command) that records each request it runs.
    let ran = shared.path().join("hsm-ran");
    let cmd = format!("echo $CLUSTER_HSM_COOKIE >> {}; sleep 0.02", ran.display());
    a.agent_on(&[], &heads, &["--name", "m1", "--mover", "--mover-command", &cmd, "--max-archive", "4"]);
    let mover_up = eventually(Duration::from_secs(20), || b.try_read("hsm/movers/m1/state").as_deref() == Some("up\n"));
    assert!(mover_up, "{:?}", b.try_read("hsm/movers/m1/state"));
    for c in [&a, &b] {
        let up = eventually(Duration::from_secs(20), || c.read("nodes/up") == "cn[1-3],m1\n");
        assert!(up, "{}\n{}", c.read("nodes/up"), c.log());
    }

    // Submitted on one head: seen, waited for and followed on the other, and the same inodes.
    let id = crate::jobs::submit_as(&a, "root", "for i in 1 2 3 4 5; do echo line $i; sleep 0.3; done\n");
    let stdout = format!("jobs/{id}/stdout");
    let tails = [Tail::start(&a.path(&stdout)), Tail::start(&b.path(&stdout))];
    assert_eq!(wait(&b, id), "0\n", "{}", b.read(&format!("jobs/{id}/state")));
    let lines: String = (1..=5).map(|i| format!("line {i}\n")).collect();
    assert_eq!(b.read(&stdout), lines);
    // Both heads name the one that leads.
    let leader = format!("leader {} addr={} store=etcd\n", head_name(&a), a.addr());
    assert!(b.read("status").starts_with(&leader), "{}", b.read("status"));
    assert!(a.read("status").starts_with(&leader), "{}", a.read("status"));
    // `stat` on the other head sizes a file by what a read gives.
    let state = format!("jobs/{id}/state");
    assert_eq!(std::fs::metadata(b.path(&state)).unwrap().len(), b.read(&state).len() as u64);
    assert_eq!(std::fs::metadata(b.path(&stdout)).unwrap().len(), lines.len() as u64);
    std::thread::sleep(Duration::from_millis(1500));
    for t in tails {
        assert_eq!(t.stop(), lines, "tail -f of the job's stdout");
    }
    for rel in [stdout.as_str(), "jobs/new", "nodes/cn2/sitrep", "groups"] {
        assert_eq!(inode(&a.path(rel)), inode(&b.path(rel)), "{rel}");
    }
    // And the same filesystem UUID, which an NFS server puts in its handles with the inode.
    let uuid = mount_uuid(&a);
    assert_eq!(uuid.len(), 36, "{uuid:?}");
    assert_eq!(mount_uuid(&b), uuid);
    // The leader's commands reach cn3 through the head that holds its connection.
    let on3 = crate::jobs::submit_as(&b, "root", "#CLUSTER nodes=cn3\necho $CLUSTER_NODE\n");
    assert_eq!(wait(&a, on3), "0\n", "{}", a.read(&format!("jobs/{on3}/state")));
    assert_eq!(a.read(&format!("jobs/{on3}/nodes/cn3/stdout")), "cn3\n");
    // Submitted on the other, killed from the first; bad input there gets its own error.
    let long = crate::jobs::submit_as(&b, "root", "sleep 60\n");
    crate::jobs::assert_running(&a, long);
    a.write(&format!("jobs/{long}/ctl"), b"kill\n").unwrap();
    crate::jobs::assert_killed(&wait(&b, long));
    // Removed through the other head: gone from it at once, though it had just looked.
    let gone = b.path(&format!("jobs/{long}"));
    assert!(std::fs::metadata(gone.join("state")).is_ok());
    std::fs::remove_dir(&gone).unwrap();
    let errno = |p: &std::path::Path| std::fs::metadata(p).map_err(|e| e.raw_os_error());
    assert_eq!(errno(&gone).map(|_| ()), Err(Some(libc::ENOENT)));
    assert_eq!(errno(&gone.join("state")).map(|_| ()), Err(Some(libc::ENOENT)));
    assert_eq!(b.write("groups/bad", b"cn[1-\n"), Err(libc::EINVAL));
    assert!(b.read("groups/error").starts_with("EINVAL"), "{}", b.read("groups/error"));
    assert_eq!(a.read("groups/error"), "", "an error is its caller's, on its own mount");
    // A user's job submitted through the head that does not lead runs with the user's groups.
    let team = String::from_utf8(Command::new("getent").args(["group", "cfteam"]).output().unwrap().stdout).unwrap();
    let team_gid = team.split(':').nth(2).unwrap().to_string();
    let grouped = crate::jobs::submit_as(&b, "cfalice", "id -G\n");
    assert_eq!(wait(&a, grouped), "0\n", "{}", a.read(&format!("jobs/{grouped}/state")));
    let groups = a.read(&format!("jobs/{grouped}/stdout"));
    assert!(groups.split_whitespace().any(|g| g == team_gid), "cfteam ({team_gid}) not among {groups:?}");

    // An image made and mounted by its user through the head that does not lead.
    let (code, _, err) = sh_as("cfalice", &format!("mkdir {}", b.path("images/cfalice").display()));
    assert_eq!(code, 0, "{err}");
    let ctl = b.path("images/cfalice/ctl");
    let (code, _, err) = sh_as("cfalice", &format!("echo 'mount cn1' > {}", ctl.display()));
    assert_eq!(code, 0, "{err}: {}", b.read("images/cfalice/error"));
    assert!(a.read("images/cfalice/state").starts_with("mounted on cn1\n"), "{}", a.read("images/cfalice/state"));
    assert!(volumes.is_mounted("cfalice"));

    // 200 jobs, queued and running, when the leading head is SIGKILLed: each ends once.
    let marks_file = shared.path().join("marks");
    std::fs::write(&marks_file, "").unwrap();
    let m = marks_file.display();
    let ids: Vec<u64> = (0..200)
        .map(|i| {
            let on = if i % 2 == 0 { &a } else { &b };
            crate::jobs::submit_as(on, "root", &format!("echo $CLUSTER_JOB_ID >> {m}; sleep 0.2\n"))
        })
        .collect();
    let requests: String = (1..=300u32)
        .map(|i| format!("{{\"fid\":\"0x200000401:{i:#x}:0x0\",\"cookie\":{i},\"action\":\"archive\"}}\n"))
        .collect();
    b.write("hsm/queue", requests.as_bytes()).unwrap();
    a.crash_head();
    let took = write_when_led(&b, "groups/after", b"cn[1-3]\n");
    eprintln!("two heads: the other head took writes {took:?} after the leader's SIGKILL (lease_ttl_s = 2)");
    assert!(took < Duration::from_secs(10), "failover took {took:?}");
    let up = eventually(Duration::from_secs(20), || b.read("nodes/up") == "cn[1-3],m1\n");
    assert!(up, "the agents did not come to the new leader: {}\n{}", b.read("nodes/up"), b.log());
    for id in &ids {
        assert_eq!(wait(&b, *id), "0\n", "job {id}: {}", b.read(&format!("jobs/{id}/state")));
    }
    let mut want = ids.clone();
    want.sort_unstable();
    assert_eq!(crate::faults::marks(&marks_file), want, "each job ran exactly once");
    let all_ran =
        eventually(Duration::from_secs(60), || std::fs::read_to_string(&ran).is_ok_and(|l| l.lines().count() >= 300));
    assert!(
        all_ran,
        "HSM requests ran: {:?}; hsm/status:\n{}\n{}",
        std::fs::read_to_string(&ran).map(|l| l.lines().count()),
        b.read("hsm/status"),
        b.log()
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(crate::hsm::cookies_ran(&ran), (1..=300).collect::<Vec<_>>(), "each HSM request ran exactly once");
    // The image's lease holds across the failover: still mounted on cn1, once.
    assert!(b.read("images/cfalice/state").starts_with("mounted on cn1\n"), "{}", b.read("images/cfalice/state"));
    assert_eq!(b.write("images/cfalice/ctl", b"mount cn2\n"), Err(libc::EBUSY));
    assert_eq!(volumes.loops().len(), 1, "{:?}", volumes.loops());
    assert_eq!(b.write("images/cfalice/ctl", b"umount\n"), Ok(()), "{}", b.read("images/cfalice/error"));
    assert!(!volumes.is_mounted("cfalice"));
    // Output the dead head spooled is read from the new leader.
    assert_eq!(b.read(&stdout), lines);
    // It loaded the cluster from the copy etcd's watch kept on it (every scan, none from
    // etcd itself), and that copy had the removal it was told of, as well as the 200 jobs.
    assert_eq!(loads_from_copy(&b.log()), 1, "{}", b.log());
    assert_eq!(errno(&b.path(&format!("jobs/{long}"))).map(|_| ()), Err(Some(libc::ENOENT)));

    // The killed head comes back as a follower, and serves the same tree.
    a.start_head();
    assert_eq!(a.read(&format!("jobs/{id}/state")), "done 0\n");
    assert_eq!(a.read("groups/after"), "cn[1-3]\n");
    // One etcd member down: nothing stops.
    etcd.kill(0);
    let id2 = crate::jobs::submit_as(&a, "root", "echo one member down\n");
    assert_eq!(wait(&b, id2), "0\n");
    // The leader stopped with SIGTERM leaves the election: the other leads without waiting
    // for the lease to run out.
    b.stop_head();
    let took = write_when_led(&a, "groups/graceful", b"cn1\n");
    eprintln!("two heads: after the leader's SIGTERM the other took writes in {took:?}");
    assert!(took < Duration::from_secs(10), "took {took:?}");
    let up = eventually(Duration::from_secs(20), || a.read("nodes/up") == "cn[1-3],m1\n");
    assert!(up, "{}\n{}", a.read("nodes/up"), a.log());
    // The restarted head copied the store when it came back, and loaded from that copy (its
    // first load, as the first leader, was the other).
    assert_eq!(loads_from_copy(&a.log()), 2, "{}", a.log());
    assert_eq!(a.read(&format!("jobs/{id2}/state")), "done 0\n");
    // Two members down: writes are refused with a sentence, reads go on.
    etcd.kill(1);
    assert_eq!(a.write("groups/g3", b"cn1\n"), Err(libc::EROFS));
    assert!(a.read("groups/error").contains("store is unreachable"), "{}", a.read("groups/error"));
    assert_eq!(a.read(&format!("jobs/{id2}/stdout")), "one member down\n");
    assert_eq!(a.read(&format!("jobs/{id}/stdout")), lines);
}

/// The filesystem UUID of a head's mount image.
fn mount_uuid(c: &Cluster) -> String {
    let out = Command::new("blkid").args(["-p", "-o", "value", "-s", "UUID"]).arg(c.state.join("mount.img")).output();
    String::from_utf8_lossy(&out.expect("blkid").stdout).trim().to_string()
}

#[test]
fn a_frozen_leader_is_replaced_and_stops_when_it_wakes() {
    if !crate::can_mount() {
        return;
    }
    let Some(etcd) = Etcd::start(3) else { return };
    let shared = tempfile::tempdir().unwrap();
    let config =
        format!("store = \"{}\"\nlease_ttl_s = 2\nshared_dir = \"{}\"\n", etcd.url("frozen"), shared.path().display());
    let mut a = Cluster::up_with("", 200, &config);
    let b = Cluster::up_with("", 200, &config);
    // The agent dials the leader itself: a frozen head keeps the connection open, so the
    // agent must notice that it hears nothing.
    a.agent_on(&[], &format!("{},{}", a.addr(), b.addr()), &["--name", "cn1"]);
    assert!(eventually(Duration::from_secs(20), || b.read("nodes/up") == "cn1\n"), "{}", b.read("nodes/up"));
    assert!(b.read("status").starts_with(&format!("leader {} ", head_name(&a))), "{}", b.read("status"));

    // The leader stops answering without closing anything: its lease runs out and the other
    // head leads, and its mount's calls that were waiting on the frozen head are made again.
    crate::harness::signal(a.head_pid(), libc::SIGSTOP);
    let took = write_when_led(&b, "groups/while_frozen", b"cn1\n");
    eprintln!("frozen leader: the other head took writes {took:?} after SIGSTOP (lease_ttl_s = 2)");
    assert!(b.read("status").starts_with(&format!("leader {} ", head_name(&b))), "{}", b.read("status"));
    let back = Instant::now();
    assert!(eventually(Duration::from_secs(20), || b.read("nodes/up") == "cn1\n"), "{}", b.read("nodes/up"));
    eprintln!("frozen leader: its agent was up on the other head {:?} later", back.elapsed());
    let id = crate::jobs::submit_as(&b, "root", "echo after the freeze\n");
    assert_eq!(wait(&b, id), "0\n");

    // Woken, the old leader finds its lease gone and exits (its writes would be refused: they
    // require the election key it no longer holds).
    crate::harness::signal(a.head_pid(), libc::SIGCONT);
    let exited = eventually(Duration::from_secs(20), || {
        std::fs::read_to_string(format!("/proc/{}/stat", a.head_pid()))
            .map_or(true, |s| s.split(' ').nth(2) == Some("Z"))
    });
    assert!(exited, "the woken leader did not stop:\n{}", a.log());
    assert!(a.log().contains("leads no more"), "{}", a.log());
    assert_eq!(b.read("groups/while_frozen"), "cn1\n");
    assert_eq!(b.read(&format!("jobs/{id}/stdout")), "after the freeze\n");
    a.crash_head();
}

#[test]
fn a_following_head_serves_node_state_from_what_the_leader_sends() {
    if !crate::can_mount() {
        return;
    }
    let Some(etcd) = Etcd::start(3) else { return };
    // A lease that outlasts the leader's freeze below: the other head keeps following.
    let config = format!("store = \"{}\"\nlease_ttl_s = 30\n", etcd.url("live"));
    let mut a = Cluster::up_with("", 100, &config);
    let b = Cluster::up_with("", 100, &config);
    let agent = a.agent_on(&[], &a.addr(), &["--name", "cn1"]);
    let state = |c: &Cluster| std::fs::read_to_string(c.path("nodes/cn1/state")).unwrap_or_default();
    assert!(eventually(Duration::from_secs(20), || state(&b) == "up\n"), "{}", state(&b));
    assert!(b.read("status").starts_with(&format!("leader {} ", head_name(&a))), "{}", b.read("status"));
    // The same keys in the same order on both heads, in each format.
    let keys = |text: String| -> Vec<String> {
        text.lines().filter(|l| !l.starts_with('#')).map(|l| l.split([' ', '{']).next().unwrap().to_string()).collect()
    };
    for file in ["nodes/cn1/sitrep", "nodes/cn1/metrics"] {
        assert_eq!(keys(b.read(file)), keys(a.read(file)), "{file}");
    }
    let json = |c: &Cluster| -> Vec<String> {
        let v: serde_json::Value = serde_json::from_str(&c.read("nodes/cn1/sitrep.json")).unwrap();
        v.as_object().unwrap().keys().cloned().collect()
    };
    assert_eq!(json(&b), json(&a));
    assert!(b.read("nodes/cn1/sitrep").starts_with("name cn1\nstate up\n"), "{}", b.read("nodes/cn1/sitrep"));
    // (A file's content may be as old as the file TTL, 100 ms.)
    let sets = |c: &Cluster| [c.read("nodes/up"), c.read("nodes/drained"), c.read("nodes/best")].concat();
    assert!(eventually(Duration::from_secs(2), || sets(&b) == "cn1\n\ncn1\n"), "{}", sets(&b));
    // Drained through the following head: its own files say so at once.
    b.write("nodes/cn1/ctl", b"drain disk swap\n").unwrap();
    assert_eq!(b.read("nodes/cn1/state"), "drained disk swap\n");
    assert!(eventually(Duration::from_secs(2), || sets(&b) == "\ncn1\n\n"), "{}", sets(&b));
    // Resumed through the leading head: the other head is told.
    a.write("nodes/cn1/ctl", b"resume\n").unwrap();
    assert!(
        eventually(Duration::from_secs(5), || b.read("nodes/cn1/state") == "up\n"),
        "{}",
        b.read("nodes/cn1/state")
    );
    // The READMEs, a node's verbs read back from its ctl, and jobs/new before a write (what
    // each submission opens), are the same on every head.
    let fixed = |c: &Cluster| ["nodes/README", "nodes/cn1/README", "nodes/cn1/ctl", "jobs/new"].map(|f| c.try_read(f));
    let on_leader = fixed(&a);
    assert!(on_leader.iter().all(Option::is_some), "{on_leader:?}");
    // The leading head frozen: the other answers from what it was sent, and there the node
    // turns down as its reports stop coming (8 intervals of 100 ms), as it would on the leader.
    crate::harness::signal(a.head_pid(), libc::SIGSTOP);
    let down = eventually(Duration::from_secs(5), || {
        b.read("nodes/cn1/state").starts_with("down no report for ") && b.read("nodes/down") == "cn1\n"
    });
    let state = b.read("nodes/cn1/state") + &b.read("nodes/down");
    // Listed there too, the node and its directory.
    let listed = |rel: &str| -> String {
        let names = std::fs::read_dir(b.path(rel)).map(|d| d.flatten().map(|e| e.file_name()).collect::<Vec<_>>());
        let mut names: Vec<String> = names.unwrap_or_default().iter().map(|n| n.to_string_lossy().into()).collect();
        names.sort();
        names.join(" ")
    };
    let (nodes, cn1, on_follower) = (listed("nodes"), listed("nodes/cn1"), fixed(&b));
    crate::harness::signal(a.head_pid(), libc::SIGCONT);
    assert_eq!(on_follower, on_leader, "fixed files read while the leader was frozen");
    assert!(down, "{state}");
    assert_eq!(nodes, "README all best cn1 down drained error up", "ls nodes while the leader was frozen");
    assert!(cn1.contains("sitrep") && cn1.contains("state") && cn1.contains("ctl"), "ls nodes/cn1: {cn1}");
    assert!(
        eventually(Duration::from_secs(10), || b.read("nodes/cn1/state") == "up\n"),
        "{}",
        b.read("nodes/cn1/state")
    );
    // Its agent stopped, then the node forgotten through the leading head: gone from the other.
    a.kill_agent(agent);
    let gone = eventually(Duration::from_secs(10), || b.read("nodes/cn1/state") == "down agent disconnected\n");
    assert!(gone, "{}", b.read("nodes/cn1/state"));
    std::fs::remove_dir(a.path("nodes/cn1")).unwrap();
    let forgotten = eventually(Duration::from_secs(5), || std::fs::metadata(b.path("nodes/cn1/sitrep")).is_err());
    assert!(forgotten, "{}", b.read("nodes/cn1/sitrep"));
    assert_eq!(b.read("nodes/all"), "\n");
}

/// Jobs written while a following head is frozen, one revision each.
const JOBS_BEHIND: i64 = 800;

#[test]
fn a_following_head_whose_watch_fell_behind_a_compaction_copies_the_store_again() {
    if !crate::can_mount() {
        return;
    }
    let Some(etcd) = Etcd::start(3) else { return };
    // A long lease, so that the frozen head keeps its place; the leader leaves it by SIGTERM.
    let config = format!("store = \"{}\"\nlease_ttl_s = 60\n", etcd.url("behind"));
    let mut a = Cluster::up_with("", 200, &config);
    let mut b = Cluster::up_with("", 200, &config);
    assert!(b.read("status").starts_with(&format!("leader {} ", head_name(&a))), "{}", b.read("status"));
    // Frozen, the second head reads nothing from its watch: etcd holds back what it has to send
    // it, then compacts those changes away. etcd queues up to 128 answers for a watch however
    // large, and the sockets and HTTP/2 window on the way hold some MiB more: so the jobs go
    // one at a time, each its own revision, 800 of 64 KiB (50 MiB).
    crate::harness::signal(b.head_pid(), libc::SIGSTOP);
    let script = format!("true\n{}\n", "#".repeat(64 << 10));
    let before = etcd.revision();
    for _ in 0..JOBS_BEHIND {
        write_and_close(&a, "jobs/new", script.as_bytes()).unwrap();
    }
    let revision = etcd.compact();
    assert!(revision - before >= JOBS_BEHIND, "{JOBS_BEHIND} jobs took revisions {before} to {revision}");
    crate::harness::signal(b.head_pid(), libc::SIGCONT);
    // Copied again whole (50 MiB: seconds on a loaded machine, longer than a takeover waits
    // for the copy to catch up before it reads etcd itself).
    let copied_again = eventually(Duration::from_secs(30), || {
        b.log().split_once("fell behind etcd's compaction").is_some_and(|(_, after)| after.contains("copied the store"))
    });
    assert!(copied_again, "compacted at {revision}:\n{}", b.log());
    // It loads the cluster from the new copy when it takes over, with every job.
    a.stop_head();
    write_when_led(&b, "groups/after", b"cn1\n");
    assert_eq!(loads_from_copy(&b.log()), 1, "{}", b.log());
    assert_eq!(b.read("jobs/queue").lines().count(), usize::try_from(JOBS_BEHIND).unwrap());
    assert_eq!(b.read(&format!("jobs/{JOBS_BEHIND}/spec")), script);
    b.stop_head();
}

#[test]
fn a_head_sends_its_writes_to_the_member_etcd_elects_to_lead() {
    if !crate::can_mount() {
        return;
    }
    let Some(etcd) = Etcd::start(3) else { return };
    let c = Cluster::up_with("", 200, &format!("store = \"{}\"\n", etcd.url("moved")));
    // The head looks for etcd's leader every 10 s anyway; three times in a row within 3 s of
    // the first write after a move is what an answer's new raft term made it do.
    let looked = || c.log().matches("requests go there").count();
    let before = looked();
    for round in 0..3 {
        let to = etcd.move_leader();
        c.write(&format!("groups/g{round}"), b"cn1\n").unwrap();
        let found = eventually(Duration::from_secs(3), || looked() > before + round);
        let log = c.log();
        assert!(found, "round {round}: the head did not look for etcd's new leader {to}: {log}");
        let last = log.lines().rfind(|l| l.contains("requests go there")).unwrap();
        assert!(last.ends_with(&format!("member=\"{to}\"")), "{last}");
    }
    assert_eq!(c.read("groups/g2"), "cn1\n");
}

#[test]
fn a_head_renews_its_lease_on_a_connection_etcd_keeps_open() {
    if !crate::can_mount() {
        return;
    }
    let Some(etcd) = Etcd::start(3) else { return };
    // Renewed every 10 s: between renewals only HTTP/2 pings cross the connection, and etcd
    // closes one pinged more often than every 5 s, with the lease's stream on it.
    let c = Cluster::up_with("", 200, &format!("store = \"{}\"\nlease_ttl_s = 30\n", etcd.url("pings")));
    std::thread::sleep(Duration::from_millis(11_500));
    let log = c.log();
    assert!(!log.contains("lease renewal failed"), "{log}");
    assert!(c.read("status").starts_with(&format!("leader {} ", head_name(&c))), "{}", c.read("status"));
}

#[test]
fn the_leading_head_compacts_etcd_s_history() {
    if !crate::can_mount() {
        return;
    }
    let Some(etcd) = Etcd::start(3) else { return };
    let config = format!("store = \"{}\"\netcd_compact_s = 1\n", etcd.url("history"));
    let mut a = Cluster::up_with("", 200, &config);
    a.write("groups/g1", b"cn1\n").unwrap();
    let before = etcd.revision();
    a.write("groups/g1", b"cn2\n").unwrap();
    assert!(!etcd.compacted(before), "compacted before the head did");
    // Within two rounds the head compacts up to where etcd stood a round before.
    let compacted = eventually(Duration::from_secs(20), || etcd.compacted(before));
    assert!(compacted, "{}", a.log());
    // (The head logs it once etcd has answered, a moment after etcd shows it.)
    let logged = eventually(Duration::from_secs(5), || a.log().contains("compacted etcd's history"));
    assert!(logged, "{}", a.log());
    // Nothing the cluster holds now is lost, and it goes on taking writes.
    assert_eq!(a.read("groups/g1"), "cn2\n");
    a.write("groups/g2", b"cn3\n").unwrap();
    a.stop_head();
    a.start_head();
    assert_eq!(a.read("groups/g1"), "cn2\n");
    assert_eq!(a.read("groups/g2"), "cn3\n");
    a.stop_head();
}
