//! The KeyValue operations behind both APIs: admit the call (binding,
//! callers, rate limits), check the request against the binding's limits,
//! call the store. gRPC and JSON differ only in how they read a request and
//! write an answer.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use prism_datastore::{Item, KeyValue, Page, Put, ScanLimit};

use super::bindings::{Binding, Writing};
use super::pb;
use super::{Caller, DataError, check_size, idempotency_key};
use crate::runtime::Runtime;

/// The longest key, in bytes.
pub(crate) const MAX_KEY_BYTES: usize = 1024;
/// The most keys or writes in one batch.
pub(crate) const MAX_BATCH: usize = 1000;
/// A scan page's items unless asked otherwise, and at most.
const PAGE_SIZE: usize = 100;
const MAX_PAGE_SIZE: usize = 1000;
/// A scan page's bytes unless asked otherwise, and at most.
const PAGE_BYTES: usize = 1024 * 1024;
const MAX_PAGE_BYTES: usize = 4 * 1024 * 1024;
/// The first byte of every page token: its format, so a later one can change.
const PAGE_TOKEN_V1: u8 = 1;

/// A KeyValue binding, admitted for one call.
pub(crate) type Store = Arc<Binding<dyn KeyValue>>;

/// One write, as either API reads it.
#[derive(Debug, Default)]
pub(crate) struct Write {
    pub key: String,
    pub value: bytes::Bytes,
    pub ttl: Option<Duration>,
    pub expected_version: Option<u64>,
    pub idempotency_key: String,
}

/// The namespace's KeyValue binding, if `caller` may call it now.
pub(crate) fn admit(
    runtime: &Runtime,
    caller: &Caller,
    namespace: &str,
) -> Result<Store, DataError> {
    let binding = super::admit(runtime, caller, namespace, "KeyValue", |b| b.kv(namespace))?;
    Ok(Arc::clone(binding))
}

pub(crate) async fn get(store: &Store, key: &str) -> Result<Item, DataError> {
    check_key("key", key)?;
    store
        .store
        .get(key)
        .await?
        .ok_or_else(|| DataError::KeyNotFound(key.to_string()))
}

pub(crate) async fn put(store: &Store, write: Write) -> Result<u64, DataError> {
    let put = checked(store, write)?;
    let _writing = writing(store)?;
    Ok(store.store.put(put).await?)
}

pub(crate) async fn delete(
    store: &Store,
    key: &str,
    expected_version: Option<u64>,
) -> Result<bool, DataError> {
    check_key("key", key)?;
    let _writing = writing(store)?;
    Ok(store.store.delete(key, expected_version).await?)
}

pub(crate) async fn batch_get(
    store: &Store,
    keys: &[String],
) -> Result<Vec<Option<Item>>, DataError> {
    if keys.len() > MAX_BATCH {
        return Err(DataError::invalid(
            "keys",
            format!("at most {MAX_BATCH} keys"),
        ));
    }
    for key in keys {
        check_key("keys", key)?;
    }
    Ok(store.store.batch_get(keys).await?)
}

pub(crate) async fn batch_put(store: &Store, writes: Vec<Write>) -> Result<Vec<u64>, DataError> {
    if writes.is_empty() || writes.len() > MAX_BATCH {
        return Err(DataError::invalid(
            "writes",
            format!("between 1 and {MAX_BATCH} writes"),
        ));
    }
    let puts = writes
        .into_iter()
        .map(|w| checked(store, w))
        .collect::<Result<Vec<_>, _>>()?;
    let _writing = writing(store)?;
    Ok(store.store.batch_put(puts).await?)
}

/// One page of items under `prefix`; the next page's token, empty when done.
pub(crate) async fn scan(
    store: &Store,
    prefix: &str,
    page_token: &str,
    page_size: u32,
    page_bytes: u32,
) -> Result<(Vec<Item>, String), DataError> {
    if prefix.len() > MAX_KEY_BYTES {
        return Err(DataError::invalid(
            "prefix",
            format!("longer than {MAX_KEY_BYTES} bytes"),
        ));
    }
    let after = decode_page_token(page_token, prefix)?;
    let limit = ScanLimit {
        max_items: super::bounded(page_size, PAGE_SIZE, MAX_PAGE_SIZE, "page_size")?,
        max_bytes: super::bounded(page_bytes, PAGE_BYTES, MAX_PAGE_BYTES, "page_bytes")?,
    };
    let Page { items, next_after } = store.store.scan(prefix, after.as_deref(), limit).await?;
    let token = next_after
        .map(|key| encode_page_token(&key))
        .unwrap_or_default();
    Ok((items, token))
}

