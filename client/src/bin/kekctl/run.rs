//! One function per command: connect, call, print.

use kekd_client::bench::BenchArgs;
use kekd_client::{
    ClientError, ClientOptions, Code, EdekItem, ErrorStatus, ItemOk, ItemResult, KeyInfo, KeyName,
    MalformedResponse, Pool, PooledClient, RetryPolicy, Secret, TargetState, TenantName, WrapItem,
};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use kekd_proto::{MAX_EDEK_LEN, MAX_SECRET_LEN};

use crate::cli::{AuditCommand, Command, KeysCommand, RootCommand, Settings, TenantCommand};
use crate::exit::CliError;
use crate::output::{self, write_stdout, Fields};

const CLIENT_NAME: &str = "kekctl";

pub async fn run(command: Command, s: Settings) -> Result<(), CliError> {
    match command {
        Command::Status { tenants } if tenants.is_empty() => {
            let status = connect(&s).await?.status(s.metadata.clone()).await?;
            let text = if s.json { output::status_json(&status) } else { output::status_text(&status) };
            write_stdout(text.as_bytes())
        }
        Command::Status { tenants } => statuses(&s, &tenants).await,
        Command::Generate { key, count, edek_only } => generate(&s, &key, count as usize, edek_only).await,
        Command::Wrap { key } => {
            let plaintext = output::read_stdin(MAX_SECRET_LEN, "the secret")?;
            let items = vec![WrapItem { plaintext: Secret::new(plaintext), context: s.context.clone() }];
            let item = single(connect(&s).await?.wrap(&key, items, s.metadata.clone()).await?)?;
            print_edek(&s, &item)
        }
        Command::Unwrap => {
            let items = read_edek(&s)?;
            let item = single(connect(&s).await?.unwrap(items, s.metadata.clone()).await?)?;
            let plaintext = item.plaintext.as_ref().ok_or_else(|| missing("plaintext"))?;
            if s.json {
                print_items(&[item], Fields { plaintext: true, edek: false }, true)
            } else {
                write_stdout(plaintext.expose())
            }
        }
        Command::Rewrap => {
            let items = read_edek(&s)?;
            let item = single(connect(&s).await?.rewrap(items, s.metadata.clone()).await?)?;
            print_edek(&s, &item)
        }
        Command::Keys(command) => keys(&s, command).await,
        Command::Root(RootCommand::ImportKey { label }) => {
            let client = connect(&s).await?;
            let reply = client.root_import_key(label, s.metadata.clone()).await?;
            let kekd_client::Reply::TransportKey { label, pem, sha256, bits, algorithms } = reply else {
                return Err(missing("a transport key"));
            };
            if s.json {
                let v = serde_json::json!({
                    "label": label, "pem": pem, "sha256": sha256, "bits": bits, "algorithms": algorithms,
                });
                write_stdout(format!("{v}\n").as_bytes())
            } else {
                // The PEM alone on stdout, so `> transport.pem` gives a file openssl reads.
                eprintln!(
                    "transport key {label:?}: RSA-{bits}, SHA-256 {sha256}; this token accepts {}",
                    algorithms.join(", ")
                );
                write_stdout(pem.as_bytes())
            }
        }
        Command::Root(RootCommand::Import { label, algorithm }) => {
            let wrapped = output::read_stdin(4096, "the wrapped key")?.to_vec();
            let client = connect(&s).await?;
            let (active, rewrapped) =
                client.root_import(label, algorithm, wrapped, s.metadata.clone()).await?;
            let text = if s.json {
                format!(
                    "{{\"active_key_label\":{},\"rewrapped\":{rewrapped}}}\n",
                    serde_json::to_string(&active).expect("a string")
                )
            } else {
                format!("imported root key {active:?} is active: {rewrapped} KEK records rewrapped\n")
            };
            write_stdout(text.as_bytes())
        }
        Command::Root(RootCommand::Rotate { label }) => {
            let client = connect(&s).await?;
            let (active, rewrapped) = client.rotate_root(label, s.metadata.clone()).await?;
            let text = if s.json {
                format!(
                    "{{\"active_key_label\":{},\"rewrapped\":{rewrapped}}}\n",
                    serde_json::to_string(&active).expect("a string")
                )
            } else {
                format!("root key {active:?} is active: {rewrapped} KEK records rewrapped\n")
            };
            write_stdout(text.as_bytes())
        }
        Command::Tenant(TenantCommand::Destroy { confirm }) => {
            let client = connect(&s).await?;
            let (keys, versions) = client.destroy_tenant(&confirm, s.metadata.clone()).await?;
            let text = if s.json {
                format!(
                    "{{\"tenant\":{},\"keys\":{keys},\"versions_shredded\":{versions}}}\n",
                    serde_json::to_string(confirm.as_str()).expect("a string")
                )
            } else {
                format!("tenant {confirm} destroyed: {keys} keys, {versions} KEK versions shredded\n")
            };
            write_stdout(text.as_bytes())
        }
        Command::Audit(AuditCommand::Find { edek, id, paths }) => audit_find(&s, edek.as_deref(), id, &paths),
        Command::Audit(AuditCommand::Verify { files, from, config }) => {
            audit_verify(&s, &files, &from.unwrap_or_default(), config.as_deref())
        }
        Command::Bench(args) => bench(&s, args).await,
    }
}

