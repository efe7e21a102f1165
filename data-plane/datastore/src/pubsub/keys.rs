//! The window of idempotency keys a bus remembers where its broker does not
//! dedupe (memory, core NATS, Kafka): bounded by count and by age, so that a
//! stream of unique keys never grows memory.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use tokio::time::Instant;

/// How long an idempotency key is remembered.
pub const KEY_WINDOW: Duration = Duration::from_secs(2 * 60);
/// The most idempotency keys one window remembers; past it the oldest is
/// forgotten.
pub const MAX_KEYS: usize = 10_000;

/// Idempotency keys taken recently, with the message id each was given.
#[derive(Debug, Default)]
pub(crate) struct KeyWindow {
    ids: HashMap<String, String>,
    order: VecDeque<(String, Instant)>,
}

impl KeyWindow {
    /// The id of the message published with `key`, if it is remembered.
    pub(crate) fn get(&mut self, key: &str, now: Instant) -> Option<String> {
        self.forget_old(now);
        self.ids.get(key).cloned()
    }

    /// Remembers that `key` published the message `id`.
    pub(crate) fn remember(&mut self, key: &str, id: String, now: Instant) {
        self.ids.insert(key.to_string(), id);
        self.order.push_back((key.to_string(), now));
        self.forget_old(now);
    }

    fn forget_old(&mut self, now: Instant) {
        while let Some((key, at)) = self.order.front() {
            if self.order.len() <= MAX_KEYS && now.duration_since(*at) <= KEY_WINDOW {
                break;
            }
            self.ids.remove(key);
            self.order.pop_front();
        }
    }
}

/// Runs `publish` unless `key` is remembered in `keys`, and remembers the
/// id it returns. The window is locked across the publish, so that two
/// publishes of one key cannot both find it absent; publishes without a key
/// do not wait for it.
#[cfg(any(feature = "nats", feature = "kafka"))]
pub(crate) async fn publish_once(
    keys: &tokio::sync::Mutex<KeyWindow>,
    key: Option<&str>,
    publish: impl Future<Output = Result<String, crate::Error>>,
) -> Result<String, crate::Error> {
    let Some(key) = key else {
        return publish.await;
    };
    let mut window = keys.lock().await;
    if let Some(id) = window.get(key, Instant::now()) {
        return Ok(id);
    }
    let id = publish.await?;
    window.remember(key, id.clone(), Instant::now());
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_key_is_forgotten_after_the_window_or_past_the_count() {
        let mut keys = KeyWindow::default();
        keys.remember("k", "1".into(), Instant::now());
        assert_eq!(keys.get("k", Instant::now()).as_deref(), Some("1"));
        for i in 0..MAX_KEYS {
            keys.remember(&format!("other-{i}"), i.to_string(), Instant::now());
        }
        assert_eq!(
            keys.get("k", Instant::now()),
            None,
            "the oldest goes past the count"
        );
        assert!(keys.get("other-1", Instant::now()).is_some());
        tokio::time::advance(KEY_WINDOW + Duration::from_secs(1)).await;
        assert_eq!(
            keys.get("other-1", Instant::now()),
            None,
            "every key goes past the window"
        );
    }
}
