//! Logging: `tracing` to stderr, in a form that suits where stderr goes.
//!
//! - A terminal: timestamps and colours.
//! - The journal (systemd connected stderr to it, and says so in `JOURNAL_STREAM`): no
//!   timestamps (journald stamps every line itself) and no colours, and every line starts
//!   with its syslog priority, `<3>` error, `<4>` warning, `<6>` info, `<7>` debug and
//!   trace (sd-daemon(3)), so that `journalctl -p warning` works.
//! - Anything else (a file, a pipe): timestamps, no colours.
//!
//! The filter is `log_level` from the config file, never `RUST_LOG`: a daemon behaves as
//! its reviewed configuration says, whatever environment it is started in (and workers
//! start with an empty one). Lines a client can cause are rate-limited at their call
//! sites ([`crate::ratelimit`]).
//!
//! Workers inherit the supervisor's stderr but not its environment: the supervisor passes
//! `JOURNAL_STREAM` to them explicitly, and they decide the same way.

use std::fmt;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

/// The variable systemd sets to `DEVICE:INODE` of the stream it connects to stderr
/// (systemd.exec(5)).
pub const JOURNAL_STREAM: &str = "JOURNAL_STREAM";

/// Whether stderr is the journal: `JOURNAL_STREAM` names the very file stderr is. A stderr
/// redirected elsewhere by a process started from a journald-connected shell keeps its
/// timestamps, as systemd.exec(5) recommends.
pub fn stderr_is_journal() -> bool {
    use std::os::fd::AsFd;
    let Ok(fd) = std::io::stderr().as_fd().try_clone_to_owned() else { return false };
    names_file(std::env::var_os(JOURNAL_STREAM).as_deref(), &std::fs::File::from(fd))
}

/// Whether a `JOURNAL_STREAM` value is `DEVICE:INODE` of `file`.
fn names_file(value: Option<&std::ffi::OsStr>, file: &std::fs::File) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Some((dev, ino)) = value.and_then(|v| v.to_str()).and_then(|v| v.split_once(':')) else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else { return false };
    file.metadata().is_ok_and(|meta| meta.dev() == dev && meta.ino() == ino)
}

/// Checks a `log_level` value: a comma-separated list of `LEVEL` (error, warn, info,
/// debug, trace, off) and `TARGET=LEVEL` directives, e.g. `"info,kekd::service=debug"`.
/// A bare word that is not a level is refused although the filter syntax would take it as
/// a target (it would silence everything else): `debg` is a typo far more often than a
/// module name.
pub fn check_filter(filter: &str) -> Result<(), String> {
    if filter.trim().is_empty() {
        return Err("is empty; use a level such as \"info\"".into());
    }
    for d in filter.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        if !d.contains('=') && !d.contains('[') && d.parse::<LevelFilter>().is_err() {
            return Err(format!(
                "{d:?} is not a level (error, warn, info, debug, trace, off); \
                 write TARGET=LEVEL to filter by target, e.g. \"info,kekd=debug\""
            ));
        }
    }
    EnvFilter::builder().parse(tidy(filter)).map(drop).map_err(|e| format!("not a log filter: {e}"))
}

/// The directives without the blanks around them (`"info, kekd=debug"`), which the filter
/// syntax itself does not allow.
fn tidy(filter: &str) -> String {
    filter.split(',').map(str::trim).filter(|d| !d.is_empty()).collect::<Vec<_>>().join(",")
}

/// Installs the process's subscriber. Idempotent: `dev` starts logging early, then `run`
/// calls it again (the second call changes nothing).
pub fn init(filter: &str) {
    use std::io::IsTerminal;
    // tss-esapi logs every handle it flushes at info and every TPM error it returns at
    // error, including the ones kekd expects and reports itself; unless asked for by name,
    // it stays quiet.
    let filter = tidy(filter);
    let filter = if filter.contains("tss_esapi") { filter } else { format!("{filter},tss_esapi=off") };
    // The config check refuses a bad filter; this fallback is for `kekd dev`'s own.
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = if stderr_is_journal() {
        let format = tracing_subscriber::fmt::format().without_time().with_ansi(false);
        builder.with_ansi(false).event_format(Journald(format)).try_init()
    } else {
        builder.with_ansi(std::io::stderr().is_terminal()).try_init()
    };
}

