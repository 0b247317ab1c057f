//! The node's identity: an Ed25519 key pair and a self-signed certificate for it, kept in
//! `<data_dir>/identity/`.
//!
//! The public key, in the 44-character base64 form WireGuard uses, is the node's identity
//! everywhere (mDNS TXT, hello, approvals, audit). This module creates the files once and after
//! that only reads them: an existing but unreadable key is an error, never a reason to mint a new
//! identity, because that would silently orphan every approval other nodes granted us.

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

use base64::Engine;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
use ring::rand::{SecureRandom, SystemRandom};

const KEY_FILE: &str = "node.key";
const CERT_FILE: &str = "node.crt";
/// The mesh TLS leaf (P-256) and its chain `[leaf, identity]`, rewritten at every start so that
/// tools (curl, tests) can speak mTLS as this node.
const TLS_KEY_FILE: &str = "tls.key";
const TLS_CHAIN_FILE: &str = "tls-chain.crt";
const IDENTITY_DIR: &str = "identity";
/// Words of default node ids (64 × 64 names): short, distinct, easy to say.
const ADJECTIVES: [&str; 64] = [
    "amber", "bold", "brave", "brisk", "calm", "clever", "cosmic", "crisp", "daring", "eager",
    "early", "fancy", "fluffy", "gentle", "giant", "glad", "golden", "grand", "happy", "hazy",
    "humble", "icy", "jolly", "keen", "kind", "lively", "lucky", "mellow", "merry", "misty",
    "modest", "noble", "odd", "olive", "proud", "quick", "quiet", "rapid", "rosy", "royal",
    "rustic", "sandy", "shiny", "silent", "silver", "sly", "smooth", "snowy", "solar", "spicy",
    "steady", "stormy", "sunny", "swift", "tidy", "tiny", "urban", "vivid", "warm", "wild",
    "windy", "wise", "young", "zesty",
];
/// Second words of default node ids.
const ANIMALS: [&str; 64] = [
    "badger", "bat", "bear", "beaver", "bison", "camel", "cat", "cobra", "crab", "crane", "crow",
    "deer", "dingo", "dog", "dove", "duck", "eagle", "eel", "elk", "falcon", "ferret", "finch",
    "fox", "frog", "gecko", "goat", "goose", "hare", "hawk", "heron", "horse", "ibis", "jackal",
    "jay", "koala", "lark", "lemur", "lion", "llama", "lynx", "mole", "moose", "mouse", "newt",
    "otter", "owl", "panda", "puma", "quail", "raven", "seal", "shark", "sloth", "snail", "swan",
    "tiger", "toad", "trout", "viper", "whale", "wolf", "wombat", "yak", "zebra",
];
/// How long a TLS leaf issued at start stays valid; a node running longer must restart to
/// renew it (peers refuse an expired leaf).
pub const LEAF_VALIDITY: time::Duration = time::Duration::days(397);
/// PKCS#8 v1 header for an Ed25519 private key (RFC 8410): BoringSSL refuses the v2 documents
/// ring writes, so the key is stored in this form.
const PKCS8_V1_ED25519_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

/// An Ed25519 public key; displays as 44-character standard base64.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey([u8; 32]);

impl PublicKey {
    /// Wraps raw key bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        PublicKey(bytes)
    }

    /// Raw key bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&base64::engine::general_purpose::STANDARD.encode(self.0))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

impl std::str::FromStr for PublicKey {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(s.trim())
            .map_err(|_| IdentityError::BadPublicKey(s.to_string()))?;
        let raw: [u8; 32] = bytes
            .try_into()
            .map_err(|_| IdentityError::BadPublicKey(s.to_string()))?;
        Ok(PublicKey(raw))
    }
}

/// Why an identity could not be loaded or created.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The key file exists but is not an Ed25519 PKCS#8 key.
    #[error(
        "{0}: not an Ed25519 private key (PKCS#8 PEM); refusing to replace it with a new identity"
    )]
    BadKey(PathBuf),
    /// Certificate generation failed.
    #[error("certificate: {0}")]
    Certificate(#[from] rcgen::Error),
    /// A string is not a 44-character base64 Ed25519 public key.
    #[error("`{0}` is not a 44-character base64 Ed25519 public key")]
    BadPublicKey(String),
    /// The system random generator failed.
    #[error("no system randomness available")]
    Random,
}

/// The node's key pair and certificate, loaded from (or created in) the data dir.
pub struct Identity {
    public_key: PublicKey,
    key_pair: KeyPair,
    key_pem: String,
    cert_pem: String,
    dir: PathBuf,
}

