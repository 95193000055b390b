//! The gateway's WireGuard key pair: generated once, kept in a 0600 file (base64, the format
//! of `wg genkey`), so restarts keep the identity peers know.

use std::{io::Write as _, os::unix::fs::OpenOptionsExt as _, path::Path};

use base64::{Engine as _, engine::general_purpose::STANDARD as B64};
use boringtun::x25519::{PublicKey, StaticSecret};
use causeway_broker_api::WireGuardKey;
use rand_core::OsRng;
use tracing::info;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("reading the private key {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("writing the private key {path}: {source}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the private key in {path} is not a base64 32-byte key; remove the file to generate a new identity"
    )]
    Malformed { path: String },
}

/// Private key plus its public half.
#[derive(Clone)]
pub struct KeyPair {
    pub private: StaticSecret,
    pub public: WireGuardKey,
}

impl std::fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the private key.
        f.debug_struct("KeyPair").field("public", &self.public).finish_non_exhaustive()
    }
}

impl KeyPair {
    #[must_use]
    pub fn from_private(private: StaticSecret) -> Self {
        let public = WireGuardKey(PublicKey::from(&private).to_bytes());
        Self { private, public }
    }

    #[must_use]
    pub fn generate() -> Self {
        Self::from_private(StaticSecret::random_from_rng(OsRng))
    }
}

/// The permission bits that let others than the owner read or write a key file, if any.
#[must_use]
pub fn loose_bits(mode: u32) -> Option<u32> {
    let loose = mode & 0o077;
    (loose != 0).then_some(loose)
}

/// Reads a key file without following a link at its name, warning when others may read it.
fn read_key_file(path: &Path) -> std::io::Result<String> {
    use std::{io::Read as _, os::unix::fs::PermissionsExt as _};
    let mut f = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(path)?;
    let mode = f.metadata()?.permissions().mode();
    if let Some(bits) = loose_bits(mode) {
        tracing::warn!(path = %path.display(), mode = format!("{:o}", mode & 0o777), loose = format!("{bits:o}"),
            "the private key is readable or writable by others than its owner; chmod 600 it");
    }
    let mut s = String::new();
    f.read_to_string(&mut s)?;
    Ok(s)
}

/// Loads the key at `path`, or generates and stores a new one if the file does not exist.
pub fn load_or_generate(path: &Path) -> Result<KeyPair, KeyError> {
    let p = path.display().to_string();
    match read_key_file(path) {
        Ok(s) => {
            let bytes = B64.decode(s.trim()).map_err(|_| KeyError::Malformed { path: p.clone() })?;
            let arr: [u8; 32] = bytes.try_into().map_err(|_| KeyError::Malformed { path: p })?;
            Ok(KeyPair::from_private(StaticSecret::from(arr)))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let pair = KeyPair::generate();
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(|source| KeyError::Write { path: p.clone(), source })?;
            }
            // create_new: O_EXCL, so a link planted at the name is never followed.
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(|source| KeyError::Write { path: p.clone(), source })?;
            writeln!(f, "{}", B64.encode(pair.private.to_bytes()))
                .and_then(|()| f.sync_all())
                .map_err(|source| KeyError::Write { path: p.clone(), source })?;
            info!(path = %p, public_key = %pair.public, "generated a new WireGuard key pair");
            Ok(pair)
        }
        Err(source) => Err(KeyError::Read { path: p, source }),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    fn tmp(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("cw-keys-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d.join("private.key")
    }

    #[test]
    fn generated_once_then_kept() {
        let path = tmp("keep");
        let a = load_or_generate(&path).unwrap();
        let b = load_or_generate(&path).unwrap();
        assert_eq!(a.public, b.public);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(!format!("{a:?}").contains(&B64.encode(a.private.to_bytes())));
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[test]
    fn public_key_matches_wireguard_derivation() {
        // RFC 7748 §6.1 test vector (Alice).
        let private: [u8; 32] = [
            0x77, 0x07, 0x6d, 0x0a, 0x73, 0x18, 0xa5, 0x7d, 0x3c, 0x16, 0xc1, 0x72, 0x51, 0xb2, 0x66, 0x45,
            0xdf, 0x4c, 0x2f, 0x87, 0xeb, 0xc0, 0x99, 0x2a, 0xb1, 0x77, 0xfb, 0xa5, 0x1d, 0xb9, 0x2c, 0x2a,
        ];
        let pair = KeyPair::from_private(StaticSecret::from(private));
        assert_eq!(pair.public.to_string(), "hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo=");
    }

    #[test]
    fn loose_key_files_are_noticed_and_links_are_not_followed() {
        assert_eq!(loose_bits(0o100_600), None);
        assert_eq!(loose_bits(0o100_644), Some(0o044));
        assert_eq!(loose_bits(0o100_660), Some(0o060));
        let path = tmp("loose");
        let a = load_or_generate(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        // Still loads (with a warning): refusing would take the gateway down over a chmod.
        assert_eq!(load_or_generate(&path).unwrap().public, a.public);
        // A key path that is a link is refused, not followed, and nothing is generated.
        let link = path.with_file_name("link.key");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        assert!(matches!(load_or_generate(&link), Err(KeyError::Read { .. })));
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[test]
    fn malformed_file_is_an_error_not_a_new_identity() {
        let path = tmp("bad");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, "not a key\n").unwrap();
        let err = load_or_generate(&path).unwrap_err();
        assert!(matches!(err, KeyError::Malformed { .. }), "{err}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "not a key\n");
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }
}
