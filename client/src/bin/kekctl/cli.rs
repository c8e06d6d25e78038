//! Command-line syntax. Everything a user can get wrong here is a usage error (exit 2)
//! reported by clap before any connection is made.
//!
//! Most commands talk to kekd for one tenant; `audit` works on files alone and needs
//! neither a tenant nor the socket.

use std::collections::BTreeMap;
use std::path::PathBuf;

use clap::error::ErrorKind;
use clap::{ArgMatches, Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use kekd_client::{Context, Endpoint, KeyName, Metadata, TenantName};
use kekd_proto::MAX_BATCH;

use crate::exit;

#[derive(Parser)]
#[command(
    name = "kekctl",
    version,
    about = "Talk to kekd: generate, wrap and unwrap data keys, and manage KEKs",
    long_about = "Talk to kekd: generate, wrap and unwrap data keys, and manage KEKs.\n\n\
        Binary input and output on stdin/stdout are raw bytes; --json output uses base64 \
        (standard alphabet, padded).",
    after_long_help = exit::help_text(),
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

/// Options shared by every command, and whether the command talks to kekd at all.
pub struct Global {
    pub args: GlobalArgs,
    /// The command works offline (`audit`): no tenant is required and nothing connects.
    pub offline: bool,
}

/// Subcommands that never connect to kekd.
const OFFLINE_COMMANDS: [&str; 1] = ["audit"];

// By hand rather than derived, to learn the subcommand while the options are read: `Cli`
// reads `global` before `command`, so the subcommand is still in the matches here.
impl FromArgMatches for Global {
    fn from_arg_matches(matches: &ArgMatches) -> Result<Self, clap::Error> {
        Self::from_arg_matches_mut(&mut matches.clone())
    }

    fn from_arg_matches_mut(matches: &mut ArgMatches) -> Result<Self, clap::Error> {
        let offline = matches.subcommand_name().is_some_and(|name| OFFLINE_COMMANDS.contains(&name));
        let bench_tenant = bench_tenant(matches);
        let mut args = GlobalArgs::from_arg_matches_mut(matches)?;
        args.tenant = args.tenant.or(bench_tenant);
        Ok(Global { args, offline })
    }

    fn update_from_arg_matches(&mut self, matches: &ArgMatches) -> Result<(), clap::Error> {
        self.update_from_arg_matches_mut(&mut matches.clone())
    }

    fn update_from_arg_matches_mut(&mut self, matches: &mut ArgMatches) -> Result<(), clap::Error> {
        self.offline = matches.subcommand_name().is_some_and(|name| OFFLINE_COMMANDS.contains(&name));
        let bench_tenant = bench_tenant(matches);
        self.args.update_from_arg_matches_mut(matches)?;
        self.args.tenant = self.args.tenant.take().or(bench_tenant);
        Ok(())
    }
}

/// `bench --tenants A,B` and `status --tenants A,B` act for those tenants, so they need no
/// `--tenant`: the first of them stands in for it.
fn bench_tenant(matches: &ArgMatches) -> Option<TenantName> {
    let (_, sub) = matches.subcommand().filter(|(name, _)| ["bench", "status"].contains(name))?;
    let tenants = sub.try_get_many::<TenantName>("tenants").ok()??;
    tenants.into_iter().next().cloned()
}

impl Args for Global {
    fn group_id() -> Option<clap::Id> {
        GlobalArgs::group_id()
    }

    fn augment_args(cmd: clap::Command) -> clap::Command {
        GlobalArgs::augment_args(cmd)
    }

    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        GlobalArgs::augment_args_for_update(cmd)
    }
}

