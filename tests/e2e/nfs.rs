//! The tree re-exported over NFS by nfs-ganesha and read with the libnfs client, as a login host would.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use clusterfs::sitrep::KEYS;

use crate::harness::{Cluster, eventually};

/// nfs-ganesha exporting one directory on 127.0.0.1; killed on drop.
struct Ganesha {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Ganesha {
    fn export(path: &Path) -> Option<Ganesha> {
        if Command::new("ganesha.nfsd").arg("-v").output().is_err() {
            assert_ne!(std::env::var("CI").as_deref(), Ok("true"), "CI=true but nfs-ganesha is missing");
            eprintln!("skipping: nfs-ganesha is not installed (scripts/install-deps)");
            return None;
        }
        // ganesha registers with rpcbind; start it if this machine has none running.
        if !Command::new("pgrep").arg("-x").arg("rpcbind").status().is_ok_and(|s| s.success()) {
            let _ = Command::new("rpcbind").arg("-w").status();
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("rec")).unwrap();
        let conf = dir.path().join("ganesha.conf");
        std::fs::write(
            &conf,
            format!(
                "NFS_CORE_PARAM {{ Enable_UDP = false; NFS_Port = {port}; Bind_addr = 127.0.0.1; Protocols = 4; \
                 Enable_NLM = false; Enable_RQUOTA = false; }}\n\
                 NFSV4 {{ Graceless = true; RecoveryBackend = fs; RecoveryRoot = {rec}; }}\n\
                 EXPORT {{ Export_Id = 77; Path = {path}; Pseudo = /cluster; Access_Type = RW; \
                 Squash = No_Root_Squash; Protocols = 4; Transports = TCP; SecType = sys; FSAL {{ Name = VFS; }} }}\n\
                 LOG {{ Default_Log_Level = WARN; }}\n",
                rec = dir.path().join("rec").display(),
                path = path.display()
            ),
        )
        .unwrap();
        let child = Command::new("ganesha.nfsd")
            .args(["-F", "-f"])
            .arg(&conf)
            .arg("-L")
            .arg(dir.path().join("log"))
            .arg("-p")
            .arg(dir.path().join("pid"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start ganesha.nfsd");
        let g = Ganesha { child, port, _dir: dir };
        let up = eventually(Duration::from_secs(20), || g.cat("version").is_some_and(|v| v.starts_with("clusterfs")));
        assert!(up, "nfs-ganesha never served the export");
        Some(g)
    }

    fn url(&self, rel: &str) -> String {
        format!("nfs://127.0.0.1/cluster/{rel}?nfsport={}&version=4", self.port)
    }

    fn cat(&self, rel: &str) -> Option<String> {
        let out = Command::new("nfs-cat").arg(self.url(rel)).output().ok()?;
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// (name, size) of each entry of a directory.
    fn ls(&self, rel: &str) -> Vec<(String, u64)> {
        let out = Command::new("nfs-ls").arg(self.url(rel)).output().expect("nfs-ls");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                Some((f.last()?.to_string(), f.get(f.len().checked_sub(2)?)?.parse().ok()?))
            })
            .collect()
    }
}

impl Drop for Ganesha {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn login_hosts_read_the_tree_over_nfs() {
    if !crate::can_mount() {
        return;
    }
    let c = Cluster::up("cn[0-2]", 200);
    c.write("nodes/cn2/ctl", b"drain nfs test").unwrap();
    let Some(nfs) = Ganesha::export(&c.mnt) else { return };

    let names: Vec<String> = nfs.ls("nodes").into_iter().map(|e| e.0).collect();
    for want in ["all", "up", "down", "drained", "best", "cn0", "cn1", "cn2"] {
        assert!(names.iter().any(|n| n == want), "{want} missing from {names:?}");
    }
    assert_eq!(nfs.cat("nodes/all").unwrap(), "cn[0-2]\n");
    assert_eq!(nfs.cat("nodes/drained").unwrap(), "cn2\n");
    assert_eq!(nfs.cat("nodes/cn2/state").unwrap(), c.read("nodes/cn2/state"));

    // A sitrep over NFS has the local format: every key, in order, numbers where numbers go.
    let remote = nfs.cat("nodes/cn1/sitrep").unwrap();
    let local = c.read("nodes/cn1/sitrep");
    let keys = |s: &str| s.lines().map(|l| l.split(' ').next().unwrap().to_string()).collect::<Vec<_>>();
    assert_eq!(keys(&remote), keys(&local));
    assert_eq!(keys(&remote), KEYS.iter().map(|k| k.0.to_string()).collect::<Vec<_>>());
    for line in remote.lines() {
        let (k, v) = line.split_once(' ').unwrap();
        if !["name", "state", "agent_version"].contains(&k) {
            assert!(v.parse::<f64>().is_ok(), "{line}");
        }
    }
    // Sizes an NFS client sees are the bytes it reads.
    for (name, size) in nfs.ls("nodes/cn2") {
        if ["state", "README", "ctl"].contains(&name.as_str()) {
            assert_eq!(size, nfs.cat(&format!("nodes/cn2/{name}")).unwrap().len() as u64, "{name}");
        }
    }
}
