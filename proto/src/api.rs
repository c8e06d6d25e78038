//! Validated native types and their conversion from and to the wire.
//!
//! Parse, don't validate: once a request is a [`Request`], every name has been checked,
//! every secret sits in a zeroizing buffer, and every batch is within its limits. The
//! daemon below this layer never sees a prost type.

use std::collections::BTreeMap;
use std::fmt;

use zeroize::Zeroizing;

use crate::pb;

pub use pb::Code;

/// Protocol version spoken by this crate (sent in `Hello`).
pub const PROTOCOL_VERSION: u32 = 1;
/// Length of a generated data key.
pub const DEK_LEN: usize = 32;
/// Largest caller secret accepted by `Wrap`.
pub const MAX_SECRET_LEN: usize = 4096;
/// Largest EDEK accepted: header with the longest key name, plus the largest secret and tag.
pub const MAX_EDEK_LEN: usize = 2 + 2 + MAX_KEY_NAME_LEN + 4 + 12 + MAX_SECRET_LEN + 16;
/// Largest number of items in one batch.
pub const MAX_BATCH: usize = 4096;
pub const MAX_KEY_NAME_LEN: usize = 128;
pub const MAX_TENANT_LEN: usize = 64;
pub const MAX_CONTEXT_ENTRIES: usize = 64;
pub const MAX_CONTEXT_KEY_LEN: usize = 256;
pub const MAX_CONTEXT_VALUE_LEN: usize = 1024;

/// A request that failed validation; the message names the offending field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct InvalidField {
    pub field: String,
    pub problem: String,
}

impl InvalidField {
    pub fn new(field: impl Into<String>, problem: impl Into<String>) -> Self {
        Self { field: field.into(), problem: problem.into() }
    }
}

/// A tenant name: 1–64 of `[a-z0-9_-]`, starting with a letter or digit. It becomes a
/// directory name, so the charset is deliberately narrow.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TenantName(String);