/// Options shared by every command; `global` lets scripts put them before or after the
/// subcommand.
#[derive(Args)]
pub struct GlobalArgs {
    /// Unix socket of the daemon
    #[arg(
        long,
        global = true,
        env = "KEKD_SOCKET",
        value_name = "PATH",
        default_value = "/run/kekd/kekd.sock"
    )]
    pub socket: PathBuf,
    /// Connect over vsock to CID:PORT instead of the Unix socket (from a virtual machine
    /// or enclave: the host is CID 2)
    #[arg(long, global = true, env = "KEKD_VSOCK", value_name = "CID:PORT", value_parser = parse_vsock)]
    pub vsock: Option<Endpoint>,
    /// Tenant to act for (required)
    #[arg(long, global = true, env = "KEKD_TENANT", value_name = "NAME", value_parser = parse_tenant)]
    pub tenant: Option<TenantName>,
    /// Give up on kekd after this long without an answer (humantime: 500ms, 5s, 1m),
    /// with UNAVAILABLE; for each exchange, the Hello included
    #[arg(
        long,
        global = true,
        env = "KEKD_TIMEOUT",
        value_name = "DURATION",
        default_value = "30s",
        value_parser = parse_timeout
    )]
    pub timeout: std::time::Duration,
    /// Print JSON instead of text or raw bytes
    #[arg(long, global = true)]
    pub json: bool,
    /// Encryption context entry, bound into the EDEK; repeat for several. Unwrap and
    /// rewrap need the same entries as wrap
    #[arg(long = "context", global = true, value_name = "KEY=VALUE", value_parser = parse_pair)]
    pub context: Vec<(String, String)>,
    /// User or service on whose behalf the request is made (audit log)
    #[arg(long, global = true, value_name = "STR")]
    pub principal: Option<String>,
    /// What the data key protects (audit log)
    #[arg(long, global = true, value_name = "STR")]
    pub data_label: Option<String>,
    /// The caller's own request or trace id (audit log)
    #[arg(long, global = true, value_name = "STR")]
    pub request_id: Option<String>,
    /// Address of the end user the request is made for (audit log)
    #[arg(long, global = true, value_name = "STR")]
    pub source_address: Option<String>,
    /// Free-form audit field; repeat for several (at most 1 KiB in all)
    #[arg(long = "audit-field", global = true, value_name = "KEY=VALUE", value_parser = parse_pair)]
    pub audit_field: Vec<(String, String)>,
}

#[derive(Subcommand)]
pub enum Command {
    /// Show the tenant's worker: pid, uptime, backend health, lease, cached KEKs, keys and
    /// their versions (admins only), operations served and errors by code
    #[command(long_about = "Show the tenant's worker: its pid and uptime, the root key's health \
            and lease (online, grace, expired), cached KEKs, each key with its versions and \
            their states (to admins only, like `keys list`), the requests and batch items it \
            served per operation, and its error answers per status code, all since the worker \
            started. With --tenants, each tenant listed in turn (with --json, an array); a \
            tenant that cannot be asked is shown with its error, and the exit status is that \
            of the first such error.")]
    Status {
        /// Tenants to show, comma-separated (default: --tenant)
        #[arg(long, value_name = "NAME,...", value_delimiter = ',', value_parser = parse_tenant)]
        tenants: Vec<TenantName>,
    },
    /// Generate fresh 32-byte data keys
    Generate {
        /// KEK to wrap the data keys with
        #[arg(long, value_parser = parse_key)]
        key: KeyName,
        /// Number of data keys
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=MAX_BATCH as i64))]
        count: u32,
        /// Return only the wrapped keys, never the plaintext
        #[arg(long)]
        edek_only: bool,
    },
    /// Wrap the secret read from stdin; writes the raw EDEK
    Wrap {
        /// KEK to wrap with
        #[arg(long, value_parser = parse_key)]
        key: KeyName,
    },
    /// Unwrap the raw EDEK read from stdin; writes the raw plaintext
    Unwrap,
    /// Re-encrypt the raw EDEK read from stdin under its key's active version
    Rewrap,
    /// Manage KEKs (admin principals only)
    #[command(subcommand)]
    Keys(KeysCommand),
    /// The tenant's root key (admin principals only)
    #[command(subcommand)]
    Root(RootCommand),
    /// The tenant as a whole (admin principals only)
    #[command(subcommand)]
    Tenant(TenantCommand),
    /// Audit log files (offline: needs no tenant and does not connect to kekd)
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Load-test kekd: requests/s, DEKs/s and latency percentiles for one operation
    #[command(long_about = "Load-test kekd: requests/s, DEKs/s and latency percentiles (p50, p90, \
            p99, p99.9, from an HDR histogram) for one operation. Each connection keeps \
            --pipeline requests of --batch items in flight; connections are spread \
            round-robin over --tenants. A warmup runs first and is not counted. Unwrap and \
            rewrap first generate a pool of EDEKs per tenant under --key; wrap sends random \
            32-byte secrets. The global --context and audit options apply to every request. \
            Failed requests are counted by status code and do not stop the run; the exit \
            status is nonzero only if setup failed or every request failed. On a terminal a \
            live progress line is drawn on stderr; --json prints one object on stdout.")]
    Bench(kekd_client::bench::BenchArgs),
}