/// Admits a write to the binding's store: refused, to be retried, while
/// its namespace moves to another store.
fn writing(store: &Store) -> Result<Writing<'_>, DataError> {
    store.seal.enter().ok_or_else(|| DataError::Moving {
        binding: store.name.clone(),
    })
}

/// A write checked against the binding, with its TTL defaulted.
fn checked(store: &Store, write: Write) -> Result<Put, DataError> {
    check_key("key", &write.key)?;
    check_size(&store.settings, "the value", write.value.len())?;
    let idempotency_key = idempotency_key(&write.idempotency_key)?.map(str::to_string);
    if write.ttl.is_some_and(|ttl| ttl.is_zero()) {
        return Err(DataError::invalid("ttl", "must be positive"));
    }
    Ok(Put {
        key: write.key,
        value: write.value,
        ttl: write.ttl.or(store.settings.default_ttl),
        expected_version: write.expected_version,
        idempotency_key,
    })
}

fn check_key(field: &'static str, key: &str) -> Result<(), DataError> {
    if key.is_empty() {
        return Err(DataError::invalid(field, "a key is required"));
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(DataError::invalid(
            field,
            format!("a key is longer than {MAX_KEY_BYTES} bytes"),
        ));
    }
    if key.chars().any(char::is_control) {
        return Err(DataError::invalid(field, "a key holds a control character"));
    }
    Ok(())
}

/// The token of the page after `key`: opaque to clients.
fn encode_page_token(key: &str) -> String {
    let mut raw = Vec::with_capacity(key.len() + 1);
    raw.push(PAGE_TOKEN_V1);
    raw.extend_from_slice(key.as_bytes());
    URL_SAFE_NO_PAD.encode(raw)
}

/// The key a page token continues after; a token that is not one of ours,
/// or of another prefix, is refused.
fn decode_page_token(token: &str, prefix: &str) -> Result<Option<String>, DataError> {
    if token.is_empty() {
        return Ok(None);
    }
    let malformed = || DataError::invalid("page_token", "malformed page token");
    let raw = URL_SAFE_NO_PAD.decode(token).map_err(|_| malformed())?;
    let (&version, key) = raw.split_first().ok_or_else(malformed)?;
    let key = String::from_utf8(key.to_vec()).map_err(|_| malformed())?;
    if version != PAGE_TOKEN_V1 || !key.starts_with(prefix) {
        return Err(malformed());
    }
    Ok(Some(key))
}

/// An item as both APIs give it.
pub(crate) fn to_pb(item: Item) -> pb::Item {
    pb::Item {
        key: item.key,
        value: item.value,
        version: item.version,
        expires_at_unix_ms: item.expires_at.map_or(0, unix_ms),
    }
}

pub(crate) fn unix_ms(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_round_trip_and_refuse_what_is_not_theirs() {
        let token = encode_page_token("users/42");
        assert_eq!(
            decode_page_token(&token, "users/").unwrap(),
            Some("users/42".into())
        );
        assert_eq!(decode_page_token("", "users/").unwrap(), None);
        for bad in ["!!", "AA", &encode_page_token("orders/1")] {
            let error = decode_page_token(bad, "users/").unwrap_err();
            assert_eq!(
                error.to_string(),
                "page_token: malformed page token",
                "{bad}"
            );
        }
    }

    #[test]
    fn keys_must_be_present_short_and_printable() {
        assert!(check_key("key", "a/b c").is_ok());
        assert!(check_key("key", "").is_err());
        assert!(check_key("key", "a\nb").is_err());
        assert!(check_key("key", &"k".repeat(MAX_KEY_BYTES + 1)).is_err());
    }
}
