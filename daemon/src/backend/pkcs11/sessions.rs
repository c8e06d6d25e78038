//! The sessions of a tenant's root keys: a pool that never has more than `max_sessions` open
//! (idle or in use), because HSMs limit sessions per application or per token and a burst
//! must not take them all. A caller beyond the limit waits for a session to come back; so
//! does one the token itself turns away (CKR_SESSION_COUNT), which also lowers the limit for
//! a moment, so that the token is not asked again at every request.
//!
//! Sessions belong to a generation of the module (see `library`, "Starting over"): the pool
//! follows the module's, forgets (without closing) what an older one left, and a session that
//! failed in a way that needs a start over is forgotten too ([`SessionPool::lose`]): its handle
//! may already name someone else's session.

use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use cryptoki::session::Session;

/// How long the token's own limit (learnt from CKR_SESSION_COUNT) is trusted before kekd
/// asks for a session beyond it again: other applications may have closed theirs.
const CEILING_TTL: Duration = Duration::from_secs(1);

/// A session taken from the pool, with the generation it belongs to.
pub(super) struct Pooled {
    pub(super) session: Session,
    generation: u64,
}

/// What [`SessionPool::take`] gives.
pub(super) enum Take {
    /// An idle session, logged in.
    Idle(Pooled),
    /// Room for one more session, counted already: open it and [`SessionPool::opened`] it,
    /// or give the room back with [`SessionPool::unopened`] / [`SessionPool::token_full`].
    Room,
}

/// Why [`SessionPool::take`] gave nothing.
pub(super) enum NoSession {
    /// A session failed in a way that needs a start over, so those in use may never come
    /// back: waiting could last until the deadline.
    Lost,
    /// Every session stayed in use until the deadline.
    Timeout,
}

/// The pool; shared by the root keys of a tenant (a rotation's sibling uses the same token).
pub(super) struct SessionPool {
    max: usize,
    state: Mutex<State>,
    returned: Condvar,
}

struct State {
    idle: Vec<Session>,
    /// Sessions of this generation that exist: idle, in use, being opened, or lost.
    open: usize,
    /// Given up without closing (see [`SessionPool::lose`]); they may still be open on the
    /// token, so they count until the next generation.
    lost: usize,
    generation: u64,
    /// The sessions the token granted before it answered CKR_SESSION_COUNT, and when.
    ceiling: Option<(usize, Instant)>,
}

impl SessionPool {
    /// A pool of at most `max` sessions holding `first`, of `generation`.
    pub(super) fn new(max: usize, first: Session, generation: u64) -> Self {
        let state = State { idle: vec![first], open: 1, lost: 0, generation, ceiling: None };
        Self { max: max.max(1), state: Mutex::new(state), returned: Condvar::new() }
    }

    pub(super) fn max(&self) -> usize {
        self.max
    }

    /// Sessions open now (idle, in use, being opened or lost).
    #[cfg(test)]
    pub(super) fn open(&self) -> usize {
        self.lock().open
    }

    /// An idle session of `generation`, or room to open one; waits for one to come back
    /// until `deadline` while all are in use.
    pub(super) fn take(&self, generation: u64, deadline: Instant) -> Result<Take, NoSession> {
        let mut st = self.lock();
        st.follow(generation);
        loop {
            if let Some(session) = st.idle.pop() {
                return Ok(Take::Idle(Pooled { session, generation }));
            }
            if st.lost > 0 {
                return Err(NoSession::Lost);
            }
            let now = Instant::now();
            let limit = match st.ceiling {
                Some((n, at)) if now < at + CEILING_TTL => n.min(self.max),
                _ => self.max,
            };
            if st.open < limit {
                st.open += 1;
                return Ok(Take::Room);
            }
            if now >= deadline {
                return Err(NoSession::Timeout);
            }
            // Woken by a returned session; the slice also lets an expired ceiling count.
            let slice = (deadline - now).min(Duration::from_millis(100));
            st = self.returned.wait_timeout(st, slice).unwrap_or_else(PoisonError::into_inner).0;
            st.follow(generation);
        }
    }

    /// The session opened in the room [`Take::Room`] gave.
    pub(super) fn opened(&self, session: Session, generation: u64) -> Pooled {
        Pooled { session, generation }
    }

    /// The room [`Take::Room`] gave was not used.
    pub(super) fn unopened(&self, generation: u64) {
        let mut st = self.lock();
        if st.generation == generation {
            st.open = st.open.saturating_sub(1);
        }
        drop(st);
        self.returned.notify_one();
    }

    /// The token refused a session (CKR_SESSION_COUNT) in the room [`Take::Room`] gave: it
    /// grants no more than the others open now, for a while.
    pub(super) fn token_full(&self, generation: u64) {
        let mut st = self.lock();
        if st.generation == generation {
            st.open = st.open.saturating_sub(1);
            st.ceiling = Some((st.open, Instant::now()));
        }
    }

    /// A session that is fine goes back for the next caller.
    pub(super) fn put(&self, pooled: Pooled) {
        let mut st = self.lock();
        if pooled.generation == st.generation {
            st.idle.push(pooled.session);
        } else {
            // C_Finalize closed it, and its handle may be someone else's now.
            std::mem::forget(pooled.session);
        }
        drop(st);
        self.returned.notify_one();
    }

    /// A session that failed in a way that needs a start over is forgotten, not closed: if
    /// the module reset, its handle may already name another caller's new session. The start
    /// over closes it (`C_Finalize`); until then it counts, and nobody waits for it.
    pub(super) fn lose(&self, pooled: Pooled) {
        let mut st = self.lock();
        if pooled.generation == st.generation {
            st.lost += 1;
        }
        std::mem::forget(pooled.session);
        drop(st);
        self.returned.notify_all();
    }

    /// The idle sessions of `generation`, to close (the pool is being dropped); those of an
    /// older generation are forgotten.
    pub(super) fn drain(&self, generation: u64) -> Vec<Session> {
        let mut st = self.lock();
        st.follow(generation);
        let idle = std::mem::take(&mut st.idle);
        st.open = st.open.saturating_sub(idle.len());
        idle
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent if a holder panicked: counts are updated last.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl State {
    /// Moves to the module's `generation`: what an older one left was closed by C_Finalize.
    fn follow(&mut self, generation: u64) {
        if self.generation == generation {
            return;
        }
        for stale in self.idle.drain(..) {
            std::mem::forget(stale);
        }
        (self.open, self.lost, self.generation, self.ceiling) = (0, 0, generation, None);
    }
}
