//! The daemon's configuration file (`/etc/kekd/kekd.toml`).
//!
//! Parsed strictly: unknown keys are errors (a typo must not silently leave a default in
//! place), and every error names the field it is about, e.g.
//! `tenants.acme.pkcs11.pin_file: cannot read /etc/kekd/acme.pin: No such file`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kekd_proto::TenantName;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::sandbox::RunAs;

pub const DEFAULT_SOCKET: &str = "/run/kekd/kekd.sock";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/kekd";
pub const DEFAULT_AUDIT_DIR: &str = "/var/log/kekd/audit";

/// A configuration error; the message starts with the dotted path of the field.
#[derive(Debug, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct ConfigError {
    pub field: String,
    pub problem: String,
}

/// A valid configuration that will likely not work as meant; the message starts with the
/// dotted path of the field, like a [`ConfigError`]'s.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct ConfigWarning {
    pub field: String,
    pub problem: String,
}

impl ConfigError {
    pub fn new(field: impl Into<String>, problem: impl Into<String>) -> Self {
        Self { field: field.into(), problem: problem.into() }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Path of the Unix socket clients connect to.
    #[serde(default = "default_socket")]
    pub socket: PathBuf,
    /// Permission bits of the socket file, as an octal string. Access is decided per
    /// connection from SO_PEERCRED, so the file itself may be world-connectable.
    #[serde(default = "default_socket_mode")]
    pub socket_mode: String,
    /// A vsock port to listen on as well, on every CID of this machine, for virtual
    /// machines and enclaves. Guests are admitted per tenant by `allow_cids`.
    #[serde(default)]
    pub vsock_port: Option<u32>,
    /// Root of the key store (`<state_dir>/tenants/<tenant>/…`) and of the token lock files.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// Largest frame accepted from a client, in bytes.
    #[serde(default = "default_max_frame")]
    pub max_frame_bytes: usize,
    /// Serve even when KEK memory cannot be locked (mlock). Never in production.
    #[serde(default)]
    pub allow_unlocked_memory: bool,
    /// Log filter: levels and `TARGET=LEVEL` directives, e.g. `info` or `info,kekd=debug`.
    #[serde(default = "default_log_level")]
    pub log_level: String,
    /// On SIGTERM, how long workers may take to finish the requests they are serving.
    #[serde(default = "default_shutdown_timeout", with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// How long a worker may leave the supervisor's heartbeat unanswered before it is
    /// killed and restarted: a worker that stops answering (stopped, deadlocked, its runtime
    /// wedged) would otherwise hold its tenant's connections for ever.
    #[serde(default = "default_worker_watchdog", with = "humantime_serde")]
    pub worker_watchdog: Duration,
    /// The audit trail (docs/FORMATS.md §5).
    #[serde(default)]
    pub audit: AuditConfig,
    /// What clients may hold of the daemon: connections, requests in flight, time.
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub tenants: BTreeMap<String, TenantConfig>,
}

/// `[limits]`: what clients may hold of the daemon. The supervisor applies the connection
/// counts when it greets a connection (it counts each one until the worker serving it
/// closes it); each worker applies the rest to every connection it serves
/// ([`ConnectionLimits`]).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Connections open at once, all tenants together, counting those still being greeted.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Connections one tenant may have open at once.
    #[serde(default = "default_max_connections_per_tenant")]
    pub max_connections_per_tenant: usize,
    /// Connections one uid (over vsock: one CID) may have counted that have not sent their
    /// Hello yet; one more gets only a moment to say it, uncounted. Without it, one user of
    /// one tenant could hold every place of `max_connections` with connections that say
    /// nothing, and every tenant would be refused until they time out
    /// (`frame_read_timeout`).
    #[serde(default = "default_max_pending_per_uid")]
    pub max_pending_per_uid: usize,
    /// Requests one connection may have in flight (running, or answered and waiting to be
    /// written out); further frames are not read until one finishes.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight_per_connection: usize,
    /// A frame whose first byte has arrived must be complete within this; also how long a
    /// new connection may take to send its Hello. Between frames a connection may be idle.
    #[serde(default = "default_frame_read_timeout", with = "humantime_serde")]
    pub frame_read_timeout: Duration,
    /// An answer being written must be taken by the client within this, or the connection
    /// closes: a client that stops reading would otherwise hold its answers (up to
    /// `max_in_flight_per_connection` of them) in the worker's memory for as long as it likes.
    #[serde(default = "default_write_timeout", with = "humantime_serde")]
    pub write_timeout: Duration,
    /// Items one batch request may carry.
    #[serde(default = "default_max_batch_items")]
    pub max_batch_items: usize,
    /// Bytes of answers one tenant's worker may hold unwritten, all its connections
    /// together (one connection: a quarter of it), counted from when a request starts:
    /// past it the worker reads no further request of that connection until answers have
    /// been written. Backpressure, not an error: a tenant whose clients do not read
    /// cannot take the machine's memory.
    #[serde(default = "default_max_pending_reply_bytes")]
    pub max_pending_reply_bytes: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_connections: default_max_connections(),
            max_connections_per_tenant: default_max_connections_per_tenant(),
            max_pending_per_uid: default_max_pending_per_uid(),
            max_in_flight_per_connection: default_max_in_flight(),
            frame_read_timeout: default_frame_read_timeout(),
            write_timeout: default_write_timeout(),
            max_batch_items: default_max_batch_items(),
            max_pending_reply_bytes: default_max_pending_reply_bytes(),
        }
    }
}

impl LimitsConfig {
    /// Highest connection counts accepted: far beyond what one process's descriptors allow
    /// by default, low enough to catch a stray digit.
    pub const MAX_CONNECTIONS: usize = 1 << 20;
    /// Highest `max_in_flight_per_connection`.
    pub const MAX_IN_FLIGHT: usize = 65536;
    /// Lowest and highest `max_pending_reply_bytes`: room for a few answers, and far more
    /// memory than a worker should take.
    pub const PENDING_REPLY_BYTES: std::ops::RangeInclusive<usize> = (1 << 20)..=(1 << 40);

    fn validate(&self) -> Result<(), ConfigError> {
        let field = |f: &str| format!("limits.{f}");
        for (f, n, max) in [
            ("max_connections", self.max_connections, Self::MAX_CONNECTIONS),
            ("max_connections_per_tenant", self.max_connections_per_tenant, Self::MAX_CONNECTIONS),
            ("max_pending_per_uid", self.max_pending_per_uid, Self::MAX_CONNECTIONS),
            ("max_in_flight_per_connection", self.max_in_flight_per_connection, Self::MAX_IN_FLIGHT),
            ("max_batch_items", self.max_batch_items, kekd_proto::MAX_BATCH),
        ] {
            if !(1..=max).contains(&n) {
                return Err(ConfigError::new(field(f), format!("must be between 1 and {max}")));
            }
        }
        if self.max_connections_per_tenant > self.max_connections {
            return Err(ConfigError::new(
                field("max_connections_per_tenant"),
                format!(
                    "{} exceeds max_connections ({})",
                    self.max_connections_per_tenant, self.max_connections
                ),
            ));
        }
        if self.frame_read_timeout < Duration::from_millis(100)
            || self.frame_read_timeout > Duration::from_secs(3600)
        {
            return Err(ConfigError::new(field("frame_read_timeout"), "must be between 100ms and 1h"));
        }
        if self.write_timeout < Duration::from_millis(100) || self.write_timeout > Duration::from_secs(3600) {
            return Err(ConfigError::new(field("write_timeout"), "must be between 100ms and 1h"));
        }
        if !Self::PENDING_REPLY_BYTES.contains(&self.max_pending_reply_bytes) {
            return Err(ConfigError::new(
                field("max_pending_reply_bytes"),
                "must be between 1048576 (1 MiB) and 1099511627776 (1 TiB)",
            ));
        }
        Ok(())
    }
}

