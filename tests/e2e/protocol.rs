//! Agents against a live head: forged, replayed, misnamed and oversized connections are refused.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use clusterfs::auth::{Secret, agent_handshake};
use clusterfs::jobs::Exit;
use clusterfs::proto::{Conn, Frame, Message, ProtoError};

use crate::harness::{Cluster, Gate, eventually};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

/// Runs a handshake as `node` with the secret in `secret_file`.
fn handshake(addr: &str, secret_file: &std::path::Path, node: &str) -> Result<u64, ProtoError> {
    rt().block_on(async {
        let s = tokio::net::TcpStream::connect(addr).await?;
        let mut conn = Conn::new(s, 1 << 20);
        let secret = Secret::load(secret_file).unwrap();
        agent_handshake(&mut conn, &secret, node).await
    })
}

#[test]
fn wrong_secret_is_refused_and_changes_nothing() {
    if !crate::can_mount() {
        return;
    }
    let c = Cluster::up("cn0", 200);
    let forged = c.dir.path().join("forged");
    std::fs::write(&forged, format!("{}\n", "ab".repeat(32))).unwrap();
    std::fs::set_permissions(&forged, std::fs::Permissions::from_mode(0o600)).unwrap();
    let r = handshake(&c.addr(), &forged, "cn7");
    assert!(matches!(r, Err(ProtoError::Auth(_))), "{r:?}");
    assert_eq!(c.read("nodes/all"), "cn0\n", "a rogue agent adds no node");
    // The real secret works, through the same code path.
    assert_eq!(handshake(&c.addr(), &c.secret_file(), "cn8").unwrap(), 200);
    // A real agent given another secret says why it cannot join, and so does the head.
    let log = c.dir.path().join("forged-agent.log");
    let mut agent = std::process::Command::new(crate::harness::bin("clusterfs-agent"))
        .args(["--name", "cn9", "--head", &c.addr(), "--secret-file"])
        .arg(&forged)
        .arg("--state")
        .arg(c.dir.path().join("forged-agent"))
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let said = eventually(Duration::from_secs(10), || {
        std::fs::read_to_string(&log).unwrap_or_default().contains("authentication failed: --secret-file must be")
            && c.log().contains("\"cn9\" hung up on the head's proof: it holds another cluster secret")
    });
    let _ = agent.kill();
    let _ = agent.wait();
    assert!(said, "agent:\n{}\nhead:\n{}", std::fs::read_to_string(&log).unwrap_or_default(), c.log());
    // cn8 joined with the real secret; cn9 never does. (A read within the file TTL of the
    // first one may still show that one's render: wait for a fresh one.)
    assert!(eventually(Duration::from_secs(2), || c.read("nodes/all") == "cn[0,8]\n"), "{}", c.read("nodes/all"));
}

#[test]
fn an_agent_that_cannot_reach_its_head_says_so_once() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, format!("{}\n", "cd".repeat(32))).unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let log = dir.path().join("agent.log");
    // Nothing listens on port 1 of this host.
    let mut agent = std::process::Command::new(crate::harness::bin("clusterfs-agent"))
        .args(["--name", "lonely", "--head", "127.0.0.1:1", "--relay-listen", "127.0.0.1:0", "--secret-file"])
        .arg(&secret)
        .arg("--state")
        .arg(dir.path().join("state"))
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let said = || std::fs::read_to_string(&log).unwrap_or_default().matches("no link to the head").count();
    let seen = eventually(Duration::from_secs(10), || said() == 1);
    // Its redials (several within 2 s) are not said again.
    std::thread::sleep(Duration::from_secs(2));
    let _ = agent.kill();
    let _ = agent.wait();
    assert!(seen && said() == 1, "{}", std::fs::read_to_string(&log).unwrap_or_default());
}

#[test]
fn bad_node_names_are_refused_with_a_reason() {
    if !crate::can_mount() {
        return;
    }
    let c = Cluster::up("cn0", 200);
    let long = "x".repeat(300);
    for bad in ["a/b", "..", "cn 1", long.as_str(), "README", ""] {
        match handshake(&c.addr(), &c.secret_file(), bad) {
            Err(ProtoError::Refused(reason)) => {
                assert!(reason.contains("node name") || reason.contains("reserved"), "{bad:?}: {reason}")
            }
            other => panic!("{bad:?}: {other:?}"),
        }
    }
    assert_eq!(c.read("nodes/all"), "cn0\n");
}

