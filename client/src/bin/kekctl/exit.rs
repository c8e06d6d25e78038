//! Errors and exit codes: the part of kekctl that scripts depend on most.

use std::fmt;
use std::path::PathBuf;
use std::process::ExitCode;

use kekd_client::audit::{Broken, VerifyError};
use kekd_client::{code_name, ClientError, Code, ErrorStatus};

/// Exit status per wire code. Scripts branch on these, so they never change meaning.
pub const EXIT_CODES: [(Code, u8); 8] = [
    (Code::InvalidArgument, 3),
    (Code::PermissionDenied, 4),
    (Code::NotFound, 5),
    (Code::FailedPrecondition, 6),
    (Code::DataInvalid, 7),
    (Code::Unavailable, 8),
    (Code::ResourceExhausted, 9),
    (Code::Internal, 10),
];
/// A client-side failure that has no wire code (unreadable stdin or file, closed stdout).
pub const EXIT_LOCAL: u8 = 1;
/// Bad command line; clap exits with this itself.
pub const EXIT_USAGE: u8 = 2;
/// `audit verify`: the files were read, and their hash chain is broken, or (with `--config`)
/// a checkpoint does not verify. A file that cannot be read is [`EXIT_LOCAL`] instead: it
/// says nothing about the chain.
pub const EXIT_AUDIT_BROKEN: u8 = 11;

pub fn exit_code(code: Code) -> u8 {
    EXIT_CODES.iter().find(|(c, _)| *c == code).map_or(EXIT_LOCAL, |(_, n)| *n)
}

/// The table for `--help`, built from [`EXIT_CODES`] so the two cannot drift apart.
pub fn help_text() -> String {
    let mut text = String::from(
        "Errors are printed to stderr as `kekctl: CODE_NAME: message` (or `kekctl: message` \
         for local failures).\n\nExit status:\n  0   success\n",
    );
    text.push_str(&format!("  {EXIT_LOCAL:<3} local failure (stdin, stdout, reading a file)\n"));
    text.push_str(&format!("  {EXIT_USAGE:<3} usage error\n"));
    for (code, n) in EXIT_CODES {
        let note = if code == Code::Unavailable {
            " (also: socket not reachable, connection lost, no answer within --timeout)"
        } else {
            ""
        };
        text.push_str(&format!("  {n:<3} {}{note}\n", code_name(code)));
    }
    text.push_str(&format!(
        "  {EXIT_AUDIT_BROKEN:<3} audit verify: the audit log's hash chain is broken, or a checkpoint does not verify\n"
    ));
    text
}

/// Why a command failed, ready to be printed and turned into an exit status.
#[derive(Debug)]
pub enum CliError {
    /// A failure with a wire code: from the daemon, the connection, or a local check that
    /// mirrors one the daemon would make.
    Status(ErrorStatus),
    /// A local failure without a wire code.
    Local { what: &'static str, error: std::io::Error },
    /// A file that could not be read.
    File { path: PathBuf, error: std::io::Error },
    /// `audit verify` found a broken chain; names the first broken record.
    AuditBroken(Broken),
    /// Options that clap accepted one by one but that do not fit together (`bench`).
    Usage(String),
    /// A local failure without a wire code, saying what failed (`audit verify --config`:
    /// the configuration file).
    #[cfg_attr(not(feature = "anchors"), allow(dead_code))]
    Setup(String),
}

impl CliError {
    pub fn exit_code(&self) -> ExitCode {
        ExitCode::from(match self {
            CliError::Status(s) => exit_code(s.code),
            CliError::Local { .. } | CliError::File { .. } | CliError::Setup(_) => EXIT_LOCAL,
            CliError::AuditBroken(_) => EXIT_AUDIT_BROKEN,
            CliError::Usage(_) => EXIT_USAGE,
        })
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CliError::Status(s) => write!(f, "{}: {}", code_name(s.code), s.message),
            CliError::Local { what, error } => write!(f, "{what}: {error}"),
            CliError::File { path, error } => write!(f, "cannot read {}: {error}", path.display()),
            CliError::AuditBroken(broken) => broken.fmt(f),
            CliError::Usage(msg) | CliError::Setup(msg) => f.write_str(msg),
        }
    }
}

impl From<ErrorStatus> for CliError {
    fn from(s: ErrorStatus) -> Self {
        CliError::Status(s)
    }
}