/// `status --tenants A,B`: each tenant's status in turn, one connection each (a connection
/// serves one tenant). A tenant that cannot be asked is shown with its error and the
/// others still are; the command then fails with the first such error.
async fn statuses(s: &Settings, tenants: &[TenantName]) -> Result<(), CliError> {
    for (i, t) in tenants.iter().enumerate() {
        if tenants[..i].contains(t) {
            return Err(CliError::Usage(format!("--tenants: {t} given twice")));
        }
    }
    let mut shown = Vec::with_capacity(tenants.len());
    for t in tenants {
        let one = async { Ok::<_, CliError>(connect_to(s, t).await?.status(s.metadata.clone()).await?) };
        shown.push((t, one.await));
    }
    let text = if s.json { output::statuses_json(&shown) } else { output::statuses_text(&shown) };
    write_stdout(text.as_bytes())?;
    shown.into_iter().find_map(|(_, r)| r.err()).map_or(Ok(()), Err)
}

/// Runs the load generator and prints its report. Setup failing (connecting, generating
/// the EDEK pool) is an error; so is a run in which every request failed, after the report
/// is printed. Ctrl-C ends the run early and still prints the report.
async fn bench(s: &Settings, args: BenchArgs) -> Result<(), CliError> {
    let mut config = args
        .config(s.socket.clone(), s.tenant.as_ref(), s.context.clone(), s.metadata.clone())
        .map_err(CliError::Usage)?;
    config.progress = std::io::stderr().is_terminal();
    let interrupt = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    let report = kekd_client::bench::run(&config, interrupt).await.map_err(|e| {
        let msg = match &e {
            ClientError::Io(io) => format!("bench setup: cannot connect to {}: {io}", s.socket),
            ClientError::Status(status) => format!("bench setup: {}", status.message),
            other => format!("bench setup: {other}"),
        };
        CliError::from(ErrorStatus::new(e.code(), msg))
    })?;
    let text = if s.json { report.json() } else { report.text() };
    write_stdout(text.as_bytes())?;
    report.failure().map_or(Ok(()), |status| Err(status.into()))
}

/// Offline: reads the files and never connects. A broken chain is an error (on stderr, and
/// with `--json` also as an object on stdout, so scripts get the details either way).
/// `audit verify`: the chain, and with `config` the checkpoints, checked with the root key
/// of `--tenant` (crate::anchors).
fn audit_verify(
    s: &Settings,
    files: &[PathBuf],
    from: &kekd_client::audit::Start,
    config: Option<&std::path::Path>,
) -> Result<(), CliError> {
    let result = match config {
        None => kekd_client::audit::verify_files(files, from),
        Some(config) => {
            let tenant = s.tenant.as_ref().ok_or_else(|| {
                CliError::Usage(
                    "audit verify --config needs --tenant NAME (or KEKD_TENANT): whose checkpoints to check"
                        .into(),
                )
            })?;
            crate::anchors::verify(config, tenant, files, from)?
        }
    };
    match result {
        Ok(summary) => {
            let text = if s.json { output::audit_ok_json(&summary) } else { output::audit_ok_text(&summary) };
            write_stdout(text.as_bytes())
        }
        Err(kekd_client::audit::VerifyError::Broken(broken)) => {
            if s.json {
                write_stdout(output::audit_broken_json(&broken).as_bytes())?;
            }
            Err(CliError::AuditBroken(broken))
        }
        Err(io) => Err(io.into()),
    }
}

/// Offline, like `audit verify`.
fn audit_find(
    s: &Settings,
    edek: Option<&Path>,
    id: Option<kekd_client::audit_find::EdekId>,
    paths: &[PathBuf],
) -> Result<(), CliError> {
    use kekd_client::audit_find::{files_of, find, EdekId};
    let id = match (id, edek) {
        (Some(id), _) => id,
        (None, Some(file)) => EdekId::of_file(file)
            .map_err(|error| CliError::File { path: file.to_owned(), error })?
            .map_err(|e| ErrorStatus::new(Code::InvalidArgument, e.to_string()))?,
        (None, None) => return Err(CliError::Usage("give --edek FILE or --id ID".into())),
    };
    let files = files_of(paths)
        .map_err(|error| CliError::Local { what: "cannot list the audit directory", error })?;
    let found = find(&files, &id).map_err(|(path, error)| CliError::File { path, error })?;
    if found.is_empty() {
        let msg = format!("no record names EDEK {} in {} file(s)", id.as_str(), files.len());
        return Err(ErrorStatus::new(Code::NotFound, msg).into());
    }
    let mut text = String::new();
    for f in &found {
        text.push_str(&if s.json { output::found_json(f) } else { output::found_text(f) });
    }
    write_stdout(text.as_bytes())
}

