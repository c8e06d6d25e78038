//! The key store: a tenant's named KEKs, their versions and states, on disk.
//!
//! Layout under `<state_dir>/tenants/<tenant>/keys/<hex(key name)>/`:
//!
//! - `key.json`: `{format, tenant, key, active_version, created_unix}`. Written last when a
//!   key is created or rotated: it is the commit point.
//! - `v0000000001.kek`: the recovery record `{format, tenant, key, version, root, sealed}`,
//!   `sealed` being the root-key backend's output (base64). Never rewritten; removed only
//!   by crypto-shredding (overwritten with zeros, fsynced, unlinked).
//! - `v0000000001.json`: lifecycle state `{format, version, state, created_unix}`.
//!
//! Every write is atomic (temp file, fsync, rename, fsync dir), so kill -9 at any point
//! leaves either the old or the new file. What each operation guarantees if it is cut
//! short is documented on it; [`KeyStore::open`] finishes or rolls back what it finds.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use kekd_proto::{KeyInfo, KeyName, TenantName, VersionInfo, VersionState};
use serde::{Deserialize, Serialize};

/// Format version written into every record.
pub const RECORD_FORMAT: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("key \"{0}\" does not exist")]
    NoSuchKey(KeyName),
    #[error("key \"{0}\" has no version {1}")]
    NoSuchVersion(KeyName, u32),
    #[error("key \"{0}\" already exists")]
    KeyExists(KeyName),
    #[error("{0}")]
    Precondition(String),
    #[error("key store i/o error on {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("damaged key record {path}: {problem}")]
    Corrupt { path: PathBuf, problem: String },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io { path: path.to_owned(), source }
}

/// Lifecycle state as stored. "Active" is not stored per version: it is the key's
/// `active_version` when that version is enabled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StoredState {
    Enabled,
    Disabled,
    Destroyed,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyRecord {
    format: u32,
    tenant: String,
    key: String,
    active_version: u32,
    created_unix: u64,
    #[serde(default, skip_serializing_if = "is_zero32")]
    min_decrypt_version: u32,
    #[serde(default, skip_serializing_if = "is_zero32")]
    keep_versions: u32,
}

fn is_zero32(n: &u32) -> bool {
    *n == 0
}

/// The tombstone of a destroyed tenant, in `<state_dir>/tenants/<tenant>/`.
const TOMBSTONE: &str = "destroyed.json";

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Tombstone {
    format: u32,
    tenant: String,
    destroyed_unix: u64,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KekRecord {
    format: u32,
    tenant: String,
    key: String,
    version: u32,
    /// Which root key sealed it, for a human recovering data without kekd.
    root: String,
    sealed: String,
    /// Set when a parent KEK, not the root key, sealed it (a key chain): the parent key's
    /// name and version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    parent: Option<ParentRef>,
    /// The label of the root key that sealed it, once the tenant's root key was rotated;
    /// absent: the configured root key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    root_key: Option<String>,
}

/// What sealed a KEK version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SealedBy {
    /// A root key: the one labelled so, or (`None`) the configured one.
    Root(Option<String>),
    /// A version of the parent key (a key chain).
    Parent(KeyName, u32),
}

/// The tenant's root key history, in `<state_dir>/tenants/<tenant>/root.json`; absent
/// until the first rotation. A rotation writes `active` (the new label) with `rotating`
/// set before it rewraps any record, and clears `rotating` once every record is rewrapped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RootState {
    pub format: u32,
    pub active: String,
    /// Earlier root keys, oldest first. Once `rotating` is false, no record needs them.
    pub previous: Vec<String>,
    pub rotating: bool,
}

const ROOT_STATE: &str = "root.json";

/// [`read_root_state`] for an open store.
pub fn read_root_state_of(store: &KeyStore) -> Result<Option<RootState>, StoreError> {
    root_state_in(store.dir.parent().expect("the key store lives in its tenant's directory"))
}

fn root_state_in(tenant_dir: &Path) -> Result<Option<RootState>, StoreError> {
    let path = tenant_dir.join(ROOT_STATE);
    if !path.exists() {
        return Ok(None);
    }
    let st: RootState = read_json(&path)?;
    check_format(&path, st.format)?;
    Ok(Some(st))
}

/// The active root key label recorded for a tenant, if its root key was ever rotated:
/// the worker opens that one rather than the configured `key_label`.
pub fn read_root_state(state_dir: &Path, tenant: &TenantName) -> Result<Option<RootState>, StoreError> {
    root_state_in(&state_dir.join("tenants").join(tenant.as_str()))
}

