//! `images/`: per-user raw disk images; mkdir creates, ctl mounts, rmdir deletes.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use clusterfs_fs::{Answer, Caller, FsError, Kind, Node, Result};

use super::{ERROR_FILE, FileSpec, README_FILE, Verb, blocking, command_text, readme, spec_node};
use crate::head::images::{Image, Images, Phase};
use crate::images::{NewImage, parse_new, size_text};

const DIR_FILES: &[FileSpec] = &[
    README_FILE,
    FileSpec {
        name: "new",
        kind: Kind::Control,
        perm: 0o666,
        help: "w: `user=<name> [size=<size>] [template=<name>]` makes that image",
    },
    FileSpec { name: "volumes", kind: Kind::Dir, perm: 0o755, help: "one file per volume: its quota and real use" },
    FileSpec { name: "bill", kind: Kind::Snapshot, perm: 0o444, help: "per team: `team images assigned used`" },
    ERROR_FILE,
];

const IMAGE_FILES: &[FileSpec] = &[
    README_FILE,
    FileSpec {
        name: "state",
        kind: Kind::Snapshot,
        perm: 0o444,
        help: "unmounted | mounting on N | mounted on N | unmounting on N; then its events, newest last",
    },
    FileSpec { name: "size", kind: Kind::Snapshot, perm: 0o444, help: "its size in bytes" },
    FileSpec { name: "volume", kind: Kind::Snapshot, perm: 0o444, help: "the volume it is on" },
    FileSpec { name: "path", kind: Kind::Snapshot, perm: 0o444, help: "the image file" },
    FileSpec { name: "node", kind: Kind::Snapshot, perm: 0o444, help: "the node it is mounted on (empty line: none)" },
    FileSpec {
        name: "mountpoint",
        kind: Kind::Snapshot,
        perm: 0o444,
        help: "where it is mounted on that node (empty line: not mounted)",
    },
    FileSpec {
        name: "usage",
        kind: Kind::Snapshot,
        perm: 0o444,
        help: "`size`, `allocated` (on the volume) and `used` (inside, at the last scan) in bytes",
    },
    FileSpec { name: "ctl", kind: Kind::Control, perm: 0o644, help: "the owner or root writes a verb below" },
    ERROR_FILE,
];

pub const VERBS: &[Verb] = &[
    Verb { name: "mount", args: "[node]", help: "mount it on that node (default nodes/best) at <mount_root>/<user>" },
    Verb { name: "umount", args: "", help: "unmount it and detach its loop device" },
    Verb { name: "resize", args: "<size>|+<size>", help: "grow it and its filesystem (online when mounted)" },
    Verb { name: "fsck", args: "", help: "check and repair it (unmounted only)" },
];

#[derive(Debug)]
pub struct ImagesView {
    images: Arc<Images>,
}

fn since_epoch(ms: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_millis(ms)
}

fn lines(text: String) -> Answer<Vec<u8>> {
    Answer::Now(Ok(text.into_bytes()))
}

impl ImagesView {
    /// The users whose image holds a mount lease on `node`.
    pub fn on_node(&self, node: &str) -> Vec<String> {
        self.images
            .users()
            .into_iter()
            .filter(|u| self.images.get(u).is_some_and(|i| i.node.as_deref() == Some(node)))
            .collect()
    }

    pub fn new(images: Arc<Images>) -> ImagesView {
        ImagesView { images }
    }

    fn image(&self, user: &str) -> Result<Image> {
        self.images.get(user).ok_or_else(|| FsError::not_found(format!("image {user}")))
    }

