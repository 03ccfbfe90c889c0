//! Test hosts in their own network namespaces on one bridge: a link can be cut, made lossy or slow.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The hosts' subnet: every net is its own set of namespaces, so nets of tests running side by
/// side never meet.
const SUBNET: &str = "10.99.0";

/// `hosts` network namespaces, each with `eth0` on a bridge in a hub namespace of its own.
/// Everything is deleted on drop, and namespaces a killed test run left are deleted at the next.
pub struct Net {
    prefix: String,
    hosts: usize,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip (iproute2)");
    assert!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}

fn iptables(ns: &str, rule: &[&str]) {
    let out = Command::new("ip").args(["netns", "exec", ns, "iptables"]).args(rule).output().expect("iptables");
    assert!(out.status.success(), "iptables {}: {}", rule.join(" "), String::from_utf8_lossy(&out.stderr));
}

impl Net {
    pub fn new(hosts: usize) -> Net {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        reap_leftovers();
        let prefix = format!("cfs{}-{}-", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        let net = Net { prefix, hosts };
        let hub = net.hub();
        ip(&["netns", "add", &hub]);
        ip(&["-n", &hub, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &hub, "link", "set", "br0", "up"]);
        for i in 0..hosts {
            let ns = net.ns(i);
            let port = format!("v{i}");
            let addr = format!("{}/24", net.ip(i));
            ip(&["netns", "add", &ns]);
            ip(&["-n", &hub, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns]);
            ip(&["-n", &hub, "link", "set", &port, "master", "br0", "up"]);
            ip(&["-n", &ns, "addr", "add", &addr, "dev", "eth0"]);
            ip(&["-n", &ns, "link", "set", "eth0", "up"]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
        }
        net
    }

    fn hub(&self) -> String {
        format!("{}hub", self.prefix)
    }

    /// The namespace of host `i`.
    pub fn ns(&self, i: usize) -> String {
        format!("{}h{i}", self.prefix)
    }

    /// Host `i`'s address.
    pub fn ip(&self, i: usize) -> String {
        format!("{SUBNET}.{}", i + 1)
    }

    /// The command prefix that runs a program in host `i`'s network (and nothing else of it:
    /// the mounts stay the machine's, so a head's mount is seen by the test).
    pub fn on(&self, i: usize) -> Vec<String> {
        vec!["nsenter".into(), format!("--net=/run/netns/{}", self.ns(i)), "--".into()]
    }

    /// Cuts host `i` off: its port leaves the bridge, so every packet to or from it is dropped
    /// silently, as behind a failed switch port. Nothing on the host notices until it times out.
    pub fn cut(&self, i: usize) {
        ip(&["-n", &self.hub(), "link", "set", &format!("v{i}"), "nomaster"]);
    }

    pub fn heal(&self, i: usize) {
        ip(&["-n", &self.hub(), "link", "set", &format!("v{i}"), "master", "br0"]);
    }

    /// Drops `percent` of the packets each host receives, so every link loses that share in
    /// each direction (iptables `statistic`; this kernel has no netem).
    pub fn lossy(&self, percent: u32) {
        let p = format!("{:.4}", f64::from(percent) / 100.0);
        for i in 0..self.hosts {
            let rule = ["-A", "INPUT", "-i", "eth0", "-m", "statistic", "--mode", "random", "--probability", &p];
            iptables(&self.ns(i), &[&rule[..], &["-j", "DROP"]].concat());
        }
    }

    /// A TCP relay in host `i`'s network on `port`, to `to`, that holds every byte `delay` in each
    /// direction: latency on the links that go through it (this kernel has no netem). It runs
    /// until the test process ends.
    pub fn slow_relay(&self, i: usize, port: u16, to: std::net::SocketAddr, delay: Duration) {
        let path = format!("/run/netns/{}", self.ns(i));
        let bind = format!("{}:{port}", self.ip(i));
        let (ready, bound) = mpsc::channel();
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).expect("netns file");
            nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            // Threads started from here are in this network too.
            let listener = TcpListener::bind(&bind).expect("relay bind");
            ready.send(()).unwrap();
            for client in listener.incoming().flatten() {
                let Ok(server) = TcpStream::connect(to) else { continue };
                for (from, into) in [(&client, &server), (&server, &client)] {
                    let (from, into) = (from.try_clone().unwrap(), into.try_clone().unwrap());
                    std::thread::spawn(move || delayed_copy(from, into, delay));
                }
            }
        });
        bound.recv_timeout(Duration::from_secs(10)).expect("the relay never listened");
    }
}

/// Copies `from` into `into`, each chunk `delay` after it was read, in order.
fn delayed_copy(mut from: TcpStream, mut into: TcpStream, delay: Duration) {
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    let writer = std::thread::spawn(move || {
        for (due, chunk) in rx {
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
            if into.write_all(&chunk).is_err() {
                break;
            }
        }
        let _ = into.shutdown(Shutdown::Both);
    });
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if tx.send((Instant::now() + delay, buf[..n].to_vec())).is_err() {
                    break;
                }
            }
        }
    }
    drop(tx);
    let _ = writer.join();
    let _ = from.shutdown(Shutdown::Both);
}

impl Drop for Net {
    fn drop(&mut self) {
        // Deleting a namespace deletes its end of each veth, and with it the other end.
        for i in 0..self.hosts {
            let _ = Command::new("ip").args(["netns", "del", &self.ns(i)]).status();
        }
        let _ = Command::new("ip").args(["netns", "del", &self.hub()]).status();
    }
}

/// Deletes namespaces of test processes that are gone (a run that was SIGKILLed).
fn reap_leftovers() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else { return };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        let Some(pid) = name.strip_prefix("cfs").and_then(|r| r.split('-').next()) else { continue };
        if pid.parse::<u32>().is_ok_and(|p| !std::path::Path::new(&format!("/proc/{p}")).exists()) {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}
