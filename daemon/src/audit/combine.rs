//! Group commit on the requests' own tasks, for `fsync = "interval"`.
//!
//! Each request adds its records, and what to do once they are written (send its answer),
//! to the pending group, and moves on. When nobody is writing, the request that found it
//! so leads: it lets the other requests that are ready run first (one turn at the back of
//! its worker's queue, when requests have been coming in company), then chains and writes
//! the whole group with one write and runs every member's continuation; it goes on while
//! groups keep forming behind it. Nobody waits to be woken: the answer is sent by whoever
//! wrote the record, as soon as it is written.
//!
//! Company is what makes the turn pay: a write is a system call, about a microsecond on a
//! virtual machine, and requests over many connections that were all ready together share
//! one. A single sequential client gains nothing from it, and the turn would cost it a
//! wake-up of an idle runtime thread (come to steal the queued task) per request.

use std::future::Future;
use std::sync::{Mutex, PoisonError};
use std::task::Poll;

use super::record::Records;

/// How recently (in requests joined) requests must have come over more than one connection
/// for a lead to take its turn before writing.
const COMPANY: u32 = 16;

/// What a request does once its records were written, or could not be.
pub type Then = Box<dyn FnOnce(Result<(), String>) + Send>;

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
    /// The connection of the last request to join.
    last_from: usize,
    /// Requests joined since one came over a connection other than the one before it.
    since_mixed: u32,
}

impl State {
    /// Whether other requests are likely to be ready alongside a lead: the last group
    /// had more than one, or requests are coming over more than one connection.
    fn in_company(&self) -> bool {
        self.last_joined > 1 || self.since_mixed < COMPANY
    }
}

impl Combiner {
    /// Adds `records`, of a request that came over connection `from` (any number that
    /// tells connections apart), to the pending group; `then` runs once the group is
    /// written by `write` (which is never called twice at once).
    pub async fn commit_then(
        &self,
        records: Records,
        from: usize,
        then: Then,
        write: impl Fn(Vec<Records>) -> Result<(), String>,
    ) {
        {
            let mut s = self.lock();
            s.pending.push(records);
            s.waiting.push(then);
            s.joined += 1;
            s.since_mixed = if std::mem::replace(&mut s.last_from, from) == from {
                s.since_mixed.saturating_add(1)
            } else {
                0
            };
            if std::mem::replace(&mut s.leading, true) {
                return;
            }
        }
        // Whatever happens to this task (it may be dropped at a yield, in a shutdown),
        // what it took on is written and answered.
        let mut lead = Lead { combiner: self, write: &write, armed: true };
        loop {
            if self.lock().in_company() {
                back_of_the_queue().await;
            }
            if !lead.write_group() {
                lead.armed = false;
                return;
            }
        }
    }

    /// Writes what is pending now, outside any task (shutdown).
    pub fn flush(&self, write: impl Fn(Vec<Records>) -> Result<(), String>) {
        let lead = Lead { combiner: self, write: &write, armed: false };
        while !self.lock().leading && lead.write_group() {}
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Lets the tasks that are ready now run before this one goes on: a task that wakes itself
/// while it runs is queued again behind them (tokio: at the back of its worker's queue).
/// Not `tokio::task::yield_now`, which holds the task until the runtime has run out of
/// ready tasks and polled its I/O driver, one more `epoll_wait` for every group.
fn back_of_the_queue() -> impl Future<Output = ()> {
    let mut queued = false;
    std::future::poll_fn(move |cx| {
        if std::mem::replace(&mut queued, true) {
            return Poll::Ready(());
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    })
}

struct Lead<'a, W: Fn(Vec<Records>) -> Result<(), String>> {
    combiner: &'a Combiner,
    write: &'a W,
    armed: bool,
}

impl<W: Fn(Vec<Records>) -> Result<(), String>> Lead<'_, W> {
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

impl<W: Fn(Vec<Records>) -> Result<(), String>> Drop for Lead<'_, W> {
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
        let mut r = Records::new(&t, "acme", "unwrap", &crate::audit::RequestPart::none(), n);
        let access = crate::audit::Access::default();
        for i in 0..n {
            let it = crate::audit::Item { item: Some(i), access: &access, outcome: Ok(()), detail: None };
            r.push(it);
        }
        r
    }

