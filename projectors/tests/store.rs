//! The store against the real Cassandra of the local stack (`make infra-up`;
//! `CHAT_STORE__NODES` overrides the contact points). Each test works in its
//! own keyspace and drops it at the end, so tests run in parallel.

use chat_projectors::store::{self, MessageRow, Store, StoreConfig, StoreError, MIGRATIONS};
use std::future::Future;
use std::time::{Duration, Instant};
use uuid::Uuid;

fn config(keyspace: &str) -> StoreConfig {
    let mut cfg = StoreConfig {
        keyspace: keyspace.into(),
        ..StoreConfig::default()
    };
    if let Ok(nodes) = std::env::var("CHAT_STORE__NODES") {
        cfg.nodes = nodes.split(',').map(|n| n.trim().to_string()).collect();
    }
    cfg
}

/// Runs `body` on a freshly migrated keyspace `t_<hex>`, then drops it (also
/// when `body` panics).
async fn with_store<F, Fut>(body: F)
where
    F: FnOnce(Store) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let cfg = config(&format!("t_{}", Uuid::new_v4().simple()));
    let store = store::connect(&cfg).await.unwrap();
    let report = store.migrate(&cfg.replication).await.unwrap();
    let all: Vec<i32> = MIGRATIONS.iter().map(|m| m.version).collect();
    assert_eq!((report.applied, report.already), (all, vec![]));
    let outcome = tokio::spawn(body(store.clone())).await;
    store.drop_keyspace().await.unwrap();
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
}

fn row(chat_id: Uuid, seq: u64) -> MessageRow {
    MessageRow {
        chat_id,
        seq,
        event_id: Uuid::new_v4(),
        kind: "MessageSent".into(),
        sender_user: "alice".into(),
        sender_device: "phone".into(),
        client_msg_id: seq.is_multiple_of(2).then(|| format!("c-{seq}")),
        body: format!(r#"{{"text":"message {seq}"}}"#),
        server_ts_ms: 1_700_000_000_000 + seq as i64,
        sequenced_ts_ms: 1_700_000_000_005 + seq as i64,
        trace_id: format!("trace-{seq}"),
    }
}

fn seqs(page: &[MessageRow]) -> Vec<u64> {
    page.iter().map(|m| m.seq).collect()
}

#[tokio::test]
async fn migrate_twice_applies_nothing_the_second_time() {
    with_store(|store| async move {
        let again = store.migrate(&Default::default()).await.unwrap();
        assert!(again.applied.is_empty());
        assert_eq!(again.already, [1, 2, 3, 4, 5]);
        store.require_migrated().await.unwrap();
        let tables = store.tables().await.unwrap();
        let expected = [
            "chat_daily_stats",
            "chat_members",
            "chat_receipts",
            "chats",
            "direct_chats",
            "messages",
            "presence",
            "projector_progress",
            "push_notified",
            "push_registrations",
            "push_settings",
            "schema_migrations",
            "user_changes",
            "user_chats",
            "user_devices",
        ];
        assert_eq!(tables, expected);
    })
    .await;
}

#[tokio::test]
async fn push_registrations_follow_record_time() {
    use chat_projectors::store::{PushRegistration, PushSettings};
    with_store(|store| async move {
        let reg = |token: &str| PushRegistration {
            device: "phone".into(),
            provider: "apns".into(),
            token: token.into(),
            locale: Some("en-GB".into()),
            updated_at: Some(2_000),
        };
        store
            .put_push_registration("bob", &reg("new"), 2_000)
            .await
            .unwrap();
        // An older record replayed later loses; an older delete too.
        store
            .put_push_registration("bob", &reg("old"), 1_000)
            .await
            .unwrap();
        store
            .delete_push_registration("bob", "phone", 1_500)
            .await
            .unwrap();
        assert_eq!(store.push_registrations("bob").await.unwrap(), [reg("new")]);
        store
            .delete_push_registration("bob", "phone", 3_000)
            .await
            .unwrap();
        assert!(store.push_registrations("bob").await.unwrap().is_empty());

        let chat = Uuid::new_v4();
        assert_eq!(store.push_notified(chat).await.unwrap(), 0);
        store.put_push_notified(chat, 9).await.unwrap();
        store.put_push_notified(chat, 4).await.unwrap();
        assert_eq!(store.push_notified(chat).await.unwrap(), 9);

        let settings = PushSettings {
            time_zone: "Europe/Paris".into(),
            dnd: Some((1320, 420)),
            allowed_chats: vec![chat],
        };
        store
            .put_push_settings("bob", &settings, 5_000)
            .await
            .unwrap();
        assert_eq!(store.push_settings("bob").await.unwrap(), Some(settings));
        assert_eq!(store.push_settings("ann").await.unwrap(), None);
    })
    .await;
}

#[tokio::test]
async fn put_message_is_idempotent() {
    with_store(|store| async move {
        let chat = Uuid::new_v4();
        let (odd, even) = (row(chat, 7), row(chat, 8));
        for m in [&odd, &odd, &even, &even] {
            store.put_message(m).await.unwrap();
        }
        assert_eq!(store.count_messages(chat, 100).await.unwrap(), 2);
        assert_eq!(store.last_seq(chat).await.unwrap(), Some(8));
        let page = store.messages_page(chat, None, None, 10).await.unwrap();
        assert_eq!(page, [odd, even]);
        // Replaying an older event never moves the head back.
        store.put_message(&row(chat, 3)).await.unwrap();
        assert_eq!(store.last_seq(chat).await.unwrap(), Some(8));
    })
    .await;
}

#[tokio::test]
async fn pages_cross_bucket_boundaries() {
    with_store(|store| async move {
        let chat = Uuid::new_v4();
        for seq in 1000..=1100 {
            store.put_message(&row(chat, seq)).await.unwrap();
        }
        store.put_message(&row(Uuid::new_v4(), 1050)).await.unwrap();
        let page = |before, after, limit| {
            let store = store.clone();
            async move {
                seqs(
                    &store
                        .messages_page(chat, before, after, limit)
                        .await
                        .unwrap(),
                )
            }
        };
        let all = page(None, None, 1000).await;
        assert_eq!(all, (1000..=1100).collect::<Vec<_>>());
        assert_eq!(page(None, None, 3).await, [1098, 1099, 1100]);
        assert_eq!(
            page(Some(1026), None, 5).await,
            [1021, 1022, 1023, 1024, 1025]
        );
        assert_eq!(
            page(None, Some(1020), 6).await,
            [1021, 1022, 1023, 1024, 1025, 1026]
        );
        let between = page(Some(1030), Some(1020), 100).await;
        assert_eq!(between, (1021..1030).collect::<Vec<_>>());
        assert_eq!(
            page(None, Some(1095), 100).await,
            [1096, 1097, 1098, 1099, 1100]
        );
        assert!(page(None, Some(1100), 10).await.is_empty());
        assert!(page(Some(1000), None, 10).await.is_empty());
        assert!(page(None, None, 0).await.is_empty());
        assert_eq!(store.count_messages(chat, 1100).await.unwrap(), 101);
        assert_eq!(store.count_messages(chat, 1023).await.unwrap(), 24);
        let unknown = store.messages_page(Uuid::new_v4(), None, None, 10);
        assert!(unknown.await.unwrap().is_empty());
    })
    .await;
}

#[tokio::test]
async fn unreachable_cluster_fails_fast_with_a_hint() {
    let cfg = StoreConfig {
        nodes: vec!["127.0.0.1:1".into()],
        connect_timeout_ms: 2_000,
        ..StoreConfig::default()
    };
    let started = Instant::now();
    let err = store::connect(&cfg).await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(3), "{err}");
    assert!(matches!(err, StoreError::Unreachable { .. }), "{err:?}");
    assert!(err.retryable());
    assert!(err.to_string().contains("make infra-up"), "{err}");
}

