//! Agents against a live head: forged, replayed, misnamed and oversized connections are refused.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use clusterfs::auth::{Secret, agent_handshake};
use clusterfs::proto::{Conn, ProtoError};

use crate::harness::{Cluster, eventually};

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
    assert!(eventually(Duration::from_secs(5), || c.read("nodes/cn5/state").starts_with("down")));
    // Replaying its bytes verbatim: the head's fresh nonce makes the old proof worthless.
    let mut s = TcpStream::connect(c.addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(&recorded).unwrap();
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.contains("challenge") && !answer.contains("welcome"), "{answer}");
    assert!(c.read("nodes/cn5/state").starts_with("down"), "the replay brought cn5 up");
    assert!(eventually(Duration::from_secs(2), || c.log().contains("does not know the cluster secret")));
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
    assert!(eventually(Duration::from_secs(2), || c.read("nodes/cn0/state") == "up\n"));
    assert!(c.log().contains("already connected"));
}