#[test]
fn replayed_handshake_is_refused() {
    if !crate::can_mount() {
        return;
    }
    let c = Cluster::up("cn0", 200);
    // A recording proxy between a genuine agent and the head captures what the agent sent.
    let proxy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let proxy_addr = proxy.local_addr().unwrap().to_string();
    let head_addr = c.addr();
    let recorder = std::thread::spawn(move || {
        let (mut client, _) = proxy.accept().unwrap();
        let mut head = TcpStream::connect(head_addr).unwrap();
        let mut back = head.try_clone().unwrap();
        let mut client_w = client.try_clone().unwrap();
        std::thread::spawn(move || std::io::copy(&mut back, &mut client_w));
        let mut recorded = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = client.read(&mut buf) {
            if n == 0 {
                break;
            }
            recorded.extend_from_slice(&buf[..n]);
            if head.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = head.shutdown(std::net::Shutdown::Both);
        recorded
    });
    assert_eq!(handshake(&proxy_addr, &c.secret_file(), "cn5").unwrap(), 200, "the genuine agent gets in");
    let recorded = recorder.join().unwrap();
    assert!(eventually(Duration::from_secs(15), || c.read("nodes/cn5/state").starts_with("down")));
    // Replaying its bytes verbatim: the head's fresh nonce makes the old proof worthless.
    let mut s = TcpStream::connect(c.addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(&recorded).unwrap();
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.contains("challenge") && !answer.contains("welcome"), "{answer}");
    assert!(c.read("nodes/cn5/state").starts_with("down"), "the replay brought cn5 up");
    assert!(eventually(Duration::from_secs(10), || c.log().contains("does not know the cluster secret")));
}

#[test]
fn oversized_and_junk_frames_close_the_connection_and_the_head_lives() {
    if !crate::can_mount() {
        return;
    }
    let c = Cluster::up("cn0", 200);
    for junk in [
        (u32::MAX).to_be_bytes().to_vec(),              // a 4 GiB frame header
        [&(5u32).to_be_bytes()[..], b"Jnope"].concat(), // not JSON
        [&(3u32).to_be_bytes()[..], b"Z{}"].concat(),   // unknown kind
        vec![0u8; 4096],                                // zeros
    ] {
        let mut s = TcpStream::connect(c.addr()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(&junk).unwrap();
        let mut buf = [0u8; 64];
        // The head closes the connection (0 bytes or a reset), it does not hang or crash.
        let n = s.read(&mut buf).unwrap_or(0);
        assert_eq!(n, 0, "the head answered junk instead of closing");
    }
    assert_eq!(c.read("nodes/up"), "cn0\n");
}

#[test]
fn a_second_agent_cannot_take_a_live_nodes_name() {
    if !crate::can_mount() {
        return;
    }
    let c = Cluster::up("cn0", 200);
    let r = handshake(&c.addr(), &c.secret_file(), "cn0");
    assert!(matches!(&r, Err(ProtoError::Refused(reason)) if reason.contains("already connected")), "{r:?}");
    assert!(eventually(Duration::from_secs(10), || c.read("nodes/cn0/state") == "up\n"));
    assert!(c.log().contains("already connected"));
}

#[test]
fn an_authenticated_agent_cannot_forge_other_nodes_work_and_a_flood_changes_nothing() {
    if !crate::can_mount() {
        return;
    }
    let c = Cluster::up("cn0", 200);
    // The job runs until every forged frame is sent.
    let gate = Gate::new(c.dir.path(), "gate");
    let id = crate::jobs::submit_as(&c, "root", &format!("{}; echo real; exit 4\n", gate.wait()));
    crate::jobs::assert_running(&c, id);
    let queue = c.read("jobs/queue");
    rt().block_on(async {
        let s = tokio::net::TcpStream::connect(c.addr()).await.unwrap();
        let mut conn = Conn::new(s, 1 << 20);
        let secret = Secret::load(&c.secret_file()).unwrap();
        agent_handshake(&mut conn, &secret, "rogue1").await.unwrap();
        // Frames about work that is cn0's, not this node's: an exit, output, a response to a
        // request never sent, the end of an HSM request never given.
        let forged = [
            Message::Exited { run: id, exit: Exit { code: 0, signal: None, reason: None }, len: [0, 0] },
            Message::Progress { run: id, bytes: 1 << 30 },
            Message::Response { id: 424242, result: Err("forged".into()) },
            Message::HsmDone { cookie: 7, status: 0 },
            Message::Runs { runs: Vec::new() },
        ];
        for m in &forged {
            conn.send(m).await.unwrap();
        }
        // A flood: 100,000 frames as fast as the socket takes them, while the tree is read.
        let reads = std::thread::spawn({
            let path = c.path("nodes/cn0/sitrep");
            move || {
                let mut worst = Duration::ZERO;
                for _ in 0..200 {
                    let t = std::time::Instant::now();
                    std::fs::read_to_string(&path).unwrap();
                    worst = worst.max(t.elapsed());
                    std::thread::sleep(Duration::from_millis(10));
                }
                worst
            }
        });
        let mut sent = 0;
        for i in 0..100_000u64 {
            let m =
                Message::Exited { run: id + 1 + i, exit: Exit { code: 1, signal: None, reason: None }, len: [0, 0] };
            if conn.send(&m).await.is_err() {
                break;
            }
            sent += 1;
        }
        let worst = reads.join().unwrap();
        eprintln!(
            "rogue flood: {sent} frames sent; slowest sitrep read {worst:?}; head log {} lines",
            c.log().lines().count()
        );
        // Output for cn0's job, as if it were this node's.
        let bulk = Frame::Bulk { stream: id << 1, offset: 0, data: bytes::Bytes::from_static(b"forged\n") };
        let _ = conn.send_frame(&bulk).await;
    });
    gate.open();
    assert_eq!(crate::jobs::wait(&c, id), "4\n", "a forged exit ended cn0's job");
    assert_eq!(c.read(&format!("jobs/{id}/stdout")), "real\n");
    assert_eq!(c.read(&format!("jobs/{id}/state")), "failed 4\n");
    assert!(queue.contains(&id.to_string()));
    assert_eq!(c.read("jobs/queue"), "", "the flood made jobs");
    assert_eq!(c.read("nodes/up"), "cn0\n", "{}", c.read("nodes/all"));
    // Logged once, then counted when the connection ends, not once a frame.
    let log = c.log();
    assert_eq!(log.matches("frame about a run this node does not have").count(), 1, "{log}");
}
