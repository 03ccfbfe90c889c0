//! `groups/`: named nodesets root maintains, usable as `@name` wherever a nodeset is.

use std::sync::Arc;
use std::time::SystemTime;

use clusterfs_fs::{Answer, Caller, FsError, Kind, Node, Result};

use super::{Created, ERROR_FILE, FileSpec, README_FILE, blocking, command_text, readme, spec_node};
use crate::head::cluster::Cluster;
use crate::names;

const FILES: &[FileSpec] = &[README_FILE, ERROR_FILE];

/// Largest nodeset text accepted in one write.
const MAX_TEXT: usize = 64 * 1024;

#[derive(Debug)]
pub struct GroupsView {
    cluster: Arc<Cluster>,
    /// Groups created (`echo ... > groups/<name>` opens with O_CREAT) whose nodeset has not
    /// come: a group exists once a good nodeset is written.
    created: Created,
}

fn root_only(caller: &Caller) -> Result<()> {
    if caller.is_root() { Ok(()) } else { Err(FsError::denied("only root may change groups")) }
}

impl GroupsView {
    pub fn new(cluster: Arc<Cluster>) -> GroupsView {
        GroupsView { cluster, created: Created::default() }
    }

    pub fn node(&self, path: &[&str]) -> Result<Node> {
        match path {
            [] => Ok(Node::dir()),
            [name] if self.cluster.group(name).is_some() || self.created.contains(name) => {
                Ok(Node::new(Kind::Control, 0o644).mtime(SystemTime::now()))
            }
            [name] => spec_node(FILES, name).ok_or_else(|| FsError::not_found(format!("group {name}"))),
            _ => Err(FsError::not_found(format!("groups/{}", path.join("/")))),
        }
    }

    pub fn list(&self, path: &[&str]) -> Result<Vec<String>> {
        match path {
            [] => {
                let mut names: Vec<String> = FILES.iter().map(|f| f.name.to_string()).collect();
                names.extend(self.cluster.group_names());
                names.extend(self.created.names());
                names.sort();
                names.dedup();
                Ok(names)
            }
            _ => Err(FsError::new(clusterfs_fs::Errno::NotDir, "not a directory")),
        }
    }

    pub fn render(&self, path: &[&str]) -> Answer<Vec<u8>> {
        Answer::Now(match path {
            ["README"] => Ok(readme(
                "groups/: named nodesets, usable as @name anywhere a nodeset is",
                FILES,
                &[],
                "  w    <name>       the group's nodeset, folded; root writes a nodeset to set it\n\n\
                 Root creates a group by writing it (`echo 'cn[0-7]' > groups/compute`)\n\
                 and removes it with `rm groups/compute`.\n",
            )),
            [name] => match self.cluster.group(name) {
                Some(g) => Ok(format!("{g}\n").into_bytes()),
                None if self.created.contains(name) => Ok(Vec::new()),
                None => Err(FsError::not_found(format!("group {name}"))),
            },
            _ => Err(FsError::not_found(format!("groups/{}", path.join("/")))),
        })
    }

    pub fn write(&self, path: &[&str], caller: &Caller, data: &[u8]) -> Answer<Vec<u8>> {
        let [name] = path else { return Answer::Now(Err(FsError::denied("this file is read-only"))) };
        if let Err(e) = root_only(caller) {
            return Answer::Now(Err(e));
        }
        // Good or refused, a write ends the created name's wait: a refused one leaves no group.
        self.created.take(name);
        let text = match command_text(data, MAX_TEXT) {
            Ok(t) => t.to_string(),
            Err(e) => {
                return Answer::Now(Err(FsError::new(e.errno, format!("{}; write a nodeset like cn[0-7]", e.message))));
            }
        };
        // Check the text now: a group referring to itself would never resolve.
        if let Err(e) = self.cluster.nodeset(&text) {
            return Answer::Now(Err(FsError::invalid(format!("group {name}: {e}"))));
        }
        let (cluster, name) = (self.cluster.clone(), name.to_string());
        blocking(move || cluster.set_group(&name, &text).map(|()| Vec::new()))
    }

    /// `>` of a name: shown until its nodeset is written, made by that write.
    pub fn create(&self, name: &str, caller: &Caller) -> Answer<()> {
        let made = root_only(caller).and_then(|()| names::check("group", name).map_err(FsError::invalid));
        if made.is_ok() {
            self.created.insert(name);
        }
        Answer::Now(made)
    }

    /// The mode an NFS server sets on a group it has just made: see [`Created::chmod`].
    pub fn chmod(&self, name: &str, caller: &Caller) -> Result<()> {
        self.created.chmod(name, caller)
    }

    pub fn remove(&self, name: &str, caller: &Caller) -> Answer<()> {
        if let Err(e) = root_only(caller) {
            return Answer::Now(Err(e));
        }
        let (cluster, stored) = (self.cluster.clone(), self.cluster.group(name).is_some());
        let group = name.to_string();
        self.created.remove(name, stored, move || cluster.remove_group(&group))
    }
}