#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ParentRef {
    key: String,
    version: u32,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateRecord {
    format: u32,
    version: u32,
    state: StoredState,
    created_unix: u64,
    /// Encryptions reserved under this version, written ahead of their use: after a crash
    /// kekd counts them all as used, so the encryption budget is never under-counted.
    #[serde(default, skip_serializing_if = "is_zero")]
    reserved: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

struct Version {
    state: StoredState,
    created_unix: u64,
    reserved: u64,
    by: SealedBy,
    /// The sealed KEK; None once destroyed.
    sealed: Option<Arc<[u8]>>,
}

impl Version {
    /// A version just written: enabled, nothing reserved yet.
    fn new(created_unix: u64, by: SealedBy, sealed: Vec<u8>) -> Self {
        Version { state: StoredState::Enabled, created_unix, reserved: 0, by, sealed: Some(sealed.into()) }
    }
}

struct Key {
    active: u32,
    created_unix: u64,
    min_decrypt_version: u32,
    keep_versions: u32,
    versions: BTreeMap<u32, Version>,
}

impl Key {
    fn state_of(&self, v: u32, version: &Version) -> VersionState {
        match version.state {
            StoredState::Destroyed => VersionState::Destroyed,
            StoredState::Disabled => VersionState::Disabled,
            StoredState::Enabled if v == self.active => VersionState::Active,
            StoredState::Enabled => VersionState::DecryptOnly,
        }
    }

    fn info(&self, name: &KeyName) -> KeyInfo {
        KeyInfo {
            name: name.clone(),
            active_version: self.active,
            versions: self
                .versions
                .iter()
                .map(|(&v, ver)| VersionInfo {
                    version: v,
                    state: self.state_of(v, ver),
                    created_unix: ver.created_unix,
                })
                .collect(),
            min_decrypt_version: self.min_decrypt_version,
            keep_versions: self.keep_versions,
        }
    }

    fn record(&self, tenant: &TenantName, name: &KeyName) -> KeyRecord {
        KeyRecord {
            format: RECORD_FORMAT,
            tenant: tenant.to_string(),
            key: name.to_string(),
            active_version: self.active,
            created_unix: self.created_unix,
            min_decrypt_version: self.min_decrypt_version,
            keep_versions: self.keep_versions,
        }
    }
}

/// What the service needs to use one KEK version.
pub struct VersionView {
    pub state: VersionState,
    pub sealed: Arc<[u8]>,
    /// The key's `min_decrypt_version`: versions below it are refused for decryption.
    pub min_decrypt_version: u32,
    /// The root key or parent KEK version that sealed this one.
    pub by: SealedBy,
}

/// One tenant's key store. Reads are served from memory; writes go to disk first.
pub struct KeyStore {
    tenant: TenantName,
    /// Describes the root key new records are sealed by (informational, in each record).
    root: Mutex<String>,
    dir: PathBuf,
    keys: Mutex<BTreeMap<KeyName, Key>>,
    /// Serialises the read-modify-write of state records (state changes by admins,
    /// budget reservations from the data path), so neither overwrites the other.
    state_writes: Mutex<()>,
    /// When the tenant was destroyed, if it was: then the store is empty for good.
    destroyed_unix: Mutex<Option<u64>>,
}

impl KeyStore {
    /// Opens (creating if needed) the tenant's store and loads every key. Finishes any
    /// shredding and removes any half-created key or version left by a crash.
    pub fn open(state_dir: &Path, tenant: &TenantName, root: String) -> Result<KeyStore, StoreError> {
        let tenant_dir = state_dir.join("tenants").join(tenant.as_str());
        let dir = tenant_dir.join("keys");
        let stone_path = tenant_dir.join(TOMBSTONE);
        if stone_path.exists() {
            let stone: Tombstone = read_json(&stone_path)?;
            // A destruction cut short: finish it.
            if dir.exists() {
                shred_tree(&dir)?;
            }
            return Ok(KeyStore {
                tenant: tenant.clone(),
                root: Mutex::new(root),
                dir,
                keys: Mutex::new(BTreeMap::new()),
                state_writes: Mutex::new(()),
                destroyed_unix: Mutex::new(Some(stone.destroyed_unix)),
            });
        }
        fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir).map_err(io_err(&dir))?;
        let mut keys = BTreeMap::new();
        for entry in fs::read_dir(&dir).map_err(io_err(&dir))? {
            let entry = entry.map_err(io_err(&dir))?;
            let path = entry.path();
            let Some(name) = decode_dir_name(&entry.file_name().to_string_lossy()) else {
                if entry.file_name().to_string_lossy().starts_with(".tmp") {
                    fs::remove_file(&path).map_err(io_err(&path))?;
                    continue;
                }
                return Err(StoreError::Corrupt { path, problem: "unexpected entry in key store".into() });
            };
            if let Some(key) = load_key(&path, tenant, &name)? {
                keys.insert(name, key);
            }
        }
        Ok(KeyStore {
            tenant: tenant.clone(),
            root: Mutex::new(root),
            dir,
            keys: Mutex::new(keys),
            state_writes: Mutex::new(()),
            destroyed_unix: Mutex::new(None),
        })
    }

    pub fn list(&self) -> Vec<KeyInfo> {
        self.keys.lock().expect("keystore lock").iter().map(|(n, k)| k.info(n)).collect()
    }

    pub fn len(&self) -> usize {
        self.keys.lock().expect("keystore lock").len()
    }

    pub fn info(&self, name: &KeyName) -> Result<KeyInfo, StoreError> {
        let keys = self.keys.lock().expect("keystore lock");
        keys.get(name).map(|k| k.info(name)).ok_or_else(|| StoreError::NoSuchKey(name.clone()))
    }

    /// The active version of a key.
    pub fn active_version(&self, name: &KeyName) -> Result<u32, StoreError> {
        let keys = self.keys.lock().expect("keystore lock");
        keys.get(name).map(|k| k.active).ok_or_else(|| StoreError::NoSuchKey(name.clone()))
    }

    pub fn version(&self, name: &KeyName, version: u32) -> Result<VersionView, StoreError> {
        let keys = self.keys.lock().expect("keystore lock");
        let key = keys.get(name).ok_or_else(|| StoreError::NoSuchKey(name.clone()))?;
        let v = key.versions.get(&version).ok_or_else(|| StoreError::NoSuchVersion(name.clone(), version))?;
        let state = key.state_of(version, v);
        let sealed = v.sealed.clone().ok_or_else(|| StoreError::NoSuchVersion(name.clone(), version))?;
        Ok(VersionView { state, sealed, min_decrypt_version: key.min_decrypt_version, by: v.by.clone() })
    }

    /// The version number a new key (1) or a rotation (highest + 1) will use. Callers seal
    /// the KEK for this number, then call [`create_key`](Self::create_key) or
    /// [`add_version`](Self::add_version); callers serialise admin operations.
    pub fn next_version(&self, name: &KeyName) -> u32 {
        let keys = self.keys.lock().expect("keystore lock");
        keys.get(name).and_then(|k| k.versions.keys().next_back().copied()).map_or(1, |v| v + 1)
    }

    pub fn exists(&self, name: &KeyName) -> bool {
        self.keys.lock().expect("keystore lock").contains_key(name)
    }

    /// Creates a key with version 1 active.
    ///
    /// If cut short: before `key.json` is renamed into place the key does not exist, and
    /// `open` removes (shreds) the partial directory; after, it exists whole.
    pub fn create_key(&self, name: &KeyName, sealed: Vec<u8>) -> Result<KeyInfo, StoreError> {
        self.create_key_under(name, sealed, SealedBy::Root(None))
    }

    /// [`create_key`](Self::create_key), saying what sealed the KEK.
    pub fn create_key_under(
        &self,
        name: &KeyName,
        sealed: Vec<u8>,
        by: SealedBy,
    ) -> Result<KeyInfo, StoreError> {
        if self.exists(name) {
            return Err(StoreError::KeyExists(name.clone()));
        }
        let kdir = self.key_dir(name);
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&kdir)
            .or_else(|e| match e.kind() {
                // A directory without key.json is a crash leftover: reuse it.
                io::ErrorKind::AlreadyExists => Ok(()),
                _ => Err(e),
            })
            .map_err(io_err(&kdir))?;
        sync_dir(&self.dir)?;
        let now = unix_now();
        self.write_version(&kdir, name, 1, &sealed, &by, now)?;
        let mut versions = BTreeMap::new();
        versions.insert(1, Version::new(now, by, sealed));
        let key = Key { active: 1, created_unix: now, min_decrypt_version: 0, keep_versions: 0, versions };
        write_json(&kdir, "key.json", &key.record(&self.tenant, name))?;
        let info = key.info(name);
        self.keys.lock().expect("keystore lock").insert(name.clone(), key);
        Ok(info)
    }

    /// Adds `version` (from [`next_version`](Self::next_version)) and makes it active; the
    /// previous active version becomes decrypt-only.
    ///
    /// If cut short before `key.json` is rewritten, the new version exists on disk but is
    /// not active and was never used; `open` keeps it as decrypt-only, and the next
    /// rotation uses the number after it.
    #[cfg(test)]
    pub fn add_version(&self, name: &KeyName, version: u32, sealed: Vec<u8>) -> Result<KeyInfo, StoreError> {
        self.add_version_under(name, version, sealed, SealedBy::Root(None))
    }

    /// [`add_version`](Self::add_version), saying what sealed the KEK.
    pub fn add_version_under(
        &self,
        name: &KeyName,
        version: u32,
        sealed: Vec<u8>,
        by: SealedBy,
    ) -> Result<KeyInfo, StoreError> {
        let mut rec = {
            let keys = self.keys.lock().expect("keystore lock");
            let key = keys.get(name).ok_or_else(|| StoreError::NoSuchKey(name.clone()))?;
            if key.versions.keys().next_back().is_some_and(|&v| v >= version) {
                return Err(StoreError::Precondition(format!(
                    "version {version} of \"{name}\" already exists"
                )));
            }
            key.record(&self.tenant, name)
        };
        let kdir = self.key_dir(name);
        let now = unix_now();
        self.write_version(&kdir, name, version, &sealed, &by, now)?;
        rec.active_version = version;
        write_json(&kdir, "key.json", &rec)?;
        let mut keys = self.keys.lock().expect("keystore lock");
        let key = keys.get_mut(name).expect("checked above; admin operations are serialised");
        key.versions.insert(version, Version::new(now, by, sealed));
        key.active = version;
        Ok(key.info(name))
    }

    /// Disables, re-enables or destroys one version.
    ///
    /// Destroying writes the `destroyed` state first, then shreds the `.kek` record
    /// (overwrite with zeros, fsync, unlink, fsync dir). Cut short in between, `open` sees
    /// the state and finishes the shredding. The active version cannot be destroyed:
    /// rotate first, so that new wraps always have a key.
    pub fn set_state(&self, name: &KeyName, version: u32, state: StoredState) -> Result<KeyInfo, StoreError> {
        let _writing = self.state_writes.lock().expect("state write lock");
        let (created_unix, reserved) = {
            let keys = self.keys.lock().expect("keystore lock");
            let key = keys.get(name).ok_or_else(|| StoreError::NoSuchKey(name.clone()))?;
            let v =
                key.versions.get(&version).ok_or_else(|| StoreError::NoSuchVersion(name.clone(), version))?;
            if v.state == StoredState::Destroyed {
                return Err(StoreError::Precondition(format!(
                    "version {version} of \"{name}\" is destroyed"
                )));
            }
            if state == StoredState::Destroyed && version == key.active {
                return Err(StoreError::Precondition(format!(
                    "version {version} is the active version of \"{name}\": rotate the key before destroying it"
                )));
            }
            (v.created_unix, v.reserved)
        };
        let kdir = self.key_dir(name);
        let rec = StateRecord { format: RECORD_FORMAT, version, state, created_unix, reserved };
        write_json(&kdir, &format!("v{version:010}.json"), &rec)?;
        if state == StoredState::Destroyed {
            shred(&kdir.join(format!("v{version:010}.kek")))?;
            sync_dir(&kdir)?;
        }
        let mut keys = self.keys.lock().expect("keystore lock");
        let key = keys.get_mut(name).expect("checked above; admin operations are serialised");
        let v = key.versions.get_mut(&version).expect("checked above");
        v.state = state;
        if state == StoredState::Destroyed {
            v.sealed = None;
        }
        Ok(key.info(name))
    }

    /// Sets a key's version controls (`None` keeps a value). A `min_decrypt_version` above
    /// the active version is refused: new data would be undecryptable at once.
    pub fn set_policy(
        &self,
        name: &KeyName,
        min_decrypt_version: Option<u32>,
        keep_versions: Option<u32>,
    ) -> Result<KeyInfo, StoreError> {
        let rec = {
            let keys = self.keys.lock().expect("keystore lock");
            let key = keys.get(name).ok_or_else(|| StoreError::NoSuchKey(name.clone()))?;
            let mut rec = key.record(&self.tenant, name);
            if let Some(min) = min_decrypt_version {
                if min > key.active {
                    return Err(StoreError::Precondition(format!(
                        "min_decrypt_version {min} is above the active version {} of \"{name}\"",
                        key.active
                    )));
                }
                rec.min_decrypt_version = min;
            }
            if let Some(keep) = keep_versions {
                rec.keep_versions = keep;
            }
            rec
        };
        write_json(&self.key_dir(name), "key.json", &rec)?;
        let mut keys = self.keys.lock().expect("keystore lock");
        let key = keys.get_mut(name).expect("checked above; admin operations are serialised");
        key.min_decrypt_version = rec.min_decrypt_version;
        key.keep_versions = rec.keep_versions;
        Ok(key.info(name))
    }

    /// Destroys (crypto-shreds) the versions of `name` older than its newest
    /// `keep_versions`, if set; returns the versions destroyed now.
    pub fn prune(&self, name: &KeyName) -> Result<Vec<u32>, StoreError> {
        let doomed: Vec<u32> = {
            let keys = self.keys.lock().expect("keystore lock");
            let key = keys.get(name).ok_or_else(|| StoreError::NoSuchKey(name.clone()))?;
            if key.keep_versions == 0 {
                return Ok(Vec::new());
            }
            key.versions
                .iter()
                .rev()
                .skip(key.keep_versions as usize)
                .filter(|(&v, ver)| ver.state != StoredState::Destroyed && v != key.active)
                .map(|(&v, _)| v)
                .collect()
        };
        for &v in &doomed {
            self.set_state(name, v, StoredState::Destroyed)?;
        }
        Ok(doomed)
    }

    /// Crypto-shreds the whole tenant. The tombstone goes first (the commit point: from
    /// then on the tenant is destroyed, and [`KeyStore::open`] finishes the job if this is
    /// cut short), then every sealed KEK record is overwritten, fsynced and removed, then
    /// the rest. Returns (keys, versions shredded).
    pub fn destroy_tenant(&self) -> Result<(u32, u32), StoreError> {
        let _writing = self.state_writes.lock().expect("state write lock");
        let tenant_dir = self.dir.parent().expect("the key store lives in its tenant's directory");
        let stone =
            Tombstone { format: RECORD_FORMAT, tenant: self.tenant.to_string(), destroyed_unix: unix_now() };
        write_json(tenant_dir, TOMBSTONE, &stone)?;
        *self.destroyed_unix.lock().expect("keystore lock") = Some(stone.destroyed_unix);
        let mut keys = self.keys.lock().expect("keystore lock");
        let counts = (
            keys.len() as u32,
            keys.values().flat_map(|k| k.versions.values()).filter(|v| v.sealed.is_some()).count() as u32,
        );
        keys.clear();
        drop(keys);
        shred_tree(&self.dir)?;
        Ok(counts)
    }

    /// Writes (or, in a root key rotation, rewrites) a sealed KEK record, atomically.
    fn write_kek(
        &self,
        kdir: &Path,
        name: &KeyName,
        version: u32,
        sealed: &[u8],
        by: &SealedBy,
    ) -> Result<(), StoreError> {
        let (root, parent, root_key) = match by {
            SealedBy::Parent(p, v) => (
                format!("kek key={:?} version={v}", p.as_str()),
                Some(ParentRef { key: p.to_string(), version: *v }),
                None,
            ),
            SealedBy::Root(label) => (self.root.lock().expect("keystore lock").clone(), None, label.clone()),
        };
        let kek = KekRecord {
            format: RECORD_FORMAT,
            tenant: self.tenant.to_string(),
            key: name.to_string(),
            version,
            root,
            sealed: B64.encode(sealed),
            parent,
            root_key,
        };
        write_json(kdir, &format!("v{version:010}.kek"), &kek)
    }

    /// Root-sealed versions not sealed by the root key `label` (and not destroyed): what a
    /// rotation to `label` has left to rewrap.
    pub fn sealed_by_other_roots(&self, label: &str) -> Vec<(KeyName, u32, Option<String>)> {
        let keys = self.keys.lock().expect("keystore lock");
        let mut out = Vec::new();
        for (name, key) in keys.iter() {
            for (&v, ver) in &key.versions {
                if let (SealedBy::Root(by), Some(_)) = (&ver.by, &ver.sealed) {
                    if by.as_deref() != Some(label) {
                        out.push((name.clone(), v, by.clone()));
                    }
                }
            }
        }
        out
    }

    /// Replaces one version's sealed KEK with the same KEK sealed by the root key `label`,
    /// atomically (the record is rewritten in a temporary file and renamed into place).
    pub fn rewrap_root(
        &self,
        name: &KeyName,
        version: u32,
        sealed: Vec<u8>,
        label: &str,
    ) -> Result<(), StoreError> {
        let by = SealedBy::Root(Some(label.to_owned()));
        self.write_kek(&self.key_dir(name), name, version, &sealed, &by)?;
        let mut keys = self.keys.lock().expect("keystore lock");
        if let Some(v) = keys.get_mut(name).and_then(|k| k.versions.get_mut(&version)) {
            if v.sealed.is_some() {
                v.sealed = Some(sealed.into());
                v.by = by;
            }
        }
        Ok(())
    }

    /// Records the root key history (see [`RootState`]), atomically.
    pub fn set_root_state(&self, state: &RootState, description: String) -> Result<(), StoreError> {
        let tenant_dir = self.dir.parent().expect("the key store lives in its tenant's directory");
        write_json(tenant_dir, ROOT_STATE, state)?;
        *self.root.lock().expect("keystore lock") = description;
        Ok(())
    }

    /// When the tenant was destroyed (unix time), if it was.
    pub fn destroyed(&self) -> Option<u64> {
        *self.destroyed_unix.lock().expect("keystore lock")
    }

    /// Encryptions reserved so far under one version (0 for a version never used).
    pub fn reserved(&self, name: &KeyName, version: u32) -> Result<u64, StoreError> {
        let keys = self.keys.lock().expect("keystore lock");
        let key = keys.get(name).ok_or_else(|| StoreError::NoSuchKey(name.clone()))?;
        let v = key.versions.get(&version).ok_or_else(|| StoreError::NoSuchVersion(name.clone(), version))?;
        Ok(v.reserved)
    }

    /// Raises the reserved encryption count of one version to `upto`, on disk (atomically,
    /// fsynced) before in memory: the caller uses the reservation only once this returns.
    pub fn reserve(&self, name: &KeyName, version: u32, upto: u64) -> Result<(), StoreError> {
        let _writing = self.state_writes.lock().expect("state write lock");
        let (state, created_unix) = {
            let keys = self.keys.lock().expect("keystore lock");
            let key = keys.get(name).ok_or_else(|| StoreError::NoSuchKey(name.clone()))?;
            let v =
                key.versions.get(&version).ok_or_else(|| StoreError::NoSuchVersion(name.clone(), version))?;
            if upto <= v.reserved {
                return Ok(());
            }
            (v.state, v.created_unix)
        };
        let rec = StateRecord { format: RECORD_FORMAT, version, state, created_unix, reserved: upto };
        write_json(&self.key_dir(name), &format!("v{version:010}.json"), &rec)?;
        let mut keys = self.keys.lock().expect("keystore lock");
        if let Some(v) = keys.get_mut(name).and_then(|k| k.versions.get_mut(&version)) {
            v.reserved = upto;
        }
        Ok(())
    }

    fn key_dir(&self, name: &KeyName) -> PathBuf {
        self.dir.join(hex::encode(name.as_str()))
    }

    fn write_version(
        &self,
        kdir: &Path,
        name: &KeyName,
        version: u32,
        sealed: &[u8],
        by: &SealedBy,
        now: u64,
    ) -> Result<(), StoreError> {
        self.write_kek(kdir, name, version, sealed, by)?;
        let st = StateRecord {
            format: RECORD_FORMAT,
            version,
            state: StoredState::Enabled,
            created_unix: now,
            reserved: 0,
        };
        write_json(kdir, &format!("v{version:010}.json"), &st)
    }
}

