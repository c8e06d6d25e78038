//! What a worker served since it started, for `status`: requests and batch items per
//! operation, and error answers per status code.
//!
//! Plain relaxed atomic counters, bumped once per request (the item count is added in one
//! go), never per item on success: the serving path handles millions of items a second.
//! A failed batch item costs one more addition, per code, per request.

use std::sync::atomic::{AtomicU64, Ordering};

use kekd_proto::{Code, ErrorCount, ErrorStatus, Op, OpCount, Reply};

/// Status codes, by their wire number (`Code::Ok` .. `Code::Internal`).
const CODES: usize = Code::Internal as usize + 1;

#[derive(Debug, Default)]
struct Pair {
    requests: AtomicU64,
    items: AtomicU64,
}

impl Pair {
    fn add(&self, requests: u64, items: u64) {
        if requests > 0 {
            self.requests.fetch_add(requests, Ordering::Relaxed);
        }
        if items > 0 {
            self.items.fetch_add(items, Ordering::Relaxed);
        }
    }

    fn get(&self) -> (u64, u64) {
        (self.requests.load(Ordering::Relaxed), self.items.load(Ordering::Relaxed))
    }
}

/// The counters of one tenant's service.
#[derive(Debug, Default)]
pub struct Stats {
    /// By [`Op::index`].
    ops: [Pair; Op::NAMES.len()],
    /// By code number; `Code::Ok` stays zero.
    errors: [Pair; CODES],
}

/// What [`Stats::served`] needs of a request, taken before the request is consumed.
#[derive(Debug, Clone, Copy)]
pub struct Served {
    op: usize,
    items: u64,
}

impl Served {
    pub fn of(op: &Op) -> Self {
        Served { op: op.index(), items: op.batch_len() as u64 }
    }
}

impl Stats {
    /// Counts one request and its answer: the request (with its items) under its
    /// operation, and the answer's error code, or the codes of the batch items that failed.
    pub fn served(&self, req: Served, result: &Result<Reply, ErrorStatus>) {
        self.ops[req.op].add(1, req.items);
        match result {
            Err(e) => self.error(e.code, 1, 0),
            Ok(Reply::Batch(items)) => {
                let mut failed = [0u64; CODES];
                let mut any = false;
                for e in items.iter().filter_map(|r| r.as_ref().err()) {
                    if let Some(n) = failed.get_mut(e.code as usize) {
                        *n += 1;
                        any = true;
                    }
                }
                if any {
                    for (code, &n) in failed.iter().enumerate().filter(|(_, n)| **n > 0) {
                        self.errors[code].add(0, n);
                    }
                }
            }
            Ok(_) => {}
        }
    }

    /// Counts an error answer that no operation produced: a malformed request, or a Hello
    /// the supervisor refused.
    pub fn refused(&self, code: Code) {
        self.error(code, 1, 0);
    }

    /// [`Self::refused`], `n` times at once (Hellos the supervisor folded into one).
    pub fn refused_many(&self, code: Code, n: u64) {
        self.error(code, n, 0);
    }

    fn error(&self, code: Code, requests: u64, items: u64) {
        if code != Code::Ok {
            if let Some(p) = self.errors.get(code as usize) {
                p.add(requests, items);
            }
        }
    }

    /// The operations with at least one request, in [`Op::NAMES`] order.
    pub fn operations(&self) -> Vec<OpCount> {
        Op::NAMES
            .iter()
            .zip(&self.ops)
            .map(|(name, p)| (name, p.get()))
            .filter(|(_, (requests, _))| *requests > 0)
            .map(|(name, (requests, items))| OpCount { operation: (*name).to_owned(), requests, items })
            .collect()
    }

    /// The codes that were answered at least once, by code number.
    pub fn errors(&self) -> Vec<ErrorCount> {
        self.errors
            .iter()
            .enumerate()
            .filter_map(|(i, p)| {
                let (requests, items) = p.get();
                let code = Code::try_from(i as i32).ok()?;
                (requests + items > 0).then_some(ErrorCount { code, requests, items })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use kekd_proto::{Context, ItemOk, KeyName};

    use super::*;

    fn generate(n: usize) -> Op {
        Op::Generate {
            key: KeyName::parse("k").unwrap(),
            edek_only: true,
            contexts: vec![Context::default(); n],
        }
    }

    fn ok_item() -> Result<ItemOk, ErrorStatus> {
        Ok(ItemOk { plaintext: None, edek: Some(vec![1]), key: KeyName::parse("k").unwrap(), version: 1 })
    }

    fn err(code: Code) -> ErrorStatus {
        ErrorStatus::new(code, "x")
    }

    #[test]
    fn requests_items_and_error_codes() {
        let s = Stats::default();
        s.served(Served::of(&generate(16)), &Ok(Reply::Batch(Vec::new())));
        s.served(Served::of(&generate(4)), &Err(err(Code::NotFound)));
        let batch = vec![
            ok_item(),
            Err(err(Code::DataInvalid)),
            Err(err(Code::DataInvalid)),
            Err(err(Code::FailedPrecondition)),
        ];
        s.served(Served::of(&Op::Unwrap(Vec::new())), &Ok(Reply::Batch(batch)));
        s.served(Served::of(&Op::ListKeys), &Err(err(Code::PermissionDenied)));
        s.refused(Code::InvalidArgument);
        s.refused(Code::Ok);

        let ops: Vec<(String, u64, u64)> =
            s.operations().into_iter().map(|o| (o.operation, o.requests, o.items)).collect();
        assert_eq!(
            ops,
            [("generate".into(), 2, 20), ("unwrap".into(), 1, 0), ("list_keys".into(), 1, 0)],
            "in protocol order, only those served"
        );
        let errors: Vec<(Code, u64, u64)> =
            s.errors().into_iter().map(|e| (e.code, e.requests, e.items)).collect();
        assert_eq!(
            errors,
            [
                (Code::InvalidArgument, 1, 0),
                (Code::PermissionDenied, 1, 0),
                (Code::NotFound, 1, 0),
                (Code::FailedPrecondition, 0, 1),
                (Code::DataInvalid, 0, 2),
            ]
        );
    }

    #[test]
    fn nothing_served_lists_nothing() {
        let s = Stats::default();
        s.served(Served::of(&Op::Status), &Ok(Reply::Keys(Vec::new())));
        assert_eq!(s.operations().len(), 1);
        assert!(s.errors().is_empty());
    }
}
