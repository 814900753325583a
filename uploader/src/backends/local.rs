//! Local directories, with restic's file modes: directories 0700 and files 0400 (0750/0440 when the
//! repository's `config` is group-readable, as restic derives them), whatever the umask. Reading
//! and removing are rustic_backend's; creating and writing are here, where the modes are set.

use std::fs;
use std::io::{ErrorKind as IoKind, Write as _};
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use rustic_core::{
    ALL_FILE_TYPES, BytesList, ErrorKind, FileType, Id, ReadBackend, RusticError, RusticResult, WriteBackend,
};

use super::failure::{BackendError, FailureKind};

/// A repository in a local directory.
#[derive(Debug)]
pub struct LocalBackend {
    root: PathBuf,
    inner: rustic_backend::LocalBackend,
    dir_mode: u32,
    file_mode: u32,
}

impl LocalBackend {
    /// The repository at `root` (created by [`WriteBackend::create`]).
    pub fn new(root: &Path) -> anyhow::Result<Self> {
        let path = root.to_str().ok_or_else(|| {
            BackendError::msg(
                FailureKind::Configuration,
                format!("the repository path {} is not UTF-8", root.display()),
            )
        })?;
        let inner = rustic_backend::LocalBackend::new(path, Vec::<(String, String)>::new())?;
        // restic: a group-readable config means the repository is shared with the group.
        let group = fs::metadata(root.join("config")).is_ok_and(|m| m.permissions().mode() & 0o040 != 0);
        let (dir_mode, file_mode) = if group { (0o750, 0o640) } else { (0o700, 0o600) };
        Ok(LocalBackend { root: root.to_path_buf(), inner, dir_mode, file_mode })
    }

    fn dir_of(&self, tpe: FileType, id: &Id) -> PathBuf {
        match tpe {
            FileType::Config => self.root.clone(),
            FileType::Pack => self.root.join("data").join(&id.to_hex().as_str()[..2]),
            other => self.root.join(other.dirname()),
        }
    }

    /// Creates `dir` and its missing parents with the repository's directory mode.
    fn mkdir_all(&self, dir: &Path) -> Result<(), Failure> {
        let mut missing = Vec::new();
        let mut at = dir;
        while !at.as_os_str().is_empty() && !at.exists() {
            missing.push(at);
            match at.parent() {
                Some(p) => at = p,
                None => break,
            }
        }
        for d in missing.into_iter().rev() {
            match fs::DirBuilder::new().mode(self.dir_mode).create(d) {
                Ok(()) => {}
                Err(e) if e.kind() == IoKind::AlreadyExists => continue,
                Err(e) => return Err(io_failure("create the directory", d, e)),
            }
            // The umask may have taken bits the mode asks for (or left some restic does not give).
            set_mode(d, self.dir_mode).map_err(|e| io_failure("set the mode of", d, e))?;
        }
        Ok(())
    }

    fn write(&self, tpe: FileType, id: &Id, content: BytesList) -> Result<(), Failure> {
        static TMP: AtomicU64 = AtomicU64::new(0);
        let dir = self.dir_of(tpe, id);
        self.mkdir_all(&dir)?;
        let name = if tpe == FileType::Config { "config".to_string() } else { id.to_hex().to_string() };
        let path = dir.join(&name);
        let tmp = dir.join(format!("{name}-tmp-{}-{}", std::process::id(), TMP.fetch_add(1, Ordering::Relaxed)));
        let result = (|| {
            let mut f = fs::OpenOptions::new().write(true).create_new(true).mode(self.file_mode).open(&tmp)?;
            for part in content.into_vec() {
                f.write_all(&part)?;
            }
            f.sync_all()?;
            fs::rename(&tmp, &path)?;
            // Read-only once written, as restic leaves them (guards against accidental edits).
            set_mode(&path, self.file_mode & !0o222)
        })();
        result.map_err(|e| {
            let _ = fs::remove_file(&tmp);
            io_failure("write", &path, e)
        })
    }
}

fn set_mode(path: &Path, mode: u32) -> std::io::Result<()> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
}

/// An I/O error of the repository directory: a [`BackendError`] where its kind is known
/// (permissions, a missing directory), the plain error otherwise.
fn io_failure(what: &str, path: &Path, e: std::io::Error) -> Failure {
    let shown = path.display();
    let kind = match e.kind() {
        IoKind::PermissionDenied => FailureKind::AccessRefused,
        IoKind::ReadOnlyFilesystem => FailureKind::AccessRefused,
        IoKind::NotFound => FailureKind::Missing,
        _ => return format!("cannot {what} {shown}: {e}").into(),
    };
    let fix = match e.kind() {
        IoKind::PermissionDenied => "the user running shmback needs read and write access to the repository directory",
        IoKind::ReadOnlyFilesystem => "the file system is mounted read-only",
        _ => "a directory on the way does not exist",
    };
    BackendError::msg(kind, format!("cannot {what} {shown}: {e}; {fix}")).into()
}

