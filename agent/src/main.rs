//! clusterfs-agent: serves one or many node names of this machine to a clusterfs head.

mod images;
mod isolate;
mod link;
mod mover;
mod probe;
mod relay;
mod runner;
mod shim;
mod vms;
mod zygote;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use clap::Parser;
use clusterfs::auth::Secret;
use clusterfs::nodeset::NodeSet;

/// Dials the head, authenticates with the cluster secret, reports this node's sitrep every
/// interval and runs the work the head asks for.
#[derive(Debug, Parser)]
#[command(name = "clusterfs-agent", version)]
struct Args {
    /// Head address(es) to dial, HOST:PORT, comma-separated; tried in turn.
    #[arg(long, value_delimiter = ',', required = true)]
    head: Vec<String>,
    /// This node's name.
    #[arg(long, conflicts_with = "nodes", required_unless_present = "nodes")]
    name: Option<String>,
    /// Serve every name of this nodeset, each with its own connection and identity
    /// (many nodes on one machine, for tests and benchmarks).
    #[arg(long)]
    nodes: Option<String>,
    /// The cluster secret (mode 0600), the same file the head created.
    #[arg(long)]
    secret_file: PathBuf,
    /// Largest frame accepted from the head, in bytes.
    #[arg(long, default_value_t = clusterfs::proto::DEFAULT_MAX_FRAME)]
    max_frame: usize,
    /// Where runs are kept (`<state>/<node>/runs`); they outlive agent restarts.
    #[arg(long, default_value = "/var/lib/clusterfs-agent")]
    state: PathBuf,
    /// Where to take relay connections (file copies from other agents), ADDR:PORT; port 0
    /// picks a free one. The head learns it when the agent connects.
    #[arg(long, default_value = "0.0.0.0:0")]
    relay_listen: String,
    /// Serve as an HSM data mover for the head's coordinator.
    #[arg(long)]
    mover: bool,
    /// Archive ids this mover serves (comma-separated); none: any.
    #[arg(long, value_delimiter = ',', requires = "mover")]
    archive_id: Vec<u32>,
    /// The Lustre mount; files are opened as <lustre-root>/.lustre/fid/<fid>.
    #[arg(long, requires = "mover")]
    lustre_root: Option<PathBuf>,
    /// Where the POSIX backend keeps archive copies, keyed by fid; %n is the node name.
    #[arg(long, requires = "mover")]
    archive_root: Option<PathBuf>,
    /// Run each request with `sh -c CMD` (like lhsmtool_cmd) instead of the POSIX backend.
    #[arg(long, requires = "mover")]
    mover_command: Option<String>,
    /// Archives run at once (-1: no limit).
    #[arg(long, default_value_t = -1, allow_hyphen_values = true)]
    max_archive: i64,
    /// Restores run at once (-1: no limit).
    #[arg(long, default_value_t = -1, allow_hyphen_values = true)]
    max_restore: i64,
    /// Removals run at once (-1: no limit).
    #[arg(long, default_value_t = -1, allow_hyphen_values = true)]
    max_remove: i64,
    /// Requests copied at the same time by this process's movers.
    #[arg(long, default_value_t = 4)]
    mover_threads: usize,
}

/// The mover settings of the command line, when --mover is given.
fn mover_config(args: &Args) -> anyhow::Result<Option<mover::MoverConfig>> {
    if !args.mover {
        return Ok(None);
    }
    let slots = |n: i64, what: &str| match n {
        -1 => Ok(None),
        0.. => Ok(Some(u32::try_from(n)?)),
        _ => anyhow::bail!("--{what} must be -1 (no limit) or at least 0"),
    };
    let lustre_root = args.lustre_root.clone().unwrap_or_else(|| PathBuf::from("/mnt/lustre"));
    if args.mover_command.is_none() {
        mover::check_root(&lustre_root).map_err(anyhow::Error::msg)?;
        if args.archive_root.is_none() {
            anyhow::bail!("--mover needs --archive-root (the POSIX backend) or --mover-command");
        }
    }
    Ok(Some(mover::MoverConfig {
        info: clusterfs::hsm::MoverInfo {
            archive_ids: args.archive_id.clone(),
            max_archive: slots(args.max_archive, "max-archive")?,
            max_restore: slots(args.max_restore, "max-restore")?,
            max_remove: slots(args.max_remove, "max-remove")?,
        },
        lustre_root,
        archive_root: args.archive_root.clone().unwrap_or_default(),
        command: args.mover_command.clone(),
        threads: args.mover_threads,
    }))
}

fn main() -> std::process::ExitCode {
    clusterfs::cli::exit_with("clusterfs-agent", run)
}

fn run() -> anyhow::Result<()> {
    // The per-run supervisor mode the agent starts for each job (not for people).
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if argv.len() == 3 && argv[1] == "--shim" {
        std::process::exit(shim::main(std::path::Path::new(&argv[2])));
    }
    let args = Args::parse();
    // A copy's chunks are 1 MiB buffers received and freed at link speed: the allocator keeps
    // them for the next chunk rather than giving them back to the kernel, which would fault
    // in and zero them again each time (a tenth of a relaying node's CPU).
    // SAFETY: mallopt only sets the allocator's parameters; no other thread runs yet.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 20);
    }
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("CLUSTERFS_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        // Colours for a terminal only: a log file or the journal gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let names: Vec<String> = match (&args.name, &args.nodes) {
        (Some(n), _) => {
            clusterfs::names::check("node", n).map_err(anyhow::Error::msg)?;
            vec![n.clone()]
        }
        (None, Some(set)) => NodeSet::parse(set).context("--nodes")?.iter().collect(),
        (None, None) => unreachable!("clap requires --name or --nodes"),
    };
    let secret = Secret::load(&args.secret_file)?;
    let mover = mover_config(&args)?;
    // Forked while this process has one thread: later forks of it are safe.
    zygote::start();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async move {
        let relay = relay::Relay::start(&args.relay_listen, secret.clone(), args.max_frame)
            .await
            .with_context(|| format!("--relay-listen {}", args.relay_listen))?;
        let cfg = Arc::new(link::LinkConfig {
            heads: args.head,
            secret,
            max_frame: args.max_frame,
            state: args.state,
            relay,
            images: Arc::default(),
            mover,
        });
        let probe = Arc::new(Mutex::new(probe::Shared::default()));
        for name in names {
            tokio::spawn(link::run(name, cfg.clone(), probe.clone()));
        }
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        zygote::stopping();
        tracing::info!("stopping");
        mover::interrupt_all();
        Ok(())
    })
}