    pub fn node(&self, path: &[&str]) -> Result<Node> {
        match path {
            [] => Ok(Node::new(Kind::Dir, 0o1777)),
            ["volumes"] => Ok(Node::dir()),
            ["volumes", vol] if self.images.cfg.volumes.contains_key(*vol) => {
                Ok(Node::new(Kind::Snapshot, 0o444).mtime(SystemTime::now()))
            }
            [name] => match self.images.get(name) {
                Some(img) => Ok(Node::new(Kind::Dir, 0o755).owned(img.uid, img.gid).mtime(since_epoch(img.changed_ms))),
                None => spec_node(DIR_FILES, name).ok_or_else(|| FsError::not_found(format!("image {name}"))),
            },
            [user, file] => {
                let img = self.image(user)?;
                let node = spec_node(IMAGE_FILES, file)
                    .ok_or_else(|| FsError::not_found(format!("images/{user}/{file}")))?
                    .owned(img.uid, img.gid);
                Ok(if *file == "usage" { node } else { node.mtime(since_epoch(img.changed_ms)) })
            }
            _ => Err(FsError::not_found(format!("images/{}", path.join("/")))),
        }
    }

    pub fn list(&self, path: &[&str]) -> Result<Vec<String>> {
        match path {
            [] => Ok(DIR_FILES.iter().map(|f| f.name.to_string()).chain(self.images.users()).collect()),
            ["volumes"] => Ok(self.images.cfg.volumes.keys().cloned().collect()),
            [user] if self.images.get(user).is_some() => Ok(IMAGE_FILES.iter().map(|f| f.name.to_string()).collect()),
            _ => Err(FsError::not_found(format!("images/{}", path.join("/")))),
        }
    }

    pub fn render(&self, path: &[&str]) -> Answer<Vec<u8>> {
        match path {
            ["README"] => Answer::Now(Ok(readme(
                "images/: per-user raw disk images on the configured volumes",
                DIR_FILES,
                &[],
                "`mkdir images/<user>` (root or that user) makes the user's image on the volume\n\
                 with the lowest assigned-quota percentage; `rmdir` removes it (not while mounted).\n\
                 Each image directory has: state size volume path node mountpoint usage ctl error.\n",
            ))),
            ["new"] => lines("write: user=<name> [size=<size>] [template=<name>]\n".into()),
            ["bill"] => {
                let images = self.images.clone();
                blocking(move || Ok(images.bill().into_bytes()))
            }
            ["volumes", vol] => {
                let (images, vol) = (self.images.clone(), vol.to_string());
                blocking(move || {
                    let v = images.volume_use(&vol).ok_or_else(|| FsError::not_found(format!("volume {vol}")))?;
                    let pct = |n: u64| n as f64 * 100.0 / v.capacity as f64;
                    Ok(format!(
                        "path {}\ncapacity {}\nassigned {}\nused {}\nassigned_pct {:.2}\nused_pct {:.2}\nimages {}\nspares {}\n",
                        v.path.display(),
                        v.capacity,
                        v.assigned,
                        v.used,
                        pct(v.assigned),
                        pct(v.used),
                        v.images,
                        v.spares
                    )
                    .into_bytes())
                })
            }
            [user, file] => {
                let img = match self.image(user) {
                    Ok(i) => i,
                    Err(e) => return Answer::Now(Err(e)),
                };
                let mounted = img.phase == Phase::Mounted;
                match *file {
                    "README" => Answer::Now(Ok(readme(
                        &format!("images/{user}: {user}'s disk image"),
                        IMAGE_FILES,
                        &[("ctl", VERBS)],
                        "",
                    ))),
                    "state" => {
                        let mut out = img.state_line() + "\n";
                        for e in &img.events {
                            out.push_str(e);
                            out.push('\n');
                        }
                        lines(out)
                    }
                    "size" => lines(format!("{}\n", img.size)),
                    "volume" => lines(format!("{}\n", img.volume)),
                    "path" => lines(format!("{}\n", self.images.path(&img).display())),
                    "node" => lines(format!("{}\n", if mounted { img.node.as_deref().unwrap_or("") } else { "" })),
                    "mountpoint" => {
                        let at =
                            if mounted { self.images.mountpoint(user).display().to_string() } else { String::new() };
                        lines(format!("{at}\n"))
                    }
                    "usage" => {
                        let images = self.images.clone();
                        blocking(move || {
                            let used = images.used(&img.user).map_or("-".to_string(), |u| u.to_string());
                            Ok(format!("size {}\nallocated {}\nused {used}\n", img.size, images.allocated(&img))
                                .into_bytes())
                        })
                    }
                    "ctl" => lines(
                        VERBS.iter().map(|v| format!("{} {}", v.name, v.args).trim_end().to_string() + "\n").collect(),
                    ),
                    _ => Answer::Now(Err(FsError::not_found(format!("images/{user}/{file}")))),
                }
            }
            _ => Answer::Now(Err(FsError::not_found(format!("images/{}", path.join("/"))))),
        }
    }

