//! File copies as both sides see them: the file's facts, the relay tree, and chunk checksums.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;
use xxhash_rust::xxh3::{Xxh3, xxh3_64};

use crate::auth::{Secret, agent_handshake};
use crate::proto::{Conn, Message, ProtoError};

/// Bytes of file in one chunk frame.
pub const CHUNK: usize = 1 << 20;

/// What a copied file is: size, ownership, mode, mtime, and the checksum of its content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileFacts {
    pub size: u64,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime_s: i64,
    pub mtime_ns: i64,
    /// xxh3-128 of the whole content, hex.
    pub sum: String,
}

/// A node of the relay tree: it receives the file, writes it to `dest` and passes it on to
/// its children while still receiving.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Branch {
    pub node: String,
    /// The run this node's copy is.
    pub run: u64,
    /// Where its agent takes relay connections.
    pub addr: String,
    pub dest: String,
    pub children: Vec<Branch>,
}

/// What a relay connection carries first: the file, and the subtree the receiver heads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub file: FileFacts,
    pub tree: Branch,
}

/// Dials the relay of `plan.tree`, authenticates, and sends the plan: the connection is then
/// ready for the file's chunks. Used by the head and by agents feeding their children.
pub async fn open_feed(secret: &Secret, max_frame: usize, plan: Plan) -> Result<Conn<TcpStream>, ProtoError> {
    let stream = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(&plan.tree.addr))
        .await
        .map_err(|_| ProtoError::Timeout("the relay connection"))??;
    let _ = stream.set_nodelay(true);
    let mut conn = Conn::new(stream, max_frame);
    tokio::time::timeout(Duration::from_secs(5), agent_handshake(&mut conn, secret, &plan.tree.node))
        .await
        .map_err(|_| ProtoError::Timeout("the relay handshake"))??;
    conn.send(&Message::Copy { plan: Box::new(plan) }).await?;
    Ok(conn)
}

/// Waits, after the last chunk, for the relay to close the connection: it does once it has
/// the whole file (or `wait` passes).
pub async fn close_feed(conn: &mut Conn<TcpStream>, wait: Duration) -> Result<(), ProtoError> {
    match tokio::time::timeout(wait, conn.recv()).await {
        Ok(Err(ProtoError::Closed)) => Ok(()),
        Err(_) => Err(ProtoError::Timeout("the end of the copy")),
        Ok(Ok(other)) => Err(ProtoError::Unexpected { expected: "the end", got: other.name().into() }),
        Ok(Err(e)) => Err(e),
    }
}

/// The checksum every chunk travels with.
pub fn chunk_sum(data: &[u8]) -> u64 {
    xxh3_64(data)
}

/// The whole-file checksum: an xxh3-128 over the checksums of the file's chunks, in order
/// (each [`CHUNK`] bytes but the last). Every chunk's data is checked against its own
/// checksum where it arrives, so this one proves that every chunk came, in its place, as
/// the head read it, without a second pass over the data on every node.
#[derive(Default)]
pub struct FileSum(Xxh3);

impl std::fmt::Debug for FileSum {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FileSum")
    }
}

impl FileSum {
    /// Adds the next chunk, by its checksum ([`chunk_sum`]).
    pub fn add_chunk(&mut self, sum: u64) {
        self.0.update(&sum.to_le_bytes());
    }

    pub fn hex(&self) -> String {
        format!("{:032x}", self.0.digest128())
    }
}

/// The relay tree over `leaves` (node, run, addr, dest), in order: the first `fanout` are fed
/// by the head, and leaf `i` (1-based) feeds leaves `i * fanout + 1 ..= i * fanout + fanout`,
/// so the depth grows as log(n) / log(fanout).
pub fn tree(leaves: Vec<(String, u64, String, String)>, fanout: usize) -> Vec<Branch> {
    let fanout = fanout.max(1);
    let mut slots: Vec<Option<Branch>> = leaves
        .into_iter()
        .map(|(node, run, addr, dest)| Some(Branch { node, run, addr, dest, children: Vec::new() }))
        .collect();
    // Children are placed into their parents from the last up, so each parent is whole when
    // its own parent takes it.
    for i in (1..=slots.len()).rev() {
        let parent = (i - 1) / fanout;
        if parent == 0 {
            continue;
        }
        if let Some(b) = slots[i - 1].take()
            && let Some(Some(p)) = slots.get_mut(parent - 1)
        {
            p.children.insert(0, b);
        }
    }
    slots.into_iter().flatten().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(b: &[Branch]) -> Vec<String> {
        b.iter().map(|b| format!("{}{:?}", b.node, names(&b.children))).collect()
    }

    #[test]
    fn the_tree_is_a_heap_of_the_given_width() {
        let leaves = (1..=7).map(|i| (format!("n{i}"), i, String::new(), String::new())).collect();
        let t = tree(leaves, 2);
        assert_eq!(names(&t), ["n1[\"n3[\\\"n7[]\\\"]\", \"n4[]\"]", "n2[\"n5[]\", \"n6[]\"]"]);
        assert_eq!(t.len(), 2);
        assert_eq!(t[0].children.iter().map(|c| c.node.as_str()).collect::<Vec<_>>(), ["n3", "n4"]);
        assert_eq!(t[1].children.iter().map(|c| c.node.as_str()).collect::<Vec<_>>(), ["n5", "n6"]);
        assert_eq!(t[0].children[0].children[0].node, "n7");
        let chain = tree((1..=3).map(|i| (format!("n{i}"), i, String::new(), String::new())).collect(), 1);
        assert_eq!(chain.len(), 1);
        assert_eq!(chain[0].children[0].children[0].node, "n3");
    }

    #[test]
    fn the_file_sum_tells_chunks_missing_or_out_of_order() {
        let sum = |chunks: &[&[u8]]| {
            let mut s = FileSum::default();
            for c in chunks {
                s.add_chunk(chunk_sum(c));
            }
            s.hex()
        };
        assert_eq!(sum(&[b"ab", b"c"]), sum(&[b"ab", b"c"]));
        assert_eq!(sum(&[b"ab"]).len(), 32);
        assert_ne!(sum(&[b"ab", b"c"]), sum(&[b"c", b"ab"]));
        assert_ne!(sum(&[b"ab", b"c"]), sum(&[b"ab"]));
        assert_ne!(sum(&[b"ab", b"c"]), sum(&[b"ab", b"d"]));
        assert_ne!(chunk_sum(b"a"), chunk_sum(b"b"));
    }
}
