//! Resident memory of a worker holding many cached KEK versions: one key is created and
//! rotated until it has VERSIONS versions, one EDEK is generated under each, then all of
//! them are unwrapped (so every version's KEK is in the cache, whether or not rotation
//! left it there), and the worker's `/proc/PID/status` is read, before and after. The
//! worker's pid and cache size come from `status`.

use std::path::Path;
use std::time::{Duration, Instant};

use kekd_client::{Client, ClientOptions, Context as EncContext, EdekItem, KeyName, Metadata, TenantName};
use serde::Serialize;

use crate::{fail, Context as _};

/// Items per unwrap request (kekd's batch limit is higher; this keeps frames small).
const UNWRAP_BATCH: usize = 256;

/// The memory lines of `/proc/PID/status`, in KiB.
#[derive(Debug, Default, Serialize)]
pub struct Memory {
    pub vm_rss_kib: u64,
    pub vm_hwm_kib: u64,
    pub rss_anon_kib: u64,
    pub rss_file_kib: u64,
    pub rss_shmem_kib: u64,
    pub vm_lck_kib: u64,
}

impl Memory {
    fn of(pid: u32) -> crate::Result<Memory> {
        let path = format!("/proc/{pid}/status");
        let text = std::fs::read_to_string(&path).context(|| format!("read {path}"))?;
        let mut m = Memory::default();
        for line in text.lines() {
            let Some((name, value)) = line.split_once(':') else { continue };
            let kib = value.trim().trim_end_matches(" kB").trim().parse().unwrap_or(0);
            match name {
                "VmRSS" => m.vm_rss_kib = kib,
                "VmHWM" => m.vm_hwm_kib = kib,
                "RssAnon" => m.rss_anon_kib = kib,
                "RssFile" => m.rss_file_kib = kib,
                "RssShmem" => m.rss_shmem_kib = kib,
                "VmLck" => m.vm_lck_kib = kib,
                _ => {}
            }
        }
        Ok(m)
    }
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub figure: &'static str,
    pub worker_pid: u32,
    pub versions: u32,
    pub cached_keks_before: u32,
    pub cached_keks: u32,
    pub before: Memory,
    pub after: Memory,
    pub vm_rss_mib: f64,
    pub setup_secs: f64,
}

pub fn run(socket: &Path, tenant: &str, key: &str, versions: u32) -> crate::Result<Report> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context(|| "start the runtime".into())?;
    rt.block_on(measure(socket, tenant, key, versions.max(1)))
}

async fn measure(socket: &Path, tenant: &str, key: &str, versions: u32) -> crate::Result<Report> {
    let tenant = TenantName::parse(tenant).context(|| "tenant".into())?;
    let key = KeyName::parse(key).context(|| "key".into())?;
    let opts = ClientOptions { connect_timeout: Some(Duration::from_secs(10)), ..ClientOptions::default() };
    let client = Client::connect_with(socket, &tenant, "kekd-bench-rss", opts)
        .await
        .context(|| format!("connect to {}", socket.display()))?;
    let md = Metadata::default;
    let status = client.status(md()).await.context(|| "status".into())?;
    let (pid, cached_keks_before) = (status.worker_pid, status.cached_keks);
    let before = Memory::of(pid)?;

    let started = Instant::now();
    client.create_key(&key, md()).await.context(|| format!("create key {key} (use a fresh kekd dev)"))?;
    let mut edeks = Vec::with_capacity(versions as usize);
    for v in 1..=versions {
        let mut items = client
            .generate(&key, vec![EncContext::default()], true, md())
            .await
            .context(|| format!("generate under version {v}"))?;
        match items.pop() {
            Some(Ok(item)) if item.version == v => edeks.push(item.edek.context(|| "no EDEK".into())?),
            other => fail!("generate under version {v}: {other:?}"),
        }
        if v < versions {
            client.rotate_key(&key, md()).await.context(|| format!("rotate to version {}", v + 1))?;
        }
    }
    for chunk in edeks.chunks(UNWRAP_BATCH) {
        let items =
            chunk.iter().map(|e| EdekItem { edek: e.clone(), context: EncContext::default() }).collect();
        let answers = client.unwrap(items, md()).await.context(|| "unwrap".into())?;
        if let Some(Err(e)) = answers.into_iter().find(Result::is_err) {
            fail!("unwrap: {e}");
        }
    }
    let setup_secs = started.elapsed().as_secs_f64();
    let status = client.status(md()).await.context(|| "status".into())?;
    if status.worker_pid != pid {
        fail!("the worker changed during the run ({pid} → {})", status.worker_pid);
    }
    let after = Memory::of(pid)?;
    Ok(Report {
        figure: "rss",
        worker_pid: pid,
        versions,
        cached_keks_before,
        cached_keks: status.cached_keks,
        vm_rss_mib: (after.vm_rss_kib as f64 / 1024.0 * 100.0).round() / 100.0,
        before,
        after,
        setup_secs: (setup_secs * 100.0).round() / 100.0,
    })
}