    /// Commits `n` records of a request over connection 1.
    async fn commit(
        c: &Combiner,
        n: usize,
        write: impl Fn(Vec<Records>) -> Result<(), String>,
    ) -> Result<(), String> {
        commit_from(c, 1, n, write).await
    }

    async fn commit_from(
        c: &Combiner,
        from: usize,
        n: usize,
        write: impl Fn(Vec<Records>) -> Result<(), String>,
    ) -> Result<(), String> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let then: Then = Box::new(move |r| {
            let _ = tx.send(r);
        });
        c.commit_then(records(n), from, then, write).await;
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
                commit_from(&c, i % 16, n, |batch| {
                    writes.fetch_add(1, Ordering::SeqCst);
                    records.fetch_add(batch.iter().map(Records::len).sum::<usize>(), Ordering::SeqCst);
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
        assert!(!c.lock().leading && c.lock().waiting.is_empty());
    }

    #[tokio::test]
    async fn a_failed_group_fails_its_requests_and_the_next_one_may_succeed() {
        let c = Combiner::default();
        let fail = |_: Vec<Records>| Err("disk full".to_string());
        assert_eq!(commit(&c, 1, fail).await, Err("disk full".into()));
        assert_eq!(commit(&c, 2, fail).await, Err("disk full".into()));
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
        let fut = c.commit_then(records(1), 1, then, |_| Ok(()));
        let mut fut = Box::pin(fut);
        // First poll: it takes the lead and yields.
        assert!(futures_poll_once(fut.as_mut()).is_pending());
        drop(fut);
        assert_eq!(answered.load(Ordering::SeqCst), 1);
        assert!(!c.lock().leading, "the lead is free again");
    }

    /// Writes in `c` as the combiner writes them: the number of records of each.
    fn recording(groups: &Arc<Mutex<Vec<usize>>>) -> impl Fn(Vec<Records>) -> Result<(), String> + use<> {
        let groups = Arc::clone(groups);
        move |group| {
            groups.lock().unwrap().push(group.iter().map(Records::len).sum());
            Ok(())
        }
    }

    #[tokio::test]
    async fn requests_ready_together_over_several_connections_share_one_write() {
        let c = Arc::new(Combiner::default());
        let groups = Arc::new(Mutex::new(Vec::new()));
        // Eight requests over eight connections, all ready before any runs (one thread).
        let tasks: Vec<_> = (1..=8)
            .map(|conn| {
                let (c, write) = (Arc::clone(&c), recording(&groups));
                tokio::spawn(async move { commit_from(&c, conn, 1, write).await })
            })
            .collect();
        for t in tasks {
            assert_eq!(t.await.unwrap(), Ok(()));
        }
        // The first to lead waited its turn behind the other seven: one write for all.
        assert_eq!(*groups.lock().unwrap(), [8]);
    }

    #[tokio::test]
    async fn a_lone_connection_writes_without_waiting_a_turn() {
        let c = Combiner::default();
        let groups = Arc::new(Mutex::new(Vec::new()));
        // The first after none counts as company for a while: after it, it is alone.
        for _ in 0..=COMPANY {
            assert_eq!(commit_from(&c, 7, 1, recording(&groups)).await, Ok(()));
        }
        groups.lock().unwrap().clear();
        for n in 1..=3 {
            let (tx, rx) = std::sync::mpsc::channel();
            let then: Then = Box::new(move |r| tx.send(r).unwrap());
            let mut fut = Box::pin(c.commit_then(records(1), 7, then, recording(&groups)));
            // Written and answered within its first poll: no turn at the back of the queue.
            assert!(futures_poll_once(fut.as_mut()).is_ready(), "request {n} waited a turn");
            assert_eq!(rx.try_recv(), Ok(Ok(())));
        }
        assert_eq!(*groups.lock().unwrap(), [1, 1, 1]);
    }

    fn futures_poll_once<F: std::future::Future>(f: std::pin::Pin<&mut F>) -> std::task::Poll<F::Output> {
        let waker = std::task::Waker::noop();
        f.poll(&mut std::task::Context::from_waker(waker))
    }
}
