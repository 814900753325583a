use std::{
    fs::{self, File},
    io::{Read, Seek, SeekFrom, Write},
    num::TryFromIntError,
    path::{Path, PathBuf},
};

#[cfg(windows)]
use std::fs::OpenOptions;

use bytes::Bytes;
use filetime::FileTime;
#[cfg(windows)]
use filetime::set_symlink_file_times;
#[cfg(not(windows))]
use log::warn;
#[cfg(not(windows))]
use nix::errno::Errno;
#[cfg(not(windows))]
use nix::sys::stat::{Mode, SFlag, mknodat};
#[cfg(not(windows))]
use nix::{
    fcntl::AtFlags,
    unistd::{Gid, Uid, fchownat},
};

#[cfg(not(windows))]
use crate::backend::ignore::mapper::nix_mapper::map_mode_from_go;
#[cfg(not(windows))]
use crate::backend::node::NodeType;
use crate::{
    backend::node::{ExtendedAttribute, Metadata, Node},
    error::{ErrorKind, RusticError, RusticResult},
};

#[cfg(not(windows))]
mod helpers {
    // Helper function to cache mapping user name -> uid
    #![allow(clippy::needless_pass_by_value)]

    use cached::macros::cached;
    use log::warn;
    use nix::unistd::{Gid, Group, Uid, User};

    #[cached]
    pub(super) fn uid_from_name(name: String) -> Option<Uid> {
        User::from_name(&name)
            .inspect_err(|err| warn!("Cannot determine UID from name {name}: {err}. Using UID 0."))
            .unwrap_or_default()
            .map(|u| u.uid)
    }

    // Helper function to cache mapping group name -> gid
    #[cached]
    pub(super) fn gid_from_name(name: String) -> Option<Gid> {
        Group::from_name(&name)
            .inspect_err(|err| warn!("Cannot determine GID from name {name}: {err}. Using UID 0."))
            .unwrap_or_default()
            .map(|g| g.gid)
    }
}

/// [`LocalDestinationErrorKind`] describes the errors that can be returned by an action on the filesystem in Backends
#[derive(thiserror::Error, Debug, displaydoc::Display)]
pub enum LocalDestinationErrorKind {
    /// directory creation failed: `{0:?}`
    DirectoryCreationFailed(std::io::Error),
    /// file `{0:?}` should have a parent
    #[cfg_attr(not(windows), allow(dead_code))]
    FileDoesNotHaveParent(PathBuf),
    #[cfg(any(
        target_os = "macos",
        target_os = "openbsd",
        all(target_os = "android", target_pointer_width = "32")
    ))]
    /// `DeviceID` could not be converted to other type `{target}` of device `{device}`: `{source}`
    DeviceIdConversionFailed {
        target: String,
        device: u64,
        source: TryFromIntError,
    },
    /// Length conversion failed for `{target}` of length `{length}`: `{source}`
    LengthConversionFailed {
        target: String,
        length: u64,
        source: TryFromIntError,
    },
    /// `{0}`
    #[error(transparent)]
    #[cfg(not(windows))]
    FromErrnoError(Errno),
    /// listing xattrs on `{path:?}`: `{source:?}`
    #[cfg(not(any(windows, target_os = "openbsd")))]
    ListingXattrsFailed {
        path: PathBuf,
        source: std::io::Error,
    },
    /// setting xattr `{name}` on `{filename:?}` with `{source:?}`
    #[cfg(not(any(windows, target_os = "openbsd")))]
    SettingXattrFailed {
        name: String,
        filename: PathBuf,
        source: std::io::Error,
    },
    /// getting xattr `{name}` on `{filename:?}` with `{source:?}`
    #[cfg(not(any(windows, target_os = "openbsd")))]
    GettingXattrFailed {
        name: String,
        filename: PathBuf,
        source: std::io::Error,
    },
    /// removing directories failed: `{0:?}`
    DirectoryRemovalFailed(std::io::Error),
    /// removing file failed: `{0:?}`
    FileRemovalFailed(std::io::Error),
    /// setting time metadata failed: `{0:?}`
    SettingTimeMetadataFailed(std::io::Error),
    /// opening file failed: `{0:?}`
    OpeningFileFailed(std::io::Error),
    /// setting file length failed: `{0:?}`
    SettingFileLengthFailed(std::io::Error),
    /// can't jump to position in file: `{0:?}`
    CouldNotSeekToPositionInFile(std::io::Error),
    /// couldn't write to buffer: `{0:?}`
    CouldNotWriteToBuffer(std::io::Error),
    /// reading exact length of file contents failed: `{0:?}`
    ReadingExactLengthOfFileFailed(std::io::Error),
    /// setting file permissions failed: `{0:?}`
    #[cfg(not(windows))]
    SettingFilePermissionsFailed(std::io::Error),
    /// failed to symlink target `{linktarget:?}` from `{filename:?}` with `{source:?}`
    #[cfg(not(windows))]
    SymlinkingFailed {
        linktarget: PathBuf,
        filename: PathBuf,
        source: std::io::Error,
    },
    /// failed to create hardlink from `{source_path:?}` to `{filename:?}` with `{source:?}`
    HardLinkingFailed {
        source_path: PathBuf,
        filename: PathBuf,
        source: std::io::Error,
    },
}

pub(crate) type LocalDestinationResult<T> = Result<T, LocalDestinationErrorKind>;

