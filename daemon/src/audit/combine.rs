//! Group commit on the requests' own tasks, for `fsync = "interval"`.
//!
//! Each request adds its records to a pending group. One of the waiting requests at a
//! time leads: it lets the other requests that are ready run first (one yield), so their
//! records join the group, then chains and writes the whole group with one write and
//! wakes everyone in it. A request answers once its group was written, as with a writer
//! thread, but without two thread hand-offs per request, and one write serves many.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::Notify;

use super::record::Entry;

/// Failed groups remembered, for the requests still to collect their result.
const KEEP_FAILURES: u64 = 1 << 20;

#[derive(Default)]
pub struct Combiner {
    state: Mutex<State>,
    written: Notify,
}

#[derive(Default)]
struct State {
    pending: Vec<Entry>,
    /// The number the pending group will be written as; groups count from 0.
    open: u64,
    /// Requests in the pending group.
    joined: u32,
    /// Requests in the last group written: with one, nobody else is around to wait for.
    last_joined: u32,
    /// A request is writing a group (or about to).
    leading: bool,
    /// Groups `0..done` are written (or failed).
    done: u64,
    /// Runs of failed groups `[from, to)`, with the error, newest last.
    failed: VecDeque<(u64, u64, Arc<str>)>,
}

impl State {
    fn result(&self, group: u64) -> Option<Result<(), String>> {
        if group >= self.done {
            return None;
        }
        let failed = self.failed.iter().rev().find(|(from, to, _)| (*from..*to).contains(&group));
        Some(match failed {
            Some((_, _, e)) => Err(e.to_string()),
            None => Ok(()),
        })
    }

    fn record(&mut self, group: u64, result: &Result<(), String>) {
        self.done = group + 1;
        if let Err(e) = result {
            match self.failed.back_mut() {
                Some((_, to, last)) if *to == group && **last == **e => *to = group + 1,
                _ => self.failed.push_back((group, group + 1, e.as_str().into())),
            }
        }
        while self.failed.front().is_some_and(|(_, to, _)| to + KEEP_FAILURES < self.done) {
            self.failed.pop_front();
        }
    }
}

impl Combiner {
    /// Adds `entries` to the pending group and returns once that group was written by
    /// `write` (called by whichever request leads; never two at once).
    pub async fn commit(
        &self,
        entries: Vec<Entry>,
        write: impl Fn(Vec<Entry>) -> Result<(), String>,
    ) -> Result<(), String> {
        let group = {
            let mut s = self.lock();
            s.pending.extend(entries);
            s.joined += 1;
            s.open
        };
        loop {
            let written = self.written.notified();
            let lead = {
                let mut s = self.lock();
                if let Some(r) = s.result(group) {
                    return r;
                }
                !std::mem::replace(&mut s.leading, true)
            };
            if lead {
                self.lead(&write).await;
            } else {
                written.await;
            }
        }
    }

    async fn lead(&self, write: &impl Fn(Vec<Entry>) -> Result<(), String>) {
        // Whatever happens to this request (it may be dropped at the yield, in a shutdown),
        // the lead passes on and the waiters look again.
        let _release = Release(self);
        // When requests came in company last time, the ones ready to run now add their
        // records before the write; a lone request (one connection, one at a time) does not
        // wait for company that is not coming.
        if self.lock().last_joined > 1 {
            tokio::task::yield_now().await;
        }
        let (group, entries) = {
            let mut s = self.lock();
            let group = s.open;
            s.open += 1;
            s.last_joined = std::mem::take(&mut s.joined);
            (group, std::mem::take(&mut s.pending))
        };
        let result = write(entries);
        self.lock().record(group, &result);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

struct Release<'a>(&'a Combiner);

impl Drop for Release<'_> {
    fn drop(&mut self) {
        self.0.lock().leading = false;
        self.0.written.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    fn entry() -> Entry {
        Entry::raw("2026-11-23", "{\"time\":\"t\"}")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_requests_share_writes_and_each_gets_its_groups_result() {
        let c = Arc::new(Combiner::default());
        let writes = Arc::new(AtomicUsize::new(0));
        let records = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for i in 0..200 {
            let (c, writes, records) = (Arc::clone(&c), Arc::clone(&writes), Arc::clone(&records));
            tasks.push(tokio::spawn(async move {
                let n = 1 + i % 3;
                c.commit((0..n).map(|_| entry()).collect(), |batch| {
                    writes.fetch_add(1, Ordering::SeqCst);
                    records.fetch_add(batch.len(), Ordering::SeqCst);
                    // As slow as a write: the requests arriving meanwhile join the next one.
                    std::thread::sleep(std::time::Duration::from_micros(300));
                    Ok(())
                })
                .await
                .map(|()| n)
            }));
        }
        let mut sent = 0;
        for t in tasks {
            sent += t.await.unwrap().unwrap();
        }
        assert_eq!(records.load(Ordering::SeqCst), sent, "every record written once");
        assert!(writes.load(Ordering::SeqCst) < 200, "some writes were shared");
    }

    #[tokio::test]
    async fn a_failed_group_fails_its_requests_and_only_them() {
        let c = Combiner::default();
        let fail = |_: Vec<Entry>| Err("disk full".to_string());
        assert_eq!(c.commit(vec![entry()], fail).await, Err("disk full".into()));
        assert_eq!(c.commit(vec![entry()], fail).await, Err("disk full".into()));
        assert_eq!(c.commit(vec![entry()], |_| Ok(())).await, Ok(()));
        let s = c.lock();
        assert_eq!(s.failed.len(), 1, "consecutive failures are one run");
        assert_eq!(
            (s.result(0), s.result(1), s.result(2)),
            (Some(Err("disk full".into())), Some(Err("disk full".into())), Some(Ok(())))
        );
        assert_eq!(s.result(3), None);
    }
}
