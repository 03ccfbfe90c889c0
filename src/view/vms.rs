//! `vms/`: mkdir clones, echo into ctl or state drives, rmdir destroys; templates written by root.

use std::sync::Arc;
use std::time::SystemTime;

use clusterfs_fs::{Answer, Caller, Errno, FsError, Kind, Node, Result};

use super::{Created, ERROR_FILE, FileSpec, README_FILE, Verb, command_text, readme, spec_node, with_usage};
use crate::head::vms::{Desired, Vms};
use crate::vms::{VmSpec, parse_spec, parse_template};

const DIR_FILES: &[FileSpec] = &[
    README_FILE,
    FileSpec {
        name: "new",
        kind: Kind::Control,
        perm: 0o666,
        help: "w: a JSON VM spec: name template mem cpus data_disk node restart append",
    },
    FileSpec { name: "templates", kind: Kind::Dir, perm: 0o755, help: "one file per template (root writes JSON)" },
    ERROR_FILE,
];

const VM_FILES: &[FileSpec] = &[
    README_FILE,
    FileSpec {
        name: "state",
        kind: Kind::Control,
        perm: 0o644,
        help: "running|starting|shutting down|off|crashed on <node>, then its events; w: running | off",
    },
    FileSpec { name: "node", kind: Kind::Snapshot, perm: 0o444, help: "the node it runs on" },
    FileSpec { name: "spec", kind: Kind::Snapshot, perm: 0o444, help: "its spec and what it was made with (JSON)" },
    FileSpec { name: "ip", kind: Kind::Snapshot, perm: 0o444, help: "its address on the VM network (\"\\n\": none)" },
    FileSpec { name: "console", kind: Kind::Log, perm: 0o440, help: "its serial console, growing (tail -f)" },
    FileSpec { name: "ctl", kind: Kind::Control, perm: 0o644, help: "the owner or root writes a verb below" },
    ERROR_FILE,
];

pub const VERBS: &[Verb] = &[
    Verb { name: "start", args: "", help: "start it (also after a crash)" },
    Verb { name: "shutdown", args: "", help: "ACPI power button, destroyed after vms.shutdown_timeout_s" },
    Verb { name: "destroy", args: "", help: "stop it now (the power cord)" },
    Verb { name: "reboot", args: "", help: "reset it" },
];

#[derive(Debug)]
pub struct VmsView {
    vms: Arc<Vms>,
    /// Templates created by root and not written yet.
    pending: Created,
}

fn text(s: String) -> Answer<Vec<u8>> {
    Answer::Now(Ok(s.into_bytes()))
}

fn root_only(caller: &Caller) -> Result<()> {
    if caller.uid == 0 { Ok(()) } else { Err(FsError::denied("only root writes templates")) }
}

impl VmsView {
    /// The VMs placed on `node`.
    pub fn on_node(&self, node: &str) -> Vec<String> {
        self.vms.names().into_iter().filter(|n| self.vms.get(n).is_some_and(|vm| vm.rec.node == node)).collect()
    }

    pub fn new(vms: Arc<Vms>) -> VmsView {
        VmsView { vms, pending: Created::default() }
    }

    pub fn node(&self, path: &[&str]) -> Result<Node> {
        match path {
            [] => Ok(Node::new(Kind::Dir, 0o1777)),
            ["templates"] => Ok(Node::dir()),
            ["templates", "error"] => Ok(Node::new(Kind::Error, 0o444)),
            ["templates", t] if self.vms.template(t).is_some() || self.pending.contains(t) => {
                Ok(Node::new(Kind::Control, 0o644).mtime(SystemTime::now()))
            }
            [name] => match self.vms.get(name) {
                Some(vm) => Ok(Node::new(Kind::Dir, 0o755).owned(vm.rec.uid, vm.rec.gid).mtime(vm.changed)),
                None => spec_node(DIR_FILES, name).ok_or_else(|| FsError::not_found(format!("vms/{name}"))),
            },
            [name, file] => {
                let vm = self.vms.get(name).ok_or_else(|| FsError::not_found(format!("VM {name}")))?;
                let node = spec_node(VM_FILES, file)
                    .ok_or_else(|| FsError::not_found(format!("vms/{name}/{file}")))?
                    .owned(vm.rec.uid, vm.rec.gid);
                Ok(if *file == "console" {
                    node.size(self.vms.console_len(name)).mtime(SystemTime::now())
                } else {
                    node.mtime(vm.changed)
                })
            }
            _ => Err(FsError::not_found(format!("vms/{}", path.join("/")))),
        }
    }

