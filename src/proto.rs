//! The head <-> agent wire: length-prefixed frames carrying JSON messages or raw bulk bytes.
//!
//! A frame is a 4-byte big-endian length, then one kind byte (`J` JSON, `B` bulk, `C` a file
//! chunk with its checksum), then the payload. A frame longer than the limit is an error that closes the connection.

use std::path::PathBuf;
use std::time::SystemTime;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio_util::codec::{Decoder, Encoder, Framed, LengthDelimitedCodec};

use crate::hsm::{Held, MoverInfo, Request};
use crate::images::LoopInfo;
use crate::jobs::copy::Plan;
use crate::jobs::{Exit, Run, RunStatus};
use crate::sitrep::Report;
use crate::vms::{Launch, VmStatus};

/// The protocol version both sides must speak (2: the head beats every interval).
pub const PROTOCOL: u32 = 2;
/// An agent that hears nothing from its head for this many report intervals (and at least
/// `SILENCE_MIN`) takes it for dead and redials: a head that froze closes nothing.
pub const SILENCE_INTERVALS: u32 = 10;
pub const SILENCE_MIN: std::time::Duration = std::time::Duration::from_secs(5);
/// Default largest frame: 16 MiB.
pub const DEFAULT_MAX_FRAME: usize = 16 << 20;
/// The longest an agent waits between redials (plus up to a quarter of it as jitter).
pub const REDIAL_MAX: std::time::Duration = std::time::Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("connection closed")]
    Closed,
    #[error("bad frame: {0}")]
    BadFrame(String),
    #[error("unexpected message: expected {expected}, got {got}")]
    Unexpected { expected: &'static str, got: String },
    #[error("authentication failed: {0}")]
    Auth(String),
    #[error("refused by the head: {0}")]
    Refused(String),
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
}

/// Work the head asks an agent to do; each carries a request id the agent deduplicates on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// A round trip, for `nodes/<node>/ping`.
    Ping,
    /// Start a run (once: a run the agent already knows is not started again).
    Run(Box<Run>),
    /// Send a signal to a run's processes.
    Signal { run: u64, signal: i32 },
    /// The head has everything of a run: drop its local files.
    Forget { run: u64 },
    /// Loop-attach image `path`, fsck it if unclean, mount it at `mountpoint` (nosuid, nodev).
    /// Already mounted there: nothing is done.
    ImageMount { path: PathBuf, mountpoint: PathBuf },
    /// Unmount `mountpoint` and detach every loop device backing `path`.
    ImageUmount { path: PathBuf, mountpoint: PathBuf },
    /// Grow image `path`, mounted at `mountpoint`, and its filesystem to `size` bytes, online.
    ImageGrow { path: PathBuf, mountpoint: PathBuf, size: u64 },
    /// The loop devices backing image files under `volumes`, mounted or not.
    ImageScan { volumes: Vec<PathBuf> },
    /// Detach loop device `dev` if it still backs `path` and is not mounted (a ghost).
    ImageDetach { dev: String, path: PathBuf },
    /// Run these HSM requests (a cookie the mover already holds is not started again).
    Hsm { requests: Vec<Request> },
    /// Stop HSM request `cookie`; it ends with status ECANCELED.
    HsmCancel { cookie: u64 },
    /// Make a VM's clone (overlay, data disk); made before: nothing.
    VmCreate { launch: Box<Launch> },
    /// Start a VM (made first if its node lost it); running: nothing.
    VmStart { launch: Box<Launch> },
    /// `powerdown`, `quit` or `reset` through QMP.
    VmCommand { name: String, verb: String },
    /// Stop a VM and remove every file of it.
    VmRemove { name: String },
}

/// What an agent answers to an [`Op`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Reply {
    Pong,
    /// The run started now.
    Started,
    /// The run was started before (a resent request): nothing was done.
    Known,
    Done,
    /// A signal for a run not started yet (its start request or its process is on the way): ask again.
    NotYet,
    /// An image is mounted from loop device `dev`; `repaired` when fsck had to fix it first.
    Mounted {
        dev: String,
        repaired: bool,
    },
    /// Not done now, and why (an image in use, an operation under way): try again later.
    Busy {
        reason: String,
    },
    /// Done in part; the rest happens later, for this reason (an image grown while mounted
    /// where online resizing is not permitted: its filesystem grows at the next mount).
    Later {
        reason: String,
    },
    /// What [`Op::ImageScan`] found.
    Loops {
        loops: Vec<LoopInfo>,
    },
}