#[derive(Clone, Debug)]
/// Local destination, used when restoring.
pub struct LocalDestination {
    /// The base path of the destination.
    path: PathBuf,
    /// Whether we expect a single file as destination.
    is_file: bool,
}

impl LocalDestination {
    /// Create a new [`LocalDestination`]
    ///
    /// # Arguments
    ///
    /// * `path` - The base path of the destination
    /// * `create` - If `create` is true, create the base path if it doesn't exist.
    /// * `expect_file` - Whether we expect a single file as destination.
    ///
    /// # Errors
    ///
    /// * If the directory could not be created.
    // TODO: We should use `impl Into<Path/PathBuf>` here. we even use it in the body!
    pub fn new(path: &str, create: bool, expect_file: bool) -> RusticResult<Self> {
        let is_dir = path.ends_with('/');
        let path: PathBuf = path.into();
        let is_file = path.is_file() || (!path.is_dir() && !is_dir && expect_file);

        // FIXME: Refactor logic to avoid duplication
        if create {
            if is_file {
                if let Some(path) = path.parent() {
                    fs::create_dir_all(path).map_err(|err| {
                        RusticError::with_source(
                            ErrorKind::InputOutput,
                            "The directory `{path}` could not be created.",
                            err,
                        )
                        .attach_context("path", path.display().to_string())
                    })?;
                }
            } else {
                fs::create_dir_all(&path).map_err(|err| {
                    RusticError::with_source(
                        ErrorKind::InputOutput,
                        "The directory `{path}` could not be created.",
                        err,
                    )
                    .attach_context("path", path.display().to_string())
                })?;
            }
        }

        Ok(Self { path, is_file })
    }

    /// Path to the given item (relative to the base path)
    ///
    /// # Arguments
    ///
    /// * `item` - The item to get the path for
    ///
    /// # Returns
    ///
    /// The path to the item.
    ///
    /// # Notes
    ///
    /// * If the destination is a file, this will return the base path.
    /// * If the destination is a directory, this will return the base path joined with the item.
    pub(crate) fn path(&self, item: impl AsRef<Path>) -> PathBuf {
        if self.is_file {
            self.path.clone()
        } else {
            self.path.join(item)
        }
    }

    /// The entry `item` (relative to the base path) as a directory descriptor and a name in it,
    /// reached without following any symlink below the base path. With `create`, missing
    /// directories on the way are created and symlinks in their place replaced by directories.
    ///
    /// The base path itself (and, for a single-file destination, the file) is the caller's
    /// choice and is followed.
    #[cfg(not(windows))]
    fn target(&self, item: impl AsRef<Path>, create: bool) -> std::io::Result<nofollow::Target> {
        let root_entry = |path: &Path| -> std::io::Result<nofollow::Target> {
            match (path.parent(), path.file_name()) {
                (Some(parent), Some(name)) => Ok(nofollow::Target {
                    dir: nofollow::open_root(parent)?,
                    name: name.to_os_string(),
                    follow: true,
                    shown: path.to_path_buf(),
                }),
                _ => Ok(nofollow::Target {
                    dir: nofollow::open_root(path)?,
                    name: ".".into(),
                    follow: true,
                    shown: path.to_path_buf(),
                }),
            }
        };
        if self.is_file {
            return root_entry(&self.path);
        }
        let item = item.as_ref();
        let comps = nofollow::components(item)?;
        let Some((name, dirs)) = comps.split_last() else {
            return root_entry(&self.path);
        };
        let mut dir = nofollow::open_root(&self.path)?;
        let mut shown = self.path.clone();
        for c in dirs {
            shown.push(c);
            dir = nofollow::subdir(&dir, c, create, &shown)?;
        }
        shown.push(name);
        Ok(nofollow::Target {
            dir,
            name: name.to_os_string(),
            follow: false,
            shown,
        })
    }

    /// Removes the file `item` (relative to the base path) without following symlinks; a
    /// missing file is fine. Used for files whose contents could not be restored.
    ///
    /// # Errors
    ///
    /// * If the file exists and could not be removed.
    #[cfg(not(windows))]
    pub(crate) fn remove_restored_file(
        &self,
        item: impl AsRef<Path>,
    ) -> LocalDestinationResult<()> {
        let t = self
            .target(item, false)
            .map_err(LocalDestinationErrorKind::FileRemovalFailed)?;
        match nix::unistd::unlinkat(
            &t.dir,
            t.name.as_os_str(),
            nix::unistd::UnlinkatFlags::NoRemoveDir,
        ) {
            Ok(()) | Err(Errno::ENOENT) => Ok(()),
            Err(e) => Err(LocalDestinationErrorKind::FileRemovalFailed(nofollow::at(
                &t.shown, e,
            ))),
        }
    }

