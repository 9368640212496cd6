//! Tenants and their credentials: a bearer token for the evidence API and an
//! S3 access key per issue, one transaction each. The CLI uses this on the
//! index host with the gateway stopped; the admin API
//! (`POST /v1/admin/tenants`, `POST /v1/admin/keys`) uses it on a running
//! cluster. Secrets are returned once and never logged.

use indexer::s3::{AccessKeyRecord, ObjectError};
use indexer::schema::{Role, TokenRecord};

/// A tenant's credentials for one role. Only the token's hash is stored; the
/// S3 secret is stored (SigV4 needs it).
pub struct Credentials {
    pub tenant: String,
    pub role: Role,
    pub token: String,
    pub access_key: String,
    pub secret: String,
    pub bypass_governance: bool,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("tenant", &self.tenant)
            .field("role", &self.role)
            .field("access_key", &self.access_key)
            .finish_non_exhaustive()
    }
}

impl Credentials {
    /// The AWS shared-credentials form, under `[profile]`.
    pub fn aws_profile(&self, profile: &str) -> String {
        format!(
            "[{profile}]\naws_access_key_id = {}\naws_secret_access_key = {}\n",
            self.access_key, self.secret
        )
    }
}

/// The ledger's openings archive's folder of credentials revoked through
/// the admin API: `recover-index`, which restores the credentials
/// DATA_DIR's files hold, must not bring back one revoked while a file
/// still held it. One empty file each: `token-<BLAKE3 of the token, hex>`,
/// `s3-<BLAKE3 of the access key id, hex>` (a name of bounded length).
pub const REVOKED_DIR: &str = "credentials-revoked";

/// The archive's name for revoked `token`.
pub fn revoked_token_name(token: &str) -> String {
    revoked_token_hash_name(&indexer::schema::token_hash(token))
}

/// The archive's name for the revoked token of hash `hash`
/// ([`indexer::schema::token_hash`]).
pub fn revoked_token_hash_name(hash: &[u8; 32]) -> String {
    format!("{REVOKED_DIR}/token-{}", hex::encode(hash))
}

/// The archive's name for revoked `access_key`.
pub fn revoked_access_key_name(access_key: &str) -> String {
    format!(
        "{REVOKED_DIR}/s3-{}",
        blake3::hash(access_key.as_bytes()).to_hex()
    )
}

/// Notes in the archive that `token` and `access_key` are revoked, before
/// the index revokes them (a failure between the two leaves a credential
/// that recovery will not restore, never one it would bring back).
///
/// The token is named by its hash ([`indexer::schema::token_hash`]).
pub async fn archive_revocation(
    ledger: &crate::ledger::Ledger,
    token: Option<&[u8; 32]>,
    access_key: Option<&str>,
) -> Result<(), crate::ledger::LedgerError> {
    let names = token
        .map(revoked_token_hash_name)
        .into_iter()
        .chain(access_key.map(revoked_access_key_name));
    for name in names {
        ledger.archive_file(&name, Vec::new()).await?;
    }
    Ok(())
}

/// The names of every revocation in the archive (see [`REVOKED_DIR`]).
pub async fn archived_revocations(
    ledger: &crate::ledger::Ledger,
) -> Result<std::collections::HashSet<String>, crate::ledger::LedgerError> {
    Ok(ledger
        .archived_names(REVOKED_DIR)
        .await?
        .into_iter()
        .map(|(name, _)| name)
        .collect())
}

/// A bearer token: 256 random bits, hex.
pub fn new_token() -> String {
    hex::encode(rand::random::<[u8; 32]>())
}

/// How custody records name a bearer token: `token:` and the first 8 bytes
/// of its BLAKE3, hex. It tells the token apart from every other without
/// telling anything of the token itself; `key create` prints it beside the
/// token, for the operator to note who holds it.
pub fn token_id(token: &str) -> String {
    let hash = indexer::schema::token_hash(token);
    format!("{TOKEN_ID_PREFIX}{}", hex::encode(&hash[..TOKEN_ID_BYTES]))
}

const TOKEN_ID_PREFIX: &str = "token:";
const TOKEN_ID_BYTES: usize = 8;

