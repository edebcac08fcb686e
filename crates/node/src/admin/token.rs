//! The admin token: a random secret in the PKI directory that every
//! request changing the cluster must carry (`Authorization: Bearer ...`).
//!
//! A file rather than a setting in the cluster config so that the config can
//! be shared, checked in and shown, while the secret sits next to the node
//! keys with the same protection (mode 0600).

use std::fmt;
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use subtle::ConstantTimeEq as _;

/// The token's file name inside the PKI directory.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";

/// Random bytes in a token made here (hex-encoded in the file).
const TOKEN_BYTES: usize = 32;
/// Shortest token accepted from a file: an operator may bring their own,
/// but one short enough to guess is refused.
const TOKEN_CHARS_MIN: usize = 32;
/// Longest token accepted: it travels in a header line.
const TOKEN_CHARS_MAX: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("cannot create the admin token {path}: {source}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read the admin token {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the operating system's random generator failed: {0}")]
    Random(String),
    #[error(
        "the admin token {path} is readable by other users (mode {mode:o}): run `chmod 600 {path}`"
    )]
    Exposed { path: PathBuf, mode: u32 },
    #[error("the admin token {path} is not usable: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

/// A token as read from its file. `Debug` never shows the secret, so it
/// cannot leak into logs through a `?` field.
#[derive(Clone, PartialEq, Eq)]
pub struct AdminToken(String);

impl fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AdminToken(..)")
    }
}

impl AdminToken {
    /// Reads a token file; `None` if there is none. Used by clients, which
    /// read their operator's own file, so its mode is not checked.
    pub fn read(path: &Path) -> Result<Option<AdminToken>, TokenError> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(TokenError::Read {
                    path: path.to_path_buf(),
                    source,
                });
            }
        };
        AdminToken::parse(&text)
            .map(Some)
            .map_err(|reason| TokenError::Invalid {
                path: path.to_path_buf(),
                reason,
            })
    }

    /// Reads the token a node checks requests against; `None` if there is
    /// none. Refuses a file other users can read, as ssh refuses a private
    /// key: whoever reads it can delete every volume.
    pub fn load_for_node(path: &Path) -> Result<Option<AdminToken>, TokenError> {
        let metadata = match std::fs::metadata(path) {
            Ok(metadata) => metadata,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(TokenError::Read {
                    path: path.to_path_buf(),
                    source,
                });
            }
        };
        let mode = metadata.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(TokenError::Exposed {
                path: path.to_path_buf(),
                mode,
            });
        }
        AdminToken::read(path)
    }

    fn parse(text: &str) -> Result<AdminToken, String> {
        let token = text.trim();
        if token.len() < TOKEN_CHARS_MIN {
            return Err(format!(
                "it holds {} characters, fewer than {TOKEN_CHARS_MIN}",
                token.len()
            ));
        }
        if token.len() > TOKEN_CHARS_MAX {
            return Err(format!("it is longer than {TOKEN_CHARS_MAX} characters"));
        }
        // Visible ASCII only: it must fit in an HTTP header unchanged.
        if !token.bytes().all(|byte| byte.is_ascii_graphic()) {
            return Err("it may hold only visible ASCII characters, on one line".into());
        }
        Ok(AdminToken(token.to_string()))
    }

    /// The secret, to send in a request header.
    pub fn secret(&self) -> &str {
        &self.0
    }

    /// Whether `presented` is this token, in time that does not depend on
    /// where they differ, so the answer's timing gives an attacker nothing
    /// to guess the token byte by byte.
    pub fn matches(&self, presented: &[u8]) -> bool {
        self.0.as_bytes().ct_eq(presented).into()
    }
}