#[tokio::test]
async fn state_writes_never_move_back_under_replay() {
    with_store(|store| async move {
        let chat = Uuid::new_v4();
        store
            .put_member(chat, "carol", "member", 3, true)
            .await
            .unwrap();
        store.remove_member(chat, "carol", 6).await.unwrap();
        // A replay of the join (older seq) loses to the removal.
        store
            .put_member(chat, "carol", "member", 3, true)
            .await
            .unwrap();
        assert!(store.members(chat).await.unwrap().is_empty());
        let mine = store.user_chats("carol").await.unwrap();
        assert_eq!((mine[0].joined_seq, mine[0].left_seq), (3, Some(6)));
        // A rejoin clears left_seq.
        store
            .put_member(chat, "carol", "admin", 9, true)
            .await
            .unwrap();
        assert_eq!(
            store.members(chat).await.unwrap(),
            [("carol".to_string(), "admin".to_string(), 9)]
        );
        let mine = store.user_chats("carol").await.unwrap();
        assert_eq!((mine[0].joined_seq, mine[0].left_seq), (9, None));
        store.mark_read("carol", chat, 7).await.unwrap();
        store.mark_read("carol", chat, 5).await.unwrap();
        assert_eq!(store.user_chats("carol").await.unwrap()[0].last_read_seq, 7);
        store.put_progress("p", 2, 10).await.unwrap();
        store.put_progress("p", 2, 5).await.unwrap();
        assert_eq!(store.progress("p").await.unwrap(), [(2, 10)].into());
        store
            .mark_changed("carol", chat, 1_700_000_000_900)
            .await
            .unwrap();
        let since = |ms| store.changed_chats_since("carol", ms);
        assert_eq!(since(1_700_000_000_500).await.unwrap(), [chat]);
        // Markers are bucketed: a later point in the same bucket still finds
        // it (harmless extra), the next bucket does not.
        assert_eq!(since(1_700_000_001_000).await.unwrap(), [chat]);
        let next = store::change_bucket(1_700_000_000_900) + store::CHANGE_BUCKET_MS;
        assert!(since(next).await.unwrap().is_empty());
    })
    .await;
}

#[tokio::test]
async fn an_unmigrated_keyspace_is_refused_with_a_hint() {
    let store = store::connect(&config(&format!("t_{}", Uuid::new_v4().simple())))
        .await
        .unwrap();
    let err = store.require_migrated().await.unwrap_err();
    assert!(err.to_string().contains("chat-admin migrate"), "{err}");
}