/// Every JSON message, in both directions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Message {
    /// Agent -> head: who I claim to be, and my fresh nonce.
    Hello { protocol: u32, node: String, agent_version: String, nonce: String },
    /// Head -> agent: the head's nonce and its proof that it knows the secret.
    Challenge { nonce: String, proof: String },
    /// Agent -> head: the agent's proof.
    Proof { proof: String },
    /// Head -> agent: accepted; report every `interval_ms`.
    Welcome { interval_ms: u64 },
    /// Either way: refused, with the reason; the connection closes after it.
    Refused { reason: String },
    /// Agent -> head: one report of the node's state.
    Sitrep { report: Report },
    /// Head -> agent: do `op`.
    Request { id: u64, op: Op },
    /// Agent -> head: the outcome of request `id`.
    Response { id: u64, result: Result<Reply, String> },
    /// Agent -> head, after each welcome: every run the agent still has.
    Runs { runs: Vec<RunStatus> },
    /// Head -> agent: send this run's output from these offsets on (what the head holds).
    Resume { run: u64, from: [u64; 2] },
    /// Agent -> head: a run ended; all its output was sent before this.
    Exited { run: u64, exit: Exit, len: [u64; 2] },
    /// Agent -> head, after each welcome: where this agent takes relay connections.
    Relay { addr: String },
    /// Agent -> head: bytes of a copy run's file written so far.
    Progress { run: u64, bytes: u64 },
    /// Relay parent -> child, first on a relay connection: the file and the child's subtree.
    Copy { plan: Box<Plan> },
    /// Agent -> head, after each welcome, from a mover: what it is and the requests it holds.
    Mover { info: MoverInfo, held: Vec<Held> },
    /// Agent -> head: bytes done of HSM request `cookie`.
    HsmProgress { cookie: u64, bytes: u64, total: u64 },
    /// Agent -> head: HSM request `cookie` ended with `status` (0 or a positive errno).
    HsmDone { cookie: u64, status: i32 },
    /// Head -> agent: the head has recorded the end of these requests; forget them.
    HsmAck { cookies: Vec<u64> },
    /// Agent -> head, every interval: its VMs.
    Vms { vms: Vec<VmStatus> },
    /// Head -> agent: send VM `id`'s console from this offset on.
    VmConsoleFrom { id: u64, from: u64 },
    /// Head -> agent, every report interval: the head is alive.
    Beat,
    /// Head -> leading head, on a peer link: an operation on the tree, for a caller of its mount.
    Tree { id: u64, call: Box<TreeCall> },
    /// Leading head -> head: the outcome of tree call `id`.
    TreeAnswer { id: u64, answer: TreeAnswer },
    /// Leading head -> head, on a peer link: nodes as they are now, and nodes forgotten. With
    /// `reset`, forget every node sent before first (the first part of a resend of all).
    /// With `complete`, every node has been sent since. Directories date from `started_ns`,
    /// when the leading head started.
    Live { nodes: Vec<NodeLive>, gone: Vec<String>, reset: bool, complete: bool, started_ns: u64 },
}

/// A time as messages carry it: nanoseconds since the epoch (0 before it).
pub fn epoch_ns(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

/// The time a message's nanoseconds since the epoch name.
pub fn from_epoch_ns(ns: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + std::time::Duration::from_nanos(ns)
}

/// What a following head is told of one node: enough to render its sitrep and state as the
/// leading head does, its state following from the time since its last report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeLive {
    pub name: String,
    /// The last report, if one came since the leading head started.
    pub report: Option<Report>,
    /// Whether a report came since its agent's link was made.
    pub reported: bool,
    /// Milliseconds since the last report, or since the leading head started when none came.
    pub age_ms: u64,
    /// Why its agent's link is gone; none while it is connected.
    pub gone: Option<String>,
    pub drain: Option<String>,
    /// How long without a report makes the node down.
    pub limit_ms: u64,
    /// When the last report came, and when the state last changed (ns since the epoch).
    pub seen_at_ns: u64,
    pub changed_ns: u64,
}

/// One operation of the filesystem's tree, made on the leading head for a caller of another
/// head's mount. Paths are the components below the mount root.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TreeCall {
    pub path: Vec<String>,
    pub caller: TreeCaller,
    pub op: TreeOp,
}

