//! Mutual authentication from the cluster secret: an HMAC challenge-response over fresh nonces.
//!
//! The agent sends its nonce `na`; the head answers its own nonce `nh` and
//! `HMAC(secret, "head" node na nh)`; the agent checks it (a rogue head fails here) and
//! answers `HMAC(secret, "agent" node na nh)`; the head checks that. Both nonces are fresh
//! per handshake, so no recorded handshake can be replayed, and the role labels stop a
//! proof from one side being reflected as the other's.

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::proto::{Conn, Message, PROTOCOL, ProtoError};

type HmacSha256 = Hmac<Sha256>;

/// The 32-byte cluster secret, kept hex-encoded in a mode-0600 file.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret([u8; 32]);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("secret file {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("secret file {path} is readable by others (mode {mode:o}); chmod 600 it")]
    Exposed { path: String, mode: u32 },
    #[error("secret file {path} does not hold 64 hex characters")]
    Malformed { path: String },
}

impl Secret {
    /// Reads the secret; refuses a file that group or others can read.
    pub fn load(path: &Path) -> Result<Secret, SecretError> {
        let p = path.display().to_string();
        let io = |source| SecretError::Io { path: p.clone(), source };
        let mode = fs::metadata(path).map_err(io)?.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(SecretError::Exposed { path: p, mode });
        }
        let text = fs::read_to_string(path).map_err(io)?;
        Secret::from_hex(&text, &p)
    }

    /// Reads the secret, creating it (mode 0600) on first start.
    pub fn load_or_create(path: &Path) -> Result<Secret, SecretError> {
        let key = Secret::generate();
        let created = fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path);
        match created {
            Ok(mut f) => {
                let io = |source| SecretError::Io { path: path.display().to_string(), source };
                f.write_all(format!("{}\n", key.to_hex()).as_bytes()).map_err(io)?;
                f.sync_all().map_err(io)?;
                tracing::info!(path = %path.display(), "created the cluster secret");
                Ok(key)
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Secret::load(path),
            Err(source) => Err(SecretError::Io { path: path.display().to_string(), source }),
        }
    }

    /// A new random secret.
    pub fn generate() -> Secret {
        let mut key = [0u8; 32];
        rand::rng().fill_bytes(&mut key);
        Secret(key)
    }

    /// The secret as a secret file holds it (64 hex characters).
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses what `to_hex` gives; `from` names where it came from in the error.
    pub fn from_hex(text: &str, from: &str) -> Result<Secret, SecretError> {
        let bytes = hex::decode(text.trim()).map_err(|_| SecretError::Malformed { path: from.to_string() })?;
        let key: [u8; 32] = bytes.try_into().map_err(|_| SecretError::Malformed { path: from.to_string() })?;
        Ok(Secret(key))
    }

    /// Writes the secret to `path` (mode 0600) in place of what was there, atomically.
    pub fn save(&self, path: &Path) -> Result<(), SecretError> {
        let io = |source| SecretError::Io { path: path.display().to_string(), source };
        let tmp = path.with_extension("new");
        let _ = fs::remove_file(&tmp);
        let mut f = fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp).map_err(io)?;
        f.write_all(format!("{}\n", self.to_hex()).as_bytes()).map_err(io)?;
        f.sync_all().map_err(io)?;
        fs::rename(&tmp, path).map_err(io)
    }

    fn mac(&self, role: &str, node: &str, na: &[u8], nh: &[u8]) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.0).expect("HMAC takes any key length");
        for part in [role.as_bytes(), node.as_bytes(), na, nh] {
            mac.update(&(part.len() as u64).to_be_bytes());
            mac.update(part);
        }
        mac
    }

    fn proof(&self, role: &str, node: &str, na: &[u8], nh: &[u8]) -> String {
        hex::encode(self.mac(role, node, na, nh).finalize().into_bytes())
    }

    /// Constant-time check of a hex proof.
    fn verify(&self, role: &str, node: &str, na: &[u8], nh: &[u8], proof: &str) -> bool {
        hex::decode(proof).is_ok_and(|p| self.mac(role, node, na, nh).verify_slice(&p).is_ok())
    }
}

fn nonce() -> [u8; 32] {
    let mut n = [0u8; 32];
    rand::rng().fill_bytes(&mut n);
    n
}

fn decode_nonce(hexed: &str) -> Result<Vec<u8>, ProtoError> {
    hex::decode(hexed)
        .ok()
        .filter(|n| n.len() == 32)
        .ok_or_else(|| ProtoError::Auth("the nonce is not 32 bytes of hex".into()))
}

/// The agent's side: proves itself as `node` and checks the head. Returns the report interval.
pub async fn agent_handshake<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Conn<S>,
    secret: &Secret,
    node: &str,
) -> Result<u64, ProtoError> {
    let na = nonce();
    conn.send(&Message::Hello {
        protocol: PROTOCOL,
        node: node.to_string(),
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        nonce: hex::encode(na),
    })
    .await?;
    let (nh, proof) = match conn.recv().await? {
        Message::Challenge { nonce, proof } => (decode_nonce(&nonce)?, proof),
        Message::Refused { reason } => return Err(ProtoError::Refused(reason)),
        other => return Err(ProtoError::Unexpected { expected: "challenge", got: other.name().into() }),
    };
    if !secret.verify("head", node, &na, &nh, &proof) {
        return Err(ProtoError::Auth("the head does not know the cluster secret".into()));
    }
    conn.send(&Message::Proof { proof: secret.proof("agent", node, &na, &nh) }).await?;
    match conn.recv().await? {
        Message::Welcome { interval_ms } => Ok(interval_ms),
        Message::Refused { reason } => Err(ProtoError::Refused(reason)),
        other => Err(ProtoError::Unexpected { expected: "welcome", got: other.name().into() }),
    }
}