    /// Removes the file `item` (relative to the base path); a missing file is fine.
    ///
    /// # Errors
    ///
    /// * If the file exists and could not be removed.
    #[cfg(windows)]
    pub(crate) fn remove_restored_file(
        &self,
        item: impl AsRef<Path>,
    ) -> LocalDestinationResult<()> {
        match fs::remove_file(self.path(item)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(LocalDestinationErrorKind::FileRemovalFailed(e))
            }
            _ => Ok(()),
        }
    }

    /// Remove the given directory (relative to the base path)
    ///
    /// # Arguments
    ///
    /// * `dirname` - The directory to remove
    ///
    /// # Errors
    ///
    /// * If the directory could not be removed.
    ///
    /// # Notes
    ///
    /// This will remove the directory recursively.
    #[allow(clippy::unused_self)]
    pub(crate) fn remove_dir(&self, dirname: impl AsRef<Path>) -> LocalDestinationResult<()> {
        fs::remove_dir_all(dirname).map_err(LocalDestinationErrorKind::DirectoryRemovalFailed)
    }

    /// Remove the given file (relative to the base path)
    ///
    /// # Arguments
    ///
    /// * `filename` - The file to remove
    ///
    /// # Errors
    ///
    /// * If the file could not be removed.
    ///
    /// # Notes
    ///
    /// This will remove the file.
    ///
    /// * If the file is a symlink, the symlink will be removed, not the file it points to.
    /// * If the file is a directory or device, this will fail.
    #[allow(clippy::unused_self)]
    pub(crate) fn remove_file(&self, filename: impl AsRef<Path>) -> LocalDestinationResult<()> {
        fs::remove_file(filename).map_err(LocalDestinationErrorKind::FileRemovalFailed)
    }

    /// Create the given directory (relative to the base path)
    ///
    /// # Arguments
    ///
    /// * `item` - The directory to create
    ///
    /// # Errors
    ///
    /// * If the directory could not be created.
    ///
    /// # Notes
    ///
    /// This will create the directory structure recursively.
    pub(crate) fn create_dir(&self, item: impl AsRef<Path>) -> LocalDestinationResult<()> {
        #[cfg(not(windows))]
        {
            let item = item.as_ref();
            let comps = nofollow::components(item)
                .map_err(LocalDestinationErrorKind::DirectoryCreationFailed)?;
            let mut dir = nofollow::open_root(&self.path)
                .map_err(LocalDestinationErrorKind::DirectoryCreationFailed)?;
            let mut shown = self.path.clone();
            for c in comps {
                shown.push(c);
                dir = nofollow::subdir(&dir, c, true, &shown)
                    .map_err(LocalDestinationErrorKind::DirectoryCreationFailed)?;
            }
        }
        #[cfg(windows)]
        fs::create_dir_all(self.path.join(item))
            .map_err(LocalDestinationErrorKind::DirectoryCreationFailed)?;
        Ok(())
    }

    /// Set changed and modified times for `item` (relative to the base path) utilizing the file metadata
    ///
    /// # Arguments
    ///
    /// * `item` - The item to set the times for
    /// * `meta` - The metadata to get the times from
    ///
    /// # Errors
    ///
    /// * If the times could not be set
    pub(crate) fn set_times(
        &self,
        item: impl AsRef<Path>,
        meta: &Metadata,
    ) -> LocalDestinationResult<()> {
        if let Some(mtime) = meta.mtime {
            let atime = meta.atime.unwrap_or(mtime);
            let atime = FileTime::from_system_time(atime.into());
            let mtime = FileTime::from_system_time(mtime.into());
            #[cfg(not(windows))]
            {
                use nix::sys::{stat::UtimensatFlags, time::TimeSpec};
                let t = self
                    .target(item, false)
                    .map_err(LocalDestinationErrorKind::SettingTimeMetadataFailed)?;
                let spec = |ft: FileTime| TimeSpec::new(ft.unix_seconds(), ft.nanoseconds().into());
                let flag = if t.follow {
                    UtimensatFlags::FollowSymlink
                } else {
                    UtimensatFlags::NoFollowSymlink
                };
                nix::sys::stat::utimensat(
                    &t.dir,
                    t.name.as_os_str(),
                    &spec(atime),
                    &spec(mtime),
                    flag,
                )
                .map_err(|e| {
                    LocalDestinationErrorKind::SettingTimeMetadataFailed(nofollow::at(&t.shown, e))
                })?;
            }
            #[cfg(windows)]
            set_symlink_file_times(self.path(item), atime, mtime)
                .map_err(LocalDestinationErrorKind::SettingTimeMetadataFailed)?;
        }

        Ok(())
    }

    #[cfg(windows)]
    // TODO: Windows support
    /// Set user/group for `item` (relative to the base path) utilizing the file metadata
    ///
    /// # Arguments
    ///
    /// * `item` - The item to set the user/group for
    /// * `meta` - The metadata to get the user/group from
    ///
    /// # Errors
    ///
    /// * If the user/group could not be set.
    #[allow(clippy::unused_self, clippy::unnecessary_wraps)]
    pub(crate) fn set_user_group(
        &self,
        _item: impl AsRef<Path>,
        _meta: &Metadata,
    ) -> LocalDestinationResult<()> {
        // https://learn.microsoft.com/en-us/windows/win32/fileio/file-security-and-access-rights
        // https://microsoft.github.io/windows-docs-rs/doc/windows/Win32/Security/struct.SECURITY_ATTRIBUTES.html
        // https://microsoft.github.io/windows-docs-rs/doc/windows/Win32/Storage/FileSystem/struct.CREATEFILE2_EXTENDED_PARAMETERS.html#structfield.lpSecurityAttributes
        Ok(())
    }

    #[cfg(not(windows))]
    /// Set user/group for `item` (relative to the base path) utilizing the file metadata
    ///
    /// # Arguments
    ///
    /// * `item` - The item to set the user/group for
    /// * `meta` - The metadata to get the user/group from
    ///
    /// # Errors
    ///
    /// * If the user/group could not be set.
    #[allow(clippy::similar_names)]
    pub(crate) fn set_user_group(
        &self,
        item: impl AsRef<Path>,
        meta: &Metadata,
    ) -> LocalDestinationResult<()> {
        let user = meta.user.clone().and_then(helpers::uid_from_name);
        // use uid from user if valid, else from saved uid (if saved)
        let uid = user.or_else(|| meta.uid.map(Uid::from_raw));

        let group = meta.group.clone().and_then(helpers::gid_from_name);
        // use gid from group if valid, else from saved gid (if saved)
        let gid = group.or_else(|| meta.gid.map(Gid::from_raw));

        self.chown(item, uid, gid)
    }

    #[cfg(not(windows))]
    /// Changes owner and group of `item` without following symlinks.
    fn chown(
        &self,
        item: impl AsRef<Path>,
        uid: Option<Uid>,
        gid: Option<Gid>,
    ) -> LocalDestinationResult<()> {
        let t = self
            .target(item, false)
            .map_err(LocalDestinationErrorKind::OpeningFileFailed)?;
        fchownat(&t.dir, t.name.as_os_str(), uid, gid, t.at_flags())
            .map_err(LocalDestinationErrorKind::FromErrnoError)?;
        Ok(())
    }

    #[cfg(windows)]
    // TODO: Windows support
    /// Set uid/gid for `item` (relative to the base path) utilizing the file metadata
    ///
    /// # Arguments
    ///
    /// * `item` - The item to set the uid/gid for
    /// * `meta` - The metadata to get the uid/gid from
    ///
    /// # Errors
    ///
    /// * If the uid/gid could not be set.
    #[allow(clippy::unused_self, clippy::unnecessary_wraps)]
    pub(crate) fn set_uid_gid(
        &self,
        _item: impl AsRef<Path>,
        _meta: &Metadata,
    ) -> LocalDestinationResult<()> {
        Ok(())
    }

    #[cfg(not(windows))]
    /// Set uid/gid for `item` (relative to the base path) utilizing the file metadata
    ///
    /// # Arguments
    ///
    /// * `item` - The item to set the uid/gid for
    /// * `meta` - The metadata to get the uid/gid from
    ///
    /// # Errors
    ///
    /// * If the uid/gid could not be set.
    #[allow(clippy::similar_names)]
    pub(crate) fn set_uid_gid(
        &self,
        item: impl AsRef<Path>,
        meta: &Metadata,
    ) -> LocalDestinationResult<()> {
        let uid = meta.uid.map(Uid::from_raw);
        let gid = meta.gid.map(Gid::from_raw);

        self.chown(item, uid, gid)
    }

    #[cfg(windows)]
    // TODO: Windows support
    /// Set permissions for `item` (relative to the base path) from `node`
    ///
    /// # Arguments
    ///
    /// * `item` - The item to set the permissions for
    /// * `node` - The node to get the permissions from
    ///
    /// # Errors
    ///
    /// * If the permissions could not be set.
    #[allow(clippy::unused_self, clippy::unnecessary_wraps)]
    pub(crate) fn set_permission(
        &self,
        _item: impl AsRef<Path>,
        _node: &Node,
    ) -> LocalDestinationResult<()> {
        Ok(())
    }

    #[cfg(not(windows))]
    /// Set permissions for `item` (relative to the base path) from `node`
    ///
    /// # Arguments
    ///
    /// * `item` - The item to set the permissions for
    /// * `node` - The node to get the permissions from
    ///
    /// # Errors
    ///
    /// * If the permissions could not be set.
    #[allow(clippy::similar_names)]
    pub(crate) fn set_permission(
        &self,
        item: impl AsRef<Path>,
        node: &Node,
    ) -> LocalDestinationResult<()> {
        if node.is_symlink() {
            return Ok(());
        }

        if let Some(mode) = node.meta.mode {
            let mode = map_mode_from_go(mode);
            let t = self
                .target(item, false)
                .map_err(LocalDestinationErrorKind::SettingFilePermissionsFailed)?;
            // chmod has no portable no-follow form: look first, and never chmod a symlink
            // (that would change its target).
            if !t.follow
                && t.kind()
                    .map_err(LocalDestinationErrorKind::SettingFilePermissionsFailed)?
                    == Some(SFlag::S_IFLNK)
            {
                return Ok(());
            }
            nix::sys::stat::fchmodat(
                &t.dir,
                t.name.as_os_str(),
                Mode::from_bits_truncate(mode),
                nix::sys::stat::FchmodatFlags::FollowSymlink,
            )
            .map_err(|e| {
                LocalDestinationErrorKind::SettingFilePermissionsFailed(nofollow::at(&t.shown, e))
            })?;
        }
        Ok(())
    }

    #[cfg(any(windows, target_os = "openbsd"))]
    // TODO: Windows support
    // TODO: openbsd support
    /// Set extended attributes for `item` (relative to the base path)
    ///
    /// # Arguments
    ///
    /// * `item` - The item to set the extended attributes for
    /// * `extended_attributes` - The extended attributes to set
    ///
    /// # Errors
    ///
    /// * If the extended attributes could not be set.
    #[allow(clippy::unused_self, clippy::unnecessary_wraps)]
    pub(crate) fn set_extended_attributes(
        &self,
        _item: impl AsRef<Path>,
        _extended_attributes: &[ExtendedAttribute],
    ) -> LocalDestinationResult<()> {
        Ok(())
    }

    #[cfg(not(any(windows, target_os = "openbsd")))]
    /// Set extended attributes for `item` (relative to the base path)
    ///
    /// # Arguments
    ///
    /// * `item` - The item to set the extended attributes for
    /// * `extended_attributes` - The extended attributes to set
    ///
    /// # Errors
    ///
    /// * If listing the extended attributes failed.
    /// * If getting an extended attribute failed.
    /// * If setting an extended attribute failed.
    ///
    /// # Returns
    ///
    /// Ok if the extended attributes were set.
    ///
    /// # Panics
    ///
    /// * If the extended attributes could not be set.
    pub(crate) fn set_extended_attributes(
        &self,
        item: impl AsRef<Path>,
        extended_attributes: &[ExtendedAttribute],
    ) -> LocalDestinationResult<()> {
        let item = item.as_ref();
        // The xattr calls take a path (and do not follow a final symlink); on Linux the path
        // goes through the directory descriptor reached without following symlinks, elsewhere
        // it is the lexical path (the walk has just checked it).
        let t = self.target(item, false).map_err(|source| {
            LocalDestinationErrorKind::ListingXattrsFailed {
                path: self.path(item),
                source,
            }
        })?;
        #[cfg(target_os = "linux")]
        let filename = {
            use std::os::fd::AsRawFd;
            let via_fd = PathBuf::from(format!("/proc/self/fd/{}", t.dir.as_raw_fd()));
            if via_fd.exists() {
                via_fd.join(&t.name)
            } else {
                t.shown.clone()
            }
        };
        #[cfg(not(target_os = "linux"))]
        let filename = t.shown.clone();
        let mut done = vec![false; extended_attributes.len()];

        for curr_name in xattr::list(&filename).map_err(|err| {
            LocalDestinationErrorKind::ListingXattrsFailed {
                source: err,
                path: filename.clone(),
            }
        })? {
            match extended_attributes.iter().enumerate().find(
                |(_, ExtendedAttribute { name, .. })| name == curr_name.to_string_lossy().as_ref(),
            ) {
                Some((index, ExtendedAttribute { name, value })) => {
                    let curr_value = xattr::get(&filename, name).map_err(|err| {
                        LocalDestinationErrorKind::GettingXattrFailed {
                            name: name.clone(),
                            filename: filename.clone(),
                            source: err,
                        }
                    })?;
                    if value != &curr_value {
                        xattr::set(&filename, name, value.as_ref().unwrap_or(&Vec::new()))
                            .map_err(|err| LocalDestinationErrorKind::SettingXattrFailed {
                                name: name.clone(),
                                filename: filename.clone(),
                                source: err,
                            })?;
                    }
                    done[index] = true;
                }
                None => {
                    if let Err(err) = xattr::remove(&filename, &curr_name) {
                        warn!(
                            "error removing xattr {} on {}: {err}",
                            curr_name.display(),
                            filename.display()
                        );
                    }
                }
            }
        }

        for (index, ExtendedAttribute { name, value }) in extended_attributes.iter().enumerate() {
            if !done[index] {
                xattr::set(&filename, name, value.as_ref().unwrap_or(&Vec::new())).map_err(
                    |err| LocalDestinationErrorKind::SettingXattrFailed {
                        name: name.clone(),
                        filename: filename.clone(),
                        source: err,
                    },
                )?;
            }
        }

        Ok(())
    }

    /// Set length of `item` (relative to the base path)
    ///
    /// # Arguments
    ///
    /// * `item` - The item to set the length for
    /// * `size` - The size to set the length to
    ///
    /// # Errors
    ///
    /// * If the file does not have a parent.
    /// * If the directory could not be created.
    /// * If the file could not be opened.
    /// * If the length of the file could not be set.
    ///
    /// # Notes
    ///
    /// If the file exists, truncate it to the given length. (TODO: check if this is correct)
    /// If it doesn't exist, create a new (empty) one with given length.
    pub(crate) fn set_length(
        &self,
        item: impl AsRef<Path>,
        size: u64,
    ) -> LocalDestinationResult<()> {
        #[cfg(not(windows))]
        let file = {
            let t = self
                .target(item, true)
                .map_err(LocalDestinationErrorKind::DirectoryCreationFailed)?;
            nofollow::open_file(&t, true, true)
                .map_err(LocalDestinationErrorKind::OpeningFileFailed)?
        };
        #[cfg(windows)]
        let file = {
            let filename = self.path(item);
            let dir = filename.parent().ok_or_else(|| {
                LocalDestinationErrorKind::FileDoesNotHaveParent(filename.clone())
            })?;
            fs::create_dir_all(dir).map_err(LocalDestinationErrorKind::DirectoryCreationFailed)?;
            OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(filename)
                .map_err(LocalDestinationErrorKind::OpeningFileFailed)?
        };
        file.set_len(size)
            .map_err(LocalDestinationErrorKind::SettingFileLengthFailed)?;
        Ok(())
    }

    #[cfg(windows)]
    // TODO: Windows support
    /// Create a special file (relative to the base path)
    ///
    /// # Arguments
    ///
    /// * `item` - The item to create
    /// * `node` - The node to get the type from
    ///
    /// # Errors
    ///
    /// * If the special file could not be created.
    ///
    /// # Returns
    ///
    /// Ok if the special file was created.
    #[allow(clippy::unused_self, clippy::unnecessary_wraps)]
    pub(crate) fn create_special(
        &self,
        _item: impl AsRef<Path>,
        _node: &Node,
    ) -> LocalDestinationResult<()> {
        Ok(())
    }

    #[cfg(not(windows))]
    /// Create a special file (relative to the base path)
    ///
    /// # Arguments
    ///
    /// * `item` - The item to create
    /// * `node` - The node to get the type from
    ///
    /// # Errors
    ///
    /// * If the symlink could not be created.
    /// * If the device could not be converted to the correct type.
    /// * If the device could not be created.
    pub(crate) fn create_special(
        &self,
        item: impl AsRef<Path>,
        node: &Node,
    ) -> LocalDestinationResult<()> {
        let t = self
            .target(item, false)
            .map_err(LocalDestinationErrorKind::OpeningFileFailed)?;
        let filename = t.shown.clone();

        match &node.node_type {
            NodeType::Symlink { .. } => {
                let linktarget = node.node_type.to_link();
                match nix::unistd::symlinkat(linktarget, &t.dir, t.name.as_os_str()) {
                    Ok(()) => {}
                    // Restoring into the same place again: the same link is already there.
                    Err(Errno::EEXIST)
                        if nix::fcntl::readlinkat(&t.dir, t.name.as_os_str())
                            .is_ok_and(|l| Path::new(&l) == linktarget) => {}
                    Err(e) => {
                        return Err(LocalDestinationErrorKind::SymlinkingFailed {
                            linktarget: linktarget.to_path_buf(),
                            filename,
                            source: e.into(),
                        });
                    }
                }
            }
            NodeType::Dev { device } => {
                #[cfg(not(any(
                    target_os = "macos",
                    target_os = "openbsd",
                    all(target_os = "android", target_pointer_width = "32")
                )))]
                let device = *device;
                #[cfg(any(target_os = "macos", target_os = "openbsd"))]
                let device = i32::try_from(*device).map_err(|err| {
                    LocalDestinationErrorKind::DeviceIdConversionFailed {
                        target: "i32".to_string(),
                        device: *device,
                        source: err,
                    }
                })?;
                #[cfg(all(target_os = "android", target_pointer_width = "32"))]
                let device = u32::try_from(*device).map_err(|err| {
                    LocalDestinationErrorKind::DeviceIdConversionFailed {
                        target: "u32".to_string(),
                        device: *device,
                        source: err,
                    }
                })?;
                mknodat(
                    &t.dir,
                    t.name.as_os_str(),
                    SFlag::S_IFBLK,
                    Mode::empty(),
                    device,
                )
                .map_err(LocalDestinationErrorKind::FromErrnoError)?;
            }
            NodeType::Chardev { device } => {
                #[cfg(not(any(
                    target_os = "macos",
                    target_os = "openbsd",
                    all(target_os = "android", target_pointer_width = "32")
                )))]
                let device = *device;
                #[cfg(any(target_os = "macos", target_os = "openbsd"))]
                let device = i32::try_from(*device).map_err(|err| {
                    LocalDestinationErrorKind::DeviceIdConversionFailed {
                        target: "i32".to_string(),
                        device: *device,
                        source: err,
                    }
                })?;
                #[cfg(all(target_os = "android", target_pointer_width = "32"))]
                let device = u32::try_from(*device).map_err(|err| {
                    LocalDestinationErrorKind::DeviceIdConversionFailed {
                        target: "u32".to_string(),
                        device: *device,
                        source: err,
                    }
                })?;
                mknodat(
                    &t.dir,
                    t.name.as_os_str(),
                    SFlag::S_IFCHR,
                    Mode::empty(),
                    device,
                )
                .map_err(LocalDestinationErrorKind::FromErrnoError)?;
            }
            NodeType::Fifo => {
                mknodat(&t.dir, t.name.as_os_str(), SFlag::S_IFIFO, Mode::empty(), 0)
                    .map_err(LocalDestinationErrorKind::FromErrnoError)?;
            }
            NodeType::Socket => {
                mknodat(
                    &t.dir,
                    t.name.as_os_str(),
                    SFlag::S_IFSOCK,
                    Mode::empty(),
                    0,
                )
                .map_err(LocalDestinationErrorKind::FromErrnoError)?;
            }
            _ => {}
        }
        Ok(())
    }

    /// Read the given item (relative to the base path)
    ///
    /// # Arguments
    ///
    /// * `item` - The item to read
    /// * `offset` - The offset to read from
    /// * `length` - The length to read
    ///
    /// # Errors
    ///
    /// * If the file could not be opened.
    /// * If the file could not be sought to the given position.
    /// * If the length of the file could not be converted to u32.
    /// * If the length of the file could not be read.
    pub(crate) fn read_at(
        &self,
        item: impl AsRef<Path>,
        offset: u64,
        length: u64,
    ) -> LocalDestinationResult<Bytes> {
        #[cfg(not(windows))]
        let mut file = self
            .target(item, false)
            .and_then(|t| nofollow::open_file(&t, false, false))
            .map_err(LocalDestinationErrorKind::OpeningFileFailed)?;
        #[cfg(windows)]
        let mut file =
            File::open(self.path(item)).map_err(LocalDestinationErrorKind::OpeningFileFailed)?;
        _ = file
            .seek(SeekFrom::Start(offset))
            .map_err(LocalDestinationErrorKind::CouldNotSeekToPositionInFile)?;
        let mut vec = vec![
            0;
            length.try_into().map_err(|err| {
                LocalDestinationErrorKind::LengthConversionFailed {
                    target: "u8".to_string(),
                    length,
                    source: err,
                }
            })?
        ];
        file.read_exact(&mut vec)
            .map_err(LocalDestinationErrorKind::ReadingExactLengthOfFileFailed)?;
        Ok(vec.into())
    }

    /// Check if a matching file exists.
    ///
    /// # Arguments
    ///
    /// * `item` - The item to check
    /// * `size` - The size to check
    ///
    /// # Returns
    ///
    /// If a file exists and size matches, this returns a `File` open for reading.
    /// In all other cases, returns `None`
    pub fn get_matching_file(&self, item: impl AsRef<Path>, size: u64) -> Option<File> {
        #[cfg(not(windows))]
        let file = {
            let t = self.target(item, false).ok()?;
            nofollow::open_file(&t, false, false).ok()?
        };
        #[cfg(windows)]
        let file = {
            let filename = self.path(item);
            if !fs::symlink_metadata(&filename).ok()?.is_file() {
                return None;
            }
            File::open(&filename).ok()?
        };
        (file.metadata().ok()?.len() == size).then_some(file)
    }

    /// Write `data` to given item (relative to the base path) at `offset`
    ///
    /// # Arguments
    ///
    /// * `item` - The item to write to
    /// * `offset` - The offset to write at
    /// * `data` - The data to write
    ///
    /// # Errors
    ///
    /// * If the file could not be opened.
    /// * If the file could not be sought to the given position.
    /// * If the bytes could not be written to the file.
    ///
    /// # Notes
    ///
    /// This will create the file if it doesn't exist.
    pub(crate) fn write_at(
        &self,
        item: impl AsRef<Path>,
        offset: u64,
        data: &[u8],
    ) -> LocalDestinationResult<()> {
        #[cfg(not(windows))]
        let mut file = self
            .target(item, false)
            .and_then(|t| nofollow::open_file(&t, true, true))
            .map_err(LocalDestinationErrorKind::OpeningFileFailed)?;
        #[cfg(windows)]
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.path(item))
            .map_err(LocalDestinationErrorKind::OpeningFileFailed)?;
        _ = file
            .seek(SeekFrom::Start(offset))
            .map_err(LocalDestinationErrorKind::CouldNotSeekToPositionInFile)?;
        file.write_all(data)
            .map_err(LocalDestinationErrorKind::CouldNotWriteToBuffer)?;
        Ok(())
    }

    /// Create a hardlink `item` pointing to `source_item`, both relative to the base path.
    ///
    /// # Arguments
    ///
    /// * `source_item` - The already-restored file to link to
    /// * `item` - The path to create as a hardlink
    ///
    /// # Errors
    ///
    /// * If the new hardlink does not have a parent directory.
    /// * If the directory could not be created.
    /// * If the hardlink could not be created.
    pub(crate) fn hard_link(
        &self,
        source_item: impl AsRef<Path>,
        item: impl AsRef<Path>,
    ) -> LocalDestinationResult<()> {
        let source_path = self.path(&source_item);
        let filename = self.path(&item);
        #[cfg(not(windows))]
        {
            let link = |source: std::io::Error| LocalDestinationErrorKind::HardLinkingFailed {
                source_path: source_path.clone(),
                filename: filename.clone(),
                source,
            };
            let from = self.target(source_item, false).map_err(link)?;
            let to = self.target(item, true).map_err(link)?;
            // linkat without AT_SYMLINK_FOLLOW links a symlink itself, never its target.
            nix::unistd::linkat(
                &from.dir,
                from.name.as_os_str(),
                &to.dir,
                to.name.as_os_str(),
                AtFlags::empty(),
            )
            .map_err(|e| link(e.into()))?;
        }
        #[cfg(windows)]
        {
            let dir = filename.parent().ok_or_else(|| {
                LocalDestinationErrorKind::FileDoesNotHaveParent(filename.clone())
            })?;
            fs::create_dir_all(dir).map_err(LocalDestinationErrorKind::DirectoryCreationFailed)?;
            fs::hard_link(&source_path, &filename).map_err(|err| {
                LocalDestinationErrorKind::HardLinkingFailed {
                    source_path,
                    filename,
                    source: err,
                }
            })?;
        }
        Ok(())
    }
}

