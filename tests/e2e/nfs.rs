//! The tree re-exported over NFS by nfs-ganesha and read with the libnfs client, as a login host would.

use std::ffi::{CStr, CString, c_char, c_int, c_void};
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
        if !Command::new("pgrep").arg("-x").arg("rpcbind").stdout(Stdio::null()).status().is_ok_and(|s| s.success()) {
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
                 MDCACHE {{ Use_Getattr_Directory_Invalidation = true; }}\n\
                 EXPORT {{ Export_Id = 77; Path = {path}; Pseudo = /cluster; Access_Type = RW; \
                 Squash = No_Root_Squash; Protocols = 4; Transports = TCP; SecType = sys; \
                 Attr_Expiration_Time = 0; FSAL {{ Name = VFS; }} }}\n\
                 LOG {{ Default_Log_Level = WARN; }}\n",
                rec = dir.path().join("rec").display(),
                path = path.display()
            ),
        )
        .unwrap();
        let child = Ganesha::spawn(dir.path());
        let g = Ganesha { child, port, _dir: dir };
        g.wait_served();
        Some(g)
    }

    fn spawn(dir: &Path) -> Child {
        Command::new("ganesha.nfsd")
            .args(["-F", "-f"])
            .arg(dir.join("ganesha.conf"))
            .arg("-L")
            .arg(dir.join("log"))
            .arg("-p")
            .arg(dir.join("pid"))
            // As the systemd drop-in does: no stale UUIDs from libblkid's cache file, where a
            // loop device may be listed with the image it held before.
            .env("BLKID_FILE", "/dev/null")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start ganesha.nfsd")
    }

    fn wait_served(&self) {
        let up =
            eventually(Duration::from_secs(20), || self.cat("version").is_some_and(|v| v.starts_with("clusterfs")));
        assert!(up, "nfs-ganesha never served the export");
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the server again on the same export and port.
    fn start(&mut self) {
        self.child = Ganesha::spawn(self._dir.path());
        self.wait_served();
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

/// libnfs (the library behind `nfs-cat`), loaded at run time: a client that keeps an NFS file
/// handle across time, as a login host's kernel does. Only what the tests use.
struct Libnfs {
    ctx: *mut c_void,
    open: unsafe extern "C" fn(*mut c_void, *const c_char, c_int, *mut *mut c_void) -> c_int,
    pread: unsafe extern "C" fn(*mut c_void, *mut c_void, u64, u64, *mut c_char) -> c_int,
    pwrite: unsafe extern "C" fn(*mut c_void, *mut c_void, u64, u64, *const c_char) -> c_int,
    close: unsafe extern "C" fn(*mut c_void, *mut c_void) -> c_int,
    get_fh: unsafe extern "C" fn(*mut c_void) -> *const NfsFh,
    error: unsafe extern "C" fn(*mut c_void) -> *const c_char,
}

/// An open file of a `Libnfs` client.
struct NfsFile(*mut c_void);

/// libnfs's `struct nfs_fh`: the NFS file handle's bytes, as the server made them.
#[repr(C)]
struct NfsFh {
    len: c_int,
    val: *const u8,
}

/// dlsym `name` from `lib` as a function pointer of type `F`.
///
/// # Safety
/// `F` must be the C signature of `name` in libnfs 4 (libnfs.so.13).
unsafe fn sym<F: Copy>(lib: *mut c_void, name: &str) -> F {
    let c = CString::new(name).unwrap();
    // SAFETY: lib is a dlopen handle; the caller vouches for the signature.
    unsafe {
        let p = libc::dlsym(lib, c.as_ptr());
        assert!(!p.is_null(), "libnfs has no {name}");
        std::mem::transmute_copy(&p)
    }
}

impl Libnfs {
    /// Mounts the `/cluster` export of `g` over NFSv4.
    fn mount(g: &Ganesha) -> Libnfs {
        type Init = unsafe extern "C" fn() -> *mut c_void;
        type ParseUrl = unsafe extern "C" fn(*mut c_void, *const c_char) -> *const [*const c_char; 3];
        type Mount = unsafe extern "C" fn(*mut c_void, *const c_char, *const c_char) -> c_int;
        let so = CString::new("libnfs.so.13").unwrap();
        // nfsport and version=4 go to the context; the URL gives server and export.
        let url = CString::new(format!("nfs://127.0.0.1/cluster?nfsport={}&version=4", g.port)).unwrap();
        // SAFETY: dlopen of the libnfs 4 library that libnfs-utils installs; each type above is
        // the signature in its nfsc/libnfs.h.
        unsafe {
            let lib = libc::dlopen(so.as_ptr(), libc::RTLD_NOW);
            assert!(!lib.is_null(), "libnfs.so.13 is missing (libnfs-utils)");
            let ctx = sym::<Init>(lib, "nfs_init_context")();
            assert!(!ctx.is_null(), "nfs_init_context");
            let n = Libnfs {
                ctx,
                open: sym(lib, "nfs_open"),
                pread: sym(lib, "nfs_pread"),
                pwrite: sym(lib, "nfs_pwrite"),
                close: sym(lib, "nfs_close"),
                get_fh: sym(lib, "nfs_get_fh"),
                error: sym(lib, "nfs_get_error"),
            };
            // struct nfs_url { char *server; char *path; char *file; }
            let parsed = sym::<ParseUrl>(lib, "nfs_parse_url_dir")(ctx, url.as_ptr());
            assert!(!parsed.is_null(), "nfs_parse_url_dir: {}", n.last_error());
            let [server, export, _] = *parsed;
            let rc = sym::<Mount>(lib, "nfs_mount")(ctx, server, export);
            assert_eq!(rc, 0, "nfs_mount: {}", n.last_error());
            n
        }
    }

    /// Opens `rel` (under the export) read-only; its handle is kept until the test ends.
    fn open(&self, rel: &str) -> NfsFile {
        self.open_with(rel, libc::O_RDONLY)
    }

    fn open_with(&self, rel: &str, flags: c_int) -> NfsFile {
        let path = CString::new(format!("/{rel}")).unwrap();
        let mut fh = std::ptr::null_mut();
        // SAFETY: ctx is live and mounted; fh receives a handle libnfs owns.
        let rc = unsafe { (self.open)(self.ctx, path.as_ptr(), flags, &mut fh) };
        assert_eq!(rc, 0, "nfs_open {rel}: {}", self.last_error());
        NfsFile(fh)
    }

    /// `echo data > rel` as a login host's NFS client does it: open the existing file for
    /// writing with truncation, write, close.
    fn write(&self, rel: &str, data: &[u8]) -> Result<(), i32> {
        let f = self.open_with(rel, libc::O_WRONLY | libc::O_TRUNC);
        // SAFETY: data is valid for its length; f is an open handle of ctx, closed once here.
        let (n, closed) = unsafe {
            let n = (self.pwrite)(self.ctx, f.0, 0, data.len() as u64, data.as_ptr().cast::<c_char>());
            (n, (self.close)(self.ctx, f.0))
        };
        match (n, closed) {
            (n, _) if n < 0 => Err(n),
            (_, c) if c < 0 => Err(c),
            (n, _) if n as usize != data.len() => Err(-libc::EIO),
            _ => Ok(()),
        }
    }

    /// The whole content of `f`, read through its handle; Err(-errno) as libnfs returns it.
    fn read(&self, f: &NfsFile) -> Result<String, i32> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            // SAFETY: buf has room for the count asked; fh is an open handle of ctx.
            let n = unsafe {
                (self.pread)(self.ctx, f.0, out.len() as u64, buf.len() as u64, buf.as_mut_ptr().cast::<c_char>())
            };
            match n {
                0 => return Ok(String::from_utf8_lossy(&out).into_owned()),
                n if n < 0 => return Err(n),
                n => out.extend_from_slice(&buf[..n as usize]),
            }
        }
    }

    /// The NFS file handle of `f`: what a client keeps and sends back, across server restarts.
    fn handle(&self, f: &NfsFile) -> Vec<u8> {
        // SAFETY: f is an open nfsfh; libnfs returns its nfs_fh, len bytes at val.
        unsafe {
            let fh = &*(self.get_fh)(f.0);
            std::slice::from_raw_parts(fh.val, fh.len as usize).to_vec()
        }
    }

    fn last_error(&self) -> String {
        // SAFETY: ctx is live; libnfs returns NULL or a NUL-terminated string it owns.
        unsafe {
            let e = (self.error)(self.ctx);
            if e.is_null() { String::new() } else { CStr::from_ptr(e).to_string_lossy().into_owned() }
        }
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
    // A sitrep is live: its length can change between the client's GETATTR and its READ
    // when both are slow. nfs-cat failed on it once in a full run on a loaded machine (not
    // reproduced alone); the read is tried up to three times.
    let remote = (0..3).find_map(|_| nfs.cat("nodes/cn1/sitrep")).expect("nfs-cat of a sitrep");
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

    // Root on a login host makes a group with a client that can only create files (nfs-cp).
    // The NFS server sets the mode its client asked for on the file it made: that is taken.
    // A refused nodeset makes nothing, and the corrected copy right after it makes the group.
    let cp = |name: &str, text: &str| {
        let from = c.dir.path().join(name);
        std::fs::write(&from, text).unwrap();
        Command::new("nfs-cp").arg(&from).arg(nfs.url("groups/login")).output().unwrap()
    };
    let out = cp("bad", "cn[0-\n");
    assert!(!out.status.success(), "a bad nodeset was taken");
    assert!(c.read("groups/error").starts_with("EINVAL: group login: "), "{}", c.read("groups/error"));
    assert!(c.try_read("groups/login").is_none(), "a refused group was made");
    let out = cp("good", "cn[1-2]\n");
    assert!(out.status.success(), "nfs-cp: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(c.read("groups/login"), "cn[1-2]\n");
    assert_eq!(nfs.cat("groups/login").as_deref(), Some("cn[1-2]\n"));
}

/// The numeric entries of `jobs/` over NFS (job ids), in listing order.
fn job_ids(nfs: &Ganesha) -> Vec<u64> {
    nfs.ls("jobs").into_iter().filter_map(|(n, _)| n.parse().ok()).collect()
}

#[test]
fn over_nfs_a_job_is_submitted_its_output_read_as_it_grows_and_read_again_after_a_head_restart() {
    if !crate::can_mount() {
        return;
    }
    let mut c = Cluster::up("cn0", 200);
    let Some(mut nfs) = Ganesha::export(&c.mnt) else { return };
    let client = Libnfs::mount(&nfs);
    // A script without binaries on a login host: `echo spec > jobs/new` over NFS.
    client.write("jobs/new", b"for i in $(seq 1 10); do echo line $i; sleep 1; done\n").unwrap();
    let mut ids = Vec::new();
    assert!(eventually(Duration::from_secs(10), || {
        ids = job_ids(&nfs);
        !ids.is_empty()
    }));
    assert_eq!(ids.len(), 1, "one job: {ids:?}");
    let id = ids[0];
    let stdout = client.open(&format!("jobs/{id}/stdout"));
    // Read while it runs: some lines, not all; then all of them, through the same handle.
    let mut partial = String::new();
    let grew = eventually(Duration::from_secs(10), || {
        partial = client.read(&stdout).unwrap();
        partial.starts_with("line 1\n") && !partial.contains("line 10")
    });
    assert!(grew, "stdout never seen partly written: {partial:?}");
    // A client that can only create new files (nfs-cp never writes over jobs/new) copies its
    // spec in under a name of its own; the name goes once the job is made.
    let spec = c.dir.path().join("spec.sh");
    std::fs::write(&spec, "echo copied in\n").unwrap();
    let out = Command::new("nfs-cp").arg(&spec).arg(nfs.url("jobs/spec.sh")).output().unwrap();
    assert!(out.status.success(), "nfs-cp: {}", String::from_utf8_lossy(&out.stderr));
    let mut copied = Vec::new();
    assert!(eventually(Duration::from_secs(10), || {
        copied = job_ids(&nfs).into_iter().filter(|j| *j != id).collect();
        copied.len() == 1
    }));
    let read = |file: &str| client.read(&client.open(&format!("jobs/{}/{file}", copied[0])));
    let ran = eventually(Duration::from_secs(60), || read("state") == Ok("done 0\n".into()));
    assert!(ran, "the copied-in job: state {:?}, stderr {:?}", read("state"), read("stderr"));
    assert_eq!(read("stdout"), Ok("copied in\n".into()));
    assert!(!nfs.ls("jobs").iter().any(|(n, _)| n == "spec.sh"), "the spec file stayed");
    let all: String = (1..=10).map(|i| format!("line {i}\n")).collect();
    assert!(eventually(Duration::from_secs(30), || client.read(&stdout).unwrap() == all), "{:?}", client.read(&stdout));
    // (Read to EOF with libnfs: nfs-cat reads until the size it was told at open, so it
    // loops forever on a file that shrank in between, whoever serves it.)
    let state_now = || client.read(&client.open(&format!("jobs/{id}/state")));
    let done = eventually(Duration::from_secs(10), || state_now() == Ok("done 0\n".into()));
    assert!(done, "{:?}", state_now());

    // The server's caches dropped: the handle still resolves.
    std::fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
    assert_eq!(client.read(&stdout), Ok(all.clone()));
    let paths = [format!("jobs/{id}/stdout"), format!("jobs/{id}/state"), "nodes/cn0/state".into()];
    let handles: Vec<Vec<u8>> = paths.iter().map(|p| client.handle(&client.open(p))).collect();
    // The tree is mounted on a loop device of the head's state: the mount's identity, which
    // ganesha puts in every handle, is that image's UUID.
    assert_eq!(mount_type(&c.mnt).as_deref(), Some("fuseblk.clusterfs"));
    // The head restarts, and with it the NFS server (its export was the old mount, now dead:
    // EIO through it until it restarts).
    c.crash_head();
    assert!(client.read(&stdout).is_err(), "the export of a dead mount still served");
    nfs.stop();
    // Meanwhile other mounts take the device numbers the old mount had.
    let squatters = Squatters::new(&c.dir.path().join("squat"));
    c.start_head();
    nfs.start();
    let again = Libnfs::mount(&nfs);
    let same = paths.iter().zip(&handles).filter(|(p, h)| again.handle(&again.open(p)) == **h).count();
    // A login host's kernel keeps the handles it has and sends them again: they still name
    // the same files, so nothing it has open goes stale.
    assert_eq!(same, paths.len(), "nfs handles changed at a head restart");
    assert_eq!(again.read(&again.open(&format!("jobs/{id}/state"))), Ok("done 0\n".into()));
    assert_eq!(again.read(&again.open(&format!("jobs/{id}/stdout"))), Ok(all));
    drop(squatters);
}

/// The filesystem type of the mount at `path`, from mountinfo.
fn mount_type(path: &Path) -> Option<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let path = path.to_str()?;
    let line = info.lines().find(|l| l.split(' ').nth(4) == Some(path))?;
    Some(line.split(" - ").nth(1)?.split(' ').next()?.to_string())
}

/// A tmpfs mount and a loop device made while a head is down, so the numbers its mount had
/// are taken when it comes back; both go on drop.
struct Squatters {
    dir: std::path::PathBuf,
    loop_dev: Option<String>,
}

impl Squatters {
    fn new(dir: &Path) -> Squatters {
        std::fs::create_dir_all(dir).unwrap();
        let mounted = Command::new("mount").args(["-t", "tmpfs", "squat"]).arg(dir).status().unwrap();
        assert!(mounted.success());
        let img = dir.with_extension("img");
        std::fs::File::create(&img).unwrap().set_len(1 << 20).unwrap();
        let out = Command::new("losetup").args(["--find", "--show"]).arg(&img).output().unwrap();
        let loop_dev = out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string());
        Squatters { dir: dir.to_path_buf(), loop_dev }
    }
}

