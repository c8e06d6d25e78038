//! Group commit on the requests' own tasks, for `fsync = "interval"`.
//!
//! Each request adds its records, and what to do once they are written (send its answer),
//! to the pending group, and moves on. When nobody is writing, the request that found it
//! so leads: it lets the other requests that are ready run first (one yield, when requests
//! have been coming in company), then chains and writes the whole group with one write
//! and runs every member's continuation; it goes on while groups keep forming behind it.
//! Nobody waits to be woken: the answer is sent by whoever wrote the record, as soon as it
//! is written.

use std::sync::{Mutex, PoisonError};

use super::record::Records;
use super::Written;

/// What a request does once its records were written, or could not be.
pub type Then = Box<dyn FnOnce(Written) + Send>;

#[derive(Default)]
pub struct Combiner {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    pending: Vec<Records>,
    waiting: Vec<Then>,
    /// Requests in the pending group.
    joined: u32,
    /// Requests in the last group written: with one, nobody else is around to wait for.
    last_joined: u32,
    /// A request is writing groups.
    leading: bool,
}

impl Combiner {
    /// Adds `records` to the pending group; `then` runs once the group is written by
    /// `write` (which is never called twice at once).
    pub async fn commit_then(&self, records: Records, then: Then, write: impl Fn(Vec<Records>) -> Written) {
        {
            let mut s = self.lock();
            s.pending.push(records);
            s.waiting.push(then);
            s.joined += 1;
            if std::mem::replace(&mut s.leading, true) {
                return;
            }
        }
        // Whatever happens to this task (it may be dropped at a yield, in a shutdown),
        // what it took on is written and answered.
        let mut lead = Lead { combiner: self, write: &write, armed: true };
        loop {
            if self.lock().last_joined > 1 {
                tokio::task::yield_now().await;
            }
            if !lead.write_group() {
                lead.armed = false;
                return;
            }
        }
    }

    /// Writes what is pending now, outside any task (shutdown).
    pub fn flush(&self, write: impl Fn(Vec<Records>) -> Written) {
        let lead = Lead { combiner: self, write: &write, armed: false };
        while !self.lock().leading && lead.write_group() {}
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

struct Lead<'a, W: Fn(Vec<Records>) -> Written> {
    combiner: &'a Combiner,
    write: &'a W,
    armed: bool,
}

impl<W: Fn(Vec<Records>) -> Written> Lead<'_, W> {
    /// Writes the pending group and answers its members; false (and the lead given up, in
    /// the same critical section a newcomer checks it in) when there is none.
    fn write_group(&self) -> bool {
        let (entries, waiting) = {
            let mut s = self.combiner.lock();
            if s.waiting.is_empty() {
                s.leading = false;
                return false;
            }
            s.last_joined = std::mem::take(&mut s.joined);
            (std::mem::take(&mut s.pending), std::mem::take(&mut s.waiting))
        };
        let result = (self.write)(entries);
        for then in waiting {
            then(result.clone());
        }
        true
    }
}

impl<W: Fn(Vec<Records>) -> Written> Drop for Lead<'_, W> {
    fn drop(&mut self) {
        if self.armed {
            while self.write_group() {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use super::*;

    fn records(n: usize) -> Records {
        let t = crate::audit::Stamp::now();
        let shared = crate::audit::RequestPart::none();
        let mut r = Records::request(&t, "acme", "unwrap", &shared, Ok(()), None, Default::default(), n);
        let access = crate::audit::Access::default();
        for _ in 0..n {
            r.push(crate::audit::Entry { access: &access, outcome: Ok(()), made: None });
        }
        r.finish()
    }

    async fn commit(c: &Combiner, n: usize, write: impl Fn(Vec<Records>) -> Written) -> Written {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let then: Then = Box::new(move |r| {
            let _ = tx.send(r);
        });
        c.commit_then(records(n), then, write).await;
        rx.await.expect("every request is answered")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_requests_share_writes_and_every_one_is_answered() {
        let c = Arc::new(Combiner::default());
        let writes = Arc::new(AtomicUsize::new(0));
        let records = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for i in 0..200 {
            let (c, writes, records) = (Arc::clone(&c), Arc::clone(&writes), Arc::clone(&records));
            tasks.push(tokio::spawn(async move {
                let n = 1 + i % 3;
                commit(&c, n, |batch| {
                    writes.fetch_add(1, Ordering::SeqCst);
                    records.fetch_add(batch.len(), Ordering::SeqCst);
                    // As slow as a write: the requests arriving meanwhile join the next one.
                    std::thread::sleep(std::time::Duration::from_micros(300));
                    Ok(())
                })
                .await
                // One record per request, however many items.
                .map(|()| 1)
            }));
        }
        let mut sent = 0;
        for t in tasks {
            sent += t.await.unwrap().unwrap();
        }
        assert_eq!(records.load(Ordering::SeqCst), sent, "every record written once");
        assert!(writes.load(Ordering::SeqCst) < 200, "some writes were shared");
        assert!(!c.lock().leading && c.lock().waiting.is_empty());
    }

    #[tokio::test]
    async fn a_failed_group_fails_its_requests_and_the_next_one_may_succeed() {
        let c = Combiner::default();
        let disk_full = || super::super::WriteError::Failed("disk full".into());
        let fail = |_: Vec<Records>| Err(disk_full());
        assert_eq!(commit(&c, 1, fail).await, Err(disk_full()));
        assert_eq!(commit(&c, 2, fail).await, Err(disk_full()));
        assert_eq!(commit(&c, 1, |_| Ok(())).await, Ok(()));
    }

    #[tokio::test]
    async fn a_lead_dropped_mid_way_still_writes_and_answers_what_it_took_on() {
        let c = Combiner::default();
        let answered = Arc::new(AtomicUsize::new(0));
        // Company last time, so the next lead yields; drop it at that yield.
        c.lock().last_joined = 2;
        let a = Arc::clone(&answered);
        let then: Then = Box::new(move |r| {
            assert_eq!(r, Ok(()));
            a.fetch_add(1, Ordering::SeqCst);
        });
        let fut = c.commit_then(records(1), then, |_| Ok(()));
        let mut fut = Box::pin(fut);
        // First poll: it takes the lead and yields.
        assert!(futures_poll_once(fut.as_mut()).is_pending());
        drop(fut);
        assert_eq!(answered.load(Ordering::SeqCst), 1);
        assert!(!c.lock().leading, "the lead is free again");
    }

    fn futures_poll_once<F: std::future::Future>(f: std::pin::Pin<&mut F>) -> std::task::Poll<F::Output> {
        let waker = std::task::Waker::noop();
        f.poll(&mut std::task::Context::from_waker(waker))
    }
}
