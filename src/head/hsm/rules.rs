//! coordinatool's placement rules: `archive_on_hosts`, `archive_on_hosts_ch` and archive batching slots.

use sha2::{Digest, Sha256};

use crate::config::HsmConfig;
use crate::hsm::{Action, Request};

/// `archive_on_hosts <needle> <movers...>`: archives whose data holds `needle` go to those movers.
#[derive(Debug, Clone, PartialEq)]
struct Pin {
    needle: String,
    movers: Vec<String>,
}

/// `archive_on_hosts_ch <key> <hash_count> <movers...>`: the value after `key` in the data picks
/// one mover by consistent hashing (its hash modulo `hash_count` first, when that is not 0).
#[derive(Debug, Clone, PartialEq)]
struct Ring {
    key: String,
    hash_count: u64,
    movers: Vec<String>,
}

/// Where a request may go.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Placement {
    /// Any mover that serves its archive id.
    Any,
    /// One of these movers only (waiting while none of them is there).
    Among(Vec<String>),
}

/// The placement rules of `[hsm]`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Rules {
    pins: Vec<Pin>,
    rings: Vec<Ring>,
    /// `batch_archives_slices_sec <idle> <max>`, in milliseconds.
    pub batch: Option<(u64, u64)>,
    pub batch_slots: usize,
}

fn words(line: &str) -> Vec<&str> {
    line.split_whitespace().collect()
}

impl Rules {
    /// The rules of `cfg`; the error is a sentence naming the bad rule.
    pub fn new(cfg: &HsmConfig) -> Result<Rules, String> {
        let mut rules = Rules { batch_slots: cfg.batch_archives_slots_per_client.max(1) as usize, ..Rules::default() };
        for line in &cfg.archive_on_hosts {
            match words(line).as_slice() {
                [needle, movers @ ..] if !movers.is_empty() => rules
                    .pins
                    .push(Pin { needle: needle.to_string(), movers: movers.iter().map(|m| m.to_string()).collect() }),
                _ => return Err(format!("hsm.archive_on_hosts {line:?}: write <tag> <mover> [<mover>...]")),
            }
        }
        for line in &cfg.archive_on_hosts_ch {
            match words(line).as_slice() {
                [key, count, movers @ ..] if !movers.is_empty() => {
                    let hash_count = count.parse().map_err(|_| {
                        format!("hsm.archive_on_hosts_ch {line:?}: the hash count {count:?} is not a number")
                    })?;
                    rules.rings.push(Ring {
                        key: key.to_string(),
                        hash_count,
                        movers: movers.iter().map(|m| m.to_string()).collect(),
                    });
                }
                _ => {
                    return Err(format!(
                        "hsm.archive_on_hosts_ch {line:?}: write <tag> <hash_count> <mover> [<mover>...]"
                    ));
                }
            }
        }
        if let Some(s) = &cfg.batch_archives_slices_sec {
            match s.as_slice() {
                [idle, max] => rules.batch = Some((idle * 1000, max * 1000)),
                _ => return Err("hsm.batch_archives_slices_sec takes [<idle>, <max>] seconds".into()),
            }
        }
        Ok(rules)
    }

    /// Where `r` may go, given which movers take work now (`present`: connected or within their
    /// grace time, and not drained). A consistent-hashing rule picks among present movers only,
    /// so a mover leaving moves its own share and nothing else.
    pub fn placement(&self, r: &Request, present: &dyn Fn(&str) -> bool) -> Placement {
        if r.action != Action::Archive {
            return Placement::Any;
        }
        for pin in &self.pins {
            if r.data.contains(&pin.needle) {
                return Placement::Among(pin.movers.clone());
            }
        }
        for ring in &self.rings {
            let Some(at) = r.data.find(&ring.key) else { continue };
            let value = &r.data[at + ring.key.len()..];
            let value = value.split(',').next().unwrap_or_default();
            let value =
                if ring.hash_count > 0 { (score("", value) % ring.hash_count).to_string() } else { value.into() };
            let best = ring.movers.iter().filter(|m| present(m)).max_by_key(|m| score(m, &value));
            return Placement::Among(best.into_iter().cloned().collect());
        }
        Placement::Any
    }
}

