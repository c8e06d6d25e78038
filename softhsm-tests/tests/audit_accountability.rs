//! The audit trail accounts for every data key (issue 21, point 2): each EDEK a client
//! sent or received is one item of one record, named by its nonce, with the outcome the
//! client saw; and each item names an EDEK a client holds. `kekctl audit find` lists the
//! records of one EDEK.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::time::Duration;

use kekd_client::{
    code_name, Client, Context, EdekItem, ItemResult, KeyName, Metadata, TargetState, TenantName, WrapItem,
};
use serde_json::Value;
use softhsm_tests::{edek_id, exit, Kekd, Tenant};

async fn within<T>(fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(120), fut).await.expect("the test did not finish within 120 s")
}

fn ctx(conn: usize) -> Context {
    Context::new(BTreeMap::from([("conn".to_string(), conn.to_string())])).unwrap()
}

fn key(name: &str) -> KeyName {
    KeyName::parse(name).unwrap()
}

async fn connect(kekd: &Kekd) -> Client {
    Client::connect(kekd.socket(), &TenantName::parse("acme").unwrap(), "accountability")
        .await
        .expect("connect")
}

/// What one item was, as the client saw it: the event and how it names the EDEK (`edek`,
/// or `from` / `to` on rewrap), the EDEK's id, and its outcome (`ok` or the code).
type Entry = (String, String, String);

fn outcome(r: &ItemResult) -> String {
    match r {
        Ok(_) => "ok".into(),
        Err(e) => code_name(e.code).to_owned(),
    }
}

/// The client's side of it.
#[derive(Default)]
struct Ledger(Vec<Entry>);

impl Ledger {
    fn note(&mut self, event: &str, named: &str, edek: &[u8], outcome: String) {
        self.0.push((format!("{event}/{named}"), edek_id(edek), outcome));
    }

    /// Each item made an EDEK, and the ledger holds it as received.
    fn made(&mut self, event: &str, items: &[ItemResult]) -> Vec<Vec<u8>> {
        items
            .iter()
            .map(|r| {
                let edek = r.as_ref().expect("made").edek.clone().expect("an EDEK");
                self.note(event, "edek", &edek, "ok".into());
                edek
            })
            .collect()
    }
}

/// Kinds of unwrap item, by what happens to them.
const GOOD: usize = 0;
const TAMPERED: usize = 1;
const WRONG_CONTEXT: usize = 2;
const DISABLED: usize = 3;