/// Creates `dir/admin.token` (mode 0600, 32 random bytes from the OS as
/// hex) unless it exists. Returns whether it was created. Safe against a
/// concurrent creator: the file is created exclusively, so the one that
/// loses keeps the winner's token.
pub fn ensure_admin_token(dir: &Path) -> Result<bool, TokenError> {
    let path = dir.join(ADMIN_TOKEN_FILE);
    let create_error = |source| TokenError::Create {
        path: path.clone(),
        source,
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(create_error)?;
    let mut bytes = [0u8; TOKEN_BYTES];
    getrandom::fill(&mut bytes).map_err(|error| TokenError::Random(error.to_string()))?;
    let text: String = bytes.iter().map(|byte| format!("{byte:02x}")).collect();
    // Written under a temporary name and renamed, so that a crash never
    // leaves a truncated token file that a later start would refuse.
    static STAGED: AtomicU64 = AtomicU64::new(0);
    let staging = dir.join(format!(
        "{ADMIN_TOKEN_FILE}.{}-{}.tmp",
        std::process::id(),
        STAGED.fetch_add(1, Ordering::Relaxed)
    ));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&staging)
        .map_err(create_error)?;
    let written = file
        .write_all(format!("{text}\n").as_bytes())
        .and_then(|()| file.sync_all());
    drop(file);
    if let Err(source) = written {
        let _ = std::fs::remove_file(&staging);
        return Err(create_error(source));
    }
    // A hard link fails if the name exists: the exclusive create, which a
    // rename would not give.
    let linked = std::fs::hard_link(&staging, &path);
    let _ = std::fs::remove_file(&staging);
    match linked {
        Ok(()) => {
            sync_dir(dir).map_err(create_error)?;
            Ok(true)
        }
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(source) => Err(create_error(source)),
    }
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_token_is_random_private_and_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = dir.path().join("pki");
        assert!(ensure_admin_token(&pki).expect("created"));
        let path = pki.join(ADMIN_TOKEN_FILE);
        let mode = std::fs::metadata(&path)
            .expect("exists")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let token = AdminToken::load_for_node(&path)
            .expect("readable")
            .expect("present");
        assert_eq!(token.secret().len(), 2 * TOKEN_BYTES);
        assert!(token.secret().bytes().all(|b| b.is_ascii_hexdigit()));
        // Kept on a second call; no staging file left behind.
        assert!(!ensure_admin_token(&pki).expect("kept"));
        let again = AdminToken::read(&path).expect("readable").expect("present");
        assert_eq!(again, token);
        let files: Vec<_> = std::fs::read_dir(&pki).expect("dir").collect();
        assert_eq!(files.len(), 1);
        // Another directory gets another token.
        let other = dir.path().join("other");
        ensure_admin_token(&other).expect("created");
        let other = AdminToken::read(&other.join(ADMIN_TOKEN_FILE))
            .expect("readable")
            .expect("present");
        assert_ne!(other, token);
        assert_eq!(format!("{token:?}"), "AdminToken(..)");
    }

    #[test]
    fn a_token_matches_only_itself() {
        let token = AdminToken::parse("0123456789abcdef0123456789abcdef\n").expect("valid");
        assert!(token.matches(b"0123456789abcdef0123456789abcdef"));
        assert!(!token.matches(b"0123456789abcdef0123456789abcdee"));
        assert!(!token.matches(b"0123456789abcdef0123456789abcde"));
        assert!(!token.matches(b""));
    }

    #[test]
    fn bad_token_files_are_refused_by_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(ADMIN_TOKEN_FILE);
        assert!(AdminToken::load_for_node(&path).expect("absent").is_none());
        std::fs::write(&path, "short\n").expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let error = AdminToken::load_for_node(&path).expect_err("too short");
        assert!(error.to_string().contains("fewer than"), "{error}");
        std::fs::write(&path, "0123456789abcdef 0123456789abcdef\n").expect("write");
        let error = AdminToken::read(&path).expect_err("a space");
        assert!(error.to_string().contains("visible ASCII"), "{error}");
        std::fs::write(&path, "0123456789abcdef0123456789abcdef\n").expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let error = AdminToken::load_for_node(&path).expect_err("world-readable");
        assert!(error.to_string().contains("chmod 600"), "{error}");
        // A client reads its operator's own file whatever its mode.
        assert!(AdminToken::read(&path).expect("readable").is_some());
    }
}