/// An error of this backend, before rustic_core wraps it.
type Failure = Box<dyn std::error::Error + Send + Sync>;

fn rustic(e: Failure) -> Box<RusticError> {
    RusticError::with_source(ErrorKind::InputOutput, "local repository", e)
}

impl ReadBackend for LocalBackend {
    fn location(&self) -> String {
        self.inner.location()
    }

    fn list_with_size(&self, tpe: FileType) -> RusticResult<Vec<(Id, u32)>> {
        if tpe == FileType::Config {
            // rustic_backend reads an unreadable config as "no repository"; say why instead.
            let path = self.root.join("config");
            return match fs::metadata(&path) {
                Ok(m) => Ok(vec![(Id::default(), m.len().try_into().unwrap_or(u32::MAX))]),
                Err(e) if matches!(e.kind(), IoKind::NotFound | IoKind::NotADirectory) => Ok(vec![]),
                Err(e) => Err(rustic(io_failure("read", &path, e))),
            };
        }
        if tpe == FileType::Lock && !self.root.join(tpe.dirname()).is_dir() {
            // A repository no lock was written to yet (shmback before its locks) has no locks/;
            // the listing below would log that as an error at every lock check.
            return Ok(vec![]);
        }
        self.inner.list_with_size(tpe)
    }

    fn read_full(&self, tpe: FileType, id: &Id) -> RusticResult<Bytes> {
        self.inner.read_full(tpe, id)
    }

    fn read_partial(&self, tpe: FileType, id: &Id, cacheable: bool, offset: u32, length: u32) -> RusticResult<Bytes> {
        self.inner.read_partial(tpe, id, cacheable, offset, length)
    }

    fn warmup_path(&self, tpe: FileType, id: &Id) -> String {
        self.inner.warmup_path(tpe, id)
    }
}

impl WriteBackend for LocalBackend {
    fn create(&self) -> RusticResult<()> {
        let dirs = ALL_FILE_TYPES
            .iter()
            .filter(|t| **t != FileType::Config)
            .map(|t| self.root.join(t.dirname()))
            // restic's layout: locks/ too (not in ALL_FILE_TYPES, see docs/upstream/0007).
            .chain(std::iter::once(self.root.join(FileType::Lock.dirname())))
            .chain((0u8..=255).map(|i| self.root.join("data").join(format!("{i:02x}"))));
        for dir in std::iter::once(self.root.clone()).chain(dirs) {
            self.mkdir_all(&dir).map_err(rustic)?;
        }
        Ok(())
    }

    fn write_bytes(&self, tpe: FileType, id: &Id, _cacheable: bool, buf: BytesList) -> RusticResult<()> {
        self.write(tpe, id, buf).map_err(rustic)
    }

    fn remove(&self, tpe: FileType, id: &Id, cacheable: bool) -> RusticResult<()> {
        self.inner.remove(tpe, id, cacheable)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn restic_modes_whatever_the_umask() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("repo");
        let be = LocalBackend::new(&root).unwrap();
        // A umask that would leave everything world-readable is overridden by explicit modes.
        let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o002));
        let created = be.create();
        let id = Id::default();
        let written = be.write_bytes(FileType::Pack, &id, false, BytesList::from(Bytes::from_static(b"pack")));
        let config = be.write_bytes(FileType::Config, &id, false, BytesList::from(Bytes::from_static(b"cfg")));
        nix::sys::stat::umask(old);
        created.unwrap();
        written.unwrap();
        config.unwrap();
        for d in ["", "data", "data/00", "data/ff", "keys", "snapshots", "index"] {
            assert_eq!(mode(&root.join(d)), 0o700, "{d}");
        }
        assert_eq!(mode(&root.join("config")), 0o400);
        assert_eq!(mode(&root.join("data/00").join(id.to_hex().as_str())), 0o400);
        assert_eq!(be.read_full(FileType::Config, &id).unwrap(), Bytes::from_static(b"cfg"));
        let leftovers: Vec<_> = fs::read_dir(root.join("data/00")).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(leftovers.len(), 1, "no temporary file stays: {leftovers:?}");
        // A repository shared with its group (group-readable config) keeps that.
        set_mode(&root.join("config"), 0o440).unwrap();
        let be = LocalBackend::new(&root).unwrap();
        be.write_bytes(FileType::Key, &id, false, BytesList::from(Bytes::from_static(b"k"))).unwrap();
        assert_eq!(mode(&root.join("keys").join(id.to_hex().as_str())), 0o440);
    }
}