/// What a worker allows each connection it serves: `max_frame_bytes` and its part of
/// `[limits]`. Travels in the worker's setup, so changing one restarts the workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionLimits {
    pub max_frame_bytes: usize,
    pub max_in_flight: usize,
    #[serde(with = "humantime_serde")]
    pub frame_read_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub write_timeout: Duration,
    pub max_batch_items: usize,
    /// The worker's budget for answers not yet written, all connections together.
    pub max_pending_reply_bytes: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Config::connection_limits_of(default_max_frame(), &LimitsConfig::default())
    }
}

/// `[audit]`: where each tenant's audit trail goes and what a write failure means.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// Records go to `<dir>/<tenant>/<YYYY-MM-DD>.jsonl`.
    #[serde(default = "default_audit_dir")]
    pub dir: PathBuf,
    /// What an operation does when its record cannot be written.
    #[serde(default)]
    pub mode: AuditMode,
    /// When records reach the disk, as opposed to the page cache (which a crash of kekd
    /// does not lose, but a crash of the machine may).
    #[serde(default)]
    pub fsync: FsyncPolicy,
    /// With `fsync = "interval"`: how often.
    #[serde(default = "default_fsync_interval", with = "humantime_serde")]
    pub fsync_interval: Duration,
    /// A Unix datagram socket (`/dev/log`) each record is also sent to, as RFC 5424
    /// syslog, for SIEM shippers. Unset: no forwarding.
    pub syslog: Option<PathBuf>,
    /// The syslog facility of forwarded records.
    #[serde(default = "default_syslog_facility")]
    pub syslog_facility: String,
    /// Bytes of one forwarded syslog message, header included; a longer record goes as
    /// several messages, each with a part of its line (see `audit/syslog.rs`).
    #[serde(default = "default_syslog_max_message")]
    pub syslog_max_message: usize,
    /// Bytes of records each tenant may add to its trail per day (UTC): one tenant's
    /// traffic must not fill the disk the others' trails need. Past it that tenant's
    /// operations fail with RESOURCE_EXHAUSTED, whatever `mode` says, until the day ends.
    #[serde(default = "default_audit_max_bytes_per_day")]
    pub max_bytes_per_day: u64,
    /// How often a tenant's worker anchors its chain: when records were written since the
    /// last checkpoint, it appends one whose MAC, under a key sealed by the tenant's root
    /// key, names the chain's head (docs/FORMATS.md §5, "Checkpoints"); and at a clean
    /// shutdown. Records after the last checkpoint are not anchored.
    #[serde(default = "default_checkpoint_interval", with = "humantime_serde")]
    pub checkpoint_interval: Duration,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            dir: default_audit_dir(),
            mode: AuditMode::default(),
            fsync: FsyncPolicy::default(),
            fsync_interval: default_fsync_interval(),
            syslog: None,
            syslog_facility: default_syslog_facility(),
            syslog_max_message: default_syslog_max_message(),
            max_bytes_per_day: default_audit_max_bytes_per_day(),
            checkpoint_interval: default_checkpoint_interval(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AuditMode {
    /// No record, no key material: the operation fails with UNAVAILABLE.
    #[default]
    FailClosed,
    /// The failure is logged and the operation served; the count of unwritten records is
    /// recorded once writing works again.
    BestEffort,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FsyncPolicy {
    /// Every record is on disk before its operation answers: one fsync per record.
    Record,
    /// Records that queued up together are written and fsynced together, before any of
    /// their operations answer.
    Batch,
    /// Records are written before their operations answer and fsynced every
    /// `fsync_interval`: a crash of kekd loses nothing, a crash of the machine at most
    /// that interval.
    #[default]
    Interval,
}

/// Syslog facility names and numbers (RFC 5424 §6.2.1).
pub const SYSLOG_FACILITIES: [(&str, u8); 12] = [
    ("kern", 0),
    ("user", 1),
    ("daemon", 3),
    ("auth", 4),
    ("authpriv", 10),
    ("local0", 16),
    ("local1", 17),
    ("local2", 18),
    ("local3", 19),
    ("local4", 20),
    ("local5", 21),
    ("local6", 22),
];

impl AuditConfig {
    /// Lowest `max_bytes_per_day`: room for a few hundred records.
    pub const MIN_BYTES_PER_DAY: u64 = 64 << 10;
    /// `syslog_max_message`: from the size every syslog receiver must accept (RFC 5424
    /// §6.1) to the largest UDP payload, which is what relays forward messages in.
    pub const SYSLOG_MESSAGE: std::ops::RangeInclusive<usize> = 480..=65507;

    pub fn facility(&self) -> Option<u8> {
        SYSLOG_FACILITIES.iter().find(|(n, _)| *n == self.syslog_facility).map(|(_, f)| *f)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if !self.dir.is_absolute() {
            return Err(ConfigError::new("audit.dir", "must be an absolute path"));
        }
        if self.fsync_interval < Duration::from_millis(10) || self.fsync_interval > Duration::from_secs(300) {
            return Err(ConfigError::new("audit.fsync_interval", "must be between 10ms and 5m"));
        }
        if self.checkpoint_interval.is_zero() {
            return Err(ConfigError::new("audit.checkpoint_interval", "must be more than 0, e.g. \"60s\""));
        }
        if let Some(p) = &self.syslog {
            if !p.is_absolute() {
                return Err(ConfigError::new("audit.syslog", "must be an absolute path, e.g. \"/dev/log\""));
            }
        }
        if !Self::SYSLOG_MESSAGE.contains(&self.syslog_max_message) {
            return Err(ConfigError::new(
                "audit.syslog_max_message",
                "must be between 480 (the least a syslog receiver must accept, RFC 5424 §6.1) and 65507 bytes",
            ));
        }
        if self.max_bytes_per_day < Self::MIN_BYTES_PER_DAY {
            return Err(ConfigError::new(
                "audit.max_bytes_per_day",
                format!("must be at least {} (64 KiB)", Self::MIN_BYTES_PER_DAY),
            ));
        }
        if self.facility().is_none() {
            let names: Vec<&str> = SYSLOG_FACILITIES.iter().map(|(n, _)| *n).collect();
            return Err(ConfigError::new(
                "audit.syslog_facility",
                format!("unknown facility {:?}; one of {}", self.syslog_facility, names.join(", ")),
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    /// Peers whose uid is listed here may connect.
    #[serde(default)]
    pub allow_uids: Vec<u32>,
    /// Peers whose primary gid is listed here may connect.
    #[serde(default)]
    pub allow_gids: Vec<u32>,
    /// Peers whose uid is listed here may connect and run admin operations.
    #[serde(default)]
    pub admin_uids: Vec<u32>,
    /// Guests whose vsock context id is listed here may connect over `vsock_port` (as
    /// users, never as admins). The hypervisor assigns a guest its CID, so a guest cannot
    /// claim another's. CID 2 is the host; CID 1 is this machine's own vsock loopback,
    /// which any local process can use whatever its uid: list it only on purpose.
    #[serde(default)]
    pub allow_cids: Vec<u32>,
    /// The user (name or uid) the tenant's worker process runs as once its root key is
    /// open; its groups come from the user database. Unset: the daemon's own user.
    #[serde(default)]
    pub run_as: Option<String>,
    /// How long an unwrapped KEK is used before it is unsealed again from the root key.
    #[serde(default = "default_ttl", with = "humantime_serde")]
    pub kek_ttl: Duration,
    /// An unwrapped KEK nobody used for this long is flushed.
    #[serde(default = "default_ttl", with = "humantime_serde")]
    pub idle_ttl: Duration,
    /// While the root key is unreachable, cached KEKs keep serving up to this long after
    /// the last successful root-key operation. 0: fail closed at `kek_ttl`.
    #[serde(default = "default_offline_grace", with = "humantime_serde")]
    pub offline_grace: Duration,
    /// How often a cheap operation with the root key checks it is still there and usable:
    /// a revoked root key stops all service within this bound.
    #[serde(default = "default_revocation_poll", with = "humantime_serde")]
    pub revocation_poll: Duration,
    /// Encryptions under one KEK version before the key rotates by itself (DESIGN §1).
    #[serde(default = "default_encryption_budget")]
    pub encryption_budget: u64,
    /// Levels a key chain may have, counting the root key and the data key: 4 allows
    /// `billing/invoices` sealed under `billing` (customer root, tenant, service, DEK).
    #[serde(default = "default_max_key_depth")]
    pub max_key_depth: u32,
    /// What the worker's system-call filter does with a call its policy does not list
    /// (daemon/seccomp/, installed once the root key is open).
    #[serde(default)]
    pub seccomp: SeccompMode,
    pub pkcs11: Option<Pkcs11Config>,
    pub tpm: Option<TpmConfig>,
}

/// `seccomp` of a tenant: the worker's system-call filter (README, "The system-call
/// filter").
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SeccompMode {
    /// A call the policy does not list kills the worker (SIGSYS); the supervisor logs it
    /// and restarts the worker.
    #[default]
    Enforce,
    /// A call the policy does not list is allowed, and the kernel logs it (audit log or
    /// `dmesg`, `type=1326`): to find what a PKCS#11 module needs beyond the policy.
    Log,
    /// No filter.
    Off,
}

/// Where a tenant's root key lives: exactly one of the backend tables is set.
#[derive(Debug, Clone, Copy)]
pub enum BackendConfig<'a> {
    Pkcs11(&'a Pkcs11Config),
    Tpm(&'a TpmConfig),
}

impl TenantConfig {
    /// The bound on each root-key call, and the name of its setting for messages.
    pub fn call_timeout(&self, tenant: &str) -> (Duration, String) {
        match self.backend() {
            Some(BackendConfig::Tpm(t)) => (t.call_timeout, format!("tenants.{tenant}.tpm.call_timeout")),
            Some(BackendConfig::Pkcs11(p)) => {
                (p.call_timeout, format!("tenants.{tenant}.pkcs11.call_timeout"))
            }
            None => (default_call_timeout(), format!("tenants.{tenant}.pkcs11.call_timeout")),
        }
    }

    /// The tenant's root-key backend. Validation guarantees exactly one; `None` only for a
    /// config that was never validated.
    pub fn backend(&self) -> Option<BackendConfig<'_>> {
        match (&self.pkcs11, &self.tpm) {
            (Some(p), None) => Some(BackendConfig::Pkcs11(p)),
            (None, Some(t)) => Some(BackendConfig::Tpm(t)),
            _ => None,
        }
    }
}

/// The TPM 2.0 root-key backend of one tenant: KEKs are sealed data objects under a
/// storage primary key, optionally bound to PCR values.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TpmConfig {
    /// How to reach the TPM, as a TSS2 TCTI string: `device:/dev/tpmrm0` (the kernel's
    /// resource manager, the default), `swtpm:host=127.0.0.1,port=2321`, `mssim:…`,
    /// `tabrmd:…`.
    #[serde(default = "default_tcti")]
    pub tcti: String,
    /// Persistent handle (`0x81000000`–`0x81FFFFFF`) of a storage primary provisioned by
    /// the operator. Unset: the primary is recreated from kekd's fixed ECC P-256 template
    /// under the owner hierarchy, which yields the same key for as long as the owner seed
    /// is not changed (`TPM2_Clear`).
    pub primary_handle: Option<String>,
    /// PCRs of the sha256 bank the KEKs are sealed to (PolicyPCR): a KEK unseals only
    /// while these PCRs hold the values they had when the worker started.
    #[serde(default)]
    pub pcrs: Vec<u8>,
    /// Encrypt the unsealed KEK (and the KEK being sealed) on its way between kekd and the
    /// TPM, through a salted HMAC session. Default: on for `device:` TCTIs (a bus others
    /// may probe), off otherwise.
    pub parameter_encryption: Option<bool>,
    /// Longest a call to the TPM (seal, unseal, canary) may take; past it the request is
    /// answered UNAVAILABLE and the worker is replaced, as for `pkcs11.call_timeout`.
    #[serde(default = "default_call_timeout", with = "humantime_serde")]
    pub call_timeout: Duration,
}

impl TpmConfig {
    /// Highest PCR index of a PC-client TPM.
    pub const MAX_PCR: u8 = 23;

    pub fn parameter_encryption(&self) -> bool {
        self.parameter_encryption.unwrap_or_else(|| self.tcti.starts_with("device"))
    }

    /// The persistent handle, parsed; `Ok(None)` when the primary is recreated instead.
    pub fn primary_handle(&self) -> Result<Option<u32>, String> {
        let Some(text) = &self.primary_handle else { return Ok(None) };
        let digits = text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")).unwrap_or(text);
        match u32::from_str_radix(digits, 16) {
            Ok(h) if (0x8100_0000..=0x81FF_FFFF).contains(&h) => Ok(Some(h)),
            _ => Err(format!("{text:?} is not a persistent handle (0x81000000 to 0x81FFFFFF)")),
        }
    }

    fn validate(&self, field: &str) -> Result<(), ConfigError> {
        let f = |s: &str| format!("{field}.{s}");
        let (kind, conf) = self.tcti.split_once(':').unwrap_or((self.tcti.as_str(), ""));
        match kind {
            "device" => {
                let path = if conf.is_empty() { "/dev/tpm0" } else { conf };
                if !Path::new(path).exists() {
                    return Err(ConfigError::new(
                        f("tcti"),
                        format!("{path} does not exist: no TPM, or its driver is not loaded"),
                    ));
                }
            }
            "swtpm" | "mssim" | "tabrmd" => {}
            _ => {
                return Err(ConfigError::new(
                    f("tcti"),
                    format!(
                        "unknown TCTI {kind:?}: use device:PATH, swtpm:host=H,port=P, mssim:… or tabrmd:…"
                    ),
                ))
            }
        }
        self.primary_handle().map_err(|p| ConfigError::new(f("primary_handle"), p))?;
        check_call_timeout(self.call_timeout, &f("call_timeout"))?;
        let mut seen = [false; Self::MAX_PCR as usize + 1];
        for &pcr in &self.pcrs {
            match seen.get_mut(pcr as usize) {
                None => {
                    return Err(ConfigError::new(
                        f("pcrs"),
                        format!("PCR {pcr} does not exist (0 to {})", Self::MAX_PCR),
                    ))
                }
                Some(true) => return Err(ConfigError::new(f("pcrs"), format!("PCR {pcr} is listed twice"))),
                Some(s) => *s = true,
            }
        }
        Ok(())
    }
}

/// The PKCS#11 root-key backend of one tenant.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Pkcs11Config {
    /// Path of the PKCS#11 module, e.g. `/usr/lib/softhsm/libsofthsm2.so`.
    pub module: PathBuf,
    /// Label of the token holding the root key (slot ids are not stable; labels are).
    pub token_label: String,
    /// Label of the root key object on the token.
    pub key_label: String,
    /// File holding the user PIN (trailing newline ignored). One of pin_file / pin_env.
    pub pin_file: Option<PathBuf>,
    /// Environment variable holding the user PIN. One of pin_file / pin_env.
    pub pin_env: Option<String>,
    /// Generate the root key on first start if the token has none with `key_label`.
    #[serde(default)]
    pub create_root_key: bool,
    /// SOFTHSM2_CONF to give the module (SoftHSM2 only).
    pub softhsm2_conf: Option<PathBuf>,
    /// Environment variables the module reads at C_Initialize (the worker's own environment
    /// is cleared), e.g. `{ P11_KIT_SERVER_ADDRESS = "unix:path=/run/hsm.sock" }`.
    #[serde(default)]
    pub module_env: BTreeMap<String, String>,
    /// Adopt a root key that can leave its HSM (a public object, extractable, not
    /// sensitive, or not AES-256): an escrowed key, kept elsewhere too on purpose. Off, such
    /// a key is refused at start, since the point of an HSM root key is that nobody can
    /// take it away; on, the exception is logged at each start and shown by `kekctl
    /// status`, so that it stays visible for as long as it lasts.
    #[serde(default)]
    pub allow_exportable_root: bool,
    /// Sessions the tenant's worker has open on the token at most, idle or in use: HSMs
    /// limit sessions per application or token, so a burst of requests waits for a session
    /// rather than taking them all.
    #[serde(default = "default_max_sessions")]
    pub max_sessions: usize,
    /// Longest a call into the module (seal, unseal, canary, rotation, import) may take.
    /// Past it the request is answered UNAVAILABLE and the worker is replaced: a module
    /// stuck in a call cannot be trusted again in that process.
    #[serde(default = "default_call_timeout", with = "humantime_serde")]
    pub call_timeout: Duration,
}

/// Default of `pkcs11.max_sessions`.
pub const DEFAULT_MAX_SESSIONS: usize = 16;
/// The most `pkcs11.max_sessions` may be: more is a typo, not a token.
pub const MAX_MAX_SESSIONS: usize = 1024;

fn default_max_sessions() -> usize {
    DEFAULT_MAX_SESSIONS
}

/// Where a tenant's PKCS#11 token lives, as an operator would look for it: the SoftHSM2
/// token directory when the configuration tells it (its files are what a `run_as` user
/// must own), else the token's label and module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenLocation {
    SoftHsm2 { tokendir: PathBuf, token_label: String },
    Module { token_label: String, module: PathBuf },
}

impl std::fmt::Display for TokenLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TokenLocation::SoftHsm2 { tokendir, token_label } => {
                write!(f, "SoftHSM2 token directory {} (token {token_label:?})", tokendir.display())
            }
            TokenLocation::Module { token_label, module } => {
                write!(f, "token {token_label:?} of PKCS#11 module {}", module.display())
            }
        }
    }
}

