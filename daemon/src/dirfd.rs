//! Directories held open by descriptor, for the file work kekd does as root under
//! directories a tenant's user can write (its key store, its audit trail).
//!
//! A path is looked up anew by every call that takes one, and a user who can write a
//! directory on that path can swap any name in it for a link between two calls: a link to
//! `/etc/ld.so.preload` where an audit file should be, a hard link to a root-owned file
//! where a key record is shredded. So here a directory is opened once, without following a
//! link, and everything below it is reached relative to that descriptor (`openat`,
//! `unlinkat`, `renameat`, `mkdirat`) with `O_NOFOLLOW`; what was opened is checked
//! (`fstat`: the expected type, a single hard link, an expected owner) before anything is
//! written to it. A link where a file or directory should be is refused, by name: kekd
//! never repairs what someone else planted.
//!
//! Trust starts at a directory the operator configured (`state_dir`, `audit.dir`): that one
//! is opened by path, and must belong to root (or to kekd's own user, as under `kekd dev`)
//! and be writable by no one else.

use std::ffi::OsStr;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{FileStat, Mode, SFlag};
use nix::unistd::{Gid, Uid, UnlinkatFlags};

/// Why a file operation under a held directory was refused or failed. Each names the path.
#[derive(Debug, thiserror::Error)]
pub enum DirError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path} is a symbolic link where kekd expects a {expected}: refused (kekd follows no links here; remove it)")]
    Link { path: PathBuf, expected: Kind },
    #[error("{path} is not a {expected}: refused")]
    WrongType { path: PathBuf, expected: Kind },
    #[error("{path} has {nlink} hard links where kekd expects a file of its own: refused (remove the other links)")]
    HardLinked { path: PathBuf, nlink: u64 },
    #[error("{path} belongs to uid {uid}, which is neither root nor the owner of its directory: refused")]
    Owner { path: PathBuf, uid: u32 },
    #[error("{path} can be written by users other than root (mode {mode:04o}, owner uid {uid}): refused, as kekd works in it as root")]
    Writable { path: PathBuf, mode: u32, uid: u32 },
}

impl DirError {
    /// The underlying I/O error, when this is one: callers tell "not there" from the rest.
    pub fn io_kind(&self) -> Option<io::ErrorKind> {
        match self {
            DirError::Io { source, .. } => Some(source.kind()),
            _ => None,
        }
    }

    pub fn is_not_found(&self) -> bool {
        self.io_kind() == Some(io::ErrorKind::NotFound)
    }
}

/// For callers whose errors are `io::Error`s: the message (with the path) is kept.
impl From<DirError> for io::Error {
    fn from(e: DirError) -> io::Error {
        let kind = match &e {
            DirError::Io { source, .. } => source.kind(),
            _ => io::ErrorKind::InvalidData,
        };
        io::Error::new(kind, e)
    }
}

/// What kind of entry was expected, for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    Directory,
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Kind::File => "regular file",
            Kind::Directory => "directory",
        })
    }
}

/// An entry of a directory listing, by type as the directory itself says (no link is
/// followed to find it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub name: std::ffi::OsString,
    pub kind: EntryKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    File,
    Directory,
    Symlink,
    Other,
}

/// A directory held open; every path below it is one name, looked up relative to it.
#[derive(Debug)]
pub struct Dir {
    fd: OwnedFd,
    path: PathBuf,
    /// The directory's owner: files in it must belong to root or to this uid.
    owner: u32,
    /// The directory's group: what root creates in a directory lent to a user is given to
    /// that user and group, so the user can still write it once the worker is no longer root.
    group: u32,
}

const DIR_FLAGS: OFlag =
    OFlag::O_RDONLY.union(OFlag::O_DIRECTORY).union(OFlag::O_NOFOLLOW).union(OFlag::O_CLOEXEC);