impl From<VerifyError> for CliError {
    fn from(e: VerifyError) -> Self {
        match e {
            VerifyError::Broken(b) => CliError::AuditBroken(b),
            VerifyError::Io { path, error } => CliError::File { path, error },
        }
    }
}

impl From<ClientError> for CliError {
    fn from(e: ClientError) -> Self {
        match e {
            ClientError::Status(s) => CliError::Status(s),
            // Named by the option that sets it, so the user knows what to raise.
            ClientError::TimedOut { after } => CliError::Status(ErrorStatus::new(
                Code::Unavailable,
                format!(
                    "no answer from kekd within {} (--timeout, KEKD_TIMEOUT)",
                    humantime::format_duration(after)
                ),
            )),
            other => CliError::Status(ErrorStatus::new(other.code(), other.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_the_contract() {
        let expected = [
            (Code::InvalidArgument, 3),
            (Code::PermissionDenied, 4),
            (Code::NotFound, 5),
            (Code::FailedPrecondition, 6),
            (Code::DataInvalid, 7),
            (Code::Unavailable, 8),
            (Code::ResourceExhausted, 9),
            (Code::Internal, 10),
        ];
        for (code, n) in expected {
            assert_eq!(exit_code(code), n, "{}", code_name(code));
        }
        assert_eq!(exit_code(Code::Ok), EXIT_LOCAL, "OK is never an error status");
        assert_eq!(EXIT_AUDIT_BROKEN, 11);
        assert!(EXIT_CODES.iter().all(|(_, n)| *n != EXIT_AUDIT_BROKEN));
        assert_eq!(
            clap::error::Error::<clap::error::DefaultFormatter>::new(
                clap::error::ErrorKind::MissingRequiredArgument
            )
            .exit_code(),
            EXIT_USAGE as i32
        );
    }

    #[test]
    fn help_lists_every_code() {
        let help = help_text();
        assert!(help.contains("  2   usage error"), "{help}");
        assert!(help.contains("  1   local failure"), "{help}");
        assert!(
            help.contains(
                "  11  audit verify: the audit log's hash chain is broken, or a checkpoint does not verify"
            ),
            "{help}"
        );
        for (code, n) in EXIT_CODES {
            let line = format!("  {n:<3} {}", code_name(code));
            assert!(help.contains(&line), "missing {line:?} in {help}");
        }
    }

    #[test]
    fn usage_errors_exit_like_clap() {
        let err = CliError::Usage("--connections 1 is fewer than the 2 tenants".into());
        assert_eq!(err.exit_code(), ExitCode::from(EXIT_USAGE));
        assert_eq!(err.to_string(), "--connections 1 is fewer than the 2 tenants");
    }

    #[test]
    fn connection_failures_are_unavailable() {
        let late = CliError::from(ClientError::TimedOut { after: std::time::Duration::from_secs(1) });
        assert_eq!(late.to_string(), "UNAVAILABLE: no answer from kekd within 1s (--timeout, KEKD_TIMEOUT)");
        assert_eq!(late.exit_code(), ExitCode::from(8));
        let err = CliError::from(ClientError::Closed);
        assert_eq!(err.to_string(), "UNAVAILABLE: connection to kekd closed");
        let err = CliError::from(ClientError::Status(ErrorStatus::new(Code::NotFound, "no key \"x\"")));
        assert_eq!(err.to_string(), "NOT_FOUND: no key \"x\"");
    }

    #[test]
    fn audit_failures_keep_a_broken_chain_apart_from_an_unreadable_file() {
        let broken = Broken { file: "a.jsonl".into(), line: 3, seq: Some(3), problem: "edited".into() };
        let err = CliError::from(VerifyError::Broken(broken));
        assert_eq!(err.to_string(), "a.jsonl:3: record seq 3: edited");
        assert_eq!(err.exit_code(), ExitCode::from(EXIT_AUDIT_BROKEN));
        let error = std::io::Error::from(std::io::ErrorKind::NotFound);
        let err = CliError::from(VerifyError::Io { path: "b.jsonl".into(), error });
        assert!(err.to_string().starts_with("cannot read b.jsonl: "), "{err}");
        assert_eq!(err.exit_code(), ExitCode::from(EXIT_LOCAL));
    }
}