/// SoftHSM2's configuration file when nothing names another (Debian's build).
const SOFTHSM2_DEFAULT_CONF: &str = "/etc/softhsm/softhsm2.conf";
/// SoftHSM2's token directory when its configuration names none (Debian's build).
const SOFTHSM2_DEFAULT_TOKENDIR: &str = "/var/lib/softhsm/tokens";

fn default_socket() -> PathBuf {
    DEFAULT_SOCKET.into()
}
fn default_socket_mode() -> String {
    "0666".into()
}
fn default_state_dir() -> PathBuf {
    DEFAULT_STATE_DIR.into()
}
fn default_audit_dir() -> PathBuf {
    DEFAULT_AUDIT_DIR.into()
}
fn default_audit_max_bytes_per_day() -> u64 {
    20 << 30
}
fn default_fsync_interval() -> Duration {
    Duration::from_secs(1)
}
fn default_checkpoint_interval() -> Duration {
    Duration::from_secs(60)
}
fn default_syslog_facility() -> String {
    "authpriv".into()
}
fn default_syslog_max_message() -> usize {
    8192
}
fn default_max_frame() -> usize {
    kekd_proto::DEFAULT_MAX_FRAME
}
fn default_max_connections() -> usize {
    512
}
fn default_max_connections_per_tenant() -> usize {
    256
}
fn default_max_pending_per_uid() -> usize {
    8
}
fn default_max_in_flight() -> usize {
    256
}
fn default_frame_read_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_write_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_max_pending_reply_bytes() -> usize {
    64 << 20
}
fn default_max_batch_items() -> usize {
    kekd_proto::MAX_BATCH
}
fn default_log_level() -> String {
    "info".into()
}
fn default_shutdown_timeout() -> Duration {
    Duration::from_secs(10)
}
/// A root-key call's bound: long enough for a slow HSM's answer (a network round trip, a
/// key generation), short enough that a hung one is noticed while clients still wait.
fn check_call_timeout(timeout: Duration, field: &str) -> Result<(), ConfigError> {
    if timeout < Duration::from_millis(100) || timeout > Duration::from_secs(600) {
        return Err(ConfigError::new(field, "must be between 100ms and 10m"));
    }
    Ok(())
}