impl Dir {
    /// Opens a directory the operator configured, creating it (and its parents) with
    /// `mode` when missing. It must belong to root or to this process's user, and no one
    /// else may write it: below it, kekd trusts only what it checks.
    pub fn open_configured(path: &Path, create_mode: u32) -> Result<Dir, DirError> {
        use std::os::unix::fs::{DirBuilderExt, MetadataExt};
        let io = |source| DirError::Io { path: path.to_owned(), source };
        let existed = path.is_dir();
        match std::fs::DirBuilder::new().recursive(true).mode(create_mode).create(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io(e)),
        }
        // The configured path itself may pass through links the operator made (/var/run
        // is one); its last component may not.
        let fd = nix::fcntl::open(path, DIR_FLAGS, Mode::empty())
            .map_err(|e| open_error(path, e, Kind::Directory))?;
        if !existed {
            // Exactly `create_mode`, whatever the umask took away (a traverse bit, say).
            nix::sys::stat::fchmod(&fd, Mode::from_bits_truncate(create_mode)).map_err(|e| io(e.into()))?;
        }
        let st = nix::sys::stat::fstat(&fd).map_err(|e| io(e.into()))?;
        let me = nix::unistd::geteuid().as_raw();
        let foreign = |uid: u32| uid != 0 && uid != me;
        if foreign(st.st_uid) || st.st_mode & 0o022 != 0 {
            return Err(DirError::Writable {
                path: path.to_owned(),
                mode: st.st_mode & 0o7777,
                uid: st.st_uid,
            });
        }
        // Nor may anyone else rename a directory above it and put another in its place:
        // every ancestor is root's (or ours), and writable by others only when sticky
        // (/tmp), where they cannot rename what is not theirs.
        for above in path.ancestors().skip(1).filter(|p| !p.as_os_str().is_empty()) {
            let meta =
                std::fs::metadata(above).map_err(|source| DirError::Io { path: above.to_owned(), source })?;
            let sticky = meta.mode() & 0o1000 != 0;
            if foreign(meta.uid()) || (meta.mode() & 0o022 != 0 && !sticky) {
                return Err(DirError::Writable {
                    path: above.to_owned(),
                    mode: meta.mode() & 0o7777,
                    uid: meta.uid(),
                });
            }
        }
        Ok(Dir { fd, path: path.to_owned(), owner: st.st_uid, group: st.st_gid })
    }

    pub fn child_path(&self, name: impl AsRef<OsStr>) -> PathBuf {
        self.path.join(name.as_ref())
    }

    fn io(&self, name: impl AsRef<OsStr>) -> impl FnOnce(Errno) -> DirError {
        let path = self.child_path(name);
        move |e| DirError::Io { path, source: e.into() }
    }

    /// Opens the subdirectory `name`: a directory, not a link, belonging to root or to this
    /// directory's owner.
    pub fn open_dir(&self, name: impl AsRef<OsStr>) -> Result<Dir, DirError> {
        self.open_dir_owned(name.as_ref(), true)
    }

    /// [`open_dir`](Self::open_dir) for a directory this one lends to a user (see
    /// [`create_lent_dir`](Self::create_lent_dir)), which it does not create: it may belong
    /// to anyone, and what is below it is checked against its owner.
    pub fn open_lent_dir(&self, name: impl AsRef<OsStr>) -> Result<Dir, DirError> {
        self.open_dir_owned(name.as_ref(), false)
    }

    fn open_dir_owned(&self, name: &OsStr, check_owner: bool) -> Result<Dir, DirError> {
        let path = self.child_path(name);
        let fd = nix::fcntl::openat(&self.fd, name, DIR_FLAGS, Mode::empty())
            .map_err(|e| open_error(&path, e, Kind::Directory))?;
        let st = nix::sys::stat::fstat(&fd).map_err(self.io(name))?;
        if check_owner {
            self.check_owner(&path, &st)?;
        }
        Ok(Dir { fd, path, owner: st.st_uid, group: st.st_gid })
    }

    /// Opens the subdirectory `name`, creating it with exactly `mode` when missing.
    pub fn create_dir(&self, name: impl AsRef<OsStr>, mode: u32) -> Result<Dir, DirError> {
        self.create_dir_owned(name.as_ref(), mode, true)
    }

    /// [`create_dir`](Self::create_dir) for a directory this one lends to a user (a
    /// tenant's, given to its `run_as` user): it may belong to anyone. What is below it
    /// is checked against its owner.
    pub fn create_lent_dir(&self, name: impl AsRef<OsStr>, mode: u32) -> Result<Dir, DirError> {
        self.create_dir_owned(name.as_ref(), mode, false)
    }

    fn create_dir_owned(&self, name: &OsStr, mode: u32, check_owner: bool) -> Result<Dir, DirError> {
        match nix::sys::stat::mkdirat(&self.fd, name, Mode::from_bits_truncate(mode)) {
            Ok(()) => {
                let mut dir = self.open_dir_owned(name, check_owner)?;
                // Exactly `mode`, whatever the umask took away.
                nix::sys::stat::fchmod(&dir.fd, Mode::from_bits_truncate(mode)).map_err(self.io(name))?;
                if let Some((uid, gid)) = self.adopter() {
                    dir.chown(uid, gid)?;
                }
                self.sync()?;
                Ok(dir)
            }
            Err(Errno::EEXIST) => self.open_dir_owned(name, check_owner),
            Err(e) => Err(self.io(name)(e)),
        }
    }

    /// Opens the regular file `name` for reading (checked: not a link, one hard link, an
    /// expected owner).
    pub fn open_file(&self, name: impl AsRef<OsStr>) -> Result<std::fs::File, DirError> {
        self.open_checked(name.as_ref(), OFlag::O_RDONLY, 0)
    }

    /// Opens the regular file `name` for reading and writing (not truncated).
    pub fn open_file_rw(&self, name: impl AsRef<OsStr>) -> Result<std::fs::File, DirError> {
        self.open_checked(name.as_ref(), OFlag::O_RDWR, 0)
    }

    /// Opens `name` for appending, creating it with `mode` when missing. The bool says
    /// whether it was created.
    pub fn open_append(&self, name: impl AsRef<OsStr>, mode: u32) -> Result<(std::fs::File, bool), DirError> {
        let name = name.as_ref();
        let flags = OFlag::O_WRONLY | OFlag::O_APPEND;
        match self.open_checked(name, flags | OFlag::O_CREAT | OFlag::O_EXCL, mode) {
            Ok(f) => {
                // Exactly `mode`, whatever the umask took away.
                nix::sys::stat::fchmod(&f, Mode::from_bits_truncate(mode)).map_err(self.io(name))?;
                self.adopt(name, &f)?;
                Ok((f, true))
            }
            Err(e) if e.io_kind() == Some(io::ErrorKind::AlreadyExists) => {
                Ok((self.open_checked(name, flags, 0)?, false))
            }
            Err(e) => Err(e),
        }
    }

    /// Opens (creating) `name` for writing, without truncating it: a lock file.
    pub fn open_or_create(&self, name: impl AsRef<OsStr>, mode: u32) -> Result<std::fs::File, DirError> {
        self.open_checked(name.as_ref(), OFlag::O_WRONLY | OFlag::O_CREAT, mode)
    }

    fn open_checked(&self, name: &OsStr, flags: OFlag, mode: u32) -> Result<std::fs::File, DirError> {
        let path = self.child_path(name);
        // O_NONBLOCK: a FIFO planted where a file should be must not block the open.
        let flags = flags | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NOCTTY | OFlag::O_NONBLOCK;
        let fd = nix::fcntl::openat(&self.fd, name, flags, Mode::from_bits_truncate(mode))
            .map_err(|e| open_error(&path, e, Kind::File))?;
        let st = nix::sys::stat::fstat(&fd).map_err(self.io(name))?;
        check_file(&path, &st)?;
        self.check_owner(&path, &st)?;
        // Back to blocking: regular files ignore it, but it is nobody's business later.
        let fl = OFlag::from_bits_truncate(
            nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_GETFL).map_err(self.io(name))?,
        );
        nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_SETFL(fl - OFlag::O_NONBLOCK))
            .map_err(self.io(name))?;
        Ok(std::fs::File::from(fd))
    }

    /// Who a file or directory root creates here must be given to: the directory's
    /// owner, when that is not root (a tenant's directory lent to its `run_as` user).
    fn adopter(&self) -> Option<(Uid, Gid)> {
        (self.owner != 0 && nix::unistd::geteuid().is_root())
            .then(|| (Uid::from_raw(self.owner), Gid::from_raw(self.group)))
    }

    /// A file just created here goes to [`adopter`](Self::adopter).
    fn adopt(&self, name: &OsStr, f: &std::fs::File) -> Result<(), DirError> {
        match self.adopter() {
            Some((uid, gid)) => nix::unistd::fchown(f, Some(uid), Some(gid)).map_err(self.io(name)),
            None => Ok(()),
        }
    }

    fn check_owner(&self, path: &Path, st: &FileStat) -> Result<(), DirError> {
        if st.st_uid != 0 && st.st_uid != self.owner {
            return Err(DirError::Owner { path: path.to_owned(), uid: st.st_uid });
        }
        Ok(())
    }

    /// Reads the whole regular file `name`.
    pub fn read(&self, name: impl AsRef<OsStr>) -> Result<Vec<u8>, DirError> {
        let name = name.as_ref();
        let mut f = self.open_file(name)?;
        let mut out = Vec::new();
        f.read_to_end(&mut out).map_err(|source| DirError::Io { path: self.child_path(name), source })?;
        Ok(out)
    }

    /// Whether `name` exists, as whatever it is (a link counts: it is not followed).
    pub fn exists(&self, name: impl AsRef<OsStr>) -> Result<bool, DirError> {
        let name = name.as_ref();
        match nix::sys::stat::fstatat(&self.fd, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(_) => Ok(true),
            Err(Errno::ENOENT) => Ok(false),
            Err(e) => Err(self.io(name)(e)),
        }
    }

    /// The device and inode `name` has now, without following a link; None if missing.
    pub fn identity(&self, name: impl AsRef<OsStr>) -> Option<(u64, u64)> {
        nix::sys::stat::fstatat(&self.fd, name.as_ref(), AtFlags::AT_SYMLINK_NOFOLLOW)
            .ok()
            .map(|st| (st.st_dev, st.st_ino))
    }

    /// The entries of this directory (without `.` and `..`), typed without following links.
    pub fn entries(&self) -> Result<Vec<Entry>, DirError> {
        let io = |e: Errno| DirError::Io { path: self.path.clone(), source: e.into() };
        // A descriptor of its own: a listing moves the offset of the descriptor it reads.
        let fd = nix::fcntl::openat(&self.fd, ".", DIR_FLAGS, Mode::empty()).map_err(io)?;
        let mut dir = nix::dir::Dir::from_fd(fd).map_err(io)?;
        let mut out = Vec::new();
        for entry in dir.iter() {
            let entry = entry.map_err(io)?;
            let name = OsStr::from_bytes(entry.file_name().to_bytes());
            if name == "." || name == ".." {
                continue;
            }
            let kind = match entry.file_type() {
                Some(t) => kind_of_type(t),
                // Filesystems that do not say: ask, still without following.
                None => match nix::sys::stat::fstatat(&self.fd, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
                    Ok(st) => kind_of_mode(st.st_mode),
                    Err(Errno::ENOENT) => continue,
                    Err(e) => return Err(io(e)),
                },
            };
            out.push(Entry { name: name.to_owned(), kind });
        }
        Ok(out)
    }

    /// Writes `name` atomically: a new temporary file, fsync, rename over `name`, fsync
    /// this directory. Kill -9 at any point leaves either the old or the new file.
    pub fn write_atomic(&self, name: &str, bytes: &[u8], mode: u32) -> Result<(), DirError> {
        let mut rnd = [0u8; 6];
        aws_lc_rs::rand::fill(&mut rnd).expect("the system RNG does not fail");
        let tmp = format!(".tmp-{}-{name}", hex::encode(rnd));
        let res = (|| {
            let flags = OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL;
            let mut f = self.open_checked(OsStr::new(&tmp), flags, mode)?;
            self.adopt(OsStr::new(&tmp), &f)?;
            let io = |source| DirError::Io { path: self.child_path(&tmp), source };
            f.write_all(bytes).map_err(io)?;
            f.sync_all().map_err(io)?;
            nix::fcntl::renameat(&self.fd, tmp.as_str(), &self.fd, name).map_err(self.io(name))
        })();
        if let Err(e) = res {
            let _ = nix::unistd::unlinkat(&self.fd, tmp.as_str(), UnlinkatFlags::NoRemoveDir);
            return Err(e);
        }
        self.sync()
    }

    /// Removes the name `name` (a file, or a link: the link goes, its target stays).
    pub fn remove(&self, name: impl AsRef<OsStr>) -> Result<(), DirError> {
        let name = name.as_ref();
        match nix::unistd::unlinkat(&self.fd, name, UnlinkatFlags::NoRemoveDir) {
            Ok(()) | Err(Errno::ENOENT) => Ok(()),
            Err(e) => Err(self.io(name)(e)),
        }
    }

    /// Removes the empty subdirectory `name`.
    pub fn remove_dir(&self, name: impl AsRef<OsStr>) -> Result<(), DirError> {
        let name = name.as_ref();
        match nix::unistd::unlinkat(&self.fd, name, UnlinkatFlags::RemoveDir) {
            Ok(()) | Err(Errno::ENOENT) => Ok(()),
            Err(e) => Err(self.io(name)(e)),
        }
    }

    /// Crypto-shreds the file `name`: overwrites it in place with zeros, fsyncs, unlinks.
    /// Refused (before a byte is written) unless it is a regular file of this directory's
    /// owner or root with no other hard link: zeros go only where the record was. The
    /// caller fsyncs the directory. A missing file is already shredded.
    pub fn shred(&self, name: impl AsRef<OsStr>) -> Result<(), DirError> {
        let name = name.as_ref();
        let mut f = match self.open_checked(name, OFlag::O_WRONLY, 0) {
            Ok(f) => f,
            Err(e) if e.is_not_found() => return Ok(()),
            Err(e) => return Err(e),
        };
        let io = |source| DirError::Io { path: self.child_path(name), source };
        let len = f.metadata().map_err(io)?.len();
        f.write_all(&vec![0u8; len as usize]).map_err(io)?;
        f.sync_all().map_err(io)?;
        self.remove(name)
    }

    /// Shreds every `.kek` record and leftover temporary file under the subdirectory
    /// `name` (see [`shred`](Self::shred)), removes everything else, then the directory
    /// itself, fsyncing on the way. A link anywhere in it is refused before it is
    /// followed: nothing outside the tree is touched.
    pub fn shred_tree(&self, name: impl AsRef<OsStr>) -> Result<(), DirError> {
        let name = name.as_ref();
        let sub = self.open_dir(name)?;
        for entry in sub.entries()? {
            match entry.kind {
                EntryKind::Directory => sub.shred_tree(&entry.name)?,
                EntryKind::File => {
                    let n = entry.name.as_bytes();
                    if n.ends_with(b".kek") || n.starts_with(b".tmp") {
                        sub.shred(&entry.name)?;
                    } else {
                        // Not a secret, but checked all the same: a hard link here would
                        // be refused rather than quietly unlinked.
                        drop(sub.open_file(&entry.name)?);
                        sub.remove(&entry.name)?;
                    }
                }
                EntryKind::Symlink => {
                    return Err(DirError::Link { path: sub.child_path(&entry.name), expected: Kind::File })
                }
                EntryKind::Other => {
                    return Err(DirError::WrongType {
                        path: sub.child_path(&entry.name),
                        expected: Kind::File,
                    })
                }
            }
        }
        sub.sync()?;
        self.remove_dir(name)?;
        self.sync()
    }

    /// Gives this directory and everything under it to `uid`:`gid`, by descriptor: a
    /// link in the tree is refused, not followed, and a file with other hard links is
    /// refused, as its other names may be anywhere on the machine.
    pub fn give_tree(mut self, uid: Uid, gid: Gid) -> Result<Dir, DirError> {
        for entry in self.entries()? {
            match entry.kind {
                EntryKind::Directory => {
                    // Its owner may be a former run_as user: no owner check before the chown.
                    let path = self.child_path(&entry.name);
                    let fd = nix::fcntl::openat(&self.fd, entry.name.as_os_str(), DIR_FLAGS, Mode::empty())
                        .map_err(|e| open_error(&path, e, Kind::Directory))?;
                    let st = nix::sys::stat::fstat(&fd).map_err(self.io(&entry.name))?;
                    Dir { fd, path, owner: st.st_uid, group: st.st_gid }.give_tree(uid, gid)?;
                }
                EntryKind::File => {
                    let path = self.child_path(&entry.name);
                    let flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK;
                    let fd = nix::fcntl::openat(&self.fd, entry.name.as_os_str(), flags, Mode::empty())
                        .map_err(|e| open_error(&path, e, Kind::File))?;
                    let st = nix::sys::stat::fstat(&fd).map_err(self.io(&entry.name))?;
                    check_file(&path, &st)?;
                    nix::unistd::fchown(&fd, Some(uid), Some(gid)).map_err(self.io(&entry.name))?;
                }
                EntryKind::Symlink => {
                    return Err(DirError::Link { path: self.child_path(&entry.name), expected: Kind::File })
                }
                EntryKind::Other => {
                    return Err(DirError::WrongType {
                        path: self.child_path(&entry.name),
                        expected: Kind::File,
                    })
                }
            }
        }
        self.chown(uid, gid)?;
        Ok(self)
    }

    /// Gives this directory (alone) to `uid`:`gid`.
    fn chown(&mut self, uid: Uid, gid: Gid) -> Result<(), DirError> {
        nix::unistd::fchown(&self.fd, Some(uid), Some(gid))
            .map_err(|e| DirError::Io { path: self.path.clone(), source: e.into() })?;
        self.owner = uid.as_raw();
        self.group = gid.as_raw();
        Ok(())
    }

    /// Adds permission bits to this directory (say, the traverse bit a `run_as` user needs).
    pub fn add_mode(&self, bits: u32) -> Result<(), DirError> {
        let io = |e: Errno| DirError::Io { path: self.path.clone(), source: e.into() };
        let st = nix::sys::stat::fstat(&self.fd).map_err(io)?;
        let mode = st.st_mode & 0o7777;
        if mode & bits != bits {
            nix::sys::stat::fchmod(&self.fd, Mode::from_bits_truncate(mode | bits)).map_err(io)?;
        }
        Ok(())
    }

    /// fsync of the directory: names created, renamed or removed in it survive a crash.
    pub fn sync(&self) -> Result<(), DirError> {
        nix::unistd::fsync(&self.fd).map_err(|e| DirError::Io { path: self.path.clone(), source: e.into() })
    }
}