/// Who is asking, as the calling head's kernel said, with the process's groups read there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TreeCaller {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum TreeOp {
    Node,
    List,
    Render {
        nonblock: bool,
    },
    ReadLog {
        offset: u64,
        size: u32,
    },
    Write {
        handle: u64,
        offset: u64,
        #[serde(with = "hex::serde")]
        data: Vec<u8>,
    },
    Flush {
        handle: u64,
    },
    Release {
        handle: u64,
    },
    Mkdir {
        mode: u32,
    },
    Rmdir,
    Create {
        mode: u32,
    },
    Unlink,
    Chmod {
        mode: u32,
    },
}

impl TreeOp {
    /// Whether asking again, after the leading head went away mid-call, is safe.
    pub fn is_read(&self) -> bool {
        matches!(self, TreeOp::Node | TreeOp::List | TreeOp::Render { .. } | TreeOp::ReadLog { .. })
    }

    /// Whether it may change what the tree holds: neither a read nor a release, which only
    /// ends a handle (and reaches the leading head after the `close` that made it returned).
    pub fn changes(&self) -> bool {
        !self.is_read() && !matches!(self, TreeOp::Release { .. })
    }

    /// Whether the leading head needs the caller's groups for it: a change that may name an
    /// owner or check one. A flush or a release ends what a write on the same handle began.
    pub fn needs_groups(&self) -> bool {
        self.changes() && !matches!(self, TreeOp::Flush { .. })
    }
}

/// What a tree call answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "answer", rename_all = "snake_case")]
pub enum TreeAnswer {
    Node {
        kind: String,
        perm: u16,
        uid: u32,
        gid: u32,
        mtime_ns: u64,
        size: u64,
        generation: u64,
    },
    Names {
        names: Vec<String>,
    },
    Bytes {
        #[serde(with = "hex::serde")]
        data: Vec<u8>,
    },
    Done,
    Failed {
        errno: i32,
        message: String,
    },
}

impl Message {
    pub fn name(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "hello",
            Message::Challenge { .. } => "challenge",
            Message::Proof { .. } => "proof",
            Message::Welcome { .. } => "welcome",
            Message::Refused { .. } => "refused",
            Message::Sitrep { .. } => "sitrep",
            Message::Request { .. } => "request",
            Message::Response { .. } => "response",
            Message::Runs { .. } => "runs",
            Message::Resume { .. } => "resume",
            Message::Exited { .. } => "exited",
            Message::Relay { .. } => "relay",
            Message::Progress { .. } => "progress",
            Message::Copy { .. } => "copy",
            Message::Mover { .. } => "mover",
            Message::HsmProgress { .. } => "hsm_progress",
            Message::HsmDone { .. } => "hsm_done",
            Message::HsmAck { .. } => "hsm_ack",
            Message::Vms { .. } => "vms",
            Message::VmConsoleFrom { .. } => "vm_console_from",
            Message::Beat => "beat",
            Message::Tree { .. } => "tree",
            Message::TreeAnswer { .. } => "tree_answer",
            Message::Live { .. } => "live",
        }
    }
}

/// One decoded frame.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    Message(Message),
    /// Raw bytes of stream `stream` at byte `offset` of it (job output, file copies).
    Bulk {
        stream: u64,
        offset: u64,
        data: Bytes,
    },
    /// Bytes of a copied file at `offset`, with their checksum (`copy::chunk_sum`).
    Chunk {
        offset: u64,
        sum: u64,
        data: Bytes,
    },
}