fn default_worker_watchdog() -> Duration {
    Duration::from_secs(10)
}
fn default_call_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_max_key_depth() -> u32 {
    crate::service::DEFAULT_MAX_KEY_DEPTH
}
fn default_encryption_budget() -> u64 {
    crate::service::DEFAULT_ENCRYPTION_BUDGET
}
fn default_offline_grace() -> Duration {
    Duration::from_secs(3600)
}
fn default_revocation_poll() -> Duration {
    Duration::from_secs(30)
}
fn default_tcti() -> String {
    "device:/dev/tpmrm0".into()
}
fn default_ttl() -> Duration {
    Duration::from_secs(300)
}

/// A validated tenant: its name parsed, its backend chosen.
#[derive(Debug, Clone)]
pub struct Tenant {
    pub name: TenantName,
    pub config: TenantConfig,
}

impl Config {
    /// Reads, parses and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::new("config", format!("cannot read {}: {e}", path.display())))?;
        Self::parse(&text)
    }

    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| toml_error(text, e))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The limits each connection a worker serves is held to.
    pub fn connection_limits(&self) -> ConnectionLimits {
        Self::connection_limits_of(self.max_frame_bytes, &self.limits)
    }

    fn connection_limits_of(max_frame_bytes: usize, l: &LimitsConfig) -> ConnectionLimits {
        ConnectionLimits {
            max_frame_bytes,
            max_in_flight: l.max_in_flight_per_connection,
            frame_read_timeout: l.frame_read_timeout,
            write_timeout: l.write_timeout,
            max_batch_items: l.max_batch_items,
            max_pending_reply_bytes: l.max_pending_reply_bytes,
        }
    }

    pub fn socket_mode(&self) -> Result<u32, ConfigError> {
        u32::from_str_radix(self.socket_mode.trim_start_matches("0o"), 8)
            .ok()
            .filter(|m| *m <= 0o777)
            .ok_or_else(|| ConfigError::new("socket_mode", "must be an octal mode such as \"0660\""))
    }

    fn validate(&self) -> Result<(), ConfigError> {
        self.socket_mode()?;
        crate::logging::check_filter(&self.log_level).map_err(|p| ConfigError::new("log_level", p))?;
        if self.vsock_port == Some(u32::MAX) {
            return Err(ConfigError::new("vsock_port", "4294967295 means any port; name one"));
        }
        self.audit.validate()?;
        self.limits.validate()?;
        if self.max_frame_bytes < 1024 || self.max_frame_bytes > 64 << 20 {
            return Err(ConfigError::new("max_frame_bytes", "must be between 1024 and 67108864"));
        }
        if self.tenants.is_empty() {
            return Err(ConfigError::new("tenants", "no tenant is configured"));
        }
        if self.shutdown_timeout > Duration::from_secs(3600) {
            return Err(ConfigError::new("shutdown_timeout", "must be at most 1h"));
        }
        // A heartbeat is sent every quarter of it: much under a second, a loaded machine
        // could make a healthy worker look dead.
        if self.worker_watchdog < Duration::from_secs(1) || self.worker_watchdog > Duration::from_secs(3600) {
            return Err(ConfigError::new("worker_watchdog", "must be between 1s and 1h"));
        }
        for (name, t) in &self.tenants {
            let field = |f: &str| format!("tenants.{name}.{f}");
            TenantName::parse(name).map_err(|p| ConfigError::new(format!("tenants.{name}"), p))?;
            if t.allow_uids.is_empty()
                && t.allow_gids.is_empty()
                && t.admin_uids.is_empty()
                && t.allow_cids.is_empty()
            {
                return Err(ConfigError::new(
                    field("allow_uids"),
                    "no caller is allowed: set allow_uids, allow_gids, admin_uids or allow_cids",
                ));
            }
            if let Some(cid) = t.allow_cids.iter().find(|c| [0, u32::MAX].contains(*c)) {
                return Err(ConfigError::new(
                    field("allow_cids"),
                    format!("{cid} is not a peer's CID (0 is the hypervisor, 4294967295 means any)"),
                ));
            }
            for (f, d) in
                [("kek_ttl", t.kek_ttl), ("idle_ttl", t.idle_ttl), ("revocation_poll", t.revocation_poll)]
            {
                if d < Duration::from_secs(1) {
                    return Err(ConfigError::new(field(f), "must be at least 1s"));
                }
            }
            if !(1..=1 << 32).contains(&t.encryption_budget) {
                return Err(ConfigError::new(
                    field("encryption_budget"),
                    "must be between 1 and 4294967296 (2^32, the limit for random 96-bit nonces)",
                ));
            }
            if !(3..=16).contains(&t.max_key_depth) {
                return Err(ConfigError::new(
                    field("max_key_depth"),
                    "must be between 3 (root key, KEK, data key: no chains) and 16",
                ));
            }
            if let Some(user) = &t.run_as {
                RunAs::resolve(user).map_err(|p| ConfigError::new(field("run_as"), p))?;
            }
            match (&t.pkcs11, &t.tpm) {
                (Some(p), None) => p.validate(&field("pkcs11"))?,
                (None, Some(tpm)) => tpm.validate(&field("tpm"))?,
                (None, None) => {
                    return Err(ConfigError::new(
                        field("pkcs11"),
                        format!(
                        "no root-key backend: add a [tenants.{name}.pkcs11] or [tenants.{name}.tpm] table"
                    ),
                    ))
                }
                (Some(_), Some(_)) => {
                    return Err(ConfigError::new(
                        field("tpm"),
                        "a tenant has one root key: set either the pkcs11 or the tpm table, not both",
                    ))
                }
            }
        }
        Ok(())
    }

    /// What is valid but will likely not work, for `check-config`: tenants whose workers
    /// run as different users (or one as root) on one SoftHSM2 token directory. A `run_as`
    /// worker opens its token with its user's file rights, so that user must own the
    /// token's files; two users cannot both own them, and a root worker would work among
    /// files a user can replace.
    pub fn warnings(&self) -> Vec<ConfigWarning> {
        // Users compared by uid ("0" is "root"); unset is the daemon's own user, root.
        type Sharer<'a> = (&'a str, Option<&'a str>, Option<u32>);
        let mut by_dir: BTreeMap<PathBuf, Vec<Sharer<'_>>> = BTreeMap::new();
        for (name, t) in &self.tenants {
            let Some(dir) = t.pkcs11.as_ref().and_then(Pkcs11Config::softhsm2_tokendir) else { continue };
            let dir = std::fs::canonicalize(&dir).unwrap_or(dir);
            let uid = match &t.run_as {
                Some(u) => RunAs::resolve(u).ok().map(|r| r.uid.as_raw()),
                None => Some(0),
            };
            by_dir.entry(dir).or_default().push((name, t.run_as.as_deref(), uid));
        }
        let user = |u: Option<&str>| match u {
            Some(u) => format!("{u:?}"),
            None => "unset: the worker runs as root".to_owned(),
        };
        let mut warnings = Vec::new();
        for (dir, tenants) in by_dir {
            let Some(&(first, first_user, first_uid)) = tenants.first() else { continue };
            for &(other, other_user, other_uid) in &tenants[1..] {
                if other_uid != first_uid {
                    warnings.push(ConfigWarning {
                        field: format!("tenants.{other}.run_as"),
                        problem: format!(
                            "tenants.{first}.run_as ({}) and tenants.{other}.run_as ({}) share the SoftHSM2 \
                             token directory {}: one user must own a token directory, so one of these \
                             workers will not start or will work among files another user can replace; \
                             give each user a token directory of its own (softhsm2_conf)",
                            user(first_user),
                            user(other_user),
                            dir.display()
                        ),
                    });
                }
            }
        }
        warnings
    }

    /// The configured tenants, validated.
    pub fn tenants(&self) -> Vec<Tenant> {
        self.tenants
            .iter()
            .map(|(n, c)| Tenant { name: TenantName::parse(n).expect("validated"), config: c.clone() })
            .collect()
    }
}

