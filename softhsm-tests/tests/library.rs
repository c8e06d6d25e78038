//! The `kekd-client` library against the real daemon (issue 2, points 4 and 11): every
//! operation, batches with per-item status, many concurrent calls pipelined on one
//! connection, tampering detected item by item, and failures that end calls instead of
//! hanging them.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use kekd_client::{
    Client, ClientError, Code, Context, EdekItem, ItemResult, KeyName, Metadata, Secret, TargetState,
    TenantName, VersionState, WrapItem,
};
use softhsm_tests::{parse_edek, Kekd, Tenant};

/// Bounds a test body: a hung call fails the test instead of stalling the suite.
async fn within<T>(fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(60), fut).await.expect("the test did not finish within 60 s")
}

fn ctx(pairs: &[(&str, &str)]) -> Context {
    Context::new(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>())
        .expect("a valid context")
}

fn key(name: &str) -> KeyName {
    KeyName::parse(name).expect("a valid key name")
}

async fn connect(kekd: &Kekd, tenant: &str) -> Result<Client, ClientError> {
    Client::connect(kekd.socket(), &TenantName::parse(tenant).expect("tenant name"), "softhsm-tests").await
}

fn md() -> Metadata {
    Metadata { principal: "softhsm-tests".into(), data_label: "test data".into(), ..Metadata::default() }
}

/// (plaintext, edek, version) of one successful item.
type Ok3 = (Option<Vec<u8>>, Option<Vec<u8>>, u32);

/// The successful items; panics on any item error.
#[track_caller]
fn oks(items: Vec<ItemResult>) -> Vec<Ok3> {
    items
        .into_iter()
        .enumerate()
        .map(|(i, it)| {
            let ok = it.unwrap_or_else(|e| panic!("item {i} failed: {e}"));
            (ok.plaintext.map(|p| p.expose().to_vec()), ok.edek, ok.version)
        })
        .collect()
}

