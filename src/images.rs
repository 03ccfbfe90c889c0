//! What head and agents share about images: size limits, sizes as text, and loop device facts.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The smallest image: room for an ext4 journal and some files.
pub const MIN_SIZE: u64 = 16 << 20;
/// The largest image: ext4 with 4 KiB blocks ends at 16 TiB per file here.
pub const MAX_SIZE: u64 = 16 << 40;

/// A loop device on a node that backs an image file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoopInfo {
    /// `/dev/loopN`.
    pub dev: String,
    /// The image file it reads (as the kernel names it).
    pub file: PathBuf,
    /// Where it is mounted on that node, if it is.
    pub mountpoint: Option<PathBuf>,
    /// Bytes used inside the mounted filesystem.
    pub used: Option<u64>,
}

/// `size` as the largest whole unit that divides it: `50G`, `512M`, `1234`.
pub fn size_text(size: u64) -> String {
    for (unit, shift) in [("T", 40), ("G", 30), ("M", 20), ("K", 10)] {
        if size >= 1 << shift && size % (1 << shift) == 0 {
            return format!("{}{unit}", size >> shift);
        }
    }
    size.to_string()
}

/// An image size from a user: a size like `50G`, at least 16M and at most 16T.
pub fn parse_image_size(text: &str) -> Result<u64, String> {
    let size =
        crate::jobs::spec::parse_size(text).ok_or_else(|| format!("{text:?} is not a size like 512M, 50G or 2T"))?;
    if size < MIN_SIZE {
        return Err(format!("{text} is too small: an image is at least {}", size_text(MIN_SIZE)));
    }
    if size > MAX_SIZE {
        return Err(format!("{text} is too large: an image is at most {}", size_text(MAX_SIZE)));
    }
    Ok(size)
}

/// Runs a system tool (mkfs, e2fsck, losetup, ...): its exit code, stderr and stdout.
pub fn command(tool: &str, args: &[&str]) -> Result<(i32, String, String), String> {
    let out = std::process::Command::new(tool).args(args).output().map_err(|e| format!("cannot run {tool}: {e}"))?;
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    Ok((out.status.code().unwrap_or(128), text(&out.stderr), text(&out.stdout)))
}

/// A tool's outcome as a result: its stderr names what failed.
pub fn check(out: (i32, String, String), what: &str) -> Result<(), String> {
    if out.0 == 0 { Ok(()) } else { Err(format!("{what} failed (exit {}): {}", out.0, out.1.trim())) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_and_print() {
        assert_eq!(parse_image_size("10G"), Ok(10 << 30));
        assert_eq!(size_text(10 << 30), "10G");
        assert_eq!(size_text(1536 << 20), "1536M");
        assert_eq!(size_text(1000), "1000");
        assert!(parse_image_size("1M").unwrap_err().contains("too small"));
        assert!(parse_image_size("17T").unwrap_err().contains("too large"));
        assert!(parse_image_size("-5G").unwrap_err().contains("not a size"));
        assert!(parse_image_size("99999999999999999999T").is_err());
        assert!(parse_image_size("").is_err());
    }
}