#[derive(Subcommand)]
pub enum AuditCommand {
    /// Check the hash chain of audit log files (docs/FORMATS.md, section 5), and with
    /// --config their checkpoints
    #[command(long_about = "Check the hash chain of audit log files (docs/FORMATS.md, section 5): every \
            record's hash, that each links to the one before it, that seq counts up by one, and \
            that no file ends in a truncated record. The chain continues across the files in \
            the order given, so give a tenant's files oldest first. Prints the number of records \
            and the hash of the last one (compare it with a copy kept elsewhere: the chain \
            alone cannot show records cut off its end, or a chain rewritten from some record \
            on). The first file must begin with the tenant's first record (seq 1), or else the \
            records before it were removed; a trail whose older days were archived is verified \
            with --from SEQ:HASH, the last record a verify of the archived files printed (every \
            verify prints its last record so). A broken chain names its first broken record as \
            FILE:LINE and exits 11.\n\n\
            Checkpoints (section 5, \"Checkpoints\") anchor the chain in the tenant's root key. \
            Without --config they are only counted, and the output says they were NOT checked. \
            With --config kekd.toml --tenant NAME, kekctl opens the tenant's root key as that \
            configuration says (run it as root; with a TPM without a resource manager, such as \
            swtpm, while kekd is stopped), unseals the tenant's checkpoint key (audit.kek in its \
            key store) and checks each checkpoint's MAC and that it names the record right \
            before it: a chain rewritten before a checkpoint fails there (exit 11). Without \
            FILEs it reads every <audit.dir>/<tenant>/YYYY-MM-DD.jsonl, oldest first. Either \
            way it prints how many records come after the last checkpoint: nothing anchors \
            those.")]
    Verify {
        /// Audit log files (`<tenant>/<YYYY-MM-DD>.jsonl`), oldest first; with --config,
        /// by default every day file of the tenant's trail
        #[arg(value_name = "FILE", required_unless_present = "config")]
        files: Vec<PathBuf>,
        /// The files continue the trail after this record (as printed by the verify of the
        /// files before them), instead of starting at seq 1
        #[arg(long, value_name = "SEQ:HASH")]
        from: Option<kekd_client::audit::Start>,
        /// Check the checkpoints' MACs with the root key of --tenant, opened as this kekd
        /// configuration file says
        #[arg(long, value_name = "KEKD_TOML")]
        config: Option<PathBuf>,
    },
    /// Print every record that names one EDEK (docs/FORMATS.md, section 5)
    #[command(long_about = "Print every record that names one EDEK (docs/FORMATS.md, section 5): \
            who generated, wrapped, unwrapped or rewrapped it, when, with what outcome. An \
            EDEK is named in the trail by its id, its 12-byte nonce in unpadded base64url; \
            give the EDEK itself (--edek FILE: raw, or the base64 of `kekctl --json \
            generate`) or its id (--id). Searches the files given, a directory standing for \
            its *.jsonl files in date order (a tenant's <audit.dir>/<tenant>). Prints one line \
            per item found (with --json, one object per line: the record's members, the \
            item's, `item` its index and `as` how it names the EDEK: edek, from or to); exits \
            5 (NOT_FOUND) when no record names it. Records before audit format 2 name no \
            EDEK. Does not verify the chain: run `kekctl audit verify` on the same files.")]
    Find {
        /// A file holding the EDEK
        #[arg(long, value_name = "FILE", conflicts_with = "id", required_unless_present = "id")]
        edek: Option<PathBuf>,
        /// The EDEK's id, as the trail writes it (16 characters of base64url)
        #[arg(long, value_name = "ID", value_parser = parse_edek_id)]
        id: Option<kekd_client::audit_find::EdekId>,
        /// Audit log files or a tenant's audit directory
        #[arg(value_name = "PATH", required = true)]
        paths: Vec<PathBuf>,
    },
}

fn parse_edek_id(s: &str) -> Result<kekd_client::audit_find::EdekId, String> {
    kekd_client::audit_find::EdekId::parse(s).map_err(|e| e.to_string())
}

#[derive(Subcommand)]
pub enum RootCommand {
    /// Create (or adopt) a new root key and rewrap every KEK record under it
    Rotate {
        /// Label of the new root key on the token (default: a generated one)
        #[arg(long)]
        label: Option<String>,
    },
    /// Bring your own key, step 1: print (PEM) the RSA public key to wrap your key to
    ImportKey {
        /// Label the imported root key will have on the token
        #[arg(long)]
        label: String,
    },
    /// Bring your own key, step 2: import the wrapped key read from stdin and make it the
    /// tenant's root key
    Import {
        /// Label given to `import-key`
        #[arg(long)]
        label: String,
        /// RSAES_OAEP_SHA_256, RSA_AES_KEY_WRAP_SHA_256, RSAES_OAEP_SHA_1 or RSA_AES_KEY_WRAP_SHA_1
        #[arg(long)]
        algorithm: String,
    },
}

#[derive(Subcommand)]
pub enum TenantCommand {
    /// Crypto-shred every key of the tenant: all data under it is lost for good
    Destroy {
        /// The tenant's name, again, to confirm
        #[arg(long, value_name = "TENANT", value_parser = parse_tenant)]
        confirm: TenantName,
    },
}

#[derive(Subcommand)]
pub enum KeysCommand {
    /// List keys and their versions
    List,
    /// Create a key with its first version
    Create(KeyArg),
    /// Add a new active version; the old one becomes decrypt-only
    Rotate(KeyArg),
    /// Disable one version (reversible)
    Disable(VersionArgs),
    /// Re-enable a disabled version
    Enable(VersionArgs),
    /// Crypto-shred one version: data wrapped by it is lost for good
    Destroy(VersionArgs),
    /// Set a key's version controls
    Set(PolicyArgs),
}

#[derive(Args)]
#[command(group(clap::ArgGroup::new("policy").required(true).multiple(true).args(["min_decrypt_version", "keep_versions"])))]
pub struct PolicyArgs {
    #[arg(value_name = "NAME", value_parser = parse_key)]
    pub name: KeyName,
    /// Refuse to decrypt under versions below this one (0: none)
    #[arg(long)]
    pub min_decrypt_version: Option<u32>,
    /// After each rotation, destroy versions older than the newest N (0: keep all)
    #[arg(long)]
    pub keep_versions: Option<u32>,
}

#[derive(Args)]
pub struct KeyArg {
    #[arg(value_name = "NAME", value_parser = parse_key)]
    pub name: KeyName,
}

#[derive(Args)]
pub struct VersionArgs {
    #[arg(value_name = "NAME", value_parser = parse_key)]
    pub name: KeyName,
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub version: u32,
}

fn parse_tenant(s: &str) -> Result<TenantName, String> {
    TenantName::parse(s)
}

fn parse_key(s: &str) -> Result<KeyName, String> {
    KeyName::parse(s)
}

fn parse_timeout(s: &str) -> Result<std::time::Duration, String> {
    kekd_client::bench::parse_duration(s)
}

fn parse_vsock(s: &str) -> Result<Endpoint, String> {
    Endpoint::parse_vsock(s).map_err(|e| e.to_string())
}

fn parse_pair(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err("expected KEY=VALUE with a non-empty KEY".into()),
    }
}

