//! `groups/`: named nodesets root maintains, usable as `@name` wherever a nodeset is.

use std::sync::Arc;
use std::time::SystemTime;

use clusterfs_fs::{Answer, Caller, FsError, Kind, Node, Result};

use super::{ERROR_FILE, FileSpec, README_FILE, blocking, command_text, readme, spec_node};
use crate::head::cluster::Cluster;
use crate::names;

const FILES: &[FileSpec] = &[README_FILE, ERROR_FILE];

/// Largest nodeset text accepted in one write.
const MAX_TEXT: usize = 64 * 1024;

pub fn node(cluster: &Cluster, path: &[&str]) -> Result<Node> {
    match path {
        [] => Ok(Node::dir()),
        [name] if cluster.group(name).is_some() => Ok(Node::new(Kind::Control, 0o644).mtime(SystemTime::now())),
        [name] => spec_node(FILES, name).ok_or_else(|| FsError::not_found(format!("group {name}"))),
        _ => Err(FsError::not_found(format!("groups/{}", path.join("/")))),
    }
}

pub fn list(cluster: &Cluster, path: &[&str]) -> Result<Vec<String>> {
    match path {
        [] => Ok(FILES.iter().map(|f| f.name.to_string()).chain(cluster.group_names()).collect()),
        _ => Err(FsError::new(clusterfs_fs::Errno::NotDir, "not a directory")),
    }
}

pub fn render(cluster: &Cluster, path: &[&str]) -> Answer<Vec<u8>> {
    Answer::Now(match path {
        ["README"] => Ok(readme(
            "groups/: named nodesets, usable as @name anywhere a nodeset is",
            FILES,
            &[],
            "  w    <name>       the group's nodeset, folded; root writes a nodeset to set it\n\n\
             Root creates a group by writing it (`echo 'cn[0-7]' > groups/compute`)\n\
             and removes it with `rm groups/compute`.\n",
        )),
        [name] => cluster
            .group(name)
            .map(|g| format!("{g}\n").into_bytes())
            .ok_or_else(|| FsError::not_found(format!("group {name}"))),
        _ => Err(FsError::not_found(format!("groups/{}", path.join("/")))),
    })
}

fn root_only(caller: &Caller) -> Result<()> {
    if caller.is_root() { Ok(()) } else { Err(FsError::denied("only root may change groups")) }
}

pub fn write(cluster: &Arc<Cluster>, path: &[&str], caller: &Caller, data: &[u8]) -> Answer<Vec<u8>> {
    let [name] = path else { return Answer::Now(Err(FsError::denied("this file is read-only"))) };
    if let Err(e) = root_only(caller) {
        return Answer::Now(Err(e));
    }
    let text = match command_text(data, MAX_TEXT) {
        Ok(t) => t.to_string(),
        Err(e) => {
            return Answer::Now(Err(FsError::new(e.errno, format!("{}; write a nodeset like cn[0-7]", e.message))));
        }
    };
    // Check the text now: a group referring to itself would never resolve.
    if let Err(e) = cluster.nodeset(&text) {
        return Answer::Now(Err(FsError::invalid(format!("group {name}: {e}"))));
    }
    let (cluster, name) = (cluster.clone(), name.to_string());
    blocking(move || cluster.set_group(&name, &text).map(|()| Vec::new()))
}

pub fn create(cluster: &Arc<Cluster>, name: &str, caller: &Caller) -> Answer<()> {
    if let Err(e) = root_only(caller).and_then(|()| names::check("group", name).map_err(FsError::invalid)) {
        return Answer::Now(Err(e));
    }
    let (cluster, name) = (cluster.clone(), name.to_string());
    blocking(move || cluster.set_group(&name, ""))
}

pub fn remove(cluster: &Arc<Cluster>, name: &str, caller: &Caller) -> Answer<()> {
    if let Err(e) = root_only(caller) {
        return Answer::Now(Err(e));
    }
    let (cluster, name) = (cluster.clone(), name.to_string());
    blocking(move || cluster.remove_group(&name))
}
