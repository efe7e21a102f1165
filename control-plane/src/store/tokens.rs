//! The admin API's bearer tokens at rest: one sled tree, `tokens`, from a
//! token's id to its [`TokenRecord`] as JSON. Only a digest of each token's
//! secret is kept; tokens are not policy, so they make no revision and
//! never reach a proxy.

use serde::{Deserialize, Serialize};

use super::{Store, StoreError};

/// The sled tree of tokens.
pub(super) const TOKENS_TREE: &str = "tokens";

/// One bearer token, as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// Public part of the token, unique: how it is looked up and revoked.
    pub id: String,
    /// Who holds it; recorded as the author of every write made with it.
    pub subject: String,
    /// `viewer`, `editor` or `admin`.
    pub role: String,
    /// The namespaces it may touch; every namespace when empty.
    pub namespaces: Vec<String>,
    /// SHA-256 of the token's secret, hex.
    pub digest: String,
    /// When it was created, milliseconds since the Unix epoch.
    pub created_unix_millis: i64,
    /// Who created it.
    pub created_by: String,
}

impl Store {
    /// The token with `id`, if it exists.
    pub fn token(&self, id: &str) -> Result<Option<TokenRecord>, StoreError> {
        self.inner
            .tokens
            .get(id.as_bytes())?
            .map(|bytes| decode_token(id, &bytes))
            .transpose()
    }

    /// Every token, ordered by id.
    pub fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        self.inner
            .tokens
            .iter()
            .map(|entry| {
                let (key, value) = entry?;
                decode_token(&String::from_utf8_lossy(&key), &value)
            })
            .collect()
    }

    /// Stores `token`, on disk before this returns.
    pub async fn put_token(&self, token: &TokenRecord) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(token)
            .map_err(|e| StoreError::Corrupt(format!("token {}: {e}", token.id)))?;
        self.inner.tokens.insert(token.id.as_bytes(), bytes)?;
        self.inner.db.flush_async().await?;
        Ok(())
    }

    /// Removes the token with `id`, on disk before this returns; whether it
    /// existed.
    pub async fn remove_token(&self, id: &str) -> Result<bool, StoreError> {
        let existed = self.inner.tokens.remove(id.as_bytes())?.is_some();
        self.inner.db.flush_async().await?;
        Ok(existed)
    }
}

fn decode_token(id: &str, bytes: &[u8]) -> Result<TokenRecord, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt(format!("token {id}: {e}")))
}