fn decode_dir_name(s: &str) -> Option<KeyName> {
    let bytes = hex::decode(s).ok()?;
    KeyName::parse(std::str::from_utf8(&bytes).ok()?).ok()
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, StoreError> {
    let bytes = fs::read(path).map_err(io_err(path))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| StoreError::Corrupt { path: path.to_owned(), problem: e.to_string() })
}

fn check_format(path: &Path, format: u32) -> Result<(), StoreError> {
    if format != RECORD_FORMAT {
        return Err(StoreError::Corrupt {
            path: path.to_owned(),
            problem: format!("record format {format} is not supported (this kekd reads {RECORD_FORMAT})"),
        });
    }
    Ok(())
}

/// Loads one key directory; None if it held a key whose creation never completed (then
/// it has been shredded and removed).
fn load_key(kdir: &Path, tenant: &TenantName, name: &KeyName) -> Result<Option<Key>, StoreError> {
    let corrupt = |path: &Path, problem: String| StoreError::Corrupt { path: path.to_owned(), problem };
    let key_path = kdir.join("key.json");
    let mut files: BTreeMap<u32, (Option<PathBuf>, Option<PathBuf>)> = BTreeMap::new();
    for entry in fs::read_dir(kdir).map_err(io_err(kdir))? {
        let path = entry.map_err(io_err(kdir))?.path();
        let fname = path.file_name().expect("read_dir entries have names").to_string_lossy().into_owned();
        if fname.starts_with(".tmp") {
            fs::remove_file(&path).map_err(io_err(&path))?;
            continue;
        }
        if fname == "key.json" {
            continue;
        }
        let parsed = fname
            .strip_prefix('v')
            .and_then(|r| r.split_once('.'))
            .and_then(|(n, ext)| Some((n.parse::<u32>().ok()?, ext.to_owned())));
        match parsed {
            Some((v, ext)) if ext == "kek" => files.entry(v).or_default().0 = Some(path),
            Some((v, ext)) if ext == "json" => files.entry(v).or_default().1 = Some(path),
            _ => return Err(corrupt(&path, "unexpected file in key directory".into())),
        }
    }
    if !key_path.exists() {
        // Creation was cut short before its commit point: nothing ever used this key.
        for (kek, state) in files.values() {
            if let Some(k) = kek {
                shred(k)?;
            }
            if let Some(s) = state {
                fs::remove_file(s).map_err(io_err(s))?;
            }
        }
        fs::remove_dir(kdir).map_err(io_err(kdir))?;
        tracing::warn!(key = %name, "removed a key whose creation did not complete");
        return Ok(None);
    }
    let rec: KeyRecord = read_json(&key_path)?;
    check_format(&key_path, rec.format)?;
    if rec.tenant != tenant.as_str() || rec.key != name.as_str() {
        return Err(corrupt(&key_path, "record belongs to another tenant or key".into()));
    }
    let mut versions = BTreeMap::new();
    for (v, (kek_path, state_path)) in files {
        let Some(state_path) = state_path else {
            // A .kek without state: a rotation cut short before its state was written.
            // It was never active; shred it so the number can be reused.
            let kek_path = kek_path.expect("one of the two exists");
            shred(&kek_path)?;
            continue;
        };
        let st: StateRecord = read_json(&state_path)?;
        check_format(&state_path, st.format)?;
        if st.version != v {
            return Err(corrupt(
                &state_path,
                format!("holds version {} in the file of version {v}", st.version),
            ));
        }
        let mut by = SealedBy::Root(None);
        let sealed = match (st.state, kek_path) {
            (StoredState::Destroyed, Some(k)) => {
                shred(&k)?;
                sync_dir(kdir)?;
                None
            }
            (StoredState::Destroyed, None) => None,
            (_, None) => return Err(corrupt(&state_path, "the sealed KEK record is missing".into())),
            (_, Some(k)) => {
                let kek: KekRecord = read_json(&k)?;
                check_format(&k, kek.format)?;
                if kek.tenant != tenant.as_str() || kek.key != name.as_str() || kek.version != v {
                    return Err(corrupt(&k, "record belongs to another tenant, key or version".into()));
                }
                let sealed = B64.decode(&kek.sealed).map_err(|e| corrupt(&k, format!("sealed: {e}")))?;
                by = match (kek.parent, kek.root_key) {
                    (Some(p), None) => SealedBy::Parent(
                        KeyName::parse(&p.key).map_err(|e| corrupt(&k, format!("parent key: {e}")))?,
                        p.version,
                    ),
                    (None, label) => SealedBy::Root(label),
                    (Some(_), Some(_)) => return Err(corrupt(&k, "both a parent and a root key".into())),
                };
                Some(Arc::from(sealed))
            }
        };
        versions.insert(
            v,
            Version { state: st.state, created_unix: st.created_unix, reserved: st.reserved, by, sealed },
        );
    }
    if !versions.contains_key(&rec.active_version) {
        return Err(corrupt(&key_path, format!("active version {} has no record", rec.active_version)));
    }
    Ok(Some(Key {
        active: rec.active_version,
        created_unix: rec.created_unix,
        min_decrypt_version: rec.min_decrypt_version,
        keep_versions: rec.keep_versions,
        versions,
    }))
}

