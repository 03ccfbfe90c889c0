//! clusterfs: mount a cluster as a filesystem (`up`, `mount`), move its store (`store copy`) and
//! work with nodesets (`nodeset`).

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};

use anyhow::{Context, bail};
use clap::{ArgGroup, CommandFactory, FromArgMatches, Parser, Subcommand};
use clusterfs::config::Config;
use clusterfs::head;
use clusterfs::nodeset::NodeSet;
use tracing::{info, warn};

#[derive(Debug, Parser)]
#[command(name = "clusterfs", version, about = "Run a Linux cluster through one filesystem")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, clap::Args)]
struct HeadArgs {
    /// Where to mount the tree (created if missing; a stale mount left by a crash is cleared).
    mountpoint: PathBuf,
    /// Address agents dial, HOST:PORT (port 0 picks a free one; the choice is written to STATE/head.addr).
    #[arg(long)]
    listen: Option<String>,
    /// State directory: store, cluster secret, spools [default: /var/lib/clusterfs].
    #[arg(long)]
    state: Option<PathBuf>,
    /// TOML configuration file (see README.md).
    #[arg(long)]
    config: Option<PathBuf>,
    /// The store: etcd://host:port[,host:port...][/prefix], shared by several heads
    /// [default: the embedded store in the state directory].
    #[arg(long)]
    store: Option<String>,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Head plus one local agent per name in NODESET, state in one directory: a working cluster.
    Up {
        #[command(flatten)]
        head: HeadArgs,
        /// Node names served by local agents [default: this host's short name].
        #[arg(long)]
        nodes: Option<String>,
    },
    /// The head alone: mount the tree and wait for agents.
    Mount {
        #[command(flatten)]
        head: HeadArgs,
    },
    /// Work on a head's store while no head uses it.
    Store {
        #[command(subcommand)]
        cmd: StoreCmd,
    },
    /// Fold, expand or count nodesets, as ClusterShell's cluset does.
    #[command(group(ArgGroup::new("mode").required(true).args(["fold", "expand", "count"])))]
    Nodeset {
        /// Print the folded set: cn[1-3,5].
        #[arg(short = 'f', long)]
        fold: bool,
        /// Print every name, separated by spaces.
        #[arg(short = 'e', long)]
        expand: bool,
        /// Print how many names.
        #[arg(short = 'c', long)]
        count: bool,
        /// Where a mounted tree is, to resolve @group from its groups/.
        #[arg(long, default_value = "/cluster")]
        root: PathBuf,
        /// Largest set accepted.
        #[arg(long, default_value_t = clusterfs::nodeset::DEFAULT_LIMIT)]
        limit: usize,
        /// Nodesets; several are united.
        #[arg(required = true)]
        sets: Vec<String>,
        /// Take SET out of what the arguments before it make (applied in command-line order).
        #[arg(short = 'x', long, value_name = "SET")]
        exclude: Vec<String>,
        /// Keep only what is also in SET.
        #[arg(short = 'i', long, value_name = "SET")]
        intersection: Vec<String>,
        /// Keep what is in exactly one of the two (symmetric difference).
        #[arg(short = 'X', long, value_name = "SET")]
        xor: Vec<String>,
    },
}

/// How a nodeset argument joins what the arguments before it made, as cluset's options do.
#[derive(Debug, Clone, Copy)]
enum SetOp {
    Union,
    Exclude,
    Intersection,
    Xor,
}

#[derive(Debug, Subcommand)]
enum StoreCmd {
    /// Copy every object (and the cluster secret) into an empty store: moves a site from the
    /// embedded store to etcd. Stop the head first.
    Copy {
        /// A head's state directory, or etcd://host:port[,host:port...][/prefix].
        #[arg(long)]
        from: String,
        /// A state directory, or etcd://host:port[,host:port...][/prefix]; must hold no objects.
        #[arg(long)]
        to: String,
    },
}

fn main() -> std::process::ExitCode {
    clusterfs::cli::exit_with("clusterfs", run)
}

fn run() -> anyhow::Result<()> {
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("CLUSTERFS_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        // Colours for a terminal only: a log file or the journal gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match cli.cmd {
        Cmd::Up { head, nodes } => serve(head, Some(nodes.unwrap_or_else(short_hostname))),
        Cmd::Mount { head } => serve(head, None),
        Cmd::Store { cmd: StoreCmd::Copy { from, to } } => {
            let n = head::copy_store(&from, &to)?;
            println!("clusterfs: copied {n} objects and the cluster secret from {from} to {to}");
            Ok(())
        }
        Cmd::Nodeset { fold, expand, count, root, limit, .. } => {
            let sets = matches.subcommand_matches("nodeset").map(in_order).unwrap_or_default();
            nodeset(&sets, &root, limit, fold, expand, count)
        }
    }
}

fn short_hostname() -> String {
    let name = clusterfs::names::hostname();
    let short = name.split('.').next().unwrap_or_default().to_string();
    if clusterfs::names::check("node", &short).is_ok() { short } else { "node0".into() }
}