impl Pkcs11Config {
    /// The SoftHSM2 configuration the module reads: `softhsm2_conf`, else `SOFTHSM2_CONF`
    /// in `module_env`, else SoftHSM2's default when the module is SoftHSM2 (the worker's
    /// environment is cleared, so nothing else can name one). `None`: not SoftHSM2.
    pub fn softhsm2_conf_path(&self) -> Option<PathBuf> {
        if let Some(conf) = &self.softhsm2_conf {
            return Some(conf.clone());
        }
        if let Some(conf) = self.module_env.get("SOFTHSM2_CONF") {
            return Some(conf.into());
        }
        let name = self.module.file_name()?.to_string_lossy();
        name.starts_with("libsofthsm2").then(|| SOFTHSM2_DEFAULT_CONF.into())
    }

    /// The SoftHSM2 token directory (`directories.tokendir` of [`Self::softhsm2_conf_path`]),
    /// when the module is SoftHSM2 and its configuration can be read.
    pub fn softhsm2_tokendir(&self) -> Option<PathBuf> {
        let conf = self.softhsm2_conf_path()?;
        let text = std::fs::read_to_string(conf).ok()?;
        let named = text.lines().find_map(|line| {
            let (key, value) = line.split_once('=')?;
            (key.trim() == "directories.tokendir").then(|| PathBuf::from(value.trim()))
        });
        Some(named.unwrap_or_else(|| SOFTHSM2_DEFAULT_TOKENDIR.into()))
    }

    /// Where the token is, for messages about it.
    pub fn token_location(&self) -> TokenLocation {
        match self.softhsm2_tokendir() {
            Some(tokendir) => TokenLocation::SoftHsm2 { tokendir, token_label: self.token_label.clone() },
            None => {
                TokenLocation::Module { token_label: self.token_label.clone(), module: self.module.clone() }
            }
        }
    }