fn edek_items(edeks: &[Vec<u8>], context: &Context) -> Vec<EdekItem> {
    edeks.iter().map(|e| EdekItem { edek: e.clone(), context: context.clone() }).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operation_round_trips_through_the_library() {
    let kekd = Kekd::start_default();
    within(async {
        let client = connect(&kekd, "acme").await.expect("connect");
        assert_eq!(client.hello().tenant.as_str(), "acme");
        assert!(client.hello().admin, "we are acme's admin");

        let status = client.status(md()).await.expect("status");
        assert_eq!(status.tenant.as_str(), "acme");
        assert!(status.backend_healthy, "SoftHSM2 is up: {status:?}");
        assert!(status.keys >= 1, "{status:?}");

        let c = ctx(&[("app", "library")]);
        let generated =
            oks(client.generate(&key("default"), vec![c.clone(); 3], false, md()).await.expect("generate"));
        for (p, e, v) in &generated {
            assert_eq!(p.as_ref().map(Vec::len), Some(32));
            assert!(e.is_some());
            assert_eq!(*v, 1);
        }
        let edeks: Vec<_> = generated.iter().map(|g| g.1.clone().unwrap()).collect();
        let back = oks(client.unwrap(edek_items(&edeks, &c), md()).await.expect("unwrap"));
        for (g, b) in generated.iter().zip(&back) {
            assert_eq!(g.0, b.0, "unwrap gives back the generated key");
        }

        let only =
            oks(client.generate(&key("default"), vec![c.clone()], true, md()).await.expect("edek only"));
        assert!(only[0].0.is_none(), "edek_only returned a plaintext");

        let wrapped = oks(client
            .wrap(
                &key("default"),
                vec![WrapItem {
                    plaintext: Secret::from_vec(b"library secret".to_vec()),
                    context: c.clone(),
                }],
                md(),
            )
            .await
            .expect("wrap"));
        assert!(wrapped[0].0.is_none(), "wrap must not echo the secret");
        let w_edek = wrapped[0].1.clone().expect("wrap returns an EDEK");

        // Admin operations.
        let info = client.create_key(&key("lib/one"), md()).await.expect("create_key");
        assert_eq!((info.name.as_str(), info.active_version), ("lib/one", 1));
        let info = client.rotate_key(&key("default"), md()).await.expect("rotate_key");
        assert_eq!(info.active_version, 2);
        let states: Vec<_> = info.versions.iter().map(|v| (v.version, v.state)).collect();
        assert_eq!(states, [(1, VersionState::DecryptOnly), (2, VersionState::Active)]);

        // Rewrap to version 2, without plaintext.
        let moved =
            oks(client.rewrap(edek_items(std::slice::from_ref(&w_edek), &c), md()).await.expect("rewrap"));
        assert!(moved[0].0.is_none(), "rewrap must not return the plaintext");
        assert_eq!(moved[0].2, 2);
        let m_edek = moved[0].1.clone().expect("rewrap returns an EDEK");
        assert_eq!(parse_edek(&m_edek).version, 2);

        // Disable v1: items under it fail with FAILED_PRECONDITION, the rewrapped one works.
        client.set_version_state(&key("default"), 1, TargetState::Disabled, md()).await.expect("disable");
        let res =
            client.unwrap(edek_items(&[w_edek.clone(), m_edek.clone()], &c), md()).await.expect("unwrap");
        assert_eq!(res[0].as_ref().unwrap_err().code, Code::FailedPrecondition);
        assert_eq!(res[1].as_ref().unwrap().plaintext.as_ref().unwrap().expose(), b"library secret");
        client.set_version_state(&key("default"), 1, TargetState::DecryptOnly, md()).await.expect("enable");
        let res =
            oks(client.unwrap(edek_items(std::slice::from_ref(&w_edek), &c), md()).await.expect("unwrap"));
        assert_eq!(res[0].0.as_deref(), Some(&b"library secret"[..]));

        let keys = client.list_keys(md()).await.expect("list_keys");
        let mut names: Vec<_> = keys.iter().map(|k| k.name.as_str().to_owned()).collect();
        names.sort();
        assert_eq!(names, ["default", "lib/one"]);

        // What the library made, kekctl reads, and the other way round.
        assert_eq!(kekd.unwrap(&m_edek, &[("app", "library")]).ok(), b"library secret");
        let from_cli = kekd.wrap("lib/one", b"from kekctl", &[]);
        let res = oks(client.unwrap(edek_items(&[from_cli], &ctx(&[])), md()).await.expect("unwrap"));
        assert_eq!(res[0].0.as_deref(), Some(&b"from kekctl"[..]));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_100_with_one_bad_item() {
    let kekd = Kekd::start_default();
    within(async {
        let client = connect(&kekd, "acme").await.expect("connect");
        let items: Vec<WrapItem> = (0..100u32)
            .map(|i| WrapItem {
                plaintext: Secret::from_vec(i.to_be_bytes().repeat(8)),
                context: ctx(&[("i", &i.to_string())]),
            })
            .collect();
        let edeks: Vec<Vec<u8>> = oks(client.wrap(&key("default"), items, md()).await.expect("wrap"))
            .into_iter()
            .map(|o| o.1.unwrap())
            .collect();

        // Item 37 is given the wrong context; the others their own.
        let unwrap_items: Vec<EdekItem> = edeks
            .iter()
            .enumerate()
            .map(|(i, e)| EdekItem {
                edek: e.clone(),
                context: ctx(&[("i", &(if i == 37 { 38 } else { i }).to_string())]),
            })
            .collect();
        let res = client.unwrap(unwrap_items, md()).await.expect("the batch as a whole succeeds");
        assert_eq!(res.len(), 100);
        for (i, r) in res.iter().enumerate() {
            match r {
                Ok(ok) if i != 37 => {
                    assert_eq!(
                        ok.plaintext.as_ref().unwrap().expose(),
                        &(i as u32).to_be_bytes().repeat(8)[..]
                    )
                }
                Err(e) if i == 37 => assert_eq!(e.code, Code::DataInvalid, "{e}"),
                other => panic!("item {i}: {other:?}"),
            }
        }

        // Generate 100 at once: all distinct.
        let gen =
            oks(client.generate(&key("default"), vec![ctx(&[]); 100], false, md()).await.expect("generate"));
        let mut keys: Vec<_> = gen.into_iter().map(|g| g.0.unwrap()).collect();
        keys.sort();
        keys.dedup();
        assert_eq!(keys.len(), 100);
    })
    .await;
}

/// Every byte of a generated EDEK flipped in turn, in one batch: each item DATA_INVALID
/// with the same message, and the intact EDEK at the end still unwraps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_flipped_byte_fails_its_own_item() {
    let kekd = Kekd::start_default();
    within(async {
        let client = connect(&kekd, "acme").await.expect("connect");
        let c = ctx(&[("doc", "flip")]);
        let edek =
            oks(client.generate(&key("default"), vec![c.clone()], true, md()).await.expect("generate"))
                .remove(0)
                .1
                .unwrap();
        let mut cases: Vec<Vec<u8>> = (0..edek.len())
            .map(|i| {
                let mut t = edek.clone();
                t[i] ^= 0x55;
                t
            })
            .collect();
        cases.push(edek.clone());
        let res = client.unwrap(edek_items(&cases, &c), md()).await.expect("batch");
        let (last, tampered) = res.split_last().expect("non-empty");
        assert_eq!(
            last.as_ref().expect("the intact EDEK unwraps").plaintext.as_ref().map(Secret::len),
            Some(32)
        );
        let messages: Vec<String> = tampered
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let e = r.as_ref().err().unwrap_or_else(|| panic!("flipping byte {i} went unnoticed"));
                assert_eq!(e.code, Code::DataInvalid, "byte {i}: {e}");
                e.message.clone()
            })
            .collect();
        assert!(messages.iter().all(|m| *m == messages[0]), "DATA_INVALID messages differ: {messages:?}");
    })
    .await;
}

/// 400 concurrent calls from 16 tasks on one connection (clones share it): every answer
/// is the right one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_calls_pipeline_on_one_connection() {
    let kekd = Kekd::start_default();
    within(async {
        let client = connect(&kekd, "acme").await.expect("connect");
        let mut tasks = tokio::task::JoinSet::new();
        for t in 0..16u32 {
            let client = client.clone();
            tasks.spawn(async move {
                for n in 0..25u32 {
                    let secret = format!("task {t} call {n}").into_bytes();
                    let c = ctx(&[("task", &t.to_string())]);
                    let w = client
                        .wrap(
                            &key("default"),
                            vec![WrapItem {
                                plaintext: Secret::from_vec(secret.clone()),
                                context: c.clone(),
                            }],
                            md(),
                        )
                        .await
                        .expect("wrap");
                    let edek = w.into_iter().next().unwrap().expect("wrap item").edek.expect("an EDEK");
                    let u = client.unwrap(vec![EdekItem { edek, context: c }], md()).await.expect("unwrap");
                    let got =
                        u.into_iter().next().unwrap().expect("unwrap item").plaintext.expect("a plaintext");
                    assert_eq!(got.expose(), &secret[..], "task {t} call {n} got another call's answer");
                }
            });
        }
        while let Some(r) = tasks.join_next().await {
            r.expect("a task panicked");
        }
        assert!(!client.is_closed());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_failures_are_errors_not_hangs() {
    let mut kekd = Kekd::builder()
        .tenant(Tenant::owned_by_me("acme"))
        .tenant(Tenant::new("locked").allow_uid(4242))
        .start();
    within(async {
        let e = connect(&kekd, "ghost").await.expect_err("unknown tenant");
        assert_eq!(e.code(), Code::NotFound, "{e}");
        let e = connect(&kekd, "locked").await.expect_err("tenant whose ACL does not name us");
        assert_eq!(e.code(), Code::PermissionDenied, "{e}");

        let client = connect(&kekd, "acme").await.expect("connect");
        client.status(md()).await.expect("status");
        kekd.kill();
        let e = client.status(md()).await.expect_err("the daemon is gone");
        assert_eq!(e.code(), Code::Unavailable, "{e}");
        assert!(client.is_closed());
        let e = connect(&kekd, "acme").await.expect_err("nothing listens any more");
        assert_eq!(e.code(), Code::Unavailable, "{e}");
    })
    .await;
}