impl AsFd for Dir {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// An open that failed: a link is named as such (O_NOFOLLOW answers ELOOP for a link at
/// the last component; O_DIRECTORY|O_NOFOLLOW answers ENOTDIR for a link to a directory).
fn open_error(path: &Path, e: Errno, expected: Kind) -> DirError {
    let is_link = || std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink());
    match e {
        Errno::ELOOP => DirError::Link { path: path.to_owned(), expected },
        Errno::ENOTDIR if is_link() => DirError::Link { path: path.to_owned(), expected },
        Errno::ENOTDIR => DirError::WrongType { path: path.to_owned(), expected },
        e => DirError::Io { path: path.to_owned(), source: e.into() },
    }
}

fn check_file(path: &Path, st: &FileStat) -> Result<(), DirError> {
    if SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) != SFlag::S_IFREG {
        return Err(DirError::WrongType { path: path.to_owned(), expected: Kind::File });
    }
    if st.st_nlink != 1 {
        return Err(DirError::HardLinked { path: path.to_owned(), nlink: st.st_nlink });
    }
    Ok(())
}

fn kind_of_type(t: nix::dir::Type) -> EntryKind {
    match t {
        nix::dir::Type::File => EntryKind::File,
        nix::dir::Type::Directory => EntryKind::Directory,
        nix::dir::Type::Symlink => EntryKind::Symlink,
        _ => EntryKind::Other,
    }
}