    fn validate(&self, field: &str) -> Result<(), ConfigError> {
        let f = |s: &str| format!("{field}.{s}");
        if let Err(e) = std::fs::File::open(&self.module) {
            return Err(ConfigError::new(f("module"), format!("cannot read {}: {e}", self.module.display())));
        }
        for (name, v) in [("token_label", &self.token_label), ("key_label", &self.key_label)] {
            if v.is_empty() || v.len() > 32 && name == "token_label" {
                return Err(ConfigError::new(f(name), "must be 1 to 32 characters"));
            }
        }
        match (&self.pin_file, &self.pin_env) {
            (None, None) => {
                return Err(ConfigError::new(f("pin_file"), "no PIN source: set pin_file or pin_env"))
            }
            (Some(_), Some(_)) => {
                return Err(ConfigError::new(f("pin_file"), "set only one of pin_file and pin_env"))
            }
            _ => {}
        }
        self.read_pin(field)?;
        check_call_timeout(self.call_timeout, &f("call_timeout"))?;
        for name in self.module_env.keys() {
            if name.is_empty() || name.contains(['=', '\0']) {
                return Err(ConfigError::new(
                    f("module_env"),
                    format!("{name:?} is not an environment variable name"),
                ));
            }
            if name == "SOFTHSM2_CONF" && self.softhsm2_conf.is_some() {
                return Err(ConfigError::new(
                    f("module_env"),
                    "SOFTHSM2_CONF is set by softhsm2_conf already",
                ));
            }
        }
        if !(1..=MAX_MAX_SESSIONS).contains(&self.max_sessions) {
            return Err(ConfigError::new(
                f("max_sessions"),
                format!("must be between 1 and {MAX_MAX_SESSIONS}"),
            ));
        }
        if let Some(c) = &self.softhsm2_conf {
            if let Err(e) = std::fs::File::open(c) {
                return Err(ConfigError::new(
                    f("softhsm2_conf"),
                    format!("cannot read {}: {e}", c.display()),
                ));
            }
        }
        Ok(())
    }

    /// Reads the user PIN from its source. `field` prefixes error messages.
    pub fn read_pin(&self, field: &str) -> Result<Zeroizing<String>, ConfigError> {
        let pin = match (&self.pin_file, &self.pin_env) {
            (Some(path), _) => {
                let raw = Zeroizing::new(std::fs::read_to_string(path).map_err(|e| {
                    ConfigError::new(
                        format!("{field}.pin_file"),
                        format!("cannot read {}: {e}", path.display()),
                    )
                })?);
                Zeroizing::new(raw.trim_end_matches(['\n', '\r']).to_owned())
            }
            (None, Some(var)) => Zeroizing::new(std::env::var(var).map_err(|_| {
                ConfigError::new(format!("{field}.pin_env"), format!("environment variable {var} is not set"))
            })?),
            (None, None) => return Err(ConfigError::new(format!("{field}.pin_file"), "no PIN source")),
        };
        if pin.is_empty() {
            return Err(ConfigError::new(format!("{field}.pin_file"), "the PIN is empty"));
        }
        Ok(pin)
    }
}

/// Turns a TOML error into one that names the field: toml points at the offending span
/// but does not name the key, so the dotted path is rebuilt from the source text (the
/// nearest `[table]` header above the span, plus the key on the span's line).
fn toml_error(text: &str, e: toml::de::Error) -> ConfigError {
    let msg = e.message().trim().to_owned();
    let Some(span) = e.span() else { return ConfigError::new("config", msg) };
    let line_start = text[..span.start].rfind('\n').map_or(0, |i| i + 1);
    let line_no = text[..span.start].matches('\n').count() + 1;
    let line = text[line_start..].lines().next().unwrap_or("");
    let table = text[..line_start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('[') && l.ends_with(']'))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_owned());
    let key = line.split_once('=').map(|(k, _)| k.trim().trim_matches('"').to_owned());
    let field = match (table, key) {
        (Some(t), Some(k)) => format!("{t}.{k}"),
        (None, Some(k)) => k,
        (Some(t), None) => t,
        (None, None) => "config".to_owned(),
    };
    ConfigError::new(field, format!("{msg} (line {line_no})"))
}

#[cfg(test)]
mod tests {
    use super::*;

    thread_local! {
        /// A PIN file per test thread, removed when the thread (the test) ends.
        static PIN_DIR: tempfile::TempDir = {
            let d = tempfile::tempdir().unwrap();
            std::fs::write(d.path().join("pin"), "1234\n").unwrap();
            d
        };
    }

    fn pin_file() -> PathBuf {
        PIN_DIR.with(|d| d.path().join("pin"))
    }

    fn with_module(extra: &str) -> String {
        format!(
            r#"
state_dir = "/tmp/x"
[tenants.acme]
allow_uids = [1000]
{extra}
[tenants.acme.pkcs11]
module = "/bin/sh"
token_label = "kekd"
key_label = "acme-root"
pin_file = "{}"
"#,
            pin_file().display()
        )
    }

    fn with_tpm(table: &str) -> String {
        format!("[tenants.acme]\nallow_uids = [1000]\n[tenants.acme.tpm]\n{table}\n")
    }

    #[test]
    fn vsock_settings_are_checked_by_name() {
        let guests = |cids: &str| {
            with_tpm("tcti = \"device:/dev/null\"")
                .replace("allow_uids = [1000]", &format!("allow_cids = [{cids}]"))
        };
        let cfg = Config::parse(&format!("vsock_port = 7000\n{}", guests("3, 5"))).unwrap();
        assert_eq!(cfg.vsock_port, Some(7000));
        assert_eq!(cfg.tenants["acme"].allow_cids, [3, 5], "guests alone are enough callers");
        for bad in ["0", "4294967295"] {
            let e = Config::parse(&guests(bad)).unwrap_err();
            assert_eq!(e.field, "tenants.acme.allow_cids", "{e}");
            assert!(e.to_string().contains(bad), "{e}");
        }
        let e = Config::parse(&format!("vsock_port = 4294967295\n{}", guests("3"))).unwrap_err();
        assert_eq!(e.field, "vsock_port", "{e}");
        let e = Config::parse(&format!("vsock_prot = 7000\n{}", guests("3"))).unwrap_err();
        assert!(e.to_string().contains("vsock_prot"), "a typo is named: {e}");
    }

    #[test]
    fn allow_exportable_root_is_off_unless_set_and_a_typo_is_named() {
        let cfg = Config::parse(&with_module("")).unwrap();
        assert!(!cfg.tenants["acme"].pkcs11.as_ref().unwrap().allow_exportable_root);
        let cfg = Config::parse(&format!("{}allow_exportable_root = true\n", with_module(""))).unwrap();
        assert!(cfg.tenants["acme"].pkcs11.as_ref().unwrap().allow_exportable_root);
        let e = Config::parse(&format!("{}allow_exportable_roots = true\n", with_module(""))).unwrap_err();
        assert_eq!(e.field, "tenants.acme.pkcs11.allow_exportable_roots", "{e}");
        assert!(e.problem.contains("unknown field"), "{e}");
    }

    #[test]
    fn tenants_of_different_users_on_one_softhsm2_token_directory_are_warned_of() {
        let dir = tempfile::tempdir().unwrap();
        let conf = |name: &str, tokendir: &str| {
            let path = dir.path().join(name);
            std::fs::write(
                &path,
                format!("# a comment\ndirectories.tokendir = {tokendir}\nlog.level = ERROR\n"),
            )
            .unwrap();
            path
        };
        let (shared, also_shared, own) =
            (conf("a.conf", "/var/t"), conf("b.conf", "/var/t"), conf("c.conf", "/var/u"));
        let tenant = |name: &str, user: &str, conf: &Path| {
            let run_as = if user.is_empty() { String::new() } else { format!("run_as = \"{user}\"\n") };
            format!(
                "[tenants.{name}]\nallow_uids = [1000]\n{run_as}[tenants.{name}.pkcs11]\nmodule = \"/bin/sh\"\n\
                 token_label = \"{name}\"\nkey_label = \"root\"\npin_file = \"{}\"\nsofthsm2_conf = \"{}\"\n",
                pin_file().display(),
                conf.display()
            )
        };
        let warnings = |text: String| Config::parse(&text).unwrap().warnings();

        let w = warnings(tenant("a", "root", &shared) + &tenant("b", "nobody", &also_shared));
        let [w] = &w[..] else { panic!("{w:?}") };
        assert_eq!(w.field, "tenants.b.run_as");
        for part in ["tenants.a.run_as (\"root\")", "tenants.b.run_as (\"nobody\")", "/var/t"] {
            assert!(w.problem.contains(part), "{part}: {w}");
        }
        let w = warnings(tenant("a", "", &shared) + &tenant("b", "nobody", &shared));
        assert!(matches!(&w[..], [w] if w.problem.contains("unset: the worker runs as root")), "{w:?}");
        assert_eq!(warnings(tenant("a", "root", &shared) + &tenant("b", "0", &shared)), [], "one user");
        assert_eq!(
            warnings(tenant("a", "root", &shared) + &tenant("b", "nobody", &own)),
            [],
            "two directories"
        );
        let p11 = Config::parse(&tenant("a", "", &shared)).unwrap().tenants["a"].pkcs11.clone().unwrap();
        assert_eq!(p11.token_location().to_string(), "SoftHSM2 token directory /var/t (token \"a\")");
    }