impl Frame {
    /// Encodes the payload (kind byte + body), without the length prefix.
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::new();
        self.encode_into(&mut out);
        out.freeze()
    }

    /// Appends the payload to `out` (file data is copied once, straight into the send buffer).
    fn encode_into(&self, out: &mut BytesMut) {
        match self {
            Frame::Message(m) => {
                out.put_u8(b'J');
                out.extend_from_slice(&serde_json::to_vec(m).expect("messages always serialize"));
            }
            Frame::Bulk { stream, offset, data } => {
                out.put_u8(b'B');
                out.put_u64(*stream);
                out.put_u64(*offset);
                out.extend_from_slice(data);
            }
            Frame::Chunk { offset, sum, data } => {
                put_chunk_header(out, *offset, *sum);
                out.extend_from_slice(data);
            }
        }
    }

    /// Decodes a payload; never panics on any input.
    pub fn decode(payload: &[u8]) -> Result<Frame, ProtoError> {
        Frame::decode_bytes(Bytes::copy_from_slice(payload))
    }

    /// Decodes a payload it owns: the data of bulk and chunk frames is a view of it, not a copy.
    fn decode_bytes(payload: Bytes) -> Result<Frame, ProtoError> {
        let data_at = |payload: &Bytes| payload.slice(17..);
        match payload.split_first() {
            Some((b'J', body)) => serde_json::from_slice(body)
                .map(Frame::Message)
                .map_err(|e| ProtoError::BadFrame(format!("message: {e}"))),
            Some((kind @ (b'B' | b'C'), body)) if body.len() >= 16 => {
                let first = u64::from_be_bytes(body[..8].try_into().expect("8 bytes"));
                let second = u64::from_be_bytes(body[8..16].try_into().expect("8 bytes"));
                let data = data_at(&payload);
                Ok(match kind {
                    b'B' => Frame::Bulk { stream: first, offset: second, data },
                    _ => Frame::Chunk { offset: first, sum: second, data },
                })
            }
            Some((b'B' | b'C', _)) => Err(ProtoError::BadFrame("data frame shorter than its header".into())),
            Some((k, _)) => Err(ProtoError::BadFrame(format!("unknown frame kind {k:#04x}"))),
            None => Err(ProtoError::BadFrame("empty frame".into())),
        }
    }
}

/// A chunk frame's payload up to its data: the kind, the offset and the checksum.
fn put_chunk_header(out: &mut BytesMut, offset: u64, sum: u64) {
    out.put_u8(b'C');
    out.put_u64(offset);
    out.put_u64(sum);
}

/// Chunks at least this large are written from their own buffer ([`Conn::send_frame`]).
const DIRECT: usize = 64 * 1024;

/// Frames on the wire: a 4-byte big-endian length, then the payload. Frames longer than the
/// limit are an error.
#[derive(Debug)]
struct FrameCodec {
    lengths: LengthDelimitedCodec,
    max_frame: usize,
}

impl Decoder for FrameCodec {
    type Item = Bytes;
    type Error = std::io::Error;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Bytes>, std::io::Error> {
        Ok(self.lengths.decode(src)?.map(BytesMut::freeze))
    }
}

impl Encoder<&Frame> for FrameCodec {
    type Error = std::io::Error;

    fn encode(&mut self, frame: &Frame, dst: &mut BytesMut) -> Result<(), std::io::Error> {
        let at = dst.len();
        dst.put_u32(0);
        frame.encode_into(dst);
        let len = dst.len() - at - 4;
        if len > self.max_frame {
            dst.truncate(at);
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "frame over the size limit"));
        }
        let len = u32::try_from(len).map_err(|_| std::io::Error::other("frame over 4 GiB"))?;
        dst[at..at + 4].copy_from_slice(&len.to_be_bytes());
        Ok(())
    }
}

/// A framed connection.
#[derive(Debug)]
pub struct Conn<S> {
    inner: Framed<S, FrameCodec>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    pub fn new(stream: S, max_frame: usize) -> Conn<S> {
        let lengths = LengthDelimitedCodec::builder().max_frame_length(max_frame).new_codec();
        Conn { inner: Framed::new(stream, FrameCodec { lengths, max_frame }) }
    }

    pub async fn send(&mut self, msg: &Message) -> Result<(), ProtoError> {
        self.send_frame(&Frame::Message(msg.clone())).await
    }

    /// Sends `frame`. A file chunk goes to the stream from its own buffer, not copied into the
    /// codec's first: a relay passes on every byte it gets. Not to be raced in a `select!`.
    pub async fn send_frame(&mut self, frame: &Frame) -> Result<(), ProtoError> {
        match frame {
            Frame::Chunk { offset, sum, data } if data.len() >= DIRECT => self.send_chunk(*offset, *sum, data).await,
            _ => Ok(self.inner.send(frame).await?),
        }
    }