/// A TLS leaf certificate issued by the node's identity certificate.
///
/// BoringSSL through Pingora's connector cannot use an Ed25519 leaf (its signature-algorithm
/// list lacks Ed25519), so the Ed25519 identity signs a P-256 leaf and peers check the chain
/// leaf -> identity -> self-signed (`../shared/notes/pingora-mtls.md`).
pub struct TlsLeaf {
    /// PEM of the P-256 leaf certificate.
    pub cert_pem: String,
    /// PEM (PKCS#8) of the leaf's private key.
    pub key_pem: String,
    /// PEM of the identity certificate that issued it.
    pub identity_pem: String,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("public_key", &self.public_key)
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

/// Where the node's private key lives in `data_dir` (created at first start).
pub fn key_path(data_dir: &Path) -> PathBuf {
    data_dir.join(IDENTITY_DIR).join(KEY_FILE)
}

impl Identity {
    /// Loads the identity from `<data_dir>/identity/`, creating it on first start.
    pub fn load_or_create(data_dir: &Path) -> Result<Self, IdentityError> {
        let dir = data_dir.join(IDENTITY_DIR);
        fs::create_dir_all(&dir).map_err(|source| IdentityError::Io {
            path: dir.clone(),
            source,
        })?;
        let key_path = dir.join(KEY_FILE);
        let key_pem = match fs::read_to_string(&key_path) {
            Ok(pem) => pem,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => create_key(&key_path)?,
            Err(source) => {
                return Err(IdentityError::Io {
                    path: key_path,
                    source,
                })
            }
        };
        let key_pair =
            KeyPair::from_pem(&key_pem).map_err(|_| IdentityError::BadKey(key_path.clone()))?;
        let raw: [u8; 32] = key_pair
            .public_key_raw()
            .try_into()
            .map_err(|_| IdentityError::BadKey(key_path.clone()))?;
        let public_key = PublicKey(raw);
        let cert_path = dir.join(CERT_FILE);
        // The certificate is derived data: rebuild it when missing or when it names another key.
        let cert_pem = match fs::read_to_string(&cert_path) {
            Ok(pem) if cert_matches(&pem, &public_key) => pem,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let pem = self_signed(&key_pair, &public_key)?;
                let io = |source| IdentityError::Io {
                    path: cert_path.clone(),
                    source,
                };
                if crate::fsutil::create_new_atomic(&cert_path, pem.as_bytes(), 0o644)
                    .map_err(io)?
                {
                    pem
                } else {
                    // A concurrent start wrote it first; it certifies the same key, so use
                    // what is on disk and keep every process on one certificate.
                    match fs::read_to_string(&cert_path).map_err(io)? {
                        disk if cert_matches(&disk, &public_key) => disk,
                        _ => pem,
                    }
                }
            }
            _ => {
                let pem = self_signed(&key_pair, &public_key)?;
                write_atomic(&cert_path, pem.as_bytes(), 0o644)?;
                pem
            }
        };
        Ok(Identity {
            public_key,
            key_pair,
            key_pem,
            cert_pem,
            dir,
        })
    }

    /// The node's public key.
    pub fn public_key(&self) -> PublicKey {
        self.public_key
    }

    /// PEM of the private key (PKCS#8 v1).
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// PEM of the self-signed identity certificate.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The identity directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Issues a fresh TLS leaf under this identity and writes it (with its chain) next to the
    /// identity, key file mode 0600. It is valid from an hour ago (peers' clocks differ a
    /// little) for [`LEAF_VALIDITY`].
    pub fn issue_tls_leaf(&self) -> Result<TlsLeaf, IdentityError> {
        let now = time::OffsetDateTime::now_utc();
        let leaf = self.leaf_valid(now - time::Duration::hours(1), now + LEAF_VALIDITY)?;
        write_atomic(&self.dir.join(TLS_KEY_FILE), leaf.key_pem.as_bytes(), 0o600)?;
        let chain = format!("{}{}", leaf.cert_pem, leaf.identity_pem);
        write_atomic(&self.dir.join(TLS_CHAIN_FILE), chain.as_bytes(), 0o644)?;
        Ok(leaf)
    }

    /// A TLS leaf under this identity valid from `not_before` to `not_after`, not written
    /// anywhere (tests use it to present expired or future leaves).
    pub fn leaf_valid(
        &self,
        not_before: time::OffsetDateTime,
        not_after: time::OffsetDateTime,
    ) -> Result<TlsLeaf, IdentityError> {
        let leaf_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::new(vec!["arknet".to_string()])?;
        params.distinguished_name.push(
            DnType::CommonName,
            format!("arknet leaf {}", self.public_key),
        );
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_before = not_before;
        params.not_after = not_after;
        let issuer_params = identity_params(&self.public_key)?;
        let issuer = rcgen::Issuer::from_params(&issuer_params, &self.key_pair);
        Ok(TlsLeaf {
            cert_pem: params.signed_by(&leaf_key, &issuer)?.pem(),
            key_pem: leaf_key.serialize_pem(),
            identity_pem: self.cert_pem.clone(),
        })
    }

    /// Node id derived from the hostname and the key, for nodes that configure none:
    /// `ark-<host>-<adjective>-<animal>`. The words come from the key, so each data dir (each
    /// identity) on a host gets its own name, stable across restarts, that a person can tell
    /// apart and say aloud, unlike a hex tag.
    pub fn default_node_id(&self) -> String {
        let host = fs::read_to_string("/proc/sys/kernel/hostname")
            .unwrap_or_default()
            .trim()
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
            .take(40)
            .collect::<String>();
        let host = if host.is_empty() { "node".into() } else { host };
        let k = self.public_key.0;
        let adjective = ADJECTIVES[usize::from(k[0]) % ADJECTIVES.len()];
        let animal = ANIMALS[usize::from(k[1]) % ANIMALS.len()];
        format!("ark-{host}-{adjective}-{animal}")
    }
}