    #[test]
    fn minimal_config_is_valid() {
        let cfg = Config::parse(&with_module("kek_ttl = \"30s\"")).unwrap();
        let t = &cfg.tenants["acme"];
        assert_eq!(t.kek_ttl, Duration::from_secs(30));
        assert_eq!(t.idle_ttl, Duration::from_secs(300));
        assert_eq!(cfg.tenants()[0].config.pkcs11.as_ref().unwrap().read_pin("p").unwrap().as_str(), "1234");
    }

    #[test]
    fn call_bounds_have_defaults_and_are_checked_by_name() {
        let cfg = Config::parse(&with_module("")).unwrap();
        assert_eq!(cfg.worker_watchdog, Duration::from_secs(10));
        let (timeout, setting) = cfg.tenants["acme"].call_timeout("acme");
        assert_eq!((timeout, setting.as_str()), (Duration::from_secs(5), "tenants.acme.pkcs11.call_timeout"));
        let cfg =
            Config::parse(&format!("worker_watchdog = \"2s\"\n{}call_timeout = \"1s\"\n", with_module("")))
                .unwrap();
        assert_eq!(cfg.worker_watchdog, Duration::from_secs(2));
        assert_eq!(cfg.tenants["acme"].call_timeout("acme").0, Duration::from_secs(1));
        let tpm = Config::parse(&with_tpm("tcti = \"swtpm:port=2321\"\ncall_timeout = \"2s\"")).unwrap();
        let (timeout, setting) = tpm.tenants["acme"].call_timeout("acme");
        assert_eq!((timeout, setting.as_str()), (Duration::from_secs(2), "tenants.acme.tpm.call_timeout"));

        for bad in ["0s", "10ms", "1h"] {
            let e = Config::parse(&format!("{}call_timeout = \"{bad}\"\n", with_module(""))).unwrap_err();
            assert_eq!(e.field, "tenants.acme.pkcs11.call_timeout", "{e}");
            let e =
                Config::parse(&with_tpm(&format!("tcti = \"swtpm:port=2321\"\ncall_timeout = \"{bad}\"")))
                    .unwrap_err();
            assert_eq!(e.field, "tenants.acme.tpm.call_timeout", "{e}");
        }
        for bad in ["0s", "500ms", "2h"] {
            let e = Config::parse(&format!("worker_watchdog = \"{bad}\"\n{}", with_module(""))).unwrap_err();
            assert_eq!(e.field, "worker_watchdog", "{e}");
        }
    }

    #[test]
    fn pin_from_an_environment_variable() {
        // A variable name no other test uses: tests share the process environment.
        let var = format!("KEKD_TEST_PIN_{}", std::process::id());
        let text = with_module("")
            .replace(&format!("pin_file = \"{}\"", pin_file().display()), &format!("pin_env = \"{var}\""));
        let e = Config::parse(&text).unwrap_err();
        assert_eq!(e.field, "tenants.acme.pkcs11.pin_env", "{e}");
        assert!(e.problem.contains(&var), "{e}");
        std::env::set_var(&var, "5678");
        let cfg = Config::parse(&text).unwrap();
        assert_eq!(cfg.tenants["acme"].pkcs11.as_ref().unwrap().read_pin("p").unwrap().as_str(), "5678");
        std::env::remove_var(&var);
    }

    #[test]
    fn errors_name_the_field() {
        let e = Config::parse(&with_module("kek_tll = \"30s\"")).unwrap_err();
        assert_eq!(e.field, "tenants.acme.kek_tll", "{e}");
        assert!(e.problem.contains("unknown field"), "{e}");
        let e = Config::parse(&with_module("kek_ttl = \"30 parsecs\"")).unwrap_err();
        assert_eq!(e.field, "tenants.acme.kek_ttl", "{e}");
        let e = Config::parse(&with_module("").replace("pin_file", "#pin_file")).unwrap_err();
        assert_eq!(e.field, "tenants.acme.pkcs11.pin_file", "{e}");
        let e = Config::parse(&with_module("").replace("/bin/sh", "/nonexistent/lib.so")).unwrap_err();
        assert_eq!(e.field, "tenants.acme.pkcs11.module", "{e}");
        assert!(e.problem.contains("/nonexistent/lib.so"), "{e}");
        let e = Config::parse(&with_module("").replace("[tenants.acme]", "[tenants.Acme]")).unwrap_err();
        assert_eq!(e.field, "tenants.Acme", "{e}");
        for bad in ["0", "1025"] {
            let text = format!("{}max_sessions = {bad}\n", with_module(""));
            let e = Config::parse(&text).unwrap_err();
            assert_eq!(e.field, "tenants.acme.pkcs11.max_sessions", "{e}");
        }
        let cfg = Config::parse(&format!("{}max_sessions = 4\n", with_module(""))).unwrap();
        assert_eq!(cfg.tenants["acme"].pkcs11.as_ref().unwrap().max_sessions, 4);
        let cfg = Config::parse(&with_module("")).unwrap();
        assert_eq!(cfg.tenants["acme"].pkcs11.as_ref().unwrap().max_sessions, DEFAULT_MAX_SESSIONS);
    }

    #[test]
    fn audit_settings_and_their_errors() {
        let cfg = Config::parse(&with_module("")).unwrap();
        assert_eq!(cfg.audit, AuditConfig::default());
        assert_eq!(cfg.audit.mode, AuditMode::FailClosed);
        assert_eq!(cfg.audit.fsync, FsyncPolicy::Interval);
        assert_eq!(cfg.audit.facility(), Some(10));
        assert_eq!(cfg.audit.max_bytes_per_day, 20 << 30);
        assert_eq!(cfg.audit.syslog_max_message, 8192);
        assert_eq!(cfg.audit.checkpoint_interval, Duration::from_secs(60));
        let audit = |table: &str| format!("{}\n[audit]\n{table}\n", with_module(""));
        let cfg = Config::parse(&audit(
            "dir = \"/var/audit\"\nmode = \"best_effort\"\nfsync = \"batch\"\nsyslog = \"/dev/log\"\n\
             syslog_max_message = 480\ncheckpoint_interval = \"5m\"",
        ))
        .unwrap();
        assert_eq!(cfg.audit.syslog_max_message, 480);
        assert_eq!(cfg.audit.checkpoint_interval, Duration::from_secs(300));
        assert_eq!(cfg.audit.mode, AuditMode::BestEffort);
        assert_eq!(cfg.audit.fsync, FsyncPolicy::Batch);
        assert_eq!(cfg.audit.syslog.as_deref(), Some(Path::new("/dev/log")));
        for (table, field, says) in [
            ("mode = \"fail_open\"", "audit.mode", "unknown variant `fail_open`"),
            ("fsync = \"never\"", "audit.fsync", "unknown variant `never`"),
            ("dir = \"audit\"", "audit.dir", "absolute"),
            ("fsync_interval = \"1h\"", "audit.fsync_interval", "between 10ms and 5m"),
            ("checkpoint_interval = \"0s\"", "audit.checkpoint_interval", "more than 0"),
            ("checkpoint_interval = 60", "audit.checkpoint_interval", ""),
            ("syslog_facility = \"mail\"", "audit.syslog_facility", "unknown facility \"mail\""),
            ("syslog_max_message = 479", "audit.syslog_max_message", "between 480 (the least a syslog"),
            ("syslog_max_message = 65508", "audit.syslog_max_message", "and 65507 bytes"),
            ("syslog_max_message = \"8K\"", "audit.syslog_max_message", "invalid type"),
            ("sylog = \"/dev/log\"", "audit.sylog", "unknown field"),
            ("max_bytes_per_day = 1000", "audit.max_bytes_per_day", "at least 65536"),
            ("max_bytes_per_day = \"20G\"", "audit.max_bytes_per_day", ""),
        ] {
            let e = Config::parse(&audit(table)).unwrap_err();
            assert_eq!(e.field, field, "{table}: {e}");
            assert!(e.problem.contains(says), "{table}: {e}");
        }
    }

