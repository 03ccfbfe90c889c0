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

/// What `images/new` or `mkdir` asks for.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NewImage {
    pub user: String,
    pub size: Option<u64>,
    pub template: Option<String>,
}

/// Parses what `images/new` takes: `user=alice size=200G template=centos`, or one word, the user.
pub fn parse_new(text: &str) -> Result<NewImage, String> {
    let mut new = NewImage::default();
    for word in text.split_whitespace() {
        match word.split_once('=') {
            None if new.user.is_empty() => new.user = word.to_string(),
            None => return Err(format!("{word:?}: write key=value pairs (user= size= template=)")),
            Some(("user", v)) => new.user = v.to_string(),
            Some(("size", v)) => new.size = Some(parse_image_size(v).map_err(|e| format!("size: {e}"))?),
            Some(("template", v)) => new.template = Some(v.to_string()),
            Some((k, _)) => return Err(format!("unknown key {k:?}: images/new takes user= size= template=")),
        }
    }
    if new.user.is_empty() {
        return Err("images/new needs user=<name>".into());
    }
    Ok(new)
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
    fn new_image_specs_parse_or_say_why() {
        let n = parse_new("user=alice size=10G template=base").unwrap();
        assert_eq!((n.user.as_str(), n.size, n.template.as_deref()), ("alice", Some(10 << 30), Some("base")));
        assert_eq!(parse_new("bob").unwrap().user, "bob");
        assert!(parse_new("size=10G").unwrap_err().contains("user="));
        assert!(parse_new("user=a size=ten").unwrap_err().contains("not a size"));
        assert!(parse_new("user=a color=red").unwrap_err().contains("unknown key"));
        assert!(parse_new("a b").unwrap_err().contains("key=value"));
    }

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
