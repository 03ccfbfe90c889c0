//! A following head's copy of every object, kept by etcd's watch, so that its takeover reads no store.
//!
//! The copy is a snapshot at one revision, then every change etcd's watch sends from there.
//! A scan first writes a mark under the cluster's prefix and waits for the copy to show it:
//! the mark's revision comes after every change the last leader made (etcd orders writes),
//! and the watch sends changes in order. (etcd's own "progress" answer is not ordered with
//! the changes in some 3.4 and 3.5 releases, so it is not used.)

use std::collections::BTreeMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use etcd_client::{Client, EventType, WatchOptions};

use super::Objects;

/// How long the watch rests after it failed before it starts again.
const RETRY: Duration = Duration::from_millis(200);
/// Tries in a row that bring nothing before the copy is read again whole.
const COPY_AGAIN: usize = 3;

/// Every object under the cluster's prefix (keys without it), as of `revision`.
#[derive(Debug, Default)]
struct Copy {
    objects: BTreeMap<String, Vec<u8>>,
    /// Every change up to this store revision is in `objects`; 0 until a snapshot is read.
    revision: i64,
}

#[derive(Debug, Default)]
pub(super) struct Mirror {
    copy: Mutex<Copy>,
    moved: Condvar,
}

impl Mirror {
    fn lock(&self) -> MutexGuard<'_, Copy> {
        self.copy.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Every object whose key starts with `prefix`, once the copy has every change up to
    /// `revision`; none if it does not within `patience`.
    pub(super) fn scan_at(&self, revision: i64, prefix: &str, patience: Duration) -> Option<Objects> {
        let deadline = Instant::now() + patience;
        let mut copy = self.lock();
        while copy.revision < revision {
            let left = deadline.checked_duration_since(Instant::now()).filter(|d| !d.is_zero())?;
            copy = self.moved.wait_timeout(copy, left).unwrap_or_else(std::sync::PoisonError::into_inner).0;
        }
        let objects = copy.objects.range(prefix.to_string()..);
        Some(objects.take_while(|(k, _)| k.starts_with(prefix)).map(|(k, v)| (k.clone(), v.clone())).collect())
    }

    /// Keeps the copy of every key under `prefix` for as long as the task runs. `client(n)`
    /// gives the client to watch with after `n` tries in a row that brought nothing: the
    /// member that leads etcd's raft first, then the next ones. After [`COPY_AGAIN`] such
    /// tries the copy is read again whole: etcd may no longer send (or be able to send in one
    /// answer) everything since where the watch stopped.
    pub(super) async fn keep(self: Arc<Self>, client: impl Fn(usize) -> Client, prefix: String) {
        let mut fruitless = 0;
        loop {
            let before = self.lock().revision;
            if let Err(e) = self.follow(client(fruitless), &prefix).await {
                tracing::debug!(error = %e, fruitless, "the store's watch stopped; starting it again");
            }
            fruitless = if self.lock().revision > before { 0 } else { fruitless + 1 };
            if fruitless == COPY_AGAIN && before > 0 {
                tracing::info!("the store's watch cannot go on from where it stopped: copying the store again");
                self.lock().revision = 0;
            }
            tokio::time::sleep(RETRY).await;
        }
    }

    /// Reads a snapshot unless the copy has one, then applies what the watch sends until it
    /// ends; forgets the snapshot when etcd compacted changes the copy lacks.
    async fn follow(&self, client: Client, prefix: &str) -> Result<(), etcd_client::Error> {
        let end = super::etcd::prefix_end(prefix);
        if self.lock().revision == 0 {
            let (pairs, revision) =
                super::etcd::read_all(client.clone(), prefix.as_bytes().to_vec(), end.clone()).await?;
            let objects: BTreeMap<_, _> = super::etcd::objects(pairs, prefix).collect();
            tracing::info!(objects = objects.len(), revision, "copied the store to follow it");
            *self.lock() = Copy { objects, revision };
        }
        let from = self.lock().revision + 1;
        let options = WatchOptions::new().with_range(end).with_start_revision(from);
        let mut watch = client.watch_client().max_decoding_message_size(super::etcd::MAX_ANSWER);
        let mut stream = watch.watch(prefix, Some(options)).await?;
        while let Some(response) = stream.message().await? {
            if response.compact_revision() > 0 || response.canceled() {
                tracing::info!(
                    compacted = response.compact_revision(),
                    "the store's watch fell behind etcd's compaction: copying the store again"
                );
                self.lock().revision = 0;
                return Ok(());
            }
            let changes = response.events().iter().filter_map(|event| {
                let kv = event.kv()?;
                let value = (event.event_type() == EventType::Put).then(|| kv.value());
                Some((kv.key(), value, kv.mod_revision()))
            });
            self.apply(changes, prefix);
        }
        Ok(())
    }

    /// Applies changes etcd's watch sent, in order: key, new value (none when deleted) and
    /// the revision that made the change. Keys outside `prefix` are not the cluster's.
    fn apply<'a>(&self, changes: impl Iterator<Item = (&'a [u8], Option<&'a [u8]>, i64)>, prefix: &str) {
        let mut copy = self.lock();
        for (key, value, revision) in changes {
            let Some(key) = key.strip_prefix(prefix.as_bytes()) else { continue };
            let key = String::from_utf8_lossy(key).into_owned();
            match value {
                Some(value) => copy.objects.insert(key, value.to_vec()),
                None => copy.objects.remove(&key),
            };
            copy.revision = copy.revision.max(revision);
        }
        drop(copy);
        self.moved.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put<'a>(key: &'a str, value: &'a str, revision: i64) -> (&'a [u8], Option<&'a [u8]>, i64) {
        (key.as_bytes(), Some(value.as_bytes()), revision)
    }

    #[test]
    fn a_scan_waits_for_the_copy_to_reach_the_revision_it_asks_for() {
        let mirror = Arc::new(Mirror::default());
        *mirror.lock() = Copy { objects: BTreeMap::new(), revision: 10 };
        mirror.apply(
            [put("/c/jobs/1", "a", 11), put("/c/jobs/2", "b", 11), put("/other/jobs/3", "x", 12)].into_iter(),
            "/c/",
        );
        mirror.apply([put("/c/jobs/1", "a2", 13), put("/c/nodes/cn1", "n", 13)].into_iter(), "/c/");
        mirror.apply([(b"/c/jobs/2".as_slice(), None, 14)].into_iter(), "/c/");
        let jobs = mirror.scan_at(14, "jobs/", Duration::ZERO).unwrap();
        assert_eq!(jobs, vec![("jobs/1".to_string(), b"a2".to_vec())]);
        // A revision the copy has not reached: none at once, and the change once it comes.
        assert_eq!(mirror.scan_at(15, "jobs/", Duration::from_millis(20)), None);
        let later = mirror.clone();
        let feeder = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            later.apply([put("/c/jobs/5", "e", 15)].into_iter(), "/c/");
        });
        let jobs = mirror.scan_at(15, "jobs/", Duration::from_secs(10)).unwrap();
        feeder.join().unwrap();
        assert_eq!(jobs.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(), ["jobs/1", "jobs/5"]);
        assert_eq!(
            mirror.scan_at(0, "nodes/", Duration::ZERO).unwrap(),
            vec![("nodes/cn1".to_string(), b"n".to_vec())]
        );
    }
}