fn write_json<T: Serialize>(dir: &Path, name: &str, value: &T) -> Result<(), StoreError> {
    let mut bytes = serde_json::to_vec_pretty(value).expect("records serialise");
    bytes.push(b'\n');
    write_atomic(dir, name, &bytes)
}

/// Temp file, fsync, rename over the target, fsync the directory.
pub fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), StoreError> {
    let mut rnd = [0u8; 6];
    aws_lc_rs::rand::fill(&mut rnd).expect("the system RNG does not fail");
    let tmp = dir.join(format!(".tmp-{}-{name}", hex::encode(rnd)));
    let target = dir.join(name);
    let res = (|| {
        let mut f = OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, &target)
    })();
    if let Err(e) = res {
        let _ = fs::remove_file(&tmp);
        return Err(StoreError::Io { path: target, source: e });
    }
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_err(dir))
}

/// Crypto-shreds a record: overwrite in place with zeros, fsync, unlink. The caller
/// fsyncs the directory.
fn shred(path: &Path) -> Result<(), StoreError> {
    let res = (|| {
        let len = fs::metadata(path)?.len();
        let mut f = OpenOptions::new().write(true).open(path)?;
        f.write_all(&vec![0u8; len as usize])?;
        f.sync_all()?;
        fs::remove_file(path)
    })();
    match res {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other.map_err(io_err(path)),
    }
}

