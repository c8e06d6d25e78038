//! Refused Hellos, folded for the audit trail.
//!
//! A caller that some tenant's ACL lists gets past the front door; if it then asks for a
//! tenant whose ACL does not list it, it is answered PERMISSION_DENIED, and the denial
//! belongs in that tenant's audit trail. Recorded one by one, a loop of refused Hellos
//! (thousands a second) would fill another tenant's trail, and its disk. So the refusals of
//! one caller for one tenant fold: the first is passed to the tenant's worker at once,
//! with count 1; those of the [`WINDOW`] after it are counted and passed on as one refusal
//! with their count when the window ends, and so on while they keep coming. A window
//! without any ends the fold, and the next refusal is again passed on at once. The counts
//! add up to the refusals; a tenant's trail gets at most one record a second per caller.
//!
//! A caller is what the ACL decides on: its uid and primary gid (over vsock, its CID). A
//! folded refusal names the last attempt it counts (its pid, executable and Hello id).

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use kekd_proto::TenantName;

use crate::handoff::Refusal;
use crate::service::Peer;

/// How long refusals are counted before they are passed on as one.
pub const WINDOW: Duration = Duration::from_secs(1);

/// Who is refused: what the ACL decides on, not the pid or port of one attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Caller {
    Unix { uid: u32, gid: u32 },
    Vsock { cid: u32 },
}

impl Caller {
    fn of(peer: &Peer) -> Self {
        match *peer {
            Peer::Unix { uid, gid, .. } => Caller::Unix { uid, gid },
            Peer::Vsock { cid, .. } => Caller::Vsock { cid },
        }
    }
}

/// One fold: a caller refused by a tenant.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FoldKey {
    pub tenant: TenantName,
    caller: Caller,
}

/// The refusals counted in the current window of a fold.
#[derive(Debug, Default)]
struct Fold {
    count: u64,
    last: Option<Refusal>,
}

/// The open folds. Only callers some tenant's ACL lists reach a refusal (the others are
/// closed at accept), and only configured tenants refuse, so this holds at most one entry
/// per such (tenant, caller) pair, and loses each a window after its last refusal.
#[derive(Debug, Default)]
pub struct Denials {
    folds: Mutex<HashMap<FoldKey, Fold>>,
}

impl Denials {
    /// Counts a refusal by `tenant`. The first of a fold comes back, with the fold's key:
    /// pass it on now, then call [`Self::take`] at the end of each window until it says
    /// the fold has ended. Any other is counted into the open fold.
    pub fn note(&self, tenant: &TenantName, refusal: Refusal) -> Option<(Refusal, FoldKey)> {
        let key = FoldKey { tenant: tenant.clone(), caller: Caller::of(&refusal.peer) };
        let mut folds = self.folds.lock().unwrap_or_else(PoisonError::into_inner);
        match folds.entry(key) {
            Entry::Occupied(mut open) => {
                let fold = open.get_mut();
                fold.count += 1;
                fold.last = Some(refusal);
                None
            }
            Entry::Vacant(new) => {
                let key = new.key().clone();
                new.insert(Fold::default());
                Some((Refusal { count: 1, ..refusal }, key))
            }
        }
    }

    /// At the end of a window: the refusals counted in it, as one carrying their count, or
    /// `None` if there were none, which ends the fold.
    pub fn take(&self, key: &FoldKey) -> Option<Refusal> {
        let mut folds = self.folds.lock().unwrap_or_else(PoisonError::into_inner);
        let Entry::Occupied(mut open) = folds.entry(key.clone()) else { return None };
        let fold = std::mem::take(open.get_mut());
        match fold.last {
            Some(last) => Some(Refusal { count: fold.count, ..last }),
            None => {
                open.remove();
                None
            }
        }
    }

    /// Folds open now.
    #[cfg(test)]
    pub fn open(&self) -> usize {
        self.folds.lock().unwrap_or_else(PoisonError::into_inner).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(uid: u32, gid: u32, pid: i32, hello_id: u64) -> Refusal {
        Refusal {
            peer: Peer::Unix { uid, gid, pid },
            exe: Some("/usr/bin/app".into()),
            hello_id,
            code: "PERMISSION_DENIED".into(),
            message: format!("uid {uid} gid {gid} may not use tenant \"acme\""),
            count: 1,
        }
    }

    #[test]
    fn the_first_passes_at_once_the_rest_fold_into_counts_that_add_up() {
        let (d, acme) = (Denials::default(), TenantName::parse("acme").unwrap());
        let (first, key) = d.note(&acme, refusal(1000, 1000, 7, 1)).expect("the first passes at once");
        assert_eq!((first.count, first.hello_id), (1, 1));
        // The same caller from other processes, within the window: counted.
        for (pid, id) in [(8, 2), (9, 3), (10, 4)] {
            assert!(d.note(&acme, refusal(1000, 1000, pid, id)).is_none());
        }
        let folded = d.take(&key).expect("three folded");
        assert_eq!(folded.count, 3);
        assert_eq!((folded.peer, folded.hello_id), (Peer::Unix { uid: 1000, gid: 1000, pid: 10 }, 4));
        assert!(d.note(&acme, refusal(1000, 1000, 11, 5)).is_none(), "the fold is still open");
        assert_eq!(d.take(&key).map(|r| r.count), Some(1));
        // A window without refusals ends the fold; the next is passed on at once again.
        assert!(d.take(&key).is_none());
        assert_eq!(d.open(), 0);
        assert!(d.take(&key).is_none(), "an ended fold stays ended");
        let (again, _) = d.note(&acme, refusal(1000, 1000, 12, 6)).expect("a new fold");
        assert_eq!(again.count, 1);
    }

    #[test]
    fn callers_and_tenants_fold_apart() {
        let d = Denials::default();
        let (acme, globex) = (TenantName::parse("acme").unwrap(), TenantName::parse("globex").unwrap());
        assert!(d.note(&acme, refusal(1000, 1000, 7, 1)).is_some());
        assert!(d.note(&globex, refusal(1000, 1000, 7, 1)).is_some(), "another tenant");
        assert!(d.note(&acme, refusal(1001, 1000, 7, 1)).is_some(), "another uid");
        assert!(d.note(&acme, refusal(1000, 1001, 7, 1)).is_some(), "another primary gid");
        let guest = Refusal { peer: Peer::Vsock { cid: 1000, port: 1 }, exe: None, ..refusal(0, 0, 0, 1) };
        assert!(d.note(&acme, guest.clone()).is_some(), "a guest whose CID is a uid");
        let other_port = Refusal { peer: Peer::Vsock { cid: 1000, port: 2 }, ..guest };
        assert!(d.note(&acme, other_port).is_none(), "the same guest from another port");
        assert_eq!(d.open(), 5);
    }
}
