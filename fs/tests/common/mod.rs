//! A small tree for testing the layer: a growing log, a snapshot, a control file, a blocking file.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use clusterfs_fs::{Answer, Caller, Errno, FsError, Kind, Node, Result, Tree, Write};

#[derive(Debug, Default)]
pub struct Toy {
    pub log: Mutex<Vec<u8>>,
    pub counter: AtomicU64,
    /// Set: the `wait` file is ready with this content.
    pub ready: Mutex<Option<String>>,
    /// Handles released, recorded from a task the tree spawned.
    pub released: std::sync::Arc<Mutex<Vec<u64>>>,
    /// Set: the tree says its `node` and `list` are answered elsewhere, and `slow` takes 1.5 s.
    pub remote: std::sync::atomic::AtomicBool,
    /// How many times a directory was listed.
    pub lists: AtomicU64,
}

impl Tree for Toy {
    fn remote(&self, _path: &[&str]) -> bool {
        self.remote.load(Ordering::SeqCst)
    }

    fn node(&self, path: &[&str]) -> Result<Node> {
        match path {
            ["slow"] if self.remote.load(Ordering::SeqCst) => {
                std::thread::sleep(Duration::from_millis(1500));
                Ok(Node::new(Kind::Snapshot, 0o444))
            }
            [] | ["d"] => Ok(Node::dir()),
            ["log"] | ["slowlog"] => Ok(Node::new(Kind::Log, 0o444).size(self.log.lock().unwrap().len() as u64)),
            ["snap"] => Ok(Node::new(Kind::Snapshot, 0o444)),
            ["ctl"] => Ok(Node::new(Kind::Control, 0o666)),
            ["wait"] => Ok(Node::new(Kind::Blocking, 0o444)),
            ["d", "error"] => Ok(Node::new(Kind::Error, 0o444)),
            ["d", "ctl"] => Ok(Node::new(Kind::Control, 0o666)),
            _ => Err(FsError::not_found(path.join("/"))),
        }
    }

    fn list(&self, path: &[&str]) -> Result<Vec<String>> {
        self.lists.fetch_add(1, Ordering::SeqCst);
        match path {
            [] => Ok(["log", "snap", "ctl", "wait", "d"].map(String::from).to_vec()),
            ["d"] => Ok(vec!["error".into(), "ctl".into()]),
            _ => Err(FsError::not_found("dir")),
        }
    }

    fn render(&self, path: &[&str], _caller: &Caller, nonblock: bool) -> Answer<Vec<u8>> {
        match path {
            ["snap"] => {
                let n = self.counter.fetch_add(1, Ordering::SeqCst);
                Answer::Now(Ok(format!("render {n}\n").into_bytes()))
            }
            ["ctl"] | ["d", "ctl"] => Answer::Now(Ok(b"usage: ping\n".to_vec())),
            ["wait"] => match self.ready.lock().unwrap().clone() {
                Some(s) => Answer::Now(Ok(s.into_bytes())),
                None if nonblock => Answer::Now(Err(FsError::new(Errno::Again, "not ready"))),
                None => Answer::later(async {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    Ok(b"done 0\n".to_vec())
                }),
            },
            _ => Answer::Now(Err(FsError::not_found(path.join("/")))),
        }
    }

    fn release(&self, _path: &[&str], _caller: &Caller, handle: u64) {
        // Trees may spawn tasks from any method: the layer runs them inside the runtime.
        let released = self.released.clone();
        tokio::spawn(async move { released.lock().unwrap().push(handle) });
    }

    fn read_log(&self, path: &[&str], _caller: &Caller, offset: u64, size: u32) -> Answer<Vec<u8>> {
        let log = self.log.lock().unwrap();
        let start = (offset as usize).min(log.len());
        let end = (start + size as usize).min(log.len());
        let bytes = log[start..end].to_vec();
        match path {
            // A log whose bytes come from elsewhere (a following head's): answered later.
            ["slowlog"] => Answer::later(async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                Ok(bytes)
            }),
            _ => Answer::Now(Ok(bytes)),
        }
    }

    fn write(&self, path: &[&str], _caller: &Caller, w: Write<'_>) -> Answer<Vec<u8>> {
        match (path, w.data) {
            (_, b"ping\n" | b"ping") => Answer::Now(Ok(format!("pong {}\n", w.handle).into_bytes())),
            (_, b"panic\n") => panic!("a bug in the tree"),
            (["d", "ctl"], _) => Answer::Now(Err(FsError::invalid("d/ctl takes: ping"))),
            _ => Answer::Now(Err(FsError::invalid("ctl takes: ping"))),
        }
    }
}
