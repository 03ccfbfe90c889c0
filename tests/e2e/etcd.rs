//! The etcd store: a real 3-member etcd cluster on loopback ports, heads that keep their
//! state in it, a site moved into it with `clusterfs store copy`, and members killed.

use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::{Cluster, bin, eventually};
use crate::jobs::wait;

/// An etcd cluster of `n` members, each a process with its own data directory; killed on drop.
pub struct Etcd {
    members: Vec<Option<Child>>,
    client_ports: Vec<u16>,
    _dir: tempfile::TempDir,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
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
        let client_ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let peer_ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
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
    assert_eq!(c.write("groups/g1", b"cn[0-1]\n"), Ok(()), "{}", c.read("groups/error"));
    let id = crate::jobs::submit_as(&c, "root", "echo from etcd\n");
    assert_eq!(wait(&c, id), "0\n");
    let secret = std::fs::read_to_string(c.state.join("secret")).unwrap();

    // A head SIGKILLed and started again has it all, from etcd; its agent is let in again.
    c.crash_head();
    c.start_head();
    assert_eq!(c.read("groups/g1"), "cn[0-1]\n");
    assert_eq!(c.read(&format!("jobs/{id}/state")), "done 0\n");
    assert_eq!(c.read(&format!("jobs/{id}/stdout")), "from etcd\n");
    assert_eq!(std::fs::read_to_string(c.state.join("secret")).unwrap(), secret);

    // One member down: nothing stops.
    etcd.kill(0);
    let started = Instant::now();
    let id2 = crate::jobs::submit_as(&c, "root", "echo one member down\n");
    assert_eq!(wait(&c, id2), "0\n");
    assert_eq!(c.write("groups/g2", b"cn0\n"), Ok(()), "{}\n{}", c.read("groups/error"), c.log());
    eprintln!("etcd with one member of 3 down: a job submitted and done in {:?}", started.elapsed());

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
    assert_eq!(c.read("groups/g2"), "cn0\n");
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