    #[test]
    fn a_tpm_tenant_and_its_defaults() {
        let cfg =
            Config::parse(&with_tpm("tcti = \"swtpm:host=127.0.0.1,port=2321\"\npcrs = [7, 16]")).unwrap();
        let t = &cfg.tenants["acme"];
        let Some(BackendConfig::Tpm(tpm)) = t.backend() else { panic!("not a TPM tenant: {t:?}") };
        assert_eq!(tpm.pcrs, [7, 16]);
        assert!(!tpm.parameter_encryption(), "off by default for a socket TCTI");
        assert_eq!(tpm.primary_handle(), Ok(None));
        let cfg =
            Config::parse(&with_tpm("tcti = \"device:/dev/null\"\nprimary_handle = \"0x81000001\"")).unwrap();
        let Some(BackendConfig::Tpm(tpm)) = cfg.tenants["acme"].backend() else { panic!() };
        assert!(tpm.parameter_encryption(), "on by default for a device");
        assert_eq!(tpm.primary_handle(), Ok(Some(0x8100_0001)));
    }

    #[test]
    fn tpm_errors_name_the_field() {
        for (table, field, says) in [
            (
                "tcti = \"device:/dev/no-such-tpm\"",
                "tenants.acme.tpm.tcti",
                "/dev/no-such-tpm does not exist",
            ),
            ("tcti = \"serial:/dev/ttyS0\"", "tenants.acme.tpm.tcti", "unknown TCTI \"serial\""),
            ("tcti = \"swtpm:\"\npcrs = [24]", "tenants.acme.tpm.pcrs", "PCR 24 does not exist"),
            ("tcti = \"swtpm:\"\npcrs = [7, 7]", "tenants.acme.tpm.pcrs", "PCR 7 is listed twice"),
            (
                "tcti = \"swtpm:\"\nprimary_handle = \"0x80000001\"",
                "tenants.acme.tpm.primary_handle",
                "not a persistent handle",
            ),
            ("tcti = \"swtpm:\"\npcr = [7]", "tenants.acme.tpm.pcr", "unknown field"),
        ] {
            let e = Config::parse(&with_tpm(table)).unwrap_err();
            assert_eq!(e.field, field, "{table}: {e}");
            assert!(e.problem.contains(says), "{table}: {e}");
        }
        let both = with_module("")
            .replace("[tenants.acme.pkcs11]", "[tenants.acme.tpm]\ntcti = \"swtpm:\"\n[tenants.acme.pkcs11]");
        let e = Config::parse(&both).unwrap_err();
        assert_eq!(e.field, "tenants.acme.tpm", "{e}");
        assert!(e.problem.contains("not both"), "{e}");
        let neither = "[tenants.acme]\nallow_uids = [1000]\n";
        let e = Config::parse(neither).unwrap_err();
        assert!(e.problem.contains("[tenants.acme.tpm]"), "{e}");
    }

    #[test]
    fn limits_their_defaults_and_their_errors() {
        let cfg = Config::parse(&with_module("")).unwrap();
        assert_eq!(cfg.limits, LimitsConfig::default());
        assert_eq!(
            (cfg.limits.max_connections, cfg.limits.max_connections_per_tenant),
            (512, 256),
            "room for both in the 1024 descriptors a service gets by default"
        );
        let conn = cfg.connection_limits();
        assert_eq!(cfg.limits.max_pending_per_uid, 8);
        assert_eq!(conn, ConnectionLimits::default());
        assert_eq!(conn.max_in_flight, 256);
        assert_eq!(conn.frame_read_timeout, Duration::from_secs(10));
        assert_eq!(conn.write_timeout, Duration::from_secs(10));
        assert_eq!(conn.max_batch_items, kekd_proto::MAX_BATCH);
        assert_eq!(conn.max_frame_bytes, kekd_proto::DEFAULT_MAX_FRAME);
        assert_eq!(conn.max_pending_reply_bytes, 64 << 20);

        let limits = |table: &str| format!("{}\n[limits]\n{table}\n", with_module(""));
        let cfg = Config::parse(&limits(
            "max_connections = 10\nmax_connections_per_tenant = 3\nmax_in_flight_per_connection = 4\n\
             frame_read_timeout = \"500ms\"\nwrite_timeout = \"2s\"\nmax_batch_items = 16\n\
             max_pending_reply_bytes = 8388608",
        ))
        .unwrap();
        assert_eq!(
            cfg.connection_limits(),
            ConnectionLimits {
                max_frame_bytes: kekd_proto::DEFAULT_MAX_FRAME,
                max_in_flight: 4,
                frame_read_timeout: Duration::from_millis(500),
                write_timeout: Duration::from_secs(2),
                max_batch_items: 16,
                max_pending_reply_bytes: 8 << 20,
            }
        );
        assert_eq!((cfg.limits.max_connections, cfg.limits.max_connections_per_tenant), (10, 3));
        for (table, field, says) in [
            ("max_connections = 0", "limits.max_connections", "between 1 and"),
            ("max_connections_per_tenant = 0", "limits.max_connections_per_tenant", "between 1 and"),
            (
                "max_connections = 10\nmax_connections_per_tenant = 11",
                "limits.max_connections_per_tenant",
                "11 exceeds max_connections (10)",
            ),
            (
                "max_in_flight_per_connection = 0",
                "limits.max_in_flight_per_connection",
                "between 1 and 65536",
            ),
            ("max_batch_items = 4097", "limits.max_batch_items", "between 1 and 4096"),
            ("max_pending_per_uid = 0", "limits.max_pending_per_uid", "between 1 and"),
            ("max_pending_per_uid = 1048577", "limits.max_pending_per_uid", "between 1 and"),
            ("max_pending_per_uid = \"8\"", "limits.max_pending_per_uid", ""),
            ("frame_read_timeout = \"10ms\"", "limits.frame_read_timeout", "between 100ms and 1h"),
            ("frame_read_timeout = \"2h\"", "limits.frame_read_timeout", "between 100ms and 1h"),
            ("frame_read_timeout = \"soon\"", "limits.frame_read_timeout", ""),
            ("write_timeout = \"50ms\"", "limits.write_timeout", "between 100ms and 1h"),
            ("max_pending_reply_bytes = 1000", "limits.max_pending_reply_bytes", "between 1048576 (1 MiB)"),
            ("max_conections = 5", "limits.max_conections", "unknown field"),
            ("max_connections = -1", "limits.max_connections", ""),
        ] {
            let e = Config::parse(&limits(table)).unwrap_err();
            assert_eq!(e.field, field, "{table}: {e}");
            assert!(e.problem.contains(says), "{table}: {e}");
        }
    }
}
