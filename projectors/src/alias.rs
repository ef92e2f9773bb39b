//! Following a keyspace alias (`store.keyspace_alias`; `chat-admin switch`
//! moves it): which keyspace a service uses now, and a store handle that
//! moves to the new keyspace when the alias changes, without a restart.
//!
//! The alias lives in `<store.control_keyspace>.keyspace_aliases`
//! ([`crate::store`]'s ops). A service reads it at start and every
//! `store.alias_poll_ms`; a new keyspace is used only once it is migrated.
//! Readers ([`FollowingStore`], the gateway) send each new request to the
//! new keyspace while requests in flight finish on the old one; writers
//! (the history projector) stop their loop and start again on the new
//! keyspace from its own `projector_progress` (see `chat-history`).

use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

use crate::store::{self, Store, StoreConfig, StoreError};

/// Reads one alias.
#[derive(Clone, Debug)]
pub struct AliasWatch {
    control: Store,
    alias: String,
    poll: Duration,
    /// Used while the alias is not set (`store.keyspace`).
    fallback: String,
}

impl AliasWatch {
    /// The watch of `cfg.keyspace_alias` (None when no alias is configured),
    /// over `base`'s session.
    pub fn of(cfg: &StoreConfig, base: &Store) -> Option<Self> {
        cfg.keyspace_alias.as_ref().map(|alias| Self {
            control: base.with_keyspace(&cfg.control_keyspace),
            alias: alias.clone(),
            poll: Duration::from_millis(cfg.alias_poll_ms),
            fallback: cfg.keyspace.clone(),
        })
    }

    pub fn alias(&self) -> &str {
        &self.alias
    }

    /// The keyspace the alias names now (`store.keyspace` while the alias
    /// is not set: the first `chat-admin switch` sets it).
    pub async fn keyspace(&self) -> Result<String, StoreError> {
        match self.control.alias(&self.alias).await {
            Ok(Some(row)) => Ok(row.keyspace),
            Ok(None) => Ok(self.fallback.clone()),
            Err(e) => Err(StoreError::Config(format!(
                "cannot read keyspace alias {:?} in {}.keyspace_aliases ({e}): create it with `chat-admin switch --alias {} --show`",
                self.alias,
                self.control.keyspace(),
                self.alias
            ))),
        }
    }

    /// Waits until the alias names a migrated keyspace other than `from`;
    /// None when `stop` fires first. Read failures are logged and retried.
    pub async fn changed(&self, from: &str, stop: &CancellationToken) -> Option<String> {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(self.poll) => {}
                _ = stop.cancelled() => return None,
            }
            match self.keyspace().await {
                Ok(ks) if ks != from => {
                    match self.control.with_keyspace(&ks).require_migrated().await {
                        Ok(()) => return Some(ks),
                        Err(e) => {
                            tracing::warn!(error = %e, alias = %self.alias, keyspace = %ks, "alias names a keyspace that is not ready; staying")
                        }
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, alias = %self.alias, "cannot read the keyspace alias; staying")
                }
            }
        }
    }
}

/// Connects and picks the keyspace: the alias's when one is configured
/// (returned with its watch), else `cfg.keyspace`.
pub async fn connect(cfg: &StoreConfig) -> Result<(Store, Option<AliasWatch>), StoreError> {
    let base = store::connect(cfg).await?;
    match AliasWatch::of(cfg, &base) {
        None => Ok((base, None)),
        Some(watch) => {
            let ks = watch.keyspace().await?;
            tracing::info!(alias = %watch.alias, keyspace = %ks, "keyspace alias resolved");
            Ok((base.with_keyspace(&ks), Some(watch)))
        }
    }
}

/// A store handle for readers that follows an alias: [`current`](Self::current)
/// is the store of the keyspace the alias names (as of the last poll).
#[derive(Clone, Debug)]
pub struct FollowingStore {
    current: Arc<RwLock<Store>>,
}

impl FollowingStore {
    /// A handle fixed on `store` (no alias).
    pub fn fixed(store: Store) -> Self {
        Self {
            current: Arc::new(RwLock::new(store)),
        }
    }

    /// Connects as [`connect`] does and, with an alias, follows it until `stop`.
    pub async fn connect(cfg: &StoreConfig, stop: CancellationToken) -> Result<Self, StoreError> {
        let (store, watch) = connect(cfg).await?;
        let me = Self::fixed(store);
        if let Some(watch) = watch {
            let follower = me.clone();
            tokio::spawn(async move {
                loop {
                    let from = follower.current().keyspace().to_string();
                    let Some(ks) = watch.changed(&from, &stop).await else {
                        return;
                    };
                    let next = follower.current().with_keyspace(&ks);
                    tracing::info!(alias = %watch.alias, from = %from, to = %ks, "keyspace alias switched: reads move over");
                    if let Ok(mut c) = follower.current.write() {
                        *c = next;
                    }
                }
            });
        }
        Ok(me)
    }

    /// The store to use for the next request.
    pub fn current(&self) -> Store {
        self.current
            .read()
            .map(|s| s.clone())
            .unwrap_or_else(|e| e.into_inner().clone())
    }
}
