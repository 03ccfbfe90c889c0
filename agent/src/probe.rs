//! Reads the node's metrics from procfs each interval; rates are deltas since the last read.

use std::time::Instant;

use clusterfs::sitrep::Report;
use procfs::{Current, CurrentSI};

/// Counters kept between two reads, for rates and percentages.
#[derive(Debug, Default)]
struct Counters {
    at: Option<Instant>,
    cpu_total: u64,
    cpu_idle: u64,
    cpu_iowait: u64,
    disk_read: u64,
    disk_write: u64,
    net_rx: u64,
    net_tx: u64,
}

/// Samples this machine. One probe serves every node name an agent process reports for.
#[derive(Debug, Default)]
pub struct Probe {
    last: Counters,
    /// Jobs the agent runs now (the jobs subsystem sets it).
    pub jobs: u64,
}

impl Probe {
    /// A report of this instant. Missing procfs files leave their fields at zero.
    pub fn sample(&mut self) -> Report {
        let mut r =
            Report { agent_version: env!("CARGO_PKG_VERSION").to_string(), jobs: self.jobs, ..Report::default() };
        let now = Instant::now();
        let mut c = Counters { at: Some(now), ..Counters::default() };

        if let Ok(u) = procfs::Uptime::current() {
            r.uptime_s = u.uptime;
        }
        if let Ok(l) = procfs::LoadAverage::current() {
            (r.load1, r.load5, r.load15) = (l.one.into(), l.five.into(), l.fifteen.into());
        }
        if let Ok(ks) = procfs::KernelStats::current() {
            let t = &ks.total;
            c.cpu_idle = t.idle + t.iowait.unwrap_or(0);
            c.cpu_iowait = t.iowait.unwrap_or(0);
            c.cpu_total = t.user
                + t.nice
                + t.system
                + c.cpu_idle
                + t.irq.unwrap_or(0)
                + t.softirq.unwrap_or(0)
                + t.steal.unwrap_or(0);
            r.procs_running = ks.procs_running.unwrap_or(0).into();
            r.cpus = ks.cpu_time.len() as u64;
        }
        if let Ok(ci) = procfs::CpuInfo::current() {
            let n = ci.num_cores();
            let mhz: Vec<f64> = (0..n).filter_map(|i| ci.get_field(i, "cpu MHz")?.trim().parse().ok()).collect();
            if !mhz.is_empty() {
                r.cpu_mhz = mhz.iter().sum::<f64>() / mhz.len() as f64;
            }
            if r.cpus == 0 {
                r.cpus = n as u64;
            }
        }
        if let Ok(m) = procfs::Meminfo::current() {
            r.mem_total = m.mem_total;
            r.mem_avail = m.mem_available.unwrap_or(m.mem_free);
            r.swap_total = m.swap_total;
            r.swap_used = m.swap_total.saturating_sub(m.swap_free);
        }
        if let Ok(disks) = procfs::diskstats() {
            for d in disks.iter().filter(|d| is_whole_disk(&d.name)) {
                c.disk_read += d.sectors_read * 512;
                c.disk_write += d.sectors_written * 512;
            }
        }
        if let Ok(devs) = procfs::net::dev_status() {
            for d in devs.iter().filter(|(n, _)| n.as_str() != "lo").map(|(_, d)| d) {
                c.net_rx += d.recv_bytes;
                c.net_tx += d.sent_bytes;
            }
        }
        r.users = sessions();

        if let Some(prev) = self.last.at {
            let secs = now.duration_since(prev).as_secs_f64().max(1e-3);
            let rate = |new: u64, old: u64| new.saturating_sub(old) as f64 / secs;
            let dt = c.cpu_total.saturating_sub(self.last.cpu_total).max(1) as f64;
            r.cpu_pct = 100.0 * (1.0 - c.cpu_idle.saturating_sub(self.last.cpu_idle) as f64 / dt).clamp(0.0, 1.0);
            r.iowait_pct = 100.0 * (c.cpu_iowait.saturating_sub(self.last.cpu_iowait) as f64 / dt).clamp(0.0, 1.0);
            r.disk_read_bps = rate(c.disk_read, self.last.disk_read);
            r.disk_write_bps = rate(c.disk_write, self.last.disk_write);
            r.net_rx_bps = rate(c.net_rx, self.last.net_rx);
            r.net_tx_bps = rate(c.net_tx, self.last.net_tx);
        }
        self.last = c;
        r
    }
}

/// Whole disks only (partitions would count twice); loop, ram and optical devices are left out.
fn is_whole_disk(name: &str) -> bool {
    !["loop", "ram", "zram", "sr", "fd"].iter().any(|p| name.starts_with(p))
        && std::path::Path::new("/sys/block").join(name).exists()
}

/// Login sessions in utmp (USER_PROCESS entries).
fn sessions() -> u64 {
    // utmp is a fixed-format binary file; glibc's getutxent reads it. Only this thread
    // calls it, and the probe is single-threaded by construction (one per agent).
    let mut n = 0;
    // SAFETY: setutxent/getutxent/endutxent have no preconditions; the returned pointer is
    // valid until the next call and is only read before that.
    unsafe {
        libc::setutxent();
        loop {
            let e = libc::getutxent();
            if e.is_null() {
                break;
            }
            if (*e).ut_type == libc::USER_PROCESS {
                n += 1;
            }
        }
        libc::endutxent();
    }
    n
}

/// A cache of sample results shared by many node names in one process.
#[derive(Debug, Default)]
pub struct Shared {
    pub probe: Probe,
    pub last: Option<(Instant, Report)>,
}

impl Shared {
    /// A sample no older than `max_age`, taking a new one when needed.
    pub fn report(&mut self, max_age: std::time::Duration) -> Report {
        if let Some((at, r)) = &self.last
            && at.elapsed() < max_age
        {
            return r.clone();
        }
        let r = self.probe.sample();
        self.last = Some((Instant::now(), r.clone()));
        r
    }
}
