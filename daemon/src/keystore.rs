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
//! Beside `keys/`, `<state_dir>/tenants/<tenant>/audit.kek` holds the tenant's audit
//! checkpoint key (crate::audit::anchor), sealed by the root key in a KEK record under the
//! name `@audit`, which no key can have, and version 1. Destroying the tenant leaves it: the
//! audit trail outlives the tenant's keys, and its checkpoints stay verifiable.
//!
//! Every write is atomic (temp file, fsync, rename, fsync dir), so kill -9 at any point
//! leaves either the old or the new file. What each operation guarantees if it is cut
//! short is documented on it; [`KeyStore::open`] finishes or rolls back what it finds.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use kekd_proto::{KeyInfo, KeyName, TenantName, VersionInfo, VersionState};
use serde::{Deserialize, Serialize};

use crate::dirfd::{Dir, DirError, EntryKind, Kind};

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
    /// A file operation failed, or found a link, a hard-linked file or a stranger's file
    /// where a record or directory should be (the tenant's user can write its directories).
    #[error("key store: {0}")]
    File(#[from] DirError),
    #[error("damaged key record {path}: {problem}")]
    Corrupt { path: PathBuf, problem: String },
}

/// Mode of the records: the worker's user alone reads them.
const RECORD_MODE: u32 = 0o600;

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

/// The audit checkpoint key's record, in the tenant's directory.
pub const AUDIT_KEY_FILE: &str = "audit.kek";
/// The key name in its record and AAD: `@` is in no key name (`[A-Za-z0-9._-]` segments).
pub const AUDIT_KEY_NAME: &str = "@audit";
/// The version in its record and AAD.
pub const AUDIT_KEY_VERSION: u32 = 1;

/// The audit checkpoint key as the store holds it: sealed by a root key.
pub struct SealedAuditKey {
    pub sealed: Vec<u8>,
    /// The label of the root key that sealed it, once the root key was rotated; `None`:
    /// the configured one (as a KEK record's `root_key`).
    pub root_key: Option<String>,
}

/// The audit checkpoint key of `tenant`, read from its directory (from
/// [`open_tenant_dir`], or opened read-only by a tool), if it has one. A record that is not
/// the tenant's checkpoint key (another tenant's, a KEK's, a chained one) is refused.
pub fn read_audit_key(tenant_dir: &Dir, tenant: &TenantName) -> Result<Option<SealedAuditKey>, StoreError> {
    if !tenant_dir.exists(AUDIT_KEY_FILE)? {
        return Ok(None);
    }
    let path = tenant_dir.child_path(AUDIT_KEY_FILE);
    let rec: KekRecord = read_json(tenant_dir, AUDIT_KEY_FILE)?;
    check_format(&path, rec.format)?;
    let corrupt = |problem: String| StoreError::Corrupt { path: path.clone(), problem };
    if rec.tenant != tenant.as_str() || rec.key != AUDIT_KEY_NAME || rec.version != AUDIT_KEY_VERSION {
        return Err(corrupt(format!(
            "holds {}/{} v{}, not the audit checkpoint key of {tenant} ({AUDIT_KEY_NAME} v{AUDIT_KEY_VERSION})",
            rec.tenant, rec.key, rec.version
        )));
    }
    if rec.parent.is_some() {
        return Err(corrupt("sealed by a parent key, not by the root key".into()));
    }
    let sealed = B64.decode(&rec.sealed).map_err(|e| corrupt(format!("sealed: {e}")))?;
    Ok(Some(SealedAuditKey { sealed, root_key: rec.root_key }))
}

/// [`read_root_state`] for an open store.
pub fn read_root_state_of(store: &KeyStore) -> Result<Option<RootState>, StoreError> {
    read_root_state(&store.tenant_dir)
}