impl Drop for Squatters {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.dir, nix::mount::MntFlags::MNT_DETACH);
        if let Some(d) = &self.loop_dev {
            let _ = Command::new("losetup").args(["--detach", d]).status();
        }
    }
}

#[test]
fn a_5000_entry_jobs_listing_over_nfs_is_complete_without_duplicates() {
    if !crate::can_mount() {
        return;
    }
    let c = Cluster::up("cn0", 200);
    // Queued, not run: the one node is drained.
    c.write("nodes/cn0/ctl", b"drain listing test\n").unwrap();
    let mut want = Vec::new();
    for _ in 0..5000 {
        let mut f = std::fs::OpenOptions::new().read(true).write(true).open(c.path("jobs/new")).unwrap();
        std::io::Write::write_all(&mut f, b"true\n").unwrap();
        let mut id = String::new();
        std::io::Read::read_to_string(&mut f, &mut id).unwrap();
        want.push(id.trim().parse::<u64>().unwrap());
    }
    want.sort_unstable();
    let Some(nfs) = Ganesha::export(&c.mnt) else { return };
    let listed = job_ids(&nfs);
    let mut seen = listed.clone();
    seen.sort_unstable();
    seen.dedup();
    assert_eq!(seen.len(), listed.len(), "duplicates in the listing");
    assert_eq!(seen, want, "the listing over NFS is not every job");
}