/// What every command needs besides its own arguments.
pub struct Settings {
    /// The Unix socket, or the vsock address when `--vsock` is given.
    pub socket: Endpoint,
    /// Always set for a command that connects; `None` only for an offline one.
    pub tenant: Option<TenantName>,
    /// `--timeout`: the bound on each exchange with kekd.
    pub timeout: std::time::Duration,
    pub json: bool,
    pub context: Context,
    pub metadata: Metadata,
}

impl Global {
    /// Checks what clap cannot express: global options cannot be `required`, and the
    /// context's limits apply to the entries together.
    pub fn settings(self) -> Result<Settings, clap::Error> {
        let usage = |kind, msg: String| Cli::command().error(kind, msg);
        let Global { args, offline } = self;
        let tenant = match args.tenant {
            Some(tenant) => Some(tenant),
            None if offline => None,
            None => {
                let msg = "--tenant NAME (or KEKD_TENANT) is required".into();
                return Err(usage(ErrorKind::MissingRequiredArgument, msg));
            }
        };
        let mut map = BTreeMap::new();
        for (k, v) in args.context {
            if map.insert(k.clone(), v).is_some() {
                return Err(usage(ErrorKind::ValueValidation, format!("--context: key {k:?} given twice")));
            }
        }
        let context =
            Context::new(map).map_err(|e| usage(ErrorKind::ValueValidation, format!("--context: {e}")))?;
        let mut fields = BTreeMap::new();
        for (k, v) in args.audit_field {
            if fields.insert(k.clone(), v).is_some() {
                return Err(usage(
                    ErrorKind::ValueValidation,
                    format!("--audit-field: key {k:?} given twice"),
                ));
            }
        }
        let metadata = Metadata {
            principal: args.principal.unwrap_or_default(),
            data_label: args.data_label.unwrap_or_default(),
            caller_request_id: args.request_id.unwrap_or_default(),
            source_address: args.source_address.unwrap_or_default(),
            fields,
        };
        let socket = args.vsock.unwrap_or(Endpoint::Unix(args.socket));
        Ok(Settings { socket, tenant, timeout: args.timeout, json: args.json, context, metadata })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("kekctl").chain(args.iter().copied()))
    }

    #[test]
    fn definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn globals_go_before_or_after_the_command() {
        let before = parse(&["--tenant", "acme", "--json", "--context", "a=1", "status"]).unwrap();
        let after = parse(&["status", "--tenant", "acme", "--json", "--context", "a=1"]).unwrap();
        for cli in [before, after] {
            let s = cli.global.settings().unwrap();
            assert_eq!(s.tenant.unwrap().as_str(), "acme");
            assert!(s.json);
            assert_eq!(s.context.entries().get("a").map(String::as_str), Some("1"));
        }
    }

    #[test]
    fn context_values_may_contain_equals_and_be_empty() {
        let cli = parse(&["unwrap", "--tenant", "t", "--context", "a=b=c", "--context", "e="]).unwrap();
        let s = cli.global.settings().unwrap();
        assert_eq!(s.context.entries()["a"], "b=c");
        assert_eq!(s.context.entries()["e"], "");
    }

    #[test]
    fn usage_errors_name_the_argument() {
        let err = parse(&["status", "--context", "novalue"]).err().unwrap();
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains("--context"), "{err}");

        let err = parse(&["status", "--tenant", "t", "--context", "a=1", "--context", "a=2"])
            .unwrap()
            .global
            .settings()
            .err()
            .unwrap();
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains("--context"), "{err}");

        let err = parse(&["generate", "--key", "a//b"]).err().unwrap();
        assert!(err.to_string().contains("--key"), "{err}");
        let err = parse(&["keys", "disable", "k", "--version", "0"]).err().unwrap();
        assert!(err.to_string().contains("--version"), "{err}");
    }

    #[test]
    fn tenant_is_required() {
        // The environment may set KEKD_TENANT; parse without it to test the check itself.
        let mut cli = parse(&["status"]).unwrap();
        assert!(!cli.global.offline);
        cli.global.args.tenant = None;
        let err = cli.global.settings().err().unwrap();
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains("--tenant"), "{err}");
        let mut cli = parse(&["keys", "list"]).unwrap();
        cli.global.args.tenant = None;
        assert!(cli.global.settings().is_err());
    }

    #[test]
    fn bench_takes_its_tenants_or_the_global_one() {
        let mut cli = parse(&["bench", "--op", "wrap", "--batch", "8", "--duration", "2s"]).unwrap();
        cli.global.args.tenant = None;
        assert!(cli.global.settings().is_err(), "no --tenant and no --tenants");
        let cli = parse(&["bench", "--tenants", "a,b", "--connections", "2", "--json"]).unwrap();
        // KEKD_TENANT, if the environment sets it, wins over the stand-in.
        assert!(cli.global.args.tenant.is_some());
        let Command::Bench(args) = cli.command else { panic!("not bench") };
        assert_eq!(args.tenants.len(), 2);
        assert!(cli.global.settings().unwrap().json);
        let err = parse(&["bench", "--tenant", "t", "--batch", "0"]).err().unwrap();
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains("--batch"), "{err}");
    }

    #[test]
    fn status_takes_a_list_of_tenants_instead_of_one() {
        let cli = parse(&["status", "--tenants", "a,b", "--tenants", "c", "--json"]).unwrap();
        let Command::Status { tenants } = &cli.command else { panic!("not status") };
        let names: Vec<&str> = tenants.iter().map(TenantName::as_str).collect();
        assert_eq!(names, ["a", "b", "c"]);
        // Without KEKD_TENANT in the environment, the first of them stands in for --tenant.
        let cli = parse(&["status", "--tenants", "a,b"]).unwrap();
        assert!(cli.global.settings().is_ok(), "--tenants needs no --tenant");
        let err = parse(&["status", "--tenants", "a,B"]).err().unwrap();
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains("--tenants"), "{err}");
    }

    #[test]
    fn audit_verify_needs_files_but_no_tenant() {
        let mut cli = parse(&["audit", "verify", "a.jsonl", "b.jsonl", "--json"]).unwrap();
        assert!(cli.global.offline);
        cli.global.args.tenant = None;
        let Command::Audit(AuditCommand::Verify { files, from, config }) = cli.command else {
            panic!("not audit verify")
        };
        assert_eq!(files, [PathBuf::from("a.jsonl"), PathBuf::from("b.jsonl")]);
        assert_eq!((from, config), (None, None));
        let s = cli.global.settings().unwrap();
        assert!(s.tenant.is_none());
        assert!(s.json);

        let err = parse(&["audit", "verify"]).err().unwrap();
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains("FILE"), "{err}");

        let hash = "ab".repeat(32);
        let cli = parse(&["audit", "verify", "--from", &format!("41:{hash}"), "b.jsonl"]).unwrap();
        let Command::Audit(AuditCommand::Verify { from, .. }) = cli.command else {
            panic!("not audit verify")
        };
        assert_eq!(from, Some(kekd_client::audit::Start::After { seq: 41, hash }));
        let err = parse(&["audit", "verify", "--from", "41", "b.jsonl"]).err().unwrap();
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains("SEQ:HASH"), "{err}");

        // With --config, the files may be left out: the tenant's whole trail.
        let cli = parse(&["audit", "verify", "--config", "/etc/kekd/kekd.toml", "--tenant", "acme"]).unwrap();
        assert_eq!(cli.global.settings().unwrap().tenant.unwrap().as_str(), "acme");
        let Command::Audit(AuditCommand::Verify { files, config, .. }) = cli.command else {
            panic!("not audit verify")
        };
        assert!(files.is_empty());
        assert_eq!(config, Some(PathBuf::from("/etc/kekd/kekd.toml")));
    }
}
