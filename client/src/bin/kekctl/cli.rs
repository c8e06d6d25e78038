//! Command-line syntax. Everything a user can get wrong here is a usage error (exit 2)
//! reported by clap before any connection is made.

use std::collections::BTreeMap;
use std::path::PathBuf;

use clap::error::ErrorKind;
use clap::{Args, CommandFactory, Parser, Subcommand};
use kekd_client::{Context, KeyName, Metadata, TenantName};
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

/// Options shared by every command; `global` lets scripts put them before or after the
/// subcommand.
#[derive(Args)]
pub struct Global {
    /// Unix socket of the daemon
    #[arg(
        long,
        global = true,
        env = "KEKD_SOCKET",
        value_name = "PATH",
        default_value = "/run/kekd/kekd.sock"
    )]
    pub socket: PathBuf,
    /// Tenant to act for (required)
    #[arg(long, global = true, env = "KEKD_TENANT", value_name = "NAME", value_parser = parse_tenant)]
    pub tenant: Option<TenantName>,
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
}

#[derive(Subcommand)]
pub enum Command {
    /// Show the tenant worker's health
    Status,
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

fn parse_pair(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err("expected KEY=VALUE with a non-empty KEY".into()),
    }
}

/// What every command needs besides its own arguments.
pub struct Settings {
    pub socket: PathBuf,
    pub tenant: TenantName,
    pub json: bool,
    pub context: Context,
    pub metadata: Metadata,
}

impl Global {
    /// Checks what clap cannot express: global options cannot be `required`, and the
    /// context's limits apply to the entries together.
    pub fn settings(self) -> Result<Settings, clap::Error> {
        let usage = |kind, msg: String| Cli::command().error(kind, msg);
        let tenant = self.tenant.ok_or_else(|| {
            usage(ErrorKind::MissingRequiredArgument, "--tenant NAME (or KEKD_TENANT) is required".into())
        })?;
        let mut map = BTreeMap::new();
        for (k, v) in self.context {
            if map.insert(k.clone(), v).is_some() {
                return Err(usage(ErrorKind::ValueValidation, format!("--context: key {k:?} given twice")));
            }
        }
        let context =
            Context::new(map).map_err(|e| usage(ErrorKind::ValueValidation, format!("--context: {e}")))?;
        let metadata = Metadata {
            principal: self.principal.unwrap_or_default(),
            data_label: self.data_label.unwrap_or_default(),
            ..Metadata::default()
        };
        Ok(Settings { socket: self.socket, tenant, json: self.json, context, metadata })
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
            assert_eq!(s.tenant.as_str(), "acme");
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
        cli.global.tenant = None;
        let err = cli.global.settings().err().unwrap();
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains("--tenant"), "{err}");
    }
}