/// Walking below the destination root without following symlinks.
///
/// Every path a restore touches is reached from a directory file descriptor, one component at a
/// time, with `O_NOFOLLOW`; the final operation uses the `*at` call on that descriptor with
/// `AT_SYMLINK_NOFOLLOW`. A symlink already in the destination (or restored from an earlier
/// snapshot) therefore never redirects a write outside the destination root.
#[cfg(not(windows))]
mod nofollow {
    use std::{
        ffi::{OsStr, OsString},
        fs::File,
        io,
        os::fd::OwnedFd,
        path::{Component, Path, PathBuf},
    };

    use log::warn;
    use nix::{
        errno::Errno,
        fcntl::{AtFlags, OFlag, openat, readlinkat},
        sys::stat::{Mode, SFlag, fstatat, mkdirat},
        unistd::{UnlinkatFlags, unlinkat},
    };

    /// An entry to operate on: the directory holding it, its name there, whether a symlink in
    /// its place may be followed (only for the root the caller named), and its full path for
    /// messages.
    pub(super) struct Target {
        pub(super) dir: OwnedFd,
        pub(super) name: OsString,
        pub(super) follow: bool,
        pub(super) shown: PathBuf,
    }

    impl Target {
        /// `AT_SYMLINK_NOFOLLOW` unless this target may be followed.
        pub(super) fn at_flags(&self) -> AtFlags {
            if self.follow {
                AtFlags::empty()
            } else {
                AtFlags::AT_SYMLINK_NOFOLLOW
            }
        }