impl TenantName {
    pub fn parse(s: &str) -> Result<Self, String> {
        let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-';
        if s.is_empty() || s.len() > MAX_TENANT_LEN {
            return Err(format!("must be 1 to {MAX_TENANT_LEN} characters"));
        }
        if !s.chars().all(ok_char) || !s.starts_with(|c: char| c.is_ascii_alphanumeric()) {
            return Err("may contain only a-z, 0-9, '_' and '-', starting with a letter or digit".into());
        }
        Ok(Self(s.to_owned()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TenantName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A KEK name: `/`-separated segments of `[A-Za-z0-9._-]`, at most 128 bytes. Segments
/// leave room for key chains (`billing/invoices`). Shared, not copied, when cloned: a
/// batch names its key once per item in answers and audit records.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KeyName(std::sync::Arc<str>);

impl KeyName {
    pub fn parse(s: &str) -> Result<Self, String> {
        if s.is_empty() || s.len() > MAX_KEY_NAME_LEN {
            return Err(format!("must be 1 to {MAX_KEY_NAME_LEN} bytes"));
        }
        let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
        for seg in s.split('/') {
            if seg.is_empty() || seg == "." || seg == ".." || !seg.chars().all(ok_char) {
                return Err("must be '/'-separated segments of A-Z, a-z, 0-9, '.', '_' and '-'".into());
            }
        }
        Ok(Self(s.into()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for KeyName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The caller's encryption context, bound into the EDEK's AAD. Sorted by key, so its
/// canonical encoding does not depend on the order the caller gave.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Context(BTreeMap<String, String>);

impl Context {
    pub fn new(map: BTreeMap<String, String>) -> Result<Self, String> {
        if map.len() > MAX_CONTEXT_ENTRIES {
            return Err(format!("more than {MAX_CONTEXT_ENTRIES} entries"));
        }
        for (k, v) in &map {
            if k.is_empty() || k.len() > MAX_CONTEXT_KEY_LEN {
                return Err(format!("key must be 1 to {MAX_CONTEXT_KEY_LEN} bytes"));
            }
            if v.len() > MAX_CONTEXT_VALUE_LEN {
                return Err(format!("value of {k:?} is longer than {MAX_CONTEXT_VALUE_LEN} bytes"));
            }
        }
        Ok(Self(map))
    }

    pub fn entries(&self) -> &BTreeMap<String, String> {
        &self.0
    }

    /// Canonical form for the AAD: u16 count, then each (key, value) sorted by key, every
    /// string prefixed by its u16 big-endian length.
    pub fn encode_canonical(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&(self.0.len() as u16).to_be_bytes());
        for (k, v) in &self.0 {
            put_str16(out, k);
            put_str16(out, v);
        }
    }
}

/// Appends a string with its u16 big-endian length: the one string encoding of every AAD.
pub fn put_str16(out: &mut Vec<u8>, s: &str) {
    debug_assert!(s.len() <= u16::MAX as usize);
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// Secret bytes (a DEK or a caller's secret) in transit: wiped on drop, never printed,
/// never cloned by accident.
pub struct Secret(Zeroizing<Vec<u8>>);

impl Secret {
    pub fn new(bytes: Zeroizing<Vec<u8>>) -> Self {
        Self(bytes)
    }
    pub fn from_vec(bytes: Vec<u8>) -> Self {
        Self(Zeroizing::new(bytes))
    }
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    /// Hands the buffer to the wire encoder; the caller must wipe the encoded frame.
    fn into_wire(mut self) -> Vec<u8> {
        std::mem::take(&mut *self.0)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret([{} bytes redacted])", self.0.len())
    }
}

/// Caller-supplied audit metadata.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Metadata {
    pub principal: String,
    pub data_label: String,
    pub caller_request_id: String,
    pub source_address: String,
    pub fields: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub protocol_version: u32,
    pub tenant: TenantName,
    pub client_name: String,
}

#[derive(Debug)]
pub struct WrapItem {
    pub plaintext: Secret,
    pub context: Context,
}

#[derive(Debug, Clone)]
pub struct EdekItem {
    pub edek: Vec<u8>,
    pub context: Context,
}

/// The version states a caller can request; `Active` is reached only through rotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetState {
    DecryptOnly,
    Disabled,
    Destroyed,
}

#[derive(Debug)]
pub enum Op {
    Hello(Hello),
    Generate {
        key: KeyName,
        edek_only: bool,
        contexts: Vec<Context>,
    },
    Wrap {
        key: KeyName,
        items: Vec<WrapItem>,
    },
    Unwrap(Vec<EdekItem>),
    Rewrap(Vec<EdekItem>),
    Status,
    CreateKey(KeyName),
    RotateKey(KeyName),
    SetVersionState {
        key: KeyName,
        version: u32,
        state: TargetState,
    },
    ListKeys,
    /// Changes a key's version controls; `None` keeps the current value.
    SetKeyPolicy {
        key: KeyName,
        min_decrypt_version: Option<u32>,
        keep_versions: Option<u32>,
    },
    /// Crypto-shreds the whole tenant; `confirm` must be the connection's tenant.
    DestroyTenant {
        confirm: TenantName,
    },
    /// Rotates the tenant's root key to the one labelled `label` (created or adopted);
    /// `None`: a generated label.
    RotateRoot {
        label: Option<String>,
    },
    /// BYOK step 1: the transport public key for a root key to be imported as `label`.
    RootImportKey {
        label: String,
    },
    /// BYOK step 2: imports wrapped key material as the root key `label` and rotates to it.
    RootImport {
        label: String,
        algorithm: String,
        wrapped: Vec<u8>,
    },
}

impl Op {
    /// Every operation's [`Op::name`], in a fixed order: [`Op::index`] is a position in it.
    pub const NAMES: [&'static str; 15] = [
        "hello",
        "generate",
        "wrap",
        "unwrap",
        "rewrap",
        "status",
        "create_key",
        "rotate_key",
        "set_key_version_state",
        "list_keys",
        "set_key_policy",
        "destroy_tenant",
        "rotate_root",
        "root_import_key",
        "root_import",
    ];

    /// This operation's position in [`Op::NAMES`], e.g. to count operations in an array.
    pub fn index(&self) -> usize {
        match self {
            Op::Hello(_) => 0,
            Op::Generate { .. } => 1,
            Op::Wrap { .. } => 2,
            Op::Unwrap(_) => 3,
            Op::Rewrap(_) => 4,
            Op::Status => 5,
            Op::CreateKey(_) => 6,
            Op::RotateKey(_) => 7,
            Op::SetVersionState { .. } => 8,
            Op::ListKeys => 9,
            Op::SetKeyPolicy { .. } => 10,
            Op::DestroyTenant { .. } => 11,
            Op::RotateRoot { .. } => 12,
            Op::RootImportKey { .. } => 13,
            Op::RootImport { .. } => 14,
        }
    }

    /// Items of a batch operation (generate, wrap, unwrap, rewrap); 0 for the others.
    pub fn batch_len(&self) -> usize {
        match self {
            Op::Generate { contexts, .. } => contexts.len(),
            Op::Wrap { items, .. } => items.len(),
            Op::Unwrap(items) | Op::Rewrap(items) => items.len(),
            _ => 0,
        }
    }

    /// Operation name as used in logs and audit records.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Hello(_) => "hello",
            Op::Generate { .. } => "generate",
            Op::Wrap { .. } => "wrap",
            Op::Unwrap(_) => "unwrap",
            Op::Rewrap(_) => "rewrap",
            Op::Status => "status",
            Op::CreateKey(_) => "create_key",
            Op::RotateKey(_) => "rotate_key",
            Op::SetVersionState { .. } => "set_key_version_state",
            Op::ListKeys => "list_keys",
            Op::SetKeyPolicy { .. } => "set_key_policy",
            Op::DestroyTenant { .. } => "destroy_tenant",
            Op::RotateRoot { .. } => "rotate_root",
            Op::RootImportKey { .. } => "root_import_key",
            Op::RootImport { .. } => "root_import",
        }
    }

    /// Admin operations change the key hierarchy and need an admin principal.
    pub fn is_admin(&self) -> bool {
        matches!(
            self,
            Op::CreateKey(_)
                | Op::RotateKey(_)
                | Op::SetVersionState { .. }
                | Op::ListKeys
                | Op::SetKeyPolicy { .. }
                | Op::DestroyTenant { .. }
                | Op::RotateRoot { .. }
                | Op::RootImportKey { .. }
                | Op::RootImport { .. }
        )
    }
}

#[derive(Debug)]
pub struct Request {
    pub id: u64,
    pub metadata: Metadata,
    pub op: Op,
}

/// Why a request (as a whole) could not be parsed. The request id is kept when it could be
/// read, so the error can still be matched to the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RejectedRequest {
    pub id: u64,
    pub error: InvalidField,
}

/// The context of batch item `i`; the field is named only on error (this runs per item).
fn item_context(i: usize, map: BTreeMap<String, String>) -> Result<Context, InvalidField> {
    Context::new(map).map_err(|p| InvalidField::new(format!("items[{i}].context"), p))
}

fn key_from(field: &str, s: &str) -> Result<KeyName, InvalidField> {
    KeyName::parse(s).map_err(|p| InvalidField::new(field, p))
}

fn check_batch(len: usize) -> Result<(), InvalidField> {
    if len == 0 {
        return Err(InvalidField::new("items", "a batch needs at least one item"));
    }
    if len > MAX_BATCH {
        return Err(InvalidField::new("items", format!("{len} items exceed the limit of {MAX_BATCH}")));
    }
    Ok(())
}

fn edek_items(items: Vec<pb::EdekItem>) -> Result<Vec<EdekItem>, InvalidField> {
    check_batch(items.len())?;
    items
        .into_iter()
        .enumerate()
        .map(|(i, it)| {
            if it.edek.is_empty() || it.edek.len() > MAX_EDEK_LEN {
                return Err(InvalidField::new(
                    format!("items[{i}].edek"),
                    format!("must be 1 to {MAX_EDEK_LEN} bytes"),
                ));
            }
            Ok(EdekItem { edek: it.edek, context: item_context(i, it.context)? })
        })
        .collect()
}

impl TryFrom<pb::Request> for Request {
    type Error = RejectedRequest;

    fn try_from(req: pb::Request) -> Result<Self, RejectedRequest> {
        let id = req.request_id;
        let reject = |error| RejectedRequest { id, error };
        let metadata = match req.metadata {
            None => Metadata::default(),
            Some(m) => Metadata::try_from(m).map_err(reject)?,
        };
        let op = match req.op {
            None => return Err(reject(InvalidField::new("op", "no operation given"))),
            Some(op) => op_from(op).map_err(reject)?,
        };
        Ok(Request { id, metadata, op })
    }
}

fn op_from(op: pb::request::Op) -> Result<Op, InvalidField> {
    use pb::request::Op as P;
    Ok(match op {
        P::Hello(h) => Op::Hello(Hello {
            protocol_version: h.protocol_version,
            tenant: TenantName::parse(&h.tenant).map_err(|p| InvalidField::new("hello.tenant", p))?,
            client_name: h.client_name,
        }),
        P::Generate(g) => {
            check_batch(g.items.len())?;
            let contexts = g
                .items
                .into_iter()
                .enumerate()
                .map(|(i, it)| item_context(i, it.context))
                .collect::<Result<_, _>>()?;
            Op::Generate { key: key_from("key_name", &g.key_name)?, edek_only: g.edek_only, contexts }
        }
        P::Wrap(w) => {
            // Every plaintext goes into a wiping buffer before anything can fail, so a
            // rejected batch leaves no copy of the good items behind.
            let items: Vec<(Secret, BTreeMap<String, String>)> =
                w.items.into_iter().map(|it| (Secret::from_vec(it.plaintext), it.context)).collect();
            check_batch(items.len())?;
            let key = key_from("key_name", &w.key_name)?;
            let items = items
                .into_iter()
                .enumerate()
                .map(|(i, (plaintext, context))| {
                    if plaintext.is_empty() || plaintext.len() > MAX_SECRET_LEN {
                        return Err(InvalidField::new(
                            format!("items[{i}].plaintext"),
                            format!("must be 1 to {MAX_SECRET_LEN} bytes"),
                        ));
                    }
                    Ok(WrapItem { plaintext, context: item_context(i, context)? })
                })
                .collect::<Result<_, _>>()?;
            Op::Wrap { key, items }
        }
        P::Unwrap(u) => Op::Unwrap(edek_items(u.items)?),
        P::Rewrap(r) => Op::Rewrap(edek_items(r.items)?),
        P::Status(_) => Op::Status,
        P::CreateKey(c) => Op::CreateKey(key_from("key_name", &c.key_name)?),
        P::RotateKey(r) => Op::RotateKey(key_from("key_name", &r.key_name)?),
        P::SetKeyVersionState(s) => {
            let state = match pb::VersionState::try_from(s.state) {
                Ok(pb::VersionState::DecryptOnly) => TargetState::DecryptOnly,
                Ok(pb::VersionState::Disabled) => TargetState::Disabled,
                Ok(pb::VersionState::Destroyed) => TargetState::Destroyed,
                _ => {
                    return Err(InvalidField::new(
                        "state",
                        "must be DECRYPT_ONLY, DISABLED or DESTROYED (ACTIVE is set by rotation)",
                    ))
                }
            };
            if s.version == 0 {
                return Err(InvalidField::new("version", "versions start at 1"));
            }
            Op::SetVersionState { key: key_from("key_name", &s.key_name)?, version: s.version, state }
        }
        P::ListKeys(_) => Op::ListKeys,
        P::SetKeyPolicy(p) => Op::SetKeyPolicy {
            key: key_from("key_name", &p.key_name)?,
            min_decrypt_version: p.min_decrypt_version,
            keep_versions: p.keep_versions,
        },
        P::RootImportKey(r) => Op::RootImportKey { label: root_label("new_key_label", r.new_key_label)? },
        P::RootImport(r) => {
            if r.wrapped.is_empty() || r.wrapped.len() > 4096 {
                return Err(InvalidField::new("wrapped", "must be 1 to 4096 bytes"));
            }
            Op::RootImport {
                label: root_label("new_key_label", r.new_key_label)?,
                algorithm: r.algorithm,
                wrapped: r.wrapped,
            }
        }
        P::RotateRoot(r) => {
            let label = r.new_key_label;
            if label.len() > 128 || label.chars().any(char::is_control) {
                return Err(InvalidField::new(
                    "new_key_label",
                    "must be at most 128 characters, none of them control characters",
                ));
            }
            Op::RotateRoot { label: (!label.is_empty()).then_some(label) }
        }
        P::DestroyTenant(d) => Op::DestroyTenant {
            confirm: TenantName::parse(&d.confirm_tenant)
                .map_err(|e| InvalidField::new("confirm_tenant", e))?,
        },
    })
}

/// A root key label: 1 to 128 characters, no control characters.
fn root_label(field: &'static str, label: String) -> Result<String, InvalidField> {
    if label.is_empty() || label.len() > 128 || label.chars().any(char::is_control) {
        return Err(InvalidField::new(field, "must be 1 to 128 characters, none of them control characters"));
    }
    Ok(label)
}

/// Longest value of each named metadata field, in bytes.
pub const MAX_METADATA_VALUE: usize = 256;
/// Most bytes of free-form metadata fields, keys and values together.
pub const MAX_METADATA_FIELDS: usize = 1024;

/// Metadata is written into every audit record of a request, so it is bounded.
impl TryFrom<pb::AuditMetadata> for Metadata {
    type Error = InvalidField;

    fn try_from(m: pb::AuditMetadata) -> Result<Self, InvalidField> {
        for (name, value) in [
            ("principal", &m.principal),
            ("data_label", &m.data_label),
            ("caller_request_id", &m.caller_request_id),
            ("source_address", &m.source_address),
        ] {
            if value.len() > MAX_METADATA_VALUE {
                return Err(InvalidField::new(
                    format!("metadata.{name}"),
                    format!("{} bytes; at most {MAX_METADATA_VALUE}", value.len()),
                ));
            }
        }
        let size: usize = m.fields.iter().map(|(k, v)| k.len() + v.len()).sum();
        if size > MAX_METADATA_FIELDS {
            return Err(InvalidField::new(
                "metadata.fields",
                format!("{size} bytes of keys and values; at most {MAX_METADATA_FIELDS} (1 KiB)"),
            ));
        }
        Ok(Metadata {
            principal: m.principal,
            data_label: m.data_label,
            caller_request_id: m.caller_request_id,
            source_address: m.source_address,
            fields: m.fields,
        })
    }
}

impl From<Metadata> for pb::AuditMetadata {
    fn from(m: Metadata) -> Self {
        pb::AuditMetadata {
            principal: m.principal,
            data_label: m.data_label,
            caller_request_id: m.caller_request_id,
            source_address: m.source_address,
            fields: m.fields,
        }
    }
}

/// Client side: a native request into its wire form.
impl From<Request> for pb::Request {
    fn from(r: Request) -> Self {
        use pb::request::Op as P;
        let ctx = |c: Context| c.0;
        let edeks = |items: Vec<EdekItem>| {
            items.into_iter().map(|it| pb::EdekItem { edek: it.edek, context: ctx(it.context) }).collect()
        };
        let op = match r.op {
            Op::Hello(h) => P::Hello(pb::Hello {
                protocol_version: h.protocol_version,
                tenant: h.tenant.0,
                client_name: h.client_name,
            }),
            Op::Generate { key, edek_only, contexts } => P::Generate(pb::GenerateDataKeyRequest {
                key_name: key.0.to_string(),
                edek_only,
                items: contexts.into_iter().map(|c| pb::GenerateItem { context: ctx(c) }).collect(),
            }),
            Op::Wrap { key, items } => P::Wrap(pb::WrapRequest {
                key_name: key.0.to_string(),
                items: items
                    .into_iter()
                    .map(|it| pb::WrapItem { plaintext: it.plaintext.into_wire(), context: ctx(it.context) })
                    .collect(),
            }),
            Op::Unwrap(items) => P::Unwrap(pb::UnwrapRequest { items: edeks(items) }),
            Op::Rewrap(items) => P::Rewrap(pb::RewrapRequest { items: edeks(items) }),
            Op::Status => P::Status(pb::StatusRequest {}),
            Op::CreateKey(k) => P::CreateKey(pb::CreateKeyRequest { key_name: k.0.to_string() }),
            Op::RotateKey(k) => P::RotateKey(pb::RotateKeyRequest { key_name: k.0.to_string() }),
            Op::SetVersionState { key, version, state } => {
                P::SetKeyVersionState(pb::SetKeyVersionStateRequest {
                    key_name: key.0.to_string(),
                    version,
                    state: match state {
                        TargetState::DecryptOnly => pb::VersionState::DecryptOnly,
                        TargetState::Disabled => pb::VersionState::Disabled,
                        TargetState::Destroyed => pb::VersionState::Destroyed,
                    } as i32,
                })
            }
            Op::ListKeys => P::ListKeys(pb::ListKeysRequest {}),
            Op::SetKeyPolicy { key, min_decrypt_version, keep_versions } => {
                P::SetKeyPolicy(pb::SetKeyPolicyRequest {
                    key_name: key.0.to_string(),
                    min_decrypt_version,
                    keep_versions,
                })
            }
            Op::DestroyTenant { confirm } => {
                P::DestroyTenant(pb::DestroyTenantRequest { confirm_tenant: confirm.0 })
            }
            Op::RotateRoot { label } => {
                P::RotateRoot(pb::RotateRootRequest { new_key_label: label.unwrap_or_default() })
            }
            Op::RootImportKey { label } => {
                P::RootImportKey(pb::RootImportKeyRequest { new_key_label: label })
            }
            Op::RootImport { label, algorithm, wrapped } => {
                P::RootImport(pb::RootImportRequest { new_key_label: label, algorithm, wrapped })
            }
        };
        pb::Request { request_id: r.id, metadata: Some(r.metadata.into()), op: Some(op) }
    }
}

// ---------------------------------------------------------------------------------------
// Responses

/// An error as the client sees it: a code and a message that never holds key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {message}", code_name(*code))]
pub struct ErrorStatus {
    pub code: Code,
    pub message: String,
}

impl ErrorStatus {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Self { code, message: message.into() }
    }
}

impl From<InvalidField> for ErrorStatus {
    fn from(e: InvalidField) -> Self {
        ErrorStatus::new(Code::InvalidArgument, e.to_string())
    }
}

/// The wire name of a code, as printed by `kekctl` and in logs.
pub fn code_name(code: Code) -> &'static str {
    code.as_str_name()
}

/// One item of a batch that succeeded.
#[derive(Debug)]
pub struct ItemOk {
    pub plaintext: Option<Secret>,
    pub edek: Option<Vec<u8>>,
    pub key: KeyName,
    pub version: u32,
}

pub type ItemResult = Result<ItemOk, ErrorStatus>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VersionState {
    Active,
    DecryptOnly,
    Disabled,
    Destroyed,
}

impl VersionState {
    pub fn as_str(self) -> &'static str {
        match self {
            VersionState::Active => "active",
            VersionState::DecryptOnly => "decrypt-only",
            VersionState::Disabled => "disabled",
            VersionState::Destroyed => "destroyed",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionInfo {
    pub version: u32,
    pub state: VersionState,
    pub created_unix: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyInfo {
    pub name: KeyName,
    pub active_version: u32,
    pub versions: Vec<VersionInfo>,
    /// Versions below it are refused for decryption; 0: none.
    pub min_decrypt_version: u32,
    /// Versions older than the newest `keep_versions` are destroyed at rotation; 0: all kept.
    pub keep_versions: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusInfo {
    pub tenant: TenantName,
    pub backend: String,
    pub backend_healthy: bool,
    pub backend_error: String,
    pub cached_keks: u32,
    pub keys: u32,
    pub uptime_seconds: u64,
    pub memory_locked: bool,
    /// The worker process serving this tenant.
    pub worker_pid: u32,
    /// `online`, `grace` or `expired`: the root key as the KEK cache sees it.
    pub lease: String,
    /// Every key and its versions; empty unless the caller is an admin.
    pub key_versions: Vec<KeyInfo>,
    /// Requests served since the worker started, per operation (those with any).
    pub operations: Vec<OpCount>,
    /// Error answers since the worker started, per code (those that occurred).
    pub errors: Vec<ErrorCount>,
    /// What the tenant's configuration excused in its root key (`allow_exportable_root`),
    /// one line per attribute; empty for a root key that stays in its HSM.
    pub root_key_exceptions: Vec<String>,
}

/// The requests of one operation a worker served, failed ones included.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpCount {
    /// [`Op::name`].
    pub operation: String,
    pub requests: u64,
    /// Batch items in those requests; 0 for operations without items.
    pub items: u64,
}

/// The answers with one error code: whole requests, and items of batches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorCount {
    pub code: Code,
    pub requests: u64,
    pub items: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelloOk {
    pub protocol_version: u32,
    pub tenant: TenantName,
    pub admin: bool,
}

#[derive(Debug)]
pub enum Reply {
    Hello(HelloOk),
    Batch(Vec<ItemResult>),
    Status(StatusInfo),
    Key(KeyInfo),
    Keys(Vec<KeyInfo>),
    /// How many keys and KEK versions a tenant destruction shredded.
    TenantDestroyed {
        keys: u32,
        versions_shredded: u32,
    },
    /// The root key now active, and how many KEK records were rewrapped under it.
    RootRotated {
        active: String,
        rewrapped: u32,
    },
    /// BYOK: the transport public key to wrap the customer's key material to.
    TransportKey {
        label: String,
        pem: String,
        sha256: String,
        bits: u32,
        algorithms: Vec<String>,
    },
}

#[derive(Debug)]
pub struct Response {
    pub id: u64,
    pub result: Result<Reply, ErrorStatus>,
}

fn status_pb(code: Code, message: String) -> Option<pb::Status> {
    Some(pb::Status { code: code as i32, message })
}

fn version_state_pb(s: VersionState) -> pb::VersionState {
    match s {
        VersionState::Active => pb::VersionState::Active,
        VersionState::DecryptOnly => pb::VersionState::DecryptOnly,
        VersionState::Disabled => pb::VersionState::Disabled,
        VersionState::Destroyed => pb::VersionState::Destroyed,
    }
}

impl From<KeyInfo> for pb::KeyInfo {
    fn from(k: KeyInfo) -> Self {
        pb::KeyInfo {
            name: k.name.0.to_string(),
            active_version: k.active_version,
            versions: k
                .versions
                .into_iter()
                .map(|v| pb::VersionInfo {
                    version: v.version,
                    state: version_state_pb(v.state) as i32,
                    created_unix: v.created_unix,
                })
                .collect(),
            min_decrypt_version: k.min_decrypt_version,
            keep_versions: k.keep_versions,
        }
    }
}

/// Daemon side: a native response into its wire form. Plaintexts move into the message;
/// the caller wipes the encoded frame.
impl From<Response> for pb::Response {
    fn from(r: Response) -> Self {
        use pb::response::Result as R;
        let (status, result) = match r.result {
            Err(e) => (status_pb(e.code, e.message), None),
            Ok(reply) => (
                status_pb(Code::Ok, String::new()),
                Some(match reply {
                    Reply::Hello(h) => R::Hello(pb::HelloOk {
                        protocol_version: h.protocol_version,
                        tenant: h.tenant.0,
                        admin: h.admin,
                    }),
                    Reply::Batch(items) => R::Batch(pb::BatchResponse {
                        items: items
                            .into_iter()
                            .map(|it| match it {
                                Ok(ok) => pb::ItemResult {
                                    status: status_pb(Code::Ok, String::new()),
                                    plaintext: ok.plaintext.map(Secret::into_wire).unwrap_or_default(),
                                    edek: ok.edek.unwrap_or_default(),
                                    key_name: ok.key.0.to_string(),
                                    key_version: ok.version,
                                },
                                Err(e) => pb::ItemResult {
                                    status: status_pb(e.code, e.message),
                                    ..Default::default()
                                },
                            })
                            .collect(),
                    }),
                    Reply::Status(s) => R::StatusInfo(pb::StatusResponse {
                        tenant: s.tenant.0,
                        backend: s.backend,
                        backend_healthy: s.backend_healthy,
                        backend_error: s.backend_error,
                        cached_keks: s.cached_keks,
                        keys: s.keys,
                        uptime_seconds: s.uptime_seconds,
                        memory_locked: s.memory_locked,
                        worker_pid: s.worker_pid,
                        lease: s.lease,
                        root_key_exceptions: s.root_key_exceptions,
                        key_versions: s.key_versions.into_iter().map(Into::into).collect(),
                        operations: s
                            .operations
                            .into_iter()
                            .map(|o| pb::OperationCount {
                                operation: o.operation,
                                requests: o.requests,
                                items: o.items,
                            })
                            .collect(),
                        errors: s
                            .errors
                            .into_iter()
                            .map(|e| pb::ErrorCount {
                                code: e.code as i32,
                                requests: e.requests,
                                items: e.items,
                            })
                            .collect(),
                    }),
                    Reply::Key(k) => R::Key(k.into()),
                    Reply::TenantDestroyed { keys, versions_shredded } => {
                        R::TenantDestroyed(pb::TenantDestroyed { keys, versions_shredded })
                    }
                    Reply::RootRotated { active, rewrapped } => {
                        R::RootRotated(pb::RootRotated { active_key_label: active, rewrapped })
                    }
                    Reply::TransportKey { label, pem, sha256, bits, algorithms } => {
                        R::TransportKey(pb::TransportKey { label, pem, sha256, bits, algorithms })
                    }
                    Reply::Keys(ks) => {
                        R::Keys(pb::ListKeysResponse { keys: ks.into_iter().map(Into::into).collect() })
                    }
                }),
            ),
        };
        pb::Response { request_id: r.id, status, result }
    }
}

/// Daemon side: appends `r` as one frame to `out`, then wipes the plaintexts the wire
/// message held. Converting moves each plaintext out of its [`Secret`] into a plain
/// `Vec` inside the prost message; dropping that message unwiped would leave data keys
/// in freed memory. The caller wipes `out` after writing it.
pub fn encode_response(r: Response, out: &mut Vec<u8>) {
    let mut msg = pb::Response::from(r);
    crate::frame::encode_frame(&msg, out);
    wipe_plaintexts(&mut msg);
}

/// Client side: appends `r` as one frame to `out`, then wipes the plaintexts (`Wrap`
/// secrets) the wire message held, for the same reason as [`encode_response`].
pub fn encode_request(r: Request, out: &mut Vec<u8>) {
    use zeroize::Zeroize;
    let mut msg = pb::Request::from(r);
    crate::frame::encode_frame(&msg, out);
    if let Some(pb::request::Op::Wrap(w)) = &mut msg.op {
        for item in &mut w.items {
            item.plaintext.zeroize();
        }
    }
}

fn wipe_plaintexts(msg: &mut pb::Response) {
    use zeroize::Zeroize;
    if let Some(pb::response::Result::Batch(b)) = &mut msg.result {
        for item in &mut b.items {
            item.plaintext.zeroize();
        }
    }
}

/// A response from the daemon that does not follow the protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed response from kekd: {0}")]
pub struct MalformedResponse(pub String);

fn status_from(s: Option<pb::Status>) -> Result<(), ErrorStatus> {
    let s = s.unwrap_or_default();
    match Code::try_from(s.code) {
        Ok(Code::Ok) => Ok(()),
        Ok(code) => Err(ErrorStatus::new(code, s.message)),
        Err(_) => {
            Err(ErrorStatus::new(Code::Internal, format!("unknown status code {}: {}", s.code, s.message)))
        }
    }
}

fn key_info_from(k: pb::KeyInfo) -> Result<KeyInfo, MalformedResponse> {
    Ok(KeyInfo {
        name: KeyName::parse(&k.name).map_err(|e| MalformedResponse(format!("key name: {e}")))?,
        active_version: k.active_version,
        versions: k
            .versions
            .into_iter()
            .map(|v| {
                let state = match pb::VersionState::try_from(v.state) {
                    Ok(pb::VersionState::Active) => VersionState::Active,
                    Ok(pb::VersionState::DecryptOnly) => VersionState::DecryptOnly,
                    Ok(pb::VersionState::Disabled) => VersionState::Disabled,
                    Ok(pb::VersionState::Destroyed) => VersionState::Destroyed,
                    _ => return Err(MalformedResponse(format!("version state {}", v.state))),
                };
                Ok(VersionInfo { version: v.version, state, created_unix: v.created_unix })
            })
            .collect::<Result<_, _>>()?,
        min_decrypt_version: k.min_decrypt_version,
        keep_versions: k.keep_versions,
    })
}

/// Client side: a wire response into its native form.
impl TryFrom<pb::Response> for Response {
    type Error = MalformedResponse;

    fn try_from(r: pb::Response) -> Result<Self, MalformedResponse> {
        use pb::response::Result as R;
        let id = r.request_id;
        if let Err(e) = status_from(r.status) {
            return Ok(Response { id, result: Err(e) });
        }
        let tenant = |t: &str| TenantName::parse(t).map_err(|e| MalformedResponse(format!("tenant: {e}")));
        let reply = match r.result {
            None => return Err(MalformedResponse("OK response without a result".into())),
            Some(R::Hello(h)) => Reply::Hello(HelloOk {
                protocol_version: h.protocol_version,
                tenant: tenant(&h.tenant)?,
                admin: h.admin,
            }),
            Some(R::Batch(b)) => {
                // The items of a batch almost always name one key: parse it once.
                let mut last: Option<KeyName> = None;
                let mut key_of = |name: &str| -> Result<KeyName, ErrorStatus> {
                    match &last {
                        Some(k) if k.as_str() == name => Ok(k.clone()),
                        _ => {
                            let k = KeyName::parse(name).map_err(|e| {
                                ErrorStatus::new(
                                    Code::Internal,
                                    format!("malformed key name in response: {e}"),
                                )
                            })?;
                            last = Some(k.clone());
                            Ok(k)
                        }
                    }
                };
                Reply::Batch(
                    b.items
                        .into_iter()
                        .map(|it| {
                            status_from(it.status)?;
                            let key = key_of(&it.key_name)?;
                            Ok(ItemOk {
                                plaintext: (!it.plaintext.is_empty()).then(|| Secret::from_vec(it.plaintext)),
                                edek: (!it.edek.is_empty()).then_some(it.edek),
                                key,
                                version: it.key_version,
                            })
                        })
                        .collect(),
                )
            }
            Some(R::StatusInfo(s)) => Reply::Status(StatusInfo {
                tenant: tenant(&s.tenant)?,
                backend: s.backend,
                backend_healthy: s.backend_healthy,
                backend_error: s.backend_error,
                cached_keks: s.cached_keks,
                keys: s.keys,
                uptime_seconds: s.uptime_seconds,
                memory_locked: s.memory_locked,
                worker_pid: s.worker_pid,
                lease: s.lease,
                root_key_exceptions: s.root_key_exceptions,
                key_versions: s.key_versions.into_iter().map(key_info_from).collect::<Result<_, _>>()?,
                operations: s
                    .operations
                    .into_iter()
                    .map(|o| OpCount { operation: o.operation, requests: o.requests, items: o.items })
                    .collect(),
                errors: s
                    .errors
                    .into_iter()
                    .map(|e| {
                        let code = Code::try_from(e.code)
                            .map_err(|_| MalformedResponse(format!("error count for code {}", e.code)))?;
                        Ok(ErrorCount { code, requests: e.requests, items: e.items })
                    })
                    .collect::<Result<_, MalformedResponse>>()?,
            }),
            Some(R::Key(k)) => Reply::Key(key_info_from(k)?),
            Some(R::TransportKey(t)) => Reply::TransportKey {
                label: t.label,
                pem: t.pem,
                sha256: t.sha256,
                bits: t.bits,
                algorithms: t.algorithms,
            },
            Some(R::RootRotated(r)) => {
                Reply::RootRotated { active: r.active_key_label, rewrapped: r.rewrapped }
            }
            Some(R::TenantDestroyed(d)) => {
                Reply::TenantDestroyed { keys: d.keys, versions_shredded: d.versions_shredded }
            }
            Some(R::Keys(ks)) => {
                Reply::Keys(ks.keys.into_iter().map(key_info_from).collect::<Result<_, _>>()?)
            }
        };
        Ok(Response { id, result: Ok(reply) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_validated() {
        assert!(KeyName::parse("billing/invoices").is_ok());
        for bad in ["", "/a", "a/", "a//b", "a/../b", "..", "a b", "ü", &"x".repeat(129)] {
            assert!(KeyName::parse(bad).is_err(), "{bad:?} must be rejected");
        }
        assert!(TenantName::parse("acme-1").is_ok());
        for bad in ["", "Acme", "-a", "a/b", "a.b", &"a".repeat(65)] {
            assert!(TenantName::parse(bad).is_err(), "{bad:?} must be rejected");
        }
    }

    #[test]
    fn context_encoding_is_sorted_and_length_prefixed() {
        let mut m = BTreeMap::new();
        m.insert("b".to_string(), "2".to_string());
        m.insert("a".to_string(), "xy".to_string());
        let mut out = Vec::new();
        Context::new(m).unwrap().encode_canonical(&mut out);
        assert_eq!(out, b"\x00\x02\x00\x01a\x00\x02xy\x00\x01b\x00\x012");
    }

    #[test]
    fn invalid_requests_name_the_field() {
        let req = pb::Request {
            request_id: 9,
            metadata: None,
            op: Some(pb::request::Op::Wrap(pb::WrapRequest {
                key_name: "default".into(),
                items: vec![
                    pb::WrapItem { plaintext: vec![1], context: Default::default() },
                    pb::WrapItem { plaintext: vec![0; MAX_SECRET_LEN + 1], context: Default::default() },
                ],
            })),
        };
        let err = Request::try_from(req).unwrap_err();
        assert_eq!(err.id, 9);
        assert_eq!(err.error.field, "items[1].plaintext");

        let req = pb::Request {
            request_id: 1,
            metadata: None,
            op: Some(pb::request::Op::Unwrap(pb::UnwrapRequest { items: vec![] })),
        };
        assert_eq!(Request::try_from(req).unwrap_err().error.field, "items");
    }

    #[test]
    fn audit_metadata_is_bounded() {
        let status = || Some(pb::request::Op::Status(pb::StatusRequest {}));
        let meta = |fields: BTreeMap<String, String>, principal: &str| pb::AuditMetadata {
            principal: principal.into(),
            fields,
            ..Default::default()
        };
        let at_limit = BTreeMap::from([("k".to_string(), "v".repeat(MAX_METADATA_FIELDS - 1))]);
        let req = pb::Request { request_id: 3, metadata: Some(meta(at_limit, "svc")), op: status() };
        let ok = Request::try_from(req).unwrap();
        assert_eq!(ok.metadata.principal, "svc");
        let over = BTreeMap::from([("k".to_string(), "v".repeat(MAX_METADATA_FIELDS))]);
        let req = pb::Request { request_id: 4, metadata: Some(meta(over, "svc")), op: status() };
        let err = Request::try_from(req).unwrap_err();
        assert_eq!((err.id, err.error.field.as_str()), (4, "metadata.fields"));
        assert!(err.error.problem.contains("1025 bytes"), "{}", err.error.problem);
        let req = pb::Request {
            request_id: 5,
            metadata: Some(meta(BTreeMap::new(), &"p".repeat(MAX_METADATA_VALUE + 1))),
            op: status(),
        };
        assert_eq!(Request::try_from(req).unwrap_err().error.field, "metadata.principal");
    }

    #[test]
    fn encoding_a_response_wipes_the_plaintexts_it_moved() {
        let item = |b| {
            Ok(ItemOk {
                plaintext: Some(Secret::from_vec(vec![b; 32])),
                edek: Some(vec![1]),
                key: KeyName::parse("default").unwrap(),
                version: 1,
            })
        };
        let mut msg =
            pb::Response::from(Response { id: 1, result: Ok(Reply::Batch(vec![item(7), item(8)])) });
        let mut frame = Vec::new();
        crate::frame::encode_frame(&msg, &mut frame);
        wipe_plaintexts(&mut msg);
        let Some(pb::response::Result::Batch(b)) = &msg.result else { panic!("a batch") };
        assert!(b.items.iter().all(|it| it.plaintext.is_empty()), "plaintexts must be wiped");
        // What was encoded is still the real response.
        let mut out = Vec::new();
        encode_response(Response { id: 1, result: Ok(Reply::Batch(vec![item(7), item(8)])) }, &mut out);
        assert_eq!(out, frame);
    }

    #[test]
    fn secrets_do_not_print() {
        let s = Secret::from_vec(b"top secret".to_vec());
        assert_eq!(format!("{s:?}"), "Secret([10 bytes redacted])");
    }

    #[test]
    fn response_round_trip() {
        let resp = Response {
            id: 4,
            result: Ok(Reply::Batch(vec![
                Ok(ItemOk {
                    plaintext: Some(Secret::from_vec(vec![7; 32])),
                    edek: Some(vec![1, 2, 3]),
                    key: KeyName::parse("default").unwrap(),
                    version: 2,
                }),
                Err(ErrorStatus::new(Code::DataInvalid, "invalid data")),
            ])),
        };
        let back = Response::try_from(pb::Response::from(resp)).unwrap();
        assert_eq!(back.id, 4);
        let Ok(Reply::Batch(items)) = back.result else { panic!("expected a batch") };
        let first = items[0].as_ref().unwrap();
        assert_eq!(first.plaintext.as_ref().unwrap().expose(), &[7; 32]);
        assert_eq!(first.version, 2);
        assert_eq!(items[1].as_ref().unwrap_err().code, Code::DataInvalid);
    }

    #[test]
    fn each_item_of_a_batch_answer_keeps_its_own_key_name() {
        let item =
            |name: &str| pb::ItemResult { key_name: name.into(), key_version: 1, ..Default::default() };
        let names = ["a", "a", "b/c", "a", "../x", "b/c"];
        let resp = pb::Response {
            request_id: 1,
            status: None,
            result: Some(pb::response::Result::Batch(pb::BatchResponse {
                items: names.iter().map(|n| item(n)).collect(),
            })),
        };
        let Ok(Reply::Batch(items)) = Response::try_from(resp).unwrap().result else { panic!("a batch") };
        let got: Vec<_> = items.iter().map(|i| i.as_ref().map(|ok| ok.key.as_str().to_owned())).collect();
        for (i, name) in names.iter().enumerate() {
            match &got[i] {
                Ok(key) => assert_eq!(key, name),
                Err(e) => {
                    assert_eq!(*name, "../x");
                    assert_eq!(e.code, Code::Internal);
                    assert!(e.message.contains("malformed key name"), "{}", e.message);
                }
            }
        }
        assert!(got[4].is_err(), "a malformed name in the middle is that item's error");
    }

    #[test]
    fn every_operation_has_its_place_in_names() {
        let key = || KeyName::parse("k").unwrap();
        let hello =
            Hello { protocol_version: 1, tenant: TenantName::parse("t").unwrap(), client_name: "c".into() };
        let ops = [
            Op::Hello(hello),
            Op::Generate { key: key(), edek_only: true, contexts: vec![Context::default(); 3] },
            Op::Wrap { key: key(), items: Vec::new() },
            Op::Unwrap(Vec::new()),
            Op::Rewrap(Vec::new()),
            Op::Status,
            Op::CreateKey(key()),
            Op::RotateKey(key()),
            Op::SetVersionState { key: key(), version: 1, state: TargetState::Disabled },
            Op::ListKeys,
            Op::SetKeyPolicy { key: key(), min_decrypt_version: None, keep_versions: None },
            Op::DestroyTenant { confirm: TenantName::parse("t").unwrap() },
            Op::RotateRoot { label: None },
            Op::RootImportKey { label: "l".into() },
            Op::RootImport { label: "l".into(), algorithm: "a".into(), wrapped: Vec::new() },
        ];
        assert_eq!(ops.len(), Op::NAMES.len());
        for (i, op) in ops.iter().enumerate() {
            assert_eq!((op.index(), Op::NAMES[op.index()]), (i, op.name()));
        }
        assert_eq!(ops[1].batch_len(), 3);
        assert_eq!(ops[5].batch_len(), 0);
    }

    #[test]
    fn status_round_trip() {
        let info = StatusInfo {
            tenant: TenantName::parse("acme").unwrap(),
            backend: "pkcs11".into(),
            backend_healthy: true,
            backend_error: String::new(),
            cached_keks: 1,
            keys: 1,
            uptime_seconds: 42,
            memory_locked: true,
            worker_pid: 1234,
            lease: "online".into(),
            root_key_exceptions: vec!["CKA_EXTRACTABLE is true".into()],
            key_versions: vec![KeyInfo {
                name: KeyName::parse("default").unwrap(),
                active_version: 2,
                versions: vec![
                    VersionInfo { version: 1, state: VersionState::Disabled, created_unix: 10 },
                    VersionInfo { version: 2, state: VersionState::Active, created_unix: 20 },
                ],
                min_decrypt_version: 0,
                keep_versions: 3,
            }],
            operations: vec![OpCount { operation: "unwrap".into(), requests: 5, items: 700 }],
            errors: vec![
                ErrorCount { code: Code::DataInvalid, requests: 0, items: 3 },
                ErrorCount { code: Code::NotFound, requests: 2, items: 0 },
            ],
        };
        let resp = Response { id: 8, result: Ok(Reply::Status(info.clone())) };
        let back = Response::try_from(pb::Response::from(resp)).unwrap();
        let Ok(Reply::Status(got)) = back.result else { panic!("expected a status") };
        assert_eq!(got, info);

        let mut wire = pb::Response::from(Response { id: 8, result: Ok(Reply::Status(info)) });
        let Some(pb::response::Result::StatusInfo(s)) = &mut wire.result else { panic!("a status") };
        s.errors[0].code = 99;
        let e = Response::try_from(wire).unwrap_err();
        assert!(e.0.contains("code 99"), "{e}");
    }
}