/// The active root key label recorded for a tenant (in its directory, from
/// [`open_tenant_dir`]), if its root key was ever rotated: the worker opens that one
/// rather than the configured `key_label`.
pub fn read_root_state(tenant_dir: &Dir) -> Result<Option<RootState>, StoreError> {
    if !tenant_dir.exists(ROOT_STATE)? {
        return Ok(None);
    }
    let st: RootState = read_json(tenant_dir, ROOT_STATE)?;
    check_format(&tenant_dir.child_path(ROOT_STATE), st.format)?;
    Ok(Some(st))
}

/// Opens `<state_dir>/tenants/<tenant>/`, creating what is missing. `state_dir` must
/// belong to root (or to kekd's own user) and be writable by no one else; below it,
/// nothing is reached through a link (see [`crate::dirfd`]). Returns the state
/// directory, `tenants` and the tenant's directory, whose `keys/` exists too: whoever the
/// tenant's directory is then given to gets that with it.
pub fn open_tenant_dir(state_dir: &Path, tenant: &TenantName) -> Result<[Dir; 3], StoreError> {
    let state = Dir::open_configured(state_dir, 0o700)?;
    let tenants = state.create_dir("tenants", 0o700)?;
    let own = tenants.create_lent_dir(tenant.as_str(), 0o700)?;
    if !own.exists(TOMBSTONE)? {
        own.create_dir("keys", 0o700)?;
    }
    Ok([state, tenants, own])
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
///
/// Its directories are held open by descriptor and every record is reached relative to
/// them without following links: the store is opened (and crash leftovers shredded) while
/// the worker is still root, in directories its `run_as` user can write.
pub struct KeyStore {
    tenant: TenantName,
    /// Describes the root key new records are sealed by (informational, in each record).
    root: Mutex<String>,
    /// `<state_dir>/tenants/<tenant>/`.
    tenant_dir: Dir,
    /// Its `keys/`; None once the tenant is destroyed.
    dir: Option<Dir>,
    keys: Mutex<BTreeMap<KeyName, Key>>,
    /// Serialises the read-modify-write of state records (state changes by admins,
    /// budget reservations from the data path), so neither overwrites the other.
    state_writes: Mutex<()>,
    /// When the tenant was destroyed, if it was: then the store is empty for good.
    destroyed_unix: Mutex<Option<u64>>,
}

impl KeyStore {
    /// Opens (creating if needed) the tenant's store under `state_dir` and loads every
    /// key; see [`open_in`](Self::open_in). For tests and the fuzz targets, which own their
    /// state directory.
    #[cfg(any(test, feature = "fuzzing"))]
    pub fn open(state_dir: &Path, tenant: &TenantName, root: String) -> Result<KeyStore, StoreError> {
        let [_, _, tenant_dir] = open_tenant_dir(state_dir, tenant)?;
        Self::open_in(tenant_dir, tenant, root)
    }

    /// Opens (creating if needed) the store in the tenant's directory (from
    /// [`open_tenant_dir`]) and loads every key. Finishes any shredding and removes any
    /// half-created key or version left by a crash. A link, a hard-linked record or a
    /// stranger's file anywhere in the store is refused by name, before anything is
    /// written through it.
    pub fn open_in(tenant_dir: Dir, tenant: &TenantName, root: String) -> Result<KeyStore, StoreError> {
        if tenant_dir.exists(TOMBSTONE)? {
            let stone: Tombstone = read_json(&tenant_dir, TOMBSTONE)?;
            // A destruction cut short: finish it.
            if tenant_dir.exists("keys")? {
                tenant_dir.shred_tree("keys")?;
            }
            return Ok(KeyStore {
                tenant: tenant.clone(),
                root: Mutex::new(root),
                tenant_dir,
                dir: None,
                keys: Mutex::new(BTreeMap::new()),
                state_writes: Mutex::new(()),
                destroyed_unix: Mutex::new(Some(stone.destroyed_unix)),
            });
        }
        let dir = tenant_dir.create_dir("keys", 0o700)?;
        let mut keys = BTreeMap::new();
        for entry in dir.entries()? {
            let path = dir.child_path(&entry.name);
            let fname = entry.name.to_string_lossy();
            if fname.starts_with(".tmp") {
                remove_leftover(&dir, &entry.name, entry.kind)?;
                continue;
            }
            let Some(name) = decode_dir_name(&fname) else {
                return Err(StoreError::Corrupt { path, problem: "unexpected entry in key store".into() });
            };
            if entry.kind != EntryKind::Directory {
                return Err(refuse(&dir, &entry.name, entry.kind, Kind::Directory));
            }
            let kdir = dir.open_dir(&entry.name)?;
            match load_key(&kdir, tenant, &name)? {
                Some(key) => {
                    keys.insert(name, key);
                }
                None => {
                    // Creation was cut short before its commit point: its records are
                    // shredded; the directory goes too.
                    drop(kdir);
                    dir.remove_dir(&entry.name)?;
                    dir.sync()?;
                    tracing::warn!(key = %name, "removed a key whose creation did not complete");
                }
            }
        }
        Ok(KeyStore {
            tenant: tenant.clone(),
            root: Mutex::new(root),
            tenant_dir,
            dir: Some(dir),
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
        // A directory without key.json is a crash leftover: reused.
        let kdir = self.keys_dir()?.create_dir(hex::encode(name.as_str()), 0o700)?;
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
        let kdir = self.key_dir(name)?;
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
        let kdir = self.key_dir(name)?;
        let rec = StateRecord { format: RECORD_FORMAT, version, state, created_unix, reserved };
        write_json(&kdir, &format!("v{version:010}.json"), &rec)?;
        if state == StoredState::Destroyed {
            kdir.shred(format!("v{version:010}.kek"))?;
            kdir.sync()?;
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
        write_json(&self.key_dir(name)?, "key.json", &rec)?;
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
    /// the rest. Returns (keys, versions shredded). The audit checkpoint key stays: the
    /// tenant's audit trail outlives its keys, and its checkpoints stay verifiable.
    pub fn destroy_tenant(&self) -> Result<(u32, u32), StoreError> {
        let _writing = self.state_writes.lock().expect("state write lock");
        let stone =
            Tombstone { format: RECORD_FORMAT, tenant: self.tenant.to_string(), destroyed_unix: unix_now() };
        write_json(&self.tenant_dir, TOMBSTONE, &stone)?;
        *self.destroyed_unix.lock().expect("keystore lock") = Some(stone.destroyed_unix);
        let mut keys = self.keys.lock().expect("keystore lock");
        let counts = (
            keys.len() as u32,
            keys.values().flat_map(|k| k.versions.values()).filter(|v| v.sealed.is_some()).count() as u32,
        );
        keys.clear();
        drop(keys);
        self.tenant_dir.shred_tree("keys")?;
        Ok(counts)
    }

    /// Writes (or, in a root key rotation, rewrites) a sealed KEK record, atomically.
    fn write_kek(
        &self,
        kdir: &Dir,
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
        self.write_kek(&self.key_dir(name)?, name, version, &sealed, &by)?;
        let mut keys = self.keys.lock().expect("keystore lock");
        if let Some(v) = keys.get_mut(name).and_then(|k| k.versions.get_mut(&version)) {
            if v.sealed.is_some() {
                v.sealed = Some(sealed.into());
                v.by = by;
            }
        }
        Ok(())
    }

    /// The tenant's audit checkpoint key, if it has one (see [`read_audit_key`]).
    pub fn audit_key(&self) -> Result<Option<SealedAuditKey>, StoreError> {
        read_audit_key(&self.tenant_dir, &self.tenant)
    }

    /// Writes (or, in a root key rotation, rewrites) the audit checkpoint key's record,
    /// atomically, by descriptor: a link planted at its name is replaced, never followed.
    /// `root_key` names the root key that sealed it (`None`: the configured one). The
    /// caller serialises this with [`audit_key`](Self::audit_key) reads that lead to it.
    pub fn write_audit_key(&self, sealed: &[u8], root_key: Option<String>) -> Result<(), StoreError> {
        let rec = KekRecord {
            format: RECORD_FORMAT,
            tenant: self.tenant.to_string(),
            key: AUDIT_KEY_NAME.into(),
            version: AUDIT_KEY_VERSION,
            root: self.root.lock().expect("keystore lock").clone(),
            sealed: B64.encode(sealed),
            parent: None,
            root_key,
        };
        write_json(&self.tenant_dir, AUDIT_KEY_FILE, &rec)
    }

    /// Records the root key history (see [`RootState`]), atomically.
    pub fn set_root_state(&self, state: &RootState, description: String) -> Result<(), StoreError> {
        write_json(&self.tenant_dir, ROOT_STATE, state)?;
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
        write_json(&self.key_dir(name)?, &format!("v{version:010}.json"), &rec)?;
        let mut keys = self.keys.lock().expect("keystore lock");
        if let Some(v) = keys.get_mut(name).and_then(|k| k.versions.get_mut(&version)) {
            v.reserved = upto;
        }
        Ok(())
    }

    fn keys_dir(&self) -> Result<&Dir, StoreError> {
        self.dir
            .as_ref()
            .ok_or_else(|| StoreError::Precondition(format!("tenant {} is destroyed", self.tenant)))
    }

    fn key_dir(&self, name: &KeyName) -> Result<Dir, StoreError> {
        Ok(self.keys_dir()?.open_dir(hex::encode(name.as_str()))?)
    }

    fn write_version(
        &self,
        kdir: &Dir,
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

fn read_json<T: for<'de> Deserialize<'de>>(dir: &Dir, name: &str) -> Result<T, StoreError> {
    let bytes = dir.read(name)?;
    serde_json::from_slice(&bytes)
        .map_err(|e| StoreError::Corrupt { path: dir.child_path(name), problem: e.to_string() })
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

/// The refusal of an entry of the wrong kind: a link, or something else.
fn refuse(dir: &Dir, name: &std::ffi::OsStr, found: EntryKind, expected: Kind) -> StoreError {
    let path = dir.child_path(name);
    match found {
        EntryKind::Symlink => DirError::Link { path, expected },
        _ => DirError::WrongType { path, expected },
    }
    .into()
}

/// Removes a temporary file a crash left behind (it may hold a sealed KEK: shredded).
fn remove_leftover(dir: &Dir, name: &std::ffi::OsStr, kind: EntryKind) -> Result<(), StoreError> {
    match kind {
        EntryKind::File => Ok(dir.shred(name)?),
        other => Err(refuse(dir, name, other, Kind::File)),
    }
}

/// Loads one key directory; None if it held a key whose creation never completed (then
/// its records have been shredded and removed, and the caller removes the directory).
fn load_key(kdir: &Dir, tenant: &TenantName, name: &KeyName) -> Result<Option<Key>, StoreError> {
    let corrupt = |path: PathBuf, problem: String| StoreError::Corrupt { path, problem };
    let mut files: BTreeMap<u32, (bool, bool)> = BTreeMap::new();
    let mut has_key = false;
    for entry in kdir.entries()? {
        let fname = entry.name.to_string_lossy().into_owned();
        if fname.starts_with(".tmp") {
            remove_leftover(kdir, &entry.name, entry.kind)?;
            continue;
        }
        if entry.kind != EntryKind::File {
            return Err(refuse(kdir, &entry.name, entry.kind, Kind::File));
        }
        if fname == "key.json" {
            has_key = true;
            continue;
        }
        let parsed = fname
            .strip_prefix('v')
            .and_then(|r| r.split_once('.'))
            .and_then(|(n, ext)| Some((n.parse::<u32>().ok()?, ext.to_owned())));
        match parsed {
            Some((v, ext)) if ext == "kek" => files.entry(v).or_default().0 = true,
            Some((v, ext)) if ext == "json" => files.entry(v).or_default().1 = true,
            _ => {
                return Err(corrupt(kdir.child_path(&entry.name), "unexpected file in key directory".into()))
            }
        }
    }
    let kek_name = |v: u32| format!("v{v:010}.kek");
    let state_name = |v: u32| format!("v{v:010}.json");
    if !has_key {
        // Creation was cut short before its commit point: nothing ever used this key.
        for (&v, &(kek, state)) in &files {
            if kek {
                kdir.shred(kek_name(v))?;
            }
            if state {
                drop(kdir.open_file(state_name(v))?);
                kdir.remove(state_name(v))?;
            }
        }
        kdir.sync()?;
        return Ok(None);
    }
    let key_path = kdir.child_path("key.json");
    let rec: KeyRecord = read_json(kdir, "key.json")?;
    check_format(&key_path, rec.format)?;
    if rec.tenant != tenant.as_str() || rec.key != name.as_str() {
        return Err(corrupt(key_path, "record belongs to another tenant or key".into()));
    }
    let mut versions = BTreeMap::new();
    for (v, (has_kek, has_state)) in files {
        let (k, s) = (kek_name(v), state_name(v));
        if !has_state {
            // A .kek without state: a rotation cut short before its state was written.
            // It was never active; shred it so the number can be reused.
            kdir.shred(&k)?;
            continue;
        }
        let state_path = kdir.child_path(&s);
        let st: StateRecord = read_json(kdir, &s)?;
        check_format(&state_path, st.format)?;
        if st.version != v {
            return Err(corrupt(
                state_path,
                format!("holds version {} in the file of version {v}", st.version),
            ));
        }
        let mut by = SealedBy::Root(None);
        let kek_path = kdir.child_path(&k);
        let sealed = match (st.state, has_kek) {
            (StoredState::Destroyed, true) => {
                kdir.shred(&k)?;
                kdir.sync()?;
                None
            }
            (StoredState::Destroyed, false) => None,
            (_, false) => return Err(corrupt(state_path, "the sealed KEK record is missing".into())),
            (_, true) => {
                let kek: KekRecord = read_json(kdir, &k)?;
                check_format(&kek_path, kek.format)?;
                if kek.tenant != tenant.as_str() || kek.key != name.as_str() || kek.version != v {
                    return Err(corrupt(kek_path, "record belongs to another tenant, key or version".into()));
                }
                let sealed =
                    B64.decode(&kek.sealed).map_err(|e| corrupt(kek_path.clone(), format!("sealed: {e}")))?;
                by = match (kek.parent, kek.root_key) {
                    (Some(p), None) => SealedBy::Parent(
                        KeyName::parse(&p.key)
                            .map_err(|e| corrupt(kek_path.clone(), format!("parent key: {e}")))?,
                        p.version,
                    ),
                    (None, label) => SealedBy::Root(label),
                    (Some(_), Some(_)) => {
                        return Err(corrupt(kek_path, "both a parent and a root key".into()))
                    }
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
        return Err(corrupt(key_path, format!("active version {} has no record", rec.active_version)));
    }
    Ok(Some(Key {
        active: rec.active_version,
        created_unix: rec.created_unix,
        min_decrypt_version: rec.min_decrypt_version,
        keep_versions: rec.keep_versions,
        versions,
    }))
}

fn write_json<T: Serialize>(dir: &Dir, name: &str, value: &T) -> Result<(), StoreError> {
    let mut bytes = serde_json::to_vec_pretty(value).expect("records serialise");
    bytes.push(b'\n');
    Ok(dir.write_atomic(name, &bytes, RECORD_MODE)?)
}

/// Writes `dir/name` atomically (temp file, fsync, rename, fsync dir), without following
/// a link at `name`; `dir` itself must be a directory kekd's user or root owns alone.
pub fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), StoreError> {
    Ok(Dir::open_configured(dir, 0o700)?.write_atomic(name, bytes, RECORD_MODE)?)
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    /// Where a key's records are, on disk.
    fn key_path(state_dir: &Path, t: &TenantName, k: &KeyName) -> PathBuf {
        state_dir.join("tenants").join(t.as_str()).join("keys").join(hex::encode(k.as_str()))
    }

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
        let kdir = key_path(dir.path(), &t, &k);
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
        let kdir = key_path(dir.path(), &t, &k);
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
        write_json(&Dir::open_configured(&kdir, 0o700).unwrap(), "v0000000003.json", &st).unwrap();
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
        let kdir = key_path(dir.path(), &t, &k);
        drop(s);
        fs::write(kdir.join("key.json"), b"{not json").unwrap();
        let err = KeyStore::open(dir.path(), &t, "r".into()).err().unwrap();
        assert!(matches!(&err, StoreError::Corrupt { path, .. } if path.ends_with("key.json")), "{err}");
        // A record copied from another tenant is refused.
        let other = TenantName::parse("other").unwrap();
        let s2 = open(dir.path(), &other);
        s2.create_key(&k, b"x".to_vec()).unwrap();
        let okdir = key_path(dir.path(), &other, &k);
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
    fn the_audit_key_record_is_a_kek_record_that_outlives_the_tenant() {
        let (dir, t, k) = setup();
        let s = open(dir.path(), &t);
        s.create_key(&k, b"sealed-1".to_vec()).unwrap();
        assert!(s.audit_key().unwrap().is_none());
        s.write_audit_key(b"sealed-audit", None).unwrap();
        let path = dir.path().join("tenants/acme/audit.kek");
        let rec: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        assert_eq!(
            rec,
            serde_json::json!({
                "format": 1, "tenant": "acme", "key": "@audit", "version": 1,
                "root": "test-root", "sealed": B64.encode(b"sealed-audit"),
            })
        );
        s.write_audit_key(b"rewrapped", Some("root-2".into())).unwrap();
        s.destroy_tenant().unwrap();
        drop(s);
        let s = open(dir.path(), &t);
        let key = s.audit_key().unwrap().expect("kept by the tenant's destruction");
        assert_eq!((key.sealed.as_slice(), key.root_key.as_deref()), (&b"rewrapped"[..], Some("root-2")));
        // Another tenant's record, or a KEK record, is not this tenant's checkpoint key.
        let other = TenantName::parse("other").unwrap();
        let [_, _, other_dir] = open_tenant_dir(dir.path(), &other).unwrap();
        assert!(matches!(read_audit_key(&other_dir, &other), Ok(None)));
        fs::copy(&path, dir.path().join("tenants/other/audit.kek")).unwrap();
        assert!(matches!(read_audit_key(&other_dir, &other), Err(StoreError::Corrupt { .. })));
    }

    #[test]
    fn a_tenant_destruction_cut_short_is_finished_on_open() {
        let (dir, t, k) = setup();
        let s = open(dir.path(), &t);
        s.create_key(&k, b"sealed-bytes".to_vec()).unwrap();
        let tenant_dir = dir.path().join("tenants/acme");
        // The commit point and nothing after it: a crash right after the tombstone.
        let stone = Tombstone { format: 1, tenant: "acme".into(), destroyed_unix: 7 };
        write_json(&Dir::open_configured(&tenant_dir, 0o700).unwrap(), TOMBSTONE, &stone).unwrap();
        drop(s);
        let s = open(dir.path(), &t);
        assert_eq!(s.destroyed(), Some(7));
        assert_eq!(s.len(), 0);
        assert!(!tenant_dir.join("keys").exists(), "the shredding was finished");
    }
}