/// Creates the key file unless it exists by now, and returns the key that is on disk: when
/// several processes create an identity at once, exactly one key wins and all of them use it.
fn create_key(path: &Path) -> Result<String, IdentityError> {
    let mut seed = [0u8; 32];
    SystemRandom::new()
        .fill(&mut seed)
        .map_err(|_| IdentityError::Random)?;
    let mut der = PKCS8_V1_ED25519_PREFIX.to_vec();
    der.extend_from_slice(&seed);
    let pem = pem::encode(&pem::Pem::new("PRIVATE KEY", der));
    let io = |source| IdentityError::Io {
        path: path.to_path_buf(),
        source,
    };
    if crate::fsutil::create_new_atomic(path, pem.as_bytes(), 0o600).map_err(io)? {
        return Ok(pem);
    }
    // Another process (an `arknet id` next to a starting service) created the key first: its
    // key is the identity, and ours is discarded before anyone saw it.
    fs::read_to_string(path).map_err(io)
}

fn self_signed(key: &KeyPair, public_key: &PublicKey) -> Result<String, IdentityError> {
    Ok(identity_params(public_key)?.self_signed(key)?.pem())
}

/// The identity certificate's parameters; deterministic so a leaf issued later names exactly
/// the identity certificate's subject as its issuer.
fn identity_params(public_key: &PublicKey) -> Result<CertificateParams, IdentityError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(DnType::CommonName, format!("arknet {public_key}"));
    // CA so that the mesh can issue short-lived TLS leaves under this identity (DESIGN §3).
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = rcgen::date_time_ymd(2024, 1, 1);
    params.not_after = rcgen::date_time_ymd(2124, 1, 1);
    Ok(params)
}

fn cert_matches(pem: &str, key: &PublicKey) -> bool {
    // The identity cert embeds the raw key in its SubjectPublicKeyInfo; finding those 32 bytes in
    // the DER is enough to tell a stale cert from a current one without an X.509 parser.
    pem::parse(pem).is_ok_and(|p| p.contents().windows(32).any(|w| w == key.as_bytes()))
}

fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), IdentityError> {
    crate::fsutil::write_atomic(path, bytes, mode).map_err(|source| IdentityError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Who this node is, for `/health` and hello.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    /// Node id.
    pub node_id: String,
    /// Public key.
    pub public_key: PublicKey,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn identity_is_created_once_then_reloaded_unchanged() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = Identity::load_or_create(dir.path()).expect("create");
        let second = Identity::load_or_create(dir.path()).expect("reload");
        assert_eq!(first.public_key(), second.public_key());
        assert_eq!(first.cert_pem(), second.cert_pem());
        assert_eq!(first.public_key().to_string().len(), 44);
        let mode = fs::metadata(dir.path().join("identity/node.key"))
            .expect("key exists")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn corrupt_key_is_reported_and_left_in_place() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::create_dir_all(dir.path().join("identity")).expect("mkdir");
        let key = dir.path().join("identity/node.key");
        fs::write(&key, "not a key").expect("write");
        let err = Identity::load_or_create(dir.path()).expect_err("corrupt key must fail");
        assert!(matches!(err, IdentityError::BadKey(_)), "{err}");
        assert_eq!(fs::read_to_string(&key).expect("still there"), "not a key");
    }

    #[test]
    fn missing_certificate_is_rebuilt_for_the_same_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = Identity::load_or_create(dir.path()).expect("create");
        fs::remove_file(dir.path().join("identity/node.crt")).expect("rm cert");
        let second = Identity::load_or_create(dir.path()).expect("reload");
        assert_eq!(first.public_key(), second.public_key());
        assert!(cert_matches(second.cert_pem(), &second.public_key()));
    }

    #[test]
    fn default_node_ids_differ_per_identity_and_read_as_words() {
        let ids: std::collections::HashSet<String> = (0..8)
            .map(|_| {
                let dir = tempfile::tempdir().expect("tempdir");
                Identity::load_or_create(dir.path())
                    .expect("create")
                    .default_node_id()
            })
            .collect();
        // 4096 names: eight identities share one with a probability under 1%.
        assert!(ids.len() >= 7, "{ids:?}");
        for id in &ids {
            let words: Vec<&str> = id.rsplitn(3, '-').collect();
            assert!(
                ADJECTIVES.contains(&words[1]) && ANIMALS.contains(&words[0]),
                "{id}"
            );
            assert!(id.starts_with("ark-"), "{id}");
            assert!(crate::config::valid_node_id(id), "{id}");
        }
    }

    #[test]
    fn public_key_round_trips_through_base64() {
        let k = PublicKey::from_bytes([7u8; 32]);
        let parsed: PublicKey = k.to_string().parse().expect("parse");
        assert_eq!(parsed, k);
        assert!("abc".parse::<PublicKey>().is_err());
    }
}