/// Shreds every `.kek` record under `dir` (overwrite, fsync, unlink), then removes
/// everything else and `dir` itself, fsyncing the directories on the way.
fn shred_tree(dir: &Path) -> Result<(), StoreError> {
    for entry in fs::read_dir(dir).map_err(io_err(dir))? {
        let path = entry.map_err(io_err(dir))?.path();
        if path.is_dir() {
            shred_tree(&path)?;
        } else if path.extension().is_some_and(|e| e == "kek")
            || path.file_name().is_some_and(|n| n.to_string_lossy().starts_with(".tmp"))
        {
            shred(&path)?;
        } else {
            fs::remove_file(&path).map_err(io_err(&path))?;
        }
    }
    sync_dir(dir)?;
    fs::remove_dir(dir).map_err(io_err(dir))?;
    if let Some(parent) = dir.parent() {
        sync_dir(parent)?;
    }
    Ok(())
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (tempfile::TempDir, TenantName, KeyName) {
        (
            tempfile::tempdir().unwrap(),
            TenantName::parse("acme").unwrap(),
            KeyName::parse("billing/inv").unwrap(),
        )
    }

    fn open(dir: &Path, t: &TenantName) -> KeyStore {
        KeyStore::open(dir, t, "test-root".into()).unwrap()
    }

    #[test]
    fn create_rotate_and_reload() {
        let (dir, t, k) = setup();
        let s = open(dir.path(), &t);
        assert_eq!(s.next_version(&k), 1);
        s.create_key(&k, b"sealed-1".to_vec()).unwrap();
        assert!(matches!(s.create_key(&k, b"x".to_vec()), Err(StoreError::KeyExists(_))));
        assert_eq!(s.next_version(&k), 2);
        let info = s.add_version(&k, 2, b"sealed-2".to_vec()).unwrap();
        assert_eq!(info.active_version, 2);
        assert_eq!(info.versions[0].state, VersionState::DecryptOnly);
        assert_eq!(info.versions[1].state, VersionState::Active);
        drop(s);

        let s = open(dir.path(), &t);
        assert_eq!(s.list(), vec![info]);
        assert_eq!(&*s.version(&k, 1).unwrap().sealed, b"sealed-1");
        assert_eq!(s.version(&k, 2).unwrap().state, VersionState::Active);
    }

    #[test]
    fn disable_enable_destroy() {
        let (dir, t, k) = setup();
        let s = open(dir.path(), &t);
        s.create_key(&k, b"sealed-1".to_vec()).unwrap();
        s.add_version(&k, 2, b"sealed-2".to_vec()).unwrap();
        s.set_state(&k, 1, StoredState::Disabled).unwrap();
        assert_eq!(s.version(&k, 1).unwrap().state, VersionState::Disabled);
        s.set_state(&k, 1, StoredState::Enabled).unwrap();
        assert_eq!(s.version(&k, 1).unwrap().state, VersionState::DecryptOnly);
        assert!(matches!(s.set_state(&k, 2, StoredState::Destroyed), Err(StoreError::Precondition(_))));
        s.set_state(&k, 1, StoredState::Destroyed).unwrap();
        assert!(matches!(s.version(&k, 1), Err(StoreError::NoSuchVersion(..))));
        assert!(matches!(s.set_state(&k, 1, StoredState::Enabled), Err(StoreError::Precondition(_))));
        let kdir = s.key_dir(&k);
        assert!(!kdir.join("v0000000001.kek").exists());
        drop(s);
        let s = open(dir.path(), &t);
        assert_eq!(s.info(&k).unwrap().versions[0].state, VersionState::Destroyed);
        assert_eq!(s.next_version(&k), 3, "a destroyed version's number is never reused");
    }

    #[test]
    fn crash_leftovers_are_resolved_on_open() {
        let (dir, t, k) = setup();
        let s = open(dir.path(), &t);
        s.create_key(&k, b"sealed-1".to_vec()).unwrap();
        let kdir = s.key_dir(&k);
        drop(s);
        // A rotation cut short after the .kek was written, before its state.
        write_atomic(&kdir, "v0000000002.kek", b"{}").unwrap();
        // A destroy cut short after the state was written, before the shredding.
        fs::write(kdir.join("v0000000003.kek"), b"secret-looking").unwrap();
        let st = StateRecord {
            format: 1,
            version: 3,
            state: StoredState::Destroyed,
            created_unix: 0,
            reserved: 0,
        };
        write_json(&kdir, "v0000000003.json", &st).unwrap();
        // A stray temp file.
        fs::write(kdir.join(".tmp-abc-key.json"), b"partial").unwrap();
        // A key whose creation was cut short before key.json.
        let half = dir.path().join("tenants/acme/keys").join(hex::encode("half"));
        fs::create_dir(&half).unwrap();
        fs::write(half.join("v0000000001.kek"), b"x").unwrap();

        let s = open(dir.path(), &t);
        assert!(!kdir.join("v0000000002.kek").exists());
        assert!(!kdir.join("v0000000003.kek").exists());
        assert!(!kdir.join(".tmp-abc-key.json").exists());
        assert!(!half.exists());
        assert_eq!(s.list().len(), 1);
        assert_eq!(s.info(&k).unwrap().versions.len(), 2);
    }

    #[test]
    fn damaged_records_are_reported_with_their_path() {
        let (dir, t, k) = setup();
        let s = open(dir.path(), &t);
        s.create_key(&k, b"sealed-1".to_vec()).unwrap();
        let kdir = s.key_dir(&k);
        drop(s);
        fs::write(kdir.join("key.json"), b"{not json").unwrap();
        let err = KeyStore::open(dir.path(), &t, "r".into()).err().unwrap();
        assert!(matches!(&err, StoreError::Corrupt { path, .. } if path.ends_with("key.json")), "{err}");
        // A record copied from another tenant is refused.
        let other = TenantName::parse("other").unwrap();
        let s2 = open(dir.path(), &other);
        s2.create_key(&k, b"x".to_vec()).unwrap();
        let okdir = s2.key_dir(&k);
        fs::copy(okdir.join("key.json"), kdir.join("key.json")).unwrap();
        assert!(matches!(KeyStore::open(dir.path(), &t, "r".into()), Err(StoreError::Corrupt { .. })));
    }

    #[test]
    fn policy_survives_reload_and_prune_keeps_the_newest() {
        let (dir, t, k) = setup();
        let s = open(dir.path(), &t);
        s.create_key(&k, b"v1".to_vec()).unwrap();
        for v in 2..=4 {
            s.add_version(&k, v, format!("v{v}").into_bytes()).unwrap();
        }
        let info = s.set_policy(&k, Some(2), Some(2)).unwrap();
        assert_eq!((info.min_decrypt_version, info.keep_versions), (2, 2));
        assert!(s.set_policy(&k, Some(5), None).is_err(), "above the active version");
        assert_eq!(s.prune(&k).unwrap(), [2, 1]);
        assert_eq!(s.prune(&k).unwrap(), Vec::<u32>::new());
        drop(s);
        let s = open(dir.path(), &t);
        let info = s.info(&k).unwrap();
        assert_eq!((info.min_decrypt_version, info.keep_versions), (2, 2));
        assert_eq!(s.version(&k, 3).unwrap().min_decrypt_version, 2);
        assert!(s.version(&k, 1).is_err(), "destroyed");
    }

    #[test]
    fn a_tenant_destruction_cut_short_is_finished_on_open() {
        let (dir, t, k) = setup();
        let s = open(dir.path(), &t);
        s.create_key(&k, b"sealed-bytes".to_vec()).unwrap();
        let tenant_dir = dir.path().join("tenants/acme");
        // The commit point and nothing after it: a crash right after the tombstone.
        let stone = Tombstone { format: 1, tenant: "acme".into(), destroyed_unix: 7 };
        write_json(&tenant_dir, TOMBSTONE, &stone).unwrap();
        drop(s);
        let s = open(dir.path(), &t);
        assert_eq!(s.destroyed(), Some(7));
        assert_eq!(s.len(), 0);
        assert!(!tenant_dir.join("keys").exists(), "the shredding was finished");
    }
}