/// Why a token id ([`token_id`]) names no one token to revoke.
#[derive(Debug, thiserror::Error)]
pub enum TokenIdError {
    #[error("\"{0}\" is not a token id: that is \"token:\" and 16 hex digits, as custody records and `custodia key create` print it")]
    Malformed(String),
    #[error("no stored token has the id {0}")]
    Unknown(String),
    #[error("more than one stored token has the id {0}: revoke it by the token itself")]
    Ambiguous(String),
    #[error(transparent)]
    Index(#[from] ObjectError),
}

/// The hash of the one stored token whose id ([`token_id`]) is `id`: how
/// an operator who sees a token misused in custody records, and never
/// held it, revokes it.
pub async fn resolve_token_id<S: indexer::KvStore>(
    store: &S,
    id: &str,
) -> Result<[u8; 32], TokenIdError> {
    let id = id.trim();
    let prefix = id
        .strip_prefix(TOKEN_ID_PREFIX)
        .filter(|h| h.len() == 2 * TOKEN_ID_BYTES)
        .and_then(|h| hex::decode(h).ok())
        .ok_or_else(|| TokenIdError::Malformed(id.to_owned()))?;
    let found = indexer::run(store, |tx| {
        let prefix = &prefix;
        async move {
            Ok::<_, ObjectError>(indexer::schema::tokens_by_hash_prefix_tx(&tx, prefix, 2).await?)
        }
    })
    .await?;
    match found.as_slice() {
        [one] => Ok(*one),
        [] => Err(TokenIdError::Unknown(id.to_owned())),
        _ => Err(TokenIdError::Ambiguous(id.to_owned())),
    }
}

/// Stores new credentials for an existing tenant in one transaction;
/// [`ObjectError::NoSuchTenant`] if there is none.
pub async fn issue<S: indexer::KvStore>(
    store: &S,
    tenant: &str,
    role: Role,
    bypass_governance: bool,
) -> Result<Credentials, ObjectError> {
    const ALNUM: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let access_key: String = std::iter::once("CU".to_owned())
        .chain(
            rand::random::<[u8; 18]>()
                .iter()
                .map(|b| (ALNUM[*b as usize % ALNUM.len()] as char).to_string()),
        )
        .collect();
    let creds = Credentials {
        tenant: tenant.to_owned(),
        role,
        token: new_token(),
        access_key,
        secret: hex::encode(rand::random::<[u8; 20]>()),
        bypass_governance,
    };
    indexer::run(store, |tx| {
        let creds = &creds;
        async move {
            indexer::schema::put_token_tx(
                &tx,
                &creds.token,
                &TokenRecord {
                    tenant: creds.tenant.clone(),
                    role,
                },
            )?;
            indexer::s3::put_access_key_tx(
                &tx,
                &creds.access_key,
                &AccessKeyRecord {
                    tenant: creds.tenant.clone(),
                    role,
                    secret: creds.secret.clone(),
                    bypass_governance,
                },
            )
            .await
        }
    })
    .await?;
    Ok(creds)
}

/// Registers a tenant (`[a-z0-9_-]{1,64}`); false if it already existed.
pub async fn create_tenant<S: indexer::KvStore>(
    store: &S,
    name: &str,
    now_ms: u64,
) -> Result<bool, ObjectError> {
    indexer::run(store, |tx| async move {
        indexer::s3::create_tenant_tx(&tx, name, now_ms).await
    })
    .await
}

/// What [`revoke`] found and removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Revoked {
    pub token: bool,
    pub access_key: bool,
}

/// Revokes a bearer token and/or an S3 access key in one transaction: each
/// stops working when it commits (both APIs read credentials from the
/// index at every request; nothing caches them).
///
/// The token is named by its hash ([`indexer::schema::token_hash`]).
pub async fn revoke<S: indexer::KvStore>(
    store: &S,
    token: Option<&[u8; 32]>,
    access_key: Option<&str>,
) -> Result<Revoked, ObjectError> {
    indexer::run(store, |tx| async move {
        let mut revoked = Revoked::default();
        if let Some(t) = token {
            revoked.token = indexer::schema::revoke_token_hash_tx(&tx, t).await?;
        }
        if let Some(k) = access_key {
            revoked.access_key = indexer::s3::revoke_access_key_tx(&tx, k).await?;
        }
        Ok::<_, ObjectError>(revoked)
    })
    .await
}