/// What an agent claimed in its hello, once proven.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub node: String,
    pub agent_version: String,
}

/// The head's side: checks the node name with `valid_name`, proves the head, checks the
/// agent. The caller then sends `Welcome` or `Refused`.
pub async fn head_handshake<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Conn<S>,
    secret: &Secret,
    valid_name: impl FnOnce(&str) -> Result<(), String>,
) -> Result<Peer, ProtoError> {
    let (node, agent_version, na) = match conn.recv().await? {
        Message::Hello { protocol, node, agent_version, nonce } => {
            if protocol != PROTOCOL {
                let reason = format!("protocol {protocol} is not supported (this head speaks {PROTOCOL})");
                let _ = conn.send(&Message::Refused { reason: reason.clone() }).await;
                return Err(ProtoError::Refused(reason));
            }
            if let Err(reason) = valid_name(&node) {
                let _ = conn.send(&Message::Refused { reason: reason.clone() }).await;
                return Err(ProtoError::Refused(reason));
            }
            (node, agent_version, decode_nonce(&nonce)?)
        }
        other => return Err(ProtoError::Unexpected { expected: "hello", got: other.name().into() }),
    };
    let nh = nonce();
    conn.send(&Message::Challenge { nonce: hex::encode(nh), proof: secret.proof("head", &node, &na, &nh) }).await?;
    let answer = match conn.recv().await {
        Ok(answer) => answer,
        // An agent leaves at this point when the head's proof did not match its secret.
        Err(ProtoError::Closed) => {
            return Err(ProtoError::Auth(format!(
                "{node:?} hung up on the head's proof: it holds another cluster secret (or is no agent)"
            )));
        }
        Err(e) => return Err(e),
    };
    match answer {
        Message::Proof { proof } if secret.verify("agent", &node, &na, &nh, &proof) => {
            Ok(Peer { node, agent_version: agent_version.chars().take(32).collect() })
        }
        Message::Proof { .. } => {
            let _ = conn.send(&Message::Refused { reason: "authentication failed".into() }).await;
            Err(ProtoError::Auth(format!("agent claiming {node:?} does not know the cluster secret")))
        }
        other => Err(ProtoError::Unexpected { expected: "proof", got: other.name().into() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (Conn<tokio::io::DuplexStream>, Conn<tokio::io::DuplexStream>) {
        let (a, b) = tokio::io::duplex(1 << 16);
        (Conn::new(a, 1 << 16), Conn::new(b, 1 << 16))
    }

    fn key(b: u8) -> Secret {
        Secret([b; 32])
    }

    fn hello(na: &[u8]) -> Message {
        Message::Hello { protocol: PROTOCOL, node: "cn1".into(), agent_version: "x".into(), nonce: hex::encode(na) }
    }

    #[tokio::test]
    async fn same_secret_authenticates_both_ways() {
        let (mut a, mut h) = pair();
        let head = tokio::spawn(async move {
            let peer = head_handshake(&mut h, &key(1), |_| Ok(())).await?;
            h.send(&Message::Welcome { interval_ms: 500 }).await?;
            Ok::<_, ProtoError>(peer)
        });
        assert_eq!(agent_handshake(&mut a, &key(1), "cn1").await.unwrap(), 500);
        assert_eq!(head.await.unwrap().unwrap().node, "cn1");
    }

    #[tokio::test]
    async fn rogue_agent_is_refused() {
        let (mut a, mut h) = pair();
        let head = tokio::spawn(async move { head_handshake(&mut h, &key(1), |_| Ok(())).await });
        // The rogue agent cannot check the head either: it fails first, on the head's proof.
        assert!(agent_handshake(&mut a, &key(2), "cn1").await.is_err());
        drop(a);
        assert!(head.await.unwrap().is_err());
    }

    #[tokio::test]
    async fn replayed_proof_is_refused() {
        // Record a good handshake's proof, then replay it against a new challenge.
        let secret = key(3);
        let (na, nh_old) = (nonce(), nonce());
        let recorded = secret.proof("agent", "cn1", &na, &nh_old);
        let (mut a, mut h) = pair();
        let head = tokio::spawn(async move { head_handshake(&mut h, &key(3), |_| Ok(())).await });
        a.send(&hello(&na)).await.unwrap();
        assert!(matches!(a.recv().await.unwrap(), Message::Challenge { .. }));
        a.send(&Message::Proof { proof: recorded }).await.unwrap();
        assert!(matches!(head.await.unwrap(), Err(ProtoError::Auth(_))));
    }

    #[tokio::test]
    async fn reflected_head_proof_is_refused() {
        let (mut a, mut h) = pair();
        let head = tokio::spawn(async move { head_handshake(&mut h, &key(4), |_| Ok(())).await });
        let na = nonce();
        a.send(&hello(&na)).await.unwrap();
        let Message::Challenge { proof, .. } = a.recv().await.unwrap() else { panic!("challenge expected") };
        // Sending the head's own proof back must not pass as the agent's.
        a.send(&Message::Proof { proof }).await.unwrap();
        assert!(matches!(head.await.unwrap(), Err(ProtoError::Auth(_))));
    }

    #[test]
    fn secret_file_is_private_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        let s1 = Secret::load_or_create(&path).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let s2 = Secret::load_or_create(&path).unwrap();
        assert_eq!(s1.0, s2.0);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(Secret::load(&path), Err(SecretError::Exposed { .. })));
    }
}