/// Rendezvous hashing weight of `value` on `mover`: stable across restarts and machines.
fn score(mover: &str, value: &str) -> u64 {
    let mut h = Sha256::new();
    h.update(mover.as_bytes());
    h.update([0]);
    h.update(value.as_bytes());
    u64::from_be_bytes(h.finalize()[..8].try_into().expect("a sha256 has 8 bytes"))
}

/// One batching slot of a mover: the archive data (tag) it is reserved for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    pub tag: String,
    /// When the tag took the slot, and when work of that tag was last sent or ended (ms).
    pub since_ms: u64,
    pub last_ms: u64,
    /// Archives of that tag running on the mover now.
    pub running: u32,
}

/// The batching slots of one mover.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Slots {
    pub slots: Vec<Option<Slot>>,
}

impl Slots {
    /// The slot an archive with data `tag` would use on this mover at `now`: the slot holding
    /// the tag, else a free or expired one. None: the mover is reserved for other tags.
    pub fn fit(&self, rules: &Rules, tag: &str, now: u64) -> Option<usize> {
        let (idle, max) = rules.batch?;
        if let Some(i) = self.slots.iter().position(|s| s.as_ref().is_some_and(|s| s.tag == tag)) {
            return Some(i);
        }
        let free = |s: &Option<Slot>| match s {
            None => true,
            Some(s) => {
                (s.running == 0 && now.saturating_sub(s.last_ms) >= idle)
                    || (max > 0 && now.saturating_sub(s.since_ms) >= max)
            }
        };
        (0..rules.batch_slots).find(|i| self.slots.get(*i).is_none_or(free))
    }

    /// Slots reserved for some tag now (to prefer the least busy mover).
    pub fn busy(&self) -> usize {
        self.slots.iter().flatten().count()
    }

    /// An archive with `tag` was sent through slot `i` at `now`.
    pub fn take(&mut self, i: usize, tag: &str, now: u64) {
        if self.slots.len() <= i {
            self.slots.resize(i + 1, None);
        }
        let slot = &mut self.slots[i];
        match slot {
            Some(s) if s.tag == tag => {
                s.last_ms = now;
                s.running += 1;
            }
            _ => *slot = Some(Slot { tag: tag.to_string(), since_ms: now, last_ms: now, running: 1 }),
        }
    }