    /// A chunk frame written as its header and its data in vectored writes.
    async fn send_chunk(&mut self, offset: u64, sum: u64, data: &Bytes) -> Result<(), ProtoError> {
        let len = 1 + 16 + data.len();
        if len > self.inner.codec().max_frame {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "frame over the size limit").into());
        }
        let len = u32::try_from(len).map_err(|_| std::io::Error::other("frame over 4 GiB"))?;
        // Whatever the codec still holds goes first.
        self.inner.flush().await?;
        let mut head = BytesMut::with_capacity(21);
        head.put_u32(len);
        put_chunk_header(&mut head, offset, sum);
        let mut frame = head.freeze().chain(data.clone());
        self.inner.get_mut().write_all_buf(&mut frame).await?;
        Ok(())
    }

    /// The next frame; an oversized or undecodable frame is an error.
    pub async fn recv_frame(&mut self) -> Result<Frame, ProtoError> {
        match self.inner.next().await {
            Some(Ok(buf)) => Frame::decode_bytes(buf),
            Some(Err(e)) if e.kind() == std::io::ErrorKind::InvalidData => {
                Err(ProtoError::BadFrame(format!("frame over the size limit: {e}")))
            }
            Some(Err(e)) => Err(e.into()),
            None => Err(ProtoError::Closed),
        }
    }

    /// The next JSON message (bulk frames are not expected here).
    pub async fn recv(&mut self) -> Result<Message, ProtoError> {
        match self.recv_frame().await? {
            Frame::Message(m) => Ok(m),
            Frame::Bulk { .. } | Frame::Chunk { .. } => {
                Err(ProtoError::Unexpected { expected: "a message", got: "bulk data".into() })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let frames = [
            Frame::Message(Message::Request { id: 7, op: Op::Ping }),
            Frame::Message(Message::Response { id: 7, result: Err("no".into()) }),
            Frame::Bulk { stream: 3, offset: 9, data: Bytes::from_static(b"abc") },
            Frame::Chunk { offset: 1 << 40, sum: 77, data: Bytes::from_static(b"xyz") },
        ];
        for f in frames {
            assert_eq!(Frame::decode(&f.encode()).unwrap(), f);
        }
    }

    #[test]
    fn junk_is_an_error_not_a_panic() {
        for junk in [&b""[..], b"X", b"J", b"J{", b"B\0\0", b"J{\"type\":\"nope\"}", &[0xff; 64]] {
            assert!(Frame::decode(junk).is_err(), "{junk:?}");
        }
    }

    #[tokio::test]
    async fn large_chunks_written_from_their_buffer_arrive_whole_between_messages() {
        let (a, b) = tokio::io::duplex(64 << 10);
        let mut tx = Conn::new(a, 4 << 20);
        let mut rx = Conn::new(b, 4 << 20);
        let data: Vec<u8> = (0..3 << 20).map(|i: u32| (i % 251) as u8).collect();
        let chunk = Frame::Chunk { offset: 5 << 20, sum: 42, data: Bytes::from(data) };
        let ping = Frame::Message(Message::Request { id: 1, op: Op::Ping });
        let sent = [ping.clone(), chunk.clone(), ping.clone(), chunk.clone()];
        let send = {
            let sent = sent.clone();
            tokio::spawn(async move {
                for f in &sent {
                    tx.send_frame(f).await.unwrap();
                }
                // One over the limit is refused here, before a byte of it is sent.
                let over = Frame::Chunk { offset: 0, sum: 0, data: Bytes::from(vec![0u8; 4 << 20]) };
                assert!(matches!(tx.send_frame(&over).await, Err(ProtoError::Io(_))));
                tx.send_frame(&ping).await.unwrap();
            })
        };
        for f in sent.iter().chain([&Frame::Message(Message::Request { id: 1, op: Op::Ping })]) {
            assert_eq!(&rx.recv_frame().await.unwrap(), f);
        }
        send.await.unwrap();
    }

    #[tokio::test]
    async fn oversized_frame_closes() {
        let (a, b) = tokio::io::duplex(1 << 20);
        let mut tx = Conn::new(a, 1 << 20);
        let mut rx = Conn::new(b, 1024);
        let big = Frame::Bulk { stream: 1, offset: 0, data: Bytes::from(vec![0u8; 4096]) };
        tx.send_frame(&big).await.unwrap();
        assert!(matches!(rx.recv_frame().await, Err(ProtoError::BadFrame(_))));
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn any_payload_decodes_or_errs(data in proptest::collection::vec(any::<u8>(), 0..256)) {
            if let Ok(f) = Frame::decode(&data) {
                prop_assert_eq!(Frame::decode(&f.encode()).unwrap(), f);
            }
        }

        #[test]
        fn json_like_payloads_decode_or_err(body in "J\\{\"type\":\"(hello|sitrep|request|response)\"[ -~]{0,60}\\}") {
            let _ = Frame::decode(body.as_bytes());
        }
    }
}