/// Runs a head (and local agents when `nodes` is given) until SIGINT or SIGTERM.
fn serve(args: HeadArgs, nodes: Option<String>) -> anyhow::Result<()> {
    let mut cfg = Config::load(args.config.as_deref())?;
    if let Some(l) = args.listen {
        cfg.head.listen = l;
    }
    if let Some(s) = args.state {
        cfg.head.state_dir = s;
    }
    if let Some(s) = args.store {
        cfg.head.store = s;
    }
    let local = match &nodes {
        Some(n) => {
            Some(NodeSet::parse_with(n, &clusterfs::nodeset::NoGroups, cfg.head.nodeset_limit).context("--nodes")?)
        }
        None => None,
    };
    let mountpoint = std::path::absolute(&args.mountpoint)?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async move {
        let head = head::start(cfg.clone(), &mountpoint).await?;
        let mut agent = match &local {
            Some(set) if !set.is_empty() => Some(spawn_agent(&head.addr.to_string(), set, &cfg.head.state_dir)?),
            _ => None,
        };
        println!("clusterfs: mounted at {}, agents dial {}", mountpoint.display(), head.addr);
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let lost = tokio::select! {
            _ = tokio::signal::ctrl_c() => { info!("SIGINT: stopping"); false }
            _ = term.recv() => { info!("SIGTERM: stopping"); false }
            _ = head.unmounted() => { warn!(mountpoint = %mountpoint.display(), "unmounted by someone else: stopping"); false }
            _ = head.lost() => true,
        };
        if let Some(child) = agent.as_mut() {
            stop_child(child);
        }
        head.shutdown().await;
        if lost {
            bail!("this head leads no more and cannot go on: start it again to rejoin (systemd's Restart= does)");
        }
        Ok(())
    })
}

/// Starts the local agent process serving `set`, from the directory of this executable.
fn spawn_agent(addr: &str, set: &NodeSet, state: &Path) -> anyhow::Result<Child> {
    let exe = std::env::current_exe()?;
    let agent = exe.with_file_name("clusterfs-agent");
    if !agent.exists() {
        bail!("{} not found: build it with `cargo build` (it ships beside clusterfs)", agent.display());
    }
    let mut cmd = Command::new(&agent);
    cmd.args(["--head", addr, "--nodes", &set.fold(), "--secret-file"])
        .arg(head::secret_path(state))
        .arg("--state")
        .arg(state.join("agent"));
    // The local agents belong to this `up`: they end with it, even when it is killed, so a
    // restarted `up` never finds its node names held by the agents of the last one.
    // SAFETY: the closure runs in the forked child before exec and only calls prctl(2),
    // which is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().with_context(|| format!("starting {}", agent.display()))?;
    info!(nodes = %set, pid = child.id(), "local agent started");
    Ok(child)
}

fn stop_child(child: &mut Child) {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX));
    if let Err(e) = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM) {
        warn!(error = %e, "could not stop the local agent");
    }
    let _ = child.wait();
}

/// The nodeset arguments with how each joins the ones before it, in command-line order.
fn in_order(m: &clap::ArgMatches) -> Vec<(SetOp, String)> {
    let mut all = Vec::new();
    for (id, op) in [
        ("sets", SetOp::Union),
        ("exclude", SetOp::Exclude),
        ("intersection", SetOp::Intersection),
        ("xor", SetOp::Xor),
    ] {
        if let (Some(values), Some(at)) = (m.get_many::<String>(id), m.indices_of(id)) {
            all.extend(at.zip(values).map(|(i, v)| (i, op, v.clone())));
        }
    }
    all.sort_by_key(|(i, _, _)| *i);
    all.into_iter().map(|(_, op, v)| (op, v)).collect()
}

fn nodeset(
    sets: &[(SetOp, String)],
    root: &Path,
    limit: usize,
    fold: bool,
    expand: bool,
    count: bool,
) -> anyhow::Result<()> {
    let groups = |name: &str| {
        clusterfs::names::check("group", name).ok()?;
        std::fs::read_to_string(root.join("groups").join(name)).ok()
    };
    let mut all = NodeSet::new();
    for (op, s) in sets {
        let set = NodeSet::parse_with(s, &groups, limit).map_err(|e| anyhow::anyhow!("{s}: {e}"))?;
        match op {
            SetOp::Union => all.union(&set),
            SetOp::Exclude => all.difference(&set),
            SetOp::Intersection => all.intersection(&set),
            SetOp::Xor => all.symmetric_difference(&set),
        }
        if all.len() > limit {
            bail!("nodeset too large: {} names, the limit is {limit}", all.len());
        }
    }
    if fold {
        println!("{}", all.fold());
    } else if expand {
        println!("{}", all.iter().collect::<Vec<_>>().join(" "));
    } else if count {
        println!("{}", all.len());
    }
    Ok(())
}