/// Two heads of one cluster (state in etcd), each exported by its own NFS server: a login
/// host that moves from one export to the other finds every file under the handle it had.
#[test]
fn a_login_host_moved_to_another_heads_export_keeps_its_nfs_handles() {
    if !crate::can_mount() {
        return;
    }
    let Some(etcd) = crate::etcd::Etcd::start(1) else { return };
    let shared = tempfile::tempdir().unwrap();
    let config = format!("store = \"{}\"\nshared_dir = \"{}\"\n", etcd.url("nfs-failover"), shared.path().display());
    let mut a = Cluster::up_with("", 200, &config);
    let b = Cluster::up_with("", 200, &config);
    a.agent_on(&[], &format!("{},{}", a.addr(), b.addr()), &["--name", "cn1"]);
    for c in [&a, &b] {
        let up = eventually(Duration::from_secs(20), || c.read("nodes/up") == "cn1\n");
        assert!(up, "{}", c.read("nodes/up"));
    }
    let id = crate::jobs::submit_as(&b, "root", "echo through the other head\n");
    assert_eq!(crate::jobs::wait(&a, id), "0\n", "{}", a.read(&format!("jobs/{id}/state")));
    let stdout = format!("jobs/{id}/stdout");
    let paths = [stdout.clone(), format!("jobs/{id}/state"), "nodes/cn1/state".into(), "version".into()];

    let Some(mut first) = Ganesha::export(&a.mnt) else { return };
    let client = Libnfs::mount(&first);
    assert_eq!(client.read(&client.open(&stdout)), Ok("through the other head\n".into()));
    let handles: Vec<Vec<u8>> = paths.iter().map(|p| client.handle(&client.open(p))).collect();
    first.stop();
    // The login host's server now exports the other head's mount.
    let second = Ganesha::export(&b.mnt).expect("nfs-ganesha ran a moment ago");
    let again = Libnfs::mount(&second);
    for (p, h) in paths.iter().zip(&handles) {
        assert_eq!(&again.handle(&again.open(p)), h, "{p}: its NFS handle differs between the heads' exports");
    }
    assert_eq!(again.read(&again.open(&stdout)), Ok("through the other head\n".into()));
}