/// The syslog priority of a level, as journald reads it from a `<N>` prefix.
fn priority(level: Level) -> u8 {
    match level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        _ => 7,
    }
}

/// An event format that prefixes each line with its syslog priority.
struct Journald<F>(F);

impl<S, N, F> FormatEvent<S, N> for Journald<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        write!(writer, "<{}>", priority(*event.metadata().level()))?;
        self.0.format_event(ctx, writer, event)
    }
}

/// What a test's log subscriber wrote: a writer to hand it, and the text to check.
#[cfg(test)]
#[derive(Clone, Default)]
pub(crate) struct LogBuf(pub std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

#[cfg(test)]
impl std::io::Write for LogBuf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {

    use super::*;

    #[test]
    fn filters_that_pass_and_fail_the_check() {
        for ok in ["info", "INFO", "warn,kekd=debug", "kekd::service=trace", "off", "info, kekd=debug"] {
            assert_eq!(check_filter(ok), Ok(()), "{ok:?}");
        }
        for (bad, says) in [
            ("", "empty"),
            ("  ", "empty"),
            ("debg", "\"debg\" is not a level"),
            ("info,verbose", "\"verbose\""),
            ("kekd=loud", "not a log filter"),
        ] {
            let e = check_filter(bad).expect_err(bad);
            assert!(e.contains(says), "{bad:?}: {e}");
        }
    }

    #[test]
    fn a_bad_log_level_names_the_field() {
        let cfg = |level: &str| {
            format!(
                "log_level = {level:?}\n[tenants.acme]\nallow_uids = [1]\n[tenants.acme.tpm]\ntcti = \"swtpm:host=127.0.0.1,port=1\"\n"
            )
        };
        crate::config::Config::parse(&cfg("info,kekd=debug")).unwrap();
        let e = crate::config::Config::parse(&cfg("verbose")).unwrap_err();
        assert_eq!(e.field, "log_level", "{e}");
        assert!(e.to_string().starts_with("log_level: \"verbose\" is not a level"), "{e}");
    }

    #[test]
    fn journal_lines_carry_their_priority_and_no_time() {
        let buf = LogBuf::default();
        let sink = buf.clone();
        let format = tracing_subscriber::fmt::format().without_time().with_ansi(false);
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || sink.clone())
            .with_max_level(Level::TRACE)
            .with_ansi(false)
            .event_format(Journald(format))
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::error!("e");
            tracing::warn!(tenant = "acme", "w");
            tracing::info!("i");
            tracing::debug!("d");
            tracing::trace!("t");
        });
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let prefixes: Vec<&str> = text.lines().map(|l| &l[..3]).collect();
        assert_eq!(prefixes, ["<3>", "<4>", "<6>", "<7>", "<7>"], "{text}");
        assert!(text.lines().nth(1).unwrap().ends_with("w tenant=\"acme\""), "{text}");
        assert!(!text.contains("\x1b["), "no colours: {text:?}");
    }

    #[test]
    fn journal_stream_must_name_the_file_itself() {
        use std::os::unix::fs::MetadataExt;
        let file = tempfile::tempfile().unwrap();
        let other = tempfile::tempfile().unwrap();
        let meta = file.metadata().unwrap();
        let value = format!("{}:{}", meta.dev(), meta.ino());
        let names = |v: &str, f: &std::fs::File| names_file(Some(std::ffi::OsStr::new(v)), f);
        assert!(names(&value, &file));
        assert!(!names(&value, &other), "another file");
        for bad in ["", "garbage", "1:", ":2", "1:2:3"] {
            assert!(!names(bad, &file), "{bad:?}");
        }
        assert!(!names_file(None, &file));
    }
}