    /// An archive with `tag` ended at `now`.
    pub fn ended(&mut self, tag: &str, now: u64) {
        if let Some(s) = self.slots.iter_mut().flatten().find(|s| s.tag == tag) {
            s.running = s.running.saturating_sub(1);
            s.last_ms = now;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hsm::Fid;

    fn archive(data: &str) -> Request {
        let fid = Fid { seq: 0x200000401, oid: 1, ver: 0 };
        Request {
            cookie: 1,
            fid,
            dfid: fid,
            action: Action::Archive,
            archive_id: 1,
            flags: 0,
            extent: (0, u64::MAX),
            gid: 0,
            data: data.into(),
            uid: None,
        }
    }

    fn rules(toml: &str) -> Rules {
        Rules::new(&crate::config::Config::from_toml(toml).unwrap().hsm).unwrap()
    }

    #[test]
    fn a_pinned_tag_goes_to_its_movers_only() {
        let r = rules("[hsm]\narchive_on_hosts = [\"tag=n0 mover0\", \"tag=n1 mover1 mover2\"]\n");
        let all = |_: &str| true;
        assert_eq!(
            r.placement(&archive("tag=n1,cr=x"), &all),
            Placement::Among(vec!["mover1".into(), "mover2".into()])
        );
        assert_eq!(r.placement(&archive("tag=n0"), &all), Placement::Among(vec!["mover0".into()]));
        assert_eq!(r.placement(&archive("other"), &all), Placement::Any);
        let mut restore = archive("tag=n0");
        restore.action = Action::Restore;
        assert_eq!(r.placement(&restore, &all), Placement::Any);
    }

    #[test]
    fn consistent_hashing_moves_only_the_share_of_a_mover_that_leaves() {
        let r = rules("[hsm]\narchive_on_hosts_ch = [\"grouping= 0 m0 m1 m2 m3\"]\n");
        let pick = |tag: usize, present: &dyn Fn(&str) -> bool| match r
            .placement(&archive(&format!("grouping=g{tag}")), present)
        {
            Placement::Among(v) => v[0].clone(),
            Placement::Any => panic!("the ring must pick"),
        };
        let before: Vec<String> = (0..400).map(|t| pick(t, &|_| true)).collect();
        for m in ["m0", "m1", "m2", "m3"] {
            let n = before.iter().filter(|b| *b == m).count();
            assert!(n > 50, "{m} got {n} of 400: the ring is lopsided");
        }
        let after: Vec<String> = (0..400).map(|t| pick(t, &|m| m != "m2")).collect();
        for (b, a) in before.iter().zip(&after) {
            if b == "m2" {
                assert_ne!(a, "m2");
            } else {
                assert_eq!(a, b, "a tag not on the leaving mover moved");
            }
        }
        let none = r.placement(&archive("grouping=g1"), &|_| false);
        assert_eq!(none, Placement::Among(vec![]));
    }

    #[test]
    fn hash_count_groups_values() {
        let r = rules("[hsm]\narchive_on_hosts_ch = [\"grouping= 1 m0 m1 m2\"]\n");
        let picks: std::collections::HashSet<_> =
            (0..50).map(|t| r.placement(&archive(&format!("grouping=v{t}")), &|_| true)).collect();
        assert_eq!(picks.len(), 1, "with one hash bucket every value goes to one mover");
    }

    #[test]
    fn batching_keeps_a_tag_on_its_slot_until_idle_or_max() {
        let r = rules("[hsm]\nbatch_archives_slices_sec = [300, 3600]\n");
        let mut s = Slots::default();
        assert_eq!(s.fit(&r, "tag=a", 0), Some(0));
        s.take(0, "tag=a", 0);
        assert_eq!(s.fit(&r, "tag=a", 10), Some(0));
        assert_eq!(s.fit(&r, "tag=b", 10), None, "the only slot is reserved for tag=a");
        s.ended("tag=a", 1_000);
        assert_eq!(s.fit(&r, "tag=b", 200_000), None, "idle for less than 300 s");
        assert_eq!(s.fit(&r, "tag=b", 301_000), Some(0), "idle for 300 s: free");
        s.take(0, "tag=a", 301_000);
        assert_eq!(s.fit(&r, "tag=b", 3_000_000), None, "busy and within its hour");
        assert_eq!(s.fit(&r, "tag=b", 301_000 + 3_600_000), Some(0), "its hour is over");
        let two = rules("[hsm]\nbatch_archives_slices_sec = [300, 0]\nbatch_archives_slots_per_client = 2\n");
        let mut s = Slots::default();
        s.take(0, "tag=a", 0);
        assert_eq!(s.fit(&two, "tag=b", 1), Some(1));
        s.take(1, "tag=b", 1);
        assert_eq!(s.fit(&two, "tag=c", 10_000_000), None, "max 0: no limit while busy");
        assert_eq!(s.busy(), 2);
        let none = rules("[hsm]\n");
        assert_eq!(Slots::default().fit(&none, "x", 0), None, "no batching: no slots to fit");
    }

    #[test]
    fn bad_rules_are_sentences() {
        let bad = |t: &str| Rules::new(&crate::config::Config::from_toml(t).unwrap().hsm).unwrap_err();
        assert!(bad("[hsm]\narchive_on_hosts = [\"tag=n0\"]\n").contains("archive_on_hosts"));
        assert!(bad("[hsm]\narchive_on_hosts_ch = [\"g= x m0\"]\n").contains("hash count"));
        assert!(bad("[hsm]\nbatch_archives_slices_sec = [1]\n").contains("batch"));
    }
}