    pub fn write(&self, path: &[&str], caller: &Caller, data: &[u8]) -> Answer<Vec<u8>> {
        let text = match command_text(data, 4096) {
            Ok(t) => t.to_string(),
            Err(e) => return Answer::Now(Err(e)),
        };
        match path {
            ["new"] => match parse_new(&text) {
                Ok(new) => self.create(caller, new),
                Err(e) => Answer::Now(Err(FsError::invalid(e))),
            },
            [user, "ctl"] => self.ctl(user, caller, &text),
            _ => Answer::Now(Err(FsError::denied("this file is read-only"))),
        }
    }

    fn ctl(&self, user: &str, caller: &Caller, text: &str) -> Answer<Vec<u8>> {
        let (verb, args) = text.split_once(char::is_whitespace).map_or((text, ""), |(v, a)| (v, a.trim()));
        let (images, user, caller, args) = (self.images.clone(), user.to_string(), *caller, args.to_string());
        let done = |r: Result<()>| r.map(|()| Vec::new());
        match verb {
            "mount" if !args.contains(char::is_whitespace) => Answer::later(async move {
                done(images.mount(&caller, &user, Some(args.as_str()).filter(|a| !a.is_empty())).await)
            }),
            "umount" if args.is_empty() => Answer::later(async move { done(images.umount(&caller, &user).await) }),
            "resize" if !args.is_empty() => {
                Answer::later(async move { done(images.resize(&caller, &user, &args).await) })
            }
            "fsck" if args.is_empty() => blocking(move || done(images.fsck(&caller, &user))),
            "mount" | "umount" | "resize" | "fsck" => {
                Answer::Now(Err(with_usage(FsError::invalid(format!("wrong arguments for {verb}: {args:?}")))))
            }
            other => Answer::Now(Err(with_usage(FsError::invalid(format!("unknown verb {other:?}"))))),
        }
    }

    fn create(&self, caller: &Caller, new: NewImage) -> Answer<Vec<u8>> {
        let (images, caller) = (self.images.clone(), *caller);
        blocking(move || {
            images.create(&caller, &new).map(|img| format!("{} {}\n", img.volume, size_text(img.size)).into_bytes())
        })
    }

    pub fn mkdir(&self, path: &[&str], caller: &Caller) -> Answer<()> {
        match path {
            [user] => {
                let new = NewImage { user: user.to_string(), ..NewImage::default() };
                let (images, caller) = (self.images.clone(), *caller);
                blocking(move || images.create(&caller, &new).map(|_| ()))
            }
            _ => Answer::Now(Err(FsError::new(clusterfs_fs::Errno::Perm, "directories cannot be made here"))),
        }
    }

    pub fn rmdir(&self, path: &[&str], caller: &Caller) -> Answer<()> {
        match path {
            [user] if self.images.get(user).is_some() => {
                let (images, caller, user) = (self.images.clone(), *caller, user.to_string());
                blocking(move || images.remove(&caller, &user))
            }
            _ => Answer::Now(Err(FsError::new(clusterfs_fs::Errno::Perm, "this directory cannot be removed"))),
        }
    }

    pub fn status(&self) -> String {
        self.images.status()
    }
}

fn with_usage(e: FsError) -> FsError {
    super::with_usage(e, "images/<user>/ctl", VERBS)
}
