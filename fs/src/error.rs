//! Errors the filesystem answers with: an errno the kernel sees and a sentence the `error` file shows.

use std::fmt;

/// The errnos this filesystem answers with. Each maps to exactly one libc code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Errno {
    NoEnt,
    Inval,
    Acces,
    Perm,
    Busy,
    Exist,
    NotDir,
    IsDir,
    NotEmpty,
    NoSpc,
    Again,
    HostDown,
    Stale,
    Io,
    FBig,
    RoFs,
    NoSys,
    TimedOut,
    NameTooLong,
}

impl Errno {
    /// Every errno, for lookups by code.
    pub const ALL: [Errno; 19] = [
        Errno::NoEnt,
        Errno::Inval,
        Errno::Acces,
        Errno::Perm,
        Errno::Busy,
        Errno::Exist,
        Errno::NotDir,
        Errno::IsDir,
        Errno::NotEmpty,
        Errno::NoSpc,
        Errno::Again,
        Errno::HostDown,
        Errno::Stale,
        Errno::Io,
        Errno::FBig,
        Errno::RoFs,
        Errno::NoSys,
        Errno::TimedOut,
        Errno::NameTooLong,
    ];

    /// The errno with libc code `code`, or EIO for one this filesystem never answers with.
    pub fn from_code(code: i32) -> Errno {
        Errno::ALL.into_iter().find(|e| e.code() == code).unwrap_or(Errno::Io)
    }

    /// The libc code the kernel gets.
    pub fn code(self) -> i32 {
        match self {
            Errno::NoEnt => libc::ENOENT,
            Errno::Inval => libc::EINVAL,
            Errno::Acces => libc::EACCES,
            Errno::Perm => libc::EPERM,
            Errno::Busy => libc::EBUSY,
            Errno::Exist => libc::EEXIST,
            Errno::NotDir => libc::ENOTDIR,
            Errno::IsDir => libc::EISDIR,
            Errno::NotEmpty => libc::ENOTEMPTY,
            Errno::NoSpc => libc::ENOSPC,
            Errno::Again => libc::EAGAIN,
            Errno::HostDown => libc::EHOSTDOWN,
            Errno::Stale => libc::ESTALE,
            Errno::Io => libc::EIO,
            Errno::FBig => libc::EFBIG,
            Errno::RoFs => libc::EROFS,
            Errno::NoSys => libc::ENOSYS,
            Errno::TimedOut => libc::ETIMEDOUT,
            Errno::NameTooLong => libc::ENAMETOOLONG,
        }
    }

    /// The symbolic name, as the `error` file prints it.
    pub fn name(self) -> &'static str {
        match self {
            Errno::NoEnt => "ENOENT",
            Errno::Inval => "EINVAL",
            Errno::Acces => "EACCES",
            Errno::Perm => "EPERM",
            Errno::Busy => "EBUSY",
            Errno::Exist => "EEXIST",
            Errno::NotDir => "ENOTDIR",
            Errno::IsDir => "EISDIR",
            Errno::NotEmpty => "ENOTEMPTY",
            Errno::NoSpc => "ENOSPC",
            Errno::Again => "EAGAIN",
            Errno::HostDown => "EHOSTDOWN",
            Errno::Stale => "ESTALE",
            Errno::Io => "EIO",
            Errno::FBig => "EFBIG",
            Errno::RoFs => "EROFS",
            Errno::NoSys => "ENOSYS",
            Errno::TimedOut => "ETIMEDOUT",
            Errno::NameTooLong => "ENAMETOOLONG",
        }
    }
}

/// A failure with its errno and a sentence for the person who caused it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct FsError {
    pub errno: Errno,
    pub message: String,
}

impl FsError {
    pub fn new(errno: Errno, message: impl Into<String>) -> FsError {
        FsError { errno, message: message.into() }
    }

    pub fn not_found(what: impl fmt::Display) -> FsError {
        FsError::new(Errno::NoEnt, format!("{what} does not exist"))
    }

    /// The refusal of a chmod or chown: a file's mode and owner follow from what it stands for.
    pub fn fixed_modes() -> FsError {
        FsError::new(Errno::Perm, "owners and modes are set by clusterfs")
    }

    pub fn invalid(message: impl Into<String>) -> FsError {
        FsError::new(Errno::Inval, message)
    }

    pub fn denied(message: impl Into<String>) -> FsError {
        FsError::new(Errno::Acces, message)
    }

    /// Whether this failure is the caller's (bad input, a miss, no permission) and logs at
    /// debug; failures of the server itself log at warn.
    pub fn is_routine(&self) -> bool {
        !matches!(self.errno, Errno::Io | Errno::NoSpc | Errno::RoFs | Errno::NoSys | Errno::Stale)
    }
}

impl fmt::Display for FsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.errno.name(), self.message)
    }
}

pub type Result<T, E = FsError> = std::result::Result<T, E>;