        /// The entry's type, not following a symlink; `None` if it does not exist.
        pub(super) fn kind(&self) -> io::Result<Option<SFlag>> {
            kind(&self.dir, &self.name, &self.shown)
        }
    }

    /// An `io::Error` naming `path`.
    pub(super) fn at(path: &Path, err: Errno) -> io::Error {
        let e = io::Error::from(err);
        io::Error::new(e.kind(), format!("`{}`: {e}", path.display()))
    }

    fn refuse(path: &Path, why: &str) -> io::Error {
        io::Error::other(format!("`{}` {why}", path.display()))
    }

    fn kind(dir: &OwnedFd, name: &OsStr, shown: &Path) -> io::Result<Option<SFlag>> {
        match fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) => Ok(Some(SFlag::from_bits_truncate(
                st.st_mode & SFlag::S_IFMT.bits(),
            ))),
            Err(Errno::ENOENT) => Ok(None),
            Err(e) => Err(at(shown, e)),
        }
    }

    /// Removes the symlink `name` in `dir` (the link, never its target), saying so.
    fn replace_symlink(dir: &OwnedFd, name: &OsStr, shown: &Path, by: &str) -> io::Result<()> {
        let target = readlinkat(dir, name).unwrap_or_default();
        warn!(
            "{}: replacing the symlink (to {}) by the snapshot's {by}; the link's target is left alone",
            shown.display(),
            target.to_string_lossy()
        );
        unlinkat(dir, name, UnlinkatFlags::NoRemoveDir).map_err(|e| at(shown, e))
    }

    /// The components of `item`; anything that could leave the root (`..`, an absolute path)
    /// is refused.
    pub(super) fn components(item: &Path) -> io::Result<Vec<&OsStr>> {
        item.components()
            .filter_map(|c| match c {
                Component::CurDir => None,
                Component::Normal(n) => Some(Ok(n)),
                _ => Some(Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "`{}` would leave the restore destination (absolute or `..`): refused",
                        item.display()
                    ),
                ))),
            })
            .collect()
    }

    /// Opens a directory the caller named (symlinks followed: it is the caller's choice).
    pub(super) fn open_root(path: &Path) -> io::Result<OwnedFd> {
        let path = if path.as_os_str().is_empty() {
            Path::new(".")
        } else {
            path
        };
        let fd = openat(
            nix::fcntl::AT_FDCWD,
            path,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| at(path, e))?;
        Ok(fd)
    }

    /// Opens `name` in `dir` as a directory, never through a symlink. With `create`, a missing
    /// directory is created and a symlink in its place is replaced by a new directory;
    /// without, a symlink is an error.
    pub(super) fn subdir(
        dir: &OwnedFd,
        name: &OsStr,
        create: bool,
        shown: &Path,
    ) -> io::Result<OwnedFd> {
        let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        // Bounded: each round fixes one cause (missing, symlink); a third failure means the
        // destination is being changed under us.
        for _ in 0..3 {
            match openat(dir, name, flags, Mode::empty()) {
                Ok(fd) => return Ok(fd),
                Err(Errno::ENOENT) if create => {
                    match mkdirat(dir, name, Mode::from_bits_truncate(0o777)) {
                        Ok(()) | Err(Errno::EEXIST) => {}
                        Err(e) => return Err(at(shown, e)),
                    }
                }
                Err(e @ (Errno::ELOOP | Errno::ENOTDIR)) => {
                    let found = kind(dir, name, shown)?;
                    if found == Some(SFlag::S_IFLNK) {
                        if !create {
                            return Err(refuse(shown, "is a symlink: not followed"));
                        }
                        replace_symlink(dir, name, shown, "directory")?;
                    } else if found.is_some() {
                        return Err(refuse(shown, "exists and is not a directory"));
                    } else {
                        return Err(at(shown, e));
                    }
                }
                Err(e) => return Err(at(shown, e)),
            }
        }
        Err(refuse(shown, "keeps changing while being restored"))
    }

    /// Opens the target as a file: for writing (created with `create`) or reading. A symlink
    /// in its place is replaced when creating, an error otherwise; anything but a regular file
    /// is refused (a FIFO would block, a device must not be written).
    pub(super) fn open_file(t: &Target, write: bool, create: bool) -> io::Result<File> {
        let mut flags = OFlag::O_CLOEXEC;
        flags |= if write {
            OFlag::O_WRONLY
        } else {
            OFlag::O_RDONLY
        };
        if create {
            flags |= OFlag::O_CREAT;
        }
        if !t.follow {
            flags |= OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK;
        }
        let mode = Mode::from_bits_truncate(0o666);
        let fd = match openat(&t.dir, t.name.as_os_str(), flags, mode) {
            Err(Errno::ELOOP) if !t.follow => {
                if !create || t.kind()? != Some(SFlag::S_IFLNK) {
                    return Err(refuse(&t.shown, "is a symlink: not followed"));
                }
                replace_symlink(&t.dir, &t.name, &t.shown, "file")?;
                openat(&t.dir, t.name.as_os_str(), flags | OFlag::O_EXCL, mode)
            }
            r => r,
        }
        .map_err(|e| at(&t.shown, e))?;
        let file = File::from(fd);
        if !t.follow && !file.metadata()?.is_file() {
            return Err(refuse(&t.shown, "exists and is not a regular file"));
        }
        Ok(file)
    }
}