/// One connection's work: for each batch size, generate that many EDEKs, then unwrap as
/// many, a quarter each good, tampered, under the wrong context, and of a disabled version
/// (taken from `retired`). Batches of 1 go four times, one of each kind.
async fn one_connection(kekd: &Kekd, conn: usize, mut retired: Vec<Vec<u8>>) -> (Ledger, Vec<Vec<u8>>) {
    let client = connect(kekd).await;
    let md = Metadata { principal: format!("conn-{conn}"), ..Metadata::default() };
    let mut ledger = Ledger::default();
    let mut good = Vec::new();
    let rounds: [(usize, Option<usize>); 7] = [
        (1, Some(GOOD)),
        (1, Some(TAMPERED)),
        (1, Some(WRONG_CONTEXT)),
        (1, Some(DISABLED)),
        (256, None),
        (4096, None),
        (256, None),
    ];
    for (n, only) in rounds {
        let made =
            client.generate(&key("default"), vec![ctx(conn); n], true, md.clone()).await.expect("generate");
        let edeks = ledger.made("generate", &made);
        let mut items = Vec::with_capacity(n);
        let mut kinds = Vec::with_capacity(n);
        for (i, edek) in edeks.into_iter().enumerate() {
            let kind = only.unwrap_or(i % 4);
            let item = match kind {
                GOOD => EdekItem { edek, context: ctx(conn) },
                TAMPERED => {
                    let mut e = edek;
                    *e.last_mut().unwrap() ^= 0x40;
                    EdekItem { edek: e, context: ctx(conn) }
                }
                WRONG_CONTEXT => EdekItem { edek, context: ctx(conn + 100) },
                _ => EdekItem { edek: retired.pop().expect("enough retired EDEKs"), context: ctx(999) },
            };
            items.push(item);
            kinds.push(kind);
        }
        let sent: Vec<Vec<u8>> = items.iter().map(|i| i.edek.clone()).collect();
        let contexts: Vec<Context> = items.iter().map(|i| i.context.clone()).collect();
        let back = client.unwrap(items, md.clone()).await.expect("unwrap");
        assert_eq!(back.len(), n);
        for (((edek, r), kind), context) in sent.iter().zip(&back).zip(&kinds).zip(contexts) {
            let want = match *kind {
                GOOD => "ok",
                TAMPERED | WRONG_CONTEXT => "DATA_INVALID",
                _ => "FAILED_PRECONDITION",
            };
            assert_eq!(outcome(r), want, "kind {kind}");
            ledger.note("unwrap", "edek", edek, outcome(r));
            if *kind == GOOD {
                good.push(EdekItem { edek: edek.clone(), context }.edek);
            }
        }
    }
    (ledger, good)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_edek_sent_or_received_is_one_item_of_one_record_and_back() {
    const CONNECTIONS: usize = 3;
    let kekd = Kekd::builder().tenant(Tenant::owned_by_me("acme")).start();
    within(async {
        let admin = connect(&kekd).await;
        let md = Metadata::default();
        let mut ledger = Ledger::default();

        // EDEKs of a version that is then disabled: 1 + 64 + 1024 + 64 per connection.
        admin.create_key(&key("retired"), md.clone()).await.unwrap();
        let per_conn = 1 + 64 + 1024 + 64;
        let mut retired = Vec::new();
        for n in [2048, CONNECTIONS * per_conn - 2048] {
            let made = admin.generate(&key("retired"), vec![ctx(999); n], true, md.clone()).await.unwrap();
            retired.extend(ledger.made("generate", &made));
        }
        admin.rotate_key(&key("retired"), md.clone()).await.unwrap();
        admin.set_version_state(&key("retired"), 1, TargetState::Disabled, md.clone()).await.unwrap();

        let mut tasks = Vec::new();
        let kekd = &kekd;
        for conn in 0..CONNECTIONS {
            let mine = retired.split_off(retired.len() - per_conn);
            tasks.push(one_connection(kekd, conn, mine));
        }
        let mut good = Vec::new();
        for (l, g) in futures_join_all(tasks).await {
            ledger.0.extend(l.0);
            good.push(g);
        }

        // Wrap, and rewrap a mix of good and tampered EDEKs: each names both of its EDEKs.
        let secrets: Vec<WrapItem> = (0..256)
            .map(|i| WrapItem {
                plaintext: kekd_client::Secret::from_vec(vec![i as u8; 16]),
                context: ctx(0),
            })
            .collect();
        let wrapped = admin.wrap(&key("default"), secrets, md.clone()).await.unwrap();
        let wrapped = ledger.made("wrap", &wrapped);
        let mut rewrap: Vec<EdekItem> =
            good[0].iter().take(200).map(|e| EdekItem { edek: e.clone(), context: ctx(0) }).collect();
        for w in wrapped.iter().take(56) {
            let mut e = w.clone();
            let at = e.len() - 3;
            e[at] ^= 1;
            rewrap.push(EdekItem { edek: e, context: ctx(0) });
        }
        let sent: Vec<Vec<u8>> = rewrap.iter().map(|i| i.edek.clone()).collect();
        let back = admin.rewrap(rewrap, md.clone()).await.unwrap();
        let (mut ok, mut failed) = (0, 0);
        for (edek, r) in sent.iter().zip(&back) {
            ledger.note("rewrap", "from", edek, outcome(r));
            match r {
                Ok(it) => {
                    ok += 1;
                    ledger.note("rewrap", "to", it.edek.as_deref().unwrap(), "ok".into());
                }
                Err(_) => failed += 1,
            }
        }
        assert_eq!((ok, failed), (200, 56));

        // The trail's side: every item of every record of the four operations.
        let records = kekd.audit_records("acme");
        let mut trail: HashMap<(String, String), Vec<String>> = HashMap::new();
        let mut items = 0;
        for r in &records {
            let event = r["event"].as_str().unwrap();
            if !["generate", "wrap", "unwrap", "rewrap"].contains(&event) {
                continue;
            }
            assert_eq!(r["v"], 2, "{r}");
            for it in r["items"].as_array().expect("items") {
                for named in ["edek", "from", "to"] {
                    if let Some(id) = it[named].as_str() {
                        let outcome = if named == "to" {
                            "ok"
                        } else {
                            it.get("code").and_then(Value::as_str).unwrap_or("ok")
                        };
                        assert_eq!(it["outcome"] == "ok", outcome == "ok", "{it}");
                        trail
                            .entry((format!("{event}/{named}"), id.to_owned()))
                            .or_default()
                            .push(outcome.to_owned());
                        items += 1;
                    }
                }
            }
        }
        // Per connection each EDEK generated, then unwrapped; the retired; wrap; rewrap's from and to.
        let expected = CONNECTIONS * 2 * (4 + 256 + 4096 + 256) + CONNECTIONS * per_conn + 256 + 256 + 200;
        assert_eq!(ledger.0.len(), expected, "the client's count");
        for (event, id, outcome) in &ledger.0 {
            let found = trail
                .get(&(event.clone(), id.clone()))
                .unwrap_or_else(|| panic!("{event} of EDEK {id} is in no record"));
            assert_eq!(
                found,
                &vec![outcome.clone()],
                "{event} of EDEK {id}: exactly one item, with the client's outcome"
            );
        }
        assert_eq!(items, ledger.0.len(), "every item of the trail names an EDEK a client sent or received");

        // One EDEK's story, by file and by id.
        let story = &good[1][0];
        let work = softhsm_tests::test_dir();
        let file = work.path().join("edek");
        std::fs::write(&file, story).unwrap();
        let found = kekd
            .kekctl()
            .json()
            .args(["audit", "find", "--edek"])
            .arg(&file)
            .arg(kekd.audit_dir("acme"))
            .run();
        let lines: Vec<Value> = found.ok_str().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        let events: Vec<(&str, &str)> =
            lines.iter().map(|l| (l["event"].as_str().unwrap(), l["outcome"].as_str().unwrap())).collect();
        assert_eq!(events, [("generate", "ok"), ("unwrap", "ok")], "{lines:#?}");
        assert_eq!(lines[0]["meta"]["principal"], "conn-1");
        assert!(lines[1]["peer"]["pid"].as_i64().is_some() && lines[1]["item"].as_u64().is_some());
        let moved = &back.iter().find_map(|r| r.as_ref().ok()).unwrap().edek;
        let id = edek_id(moved.as_deref().unwrap());
        let text = kekd.kekctl().args(["audit", "find", "--id", &id]).arg(kekd.audit_dir("acme")).run();
        let text = text.ok_str();
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(text.contains(" rewrap ok, item 0 (to) key default v1 -> v1 kek "), "{text}");
        let none = kekd
            .kekctl()
            .args(["audit", "find", "--id", "AAAAAAAAAAAAAAAA"])
            .arg(kekd.audit_dir("acme"))
            .run();
        none.assert_error(exit::NOT_FOUND, "NOT_FOUND");
        assert!(none.stderr.contains("no record names EDEK AAAAAAAAAAAAAAAA"), "{}", none.stderr);
        kekd.kekctl().args(["audit", "verify"]).args(kekd.audit_files("acme")).run().ok();
    })
    .await;
}

/// Runs the futures at once, on this task: they share the test's runtime.
async fn futures_join_all<F: Future>(futs: Vec<F>) -> Vec<F::Output> {
    let mut pinned: Vec<std::pin::Pin<Box<F>>> = futs.into_iter().map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = pinned.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, o) in pinned.iter_mut().zip(out.iter_mut()) {
            if o.is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *o = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter().map(|o| o.unwrap()).collect()
}