/// The tenant's connection, taken from a pool so that a command issued while the tenant's
/// worker restarts waits for it (within the default retry policy) instead of failing at
/// once. Connecting up front keeps "cannot connect" apart from a connection lost later.
async fn connect(s: &Settings) -> Result<PooledClient, CliError> {
    // `Settings` guarantees a tenant for every command that connects.
    let tenant = s.tenant.as_ref().ok_or_else(|| {
        CliError::from(ErrorStatus::new(Code::InvalidArgument, "--tenant NAME (or KEKD_TENANT) is required"))
    })?;
    connect_to(s, tenant).await
}

/// [`connect`], for `tenant` rather than the one of the command line.
async fn connect_to(s: &Settings, tenant: &TenantName) -> Result<PooledClient, CliError> {
    let options = ClientOptions { request_timeout: Some(s.timeout), ..ClientOptions::default() };
    let pool = Pool::new(&s.socket, CLIENT_NAME, options, RetryPolicy::default());
    let client = pool.tenant(tenant);
    client.hello().await.map(|_| client).map_err(|e| match e {
        ClientError::Io(io) => {
            let msg = format!("cannot connect to {}: {io}", s.socket);
            ErrorStatus::new(Code::Unavailable, msg).into()
        }
        other => other.into(),
    })
}

async fn generate(s: &Settings, key: &KeyName, count: usize, edek_only: bool) -> Result<(), CliError> {
    let contexts = vec![s.context.clone(); count];
    let results = connect(s).await?.generate(key, contexts, edek_only, s.metadata.clone()).await?;
    let items = all_ok(results)?;
    for item in &items {
        item.edek.as_ref().ok_or_else(|| missing("edek"))?;
        if !edek_only {
            item.plaintext.as_ref().ok_or_else(|| missing("plaintext"))?;
        }
    }
    print_items(&items, Fields { plaintext: !edek_only, edek: true }, s.json)
}

fn read_edek(s: &Settings) -> Result<Vec<EdekItem>, CliError> {
    let edek = output::read_stdin(MAX_EDEK_LEN, "an EDEK")?;
    Ok(vec![EdekItem { edek: edek.to_vec(), context: s.context.clone() }])
}

fn print_edek(s: &Settings, item: &ItemOk) -> Result<(), CliError> {
    let edek = item.edek.as_ref().ok_or_else(|| missing("edek"))?;
    if s.json {
        print_items(std::slice::from_ref(item), Fields { plaintext: false, edek: true }, true)
    } else {
        write_stdout(edek)
    }
}

/// One item prints as an object, several as an array, so `--count 1` output needs no
/// unwrapping in scripts.
fn print_items(items: &[ItemOk], fields: Fields, json: bool) -> Result<(), CliError> {
    let mut out = output::item_buffer(items);
    if !json {
        items.iter().for_each(|item| output::push_item_text(&mut out, item, fields));
    } else if let [item] = items {
        output::push_item_json(&mut out, item, fields);
        out.push(b'\n');
    } else {
        out.push(b'[');
        for (i, item) in items.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            output::push_item_json(&mut out, item, fields);
        }
        out.extend_from_slice(b"]\n");
    }
    write_stdout(&out)
}

/// The command sent one item, so its error is the command's error.
fn single(results: Vec<ItemResult>) -> Result<ItemOk, CliError> {
    all_ok(results)?.pop().ok_or_else(|| missing("item"))
}

/// A batch succeeds only as a whole: printing some keys and failing on others would leave
/// a script with output it cannot line up.
fn all_ok(results: Vec<ItemResult>) -> Result<Vec<ItemOk>, CliError> {
    results.into_iter().collect::<Result<_, _>>().map_err(CliError::from)
}

fn missing(what: &str) -> CliError {
    ClientError::Malformed(MalformedResponse(format!("reply without {what}"))).into()
}

async fn keys(s: &Settings, command: KeysCommand) -> Result<(), CliError> {
    let client = connect(s).await?;
    let md = s.metadata.clone();
    let key = match command {
        KeysCommand::List => {
            let keys = client.list_keys(md).await?;
            let text = if s.json { output::keys_json(&keys) } else { output::keys_table(&keys) };
            return write_stdout(text.as_bytes());
        }
        KeysCommand::Create(k) => client.create_key(&k.name, md).await?,
        KeysCommand::Rotate(k) => client.rotate_key(&k.name, md).await?,
        KeysCommand::Disable(v) => {
            client.set_version_state(&v.name, v.version, TargetState::Disabled, md).await?
        }
        KeysCommand::Enable(v) => {
            client.set_version_state(&v.name, v.version, TargetState::DecryptOnly, md).await?
        }
        KeysCommand::Destroy(v) => {
            client.set_version_state(&v.name, v.version, TargetState::Destroyed, md).await?
        }
        KeysCommand::Set(p) => {
            client.set_key_policy(&p.name, p.min_decrypt_version, p.keep_versions, md).await?
        }
    };
    print_key(s, &key)
}

fn print_key(s: &Settings, key: &KeyInfo) -> Result<(), CliError> {
    let text = if s.json { output::key_json(key) } else { output::keys_table(std::slice::from_ref(key)) };
    write_stdout(text.as_bytes())
}