    pub fn list(&self, path: &[&str]) -> Result<Vec<String>> {
        match path {
            [] => Ok(DIR_FILES.iter().map(|f| f.name.to_string()).chain(self.vms.names()).collect()),
            ["templates"] => {
                let mut v = vec!["error".to_string()];
                v.extend(self.vms.template_names());
                v.extend(self.pending.names());
                v.sort();
                v.dedup();
                Ok(v)
            }
            [name] if self.vms.get(name).is_some() => Ok(VM_FILES.iter().map(|f| f.name.to_string()).collect()),
            _ => Err(FsError::not_found(format!("vms/{}", path.join("/")))),
        }
    }

    pub fn render(&self, path: &[&str]) -> Answer<Vec<u8>> {
        match path {
            ["README"] => Answer::Now(Ok(readme(
                "vms/: VMs cloned from templates, run by the agents",
                DIR_FILES,
                &[],
                "`mkdir vms/<name>` clones the default template on the best node and starts it;\n\
                 `rmdir` destroys it and removes every file of it. Each VM directory has:\n\
                 state node spec ip console ctl error.\n",
            ))),
            ["new"] => text("write: {\"name\":\"vm1\",\"template\":\"debian\",\"mem\":\"2G\",\"cpus\":2}\n".into()),
            ["templates", t] => match self.vms.template(t) {
                Some(t) => text(serde_json::to_string_pretty(&t).unwrap_or_default() + "\n"),
                None => text(String::new()),
            },
            [name, file] => {
                let Some(vm) = self.vms.get(name) else {
                    return Answer::Now(Err(FsError::not_found(format!("VM {name}"))));
                };
                match *file {
                    "README" => Answer::Now(Ok(readme(&format!("vms/{name}: a VM"), VM_FILES, &[("ctl", VERBS)], ""))),
                    "state" => text(
                        vm.state_line() + "\n" + &vm.rec.events.iter().map(|e| format!("{e}\n")).collect::<String>(),
                    ),
                    "node" => text(format!("{}\n", vm.rec.node)),
                    "spec" => text(
                        serde_json::to_string_pretty(&serde_json::json!({
                            "spec": vm.rec.spec,
                            "template": vm.rec.launch.template,
                            "mem": vm.rec.launch.mem,
                            "cpus": vm.rec.launch.cpus,
                            "mac": vm.rec.launch.mac,
                            "desired": vm.rec.desired,
                        }))
                        .unwrap_or_default()
                            + "\n",
                    ),
                    "ip" => text(vm.rec.launch.net.as_ref().map_or("\n".into(), |n| format!("{}\n", n.ip))),
                    "ctl" => text(VERBS.iter().map(|v| format!("{}\n", v.name)).collect()),
                    _ => Answer::Now(Err(FsError::not_found(format!("vms/{name}/{file}")))),
                }
            }
            _ => Answer::Now(Err(FsError::not_found(format!("vms/{}", path.join("/"))))),
        }
    }

    pub fn read_log(&self, path: &[&str], caller: &Caller, offset: u64, size: u32) -> Result<Vec<u8>> {
        match path {
            [name, "console"] => {
                let vm = self.vms.get(name).ok_or_else(|| FsError::not_found(format!("VM {name}")))?;
                if caller.uid != 0 && caller.uid != vm.rec.uid {
                    return Err(FsError::denied(format!("VM {name} is not yours")));
                }
                self.vms
                    .console_read(name, offset, size)
                    .map_err(|e| FsError::new(Errno::Io, format!("reading the console's spool: {e}")))
            }
            _ => Err(FsError::invalid("not a log file")),
        }
    }