fn kind_of_mode(mode: u32) -> EntryKind {
    match SFlag::from_bits_truncate(mode & SFlag::S_IFMT.bits()) {
        SFlag::S_IFREG => EntryKind::File,
        SFlag::S_IFDIR => EntryKind::Directory,
        SFlag::S_IFLNK => EntryKind::Symlink,
        _ => EntryKind::Other,
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};

    use super::*;

    fn scratch() -> (tempfile::TempDir, Dir) {
        let t = tempfile::tempdir().unwrap();
        std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let d = Dir::open_configured(t.path(), 0o700).unwrap();
        (t, d)
    }

    #[test]
    fn links_are_refused_by_name_and_never_followed() {
        let (t, d) = scratch();
        let outside = tempfile::tempdir().unwrap();
        let target = outside.path().join("precious");
        std::fs::write(&target, b"keep me").unwrap();
        symlink(&target, t.path().join("rec.kek")).unwrap();
        symlink(outside.path().join("nowhere"), t.path().join("day.jsonl")).unwrap();
        symlink(outside.path(), t.path().join("keys")).unwrap();

        let e = d.shred("rec.kek").unwrap_err();
        assert!(matches!(e, DirError::Link { .. }), "{e}");
        assert!(e.to_string().contains("rec.kek"), "{e}");
        let e = d.open_append("day.jsonl", 0o640).unwrap_err();
        assert!(matches!(e, DirError::Link { .. }), "{e}");
        let e = d.open_dir("keys").unwrap_err();
        assert!(matches!(e, DirError::Link { expected: Kind::Directory, .. }), "{e}");
        assert!(d.read("rec.kek").is_err());
        assert!(d.shred_tree("keys").is_err());
        assert_eq!(std::fs::read(&target).unwrap(), b"keep me");
        assert!(!outside.path().join("nowhere").exists());
        // Removing a link removes the link.
        d.remove("rec.kek").unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"keep me");
    }

    #[test]
    fn a_hard_link_is_not_shredded_or_given_away() {
        let (t, d) = scratch();
        let other = t.path().join("other-name");
        std::fs::write(&other, b"secret elsewhere").unwrap();
        std::fs::hard_link(&other, t.path().join("v0000000001.kek")).unwrap();
        let e = d.shred("v0000000001.kek").unwrap_err();
        assert!(matches!(e, DirError::HardLinked { nlink: 2, .. }), "{e}");
        assert_eq!(std::fs::read(&other).unwrap(), b"secret elsewhere");
        assert!(matches!(d.give_tree(Uid::current(), Gid::current()), Err(DirError::HardLinked { .. })));
    }

    #[test]
    fn a_tree_with_a_link_is_not_given_away() {
        let (t, d) = scratch();
        let outside = tempfile::tempdir().unwrap();
        symlink(outside.path(), t.path().join("keys")).unwrap();
        assert!(matches!(d.give_tree(Uid::current(), Gid::current()), Err(DirError::Link { .. })));
    }

    #[test]
    fn atomic_writes_shreds_and_trees() {
        let (t, d) = scratch();
        let keys = d.create_dir("keys", 0o700).unwrap();
        assert_eq!(std::fs::metadata(t.path().join("keys")).unwrap().mode() & 0o7777, 0o700);
        let k = keys.create_dir("6b", 0o700).unwrap();
        k.write_atomic("v0000000001.kek", b"{}", 0o600).unwrap();
        k.write_atomic("v0000000001.json", b"{}", 0o600).unwrap();
        assert_eq!(k.read("v0000000001.kek").unwrap(), b"{}");
        assert_eq!(k.entries().unwrap().len(), 2);
        let (mut f, created) = d.open_append("day.jsonl", 0o640).unwrap();
        assert!(created);
        f.write_all(b"x\n").unwrap();
        assert!(!d.open_append("day.jsonl", 0o640).unwrap().1);
        d.shred_tree("keys").unwrap();
        assert!(!d.exists("keys").unwrap());
    }

    #[test]
    fn a_configured_directory_others_can_write_is_refused() {
        let t = tempfile::tempdir().unwrap();
        std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = Dir::open_configured(t.path(), 0o700).unwrap_err();
        assert!(matches!(e, DirError::Writable { mode: 0o777, .. }), "{e}");
        assert!(e.to_string().contains(&t.path().display().to_string()), "{e}");
    }
}
