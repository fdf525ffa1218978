//! Notifications: the lock's pub/sub channel, Redis key-space events, and the versions that
//! wake waiters and watchers.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ::redis::{Client, RedisError};
use futures_util::StreamExt;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::conn::Conn;
use super::scripts::Keys;
use super::{COMMAND_TIMEOUT, KeyEvents, NAME, PING_EVERY, SUBSCRIBE_TIMEOUT};
use crate::error::Error;

/// Change notifications fed by the subscriber task.
pub(super) struct Events {
    keys: Keys,
    key_events: KeyEvents,
    stop: CancellationToken,
    /// Bumped when the holder may have changed.
    pub(super) holder: watch::Sender<u64>,
    /// Bumped when the candidate registry may have changed.
    pub(super) candidates: watch::Sender<u64>,
    /// Bumped when a state value may have changed, per key.
    state: Mutex<HashMap<String, watch::Sender<u64>>>,
    /// Whether the subscription is live.
    live: watch::Sender<bool>,
}

impl Events {
    pub(super) fn new(keys: Keys, key_events: KeyEvents, stop: CancellationToken) -> Self {
        Events {
            keys,
            key_events,
            stop,
            holder: watch::channel(0).0,
            candidates: watch::channel(0).0,
            state: Mutex::new(HashMap::new()),
            live: watch::channel(false).0,
        }
    }

    pub(super) fn bump_holder(&self) {
        self.holder.send_modify(|v| *v = v.wrapping_add(1));
    }

    pub(super) fn bump_candidates(&self) {
        self.candidates.send_modify(|v| *v = v.wrapping_add(1));
    }

    pub(super) fn bump_state(&self, key: Option<&str>) {
        let mut state = crate::sync::lock(&self.state);
        state.retain(|_, tx| tx.receiver_count() > 0);
        for (k, tx) in state.iter() {
            if key.is_none_or(|key| key == k) {
                tx.send_modify(|v| *v = v.wrapping_add(1));
            }
        }
    }

    pub(super) fn watch_state(&self, key: &str) -> watch::Receiver<u64> {
        crate::sync::lock(&self.state)
            .entry(key.to_owned())
            .or_insert_with(|| watch::channel(0).0)
            .subscribe()
    }

    /// Waits until the subscription is live.
    pub(super) async fn wait_live(&self, name: &str) -> Result<(), Error> {
        let mut rx = self.live.subscribe();
        match tokio::time::timeout(SUBSCRIBE_TIMEOUT, rx.wait_for(|live| *live)).await {
            Ok(Ok(_)) => Ok(()),
            _ => Err(Error::backend_msg(
                NAME,
                format!("lock {name:?}: no notification connection to Redis"),
            )),
        }
    }

    pub(super) fn dispatch(&self, channel: &str, payload: &str) {
        if channel == self.keys.channel {
            match payload.split_once(' ') {
                Some(("state", key)) => self.bump_state(Some(key)),
                _ => self.bump_holder(),
            }
        } else if channel == self.keys.registry {
            self.bump_candidates();
        } else if (channel == self.keys.keyspace && payload == "expired")
            || (channel == self.keys.keyevent && payload == self.keys.lock)
        {
            self.bump_holder();
        }
    }
}

/// The notification task of one lock: keeps a subscription to the lock's channel (and key events
/// where used), reconnecting with backoff, and bumps the versions waiters watch. After every
/// (re)subscription everything is bumped, as messages may have been missed.
pub(super) async fn subscribe(events: Arc<Events>, client: Client, commands: Arc<Conn>) {
    let mut delay = Duration::from_millis(100);
    loop {
        let connect = async {
            let pubsub = client.get_async_pubsub().await?;
            let (mut sink, stream) = pubsub.split();
            // The registry has a channel of its own: nodes of 0.1.0 take any message on the
            // lock's channel for a holder change.
            sink.subscribe(&[&events.keys.channel, &events.keys.registry])
                .await?;
            Ok::<_, RedisError>((sink, stream))
        };
        let connected = tokio::select! {
            () = events.stop.cancelled() => return,
            res = tokio::time::timeout(SUBSCRIBE_TIMEOUT, connect) => res,
        };
        match connected {
            Ok(Ok((mut sink, mut stream))) => {
                delay = Duration::from_millis(100);
                if let Some(channel) = key_event_channel(&events, &commands).await
                    && let Err(err) = sink.subscribe(&channel).await
                {
                    tracing::debug!(error = %err, "cannot subscribe to key events");
                }
                events.live.send_replace(true);
                events.bump_holder();
                events.bump_candidates();
                events.bump_state(None);
                let mut ping = tokio::time::interval(PING_EVERY);
                ping.tick().await;
                loop {
                    tokio::select! {
                        () = events.stop.cancelled() => return,
                        msg = stream.next() => match msg {
                            Some(msg) => events.dispatch(
                                msg.get_channel_name(),
                                std::str::from_utf8(msg.get_payload_bytes()).unwrap_or(""),
                            ),
                            None => break,
                        },
                        _ = ping.tick() => {
                            let pong = tokio::time::timeout(PING_EVERY, sink.ping::<::redis::Value>()).await;
                            if !matches!(pong, Ok(Ok(_))) {
                                break;
                            }
                        }
                    }
                }
                events.live.send_replace(false);
                tracing::debug!(channel = %events.keys.channel, "notification connection lost; reconnecting");
            }
            Ok(Err(err)) => {
                tracing::debug!(error = %err, channel = %events.keys.channel, "cannot subscribe");
            }
            Err(_) => tracing::debug!(channel = %events.keys.channel, "subscribing timed out"),
        }
        tokio::select! {
            () = events.stop.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}

/// The key-event channel to listen on, enabling notifications first if asked to.
async fn key_event_channel(events: &Events, commands: &Conn) -> Option<String> {
    if events.key_events == KeyEvents::Off {
        return None;
    }
    let get = commands
        .run("config get", COMMAND_TIMEOUT, |mut c| async move {
            ::redis::cmd("CONFIG")
                .arg("GET")
                .arg("notify-keyspace-events")
                .query_async::<Vec<String>>(&mut c)
                .await
        })
        .await;
    let mut flags = match get {
        Ok(v) => v.get(1).cloned().unwrap_or_default(),
        Err(err) => {
            tracing::debug!(error = %err, "cannot read notify-keyspace-events; not using key events");
            return None;
        }
    };
    let expired = |f: &str| f.contains('x') || f.contains('A');
    if events.key_events == KeyEvents::Enable && !(expired(&flags) && flags.contains('K')) {
        let mut wanted = flags.clone();
        for c in ['K', 'x'] {
            if !wanted.contains(c) {
                wanted.push(c);
            }
        }
        let set = commands
            .run("config set", COMMAND_TIMEOUT, |mut c| {
                let wanted = wanted.clone();
                async move {
                    ::redis::cmd("CONFIG")
                        .arg("SET")
                        .arg("notify-keyspace-events")
                        .arg(wanted)
                        .query_async::<()>(&mut c)
                        .await
                }
            })
            .await;
        match set {
            Ok(()) => flags = wanted,
            Err(err) => tracing::warn!(error = %err, "cannot enable Redis key events"),
        }
    }
    if !expired(&flags) {
        None
    } else if flags.contains('K') {
        Some(events.keys.keyspace.clone())
    } else if flags.contains('E') {
        Some(events.keys.keyevent.clone())
    } else {
        None
    }
}