    pub fn write(&self, path: &[&str], caller: &Caller, data: &[u8]) -> Answer<Vec<u8>> {
        let done = |r: Result<()>| r.map(|()| Vec::new());
        match path {
            ["new"] => {
                let spec = match std::str::from_utf8(data)
                    .map_err(|_| "the spec is not UTF-8".to_string())
                    .and_then(parse_spec)
                {
                    Ok(s) => s,
                    Err(e) => return Answer::Now(Err(FsError::invalid(e))),
                };
                self.create(caller, spec)
            }
            ["templates", t] => {
                let t = t.to_string();
                let parsed = root_only(caller).and_then(|()| {
                    std::str::from_utf8(data)
                        .map_err(|_| "the template is not UTF-8".to_string())
                        .and_then(parse_template)
                        .map_err(FsError::invalid)
                });
                let vms = self.vms.clone();
                // Made or refused, a template created for this write is no longer pending.
                self.pending.take(&t);
                Answer::Now(parsed.and_then(|tpl| vms.set_template(&t, tpl)).map(|()| Vec::new()))
            }
            [name, "state"] => {
                let desired = match command_text(data, 64) {
                    Ok("running") => Desired::Running,
                    Ok("off") => Desired::Off,
                    Ok(other) => {
                        return Answer::Now(Err(FsError::invalid(format!("{other:?}: write running or off"))));
                    }
                    Err(e) => return Answer::Now(Err(e)),
                };
                Answer::Now(done(self.vms.want(caller, name, desired)))
            }
            [name, "ctl"] => {
                let verb = match command_text(data, 64) {
                    Ok(v) if VERBS.iter().any(|x| x.name == v) => v.to_string(),
                    Ok(v) => {
                        return Answer::Now(Err(with_usage(
                            FsError::invalid(format!("unknown verb {v:?}")),
                            "vms/<name>/ctl",
                            VERBS,
                        )));
                    }
                    Err(e) => return Answer::Now(Err(e)),
                };
                let (vms, caller, name) = (self.vms.clone(), *caller, name.to_string());
                Answer::later(async move { done(vms.ctl(&caller, &name, &verb).await) })
            }
            _ => Answer::Now(Err(FsError::denied("this file is read-only"))),
        }
    }

    fn create(&self, caller: &Caller, spec: VmSpec) -> Answer<Vec<u8>> {
        let (vms, caller) = (self.vms.clone(), *caller);
        Answer::later(async move { vms.create(&caller, spec).await.map(|()| Vec::new()) })
    }

    pub fn mkdir(&self, path: &[&str], caller: &Caller) -> Answer<()> {
        match path {
            [name] => {
                let spec = VmSpec { name: name.to_string(), ..VmSpec::default() };
                let (vms, caller) = (self.vms.clone(), *caller);
                Answer::later(async move { vms.create(&caller, spec).await })
            }
            _ => Answer::Now(Err(FsError::new(Errno::Perm, "directories cannot be made here"))),
        }
    }

    pub fn rmdir(&self, path: &[&str], caller: &Caller) -> Answer<()> {
        match path {
            [name] if self.vms.get(name).is_some() => {
                let (vms, caller, name) = (self.vms.clone(), *caller, name.to_string());
                Answer::later(async move { vms.remove(&caller, &name).await })
            }
            _ => Answer::Now(Err(FsError::new(Errno::Perm, "this directory cannot be removed"))),
        }
    }

    pub fn create_file(&self, path: &[&str], caller: &Caller) -> Answer<()> {
        match path {
            ["templates", t] => {
                let made =
                    root_only(caller).and_then(|()| crate::names::check("template", t).map_err(FsError::invalid));
                if made.is_ok() {
                    self.pending.insert(t);
                }
                Answer::Now(made)
            }
            _ => Answer::Now(Err(FsError::new(Errno::Perm, "files cannot be made here"))),
        }
    }

    /// The mode an NFS server sets on a template it has just made: see [`Created::chmod`].
    pub fn chmod_template(&self, name: &str, caller: &Caller) -> Result<()> {
        self.pending.chmod(name, caller)
    }

    pub fn unlink(&self, path: &[&str], caller: &Caller) -> Answer<()> {
        match path {
            ["templates", t] => {
                if let Err(e) = root_only(caller) {
                    return Answer::Now(Err(e));
                }
                let (vms, stored) = (self.vms.clone(), self.vms.template(t).is_some());
                let template = t.to_string();
                self.pending.remove(t, stored, move || vms.remove_template(&template))
            }
            _ => Answer::Now(Err(FsError::new(Errno::Perm, "this file cannot be removed"))),
        }
    }

    pub fn status(&self) -> String {
        self.vms.status()
    }
}
